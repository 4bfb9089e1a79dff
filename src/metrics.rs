//! Process-wide metrics: the Prometheus families the data path, discovery and omni mode
//! update, and their text exposition for `GET /metrics`.
//!
//! One registry per process (the sources and connection tasks have no other shared
//! context to carry it). The hot path never looks a family up per connection: each route
//! keeps its series (proxy/mod.rs), so a family is touched only on a backend's first
//! connection or a new close reason. Byte counters are added to as each read moves
//! (one atomic add), so long transfers show while they run.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub route: String,
    pub backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloseLabels {
    pub route: String,
    pub backend: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

/// What a source last did, for `/routes` and the age gauge.
#[derive(Clone, Copy, Debug)]
pub struct SourceHealth {
    /// When the source last read successfully (changed or not).
    pub last_good: Option<Instant>,
    /// The same moment as seconds since the Unix epoch, for JSON.
    pub last_good_unix: Option<f64>,
    pub errors: u64,
}

pub struct Metrics {
    pub accepted: Family<RouteLabels, Counter>,
    pub active: Family<BackendLabels, Gauge>,
    pub finished: Family<CloseLabels, Counter>,
    pub bytes_sent: Family<BackendLabels, Counter>,
    pub bytes_received: Family<BackendLabels, Counter>,
    pub connect_failures: Family<CloseLabels, Counter>,
    pub discovery_updates: Family<SourceLabels, Counter>,
    pub discovery_errors: Family<SourceLabels, Counter>,
    pub discovery_endpoints: Family<SourceLabels, Gauge>,
    discovery_age: Family<SourceLabels, Gauge<f64, AtomicU64>>,
    pub omni_index_size: Gauge,
    pub omni_lookups: Family<ResultLabels, Counter>,
    sources: Mutex<HashMap<String, SourceHealth>>,
    /// Running drivers per source name: a source's series go when its last driver stops
    /// (a route switched to another spec), so stale counts do not linger.
    running: Mutex<HashMap<String, usize>>,
    registry: Registry,
}

/// Counts a running source driver for [`Metrics`]; dropping it uncounts it.
pub struct SourceGuard(String);

impl Drop for SourceGuard {
    fn drop(&mut self) {
        global().source_stopped(&self.0);
    }
}

/// The process's metrics.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

impl Metrics {
    fn new() -> Metrics {
        let m = Metrics {
            accepted: Family::default(),
            active: Family::default(),
            finished: Family::default(),
            bytes_sent: Family::default(),
            bytes_received: Family::default(),
            connect_failures: Family::default(),
            discovery_updates: Family::default(),
            discovery_errors: Family::default(),
            discovery_endpoints: Family::default(),
            discovery_age: Family::default(),
            omni_index_size: Gauge::default(),
            omni_lookups: Family::default(),
            sources: Mutex::new(HashMap::new()),
            running: Mutex::new(HashMap::new()),
            registry: Registry::with_prefix("ambassadord"),
        };
        let mut r = Registry::with_prefix("ambassadord");
        r.register(
            "connections_accepted",
            "Connections accepted, by route (listen address)",
            m.accepted.clone(),
        );
        r.register(
            "connections_active",
            "Connections open to a backend now, by route and backend",
            m.active.clone(),
        );
        r.register(
            "connections_finished",
            "Connections ended, by route, backend and close reason",
            m.finished.clone(),
        );
        r.register(
            "sent_bytes",
            "Bytes from clients to backends, counted as they move",
            m.bytes_sent.clone(),
        );
        r.register(
            "received_bytes",
            "Bytes from backends to clients, counted as they move",
            m.bytes_received.clone(),
        );
        r.register(
            "connect_failures",
            "Failed backend connects by reason (refused, timeout, error, no_backend); backend is empty for no_backend",
            m.connect_failures.clone(),
        );
        r.register(
            "discovery_updates",
            "New endpoint sets published, by source (backend spec)",
            m.discovery_updates.clone(),
        );
        r.register(
            "discovery_errors",
            "Failed discovery reads, by source",
            m.discovery_errors.clone(),
        );
        r.register(
            "discovery_endpoints",
            "Endpoints in the current set, by source",
            m.discovery_endpoints.clone(),
        );
        r.register(
            "discovery_seconds_since_good_update",
            "Seconds since the source last read successfully",
            m.discovery_age.clone(),
        );
        r.register(
            "omni_index_containers",
            "Containers in the omni-mode index",
            m.omni_index_size.clone(),
        );
        r.register(
            "omni_lookups",
            "Omni-mode routing lookups: hit (in the index), miss (needed a refresh), refused (no container or no declaration)",
            m.omni_lookups.clone(),
        );
        Metrics { registry: r, ..m }
    }

    /// A source driver for `source` starts; its series live until the guard drops.
    pub fn source_started(&'static self, source: &str) -> SourceGuard {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        *running.entry(source.to_string()).or_insert(0) += 1;
        SourceGuard(source.to_string())
    }

    fn source_stopped(&self, source: &str) {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
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
        self.discovery_age.remove(&labels);
        self.sources
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(source);
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
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        let health = sources.entry(labels.source).or_insert(SourceHealth {
            last_good: None,
            last_good_unix: None,
            errors: 0,
        });
        health.last_good = Some(Instant::now());
        health.last_good_unix = unix;
    }

    pub fn source_error(&self, source: &str) {
        let labels = SourceLabels {
            source: source.to_string(),
        };
        self.discovery_errors.get_or_create(&labels).inc();
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        sources
            .entry(labels.source)
            .or_insert(SourceHealth {
                last_good: None,
                last_good_unix: None,
                errors: 0,
            })
            .errors += 1;
    }

    pub fn source(&self, source: &str) -> Option<SourceHealth> {
        let sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        sources.get(source).copied()
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        {
            let sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
            for (name, health) in sources.iter() {
                if let Some(at) = health.last_good {
                    self.discovery_age
                        .get_or_create(&SourceLabels {
                            source: name.clone(),
                        })
                        .set(at.elapsed().as_secs_f64());
                }
            }
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
