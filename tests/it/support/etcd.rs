//! A real etcd (Debian's etcd-server) for the tests: started on ephemeral loopback ports
//! with a temporary data dir, driven through its v3 JSON gateway. Tests that only read
//! and write keys share one etcd for the whole run ([`Etcd::scope`]: each test under a
//! key prefix of its own); a test that stops, restarts or compacts the store starts its
//! own ([`Etcd::start`]), removed when dropped. Also a relay that can hold watch
//! requests, to make a watch start behind a compaction on purpose.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{DEADLINE, eventually, eventually_every};

static NEXT_DIR: AtomicUsize = AtomicUsize::new(0);
/// The data dirs are `<temp>/ambassadord-etcd-<test pid>-<n>`.
const DIR_PREFIX: &str = "ambassadord-etcd-";

/// One single-member etcd cluster on 127.0.0.1.
pub struct Etcd {
    child: Option<Child>,
    dir: PathBuf,
    pub client: SocketAddr,
    peer: SocketAddr,
}

/// A key prefix of one test's own in the shared etcd: keys and URLs given to it are
/// under `/t<n>`, so tests sharing the store never see each other's keys.
pub struct Scope {
    pub etcd: &'static Etcd,
    pub prefix: String,
}

impl Scope {
    /// The full key for `key` (`/svc/n/one` → `/t3/svc/n/one`).
    pub fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    pub async fn put(&self, key: &str, value: &str) -> i64 {
        self.etcd.put(&self.key(key), value).await
    }

    pub async fn delete(&self, key: &str) -> i64 {
        self.etcd.delete(&self.key(key)).await
    }

    /// `etcd://127.0.0.1:PORT/t<n>/path`
    pub fn url(&self, path: &str) -> String {
        self.etcd.url(&self.key(path))
    }
}

impl Etcd {
    /// A prefix of the calling test's own in the etcd every such test shares, started
    /// on first use and killed when the test process ends.
    pub fn scope() -> Scope {
        static SHARED: OnceLock<Etcd> = OnceLock::new();
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let etcd = SHARED.get_or_init(|| {
            remove_stale_dirs();
            // Started on a runtime of its own: the first test's runtime ends with it,
            // and the store must not.
            std::thread::spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime to start etcd");
                rt.block_on(Etcd::start())
            })
            .join()
            .expect("start the shared etcd")
        });
        Scope {
            etcd,
            prefix: format!("/t{}", NEXT.fetch_add(1, Ordering::Relaxed)),
        }
    }

    /// Starts etcd on fresh ephemeral ports and waits until it answers reads.
    pub async fn start() -> Etcd {
        Self::start_on(free_port()).await
    }

    /// Starts etcd with its client URL on `client_port` (a port reserved earlier, for a
    /// store that comes up after the ambassador already points at it).
    pub async fn start_on(client_port: u16) -> Etcd {
        let dir = std::env::temp_dir().join(format!(
            "{DIR_PREFIX}{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the etcd temp dir");
        let mut etcd = Etcd {
            child: None,
            dir,
            client: SocketAddr::from(([127, 0, 0, 1], client_port)),
            peer: SocketAddr::from(([127, 0, 0, 1], free_port())),
        };
        etcd.restart().await;
        etcd
    }

    /// Kills the server (as a crash would: connections are cut, nothing is flushed
    /// beyond what etcd already synced).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same ports and data dir and waits until it
    /// answers reads.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "etcd is already running");
        let log = std::fs::File::create(self.dir.join("etcd.log")).expect("etcd log file");
        let client_url = format!("http://{}", self.client);
        let peer_url = format!("http://{}", self.peer);
        let mut cmd = Command::new("etcd");
        cmd.args([
            "--name",
            "test",
            "--logger",
            "zap",
            "--log-outputs",
            "stderr",
        ])
        .arg("--data-dir")
        .arg(self.dir.join("data"))
        .args(["--listen-client-urls", &client_url])
        .args(["--advertise-client-urls", &client_url])
        .args(["--listen-peer-urls", &peer_url])
        .args(["--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("test={peer_url}")])
        // A lone member elects itself; short timeouts make that quick.
        .args(["--heartbeat-interval", "20", "--election-timeout", "200"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
        let child = super::process::spawn(cmd, Signal::SIGKILL)
            .expect("run etcd (Debian package etcd-server; scripts/test installs it)");
        let child = std::cell::RefCell::new(child);
        let this = &*self;
        eventually_every(
            DEADLINE,
            Duration::from_millis(50),
            || async {
                if let Ok(Some(status)) = child.borrow_mut().try_wait() {
                    panic!("etcd exited ({status}) at start:\n{}", this.log());
                }
                let read = this.try_call("/v3/kv/range", json!({"key": b64("/")}));
                read.await.ok().map(|_| ())
            },
            || format!("etcd did not come up:\n{}", this.log()),
        )
        .await;
        self.child = Some(child.into_inner());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default()
    }

    /// `etcd://127.0.0.1:PORT/path`
    pub fn url(&self, path: &str) -> String {
        format!("etcd://{}{}", self.client, path)
    }

    /// Sets `key` and returns the revision of the change.
    pub async fn put(&self, key: &str, value: &str) -> i64 {
        let reply = self
            .call("/v3/kv/put", json!({"key": b64(key), "value": b64(value)}))
            .await;
        revision(&reply)
    }

    pub async fn delete(&self, key: &str) -> i64 {
        let reply = self
            .call("/v3/kv/deleterange", json!({"key": b64(key)}))
            .await;
        revision(&reply)
    }

    /// The store's current revision.
    pub async fn revision(&self) -> i64 {
        revision(&self.call("/v3/kv/range", json!({"key": b64("/")})).await)
    }

    /// Compacts history up to `revision`: a watch asking for anything older is refused.
    pub async fn compact(&self, revision: i64) {
        self.call(
            "/v3/kv/compaction",
            json!({"revision": revision.to_string(), "physical": true}),
        )
        .await;
    }

    async fn call(&self, path: &str, body: Value) -> Value {
        match self.try_call(path, body.clone()).await {
            Ok(v) => v,
            Err(e) => panic!("etcd {path} {body}: {e}\n{}", self.log()),
        }
    }

    async fn try_call(&self, path: &str, body: Value) -> Result<Value, String> {
        let (status, text) = http_post(self.client, path, &body.to_string()).await?;
        if status != 200 {
            return Err(format!("HTTP {status}: {text}"));
        }
        serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Data dirs of etcds whose test process is gone (the shared one is killed, never
/// dropped, so its dir outlives the run).
fn remove_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(DIR_PREFIX)
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if !std::path::Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn b64(s: &str) -> String {
    B64.encode(s.as_bytes())
}

fn revision(reply: &Value) -> i64 {
    reply["header"]["revision"]
        .as_str()
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("no revision in {reply}"))
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("reserve a port")
        .port()
}

/// One HTTP/1.0 POST (so the reply is neither chunked nor kept alive): status and body.
async fn http_post(addr: SocketAddr, path: &str, body: &str) -> Result<(u16, String), String> {
    let io = async {
        let mut s = TcpStream::connect(addr).await?;
        let request = format!(
            "POST {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(request.as_bytes()).await?;
        let mut reply = Vec::new();
        s.read_to_end(&mut reply).await?;
        Ok::<_, std::io::Error>(reply)
    };
    let reply = tokio::time::timeout(Duration::from_secs(5), io)
        .await
        .map_err(|_| "no reply within 5s".to_string())?
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&reply);
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no HTTP header end")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    Ok((status, body.to_string()))
}

/// A TCP relay in front of etcd that passes everything through, except that while held
/// it keeps each new `POST /v3/watch` request from reaching etcd until released. The
/// watch then reaches the real etcd late, as it would after a slow network.
pub struct WatchGate {
    pub addr: SocketAddr,
    open: watch::Sender<bool>,
    held: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl WatchGate {
    /// A relay to `upstream` that starts out holding watches.
    pub async fn start(upstream: SocketAddr) -> WatchGate {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (open, open_rx) = watch::channel(false);
        let held = Arc::new(AtomicUsize::new(0));
        let held_count = held.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let mut open_rx = open_rx.clone();
                let held = held_count.clone();
                tokio::spawn(async move {
                    let _ = relay(client, upstream, &mut open_rx, &held).await;
                });
            }
        });
        WatchGate {
            addr,
            open,
            held,
            task,
        }
    }

    /// Waits until a watch request is being held.
    pub async fn wait_held(&self) {
        eventually("a watch request held at the gate", || async {
            (self.held.load(Ordering::SeqCst) > 0).then_some(())
        })
        .await;
    }

    /// Lets held and future watch requests through.
    pub fn release(&self) {
        self.open.send_replace(true);
    }
}

impl Drop for WatchGate {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(
    mut client: TcpStream,
    upstream: SocketAddr,
    open: &mut watch::Receiver<bool>,
    held: &AtomicUsize,
) -> std::io::Result<()> {
    // Enough of the request to see its line.
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(2).any(|w| w == b"\r\n") {
        let n = client.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    if head.starts_with(b"POST /v3/watch ") && !*open.borrow() {
        held.fetch_add(1, Ordering::SeqCst);
        let _ = open.wait_for(|open| *open).await;
        held.fetch_sub(1, Ordering::SeqCst);
    }
    let mut server = TcpStream::connect(upstream).await?;
    server.write_all(&head).await?;
    tokio::io::copy_bidirectional(&mut client, &mut server).await?;
    Ok(())
}
