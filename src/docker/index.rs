//! The container index: which container owns each IP address, what it declares and
//! which labels it carries, kept current from the Docker Engine API. Omni mode routes by
//! it; `docker://` specs choose their backends from it (one index per process).
//!
//! Read-only API use: events, container list, container inspect. The index subscribes to
//! events first (from a point in time just before the list, so nothing falls in the gap),
//! then lists and inspects every running container, then applies the buffered events in
//! order. `die`/`destroy` evict a container so a reused IP never inherits another
//! container's backends; network connect/disconnect re-inspect it. If the event stream
//! fails (daemon restart, socket gone), the index keeps routing from what it knows,
//! reconnects with backoff, and re-lists on reconnect. A lookup miss does one targeted
//! refresh with a deadline; nothing else on the connection path calls Docker.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bollard::Docker;
use bollard::models::{ContainerInspectResponse, EventMessage, EventMessageTypeEnum};
use bollard::query_parameters::{EventsOptions, ListContainersOptions};
use futures_util::StreamExt;
use tokio::sync::{Mutex, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, info, warn};

use super::declare::{Declarations, declarations};
use crate::config::DockerHost;
use crate::discovery::Backoff;
use crate::discovery::docker::Containers;
use crate::logsafe::outside;
use crate::spec::Select;

/// How long a connection from an unknown address may wait for the targeted refresh.
pub const MISS_DEADLINE: Duration = Duration::from_secs(2);
/// After a refresh that did not find an address, further misses for it are refused at
/// once for this long, so an unknown peer cannot make every connection call Docker.
const NEGATIVE_TTL: Duration = Duration::from_secs(1);

/// One running container as omni mode needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    pub id: String,
    /// Without Docker's leading '/'.
    pub name: String,
    pub ips: Vec<IpAddr>,
    pub declarations: Declarations,
    /// The declarations it makes that are not usable, each with why (already naming the
    /// container): shown on the status page, warned about once.
    pub problems: Vec<String>,
    /// Its labels, for `docker://label=…` specs.
    pub labels: BTreeMap<String, String>,
}

impl Container {
    /// Warns about each of this container's bad declarations that `before` (what the
    /// index knew of it) did not already have: one warning per bad declaration, however
    /// often the container is inspected again.
    fn warn_new_problems(&self, before: Option<&Container>) {
        for problem in &self.problems {
            if !before.is_some_and(|b| b.problems.contains(problem)) {
                warn!("{problem}");
            }
        }
    }

    /// Builds the index entry from an inspect answer; `None` for a container that has
    /// stopped (or has no ID). A container still being started counts: its process may
    /// connect before Docker reports it running. Bad declarations are kept in
    /// `problems`, naming the container.
    pub fn from_inspect(c: &ContainerInspectResponse) -> Option<Container> {
        use bollard::models::ContainerStateStatusEnum as Status;
        let id = c.id.clone()?;
        let status = c.state.as_ref().and_then(|s| s.status);
        if matches!(
            status,
            Some(Status::EXITED | Status::DEAD | Status::REMOVING | Status::PAUSED)
        ) {
            return None;
        }
        let name = c
            .name
            .as_deref()
            .unwrap_or(&id)
            .trim_start_matches('/')
            .to_string();
        let env = c
            .config
            .as_ref()
            .and_then(|cfg| cfg.env.clone())
            .unwrap_or_default();
        let labels = c
            .config
            .as_ref()
            .and_then(|cfg| cfg.labels.clone())
            .unwrap_or_default();
        let (declarations, problems) = declarations(&name, &env, &labels);
        let labels: BTreeMap<String, String> = labels.into_iter().collect();
        let mut ips = Vec::new();
        let networks = c
            .network_settings
            .as_ref()
            .and_then(|n| n.networks.as_ref());
        for (network, endpoint) in networks.into_iter().flatten() {
            for addr in [&endpoint.ip_address, &endpoint.global_ipv6_address]
                .into_iter()
                .flatten()
                .filter(|a| !a.is_empty())
            {
                match addr.parse::<IpAddr>() {
                    Ok(ip) => ips.push(ip),
                    Err(_) => warn!(
                        "container '{}': network '{}' reports address '{}', which is not an IP; ignored",
                        outside(&name),
                        outside(network),
                        outside(addr)
                    ),
                }
            }
        }
        ips.sort();
        ips.dedup();
        Some(Container {
            id,
            name,
            ips,
            declarations,
            problems,
            labels,
        })
    }

    /// Whether a `docker://` spec's selector chooses this container.
    pub fn chosen_by(&self, select: &Select) -> bool {
        match select {
            Select::Name(name) => self.name == *name,
            Select::Label { key, value } => self
                .labels
                .get(key)
                .is_some_and(|v| value.as_ref().is_none_or(|want| v == want)),
        }
    }
}

#[derive(Default)]
struct State {
    by_ip: HashMap<IpAddr, Arc<Container>>,
    by_id: HashMap<String, Arc<Container>>,
    /// Addresses a refresh recently failed to find.
    unknown: HashMap<IpAddr, Instant>,
}

impl State {
    fn upsert(&mut self, c: Container) {
        self.evict(&c.id);
        let c = Arc::new(c);
        for ip in &c.ips {
            self.unknown.remove(ip);
            self.by_ip.insert(*ip, c.clone());
        }
        self.by_id.insert(c.id.clone(), c);
    }

    fn evict(&mut self, id: &str) {
        if let Some(old) = self.by_id.remove(id) {
            for ip in &old.ips {
                // Only if the address still points at this container: a new container
                // may already have been given it.
                if self.by_ip.get(ip).is_some_and(|c| c.id == id) {
                    self.by_ip.remove(ip);
                }
            }
        }
    }
}

/// The IP → container index. Cheap to read from every connection task.
/// What went wrong talking to the Docker engine.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("Docker host '{host}': {source}{}", socket_hint(host, source))]
    Client {
        host: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("listing containers: {0}")]
    List(#[source] bollard::errors::Error),
    #[error("inspecting container {id}: {source}")]
    Inspect {
        id: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("event stream: {0}")]
    Events(#[source] bollard::errors::Error),
}

/// A Unix socket that is not there is, in a container, almost always a socket not
/// mounted: say how to mount it.
fn socket_hint(host: &str, source: &bollard::errors::Error) -> &'static str {
    match source {
        bollard::errors::Error::SocketNotFoundError(_) if host.starts_with("unix://") => {
            " (in a container, mount the engine's socket: docker run -v /var/run/docker.sock:/var/run/docker.sock ...; or point --docker-host at it)"
        }
        _ => "",
    }
}

pub struct ContainerIndex {
    docker: Docker,
    state: RwLock<State>,
    /// Serialises targeted refreshes so a burst of misses makes one call at a time.
    refreshing: Mutex<()>,
    /// Bumped on every change, for whoever tracks what containers declare.
    changes: watch::Sender<u64>,
    /// Set once a full list has filled the index: an eviction from the event stream can
    /// change it (and bump `changes`) before that.
    listed: std::sync::atomic::AtomicBool,
}

impl ContainerIndex {
    /// A client of the Engine API at `host`, as config validated it. Does no I/O yet;
    /// fails only if the client refuses the host (a Unix socket that does not exist).
    pub fn new(host: &DockerHost) -> Result<Arc<ContainerIndex>, DockerError> {
        let docker = connect(host)?;
        Ok(Arc::new(ContainerIndex {
            docker,
            state: RwLock::new(State::default()),
            refreshing: Mutex::new(()),
            changes: watch::Sender::new(0),
            listed: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// The container that owns `ip`, if the index knows it.
    pub fn get(&self, ip: IpAddr) -> Option<Arc<Container>> {
        self.read().by_ip.get(&ip).cloned()
    }

    /// Every container known, for status pages and for pruning unused sources.
    pub fn containers(&self) -> Vec<Arc<Container>> {
        self.read().by_id.values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.read().by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the index has been filled from a full list at least once. Not the change
    /// counter: a `die` replayed from the event stream evicts (and bumps it) before the
    /// first list has finished.
    pub fn loaded(&self) -> bool {
        self.listed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// A receiver that changes whenever the index does.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The container that owns `ip`; on a miss, one targeted refresh bounded by
    /// [`MISS_DEADLINE`].
    pub async fn lookup(&self, ip: IpAddr) -> Option<Arc<Container>> {
        if let Some(c) = self.get(ip) {
            return Some(c);
        }
        if self
            .read()
            .unknown
            .get(&ip)
            .is_some_and(|until| *until > Instant::now())
        {
            return None;
        }
        // One targeted refresh; and since a process can connect before Docker has
        // announced its container, also wait for the event stream to index it, both
        // within the deadline.
        let mut changes = self.changes.subscribe();
        let refreshed = tokio::time::timeout(MISS_DEADLINE, async {
            {
                let _one_at_a_time = self.refreshing.lock().await;
                // Another connection's refresh may have found it meanwhile.
                if let Some(c) = self.get(ip) {
                    return Some(c);
                }
                match self.refresh_ip(ip).await {
                    Ok(Some(c)) => return Some(c),
                    Ok(None) => {}
                    Err(e) => debug!(peer = %ip, error = %e, "targeted refresh failed"),
                }
            }
            loop {
                if let Some(c) = self.get(ip) {
                    return Some(c);
                }
                if changes.changed().await.is_err() {
                    return None;
                }
            }
        })
        .await
        .ok()
        .flatten();
        if refreshed.is_none() {
            self.write()
                .unknown
                .insert(ip, Instant::now() + NEGATIVE_TTL);
        }
        refreshed
    }

    /// Lists containers, finds the one with `ip`, and inspects it alone. Containers not
    /// yet reported running are included: a process can connect before its container's
    /// start is announced.
    async fn refresh_ip(&self, ip: IpAddr) -> Result<Option<Arc<Container>>, DockerError> {
        let listed = self
            .docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                ..Default::default()
            }))
            .await
            .map_err(DockerError::List)?;
        let owner = listed.iter().find(|c| {
            let networks = c
                .network_settings
                .as_ref()
                .and_then(|n| n.networks.as_ref());
            networks.into_iter().flatten().any(|(_, ep)| {
                [&ep.ip_address, &ep.global_ipv6_address]
                    .into_iter()
                    .flatten()
                    .any(|a| a.parse::<IpAddr>().ok() == Some(ip))
            })
        });
        let Some(id) = owner.and_then(|c| c.id.clone()) else {
            return Ok(None);
        };
        self.inspect_and_store(&id).await?;
        Ok(self.get(ip))
    }

    async fn inspect_and_store(&self, id: &str) -> Result<(), DockerError> {
        match self.docker.inspect_container(id, None).await {
            Ok(inspect) => {
                match Container::from_inspect(&inspect) {
                    Some(c) => {
                        debug!(container = %c.name, ips = ?c.ips, ports = ?c.declarations.keys().collect::<Vec<_>>(), "container indexed");
                        let before = self.read().by_id.get(id).cloned();
                        c.warn_new_problems(before.as_deref());
                        self.write().upsert(c);
                    }
                    None => self.write().evict(id),
                }
                self.changed();
                Ok(())
            }
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => {
                self.write().evict(id);
                self.changed();
                Ok(())
            }
            Err(source) => Err(DockerError::Inspect {
                id: id.to_string(),
                source,
            }),
        }
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps the index current until `stop` fires: subscribe, list, follow events;
    /// on failure keep the index, back off, and start over.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(10));
        let mut failing = false;
        loop {
            let result = tokio::select! {
                _ = stop.cancelled() => return,
                r = self.sync_and_follow(&mut failing, &mut backoff) => r,
            };
            let e = match result {
                Ok(()) => "the event stream ended".to_string(),
                Err(e) => e.to_string(),
            };
            if !failing {
                warn!(error = %e, containers = self.len(), "lost the Docker engine; routing from the last known containers while reconnecting");
                failing = true;
            } else {
                debug!(error = %e, "Docker engine still unreachable");
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }

    async fn sync_and_follow(
        self: &Arc<Self>,
        failing: &mut bool,
        backoff: &mut Backoff,
    ) -> Result<(), DockerError> {
        // Events from a moment before the list, replayed by the daemon, cover the gap
        // between subscribing and listing; applying one twice is harmless.
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs().saturating_sub(1))
            .unwrap_or(0);
        let filters = HashMap::from([(
            "type".to_string(),
            vec!["container".to_string(), "network".to_string()],
        )]);
        let mut events = self.docker.events(Some(EventsOptions {
            since: Some(since.to_string()),
            until: None,
            filters: Some(filters),
        }));
        let (tx, mut rx) = mpsc::unbounded_channel::<Result<EventMessage, DockerError>>();
        // A container that died is evicted here, as its event arrives, not when the
        // loop below reaches it: that loop may still be inspecting earlier containers,
        // and a new container given the dead one's address must not be routed by the
        // dead one's declarations meanwhile. (The loop evicts it again, in order, which
        // also covers a re-list in between.)
        let index = self.clone();
        let pump = tokio::spawn(async move {
            while let Some(event) = events.next().await {
                if let Ok(event) = &event {
                    index.evict_if_gone(event);
                }
                let stop = event.is_err();
                if tx.send(event.map_err(DockerError::Events)).is_err() || stop {
                    return;
                }
            }
        });
        let _abort_pump = AbortOnDropHandle::new(pump);

        self.relist().await?;
        if *failing {
            info!(
                containers = self.len(),
                "Docker engine reachable again; index rebuilt"
            );
            *failing = false;
        } else {
            info!(containers = self.len(), "container index ready");
        }
        backoff.reset();

        while let Some(event) = rx.recv().await {
            self.apply(event?).await;
        }
        Ok(())
    }

    /// Replaces the whole index with what the engine says now.
    async fn relist(&self) -> Result<(), DockerError> {
        let listed = self
            .docker
            .list_containers(None::<ListContainersOptions>)
            .await
            .map_err(DockerError::List)?;
        let ids: Vec<String> = listed.into_iter().filter_map(|c| c.id).collect();
        let mut fresh = State::default();
        // Inspect a few at a time: hundreds of containers should not take long, nor
        // flood the daemon.
        let mut pending = futures_util::stream::iter(ids.into_iter().map(|id| {
            let docker = self.docker.clone();
            async move {
                let inspected = docker.inspect_container(&id, None).await;
                (id, inspected)
            }
        }))
        .buffer_unordered(8);
        while let Some((id, result)) = pending.next().await {
            match result {
                Ok(inspect) => {
                    if let Some(c) = Container::from_inspect(&inspect) {
                        let before = self.read().by_id.get(&id).cloned();
                        c.warn_new_problems(before.as_deref());
                        fresh.upsert(c);
                    }
                }
                // Gone between list and inspect.
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                }) => {}
                Err(source) => return Err(DockerError::Inspect { id, source }),
            }
        }
        *self.write() = fresh;
        self.listed
            .store(true, std::sync::atomic::Ordering::Release);
        self.changed();
        Ok(())
    }

    /// Evicts the container a `die` or `destroy` event names.
    fn evict_if_gone(&self, event: &EventMessage) {
        let gone = matches!(event.typ, Some(EventMessageTypeEnum::CONTAINER))
            && matches!(event.action.as_deref(), Some("die" | "destroy"));
        if let Some(id) = event
            .actor
            .as_ref()
            .and_then(|a| a.id.as_deref())
            .filter(|_| gone)
        {
            self.write().evict(id);
            self.changed();
        }
    }

    async fn apply(&self, event: EventMessage) {
        let action = event.action.as_deref().unwrap_or("");
        let actor = event.actor.as_ref();
        let id = match event.typ {
            Some(EventMessageTypeEnum::CONTAINER) => actor.and_then(|a| a.id.clone()),
            // Network events name the container in their attributes.
            Some(EventMessageTypeEnum::NETWORK) => actor
                .and_then(|a| a.attributes.as_ref())
                .and_then(|attrs| attrs.get("container").cloned()),
            _ => None,
        };
        let Some(id) = id else { return };
        match (event.typ, action) {
            (Some(EventMessageTypeEnum::CONTAINER), "die" | "destroy") => {
                self.write().evict(&id);
                self.changed();
                debug!(container = %id, action, "container evicted");
            }
            (Some(EventMessageTypeEnum::CONTAINER), "start" | "rename" | "update")
            | (Some(EventMessageTypeEnum::NETWORK), "connect" | "disconnect") => {
                if let Err(e) = self.inspect_and_store(&id).await {
                    warn!(container = %id, error = %e, "cannot inspect container after '{action}'; it is routed from what was known");
                }
            }
            _ => {}
        }
    }
}

impl Containers for ContainerIndex {
    fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn loaded(&self) -> bool {
        ContainerIndex::loaded(self)
    }

    fn select(&self, select: &Select) -> Vec<(String, Vec<IpAddr>)> {
        self.read()
            .by_id
            .values()
            .filter(|c| c.chosen_by(select))
            .map(|c| (c.name.clone(), c.ips.clone()))
            .collect()
    }
}

/// A Docker client for `host`, negotiated lazily by the daemon's answers.
fn connect(host: &DockerHost) -> Result<Docker, DockerError> {
    // No client-side timeout: the event stream is a long-lived request.
    const NO_TIMEOUT: u64 = u64::MAX / 4;
    let docker = match host {
        DockerHost::Unix(path) => Docker::connect_with_unix(
            &path.to_string_lossy(),
            NO_TIMEOUT,
            bollard::API_DEFAULT_VERSION,
        ),
        DockerHost::Tcp(addr) => {
            Docker::connect_with_http(addr, NO_TIMEOUT, bollard::API_DEFAULT_VERSION)
        }
    };
    docker.map_err(|source| DockerError::Client {
        host: host.to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::{ContainerConfig, ContainerState, EndpointSettings, NetworkSettings};

    fn inspect(id: &str, name: &str, ips: &[&str], env: &[&str]) -> ContainerInspectResponse {
        let networks = ips
            .iter()
            .enumerate()
            .map(|(i, ip)| {
                let mut ep = EndpointSettings::default();
                if ip.contains(':') {
                    ep.global_ipv6_address = Some(ip.to_string());
                } else {
                    ep.ip_address = Some(ip.to_string());
                }
                (format!("net{i}"), ep)
            })
            .collect();
        ContainerInspectResponse {
            id: Some(id.into()),
            name: Some(format!("/{name}")),
            state: Some(ContainerState {
                running: Some(true),
                ..Default::default()
            }),
            config: Some(ContainerConfig {
                env: Some(env.iter().map(|s| s.to_string()).collect()),
                ..Default::default()
            }),
            network_settings: Some(NetworkSettings {
                networks: Some(networks),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn inspect_answer_becomes_an_entry_with_every_address() {
        let c = Container::from_inspect(&inspect(
            "abc",
            "web",
            &["172.17.0.2", "172.18.0.5", "fd00::5", "not-an-ip"],
            &["BACKEND_6379=redis:6379"],
        ))
        .unwrap();
        assert_eq!(c.name, "web");
        assert_eq!(c.ips.len(), 3);
        assert_eq!(c.declarations[&6379].to_string(), "redis:6379");
    }

    #[test]
    fn a_reused_ip_belongs_to_the_new_container_only() {
        let mut state = State::default();
        let old =
            Container::from_inspect(&inspect("old", "a", &["172.17.0.2"], &["BACKEND_80=a:1"]))
                .unwrap();
        let new =
            Container::from_inspect(&inspect("new", "b", &["172.17.0.2"], &["BACKEND_80=b:1"]))
                .unwrap();
        state.upsert(old);
        // The new container starts before the old one's destroy event arrives.
        state.upsert(new);
        state.evict("old");
        let ip: IpAddr = "172.17.0.2".parse().unwrap();
        assert_eq!(state.by_ip[&ip].id, "new");
        state.evict("new");
        assert!(!state.by_ip.contains_key(&ip));
    }

    #[test]
    fn stopped_containers_are_not_indexed() {
        let mut c = inspect("x", "x", &["172.17.0.9"], &[]);
        c.state = Some(ContainerState {
            running: Some(false),
            status: Some(bollard::models::ContainerStateStatusEnum::EXITED),
            ..Default::default()
        });
        assert!(Container::from_inspect(&c).is_none());
    }

    /// Config has validated the host's form (see config's tests); what can still fail
    /// is a socket that is not there, named in the error.
    #[test]
    fn docker_host_forms() {
        let err = connect(&DockerHost::Unix("/nonexistent.sock".into())).unwrap_err();
        assert!(
            err.to_string()
                .contains("Docker host 'unix:///nonexistent.sock'"),
            "{err}"
        );
        assert!(connect(&DockerHost::Tcp("127.0.0.1:2375".into())).is_ok());
    }
}
