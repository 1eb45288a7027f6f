//! What [`Farm::events`](crate::Farm::events) yields: the life of each worker and of each call.

use crate::error::{CallError, ExitInfo};
use std::fmt;

/// Names one worker process for the life of its farm, and the pool slot it serves. A
/// replacement gets a new id and inherits the slot of the worker it replaces. On a farm
/// made with `Farm::connect` (feature `redis`), it also names the node the worker runs on
/// ([`node`](Self::node)).
///
/// Ids compare, order and hash by their number alone (it is unique within the farm).
#[derive(Debug, Clone, Copy)]
pub struct WorkerId(std::num::NonZeroU64);

/// The id takes the low 48 bits, the slot the high 16 (slots are at most 4096): one word,
/// so a call that names its worker stays small.
const ID_BITS: u32 = 48;

impl WorkerId {
    pub(crate) fn new(n: std::num::NonZeroU64, slot: usize) -> Self {
        let slot = (slot as u64).min(u64::from(u16::MAX)) << ID_BITS;
        WorkerId(n | slot)
    }

    /// The id as a number, unique within its farm.
    pub fn as_u64(self) -> u64 {
        self.0.get() & ((1 << ID_BITS) - 1)
    }

    /// Its pool slot, `0..workers`: what [`Worker::slot`](crate::worker::Worker::slot)
    /// says inside the process, and what `FarmOptions::per_worker` configures. On a remote
    /// farm, the worker's slot on its node.
    pub fn slot(self) -> usize {
        (self.0.get() >> ID_BITS) as usize
    }

    /// The node this worker runs on, for a farm made with `Farm::connect`; `None` for a
    /// local farm's workers.
    pub fn node(self) -> Option<std::sync::Arc<str>> {
        let n = self.as_u64();
        if n & REMOTE == 0 {
            return None;
        }
        nodes::name((n >> NODE_SHIFT) & NODE_MASK)
    }

    /// Worker `slot` of node `node`, as a remote farm names it: the same node and slot
    /// give the same id in this process.
    #[cfg(feature = "redis")]
    pub(crate) fn remote(node: &str, slot: usize) -> Self {
        let index = nodes::index(node);
        // The slot is in the id too, so two workers of one node differ as ids.
        let low = (slot as u64) & ((1 << NODE_SHIFT) - 1);
        let n = REMOTE | (index << NODE_SHIFT) | low;
        WorkerId::new(std::num::NonZeroU64::MIN.saturating_add(n - 1), slot)
    }
}

/// A remote worker's id has this bit set, the index of its node's name in [`nodes`] in
/// the bits above [`NODE_SHIFT`], and its slot below.
const REMOTE: u64 = 1 << (ID_BITS - 1);
const NODE_SHIFT: u32 = 16;
const NODE_MASK: u64 = (1 << (ID_BITS - 1 - NODE_SHIFT)) - 1;

/// The names of the nodes this process has seen, so a [`WorkerId`] stays one word.
mod nodes {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};

    #[derive(Default)]
    struct Names {
        #[cfg_attr(not(feature = "redis"), allow(dead_code))]
        index: HashMap<Arc<str>, u64>,
        names: Vec<Arc<str>>,
    }

    fn names() -> std::sync::MutexGuard<'static, Names> {
        static NAMES: OnceLock<Mutex<Names>> = OnceLock::new();
        NAMES
            .get_or_init(Mutex::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The index of `node` (index 0 names no node: the table is full, after 2^31 names).
    #[cfg(feature = "redis")]
    pub(super) fn index(node: &str) -> u64 {
        let mut names = names();
        if let Some(&i) = names.index.get(node) {
            return i;
        }
        if names.names.is_empty() {
            names.names.push(Arc::from(""));
        }
        let i = names.names.len() as u64;
        if i > super::NODE_MASK {
            return 0;
        }
        let name: Arc<str> = Arc::from(node);
        names.names.push(name.clone());
        names.index.insert(name, i);
        i
    }

    pub(super) fn name(index: u64) -> Option<Arc<str>> {
        let names = names();
        names
            .names
            .get(usize::try_from(index).ok()?)
            .filter(|n| !n.is_empty())
            .cloned()
    }
}

impl PartialEq for WorkerId {
    fn eq(&self, other: &Self) -> bool {
        self.as_u64() == other.as_u64()
    }
}

impl Eq for WorkerId {}

impl std::hash::Hash for WorkerId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_u64().hash(state);
    }
}

impl PartialOrd for WorkerId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for WorkerId {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_u64().cmp(&other.as_u64())
    }
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.node() {
            Some(node) => write!(f, "worker (slot {}) of node {node}", self.slot()),
            None => write!(f, "worker #{} (slot {})", self.as_u64(), self.slot()),
        }
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
    /// A worker refused a call with a back-off ([`Refuse::retry_after`]): its slot takes no
    /// calls for `backoff`. Sent when a back-off begins, not for each refusal during it.
    ///
    /// [`Refuse::retry_after`]: crate::worker::Refuse::retry_after
    BackingOff {
        /// The worker.
        worker: WorkerId,
        /// How long its slot takes no calls.
        backoff: std::time::Duration,
    },
    /// A slot's workers crashed too often ([`FarmOptions::quarantine`]): no worker is
    /// started in it for `backoff`.
    ///
    /// [`FarmOptions::quarantine`]: crate::FarmOptions::quarantine
    Quarantined {
        /// The pool slot.
        slot: usize,
        /// Crashes within the window.
        crashes: u32,
        /// How long it is sidelined.
        backoff: std::time::Duration,
        /// How its last worker ended.
        last_exit: Option<ExitInfo>,
    },
    /// A quarantined slot's back-off ended: a worker is started in it again.
    Released {
        /// The pool slot.
        slot: usize,
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
    /// A node began serving a farm made with `Farm::connect` (its liveness key appeared;
    /// seen within a second, once someone subscribed to events).
    NodeJoined {
        /// Its name, as in [`WorkerId::node`].
        node: String,
        /// Its workers.
        workers: usize,
    },
    /// A node stopped serving a remote farm: it left gracefully, or its liveness key
    /// expired (it died, froze or was cut off; its calls go to other nodes).
    NodeLeft {
        /// Its name.
        node: String,
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
            | Event::BackingOff { worker, .. }
            | Event::StderrDropped { worker, .. } => Some(*worker),
            Event::Error { worker, .. } => *worker,
            Event::TellFailed { .. }
            | Event::Quarantined { .. }
            | Event::Released { .. }
            | Event::NodeJoined { .. }
            | Event::NodeLeft { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_carries_its_slot_and_compares_by_number() {
        let n = std::num::NonZeroU64::new(7).unwrap();
        let id = WorkerId::new(n, 4095);
        assert_eq!((id.as_u64(), id.slot()), (7, 4095));
        assert_eq!(id, WorkerId::new(n, 0));
        assert_eq!(id.to_string(), "worker #7 (slot 4095)");
        assert_eq!(std::mem::size_of::<Option<WorkerId>>(), 8);
    }
}
