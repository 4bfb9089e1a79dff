//! The `ambassadord` binary: parse the command line, set up logging, run, map the outcome
//! to an exit code (0 after a clean shutdown, 64 for bad usage, 1 for a runtime failure).

use std::io::IsTerminal;
use std::process::ExitCode;

use ambassadord::config::{Command, ConfigError, EXIT_USAGE, LogConfig, LogFormat};
use ambassadord::{Config, logwriter};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let command = match Command::from_args(args.clone()) {
        Ok(command) => command,
        Err(ConfigError::Info(text)) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        Err(e @ ConfigError::Usage(_)) => {
            eprintln!("ambassadord: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    // Held to the end of main: dropping it writes out every line still queued.
    *LOG_WRITER.lock().unwrap_or_else(|p| p.into_inner()) = init_logging(command.log());
    let _flush = FlushLog;

    let config = match command {
        Command::Serve(config) => config,
        // The netfilter actions are one synchronous netlink exchange: no runtime needed.
        Command::SetupRedirect { port, keep, .. } => {
            return exit_after(
                ambassadord::netfilter::setup_redirect(ambassadord::netfilter::Plan { port, keep })
                    .map(|()| match keep {
                        Some(kept) => info!(port, kept, "redirecting incoming TCP in this network namespace (the admin port is kept out)"),
                        None => info!(port, "redirecting incoming TCP in this network namespace"),
                    }),
            );
        }
        Command::RemoveRedirect { .. } => {
            return exit_after(
                ambassadord::netfilter::remove_redirect()
                    .map(|()| info!("removed the redirect of incoming TCP")),
            );
        }
        // One line either way: Docker keeps it as the health check's output.
        Command::Healthcheck { admin, .. } => {
            return match ambassadord::healthcheck::check(admin) {
                Ok(answer) => {
                    println!("{answer}");
                    ExitCode::SUCCESS
                }
                Err(why) => {
                    eprintln!("ambassadord healthcheck: {why}");
                    ExitCode::FAILURE
                }
            };
        }
    };

    // The control runtime: signals, reloads, discovery, Docker and the admin endpoint.
    // Connections run on the data threads the server starts (src/proxy/workers.rs), so
    // one thread is plenty here.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // SIGHUP reloads a --config file, and reads TLS files again (rotation); without
    // either there is nothing to reload, and it keeps its default meaning.
    let reloadable = config.config_file.is_some() || config.tls.is_some();
    let run = async move {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        if reloadable {
            tokio::spawn(reload_on_sighup(args, tx));
        }
        ambassadord::run_with_reloads(config, shutdown_signal(), rx).await
    };
    match runtime.block_on(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The exit code of a one-shot action; its failure is logged.
fn exit_after(outcome: Result<(), impl std::fmt::Display>) -> ExitCode {
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// Logging to stderr through one writer thread ([`ambassadord::logwriter`]): a
/// connection's task formats its line and appends it to a buffer, and never waits on
/// stderr (a full pipe to `docker logs` stalls the writer, not forwarding). The returned
/// guard writes out what is pending when it drops, at the end of `main`, so a clean
/// shutdown loses no line.
fn init_logging(log: &LogConfig) -> Option<logwriter::Guard> {
    // Config checked --log-level; a bad RUST_LOG falls back to info.
    let filter = match &log.filter {
        Some(f) => EnvFilter::try_new(f).unwrap_or_else(|_| EnvFilter::new("info")),
        None => EnvFilter::new("info"),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let ansi = std::io::stderr().is_terminal();
    // Without a thread for it (none can be made), lines are written where they happen.
    match (logwriter::start(std::io::stderr()), log.format) {
        (Ok((writer, guard)), LogFormat::Text) => {
            builder.with_writer(writer).with_ansi(ansi).init();
            Some(guard)
        }
        (Ok((writer, guard)), LogFormat::Json) => {
            builder
                .with_writer(writer)
                .json()
                .flatten_event(true)
                .init();
            Some(guard)
        }
        (Err(_), LogFormat::Text) => {
            builder.with_writer(std::io::stderr).with_ansi(ansi).init();
            None
        }
        (Err(_), LogFormat::Json) => {
            builder
                .with_writer(std::io::stderr)
                .json()
                .flatten_event(true)
                .init();
            None
        }
    }
}

/// The log writer's guard: dropped (every queued line written) when `main` returns, or
/// just before an immediate exit.
static LOG_WRITER: std::sync::Mutex<Option<logwriter::Guard>> = std::sync::Mutex::new(None);

/// Writes out the queued log lines when `main` ends, however it returns.
struct FlushLog;

impl Drop for FlushLog {
    fn drop(&mut self) {
        flush_log();
    }
}

fn flush_log() {
    drop(LOG_WRITER.lock().unwrap_or_else(|p| p.into_inner()).take());
}

/// On every SIGHUP, reads the command line, environment and --config file again and
/// hands the result to the server; a bad file is logged and the running config stays.
/// Only a server reloads, with the argv it started with, so the command is `Serve`
/// again unless something is badly wrong: anything else is refused like a bad file.
async fn reload_on_sighup(args: Vec<std::ffi::OsString>, tx: tokio::sync::mpsc::Sender<Config>) {
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        warn!("cannot install the SIGHUP handler; reloading is unavailable");
        return;
    };
    while hup.recv().await.is_some() {
        info!("SIGHUP: reloading the configuration");
        match Command::from_args(args.clone()) {
            Ok(Command::Serve(config)) => {
                if tx.send(config).await.is_err() {
                    return;
                }
            }
            Ok(other) => {
                error!(
                    "reload rejected, keeping the running configuration: the command line no longer serves ({other:?})"
                );
            }
            Err(e) => {
                error!("reload rejected, keeping the running configuration: {e}");
            }
        }
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
        flush_log();
        std::process::exit(1);
    });
}
