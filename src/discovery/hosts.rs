//! The static source: a fixed `HOST:PORT` list. IP literals are published as they are;
//! host names are resolved and resolved again when their records' TTL runs out, never
//! per connection.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::task::JoinSet;
use tokio::time::{Instant, sleep_until};
use tracing::{info, warn};

use super::dns::{MIN_REFRESH, Resolver};
use super::{Source, SourceError};
use crate::endpoint::{Endpoint, EndpointSet};
use crate::spec::{Host, HostPort};

/// A name that fails while others resolve is retried this soon.
const RETRY_FAILED_NAME: std::time::Duration = MIN_REFRESH.saturating_mul(5);

pub struct HostsSource {
    list: Vec<HostPort>,
    /// Present when the list holds at least one name.
    resolver: Option<Resolver>,
    refresh_at: Option<Instant>,
    published: bool,
    /// Elements that failed on the last read and why, so each outage is logged once.
    failing: BTreeMap<String, String>,
}

impl HostsSource {
    /// `resolver` may be `None` only when every host is an IP literal.
    pub fn new(list: Vec<HostPort>, resolver: Option<Resolver>) -> Self {
        HostsSource {
            list,
            resolver,
            refresh_at: None,
            published: false,
            failing: BTreeMap::new(),
        }
    }

    async fn read(&mut self) -> Result<EndpointSet, SourceError> {
        // One slot per element keeps the user's order whatever order lookups finish in.
        let mut slots: Vec<Vec<Endpoint>> = vec![Vec::new(); self.list.len()];
        let mut lookups = JoinSet::new();
        for (i, hp) in self.list.iter().enumerate() {
            match (&hp.host, &self.resolver) {
                (Host::Ip(ip), _) => slots[i].push(Endpoint::new((*ip, hp.port).into())),
                (Host::Name(name), Some(resolver)) => {
                    let (resolver, name) = (resolver.clone(), name.clone());
                    lookups.spawn(async move { (i, resolver.lookup_ip(&name).await) });
                }
                (Host::Name(name), None) => {
                    return Err(SourceError::NoResolver(name.clone()));
                }
            }
        }
        let mut next_refresh: Option<Instant> = None;
        let mut failing = BTreeMap::new();
        while let Some(joined) = lookups.join_next().await {
            let Ok((i, result)) = joined else { continue };
            let hp = &self.list[i];
            match result {
                Ok(resolved) if resolved.addrs.is_empty() => {
                    failing.insert(hp.to_string(), format!("'{hp}' resolved to no address"));
                }
                Ok(resolved) => {
                    let origin: Arc<str> = hp.to_string().into();
                    slots[i].extend(resolved.addrs.iter().map(|ip| {
                        Endpoint::new((*ip, hp.port).into()).with_origin(origin.clone())
                    }));
                    next_refresh = earliest(next_refresh, resolved.refresh_at);
                }
                Err(e) => {
                    failing.insert(hp.to_string(), e.to_string());
                }
            }
        }
        let set = EndpointSet::new(slots.into_iter().flatten().collect());
        if set.is_empty() {
            let why = failing.values().cloned().collect::<Vec<_>>().join("; ");
            self.failing = failing;
            self.refresh_at = None;
            return Err(SourceError::Dns(why));
        }
        // Some names failed but others answered: serve those, retry the rest soon, and
        // say so once per name rather than on every retry.
        for (name, why) in &failing {
            if !self.failing.contains_key(name) {
                warn!(backend = %name, error = %why, "backend does not resolve; serving the others");
            }
        }
        for name in self.failing.keys() {
            if !failing.contains_key(name) {
                info!(backend = %name, "backend resolves again");
            }
        }
        if !failing.is_empty() {
            next_refresh = earliest(next_refresh, Instant::now() + RETRY_FAILED_NAME);
        }
        self.failing = failing;
        self.refresh_at = next_refresh;
        self.published = true;
        Ok(set)
    }
}

fn earliest(a: Option<Instant>, b: Instant) -> Option<Instant> {
    Some(a.map_or(b, |a| a.min(b)))
}

impl Source for HostsSource {
    type Item = EndpointSet;

    async fn next(&mut self) -> Result<EndpointSet, SourceError> {
        match self.refresh_at {
            Some(at) => sleep_until(at).await,
            // Only IP literals: nothing can change after the first read.
            None if self.published => std::future::pending::<()>().await,
            None => {}
        }
        self.read().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Spec;

    fn list(spec: &str) -> Vec<HostPort> {
        match Spec::parse(spec).unwrap() {
            Spec::Static(list) => list,
            other => panic!("not a static spec: {other}"),
        }
    }

    #[tokio::test]
    async fn ip_literals_are_published_in_order() {
        let mut src = HostsSource::new(list("10.0.0.2:80,[::1]:81,10.0.0.1:82"), None);
        let set = src.next().await.unwrap();
        let addrs: Vec<String> = set.as_slice().iter().map(|e| e.addr.to_string()).collect();
        assert_eq!(addrs, ["10.0.0.2:80", "[::1]:81", "10.0.0.1:82"]);
    }

    #[tokio::test]
    async fn names_from_the_hosts_file_resolve() {
        let mut src = HostsSource::new(list("localhost:80"), Some(Resolver::from_system()));
        let set = src.next().await.unwrap();
        assert!(
            set.as_slice()
                .iter()
                .any(|e| e.addr == "127.0.0.1:80".parse().unwrap()),
            "{set}"
        );
        assert!(
            src.refresh_at.is_some(),
            "a resolved name must be refreshed later"
        );
    }
}
