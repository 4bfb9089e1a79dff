//! The copy for any byte stream (TLS on either side): read, write it all, flush; at
//! EOF, shut the other side's writing down, which over TLS sends close_notify and then
//! the TCP FIN, so half-close crosses a TLS hop as it does a plain one.
//!
//! A TLS record holds at most 16 KiB of plaintext, so that is the buffer. Unlike the
//! socket copy, a generic stream has no readiness to wait on without a buffer, so a
//! TLS connection's direction keeps its buffer while it is open (rustls keeps its own
//! record buffers too).

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::direction::{Fault, Tally};

const BUF_SIZE: usize = 16 * 1024;

/// Copies `from` → `to` until EOF on `from`, then shuts down writing on `to`.
pub(super) async fn one_way<R, W>(
    from: &mut R,
    to: &mut W,
    count: &Tally<'_>,
    last_activity: &AtomicU64,
    start: Instant,
) -> Result<(), Fault>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Fault::From(e)),
        };
        if n == 0 {
            return match to.shutdown().await {
                Ok(()) => Ok(()),
                // The other side already went away entirely; nothing left to tell it.
                Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
                Err(e) => Err(Fault::To(e)),
            };
        }
        to.write_all(&buf[..n]).await.map_err(Fault::To)?;
        to.flush().await.map_err(Fault::To)?;
        count.add(n as u64);
        last_activity.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}
