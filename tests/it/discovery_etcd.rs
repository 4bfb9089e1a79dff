//! etcd discovery end to end: a real etcd (Debian's etcd-server) on loopback (shared by
//! the tests that only read and write keys, one of its own for a test that stops or
//! compacts it), the real binary pointed at it with `etcd://127.0.0.1:PORT/path`, and the
//! keys changed through etcd's gateway while connections show where traffic goes.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::support::etcd::{Etcd, WatchGate, free_port};
use crate::support::*;

fn start_ambassador(url: &str) -> Ambassador {
    Ambassador::on_loopback(&[url])
}

/// A child's value changed, a child added and a child removed are each followed live;
/// a grandchild and a sibling key sharing the prefix are not backends.
#[tokio::test(flavor = "multi_thread")]
async fn children_changed_added_and_removed_are_followed() {
    let etcd = Etcd::scope();
    let a = named_backend("127.0.0.1:0", "a").await;
    let b = named_backend("127.0.0.1:0", "b").await;
    let c = named_backend("127.0.0.1:0", "c").await;
    etcd.put("/svc/nodes/one", &a.addr.to_string()).await;
    let amb = start_ambassador(&etcd.url("/svc/nodes"));
    wait_serving(amb.addr, &["a"]).await;

    etcd.put("/svc/nodes/one", &b.addr.to_string()).await;
    wait_serving(amb.addr, &["b"]).await;

    // Not children: these must never be served (they are written before `two`, so once
    // `c` is served they have been seen too).
    etcd.put("/svc/nodes/two/meta", &a.addr.to_string()).await;
    etcd.put("/svc/nodesx/one", &a.addr.to_string()).await;
    etcd.put("/svc/nodes/two", &c.addr.to_string()).await;
    wait_serving(amb.addr, &["b", "c"]).await;
    assert_eq!(
        serving(amb.addr, 8).await,
        BTreeSet::from(["b".to_string(), "c".to_string()])
    );

    etcd.delete("/svc/nodes/one").await;
    wait_serving(amb.addr, &["c"]).await;
}

/// Without children the key's own value is the backend list, and a comma-separated
/// value with a host name works; once a child appears the children win, and when it
/// goes the value serves again.
#[tokio::test(flavor = "multi_thread")]
async fn single_value_with_a_comma_list_serves_when_there_are_no_children() {
    let etcd = Etcd::scope();
    let a = named_backend("127.0.0.1:0", "a").await;
    let b = named_backend("127.0.0.1:0", "b").await;
    let c = named_backend("127.0.0.1:0", "c").await;
    etcd.put(
        "/svc/single",
        &format!("{}, localhost:{}", a.addr, b.addr.port()),
    )
    .await;
    let amb = start_ambassador(&etcd.url("/svc/single"));
    wait_serving(amb.addr, &["a", "b"]).await;

    etcd.put("/svc/single/x", &c.addr.to_string()).await;
    wait_serving(amb.addr, &["c"]).await;
    etcd.delete("/svc/single/x").await;
    wait_serving(amb.addr, &["a", "b"]).await;
}

/// A value that is not a backend is skipped with one warning naming key and value; the
/// good backend serves, and a later change does not repeat the warning. (The store is
/// named `localhost` here, so this also proves a store given by name is found.)
#[tokio::test(flavor = "multi_thread")]
async fn bad_value_is_skipped_with_a_warning_naming_key_and_value() {
    let etcd = Etcd::scope();
    let a = named_backend("127.0.0.1:0", "a").await;
    let b = named_backend("127.0.0.1:0", "b").await;
    etcd.put("/svc/n/good", &a.addr.to_string()).await;
    etcd.put("/svc/n/bad", "redis:abc").await;
    // The store by name: resolved through the project's resolver (/etc/hosts here).
    let mut amb = start_ambassador(&format!(
        "etcd://localhost:{}{}",
        etcd.etcd.client.port(),
        etcd.key("/svc/n")
    ));
    wait_serving(amb.addr, &["a"]).await;
    let warning = format!(
        "key '{}': value 'redis:abc' is not a backend",
        etcd.key("/svc/n/bad")
    );
    let line = amb.wait_for_log(&warning);
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("port 'abc' is not a number"), "{line}");

    etcd.put("/svc/n/other", &b.addr.to_string()).await;
    wait_serving(amb.addr, &["a", "b"]).await;
    assert_eq!(amb.count_log(&warning), 1, "{:#?}", amb.log());
}

/// While etcd is down the last set keeps serving (and the log says so once); after
/// etcd comes back, changes made then are picked up.
#[tokio::test(flavor = "multi_thread")]
async fn store_stopped_then_restarted_keeps_serving_and_follows_changes() {
    let mut etcd = Etcd::start().await;
    let a = named_backend("127.0.0.1:0", "a").await;
    let b = named_backend("127.0.0.1:0", "b").await;
    etcd.put("/svc/n/one", &a.addr.to_string()).await;
    let mut amb = start_ambassador(&etcd.url("/svc/n"));
    wait_serving(amb.addr, &["a"]).await;

    etcd.stop();
    let line = amb.wait_for_log("discovery failed");
    assert!(line.contains("keeping the last good set"), "{line}");
    assert!(line.contains(&etcd.client.to_string()), "{line}");
    for _ in 0..3 {
        assert_eq!(
            serving(amb.addr, 8).await,
            BTreeSet::from(["a".to_string()])
        );
    }

    etcd.restart().await;
    etcd.put("/svc/n/one", &b.addr.to_string()).await;
    wait_serving(amb.addr, &["b"]).await;
    amb.wait_for_log("discovery recovered");
    assert_eq!(amb.count_log("discovery failed"), 1, "{:#?}", amb.log());
}

/// Compacting history past the revision the ambassador watches from does not stop
/// changes from arriving.
#[tokio::test(flavor = "multi_thread")]
async fn compaction_while_watching_keeps_changes_flowing() {
    let etcd = Etcd::start().await;
    let a = named_backend("127.0.0.1:0", "a").await;
    let b = named_backend("127.0.0.1:0", "b").await;
    etcd.put("/svc/n/one", &a.addr.to_string()).await;
    let amb = start_ambassador(&etcd.url("/svc/n"));
    wait_serving(amb.addr, &["a"]).await;

    for i in 0..5 {
        etcd.put("/elsewhere", &i.to_string()).await;
    }
    etcd.compact(etcd.revision().await).await;
    etcd.put("/svc/n/one", &b.addr.to_string()).await;
    wait_serving(amb.addr, &["b"]).await;
}

/// A watch that reaches etcd only after the revision it starts from was compacted away
/// (held back by a relay) is cancelled by etcd; the source reads afresh and serves the
/// change it would otherwise have missed.
#[tokio::test(flavor = "multi_thread")]
async fn watch_starting_behind_a_compaction_reads_afresh() {
    let etcd = Etcd::start().await;
    let a = named_backend("127.0.0.1:0", "a").await;
    let b = named_backend("127.0.0.1:0", "b").await;
    etcd.put("/svc/n/one", &a.addr.to_string()).await;
    let gate = WatchGate::start(etcd.client).await;
    let mut amb = start_ambassador(&format!("etcd://{}/svc/n", gate.addr));
    wait_serving(amb.addr, &["a"]).await;
    gate.wait_held().await;

    // The change falls between the read and the held watch; the compaction then removes
    // the revision the watch starts from.
    etcd.put("/svc/n/one", &b.addr.to_string()).await;
    etcd.put("/elsewhere", "x").await;
    etcd.compact(etcd.revision().await).await;
    gate.release();

    wait_serving(amb.addr, &["b"]).await;
    let line = amb.wait_for_log("compacted past the watched revision");
    assert!(line.contains("reading afresh"), "{line}");
    assert_eq!(amb.count_log("discovery failed"), 0, "{:#?}", amb.log());
}

/// With etcd unreachable at startup the ambassador still starts and listens, refuses
/// connections (saying why, once), and serves once etcd comes up.
#[tokio::test(flavor = "multi_thread")]
async fn unreachable_at_startup_then_coming_up() {
    let port = free_port();
    let a = named_backend("127.0.0.1:0", "a").await;
    let mut amb = start_ambassador(&format!("etcd://127.0.0.1:{port}/svc/n"));
    let line = amb.wait_for_log("discovery failed");
    assert!(
        line.contains("no backends yet, connections are refused"),
        "{line}"
    );
    assert!(line.contains(&format!("127.0.0.1:{port}")), "{line}");
    for _ in 0..3 {
        let reply = read_reply(amb.addr).await.unwrap_or_default();
        assert_eq!(reply, "", "a connection was served before any backend");
    }
    amb.wait_for_log("refusing connections until discovery finds some");
    assert_eq!(
        amb.count_log("refusing connections until discovery finds some"),
        1
    );

    let etcd = Etcd::start_on(port).await;
    etcd.put("/svc/n/one", &a.addr.to_string()).await;
    wait_serving(amb.addr, &["a"]).await;
}

/// A server that is not etcd (a reply that is not the gateway's JSON) gets a message
/// naming the server, the key and what was wrong, and the proxy keeps listening.
#[tokio::test(flavor = "multi_thread")]
async fn malformed_reply_is_named_with_server_and_key() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = listener.local_addr().unwrap();
    let not_etcd = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let body = "<html>not etcd</html>";
                let reply = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(reply.as_bytes()).await;
            });
        }
    });
    let mut amb = start_ambassador(&format!("etcd://{server}/svc/n"));
    let line = amb.wait_for_log("discovery failed");
    for needle in [
        &format!("etcd {server}: reading '/svc/n'"),
        "malformed range reply",
        "<html>not etcd</html>",
        "no backends yet",
    ] {
        assert!(line.contains(needle), "{needle:?} not in {line}");
    }
    assert!(amb.child_running());
    assert_eq!(read_reply(amb.addr).await.unwrap_or_default(), "");
    not_etcd.abort();
}

/// Measures how long a change takes from the put to the first connection routed to the
/// new backend, and prints the figures (a measurement, not a pass/fail timing). It
/// does assert that every change is applied.
#[tokio::test(flavor = "multi_thread")]
async fn propagation_time_from_put_to_routing() {
    let etcd = Etcd::scope();
    let a = named_backend("127.0.0.1:0", "a").await;
    let b = named_backend("127.0.0.1:0", "b").await;
    etcd.put("/svc/n/one", &a.addr.to_string()).await;
    let amb = start_ambassador(&etcd.url("/svc/n"));
    wait_serving(amb.addr, &["a"]).await;

    let mut times = Vec::new();
    for round in 0..20 {
        let (addr, name) = if round % 2 == 0 {
            (b.addr, "b")
        } else {
            (a.addr, "a")
        };
        let start = Instant::now();
        etcd.put("/svc/n/one", &addr.to_string()).await;
        let proxy = amb.addr;
        eventually_every(
            DEADLINE,
            Duration::ZERO,
            || async move {
                let reply = read_reply(proxy).await;
                reply.is_ok_and(|r| r.trim() == name).then_some(())
            },
            || format!("round {round}: the change to {name} was never applied"),
        )
        .await;
        times.push(start.elapsed());
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "etcd propagation (put -> first connection routed to the new backend), {} changes: \
         min {:.1} ms, median {:.1} ms, p90 {:.1} ms, max {:.1} ms",
        times.len(),
        ms(times[0]),
        ms(times[times.len() / 2]),
        ms(times[times.len() * 9 / 10]),
        ms(times[times.len() - 1]),
    );
}

/// A backend leaving the set never cuts a connection already open to it: after its key
/// is deleted and new connections go elsewhere, the open connection still carries bytes
/// both ways.
#[tokio::test(flavor = "multi_thread")]
async fn a_backend_leaving_the_set_keeps_its_open_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let etcd = Etcd::scope();
    // An echo backend that also says its name first.
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo_addr = echo.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(b"leaving\n").await;
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let stays = named_backend("127.0.0.1:0", "stays").await;
    etcd.put("/svc/nodes/one", &echo_addr.to_string()).await;
    let amb = start_ambassador(&etcd.url("/svc/nodes"));

    let mut open = eventually("a connection to the first backend", || async {
        let mut s = tokio::net::TcpStream::connect(amb.addr).await.ok()?;
        let mut hello = [0u8; 8];
        s.read_exact(&mut hello).await.ok()?;
        (&hello == b"leaving\n").then_some(s)
    })
    .await;

    etcd.delete("/svc/nodes/one").await;
    etcd.put("/svc/nodes/two", &stays.addr.to_string()).await;
    wait_serving(amb.addr, &["stays"]).await;

    open.write_all(b"still here").await.unwrap();
    let mut back = [0u8; 10];
    open.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"still here");
}
