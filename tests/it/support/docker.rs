//! The Docker half of the test harness: a real Docker engine for the tests, images built
//! from local files (no registry is reachable), and containers removed when a test ends.
//!
//! Which engine: `DOCKER_HOST` when it is set; else a system daemon on
//! /var/run/docker.sock; else the harness starts its own `dockerd` (Debian's docker.io;
//! root needed) with its own socket, exec root, pidfile and data root (below
//! [`STATE_DIR`] and [`DATA_ROOT`]), so it never touches a system daemon's state and its
//! images survive between runs. The harness's daemon is started once per test run, on
//! first use, and gets SIGTERM when the test process ends however it ends (see
//! `process.rs`): dockerd then stops its containers and exits. A daemon it did not start
//! it never stops.
//!
//! Images: [`Engine::busybox_image`] is `FROM scratch` plus Debian's busybox-static and a
//! link per applet (sh, nc, wget, httpd, ...), for clients and backends;
//! [`Engine::ambassadord_image`] runs scripts/build-image, the same script users run.
//! Each is built once per test run and reused when it is already up to date.

use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::{DEADLINE, process, wait_until};

/// Socket, pidfile, exec root and the daemon's log for the harness's own dockerd.
pub const STATE_DIR: &str = "/run/ambassadord-test";
/// Images and containers of the harness's own dockerd; kept between runs.
pub const DATA_ROOT: &str = "/var/lib/ambassadord-test/docker";
/// Every container a test starts carries this label (and `LABEL.pid=<test pid>`), so
/// leftovers of a killed run can be found and removed.
pub const LABEL: &str = "ambassadord-test";
/// How long the daemon may take to answer after it is started (or a previous run's
/// daemon to finish stopping), and a docker command to run.
const ENGINE_START: Duration = Duration::from_secs(60);
const COMMAND_DEADLINE: Duration = Duration::from_secs(120);
/// How long scripts/build-image may take (a cold static release build on 2 cores).
const BUILD_DEADLINE: Duration = Duration::from_secs(1800);

/// A Docker engine the tests can use.
pub struct Engine {
    /// `unix:///...`, passed to every docker command as DOCKER_HOST.
    pub host: String,
}

/// The engine, started or found on first use. Fails the test with the reason (and the
/// daemon's log) when there is none and one cannot be started.
pub fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Result<Engine, String>> = OnceLock::new();
    match ENGINE.get_or_init(Engine::find_or_start) {
        Ok(engine) => engine,
        Err(why) => panic!("no Docker engine for this test: {why}"),
    }
}

impl Engine {
    fn find_or_start() -> Result<Engine, String> {
        if let Ok(host) = std::env::var("DOCKER_HOST") {
            return Self::found(host, "DOCKER_HOST");
        }
        if ping(Path::new("/var/run/docker.sock")) {
            return Self::found("unix:///var/run/docker.sock".into(), "the system daemon");
        }
        let state = Path::new(STATE_DIR);
        let own_sock = state.join("docker.sock");
        if !ping(&own_sock) {
            start_dockerd(state, &own_sock)?;
        } else {
            // Another test process is running the suite: share its daemon (it stops
            // when that process ends).
            eprintln!(
                "using the dockerd another test run started on {}",
                own_sock.display()
            );
        }
        let engine = Engine {
            host: format!("unix://{}", own_sock.display()),
        };
        engine.remove_leftovers();
        Ok(engine)
    }

    fn found(host: String, from: &str) -> Result<Engine, String> {
        let engine = Engine { host };
        engine
            .docker(&["version", "--format", "{{.Server.Version}}"])
            .map_err(|e| {
                format!(
                    "the Docker engine from {from} ({}) does not answer: {e}",
                    engine.host
                )
            })?;
        engine.remove_leftovers();
        Ok(engine)
    }

    /// A `docker` command aimed at this engine.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("docker");
        cmd.env("DOCKER_HOST", &self.host)
            .env("DOCKER_CLI_HINTS", "false")
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    /// Runs a docker command to completion; `Err` carries the exit status and stderr.
    pub fn docker(&self, args: &[&str]) -> Result<String, String> {
        let out = output_within(self.command(args), COMMAND_DEADLINE)
            .map_err(|e| format!("docker {}: {e}", args.join(" ")))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(format!(
                "docker {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Runs a docker command that must succeed, failing the test otherwise.
    pub fn docker_ok(&self, args: &[&str]) -> String {
        self.docker(args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs a docker command to completion and returns its raw output, whatever its status.
    pub fn docker_output(&self, args: &[&str]) -> Output {
        output_within(self.command(args), COMMAND_DEADLINE)
            .unwrap_or_else(|e| panic!("docker {}: {e}", args.join(" ")))
    }

    /// `FROM scratch` with busybox-static and a link for each applet: sh, nc, wget,
    /// httpd and friends for client and backend containers.
    pub fn busybox_image(&self) -> &'static str {
        static IMAGE: OnceLock<Result<String, String>> = OnceLock::new();
        match IMAGE.get_or_init(|| self.build_busybox()) {
            Ok(tag) => tag,
            Err(why) => panic!("cannot build the busybox test image: {why}"),
        }
    }

    fn build_busybox(&self) -> Result<String, String> {
        let busybox = Path::new("/bin/busybox");
        let bytes = std::fs::read(busybox).map_err(|e| {
            format!(
                "{}: {e} (install Debian's busybox-static)",
                busybox.display()
            )
        })?;
        // Tagged by the binary's hash: an existing image is reused only if it is current.
        let digest = super::sha256(&bytes);
        let tag = format!("{LABEL}/busybox:{}", hex(&digest[..8]));
        if self
            .docker(&["image", "inspect", "--format", "{{.Id}}", &tag])
            .is_ok()
        {
            return Ok(tag);
        }
        let ctx = TempDir::new("busybox")?;
        let bin = ctx.path.join("bin");
        std::fs::create_dir_all(&bin).map_err(|e| e.to_string())?;
        std::fs::write(bin.join("busybox"), &bytes).map_err(|e| e.to_string())?;
        set_executable(&bin.join("busybox"))?;
        let list = Command::new(busybox)
            .arg("--list")
            .output()
            .map_err(|e| format!("busybox --list: {e}"))?;
        for applet in String::from_utf8_lossy(&list.stdout).split_whitespace() {
            if applet != "busybox" {
                std::os::unix::fs::symlink("busybox", bin.join(applet))
                    .map_err(|e| format!("symlink {applet}: {e}"))?;
            }
        }
        std::fs::write(
            ctx.path.join("Dockerfile"),
            "FROM scratch\nCOPY bin /bin\nENV PATH=/bin\nCMD [\"/bin/sh\"]\n",
        )
        .map_err(|e| e.to_string())?;
        let ctx_path = ctx.path.to_string_lossy().into_owned();
        let mut cmd = self.command(&["build", "--quiet", "--tag", &tag, &ctx_path]);
        cmd.env("DOCKER_BUILDKIT", "0");
        let out = output_within(cmd, COMMAND_DEADLINE)?;
        if !out.status.success() {
            return Err(format!(
                "docker build: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(tag)
    }

    /// `ambassadord:latest`, built by scripts/build-image once per test process (cargo
    /// makes that quick when the static binary is already up to date).
    pub fn ambassadord_image(&self) -> &'static str {
        static IMAGE: OnceLock<Result<String, String>> = OnceLock::new();
        match IMAGE.get_or_init(|| self.build_ambassadord()) {
            Ok(tag) => tag,
            Err(why) => panic!("scripts/build-image failed: {why}"),
        }
    }

    fn build_ambassadord(&self) -> Result<String, String> {
        let tag = "ambassadord:latest";
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut cmd = Command::new(root.join("scripts/build-image"));
        cmd.arg(tag)
            .current_dir(root)
            .env("DOCKER_HOST", &self.host)
            .stdin(Stdio::null());
        let started = Instant::now();
        let out = output_within(cmd, BUILD_DEADLINE)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprintln!("{}", stderr.trim());
        if !out.status.success() {
            return Err(format!("{} : {}", out.status, stderr.trim()));
        }
        eprintln!(
            "scripts/build-image took {:.1}s",
            started.elapsed().as_secs_f64()
        );
        Ok(tag.to_string())
    }

    /// Starts a detached container (`docker run -d` with `args`, which end with the image
    /// and its command), named `<role>-<unique>`, removed when the guard drops.
    pub fn container(&self, role: &str, args: &[&str]) -> Container<'_> {
        let name = unique_name(role);
        let pid_label = format!("{LABEL}.pid={}", std::process::id());
        let mut full = vec![
            "run", "-d", "--name", &name, "--label", LABEL, "--label", &pid_label,
        ];
        full.extend_from_slice(args);
        self.docker_ok(&full);
        Container { engine: self, name }
    }

    /// The daemon's socket on this machine, for `-v PATH:/var/run/docker.sock` (omni
    /// mode's container reads the Engine API through it); `None` for a TCP DOCKER_HOST.
    pub fn socket_path(&self) -> Option<&str> {
        self.host.strip_prefix("unix://")
    }

    /// The host's own IPv4 address on `network` (a bridge network): the address of the
    /// network's bridge interface, which containers reach the host at. Read from the
    /// interface, not from the network's IPAM config: Docker leaves the default bridge's
    /// `Gateway` out of that config when it creates the bridge itself (a daemon starting
    /// with neither state nor a `docker0` link), though the bridge has the address.
    pub fn host_address(&self, network: &str) -> Ipv4Addr {
        let out = self.docker_ok(&["network", "inspect", network, "--format", "{{json .}}"]);
        let info: serde_json::Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("docker network inspect {network}: {e}: {out}"));
        // Docker names a user network's bridge br-<first 12 hex digits of its id>
        // unless the network was created with a name for it (the default bridge's is
        // docker0).
        let bridge = match info["Options"]["com.docker.network.bridge.name"].as_str() {
            Some(name) => name.to_string(),
            None => {
                let id = info["Id"].as_str().unwrap_or_default();
                format!("br-{}", &id[..12.min(id.len())])
            }
        };
        let out = Command::new("ip")
            .args(["-j", "-4", "addr", "show", "dev", &bridge])
            .output()
            .expect("run ip (iproute2; scripts/test installs it)");
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "ip -j -4 addr show dev {bridge} (network {network}): {e}: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        json[0]["addr_info"]
            .as_array()
            .into_iter()
            .flatten()
            .find_map(|a| a["local"].as_str()?.parse().ok())
            .unwrap_or_else(|| {
                panic!("bridge {bridge} of network {network} has no IPv4 address: {json}")
            })
    }

    /// Runs `--setup-iptables` from the image in `amb`'s network namespace, with
    /// NET_ADMIN and the `-e NAME=VALUE` pairs in `env`, failing the test if it fails.
    /// (The seed used --privileged; NET_ADMIN is all it needs, and some hosts, this test
    /// machine among them, cannot grant every capability --privileged asks for.)
    pub fn setup_iptables(&self, amb: &Container, env: &[&str]) {
        let net = format!("container:{}", amb.name);
        let mut args = vec!["--cap-add", "NET_ADMIN", "--net", &net];
        for e in env {
            args.extend(["-e", e]);
        }
        args.extend([self.ambassadord_image(), "--setup-iptables"]);
        let setup = self.run(&args);
        assert!(
            setup.status.success(),
            "--setup-iptables failed: {}",
            String::from_utf8_lossy(&setup.stderr)
        );
    }

    /// Runs a container to completion (`docker run --rm`) and returns its output.
    pub fn run(&self, args: &[&str]) -> Output {
        let pid_label = format!("{LABEL}.pid={}", std::process::id());
        let mut full = vec!["run", "--rm", "--label", LABEL, "--label", &pid_label];
        full.extend_from_slice(args);
        self.docker_output(&full)
    }

    /// Removes containers left by test processes that no longer exist (a run that was
    /// killed before its guards dropped).
    fn remove_leftovers(&self) {
        // Containers first: a network cannot be removed while one is attached.
        self.remove_dead(&["ps", "-a"], &["rm", "-f", "-v"]);
        self.remove_dead(&["network", "ls"], &["network", "rm"]);
    }

    /// Lists with `list` what carries [`LABEL`] and removes with `remove` each object
    /// whose `LABEL.pid` process is gone.
    fn remove_dead(&self, list: &[&str], remove: &[&str]) {
        let filter = format!("label={LABEL}");
        let format = format!("{{{{.ID}}}} {{{{.Label \"{LABEL}.pid\"}}}}");
        let mut args = list.to_vec();
        args.extend(["--filter", &filter, "--format", &format]);
        let Ok(listed) = self.docker(&args) else {
            return;
        };
        for line in listed.lines() {
            let mut parts = line.split_whitespace();
            let (Some(id), pid) = (parts.next(), parts.next()) else {
                continue;
            };
            if !pid.is_some_and(|p| Path::new("/proc").join(p).exists()) {
                let mut args = remove.to_vec();
                args.push(id);
                let _ = self.docker(&args);
            }
        }
    }
}

/// A running container, removed (with its anonymous volumes) when dropped.
pub struct Container<'e> {
    engine: &'e Engine,
    pub name: String,
}

impl Container<'_> {
    /// Its whole log so far (stdout and stderr).
    pub fn logs(&self) -> String {
        let out = self.engine.docker_output(&["logs", &self.name]);
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        text
    }

    /// Whether the container is still running.
    pub fn running(&self) -> bool {
        self.engine
            .docker(&["inspect", "--format", "{{.State.Running}}", &self.name])
            .is_ok_and(|s| s == "true")
    }

    /// Waits until a log line contains `needle` and returns it; fails the test, showing
    /// the log, when the container exits first or the deadline passes.
    pub fn wait_for_log(&self, needle: &str) -> String {
        let find = |logs: &str| logs.lines().find(|l| l.contains(needle)).map(String::from);
        wait_until(
            DEADLINE,
            || {
                let running = self.running();
                // Read after the state: a line logged just before exiting is still seen.
                let found = find(&self.logs());
                if found.is_none() && !running {
                    panic!(
                        "container {} exited before logging {needle:?}:\n{}",
                        self.name,
                        self.logs()
                    );
                }
                found
            },
            || {
                format!(
                    "container {} logged no line with {needle:?}:\n{}",
                    self.name,
                    self.logs()
                )
            },
        )
    }

    /// `docker exec` in the container; `Err` carries the status and stderr.
    pub fn exec(&self, args: &[&str]) -> Result<String, String> {
        let mut full = vec!["exec", self.name.as_str()];
        full.extend_from_slice(args);
        self.engine.docker(&full)
    }

    /// Waits until `docker exec args` succeeds (a server inside the container is up).
    pub fn wait_for_exec(&self, what: &str, args: &[&str]) -> String {
        let last = std::cell::RefCell::new(String::new());
        wait_until(
            DEADLINE,
            || match self.exec(args) {
                Ok(out) => Some(out),
                Err(e) if self.running() => {
                    *last.borrow_mut() = e;
                    None
                }
                Err(e) => panic!("{what} in {}: {e} (it exited)\n{}", self.name, self.logs()),
            },
            || {
                format!(
                    "{what} in {}: {}\n{}",
                    self.name,
                    last.borrow(),
                    self.logs()
                )
            },
        )
    }

    /// The container's IPv4 address on the default bridge.
    pub fn ip(&self) -> String {
        self.engine.docker_ok(&[
            "inspect",
            "--format",
            "{{.NetworkSettings.IPAddress}}",
            &self.name,
        ])
    }
}

impl Drop for Container<'_> {
    fn drop(&mut self) {
        let _ = self.engine.docker(&["rm", "-f", "-v", &self.name]);
    }
}

/// A user-defined bridge network with a known /24 subnet (so a test can pick an
/// address) and the subnet's first address as its gateway, removed (after the containers
/// on it, which must be dropped first) when dropped. The subnet is one not in use, so
/// tests sharing the daemon never collide.
pub struct Network<'e> {
    pub engine: &'e Engine,
    pub name: String,
    /// The first three octets of the subnet.
    prefix: String,
}

impl<'e> Network<'e> {
    pub fn create(engine: &'e Engine) -> Self {
        let name = unique_name("net");
        let pid_label = format!("{LABEL}.pid={}", std::process::id());
        let start = fastrand::u8(..);
        for n in (0..=255u8).map(|i| start.wrapping_add(i)) {
            let prefix = format!("10.213.{n}");
            let subnet = format!("{prefix}.0/24");
            let gateway = format!("{prefix}.1");
            let created = engine.docker(&[
                "network",
                "create",
                "--subnet",
                &subnet,
                "--gateway",
                &gateway,
                "--label",
                LABEL,
                "--label",
                &pid_label,
                &name,
            ]);
            match created {
                Ok(_) => {
                    return Network {
                        engine,
                        name,
                        prefix,
                    };
                }
                Err(e) if e.contains("overlaps") => continue,
                Err(e) => panic!("{e}"),
            }
        }
        panic!("no free /24 in 10.213.0.0/16 for a test network");
    }

    /// The `docker run` argument that attaches a container to this network.
    pub fn on(&self) -> String {
        format!("--network={}", self.name)
    }

    /// The address `host` in the network's subnet.
    pub fn addr(&self, host: u8) -> String {
        format!("{}.{host}", self.prefix)
    }
}

impl Drop for Network<'_> {
    fn drop(&mut self) {
        let _ = self.engine.docker(&["network", "rm", &self.name]);
    }
}

/// A container name unique to this test process and call.
pub fn unique_name(role: &str) -> String {
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{LABEL}-{}-{}-{role}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Starts the harness's own dockerd and waits until it answers. A daemon of an earlier
/// run that is still stopping (it got SIGTERM when that run ended) is waited for first.
fn start_dockerd(state: &Path, sock: &Path) -> Result<(), String> {
    if Command::new("dockerd").arg("--version").output().is_err() {
        return Err(
            "dockerd is not installed (apt-get install docker.io; scripts/test does)".into(),
        );
    }
    std::fs::create_dir_all(state.join("exec"))
        .map_err(|e| format!("cannot create {STATE_DIR}: {e}"))?;
    let pidfile = state.join("dockerd.pid");
    let started = Instant::now();
    while let Some(pid) = running_dockerd(&pidfile) {
        if started.elapsed() > ENGINE_START {
            return Err(format!(
                "dockerd {pid} from {} is running but {} does not answer; stop it (kill {pid})",
                pidfile.display(),
                sock.display(),
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // A stale pidfile (the daemon was killed) would make dockerd refuse to start.
    let _ = std::fs::remove_file(&pidfile);
    let _ = std::fs::remove_file(sock);
    std::fs::create_dir_all(DATA_ROOT).map_err(|e| format!("cannot create {DATA_ROOT}: {e}"))?;
    let log_path = state.join("dockerd.log");
    let log = std::fs::File::create(&log_path)
        .map_err(|e| format!("cannot create {}: {e}", log_path.display()))?;
    let dir = |p: &Path| p.to_string_lossy().into_owned();
    let mut cmd = Command::new("dockerd");
    cmd.arg(format!("--data-root={DATA_ROOT}"))
        .arg(format!("--exec-root={}", dir(&state.join("exec"))))
        .arg(format!("--pidfile={}", dir(&pidfile)))
        .arg(format!("--host=unix://{}", dir(sock)))
        // Containers talk to each other on the bridge; nothing needs to leave the host,
        // so the host's forwarding and NAT stay as they are.
        .args(["--ip-forward=false", "--ip-masq=false"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    let mut child =
        process::spawn(cmd, Signal::SIGTERM).map_err(|e| format!("cannot start dockerd: {e}"))?;
    let start = Instant::now();
    while !ping(sock) {
        let exited = child.try_wait().ok().flatten();
        if exited.is_some() || start.elapsed() > ENGINE_START {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            let why = match exited {
                Some(status) => format!("dockerd exited ({status})"),
                None => format!(
                    "dockerd did not answer on {} within {ENGINE_START:?}",
                    sock.display()
                ),
            };
            return Err(format!(
                "{why}; the end of {}:\n{}",
                log_path.display(),
                tail.join("\n")
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "started dockerd on {} in {:.1}s (data root {DATA_ROOT})",
        sock.display(),
        start.elapsed().as_secs_f64()
    );
    // Not waited for: it runs until the test process ends (dropping a Child leaves the
    // process alone).
    drop(child);
    Ok(())
}

/// The pid in `pidfile` if a dockerd with that pid is alive.
fn running_dockerd(pidfile: &Path) -> Option<String> {
    let pid = std::fs::read_to_string(pidfile).ok()?.trim().to_string();
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    (comm.trim() == "dockerd").then_some(pid)
}

/// Whether a Docker daemon answers `GET /_ping` on this socket.
fn ping(sock: &Path) -> bool {
    let Ok(mut s) = UnixStream::connect(sock) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
    if s.write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    reply.starts_with("HTTP/1.") && reply.contains(" 200 ") && reply.ends_with("OK")
}

/// A temporary directory removed on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn new(what: &str) -> Result<TempDir, String> {
        let path = std::env::temp_dir().join(unique_name(what));
        std::fs::create_dir_all(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(TempDir { path })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

fn set_executable(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("chmod {}: {e}", path.display()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs a command to completion, killing it after `deadline`; says when the program is
/// not installed.
pub fn output_within(mut cmd: Command, deadline: Duration) -> Result<Output, String> {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => format!(
                "{:?} is not installed (scripts/test installs it with apt-get)",
                cmd.get_program()
            ),
            _ => format!("cannot run {:?}: {e}", cmd.get_program()),
        })?;
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(deadline) {
        Ok(out) => out.map_err(|e| e.to_string()),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            Err(format!("did not finish within {deadline:?}"))
        }
    }
}
