//! The `docker://` source: the addresses of running containers chosen by name or label,
//! read from the container index the Docker side keeps current from the engine's events
//! (the index omni mode uses). A container that restarts with a new address is followed
//! as its events arrive: `die` takes it out, `start` brings it back with the new one.
//!
//! A container on several networks has an address on each, and only some may be
//! reachable from here. Where some of a container's addresses are on a network this
//! process is directly connected to (a route without a gateway in `/proc/net/route` or
//! `/proc/net/ipv6_route`), only those are used; otherwise all are.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{Source, SourceError};
use crate::endpoint::{Endpoint, EndpointSet};
use crate::spec::{DockerSpec, Select};

/// How long a first read waits for the index's first full list before it counts as a
/// failure (and the driver retries with backoff).
const FIRST_LIST: Duration = Duration::from_secs(5);

/// Running containers, as the Docker side knows them.
pub trait Containers: Send + Sync + 'static {
    /// A receiver that changes whenever the known containers do.
    fn subscribe(&self) -> watch::Receiver<u64>;
    /// Whether the containers have been listed at least once.
    fn loaded(&self) -> bool;
    /// The running containers `select` chooses: each one's name and addresses.
    fn select(&self, select: &Select) -> Vec<(String, Vec<IpAddr>)>;
}

pub struct DockerSource {
    spec: DockerSpec,
    containers: Arc<dyn Containers>,
    changes: watch::Receiver<u64>,
    /// Whether the last call returned a set (the next one waits for a change).
    published: bool,
}

impl DockerSource {
    pub fn new(spec: DockerSpec, containers: Arc<dyn Containers>) -> Self {
        let changes = containers.subscribe();
        DockerSource {
            spec,
            containers,
            changes,
            published: false,
        }
    }

    fn read(&mut self) -> EndpointSet {
        self.read_with(&Routes::read())
    }

    fn read_with(&mut self, routes: &Routes) -> EndpointSet {
        self.changes.borrow_and_update();
        let port = self.spec.port;
        let mut chosen = self.containers.select(&self.spec.select);
        chosen.sort();
        let endpoints = chosen.into_iter().flat_map(|(name, ips)| {
            let origin: Arc<str> = format!("container {name}").into();
            let near: Vec<IpAddr> = ips
                .iter()
                .copied()
                .filter(|ip| routes.direct(*ip))
                .collect();
            let usable = if near.is_empty() { ips } else { near };
            usable
                .into_iter()
                .map(move |ip| Endpoint::new(SocketAddr::new(ip, port)).with_origin(origin.clone()))
        });
        EndpointSet::new(endpoints.collect())
    }
}

impl Source for DockerSource {
    type Item = EndpointSet;

    async fn next(&mut self) -> Result<EndpointSet, SourceError> {
        if self.published {
            // The index lives as long as the process: a closed channel means shutdown.
            if self.changes.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
            return Ok(self.read());
        }
        if !self.containers.loaded() {
            let loaded = tokio::time::timeout(FIRST_LIST, async {
                while !self.containers.loaded() {
                    if self.changes.changed().await.is_err() {
                        return;
                    }
                }
            })
            .await;
            if loaded.is_err() || !self.containers.loaded() {
                return Err(SourceError::Docker(format!(
                    "the Docker engine has not listed its containers within {FIRST_LIST:?} (see the container index's log line)"
                )));
            }
        }
        self.published = true;
        Ok(self.read())
    }
}

/// A `docker://` spec in a process with no Docker host: fails every read, saying so.
pub struct NoDocker;

impl Source for NoDocker {
    type Item = EndpointSet;

    async fn next(&mut self) -> Result<EndpointSet, SourceError> {
        Err(SourceError::Docker(
            "no Docker host is configured (--docker-host)".into(),
        ))
    }
}

/// The networks this process reaches without a gateway.
#[derive(Debug, Default)]
struct Routes {
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u8)>,
}

impl Routes {
    fn read() -> Routes {
        let text = |p| std::fs::read_to_string(p).unwrap_or_default();
        Routes {
            v4: direct_v4(&text("/proc/net/route")),
            v6: direct_v6(&text("/proc/net/ipv6_route")),
        }
    }

    fn direct(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(ip) => {
                let ip = u32::from(ip);
                self.v4.iter().any(|(net, mask)| ip & mask == *net)
            }
            IpAddr::V6(ip) => {
                let ip = u128::from(ip);
                self.v6.iter().any(|(net, len)| {
                    let mask = u128::MAX.checked_shl(128 - u32::from(*len)).unwrap_or(0);
                    ip & mask == *net & mask
                })
            }
        }
    }
}

/// `/proc/net/route`: the IPv4 networks with no gateway (not the default route). Each
/// address is a 32-bit word printed in host byte order.
fn direct_v4(table: &str) -> Vec<(u32, u32)> {
    let word = |s: &str| u32::from_str_radix(s, 16).ok().map(|w| w.to_ne_bytes());
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (dest, gateway, mask) = (word(f.get(1)?)?, word(f.get(2)?)?, word(f.get(7)?)?);
            let (dest, mask) = (
                u32::from(Ipv4Addr::from(dest)),
                u32::from(Ipv4Addr::from(mask)),
            );
            (u32::from_ne_bytes(gateway) == 0 && mask != 0).then_some((dest & mask, mask))
        })
        .collect()
}

/// `/proc/net/ipv6_route`: the IPv6 networks with no next hop, but link-local ones and
/// the default route. Addresses are printed as 32 hex digits in network order.
fn direct_v6(table: &str) -> Vec<(u128, u8)> {
    table
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let dest = u128::from_str_radix(f.first()?, 16).ok()?;
            let len = u8::from_str_radix(f.get(1)?, 16).ok()?;
            let next_hop = u128::from_str_radix(f.get(4)?, 16).ok()?;
            let link_local = Ipv6Addr::from(dest).is_unicast_link_local();
            (next_hop == 0 && len > 0 && len <= 128 && !link_local && f.get(9) != Some(&"lo"))
                .then_some((dest, len))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_routes_are_read_from_proc() {
        // A container on two bridges, with a default route through the first.
        let route =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t010011AC\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t000011AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0
eth1\t000012AC\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
";
        let v6 = "\
fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0
fe800000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000000000000000000000000000001 00000400 00000001 00000000 00000003     eth0
";
        let routes = Routes {
            v4: direct_v4(route),
            v6: direct_v6(v6),
        };
        if cfg!(target_endian = "little") {
            assert_eq!(routes.v4.len(), 2, "{routes:?}");
            for (ip, direct) in [
                ("172.17.0.5", true),
                ("172.18.0.9", true),
                ("172.18.1.9", false),
                ("10.0.0.1", false),
            ] {
                assert_eq!(routes.direct(ip.parse().unwrap()), direct, "{ip}");
            }
        }
        assert_eq!(routes.v6.len(), 1, "{routes:?}");
        assert!(routes.direct("fd00::5".parse().unwrap()));
        assert!(!routes.direct("fd01::5".parse().unwrap()));
    }

    struct Fixed(Vec<(String, Vec<IpAddr>)>, watch::Sender<u64>);

    impl Containers for Fixed {
        fn subscribe(&self) -> watch::Receiver<u64> {
            self.1.subscribe()
        }
        fn loaded(&self) -> bool {
            true
        }
        fn select(&self, _: &Select) -> Vec<(String, Vec<IpAddr>)> {
            self.0.clone()
        }
    }

    /// Every chosen container's addresses on the spec's port, named by the container,
    /// in name order; a container with an address on a network this process reaches
    /// directly uses only those.
    #[tokio::test]
    async fn a_set_of_every_chosen_containers_addresses() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let containers = Fixed(
            vec![
                ("web-2".into(), vec![ip("192.0.2.7")]),
                ("web-1".into(), vec![ip("192.0.2.5"), ip("198.51.100.5")]),
            ],
            watch::Sender::new(1),
        );
        let spec = DockerSpec {
            select: Select::Name("web".into()),
            port: 80,
        };
        let mut source = DockerSource::new(spec, Arc::new(containers));
        assert!(
            source.next().await.is_ok(),
            "the index is loaded: a first set"
        );
        let shown = |set: EndpointSet| -> Vec<String> {
            set.as_slice().iter().map(|e| e.to_string()).collect()
        };
        assert_eq!(
            shown(source.read_with(&Routes::default())),
            [
                "192.0.2.5:80 (container web-1)",
                "198.51.100.5:80 (container web-1)",
                "192.0.2.7:80 (container web-2)"
            ]
        );
        // On 198.51.100.0/24 directly: web-1 is reached there only; web-2 has no
        // address on it, so all of its addresses stay.
        let near = Routes {
            v4: vec![(u32::from(Ipv4Addr::new(198, 51, 100, 0)), 0xffff_ff00)],
            v6: Vec::new(),
        };
        assert_eq!(
            shown(source.read_with(&near)),
            [
                "198.51.100.5:80 (container web-1)",
                "192.0.2.7:80 (container web-2)"
            ]
        );
    }
}
