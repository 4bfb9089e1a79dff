//! The grammars of single option values: durations, addresses, the Docker host, log
//! filters. Each returns the reason a value is refused; the caller adds the origin and
//! the value (see `layer::at`).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use super::types::{Cidr, DockerHost, Listen, RunAs};

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

/// `--idle-timeout`: a duration, or `off`, `none` or zero for never.
pub(super) fn parse_idle_timeout(s: &str) -> Result<Option<Duration>, String> {
    match s {
        "off" | "none" | "0" => Ok(None),
        s => Ok(Some(parse_duration(s)?).filter(|d| !d.is_zero())),
    }
}

/// `--bind`: an IP address, an IPv6 one with or without brackets.
pub(super) fn parse_ip(s: &str) -> Result<IpAddr, String> {
    s.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .map_err(|_| "not an IP address".to_string())
}

/// A nameserver: `IP`, `IP:PORT` or `[IPV6]:PORT` (port 53 when left out). It must be
/// an address: the resolver cannot look up its own server.
pub(super) fn parse_dns(s: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    match parse_ip(s) {
        Ok(ip) => Ok((ip, 53).into()),
        Err(_) => Err("not an IP address or IP:PORT".into()),
    }
}

/// `IP:PORT`, `[IPV6]:PORT`, `:PORT`, `*:PORT` or `PORT`.
pub(super) fn parse_listen(s: &str) -> Result<Listen, String> {
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

/// `--admin`: `IP:PORT`, or `off` (also `none`) for no admin endpoint. Empty is a
/// mistake (an unset variable in a compose file), not a way to turn it off.
pub(super) fn parse_admin(s: &str) -> Result<Option<SocketAddr>, String> {
    match s {
        "off" | "none" => Ok(None),
        "" => Err("empty: give IP:PORT, or off to run without it".to_string()),
        s => s
            .parse::<SocketAddr>()
            .map(Some)
            .map_err(|_| "not IP:PORT or off (e.g. 127.0.0.1:10001)".to_string()),
    }
}

/// `--check`: `tcp` (on) or `off`.
pub(super) fn parse_check(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "tcp" => Ok(true),
        "off" | "none" => Ok(false),
        _ => Err("not a check kind: tcp or off".to_string()),
    }
}

/// `--check-interval`: a duration of at least 100 ms (a check more often than that
/// would only load the backends).
pub(super) fn parse_check_interval(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_millis(100) {
        return Err("must be at least 100ms".to_string());
    }
    Ok(d)
}

/// Bytes from text with `\r`, `\n`, `\t`, `\\` and `\xHH` escapes (`--check-send`).
pub(super) fn unescape(s: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        match bytes.next() {
            Some(b'r') => out.push(b'\r'),
            Some(b'n') => out.push(b'\n'),
            Some(b't') => out.push(b'\t'),
            Some(b'\\') => out.push(b'\\'),
            Some(b'x') => {
                let hex: Vec<u8> = bytes.by_ref().take(2).collect();
                let v = std::str::from_utf8(&hex)
                    .ok()
                    .filter(|h| h.len() == 2)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| "\\x needs two hex digits".to_string())?;
                out.push(v);
            }
            Some(c) => return Err(format!("unknown escape '\\{}'", c as char)),
            None => return Err("ends with a lone '\\'".to_string()),
        }
    }
    if out.is_empty() {
        return Err("empty".to_string());
    }
    Ok(out)
}

/// `--run-as`: `UID` or `UID:GID`, numbers (the group defaults to the user's number).
pub(super) fn parse_run_as(s: &str) -> Result<RunAs, String> {
    let number = |part: &str, what: &str| {
        part.parse::<u32>().map_err(|_| {
            format!("{what} '{part}' is not a number (give UID or UID:GID, e.g. 65534:65534)")
        })
    };
    let (uid, gid) = match s.split_once(':') {
        Some((u, g)) => (number(u, "user")?, number(g, "group")?),
        None => {
            let uid = number(s, "user")?;
            (uid, uid)
        }
    };
    Ok(RunAs { uid, gid })
}

/// `--docker-host`: `unix:///PATH`, or `tcp://HOST:PORT` or `http://HOST:PORT` (the
/// forms the Docker client accepts without TLS).
pub(super) fn parse_docker_host(s: &str) -> Result<DockerHost, String> {
    const FORMS: &str = "not unix:///PATH or tcp://HOST:PORT";
    if let Some(path) = s.strip_prefix("unix://") {
        return match path {
            "" => Err(format!(
                "{FORMS}: the socket path is missing (e.g. unix:///var/run/docker.sock)"
            )),
            path => Ok(DockerHost::Unix(PathBuf::from(path))),
        };
    }
    let Some(rest) = s
        .strip_prefix("tcp://")
        .or_else(|| s.strip_prefix("http://"))
    else {
        return Err(format!("{FORMS} (e.g. unix:///var/run/docker.sock)"));
    };
    // The client puts each request's path after HOST:PORT, so a path of its own (other
    // than a trailing '/') would be sent mangled.
    let addr = rest.strip_suffix('/').unwrap_or(rest);
    match addr.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0) => {
            Ok(DockerHost::Tcp(addr.to_string()))
        }
        _ => Err(format!(
            "{FORMS}: HOST:PORT is missing or incomplete (e.g. tcp://127.0.0.1:2375)"
        )),
    }
}

/// `--log-level`: a level or tracing directives.
pub(super) fn check_log_filter(filter: &str) -> Result<(), String> {
    // A lone word is taken by tracing as a target name, so a misspelt level would
    // silently log nothing: require a real level there.
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    if !filter.contains(['=', ',']) && !LEVELS.contains(&filter.to_ascii_lowercase().as_str()) {
        return Err("not a log level (off, error, warn, info, debug, trace)".into());
    }
    tracing_subscriber::EnvFilter::try_new(filter)
        .map(drop)
        .map_err(|e| format!("not a log level or filter ({e})"))
}

/// `--max-connections`, `max_connections` and omni's `ambassadord.max-connections.<port>`:
/// a count from 1 (leave it out for no limit).
pub fn parse_max_connections(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u64>() {
        Ok(0) => Err("must be at least 1 (leave it out for no limit)".into()),
        Ok(n) => u32::try_from(n).map_err(|_| format!("more than {}", u32::MAX)),
        Err(_) => Err("not a count of connections (1 or more)".into()),
    }
}

/// `--proxy-protocol`, `proxy_protocol` and omni's `ambassadord.proxy-protocol.<port>`.
pub fn parse_proxy_protocol(s: &str) -> Result<crate::proxy_protocol::Version, String> {
    s.parse()
        .map_err(|e: crate::proxy_protocol::UnknownVersion| e.to_string())
}

/// `--accept-proxy-protocol`: `CIDR[,CIDR…]`, at least one.
pub(super) fn parse_cidrs(s: &str) -> Result<Vec<Cidr>, String> {
    let cidrs = s
        .split(',')
        .map(str::trim)
        .map(|c| {
            if c.is_empty() {
                return Err("an empty entry (write CIDR[,CIDR...], e.g. 10.0.0.0/8)".to_string());
            }
            c.parse::<Cidr>().map_err(|why| format!("'{c}': {why}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(cidrs)
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn docker_hosts() {
        let unix = |p: &str| Ok(DockerHost::Unix(PathBuf::from(p)));
        let tcp = |a: &str| Ok(DockerHost::Tcp(a.to_string()));
        let cases = [
            ("unix:///var/run/docker.sock", unix("/var/run/docker.sock")),
            ("tcp://127.0.0.1:2375", tcp("127.0.0.1:2375")),
            ("http://docker.example:2375/", tcp("docker.example:2375")),
            ("tcp://[::1]:2375", tcp("[::1]:2375")),
        ];
        for (s, want) in cases {
            assert_eq!(parse_docker_host(s), want, "{s}");
        }
        for (s, why) in [
            ("ftp://x", "not unix:///PATH or tcp://HOST:PORT"),
            ("ssh://host", "not unix:///PATH or tcp://HOST:PORT"),
            (
                "/var/run/docker.sock",
                "not unix:///PATH or tcp://HOST:PORT",
            ),
            ("", "not unix:///PATH or tcp://HOST:PORT"),
            ("unix://", "the socket path is missing"),
            ("tcp://", "HOST:PORT is missing"),
            ("tcp://host", "HOST:PORT is missing"),
            ("tcp://:2375", "HOST:PORT is missing"),
            ("tcp://host:", "HOST:PORT is missing"),
            ("tcp://host:0", "HOST:PORT is missing"),
            ("tcp://host:2375/v1", "HOST:PORT is missing"),
        ] {
            let err = parse_docker_host(s).expect_err(s);
            assert!(err.contains(why), "{s}: {err}");
        }
    }
}
