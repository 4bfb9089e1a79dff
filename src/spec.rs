//! The backend spec grammar: what a user writes to say where connections go.
//!
//! Parsing does no I/O. Every error names the whole spec and the element at fault, so a
//! message read in a container log points straight at the typo.
//!
//! ```text
//! backend = [ "tls+" ] spec             ; tls+: each backend is reached over TLS
//! spec    = static | srv | kv | service | docker
//! static  = hostport *( "," hostport )    ; listens on the first port
//! srv     = dns-name                      ; SRV records; listens on 10000
//! kv      = ("etcd" | "consul") "://" server path    ; listens on 10000
//! service = "consul-service://" server "/" name [ "?" query ]  ; listens on 10000
//! query   = param [ "&" param ]           ; each key at most once, in any order
//! param   = "tag=" tag | "dc=" dc
//! docker  = "docker://" (name | "label=" key ["=" value]) ":" port  ; listens on port
//! server  = host [":" port] | "[" ipv6 "]" [":" port]
//! hostport= host ":" port | "[" ipv6 "]" ":" port
//! host    = ipv4 | dns-name               ; letters, digits, '-', '_' and dots
//! port    = 1..65535
//! path    = "/" key                       ; etcd default port 2379, consul 8500
//! name    = 1*( ALPHA / DIGIT / "-" / "_" / "." )   ; a Consul service name
//! dc      = 1*( ALPHA / DIGIT / "-" / "_" / "." )   ; a Consul datacenter
//! tag     = 1*( ALPHA / DIGIT / "-" / "_" / "." / ":" )
//! ```
//!
//! A `consul-service://` spec is written without percent-encoding: its name, tag and
//! datacenter are limited to the characters above, so what is written is what Consul
//! is asked for. A tag with other characters (a space, '=', '/') cannot be selected; a
//! query key other than `tag` and `dc`, a key given twice, an empty value or a '#' is
//! refused at parse time. It is shown with `tag` before `dc`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::logsafe::outside;

/// The port standard mode listens on for discovered (SRV, etcd, Consul KV and catalog)
/// backends.
pub const DISCOVERY_LISTEN_PORT: u16 = 10000;
pub const ETCD_DEFAULT_PORT: u16 = 2379;
pub const CONSUL_DEFAULT_PORT: u16 = 8500;

/// What a route's backend is, as written: where its backends are found, and whether
/// each is reached over TLS (`tls+SPEC`). Discovery sees only the spec; the TLS is how
/// the forwarder connects.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BackendSpec {
    pub spec: Spec,
    pub tls: bool,
}

/// The prefix of a backend reached over TLS.
pub const TLS_PREFIX: &str = "tls+";

impl BackendSpec {
    pub fn parse(input: &str) -> Result<BackendSpec, SpecError> {
        let (rest, tls) = match input.trim_start().strip_prefix(TLS_PREFIX) {
            Some(rest) => (rest, true),
            None => (input, false),
        };
        let spec = Spec::parse(rest).map_err(|e| SpecError {
            spec: input.to_string(),
            reason: e.reason,
        })?;
        Ok(BackendSpec { spec, tls })
    }

    /// A backend reached in plain TCP.
    pub fn plain(spec: Spec) -> BackendSpec {
        BackendSpec { spec, tls: false }
    }
}

impl fmt::Display for BackendSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.tls {
            f.write_str(TLS_PREFIX)?;
        }
        write!(f, "{}", self.spec)
    }
}

/// A parsed backend spec.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Spec {
    /// A fixed list of `HOST:PORT`; host names are resolved (and re-resolved on TTL).
    Static(Vec<HostPort>),
    /// A DNS name whose SRV records list the backends (e.g. `redis.service.consul`).
    Srv(String),
    /// Backends from etcd v3 keys.
    Etcd(KvSpec),
    /// Backends from Consul's KV store.
    Consul(KvSpec),
    /// The instances of a service in Consul's catalog whose checks all pass.
    ConsulService(ServiceSpec),
    /// Running Docker containers, by name or by label, followed through the engine's
    /// events.
    Docker(DockerSpec),
}

/// `docker://NAME:PORT` or `docker://label=KEY[=VALUE]:PORT`: the addresses of the
/// running containers selected, on `port`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DockerSpec {
    pub select: Select,
    pub port: u16,
}

/// Which running containers a `docker://` spec means.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Select {
    /// The container with this name (without Docker's leading '/').
    Name(String),
    /// Every container with this label; with this value, if given.
    Label { key: String, value: Option<String> },
}

/// Where a KV store is and which key holds the backends: the values of the key's
/// children if it has any, else the key's own value.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KvSpec {
    pub server: HostPort,
    /// The key as written after the server, with its leading '/' and without a
    /// trailing one (e.g. `/path/to/backend/nodes`).
    pub path: String,
}

/// `consul-service://HOST[:PORT]/NAME[?tag=TAG][&dc=DC]`: the passing instances of the
/// Consul service `name`, only those carrying `tag` if given, in datacenter `dc` if given
/// (else the agent's own).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceSpec {
    pub server: HostPort,
    pub name: String,
    pub tag: Option<String>,
    pub dc: Option<String>,
}

/// A host (IP literal or DNS name) and a port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPort {
    pub host: Host,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    Ip(IpAddr),
    /// A DNS name, without a trailing dot, as the user wrote it.
    Name(String),
}

/// Shown with the spec and the reason escaped and cut (a spec may come from a KV value
/// or a container's declaration: outside text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("backend '{}': {}", outside(spec), outside(reason))]
pub struct SpecError {
    /// The whole spec as given.
    pub spec: String,
    pub reason: String,
}

impl Spec {
    pub fn parse(input: &str) -> Result<Spec, SpecError> {
        let fail = |reason: String| SpecError {
            spec: input.to_string(),
            reason,
        };
        let trimmed = input.trim();
        if trimmed.is_empty() {
            return Err(fail("the backend is empty".into()));
        }
        if let Some((scheme, rest)) = trimmed.split_once("://") {
            let (make, default_port): (fn(KvSpec) -> Spec, u16) = match scheme {
                "etcd" => (Spec::Etcd, ETCD_DEFAULT_PORT),
                "consul" => (Spec::Consul, CONSUL_DEFAULT_PORT),
                "consul-service" => {
                    return ServiceSpec::parse(rest)
                        .map(Spec::ConsulService)
                        .map_err(fail);
                }
                "docker" => return DockerSpec::parse(rest).map(Spec::Docker).map_err(fail),
                _ => {
                    return Err(fail(format!(
                        "unsupported scheme '{scheme}://' (use etcd://, consul://, consul-service:// or docker://, or HOST:PORT)"
                    )));
                }
            };
            return KvSpec::parse(rest, default_port).map(make).map_err(fail);
        }
        if !trimmed.contains([':', ',']) {
            // A lone name without a port is an SRV name; an IP without one is a mistake.
            return match parse_host(trimmed).map_err(fail)? {
                Host::Name(name) => Ok(Spec::Srv(name)),
                Host::Ip(_) => Err(fail("missing ':PORT'".into())),
            };
        }
        let mut list = Vec::new();
        let several = trimmed.contains(',');
        for (i, element) in trimmed.split(',').enumerate() {
            let element = element.trim();
            if element.is_empty() {
                return Err(fail(format!("element {} of the list is empty", i + 1)));
            }
            // In a list, say which element is wrong; alone, the spec already says it.
            let hp = HostPort::parse(element).map_err(|reason| match several {
                true => fail(format!("'{element}': {reason}")),
                false => fail(reason),
            })?;
            list.push(hp);
        }
        Ok(Spec::Static(list))
    }

    /// The port a standard-mode ambassador listens on when `--port` is not given.
    pub fn default_listen_port(&self) -> u16 {
        match self {
            Spec::Static(list) => list[0].port,
            Spec::Docker(d) => d.port,
            Spec::Srv(_) | Spec::Etcd(_) | Spec::Consul(_) | Spec::ConsulService(_) => {
                DISCOVERY_LISTEN_PORT
            }
        }
    }

    /// A short word for logs and status: which kind of source serves this spec.
    pub fn kind(&self) -> &'static str {
        match self {
            Spec::Static(list) if list.iter().all(|hp| matches!(hp.host, Host::Ip(_))) => "static",
            Spec::Static(_) => "static (resolved)",
            Spec::Srv(_) => "dns-srv",
            Spec::Etcd(_) => "etcd",
            Spec::Consul(_) => "consul",
            Spec::ConsulService(_) => "consul-service",
            Spec::Docker(_) => "docker",
        }
    }
}

impl fmt::Display for Spec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Spec::Static(list) => {
                for (i, hp) in list.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{hp}")?;
                }
                Ok(())
            }
            Spec::Srv(name) => f.write_str(name),
            Spec::Etcd(kv) => write!(f, "etcd://{}{}", kv.server, kv.path),
            Spec::Consul(kv) => write!(f, "consul://{}{}", kv.server, kv.path),
            Spec::ConsulService(s) => write!(f, "consul-service://{s}"),
            Spec::Docker(d) => write!(f, "docker://{d}"),
        }
    }
}

impl ServiceSpec {
    /// Parses what follows `consul-service://`: `HOST[:PORT]/NAME[?tag=TAG][&dc=DC]`.
    fn parse(rest: &str) -> Result<ServiceSpec, String> {
        const FORM: &str = "consul-service://HOST[:PORT]/NAME[?tag=TAG][&dc=DC]";
        if let Some(c) = rest.chars().find(|c| *c == '#' || c.is_whitespace()) {
            return Err(format!("contains {c:?} ({FORM})"));
        }
        let Some((server, target)) = rest.split_once('/') else {
            return Err(format!("missing '/NAME' after the server ({FORM})"));
        };
        if server.is_empty() {
            return Err(format!(
                "missing the server before the service name ({FORM})"
            ));
        }
        let server = parse_server(server, CONSUL_DEFAULT_PORT)?;
        let (name, query) = match target.split_once('?') {
            Some((name, query)) => (name, Some(query)),
            None => (target, None),
        };
        if name.is_empty() {
            return Err(format!("the service name is empty ({FORM})"));
        }
        if let Some(c) = name.chars().find(|c| !is_name_char(*c)) {
            return Err(format!(
                "service name '{name}' contains {c:?} (Consul service names here use letters, digits, '-', '_' and '.')"
            ));
        }
        let (mut tag, mut dc) = (None, None);
        if let Some(query) = query {
            if query.is_empty() {
                return Err(format!("nothing after '?' ({FORM})"));
            }
            for param in query.split('&') {
                let Some((key, value)) = param.split_once('=') else {
                    return Err(match param {
                        "" => format!("an empty parameter in '?{query}'"),
                        _ => format!("query parameter '{param}' has no '=VALUE'"),
                    });
                };
                let (slot, allowed): (&mut Option<String>, fn(char) -> bool) = match key {
                    "tag" => (&mut tag, is_tag_char),
                    "dc" => (&mut dc, is_name_char),
                    _ => {
                        return Err(format!(
                            "unknown query parameter '{key}' (only tag and dc are understood)"
                        ));
                    }
                };
                if slot.is_some() {
                    return Err(format!("'{key}' is given twice"));
                }
                if value.is_empty() {
                    return Err(format!("'{key}=' has an empty value"));
                }
                if let Some(c) = value.chars().find(|c| !allowed(*c)) {
                    let chars = match key {
                        "tag" => "letters, digits, '-', '_', '.' and ':'",
                        _ => "letters, digits, '-', '_' and '.'",
                    };
                    return Err(format!("{key} '{value}' contains {c:?} (use {chars})"));
                }
                *slot = Some(value.to_string());
            }
        }
        Ok(ServiceSpec {
            server,
            name: name.to_string(),
            tag,
            dc,
        })
    }
}

/// A character of a service or datacenter name in a `consul-service://` spec.
fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

/// A character of a tag in a `consul-service://` spec: a name's, and ':' (as in
/// `env:prod`).
fn is_tag_char(c: char) -> bool {
    is_name_char(c) || c == ':'
}

impl fmt::Display for ServiceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.server, self.name)?;
        let mut sep = '?';
        for (key, value) in [("tag", &self.tag), ("dc", &self.dc)] {
            if let Some(value) = value {
                write!(f, "{sep}{key}={value}")?;
                sep = '&';
            }
        }
        Ok(())
    }
}

impl DockerSpec {
    /// Parses what follows `docker://`: `NAME:PORT` or `label=KEY[=VALUE]:PORT`.
    fn parse(rest: &str) -> Result<DockerSpec, String> {
        const FORMS: &str = "docker://NAME:PORT or docker://label=KEY=VALUE:PORT";
        let Some((select, port)) = rest.rsplit_once(':') else {
            return Err(format!("missing ':PORT' ({FORMS})"));
        };
        let port = parse_port(port)?;
        let select = match select.strip_prefix("label=") {
            Some(label) => {
                let (key, value) = match label.split_once('=') {
                    Some((k, v)) => (k, Some(v)),
                    None => (label, None),
                };
                if key.is_empty() {
                    return Err(format!("the label key is empty ({FORMS})"));
                }
                if let Some(c) = key
                    .chars()
                    .find(|c| c.is_whitespace() || c.is_control() || *c == ',')
                {
                    return Err(format!("the label key '{key}' contains {c:?}"));
                }
                if value.is_some_and(|v| v.chars().any(char::is_control)) {
                    return Err("the label value contains a control character".into());
                }
                Select::Label {
                    key: key.to_string(),
                    value: value.map(str::to_string),
                }
            }
            None => {
                // Docker's own rule for container names: [a-zA-Z0-9][a-zA-Z0-9_.-]*.
                let mut chars = select.chars();
                match chars.next() {
                    None => return Err(format!("the container name is empty ({FORMS})")),
                    Some(c) if !c.is_ascii_alphanumeric() => {
                        return Err(format!(
                            "container name '{select}' must start with a letter or digit"
                        ));
                    }
                    _ => {}
                }
                if let Some(c) =
                    chars.find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
                {
                    return Err(format!(
                        "container name '{select}' contains {c:?} (Docker names use letters, digits, '_', '.' and '-')"
                    ));
                }
                Select::Name(select.to_string())
            }
        };
        Ok(DockerSpec { select, port })
    }
}

impl fmt::Display for DockerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.select {
            Select::Name(name) => write!(f, "{name}:{}", self.port),
            Select::Label { key, value: None } => write!(f, "label={key}:{}", self.port),
            Select::Label {
                key,
                value: Some(v),
            } => write!(f, "label={key}={v}:{}", self.port),
        }
    }
}

impl KvSpec {
    /// Parses `HOST[:PORT]/PATH` (what follows the scheme).
    fn parse(rest: &str, default_port: u16) -> Result<KvSpec, String> {
        let Some(slash) = rest.find('/') else {
            return Err(
                "missing the key path after the server (as in etcd://127.0.0.1:2379/path/to/nodes)"
                    .into(),
            );
        };
        let (server, path) = rest.split_at(slash);
        if server.is_empty() {
            return Err("missing the server before the key path".into());
        }
        if let Some(c) = path
            .chars()
            .find(|c| matches!(c, '?' | '#' | ',') || c.is_whitespace())
        {
            return Err(format!("the key path '{path}' contains {c:?}"));
        }
        let path = path.trim_end_matches('/');
        if path.is_empty() {
            return Err("the key path is empty".into());
        }
        Ok(KvSpec {
            server: parse_server(server, default_port)?,
            path: path.to_string(),
        })
    }
}

/// A store's `HOST[:PORT]` or `[IPV6][:PORT]`, with `default_port` when none is given.
fn parse_server(server: &str, default_port: u16) -> Result<HostPort, String> {
    if server.ends_with(']') || !server.contains(':') {
        let host = match server.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            Some(v6) => Host::Ip(IpAddr::V6(
                v6.parse()
                    .map_err(|_| format!("'{v6}' is not an IPv6 address"))?,
            )),
            None => parse_host(server)?,
        };
        Ok(HostPort {
            host,
            port: default_port,
        })
    } else {
        HostPort::parse(server)
    }
}

impl HostPort {
    /// Parses one `HOST:PORT` or `[IPV6]:PORT`. The error is the reason alone, without
    /// the element; callers wrap it with where it came from.
    pub fn parse(element: &str) -> Result<HostPort, String> {
        let (host, port) = if let Some(rest) = element.strip_prefix('[') {
            let Some((v6, after)) = rest.split_once(']') else {
                return Err("missing ']' after the IPv6 address".to_string());
            };
            let ip: Ipv6Addr = v6
                .parse()
                .map_err(|_| format!("'{v6}' is not an IPv6 address"))?;
            let Some(port) = after.strip_prefix(':') else {
                return Err("missing ':PORT' after ']'".to_string());
            };
            (Host::Ip(IpAddr::V6(ip)), port)
        } else {
            match element.matches(':').count() {
                0 => return Err("missing ':PORT'".to_string()),
                1 => {}
                _ if element.parse::<Ipv6Addr>().is_ok() => {
                    return Err(format!(
                        "an IPv6 address needs brackets and a port, as in [{element}]:6379"
                    ));
                }
                _ => return Err("too many ':'".to_string()),
            }
            let (host, port) = element.split_once(':').expect("one ':' was counted");
            (parse_host(host)?, port)
        };
        let port = parse_port(port)?;
        Ok(HostPort { host, port })
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            Host::Ip(IpAddr::V4(ip)) => write!(f, "{ip}:{}", self.port),
            Host::Name(name) => write!(f, "{name}:{}", self.port),
        }
    }
}

/// A TCP port for a backend: 1 to 65535.
pub fn parse_port(port: &str) -> Result<u16, String> {
    if port.is_empty() {
        return Err("the port is empty".into());
    }
    if !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("port '{port}' is not a number"));
    }
    match port.parse::<u32>() {
        Ok(0) => Err("port 0 is not a valid backend port".into()),
        Ok(p) if p <= 65535 => Ok(p as u16),
        _ => Err(format!("port {port} is out of range (1-65535)")),
    }
}

/// An IPv4 literal or a syntactically valid DNS name (RFC 1123 labels; '_' is allowed
/// because Docker container names and SRV owner names use it).
pub fn parse_host(host: &str) -> Result<Host, String> {
    if host.is_empty() {
        return Err("the host is empty".into());
    }
    if let Ok(ip) = host.parse::<Ipv4Addr>() {
        return Ok(Host::Ip(IpAddr::V4(ip)));
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.len() > 253 {
        return Err(format!("host '{host}' is longer than 253 characters"));
    }
    let labels: Vec<&str> = name.split('.').collect();
    for label in &labels {
        if label.is_empty() {
            return Err(format!("host '{host}' has an empty label"));
        }
        if label.len() > 63 {
            return Err(format!(
                "host '{host}' has a label longer than 63 characters"
            ));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            return Err(format!("host '{host}' contains the character {c:?}"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!(
                "host '{host}' has a label that starts or ends with '-'"
            ));
        }
    }
    // A name whose last label is all digits would be read as an address by most tools;
    // it is almost always a mistyped IPv4 address.
    if labels
        .last()
        .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(format!("host '{host}' is not a valid IPv4 address or name"));
    }
    Ok(Host::Name(name.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hp(host: Host, port: u16) -> HostPort {
        HostPort { host, port }
    }

    #[test]
    fn valid_specs() {
        let v4 = |s: &str| Host::Ip(s.parse().unwrap());
        let name = |s: &str| Host::Name(s.into());
        let cases: &[(&str, Vec<HostPort>)] = &[
            ("192.168.1.100:8080", vec![hp(v4("192.168.1.100"), 8080)]),
            (
                "redis.example.com:6379",
                vec![hp(name("redis.example.com"), 6379)],
            ),
            (
                "redis-1.example.com:6379, redis-2.example.com:6380",
                vec![
                    hp(name("redis-1.example.com"), 6379),
                    hp(name("redis-2.example.com"), 6380),
                ],
            ),
            ("[::1]:6379", vec![hp(v4("::1"), 6379)]),
            ("localhost:1", vec![hp(name("localhost"), 1)]),
            ("my_redis:65535", vec![hp(name("my_redis"), 65535)]),
            ("fqdn.example.:80", vec![hp(name("fqdn.example"), 80)]),
        ];
        for (input, want) in cases {
            assert_eq!(
                Spec::parse(input),
                Ok(Spec::Static(want.clone())),
                "input {input}"
            );
        }
    }

    /// `docker://` selects by name or label, listens on its port, and shows as written.
    #[test]
    fn docker_specs() {
        let cases: &[(&str, Select, u16)] = &[
            ("docker://redis:6379", Select::Name("redis".into()), 6379),
            (
                "docker://proj_web.1-a:80",
                Select::Name("proj_web.1-a".into()),
                80,
            ),
            (
                "docker://label=app=web:8080",
                Select::Label {
                    key: "app".into(),
                    value: Some("web".into()),
                },
                8080,
            ),
            (
                "docker://label=com.example.tier=a=b:c:80",
                Select::Label {
                    key: "com.example.tier".into(),
                    value: Some("a=b:c".into()),
                },
                80,
            ),
            (
                "docker://label=traefik.enable:80",
                Select::Label {
                    key: "traefik.enable".into(),
                    value: None,
                },
                80,
            ),
        ];
        for (input, select, port) in cases {
            let spec = Spec::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(
                spec,
                Spec::Docker(DockerSpec {
                    select: select.clone(),
                    port: *port
                }),
                "{input}"
            );
            assert_eq!(spec.to_string(), *input);
            assert_eq!(spec.default_listen_port(), *port);
            assert_eq!(spec.kind(), "docker");
        }
        for (input, want) in [
            ("docker://redis", "missing ':PORT'"),
            ("docker://:80", "the container name is empty"),
            ("docker://redis:0", "port 0"),
            ("docker://-x:80", "must start with a letter or digit"),
            ("docker://a/b:80", "contains '/'"),
            ("docker://label=:80", "the label key is empty"),
            ("docker://label=a b=c:80", "contains ' '"),
        ] {
            let e = Spec::parse(input).unwrap_err().to_string();
            assert!(e.contains(want), "{input}: {e}");
            assert!(e.starts_with(&format!("backend '{input}'")), "{e}");
        }
    }

    /// `consul-service://` names a service, optionally a tag and a datacenter (in either
    /// order, each once); it listens on 10000 and is shown with the tag first.
    #[test]
    fn consul_service_specs() {
        let svc = |server: &str, name: &str, tag: Option<&str>, dc: Option<&str>| {
            Spec::ConsulService(ServiceSpec {
                server: HostPort::parse(server).unwrap(),
                name: name.into(),
                tag: tag.map(Into::into),
                dc: dc.map(Into::into),
            })
        };
        let cases: &[(&str, Spec, &str)] = &[
            (
                "consul-service://127.0.0.1:8500/redis",
                svc("127.0.0.1:8500", "redis", None, None),
                "consul-service://127.0.0.1:8500/redis",
            ),
            (
                "consul-service://consul/redis",
                svc("consul:8500", "redis", None, None),
                "consul-service://consul:8500/redis",
            ),
            (
                "consul-service://[::1]/web_1.v2?tag=primary",
                svc("[::1]:8500", "web_1.v2", Some("primary"), None),
                "consul-service://[::1]:8500/web_1.v2?tag=primary",
            ),
            (
                "consul-service://h:1/api?dc=eu-west_1",
                svc("h:1", "api", None, Some("eu-west_1")),
                "consul-service://h:1/api?dc=eu-west_1",
            ),
            (
                "consul-service://h:1/api?dc=dc2&tag=env:prod",
                svc("h:1", "api", Some("env:prod"), Some("dc2")),
                "consul-service://h:1/api?tag=env:prod&dc=dc2",
            ),
        ];
        for (input, want, shown) in cases {
            let spec = Spec::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(&spec, want, "{input}");
            assert_eq!(spec.to_string(), *shown, "{input}");
            assert_eq!(Spec::parse(shown).as_ref(), Ok(want), "{shown} round trip");
            assert_eq!(spec.default_listen_port(), DISCOVERY_LISTEN_PORT);
            assert_eq!(spec.kind(), "consul-service");
        }
        // The KV form keeps its meaning next to it.
        assert!(matches!(
            Spec::parse("consul://127.0.0.1:8500/redis"),
            Ok(Spec::Consul(_))
        ));
        for (input, want) in [
            ("consul-service://h", "missing '/NAME' after the server"),
            ("consul-service:///redis", "missing the server"),
            ("consul-service://h/", "the service name is empty"),
            ("consul-service://h/?tag=a", "the service name is empty"),
            ("consul-service://h:x/redis", "port 'x' is not a number"),
            ("consul-service://h:0/redis", "port 0"),
            (
                "consul-service://h/redis/x",
                "service name 'redis/x' contains '/'",
            ),
            ("consul-service://h/re%64is", "contains '%'"),
            ("consul-service://h/re dis", "contains ' '"),
            ("consul-service://h/redis#frag", "contains '#'"),
            ("consul-service://h/redis?", "nothing after '?'"),
            ("consul-service://h/redis?tag=", "'tag=' has an empty value"),
            ("consul-service://h/redis?dc=", "'dc=' has an empty value"),
            ("consul-service://h/redis?tag", "'tag' has no '=VALUE'"),
            (
                "consul-service://h/redis?color=red",
                "unknown query parameter 'color' (only tag and dc",
            ),
            (
                "consul-service://h/redis?passing",
                "'passing' has no '=VALUE'",
            ),
            (
                "consul-service://h/redis?tag=a&tag=b",
                "'tag' is given twice",
            ),
            ("consul-service://h/redis?dc=a&dc=a", "'dc' is given twice"),
            ("consul-service://h/redis?tag=a&", "an empty parameter"),
            ("consul-service://h/redis?tag=a&&dc=b", "an empty parameter"),
            ("consul-service://h/redis?tag=a=b", "tag 'a=b' contains '='"),
            ("consul-service://h/redis?tag=a/b", "tag 'a/b' contains '/'"),
            ("consul-service://h/redis?dc=dc:2", "dc 'dc:2' contains ':'"),
            ("consul-service://h/redis?tag=a?b", "contains '?'"),
        ] {
            let e = Spec::parse(input).expect_err(input).to_string();
            assert!(e.starts_with(&format!("backend '{input}': ")), "{e}");
            assert!(e.contains(want), "{input}: got {e:?}, want {want:?}");
        }
    }

    #[test]
    fn invalid_specs_name_the_value() {
        let cases: &[(&str, &str)] = &[
            ("", "the backend is empty"),
            ("   ", "the backend is empty"),
            ("10.0.0.5", "backend '10.0.0.5': missing ':PORT'"),
            ("10.0.0.5,b:1", "'10.0.0.5': missing ':PORT'"),
            (
                "redis.service.consul,b:1",
                "'redis.service.consul': missing ':PORT'",
            ),
            ("bad_srv-.example", "starts or ends with '-'"),
            ("etcd://127.0.0.1:2379", "missing the key path"),
            ("etcd://127.0.0.1:2379/", "the key path is empty"),
            ("etcd:///path", "missing the server"),
            ("consul://h:x/path", "port 'x' is not a number"),
            ("consul://h/p?recurse", "contains '?'"),
            ("zk://h:1/p", "unsupported scheme 'zk://'"),
            (
                "consul-svc://h/p",
                "use etcd://, consul://, consul-service:// or docker://",
            ),
            ("redis:", "backend 'redis:': the port is empty"),
            (
                "redis:abc",
                "backend 'redis:abc': port 'abc' is not a number",
            ),
            (
                "redis:0",
                "backend 'redis:0': port 0 is not a valid backend port",
            ),
            (
                "redis:65536",
                "backend 'redis:65536': port 65536 is out of range",
            ),
            (
                "a:1,redis:x",
                "backend 'a:1,redis:x': 'redis:x': port 'x' is not a number",
            ),
            ("redis:-1", "port '-1' is not a number"),
            ("a:1,", "element 2 of the list is empty"),
            ("a:1,,b:2", "element 2 of the list is empty"),
            (":80", "backend ':80': the host is empty"),
            ("bad host:80", "host 'bad host' contains the character ' '"),
            ("ex$ample:80", "contains the character '$'"),
            ("-foo:80", "starts or ends with '-'"),
            ("a..b:80", "has an empty label"),
            ("1.2.3.4.5:80", "is not a valid IPv4 address or name"),
            ("::1", "needs brackets and a port, as in [::1]:6379"),
            ("[::1:80", "missing ']'"),
            ("[::1]80", "missing ':PORT' after ']'"),
            ("[zz]:80", "'zz' is not an IPv6 address"),
            ("a:1:2", "too many ':'"),
            ("http://x:80", "unsupported scheme 'http://'"),
        ];
        for (input, want) in cases {
            let err = Spec::parse(input).expect_err(input).to_string();
            assert!(
                err.starts_with(&format!("backend '{input}': ")),
                "{input}: {err}"
            );
            assert!(err.contains(want), "{input}: got {err:?}, want {want:?}");
        }
    }

    #[test]
    fn discovery_specs() {
        let kv = |host: &str, port, path: &str| KvSpec {
            server: HostPort::parse(&format!("{host}:{port}")).unwrap(),
            path: path.into(),
        };
        let cases: &[(&str, Spec)] = &[
            (
                "redis.service.consul",
                Spec::Srv("redis.service.consul".into()),
            ),
            (
                "_redis._tcp.example.com",
                Spec::Srv("_redis._tcp.example.com".into()),
            ),
            ("localhost", Spec::Srv("localhost".into())),
            (
                "etcd://127.0.0.1:2379/path/to/backend/nodes",
                Spec::Etcd(kv("127.0.0.1", 2379, "/path/to/backend/nodes")),
            ),
            ("etcd://etcd/nodes/", Spec::Etcd(kv("etcd", 2379, "/nodes"))),
            (
                "consul://127.0.0.1:8500/path/to/backend/nodes",
                Spec::Consul(kv("127.0.0.1", 8500, "/path/to/backend/nodes")),
            ),
            (
                "consul://consul/svc",
                Spec::Consul(kv("consul", 8500, "/svc")),
            ),
            (
                "consul://[::1]/svc",
                Spec::Consul(kv("[::1]", 8500, "/svc")),
            ),
        ];
        for (input, want) in cases {
            let got = Spec::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(&got, want, "{input}");
            assert_eq!(got.default_listen_port(), DISCOVERY_LISTEN_PORT);
        }
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "10.0.0.1:80,[::1]:81,redis:6379",
            "my_redis:6379",
            "redis.service.consul",
            "etcd://127.0.0.1:2379/a/b",
            "consul://[::1]:8500/a",
            "consul-service://[::1]:8500/redis?tag=v1&dc=dc2",
        ] {
            assert_eq!(Spec::parse(s).unwrap().to_string(), s);
        }
    }

    #[test]
    fn listen_port_is_the_first_backends() {
        assert_eq!(
            Spec::parse("a:6379,b:6380").unwrap().default_listen_port(),
            6379
        );
    }

    #[test]
    fn a_tls_prefix_marks_any_spec_as_reached_over_tls() {
        for written in [
            "tls+10.0.0.5:6379",
            "tls+redis.service.consul",
            "tls+consul://127.0.0.1:8500/svc/redis",
            "tls+etcd://127.0.0.1:2379/svc",
            "tls+consul-service://127.0.0.1:8500/redis",
            "tls+docker://db:5432",
        ] {
            let b = BackendSpec::parse(written).unwrap();
            assert!(b.tls, "{written}");
            assert_eq!(b.spec, Spec::parse(&written[4..]).unwrap());
            assert_eq!(b.to_string(), written);
        }
        let plain = BackendSpec::parse("10.0.0.5:6379").unwrap();
        assert!(!plain.tls);
        assert_eq!(plain.to_string(), "10.0.0.5:6379");
    }

    #[test]
    fn a_bad_spec_after_tls_names_the_whole_value() {
        let e = BackendSpec::parse("tls+10.0.0.5").unwrap_err();
        assert_eq!(e.spec, "tls+10.0.0.5");
        assert!(e.to_string().contains("missing ':PORT'"), "{e}");
        let e = BackendSpec::parse("tls+").unwrap_err();
        assert!(e.to_string().contains("'tls+'"), "{e}");
        assert!(BackendSpec::parse("tls+tls+10.0.0.5:1").is_err());
        assert!(BackendSpec::parse("ssl+10.0.0.5:1").is_err());
    }
}
