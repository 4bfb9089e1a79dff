//! Faults and scale: what the proxy does when it runs out of its own resources, when a
//! side aborts, when a backend set is large, and when what it is told is hostile.

use tokio::net::TcpStream;

use crate::support::*;

/// Running out of descriptors is the proxy's own shortage, not the backend's: a connect
/// that fails with EMFILE is refused with a line that says so and counted as
/// `local_resources` with no backend, and the backend is not put in cool-down (it
/// still shows `up` once descriptors are free, and is never blamed in the log).
#[tokio::test(flavor = "multi_thread")]
async fn descriptor_exhaustion_is_not_blamed_on_the_backend() {
    let backend = named_backend("127.0.0.1:0", "b").await;
    let script = format!(
        "ulimit -n 40 && exec {} --bind 127.0.0.1 --port 0 --admin 127.0.0.1:0 {}",
        env!("CARGO_BIN_EXE_ambassadord"),
        backend.addr
    );
    let mut amb = Ambassador::start_with_shell(&script);
    let admin_addr = amb.admin_addr();
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
    assert_eq!(served_by(amb.addr).await.as_deref(), Some("b"));
}
