//! Discovery: sources that find backends, and the driver that publishes their sets.
//!
//! A [`Source`] knows how to read its backends and how to wait for the next change; it
//! returns complete [`EndpointSet`]s, never deltas. [`spawn_source`] runs one source in its
//! own task and turns it into a `watch` channel the data path reads without waiting: it
//! skips unchanged sets, keeps the last good set through errors (retrying with jittered,
//! capped backoff and logging the outage once), and stops when nobody listens any more.

pub mod consul;
pub mod dns;
pub mod docker;
pub mod etcd;
pub mod hosts;
pub mod http;
pub mod kv;
pub mod srv;

use std::fmt::Display;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::endpoint::EndpointSet;
use crate::metrics::Metrics;
use crate::spec::{Host, Spec};

/// What the data path reads from one spec's discovery.
#[derive(Debug, Clone)]
pub struct Endpoints {
    /// `None` until the first good read, then the latest good set.
    pub sets: watch::Receiver<Option<EndpointSet>>,
    /// True while nothing was ever found and the latest read failed (a store unreachable
    /// since startup): a new connection is then refused at once instead of waiting for a
    /// first result that is not on its way.
    pub failing: watch::Receiver<bool>,
}

impl Endpoints {
    /// Endpoints fed by the caller through `sets`; never failing.
    pub fn fixed(sets: watch::Receiver<Option<EndpointSet>>) -> Self {
        Endpoints {
            sets,
            failing: watch::channel(false).1,
        }
    }
}

/// A source failed to read its backends. Every message names what was asked and of
/// whom: a store's errors start with where (`etcd HOST:PORT: reading 'PATH'`, `consul
/// HOST:PORT key 'KEY'`, `consul HOST:PORT service 'NAME'`), then say what went wrong.
///
/// Causes are part of each message, so none is also a `source()`: a chain printed in
/// full would say them twice.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The store could not be reached: its name did not resolve, or no address took a
    /// connection in time.
    #[error("{at}: {error}")]
    Unreachable {
        at: String,
        error: http::ConnectError,
    },
    /// The HTTP exchange with the store failed: lost, cut short or timed out.
    #[error("{at}: {why}")]
    Exchange { at: String, why: String },
    /// The store answered with an error: an HTTP error status, an error or a cancel in
    /// a watch stream.
    #[error("{at}: {why}")]
    Rejected { at: String, why: String },
    /// The store refused the request's credentials (Consul's 403 for CONSUL_HTTP_TOKEN).
    #[error("{at}: {why}")]
    PermissionDenied { at: String, why: String },
    /// The reply is not what the store's API answers (not JSON, bad base64, a missing
    /// header): a wrong server, or a proxy in the way.
    #[error("{at}: {why}")]
    Malformed { at: String, why: String },
    /// A DNS lookup failed: an SRV name or its targets, or every name of a host list;
    /// the message names each name and why.
    #[error("{0}")]
    Dns(String),
    /// A host name in a list built without a resolver.
    #[error("no resolver for '{0}'")]
    NoResolver(String),
    /// A `docker://` spec's containers cannot be read.
    #[error("{0}")]
    Docker(String),
}

/// What went wrong talking to a store, before the source says where: the store
/// variants of [`SourceError`], built deep in a request and placed by
/// [`StoreProblem::at`].
#[derive(Debug, thiserror::Error)]
enum StoreProblem {
    #[error(transparent)]
    Unreachable(#[from] http::ConnectError),
    #[error("{0}")]
    Exchange(String),
    #[error("{0}")]
    Rejected(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    Malformed(String),
}

impl StoreProblem {
    fn at(self, at: String) -> SourceError {
        match self {
            StoreProblem::Unreachable(error) => SourceError::Unreachable { at, error },
            StoreProblem::Exchange(why) => SourceError::Exchange { at, why },
            StoreProblem::Rejected(why) => SourceError::Rejected { at, why },
            StoreProblem::PermissionDenied(why) => SourceError::PermissionDenied { at, why },
            StoreProblem::Malformed(why) => SourceError::Malformed { at, why },
        }
    }
}

/// What a source publishes: compared to skip unchanged reads, shown in log lines, and
/// sized for the metrics.
pub trait Published: Clone + PartialEq + Display + Send + Sync + 'static {
    /// How many endpoints this is, or `None` for an intermediate value (a KV store's
    /// backend list) whose size the final stage reports once resolved.
    fn endpoint_count(&self) -> Option<usize> {
        None
    }

    /// Its members as log lines name them, to say what a change added and removed.
    fn members(&self) -> Vec<String>;
}

impl Published for EndpointSet {
    fn endpoint_count(&self) -> Option<usize> {
        Some(self.len())
    }

    fn members(&self) -> Vec<String> {
        self.as_slice().iter().map(|e| e.addr.to_string()).collect()
    }
}

impl Published for kv::BackendList {
    fn members(&self) -> Vec<String> {
        self.0.iter().map(|hp| hp.to_string()).collect()
    }
}

/// Members a change line names at most, each way; the rest are counted.
const NAMED_IN_A_CHANGE: usize = 8;

/// What changed between two published values, for one bounded log line: how many
/// members now, and the added and removed ones (at most [`NAMED_IN_A_CHANGE`] named
/// each way). Costs one pass over each, so a large set's change stays cheap to log.
struct Change {
    count: usize,
    added: Named,
    removed: Named,
}

/// A bounded, comma-separated list of names and how many more there were.
struct Named {
    names: Vec<String>,
    more: usize,
}

impl Named {
    fn push(&mut self, name: &str) {
        if self.names.len() < NAMED_IN_A_CHANGE {
            self.names.push(crate::logsafe::bounded(name, 100));
        } else {
            self.more += 1;
        }
    }
}

impl Display for Named {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.names.is_empty() {
            return f.write_str("-");
        }
        f.write_str(&self.names.join(","))?;
        if self.more > 0 {
            write!(f, ",…+{}", self.more)?;
        }
        Ok(())
    }
}

impl Change {
    fn between<T: Published>(before: Option<&T>, after: &T) -> Change {
        let now = after.members();
        let old = before.map(Published::members).unwrap_or_default();
        let old_set: std::collections::HashSet<&str> = old.iter().map(String::as_str).collect();
        let now_set: std::collections::HashSet<&str> = now.iter().map(String::as_str).collect();
        let mut change = Change {
            count: now.len(),
            added: Named {
                names: Vec::new(),
                more: 0,
            },
            removed: Named {
                names: Vec::new(),
                more: 0,
            },
        };
        for m in &now {
            if !old_set.contains(m.as_str()) {
                change.added.push(m);
            }
        }
        for m in &old {
            if !now_set.contains(m.as_str()) {
                change.removed.push(m);
            }
        }
        change
    }
}

/// One discovery mechanism for one backend spec.
pub trait Source: Send + 'static {
    /// What the source publishes: an [`EndpointSet`] for sources the data path reads, or
    /// an intermediate value (a KV store's backend list) that another stage resolves.
    type Item: Published;

    /// Whether a change is worth an info line (false for intermediate stages, whose
    /// change the final stage announces).
    const ANNOUNCE: bool = true;

    /// Reads the backends, first waiting until there may be something new to read (a TTL
    /// running out, a watch firing). The first call reads at once. After an error the
    /// driver backs off and calls again; the source should then read afresh.
    fn next(&mut self) -> impl Future<Output = Result<Self::Item, SourceError>> + Send;
}

/// Shared context for building sources: the resolver is created once, on first need.
pub struct Discovery {
    /// `--dns`: the nameserver for every lookup instead of /etc/resolv.conf.
    nameserver: Option<SocketAddr>,
    resolver: std::sync::OnceLock<dns::Resolver>,
    /// The runtime sources run on: the one that built this (the control runtime), also
    /// for a source started from a connection's task on a data thread (omni mode).
    runtime: Option<tokio::runtime::Handle>,
    /// CONSUL_HTTP_TOKEN, as config read it, for every consul:// and consul-service://
    /// source.
    consul_token: Option<crate::config::Secret>,
    /// Where each source's reads and errors are counted.
    metrics: Arc<Metrics>,
    /// The running containers `docker://` specs choose from, once the Docker side has
    /// been set up (see [`Discovery::provide_containers`]).
    containers: std::sync::OnceLock<Arc<dyn docker::Containers>>,
}

impl Discovery {
    pub fn new(
        nameserver: Option<SocketAddr>,
        consul_token: Option<crate::config::Secret>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Discovery {
            nameserver,
            consul_token,
            resolver: std::sync::OnceLock::new(),
            runtime: tokio::runtime::Handle::try_current().ok(),
            metrics,
            containers: std::sync::OnceLock::new(),
        }
    }

    /// Gives `docker://` sources their containers; the first call wins (there is one
    /// container index per process).
    pub fn provide_containers(&self, containers: Arc<dyn docker::Containers>) {
        let _ = self.containers.set(containers);
    }

    fn resolver(&self) -> dns::Resolver {
        self.resolver
            .get_or_init(|| match self.nameserver {
                Some(server) => dns::Resolver::with_nameserver(server),
                None => dns::Resolver::from_system(),
            })
            .clone()
    }

    /// Starts the source that serves `spec`; it runs until `cancel` fires or every
    /// receiver is dropped.
    pub fn spawn(&self, spec: &Spec, cancel: CancellationToken) -> Endpoints {
        let name = spec.to_string();
        // Both stages of a KV pipeline report into one flag: whichever fails first
        // (the store, or resolving its list) before anything was found.
        let (failing_tx, failing) = watch::channel(false);
        let drive = Drive {
            failing: failing_tx,
            cancel,
            runtime: self.runtime.clone(),
            metrics: self.metrics.clone(),
        };
        let sets = match spec {
            Spec::Static(list) => {
                let resolver = list
                    .iter()
                    .any(|hp| matches!(hp.host, Host::Name(_)))
                    .then(|| self.resolver());
                let source = hosts::HostsSource::new(list.clone(), resolver);
                drive.spawn(name, source)
            }
            Spec::Srv(srv_name) => {
                let source = srv::SrvSource::new(srv_name.clone(), self.resolver());
                drive.spawn(name, source)
            }
            Spec::Etcd(kv) => {
                let store = etcd::EtcdSource::new(kv.clone(), self.resolver());
                let lists = drive.spawn(name.clone(), store);
                drive.spawn(name, kv::Resolving::new(lists, self.resolver()))
            }
            Spec::Consul(kv) => {
                let token = self.consul_token.as_ref().map(|t| t.expose().to_string());
                let store = consul::ConsulSource::new(kv.clone(), token, self.resolver());
                let lists = drive.spawn(name.clone(), store);
                drive.spawn(name, kv::Resolving::new(lists, self.resolver()))
            }
            Spec::ConsulService(service) => {
                let token = self.consul_token.as_ref().map(|t| t.expose().to_string());
                let store = consul::ConsulSource::service(service.clone(), token, self.resolver());
                let lists = drive.spawn(name.clone(), store);
                drive.spawn(name, kv::Resolving::new(lists, self.resolver()))
            }
            Spec::Docker(d) => match self.containers.get() {
                Some(containers) => drive.spawn(
                    name,
                    docker::DockerSource::new(d.clone(), containers.clone()),
                ),
                None => drive.spawn(name, docker::NoDocker),
            },
        };
        Endpoints { sets, failing }
    }
}

/// Runs `source` in its own task and publishes what it finds, counting its reads in
/// `metrics`.
pub fn spawn_source<S: Source>(
    name: String,
    source: S,
    cancel: CancellationToken,
    metrics: Arc<Metrics>,
) -> watch::Receiver<Option<S::Item>> {
    let drive = Drive {
        failing: watch::channel(false).0,
        cancel,
        runtime: None,
        metrics,
    };
    drive.spawn(name, source)
}

/// What the driver tasks of one spec share.
struct Drive {
    failing: watch::Sender<bool>,
    cancel: CancellationToken,
    /// Where the driver tasks run; the caller's runtime if `None`.
    runtime: Option<tokio::runtime::Handle>,
    metrics: Arc<Metrics>,
}

impl Drive {
    fn spawn<S: Source>(&self, name: String, source: S) -> watch::Receiver<Option<S::Item>> {
        let (tx, rx) = watch::channel(None);
        let failing = self.failing.clone();
        let task = drive(
            name,
            source,
            tx,
            failing,
            self.cancel.clone(),
            self.metrics.clone(),
        );
        match &self.runtime {
            Some(runtime) => drop(runtime.spawn(task)),
            None => drop(tokio::spawn(task)),
        }
        rx
    }
}

async fn drive<S: Source>(
    name: String,
    mut source: S,
    tx: watch::Sender<Option<S::Item>>,
    failing: watch::Sender<bool>,
    cancel: CancellationToken,
    metrics: Arc<Metrics>,
) {
    let _counted = metrics.source_started(&name);
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
    let mut in_outage = false;
    loop {
        let result = tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tx.closed() => return,
            r = source.next() => r,
        };
        let delay = match result {
            Ok(set) => {
                if in_outage {
                    info!(source = %name, "discovery recovered");
                    in_outage = false;
                }
                backoff.reset();
                failing.send_if_modified(|f| std::mem::replace(f, false));
                let size = set.endpoint_count();
                let changed = tx.send_if_modified(|current| {
                    if current.as_ref() == Some(&set) {
                        return false;
                    }
                    let change = Change::between(current.as_ref(), &set);
                    if S::ANNOUNCE {
                        info!(source = %name, endpoints = change.count, added = %change.added,
                            removed = %change.removed, "backends changed");
                    } else {
                        debug!(source = %name, entries = change.count, added = %change.added,
                            removed = %change.removed, "source read changed");
                    }
                    *current = Some(set);
                    true
                });
                metrics.source_ok(&name, size, changed);
                continue;
            }
            Err(e) => {
                metrics.source_error(&name);
                if tx.borrow().is_none() {
                    failing.send_if_modified(|f| !std::mem::replace(f, true));
                }
                let delay = backoff.next_delay();
                if !in_outage {
                    let keeping = match &*tx.borrow() {
                        Some(set) => format!(
                            "keeping the last good set ({} entries)",
                            set.members().len()
                        ),
                        None => "no backends yet, connections are refused".to_string(),
                    };
                    warn!(source = %name, error = %e, "discovery failed; {keeping}; retrying with backoff");
                    in_outage = true;
                } else {
                    debug!(source = %name, error = %e, retry_in = ?delay, "discovery still failing");
                }
                delay
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tx.closed() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Exponential backoff with jitter: each delay is drawn from [d/2, d], d doubling up to
/// `max`, so many ambassadors losing the same store do not retry in lockstep.
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max,
            current: base,
        }
    }

    pub fn reset(&mut self) {
        self.current = self.base;
    }

    pub fn next_delay(&mut self) -> Duration {
        let d = self.current;
        self.current = (self.current * 2).min(self.max);
        let half = d / 2;
        half + half.mul_f64(fastrand::f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::Endpoint;
    use std::collections::VecDeque;

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let delays: Vec<Duration> = (0..6).map(|_| b.next_delay()).collect();
        for (d, ceiling) in delays.iter().zip([100, 200, 400, 800, 800, 800]) {
            let ceiling = Duration::from_millis(ceiling);
            assert!(*d <= ceiling && *d >= ceiling / 2, "{d:?} vs {ceiling:?}");
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    /// A source that replays a script of results, then waits forever.
    struct Scripted(VecDeque<Result<EndpointSet, SourceError>>);

    impl Source for Scripted {
        type Item = EndpointSet;

        async fn next(&mut self) -> Result<EndpointSet, SourceError> {
            match self.0.pop_front() {
                Some(r) => r,
                None => std::future::pending().await,
            }
        }
    }

    fn down() -> SourceError {
        SourceError::Exchange {
            at: "test store".into(),
            why: "store down".into(),
        }
    }

    fn set(addrs: &[&str]) -> EndpointSet {
        EndpointSet::new(
            addrs
                .iter()
                .map(|a| Endpoint::new(a.parse().unwrap()))
                .collect(),
        )
    }

    /// A store's problem is placed as the variant of the same name, and renders as the
    /// strings it replaced did: where, a colon, what.
    #[test]
    fn store_problems_keep_their_kind_and_text() {
        let at = || "consul 127.0.0.1:8500 key 'svc'".to_string();
        let denied = StoreProblem::PermissionDenied("permission denied (HTTP 403)".into());
        let e = denied.at(at());
        assert!(matches!(e, SourceError::PermissionDenied { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            "consul 127.0.0.1:8500 key 'svc': permission denied (HTTP 403)"
        );
        let e = StoreProblem::Malformed("the reply is not JSON".into()).at(at());
        assert!(matches!(e, SourceError::Malformed { .. }), "{e:?}");
        let timed_out = http::ConnectError::TimedOut {
            failed: Vec::new(),
            limit: Duration::from_secs(5),
        };
        let e = StoreProblem::from(timed_out).at(at());
        assert!(matches!(e, SourceError::Unreachable { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            "consul 127.0.0.1:8500 key 'svc': no connection within 5s"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn driver_keeps_last_good_set_through_errors_and_skips_unchanged() {
        let a = set(&["10.0.0.1:1"]);
        let b = set(&["10.0.0.2:1"]);
        let script = VecDeque::from([
            Ok(a.clone()),
            Err(down()),
            Err(down()),
            Ok(a.clone()),
            Ok(b.clone()),
        ]);
        let mut rx = spawn_source(
            "test".into(),
            Scripted(script),
            CancellationToken::new(),
            Metrics::unregistered(),
        );
        rx.changed().await.unwrap();
        assert_eq!(rx.borrow_and_update().as_ref(), Some(&a));
        // The errors and the repeated `a` publish nothing; the next change is `b`.
        rx.changed().await.unwrap();
        assert_eq!(rx.borrow_and_update().as_ref(), Some(&b));
    }

    /// The failing flag is raised by an error while nothing was ever found, lowered by
    /// the next good read, and not raised by errors once a set exists.
    #[tokio::test(start_paused = true)]
    async fn driver_flags_failing_only_before_anything_was_found() {
        let a = set(&["10.0.0.1:1"]);
        let script = VecDeque::from([Err(down()), Ok(a.clone()), Err(down())]);
        let (failing_tx, mut failing) = watch::channel(false);
        let drive = Drive {
            failing: failing_tx,
            cancel: CancellationToken::new(),
            runtime: None,
            metrics: Metrics::unregistered(),
        };
        let mut rx = drive.spawn("test".into(), Scripted(script));
        failing.changed().await.unwrap();
        assert!(*failing.borrow_and_update());
        rx.changed().await.unwrap();
        assert_eq!(rx.borrow_and_update().as_ref(), Some(&a));
        assert!(!*failing.borrow_and_update());
        // The later error, and its backoff, pass without raising it again.
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!failing.has_changed().unwrap());
        assert!(!*failing.borrow());
    }

    #[tokio::test(start_paused = true)]
    async fn driver_stops_when_cancelled() {
        let cancel = CancellationToken::new();
        let mut rx = spawn_source(
            "test".into(),
            Scripted(VecDeque::new()),
            cancel.clone(),
            Metrics::unregistered(),
        );
        cancel.cancel();
        // The sender is dropped when the driver task ends.
        assert!(rx.changed().await.is_err());
    }
}
