//! The Prometheus metrics: the families the data path, discovery and omni mode update,
//! one [`RouteMetrics`] per route that is the single source of that route's counters
//! (for `/metrics` and for the admin view alike), and the values computed at scrape
//! time ([`ScrapeTime`]).
//!
//! There is no process-wide registry: the composition root (`lib.rs`) makes one, hands
//! [`Metrics`] to the server and discovery, and the registry to the admin endpoint. The
//! hot path never looks a family up per connection: a route keeps its series, so a
//! family is touched only on a backend's first connection or a new close reason. Byte
//! counters are added to as each read moves (one atomic add), so long transfers show
//! while they run.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    route: String,
    backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CloseLabels {
    route: String,
    backend: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    route: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CheckLabels {
    backend: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

/// What a source last did, for `/routes` and the age gauge.
#[derive(Clone, Copy, Debug, Default)]
pub struct SourceHealth {
    /// When the source last read successfully (changed or not).
    pub last_good: Option<Instant>,
    /// The same moment as seconds since the Unix epoch, for JSON.
    pub last_good_unix: Option<f64>,
    pub errors: u64,
}

/// Every family, and what discovery reports about its sources.
#[derive(Default)]
pub struct Metrics {
    accepted: Family<RouteLabels, Counter>,
    refused: Family<RefusedLabels, Counter>,
    active: Family<BackendLabels, Gauge>,
    finished: Family<CloseLabels, Counter>,
    bytes_sent: Family<BackendLabels, Counter>,
    bytes_received: Family<BackendLabels, Counter>,
    connect_failures: Family<CloseLabels, Counter>,
    discovery_updates: Family<SourceLabels, Counter>,
    discovery_errors: Family<SourceLabels, Counter>,
    discovery_endpoints: Family<SourceLabels, Gauge>,
    omni_lookups: Family<ResultLabels, Counter>,
    ejections: Family<BackendLabels, Counter>,
    checks: Family<CheckLabels, Counter>,
    sources: Mutex<HashMap<String, SourceHealth>>,
    /// Running drivers per source name: a source's series go when its last driver stops
    /// (a route switched to another spec), so stale counts do not linger.
    running: Mutex<HashMap<String, usize>>,
}

/// Counts a running source driver; dropping it uncounts it.
pub struct SourceGuard {
    metrics: Arc<Metrics>,
    source: String,
}

impl Drop for SourceGuard {
    fn drop(&mut self) {
        self.metrics.source_stopped(&self.source);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Metrics {
    /// The families, registered in `registry` under their public names.
    pub fn new(registry: &mut Registry) -> Arc<Metrics> {
        let m = Metrics::default();
        registry.register(
            "connections_accepted",
            "Connections accepted, by route (listen address)",
            m.accepted.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections accepted and then refused, by route and reason: no_backend (none discovered, none answered, or omni found no declaration), max_connections (the route's or the omni declaration's limit), proxy_header (a trusted source's PROXY protocol header was missing or malformed), tls_handshake (a --tls-listen client's TLS handshake failed: no certificate, another CA, expired, ...), tls_not_allowed (its verified certificate has no name in tls_allow)",
            m.refused.clone(),
        );
        registry.register(
            "connections_active",
            "Connections open to a backend now, by route and backend",
            m.active.clone(),
        );
        registry.register(
            "connections_finished",
            "Connections ended, by route, backend and close reason",
            m.finished.clone(),
        );
        registry.register(
            "sent_bytes",
            "Bytes from clients to backends, counted as they move",
            m.bytes_sent.clone(),
        );
        registry.register(
            "received_bytes",
            "Bytes from backends to clients, counted as they move",
            m.bytes_received.clone(),
        );
        registry.register(
            "connect_failures",
            "Failed backend connects by reason (refused, timeout, error, tls (the TLS handshake with a tls+ backend failed), no_backend, local_resources); backend is empty for no_backend and local_resources (the proxy itself was out of descriptors, memory or ports)",
            m.connect_failures.clone(),
        );
        registry.register(
            "discovery_updates",
            "New endpoint sets published, by source (backend spec)",
            m.discovery_updates.clone(),
        );
        registry.register(
            "discovery_errors",
            "Failed discovery reads, by source",
            m.discovery_errors.clone(),
        );
        registry.register(
            "discovery_endpoints",
            "Endpoints in the current set, by source",
            m.discovery_endpoints.clone(),
        );
        registry.register(
            "backend_ejections",
            "Backends ejected after failed connects in a row (--eject-after), by route and backend",
            m.ejections.clone(),
        );
        registry.register(
            "backend_checks",
            "Active health checks (--check), by backend and result (passed, failed)",
            m.checks.clone(),
        );
        registry.register(
            "omni_lookups",
            "Omni-mode routing lookups: hit (in the index), miss (needed a refresh), refused (no container or no declaration)",
            m.omni_lookups.clone(),
        );
        Arc::new(m)
    }

    /// A registry of its own, for a part used alone (a test, a tool).
    pub fn unregistered() -> Arc<Metrics> {
        Metrics::new(&mut Registry::default())
    }

    /// The series of the route labelled `route` (its listen address).
    pub fn route(self: &Arc<Self>, route: &str) -> RouteMetrics {
        RouteMetrics {
            accepted: self
                .accepted
                .get_or_create(&RouteLabels {
                    route: route.to_string(),
                })
                .clone(),
            label: route.to_string(),
            open: Gauge::default(),
            refused: RwLock::default(),
            backends: RwLock::default(),
            failures: RwLock::default(),
            ejected: RwLock::default(),
            departed: Departed::default(),
            metrics: self.clone(),
        }
    }

    /// Counts one active check of `backend`.
    pub fn backend_check(&self, backend: SocketAddr, passed: bool) {
        self.checks
            .get_or_create(&CheckLabels {
                backend: backend.to_string(),
                result: if passed { "passed" } else { "failed" }.to_string(),
            })
            .inc();
    }

    /// Removes `backend`'s check series once nothing checks it any more.
    pub fn forget_checks(&self, backend: SocketAddr) {
        for result in ["passed", "failed"] {
            self.checks.remove(&CheckLabels {
                backend: backend.to_string(),
                result: result.to_string(),
            });
        }
    }

    /// Counts one omni-mode lookup: `hit`, `miss` or `refused`.
    pub fn omni_lookup(&self, result: &'static str) {
        self.omni_lookups
            .get_or_create(&ResultLabels {
                result: result.to_string(),
            })
            .inc();
    }

    /// A source driver for `source` starts; its series live until the guard drops.
    pub fn source_started(self: &Arc<Self>, source: &str) -> SourceGuard {
        *lock(&self.running).entry(source.to_string()).or_insert(0) += 1;
        SourceGuard {
            metrics: self.clone(),
            source: source.to_string(),
        }
    }

    fn source_stopped(&self, source: &str) {
        let mut running = lock(&self.running);
        let Some(n) = running.get_mut(source) else {
            return;
        };
        *n -= 1;
        if *n > 0 {
            return;
        }
        running.remove(source);
        let labels = SourceLabels {
            source: source.to_string(),
        };
        self.discovery_updates.remove(&labels);
        self.discovery_errors.remove(&labels);
        self.discovery_endpoints.remove(&labels);
        lock(&self.sources).remove(source);
    }

    /// A source read successfully; `endpoints` is the set's size when the read is an
    /// endpoint set (not an intermediate stage), `changed` whether it was new.
    pub fn source_ok(&self, source: &str, endpoints: Option<usize>, changed: bool) {
        let labels = SourceLabels {
            source: source.to_string(),
        };
        if let Some(n) = endpoints {
            self.discovery_endpoints
                .get_or_create(&labels)
                .set(n as i64);
            if changed {
                self.discovery_updates.get_or_create(&labels).inc();
            }
        }
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .ok();
        let mut sources = lock(&self.sources);
        let health = sources.entry(labels.source).or_default();
        health.last_good = Some(Instant::now());
        health.last_good_unix = unix;
    }

    pub fn source_error(&self, source: &str) {
        let labels = SourceLabels {
            source: source.to_string(),
        };
        self.discovery_errors.get_or_create(&labels).inc();
        lock(&self.sources).entry(labels.source).or_default().errors += 1;
    }

    pub fn source(&self, source: &str) -> Option<SourceHealth> {
        lock(&self.sources).get(source).copied()
    }
}

/// One route's series, looked up once instead of per connection: a connection then
/// builds no label strings and takes no family lock when it opens and closes. The admin
/// view's totals are read from these same counters ([`RouteMetrics::totals`]).
pub struct RouteMetrics {
    metrics: Arc<Metrics>,
    label: String,
    accepted: Counter,
    /// Connections accepted and not yet ended, connecting ones included (the family's
    /// `connections_active` counts only those connected to a backend).
    open: Gauge,
    /// `connections_refused` by reason, each made on first use.
    refused: RwLock<Vec<(&'static str, Counter)>>,
    /// By backend address; as the families themselves, never shrinks while the route
    /// lives.
    backends: RwLock<HashMap<SocketAddr, Arc<BackendMetrics>>>,
    /// `connect_failures` by (backend, reason); the backend is empty for `no_backend`.
    failures: RwLock<Vec<(String, &'static str, Counter)>>,
    /// Backends with a `backend_ejections` series, so pruning can remove theirs too.
    ejected: RwLock<HashSet<SocketAddr>>,
    /// What the series of backends that left (and were removed) had counted, so the
    /// route's totals do not go down when a backend goes away.
    departed: Departed,
}

#[derive(Default)]
struct Departed {
    sent: AtomicU64,
    received: AtomicU64,
    connect_failures: AtomicU64,
}

/// The series one backend of a route updates.
pub struct BackendMetrics {
    pub active: Gauge,
    pub sent: Counter,
    pub received: Counter,
    labels: BackendLabels,
    family: Family<CloseLabels, Counter>,
    /// `connections_finished` by close reason, each created when first used.
    finished: RwLock<Vec<(&'static str, Counter)>>,
}

/// A route's totals, as the admin view shows them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RouteTotals {
    pub open: u64,
    pub accepted: u64,
    pub refused: u64,
    pub connect_failures: u64,
    pub sent: u64,
    pub received: u64,
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

impl RouteMetrics {
    /// A connection was accepted; the guard counts it open until it drops.
    pub fn accepted(&self) -> OpenGuard<'_> {
        self.accepted.inc();
        self.open.inc();
        OpenGuard(&self.open)
    }

    /// Counts a connection refused for `reason` (`no_backend`, `max_connections`,
    /// `proxy_header`).
    pub fn refused(&self, reason: &'static str) {
        if let Some((_, c)) = read(&self.refused).iter().find(|(r, _)| *r == reason) {
            c.inc();
            return;
        }
        let mut refused = write(&self.refused);
        if let Some((_, c)) = refused.iter().find(|(r, _)| *r == reason) {
            c.inc();
            return;
        }
        let counter = self
            .metrics
            .refused
            .get_or_create(&RefusedLabels {
                route: self.label.clone(),
                reason: reason.to_string(),
            })
            .clone();
        counter.inc();
        refused.push((reason, counter));
    }

    pub fn open(&self) -> u64 {
        self.open.get().max(0) as u64
    }

    /// Counts a failed connect to `backend` (`None` when there was none to try).
    pub fn connect_failed(&self, backend: Option<SocketAddr>, reason: &'static str) {
        let backend = backend.map(|b| b.to_string()).unwrap_or_default();
        if let Some((_, _, c)) = read(&self.failures)
            .iter()
            .find(|(b, r, _)| *r == reason && *b == backend)
        {
            c.inc();
            return;
        }
        let counter = self
            .metrics
            .connect_failures
            .get_or_create(&CloseLabels {
                route: self.label.clone(),
                backend: backend.clone(),
                reason: reason.to_string(),
            })
            .clone();
        counter.inc();
        let mut failures = write(&self.failures);
        if !failures
            .iter()
            .any(|(b, r, _)| *r == reason && *b == backend)
        {
            failures.push((backend, reason, counter));
        }
    }

    /// Counts an ejection of `backend` (rare: a family lookup is fine).
    pub fn ejected(&self, backend: SocketAddr) {
        self.metrics
            .ejections
            .get_or_create(&BackendLabels {
                route: self.label.clone(),
                backend: backend.to_string(),
            })
            .inc();
        write(&self.ejected).insert(backend);
    }

    /// The series of connections to `backend`.
    pub fn backend(&self, backend: SocketAddr) -> Arc<BackendMetrics> {
        if let Some(s) = read(&self.backends).get(&backend) {
            return s.clone();
        }
        write(&self.backends)
            .entry(backend)
            .or_insert_with(|| {
                let m = &self.metrics;
                let labels = BackendLabels {
                    route: self.label.clone(),
                    backend: backend.to_string(),
                };
                Arc::new(BackendMetrics {
                    active: m.active.get_or_create(&labels).clone(),
                    sent: m.bytes_sent.get_or_create(&labels).clone(),
                    received: m.bytes_received.get_or_create(&labels).clone(),
                    family: m.finished.clone(),
                    finished: RwLock::default(),
                    labels,
                })
            })
            .clone()
    }

    /// The route's totals, summed from its series (and those of departed backends).
    pub fn totals(&self) -> RouteTotals {
        let backends = read(&self.backends);
        let gone = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RouteTotals {
            open: self.open(),
            accepted: self.accepted.get(),
            refused: read(&self.refused).iter().map(|(_, c)| c.get()).sum(),
            connect_failures: gone(&self.departed.connect_failures)
                + read(&self.failures)
                    .iter()
                    .map(|(_, _, c)| c.get())
                    .sum::<u64>(),
            sent: gone(&self.departed.sent) + backends.values().map(|b| b.sent.get()).sum::<u64>(),
            received: gone(&self.departed.received)
                + backends.values().map(|b| b.received.get()).sum::<u64>(),
        }
    }

    /// Removes the series of every backend not in `live` that no connection holds, so
    /// churning backend addresses cannot grow the families (and memory) without bound.
    /// Their counts move into the route's totals. Returns how many backends went.
    pub fn prune(&self, live: &HashSet<SocketAddr>) -> usize {
        let m = &self.metrics;
        let mut removed = 0;
        write(&self.backends).retain(|addr, b| {
            // Held by the map alone: no connection is open (or opening) to it.
            if live.contains(addr) || Arc::strong_count(b) > 1 || b.active.get() != 0 {
                return true;
            }
            self.departed
                .sent
                .fetch_add(b.sent.get(), Ordering::Relaxed);
            self.departed
                .received
                .fetch_add(b.received.get(), Ordering::Relaxed);
            m.active.remove(&b.labels);
            m.bytes_sent.remove(&b.labels);
            m.bytes_received.remove(&b.labels);
            for (reason, _) in read(&b.finished).iter() {
                m.finished.remove(&CloseLabels {
                    route: b.labels.route.clone(),
                    backend: b.labels.backend.clone(),
                    reason: reason.to_string(),
                });
            }
            removed += 1;
            false
        });
        write(&self.ejected).retain(|addr| {
            let keep = live.contains(addr);
            if !keep {
                m.ejections.remove(&BackendLabels {
                    route: self.label.clone(),
                    backend: addr.to_string(),
                });
            }
            keep
        });
        write(&self.failures).retain(|(backend, reason, counter)| {
            let Ok(addr) = backend.parse::<SocketAddr>() else {
                return true; // no_backend and local_resources: not a backend's
            };
            if live.contains(&addr) {
                return true;
            }
            self.departed
                .connect_failures
                .fetch_add(counter.get(), Ordering::Relaxed);
            m.connect_failures.remove(&CloseLabels {
                route: self.label.clone(),
                backend: backend.clone(),
                reason: reason.to_string(),
            });
            false
        });
        removed
    }
}

impl BackendMetrics {
    /// Counts a connection to this backend that ended with `reason`.
    pub fn finished(&self, reason: &'static str) {
        if let Some((_, c)) = read(&self.finished).iter().find(|(r, _)| *r == reason) {
            c.inc();
            return;
        }
        let counter = self
            .family
            .get_or_create(&CloseLabels {
                route: self.labels.route.clone(),
                backend: self.labels.backend.clone(),
                reason: reason.to_string(),
            })
            .clone();
        counter.inc();
        let mut known = write(&self.finished);
        if !known.iter().any(|(r, _)| *r == reason) {
            known.push((reason, counter));
        }
    }
}

/// Counts a connection open while it lives, however its task ends.
pub struct OpenGuard<'a>(&'a Gauge);

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The values computed when `/metrics` is read, not written by anyone beforehand: how
/// long ago each source last read successfully, and the containers in the omni index.
pub struct ScrapeTime<F, B> {
    pub metrics: Arc<Metrics>,
    /// Containers in every omni route's index, in all.
    pub omni_index_containers: F,
    /// Every (route, backend) of the current sets, and whether it is up (not cooling
    /// down, ejected or down by check).
    pub backends_up: B,
}

impl<F, B> std::fmt::Debug for ScrapeTime<F, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScrapeTime")
    }
}

impl<F, B> Collector for ScrapeTime<F, B>
where
    F: Fn() -> usize + Send + Sync + 'static,
    B: Fn() -> Vec<(String, String, bool)> + Send + Sync + 'static,
{
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let ages: Vec<(String, f64)> = lock(&self.metrics.sources)
            .iter()
            .filter_map(|(name, h)| Some((name.clone(), h.last_good?.elapsed().as_secs_f64())))
            .collect();
        let mut family = encoder.encode_descriptor(
            "discovery_seconds_since_good_update",
            "Seconds since the source last read successfully",
            None,
            MetricType::Gauge,
        )?;
        for (source, age) in ages {
            let labels = SourceLabels { source };
            ConstGauge::<f64>::new(age).encode(family.encode_family(&labels)?)?;
        }
        let containers = ConstGauge::new((self.omni_index_containers)() as i64);
        let gauge = encoder.encode_descriptor(
            "omni_index_containers",
            "Containers in the omni-mode index",
            None,
            containers.metric_type(),
        )?;
        containers.encode(gauge)?;
        let mut family = encoder.encode_descriptor(
            "backend_up",
            "1 while a backend of a route's current set is up (or not checked yet), 0 while it cools down, is ejected or is down by check",
            None,
            MetricType::Gauge,
        )?;
        for (route, backend, up) in (self.backends_up)() {
            let labels = BackendLabels { route, backend };
            ConstGauge::new(i64::from(up)).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// The text exposition of every metric in `registry`.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The totals the admin view shows are the families' own series, summed.
    #[test]
    fn route_totals_are_summed_from_the_series() {
        let mut registry = Registry::with_prefix("ambassadord");
        let metrics = Metrics::new(&mut registry);
        let route = metrics.route("127.0.0.1:7000");
        let a = route.backend("10.0.0.1:1".parse().unwrap());
        let b = route.backend("10.0.0.2:1".parse().unwrap());
        {
            let _open = route.accepted();
            a.sent.inc_by(10);
            b.sent.inc_by(5);
            b.received.inc_by(7);
            assert_eq!(route.totals().open, 1);
        }
        route.connect_failed(Some("10.0.0.3:1".parse().unwrap()), "refused");
        route.connect_failed(None, "no_backend");
        route.refused("no_backend");
        route.refused("max_connections");
        route.refused("max_connections");
        a.finished("client_closed");
        let totals = route.totals();
        assert_eq!(
            totals,
            RouteTotals {
                open: 0,
                accepted: 1,
                refused: 3,
                connect_failures: 2,
                sent: 15,
                received: 7
            }
        );
        let text = encode(&registry);
        for line in [
            "ambassadord_sent_bytes_total{route=\"127.0.0.1:7000\",backend=\"10.0.0.1:1\"} 10",
            "ambassadord_connect_failures_total{route=\"127.0.0.1:7000\",backend=\"\",reason=\"no_backend\"} 1",
            "ambassadord_connections_finished_total{route=\"127.0.0.1:7000\",backend=\"10.0.0.1:1\",reason=\"client_closed\"} 1",
            "ambassadord_connections_refused_total{route=\"127.0.0.1:7000\",reason=\"max_connections\"} 2",
            "ambassadord_connections_refused_total{route=\"127.0.0.1:7000\",reason=\"no_backend\"} 1",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
    }

    /// A backend that left the set and has no open connection loses its series; its
    /// counts stay in the route's totals; one still connected keeps its series.
    #[test]
    fn departed_backends_lose_their_series_but_not_their_counts() {
        let mut registry = Registry::with_prefix("ambassadord");
        let metrics = Metrics::new(&mut registry);
        let route = metrics.route("127.0.0.1:7000");
        let gone: SocketAddr = "10.0.0.1:1".parse().unwrap();
        let held: SocketAddr = "10.0.0.2:1".parse().unwrap();
        route.backend(gone).sent.inc_by(10);
        route.backend(gone).finished("client_closed");
        route.connect_failed(Some(gone), "refused");
        let open = route.backend(held);
        open.received.inc_by(4);
        let before = route.totals();
        assert_eq!(route.prune(&HashSet::new()), 1);
        assert_eq!(route.totals(), before);
        let text = encode(&registry);
        assert!(!text.contains("10.0.0.1:1"), "{text}");
        assert!(text.contains("backend=\"10.0.0.2:1\""), "{text}");
        drop(open);
        assert_eq!(route.prune(&HashSet::from([held])), 0);
        assert_eq!(route.prune(&HashSet::new()), 1);
        assert_eq!(route.totals(), before);
    }

    /// Scrape-time values are computed by the collector when the registry is encoded.
    #[test]
    fn scrape_time_values_are_computed_when_read() {
        let mut registry = Registry::with_prefix("ambassadord");
        let metrics = Metrics::new(&mut registry);
        let containers = Arc::new(AtomicU64::new(3));
        let count = containers.clone();
        registry.register_collector(Box::new(ScrapeTime {
            metrics: metrics.clone(),
            omni_index_containers: move || {
                count.load(std::sync::atomic::Ordering::Relaxed) as usize
            },
            backends_up: || {
                vec![
                    ("r:1".to_string(), "10.0.0.1:1".to_string(), true),
                    ("r:1".to_string(), "10.0.0.2:1".to_string(), false),
                ]
            },
        }));
        let _guard = metrics.source_started("a:1");
        metrics.source_ok("a:1", Some(1), true);
        let text = encode(&registry);
        assert!(
            text.contains("ambassadord_omni_index_containers 3"),
            "{text}"
        );
        assert!(
            text.contains("ambassadord_discovery_seconds_since_good_update{source=\"a:1\"} "),
            "{text}"
        );
        assert!(
            text.contains("ambassadord_backend_up{route=\"r:1\",backend=\"10.0.0.1:1\"} 1")
                && text.contains("ambassadord_backend_up{route=\"r:1\",backend=\"10.0.0.2:1\"} 0"),
            "{text}"
        );
        containers.store(5, Ordering::Relaxed);
        assert!(encode(&registry).contains("ambassadord_omni_index_containers 5"));
    }
}
