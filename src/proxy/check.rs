//! Active health checks (`--check tcp`): every backend address a checked route can send
//! connections to is probed on the control runtime, never on a connection's path, and a
//! backend that fails `fall` checks in a row is down until it passes `rise` in a row.
//!
//! One check task runs per distinct (address, check) however many routes or sources
//! share it; a route's balancer holds the addresses of its current set and lets go of
//! those that leave it, and a task ends when nobody holds its address. Each task starts
//! at a random point of its first interval and keeps a jitter of ±10% on every interval,
//! so a fleet of ambassadors does not probe in step. A check is a TCP connect within the
//! connect timeout; with `send`/`expect`, it also writes `send` and must read a reply
//! that starts with `expect` within the same timeout (Redis: `PING\r\n` → `+PONG`).
//!
//! The data path reads the result through one atomic (whether any checked backend is
//! down) and, only then, a map lookup per endpoint.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::CheckConfig;
use crate::endpoint::EndpointSet;
use crate::metrics::Metrics;

/// What the checks say of one backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checked {
    /// No result yet, or not enough in a row to change its state: served meanwhile.
    Checking,
    Up,
    /// `fall` checks in a row failed: tried only if no other backend answers.
    Down,
}

const CHECKING: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

/// One (address, check) and its task.
struct Probe {
    state: AtomicU8,
    /// Why the last check failed, for /routes. Its lock also orders state changes
    /// against the probe being let go, so the down count stays exact.
    last_error: Mutex<Option<String>>,
    /// Balancers holding the address; the task ends at zero.
    holders: AtomicUsize,
    stop: CancellationToken,
}

type Key = (SocketAddr, CheckConfig);

/// Every check task of the process, shared by the routes that check.
pub struct Checker {
    probes: Mutex<HashMap<Key, Arc<Probe>>>,
    /// Checked backends down now, across every probe: zero keeps the data path to one
    /// atomic load.
    down: Arc<AtomicUsize>,
    connect_timeout: Duration,
    metrics: Arc<Metrics>,
    runtime: Option<tokio::runtime::Handle>,
}

/// A balancer's view of the checks of its current set.
pub struct Checks {
    checker: Arc<Checker>,
    config: CheckConfig,
    held: Mutex<HashMap<SocketAddr, Arc<Probe>>>,
}

impl Checker {
    pub fn new(connect_timeout: Duration, metrics: Arc<Metrics>) -> Arc<Checker> {
        Arc::new(Checker {
            probes: Mutex::default(),
            down: Arc::default(),
            connect_timeout,
            metrics,
            runtime: tokio::runtime::Handle::try_current().ok(),
        })
    }

    /// Checks for a balancer whose sets arrive on `sets`: every address in the latest
    /// set is held (and probed) until it leaves the set or `stop` fires.
    pub fn follow(
        self: &Arc<Self>,
        config: CheckConfig,
        mut sets: watch::Receiver<Option<EndpointSet>>,
        stop: CancellationToken,
    ) -> Arc<Checks> {
        let checks = Arc::new(Checks {
            checker: self.clone(),
            config,
            held: Mutex::default(),
        });
        let follower = checks.clone();
        let task = async move {
            loop {
                let addrs: HashSet<SocketAddr> = sets
                    .borrow_and_update()
                    .as_ref()
                    .map(|s| s.as_slice().iter().map(|e| e.addr).collect())
                    .unwrap_or_default();
                follower.hold(&addrs);
                tokio::select! {
                    _ = stop.cancelled() => break,
                    r = sets.changed() => if r.is_err() { break },
                }
            }
            follower.hold(&HashSet::new());
        };
        self.spawn(task);
        checks
    }

    fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        match &self.runtime {
            Some(rt) => drop(rt.spawn(task)),
            None => drop(tokio::spawn(task)),
        }
    }

    /// The probe of `key`, started if it is new; counted as held once more.
    fn acquire(self: &Arc<Self>, key: &Key) -> Arc<Probe> {
        let mut probes = self.probes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = probes.get(key) {
            p.holders.fetch_add(1, Ordering::Relaxed);
            return p.clone();
        }
        let probe = Arc::new(Probe {
            state: AtomicU8::new(CHECKING),
            last_error: Mutex::new(None),
            holders: AtomicUsize::new(1),
            stop: CancellationToken::new(),
        });
        probes.insert(key.clone(), probe.clone());
        self.spawn(run(self.clone(), key.clone(), probe.clone()));
        probe
    }

    fn release(&self, key: &Key, probe: &Arc<Probe>) {
        // Counted under the map's lock, as `acquire` counts: a probe whose count reaches
        // zero is the map's entry for its key, and no one can take it up meanwhile.
        let mut probes = self.probes.lock().unwrap_or_else(|p| p.into_inner());
        if probe.holders.fetch_sub(1, Ordering::Relaxed) == 1 {
            probes.remove(key);
            let _transition = probe.last_error.lock().unwrap_or_else(|p| p.into_inner());
            probe.stop.cancel();
            if probe.state.swap(CHECKING, Ordering::Relaxed) == DOWN {
                self.down.fetch_sub(1, Ordering::Relaxed);
            }
            if !probes.keys().any(|(addr, _)| *addr == key.0) {
                self.metrics.forget_checks(key.0);
            }
        }
    }
}

impl Checks {
    /// Holds exactly `addrs`: new ones are probed, departed ones let go.
    fn hold(&self, addrs: &HashSet<SocketAddr>) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.retain(|addr, probe| {
            let keep = addrs.contains(addr);
            if !keep {
                self.checker.release(&(*addr, self.config.clone()), probe);
            }
            keep
        });
        for addr in addrs {
            if !held.contains_key(addr) {
                let probe = self.checker.acquire(&(*addr, self.config.clone()));
                held.insert(*addr, probe);
            }
        }
    }

    /// Whether any checked backend (of any route) is down: the data path's fast test.
    pub fn any_down(&self) -> bool {
        self.checker.down.load(Ordering::Relaxed) > 0
    }

    /// What the checks say of `addr` (`Checking` if it is not held).
    pub fn state(&self, addr: SocketAddr) -> Checked {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        match held.get(&addr).map(|p| p.state.load(Ordering::Relaxed)) {
            Some(UP) => Checked::Up,
            Some(DOWN) => Checked::Down,
            _ => Checked::Checking,
        }
    }

    /// Why the last check of `addr` failed, if it did.
    pub fn last_error(&self, addr: SocketAddr) -> Option<String> {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let probe = held.get(&addr)?;
        probe
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for Checks {
    fn drop(&mut self) {
        self.hold(&HashSet::new());
    }
}

/// One probe's loop: check every interval (jittered), count results in a row, change
/// state at `fall` failures or `rise` successes, and log each change once.
async fn run(checker: Arc<Checker>, key: Key, probe: Arc<Probe>) {
    let (addr, config) = key;
    let mut delay = config.interval.mul_f64(fastrand::f64());
    let (mut failures, mut successes) = (0u32, 0u32);
    loop {
        tokio::select! {
            _ = probe.stop.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = config.interval.mul_f64(0.9 + 0.2 * fastrand::f64());
        let result = check_once(addr, &config, checker.connect_timeout).await;
        let mut last_error = probe.last_error.lock().unwrap_or_else(|p| p.into_inner());
        if probe.stop.is_cancelled() {
            return;
        }
        checker.metrics.backend_check(addr, result.is_ok());
        let state = probe.state.load(Ordering::Relaxed);
        match result {
            Ok(()) => {
                failures = 0;
                successes = successes.saturating_add(1);
                *last_error = None;
                let up = match state {
                    CHECKING => true,
                    DOWN => successes >= config.rise,
                    _ => false,
                };
                if up {
                    probe.state.store(UP, Ordering::Relaxed);
                    if state == DOWN {
                        checker.down.fetch_sub(1, Ordering::Relaxed);
                        info!(backend = %addr, passed = successes, "backend UP by check: {} checks in a row passed", successes);
                    }
                }
            }
            Err(why) => {
                successes = 0;
                failures = failures.saturating_add(1);
                *last_error = Some(why.clone());
                if state != DOWN && failures >= config.fall {
                    probe.state.store(DOWN, Ordering::Relaxed);
                    checker.down.fetch_add(1, Ordering::Relaxed);
                    warn!(backend = %addr, failed = failures, error = %why,
                        "backend DOWN by check: {} checks in a row failed; connections go to the others, and it returns after {} passing", failures, config.rise);
                }
            }
        }
    }
}

/// One check: connect within `timeout`, and with `send`/`expect` write and read back.
async fn check_once(
    addr: SocketAddr,
    config: &CheckConfig,
    timeout: Duration,
) -> Result<(), String> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        if let Some(send) = &config.send {
            stream
                .write_all(send)
                .await
                .map_err(|e| format!("send: {e}"))?;
        }
        if let Some(expect) = &config.expect {
            let mut got = Vec::with_capacity(expect.len());
            let mut buf = [0u8; 512];
            while got.len() < expect.len() {
                let n = stream
                    .read(&mut buf)
                    .await
                    .map_err(|e| format!("reply: {e}"))?;
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            if !got.starts_with(expect) {
                return Err(format!(
                    "reply {:?} does not start with {:?}",
                    crate::logsafe::bounded(&String::from_utf8_lossy(&got), 60),
                    String::from_utf8_lossy(expect)
                ));
            }
        }
        Ok(())
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    fn config(interval_ms: u64, fall: u32, rise: u32) -> CheckConfig {
        CheckConfig {
            interval: Duration::from_millis(interval_ms),
            fall,
            rise,
            send: None,
            expect: None,
        }
    }

    async fn wait_for(checks: &Checks, addr: SocketAddr, want: Checked) {
        let start = tokio::time::Instant::now();
        while checks.state(addr) != want {
            assert!(start.elapsed() < Duration::from_secs(10), "never {want:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A backend that stops listening goes down after `fall` failed checks and comes
    /// back after `rise` passing ones; two balancers sharing the address share one
    /// probe, which ends when both let go.
    #[tokio::test]
    async fn fall_and_rise() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let checker = Checker::new(Duration::from_millis(200), Metrics::unregistered());
        let set = EndpointSet::new(vec![crate::endpoint::Endpoint::new(addr)]);
        let (_tx, rx) = watch::channel(Some(set));
        let stop = CancellationToken::new();
        let a = checker.follow(config(20, 3, 2), rx.clone(), stop.clone());
        let b = checker.follow(config(20, 3, 2), rx, stop.clone());
        wait_for(&a, addr, Checked::Up).await;
        assert_eq!(
            checker.probes.lock().unwrap().len(),
            1,
            "one probe per address"
        );
        assert!(!a.any_down());
        drop(listener);
        wait_for(&a, addr, Checked::Down).await;
        assert_eq!(b.state(addr), Checked::Down);
        assert!(a.any_down());
        assert!(a.last_error(addr).unwrap().contains("connect"));
        let _listener = TcpListener::bind(addr).await.unwrap();
        wait_for(&a, addr, Checked::Up).await;
        assert!(!a.any_down());
        stop.cancel();
        let start = tokio::time::Instant::now();
        while !checker.probes.lock().unwrap().is_empty() {
            assert!(start.elapsed() < Duration::from_secs(5), "probe not ended");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// With send/expect the reply must start with what is expected.
    #[tokio::test]
    async fn send_and_expect() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    let reply: &[u8] = if &buf[..n] == b"PING\r\n" {
                        b"+PONG\r\n"
                    } else {
                        b"-ERR\r\n"
                    };
                    let _ = s.write_all(reply).await;
                });
            }
        });
        let timeout = Duration::from_secs(1);
        let mut c = config(20, 1, 1);
        c.send = Some(b"PING\r\n".to_vec());
        c.expect = Some(b"+PONG".to_vec());
        assert_eq!(check_once(addr, &c, timeout).await, Ok(()));
        c.send = Some(b"PONG\r\n".to_vec());
        let e = check_once(addr, &c, timeout).await.unwrap_err();
        assert!(e.contains("does not start with"), "{e}");
    }
}
