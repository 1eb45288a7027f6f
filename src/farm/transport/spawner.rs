//! The two process-wide threads behind the pipe transport: one that spawns every worker,
//! and one that reaps workers whose supervising task was dropped with its runtime.

use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;
use tokio::process::{Child, Command};

type Job = Box<dyn FnOnce() + Send>;

/// Spawns `cmd` from one thread that lives as long as the process.
///
/// Linux delivers a worker's parent-death signal when the *thread* that forked it exits, not
/// the process. Runtime threads come and go (a blocking-pool thread exits after 10 s idle),
/// so forking from whichever thread runs the dispatcher could kill healthy workers. One
/// dedicated spawner thread makes the signal mean what it should: the parent process died.
pub(super) fn spawn_from_long_lived_thread(mut cmd: Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<Option<Mutex<mpsc::Sender<Job>>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("workfarm-spawner".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job();
                }
            })
            .ok()
            .map(|_| Mutex::new(tx))
    });
    let Some(spawner) = spawner else {
        // No thread could be started: spawn from here rather than not at all.
        return cmd.spawn();
    };
    let handle = tokio::runtime::Handle::current();
    let (reply_tx, reply_rx) = mpsc::sync_channel(1);
    let job: Job = Box::new(move || {
        // A panic here (say, a runtime without its I/O driver) must not kill the thread
        // every later spawn of the process depends on.
        let spawned = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _runtime = handle.enter();
            cmd.spawn()
        }))
        .unwrap_or_else(|_| {
            Err(std::io::Error::other(
                "spawning panicked: the tokio runtime needs its I/O and time drivers (enable_all)",
            ))
        });
        let _ = reply_tx.send(spawned);
    });
    let sent = spawner.lock().unwrap_or_else(|e| e.into_inner()).send(job);
    if sent.is_err() {
        return Err(std::io::Error::other("the spawner thread is gone"));
    }
    reply_rx
        .recv()
        .unwrap_or_else(|_| Err(std::io::Error::other("the spawner thread is gone")))
}

/// Takes a killed worker whose supervisor can no longer wait for it (its runtime shut down)
/// and reaps it from a thread of its own, so it does not stay a zombie.
///
/// Dropped unreaped, tokio would queue the child for the next runtime that sees a
/// `SIGCHLD`; if there is none, it is never reaped. `try_wait` needs no runtime, so the
/// thread polls it until the child has exited, then drops it.
pub(super) fn reap_killed(child: Child) {
    static REAPER: OnceLock<Option<Mutex<mpsc::Sender<Child>>>> = OnceLock::new();
    let reaper = REAPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Child>();
        std::thread::Builder::new()
            .name("workfarm-reaper".into())
            .spawn(move || reap_forever(&rx))
            .ok()
            .map(|_| Mutex::new(tx))
    });
    if let Some(tx) = reaper {
        // If the thread is gone, the child goes back to tokio's own queue when dropped.
        let _ = tx.lock().unwrap_or_else(|e| e.into_inner()).send(child);
    }
}

fn reap_forever(children: &mpsc::Receiver<Child>) {
    let mut waiting: Vec<Child> = Vec::new();
    loop {
        let next = if waiting.is_empty() {
            children.recv().map(Some).map_err(|_| ())
        } else {
            // Killed processes go within milliseconds (one in uninterruptible sleep may
            // take longer): poll, rather than block on any one of them.
            match children.recv_timeout(Duration::from_millis(10)) {
                Ok(child) => Ok(Some(child)),
                Err(mpsc::RecvTimeoutError::Timeout) => Ok(None),
                Err(mpsc::RecvTimeoutError::Disconnected) => Err(()),
            }
        };
        match next {
            Ok(Some(child)) => waiting.push(child),
            Ok(None) => {}
            Err(()) => return,
        }
        waiting.retain_mut(|child| matches!(child.try_wait(), Ok(None)));
    }
}
