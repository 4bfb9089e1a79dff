//! The backend spec grammar: what a user writes to say where connections go.
//!
//! Parsing does no I/O. Every error names the whole spec and the element at fault, so a
//! message read in a container log points straight at the typo.
//!
//! ```text
//! spec    = static
//! static  = hostport *( "," hostport )
//! hostport= host ":" port | "[" ipv6 "]" ":" port
//! host    = ipv4 | dns-name            ; letters, digits, '-', '_' and dots
//! port    = 1..65535
//! ```

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A parsed backend spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spec {
    /// A fixed list of `HOST:PORT`; host names are resolved (and re-resolved on TTL).
    Static(Vec<HostPort>),
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

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("backend '{spec}': {reason}")]
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
        if let Some((scheme, _)) = trimmed.split_once("://") {
            return Err(fail(format!(
                "unsupported scheme '{scheme}://' (expected HOST:PORT[,HOST:PORT...])"
            )));
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
        }
    }

    /// A short word for logs and status: which kind of source serves this spec.
    pub fn kind(&self) -> &'static str {
        match self {
            Spec::Static(list) if list.iter().all(|hp| matches!(hp.host, Host::Ip(_))) => "static",
            Spec::Static(_) => "static (resolved)",
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
        }
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

    #[test]
    fn invalid_specs_name_the_value() {
        let cases: &[(&str, &str)] = &[
            ("", "the backend is empty"),
            ("   ", "the backend is empty"),
            ("10.0.0.5", "backend '10.0.0.5': missing ':PORT'"),
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
    fn display_round_trips() {
        for s in ["10.0.0.1:80,[::1]:81,redis:6379", "my_redis:6379"] {
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
}
