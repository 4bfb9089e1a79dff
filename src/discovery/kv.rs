//! What etcd and Consul sources share: the children-or-value rule that turns a store's
//! keys into a backend list, and the stage that resolves that list into endpoints.
//!
//! A KV source publishes a [`BackendList`] (what the keys say); [`Resolving`] turns the
//! latest list into an [`EndpointSet`], re-resolving host names on TTL between changes.
//! Splitting the two keeps a store's watch (a long poll or stream) from being cut
//! whenever a DNS TTL runs out, and lets the driver's backoff and last-good-set rules
//! apply to the store read itself.

use std::fmt;

use tokio::sync::watch;
use tracing::warn;

use super::dns::Resolver;
use super::hosts::HostsSource;
use super::{Source, SourceError};
use crate::endpoint::EndpointSet;
use crate::logsafe::outside;
use crate::spec::HostPort;

/// The backends a store lists, in key order, before host names are resolved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendList(pub Vec<HostPort>);

impl fmt::Display for BackendList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("(none)");
        }
        for (i, hp) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{hp}")?;
        }
        Ok(())
    }
}

/// One key and its value as read from a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEntry {
    pub key: String,
    pub value: Vec<u8>,
}

/// A value that is not a backend: skipped, and reported naming the key and value.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct BadEntry {
    pub key: String,
    pub value: String,
    pub reason: String,
}

impl fmt::Display for BadEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "key '{}': value '{}' is not a backend: {}",
            outside(&self.key),
            outside(&self.value),
            outside(&self.reason)
        )
    }
}

/// The children-or-value rule. `path` is the key the spec names (no trailing '/');
/// `entries` are every key read at or under it, in any order. If `path` has children
/// (keys `path/NAME`, direct children only), their values are the backends, in key
/// order; otherwise the value of `path` itself is. A value may list several backends
/// separated by commas. Empty values (Consul folder markers) are ignored; any other value
/// that is not `HOST:PORT` is skipped and returned as a [`BadEntry`].
pub fn backends_from_entries(path: &str, entries: &[KvEntry]) -> (BackendList, Vec<BadEntry>) {
    let prefix = format!("{path}/");
    let mut children: Vec<&KvEntry> = entries
        .iter()
        .filter(|e| {
            e.key
                .strip_prefix(&prefix)
                .is_some_and(|name| !name.is_empty() && !name.contains('/'))
        })
        .collect();
    children.sort_by(|a, b| a.key.cmp(&b.key));
    let chosen: Vec<&KvEntry> = if children.is_empty() {
        entries.iter().filter(|e| e.key == path).collect()
    } else {
        children
    };

    let mut list = Vec::new();
    let mut bad = Vec::new();
    for entry in chosen {
        let Ok(text) = std::str::from_utf8(&entry.value) else {
            bad.push(BadEntry {
                key: entry.key.clone(),
                value: String::from_utf8_lossy(&entry.value).into_owned(),
                reason: "not UTF-8 text".into(),
            });
            continue;
        };
        for element in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            match HostPort::parse(element) {
                Ok(hp) => list.push(hp),
                Err(reason) => bad.push(BadEntry {
                    key: entry.key.clone(),
                    value: element.to_string(),
                    reason,
                }),
            }
        }
    }
    (BackendList(list), bad)
}

/// Remembers which bad entries were already reported, so each is warned about once
/// while it stays bad rather than on every read. `T` is what a source skips: a KV
/// store's [`BadEntry`], or a Consul catalog instance.
#[derive(Debug)]
pub struct BadEntryLog<T = BadEntry> {
    reported: Vec<T>,
}

impl<T> Default for BadEntryLog<T> {
    fn default() -> Self {
        BadEntryLog {
            reported: Vec::new(),
        }
    }
}

impl<T: Ord + fmt::Display> BadEntryLog<T> {
    pub fn report(&mut self, source: &str, mut bad: Vec<T>) {
        bad.sort();
        for entry in &bad {
            if !self.reported.contains(entry) {
                warn!(source, "{entry}; skipped, the other backends keep serving");
            }
        }
        self.reported = bad;
    }
}

/// The second stage of a KV route: resolves the latest [`BackendList`] to endpoints and
/// keeps resolving its host names on TTL until the list changes.
pub struct Resolving {
    lists: watch::Receiver<Option<BackendList>>,
    resolver: Resolver,
    hosts: Option<HostsSource>,
    /// A list was taken; until then the first one is taken whenever it comes.
    started: bool,
}

impl Resolving {
    pub fn new(lists: watch::Receiver<Option<BackendList>>, resolver: Resolver) -> Self {
        Resolving {
            lists,
            resolver,
            hosts: None,
            started: false,
        }
    }
}

impl Source for Resolving {
    type Item = EndpointSet;

    async fn next(&mut self) -> Result<EndpointSet, SourceError> {
        // A list not seen yet (including the first) replaces the current one.
        let mut take = !self.started || self.lists.has_changed().unwrap_or(false);
        loop {
            if take {
                let list = self.lists.borrow_and_update().clone();
                if let Some(list) = list {
                    self.started = true;
                    if list.0.is_empty() {
                        self.hosts = None;
                        return Ok(EndpointSet::empty());
                    }
                    let mut hosts = HostsSource::new(list.0, Some(self.resolver.clone()));
                    let read = hosts.next().await;
                    self.hosts = Some(hosts);
                    return read;
                }
            }
            tokio::select! {
                changed = self.lists.changed() => {
                    if changed.is_err() {
                        // The store's stage stopped: nothing will change any more.
                        std::future::pending::<()>().await;
                    }
                    // changed() marked the new list seen, so has_changed() no longer
                    // says so: take it on the next turn.
                    take = true;
                }
                read = async {
                    match &mut self.hosts {
                        Some(hosts) => hosts.next().await,
                        None => std::future::pending().await,
                    }
                } => return read,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(key: &str, value: &str) -> KvEntry {
        KvEntry {
            key: key.into(),
            value: value.as_bytes().to_vec(),
        }
    }

    fn list(path: &str, entries: &[KvEntry]) -> (String, Vec<String>) {
        let (list, bad) = backends_from_entries(path, entries);
        (
            list.to_string(),
            bad.iter().map(|b| b.to_string()).collect(),
        )
    }

    #[test]
    fn children_values_in_key_order() {
        let entries = [
            e("/svc/b", "10.0.0.2:80"),
            e("/svc", "10.0.0.9:80"),
            e("/svc/a", "10.0.0.1:80"),
            e("/svc/a/meta", "10.0.0.7:80"),
            e("/svcx/a", "10.0.0.8:80"),
        ];
        assert_eq!(list("/svc", &entries).0, "10.0.0.1:80,10.0.0.2:80");
    }

    #[test]
    fn own_value_when_no_children_and_comma_lists() {
        let entries = [e("/svc", "10.0.0.1:80, redis:6379")];
        assert_eq!(list("/svc", &entries).0, "10.0.0.1:80,redis:6379");
        assert_eq!(list("/other", &entries).0, "(none)");
    }

    #[test]
    fn consul_style_keys_and_folder_markers() {
        let entries = [e("svc/", ""), e("svc/a", "10.0.0.1:80")];
        assert_eq!(list("svc", &entries).0, "10.0.0.1:80");
    }

    #[test]
    fn bad_values_are_skipped_and_named() {
        let entries = [
            e("/svc/a", "10.0.0.1:80"),
            e("/svc/b", "redis:abc"),
            KvEntry {
                key: "/svc/c".into(),
                value: vec![0xff, 0xfe],
            },
        ];
        let (good, bad) = list("/svc", &entries);
        assert_eq!(good, "10.0.0.1:80");
        assert_eq!(bad.len(), 2, "{bad:?}");
        assert!(
            bad[0].contains(
                "key '/svc/b': value 'redis:abc' is not a backend: port 'abc' is not a number"
            ),
            "{bad:?}"
        );
        assert!(
            bad[1].contains("key '/svc/c'") && bad[1].contains("not UTF-8"),
            "{bad:?}"
        );
    }

    #[tokio::test]
    async fn resolving_follows_the_latest_list() {
        let (tx, rx) = watch::channel(None);
        let mut stage = Resolving::new(rx, Resolver::from_system());
        tx.send(Some(BackendList(vec![
            HostPort::parse("10.0.0.1:80").unwrap(),
        ])))
        .unwrap();
        assert_eq!(stage.next().await.unwrap().to_string(), "10.0.0.1:80");
        tx.send(Some(BackendList(vec![
            HostPort::parse("localhost:81").unwrap(),
        ])))
        .unwrap();
        let set = stage.next().await.unwrap();
        assert!(set.to_string().contains("127.0.0.1:81"), "{set}");
        tx.send(Some(BackendList::default())).unwrap();
        assert!(stage.next().await.unwrap().is_empty());
    }

    /// Regression: a list published while next() was already waiting was marked seen
    /// by `changed()` and then ignored, so KV changes never reached the data path.
    #[tokio::test]
    async fn resolving_takes_a_list_that_arrives_while_waiting() {
        let one = |a: &str| Some(BackendList(vec![HostPort::parse(a).unwrap()]));
        let (tx, rx) = watch::channel(one("10.0.0.1:80"));
        let mut stage = Resolving::new(rx, Resolver::from_system());
        assert_eq!(stage.next().await.unwrap().to_string(), "10.0.0.1:80");
        let waiting = tokio::spawn(async move { (stage.next().await, stage) });
        tokio::task::yield_now().await;
        tx.send(one("10.0.0.2:80")).unwrap();
        let (read, _stage) = tokio::time::timeout(std::time::Duration::from_secs(10), waiting)
            .await
            .expect("the new list was never taken")
            .unwrap();
        assert_eq!(read.unwrap().to_string(), "10.0.0.2:80");
    }

    /// Regression: after an empty list, next() returned the same empty set again at once,
    /// forever (a busy loop in the driver); it must wait for the next list.
    #[tokio::test(start_paused = true)]
    async fn resolving_waits_after_an_empty_list() {
        let (tx, rx) = watch::channel(Some(BackendList::default()));
        let mut stage = Resolving::new(rx, Resolver::from_system());
        assert!(stage.next().await.unwrap().is_empty());
        let again = tokio::time::timeout(std::time::Duration::from_secs(3600), stage.next());
        assert!(again.await.is_err(), "next() returned without a new list");
        drop(tx);
    }
}
