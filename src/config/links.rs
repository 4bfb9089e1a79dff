//! `--links`: Docker link environment variables turned into one route per linked TCP port.
//!
//! `docker run --link CONTAINER:ALIAS` gives the new container, for each port the linked
//! container exposes, a variable `<ALIAS>_PORT_<n>_<PROTO>=<proto>://<ip>:<n>` plus the
//! redundant companions `…_ADDR`, `…_PORT` and `…_PROTO`, a bare `<ALIAS>_PORT` (a copy
//! of one of them), `<ALIAS>_NAME`, and `<ALIAS>_ENV_<VAR>` for every variable of the
//! linked container's own environment. Only the first form is a link. The name is matched
//! anchored at both ends (`^<alias>_PORT_<digits>_TCP$`), so the companions never match;
//! the `_ENV_` copies would (a linked container that was itself given links carries
//! `<ALIAS>_ENV_<OTHER>_PORT_<n>_TCP`), so a name is skipped when its alias is
//! `<P>_ENV_…` for a `<P>` that has a `<P>_NAME`, which Docker sets for every link.
//! Kubernetes service variables use the same form and are accepted too.

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsString;
use std::fmt;

use crate::spec::HostPort;

/// One linked TCP port: listen on `port`, forward to `target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// The variable it came from (`REDIS_PORT_6379_TCP`), for logs and errors.
    pub var: String,
    /// The link alias as Docker wrote it into the name (`REDIS`).
    pub alias: String,
    /// The linked port, which is also the port the ambassador listens on.
    pub port: u16,
    pub target: HostPort,
}

/// The links found in an environment, in port order, and what was skipped on the way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Links {
    pub links: Vec<Link>,
    /// One message per malformed link variable, naming the variable and its value.
    pub skipped: Vec<String>,
}

/// Why `--links` has nothing to serve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinksError {
    #[error("{0}")]
    NoLinks(NoLinks),
    #[error(
        "--links: {first} and {second} both link port {port}, and an ambassador listens once per port: \
         drop one of the links, or run one ambassador for each"
    )]
    SamePort {
        port: u16,
        first: String,
        second: String,
    },
}

/// The details of an environment without a usable link, for a message that says why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoLinks {
    /// UDP link variables seen (ambassadord forwards TCP only).
    pub udp: Vec<String>,
    /// Malformed TCP link variables, as in [`Links::skipped`].
    pub skipped: Vec<String>,
}

impl fmt::Display for NoLinks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "--links: no Docker link in the environment: expected variables such as \
             REDIS_PORT_6379_TCP=tcp://172.17.0.2:6379, which `docker run --link CONTAINER:ALIAS` \
             sets for each TCP port the linked container exposes (give it --expose or EXPOSE)",
        )?;
        if !self.udp.is_empty() {
            write!(
                f,
                "; only UDP links were found, which are not forwarded: {}",
                self.udp.join(", ")
            )?;
        }
        if !self.skipped.is_empty() {
            write!(f, "; skipped: {}", self.skipped.join("; "))?;
        }
        Ok(())
    }
}

/// Finds the TCP links among `vars` (config's snapshot of the environment; variables
/// that are not UTF-8 cannot be Docker link variables and are ignored).
pub fn parse<I>(vars: I) -> Result<Links, LinksError>
where
    I: IntoIterator<Item = (OsString, OsString)>,
{
    // Sorted by name, so the result and its messages do not depend on environment order.
    let vars: BTreeMap<String, String> = vars
        .into_iter()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect();
    let names: HashSet<&str> = vars
        .keys()
        .filter(|k| k.ends_with("_NAME"))
        .map(String::as_str)
        .collect();

    let mut links: Vec<Link> = Vec::new();
    let mut skipped = Vec::new();
    let mut udp = Vec::new();
    for (var, value) in &vars {
        let Some(name) = LinkName::match_var(var) else {
            continue;
        };
        if is_env_copy(name.alias, &names) {
            continue;
        }
        match name.proto {
            Proto::Udp => udp.push(var.clone()),
            Proto::Tcp => match parse_link(var, &name, value) {
                Ok(link) => links.push(link),
                Err(why) => skipped.push(format!("{var}='{value}': {why}")),
            },
        }
    }
    if links.is_empty() {
        return Err(LinksError::NoLinks(NoLinks { udp, skipped }));
    }
    links.sort_by(|a, b| a.port.cmp(&b.port).then_with(|| a.var.cmp(&b.var)));
    if let Some(pair) = links.windows(2).find(|w| w[0].port == w[1].port) {
        return Err(LinksError::SamePort {
            port: pair[0].port,
            first: format!("{}={}", pair[0].var, vars[&pair[0].var]),
            second: format!("{}={}", pair[1].var, vars[&pair[1].var]),
        });
    }
    Ok(Links { links, skipped })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    Tcp,
    Udp,
}

/// The parts of a variable name of the form `<alias>_PORT_<port>_<TCP|UDP>`.
#[derive(Debug, PartialEq, Eq)]
struct LinkName<'a> {
    alias: &'a str,
    port: &'a str,
    proto: Proto,
}

impl<'a> LinkName<'a> {
    /// Matches `^([A-Za-z0-9_.]+)_PORT_([0-9]+)_(TCP|UDP)$`. The alias is the longest
    /// prefix that leaves `_PORT_<digits>_<PROTO>`: Docker upper-cases the link alias and
    /// turns '-' into '_', and an alias may itself contain `_PORT_`.
    fn match_var(var: &'a str) -> Option<LinkName<'a>> {
        let (rest, proto) = if let Some(rest) = var.strip_suffix("_TCP") {
            (rest, Proto::Tcp)
        } else {
            (var.strip_suffix("_UDP")?, Proto::Udp)
        };
        let (alias, port) = rest.rsplit_once("_PORT_")?;
        let alias_ok = !alias.is_empty()
            && alias
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.');
        let port_ok = !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit());
        (alias_ok && port_ok).then_some(LinkName { alias, port, proto })
    }
}

/// Whether `alias` is `<P>_ENV_<…>` for a linked container `<P>` (one with `<P>_NAME`):
/// then the variable is Docker's copy of that container's own environment, not a link of
/// this container.
fn is_env_copy(alias: &str, names: &HashSet<&str>) -> bool {
    alias
        .match_indices("_ENV_")
        .any(|(i, _)| names.contains(format!("{}_NAME", &alias[..i]).as_str()))
}

/// Checks a TCP link's value: `tcp://HOST:PORT`, with the port the name promises.
fn parse_link(var: &str, name: &LinkName<'_>, value: &str) -> Result<Link, String> {
    let port = crate::spec::parse_port(name.port).map_err(|why| format!("in the name: {why}"))?;
    let Some(addr) = value.strip_prefix("tcp://") else {
        return Err("expected tcp://IP:PORT".into());
    };
    let target = HostPort::parse(addr)?;
    if target.port != port {
        return Err(format!(
            "the port in the value ({}) is not the port in the name ({port})",
            target.port
        ));
    }
    Ok(Link {
        var: var.to_string(),
        alias: name.alias.to_string(),
        port,
        target,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    type Vars<'a> = &'a [(&'a str, &'a str)];
    type NameParts<'a> = Option<(&'a str, &'a str, Proto)>;

    fn env(vars: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        vars.iter().map(|(k, v)| (k.into(), v.into())).collect()
    }

    /// What Docker 20.10 sets for `--link be:redis` where `be` exposes 6379/tcp and
    /// 53/udp and has FOO=bar in its own environment (copied from a real container).
    const REDIS_LINK: &[(&str, &str)] = &[
        ("REDIS_ENV_FOO", "bar"),
        ("REDIS_NAME", "/determined_grothendieck/redis"),
        ("REDIS_PORT", "udp://172.17.0.2:53"),
        ("REDIS_PORT_53_UDP", "udp://172.17.0.2:53"),
        ("REDIS_PORT_53_UDP_ADDR", "172.17.0.2"),
        ("REDIS_PORT_53_UDP_PORT", "53"),
        ("REDIS_PORT_53_UDP_PROTO", "udp"),
        ("REDIS_PORT_6379_TCP", "tcp://172.17.0.2:6379"),
        ("REDIS_PORT_6379_TCP_ADDR", "172.17.0.2"),
        ("REDIS_PORT_6379_TCP_PORT", "6379"),
        ("REDIS_PORT_6379_TCP_PROTO", "tcp"),
        ("HOME", "/"),
        ("PATH", "/usr/bin:/bin"),
    ];

    fn found(vars: &[(&str, &str)]) -> Vec<(String, u16, String)> {
        let links = parse(env(vars)).unwrap_or_else(|e| panic!("{vars:?}: {e}"));
        links
            .links
            .into_iter()
            .map(|l| (l.alias, l.port, l.target.to_string()))
            .collect()
    }

    #[test]
    fn names_match_anchored() {
        let cases: &[(&str, NameParts)] = &[
            ("REDIS_PORT_6379_TCP", Some(("REDIS", "6379", Proto::Tcp))),
            ("REDIS_PORT_53_UDP", Some(("REDIS", "53", Proto::Udp))),
            ("MY_DB_PORT_5432_TCP", Some(("MY_DB", "5432", Proto::Tcp))),
            (
                "A_PORT_1_TCP_PORT_2_TCP",
                Some(("A_PORT_1_TCP", "2", Proto::Tcp)),
            ),
            ("WEB.1_PORT_80_TCP", Some(("WEB.1", "80", Proto::Tcp))),
            ("REDIS_PORT_6379_TCP_ADDR", None),
            ("REDIS_PORT_6379_TCP_PORT", None),
            ("REDIS_PORT_6379_TCP_PROTO", None),
            ("REDIS_PORT", None),
            ("REDIS_NAME", None),
            ("_PORT_80_TCP", None),
            ("REDIS_PORT__TCP", None),
            ("REDIS_PORT_80x_TCP", None),
            ("REDIS_PORT_80_SCTP", None),
            ("REDIS_PORT_80_tcp", None),
            ("RE DIS_PORT_80_TCP", None),
            ("XREDIS_PORT_6379_TCPX", None),
        ];
        for (var, want) in cases {
            let got = LinkName::match_var(var).map(|n| (n.alias, n.port, n.proto));
            assert_eq!(got, *want, "{var}");
        }
    }

    #[test]
    fn a_real_docker_link_gives_its_tcp_ports_only() {
        assert_eq!(
            found(REDIS_LINK),
            [("REDIS".into(), 6379, "172.17.0.2:6379".into())]
        );
        let links = parse(env(REDIS_LINK)).unwrap();
        assert_eq!(links.links[0].var, "REDIS_PORT_6379_TCP");
        assert!(links.skipped.is_empty(), "{:?}", links.skipped);
    }

    #[test]
    fn several_links_and_ports_come_in_port_order() {
        let vars = [
            ("HTTP_NAME", "/amb/http"),
            ("HTTP_PORT_8080_TCP", "tcp://172.17.0.3:8080"),
            ("HTTP_PORT_80_TCP", "tcp://172.17.0.3:80"),
            ("REDIS_NAME", "/amb/redis"),
            ("REDIS_PORT_6379_TCP", "tcp://172.17.0.2:6379"),
            ("V6_PORT_9000_TCP", "tcp://[fd00::5]:9000"),
            ("SVC_PORT_7000_TCP", "tcp://svc.internal:7000"),
        ];
        assert_eq!(
            found(&vars),
            [
                ("HTTP".into(), 80, "172.17.0.3:80".into()),
                ("REDIS".into(), 6379, "172.17.0.2:6379".into()),
                ("SVC".into(), 7000, "svc.internal:7000".into()),
                ("HTTP".into(), 8080, "172.17.0.3:8080".into()),
                ("V6".into(), 9000, "[fd00::5]:9000".into()),
            ]
        );
    }

    #[test]
    fn env_copies_of_a_linked_containers_own_links_are_skipped() {
        // `app` was itself started with --link db:db; linking `app` copies its DB_* vars.
        let vars = [
            ("APP_NAME", "/amb/app"),
            ("APP_PORT_80_TCP", "tcp://172.17.0.4:80"),
            ("APP_ENV_DB_NAME", "/app/db"),
            ("APP_ENV_DB_PORT_5432_TCP", "tcp://172.17.0.9:5432"),
            ("APP_ENV_DB_PORT_5432_TCP_ADDR", "172.17.0.9"),
        ];
        assert_eq!(found(&vars), [("APP".into(), 80, "172.17.0.4:80".into())]);
        // Without APP_NAME nothing says APP is a link, so the name is taken as it reads
        // (an alias may contain _ENV_, as `--link x:my-env-db` gives MY_ENV_DB).
        let vars = [("MY_ENV_DB_PORT_5432_TCP", "tcp://172.17.0.9:5432")];
        assert_eq!(
            found(&vars),
            [("MY_ENV_DB".into(), 5432, "172.17.0.9:5432".into())]
        );
    }

    #[test]
    fn malformed_values_are_skipped_naming_the_variable() {
        let cases: &[(&str, &str)] = &[
            ("tcp://172.17.0.2", "missing ':PORT'"),
            ("tcp://172.17.0.2:6380", "the port in the value (6380)"),
            ("udp://172.17.0.2:6379", "expected tcp://IP:PORT"),
            ("172.17.0.2:6379", "expected tcp://IP:PORT"),
            ("tcp://bad host:6379", "contains the character ' '"),
            ("tcp://172.17.0.2:abc", "port 'abc' is not a number"),
            ("", "expected tcp://IP:PORT"),
        ];
        for (value, why) in cases {
            let vars = [
                ("BAD_PORT_6379_TCP", *value),
                ("GOOD_PORT_80_TCP", "tcp://172.17.0.3:80"),
            ];
            let links = parse(env(&vars)).unwrap();
            assert_eq!(links.links.len(), 1, "{value}");
            assert_eq!(links.links[0].var, "GOOD_PORT_80_TCP");
            assert_eq!(links.skipped.len(), 1, "{value}");
            let msg = &links.skipped[0];
            assert!(
                msg.starts_with(&format!("BAD_PORT_6379_TCP='{value}': ")),
                "{msg}"
            );
            assert!(msg.contains(why), "{value}: {msg} lacks {why:?}");
        }
        let vars = [
            ("BIG_PORT_70000_TCP", "tcp://172.17.0.2:70000"),
            ("OK_PORT_1_TCP", "tcp://172.17.0.2:1"),
        ];
        let links = parse(env(&vars)).unwrap();
        assert!(
            links.skipped[0].contains("in the name: port 70000 is out of range"),
            "{:?}",
            links.skipped
        );
    }

    #[test]
    fn no_links_is_an_error_that_says_what_was_seen() {
        let cases: &[(Vars, &[&str])] = &[
            (&[("HOME", "/")], &["no Docker link in the environment"]),
            (&[], &["REDIS_PORT_6379_TCP=tcp://"]),
            (
                &[
                    ("DNS_NAME", "/a/dns"),
                    ("DNS_PORT_53_UDP", "udp://172.17.0.2:53"),
                ],
                &["only UDP links", "DNS_PORT_53_UDP"],
            ),
            (
                &[("X_PORT_80_TCP", "tcp://nowhere")],
                &["skipped: X_PORT_80_TCP='tcp://nowhere': missing ':PORT'"],
            ),
            // Only ENV copies: the linked container's links are not ours.
            (
                &[
                    ("APP_NAME", "/amb/app"),
                    ("APP_ENV_DB_PORT_5432_TCP", "tcp://172.17.0.9:5432"),
                ],
                &["no Docker link"],
            ),
        ];
        for (vars, wants) in cases {
            let err = parse(env(vars)).expect_err("no links").to_string();
            for want in *wants {
                assert!(err.contains(want), "{vars:?}: {err} lacks {want:?}");
            }
            assert!(!err.contains('\n'));
        }
    }

    #[test]
    fn two_links_on_one_port_name_both() {
        let vars = [
            ("CACHE_PORT_6379_TCP", "tcp://172.17.0.3:6379"),
            ("REDIS_PORT_6379_TCP", "tcp://172.17.0.2:6379"),
            ("WEB_PORT_80_TCP", "tcp://172.17.0.4:80"),
        ];
        let err = parse(env(&vars)).expect_err("same port");
        assert_eq!(
            err,
            LinksError::SamePort {
                port: 6379,
                first: "CACHE_PORT_6379_TCP=tcp://172.17.0.3:6379".into(),
                second: "REDIS_PORT_6379_TCP=tcp://172.17.0.2:6379".into(),
            }
        );
        let msg = err.to_string();
        assert!(msg.contains("both link port 6379"), "{msg}");
    }
}
