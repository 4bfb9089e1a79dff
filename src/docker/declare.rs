//! What a container declares for omni mode: which backend each of its outgoing ports
//! goes to, from env `BACKEND_<port>` or the labels `ambassadord.backend.<port>` and
//! connectable's `connect.<port>`.
//!
//! Pure parsing, no I/O: a bad declaration is skipped with a message naming the
//! container, the variable or label, and the value; the container's other declarations
//! keep working.

use std::collections::{BTreeMap, HashMap};

use crate::logsafe::outside;
use crate::spec::Spec;

pub const ENV_PREFIX: &str = "BACKEND_";
pub const LABEL_PREFIX: &str = "ambassadord.backend.";
pub const CONNECTABLE_LABEL_PREFIX: &str = "connect.";

/// A container's declarations, by destination port.
pub type Declarations = BTreeMap<u16, Spec>;

/// Reads the declarations from a container's environment (`KEY=VALUE` strings, as the
/// Engine API returns them) and labels. Where several forms name the same port, the
/// environment wins over `ambassadord.backend.*`, which wins over `connect.*`. Returns
/// the declarations and one message per declaration that was skipped.
pub fn declarations(
    container: &str,
    env: &[String],
    labels: &HashMap<String, String>,
) -> (Declarations, Vec<String>) {
    let mut found = Declarations::new();
    let mut problems = Vec::new();
    let mut labels: Vec<(&String, &String)> = labels.iter().collect();
    labels.sort();

    // Lowest precedence first, so later forms overwrite earlier ones.
    let sources = [(CONNECTABLE_LABEL_PREFIX, "label"), (LABEL_PREFIX, "label")];
    for (prefix, what) in sources {
        for (key, value) in &labels {
            if let Some(port) = key.strip_prefix(prefix) {
                add(container, what, key, port, value, &mut found, &mut problems);
            }
        }
    }
    for entry in env {
        let Some((key, value)) = entry.split_once('=') else {
            continue;
        };
        if let Some(port) = key.strip_prefix(ENV_PREFIX) {
            add(
                container,
                "env",
                key,
                port,
                value,
                &mut found,
                &mut problems,
            );
        }
    }
    (found, problems)
}

fn add(
    container: &str,
    what: &str,
    key: &str,
    port: &str,
    value: &str,
    found: &mut Declarations,
    problems: &mut Vec<String>,
) {
    let port = match port.parse::<u16>() {
        Ok(p) if p > 0 => p,
        _ => {
            problems.push(format!(
                "container '{}': {what} {}: '{}' is not a port number (1-65535); skipped",
                outside(container),
                outside(key),
                outside(port)
            ));
            return;
        }
    };
    match Spec::parse(value) {
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
}
