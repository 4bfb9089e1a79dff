//! Faults and scale: what the proxy does when it runs out of its own resources, when a
//! side aborts, when a backend set is large, and when what it is told is hostile.

use std::time::Duration;

use tokio::net::TcpStream;

use crate::support::*;

/// Running out of descriptors is the proxy's own shortage, not the backend's: a connect
/// that fails with EMFILE is refused with a line that says so and counted as
/// `local_resources` with no backend, and the backend is not put in cool-down (it
/// still shows `up` once descriptors are free, and is never blamed in the log).
#[tokio::test(flavor = "multi_thread")]
async fn descriptor_exhaustion_is_not_blamed_on_the_backend() {
    let backend = named_backend("127.0.0.1:0", "b").await;
    let mut amb = Ambassador::on_loopback(&["--admin", "127.0.0.1:0", &backend.addr.to_string()]);
    let admin_addr = amb.admin_addr();
    // Leave it an odd number of free descriptors. A forwarded connection takes two (the
    // client and the backend), so connections cannot use them up exactly: one accept
    // takes the last descriptor and its connect must fail. With an even number, each
    // accept could be followed by its connect until none is left; then accept fails
    // and no connect ever does.
    let limit = limit_leaving(amb.pid(), 19).await;
    let status = std::process::Command::new("prlimit")
        .arg(format!("--pid={}", amb.pid()))
        .arg(format!("--nofile={limit}:{limit}"))
        .status()
        .expect("prlimit (util-linux) runs");
    assert!(status.success(), "prlimit --nofile={limit}: {status}");
    let mut held = Vec::new();
    for _ in 0..60 {
        if let Ok(s) = TcpStream::connect(amb.addr).await {
            held.push(s);
        }
    }
    let line = amb.wait_for_log("the backend is not at fault");
    assert!(line.contains("close=refused"), "{line}");
    assert!(line.contains("Too many open files"), "{line}");
    drop(held);

    let status = eventually("the admin endpoint answers again", || async {
        admin::get(admin_addr, "/routes").filter(|(code, _)| *code == 200)
    })
    .await;
    let routes: serde_json::Value = serde_json::from_str(&status.1).unwrap();
    let endpoint = &routes["routes"][0]["endpoints"][0];
    assert_eq!(endpoint["addr"], backend.addr.to_string());
    assert_eq!(endpoint["state"], "up", "{routes}");
    let metrics = admin::get_ok(admin_addr, "/metrics");
    let local = format!(
        "ambassadord_connect_failures_total{{route=\"{}\",backend=\"\",reason=\"local_resources\"}}",
        amb.addr
    );
    assert!(
        admin::sample(&metrics, &local).unwrap_or(0.0) >= 1.0,
        "{metrics}"
    );
    let blamed = format!("backend=\"{}\",reason=", backend.addr);
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("ambassadord_connect_failures_total") && l.contains(&blamed)),
        "{metrics}"
    );
    assert_eq!(amb.count_log("every backend failed"), 0, "{:#?}", amb.log());
    // Connections still queued from the flood may take the last descriptors for a
    // moment; then the backend serves again.
    until_served_by(amb.addr, "b").await;
}

/// The descriptor limit that leaves process `pid` exactly `free` descriptor numbers
/// to open, once its open descriptors have stopped changing (two looks 100 ms apart
/// agree). A new descriptor takes the lowest free number below the limit, so what
/// counts is the free numbers below it: descriptors numbered above it (such as a
/// pipe inherited from the test harness) neither count nor matter.
async fn limit_leaving(pid: u32, free: u64) -> u64 {
    let open = move || -> Option<std::collections::BTreeSet<u64>> {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .ok()?
            .map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect()
    };
    let open = eventually("the open descriptors to settle", || async move {
        let before = open()?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        (open()? == before).then_some(before)
    })
    .await;
    (1..)
        .find(|&limit| limit - open.range(..limit).count() as u64 == free)
        .expect("some limit leaves that many")
}

/// A listener that never accepts, its accept queue full: a connect to it gets no answer
/// (the kernel drops the SYN), as with a black-holed host, on loopback.
fn black_hole() -> (
    std::net::SocketAddr,
    Vec<std::net::TcpStream>,
    socket2::Socket,
) {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket
        .bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    socket.listen(0).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    // Fill the queue; a connect that does not complete at once means it is full.
    let mut fillers = Vec::new();
    while let Ok(s) =
        std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(200))
    {
        fillers.push(s);
        assert!(
            fillers.len() < 64,
            "the accept queue of {addr} never filled"
        );
    }
    (addr, fillers, socket)
}

/// When a dead backend's cool-down ends, one connection tries it, not every
/// concurrent one: with 20 clients connecting continuously over a whole cool-down, a
/// black-holed backend (each try costs the full connect timeout) is tried once when its
/// cool-down ends; before, every connection arriving then paid the timeout. Every
/// client is served by the healthy backend throughout.
#[tokio::test(flavor = "multi_thread")]
async fn a_cooled_down_backend_is_retried_by_one_connection_not_a_herd() {
    let (dead, _fillers, _socket) = black_hole();
    let healthy = named_backend("127.0.0.1:0", "healthy").await;
    let spec = format!("{dead},{}", healthy.addr);
    let mut amb = Ambassador::on_loopback(&[
        "--connect-timeout",
        "300ms",
        "--admin",
        "127.0.0.1:0",
        &spec,
    ]);
    let admin_addr = amb.admin_addr();
    let timeouts = move || {
        let series = format!(
            "ambassadord_connect_failures_total{{route=\"{}\",backend=\"{dead}\",reason=\"timeout\"}}",
            amb.addr
        );
        admin::metric(admin_addr, &series)
    };
    // The first connections find it dead (several at once: nothing was known yet).
    let proxy = amb.addr;
    eventually("the black hole to time out once", || async {
        served_by(proxy).await;
        (timeouts() >= 1.0).then_some(())
    })
    .await;
    let before = timeouts();
    // 20 clients for longer than one cool-down (5 s), so it ends while they run.
    let end = tokio::time::Instant::now() + std::time::Duration::from_millis(6500);
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..20 {
        clients.spawn(async move {
            let mut served = 0;
            while tokio::time::Instant::now() < end {
                let who = served_by(proxy).await;
                assert_eq!(who.as_deref(), Some("healthy"), "a client was not served");
                served += 1;
            }
            served
        });
    }
    let mut total = 0;
    while let Some(r) = clients.join_next().await {
        total += r.expect("a client failed");
    }
    let during = timeouts() - before;
    assert!(total > 100, "only {total} connections in 6.5 s");
    assert!(
        during <= 2.0,
        "{during} connections paid the connect timeout after the cool-down ended; one trial expected"
    );
}

/// Slow admin clients cannot take the descriptors the data path needs: with a limit of
/// 128 descriptors, 200 admin connections that never finish their headers leave the
/// data path serving every client; the endpoint closes each of them within its header
/// deadline (5 s), and answers again once they are gone.
#[tokio::test(flavor = "multi_thread")]
async fn slow_admin_clients_cannot_starve_the_data_path() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let backend = named_backend("127.0.0.1:0", "b").await;
    let script = format!(
        "ulimit -n 128 && exec {} --bind 127.0.0.1 --port 0 --admin 127.0.0.1:0 {}",
        env!("CARGO_BIN_EXE_ambassadord"),
        backend.addr
    );
    let mut amb = Ambassador::start_with_shell(&script);
    let admin_addr = amb.admin_addr();
    let mut slow = Vec::new();
    for _ in 0..200 {
        if let Ok(mut s) = TcpStream::connect(admin_addr).await {
            let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").await;
            slow.push(s);
        }
    }
    for _ in 0..4 {
        let served = tokio::time::timeout(DEADLINE, served_by(amb.addr)).await;
        assert_eq!(
            served.ok().flatten().as_deref(),
            Some("b"),
            "{:#?}",
            amb.log()
        );
    }
    // Every slow client is cut (EOF or reset) by the header deadline; a connection
    // over the cap was closed at once.
    for (i, s) in slow.iter_mut().enumerate() {
        let mut buf = [0u8; 256];
        let cut = tokio::time::timeout(Duration::from_secs(15), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(
            cut.is_ok(),
            "slow admin connection {i} still open after 15 s"
        );
    }
    drop(slow);
    let healthz = eventually("/healthz to answer", || async {
        admin::get(admin_addr, "/healthz")
    })
    .await;
    assert_eq!(healthz, (200, "ok\n".to_string()));
}

/// At start the soft descriptor limit is raised to the hard limit, and the limit in
/// force is logged.
#[tokio::test(flavor = "multi_thread")]
async fn descriptor_limit_is_raised_to_the_hard_limit() {
    let script = format!(
        "ulimit -S -n 256 && exec {} --bind 127.0.0.1 --port 0 127.0.0.1:1",
        env!("CARGO_BIN_EXE_ambassadord")
    );
    let mut amb = Ambassador::start_with_shell(&script);
    let line = amb.wait_for_log("descriptor limit raised to the hard limit");
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", amb.pid())).unwrap();
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    let fields: Vec<&str> = open_files.split_whitespace().collect();
    let (soft, hard) = (fields[3], fields[4]);
    assert!(
        hard.parse::<u64>().unwrap() > 256,
        "the hard limit here is {hard}: cannot test"
    );
    assert_eq!(soft, hard, "{open_files}");
    assert!(
        line.contains(&format!("limit={hard}")) && line.contains("raised_from=256"),
        "{line}"
    );
}

/// The bytes of every log line so far.
fn log_bytes(amb: &Ambassador) -> usize {
    amb.log().iter().map(|l| l.len() + 1).sum()
}

/// A change costs in proportion to the change: 10,000 etcd children put back to back
/// (16 writers) are all routed, the log stays under 1 MB (a line per change once named
/// the whole set: 850 MB for this run), and bursts of puts are published together, not
/// one set per key. Prints how long routing took after the last put and the proxy's CPU.
#[tokio::test(flavor = "multi_thread")]
async fn ten_thousand_etcd_children_converge_with_a_bounded_log() {
    const CHILDREN: usize = 10_000;
    let etcd = crate::support::etcd::Etcd::start().await;
    let mut amb = Ambassador::on_loopback(&["--admin", "127.0.0.1:0", &etcd.url("/big")]);
    let admin_addr = amb.admin_addr();
    let etcd = std::sync::Arc::new(etcd);
    let mut writers = tokio::task::JoinSet::new();
    let started = std::time::Instant::now();
    for w in 0..16 {
        let etcd = etcd.clone();
        writers.spawn(async move {
            for i in (w..CHILDREN).step_by(16) {
                let backend = format!("127.0.0.{}:{}", 1 + i / 60_000, 1024 + i % 60_000);
                etcd.put(&format!("/big/n{i:05}"), &backend).await;
            }
        });
    }
    while let Some(r) = writers.join_next().await {
        r.expect("a writer failed");
    }
    let last_put = std::time::Instant::now();
    let series = format!(
        "ambassadord_discovery_endpoints{{source=\"{}\"}}",
        etcd.url("/big")
    );
    eventually_within(
        Duration::from_secs(60),
        "all 10,000 children routed",
        || async {
            let metrics = admin::get(admin_addr, "/metrics")?.1;
            (admin::sample(&metrics, &series) == Some(CHILDREN as f64)).then_some(())
        },
    )
    .await;
    let converged = last_put.elapsed();
    let changes = amb.count_log("backends changed");
    let bytes = log_bytes(&amb);
    let cpu = cpu_seconds(amb.pid());
    println!(
        "{CHILDREN} etcd children: puts took {:.1} s; routed {:.0} ms after the last put; \
         {changes} published sets; {bytes} bytes of log; proxy CPU {cpu:.2} s",
        (last_put - started).as_secs_f64(),
        converged.as_secs_f64() * 1000.0
    );
    assert!(bytes < 1_000_000, "{bytes} bytes of log");
    assert!(
        changes < CHILDREN / 10,
        "{changes} sets published for {CHILDREN} puts"
    );
    let line = amb.wait_for_log("backends changed");
    assert!(line.len() < 2_000, "{line}");
    amb.signal("TERM");
    assert!(amb.wait_exit().success());
}

/// The CPU time (user + system) a process has used, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // After the command name in parentheses: utime and stime are fields 14 and 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

/// A value from outside cannot forge a log line or make a huge one: an etcd value with
/// a newline and a fake ERROR line after it is logged escaped on the warning's one line,
/// and a 1 MB value is cut, in the text format and in JSON.
#[tokio::test(flavor = "multi_thread")]
async fn a_kv_value_cannot_forge_a_log_line_or_make_a_huge_one() {
    let etcd = crate::support::etcd::Etcd::scope();
    let good = named_backend("127.0.0.1:0", "good").await;
    etcd.put("/svc/n/good", &good.addr.to_string()).await;
    let forged = "2000-01-01T00:00:00.000000Z ERROR ambassadord: forged line";
    etcd.put("/svc/n/bad", &format!("x:1\n{forged}")).await;
    etcd.put("/svc/n/huge", &"h".repeat(1 << 20)).await;
    for format in ["text", "json"] {
        let mut amb = Ambassador::on_loopback(&["--log-format", format, &etcd.url("/svc/n")]);
        wait_serving(amb.addr, &["good"]).await;
        let bad_key = etcd.key("/svc/n/bad");
        let line = amb.wait_for_log(&bad_key);
        assert!(line.contains("forged line"), "{format}: {line}");
        assert!(
            line.contains("x:1\\\\n2000") || line.contains("x:1\\n2000"),
            "{format}: {line}"
        );
        amb.wait_for_log(&etcd.key("/svc/n/huge"));
        let log = amb.log();
        assert!(
            !log.iter().any(|l| l.starts_with("2000-01-01")),
            "{format}: a forged line: {log:#?}"
        );
        let longest = log.iter().map(|l| l.len()).max().unwrap_or(0);
        assert!(longest < 2_000, "{format}: a {longest}-byte line");
    }
}

/// Closes `s` with a reset (SO_LINGER 0), as a killed or aborting peer does.
fn reset(s: TcpStream) {
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(s);
}

const MODES: [&str; 3] = ["auto", "splice", "userspace"];

/// A backend that resets mid-response is seen by the client as a reset, not as a clean
/// end of stream, in every copy mode (a direct connection gets ECONNRESET; a protocol
/// that ends a message with EOF must not take the truncated one as complete).
#[tokio::test(flavor = "multi_thread")]
async fn a_backend_reset_reaches_the_client_as_a_reset() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for mode in MODES {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(b"partial answ").await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            reset(s);
        });
        let mut amb = Ambassador::on_loopback(&["--copy", mode, &addr.to_string()]);
        let mut client = TcpStream::connect(amb.addr).await.unwrap();
        let mut got = Vec::new();
        let read = client.read_to_end(&mut got).await;
        assert_eq!(
            read.as_ref().map_err(|e| e.kind()).err(),
            Some(std::io::ErrorKind::ConnectionReset),
            "--copy {mode}: {read:?} after {:?}",
            String::from_utf8_lossy(&got)
        );
        let line = amb.wait_for_log("connection aborted");
        assert!(
            line.contains("reset=client") && line.contains("close=backend_error"),
            "{line}"
        );
    }
}

/// A client that resets is passed on to the backend as a reset, not a clean EOF, in
/// every copy mode.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_reset_reaches_the_backend_as_a_reset() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for mode in MODES {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let backend = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.map_err(|e| e.kind())
        });
        let mut amb = Ambassador::on_loopback(&["--copy", mode, &addr.to_string()]);
        let mut client = TcpStream::connect(amb.addr).await.unwrap();
        client.write_all(b"half a requ").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        reset(client);
        let seen = tokio::time::timeout(DEADLINE, backend)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            seen.err(),
            Some(std::io::ErrorKind::ConnectionReset),
            "--copy {mode}: the backend saw a clean end"
        );
        let line = amb.wait_for_log("connection aborted");
        assert!(
            line.contains("reset=backend") && line.contains("close=client_error"),
            "{line}"
        );
    }
}

/// A client's reset is noticed while the proxy is blocked writing its bytes to a
/// backend that does not read: the connection is freed at once (the backend is reset
/// and the line logged), in every copy mode, instead of being held until the backend
/// reads again.
#[tokio::test(flavor = "multi_thread")]
async fn a_reset_is_noticed_while_blocked_writing_to_a_peer_that_does_not_read() {
    use tokio::io::AsyncWriteExt;
    for mode in MODES {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Accepts and holds the connection, never reading.
        let (held_tx, held_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let _ = held_tx.send(());
            tokio::time::sleep(Duration::from_secs(600)).await;
            drop(s);
        });
        let mut amb = Ambassador::on_loopback(&["--copy", mode, &addr.to_string()]);
        let mut client = TcpStream::connect(amb.addr).await.unwrap();
        held_rx.await.unwrap();
        // Write until every buffer on the way is full and the write blocks.
        let chunk = vec![7u8; 256 * 1024];
        while tokio::time::timeout(Duration::from_millis(300), client.write_all(&chunk))
            .await
            .is_ok()
        {}
        reset(client);
        let line = amb.wait_for_log("connection aborted");
        assert!(line.contains("reset=backend"), "--copy {mode}: {line}");
    }
}

/// The metric series of a backend that left every set, with no connection open to it,
/// are removed (churning addresses cannot grow memory without bound); the route's
/// totals in /routes keep what they counted.
#[tokio::test(flavor = "multi_thread")]
async fn departed_backends_lose_their_metric_series() {
    let etcd = crate::support::etcd::Etcd::scope();
    let mut backends = Vec::new();
    for i in 0..5 {
        let b = named_backend("127.0.0.1:0", ["b0", "b1", "b2", "b3", "b4"][i]).await;
        etcd.put(&format!("/churn/n{i}"), &b.addr.to_string()).await;
        backends.push(b);
    }
    let mut amb = Ambassador::on_loopback(&["--admin", "127.0.0.1:0", &etcd.url("/churn")]);
    let admin_addr = amb.admin_addr();
    wait_serving(amb.addr, &["b0", "b1", "b2", "b3", "b4"]).await;
    let series_of = |addr: std::net::SocketAddr| format!("backend=\"{addr}\"");
    let metrics = admin::get_ok(admin_addr, "/metrics");
    for b in &backends {
        assert!(metrics.contains(&series_of(b.addr)), "{metrics}");
    }
    let sent_before = |json: &str| {
        let routes: serde_json::Value = serde_json::from_str(json).unwrap();
        routes["routes"][0]["received_bytes"].as_u64().unwrap()
    };
    for i in 1..5 {
        etcd.delete(&format!("/churn/n{i}")).await;
    }
    wait_serving(amb.addr, &["b0"]).await;
    // Settle the totals first: from here no connection moves bytes.
    let totals = sent_before(&admin::get_ok(admin_addr, "/routes"));
    eventually("the departed backends' series to go", || async {
        let metrics = admin::get(admin_addr, "/metrics")?.1;
        backends[1..]
            .iter()
            .all(|b| !metrics.contains(&series_of(b.addr)))
            .then_some(())
    })
    .await;
    let metrics = admin::get_ok(admin_addr, "/metrics");
    assert!(metrics.contains(&series_of(backends[0].addr)), "{metrics}");
    assert_eq!(sent_before(&admin::get_ok(admin_addr, "/routes")), totals);
}

/// Outlier ejection: a black-holed backend costs at most `--eject-after` (here 2)
/// connect timeouts (the first, then one trial when its cool-down ends), is then ejected
/// (one log line, /routes says until when, the ejection counter counts it) and costs
/// nothing until the ejection ends, while a client connecting continuously is served by
/// the healthy backend throughout; when it ends, one trial fails and the ejection
/// doubles.
#[tokio::test(flavor = "multi_thread")]
async fn a_black_holed_backend_costs_at_most_n_timeouts_then_none_while_ejected() {
    let (dead, _fillers, _socket) = black_hole();
    let healthy = named_backend("127.0.0.1:0", "healthy").await;
    let spec = format!("{dead},{}", healthy.addr);
    let mut amb = Ambassador::on_loopback(&[
        "--connect-timeout",
        "300ms",
        "--eject-after",
        "2",
        "--admin",
        "127.0.0.1:0",
        &spec,
    ]);
    let admin_addr = amb.admin_addr();
    let proxy = amb.addr;
    let metric = move |name: &str, extra: &str| {
        let series = format!("{name}{{route=\"{proxy}\",backend=\"{dead}\"{extra}}}");
        admin::metric(admin_addr, &series)
    };
    let timeouts = move || metric("ambassadord_connect_failures_total", ",reason=\"timeout\"");
    // One client, connecting again and again, until the backend is ejected.
    let served = |who: Option<String>| assert_eq!(who.as_deref(), Some("healthy"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while amb.count_log("backend EJECTED") == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never ejected: {:#?}",
            amb.log()
        );
        served(served_by(proxy).await);
    }
    let at_ejection = timeouts();
    assert!(
        (1.0..=2.0).contains(&at_ejection),
        "{at_ejection} timeouts before the ejection"
    );
    let line = amb.wait_for_log("backend EJECTED");
    assert!(
        line.contains("for 5s after 2 connect failures in a row"),
        "{line}"
    );
    assert_eq!(metric("ambassadord_backend_ejections_total", ""), 1.0);
    let status = admin::endpoint(admin_addr, &dead.to_string());
    assert_eq!(status["state"], "ejected", "{status}");
    assert_eq!(status["failures_in_a_row"], 2, "{status}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let left = status["until"].as_f64().expect("until") - now;
    assert!(
        (4.0..=5.1).contains(&left),
        "{left} s of ejection left: {status}"
    );

    // Until the ejection ends (less a margin), not one connection pays the timeout.
    let quiet_until = tokio::time::Instant::now() + Duration::from_secs_f64(left - 0.5);
    let mut count = 0;
    while tokio::time::Instant::now() < quiet_until {
        served(served_by(proxy).await);
        count += 1;
    }
    assert!(count > 20, "only {count} connections while ejected");
    assert_eq!(
        timeouts(),
        at_ejection,
        "a connection paid the timeout while it was ejected"
    );

    // Then one trial, which fails: ejected again, for twice as long.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while amb.count_log("backend EJECTED") < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no trial after the ejection: {:#?}",
            amb.log()
        );
        served(served_by(proxy).await);
    }
    assert_eq!(timeouts(), at_ejection + 1.0);
    let again = amb
        .log()
        .into_iter()
        .filter(|l| l.contains("backend EJECTED"))
        .nth(1)
        .unwrap();
    assert!(
        again.contains("for 10s after 3 connect failures in a row"),
        "{again}"
    );
}

/// Ejected backends are still tried when no other is left: with both backends refusing
/// and ejected, a connection still tries both (the refusals keep being counted), and
/// when one comes back the very next connection is served by it, however long its
/// ejection had left.
#[tokio::test(flavor = "multi_thread")]
async fn with_every_backend_ejected_clients_are_still_tried_against_them() {
    let a = crate::support::etcd::free_port();
    let b = std::iter::repeat_with(crate::support::etcd::free_port)
        .find(|&p| p != a)
        .unwrap();
    let spec = format!("127.0.0.1:{a},127.0.0.1:{b}");
    let mut amb = Ambassador::on_loopback(&["--eject-after", "1", "--admin", "127.0.0.1:0", &spec]);
    let admin_addr = amb.admin_addr();
    let proxy = amb.addr;
    let refusals = move |port: u16| {
        let series = format!(
            "ambassadord_connect_failures_total{{route=\"{proxy}\",backend=\"127.0.0.1:{port}\",reason=\"refused\"}}"
        );
        admin::metric(admin_addr, &series)
    };
    assert_eq!(served_by(proxy).await, None);
    amb.wait_for_log_where("both ejected", |l| {
        l.contains("backend EJECTED") && l.contains(&format!(":{b}"))
    });
    for port in [a, b] {
        let status = admin::endpoint(admin_addr, &format!("127.0.0.1:{port}"));
        assert_eq!(status["state"], "ejected", "{status}");
    }
    let before = (refusals(a), refusals(b));
    assert_eq!(served_by(proxy).await, None);
    assert_eq!(
        (refusals(a), refusals(b)),
        (before.0 + 1.0, before.1 + 1.0),
        "both tried while ejected"
    );
    let _back = named_backend(&format!("127.0.0.1:{b}"), "back").await;
    assert_eq!(served_by(proxy).await.as_deref(), Some("back"));
}
