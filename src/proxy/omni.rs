//! Omni mode: one ambassador per host routes each connection by what the connecting
//! container declares for the port it was trying to reach.
//!
//! Per connection: the original destination port (SO_ORIGINAL_DST, set by the nat
//! REDIRECT that `--setup-iptables` installs), the peer's IP → its container through the
//! [`ContainerIndex`], the container's declaration for that port → a shared source for
//! that spec → the same balancer and data path as standard mode. Sources are shared by
//! every container that declares the same spec and stopped once none does.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};

use socket2::SockRef;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::balance::Balancer;
use super::check::Checker;
use super::limit::{self, Slot};
use crate::config::CheckConfig;
use crate::discovery::Discovery;
use crate::docker::index::ContainerIndex;
use crate::metrics::Metrics;
use crate::proxy_protocol::Version;
use crate::spec::BackendSpec;

/// Why an omni connection has nowhere to go.
#[derive(Debug, thiserror::Error)]
pub enum OmniError {
    #[error("no running container has address {peer} (port {port})")]
    NoContainer { peer: IpAddr, port: u16 },
    #[error(
        "container '{}' declares no backend for port {port} (set BACKEND_{port} or label ambassadord.backend.{port})",
        crate::logsafe::outside(container)
    )]
    NotDeclared { container: String, port: u16 },
    #[error("cannot read the local address: {0}")]
    LocalAddr(std::io::Error),
    #[error(
        "container '{}' has its limit of {max} connections to port {port} open (ambassadord.max-connections.{port})",
        crate::logsafe::outside(container)
    )]
    AtLimit {
        container: String,
        port: u16,
        max: u32,
    },
}

impl OmniError {
    /// The `connections_refused` reason it counts as.
    pub fn refusal(&self) -> &'static str {
        match self {
            OmniError::AtLimit { .. } => "max_connections",
            _ => "no_backend",
        }
    }
}

/// Where one omni connection goes.
pub struct OmniRoute {
    pub balancer: Arc<Balancer>,
    /// `container:port`, for the connection's log line.
    pub label: String,
    /// Where the container was really connecting to (its PROXY header's destination).
    pub to: SocketAddr,
    /// The container's own choice of header toward the backend, if it made one.
    pub proxy_protocol: Option<Version>,
    /// Its place under the container's limit for the port, if it set one.
    pub slot: Option<Slot>,
    /// The declaration is `tls+`: each backend is reached over TLS.
    pub tls: bool,
}

struct Shared {
    balancer: Arc<Balancer>,
    stop: CancellationToken,
}

pub struct Omni {
    index: Arc<ContainerIndex>,
    discovery: Arc<Discovery>,
    metrics: Arc<Metrics>,
    /// Keyed by the whole declaration's spec, `tls+` included: a backend that fails
    /// TLS for one container is not cooled down for another that speaks plain TCP to it.
    sources: Mutex<HashMap<BackendSpec, Shared>>,
    /// Open connections by (container id, port), for the containers that limit theirs.
    open: Mutex<HashMap<(String, u16), Arc<AtomicU32>>>,
    /// The route's active checks, applied to every source it starts.
    checks: Option<(Arc<Checker>, CheckConfig)>,
    stop: CancellationToken,
}

impl Omni {
    /// The router over `index` (which the server keeps following the engine).
    /// Everything it starts ends when `stop` fires.
    pub fn start(
        index: Arc<ContainerIndex>,
        discovery: Arc<Discovery>,
        metrics: Arc<Metrics>,
        checks: Option<(Arc<Checker>, CheckConfig)>,
        stop: CancellationToken,
    ) -> Arc<Omni> {
        let omni = Arc::new(Omni {
            index,
            discovery,
            metrics,
            sources: Mutex::new(HashMap::new()),
            open: Mutex::default(),
            checks,
            stop,
        });
        tokio::spawn(omni.clone().prune_unused());
        omni
    }

    pub fn index(&self) -> &ContainerIndex {
        &self.index
    }

    /// Finds where `client` (connected from `peer`) should go, or says why it cannot.
    pub async fn route(&self, client: &TcpStream, peer: IpAddr) -> Result<OmniRoute, OmniError> {
        let to = original_dst(client, peer)?;
        let port = to.port();
        let count = |result| self.metrics.omni_lookup(result);
        count(if self.index.get(peer).is_some() {
            "hit"
        } else {
            "miss"
        });
        let container = self.index.lookup(peer).await;
        if container
            .as_ref()
            .is_none_or(|c| !c.declarations.contains_key(&port))
        {
            count("refused");
        }
        let Some(container) = container else {
            return Err(OmniError::NoContainer { peer, port });
        };
        let Some(declared) = container.declarations.get(&port) else {
            return Err(OmniError::NotDeclared {
                container: container.name.clone(),
                port,
            });
        };
        let slot = match declared.max_connections {
            None => None,
            Some(max) => {
                let count = {
                    let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
                    open.entry((container.id.clone(), port))
                        .or_default()
                        .clone()
                };
                Some(limit::take(&count, max).ok_or_else(|| OmniError::AtLimit {
                    container: container.name.clone(),
                    port,
                    max,
                })?)
            }
        };
        Ok(OmniRoute {
            balancer: self.source_for(&declared.spec),
            tls: declared.spec.tls,
            label: format!("{}:{port}", crate::logsafe::outside(&container.name)),
            to,
            proxy_protocol: declared.proxy_protocol,
            slot,
        })
    }

    /// The shared balancer for `spec`, starting its source on first use.
    fn source_for(&self, backend: &BackendSpec) -> Arc<Balancer> {
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(shared) = sources.get(backend) {
            return shared.balancer.clone();
        }
        let stop = self.stop.child_token();
        let endpoints = self.discovery.spawn(&backend.spec, stop.clone());
        let mut balancer = Balancer::new(backend.to_string(), endpoints);
        if let Some((checker, check)) = &self.checks {
            let checks = checker.follow(check.clone(), balancer.sets(), stop.child_token());
            balancer = balancer.with_checks(checks);
        }
        let balancer = Arc::new(balancer);
        debug!(spec = %backend, "source started");
        sources.insert(
            backend.clone(),
            Shared {
                balancer: balancer.clone(),
                stop,
            },
        );
        balancer
    }

    /// Stops sources that no running container declares any more.
    async fn prune_unused(self: Arc<Self>) {
        let mut changes = self.index.subscribe();
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                r = changes.changed() => if r.is_err() { return },
            }
            let declared: HashSet<BackendSpec> = self
                .index
                .containers()
                .iter()
                .flat_map(|c| c.declarations.values().map(|d| d.spec.clone()))
                .collect();
            // The limit counts of containers that are gone, and that no connection holds.
            let running: HashSet<String> = self
                .index
                .containers()
                .iter()
                .map(|c| c.id.clone())
                .collect();
            self.open
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|(id, _), count| running.contains(id) || Arc::strong_count(count) > 1);
            let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
            sources.retain(|spec, shared| {
                let keep = declared.contains(spec);
                if !keep {
                    debug!(spec = %spec, "source stopped: no container declares it");
                    shared.stop.cancel();
                }
                keep
            });
        }
    }

    /// The balancer of every source running now.
    pub fn balancers(&self) -> Vec<Arc<Balancer>> {
        let sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        sources.values().map(|s| s.balancer.clone()).collect()
    }

    /// How many distinct sources are running (for status and tests).
    pub fn source_count(&self) -> usize {
        self.sources.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// Where the client was really connecting to before the nat REDIRECT. A socket that
/// was not redirected has no original destination (ENOENT), and its own local address
/// is then the answer. `peer` is the client's canonical address.
pub fn original_dst(stream: &TcpStream, peer: IpAddr) -> Result<SocketAddr, OmniError> {
    // On a dual-stack listener an IPv4 client arrives v4-mapped and answers the IPv4
    // option; an IPv6 client answers only the IPv6 one. The local address is read only
    // when neither answers: one system call fewer on the usual, redirected path.
    let sock = SockRef::from(stream);
    let original = match peer {
        IpAddr::V4(_) => sock.original_dst_v4(),
        IpAddr::V6(_) => sock.original_dst_v6(),
    };
    if let Some(addr) = original.ok().and_then(|sa| sa.as_socket()) {
        return Ok(addr);
    }
    stream.local_addr().map_err(OmniError::LocalAddr)
}
