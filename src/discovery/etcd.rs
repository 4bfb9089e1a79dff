//! etcd v3 discovery through etcd's JSON gateway: one range read, then a watch stream
//! from the next revision, applied live.
//!
//! Why the gateway and not the etcd-client crate: the gateway is plain HTTP/1.1 + JSON
//! (keys and values base64), served by every etcd since 3.3 under `/v3/` (3.4 also keeps
//! `/v3beta/`), so the discovery layer's small HTTP client is enough and the build needs
//! no protoc or gRPC stack. Each request has a connection of its own: a watch is a
//! response that lasts as long as the watch. The one range `[PATH, PATH + "0")` covers
//! the key itself and every key under `PATH/` ('0' is the byte after '/'), so a single
//! read and a single watch see both halves of the children-or-value rule.
//!
//! Watch semantics: the watch starts at the read's revision + 1, so a change made between
//! the read and the watch is still delivered. Events are applied to the copy of the keys
//! read, so a change costs no extra round trip. A watch cancelled because its start
//! revision was compacted away is answered by reading afresh; a lost connection or a bad
//! reply is an error, after which the driver keeps the last list, backs off, and the
//! next call reads and watches anew.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;
use tokio::time::timeout;
use tracing::{debug, info};

use super::StoreProblem::{self, Exchange, Malformed, Rejected};
use super::dns::Resolver;
use super::http::{Connection, Http};
use super::kv::{BackendList, BadEntryLog, KvEntry, backends_from_entries};
use super::{Source, SourceError};
use crate::spec::KvSpec;

/// A whole range request, or a watch request up to its response headers (connecting
/// included). An idle watch stream is left to TCP keepalive (see `http.rs`).
/// How long a change waits for the next one before the list is published, and the most
/// a burst of changes is held back in all.
const COALESCE_QUIET: Duration = Duration::from_millis(5);
const COALESCE_MAX: Duration = Duration::from_millis(250);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A watch reply larger than this without a complete JSON value is not etcd talking.
const MAX_PENDING: usize = 64 << 20;

pub struct EtcdSource {
    spec: KvSpec,
    http: Http,
    /// `etcd://HOST:PORT/PATH`, for log lines.
    name: String,
    range_key: String,
    range_end: String,
    state: Option<State>,
    bad: BadEntryLog,
}

/// What was read, and the watch that keeps it current.
struct State {
    /// Every key in the range and its value, as of `revision`.
    keys: BTreeMap<Vec<u8>, Vec<u8>>,
    revision: i64,
    watch: Option<WatchStream>,
}

impl EtcdSource {
    /// A source for `spec`; `resolver` finds a server given by name (the project's one
    /// resolver, so `--dns` applies to the store too).
    pub fn new(spec: KvSpec, resolver: Resolver) -> Self {
        let name = format!("etcd://{}{}", spec.server, spec.path);
        let range_key = B64.encode(spec.path.as_bytes());
        let range_end = B64.encode(format!("{}0", spec.path).as_bytes());
        EtcdSource {
            http: Http::new(spec.server.clone(), resolver),
            spec,
            name,
            range_key,
            range_end,
            state: None,
            bad: BadEntryLog::default(),
        }
    }

    /// Places `problem`: the server, what was being done, and the key.
    fn fail(&self, doing: &str, problem: StoreProblem) -> SourceError {
        problem.at(format!(
            "etcd {}: {doing} '{}'",
            self.spec.server, self.spec.path
        ))
    }

    /// Turns the keys into the backend list, warning once about each bad value.
    fn list(&mut self) -> BackendList {
        let Some(state) = &self.state else {
            return BackendList::default();
        };
        let entries: Vec<KvEntry> = state
            .keys
            .iter()
            .map(|(k, v)| KvEntry {
                key: String::from_utf8_lossy(k).into_owned(),
                value: v.clone(),
            })
            .collect();
        let (list, bad) = backends_from_entries(&self.spec.path, &entries);
        self.bad.report(&self.name, bad);
        list
    }

    /// POSTs `body` to `path` on a connection of its own and returns the response with
    /// that connection (dropping it closes the connection, whether the body was read or
    /// not).
    async fn post(
        &self,
        path: &str,
        body: String,
    ) -> Result<(Response<Incoming>, Connection), StoreProblem> {
        let mut conn = self.http.connect().await?;
        let request = Request::post(path)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| Exchange(format!("cannot build the request: {e}")))?;
        let response = conn
            .send_request(request)
            .await
            .map_err(|e| Exchange(format!("POST {path} failed: {e}")))?;
        Ok((response, conn))
    }

    /// Reads every key in the range, and the revision the read saw.
    async fn read(&self) -> Result<State, SourceError> {
        let doing = "reading";
        let body = serde_json::json!({ "key": self.range_key, "range_end": self.range_end });
        let fetch = async {
            let (response, _conn) = self.post("/v3/kv/range", body.to_string()).await?;
            let status = response.status();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|e| Exchange(format!("the reply was cut off: {e}")))?
                .to_bytes();
            Ok::<_, StoreProblem>((status, bytes))
        };
        let (status, bytes) = timeout(REQUEST_TIMEOUT, fetch)
            .await
            .unwrap_or_else(|_| no_reply())
            .map_err(|e| self.fail(doing, e))?;
        if status != StatusCode::OK {
            return Err(self.fail(doing, Rejected(http_error(status, &bytes))));
        }
        let reply: RangeResponse = serde_json::from_slice(&bytes)
            .map_err(|e| self.fail(doing, Malformed(malformed("range reply", &e, &bytes))))?;
        let revision = reply.header.map(|h| h.revision).unwrap_or(0);
        if revision <= 0 {
            let why = malformed_text("range reply", "no header revision", &bytes);
            return Err(self.fail(doing, Malformed(why)));
        }
        let mut keys = BTreeMap::new();
        for kv in reply.kvs {
            let (key, value) = kv.decode().map_err(|e| self.fail(doing, Malformed(e)))?;
            keys.insert(key, value);
        }
        Ok(State {
            keys,
            revision,
            watch: None,
        })
    }

    /// Opens the watch stream on the range from `start_revision`.
    async fn watch(&self, start_revision: i64) -> Result<WatchStream, SourceError> {
        let doing = "watching";
        let body = serde_json::json!({ "create_request": {
            "key": self.range_key,
            "range_end": self.range_end,
            "start_revision": start_revision.to_string(),
        }});
        let (response, conn) = timeout(REQUEST_TIMEOUT, self.post("/v3/watch", body.to_string()))
            .await
            .unwrap_or_else(|_| no_reply())
            .map_err(|e| self.fail(doing, e))?;
        let status = response.status();
        if status != StatusCode::OK {
            let bytes = timeout(REQUEST_TIMEOUT, response.into_body().collect())
                .await
                .ok()
                .and_then(Result::ok)
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            return Err(self.fail(doing, Rejected(http_error(status, &bytes))));
        }
        Ok(WatchStream {
            body: response.into_body(),
            pending: Vec::new(),
            _conn: conn,
        })
    }

    /// Waits for the next watch reply that changes something and applies it to `state`,
    /// or reports that the watch must give way to a fresh read (compaction).
    async fn follow(
        &self,
        state: &mut State,
        watch: &mut WatchStream,
    ) -> Result<Followed, SourceError> {
        let doing = "watching";
        loop {
            let replies = watch
                .next_replies()
                .await
                .map_err(|e| self.fail(doing, e))?;
            let mut changed = false;
            for reply in replies {
                if let Some(error) = reply.error {
                    let why = format!("etcd says: {}", error_text(&error));
                    return Err(self.fail(doing, Rejected(why)));
                }
                let Some(result) = reply.result else {
                    continue;
                };
                if result.compact_revision > 0 {
                    return Ok(Followed::Compacted(result.compact_revision));
                }
                if result.canceled {
                    let reason = match result.cancel_reason.as_str() {
                        "" => "the watch was cancelled".to_string(),
                        r => format!("the watch was cancelled: {r}"),
                    };
                    return Err(self.fail(doing, Rejected(reason)));
                }
                if let Some(header) = &result.header {
                    state.revision = state.revision.max(header.revision);
                }
                for event in result.events {
                    let delete = match event.kind.as_str() {
                        "" | "PUT" => false,
                        "DELETE" => true,
                        other => {
                            let why =
                                format!("malformed watch reply: unknown event type '{other}'");
                            return Err(self.fail(doing, Malformed(why)));
                        }
                    };
                    let (key, value) = event
                        .kv
                        .decode()
                        .map_err(|e| self.fail(doing, Malformed(e)))?;
                    state.revision = state.revision.max(event.kv.mod_revision);
                    if delete {
                        state.keys.remove(&key);
                    } else {
                        state.keys.insert(key, value);
                    }
                    changed = true;
                }
            }
            if changed {
                return Ok(Followed::Changed);
            }
        }
    }
}

enum Followed {
    Changed,
    Compacted(i64),
}

impl Source for EtcdSource {
    type Item = BackendList;
    const ANNOUNCE: bool = false;

    async fn next(&mut self) -> Result<BackendList, SourceError> {
        loop {
            // Taken out while in use: whatever ends this call other than a change applied
            // (an error, a compaction) leaves no state, so the next read starts afresh.
            let Some(mut state) = self.state.take() else {
                let state = self.read().await?;
                debug!(source = %self.name, revision = state.revision, keys = state.keys.len(), "etcd read");
                self.state = Some(state);
                return Ok(self.list());
            };
            let mut watch = match state.watch.take() {
                Some(watch) => watch,
                None => self.watch(state.revision + 1).await?,
            };
            match self.follow(&mut state, &mut watch).await? {
                Followed::Changed => {
                    // Keys put back to back arrive one watch reply each: take in every
                    // change that follows within COALESCE_QUIET (up to COALESCE_MAX), so
                    // a burst costs one list, not one per key.
                    let until = tokio::time::Instant::now() + COALESCE_MAX;
                    let mut keep_watching = true;
                    while tokio::time::Instant::now() < until {
                        // Cancel-safe: an unfinished reply stays buffered in `watch`.
                        let more = tokio::time::timeout(
                            COALESCE_QUIET,
                            self.follow(&mut state, &mut watch),
                        );
                        match more.await {
                            Ok(Ok(Followed::Changed)) => continue,
                            Err(_quiet) => break,
                            // Publish what was applied; the next call watches or reads
                            // anew (and reports the problem if it persists).
                            Ok(Ok(Followed::Compacted(_)) | Err(_)) => {
                                keep_watching = false;
                                break;
                            }
                        }
                    }
                    if keep_watching {
                        state.watch = Some(watch);
                    }
                    self.state = Some(state);
                    return Ok(self.list());
                }
                Followed::Compacted(at) => {
                    info!(source = %self.name, compact_revision = at,
                        "etcd compacted past the watched revision; reading afresh");
                }
            }
        }
    }
}

/// A watch response body: a stream of JSON values (one per line in practice; parsed as
/// concatenated values so line breaks do not matter).
struct WatchStream {
    body: Incoming,
    pending: Vec<u8>,
    _conn: Connection,
}

impl WatchStream {
    /// Reads until at least one complete reply is buffered and returns every complete
    /// reply, keeping a partial one for next time.
    async fn next_replies(&mut self) -> Result<Vec<WatchLine>, StoreProblem> {
        loop {
            let mut replies = Vec::new();
            let mut stream =
                serde_json::Deserializer::from_slice(&self.pending).into_iter::<WatchLine>();
            let consumed = loop {
                match stream.next() {
                    Some(Ok(reply)) => replies.push(reply),
                    Some(Err(e)) if e.is_eof() => break stream.byte_offset(),
                    Some(Err(e)) => {
                        return Err(Malformed(malformed("watch reply", &e, &self.pending)));
                    }
                    None => break stream.byte_offset(),
                }
            };
            self.pending.drain(..consumed);
            if !replies.is_empty() {
                return Ok(replies);
            }
            if self.pending.len() > MAX_PENDING {
                return Err(Malformed(format!(
                    "malformed watch reply: {} bytes without a complete JSON value",
                    self.pending.len()
                )));
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.pending.extend_from_slice(&data);
                    }
                }
                Some(Err(e)) => return Err(Exchange(format!("the watch stream broke: {e}"))),
                None => return Err(Exchange("the store closed the watch stream".into())),
            }
        }
    }
}

#[derive(Debug, Default, Deserialize)]
struct Header {
    #[serde(default, deserialize_with = "int64")]
    revision: i64,
}

#[derive(Debug, Deserialize)]
struct RangeResponse {
    header: Option<Header>,
    #[serde(default)]
    kvs: Vec<Kv>,
}

#[derive(Debug, Deserialize)]
struct Kv {
    #[serde(default)]
    key: String,
    #[serde(default)]
    value: String,
    #[serde(default, deserialize_with = "int64")]
    mod_revision: i64,
}

impl Kv {
    fn decode(&self) -> Result<(Vec<u8>, Vec<u8>), String> {
        let key = B64
            .decode(&self.key)
            .map_err(|e| format!("malformed reply: key '{}' is not base64: {e}", self.key))?;
        let value = B64.decode(&self.value).map_err(|e| {
            format!(
                "malformed reply: the value of key '{}' is not base64: {e}",
                String::from_utf8_lossy(&key)
            )
        })?;
        Ok((key, value))
    }
}

/// One value of the watch stream: a response, or an error from the gateway.
#[derive(Debug, Deserialize)]
struct WatchLine {
    result: Option<WatchResponse>,
    error: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
struct WatchResponse {
    header: Option<Header>,
    #[serde(default)]
    canceled: bool,
    #[serde(default, deserialize_with = "int64")]
    compact_revision: i64,
    #[serde(default)]
    cancel_reason: String,
    #[serde(default)]
    events: Vec<Event>,
}

#[derive(Debug, Deserialize)]
struct Event {
    /// "PUT" is the default and so usually left out.
    #[serde(default, rename = "type")]
    kind: String,
    kv: Kv,
}

/// proto3 JSON writes int64 as a string, but a number is accepted too.
fn int64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Int {
        Num(i64),
        Text(String),
    }
    match Int::deserialize(d)? {
        Int::Num(n) => Ok(n),
        Int::Text(s) => s
            .parse()
            .map_err(|_| serde::de::Error::custom(format!("'{s}' is not an integer"))),
    }
}

/// The gateway's error body is `{"error": "...", "message": "...", "code": N}` (or an
/// object under "error" in a stream); fall back to the raw text.
fn error_text(error: &serde_json::Value) -> String {
    match error {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Object(o) => match o.get("message").and_then(|m| m.as_str()) {
            Some(m) => m.to_string(),
            None => error.to_string(),
        },
        other => other.to_string(),
    }
}

/// A request that outlived [`REQUEST_TIMEOUT`].
fn no_reply<T>() -> Result<T, StoreProblem> {
    Err(Exchange(format!("no reply within {REQUEST_TIMEOUT:?}")))
}

fn http_error(status: StatusCode, body: &[u8]) -> String {
    let detail = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("message").or_else(|| v.get("error")).cloned())
        .map(|m| error_text(&m))
        .unwrap_or_else(|| snippet(body));
    if detail.is_empty() {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status}: {detail}")
    }
}

fn malformed(what: &str, e: &serde_json::Error, body: &[u8]) -> String {
    malformed_text(what, e, body)
}

fn malformed_text(what: &str, why: impl fmt::Display, body: &[u8]) -> String {
    format!("malformed {what} ({why}): {}", snippet(body))
}

/// The start of a reply, for messages: enough to recognise it, never a flood.
fn snippet(body: &[u8]) -> String {
    const MAX: usize = 200;
    let text = String::from_utf8_lossy(&body[..body.len().min(MAX)]);
    // Escaped: a server's reply must not put a line break into our log.
    let text = crate::logsafe::bounded(text.trim(), MAX);
    if body.len() > MAX {
        format!("'{text}...'")
    } else {
        format!("'{text}'")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<WatchLine> {
        serde_json::Deserializer::from_str(text)
            .into_iter::<WatchLine>()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// Replies captured from etcd 3.4's gateway parse as etcd means them.
    #[test]
    fn parses_the_gateway_replies() {
        let range: RangeResponse = serde_json::from_str(
            r#"{"header":{"cluster_id":"3249","member_id":"3319","revision":"7","raft_term":"2"},
                "kvs":[{"key":"L3N2Yy9h","create_revision":"2","mod_revision":"2","version":"1",
                "value":"MTI3LjAuMC4xOjgw"}],"count":"1"}"#,
        )
        .unwrap();
        assert_eq!(range.header.unwrap().revision, 7);
        assert_eq!(
            range.kvs[0].decode().unwrap(),
            (b"/svc/a".to_vec(), b"127.0.0.1:80".to_vec())
        );

        let stream = lines(concat!(
            r#"{"result":{"header":{"revision":"2"},"created":true}}"#,
            "\n",
            r#"{"result":{"header":{"revision":"4"},"events":[{"type":"DELETE","kv":{"key":"L3N2Yy9i","mod_revision":"4"}}]}}"#,
            r#"{"result":{"header":{"raft_term":"2"},"canceled":true,"compact_revision":"4"}}"#,
            "\n",
            r#"{"error":{"grpc_code":14,"message":"etcdserver: no leader"}}"#,
        ));
        let results: Vec<_> = stream.iter().map(|l| l.result.as_ref()).collect();
        assert!(results[0].unwrap().events.is_empty());
        let delete = &results[1].unwrap().events[0];
        assert_eq!(delete.kind, "DELETE");
        assert_eq!(delete.kv.decode().unwrap().0, b"/svc/b");
        assert_eq!(delete.kv.value, "");
        assert_eq!(results[2].unwrap().compact_revision, 4);
        assert!(results[2].unwrap().canceled);
        assert_eq!(
            error_text(stream[3].error.as_ref().unwrap()),
            "etcdserver: no leader"
        );
    }

    #[test]
    fn the_range_covers_the_key_and_its_children_only() {
        let spec = KvSpec {
            server: crate::spec::HostPort::parse("127.0.0.1:2379").unwrap(),
            path: "/svc".into(),
        };
        let source = EtcdSource::new(spec, Resolver::from_system());
        let start = B64.decode(&source.range_key).unwrap();
        let end = B64.decode(&source.range_end).unwrap();
        let inside = |k: &[u8]| k >= start.as_slice() && k < end.as_slice();
        assert!(inside(b"/svc"));
        assert!(inside(b"/svc/a"));
        assert!(inside(b"/svc/zzz/deeper"));
        assert!(!inside(b"/svcx"));
        assert!(!inside(b"/sv"));
    }

    #[test]
    fn http_errors_and_malformed_replies_are_named() {
        let msg = http_error(
            StatusCode::BAD_REQUEST,
            br#"{"error":"illegal base64 data","message":"illegal base64 data","code":3}"#,
        );
        assert_eq!(msg, "HTTP 400 Bad Request: illegal base64 data");
        assert_eq!(
            http_error(StatusCode::NOT_FOUND, b"404 page not found\n"),
            "HTTP 404 Not Found: '404 page not found'"
        );
        let e = serde_json::from_slice::<RangeResponse>(b"<html>").unwrap_err();
        let msg = malformed("range reply", &e, b"<html>");
        assert!(msg.starts_with("malformed range reply ("), "{msg}");
        assert!(msg.ends_with("'<html>'"), "{msg}");
        let bad = Kv {
            key: "L3N2Yy9h".into(),
            value: "!!".into(),
            mod_revision: 0,
        };
        let msg = bad.decode().unwrap_err();
        assert!(
            msg.contains("the value of key '/svc/a' is not base64"),
            "{msg}"
        );
    }
}
