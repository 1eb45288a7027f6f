//! The one task that owns a farm's state.
//!
//! Callers send calls and [`Command`]s; workers' transports send [`Inbound`] messages;
//! timers fire. The dispatcher reacts to each in order and never awaits anything else. It
//! holds the workers table and the queue, asks the policies (`policy/`) what each event
//! means, and applies their verdicts: hand a call to a worker, re-queue it (charged or
//! free), settle it, stop a worker, spawn one, arm a timer.

use super::call::{Answer, Call, CallInfo, Outcome, Reply};
use super::policy::elastic::Bounds;
use super::policy::pipeline;
use super::policy::quarantine::Quarantine;
use super::policy::recycle::RecyclePolicy;
use super::policy::refusal::{self, Backoffs};
use super::policy::retry::{Attempt, RetryPolicy, Verdict};
use super::policy::startup::{self, Ending, Startup};
use super::policy::timers::{Timer, Timers};
use super::stats::{Book, Ended, StopReason};
use super::transport::{Inbound, Link, Transport};
use super::workers::{Cancelled, Caps, Emptied, Kind, Worker, Workers};
use super::Load;
use crate::error::{CallError, ExitInfo, Refusal};
use crate::event::{Event, WorkerId};
use crate::options::Settings;
use crate::protocol::{FailureKind, FromWorker, Ready, PROTOCOL_VERSION};
use crate::{Status, WorkerState, WorkerStatus};
use bytes::Bytes;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;

/// How often workers' memory is measured when `max_memory` is set.
const MEMORY_CHECK_INTERVAL: Duration = Duration::from_millis(500);
/// How often an orphaned farm looks for callers that gave up without a word.
const ORPHAN_CHECK: Duration = Duration::from_millis(100);
/// Broadcast calls that may wait for one worker; later broadcasts fail for it at once.
pub(crate) const MAX_PINNED: usize = 1024;

/// Where each worker's answer to a broadcast arrives.
pub(crate) type BroadcastReceivers = Vec<(WorkerId, oneshot::Receiver<Outcome>)>;

/// A request from a [`Farm`](crate::Farm) handle, other than a call.
#[derive(Debug)]
pub(crate) enum Command {
    Broadcast {
        frame: Box<[u8]>,
        /// One receiver per worker the call went to, or why it went to none.
        replies: oneshot::Sender<Result<BroadcastReceivers, CallError>>,
    },
    Status(oneshot::Sender<Status>),
    Stats(oneshot::Sender<super::Stats>),
    /// Answer once every worker is online, or no worker can start, or the farm stops.
    Ready(oneshot::Sender<Result<(), CallError>>),
    Shutdown(oneshot::Sender<()>),
    Kill(oneshot::Sender<()>),
    /// Many calls were abandoned: drop them from the queue now rather than as they come up.
    Sweep,
    /// The caller cancelled call `call`, or its deadline passed.
    Cancel {
        call: u64,
        why: CancelWhy,
    },
    /// Nothing to do but a turn (someone started watching the load).
    Nudge,
}

/// Why a caller gives up on a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CancelWhy {
    /// [`CallHandle::cancel`](crate::CallHandle::cancel), or a drop with `cancel_on_drop`.
    Cancelled,
    /// Its deadline passed.
    Expired,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Running,
    ShuttingDown,
    Killed,
}

/// How the running calls of a worker that went are treated.
enum Charge {
    /// Each running call may have caused it: charged with this error.
    Running(CallError),
    /// The culprit is known (it timed out): the other running calls are innocent.
    Nobody,
}

/// The channels the dispatcher listens on.
pub(crate) struct Inputs {
    pub(crate) calls: mpsc::UnboundedReceiver<Call>,
    pub(crate) commands: mpsc::UnboundedReceiver<Command>,
    pub(crate) events: broadcast::Sender<Event>,
    /// Whether anyone subscribed to events; per-call events are skipped until then.
    pub(crate) subscribed: Arc<AtomicBool>,
    /// Where the farm's load is published, once someone watches it.
    pub(crate) load: watch::Sender<Load>,
    pub(crate) load_watched: Arc<AtomicBool>,
    /// Calls the workers can hold at once, for the farm's handles.
    pub(crate) capacity: Arc<std::sync::atomic::AtomicUsize>,
    /// Where the statistics are left when the farm stops.
    pub(crate) final_stats: Arc<std::sync::Mutex<Option<super::Stats>>>,
    /// The statistics clock's start, shared with the callers who stamp their calls.
    pub(crate) epoch: std::time::Instant,
}

pub(crate) struct Dispatcher<T: Transport> {
    settings: Arc<Settings>,
    /// Each slot's handshake (they differ in their set-up arguments).
    hellos: Vec<Box<[u8]>>,
    transport: T,
    /// New calls wait here until a worker has room: this channel is the farm's queue.
    calls: mpsc::UnboundedReceiver<Call>,
    commands: mpsc::UnboundedReceiver<Command>,
    inbound: mpsc::UnboundedReceiver<Inbound>,
    inbound_tx: mpsc::UnboundedSender<Inbound>,
    events: broadcast::Sender<Event>,
    subscribed: Arc<AtomicBool>,
    workers: Workers<T::Link>,
    /// Calls taken from the channel (or re-queued) and not yet handed to a worker; served
    /// before the channel.
    queue: VecDeque<Call>,
    /// Keyed calls that reached the front of the queue, by pool slot: each waits for the
    /// worker in its slot without holding up the calls behind it.
    keyed: Vec<VecDeque<Call>>,
    /// Refused calls, waiting for a slot that did not refuse them (served before the queue,
    /// without holding it up: each may be barred from different slots).
    parked: VecDeque<Call>,
    /// Slots backing off after a refusal.
    backoffs: Backoffs,
    quarantine: Quarantine,
    bounds: Bounds,
    /// Workers the pool wants now, within `bounds`.
    size: usize,
    /// Statistics (`Farm::stats`).
    book: Book,
    final_stats: Arc<std::sync::Mutex<Option<super::Stats>>>,
    load: watch::Sender<Load>,
    load_watched: Arc<AtomicBool>,
    capacity: Arc<std::sync::atomic::AtomicUsize>,
    timers: Timers,
    /// Workers handed a call this turn (their links are flushed at its end).
    written: Vec<WorkerId>,
    mode: Mode,
    startup: Startup,
    retry: RetryPolicy,
    recycle: RecyclePolicy,
    waiters: Vec<oneshot::Sender<()>>,
    ready_waiters: Vec<oneshot::Sender<Result<(), CallError>>>,
    /// Whether `Timer::StallCheck` is armed (checked on every call handed to wait).
    stall_check_armed: bool,
    /// Every `Farm` handle is gone: the farm lives only while a caller still waits for a
    /// call (a call's future keeps its farm alive without holding a handle).
    orphaned: bool,
}

impl<T: Transport> Dispatcher<T> {
    pub(crate) fn new(
        settings: Arc<Settings>,
        hellos: Vec<Box<[u8]>>,
        transport: T,
        inputs: Inputs,
    ) -> Self {
        let (inbound_tx, inbound) = mpsc::unbounded_channel();
        let keyed = (0..settings.workers).map(|_| VecDeque::new()).collect();
        let bounds = Bounds::new(settings.min_workers, settings.workers);
        Dispatcher {
            parked: VecDeque::new(),
            backoffs: Backoffs::new(settings.workers),
            quarantine: Quarantine::new(settings.quarantine, settings.workers),
            size: bounds.start,
            bounds,
            book: Book::new(settings.workers, inputs.epoch),
            final_stats: inputs.final_stats,
            retry: RetryPolicy {
                max_retries: settings.max_retries,
                retry_handler_errors: settings.retry_handler_errors,
            },
            recycle: RecyclePolicy {
                ttl: settings.ttl,
                max_memory: settings.max_memory,
            },
            settings,
            hellos,
            transport,
            calls: inputs.calls,
            commands: inputs.commands,
            inbound,
            inbound_tx,
            events: inputs.events,
            subscribed: inputs.subscribed,
            workers: Workers::default(),
            queue: VecDeque::new(),
            keyed,
            load: inputs.load,
            load_watched: inputs.load_watched,
            capacity: inputs.capacity,
            timers: Timers::default(),
            written: Vec::new(),
            mode: Mode::Running,
            startup: Startup::default(),
            waiters: Vec::new(),
            ready_waiters: Vec::new(),
            stall_check_armed: false,
            orphaned: false,
        }
    }

    /// Starts the first workers; a spawn error here is returned to `Farm::create`.
    pub(crate) fn start(&mut self) -> std::io::Result<()> {
        for slot in 0..self.bounds.start {
            let id = self.workers.new_id(slot);
            let link =
                self.transport
                    .spawn(id, slot, hello_of(&self.hellos, slot), &self.inbound_tx)?;
            self.add_worker(id, slot, link);
        }
        if self.settings.max_memory.is_some() {
            self.timers.set(Timer::MemoryCheck, MEMORY_CHECK_INTERVAL);
        }
        Ok(())
    }

    pub(crate) async fn run(mut self) {
        let mut inbound = Vec::with_capacity(64);
        let mut commands = Vec::with_capacity(16);
        let mut calls = Vec::with_capacity(256);
        let (mut commands_open, mut calls_open) = (true, true);
        let sleep = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(sleep);
        let mut armed: Option<Instant> = None;
        while self.mode == Mode::Running || !self.workers.is_empty() {
            let deadline = self.timers.next_deadline();
            if let Some(d) = deadline.filter(|&d| Some(d) != armed) {
                sleep.as_mut().reset(d);
            }
            armed = deadline;
            let room = self.room();
            tokio::select! {
                biased;
                _ = self.inbound.recv_many(&mut inbound, 64) => {
                    self.book.tick();
                    for message in inbound.drain(..) {
                        self.on_inbound(message);
                    }
                }
                n = self.commands.recv_many(&mut commands, 256), if commands_open => {
                    if n == 0 {
                        // Every Farm handle is gone. Calls whose callers still wait run on;
                        // once none is left, the workers are killed (see `after_turn`).
                        commands_open = false;
                        tracing::debug!("farm dropped; finishing the calls still awaited");
                        self.orphaned = true;
                        self.timers.set(Timer::OrphanCheck, ORPHAN_CHECK);
                    }
                    for command in commands.drain(..) {
                        self.on_command(command);
                    }
                }
                n = self.calls.recv_many(&mut calls, room.clamp(1, 1024)), if calls_open && room > 0 => {
                    calls_open = n > 0;
                    self.book.tick();
                    for call in calls.drain(..) {
                        self.on_call(call);
                    }
                }
                () = &mut sleep, if deadline.is_some() => {
                    self.book.tick();
                    self.fire_timers();
                }
            }
            self.after_turn();
        }
        let report = self.book.report();
        *self.final_stats.lock().unwrap_or_else(|e| e.into_inner()) = Some(report);
        for waiter in self.waiters.drain(..) {
            let _ = waiter.send(());
        }
        tracing::debug!("farm stopped");
    }

    /// How many new calls to take from the channel this turn: as many as workers can take,
    /// all of them to fail them fast, and one while workers are missing (so an arriving call
    /// wakes us to spawn them). While calls of one kind wait in the queue for room, calls of
    /// the other kind are taken as far as there is room for them (see `pump_other_kind`).
    fn room(&self) -> usize {
        if self.mode != Mode::Running {
            return 0;
        }
        if self.startup.failing().is_some() || self.all_sidelined().is_some() {
            return 1024;
        }
        if !self.queue.is_empty() && !self.workers.any_async() {
            return 0;
        }
        if self.calls.is_empty() {
            // Nothing to take: only be woken by the next call (it is taken alone, and the
            // turns after it, with calls waiting, measure the room).
            return 1;
        }
        let per_worker = self.settings.max_concurrent_calls_per_worker;
        let free = self
            .workers
            .iter()
            .map(|w| w.free_slots(per_worker))
            .fold(0, usize::saturating_add);
        if !self.queue.is_empty() {
            return free.saturating_sub(self.queue.len());
        }
        if self.workers.live() < self.settings.workers {
            free.max(1)
        } else {
            free
        }
    }

    fn after_turn(&mut self) {
        // Timers come last in the loop's biased select; under a steady stream of replies
        // they are fired here, so no deadline waits for a quiet moment.
        if self
            .timers
            .next_deadline()
            .is_some_and(|d| d <= Instant::now())
        {
            self.fire_timers();
        }
        self.pump();
        if self.withdraw_for_free_threads() {
            self.pump();
        }
        // Only the links written to this turn have anything to flush.
        for id in std::mem::take(&mut self.written) {
            if let Some(w) = self.workers.get(id) {
                w.link.flush();
            }
        }
        if !self.ready_waiters.is_empty() {
            self.answer_ready_waiters();
        }
        // Calls are waiting: make sure workers exist to run them (replacing idle-reaped or
        // lost ones, growing an elastic pool; a no-op while enough are live, or while
        // backing off).
        let waiting = self.queue.len() + self.parked.len() + self.calls.len();
        let size = self.size;
        if self.size < self.bounds.max {
            // Calls waiting inside busy workers wait too: an elastic pool grows for them
            // (a new worker takes them back as it comes online).
            let inside: usize = self.workers.iter().map(Worker::waiting).sum();
            // Workers on their way: starting, and those the size already asks for that are
            // not spawned yet (else each turn before they spawn would grow the pool again).
            // And room already there: a call still in the channel while a worker is idle
            // is taken next turn, not a reason to grow.
            let live = self.workers.iter().filter(|w| w.is_live()).count();
            let per_worker = self.settings.max_concurrent_calls_per_worker;
            let free: usize = self
                .workers
                .iter()
                .map(|w| w.free_slots(per_worker).min(w.free_threads()))
                .fold(0, usize::saturating_add);
            let coming = self.workers.starting() + self.size.saturating_sub(live);
            self.size = self
                .bounds
                .grow(self.size, waiting + inside, coming.saturating_add(free));
        }
        if waiting > 0 || self.size > size || self.keyed_queued() > 0 {
            self.ensure_workers();
        }
        if self.load_watched.load(Ordering::Relaxed) {
            self.publish_load();
        }
        if self.orphaned && self.mode == Mode::Running && !self.anyone_waits() {
            tracing::debug!("farm dropped and no call awaited; killing workers");
            self.kill();
        }
    }

    /// Whether some caller still waits for a call (or calls wait unread in the channel,
    /// which their callers may still await). Stops at the first one found.
    fn anyone_waits(&self) -> bool {
        let open = |c: &Call| !c.reply.is_closed();
        !self.calls.is_empty()
            || self.queue.iter().any(open)
            || self.keyed.iter().flatten().any(open)
            || self.parked.iter().any(open)
            || self.workers.iter().any(Worker::awaited)
    }

    /// Publishes the load if it changed (watchers are woken only then).
    fn publish_load(&self) {
        let per_worker = self.settings.max_concurrent_calls_per_worker;
        let load = Load {
            queued: self.queued(),
            in_flight: self.workers.iter().map(Worker::held).sum(),
            free: self
                .workers
                .iter()
                .map(|w| w.free_slots(per_worker))
                .fold(0, usize::saturating_add),
        };
        self.load.send_if_modified(|old| {
            let changed = *old != load;
            *old = load;
            changed
        });
    }

    /// Calls not yet handed to a worker.
    fn queued(&self) -> usize {
        self.queue.len() + self.calls.len() + self.keyed_queued() + self.parked.len()
    }

    fn keyed_queued(&self) -> usize {
        self.keyed.iter().map(VecDeque::len).sum()
    }

    // ===== commands =====

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Broadcast { frame, replies } => {
                let _ = replies.send(self.on_broadcast(&frame));
            }
            Command::Status(tx) => {
                let _ = tx.send(self.status());
            }
            Command::Stats(tx) => {
                let _ = tx.send(self.book.report());
            }
            Command::Ready(tx) => {
                self.ready_waiters.push(tx);
                // Idle-reaped workers are replaced on demand; waiting for them is demand.
                self.size = self.size.max(self.bounds.start);
                self.ensure_workers();
            }
            Command::Shutdown(tx) => {
                self.waiters.push(tx);
                self.shutdown();
            }
            Command::Kill(tx) => {
                self.waiters.push(tx);
                self.kill();
            }
            Command::Sweep => self.sweep_abandoned(),
            Command::Cancel { call, why } => self.cancel(call, why),
            Command::Nudge => {}
        }
    }

    /// The caller gave up on call `id`: it settles now with `Cancelled` (or `Deadline`)
    /// wherever it is. A call still queued, or waiting in a worker, never runs; an async
    /// call that runs is cancelled in its worker; a sync call that runs alone on its worker
    /// stops the worker, and one that shares its worker runs on with its result discarded.
    /// A call that already settled keeps its outcome.
    fn cancel(&mut self, id: u64, why: CancelWhy) {
        let error = |ran| match why {
            CancelWhy::Cancelled => CallError::Cancelled,
            CancelWhy::Expired => CallError::Deadline { ran },
        };
        // Workers first: looking there is cheap, and a call found there need not be
        // looked for in the channel.
        let held = self
            .workers
            .iter()
            .find(|w| w.call(id).is_some())
            .map(|w| w.id);
        let Some(worker) = held else {
            if let Some(call) = self.take_queued(id) {
                let ran = call.attempts > 0;
                let slot = last_slot(&call);
                self.fail(call, error(ran), slot);
            }
            return;
        };
        let Some(w) = self.workers.get(worker) else {
            return;
        };
        if w.call(id)
            .and_then(|c| c.opts.as_ref())
            .is_some_and(|o| o.cancelled)
        {
            // Already cancelled: it runs on, unwanted.
            return;
        }
        if why == CancelWhy::Expired && w.is_started(id) {
            // Running past its deadline is a timeout whose timer has not fired yet.
            self.on_call_timeout(worker, id);
            return;
        }
        match w.cancel(id) {
            None => {}
            Some(Cancelled::Withdrawn(call)) => {
                let ran = call.attempts > 0;
                self.fail(call, error(ran), Some(worker.slot()));
            }
            Some(Cancelled::Detached { reply, started, .. }) if why == CancelWhy::Expired => {
                // Too late to take back: it runs, and its result is discarded.
                let error = error(started);
                self.book.failed(Some(worker.slot()), &error);
                reply.send(Err(error));
            }
            Some(Cancelled::Detached {
                reply,
                kind,
                started,
                alone,
            }) => {
                tracing::debug!(
                    call = id,
                    worker = worker.as_u64(),
                    ?kind,
                    started,
                    alone,
                    "call cancelled"
                );
                self.book.failed(Some(worker.slot()), &CallError::Cancelled);
                reply.send(Err(CallError::Cancelled));
                if started {
                    // Nobody waits for it: its deadline no longer matters, its timeout does.
                    let timer = Timer::CallTimeout { worker, call: id };
                    match w.call(id).and_then(|c| limit_for(&self.settings, c)) {
                        Some(after) => self.timers.set(timer, after),
                        None => {
                            self.timers.cancel(timer);
                        }
                    }
                }
                let Some(w) = self.workers.get(worker) else {
                    return;
                };
                match kind {
                    Kind::Async => {
                        w.link.send(&crate::protocol::cancel_frame(id));
                        if self.written.last() != Some(&worker) {
                            self.written.push(worker);
                        }
                    }
                    Kind::Sync if started && alone => {
                        // Nothing else runs there: stop it rather than wait for a result
                        // nobody wants. Calls waiting in it go back to the queue free.
                        self.timers.cancel(Timer::CallTimeout { worker, call: id });
                        let _ = w.take(id);
                        self.drop_worker(worker, Charge::Nobody);
                    }
                    Kind::Sync => {}
                }
            }
        }
    }

    /// Takes call `id` out of the queue (or the channel, where it may still be: the caller
    /// sent it before the command that names it).
    fn take_queued(&mut self, id: u64) -> Option<Call> {
        if let Some(i) = self.queue.iter().position(|c| c.id() == id) {
            return self.queue.remove(i);
        }
        for keyed in &mut self.keyed {
            if let Some(i) = keyed.iter().position(|c| c.id() == id) {
                return keyed.remove(i);
            }
        }
        if let Some(i) = self.parked.iter().position(|c| c.id() == id) {
            return self.parked.remove(i);
        }
        while let Ok(call) = self.calls.try_recv() {
            if call.id() == id {
                return Some(call);
            }
            self.on_call(call);
        }
        None
    }

    fn on_call(&mut self, call: Call) {
        let refused = if self.mode != Mode::Running {
            CallError::ShutDown
        } else if call.reply.is_closed() {
            // The caller gave up while the call waited.
            return;
        } else if call.expired() {
            CallError::Deadline { ran: false }
        } else if let Some(message) = self.startup.failing() {
            CallError::WorkerStart {
                message: message.to_owned(),
            }
        } else if let Some(slots) = self.all_sidelined() {
            CallError::Quarantined { slots }
        } else {
            tracing::trace!(call = call.id(), method = call.method(), "call taken");
            self.queue.push_back(call);
            return;
        };
        self.fail(call, refused, None);
    }

    /// Settles `call` with `error`, counting it under `slot` (where its last attempt ran).
    fn fail(&mut self, call: Call, error: CallError, slot: Option<usize>) {
        if !call.settled() {
            self.book.failed(slot, &error);
        }
        call.reply.send(Err(error));
    }

    /// Pins one copy of the call to each live worker.
    fn on_broadcast(&mut self, frame: &[u8]) -> Result<BroadcastReceivers, CallError> {
        let mut receivers = Vec::new();
        if self.mode != Mode::Running {
            return Err(CallError::ShutDown);
        }
        for worker in self.workers.iter_mut().filter(|w| w.is_live()) {
            let (reply, rx) = Reply::new(None);
            worker.pinned.retain(|c| !c.reply.is_closed());
            if worker.broadcasts_waiting() >= MAX_PINNED {
                let error = CallError::QueueFull { limit: MAX_PINNED };
                self.book.failed(Some(worker.slot), &error);
                reply.send(Err(error));
            } else {
                let mut call = Call::new(frame.into(), Some(worker.id), reply);
                call.taken = self.book.now();
                worker.pinned.push_back(call);
            }
            receivers.push((worker.id, rx));
        }
        if receivers.is_empty() {
            // Every worker died and none is starting yet (replacements are being paced).
            let message = self
                .startup
                .failing()
                .unwrap_or("no worker is starting or online (replacements are on their way)");
            return Err(CallError::WorkerStart {
                message: message.to_owned(),
            });
        }
        Ok(receivers)
    }

    /// Graceful: fail what is queued, let what is in flight finish, then stop each worker.
    fn shutdown(&mut self) {
        if self.mode != Mode::Running {
            return;
        }
        tracing::debug!(queued = self.queue.len(), "farm shutting down");
        self.mode = Mode::ShuttingDown;
        self.fail_queued();
        for id in self.workers.ids() {
            let Some(w) = self.workers.get(id) else {
                continue;
            };
            for call in w.pinned.drain(..) {
                self.book.failed(Some(w.slot), &CallError::ShutDown);
                call.reply.send(Err(CallError::ShutDown));
            }
            if w.held() == 0 {
                self.stop(id, false);
            } else if w.state != WorkerState::Stopping {
                w.state = WorkerState::Retiring;
            }
        }
    }

    /// Immediate: fail every call, then stop every worker (SIGTERM, then SIGKILL).
    fn kill(&mut self) {
        if self.mode == Mode::Killed {
            return;
        }
        tracing::debug!("farm killed");
        self.mode = Mode::Killed;
        self.fail_queued();
        for id in self.workers.ids() {
            let Some(w) = self.workers.get(id) else {
                continue;
            };
            let emptied = w.empty();
            for call in emptied
                .running
                .into_iter()
                .chain(emptied.waiting)
                .chain(emptied.pinned)
            {
                self.timers.cancel(Timer::CallTimeout {
                    worker: id,
                    call: call.id(),
                });
                self.fail(call, CallError::ShutDown, Some(id.slot()));
            }
            self.stop(id, true);
        }
    }

    /// Takes every call waiting in the channel into the queue, dropping those whose callers
    /// have gone (along with any already in the queue).
    fn sweep_abandoned(&mut self) {
        while let Ok(call) = self.calls.try_recv() {
            self.on_call(call);
        }
        self.queue.retain(|call| !call.reply.is_closed());
        for keyed in &mut self.keyed {
            keyed.retain(|call| !call.reply.is_closed());
        }
        self.parked.retain(|call| !call.reply.is_closed());
    }

    /// Every call in the queue, keyed ones included.
    fn drain_queue(&mut self) -> Vec<Call> {
        let mut calls: Vec<Call> = self.queue.drain(..).collect();
        for keyed in &mut self.keyed {
            calls.extend(keyed.drain(..));
        }
        calls.extend(self.parked.drain(..));
        calls
    }

    /// Fails every call not yet handed to a worker, and refuses new ones from now on.
    fn fail_queued(&mut self) {
        for call in self.drain_queue() {
            let slot = last_slot(&call);
            self.fail(call, CallError::ShutDown, slot);
        }
        self.calls.close();
        while let Ok(call) = self.calls.try_recv() {
            self.fail(call, CallError::ShutDown, None);
        }
    }

    fn answer_ready_waiters(&mut self) {
        let answer = if self.mode != Mode::Running {
            Err(CallError::ShutDown)
        } else if let Some(message) = self.startup.failing() {
            Err(CallError::WorkerStart {
                message: message.to_owned(),
            })
        } else if let Some(slots) = self.all_sidelined() {
            Err(CallError::Quarantined { slots })
        } else if self.workers.online() >= self.ready_target() {
            Ok(())
        } else {
            return;
        };
        for waiter in self.ready_waiters.drain(..) {
            let _ = waiter.send(answer.clone());
        }
    }

    /// Workers `ready()` waits for: the pool's size, less the slots sidelined.
    fn ready_target(&self) -> usize {
        let sidelined = (0..self.settings.workers)
            .filter(|&slot| self.quarantine.is_sidelined(slot))
            .count();
        self.size.min(self.settings.workers - sidelined)
    }

    fn status(&self) -> Status {
        Status {
            workers: self
                .workers
                .iter()
                .map(|w| WorkerStatus {
                    id: w.id,
                    pid: w.link.pid(),
                    state: w.state,
                    slot: w.slot,
                    in_flight: w.held(),
                    waiting: w.waiting(),
                    handed: w.handed,
                })
                .collect(),
            queued: self.queued(),
            nodes: Vec::new(),
        }
    }

    // ===== dispatch =====

    /// Hands broadcast calls, then queued calls, to workers while any has room.
    fn pump(&mut self) {
        let per_worker = self.settings.max_concurrent_calls_per_worker;
        if self.workers.iter().any(|w| !w.pinned.is_empty()) {
            for id in self.workers.ids() {
                while let Some(call) = self.next_pinned(id) {
                    self.hand(id, call);
                }
            }
        }
        if self.keyed_queued() > 0 {
            self.pump_keyed();
        }
        if !self.parked.is_empty() {
            self.pump_parked();
        }
        let share = self.workers.startup_share(self.queue.len());
        while let Some(front) = self.queue.front() {
            if front.reply.is_closed() {
                // The caller gave up while the call waited: skip it.
                self.queue.pop_front();
                continue;
            }
            if front.opts.is_some() && self.route_with_opts() {
                continue;
            }
            let Some(front) = self.queue.front() else {
                break;
            };
            let kind = self.workers.kind_of(front.method());
            match self.workers.pick(front, kind, per_worker, share) {
                Some(id) => {
                    if let Some(call) = self.queue.pop_front() {
                        self.hand(id, call);
                    }
                }
                None if self.workers.any_async() => {
                    self.pump_other_kind(kind, share);
                    break;
                }
                None => break,
            }
        }
    }

    /// The call at the front of the queue has options: settles it if its deadline passed,
    /// or moves it to its slot's queue if it is keyed. Whether it did either.
    fn route_with_opts(&mut self) -> bool {
        let Some(front) = self.queue.front() else {
            return false;
        };
        if front.expired() {
            if let Some(call) = self.queue.pop_front() {
                let ran = call.attempts > 0;
                let slot = last_slot(&call);
                self.fail(call, CallError::Deadline { ran }, slot);
            }
            return true;
        }
        let Some(key) = front.key() else {
            return false;
        };
        let slot = (key % self.keyed.len().max(1) as u64) as usize;
        if let (Some(call), Some(keyed)) = (self.queue.pop_front(), self.keyed.get_mut(slot)) {
            keyed.push_back(call);
            self.pump_keyed();
        }
        true
    }

    /// Hands keyed calls to the workers of their slots while those have room.
    fn pump_keyed(&mut self) {
        let per_worker = self.settings.max_concurrent_calls_per_worker;
        for slot in 0..self.keyed.len() {
            while let Some(front) = self.keyed[slot].front() {
                if front.reply.is_closed() {
                    self.keyed[slot].pop_front();
                    continue;
                }
                if front.expired() {
                    if let Some(call) = self.keyed[slot].pop_front() {
                        let ran = call.attempts > 0;
                        let last = last_slot(&call);
                        self.fail(call, CallError::Deadline { ran }, last);
                    }
                    continue;
                }
                let kind = self.workers.kind_of(front.method());
                let Some(id) = self.workers.pick_keyed(front, kind, per_worker, slot) else {
                    break;
                };
                if let Some(call) = self.keyed[slot].pop_front() {
                    self.hand(id, call);
                }
            }
        }
    }

    /// Hands refused calls to workers of slots that did not refuse them, oldest first; each
    /// that finds none keeps waiting without holding up the others.
    fn pump_parked(&mut self) {
        let per_worker = self.settings.max_concurrent_calls_per_worker;
        let mut i = 0;
        while i < self.parked.len() {
            let call = &self.parked[i];
            if call.reply.is_closed() {
                self.parked.remove(i);
                continue;
            }
            if call.expired() {
                if let Some(call) = self.parked.remove(i) {
                    let ran = call.attempts > 0;
                    let slot = last_slot(&call);
                    self.fail(call, CallError::Deadline { ran }, slot);
                }
                continue;
            }
            let kind = self.workers.kind_of(call.method());
            match self.workers.pick(call, kind, per_worker, None) {
                Some(id) => {
                    if let Some(call) = self.parked.remove(i) {
                        self.hand(id, call);
                    }
                }
                None => i += 1,
            }
        }
    }

    /// The call at the front of the queue is of `blocked` kind and no worker has room for
    /// it: hand out calls of the other kind from just behind it (a bounded look-ahead), so
    /// async calls do not wait behind sync ones, nor the other way round.
    fn pump_other_kind(&mut self, blocked: Kind, share: Option<usize>) {
        const LOOK_AHEAD: usize = 64;
        let per_worker = self.settings.max_concurrent_calls_per_worker;
        let mut i = 1;
        while i < self.queue.len().min(LOOK_AHEAD) {
            let call = &self.queue[i];
            let kind = self.workers.kind_of(call.method());
            // Calls with options wait for their turn: they may be keyed, or expired.
            let picked = (kind != blocked && !call.reply.is_closed() && call.opts.is_none())
                .then(|| self.workers.pick(call, kind, per_worker, share))
                .flatten();
            match picked {
                Some(id) => {
                    if let Some(call) = self.queue.remove(i) {
                        self.hand(id, call);
                    }
                }
                None => i += 1,
            }
        }
    }

    /// The next broadcast call worker `id` can take now, skipping abandoned ones.
    fn next_pinned(&mut self, id: WorkerId) -> Option<Call> {
        let per_worker = self.settings.max_concurrent_calls_per_worker;
        let w = self.workers.get(id)?;
        if !matches!(w.state, WorkerState::Online | WorkerState::Retiring) {
            return None;
        }
        loop {
            let front = w.pinned.front()?;
            if front.reply.is_closed() {
                // Its caller stopped waiting: it never runs.
                w.pinned.pop_front();
            } else if w.has_room(kind_for(w, front.method()), per_worker) {
                return w.pinned.pop_front();
            } else {
                return None;
            }
        }
    }

    fn hand(&mut self, id: WorkerId, call: Call) {
        let limit = limit_for(&self.settings, &call);
        let Some(w) = self.workers.get(id) else {
            self.queue.push_front(call);
            return;
        };
        let (call_id, pinned) = (call.id(), call.pinned.is_some());
        tracing::trace!(call = call_id, worker = id.as_u64(), "call sent");
        let kind = kind_for(w, call.method());
        if self.written.last() != Some(&id) {
            self.written.push(id);
        }
        let (slot, taken) = (w.slot, call.taken);
        let started = w.hand(call, kind, self.book.now());
        if started {
            self.book.started(slot, taken);
        }
        let ttl_reached =
            !pinned && w.state == WorkerState::Online && self.recycle.ttl_reached(w.handed);
        self.timers.cancel(Timer::Idle(id));
        if started {
            self.arm_call_timeout(id, call_id, limit);
        } else if !self.stall_check_armed {
            self.stall_check_armed = true;
            self.timers.set(Timer::StallCheck, pipeline::STALL_CHECK);
        }
        if ttl_reached {
            tracing::debug!(worker = id.as_u64(), "ttl reached");
            self.retire(id, Event::TtlReached { worker: id });
        }
    }

    /// Nothing waits in the queue and a worker has a free thread: ask for waiting calls
    /// back from the worker that holds the most (see `policy::pipeline`).
    fn withdraw_for_free_threads(&mut self) -> bool {
        if self.mode != Mode::Running || !self.queue.is_empty() || !self.calls.is_empty() {
            return false;
        }
        let free: usize = self.workers.iter().map(|w| w.free_threads()).sum();
        // One per free thread (the caller checked that nothing waits in the queue).
        for _ in 0..free {
            let most = self
                .workers
                .iter()
                .filter(|w| w.withdrawable() > 0)
                .max_by_key(|w| w.withdrawable())
                .map(|w| w.id);
            let Some(id) = most else { break };
            let Some(call) = self.workers.get(id).and_then(|w| w.withdraw_newest()) else {
                continue;
            };
            self.requeue_withdrawn(id, call);
        }
        !self.queue.is_empty()
    }

    /// Checks the workers holding waiting calls: calls whose callers have gone are asked
    /// back (they never run), and a stalled worker gives back all it can.
    fn check_stalls(&mut self) {
        self.stall_check_armed = false;
        if self.mode != Mode::Running {
            // Stopping: what workers hold finishes where it is.
            return;
        }
        let mut any_waiting = false;
        for id in self.workers.ids() {
            let Some(w) = self.workers.get(id) else {
                continue;
            };
            if w.state == WorkerState::Stopping {
                continue;
            }
            let mut calls = w.withdraw_abandoned();
            let progress = w.progress - w.progress_checked;
            w.progress_checked = w.progress;
            let stalled = w.withdrawable() > 0 && pipeline::is_stalled(progress);
            if stalled {
                calls.extend(w.stall());
            } else if w.stalled && (w.held() == 0 || pipeline::is_quick(progress, w.threads())) {
                // Quick again, or idle: nothing to hold back, and no reason to keep checking.
                w.stalled = false;
            }
            any_waiting |= w.waiting() > 0 || w.stalled;
            if !calls.is_empty() {
                tracing::debug!(
                    worker = id.as_u64(),
                    calls = calls.len(),
                    stalled,
                    "took back waiting calls"
                );
            }
            for call in calls {
                self.requeue_withdrawn(id, call);
            }
        }
        if any_waiting {
            self.stall_check_armed = true;
            self.timers.set(Timer::StallCheck, pipeline::STALL_CHECK);
        }
    }

    /// A call taken back from worker `id` before it started goes back to the queue,
    /// uncharged, in its place by age (or is dropped, if its caller has gone).
    fn requeue_withdrawn(&mut self, id: WorkerId, mut call: Call) {
        tracing::trace!(call = call.id(), worker = id.as_u64(), "call taken back");
        if call.reply.is_closed() {
            return;
        }
        call.retry_mut().withdrawn = true;
        let at = self
            .queue
            .iter()
            .position(|c| c.id() > call.id())
            .unwrap_or(self.queue.len());
        self.queue.insert(at, call);
    }

    fn arm_call_timeout(&mut self, worker: WorkerId, call: u64, limit: Option<Duration>) {
        if let Some(after) = limit {
            self.timers.set(Timer::CallTimeout { worker, call }, after);
        }
    }

    /// Worker `id` takes no new calls, finishes what it has, and is replaced now.
    fn retire(&mut self, id: WorkerId, why: Event) {
        let Some(w) = self.workers.get(id) else {
            return;
        };
        w.stop_reason.get_or_insert(StopReason::Recycled);
        w.state = WorkerState::Retiring;
        let drained = w.is_drained();
        self.emit(why);
        if drained {
            self.stop(id, false);
        }
        self.ensure_workers();
    }

    /// Spawns workers until the pool's size are starting or online, in free slots that are
    /// not sidelined, and one for each slot whose keyed calls wait with no worker (unless
    /// backing off after start failures).
    fn ensure_workers(&mut self) {
        if self.mode != Mode::Running || self.timers.is_set(Timer::Respawn) {
            return;
        }
        let slots = self.settings.workers;
        for slot in 0..self.keyed.len() {
            if !self.keyed[slot].is_empty()
                && self.workers.in_slot(slot).is_none()
                && !self.quarantine.is_sidelined(slot)
            {
                self.size = (self.workers.live() + 1).max(self.size).min(slots);
            }
        }
        while self.workers.live() < self.size {
            let keyed_first = (0..self.keyed.len()).find(|&slot| {
                !self.keyed[slot].is_empty()
                    && self.workers.in_slot(slot).is_none()
                    && !self.quarantine.is_sidelined(slot)
            });
            let quarantine = &self.quarantine;
            let Some(slot) = keyed_first.or_else(|| {
                self.workers
                    .free_slot(slots, |slot| !quarantine.is_sidelined(slot))
            }) else {
                break;
            };
            let id = self.workers.new_id(slot);
            match self
                .transport
                .spawn(id, slot, hello_of(&self.hellos, slot), &self.inbound_tx)
            {
                Ok(link) => self.add_worker(id, slot, link),
                Err(e) => {
                    let why = format!("could not spawn {}: {e}", self.transport.describe());
                    self.start_failed(Some(id), why);
                    break;
                }
            }
        }
    }

    fn add_worker(&mut self, id: WorkerId, slot: usize, link: T::Link) {
        let pid = link.pid();
        tracing::debug!(worker = id.as_u64(), slot, pid, "worker spawned");
        self.emit(Event::Spawned { worker: id, pid });
        self.timers
            .set(Timer::Startup(id), self.settings.startup_timeout);
        self.book.spawned(slot);
        let mut worker = Worker::new(id, slot, link);
        // A replacement in a slot that backs off waits for the back-off too.
        worker.paused = self.backoffs.until(slot).is_some();
        self.workers.add(worker);
    }

    /// Stops worker `id`: closes its input (it exits after its calls), and with `force`
    /// also asks it to stop now; it is killed after `kill_timeout` either way.
    fn stop(&mut self, id: WorkerId, force: bool) {
        let Some(w) = self.workers.get(id) else {
            return;
        };
        if force {
            w.link.terminate();
        }
        if w.state == WorkerState::Stopping {
            return;
        }
        w.state = WorkerState::Stopping;
        w.link.close_input();
        tracing::debug!(worker = id.as_u64(), force, "stopping worker");
        self.timers.cancel(Timer::Idle(id));
        self.timers.set(Timer::Kill(id), self.settings.kill_timeout);
    }

    // ===== worker messages =====

    fn on_inbound(&mut self, inbound: Inbound) {
        match inbound {
            Inbound::Messages { worker, messages } => {
                for message in messages {
                    self.on_message(worker, message);
                }
                self.after_replies(worker);
            }
            Inbound::Fault { worker, message } => self.on_fault(worker, message),
            Inbound::Closed { worker } => self.on_closed(worker),
            // Logged by the stderr thread: a log line from here could block on that stderr.
            Inbound::StderrDropped { worker, lines } => {
                self.emit(Event::StderrDropped { worker, lines });
            }
            Inbound::Exited {
                worker,
                exit,
                stderr_tail,
            } => self.on_exit(worker, exit, &stderr_tail),
        }
    }

    fn on_message(&mut self, id: WorkerId, message: FromWorker) {
        match message {
            FromWorker::Ok { id: call, body } => self.on_reply(id, call, Ok(body)),
            FromWorker::Err {
                id: call,
                kind,
                message,
            } => self.on_reply(id, call, Err((kind, message))),
            FromWorker::Started { id: call } => {
                let Some(w) = self.workers.get(id) else {
                    return;
                };
                let slot = w.slot;
                if let Some(started) = w.start(call, self.book.now()) {
                    let limit = limit_for(&self.settings, started);
                    self.book.started(slot, started.taken);
                    self.arm_call_timeout(id, call, limit);
                }
            }
            FromWorker::Ready(ready) => self.on_ready(id, ready),
            FromWorker::Fatal { message } => self.on_fatal(id, message),
            FromWorker::Refused {
                id: call,
                retry_after,
                message,
            } => self.on_refused(id, call, retry_after, message),
        }
    }

    /// Worker `id` refused call `call`: uncharged, it goes to another slot (or waits for
    /// one, or fails: see `policy::refusal`); with a back-off, the worker's slot takes no
    /// calls until it ends, and the calls waiting in the worker come back.
    fn on_refused(
        &mut self,
        id: WorkerId,
        call: u64,
        retry_after: Option<Duration>,
        reason: String,
    ) {
        let Some(w) = self.workers.get(id) else {
            return;
        };
        let Some(mut call) = w.take(call) else { return };
        // The table's id: it carries the worker's slot.
        let id = w.id;
        let slot_of_refusal = w.slot;
        // Not an attempt: it did not run to an answer.
        call.attempts = call.attempts.saturating_sub(1);
        self.timers.cancel(Timer::CallTimeout {
            worker: id,
            call: call.id(),
        });
        tracing::debug!(call = call.id(), worker = id.as_u64(), ?retry_after, %reason, "call refused");
        let now = Instant::now();
        if let Some(backoff) = retry_after {
            self.back_off(id, backoff, now);
        }
        let refusal = Refusal {
            worker: Some(id),
            backoff: retry_after,
            reason,
        };
        self.book.refused(slot_of_refusal);
        call.retry_mut().refused(refusal, now);
        self.park(call, now);
    }

    /// The slot of worker `id` takes no calls for `backoff`; what waits in its workers and
    /// can be taken back goes back to the queue.
    fn back_off(&mut self, id: WorkerId, backoff: Duration, now: Instant) {
        let slot = id.slot();
        let until = now
            .checked_add(backoff)
            .unwrap_or(now + Duration::from_secs(86_400));
        if self.backoffs.back_off(slot, until) {
            self.emit(Event::BackingOff {
                worker: id,
                backoff,
            });
            self.timers.set(Timer::Resume(slot), backoff);
        }
        for wid in self.workers.ids() {
            let Some(w) = self.workers.get(wid) else {
                continue;
            };
            if w.slot != slot {
                continue;
            }
            w.paused = true;
            let mut back = Vec::new();
            while let Some(call) = w.withdraw_newest() {
                back.push(call);
            }
            for call in back.into_iter().rev() {
                self.requeue_withdrawn(wid, call);
            }
        }
    }

    /// A slot's back-off timer fired: it takes calls again, unless the back-off was
    /// extended meanwhile.
    fn resume(&mut self, slot: usize) {
        let now = Instant::now();
        if !self.backoffs.end_if_due(slot, now) {
            if let Some(until) = self.backoffs.until(slot) {
                self.timers
                    .set(Timer::Resume(slot), until.saturating_duration_since(now));
            }
            return;
        }
        tracing::debug!(slot, "back-off ended");
        for w in self.workers.iter_mut().filter(|w| w.slot == slot) {
            w.paused = false;
        }
    }

    /// A refused call waits for a slot that may take it, or fails if none will in time.
    fn park(&mut self, call: Call, now: Instant) {
        if call.reply.is_closed() {
            return;
        }
        if call.expired() {
            let ran = call.attempts > 0;
            let slot = last_slot(&call);
            self.fail(call, CallError::Deadline { ran }, slot);
            return;
        }
        let first = call
            .retry
            .as_ref()
            .and_then(|r| r.first_refused)
            .unwrap_or(now);
        let next = if call.pinned.is_some() {
            // A broadcast belongs to its worker: refused there, it is refused.
            refusal::Next::Fail
        } else if let Some(key) = call.key() {
            // Keyed calls wait for their own slot.
            let slot = (key % self.keyed.len().max(1) as u64) as usize;
            let open = (!call.not_here(slot)).then(|| self.backoffs.until(slot));
            refusal::next(open, first, self.settings.max_refusal_wait)
        } else {
            let open = (0..self.settings.workers)
                .filter(|&slot| !call.not_here(slot) && !self.quarantine.is_sidelined(slot))
                .map(|slot| self.backoffs.until(slot));
            refusal::next(open, first, self.settings.max_refusal_wait)
        };
        match next {
            refusal::Next::Fail => {
                let refusals = call
                    .retry
                    .as_ref()
                    .map(|r| r.refusals.clone())
                    .unwrap_or_default();
                let slot = refusals.last().and_then(|r| r.worker).map(WorkerId::slot);
                self.fail(call, CallError::Refused { refusals }, slot);
            }
            refusal::Next::Wait => match call.key() {
                Some(key) => {
                    let slot = (key % self.keyed.len().max(1) as u64) as usize;
                    if let Some(keyed) = self.keyed.get_mut(slot) {
                        keyed.push_front(call);
                    }
                }
                None => self.parked.push_back(call),
            },
        }
    }

    /// Every slot is sidelined by quarantine: each, for the error.
    fn all_sidelined(&self) -> Option<Vec<crate::error::Sidelined>> {
        self.quarantine.all_sidelined(Instant::now)
    }

    fn on_reply(&mut self, id: WorkerId, call: u64, outcome: Result<Bytes, (FailureKind, String)>) {
        let Some(w) = self.workers.get(id) else {
            return;
        };
        let Some((call, since)) = w.take_timed(call) else {
            return;
        };
        let slot = w.slot;
        let first_answer = !std::mem::replace(&mut w.answered, true);
        if first_answer {
            self.startup.proved();
            let slot = w.slot;
            self.quarantine.proved(slot);
        }
        self.timers.cancel(Timer::CallTimeout {
            worker: id,
            call: call.id(),
        });
        let pid = w.link.pid();
        self.emit_call_done(id, call.id(), outcome.is_ok());
        self.book.answered(slot, since);
        if outcome.is_ok() && !call.settled() {
            self.book.succeeded(slot);
        }
        match outcome {
            Ok(body) if call.opts.as_ref().is_some_and(|o| o.made.is_some()) => {
                let info = call.opts.as_ref().and_then(|opts| {
                    let made = opts.made?;
                    let now = std::time::Instant::now();
                    let started = opts.started.unwrap_or(now);
                    Some(CallInfo {
                        id: call.id(),
                        worker: id,
                        pid,
                        attempts: call.attempts,
                        queued_for: started.saturating_duration_since(made),
                        ran_for: now.saturating_duration_since(started),
                    })
                });
                call.reply.send_answer(Ok(Answer { body, info }));
            }
            Ok(body) => call.reply.send(Ok(body)),
            Err((kind, message)) => {
                let error = failure_error(kind, call.method().to_owned(), message);
                self.fail_running(call, error, id);
            }
        }
    }

    fn on_ready(&mut self, id: WorkerId, ready: Ready) {
        let Some(w) = self.workers.get(id) else {
            return;
        };
        if w.state != WorkerState::Starting {
            return;
        }
        if ready.version != PROTOCOL_VERSION {
            w.start_failure = Some(format!(
                "worker speaks protocol version {}, the farm speaks {PROTOCOL_VERSION}",
                ready.version
            ));
            self.stop(id, true);
            return;
        }
        let pid = ready.pid;
        if ready.shared_memory {
            if let Some(slots) = w.link.use_shared_memory() {
                w.share_slots(slots);
            }
        }
        let caps = Caps::from_ready(ready);
        w.go_online(caps.clone());
        let each = w.capacity(self.settings.max_concurrent_calls_per_worker);
        self.capacity.store(
            self.settings.workers.saturating_mul(each),
            Ordering::Relaxed,
        );
        self.workers.learn(&caps);
        tracing::debug!(worker = id.as_u64(), pid, "worker online");
        self.timers.cancel(Timer::Startup(id));
        self.startup.online();
        self.emit(Event::Online { worker: id, pid });
        if self.mode != Mode::Running {
            self.stop(id, false);
        }
    }

    /// After a batch of replies: stop a retiring worker that is done, or start its idle clock.
    fn after_replies(&mut self, id: WorkerId) {
        let idle = self.settings.max_idle_time;
        let Some(w) = self.workers.get(id) else {
            return;
        };
        if !w.is_drained() {
            return;
        }
        match w.state {
            WorkerState::Retiring => self.stop(id, false),
            WorkerState::Online => {
                if let Some(idle) = idle.filter(|_| !self.timers.is_set(Timer::Idle(id))) {
                    self.timers.set(Timer::Idle(id), idle);
                }
            }
            _ => {}
        }
    }

    /// Whether worker `id` has yet to prove it can serve (see [`startup::is_young`]).
    fn is_young(&mut self, id: WorkerId) -> bool {
        self.workers
            .get(id)
            .is_some_and(|w| startup::is_young(w.online_since.map(|t| t.elapsed()), w.handed_any()))
    }

    /// The worker broke the protocol.
    fn on_fault(&mut self, id: WorkerId, message: String) {
        tracing::warn!(worker = id.as_u64(), %message, "worker broke the protocol");
        let error = CallError::Protocol {
            worker: id,
            message: message.clone(),
        };
        self.emit(Event::Error {
            worker: Some(id),
            error: error.clone(),
        });
        if self.is_young(id) {
            // Say, a `println!` before `serve()`, or not a workfarm worker at all.
            let online = self
                .workers
                .get(id)
                .is_some_and(|w| w.online_since.is_some());
            let when = if online {
                "before it was handed a call"
            } else {
                "before its handshake"
            };
            let why = format!(
                "{} broke the protocol {when} ({message}); does it print to stdout before serving?",
                self.transport.describe()
            );
            self.fail_start(id, why, error);
        } else {
            self.pace_if_young(id);
            self.drop_worker(id, Charge::Running(error));
        }
    }

    /// Before replacing a worker the farm drops: if it never answered a call and came
    /// online less than a second ago, pace its replacement as for a young crash.
    fn pace_if_young(&mut self, id: WorkerId) {
        let young = self.workers.get(id).is_some_and(|w| {
            !w.answered
                && w.online_since
                    .is_some_and(|t| t.elapsed() < startup::EARLY_DEATH)
        });
        if young && !self.timers.is_set(Timer::Respawn) {
            let pace = self.startup.crashed_young();
            self.timers.set(Timer::Respawn, pace);
        }
    }

    /// The worker sent a Fatal frame: it cannot serve and will exit.
    fn on_fatal(&mut self, id: WorkerId, message: String) {
        let error = CallError::Protocol {
            worker: id,
            message: format!("worker gave up: {message}"),
        };
        if self.is_young(id) {
            let pid = self.workers.get(id).map_or(0, |w| w.link.pid());
            let worker = self.workers.get(id).map_or(id, |w| w.id);
            let why = format!("{worker} (pid {pid}) refused to start: {message}");
            self.fail_start(id, why, error);
        } else {
            self.pace_if_young(id);
            self.drop_worker(id, Charge::Running(error));
        }
    }

    /// The worker's frame stream ended: it answers nothing more. Usually it is exiting (a
    /// crash closes the stream first); if it lingers, it is killed after `kill_timeout`.
    /// Its calls are settled when it exits, with its exit status.
    fn on_closed(&mut self, id: WorkerId) {
        let Some(w) = self.workers.get(id) else {
            return;
        };
        if w.state != WorkerState::Stopping && !w.closed {
            tracing::debug!(worker = id.as_u64(), "worker closed its frame stream");
            w.closed = true;
            self.timers.set(Timer::Kill(id), self.settings.kill_timeout);
        }
    }

    /// A young worker failed: stop it, and count a start failure when it exits.
    fn fail_start(&mut self, id: WorkerId, why: String, error: CallError) {
        let Some(w) = self.workers.get(id) else {
            return;
        };
        w.start_failure = Some(why);
        let emptied = w.empty();
        self.stop(id, true);
        self.settle_emptied(id, emptied, Charge::Running(error.clone()), error);
    }

    /// The farm gives up on worker `id` (a fault, a fatal frame, a timeout): stop it and
    /// send its calls through the retry policy now, then start a replacement.
    fn drop_worker(&mut self, id: WorkerId, charge: Charge) {
        let Some(w) = self.workers.get(id) else {
            return;
        };
        let emptied = w.empty();
        let pinned_error = match &charge {
            Charge::Running(error) => error.clone(),
            Charge::Nobody => CallError::Protocol {
                worker: id,
                message: "worker stopped for another call (it timed out, or was cancelled)".into(),
            },
        };
        self.stop(id, true);
        self.settle_emptied(id, emptied, charge, pinned_error);
        self.ensure_workers();
    }

    fn on_exit(&mut self, id: WorkerId, exit: ExitInfo, stderr_tail: &[String]) {
        let Some(mut w) = self.workers.remove(id) else {
            return;
        };
        self.timers.cancel_worker(id);
        let pid = w.link.pid();
        tracing::debug!(worker = id.as_u64(), pid, %exit, "worker exited");
        self.emit(Event::Exited {
            worker: id,
            pid,
            exit,
        });
        let by_farm = w.state == WorkerState::Stopping;
        let life = startup::Life {
            start_failure: w.start_failure.take(),
            online_for: w.online_since.map(|t| t.elapsed()),
            handed_any: w.handed_any(),
            answered: w.answered,
            stopped_by_farm: w.state == WorkerState::Stopping,
        };
        let died = |running| CallError::WorkerDied {
            worker: id,
            pid,
            exit,
            running,
        };
        let emptied = w.empty();
        self.settle_emptied(id, emptied, Charge::Running(died(true)), died(false));
        let program = self.transport.describe();
        let stop_reason = w.stop_reason;
        let ending = startup::judge_exit(life, &program, exit, stderr_tail);
        if self.mode != Mode::Running {
            let how = match ending {
                _ if by_farm => Ended::Stopped(StopReason::ShutDown),
                Ending::Stopped => Ended::Stopped(StopReason::ShutDown),
                Ending::FailedStart(_) => Ended::FailedToStart,
                Ending::Crashed { .. } => Ended::Crashed,
            };
            self.book.ended(w.slot, how);
            return;
        }
        self.book.ended(
            w.slot,
            match &ending {
                Ending::FailedStart(_) => Ended::FailedToStart,
                Ending::Crashed { .. } => Ended::Crashed,
                Ending::Stopped => Ended::Stopped(stop_reason.unwrap_or(StopReason::ForACall)),
            },
        );
        if !matches!(ending, Ending::Stopped) {
            self.count_crash(w.slot, exit);
        }
        match ending {
            Ending::FailedStart(why) => self.start_failed(Some(id), why),
            Ending::Crashed { young } => {
                tracing::warn!(worker = id.as_u64(), pid, %exit, "worker died");
                if young && !self.timers.is_set(Timer::Respawn) {
                    let pace = self.startup.crashed_young();
                    self.timers.set(Timer::Respawn, pace);
                }
                self.ensure_workers();
            }
            // Replaced when it was stopped, or not at all (an idle worker is replaced when
            // calls need it).
            Ending::Stopped => {}
        }
    }

    /// A worker of `slot` ended on its own: quarantine may sideline the slot; if that leaves
    /// no slot, the calls waiting fail.
    fn count_crash(&mut self, slot: usize, exit: ExitInfo) {
        let Some((crashes, backoff)) = self.quarantine.crashed(slot, exit, Instant::now()) else {
            return;
        };
        tracing::warn!(slot, crashes, ?backoff, %exit, "slot quarantined: its workers keep crashing");
        self.emit(Event::Quarantined {
            slot,
            crashes,
            backoff,
            last_exit: Some(exit),
        });
        self.timers.set(Timer::Release(slot), backoff);
        if let Some(slots) = self.all_sidelined() {
            for call in self.drain_queue() {
                let error = CallError::Quarantined {
                    slots: slots.clone(),
                };
                self.fail(call, error, None);
            }
            for waiter in self.ready_waiters.drain(..) {
                let _ = waiter.send(Err(CallError::Quarantined {
                    slots: slots.clone(),
                }));
            }
        }
    }

    // ===== the retry policy, applied =====

    /// Sends the calls of a worker that went through the retry policy: running calls as
    /// `charge` says, waiting calls free (recorded as `waiting_error` if they settle or
    /// the worker died), broadcast calls failed with `waiting_error`.
    fn settle_emptied(
        &mut self,
        id: WorkerId,
        emptied: Emptied,
        charge: Charge,
        waiting_error: CallError,
    ) {
        let Emptied {
            running,
            waiting,
            pinned,
        } = emptied;
        for call in pinned {
            self.fail(call, waiting_error.clone(), Some(id.slot()));
        }
        let record = matches!(waiting_error, CallError::WorkerDied { .. });
        // Newest first, each to the front of the queue: they leave it oldest first.
        let mut all: Vec<(Call, bool)> = running
            .into_iter()
            .map(|c| (c, true))
            .chain(waiting.into_iter().map(|c| (c, false)))
            .collect();
        all.sort_by_key(|(c, _)| std::cmp::Reverse(c.id()));
        for (mut call, was_running) in all {
            self.timers.cancel(Timer::CallTimeout {
                worker: id,
                call: call.id(),
            });
            match (&charge, was_running) {
                (Charge::Running(error), true) => self.fail_running(call, error.clone(), id),
                _ => {
                    if was_running {
                        // Innocent (another call timed out): this run is not an attempt.
                        call.attempts = call.attempts.saturating_sub(1);
                    }
                    self.displace(call, waiting_error.clone(), record && !was_running);
                }
            }
        }
    }

    fn attempt_of(&self, call: &Call) -> Attempt {
        Attempt {
            attempts: call.attempts,
            displaced: call.retry.as_ref().map_or(0, |r| r.displaced),
            pinned: call.pinned.is_some(),
            accepting: self.mode == Mode::Running,
            max_retries: call.opts.as_ref().and_then(|o| o.retries),
            unwanted: call.reply.is_closed() || call.expired(),
        }
    }

    /// A running attempt failed with `error` on `worker`: re-queue it charged, or settle.
    fn fail_running(&mut self, mut call: Call, error: CallError, worker: WorkerId) {
        match self.retry.failed(&error, self.attempt_of(&call)) {
            Verdict::RequeueCharged | Verdict::RequeueFree => {
                tracing::debug!(call = call.id(), attempt = call.attempts, %error, "retrying call");
                self.book.retried(worker.slot());
                let retry = call.retry_mut();
                retry.avoid = Some(worker);
                retry.failures.push(error);
                // The next attempt's wait starts now.
                call.taken = self.book.now();
                self.queue.push_front(call);
            }
            Verdict::Settle => {
                let earlier = call.retry.take().map(|r| r.failures).unwrap_or_default();
                let error = self.retry.final_error(error, call.attempts, earlier);
                self.fail(call, error, Some(worker.slot()));
            }
        }
    }

    /// A call lost its worker through no fault of its own: re-queue it free, or settle it
    /// (the farm is stopping: `ShutDown`; a broadcast, or displaced too often: `error`).
    fn displace(&mut self, mut call: Call, error: CallError, record: bool) {
        match self.retry.displaced(self.attempt_of(&call)) {
            Verdict::Settle if self.mode != Mode::Running => {
                let slot = last_slot(&call);
                self.fail(call, CallError::ShutDown, slot);
            }
            Verdict::Settle => {
                let earlier = call.retry.take().map(|r| r.failures).unwrap_or_default();
                let slot = last_slot(&call).or_else(|| match &error {
                    CallError::WorkerDied { worker, .. } | CallError::Protocol { worker, .. } => {
                        Some(worker.slot())
                    }
                    _ => None,
                });
                let error = self.retry.final_error(error, call.attempts, earlier);
                self.fail(call, error, slot);
            }
            Verdict::RequeueFree | Verdict::RequeueCharged => {
                tracing::trace!(call = call.id(), "re-queued free");
                let retry = call.retry_mut();
                retry.displaced += 1;
                if record {
                    retry.failures.push(error);
                }
                self.queue.push_front(call);
            }
        }
    }

    /// Counts a start failure, backs off before the next spawn, and fails calls fast once no
    /// worker has started for a while.
    fn start_failed(&mut self, worker: Option<WorkerId>, why: String) {
        let verdict = self.startup.failed(&why, self.workers.online() > 0);
        tracing::warn!(failures = self.startup.failures(), %why, "worker failed to start");
        let error = CallError::WorkerStart { message: why };
        self.emit(Event::Error {
            worker,
            error: error.clone(),
        });
        if verdict.fail_ready {
            // Whoever waits for every worker to be ready will not see that happen soon.
            for waiter in self.ready_waiters.drain(..) {
                let _ = waiter.send(Err(error.clone()));
            }
        }
        if verdict.fail_calls {
            for call in self.drain_queue() {
                self.fail(call, error.clone(), None);
            }
            // Calls still in the channel are taken (and failed) by the next turns.
        }
        if self.mode == Mode::Running && !self.timers.is_set(Timer::Respawn) {
            self.timers.set(Timer::Respawn, verdict.backoff);
        }
    }

    // ===== timers =====

    fn fire_timers(&mut self) {
        let now = Instant::now();
        while let Some(timer) = self.timers.pop_due(now) {
            self.fire(timer);
        }
    }

    fn fire(&mut self, timer: Timer) {
        match timer {
            Timer::CallTimeout { worker, call } => self.on_call_timeout(worker, call),
            Timer::Idle(id) => {
                let may_shrink = self.bounds.may_shrink(self.workers.live());
                let Some(w) = self.workers.get(id) else {
                    return;
                };
                if w.state == WorkerState::Online && w.is_drained() {
                    if !may_shrink {
                        return;
                    }
                    w.stop_reason.get_or_insert(StopReason::Idle);
                    tracing::debug!(worker = id.as_u64(), "idle time reached");
                    self.emit(Event::IdleReached { worker: id });
                    // Not replaced until calls need it: the point is to give memory back.
                    self.size = self.size.saturating_sub(1).max(self.bounds.floor);
                    self.stop(id, false);
                }
            }
            Timer::Kill(id) => {
                if let Some(w) = self.workers.get(id) {
                    tracing::debug!(worker = id.as_u64(), "kill timeout: sending SIGKILL");
                    w.link.kill();
                }
            }
            Timer::Startup(id) => {
                let Some(w) = self.workers.get(id) else {
                    return;
                };
                if w.state == WorkerState::Starting {
                    w.start_failure = Some(format!(
                        "{} ({}, pid {}) was not ready within {:?}: its handshake, set-up \
                         included, takes longer than startup_timeout (raise \
                         FarmOptions::startup_timeout for a slow Worker::setup)",
                        self.transport.describe(),
                        w.id,
                        w.link.pid(),
                        self.settings.startup_timeout
                    ));
                    self.stop(id, true);
                }
            }
            Timer::Respawn => self.ensure_workers(),
            Timer::Resume(slot) => self.resume(slot),
            Timer::Release(slot) => {
                if self.quarantine.release(slot) {
                    tracing::info!(slot, "quarantine over: starting a worker in the slot again");
                    self.emit(Event::Released { slot });
                    self.ensure_workers();
                }
            }
            Timer::MemoryCheck => self.check_memory(),
            Timer::StallCheck => self.check_stalls(),
            Timer::OrphanCheck => {
                // Calls given up on while they waited in the channel are not seen there:
                // take them out. The check itself is in `after_turn`.
                self.sweep_abandoned();
                if self.mode == Mode::Running {
                    self.timers.set(Timer::OrphanCheck, ORPHAN_CHECK);
                }
            }
        }
    }

    /// A call ran past `timeout`: it fails (or is retried), its worker is stopped, and the
    /// calls that shared the worker go back to the queue free.
    fn on_call_timeout(&mut self, id: WorkerId, call: u64) {
        let Some(w) = self.workers.get(id) else {
            return;
        };
        let Some(culprit) = w.take(call) else { return };
        let after = culprit
            .opts
            .as_ref()
            .and_then(|o| o.timeout)
            .or(self.settings.timeout)
            .unwrap_or_default();
        tracing::debug!(
            worker = id.as_u64(),
            call,
            ?after,
            "call timed out; stopping its worker"
        );
        self.drop_worker(id, Charge::Nobody);
        if culprit.expired() {
            self.fail(culprit, CallError::Deadline { ran: true }, Some(id.slot()));
        } else {
            self.fail_running(culprit, CallError::Timeout { after }, id);
        }
    }

    fn check_memory(&mut self) {
        for id in self.workers.ids() {
            let Some(w) = self.workers.get(id) else {
                continue;
            };
            if w.state != WorkerState::Online {
                continue;
            }
            if let Some(rss) = self.recycle.memory_exceeded(w.link.memory()) {
                tracing::debug!(worker = id.as_u64(), rss, "memory limit reached");
                self.retire(id, Event::MemoryLimitReached { worker: id, rss });
            }
        }
        if self.mode == Mode::Running {
            self.timers.set(Timer::MemoryCheck, MEMORY_CHECK_INTERVAL);
        }
    }

    // ===== events =====

    fn emit(&self, event: Event) {
        let _ = self.events.send(event);
    }

    fn emit_call_done(&self, worker: WorkerId, call: u64, ok: bool) {
        if self.subscribed.load(Ordering::Relaxed) {
            self.emit(Event::CallDone { worker, call, ok });
        }
    }
}

/// The error for a failure a worker reported.
pub(crate) fn failure_error(kind: FailureKind, method: String, message: String) -> CallError {
    match kind {
        FailureKind::Handler => CallError::Handler { method, message },
        FailureKind::Panic => CallError::Panic { method, message },
        FailureKind::UnknownMethod => CallError::UnknownMethod { method },
        FailureKind::BadArguments => CallError::BadArguments { method, message },
        FailureKind::BadResult => CallError::Handler {
            method,
            message: format!("could not encode the result: {message}"),
        },
        FailureKind::Cancelled => CallError::Cancelled,
        FailureKind::Refused => CallError::Refused {
            refusals: vec![Refusal {
                worker: None,
                backoff: None,
                reason: message,
            }],
        },
    }
}

/// How long an attempt of `call` starting now may run: its own timeout or the farm's, cut
/// short by its deadline.
fn limit_for(settings: &Settings, call: &Call) -> Option<Duration> {
    let Some(opts) = &call.opts else {
        return settings.timeout;
    };
    let timeout = opts.timeout.or(settings.timeout);
    if call.reply.is_closed() {
        // Nobody waits for a cancelled call: its deadline no longer matters.
        return timeout;
    }
    let left = opts
        .deadline
        .map(|d| d.saturating_duration_since(Instant::now()));
    match (timeout, left) {
        (Some(t), Some(l)) => Some(t.min(l)),
        (t, l) => t.or(l),
    }
}

/// The slot where `call` last failed, if it did (for the statistics).
fn last_slot(call: &Call) -> Option<usize> {
    call.avoid().map(WorkerId::slot)
}

/// The handshake for a worker of `slot`.
fn hello_of(hellos: &[Box<[u8]>], slot: usize) -> &[u8] {
    hellos
        .get(slot)
        .or(hellos.first())
        .map_or(&[][..], |h| &h[..])
}

/// How worker `w` runs `method` (sync until its handshake says otherwise).
fn kind_for<L>(w: &Worker<L>, method: &str) -> Kind {
    w.caps().map_or(Kind::Sync, |c| c.kind_of(method))
}

#[cfg(test)]
#[path = "dispatcher_tests.rs"]
mod tests;
