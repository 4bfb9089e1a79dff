//! Two hosts: two network namespaces of the test's own, joined by a veth pair. A
//! client in A speaks plaintext to the ambassador in A, whose backend is `tls+` the
//! ambassador in B (`--tls-listen --tls-ca --tls-allow`), in front of a server on B's
//! loopback. What crosses the veth is captured with tcpdump and searched for the
//! plaintext; the same search over A's loopback, where the plaintext is, finds it.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use tokio::net::{TcpListener, TcpStream};

use crate::support::netns::Netns;
use crate::support::pki::{Pki, San};
use crate::support::*;

/// tcpdump writing every TCP packet on `dev` in `netns` to `file`, whole, unbuffered.
struct Capture {
    child: Child,
    file: std::path::PathBuf,
}

impl Capture {
    fn start(netns: &str, dev: &str, file: std::path::PathBuf) -> Capture {
        let mut child = Command::new("ip")
            .args([
                "netns", "exec", netns, "tcpdump", "-i", dev, "-U", "-s", "0", "-n", "-B", "131072",
            ])
            .arg("-w")
            .arg(&file)
            .arg("tcp")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tcpdump (scripts/test installs it)");
        // It says "listening on DEV" once the capture is open.
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        loop {
            match rx.recv_timeout(DEADLINE) {
                Ok(line) if line.contains("listening on") => break,
                Ok(_) => {}
                Err(e) => panic!("tcpdump on {dev} did not start: {e}"),
            }
        }
        Capture { child, file }
    }

    /// Stops the capture (SIGINT: it writes out what it has) and returns the file.
    fn finish(mut self) -> Vec<u8> {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        std::fs::read(&self.file).expect("the capture file")
    }
}

/// How many of the 64-byte windows taken every 256 KiB of `data` appear in `haystack`
/// (one pass over it: a position is compared in full only when its first two bytes
/// start some window).
fn windows_found(haystack: &[u8], data: &[u8]) -> (usize, usize) {
    const W: usize = 64;
    let windows: Vec<&[u8]> = (0..data.len().saturating_sub(W))
        .step_by(256 * 1024)
        .map(|start| &data[start..start + W])
        .collect();
    let key = |b: &[u8]| b[0] as usize | (b[1] as usize) << 8;
    let mut starts = vec![false; 1 << 16];
    for w in &windows {
        starts[key(w)] = true;
    }
    let mut seen = vec![false; windows.len()];
    for at in 0..haystack.len().saturating_sub(W) {
        if !starts[key(&haystack[at..])] {
            continue;
        }
        let here = &haystack[at..at + W];
        for (i, w) in windows.iter().enumerate() {
            if !seen[i] && *w == here {
                seen[i] = true;
            }
        }
    }
    (seen.iter().filter(|s| **s).count(), windows.len())
}

#[tokio::test(flavor = "multi_thread")]
async fn across_two_hosts_the_hop_is_encrypted_and_both_ends_authenticated() {
    let mut host_a = Netns::new();
    let host_b = Netns::new();
    let (veth_a, ip_a, ip_b) = host_a.join(&host_b);
    let pki = Pki::new("hosts");
    let b_leaf = pki.leaf("b", &[San::Dns("b.test"), San::Ip(ip_b.into())]);
    let a_leaf = pki.leaf("a", &[San::Uri("spiffe://test/host-a")]);

    let listener = host_b.inside(|| {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        l
    });
    let backend = integrity_backend_on(TcpListener::from_std(listener).unwrap()).await;
    let (b_ip, backend_addr) = (ip_b.to_string(), backend.addr.to_string());
    let mut args = vec!["--bind", &b_ip, "--port", "0", "--admin", "off"];
    args.extend(pki.listen_args(&b_leaf));
    args.extend(["--tls-allow", "spiffe://test/host-a", &backend_addr]);
    let mut b = Ambassador::start_in(&host_b.name, &args);
    let remote = format!("tls+{}", b.addr);
    let mut args = vec!["--bind", "127.0.0.1", "--port", "0", "--admin", "off"];
    args.extend(pki.sender_args(&a_leaf));
    args.push(&remote);
    let mut a = Ambassador::start_in(&host_a.name, &args);

    let wire = Capture::start(&host_a.name, &veth_a, pki.dir().join("veth.pcap"));
    let local = Capture::start(&host_a.name, "lo", pki.dir().join("lo.pcap"));
    let a_addr: SocketAddr = a.addr;
    let client = host_a.inside(move || {
        let s = std::net::TcpStream::connect(a_addr).unwrap();
        s.set_nonblocking(true).unwrap();
        s
    });
    let seed = 11;
    let len = 8 << 20;
    integrity_exchange_over(TcpStream::from_std(client).unwrap(), seed, len).await;
    let on_wire = wire.finish();
    let on_loopback = local.finish();

    // The route in A logs its backend; B logs A's certificate and A's address.
    let line = a.wait_for_log("connection closed");
    assert!(line.contains(&format!("backend={}", b.addr)), "{line}");
    let line = b.wait_for_log("connection closed");
    assert!(line.contains("tls_peer=URI:spiffe://test/host-a"), "{line}");
    assert!(line.contains(&format!("client={ip_a}:")), "{line}");

    // Both directions' 8 MB crossed the veth...
    assert!(
        on_wire.len() > 2 * len,
        "{} bytes captured on the veth",
        on_wire.len()
    );
    let up = pattern(seed ^ 0xFFFF, len);
    let down = pattern(seed, len);
    for (what, data) in [("client → backend", &up), ("backend → client", &down)] {
        // ...and none of their plaintext did,
        let (found, tried) = windows_found(&on_wire, data);
        assert_eq!(
            found, 0,
            "{what}: {found} of {tried} plaintext windows on the veth"
        );
        // while the same search finds it where it is plaintext (a window may straddle
        // two captured packets, so not every one).
        let (found, tried) = windows_found(&on_loopback, data);
        assert!(
            found * 2 > tried,
            "{what}: only {found} of {tried} windows found on A's loopback"
        );
    }
    // TLS records (application data, TLS 1.2/1.3 framing) are what it was.
    assert!(
        on_wire
            .windows(3)
            .filter(|w| *w == [0x17, 0x03, 0x03])
            .count()
            > 100
    );
}
