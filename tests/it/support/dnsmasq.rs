//! A real dnsmasq (Debian's dnsmasq-base) for DNS tests: started on 127.0.0.1 on an
//! ephemeral port with a config the test writes, answering only from that config
//! (--no-resolv --no-hosts), its query log collected, and stopped when dropped.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal;

use super::{DEADLINE, wait_until};

pub struct Dnsmasq {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Dnsmasq {
    /// Starts dnsmasq serving `config` (dnsmasq.conf lines: `srv-host=`, `host-record=`,
    /// `local=`, `local-ttl=` ...) and waits until it accepts queries.
    pub fn start(config: &str) -> Dnsmasq {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ambassadord-dnsmasq-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create the dnsmasq directory");
        let mut dns = Dnsmasq {
            child: None,
            port: 0,
            dir,
            lines: Arc::new(Mutex::new(Vec::new())),
        };
        // A port free for both UDP and TCP may be taken before dnsmasq binds it: try
        // another one then.
        for _ in 0..20 {
            dns.port = free_port();
            if dns.launch(config) {
                return dns;
            }
        }
        panic!("dnsmasq would not start: {:#?}", dns.log());
    }

    /// Stops dnsmasq and starts it again on the same port with a new config (dnsmasq
    /// does not re-read srv-host on SIGHUP).
    pub fn restart(&mut self, config: &str) {
        self.stop();
        // The port is ours, but a TCP child of the old process may hold it for a moment.
        let lines = self.lines.clone();
        let port = self.port;
        wait_until(
            DEADLINE,
            || self.launch(config).then_some(()),
            || {
                format!(
                    "dnsmasq would not restart on port {port}: {:#?}",
                    lines.lock().unwrap()
                )
            },
        );
    }

    /// The `--dns` argument that points at this server.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Every log line so far (startup messages and, with --log-queries, each query).
    pub fn log(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    pub fn count_log(&self, needle: &str) -> usize {
        self.log().iter().filter(|l| l.contains(needle)).count()
    }

    /// Stops the server and every process it forked (one per TCP query).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Its own process group (see `launch`), so this reaches only what we started.
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .stderr(Stdio::null())
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts dnsmasq on `self.port`; false if it exited (port taken) before serving.
    fn launch(&mut self, config: &str) -> bool {
        let conf = self.dir.join("dnsmasq.conf");
        std::fs::write(&conf, config).expect("write dnsmasq.conf");
        let bin = ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or("dnsmasq");
        let mut cmd = Command::new(bin);
        cmd.args([
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
            "--log-queries",
            "--log-facility=-",
            "--pid-file=",
        ])
        .arg(format!("--port={}", self.port))
        .arg(format!("--conf-file={}", conf.display()))
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        let mut child = super::process::spawn(cmd, Signal::SIGKILL)
            .expect("start dnsmasq (Debian package dnsmasq-base; scripts/test installs it)");
        let stderr = child.stderr.take().unwrap();
        let sink = self.lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[dnsmasq] {line}");
                sink.lock().unwrap().push(line);
            }
        });
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        let served = wait_until(
            DEADLINE,
            || {
                if let Ok(Some(_)) = child.try_wait() {
                    return Some(false);
                }
                // It binds UDP and TCP before it serves; a TCP connect proves both are bound.
                let up = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok();
                up.then_some(true)
            },
            || "dnsmasq never listened".to_string(),
        );
        if served {
            self.child = Some(child);
        }
        served
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A loopback port that is free for UDP and TCP right now.
fn free_port() -> u16 {
    loop {
        let udp = UdpSocket::bind("127.0.0.1:0").expect("bind a UDP port");
        let port = udp.local_addr().unwrap().port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// What a raw UDP query got back: the header fields the tests look at.
#[derive(Debug)]
pub struct UdpAnswer {
    pub truncated: bool,
    pub answers: u16,
    pub len: usize,
}

/// Sends one query over UDP with an EDNS0 OPT record advertising `payload` bytes (as
/// hickory does, with 1232) and reads the header of the reply: lets a test show that an
/// answer really does not fit in a datagram.
pub fn udp_query(server: &str, name: &str, qtype: u16, payload: u16) -> UdpAnswer {
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 1];
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes());
    // OPT: root name, type 41, class = payload size, ttl 0, no options.
    q.push(0);
    q.extend_from_slice(&41u16.to_be_bytes());
    q.extend_from_slice(&payload.to_be_bytes());
    q.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(DEADLINE)).unwrap();
    sock.send_to(&q, server).expect("send a DNS query");
    let mut buf = vec![0u8; 65535];
    let n = sock.recv(&mut buf).expect("a DNS reply");
    assert!(n >= 12, "short DNS reply ({n} bytes)");
    UdpAnswer {
        truncated: buf[2] & 0x02 != 0,
        answers: u16::from_be_bytes([buf[6], buf[7]]),
        len: n,
    }
}
