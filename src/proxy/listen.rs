//! Listening sockets: dual-stack by default, address reuse, a deep backlog.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;

/// Pending connections the kernel may queue before we accept them (capped by somaxconn).
const BACKLOG: i32 = 4096;

/// Binds `ip:port`; with no `ip`, every IPv4 and IPv6 address (one dual-stack socket,
/// or IPv4 alone where the host has no IPv6).
pub fn bind(ip: Option<IpAddr>, port: u16) -> io::Result<TcpListener> {
    match ip {
        Some(ip) => bind_one(SocketAddr::new(ip, port)),
        None => match bind_one(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port)) {
            Err(e) if ipv6_unavailable(&e) => {
                bind_one(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port))
            }
            other => other,
        },
    }
}

fn ipv6_unavailable(e: &io::Error) -> bool {
    // EAFNOSUPPORT (no IPv6 in the kernel) or EADDRNOTAVAIL (IPv6 disabled).
    matches!(e.raw_os_error(), Some(97) | Some(99))
}

fn bind_one(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // Lets a restarted ambassador bind while old connections sit in TIME_WAIT.
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        // "::" means every address, IPv4 included, whatever net.ipv6.bindv6only says.
        socket.set_only_v6(false)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}
