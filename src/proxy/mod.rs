//! The data path: listeners, the accept loop, and one task per connection that picks a
//! backend, connects with failover, and copies both ways.
//!
//! The accept loop only accepts and spawns; everything else (balancing, connecting,
//! logging) happens in the connection's own task, so a slow backend or a discovery
//! outage never delays the next accept.

pub mod balance;
pub mod copy;
pub mod listen;
pub mod omni;
#[cfg(target_os = "linux")]
pub mod splice;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep, timeout};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::config::{Config, RouteTarget, Settings};
use crate::discovery::Discovery;
use crate::docker::index::ContainerIndex;
use crate::endpoint::Endpoint;
use balance::Balancer;
use omni::Omni;

/// A failure that stops the ambassador from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Docker(String),
}

/// One listening address and where its connections go.
struct Route {
    listen: SocketAddr,
    target: Target,
}

enum Target {
    /// Standard mode: every connection goes to one spec's backends.
    Fixed(Arc<Balancer>),
    /// Omni mode: each connection goes where its container declares.
    Omni(Arc<Omni>),
}

/// Bound listeners with their routes, ready to serve.
pub struct Server {
    listeners: Vec<(TcpListener, Arc<Route>)>,
    settings: Arc<Settings>,
    discovery_stop: CancellationToken,
}

impl Server {
    /// Binds every route's listener and starts its discovery. Fails if any listener
    /// cannot be bound or the Docker host is malformed.
    pub async fn bind(config: Config) -> Result<Server, StartError> {
        let discovery = Arc::new(Discovery::new(config.dns));
        let discovery_stop = CancellationToken::new();
        let mut listeners = Vec::with_capacity(config.routes.len());
        for route in config.routes {
            let bind_error = |source| StartError::Bind {
                addr: route.listen.to_string(),
                source,
            };
            let listener = listen::bind(route.listen.ip, route.listen.port).map_err(bind_error)?;
            let local = listener.local_addr().map_err(bind_error)?;
            let (target, kind) = match &route.target {
                RouteTarget::Spec(spec) => {
                    let endpoints = discovery.spawn(spec, discovery_stop.child_token());
                    let balancer = Balancer::new(spec.to_string(), endpoints);
                    (Target::Fixed(Arc::new(balancer)), spec.kind())
                }
                RouteTarget::Omni => {
                    let index = ContainerIndex::new(Some(&config.docker_host))
                        .map_err(StartError::Docker)?;
                    let omni = Omni::start(index, discovery.clone(), discovery_stop.child_token());
                    (Target::Omni(omni), "omni")
                }
            };
            info!(listen = %local, backend = %route.target, kind, "listening");
            listeners.push((
                listener,
                Arc::new(Route {
                    listen: local,
                    target,
                }),
            ));
        }
        Ok(Server {
            listeners,
            settings: Arc::new(config.settings),
            discovery_stop,
        })
    }

    /// The addresses actually bound (useful with port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().map(|(_, r)| r.listen).collect()
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets open connections
    /// drain for the grace period, and ends the ones still open.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let stop_accepting = CancellationToken::new();
        let force_close = CancellationToken::new();
        let connections = TaskTracker::new();
        let mut accept_loops = JoinSet::new();
        for (listener, route) in self.listeners {
            accept_loops.spawn(accept_loop(
                listener,
                route,
                self.settings.clone(),
                stop_accepting.clone(),
                force_close.clone(),
                connections.clone(),
            ));
        }
        shutdown.await;

        // Dropping the listeners makes new connection attempts fail at once.
        stop_accepting.cancel();
        while accept_loops.join_next().await.is_some() {}
        connections.close();
        let grace = self.settings.shutdown_grace;
        info!(open = connections.len(), grace = ?grace, "stopped accepting; draining open connections");
        if timeout(grace, connections.wait()).await.is_err() {
            warn!(
                open = connections.len(),
                "grace period over; closing the connections still open"
            );
            force_close.cancel();
            connections.wait().await;
        }
        self.discovery_stop.cancel();
        info!("stopped");
    }
}

async fn accept_loop(
    listener: TcpListener,
    route: Arc<Route>,
    settings: Arc<Settings>,
    stop: CancellationToken,
    force_close: CancellationToken,
    connections: TaskTracker,
) {
    let mut backoff = Duration::ZERO;
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((client, peer)) => {
                backoff = Duration::ZERO;
                connections.spawn(serve(
                    client,
                    peer,
                    route.clone(),
                    settings.clone(),
                    force_close.clone(),
                ));
            }
            // The client gave up before we accepted it: nothing to do.
            Err(e) if is_per_connection(&e) => debug!(error = %e, "accept: connection aborted"),
            // Out of file descriptors or memory: wait for connections to close, never exit.
            Err(e) => {
                backoff = (backoff * 2).clamp(Duration::from_millis(5), Duration::from_secs(1));
                error!(listen = %route.listen, error = %e, retry_in = ?backoff, "accept failed");
                tokio::select! {
                    _ = stop.cancelled() => return,
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

/// Serves one client connection from start to finish, and logs it once.
async fn serve(
    client: TcpStream,
    peer: SocketAddr,
    route: Arc<Route>,
    settings: Arc<Settings>,
    force_close: CancellationToken,
) {
    let start = Instant::now();
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    let _ = client.set_nodelay(true);

    let refused = |reason: &str, route_label: &str| {
        error!(listen = %route.listen, client = %peer, route = route_label,
            duration_ms = start.elapsed().as_millis() as u64, "connection refused: {reason}");
    };
    let (balancer, label) = match &route.target {
        Target::Fixed(balancer) => (balancer.clone(), None),
        Target::Omni(omni) => {
            let routed = tokio::select! {
                r = omni.route(&client, peer.ip()) => r,
                _ = force_close.cancelled() => return,
            };
            match routed {
                Ok(r) => (r.balancer, Some(r.label)),
                Err(reason) => return refused(&reason, "omni"),
            }
        }
    };
    let label = label.as_deref().unwrap_or(balancer.name());

    let (backend, endpoint) = tokio::select! {
        r = connect(&balancer, &settings) => match r {
            Ok(pair) => pair,
            Err(reason) => return refused(&reason, label),
        },
        _ = force_close.cancelled() => return,
    };

    let t = copy::pipe_with(
        settings.copy,
        &client,
        &backend,
        settings.idle_timeout,
        &force_close,
    )
    .await;
    let duration_ms = start.elapsed().as_millis() as u64;
    match t.close.error() {
        None => info!(listen = %route.listen, client = %peer, route = label, backend = %endpoint,
            sent = t.sent, received = t.received, duration_ms, close = %t.close, "connection closed"),
        Some(error) => {
            warn!(listen = %route.listen, client = %peer, route = label, backend = %endpoint,
            sent = t.sent, received = t.received, duration_ms, close = %t.close, error = %error,
            "connection closed")
        }
    }
}

/// Connects to the first endpoint in the balancer's order that accepts, trying each
/// once. The error says why none could be used.
async fn connect(
    balancer: &Balancer,
    settings: &Settings,
) -> Result<(TcpStream, Endpoint), String> {
    let plan = balancer
        .plan_when_discovered(settings.connect_timeout)
        .await
        .map_err(|reason| reason.to_string())?;
    let mut failures = Vec::with_capacity(plan.len());
    for endpoint in plan.iter() {
        match timeout(settings.connect_timeout, TcpStream::connect(endpoint.addr)).await {
            Ok(Ok(stream)) => {
                balancer.connect_succeeded(endpoint.addr);
                let _ = stream.set_nodelay(true);
                return Ok((stream, endpoint.clone()));
            }
            Ok(Err(e)) => {
                debug!(backend = %endpoint, error = %e, "connect failed; trying the next backend");
                failures.push(format!("{endpoint}: {e}"));
            }
            Err(_) => {
                debug!(backend = %endpoint, timeout = ?settings.connect_timeout, "connect timed out; trying the next backend");
                failures.push(format!(
                    "{endpoint}: connect timed out after {:?}",
                    settings.connect_timeout
                ));
            }
        }
        balancer.connect_failed(endpoint.addr);
    }
    Err(format!("every backend failed: {}", failures.join("; ")))
}
