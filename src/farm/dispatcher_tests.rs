//! The dispatcher's policies, driven through a fake transport: no processes, paused time.
//!
//! The dispatcher is not run as a task: each test owns it and plays its `run` loop by hand
//! ([`Harness::turn`]: inbound first, then calls while workers have room, then due timers,
//! each followed by `after_turn`), so every step is deterministic and private state (the
//! timer table) can be read. The test plays the workers by sending [`Inbound`] messages on
//! the sender the fake transport was given.

use super::*;
use crate::farm::policy::pipeline;
use crate::protocol::{self, frame, Hello, ToWorker};
use crate::FarmOptions;
use std::collections::HashMap;
use std::sync::Mutex;
use tokio::sync::oneshot::error::TryRecvError;

// ===== the fake transport =====

/// What the fake workers were told and what was done to them.
#[derive(Default)]
struct FakeState {
    /// Workers spawned, in order.
    spawned: Vec<WorkerId>,
    /// The dispatcher's inbound sender, as `spawn` was given it.
    inbound: Option<mpsc::UnboundedSender<Inbound>>,
    /// While set, `spawn` fails.
    fail_spawn: bool,
    spawn_failures: usize,
    /// Every frame flushed to a worker, decoded, in order.
    sent: Vec<(WorkerId, ToWorker)>,
    closed_input: Vec<WorkerId>,
    terminated: Vec<WorkerId>,
    killed: Vec<WorkerId>,
    memory: HashMap<WorkerId, u64>,
    /// Whether workers share memory (a slot table) with the farm, and each one's table as
    /// the worker sees it.
    shared: bool,
    slots: HashMap<WorkerId, crate::shm::Slots>,
}

type Shared = Arc<Mutex<FakeState>>;

struct FakeTransport(Shared);

struct FakeLink {
    worker: WorkerId,
    state: Shared,
    /// Frames sent since the last flush.
    pending: Vec<u8>,
}

impl Transport for FakeTransport {
    type Link = FakeLink;

    fn spawn(
        &mut self,
        worker: WorkerId,
        _slot: usize,
        hello: &[u8],
        inbound: &mpsc::UnboundedSender<Inbound>,
    ) -> std::io::Result<FakeLink> {
        let mut state = self.0.lock().unwrap();
        if state.fail_spawn {
            state.spawn_failures += 1;
            return Err(std::io::Error::other("no such luck"));
        }
        let payload = Bytes::copy_from_slice(&hello[frame::HEAD_LEN..]);
        assert!(matches!(
            protocol::decode_to_worker(payload),
            Ok(ToWorker::Hello(_))
        ));
        state.spawned.push(worker);
        state.inbound = Some(inbound.clone());
        Ok(FakeLink {
            worker,
            state: self.0.clone(),
            pending: Vec::new(),
        })
    }

    fn describe(&self) -> String {
        "fake-worker".into()
    }
}

impl Link for FakeLink {
    fn pid(&self) -> u32 {
        pid_of(self.worker)
    }

    fn send(&mut self, frame: &[u8]) {
        self.pending.extend_from_slice(frame);
    }

    fn flush(&mut self) {
        let mut state = self.state.lock().unwrap();
        let mut rest = &self.pending[..];
        while !rest.is_empty() {
            let (head, tail) = rest.split_at(frame::HEAD_LEN);
            let len = u32::from_le_bytes(head.try_into().unwrap()) as usize;
            let (payload, tail) = tail.split_at(len);
            let message = protocol::decode_to_worker(Bytes::copy_from_slice(payload)).unwrap();
            state.sent.push((self.worker, message));
            rest = tail;
        }
        self.pending.clear();
    }

    fn close_input(&mut self) {
        self.state.lock().unwrap().closed_input.push(self.worker);
    }

    fn terminate(&mut self) {
        self.state.lock().unwrap().terminated.push(self.worker);
    }

    fn kill(&mut self) {
        self.state.lock().unwrap().killed.push(self.worker);
    }

    fn memory(&self) -> Option<u64> {
        self.state.lock().unwrap().memory.get(&self.worker).copied()
    }

    fn use_shared_memory(&mut self) -> Option<crate::shm::Slots> {
        let mut state = self.state.lock().unwrap();
        if !state.shared {
            return None;
        }
        let slots = crate::shm::Slots::create(c"workfarm-test-slots").unwrap();
        state.slots.insert(self.worker, slots.clone());
        Some(slots)
    }
}

fn w(n: u64) -> WorkerId {
    WorkerId::new(std::num::NonZeroU64::new(n).unwrap(), 0)
}

fn pid_of(worker: WorkerId) -> u32 {
    1000 + worker.as_u64() as u32
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

const CRASH: ExitInfo = ExitInfo {
    code: Some(1),
    signal: None,
};

const SIGKILLED: ExitInfo = ExitInfo {
    code: None,
    signal: Some(9),
};

fn timed_out() -> CallError {
    CallError::Timeout {
        after: Duration::from_secs(1),
    }
}

fn died(worker: WorkerId, exit: ExitInfo, running: bool) -> CallError {
    CallError::WorkerDied {
        worker,
        pid: pid_of(worker),
        exit,
        running,
    }
}

// ===== the harness =====

/// A call made by the test: its id, and where its outcome arrives.
struct Pending {
    id: u64,
    rx: oneshot::Receiver<Outcome>,
    settled: Option<Result<Bytes, CallError>>,
}

impl Pending {
    /// The outcome, if the call settled.
    fn outcome(&mut self) -> Option<Result<Bytes, CallError>> {
        if self.settled.is_none() {
            self.settled = match self.rx.try_recv() {
                Ok(outcome) => Some(outcome.map(|a| a.body).map_err(|e| *e)),
                Err(TryRecvError::Empty) => None,
                Err(TryRecvError::Closed) => panic!("call {} dropped unsettled", self.id),
            };
        }
        self.settled.clone()
    }

    fn body(&mut self) -> Bytes {
        match self.outcome() {
            Some(Ok(body)) => body,
            other => panic!("call {}: expected a result, got {other:?}", self.id),
        }
    }

    fn error(&mut self) -> CallError {
        match self.outcome() {
            Some(Err(error)) => error,
            other => panic!("call {}: expected an error, got {other:?}", self.id),
        }
    }

    fn is_pending(&mut self) -> bool {
        self.outcome().is_none()
    }
}

struct Harness {
    d: Dispatcher<FakeTransport>,
    state: Shared,
    calls: mpsc::UnboundedSender<Call>,
    _commands: mpsc::UnboundedSender<Command>,
    next_call: u64,
}

/// A farm of one worker unless `options` say otherwise, started.
fn farm(options: FarmOptions) -> Harness {
    let mut h = farm_unstarted(options);
    h.d.start().unwrap();
    h.turn();
    h
}

fn farm_unstarted(options: FarmOptions) -> Harness {
    let settings = options.settings;
    let mut hello = Vec::new();
    let start = frame::begin(&mut hello);
    let max_frame = u32::try_from(settings.max_frame).unwrap();
    let handshake = Hello {
        version: PROTOCOL_VERSION,
        max_frame,
        serializer: "json".into(),
        setup: None,
    };
    protocol::encode_hello(&handshake, &mut hello);
    frame::finish(&mut hello, start, settings.max_frame).unwrap();
    let (calls, calls_rx) = mpsc::unbounded_channel();
    let (commands, commands_rx) = mpsc::unbounded_channel();
    let inputs = Inputs {
        calls: calls_rx,
        commands: commands_rx,
        events: broadcast::channel(64).0,
        subscribed: Arc::new(AtomicBool::new(true)),
        load: tokio::sync::watch::channel(crate::farm::Load::default()).0,
        load_watched: Arc::new(AtomicBool::new(true)),
        capacity: Arc::default(),
        final_stats: Arc::default(),
        epoch: std::time::Instant::now(),
    };
    let state = Shared::default();
    let transport = FakeTransport(state.clone());
    let d = Dispatcher::new(
        Arc::new(settings),
        vec![hello.into_boxed_slice()],
        transport,
        inputs,
    );
    Harness {
        d,
        state,
        calls,
        _commands: commands,
        next_call: 1,
    }
}

fn options() -> FarmOptions {
    FarmOptions::new("/bin/sh").workers(1)
}

/// As `farm`, with workers that share a slot table (so calls may wait in them).
fn shared_farm(options: FarmOptions) -> Harness {
    let mut h = farm_unstarted(options);
    h.state.lock().unwrap().shared = true;
    h.d.start().unwrap();
    h.turn();
    h
}

impl Harness {
    /// Plays the dispatcher's loop until it has nothing left to do now.
    fn turn(&mut self) {
        loop {
            let mut inbound = 0;
            while let Ok(message) = self.d.inbound.try_recv() {
                self.d.on_inbound(message);
                inbound += 1;
            }
            if inbound > 0 {
                self.d.after_turn();
                continue;
            }
            let room = self.d.room();
            if room > 0 && !self.d.calls.is_empty() {
                for _ in 0..room.clamp(1, 1024) {
                    let Ok(call) = self.d.calls.try_recv() else {
                        break;
                    };
                    self.d.on_call(call);
                }
                self.d.after_turn();
                continue;
            }
            if self
                .d
                .timers
                .next_deadline()
                .is_some_and(|t| t <= Instant::now())
            {
                self.d.fire_timers();
                self.d.after_turn();
                continue;
            }
            break;
        }
    }

    async fn advance(&mut self, by: Duration) {
        tokio::time::advance(by).await;
        self.turn();
    }

    fn call_frame(&mut self, method: &str) -> (u64, Box<[u8]>) {
        let id = self.next_call;
        self.next_call += 1;
        let mut buf = Vec::new();
        let start = frame::begin(&mut buf);
        protocol::encode_call_head(id, method, &mut buf);
        buf.extend_from_slice(b"[1,2]");
        frame::finish(&mut buf, start, frame::DEFAULT_MAX_FRAME).unwrap();
        (id, buf.into_boxed_slice())
    }

    /// Submits a call as `Farm::submit` does.
    fn call(&mut self) -> Pending {
        let (id, frame) = self.call_frame("m");
        let (reply, rx) = Reply::new(None);
        self.calls.send(Call::new(frame, None, reply)).unwrap();
        self.turn();
        Pending {
            id,
            rx,
            settled: None,
        }
    }

    /// Broadcasts a call as `Farm::broadcast_method` does.
    fn broadcast(&mut self) -> (u64, Vec<(WorkerId, oneshot::Receiver<Outcome>)>) {
        let (id, frame) = self.call_frame("b");
        let (replies, mut rx) = oneshot::channel();
        self.d.on_command(Command::Broadcast { frame, replies });
        self.d.after_turn();
        self.turn();
        let sent = rx.try_recv().expect("answered at once");
        (id, sent.expect("reached a worker"))
    }

    // ----- the fake worker's actions -----

    fn send(&mut self, inbound: Inbound) {
        let tx = self.state.lock().unwrap().inbound.clone().unwrap();
        tx.send(inbound).unwrap();
        self.turn();
    }

    fn says(&mut self, worker: WorkerId, messages: Vec<FromWorker>) {
        self.send(Inbound::Messages { worker, messages });
    }

    fn ready_with(&mut self, worker: WorkerId, threads: u16) {
        let ready = Ready {
            version: PROTOCOL_VERSION,
            pid: pid_of(worker),
            threads,
            async_methods: vec![],
            shared_memory: self.state.lock().unwrap().shared,
        };
        self.says(worker, vec![FromWorker::Ready(ready)]);
    }

    fn ready(&mut self, worker: WorkerId) {
        self.ready_with(worker, 1);
    }

    fn started(&mut self, worker: WorkerId, id: u64) {
        self.says(worker, vec![FromWorker::Started { id }]);
    }

    fn answer(&mut self, worker: WorkerId, id: u64) {
        self.says(worker, vec![ok(id)]);
    }

    fn exits(&mut self, worker: WorkerId, exit: ExitInfo) {
        self.send(Inbound::Exited {
            worker,
            exit,
            stderr_tail: vec![],
        });
    }

    fn closes(&mut self, worker: WorkerId) {
        self.send(Inbound::Closed { worker });
    }

    fn faults(&mut self, worker: WorkerId) {
        self.send(Inbound::Fault {
            worker,
            message: "garbage".into(),
        });
    }

    // ----- what the test observes -----

    /// The Call frames worker `worker` was sent: (call id, queued).
    fn sent_to(&self, worker: WorkerId) -> Vec<(u64, bool)> {
        let state = self.state.lock().unwrap();
        state
            .sent
            .iter()
            .filter(|(to, _)| *to == worker)
            .filter_map(|(_, message)| match message {
                ToWorker::Call { id, queued, .. } => Some((*id, *queued)),
                ToWorker::Hello(_)
                | ToWorker::Stop
                | ToWorker::Slot { .. }
                | ToWorker::Cancel { .. } => None,
            })
            .collect()
    }

    /// As the worker would on reaching queued call `id`: claims its place in the slot
    /// table and, if the farm had not taken it back, reports it Started. Whether it started.
    fn reaches(&mut self, worker: WorkerId, id: u64) -> bool {
        let slot = {
            let state = self.state.lock().unwrap();
            let mut last_slot = None;
            let mut found = None;
            for (to, message) in state.sent.iter().filter(|(to, _)| *to == worker) {
                let _ = to;
                match message {
                    ToWorker::Slot { slot, generation } => last_slot = Some((*slot, *generation)),
                    ToWorker::Call {
                        id: call,
                        queued: true,
                        ..
                    } if *call == id => found = last_slot.take(),
                    ToWorker::Call { .. } => last_slot = None,
                    _ => {}
                }
            }
            found.map(|(slot, generation)| state.slots[&worker].start(slot, generation))
        };
        if slot == Some(false) {
            return false;
        }
        self.started(worker, id);
        true
    }

    fn spawned(&self) -> Vec<WorkerId> {
        self.state.lock().unwrap().spawned.clone()
    }

    fn terminated(&self) -> Vec<WorkerId> {
        self.state.lock().unwrap().terminated.clone()
    }

    fn killed(&self) -> Vec<WorkerId> {
        self.state.lock().unwrap().killed.clone()
    }

    fn closed_input(&self) -> Vec<WorkerId> {
        self.state.lock().unwrap().closed_input.clone()
    }
}

fn ok(id: u64) -> FromWorker {
    FromWorker::Ok {
        id,
        body: Bytes::from(format!("r{id}")),
    }
}

fn body(id: u64) -> Bytes {
    Bytes::from(format!("r{id}"))
}

// ===== the tests =====

#[tokio::test(start_paused = true)]
async fn with_one_call_per_worker_a_second_call_waits_in_the_farm() {
    let mut h = farm(options().max_concurrent_calls_per_worker(1));
    h.ready(w(1));
    let mut a = h.call();
    let mut b = h.call();
    assert_eq!(h.sent_to(w(1)), [(a.id, false)]);
    assert_eq!(h.d.status().queued, 1);
    assert_eq!(h.d.status().workers[0].in_flight, 1);
    assert!(b.is_pending());

    h.answer(w(1), a.id);
    assert_eq!(a.body(), body(a.id));
    assert_eq!(h.sent_to(w(1)), [(a.id, false), (b.id, false)]);
    h.answer(w(1), b.id);
    assert_eq!(b.body(), body(b.id));
}

#[tokio::test(start_paused = true)]
async fn by_default_sync_calls_are_pipelined_queued() {
    let mut h = shared_farm(options());
    h.ready(w(1));
    let calls: Vec<Pending> = (0..40).map(|_| h.call()).collect();
    let sent = h.sent_to(w(1));
    assert_eq!(sent.len(), pipeline::SYNC_CALLS_PER_WORKER);
    assert_eq!(sent[0], (calls[0].id, false));
    assert!(sent[1..].iter().all(|&(_, queued)| queued));
    assert_eq!(h.d.status().queued, 40 - pipeline::SYNC_CALLS_PER_WORKER);
}

#[tokio::test(start_paused = true)]
async fn without_shared_memory_calls_wait_in_the_farm() {
    let mut h = farm(options());
    h.ready(w(1));
    let (a, b) = (h.call(), h.call());
    assert_eq!(
        h.sent_to(w(1)),
        [(a.id, false)],
        "nothing could take {} back",
        b.id
    );
    assert_eq!(h.d.status().queued, 1);
}

#[tokio::test(start_paused = true)]
async fn a_stalled_worker_gives_its_waiting_calls_back() {
    let mut h = shared_farm(options());
    h.ready(w(1));
    let (mut a, mut b) = (h.call(), h.call());
    assert_eq!(h.sent_to(w(1)), [(a.id, false), (b.id, true)]);
    // The first check sees the wait begin; the second sees no progress since.
    h.advance(pipeline::STALL_CHECK).await;
    assert_eq!(h.d.status().queued, 0);
    h.advance(pipeline::STALL_CHECK).await;
    assert_eq!(h.d.status().queued, 1, "B is back in the farm's queue");
    let mut c = h.call();
    assert_eq!(
        h.sent_to(w(1)),
        [(a.id, false), (b.id, true)],
        "a stalled worker takes no calls that would wait"
    );
    h.answer(w(1), a.id);
    assert!(
        !h.reaches(w(1), b.id),
        "the worker skips the B it was first sent"
    );
    // B goes back to run at once; C waits in the farm while the worker is stalled.
    assert_eq!(
        h.sent_to(w(1)),
        [(a.id, false), (b.id, true), (b.id, false)]
    );
    h.answer(w(1), b.id);
    assert_eq!(
        h.sent_to(w(1)),
        [(a.id, false), (b.id, true), (b.id, false), (c.id, false)]
    );
    // Quick calls again (more than one per check period): it pipelines again.
    let (mut d, mut e) = (h.call(), h.call());
    h.says(w(1), vec![ok(c.id)]);
    h.says(w(1), vec![ok(d.id)]);
    h.advance(pipeline::STALL_CHECK).await;
    let (mut f, mut g) = (h.call(), h.call());
    assert_eq!(
        h.sent_to(w(1))[4..],
        [(d.id, false), (e.id, false), (f.id, true), (g.id, true)]
    );
    h.answer(w(1), e.id);
    assert!(h.reaches(w(1), f.id));
    h.answer(w(1), f.id);
    assert!(h.reaches(w(1), g.id));
    h.answer(w(1), g.id);
    for call in [&mut a, &mut b, &mut c, &mut d, &mut e, &mut f, &mut g] {
        assert_eq!(call.body(), body(call.id));
    }
}

#[tokio::test(start_paused = true)]
async fn a_call_its_worker_started_is_not_taken_back() {
    let mut h = shared_farm(options().timeout(Duration::from_secs(1)));
    h.ready(w(1));
    let (mut a, mut b) = (h.call(), h.call());
    // The worker reaches B (its Started not yet read) before the stall check.
    let slot_started = {
        h.answer(w(1), a.id);
        h.reaches(w(1), b.id)
    };
    assert!(slot_started);
    h.advance(pipeline::STALL_CHECK).await;
    h.advance(pipeline::STALL_CHECK).await;
    assert_eq!(
        h.d.status().queued,
        0,
        "B stays with the worker that runs it"
    );
    h.answer(w(1), b.id);
    assert_eq!(b.body(), body(b.id));
    assert_eq!(a.body(), body(a.id));
    assert_eq!(h.sent_to(w(1)).len(), 2, "each sent once");
}

#[tokio::test(start_paused = true)]
async fn an_idle_worker_takes_a_waiting_call_from_a_busy_one() {
    let mut h = shared_farm(options().workers(2));
    h.ready(w(1));
    h.ready(w(2));
    let (mut a, mut b, mut c, mut d) = (h.call(), h.call(), h.call(), h.call());
    assert_eq!(h.sent_to(w(1)), [(a.id, false), (c.id, true)]);
    assert_eq!(h.sent_to(w(2)), [(b.id, false), (d.id, true)]);

    h.answer(w(2), b.id);
    assert!(h.reaches(w(2), d.id));
    h.answer(w(2), d.id);
    // W2 is idle, C waits on W1: it moves, at once.
    assert_eq!(
        h.sent_to(w(2)),
        [(b.id, false), (d.id, true), (c.id, false)]
    );
    assert!(!h.reaches(w(1), c.id), "W1 skips it");
    h.answer(w(2), c.id);
    h.answer(w(1), a.id);
    for call in [&mut a, &mut b, &mut c, &mut d] {
        assert_eq!(call.body(), body(call.id));
    }
    assert_eq!(
        h.sent_to(w(1)),
        [(a.id, false), (c.id, true)],
        "nothing more moved"
    );
}

#[tokio::test(start_paused = true)]
async fn waiting_calls_of_a_dead_worker_are_rerun_free() {
    let mut h = farm(options().max_concurrent_calls_per_worker(3).max_retries(0));
    h.ready(w(1));
    let (mut a, mut b, mut c) = (h.call(), h.call(), h.call());
    assert_eq!(h.sent_to(w(1)), [(a.id, false), (b.id, true), (c.id, true)]);

    h.exits(w(1), CRASH);
    assert_eq!(a.error(), died(w(1), CRASH, true));
    assert!(b.is_pending() && c.is_pending());
    // It died young without answering: its replacement is paced (10 ms).
    h.advance(ms(10)).await;
    assert_eq!(h.spawned(), [w(1), w(2)]);
    h.ready(w(2));
    assert_eq!(h.sent_to(w(2)), [(b.id, false), (c.id, true)]);
    h.answer(w(2), b.id);
    h.says(w(2), vec![FromWorker::Started { id: c.id }, ok(c.id)]);
    assert_eq!(b.body(), body(b.id));
    assert_eq!(c.body(), body(c.id));
}

#[tokio::test(start_paused = true)]
async fn a_queued_call_is_timed_from_its_start() {
    let options = options()
        .timeout(Duration::from_secs(1))
        .max_concurrent_calls_per_worker(2);
    let mut h = farm(options.max_retries(0));
    h.ready(w(1));
    let (mut a, mut b) = (h.call(), h.call());
    assert_eq!(h.sent_to(w(1)), [(a.id, false), (b.id, true)]);

    h.advance(ms(900)).await;
    h.answer(w(1), a.id);
    assert_eq!(a.body(), body(a.id));
    h.advance(ms(200)).await; // B has been in the worker for 1.1 s, but not running
    assert!(b.is_pending());
    h.started(w(1), b.id);
    h.advance(ms(400)).await; // 1.5 s
    assert!(b.is_pending());
    h.advance(ms(599)).await;
    assert!(b.is_pending());
    assert!(h.terminated().is_empty());
    h.advance(ms(1)).await; // 1 s after it started
    assert_eq!(b.error(), timed_out());
    assert_eq!(h.terminated(), [w(1)]);
}

#[tokio::test(start_paused = true)]
async fn a_timeout_requeues_its_neighbours_free() {
    let options = options()
        .timeout(Duration::from_secs(1))
        .max_concurrent_calls_per_worker(3);
    let mut h = farm(options.max_retries(0));
    h.ready_with(w(1), 2);
    let mut a = h.call();
    h.advance(ms(500)).await;
    let (mut b, mut c) = (h.call(), h.call());
    // A and B run (two threads), C waits behind them.
    assert_eq!(
        h.sent_to(w(1)),
        [(a.id, false), (b.id, false), (c.id, true)]
    );

    h.advance(ms(500)).await;
    assert_eq!(a.error(), timed_out());
    assert_eq!(h.terminated(), [w(1)]);
    assert_eq!(h.closed_input(), [w(1)]);
    assert!(b.is_pending() && c.is_pending());
    assert_eq!(h.spawned(), [w(1), w(2)], "replaced at once");

    h.ready_with(w(2), 2);
    assert_eq!(h.sent_to(w(2)), [(b.id, false), (c.id, false)]);
    h.says(w(2), vec![ok(b.id), ok(c.id)]);
    assert_eq!(b.body(), body(b.id));
    assert_eq!(c.body(), body(c.id));
    h.exits(w(1), SIGKILLED);
    assert_eq!(h.spawned(), [w(1), w(2)]);
}

#[tokio::test(start_paused = true)]
async fn a_call_requeued_free_keeps_all_its_retries() {
    let options = options()
        .timeout(Duration::from_secs(1))
        .max_concurrent_calls_per_worker(2);
    let mut h = farm(options.max_retries(1));
    h.ready_with(w(1), 2);
    let mut a = h.call();
    h.advance(ms(500)).await;
    let mut b = h.call();
    assert_eq!(h.sent_to(w(1)), [(a.id, false), (b.id, false)]);
    h.advance(ms(500)).await; // A times out (and is retried): B was innocent, re-queued free
    h.ready_with(w(2), 2);
    assert_eq!(h.sent_to(w(2)), [(a.id, false), (b.id, false)]);

    // A's second charged failure ends it; B's first leaves it one retry.
    h.exits(w(2), CRASH);
    let exhausted = CallError::RetriesExhausted {
        attempts: 2,
        last: Box::new(died(w(2), CRASH, true)),
        earlier: vec![timed_out()],
    };
    assert_eq!(a.error(), exhausted);
    assert!(
        b.is_pending(),
        "settled after one charged failure: {:?}",
        b.outcome()
    );
    h.advance(ms(10)).await; // young crash: paced
    h.ready(w(3));
    assert_eq!(h.sent_to(w(3)), [(b.id, false)]);
    h.answer(w(3), b.id);
    assert_eq!(b.body(), body(b.id));
}

#[tokio::test(start_paused = true)]
async fn workers_that_exit_before_ready_back_off_then_fail_calls() {
    let mut h = farm(options());
    let mut queued = h.call();
    h.exits(w(1), CRASH);
    h.advance(ms(49)).await;
    assert_eq!(h.spawned(), [w(1)], "no spawn before the 50 ms backoff");
    h.advance(ms(1)).await;
    assert_eq!(h.spawned(), [w(1), w(2)]);

    h.exits(w(2), CRASH);
    h.advance(ms(99)).await;
    assert_eq!(
        h.spawned(),
        [w(1), w(2)],
        "no spawn before the 100 ms backoff"
    );
    h.advance(ms(1)).await;
    assert_eq!(h.spawned(), [w(1), w(2), w(3)]);
    assert!(
        queued.is_pending(),
        "two failures in a row are not enough to fail calls"
    );

    h.exits(w(3), CRASH);
    let start = CallError::WorkerStart {
        message: "fake-worker exited during startup with exit code 1".into(),
    };
    assert_eq!(queued.error(), start);
    assert_eq!(h.call().error(), start);
    h.advance(ms(199)).await;
    assert_eq!(h.spawned().len(), 3, "no spawn before the 200 ms backoff");
    h.advance(ms(1)).await;
    assert_eq!(h.spawned().len(), 4);

    // A worker online takes calls again.
    h.ready(w(4));
    let mut later = h.call();
    h.answer(w(4), later.id);
    assert_eq!(later.body(), body(later.id));
}

#[tokio::test(start_paused = true)]
async fn spawn_errors_are_start_failures_too() {
    let mut h = farm(options());
    h.state.lock().unwrap().fail_spawn = true;
    h.exits(w(1), CRASH);
    h.advance(ms(50)).await; // spawn fails: second failure, 100 ms backoff
    assert_eq!(h.state.lock().unwrap().spawn_failures, 1);
    h.advance(ms(99)).await;
    assert_eq!(h.state.lock().unwrap().spawn_failures, 1);
    h.advance(ms(1)).await; // third failure
    assert_eq!(h.state.lock().unwrap().spawn_failures, 2);
    let message = "could not spawn fake-worker: no such luck".to_owned();
    assert_eq!(h.call().error(), CallError::WorkerStart { message });
}

#[tokio::test(start_paused = true)]
async fn deaths_after_ready_are_not_start_failures() {
    let options = options().max_concurrent_calls_per_worker(2).max_retries(4);
    let mut h = farm(options);
    let (mut poison, mut other) = (h.call(), h.call());
    for n in 1..=5 {
        assert_eq!(h.spawned().last(), Some(&w(n)));
        h.ready(w(n));
        assert_eq!(h.sent_to(w(n)), [(poison.id, false), (other.id, true)]);
        h.exits(w(n), CRASH);
        assert_eq!(h.d.startup.failures(), 0);
        // Young crashes are paced (10 ms doubling), never failed fast.
        h.advance(Duration::from_secs(1)).await;
        assert!(other.is_pending());
    }
    match poison.error() {
        CallError::RetriesExhausted {
            attempts: 5,
            last,
            earlier,
        } => {
            assert_eq!(*last, died(w(5), CRASH, true));
            let workers: Vec<_> = (1..=4).map(|n| died(w(n), CRASH, true)).collect();
            assert_eq!(earlier, workers);
        }
        other => panic!("expected RetriesExhausted after 5 attempts, got {other:?}"),
    }
    let mut new = h.call();
    assert!(new.is_pending(), "not failed fast");
    h.ready(w(6));
    assert_eq!(h.sent_to(w(6)), [(other.id, false), (new.id, true)]);
    h.says(
        w(6),
        vec![ok(other.id), FromWorker::Started { id: new.id }, ok(new.id)],
    );
    assert_eq!(other.body(), body(other.id));
    assert_eq!(new.body(), body(new.id));
}

#[tokio::test(start_paused = true)]
async fn a_worker_that_closes_its_frames_is_killed_then_settled() {
    let mut h = farm(options().max_retries(0));
    h.ready(w(1));
    let mut a = h.call();
    h.closes(w(1));
    let mut b = h.call();
    assert_eq!(
        h.sent_to(w(1)),
        [(a.id, false)],
        "a closed worker takes no call"
    );

    h.advance(ms(499)).await;
    assert!(h.killed().is_empty());
    h.advance(ms(1)).await; // kill_timeout
    assert_eq!(h.killed(), [w(1)]);
    assert!(h.terminated().is_empty() && h.closed_input().is_empty());
    assert!(a.is_pending(), "settled only when it exits");

    h.exits(w(1), SIGKILLED);
    assert_eq!(a.error(), died(w(1), SIGKILLED, true));
    h.advance(ms(10)).await; // young crash: paced
    h.ready(w(2));
    h.answer(w(2), b.id);
    assert_eq!(b.body(), body(b.id));
}

#[tokio::test(start_paused = true)]
async fn timers_go_with_their_owners() {
    let hour = Duration::from_secs(3600);
    let options = options()
        .ttl(1)
        .startup_timeout(hour)
        .kill_timeout(hour)
        .timeout(hour);
    let mut h = farm(options);
    let at_start = h.d.timers.len();
    assert_eq!(at_start, 1, "worker 1's startup timeout");
    for n in 1..=200 {
        h.ready(w(n));
        let mut call = h.call();
        assert_eq!(h.sent_to(w(n)), [(call.id, false)]);
        h.answer(w(n), call.id);
        assert_eq!(call.body(), body(call.id));
        assert_eq!(h.closed_input().last(), Some(&w(n)), "ttl reached: stopped");
        h.exits(w(n), CRASH);
        assert_eq!(h.d.timers.len(), at_start, "after {n} workers");
    }
    assert_eq!(h.spawned().len(), 201);
}

#[tokio::test(start_paused = true)]
async fn timers_of_dead_workers_and_their_calls_go_too() {
    let hour = Duration::from_secs(3600);
    let options = options()
        .startup_timeout(hour)
        .timeout(hour)
        .max_concurrent_calls_per_worker(2);
    let mut h = farm(options.max_retries(1000));
    let at_start = h.d.timers.len();
    let (mut a, mut b) = (h.call(), h.call());
    for n in 1..=50 {
        h.ready(w(n));
        h.started(w(n), b.id);
        h.exits(w(n), CRASH);
        h.advance(Duration::from_secs(1)).await;
        assert_eq!(h.d.timers.len(), at_start, "after {n} workers");
    }
    h.ready(w(51));
    h.says(w(51), vec![ok(a.id), ok(b.id)]);
    assert_eq!((a.body(), b.body()), (body(a.id), body(b.id)));
}

#[tokio::test(start_paused = true)]
async fn an_abandoned_broadcast_is_not_sent() {
    let mut h = farm(options().max_concurrent_calls_per_worker(1));
    let (dropped, receivers) = h.broadcast();
    assert_eq!(receivers.len(), 1, "a starting worker is live");
    drop(receivers);
    let (kept, mut receivers) = h.broadcast();
    h.ready(w(1));
    assert_eq!(h.sent_to(w(1)), [(kept, false)]);
    assert_ne!(dropped, kept);

    // Also behind a busy worker: the abandoned one neither waits for room nor is sent.
    h.answer(w(1), kept);
    let (_, mut kept_rx) = receivers.pop().unwrap();
    assert_eq!(kept_rx.try_recv().unwrap().unwrap().body, body(kept));
    let mut call = h.call();
    let (_, receivers) = h.broadcast();
    drop(receivers);
    h.answer(w(1), call.id);
    assert_eq!(call.body(), body(call.id));
    assert_eq!(h.sent_to(w(1)), [(kept, false), (call.id, false)]);
    assert!(h.d.workers.iter().all(|w| w.is_drained()));
}

#[tokio::test(start_paused = true)]
async fn a_fault_before_the_handshake_is_a_start_failure() {
    let mut h = farm(options());
    h.faults(w(1));
    assert_eq!(h.terminated(), [w(1)]);
    assert_eq!(h.spawned(), [w(1)], "replaced once it exits, after backoff");
    h.exits(w(1), SIGKILLED);
    assert_eq!(h.d.startup.failures(), 1);
    h.advance(ms(50)).await;
    assert_eq!(h.spawned(), [w(1), w(2)]);
}

#[tokio::test(start_paused = true)]
async fn a_fault_while_serving_charges_the_running_call() {
    let mut h = farm(options().max_retries(0).max_concurrent_calls_per_worker(2));
    h.ready(w(1));
    let (mut a, mut b) = (h.call(), h.call());
    h.faults(w(1));
    let protocol = CallError::Protocol {
        worker: w(1),
        message: "garbage".into(),
    };
    assert_eq!(a.error(), protocol);
    assert_eq!(h.terminated(), [w(1)]);
    // It never answered a call: its replacement is paced (10 ms), as for a young crash.
    assert_eq!(h.spawned(), [w(1)]);
    h.advance(ms(10)).await;
    assert_eq!(h.spawned(), [w(1), w(2)], "replaced after the pace");
    h.ready(w(2));
    h.answer(w(2), b.id);
    assert_eq!(b.body(), body(b.id));
    assert_eq!(h.d.startup.failures(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_worker_over_max_memory_is_retired() {
    let mut h = farm(options().max_memory(100));
    h.ready(w(1));
    h.state.lock().unwrap().memory.insert(w(1), 100);
    h.advance(ms(500)).await;
    assert!(h.closed_input().is_empty(), "at the limit is not over it");
    h.state.lock().unwrap().memory.insert(w(1), 101);
    h.advance(ms(499)).await;
    assert!(h.closed_input().is_empty());
    h.advance(ms(1)).await;
    assert_eq!(h.closed_input(), [w(1)]);
    assert!(h.terminated().is_empty(), "a polite stop");
    assert_eq!(h.spawned(), [w(1), w(2)]);
}

#[tokio::test(start_paused = true)]
async fn a_call_taken_back_for_an_idle_worker_does_not_bounce_back() {
    // W2 holds only an async call, so its sync thread is free; W1 runs a sync call with
    // one waiting. The waiting one moves to W2 and stays there.
    let mut h = shared_farm(options().workers(2));
    let ready = |worker| Ready {
        version: PROTOCOL_VERSION,
        pid: pid_of(worker),
        threads: 1,
        async_methods: vec!["a".into()],
        shared_memory: true,
    };
    h.says(w(2), vec![FromWorker::Ready(ready(w(2)))]);
    let (_, frame) = h.call_frame("a");
    let (reply, _async_rx) = Reply::new(None);
    h.calls.send(Call::new(frame, None, reply)).unwrap();
    h.turn();
    assert_eq!(h.sent_to(w(2)).len(), 1);
    h.says(w(1), vec![FromWorker::Ready(ready(w(1)))]);
    let (mut a, mut b) = (h.call(), h.call());
    assert_eq!(h.sent_to(w(1)), [(a.id, false), (b.id, true)]);
    assert_eq!(
        h.sent_to(w(2))[1..],
        [(b.id, false)],
        "B moved to the free thread"
    );
    assert!(!h.reaches(w(1), b.id));
    h.advance(pipeline::STALL_CHECK).await;
    h.advance(pipeline::STALL_CHECK).await;
    assert_eq!(h.sent_to(w(1)).len(), 2, "not sent back to W1");
    assert_eq!(h.sent_to(w(2)).len(), 2);
    h.answer(w(2), b.id);
    h.answer(w(1), a.id);
    assert_eq!(a.body(), body(a.id));
    assert_eq!(b.body(), body(b.id));
}

#[tokio::test(start_paused = true)]
async fn an_idle_farm_stops_checking_for_stalls() {
    let mut h = shared_farm(options());
    h.ready(w(1));
    let (mut a, mut b) = (h.call(), h.call());
    h.advance(pipeline::STALL_CHECK).await;
    h.advance(pipeline::STALL_CHECK).await; // stalled: B taken back
    h.answer(w(1), a.id);
    h.answer(w(1), b.id);
    assert_eq!((a.body(), b.body()), (body(a.id), body(b.id)));
    h.advance(pipeline::STALL_CHECK).await;
    h.advance(pipeline::STALL_CHECK).await;
    assert!(
        !h.d.timers.is_set(Timer::StallCheck),
        "an idle farm wakes for nothing"
    );
}

fn refused(id: u64, retry_after: Option<Duration>) -> FromWorker {
    FromWorker::Refused {
        id,
        retry_after,
        message: "quota".into(),
    }
}

#[tokio::test(start_paused = true)]
async fn a_refused_call_runs_elsewhere_and_the_refusing_slot_is_sent_nothing_while_it_backs_off() {
    let mut h = farm(
        options()
            .workers(2)
            .max_retries(0)
            .max_concurrent_calls_per_worker(1),
    );
    h.ready(w(1));
    h.ready(w(2));
    let (mut a, mut b) = (h.call(), h.call());
    assert_eq!(h.sent_to(w(1)), [(a.id, false)]);
    assert_eq!(h.sent_to(w(2)), [(b.id, false)]);
    h.says(w(1), vec![refused(a.id, Some(ms(500)))]);
    assert!(a.is_pending(), "waits for w2 rather than go back to w1");
    assert_eq!(h.sent_to(w(1)).len(), 1);
    h.answer(w(2), b.id);
    assert_eq!(b.body(), body(b.id));
    assert_eq!(
        h.sent_to(w(2)),
        [(b.id, false), (a.id, false)],
        "a ran next, on w2"
    );
    h.answer(w(2), a.id);
    assert_eq!(
        a.body(),
        body(a.id),
        "uncharged: max_retries(0) and it succeeded"
    );
    // During the back-off every call goes to w2, one at a time.
    let mut c = h.call();
    let mut d = h.call();
    assert_eq!(
        h.sent_to(w(1)).len(),
        1,
        "nothing for w1 during its back-off"
    );
    h.answer(w(2), c.id);
    h.answer(w(2), d.id);
    assert_eq!((c.body(), d.body()), (body(c.id), body(d.id)));
    h.advance(ms(500)).await;
    let e = h.call();
    assert_eq!(
        h.sent_to(w(1)),
        [(a.id, false), (e.id, false)],
        "back after 500 ms"
    );
}

#[tokio::test(start_paused = true)]
async fn a_call_refused_by_its_only_worker_waits_for_the_back_off_without_a_loop() {
    let mut h = farm(options().max_retries(0));
    h.ready(w(1));
    let mut a = h.call();
    h.says(w(1), vec![refused(a.id, Some(ms(300)))]);
    h.advance(ms(299)).await;
    assert_eq!(
        h.sent_to(w(1)).len(),
        1,
        "not sent again during the back-off"
    );
    assert!(a.is_pending());
    h.advance(ms(1)).await;
    assert_eq!(h.sent_to(w(1)), [(a.id, false), (a.id, false)]);
    h.answer(w(1), a.id);
    assert_eq!(a.body(), body(a.id));
}

#[tokio::test(start_paused = true)]
async fn a_call_refused_elsewhere_by_every_slot_fails_with_each_refusal() {
    let mut h = farm(options().workers(2).max_concurrent_calls_per_worker(1));
    h.ready(w(1));
    h.ready(w(2));
    let mut a = h.call();
    h.says(w(1), vec![refused(a.id, None)]);
    assert_eq!(h.sent_to(w(2)), [(a.id, false)], "went to the other slot");
    let mut b = h.call();
    assert_eq!(
        h.sent_to(w(1)),
        [(a.id, false), (b.id, false)],
        "w1 takes other calls"
    );
    h.says(w(2), vec![refused(a.id, None)]);
    let CallError::Refused { refusals } = a.error() else {
        panic!("expected Refused");
    };
    assert_eq!(refusals.len(), 2);
    assert!(b.is_pending());
}
