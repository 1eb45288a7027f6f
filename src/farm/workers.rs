//! The workers table: each worker's state and the calls it holds, which of them run and
//! which only wait, how much room it has, and the one way to empty it.

use super::call::Call;
use super::policy::pipeline::{SYNC_CALLS_PER_WORKER, WAITING_BYTES_PER_WORKER};
use crate::event::WorkerId;
use crate::options::ASYNC_CALLS_PER_WORKER;
use crate::protocol::{self, Ready};
use crate::shm::{SlotAlloc, Slots};
use crate::WorkerState;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use tokio::time::Instant;

/// Call and worker ids are farm-chosen sequence numbers, never chosen by a user or a child
/// (nobody can aim collisions at them), and both tables are looked up several times per
/// call: FxHash, not SipHash.
type IdHash = rustc_hash::FxBuildHasher;

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
    /// Looked up for every call sent: FxHash (the names come from the user's own worker).
    async_methods: Arc<HashSet<String, rustc_hash::FxBuildHasher>>,
}

impl Caps {
    pub(crate) fn from_ready(ready: Ready) -> Self {
        Caps {
            threads: usize::from(ready.threads.max(1)),
            async_methods: Arc::new(ready.async_methods.into_iter().collect()),
        }
    }

    /// How the worker runs `method`.
    pub(crate) fn kind_of(&self, method: &str) -> Kind {
        if self.has_async() && self.async_methods.contains(method) {
            Kind::Async
        } else {
            Kind::Sync
        }
    }

    fn has_async(&self) -> bool {
        !self.async_methods.is_empty()
    }
}

/// A call a worker holds.
#[derive(Debug)]
struct Held {
    call: Call,
    kind: Kind,
    /// Its handler has started (so a crash or a hang may be its doing).
    started: bool,
    /// Its place in the worker's slot table while it waits: the farm may take it back.
    slot: Option<(u16, u32)>,
    /// When its handler started, on the statistics clock.
    since: u32,
}

impl Held {
    /// Waiting, with a place, not a broadcast, not keyed: it may be taken back to run
    /// elsewhere.
    fn movable(&self) -> bool {
        !self.started
            && self.slot.is_some()
            && self.call.pinned.is_none()
            && self.call.key().is_none()
    }
}

/// What cancelling a call a worker holds comes to.
#[derive(Debug)]
pub(crate) enum Cancelled {
    /// It had not started and was taken back: it never runs.
    Withdrawn(Call),
    /// It runs on: its reply, detached (the call stays until the worker answers, which is
    /// then discarded).
    Detached {
        reply: super::call::Reply,
        kind: Kind,
        started: bool,
        /// No other call has started on the worker.
        alone: bool,
    },
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
    /// Its place in the pool, `0..workers`, inherited by its replacement: keyed calls go
    /// by it.
    pub(crate) slot: usize,
    pub(crate) link: L,
    pub(crate) state: WorkerState,
    calls: HashMap<u64, Held, IdHash>,
    /// Sync calls held (running or waiting), of which running.
    sync_held: usize,
    sync_running: usize,
    /// Async calls held (running or waiting).
    async_held: usize,
    /// Calls held that have not started, of either kind.
    waiting: usize,
    /// Waiting calls that may be taken back (see [`Held::movable`]).
    movable: usize,
    /// Frame bytes of the calls waiting in it.
    waiting_bytes: usize,
    /// Waiting broadcast calls: they belong to this worker.
    pinned_waiting: usize,
    /// Places for waiting calls, shared with it; without them (no shared memory) nothing
    /// waits in it by default, since nothing could be taken back.
    slots: Option<SlotAlloc>,
    /// Counts calls started or finished (and the start of a wait): a stall check that sees
    /// the same count twice finds the worker stuck.
    pub(crate) progress: u64,
    /// `progress` at the last stall check.
    pub(crate) progress_checked: u64,
    /// Gave its waiting calls back for lack of progress: takes only calls that start on
    /// arrival until a stall check sees it finish calls faster than one per thread per check.
    pub(crate) stalled: bool,
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
    /// Why the farm stopped it, for the statistics.
    pub(crate) stop_reason: Option<super::stats::StopReason>,
    /// Its frame stream ended: it takes no calls, and counts as live until it exits (so it
    /// is replaced then, as any worker that died).
    pub(crate) closed: bool,
    /// Its slot backs off after a refusal: it takes no calls until the back-off ends.
    pub(crate) paused: bool,
}

impl<L> Worker<L> {
    pub(crate) fn new(id: WorkerId, slot: usize, link: L) -> Self {
        Worker {
            id,
            slot,
            link,
            state: WorkerState::Starting,
            calls: HashMap::default(),
            sync_held: 0,
            sync_running: 0,
            async_held: 0,
            waiting: 0,
            movable: 0,
            waiting_bytes: 0,
            pinned_waiting: 0,
            slots: None,
            progress: 0,
            progress_checked: 0,
            stalled: false,
            pinned: VecDeque::new(),
            handed: 0,
            given: false,
            caps: None,
            online_since: None,
            answered: false,
            start_failure: None,
            stop_reason: None,
            closed: false,
            paused: false,
        }
    }

    /// Starting or online: counts towards the farm's `workers`.
    pub(crate) fn is_live(&self) -> bool {
        matches!(self.state, WorkerState::Starting | WorkerState::Online)
    }

    /// Holds no call and no broadcast anyone still waits for.
    pub(crate) fn is_drained(&self) -> bool {
        self.calls.is_empty() && self.pinned.iter().all(|c| c.reply.is_closed())
    }

    pub(crate) fn held(&self) -> usize {
        self.calls.len()
    }

    /// Whether a caller waits for a call it holds (broadcasts included).
    pub(crate) fn awaited(&self) -> bool {
        self.calls.values().any(|h| !h.call.reply.is_closed())
            || self.pinned.iter().any(|c| !c.reply.is_closed())
    }

    /// Calls it holds that have not started.
    pub(crate) fn waiting(&self) -> usize {
        self.waiting
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

    pub(crate) fn caps(&self) -> Option<&Caps> {
        self.caps.as_ref()
    }

    pub(crate) fn threads(&self) -> usize {
        self.caps.as_ref().map_or(1, |c| c.threads)
    }

    /// It shares a slot table: calls may wait in it and be taken back.
    pub(crate) fn share_slots(&mut self, slots: Slots) {
        self.slots = Some(SlotAlloc::new(slots));
    }

    /// Whether it can take one more call of `kind` under `per_worker` (`None`: what it
    /// can run at once, see [`FarmOptions::max_concurrent_calls_per_worker`]).
    ///
    /// [`FarmOptions::max_concurrent_calls_per_worker`]: crate::FarmOptions::max_concurrent_calls_per_worker
    pub(crate) fn has_room(&self, kind: Kind, per_worker: Option<usize>) -> bool {
        if self.closed || self.paused || (self.stalled && !self.starts_on_arrival(kind)) {
            return false;
        }
        match (per_worker, kind) {
            (Some(n), _) => self.calls.len() < n,
            (None, Kind::Sync) => self.sync_held < self.sync_limit(),
            (None, Kind::Async) => self.async_held < ASYNC_CALLS_PER_WORKER,
        }
    }

    /// Sync calls it may hold by default: its threads, plus waiting ones if they can be
    /// taken back and it is not stalled.
    fn sync_limit(&self) -> usize {
        if self.stalled || self.slots.is_none() {
            self.threads()
        } else {
            self.threads().max(SYNC_CALLS_PER_WORKER)
        }
    }

    /// Sync calls it can hold at once when idle: what a map keeps in flight per worker.
    pub(crate) fn capacity(&self, per_worker: Option<usize>) -> usize {
        per_worker.unwrap_or_else(|| self.sync_limit())
    }

    /// Threads with no sync call running or waiting for them.
    pub(crate) fn free_threads(&self) -> usize {
        if self.state != WorkerState::Online || self.closed || self.paused {
            return 0;
        }
        self.threads().saturating_sub(self.sync_held)
    }

    /// Waiting calls that may be taken back.
    pub(crate) fn withdrawable(&self) -> usize {
        self.movable
    }

    /// Broadcast calls waiting for it, in the farm or inside it.
    pub(crate) fn broadcasts_waiting(&self) -> usize {
        self.pinned.len() + self.pinned_waiting
    }

    /// Takes back waiting call `id` if the worker has not started it; else marks it as
    /// started-to-be (its Started is on the way) and leaves it.
    fn withdraw(&mut self, id: u64) -> Option<Call> {
        let held = self.calls.get_mut(&id)?;
        let (slot, generation) = held.slot?;
        let taken = self
            .slots
            .as_ref()
            .is_some_and(|slots| slots.withdraw(slot, generation));
        if !taken {
            // Too late: it started; its Started is on the way.
            if held.movable() {
                self.movable = self.movable.saturating_sub(1);
            }
            held.slot = None;
            if let Some(slots) = &mut self.slots {
                slots.give_back(slot);
            }
            return None;
        }
        let held = self.calls.remove(&id)?;
        self.forget(&held);
        if held.call.pinned.is_none() {
            // It never ran here: `ttl` and the status do not count it.
            self.handed = self.handed.saturating_sub(1);
        }
        Some(held.call)
    }

    /// Takes back its newest waiting call that may be taken back.
    pub(crate) fn withdraw_newest(&mut self) -> Option<Call> {
        loop {
            let id = self
                .calls
                .values()
                .filter(|h| h.movable())
                .map(|h| h.call.id())
                .max()?;
            if let Some(call) = self.withdraw(id) {
                return Some(call);
            }
        }
    }

    /// Takes back the waiting calls whose callers have gone, broadcasts included, so they
    /// never run.
    pub(crate) fn withdraw_abandoned(&mut self) -> Vec<Call> {
        let ids: Vec<u64> = self
            .calls
            .values()
            .filter(|h| !h.started && h.slot.is_some() && h.call.reply.is_closed())
            .map(|h| h.call.id())
            .collect();
        ids.into_iter().filter_map(|id| self.withdraw(id)).collect()
    }

    /// It made no progress over a stall check: marks it stalled and takes back every
    /// waiting call it can, oldest first.
    pub(crate) fn stall(&mut self) -> Vec<Call> {
        self.stalled = true;
        let mut calls = Vec::new();
        while let Some(call) = self.withdraw_newest() {
            calls.push(call);
        }
        calls.reverse();
        calls
    }

    /// Calls it could take now, of any kind (how many to take from the queue for it).
    pub(crate) fn free_slots(&self, per_worker: Option<usize>) -> usize {
        if self.state != WorkerState::Online || self.closed || self.paused {
            return 0;
        }
        match per_worker {
            Some(n) if self.stalled => {
                (n.saturating_sub(self.calls.len())).min(self.free_threads())
            }
            Some(n) => n.saturating_sub(self.calls.len()),
            None => {
                let sync = self.sync_limit().saturating_sub(self.sync_held);
                let has_async = self.caps.as_ref().is_some_and(Caps::has_async);
                let asyn = if has_async {
                    ASYNC_CALLS_PER_WORKER.saturating_sub(self.async_held)
                } else {
                    0
                };
                sync + asyn
            }
        }
    }

    /// Whether a call of `kind` sent now starts on arrival. A worker with one thread runs
    /// its sync handlers on the thread that reads, so while one runs (or sync calls wait
    /// ahead in its input) nothing it is sent starts, async calls included; with more
    /// threads it reads all the time, and async calls start as they arrive.
    pub(crate) fn starts_on_arrival(&self, kind: Kind) -> bool {
        let threads = self.threads();
        match kind {
            Kind::Sync => self.sync_running < threads && self.waiting_sync() == 0,
            Kind::Async => threads > 1 || self.sync_held == 0,
        }
    }

    /// Sync calls held that have not started.
    fn waiting_sync(&self) -> usize {
        self.sync_held.saturating_sub(self.sync_running)
    }

    /// Sends it `call`, a call of `kind`; whether the call starts on arrival (else it waits
    /// in the worker until the worker reports it started).
    pub(crate) fn hand(&mut self, mut call: Call, kind: Kind, now: u32) -> bool
    where
        L: super::transport::Link,
    {
        let starts = self.starts_on_arrival(kind);
        if let Some(retry) = &mut call.retry {
            retry.withdrawn = false;
        }
        if let Some(opts) = call.opts.as_mut().filter(|o| starts && o.made.is_some()) {
            opts.started = Some(std::time::Instant::now());
        }
        protocol::set_call_queued(&mut call.frame, !starts);
        let slot = if starts {
            None
        } else {
            self.slots.as_mut().and_then(SlotAlloc::take)
        };
        if let Some((slot, generation)) = slot {
            self.link.send(&slot_frame(slot, generation));
        }
        self.link.send(&call.frame);
        match kind {
            Kind::Sync => self.sync_held += 1,
            Kind::Async => self.async_held += 1,
        }
        if starts {
            self.count_start(kind);
            call.attempts = call.attempts.saturating_add(1);
        } else {
            if self.waiting == 0 {
                // A wait begins: the stall clock starts from here, not from its last call.
                self.progress += 1;
            }
            self.waiting += 1;
            self.waiting_bytes += call.frame.len();
            if call.pinned.is_some() {
                self.pinned_waiting += 1;
            }
        }
        if call.pinned.is_none() {
            self.handed += 1;
        }
        self.given = true;
        let held = Held {
            call,
            kind,
            started: starts,
            slot,
            since: now,
        };
        // Counted by the same test that uncounts it (`start`, `forget`, `withdraw`).
        if held.movable() {
            self.movable += 1;
        }
        self.calls.insert(held.call.id(), held);
        starts
    }

    fn count_start(&mut self, kind: Kind) {
        if kind == Kind::Sync {
            self.sync_running += 1;
        }
    }

    /// The worker reports that call `id` started (`now`, on the statistics clock): the call,
    /// if that is news.
    pub(crate) fn start(&mut self, id: u64, now: u32) -> Option<&Call> {
        let held = self.calls.get_mut(&id)?;
        if held.started {
            return None;
        }
        held.since = now;
        if held.movable() {
            self.movable = self.movable.saturating_sub(1);
        }
        held.started = true;
        self.waiting_bytes = self.waiting_bytes.saturating_sub(held.call.frame.len());
        if held.call.pinned.is_some() {
            self.pinned_waiting = self.pinned_waiting.saturating_sub(1);
        }
        // The worker looks at a place once, to start the call: it is free again.
        if let (Some((slot, _)), Some(slots)) = (held.slot.take(), &mut self.slots) {
            slots.give_back(slot);
        }
        self.progress += 1;
        held.call.attempts = held.call.attempts.saturating_add(1);
        if let Some(opts) = held.call.opts.as_mut().filter(|o| o.made.is_some()) {
            opts.started = Some(std::time::Instant::now());
        }
        let kind = held.kind;
        self.waiting = self.waiting.saturating_sub(1);
        self.count_start(kind);
        self.calls.get(&id).map(|held| &held.call)
    }

    /// Whether call `id`'s handler has started here.
    pub(crate) fn is_started(&self, id: u64) -> bool {
        self.calls.get(&id).is_some_and(|h| h.started)
    }

    /// The call `id`, if it holds it.
    pub(crate) fn call(&self, id: u64) -> Option<&Call> {
        self.calls.get(&id).map(|h| &h.call)
    }

    /// The caller cancelled call `id`: takes it back if it waits and can be, else detaches
    /// its reply. `None` if it does not hold it.
    pub(crate) fn cancel(&mut self, id: u64) -> Option<Cancelled> {
        let held = self.calls.get(&id)?;
        if !held.started && held.slot.is_some() {
            if let Some(call) = self.withdraw(id) {
                return Some(Cancelled::Withdrawn(call));
            }
        }
        let others_started = self.calls.values().any(|h| h.started && h.call.id() != id);
        let held = self.calls.get_mut(&id)?;
        if let Some(opts) = &mut held.call.opts {
            opts.cancelled = true;
        }
        Some(Cancelled::Detached {
            reply: std::mem::replace(&mut held.call.reply, super::call::Reply::detached()),
            kind: held.kind,
            started: held.started,
            alone: !others_started,
        })
    }

    /// Takes call `id` out (it was answered); `None` if the worker does not hold it. A call
    /// answered without a `Started` ran all the same (say, its arguments did not decode):
    /// that counts as an attempt.
    pub(crate) fn take(&mut self, id: u64) -> Option<Call> {
        self.take_timed(id).map(|(call, _)| call)
    }

    /// As [`take`](Self::take), with when its handler started (statistics clock).
    pub(crate) fn take_timed(&mut self, id: u64) -> Option<(Call, u32)> {
        let held = self.calls.remove(&id)?;
        self.forget(&held);
        self.progress += 1;
        let mut call = held.call;
        if !held.started {
            call.attempts = call.attempts.saturating_add(1);
        }
        Some((call, held.since))
    }

    /// Uncounts a call taken out. The counts match the table by construction; saturating
    /// anyway, so a slip could never panic on the farm's task.
    fn forget(&mut self, held: &Held) {
        let held_of_kind = match held.kind {
            Kind::Sync => &mut self.sync_held,
            Kind::Async => &mut self.async_held,
        };
        *held_of_kind = held_of_kind.saturating_sub(1);
        if let (Some((slot, _)), Some(slots)) = (held.slot, &mut self.slots) {
            // A new generation marks its next use: a late look at this one backs off.
            slots.give_back(slot);
        }
        if !held.started {
            if held.movable() {
                self.movable = self.movable.saturating_sub(1);
            }
            self.waiting = self.waiting.saturating_sub(1);
            self.waiting_bytes = self.waiting_bytes.saturating_sub(held.call.frame.len());
            if held.call.pinned.is_some() {
                self.pinned_waiting = self.pinned_waiting.saturating_sub(1);
            }
        } else if held.kind == Kind::Sync {
            self.sync_running = self.sync_running.saturating_sub(1);
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
        (
            self.sync_held,
            self.sync_running,
            self.async_held,
            self.waiting,
            self.movable,
            self.pinned_waiting,
        ) = (0, 0, 0, 0, 0, 0);
        self.waiting_bytes = 0;
        self.stalled = false;
        out
    }
}

/// A framed Slot message: the next queued call waits in this place.
fn slot_frame(slot: u16, generation: u32) -> [u8; 11] {
    let mut out = Vec::with_capacity(11);
    let start = crate::protocol::frame::begin(&mut out);
    protocol::encode_slot(slot, generation, &mut out);
    // Cannot fail: 7 bytes fit any cap.
    let _ = crate::protocol::frame::finish(&mut out, start, usize::MAX);
    out.try_into().unwrap_or([0; 11])
}

/// Every worker of a farm, found by id.
#[derive(Debug)]
pub(crate) struct Workers<L> {
    list: Vec<Worker<L>>,
    index: HashMap<WorkerId, usize, IdHash>,
    next_id: u64,
    caps: Option<Caps>,
}

impl<L> Default for Workers<L> {
    fn default() -> Self {
        Workers {
            list: Vec::new(),
            index: HashMap::default(),
            next_id: 0,
            caps: None,
        }
    }
}

impl<L> Workers<L> {
    /// A new id, for a worker in pool slot `slot`.
    pub(crate) fn new_id(&mut self, slot: usize) -> WorkerId {
        self.next_id += 1;
        WorkerId::new(
            std::num::NonZeroU64::MIN.saturating_add(self.next_id - 1),
            slot,
        )
    }

    /// The lowest of the `slots` pool slots that no live worker holds and `usable` allows: a
    /// replacement takes its predecessor's.
    pub(crate) fn free_slot(&self, slots: usize, usable: impl Fn(usize) -> bool) -> Option<usize> {
        (0..slots).find(|&slot| usable(slot) && self.in_slot(slot).is_none())
    }

    /// Workers still starting.
    pub(crate) fn starting(&self) -> usize {
        self.list
            .iter()
            .filter(|w| w.state == WorkerState::Starting)
            .count()
    }

    /// The live worker in pool slot `slot`.
    pub(crate) fn in_slot(&self, slot: usize) -> Option<&Worker<L>> {
        self.list.iter().find(|w| w.is_live() && w.slot == slot)
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

    /// How the farm's workers run `method`, by the handshake of the latest worker online
    /// (every worker of a farm runs the same binary). Sync until one is online.
    pub(crate) fn kind_of(&self, method: &str) -> Kind {
        self.caps.as_ref().map_or(Kind::Sync, |c| c.kind_of(method))
    }

    /// Whether the workers have async methods at all.
    pub(crate) fn any_async(&self) -> bool {
        self.caps.as_ref().is_some_and(Caps::has_async)
    }

    /// Records what a worker said in its handshake, for [`kind_of`](Self::kind_of).
    pub(crate) fn learn(&mut self, caps: &Caps) {
        self.caps = Some(caps.clone());
    }

    /// The worker in pool slot `slot`, if it is online and has room for keyed `call`.
    pub(crate) fn pick_keyed(
        &self,
        call: &Call,
        kind: Kind,
        per_worker: Option<usize>,
        slot: usize,
    ) -> Option<WorkerId> {
        let w = self.in_slot(slot)?;
        let fits = w.state == WorkerState::Online
            && w.has_room(kind, per_worker)
            && (w.starts_on_arrival(kind)
                || w.waiting_bytes + call.frame.len() <= WAITING_BYTES_PER_WORKER);
        fits.then_some(w.id)
    }

    /// The online worker with room for `call` (of `kind`) that holds the fewest calls,
    /// avoiding the worker where its last attempt failed while another has room. A scan: a
    /// farm has few workers, and a scan needs no bookkeeping to keep in step.
    pub(crate) fn pick(
        &self,
        call: &Call,
        kind: Kind,
        per_worker: Option<usize>,
        share: Option<usize>,
    ) -> Option<WorkerId> {
        let (avoid, withdrawn) = (call.avoid(), call.was_withdrawn());
        self.list
            .iter()
            .filter(|w| w.state == WorkerState::Online && w.has_room(kind, per_worker))
            // Refused "not here" by this slot.
            .filter(|w| !call.not_here(w.slot))
            // Taken back to start sooner: it goes where it starts at once, never to wait again.
            .filter(|w| !withdrawn || w.starts_on_arrival(kind))
            // Large calls wait a few at a time: more would gain nothing and fill memory.
            .filter(|w| {
                w.starts_on_arrival(kind)
                    || w.waiting_bytes + call.frame.len() <= WAITING_BYTES_PER_WORKER
            })
            .filter(|w| share.map_or(true, |share| w.calls.len() < share))
            .min_by_key(|w| (Some(w.id) == avoid, w.calls.len()))
            .map(|w| w.id)
    }

    /// While workers are still starting, the most calls one online worker should hold: an
    /// even share of the calls waiting and held among every worker starting or online, so
    /// the first worker to finish its handshake does not take the whole queue (calls never
    /// move once handed). `None` when no worker is starting.
    pub(crate) fn startup_share(&self, queued: usize) -> Option<usize> {
        let (mut starting, mut online, mut held) = (0, 0, 0);
        for w in &self.list {
            match w.state {
                WorkerState::Starting => starting += 1,
                WorkerState::Online => {
                    online += 1;
                    held += w.calls.len();
                }
                _ => {}
            }
        }
        (starting > 0).then(|| (queued + held).div_ceil(starting + online).max(1))
    }
}
