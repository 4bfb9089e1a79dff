//! ambassadord: a Docker ambassador, a small and fast TCP forwarder that sends every
//! connection to a backend it discovers.
//!
//! The shape: [`config`] turns flags and environment into routes (a listen address and a
//! backend [`spec`]). For each route a [`discovery`] source publishes complete
//! [`endpoint`] sets on a watch channel; the [`proxy`] accepts connections, and each
//! connection's own task picks an endpoint from the latest set, connects with failover and
//! copies both ways with half-close. Nothing on the accept path waits on discovery.
//! Routes are keyed by listen address so a reload (`--config`, SIGHUP) can add, remove
//! or retarget them; [`metrics`] and the [`admin`] endpoint show what is going on.
#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
pub mod discovery;
pub mod docker;
pub mod endpoint;
pub mod metrics;
pub mod netfilter;
pub mod proxy;
pub mod spec;

pub use config::Config;
pub use proxy::{Server, StartError};

/// Binds every listener, then serves until `shutdown` resolves and open connections
/// have drained (or the grace period ran out).
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    log_warnings(&config);
    let server = Server::bind(config).await?;
    server.run(shutdown).await;
    Ok(())
}

/// Bad input that validation skipped rather than refused (a malformed link variable),
/// logged once logging is set up.
fn log_warnings(config: &Config) {
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
}

/// As [`run`], applying each configuration sent on `reloads` (SIGHUP in the binary).
pub async fn run_with_reloads(
    config: Config,
    shutdown: impl Future<Output = ()>,
    reloads: tokio::sync::mpsc::Receiver<Config>,
) -> Result<(), StartError> {
    log_warnings(&config);
    let server = Server::bind(config).await?;
    server.run_with_reloads(shutdown, reloads).await;
    Ok(())
}
