//! Omni mode against a real Docker engine: the seed's walkthrough with the image from
//! scripts/build-image (an `--omnimode` ambassador with the socket mounted, the
//! `--setup-iptables` container in its network namespace, client containers linked to it
//! that connect to `backends:<port>`), plus the index's behaviour when containers come
//! and go and when the Engine API goes away.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;

use crate::support::docker::{Container, Engine, Network, TempDir, engine, unique_name};
use crate::support::*;

/// A busybox httpd that answers `/answer` with `answer`, on `port`.
fn backend<'e>(engine: &'e Engine, answer: &str, port: u16, extra: &[&str]) -> Container<'e> {
    let script =
        format!("mkdir -p /www && echo {answer} > /www/answer && exec httpd -f -p {port} -h /www");
    let env = format!("ANSWER={answer}");
    let mut args: Vec<&str> = extra.to_vec();
    args.extend(["-e", &env, engine.busybox_image(), "sh", "-c", &script]);
    let c = engine.container("backend", &args);
    c.wait_for_exec(
        "the backend's httpd",
        &["wget", "-qO-", &format!("http://127.0.0.1:{port}/answer")],
    );
    c
}

/// The seed's omni ambassador: the image with the socket mounted and `--omnimode`, and
/// the privileged setup container run once in its network namespace.
fn omni_ambassador<'e>(engine: &'e Engine, extra: &[&str]) -> Container<'e> {
    let socket = engine
        .socket_path()
        .expect("omni tests need the engine on a unix socket");
    let mount = format!("{socket}:/var/run/docker.sock");
    let mut args = vec!["-v", &mount];
    args.extend_from_slice(extra);
    args.extend([engine.ambassadord_image(), "--omnimode"]);
    let amb = engine.container("backends", &args);
    amb.wait_for_log("container index ready");
    engine.setup_iptables(&amb, &[]);
    amb
}

/// Runs a client container to completion: `sh -c script` with `args` before the image.
fn client(engine: &Engine, args: &[&str], script: &str) -> Output {
    let mut full: Vec<&str> = args.to_vec();
    full.extend([engine.busybox_image(), "sh", "-c", script]);
    engine.run(&full)
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn fetch(port: u16) -> String {
    format!("timeout 10 wget -qO- http://backends:{port}/answer")
}

/// The seed's flow: two clients on the same port go to different backends by their own
/// env; one client uses two ports; the label forms work; a client with no declaration
/// for the port is refused and the log names the container and the port.
#[test]
fn omni_routes_each_client_by_its_own_declaration() {
    let engine = engine();
    let one = backend(engine, "one", 80, &[]);
    let two = backend(engine, "two", 80, &[]);
    let three = backend(engine, "three", 8080, &[]);
    let amb = omni_ambassador(engine, &[]);
    let link = format!("{}:backends", amb.name);

    let to = |c: &Container, port: u16| format!("{}:{port}", c.ip());
    let env_one = format!("BACKEND_6379={}", to(&one, 80));
    let env_two = format!("BACKEND_6379={}", to(&two, 80));
    let out = client(engine, &["--link", &link, "-e", &env_one], &fetch(6379));
    assert_eq!(stdout(&out), "one", "{out:?}\n{}", amb.logs());
    let out = client(engine, &["--link", &link, "-e", &env_two], &fetch(6379));
    assert_eq!(stdout(&out), "two", "{out:?}\n{}", amb.logs());

    // One client, two ports, two backends.
    let env_8080 = format!("BACKEND_8080={}", to(&three, 8080));
    let both = format!("{} && {}", fetch(6379), fetch(8080));
    let out = client(
        engine,
        &["--link", &link, "-e", &env_one, "-e", &env_8080],
        &both,
    );
    assert_eq!(stdout(&out), "one\nthree", "{out:?}\n{}", amb.logs());

    // The label forms.
    let label = format!("ambassadord.backend.6379={}", to(&two, 80));
    let out = client(engine, &["--link", &link, "--label", &label], &fetch(6379));
    assert_eq!(stdout(&out), "two", "{out:?}\n{}", amb.logs());
    let connectable = format!("connect.6379={}", to(&three, 8080));
    let out = client(
        engine,
        &["--link", &link, "--label", &connectable],
        &fetch(6379),
    );
    assert_eq!(stdout(&out), "three", "{out:?}\n{}", amb.logs());

    // No declaration for the port: refused, and the log says which container and port.
    let name = unique_name("undeclared");
    let out = client(
        engine,
        &["--name", &name, "--link", &link, "-e", &env_one],
        &fetch(7777),
    );
    assert!(!out.status.success(), "undeclared port was served: {out:?}");
    let line = amb.wait_for_log("declares no backend for port 7777");
    assert!(line.contains(&name), "{line}");

    // Every served connection was logged with its container and port.
    let logs = amb.logs();
    let served = logs
        .lines()
        .filter(|l| l.contains("connection closed") && l.contains(":6379"))
        .count();
    assert!(served >= 5, "{logs}");
}

/// A user-defined network: the client reaches the ambassador by container name and
/// declares its backend by container name (resolved through Docker's embedded DNS).
/// Then a client is removed and a new one given its IP gets its own routing, not the old
/// one's.
#[test]
fn user_network_by_name_and_a_reused_ip_gets_its_own_routing() {
    let engine = engine();
    let net = Network::create(engine);
    let on_net = format!("--network={}", net.name);
    let four = backend(engine, "four", 80, &[&on_net]);
    let five = backend(engine, "five", 80, &[&on_net]);
    let amb = omni_ambassador(engine, &[&on_net]);

    let by_name = format!("BACKEND_6379={}:80", four.name);
    let script = format!("timeout 10 wget -qO- http://{}:6379/answer", amb.name);
    let out = client(engine, &[&on_net, "-e", &by_name], &script);
    assert_eq!(stdout(&out), "four", "{out:?}\n{}", amb.logs());

    let ip = &net.addr(9);
    let first = format!("BACKEND_6379={}:80", ip_on(engine, &four, &net.name));
    let second = format!("BACKEND_6379={}:80", ip_on(engine, &five, &net.name));
    let out = client(engine, &[&on_net, "--ip", ip, "-e", &first], &script);
    assert_eq!(stdout(&out), "four", "{out:?}\n{}", amb.logs());
    // The first client is gone (run --rm); the next one gets the same address.
    let out = client(engine, &[&on_net, "--ip", ip, "-e", &second], &script);
    assert_eq!(stdout(&out), "five", "{out:?}\n{}", amb.logs());
    drop(amb);
    drop((four, five));
}

/// The Engine API going away: the ambassador keeps routing known containers from its
/// index, refuses a container it cannot look up, and once the API is back it reconnects,
/// re-lists, and serves the new container. Runs the binary on the host (listening on
/// the bridge address, so no redirect is needed: the port is the listen port) with its
/// Docker socket behind a relay the test can cut.
#[tokio::test(flavor = "multi_thread")]
async fn index_survives_the_engine_going_away() {
    let engine = engine();
    let socket = engine.socket_path().expect("a unix socket engine");
    let relay = SocketRelay::start(Path::new(socket)).await;
    let one = backend(engine, "one", 80, &[]);
    let two = backend(engine, "two", 80, &[]);
    let docker_host = format!("unix://{}", relay.path.display());
    let (mut amb, gateway) = host_omni(engine, &docker_host, &[]);
    let port = amb.addr.port();
    let url = format!("timeout 10 wget -qO- http://{gateway}:{port}/answer");
    let declare = |c: &Container| format!("BACKEND_{port}={}:80", c.ip());

    // A long-lived client container, known to the index before the outage.
    let env_one = declare(&one);
    let known = engine.container(
        "known",
        &["-e", &env_one, engine.busybox_image(), "sleep", "600"],
    );
    let fetch_from = |c: &Container| c.exec(&["sh", "-c", &url]);
    let answer = eventually_sync("the known client is served", || fetch_from(&known).ok());
    assert_eq!(answer.trim(), "one");

    relay.cut();
    amb.wait_for_log("lost the Docker engine");
    // Still routed from the index.
    assert_eq!(fetch_from(&known).unwrap().trim(), "one");
    // A container started during the outage cannot be looked up: refused.
    let env_two = declare(&two);
    let late = engine.container(
        "late",
        &["-e", &env_two, engine.busybox_image(), "sleep", "600"],
    );
    assert!(
        fetch_from(&late).is_err(),
        "an unknown container was served"
    );

    relay.restore();
    amb.wait_for_log("Docker engine reachable again");
    let answer = eventually_sync("the new client is served", || fetch_from(&late).ok());
    assert_eq!(answer.trim(), "two");
    assert_eq!(fetch_from(&known).unwrap().trim(), "one");
}

/// The binary in omni mode on the host, listening on the host's address on the default
/// bridge (the bridge's gateway) (so containers reach it without a redirect: the port is the listen port),
/// reading the engine at `docker_host`; returns it, once its index is ready, and the
/// gateway address.
pub fn host_omni(engine: &Engine, docker_host: &str, extra: &[&str]) -> (Ambassador, String) {
    host_omni_on(engine, "bridge", docker_host, extra)
}

/// [`host_omni`] listening on `network`'s gateway address instead of the default
/// bridge's: the host is on every bridge network through its gateway, so a container
/// reaches it over that network alone, from its address there.
fn host_omni_on(
    engine: &Engine,
    network: &str,
    docker_host: &str,
    extra: &[&str],
) -> (Ambassador, String) {
    let gateway = engine.host_address(network).to_string();
    let mut args = vec![
        "--omnimode",
        "--bind",
        &gateway,
        "--port",
        "0",
        "--docker-host",
        docker_host,
    ];
    args.extend_from_slice(extra);
    let mut amb = Ambassador::start(&args);
    amb.wait_for_log("container index ready");
    (amb, gateway)
}

/// Polls `check` from a synchronous test until it returns `Some`.
fn eventually_sync<T>(what: &str, check: impl FnMut() -> Option<T>) -> T {
    wait_until(DEADLINE, check, || format!("timed out waiting for: {what}"))
}

/// The container's address on `network`.
fn ip_on(engine: &Engine, c: &Container, network: &str) -> String {
    let format = format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}");
    engine.docker_ok(&["inspect", "--format", &format, &c.name])
}

/// A unix-socket relay in front of the Docker socket that the test can cut (closing
/// every open connection and refusing new ones) and restore.
struct SocketRelay {
    path: PathBuf,
    _dir: TempDir,
    open: Arc<std::sync::atomic::AtomicBool>,
    cut: Arc<tokio::sync::watch::Sender<u64>>,
}

impl SocketRelay {
    async fn start(target: &Path) -> SocketRelay {
        let dir = TempDir::new("relay").expect("a temporary directory");
        let path = dir.path().join("docker.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let open = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let cut = Arc::new(tokio::sync::watch::Sender::new(0u64));
        let (target, open2, cut2) = (target.to_path_buf(), open.clone(), cut.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if !open2.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: the client sees the connection close
                }
                let target = target.clone();
                let mut cuts = cut2.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::UnixStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cuts.changed() => {}
                    }
                });
            }
        });
        SocketRelay {
            path,
            _dir: dir,
            open,
            cut,
        }
    }

    fn cut(&self) {
        self.open.store(false, std::sync::atomic::Ordering::SeqCst);
        self.cut.send_modify(|n| *n += 1);
    }

    fn restore(&self) {
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Containers declaring the same spec share one source, which keeps running while any
/// running container declares it and stops once none does.
#[tokio::test(flavor = "multi_thread")]
async fn containers_share_a_source_until_none_declares_it() {
    let engine = engine();
    let one = backend(engine, "one", 80, &[]);
    let docker_host = format!(
        "unix://{}",
        engine.socket_path().expect("a unix socket engine")
    );
    let (mut amb, gateway) = host_omni(
        engine,
        &docker_host,
        &["--log-level", "info,ambassadord::proxy::omni=debug"],
    );
    let port = amb.addr.port();
    let spec = format!("{}:80", one.ip());
    let env = format!("BACKEND_{port}={spec}");
    let url = format!("timeout 10 wget -qO- http://{gateway}:{port}/answer");
    let first = engine.container(
        "first",
        &["-e", &env, engine.busybox_image(), "sleep", "600"],
    );
    let second = engine.container(
        "second",
        &["-e", &env, engine.busybox_image(), "sleep", "600"],
    );
    for c in [&first, &second] {
        let answer = eventually_sync("a declaring client is served", || {
            c.exec(&["sh", "-c", &url]).ok()
        });
        assert_eq!(answer.trim(), "one");
    }
    let started = format!("spec={spec}");
    let starts = amb
        .log()
        .iter()
        .filter(|l| l.contains("source started") && l.contains(&started))
        .count();
    assert_eq!(starts, 1, "one shared source: {:#?}", amb.log());

    // One declaring container left: the source stays.
    drop(first);
    assert_eq!(
        second.exec(&["sh", "-c", &url]).unwrap().trim(),
        "one",
        "{:#?}",
        amb.log()
    );
    assert_eq!(amb.count_log("source stopped"), 0, "{:#?}", amb.log());
    // None left: it stops.
    drop(second);
    let line = amb.wait_for_log("source stopped");
    assert!(line.contains(&started), "{line}");
}

/// `docker network connect` is learned from the event stream. A client the index already
/// knows (on the default bridge only) is attached to a second, user-defined network; its
/// first connection over that network, from its new address there, is routed by its own
/// `BACKEND_<port>` (a container already on that network declares another backend for
/// the same port). The index shows the new address before the client connects, and the
/// connection counts as an index hit with no miss: it was the connect event, not the
/// targeted refresh a miss makes, that taught the index the address. The ambassador runs
/// on the host listening on the second network's gateway only, so the client reaches it
/// over that network alone.
#[test]
fn network_connect_is_learned_from_the_event() {
    let engine = engine();
    let scene = NetScene::start(engine);
    let (amb, admin, port, url, net) =
        (&scene.amb, scene.admin, scene.port, &scene.url, &scene.net);

    // Already on the second network, with its own declaration for the same port.
    let resident = scene.client("resident", &[&net.on()], &scene.two);
    let resident_ip = ip_on(engine, &resident, &net.name);
    wait_indexed(admin, &resident.name, &[&resident_ip]);
    assert_eq!(resident.exec(&["sh", "-c", url]).unwrap(), "two");

    let client = scene.client("client", &[], &scene.one);
    let bridge_ip = client.ip();
    wait_indexed(admin, &client.name, &[&bridge_ip]);

    engine.docker_ok(&["network", "connect", &net.name, &client.name]);
    let new_ip = ip_on(engine, &client, &net.name);
    // /routes reads the index alone: nothing but the event can have put it there, since
    // nothing has connected from the new address yet.
    wait_indexed(admin, &client.name, &[&bridge_ip, &new_ip]);
    let (hits, misses) = (lookups(admin, "hit"), lookups(admin, "miss"));
    assert_eq!(
        client.exec(&["sh", "-c", url]).unwrap(),
        "one",
        "{:#?}",
        amb.log()
    );
    assert_eq!(lookups(admin, "hit"), hits + 1, "{:#?}", amb.log());
    assert_eq!(lookups(admin, "miss"), misses, "{:#?}", amb.log());
    assert_eq!(misses, 0, "every lookup in this test is an index hit");
    // It came from the new address (the log names the peer) and was routed as the client.
    let served = served_line(amb, &format!("{}:{port}", client.name));
    assert!(served.contains(&format!("client={new_ip}:")), "{served}");
    assert_eq!(amb.count_log("lost the Docker engine"), 0, "no re-list");
}

/// `docker network disconnect` evicts the address the container had on that network:
/// the index keeps the still-running client with its other address only, and no
/// container with the old one. A different container later given that same address on
/// that network is routed by its own declaration, not the first client's (whose
/// declaration would send it to another backend), and again without a miss.
#[test]
fn network_disconnect_evicts_the_address_and_a_reuser_gets_its_own_routing() {
    let engine = engine();
    let scene = NetScene::start(engine);
    let (amb, admin, port, url, net) =
        (&scene.amb, scene.admin, scene.port, &scene.url, &scene.net);

    let client = scene.client("client", &[], &scene.one);
    let bridge_ip = client.ip();
    let shared_ip = &net.addr(38);
    engine.docker_ok(&[
        "network",
        "connect",
        "--ip",
        shared_ip,
        &net.name,
        &client.name,
    ]);
    wait_indexed(admin, &client.name, &[&bridge_ip, shared_ip]);
    assert_eq!(client.exec(&["sh", "-c", url]).unwrap(), "one");

    engine.docker_ok(&["network", "disconnect", &net.name, &client.name]);
    wait_indexed(admin, &client.name, &[&bridge_ip]);
    assert_eq!(
        owners(admin, shared_ip),
        Vec::<String>::new(),
        "the disconnected address is still indexed"
    );

    let reuser = scene.client("reuser", &[&net.on(), "--ip", shared_ip], &scene.two);
    wait_indexed(admin, &reuser.name, &[shared_ip]);
    assert_eq!(owners(admin, shared_ip), vec![reuser.name.clone()]);
    let answer = reuser.exec(&["sh", "-c", url]).unwrap();
    assert_eq!(answer, "two", "{:#?}", amb.log());
    let served = served_line(amb, &format!("{}:{port}", reuser.name));
    assert!(served.contains(&format!("client={shared_ip}:")), "{served}");
    assert_eq!(lookups(admin, "miss"), 0, "{:#?}", amb.log());
}

/// What the network connect/disconnect tests start from: their own network, backends
/// "one" and "two" on the default bridge, and the host omni ambassador (with its admin
/// endpoint) listening on the network's gateway only, so clients reach it over that
/// network alone. Fields drop in order: the network goes last, after its containers.
struct NetScene<'e> {
    amb: Ambassador,
    admin: SocketAddr,
    port: u16,
    /// What a client runs to fetch `/answer` through the ambassador.
    url: String,
    one: Container<'e>,
    two: Container<'e>,
    net: Network<'e>,
}

impl<'e> NetScene<'e> {
    fn start(engine: &'e Engine) -> Self {
        let net = Network::create(engine);
        let one = backend(engine, "one", 80, &[]);
        let two = backend(engine, "two", 80, &[]);
        let (amb, gateway, admin) = host_omni_with_admin(engine, &net.name);
        let port = amb.addr.port();
        let url = format!("timeout 10 wget -qO- http://{gateway}:{port}/answer");
        NetScene {
            amb,
            admin,
            port,
            url,
            one,
            two,
            net,
        }
    }

    /// A client container (started with `args`, then the image) whose `BACKEND_<port>`
    /// sends this scene's port to `backend`.
    fn client(&self, role: &str, args: &[&str], backend: &Container) -> Container<'e> {
        let declares = format!("BACKEND_{}={}:80", self.port, backend.ip());
        let image = self.net.engine.busybox_image();
        let mut all = args.to_vec();
        all.extend(["-e", &declares, image, "sleep", "600"]);
        self.net.engine.container(role, &all)
    }
}

/// [`host_omni_on`] `network` with the admin endpoint on an ephemeral loopback port;
/// returns the ambassador, its listen address (the network's gateway) and the admin
/// address.
fn host_omni_with_admin(engine: &Engine, network: &str) -> (Ambassador, String, SocketAddr) {
    let docker_host = format!(
        "unix://{}",
        engine.socket_path().expect("a unix socket engine")
    );
    let (mut amb, gateway) =
        host_omni_on(engine, network, &docker_host, &["--admin", "127.0.0.1:0"]);
    let admin = amb.admin_addr();
    (amb, gateway, admin)
}

/// Every container in the omni index, by name, with its addresses (from `/routes`,
/// which reads the index and never asks Docker).
fn indexed(admin: SocketAddr) -> HashMap<String, Vec<String>> {
    let routes: serde_json::Value = serde_json::from_str(&admin::get_ok(admin, "/routes")).unwrap();
    let mut out = HashMap::new();
    for route in routes["routes"].as_array().into_iter().flatten() {
        for c in route["containers"].as_array().into_iter().flatten() {
            let ips = c["ips"].as_array().into_iter().flatten();
            let mut ips: Vec<String> = ips.filter_map(|ip| ip.as_str()).map(String::from).collect();
            ips.sort();
            out.insert(c["name"].as_str().unwrap_or_default().to_string(), ips);
        }
    }
    out
}

/// Waits until the index has `name` with exactly the addresses `ips`.
fn wait_indexed(admin: SocketAddr, name: &str, ips: &[&str]) {
    let mut want: Vec<String> = ips.iter().map(|ip| ip.to_string()).collect();
    want.sort();
    wait_until(
        DEADLINE,
        || (indexed(admin).get(name) == Some(&want)).then_some(()),
        || {
            let now = indexed(admin).remove(name);
            format!("the index never had {name} at {want:?}; it has {now:?}")
        },
    );
}

/// The containers the index lists with address `ip`.
fn owners(admin: SocketAddr, ip: &str) -> Vec<String> {
    let mut names: Vec<String> = indexed(admin)
        .into_iter()
        .filter(|(_, ips)| ips.iter().any(|i| i == ip))
        .map(|(name, _)| name)
        .collect();
    names.sort();
    names
}

/// `ambassadord_omni_lookups_total{result=...}` from `/metrics`; 0 before the first.
fn lookups(admin: SocketAddr, result: &str) -> u64 {
    let series = format!("ambassadord_omni_lookups_total{{result=\"{result}\"}} ");
    admin::get_ok(admin, "/metrics")
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .map(|n| n.trim().parse().unwrap())
        .unwrap_or(0)
}

/// The log line of a connection served on omni route `container:port` (logged when it
/// closes, which may be just after the client has its answer).
fn served_line(amb: &Ambassador, route: &str) -> String {
    eventually_sync("the served connection's log line", || {
        amb.log().into_iter().find(|l| {
            l.contains("connection closed") && field(l, "route").as_deref() == Some(route)
        })
    })
}

/// A bad declaration is warned about once, however often its container is inspected
/// again (its start, a network connect), and /routes lists it with why beside the
/// container's good declarations; the omni route's discovery errors are its
/// containers' sources' errors, not zero.
#[test]
fn a_bad_declaration_is_warned_once_and_shown_with_why() {
    let engine = engine();
    let net = Network::create(engine);
    let (mut amb, gateway, admin) = host_omni_with_admin(engine, "bridge");
    let port = amb.addr.port();
    let env_bad = "BACKEND_7001=redis:abc".to_string();
    // A declaration whose source fails: a store nobody runs.
    let env_failing = format!("BACKEND_{port}=etcd://127.0.0.1:1/nowhere");
    let c = engine.container(
        "baddecl",
        &[
            "-e",
            &env_bad,
            "-e",
            &env_failing,
            engine.busybox_image(),
            "sleep",
            "600",
        ],
    );
    let warning = amb.wait_for_log("BACKEND_7001");
    assert!(warning.contains("port 'abc' is not a number"), "{warning}");
    // Inspected again: connected to another network (the index re-reads it).
    engine.docker_ok(&["network", "connect", &net.name, &c.name]);
    let on_net = ip_on(engine, &c, &net.name);
    wait_indexed(admin, &c.name, &[&c.ip(), &on_net]);
    assert_eq!(amb.count_log("BACKEND_7001"), 1, "{:#?}", amb.log());
    // Its failing source counts, once something has used it.
    let _ = c.exec(&[
        "sh",
        "-c",
        &format!("timeout 5 nc {gateway} {port} </dev/null"),
    ]);
    let routes: serde_json::Value = serde_json::from_str(&admin::get_ok(admin, "/routes")).unwrap();
    let shown = routes["routes"][0]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == c.name.as_str())
        .cloned()
        .unwrap();
    let bad = shown["bad_declarations"].as_array().unwrap();
    assert_eq!(bad.len(), 1, "{shown}");
    assert!(bad[0].as_str().unwrap().contains("BACKEND_7001"), "{shown}");
    eventually_sync("the failing source's errors to show", || {
        let routes: serde_json::Value =
            serde_json::from_str(&admin::get_ok(admin, "/routes")).ok()?;
        (routes["routes"][0]["discovery_errors"].as_u64()? > 0).then_some(())
    });
    drop(c);
}

/// A container's own route options: `ambassadord.proxy-protocol.<port>` gives its
/// backend a header naming the container's address and the port it connected to, and
/// `ambassadord.max-connections.<port>` caps that container's open connections there.
#[tokio::test(flavor = "multi_thread")]
async fn a_declaration_sets_its_proxy_header_and_its_limit() {
    let engine = engine();
    let (mut amb, gateway, admin) = host_omni_with_admin(engine, "bridge");
    let port = amb.addr.port();
    let (backend, _) = crate::support::proxy_header::backend(&format!("{gateway}:0")).await;
    let env = format!("BACKEND_{port}={}", backend.addr);
    let pp = format!("ambassadord.proxy-protocol.{port}=v2");
    let max = format!("ambassadord.max-connections.{port}=1");
    let c = engine.container(
        "pp",
        &[
            "-e",
            &env,
            "--label",
            &pp,
            "--label",
            &max,
            engine.busybox_image(),
            "sleep",
            "600",
        ],
    );
    let ip = ip_on(engine, &c, "bridge");
    let once = format!("echo | timeout 5 nc {gateway} {port}");
    let line = eventually_sync("the container is served", || {
        c.exec(&["sh", "-c", &once])
            .ok()
            .filter(|out| out.starts_with("SRC "))
    });
    let want = format!("DST {gateway}:{port} v2");
    assert!(line.starts_with(&format!("SRC {ip}:")), "{line}");
    assert!(line.trim_end().ends_with(&want), "{line}");
    // One connection held open; a second one meanwhile is refused at once.
    let two = format!(
        "mkdir -p /tmp; (sleep 4 | nc {gateway} {port} > /tmp/first) & sleep 1; \
         echo hi | timeout 3 nc {gateway} {port} > /tmp/second; wait; \
         cat /tmp/first; echo ---; cat /tmp/second"
    );
    let out = c.exec(&["sh", "-c", &two]).unwrap();
    let (first, second) = out.split_once("---").unwrap();
    assert!(first.trim().starts_with(&format!("SRC {ip}:")), "{out}");
    assert_eq!(second.trim(), "", "{out}");
    let refused = amb.wait_for_log("has its limit of 1 connections to port");
    assert!(refused.contains("connection refused"), "{refused}");
    assert_eq!(admin::refused(admin, amb.addr, "max_connections"), 1.0);
}

/// A container declares `BACKEND_<port>=tls+HOST:PORT`: it speaks plain TCP to the omni
/// ambassador, which reaches a `--tls-listen` ambassador in another network namespace
/// over TLS, presenting its certificate; the remote one checks it against
/// `--tls-allow` and logs whose it was.
#[test]
fn a_tls_declaration_reaches_a_tls_listener_in_another_namespace() {
    use crate::support::netns::Netns;
    use crate::support::pki::{Pki, San};
    let engine = engine();
    let mut remote_host = Netns::new();
    let (remote_ip, _) = remote_host.veth();
    let pki = Pki::new("omni");
    let remote_leaf = pki.leaf("remote", &[San::Ip(remote_ip.into())]);
    let omni_leaf = pki.leaf("omni", &[San::Uri("spiffe://test/omni")]);
    // The service in the other namespace: a line-echo that names itself, on its loopback.
    let service = remote_host.inside(|| {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            use std::io::{BufRead, Write};
            for mut s in l.incoming().map_while(Result::ok) {
                let mut line = String::new();
                let _ = std::io::BufReader::new(&s).read_line(&mut line);
                let _ = write!(s, "remote got {line}");
            }
        });
        addr
    });
    let (ip, service) = (remote_ip.to_string(), service.to_string());
    let mut args = vec!["--bind", &ip, "--port", "0", "--admin", "off"];
    args.extend(pki.listen_args(&remote_leaf));
    args.extend(["--tls-allow", "spiffe://test/omni", &service]);
    let mut remote = Ambassador::start_in(&remote_host.name, &args);
    let docker_host = format!(
        "unix://{}",
        engine.socket_path().expect("a unix socket engine")
    );
    let (omni, gateway) =
        host_omni_on(engine, "bridge", &docker_host, &pki.sender_args(&omni_leaf));
    let port = omni.addr.port();
    let env = format!("BACKEND_{port}=tls+{}", remote.addr);
    let c = engine.container(
        "tls-client",
        &["-e", &env, engine.busybox_image(), "sleep", "600"],
    );
    let once = format!("echo hello | timeout 5 nc {gateway} {port}");
    let reply = eventually_sync("the container is served over TLS", || {
        c.exec(&["sh", "-c", &once])
            .ok()
            .filter(|out| out.contains("remote got"))
    });
    assert_eq!(reply.trim(), "remote got hello");
    let line = remote.wait_for_log("connection closed");
    assert!(line.contains("tls_peer=URI:spiffe://test/omni"), "{line}");
}
