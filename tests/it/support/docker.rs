//! The Docker half of the test harness: a real Docker engine for the tests, images built
//! from local files (no registry is reachable), and containers removed when a test ends.
//!
//! Which engine: `DOCKER_HOST` when it is set; else the harness's own daemon if one is
//! running; else a system daemon on /var/run/docker.sock; else the harness starts its own
//! `dockerd` (Debian's docker.io; root needed) with its own socket, exec root, pidfile and
//! data root (below [`STATE_DIR`] and [`DATA_ROOT`]), so it never touches a system
//! daemon's state and its images survive between runs. A daemon it did not start it never
//! stops.
//!
//! Stopping its own daemon: every test process that uses that daemon holds a shared
//! `flock` on `lease.lock` for as long as it lives (a `flock` child whose stdin is a pipe
//! from the test process, so the kernel releases it however the process ends, panic and
//! SIGKILL included). The daemon is started under a small watchdog shell that waits for
//! the last lease to go, lingers a few seconds so the next test binary of the same
//! `cargo test` can reuse the daemon, then stops dockerd (which stops its containers).
//! `start.lock` makes "is it running? start it; take a lease" one step across processes,
//! so two test processes started at once share one daemon, and a process never joins a
//! daemon that is being stopped.
//!
//! Images: [`Engine::busybox_image`] is `FROM scratch` plus Debian's busybox-static and a
//! link per applet (sh, nc, wget, httpd, ...), for clients and backends;
//! [`Engine::ambassadord_image`] runs scripts/build-image, the same script users run.
//! Each is built once per test process and reused when it is already up to date.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::DEADLINE;

/// Sockets, pidfile, exec root, locks and the daemon's log for the harness's own dockerd.
pub const STATE_DIR: &str = "/run/ambassadord-test";
/// Images and containers of the harness's own dockerd; kept between runs.
pub const DATA_ROOT: &str = "/var/lib/ambassadord-test/docker";
/// Every container a test starts carries this label (and `LABEL.pid=<test pid>`), so
/// leftovers of a killed run can be found and removed.
pub const LABEL: &str = "ambassadord-test";
/// How long the daemon may take to answer after it is started, and a docker command to run.
const ENGINE_START: Duration = Duration::from_secs(60);
const COMMAND_DEADLINE: Duration = Duration::from_secs(120);
/// How long scripts/build-image may take (a cold static release build on 2 cores).
const BUILD_DEADLINE: Duration = Duration::from_secs(1800);

/// The watchdog that owns the harness's dockerd: starts it, waits until no test process
/// holds a lease (plus a linger), then stops it while holding start.lock so nobody joins
/// a daemon on its way out. Arguments: the state dir, then dockerd's command line.
const WATCHDOG: &str = r#"
state=$1; shift
"$@" </dev/null >"$state/dockerd.log" 2>&1 &
dockerd=$!
exec 8>>"$state/start.lock" 9>>"$state/lease.lock"
while :; do
  flock -x 9 && flock -u 9        # every test process using the daemon has gone
  sleep 5                         # linger for the next test binary of this cargo test
  flock -x 8                      # nobody is checking the daemon or joining it now
  if flock -xn 9; then break; fi  # and nobody joined during the linger
  flock -u 8
done
kill -TERM "$dockerd" 2>/dev/null
wait "$dockerd"
"#;

/// A Docker engine the tests can use.
pub struct Engine {
    /// `unix:///...`, passed to every docker command as DOCKER_HOST.
    pub host: String,
    /// Whether the harness started this daemon (and its watchdog will stop it).
    pub owned: bool,
    /// Held for the life of the test process when the daemon is the harness's own.
    _lease: Option<FlockHold>,
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
        let state = Path::new(STATE_DIR);
        std::fs::create_dir_all(state.join("exec"))
            .map_err(|e| format!("cannot create {STATE_DIR}: {e}"))?;
        let own_sock = state.join("docker.sock");
        let own_host = format!("unix://{}", own_sock.display());

        let start_lock = FlockHold::acquire(&state.join("start.lock"), false)?;
        let owned = if ping(&own_sock) {
            true
        } else if ping(Path::new("/var/run/docker.sock")) {
            drop(start_lock);
            return Self::found("unix:///var/run/docker.sock".into(), "the system daemon");
        } else {
            start_dockerd(state, &own_sock)?;
            true
        };
        // Joined while holding start.lock: the watchdog cannot stop the daemon between
        // the check above and this lease.
        let lease = FlockHold::acquire(&state.join("lease.lock"), true)?;
        drop(start_lock);
        let engine = Engine {
            host: own_host,
            owned,
            _lease: Some(lease),
        };
        engine.remove_leftovers();
        Ok(engine)
    }

    fn found(host: String, from: &str) -> Result<Engine, String> {
        let engine = Engine {
            host,
            owned: false,
            _lease: None,
        };
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
        let id = self.docker_ok(&full);
        Container {
            engine: self,
            name,
            id,
        }
    }

    /// The daemon's socket on this machine, for `-v PATH:/var/run/docker.sock` (omni
    /// mode's container reads the Engine API through it); `None` for a TCP DOCKER_HOST.
    pub fn socket_path(&self) -> Option<&str> {
        self.host.strip_prefix("unix://")
    }

    /// Creates a user-defined bridge network named `<role>-<unique>`, removed (after the
    /// containers on it, which must be dropped first) when the guard drops.
    pub fn network(&self, role: &str) -> Network<'_> {
        let name = unique_name(role);
        let pid_label = format!("{LABEL}.pid={}", std::process::id());
        self.docker_ok(&[
            "network", "create", "--label", LABEL, "--label", &pid_label, &name,
        ]);
        Network { engine: self, name }
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
    pub id: String,
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
        let start = Instant::now();
        loop {
            let logs = self.logs();
            if let Some(line) = logs.lines().find(|l| l.contains(needle)) {
                return line.to_string();
            }
            if !self.running() {
                let logs = self.logs();
                if let Some(line) = logs.lines().find(|l| l.contains(needle)) {
                    return line.to_string();
                }
                panic!(
                    "container {} exited before logging {needle:?}:\n{logs}",
                    self.name
                );
            }
            assert!(
                start.elapsed() < DEADLINE,
                "container {} logged no line with {needle:?}:\n{logs}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `docker exec` in the container; `Err` carries the status and stderr.
    pub fn exec(&self, args: &[&str]) -> Result<String, String> {
        let mut full = vec!["exec", self.name.as_str()];
        full.extend_from_slice(args);
        self.engine.docker(&full)
    }

    /// Waits until `docker exec args` succeeds (a server inside the container is up).
    pub fn wait_for_exec(&self, what: &str, args: &[&str]) -> String {
        let start = Instant::now();
        loop {
            match self.exec(args) {
                Ok(out) => return out,
                Err(e) => assert!(
                    start.elapsed() < DEADLINE && self.running(),
                    "{what} in {}: {e}\n{}",
                    self.name,
                    self.logs()
                ),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
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

/// A user-defined network, removed when dropped.
pub struct Network<'e> {
    engine: &'e Engine,
    pub name: String,
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

/// Starts the harness's own dockerd under its watchdog and waits until it answers.
fn start_dockerd(state: &Path, sock: &Path) -> Result<(), String> {
    if Command::new("dockerd").arg("--version").output().is_err() {
        return Err(
            "dockerd is not installed (apt-get install docker.io; scripts/test does)".into(),
        );
    }
    let pidfile = state.join("dockerd.pid");
    if let Ok(pid) = std::fs::read_to_string(&pidfile) {
        let comm = std::fs::read_to_string(format!("/proc/{}/comm", pid.trim()));
        if comm.is_ok_and(|c| c.trim() == "dockerd") {
            return Err(format!(
                "dockerd {} from {} is running but {} does not answer; stop it (kill {})",
                pid.trim(),
                pidfile.display(),
                sock.display(),
                pid.trim()
            ));
        }
        // A stale pidfile (the daemon was killed): dockerd would refuse to start.
        let _ = std::fs::remove_file(&pidfile);
    }
    let _ = std::fs::remove_file(sock);
    std::fs::create_dir_all(DATA_ROOT).map_err(|e| format!("cannot create {DATA_ROOT}: {e}"))?;
    let dir = |p: &Path| p.to_string_lossy().into_owned();
    let status = Command::new("setsid")
        .args(["-f", "sh", "-c", WATCHDOG, "sh", &dir(state), "dockerd"])
        .arg(format!("--data-root={DATA_ROOT}"))
        .arg(format!("--exec-root={}", dir(&state.join("exec"))))
        .arg(format!("--pidfile={}", dir(&pidfile)))
        .arg(format!("--host=unix://{}", dir(sock)))
        // Containers talk to each other on the bridge; nothing needs to leave the host,
        // so the host's forwarding and NAT stay as they are.
        .args(["--ip-forward=false", "--ip-masq=false"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("cannot run setsid to start dockerd: {e}"))?;
    if !status.success() {
        return Err(format!("setsid failed ({status})"));
    }
    let start = Instant::now();
    while !ping(sock) {
        if start.elapsed() > ENGINE_START {
            let log = std::fs::read_to_string(state.join("dockerd.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(format!(
                "dockerd did not answer on {} within {ENGINE_START:?}; the end of {}/dockerd.log:\n{}",
                sock.display(),
                state.display(),
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
    Ok(())
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

/// An flock(1) held by a child process until this is dropped or the test process ends
/// (the child waits for EOF on a pipe whose other end only this process holds).
struct FlockHold {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl FlockHold {
    fn acquire(path: &Path, shared: bool) -> Result<FlockHold, String> {
        let mut child = Command::new("flock")
            .arg(if shared { "-s" } else { "-x" })
            .arg(path)
            .args(["-c", "echo locked; exec cat >/dev/null"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot run flock (util-linux): {e}"))?;
        let stdin = child.stdin.take();
        let mut line = String::new();
        // flock waits as long as the lock is held; the holders only hold it briefly
        // (a daemon start at most), so no deadline beyond the read.
        BufReader::new(child.stdout.take().expect("piped"))
            .read_line(&mut line)
            .map_err(|e| format!("flock {}: {e}", path.display()))?;
        if line.trim() != "locked" {
            let _ = child.kill();
            return Err(format!("flock {} failed", path.display()));
        }
        Ok(FlockHold { child, stdin })
    }
}

impl Drop for FlockHold {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
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

/// Runs a command to completion, killing it after `deadline`.
fn output_within(mut cmd: Command, deadline: Duration) -> Result<Output, String> {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
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
