//! Route options: the PROXY protocol toward backends (against the test's own parser and
//! against HAProxy as a real receiver), accepting it from a trusted upstream, and the
//! connection limit.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::support::etcd::free_port;
use crate::support::proxy_header::{self, Seen};
use crate::support::*;

/// Connects to `proxy` from `client_ip`, sends `data`, reads the backend's first line.
async fn first_line_from(
    proxy: SocketAddr,
    data: &[u8],
) -> (SocketAddr, String, BufReader<TcpStream>) {
    let s = TcpStream::connect(proxy).await.unwrap();
    let local = s.local_addr().unwrap();
    let mut s = BufReader::new(s);
    s.get_mut().write_all(data).await.unwrap();
    let mut line = String::new();
    tokio::time::timeout(DEADLINE, s.read_line(&mut line))
        .await
        .expect("the backend answers")
        .unwrap();
    (local, line.trim_end().to_string(), s)
}

/// The header each version writes carries the client's own address and port and the
/// address it connected to, for IPv4 and IPv6 clients; the client's bytes follow it
/// intact.
#[tokio::test(flavor = "multi_thread")]
async fn proxy_protocol_carries_the_client_address_v1_and_v2_ipv4_and_ipv6() {
    for bind in ["127.0.0.1", "::1"] {
        let on = if bind == "::1" {
            "[::1]:0"
        } else {
            "127.0.0.1:0"
        };
        let (backend, seen) = proxy_header::backend(on).await;
        for version in ["v1", "v2"] {
            let amb = Ambassador::start(&[
                "--bind",
                bind,
                "--port",
                "0",
                "--proxy-protocol",
                version,
                &backend.addr.to_string(),
            ]);
            let (local, line, s) = first_line_from(amb.addr, b"hello\n").await;
            assert_eq!(line, format!("SRC {local} DST {} {version}", amb.addr));
            let rest = finish(s, "and the rest\n").await;
            assert_eq!(rest, "hello\nand the rest\n");
            let header: Seen = seen.lock().unwrap().last().unwrap().clone().unwrap();
            assert_eq!(header.version, version);
            assert_eq!((header.source, header.destination), (local, amb.addr));
        }
    }
}

/// A server-speaks-first backend is not kept waiting for the client: the header goes
/// out as soon as the backend connects, with nothing after it.
#[tokio::test(flavor = "multi_thread")]
async fn the_header_is_sent_without_waiting_for_the_client() {
    let (backend, _) = proxy_header::backend("127.0.0.1:0").await;
    let amb = Ambassador::on_loopback(&["--proxy-protocol", "v2", &backend.addr.to_string()]);
    let s = TcpStream::connect(amb.addr).await.unwrap();
    let local = s.local_addr().unwrap();
    let mut s = BufReader::new(s);
    let mut line = String::new();
    tokio::time::timeout(DEADLINE, s.read_line(&mut line))
        .await
        .expect("the header alone reaches the backend")
        .unwrap();
    assert_eq!(line.trim_end(), format!("SRC {local} DST {} v2", amb.addr));
}

/// HAProxy (Debian's), a receiver nobody here wrote: a listener with `accept-proxy` in
/// front of an echo server logs the source and destination our header gave it.
#[tokio::test(flavor = "multi_thread")]
async fn haproxy_accepts_our_headers_and_logs_the_client() {
    let echo = tagged_echo("echo").await;
    for (bind, version) in [
        ("127.0.0.1", "v1"),
        ("127.0.0.1", "v2"),
        ("::1", "v1"),
        ("::1", "v2"),
    ] {
        let port = free_port();
        let listen = if bind == "::1" {
            format!("[::1]:{port}")
        } else {
            format!("127.0.0.1:{port}")
        };
        let dir =
            std::env::temp_dir().join(format!("ambassadord-haproxy-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = dir.join("haproxy.cfg");
        std::fs::write(
            &cfg,
            format!(
                "global\n  log stdout format raw local0\ndefaults\n  mode tcp\n  log global\n  \
                 timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
                 listen pp\n  bind {listen} accept-proxy\n  \
                 log-format \"client=%ci:%cp frontend=%fi:%fp\"\n  server echo {}\n",
                echo.addr
            ),
        )
        .unwrap();
        let mut cmd = Command::new("haproxy");
        cmd.args(["-db", "-f", cfg.to_str().unwrap()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut haproxy = crate::support::process::spawn(cmd, nix::sys::signal::Signal::SIGKILL)
            .expect("haproxy (scripts/test installs it)");
        let out = haproxy.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        wait_until(
            DEADLINE,
            || std::net::TcpStream::connect(&listen).ok().map(|_| ()),
            || format!("haproxy listening on {listen}"),
        );
        // The probe connection above had no header: HAProxy drops it (and may log it).
        let amb = Ambassador::start(&[
            "--bind",
            bind,
            "--port",
            "0",
            "--proxy-protocol",
            version,
            &listen,
        ]);
        let (local, greeting, s) = first_line_from(amb.addr, b"").await;
        assert_eq!(greeting, "echo");
        assert_eq!(finish(s, "through haproxy\n").await, "through haproxy\n");
        let want = format!("client={} frontend={}", fmt_hap(local), fmt_hap(amb.addr));
        let deadline = Instant::now() + DEADLINE;
        let mut lines = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.contains(&want) => break,
                Ok(line) => lines.push(line),
                Err(_) => panic!("{version} {bind}: haproxy never logged {want:?}: {lines:#?}"),
            }
        }
        let _ = haproxy.kill();
        let _ = haproxy.wait();
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// HAProxy's log shows addresses as `ip:port`, an IPv6 one without brackets.
fn fmt_hap(addr: SocketAddr) -> String {
    format!("{}:{}", addr.ip(), addr.port())
}

/// A trusted upstream's header (either version, TLVs and all) stands for the client: in
/// our own header to the backend and in the access log, with the real peer as `via`.
#[tokio::test(flavor = "multi_thread")]
async fn a_trusted_upstreams_header_stands_for_the_client() {
    let (backend, _) = proxy_header::backend("127.0.0.1:0").await;
    let mut amb = Ambassador::on_loopback(&[
        "--accept-proxy-protocol",
        "10.0.0.0/8,127.0.0.0/8",
        "--proxy-protocol",
        "v2",
        &backend.addr.to_string(),
    ]);
    let v1 = b"PROXY TCP4 203.0.113.7 198.51.100.9 4000 5432\r\nfirst bytes\n".to_vec();
    let (local, line, s) = first_line_from(amb.addr, &v1).await;
    assert_eq!(line, "SRC 203.0.113.7:4000 DST 198.51.100.9:5432 v2");
    assert_eq!(finish(s, "more\n").await, "first bytes\nmore\n");
    let logged = amb.wait_for_log("connection closed");
    assert_eq!(
        field(&logged, "client").as_deref(),
        Some("203.0.113.7:4000"),
        "{logged}"
    );
    assert_eq!(field(&logged, "via"), Some(local.to_string()), "{logged}");
    // 12 bytes of client data after the header, counted as sent.
    assert_eq!(field(&logged, "sent").as_deref(), Some("17"), "{logged}");

    // v2, IPv6 addresses and a TLV after them, the header split over two writes.
    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n\x21\x21\x00\x29".to_vec();
    v2.extend_from_slice(
        &"2001:db8::7"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    v2.extend_from_slice(
        &"2001:db8::9"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    v2.extend_from_slice(&[0x1f, 0x90, 0x00, 0x50]); // 8080, 80
    v2.extend_from_slice(&[0x04, 0x00, 0x02, 0xab, 0xcd]); // PP2_TYPE_NOOP
    let s = TcpStream::connect(amb.addr).await.unwrap();
    let mut s = BufReader::new(s);
    s.get_mut().write_all(&v2[..20]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.get_mut().write_all(&v2[20..]).await.unwrap();
    let mut line = String::new();
    s.read_line(&mut line).await.unwrap();
    assert_eq!(
        line.trim_end(),
        "SRC [2001:db8::7]:8080 DST [2001:db8::9]:80 v2"
    );
    assert_eq!(finish(s, "after v2\n").await, "after v2\n");

    // LOCAL (the upstream's own health check): the connection stands for itself.
    let local_cmd = b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00".to_vec();
    let (local, line, _s) = first_line_from(amb.addr, &local_cmd).await;
    assert_eq!(line, format!("SRC {local} DST {} v2", amb.addr));
}

/// From a source outside `--accept-proxy-protocol`, a header is the client's data and
/// passes through untouched; the backend's header names the real client.
#[tokio::test(flavor = "multi_thread")]
async fn an_untrusted_sources_header_is_forwarded_as_data() {
    let (backend, _) = proxy_header::backend("127.0.0.1:0").await;
    let amb = Ambassador::on_loopback(&[
        "--accept-proxy-protocol",
        "10.0.0.0/8",
        "--proxy-protocol",
        "v1",
        &backend.addr.to_string(),
    ]);
    let forged = "PROXY TCP4 203.0.113.7 198.51.100.9 4000 5432\r\n";
    let (local, line, s) = first_line_from(amb.addr, forged.as_bytes()).await;
    assert_eq!(line, format!("SRC {local} DST {} v1", amb.addr));
    assert_eq!(finish(s, "").await, forged);
}

/// From a trusted source, a missing or malformed header closes the connection with one
/// log line naming why, before any backend is reached; one that never completes is cut
/// by the 3 s deadline. Each is counted as refused for `proxy_header`.
#[tokio::test(flavor = "multi_thread")]
async fn a_trusted_source_without_a_valid_header_is_closed() {
    let (backend, seen) = proxy_header::backend("127.0.0.1:0").await;
    let mut amb = Ambassador::on_loopback(&[
        "--accept-proxy-protocol",
        "127.0.0.1",
        "--admin",
        "127.0.0.1:0",
        &backend.addr.to_string(),
    ]);
    let admin = amb.admin_addr();
    for (bytes, why) in [
        (
            &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            "does not start with a PROXY protocol header",
        ),
        (
            &b"PROXY TCP4 1.2.3.4 nonsense 1 2\r\n"[..],
            "v1 header 'PROXY TCP4 1.2.3.4 nonsense 1 2' is malformed",
        ),
        (
            &b"\r\n\r\n\0\r\nQUIT\n\x21\x12\x00\x0c\0\0\0\0\0\0\0\0\0\0\0\0"[..],
            "transport 2, not TCP",
        ),
    ] {
        let mut s = TcpStream::connect(amb.addr).await.unwrap();
        s.write_all(bytes).await.unwrap();
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(DEADLINE, s.read_to_end(&mut rest))
            .await
            .expect("the connection is closed");
        assert!(rest.is_empty(), "{rest:?}");
        let line = amb.wait_for_log(why);
        assert!(line.contains("connection refused"), "{line}");
        assert_eq!(field(&line, "close").as_deref(), Some("refused"), "{line}");
    }
    // A header that never completes: cut after 3 s, not before.
    let mut s = TcpStream::connect(amb.addr).await.unwrap();
    s.write_all(b"PROXY TCP4 1.2.3.4").await.unwrap();
    let started = Instant::now();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, s.read_to_end(&mut rest))
        .await
        .expect("a slow header is cut");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(2500), "cut after {took:?}");
    let line = amb.wait_for_log("none complete within 3s");
    assert!(line.contains("(18 bytes)"), "{line}");
    assert!(
        seen.lock().unwrap().is_empty(),
        "the backend was reached: {seen:?}"
    );
    assert_eq!(admin::refused(admin, amb.addr, "proxy_header"), 4.0);
}

/// With `--max-connections 10`, of 50 clients at once exactly 10 are served and 40 are
/// refused at once (logged and counted); once the 10 close, new ones are served.
#[tokio::test(flavor = "multi_thread")]
async fn max_connections_serves_exactly_the_limit() {
    let echo = tagged_echo("echo").await;
    let mut amb = Ambassador::on_loopback(&[
        "--max-connections",
        "10",
        "--admin",
        "127.0.0.1:0",
        &echo.addr.to_string(),
    ]);
    let admin = amb.admin_addr();
    let attempts = (0..50).map(|_| async {
        tokio::time::timeout(DEADLINE, attach(amb.addr))
            .await
            .expect("a client is answered or closed at once")
    });
    let results = futures_util::future::join_all(attempts).await;
    let mut served = Vec::new();
    let mut refused = 0;
    for r in results {
        match r {
            Ok((greeting, s)) if greeting == "echo" => served.push(s),
            _ => refused += 1,
        }
    }
    assert_eq!(served.len(), 10);
    assert_eq!(refused, 40);
    assert_eq!(admin::refused(admin, amb.addr, "max_connections"), 40.0);
    wait_until(
        DEADLINE,
        || (amb.count_log("limit of 10 connections") == 40).then_some(()),
        || format!("40 refusals logged: {:#?}", amb.log()),
    );
    let line = amb.wait_for_log("limit of 10 connections");
    assert_eq!(field(&line, "route"), Some(echo.addr.to_string()), "{line}");
    assert_eq!(field(&line, "close").as_deref(), Some("refused"), "{line}");
    // The ten still work, and while they are open an eleventh is still refused.
    for s in &mut served {
        s.get_mut().write_all(b"ping\n").await.unwrap();
        let mut line = String::new();
        s.read_line(&mut line).await.unwrap();
        assert_eq!(line, "ping\n");
    }
    assert!(greeting(amb.addr).await.is_none());
    drop(served);
    eventually("new clients are served once the ten closed", || async {
        let attached = futures_util::future::join_all((0..10).map(|_| attach(amb.addr))).await;
        let ok = attached
            .into_iter()
            .filter(|r| matches!(r, Ok((g, _)) if g == "echo"))
            .count();
        (ok == 10).then_some(())
    })
    .await;
}

/// A reload that changes only a route's options applies them to new connections and
/// keeps its source (no "route changed" switch), and open connections keep theirs.
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_changes_route_options() {
    let (backend, _) = proxy_header::backend("127.0.0.1:0").await;
    let dir = std::env::temp_dir().join(format!("ambassadord-options-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("a.toml");
    // A fixed port: a reload knows a route by its listen address, and port 0 is a new
    // one each time.
    let port = free_port();
    let write = |pp: &str| {
        std::fs::write(
            &cfg,
            format!(
                "[[route]]\nlisten = \"127.0.0.1:{port}\"\nbackend = \"{}\"\nproxy_protocol = \"{pp}\"\n",
                backend.addr
            ),
        )
        .unwrap()
    };
    write("v1");
    let mut amb = Ambassador::start(&["--config", cfg.to_str().unwrap()]);
    let (_, line, open) = first_line_from(amb.addr, b"x").await;
    assert!(line.ends_with(" v1"), "{line}");
    write("v2");
    amb.signal("HUP");
    amb.wait_for_log("route options changed");
    let (_, line, _) = first_line_from(amb.addr, b"x").await;
    assert!(line.ends_with(" v2"), "{line}");
    assert_eq!(amb.count_log("route changed"), 0);
    assert_eq!(finish(open, "still open\n").await, "xstill open\n");
    let _ = std::fs::remove_dir_all(&dir);
}
