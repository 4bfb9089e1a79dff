//! Flags, environment and the `--config` file → a validated [`Config`].
//!
//! Three steps, each in its own place: parse (`cli`: clap, no I/O; `file`: the TOML
//! file, the only file I/O), look each option up through the layers (`layer`: flag,
//! environment variable, file, default, with the origin of the value used), then
//! validate into typed values (here and in `values`). The environment is read here
//! only, once per parse. Every error names the value and
//! its origin (`--port 'abc'`, `AMBASSADORD_PORT 'nine'`, `FILE: connect_timeout '5x'`),
//! so a typo in a container's environment is found from one log line.

use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};

use clap::ValueEnum;
use clap::parser::ValueSource;

use crate::spec::{BackendSpec, Spec};

mod cli;
mod file;
mod layer;
pub mod links;
mod tls;
mod types;
mod values;

pub use types::*;

use cli::Cli;
use file::{FileCheck, FileConfig, FileRoute};
use layer::{Layers, at, some_text, text};
pub use values::{parse_duration, parse_max_connections, parse_proxy_protocol};

impl Command {
    /// Parses and validates the command line, reading AMBASSADORD_* from the environment
    /// for anything not given as a flag, and the `--config` file if there is one.
    pub fn from_args<I, T>(args: I) -> Result<Command, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        Command::from_args_in(args, &Environment::capture())
    }

    /// As [`Command::from_args`], with `env` for the variables config reads itself.
    fn from_args_in<I, T>(args: I, env: &Environment) -> Result<Command, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
        // A word of its own, not a flag: the healthcheck runs in a FROM-scratch image,
        // where there is no shell or curl to write one with. (A bare SRV name
        // 'healthcheck' as BACKEND must come from AMBASSADORD_BACKEND.)
        if args.get(1).is_some_and(|a| a == "healthcheck") {
            return healthcheck(&args[1..]);
        }
        let (cli, matches, clap_command) = cli::parse(args)?;
        let file_name = cli
            .config
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let layers = Layers::new(&matches, clap_command, file_name);
        command(&cli, &layers, env).map_err(ConfigError::Usage)
    }

    /// How to log, whatever the command.
    pub fn log(&self) -> &LogConfig {
        match self {
            Command::Serve(config) => &config.log,
            Command::SetupRedirect { log, .. }
            | Command::RemoveRedirect { log }
            | Command::Healthcheck { log, .. } => log,
        }
    }
}

/// `healthcheck [--admin IP:PORT]`: the admin address to ask.
fn healthcheck(args: &[OsString]) -> Result<Command, ConfigError> {
    let (cli, matches) = cli::parse_healthcheck(args)?;
    let origin = match matches.value_source("admin") {
        Some(ValueSource::EnvVariable) => "AMBASSADORD_ADMIN",
        _ => "--admin",
    };
    let admin = match values::parse_admin(&cli.admin) {
        Ok(Some(addr)) => addr,
        Ok(None) => {
            return Err(ConfigError::Usage(format!(
                "{origin} '{}': the admin endpoint is off, and healthcheck asks it (give the IP:PORT it listens on)",
                cli.admin
            )));
        }
        Err(why) => {
            return Err(ConfigError::Usage(format!(
                "{origin} '{}': {why}",
                cli.admin
            )));
        }
    };
    Ok(Command::Healthcheck {
        admin,
        log: LogConfig {
            filter: Some("warn".into()),
            format: LogFormat::Text,
        },
    })
}

/// The environment variables config reads beyond those clap reads for its flags (link
/// variables, CONSUL_HTTP_TOKEN, RUST_LOG): one snapshot per parse, so nothing outside
/// config reads the environment, and tests can hand in their own.
struct Environment(Vec<(OsString, OsString)>);

impl Environment {
    fn capture() -> Self {
        Environment(std::env::vars_os().collect())
    }

    /// A variable's value; `None` when it is unset or not UTF-8.
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.to_str())
    }
}

fn command(cli: &Cli, layers: &Layers, env: &Environment) -> Result<Command, String> {
    if cli.setup_iptables || cli.remove_iptables {
        redirect(cli, layers, env)
    } else {
        serve(cli, layers, env).map(Command::Serve)
    }
}

fn serve(cli: &Cli, layers: &Layers, env: &Environment) -> Result<Config, String> {
    let file = match &cli.config {
        None => FileConfig::default(),
        Some(path) => file::read(path)?,
    };
    let (routes, warnings) = routes(cli, &file, layers, env)?;
    let settings = settings(cli, &file, layers)?;
    let log = log(cli, &file, layers, env)?;
    let threads = threads(cli, &file, layers)?;
    let dns = dns(cli, &file, layers)?;
    let docker_host = docker_host(cli, &file, layers, &routes)?;
    let admin = admin(cli, &file, layers)?;
    let tls = tls::material(cli, &file, layers, &routes)?;
    let run_as = layers
        .pick(
            "run_as",
            cli.run_as.clone(),
            file.run_as.as_deref(),
            some_text,
        )?
        .transpose()
        .map(|v| v.trimmed().parse(values::parse_run_as))
        .transpose()?;
    Ok(Config {
        run_as,
        routes,
        dns,
        docker_host,
        settings,
        log,
        warnings,
        admin,
        config_file: cli.config.clone(),
        threads,
        consul_token: env
            .get("CONSUL_HTTP_TOKEN")
            .filter(|t| !t.is_empty())
            .map(Secret::new),
        tls,
    })
}

/// Every route: the file's `[[route]]` tables, then the command line's route in one of
/// the three modes (standard: BACKEND; omni: `--omnimode`; `--links`: one route per
/// Docker link). Also returns what `--links` skipped, to log as warnings.
fn routes(
    cli: &Cli,
    file: &FileConfig,
    layers: &Layers,
    env: &Environment,
) -> Result<(Vec<RouteConfig>, Vec<String>), String> {
    let checks = check_defaults(cli, file, layers)?;
    let (options, accept_origin) = option_defaults(cli, file, layers)?;
    let mut routes = Vec::new();
    for (i, r) in file.route.iter().enumerate() {
        let place = format!("{}: route {}", layers.file_name(), i + 1);
        let mut route = file_route(r, &place)?;
        route.check = route_check(&checks, &r.check_options(), &place)?;
        route.options = route_options(&options, r, &place)?;
        if route.target == RouteTarget::Omni && !route.options.accept_proxy.is_empty() {
            let origin = match &r.accept_proxy_protocol {
                Some(_) => format!("{place}: accept_proxy_protocol"),
                None => accept_origin.clone(),
            };
            return Err(omni_accepts_no_proxy_header(&origin));
        }
        routes.push(route);
    }
    let ip = match &cli.bind {
        None => None,
        Some(s) => Some(layers.cli("bind", s.clone()).parse(values::parse_ip)?),
    };
    let mut warnings = Vec::new();
    if cli.links {
        if cli.omnimode {
            return Err("--links and --omnimode cannot be combined: choose one mode".into());
        }
        let (links, skipped) = link_routes(ip, env)?;
        routes.extend(links.into_iter().map(|mut r| {
            r.check = checks.on.then(|| checks.config.clone());
            r.options = options.clone();
            tls::without_allow_unless_listening(&mut r.options.tls);
            r
        }));
        warnings.extend(skipped);
    } else if let Some(target) = cli_target(cli, layers)? {
        let mut route = cli_route(cli, layers, ip, target)?;
        route.check = checks.on.then(|| checks.config.clone());
        route.options = options.clone();
        tls::without_allow_unless_listening(&mut route.options.tls);
        if route.target == RouteTarget::Omni && !route.options.accept_proxy.is_empty() {
            return Err(omni_accepts_no_proxy_header(&accept_origin));
        }
        routes.push(route);
    }
    tls::check_global_allow(&options.tls, &routes, layers)?;
    check_routes(&routes, layers.file_name())?;
    Ok((routes, warnings))
}

/// `--links`: one route per linked port, on `ip`; clap has refused BACKEND and --port
/// alongside. Also returns a warning per malformed link variable.
fn link_routes(
    ip: Option<IpAddr>,
    env: &Environment,
) -> Result<(Vec<RouteConfig>, Vec<String>), String> {
    let links = links::parse(env.0.iter().cloned()).map_err(|e| e.to_string())?;
    let skipped = links
        .skipped
        .iter()
        .map(|s| format!("--links: skipped a link variable: {s}"))
        .collect();
    let routes = links
        .links
        .into_iter()
        .map(|link| RouteConfig {
            listen: Listen {
                ip,
                port: link.port,
            },
            target: RouteTarget::Spec(BackendSpec::plain(Spec::Static(vec![link.target]))),
            // Docker writes the alias upper-cased into the variable names.
            name: Some(link.alias.to_ascii_lowercase()),
            check: None,
            options: RouteOptions::default(),
        })
        .collect();
    Ok((routes, skipped))
}

/// The command line's target: omni mode, or standard mode's BACKEND; `None` when
/// `--config` alone gives the routes.
fn cli_target(cli: &Cli, layers: &Layers) -> Result<Option<RouteTarget>, String> {
    match (&cli.backend, cli.omnimode) {
        (Some(backend), true) => Err(format!(
            "--omnimode takes no BACKEND (got '{backend}' from {}): each container declares its own",
            layers.origin("backend")
        )),
        (None, true) => Ok(Some(RouteTarget::Omni)),
        (None, false) if cli.config.is_some() => Ok(None),
        (None, false) => Err(
            "no backend given: pass BACKEND (for example 10.0.0.5:6379), set AMBASSADORD_BACKEND, \
             or use --links, --omnimode or --config"
                .into(),
        ),
        (Some(backend), false) => {
            let spec = BackendSpec::parse(backend).map_err(|e| match layers.origin("backend") {
                // The spec's own message already names the value as a backend.
                o if o == "BACKEND" => e.to_string(),
                o => format!("{e} (from {o})"),
            })?;
            Ok(Some(RouteTarget::Spec(spec)))
        }
    }
}

/// The command line's route: `target` on `--bind` and `--port`, or on the port the
/// target implies (the first backend's, or omni's).
fn cli_route(
    cli: &Cli,
    layers: &Layers,
    ip: Option<IpAddr>,
    target: RouteTarget,
) -> Result<RouteConfig, String> {
    let port = match (&cli.port, &target) {
        (None, RouteTarget::Spec(b)) => b.spec.default_listen_port(),
        (None, RouteTarget::Omni) => OMNI_PORT,
        (Some(s), _) => layers.cli("port", s.clone()).parse(|s| {
            s.parse::<u16>()
                .map_err(|_| "not a port number (0-65535)".to_string())
        })?,
    };
    Ok(RouteConfig {
        listen: Listen { ip, port },
        target,
        name: None,
        check: None,
        options: RouteOptions::default(),
    })
}

/// Omni mode knows a container by the address it connects from; a header from an
/// upstream cannot stand for one.
fn omni_accepts_no_proxy_header(origin: &str) -> String {
    format!(
        "{origin}: omni mode routes by the connecting container's own address, so it accepts no PROXY protocol header; set it on standard routes only"
    )
}

/// The route options every route starts from (flags and environment over the file's
/// top level over the defaults), and where the trusted sources came from (for errors).
fn option_defaults(
    cli: &Cli,
    file: &FileConfig,
    layers: &Layers,
) -> Result<(RouteOptions, String), String> {
    let proxy_protocol = layers
        .pick(
            "proxy_protocol",
            cli.proxy_protocol.clone(),
            file.proxy_protocol.as_deref(),
            text,
        )?
        .trimmed()
        .parse(values::parse_proxy_protocol)?;
    let accept = layers.pick(
        "accept_proxy_protocol",
        cli.accept_proxy_protocol.clone(),
        file.accept_proxy_protocol.as_deref(),
        some_text,
    )?;
    let origin = accept.origin.clone();
    let accept_proxy = match accept.transpose() {
        None => Vec::new(),
        Some(v) => v.parse(values::parse_cidrs)?,
    };
    let from_cli = match &cli.max_connections {
        None => None,
        Some(s) => Some(
            layers
                .cli("max_connections", s.clone())
                .parse(values::parse_max_connections)?,
        ),
    };
    let max_connections = layers
        .pick(
            "max_connections",
            from_cli,
            file.max_connections.as_ref(),
            |n| values::parse_max_connections(&n.to_string()).map(Some),
        )?
        .value;
    let options = RouteOptions {
        proxy_protocol,
        accept_proxy,
        max_connections,
        tls: tls::defaults(cli, file, layers)?,
    };
    Ok((options, origin))
}

/// A `[[route]]`'s options: its own over the defaults.
fn route_options(
    defaults: &RouteOptions,
    r: &FileRoute,
    place: &str,
) -> Result<RouteOptions, String> {
    let mut options = defaults.clone();
    let named = |key: &str, v: &str, why: String| at(&format!("{place}: {key}"), v, &why);
    if let Some(v) = &r.proxy_protocol {
        options.proxy_protocol =
            values::parse_proxy_protocol(v).map_err(|why| named("proxy_protocol", v, why))?;
    }
    if let Some(v) = &r.accept_proxy_protocol {
        options.accept_proxy =
            values::parse_cidrs(v).map_err(|why| named("accept_proxy_protocol", v, why))?;
    }
    if let Some(n) = r.max_connections {
        let v = n.to_string();
        options.max_connections = Some(
            values::parse_max_connections(&v).map_err(|why| named("max_connections", &v, why))?,
        );
    }
    options.tls = tls::route(&defaults.tls, r, place)?;
    Ok(options)
}

/// At least one route, and no two on one listen address (port 0 is a fresh port each).
fn check_routes(routes: &[RouteConfig], file_name: &str) -> Result<(), String> {
    if routes.is_empty() {
        return Err(format!(
            "{file_name}: no routes: add a [[route]] with listen and backend, or pass BACKEND"
        ));
    }
    // Checked before anything binds: two routes that cannot both listen would otherwise
    // fail at start after the first one had started.
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
        if let Some(b) = routes[..i].iter().find(|b| a.listen.overlaps(&b.listen)) {
            return Err(format!(
                "routes listen on {} and {}: one covers the other's address; give each its own port or address",
                b.listen, a.listen
            ));
        }
    }
    Ok(())
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
        (Some(b), false) => {
            RouteTarget::Spec(BackendSpec::parse(b).map_err(|e| format!("{place}: {e}"))?)
        }
    };
    let default_port = match &target {
        RouteTarget::Spec(b) => b.spec.default_listen_port(),
        RouteTarget::Omni => OMNI_PORT,
    };
    let listen = match r.listen.as_deref().map(str::trim) {
        None => Listen {
            ip: None,
            port: default_port,
        },
        Some("") => {
            return Err(format!(
                "{place}: listen '': empty (leave listen out for every address on port {default_port})"
            ));
        }
        Some(s) => {
            values::parse_listen(s).map_err(|why| format!("{place}: listen '{s}': {why}"))?
        }
    };
    Ok(RouteConfig {
        listen,
        target,
        name: None,
        check: None,
        options: RouteOptions::default(),
    })
}

/// The check options every route starts from: flags and environment over the file's
/// top level over the defaults, and whether checks are on.
struct CheckDefaults {
    on: bool,
    config: CheckConfig,
}

fn check_defaults(cli: &Cli, file: &FileConfig, layers: &Layers) -> Result<CheckDefaults, String> {
    let f = file.check_options();
    let on = layers
        .pick("check", cli.check.clone(), f.check.as_deref(), text)?
        .trimmed()
        .parse(values::parse_check)?;
    let interval = layers
        .pick(
            "check_interval",
            cli.check_interval.clone(),
            f.check_interval.as_deref(),
            text,
        )?
        .parse(values::parse_check_interval)?;
    let count = |n: &i64| {
        u32::try_from(*n)
            .ok()
            .filter(|n| (1..=100).contains(n))
            .ok_or_else(|| "not a count of checks (1-100)".to_string())
    };
    let fall = layers
        .pick("check_fall", cli.check_fall, f.check_fall.as_ref(), count)?
        .value;
    let rise = layers
        .pick("check_rise", cli.check_rise, f.check_rise.as_ref(), count)?
        .value;
    let bytes = |id: &str, given: &Option<String>, in_file: &Option<String>| {
        let from_cli = match given {
            None => None,
            Some(s) => Some(layers.cli(id, s.clone()).parse(values::unescape)?),
        };
        let raw = |s: &str| Ok(Some(s.as_bytes().to_vec()));
        Ok::<_, String>(layers.pick(id, from_cli, in_file.as_deref(), raw)?.value)
    };
    let send = bytes("check_send", &cli.check_send, &f.check_send)?;
    let expect = bytes("check_expect", &cli.check_expect, &f.check_expect)?;
    Ok(CheckDefaults {
        on,
        config: CheckConfig {
            interval,
            fall,
            rise,
            send,
            expect,
        },
    })
}

/// A `[[route]]`'s checks: its own options over the defaults.
fn route_check(
    defaults: &CheckDefaults,
    r: &FileCheck,
    place: &str,
) -> Result<Option<CheckConfig>, String> {
    fn value<T>(
        place: &str,
        key: &str,
        v: &str,
        parse: fn(&str) -> Result<T, String>,
    ) -> Result<T, String> {
        parse(v).map_err(|why| at(&format!("{place}: {key}"), v, &why))
    }
    let on = match &r.check {
        None => defaults.on,
        Some(v) => value(place, "check", v.trim(), values::parse_check)?,
    };
    let mut config = defaults.config.clone();
    if let Some(v) = &r.check_interval {
        config.interval = value(place, "check_interval", v, values::parse_check_interval)?;
    }
    for (key, given, slot) in [
        ("check_fall", r.check_fall, &mut config.fall),
        ("check_rise", r.check_rise, &mut config.rise),
    ] {
        if let Some(n) = given {
            *slot = u32::try_from(n)
                .ok()
                .filter(|n| (1..=100).contains(n))
                .ok_or_else(|| {
                    at(
                        &format!("{place}: {key}"),
                        &n.to_string(),
                        "not a count of checks (1-100)",
                    )
                })?;
        }
    }
    if let Some(v) = &r.check_send {
        config.send = Some(v.as_bytes().to_vec());
    }
    if let Some(v) = &r.check_expect {
        config.expect = Some(v.as_bytes().to_vec());
    }
    Ok(on.then_some(config))
}

/// The behaviour every route shares: timeouts and the copy mode.
fn settings(cli: &Cli, file: &FileConfig, layers: &Layers) -> Result<Settings, String> {
    let v = layers.pick(
        "connect_timeout",
        cli.connect_timeout.clone(),
        file.connect_timeout.as_deref(),
        text,
    )?;
    let connect_timeout = v.parse(parse_duration)?;
    if connect_timeout.is_zero() {
        return Err(at(&v.origin, &v.value, "must be more than zero"));
    }
    let idle_timeout = layers
        .pick(
            "idle_timeout",
            cli.idle_timeout.clone(),
            file.idle_timeout.as_deref(),
            text,
        )?
        .trimmed()
        .parse(values::parse_idle_timeout)?;
    let shutdown_grace = layers
        .pick(
            "shutdown_grace",
            cli.shutdown_grace.clone(),
            file.shutdown_grace.as_deref(),
            text,
        )?
        .parse(parse_duration)?;
    let copy = layers
        .pick("copy", cli.copy, file.copy.as_deref(), |s| {
            s.parse::<CopyMode>().map_err(|e| e.to_string())
        })?
        .value;
    let eject_after = layers
        .pick(
            "eject_after",
            cli.eject_after,
            file.eject_after.as_ref(),
            |n| {
                u32::try_from(*n)
                    .ok()
                    .filter(|n| *n <= 1000)
                    .ok_or_else(|| "not a count of failures (0-1000; 0: never eject)".to_string())
            },
        )?
        .value;
    Ok(Settings {
        connect_timeout,
        idle_timeout,
        shutdown_grace,
        copy,
        eject_after,
    })
}

/// `--threads`: clap checks the flag's range; the file's number is checked here.
fn threads(cli: &Cli, file: &FileConfig, layers: &Layers) -> Result<Option<usize>, String> {
    let threads = layers.pick(
        "threads",
        cli.threads.map(usize::from),
        file.threads.as_ref(),
        |n| {
            usize::try_from(*n)
                .ok()
                .filter(|n| (1..=1024).contains(n))
                .map(Some)
                .ok_or_else(|| "not a thread count (1-1024)".to_string())
        },
    )?;
    Ok(threads.value)
}

/// `--dns`: the nameserver, if not /etc/resolv.conf's.
fn dns(cli: &Cli, file: &FileConfig, layers: &Layers) -> Result<Option<SocketAddr>, String> {
    layers
        .pick("dns", cli.dns.clone(), file.dns.as_deref(), some_text)?
        .transpose()
        .map(|dns| dns.parse(values::parse_dns))
        .transpose()
}

/// `--docker-host`, when a route is in omni mode or uses a `docker://` spec. Checked
/// wherever it is used, so a bad value is bad usage at start rather than a failure once
/// Docker is first asked; not read otherwise, since DOCKER_HOST is often set for other
/// tools.
fn docker_host(
    cli: &Cli,
    file: &FileConfig,
    layers: &Layers,
    routes: &[RouteConfig],
) -> Result<Option<DockerHost>, String> {
    let needs_docker = |r: &RouteConfig| match &r.target {
        RouteTarget::Omni => true,
        RouteTarget::Spec(b) => matches!(b.spec, Spec::Docker(_)),
    };
    if !routes.iter().any(needs_docker) {
        return Ok(None);
    }
    let host = layers.pick(
        "docker_host",
        cli.docker_host.clone(),
        file.docker_host.as_deref(),
        text,
    )?;
    host.parse(values::parse_docker_host).map(Some)
}

/// The log filter (validated, so a typo does not silently log nothing) and format.
fn log(
    cli: &Cli,
    file: &FileConfig,
    layers: &Layers,
    env: &Environment,
) -> Result<LogConfig, String> {
    let filter = layers
        .pick(
            "log_level",
            cli.log_level.clone(),
            file.log_level.as_deref(),
            some_text,
        )?
        .transpose();
    if let Some(f) = &filter {
        f.parse(values::check_log_filter)?;
    }
    let format = layers
        .pick(
            "log_format",
            cli.log_format,
            file.log_format.as_deref(),
            |s| {
                LogFormat::from_str(s, true)
                    .map_err(|_| "not a log format (text, json)".to_string())
            },
        )?
        .value;
    Ok(LogConfig {
        filter: filter.map(|f| f.value).or_else(|| rust_log(env)),
        format,
    })
}

/// RUST_LOG, the filter when no --log-level is set. Not checked: tracing's convention is
/// that a bad RUST_LOG falls back to the default (info) rather than refusing to start.
fn rust_log(env: &Environment) -> Option<String> {
    env.get("RUST_LOG").map(str::to_string)
}

/// The admin endpoint, unless `off`. One the user asked for must bind; the default may
/// fail with a warning.
fn admin(cli: &Cli, file: &FileConfig, layers: &Layers) -> Result<Option<Admin>, String> {
    let v = layers
        .pick("admin", cli.admin.clone(), file.admin.as_deref(), text)?
        .trimmed();
    let explicit = v.explicit;
    Ok(v.parse(values::parse_admin)?
        .map(|addr| Admin { addr, explicit }))
}

/// `--setup-iptables` / `--remove-iptables`: one-shot actions that serve nothing, so a
/// BACKEND on the command line is a mistake worth naming (one from the environment is
/// ignored, so the same container environment can run both roles).
fn redirect(cli: &Cli, layers: &Layers, env: &Environment) -> Result<Command, String> {
    let flag = if cli.setup_iptables {
        layers.origin("setup_iptables")
    } else {
        layers.origin("remove_iptables")
    };
    if let (Some(b), Some(ValueSource::CommandLine)) = (&cli.backend, layers.source("backend")) {
        return Err(format!(
            "{flag} runs once and exits; it takes no BACKEND (got '{b}')"
        ));
    }
    // A one-shot action reads no --config file and does not check the log filter: a
    // bad --log-level falls back to info, so the action still runs.
    let log = LogConfig {
        filter: cli.log_level.clone().or_else(|| rust_log(env)),
        format: cli.log_format,
    };
    if cli.remove_iptables {
        return Ok(Command::RemoveRedirect { log });
    }
    let port = match &cli.port {
        None => OMNI_PORT,
        Some(s) => layers
            .cli("port", s.clone())
            .parse(|s| match s.parse::<u16>() {
                Ok(0) => Err("the redirect needs a real port (1-65535)".to_string()),
                Ok(p) => Ok(p),
                Err(_) => Err("not a port number (1-65535)".to_string()),
            })?,
    };
    // The admin address the ambassador in this namespace is given (same flag, same
    // environment): its port stays out of the redirect when it listens beyond loopback.
    let keep = admin(cli, &FileConfig::default(), layers)?.and_then(|a| a.kept_from_redirect());
    Ok(Command::SetupRedirect { port, keep, log })
}

#[cfg(test)]
mod tests;
