//! The forwarder: accept, then in each connection's own task pick a backend, connect
//! with failover, copy both ways, and log the outcome once.
//!
//! The accept loop only accepts and spawns; everything else (balancing, connecting,
//! logging) happens in the connection's task, so a slow backend or a discovery outage
//! never delays the next accept. Each loop runs on one data thread, accepting on that
//! thread's socket of the route; the connection's task runs on the same thread.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::{Instant, sleep, timeout};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use super::balance::{Balancer, NoBackend};
use super::route::{Route, Target};
use super::tls::{self, Accepted, Connector, Stream};
use super::{copy, header, limit};
use crate::config::Settings;
use crate::endpoint::Endpoint;
use crate::metrics::RouteMetrics;
use crate::proxy_protocol::{self, Version};

/// The access log's own target, so `--log-level info,ambassadord::access=off` silences
/// the per-connection lines and nothing else.
pub const ACCESS: &str = "ambassadord::access";

/// How long accepts must go without failing before the accept backoff starts again from
/// its first step.
const ACCEPT_CALM: Duration = Duration::from_secs(1);

/// What a connection task needs besides its sockets.
#[derive(Clone)]
pub struct Shared {
    /// The settings current when a connection is accepted are the ones it keeps.
    pub settings: watch::Receiver<Arc<Settings>>,
    /// Fired when the server stops accepting (shutdown).
    pub stop: CancellationToken,
    /// Fired when the shutdown grace period ends: open connections are closed.
    pub force_close: CancellationToken,
    pub connections: TaskTracker,
}

/// Accepts on one of a route's sockets, on the data thread it runs on; each connection's
/// task is spawned on the same thread.
pub async fn accept_loop(listener: std::net::TcpListener, route: Arc<Route>, shared: Shared) {
    // Registered here, with this thread's runtime, not the one that bound it.
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            error!(listen = %route.listen, error = %e, "cannot accept on a listening socket");
            return;
        }
    };
    let mut backoff = Duration::ZERO;
    let mut last_failure: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            _ = shared.stop.cancelled() => return,
            _ = route.stop_accepting.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((client, peer)) => {
                // Out of descriptors, one accept can still succeed between failures
                // (a refused connection freed one): only a quiet second ends the backoff,
                // so a lasting shortage is retried (and logged) ever more slowly.
                if last_failure.is_some_and(|at| at.elapsed() >= ACCEPT_CALM) {
                    backoff = Duration::ZERO;
                    last_failure = None;
                }
                let settings = shared.settings.borrow().clone();
                shared.connections.spawn(serve(
                    client,
                    peer,
                    route.clone(),
                    settings,
                    shared.force_close.clone(),
                ));
            }
            // The client gave up before we accepted it: nothing to do.
            Err(e) if is_per_connection(&e) => debug!(error = %e, "accept: connection aborted"),
            // Out of file descriptors or memory: wait for connections to close, never exit.
            Err(e) => {
                last_failure = Some(Instant::now());
                backoff = (backoff * 2).clamp(Duration::from_millis(5), Duration::from_secs(1));
                error!(listen = %route.listen, error = %e, retry_in = ?backoff, "accept failed");
                tokio::select! {
                    _ = shared.stop.cancelled() => return,
                    _ = route.stop_accepting.cancelled() => return,
                    _ = sleep(backoff) => {}
                }
            }
        }
    }
}

fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

/// Why a connection got no backend.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("{0}")]
    NoBackend(NoBackend),
    /// Every endpoint in the plan was tried once and failed; one reason each.
    #[error("every backend failed: {}", .0.join("; "))]
    AllFailed(Vec<String>),
    /// This process could not open a socket (out of descriptors, buffers or local
    /// ports): no backend is at fault, and none is put in cool-down.
    #[error(
        "cannot connect to {backend}: {error} (this process is out of descriptors, memory or local ports; the backend is not at fault)"
    )]
    LocalResources { backend: Endpoint, error: io::Error },
}

/// Whether a connect failed for want of this process's own resources rather than
/// anything the backend did.
fn is_local_resource(e: &io::Error) -> bool {
    // EMFILE, ENFILE, ENOBUFS, ENOMEM, EADDRNOTAVAIL
    matches!(e.raw_os_error(), Some(24 | 23 | 105 | 12 | 99))
}

/// Serves one client connection from start to finish, and logs it once: the access log
/// line has the same fields whether the connection was forwarded or refused.
async fn serve(
    client: TcpStream,
    peer: SocketAddr,
    route: Arc<Route>,
    settings: Arc<Settings>,
    force_close: CancellationToken,
) {
    let start = Instant::now();
    let peer = canonical(peer);
    // TCP_NODELAY: inherited from the listener (src/proxy/listen.rs).
    let metrics = &route.metrics;
    // Taken once: a reload that changes the route affects only later connections.
    let active = route.active();
    // Omni's own redirect probe (src/redirect.rs) proves the table by arriving; it is
    // no client, so it is neither counted nor logged. Only loopback peers can be one.
    if let Target::Omni(_) = &active.target
        && peer.ip().is_loopback()
        && super::omni::original_dst(&client, peer.ip())
            .is_ok_and(|dst| crate::redirect::is_probe(peer.ip(), dst.port()))
    {
        return;
    }
    let _open = metrics.accepted();
    let options = &active.options;
    // What the route is called in a refusal made before a backend is chosen.
    let route_name = match &active.target {
        Target::Fixed(balancer) => balancer.name(),
        Target::Omni(_) => "omni",
    };
    // Who the client is: the peer, or what a trusted upstream's header says.
    let mut client_addr = peer;
    let mut via = None;
    let refused = |reason: &'static str,
                   why: &dyn std::fmt::Display,
                   label: &str,
                   (client, via): (SocketAddr, Option<SocketAddr>)| {
        metrics.refused(reason);
        error!(target: ACCESS, listen = %route.listen, client = %client, route = label, backend = %"-",
            sent = 0u64, received = 0u64, duration_ms = start.elapsed().as_millis() as u64,
            close = %"refused", error = %why, via = via.map(tracing::field::display), "connection refused");
    };
    let _route_slot = match options.max_connections {
        None => None,
        Some(max) => match limit::take(&route.slots, max) {
            Some(slot) => Some(slot),
            None => {
                let why =
                    format!("the route has its limit of {max} connections open (max_connections)");
                return refused("max_connections", &why, route_name, (peer, None));
            }
        },
    };
    // Client bytes for the backend ahead of the copy: what followed a trusted header,
    // or what had arrived when the backend connected (sent with our header, in one write).
    let mut first = Vec::new();
    let mut to: Option<SocketAddr> = None;
    if options.trusts(peer.ip()) {
        let read = tokio::select! {
            r = header::read(&client, &mut first) => r,
            _ = force_close.cancelled() => return,
        };
        match read {
            Ok(Some(addrs)) => {
                client_addr = canonical(addrs.source);
                to = Some(addrs.destination);
                via = Some(peer);
            }
            Ok(None) => {}
            Err(why) => return refused("proxy_header", &why, route_name, (peer, None)),
        }
    }

    // TLS on the listener: after a trusted PROXY header (outside the TLS, as HAProxy
    // has it), before anything is routed. Bytes that followed the header are the
    // handshake's.
    let route_tls = active.tls.clone();
    let client = match route_tls.as_ref().and_then(|t| t.acceptor.as_ref()) {
        None => Stream::Plain(client),
        Some(acceptor) => {
            let early = std::mem::take(&mut first);
            let done = tokio::select! {
                r = tls::accept(acceptor, client, early, settings.connect_timeout) => r,
                _ = force_close.cancelled() => return,
            };
            match done {
                Accepted::Stream(stream) => stream,
                Accepted::Closed => {
                    info!(target: ACCESS, listen = %route.listen, client = %client_addr, route = route_name,
                        backend = %"-", sent = 0u64, received = 0u64,
                        duration_ms = start.elapsed().as_millis() as u64, close = %"client_closed",
                        via = via.map(tracing::field::display), "connection closed before a TLS handshake");
                    return;
                }
                Accepted::Refused { reason, why } => {
                    return refused(reason, &why, route_name, (client_addr, via));
                }
            }
        }
    };
    let tls_peer = client.peer_names();

    let (balancer, label, omni) = match &active.target {
        Target::Fixed(balancer) => (balancer.clone(), None, None),
        Target::Omni(omni) => {
            // Boxed: the lookup may call the Engine API, and that future is large; inline,
            // it would enlarge every connection's task, idle ones included.
            let routed = tokio::select! {
                r = Box::pin(omni.route(client.tcp(), peer.ip())) => r,
                _ = force_close.cancelled() => return,
            };
            match routed {
                Ok(r) => (
                    r.balancer,
                    Some(r.label),
                    Some((r.to, r.proxy_protocol, r.slot, r.tls)),
                ),
                Err(reason) => {
                    let key = reason.refusal();
                    if key == "no_backend" {
                        metrics.connect_failed(None, "no_backend");
                    }
                    return refused(key, &reason, route_name, (peer, None));
                }
            }
        }
    };
    let label = label.as_deref().unwrap_or(balancer.name());
    // Omni: the container's own declaration may set the header and TLS, and holds
    // its slot.
    let (proxy_protocol, _declared_slot, declared_tls) = match omni {
        Some((dst, declared, slot, tls)) => {
            to = Some(dst);
            (declared.unwrap_or(options.proxy_protocol), slot, Some(tls))
        }
        None => (options.proxy_protocol, None, None),
    };
    // A standard route has a connector exactly when its backend is tls+; an omni
    // route has one for the declarations that ask (given --tls-ca).
    let connector = route_tls.as_ref().and_then(|t| t.connector.as_ref());
    let connector = match declared_tls {
        None => connector,
        Some(false) => None,
        Some(true) if connector.is_some() => connector,
        Some(true) => {
            let why = "the backend is tls+ but this ambassador has no --tls-ca to check its certificate against";
            metrics.connect_failed(None, "no_backend");
            return refused("no_backend", &why, label, (client_addr, via));
        }
    };

    // Where the client connected, for our header: known without a system call unless
    // the route listens on every address.
    let header = (proxy_protocol != Version::Off).then(|| {
        let destination = match to {
            Some(dst) => Ok(dst),
            None if !route.listen.ip().is_unspecified() => Ok(route.listen),
            None => client.tcp().local_addr().map(canonical),
        };
        let addrs = proxy_protocol::Addresses {
            source: client_addr,
            destination: destination.unwrap_or(SocketAddr::new(peer.ip(), 0)),
        };
        (proxy_protocol, addrs)
    });
    // Both sides plain: the header goes with the client's first bytes, after the
    // connect. With TLS on either side, the header goes before the backend's
    // handshake, and client bytes only ever through the copy.
    let plain = connector.is_none() && matches!(client, Stream::Plain(_));
    let mut preamble = Vec::new();
    if !plain && let Some((version, addrs)) = &header {
        proxy_protocol::encode(*version, addrs, &mut preamble);
    }

    let (mut backend, endpoint) = tokio::select! {
        r = connect(&balancer, &settings, metrics, connector, &preamble) => match r {
            Ok(pair) => pair,
            Err(reason) => return refused("no_backend", &reason, label, (client_addr, via)),
        },
        _ = force_close.cancelled() => return,
    };
    drop(active);

    // Hold the shared series (one pointer) across the transfer, not labels of its own:
    // what an open connection keeps alive is what idle connections cost in memory.
    let series = metrics.backend(endpoint.addr);
    series.active.inc();
    let ahead = if plain && (header.is_some() || !first.is_empty()) {
        tokio::select! {
            r = header::send_ahead(backend.tcp(), client.tcp(), header, first) => r,
            _ = force_close.cancelled() => Err(io::ErrorKind::ConnectionAborted.into()),
        }
    } else if !first.is_empty() {
        // Bytes that followed a trusted header, toward a TLS backend.
        use tokio::io::AsyncWriteExt;
        let len = first.len();
        let write = async {
            backend.write_all(&first).await?;
            backend.flush().await
        };
        tokio::select! {
            r = write => r.map(|()| len),
            _ = force_close.cancelled() => Err(io::ErrorKind::ConnectionAborted.into()),
        }
    } else {
        Ok(0) // the usual case: nothing goes ahead of the copy
    };
    let early = match ahead {
        Ok(n) => n as u64,
        Err(e) => {
            series.active.dec();
            series.finished("backend_error");
            warn!(target: ACCESS, listen = %route.listen, client = %client_addr, route = label, backend = %endpoint,
                sent = 0u64, received = 0u64, duration_ms = start.elapsed().as_millis() as u64,
                close = %"backend_error", error = %e, via = via.map(tracing::field::display),
                "connection aborted");
            return;
        }
    };
    series.sent.inc_by(early);
    let mut client = client;
    let live = (Some(&series.sent), Some(&series.received));
    let t = if plain {
        copy::pipe_with(
            settings.copy,
            client.tcp(),
            backend.tcp(),
            settings.idle_timeout,
            &force_close,
            live,
        )
        .await
    } else {
        copy::pipe_streams(
            &mut client,
            &mut backend,
            settings.idle_timeout,
            &force_close,
            live,
        )
        .await
    };
    series.active.dec();
    series.finished(t.close.as_str());
    // An abort is passed on as an abort: a side that failed (a reset, most often) gets
    // the other side reset too (SO_LINGER 0 makes the close send RST), so a protocol that
    // ends a message with EOF never takes a truncated one as complete.
    let reset = match t.close {
        copy::Close::ClientError(_) => Some(("backend", backend.tcp())),
        copy::Close::BackendError(_) => Some(("client", client.tcp())),
        _ => None,
    };
    if let Some((_, socket)) = reset {
        let _ = socket2::SockRef::from(socket).set_linger(Some(Duration::ZERO));
    }
    let duration_ms = start.elapsed().as_millis() as u64;
    let sent = t.sent + early;
    let via = via.map(tracing::field::display);
    let tls_peer = tls_peer.map(|names| tracing::field::display(names.replace(", ", ",")));
    match (t.close.error(), reset) {
        (Some(kind), Some((reset, _))) => {
            let error = match &t.tls_error {
                Some(said) => format!("{kind}: {said}"),
                None => kind.to_string(),
            };
            warn!(target: ACCESS, listen = %route.listen, client = %client_addr, route = label, backend = %endpoint,
            sent, received = t.received, duration_ms, close = %t.close, error = %error, reset = %reset, via, tls_peer,
            "connection aborted")
        }
        _ => {
            info!(target: ACCESS, listen = %route.listen, client = %client_addr, route = label, backend = %endpoint,
            sent, received = t.received, duration_ms, close = %t.close, via, tls_peer, "connection closed")
        }
    }
}

/// An address with an IPv4-mapped IPv6 address (a dual-stack listener's) made IPv4.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// A non-blocking connect to `addr` with TCP_NODELAY set before it. Success is read from
/// the readiness the connect's completion brings: writable without an error means
/// connected, so the socket's error is fetched (one getsockopt) only when it failed.
async fn connect_to(addr: SocketAddr) -> io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking(), None)?;
    socket.set_tcp_nodelay(true)?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(nix::errno::Errno::EINPROGRESS as i32) => {}
        Err(e) => return Err(e),
    }
    let stream = TcpStream::from_std(std::net::TcpStream::from(socket))?;
    let ready = stream.ready(tokio::io::Interest::WRITABLE).await?;
    if ready.is_error() || ready.is_write_closed() {
        return Err(stream
            .take_error()?
            .unwrap_or_else(|| io::Error::from(io::ErrorKind::ConnectionRefused)));
    }
    Ok(stream)
}

/// Connects to the first endpoint in the balancer's order that accepts, trying each
/// once. The error says why none could be used; each failure is counted by its reason.
/// `upstream`'s TLS (if any) over a connected socket, with `preamble` (our PROXY header,
/// when TLS is on either side) written first. The error is the reason for the failure
/// count and the words for the log.
async fn finish(
    tcp: TcpStream,
    endpoint: &Endpoint,
    upstream: Option<&Connector>,
    preamble: &[u8],
    deadline: Duration,
) -> Result<Stream, (&'static str, String)> {
    if !preamble.is_empty() {
        header::write_all(&tcp, preamble)
            .await
            .map_err(|e| ("error", format!("writing the PROXY header: {e}")))?;
    }
    let Some(connector) = upstream else {
        return Ok(Stream::Plain(tcp));
    };
    match timeout(deadline, connector.connect(tcp, endpoint)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err((
            "tls",
            format!(
                "TLS handshake (name checked: {}): {}",
                connector.server_name(endpoint).to_str(),
                crate::tls::describe(&e)
            ),
        )),
        Err(_) => Err((
            "tls",
            format!("TLS handshake: not complete within {deadline:?} (--connect-timeout)"),
        )),
    }
}

async fn connect(
    balancer: &Balancer,
    settings: &Settings,
    metrics: &RouteMetrics,
    upstream: Option<&Connector>,
    preamble: &[u8],
) -> Result<(Stream, Endpoint), ConnectError> {
    let plan = balancer
        .plan_when_discovered(settings.connect_timeout)
        .await
        .map_err(|reason| {
            metrics.connect_failed(None, "no_backend");
            ConnectError::NoBackend(reason)
        })?;
    let mut failures = Vec::with_capacity(plan.len());
    for endpoint in plan.iter() {
        match timeout(settings.connect_timeout, connect_to(endpoint.addr)).await {
            Ok(Ok(tcp)) => {
                match finish(tcp, endpoint, upstream, preamble, settings.connect_timeout).await {
                    Ok(stream) => {
                        balancer.connect_succeeded(endpoint.addr);
                        return Ok((stream, endpoint.clone()));
                    }
                    Err((reason, why)) => {
                        debug!(backend = %endpoint, error = %why, "trying the next backend");
                        metrics.connect_failed(Some(endpoint.addr), reason);
                        if balancer.connect_failed(endpoint.addr, &why, settings.eject_after) {
                            metrics.ejected(endpoint.addr);
                        }
                        failures.push(format!("{endpoint}: {why}"));
                    }
                }
            }
            Ok(Err(error)) if is_local_resource(&error) => {
                // Trying the next backend would fail the same way.
                metrics.connect_failed(None, "local_resources");
                return Err(ConnectError::LocalResources {
                    backend: endpoint.clone(),
                    error,
                });
            }
            Ok(Err(e)) => {
                debug!(backend = %endpoint, error = %e, "connect failed; trying the next backend");
                let reason = if e.kind() == io::ErrorKind::ConnectionRefused {
                    "refused"
                } else {
                    "error"
                };
                metrics.connect_failed(Some(endpoint.addr), reason);
                if balancer.connect_failed(endpoint.addr, &e, settings.eject_after) {
                    metrics.ejected(endpoint.addr);
                }
                failures.push(format!("{endpoint}: {e}"));
            }
            Err(_) => {
                debug!(backend = %endpoint, timeout = ?settings.connect_timeout, "connect timed out; trying the next backend");
                metrics.connect_failed(Some(endpoint.addr), "timeout");
                let why = format!("connect timed out after {:?}", settings.connect_timeout);
                if balancer.connect_failed(endpoint.addr, &why, settings.eject_after) {
                    metrics.ejected(endpoint.addr);
                }
                failures.push(format!("{endpoint}: {why}"));
            }
        }
    }
    Err(ConnectError::AllFailed(failures))
}
