//! The emulator's service catalog: nodes, service instances and health checks per
//! datacenter, changed by `PUT /v1/catalog/register` and `/v1/catalog/deregister` and
//! read by `GET /v1/health/service/<name>`, with the indexes Consul's state store keeps
//! for them. Pure data: the HTTP side, the raft index and the blocking live in the parent.
//!
//! The rules followed, from Consul's catalog endpoint and state store:
//! - Register needs `Node` and `Address` ("Must provide node", "Must provide address if
//!   SkipNodeUpdate is not set"); `Datacenter` defaults to the agent's (`dc1`), and an
//!   unknown one is "No path to datacenter". A service's `ID` defaults to its `Service`
//!   name; registering the same node and ID again replaces it. `Check` and `Checks` are
//!   both taken; a check's `CheckID` defaults to its `Name`, its `Status` to `critical`,
//!   and one with a `ServiceID` needs that service on the node ("Missing service
//!   registration"). A check without `ServiceID` is the node's and applies to every
//!   service on it. JSON keys are matched without regard to case, as Go decodes them.
//! - Deregister takes `Node` and `ServiceID` (the instance and its checks), `CheckID`
//!   (that check) or neither (the node, its instances and checks).
//! - Each service name has an index (Consul's `service.<name>` index entry): the raft
//!   index of the last change to one of its instances, to a check of one, or to the node
//!   or a node check of a node running one. Writing what is already there changes
//!   nothing. When a service loses its last instance the entry goes, and the datacenter's
//!   "last extinction" index records when.
//! - The health endpoint's `X-Consul-Index` is the service's index if it has instances,
//!   else the last extinction index if a service ever went extinct, else the catalog
//!   tables' index; never below 1. Service names and tags match without regard to case;
//!   every `tag` given must be carried; results are ordered by node, then instance ID.
//!   `passing` drops an instance with any check (its own or its node's) not `passing`; one
//!   with no checks at all stays, as in Consul's `filterNonPassing`.
//!
//! One raft index is shared by every datacenter here (Consul has one per datacenter);
//! each datacenter's indexes still only move forward, which is what a client sees.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};

/// The datacenter of the agent the emulator plays.
pub const DEFAULT_DC: &str = "dc1";

#[derive(Default)]
pub struct Catalog {
    /// Datacenters known besides [`DEFAULT_DC`].
    others: BTreeSet<String>,
    /// By (datacenter, node name).
    nodes: BTreeMap<(String, String), Node>,
    /// By (datacenter, node, instance ID).
    services: BTreeMap<(String, String, String), Service>,
    /// By (datacenter, node, check ID).
    checks: BTreeMap<(String, String, String), Check>,
    /// By (datacenter, lowercased service name): its index, while it has instances.
    service_index: BTreeMap<(String, String), u64>,
    /// By datacenter: when a service last lost its last instance.
    extinction: BTreeMap<String, u64>,
    /// By datacenter: the last change to the nodes, services or checks tables.
    tables: BTreeMap<String, u64>,
}

#[derive(Clone, PartialEq)]
struct Node {
    address: String,
    create_index: u64,
    modify_index: u64,
}

#[derive(Clone, PartialEq)]
struct Service {
    name: String,
    tags: Vec<String>,
    address: String,
    port: u64,
    create_index: u64,
    modify_index: u64,
}

#[derive(Clone, PartialEq)]
struct Check {
    name: String,
    status: String,
    /// Empty for a node check.
    service_id: String,
    create_index: u64,
    modify_index: u64,
}

/// A register or deregister that Consul would refuse, with Consul's message.
#[derive(Debug)]
pub struct Refused(pub String);

/// What a health query asks for.
pub struct HealthQuery<'a> {
    pub dc: &'a str,
    pub name: &'a str,
    pub tags: &'a [String],
    pub passing: bool,
}

/// A value of `obj` by key, matched without regard to case (as Go's JSON decoding does).
fn get<'a>(obj: &'a Value, key: &str) -> Option<&'a Value> {
    obj.as_object()?
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, v)| v)
        .filter(|v| !v.is_null())
}

fn text(obj: &Value, key: &str) -> String {
    get(obj, key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

impl Catalog {
    pub fn add_datacenter(&mut self, dc: &str) {
        if dc != DEFAULT_DC {
            self.others.insert(dc.to_string());
        }
    }

    pub fn knows(&self, dc: &str) -> bool {
        dc == DEFAULT_DC || self.others.contains(dc)
    }

    /// The datacenter a request names, or the agent's.
    fn datacenter(&self, given: &str) -> Result<String, Refused> {
        let dc = match given {
            "" => DEFAULT_DC,
            dc => dc,
        };
        match self.knows(dc) {
            true => Ok(dc.to_string()),
            false => Err(Refused("No path to datacenter".into())),
        }
    }

    /// Marks a change at `idx` to every service named in `names` and to the tables.
    fn touch(&mut self, dc: &str, names: impl IntoIterator<Item = String>, idx: u64) {
        for name in names {
            let key = (dc.to_string(), name.to_lowercase());
            let alive = self
                .services
                .iter()
                .any(|((d, _, _), s)| d == dc && s.name.eq_ignore_ascii_case(&name));
            if alive {
                self.service_index.insert(key, idx);
            } else if self.service_index.remove(&key).is_some() {
                self.extinction.insert(dc.to_string(), idx);
            }
        }
        self.tables.insert(dc.to_string(), idx);
    }

    /// The names of the services on a node.
    fn names_on(&self, dc: &str, node: &str) -> Vec<String> {
        self.services
            .iter()
            .filter(|((d, n, _), _)| d == dc && n == node)
            .map(|(_, s)| s.name.clone())
            .collect()
    }

    /// `PUT /v1/catalog/register` with `body`, applied at raft index `idx`. All or
    /// nothing: a refused request changes nothing.
    pub fn register(&mut self, body: &Value, idx: u64) -> Result<(), Refused> {
        let node = text(body, "Node");
        if node.is_empty() {
            return Err(Refused("Must provide node".into()));
        }
        let address = text(body, "Address");
        let skip_node_update = get(body, "SkipNodeUpdate")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if address.is_empty() && !skip_node_update {
            return Err(Refused(
                "Must provide address if SkipNodeUpdate is not set".into(),
            ));
        }
        let dc = self.datacenter(&text(body, "Datacenter"))?;
        let node_key = (dc.clone(), node.clone());
        if skip_node_update && !self.nodes.contains_key(&node_key) {
            return Err(Refused("Missing node registration".into()));
        }

        let service = match get(body, "Service") {
            None => None,
            Some(svc) => {
                let name = text(svc, "Service");
                let mut id = text(svc, "ID");
                if id.is_empty() {
                    id = name.clone();
                }
                if name.is_empty() {
                    return Err(Refused("Must provide service name with ID".into()));
                }
                let tags = get(svc, "Tags")
                    .and_then(Value::as_array)
                    .map(|t| {
                        t.iter()
                            .filter_map(Value::as_str)
                            .map(str::to_string)
                            .collect()
                    })
                    .unwrap_or_default();
                let port = get(svc, "Port").and_then(Value::as_u64).unwrap_or(0);
                Some((
                    id,
                    Service {
                        name,
                        tags,
                        address: text(svc, "Address"),
                        port,
                        create_index: idx,
                        modify_index: idx,
                    },
                ))
            }
        };

        let mut checks = Vec::new();
        let listed = get(body, "Check").into_iter().chain(
            get(body, "Checks")
                .and_then(Value::as_array)
                .into_iter()
                .flatten(),
        );
        for check in listed {
            let check_node = match text(check, "Node") {
                n if n.is_empty() => node.clone(),
                n => n,
            };
            if check_node != node {
                return Err(Refused(format!(
                    "Node mismatch in check: {check_node} is not {node}"
                )));
            }
            let name = text(check, "Name");
            let id = match text(check, "CheckID") {
                id if id.is_empty() => name.clone(),
                id => id,
            };
            if id.is_empty() {
                return Err(Refused("Missing check ID".into()));
            }
            let service_id = text(check, "ServiceID");
            let on_node = service.as_ref().is_some_and(|(sid, _)| *sid == service_id)
                || self
                    .services
                    .contains_key(&(dc.clone(), node.clone(), service_id.clone()));
            if !service_id.is_empty() && !on_node {
                return Err(Refused("Missing service registration".into()));
            }
            let status = match text(check, "Status") {
                s if s.is_empty() => "critical".to_string(),
                s => s,
            };
            checks.push((
                id,
                Check {
                    name,
                    status,
                    service_id,
                    create_index: idx,
                    modify_index: idx,
                },
            ));
        }

        // Everything checked: apply.
        if !skip_node_update {
            let changed = match self.nodes.get_mut(&node_key) {
                Some(n) if n.address == address => false,
                Some(n) => {
                    n.address = address;
                    n.modify_index = idx;
                    true
                }
                None => {
                    self.nodes.insert(
                        node_key.clone(),
                        Node {
                            address,
                            create_index: idx,
                            modify_index: idx,
                        },
                    );
                    true
                }
            };
            if changed {
                let names = self.names_on(&dc, &node);
                self.touch(&dc, names, idx);
            }
        }
        if let Some((id, mut new)) = service {
            let key = (dc.clone(), node.clone(), id);
            let old = self.services.get(&key).cloned();
            let same = old.as_ref().is_some_and(|o| {
                (&o.name, &o.tags, &o.address, o.port)
                    == (&new.name, &new.tags, &new.address, new.port)
            });
            if !same {
                if let Some(o) = &old {
                    new.create_index = o.create_index;
                }
                let mut names = vec![new.name.clone()];
                names.extend(old.map(|o| o.name));
                self.services.insert(key, new);
                self.touch(&dc, names, idx);
            }
        }
        for (id, mut new) in checks {
            let key = (dc.clone(), node.clone(), id);
            let old = self.checks.get(&key).cloned();
            let same = old.as_ref().is_some_and(|o| {
                (&o.name, &o.status, &o.service_id) == (&new.name, &new.status, &new.service_id)
            });
            if same {
                continue;
            }
            if let Some(o) = &old {
                new.create_index = o.create_index;
            }
            let names = self.affected(&dc, &node, &new.service_id);
            self.checks.insert(key, new);
            self.touch(&dc, names, idx);
        }
        Ok(())
    }

    /// The services a check's change affects: its own, or for a node check every
    /// service on the node.
    fn affected(&self, dc: &str, node: &str, service_id: &str) -> Vec<String> {
        match service_id {
            "" => self.names_on(dc, node),
            id => self
                .services
                .get(&(dc.to_string(), node.to_string(), id.to_string()))
                .map(|s| vec![s.name.clone()])
                .unwrap_or_default(),
        }
    }

    /// `PUT /v1/catalog/deregister` with `body`, applied at raft index `idx`. Removing
    /// what is not there is no change (and no error), as in Consul.
    pub fn deregister(&mut self, body: &Value, idx: u64) -> Result<(), Refused> {
        let node = text(body, "Node");
        if node.is_empty() {
            return Err(Refused("Must provide node".into()));
        }
        let dc = self.datacenter(&text(body, "Datacenter"))?;
        let service_id = text(body, "ServiceID");
        let check_id = text(body, "CheckID");
        let on_node = |d: &String, n: &String| *d == dc && *n == node;
        if !service_id.is_empty() {
            let key = (dc.clone(), node.clone(), service_id.clone());
            if let Some(gone) = self.services.remove(&key) {
                self.checks
                    .retain(|(d, n, _), c| !(on_node(d, n) && c.service_id == service_id));
                self.touch(&dc, [gone.name], idx);
            }
        } else if !check_id.is_empty() {
            let key = (dc.clone(), node.clone(), check_id);
            if let Some(check) = self.checks.get(&key) {
                let names = self.affected(&dc, &node, &check.service_id);
                self.checks.remove(&key);
                self.touch(&dc, names, idx);
            }
        } else if self.nodes.remove(&(dc.clone(), node.clone())).is_some() {
            let names = self.names_on(&dc, &node);
            self.services.retain(|(d, n, _), _| !on_node(d, n));
            self.checks.retain(|(d, n, _), _| !on_node(d, n));
            self.touch(&dc, names, idx);
        }
        Ok(())
    }

    /// The health endpoint's `X-Consul-Index` for a service (see the module's rules).
    pub fn health_index(&self, dc: &str, name: &str) -> u64 {
        let own = self
            .service_index
            .get(&(dc.to_string(), name.to_lowercase()));
        own.or_else(|| self.extinction.get(dc))
            .or_else(|| self.tables.get(dc))
            .copied()
            .unwrap_or(0)
            .max(1)
    }

    /// The instances a health query lists, as Consul's JSON.
    pub fn health(&self, q: &HealthQuery) -> Vec<Value> {
        let mut out = Vec::new();
        for ((dc, node, id), svc) in &self.services {
            if dc != q.dc || !svc.name.eq_ignore_ascii_case(q.name) {
                continue;
            }
            let carries = |tag: &String| svc.tags.iter().any(|t| t.eq_ignore_ascii_case(tag));
            if !q.tags.iter().all(carries) {
                continue;
            }
            let checks: Vec<(&String, &Check)> = self
                .checks
                .iter()
                .filter(|((d, n, _), c)| {
                    d == dc && n == node && (c.service_id.is_empty() || c.service_id == *id)
                })
                .map(|((_, _, check_id), c)| (check_id, c))
                .collect();
            if q.passing && checks.iter().any(|(_, c)| c.status != "passing") {
                continue;
            }
            let n = &self.nodes[&(dc.clone(), node.clone())];
            out.push(json!({
                "Node": {
                    "ID": "",
                    "Node": node,
                    "Address": n.address,
                    "Datacenter": dc,
                    "TaggedAddresses": null,
                    "Meta": null,
                    "CreateIndex": n.create_index,
                    "ModifyIndex": n.modify_index,
                },
                "Service": {
                    "ID": id,
                    "Service": svc.name,
                    "Tags": svc.tags,
                    "Address": svc.address,
                    "Meta": null,
                    "Port": svc.port,
                    "Weights": {"Passing": 1, "Warning": 1},
                    "EnableTagOverride": false,
                    "CreateIndex": svc.create_index,
                    "ModifyIndex": svc.modify_index,
                },
                "Checks": checks.iter().map(|(check_id, c)| {
                    let (service_name, service_tags) = match c.service_id.as_str() {
                        "" => (String::new(), Vec::new()),
                        _ => (svc.name.clone(), svc.tags.clone()),
                    };
                    json!({
                        "Node": node,
                        "CheckID": check_id,
                        "Name": c.name,
                        "Status": c.status,
                        "Notes": "",
                        "Output": "",
                        "ServiceID": c.service_id,
                        "ServiceName": service_name,
                        "ServiceTags": service_tags,
                        "CreateIndex": c.create_index,
                        "ModifyIndex": c.modify_index,
                    })
                }).collect::<Vec<_>>(),
            }));
        }
        out
    }

    /// The current status of a check, for the test helpers.
    pub fn check(&self, dc: &str, node: &str, check_id: &str) -> Option<Value> {
        let c = self
            .checks
            .get(&(dc.to_string(), node.to_string(), check_id.to_string()))?;
        Some(json!({
            "Node": node,
            "CheckID": check_id,
            "Name": c.name,
            "Status": c.status,
            "ServiceID": c.service_id,
        }))
    }

    /// A raft snapshot restored at `index`: the data stays, every index is at most
    /// `index`.
    pub fn restore(&mut self, index: u64) {
        for n in self.nodes.values_mut() {
            n.create_index = n.create_index.min(index);
            n.modify_index = n.modify_index.min(index);
        }
        for s in self.services.values_mut() {
            s.create_index = s.create_index.min(index);
            s.modify_index = s.modify_index.min(index);
        }
        for c in self.checks.values_mut() {
            c.create_index = c.create_index.min(index);
            c.modify_index = c.modify_index.min(index);
        }
        for i in self
            .service_index
            .values_mut()
            .chain(self.extinction.values_mut())
            .chain(self.tables.values_mut())
        {
            *i = (*i).min(index);
        }
    }
}
