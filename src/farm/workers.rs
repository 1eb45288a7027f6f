//! The workers table: each worker's state and the calls it holds, which of them run and
//! which only wait, how much room it has, and the one way to empty it.

use super::call::Call;
use crate::event::WorkerId;
use crate::options::ASYNC_CALLS_PER_WORKER;
use crate::protocol::{self, Ready};
use crate::WorkerState;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use tokio::time::Instant;

/// Hashes call ids (farm-unique sequence numbers, never chosen by a user or a child) with
/// one multiplication instead of SipHash: the table is touched twice per call.
type CallIdHash = std::hash::BuildHasherDefault<CallIdHasher>;

#[derive(Debug, Default)]
pub(crate) struct CallIdHasher(u64);

impl std::hash::Hasher for CallIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, id: u64) {
        self.0 = id.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// How a worker runs a method: sync handlers on its `threads`, async ones as they arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Sync,
    Async,
}

/// What a worker said about itself in its handshake.
#[derive(Debug, Clone)]
pub(crate) struct Caps {
    threads: usize,
    async_methods: Arc<HashSet<String>>,
}

impl Caps {
    pub(crate) fn from_ready(ready: Ready) -> Self {
        Caps {
            threads: usize::from(ready.threads.max(1)),
            async_methods: Arc::new(ready.async_methods.into_iter().collect()),
        }
    }

    fn kind_of(&self, method: &str) -> Kind {
        if !self.async_methods.is_empty() && self.async_methods.contains(method) {
            Kind::Async
        } else {
            Kind::Sync
        }
    }
}

/// A call a worker holds.
#[derive(Debug)]
struct Held {
    call: Call,
    kind: Kind,
    /// Its handler has started (so a crash or a hang may be its doing).
    started: bool,
}

/// What a worker held when it was emptied.
#[derive(Debug, Default)]
pub(crate) struct Emptied {
    /// Calls whose handlers had started.
    pub(crate) running: Vec<Call>,
    /// Calls that waited in the worker and never started.
    pub(crate) waiting: Vec<Call>,
    /// Broadcast calls not yet sent to it.
    pub(crate) pinned: Vec<Call>,
}

/// One worker.
#[derive(Debug)]
pub(crate) struct Worker<L> {
    pub(crate) id: WorkerId,
    pub(crate) link: L,
    pub(crate) state: WorkerState,
    calls: HashMap<u64, Held, CallIdHash>,
    sync_running: usize,
    sync_waiting: usize,
    async_held: usize,
    /// Broadcast calls waiting to be sent to it.
    pub(crate) pinned: VecDeque<Call>,
    /// Calls handed to it so far (what `ttl` counts; broadcasts excluded).
    pub(crate) handed: u64,
    /// Whether it was ever handed a call, broadcasts included.
    given: bool,
    caps: Option<Caps>,
    /// When its handshake completed.
    pub(crate) online_since: Option<Instant>,
    /// Whether it has answered a call (proved the binary works).
    pub(crate) answered: bool,
    /// Set when the farm stopped it as a start failure: why.
    pub(crate) start_failure: Option<String>,
    /// Its frame stream ended: it takes no calls, and counts as live until it exits (so it
    /// is replaced then, as any worker that died).
    pub(crate) closed: bool,
}

impl<L> Worker<L> {
    pub(crate) fn new(id: WorkerId, link: L) -> Self {
        Worker {
            id,
            link,
            state: WorkerState::Starting,
            calls: HashMap::default(),
            sync_running: 0,
            sync_waiting: 0,
            async_held: 0,
            pinned: VecDeque::new(),
            handed: 0,
            given: false,
            caps: None,
            online_since: None,
            answered: false,
            start_failure: None,
            closed: false,
        }
    }

    /// Starting or online: counts towards the farm's `workers`.
    pub(crate) fn is_live(&self) -> bool {
        matches!(self.state, WorkerState::Starting | WorkerState::Online)
    }

    /// Holds no call and no broadcast.
    pub(crate) fn is_drained(&self) -> bool {
        self.calls.is_empty() && self.pinned.is_empty()
    }

    pub(crate) fn held(&self) -> usize {
        self.calls.len()
    }

    /// Calls it holds that have not started.
    pub(crate) fn waiting(&self) -> usize {
        self.sync_waiting
    }

    /// Whether it was ever handed a call.
    pub(crate) fn handed_any(&self) -> bool {
        self.given
    }

    /// It completed its handshake.
    pub(crate) fn go_online(&mut self, caps: Caps) {
        self.caps = Some(caps);
        self.state = WorkerState::Online;
        self.online_since = Some(Instant::now());
    }

    fn kind_of(&self, method: &str) -> Kind {
        self.caps.as_ref().map_or(Kind::Sync, |c| c.kind_of(method))
    }

    fn threads(&self) -> usize {
        self.caps.as_ref().map_or(1, |c| c.threads)
    }

    /// Whether it can take one more call of `method` under `per_worker` (`None`: what it
    /// can run at once, see [`FarmOptions::max_concurrent_calls_per_worker`]).
    ///
    /// [`FarmOptions::max_concurrent_calls_per_worker`]: crate::FarmOptions::max_concurrent_calls_per_worker
    pub(crate) fn has_room(&self, method: &str, per_worker: Option<usize>) -> bool {
        if self.closed {
            return false;
        }
        match (per_worker, self.kind_of(method)) {
            (Some(n), _) => self.calls.len() < n,
            (None, Kind::Sync) => self.sync_running + self.sync_waiting < self.threads(),
            (None, Kind::Async) => self.async_held < ASYNC_CALLS_PER_WORKER,
        }
    }

    /// Calls it could take now, of any kind (how many to take from the queue for it).
    pub(crate) fn free_slots(&self, per_worker: Option<usize>) -> usize {
        if self.state != WorkerState::Online || self.closed {
            return 0;
        }
        match per_worker {
            Some(n) => n.saturating_sub(self.calls.len()),
            None => {
                let sync =
                    self.threads() - (self.sync_running + self.sync_waiting).min(self.threads());
                let has_async = self
                    .caps
                    .as_ref()
                    .is_some_and(|c| !c.async_methods.is_empty());
                let asyn = if has_async {
                    ASYNC_CALLS_PER_WORKER.saturating_sub(self.async_held)
                } else {
                    0
                };
                sync + asyn
            }
        }
    }

    /// Sends it `call`; whether the call starts on arrival (else it waits in the worker
    /// until the worker reports it started).
    pub(crate) fn hand(&mut self, mut call: Call) -> bool
    where
        L: super::transport::Link,
    {
        let kind = self.kind_of(call.method());
        let starts = match kind {
            Kind::Async => true,
            Kind::Sync => self.sync_running < self.threads() && self.sync_waiting == 0,
        };
        protocol::set_call_queued(&mut call.frame, !starts);
        self.link.send(&call.frame);
        match (kind, starts) {
            (Kind::Async, _) => self.async_held += 1,
            (Kind::Sync, true) => self.sync_running += 1,
            (Kind::Sync, false) => self.sync_waiting += 1,
        }
        if starts {
            call.attempts += 1;
        }
        if call.pinned.is_none() {
            self.handed += 1;
        }
        self.given = true;
        let started = starts;
        self.calls.insert(
            call.id(),
            Held {
                call,
                kind,
                started,
            },
        );
        starts
    }

    /// The worker reports that call `id` started; whether that is news.
    pub(crate) fn start(&mut self, id: u64) -> bool {
        let Some(held) = self.calls.get_mut(&id) else {
            return false;
        };
        if held.started {
            return false;
        }
        held.started = true;
        held.call.attempts += 1;
        if held.kind == Kind::Sync {
            self.sync_waiting -= 1;
            self.sync_running += 1;
        }
        true
    }

    /// Takes call `id` out (it was answered); `None` if the worker does not hold it.
    pub(crate) fn take(&mut self, id: u64) -> Option<Call> {
        let held = self.calls.remove(&id)?;
        self.forget(&held);
        Some(held.call)
    }

    fn forget(&mut self, held: &Held) {
        match (held.kind, held.started) {
            (Kind::Async, _) => self.async_held -= 1,
            (Kind::Sync, true) => self.sync_running -= 1,
            (Kind::Sync, false) => self.sync_waiting -= 1,
        }
    }

    /// Takes every call it holds, sorted into running and waiting.
    pub(crate) fn empty(&mut self) -> Emptied {
        let mut out = Emptied {
            pinned: self.pinned.drain(..).collect(),
            ..Emptied::default()
        };
        for (_, held) in self.calls.drain() {
            if held.started {
                out.running.push(held.call);
            } else {
                out.waiting.push(held.call);
            }
        }
        // Oldest first, so re-queued calls keep their order.
        out.running.sort_by_key(Call::id);
        out.waiting.sort_by_key(Call::id);
        (self.sync_running, self.sync_waiting, self.async_held) = (0, 0, 0);
        out
    }
}

/// Every worker of a farm, found by id.
#[derive(Debug)]
pub(crate) struct Workers<L> {
    list: Vec<Worker<L>>,
    index: HashMap<WorkerId, usize>,
    next_id: u64,
}

impl<L> Default for Workers<L> {
    fn default() -> Self {
        Workers {
            list: Vec::new(),
            index: HashMap::new(),
            next_id: 0,
        }
    }
}

impl<L> Workers<L> {
    pub(crate) fn new_id(&mut self) -> WorkerId {
        self.next_id += 1;
        WorkerId(std::num::NonZeroU64::MIN.saturating_add(self.next_id - 1))
    }

    pub(crate) fn add(&mut self, worker: Worker<L>) {
        self.index.insert(worker.id, self.list.len());
        self.list.push(worker);
    }

    /// Takes a worker out of the table.
    pub(crate) fn remove(&mut self, id: WorkerId) -> Option<Worker<L>> {
        let i = self.index.remove(&id)?;
        let worker = self.list.swap_remove(i);
        if let Some(moved) = self.list.get(i) {
            self.index.insert(moved.id, i);
        }
        Some(worker)
    }

    pub(crate) fn get(&mut self, id: WorkerId) -> Option<&mut Worker<L>> {
        let i = *self.index.get(&id)?;
        self.list.get_mut(i)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Worker<L>> {
        self.list.iter()
    }

    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = &mut Worker<L>> {
        self.list.iter_mut()
    }

    pub(crate) fn ids(&self) -> Vec<WorkerId> {
        self.list.iter().map(|w| w.id).collect()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Workers starting or online.
    pub(crate) fn live(&self) -> usize {
        self.list.iter().filter(|w| w.is_live()).count()
    }

    pub(crate) fn online(&self) -> usize {
        self.list
            .iter()
            .filter(|w| w.state == WorkerState::Online)
            .count()
    }

    /// The online worker with room for `method` that holds the fewest calls, avoiding
    /// `avoid` (where an earlier attempt failed) while another has room. A scan: a farm has
    /// few workers, and a scan needs no bookkeeping to keep in step.
    pub(crate) fn pick(
        &self,
        method: &str,
        avoid: Option<WorkerId>,
        per_worker: Option<usize>,
    ) -> Option<WorkerId> {
        self.list
            .iter()
            .filter(|w| w.state == WorkerState::Online && w.has_room(method, per_worker))
            .min_by_key(|w| (Some(w.id) == avoid, w.calls.len()))
            .map(|w| w.id)
    }
}
