//! The admin endpoint: Prometheus metrics, health and readiness, the routes as JSON, and
//! a small self-refreshing status page, over plain HTTP/1.1 (hyper).
//!
//! Everything here reads state the data path already keeps (atomics, the latest
//! endpoint snapshots); nothing the admin endpoint does can slow an accept or a copy.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::metrics;
use crate::proxy::{Route, State, Target};

/// Serves admin requests until `stop` fires.
pub async fn serve(listener: TcpListener, state: Arc<State>, stop: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(pair) => pair,
                Err(e) => {
                    debug!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&req, &state)) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
}

fn handle(req: &Request<Incoming>, state: &State) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n");
    }
    match req.uri().path() {
        "/metrics" => {
            let omni: usize = state
                .routes()
                .iter()
                .filter_map(|r| match &r.active().target {
                    Target::Omni(o) => Some(o.index().len()),
                    Target::Fixed(_) => None,
                })
                .sum();
            metrics::global().omni_index_size.set(omni as i64);
            reply(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                metrics::global().encode(),
            )
        }
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" => {
            if state.ready() {
                reply(StatusCode::OK, "text/plain", "ready\n")
            } else {
                let waiting: Vec<String> = state
                    .routes()
                    .iter()
                    .filter(|r| !r.ready())
                    .map(|r| r.listen.to_string())
                    .collect();
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!(
                        "not ready: waiting for discovery on {}\n",
                        waiting.join(", ")
                    ),
                )
            }
        }
        "/routes" => reply(
            StatusCode::OK,
            "application/json",
            serde_json::to_string_pretty(&routes_json(state)).unwrap_or_default(),
        ),
        "/" => reply(
            StatusCode::OK,
            "text/html; charset=utf-8",
            status_page(state),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /, /metrics, /healthz, /readyz or /routes\n",
        ),
    }
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, v);
    }
    response
}

/// One route as `/routes` shows it.
fn route_json(route: &Route) -> Value {
    let active = route.active();
    let source = active.config.to_string();
    let health = metrics::global().source(&source);
    let mut out = json!({
        "listen": route.listen.to_string(),
        "spec": source,
        "kind": active.kind,
        "open_connections": route.stats.open.load(Ordering::Relaxed),
        "accepted": route.stats.accepted.load(Ordering::Relaxed),
        "refused": route.stats.refused.load(Ordering::Relaxed),
        "connect_failures": route.stats.connect_failures.load(Ordering::Relaxed),
        "sent_bytes": route.stats.sent.load(Ordering::Relaxed),
        "received_bytes": route.stats.received.load(Ordering::Relaxed),
        "last_update": health.and_then(|h| h.last_good_unix),
        "discovery_errors": health.map(|h| h.errors).unwrap_or(0),
    });
    match &active.target {
        Target::Fixed(balancer) => {
            let endpoints: Option<Vec<Value>> = balancer.current().map(|set| {
                set.as_slice()
                    .iter()
                    .map(|e| {
                        json!({
                            "addr": e.addr.to_string(),
                            "origin": e.origin.as_deref(),
                            "priority": e.priority,
                            "weight": e.weight,
                            "state": if balancer.is_cooling(e.addr) { "cooling_down" } else { "up" },
                        })
                    })
                    .collect()
            });
            out["discovered"] = json!(endpoints.is_some());
            out["endpoints"] = json!(endpoints.unwrap_or_default());
        }
        Target::Omni(omni) => {
            let mut containers: Vec<Value> = omni
                .index()
                .containers()
                .iter()
                .map(|c| {
                    let declarations: serde_json::Map<String, Value> = c
                        .declarations
                        .iter()
                        .map(|(port, spec)| (port.to_string(), json!(spec.to_string())))
                        .collect();
                    json!({
                        "name": c.name,
                        "id": c.id,
                        "ips": c.ips.iter().map(|ip| ip.to_string()).collect::<Vec<_>>(),
                        "declarations": declarations,
                    })
                })
                .collect();
            containers.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
            out["discovered"] = json!(omni.index().loaded());
            out["containers"] = json!(containers);
            out["sources"] = json!(omni.source_count());
        }
    }
    out
}

fn routes_json(state: &State) -> Value {
    json!({
        "ready": state.ready(),
        "uptime_seconds": state.started.elapsed().as_secs(),
        "routes": state.routes().iter().map(|r| route_json(r)).collect::<Vec<_>>(),
    })
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// The status page: rendered on the server and refreshed by the browser every two
/// seconds (a meta refresh), so it needs no script and no external asset.
fn status_page(state: &State) -> String {
    let data = routes_json(state);
    let mut h = String::new();
    let ready = state.ready();
    let _ = write!(
        h,
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="2"><title>ambassadord status</title>
<style>
body{{font:15px/1.4 system-ui,sans-serif;margin:24px;color:#1d2330;background:#f6f7f9}}
h1{{font-size:22px;margin:0 0 4px}} .sub{{color:#5b6475;margin-bottom:18px}}
.route{{background:#fff;border:1px solid #d9dde5;border-radius:8px;padding:14px 18px;margin-bottom:16px}}
.route h2{{font-size:18px;margin:0 0 6px;font-family:ui-monospace,monospace}}
.spec{{font-family:ui-monospace,monospace;color:#33415c}}
.nums{{display:flex;gap:28px;margin:10px 0}} .nums div b{{display:block;font-size:20px}}
table{{border-collapse:collapse;width:100%}} td,th{{text-align:left;padding:4px 10px;border-top:1px solid #eceef2}}
th{{color:#5b6475;font-weight:600}}
.ok{{color:#137333;font-weight:600}} .bad{{color:#b3261e;font-weight:600}} .warn{{color:#a15c00;font-weight:600}}
</style></head><body>
<h1>ambassadord</h1><div class="sub">{} · up {}s · {} route(s) · refreshes every 2 s</div>
"#,
        if ready {
            r#"<span class="ok">ready</span>"#
        } else {
            r#"<span class="warn">waiting for discovery</span>"#
        },
        state.started.elapsed().as_secs(),
        state.routes().len(),
    );
    for r in data["routes"].as_array().into_iter().flatten() {
        let n = |k: &str| r[k].as_u64().unwrap_or(0);
        let bad = |v: u64| if v > 0 { "bad" } else { "" };
        let _ = write!(
            h,
            r#"<div class="route"><h2>{listen}</h2><div class="spec">→ {spec} <span class="sub">({kind})</span></div>
<div class="nums"><div><b>{open}</b>open</div><div><b>{acc}</b>accepted</div><div><b>{sent}</b>sent</div><div><b>{recv}</b>received</div><div><b class="{rcls}">{refused}</b>refused</div><div><b class="{ccls}">{cf}</b>connect failures</div><div><b class="{dcls}">{de}</b>discovery errors</div></div>
"#,
            listen = esc(r["listen"].as_str().unwrap_or("")),
            spec = esc(r["spec"].as_str().unwrap_or("")),
            kind = esc(r["kind"].as_str().unwrap_or("")),
            open = n("open_connections"),
            acc = n("accepted"),
            sent = bytes(n("sent_bytes")),
            recv = bytes(n("received_bytes")),
            refused = n("refused"),
            cf = n("connect_failures"),
            de = n("discovery_errors"),
            rcls = bad(n("refused")),
            ccls = bad(n("connect_failures")),
            dcls = bad(n("discovery_errors")),
        );
        if let Some(eps) = r["endpoints"].as_array() {
            if !r["discovered"].as_bool().unwrap_or(false) {
                h.push_str(r#"<div class="warn">no backends discovered yet</div>"#);
            } else if eps.is_empty() {
                h.push_str(r#"<div class="bad">discovery found no backends</div>"#);
            } else {
                h.push_str("<table><tr><th>backend</th><th>from</th><th>priority</th><th>weight</th><th>state</th></tr>");
                for e in eps {
                    let st = e["state"].as_str().unwrap_or("");
                    let _ = write!(
                        h,
                        r#"<tr><td class="spec">{}</td><td>{}</td><td>{}</td><td>{}</td><td class="{}">{}</td></tr>"#,
                        esc(e["addr"].as_str().unwrap_or("")),
                        esc(e["origin"].as_str().unwrap_or("")),
                        e["priority"],
                        e["weight"],
                        if st == "up" { "ok" } else { "bad" },
                        if st == "up" { "up" } else { "cooling down" },
                    );
                }
                h.push_str("</table>");
            }
        }
        if let Some(cs) = r["containers"].as_array() {
            h.push_str("<table><tr><th>container</th><th>addresses</th><th>declares</th></tr>");
            for c in cs {
                let ips: Vec<&str> = c["ips"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|v| v.as_str())
                    .collect();
                let decl: Vec<String> = c["declarations"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(p, s)| format!("{p} → {}", s.as_str().unwrap_or("")))
                    .collect();
                let _ = write!(
                    h,
                    "<tr><td>{}</td><td>{}</td><td class=\"spec\">{}</td></tr>",
                    esc(c["name"].as_str().unwrap_or("")),
                    esc(&ips.join(", ")),
                    esc(&decl.join("; ")),
                );
            }
            h.push_str("</table>");
        }
        h.push_str("</div>\n");
    }
    h.push_str(r#"<div class="sub">JSON: <a href="/routes">/routes</a> · Prometheus: <a href="/metrics">/metrics</a></div></body></html>"#);
    h
}
