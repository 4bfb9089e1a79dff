//! Omni mode: one ambassador per host routes each connection by what the connecting
//! container declares for the port it was trying to reach.
//!
//! Per connection: the original destination port (SO_ORIGINAL_DST, set by the nat
//! REDIRECT that `--setup-iptables` installs), the peer's IP → its container through the
//! [`ContainerIndex`], the container's declaration for that port → a shared source for
//! that spec → the same balancer and data path as standard mode. Sources are shared by
//! every container that declares the same spec and stopped once none does.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use socket2::SockRef;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::balance::Balancer;
use super::check::Checker;
use crate::config::CheckConfig;
use crate::discovery::Discovery;
use crate::docker::index::ContainerIndex;
use crate::metrics::Metrics;
use crate::spec::Spec;

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
}

/// Where one omni connection goes.
pub struct OmniRoute {
    pub balancer: Arc<Balancer>,
    /// `container:port`, for the connection's log line.
    pub label: String,
}

struct Shared {
    balancer: Arc<Balancer>,
    stop: CancellationToken,
}

pub struct Omni {
    index: Arc<ContainerIndex>,
    discovery: Arc<Discovery>,
    metrics: Arc<Metrics>,
    sources: Mutex<HashMap<Spec, Shared>>,
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
        let port = original_port(client, peer)?;
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
        let Some(spec) = container.declarations.get(&port) else {
            return Err(OmniError::NotDeclared {
                container: container.name.clone(),
                port,
            });
        };
        Ok(OmniRoute {
            balancer: self.source_for(spec),
            label: format!("{}:{port}", crate::logsafe::outside(&container.name)),
        })
    }

    /// The shared balancer for `spec`, starting its source on first use.
    fn source_for(&self, spec: &Spec) -> Arc<Balancer> {
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(shared) = sources.get(spec) {
            return shared.balancer.clone();
        }
        let stop = self.stop.child_token();
        let endpoints = self.discovery.spawn(spec, stop.clone());
        let mut balancer = Balancer::new(spec.to_string(), endpoints);
        if let Some((checker, check)) = &self.checks {
            let checks = checker.follow(check.clone(), balancer.sets(), stop.child_token());
            balancer = balancer.with_checks(checks);
        }
        let balancer = Arc::new(balancer);
        debug!(spec = %spec, "source started");
        sources.insert(
            spec.clone(),
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
            let declared: HashSet<Spec> = self
                .index
                .containers()
                .iter()
                .flat_map(|c| c.declarations.values().cloned())
                .collect();
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

/// The port the client was really connecting to before the nat REDIRECT. A socket that
/// was not redirected has no original destination (ENOENT), and its own local port is
/// then the answer. `peer` is the client's canonical address.
pub fn original_port(stream: &TcpStream, peer: IpAddr) -> Result<u16, OmniError> {
    // On a dual-stack listener an IPv4 client arrives v4-mapped and answers the IPv4
    // option; an IPv6 client answers only the IPv6 one. The local address is read only
    // when neither answers: one system call fewer on the usual, redirected path.
    let sock = SockRef::from(stream);
    let original = match peer {
        IpAddr::V4(_) => sock.original_dst_v4(),
        IpAddr::V6(_) => sock.original_dst_v6(),
    };
    if let Some(addr) = original.ok().and_then(|sa| sa.as_socket()) {
        return Ok(addr.port());
    }
    stream
        .local_addr()
        .map(|local| local.port())
        .map_err(OmniError::LocalAddr)
}
