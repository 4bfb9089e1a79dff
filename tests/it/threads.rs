//! The data threads (`--threads`): every thread's SO_REUSEPORT socket of a route is
//! accepted on, a route's sockets all close together (reload, shutdown), and the shared
//! port stays closed to a second ambassadord.

use std::net::SocketAddr;
use std::time::Duration;

use crate::support::etcd::free_port;
use crate::support::{Ambassador, DEADLINE, eventually, integrity_exchange, run_to_exit};
use tokio::net::TcpStream;

/// Connections the kernel spreads over a route's sockets: enough that each of 4
/// threads' sockets gets some (the spread is by a hash of the client's port).
const SPREAD: usize = 64;

/// With 4 data threads on port 0, all 4 sockets share one port and every connection
/// is served: a thread whose socket were bound but not accepted on would leave its
/// share of the connections hanging in its backlog, and this test would time out.
#[tokio::test(flavor = "multi_thread")]
async fn every_data_thread_accepts_its_share_of_connections() {
    let backend = crate::support::integrity_backend().await;
    let amb = Ambassador::start(&[
        "--threads",
        "4",
        "--bind",
        "127.0.0.1",
        "--port",
        "0",
        &backend.addr.to_string(),
    ]);
    let exchanges = (0..SPREAD).map(|i| integrity_exchange(amb.addr, i as u64, 4096));
    tokio::time::timeout(DEADLINE, futures_util::future::join_all(exchanges))
        .await
        .expect("every connection through 4 data threads is served");
}

/// A second ambassadord asked for a port the first one listens on fails to start,
/// naming the address, instead of silently sharing the port through SO_REUSEPORT;
/// the first one keeps serving.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_ambassadord_on_the_same_port_is_refused() {
    let backend = crate::support::integrity_backend().await;
    let first = Ambassador::start(&[
        "--threads",
        "2",
        "--bind",
        "127.0.0.1",
        "--port",
        "0",
        &backend.addr.to_string(),
    ]);
    let port = first.addr.port().to_string();
    let (code, stderr) = run_to_exit(
        &[
            "--threads",
            "2",
            "--admin",
            "off",
            "--bind",
            "127.0.0.1",
            "--port",
            &port,
            &backend.addr.to_string(),
        ],
        &[],
    );
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{stderr}"
    );
    integrity_exchange(first.addr, 1, 4096).await;
}

/// Whether every one of `SPREAD` fresh connections to `addr` is refused (a connect that
/// neither succeeds nor fails at once means a socket still listens with a full backlog).
async fn all_refused(addr: SocketAddr) -> bool {
    for _ in 0..SPREAD {
        match tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr)).await {
            Ok(Err(_)) => {}
            Ok(Ok(_)) | Err(_) => return false,
        }
    }
    true
}

/// A route removed by a reload stops accepting on every data thread's socket: soon no
/// connection attempt at all succeeds (one left-over socket would take its share),
/// while the route that stays keeps serving on all of them.
#[tokio::test(flavor = "multi_thread")]
async fn a_removed_route_closes_every_threads_socket() {
    let backend = crate::support::integrity_backend().await;
    let (kept, removed) = (free_port(), free_port());
    let route = |port: u16| {
        format!(
            "\n[[route]]\nlisten = \"127.0.0.1:{port}\"\nbackend = \"{}\"\n",
            backend.addr
        )
    };
    let dir = std::env::temp_dir().join(format!("ambassadord-threads-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("routes.toml");
    std::fs::write(&file, route(kept) + &route(removed)).unwrap();
    let mut amb = Ambassador::start(&[
        "--threads",
        "4",
        "--admin",
        "off",
        "--config",
        file.to_str().unwrap(),
    ]);
    let kept: SocketAddr = ([127, 0, 0, 1], kept).into();
    let removed: SocketAddr = ([127, 0, 0, 1], removed).into();
    tokio::time::timeout(DEADLINE, integrity_exchange(removed, 1, 4096))
        .await
        .expect("the route to be removed serves before the reload");

    std::fs::write(&file, route(kept.port())).unwrap();
    amb.signal("HUP");
    amb.wait_for_log("configuration reloaded");
    eventually("every socket of the removed route to close", || async {
        all_refused(removed).await.then_some(())
    })
    .await;
    let exchanges = (0..SPREAD).map(|i| integrity_exchange(kept, i as u64, 4096));
    tokio::time::timeout(DEADLINE, futures_util::future::join_all(exchanges))
        .await
        .expect("the kept route serves on every data thread");
}

/// `--threads` takes a count from 1 up; anything else is bad usage naming the flag.
#[test]
fn threads_must_be_a_positive_count() {
    for bad in ["0", "many", "1025"] {
        let (code, stderr) = run_to_exit(&["--threads", bad, "127.0.0.1:9"], &[]);
        assert_eq!(code, 64, "--threads {bad}: {stderr}");
        assert!(stderr.contains("--threads"), "--threads {bad}: {stderr}");
    }
    let (code, stderr) = run_to_exit(&["127.0.0.1:9"], &[("AMBASSADORD_THREADS", "0")]);
    assert_eq!(code, 64, "AMBASSADORD_THREADS=0: {stderr}");
}
