//! The one HTTP/1.1 client the KV stores (etcd, Consul) talk through: resolve the
//! server, connect within one deadline, and hand back a connection whose task dies with
//! it.
//!
//! Why so small: both stores speak plain HTTP/1.1 + JSON to one server, so a pool, TLS
//! or HTTP/2 would be weight without use. The two differ only in how long they keep a
//! connection: Consul re-uses one for its blocking queries and replaces it when it
//! fails; etcd opens one per request, because a watch is a response that never ends.
//! Either way the connection is made by the same rules:
//! - the server's name goes through the project's resolver (`--dns` applies, and never
//!   libc), and the addresses are tried in turn, IPv4 first as the resolver sorts them;
//! - one deadline ([`CONNECT_TIMEOUT`]) covers the whole attempt, the lookup included,
//!   so a name with several dead addresses costs that once, not once per address;
//! - TCP_NODELAY, since each request is small and waits for its reply, and TCP
//!   keepalive, since a watch or blocking query is idle between changes and only
//!   keepalive notices a server that vanished without closing (a dead host, a
//!   partition), within about half a minute;
//! - the task driving the connection is aborted when the [`Connection`] is dropped, so
//!   dropping it closes the socket even while a response body is still held.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::http1;
use hyper::header::{HOST, HeaderValue};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};
use tokio_util::task::AbortOnDropHandle;

use super::dns::{LookupError, Resolver};
use crate::spec::{Host, HostPort};

/// Resolving the server's name and connecting to one of its addresses may take this
/// long in all.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const KEEPALIVE_IDLE: Duration = Duration::from_secs(15);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_RETRIES: u32 = 3;

/// A request body: the stores' requests are a JSON document or nothing.
pub type Body = Full<Bytes>;

/// Where a store is and how to find it; cheap to clone.
#[derive(Clone)]
pub struct Http {
    server: HostPort,
    resolver: Resolver,
    /// `HOST:PORT` as the spec gives it, sent as every request's Host.
    host: HeaderValue,
}

impl Http {
    pub fn new(server: HostPort, resolver: Resolver) -> Self {
        // The spec grammar admits only letters, digits, '-', '_', '.', ':' and brackets.
        let host = HeaderValue::try_from(server.to_string())
            .expect("a parsed HOST:PORT is a valid header value");
        Http {
            server,
            resolver,
            host,
        }
    }

    /// Opens a new connection to the server.
    pub async fn connect(&self) -> Result<Connection, ConnectError> {
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        let ips = match &self.server.host {
            Host::Ip(ip) => vec![*ip],
            Host::Name(name) => {
                timeout_at(deadline, self.resolver.lookup_ip(name))
                    .await
                    .map_err(|_| ConnectError::TimedOut {
                        failed: Vec::new(),
                        limit: CONNECT_TIMEOUT,
                    })??
                    .addrs
            }
        };
        if ips.is_empty() {
            return Err(ConnectError::NoAddress {
                server: self.server.to_string(),
            });
        }
        let addrs: Vec<SocketAddr> = ips
            .into_iter()
            .map(|ip| SocketAddr::new(ip, self.server.port))
            .collect();
        let (stream, addr) = connect_any(&addrs, deadline).await?;
        configure(&stream);
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|error| ConnectError::Handshake { addr, error })?;
        let task = AbortOnDropHandle::new(tokio::spawn(async move {
            let _ = conn.await;
        }));
        Ok(Connection {
            sender,
            host: self.host.clone(),
            _task: task,
        })
    }
}

/// Tries each address in turn until one accepts or `deadline` passes.
async fn connect_any(
    addrs: &[SocketAddr],
    deadline: Instant,
) -> Result<(TcpStream, SocketAddr), ConnectError> {
    let mut failed = Vec::new();
    for &addr in addrs {
        match timeout_at(deadline, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => return Ok((stream, addr)),
            Ok(Err(error)) => failed.push(AddrError { addr, error }),
            Err(_) => {
                return Err(ConnectError::TimedOut {
                    failed,
                    limit: CONNECT_TIMEOUT,
                });
            }
        }
    }
    Err(ConnectError::Failed(failed))
}

/// Socket options for a store connection. Best effort: a socket that refuses one still
/// works, only less promptly.
fn configure(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    let _ = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive);
}

/// One HTTP/1.1 connection, good for one request at a time; dropping it closes it.
pub struct Connection {
    sender: http1::SendRequest<Body>,
    host: HeaderValue,
    _task: AbortOnDropHandle<()>,
}

impl Connection {
    /// True once the server closed the connection or it failed: it takes no more
    /// requests.
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }

    /// Waits until the connection can take a request (the previous reply fully read);
    /// fails if it was lost meanwhile.
    pub async fn ready(&mut self) -> Result<(), hyper::Error> {
        self.sender.ready().await
    }

    /// Sends `request` (with the server as its Host unless it has one) and returns the
    /// reply's head; its body streams from this connection, so keep both while reading.
    pub async fn send_request(
        &mut self,
        mut request: Request<Body>,
    ) -> Result<Response<Incoming>, hyper::Error> {
        request
            .headers_mut()
            .entry(HOST)
            .or_insert_with(|| self.host.clone());
        self.sender.send_request(request).await
    }
}

/// No connection to the store could be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The server's name did not resolve (boxed: hickory's error is large, and every
    /// store error carries this one).
    #[error(transparent)]
    Lookup(Box<LookupError>),
    /// The server's name resolved, but to no address.
    #[error("'{server}' resolved to no address")]
    NoAddress { server: String },
    /// Every address failed before the deadline (refused, unreachable).
    #[error("{}", joined(.0))]
    Failed(Vec<AddrError>),
    /// The deadline passed; `failed` are the addresses that failed before it did.
    #[error("{}no connection within {limit:?}", earlier(failed))]
    TimedOut {
        failed: Vec<AddrError>,
        limit: Duration,
    },
    /// Connected, but hyper would not start HTTP/1.1 on the socket.
    #[error("HTTP handshake with {addr} failed: {error}")]
    Handshake {
        addr: SocketAddr,
        error: hyper::Error,
    },
}

impl From<LookupError> for ConnectError {
    fn from(e: LookupError) -> Self {
        ConnectError::Lookup(Box::new(e))
    }
}

/// One address that did not accept the connection.
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to {addr}: {error}")]
pub struct AddrError {
    pub addr: SocketAddr,
    pub error: io::Error,
}

fn joined(failed: &[AddrError]) -> String {
    let texts: Vec<String> = failed.iter().map(ToString::to_string).collect();
    texts.join("; ")
}

fn earlier(failed: &[AddrError]) -> String {
    match failed {
        [] => String::new(),
        _ => format!("{}; ", joined(failed)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A loopback address that never completes a connection: a listener with a backlog
    /// of one, filled by a connection nobody accepts, drops every further SYN.
    fn unanswering() -> (socket2::Socket, std::net::TcpStream, SocketAddr) {
        use socket2::{Domain, Socket, Type};
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        socket
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        socket.listen(0).unwrap();
        let addr = socket.local_addr().unwrap().as_socket().unwrap();
        let filler = std::net::TcpStream::connect(addr).unwrap();
        (socket, filler, addr)
    }

    /// A loopback address that refuses at once: a port that was just free.
    fn refusing() -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    }

    fn http_to(addr: SocketAddr) -> Http {
        let server = HostPort::parse(&addr.to_string()).unwrap();
        Http::new(server, Resolver::from_system())
    }

    /// Three addresses that never answer cost one CONNECT_TIMEOUT in all, not one each
    /// (the clock is paused, so this reads the deadline, not a stopwatch).
    #[tokio::test(start_paused = true)]
    async fn one_deadline_covers_every_address() {
        let held: Vec<_> = (0..3).map(|_| unanswering()).collect();
        let addrs: Vec<SocketAddr> = held.iter().map(|(_, _, a)| *a).collect();
        let start = Instant::now();
        let e = connect_any(&addrs, start + CONNECT_TIMEOUT)
            .await
            .unwrap_err();
        assert_eq!(Instant::now() - start, CONNECT_TIMEOUT);
        assert!(
            matches!(&e, ConnectError::TimedOut { failed, .. } if failed.is_empty()),
            "{e:?}"
        );
        assert_eq!(e.to_string(), "no connection within 5s");
    }

    /// A refusing address is named and the next one is tried; when all refuse, each is
    /// named in the order tried.
    #[tokio::test]
    async fn refused_addresses_are_named_and_skipped() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let good = listener.local_addr().unwrap();
        let (bad1, bad2) = (refusing(), refusing());
        let far = Instant::now() + Duration::from_secs(3600);
        let (_, used) = connect_any(&[bad1, good], far).await.unwrap();
        assert_eq!(used, good);

        let e = connect_any(&[bad1, bad2], far).await.unwrap_err();
        let text = e.to_string();
        let parts: Vec<&str> = text.split("; ").collect();
        assert_eq!(parts.len(), 2, "{text}");
        assert!(parts[0].starts_with(&format!("cannot connect to {bad1}: ")));
        assert!(parts[1].starts_with(&format!("cannot connect to {bad2}: ")));
    }

    #[tokio::test]
    async fn sockets_get_nodelay_and_keepalive() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        configure(&stream);
        let sock = socket2::SockRef::from(&stream);
        assert!(sock.tcp_nodelay().unwrap());
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
        assert_eq!(sock.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
        assert_eq!(sock.tcp_keepalive_retries().unwrap(), KEEPALIVE_RETRIES);
    }

    /// Requests carry the server as their Host, and a dropped connection is closed
    /// even while the reply's body is still held and streaming: without the abort,
    /// hyper's task would keep the socket open for the body's sake.
    #[tokio::test]
    async fn dropping_a_connection_closes_it_mid_reply() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).await.unwrap();
            let head = String::from_utf8_lossy(&buf[..n]).to_lowercase();
            // An endless chunked body: the reply is never complete.
            s.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
                .await
                .unwrap();
            let closed = s.read(&mut buf).await.map(|n| n == 0).unwrap_or(true);
            (head, closed)
        });
        let mut conn = http_to(addr).connect().await.unwrap();
        let reply = conn
            .send_request(Request::get("/").body(Body::default()).unwrap())
            .await
            .unwrap();
        drop(conn);
        let (head, closed) = tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the socket stayed open after the connection was dropped")
            .unwrap();
        assert!(head.contains(&format!("host: {addr}\r\n")), "{head}");
        assert!(closed);
        drop(reply);
    }
}
