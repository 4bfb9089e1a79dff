//! The command line as clap sees it: every flag, its environment variable, default and
//! help text. Parsing only: values stay strings where validation (in `config`) turns
//! them into typed values, so every error can name where the value came from.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser};

use super::types::{ConfigError, CopyMode, DEFAULT_ADMIN, LogFormat};

#[derive(Debug, Parser)]
#[command(
    name = "ambassadord",
    version,
    about = "A Docker ambassador: forwards every TCP connection to a backend it discovers.",
    after_help = "Examples:\n  \
        ambassadord 192.168.1.100:8080                  listens on 8080, forwards to 192.168.1.100:8080\n  \
        ambassadord redis-1:6379,redis-2:6379           balanced over both; a dead one is skipped\n  \
        ambassadord --bind 127.0.0.1 --port 7000 10.0.0.5:6379\n  \
        ambassadord redis.service.consul                DNS SRV records (Consul's DNS); listens on 10000\n  \
        ambassadord etcd://127.0.0.1:2379/services/redis    the key's children (or value); listens on 10000\n  \
        ambassadord consul://127.0.0.1:8500/services/redis  the same from Consul KV\n  \
        ambassadord consul-service://127.0.0.1:8500/redis?tag=primary\n                                                  the service's instances in Consul's catalog whose\n                                                  checks all pass (optional tag and dc); listens on 10000\n  \
        ambassadord docker://redis:6379                 the container named redis, followed through Docker's events\n  \
        ambassadord docker://label=app=web:80           every running container labelled app=web\n  \
        ambassadord --links                             one listener per Docker link port (docker run --link)\n  \
        ambassadord --omnimode                          one per host: each container's BACKEND_<port> says where its\n                                                  connections go; given CAP_NET_ADMIN (docker run --cap-add NET_ADMIN)\n                                                  it redirects its namespace's incoming TCP itself at every start\n  \
        ambassadord healthcheck                         exit 0 if the admin endpoint says ready (Docker HEALTHCHECK)"
)]
pub(super) struct Cli {
    /// Where to forward: HOST:PORT[,HOST:PORT...], an SRV name, etcd://HOST:PORT/PATH, consul://HOST:PORT/PATH, consul-service://HOST:PORT/NAME[?tag=TAG][&dc=DC], docker://NAME:PORT or docker://label=KEY=VALUE:PORT
    #[arg(value_name = "BACKEND", env = "AMBASSADORD_BACKEND")]
    pub(super) backend: Option<String>,

    /// Omni mode: route each connection by the connecting container's BACKEND_<port> env
    /// var (or ambassadord.backend.<port> label); listens on 10000, and with CAP_NET_ADMIN
    /// in a container of its own installs the redirect of incoming TCP to it at start
    #[arg(long, env = "AMBASSADORD_OMNIMODE")]
    pub(super) omnimode: bool,

    /// Docker Engine API for omni mode and docker:// specs (read-only use): unix:///path or tcp://HOST:PORT
    #[arg(
        long,
        value_name = "URL",
        env = "DOCKER_HOST",
        default_value = "unix:///var/run/docker.sock"
    )]
    pub(super) docker_host: String,

    /// Forward each Docker link in the environment (<ALIAS>_PORT_<n>_TCP=tcp://IP:n), listening on its port
    #[arg(
        long,
        env = "AMBASSADORD_LINKS",
        conflicts_with_all = ["backend", "port"],
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub(super) links: bool,

    /// Address to listen on [default: every address, IPv4 and IPv6]
    #[arg(long, value_name = "IP", env = "AMBASSADORD_BIND")]
    pub(super) bind: Option<String>,

    /// Port to listen on [default: the first backend's port]; 0 picks a free port
    #[arg(long, value_name = "PORT", env = "AMBASSADORD_PORT")]
    pub(super) port: Option<String>,

    /// Give up connecting to a backend after this long and try the next (e.g. 5s, 500ms)
    #[arg(
        long,
        value_name = "DURATION",
        env = "AMBASSADORD_CONNECT_TIMEOUT",
        default_value = "5s"
    )]
    pub(super) connect_timeout: String,

    /// Active health checks of every backend: "tcp" (a connect within --connect-timeout, on the control runtime, never on a connection's path) or "off"
    #[arg(
        long,
        value_name = "tcp|off",
        env = "AMBASSADORD_CHECK",
        default_value = "off"
    )]
    pub(super) check: String,

    /// How often each backend is checked (jittered by ±10%)
    #[arg(
        long,
        value_name = "DURATION",
        env = "AMBASSADORD_CHECK_INTERVAL",
        default_value = "2s"
    )]
    pub(super) check_interval: String,

    /// Failed checks in a row that take a backend down
    #[arg(long, value_name = "N", env = "AMBASSADORD_CHECK_FALL", default_value = "3",
        value_parser = clap::value_parser!(u32).range(1..=100))]
    pub(super) check_fall: u32,

    /// Passing checks in a row that bring a down backend back
    #[arg(long, value_name = "N", env = "AMBASSADORD_CHECK_RISE", default_value = "2",
        value_parser = clap::value_parser!(u32).range(1..=100))]
    pub(super) check_rise: u32,

    /// Bytes a check sends once connected (escapes: \r \n \t \\ \xHH), e.g. 'PING\r\n' for Redis
    #[arg(long, value_name = "TEXT", env = "AMBASSADORD_CHECK_SEND")]
    pub(super) check_send: Option<String>,

    /// What the reply must start with for the check to pass (same escapes), e.g. '+PONG'
    #[arg(long, value_name = "TEXT", env = "AMBASSADORD_CHECK_EXPECT")]
    pub(super) check_expect: Option<String>,

    /// Eject a backend after this many failed connects in a row (0: never): it is then tried only if no other answers, for 5s doubling to 5m while it keeps failing
    #[arg(
        long,
        value_name = "N",
        env = "AMBASSADORD_EJECT_AFTER",
        default_value = "3",
        value_parser = clap::value_parser!(u32).range(0..=1000)
    )]
    pub(super) eject_after: u32,

    /// Send each backend a PROXY protocol header (HAProxy's, v1 text or v2 binary) with the client's address before the client's bytes: off, v1 or v2
    #[arg(
        long,
        value_name = "off|v1|v2",
        env = "AMBASSADORD_PROXY_PROTOCOL",
        default_value = "off"
    )]
    pub(super) proxy_protocol: String,

    /// Connections from these sources (CIDR[,CIDR...]) must start with a PROXY protocol header (v1 or v2), whose source address then stands for the client; from anywhere else no header is parsed
    #[arg(
        long,
        value_name = "CIDR[,CIDR...]",
        env = "AMBASSADORD_ACCEPT_PROXY_PROTOCOL"
    )]
    pub(super) accept_proxy_protocol: Option<String>,

    /// Refuse a new connection at once while this many are open on its route [default: no limit]
    #[arg(long, value_name = "N", env = "AMBASSADORD_MAX_CONNECTIONS")]
    pub(super) max_connections: Option<String>,

    /// Certificate authorities (PEM) that TLS peers' certificates must chain to: a tls+ backend's, and with --tls-listen each client's; needed by any tls+ backend
    #[arg(long, value_name = "FILE", env = "AMBASSADORD_TLS_CA")]
    pub(super) tls_ca: Option<String>,

    /// This ambassador's certificate chain (PEM), shown to clients on --tls-listen routes and to tls+ backends that ask for one
    #[arg(long, value_name = "FILE", env = "AMBASSADORD_TLS_CERT")]
    pub(super) tls_cert: Option<String>,

    /// The private key (PEM) of --tls-cert; never logged
    #[arg(long, value_name = "FILE", env = "AMBASSADORD_TLS_KEY")]
    pub(super) tls_key: Option<String>,

    /// The name a tls+ backend's certificate must be valid for [default: the backend's host name, or its address]
    #[arg(long, value_name = "NAME", env = "AMBASSADORD_TLS_SERVER_NAME")]
    pub(super) tls_server_name: Option<String>,

    /// Clients speak TLS to the listener (--tls-cert and --tls-key); with --tls-ca each must present a certificate it signed
    #[arg(
        long,
        env = "AMBASSADORD_TLS_LISTEN",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub(super) tls_listen: bool,

    /// With --tls-listen and --tls-ca: accept only client certificates with one of these DNS or URI (spiffe://...) subject alternative names
    #[arg(long, value_name = "NAME[,NAME...]", env = "AMBASSADORD_TLS_ALLOW")]
    pub(super) tls_allow: Option<String>,

    /// Close a connection after this long with no bytes either way; "off" never does
    #[arg(
        long,
        value_name = "DURATION",
        env = "AMBASSADORD_IDLE_TIMEOUT",
        default_value = "off"
    )]
    pub(super) idle_timeout: String,

    /// On SIGTERM/SIGINT, how long open connections may finish before they are closed
    #[arg(
        long,
        value_name = "DURATION",
        env = "AMBASSADORD_SHUTDOWN_GRACE",
        default_value = "8s"
    )]
    pub(super) shutdown_grace: String,

    /// How bytes are moved: auto (read/write, splice once a stream is bulk), splice (zero-copy through a pipe, Linux) or userspace (read/write)
    #[arg(
        long,
        value_name = "MODE",
        env = "AMBASSADORD_COPY",
        value_parser = copy_mode(),
        default_value = "auto"
    )]
    pub(super) copy: CopyMode,

    /// Data threads: each accepts on its own socket of every listen address and serves those connections [default: one per CPU]
    #[arg(
        long,
        value_name = "N",
        env = "AMBASSADORD_THREADS",
        value_parser = clap::value_parser!(u16).range(1..=1024)
    )]
    pub(super) threads: Option<u16>,

    /// DNS server for host names and SRV lookups, IP[:PORT] [default: /etc/resolv.conf]
    #[arg(long, value_name = "IP[:PORT]", env = "AMBASSADORD_DNS")]
    pub(super) dns: Option<String>,

    /// Once listening (and omni's redirect installed), a process started as root switches to this numeric user and group, keeping the Docker socket's group when it uses one; 0 stays root. The image sets 65534:65534 [default: stay as started]
    #[arg(long, value_name = "UID[:GID]", env = "AMBASSADORD_RUN_AS")]
    pub(super) run_as: Option<String>,

    /// Log filter: a level (error, warn, info, debug, trace) or tracing directives [default: RUST_LOG, else info]
    #[arg(long, value_name = "FILTER", env = "AMBASSADORD_LOG_LEVEL")]
    pub(super) log_level: Option<String>,

    /// Log line format
    #[arg(
        long,
        value_name = "FORMAT",
        env = "AMBASSADORD_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub(super) log_format: LogFormat,

    /// Redirect every incoming TCP connection in this network namespace to --port (default 10000) with an nf_tables nat rule, then exit; needs CAP_NET_ADMIN, no BACKEND. Give it the omni ambassador's --admin so a non-loopback admin port is kept out. (--omnimode with CAP_NET_ADMIN does this itself at start)
    #[arg(
        long,
        env = "AMBASSADORD_SETUP_IPTABLES",
        conflicts_with = "remove_iptables"
    )]
    pub(super) setup_iptables: bool,

    /// Remove the redirect --setup-iptables made, then exit
    #[arg(long, env = "AMBASSADORD_REMOVE_IPTABLES")]
    pub(super) remove_iptables: bool,

    /// TOML file of routes and global options (flags and env override it); SIGHUP reloads it
    #[arg(long, value_name = "FILE", env = "AMBASSADORD_CONFIG")]
    pub(super) config: Option<PathBuf>,

    /// Admin HTTP endpoint (/metrics, /healthz, /readyz, /routes, status page at /): IP:PORT, or "off"
    #[arg(
        long,
        value_name = "IP:PORT|off",
        env = "AMBASSADORD_ADMIN",
        default_value = DEFAULT_ADMIN
    )]
    pub(super) admin: String,
}

/// `--copy`: clap checks the name exactly (so its error and `--help` list the modes,
/// each with its help), then [`CopyMode`]'s `FromStr` makes the value.
fn copy_mode() -> impl TypedValueParser<Value = CopyMode> {
    PossibleValuesParser::new([
        PossibleValue::new("auto")
            .help("The plain copy, switching a direction to splice once it carries a bulk stream"),
        PossibleValue::new("splice").help(
            "Zero-copy splice(2) through a pipe on Linux from the first byte; the plain copy elsewhere",
        ),
        PossibleValue::new("userspace").help("read(2) into a buffer, write(2) out of it"),
    ])
    .try_map(|name| name.parse::<CopyMode>())
}

/// Runs clap over `args`: `--help` and `--version` become [`ConfigError::Info`], any
/// other clap error its first line as [`ConfigError::Usage`]. Also returns the matches
/// (where each value came from) and the clap command (each argument's names).
/// clap's own verdict: `--help` and `--version` are information (exit 0), anything
/// else one line of bad usage.
fn clap_error(e: clap::Error) -> ConfigError {
    use clap::error::ErrorKind::*;
    match e.kind() {
        DisplayHelp | DisplayVersion | DisplayHelpOnMissingArgumentOrSubcommand => {
            ConfigError::Info(e.render().to_string())
        }
        _ => {
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            ConfigError::Usage(format!("{first} (see --help)"))
        }
    }
}

pub(super) fn parse<I, T>(args: I) -> Result<(Cli, ArgMatches, clap::Command), ConfigError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let mut command = Cli::command();
    let matches = command.try_get_matches_from_mut(args).map_err(clap_error)?;
    let cli = Cli::from_arg_matches(&matches).map_err(|e| ConfigError::Usage(e.to_string()))?;
    Ok((cli, matches, command))
}

/// `ambassadord healthcheck`: asks the admin endpoint whether the ambassador is ready.
#[derive(Debug, Parser)]
#[command(
    name = "ambassadord healthcheck",
    about = "Exits 0 if the admin endpoint's /readyz answers 200, else 1, with one line: for Docker's HEALTHCHECK and Compose's service_healthy."
)]
pub(super) struct HealthcheckCli {
    /// The admin endpoint to ask (as given to the ambassador with --admin)
    #[arg(
        long,
        value_name = "IP:PORT",
        env = "AMBASSADORD_ADMIN",
        default_value = DEFAULT_ADMIN
    )]
    pub(super) admin: String,
}

/// Parses `healthcheck`'s own arguments (`args` starts with the word itself).
pub(super) fn parse_healthcheck<I, T>(args: I) -> Result<(HealthcheckCli, ArgMatches), ConfigError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let mut command = HealthcheckCli::command();
    let matches = command.try_get_matches_from_mut(args).map_err(clap_error)?;
    let cli = HealthcheckCli::from_arg_matches(&matches)
        .map_err(|e| ConfigError::Usage(e.to_string()))?;
    Ok((cli, matches))
}
