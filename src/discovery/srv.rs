//! DNS SRV discovery (in progress: replaced by the full source before release).

use super::dns::Resolver;
use super::{Source, SourceError};
use crate::endpoint::EndpointSet;

pub struct SrvSource {
    name: String,
    _resolver: Resolver,
}

impl SrvSource {
    pub fn new(name: String, resolver: Resolver) -> Self {
        SrvSource {
            name,
            _resolver: resolver,
        }
    }
}

impl Source for SrvSource {
    type Item = EndpointSet;

    async fn next(&mut self) -> Result<EndpointSet, SourceError> {
        Err(SourceError(format!(
            "SRV discovery for '{}' is not built yet",
            self.name
        )))
    }
}
