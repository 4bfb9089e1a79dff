//! What one direction of a copy reports, whichever strategy moves its bytes (the
//! plain copy in `plain.rs`, splice in `splice.rs`): which side an error came from, and
//! the bytes moved so far.

use std::io;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use socket2::SockRef;

use prometheus_client::metrics::counter::Counter;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// The shared counter one direction adds its bytes to as they move (the backend's
/// series), so a long transfer shows in /metrics and /routes while it runs, not only
/// once it closes.
pub type Live<'a> = Option<&'a Counter>;

/// Passes a direction's EOF on to `to`: shuts down writing on it, unless the other
/// direction has already ended. Then the connection is about to close, and close(2)
/// sends the same FIN: `to` has nothing unread, the other direction having read it to
/// its EOF. `ends` counts the directions that reached EOF; one shutdown per connection
/// is saved in the usual case.
pub(super) fn pass_eof(to: &TcpStream, ends: &AtomicU8) -> Result<(), Fault> {
    if ends.fetch_add(1, Ordering::Relaxed) >= 1 {
        return Ok(());
    }
    match SockRef::from(to).shutdown(std::net::Shutdown::Write) {
        Ok(()) => Ok(()),
        // The other side already went away entirely; nothing left to tell it.
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        Err(e) => Err(Fault::To(e)),
    }
}

/// Which side an I/O error happened on.
pub(super) enum Fault {
    From(io::Error),
    To(io::Error),
}

/// One direction's byte count: the connection's own total plus its [`Live`] counter.
pub(super) struct Tally<'a> {
    own: AtomicU64,
    live: Live<'a>,
}

impl<'a> Tally<'a> {
    pub(super) fn new(live: Live<'a>) -> Self {
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

    pub(super) fn get(&self) -> u64 {
        self.own.load(Ordering::Relaxed)
    }
}

/// Waits until `to` can take more bytes. Meanwhile nothing reads `from` (its bytes are
/// the ones waiting), so an error on it (the peer reset) would go unnoticed for as long
/// as `to` does not read: watch `from` for one too, and fail with it at once.
pub(super) async fn writable(from: &TcpStream, to: &TcpStream) -> Result<(), Fault> {
    tokio::select! {
        biased;
        r = to.writable() => r.map_err(Fault::To),
        r = from.ready(Interest::ERROR) => match r {
            Ok(ready) if ready.is_error() => {
                let error = from
                    .take_error()
                    .ok()
                    .flatten()
                    .unwrap_or_else(|| io::ErrorKind::ConnectionReset.into());
                Err(Fault::From(error))
            }
            Ok(_) => to.writable().await.map_err(Fault::To),
            Err(e) => Err(Fault::From(e)),
        },
    }
}
