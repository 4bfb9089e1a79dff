//! The read-only view of the running server that the admin endpoint shows: typed,
//! serializable as `/routes`' JSON, and rendered as the status page.
//!
//! The proxy builds it (`proxy::server::State` implements [`View`]); the admin endpoint
//! only reads it, so neither knows the other and the composition root (`lib.rs`) joins
//! them. Building a view takes locks only long enough to copy numbers and names out.

use std::collections::BTreeMap;

use serde::Serialize;

/// What the admin endpoint can ask of the server.
pub trait View: Send + Sync + 'static {
    /// Every route and what it is doing now.
    fn status(&self) -> Status;
    /// `Ok` once listeners are bound and every route's discovery has its first result
    /// (and from then on), while every omni route's redirect is in place; else why not,
    /// one reason per entry.
    fn readiness(&self) -> Result<(), Vec<String>>;
}

/// `/routes`.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub ready: bool,
    pub uptime_seconds: u64,
    pub routes: Vec<RouteStatus>,
}

/// One route.
#[derive(Debug, Clone, Serialize)]
pub struct RouteStatus {
    pub listen: String,
    /// The backend spec, or the omni description.
    pub spec: String,
    /// What serves the route: `Spec::kind` (`static`, `dns-srv`, `etcd`, `consul`,
    /// `consul-service`, `docker`, ...) or `omni`.
    pub kind: &'static str,
    pub open_connections: u64,
    pub accepted: u64,
    pub refused: u64,
    pub connect_failures: u64,
    pub sent_bytes: u64,
    pub received_bytes: u64,
    /// When its source last read successfully, as seconds since the Unix epoch.
    pub last_update: Option<f64>,
    pub discovery_errors: u64,
    /// Whether discovery has produced a first result (omni: the index is loaded).
    pub discovered: bool,
    /// Omni mode: whether this namespace's incoming TCP is redirected to the listener.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redirect: Option<RedirectState>,
    #[serde(flatten)]
    pub target: TargetStatus,
}

/// Omni mode: whether this namespace's incoming TCP is redirected to the listener
/// (src/redirect.rs probes it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RedirectState {
    /// Not probed yet, or cannot be: the listener does not accept on loopback.
    Unknown,
    InPlace,
    Missing,
}

/// What a route forwards to.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum TargetStatus {
    /// Standard mode: the endpoints of its one spec.
    Fixed { endpoints: Vec<EndpointStatus> },
    /// Omni mode: the containers in the index and the distinct sources running.
    Omni {
        containers: Vec<ContainerStatus>,
        sources: usize,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct EndpointStatus {
    pub addr: String,
    /// What the user wrote that produced this address, where it is not the address.
    pub origin: Option<String>,
    pub priority: u16,
    pub weight: u16,
    pub state: EndpointState,
    /// Failed connects since its last success.
    pub failures_in_a_row: u32,
    /// When a cool-down or ejection ends, as seconds since the Unix epoch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<f64>,
    /// Why the last active check failed, while down by check.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check_error: Option<String>,
}

/// What the balancer knows of an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndpointState {
    Up,
    /// Active checks are on and have not passed yet; served meanwhile.
    Checking,
    /// Down by active check (`fall` failed in a row): tried only if no other answers.
    Down,
    /// Its last connect failed; tried only after the others until the cool-down ends.
    CoolingDown,
    /// Several connects in a row failed (`--eject-after`): tried only if no other
    /// backend answers, until the endpoint's `until`.
    Ejected,
    /// Its cool-down is over but no connect has succeeded since it failed.
    Failing,
}

#[derive(Debug, Clone, Serialize)]
pub struct ContainerStatus {
    pub name: String,
    pub id: String,
    pub ips: Vec<String>,
    /// Port → the spec it declares for it.
    pub declarations: BTreeMap<String, String>,
    /// Failed discovery reads of the sources its declarations use, in all.
    pub discovery_errors: u64,
    /// Declarations it makes that cannot be used, each with why.
    pub bad_declarations: Vec<String>,
}
