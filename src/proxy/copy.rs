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

use std::fmt;
use std::io;
use std::net::Shutdown;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

const BUF_SIZE: usize = 64 * 1024;

/// How bytes are moved between the two sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CopyMode {
    /// The plain copy, switching a direction to splice once it carries a bulk stream.
    #[default]
    Auto,
    /// Zero-copy splice(2) through a pipe on Linux from the first byte; the plain copy
    /// elsewhere.
    Splice,
    /// read(2) into a buffer, write(2) out of it.
    Userspace,
}

impl CopyMode {
    pub fn as_str(&self) -> &'static str {
        match self {
            CopyMode::Auto => "auto",
            CopyMode::Splice => "splice",
            CopyMode::Userspace => "userspace",
        }
    }
}

/// A name that is not a copy mode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a copy mode (auto, splice, userspace)")]
pub struct UnknownCopyMode;

impl std::str::FromStr for CopyMode {
    type Err = UnknownCopyMode;

    /// `auto`, `splice` or `userspace`, in any case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [CopyMode::Auto, CopyMode::Splice, CopyMode::Userspace]
            .into_iter()
            .find(|mode| mode.as_str().eq_ignore_ascii_case(s))
            .ok_or(UnknownCopyMode)
    }
}

/// What happened on one proxied connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transfer {
    /// Bytes from the client to the backend.
    pub sent: u64,
    /// Bytes from the backend to the client.
    pub received: u64,
    pub close: Close,
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

/// Which side an I/O error happened on.
pub(super) enum Fault {
    From(io::Error),
    To(io::Error),
}

/// The shared counter one direction adds its bytes to as they move (the backend's
/// series), so a long transfer shows in /metrics and /routes while it runs, not only
/// once it closes.
pub type Live<'a> = Option<&'a Counter>;

/// One direction's byte count: the connection's own total plus its [`Live`] counter.
pub(super) struct Tally<'a> {
    own: AtomicU64,
    live: Live<'a>,
}

impl<'a> Tally<'a> {
    fn new(live: Live<'a>) -> Self {
        Tally {
            own: AtomicU64::new(0),
            live,
        }
    }

    pub(super) fn add(&self, n: u64) {
        self.own.fetch_add(n, Ordering::Relaxed);
        if let Some(metric) = self.live {
            metric.inc_by(n);
        }
    }

    fn get(&self) -> u64 {
        self.own.load(Ordering::Relaxed)
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
    let start = Instant::now();
    let sent = Tally::new(live.0);
    let received = Tally::new(live.1);
    // Milliseconds since `start` of the last byte moved either way.
    let last_activity = AtomicU64::new(0);

    let mut up = pin!(one_way(mode, client, backend, &sent, &last_activity, start));
    let mut down = pin!(one_way(
        mode,
        backend,
        client,
        &received,
        &last_activity,
        start
    ));
    let (mut up_done, mut down_done) = (false, false);
    let mut first_eof = None;

    let close = loop {
        let idle_deadline = idle_timeout.map(|idle| {
            start + Duration::from_millis(last_activity.load(Ordering::Relaxed)) + idle
        });
        tokio::select! {
            r = &mut up, if !up_done => {
                up_done = true;
                match r {
                    Ok(()) => { first_eof.get_or_insert(Close::Client); }
                    Err(Fault::From(e)) => break Close::ClientError(e.kind()),
                    Err(Fault::To(e)) => break Close::BackendError(e.kind()),
                }
            }
            r = &mut down, if !down_done => {
                down_done = true;
                match r {
                    Ok(()) => { first_eof.get_or_insert(Close::Backend); }
                    Err(Fault::From(e)) => break Close::BackendError(e.kind()),
                    Err(Fault::To(e)) => break Close::ClientError(e.kind()),
                }
            }
            _ = sleep_until(idle_deadline.unwrap_or(start)), if idle_deadline.is_some() => {
                let idle = idle_timeout.unwrap_or_default();
                let quiet = start.elapsed().saturating_sub(Duration::from_millis(last_activity.load(Ordering::Relaxed)));
                if quiet >= idle {
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
) -> Result<(), Fault> {
    #[cfg(target_os = "linux")]
    {
        let upgrade = match mode {
            CopyMode::Userspace => false,
            CopyMode::Auto => {
                match copy_one_way(from, to, count, last_activity, start, true).await? {
                    Flow::Ended => return Ok(()),
                    Flow::Bulk => true,
                }
            }
            CopyMode::Splice => true,
        };
        if upgrade {
            match super::splice::one_way(from, to, count, last_activity, start).await {
                super::splice::Spliced::Done(r) => return r,
                // Nothing is in flight: the plain copy takes over where splice stopped.
                super::splice::Spliced::Unsupported => {}
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = mode;
    copy_one_way(from, to, count, last_activity, start, false)
        .await
        .map(|_| ())
}

/// Why the plain copy returned.
enum Flow {
    /// EOF from `from`, passed on to `to`.
    Ended,
    /// One read filled the whole buffer (asked for with `stop_on_bulk`): a bulk stream
    /// that splice moves more cheaply. Everything read so far has been written.
    Bulk,
}

/// The plain copy: read into a buffer held only while data flows, write it out.
async fn copy_one_way(
    from: &TcpStream,
    to: &TcpStream,
    count: &Tally<'_>,
    last_activity: &AtomicU64,
    start: Instant,
    stop_on_bulk: bool,
) -> Result<Flow, Fault> {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        from.readable().await.map_err(Fault::From)?;
        if buf.capacity() == 0 {
            buf.reserve_exact(BUF_SIZE);
        }
        buf.clear();
        // A short read means the socket was drained at that moment: clear its readiness
        // as if the read had returned EAGAIN (tokio's own poll_read does the same), which
        // saves one read(2) per message on interactive traffic. A read that fills the
        // buffer keeps readiness, so the next one happens at once.
        let mut short = None;
        let read = from.try_io(Interest::READABLE, || {
            // Reads into spare capacity, so a fresh buffer is never zero-filled first.
            match from.try_read_buf(&mut buf)? {
                n if n > 0 && n < BUF_SIZE => {
                    short = Some(n);
                    Err(io::ErrorKind::WouldBlock.into())
                }
                n => Ok(n),
            }
        });
        let read = match short {
            Some(n) => Ok(n),
            None => read,
        };
        match read {
            Ok(0) => {
                // Half-close: pass the EOF on and let the other direction run on.
                return match SockRef::from(to).shutdown(Shutdown::Write) {
                    Ok(()) => Ok(Flow::Ended),
                    // The other side already went away entirely; nothing left to tell it.
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(Flow::Ended),
                    Err(e) => Err(Fault::To(e)),
                };
            }
            Ok(n) => {
                write_all(to, &buf[..n]).await.map_err(Fault::To)?;
                count.add(n as u64);
                last_activity.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
                if stop_on_bulk && n >= BUF_SIZE {
                    return Ok(Flow::Bulk);
                }
                if short.is_some() {
                    // Drained: give the buffer back while the direction is quiet.
                    buf = Vec::new();
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Drained for now: give the buffer back while the direction is quiet.
                buf = Vec::new();
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Fault::From(e)),
        }
    }
}

async fn write_all(to: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        to.writable().await?;
        match to.try_write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
