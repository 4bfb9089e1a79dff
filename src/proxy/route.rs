//! The route model: a listening address and where its connections go, the target a
//! reload can swap, and the read-only view of both for the admin endpoint.
//!
//! A connection takes the route's target current when it is accepted ([`Route::active`])
//! and keeps it: a reload that changes the route affects only later connections. The
//! target owns what serves it (a balancer fed by discovery, or the omni router); it
//! stops when the last reference goes, which is when no connection is still connecting
//! with it.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, RwLock};

use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::info;

use super::balance::{BackendState, Balancer};
use super::check::Checker;
use super::omni::Omni;
use super::tls::RouteTls;
use crate::config::{DockerHost, RouteConfig, RouteOptions, RouteTarget};
use crate::discovery::Discovery;
use crate::docker::index::{ContainerIndex, DockerError};
use crate::metrics::{Metrics, RouteMetrics};
use crate::netfilter::Plan;
use crate::redirect::Redirect;
use crate::spec::Spec;
use crate::status::{ContainerStatus, EndpointState, EndpointStatus, RouteStatus, TargetStatus};
use crate::tls::{Material, TlsError};

/// Now as seconds since the Unix epoch, for the view's timestamps.
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A route's target could not be started.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// Omni mode's Docker client could not be set up.
    #[error(transparent)]
    Docker(#[from] DockerError),
    /// An omni or docker:// route without a Docker host (config gives one to both).
    #[error("omni mode and docker:// need a Docker host (--docker-host)")]
    NoDockerHost,
    /// The route's TLS configuration could not be made from the files.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// One listening address and where its connections go.
pub struct Route {
    pub listen: SocketAddr,
    /// The configured listen address that identifies the route across reloads (the
    /// bound address for port 0, which no reload can name again).
    pub key: String,
    active: RwLock<Arc<Active>>,
    /// Fired when a reload removes the route: stop accepting, let connections drain.
    pub stop_accepting: CancellationToken,
    /// Its counters: the one source for `/metrics` and the admin view.
    pub metrics: RouteMetrics,
    /// Connections holding one of its `max_connections` slots, across every target it
    /// switches to (a reload does not forget the ones still open).
    pub slots: Arc<AtomicU32>,
}

/// A route's current target and the discovery serving it. Dropping the last reference
/// (the route moved on and no connection is still connecting with it) stops discovery.
pub struct Active {
    pub target: Target,
    pub config: RouteTarget,
    pub kind: &'static str,
    /// Omni mode's redirect of this namespace's incoming TCP to the listener.
    pub redirect: Option<Arc<Redirect>>,
    /// The active checks it was started with (a reload that changes them restarts it).
    pub check: Option<crate::config::CheckConfig>,
    /// The PROXY protocol and limit options; a reload that changes only these keeps
    /// what serves the target ([`Active::with_options`]).
    pub options: RouteOptions,
    /// Its TLS acceptor and connector, from the material of the configuration it was
    /// started or last changed with.
    pub tls: Option<Arc<RouteTls>>,
    /// Stops the target's discovery when the last `Active` sharing it goes.
    _stop: Arc<DropGuard>,
}

impl Active {
    /// The same target (its discovery, router and redirect keep running) with other
    /// options or TLS material.
    pub fn with_options(&self, options: RouteOptions, tls: Option<Arc<RouteTls>>) -> Arc<Active> {
        Arc::new(Active {
            target: match &self.target {
                Target::Fixed(b) => Target::Fixed(b.clone()),
                Target::Omni(o) => Target::Omni(o.clone()),
            },
            config: self.config.clone(),
            kind: self.kind,
            redirect: self.redirect.clone(),
            check: self.check.clone(),
            options,
            tls,
            _stop: self._stop.clone(),
        })
    }
}

pub enum Target {
    /// Standard mode: every connection goes to one spec's backends.
    Fixed(Arc<Balancer>),
    /// Omni mode: each connection goes where its container declares.
    Omni(Arc<Omni>),
}

/// What starting a target needs.
pub struct Targets {
    pub discovery: Arc<Discovery>,
    pub metrics: Arc<Metrics>,
    /// The one container index (omni routes, `docker://` specs), made on first need
    /// from the Docker host config gave, and following the engine until the server ends.
    pub index: std::sync::OnceLock<(Arc<ContainerIndex>, tokio_util::sync::DropGuard)>,
    /// The active checks of every route that has them on.
    pub checker: Arc<Checker>,
    /// The admin port, if the endpoint is on (it does not stop omni installing its
    /// redirect), and whether the redirect must keep it out.
    pub admin_port: Option<u16>,
    pub keep_from_redirect: Option<u16>,
    /// The ports the standard routes listen on beyond loopback: an omni redirect in
    /// this namespace would take their connections.
    pub route_ports: Vec<u16>,
}

impl Targets {
    pub fn new(
        discovery: Arc<Discovery>,
        metrics: Arc<Metrics>,
        admin_port: Option<u16>,
        keep_from_redirect: Option<u16>,
        connect_timeout: std::time::Duration,
        route_ports: Vec<u16>,
    ) -> Targets {
        Targets {
            discovery,
            checker: Checker::new(connect_timeout, metrics.clone()),
            metrics,
            index: std::sync::OnceLock::new(),
            admin_port,
            keep_from_redirect,
            route_ports,
        }
    }

    /// The container index, made and started on first need: it then also serves every
    /// `docker://` source.
    fn index(&self, host: Option<&DockerHost>) -> Result<Arc<ContainerIndex>, TargetError> {
        if let Some((index, _)) = self.index.get() {
            return Ok(index.clone());
        }
        // Config gives a Docker host whenever a route is in omni mode or uses docker://.
        let host = host.ok_or(TargetError::NoDockerHost)?;
        let index = ContainerIndex::new(host)?;
        let stop = CancellationToken::new();
        tokio::spawn(index.clone().run(stop.clone()));
        self.discovery.provide_containers(index.clone());
        let made = self.index.get_or_init(|| (index, stop.drop_guard()));
        Ok(made.0.clone())
    }

    /// Starts what serves `rc`'s target (bound at `listen`): its discovery, or omni
    /// mode's router and redirect. `docker_host` is the configuration's.
    pub fn start(
        &self,
        rc: &RouteConfig,
        listen: SocketAddr,
        docker_host: Option<&DockerHost>,
        material: Option<&Material>,
    ) -> Result<Arc<Active>, TargetError> {
        let target = &rc.target;
        let tls = RouteTls::new(material, &rc.options.tls, target)?;
        let stop = CancellationToken::new();
        let mut redirect = None;
        let (t, kind) = match target {
            RouteTarget::Spec(backend) => {
                let spec = &backend.spec;
                if let Spec::Docker(_) = spec {
                    self.index(docker_host)?;
                }
                if let Spec::Srv(name) = spec {
                    // `redis` with its port forgotten is an SRV name too: say so.
                    info!(
                        "'{name}' has no port: looking up SRV records for it; write {name}:PORT for a host"
                    );
                }
                let endpoints = self.discovery.spawn(spec, stop.child_token());
                // A link route is known by its alias in the access log.
                let name = rc.name.clone().unwrap_or_else(|| backend.to_string());
                let mut balancer = Balancer::new(name, endpoints);
                if let Some(check) = &rc.check {
                    let checks =
                        self.checker
                            .follow(check.clone(), balancer.sets(), stop.child_token());
                    balancer = balancer.with_checks(checks);
                }
                (Target::Fixed(Arc::new(balancer)), spec.kind())
            }
            RouteTarget::Omni => {
                let index = self.index(docker_host)?;
                let checks = rc.check.clone().map(|c| (self.checker.clone(), c));
                let omni = Omni::start(
                    index,
                    self.discovery.clone(),
                    self.metrics.clone(),
                    checks,
                    stop.child_token(),
                );
                let plan = Plan {
                    port: listen.port(),
                    keep: self.keep_from_redirect,
                };
                let ours = std::iter::once(listen.port())
                    .chain(self.admin_port)
                    .collect();
                redirect = Some(Redirect::start(
                    plan,
                    listen,
                    ours,
                    self.route_ports.clone(),
                    stop.child_token(),
                ));
                (Target::Omni(omni), "omni")
            }
        };
        Ok(Arc::new(Active {
            target: t,
            config: target.clone(),
            kind,
            redirect,
            check: rc.check.clone(),
            options: rc.options.clone(),
            tls,
            _stop: Arc::new(stop.drop_guard()),
        }))
    }
}

impl Route {
    /// A route listening on `listen` (what was bound), known across reloads by `key`,
    /// starting with `active`.
    pub fn new(
        listen: SocketAddr,
        key: String,
        active: Arc<Active>,
        metrics: &Arc<Metrics>,
    ) -> Route {
        Route {
            listen,
            key,
            metrics: metrics.route(&listen.to_string()),
            active: RwLock::new(active),
            stop_accepting: CancellationToken::new(),
            slots: Arc::default(),
        }
    }

    /// The target new connections use.
    pub fn active(&self) -> Arc<Active> {
        self.active
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Points new connections at `active`; open ones keep the target they took.
    pub fn switch(&self, active: Arc<Active>) {
        *self.active.write().unwrap_or_else(|p| p.into_inner()) = active;
    }

    /// Whether its source has produced a first result.
    pub fn ready(&self) -> bool {
        match &self.active().target {
            Target::Fixed(b) => b.current().is_some(),
            Target::Omni(o) => o.index().loaded(),
        }
    }

    /// Why incoming connections do not reach it, if they do not: omni mode's redirect is
    /// missing. Not latched like discovery: a redirect removed later shows.
    pub fn redirect_problem(&self) -> Option<String> {
        let active = self.active();
        let redirect = active.redirect.as_ref()?;
        redirect
            .check()
            .err()
            .map(|why| format!("{}: {why}", self.listen))
    }

    /// The route as the admin endpoint shows it.
    pub fn status(&self, metrics: &Metrics) -> RouteStatus {
        let active = self.active();
        let spec = active.config.to_string();
        let health = metrics.source(&spec);
        let totals = self.metrics.totals();
        let (discovered, target) = match &active.target {
            Target::Fixed(balancer) => {
                let set = balancer.current();
                let endpoints = set.as_ref().map_or_else(Vec::new, |set| {
                    set.as_slice()
                        .iter()
                        .map(|e| (e, balancer.health(e.addr)))
                        .map(|(e, health)| EndpointStatus {
                            addr: e.addr.to_string(),
                            origin: e.origin.as_deref().map(String::from),
                            priority: e.priority,
                            weight: e.weight,
                            state: match health.state {
                                BackendState::Up => EndpointState::Up,
                                BackendState::Checking => EndpointState::Checking,
                                BackendState::Down => EndpointState::Down,
                                BackendState::CoolingDown => EndpointState::CoolingDown,
                                BackendState::Ejected => EndpointState::Ejected,
                                BackendState::Failing => EndpointState::Failing,
                            },
                            failures_in_a_row: health.failures_in_a_row,
                            until: health.remaining.map(|left| unix_now() + left.as_secs_f64()),
                            check_error: health.check_error,
                        })
                        .collect()
                });
                (set.is_some(), TargetStatus::Fixed { endpoints })
            }
            Target::Omni(omni) => {
                let mut containers: Vec<ContainerStatus> = omni
                    .index()
                    .containers()
                    .iter()
                    .map(|c| ContainerStatus {
                        name: c.name.clone(),
                        id: c.id.clone(),
                        ips: c.ips.iter().map(|ip| ip.to_string()).collect(),
                        declarations: c
                            .declarations
                            .iter()
                            .map(|(port, spec)| (port.to_string(), spec.to_string()))
                            .collect(),
                        discovery_errors: c
                            .declarations
                            .values()
                            .filter_map(|spec| metrics.source(&spec.to_string()))
                            .map(|h| h.errors)
                            .sum(),
                        bad_declarations: c.problems.clone(),
                    })
                    .collect();
                containers.sort_by(|a, b| a.name.cmp(&b.name));
                let sources = omni.source_count();
                (
                    omni.index().loaded(),
                    TargetStatus::Omni {
                        containers,
                        sources,
                    },
                )
            }
        };
        RouteStatus {
            listen: self.listen.to_string(),
            spec,
            kind: active.kind,
            open_connections: totals.open,
            accepted: totals.accepted,
            refused: totals.refused,
            connect_failures: totals.connect_failures,
            sent_bytes: totals.sent,
            received_bytes: totals.received,
            last_update: health.and_then(|h| h.last_good_unix),
            // An omni route has no source of its own: its containers' sources count.
            discovery_errors: match &active.target {
                Target::Fixed(_) => health.map_or(0, |h| h.errors),
                Target::Omni(omni) => omni
                    .balancers()
                    .iter()
                    .filter_map(|b| metrics.source(b.name()))
                    .map(|h| h.errors)
                    .sum(),
            },
            discovered,
            redirect: active.redirect.as_ref().map(|r| r.state()),
            target,
        }
    }

    /// Every backend address its target can send a new connection to now.
    pub fn live_backends(&self) -> HashSet<SocketAddr> {
        let addrs = |b: &Balancer| {
            b.current()
                .map(|set| set.as_slice().iter().map(|e| e.addr).collect::<Vec<_>>())
                .unwrap_or_default()
        };
        match &self.active().target {
            Target::Fixed(b) => addrs(b).into_iter().collect(),
            Target::Omni(o) => o.balancers().iter().flat_map(|b| addrs(b)).collect(),
        }
    }

    /// Each backend of its current set(s) (every running source, in omni mode) and its
    /// state.
    pub fn backend_states(&self) -> Vec<(SocketAddr, BackendState)> {
        let of = |b: &Balancer| {
            b.current()
                .map(|set| {
                    set.as_slice()
                        .iter()
                        .map(|e| (e.addr, b.state(e.addr)))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        };
        match &self.active().target {
            Target::Fixed(b) => of(b),
            Target::Omni(o) => o.balancers().iter().flat_map(|b| of(b)).collect(),
        }
    }

    /// Containers in its omni index (0 for a standard route).
    pub fn omni_containers(&self) -> usize {
        match &self.active().target {
            Target::Omni(o) => o.index().len(),
            Target::Fixed(_) => 0,
        }
    }
}
