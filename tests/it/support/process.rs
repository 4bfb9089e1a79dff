//! Child processes that cannot outlive the test process: servers (dockerd, etcd,
//! dnsmasq) and the binary under test.
//!
//! Each is started with a parent-death signal (`PR_SET_PDEATHSIG`), so the kernel
//! signals it when the test process ends however it ends: a normal exit (the test
//! harness exits without dropping statics, so a shared server's `Drop` never runs), a
//! panic, or SIGKILL. The kernel sends that signal when the *thread* that forked the
//! child ends, not the process, and every test runs on a thread of its own; so every
//! child is forked by one spawner thread that lives as long as the process.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::Mutex;
use std::sync::mpsc::{Sender, channel};

use nix::sys::signal::Signal;

type Request = (Command, Signal, Sender<io::Result<Child>>);

/// Starts `cmd`; the child gets `on_exit` when the test process ends. SIGKILL suits
/// servers whose state does not matter; a daemon that must clean up (dockerd stops its
/// containers) gets SIGTERM.
pub fn spawn(cmd: Command, on_exit: Signal) -> io::Result<Child> {
    static SPAWNER: Mutex<Option<Sender<Request>>> = Mutex::new(None);
    let spawner = {
        let mut guard = SPAWNER.lock().unwrap_or_else(|p| p.into_inner());
        guard.get_or_insert_with(start_spawner).clone()
    };
    let (tx, rx) = channel();
    spawner
        .send((cmd, on_exit, tx))
        .map_err(|_| io::Error::other("the spawner thread is gone"))?;
    rx.recv()
        .map_err(|_| io::Error::other("the spawner thread is gone"))?
}

fn start_spawner() -> Sender<Request> {
    let (tx, rx) = channel::<Request>();
    std::thread::Builder::new()
        .name("spawner".into())
        .spawn(move || {
            // Never returns while the process lives: `SPAWNER` keeps a sender.
            for (mut cmd, signal, reply) in rx {
                // SAFETY: between fork and exec only prctl(2) runs, which is
                // async-signal-safe; it allocates nothing and takes no lock.
                unsafe {
                    cmd.pre_exec(move || {
                        nix::sys::prctl::set_pdeathsig(signal).map_err(io::Error::from)
                    });
                }
                let _ = reply.send(cmd.spawn());
            }
        })
        .expect("start the spawner thread");
    tx
}
