//! The server's lifecycle: bind every listener, run the accept loops on the data threads,
//! apply reloads, and shut down with a grace period.
//!
//! Binding comes first and is all or nothing: a route that cannot listen stops the start
//! (or rejects the reload) before anything else changed. A reload starts every new
//! listener and source, waits (bounded, and never past a shutdown signal) for changed
//! routes' new sources to have a first result, and only then switches.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use super::forward::{Shared, accept_loop};
use super::listen;
use super::route::{Route, Target, TargetError, Targets};
use super::tls::RouteTls;
use super::workers::Workers;
use crate::config::{Config, RouteConfig, Settings};
use crate::discovery::Discovery;
use crate::metrics::Metrics;
use crate::status::{Status, View};

/// How often the metric series of backends that left every set are removed.
const PRUNE_EVERY: Duration = Duration::from_secs(5);

/// How long a reload waits for a changed route's new source before switching anyway.
const SWITCH_WAIT: Duration = Duration::from_secs(5);

/// A failure that stops the ambassador from starting (or a reload from applying).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error("cannot start the data threads: {0}")]
    Threads(#[source] io::Error),
}

/// The live routes and settings, shared with the accept loops and the admin view.
pub struct State {
    routes: RwLock<BTreeMap<String, Arc<Route>>>,
    settings: watch::Sender<Arc<Settings>>,
    /// Latched: once every route has its first result, the process stays ready.
    ready: AtomicBool,
    started: std::time::Instant,
    metrics: Arc<Metrics>,
}

impl State {
    fn routes(&self) -> Vec<Arc<Route>> {
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        routes.values().cloned().collect()
    }

    fn ready(&self) -> bool {
        if self.ready.load(Ordering::Relaxed) {
            return true;
        }
        let now = self.routes().iter().all(|r| r.ready());
        if now {
            self.ready.store(true, Ordering::Relaxed);
        }
        now
    }

    /// Every (route, backend) of the routes' current sets and whether it is up, for
    /// `ambassadord_backend_up` (read at scrape time).
    pub fn backends_up(&self) -> Vec<(String, String, bool)> {
        // An omni route's sources may share a backend: one series each, up if every
        // source that has it sees it up.
        let mut up: BTreeMap<(String, String), bool> = BTreeMap::new();
        for r in self.routes() {
            let route = r.listen.to_string();
            for (addr, state) in r.backend_states() {
                *up.entry((route.clone(), addr.to_string())).or_insert(true) &= state.is_up();
            }
        }
        up.into_iter().map(|((r, b), up)| (r, b, up)).collect()
    }

    /// Containers in every omni route's index, in all (read at scrape time).
    pub fn omni_containers(&self) -> usize {
        self.routes().iter().map(|r| r.omni_containers()).sum()
    }
}

impl View for State {
    fn status(&self) -> Status {
        Status {
            ready: self.readiness().is_ok(),
            uptime_seconds: self.started.elapsed().as_secs(),
            routes: self
                .routes()
                .iter()
                .map(|r| r.status(&self.metrics))
                .collect(),
        }
    }

    /// Listeners are bound (they are before the state exists) and every route's source
    /// has its first result (once ready in that, ready for good), and no omni route's
    /// redirect is missing (checked every time).
    fn readiness(&self) -> Result<(), Vec<String>> {
        let routes = self.routes();
        let mut why: Vec<String> = Vec::new();
        if !self.ready() {
            let waiting: Vec<String> = routes
                .iter()
                .filter(|r| !r.ready())
                .map(|r| r.listen.to_string())
                .collect();
            why.push(format!("waiting for discovery on {}", waiting.join(", ")));
        }
        why.extend(routes.iter().filter_map(|r| r.redirect_problem()));
        if why.is_empty() { Ok(()) } else { Err(why) }
    }
}

/// A route's listening sockets (one per data thread) and the route, before its accept
/// loops run.
type Bound = (Vec<std::net::TcpListener>, Arc<Route>);

/// Bound listeners with their routes, ready to serve.
pub struct Server {
    state: Arc<State>,
    pending: Vec<Bound>,
    workers: Option<Workers>,
    targets: Targets,
    /// What a reload cannot change (only a restart does), to warn when it tries.
    started_with: Config,
}

impl Server {
    /// Binds every route's listener and starts discovery. Fails if any listener cannot
    /// be bound or a target cannot be started.
    pub async fn bind(config: Config, metrics: Arc<Metrics>) -> Result<Server, StartError> {
        let started_with = config.clone();
        let targets = Targets::new(
            Arc::new(Discovery::new(
                config.dns,
                config.consul_token.clone(),
                metrics.clone(),
            )),
            metrics.clone(),
            config.admin.map(|a| a.addr.port()),
            config.admin.and_then(|a| a.kept_from_redirect()),
            config.settings.connect_timeout,
            beyond_loopback_ports(&config.routes),
        );
        let threads = config.threads.unwrap_or_else(Workers::default_count);
        let mut pending = Vec::with_capacity(config.routes.len());
        for rc in &config.routes {
            pending.push(bind_route(
                rc,
                threads,
                &targets,
                config.docker_host.as_ref(),
                config.tls.as_deref(),
            )?);
        }
        let workers = Workers::start(threads).map_err(StartError::Threads)?;
        // Said once every route is bound: a start that fails says only why.
        for ((_, route), rc) in pending.iter().zip(&config.routes) {
            match &rc.name {
                Some(link) => {
                    info!(listen = %route.listen, backend = %route.active().config, kind = route.active().kind, link = %link, "listening")
                }
                None => {
                    info!(listen = %route.listen, backend = %route.active().config, kind = route.active().kind, "listening")
                }
            }
        }
        let routes = pending
            .iter()
            .map(|(_, r)| (r.key.clone(), r.clone()))
            .collect();
        Ok(Server {
            state: Arc::new(State {
                routes: RwLock::new(routes),
                settings: watch::Sender::new(Arc::new(config.settings)),
                ready: AtomicBool::new(false),
                started: std::time::Instant::now(),
                metrics,
            }),
            pending,
            workers: Some(workers),
            targets,
            started_with,
        })
    }

    /// The addresses actually bound (useful with port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.pending.iter().map(|(_, r)| r.listen).collect()
    }

    /// The live state, for the admin view and scrape-time metrics.
    pub fn state(&self) -> Arc<State> {
        self.state.clone()
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets open connections
    /// drain for the grace period, and ends the ones still open.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let (_keep, reloads) = mpsc::channel(1);
        self.run_with_reloads(shutdown, reloads).await
    }

    /// As [`Server::run`], and applies every configuration sent on `reloads`: new routes
    /// listen, removed ones stop accepting and drain, changed ones switch source for new
    /// connections only. A reload that cannot be applied changes nothing; a shutdown
    /// signal during a reload abandons the reload.
    pub async fn run_with_reloads(
        mut self,
        shutdown: impl Future<Output = ()>,
        mut reloads: mpsc::Receiver<Config>,
    ) {
        let shared = Shared {
            settings: self.state.settings.subscribe(),
            stop: CancellationToken::new(),
            force_close: CancellationToken::new(),
            connections: TaskTracker::new(),
        };
        let accept_loops = TaskTracker::new();
        let Some(workers) = self.workers.take() else {
            return;
        };
        // Each data thread accepts on its own socket of the route.
        let spawn_loops = |(listeners, route): Bound| {
            for (listener, thread) in listeners.into_iter().zip(workers.handles()) {
                let accept = accept_loop(listener, route.clone(), shared.clone());
                accept_loops.spawn_on(accept, thread);
            }
        };
        for bound in std::mem::take(&mut self.pending) {
            spawn_loops(bound);
        }
        let pruning = tokio::spawn(prune_departed(self.state.clone(), shared.stop.clone()));
        let _pruning = tokio_util::task::AbortOnDropHandle::new(pruning);
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let config = tokio::select! {
                _ = &mut shutdown => break,
                Some(config) = reloads.recv() => config,
            };
            // The reload may wait for new sources: a shutdown meanwhile wins.
            let applied = tokio::select! {
                _ = &mut shutdown => break,
                r = self.reload(config, workers.len()) => r,
            };
            match applied {
                Ok(added) => added.into_iter().for_each(&spawn_loops),
                Err(e) => error!("reload rejected, keeping the running configuration: {e}"),
            }
        }

        // Dropping the listeners makes new connection attempts fail at once.
        shared.stop.cancel();
        accept_loops.close();
        accept_loops.wait().await;
        let connections = &shared.connections;
        connections.close();
        let grace = self.state.settings.borrow().shutdown_grace;
        info!(open = connections.len(), grace = ?grace, "stopped accepting; draining open connections");
        if timeout(grace, connections.wait()).await.is_err() {
            warn!(
                open = connections.len(),
                "grace period over; closing the connections still open"
            );
            shared.force_close.cancel();
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
    async fn reload(&self, config: Config, threads: usize) -> Result<Vec<Bound>, StartError> {
        let unchangeable = restart_only_changes(&self.started_with, &config);
        if !unchangeable.is_empty() {
            warn!(
                changed = %unchangeable.join(", "),
                "reload: these settings take effect only after a restart; keeping the running ones"
            );
        }
        let current: BTreeMap<String, Arc<Route>> = self
            .state
            .routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        // The container index is made on first need with the Docker host of the
        // configuration that first needs it; a later change of host is restart-only.
        let targets = &self.targets;
        let docker_host = config.docker_host.as_ref();
        let mut added = Vec::new();
        for rc in config
            .routes
            .iter()
            .filter(|rc| !current.contains_key(&rc.listen.to_string()))
        {
            added.push(bind_route(
                rc,
                threads,
                targets,
                docker_host,
                config.tls.as_deref(),
            )?);
        }
        // A changed route switches once its new source has a first result (bounded), so
        // connections arriving during the switch are not refused for want of backends.
        let mut changed = Vec::new();
        let mut options_changed = Vec::new();
        for rc in &config.routes {
            let Some(route) = current.get(&rc.listen.to_string()) else {
                continue;
            };
            let active = route.active();
            let material = config.tls.as_deref();
            if active.config != rc.target || active.check != rc.check {
                let started = targets.start(rc, route.listen, docker_host, material)?;
                changed.push((route.clone(), started));
                continue;
            }
            // The TLS files are read again on every reload: a route with TLS takes the
            // new material even when nothing else changed (certificate rotation).
            let tls =
                RouteTls::new(material, &rc.options.tls, &rc.target).map_err(TargetError::from)?;
            let why = if active.options != rc.options {
                "route options changed; open connections keep theirs"
            } else if tls.is_some() || active.tls.is_some() {
                "TLS files read again; new connections use them, open ones keep theirs"
            } else {
                continue;
            };
            options_changed.push((
                route.clone(),
                active.with_options(rc.options.clone(), tls),
                why,
            ));
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
            route.switch(active);
        }
        for (route, active, why) in options_changed {
            info!(listen = %route.listen, "{why}");
            route.switch(active);
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
                info!(listen = %route.listen, backend = %route.active().config, open = route.metrics.open(), "route removed; stopped accepting, open connections drain");
                route.stop_accepting.cancel();
            }
        }
        for (_, route) in &added {
            info!(listen = %route.listen, backend = %route.active().config, kind = route.active().kind, "listening");
            next.insert(route.key.clone(), route.clone());
        }
        *self.state.routes.write().unwrap_or_else(|p| p.into_inner()) = next;
        self.state.settings.send_replace(Arc::new(config.settings));
        info!(routes = config.routes.len(), "configuration reloaded");
        Ok(added)
    }
}

/// Removes, every [`PRUNE_EVERY`], the metric series of each route's backends that no
/// set holds any more and no connection uses.
async fn prune_departed(state: Arc<State>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(PRUNE_EVERY) => {}
        }
        for route in state.routes() {
            let removed = route.metrics.prune(&route.live_backends());
            if removed > 0 {
                debug!(listen = %route.listen, removed, "metric series of departed backends removed");
            }
        }
    }
}

/// The ports of the standard (not omni) routes that listen beyond loopback.
fn beyond_loopback_ports(routes: &[RouteConfig]) -> Vec<u16> {
    routes
        .iter()
        .filter(|r| matches!(r.target, crate::config::RouteTarget::Spec(_)))
        .filter(|r| !r.listen.ip.is_some_and(|ip| ip.is_loopback()))
        .map(|r| r.listen.port)
        .filter(|p| *p != 0)
        .collect()
}

/// The settings a reload changed that only a restart applies.
fn restart_only_changes(running: &Config, new: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    let mut check = |name, differs: bool| {
        if differs {
            changed.push(name);
        }
    };
    check("dns", running.dns != new.dns);
    // A server that started with no omni or docker:// route has no Docker host yet:
    // the first reload that adds one brings its own (see `Server::reload`).
    check(
        "docker_host",
        running.docker_host.is_some()
            && new.docker_host.is_some()
            && running.docker_host != new.docker_host,
    );
    check(
        "admin",
        running.admin.map(|a| a.addr) != new.admin.map(|a| a.addr),
    );
    check("threads", running.threads != new.threads);
    check("run_as", running.run_as != new.run_as);
    check("log_level", running.log.filter != new.log.filter);
    check("log_format", running.log.format != new.log.format);
    changed
}

/// Binds a route's sockets (one per data thread) and starts its target.
fn bind_route(
    rc: &RouteConfig,
    threads: usize,
    targets: &Targets,
    docker_host: Option<&crate::config::DockerHost>,
    material: Option<&crate::tls::Material>,
) -> Result<Bound, StartError> {
    let bind_error = |source| StartError::Bind {
        addr: rc.listen.to_string(),
        source,
    };
    let listeners =
        listen::bind_group(rc.listen.ip, rc.listen.port, threads).map_err(bind_error)?;
    let listen = listeners.first().map_or_else(
        || Err(io::Error::other("no listening socket")),
        |l| l.local_addr(),
    );
    let listen = listen.map_err(bind_error)?;
    let key = if rc.listen.port == 0 {
        listen.to_string()
    } else {
        rc.listen.to_string()
    };
    let active = targets.start(rc, listen, docker_host, material)?;
    let route = Arc::new(Route::new(listen, key, active, &targets.metrics));
    Ok((listeners, route))
}
