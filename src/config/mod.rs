//! Flags and environment → a validated [`Config`].
//!
//! Parsing (clap) does no I/O and accepts strings; validation turns them into typed values
//! and every error names the flag or environment variable it came from and the value, so
//! a typo in a container's environment is found from one log line.

use std::ffi::OsString;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, ValueEnum};

use crate::proxy::copy::CopyMode;
use crate::spec::Spec;

mod cli;
mod file;

use cli::Cli;
use file::{FileConfig, FileRoute};

/// Exit code for bad usage (EX_USAGE from sysexits.h).
pub const EXIT_USAGE: u8 = 64;

/// Where the admin endpoint listens unless told otherwise: loopback only, so metrics and
/// route details are not exposed to the network by default.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:9090";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Everything the ambassador needs to run, validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// What the process does: serve (the default), or a one-shot netfilter change.
    pub action: Action,
    pub routes: Vec<RouteConfig>,
    /// `--dns`: ask this nameserver instead of the ones in /etc/resolv.conf.
    pub dns: Option<std::net::SocketAddr>,
    /// `--docker-host`: where omni mode reads containers from.
    pub docker_host: String,
    pub settings: Settings,
    pub log: LogConfig,
    /// Bad input that validation skipped rather than refused (a malformed link variable);
    /// [`crate::run`] logs each as a warning once logging is set up.
    pub warnings: Vec<String>,
    /// The admin endpoint, unless `--admin off`.
    pub admin: Option<Admin>,
    /// `--config`: the file SIGHUP reloads.
    pub config_file: Option<PathBuf>,
    /// `--threads`: data threads (default: one per CPU). Fixed at start: a reload keeps
    /// the running count.
    pub threads: Option<usize>,
}

/// Where the admin endpoint listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admin {
    pub addr: SocketAddr,
    /// Asked for by the user (a failure to bind is then fatal), rather than the default
    /// (a failure is a warning, so a second ambassador on one host still starts).
    pub explicit: bool,
}

/// The port omni mode listens on, and so where --setup-iptables redirects by default.
pub const OMNI_PORT: u16 = 10000;

/// What the process does once configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Listen and forward until shut down.
    Serve,
    /// `--setup-iptables`: redirect incoming TCP in this network namespace to `port`, exit.
    SetupRedirect { port: u16 },
    /// `--remove-iptables`: remove that redirect, exit.
    RemoveRedirect,
}

/// Behaviour shared by every route.
#[derive(Debug, Clone)]
pub struct Settings {
    pub connect_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    pub shutdown_grace: Duration,
    pub copy: CopyMode,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            connect_timeout: Duration::from_secs(5),
            idle_timeout: None,
            shutdown_grace: Duration::from_secs(8),
            copy: CopyMode::default(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    /// A tracing filter; `None` means RUST_LOG, else "info".
    pub filter: Option<String>,
    pub format: LogFormat,
}

/// One listener and where its connections go.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub listen: Listen,
    pub target: RouteTarget,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteTarget {
    /// Standard mode: one backend spec.
    Spec(Spec),
    /// Omni mode: each connecting container's own declaration for the port.
    Omni,
}

impl fmt::Display for RouteTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RouteTarget::Spec(spec) => write!(f, "{spec}"),
            RouteTarget::Omni => f.write_str("omni (each container's BACKEND_<port>)"),
        }
    }
}

/// Where to listen: an address (`None` = every address, IPv4 and IPv6) and a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen {
    pub ip: Option<IpAddr>,
    pub port: u16,
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip {
            None => write!(f, "*:{}", self.port),
            Some(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            Some(IpAddr::V4(ip)) => write!(f, "{ip}:{}", self.port),
        }
    }
}

/// Why the command line could not be turned into a [`Config`].
#[derive(Debug)]
pub enum ConfigError {
    /// `--help` or `--version`: print this and exit 0.
    Info(String),
    /// Bad usage: print this one-line message and exit 64.
    Usage(String),
}

impl Config {
    /// Parses and validates the command line, reading AMBASSADORD_* from the environment
    /// for anything not given as a flag.
    pub fn from_args<I, T>(args: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let (cli, matches) = cli::parse(args)?;
        validate(cli, &matches).map_err(ConfigError::Usage)
    }
}

/// Names where an argument's value came from: the flag, or the environment variable.
fn origin(matches: &ArgMatches, id: &str) -> String {
    let cmd = Cli::command();
    let arg = cmd.get_arguments().find(|a| a.get_id() == id);
    match (matches.value_source(id), arg) {
        (Some(ValueSource::EnvVariable), Some(arg)) => match arg.get_env() {
            Some(env) => env.to_string_lossy().into_owned(),
            None => id.to_string(),
        },
        (_, Some(arg)) if arg.is_positional() => "BACKEND".to_string(),
        (_, Some(arg)) => format!("--{}", arg.get_long().unwrap_or(id)),
        (_, None) => id.to_string(),
    }
}

fn validate(cli: Cli, m: &ArgMatches) -> Result<Config, String> {
    if cli.setup_iptables || cli.remove_iptables {
        return redirect_action(&cli, m);
    }

    let file = match &cli.config {
        None => FileConfig::default(),
        Some(path) => file::read(path)?,
    };
    let file_name = cli
        .config
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    // A flag or env var the user set wins over the file; the file wins over defaults.
    let given = |id: &str| {
        matches!(
            m.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        )
    };
    let pick = |id: &str, cli_value: &str, file_value: &Option<String>| -> (String, String) {
        match file_value {
            Some(v) if !given(id) => (v.clone(), format!("{file_name}: {id}")),
            _ => (cli_value.to_string(), origin(m, id)),
        }
    };
    let at = |place: &str, value: &str, why: &str| format!("{place} '{value}': {why}");

    let mut routes = Vec::new();
    for (i, r) in file.route.iter().enumerate() {
        let place = format!("{file_name}: route {}", i + 1);
        routes.push(file_route(r, &place)?);
    }

    let ip = match &cli.bind {
        None => None,
        Some(s) => Some(
            s.trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
                .map_err(|_| at(&origin(m, "bind"), s, "not an IP address"))?,
        ),
    };

    let mut warnings = Vec::new();
    if cli.links {
        if cli.omnimode {
            return Err("--links and --omnimode cannot be combined: choose one mode".into());
        }
        // One route per linked port; clap has refused BACKEND and --port alongside.
        let links = crate::docker::links::from_env().map_err(|e| e.to_string())?;
        warnings.extend(
            links
                .skipped
                .iter()
                .map(|s| format!("--links: skipped a link variable: {s}")),
        );
        routes.extend(links.links.into_iter().map(|link| RouteConfig {
            listen: Listen {
                ip,
                port: link.port,
            },
            target: RouteTarget::Spec(Spec::Static(vec![link.target])),
        }));
    } else {
        let target = match (&cli.backend, cli.omnimode) {
            (Some(backend), true) => {
                return Err(format!(
                    "--omnimode takes no BACKEND (got '{backend}' from {}): each container declares its own",
                    origin(m, "backend")
                ));
            }
            (None, true) => Some(RouteTarget::Omni),
            (None, false) if cli.config.is_some() => None,
            (None, false) => {
                return Err(
                    "no backend given: pass BACKEND (for example 10.0.0.5:6379), set AMBASSADORD_BACKEND, \
                     or use --links, --omnimode or --config"
                        .into(),
                );
            }
            (Some(backend), false) => {
                Some(RouteTarget::Spec(Spec::parse(backend).map_err(|e| {
                    if origin(m, "backend") == "BACKEND" {
                        e.to_string()
                    } else {
                        format!("{} (from {})", e, origin(m, "backend"))
                    }
                })?))
            }
        };
        if let Some(target) = target {
            let port = match (&cli.port, &target) {
                (None, RouteTarget::Spec(spec)) => spec.default_listen_port(),
                (None, RouteTarget::Omni) => OMNI_PORT,
                (Some(s), _) => s
                    .parse::<u16>()
                    .map_err(|_| at(&origin(m, "port"), s, "not a port number (0-65535)"))?,
            };
            routes.push(RouteConfig {
                listen: Listen { ip, port },
                target,
            });
        }
    }
    if routes.is_empty() {
        return Err(format!(
            "{file_name}: no routes: add a [[route]] with listen and backend, or pass BACKEND"
        ));
    }
    for (i, a) in routes.iter().enumerate() {
        if routes[..i]
            .iter()
            .any(|b| b.listen == a.listen && a.listen.port != 0)
        {
            return Err(format!(
                "two routes listen on {}: each listen address can have one backend",
                a.listen
            ));
        }
    }

    let (v, o) = pick(
        "connect_timeout",
        &cli.connect_timeout,
        &file.connect_timeout,
    );
    let connect_timeout = parse_duration(&v).map_err(|why| at(&o, &v, &why))?;
    if connect_timeout.is_zero() {
        return Err(at(&o, &v, "must be more than zero"));
    }
    let (v, o) = pick("idle_timeout", &cli.idle_timeout, &file.idle_timeout);
    let idle_timeout = match v.trim() {
        "off" | "none" | "0" => None,
        s => Some(parse_duration(s).map_err(|why| at(&o, s, &why))?).filter(|d| !d.is_zero()),
    };
    let (v, o) = pick("shutdown_grace", &cli.shutdown_grace, &file.shutdown_grace);
    let shutdown_grace = parse_duration(&v).map_err(|why| at(&o, &v, &why))?;

    let log_level = match (&cli.log_level, &file.log_level) {
        (Some(l), _) => Some((l.clone(), origin(m, "log_level"))),
        (None, Some(l)) => Some((l.clone(), format!("{file_name}: log_level"))),
        (None, None) => None,
    };
    if let Some((filter, o)) = &log_level {
        // A lone word is taken by tracing as a target name, so a misspelt level would
        // silently log nothing: require a real level there.
        const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
        if !filter.contains(['=', ',']) && !LEVELS.contains(&filter.to_ascii_lowercase().as_str()) {
            return Err(at(
                o,
                filter,
                "not a log level (off, error, warn, info, debug, trace)",
            ));
        }
        tracing_subscriber::EnvFilter::try_new(filter)
            .map_err(|e| at(o, filter, &format!("not a log level or filter ({e})")))?;
    }
    let log_format = match &file.log_format {
        Some(f) if !given("log_format") => LogFormat::from_str(f, true).map_err(|_| {
            at(
                &format!("{file_name}: log_format"),
                f,
                "not a log format (text, json)",
            )
        })?,
        _ => cli.log_format,
    };

    let copy = match &file.copy {
        Some(c) if !given("copy") => CopyMode::from_str(c, true).map_err(|_| {
            at(
                &format!("{file_name}: copy"),
                c,
                "not a copy mode (auto, splice, userspace)",
            )
        })?,
        _ => cli.copy,
    };
    let threads = match (cli.threads, file.threads) {
        (Some(n), _) => Some(usize::from(n)),
        (None, Some(n)) => Some(
            usize::try_from(n)
                .ok()
                .filter(|n| (1..=1024).contains(n))
                .ok_or_else(|| {
                    at(
                        &format!("{file_name}: threads"),
                        &n.to_string(),
                        "not a thread count (1-1024)",
                    )
                })?,
        ),
        (None, None) => None,
    };

    let dns_value = match (&cli.dns, &file.dns) {
        (Some(d), _) => Some((d.clone(), origin(m, "dns"))),
        (None, Some(d)) => Some((d.clone(), format!("{file_name}: dns"))),
        (None, None) => None,
    };
    let dns = match &dns_value {
        None => None,
        Some((s, o)) => Some(parse_dns(s).map_err(|why| at(o, s, &why))?),
    };
    let (docker_host, _) = pick("docker_host", &cli.docker_host, &file.docker_host);
    let (v, o) = pick("admin", &cli.admin, &file.admin);
    let admin = match v.trim() {
        "off" | "none" | "" => None,
        s => Some(Admin {
            addr: s
                .parse::<SocketAddr>()
                .map_err(|_| at(&o, s, "not IP:PORT or off (e.g. 127.0.0.1:9090)"))?,
            explicit: given("admin") || file.admin.is_some(),
        }),
    };

    Ok(Config {
        action: Action::Serve,
        routes,
        dns,
        docker_host,
        settings: Settings {
            connect_timeout,
            idle_timeout,
            shutdown_grace,
            copy,
        },
        log: LogConfig {
            filter: log_level.map(|(l, _)| l),
            format: log_format,
        },
        warnings,
        admin,
        config_file: cli.config.clone(),
        threads,
    })
}

/// One `[[route]]` table → a route; `place` names the file and route for errors.
fn file_route(r: &FileRoute, place: &str) -> Result<RouteConfig, String> {
    let target = match (&r.backend, r.omni) {
        (Some(b), true) => {
            return Err(format!("{place}: omni = true takes no backend (got '{b}')"));
        }
        (None, true) => RouteTarget::Omni,
        (None, false) => {
            return Err(format!(
                "{place}: needs backend = \"HOST:PORT\" (or any spec), or omni = true"
            ));
        }
        (Some(b), false) => RouteTarget::Spec(Spec::parse(b).map_err(|e| format!("{place}: {e}"))?),
    };
    let default_port = match &target {
        RouteTarget::Spec(spec) => spec.default_listen_port(),
        RouteTarget::Omni => OMNI_PORT,
    };
    let listen = match r.listen.as_deref().map(str::trim) {
        None | Some("") => Listen {
            ip: None,
            port: default_port,
        },
        Some(s) => parse_listen(s).map_err(|why| format!("{place}: listen '{s}': {why}"))?,
    };
    Ok(RouteConfig { listen, target })
}

/// `IP:PORT`, `[IPV6]:PORT`, `:PORT`, `*:PORT` or `PORT`.
fn parse_listen(s: &str) -> Result<Listen, String> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(Listen {
            ip: Some(addr.ip()),
            port: addr.port(),
        });
    }
    let port = s.trim_start_matches('*').trim_start_matches(':');
    port.parse::<u16>()
        .map(|port| Listen { ip: None, port })
        .map_err(|_| "not IP:PORT, :PORT or PORT".to_string())
}

/// `--setup-iptables` / `--remove-iptables`: one-shot actions that serve nothing, so a
/// BACKEND on the command line is a mistake worth naming (one from the environment is
/// ignored, so the same container environment can run both roles).
fn redirect_action(cli: &Cli, m: &ArgMatches) -> Result<Config, String> {
    let flag = if cli.setup_iptables {
        origin(m, "setup_iptables")
    } else {
        origin(m, "remove_iptables")
    };
    if let (Some(b), Some(ValueSource::CommandLine)) = (&cli.backend, m.value_source("backend")) {
        return Err(format!(
            "{flag} runs once and exits; it takes no BACKEND (got '{b}')"
        ));
    }
    let action = if cli.remove_iptables {
        Action::RemoveRedirect
    } else {
        let port = match &cli.port {
            None => OMNI_PORT,
            Some(s) => match s.parse::<u16>() {
                Ok(0) => {
                    return Err(format!(
                        "{} '{s}': the redirect needs a real port (1-65535)",
                        origin(m, "port")
                    ));
                }
                Ok(p) => p,
                Err(_) => {
                    return Err(format!(
                        "{} '{s}': not a port number (1-65535)",
                        origin(m, "port")
                    ));
                }
            },
        };
        Action::SetupRedirect { port }
    };
    Ok(Config {
        action,
        routes: Vec::new(),
        dns: None,
        docker_host: cli.docker_host.clone(),
        warnings: Vec::new(),
        settings: Settings::default(),
        log: LogConfig {
            filter: cli.log_level.clone(),
            format: cli.log_format,
        },
        admin: None,
        config_file: None,
        threads: None,
    })
}

/// A nameserver: `IP`, `IP:PORT` or `[IPV6]:PORT` (port 53 when left out). It must be
/// an address: the resolver cannot look up its own server.
fn parse_dns(s: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(addr) = s.parse::<std::net::SocketAddr>() {
        return Ok(addr);
    }
    match s
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        Ok(ip) => Ok((ip, 53).into()),
        Err(_) => Err("not an IP address or IP:PORT".into()),
    }
}

/// A duration such as `5s`, `250ms`, `2m`, `1h` or `1.5s`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| "not a duration (use e.g. 5s, 500ms, 2m)".to_string())?;
    let scale = match unit.trim() {
        "" | "s" | "sec" | "secs" => 1.0,
        "ms" => 0.001,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        other => return Err(format!("unknown unit '{other}' (use ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(value * scale).map_err(|_| "duration out of range".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let args = std::iter::once("ambassadord").chain(args.iter().copied());
        match Config::from_args(args) {
            Ok(c) => Ok(c),
            Err(ConfigError::Usage(m)) | Err(ConfigError::Info(m)) => Err(m),
        }
    }

    #[test]
    fn static_backend_listens_on_its_port() {
        let c = parse(&["192.168.1.100:8080"]).unwrap();
        assert_eq!(
            c.routes[0].listen,
            Listen {
                ip: None,
                port: 8080
            }
        );
        assert_eq!(c.settings.connect_timeout, Duration::from_secs(5));
        assert_eq!(c.settings.idle_timeout, None);
    }

    #[test]
    fn bind_and_port_override() {
        let c = parse(&["--bind", "127.0.0.1", "--port", "7000", "10.0.0.5:6379"]).unwrap();
        assert_eq!(
            c.routes[0].listen,
            Listen {
                ip: Some("127.0.0.1".parse().unwrap()),
                port: 7000
            }
        );
        let c = parse(&["--bind", "[::1]", "10.0.0.5:6379"]).unwrap();
        assert_eq!(c.routes[0].listen.ip, Some("::1".parse().unwrap()));
    }

    #[test]
    fn discovery_specs_listen_on_10000_and_dns_parses() {
        let c = parse(&["--dns", "127.0.0.1:5353", "redis.service.consul"]).unwrap();
        assert_eq!(c.routes[0].listen.port, 10000);
        assert_eq!(c.dns, Some("127.0.0.1:5353".parse().unwrap()));
        let c = parse(&["--dns", "::1", "etcd://127.0.0.1:2379/nodes"]).unwrap();
        assert_eq!(c.dns, Some("[::1]:53".parse().unwrap()));
        assert_eq!(c.routes[0].listen.port, 10000);
        let c = parse(&["--port", "7000", "consul://127.0.0.1:8500/nodes"]).unwrap();
        assert_eq!(c.routes[0].listen.port, 7000);
    }

    #[test]
    fn omnimode_listens_on_10000_and_takes_no_backend() {
        let c = parse(&["--omnimode"]).unwrap();
        assert_eq!(c.routes[0].target, RouteTarget::Omni);
        assert_eq!(c.routes[0].listen.port, 10000);
        let err = parse(&["--omnimode", "a:1"]).unwrap_err();
        assert!(
            err.contains("--omnimode takes no BACKEND (got 'a:1'"),
            "{err}"
        );
    }

    #[test]
    fn several_backends_listen_on_the_first_port() {
        let c = parse(&["a:6379,b:6380"]).unwrap();
        assert_eq!(c.routes[0].listen.port, 6379);
    }

    #[test]
    fn timeouts_parse() {
        let c = parse(&[
            "--connect-timeout",
            "250ms",
            "--idle-timeout",
            "2m",
            "--shutdown-grace",
            "0",
            "a:1",
        ])
        .unwrap();
        assert_eq!(c.settings.connect_timeout, Duration::from_millis(250));
        assert_eq!(c.settings.idle_timeout, Some(Duration::from_secs(120)));
        assert_eq!(c.settings.shutdown_grace, Duration::ZERO);
    }

    #[test]
    fn errors_name_the_flag_and_value() {
        let cases: &[(&[&str], &str)] = &[
            (&[], "no backend given"),
            (&["10.0.0.5"], "backend '10.0.0.5': missing ':PORT'"),
            (
                &["--dns", "dns.example", "a:1"],
                "--dns 'dns.example': not an IP address",
            ),
            (&["--port", "abc", "a:1"], "--port 'abc': not a port number"),
            (
                &["--port", "70000", "a:1"],
                "--port '70000': not a port number",
            ),
            (
                &["--bind", "nowhere", "a:1"],
                "--bind 'nowhere': not an IP address",
            ),
            (
                &["--connect-timeout", "5x", "a:1"],
                "--connect-timeout '5x': unknown unit 'x'",
            ),
            (
                &["--connect-timeout", "0s", "a:1"],
                "--connect-timeout '0s': must be more than zero",
            ),
            (
                &["--idle-timeout", "soon", "a:1"],
                "--idle-timeout 'soon': not a duration",
            ),
            (
                &["--log-level", "ambassadord=loudest", "a:1"],
                "--log-level 'ambassadord=loudest': not a log level",
            ),
            (
                &["--log-level", "loud", "a:1"],
                "--log-level 'loud': not a log level",
            ),
            (
                &["--nope", "a:1"],
                "unexpected argument '--nope' found (see --help)",
            ),
            (
                &["--links", "a:1"],
                "the argument '--links' cannot be used with '[BACKEND]'",
            ),
            (
                &["--links", "--port", "80"],
                "the argument '--links' cannot be used with '--port <PORT>'",
            ),
        ];
        for (args, want) in cases {
            let err = parse(args).expect_err(want);
            assert!(err.contains(want), "{args:?}: got {err:?}, want {want:?}");
            assert!(!err.contains('\n'), "{args:?}: not one line: {err:?}");
        }
    }

    /// The redirect actions need no BACKEND, default to the omni port, take --port, and
    /// reject a port that cannot be redirected to or a BACKEND given with them.
    #[test]
    fn redirect_actions() {
        let c = parse(&["--setup-iptables"]).unwrap();
        assert_eq!(c.action, Action::SetupRedirect { port: 10000 });
        assert!(c.routes.is_empty());
        let c = parse(&["--setup-iptables", "--port", "15001"]).unwrap();
        assert_eq!(c.action, Action::SetupRedirect { port: 15001 });
        let c = parse(&["--remove-iptables"]).unwrap();
        assert_eq!(c.action, Action::RemoveRedirect);
        let c = parse(&["a:1"]).unwrap();
        assert_eq!(c.action, Action::Serve);
        let cases: &[(&[&str], &str)] = &[
            (
                &["--setup-iptables", "--port", "0"],
                "--port '0': the redirect needs a real port",
            ),
            (
                &["--setup-iptables", "--port", "x"],
                "--port 'x': not a port number",
            ),
            (
                &["--setup-iptables", "a:1"],
                "--setup-iptables runs once and exits; it takes no BACKEND (got 'a:1')",
            ),
            (
                &["--setup-iptables", "--remove-iptables"],
                "cannot be used with",
            ),
        ];
        for (args, want) in cases {
            let err = parse(args).expect_err(want);
            assert!(err.contains(want), "{args:?}: got {err:?}, want {want:?}");
            assert!(!err.contains('\n'), "{args:?}: not one line: {err:?}");
        }
    }

    #[test]
    fn durations() {
        for (s, ms) in [
            ("5s", 5000),
            ("5", 5000),
            ("1.5s", 1500),
            ("250ms", 250),
            ("2m", 120_000),
            ("1h", 3_600_000),
        ] {
            assert_eq!(parse_duration(s), Ok(Duration::from_millis(ms)), "{s}");
        }
        for s in ["", "s", "-1s", "5 parsecs", "1e9999"] {
            assert!(parse_duration(s).is_err(), "{s}");
        }
    }

    fn file(text: &str) -> std::path::PathBuf {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "ambassadord-config-{}-{}.toml",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn config_file_routes_and_options_with_flags_overriding() {
        let path = file(
            "connect_timeout = \"2s\"\nidle_timeout = \"1m\"\nadmin = \"127.0.0.1:9999\"\n\n\
             [[route]]\nlisten = \"127.0.0.1:7000\"\nbackend = \"10.0.0.5:6379\"\n\n\
             [[route]]\nbackend = \"etcd://127.0.0.1:2379/nodes\"\n\n\
             [[route]]\nlisten = \":10001\"\nomni = true\n",
        );
        let p = path.to_str().unwrap();
        let c = parse(&["--config", p, "--idle-timeout", "off"]).unwrap();
        assert_eq!(c.routes.len(), 3);
        assert_eq!(
            c.routes[0].listen,
            Listen {
                ip: Some("127.0.0.1".parse().unwrap()),
                port: 7000
            }
        );
        assert_eq!(
            c.routes[1].listen,
            Listen {
                ip: None,
                port: 10000
            }
        );
        assert_eq!(c.routes[2].target, RouteTarget::Omni);
        assert_eq!(c.routes[2].listen.port, 10001);
        assert_eq!(c.settings.connect_timeout, Duration::from_secs(2));
        // The flag wins over the file.
        assert_eq!(c.settings.idle_timeout, None);
        assert_eq!(
            c.admin,
            Some(Admin {
                addr: "127.0.0.1:9999".parse().unwrap(),
                explicit: true
            })
        );
        assert_eq!(c.config_file.as_deref(), Some(path.as_path()));
        // copy and threads come from the file unless a flag says otherwise.
        let path = file("copy = \"splice\"\nthreads = 3\n[[route]]\nbackend = \"a:1\"\n");
        let p2 = path.to_str().unwrap();
        let c = parse(&["--config", p2]).unwrap();
        assert_eq!((c.settings.copy, c.threads), (CopyMode::Splice, Some(3)));
        let c = parse(&["--config", p2, "--copy", "userspace", "--threads", "1"]).unwrap();
        assert_eq!((c.settings.copy, c.threads), (CopyMode::Userspace, Some(1)));
        // A BACKEND on the command line is one more route.
        let c = parse(&["--config", p, "--port", "7001", "10.0.0.9:1"]).unwrap();
        assert_eq!(c.routes.len(), 4);
        assert_eq!(c.routes[3].listen.port, 7001);
    }

    #[test]
    fn config_file_errors_name_the_file_and_key() {
        let cases: &[(&str, &str)] = &[
            ("bogus = 1\n", "bogus"),
            (
                "[[route]]\nbackend = \"a:1\"\nlisten_on = \":1\"\n",
                "listen_on",
            ),
            ("[[route]]\nbackend = \"a:x\"\n", "route 1: backend 'a:x'"),
            (
                "[[route]]\nlisten = \"x\"\nbackend = \"a:1\"\n",
                "route 1: listen 'x'",
            ),
            ("[[route]]\nlisten = \":1\"\n", "route 1: needs backend"),
            (
                "connect_timeout = \"fast\"\n[[route]]\nbackend = \"a:1\"\n",
                "connect_timeout 'fast'",
            ),
            ("", "no routes"),
            ("threads = 0\n[[route]]\nbackend = \"a:1\"\n", "threads '0'"),
            (
                "copy = \"fast\"\n[[route]]\nbackend = \"a:1\"\n",
                "copy 'fast'",
            ),
            (
                "[[route]]\nlisten=\":5\"\nbackend = \"a:1\"\n[[route]]\nlisten=\":5\"\nbackend = \"b:1\"\n",
                "two routes listen on *:5",
            ),
        ];
        for (text, want) in cases {
            let path = file(text);
            let err = parse(&["--config", path.to_str().unwrap()]).unwrap_err();
            assert!(err.contains(want), "{text:?}: {err}");
            assert!(
                err.contains(path.to_str().unwrap()) || want.starts_with("two"),
                "{err}"
            );
        }
        let err = parse(&["--admin", "nowhere", "a:1"]).unwrap_err();
        assert!(err.contains("--admin 'nowhere'"), "{err}");
        assert_eq!(parse(&["--admin", "off", "a:1"]).unwrap().admin, None);
        let c = parse(&["a:1"]).unwrap();
        assert_eq!(
            c.admin,
            Some(Admin {
                addr: DEFAULT_ADMIN.parse().unwrap(),
                explicit: false
            })
        );
    }
}
