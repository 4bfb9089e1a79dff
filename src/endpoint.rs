//! Endpoints and the endpoint sets that discovery publishes and the data path reads.
//!
//! An [`EndpointSet`] is an immutable snapshot: sources build a whole new one on every
//! change (never deltas) and the proxy only ever reads the latest through a `watch`
//! channel. Endpoints are kept sorted by priority so the balancer can walk tiers in order.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

/// One backend address, with the RFC 2782 ordering hints a source may know about.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// Lower is preferred; every endpoint of a tier is tried before the next tier.
    pub priority: u16,
    /// Relative share within its tier. Equal weights mean plain round robin.
    pub weight: u16,
    /// What the user wrote that produced this address (a host name, an SRV target, a
    /// KV key), for log lines. `None` when it is the address itself.
    pub origin: Option<Arc<str>>,
}

impl Endpoint {
    /// An endpoint with no ordering preference, as a static spec produces.
    pub fn new(addr: SocketAddr) -> Self {
        Endpoint {
            addr,
            priority: 0,
            weight: 1,
            origin: None,
        }
    }

    pub fn with_origin(mut self, origin: impl Into<Arc<str>>) -> Self {
        self.origin = Some(origin.into());
        self
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.origin {
            Some(origin) if **origin != *self.addr.to_string() => {
                write!(f, "{} ({origin})", self.addr)
            }
            _ => write!(f, "{}", self.addr),
        }
    }
}

/// A complete, immutable set of endpoints, sorted by priority (stable, so a source's own
/// order is kept within a tier). Cloning is cheap.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointSet {
    endpoints: Arc<[Endpoint]>,
}

impl EndpointSet {
    pub fn new(mut endpoints: Vec<Endpoint>) -> Self {
        endpoints.sort_by_key(|e| e.priority);
        // The same address twice would only skew the balance and double failover work.
        let mut seen = std::collections::HashSet::with_capacity(endpoints.len());
        endpoints.retain(|e| seen.insert(e.addr));
        EndpointSet {
            endpoints: endpoints.into(),
        }
    }

    pub fn empty() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    pub fn as_slice(&self) -> &[Endpoint] {
        &self.endpoints
    }

    /// The priority tiers, lowest priority value first.
    pub fn tiers(&self) -> impl Iterator<Item = &[Endpoint]> {
        self.endpoints.chunk_by(|a, b| a.priority == b.priority)
    }
}

impl fmt::Display for EndpointSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.endpoints.is_empty() {
            return f.write_str("(none)");
        }
        for (i, e) in self.endpoints.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(s: &str, priority: u16) -> Endpoint {
        Endpoint {
            priority,
            ..Endpoint::new(s.parse().unwrap())
        }
    }

    #[test]
    fn sorted_by_priority_keeping_source_order_within_a_tier() {
        let set = EndpointSet::new(vec![
            ep("10.0.0.3:1", 20),
            ep("10.0.0.1:1", 10),
            ep("10.0.0.4:1", 20),
            ep("10.0.0.2:1", 10),
        ]);
        let tiers: Vec<Vec<String>> = set
            .tiers()
            .map(|t| t.iter().map(|e| e.addr.to_string()).collect())
            .collect();
        assert_eq!(
            tiers,
            vec![
                vec!["10.0.0.1:1", "10.0.0.2:1"],
                vec!["10.0.0.3:1", "10.0.0.4:1"]
            ]
        );
    }

    #[test]
    fn duplicate_addresses_are_kept_once() {
        let set = EndpointSet::new(vec![ep("10.0.0.1:1", 0), ep("10.0.0.1:1", 5)]);
        assert_eq!(set.len(), 1);
    }

    #[test]
    fn display_names_the_origin() {
        let e = Endpoint::new("127.0.0.1:80".parse().unwrap()).with_origin("localhost:80");
        assert_eq!(e.to_string(), "127.0.0.1:80 (localhost:80)");
        assert_eq!(EndpointSet::empty().to_string(), "(none)");
    }
}
