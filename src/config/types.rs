//! The configuration's types: what a parsed and validated command line is. Plain data
//! with the small `Display` and `FromStr` impls that name or read a value; the pipeline
//! that builds them is `mod.rs`.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::ValueEnum;

use crate::spec::BackendSpec;

/// Exit code for bad usage (EX_USAGE from sysexits.h).
pub const EXIT_USAGE: u8 = 64;

/// Where the admin endpoint listens unless told otherwise: loopback only, so metrics and
/// route details are not exposed to the network by default.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:10001";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// What the process was asked to do. The one-shot actions carry only what they need.
#[derive(Debug, Clone)]
#[allow(
    clippy::large_enum_variant,
    reason = "made once per start or reload and moved out at once; a Box buys nothing"
)]
pub enum Command {
    /// Listen and forward until shut down.
    Serve(Config),
    /// `--setup-iptables`: redirect incoming TCP in this network namespace to `port`
    /// (but connections to `keep`, the admin port when it listens beyond loopback), exit.
    SetupRedirect {
        port: u16,
        keep: Option<u16>,
        log: LogConfig,
    },
    /// `--remove-iptables`: remove that redirect, exit.
    RemoveRedirect { log: LogConfig },
    /// `ambassadord healthcheck`: ask the admin endpoint at `admin` whether the
    /// ambassador is ready, exit 0 or 1.
    Healthcheck { admin: SocketAddr, log: LogConfig },
}

/// Everything the ambassador needs to serve, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub routes: Vec<RouteConfig>,
    /// `--dns`: ask this nameserver instead of the ones in /etc/resolv.conf.
    pub dns: Option<std::net::SocketAddr>,
    /// `--docker-host`: where omni mode reads containers from; validated, and present,
    /// when a route is in omni mode, `None` otherwise (DOCKER_HOST is often set for other
    /// tools, and a value nothing uses is no error).
    pub docker_host: Option<DockerHost>,
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
    /// CONSUL_HTTP_TOKEN (unless empty): sent by every consul:// source as its ACL token.
    pub consul_token: Option<Secret>,
    /// `--run-as`: who a process started as root becomes once it listens.
    pub run_as: Option<RunAs>,
    /// `--tls-ca`, `--tls-cert`, `--tls-key`, read (again on every reload) when any
    /// route uses TLS; `None` when none does.
    pub tls: Option<Arc<crate::tls::Material>>,
}

/// A numeric user and group (a FROM-scratch image has no names for them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
}

/// A value that must not reach a log or an error message: `Debug` prints `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The value itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// The Docker Engine API omni mode reads (read-only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DockerHost {
    /// `unix:///PATH`: a Unix socket.
    Unix(PathBuf),
    /// `tcp://HOST:PORT` or `http://HOST:PORT`: plain HTTP to `HOST:PORT`.
    Tcp(String),
}

impl fmt::Display for DockerHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DockerHost::Unix(path) => write!(f, "unix://{}", path.display()),
            DockerHost::Tcp(addr) => write!(f, "tcp://{addr}"),
        }
    }
}

/// Where the admin endpoint listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admin {
    pub addr: SocketAddr,
    /// Asked for by the user (a failure to bind is then fatal), rather than the default
    /// (a failure is a warning, so a second ambassador on one host still starts).
    pub explicit: bool,
}

impl Admin {
    /// The port the omni redirect leaves alone: the admin port, when the endpoint listens
    /// beyond loopback (a scraper on the network must reach it). On loopback only it is
    /// reached from inside the namespace, which the redirect never touches.
    pub fn kept_from_redirect(&self) -> Option<u16> {
        let port = self.addr.port();
        (!self.addr.ip().is_loopback() && port != 0).then_some(port)
    }
}

/// The port omni mode listens on, and so where --setup-iptables redirects by default.
pub const OMNI_PORT: u16 = 10000;

/// Behaviour shared by every route.
#[derive(Debug, Clone)]
pub struct Settings {
    pub connect_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    pub shutdown_grace: Duration,
    pub copy: CopyMode,
    /// `--eject-after`: failed connects in a row that eject a backend (0: never).
    pub eject_after: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            connect_timeout: Duration::from_secs(5),
            idle_timeout: None,
            shutdown_grace: Duration::from_secs(8),
            copy: CopyMode::default(),
            eject_after: 3,
        }
    }
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    /// A tracing filter: `--log-level` (checked), else RUST_LOG (unchecked: a bad one
    /// falls back to info); `None` means info.
    pub filter: Option<String>,
    pub format: LogFormat,
}

/// One listener and where its connections go.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub listen: Listen,
    pub target: RouteTarget,
    /// What the route is called in logs when not its spec: a `--links` route's link
    /// alias (`redis`).
    pub name: Option<String>,
    /// Active health checks of its backends (`--check tcp`), or `None` (`off`).
    pub check: Option<CheckConfig>,
    pub options: RouteOptions,
}

/// What a route does to a connection besides forwarding it: the PROXY protocol, either
/// way, and its connection limit. A reload that changes only these keeps the route's
/// sources running.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteOptions {
    /// `--proxy-protocol`: the header written to each backend before the client's bytes.
    pub proxy_protocol: crate::proxy_protocol::Version,
    /// `--accept-proxy-protocol`: sources whose connections must start with a header,
    /// which then stands for the client (empty: none; no header is parsed).
    pub accept_proxy: Vec<Cidr>,
    /// `--max-connections`: open connections beyond which new ones are refused.
    pub max_connections: Option<u32>,
    pub tls: TlsOptions,
}

/// A route's TLS: on its listener, and the name checked on its `tls+` backends'
/// certificates. The files are the configuration's ([`Config::tls`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// `--tls-listen`: clients speak TLS to this route (with `--tls-ca`, presenting a
    /// certificate it signed).
    pub listen: bool,
    /// `--tls-allow`: a client certificate must carry one of these DNS or URI subject
    /// alternative names (empty: any the CA signed).
    pub allow: Vec<String>,
    /// `--tls-server-name`: the name a `tls+` backend's certificate must be valid for,
    /// instead of the backend's host name (or address).
    pub server_name: Option<String>,
}

impl RouteOptions {
    /// Whether connections from `ip` must start with a PROXY protocol header.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.accept_proxy.iter().any(|c| c.contains(ip))
    }
}

/// An active TCP check: how often, how many results in a row change a backend's state,
/// and optionally bytes to send and the start of the reply to expect.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CheckConfig {
    pub interval: Duration,
    pub fall: u32,
    pub rise: u32,
    pub send: Option<Vec<u8>>,
    pub expect: Option<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteTarget {
    /// Standard mode: one backend spec (`tls+` or not).
    Spec(BackendSpec),
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

impl Listen {
    /// Whether both cannot be bound at once: the same port (not 0) and addresses where
    /// one covers the other. No address and `::` mean every address, IPv4 included (the
    /// listener is dual-stack); `0.0.0.0` every IPv4 address.
    pub fn overlaps(&self, other: &Listen) -> bool {
        if self.port == 0 || self.port != other.port {
            return false;
        }
        let covers = |wide: Option<IpAddr>, narrow: Option<IpAddr>| match (wide, narrow) {
            (None, _) => true,
            (Some(w), _) if w.is_ipv6() && w.is_unspecified() => true,
            (Some(IpAddr::V4(w)), Some(IpAddr::V4(_))) => w.is_unspecified(),
            (Some(w), Some(n)) => w == n,
            (Some(_), None) => false,
        };
        covers(self.ip, other.ip) || covers(other.ip, self.ip)
    }
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

/// Why the command line could not be turned into a [`Command`].
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `--help` or `--version`: print this and exit 0.
    #[error("{0}")]
    Info(String),
    /// Bad usage: print this one-line message (the value, its origin, the fix) and exit
    /// [`EXIT_USAGE`].
    #[error("{0}")]
    Usage(String),
}

/// How bytes are moved between the two sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CopyMode {
    /// The plain copy, switching a direction to splice once it carries a bulk stream.
    #[default]
    Auto,
    /// Zero-copy splice(2) through a pipe on Linux from the first byte; the plain copy
    /// elsewhere.
    Splice,
    /// read(2) into a buffer, write(2) out of it.
    Userspace,
}

impl CopyMode {
    pub fn as_str(&self) -> &'static str {
        match self {
            CopyMode::Auto => "auto",
            CopyMode::Splice => "splice",
            CopyMode::Userspace => "userspace",
        }
    }
}

/// A name that is not a copy mode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a copy mode (auto, splice, userspace)")]
pub struct UnknownCopyMode;

impl std::str::FromStr for CopyMode {
    type Err = UnknownCopyMode;

    /// `auto`, `splice` or `userspace`, in any case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [CopyMode::Auto, CopyMode::Splice, CopyMode::Userspace]
            .into_iter()
            .find(|mode| mode.as_str().eq_ignore_ascii_case(s))
            .ok_or(UnknownCopyMode)
    }
}

/// An address block (`10.0.0.0/8`, `2001:db8::/32`; a bare address is a block of one):
/// `--accept-proxy-protocol`'s trusted sources.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` is in the block; an IPv4-mapped IPv6 address counts as its IPv4 one.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(ip) & mask == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(ip) & mask == u128::from(net)
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;

    /// `ADDRESS/PREFIX` or `ADDRESS`; the address must be the block's first (host bits
    /// zero), so a typo such as `10.0.0.1/8` is refused rather than widened.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let net: IpAddr = addr
            .parse()
            .map_err(|_| format!("'{addr}' is not an IP address"))?;
        let net = net.to_canonical();
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => Some(p)
                .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|p| p.parse::<u8>().ok())
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("'/{p}' is not a prefix length (0-{max})"))?,
        };
        let cidr = Cidr { net, prefix };
        let first = match net {
            IpAddr::V4(ip) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V4((u32::from(ip) & mask).into())
            }
            IpAddr::V6(ip) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V6((u128::from(ip) & mask).into())
            }
        };
        if first != net {
            return Err(format!(
                "has host bits set: the block starts at {first}/{prefix}"
            ));
        }
        Ok(cidr)
    }
}
