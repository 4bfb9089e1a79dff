//! The log is written by one writer thread, off the connections' path: a stderr nobody
//! reads (a full pipe, as a stalled `docker logs`) never stops forwarding, and a clean
//! shutdown writes out every line queued, the access log's included.

use std::process::{Command, Stdio};

use crate::support::*;

/// With its stderr a pipe that nobody reads (64 KiB fill it: about 300 access-log
/// lines), the ambassador still serves 2,000 connections, each logged, within the
/// deadline: lines wait in the writer's queue, the data path never blocks on stderr.
#[tokio::test(flavor = "multi_thread")]
async fn a_stderr_nobody_reads_never_stalls_forwarding() {
    let backend = named_backend("127.0.0.1:0", "b").await;
    let port = crate::support::etcd::free_port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ambassadord"));
    cmd.args([
        "--bind",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--admin",
        "off",
    ])
    .arg(backend.addr.to_string())
    .env_remove("RUST_LOG")
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    let mut child = crate::support::process::spawn(cmd, nix::sys::signal::Signal::SIGKILL)
        .expect("start ambassadord");
    // Kept open and never read: once the pipe is full, a write to stderr would block.
    let stderr = child.stderr.take().unwrap();
    let proxy: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    eventually("the ambassador to listen", || async move {
        tokio::net::TcpStream::connect(proxy).await.ok().map(drop)
    })
    .await;
    let served = tokio::time::timeout(DEADLINE, async {
        let mut served = 0;
        for _ in 0..2000 {
            if served_by(proxy).await.as_deref() == Some("b") {
                served += 1;
            }
        }
        served
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    drop(stderr);
    assert_eq!(
        served,
        Ok(2000),
        "connections stalled behind a full stderr pipe"
    );
}

/// 500 connections, then SIGTERM: the log holds 500 access-log lines and the final
/// "stopped": nothing queued is lost on a clean shutdown.
#[tokio::test(flavor = "multi_thread")]
async fn a_clean_shutdown_writes_out_every_queued_line() {
    let backend = named_backend("127.0.0.1:0", "b").await;
    let mut amb = Ambassador::on_loopback(&["--admin", "off", &backend.addr.to_string()]);
    let proxy = amb.addr;
    for _ in 0..500 {
        assert_eq!(served_by(proxy).await.as_deref(), Some("b"));
    }
    amb.signal("TERM");
    assert!(amb.wait_exit().success());
    assert_eq!(amb.count_log("connection closed"), 500, "{:#?}", amb.log());
    let last = amb.log().last().cloned().unwrap_or_default();
    assert!(last.ends_with(": stopped"), "the last line: {last:?}");
}
