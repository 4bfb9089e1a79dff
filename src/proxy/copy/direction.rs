//! What one direction of a copy reports, whichever strategy moves its bytes (the
//! plain copy in `plain.rs`, splice in `splice.rs`): which side an error came from, and
//! the bytes moved so far.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::metrics::counter::Counter;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// The shared counter one direction adds its bytes to as they move (the backend's
/// series), so a long transfer shows in /metrics and /routes while it runs, not only
/// once it closes.
pub type Live<'a> = Option<&'a Counter>;

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
