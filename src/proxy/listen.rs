//! Listening sockets: dual-stack by default, address reuse, a deep backlog, and one
//! socket per data thread sharing the address through SO_REUSEPORT.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;

/// Pending connections the kernel may queue before we accept them (capped by somaxconn).
const BACKLOG: i32 = 4096;

/// Binds `ip:port`; with no `ip`, every IPv4 and IPv6 address (one dual-stack socket,
/// or IPv4 alone where the host has no IPv6).
pub fn bind(ip: Option<IpAddr>, port: u16) -> io::Result<TcpListener> {
    let socket = bind_first(ip, port, false)?;
    TcpListener::from_std(socket.into())
}

/// Binds `count` listening sockets on one address (as [`bind`] chooses it), for one
/// accept loop per data thread; the kernel spreads new connections across them.
///
/// Only the first socket decides the address: it binds without SO_REUSEPORT, so an
/// address anyone else holds (another ambassadord included, whatever its options) fails
/// here with EADDRINUSE instead of silently sharing the port. SO_REUSEPORT is set on it
/// after the bind and before listen(2), so the others can join it, on the port the
/// kernel picked when `port` is 0. A process that sets SO_REUSEPORT itself, runs as the
/// same user and binds after us can still join the group: the kernel allows that.
pub fn bind_group(
    ip: Option<IpAddr>,
    port: u16,
    count: usize,
) -> io::Result<Vec<std::net::TcpListener>> {
    let shared = count > 1;
    let first = bind_first(ip, port, shared)?;
    let addr = first
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("listening socket has no IP address"))?;
    let mut group = Vec::with_capacity(count);
    group.push(first.into());
    for _ in 1..count {
        let socket = new_socket(addr)?;
        socket.set_reuse_port(true)?;
        socket.bind(&addr.into())?;
        socket.listen(BACKLOG)?;
        group.push(socket.into());
    }
    Ok(group)
}

/// Binds and listens on `ip:port`, IPv4 alone where "every address" cannot be IPv6.
fn bind_first(ip: Option<IpAddr>, port: u16, shared: bool) -> io::Result<Socket> {
    match ip {
        Some(ip) => bind_one(SocketAddr::new(ip, port), shared),
        None => match bind_one(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port), shared) {
            Err(e) if ipv6_unavailable(&e) => {
                bind_one(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port), shared)
            }
            other => other,
        },
    }
}

fn ipv6_unavailable(e: &io::Error) -> bool {
    // EAFNOSUPPORT (no IPv6 in the kernel) or EADDRNOTAVAIL (IPv6 disabled).
    matches!(e.raw_os_error(), Some(97) | Some(99))
}

fn new_socket(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // Lets a restarted ambassador bind while old connections sit in TIME_WAIT.
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        // "::" means every address, IPv4 included, whatever net.ipv6.bindv6only says.
        socket.set_only_v6(false)?;
    }
    socket.set_nonblocking(true)?;
    // Accepted sockets inherit it from the listener: one setsockopt per listener instead
    // of one per connection.
    socket.set_tcp_nodelay(true)?;
    Ok(socket)
}

fn bind_one(addr: SocketAddr, shared: bool) -> io::Result<Socket> {
    let socket = new_socket(addr)?;
    socket.bind(&addr.into())?;
    if shared {
        // After the bind, which so stayed exclusive; before listen(2), which is when
        // the kernel forms the SO_REUSEPORT group the other sockets join.
        socket.set_reuse_port(true)?;
    }
    socket.listen(BACKLOG)?;
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A group on port 0 shares one port, and the address stays closed to anyone else
    /// (a socket that binds without SO_REUSEPORT, as a second ambassadord's first does).
    #[test]
    fn a_group_shares_one_port_and_excludes_other_binders() {
        let group = bind_group(Some(Ipv4Addr::LOCALHOST.into()), 0, 3).unwrap();
        let addrs: Vec<SocketAddr> = group.iter().map(|l| l.local_addr().unwrap()).collect();
        assert_ne!(addrs[0].port(), 0);
        assert!(addrs.iter().all(|a| *a == addrs[0]), "{addrs:?}");
        let err = bind_group(Some(Ipv4Addr::LOCALHOST.into()), addrs[0].port(), 2).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");
        let err = std::net::TcpListener::bind(addrs[0]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");
    }

    /// TCP_NODELAY set on the listener is inherited by every accepted socket (so the
    /// forwarder need not set it per connection), for IPv4 and dual-stack IPv6.
    #[test]
    fn accepted_sockets_inherit_nodelay() {
        for ip in [
            IpAddr::from(Ipv4Addr::LOCALHOST),
            IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED),
        ] {
            let listener = bind_group(Some(ip), 0, 1).unwrap().remove(0);
            listener.set_nonblocking(false).unwrap();
            let port = listener.local_addr().unwrap().port();
            let _client = std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
            let (accepted, _) = listener.accept().unwrap();
            assert!(accepted.nodelay().unwrap(), "{ip}");
        }
    }
}
