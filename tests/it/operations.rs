//! Operations through the real binary: the admin endpoint's metrics after known traffic,
//! readiness following discovery, the status page in a real headless Chromium, the
//! access log for refused connections, and `--config` files reloaded on SIGHUP.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::etcd::{Etcd, free_port};
use crate::support::netns::Netns;
use crate::support::{
    Ambassador, admin, attach, eventually, field, finish, greeting, integrity_exchange,
    run_to_exit, tagged_echo,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The address the route forwarding to `backend` listens on, from its log line.
fn listen_of(amb: &Ambassador, backend: &str) -> SocketAddr {
    let needle = format!("backend={backend} ");
    amb.log()
        .iter()
        .find(|l| l.contains(" listening ") && l.contains(&needle))
        .and_then(|l| field(l, "listen"))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no listening line for {backend}: {:#?}", amb.log()))
}

fn temp_file(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ambassadord-ops-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

/// After three known transfers and one refused connection, the counters are exact:
/// accepted, finished, bytes each way (16+len up and len+32 down per integrity
/// exchange), no connection left active, one refused connect to the dead backend and
/// one no-backend failure; the refused connection gets an access log line of the same
/// shape with close=refused.
#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_known_connections_and_bytes() {
    let backend = crate::support::integrity_backend().await;
    let dead = format!("127.0.0.1:{}", free_port());
    let (mut amb, admin) =
        start_with_routes("metrics.toml", &[backend.addr.to_string(), dead.clone()]);
    let good = listen_of(&amb, &backend.addr.to_string());
    let bad = listen_of(&amb, &dead);

    for seed in 1..=3 {
        integrity_exchange(good, seed, 1000).await;
    }
    let mut refused = TcpStream::connect(bad).await.unwrap();
    let mut nothing = Vec::new();
    let _ = refused.read_to_end(&mut nothing).await;
    assert!(nothing.is_empty());

    let (r, b) = (good.to_string(), backend.addr.to_string());
    let text = eventually("three finished connections in /metrics", || async {
        let (status, text) = admin::get(admin, "/metrics")?;
        assert_eq!(status, 200);
        let finished = admin::sum(
            &text,
            &format!("ambassadord_connections_finished_total{{route=\"{r}\",backend=\"{b}\""),
        );
        let failed = admin::sample(
            &text,
            &format!("ambassadord_connect_failures_total{{route=\"{bad}\",backend=\"{dead}\",reason=\"refused\"}}"),
        );
        (finished == 3.0 && failed == Some(1.0)).then_some(text)
    })
    .await;
    let at = |series: String| {
        admin::sample(&text, &series).unwrap_or_else(|| panic!("no {series} in\n{text}"))
    };
    let labels = format!("{{route=\"{r}\",backend=\"{b}\"}}");
    assert_eq!(
        at(format!(
            "ambassadord_connections_accepted_total{{route=\"{r}\"}}"
        )),
        3.0
    );
    assert_eq!(
        at(format!("ambassadord_sent_bytes_total{labels}")),
        3.0 * 1016.0
    );
    assert_eq!(
        at(format!("ambassadord_received_bytes_total{labels}")),
        3.0 * 1032.0
    );
    assert_eq!(at(format!("ambassadord_connections_active{labels}")), 0.0);
    assert_eq!(
        at(format!(
            "ambassadord_connections_accepted_total{{route=\"{bad}\"}}"
        )),
        1.0
    );
    assert_eq!(
        at(format!("ambassadord_discovery_endpoints{{source=\"{b}\"}}")),
        1.0
    );
    assert!(text.contains("ambassadord_discovery_seconds_since_good_update{"));

    let line = amb.wait_for_log("close=refused");
    assert_eq!(field(&line, "backend").as_deref(), Some("-"), "{line}");
    assert_eq!(field(&line, "sent").as_deref(), Some("0"), "{line}");
    assert!(
        line.contains("connection refused") || line.contains(&dead),
        "{line}"
    );
    let closed: Vec<String> = amb
        .log()
        .into_iter()
        .filter(|l| l.contains("connection closed") && l.contains("close=client_closed"))
        .collect();
    assert_eq!(closed.len(), 3, "{closed:#?}");
    for l in &closed {
        assert_eq!(field(l, "sent").as_deref(), Some("1016"), "{l}");
        assert_eq!(field(l, "received").as_deref(), Some("1032"), "{l}");
        assert!(field(l, "duration_ms").is_some(), "{l}");
    }

    let (status, json) = admin::get(admin, "/routes").unwrap();
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    let route = json["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["listen"] == r.as_str())
        .unwrap_or_else(|| panic!("{json}"));
    assert_eq!(route["accepted"], 3);
    assert_eq!(route["open_connections"], 0);
    assert_eq!(route["endpoints"][0]["addr"], b.as_str());
    assert_eq!(route["endpoints"][0]["state"], "up");
    let dead_route = json["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["listen"] == bad.to_string().as_str())
        .unwrap();
    assert_eq!(dead_route["endpoints"][0]["state"], "cooling_down");
}

/// Bytes are counted as they move, not when the connection closes: while a connection
/// is still open, /metrics and /routes already show what it carried each way (5,000
/// bytes up; the 2-byte greeting and the 5,000-byte echo down).
#[tokio::test(flavor = "multi_thread")]
async fn byte_counts_grow_while_a_connection_is_open() {
    let backend = tagged_echo("a").await;
    let mut amb = Ambassador::on_loopback(&["--admin", "127.0.0.1:0", &backend.addr.to_string()]);
    let admin = amb.admin_addr();
    let (name, mut s) = attach(amb.addr).await.unwrap();
    assert_eq!(name, "a");
    let payload = vec![b'x'; 5000];
    s.get_mut().write_all(&payload).await.unwrap();
    let mut echoed = vec![0; payload.len()];
    s.read_exact(&mut echoed).await.unwrap();
    assert_eq!(echoed, payload);

    let (r, b) = (amb.addr.to_string(), backend.addr.to_string());
    let labels = format!("{{route=\"{r}\",backend=\"{b}\"}}");
    eventually("the open connection's bytes in /metrics", || async {
        let (_, text) = admin::get(admin, "/metrics")?;
        let sent = admin::sample(&text, &format!("ambassadord_sent_bytes_total{labels}"));
        let received = admin::sample(&text, &format!("ambassadord_received_bytes_total{labels}"));
        let active = admin::sample(&text, &format!("ambassadord_connections_active{labels}"));
        (sent == Some(5000.0) && received == Some(5002.0) && active == Some(1.0)).then_some(())
    })
    .await;
    let (_, json) = admin::get(admin, "/routes").unwrap();
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    let route = &json["routes"][0];
    assert_eq!(route["open_connections"], 1, "{json}");
    assert_eq!(route["sent_bytes"], 5000, "{json}");
    assert_eq!(route["received_bytes"], 5002, "{json}");
    drop(s);
}

/// /readyz answers 503 while an etcd route has no first result (the store is not up
/// yet) and 200 once it has; it then stays 200 after the store goes away again.
/// /healthz answers 200 throughout.
#[tokio::test(flavor = "multi_thread")]
async fn readiness_flips_after_the_first_discovery_result() {
    let port = free_port();
    let backend = tagged_echo("a").await;
    let spec = format!("etcd://127.0.0.1:{port}/svc/n");
    let mut amb = Ambassador::on_loopback(&["--admin", "127.0.0.1:0", &spec]);
    let admin = amb.admin_addr();
    amb.wait_for_log("discovery failed");
    let (status, body) = admin::get(admin, "/readyz").unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("waiting for discovery"), "{body}");
    assert_eq!(admin::get(admin, "/healthz").unwrap().0, 200);
    let (_, metrics) = admin::get(admin, "/metrics").unwrap();
    assert!(
        admin::sample(
            &metrics,
            &format!("ambassadord_discovery_errors_total{{source=\"{spec}\"}}")
        )
        .is_some_and(|n| n >= 1.0),
        "{metrics}"
    );

    let mut etcd = Etcd::start_on(port).await;
    etcd.put("/svc/n/one", &backend.addr.to_string()).await;
    eventually("/readyz to answer 200", || async {
        (admin::get(admin, "/readyz")?.0 == 200).then_some(())
    })
    .await;
    // Ready may come from a first read that found the key not written yet (an empty
    // set is a result too); the backend follows.
    eventually("the etcd backend to be served", || async {
        (greeting(amb.addr).await.as_deref() == Some("a")).then_some(())
    })
    .await;

    etcd.stop();
    amb.wait_for_log("discovery failed; keeping the last good set");
    assert_eq!(admin::get(admin, "/readyz").unwrap().0, 200);
}

/// The status page loads in a real headless Chromium and shows the route, its backend
/// and its traffic; the test saves a screenshot (target/tmp/status-page.png).
#[tokio::test(flavor = "multi_thread")]
async fn status_page_shows_the_route_in_headless_chromium() {
    let a = crate::support::integrity_backend().await;
    let dead = format!("127.0.0.1:{}", free_port());
    let second_spec = format!("{dead},{}", a.addr);
    let (amb, admin) = start_with_routes("status.toml", &[a.addr.to_string(), second_spec]);
    let first = listen_of(&amb, &a.addr.to_string());
    for seed in 0..4 {
        integrity_exchange(first, seed, 200_000).await;
    }
    // The second route fails over from the dead backend: it shows as cooling down.
    let second = listen_of(&amb, &format!("{dead},{}", a.addr));
    integrity_exchange(second, 9, 1000).await;

    let url = format!("http://{admin}/");
    let dom = chromium(&["--dump-dom", &url]);
    assert!(dom.contains(&first.to_string()), "route missing:\n{dom}");
    assert!(dom.contains(&a.addr.to_string()), "backend missing:\n{dom}");
    assert!(
        dom.contains("cooling down"),
        "dead backend state missing:\n{dom}"
    );
    assert!(dom.contains("accepted"), "{dom}");

    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    chromium(&[
        &format!("--screenshot={}", shot.display()),
        "--window-size=1280,900",
        &url,
    ]);
    let png = std::fs::read(&shot).expect("chromium wrote no screenshot");
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    assert!(png.len() > 10_000, "suspiciously small screenshot");
}

/// Runs Debian's chromium headless against loopback and returns its stdout.
fn chromium(args: &[&str]) -> String {
    let profile = temp_file(&format!("chromium-{}", free_port()));
    let out = Command::new("timeout")
        .arg("120")
        .arg("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .output()
        .expect("run chromium (Debian package chromium; scripts/test installs it)");
    let _ = std::fs::remove_dir_all(&profile);
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Starts the binary with the admin endpoint on a free port and a `--config` file
/// (`name`) with one route per backend spec, each on a free loopback port; returns it
/// and the admin address.
fn start_with_routes(name: &str, backends: &[String]) -> (Ambassador, SocketAddr) {
    let file = temp_file(name);
    let routes: Vec<(u16, String)> = backends.iter().map(|b| (0, b.clone())).collect();
    write(&file, &routes_file(&routes));
    let mut amb =
        Ambassador::start(&["--admin", "127.0.0.1:0", "--config", file.to_str().unwrap()]);
    let admin = amb.admin_addr();
    (amb, admin)
}

fn routes_file(routes: &[(u16, String)]) -> String {
    let mut s = String::from("connect_timeout = \"2s\"\n");
    for (port, backend) in routes {
        s.push_str(&format!(
            "\n[[route]]\nlisten = \"127.0.0.1:{port}\"\nbackend = \"{backend}\"\n"
        ));
    }
    s
}

/// SIGHUP with a changed file: a route added starts listening, a route removed stops
/// accepting while its open connection drains, and a route whose backend changed sends
/// new connections to the new backend while a transfer opened before the reload stays
/// on its original backend and completes.
#[tokio::test(flavor = "multi_thread")]
async fn reload_adds_removes_and_changes_routes_under_open_transfers() {
    let (a, b, c) = (
        tagged_echo("a").await,
        tagged_echo("b").await,
        tagged_echo("c").await,
    );
    let (p1, p2, p3) = (free_port(), free_port(), free_port());
    let file = temp_file("reload.toml");
    write(
        &file,
        &routes_file(&[(p1, a.addr.to_string()), (p2, c.addr.to_string())]),
    );
    let mut amb =
        Ambassador::start(&["--admin", "127.0.0.1:0", "--config", file.to_str().unwrap()]);
    let admin = amb.admin_addr();
    let r1: SocketAddr = ([127, 0, 0, 1], p1).into();
    let r2: SocketAddr = ([127, 0, 0, 1], p2).into();
    let r3: SocketAddr = ([127, 0, 0, 1], p3).into();
    assert_eq!(greeting(r1).await.as_deref(), Some("a"));
    assert_eq!(greeting(r2).await.as_deref(), Some("c"));

    let (name, open_on_changed) = attach(r1).await.unwrap();
    assert_eq!(name, "a");
    let (name, open_on_removed) = attach(r2).await.unwrap();
    assert_eq!(name, "c");

    // Route 1 now goes to b, route 2 is gone, route 3 is new.
    write(
        &file,
        &routes_file(&[(p1, b.addr.to_string()), (p3, c.addr.to_string())]),
    );
    amb.signal("HUP");
    amb.wait_for_log("configuration reloaded");
    assert!(amb.count_log("route changed") == 1, "{:#?}", amb.log());

    assert_eq!(greeting(r1).await.as_deref(), Some("b"));
    assert_eq!(greeting(r3).await.as_deref(), Some("c"));
    eventually("the removed route to stop accepting", || async {
        TcpStream::connect(r2).await.is_err().then_some(())
    })
    .await;

    // Both transfers opened before the reload complete, on their original backends.
    assert_eq!(finish(open_on_changed, "still a\n").await, "still a\n");
    assert_eq!(finish(open_on_removed, "drained!\n").await, "drained!\n");
    // The replaced source's series are gone; the new one's are there.
    let gone = format!("ambassadord_discovery_endpoints{{source=\"{}\"}}", a.addr);
    let there = format!("ambassadord_discovery_endpoints{{source=\"{}\"}}", b.addr);
    eventually("the old source's series to go", || async {
        let (_, text) = admin::get(admin, "/metrics")?;
        (admin::sample(&text, &gone).is_none() && admin::sample(&text, &there) == Some(1.0))
            .then_some(())
    })
    .await;

    let line = amb.wait_for_log("sent=8 received=10");
    assert_eq!(field(&line, "backend"), Some(a.addr.to_string()), "{line}");
    assert_eq!(field(&line, "listen"), Some(r1.to_string()), "{line}");
    assert_eq!(
        field(&line, "close").as_deref(),
        Some("client_closed"),
        "{line}"
    );
}

/// A reload with an unknown key (or a backend that does not parse) is rejected with a
/// log line naming the key and file; the running routes keep serving and the new
/// route in the bad file is not started. The same file at startup exits 64.
#[tokio::test(flavor = "multi_thread")]
async fn bad_reload_is_rejected_and_nothing_changes() {
    let a = tagged_echo("a").await;
    let b = tagged_echo("b").await;
    let (p1, p2) = (free_port(), free_port());
    let file = temp_file("bad.toml");
    write(&file, &routes_file(&[(p1, a.addr.to_string())]));
    let mut amb = Ambassador::start(&["--admin", "off", "--config", file.to_str().unwrap()]);
    let r1: SocketAddr = ([127, 0, 0, 1], p1).into();
    let r2: SocketAddr = ([127, 0, 0, 1], p2).into();

    let mut bad = routes_file(&[(p1, b.addr.to_string()), (p2, b.addr.to_string())]);
    bad.push_str("listen_adress = \"oops\"\n");
    write(&file, &bad);
    amb.signal("HUP");
    let line = amb.wait_for_log("reload rejected");
    assert!(line.contains("listen_adress"), "{line}");
    assert!(line.contains(file.to_str().unwrap()), "{line}");

    write(
        &file,
        &routes_file(&[(p1, b.addr.to_string()), (p2, "b:notaport".into())]),
    );
    amb.signal("HUP");
    eventually("the second reload to be rejected", || async {
        (amb.count_log("reload rejected") == 2).then_some(())
    })
    .await;
    let second = amb
        .log()
        .into_iter()
        .filter(|l| l.contains("reload rejected"))
        .nth(1)
        .unwrap();
    assert!(
        second.contains("route 2") && second.contains("notaport"),
        "{second}"
    );

    assert_eq!(amb.count_log("configuration reloaded"), 0);
    assert_eq!(greeting(r1).await.as_deref(), Some("a"));
    assert!(
        TcpStream::connect(r2).await.is_err(),
        "route from a bad file started"
    );

    let (code, stderr) = run_to_exit(&["--config", file.to_str().unwrap()], &[]);
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("notaport"), "{stderr}");
    write(
        &file,
        "[[route]]\nlisten = \"127.0.0.1:0\"\nbakend = \"a:1\"\n",
    );
    let (code, stderr) = run_to_exit(&["--config", file.to_str().unwrap()], &[]);
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("bakend"), "{stderr}");
}

/// A reload that changes settings only a restart can apply says which, in one warning,
/// and applies the rest.
#[tokio::test(flavor = "multi_thread")]
async fn reload_names_the_settings_that_need_a_restart() {
    let a = tagged_echo("a").await;
    let p1 = free_port();
    let file = temp_file("restart-only.toml");
    write(&file, &routes_file(&[(p1, a.addr.to_string())]));
    let mut amb = Ambassador::start(&["--admin", "off", "--config", file.to_str().unwrap()]);
    let mut changed = String::from("threads = 3\nlog_level = \"debug\"\n");
    changed.push_str(&routes_file(&[(p1, a.addr.to_string())]));
    write(&file, &changed);
    amb.signal("HUP");
    let line = amb.wait_for_log("take effect only after a restart");
    assert!(line.contains("WARN"), "{line}");
    assert!(
        line.contains("threads") && line.contains("log_level"),
        "{line}"
    );
    assert!(!line.contains("dns") && !line.contains("admin"), "{line}");
    amb.wait_for_log("configuration reloaded");
}

/// `ambassadord healthcheck` exits 0 with `ready` when the admin endpoint says ready,
/// 1 with one line saying why while discovery has no first result or when nothing
/// answers, and 64 when it is told the admin endpoint is off.
#[tokio::test(flavor = "multi_thread")]
async fn healthcheck_follows_readiness() {
    let a = tagged_echo("a").await;
    let mut ready = Ambassador::on_loopback(&["--admin", "127.0.0.1:0", &a.addr.to_string()]);
    let admin_addr = ready.admin_addr().to_string();
    let (code, stderr) = run_to_exit(&["healthcheck", "--admin", &admin_addr], &[]);
    assert_eq!((code, stderr.as_str()), (0, ""));

    let unreachable = format!("etcd://127.0.0.1:{}/nodes", free_port());
    let mut waiting = Ambassador::on_loopback(&["--admin", "127.0.0.1:0", &unreachable]);
    let waiting_admin = waiting.admin_addr().to_string();
    let (code, stderr) = run_to_exit(&["healthcheck"], &[("AMBASSADORD_ADMIN", &waiting_admin)]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("not ready: waiting for discovery on"),
        "{stderr}"
    );
    assert!(stderr.contains("HTTP 503"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");

    let nobody = format!("127.0.0.1:{}", free_port());
    let (code, stderr) = run_to_exit(&["healthcheck", "--admin", &nobody], &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(&format!("cannot reach the admin endpoint at {nobody}")),
        "{stderr}"
    );

    let (code, stderr) = run_to_exit(&["healthcheck", "--admin", "off"], &[]);
    assert_eq!(code, 64, "{stderr}");
    assert!(
        stderr.contains("--admin 'off': the admin endpoint is off"),
        "{stderr}"
    );
}

/// SIGTERM while a reload waits for a changed route's new source (a store that never
/// answers, so the wait would last its full 5 s) is obeyed at once: the reload is
/// abandoned (it changed nothing yet), and the process drains and exits 0 without
/// finishing the reload first.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_a_reloads_switch_wait_exits_without_finishing_it() {
    let a = tagged_echo("a").await;
    let p1 = free_port();
    let file = temp_file("switch.toml");
    write(&file, &routes_file(&[(p1, a.addr.to_string())]));
    let mut amb = Ambassador::start(&[
        "--admin",
        "off",
        "--shutdown-grace",
        "1s",
        "--config",
        file.to_str().unwrap(),
    ]);
    let unreachable = format!("etcd://127.0.0.1:{}/nodes", free_port());
    write(&file, &routes_file(&[(p1, unreachable.clone())]));
    amb.signal("HUP");
    // The new source has started and failed its first read: the reload is waiting.
    let failed = amb.wait_for_log("discovery failed");
    assert!(failed.contains(&unreachable), "{failed}");
    amb.signal("TERM");
    let status = amb.wait_exit();
    assert!(status.success(), "{status}: {:#?}", amb.log());
    amb.wait_for_log("stopped");
    assert_eq!(amb.count_log("switching anyway"), 0, "{:#?}", amb.log());
    assert_eq!(
        amb.count_log("configuration reloaded"),
        0,
        "{:#?}",
        amb.log()
    );
}

/// With `--setup-iptables`' redirect installed in the ambassador's network namespace,
/// the admin endpoint on its default loopback address still answers from inside that
/// namespace: the redirect hooks prerouting, which connections made inside the
/// namespace never pass. (This is how the README tells users to reach it.)
#[tokio::test(flavor = "multi_thread")]
async fn admin_on_loopback_is_not_caught_by_the_redirect() {
    let ns = Netns::new();
    let setup = ns.ambassadord(&["--setup-iptables"]);
    assert!(setup.status.success(), "{setup:?}");
    let bin = env!("CARGO_BIN_EXE_ambassadord");
    let mut amb = Ambassador::start_with_shell(&format!(
        "exec ip netns exec {} {bin} --bind 127.0.0.1 --port 10000 127.0.0.1:1",
        ns.name
    ));
    assert_eq!(amb.admin_addr(), config_default_admin());
    let reply = ns.inside(|| admin::get(config_default_admin(), "/healthz"));
    assert_eq!(reply, Some((200, "ok\n".to_string())));
}

fn config_default_admin() -> SocketAddr {
    ambassadord::config::DEFAULT_ADMIN.parse().unwrap()
}
