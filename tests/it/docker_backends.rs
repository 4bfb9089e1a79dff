//! `docker://` backends against a real Docker engine: the addresses of containers chosen
//! by name or label, followed through the engine's events as containers stop, start and
//! change address. The ambassador runs on the host (reaching containers over their
//! bridges) with `--docker-host` at the test engine.

use std::collections::BTreeSet;

use crate::support::docker::{Container, Engine, Network, engine, unique_name};
use crate::support::*;

/// A busybox httpd answering `/answer` with `answer` on port 80, with `extra` options.
fn backend<'e>(engine: &'e Engine, role: &str, answer: &str, extra: &[&str]) -> Container<'e> {
    let script =
        format!("mkdir -p /www && echo {answer} > /www/answer && exec httpd -f -p 80 -h /www");
    let mut args: Vec<&str> = extra.to_vec();
    args.extend([engine.busybox_image(), "sh", "-c", &script]);
    let c = engine.container(role, &args);
    wait_httpd(&c);
    c
}

fn wait_httpd(c: &Container) {
    c.wait_for_exec(
        "the backend's httpd",
        &["wget", "-qO-", "http://127.0.0.1:80/answer"],
    );
}

/// The ambassador on loopback for `spec`, reading the test engine.
fn ambassador(engine: &Engine, spec: &str) -> Ambassador {
    let mut amb = Ambassador::on_loopback(&[
        "--admin",
        "127.0.0.1:0",
        "--docker-host",
        &engine.host,
        spec,
    ]);
    amb.wait_for_log("container index ready");
    amb
}

/// One request through the ambassador: the backend's answer, or `None`.
fn answer(amb: &Ambassador) -> Option<String> {
    let (status, body) = admin::get(amb.addr, "/answer")?;
    (status == 200).then(|| body.trim().to_string())
}

fn ip_on(engine: &Engine, c: &Container, network: &str) -> String {
    let format = format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}");
    engine.docker_ok(&["inspect", "--format", &format, &c.name])
}

/// `docker://NAME:80` serves the named container, in the very first set even when a
/// container died just before the ambassador started (its `die`, replayed from the
/// event stream, must not make the index count as listed before it is). Stopped, it is
/// taken out of the set as
/// its `die` event arrives (connections are refused, not sent to a dead address);
/// started again with another address (a second container took the old one meanwhile),
/// the new address is served as soon as its httpd answers, with no polling interval in
/// between, and the log names the change.
#[test]
fn a_named_container_is_followed_through_a_restart_that_changes_its_address() {
    let engine = engine();
    let net = Network::create(engine);
    let web = backend(engine, "web", "one", &["--net", &net.name]);
    let before = ip_on(engine, &web, &net.name);
    let gone = engine.container("gone", &[engine.busybox_image(), "sleep", "600"]);
    engine.docker_ok(&["stop", "-t", "0", &gone.name]);
    let mut amb = ambassador(engine, &format!("docker://{}:80", web.name));
    wait_until(
        DEADLINE,
        || (answer(&amb)? == "one").then_some(()),
        || {
            format!(
                "docker://{} not served:\n{}",
                web.name,
                amb.log().join("\n")
            )
        },
    );
    let line = amb.wait_for_log("backends changed");
    assert!(line.contains(&format!("{before}:80")), "{line}");

    engine.docker_ok(&["stop", "-t", "1", &web.name]);
    wait_until(
        DEADLINE,
        || answer(&amb).is_none().then_some(()),
        || format!("still served after the stop:\n{}", amb.log().join("\n")),
    );
    // Another container on the network meanwhile: whichever address it is given, the
    // restarted backend cannot have its old one and also that one.
    let squatter = engine.container(
        "squatter",
        &["--net", &net.name, engine.busybox_image(), "sleep", "600"],
    );
    let taken = ip_on(engine, &squatter, &net.name);
    engine.docker_ok(&["start", &web.name]);
    wait_httpd(&web);
    let after = ip_on(engine, &web, &net.name);
    assert_ne!(after, taken);
    assert_ne!(
        after, before,
        "the engine gave {} its old address again",
        web.name
    );
    wait_until(
        std::time::Duration::from_secs(2),
        || (answer(&amb)? == "one").then_some(()),
        || {
            format!(
                "the new address {after} not served within 2 s of the httpd answering:\n{}",
                amb.log().join("\n")
            )
        },
    );
    let logs = amb.log().join("\n");
    assert!(
        logs.lines()
            .any(|l| l.contains("backends changed") && l.contains(&format!("{after}:80"))),
        "{logs}"
    );
    drop(squatter);
}

/// `docker://label=KEY=VALUE:80` serves every running container with that label, and
/// only those; one that stops leaves the set, one that starts with the label joins it.
#[test]
fn a_label_chooses_every_running_container_that_carries_it() {
    let engine = engine();
    let tier = unique_name("tier");
    let label = format!("ambassadord.test.tier={tier}");
    let a = backend(engine, "a", "a", &["--label", &label]);
    let _b = backend(engine, "b", "b", &["--label", &label]);
    let _other = backend(
        engine,
        "other",
        "other",
        &["--label", "ambassadord.test.tier=else"],
    );
    let mut amb = ambassador(engine, &format!("docker://label={label}:80"));
    let seen = |n: usize| {
        (0..n)
            .filter_map(|_| answer(&amb))
            .collect::<BTreeSet<String>>()
    };
    wait_until(
        DEADLINE,
        || (seen(6) == BTreeSet::from(["a".into(), "b".into()])).then_some(()),
        || {
            format!(
                "not both a and b (and only them): {:?}\n{}",
                seen(6),
                amb.log().join("\n")
            )
        },
    );

    engine.docker_ok(&["stop", "-t", "1", &a.name]);
    wait_until(
        DEADLINE,
        || (seen(6) == BTreeSet::from(["b".into()])).then_some(()),
        || {
            format!(
                "a still served after its stop: {:?}\n{}",
                seen(6),
                amb.log().join("\n")
            )
        },
    );
    let _c = backend(engine, "c", "c", &["--label", &label]);
    wait_until(
        DEADLINE,
        || (seen(6) == BTreeSet::from(["b".into(), "c".into()])).then_some(()),
        || format!("c did not join: {:?}\n{}", seen(6), amb.log().join("\n")),
    );
    let (_, routes) = admin::get(amb.admin_addr(), "/routes").expect("/routes");
    assert!(routes.contains("\"origin\": \"container "), "{routes}");
}

/// A malformed `docker://` spec, or a bad Docker host for one, is bad usage (exit 64)
/// with one line naming the value, as for any spec.
#[test]
fn docker_specs_are_checked_like_any_spec() {
    let (code, stderr) = run_to_exit(&["docker://web"], &[]);
    assert_eq!(code, 64, "{stderr}");
    assert!(
        stderr.contains("backend 'docker://web': missing ':PORT'"),
        "{stderr}"
    );
    let (code, stderr) = run_to_exit(&["--docker-host", "nonsense", "docker://web:80"], &[]);
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("nonsense"), "{stderr}");
}

/// Valid everywhere a spec is: a container's omni declaration `docker://NAME:80` is
/// served from the same index omni mode routes by.
#[test]
fn an_omni_declaration_can_name_a_container() {
    let engine = engine();
    let web = backend(engine, "web", "from-docker-spec", &[]);
    let (amb, gateway) = crate::docker_omni::host_omni(engine, &engine.host, &[]);
    let port = amb.addr.port();
    let declare = format!("BACKEND_{port}=docker://{}:80", web.name);
    let fetch = format!("timeout 10 wget -qO- http://{gateway}:{port}/answer");
    let out = engine.run(&["-e", &declare, engine.busybox_image(), "sh", "-c", &fetch]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "from-docker-spec",
        "{out:?}\n{}",
        amb.log().join("\n")
    );
}
