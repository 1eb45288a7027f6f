//! The one task that owns a farm's state.
//!
//! Callers send [`Command`]s; worker tasks send [`Inbound`] messages; timers fire. The
//! dispatcher reacts to each in order, never awaits anything else, and does no I/O beyond
//! queueing frames on a worker's link, so every policy (dispatch, retries, timeouts, ttl,
//! idle, startup backoff, shutdown) lives here as plain bookkeeping.

use super::call::{Call, Outcome, Reply};
use super::process::{self, Inbound, SpawnSpec, WorkerLink};
use crate::error::CallError;
use crate::event::{Event, WorkerId};
use crate::protocol::{FailureKind, FromWorker, PROTOCOL_VERSION};
use crate::sys::Signal;
use crate::{Status, WorkerState, WorkerStatus};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;

/// Consecutive start failures, with no worker online, after which calls fail fast.
const START_FAILURES_BEFORE_FAILING: u32 = 3;
const RESPAWN_BACKOFF_FIRST: Duration = Duration::from_millis(50);
const RESPAWN_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A worker that dies on its own this soon after its handshake, having answered nothing,
/// counts as failing to start.
const EARLY_DEATH: Duration = Duration::from_secs(1);
/// Stands in for a deadline too far away to represent.
const FAR_FUTURE: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
/// How often workers' memory is measured when `max_memory` is set.
const MEMORY_CHECK_INTERVAL: Duration = Duration::from_millis(500);

/// A request from a [`Farm`](crate::Farm) handle, other than a call.
#[derive(Debug)]
pub(crate) enum Command {
    Broadcast {
        frame: Box<[u8]>,
        replies: oneshot::Sender<Vec<(WorkerId, oneshot::Receiver<Outcome>)>>,
    },
    Status(oneshot::Sender<Status>),
    /// Answer once every worker is online, or no worker can start, or the farm stops.
    Ready(oneshot::Sender<Result<(), CallError>>),
    Shutdown(oneshot::Sender<()>),
    Kill(oneshot::Sender<()>),
}

/// The farm's settings, without the serializer (the dispatcher only moves bytes).
#[derive(Debug)]
pub(crate) struct Settings {
    pub(crate) spawn: SpawnSpec,
    pub(crate) hello: Box<[u8]>,
    pub(crate) workers: usize,
    pub(crate) per_worker: usize,
    pub(crate) max_retries: u32,
    pub(crate) retry_handler_errors: bool,
    pub(crate) timeout: Option<Duration>,
    pub(crate) ttl: Option<u64>,
    pub(crate) max_idle_time: Option<Duration>,
    pub(crate) max_memory: Option<u64>,
    pub(crate) kill_timeout: Duration,
    pub(crate) startup_timeout: Duration,
}

type TimerKey = (Instant, u64);

/// Hashes call ids (farm-unique sequence numbers, never chosen by a user or a child) with
/// one multiplication instead of SipHash: the in-flight table is touched twice per call.
type CallIdHash = std::hash::BuildHasherDefault<CallIdHasher>;

#[derive(Debug, Default)]
struct CallIdHasher(u64);

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

#[derive(Debug, Clone, Copy)]
enum Timer {
    CallTimeout { worker: WorkerId, call: u64 },
    Idle(WorkerId),
    Kill(WorkerId),
    Startup(WorkerId),
    Respawn,
    MemoryCheck,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Running,
    ShuttingDown,
    Killed,
}

#[derive(Debug)]
struct InFlight {
    call: Call,
    timer: Option<TimerKey>,
}

#[derive(Debug)]
struct Worker {
    id: WorkerId,
    link: WorkerLink,
    state: WorkerState,
    in_flight: HashMap<u64, InFlight, CallIdHash>,
    /// Broadcast calls waiting for this worker.
    pinned: VecDeque<Call>,
    /// Calls handed to it so far (for `ttl`).
    handed: u64,
    idle_timer: Option<TimerKey>,
    /// Set when the farm stopped the worker before it proved itself: why it failed to start.
    start_failure: Option<String>,
    /// When it came online, while it has answered nothing yet: a worker that dies on its
    /// own shortly after is counted as failing to start (backoff, no hot respawn loop).
    online_since: Option<Instant>,
}

impl Worker {
    fn is_live(&self) -> bool {
        matches!(self.state, WorkerState::Starting | WorkerState::Online)
    }

    fn is_drained(&self) -> bool {
        self.in_flight.is_empty() && self.pinned.is_empty()
    }
}

pub(crate) struct Dispatcher {
    settings: Settings,
    /// New calls wait here until a worker has room: this channel is the farm's queue.
    calls: mpsc::UnboundedReceiver<Call>,
    commands: mpsc::UnboundedReceiver<Command>,
    inbound: mpsc::UnboundedReceiver<Inbound>,
    inbound_tx: mpsc::UnboundedSender<Inbound>,
    events: broadcast::Sender<Event>,
    /// Whether anyone subscribed to events; per-call events are skipped until then.
    subscribed: Arc<AtomicBool>,
    workers: Vec<Worker>,
    /// Where each worker sits in `workers`.
    index: HashMap<WorkerId, usize>,
    /// Online workers with room, least loaded first, so picking one does not scan every
    /// worker. Entries are never updated in place: one is pushed whenever a worker's load
    /// changes, and entries that no longer match their worker are dropped as they surface.
    candidates: BinaryHeap<Reverse<(usize, u64, WorkerId)>>,
    candidate_seq: u64,
    /// Calls taken from the channel (or re-queued after a failure) and not yet handed to a
    /// worker; served before the channel.
    queue: VecDeque<Call>,
    timers: BTreeMap<TimerKey, Timer>,
    timer_seq: u64,
    next_worker: u64,
    mode: Mode,
    start_failures: u32,
    /// Set after repeated start failures with no worker online: calls fail fast with it.
    start_error: Option<String>,
    respawn_timer: Option<TimerKey>,
    waiters: Vec<oneshot::Sender<()>>,
    ready_waiters: Vec<oneshot::Sender<Result<(), CallError>>>,
}

impl Dispatcher {
    pub(crate) fn new(
        settings: Settings,
        calls: mpsc::UnboundedReceiver<Call>,
        commands: mpsc::UnboundedReceiver<Command>,
        events: broadcast::Sender<Event>,
        subscribed: Arc<AtomicBool>,
    ) -> Self {
        let (inbound_tx, inbound) = mpsc::unbounded_channel();
        Dispatcher {
            settings,
            calls,
            commands,
            inbound,
            inbound_tx,
            events,
            subscribed,
            workers: Vec::new(),
            index: HashMap::new(),
            candidates: BinaryHeap::new(),
            candidate_seq: 0,
            queue: VecDeque::new(),
            timers: BTreeMap::new(),
            timer_seq: 0,
            next_worker: 0,
            mode: Mode::Running,
            start_failures: 0,
            start_error: None,
            respawn_timer: None,
            waiters: Vec::new(),
            ready_waiters: Vec::new(),
        }
    }

    /// Starts the first workers; a spawn error here is returned to `Farm::create`.
    pub(crate) fn start(&mut self) -> std::io::Result<()> {
        for _ in 0..self.settings.workers {
            let id = self.new_worker_id();
            let link = process::spawn(
                &self.settings.spawn,
                id,
                &self.settings.hello,
                self.inbound_tx.clone(),
            )?;
            self.add_worker(id, link);
        }
        if self.settings.max_memory.is_some() {
            self.add_timer(MEMORY_CHECK_INTERVAL, Timer::MemoryCheck);
        }
        Ok(())
    }

    pub(crate) async fn run(mut self) {
        let mut commands_open = true;
        let mut calls_open = true;
        let mut inbound_buf = Vec::with_capacity(64);
        let mut command_buf = Vec::with_capacity(16);
        let mut call_buf = Vec::with_capacity(256);
        let sleep = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(sleep);
        let mut armed: Option<Instant> = None;

        loop {
            let deadline = self.timers.keys().next().map(|k| k.0);
            if deadline.is_some() && deadline != armed {
                if let Some(d) = deadline {
                    sleep.as_mut().reset(d);
                }
            }
            armed = deadline;
            // Take new calls only as fast as workers can start them; the rest wait in the
            // channel. Calls are also taken to fail them fast, and one at a time while workers
            // are missing (idle-reaped, crashed), so an arriving call wakes us to spawn them.
            let room = if self.queue.is_empty() && self.mode == Mode::Running {
                if self.start_error.is_some() {
                    call_buf.capacity()
                } else if self.live_workers() < self.settings.workers {
                    self.free_slots().max(1)
                } else {
                    self.free_slots()
                }
            } else {
                0
            };
            tokio::select! {
                biased;
                n = self.inbound.recv_many(&mut inbound_buf, 64) => {
                    if n > 0 {
                        for message in inbound_buf.drain(..) {
                            self.on_inbound(message);
                        }
                    }
                }
                n = self.commands.recv_many(&mut command_buf, 256), if commands_open => {
                    if n == 0 {
                        // Every Farm handle is gone: nobody can wait for calls any more.
                        commands_open = false;
                        tracing::debug!("farm dropped; killing workers");
                        self.kill();
                    }
                    for command in command_buf.drain(..) {
                        self.on_command(command);
                    }
                }
                n = self.calls.recv_many(&mut call_buf, room.clamp(1, 1024)), if calls_open && room > 0 => {
                    if n == 0 {
                        calls_open = false;
                    }
                    for call in call_buf.drain(..) {
                        self.on_call(call);
                    }
                }
                () = &mut sleep, if deadline.is_some() => self.fire_timers(),
            }
            self.pump();
            for worker in &mut self.workers {
                worker.link.flush();
            }
            if !self.ready_waiters.is_empty() {
                self.answer_ready_waiters();
            }
            // Calls are waiting: make sure workers exist to run them (replacing idle-reaped
            // or lost ones; a no-op while enough are live, or while backing off).
            if self.mode == Mode::Running && !(self.queue.is_empty() && self.calls.is_empty()) {
                self.ensure_workers();
            }
            if self.mode != Mode::Running && self.workers.is_empty() {
                break;
            }
        }
        for waiter in self.waiters.drain(..) {
            let _ = waiter.send(());
        }
        tracing::debug!("farm stopped");
    }

    // ===== commands =====

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Broadcast { frame, replies } => self.on_broadcast(frame, replies),
            Command::Status(tx) => {
                let _ = tx.send(self.status());
            }
            Command::Ready(tx) => {
                self.ready_waiters.push(tx);
                // Idle-reaped workers are replaced on demand; waiting for them is demand.
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
        }
    }

    fn on_call(&mut self, call: Call) {
        if self.mode != Mode::Running {
            call.reply.send(Err(CallError::ShutDown));
            return;
        }
        if call.reply.is_closed() {
            // The caller gave up while the call waited.
            return;
        }
        if let Some(message) = &self.start_error {
            call.reply.send(Err(CallError::WorkerStart {
                message: message.clone(),
            }));
            return;
        }
        tracing::trace!(call = call.id(), method = call.method(), "call taken");
        self.queue.push_back(call);
    }

    fn on_broadcast(
        &mut self,
        frame: Box<[u8]>,
        replies: oneshot::Sender<Vec<(WorkerId, oneshot::Receiver<Outcome>)>>,
    ) {
        let mut receivers = Vec::new();
        if self.mode == Mode::Running {
            for worker in self.workers.iter_mut().filter(|w| w.is_live()) {
                let (reply, rx) = Reply::new(None);
                worker
                    .pinned
                    .push_back(Call::new(frame.clone(), Some(worker.id), reply));
                receivers.push((worker.id, rx));
            }
        }
        let _ = replies.send(receivers);
    }

    /// Graceful: fail what is queued, let what is in flight finish, then stop each worker.
    fn shutdown(&mut self) {
        if self.mode != Mode::Running {
            return;
        }
        tracing::debug!(queued = self.queue.len(), "farm shutting down");
        self.mode = Mode::ShuttingDown;
        self.fail_queued();
        for i in 0..self.workers.len() {
            let w = &mut self.workers[i];
            for call in w.pinned.drain(..) {
                call.reply.send(Err(CallError::ShutDown));
            }
            if w.in_flight.is_empty() {
                self.stop(i, false);
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
        for i in 0..self.workers.len() {
            let w = &mut self.workers[i];
            for call in w.pinned.drain(..) {
                call.reply.send(Err(CallError::ShutDown));
            }
            for (_, f) in w.in_flight.drain() {
                f.call.reply.send(Err(CallError::ShutDown));
                if let Some(key) = f.timer {
                    self.timers.remove(&key);
                }
            }
            self.stop(i, true);
        }
    }

    /// Fails every call not yet handed to a worker, and refuses new ones from now on.
    fn fail_queued(&mut self) {
        for call in self.queue.drain(..) {
            call.reply.send(Err(CallError::ShutDown));
        }
        self.calls.close();
        while let Ok(call) = self.calls.try_recv() {
            call.reply.send(Err(CallError::ShutDown));
        }
    }

    fn answer_ready_waiters(&mut self) {
        let answer = if self.mode != Mode::Running {
            Err(CallError::ShutDown)
        } else if let Some(message) = &self.start_error {
            Err(CallError::WorkerStart {
                message: message.clone(),
            })
        } else if self
            .workers
            .iter()
            .filter(|w| w.state == WorkerState::Online)
            .count()
            >= self.settings.workers
        {
            Ok(())
        } else {
            return;
        };
        for waiter in self.ready_waiters.drain(..) {
            let _ = waiter.send(answer.clone());
        }
    }

    /// Calls the online workers can start now.
    fn free_slots(&self) -> usize {
        let per_worker = self.settings.per_worker;
        self.workers
            .iter()
            .filter(|w| w.state == WorkerState::Online)
            .map(|w| per_worker.saturating_sub(w.in_flight.len()))
            .fold(0, usize::saturating_add)
    }

    /// Workers starting or online (not retiring or stopping).
    fn live_workers(&self) -> usize {
        self.workers.iter().filter(|w| w.is_live()).count()
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
                    in_flight: w.in_flight.len(),
                    handed: w.handed,
                })
                .collect(),
            queued: self.queue.len() + self.calls.len(),
        }
    }

    // ===== dispatch =====

    /// Hands queued calls to workers while any has room.
    fn pump(&mut self) {
        let per_worker = self.settings.per_worker;
        for i in 0..self.workers.len() {
            while self.workers[i].in_flight.len() < per_worker
                && matches!(
                    self.workers[i].state,
                    WorkerState::Online | WorkerState::Retiring
                )
            {
                let Some(call) = self.workers[i].pinned.pop_front() else {
                    break;
                };
                self.hand(i, call);
            }
        }
        while let Some(front) = self.queue.front() {
            if front.reply.is_closed() {
                // The caller gave up while the call waited: skip it.
                self.queue.pop_front();
                continue;
            }
            let Some(i) = self.pick(front.avoid()) else {
                break;
            };
            if let Some(call) = self.queue.pop_front() {
                self.hand(i, call);
            }
        }
    }

    /// The least-loaded worker that takes new calls, avoiding `avoid` if another has room.
    /// Costs O(log workers), not a scan.
    fn pick(&mut self, avoid: Option<WorkerId>) -> Option<usize> {
        #[cfg(debug_assertions)]
        let expected = self.pick_by_scan(avoid).map(|j| self.load_key(j, avoid));
        let per_worker = self.settings.per_worker;
        let mut held = None;
        let found = loop {
            let Some(Reverse((load, seq, id))) = self.candidates.pop() else {
                break None;
            };
            let Some(&i) = self.index.get(&id) else {
                continue;
            };
            let w = &self.workers[i];
            if w.state != WorkerState::Online || w.in_flight.len() != load || load >= per_worker {
                continue; // stale
            }
            if Some(id) == avoid {
                held.get_or_insert((load, seq, id, i));
                continue;
            }
            break Some(i);
        };
        let picked = match (found, held) {
            (Some(i), Some((load, seq, id, _))) => {
                self.candidates.push(Reverse((load, seq, id)));
                Some(i)
            }
            (Some(i), None) => Some(i),
            (None, Some((.., i))) => Some(i),
            (None, None) => None,
        };
        #[cfg(debug_assertions)]
        debug_assert_eq!(
            picked.map(|i| self.load_key(i, avoid)),
            expected,
            "candidate heap out of step"
        );
        picked
    }

    /// Offers worker `i` to `pick` at its current load, if it takes calls.
    fn offer(&mut self, i: usize) {
        let w = &self.workers[i];
        if w.state != WorkerState::Online || w.in_flight.len() >= self.settings.per_worker {
            return;
        }
        self.candidate_seq += 1;
        let entry = Reverse((w.in_flight.len(), self.candidate_seq, w.id));
        self.candidates.push(entry);
        // Stale entries are dropped as they surface; bound them anyway.
        if self.candidates.len() > 8 * self.workers.len() + 64 {
            self.candidates.clear();
            for j in 0..self.workers.len() {
                let w = &self.workers[j];
                if w.state == WorkerState::Online && w.in_flight.len() < self.settings.per_worker {
                    self.candidate_seq += 1;
                    self.candidates
                        .push(Reverse((w.in_flight.len(), self.candidate_seq, w.id)));
                }
            }
        }
    }

    /// What `pick` minimises: avoided last, then load.
    #[cfg(debug_assertions)]
    fn load_key(&self, i: usize, avoid: Option<WorkerId>) -> (bool, usize) {
        let w = &self.workers[i];
        (Some(w.id) == avoid, w.in_flight.len())
    }

    /// `pick` by scanning every worker: the reference the heap is checked against in debug
    /// builds (every test run).
    #[cfg(debug_assertions)]
    fn pick_by_scan(&self, avoid: Option<WorkerId>) -> Option<usize> {
        let per_worker = self.settings.per_worker;
        (0..self.workers.len())
            .filter(|&i| {
                let w = &self.workers[i];
                w.state == WorkerState::Online && w.in_flight.len() < per_worker
            })
            .min_by_key(|&i| self.load_key(i, avoid))
    }

    fn hand(&mut self, i: usize, mut call: Call) {
        call.attempts += 1;
        let timer = self.settings.timeout.map(|t| {
            let worker = self.workers[i].id;
            self.add_timer(
                t,
                Timer::CallTimeout {
                    worker,
                    call: call.id(),
                },
            )
        });
        let w = &mut self.workers[i];
        if let Some(key) = w.idle_timer.take() {
            self.timers.remove(&key);
        }
        tracing::trace!(
            call = call.id(),
            worker = w.id.as_u64(),
            attempt = call.attempts,
            "call sent"
        );
        w.link.send(&call.frame);
        // Broadcast calls do not count towards a worker's ttl.
        let counts_for_ttl = call.pinned.is_none();
        w.in_flight.insert(call.id(), InFlight { call, timer });
        if counts_for_ttl {
            w.handed += 1;
            if self.settings.ttl == Some(w.handed) && w.state == WorkerState::Online {
                let worker = w.id;
                tracing::debug!(worker = worker.as_u64(), "ttl reached");
                self.retire(i, Event::TtlReached { worker });
            }
        }
        self.offer(i);
    }

    /// Worker `i` takes no new calls, finishes what it has, and is replaced now.
    fn retire(&mut self, i: usize, why: Event) {
        self.workers[i].state = WorkerState::Retiring;
        self.emit(why);
        if self.workers[i].is_drained() {
            self.stop(i, false);
        }
        self.ensure_workers();
    }

    /// Spawns workers until `workers` are starting or online (unless backing off).
    fn ensure_workers(&mut self) {
        if self.mode != Mode::Running || self.respawn_timer.is_some() {
            return;
        }
        for _ in self.live_workers()..self.settings.workers {
            if !self.spawn_worker() {
                break;
            }
        }
    }

    fn spawn_worker(&mut self) -> bool {
        let id = self.new_worker_id();
        match process::spawn(
            &self.settings.spawn,
            id,
            &self.settings.hello,
            self.inbound_tx.clone(),
        ) {
            Ok(link) => {
                self.add_worker(id, link);
                true
            }
            Err(e) => {
                let message = format!(
                    "could not spawn {}: {e}",
                    self.settings.spawn.program.display()
                );
                self.start_failed(Some(id), message, true);
                false
            }
        }
    }

    fn add_worker(&mut self, id: WorkerId, link: WorkerLink) {
        let pid = link.pid();
        tracing::debug!(worker = id.as_u64(), pid, "worker spawned");
        self.emit(Event::Spawned { worker: id, pid });
        self.add_timer(self.settings.startup_timeout, Timer::Startup(id));
        self.index.insert(id, self.workers.len());
        self.workers.push(Worker {
            id,
            link,
            state: WorkerState::Starting,
            in_flight: HashMap::default(),
            pinned: VecDeque::new(),
            handed: 0,
            idle_timer: None,
            start_failure: None,
            online_since: None,
        });
    }

    // ===== worker messages =====

    fn on_inbound(&mut self, inbound: Inbound) {
        match inbound {
            Inbound::Messages { worker, messages } => {
                let Some(i) = self.index_of(worker) else {
                    return;
                };
                for message in messages {
                    self.on_message(i, message);
                }
                self.after_reply(i);
            }
            Inbound::Fault { worker, message } => {
                let Some(i) = self.index_of(worker) else {
                    return;
                };
                tracing::warn!(worker = worker.as_u64(), %message, "worker broke the protocol");
                self.emit(Event::Error {
                    worker: Some(worker),
                    error: CallError::Protocol {
                        worker,
                        message: message.clone(),
                    },
                });
                if self.is_young(i) {
                    // Say, a `println!` before `serve()`, or not a workfarm worker at all:
                    // a start failure (backoff, then fail fast), not a crash to respawn at once.
                    let when = if self.workers[i].state == WorkerState::Starting {
                        "before its handshake"
                    } else {
                        "before answering anything"
                    };
                    let why = format!(
                        "{} broke the protocol {when} ({message}); does it print to stdout before serving?",
                        self.settings.spawn.program.display()
                    );
                    self.fail_young_worker(i, why, CallError::Protocol { worker, message });
                    return;
                }
                self.lose_worker(i, CallError::Protocol { worker, message });
            }
            Inbound::Exited {
                worker,
                exit,
                stderr_tail,
            } => {
                let Some(i) = self.index_of(worker) else {
                    return;
                };
                let w = self.workers.swap_remove(i);
                self.index.remove(&worker);
                if let Some(moved) = self.workers.get(i) {
                    self.index.insert(moved.id, i);
                }
                let pid = w.link.pid();
                tracing::debug!(worker = worker.as_u64(), pid, %exit, "worker exited");
                self.emit(Event::Exited { worker, pid, exit });
                for key in w
                    .idle_timer
                    .iter()
                    .chain(w.in_flight.values().filter_map(|f| f.timer.as_ref()))
                {
                    self.timers.remove(key);
                }
                let error = CallError::WorkerDied { worker, pid, exit };
                let was_live = w.is_live();
                // Died on its own soon after its handshake, having answered nothing: broken
                // at start, even if calls were already handed to it.
                let died_young = w.state == WorkerState::Online
                    && w.online_since.is_some_and(|t| t.elapsed() < EARLY_DEATH);
                // With calls in flight, one of them may be a poison pill rather than the
                // worker being broken: back off, but do not fail every call fast for it.
                let blame_worker = w.is_drained();
                let describe = |what: &str| {
                    let mut why = format!(
                        "{} {what} with {exit}",
                        self.settings.spawn.program.display()
                    );
                    if !stderr_tail.is_empty() {
                        why.push_str("; last stderr lines:\n");
                        why.push_str(&stderr_tail.join("\n"));
                    }
                    why
                };
                let failed_start = match (w.state, w.start_failure) {
                    (_, Some(why)) => Some(why),
                    (WorkerState::Starting, None) => Some(describe("exited during startup")),
                    (_, None) if died_young => Some(describe("exited right after its handshake")),
                    _ => None,
                };
                for call in w.pinned {
                    call.reply.send(Err(error.clone()));
                }
                for (_, f) in w.in_flight {
                    self.fail_attempt(f.call, error.clone(), worker);
                }
                if let Some(why) = failed_start {
                    self.start_failed(Some(worker), why, blame_worker);
                } else if was_live {
                    if self.mode == Mode::Running {
                        tracing::warn!(worker = worker.as_u64(), pid, %exit, "worker died");
                    }
                    self.ensure_workers();
                }
            }
        }
    }

    fn on_message(&mut self, i: usize, message: FromWorker) {
        let worker = self.workers[i].id;
        if matches!(message, FromWorker::Ok { .. } | FromWorker::Err { .. })
            && self.workers[i].online_since.take().is_some()
        {
            self.start_failures = 0;
        }
        match message {
            FromWorker::Ok { id, body } => {
                let Some(f) = self.workers[i].in_flight.remove(&id) else {
                    return;
                };
                if let Some(key) = f.timer {
                    self.timers.remove(&key);
                }
                self.emit_call_done(worker, id, true);
                f.call.reply.send(Ok(body));
            }
            FromWorker::Err { id, kind, message } => {
                let Some(f) = self.workers[i].in_flight.remove(&id) else {
                    return;
                };
                if let Some(key) = f.timer {
                    self.timers.remove(&key);
                }
                self.emit_call_done(worker, id, false);
                let method = f.call.method().to_owned();
                let error = match kind {
                    FailureKind::Handler => CallError::Handler { method, message },
                    FailureKind::Panic => CallError::Panic { method, message },
                    FailureKind::UnknownMethod => CallError::UnknownMethod { method },
                    FailureKind::BadArguments => CallError::BadArguments { method, message },
                    FailureKind::BadResult => CallError::Handler {
                        method,
                        message: format!("could not encode the result: {message}"),
                    },
                };
                self.fail_attempt(f.call, error, worker);
            }
            FromWorker::Ready { version, pid } => {
                let w = &mut self.workers[i];
                if w.state != WorkerState::Starting {
                    return;
                }
                if version != PROTOCOL_VERSION {
                    let why = format!(
                        "worker speaks protocol version {version}, the farm speaks {PROTOCOL_VERSION}"
                    );
                    w.start_failure = Some(why);
                    self.stop(i, true);
                    return;
                }
                w.state = WorkerState::Online;
                w.online_since = Some(Instant::now());
                tracing::debug!(worker = worker.as_u64(), pid, "worker online");
                // Calls may be taken again; the failure count (and so the backoff) is only
                // reset once this worker proves itself by answering a call.
                self.start_error = None;
                self.emit(Event::Online { worker, pid });
                if self.mode != Mode::Running {
                    self.stop(i, false);
                }
            }
            FromWorker::Fatal { message } => {
                if self.is_young(i) {
                    let error = CallError::Protocol {
                        worker,
                        message: format!("worker gave up: {message}"),
                    };
                    self.fail_young_worker(i, format!("worker refused to start: {message}"), error);
                } else {
                    self.lose_worker(
                        i,
                        CallError::Protocol {
                            worker,
                            message: format!("worker gave up: {message}"),
                        },
                    );
                }
            }
        }
    }

    /// Whether worker `i` has not proven itself yet: still starting, or online for less than
    /// `EARLY_DEATH` without answering a call.
    fn is_young(&self, i: usize) -> bool {
        let w = &self.workers[i];
        w.state == WorkerState::Starting
            || (w.state == WorkerState::Online
                && w.online_since.is_some_and(|t| t.elapsed() < EARLY_DEATH))
    }

    /// A young worker failed: stop it, count a start failure when it exits (backoff, not an
    /// immediate respawn), and send its calls through the retry policy.
    fn fail_young_worker(&mut self, i: usize, why: String, error: CallError) {
        self.workers[i].start_failure = Some(why);
        self.stop_and_fail_calls(i, error);
    }

    /// After a batch of replies: stop a retiring worker that is done, or start its idle clock.
    fn after_reply(&mut self, i: usize) {
        self.offer(i);
        let w = &mut self.workers[i];
        if !w.is_drained() {
            return;
        }
        match w.state {
            WorkerState::Retiring => self.stop(i, false),
            WorkerState::Online if w.idle_timer.is_none() => {
                if let Some(idle) = self.settings.max_idle_time {
                    let id = w.id;
                    let key = self.add_timer(idle, Timer::Idle(id));
                    self.workers[i].idle_timer = Some(key);
                }
            }
            _ => {}
        }
    }

    /// The farm gives up on worker `i` (timeout or protocol violation): stop it, re-queue
    /// its calls, start a replacement.
    fn lose_worker(&mut self, i: usize, error: CallError) {
        self.stop_and_fail_calls(i, error);
        self.ensure_workers();
    }

    /// Stops worker `i` (SIGTERM, then SIGKILL) and sends each of its calls through the
    /// retry policy with `error`; its broadcast calls fail with it.
    fn stop_and_fail_calls(&mut self, i: usize, error: CallError) {
        let worker = self.workers[i].id;
        let calls: Vec<InFlight> = self.workers[i].in_flight.drain().map(|(_, f)| f).collect();
        for call in self.workers[i].pinned.drain(..) {
            call.reply.send(Err(error.clone()));
        }
        self.stop(i, true);
        for f in calls {
            if let Some(key) = f.timer {
                self.timers.remove(&key);
            }
            self.fail_attempt(f.call, error.clone(), worker);
        }
    }

    /// Applies the retry policy to a failed attempt: re-queue at the front, or settle.
    fn fail_attempt(&mut self, call: Call, error: CallError, worker: WorkerId) {
        let retryable = match &error {
            CallError::WorkerDied { .. }
            | CallError::Protocol { .. }
            | CallError::Timeout { .. } => true,
            CallError::Handler { .. } | CallError::Panic { .. } => {
                self.settings.retry_handler_errors
            }
            _ => false,
        };
        if call.pinned.is_some() {
            call.reply.send(Err(error));
            return;
        }
        let mut call = call;
        if retryable && self.mode == Mode::Running && call.attempts <= self.settings.max_retries {
            tracing::debug!(call = call.id(), attempt = call.attempts, %error, "retrying call");
            let retry = call.retry.get_or_insert_with(Box::default);
            retry.avoid = Some(worker);
            retry.failures.push(error);
            self.queue.push_front(call);
            return;
        }
        let error = if retryable && call.attempts > 1 {
            CallError::RetriesExhausted {
                attempts: call.attempts,
                last: Box::new(error),
                earlier: call.retry.take().map(|r| r.failures).unwrap_or_default(),
            }
        } else {
            error
        };
        call.reply.send(Err(error));
    }

    /// Stops worker `i`: closes its input (it exits after its calls), and with `force` also
    /// sends SIGTERM; SIGKILL follows after `kill_timeout` either way.
    fn stop(&mut self, i: usize, force: bool) {
        let w = &mut self.workers[i];
        if w.state == WorkerState::Stopping {
            if force {
                w.link.signal(Signal::Terminate);
            }
            return;
        }
        w.state = WorkerState::Stopping;
        w.link.close_input();
        if force {
            w.link.signal(Signal::Terminate);
        }
        let id = w.id;
        if let Some(key) = w.idle_timer.take() {
            self.timers.remove(&key);
        }
        tracing::debug!(worker = id.as_u64(), force, "stopping worker");
        self.add_timer(self.settings.kill_timeout, Timer::Kill(id));
    }

    /// Counts a start failure, backs off before the next spawn, and fails calls fast once no
    /// worker has started for a while.
    /// `fail_fast`: whether this failure may make calls fail fast (not when the worker died
    /// with calls in flight, one of which may be to blame).
    fn start_failed(&mut self, worker: Option<WorkerId>, why: String, fail_fast: bool) {
        self.start_failures += 1;
        tracing::warn!(failures = self.start_failures, %why, "worker failed to start");
        let error = CallError::WorkerStart {
            message: why.clone(),
        };
        self.emit(Event::Error {
            worker,
            error: error.clone(),
        });
        let online = self.workers.iter().any(|w| w.state == WorkerState::Online);
        if self.start_failures >= START_FAILURES_BEFORE_FAILING && fail_fast {
            // Whoever waits for every worker to be ready will not see that happen soon.
            for waiter in self.ready_waiters.drain(..) {
                let _ = waiter.send(Err(error.clone()));
            }
        }
        if self.start_failures >= START_FAILURES_BEFORE_FAILING && fail_fast && !online {
            self.start_error = Some(why);
            for call in self.queue.drain(..) {
                call.reply.send(Err(error.clone()));
            }
            // Calls still in the channel are taken (and failed) by the next turns.
        }
        if self.mode == Mode::Running && self.respawn_timer.is_none() {
            let exp = self.start_failures.saturating_sub(1).min(10);
            let delay = (RESPAWN_BACKOFF_FIRST * 2u32.pow(exp)).min(RESPAWN_BACKOFF_MAX);
            self.respawn_timer = Some(self.add_timer(delay, Timer::Respawn));
        }
    }

    // ===== timers =====

    fn add_timer(&mut self, after: Duration, timer: Timer) -> TimerKey {
        self.timer_seq += 1;
        // Options are validated, so this cannot overflow; saturate rather than panic anyway.
        let now = Instant::now();
        let at = now.checked_add(after).unwrap_or(now + FAR_FUTURE);
        let key = (at, self.timer_seq);
        self.timers.insert(key, timer);
        key
    }

    fn fire_timers(&mut self) {
        let now = Instant::now();
        while let Some(entry) = self.timers.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let (key, timer) = entry.remove_entry();
            self.fire(key, timer);
        }
    }

    fn fire(&mut self, key: TimerKey, timer: Timer) {
        match timer {
            Timer::CallTimeout { worker, call } => {
                let Some(i) = self.index_of(worker) else {
                    return;
                };
                let Some(f) = self.workers[i].in_flight.remove(&call) else {
                    return;
                };
                let after = self.settings.timeout.unwrap_or_default();
                tracing::debug!(
                    worker = worker.as_u64(),
                    call,
                    ?after,
                    "call timed out; stopping its worker"
                );
                // The calls that shared the worker did nothing wrong: re-queue them uncharged.
                // Broadcast calls stay: they fail with the worker's exit.
                let others: Vec<u64> = self.workers[i]
                    .in_flight
                    .iter()
                    .filter(|(_, f)| f.call.pinned.is_none())
                    .map(|(id, _)| *id)
                    .collect();
                for id in others {
                    let Some(other) = self.workers[i].in_flight.remove(&id) else {
                        continue;
                    };
                    if let Some(key) = other.timer {
                        self.timers.remove(&key);
                    }
                    let mut call = other.call;
                    if self.mode != Mode::Running {
                        // Shutting down: no worker will take it again.
                        call.reply.send(Err(CallError::ShutDown));
                        continue;
                    }
                    call.attempts = call.attempts.saturating_sub(1);
                    self.queue.push_front(call);
                }
                self.stop(i, true);
                self.fail_attempt(f.call, CallError::Timeout { after }, worker);
                self.ensure_workers();
            }
            Timer::Idle(worker) => {
                let Some(i) = self.index_of(worker) else {
                    return;
                };
                let w = &mut self.workers[i];
                if w.idle_timer != Some(key) {
                    return;
                }
                w.idle_timer = None;
                if w.state == WorkerState::Online && w.is_drained() {
                    tracing::debug!(worker = worker.as_u64(), "idle time reached");
                    self.emit(Event::IdleReached { worker });
                    // Not replaced until calls need it: the point is to give memory back.
                    self.stop(i, false);
                }
            }
            Timer::Kill(worker) => {
                if let Some(i) = self.index_of(worker) {
                    tracing::debug!(worker = worker.as_u64(), "kill timeout: sending SIGKILL");
                    self.workers[i].link.signal(Signal::Kill);
                }
            }
            Timer::Startup(worker) => {
                let Some(i) = self.index_of(worker) else {
                    return;
                };
                if self.workers[i].state == WorkerState::Starting {
                    let why = format!(
                        "{} did not complete its handshake within {:?}",
                        self.settings.spawn.program.display(),
                        self.settings.startup_timeout
                    );
                    self.workers[i].start_failure = Some(why);
                    self.stop(i, true);
                }
            }
            Timer::Respawn => {
                self.respawn_timer = None;
                self.ensure_workers();
            }
            Timer::MemoryCheck => {
                let Some(limit) = self.settings.max_memory else {
                    return;
                };
                for i in 0..self.workers.len() {
                    let w = &self.workers[i];
                    if w.state != WorkerState::Online {
                        continue;
                    }
                    if let Some(rss) =
                        crate::sys::rss_bytes(w.link.pid()).filter(|&rss| rss > limit)
                    {
                        let worker = w.id;
                        tracing::debug!(
                            worker = worker.as_u64(),
                            rss,
                            limit,
                            "memory limit reached"
                        );
                        self.retire(i, Event::MemoryLimitReached { worker, rss });
                    }
                }
                if self.mode == Mode::Running {
                    self.add_timer(MEMORY_CHECK_INTERVAL, Timer::MemoryCheck);
                }
            }
        }
    }

    // ===== helpers =====

    fn index_of(&self, worker: WorkerId) -> Option<usize> {
        self.index.get(&worker).copied()
    }

    fn new_worker_id(&mut self) -> WorkerId {
        self.next_worker += 1;
        WorkerId(std::num::NonZeroU64::MIN.saturating_add(self.next_worker - 1))
    }

    fn emit(&self, event: Event) {
        let _ = self.events.send(event);
    }

    fn emit_call_done(&self, worker: WorkerId, call: u64, ok: bool) {
        if self.subscribed.load(Ordering::Relaxed) {
            self.emit(Event::CallDone { worker, call, ok });
        }
    }
}
