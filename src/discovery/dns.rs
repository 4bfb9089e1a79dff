//! The project's one DNS resolver (hickory): /etc/resolv.conf and /etc/hosts, async, and
//! never libc's getaddrinfo, so the static binary works in a FROM-scratch image and no
//! lookup ever blocks a runtime thread.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use tokio::time::Instant;
use tracing::warn;

/// How long `--dns`'s server has to answer one query before it is asked again (twice in
/// all). The system resolver keeps /etc/resolv.conf's `timeout:` and `attempts:`.
pub const NAMESERVER_TIMEOUT: Duration = Duration::from_secs(2);

/// Answers are re-read no sooner than this, however small their TTL ...
pub const MIN_REFRESH: Duration = Duration::from_secs(1);
/// ... and no later than this, however large, so a changed record is noticed.
pub const MAX_REFRESH: Duration = Duration::from_secs(300);

#[derive(Clone)]
pub struct Resolver {
    inner: TokioResolver,
    /// Why the system configuration could not be used, to explain failed lookups.
    degraded: Option<Arc<str>>,
}

/// The addresses a name resolved to and when to ask again.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub addrs: Vec<IpAddr>,
    pub refresh_at: Instant,
}

/// A name that did not resolve: "cannot resolve 'NAME': WHY", and, when the system
/// configuration was unusable, why that was too.
#[derive(Debug, Clone)]
pub struct LookupError {
    pub name: String,
    /// hickory's reason. Its text is part of ours, so it is not also our `source()`:
    /// a chain printed in full would say it twice.
    pub error: NetError,
    degraded: Option<Arc<str>>,
}

impl fmt::Display for LookupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // hickory's own text for these is its query's debug dump, naming one record
        // type of the two asked for.
        if self.error.is_nx_domain() {
            write!(
                f,
                "cannot resolve '{}': no such name (NXDOMAIN; asked for A and AAAA)",
                self.name
            )?;
        } else if self.error.is_no_records_found() {
            write!(
                f,
                "cannot resolve '{}': the name has no A or AAAA records",
                self.name
            )?;
        } else {
            write!(f, "cannot resolve '{}': {}", self.name, self.error)?;
        }
        match &self.degraded {
            Some(why) => write!(f, " ({why})"),
            None => Ok(()),
        }
    }
}

impl std::error::Error for LookupError {}

impl Resolver {
    /// The system resolver. If /etc/resolv.conf cannot be read, names in /etc/hosts still
    /// resolve and every other lookup fails with a message that says why.
    pub fn from_system() -> Resolver {
        match TokioResolver::builder_tokio().and_then(|b| b.build()) {
            Ok(inner) => Resolver {
                inner,
                degraded: None,
            },
            Err(e) => {
                let why = format!("cannot use /etc/resolv.conf: {e}");
                warn!("{why}; only /etc/hosts names will resolve");
                let mut builder = TokioResolver::builder_with_config(
                    ResolverConfig::from_parts(None, vec![], vec![]),
                    TokioRuntimeProvider::default(),
                );
                builder.options_mut().use_hosts_file = ResolveHosts::Always;
                let inner = builder
                    .build()
                    .expect("a resolver without name servers has nothing to fail on");
                Resolver {
                    inner,
                    degraded: Some(why.into()),
                }
            }
        }
    }

    /// A resolver that asks only `server` (UDP, and TCP for truncated answers), for
    /// `--dns`. Names in /etc/hosts still resolve from there.
    pub fn with_nameserver(server: SocketAddr) -> Resolver {
        let mut connections = vec![ConnectionConfig::udp(), ConnectionConfig::tcp()];
        for c in &mut connections {
            c.port = server.port();
        }
        let mut ns = NameServerConfig::udp_and_tcp(server.ip());
        ns.connections = connections;
        let mut builder = TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(vec![ns]),
            TokioRuntimeProvider::default(),
        );
        // hickory's defaults (5 s, two attempts, then TCP) let a server that went away
        // go unreported for about 15 s; one named server on a short path answers in
        // milliseconds or not at all.
        let opts = builder.options_mut();
        opts.timeout = NAMESERVER_TIMEOUT;
        opts.attempts = 2;
        let inner = builder
            .build()
            .expect("a resolver with one plain nameserver has nothing to fail on");
        Resolver {
            inner,
            degraded: None,
        }
    }

    /// The underlying hickory resolver, for record types beyond A/AAAA (SRV).
    pub fn hickory(&self) -> &TokioResolver {
        &self.inner
    }

    /// A and AAAA for `name`, sorted so an unchanged answer compares equal.
    pub async fn lookup_ip(&self, name: &str) -> Result<Resolved, LookupError> {
        match self.inner.lookup_ip(name).await {
            Ok(lookup) => {
                let mut addrs: Vec<IpAddr> = lookup.iter().collect();
                addrs.sort();
                addrs.dedup();
                Ok(Resolved {
                    addrs,
                    refresh_at: refresh_at(lookup.valid_until()),
                })
            }
            Err(error) => Err(LookupError {
                name: name.to_string(),
                error,
                degraded: self.degraded.clone(),
            }),
        }
    }
}

/// Converts an answer's expiry into when to look again, clamped to the floor and ceiling.
pub fn refresh_at(valid_until: std::time::Instant) -> Instant {
    let ttl = valid_until.saturating_duration_since(std::time::Instant::now());
    Instant::now() + ttl.clamp(MIN_REFRESH, MAX_REFRESH)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The typed error renders what the string it replaced said, word for word.
    #[test]
    fn lookup_errors_name_the_name_and_a_degraded_configuration() {
        let plain = LookupError {
            name: "redis".into(),
            error: NetError::NoConnections,
            degraded: None,
        };
        assert_eq!(
            plain.to_string(),
            "cannot resolve 'redis': no connections available"
        );
        let degraded = LookupError {
            degraded: Some("cannot use /etc/resolv.conf: gone".into()),
            ..plain
        };
        assert_eq!(
            degraded.to_string(),
            "cannot resolve 'redis': no connections available (cannot use /etc/resolv.conf: gone)"
        );
    }
}
