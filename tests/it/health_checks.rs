//! Active health checks (`--check tcp`) against real backends on loopback: a backend
//! that stops is taken out of rotation after `fall` checks, before any client pays for
//! it, and returns after `rise`; a check with `send`/`expect` judges the reply; routes
//! that share a backend share its check; `/routes` and `/metrics` say what the checks
//! found.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::support::*;

/// Three backends, checks every 200 ms with fall 3 and rise 2. One stops: within a
/// few intervals it is down by check (one log line, /routes says down and why,
/// `backend_up` 0), and from then on no client connection is sent to it: its connect
/// failures stay where they were over 60 connections, all served by the other two.
/// It starts again: after `rise` passing checks it is up and serves again.
#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_backend_is_taken_out_by_its_checks_and_returns_after_rise() {
    let a = named_backend("127.0.0.1:0", "a").await;
    let b = named_backend("127.0.0.1:0", "b").await;
    let c = named_backend("127.0.0.1:0", "c").await;
    let c_addr = c.addr;
    let spec = format!("{},{},{c_addr}", a.addr, b.addr);
    let mut amb = Ambassador::on_loopback(&[
        "--check",
        "tcp",
        "--check-interval",
        "200ms",
        "--check-fall",
        "3",
        "--check-rise",
        "2",
        "--admin",
        "127.0.0.1:0",
        &spec,
    ]);
    let admin_addr = amb.admin_addr();
    let proxy = amb.addr;
    until_served_by(proxy, "c").await;
    let up = format!("ambassadord_backend_up{{route=\"{proxy}\",backend=\"{c_addr}\"}}");
    assert_eq!(admin::metric(admin_addr, &up), 1.0);

    c.kill();
    let stopped = tokio::time::Instant::now();
    let line = amb.wait_for_log("backend DOWN by check");
    assert!(
        line.contains(&c_addr.to_string()) && line.contains("3 checks in a row failed"),
        "{line}"
    );
    // Three failed checks at 200 ms ±10%, and the first may come up to an interval late.
    assert!(
        stopped.elapsed() < Duration::from_secs(3),
        "{:?}",
        stopped.elapsed()
    );
    let state = admin::endpoint(admin_addr, &c_addr.to_string());
    assert_eq!(state["state"], "down", "{state}");
    assert!(
        state["check_error"]
            .as_str()
            .unwrap_or("")
            .contains("connect"),
        "{state}"
    );
    assert_eq!(admin::metric(admin_addr, &up), 0.0);

    let failures = |reason: &str| {
        admin::metric(
            admin_addr,
            &format!(
                "ambassadord_connect_failures_total{{route=\"{proxy}\",backend=\"{c_addr}\",reason=\"{reason}\"}}"
            ),
        )
    };
    let before = failures("refused");
    let mut served = std::collections::BTreeMap::new();
    for _ in 0..60 {
        let who = served_by(proxy).await.expect("every client is served");
        *served.entry(who).or_insert(0) += 1;
    }
    assert_eq!(
        failures("refused"),
        before,
        "a client connection was sent to the down backend"
    );
    assert_eq!(served.keys().collect::<Vec<_>>(), ["a", "b"], "{served:?}");

    let _c = named_backend(&c_addr.to_string(), "c").await;
    let line = amb.wait_for_log("backend UP by check");
    assert!(line.contains("2 checks in a row passed"), "{line}");
    until_served_by(proxy, "c").await;
    assert_eq!(admin::metric(admin_addr, &up), 1.0);
    let passed = admin::metric(
        admin_addr,
        &format!("ambassadord_backend_checks_total{{backend=\"{c_addr}\",result=\"passed\"}}"),
    );
    let failed = admin::metric(
        admin_addr,
        &format!("ambassadord_backend_checks_total{{backend=\"{c_addr}\",result=\"failed\"}}"),
    );
    // At least `rise` passed since the restart and `fall` failed before it (the kill may
    // have come before its first check).
    assert!(
        passed >= 2.0 && failed >= 3.0,
        "passed {passed}, failed {failed}"
    );
}

/// A Redis-like backend that answers `+PONG` to `PING` only while `healthy` is set
/// (and accepts connections either way, as a wedged server does).
async fn pinged(
    healthy: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let healthy = healthy.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let ok = healthy.load(std::sync::atomic::Ordering::SeqCst);
                let reply: &[u8] = match (&buf[..n], ok) {
                    (b"PING\r\n", true) => b"+PONG\r\n",
                    (b"PING\r\n", false) => b"-LOADING Redis is loading the dataset in memory\r\n",
                    _ => b"-ERR unknown command\r\n",
                };
                let _ = s.write_all(reply).await;
            });
        }
    });
    (addr, task)
}

/// `--check-send 'PING\r\n' --check-expect '+PONG'`: a backend that accepts but answers
/// an error is down by check (the reply is named), and up again once it answers PONG.
#[tokio::test(flavor = "multi_thread")]
async fn a_check_can_send_and_expect_a_reply() {
    let healthy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (addr, _task) = pinged(healthy.clone()).await;
    let mut amb = Ambassador::on_loopback(&[
        "--check",
        "tcp",
        "--check-interval",
        "100ms",
        "--check-fall",
        "2",
        "--check-rise",
        "1",
        "--check-send",
        "PING\\r\\n",
        "--check-expect",
        "+PONG",
        "--admin",
        "127.0.0.1:0",
        &addr.to_string(),
    ]);
    let admin_addr = amb.admin_addr();
    eventually("the backend to pass its check", || async {
        (admin::endpoint(admin_addr, &addr.to_string())["state"] == "up").then_some(())
    })
    .await;
    healthy.store(false, std::sync::atomic::Ordering::SeqCst);
    let line = amb.wait_for_log("backend DOWN by check");
    assert!(line.contains("LOADING"), "{line}");
    assert!(
        admin::endpoint(admin_addr, &addr.to_string())["check_error"]
            .as_str()
            .unwrap()
            .contains("+PONG")
    );
    healthy.store(true, std::sync::atomic::Ordering::SeqCst);
    amb.wait_for_log("backend UP by check");
}

/// Two routes (from a `--config` file, checks on for both in the file) sharing one
/// backend share its check: over 2 s at 100 ms, about 20 checks, not 40. A third route
/// that turns checks off for itself shows its backend `up` without one.
#[tokio::test(flavor = "multi_thread")]
async fn routes_that_share_a_backend_share_its_check() {
    let shared = named_backend("127.0.0.1:0", "shared").await;
    let other = named_backend("127.0.0.1:0", "other").await;
    let dir = std::env::temp_dir().join(format!("ambassadord-checks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("shared.toml");
    std::fs::write(
        &file,
        format!(
            "check = \"tcp\"\ncheck_interval = \"100ms\"\n\
             [[route]]\nlisten = \"127.0.0.1:0\"\nbackend = \"{0}\"\n\
             [[route]]\nlisten = \"127.0.0.1:0\"\nbackend = \"{0}\"\n\
             [[route]]\nlisten = \"127.0.0.1:0\"\nbackend = \"{1}\"\ncheck = \"off\"\n",
            shared.addr, other.addr
        ),
    )
    .unwrap();
    let mut amb =
        Ambassador::start(&["--admin", "127.0.0.1:0", "--config", file.to_str().unwrap()]);
    let admin_addr = amb.admin_addr();
    let checks = || {
        admin::metric(
            admin_addr,
            &format!(
                "ambassadord_backend_checks_total{{backend=\"{}\",result=\"passed\"}}",
                shared.addr
            ),
        )
    };
    eventually("a first check", || async {
        (checks() >= 1.0).then_some(())
    })
    .await;
    let start = checks();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = checks() - start;
    // One probe: about 20 (a loaded machine's timers may run late, so fewer); two
    // would make about 40.
    assert!(
        (5.0..=28.0).contains(&during),
        "{during} checks in 2 s at 100 ms for two routes"
    );
    assert_eq!(
        admin::endpoint(admin_addr, &other.addr.to_string())["state"],
        "up"
    );
    let other_checks = admin::metric(
        admin_addr,
        &format!(
            "ambassadord_backend_checks_total{{backend=\"{}\",result=\"passed\"}}",
            other.addr
        ),
    );
    assert_eq!(
        other_checks, 0.0,
        "the route with check = \"off\" was checked"
    );
}
