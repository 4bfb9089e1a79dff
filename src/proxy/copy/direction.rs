//! What one direction of a copy reports, whichever strategy moves its bytes (the
//! plain copy in `plain.rs`, splice in `splice.rs`): which side an error came from, and
//! the bytes moved so far.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::metrics::counter::Counter;

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
