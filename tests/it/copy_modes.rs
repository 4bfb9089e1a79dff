//! The copy modes besides the default (`--copy splice`, `--copy userspace`) each keep the
//! data path's contract that standard_static.rs checks for the default (`auto`): bytes
//! intact both ways, half-close, exact byte counts in the log. In every mode the
//! backend's EOF first keeps the client's direction open; the splice path holds no pipe
//! while a connection is idle; auto splices bulk streams only.

use std::net::SocketAddr;

use crate::support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The modes besides the default (auto), which every test in standard_static.rs runs
/// in: each contract below is checked there for auto, here for these.
const NOT_DEFAULT: [&str; 2] = ["splice", "userspace"];

fn start(mode: &str, backend: SocketAddr) -> Ambassador {
    Ambassador::on_loopback(&["--copy", mode, &backend.to_string()])
}

/// In each mode, 8 MB each way arrive intact and the reply that follows the client's EOF
/// still arrives (half-close passed on).
#[tokio::test(flavor = "multi_thread")]
async fn eight_megabytes_each_way_with_half_close_in_each_mode() {
    let backend = integrity_backend().await;
    for mode in NOT_DEFAULT {
        let amb = start(mode, backend.addr);
        integrity_exchange(amb.addr, 11, 8 << 20).await;
    }
}

/// In each mode, 200 concurrent connections with their own data are all intact and
/// counted exactly.
#[tokio::test(flavor = "multi_thread")]
async fn two_hundred_concurrent_connections_in_each_mode() {
    let backend = integrity_backend().await;
    for mode in NOT_DEFAULT {
        let mut amb = start(mode, backend.addr);
        let moved = concurrent_exchanges(amb.addr, 200, 5000, 32 * 1024).await;
        assert_eq!(amb.closed_totals(200), moved, "--copy {mode}");
    }
}

/// In each mode the log line counts exactly the bytes moved each way.
#[tokio::test(flavor = "multi_thread")]
async fn byte_counts_are_exact_in_each_mode() {
    let backend = integrity_backend().await;
    for mode in NOT_DEFAULT {
        let mut amb = start(mode, backend.addr);
        integrity_exchange(amb.addr, 9, 300_000).await;
        let line = amb.wait_for_log("connection closed");
        // 16-byte header + payload up; payload + 32-byte digest down.
        assert_eq!(
            field(&line, "sent").as_deref(),
            Some("300016"),
            "{mode}: {line}"
        );
        assert_eq!(
            field(&line, "received").as_deref(),
            Some("300032"),
            "{mode}: {line}"
        );
    }
}

/// In every mode (auto included: this is its only run), after the backend's EOF the
/// client's later bytes still reach it (half-close in the other direction).
#[tokio::test(flavor = "multi_thread")]
async fn backend_eof_first_in_each_mode() {
    for mode in ["auto", "splice", "userspace"] {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(b"hello").await.unwrap();
            s.shutdown().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            got
        });
        let amb = start(mode, addr);
        let mut c = TcpStream::connect(amb.addr).await.unwrap();
        let mut hello = Vec::new();
        c.read_to_end(&mut hello).await.unwrap();
        assert_eq!(hello, b"hello", "--copy {mode}");
        c.write_all(b"late words").await.unwrap();
        c.shutdown().await.unwrap();
        assert_eq!(server.await.unwrap(), b"late words", "--copy {mode}");
    }
}

/// AMBASSADORD_COPY selects the mode like the flag, and a bad value is refused naming
/// the variable and the value.
#[tokio::test(flavor = "multi_thread")]
async fn copy_mode_from_the_environment_and_a_bad_value() {
    let backend = integrity_backend().await;
    let amb = Ambassador::start_with_env(
        &[
            "--bind",
            "127.0.0.1",
            "--port",
            "0",
            &backend.addr.to_string(),
        ],
        &[("AMBASSADORD_COPY", "userspace")],
    );
    integrity_exchange(amb.addr, 3, 100_000).await;

    let (code, err) = run_to_exit(&["--copy", "zerocopy", "127.0.0.1:1"], &[]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("zerocopy") && err.contains("--copy"), "{err}");
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// With splice, a connection that has gone quiet holds no pipe: 20 connections that each
/// moved 64 KiB both ways and then sit idle cost the proxy about their two sockets each,
/// not two more pipes (four descriptors) each.
#[tokio::test(flavor = "multi_thread")]
async fn idle_spliced_connections_hold_no_pipes() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // An echo backend.
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut rd, mut wr) = s.into_split();
                let _ = tokio::io::copy(&mut rd, &mut wr).await;
            });
        }
    });
    let amb = start("splice", addr);
    let pid = amb.pid();
    let base = open_fds(pid);
    let payload = pattern(42, 64 * 1024);
    let mut held = Vec::new();
    for _ in 0..20 {
        let mut c = TcpStream::connect(amb.addr).await.unwrap();
        c.write_all(&payload).await.unwrap();
        let mut back = vec![0u8; payload.len()];
        c.read_exact(&mut back).await.unwrap();
        assert!(back == payload, "echo through splice corrupted");
        held.push(c);
    }
    // Two sockets per connection, plus a few pooled pipes (two descriptors each).
    let bound = base + 2 * held.len() + 8;
    let fds = eventually("idle connections to give their pipes back", || async {
        let n = open_fds(pid);
        (n >= base + 2 * held.len() && n <= bound).then_some(n)
    })
    .await;
    assert!(
        fds <= bound,
        "{fds} descriptors open, expected at most {bound}"
    );
}

fn open_pipes(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|target| target.to_string_lossy().starts_with("pipe:"))
                .count()
        })
        .unwrap_or(0)
}

/// `--copy auto` (the default) keeps small request/response traffic on the plain copy (no
/// pipe is ever opened) and switches a bulk stream to splice (a pipe is opened and, once
/// the stream drains, kept in the pool).
#[tokio::test(flavor = "multi_thread")]
async fn auto_splices_bulk_streams_only() {
    let backend = integrity_backend().await;
    let amb = Ambassador::on_loopback(&[&backend.addr.to_string()]);
    let pid = amb.pid();
    let before = open_pipes(pid);
    for seed in 0..20 {
        integrity_exchange(amb.addr, 100 + seed, 1000).await;
    }
    assert_eq!(open_pipes(pid), before, "small exchanges opened a pipe");
    integrity_exchange(amb.addr, 200, 8 << 20).await;
    assert!(
        open_pipes(pid) > before,
        "an 8 MB stream was not moved with splice"
    );
}
