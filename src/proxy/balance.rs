//! Choosing backends: the order in which one connection tries the current endpoints.
//!
//! Within a priority tier of equal weights, connections rotate round robin: it costs one
//! atomic add, spreads short connections evenly and is what HAProxy users expect by
//! default. Tiers with unequal weights (SRV records) are ordered by RFC 2782's weighted
//! random selection. Lower tiers are tried first. An endpoint whose connect failed
//! recently is moved to the end of the order for a cool-down, so one dead backend costs
//! one failed attempt, not one per connection; it is still tried as a last resort.
//! When its cool-down ends, one connection at a time gets it in its usual place (a
//! trial); every other connection keeps it at the end until the trial succeeds (the
//! endpoint is healthy again) or fails (another cool-down). So a backend that is still
//! dead costs one attempt per cool-down, not one per concurrent connection.
//!
//! Outlier ejection: after `eject_after` consecutive failed connects (3 by default) the
//! demotion becomes an ejection, 5 s doubling with every further failure up to 5 min,
//! and a success ends it. A demoted (cooling down or ejected) backend stays in the order,
//! last: a client is never refused while any backend might answer.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};

use super::check::{Checked, Checks};
use crate::discovery::Endpoints;
use crate::endpoint::{Endpoint, EndpointSet};

/// How long an endpoint that refused or timed out is tried only after the others.
pub const COOL_DOWN: Duration = Duration::from_secs(5);
/// The longest ejection: an ejection doubles from [`COOL_DOWN`] up to this.
pub const MAX_EJECTION: Duration = Duration::from_secs(300);
/// Consecutive failed connects after which a backend is ejected, unless configured.
pub const EJECT_AFTER: u32 = 3;

/// Why no backend could be tried at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoBackend {
    /// Discovery has not produced its first result yet.
    NotYetDiscovered,
    /// Discovery answered with no endpoints.
    Empty,
}

impl std::fmt::Display for NoBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NoBackend::NotYetDiscovered => "no backends discovered yet",
            NoBackend::Empty => "no backends",
        })
    }
}

/// The endpoints of one spec and the state that balancing keeps across connections.
pub struct Balancer {
    /// The spec, for log lines.
    name: String,
    endpoints: Endpoints,
    next: AtomicUsize,
    health: Arc<Health>,
    /// Set while there is nothing to connect to, so that is logged once.
    unavailable: AtomicBool,
    /// When each backend's last DOWN was logged, and whether it is still down.
    transitions: Mutex<HashMap<SocketAddr, (Instant, bool)>>,
    /// Active health checks of its endpoints, when the route has them on.
    checks: Option<Arc<Checks>>,
}

/// The order one connection tries endpoints in.
pub struct Plan {
    set: EndpointSet,
    order: Vec<usize>,
    /// The trials this plan holds (endpoints whose cool-down ended), released when it
    /// is dropped unless a connect result settled them first.
    trials: Vec<(SocketAddr, u64)>,
    health: Arc<Health>,
}

impl Drop for Plan {
    fn drop(&mut self) {
        if !self.trials.is_empty() {
            self.health.release(&self.trials);
        }
    }
}

impl Plan {
    pub fn iter(&self) -> impl Iterator<Item = &Endpoint> {
        self.order.iter().map(|&i| &self.set.as_slice()[i])
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

impl Balancer {
    pub fn new(name: String, endpoints: Endpoints) -> Self {
        Balancer {
            name,
            endpoints,
            next: AtomicUsize::new(0),
            health: Arc::default(),
            unavailable: AtomicBool::new(false),
            transitions: Mutex::default(),
            checks: None,
        }
    }

    /// The same, with active checks deciding which endpoints are down.
    pub fn with_checks(mut self, checks: Arc<Checks>) -> Self {
        self.checks = Some(checks);
        self
    }

    /// The endpoints' sets, for whoever follows them (the checks).
    pub fn sets(&self) -> tokio::sync::watch::Receiver<Option<EndpointSet>> {
        self.endpoints.sets.clone()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The current set, as the data path sees it.
    pub fn current(&self) -> Option<EndpointSet> {
        self.endpoints.sets.borrow().clone()
    }

    /// Like [`Balancer::plan`], but a connection that arrives while discovery's first
    /// read is under way (just after start, or for an omni source started by this very
    /// connection) waits for its result up to `wait` instead of being refused at once.
    /// Once that read has failed there is nothing to wait for: refused at once.
    pub async fn plan_when_discovered(&self, wait: std::time::Duration) -> Result<Plan, NoBackend> {
        if self.endpoints.sets.borrow().is_none() && !*self.endpoints.failing.borrow() {
            let mut sets = self.endpoints.sets.clone();
            let mut failing = self.endpoints.failing.clone();
            // A closed channel (the source stopped) is no reason to stop waiting early.
            let found = async {
                if sets.wait_for(Option::is_some).await.is_err() {
                    std::future::pending::<()>().await;
                }
            };
            let failed = async {
                if failing.wait_for(|f| *f).await.is_err() {
                    std::future::pending::<()>().await;
                }
            };
            let _ = tokio::time::timeout(wait, async {
                tokio::select! {
                    _ = found => {}
                    _ = failed => {}
                }
            })
            .await;
        }
        self.plan()
    }

    /// The order to try endpoints in for one new connection. Going from having backends
    /// to having none (and back) is logged once, not once per connection.
    pub fn plan(&self) -> Result<Plan, NoBackend> {
        let set = match &*self.endpoints.sets.borrow() {
            None => Err(NoBackend::NotYetDiscovered),
            Some(set) if set.is_empty() => Err(NoBackend::Empty),
            Some(set) => Ok(set.clone()),
        };
        let set = match set {
            Ok(set) => {
                if self.unavailable.load(Ordering::Relaxed)
                    && self.unavailable.swap(false, Ordering::Relaxed)
                {
                    info!(backend = %self.name, "backends available again");
                }
                set
            }
            Err(reason) => {
                if !self.unavailable.swap(true, Ordering::Relaxed) {
                    warn!(backend = %self.name, "{reason}: refusing connections until discovery finds some");
                }
                return Err(reason);
            }
        };
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        let mut order = Vec::with_capacity(set.len());
        let mut base = 0;
        for tier in set.tiers() {
            order_tier(tier, turn, base, &mut order);
            base += tier.len();
        }
        let trials = self.health.demote_cooling(&set, &mut order);
        // Down by check: last too, after the cooling ones (a stable partition keeps
        // the rotation of both groups).
        if let Some(checks) = &self.checks
            && checks.any_down()
        {
            let down = |i: &usize| checks.state(set.as_slice()[*i].addr) == Checked::Down;
            let (mut up, down): (Vec<usize>, Vec<usize>) = order.iter().partition(|i| !down(i));
            up.extend(down);
            order = up;
        }
        Ok(Plan {
            set,
            order,
            trials,
            health: self.health.clone(),
        })
    }

    /// Resolves once discovery has produced a first result (or has stopped).
    pub async fn discovered(&self) {
        let mut rx = self.endpoints.sets.clone();
        let _ = rx.wait_for(|set| set.is_some()).await;
    }

    /// What the balancer knows of `addr`: up, cooling down after a failed connect,
    /// ejected after several in a row, or failing (its last connect failed and its
    /// cool-down or ejection is over, but no connect has succeeded since).
    pub fn state(&self, addr: SocketAddr) -> BackendState {
        self.health(addr).state
    }

    /// [`Balancer::state`], with the failures in a row and what is left of a demotion.
    /// Active checks, when on, come first: a backend down by check is `Down` (with the
    /// check's error), and one not checked yet is `Checking` while nothing failed.
    pub fn health(&self, addr: SocketAddr) -> BackendHealth {
        let mut health = self.passive_health(addr);
        if let Some(checks) = &self.checks {
            match checks.state(addr) {
                Checked::Down => {
                    health.state = BackendState::Down;
                    health.check_error = checks.last_error(addr);
                }
                Checked::Checking if health.state == BackendState::Up => {
                    health.state = BackendState::Checking;
                }
                _ => {}
            }
        }
        health
    }

    fn passive_health(&self, addr: SocketAddr) -> BackendHealth {
        let up = BackendHealth {
            state: BackendState::Up,
            failures_in_a_row: 0,
            remaining: None,
            check_error: None,
        };
        if !self.health.any.load(Ordering::Acquire) {
            return up;
        }
        let failed = self.health.lock();
        let now = Instant::now();
        let Some(f) = failed.get(&addr) else {
            return up;
        };
        let remaining = (f.until > now).then(|| f.until - now);
        BackendHealth {
            state: match (remaining, f.ejected) {
                (Some(_), true) => BackendState::Ejected,
                (Some(_), false) => BackendState::CoolingDown,
                (None, _) => BackendState::Failing,
            },
            failures_in_a_row: f.consecutive,
            remaining,
            check_error: None,
        }
    }

    /// A connect to `addr` failed (`why`): it cools down, or after `eject_after` in a
    /// row (0: never) is ejected; going down, and each ejection, is logged. Returns
    /// whether this failure ejected it.
    pub fn connect_failed(
        &self,
        addr: SocketAddr,
        why: &dyn std::fmt::Display,
        eject_after: u32,
    ) -> bool {
        let outcome = self.health.failed(addr, eject_after, || self.current());
        if outcome.was_up && self.log_transition(addr, true) {
            warn!(backend = %addr, route = %self.name, error = %why,
                "backend DOWN: connect failed; connections go to the others, and it is tried again after {}s",
                COOL_DOWN.as_secs());
        }
        if let Some(ejection) = outcome.ejected_for {
            warn!(backend = %addr, route = %self.name, error = %why, failures = outcome.consecutive,
                "backend EJECTED for {}s after {} connect failures in a row; tried only if no other backend answers, then by one connection when the time is up",
                ejection.as_secs(), outcome.consecutive);
        }
        outcome.ejected_for.is_some()
    }

    pub fn connect_succeeded(&self, addr: SocketAddr) {
        if self.health.succeeded(addr) && self.log_transition(addr, false) {
            info!(backend = %addr, route = %self.name, "backend UP again: a connect succeeded");
        }
    }

    /// Whether to log `addr` going down (or back up): at most one DOWN per
    /// [`TRANSITION_LOG_EVERY`] for a backend that flaps, and an UP only after a logged
    /// DOWN, so the log holds pairs.
    fn log_transition(&self, addr: SocketAddr, down: bool) -> bool {
        let mut logged = self.transitions.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if down {
            let quiet = logged
                .get(&addr)
                .is_none_or(|(at, _)| now.duration_since(*at) >= TRANSITION_LOG_EVERY);
            if quiet {
                logged.insert(addr, (now, true));
                // Forget backends that came back long ago, so addresses that churn
                // through failures cannot grow the map without bound.
                if logged.len() > TRANSITIONS_KEPT {
                    logged.retain(|_, (at, down)| {
                        *down || now.duration_since(*at) < TRANSITION_LOG_EVERY
                    });
                }
            }
            quiet
        } else {
            match logged.get_mut(&addr) {
                Some((_, down)) if *down => {
                    *down = false;
                    true
                }
                _ => false,
            }
        }
    }
}

/// What the balancer knows of one backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendState {
    Up,
    /// Checks are on and have not passed yet: served meanwhile.
    Checking,
    /// `fall` active checks in a row failed: tried only if no other backend answers.
    Down,
    /// Its last connect failed: tried only after the others until the cool-down ends.
    CoolingDown,
    /// Several connects in a row failed: tried only after the others for a while.
    Ejected,
    /// Its cool-down is over, but no connect has succeeded since it failed.
    Failing,
}

impl BackendState {
    /// Whether new connections go to it in its turn (rather than last).
    pub fn is_up(self) -> bool {
        matches!(self, BackendState::Up | BackendState::Checking)
    }
}

/// A backend's state, how many connects to it failed in a row, and how long its
/// cool-down or ejection still lasts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendHealth {
    pub state: BackendState,
    pub failures_in_a_row: u32,
    pub remaining: Option<Duration>,
    /// Why the last active check failed, while it is down by check.
    pub check_error: Option<String>,
}

/// A backend going DOWN is logged at most this often (a flapping one says so once).
const TRANSITION_LOG_EVERY: Duration = Duration::from_secs(30);
/// Backends whose last transition is remembered before old ones are forgotten.
const TRANSITIONS_KEPT: usize = 256;

/// Appends the indices (offset by `base`) of one tier in the order to try them.
fn order_tier(tier: &[Endpoint], turn: usize, base: usize, order: &mut Vec<usize>) {
    let n = tier.len();
    if tier.iter().all(|e| e.weight == tier[0].weight) {
        let start = turn % n;
        order.extend((0..n).map(|k| base + (start + k) % n));
        return;
    }
    // RFC 2782: zero weights first, then repeatedly pick an entry with probability
    // proportional to its weight among those left (a zero-weight entry has a small chance).
    let mut left: Vec<usize> = (0..n).collect();
    left.sort_by_key(|&i| tier[i].weight != 0);
    while !left.is_empty() {
        let total: u32 = left.iter().map(|&i| u32::from(tier[i].weight)).sum();
        let pick = fastrand::u32(0..=total);
        let mut running = 0;
        let pos = left
            .iter()
            .position(|&i| {
                running += u32::from(tier[i].weight);
                running >= pick
            })
            .unwrap_or(left.len() - 1);
        order.push(base + left.remove(pos));
    }
}

/// Recent connect failures, by address. Lock-free to read while nothing has failed.
#[derive(Default)]
struct Health {
    any: AtomicBool,
    failed: Mutex<HashMap<SocketAddr, Failed>>,
    /// Tells one plan's trial from another's.
    next_trial: AtomicU64,
}

/// An endpoint whose last connect failed.
struct Failed {
    /// Until then it is tried only after the others.
    until: Instant,
    /// The plan that holds its one trial, once the cool-down is over.
    trial: Option<u64>,
    /// Failed connects since its last success.
    consecutive: u32,
    /// Whether `until` is an ejection rather than a cool-down.
    ejected: bool,
}

/// What one failed connect did to a backend.
struct FailOutcome {
    /// It had not been failing until now.
    was_up: bool,
    consecutive: u32,
    /// Ejected by this failure, for this long.
    ejected_for: Option<Duration>,
}

/// How long a backend with `consecutive` failures in a row is demoted: a cool-down
/// below `eject_after` (or with ejection off, 0), else an ejection doubling from the
/// cool-down up to [`MAX_EJECTION`].
fn demotion(consecutive: u32, eject_after: u32) -> (Duration, bool) {
    if eject_after == 0 || consecutive < eject_after {
        return (COOL_DOWN, false);
    }
    let doublings = (consecutive - eject_after).min(16);
    (
        COOL_DOWN.saturating_mul(1 << doublings).min(MAX_EJECTION),
        true,
    )
}

/// Failures remembered before the entries of addresses no longer in the set are dropped.
const PRUNE_ABOVE: usize = 64;

impl Health {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Failed>> {
        self.failed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a failed connect.
    fn failed(
        &self,
        addr: SocketAddr,
        eject_after: u32,
        current: impl FnOnce() -> Option<EndpointSet>,
    ) -> FailOutcome {
        let mut failed = self.lock();
        let before = failed.get(&addr).map_or(0, |f| f.consecutive);
        let consecutive = before.saturating_add(1);
        let (demoted_for, ejected) = demotion(consecutive, eject_after);
        failed.insert(
            addr,
            Failed {
                until: Instant::now() + demoted_for,
                trial: None,
                consecutive,
                ejected,
            },
        );
        let outcome = FailOutcome {
            was_up: before == 0,
            consecutive,
            ejected_for: ejected.then_some(demoted_for),
        };
        // Failed endpoints are kept until they succeed; forget those discovery dropped,
        // so churning addresses cannot grow the map without bound.
        if failed.len() > PRUNE_ABOVE
            && let Some(set) = current()
        {
            let live: std::collections::HashSet<SocketAddr> =
                set.as_slice().iter().map(|e| e.addr).collect();
            failed.retain(|a, _| live.contains(a));
        }
        self.any.store(true, Ordering::Release);
        outcome
    }

    /// Records a successful connect; true if `addr` had been failing.
    fn succeeded(&self, addr: SocketAddr) -> bool {
        if !self.any.load(Ordering::Acquire) {
            return false;
        }
        let mut failed = self.lock();
        let was_failing = failed.remove(&addr).is_some();
        self.any.store(!failed.is_empty(), Ordering::Release);
        was_failing
    }

    /// Moves endpoints that are cooling down (or being tried by another connection) to
    /// the end, keeping the relative order of both groups; an endpoint whose cool-down
    /// is over and that nobody is trying stays in place as this plan's trial. Returns
    /// the trials claimed.
    fn demote_cooling(&self, set: &EndpointSet, order: &mut [usize]) -> Vec<(SocketAddr, u64)> {
        if !self.any.load(Ordering::Acquire) {
            return Vec::new();
        }
        let mut failed = self.lock();
        if failed.is_empty() {
            return Vec::new();
        }
        let now = Instant::now();
        let mut trials = Vec::new();
        let mut usable = |i: &usize| {
            let addr = set.as_slice()[*i].addr;
            let Some(f) = failed.get_mut(&addr) else {
                return true;
            };
            if f.until > now || f.trial.is_some() {
                return false;
            }
            let token = self.next_trial.fetch_add(1, Ordering::Relaxed);
            f.trial = Some(token);
            trials.push((addr, token));
            true
        };
        let keep: Vec<bool> = order.iter().map(&mut usable).collect();
        let mut keyed: Vec<(bool, usize)> = keep.into_iter().zip(order.iter().copied()).collect();
        // A stable sort on a bool key: usable (true) first.
        keyed.sort_by_key(|(usable, _)| !usable);
        for (slot, (_, i)) in order.iter_mut().zip(keyed) {
            *slot = i;
        }
        trials
    }

    /// Gives back trials a plan held but did not settle (it connected elsewhere first).
    fn release(&self, trials: &[(SocketAddr, u64)]) {
        let mut failed = self.lock();
        for (addr, token) in trials {
            if let Some(f) = failed.get_mut(addr)
                && f.trial == Some(*token)
            {
                f.trial = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::watch;

    fn ep(addr: &str, priority: u16, weight: u16) -> Endpoint {
        Endpoint {
            priority,
            weight,
            ..Endpoint::new(addr.parse().unwrap())
        }
    }

    fn balancer(endpoints: Vec<Endpoint>) -> (Balancer, watch::Sender<Option<EndpointSet>>) {
        let (tx, rx) = watch::channel(Some(EndpointSet::new(endpoints)));
        (Balancer::new("test".into(), Endpoints::fixed(rx)), tx)
    }

    fn order(b: &Balancer) -> Vec<String> {
        b.plan()
            .unwrap()
            .iter()
            .map(|e| e.addr.to_string())
            .collect()
    }

    #[test]
    fn round_robin_rotates_and_lists_every_endpoint_once() {
        let (b, _tx) = balancer(vec![
            ep("10.0.0.1:1", 0, 1),
            ep("10.0.0.2:1", 0, 1),
            ep("10.0.0.3:1", 0, 1),
        ]);
        assert_eq!(order(&b), ["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"]);
        assert_eq!(order(&b), ["10.0.0.2:1", "10.0.0.3:1", "10.0.0.1:1"]);
        assert_eq!(order(&b), ["10.0.0.3:1", "10.0.0.1:1", "10.0.0.2:1"]);
        assert_eq!(order(&b), ["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"]);
    }

    #[test]
    fn lower_priority_tiers_come_first() {
        let (b, _tx) = balancer(vec![
            ep("10.0.0.9:1", 20, 1),
            ep("10.0.0.1:1", 10, 1),
            ep("10.0.0.2:1", 10, 1),
        ]);
        for _ in 0..4 {
            let o = order(&b);
            assert_eq!(o[2], "10.0.0.9:1", "{o:?}");
        }
    }

    #[test]
    fn weighted_tier_follows_weights() {
        let (b, _tx) = balancer(vec![ep("10.0.0.1:1", 0, 90), ep("10.0.0.2:1", 0, 10)]);
        let firsts = (0..2000).filter(|_| order(&b)[0] == "10.0.0.1:1").count();
        // Expect 90% (1800); a binomial with sd ~13 stays far inside these bounds.
        assert!((1650..=1950).contains(&firsts), "{firsts}");
        assert_eq!(order(&b).len(), 2);
    }

    #[test]
    fn zero_weights_are_still_listed() {
        let (b, _tx) = balancer(vec![ep("10.0.0.1:1", 0, 0), ep("10.0.0.2:1", 0, 5)]);
        let mut o = order(&b);
        o.sort();
        assert_eq!(o, ["10.0.0.1:1", "10.0.0.2:1"]);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_endpoints_cool_down_at_the_end() {
        let (b, _tx) = balancer(vec![ep("10.0.0.1:1", 0, 1), ep("10.0.0.2:1", 0, 1)]);
        b.connect_failed("10.0.0.1:1".parse().unwrap(), &"refused", EJECT_AFTER);
        for _ in 0..3 {
            assert_eq!(order(&b), ["10.0.0.2:1", "10.0.0.1:1"]);
        }
        tokio::time::advance(COOL_DOWN + Duration::from_millis(1)).await;
        let firsts: Vec<String> = (0..2).map(|_| order(&b)[0].clone()).collect();
        assert!(firsts.contains(&"10.0.0.1:1".to_string()), "{firsts:?}");
    }

    /// Once the cool-down is over, one plan at a time gets the failed endpoint in its
    /// place (the trial); concurrent plans keep it at the end. A trial given back
    /// unsettled passes to the next plan; a failed trial starts another cool-down.
    #[tokio::test(start_paused = true)]
    async fn a_cooled_down_backend_is_tried_by_one_connection_not_a_herd() {
        let (b, _tx) = balancer(vec![ep("10.0.0.1:1", 0, 1), ep("10.0.0.2:1", 0, 1)]);
        let dead: SocketAddr = "10.0.0.1:1".parse().unwrap();
        b.connect_failed(dead, &"refused", EJECT_AFTER);
        tokio::time::advance(COOL_DOWN + Duration::from_millis(1)).await;
        let first = |p: &Plan| p.iter().next().unwrap().addr;
        // Turn 0 starts at the dead one: this plan holds the trial.
        let trial = b.plan().unwrap();
        assert_eq!(first(&trial), dead);
        // Every plan while the trial runs, whatever its turn, has it last.
        for _ in 0..4 {
            let p = b.plan().unwrap();
            assert_eq!(p.iter().last().unwrap().addr, dead);
        }
        assert_eq!(b.state(dead), BackendState::Failing);
        // Given back unsettled (the connection went elsewhere): a later plan holds the
        // trial (here one whose turn starts at it).
        drop(trial);
        drop(b.plan());
        let again = b.plan().unwrap();
        assert_eq!(first(&again), dead);
        // The trial fails: a new cool-down, so it is last for everyone again.
        b.connect_failed(dead, &"refused", EJECT_AFTER);
        drop(again);
        for _ in 0..4 {
            assert_eq!(b.plan().unwrap().iter().last().unwrap().addr, dead);
        }
    }

    /// Addresses that fail and recover once each do not pile up in the transition log's
    /// memory: past the bound, those that came back long ago are forgotten.
    #[tokio::test(start_paused = true)]
    async fn transitions_of_churning_addresses_are_forgotten() {
        let (b, _tx) = balancer(vec![ep("10.0.0.1:1", 0, 1)]);
        for i in 0..300u16 {
            let addr: SocketAddr = ([10, 1, (i >> 8) as u8, i as u8], 1).into();
            b.connect_failed(addr, &"refused", EJECT_AFTER);
            b.connect_succeeded(addr);
        }
        tokio::time::advance(TRANSITION_LOG_EVERY + Duration::from_secs(1)).await;
        b.connect_failed("10.0.0.1:1".parse().unwrap(), &"refused", EJECT_AFTER);
        assert_eq!(b.transitions.lock().unwrap().len(), 1);
    }

    /// The demotion after each failure in a row: cool-downs, then an ejection doubling
    /// from 5 s to at most 5 min; with ejection off, cool-downs only.
    #[test]
    fn ejections_double_up_to_five_minutes() {
        let secs = |n, after| {
            let (d, ejected) = demotion(n, after);
            (d.as_secs(), ejected)
        };
        assert_eq!(secs(1, 3), (5, false));
        assert_eq!(secs(2, 3), (5, false));
        assert_eq!(secs(3, 3), (5, true));
        assert_eq!(secs(4, 3), (10, true));
        assert_eq!(secs(5, 3), (20, true));
        assert_eq!(secs(9, 3), (300, true));
        assert_eq!(secs(u32::MAX, 3), (300, true));
        assert_eq!(secs(1, 1), (5, true));
        assert_eq!(secs(50, 0), (5, false));
    }

    /// Three failures in a row eject (reported once, by the failure that ejects), the
    /// ejected backend stays in the order but last, a further failure doubles the
    /// ejection, and a success ends it and resets the count.
    #[tokio::test(start_paused = true)]
    async fn failures_in_a_row_eject_and_a_success_resets() {
        let (b, _tx) = balancer(vec![ep("10.0.0.1:1", 0, 1), ep("10.0.0.2:1", 0, 1)]);
        let dead: SocketAddr = "10.0.0.1:1".parse().unwrap();
        let ejected: Vec<bool> = (0..3)
            .map(|_| b.connect_failed(dead, &"timeout", 3))
            .collect();
        assert_eq!(ejected, [false, false, true]);
        let h = b.health(dead);
        assert_eq!(h.state, BackendState::Ejected);
        assert_eq!(h.failures_in_a_row, 3);
        assert_eq!(h.remaining, Some(COOL_DOWN));
        for _ in 0..4 {
            assert_eq!(order(&b), ["10.0.0.2:1", "10.0.0.1:1"]);
        }
        assert!(b.connect_failed(dead, &"timeout", 3));
        assert_eq!(b.health(dead).remaining, Some(COOL_DOWN * 2));
        tokio::time::advance(COOL_DOWN * 2 + Duration::from_millis(1)).await;
        assert_eq!(b.state(dead), BackendState::Failing);
        b.connect_succeeded(dead);
        assert_eq!(b.health(dead).failures_in_a_row, 0);
        assert!(
            !b.connect_failed(dead, &"timeout", 3),
            "the count starts again"
        );
        assert_eq!(b.state(dead), BackendState::CoolingDown);
    }

    #[test]
    fn success_clears_a_failure() {
        let (b, _tx) = balancer(vec![ep("10.0.0.1:1", 0, 1), ep("10.0.0.2:1", 0, 1)]);
        b.connect_failed("10.0.0.1:1".parse().unwrap(), &"refused", EJECT_AFTER);
        b.connect_succeeded("10.0.0.1:1".parse().unwrap());
        let firsts: Vec<String> = (0..2).map(|_| order(&b)[0].clone()).collect();
        assert!(firsts.contains(&"10.0.0.1:1".to_string()), "{firsts:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_before_the_first_result_waits_for_it() {
        let (tx, rx) = watch::channel(None);
        let b = std::sync::Arc::new(Balancer::new("test".into(), Endpoints::fixed(rx)));
        let waiting = tokio::spawn({
            let b = b.clone();
            async move {
                b.plan_when_discovered(Duration::from_secs(5))
                    .await
                    .map(|p| p.len())
            }
        });
        tokio::time::advance(Duration::from_secs(1)).await;
        tx.send(Some(EndpointSet::new(vec![ep("10.0.0.1:1", 0, 1)])))
            .unwrap();
        assert_eq!(waiting.await.unwrap(), Ok(1));
        // Nothing ever discovered: refused once the wait is over.
        let (_tx, rx) = watch::channel(None);
        let b = Balancer::new("test".into(), Endpoints::fixed(rx));
        let start = Instant::now();
        assert_eq!(
            b.plan_when_discovered(Duration::from_secs(5)).await.err(),
            Some(NoBackend::NotYetDiscovered)
        );
        assert_eq!(start.elapsed(), Duration::from_secs(5));
    }

    /// A first read that failed (a store unreachable since startup) ends the wait: the
    /// waiting connection and every later one are refused at once.
    #[tokio::test(start_paused = true)]
    async fn a_failed_first_read_refuses_at_once() {
        let (_sets_tx, sets) = watch::channel(None);
        let (failing_tx, failing) = watch::channel(false);
        let b = std::sync::Arc::new(Balancer::new("test".into(), Endpoints { sets, failing }));
        let start = Instant::now();
        let waiting = tokio::spawn({
            let b = b.clone();
            async move { b.plan_when_discovered(Duration::from_secs(5)).await.err() }
        });
        tokio::time::advance(Duration::from_secs(1)).await;
        failing_tx.send(true).unwrap();
        assert_eq!(waiting.await.unwrap(), Some(NoBackend::NotYetDiscovered));
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        let later = Instant::now();
        assert_eq!(
            b.plan_when_discovered(Duration::from_secs(5)).await.err(),
            Some(NoBackend::NotYetDiscovered)
        );
        assert_eq!(later.elapsed(), Duration::ZERO);
    }

    #[test]
    fn empty_and_undiscovered_are_told_apart() {
        let (tx, rx) = watch::channel(None);
        let b = Balancer::new("test".into(), Endpoints::fixed(rx));
        assert_eq!(b.plan().err(), Some(NoBackend::NotYetDiscovered));
        tx.send(Some(EndpointSet::empty())).unwrap();
        assert_eq!(b.plan().err(), Some(NoBackend::Empty));
    }
}
