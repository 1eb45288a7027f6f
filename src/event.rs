//! What [`Farm::events`](crate::Farm::events) yields: the life of each worker and of each call.

use crate::error::{CallError, ExitInfo};
use std::fmt;

/// Names one worker process for the life of its farm. A replacement gets a new id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerId(pub(crate) std::num::NonZeroU64);

impl WorkerId {
    /// The id as a number, unique within its farm.
    pub fn as_u64(self) -> u64 {
        self.0.get()
    }
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "worker #{}", self.0)
    }
}

/// Something that happened in a farm. Each event names its worker.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Event {
    /// A worker process was started (workestrator's `fork`).
    Spawned {
        /// The worker.
        worker: WorkerId,
        /// Its process id.
        pid: u32,
    },
    /// A worker finished its handshake and takes calls.
    Online {
        /// The worker.
        worker: WorkerId,
        /// Its process id, as the worker reported it.
        pid: u32,
    },
    /// A worker process ended and was reaped.
    Exited {
        /// The worker.
        worker: WorkerId,
        /// Its process id.
        pid: u32,
        /// Exit code or signal.
        exit: ExitInfo,
    },
    /// A worker was handed its `ttl`-th call; it takes no more and is replaced.
    TtlReached {
        /// The worker.
        worker: WorkerId,
    },
    /// A worker had no call in flight for `max_idle_time` and is stopped.
    IdleReached {
        /// The worker.
        worker: WorkerId,
    },
    /// A worker grew past `max_memory`; it takes no more calls and is replaced.
    MemoryLimitReached {
        /// The worker.
        worker: WorkerId,
        /// Its resident set size when measured, in bytes.
        rss: u64,
    },
    /// A worker answered a call (workestrator's `message`).
    CallDone {
        /// The worker.
        worker: WorkerId,
        /// The call's id, unique within the farm.
        call: u64,
        /// Whether the handler succeeded.
        ok: bool,
    },
    /// A worker wrote to stderr faster than the farm's own stderr took it (say, a pipe
    /// nobody reads), so that many whole lines of it were dropped rather than forwarded
    /// ([`StderrMode::Forward`](crate::StderrMode::Forward) only). Sent at most once a
    /// second per worker.
    StderrDropped {
        /// The worker.
        worker: WorkerId,
        /// Lines dropped since the last such event.
        lines: u64,
    },
    /// A call made with [`Farm::tell`](crate::Farm::tell) failed; nobody waits for it, so
    /// this is where its failure goes.
    TellFailed {
        /// The call's id.
        call: u64,
        /// The method called (empty for the default method).
        method: String,
        /// Why it failed.
        error: CallError,
    },
    /// Something went wrong with a worker: it broke the protocol, failed to start, or could
    /// not be spawned.
    Error {
        /// The worker, if one was involved.
        worker: Option<WorkerId>,
        /// What went wrong.
        error: CallError,
    },
}

impl Event {
    /// The worker this event is about.
    pub fn worker(&self) -> Option<WorkerId> {
        match self {
            Event::Spawned { worker, .. }
            | Event::Online { worker, .. }
            | Event::Exited { worker, .. }
            | Event::TtlReached { worker }
            | Event::IdleReached { worker }
            | Event::MemoryLimitReached { worker, .. }
            | Event::CallDone { worker, .. }
            | Event::StderrDropped { worker, .. } => Some(*worker),
            Event::Error { worker, .. } => *worker,
            Event::TellFailed { .. } => None,
        }
    }
}
