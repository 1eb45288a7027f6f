//! The seam between the dispatcher's policies and the processes they govern.
//!
//! The dispatcher starts workers through a [`Transport`], talks to each through its
//! [`Link`] (frames out, stop, kill, pid, memory) and hears from it only through
//! [`Inbound`] messages. The pipe transport ([`pipe::Pipes`]) is the one real
//! implementation; the dispatcher's unit tests drive the same policies through a fake one,
//! with no processes and paused time.

pub(crate) mod pipe;
mod pipe_buffer;
mod spawner;
mod stderr;

use crate::error::ExitInfo;
use crate::event::WorkerId;
use crate::protocol::FromWorker;
use tokio::sync::mpsc;

/// Starts workers.
pub(crate) trait Transport: Send + 'static {
    /// The dispatcher's handle on one worker.
    type Link: Link;

    /// Starts a worker whose first frame is `hello`; what it sends comes back on `inbound`,
    /// ending with [`Inbound::Exited`].
    fn spawn(
        &mut self,
        worker: WorkerId,
        slot: usize,
        hello: &[u8],
        inbound: &mpsc::UnboundedSender<Inbound>,
    ) -> std::io::Result<Self::Link>;

    /// What to call the workers in error messages (the program's path).
    fn describe(&self) -> String;
}

/// One worker, as the dispatcher sees it. Every method returns at once.
pub(crate) trait Link: Send + 'static {
    /// Its process id (0 if it has none).
    fn pid(&self) -> u32;
    /// Queues a frame; it leaves by the next [`flush`](Self::flush) at the latest.
    fn send(&mut self, frame: &[u8]);
    /// Writes what was queued this turn.
    fn flush(&mut self);
    /// The polite stop: no more frames; the worker exits once its calls are answered.
    fn close_input(&mut self);
    /// Asks the worker to stop now (`SIGTERM`).
    fn terminate(&mut self);
    /// The worker mapped the shared memory: large frames may go through its rings from now
    /// on; returns the slot table for calls that wait in it.
    fn use_shared_memory(&mut self) -> Option<crate::shm::Slots> {
        None
    }
    /// Ends it (`SIGKILL`).
    fn kill(&mut self);
    /// Its resident memory in bytes, where that can be measured.
    fn memory(&self) -> Option<u64>;
}

/// What a worker's transport tells the dispatcher.
#[derive(Debug)]
pub(crate) enum Inbound {
    /// Messages decoded from one read, in order.
    Messages {
        worker: WorkerId,
        messages: Vec<FromWorker>,
    },
    /// The worker broke the protocol; nothing more will be read from it.
    Fault { worker: WorkerId, message: String },
    /// Its frame stream ended: it will answer nothing more, though it may still run.
    Closed { worker: WorkerId },
    /// Its stderr came faster than ours took it: this many lines were dropped.
    StderrDropped { worker: WorkerId, lines: u64 },
    /// It ended and was reaped; every message it sent was delivered before this.
    Exited {
        worker: WorkerId,
        exit: ExitInfo,
        stderr_tail: Vec<String>,
    },
}
