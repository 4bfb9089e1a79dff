//! The data threads: one single-threaded tokio runtime per thread, each accepting on its
//! own SO_REUSEPORT socket of every route and running those connections to the end on
//! that thread, so the data path has no work stealing and no cross-thread wake-ups.
//!
//! Discovery, the admin endpoint, signals and reloads stay on the caller's (control)
//! runtime. The data threads only read what it publishes: watch receivers, balancers,
//! routes and metrics, all of which work across runtimes.

use std::io;
use std::thread;

use tokio::runtime::{Builder, Handle};
use tokio_util::sync::CancellationToken;

/// The running data threads.
pub struct Workers {
    handles: Vec<Handle>,
    threads: Vec<thread::JoinHandle<()>>,
    /// Ends every thread's runtime (and with it whatever still runs there).
    stop: CancellationToken,
}

impl Workers {
    /// The default number of data threads: one per CPU this process may use.
    pub fn default_count() -> usize {
        thread::available_parallelism().map_or(1, |n| n.get())
    }

    /// Starts `count` data threads (at least one).
    pub fn start(count: usize) -> io::Result<Workers> {
        let stop = CancellationToken::new();
        let mut workers = Workers {
            handles: Vec::with_capacity(count),
            threads: Vec::with_capacity(count),
            stop: stop.clone(),
        };
        for i in 0..count.max(1) {
            let runtime = Builder::new_current_thread().enable_all().build()?;
            let handle = runtime.handle().clone();
            let stop = stop.clone();
            let thread = thread::Builder::new()
                .name(format!("ambd-data-{i}"))
                // A current-thread runtime runs its tasks only while block_on drives it.
                .spawn(move || runtime.block_on(stop.cancelled()))?;
            workers.handles.push(handle);
            workers.threads.push(thread);
        }
        Ok(workers)
    }

    /// One handle per data thread, to spawn its accept loops on.
    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Stops every data thread and waits for them to end. Call once the connections
    /// have drained: whatever still runs on a data thread is dropped.
    pub async fn stop(mut self) {
        self.stop.cancel();
        let threads = std::mem::take(&mut self.threads);
        let joined = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        });
        let _ = joined.await;
    }
}

impl Drop for Workers {
    /// A server dropped without running (or a failed start) leaves no thread behind.
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
