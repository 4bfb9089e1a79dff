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
//!
//! This file is the composition root: it makes the metrics registry, binds the server,
//! and joins the admin endpoint to the server's read-only [`status`] view, so neither of
//! the two knows the other.
#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
pub mod discovery;
pub mod docker;
pub mod endpoint;
pub mod healthcheck;
pub mod limits;
pub mod logsafe;
pub mod logwriter;
pub mod metrics;
pub mod netfilter;
pub mod privilege;
pub mod proxy;
pub mod proxy_protocol;
pub mod redirect;
pub mod spec;
pub mod status;
pub mod tls;

use std::sync::Arc;

use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use config::Config;
use metrics::{Metrics, ScrapeTime};
pub use proxy::{Server, StartError};

/// Binds every listener, then serves until `shutdown` resolves and open connections
/// have drained (or the grace period ran out).
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    let (_keep, reloads) = tokio::sync::mpsc::channel(1);
    run_with_reloads(config, shutdown, reloads).await
}

/// As [`run`], applying each configuration sent on `reloads` (SIGHUP in the binary).
pub async fn run_with_reloads(
    config: Config,
    shutdown: impl Future<Output = ()>,
    reloads: tokio::sync::mpsc::Receiver<Config>,
) -> Result<(), StartError> {
    // Bad input that validation skipped rather than refused (a malformed link variable),
    // logged now that logging is set up.
    for warning in &config.warnings {
        warn!("{warning}");
    }
    let mut registry = Registry::with_prefix("ambassadord");
    let metrics = Metrics::new(&mut registry);
    let admin_config = config.admin;
    let run_as = config.run_as;
    let docker_socket = match &config.docker_host {
        Some(config::DockerHost::Unix(path)) => Some(path.clone()),
        _ => None,
    };
    // Before anything opens a descriptor; said once the start has succeeded.
    let limit = limits::raise_descriptor_limit();
    let server = Server::bind(config, metrics.clone()).await?;
    limit.log();
    let state = server.state();
    let admin_listener = match admin_config {
        None => None,
        Some(admin) => bind_admin(admin)?,
    };
    // Everything that needed root is done: every listener is bound and omni's redirect
    // installed (both in Server::bind).
    if let Some(ids) = run_as {
        match privilege::run_as(ids, docker_socket.as_deref()) {
            Ok(privilege::Outcome::Switched { uid, gid, groups }) => {
                info!(uid, gid, groups = ?groups, "switched to an unprivileged user (--run-as)");
                if groups.contains(&0) {
                    warn!(
                        "--run-as: kept group 0 (root), the Docker socket's group, to reopen the socket: files of group root stay readable and writable; give the socket a group of its own (docker)"
                    );
                }
            }
            Ok(privilege::Outcome::NotRoot | privilege::Outcome::StayRoot) => {}
            Err(e) => warn!("{e}"),
        }
    }
    let (scrape_state, backend_state) = (state.clone(), state.clone());
    registry.register_collector(Box::new(ScrapeTime {
        metrics,
        omni_index_containers: move || scrape_state.omni_containers(),
        backends_up: move || backend_state.backends_up(),
    }));
    // The admin endpoint closes when shutdown begins, as the listeners do.
    let stop_admin = CancellationToken::new();
    if let Some(listener) = admin_listener {
        let admin = Arc::new(admin::Admin {
            registry,
            view: state,
        });
        tokio::spawn(admin::serve(listener, admin, stop_admin.clone()));
    }
    let shutdown = async move {
        shutdown.await;
        stop_admin.cancel();
    };
    server.run_with_reloads(shutdown, reloads).await;
    Ok(())
}

/// Binds the admin endpoint. The default address failing to bind is a warning (a second
/// ambassador on one host still starts); an address the user asked for is fatal.
fn bind_admin(admin: config::Admin) -> Result<Option<tokio::net::TcpListener>, StartError> {
    match proxy::listen::bind(Some(admin.addr.ip()), admin.addr.port()) {
        Ok(l) => {
            info!(admin = %l.local_addr().unwrap_or(admin.addr), "admin endpoint listening");
            Ok(Some(l))
        }
        Err(e) if !admin.explicit => {
            warn!(admin = %admin.addr, error = %e, "cannot listen for the admin endpoint; running without it (set --admin to another address or off)");
            Ok(None)
        }
        Err(source) => Err(StartError::Bind {
            addr: format!("{} (--admin)", admin.addr),
            source,
        }),
    }
}
