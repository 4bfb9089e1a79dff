//! `--links` and the image: the binary on loopback with link variables written by the
//! test, and the scripts/build-image image in a real Docker engine with real links.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use crate::support::docker::{Container, engine};
use crate::support::*;

/// The `listen=` addresses of every "listening" line so far.
fn listen_addrs(amb: &Ambassador) -> BTreeSet<SocketAddr> {
    amb.log()
        .iter()
        .filter(|l| l.contains("listening"))
        .filter_map(|l| field(l, "listen")?.parse().ok())
        .collect()
}

/// Through the binary, with Docker's link variables written by the test: one listener
/// per linked TCP port on the --bind address, each forwarding to its own link's address.
/// The companions (_ADDR, _PORT, _PROTO, the bare <ALIAS>_PORT), a UDP link and an
/// `_ENV_` copy of a linked container's variables are not links (the copy reuses the
/// other link's port, so taking it would refuse to start), and a malformed link is
/// skipped with a warning naming the variable while the good ones serve.
#[tokio::test(flavor = "multi_thread")]
async fn links_in_the_environment_get_one_listener_each() {
    let alpha = named_backend("127.0.0.1:0", "alpha").await;
    let beta = named_backend("127.0.0.1:0", "beta").await;
    let (pa, pb) = (alpha.addr.port(), beta.addr.port());
    let env: Vec<(String, String)> = [
        ("ALPHA_NAME", "/amb/alpha".to_string()),
        ("ALPHA_PORT", format!("tcp://127.0.0.1:{pa}")),
        (
            &format!("ALPHA_PORT_{pa}_TCP"),
            format!("tcp://127.0.0.1:{pa}"),
        ),
        (&format!("ALPHA_PORT_{pa}_TCP_ADDR"), "127.0.0.1".into()),
        (&format!("ALPHA_PORT_{pa}_TCP_PORT"), pa.to_string()),
        (&format!("ALPHA_PORT_{pa}_TCP_PROTO"), "tcp".into()),
        (
            &format!("ALPHA_ENV_OTHER_PORT_{pb}_TCP"),
            format!("tcp://127.0.0.1:{pb}"),
        ),
        ("BETA_NAME", "/amb/beta".into()),
        (
            &format!("BETA_PORT_{pb}_TCP"),
            format!("tcp://127.0.0.1:{pb}"),
        ),
        ("BETA_PORT_53_UDP", "udp://127.0.0.1:53".into()),
        ("BROKEN_PORT_7_TCP", "tcp://127.0.0.1".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    // The backends hold pa and pb on 127.0.0.1; the ambassador takes them on 127.0.0.2.
    let mut amb = Ambassador::start_with_env(&["--links", "--bind", "127.0.0.2"], &env);

    let a: SocketAddr = format!("127.0.0.2:{pa}").parse().unwrap();
    let b: SocketAddr = format!("127.0.0.2:{pb}").parse().unwrap();
    eventually("a listener per link", || async {
        (listen_addrs(&amb) == BTreeSet::from([a, b])).then_some(())
    })
    .await;
    let warning = amb.wait_for_log("BROKEN_PORT_7_TCP");
    assert!(
        warning.contains("WARN") && warning.contains("missing ':PORT'"),
        "{warning}"
    );
    for (addr, name) in [(a, "alpha\n"), (b, "beta\n")] {
        eventually(&format!("{name:?} through {addr}"), || async {
            read_reply(addr).await.ok().filter(|r| r == name)
        })
        .await;
    }
    assert_eq!(listen_addrs(&amb).len(), 2, "{:#?}", amb.log());
    // The link alias names the route: in its listening line and in the access log.
    let listening = amb.wait_for_log(&format!("listen={a}"));
    assert_eq!(
        field(&listening, "link").as_deref(),
        Some("alpha"),
        "{listening}"
    );
    let closed = amb.wait_for_log("connection closed");
    assert!(
        ["alpha", "beta"].contains(&field(&closed, "route").unwrap_or_default().as_str()),
        "{closed}"
    );
    assert!(amb.child_running());
}

/// `--links` with nothing to forward, or with two links on one port, refuses to start
/// (exit 64) with one message that says why and names the variables; AMBASSADORD_LINKS
/// turns --links on like the flag; --links with a BACKEND is ambiguous and refused.
#[test]
fn links_that_cannot_be_served_exit_64_naming_the_variables() {
    type Env<'a> = &'a [(&'a str, &'a str)];
    let cases: &[(&[&str], Env, &[&str])] = &[
        (
            &["--links"],
            &[],
            &["--links: no Docker link in the environment", "--expose"],
        ),
        (
            &[],
            &[
                ("AMBASSADORD_LINKS", "1"),
                ("DNS_PORT_53_UDP", "udp://172.17.0.2:53"),
                ("WEB_PORT_80_TCP", "tcp://172.17.0.3"),
            ],
            &[
                "no Docker link",
                "only UDP links were found, which are not forwarded: DNS_PORT_53_UDP",
                "skipped: WEB_PORT_80_TCP='tcp://172.17.0.3': missing ':PORT'",
            ],
        ),
        (
            &["--links"],
            &[
                ("CACHE_PORT_6379_TCP", "tcp://172.17.0.3:6379"),
                ("REDIS_PORT_6379_TCP", "tcp://172.17.0.2:6379"),
            ],
            &["CACHE_PORT_6379_TCP=tcp://172.17.0.3:6379 and \
                 REDIS_PORT_6379_TCP=tcp://172.17.0.2:6379 both link port 6379"],
        ),
        (
            &["--links", "10.0.0.5:6379"],
            &[("REDIS_PORT_6379_TCP", "tcp://172.17.0.2:6379")],
            &["'--links' cannot be used with '[BACKEND]'"],
        ),
    ];
    for (args, env, wants) in cases {
        let (code, stderr) = run_to_exit(args, env);
        assert_eq!(code, 64, "{args:?} {env:?}: {stderr}");
        for want in *wants {
            assert!(
                stderr.contains(want),
                "{args:?} {env:?}: {stderr} lacks {want:?}"
            );
        }
        assert_eq!(stderr.trim().lines().count(), 1, "not one line: {stderr}");
    }
}

/// The image built by scripts/build-image is one static binary on `FROM scratch` (a
/// dynamically linked binary cannot even start there) whose entry point takes
/// ambassadord's arguments.
#[test]
fn the_image_is_the_static_binary_alone_and_takes_its_arguments() {
    let engine = engine();
    let image = engine.ambassadord_image();
    let entry = engine.docker_ok(&[
        "image",
        "inspect",
        "--format",
        "{{json .Config.Entrypoint}}",
        image,
    ]);
    assert_eq!(entry, r#"["/ambassadord"]"#);
    let layers = engine.docker_ok(&[
        "image",
        "inspect",
        "--format",
        "{{len .RootFS.Layers}}",
        image,
    ]);
    assert_eq!(layers, "1", "FROM scratch plus the binary is one layer");
    let label = |key: &str| {
        let format = format!("{{{{index .Config.Labels \"org.opencontainers.image.{key}\"}}}}");
        engine.docker_ok(&["image", "inspect", "--format", &format, image])
    };
    assert_eq!(label("version"), env!("CARGO_PKG_VERSION"));
    assert_eq!(label("licenses"), "BSD-3-Clause");
    assert_eq!(label("title"), "ambassadord");
    let size: u64 = engine
        .docker_ok(&["image", "inspect", "--format", "{{.Size}}", image])
        .parse()
        .unwrap();
    eprintln!("{image}: {} KiB", size / 1024);

    let out = engine.run(&[image, "--version"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("ambassadord "),
        "{out:?}"
    );
    let out = engine.run(&[image, "--links"]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no Docker link in the environment"),
        "{out:?}"
    );
}

/// The image's HEALTHCHECK runs `ambassadord healthcheck`: a container whose route has
/// its backends turns healthy; one whose discovery never answers (an etcd nobody
/// runs) turns unhealthy. (The test shortens Docker's check interval; the command is
/// the image's own.)
#[test]
fn the_image_reports_its_health() {
    let engine = engine();
    let image = engine.ambassadord_image();
    let fast = [
        "--health-interval=1s",
        "--health-timeout=3s",
        "--health-retries=1",
        "--health-start-period=0s",
    ];
    let health = |c: &Container| {
        engine
            .docker(&["inspect", "--format", "{{.State.Health.Status}}", &c.name])
            .unwrap_or_default()
    };
    let mut args: Vec<&str> = fast.to_vec();
    args.extend([image, "127.0.0.1:1"]);
    let up = engine.container("healthy", &args);
    let mut args: Vec<&str> = fast.to_vec();
    args.extend([image, "etcd://127.0.0.1:2/nowhere"]);
    let down = engine.container("unhealthy", &args);
    wait_until(
        DEADLINE,
        || (health(&up) == "healthy").then_some(()),
        || format!("{} is {}:\n{}", up.name, health(&up), up.logs()),
    );
    wait_until(
        DEADLINE,
        || (health(&down) == "unhealthy").then_some(()),
        || format!("{} is {}:\n{}", down.name, health(&down), down.logs()),
    );
    let log = engine.docker_ok(&[
        "inspect",
        "--format",
        "{{(index .State.Health.Log 0).Output}}",
        &down.name,
    ]);
    assert!(log.contains("not ready: waiting for discovery"), "{log}");
}

/// The seed's `--links` flow in a real engine: an ambassador container linked to two
/// backend containers (`--link backend:redis --link web:web`) listens on each linked
/// port, and a client container linked to the ambassador gets each backend's own answer
/// through it. The web backend carries a variable shaped like a link on the redis port,
/// which Docker copies into the ambassador as WEB_ENV_…: were that copy taken for a link,
/// the ambassador would refuse to start.
#[test]
fn links_inside_a_container_forward_each_linked_port() {
    let engine = engine();
    let busybox = engine.busybox_image();
    let image = engine.ambassadord_image();
    let serve = |port: u16| {
        format!(
            "mkdir -p /www && echo \"$ANSWER\" > /www/answer && exec httpd -f -p {port} -h /www"
        )
    };

    let redis = engine.container(
        "redis",
        &[
            "--expose",
            "6379",
            "-e",
            "ANSWER=from-redis",
            busybox,
            "sh",
            "-c",
            &serve(6379),
        ],
    );
    let web = engine.container(
        "web",
        &[
            "--expose",
            "8080",
            "--expose",
            "53/udp",
            "-e",
            "ANSWER=from-web",
            "-e",
            "OTHER_PORT_6379_TCP=tcp://192.0.2.1:6379",
            busybox,
            "sh",
            "-c",
            &serve(8080),
        ],
    );
    for (c, port) in [(&redis, 6379), (&web, 8080)] {
        c.wait_for_exec(
            "the backend's httpd",
            &["wget", "-qO-", &format!("http://127.0.0.1:{port}/answer")],
        );
    }
    let (redis_ip, web_ip) = (redis.ip(), web.ip());

    let amb = engine.container(
        "amb",
        &[
            "--expose",
            "6379",
            "--expose",
            "8080",
            "--link",
            &format!("{}:redis", redis.name),
            "--link",
            &format!("{}:web", web.name),
            image,
            "--links",
        ],
    );
    // Ready when both routes have their backend (a connection before that is refused).
    amb.wait_for_log(&format!("added={redis_ip}:6379"));
    amb.wait_for_log(&format!("added={web_ip}:8080"));
    let logs = amb.logs();
    let listening: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("listening listen="))
        .collect();
    assert_eq!(listening.len(), 2, "{logs}");
    assert!(
        listening[0].contains(":6379")
            && listening[0].contains(&format!("backend={redis_ip}:6379")),
        "{logs}"
    );
    assert!(
        listening[1].contains(":8080") && listening[1].contains(&format!("backend={web_ip}:8080")),
        "{logs}"
    );

    let client = engine.run(&[
        "--link",
        &format!("{}:backends", amb.name),
        busybox,
        "sh",
        "-c",
        "wget -qO- http://backends:6379/answer && wget -qO- http://backends:8080/answer",
    ]);
    assert!(
        client.status.success(),
        "client: {client:?}\nambassador:\n{}",
        amb.logs()
    );
    assert_eq!(
        String::from_utf8_lossy(&client.stdout),
        "from-redis\nfrom-web\n"
    );
    // Both answers went through the ambassador, each to its own link's address.
    let logs = amb.logs();
    for backend in [format!("{redis_ip}:6379"), format!("{web_ip}:8080")] {
        assert!(
            logs.lines()
                .any(|l| l.contains("connection closed")
                    && l.contains(&format!("backend={backend}"))),
            "no connection to {backend} in:\n{logs}"
        );
    }
}

/// In a real engine, an ambassador whose only link is a UDP port exits 64 saying that
/// UDP links are not forwarded, rather than starting with nothing to serve.
#[test]
fn a_container_linked_only_over_udp_exits_64() {
    let engine = engine();
    let busybox = engine.busybox_image();
    let image = engine.ambassadord_image();
    let dns = engine.container(
        "dns",
        &["--expose", "53/udp", busybox, "sh", "-c", "exec sleep 3600"],
    );
    let out = engine.run(&["--link", &format!("{}:dns", dns.name), image, "--links"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(
        stderr.contains("only UDP links were found, which are not forwarded: DNS_PORT_53_UDP"),
        "{stderr}"
    );
}

/// The Dockerfile (for users with a registry) and scripts/build-image (used here) compile
/// the binary the same way, and build-image finds the Dockerfile's final stage in the
/// shape it rewrites; the Dockerfile's builder stage itself cannot be built without a
/// registry, so this is what keeps the two images the same.
#[test]
fn dockerfile_and_build_image_build_the_same_image() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    let script = std::fs::read_to_string(root.join("scripts/build-image")).unwrap();
    for same in [
        "RUSTFLAGS='-C target-feature=+crt-static' CARGO_PROFILE_RELEASE_STRIP=true",
        "target=\"$(uname -m)-unknown-linux-gnu\"",
        "cargo build --locked --release",
    ] {
        assert!(dockerfile.contains(same), "Dockerfile lacks {same:?}");
        assert!(script.contains(same), "scripts/build-image lacks {same:?}");
    }
    let final_stage = dockerfile
        .split_once("\n# --- final stage")
        .expect("the final-stage marker build-image looks for")
        .1;
    for line in [
        "FROM scratch",
        "COPY --from=builder /ambassadord /ambassadord",
        "ENTRYPOINT [\"/ambassadord\"]",
    ] {
        assert!(
            final_stage.lines().any(|l| l == line),
            "the final stage lacks {line:?}"
        );
    }
}

/// The image runs as nobody where the mode allows: a standard-mode container binds its
/// port (80 here, below 1024) as root, then switches to uid/gid 65534 with no
/// capability and no supplementary group, and still forwards. `AMBASSADORD_RUN_AS=0`
/// keeps it root.
#[test]
fn the_image_runs_as_nobody_once_it_listens() {
    let engine = engine();
    let image = engine.ambassadord_image();
    let web = engine.container(
        "web",
        &[
            engine.busybox_image(),
            "sh",
            "-c",
            "mkdir -p /www && echo unprivileged > /www/answer && exec httpd -f -p 80 -h /www",
        ],
    );
    web.wait_for_exec(
        "the backend's httpd",
        &["wget", "-qO-", "http://127.0.0.1/answer"],
    );
    let spec = format!("{}:80", web.ip());
    let amb = engine.container("unprivileged", &[image, &spec]);
    let line = amb.wait_for_log("switched to an unprivileged user");
    assert!(
        line.contains("uid=65534") && line.contains("gid=65534"),
        "{line}"
    );
    let (uid, gid, groups, caps) = crate::docker_redirect::process_ids(engine, &amb);
    assert_eq!(
        (uid.as_str(), gid.as_str(), groups.as_str(), caps.as_str()),
        (
            "65534 65534 65534 65534",
            "65534 65534 65534 65534",
            "",
            "0000000000000000"
        ),
        "{}",
        amb.logs()
    );
    let fetch = format!("timeout 10 wget -qO- http://{}:80/answer", amb.ip());
    let out = engine.run(&[engine.busybox_image(), "sh", "-c", &fetch]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "unprivileged",
        "{out:?}\n{}",
        amb.logs()
    );

    let root = engine.container("root", &["-e", "AMBASSADORD_RUN_AS=0", image, &spec]);
    root.wait_for_log("listening");
    let (uid, ..) = crate::docker_redirect::process_ids(engine, &root);
    assert_eq!(uid, "0 0 0 0", "{}", root.logs());
    assert!(!root.logs().contains("switched to an unprivileged user"));
}
