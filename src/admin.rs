//! The admin endpoint: Prometheus metrics, health and readiness, the routes as JSON, and
//! a small self-refreshing status page, over plain HTTP/1.1 (hyper).
//!
//! It knows the server only through the read-only [`View`] and the metrics registry:
//! nothing it does writes state, and nothing it reads can slow an accept or a copy.
//!
//! It can never take what the data path needs: at most [`MAX_CONNECTIONS`] admin
//! connections are open at once (more are closed as soon as they are accepted), a
//! client has [`HEADER_DEADLINE`] to send a request's headers, and a connection lives at
//! most [`CONNECTION_LIFETIME`] (then it is closed once its current request is
//! answered), so slow or idle clients cannot pile up descriptors.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::metrics;
use crate::status::{EndpointState, RedirectState, Status, TargetStatus, View};

/// What the endpoint serves from.
pub struct Admin {
    pub registry: Registry,
    pub view: Arc<dyn View>,
}

/// Admin connections open at once; a scraper, a health check and a browser need a few.
pub const MAX_CONNECTIONS: usize = 16;
/// How long a client may take to send a request's headers (also while a kept-alive
/// connection waits for its next request).
pub const HEADER_DEADLINE: Duration = Duration::from_secs(5);
/// How long one admin connection may stay open in all.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Serves admin requests until `stop` fires.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, stop: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut full_logged = false;
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
        // Over the cap, the connection is closed at once (dropped): its descriptor is
        // back before the next accept.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if !std::mem::replace(&mut full_logged, true) {
                warn!(
                    max = MAX_CONNECTIONS,
                    "admin endpoint: too many connections open; closing new ones until some end"
                );
            }
            continue;
        };
        full_logged = false;
        let admin = admin.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(handle(&req, &admin)) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_DEADLINE)
                .serve_connection(TokioIo::new(stream), service);
            let mut conn = std::pin::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = tokio::time::sleep(CONNECTION_LIFETIME) => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
}

fn handle(req: &Request<Incoming>, admin: &Admin) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n");
    }
    match req.uri().path() {
        "/metrics" => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics::encode(&admin.registry),
        ),
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" => match admin.view.readiness() {
            Ok(()) => reply(StatusCode::OK, "text/plain", "ready\n"),
            Err(why) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {}\n", why.join("; ")),
            ),
        },
        "/routes" => reply(
            StatusCode::OK,
            "application/json",
            serde_json::to_string_pretty(&admin.view.status()).unwrap_or_default(),
        ),
        "/" => reply(
            StatusCode::OK,
            "text/html; charset=utf-8",
            status_page(&admin.view.status()),
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

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
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
fn status_page(status: &Status) -> String {
    let mut h = String::new();
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
        if status.ready {
            r#"<span class="ok">ready</span>"#
        } else {
            r#"<span class="warn">not ready (see /readyz)</span>"#
        },
        status.uptime_seconds,
        status.routes.len(),
    );
    for r in &status.routes {
        let bad = |v: u64| if v > 0 { "bad" } else { "" };
        let _ = write!(
            h,
            r#"<div class="route"><h2>{listen}</h2><div class="spec">→ {spec} <span class="sub">({kind})</span></div>
<div class="nums"><div><b>{open}</b>open</div><div><b>{acc}</b>accepted</div><div><b>{sent}</b>sent</div><div><b>{recv}</b>received</div><div><b class="{rcls}">{refused}</b>refused</div><div><b class="{ccls}">{cf}</b>connect failures</div><div><b class="{dcls}">{de}</b>discovery errors</div></div>
"#,
            listen = esc(&r.listen),
            spec = esc(&r.spec),
            kind = esc(r.kind),
            open = r.open_connections,
            acc = r.accepted,
            sent = bytes(r.sent_bytes),
            recv = bytes(r.received_bytes),
            refused = r.refused,
            cf = r.connect_failures,
            de = r.discovery_errors,
            rcls = bad(r.refused),
            ccls = bad(r.connect_failures),
            dcls = bad(r.discovery_errors),
        );
        match &r.target {
            TargetStatus::Fixed { endpoints } => {
                if !r.discovered {
                    h.push_str(r#"<div class="warn">no backends discovered yet</div>"#);
                } else if endpoints.is_empty() {
                    h.push_str(r#"<div class="bad">discovery found no backends</div>"#);
                } else {
                    h.push_str("<table><tr><th>backend</th><th>from</th><th>priority</th><th>weight</th><th>state</th></tr>");
                    for e in endpoints {
                        let (class, mut state) = match e.state {
                            EndpointState::Up => ("ok", "up".to_string()),
                            EndpointState::Checking => ("warn", "checking".to_string()),
                            EndpointState::Down => ("bad", "down by check".to_string()),
                            EndpointState::CoolingDown => ("bad", "cooling down".to_string()),
                            EndpointState::Ejected => ("bad", "ejected".to_string()),
                            EndpointState::Failing => ("bad", "failing".to_string()),
                        };
                        if let Some(until) = e.until {
                            let left = (until - unix_now()).max(0.0).ceil();
                            state.push_str(&format!(" for {left}s more"));
                        }
                        if e.failures_in_a_row > 0 {
                            state.push_str(&format!(
                                " ({} failed connects in a row)",
                                e.failures_in_a_row
                            ));
                        }
                        if let Some(why) = &e.check_error {
                            state.push_str(&format!(": {why}"));
                        }
                        let state = esc(&state);
                        let _ = write!(
                            h,
                            r#"<tr><td class="spec">{}</td><td>{}</td><td>{}</td><td>{}</td><td class="{class}">{state}</td></tr>"#,
                            esc(&e.addr),
                            esc(e.origin.as_deref().unwrap_or("")),
                            e.priority,
                            e.weight,
                        );
                    }
                    h.push_str("</table>");
                }
            }
            TargetStatus::Omni { containers, .. } => {
                h.push_str(match r.redirect {
                    Some(RedirectState::InPlace) => {
                        r#"<div>redirect of incoming TCP: <span class="ok">in place</span></div>"#
                    }
                    Some(RedirectState::Missing) => {
                        r#"<div>redirect of incoming TCP: <span class="bad">missing</span> (see /readyz and the log)</div>"#
                    }
                    _ => r#"<div>redirect of incoming TCP: <span class="warn">not known yet</span></div>"#,
                });
                h.push_str(
                    "<table><tr><th>container</th><th>addresses</th><th>declares</th><th>discovery errors</th><th>bad declarations</th></tr>",
                );
                for c in containers {
                    let decl: Vec<String> = c
                        .declarations
                        .iter()
                        .map(|(p, s)| format!("{p} → {s}"))
                        .collect();
                    let _ = write!(
                        h,
                        "<tr><td>{}</td><td>{}</td><td class=\"spec\">{}</td><td class=\"{}\">{}</td><td class=\"bad\">{}</td></tr>",
                        esc(&c.name),
                        esc(&c.ips.join(", ")),
                        esc(&decl.join("; ")),
                        if c.discovery_errors > 0 { "bad" } else { "" },
                        c.discovery_errors,
                        esc(&c.bad_declarations.join("; ")),
                    );
                }
                h.push_str("</table>");
            }
        }
        h.push_str("</div>\n");
    }
    h.push_str(r#"<div class="sub">JSON: <a href="/routes">/routes</a> · Prometheus: <a href="/metrics">/metrics</a></div></body></html>"#);
    h
}
