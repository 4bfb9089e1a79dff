//! Consul discovery against the Consul emulator (tests/support/consul.rs): the
//! emulator's own behaviour (KV and catalog), the source's blocking-query loop, and the
//! real binary following keys and a service's passing instances as they change, lose
//! their store and come back.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::support::consul::{ConsulEmulator, http};
use crate::support::*;
use ambassadord::discovery::Source;
use ambassadord::discovery::consul::ConsulSource;
use ambassadord::discovery::dns::Resolver;
use ambassadord::spec::{KvSpec, ServiceSpec, Spec};

/// The source's next list of `len` backends (as text), waiting past shorter ones;
/// fails with `what` if none comes.
async fn next_with(source: &mut ConsulSource, len: usize, what: &str) -> String {
    let wait = async {
        loop {
            let list = source.next().await.unwrap();
            if list.0.len() == len {
                return list.to_string();
            }
        }
    };
    tokio::time::timeout(DEADLINE, wait).await.expect(what)
}

fn kv_spec(consul: &ConsulEmulator, path: &str) -> KvSpec {
    match Spec::parse(&consul.url(path)).unwrap() {
        Spec::Consul(kv) => kv,
        other => panic!("not a consul spec: {other:?}"),
    }
}

fn service_spec(consul: &ConsulEmulator, name_and_query: &str) -> ServiceSpec {
    match Spec::parse(&consul.service_url(name_and_query)).unwrap() {
        Spec::ConsulService(s) => s,
        other => panic!("not a consul-service spec: {other:?}"),
    }
}

/// An ambassador on loopback following `consul-service://EMULATOR/<name_and_query>`.
fn start_service_ambassador(
    consul: &ConsulEmulator,
    name_and_query: &str,
    env: &[(&str, &str)],
) -> Ambassador {
    let url = consul.service_url(name_and_query);
    Ambassador::start_with_env(&["--bind", "127.0.0.1", "--port", "0", &url], env)
}

/// How many of `tries` fresh connections through `proxy` each backend greeted ("" for
/// one refused or cut unserved).
async fn greeted(proxy: SocketAddr, tries: usize) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for _ in 0..tries {
        let name = greeting(proxy).await.unwrap_or_default();
        *counts.entry(name).or_insert(0) += 1;
    }
    counts
}

/// Waits until fresh connections through `proxy` are greeted by exactly `want`.
async fn wait_greeted(proxy: SocketAddr, want: &[&str]) {
    let tries = 3 * want.len() + 2;
    eventually(
        &format!("connections greeted by exactly {want:?}"),
        || async move {
            let seen: Vec<String> = greeted(proxy, tries).await.into_keys().collect();
            (seen == want).then_some(())
        },
    )
    .await;
}

fn start_ambassador(consul: &ConsulEmulator, path: &str, env: &[(&str, &str)]) -> Ambassador {
    let url = consul.url(path);
    Ambassador::start_with_env(&["--bind", "127.0.0.1", "--port", "0", &url], env)
}

/// Waits until the ambassador has logged a line containing all of `needles`.
async fn logged(amb: &Ambassador, needles: &[&str]) -> String {
    eventually(&format!("a log line with {needles:?}"), || {
        let found = amb
            .log()
            .into_iter()
            .find(|l| needles.iter().all(|n| l.contains(n)));
        async move { found }
    })
    .await
}

// ---- The emulator itself -------------------------------------------------------------

/// The emulator answers like Consul's KV API: JSON entries with base64 values and their
/// indexes, X-Consul-Index on every read, 404 with X-Consul-Index for a missing prefix,
/// PUT and DELETE ?recurse over HTTP.
#[tokio::test(flavor = "multi_thread")]
async fn emulator_lists_keys_with_indexes_and_404s_a_missing_prefix() {
    let consul = ConsulEmulator::start().await;
    let put = http(consul.addr, "PUT", "/v1/kv/svc/a", None, "10.0.0.1:80").await;
    assert_eq!((put.status, put.body.as_str()), (200, "true"));
    consul.put("svc/b", "10.0.0.2:80");
    consul.put("other", "x");

    let one = http(consul.addr, "GET", "/v1/kv/svc/a", None, "").await;
    assert_eq!(one.status, 200);
    let entries: serde_json::Value = serde_json::from_str(&one.body).unwrap();
    let e = &entries[0];
    assert_eq!(e["Key"], "svc/a");
    assert_eq!(e["Value"], "MTAuMC4wLjE6ODA="); // base64 of 10.0.0.1:80
    assert_eq!(
        (e["CreateIndex"].as_u64(), e["ModifyIndex"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(
        (e["LockIndex"].as_u64(), e["Flags"].as_u64()),
        (Some(0), Some(0))
    );
    assert_eq!(one.index, Some(1), "a key's index is its ModifyIndex");

    let list = http(consul.addr, "GET", "/v1/kv/svc?recurse", None, "").await;
    let keys: Vec<String> = serde_json::from_str::<Vec<serde_json::Value>>(&list.body)
        .unwrap()
        .iter()
        .map(|e| e["Key"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(keys, ["svc/a", "svc/b"]);
    assert_eq!(list.index, Some(2), "a prefix's index is its newest write");

    let missing = http(consul.addr, "GET", "/v1/kv/nothing?recurse", None, "").await;
    assert_eq!((missing.status, missing.index), (404, Some(3)));

    let del = http(consul.addr, "DELETE", "/v1/kv/svc?recurse", None, "").await;
    assert_eq!(del.status, 200);
    let gone = http(consul.addr, "GET", "/v1/kv/svc?recurse", None, "").await;
    assert_eq!(gone.status, 404);
    assert_eq!(
        gone.index,
        Some(4),
        "the delete's tombstones keep the prefix's index"
    );

    let bad = http(consul.addr, "GET", "/v1/kv/svc?index=1&wait=soon", None, "").await;
    assert_eq!((bad.status, bad.body.as_str()), (400, "Invalid wait time"));
}

/// A blocking query is held while nothing under its prefix changes (a write elsewhere
/// does not release it) and is answered by the first write under the prefix, with the
/// new value and index.
#[tokio::test(flavor = "multi_thread")]
async fn emulator_blocking_query_is_held_until_a_write_under_its_prefix() {
    let consul = ConsulEmulator::start().await;
    let index = consul.put("svc/a", "10.0.0.1:80");
    let addr = consul.addr;
    let target = format!("/v1/kv/svc?recurse&index={index}&wait=60s");
    let query = tokio::spawn(async move { http(addr, "GET", &target, None, "").await });
    let c = &consul;
    eventually("the query to be held", || async move {
        (c.waiting() == 1).then_some(())
    })
    .await;

    consul.put("elsewhere", "x");
    // Still held: the write outside the prefix did not answer it (if it had, the reply
    // below would predate the next write and lack its value).
    assert_eq!(consul.waiting(), 1);
    let changed = consul.put("svc/b", "10.0.0.2:80");
    let reply = query.await.unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.index, Some(changed), "{reply:?}");
    assert!(reply.body.contains("svc/b"), "{reply:?}");
    assert_eq!(consul.waiting(), 0);
}

/// When the wait runs out with no change, the query is answered with the same index and
/// data, and not before the wait: a return is no proof of change.
#[tokio::test(flavor = "multi_thread")]
async fn emulator_blocking_query_answers_unchanged_when_the_wait_runs_out() {
    let consul = ConsulEmulator::start().await;
    let index = consul.put("svc/a", "10.0.0.1:80");
    let wait = Duration::from_millis(800);
    let started = Instant::now();
    let reply = http(
        consul.addr,
        "GET",
        &format!("/v1/kv/svc?recurse&index={index}&wait=800ms"),
        None,
        "",
    )
    .await;
    // A lower bound only: the server must not answer early. No upper bound is checked.
    assert!(
        started.elapsed() >= wait,
        "answered after {:?}",
        started.elapsed()
    );
    assert_eq!((reply.status, reply.index), (200, Some(index)));
    assert!(reply.body.contains("svc/a"));
    assert_eq!(consul.answered(), 1);
}

/// With ACLs on, a request without the token or with a wrong one is refused with 403.
#[tokio::test(flavor = "multi_thread")]
async fn emulator_needs_the_token_when_acls_are_on() {
    let consul = ConsulEmulator::start_with_token("s3cret").await;
    consul.put("svc/a", "10.0.0.1:80");
    let none = http(consul.addr, "GET", "/v1/kv/svc?recurse", None, "").await;
    assert_eq!(none.status, 403);
    assert!(none.body.contains("Permission denied"), "{none:?}");
    let wrong = http(consul.addr, "GET", "/v1/kv/svc?recurse", Some("nope"), "").await;
    assert_eq!(wrong.status, 403);
    let right = http(consul.addr, "GET", "/v1/kv/svc?recurse", Some("s3cret"), "").await;
    assert_eq!(right.status, 200);
}

/// Stopped, the port refuses; restarted, the same port serves the same data; a restore
/// lowers the index and answers a held query at once with it.
#[tokio::test(flavor = "multi_thread")]
async fn emulator_restarts_on_the_same_port_and_restore_lowers_the_index() {
    let consul = ConsulEmulator::start().await;
    for i in 0..5 {
        consul.put("svc/a", &format!("10.0.0.{i}:80"));
    }
    consul.stop().await;
    assert!(tokio::net::TcpStream::connect(consul.addr).await.is_err());
    consul.restart().await;
    let again = http(consul.addr, "GET", "/v1/kv/svc?recurse", None, "").await;
    assert_eq!((again.status, again.index), (200, Some(5)));

    let addr = consul.addr;
    let query = tokio::spawn(async move {
        http(addr, "GET", "/v1/kv/svc?recurse&index=5&wait=60s", None, "").await
    });
    let c = &consul;
    eventually("the query to be held", || async move {
        (c.waiting() == 1).then_some(())
    })
    .await;
    consul.restore(2);
    let reply = query.await.unwrap();
    assert_eq!(reply.index, Some(2), "{reply:?}");

    consul.restart_with_index(1).await;
    let low = http(consul.addr, "GET", "/v1/kv/svc?recurse", None, "").await;
    assert_eq!((low.status, low.index), (200, Some(1)));
}

// ---- The emulator's catalog ----------------------------------------------------------

/// The nodes and instance IDs a health reply lists, in order.
fn listed(reply: &crate::support::consul::HttpReply) -> Vec<String> {
    assert_eq!(reply.status, 200, "{reply:?}");
    reply
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{}/{}",
                e["Node"]["Node"].as_str().unwrap(),
                e["Service"]["ID"].as_str().unwrap()
            )
        })
        .collect()
}

async fn put_json(
    consul: &ConsulEmulator,
    path: &str,
    body: serde_json::Value,
) -> crate::support::consul::HttpReply {
    http(consul.addr, "PUT", path, None, &body.to_string()).await
}

/// Registration over HTTP as Consul's catalog takes it, and the health endpoint's
/// filters: every instance without `passing`; with it, only those whose every check
/// (their own and their node's) passes, an instance with no checks included; `tag`
/// (repeatable, any case) and the service name in any case; an unknown service is
/// `200 []`; `dc` picks a datacenter, an unknown one is a 500.
#[tokio::test(flavor = "multi_thread")]
async fn emulator_health_lists_instances_by_checks_tags_and_datacenter() {
    let consul = ConsulEmulator::start().await;
    let ok = put_json(
        &consul,
        "/v1/catalog/register",
        serde_json::json!({
            "Node": "n1", "Address": "10.0.0.1",
            "Service": {"ID": "redis-1", "Service": "redis", "Tags": ["primary", "v1"], "Port": 6379},
            "Check": {"CheckID": "service:redis-1", "Name": "ping", "Status": "passing", "ServiceID": "redis-1"},
        }),
    )
    .await;
    assert_eq!((ok.status, ok.body.as_str()), (200, "true"));
    consul.register(
        "n2",
        "10.0.0.2",
        "redis-2",
        "redis",
        6380,
        &["v1"],
        "critical",
    );
    // No checks at all; Go decodes keys in any case.
    let ok = put_json(
        &consul,
        "/v1/catalog/register",
        serde_json::json!({"node": "n3", "address": "10.0.0.3", "service": {"service": "redis", "port": 6381}}),
    )
    .await;
    assert_eq!(ok.status, 200, "{ok:?}");
    // Its own check passes, its node's does not.
    consul.register(
        "n4",
        "10.0.0.4",
        "redis-4",
        "redis",
        6382,
        &["v1"],
        "passing",
    );
    let ok = put_json(
        &consul,
        "/v1/catalog/register",
        serde_json::json!({"Node": "n4", "Address": "10.0.0.4",
            "Checks": [{"CheckID": "serfHealth", "Name": "Serf Health Status", "Status": "critical"}]}),
    )
    .await;
    assert_eq!(ok.status, 200, "{ok:?}");
    consul.register("n5", "10.0.0.5", "web-1", "web", 80, &[], "passing");

    let all = http(consul.addr, "GET", "/v1/health/service/redis", None, "").await;
    assert_eq!(
        listed(&all),
        ["n1/redis-1", "n2/redis-2", "n3/redis", "n4/redis-4"]
    );
    let first = &all.json()[0];
    assert_eq!(first["Node"]["Address"], "10.0.0.1");
    assert_eq!(first["Node"]["Datacenter"], "dc1");
    assert_eq!(first["Service"]["Service"], "redis");
    assert_eq!(first["Service"]["Port"], 6379);
    assert_eq!(first["Service"]["Address"], "");
    assert_eq!(
        first["Service"]["Tags"],
        serde_json::json!(["primary", "v1"])
    );
    assert_eq!(first["Checks"][0]["Status"], "passing");
    assert_eq!(first["Checks"][0]["ServiceName"], "redis");
    let n4 = &all.json()[3];
    let checks: Vec<&str> = n4["Checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["CheckID"].as_str().unwrap())
        .collect();
    assert_eq!(
        checks,
        ["serfHealth", "service:redis-4"],
        "a node check is every instance's"
    );
    assert_eq!(n4["Checks"][0]["ServiceID"], "");
    assert_eq!(all.json()[2]["Checks"], serde_json::json!([]));

    let get = |target: &'static str| http(consul.addr, "GET", target, None, "");
    assert_eq!(
        listed(&get("/v1/health/service/redis?passing").await),
        ["n1/redis-1", "n3/redis"]
    );
    assert_eq!(
        listed(&get("/v1/health/service/redis?passing=true").await),
        ["n1/redis-1", "n3/redis"]
    );
    assert_eq!(
        listed(&get("/v1/health/service/redis?passing=false").await).len(),
        4
    );
    assert_eq!(
        listed(&get("/v1/health/service/redis?passing&tag=v1").await),
        ["n1/redis-1"]
    );
    assert_eq!(
        listed(&get("/v1/health/service/redis?tag=V1").await),
        ["n1/redis-1", "n2/redis-2", "n4/redis-4"]
    );
    assert_eq!(
        listed(&get("/v1/health/service/redis?tag=v1&tag=primary").await),
        ["n1/redis-1"]
    );
    assert_eq!(
        listed(&get("/v1/health/service/REDIS?passing").await),
        ["n1/redis-1", "n3/redis"]
    );
    let unknown = get("/v1/health/service/nothing?passing").await;
    assert_eq!((unknown.status, unknown.body.as_str()), (200, "[]"));
    assert!(unknown.index.is_some(), "{unknown:?}");
    let bad = get("/v1/health/service/redis?passing=maybe").await;
    assert_eq!(
        (bad.status, bad.body.as_str()),
        (400, "Invalid value for ?passing")
    );

    let nowhere = get("/v1/health/service/redis?dc=dc2").await;
    assert_eq!(
        (nowhere.status, nowhere.body.as_str(), nowhere.index),
        (500, "No path to datacenter", None)
    );
    let refused = put_json(
        &consul,
        "/v1/catalog/register",
        serde_json::json!({"Datacenter": "dc2", "Node": "m1", "Address": "10.1.0.1",
            "Service": {"Service": "redis", "Port": 6379}}),
    )
    .await;
    assert_eq!(
        (refused.status, refused.body.as_str()),
        (500, "No path to datacenter")
    );
    consul.add_datacenter("dc2");
    let ok = put_json(
        &consul,
        "/v1/catalog/register",
        serde_json::json!({"Datacenter": "dc2", "Node": "m1", "Address": "10.1.0.1",
            "Service": {"Service": "redis", "Port": 6379}}),
    )
    .await;
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(
        listed(&get("/v1/health/service/redis?dc=dc2").await),
        ["m1/redis"]
    );
    assert_eq!(
        listed(&get("/v1/health/service/redis?dc=dc1&passing").await),
        ["n1/redis-1", "n3/redis"]
    );
}

/// Registrations Consul refuses are refused with its message, and change nothing.
#[tokio::test(flavor = "multi_thread")]
async fn emulator_refuses_what_consul_refuses() {
    let consul = ConsulEmulator::start().await;
    consul.register("n1", "10.0.0.1", "redis-1", "redis", 6379, &[], "passing");
    let before = (consul.index(), consul.service_index("redis"));
    for (body, why) in [
        (
            serde_json::json!({"Address": "10.0.0.9"}),
            "Must provide node",
        ),
        (
            serde_json::json!({"Node": "n9", "Service": {"Service": "redis", "Port": 1}}),
            "Must provide address if SkipNodeUpdate is not set",
        ),
        (
            serde_json::json!({"Node": "n1", "Address": "10.0.0.1", "Service": {"ID": "x", "Port": 1}}),
            "Must provide service name with ID",
        ),
        (
            serde_json::json!({"Node": "n1", "Address": "10.0.0.1",
                "Check": {"CheckID": "c", "Status": "passing", "ServiceID": "nope"}}),
            "Missing service registration",
        ),
    ] {
        let r = put_json(&consul, "/v1/catalog/register", body.clone()).await;
        assert_eq!((r.status, r.body.as_str()), (500, why), "{body}");
    }
    let get = http(consul.addr, "GET", "/v1/catalog/register", None, "").await;
    assert_eq!(get.status, 405);
    let garbled = http(
        consul.addr,
        "PUT",
        "/v1/catalog/register",
        None,
        "{not json",
    )
    .await;
    assert_eq!(garbled.status, 400);
    assert!(
        garbled.body.starts_with("Request decode failed"),
        "{garbled:?}"
    );
    assert_eq!((consul.index(), consul.service_index("redis")), before);
}

/// The health endpoint's index is the service's own: it moves with a change to one of
/// its instances or their checks, not with another service's write nor with a write
/// that changes nothing. A blocking query is held until it moves. When the last
/// instance goes, the index is that removal's (and never goes backwards); an unknown
/// service that never existed answers the catalog's index.
#[tokio::test(flavor = "multi_thread")]
async fn emulator_health_index_is_the_services_own_and_blocks_on_it() {
    let consul = ConsulEmulator::start().await;
    let registered = consul.register("n1", "10.0.0.1", "redis-1", "redis", 6379, &[], "critical");
    let web = consul.register("n2", "10.0.0.2", "web-1", "web", 80, &[], "passing");
    assert!(web > registered);
    assert_eq!(consul.service_index("redis"), registered);
    assert_eq!(
        consul.service_index("never-was"),
        web,
        "the catalog's index"
    );
    // The same registration again takes a raft index but changes nothing.
    let again = consul.register("n1", "10.0.0.1", "redis-1", "redis", 6379, &[], "critical");
    assert!(again > web);
    assert_eq!(consul.service_index("redis"), registered);

    let addr = consul.addr;
    let target = format!("/v1/health/service/redis?passing&index={registered}&wait=60s");
    let query = tokio::spawn(async move { http(addr, "GET", &target, None, "").await });
    let c = &consul;
    eventually("the query to be held", || async move {
        (c.waiting() == 1).then_some(())
    })
    .await;
    consul.register("n2", "10.0.0.2", "web-2", "web", 81, &[], "passing");
    // Still held: another service's write did not answer it (if it had, the reply below
    // would have the old index and no instance).
    assert_eq!(consul.waiting(), 1);
    let passing = consul.set_check_status("n1", "service:redis-1", "passing");
    let reply = query.await.unwrap();
    assert_eq!(reply.index, Some(passing), "{reply:?}");
    assert_eq!(listed(&reply), ["n1/redis-1"]);

    let moved = consul.register("n1", "10.0.0.9", "other", "other", 1, &[], "passing");
    assert_eq!(
        consul.service_index("redis"),
        moved,
        "the node's address changed"
    );
    let gone = consul.deregister("n1", Some("redis-1"));
    assert_eq!(consul.service_index("redis"), gone);
    assert_eq!(
        consul.service_index("never-was"),
        gone,
        "the last extinction"
    );
    let empty = http(consul.addr, "GET", "/v1/health/service/redis", None, "").await;
    assert_eq!((empty.index, empty.body.as_str()), (Some(gone), "[]"));
    consul.deregister("n2", None);
    assert_eq!(
        http(consul.addr, "GET", "/v1/health/service/web", None, "")
            .await
            .body,
        "[]"
    );
}

/// A restore lowers the catalog's indexes with the KV's and answers a held health
/// query at once with the lower index; with ACLs on, an anonymous health read is
/// answered with the instances left out and says so, a wrong token is refused.
#[tokio::test(flavor = "multi_thread")]
async fn emulator_health_restore_and_acls() {
    let consul = ConsulEmulator::start_with_token("s3cret").await;
    for i in 0..10 {
        consul.register(
            "n1",
            "10.0.0.1",
            "redis-1",
            "redis",
            6000 + i,
            &[],
            "passing",
        );
    }
    let index = consul.service_index("redis");
    let addr = consul.addr;
    let query = tokio::spawn(async move {
        let target = format!("/v1/health/service/redis?index={index}&wait=60s");
        http(addr, "GET", &target, Some("s3cret"), "").await
    });
    let c = &consul;
    eventually("the query to be held", || async move {
        (c.waiting() == 1).then_some(())
    })
    .await;
    consul.restore(4);
    let reply = query.await.unwrap();
    assert_eq!(reply.index, Some(4), "{reply:?}");
    assert_eq!(listed(&reply), ["n1/redis-1"]);

    let anonymous = http(consul.addr, "GET", "/v1/health/service/redis", None, "").await;
    assert_eq!((anonymous.status, anonymous.body.as_str()), (200, "[]"));
    assert_eq!(
        anonymous
            .headers
            .get("X-Consul-Results-Filtered-By-ACLs")
            .map(|v| v.as_bytes()),
        Some(&b"true"[..])
    );
    let wrong = http(
        consul.addr,
        "GET",
        "/v1/health/service/redis",
        Some("nope"),
        "",
    )
    .await;
    assert_eq!((wrong.status, wrong.body.as_str()), (403, "ACL not found"));
    let write = put_json(
        &consul,
        "/v1/catalog/deregister",
        serde_json::json!({"Node": "n1"}),
    )
    .await;
    assert_eq!(write.status, 403, "an anonymous write is refused");
}

// ---- The source's blocking-query loop ------------------------------------------------

/// Waits that run out (even with the server's full wait/16 jitter) are neither returned
/// as changes nor errors: next() keeps blocking through them and returns only when a
/// write arrives. This fails if the client's timeout were not above wait + wait/16.
#[tokio::test(flavor = "multi_thread")]
async fn source_wait_running_out_is_not_a_change() {
    let consul = ConsulEmulator::start().await;
    consul.set_max_jitter(true);
    consul.put("svc/a", "127.0.0.1:1001");
    let mut source = ConsulSource::new(kv_spec(&consul, "/svc"), None, Resolver::from_system())
        .with_wait(Duration::from_millis(300));
    assert_eq!(source.next().await.unwrap().to_string(), "127.0.0.1:1001");

    let next = tokio::spawn(async move { source.next().await });
    let c = &consul;
    eventually("three waits to run out", || async move {
        (c.answered() >= 3).then_some(())
    })
    .await;
    assert!(!next.is_finished(), "next() returned without a change");
    consul.put("svc/b", "127.0.0.1:1002");
    let list = next.await.unwrap().unwrap();
    assert_eq!(list.to_string(), "127.0.0.1:1001,127.0.0.1:1002");
}

/// When a blocking query comes back with a lower index (a snapshot restore), the source
/// resets its index: later writes, whose indexes are still below the old one, are seen
/// at once instead of after the old index is passed.
#[tokio::test(flavor = "multi_thread")]
async fn source_index_going_backwards_resets_the_watch() {
    let consul = ConsulEmulator::start().await;
    for i in 1..=20 {
        consul.put("svc/a", &format!("127.0.0.1:{}", 1000 + i));
    }
    let mut source = ConsulSource::new(kv_spec(&consul, "/svc"), None, Resolver::from_system());
    assert_eq!(source.next().await.unwrap().to_string(), "127.0.0.1:1020");

    let next = tokio::spawn(async move {
        let r = source.next().await;
        (source, r)
    });
    let c = &consul;
    eventually("the watch to be held", || async move {
        (c.waiting() == 1).then_some(())
    })
    .await;
    consul.restore(3);
    let (mut source, r) = next.await.unwrap();
    assert_eq!(r.unwrap().to_string(), "127.0.0.1:1020");

    // Index 4: far below the 20 the source held before the restore.
    consul.put("svc/b", "127.0.0.1:2000");
    let list = next_with(&mut source, 2, "the write after the restore was not seen").await;
    assert_eq!(list, "127.0.0.1:1020,127.0.0.1:2000");
}

/// A store that restarts with a lower index between two requests (the source holding no
/// query at the time) is read afresh on the new connection rather than blocked on with
/// the old index, which would hide every change until the new index passed the old.
#[tokio::test(flavor = "multi_thread")]
async fn source_reads_afresh_after_reconnecting_to_a_restarted_store() {
    let consul = ConsulEmulator::start().await;
    for i in 1..=20 {
        consul.put("svc/a", &format!("127.0.0.1:{}", 1000 + i));
    }
    let mut source = ConsulSource::new(kv_spec(&consul, "/svc"), None, Resolver::from_system());
    assert_eq!(source.next().await.unwrap().to_string(), "127.0.0.1:1020");
    consul.restart_with_index(2).await;
    consul.put("svc/a", "127.0.0.1:2000"); // index 3
    let list = tokio::time::timeout(DEADLINE, async {
        loop {
            let list = source.next().await.unwrap();
            if list.to_string() == "127.0.0.1:2000" {
                return list;
            }
        }
    })
    .await;
    assert!(list.is_ok(), "the write after the restart was not seen");
}

/// A prefix with no keys (404 with X-Consul-Index) is an empty list, not an error, and
/// it stays watched: the first key written under it is returned.
#[tokio::test(flavor = "multi_thread")]
async fn source_missing_prefix_is_no_backends_and_still_watched() {
    let consul = ConsulEmulator::start().await;
    consul.put("unrelated", "x");
    let mut source = ConsulSource::new(kv_spec(&consul, "/svc"), None, Resolver::from_system());
    assert!(source.next().await.unwrap().0.is_empty());
    let next = tokio::spawn(async move { source.next().await });
    let c = &consul;
    eventually("the watch to be held", || async move {
        (c.waiting() == 1).then_some(())
    })
    .await;
    consul.put("svc/a", "127.0.0.1:1001");
    assert_eq!(next.await.unwrap().unwrap().to_string(), "127.0.0.1:1001");
}

/// Errors name the server and key and say what was wrong: the HTTP status and body, a
/// reply that is not JSON, a refused token, a server that is down.
#[tokio::test(flavor = "multi_thread")]
async fn source_errors_name_the_server_key_and_problem() {
    let consul = ConsulEmulator::start_with_token("s3cret").await;
    consul.put("svc/a", "127.0.0.1:1001");
    let spec = kv_spec(&consul, "/svc");
    let at = format!("consul {} key 'svc'", consul.addr);
    let mut source =
        ConsulSource::new(spec.clone(), Some("s3cret".into()), Resolver::from_system());

    consul.set_fault(Some((500, "rpc error making call: No cluster leader")));
    let e = source.next().await.unwrap_err().to_string();
    assert!(e.starts_with(&at), "{e}");
    assert!(e.contains("500") && e.contains("No cluster leader"), "{e}");

    consul.set_fault(Some((200, "{\"not\": a list")));
    let e = source.next().await.unwrap_err().to_string();
    assert!(e.starts_with(&at), "{e}");
    assert!(
        e.contains("not a JSON list") && e.contains("{\"not\": a list"),
        "{e}"
    );

    consul.set_fault(Some((200, r#"[{"Key":"svc/a","Value":"%%%"}]"#)));
    let e = source.next().await.unwrap_err().to_string();
    assert!(
        e.contains("key 'svc/a' is not base64") && e.contains("%%%"),
        "{e}"
    );

    consul.set_fault(None);
    assert_eq!(source.next().await.unwrap().to_string(), "127.0.0.1:1001");

    let mut wrong = ConsulSource::new(spec.clone(), Some("nope".into()), Resolver::from_system());
    let e = wrong.next().await.unwrap_err().to_string();
    assert!(
        e.starts_with(&at) && e.contains("403") && e.contains("ACL not found"),
        "{e}"
    );

    consul.stop().await;
    let e = source.next().await.unwrap_err().to_string();
    assert!(e.starts_with(&at) && e.contains("cannot connect"), "{e}");
}

/// An unknown service is `200 []`: no backends, not an error, and still watched: its
/// first passing instance is returned, with Service.Address over Node.Address.
#[tokio::test(flavor = "multi_thread")]
async fn service_source_unknown_service_is_no_backends_and_still_watched() {
    let consul = ConsulEmulator::start().await;
    consul.register("n0", "127.0.0.1", "web-1", "web", 80, &[], "passing");
    let mut source = ConsulSource::service(
        service_spec(&consul, "redis"),
        None,
        Resolver::from_system(),
    );
    assert!(source.next().await.unwrap().0.is_empty());
    let next = tokio::spawn(async move { source.next().await });
    let c = &consul;
    eventually("the watch to be held", || async move {
        (c.waiting() == 1).then_some(())
    })
    .await;
    let ok = http(
        consul.addr,
        "PUT",
        "/v1/catalog/register",
        None,
        &serde_json::json!({"Node": "n1", "Address": "10.0.0.1",
            "Service": {"ID": "redis-1", "Service": "redis", "Address": "127.0.0.2", "Port": 6379}})
        .to_string(),
    )
    .await;
    assert_eq!(ok.status, 200);
    assert_eq!(next.await.unwrap().unwrap().to_string(), "127.0.0.2:6379");
}

/// The index rules are the KV prefix's: when a held query comes back with a lower index
/// (a snapshot restore), the source resets its index, so a change whose index is below
/// the one it held before is seen at once.
#[tokio::test(flavor = "multi_thread")]
async fn service_source_index_going_backwards_resets_the_watch() {
    let consul = ConsulEmulator::start().await;
    for port in 1001..=1020 {
        consul.register("n1", "127.0.0.1", "redis-1", "redis", port, &[], "passing");
    }
    let mut source = ConsulSource::service(
        service_spec(&consul, "redis"),
        None,
        Resolver::from_system(),
    );
    assert_eq!(source.next().await.unwrap().to_string(), "127.0.0.1:1020");
    let next = tokio::spawn(async move {
        let r = source.next().await;
        (source, r)
    });
    let c = &consul;
    eventually("the watch to be held", || async move {
        (c.waiting() == 1).then_some(())
    })
    .await;
    consul.restore(3);
    let (mut source, r) = next.await.unwrap();
    assert_eq!(r.unwrap().to_string(), "127.0.0.1:1020");

    // Index 4: far below the 20 the source held before the restore.
    let index = consul.register("n2", "127.0.0.1", "redis-2", "redis", 2000, &[], "passing");
    assert_eq!(index, 4);
    let list = next_with(
        &mut source,
        2,
        "the registration after the restore was not seen",
    )
    .await;
    assert_eq!(list, "127.0.0.1:1020,127.0.0.1:2000");
}

/// Errors name the server and the service (with its tag and dc) and say what was
/// wrong: an unknown datacenter, a refused token, a reply that is not a list of
/// instances, a server that is down.
#[tokio::test(flavor = "multi_thread")]
async fn service_source_errors_name_the_server_service_and_problem() {
    let consul = ConsulEmulator::start_with_token("s3cret").await;
    consul.register(
        "n1",
        "127.0.0.1",
        "redis-1",
        "redis",
        1001,
        &["v1"],
        "passing",
    );
    let token = || Some("s3cret".to_string());

    let mut nowhere = ConsulSource::service(
        service_spec(&consul, "redis?tag=v1&dc=dc9"),
        token(),
        Resolver::from_system(),
    );
    let e = nowhere.next().await.unwrap_err().to_string();
    assert!(
        e.starts_with(&format!(
            "consul {} service 'redis' tag 'v1' dc 'dc9': ",
            consul.addr
        )),
        "{e}"
    );
    assert!(
        e.contains("500") && e.contains("No path to datacenter"),
        "{e}"
    );

    let at = format!("consul {} service 'redis': ", consul.addr);
    let mut wrong = ConsulSource::service(
        service_spec(&consul, "redis"),
        Some("nope".into()),
        Resolver::from_system(),
    );
    let e = wrong.next().await.unwrap_err().to_string();
    assert!(
        e.starts_with(&at) && e.contains("403") && e.contains("ACL not found"),
        "{e}"
    );

    let mut source = ConsulSource::service(
        service_spec(&consul, "redis"),
        token(),
        Resolver::from_system(),
    );
    consul.set_fault(Some((200, r#"{"Node": "not a list"}"#)));
    let e = source.next().await.unwrap_err().to_string();
    assert!(
        e.starts_with(&at) && e.contains("not a JSON list of service instances"),
        "{e}"
    );
    consul.set_fault(None);
    assert_eq!(source.next().await.unwrap().to_string(), "127.0.0.1:1001");

    consul.stop().await;
    let e = source.next().await.unwrap_err().to_string();
    assert!(e.starts_with(&at) && e.contains("cannot connect"), "{e}");
}

// ---- Through the real binary ---------------------------------------------------------

/// A child's value changed, a child added, a child removed: each is served within the
/// deadline. Also measures how long a change takes to reach new connections (printed,
/// not asserted).
#[tokio::test(flavor = "multi_thread")]
async fn consul_child_changed_added_removed_and_propagation_time() {
    let a = named_backend("127.0.0.1:0", "a").await;
    let b = named_backend("127.0.0.1:0", "b").await;
    let c = named_backend("127.0.0.1:0", "c").await;
    let consul = ConsulEmulator::start().await;
    consul.put("svc/web/", ""); // a folder marker, as the Consul UI writes
    consul.put("svc/web/one", &a.addr.to_string());
    let amb = start_ambassador(&consul, "/svc/web", &[]);
    wait_serving(amb.addr, &["a"]).await;

    consul.put("svc/web/one", &b.addr.to_string());
    wait_serving(amb.addr, &["b"]).await;
    consul.put("svc/web/two", &c.addr.to_string());
    wait_serving(amb.addr, &["b", "c"]).await;
    consul.delete("svc/web/one");
    wait_serving(amb.addr, &["c"]).await;

    // Propagation: from the write to the first connection served by the new backend.
    // "Quiet": the write lands while the watch is held (the usual case). "Back to back":
    // each write follows the last one at once, so the 100 ms request rate limit shows.
    let c_ref = &consul;
    for quiet in [true, false] {
        let mut times = Vec::new();
        for (backend, name) in [(&a, "a"), (&c, "c")].iter().cycle().take(10) {
            if quiet {
                eventually("the watch to be held", || async move {
                    (c_ref.waiting() == 1).then_some(())
                })
                .await;
            }
            let written = Instant::now();
            consul.put("svc/web/two", &backend.addr.to_string());
            let proxy = amb.addr;
            eventually_every(
                DEADLINE,
                Duration::ZERO,
                || async move {
                    let reply = read_reply(proxy).await.unwrap_or_default();
                    (reply.trim() == *name).then_some(())
                },
                || format!("change to {name} never served"),
            )
            .await;
            times.push(written.elapsed());
        }
        times.sort();
        println!(
            "consul propagation ({}) over {} changes: min {:?}, median {:?}, max {:?}",
            if quiet { "quiet" } else { "back to back" },
            times.len(),
            times[0],
            times[times.len() / 2],
            times[times.len() - 1]
        );
    }
}

/// With no children, the key's own value is used, and it may list several backends.
#[tokio::test(flavor = "multi_thread")]
async fn consul_single_value_with_a_comma_list() {
    let a = named_backend("127.0.0.1:0", "a").await;
    let b = named_backend("127.0.0.1:0", "b").await;
    let consul = ConsulEmulator::start().await;
    consul.put("redis", &format!("{}, {}", a.addr, b.addr));
    consul.put("redisx/one", "127.0.0.1:9"); // a sibling sharing the prefix: not a child
    let amb = start_ambassador(&consul, "/redis", &[]);
    wait_serving(amb.addr, &["a", "b"]).await;
    consul.put("redis", &b.addr.to_string());
    wait_serving(amb.addr, &["b"]).await;
}

/// A value that is not a backend is skipped with one warning naming its key and value;
/// the good children keep serving.
#[tokio::test(flavor = "multi_thread")]
async fn consul_bad_value_is_skipped_with_a_warning_naming_key_and_value() {
    let a = named_backend("127.0.0.1:0", "a").await;
    let b = named_backend("127.0.0.1:0", "b").await;
    let consul = ConsulEmulator::start().await;
    consul.put("svc/a", &a.addr.to_string());
    consul.put("svc/bad", "redis:abc");
    let amb = start_ambassador(&consul, "/svc", &[]);
    wait_serving(amb.addr, &["a"]).await;
    let line = logged(&amb, &["key 'svc/bad'", "value 'redis:abc'"]).await;
    assert!(line.contains("WARN"), "{line}");
    // Other writes re-read the prefix; the same bad value is not reported again.
    consul.put("svc/b", &b.addr.to_string());
    wait_serving(amb.addr, &["a", "b"]).await;
    assert_eq!(amb.count_log("value 'redis:abc'"), 1, "{:#?}", amb.log());
}

/// While the store is down the last set keeps serving (and the log says so once);
/// changes after a restart are picked up, also when the restarted store's index is lower
/// than the one the ambassador last saw.
#[tokio::test(flavor = "multi_thread")]
async fn consul_store_restart_keeps_last_set_then_follows_changes_even_with_a_lower_index() {
    let a = named_backend("127.0.0.1:0", "a").await;
    let b = named_backend("127.0.0.1:0", "b").await;
    let c = named_backend("127.0.0.1:0", "c").await;
    let consul = ConsulEmulator::start().await;
    for _ in 0..30 {
        consul.put("svc/one", &a.addr.to_string()); // a high index to fall back from
    }
    let amb = start_ambassador(&consul, "/svc", &[]);
    wait_serving(amb.addr, &["a"]).await;

    consul.stop().await;
    let line = logged(&amb, &["discovery failed", "keeping the last good set"]).await;
    assert!(line.contains(&format!("consul {}", consul.addr)), "{line}");
    wait_serving(amb.addr, &["a"]).await;

    consul.restart().await;
    consul.put("svc/one", &b.addr.to_string());
    wait_serving(amb.addr, &["b"]).await;
    logged(&amb, &["discovery recovered"]).await;

    consul.restart_with_index(2).await;
    assert!(consul.index() < 30);
    consul.put("svc/one", &c.addr.to_string());
    wait_serving(amb.addr, &["c"]).await;
}

/// CONSUL_HTTP_TOKEN is sent as X-Consul-Token: a store that refuses requests without it
/// serves the ambassador; with a wrong token the log names the refusal.
#[tokio::test(flavor = "multi_thread")]
async fn consul_token_is_sent_as_x_consul_token() {
    let a = named_backend("127.0.0.1:0", "a").await;
    let consul = ConsulEmulator::start_with_token("s3cret").await;
    consul.put("svc/a", &a.addr.to_string());
    let amb = start_ambassador(&consul, "/svc", &[("CONSUL_HTTP_TOKEN", "s3cret")]);
    wait_serving(amb.addr, &["a"]).await;

    let refused = start_ambassador(&consul, "/svc", &[("CONSUL_HTTP_TOKEN", "wrong")]);
    let line = logged(&refused, &["discovery failed", "403"]).await;
    assert!(line.contains("ACL not found"), "{line}");
    wait_serving(refused.addr, &[""]).await;
}

/// A store unreachable at startup: the ambassador still listens, refuses connections,
/// says why in the log, and serves once the store comes up.
#[tokio::test(flavor = "multi_thread")]
async fn consul_unreachable_at_startup_listens_refuses_then_serves() {
    let a = named_backend("127.0.0.1:0", "a").await;
    let consul = ConsulEmulator::start().await;
    consul.put("svc/a", &a.addr.to_string());
    consul.stop().await;

    // The connect timeout is also how long a connection may wait for a first result
    // that is under way; a long one shows that, once the first read has failed, there
    // is no such wait: the connection is refused at once (well within the deadline).
    let amb = Ambassador::on_loopback(&["--connect-timeout", "60s", &consul.url("/svc")]);
    let line = logged(&amb, &["discovery failed", "no backends yet"]).await;
    assert!(
        line.contains(&format!("consul {} key 'svc'", consul.addr))
            && line.contains("cannot connect"),
        "{line}"
    );
    let refused = tokio::time::timeout(DEADLINE, read_reply(amb.addr)).await;
    assert_eq!(refused.expect("refused at once").unwrap_or_default(), "");
    logged(&amb, &["refusing connections until discovery finds some"]).await;

    consul.restart().await;
    // The retry comes after the backoff grown while the store was down: up to twice
    // that time (capped at 30 s), so allow more than the usual deadline.
    eventually_within(Duration::from_secs(45), "discovery to recover", || {
        let found = amb.log().iter().any(|l| l.contains("discovery recovered"));
        async move { found.then_some(()) }
    })
    .await;
    wait_serving(amb.addr, &["a"]).await;
}

/// An HTTP 5xx from the store keeps the last set serving and is logged with its status
/// and body; when the store answers again, changes are followed.
#[tokio::test(flavor = "multi_thread")]
async fn consul_server_error_keeps_the_last_set() {
    let a = named_backend("127.0.0.1:0", "a").await;
    let b = named_backend("127.0.0.1:0", "b").await;
    let consul = ConsulEmulator::start().await;
    consul.put("svc/a", &a.addr.to_string());
    let amb = start_ambassador(&consul, "/svc", &[]);
    wait_serving(amb.addr, &["a"]).await;

    consul.set_fault(Some((500, "No cluster leader")));
    consul.put("svc/a", &a.addr.to_string()); // wakes the held query into the fault
    let line = logged(&amb, &["discovery failed", "keeping the last good set"]).await;
    assert!(
        line.contains("500") && line.contains("No cluster leader"),
        "{line}"
    );
    wait_serving(amb.addr, &["a"]).await;

    consul.set_fault(None);
    consul.put("svc/a", &b.addr.to_string());
    wait_serving(amb.addr, &["b"]).await;
}

// ---- The service catalog through the real binary -------------------------------------

/// Three instances, one critical: only the two passing ones receive connections. The
/// third turning passing joins through the blocking query held when the change lands,
/// not a later poll: exactly one held query is answered between the write and the first
/// connection it serves. The time from write to join is printed (the issue's target is
/// 100 ms; a timing is never a pass/fail here). Deregistering an instance stops new
/// connections to it and leaves an open one intact.
#[tokio::test(flavor = "multi_thread")]
async fn consul_service_serves_passing_instances_joins_on_the_held_query_and_keeps_open_connections()
 {
    let a = tagged_echo("a").await;
    let b = tagged_echo("b").await;
    let c = tagged_echo("c").await;
    let consul = ConsulEmulator::start().await;
    consul.register(
        "node-a",
        "127.0.0.1",
        "web-a",
        "web",
        a.addr.port(),
        &[],
        "passing",
    );
    consul.register(
        "node-b",
        "127.0.0.1",
        "web-b",
        "web",
        b.addr.port(),
        &[],
        "passing",
    );
    consul.register(
        "node-c",
        "127.0.0.1",
        "web-c",
        "web",
        c.addr.port(),
        &[],
        "critical",
    );
    let amb = start_service_ambassador(&consul, "web", &[]);
    let proxy = amb.addr;
    wait_greeted(proxy, &["a", "b"]).await;

    let counts = greeted(proxy, 60).await;
    println!("60 connections with web-c critical: {counts:?}");
    assert_eq!(counts.keys().collect::<Vec<_>>(), ["a", "b"], "{counts:?}");
    assert!(counts["a"] >= 20 && counts["b"] >= 20, "{counts:?}");

    let c_ref = &consul;
    let mut times = Vec::new();
    for round in 0..5 {
        if round > 0 {
            consul.set_check_status("node-c", "service:web-c", "critical");
            wait_greeted(proxy, &["a", "b"]).await;
        }
        eventually("the watch to be held", || async move {
            (c_ref.waiting() == 1).then_some(())
        })
        .await;
        let answered = consul.answered();
        let written = Instant::now();
        consul.set_check_status("node-c", "service:web-c", "passing");
        eventually_every(
            DEADLINE,
            Duration::ZERO,
            || async move { (greeting(proxy).await.as_deref() == Some("c")).then_some(()) },
            || "web-c never served after turning passing".to_string(),
        )
        .await;
        times.push(written.elapsed());
        assert_eq!(
            consul.answered() - answered,
            1,
            "round {round}: the change came by the held blocking query alone"
        );
    }
    let mut sorted = times.clone();
    sorted.sort();
    println!(
        "consul-service join after a check turns passing, {} rounds: min {:?}, median {:?}, max {:?} ({times:?})",
        sorted.len(),
        sorted[0],
        sorted[sorted.len() / 2],
        sorted[sorted.len() - 1]
    );
    wait_greeted(proxy, &["a", "b", "c"]).await;

    // An open connection to web-c outlives its deregistration.
    let (name, open) = eventually("a connection attached to c", || async move {
        match attach(proxy).await {
            Ok((name, conn)) if name == "c" => Some((name, conn)),
            _ => None,
        }
    })
    .await;
    assert_eq!(name, "c");
    consul.deregister("node-c", Some("web-c"));
    wait_greeted(proxy, &["a", "b"]).await;
    assert_eq!(finish(open, "still here\n").await, "still here\n");
}

/// `tag` and `dc` select the instances: those carrying the tag, those of the datacenter
/// (dc1 by default), both together; a tag added later is followed. An unknown
/// datacenter is Consul's 500, logged naming the service and dc, and refused.
#[tokio::test(flavor = "multi_thread")]
async fn consul_service_tag_and_dc_select_the_instances() {
    let a = named_backend("127.0.0.1:0", "a").await;
    let b = named_backend("127.0.0.1:0", "b").await;
    let c = named_backend("127.0.0.1:0", "c").await;
    let d = named_backend("127.0.0.1:0", "d").await;
    let e = named_backend("127.0.0.1:0", "e").await;
    let consul = ConsulEmulator::start().await;
    consul.register(
        "n-a",
        "127.0.0.1",
        "api-a",
        "api",
        a.addr.port(),
        &["primary", "v1"],
        "passing",
    );
    consul.register(
        "n-b",
        "127.0.0.1",
        "api-b",
        "api",
        b.addr.port(),
        &["v1"],
        "passing",
    );
    consul.register(
        "n-c",
        "127.0.0.1",
        "api-c",
        "api",
        c.addr.port(),
        &["v2"],
        "passing",
    );
    consul.add_datacenter("dc2");
    for (node, id, backend, tag) in [("m-d", "api-d", &d, "v1"), ("m-e", "api-e", &e, "v2")] {
        let body = serde_json::json!({
            "Datacenter": "dc2", "Node": node, "Address": "127.0.0.1",
            "Service": {"ID": id, "Service": "api", "Tags": [tag], "Port": backend.addr.port()},
            "Check": {"CheckID": format!("service:{id}"), "Status": "passing", "ServiceID": id},
        });
        let ok = http(
            consul.addr,
            "PUT",
            "/v1/catalog/register",
            None,
            &body.to_string(),
        )
        .await;
        assert_eq!(ok.status, 200, "{ok:?}");
    }
    let all = start_service_ambassador(&consul, "api", &[]);
    let v1 = start_service_ambassador(&consul, "api?tag=v1", &[]);
    let primary = start_service_ambassador(&consul, "api?tag=primary", &[]);
    let dc2 = start_service_ambassador(&consul, "api?dc=dc2", &[]);
    let dc2_v1 = start_service_ambassador(&consul, "api?dc=dc2&tag=v1", &[]);
    wait_serving(all.addr, &["a", "b", "c"]).await;
    wait_serving(v1.addr, &["a", "b"]).await;
    wait_serving(primary.addr, &["a"]).await;
    wait_serving(dc2.addr, &["d", "e"]).await;
    wait_serving(dc2_v1.addr, &["d"]).await;

    consul.register(
        "n-c",
        "127.0.0.1",
        "api-c",
        "api",
        c.addr.port(),
        &["v2", "v1"],
        "passing",
    );
    wait_serving(v1.addr, &["a", "b", "c"]).await;
    wait_serving(primary.addr, &["a"]).await;

    let nowhere = start_service_ambassador(&consul, "api?dc=dc9", &[]);
    let line = logged(&nowhere, &["discovery failed", "No path to datacenter"]).await;
    assert!(
        line.contains(&format!("consul {} service 'api' dc 'dc9'", consul.addr))
            && line.contains("500"),
        "{line}"
    );
    wait_serving(nowhere.addr, &[""]).await;
}

/// An instance registered with port 0 is skipped with one warning naming the service,
/// the instance and the node, while the others serve (and it is not warned about again
/// as the service changes). So is an entry with no address at all: Consul's register
/// refuses an empty node address, so that reply is played by the emulator's fault (as a
/// proxy or another server might answer).
#[tokio::test(flavor = "multi_thread")]
async fn consul_service_bad_instances_are_skipped_with_a_warning_naming_service_and_node() {
    let a = named_backend("127.0.0.1:0", "a").await;
    let b = named_backend("127.0.0.1:0", "b").await;
    let consul = ConsulEmulator::start().await;
    consul.register(
        "n-a",
        "127.0.0.1",
        "api-a",
        "api",
        a.addr.port(),
        &[],
        "passing",
    );
    consul.register("n-zero", "127.0.0.1", "api-zero", "api", 0, &[], "passing");
    let amb = start_service_ambassador(&consul, "api", &[]);
    wait_serving(amb.addr, &["a"]).await;
    let line = logged(
        &amb,
        &[
            "service 'api' instance 'api-zero' on node 'n-zero'",
            "port 0",
        ],
    )
    .await;
    assert!(line.contains("WARN") && line.contains("skipped"), "{line}");
    consul.register(
        "n-b",
        "127.0.0.1",
        "api-b",
        "api",
        b.addr.port(),
        &[],
        "passing",
    );
    wait_serving(amb.addr, &["a", "b"]).await;
    assert_eq!(amb.count_log("instance 'api-zero'"), 1, "{:#?}", amb.log());

    let entry = |node: &str, address: &str, id: &str, port: u16| {
        serde_json::json!({
            "Node": {"Node": node, "Address": address, "Datacenter": "dc1"},
            "Service": {"ID": id, "Service": "api", "Address": "", "Port": port, "Tags": []},
            "Checks": [],
        })
    };
    let body = serde_json::json!([
        entry("n-a", "127.0.0.1", "api-a", a.addr.port()),
        entry("n-void", "", "api-void", 80)
    ]);
    consul.set_fault(Some((200, &body.to_string())));
    consul.deregister("n-b", Some("api-b")); // wakes the held query into the fault
    wait_serving(amb.addr, &["a"]).await;
    let line = logged(
        &amb,
        &[
            "service 'api' instance 'api-void' on node 'n-void'",
            "no address",
        ],
    )
    .await;
    assert!(line.contains("WARN"), "{line}");
}

/// CONSUL_HTTP_TOKEN is sent as X-Consul-Token to the health endpoint too: the right
/// token serves; with none, Consul filters the instances out (and says so in a header),
/// which the log names once; a wrong one is the 403 the log names.
#[tokio::test(flavor = "multi_thread")]
async fn consul_service_token_is_sent_and_acl_filtering_is_named() {
    let a = named_backend("127.0.0.1:0", "a").await;
    let consul = ConsulEmulator::start_with_token("s3cret").await;
    consul.register(
        "n-a",
        "127.0.0.1",
        "api-a",
        "api",
        a.addr.port(),
        &[],
        "passing",
    );
    let amb = start_service_ambassador(&consul, "api", &[("CONSUL_HTTP_TOKEN", "s3cret")]);
    wait_serving(amb.addr, &["a"]).await;
    assert_eq!(amb.count_log("X-Consul-Results-Filtered-By-ACLs"), 0);

    let anonymous = start_service_ambassador(&consul, "api", &[]);
    let line = logged(
        &anonymous,
        &["X-Consul-Results-Filtered-By-ACLs", "CONSUL_HTTP_TOKEN"],
    )
    .await;
    assert!(
        line.contains("WARN") && line.contains("consul-service://"),
        "{line}"
    );
    wait_serving(anonymous.addr, &[""]).await;

    let wrong = start_service_ambassador(&consul, "api", &[("CONSUL_HTTP_TOKEN", "wrong")]);
    let line = logged(&wrong, &["discovery failed", "403"]).await;
    assert!(
        line.contains(&format!("consul {} service 'api'", consul.addr))
            && line.contains("ACL not found"),
        "{line}"
    );
}
