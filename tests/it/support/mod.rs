//! Test harness shared by the integration tests: the real `ambassadord` binary started
//! on ephemeral ports, real backends on loopback, and waiting on conditions with a
//! deadline instead of sleeping.
#![allow(dead_code)]

pub mod consul;
pub mod dnsmasq;
pub mod docker;
pub mod etcd;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// How long any condition in a test may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A running `ambassadord` process whose log lines are collected.
pub struct Ambassador {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    /// The first address it reported listening on.
    pub addr: SocketAddr,
}

impl Ambassador {
    /// Starts the binary with `args` and waits until it says where it listens.
    pub fn start(args: &[&str]) -> Ambassador {
        Self::start_with_env(args, &[])
    }

    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Ambassador {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ambassadord"));
        cmd.args(args)
            .env_remove("RUST_LOG")
            .envs(env.iter().copied());
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
        let mut child = cmd.spawn().expect("start ambassadord");
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[ambassadord] {line}");
                sink.lock().unwrap().push(line);
            }
        });
        let mut amb = Ambassador {
            child,
            lines,
            addr: "0.0.0.0:0".parse().unwrap(),
        };
        let line = amb.wait_for_log("listening listen=");
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
        let start = Instant::now();
        loop {
            if let Some(line) = self.log().into_iter().find(|l| l.contains(needle)) {
                return line;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Give the reader thread a moment to collect the last lines.
                std::thread::sleep(Duration::from_millis(100));
                if let Some(line) = self.log().into_iter().find(|l| l.contains(needle)) {
                    return line;
                }
                panic!(
                    "ambassadord exited ({status}) before logging {needle:?}: {:#?}",
                    self.log()
                );
            }
            assert!(
                start.elapsed() < DEADLINE,
                "no log line with {needle:?} in {:#?}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -{signal} failed");
    }

    /// Waits for the process to exit, failing the test after the deadline.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "ambassadord did not exit: {:#?}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Ambassador {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of `key=value` in a text log line.
pub fn field(line: &str, key: &str) -> Option<String> {
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
pub async fn eventually_within<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(start.elapsed() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
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

    pub fn kill(self) {
        self.task.abort();
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

/// The integrity backend: for each connection it sends `pattern(seed, len)` (seed and
/// length come from a 16-byte header) while reading the client's bytes until EOF, and
/// after that EOF sends the sha256 of everything it read, then closes. A proxy that
/// loses bytes, reorders them, or mishandles half-close fails the client's checks.
pub async fn integrity_backend() -> Backend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
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
    let (mut rd, mut wr) = stream.into_split();
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

/// Reads one whole answer from the proxy (until EOF).
pub async fn read_reply(proxy: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect(proxy).await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}
