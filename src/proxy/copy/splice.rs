//! Zero-copy forwarding on Linux: splice(2) from one socket into a pipe and from the pipe
//! into the other socket, so the payload never crosses into user space.
//!
//! A direction borrows a pipe from a small process-wide pool only while data is flowing:
//! it takes one when its socket turns readable and gives it back as soon as a read would
//! block with the pipe empty, so an idle connection holds no pipe (two descriptors and up
//! to 64 KiB of kernel pages each). A pipe that still holds bytes when its direction is
//! dropped (error, idle timeout, shutdown) is closed, never pooled, so no stale bytes can
//! leak into another connection. SPLICE_F_MORE is never set: interactive streams must not
//! wait for more data that may never come.
//!
//! Safe wrappers from `nix` do the system calls, so the crate stays free of unsafe code.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};

use nix::errno::Errno;
use nix::fcntl::{OFlag, SpliceFFlags, splice};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::direction::{Fault, Tally, pass_eof, writable};

/// The most a single splice moves; a default pipe holds 16 pages (64 KiB).
const CHUNK: usize = 64 * 1024;
/// Empty pipes kept for reuse; beyond this, returned pipes are closed.
const POOL_MAX: usize = 64;

static POOL: Mutex<Vec<(OwnedFd, OwnedFd)>> = Mutex::new(Vec::new());
static LENT: AtomicUsize = AtomicUsize::new(0);

/// Pipes currently borrowed by a flowing direction (for tests and diagnostics).
pub fn pipes_lent() -> usize {
    LENT.load(Ordering::Relaxed)
}

/// Empty pipes waiting in the pool.
pub fn pipes_pooled() -> usize {
    POOL.lock().map(|p| p.len()).unwrap_or(0)
}

/// A pipe on loan from the pool, with the number of bytes it holds.
struct Pipe {
    fds: Option<(OwnedFd, OwnedFd)>,
    held: usize,
}

impl Pipe {
    fn take() -> io::Result<Pipe> {
        let pooled = POOL.lock().ok().and_then(|mut p| p.pop());
        let fds = match pooled {
            Some(fds) => fds,
            None => nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?,
        };
        LENT.fetch_add(1, Ordering::Relaxed);
        Ok(Pipe {
            fds: Some(fds),
            held: 0,
        })
    }

    fn read_end(&self) -> &OwnedFd {
        &self
            .fds
            .as_ref()
            .expect("a lent pipe has its descriptors")
            .0
    }

    fn write_end(&self) -> &OwnedFd {
        &self
            .fds
            .as_ref()
            .expect("a lent pipe has its descriptors")
            .1
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        LENT.fetch_sub(1, Ordering::Relaxed);
        let Some(fds) = self.fds.take() else { return };
        // Only an empty pipe may serve another connection; one with bytes left is closed.
        if self.held == 0
            && let Ok(mut pool) = POOL.lock()
            && pool.len() < POOL_MAX
        {
            pool.push(fds);
        }
    }
}

/// How a spliced direction ended.
pub(super) enum Spliced {
    Done(Result<(), Fault>),
    /// This kernel or socket cannot splice; nothing is left in flight, so the caller may
    /// carry on with the plain copy.
    Unsupported,
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP)
    )
}

/// Copies `from` → `to` with splice until EOF on `from`, then shuts down writing on `to`.
pub(super) async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    count: &Tally<'_>,
    last_activity: &AtomicU64,
    start: Instant,
    ends: &AtomicU8,
) -> Spliced {
    let mut pipe: Option<Pipe> = None;
    loop {
        if let Err(e) = from.readable().await {
            return Spliced::Done(Err(Fault::From(e)));
        }
        let p = match &mut pipe {
            Some(p) => p,
            None => match Pipe::take() {
                Ok(p) => pipe.insert(p),
                // Out of descriptors for a pipe: the plain copy needs none.
                Err(_) => return Spliced::Unsupported,
            },
        };
        // The pipe is always empty here, so EAGAIN can only mean the socket is drained.
        let read = from.try_io(Interest::READABLE, || {
            splice(
                from.as_fd(),
                None,
                p.write_end(),
                None,
                CHUNK,
                SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
            )
            .map_err(io::Error::from)
        });
        match read {
            Ok(0) => {
                // Half-close: pass the EOF on and let the other direction run on.
                return Spliced::Done(pass_eof(to, ends));
            }
            Ok(n) => {
                p.held = n;
                if let Err(fault) = drain(p, from, to).await {
                    return Spliced::Done(Err(fault));
                }
                count.add(n as u64);
                last_activity.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
            }
            // Drained for now: the pipe is empty, give it back while the direction is quiet.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => pipe = None,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if unsupported(&e) => return Spliced::Unsupported,
            Err(e) => return Spliced::Done(Err(Fault::From(e))),
        }
    }
}

/// Moves everything the pipe holds into `to`; while `to` is full, an error on `from`
/// ends it.
async fn drain(p: &mut Pipe, from: &TcpStream, to: &TcpStream) -> Result<(), Fault> {
    while p.held > 0 {
        // Tried first (no system call while the socket is not known writable); the
        // pipe holds bytes, so EAGAIN can only mean the socket's send buffer is full.
        let wrote = to.try_io(Interest::WRITABLE, || {
            splice(
                p.read_end(),
                None,
                to.as_fd(),
                None,
                p.held,
                SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
            )
            .map_err(io::Error::from)
        });
        match wrote {
            Ok(0) => return Err(Fault::To(io::ErrorKind::WriteZero.into())),
            Ok(n) => p.held -= n,
            // Boxed, as in the plain copy: inline it would enlarge every connection.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Box::pin(writable(from, to)).await?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Fault::To(e)),
        }
    }
    Ok(())
}
