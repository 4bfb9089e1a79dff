//! The log's writer: lines are appended to one shared buffer and written to stderr in
//! batches by one thread, so a connection's thread never waits on stderr (a full pipe
//! to `docker logs` stalls the writer, not forwarding) and, under load, makes no system
//! call for its access-log line.
//!
//! A line is appended under a mutex that is never held across I/O. The writer sleeps on
//! a condition variable while there is nothing to write; the line that finds the buffer
//! empty wakes it (the only wake-up), and it waits [`BATCH_DELAY`] for more before it
//! writes them all at once. Up to [`MAX_PENDING`] bytes may wait; beyond that lines are
//! dropped, counted, and the count is logged once the writer catches up. Dropping the
//! [`Guard`] writes out everything pending, so a clean shutdown loses no line.

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

/// How long the writer gathers lines after the first one before it writes.
pub const BATCH_DELAY: Duration = Duration::from_millis(10);

/// Bytes of lines that may wait for a slow stderr before new ones are dropped.
pub const MAX_PENDING: usize = 2 * 1024 * 1024;

#[derive(Default)]
struct State {
    pending: Vec<u8>,
    dropped: u64,
    /// The writer is asleep on the condition variable (and must be woken).
    idle: bool,
    closing: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Where log lines go: each `write` appends one formatted line.
#[derive(Clone)]
pub struct LogWriter {
    shared: Arc<Shared>,
}

impl Write for LogWriter {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        let mut state = self.shared.lock();
        if state.pending.len() + line.len() > MAX_PENDING {
            state.dropped += 1;
            return Ok(line.len());
        }
        state.pending.extend_from_slice(line);
        let wake = state.idle;
        state.idle = false;
        drop(state);
        if wake {
            self.shared.wake.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Ends the writer thread when dropped, once everything pending is written.
pub struct Guard {
    shared: Arc<Shared>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts the writer thread writing to `out`.
pub fn start<W: Write + Send + 'static>(out: W) -> io::Result<(LogWriter, Guard)> {
    let shared = Arc::new(Shared::default());
    let writer = LogWriter {
        shared: shared.clone(),
    };
    let thread = thread::Builder::new()
        .name("ambassadord-log".into())
        .spawn({
            let shared = shared.clone();
            move || write_batches(&shared, out)
        })?;
    Ok((
        writer,
        Guard {
            shared,
            thread: Some(thread),
        },
    ))
}

fn write_batches<W: Write>(shared: &Shared, mut out: W) {
    let mut batch = Vec::new();
    loop {
        let mut state = shared.lock();
        while state.pending.is_empty() && !state.closing {
            state.idle = true;
            state = shared.wake.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        state.idle = false;
        if state.pending.is_empty() {
            return; // closing, and everything is written
        }
        if !state.closing {
            drop(state);
            thread::sleep(BATCH_DELAY);
            state = shared.lock();
        }
        std::mem::swap(&mut state.pending, &mut batch);
        let dropped = std::mem::take(&mut state.dropped);
        drop(state);
        // A write error (stderr closed) loses the batch; nothing else can be done.
        let _ = out.write_all(&batch).and_then(|()| out.flush());
        // Keep a buffer for the next batch, but not a burst's worth for ever.
        batch.clear();
        batch.shrink_to(64 * 1024);
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "log lines dropped: stderr did not keep up (more than {MAX_PENDING} bytes waited)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<(Vec<u8>, usize)>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut s = self.0.lock().unwrap();
            s.0.extend_from_slice(buf);
            s.1 += 1;
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Every line arrives, in order, and a burst goes out in few writes.
    #[test]
    fn lines_arrive_in_order_in_batches() {
        let sink = Sink::default();
        let (mut w, guard) = start(sink.clone()).unwrap();
        for i in 0..1000 {
            w.write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        drop(guard);
        let (bytes, writes) = sink.0.lock().unwrap().clone();
        let want: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        assert_eq!(String::from_utf8(bytes).unwrap(), want);
        assert!(writes < 10, "{writes} writes for 1000 lines");
    }

    /// A line written while the writer sleeps wakes it: it is out within the batch delay
    /// (allowing for a loaded machine), not only at shutdown.
    #[test]
    fn a_lone_line_is_written_without_waiting_for_more() {
        let sink = Sink::default();
        let (mut w, _guard) = start(sink.clone()).unwrap();
        thread::sleep(Duration::from_millis(50));
        w.write_all(b"alone\n").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while sink.0.lock().unwrap().0 != b"alone\n" {
            assert!(std::time::Instant::now() < deadline, "never written");
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// While the output is stuck, lines beyond the bound are dropped (not queued without
    /// end) and the writer never blocks the one writing them.
    #[test]
    fn a_stuck_output_drops_lines_beyond_the_bound() {
        struct Stuck(Arc<Mutex<()>>);
        impl Write for Stuck {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                drop(self.0.lock().unwrap());
                Ok(buf.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let gate = Arc::new(Mutex::new(()));
        let held = gate.lock().unwrap();
        let (mut w, guard) = start(Stuck(gate.clone())).unwrap();
        let line = vec![b'x'; 1024];
        for _ in 0..(3 * MAX_PENDING / 1024) {
            w.write_all(&line).unwrap();
        }
        let state = w.shared.lock();
        assert!(state.pending.len() <= MAX_PENDING);
        assert!(
            state.dropped >= (MAX_PENDING / 1024) as u64,
            "{}",
            state.dropped
        );
        drop(state);
        drop(held);
        drop(guard);
    }
}
