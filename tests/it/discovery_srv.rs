//! DNS SRV discovery end to end: a real dnsmasq on loopback answers, the real binary
//! (`--dns 127.0.0.1:PORT`) forwards to named backends on 127.0.0.x.

use std::collections::HashMap;
use std::net::SocketAddr;

use crate::support::dnsmasq::{Dnsmasq, udp_query};
use crate::support::*;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// dnsmasq answers names under amb.test only from its config: NXDOMAIN for the rest.
const ZONE: &str = "local=/amb.test/\n";

fn srv(name: &str, target: &str, port: u16, priority: u16, weight: u16) -> String {
    format!("srv-host={name},{target},{port},{priority},{weight}\n")
}

fn host(name: &str, ip: &str) -> String {
    format!("host-record={name},{ip}\n")
}

fn start_ambassador(dns: &Dnsmasq, name: &str) -> Ambassador {
    Ambassador::start(&[
        "--dns",
        &dns.addr(),
        "--bind",
        "127.0.0.1",
        "--port",
        "0",
        name,
    ])
}

/// A connection is accepted (the listener is up) and then closed at once without any
/// backend's answer: what a refused connection looks like to the client.
async fn assert_refused(proxy: SocketAddr) {
    let mut s = TcpStream::connect(proxy)
        .await
        .expect("the listener stays up");
    let mut buf = Vec::new();
    let read = tokio::time::timeout(DEADLINE, s.read_to_end(&mut buf))
        .await
        .expect("a refused connection is closed at once, not held open");
    assert!(
        read.is_err() || buf.is_empty(),
        "expected a refusal, got {:?}",
        String::from_utf8_lossy(&buf)
    );
}

/// Priorities and weights from the SRV records reach the balancer: every connection goes
/// to the lowest-priority tier, split by weight (90:10, not round robin), the higher tier
/// gets nothing while the lower one lives; when the lower tier's backends die,
/// connections fail over to the next tier.
#[tokio::test(flavor = "multi_thread")]
async fn lowest_priority_tier_is_used_by_weight_and_fails_over_to_the_next() {
    let heavy = named_backend("127.0.0.2:0", "heavy").await;
    let light = named_backend("127.0.0.3:0", "light").await;
    let backup = named_backend("127.0.0.4:0", "backup").await;
    let config = [
        ZONE.to_string(),
        "local-ttl=1\n".into(),
        srv("web.amb.test", "heavy.amb.test", heavy.addr.port(), 10, 90),
        srv("web.amb.test", "light.amb.test", light.addr.port(), 10, 10),
        srv(
            "web.amb.test",
            "backup.amb.test",
            backup.addr.port(),
            20,
            50,
        ),
        host("heavy.amb.test", "127.0.0.2"),
        host("light.amb.test", "127.0.0.3"),
        host("backup.amb.test", "127.0.0.4"),
    ]
    .concat();
    let dns = Dnsmasq::start(&config);
    let amb = start_ambassador(&dns, "web.amb.test");
    eventually("the first connection served", || served_by(amb.addr)).await;

    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..200 {
        let name = served_by(amb.addr).await.expect("every connection served");
        *counts.entry(name).or_default() += 1;
    }
    let count = |n: &str| counts.get(n).copied().unwrap_or(0);
    assert_eq!(
        count("backup"),
        0,
        "the priority-20 tier is only a fallback: {counts:?}"
    );
    // Expected about 180:20. Round robin would give 100:100; a light count of 0 has a
    // probability near 1e-9.
    assert!(
        count("heavy") > 3 * count("light") && count("light") > 0,
        "weights 90:10 not followed: {counts:?}"
    );

    heavy.kill();
    light.kill();
    until_served_by(amb.addr, "backup").await;
    for _ in 0..10 {
        assert_eq!(served_by(amb.addr).await.as_deref(), Some("backup"));
    }
}

/// A target's address is taken from the answer's additional section when dnsmasq puts
/// it there (host-record: never queried separately), and otherwise looked up with its
/// own query (address=: not in the additional section); both targets serve.
#[tokio::test(flavor = "multi_thread")]
async fn target_addresses_come_from_the_additional_section_or_a_separate_query() {
    let inline = named_backend("127.0.0.2:0", "inline").await;
    let separate = named_backend("127.0.0.3:0", "separate").await;
    let config = [
        ZONE.to_string(),
        "local-ttl=1\n".into(),
        srv("web.amb.test", "inline.amb.test", inline.addr.port(), 0, 1),
        srv(
            "web.amb.test",
            "separate.amb.test",
            separate.addr.port(),
            0,
            1,
        ),
        host("inline.amb.test", "127.0.0.2"),
        "address=/separate.amb.test/127.0.0.3\n".into(),
    ]
    .concat();
    let dns = Dnsmasq::start(&config);
    let amb = start_ambassador(&dns, "web.amb.test");
    until_served_by(amb.addr, "inline").await;
    until_served_by(amb.addr, "separate").await;

    assert!(
        dns.count_log("query[A] separate.amb.test") >= 1,
        "the target missing from the additional section is queried: {:#?}",
        dns.log()
    );
    let inline_queries =
        dns.count_log("query[A] inline.amb.test") + dns.count_log("query[AAAA] inline.amb.test");
    assert_eq!(
        inline_queries,
        0,
        "the additional section's address is used, not queried: {:#?}",
        dns.log()
    );
}

/// A name that does not exist (NXDOMAIN): the listener stays up, connections are refused
/// at once, the name is asked again every few seconds, and the reason is logged once,
/// not once per connection nor once per re-query.
#[tokio::test(flavor = "multi_thread")]
async fn missing_name_is_refused_at_once_and_the_reason_logged_once() {
    let dns = Dnsmasq::start(&format!("{ZONE}{}", host("other.amb.test", "127.0.0.2")));
    let mut amb = start_ambassador(&dns, "missing.amb.test");
    let why = amb.wait_for_log("does not exist (NXDOMAIN)");
    assert!(why.contains("'missing.amb.test'"), "{why}");
    for _ in 0..5 {
        assert_refused(amb.addr).await;
    }
    // Two re-queries after the first read: the reason must not be repeated for them.
    eventually("two re-queries of the missing name", || async {
        (dns.count_log("query[SRV] missing.amb.test") >= 3).then_some(())
    })
    .await;
    for _ in 0..5 {
        assert_refused(amb.addr).await;
    }
    assert_eq!(
        amb.count_log("does not exist (NXDOMAIN)"),
        1,
        "{:#?}",
        amb.log()
    );
}

/// A name that exists but has no SRV records (NODATA) is a definitive empty answer too:
/// connections are refused at once and the log says NODATA.
#[tokio::test(flavor = "multi_thread")]
async fn name_without_srv_records_is_refused_and_says_nodata() {
    let dns = Dnsmasq::start(&format!("{ZONE}{}", host("plain.amb.test", "127.0.0.2")));
    let mut amb = start_ambassador(&dns, "plain.amb.test");
    let why = amb.wait_for_log("has no SRV records (NODATA)");
    assert!(why.contains("'plain.amb.test'"), "{why}");
    assert_refused(amb.addr).await;
}

/// Records that appear after the ambassador started (dnsmasq restarted on the same port
/// with the name added) are picked up by the short re-query, and connections succeed.
#[tokio::test(flavor = "multi_thread")]
async fn name_that_appears_later_starts_serving() {
    let late = named_backend("127.0.0.2:0", "late").await;
    let mut dns = Dnsmasq::start(ZONE);
    let mut amb = start_ambassador(&dns, "late.amb.test");
    amb.wait_for_log("does not exist (NXDOMAIN)");
    assert_refused(amb.addr).await;

    let config = [
        ZONE.to_string(),
        srv("late.amb.test", "b.amb.test", late.addr.port(), 0, 1),
        host("b.amb.test", "127.0.0.2"),
    ]
    .concat();
    dns.restart(&config);
    until_served_by(amb.addr, "late").await;
    let changed = amb.wait_for_log(&format!("added={}", late.addr));
    assert!(changed.contains("backends changed"), "{changed}");
}

/// When the records' TTL runs out the name is read again in the background, with no
/// connection needed to trigger it, and a changed target replaces the old one.
#[tokio::test(flavor = "multi_thread")]
async fn changed_records_are_read_again_after_their_ttl() {
    let first = named_backend("127.0.0.2:0", "first").await;
    let second = named_backend("127.0.0.3:0", "second").await;
    let config = |port: u16, ip: &str| {
        [
            ZONE.to_string(),
            "local-ttl=1\n".into(),
            srv("web.amb.test", "b.amb.test", port, 0, 1),
            host("b.amb.test", ip),
        ]
        .concat()
    };
    let mut dns = Dnsmasq::start(&config(first.addr.port(), "127.0.0.2"));
    let mut amb = start_ambassador(&dns, "web.amb.test");
    until_served_by(amb.addr, "first").await;

    dns.restart(&config(second.addr.port(), "127.0.0.3"));
    let changed = amb.wait_for_log(&second.addr.to_string());
    assert!(changed.contains("backends changed"), "{changed}");
    // The line says what changed: the new target in, the old one out.
    assert_eq!(
        field(&changed, "added"),
        Some(second.addr.to_string()),
        "{changed}"
    );
    assert_eq!(
        field(&changed, "removed"),
        Some(first.addr.to_string()),
        "{changed}"
    );
    assert_eq!(served_by(amb.addr).await.as_deref(), Some("second"));
}

/// The answer is cached for its TTL (300 s here): 20 connections cause no SRV query
/// beyond the first read.
#[tokio::test(flavor = "multi_thread")]
async fn answer_is_cached_for_its_ttl_not_queried_per_connection() {
    let b = named_backend("127.0.0.2:0", "cached").await;
    let config = [
        ZONE.to_string(),
        "local-ttl=300\n".into(),
        srv("web.amb.test", "b.amb.test", b.addr.port(), 0, 1),
        host("b.amb.test", "127.0.0.2"),
    ]
    .concat();
    let dns = Dnsmasq::start(&config);
    let amb = start_ambassador(&dns, "web.amb.test");
    until_served_by(amb.addr, "cached").await;
    for _ in 0..20 {
        assert_eq!(served_by(amb.addr).await.as_deref(), Some("cached"));
    }
    assert_eq!(
        dns.count_log("query[SRV] web.amb.test"),
        1,
        "{:#?}",
        dns.log()
    );
}

/// An answer too large for a UDP datagram (120 SRV records plus their addresses, about
/// 6.7 kB) comes back truncated over UDP, as the raw query shows; the ambassador still
/// gets every record, which only a TCP retry can deliver.
#[tokio::test(flavor = "multi_thread")]
async fn truncated_udp_answer_is_retried_over_tcp_and_every_record_arrives() {
    let live = named_backend("127.0.0.2:0", "live").await;
    let mut config = format!("{ZONE}local-ttl=300\n");
    // 119 records at priority 1 on addresses where nothing listens, and the live one at
    // priority 0, last in the file.
    for i in 1..=119u16 {
        config += &srv(
            "big.amb.test",
            &format!("dead-{i:03}.amb.test"),
            9000 + i,
            1,
            1,
        );
        config += &host(&format!("dead-{i:03}.amb.test"), &format!("127.0.1.{i}"));
    }
    config += &srv("big.amb.test", "live.amb.test", live.addr.port(), 0, 1);
    config += &host("live.amb.test", "127.0.0.2");
    let dns = Dnsmasq::start(&config);

    // hickory advertises 1232 bytes with EDNS0; the answer does not fit.
    let udp = udp_query(&dns.addr(), "big.amb.test", 33, 1232);
    assert!(udp.truncated, "the UDP answer must be truncated: {udp:?}");
    assert!(udp.answers < 120, "{udp:?}");
    // It was cut to fit the datagram the query offered.
    assert!(udp.len <= 1232, "{udp:?}");

    let mut amb = start_ambassador(&dns, "big.amb.test");
    let changed = amb.wait_for_log("backends changed");
    // Every record arrives: 119 dead targets and the live one (the line names only
    // the first few it added, and counts them all).
    assert_eq!(
        field(&changed, "endpoints").as_deref(),
        Some("120"),
        "{changed}"
    );
    until_served_by(amb.addr, "live").await;
}

/// Malformed records (port 0, target "." next to real ones) and a target that does not
/// resolve are skipped, each with one warning naming the SRV name and the record, not
/// one per re-read; the good record keeps serving.
#[tokio::test(flavor = "multi_thread")]
async fn malformed_records_are_skipped_with_one_warning_and_the_good_one_serves() {
    let good = named_backend("127.0.0.2:0", "good").await;
    let config = [
        ZONE.to_string(),
        "local-ttl=1\n".into(),
        srv("web.amb.test", "good.amb.test", good.addr.port(), 0, 1),
        srv("web.amb.test", "zero.amb.test", 0, 0, 1),
        "srv-host=web.amb.test\n".into(),
        srv("web.amb.test", "ghost.amb.test", 8080, 0, 1),
        host("good.amb.test", "127.0.0.2"),
        host("zero.amb.test", "127.0.0.3"),
    ]
    .concat();
    let dns = Dnsmasq::start(&config);
    let mut amb = start_ambassador(&dns, "web.amb.test");
    until_served_by(amb.addr, "good").await;
    for _ in 0..5 {
        assert_eq!(served_by(amb.addr).await.as_deref(), Some("good"));
    }

    let port0 = amb.wait_for_log("has port 0");
    assert!(
        port0.contains("'web.amb.test'") && port0.contains("0 zero.amb.test."),
        "{port0}"
    );
    amb.wait_for_log("has target '.'");
    let ghost = amb.wait_for_log("'ghost.amb.test' does not exist");
    assert!(ghost.contains("'web.amb.test'"), "{ghost}");

    // The TTL is 1 s: wait for two more reads, then each warning is still there once.
    eventually("two re-reads", || async {
        (dns.count_log("query[SRV] web.amb.test") >= 3).then_some(())
    })
    .await;
    for needle in [
        "has port 0",
        "has target '.'",
        "'ghost.amb.test' does not exist",
    ] {
        assert_eq!(amb.count_log(needle), 1, "{needle}: {:#?}", amb.log());
    }
}

/// When the DNS server goes away the lookups fail, which is not an empty answer: the
/// last good set keeps serving and the log says so, within seconds of the outage.
#[tokio::test(flavor = "multi_thread")]
async fn dns_server_down_keeps_the_last_good_set_and_is_reported_within_seconds() {
    let b = named_backend("127.0.0.2:0", "kept").await;
    let config = [
        ZONE.to_string(),
        "local-ttl=1\n".into(),
        srv("web.amb.test", "b.amb.test", b.addr.port(), 0, 1),
        host("b.amb.test", "127.0.0.2"),
    ]
    .concat();
    let mut dns = Dnsmasq::start(&config);
    let mut amb = start_ambassador(&dns, "web.amb.test");
    until_served_by(amb.addr, "kept").await;
    let stopped = std::time::Instant::now();
    dns.stop();
    let failed = amb.wait_for_log("discovery failed");
    // Within seconds: the next read after the 1 s TTL, and --dns's 2 s x 2 query
    // timeout (hickory's default 5 s x 2 plus TCP took about 15 s).
    let took = stopped.elapsed();
    println!(
        "DNS outage reported {:.1} s after the server stopped",
        took.as_secs_f64()
    );
    assert!(
        took < std::time::Duration::from_secs(10),
        "reported after {took:?}"
    );
    assert!(failed.contains("keeping the last good set"), "{failed}");
    assert!(failed.contains("web.amb.test"), "{failed}");
    assert_eq!(served_by(amb.addr).await.as_deref(), Some("kept"));
}

/// The next read is scheduled from the answer's TTLs (the smallest of the SRV records'
/// and the addresses'), clamped to the 1 s floor and the 300 s ceiling, and an empty
/// answer is asked again after the short re-query period. Drives the source directly
/// against dnsmasq to read its schedule, not a clock.
#[tokio::test(flavor = "multi_thread")]
async fn next_read_follows_the_ttl_within_floor_and_ceiling() {
    use ambassadord::discovery::Source;
    use ambassadord::discovery::dns::{MAX_REFRESH, MIN_REFRESH, Resolver};
    use ambassadord::discovery::srv::{EMPTY_REQUERY, SrvSource};
    use std::time::Duration;

    // SRV records live 600 s; each target's address record has its own TTL.
    let mut config = format!("{ZONE}local-ttl=600\n");
    for (name, ttl) in [("long", 900), ("mid", 120), ("zero", 0)] {
        config += &srv(
            &format!("{name}.amb.test"),
            &format!("t-{name}.amb.test"),
            80,
            0,
            1,
        );
        config += &format!("host-record=t-{name}.amb.test,127.0.0.2,{ttl}\n");
    }
    let dns = Dnsmasq::start(&config);
    let resolver = Resolver::with_nameserver(dns.addr().parse().unwrap());
    let cases = [
        ("long.amb.test", MAX_REFRESH),
        ("mid.amb.test", Duration::from_secs(120)),
        ("zero.amb.test", MIN_REFRESH),
        ("missing.amb.test", EMPTY_REQUERY),
    ];
    for (name, want) in cases {
        let mut source = SrvSource::new(name.to_string(), resolver.clone());
        let set = source.next().await.expect("a definitive answer");
        assert_eq!(set.is_empty(), name.starts_with("missing"), "{name}: {set}");
        let after = source
            .next_read()
            .expect("a next read is scheduled")
            .saturating_duration_since(tokio::time::Instant::now());
        assert!(
            after <= want && after + Duration::from_secs(5) >= want,
            "{name}: next read in {after:?}, want about {want:?}"
        );
    }
}

/// A host name that does not resolve is reported in one clean line naming the name and
/// both record types asked for, not hickory's debug dump of one of its queries.
#[tokio::test(flavor = "multi_thread")]
async fn a_name_that_does_not_resolve_is_named_in_one_clean_line() {
    let dns = Dnsmasq::start(ZONE);
    let mut amb = Ambassador::on_loopback(&["--dns", &dns.addr(), "nosuch.amb.test:80"]);
    let line = amb.wait_for_log("discovery failed");
    assert!(
        line.contains(
            "cannot resolve 'nosuch.amb.test': no such name (NXDOMAIN; asked for A and AAAA)"
        ),
        "{line}"
    );
    assert!(!line.contains("Query {"), "{line}");
}
