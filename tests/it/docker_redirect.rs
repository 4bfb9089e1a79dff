//! Omni mode's redirect on day two, against a real Docker engine: an omni container
//! given NET_ADMIN installs its own redirect at every start (so `docker restart` needs no
//! other step), one without it says so once and is not ready until `--setup-iptables`
//! runs, and an admin endpoint bound beyond loopback stays reachable on the omni
//! container's address while everything else is redirected.

use std::net::SocketAddr;

use crate::support::docker::{Container, Engine, engine};
use crate::support::*;

/// The admin address the omni containers here listen on: every address, so a scraper
/// on the network (and this test, from the host) reaches it.
const ADMIN: &str = "AMBASSADORD_ADMIN=0.0.0.0:10001";
const ADMIN_PORT: u16 = 10001;

/// Health checks every second, unhealthy after one failure (the command is the image's).
const FAST_HEALTH: [&str; 4] = [
    "--health-interval=1s",
    "--health-timeout=3s",
    "--health-retries=1",
    "--health-start-period=0s",
];

/// A busybox httpd answering `/answer` with `answer` on port 80.
fn backend<'e>(engine: &'e Engine, answer: &str) -> Container<'e> {
    let script =
        format!("mkdir -p /www && echo {answer} > /www/answer && exec httpd -f -p 80 -h /www");
    let c = engine.container("backend", &[engine.busybox_image(), "sh", "-c", &script]);
    c.wait_for_exec(
        "the backend's httpd",
        &["wget", "-qO-", "http://127.0.0.1:80/answer"],
    );
    c
}

/// An omni ambassador with the socket mounted, the admin endpoint on every address, and
/// `extra` docker run options.
fn omni<'e>(engine: &'e Engine, extra: &[&str]) -> Container<'e> {
    let socket = engine
        .socket_path()
        .expect("omni tests need the engine on a unix socket");
    let mount = format!("{socket}:/var/run/docker.sock");
    let mut args = vec!["-v", &mount, "-e", ADMIN];
    args.extend_from_slice(&FAST_HEALTH);
    args.extend_from_slice(extra);
    args.extend([engine.ambassadord_image(), "--omnimode"]);
    let amb = engine.container("backends", &args);
    amb.wait_for_log("container index ready");
    amb
}

/// A client linked to `amb` as `backends`, declaring `BACKEND_6379=<backend>:80`, that
/// fetches `backends:6379/answer`; its output.
fn fetch_through(engine: &Engine, amb: &Container, backend: &Container) -> String {
    let link = format!("{}:backends", amb.name);
    let declare = format!("BACKEND_6379={}:80", backend.ip());
    let out = engine.run(&[
        "--link",
        &link,
        "-e",
        &declare,
        engine.busybox_image(),
        "sh",
        "-c",
        "timeout 10 wget -qO- http://backends:6379/answer",
    ]);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn admin_of(amb: &Container) -> SocketAddr {
    SocketAddr::new(amb.ip().parse().expect("container IP"), ADMIN_PORT)
}

fn health(engine: &Engine, c: &Container) -> String {
    engine
        .docker(&["inspect", "--format", "{{.State.Health.Status}}", &c.name])
        .unwrap_or_default()
}

fn wait_health(engine: &Engine, c: &Container, want: &str) {
    wait_until(
        DEADLINE,
        || (health(engine, c) == want).then_some(()),
        || {
            format!(
                "{} is {}, not {want}:\n{}",
                c.name,
                health(engine, c),
                c.logs()
            )
        },
    );
}

/// The `Uid:`, `Gid:`, `Groups:` and `CapEff:` lines of the container's main process,
/// read on the host from /proc.
pub fn process_ids(engine: &Engine, c: &Container) -> (String, String, String, String) {
    let pid = engine.docker_ok(&["inspect", "--format", "{{.State.Pid}}", &c.name]);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status of {}: {e}", c.name));
    let line = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    (line("Uid:"), line("Gid:"), line("Groups:"), line("CapEff:"))
}

fn count(logs: &str, needle: &str) -> usize {
    logs.lines().filter(|l| l.contains(needle)).count()
}

/// With NET_ADMIN, the omni container installs its redirect as it starts: a client is
/// routed with no setup container. After `docker restart` (a new network namespace, so
/// a new, empty nat table) it installs it again and clients route again, no other step.
/// Throughout, a scraper container reaches /metrics on the admin port through the omni
/// container's address: that port is kept out of the redirect.
#[test]
fn with_net_admin_the_redirect_is_installed_at_every_start() {
    let engine = engine();
    let one = backend(engine, "one");
    let amb = omni(engine, &["--cap-add", "NET_ADMIN"]);
    amb.wait_for_log("installed the redirect of incoming TCP");
    assert_eq!(fetch_through(engine, &amb, &one), "one", "{}", amb.logs());

    let link = format!("{}:backends", amb.name);
    let scrape = |path: &str| {
        let url = format!("timeout 10 wget -qO- http://backends:{ADMIN_PORT}{path}");
        let out = engine.run(&["--link", &link, engine.busybox_image(), "sh", "-c", &url]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let metrics = scrape("/metrics");
    assert!(
        metrics.contains("ambassadord_connections_accepted_total"),
        "scraper got: {metrics:?}\n{}",
        amb.logs()
    );
    assert_eq!(scrape("/readyz").trim(), "ready");
    wait_health(engine, &amb, "healthy");
    // The image's AMBASSADORD_RUN_AS: nobody, with no capability left, keeping the
    // socket's group so the index can reconnect.
    let socket_gid = std::fs::metadata(engine.socket_path().unwrap())
        .map(|m| std::os::unix::fs::MetadataExt::gid(&m).to_string())
        .unwrap();
    let (uid, gid, groups, caps) = process_ids(engine, &amb);
    assert_eq!(
        (uid.as_str(), gid.as_str(), groups.as_str(), caps.as_str()),
        (
            "65534 65534 65534 65534",
            "65534 65534 65534 65534",
            socket_gid.as_str(),
            "0000000000000000"
        ),
        "{}",
        amb.logs()
    );

    engine.docker_ok(&["restart", &amb.name]);
    wait_until(
        DEADLINE,
        || (count(&amb.logs(), "installed the redirect of incoming TCP") == 2).then_some(()),
        || format!("no second install after the restart:\n{}", amb.logs()),
    );
    amb.wait_for_log("container index ready");
    wait_until(
        DEADLINE,
        || (fetch_through(engine, &amb, &one) == "one").then_some(()),
        || format!("no client routed after the restart:\n{}", amb.logs()),
    );
    let (status, body) = admin::get(admin_of(&amb), "/readyz").expect("admin after restart");
    assert_eq!((status, body.trim()), (200, "ready"));
    assert!(scrape("/metrics").contains("ambassadord_connections_accepted_total"));
    let logs = amb.logs();
    assert_eq!(count(&logs, "no redirect of incoming TCP"), 0, "{logs}");
}

/// Without NET_ADMIN the omni container says once, in one line, that no redirect is
/// installed and how to fix it; /readyz answers 503 saying why, and Docker marks it
/// unhealthy. `--setup-iptables` in its namespace (given the same admin address, so that
/// port is kept out) makes it ready within the probe interval, and healthy.
#[test]
fn without_net_admin_it_warns_once_and_is_not_ready_until_set_up() {
    let engine = engine();
    let one = backend(engine, "one");
    let amb = omni(engine, &[]);
    let line = amb.wait_for_log("no redirect of incoming TCP is installed");
    assert!(line.contains("lacks CAP_NET_ADMIN"), "{line}");
    assert!(line.contains("--cap-add NET_ADMIN"), "{line}");
    let admin = admin_of(&amb);
    let (status, body) = admin::get(admin, "/readyz").expect("admin endpoint");
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("no redirect of incoming TCP to port 10000 is installed (no CAP_NET_ADMIN to install it)"),
        "{body}"
    );
    wait_health(engine, &amb, "unhealthy");
    // Only connections straight to the omni port arrive: the client's to 6379 do not.
    assert_eq!(fetch_through(engine, &amb, &one), "", "{}", amb.logs());

    engine.setup_iptables(&amb, &[ADMIN]);
    amb.wait_for_log("a redirect of incoming TCP is in place");
    wait_until(
        DEADLINE,
        || (admin::get(admin, "/readyz")?.0 == 200).then_some(()),
        || {
            format!(
                "/readyz is {:?}:\n{}",
                admin::get(admin, "/readyz"),
                amb.logs()
            )
        },
    );
    wait_health(engine, &amb, "healthy");
    assert_eq!(fetch_through(engine, &amb, &one), "one", "{}", amb.logs());
    let logs = amb.logs();
    assert_eq!(count(&logs, "no redirect of incoming TCP"), 1, "{logs}");
}
