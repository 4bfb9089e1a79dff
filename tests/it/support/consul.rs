//! A small emulation of Consul's HTTP KV and service catalog APIs (no Consul server can
//! be installed here), built from Consul's documented behaviour, for the Consul
//! discovery tests.
//!
//! What it does, as Consul does:
//! - `GET /v1/kv/<key>` and `?recurse`: a JSON array of `{LockIndex, Key, Flags, Value
//!   (base64 or null), CreateIndex, ModifyIndex, Session?}`; 404 with `X-Consul-Index`
//!   when nothing matches. `X-Consul-Index` is the raft index of the data returned: a
//!   key's ModifyIndex, for a prefix the highest ModifyIndex or delete (tombstone) under
//!   it, else the whole KV table's index (never below 1).
//! - `PUT /v1/kv/<key>` (body = value) and `DELETE /v1/kv/<key>[?recurse]`.
//! - `PUT /v1/catalog/register` and `PUT /v1/catalog/deregister` (JSON bodies), and
//!   `GET /v1/health/service/<name>` with `passing`, `tag` (repeatable) and `dc`: a JSON
//!   array of `{Node, Service, Checks}`, `200 []` for an unknown service, 500 "No path to
//!   datacenter" for an unknown `dc`. Its `X-Consul-Index` is the service's index. The
//!   rules are in [`catalog`]; only `dc1` is known until a test adds a datacenter.
//! - `?index=N&wait=D` blocking queries that really block, on both reads: the request
//!   is held until a write lifts the queried data's index above N (for KV, only a write
//!   under the queried key or prefix wakes it), or the wait (default 5 min, at most 10
//!   min, plus up to wait/16 of jitter) runs out; then it answers the current data, which
//!   may be unchanged. A snapshot restore abandons every blocked query at once, as Consul
//!   does.
//! - One raft index for every write, KV or catalog; the KV table and each service keep
//!   their own index of their last change, as Consul's state store does.
//! - Optional ACL token: with a wrong `X-Consul-Token`, 403 "ACL not found"; with none,
//!   KV reads and catalog writes are refused with 403, and a health read answers with
//!   every instance left out and `X-Consul-Results-Filtered-By-ACLs: true` (Consul
//!   filters what an anonymous token may not read rather than refusing).
//!
//! The test controls it directly too: KV writes, catalog registrations, check status
//! changes and deregistrations (through the same code as the HTTP API), faults (a status
//! and body for every read), stop and restart on the same port, and restoring a lower
//! index (a raft snapshot restore, or a dev agent restarted empty) to exercise "the index
//! went backwards".

mod catalog;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use catalog::{Catalog, DEFAULT_DC, HealthQuery, Refused};

/// The two catalog writes.
#[derive(Clone, Copy)]
enum CatalogWrite {
    Register,
    Deregister,
}

/// Consul's default and maximum blocking wait.
const DEFAULT_WAIT: Duration = Duration::from_secs(300);
const MAX_WAIT: Duration = Duration::from_secs(600);

pub struct ConsulEmulator {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    server: Mutex<Option<JoinHandle<()>>>,
}

struct Shared {
    store: Mutex<Store>,
    /// Bumped on every write and restore; blocked queries re-check when it moves.
    changes: watch::Sender<u64>,
    token: Option<String>,
    /// Blocking queries being held right now.
    waiting: AtomicUsize,
    /// Blocking queries answered so far.
    answered: AtomicUsize,
}

#[derive(Default)]
struct Store {
    /// The raft index of the last write, KV or catalog.
    index: u64,
    /// The KV table's index: the last KV write or delete.
    kv_index: u64,
    entries: BTreeMap<String, Entry>,
    /// Deleted keys and the index of their delete, so a prefix's index never goes
    /// backwards when its newest key is deleted.
    tombstones: BTreeMap<String, u64>,
    /// Counts snapshot restores: a blocked query started before one returns at once.
    restores: u64,
    /// Every read answers this (status, body) instead, while set.
    fault: Option<(u16, String)>,
    /// Always add the full wait/16 jitter (the worst case for a client's timeout).
    max_jitter: bool,
    catalog: Catalog,
}

#[derive(Clone)]
struct Entry {
    value: Option<Vec<u8>>,
    create_index: u64,
    modify_index: u64,
    flags: u64,
}

impl Store {
    fn write(&mut self, key: &str, value: Option<Vec<u8>>) -> u64 {
        self.index += 1;
        self.kv_index = self.index;
        let index = self.index;
        let create_index = self.entries.get(key).map_or(index, |e| e.create_index);
        self.entries.insert(
            key.to_string(),
            Entry {
                value,
                create_index,
                modify_index: index,
                flags: 0,
            },
        );
        self.tombstones.remove(key);
        index
    }

    fn delete(&mut self, key: &str, recurse: bool) -> u64 {
        let doomed: Vec<String> = self
            .entries
            .keys()
            .filter(|k| *k == key || (recurse && k.starts_with(key)))
            .cloned()
            .collect();
        if doomed.is_empty() {
            return self.index;
        }
        self.index += 1;
        self.kv_index = self.index;
        for k in doomed {
            self.entries.remove(&k);
            self.tombstones.insert(k, self.index);
        }
        self.index
    }

    /// A catalog register or deregister, applied at the next raft index if Consul would
    /// take it; returns that index.
    fn catalog_write(
        &mut self,
        write: CatalogWrite,
        body: &serde_json::Value,
    ) -> Result<u64, Refused> {
        let idx = self.index + 1;
        match write {
            CatalogWrite::Register => self.catalog.register(body, idx)?,
            CatalogWrite::Deregister => self.catalog.deregister(body, idx)?,
        }
        self.index = idx;
        Ok(idx)
    }

    fn matches(key: &str, candidate: &str, recurse: bool) -> bool {
        match recurse {
            true => candidate.starts_with(key),
            false => candidate == key,
        }
    }

    /// The index of the queried data itself (entries and tombstones), 0 if none.
    fn own_index(&self, key: &str, recurse: bool) -> u64 {
        let live = self
            .entries
            .iter()
            .filter(|(k, _)| Self::matches(key, k, recurse))
            .map(|(_, e)| e.modify_index);
        let dead = self
            .tombstones
            .iter()
            .filter(|(k, _)| Self::matches(key, k, recurse))
            .map(|(_, i)| *i);
        live.chain(dead).max().unwrap_or(0)
    }

    /// `X-Consul-Index` for a read: the data's own index, else the table's, never 0.
    fn reply_index(&self, key: &str, recurse: bool) -> u64 {
        match recurse {
            true => match self.own_index(key, recurse) {
                0 => self.kv_index,
                own => own,
            },
            // A single key answers its ModifyIndex, or the table's index when missing.
            false => self
                .entries
                .get(key)
                .map_or(self.kv_index, |e| e.modify_index),
        }
        .max(1)
    }

    fn listing(&self, key: &str, recurse: bool) -> Vec<serde_json::Value> {
        let b64 = base64::engine::general_purpose::STANDARD;
        self.entries
            .iter()
            .filter(|(k, _)| Self::matches(key, k, recurse))
            .map(|(k, e)| {
                serde_json::json!({
                    "LockIndex": 0,
                    "Key": k,
                    "Flags": e.flags,
                    "Value": e.value.as_ref().map(|v| b64.encode(v)),
                    "CreateIndex": e.create_index,
                    "ModifyIndex": e.modify_index,
                })
            })
            .collect()
    }

    /// A raft snapshot restored at `index`: the data stays (KV and catalog), every index
    /// is at most `index`, tombstones are gone.
    fn restore(&mut self, index: u64) {
        self.index = index;
        self.kv_index = self.kv_index.min(index);
        self.catalog.restore(index);
        for e in self.entries.values_mut() {
            e.create_index = e.create_index.min(index);
            e.modify_index = e.modify_index.min(index);
        }
        self.tombstones.clear();
        self.restores += 1;
    }
}

impl ConsulEmulator {
    /// An emulator without ACLs on an ephemeral loopback port.
    pub async fn start() -> ConsulEmulator {
        Self::start_inner(None).await
    }

    /// An emulator whose every request needs `X-Consul-Token: token`.
    pub async fn start_with_token(token: &str) -> ConsulEmulator {
        Self::start_inner(Some(token.to_string())).await
    }

    async fn start_inner(token: Option<String>) -> ConsulEmulator {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::default()),
            changes: watch::channel(0).0,
            token,
            waiting: AtomicUsize::new(0),
            answered: AtomicUsize::new(0),
        });
        let task = tokio::spawn(serve(listener, shared.clone()));
        ConsulEmulator {
            addr,
            shared,
            server: Mutex::new(Some(task)),
        }
    }

    /// `consul://127.0.0.1:PORT/path` for the ambassador's command line.
    pub fn url(&self, path: &str) -> String {
        format!("consul://{}/{}", self.addr, path.trim_start_matches('/'))
    }

    fn change<T>(&self, f: impl FnOnce(&mut Store) -> T) -> T {
        let out = f(&mut self.shared.store.lock().unwrap());
        self.shared.changes.send_modify(|g| *g += 1);
        out
    }

    /// Writes `key` (no leading '/'), returning the write's index.
    pub fn put(&self, key: &str, value: &str) -> u64 {
        self.put_bytes(key, value.as_bytes())
    }

    pub fn put_bytes(&self, key: &str, value: &[u8]) -> u64 {
        self.change(|s| s.write(key, Some(value.to_vec())))
    }

    pub fn delete(&self, key: &str) -> u64 {
        self.change(|s| s.delete(key, false))
    }

    /// `consul-service://127.0.0.1:PORT/NAME[?QUERY]` for the ambassador's command line.
    pub fn service_url(&self, name_and_query: &str) -> String {
        format!("consul-service://{}/{name_and_query}", self.addr)
    }

    fn catalog(&self, write: CatalogWrite, body: serde_json::Value) -> u64 {
        self.change(|s| s.catalog_write(write, &body))
            .unwrap_or_else(|Refused(why)| panic!("the emulator refused {body}: {why}"))
    }

    /// Registers `service` instance `service_id` on `node` (at `address`, in dc1) on
    /// `port` with `tags`, and one check on it, `service:<ID>`, in `status` (passing,
    /// warning or critical), as `PUT /v1/catalog/register` does; returns the write's
    /// index. Registering the same node and ID again updates it.
    #[allow(clippy::too_many_arguments)]
    pub fn register(
        &self,
        node: &str,
        address: &str,
        service_id: &str,
        service: &str,
        port: u16,
        tags: &[&str],
        status: &str,
    ) -> u64 {
        self.catalog(
            CatalogWrite::Register,
            serde_json::json!({
                "Node": node,
                "Address": address,
                "Service": {"ID": service_id, "Service": service, "Tags": tags, "Port": port},
                "Check": {
                    "CheckID": format!("service:{service_id}"),
                    "Name": format!("service:{service_id}"),
                    "Status": status,
                    "ServiceID": service_id,
                },
            }),
        )
    }

    /// Sets the status of check `check_id` on `node` (in dc1), as re-registering the
    /// check with `SkipNodeUpdate` does; returns the write's index.
    pub fn set_check_status(&self, node: &str, check_id: &str, status: &str) -> u64 {
        let current = self
            .shared
            .store
            .lock()
            .unwrap()
            .catalog
            .check(DEFAULT_DC, node, check_id)
            .unwrap_or_else(|| panic!("no check {check_id} on {node}"));
        let mut check = current;
        check["Status"] = status.into();
        self.catalog(
            CatalogWrite::Register,
            serde_json::json!({"Node": node, "SkipNodeUpdate": true, "Check": check}),
        )
    }

    /// Removes instance `service_id` from `node` (in dc1), or with `None` the node and
    /// everything on it, as `PUT /v1/catalog/deregister` does; returns the write's index.
    pub fn deregister(&self, node: &str, service_id: Option<&str>) -> u64 {
        let body = match service_id {
            Some(id) => serde_json::json!({"Node": node, "ServiceID": id}),
            None => serde_json::json!({"Node": node}),
        };
        self.catalog(CatalogWrite::Deregister, body)
    }

    /// Makes `dc` a datacenter the agent has a path to (dc1 always is).
    pub fn add_datacenter(&self, dc: &str) {
        self.shared.store.lock().unwrap().catalog.add_datacenter(dc);
    }

    /// The health endpoint's index for `service` in dc1.
    pub fn service_index(&self, service: &str) -> u64 {
        self.shared
            .store
            .lock()
            .unwrap()
            .catalog
            .health_index(DEFAULT_DC, service)
    }

    /// The raft index of the last write.
    pub fn index(&self) -> u64 {
        self.shared.store.lock().unwrap().index
    }

    /// While set, every read answers `status` with `body` (and an X-Consul-Index).
    pub fn set_fault(&self, fault: Option<(u16, &str)>) {
        self.shared.store.lock().unwrap().fault = fault.map(|(s, b)| (s, b.to_string()));
    }

    /// Adds the full wait/16 jitter to every blocking wait instead of a random part.
    pub fn set_max_jitter(&self, on: bool) {
        self.shared.store.lock().unwrap().max_jitter = on;
    }

    /// Blocking queries held right now.
    pub fn waiting(&self) -> usize {
        self.shared.waiting.load(Ordering::SeqCst)
    }

    /// Blocking queries answered so far.
    pub fn answered(&self) -> usize {
        self.shared.answered.load(Ordering::SeqCst)
    }

    /// Restores a snapshot at `index` in place: blocked queries return at once with
    /// the lower index, as Consul's do when a snapshot is restored.
    pub fn restore(&self, index: u64) {
        self.change(|s| s.restore(index));
    }

    /// Stops serving: the port refuses, open connections (and blocked queries) are cut.
    pub async fn stop(&self) {
        let task = self.server.lock().unwrap().take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
    }

    /// Serves again on the same port with the same data.
    pub async fn restart(&self) {
        self.stop().await;
        let addr = self.addr;
        let listener = super::eventually(&format!("binding {addr} again"), || async move {
            TcpListener::bind(addr).await.ok()
        })
        .await;
        let task = tokio::spawn(serve(listener, self.shared.clone()));
        *self.server.lock().unwrap() = Some(task);
    }

    /// Restarts with its raft index lowered to `index` (as after restoring an older
    /// snapshot, or a dev agent restarted with the same keys written afresh).
    pub async fn restart_with_index(&self, index: u64) {
        self.stop().await;
        self.change(|s| s.restore(index));
        self.restart().await;
    }
}

impl Drop for ConsulEmulator {
    fn drop(&mut self) {
        if let Some(task) = self.server.lock().unwrap().take() {
            task.abort();
        }
    }
}

async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    // Dropping this set (when the task is aborted) cuts every open connection.
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            Ok((stream, _)) = listener.accept() => {
                let shared = shared.clone();
                conns.spawn(async move {
                    let svc = service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(handle(&shared, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

fn reply(status: StatusCode, index: Option<u64>, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::builder()
        .status(status)
        .header("Content-Type", "application/json");
    if let Some(index) = index {
        resp = resp.header("X-Consul-Index", index.to_string());
    }
    resp.body(Full::new(body.into())).unwrap()
}

/// Parses Go's duration syntax as Consul does for `wait` ("10s", "5m", "1m30s", "250ms").
fn parse_wait(text: &str) -> Option<Duration> {
    if text == "0" {
        return Some(Duration::ZERO);
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(rest.len());
        let number: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += Duration::from_secs_f64(number * scale);
    }
    Some(total)
}

fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(b) = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Counts a blocked query for as long as it is held (also when its client goes away).
struct Held<'a>(&'a AtomicUsize);

impl<'a> Held<'a> {
    fn new(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        Held(counter)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The endpoints served.
enum Endpoint {
    Kv(String),
    Health(String),
    Catalog(CatalogWrite),
}

async fn handle(shared: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let endpoint = if let Some(key) = path.strip_prefix("/v1/kv/") {
        Endpoint::Kv(decode(key))
    } else if let Some(name) = path.strip_prefix("/v1/health/service/") {
        Endpoint::Health(decode(name))
    } else if path == "/v1/catalog/register" {
        Endpoint::Catalog(CatalogWrite::Register)
    } else if path == "/v1/catalog/deregister" {
        Endpoint::Catalog(CatalogWrite::Deregister)
    } else {
        return reply(StatusCode::NOT_FOUND, None, "Unsupported endpoint");
    };
    // With ACLs on: a wrong token is refused everywhere; no token is the anonymous one.
    let mut anonymous = false;
    if let Some(token) = &shared.token {
        let given = req
            .headers()
            .get("X-Consul-Token")
            .and_then(|v| v.to_str().ok());
        match given {
            Some(t) if t == token => {}
            Some(_) => return reply(StatusCode::FORBIDDEN, None, "ACL not found"),
            None => anonymous = true,
        }
    }
    let mut pairs: Vec<(String, String)> = Vec::new();
    for pair in req.uri().query().unwrap_or("").split('&') {
        if pair.is_empty() {
            continue;
        }
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        pairs.push((decode(k), decode(v)));
    }
    // The first value of each key, as Go's url.Values.Get reads it.
    let mut params: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in &pairs {
        params.entry(k.clone()).or_insert_with(|| v.clone());
    }
    match endpoint {
        Endpoint::Kv(key) => {
            if anonymous {
                return reply(
                    StatusCode::FORBIDDEN,
                    None,
                    format!(
                        "Permission denied: anonymous token lacks permission 'key:read' on \"{key}\""
                    ),
                );
            }
            kv(shared, req, key, params).await
        }
        Endpoint::Health(name) => {
            let tags: Vec<String> = pairs
                .into_iter()
                .filter(|(k, _)| k == "tag")
                .map(|(_, v)| v)
                .collect();
            health(shared, &name, &tags, &params, anonymous).await
        }
        Endpoint::Catalog(write) => {
            if anonymous {
                return reply(StatusCode::FORBIDDEN, None, "Permission denied");
            }
            if req.method() != Method::PUT {
                return reply(
                    StatusCode::METHOD_NOT_ALLOWED,
                    None,
                    format!("method {} not allowed", req.method()),
                );
            }
            let Ok(body) = req.into_body().collect().await else {
                return reply(StatusCode::BAD_REQUEST, None, "cannot read the body");
            };
            let body: serde_json::Value = match serde_json::from_slice(&body.to_bytes()) {
                Ok(v) => v,
                Err(e) => {
                    return reply(
                        StatusCode::BAD_REQUEST,
                        None,
                        format!("Request decode failed: {e}"),
                    );
                }
            };
            let result = shared.store.lock().unwrap().catalog_write(write, &body);
            match result {
                Ok(_) => {
                    shared.changes.send_modify(|g| *g += 1);
                    reply(StatusCode::OK, None, "true")
                }
                // Consul answers an RPC error as a 500 with its text.
                Err(Refused(why)) => reply(StatusCode::INTERNAL_SERVER_ERROR, None, why),
            }
        }
    }
}

/// The `index` and `wait` of a read (index 0 means no blocking), or the 400 Consul gives.
#[allow(clippy::result_large_err)]
fn blocking_params(
    params: &BTreeMap<String, String>,
) -> Result<(u64, Duration), Response<Full<Bytes>>> {
    let min_index = match params.get("index").map(|i| i.parse::<u64>()) {
        None => 0,
        Some(Ok(i)) => i,
        Some(Err(_)) => return Err(reply(StatusCode::BAD_REQUEST, None, "Invalid index")),
    };
    let wait = match params.get("wait").map(|w| parse_wait(w)) {
        None => DEFAULT_WAIT,
        Some(Some(w)) if w.is_zero() => DEFAULT_WAIT,
        Some(Some(w)) => w.min(MAX_WAIT),
        Some(None) => return Err(reply(StatusCode::BAD_REQUEST, None, "Invalid wait time")),
    };
    Ok((min_index, wait))
}

/// Holds a blocking query (`min_index` > 0) until `ready` (called on the first look, in
/// the same lock as the query's start is noted, and after every write) says the data's
/// index passed the client's, a snapshot restore abandons it, or the wait (with its
/// jitter) runs out.
async fn block(
    shared: &Shared,
    min_index: u64,
    wait: Duration,
    mut ready: impl FnMut(&Store) -> bool,
) {
    if min_index == 0 {
        return;
    }
    let _held = Held::new(&shared.waiting);
    // Subscribed before the first look: a write after it is seen by changed().
    let mut changes = shared.changes.subscribe();
    changes.borrow_and_update();
    let (restores, deadline, done) = {
        let s = shared.store.lock().unwrap();
        let jitter = match s.max_jitter {
            true => wait / 16,
            false => (wait / 16).mul_f64(fastrand::f64()),
        };
        let deadline = tokio::time::Instant::now() + wait + jitter;
        (s.restores, deadline, ready(&s))
    };
    if !done {
        loop {
            tokio::select! {
                changed = changes.changed() => { if changed.is_err() { break; } }
                _ = tokio::time::sleep_until(deadline) => break,
            }
            changes.borrow_and_update();
            let s = shared.store.lock().unwrap();
            if s.restores != restores || ready(&s) {
                break; // abandoned by a snapshot restore, or answered
            }
        }
    }
    shared.answered.fetch_add(1, Ordering::SeqCst);
}

/// The answer set with [`ConsulEmulator::set_fault`], if any, with `index`.
fn fault(s: &Store, index: u64) -> Option<Response<Full<Bytes>>> {
    let (status, body) = s.fault.as_ref()?;
    let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    Some(reply(status, Some(index), body.clone()))
}

async fn kv(
    shared: &Shared,
    req: Request<Incoming>,
    key: String,
    params: BTreeMap<String, String>,
) -> Response<Full<Bytes>> {
    let recurse = params.contains_key("recurse");
    match *req.method() {
        Method::GET => {}
        Method::PUT => {
            let Ok(body) = req.into_body().collect().await else {
                return reply(StatusCode::BAD_REQUEST, None, "cannot read the body");
            };
            let value = body.to_bytes().to_vec();
            let mut store = shared.store.lock().unwrap();
            store.write(&key, Some(value));
            drop(store);
            shared.changes.send_modify(|g| *g += 1);
            return reply(StatusCode::OK, None, "true");
        }
        Method::DELETE => {
            shared.store.lock().unwrap().delete(&key, recurse);
            shared.changes.send_modify(|g| *g += 1);
            return reply(StatusCode::OK, None, "true");
        }
        _ => return reply(StatusCode::METHOD_NOT_ALLOWED, None, "Method not allowed"),
    }
    let (min_index, wait) = match blocking_params(&params) {
        Ok(p) => p,
        Err(bad) => return bad,
    };
    // Like Consul: answer once the data's index passes the client's, but only wake for
    // writes to the data queried (or on the first look).
    let mut own_at_start = None;
    block(shared, min_index, wait, |s| {
        let own = s.own_index(&key, recurse);
        let first = own_at_start.is_none();
        let touched = first || own_at_start != Some(own);
        own_at_start.get_or_insert(own);
        touched && s.reply_index(&key, recurse) > min_index
    })
    .await;

    let s = shared.store.lock().unwrap();
    let index = s.reply_index(&key, recurse);
    if let Some(fault) = fault(&s, index) {
        return fault;
    }
    let listing = s.listing(&key, recurse);
    if listing.is_empty() {
        return reply(StatusCode::NOT_FOUND, Some(index), "");
    }
    reply(
        StatusCode::OK,
        Some(index),
        serde_json::to_vec(&listing).unwrap(),
    )
}

/// `GET /v1/health/service/<name>`.
async fn health(
    shared: &Shared,
    name: &str,
    tags: &[String],
    params: &BTreeMap<String, String>,
    anonymous: bool,
) -> Response<Full<Bytes>> {
    if name.is_empty() {
        return reply(StatusCode::BAD_REQUEST, None, "Missing service name");
    }
    let dc = match params.get("dc").map(String::as_str) {
        None | Some("") => DEFAULT_DC.to_string(),
        Some(dc) => dc.to_string(),
    };
    if !shared.store.lock().unwrap().catalog.knows(&dc) {
        return reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            None,
            "No path to datacenter",
        );
    }
    let (min_index, wait) = match blocking_params(params) {
        Ok(p) => p,
        Err(bad) => return bad,
    };
    block(shared, min_index, wait, |s| {
        s.catalog.health_index(&dc, name) > min_index
    })
    .await;
    // Go's strconv.ParseBool, with a bare `?passing` meaning true.
    let passing = match params.get("passing").map(String::as_str) {
        None => false,
        Some("" | "1" | "t" | "T" | "true" | "TRUE" | "True") => true,
        Some("0" | "f" | "F" | "false" | "FALSE" | "False") => false,
        Some(_) => {
            return reply(StatusCode::BAD_REQUEST, None, "Invalid value for ?passing");
        }
    };

    let s = shared.store.lock().unwrap();
    let index = s.catalog.health_index(&dc, name);
    if let Some(fault) = fault(&s, index) {
        return fault;
    }
    let query = HealthQuery {
        dc: &dc,
        name,
        tags,
        passing,
    };
    let mut entries = s.catalog.health(&query);
    // An anonymous token may read no service: what it may not read is left out.
    let filtered = anonymous && !entries.is_empty();
    if anonymous {
        entries.clear();
    }
    let mut resp = reply(
        StatusCode::OK,
        Some(index),
        serde_json::to_vec(&entries).unwrap(),
    );
    if filtered {
        resp.headers_mut().insert(
            "X-Consul-Results-Filtered-By-ACLs",
            hyper::header::HeaderValue::from_static("true"),
        );
    }
    resp
}

/// What a test's own HTTP request to the emulator got back.
#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    pub index: Option<u64>,
    pub headers: hyper::HeaderMap,
    pub body: String,
}

impl HttpReply {
    /// The body as JSON (panics if it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {self:?}"))
    }
}

/// One HTTP/1.1 request on a fresh connection (for the emulator's own tests).
pub async fn http(
    addr: SocketAddr,
    method: &str,
    target: &str,
    token: Option<&str>,
    body: &str,
) -> HttpReply {
    let stream = TcpStream::connect(addr)
        .await
        .expect("connect to the emulator");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(target)
        .header("Host", addr.to_string());
    if let Some(token) = token {
        req = req.header("X-Consul-Token", token);
    }
    let req = match body.is_empty() {
        true => req.body(Full::new(Bytes::new())).unwrap(),
        false => req.body(Full::new(Bytes::from(body.to_string()))).unwrap(),
    };
    let resp = sender.send_request(req).await.expect("emulator reply");
    let status = resp.status().as_u16();
    let index = resp
        .headers()
        .get("X-Consul-Index")
        .and_then(|v| v.to_str().ok()?.parse().ok());
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    HttpReply {
        status,
        index,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}
