//! Standard mode with static backends, through the real binary on loopback.

use std::collections::HashSet;
use std::net::{SocketAddr, TcpStream as StdTcpStream};
use std::time::Duration;

use crate::support::*;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// 8 MB each way through the proxy arrive intact, and the backend's reply that follows
/// the client's EOF still arrives (half-close is passed on, not turned into a close).
#[tokio::test(flavor = "multi_thread")]
async fn eight_megabytes_each_way_with_half_close_arrive_intact() {
    let backend = integrity_backend().await;
    let amb = Ambassador::on_loopback(&[&backend.addr.to_string()]);
    integrity_exchange(amb.addr, 1, 8 << 20).await;
}

/// 200 connections at once (in the default copy mode, auto), each with its own data,
/// all checked, and counted exactly in the access log.
#[tokio::test(flavor = "multi_thread")]
async fn two_hundred_concurrent_connections_each_intact() {
    let backend = integrity_backend().await;
    let mut amb = Ambassador::on_loopback(&[&backend.addr.to_string()]);
    let moved = concurrent_exchanges(amb.addr, 200, 1000, 64 * 1024).await;
    // The proxy counted every one of them, to the byte.
    assert_eq!(amb.closed_totals(200), moved);
}

/// The per-connection log line names client, backend, byte counts, duration and close.
#[tokio::test(flavor = "multi_thread")]
async fn one_log_line_per_connection_with_bytes_and_close_reason() {
    let backend = integrity_backend().await;
    let mut amb = Ambassador::on_loopback(&[&backend.addr.to_string()]);
    integrity_exchange(amb.addr, 7, 1000).await;
    let line = amb.wait_for_log("connection closed");
    assert_eq!(field(&line, "sent").as_deref(), Some("1016"), "{line}");
    assert_eq!(field(&line, "received").as_deref(), Some("1032"), "{line}");
    assert_eq!(
        field(&line, "backend").as_deref(),
        Some(backend.addr.to_string().as_str()),
        "{line}"
    );
    assert!(
        field(&line, "client").is_some_and(|c| c.starts_with("127.0.0.1:")),
        "{line}"
    );
    assert!(field(&line, "duration_ms").is_some(), "{line}");
    let close = field(&line, "close").unwrap_or_default();
    assert!(
        close == "backend_closed" || close == "client_closed",
        "{line}"
    );
    assert_eq!(amb.count_log("connection closed"), 1);
}

/// Both backends serve; after one dies every later connection still succeeds.
#[tokio::test(flavor = "multi_thread")]
async fn both_backends_serve_and_a_dead_one_is_skipped() {
    let a = named_backend("127.0.0.1:0", "a").await;
    let b = named_backend("127.0.0.1:0", "b").await;
    let spec = format!("{},{}", a.addr, b.addr);
    let amb = Ambassador::on_loopback(&[&spec]);

    let mut seen = HashSet::new();
    for _ in 0..10 {
        seen.insert(read_reply(amb.addr).await.unwrap());
    }
    assert_eq!(seen, HashSet::from(["a\n".to_string(), "b\n".to_string()]));

    b.kill();
    eventually("b's port refuses", || async {
        StdTcpStream::connect(b_addr(&spec)).is_err().then_some(())
    })
    .await;
    for i in 0..20 {
        let reply = read_reply(amb.addr)
            .await
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        assert_eq!(reply, "a\n", "connection {i}");
    }
}

fn b_addr(spec: &str) -> SocketAddr {
    spec.split(',').nth(1).unwrap().parse().unwrap()
}

/// A listener whose accept queue is full: the kernel drops further SYNs, so a connect
/// to it hangs like one to a black-holed host. Keeps its queued connections open.
struct BlackHole {
    addr: SocketAddr,
    _listener: socket2::Socket,
    _queued: Vec<StdTcpStream>,
}

fn black_hole() -> BlackHole {
    use socket2::{Domain, Socket, Type};
    let listener = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    listener
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    listener.listen(0).unwrap();
    let addr = listener.local_addr().unwrap().as_socket().unwrap();
    let mut queued = Vec::new();
    for _ in 0..16 {
        match StdTcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            Ok(s) => queued.push(s),
            Err(_) => {
                return BlackHole {
                    addr,
                    _listener: listener,
                    _queued: queued,
                };
            }
        }
    }
    panic!("could not fill the accept queue of {addr}");
}

/// A backend that never answers the SYN costs one connect timeout, then the next backend
/// serves the connection.
#[tokio::test(flavor = "multi_thread")]
async fn connect_timeout_moves_on_to_the_next_backend() {
    let hole = black_hole();
    let good = named_backend("127.0.0.1:0", "good").await;
    let spec = format!("{},{}", hole.addr, good.addr);
    let mut amb =
        Ambassador::on_loopback(&["--connect-timeout", "300ms", "--log-level", "debug", &spec]);
    for i in 0..4 {
        let reply = read_reply(amb.addr)
            .await
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        assert_eq!(reply, "good\n", "connection {i}");
    }
    let line = amb.wait_for_log("connect timed out");
    assert!(line.contains(&hole.addr.to_string()), "{line}");
}

/// Every backend down: the client is closed, and the log says why naming each backend.
#[tokio::test(flavor = "multi_thread")]
async fn all_backends_down_closes_the_client_with_a_reason() {
    let dead = named_backend("127.0.0.1:0", "x").await;
    let addr = dead.addr;
    dead.kill();
    eventually("port refuses", || async {
        StdTcpStream::connect(addr).is_err().then_some(())
    })
    .await;
    let mut amb = Ambassador::on_loopback(&[&addr.to_string()]);
    let mut s = TcpStream::connect(amb.addr).await.unwrap();
    let mut buf = Vec::new();
    let n = s.read_to_end(&mut buf).await.unwrap_or(0);
    assert_eq!(n, 0);
    let line = amb.wait_for_log("connection refused");
    assert!(
        line.contains("every backend failed") && line.contains(&addr.to_string()),
        "{line}"
    );
}

/// A host-name backend is resolved (here from /etc/hosts).
#[tokio::test(flavor = "multi_thread")]
async fn host_name_backend_localhost() {
    let backend = named_backend("127.0.0.1:0", "by-name").await;
    let spec = format!("localhost:{}", backend.addr.port());
    let amb = Ambassador::on_loopback(&[&spec]);
    for _ in 0..3 {
        assert_eq!(read_reply(amb.addr).await.unwrap(), "by-name\n");
    }
}

/// IPv6 loopback both as the listen address and as a bracketed backend.
#[tokio::test(flavor = "multi_thread")]
async fn ipv6_loopback() {
    let backend = named_backend("[::1]:0", "six").await;
    let spec = format!("[::1]:{}", backend.addr.port());
    let amb = Ambassador::start(&["--bind", "::1", "--port", "0", &spec]);
    assert!(amb.addr.is_ipv6());
    assert_eq!(read_reply(amb.addr).await.unwrap(), "six\n");
}

/// With no --bind, the listener takes IPv4 and IPv6 alike; with no --port, the backend's.
#[tokio::test(flavor = "multi_thread")]
async fn default_bind_is_dual_stack_on_the_backends_port() {
    // The backend sits on 127.0.0.2 so the ambassador can take the same port number on
    // every address without clashing with it... except 127.0.0.2 is one of those
    // addresses, so use an ephemeral port number that is free on the wildcard instead.
    let probe = std::net::TcpListener::bind("[::]:0").unwrap();
    let port = probe.local_addr().unwrap().port();
    drop(probe);
    let backend = named_backend("127.0.0.1:0", "dual").await;
    let amb = Ambassador::start(&["--port", &port.to_string(), &backend.addr.to_string()]);
    assert_eq!(amb.addr.port(), port);
    let v4: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let v6: SocketAddr = format!("[::1]:{port}").parse().unwrap();
    assert_eq!(read_reply(v4).await.unwrap(), "dual\n");
    assert_eq!(read_reply(v6).await.unwrap(), "dual\n");

    // Without --port it listens on the (first) backend's own port.
    let listener = tokio::net::TcpListener::bind("127.0.0.3:0").await.unwrap();
    let backend_port = listener.local_addr().unwrap().port();
    drop(listener);
    let amb = Ambassador::start(&["--bind", "127.0.0.1", &format!("127.0.0.3:{backend_port}")]);
    assert_eq!(amb.addr.port(), backend_port);
}

/// With --idle-timeout, a silent connection is closed and the log says so.
#[tokio::test(flavor = "multi_thread")]
async fn idle_timeout_closes_a_silent_connection() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _server = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(60)).await;
        drop(s);
    });
    let mut amb = Ambassador::on_loopback(&["--idle-timeout", "300ms", &addr.to_string()]);
    let mut c = TcpStream::connect(amb.addr).await.unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(DEADLINE, c.read_to_end(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
    let line = amb.wait_for_log("connection closed");
    assert_eq!(
        field(&line, "close").as_deref(),
        Some("idle_timeout"),
        "{line}"
    );
}

/// The access log has its own target: `ambassadord::access=off` silences the
/// per-connection lines and nothing else (start-up and shutdown are still logged).
#[tokio::test(flavor = "multi_thread")]
async fn the_access_log_can_be_silenced_alone() {
    let backend = named_backend("127.0.0.1:0", "b").await;
    let mut amb = Ambassador::on_loopback(&[
        "--log-level",
        "info,ambassadord::access=off",
        &backend.addr.to_string(),
    ]);
    assert_eq!(served_by(amb.addr).await.as_deref(), Some("b"));
    amb.signal("TERM");
    assert!(amb.wait_exit().success());
    amb.wait_for_log("stopped");
    assert_eq!(amb.count_log("connection closed"), 0, "{:#?}", amb.log());
    assert!(amb.count_log("listening") >= 1, "{:#?}", amb.log());
}

/// A name with its port forgotten is taken as an SRV name, and the log says so at start,
/// with the fix.
#[tokio::test(flavor = "multi_thread")]
async fn a_bare_name_is_said_to_be_an_srv_lookup() {
    let mut amb = Ambassador::on_loopback(&["--dns", "127.0.0.1:1", "redis"]);
    let line = amb.wait_for_log("has no port");
    assert!(
        line.contains(
            "'redis' has no port: looking up SRV records for it; write redis:PORT for a host"
        ),
        "{line}"
    );
}

/// A backend that stops answering is logged DOWN once (however many connections then
/// go to the others), shown `cooling_down` and then `failing` in /routes, never `up`,
/// until a connect to it succeeds again: then it is logged UP and shown up.
#[tokio::test(flavor = "multi_thread")]
async fn a_dead_backend_is_logged_down_once_and_up_when_it_answers_again() {
    let alive = named_backend("127.0.0.1:0", "alive").await;
    let dying = named_backend("127.0.0.1:0", "dying").await;
    let dying_addr = dying.addr;
    let spec = format!("{dying_addr},{}", alive.addr);
    let mut amb = Ambassador::on_loopback(&["--admin", "127.0.0.1:0", &spec]);
    let admin_addr = amb.admin_addr();
    wait_serving(amb.addr, &["alive", "dying"]).await;
    dying.kill();
    for _ in 0..10 {
        assert_eq!(served_by(amb.addr).await.as_deref(), Some("alive"));
    }
    let down = amb.wait_for_log("backend DOWN");
    assert!(down.contains(&format!("backend={dying_addr}")), "{down}");
    assert_eq!(amb.count_log("backend DOWN"), 1, "{:#?}", amb.log());
    let state = || {
        let routes: serde_json::Value =
            serde_json::from_str(&admin::get_ok(admin_addr, "/routes")).unwrap();
        routes["routes"][0]["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["addr"] == dying_addr.to_string())
            .map(|e| e["state"].as_str().unwrap_or_default().to_string())
            .unwrap_or_default()
    };
    assert_eq!(state(), "cooling_down");
    // Past the 5 s cool-down, with no connection trying it yet: failing, not up.
    eventually_within(Duration::from_secs(10), "the cool-down to end", || async {
        (state() == "failing").then_some(())
    })
    .await;
    // It answers again on its address: the next trial connects, and it is up.
    let again = named_backend(&dying_addr.to_string(), "dying").await;
    until_served_by(amb.addr, "dying").await;
    let up = amb.wait_for_log("backend UP again");
    assert!(up.contains(&format!("backend={dying_addr}")), "{up}");
    assert_eq!(state(), "up");
    drop(again);
}
