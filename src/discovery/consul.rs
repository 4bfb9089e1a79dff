//! Consul discovery: reads what a spec watches over Consul's HTTP API and follows it
//! with blocking queries, publishing a backend list.
//!
//! What is watched ([`Watched`]) decides the request and how a reply becomes a backend
//! list: a KV prefix, whose keys the children-or-value rule reads. Everything else, the
//! blocking-query loop below, is the same for all of them.
//!
//! One request does both jobs: `GET /v1/kv/<path>?recurse&index=N&wait=W` lists the
//! same prefix it waits on, so no change can fall between a read and a watch. The loop
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
use tracing::{debug, info};

use super::StoreProblem::{self, Exchange, Malformed, PermissionDenied, Rejected};
use super::dns::Resolver;
use super::http::{Body, ConnectError, Connection, Http};
use super::kv::{BackendList, BadEntry, BadEntryLog, KvEntry, backends_from_entries};
use super::{Source, SourceError};
use crate::spec::{HostPort, KvSpec};

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
}

impl Watched {
    /// The request target without the blocking parameters.
    fn target(&self) -> String {
        match self {
            Watched::Kv { key, .. } => format!("/v1/kv/{}?recurse", encode_path(key)),
        }
    }

    /// What is watched, after the server in error messages.
    fn what(&self) -> String {
        match self {
            Watched::Kv { key, .. } => format!("key '{key}'"),
        }
    }

    /// Whether a 404 with an X-Consul-Index is an empty result rather than an error.
    fn not_found_is_empty(&self) -> bool {
        match self {
            // Consul answers 404 for a prefix with no keys: no backends (yet), still
            // watched.
            Watched::Kv { .. } => true,
        }
    }

    /// Reads the body of a good reply (200, or a 404 that means empty) into the backends
    /// it lists and the entries skipped.
    fn parse(&self, reply: &Reply) -> Result<(BackendList, Vec<BadEntry>), StoreProblem> {
        match self {
            Watched::Kv { key, .. } => {
                let entries = match reply.status {
                    StatusCode::NOT_FOUND => Vec::new(),
                    _ => kv_entries(&reply.body)?,
                };
                Ok(backends_from_entries(key, &entries))
            }
        }
    }

    /// Warns about the skipped entries not warned about yet.
    fn report(&mut self, source: &str, skipped: Vec<BadEntry>) {
        match self {
            Watched::Kv { bad, .. } => bad.report(source, skipped),
        }
    }
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
        Ok(Reply {
            sent_index: self.index,
            status: parts.status,
            index,
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

    /// Turns a reply into the backends it lists and the entries skipped, or says what is
    /// wrong with it.
    fn backends(&self, reply: &Reply) -> Result<(BackendList, Vec<BadEntry>), StoreProblem> {
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
        self.watched.parse(reply)
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
            let (list, skipped) = match self.backends(&reply) {
                Ok(read) => read,
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
            self.watched.report(&self.name, skipped);
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
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => {
                out.push(b as char)
            }
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
}
