//! Consul KV discovery (in progress: replaced by the full source before release).

use super::kv::BackendList;
use super::{Source, SourceError};
use crate::spec::KvSpec;

pub struct ConsulSource {
    spec: KvSpec,
    _token: Option<String>,
}

impl ConsulSource {
    pub fn new(spec: KvSpec, token: Option<String>) -> Self {
        ConsulSource {
            spec,
            _token: token,
        }
    }
}

impl Source for ConsulSource {
    type Item = BackendList;
    const ANNOUNCE: bool = false;

    async fn next(&mut self) -> Result<BackendList, SourceError> {
        Err(SourceError(format!(
            "Consul discovery for '{}' is not built yet",
            self.spec.path
        )))
    }
}
