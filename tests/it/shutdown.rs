//! SIGTERM/SIGINT: stop accepting, let open transfers finish within the grace period,
//! close what is still open when it ends, exit 0.

use std::time::Duration;

use crate::support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A backend that sends `chunks` chunks of 64 KiB, each only after the test says go, so
/// the test controls when the transfer is in flight.
async fn paced_backend(chunks: usize) -> (std::net::SocketAddr, tokio::sync::mpsc::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (go, mut go_rx) = tokio::sync::mpsc::channel::<()>(chunks);
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        for i in 0..chunks {
            if go_rx.recv().await.is_none() {
                return;
            }
            s.write_all(&pattern(i as u64, 64 * 1024)).await.unwrap();
        }
        s.shutdown().await.unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
    });
    (addr, go)
}

/// An ambassador with `--shutdown-grace grace` and one client whose transfer from a
/// paced backend of `chunks` chunks has started (the first chunk has arrived).
async fn transfer_in_flight(
    chunks: usize,
    grace: &str,
) -> (Ambassador, TcpStream, tokio::sync::mpsc::Sender<()>) {
    let (backend, go) = paced_backend(chunks).await;
    let amb = Ambassador::on_loopback(&["--shutdown-grace", grace, &backend.to_string()]);
    let mut client = TcpStream::connect(amb.addr).await.unwrap();
    go.send(()).await.unwrap();
    let mut first = vec![0u8; 64 * 1024];
    client.read_exact(&mut first).await.unwrap();
    (amb, client, go)
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_open_transfer_and_refuses_new_connections() {
    let (mut amb, mut client, go) = transfer_in_flight(4, "30s").await;

    amb.signal("TERM");
    amb.wait_for_log("stopped accepting");
    let refused = TcpStream::connect(amb.addr).await;
    assert!(
        refused.is_err(),
        "a new connection was accepted during shutdown"
    );

    // The open transfer goes on to its end.
    for _ in 1..4 {
        go.send(()).await.unwrap();
    }
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).await.unwrap();
    assert_eq!(rest.len(), 3 * 64 * 1024);
    assert_eq!(rest[..64 * 1024], pattern(1, 64 * 1024)[..]);
    drop(client);

    let status = amb.wait_exit();
    assert_eq!(status.code(), Some(0), "{:#?}", amb.log());
    assert_eq!(amb.count_log("grace period over"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn grace_period_ends_connections_still_open_and_exits_0() {
    let (mut amb, mut client, go) = transfer_in_flight(2, "500ms").await;

    amb.signal("INT");
    let status = amb.wait_exit();
    assert_eq!(status.code(), Some(0));
    assert_eq!(amb.count_log("grace period over"), 1, "{:#?}", amb.log());
    let line = amb.wait_for_log("connection closed");
    assert_eq!(field(&line, "close").as_deref(), Some("shutdown"), "{line}");
    // The client sees its connection end.
    let mut rest = Vec::new();
    let r = tokio::time::timeout(DEADLINE, client.read_to_end(&mut rest)).await;
    assert!(r.is_ok(), "client connection left open");
    drop(go);
}

/// Running out of file descriptors makes accept fail; the ambassador backs off and
/// serves again once descriptors are free, instead of exiting.
#[tokio::test(flavor = "multi_thread")]
async fn accept_errors_back_off_and_recover() {
    let backend = named_backend("127.0.0.1:0", "still-here").await;
    // A low descriptor limit through the shell's ulimit, then the binary itself.
    let script = format!(
        "ulimit -n 40 && exec {} --bind 127.0.0.1 --port 0 {}",
        env!("CARGO_BIN_EXE_ambassadord"),
        backend.addr
    );
    let mut amb = Ambassador::start_with_shell(&script);
    let mut held = Vec::new();
    for _ in 0..60 {
        if let Ok(s) = TcpStream::connect(amb.addr).await {
            held.push(s);
        }
    }
    amb.wait_for_log("accept failed");
    // Out of descriptors for half a second: backing off from 5 ms, doubling to 1 s,
    // each data thread's accept loop retries (and logs) a handful of times; a loop
    // that retried at once would log thousands of lines.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let failures = amb.count_log("accept failed");
    assert!(
        failures <= 40,
        "{failures} accept failures logged in 0.5 s: no backoff"
    );
    drop(held);
    eventually("a connection is served again", || async {
        let reply = read_reply(amb.addr).await.ok();
        (reply.as_deref() == Some("still-here\n")).then_some(())
    })
    .await;
    assert!(
        amb.child_running(),
        "ambassadord exited after accept errors"
    );
}
