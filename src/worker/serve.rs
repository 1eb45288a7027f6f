//! The worker's serving loop: the handshake, then read → run → write, on plain blocking
//! descriptors.
//!
//! Sync handlers run on the thread that reads (one at a time, the default) or on a pool of
//! `threads` threads, never inside a tokio runtime, so a handler may build and block on a
//! runtime of its own. Async handlers run on a runtime started only if the worker has any.
//! Every reply is written as soon as its handler returns. A queued call that waited in a
//! place of the slot table is started by claiming that place, or skipped if the farm took
//! it back first (see `crate::shm::Slots`): the farm needs no word from this thread, which
//! may be deep in a handler.

use super::handler::{error_frame, reply_frame, Failure, Handler, SyncFn};
use super::{serve_error, ServeError, Worker};
use crate::protocol::frame::{self, FrameDecoder, DEFAULT_MAX_FRAME};
use crate::protocol::{self, Direction, FailureKind, Ready, ToWorker, PROTOCOL_VERSION};
use crate::serializer::Serializer;
use crate::shm::{self, Producer, Ring, Slots};
use crate::sys;
use bytes::{Bytes, BytesMut};
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Condvar, Mutex};

/// The farm's end of the worker's frames: shared by the reading thread, the pool and the
/// async runtime, each writing whole frames.
struct Output {
    file: Mutex<File>,
    /// The ring large replies go through, if the farm shared one.
    ring: Option<Mutex<Producer>>,
}

impl Output {
    fn write(&self, bytes: &[u8]) -> std::io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        file.write_all(bytes)
    }

    /// Moves the frame that starts at `start` in `out` (the last one) into the shared ring
    /// when it is large and there is room, leaving in its place a Shared frame naming it.
    fn share_last_frame(&self, out: &mut Vec<u8>, start: usize, max_frame: usize) {
        let Some(ring) = &self.ring else { return };
        if out.len() - start < shm::MIN_FRAME {
            return;
        }
        let place = ring
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .put(&out[start + frame::HEAD_LEN..]);
        if let Some((offset, len)) = place {
            out.truncate(start);
            let at = frame::begin(out);
            protocol::encode_shared(Direction::ToFarm, offset, len, out);
            // Cannot fail: 17 bytes fit any cap the farm accepts.
            let _ = frame::finish(out, at, max_frame);
        }
    }
}

/// Frames from the farm.
struct Input {
    fd: OwnedFd,
    buf: BytesMut,
    decoder: FrameDecoder,
    /// The ring large calls come through, if the farm shared one.
    ring: Option<Ring>,
}

impl Input {
    /// The next complete frame already read, if any (from the shared ring if it says so).
    fn try_next(&mut self) -> Result<Option<Bytes>, ServeError> {
        let payload = match self.decoder.decode(&mut self.buf) {
            Ok(Some(payload)) => payload.freeze(),
            Ok(None) => return Ok(None),
            Err(e) => return Err(serve_error(format_args!("bad frame from the farm: {e}"))),
        };
        match protocol::shared_place(Direction::ToWorker, &payload) {
            None => Ok(Some(payload)),
            Some(place) => {
                let bad = |e: String| serve_error(format_args!("bad frame from the farm: {e}"));
                let (offset, len) = place.map_err(|e| bad(e.to_string()))?;
                let ring = self
                    .ring
                    .as_ref()
                    .ok_or_else(|| bad("no shared ring".into()))?;
                ring.take(offset, len).map(Some).map_err(bad)
            }
        }
    }

    /// Waits for more bytes; `false` at end of input (the farm closed our stdin).
    fn fill(&mut self) -> Result<bool, ServeError> {
        let n = sys::read_into(&self.fd, &mut self.buf).map_err(serve_error)?;
        Ok(n > 0)
    }
}

/// Calls started but not yet answered off the reading thread (pool and async).
#[derive(Default)]
struct Pending {
    /// The count, and whether anyone waits for it to reach zero (only then is there
    /// anyone to wake: no system call per call otherwise).
    count: Mutex<(usize, bool)>,
    zero: Condvar,
}

impl Pending {
    fn begin(&self) {
        self.count.lock().unwrap_or_else(|e| e.into_inner()).0 += 1;
    }

    fn end(&self) {
        let mut count = self.count.lock().unwrap_or_else(|e| e.into_inner());
        count.0 = count.0.saturating_sub(1);
        if count.0 == 0 && count.1 {
            self.zero.notify_all();
        }
    }

    fn wait_for_zero(&self) {
        let mut count = self.count.lock().unwrap_or_else(|e| e.into_inner());
        count.1 = true;
        while count.0 > 0 {
            count = self.zero.wait(count).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Ends one pending call when dropped.
struct PendingGuard(Arc<Pending>);

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.0.end();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// One sync call for the pool.
struct Job<S> {
    id: u64,
    queued: bool,
    /// Its place in the slot table, if it waits in one (see `Slots`).
    slot: Option<(u16, u32)>,
    args: Bytes,
    f: Arc<SyncFn<S>>,
    /// `args` is a batch (see [`protocol::batch_items`]).
    batch: bool,
}

/// Runs a sync handler on `args`, or on each item of a batch, writing the result (or the
/// batch of results) into `out`.
fn run_sync<S>(
    f: &SyncFn<S>,
    serializer: &S,
    args: &Bytes,
    batch: bool,
    out: &mut Vec<u8>,
) -> Result<(), Failure> {
    if !batch {
        return f(serializer, args, out);
    }
    let items = protocol::batch_items(args.clone())
        .map_err(|e| Failure::new(FailureKind::BadArguments, e))?;
    out.extend_from_slice(&u32::try_from(items.len()).unwrap_or(u32::MAX).to_le_bytes());
    for item in items {
        protocol::push_batch_result(out, |out| {
            // A panic fails its item only.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(serializer, &item, out)))
                .unwrap_or_else(|_| Err(Failure::new(FailureKind::Panic, "handler panicked")))
                .map_err(|failure| (failure.kind, failure.message))
        });
    }
    Ok(())
}

/// Starts an async handler on `args`, or on each item of a batch (run one after another);
/// the future yields the complete reply frame.
fn start_async<S>(
    f: &super::handler::AsyncFn<S>,
    serializer: &S,
    args: &Bytes,
    id: u64,
    max_frame: usize,
    batch: bool,
) -> Result<super::handler::BoxFuture, Failure> {
    if !batch {
        return f(serializer, args, id, max_frame);
    }
    let items = protocol::batch_items(args.clone())
        .map_err(|e| Failure::new(FailureKind::BadArguments, e))?;
    // Each item's future yields a reply frame of its own; they are unpacked into one batch.
    let started: Vec<Result<super::handler::BoxFuture, Failure>> = items
        .iter()
        .map(|item| f(serializer, item, id, max_frame))
        .collect();
    Ok(Box::pin(async move {
        let mut body = Vec::new();
        body.extend_from_slice(
            &u32::try_from(started.len())
                .unwrap_or(u32::MAX)
                .to_le_bytes(),
        );
        for item in started {
            let answer = match item {
                Ok(future) => unpack_reply(future.await),
                Err(failure) => Err((failure.kind, failure.message)),
            };
            protocol::push_batch_result(&mut body, |out| {
                answer.map(|bytes| out.extend_from_slice(&bytes))
            });
        }
        let mut out = Vec::new();
        reply_frame(id, max_frame, &mut out, |o| {
            o.extend_from_slice(&body);
            Ok(())
        });
        out
    }))
}

/// The result (or failure) inside one reply frame a handler wrote.
fn unpack_reply(frame: Vec<u8>) -> Result<Bytes, (FailureKind, String)> {
    let frame = Bytes::from(frame);
    let payload = frame.slice(frame::HEAD_LEN.min(frame.len())..);
    match protocol::decode_from_worker(payload) {
        Ok(protocol::FromWorker::Ok { body, .. }) => Ok(body),
        Ok(protocol::FromWorker::Err { kind, message, .. }) => Err((kind, message)),
        _ => Err((FailureKind::BadResult, "malformed reply".into())),
    }
}

/// Sync calls waiting for a pool thread, in arrival order.
struct Jobs<S> {
    state: Mutex<JobsState<S>>,
    arrived: Condvar,
}

struct JobsState<S> {
    queue: VecDeque<Job<S>>,
    closed: bool,
}

impl<S> Jobs<S> {
    fn new() -> Self {
        Jobs {
            state: Mutex::new(JobsState {
                queue: VecDeque::new(),
                closed: false,
            }),
            arrived: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, JobsState<S>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds the jobs of one read at once: one lock and one wake-up for the lot.
    fn push_all(&self, batch: &mut Vec<Job<S>>) {
        let n = batch.len();
        if n == 0 {
            return;
        }
        self.lock().queue.extend(batch.drain(..));
        if n == 1 {
            self.arrived.notify_one();
        } else {
            self.arrived.notify_all();
        }
    }

    fn try_pop(&self) -> Option<Job<S>> {
        self.lock().queue.pop_front()
    }

    /// The next job; `None` once closed and empty.
    fn pop(&self) -> Option<Job<S>> {
        let mut state = self.lock();
        loop {
            if let Some(job) = state.queue.pop_front() {
                return Some(job);
            }
            if state.closed {
                return None;
            }
            state = self.arrived.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Threads finish the jobs left, then exit.
    fn close(&self) {
        self.lock().closed = true;
        self.arrived.notify_all();
    }
}

/// How the farm's input ended.
enum Ending {
    /// After Stop: answer what is running, then exit.
    Stopped,
    /// Without Stop: the farm is gone, or dropped this worker.
    Abandoned,
}

/// Everything the serving loop needs once the handshake is done.
struct Server<S: Serializer> {
    serializer: S,
    handlers: HashMap<String, Handler<S>>,
    threads: usize,
    max_frame: usize,
    output: Arc<Output>,
    pending: Arc<Pending>,
    /// With more than one thread, sync calls go to the pool's `threads` threads; with one,
    /// they run here, as they are read (no hand-off between threads).
    pool: Option<Arc<Jobs<S>>>,
    /// Places of calls that wait, shared with the farm, which may take them back.
    slots: Option<Slots>,
    /// The place the next queued call waits in, as the farm's Slot message said.
    next_slot: Option<(u16, u32)>,
    /// Pool jobs read this turn, handed over together at its end.
    batch: Vec<Job<S>>,
    /// For async handlers; started with the first async call.
    runtime: Option<tokio::runtime::Runtime>,
    /// Async calls running, for the farm's Cancel: whoever takes a call out of this table
    /// (its task on finishing, or a Cancel) is the one that answers it.
    running: Arc<Mutex<HashMap<u64, tokio::task::AbortHandle>>>,
    /// Replies and Started reports not yet written.
    out: Vec<u8>,
}

/// Serves `worker` on the farm's pipes until the farm closes `input`, then returns once every
/// call has been answered.
pub(super) fn serve<S: Serializer, St>(
    mut worker: Worker<S, St>,
    input: OwnedFd,
    output: OwnedFd,
    started_by_farm: bool,
) -> Result<(), ServeError> {
    let not_a_pipe = |e| {
        serve_error(format_args!(
            "stdin/stdout are not a farm's pipes ({e}); start this binary through workfarm::Farm"
        ))
    };
    sys::set_blocking(&input).map_err(not_a_pipe)?;
    sys::set_blocking(&output).map_err(not_a_pipe)?;
    // Only a process the farm started (its stdin checked) looks for the farm's descriptors.
    let shared = started_by_farm.then(inherited_shared_memory).flatten();
    let shared_memory = shared.is_some();
    let (to_worker, to_farm, slots) = match shared {
        Some((a, b, c)) => (Some(a), Some(b), Some(c)),
        None => (None, None, None),
    };
    let mut input = Input {
        fd: input,
        buf: BytesMut::with_capacity(64 * 1024),
        decoder: FrameDecoder::new(DEFAULT_MAX_FRAME),
        ring: to_worker,
    };
    let output = Arc::new(Output {
        file: Mutex::new(File::from(output)),
        ring: to_farm.map(|ring| Mutex::new(Producer::new(ring))),
    });
    let setup = worker.setup.take();
    let (serializer, max_frame) = handshake(&worker, setup, &mut input, &output, shared_memory)?;
    input.decoder = FrameDecoder::new(max_frame);
    let mut server = Server::start(worker, serializer, max_frame, output, slots)?;
    let served = server.run(&mut input);
    if matches!(served, Ok(Ending::Abandoned)) {
        // The input ended without Stop: the farm died or dropped us. Nobody is left to
        // answer, and a handler's children must not outlive the farm.
        sys::kill_own_group();
    }
    server.finish();
    served.map(|_| ())
}

/// The shared memory the farm passed (rings to the worker and to the farm, slot table), if
/// it passed any and all of it maps; without it every frame takes the pipe, and queued
/// calls cannot be taken back.
fn inherited_shared_memory() -> Option<(Ring, Ring, Slots)> {
    let named = std::env::var(protocol::launch::RINGS_ENV).ok()?;
    let mut fds = named
        .split(',')
        .map(|fd| fd.parse().ok().and_then(sys::inherited_shared_fd));
    let (a, b, c) = (fds.next()??, fds.next()??, fds.next()??);
    Some((
        Ring::open(a).ok()?,
        Ring::open(b).ok()?,
        Slots::open(c).ok()?,
    ))
}

/// Reads the farm's Hello, runs the set-up, and answers Ready; or Fatal if this worker
/// cannot serve the farm, or its set-up failed.
fn handshake<S: Serializer, St>(
    worker: &Worker<S, St>,
    setup: Option<super::Setup<S>>,
    input: &mut Input,
    output: &Output,
    shared_memory: bool,
) -> Result<(S, usize), ServeError> {
    let payload = loop {
        if let Some(payload) = input.try_next()? {
            break payload;
        }
        if !input.fill()? {
            return Err(serve_error("the farm closed stdin before the handshake"));
        }
    };
    let ToWorker::Hello(hello) = protocol::decode_to_worker(payload).map_err(serve_error)? else {
        return Err(serve_error("the farm did not start with a handshake"));
    };
    let max_frame = hello.max_frame as usize;
    let selected = worker.serializer.select(&hello.serializer);
    let refusal = if hello.version != PROTOCOL_VERSION {
        format!(
            "farm speaks protocol version {}, worker speaks {PROTOCOL_VERSION}",
            hello.version
        )
    } else if let Some(failure) = selected
        .as_ref()
        .and_then(|serializer| run_setup(setup, serializer, hello.setup.as_deref()))
    {
        failure
    } else if let Some(serializer) = selected {
        let ready = Ready {
            version: PROTOCOL_VERSION,
            pid: std::process::id(),
            threads: u16::try_from(worker.threads).unwrap_or(u16::MAX),
            async_methods: worker.async_methods(),
            shared_memory,
        };
        let mut out = Vec::new();
        let start = frame::begin(&mut out);
        protocol::encode_ready(&ready, &mut out);
        frame::finish(&mut out, start, max_frame).map_err(serve_error)?;
        output.write(&out).map_err(serve_error)?;
        return Ok((serializer, max_frame));
    } else {
        format!("worker does not speak serializer {:?}", hello.serializer)
    };
    let mut out = Vec::new();
    let start = frame::begin(&mut out);
    protocol::encode_fatal(&refusal, &mut out);
    let _ = frame::finish(&mut out, start, max_frame);
    let _ = output.write(&out);
    Err(serve_error(refusal))
}

impl<S: Serializer> Server<S> {
    fn start<St>(
        worker: Worker<S, St>,
        serializer: S,
        max_frame: usize,
        output: Arc<Output>,
        slots: Option<Slots>,
    ) -> Result<Self, ServeError> {
        let pending = Arc::new(Pending::default());
        let mut server = Server {
            serializer,
            handlers: worker.handlers,
            threads: worker.threads,
            max_frame,
            output,
            pending,
            pool: None,
            slots,
            next_slot: None,
            batch: Vec::new(),
            runtime: None,
            running: Arc::default(),
            out: Vec::with_capacity(64 * 1024),
        };
        if server.threads > 1 {
            server.start_pool()?;
        }
        Ok(server)
    }

    fn start_pool(&mut self) -> Result<(), ServeError> {
        let jobs = start_pool(
            self.threads,
            self.serializer.clone(),
            self.max_frame,
            &self.output,
            &self.pending,
            self.slots.clone(),
        )?;
        self.pool = Some(jobs);
        Ok(())
    }

    /// Serves until end of input; says whether the farm said Stop first.
    fn run(&mut self, input: &mut Input) -> Result<Ending, ServeError> {
        let mut stopped = false;
        loop {
            while let Some(payload) = input.try_next()? {
                match protocol::decode_to_worker(payload) {
                    Ok(ToWorker::Call {
                        id,
                        method,
                        args,
                        queued,
                        batch,
                    }) => self.call(id, protocol::method_name(&method), args, queued, batch)?,
                    Ok(ToWorker::Stop) => stopped = true,
                    Ok(ToWorker::Slot { slot, generation }) => {
                        self.next_slot = Some((slot, generation));
                    }
                    Ok(ToWorker::Cancel { id }) => self.cancel(id),
                    Ok(ToWorker::Hello(_)) => {
                        return Err(serve_error("second handshake from the farm"))
                    }
                    Err(e) => {
                        return Err(serve_error(format_args!("bad message from the farm: {e}")))
                    }
                }
            }
            if let Some(jobs) = &self.pool {
                jobs.push_all(&mut self.batch);
            }
            self.flush()?;
            if !input.fill()? {
                return Ok(if stopped {
                    Ending::Stopped
                } else {
                    Ending::Abandoned
                });
            }
        }
    }

    /// Whether a call may start: one that waited in a place is started there, unless the
    /// farm took it back first (then it is skipped without a word).
    fn may_start(slots: Option<&Slots>, slot: Option<(u16, u32)>) -> bool {
        match (slots, slot) {
            (Some(slots), Some((slot, generation))) => slots.start(slot, generation),
            _ => true,
        }
    }

    /// Starts one call (or answers it at once if it cannot start).
    fn call(
        &mut self,
        id: u64,
        method: &str,
        args: Bytes,
        queued: bool,
        batch: bool,
    ) -> Result<(), ServeError> {
        let max_frame = self.max_frame;
        let slot = if queued { self.next_slot.take() } else { None };
        if let Some(left) = super::refuse::backing_off() {
            // A handler refused with a back-off: nothing runs here until it ends.
            if !queued || Self::may_start(self.slots.as_ref(), slot) {
                refuse_backing_off(id, left, max_frame, &mut self.out);
            }
            return Ok(());
        }
        match self.handlers.get(method) {
            None => {
                let failure = Failure::new(FailureKind::UnknownMethod, method);
                error_frame(id, &failure, max_frame, &mut self.out);
            }
            Some(Handler::Sync(f)) if self.pool.is_some() => {
                let f = f.clone();
                self.pending.begin();
                self.batch.push(Job {
                    id,
                    queued,
                    slot,
                    args,
                    f,
                    batch,
                });
            }
            Some(Handler::Sync(f)) => {
                let f = f.clone();
                if queued {
                    if !Self::may_start(self.slots.as_ref(), slot) {
                        return Ok(());
                    }
                    protocol_started(id, max_frame, &mut self.out);
                }
                // What is ready leaves before a handler that may take a while.
                self.flush()?;
                let serializer = &self.serializer;
                reply_frame(id, max_frame, &mut self.out, |out| {
                    run_sync(&*f, serializer, &args, batch, out)
                });
                self.output.share_last_frame(&mut self.out, 0, max_frame);
            }
            Some(Handler::Async(_)) if queued && !Self::may_start(self.slots.as_ref(), slot) => {}
            Some(Handler::Async(f)) => {
                match start_async(&**f, &self.serializer, &args, id, max_frame, batch) {
                    Ok(future) => {
                        if queued {
                            // Before the reply can overtake it from the runtime's thread.
                            protocol_started(id, max_frame, &mut self.out);
                            self.flush()?;
                        }
                        self.spawn(id, future)?;
                    }
                    Err(failure) => error_frame(id, &failure, max_frame, &mut self.out),
                }
            }
        }
        Ok(())
    }

    /// The farm cancelled call `id`: if it is an async call still running, its future is
    /// dropped and the call answered Cancelled. Otherwise (it finished, or it is sync) the
    /// answer it has or will have stands; the farm discards it.
    fn cancel(&mut self, id: u64) {
        let task = lock(&self.running).remove(&id);
        if let Some(task) = task {
            task.abort();
            let failure = Failure::new(FailureKind::Cancelled, "cancelled by the caller");
            error_frame(id, &failure, self.max_frame, &mut self.out);
        }
    }

    fn spawn(&mut self, id: u64, future: super::handler::BoxFuture) -> Result<(), ServeError> {
        if self.runtime.is_none() {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(self.threads)
                .thread_name("workfarm-async")
                .enable_all()
                .build()
                .map_err(serve_error)?;
            self.runtime = Some(runtime);
        }
        let Some(runtime) = &self.runtime else {
            return Ok(());
        };
        let (output, running) = (self.output.clone(), self.running.clone());
        self.pending.begin();
        // Ends the count however the task ends: finished, or dropped by a Cancel.
        let done = PendingGuard(self.pending.clone());
        let max_frame = self.max_frame;
        // Held while spawning, so the task cannot finish before it is in the table.
        let mut table = lock(&self.running);
        let task = runtime.spawn(async move {
            let _done = done;
            let mut frame = future.await;
            if lock(&running).remove(&id).is_some() {
                output.share_last_frame(&mut frame, 0, max_frame);
                let _ = output.write(&frame);
            }
        });
        table.insert(id, task.abort_handle());
        Ok(())
    }

    fn flush(&mut self) -> Result<(), ServeError> {
        if self.out.is_empty() {
            return Ok(());
        }
        self.output.write(&self.out).map_err(serve_error)?;
        self.out.clear();
        if self.out.capacity() > 1024 * 1024 {
            self.out.shrink_to(64 * 1024);
        }
        Ok(())
    }

    /// Answers what is still running, then stops the pool and the runtime.
    fn finish(&mut self) {
        let _ = self.flush();
        if let Some(jobs) = self.pool.take() {
            // Jobs read in the turn that ended the loop (an error stops it mid-turn) are
            // counted as pending: they run and are answered like the rest.
            jobs.push_all(&mut self.batch);
            jobs.close();
        }
        self.pending.wait_for_zero();
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Answers call `id` refused, unrun: the worker backs off for `left` more.
fn refuse_backing_off(id: u64, left: std::time::Duration, max_frame: usize, out: &mut Vec<u8>) {
    let failure = Failure::refused(Some(left), "backing off after an earlier refusal");
    error_frame(id, &failure, max_frame, out);
}

/// Runs the worker's set-up with the farm's arguments: why it failed, if it did. A farm that
/// passes arguments to a worker without a set-up is refused: they would be ignored, which
/// is a configuration mistake the user should hear of.
fn run_setup<S: Serializer>(
    setup: Option<super::Setup<S>>,
    serializer: &S,
    args: Option<&[u8]>,
) -> Option<String> {
    match setup {
        Some(setup) => setup(serializer, args).err(),
        None if args.is_some() => Some(
            "the farm passed set-up arguments (FarmOptions::setup_args or PerWorker::setup_args) \
             but this worker has no Worker::setup"
                .to_owned(),
        ),
        None => None,
    }
}

fn protocol_started(id: u64, max_frame: usize, out: &mut Vec<u8>) {
    let start = frame::begin(out);
    protocol::encode_started(id, out);
    // Cannot fail: 13 bytes fit any cap the farm accepts.
    let _ = frame::finish(out, start, max_frame);
}

/// Starts `threads` threads that run sync calls in arrival order.
fn start_pool<S: Serializer>(
    threads: usize,
    serializer: S,
    max_frame: usize,
    output: &Arc<Output>,
    pending: &Arc<Pending>,
    slots: Option<Slots>,
) -> Result<Arc<Jobs<S>>, ServeError> {
    let jobs = Arc::new(Jobs::new());
    for n in 0..threads {
        let (jobs, s, output, pending, slots) = (
            jobs.clone(),
            serializer.clone(),
            output.clone(),
            pending.clone(),
            slots.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name(format!("workfarm-sync-{n}"))
            .spawn(move || run_jobs(&jobs, &s, max_frame, &output, &pending, slots.as_ref()));
        if let Err(e) = spawned {
            // The handshake promised `threads` handlers at once: fewer would leave calls
            // the farm counts as running waiting here.
            return Err(serve_error(format_args!(
                "could not start handler thread {n} of {threads}: {e}"
            )));
        }
    }
    Ok(jobs)
}

fn run_jobs<S: Serializer>(
    jobs: &Jobs<S>,
    serializer: &S,
    max_frame: usize,
    output: &Output,
    pending: &Pending,
    slots: Option<&Slots>,
) {
    // Replies not yet written; each leaves before the next handler starts, together with
    // that call's Started when one follows at once (one write per call, not two).
    let mut out = Vec::new();
    let mut answered = 0;
    let write = |out: &mut Vec<u8>, answered: &mut usize| {
        // A failed write means the farm is gone; the reading thread sees the end of input.
        let _ = output.write(out);
        out.clear();
        for _ in 0..std::mem::take(answered) {
            pending.end();
        }
    };
    loop {
        let job = match jobs.try_pop() {
            Some(job) => job,
            None => {
                write(&mut out, &mut answered);
                match jobs.pop() {
                    Some(job) => job,
                    None => return,
                }
            }
        };
        if job.queued {
            if !Server::<S>::may_start(slots, job.slot) {
                // Taken back by the farm: never started, never answered.
                pending.end();
                continue;
            }
            protocol_started(job.id, max_frame, &mut out);
        }
        if let Some(left) = super::refuse::backing_off() {
            refuse_backing_off(job.id, left, max_frame, &mut out);
            answered += 1;
            continue;
        }
        write(&mut out, &mut answered);
        reply_frame(job.id, max_frame, &mut out, |o| {
            run_sync(&*job.f, serializer, &job.args, job.batch, o)
        });
        // The arguments' region of the shared ring is free from here.
        drop(job);
        output.share_last_frame(&mut out, 0, max_frame);
        answered += 1;
    }
}
