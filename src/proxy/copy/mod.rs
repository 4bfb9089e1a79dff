//! Moving bytes both ways between a client and its backend, keeping half-close.
//!
//! [`pipe`] is the whole contract the rest of the proxy relies on: it returns when both
//! directions have ended (or one failed, the idle timeout fired, or shutdown forced it),
//! with byte counts and how it ended. When one side sends EOF, writing toward the other
//! side is shut down and the other direction keeps flowing until it ends too. A
//! zero-copy splice path can replace the body of `pipe` without touching its callers.
//!
//! Three copy modes. [`CopyMode::Userspace`] is the plain read/write copy.
//! [`CopyMode::Splice`] moves bytes with splice(2) through pooled pipes on Linux (see
//! `splice.rs`). The default, [`CopyMode::Auto`], starts each direction with the plain
//! copy and switches it to splice once one read fills the whole buffer: the benchmark
//! (docs/benchmarks.md) shows splice winning on bulk streams and losing on small
//! request/response traffic, where it costs the same syscalls plus a pipe. The plain copy
//! is also the fallback wherever splice is refused (EINVAL/ENOSYS/EOPNOTSUPP).
//!
//! A direction holds a buffer only while data is flowing: it is taken when the socket
//! turns readable and given back when a read would block, so idle connections cost no
//! buffer memory.
//!
//! This file runs the two directions; the strategies that move one direction's bytes
//! are `plain.rs` and `splice.rs`, and `direction.rs` is what both report (bytes moved,
//! which side failed), so neither strategy knows the other or this file.

mod direction;
mod plain;
#[cfg(target_os = "linux")]
pub mod splice;
mod stream;

pub use crate::config::CopyMode;
pub use direction::Live;
use direction::{Fault, Tally};

use std::fmt;
use std::io;
use std::pin::pin;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

/// What happened on one proxied connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    /// Bytes from the client to the backend.
    pub sent: u64,
    /// Bytes from the backend to the client.
    pub received: u64,
    pub close: Close,
    /// What a TLS side said when it failed (an alert, a bad record), which the error's
    /// kind alone does not tell.
    pub tls_error: Option<String>,
}

/// How a proxied connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// Both sides finished; the client sent its EOF first.
    Client,
    /// Both sides finished; the backend sent its EOF first.
    Backend,
    ClientError(io::ErrorKind),
    BackendError(io::ErrorKind),
    IdleTimeout,
    /// The shutdown grace period ran out.
    Shutdown,
}

impl Close {
    /// A one-word name for logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Close::Client => "client_closed",
            Close::Backend => "backend_closed",
            Close::ClientError(_) => "client_error",
            Close::BackendError(_) => "backend_error",
            Close::IdleTimeout => "idle_timeout",
            Close::Shutdown => "shutdown",
        }
    }

    /// The I/O error that ended the connection, if one did.
    pub fn error(&self) -> Option<io::ErrorKind> {
        match self {
            Close::ClientError(kind) | Close::BackendError(kind) => Some(*kind),
            _ => None,
        }
    }
}

impl fmt::Display for Close {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Copies both ways until both directions end, with the default [`CopyMode`]; see the
/// module documentation.
pub async fn pipe(
    client: &TcpStream,
    backend: &TcpStream,
    idle_timeout: Option<Duration>,
    stop: &CancellationToken,
) -> Transfer {
    let live = (None, None);
    pipe_with(
        CopyMode::default(),
        client,
        backend,
        idle_timeout,
        stop,
        live,
    )
    .await
}

/// [`pipe`] with the copy mode chosen explicitly, adding the bytes sent and received to
/// `live` as they move.
pub async fn pipe_with(
    mode: CopyMode,
    client: &TcpStream,
    backend: &TcpStream,
    idle_timeout: Option<Duration>,
    stop: &CancellationToken,
    live: (Live<'_>, Live<'_>),
) -> Transfer {
    let clock = Clock::new();
    let sent = Tally::new(live.0);
    let received = Tally::new(live.1);
    // Directions that reached EOF: the second need not shut down (see `pass_eof`).
    let ends = AtomicU8::new(0);
    let up = one_way(
        mode,
        client,
        backend,
        &sent,
        &clock.last,
        clock.start,
        &ends,
    );
    let down = one_way(
        mode,
        backend,
        client,
        &received,
        &clock.last,
        clock.start,
        &ends,
    );
    drive(up, down, &clock, idle_timeout, stop, (&sent, &received)).await
}

/// [`pipe`] for streams that are not both plain sockets (TLS on either side): the
/// read/write copy of `stream.rs`, with the same half-close and the same report.
pub async fn pipe_streams<C, B>(
    client: C,
    backend: B,
    idle_timeout: Option<Duration>,
    stop: &CancellationToken,
    live: (Live<'_>, Live<'_>),
) -> Transfer
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let clock = Clock::new();
    let sent = Tally::new(live.0);
    let received = Tally::new(live.1);
    let (mut client_in, mut client_out) = tokio::io::split(client);
    let (mut backend_in, mut backend_out) = tokio::io::split(backend);
    let up = stream::one_way(
        &mut client_in,
        &mut backend_out,
        &sent,
        &clock.last,
        clock.start,
    );
    let down = stream::one_way(
        &mut backend_in,
        &mut client_out,
        &received,
        &clock.last,
        clock.start,
    );
    drive(up, down, &clock, idle_timeout, stop, (&sent, &received)).await
}

/// When a copy started, and milliseconds since then of the last byte moved either way.
struct Clock {
    start: Instant,
    last: AtomicU64,
}

impl Clock {
    fn new() -> Clock {
        Clock {
            start: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn quiet(&self) -> Duration {
        self.start
            .elapsed()
            .saturating_sub(Duration::from_millis(self.last.load(Ordering::Relaxed)))
    }
}

/// Runs both directions until both end (or one fails, the idle timeout fires, or
/// `stop`), and says how the connection ended.
async fn drive(
    up: impl Future<Output = Result<(), Fault>>,
    down: impl Future<Output = Result<(), Fault>>,
    clock: &Clock,
    idle_timeout: Option<Duration>,
    stop: &CancellationToken,
    (sent, received): (&Tally<'_>, &Tally<'_>),
) -> Transfer {
    let mut up = pin!(up);
    let mut down = pin!(down);
    let (mut up_done, mut down_done) = (false, false);
    let mut first_eof = None;
    let start = clock.start;
    let mut tls_error = None;
    let mut failed = |e: &io::Error| {
        tls_error = crate::tls::cause(e);
        e.kind()
    };

    let close = loop {
        let idle_deadline = idle_timeout
            .map(|idle| start + Duration::from_millis(clock.last.load(Ordering::Relaxed)) + idle);
        tokio::select! {
            r = &mut up, if !up_done => {
                up_done = true;
                match r {
                    Ok(()) => { first_eof.get_or_insert(Close::Client); }
                    Err(Fault::From(e)) => break Close::ClientError(failed(&e)),
                    Err(Fault::To(e)) => break Close::BackendError(failed(&e)),
                }
            }
            r = &mut down, if !down_done => {
                down_done = true;
                match r {
                    Ok(()) => { first_eof.get_or_insert(Close::Backend); }
                    Err(Fault::From(e)) => break Close::BackendError(failed(&e)),
                    Err(Fault::To(e)) => break Close::ClientError(failed(&e)),
                }
            }
            _ = sleep_until(idle_deadline.unwrap_or(start)), if idle_deadline.is_some() => {
                if clock.quiet() >= idle_timeout.unwrap_or_default() {
                    break Close::IdleTimeout;
                }
            }
            _ = stop.cancelled() => break Close::Shutdown,
        }
        if up_done && down_done {
            break first_eof.unwrap_or(Close::Client);
        }
    };
    Transfer {
        sent: sent.get(),
        received: received.get(),
        close,
        tls_error,
    }
}

/// Copies `from` → `to` in `mode` until EOF on `from`, then shuts down writing on `to`.
async fn one_way(
    mode: CopyMode,
    from: &TcpStream,
    to: &TcpStream,
    count: &Tally<'_>,
    last_activity: &AtomicU64,
    start: Instant,
    ends: &AtomicU8,
) -> Result<(), Fault> {
    #[cfg(target_os = "linux")]
    {
        let upgrade = match mode {
            CopyMode::Userspace => false,
            CopyMode::Auto => {
                match plain::one_way(from, to, count, last_activity, start, true, ends).await? {
                    plain::Flow::Ended => return Ok(()),
                    plain::Flow::Bulk => true,
                }
            }
            CopyMode::Splice => true,
        };
        if upgrade {
            match splice::one_way(from, to, count, last_activity, start, ends).await {
                splice::Spliced::Done(r) => return r,
                // Nothing is in flight: the plain copy takes over where splice stopped.
                splice::Spliced::Unsupported => {}
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = mode;
    plain::one_way(from, to, count, last_activity, start, false, ends)
        .await
        .map(|_| ())
}
