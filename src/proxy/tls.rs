//! TLS on a connection: a route's acceptor (`--tls-listen`) and connector (`tls+`
//! backends), made from the configuration's [`Material`], and the stream either side of
//! a connection is once TLS may be on it.
//!
//! A PROXY protocol header is outside the TLS, as HAProxy has it (`accept-proxy ssl`,
//! `send-proxy ssl`): read before the handshake on a listener, written before it toward
//! a backend.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::{RouteTarget, TlsOptions};
use crate::endpoint::Endpoint;
use crate::spec::{Host, HostPort};
use crate::tls::{Material, TlsError};

/// What a route's connections need of TLS; `None` on a route that uses none.
pub struct RouteTls {
    /// `--tls-listen`: the handshake a client must complete first.
    pub acceptor: Option<TlsAcceptor>,
    /// Toward `tls+` backends (an omni route's declarations may ask for it).
    pub connector: Option<Connector>,
}

impl RouteTls {
    /// The route's TLS from the configuration's material (`None`: no TLS files).
    pub fn new(
        material: Option<&Material>,
        options: &TlsOptions,
        target: &RouteTarget,
    ) -> Result<Option<Arc<RouteTls>>, TlsError> {
        let Some(material) = material else {
            return Ok(None);
        };
        let acceptor = match options.listen {
            true => Some(TlsAcceptor::from(material.server(&options.allow)?)),
            false => None,
        };
        let wants_client = match target {
            RouteTarget::Spec(b) => b.tls,
            RouteTarget::Omni => true,
        };
        let connector = match (wants_client, material.client()) {
            (true, Some(config)) => Some(Connector {
                config: TlsConnector::from(config),
                name: options
                    .server_name
                    .as_deref()
                    .and_then(|n| ServerName::try_from(n.to_string()).ok()),
            }),
            _ => None,
        };
        if acceptor.is_none() && connector.is_none() {
            return Ok(None);
        }
        Ok(Some(Arc::new(RouteTls {
            acceptor,
            connector,
        })))
    }
}

/// The client side toward `tls+` backends.
pub struct Connector {
    config: TlsConnector,
    /// `tls_server_name`, checked instead of each backend's own name.
    name: Option<ServerName<'static>>,
}

impl Connector {
    /// The name `endpoint`'s certificate must be valid for: the configured one, else
    /// the host name its address came from (a static or KV `HOST:PORT`, an SRV
    /// target), else the address itself.
    pub fn server_name(&self, endpoint: &Endpoint) -> ServerName<'static> {
        if let Some(name) = &self.name {
            return name.clone();
        }
        endpoint
            .origin
            .as_deref()
            .and_then(|origin| HostPort::parse(origin).ok())
            .and_then(|hp| match hp.host {
                Host::Name(name) => ServerName::try_from(name).ok(),
                Host::Ip(_) => None,
            })
            .unwrap_or_else(|| ServerName::IpAddress(endpoint.addr.ip().into()))
    }

    /// The handshake with `endpoint` over `tcp`, which already carries anything that
    /// goes before it.
    pub async fn connect(&self, tcp: TcpStream, endpoint: &Endpoint) -> io::Result<Stream> {
        let tls = self
            .config
            .connect(self.server_name(endpoint), Prefixed::new(tcp, Vec::new()))
            .await?;
        Ok(Stream::Tls(Box::new(tls.into())))
    }
}

/// How a listener's handshake ended.
pub enum Accepted {
    Stream(Stream),
    /// The client closed without sending a byte (a port probe, a TCP health check): it
    /// failed no handshake, and is not refused.
    Closed,
    /// Why it was refused, and the reason it is counted under.
    Refused {
        reason: &'static str,
        why: String,
    },
}

/// A listener's handshake over `tcp`, of which `early` was already read (bytes that
/// followed a trusted PROXY header), all of it, the wait for the first byte included,
/// within `within` (`--connect-timeout`).
pub async fn accept(
    acceptor: &TlsAcceptor,
    tcp: TcpStream,
    early: Vec<u8>,
    within: Duration,
) -> Accepted {
    let deadline = Instant::now() + within;
    let slow = || Accepted::Refused {
        reason: "tls_handshake",
        why: format!("TLS handshake: not complete within {within:?} (--connect-timeout)"),
    };
    if early.is_empty() {
        match timeout_at(deadline, tcp.peek(&mut [0u8; 1])).await {
            Ok(Ok(0)) => return Accepted::Closed,
            Ok(_) => {}
            Err(_) => return slow(),
        }
    }
    match timeout_at(deadline, acceptor.accept(Prefixed::new(tcp, early))).await {
        Ok(Ok(tls)) => Accepted::Stream(Stream::Tls(Box::new(tls.into()))),
        Ok(Err(e)) => Accepted::Refused {
            reason: match crate::tls::not_allowed(&e) {
                true => "tls_not_allowed",
                false => "tls_handshake",
            },
            why: format!("TLS handshake: {}", crate::tls::describe(&e)),
        },
        Err(_) => slow(),
    }
}

/// One side of a connection: its TCP socket, or TLS over it.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::TlsStream<Prefixed>>),
}

impl Stream {
    /// The socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(tcp) => tcp,
            Stream::Tls(tls) => &tls.get_ref().0.tcp,
        }
    }

    /// The names in the certificate the peer presented (a client's on a
    /// `--tls-listen` route), for the access log.
    pub fn peer_names(&self) -> Option<String> {
        let Stream::Tls(tls) = self else { return None };
        let cert = tls.get_ref().1.peer_certificates()?.first()?;
        let names = crate::tls::names_of(cert.as_ref());
        Some(names)
    }
}

/// A TCP socket whose first bytes were already read: they are read again first.
pub struct Prefixed {
    early: Vec<u8>,
    taken: usize,
    tcp: TcpStream,
}

impl Prefixed {
    fn new(tcp: TcpStream, early: Vec<u8>) -> Prefixed {
        Prefixed {
            early,
            taken: 0,
            tcp,
        }
    }
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.taken < this.early.len() {
            let rest = &this.early[this.taken..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.taken += n;
            if this.taken == this.early.len() {
                this.early = Vec::new();
                this.taken = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
