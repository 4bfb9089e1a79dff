//! `ambassadord healthcheck`: one GET /readyz to the admin endpoint, for Docker's
//! HEALTHCHECK and Compose's `service_healthy` in a FROM-scratch image (no shell, no
//! curl). Synchronous and small: it runs every few seconds in its own process.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::Duration;

/// How long the whole check may take; Docker's own `--timeout` is longer.
const TIMEOUT: Duration = Duration::from_secs(3);

/// Asks the admin endpoint at `admin` whether the ambassador is ready: `Ok` with its
/// answer (`ready`), or `Err` with one line saying why not.
pub fn check(admin: SocketAddr) -> Result<String, String> {
    // An admin endpoint bound to every address is asked on loopback.
    let addr = match admin.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), admin.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), admin.port())
        }
        _ => admin,
    };
    let unreachable = |e: std::io::Error| format!("cannot reach the admin endpoint at {addr}: {e}");
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(unreachable)?;
    s.set_read_timeout(Some(TIMEOUT)).map_err(unreachable)?;
    s.set_write_timeout(Some(TIMEOUT)).map_err(unreachable)?;
    s.write_all(b"GET /readyz HTTP/1.0\r\nHost: ambassadord\r\n\r\n")
        .map_err(unreachable)?;
    let mut reply = Vec::new();
    s.take(64 * 1024)
        .read_to_end(&mut reply)
        .map_err(unreachable)?;
    let reply = String::from_utf8_lossy(&reply);
    let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
    let status = head.split(' ').nth(1).unwrap_or("");
    let body = crate::logsafe::bounded(body.trim(), 300);
    match status {
        "200" => Ok(body),
        "" => Err(format!("the admin endpoint at {addr} did not answer HTTP")),
        code => Err(format!("{body} (HTTP {code} from {addr}/readyz)")),
    }
}
