//! The admin endpoint from a test's side: one HTTP/1.0 GET (so the reply is neither
//! chunked nor kept alive) and reading samples out of a Prometheus text exposition.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use super::DEADLINE;

/// `GET path` on the admin endpoint: the status code and body, or `None` when it cannot
/// be reached or does not answer HTTP.
pub fn get(admin: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&admin, DEADLINE).ok()?;
    s.set_read_timeout(Some(DEADLINE)).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: admin\r\n\r\n").as_bytes())
        .ok()?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).ok()?;
    let (head, body) = reply.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

/// The body of `GET path`, which must answer 200.
pub fn get_ok(admin: SocketAddr, path: &str) -> String {
    match get(admin, path) {
        Some((200, body)) => body,
        other => panic!("GET {path} on the admin endpoint {admin}: {other:?}"),
    }
}

/// The value of one sample (`name{labels}`) in a Prometheus text exposition.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// The value of one series (`name{labels}`) on the admin endpoint's `/metrics` now, 0
/// when it has no sample yet.
pub fn metric(admin: SocketAddr, series: &str) -> f64 {
    sample(&get_ok(admin, "/metrics"), series).unwrap_or(0.0)
}

/// Connections the route listening on `route` refused for `reason`, now.
pub fn refused(admin: SocketAddr, route: SocketAddr, reason: &str) -> f64 {
    metric(
        admin,
        &format!("ambassadord_connections_refused_total{{route=\"{route}\",reason=\"{reason}\"}}"),
    )
}

/// The `/routes` entry of the endpoint `backend` (an address), in whichever route has
/// it; fails the test when none does.
pub fn endpoint(admin: SocketAddr, backend: &str) -> serde_json::Value {
    let routes: serde_json::Value =
        serde_json::from_str(&get_ok(admin, "/routes")).expect("/routes is JSON");
    routes["routes"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|r| r["endpoints"].as_array().cloned().unwrap_or_default())
        .find(|e| e["addr"] == backend)
        .unwrap_or_else(|| panic!("{backend} not in /routes: {routes}"))
}

/// The sum of every sample whose series starts with `prefix`.
pub fn sum(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
