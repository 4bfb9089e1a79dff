//! The Compose files users copy, docs/compose/*.yml, brought up as they are with
//! Debian's `docker-compose` (v1, 1.29) against the test engine: each must start, wait
//! for the ambassador's health check, and route the client's requests to the backend.
//! Only the images (local ones: no registry is reachable) and the Docker socket's path
//! are passed in, through the variables the files document.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use crate::support::docker::{Engine, LABEL, engine, output_within, unique_name};
use crate::support::wait_until;

/// How long one docker-compose command may take: `up` waits for the ambassador to be
/// healthy, which takes one health check interval (10 s) and more on a loaded machine.
const COMPOSE_DEADLINE: Duration = Duration::from_secs(180);
/// How long the client may take to print the backend's answer once `up` returned.
const ROUTED: Duration = Duration::from_secs(60);
/// How often the logs are read again while waiting (each read runs docker-compose).
const POLL: Duration = Duration::from_millis(500);

/// A Compose project brought up from one of docs/compose's files under a name unique to
/// this test process; `down -v --remove-orphans` when dropped, however the test ends.
struct Project {
    engine: &'static Engine,
    file: PathBuf,
    name: String,
}

impl Project {
    /// `docker-compose -f docs/compose/<file> -p <unique> up -d`; fails the test with
    /// docker-compose's output and every service's log if it does not succeed.
    fn up(file: &str) -> Project {
        let engine = engine();
        // Built before compose runs: compose would try to pull an image it lacks.
        engine.ambassadord_image();
        engine.busybox_image();
        remove_dead_projects(engine);
        let project = Project {
            engine,
            file: Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("docs/compose")
                .join(file),
            name: unique_name("compose"),
        };
        let started = Instant::now();
        let out = project.compose(&["up", "-d"]);
        assert!(
            out.status.success(),
            "docker-compose up -d ({file}) failed ({}):\n{}\n{}",
            out.status,
            text(&out),
            project.logs(&[])
        );
        eprintln!(
            "docker-compose up -d ({file}, project {}) took {:.1}s",
            project.name,
            started.elapsed().as_secs_f64()
        );
        project
    }

    /// `docker-compose -f FILE -p NAME args...` with the engine and the images in its
    /// environment.
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("docker-compose");
        cmd.args(["--ansi", "never"])
            .arg("-f")
            .arg(&self.file)
            .args(["-p", &self.name])
            .args(args)
            .env("DOCKER_HOST", &self.engine.host)
            .env("AMBASSADORD_IMAGE", self.engine.ambassadord_image())
            .env("BUSYBOX_IMAGE", self.engine.busybox_image())
            .env_remove("COMPOSE_FILE")
            .env_remove("COMPOSE_PROJECT_NAME")
            .stdin(Stdio::null());
        // The socket omni.yml mounts into the ambassador: the test engine's, which is
        // not at the default /var/run/docker.sock when the harness started its own.
        if let Some(socket) = self.engine.socket_path() {
            cmd.env("DOCKER_SOCKET", socket);
        }
        cmd
    }

    /// Runs a docker-compose command to completion, whatever its exit status; fails the
    /// test if docker-compose is missing or does not finish within [`COMPOSE_DEADLINE`].
    fn compose(&self, args: &[&str]) -> Output {
        output_within(self.command(args), COMPOSE_DEADLINE)
            .unwrap_or_else(|e| panic!("docker-compose {} ({}): {e}", args.join(" "), self.name))
    }

    /// `docker-compose logs` of `services` (every service when empty), for messages.
    fn logs(&self, services: &[&str]) -> String {
        let mut args = vec!["logs", "--no-color"];
        args.extend_from_slice(services);
        match output_within(self.command(&args), COMPOSE_DEADLINE) {
            Ok(out) => text(&out),
            Err(e) => format!("(docker-compose logs: {e})"),
        }
    }

    /// Waits until `service`'s log has a line containing `needle` and returns it; fails
    /// the test with every service's log after `deadline`.
    fn wait_for_log(&self, service: &str, needle: &str, deadline: Duration) -> String {
        wait_until(
            deadline,
            || {
                let found = self
                    .logs(&[service])
                    .lines()
                    .find(|l| l.contains(needle))
                    .map(String::from);
                if found.is_none() {
                    std::thread::sleep(POLL);
                }
                found
            },
            || {
                format!(
                    "{service} of {} logged no line with {needle:?} within {deadline:?}:\n{}",
                    self.file.display(),
                    self.logs(&[])
                )
            },
        )
    }

    /// `docker-compose exec -T service args...`: its output, whatever its status.
    fn exec(&self, service: &str, args: &[&str]) -> Output {
        let mut full = vec!["exec", "-T", service];
        full.extend_from_slice(args);
        self.compose(&full)
    }

    /// The address of `service`'s container on the project's `network`.
    fn ip_on(&self, service: &str, network: &str) -> String {
        let out = self.compose(&["ps", "-q", service]);
        let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(!id.is_empty(), "no container for {service}: {}", text(&out));
        let format = format!(
            "{{{{(index .NetworkSettings.Networks \"{}_{network}\").IPAddress}}}}",
            self.name
        );
        let ip = self
            .engine
            .docker_ok(&["inspect", "--format", &format, &id]);
        assert!(!ip.is_empty(), "{service} has no address on {network}");
        ip
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        let out = output_within(
            self.command(&["down", "-v", "--remove-orphans", "-t", "2"]),
            COMPOSE_DEADLINE,
        );
        match out {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!("docker-compose down ({}): {}", self.name, text(&out)),
            Err(e) => eprintln!("docker-compose down ({}): {e}", self.name),
        }
    }
}

/// omni.yml: the omni ambassador, given NET_ADMIN, installs its own redirect (no setup
/// container), becomes healthy so `app` starts, and routes `app`'s connections to
/// `backends:8080` to `web:80` as app's BACKEND_8080 declares, `web` resolved through
/// Docker's DNS on the project's network.
#[test]
fn omni_compose_file_routes_the_client_by_its_declaration() {
    let started = Instant::now();
    let project = Project::up("omni.yml");
    project.wait_for_log("app", "hello from web", ROUTED);
    let line = project.wait_for_log(
        "backends",
        "omni: installed the redirect of incoming TCP",
        ROUTED,
    );
    assert!(
        line.contains("the admin port is kept out of it"),
        "the admin endpoint on 0.0.0.0 should be kept out of the redirect: {line}"
    );
    eprintln!("omni.yml routed in {:.1}s", started.elapsed().as_secs_f64());
}

/// network.yml: `app`, only on the front network, gets `web`'s answer through
/// `web-ambassador`, which is on both networks, and cannot reach `web` itself, neither
/// by name nor by its address on the back network.
#[test]
fn network_compose_file_bridges_the_two_networks() {
    let started = Instant::now();
    let project = Project::up("network.yml");
    project.wait_for_log("app", "hello from the back network", ROUTED);

    // The exec path works (so the failures below are the network's)...
    let out = project.exec(
        "app",
        &["timeout", "5", "wget", "-qO-", "http://web-ambassador/"],
    );
    assert!(
        out.status.success() && text(&out).contains("hello from the back network"),
        "app through web-ambassador: {}\n{}",
        text(&out),
        project.logs(&[])
    );
    // ...but web is not on app's network: its name does not resolve there (Docker's DNS
    // says so, or, with no upstream resolver to ask, the lookup times out)...
    let out = project.exec("app", &["timeout", "3", "wget", "-qO-", "http://web/"]);
    assert!(
        !out.status.success(),
        "app reached web by name ({}): {}\n{}",
        out.status,
        text(&out),
        project.logs(&[])
    );
    // ...and its address on the back network is not reachable from the front one.
    let web = project.ip_on("web", "back");
    let out = project.exec(
        "app",
        &["timeout", "3", "wget", "-qO-", &format!("http://{web}/")],
    );
    assert!(
        !out.status.success(),
        "app reached web at {web} ({}): {}\n{}",
        out.status,
        text(&out),
        project.logs(&[])
    );
    eprintln!(
        "network.yml routed and isolated in {:.1}s",
        started.elapsed().as_secs_f64()
    );
}

/// Takes down the containers and networks of projects whose test process is gone (a run
/// killed before its guards dropped; `restart: always` would otherwise bring them back
/// with every start of the engine). The project name carries the pid, as every
/// [`unique_name`] does.
fn remove_dead_projects(engine: &Engine) {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let label = "com.docker.compose.project";
        let format = format!("{{{{.ID}}}} {{{{.Label \"{label}\"}}}}");
        let filter = format!("label={label}");
        let prefix = format!("{LABEL}-");
        for list in [&["ps", "-a"][..], &["network", "ls"][..]] {
            let mut args = list.to_vec();
            args.extend(["--filter", &filter, "--format", &format]);
            let Ok(listed) = engine.docker(&args) else {
                continue;
            };
            for line in listed.lines() {
                let mut parts = line.split_whitespace();
                let (Some(id), Some(project)) = (parts.next(), parts.next()) else {
                    continue;
                };
                let Some(pid) = project
                    .strip_prefix(&prefix)
                    .and_then(|rest| rest.split('-').next())
                else {
                    continue;
                };
                if !Path::new("/proc").join(pid).exists() {
                    let _ = if list[0] == "ps" {
                        engine.docker(&["rm", "-f", "-v", id])
                    } else {
                        engine.docker(&["network", "rm", id])
                    };
                }
            }
        }
    });
}

/// stdout and stderr together.
fn text(out: &Output) -> String {
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    s.trim().to_string()
}
