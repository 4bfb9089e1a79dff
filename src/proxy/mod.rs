//! The data path: listeners, the accept loop, and one task per connection that picks a
//! backend, connects with failover, and copies both ways.
//!
//! The accept loop only accepts and spawns; everything else (balancing, connecting,
//! logging) happens in the connection's own task, so a slow backend or a discovery
//! outage never delays the next accept. Each route has one listening socket and one
//! accept loop per data thread ([`workers`]); a connection's task runs on the thread
//! that accepted it.

pub mod balance;
pub mod copy;
pub mod listen;
pub mod omni;
#[cfg(target_os = "linux")]
pub mod splice;
pub mod workers;

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, timeout};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::config::{Config, DockerHost, RouteConfig, RouteTarget, Settings};
use crate::discovery::Discovery;
use crate::docker::index::ContainerIndex;
use crate::endpoint::Endpoint;
use crate::metrics::{self, BackendLabels, CloseLabels, RouteLabels};
use balance::Balancer;
use omni::Omni;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use workers::Workers;

/// How long accepts must go without failing before the accept backoff starts again from
/// its first step.
const ACCEPT_CALM: Duration = Duration::from_secs(1);

/// How long a reload waits for a changed route's new source before switching anyway.
const SWITCH_WAIT: Duration = Duration::from_secs(5);

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
    #[error("cannot start the data threads: {0}")]
    Threads(#[source] io::Error),
}

/// One listening address and where its connections go. The target can be swapped by a
/// reload; a connection takes the target current when it is accepted and keeps it.
pub struct Route {
    pub listen: SocketAddr,
    /// The configured listen address that identifies the route across reloads (the
    /// bound address for port 0, which no reload can name again).
    key: String,
    /// `listen` as text, the `route` label of every metric.
    label: String,
    active: RwLock<Arc<Active>>,
    /// Fired when a reload removes the route: stop accepting, let connections drain.
    stop_accepting: CancellationToken,
    pub stats: RouteStats,
    series: RouteSeries,
}

/// A route's metric series, looked up once instead of per connection: a connection then
/// builds no label strings (the backend's address formatted twice, the route's label
/// cloned four times) and takes no family lock when it opens and closes.
struct RouteSeries {
    accepted: Counter,
    /// By backend address; as the families themselves, never shrinks while the route lives.
    backends: RwLock<HashMap<SocketAddr, Arc<BackendSeries>>>,
}

/// The series a connection to one backend of a route updates.
struct BackendSeries {
    labels: BackendLabels,
    active: Gauge,
    sent: Counter,
    received: Counter,
    /// `connections_finished` by close reason, each created when first used.
    finished: RwLock<Vec<(&'static str, Counter)>>,
}

impl RouteSeries {
    fn new(route: &str) -> RouteSeries {
        let accepted = metrics::global().accepted.get_or_create(&RouteLabels {
            route: route.to_string(),
        });
        RouteSeries {
            accepted: accepted.clone(),
            backends: RwLock::default(),
        }
    }
}

impl BackendSeries {
    fn finished(&self, reason: &'static str) -> Counter {
        let known = self.finished.read().unwrap_or_else(|p| p.into_inner());
        if let Some((_, c)) = known.iter().find(|(r, _)| *r == reason) {
            return c.clone();
        }
        drop(known);
        let counter = metrics::global()
            .finished
            .get_or_create(&CloseLabels {
                route: self.labels.route.clone(),
                backend: self.labels.backend.clone(),
                reason: reason.to_string(),
            })
            .clone();
        let mut known = self.finished.write().unwrap_or_else(|p| p.into_inner());
        if !known.iter().any(|(r, _)| *r == reason) {
            known.push((reason, counter.clone()));
        }
        counter
    }
}

/// Per-route totals for the status page (the Prometheus families hold the same by label).
#[derive(Default)]
pub struct RouteStats {
    pub open: AtomicU64,
    pub accepted: AtomicU64,
    pub refused: AtomicU64,
    pub sent: AtomicU64,
    pub received: AtomicU64,
    pub connect_failures: AtomicU64,
}

/// A route's current target and the discovery serving it. Dropping the last reference
/// (the route moved on and no connection is still connecting with it) stops discovery.
pub struct Active {
    pub target: Target,
    pub config: RouteTarget,
    pub kind: &'static str,
    stop: CancellationToken,
}

impl Drop for Active {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub enum Target {
    /// Standard mode: every connection goes to one spec's backends.
    Fixed(Arc<Balancer>),
    /// Omni mode: each connection goes where its container declares.
    Omni(Arc<Omni>),
}

impl Route {
    /// The metric series of connections to `backend`.
    fn backend_series(&self, backend: SocketAddr) -> Arc<BackendSeries> {
        let known = self
            .series
            .backends
            .read()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(s) = known.get(&backend) {
            return s.clone();
        }
        drop(known);
        let mut known = self
            .series
            .backends
            .write()
            .unwrap_or_else(|p| p.into_inner());
        known
            .entry(backend)
            .or_insert_with(|| {
                let m = metrics::global();
                let labels = BackendLabels {
                    route: self.label.clone(),
                    backend: backend.to_string(),
                };
                Arc::new(BackendSeries {
                    active: m.active.get_or_create(&labels).clone(),
                    sent: m.bytes_sent.get_or_create(&labels).clone(),
                    received: m.bytes_received.get_or_create(&labels).clone(),
                    finished: RwLock::default(),
                    labels,
                })
            })
            .clone()
    }

    /// The target new connections use.
    pub fn active(&self) -> Arc<Active> {
        self.active
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether its source has produced a first result.
    pub fn ready(&self) -> bool {
        match &self.active().target {
            Target::Fixed(b) => b.current().is_some(),
            Target::Omni(o) => o.index().loaded(),
        }
    }
}

/// What the admin endpoint reads: the live routes, the settings, readiness.
pub struct State {
    routes: RwLock<BTreeMap<String, Arc<Route>>>,
    settings: RwLock<Arc<Settings>>,
    /// Latched: once every route has its first result, the process stays ready.
    ready: AtomicBool,
    pub started: std::time::Instant,
}

impl State {
    pub fn routes(&self) -> Vec<Arc<Route>> {
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        routes.values().cloned().collect()
    }

    fn settings(&self) -> Arc<Settings> {
        self.settings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Listeners are bound (they are before the state exists) and every route's source
    /// has its first result. Once true, stays true.
    pub fn ready(&self) -> bool {
        if self.ready.load(Ordering::Relaxed) {
            return true;
        }
        let now = self.routes().iter().all(|r| r.ready());
        if now {
            self.ready.store(true, Ordering::Relaxed);
        }
        now
    }
}

/// Bound listeners with their routes, ready to serve.
pub struct Server {
    state: Arc<State>,
    /// Each route's listening sockets, one per data thread.
    pending: Vec<(Vec<std::net::TcpListener>, Arc<Route>)>,
    workers: Option<Workers>,
    discovery: Arc<Discovery>,
    /// Omni mode's Docker host; `None` until a route is in omni mode.
    docker_host: Option<DockerHost>,
    dns: Option<SocketAddr>,
    admin: Option<TcpListener>,
    admin_config: Option<crate::config::Admin>,
}

impl Server {
    /// Binds every route's listener (and the admin endpoint) and starts discovery.
    /// Fails if any listener cannot be bound or the Docker client refuses its host.
    pub async fn bind(config: Config) -> Result<Server, StartError> {
        let discovery = Arc::new(Discovery::new(config.dns, config.consul_token.clone()));
        let threads = config.threads.unwrap_or_else(Workers::default_count);
        let mut pending = Vec::with_capacity(config.routes.len());
        for route in &config.routes {
            let listeners = bind_route(route, threads)?;
            let route = new_route(&listeners, route, &discovery, config.docker_host.as_ref())?;
            info!(listen = %route.listen, backend = %route.active().config, kind = route.active().kind, "listening");
            pending.push((listeners, route));
        }
        let workers = Workers::start(threads).map_err(StartError::Threads)?;
        let admin = match config.admin {
            None => None,
            Some(admin) => match listen::bind(Some(admin.addr.ip()), admin.addr.port()) {
                Ok(l) => {
                    info!(admin = %l.local_addr().unwrap_or(admin.addr), "admin endpoint listening");
                    Some(l)
                }
                Err(e) if !admin.explicit => {
                    warn!(admin = %admin.addr, error = %e, "cannot listen for the admin endpoint; running without it (set --admin to another address or off)");
                    None
                }
                Err(source) => {
                    return Err(StartError::Bind {
                        addr: format!("{} (--admin)", admin.addr),
                        source,
                    });
                }
            },
        };
        let routes = pending
            .iter()
            .map(|(_, r)| (r.key.clone(), r.clone()))
            .collect();
        Ok(Server {
            state: Arc::new(State {
                routes: RwLock::new(routes),
                settings: RwLock::new(Arc::new(config.settings)),
                ready: AtomicBool::new(false),
                started: std::time::Instant::now(),
            }),
            pending,
            workers: Some(workers),
            discovery,
            docker_host: config.docker_host,
            dns: config.dns,
            admin,
            admin_config: config.admin,
        })
    }

    /// The addresses actually bound (useful with port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.pending.iter().map(|(_, r)| r.listen).collect()
    }

    /// The admin endpoint's address, if it listens.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets open connections
    /// drain for the grace period, and ends the ones still open.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let (_keep, reloads) = mpsc::channel(1);
        self.run_with_reloads(shutdown, reloads).await
    }

    /// As [`Server::run`], and applies every configuration sent on `reloads`: new routes
    /// listen, removed ones stop accepting and drain, changed ones switch source for new
    /// connections only. A reload that cannot be applied changes nothing.
    pub async fn run_with_reloads(
        mut self,
        shutdown: impl Future<Output = ()>,
        mut reloads: mpsc::Receiver<Config>,
    ) {
        let stop_accepting = CancellationToken::new();
        let force_close = CancellationToken::new();
        let connections = TaskTracker::new();
        let accept_loops = TaskTracker::new();
        if let Some(admin) = self.admin.take() {
            tokio::spawn(crate::admin::serve(
                admin,
                self.state.clone(),
                stop_accepting.clone(),
            ));
        }
        let Some(workers) = self.workers.take() else {
            return;
        };
        // Each data thread accepts on its own socket of the route.
        let spawn_loops = |listeners: Vec<std::net::TcpListener>, route: Arc<Route>| {
            for (listener, thread) in listeners.into_iter().zip(workers.handles()) {
                let accept = accept_loop(
                    listener,
                    route.clone(),
                    self.state.clone(),
                    stop_accepting.clone(),
                    force_close.clone(),
                    connections.clone(),
                );
                accept_loops.spawn_on(accept, thread);
            }
        };
        for (listeners, route) in std::mem::take(&mut self.pending) {
            spawn_loops(listeners, route);
        }
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                Some(config) = reloads.recv() => match self.reload(config, workers.len()).await {
                    Ok(added) => {
                        for (listeners, route) in added {
                            spawn_loops(listeners, route);
                        }
                    }
                    Err(e) => error!("reload rejected, keeping the running configuration: {e}"),
                },
            }
        }

        // Dropping the listeners makes new connection attempts fail at once.
        stop_accepting.cancel();
        accept_loops.close();
        accept_loops.wait().await;
        connections.close();
        let grace = self.state.settings().shutdown_grace;
        info!(open = connections.len(), grace = ?grace, "stopped accepting; draining open connections");
        if timeout(grace, connections.wait()).await.is_err() {
            warn!(
                open = connections.len(),
                "grace period over; closing the connections still open"
            );
            force_close.cancel();
            connections.wait().await;
        }
        workers.stop().await;
        // Ends every source still running.
        self.state
            .routes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        info!("stopped");
    }

    /// Applies a new configuration; returns the listeners of new routes to start. Every
    /// new listener is bound before anything changes, so a failure changes nothing.
    async fn reload(
        &self,
        config: Config,
        threads: usize,
    ) -> Result<Vec<(Vec<std::net::TcpListener>, Arc<Route>)>, StartError> {
        // A server that started without omni routes has no Docker host: a reload that
        // adds one uses its own.
        let docker_host = self.docker_host.as_ref().or(config.docker_host.as_ref());
        if config.dns != self.dns
            || (config.docker_host.is_some() && config.docker_host.as_ref() != docker_host)
            || config.admin.map(|a| a.addr) != self.admin_config.map(|a| a.addr)
        {
            warn!("reload: dns, docker_host and admin changes take effect only after a restart");
        }
        let current: BTreeMap<String, Arc<Route>> = self
            .state
            .routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut added = Vec::new();
        for rc in config
            .routes
            .iter()
            .filter(|rc| !current.contains_key(&rc.listen.to_string()))
        {
            let listeners = bind_route(rc, threads)?;
            let route = new_route(&listeners, rc, &self.discovery, docker_host)?;
            added.push((listeners, route));
        }
        // A changed route switches once its new source has a first result (bounded), so
        // connections arriving during the switch are not refused for want of backends.
        let mut changed = Vec::new();
        for rc in &config.routes {
            if let Some(route) = current.get(&rc.listen.to_string())
                && route.active().config != rc.target
            {
                let active = new_active(&rc.target, &self.discovery, docker_host)?;
                changed.push((route.clone(), active));
            }
        }
        let first_results = futures_util::future::join_all(changed.iter().map(|(_, a)| async {
            if let Target::Fixed(b) = &a.target {
                b.discovered().await;
            }
        }));
        if timeout(SWITCH_WAIT, first_results).await.is_err() {
            warn!(wait = ?SWITCH_WAIT, "reload: a changed route's new source has no result yet; switching anyway");
        }
        // Every new listener is bound and every new source started: nothing fails now.
        for (route, active) in changed {
            info!(listen = %route.listen, from = %route.active().config, to = %active.config, "route changed; open connections keep their backend");
            *route.active.write().unwrap_or_else(|p| p.into_inner()) = active;
        }
        let mut next = BTreeMap::new();
        for rc in &config.routes {
            let key = rc.listen.to_string();
            if let Some(route) = current.get(&key) {
                next.insert(key, route.clone());
            }
        }
        for (key, route) in &current {
            if !next.contains_key(key) {
                info!(listen = %route.listen, backend = %route.active().config, open = route.stats.open.load(Ordering::Relaxed), "route removed; stopped accepting, open connections drain");
                route.stop_accepting.cancel();
            }
        }
        for (_, route) in &added {
            info!(listen = %route.listen, backend = %route.active().config, kind = route.active().kind, "listening");
            next.insert(route.key.clone(), route.clone());
        }
        *self.state.routes.write().unwrap_or_else(|p| p.into_inner()) = next;
        *self
            .state
            .settings
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Arc::new(config.settings);
        info!(routes = config.routes.len(), "configuration reloaded");
        Ok(added)
    }
}

fn bind_route(
    route: &RouteConfig,
    threads: usize,
) -> Result<Vec<std::net::TcpListener>, StartError> {
    listen::bind_group(route.listen.ip, route.listen.port, threads).map_err(|source| {
        StartError::Bind {
            addr: route.listen.to_string(),
            source,
        }
    })
}

fn new_route(
    listeners: &[std::net::TcpListener],
    rc: &RouteConfig,
    discovery: &Arc<Discovery>,
    docker_host: Option<&DockerHost>,
) -> Result<Arc<Route>, StartError> {
    let bound = listeners.first().map_or_else(
        || Err(io::Error::other("no listening socket")),
        |l| l.local_addr(),
    );
    let listen = bound.map_err(|source| StartError::Bind {
        addr: rc.listen.to_string(),
        source,
    })?;
    Ok(Arc::new(Route {
        listen,
        key: if rc.listen.port == 0 {
            listen.to_string()
        } else {
            rc.listen.to_string()
        },
        label: listen.to_string(),
        series: RouteSeries::new(&listen.to_string()),
        active: RwLock::new(new_active(&rc.target, discovery, docker_host)?),
        stop_accepting: CancellationToken::new(),
        stats: RouteStats::default(),
    }))
}

fn new_active(
    target: &RouteTarget,
    discovery: &Arc<Discovery>,
    docker_host: Option<&DockerHost>,
) -> Result<Arc<Active>, StartError> {
    let stop = CancellationToken::new();
    let (t, kind) = match target {
        RouteTarget::Spec(spec) => {
            let endpoints = discovery.spawn(spec, stop.child_token());
            let balancer = Balancer::new(spec.to_string(), endpoints);
            (Target::Fixed(Arc::new(balancer)), spec.kind())
        }
        RouteTarget::Omni => {
            // Config gives a Docker host whenever a route is in omni mode.
            let host = docker_host.ok_or_else(|| {
                StartError::Docker("omni mode needs a Docker host (--docker-host)".into())
            })?;
            let index = ContainerIndex::new(host).map_err(StartError::Docker)?;
            let omni = Omni::start(index, discovery.clone(), stop.child_token());
            (Target::Omni(omni), "omni")
        }
    };
    Ok(Arc::new(Active {
        target: t,
        config: target.clone(),
        kind,
        stop,
    }))
}

/// Accepts on one of a route's sockets, on the data thread it runs on; each connection's
/// task is spawned on the same thread.
async fn accept_loop(
    listener: std::net::TcpListener,
    route: Arc<Route>,
    state: Arc<State>,
    stop: CancellationToken,
    force_close: CancellationToken,
    connections: TaskTracker,
) {
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
            _ = stop.cancelled() => return,
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
                connections.spawn(serve(
                    client,
                    peer,
                    route.clone(),
                    state.settings(),
                    force_close.clone(),
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
                    _ = stop.cancelled() => return,
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

/// Decrements a route's open count when a connection task ends, however it ends.
struct OpenGuard<'a>(&'a AtomicU64);

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
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
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    let _ = client.set_nodelay(true);
    route.series.accepted.inc();
    route.stats.accepted.fetch_add(1, Ordering::Relaxed);
    route.stats.open.fetch_add(1, Ordering::Relaxed);
    let _open = OpenGuard(&route.stats.open);
    // Taken once: a reload that changes the route affects only later connections.
    let active = route.active();

    let refused = |reason: &str, label: &str| {
        route.stats.refused.fetch_add(1, Ordering::Relaxed);
        error!(listen = %route.listen, client = %peer, route = label, backend = %"-",
            sent = 0u64, received = 0u64, duration_ms = start.elapsed().as_millis() as u64,
            close = %"refused", error = reason, "connection refused");
    };
    let (balancer, label) = match &active.target {
        Target::Fixed(balancer) => (balancer.clone(), None),
        Target::Omni(omni) => {
            // Boxed: the lookup may call the Engine API, and that future is large; inline,
            // it would enlarge every connection's task, idle ones included.
            let routed = tokio::select! {
                r = Box::pin(omni.route(&client, peer.ip())) => r,
                _ = force_close.cancelled() => return,
            };
            match routed {
                Ok(r) => (r.balancer, Some(r.label)),
                Err(reason) => {
                    count_connect_failure(&route, String::new(), "no_backend");
                    return refused(&reason, "omni");
                }
            }
        }
    };
    let label = label.as_deref().unwrap_or(balancer.name());

    let (backend, endpoint) = tokio::select! {
        r = connect(&balancer, &settings, &route) => match r {
            Ok(pair) => pair,
            Err(reason) => return refused(&reason, label),
        },
        _ = force_close.cancelled() => return,
    };
    drop(active);

    // Hold the shared series (one pointer) across the transfer, not labels of its own:
    // what an open connection keeps alive is what idle connections cost in memory.
    let series = route.backend_series(endpoint.addr);
    series.active.inc();
    let live = |metric, total| copy::Live {
        metric: Some(metric),
        total: Some(total),
    };
    let t = copy::pipe_with(
        settings.copy,
        &client,
        &backend,
        settings.idle_timeout,
        &force_close,
        (
            live(&series.sent, &route.stats.sent),
            live(&series.received, &route.stats.received),
        ),
    )
    .await;
    series.active.dec();
    series.finished(t.close.as_str()).inc();
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
    route: &Route,
) -> Result<(TcpStream, Endpoint), String> {
    let failed = |backend: String, reason: &str| {
        route.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
        count_connect_failure(route, backend, reason);
    };
    let plan = balancer
        .plan_when_discovered(settings.connect_timeout)
        .await
        .map_err(|reason| {
            failed(String::new(), "no_backend");
            reason.to_string()
        })?;
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
                let reason = if e.kind() == io::ErrorKind::ConnectionRefused {
                    "refused"
                } else {
                    "error"
                };
                failed(endpoint.addr.to_string(), reason);
                failures.push(format!("{endpoint}: {e}"));
            }
            Err(_) => {
                debug!(backend = %endpoint, timeout = ?settings.connect_timeout, "connect timed out; trying the next backend");
                failed(endpoint.addr.to_string(), "timeout");
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

/// Counts a connect failure for `route` in the metrics (`backend` empty when there was no
/// backend to try).
fn count_connect_failure(route: &Route, backend: String, reason: &str) {
    metrics::global()
        .connect_failures
        .get_or_create(&CloseLabels {
            route: route.label.clone(),
            backend,
            reason: reason.to_string(),
        })
        .inc();
}
