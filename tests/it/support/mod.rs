//! Test harness shared by the integration tests: the real `ambassadord` binary started
//! on ephemeral ports, real backends on loopback, and waiting on conditions with a
//! deadline instead of sleeping ([`wait_until`] and [`eventually`] are the only deadline
//! loops; everything else is built on them).

pub mod admin;
pub mod consul;
pub mod dnsmasq;
pub mod docker;
pub mod etcd;
pub mod netns;
pub mod pki;
pub mod process;
pub mod proxy_header;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// How long any condition in a test may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A running `ambassadord` process whose log lines are collected.
pub struct Ambassador {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    /// Set once every line the process wrote has been collected (its stderr ended).
    ended: Arc<AtomicBool>,
    /// The first address it reported listening on.
    pub addr: SocketAddr,
}

impl Ambassador {
    /// Starts the binary with `args` and waits until it says where it listens.
    pub fn start(args: &[&str]) -> Ambassador {
        Self::start_with_env(args, &[])
    }

    /// Starts the binary listening on 127.0.0.1 on a free port (`--bind 127.0.0.1
    /// --port 0`), with `args` after those.
    pub fn on_loopback(args: &[&str]) -> Ambassador {
        let mut all = vec!["--bind", "127.0.0.1", "--port", "0"];
        all.extend_from_slice(args);
        Self::start(&all)
    }

    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Ambassador {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ambassadord"));
        cmd.args(args)
            .env_remove("RUST_LOG")
            .envs(env.iter().copied());
        Self::spawn(cmd)
    }

    /// Starts the binary in network namespace `netns` (`ip netns exec`, which execs it:
    /// the process is the binary itself).
    pub fn start_in(netns: &str, args: &[&str]) -> Ambassador {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns, env!("CARGO_BIN_EXE_ambassadord")])
            .args(args)
            .env_remove("RUST_LOG");
        Self::spawn(cmd)
    }

    /// Starts the binary through `sh -c script` (for ulimit and the like).
    pub fn start_with_shell(script: &str) -> Ambassador {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", script]).env_remove("RUST_LOG");
        Self::spawn(cmd)
    }

    pub fn child_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn spawn(mut cmd: Command) -> Ambassador {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child =
            process::spawn(cmd, nix::sys::signal::Signal::SIGKILL).expect("start ambassadord");
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let ended = Arc::new(AtomicBool::new(false));
        let at_eof = ended.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[ambassadord] {line}");
                sink.lock().unwrap().push(line);
            }
            at_eof.store(true, Ordering::SeqCst);
        });
        let mut amb = Ambassador {
            child,
            lines,
            ended,
            addr: "0.0.0.0:0".parse().unwrap(),
        };
        // The first route's line, in the text or the JSON log format.
        let line = amb.wait_for_log_where("a listening line", |l| {
            (l.contains(" listening listen=") || l.contains(r#""message":"listening""#))
                && field(l, "listen").is_some()
        });
        amb.addr = field(&line, "listen")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no listen address in {line:?}"));
        // A wildcard bind is reached through loopback.
        if amb.addr.ip().is_unspecified() {
            amb.addr.set_ip(if amb.addr.is_ipv6() {
                "::1".parse().unwrap()
            } else {
                "127.0.0.1".parse().unwrap()
            });
        }
        amb
    }

    /// The admin endpoint's address, from its log line.
    pub fn admin_addr(&mut self) -> SocketAddr {
        let line = self.wait_for_log("admin endpoint listening");
        field(&line, "admin")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no admin address in {line:?}"))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every log line so far.
    pub fn log(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    pub fn count_log(&self, needle: &str) -> usize {
        self.log().iter().filter(|l| l.contains(needle)).count()
    }

    /// Waits until a log line contains `needle` and returns it.
    pub fn wait_for_log(&mut self, needle: &str) -> String {
        self.wait_for_log_where(&format!("{needle:?}"), |l| l.contains(needle))
    }

    /// Waits until a log line satisfies `wanted` (described by `what`) and returns it.
    pub fn wait_for_log_where(&mut self, what: &str, wanted: impl Fn(&str) -> bool) -> String {
        let needle = what;
        let lines = self.lines.clone();
        wait_until(
            DEADLINE,
            || {
                if let Some(line) = self.log().into_iter().find(|l| wanted(l)) {
                    return Some(line);
                }
                if let Ok(Some(status)) = self.child.try_wait() {
                    self.wait_for_every_line();
                    if let Some(line) = self.log().into_iter().find(|l| wanted(l)) {
                        return Some(line);
                    }
                    panic!(
                        "ambassadord exited ({status}) before logging {needle}: {:#?}",
                        self.log()
                    );
                }
                None
            },
            || {
                format!(
                    "no log line with {needle:?} in {:#?}",
                    lines.lock().unwrap()
                )
            },
        )
    }

    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -{signal} failed");
    }

    /// Waits for the process to exit, failing the test after the deadline, and for
    /// every line it wrote to be collected.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let lines = self.lines.clone();
        let status = wait_until(
            DEADLINE,
            || self.child.try_wait().unwrap(),
            || format!("ambassadord did not exit: {:#?}", lines.lock().unwrap()),
        );
        self.wait_for_every_line();
        status
    }

    /// Once the process has exited: waits until its last lines are collected.
    fn wait_for_every_line(&self) {
        wait_until(
            DEADLINE,
            || self.ended.load(Ordering::SeqCst).then_some(()),
            || "the exited ambassadord's stderr never ended".to_string(),
        );
    }
}

impl Drop for Ambassador {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of `key=value` in a text log line, or of `key` in a JSON one.
pub fn field(line: &str, key: &str) -> Option<String> {
    if line.starts_with('{') {
        let json: serde_json::Value = serde_json::from_str(line).ok()?;
        return match &json[key] {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Null => None,
            other => Some(other.to_string()),
        };
    }
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    let rest = &line[start..];
    let rest = rest.strip_prefix('"').unwrap_or(rest);
    Some(rest.split([' ', '"']).next()?.to_string())
}

/// Runs the binary to completion (for arguments that must be rejected).
pub fn run_to_exit(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ambassadord"))
        .args(args)
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run ambassadord");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Calls `check` until it returns `Some`, every 20 ms; after `deadline` fails the test
/// with the message `failure` makes (called only then, so it can show a log). For
/// synchronous tests and harness code; async code uses [`eventually`].
pub fn wait_until<T>(
    deadline: Duration,
    mut check: impl FnMut() -> Option<T>,
    failure: impl FnOnce() -> String,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = check() {
            return v;
        }
        if start.elapsed() >= deadline {
            panic!("{}", failure());
        }
        std::thread::sleep(POLL);
    }
}

/// How often a waiting test looks again.
const POLL: Duration = Duration::from_millis(20);

/// Polls `check` until it returns `Some`, failing the test after the deadline.
pub async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_within(DEADLINE, what, check).await
}

/// [`eventually`] with its own deadline, for waits the product bounds more loosely
/// (a discovery retry after backoff has grown).
pub async fn eventually_within<T, F, Fut>(deadline: Duration, what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_every(deadline, POLL, check, || {
        format!("timed out waiting for: {what}")
    })
    .await
}

/// The async deadline loop: calls `check` every `every` (zero: again at once, for a
/// test that measures how soon something happens) until it returns `Some`; after
/// `deadline` fails the test with the message `failure` makes.
pub async fn eventually_every<T, F, Fut>(
    deadline: Duration,
    every: Duration,
    mut check: F,
    failure: impl FnOnce() -> String,
) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if start.elapsed() >= deadline {
            panic!("{}", failure());
        }
        if every.is_zero() {
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(every).await;
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift), different for each seed.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// A backend task on loopback that can be stopped (its listener closed, its connections
/// cut) to play a backend that died.
pub struct Backend {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Backend {
    /// A backend served by a task the test wrote itself.
    pub fn from_task(addr: SocketAddr, task: JoinHandle<()>) -> Backend {
        Backend { addr, task }
    }

    /// Stops the backend and returns once its port refuses connections (aborting the
    /// task closes its listener a moment later, not at once).
    pub fn kill(self) {
        self.task.abort();
        let addr = self.addr;
        wait_until(
            DEADLINE,
            || std::net::TcpStream::connect(addr).is_err().then_some(()),
            || format!("the killed backend {addr} still accepts connections"),
        );
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_each<F, Fut>(listener: TcpListener, handler: F) -> Backend
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                Ok((stream, _)) = listener.accept() => { conns.spawn(handler(stream)); }
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
    });
    Backend { addr, task }
}

/// Answers each connection with `name\n` and closes: tells which backend served.
pub async fn named_backend(bind: &str, name: &'static str) -> Backend {
    let listener = TcpListener::bind(bind).await.unwrap();
    serve_each(listener, move |mut s| async move {
        let _ = s.write_all(format!("{name}\n").as_bytes()).await;
        let _ = s.shutdown().await;
        let mut sink = [0u8; 64];
        while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await
}

/// A backend that greets each connection with `name\n`, then echoes until EOF: a
/// connection that stays open tells which backend it is still attached to.
pub async fn tagged_echo(name: &'static str) -> Backend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                if s.write_all(format!("{name}\n").as_bytes()).await.is_err() {
                    return;
                }
                let (mut rd, mut wr) = s.split();
                let _ = tokio::io::copy(&mut rd, &mut wr).await;
                let _ = wr.shutdown().await;
            });
        }
    });
    Backend::from_task(addr, task)
}

/// A client connection that has read the backend's greeting.
pub async fn attach(
    proxy: SocketAddr,
) -> std::io::Result<(String, tokio::io::BufReader<TcpStream>)> {
    let s = TcpStream::connect(proxy).await?;
    let mut s = tokio::io::BufReader::new(s);
    let mut greeting = String::new();
    s.read_line(&mut greeting).await?;
    Ok((greeting.trim().to_string(), s))
}

/// Which backend a fresh connection to `proxy` reaches (None if refused or cut).
pub async fn greeting(proxy: SocketAddr) -> Option<String> {
    let (name, _) = attach(proxy).await.ok()?;
    (!name.is_empty()).then_some(name)
}

/// Sends `text` on an attached connection and reads it back, then half-closes and
/// waits for the backend's EOF: the transfer completes.
pub async fn finish(mut s: tokio::io::BufReader<TcpStream>, text: &str) -> String {
    s.get_mut().write_all(text.as_bytes()).await.unwrap();
    s.get_mut().shutdown().await.unwrap();
    let mut rest = String::new();
    s.read_to_string(&mut rest).await.unwrap();
    rest
}

/// The integrity backend: for each connection it sends `pattern(seed, len)` (seed and
/// length come from a 16-byte header) while reading the client's bytes until EOF, and
/// after that EOF sends the sha256 of everything it read, then closes. A proxy that
/// loses bytes, reorders them, or mishandles half-close fails the client's checks.
pub async fn integrity_backend() -> Backend {
    integrity_backend_on(TcpListener::bind("127.0.0.1:0").await.unwrap()).await
}

/// [`integrity_backend`] on a listener already made (in another namespace).
pub async fn integrity_backend_on(listener: TcpListener) -> Backend {
    serve_each(listener, |s| async move {
        let (mut rd, mut wr) = s.into_split();
        let mut header = [0u8; 16];
        if rd.read_exact(&mut header).await.is_err() {
            return;
        }
        let seed = u64::from_le_bytes(header[..8].try_into().unwrap());
        let len = u64::from_le_bytes(header[8..].try_into().unwrap()) as usize;
        let reader = tokio::spawn(async move {
            let mut hasher = Sha256::new();
            hasher.update(header);
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => hasher.update(&buf[..n]),
                    Err(_) => return None,
                }
            }
            Some(<[u8; 32]>::from(hasher.finalize()))
        });
        if wr.write_all(&pattern(seed, len)).await.is_err() {
            return;
        }
        if let Ok(Some(digest)) = reader.await {
            let _ = wr.write_all(&digest).await;
        }
        let _ = wr.shutdown().await;
    })
    .await
}

/// The client side of the integrity check: sends `len` bytes, half-closes, and checks
/// the `len` bytes back plus the digest of what the backend received.
pub async fn integrity_exchange(proxy: SocketAddr, seed: u64, len: usize) {
    let stream = TcpStream::connect(proxy)
        .await
        .expect("connect to the proxy");
    integrity_exchange_over(stream, seed, len).await;
}

/// [`integrity_exchange`] over a connection already made (in another namespace, or
/// through TLS).
pub async fn integrity_exchange_over<S>(stream: S, seed: u64, len: usize)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut sent = Vec::with_capacity(len + 16);
    sent.extend_from_slice(&seed.to_le_bytes());
    sent.extend_from_slice(&(len as u64).to_le_bytes());
    sent.extend_from_slice(&pattern(seed ^ 0xFFFF, len));
    let expect_up = sha256(&sent);
    let writer = tokio::spawn(async move {
        wr.write_all(&sent).await.expect("send through the proxy");
        // Half-close: the backend answers the digest only after this EOF.
        wr.shutdown().await.expect("half-close");
        wr
    });
    let mut got = Vec::with_capacity(len + 32);
    rd.read_to_end(&mut got)
        .await
        .expect("read through the proxy");
    let _wr = writer.await.unwrap();
    assert_eq!(got.len(), len + 32, "seed {seed}: wrong byte count back");
    assert!(
        sha256(&got[..len]) == sha256(&pattern(seed, len)),
        "seed {seed}: backend→client bytes corrupted"
    );
    assert_eq!(
        got[len..],
        expect_up,
        "seed {seed}: client→backend bytes corrupted"
    );
}

/// The backend that answered one connection through `proxy` (a [`named_backend`]'s
/// name), or `None` if the proxy closed it unserved or no answer ended within 2 s.
pub async fn served_by(proxy: SocketAddr) -> Option<String> {
    // A backend that does not end its answer (an echo server) is not a name: counted
    // as unserved after a while rather than waited for forever.
    match tokio::time::timeout(Duration::from_secs(2), read_reply(proxy)).await {
        Ok(Ok(reply)) if !reply.is_empty() => Some(reply.trim().to_string()),
        _ => None,
    }
}

/// The backends that `tries` connections in a row reach; a connection closed unserved
/// (refused, or an error) counts as "".
pub async fn serving(proxy: SocketAddr, tries: usize) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    for _ in 0..tries {
        seen.insert(served_by(proxy).await.unwrap_or_default());
    }
    seen
}

/// Waits until connections through `proxy` reach exactly the backends `want`, every one
/// of them and no other (and none is refused, unless `want` is `[""]`).
pub async fn wait_serving(proxy: SocketAddr, want: &[&str]) {
    let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
    // Round robin reaches each of n backends within n connections; more for weights.
    let tries = 3 * want.len() + 2;
    eventually(&format!("the proxy serving exactly {want:?}"), || {
        let want = want.clone();
        async move { (serving(proxy, tries).await == want).then_some(()) }
    })
    .await;
}

/// Waits until a connection through `proxy` is served by `name`.
pub async fn until_served_by(proxy: SocketAddr, name: &str) {
    eventually(&format!("a connection served by {name}"), || async {
        (served_by(proxy).await.as_deref() == Some(name)).then_some(())
    })
    .await;
}

/// Runs `n` [`integrity_exchange`]s through `proxy` at once (seed `seed + i`, length
/// `len + i`), each checked; returns the bytes the clients sent and received in all, as
/// the proxy's log must count them.
pub async fn concurrent_exchanges(proxy: SocketAddr, n: u64, seed: u64, len: usize) -> (u64, u64) {
    let mut tasks = tokio::task::JoinSet::new();
    let (mut up, mut down) = (0, 0);
    for i in 0..n {
        let len = len + i as usize;
        // A 16-byte header and the payload up; the payload and a 32-byte digest down.
        up += 16 + len as u64;
        down += len as u64 + 32;
        tasks.spawn(integrity_exchange(proxy, seed + i, len));
    }
    while let Some(r) = tasks.join_next().await {
        if let Err(e) = r {
            std::panic::resume_unwind(e.into_panic());
        }
    }
    (up, down)
}

impl Ambassador {
    /// Waits until `n` connections have been logged as closed and returns the bytes
    /// their log lines count each way, in all.
    pub fn closed_totals(&mut self, n: usize) -> (u64, u64) {
        let lines = self.lines.clone();
        let closed = wait_until(
            DEADLINE,
            || {
                let closed: Vec<String> = self
                    .log()
                    .into_iter()
                    .filter(|l| l.contains("connection closed"))
                    .collect();
                (closed.len() >= n).then_some(closed)
            },
            || {
                format!(
                    "fewer than {n} connections logged as closed: {:#?}",
                    lines.lock().unwrap()
                )
            },
        );
        assert_eq!(closed.len(), n, "more connections than made: {closed:#?}");
        let total = |key| {
            closed
                .iter()
                .map(|l| {
                    field(l, key)
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or_else(|| panic!("no {key} in {l}"))
                })
                .sum()
        };
        (total("sent"), total("received"))
    }
}

/// Reads one whole answer from the proxy (until EOF).
pub async fn read_reply(proxy: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect(proxy).await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}
