//! Consul discovery: reads what a spec watches over Consul's HTTP API and follows it
//! with blocking queries, publishing a backend list.
//!
//! What is watched ([`Watched`]) decides the request and how a reply becomes a backend
//! list: a KV prefix (`consul://`), whose keys the children-or-value rule reads, or a
//! service in the catalog (`consul-service://`), whose instances with every check
//! passing are the backends (`Service.Address`, else `Node.Address`, on `Service.Port`).
//! Everything else, the blocking-query loop below, is the same for both.
//!
//! One request does both jobs: `GET /v1/kv/<path>?recurse&index=N&wait=W` (or
//! `/v1/health/service/<name>?passing[&tag=T][&dc=D]&index=N&wait=W`) lists the same
//! data it waits on, so no change can fall between a read and a watch. The loop
//! follows Consul's documented rules for blocking queries: a return is no proof of change
//! (a wait that ran out comes back with the same index, and is not worth returning), an
//! index that goes backwards (a restored snapshot, a restarted dev agent) resets the
//! index to 0 so the next request reads at once, an index below 1 is treated as 1, the
//! requests are rate limited, and the client's timeout stays above the wait plus the
//! server's wait/16 jitter. A query blocks only on the connection whose reply gave its
//! index: a new connection (the server may have restarted with a lower index) starts
//! with a plain read. The connection (from the discovery layer's HTTP client) is kept
//! across requests and replaced when it fails.

use std::time::Duration;

use base64::Engine;
use http_body_util::{BodyExt, Limited};
use hyper::body::Bytes;
use hyper::{Request, StatusCode};
use serde::Deserialize;
use tokio::time::{Instant, sleep_until, timeout};
use tracing::{debug, info, warn};

use super::StoreProblem::{self, Exchange, Malformed, PermissionDenied, Rejected};
use super::dns::Resolver;
use super::http::{Body, ConnectError, Connection, Http};
use super::kv::{BackendList, BadEntryLog, KvEntry, backends_from_entries};
use super::{Source, SourceError};
use crate::logsafe::outside;
use crate::spec::{Host, HostPort, KvSpec, ServiceSpec, parse_host};

/// How long one blocking query may wait on the server. Short enough that a server that
/// vanished without closing the connection is noticed within about a minute, long
/// enough that an idle watch costs one request a minute.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(60);
/// Added to the wait (after Consul's own wait/16 jitter) before the client gives up.
const TIMEOUT_MARGIN: Duration = Duration::from_secs(5);
/// Consul asks clients to rate limit their blocking loop; successive requests start at
/// least this far apart, which only ever delays a watch on a prefix that changes more
/// often than ten times a second.
const MIN_REQUEST_GAP: Duration = Duration::from_millis(100);
/// A reply larger than this is refused rather than buffered.
const MAX_BODY: usize = 16 << 20;

pub struct ConsulSource {
    server: HostPort,
    watched: Watched,
    token: Option<String>,
    http: Http,
    wait: Duration,
    /// The X-Consul-Index of the last reply used; 0 means "read at once, do not block".
    index: u64,
    conn: Option<Connection>,
    last_request: Option<Instant>,
    /// How the source is named in log lines: its spec.
    name: String,
}

/// What a source watches: the request that reads (and blocks on) it, and how a reply
/// becomes a backend list.
enum Watched {
    /// A KV prefix, read with `?recurse`.
    Kv {
        /// The Consul key: the spec's path without its leading '/'.
        key: String,
        bad: BadEntryLog,
    },
    /// A service's instances, read from the health endpoint with `?passing`.
    Service {
        name: String,
        tag: Option<String>,
        dc: Option<String>,
        bad: BadEntryLog<BadInstance>,
        /// The last reply said ACLs left instances out (warned once while it lasts).
        filtered: bool,
    },
}

impl Watched {
    /// The request target without the blocking parameters.
    fn target(&self) -> String {
        match self {
            Watched::Kv { key, .. } => format!("/v1/kv/{}?recurse", encode_path(key)),
            Watched::Service { name, tag, dc, .. } => {
                let mut target = format!("/v1/health/service/{}?passing", encode(name, b""));
                for (key, value) in [("tag", tag), ("dc", dc)] {
                    if let Some(value) = value {
                        target.push_str(&format!("&{key}={}", encode(value, b"")));
                    }
                }
                target
            }
        }
    }

    /// What is watched, after the server in error messages.
    fn what(&self) -> String {
        match self {
            Watched::Kv { key, .. } => format!("key '{key}'"),
            Watched::Service { name, tag, dc, .. } => {
                let mut what = format!("service '{name}'");
                for (key, value) in [("tag", tag), ("dc", dc)] {
                    if let Some(value) = value {
                        what.push_str(&format!(" {key} '{value}'"));
                    }
                }
                what
            }
        }
    }

    /// Whether a 404 with an X-Consul-Index is an empty result rather than an error.
    fn not_found_is_empty(&self) -> bool {
        match self {
            // Consul answers 404 for a prefix with no keys: no backends (yet), still
            // watched.
            Watched::Kv { .. } => true,
            // An unknown service is `200 []`; a 404 is no health endpoint at all.
            Watched::Service { .. } => false,
        }
    }

    /// Reads the body of a good reply (200, or a 404 that means empty) into the backends
    /// it lists, and warns (as `source`) about the entries it skips that were not warned
    /// about yet. A reply that repeats the last one (a wait that ran out) warns about
    /// nothing new.
    fn read(&mut self, source: &str, reply: &Reply) -> Result<BackendList, StoreProblem> {
        match self {
            Watched::Kv { key, bad } => {
                let entries = match reply.status {
                    StatusCode::NOT_FOUND => Vec::new(),
                    _ => kv_entries(&reply.body)?,
                };
                let (list, skipped) = backends_from_entries(key, &entries);
                bad.report(source, skipped);
                Ok(list)
            }
            Watched::Service { bad, filtered, .. } => {
                let (list, skipped) = instances(&reply.body)?;
                bad.report(source, skipped);
                if reply.filtered_by_acls && !*filtered {
                    warn!(
                        source,
                        backends = list.0.len(),
                        "Consul left out instances this token may not read (X-Consul-Results-Filtered-By-ACLs); check CONSUL_HTTP_TOKEN"
                    );
                }
                *filtered = reply.filtered_by_acls;
                Ok(list)
            }
        }
    }
}

/// A catalog instance that is not a backend: skipped, and reported naming the service,
/// its instance ID and its node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct BadInstance {
    service: String,
    id: String,
    node: String,
    reason: String,
}

impl std::fmt::Display for BadInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "service '{}' instance '{}' on node '{}' is not a backend: {}",
            outside(&self.service),
            outside(&self.id),
            outside(&self.node),
            outside(&self.reason)
        )
    }
}

/// The backends a `GET /v1/health/service/<name>?passing` reply lists, ordered by node
/// and instance ID (whatever order the server used), and the instances skipped: one
/// with no address (`Service.Address` and `Node.Address` both empty), an address that
/// is neither an IP nor a host name, or a port outside 1-65535.
fn instances(body: &[u8]) -> Result<(BackendList, Vec<BadInstance>), StoreProblem> {
    let mut listed: Vec<HealthEntry> = serde_json::from_slice(body).map_err(|e| {
        Malformed(format!(
            "the reply is not a JSON list of service instances ({e}): {}",
            excerpt(body)
        ))
    })?;
    listed.sort_by(|a, b| (&a.node.node, &a.service.id).cmp(&(&b.node.node, &b.service.id)));
    let mut list = Vec::with_capacity(listed.len());
    let mut bad = Vec::new();
    for entry in listed {
        let (node, service) = (entry.node, entry.service);
        let address = [&service.address, &node.address]
            .into_iter()
            .flatten()
            .find(|a| !a.is_empty());
        let backend = match (address, service.port) {
            (None, _) => Err("no address (Service.Address and Node.Address are both empty)".into()),
            (Some(_), port) if !(1..=65535).contains(&port) => {
                Err(format!("port {port} is not a backend port (1-65535)"))
            }
            (Some(address), port) => instance_host(address).map(|host| HostPort {
                host,
                port: port as u16,
            }),
        };
        match backend {
            Ok(hp) => list.push(hp),
            Err(reason) => bad.push(BadInstance {
                service: service.service,
                id: service.id,
                node: node.node,
                reason,
            }),
        }
    }
    Ok((BackendList(list), bad))
}

/// An instance's address: an IP literal (v4 or v6, as Consul stores them) or a host name
/// the resolving stage looks up.
fn instance_host(address: &str) -> Result<Host, String> {
    if let Ok(ip) = address.parse::<std::net::IpAddr>() {
        return Ok(Host::Ip(ip));
    }
    parse_host(address).map_err(|why| format!("its address is not usable: {why}"))
}

/// One element of `GET /v1/health/service/<name>`; its `Checks` are not read (`?passing`
/// has already left out every instance with a check that is not passing).
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HealthEntry {
    node: HealthNode,
    service: HealthService,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HealthNode {
    #[serde(default)]
    node: String,
    #[serde(default)]
    address: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HealthService {
    #[serde(rename = "ID", default)]
    id: String,
    #[serde(default)]
    service: String,
    #[serde(default)]
    address: Option<String>,
    #[serde(default)]
    port: i64,
}

impl ConsulSource {
    /// A source for `spec`; `token` (CONSUL_HTTP_TOKEN) is sent as `X-Consul-Token`, and
    /// `resolver` finds a server given by name (the project's one resolver, `--dns`).
    pub fn new(spec: KvSpec, token: Option<String>, resolver: Resolver) -> Self {
        let name = format!("consul://{}{}", spec.server, spec.path);
        let watched = Watched::Kv {
            key: spec.path.trim_start_matches('/').to_string(),
            bad: BadEntryLog::default(),
        };
        Self::watching(spec.server, watched, name, token, resolver)
    }

    /// A source for a `consul-service://` spec, with `token` and `resolver` as for
    /// [`ConsulSource::new`].
    pub fn service(spec: ServiceSpec, token: Option<String>, resolver: Resolver) -> Self {
        let name = format!("consul-service://{spec}");
        let watched = Watched::Service {
            name: spec.name,
            tag: spec.tag,
            dc: spec.dc,
            bad: BadEntryLog::default(),
            filtered: false,
        };
        Self::watching(spec.server, watched, name, token, resolver)
    }

    fn watching(
        server: HostPort,
        watched: Watched,
        name: String,
        token: Option<String>,
        resolver: Resolver,
    ) -> Self {
        ConsulSource {
            http: Http::new(server.clone(), resolver),
            server,
            watched,
            token,
            wait: DEFAULT_WAIT,
            index: 0,
            conn: None,
            last_request: None,
            name,
        }
    }

    /// How long each blocking query waits on the server (Consul caps it at 10 minutes).
    pub fn with_wait(mut self, wait: Duration) -> Self {
        self.wait = wait.clamp(Duration::from_millis(1), Duration::from_secs(600));
        self
    }

    /// Where errors say they came from: the server and what is watched.
    fn context(&self) -> String {
        format!("consul {} {}", self.server, self.watched.what())
    }

    fn fail(&mut self, problem: StoreProblem) -> SourceError {
        // The next call must read afresh: no connection, no index to block on.
        self.conn = None;
        self.index = 0;
        problem.at(self.context())
    }

    fn request_target(&self) -> String {
        let mut target = self.watched.target();
        if self.index > 0 {
            // Go duration syntax, as Consul parses it.
            let wait = match self.wait.subsec_millis() {
                0 => format!("{}s", self.wait.as_secs()),
                _ => format!("{}ms", self.wait.as_millis()),
            };
            target.push_str(&format!("&index={}&wait={wait}", self.index));
        }
        target
    }

    /// Sends one GET and returns the status, the X-Consul-Index and the body.
    ///
    /// A blocking query is only sent on the connection whose reply gave the index. A
    /// closed connection may mean a restarted server, perhaps with a lower index, and
    /// blocking there on the old index would miss every change until the new index
    /// passed it (for up to the whole wait). So a new connection starts with a plain read
    /// (index 0): one cheap extra read per reconnect. For the same reason a request on a
    /// kept-alive connection that fails is tried once more on a fresh one, as a plain read.
    async fn get(&mut self) -> Result<Reply, StoreProblem> {
        let reused = self.conn.as_ref().is_some_and(|c| !c.is_closed());
        if !reused {
            self.index = 0;
            self.connect().await?;
        }
        match self.send().await {
            Err(e) if reused && !e.timed_out => {
                debug!(source = %self.name, error = %e.problem,
                    "kept-alive connection failed; reading afresh on a new one");
                self.index = 0;
                self.connect().await?;
                self.send().await.map_err(|e| e.problem)
            }
            r => r.map_err(|e| e.problem),
        }
    }

    async fn send(&mut self) -> Result<Reply, SendError> {
        let target = self.request_target();
        // The server may hold a blocking query for wait + wait/16; allow that and more.
        let limit = match self.index {
            0 => TIMEOUT_MARGIN * 2,
            _ => self.wait + self.wait / 16 + TIMEOUT_MARGIN,
        };
        tracing::trace!(source = %self.name, %target, "Consul request");
        let mut req = Request::get(&target).header(hyper::header::ACCEPT, "application/json");
        if let Some(token) = &self.token {
            req = req.header("X-Consul-Token", token);
        }
        let req = req.body(Body::default()).map_err(|e| {
            SendError::failed(format!("cannot build the request for '{target}': {e}"))
        })?;
        let conn = self.conn.as_mut().expect("connected before sending");
        let exchange = async {
            conn.ready()
                .await
                .map_err(|e| format!("connection lost: {e}"))?;
            let resp = conn
                .send_request(req)
                .await
                .map_err(|e| format!("request failed: {e}"))?;
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, MAX_BODY)
                .collect()
                .await
                .map_err(|e| format!("reading the reply failed: {e}"))?
                .to_bytes();
            Ok::<_, String>((parts, body))
        };
        let (parts, body) = match timeout(limit, exchange).await {
            Ok(Ok(r)) => r,
            Ok(Err(why)) => return Err(SendError::failed(why)),
            Err(_) => {
                return Err(SendError {
                    problem: Exchange(format!("no reply within {limit:?}")),
                    timed_out: true,
                });
            }
        };
        let index = parts
            .headers
            .get("X-Consul-Index")
            .map(|v| {
                v.to_str()
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .ok_or_else(|| format!("X-Consul-Index {v:?} is not a number"))
            })
            .transpose()
            .map_err(|why| SendError {
                problem: Malformed(why),
                timed_out: false,
            })?;
        let filtered_by_acls = parts
            .headers
            .get("X-Consul-Results-Filtered-By-ACLs")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
        Ok(Reply {
            sent_index: self.index,
            status: parts.status,
            index,
            filtered_by_acls,
            body,
        })
    }

    /// Replaces the connection with a new one; the old one is closed first, so a
    /// failed attempt leaves none.
    async fn connect(&mut self) -> Result<(), ConnectError> {
        self.conn = None;
        self.conn = Some(self.http.connect().await?);
        Ok(())
    }

    /// Turns a reply into the backends it lists (warning about entries skipped), or says
    /// what is wrong with it.
    fn backends(&mut self, reply: &Reply) -> Result<BackendList, StoreProblem> {
        match reply.status {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND if reply.index.is_some() && self.watched.not_found_is_empty() => {
            }
            StatusCode::FORBIDDEN => {
                return Err(PermissionDenied(format!(
                    "permission denied (HTTP 403; is CONSUL_HTTP_TOKEN {}?): {}",
                    match self.token {
                        Some(_) => "right",
                        None => "needed",
                    },
                    excerpt(&reply.body)
                )));
            }
            status => {
                return Err(Rejected(format!("HTTP {status}: {}", excerpt(&reply.body))));
            }
        }
        if reply.index.is_none() {
            return Err(Malformed(
                "the reply has no X-Consul-Index header (is this a Consul server?)".into(),
            ));
        }
        self.watched.read(&self.name, reply)
    }

    /// Waits so that requests start at least [`MIN_REQUEST_GAP`] apart.
    async fn rate_limit(&mut self) {
        if let Some(last) = self.last_request {
            sleep_until(last + MIN_REQUEST_GAP).await;
        }
        self.last_request = Some(Instant::now());
    }
}

impl Source for ConsulSource {
    type Item = BackendList;
    const ANNOUNCE: bool = false;

    async fn next(&mut self) -> Result<BackendList, SourceError> {
        loop {
            self.rate_limit().await;
            let known = self.index;
            let reply = match self.get().await {
                Ok(reply) => reply,
                Err(e) => return Err(self.fail(e)),
            };
            let list = match self.backends(&reply) {
                Ok(list) => list,
                Err(e) => return Err(self.fail(e)),
            };
            // Consul's index is never 0 after a read; if a server says so, blocking on 0
            // would return at once forever, so it is treated as 1.
            let index = reply.index.unwrap_or(1).max(1);
            let blocked = reply.sent_index;
            if blocked > 0 && index == blocked {
                // The wait ran out with nothing new: not worth a read, block again.
                continue;
            }
            if index < known {
                info!(source = %self.name, previous = known, index,
                    "Consul index went backwards; resetting the watch");
            }
            self.index = if index < blocked {
                // A restored snapshot or a restarted agent: blocking on the old index
                // would miss every change until the new one passed it. Read afresh next.
                0
            } else {
                index
            };
            debug!(source = %self.name, index, backends = %list, "Consul read");
            return Ok(list);
        }
    }
}

struct Reply {
    /// The index the request blocked on; 0 for a plain read.
    sent_index: u64,
    status: StatusCode,
    index: Option<u64>,
    /// `X-Consul-Results-Filtered-By-ACLs: true`: the token may not read some results.
    filtered_by_acls: bool,
    body: Bytes,
}

struct SendError {
    problem: StoreProblem,
    /// No reply within the limit: unlike a failed request, not tried again at once on
    /// a fresh connection, which would only wait as long again.
    timed_out: bool,
}

impl SendError {
    /// The exchange failed (not by running out of time).
    fn failed(why: String) -> Self {
        SendError {
            problem: Exchange(why),
            timed_out: false,
        }
    }
}

/// The entries a `GET /v1/kv/<prefix>?recurse` reply lists, values decoded.
fn kv_entries(body: &[u8]) -> Result<Vec<KvEntry>, StoreProblem> {
    let listed: Vec<ListedEntry> = serde_json::from_slice(body).map_err(|e| {
        Malformed(format!(
            "the reply is not a JSON list of keys ({e}): {}",
            excerpt(body)
        ))
    })?;
    listed
        .into_iter()
        .map(|e| {
            let value = match &e.value {
                None => Vec::new(),
                Some(b64) => base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .map_err(|err| {
                        Malformed(format!(
                            "the reply's Value for key '{}' is not base64 ({err}): '{}'",
                            e.key,
                            excerpt(b64.as_bytes())
                        ))
                    })?,
            };
            Ok(KvEntry { key: e.key, value })
        })
        .collect()
}

/// One element of `GET /v1/kv/<prefix>?recurse`; other fields are not needed.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ListedEntry {
    key: String,
    value: Option<String>,
}

/// Percent-encodes a key for the request path, keeping '/' and unreserved characters.
fn encode_path(key: &str) -> String {
    encode(key, b"/")
}

/// Percent-encodes `text` for a request, keeping unreserved characters and `keep`.
fn encode(text: &str, keep: &[u8]) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            _ if keep.contains(&b) => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The start of a reply body, on one line, for error messages.
fn excerpt(body: &[u8]) -> String {
    const MAX: usize = 200;
    let text = String::from_utf8_lossy(body);
    let one_line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.is_empty() {
        return "(empty body)".into();
    }
    // split_whitespace leaves other control characters: escape them too.
    let one_line = crate::logsafe::bounded(&one_line, usize::MAX);
    match one_line.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &one_line[..cut]),
        None => one_line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_percent_encoded_but_slashes_kept() {
        assert_eq!(encode_path("svc/redis-1/a_b.c~"), "svc/redis-1/a_b.c~");
        assert_eq!(encode_path("a b/ü%"), "a%20b/%C3%BC%25");
    }

    #[test]
    fn excerpts_are_one_line_and_bounded() {
        assert_eq!(excerpt(b""), "(empty body)");
        assert_eq!(
            excerpt(b"rpc error:\n  no leader\n"),
            "rpc error: no leader"
        );
        let long = "x".repeat(500);
        assert_eq!(excerpt(long.as_bytes()).chars().count(), 201);
    }

    #[test]
    fn request_target_blocks_only_with_an_index() {
        let spec = crate::spec::Spec::parse("consul://127.0.0.1:8500/svc/web").unwrap();
        let crate::spec::Spec::Consul(kv) = spec else {
            panic!("not a consul spec")
        };
        let mut s =
            ConsulSource::new(kv, None, Resolver::from_system()).with_wait(Duration::from_secs(2));
        assert_eq!(s.request_target(), "/v1/kv/svc/web?recurse");
        s.index = 42;
        assert_eq!(
            s.request_target(),
            "/v1/kv/svc/web?recurse&index=42&wait=2s"
        );
        s.wait = Duration::from_millis(300);
        assert!(s.request_target().ends_with("&wait=300ms"));
    }

    fn service_source(spec: &str) -> ConsulSource {
        let crate::spec::Spec::ConsulService(svc) = crate::spec::Spec::parse(spec).unwrap() else {
            panic!("not a consul-service spec")
        };
        ConsulSource::service(svc, None, Resolver::from_system()).with_wait(Duration::from_secs(2))
    }

    /// The health endpoint, passing instances only, with the tag and dc as given; the
    /// blocking parameters as for a key.
    #[test]
    fn service_request_target_and_context() {
        let mut s = service_source("consul-service://127.0.0.1:8500/redis");
        assert_eq!(s.request_target(), "/v1/health/service/redis?passing");
        assert_eq!(s.context(), "consul 127.0.0.1:8500 service 'redis'");
        s.index = 7;
        assert_eq!(
            s.request_target(),
            "/v1/health/service/redis?passing&index=7&wait=2s"
        );
        let s = service_source("consul-service://consul:8501/web.v2?dc=eu_1&tag=env:prod");
        assert_eq!(
            s.request_target(),
            "/v1/health/service/web.v2?passing&tag=env%3Aprod&dc=eu_1"
        );
        assert_eq!(
            s.context(),
            "consul consul:8501 service 'web.v2' tag 'env:prod' dc 'eu_1'"
        );
        assert_eq!(
            s.name,
            "consul-service://consul:8501/web.v2?tag=env:prod&dc=eu_1"
        );
    }

    fn entry(node: &str, node_addr: &str, id: &str, addr: &str, port: i64) -> serde_json::Value {
        serde_json::json!({
            "Node": {"ID": "", "Node": node, "Address": node_addr, "Datacenter": "dc1",
                     "TaggedAddresses": null, "Meta": {}, "CreateIndex": 5, "ModifyIndex": 5},
            "Service": {"ID": id, "Service": "redis", "Tags": ["v1"], "Address": addr,
                        "Meta": null, "Port": port, "Weights": {"Passing": 1, "Warning": 1},
                        "EnableTagOverride": false, "CreateIndex": 6, "ModifyIndex": 6},
            "Checks": [{"Node": node, "CheckID": "serfHealth", "Status": "passing",
                        "ServiceID": "", "ServiceName": ""}],
        })
    }

    /// Service.Address wins over Node.Address; IPv6 literals and host names are kept as
    /// such; the list is in node and ID order whatever the reply's order; an instance
    /// with no address, a port outside 1-65535 or an unusable address is skipped and
    /// named by service, ID and node.
    #[test]
    fn instances_are_read_from_service_then_node_address() {
        let body = serde_json::json!([
            entry("n3", "10.0.0.3", "redis-3", "", 6379),
            entry("n1", "10.0.0.1", "redis-1", "192.168.0.1", 7000),
            entry("n2", "fe80::2", "redis-2", "", 6380),
            entry("n2", "10.0.0.2", "redis-2b", "redis-2b.example.com", 6381),
            entry("n4", "", "redis-4", "", 6379),
            entry("n5", "10.0.0.5", "redis-5", "", 0),
            entry("n6", "10.0.0.6", "redis-6", "", 70000),
            entry("n7", "10.0.0.7", "redis-7", "bad host", 1),
        ]);
        let (list, bad) = instances(body.to_string().as_bytes()).unwrap();
        assert_eq!(
            list.to_string(),
            "192.168.0.1:7000,[fe80::2]:6380,redis-2b.example.com:6381,10.0.0.3:6379"
        );
        assert!(matches!(list.0[2].host, Host::Name(_)), "{list}");
        let bad: Vec<String> = bad.iter().map(|b| b.to_string()).collect();
        assert_eq!(
            bad,
            [
                "service 'redis' instance 'redis-4' on node 'n4' is not a backend: no address (Service.Address and Node.Address are both empty)",
                "service 'redis' instance 'redis-5' on node 'n5' is not a backend: port 0 is not a backend port (1-65535)",
                "service 'redis' instance 'redis-6' on node 'n6' is not a backend: port 70000 is not a backend port (1-65535)",
                "service 'redis' instance 'redis-7' on node 'n7' is not a backend: its address is not usable: host 'bad host' contains the character ' '",
            ]
        );
    }

    /// An unknown service is `[]`: no backends. Anything but a JSON list of instances is
    /// malformed, and says what it got.
    #[test]
    fn instances_of_an_empty_or_malformed_reply() {
        let (list, bad) = instances(b"[]").unwrap();
        assert!(list.0.is_empty() && bad.is_empty());
        let e = instances(br#"{"Node": 1}"#).err().unwrap().to_string();
        assert!(
            e.contains("not a JSON list of service instances") && e.contains(r#"{"Node": 1}"#),
            "{e}"
        );
        let e = instances(br#"[{"Node": {}, "Service": {"Port": "80"}}]"#)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("not a JSON list of service instances"), "{e}");
    }
}
