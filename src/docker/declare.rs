//! What a container declares for omni mode: which backend each of its outgoing ports
//! goes to, from env `BACKEND_<port>` or the labels `ambassadord.backend.<port>` and
//! connectable's `connect.<port>`; and per port, the PROXY protocol header its
//! connections carry to the backend (`BACKEND_<port>_PROXY_PROTOCOL`,
//! `ambassadord.proxy-protocol.<port>`) and a limit on its open connections
//! (`BACKEND_<port>_MAX_CONNECTIONS`, `ambassadord.max-connections.<port>`).
//!
//! Pure parsing, no I/O: a bad declaration is skipped with a message naming the
//! container, the variable or label, and the value; the container's other declarations
//! keep working.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use crate::logsafe::outside;
use crate::proxy_protocol::Version;
use crate::spec::BackendSpec;

pub const ENV_PREFIX: &str = "BACKEND_";
pub const LABEL_PREFIX: &str = "ambassadord.backend.";
pub const CONNECTABLE_LABEL_PREFIX: &str = "connect.";
pub const PROXY_PROTOCOL_LABEL_PREFIX: &str = "ambassadord.proxy-protocol.";
pub const MAX_CONNECTIONS_LABEL_PREFIX: &str = "ambassadord.max-connections.";
const PROXY_PROTOCOL_ENV_SUFFIX: &str = "_PROXY_PROTOCOL";
const MAX_CONNECTIONS_ENV_SUFFIX: &str = "_MAX_CONNECTIONS";

/// Where one port's connections go, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Declaration {
    /// Where, and whether over TLS (`tls+`).
    pub spec: BackendSpec,
    /// The header toward the backend; `None`: the route's (`--proxy-protocol`).
    pub proxy_protocol: Option<Version>,
    /// At most this many of the container's connections to the port open at once.
    pub max_connections: Option<u32>,
}

impl fmt::Display for Declaration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.spec)?;
        if let Some(v) = self.proxy_protocol {
            write!(f, " (proxy-protocol {v})")?;
        }
        if let Some(n) = self.max_connections {
            write!(f, " (max-connections {n})")?;
        }
        Ok(())
    }
}

/// A container's declarations, by destination port.
pub type Declarations = BTreeMap<u16, Declaration>;

/// One port's option, before it is joined to the port's backend.
#[derive(Default)]
struct PortOptions {
    /// The value and where it came from (`env X` or `label Y`), for messages.
    proxy_protocol: Option<(String, String)>,
    max_connections: Option<(String, String)>,
}

/// Reads the declarations from a container's environment (`KEY=VALUE` strings, as the
/// Engine API returns them) and labels. Where several forms name the same port, the
/// environment wins over `ambassadord.backend.*`, which wins over `connect.*`. Returns
/// the declarations and one message per declaration that was skipped.
pub fn declarations(
    container: &str,
    env: &[String],
    labels: &HashMap<String, String>,
) -> (Declarations, Vec<String>) {
    let mut specs: BTreeMap<u16, BackendSpec> = BTreeMap::new();
    let mut options: BTreeMap<u16, PortOptions> = BTreeMap::new();
    let mut problems = Vec::new();
    let mut labels: Vec<(&String, &String)> = labels.iter().collect();
    labels.sort();
    let bad_port = |what: &str, key: &str, port: &str| {
        format!(
            "container '{}': {what} {}: '{}' is not a port number (1-65535); skipped",
            outside(container),
            outside(key),
            outside(port)
        )
    };

    // Lowest precedence first, so later forms overwrite earlier ones.
    let sources = [(CONNECTABLE_LABEL_PREFIX, "label"), (LABEL_PREFIX, "label")];
    for (prefix, what) in sources {
        for (key, value) in &labels {
            if let Some(port) = key.strip_prefix(prefix) {
                add(container, what, key, port, value, &mut specs, &mut problems);
            }
        }
    }
    for (key, value) in &labels {
        let (port, pp) = if let Some(port) = key.strip_prefix(PROXY_PROTOCOL_LABEL_PREFIX) {
            (port, true)
        } else if let Some(port) = key.strip_prefix(MAX_CONNECTIONS_LABEL_PREFIX) {
            (port, false)
        } else {
            continue;
        };
        match parse_port(port) {
            Some(p) => set_option(&mut options, p, pp, format!("label {key}"), value),
            None => problems.push(bad_port("label", key, port)),
        }
    }
    for entry in env {
        let Some((key, value)) = entry.split_once('=') else {
            continue;
        };
        let Some(rest) = key.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let option = [
            (PROXY_PROTOCOL_ENV_SUFFIX, true),
            (MAX_CONNECTIONS_ENV_SUFFIX, false),
        ]
        .into_iter()
        .find_map(|(suffix, pp)| rest.strip_suffix(suffix).map(|port| (port, pp)));
        match option {
            Some((port, pp)) => match parse_port(port) {
                Some(p) => set_option(&mut options, p, pp, format!("env {key}"), value),
                None => problems.push(bad_port("env", key, port)),
            },
            None => add(
                container,
                "env",
                key,
                rest,
                value,
                &mut specs,
                &mut problems,
            ),
        }
    }

    let mut found = Declarations::new();
    for (port, spec) in specs {
        let opts = options.remove(&port).unwrap_or_default();
        let mut skipped = Vec::new();
        let proxy_protocol = option_value(
            container,
            opts.proxy_protocol,
            crate::config::parse_proxy_protocol,
            &mut skipped,
        );
        let max_connections = option_value(
            container,
            opts.max_connections,
            crate::config::parse_max_connections,
            &mut skipped,
        );
        if !skipped.is_empty() {
            problems.extend(skipped);
            continue;
        }
        found.insert(
            port,
            Declaration {
                spec,
                proxy_protocol,
                max_connections,
            },
        );
    }
    // Options for a port with no usable backend declared: say so (its backend's own
    // problem, if it had one, is already named).
    for (port, opts) in options {
        for (origin, _) in [opts.proxy_protocol, opts.max_connections]
            .into_iter()
            .flatten()
        {
            problems.push(format!(
                "container '{}': {}: no backend is declared for port {port} (BACKEND_{port}); ignored",
                outside(container),
                outside(&origin)
            ));
        }
    }
    (found, problems)
}

fn parse_port(port: &str) -> Option<u16> {
    port.parse::<u16>().ok().filter(|p| *p > 0)
}

/// Records one option for `port`; the environment is read last, so it wins.
fn set_option(
    options: &mut BTreeMap<u16, PortOptions>,
    port: u16,
    pp: bool,
    origin: String,
    value: &str,
) {
    let slot = options.entry(port).or_default();
    let value = Some((origin, value.to_string()));
    if pp {
        slot.proxy_protocol = value;
    } else {
        slot.max_connections = value;
    }
}

/// One option's value, parsed; a bad one is added to `skipped`.
fn option_value<T>(
    container: &str,
    option: Option<(String, String)>,
    parse: fn(&str) -> Result<T, String>,
    skipped: &mut Vec<String>,
) -> Option<T> {
    let (origin, value) = option?;
    parse(&value)
        .map_err(|why| skipped.push(option_problem(container, &origin, &value, &why)))
        .ok()
}

/// A bad option value: the whole declaration for its port is skipped, so a container
/// that asked for a limit or a header never gets a connection without it.
fn option_problem(container: &str, origin: &str, value: &str, why: &str) -> String {
    format!(
        "container '{}': {} '{}': {why}; the port's declaration is skipped",
        outside(container),
        outside(origin),
        outside(value)
    )
}

fn add(
    container: &str,
    what: &str,
    key: &str,
    port: &str,
    value: &str,
    found: &mut BTreeMap<u16, BackendSpec>,
    problems: &mut Vec<String>,
) {
    let port = match parse_port(port) {
        Some(p) => p,
        None => {
            problems.push(format!(
                "container '{}': {what} {}: '{}' is not a port number (1-65535); skipped",
                outside(container),
                outside(key),
                outside(port)
            ));
            return;
        }
    };
    match BackendSpec::parse(value) {
        Ok(spec) => {
            found.insert(port, spec);
        }
        Err(e) => problems.push(format!(
            "container '{}': {what} {}: {e}; skipped",
            outside(container),
            outside(key)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[&str]) -> Vec<String> {
        vars.iter().map(|s| s.to_string()).collect()
    }

    fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn env_and_labels_declare_ports() {
        let (found, problems) = declarations(
            "web",
            &env(&[
                "PATH=/bin",
                "BACKEND_6379=redis.service.consul",
                "BACKEND_80=10.0.0.1:8080",
            ]),
            &labels(&[
                ("ambassadord.backend.5432", "db:5432"),
                ("connect.11211", "memcache:11211"),
            ]),
        );
        assert!(problems.is_empty(), "{problems:?}");
        let got: Vec<(u16, String)> = found.iter().map(|(p, s)| (*p, s.to_string())).collect();
        assert_eq!(
            got,
            [
                (80, "10.0.0.1:8080".to_string()),
                (5432, "db:5432".to_string()),
                (6379, "redis.service.consul".to_string()),
                (11211, "memcache:11211".to_string()),
            ]
        );
    }

    #[test]
    fn env_wins_over_labels_and_ambassadord_label_over_connect() {
        let (found, _) = declarations(
            "web",
            &env(&["BACKEND_80=a:1"]),
            &labels(&[
                ("ambassadord.backend.80", "b:1"),
                ("connect.80", "c:1"),
                ("connect.81", "c:2"),
                ("ambassadord.backend.81", "b:2"),
            ]),
        );
        assert_eq!(found[&80].to_string(), "a:1");
        assert_eq!(found[&81].to_string(), "b:2");
    }

    #[test]
    fn bad_declarations_are_skipped_and_named() {
        let (found, problems) = declarations(
            "web",
            &env(&[
                "BACKEND_abc=a:1",
                "BACKEND_0=a:1",
                "BACKEND_6379=redis:xyz",
                "BACKEND_80=a:1",
                "NOEQUALS",
            ]),
            &labels(&[("connect.99999", "a:1")]),
        );
        assert_eq!(found.len(), 1);
        assert_eq!(found[&80].to_string(), "a:1");
        assert_eq!(problems.len(), 4, "{problems:?}");
        let all = problems.join("\n");
        assert!(
            all.contains("container 'web': env BACKEND_abc: 'abc' is not a port number"),
            "{all}"
        );
        assert!(
            all.contains("container 'web': env BACKEND_0: '0' is not a port number"),
            "{all}"
        );
        assert!(
            all.contains(
                "container 'web': env BACKEND_6379: backend 'redis:xyz': port 'xyz' is not a number"
            ),
            "{all}"
        );
        assert!(
            all.contains("container 'web': label connect.99999"),
            "{all}"
        );
    }

    #[test]
    fn options_per_port_from_labels_and_env() {
        let (found, problems) = declarations(
            "web",
            &env(&[
                "BACKEND_6379=redis:6379",
                "BACKEND_6379_PROXY_PROTOCOL=v1",
                "BACKEND_5432=db:5432",
                "BACKEND_5432_MAX_CONNECTIONS=16",
            ]),
            &labels(&[
                ("ambassadord.proxy-protocol.6379", "v2"),
                ("ambassadord.proxy-protocol.80", "v2"),
                ("ambassadord.max-connections.80", "3"),
                ("ambassadord.backend.80", "web:8080"),
            ]),
        );
        assert!(problems.is_empty(), "{problems:?}");
        // The environment wins over a label for an option too.
        assert_eq!(found[&6379].proxy_protocol, Some(Version::V1));
        assert_eq!(found[&6379].max_connections, None);
        assert_eq!(found[&5432].proxy_protocol, None);
        assert_eq!(found[&5432].max_connections, Some(16));
        assert_eq!(found[&80].proxy_protocol, Some(Version::V2));
        assert_eq!(found[&80].max_connections, Some(3));
        assert_eq!(
            found[&80].to_string(),
            "web:8080 (proxy-protocol v2) (max-connections 3)"
        );
    }

    /// A bad option skips its port's declaration (the container's others keep working);
    /// an option for a port with no backend is named and ignored.
    #[test]
    fn bad_options_skip_the_declaration_and_say_why() {
        let (found, problems) = declarations(
            "web",
            &env(&[
                "BACKEND_6379=redis:6379",
                "BACKEND_6379_PROXY_PROTOCOL=v3",
                "BACKEND_80=web:80",
                "BACKEND_x_MAX_CONNECTIONS=3",
            ]),
            &labels(&[
                ("ambassadord.backend.5432", "db:5432"),
                ("ambassadord.max-connections.5432", "0"),
                ("ambassadord.max-connections.11211", "5"),
            ]),
        );
        assert_eq!(found.keys().copied().collect::<Vec<_>>(), [80]);
        let all = problems.join("\n");
        assert_eq!(problems.len(), 4, "{all}");
        for want in [
            "container 'web': env BACKEND_6379_PROXY_PROTOCOL 'v3': not a PROXY protocol version (off, v1, v2); the port's declaration is skipped",
            "container 'web': label ambassadord.max-connections.5432 '0': must be at least 1",
            "container 'web': env BACKEND_x_MAX_CONNECTIONS: 'x' is not a port number",
            "container 'web': label ambassadord.max-connections.11211: no backend is declared for port 11211",
        ] {
            assert!(all.contains(want), "{want} in\n{all}");
        }
    }
}
