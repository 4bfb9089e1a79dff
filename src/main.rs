//! The `ambassadord` binary: parse the command line, set up logging, run, map the outcome
//! to an exit code (0 after a clean shutdown, 64 for bad usage, 1 for a runtime failure).

use std::io::IsTerminal;
use std::process::ExitCode;

use ambassadord::Config;
use ambassadord::config::{Action, ConfigError, EXIT_USAGE, LogConfig, LogFormat};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let config = match Config::from_args(std::env::args_os()) {
        Ok(config) => config,
        Err(ConfigError::Info(text)) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        Err(ConfigError::Usage(message)) => {
            eprintln!("ambassadord: {message}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    init_logging(&config.log);

    // The netfilter actions are one synchronous netlink exchange: no runtime needed.
    let oneshot = match config.action {
        Action::Serve => None,
        Action::SetupRedirect { port } => Some(
            ambassadord::netfilter::setup_redirect(port)
                .map(|()| info!(port, "redirecting incoming TCP in this network namespace")),
        ),
        Action::RemoveRedirect => Some(
            ambassadord::netfilter::remove_redirect()
                .map(|()| info!("removed the redirect of incoming TCP")),
        ),
    };
    if let Some(outcome) = oneshot {
        return match outcome {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                error!("{e}");
                ExitCode::FAILURE
            }
        };
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(ambassadord::run(config, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(log: &LogConfig) {
    let filter = match &log.filter {
        // Validated in config, so this parse succeeds.
        Some(f) => EnvFilter::try_new(f).unwrap_or_else(|_| EnvFilter::new("info")),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match log.format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Resolves on the first SIGTERM or SIGINT. A second one exits at once, for an operator
/// who does not want to wait for the grace period.
async fn shutdown_signal() {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        warn!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    info!(signal = name, "shutting down");
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        warn!("second signal: exiting now");
        std::process::exit(1);
    });
}
