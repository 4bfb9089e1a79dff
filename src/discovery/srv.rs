//! DNS SRV discovery: one SRV name's records turned into prioritised, weighted endpoints,
//! re-read in the background when the records' TTL runs out, never per connection.
//!
//! The name is queried as given (Consul answers `redis.service.consul` as well as
//! `_redis._tcp.service.consul`). Each usable record becomes one endpoint per address of
//! its target, carrying the record's priority and weight; the balancer does the RFC 2782
//! ordering and failover per connection. Target addresses come from the answer's
//! additional section when the server put them there, else from a separate A/AAAA
//! lookup. A UDP answer too large for one datagram comes back truncated and the resolver
//! asks again over TCP, so large record sets arrive whole.
//!
//! What happens when the answer is not a list of backends:
//! - NXDOMAIN or NODATA is definitive: an empty set is published (connections are refused
//!   at once), the reason is logged once, and the name is asked again every
//!   [`EMPTY_REQUERY`] so records that appear later are used within seconds.
//! - A failed lookup (timeout, SERVFAIL, an answer that does not parse) is an error: the
//!   driver keeps the last good set and retries with backoff.
//! - A malformed record (target `.` among others, port 0) or a target without addresses
//!   is skipped with one warning naming the name and the record; the rest keep serving.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::net::NetError;
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep_until};
use tracing::warn;

use super::dns::{self, Resolver};
use super::{Source, SourceError};
use crate::endpoint::{Endpoint, EndpointSet};
use crate::logsafe::outside;

/// How often a name with no usable records is asked again. Short, so a service that
/// registers after the ambassador started is used within seconds; long enough that an
/// ambassador pointed at a name that never appears costs its DNS server next to nothing.
/// It ignores the negative-caching TTL on purpose: Consul and most local servers send 0
/// or nothing, and a large one would leave a new service unused for its length.
pub const EMPTY_REQUERY: Duration = Duration::from_secs(3);

/// A target whose address lookup failed (not a definitive "no such name") while other
/// targets resolved is asked again this soon rather than at the records' TTL.
const RETRY_FAILED_TARGET: Duration = Duration::from_secs(5);

/// A usable SRV record: where to connect and how it ranks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: Name,
    pub port: u16,
    pub priority: u16,
    pub weight: u16,
}

impl Target {
    /// One endpoint per address of the target, each with the record's rank and the
    /// target as its origin for log lines.
    pub fn endpoints(&self, addrs: &[IpAddr]) -> Vec<Endpoint> {
        let origin: Arc<str> = format!("{}:{}", host_text(&self.host), self.port).into();
        addrs
            .iter()
            .map(|ip| Endpoint {
                priority: self.priority,
                weight: self.weight,
                ..Endpoint::new((*ip, self.port).into()).with_origin(origin.clone())
            })
            .collect()
    }
}

/// An SRV record that cannot be used, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRecord {
    /// The record in zone-file form: `priority weight port target`.
    pub record: String,
    pub why: &'static str,
}

impl fmt::Display for BadRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SRV record '{}' {}", self.record, self.why)
    }
}

/// What the SRV records of one answer come to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Records {
    /// RFC 2782's "decidedly not available at this domain": one record, target ".".
    NotAvailable,
    /// The usable records, sorted so an unchanged answer compares equal whatever order
    /// the server sent them in, and the ones skipped.
    Targets {
        usable: Vec<Target>,
        bad: Vec<BadRecord>,
    },
}

/// Sorts an answer's SRV records into usable targets and malformed ones. Records of
/// other types (a CNAME leading to the SRV set) are ignored.
pub fn srv_records(answers: &[Record]) -> Records {
    let srvs: Vec<_> = answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(srv) => Some(srv),
            _ => None,
        })
        .collect();
    if let [only] = srvs.as_slice()
        && only.target.is_root()
    {
        return Records::NotAvailable;
    }
    let mut usable = Vec::with_capacity(srvs.len());
    let mut bad = Vec::new();
    for srv in srvs {
        let why = if srv.target.is_root() {
            Some("has target '.' (no service) next to real targets")
        } else if srv.port == 0 {
            Some("has port 0")
        } else {
            None
        };
        match why {
            Some(why) => bad.push(BadRecord {
                record: format!(
                    "{} {} {} {}",
                    srv.priority,
                    srv.weight,
                    srv.port,
                    outside(&srv.target.to_string())
                ),
                why,
            }),
            None => usable.push(Target {
                host: srv.target.clone(),
                port: srv.port,
                priority: srv.priority,
                weight: srv.weight,
            }),
        }
    }
    usable.sort_by(|a, b| {
        (a.priority, &a.host, a.port, a.weight).cmp(&(b.priority, &b.host, b.port, b.weight))
    });
    usable.dedup();
    Records::Targets { usable, bad }
}

/// The addresses the additional section gives for `host` (matched by name, case
/// insensitively) and the smallest of their TTLs, or `None` when it gives none.
pub fn additional_addrs(additionals: &[Record], host: &Name) -> Option<(Vec<IpAddr>, u32)> {
    let mut addrs = Vec::new();
    let mut ttl = u32::MAX;
    for r in additionals.iter().filter(|r| r.name == *host) {
        let ip = match &r.data {
            RData::A(a) => IpAddr::V4(a.0),
            RData::AAAA(aaaa) => IpAddr::V6(aaaa.0),
            _ => continue,
        };
        addrs.push(ip);
        ttl = ttl.min(r.ttl);
    }
    if addrs.is_empty() {
        return None;
    }
    addrs.sort();
    addrs.dedup();
    Some((addrs, ttl))
}

/// A target name as users write it: without the root's trailing dot.
fn host_text(host: &Name) -> String {
    let text = host.to_string();
    match text.strip_suffix('.') {
        Some(bare) if !bare.is_empty() => bare.to_string(),
        _ => text,
    }
}

/// Why a lookup that found nothing is definitive, or `None` for a real failure.
fn definitive_empty(e: &NetError, what: &str) -> Option<String> {
    if e.is_nx_domain() {
        Some("does not exist (NXDOMAIN)".to_string())
    } else if e.is_no_records_found() {
        Some(format!("has no {what} records (NODATA)"))
    } else {
        None
    }
}

pub struct SrvSource {
    name: String,
    resolver: Resolver,
    /// When to read again; `None` reads at once (the first call, and after an error).
    refresh_at: Option<Instant>,
    /// Why the last published set was empty, so the reason is logged once, not on
    /// every re-query.
    empty_reason: Option<String>,
    /// Skipped records and failing targets already warned about.
    reported: BTreeSet<String>,
}

impl SrvSource {
    pub fn new(name: String, resolver: Resolver) -> Self {
        SrvSource {
            name,
            resolver,
            refresh_at: None,
            empty_reason: None,
            reported: BTreeSet::new(),
        }
    }

    /// When the next call to [`Source::next`] will read again (`None`: at once).
    pub fn next_read(&self) -> Option<Instant> {
        self.refresh_at
    }

    async fn read(&mut self) -> Result<EndpointSet, SourceError> {
        let hickory = self.resolver.hickory().clone();
        // Our schedule is the cache (TTL clamped to the floor and ceiling): without this
        // hickory would keep answering from its own cache past our ceiling, and keep a
        // negative answer after the records appeared.
        hickory.clear_lookup_cache(self.name.as_str(), RecordType::SRV);
        let lookup = match hickory.lookup(self.name.as_str(), RecordType::SRV).await {
            Ok(lookup) => lookup,
            Err(e) => {
                return match definitive_empty(&e, "SRV") {
                    Some(why) => Ok(self.empty(format!("'{}' {why}", self.name))),
                    None => Err(SourceError::Dns(format!(
                        "SRV lookup for '{}' failed: {e}",
                        self.name
                    ))),
                };
            }
        };
        let (usable, bad) = match srv_records(lookup.answers()) {
            Records::NotAvailable => {
                return Ok(self.empty(format!(
                    "'{}' says the service is not available (SRV target '.')",
                    self.name
                )));
            }
            Records::Targets { usable, bad } if usable.is_empty() && bad.is_empty() => {
                return Ok(self.empty(format!("'{}' answered no SRV records", self.name)));
            }
            Records::Targets { usable, bad } => (usable, bad),
        };
        let mut problems: Vec<String> = bad
            .iter()
            .map(|b| format!("'{}': {b}; skipped", self.name))
            .collect();

        // Addresses: from the additional section where the server put them there,
        // otherwise one lookup per distinct target, all at once.
        let now = std::time::Instant::now();
        let mut valid_until = lookup.valid_until();
        let mut addrs: HashMap<Name, Vec<IpAddr>> = HashMap::new();
        let mut lookups = JoinSet::new();
        for host in usable.iter().map(|t| &t.host) {
            if addrs.contains_key(host) {
                continue;
            }
            match additional_addrs(lookup.additionals(), host) {
                Some((ips, ttl)) => {
                    valid_until = valid_until.min(now + Duration::from_secs(ttl.into()));
                    addrs.insert(host.clone(), ips);
                }
                None => {
                    // Placeholder so a host shared by several records is looked up once.
                    addrs.insert(host.clone(), Vec::new());
                    hickory.clear_lookup_cache(host.clone(), RecordType::A);
                    hickory.clear_lookup_cache(host.clone(), RecordType::AAAA);
                    let (hickory, host) = (hickory.clone(), host.clone());
                    lookups.spawn(async move {
                        let result = hickory.lookup_ip(host.clone()).await;
                        (host, result)
                    });
                }
            }
        }
        let mut transient = Vec::new();
        while let Some(joined) = lookups.join_next().await {
            let Ok((host, result)) = joined else { continue };
            match result {
                Ok(found) => {
                    let mut ips: Vec<IpAddr> = found.iter().collect();
                    ips.sort();
                    ips.dedup();
                    valid_until = valid_until.min(found.valid_until());
                    if ips.is_empty() {
                        problems.push(self.no_address(&host, "resolves to no address"));
                    }
                    addrs.insert(host, ips);
                }
                Err(e) => match definitive_empty(&e, "address") {
                    Some(why) => problems.push(self.no_address(&host, &why)),
                    None => transient.push(format!(
                        "'{}': cannot resolve SRV target '{}': {e}",
                        self.name,
                        host_text(&host)
                    )),
                },
            }
        }
        let endpoints: Vec<Endpoint> = usable
            .iter()
            .flat_map(|t| t.endpoints(addrs.get(&t.host).map_or(&[][..], Vec::as_slice)))
            .collect();

        if endpoints.is_empty() {
            self.report(problems, &[]);
            if !transient.is_empty() {
                return Err(SourceError::Dns(transient.join("; ")));
            }
            return Ok(self.empty(format!("no SRV record of '{}' is usable", self.name)));
        }
        self.report(problems, &transient);
        let mut refresh = dns::refresh_at(valid_until);
        if !transient.is_empty() {
            refresh = refresh.min(Instant::now() + RETRY_FAILED_TARGET);
        }
        self.empty_reason = None;
        self.refresh_at = Some(refresh);
        Ok(EndpointSet::new(endpoints))
    }

    fn no_address(&self, host: &Name, why: &str) -> String {
        format!(
            "'{}': SRV target '{}' {why}; its records are skipped",
            self.name,
            outside(&host_text(host))
        )
    }

    /// Publishes nothing, says why once, and asks again soon.
    fn empty(&mut self, reason: String) -> EndpointSet {
        if self.empty_reason.as_deref() != Some(reason.as_str()) {
            warn!(
                source = %self.name,
                "{reason}: no backends, connections are refused; asking again every {}s",
                EMPTY_REQUERY.as_secs()
            );
            self.empty_reason = Some(reason);
        }
        self.refresh_at = Some(Instant::now() + EMPTY_REQUERY);
        EndpointSet::empty()
    }

    /// Warns about each skipped record and failing target once while it lasts; one that
    /// goes away and comes back is reported again.
    fn report(&mut self, problems: Vec<String>, transient: &[String]) {
        let mut now = BTreeSet::new();
        for p in problems {
            if !self.reported.contains(&p) {
                warn!(source = %self.name, "{p}; the other records keep serving");
            }
            now.insert(p);
        }
        for t in transient {
            if !self.reported.contains(t) {
                warn!(source = %self.name, "{t}; serving the other targets, retrying");
            }
            now.insert(t.clone());
        }
        self.reported = now;
    }
}

impl Source for SrvSource {
    type Item = EndpointSet;

    async fn next(&mut self) -> Result<EndpointSet, SourceError> {
        // Taken, not read: after an error the next call must read at once.
        if let Some(at) = self.refresh_at.take() {
            sleep_until(at).await;
        }
        self.read().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_resolver::proto::rr::rdata::{A, AAAA, CNAME, SRV};
    use std::str::FromStr;

    fn name(s: &str) -> Name {
        Name::from_str(s).unwrap()
    }

    fn srv(priority: u16, weight: u16, port: u16, target: &str) -> Record {
        Record::from_rdata(
            name("web.example."),
            30,
            RData::SRV(SRV::new(priority, weight, port, name(target))),
        )
    }

    fn a(host: &str, ip: &str, ttl: u32) -> Record {
        Record::from_rdata(name(host), ttl, RData::A(A(ip.parse().unwrap())))
    }

    fn target(host: &str, port: u16, priority: u16, weight: u16) -> Target {
        Target {
            host: name(host),
            port,
            priority,
            weight,
        }
    }

    #[test]
    fn records_become_targets_sorted_by_priority_then_name() {
        let answers = [
            srv(20, 1, 8003, "c.example."),
            srv(10, 5, 8002, "b.example."),
            srv(10, 1, 8001, "a.example."),
            // Not an SRV record: ignored, not reported.
            Record::from_rdata(
                name("web.example."),
                30,
                RData::CNAME(CNAME(name("x.example."))),
            ),
        ];
        assert_eq!(
            srv_records(&answers),
            Records::Targets {
                usable: vec![
                    target("a.example.", 8001, 10, 1),
                    target("b.example.", 8002, 10, 5),
                    target("c.example.", 8003, 20, 1),
                ],
                bad: vec![],
            }
        );
    }

    #[test]
    fn malformed_records_are_skipped_and_named() {
        let answers = [
            srv(10, 1, 0, "a.example."),
            srv(10, 1, 8001, "."),
            srv(10, 1, 8002, "b.example."),
        ];
        let Records::Targets { usable, bad } = srv_records(&answers) else {
            panic!("expected targets");
        };
        assert_eq!(usable, [target("b.example.", 8002, 10, 1)]);
        let bad: Vec<String> = bad.iter().map(ToString::to_string).collect();
        assert_eq!(
            bad,
            [
                "SRV record '10 1 0 a.example.' has port 0",
                "SRV record '10 1 8001 .' has target '.' (no service) next to real targets",
            ]
        );
    }

    #[test]
    fn a_lone_root_target_means_not_available() {
        assert_eq!(srv_records(&[srv(0, 0, 0, ".")]), Records::NotAvailable);
        assert_eq!(
            srv_records(&[]),
            Records::Targets {
                usable: vec![],
                bad: vec![]
            }
        );
    }

    #[test]
    fn additional_addresses_match_the_target_name_only() {
        let additionals = [
            a("b.example.", "10.0.0.2", 60),
            a("A.Example.", "10.0.0.1", 30),
            Record::from_rdata(
                name("a.example."),
                90,
                RData::AAAA(AAAA("::1".parse().unwrap())),
            ),
            a("a.example.", "10.0.0.1", 30),
        ];
        let (addrs, ttl) = additional_addrs(&additionals, &name("a.example.")).unwrap();
        let addrs: Vec<String> = addrs.iter().map(ToString::to_string).collect();
        assert_eq!(addrs, ["10.0.0.1", "::1"]);
        assert_eq!(ttl, 30, "the smallest TTL of the records used");
        assert_eq!(additional_addrs(&additionals, &name("c.example.")), None);
    }

    #[test]
    fn endpoints_carry_priority_weight_and_origin() {
        let t = target("a.example.", 8001, 10, 7);
        let eps = t.endpoints(&["10.0.0.1".parse().unwrap(), "::1".parse().unwrap()]);
        assert_eq!(eps.len(), 2);
        for e in &eps {
            assert_eq!((e.priority, e.weight, e.addr.port()), (10, 7, 8001));
            assert_eq!(e.origin.as_deref(), Some("a.example:8001"));
        }
        assert_eq!(eps[0].to_string(), "10.0.0.1:8001 (a.example:8001)");
    }

    #[test]
    fn weights_and_priorities_reach_the_endpoint_set_tiers() {
        let Records::Targets { usable, .. } = srv_records(&[
            srv(20, 1, 3, "c.example."),
            srv(10, 9, 1, "a.example."),
            srv(10, 1, 2, "b.example."),
        ]) else {
            panic!("expected targets");
        };
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let set = EndpointSet::new(usable.iter().flat_map(|t| t.endpoints(&[ip])).collect());
        let tiers: Vec<Vec<(u16, u16, u16)>> = set
            .tiers()
            .map(|t| {
                t.iter()
                    .map(|e| (e.priority, e.weight, e.addr.port()))
                    .collect()
            })
            .collect();
        assert_eq!(
            tiers,
            vec![vec![(10, 9, 1), (10, 1, 2)], vec![(20, 1, 3)]],
            "lowest priority first, each record's weight kept"
        );
    }
}
