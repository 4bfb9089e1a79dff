//! The plain copy: read into a buffer held only while data flows, write it out. Also
//! the fallback wherever splice is refused.

use std::io;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::direction::{Fault, Tally, pass_eof, writable};

const BUF_SIZE: usize = 64 * 1024;

/// Why the plain copy returned.
pub(super) enum Flow {
    /// EOF from `from`, passed on to `to`.
    Ended,
    /// One read filled the whole buffer (asked for with `stop_on_bulk`): a bulk stream
    /// that splice moves more cheaply. Everything read so far has been written.
    Bulk,
}

/// The plain copy: read into a buffer held only while data flows, write it out.
pub(super) async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    count: &Tally<'_>,
    last_activity: &AtomicU64,
    start: Instant,
    stop_on_bulk: bool,
    ends: &AtomicU8,
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
                return pass_eof(to, ends).map(|()| Flow::Ended);
            }
            Ok(n) => {
                write_all(from, to, &buf[..n]).await?;
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

/// Writes all of `data` to `to`; while `to` is full, an error on `from` ends it.
async fn write_all(from: &TcpStream, to: &TcpStream, mut data: &[u8]) -> Result<(), Fault> {
    while !data.is_empty() {
        // Tried first: a socket known writable takes the bytes with no wait at all.
        match to.try_write(data) {
            Ok(0) => return Err(Fault::To(io::ErrorKind::WriteZero.into())),
            Ok(n) => data = &data[n..],
            // Boxed: the wait is rare on interactive traffic, and inline it would
            // enlarge every connection's future, idle ones included.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Box::pin(writable(from, to)).await?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Fault::To(e)),
        }
    }
    Ok(())
}
