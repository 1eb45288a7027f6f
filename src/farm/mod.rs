//! [`Farm`]: the handle a program uses to run calls on a pool of worker processes.

mod call;
mod call_builder;
mod capture;
mod dispatcher;
mod map;
mod policy;
mod registry;
mod stats;
mod transport;
mod workers;

pub use call::CallInfo;
pub use call_builder::{CallBuilder, CallFuture, CallHandle, CancelHandle, WithInfo};
pub use capture::StderrLine;
pub use map::{Map, MapUnordered};
pub use registry::kill_all;
pub use stats::{CallCounts, Latency, SlotStats, Stats, WorkerCounts};
#[cfg(feature = "redis")]
pub(crate) use {capture::StderrCapture, stats::Book};

use crate::error::{CallError, CreateError};
use crate::event::{Event, WorkerId};
use crate::options::FarmOptions;
use crate::protocol::{self, frame, Hello, PROTOCOL_VERSION};
use crate::serializer::{Json, Serializer};
use bytes::Bytes;
pub(crate) use call::{Answer, Call, Reply};
use call::{CallOpts, Limiter, Outcome, Place};
#[cfg(feature = "redis")]
pub(crate) use dispatcher::BroadcastReceivers;
use dispatcher::Dispatcher;
pub(crate) use dispatcher::{CancelWhy, Command, Inputs};
use serde::{de::DeserializeOwned, Serialize};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{broadcast, mpsc, oneshot, watch, Semaphore};
use tracing::Instrument;
use transport::pipe::Pipes;

/// How many events a slow subscriber may fall behind before it sees `Lagged`.
const EVENT_CAPACITY: usize = 4096;

/// A pool of worker processes that runs calls.
///
/// `Farm` is a cheap handle: clone it to share the farm between tasks. One task per farm
/// (the dispatcher) owns the workers, the queue and every policy; calls reach it over a
/// channel and their results come back on a oneshot.
///
/// # Examples
///
/// ```no_run
/// use workfarm::{Farm, FarmOptions};
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let farm = Farm::create(FarmOptions::new("target/release/workfarm-worker").workers(4))?;
/// let sum: i64 = farm.run_method("add", (1, 2)).await?;
/// assert_eq!(sum, 3);
/// let pids = farm.broadcast_method::<_, u32>("pid", ()).await;
/// assert_eq!(pids.successes.len(), 4);
/// farm.shutdown().await;
/// # Ok(())
/// # }
/// ```
///
/// # Drop behavior
///
/// A call's future (or [`CallHandle`], or a [`tell`](Farm::tell)) keeps its farm alive
/// until the call settles, so a caller may drop every `Farm` handle and await its calls
/// later. Once the last handle and the last outstanding call are gone, the farm is killed:
/// every worker is stopped (`SIGTERM`, then `SIGKILL` after `kill_timeout`). If the runtime
/// itself shuts down first, each worker process is killed as its supervising task is
/// dropped.
#[derive(Debug)]
pub struct Farm<S: Serializer = Json> {
    core: Arc<Core>,
    serializer: S,
}

impl<S: Serializer> Farm<S> {
    /// A farm whose calls another dispatcher serves (a farm across machines).
    #[cfg(feature = "redis")]
    pub(crate) fn from_core(core: Core, serializer: S) -> Self {
        Farm {
            core: Arc::new(core),
            serializer,
        }
    }
}

impl<S: Serializer> Clone for Farm<S> {
    fn clone(&self) -> Self {
        Farm {
            core: self.core.clone(),
            serializer: self.serializer.clone(),
        }
    }
}

/// What every handle of one farm shares.
#[derive(Debug)]
pub(crate) struct Core {
    /// New calls. They wait in this channel until a worker has room, so the channel *is*
    /// the queue (no second copy, no growth slack).
    calls: mpsc::UnboundedSender<Call>,
    /// Everything else: broadcast, status, shutdown, kill.
    commands: mpsc::UnboundedSender<Command>,
    events: broadcast::Sender<Event>,
    /// Subscribed at creation so the first `events()` sees the first spawns.
    first_events: Mutex<Option<broadcast::Receiver<Event>>>,
    /// Set by the first `events()`: until then per-call events are not worth sending.
    subscribed: Arc<AtomicBool>,
    limiter: Option<Arc<Limiter>>,
    next_call: AtomicU64,
    /// Size of the last call frame, to size the next one's buffer right the first time.
    frame_hint: AtomicUsize,
    max_frame: usize,
    /// The farm's runtime, for the tasks of fire-and-forget calls.
    runtime: tokio::runtime::Handle,
    load: watch::Receiver<Load>,
    /// Set by the first `load()`: until then the dispatcher does not compute it.
    load_watched: Arc<AtomicBool>,
    /// Calls the workers can hold at once, kept by the dispatcher (the default bound of a map).
    capacity: Arc<AtomicUsize>,
    /// The statistics the dispatcher left when it stopped.
    final_stats: Arc<Mutex<Option<Stats>>>,
    /// The statistics clock's start: calls are stamped with it when submitted.
    epoch: std::time::Instant,
    /// The last lines of each slot's stderr.
    stderr: Arc<capture::StderrCapture>,
}

/// Where a plain call's future starts from.
enum Start {
    Queued(oneshot::Receiver<Outcome>, Option<Place>),
    /// Waiting for a `max_concurrent_calls` place (boxed: rare, and large).
    Waiting(Pin<Box<dyn Future<Output = Result<Received, CallError>> + Send>>),
    Failed(Box<CallError>),
}

/// A queued call's receiver and its place.
type Received = (oneshot::Receiver<Outcome>, Option<Place>);

/// What a call queued with [`Core::queue`] came to.
enum Submitted {
    /// In the queue: its outcome arrives here.
    Queued(oneshot::Receiver<Outcome>, Option<Place>),
    /// `max_concurrent_calls` are out: it waits for a place (see [`Core::queue_when_room`]).
    /// Boxed, so a queued call's future stays small.
    Full(Box<Unsent>),
}

/// A call's frame and options, not yet queued.
type Unsent = (Box<[u8]>, Option<Box<CallOpts>>);

impl Core {
    /// A farm's shared state, and the channels its dispatcher (local or remote) serves.
    pub(crate) fn new(
        max_concurrent_calls: Option<usize>,
        max_frame: usize,
        workers: usize,
        stderr: Arc<capture::StderrCapture>,
    ) -> (Core, Inputs) {
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let (calls, calls_rx) = mpsc::unbounded_channel();
        let (events, first_events) = broadcast::channel(EVENT_CAPACITY);
        let subscribed = Arc::new(AtomicBool::new(false));
        let (load_tx, load) = watch::channel(Load::default());
        let load_watched = Arc::new(AtomicBool::new(false));
        let capacity = Arc::new(AtomicUsize::new(workers));
        let final_stats = Arc::new(Mutex::new(None));
        let epoch = std::time::Instant::now();
        let inputs = Inputs {
            epoch,
            final_stats: final_stats.clone(),
            calls: calls_rx,
            commands: commands_rx,
            events: events.clone(),
            subscribed: subscribed.clone(),
            load: load_tx,
            load_watched: load_watched.clone(),
            capacity: capacity.clone(),
        };
        let core = Core {
            calls,
            commands,
            events,
            first_events: Mutex::new(Some(first_events)),
            subscribed,
            limiter: max_concurrent_calls.map(|limit| {
                Arc::new(Limiter {
                    semaphore: Arc::new(Semaphore::new(limit)),
                    limit,
                    abandoned: AtomicUsize::new(0),
                })
            }),
            next_call: AtomicU64::new(1),
            frame_hint: AtomicUsize::new(64),
            max_frame,
            runtime: tokio::runtime::Handle::current(),
            load,
            load_watched,
            capacity,
            final_stats,
            epoch,
            stderr,
        };
        (core, inputs)
    }

    fn capacity(&self) -> usize {
        self.capacity.load(Ordering::Relaxed)
    }

    /// Queues a call if there is a place for it; without one, `Full` if the caller will
    /// wait for one (`wait`), else `QueueFull`.
    fn queue(
        &self,
        frame: Box<[u8]>,
        opts: Option<Box<CallOpts>>,
        wait: bool,
    ) -> Result<Submitted, CallError> {
        let place = match &self.limiter {
            None => None,
            Some(limiter) => {
                self.sweep_abandoned(limiter);
                // Given back when dropped: on an early return below, or when the call
                // settles, or when the caller's future is dropped.
                match Place::acquire(limiter) {
                    Some(place) => Some(place),
                    None if wait => return Ok(Submitted::Full(Box::new((frame, opts)))),
                    None => {
                        return Err(CallError::QueueFull {
                            limit: limiter.limit,
                        })
                    }
                }
            }
        };
        let rx = self.enqueue(frame, opts, place.as_ref())?;
        Ok(Submitted::Queued(rx, place))
    }

    /// Waits for a place (first come, first served), then queues the call.
    async fn queue_when_room(
        &self,
        frame: Box<[u8]>,
        opts: Option<Box<CallOpts>>,
    ) -> Result<Received, CallError> {
        let place = match &self.limiter {
            Some(limiter) => Some(Place::wait(limiter).await.ok_or(CallError::ShutDown)?),
            None => None,
        };
        let rx = self.enqueue(frame, opts, place.as_ref())?;
        Ok((rx, place))
    }

    fn enqueue(
        &self,
        frame: Box<[u8]>,
        opts: Option<Box<CallOpts>>,
        place: Option<&Place>,
    ) -> Result<oneshot::Receiver<Outcome>, CallError> {
        let (reply, rx) = Reply::new(place.map(Place::share));
        let mut call = Call::new(frame, None, reply);
        call.opts = opts;
        call.taken = stats::stamp(self.epoch);
        self.calls.send(call).map_err(|_| CallError::ShutDown)?;
        Ok(rx)
    }

    /// Waits for a queued (or full) call's outcome. The wait for a place is boxed: it is
    /// rare, and inline it would make every call's future six times the size.
    async fn outcome(&self, submitted: Submitted) -> Result<Answer, CallError> {
        let (rx, place) = match submitted {
            Submitted::Queued(rx, place) => (rx, place),
            Submitted::Full(full) => {
                let (frame, opts) = *full;
                Box::pin(self.queue_when_room(frame, opts)).await?
            }
        };
        // Held until the call settles or this future is dropped, whichever comes first.
        let _place = place.map(Abandon);
        match rx.await {
            Ok(Ok(answer)) => Ok(*answer),
            Ok(Err(error)) => Err(*error),
            Err(_) => Err(CallError::ShutDown),
        }
    }

    /// Abandoned calls give their place back at once but stay in the queue until the
    /// dispatcher reaches them; once `max_concurrent_calls` of them pile up, it sweeps them
    /// out, so the queue stays bounded however many calls are made and dropped.
    fn sweep_abandoned(&self, limiter: &Limiter) {
        if limiter.abandoned.load(Ordering::Relaxed) >= limiter.limit {
            limiter.abandoned.store(0, Ordering::Relaxed);
            let _ = self.commands.send(Command::Sweep);
        }
    }

    fn cancel(&self, call: u64, why: CancelWhy) {
        let _ = self.commands.send(Command::Cancel { call, why });
    }

    async fn request<R>(&self, make: impl FnOnce(oneshot::Sender<R>) -> Command) -> Option<R> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(make(tx)).ok()?;
        rx.await.ok()
    }

    pub(crate) async fn kill(&self) {
        self.request(Command::Kill).await;
    }
}

/// How busy a farm is, from [`Farm::load`]: a cheap signal for a program that feeds the
/// farm from elsewhere (a network queue, say) and takes work only while there is room.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Load {
    /// Calls waiting for a worker.
    pub queued: usize,
    /// Calls handed to workers: running, or waiting inside them to start.
    pub in_flight: usize,
    /// Calls the online workers could take now without any waiting in the farm's queue.
    pub free: usize,
}

/// The result of a broadcast: one entry per worker that was live when it was sent.
#[derive(Debug)]
pub struct Broadcast<T> {
    /// Workers whose call succeeded, with their results.
    pub successes: Vec<(WorkerId, T)>,
    /// Workers whose call failed, with why.
    pub failures: Vec<(WorkerId, CallError)>,
    /// Why the call reached no worker at all, when it reached none (then `successes` and
    /// `failures` are empty): [`CallError::ShutDown`] once the farm is stopping, or
    /// [`CallError::WorkerStart`] when no worker is starting or online, with the last start
    /// failure if there is one.
    pub unreached: Option<CallError>,
}

/// A snapshot of a farm, from [`Farm::status`].
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Status {
    /// Every worker process the farm has, including ones being stopped (empty on a farm
    /// made with `Farm::connect`: see `nodes`).
    pub workers: Vec<WorkerStatus>,
    /// Calls waiting for a worker. On a farm made with `Farm::connect`: calls in the farm's
    /// stream that no node has taken yet, from every caller.
    pub queued: usize,
    /// On a farm made with `Farm::connect`: the nodes serving it now (their liveness key
    /// exists). Empty on a local farm.
    pub nodes: Vec<NodeStatus>,
}

/// One node in a remote farm's [`Status`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct NodeStatus {
    /// Its name (`host-pid-n`), as in [`WorkerId::node`](crate::WorkerId::node).
    pub name: String,
    /// Its workers: what a broadcast reaches there.
    pub workers: usize,
    /// Calls it holds (running, or waiting there for a worker), from every caller.
    pub holding: usize,
}

impl Status {
    /// Calls handed to workers: running, or waiting inside them to start.
    pub fn in_flight(&self) -> usize {
        self.workers.iter().map(|w| w.in_flight).sum()
    }
}

/// One worker in a [`Status`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct WorkerStatus {
    /// The worker.
    pub id: WorkerId,
    /// Its process id.
    pub pid: u32,
    /// Where it is in its life.
    pub state: WorkerState,
    /// Its pool slot, `0..workers`: its replacement takes the same one, keyed calls go by
    /// it, and the worker reads it with [`Worker::slot`](crate::worker::Worker::slot).
    pub slot: usize,
    /// Calls it holds: running, or waiting inside it to start.
    pub in_flight: usize,
    /// Of those, calls that wait inside it (sent ahead, not started; see
    /// [`FarmOptions::max_concurrent_calls_per_worker`](crate::FarmOptions::max_concurrent_calls_per_worker)).
    pub waiting: usize,
    /// Calls it has been handed (what `ttl` counts).
    pub handed: u64,
}

/// Where a worker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WorkerState {
    /// Spawned, handshake not yet done.
    Starting,
    /// Takes calls.
    Online,
    /// Takes no new calls (ttl reached, or shutting down); stops when its calls are done.
    Retiring,
    /// Asked to exit; `SIGKILL` follows after `kill_timeout`.
    Stopping,
}

impl<S: Serializer> Farm<S> {
    /// Starts a farm: checks the options, spawns the workers and returns without waiting
    /// for their handshakes (calls made meanwhile wait in the queue).
    ///
    /// # Errors
    ///
    /// [`CreateError::InvalidOption`] for an out-of-range option;
    /// [`CreateError::WorkerNotFound`], [`CreateError::NotExecutable`] or
    /// [`CreateError::Spawn`] when the worker binary cannot be started;
    /// [`CreateError::CurrentDirNotFound`] for a working directory that does not exist;
    /// [`CreateError::NoRuntime`] outside a tokio runtime, and
    /// [`CreateError::RuntimeDriverMissing`] in one built without its time or I/O driver.
    /// A worker that starts but then fails is reported on its calls
    /// ([`CallError::WorkerStart`]) and in events.
    ///
    /// # Signals
    ///
    /// If `SIGPIPE` is at its default disposition (which kills the process when it writes
    /// to a pipe whose reader is gone, such as a worker that closed its stdin), `create`
    /// sets it to ignored, as every Rust program's runtime does at start; the write then
    /// fails with an error the farm handles. A handler the program installed is kept.
    pub fn create(options: FarmOptions<S>) -> Result<Self, CreateError> {
        options.validate()?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(CreateError::NoRuntime);
        }
        if let Some(driver) = missing_runtime_driver() {
            return Err(CreateError::RuntimeDriverMissing { driver });
        }
        if let Some(dir) = options.settings.cwd.as_ref().filter(|dir| !dir.is_dir()) {
            return Err(CreateError::CurrentDirNotFound { path: dir.clone() });
        }
        if is_current_exe(&options.settings.program) {
            crate::worker::refuse_to_recurse();
        }
        crate::sys::ignore_sigpipe_if_default();
        let FarmOptions {
            mut settings,
            serializer,
        } = options;
        let per_slot: Vec<crate::options::PerWorker> = (0..settings.workers)
            .map(|slot| {
                settings
                    .per_worker
                    .as_ref()
                    .map(|f| (f.0)(slot))
                    .unwrap_or_default()
            })
            .collect();
        let hellos = per_slot
            .iter()
            .enumerate()
            .map(|(slot, config)| {
                let args = config.setup_args.as_ref().or(settings.setup_args.as_ref());
                hello_frame(&settings, &serializer, slot, args)
            })
            .collect::<Result<Vec<_>, _>>()?;
        settings.slots = per_slot.into_iter().map(|config| config.spec).collect();
        let settings = Arc::new(settings);
        let stderr = Arc::new(capture::StderrCapture::new(
            settings.workers,
            settings.stderr_capture,
        ));
        let (core, inputs) = Core::new(
            settings.max_concurrent_calls,
            settings.max_frame,
            settings.workers,
            stderr.clone(),
        );
        let transport = Pipes::new(settings.clone(), stderr);
        let mut dispatcher = Dispatcher::new(settings.clone(), hellos, transport, inputs);
        let program = &settings.program;
        dispatcher
            .start()
            .map_err(|source| spawn_error(program, source))?;
        let span = tracing::debug_span!("farm", program = %program.display());
        tokio::spawn(dispatcher.run().instrument(span));
        let core = Arc::new(core);
        registry::register(&core);
        Ok(Farm { core, serializer })
    }

    /// Runs the worker's default method with `args` (a tuple for several).
    ///
    /// The call is queued when `run` is called, not when the future is first polled, so a
    /// loop of `run` calls submits them all at once. With
    /// [`max_concurrent_calls`](FarmOptions::max_concurrent_calls) reached, it is queued
    /// when a place frees instead (first come, first served), while the future is polled;
    /// [`try_run`](Self::try_run) fails at once instead.
    ///
    /// # Errors
    ///
    /// Any [`CallError`]; `ShutDown` and `Serialize` come without waiting.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future before it completes abandons the call: if it is still queued it
    /// never runs; if a worker is already running it, it runs to the end and the result is
    /// discarded. (To stop a running call, use [`call`](Self::call) and
    /// [`CallHandle::cancel`], or `cancel_on_drop`.) The future keeps the farm alive until
    /// it settles or is dropped.
    pub fn run<A, T>(&self, args: A) -> impl Future<Output = Result<T, CallError>> + Send + 'static
    where
        A: Serialize,
        T: DeserializeOwned,
    {
        self.run_method("", args)
    }

    /// Runs the worker's method `method` with `args`. See [`run`](Self::run).
    pub fn run_method<A, T>(
        &self,
        method: &str,
        args: A,
    ) -> impl Future<Output = Result<T, CallError>> + Send + 'static
    where
        A: Serialize,
        T: DeserializeOwned,
    {
        self.run_decoded(method, &args, true)
    }

    /// Like [`run`](Self::run), but with `max_concurrent_calls` reached it fails at once
    /// with [`CallError::QueueFull`] rather than wait for a place.
    pub fn try_run<A, T>(
        &self,
        args: A,
    ) -> impl Future<Output = Result<T, CallError>> + Send + 'static
    where
        A: Serialize,
        T: DeserializeOwned,
    {
        self.try_run_method("", args)
    }

    /// Like [`run_method`](Self::run_method), but with `max_concurrent_calls` reached it
    /// fails at once with [`CallError::QueueFull`] rather than wait for a place.
    pub fn try_run_method<A, T>(
        &self,
        method: &str,
        args: A,
    ) -> impl Future<Output = Result<T, CallError>> + Send + 'static
    where
        A: Serialize,
        T: DeserializeOwned,
    {
        self.run_decoded(method, &args, false)
    }

    fn run_decoded<A, T>(
        &self,
        method: &str,
        args: &A,
        wait: bool,
    ) -> impl Future<Output = Result<T, CallError>> + Send + 'static
    where
        A: Serialize,
        T: DeserializeOwned,
    {
        let start = match self.submit(method, args, None, wait) {
            Ok(Submitted::Queued(rx, place)) => Start::Queued(rx, place),
            Ok(Submitted::Full(full)) => {
                let core = self.core.clone();
                Start::Waiting(Box::pin(async move {
                    let (frame, opts) = *full;
                    core.queue_when_room(frame, opts).await
                }))
            }
            Err(error) => Start::Failed(Box::new(error)),
        };
        let serializer = self.serializer.clone();
        // For a result that does not decode: the error names the method.
        let method: Box<str> = method.into();
        // Small on purpose (a million may wait): no nested future, nothing but the receiver
        // and the place held across the await. An outstanding call keeps its farm alive
        // without holding it (see `Dispatcher::orphaned`).
        async move {
            let (rx, place) = match start {
                Start::Queued(rx, place) => (rx, place),
                Start::Waiting(waiting) => waiting.await?,
                Start::Failed(error) => return Err(*error),
            };
            // Held until the call settles or this future is dropped, whichever comes first.
            let _place = place.map(Abandon);
            let answer = match rx.await {
                Ok(Ok(answer)) => answer,
                Ok(Err(error)) => return Err(*error),
                Err(_) => return Err(CallError::ShutDown),
            };
            decode_result(&serializer, &method, &answer.body)
        }
    }

    /// Runs `method` once per item of `items`, all in one call (one frame each way):
    /// each item's result, or why it failed. A failure of the whole call (a crash, a
    /// timeout) is every item's.
    fn run_batch<A, T>(
        &self,
        method: &str,
        items: &[A],
    ) -> impl Future<Output = Vec<Result<T, CallError>>> + Send + 'static
    where
        A: Serialize,
        T: DeserializeOwned,
    {
        let count = items.len();
        let id = self.core.next_call.fetch_add(1, Ordering::Relaxed);
        let submitted = self
            .encode_call(
                id,
                method,
                |s, buf| {
                    buf.extend_from_slice(&u32::try_from(count).unwrap_or(u32::MAX).to_le_bytes());
                    items
                        .iter()
                        .try_for_each(|item| protocol::push_batch_item(buf, |b| s.encode(item, b)))
                },
                type_name::<A>(),
            )
            .and_then(|mut frame| {
                protocol::mark_batch(&mut frame);
                self.core.queue(frame, None, true)
            })
            .map_err(Box::new);
        let serializer = self.serializer.clone();
        let method: Box<str> = method.into();
        let core = self.core.clone();
        async move {
            let outcome = match submitted {
                Ok(submitted) => core.outcome(submitted).await,
                Err(error) => Err(*error),
            };
            let items = outcome.and_then(|answer| {
                protocol::batch_results(answer.body).map_err(|e| CallError::Deserialize {
                    method: method.to_string(),
                    type_name: "a batch of results",
                    message: e.to_string(),
                })
            });
            match items {
                Ok(items) if items.len() == count => items
                    .into_iter()
                    .map(|item| match item {
                        Ok(body) => decode_result(&serializer, &method, &body),
                        Err((kind, message)) => {
                            Err(dispatcher::failure_error(kind, method.to_string(), message))
                        }
                    })
                    .collect(),
                Ok(items) => {
                    let error = CallError::Deserialize {
                        method: method.to_string(),
                        type_name: "a batch of results",
                        message: format!("{} results for {count} inputs", items.len()),
                    };
                    (0..count).map(|_| Err(error.clone())).collect()
                }
                Err(error) => (0..count).map(|_| Err(error.clone())).collect(),
            }
        }
    }

    /// Starts a call of `method` with per-call options: a [`CallBuilder`]. Await it for the
    /// result, or [`start`](CallBuilder::start) it for a [`CallHandle`] that can be
    /// cancelled and tells where the call ran.
    ///
    /// ```no_run
    /// # use workfarm::{Farm, FarmOptions};
    /// # use std::time::Duration;
    /// # async fn demo(farm: Farm) -> Result<(), workfarm::CallError> {
    /// let sum: i64 = farm
    ///     .call("add", (1, 2))
    ///     .timeout(Duration::from_secs(5))
    ///     .retries(0)
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn call<'a, A, T>(&'a self, method: &'a str, args: A) -> CallBuilder<'a, S, A, T>
    where
        A: Serialize,
        T: DeserializeOwned,
    {
        CallBuilder::new(self, method, args)
    }

    /// Queues a call of `method` whose result nobody waits for (dworker's `tell`): it runs
    /// like any call (retries included), its result is dropped, and its failure is sent as
    /// [`Event::TellFailed`]. Returns the call's id. It keeps the farm alive until it
    /// settles.
    ///
    /// # Errors
    ///
    /// `Serialize`, `ShutDown`, and `QueueFull` when `max_concurrent_calls` are out (a
    /// `tell` never waits).
    pub fn tell<A: Serialize>(&self, method: &str, args: A) -> Result<u64, CallError> {
        let id = self.core.next_call.fetch_add(1, Ordering::Relaxed);
        let frame =
            self.encode_call(id, method, |s, buf| s.encode(&args, buf), type_name::<A>())?;
        let submitted = self.core.queue(frame, None, false)?;
        let core = self.core.clone();
        let method = method.to_owned();
        self.core.runtime.spawn(async move {
            if let Err(error) = core.outcome(submitted).await {
                let _ = core.events.send(Event::TellFailed {
                    call: id,
                    method,
                    error,
                });
            }
        });
        Ok(id)
    }

    /// Runs `method` with arguments already encoded in the farm's serializer, and returns
    /// the result as the worker encoded it: for a program that forwards calls it does not
    /// decode. A malformed `args` is the worker's [`CallError::BadArguments`].
    pub fn run_raw(
        &self,
        method: &str,
        args: Bytes,
    ) -> impl Future<Output = Result<Bytes, CallError>> + Send + 'static {
        let id = self.core.next_call.fetch_add(1, Ordering::Relaxed);
        let submitted = self
            .encode_call(
                id,
                method,
                |_, buf| {
                    buf.extend_from_slice(&args);
                    Ok(())
                },
                "raw bytes",
            )
            .and_then(|frame| self.core.queue(frame, None, true))
            .map_err(Box::new);
        let core = self.core.clone();
        async move {
            let answer = core.outcome(submitted.map_err(|e| *e)?).await?;
            Ok(answer.body)
        }
    }

    /// As [`run_raw`](Self::run_raw), with a timeout and a retry budget for this call, and
    /// where it ran: how a node runs the calls it pulls from another machine. Dropped before
    /// it settles, the future cancels the call (a node that lost its lease stops it).
    #[cfg(feature = "redis")]
    pub(crate) fn run_raw_with(
        &self,
        method: &str,
        args: &[u8],
        timeout: Option<std::time::Duration>,
        retries: u32,
    ) -> impl Future<Output = Result<Answer, CallError>> + Send + 'static {
        let id = self.core.next_call.fetch_add(1, Ordering::Relaxed);
        let mut opts = CallOpts::new();
        opts.timeout = timeout;
        opts.retries = Some(retries);
        opts.made = Some(std::time::Instant::now());
        let submitted = self
            .encode_call(
                id,
                method,
                |_, buf| {
                    buf.extend_from_slice(args);
                    Ok(())
                },
                "raw bytes",
            )
            .and_then(|frame| self.core.queue(frame, Some(Box::new(opts)), true))
            .map_err(Box::new);
        let core = self.core.clone();
        async move {
            /// Cancels the call unless disarmed (it settled).
            struct CancelOnDrop(Option<(Arc<Core>, u64)>);
            impl Drop for CancelOnDrop {
                fn drop(&mut self) {
                    if let Some((core, id)) = self.0.take() {
                        core.cancel(id, CancelWhy::Cancelled);
                    }
                }
            }
            let mut guard = CancelOnDrop(Some((core.clone(), id)));
            let answer = core.outcome(submitted.map_err(|e| *e)?).await;
            guard.0 = None;
            answer
        }
    }

    /// Like [`broadcast_method`](Self::broadcast_method) with arguments already encoded in
    /// the farm's serializer; results come back as the workers encoded them.
    pub async fn broadcast_raw(&self, method: &str, args: Bytes) -> Broadcast<Bytes> {
        let id = self.core.next_call.fetch_add(1, Ordering::Relaxed);
        let frame = self.encode_call(
            id,
            method,
            |_, buf| {
                buf.extend_from_slice(&args);
                Ok(())
            },
            "raw bytes",
        );
        self.broadcast_frame(frame, Ok).await
    }

    /// The farm's load, as a [`watch`] that changes as calls are queued, handed out and
    /// answered: queued calls, calls in flight, and free places in online workers.
    /// Computed only once someone has asked for it.
    pub fn load(&self) -> watch::Receiver<Load> {
        if !self.core.load_watched.swap(true, Ordering::Relaxed) {
            // Wake the dispatcher, so the first value is a real one.
            let _ = self.core.commands.send(Command::Nudge);
        }
        self.core.load.clone()
    }

    /// Maps `method` over `inputs`, yielding results in input order: a
    /// [`Stream`](futures_core::Stream) that keeps up to what the farm can run at once in
    /// flight, and pulls the next input only when there is room (an endless iterator is
    /// fine). See [`Map`] for the bound and `chunk_size`.
    pub fn map<I, A, T>(&self, method: &str, inputs: I) -> Map<S, I::IntoIter, T>
    where
        I: IntoIterator<Item = A>,
        A: Serialize,
        T: DeserializeOwned + Send + 'static,
    {
        Map::new(self.clone(), method, inputs.into_iter())
    }

    /// Maps `method` over `inputs`, yielding each result as it completes, with its input's
    /// index. See [`map`](Self::map).
    pub fn map_unordered<I, A, T>(&self, method: &str, inputs: I) -> MapUnordered<S, I::IntoIter, T>
    where
        I: IntoIterator<Item = A>,
        A: Serialize,
        T: DeserializeOwned + Send + 'static,
    {
        MapUnordered::new(self.clone(), method, inputs.into_iter())
    }

    /// Runs the default method once on every live worker. See
    /// [`broadcast_method`](Self::broadcast_method).
    pub async fn broadcast<A, T>(&self, args: A) -> Broadcast<T>
    where
        A: Serialize,
        T: DeserializeOwned,
    {
        self.broadcast_method("", args).await
    }

    /// Runs `method` once on every worker that is starting or online, and reports each
    /// worker's success or failure apart. A broadcast call never moves to another worker
    /// and is never retried: a worker that dies during it is that worker's failure. It does
    /// not count towards `max_concurrent_calls` or `ttl`, and goes ahead of calls already
    /// queued: each worker runs it as soon as it has a free slot.
    pub async fn broadcast_method<A, T>(&self, method: &str, args: A) -> Broadcast<T>
    where
        A: Serialize,
        T: DeserializeOwned,
    {
        let id = self.core.next_call.fetch_add(1, Ordering::Relaxed);
        let frame = self.encode_call(id, method, |s, buf| s.encode(&args, buf), type_name::<A>());
        let serializer = self.serializer.clone();
        self.broadcast_frame(frame, |body| decode_result(&serializer, method, &body))
            .await
    }

    async fn broadcast_frame<T>(
        &self,
        frame: Result<Box<[u8]>, CallError>,
        decode: impl Fn(Bytes) -> Result<T, CallError>,
    ) -> Broadcast<T> {
        let mut result = Broadcast {
            successes: Vec::new(),
            failures: Vec::new(),
            unreached: None,
        };
        let frame = match frame {
            Ok(frame) => frame,
            Err(error) => {
                // Nothing was sent: each live worker's call failed the same way.
                for worker in self.status().await.workers {
                    if matches!(worker.state, WorkerState::Starting | WorkerState::Online) {
                        result.failures.push((worker.id, error.clone()));
                    }
                }
                if result.failures.is_empty() {
                    result.unreached = Some(error);
                }
                return result;
            }
        };
        let sent = self
            .core
            .request(|replies| Command::Broadcast { frame, replies })
            .await
            .unwrap_or(Err(CallError::ShutDown));
        let receivers = match sent {
            Ok(receivers) => receivers,
            Err(why) => {
                result.unreached = Some(why);
                return result;
            }
        };
        for (worker, rx) in receivers {
            let outcome = match rx.await {
                Ok(outcome) => outcome.map_err(|e| *e),
                Err(_) => Err(CallError::ShutDown),
            };
            match outcome.and_then(|answer| decode(answer.body)) {
                Ok(value) => result.successes.push((worker, value)),
                Err(error) => result.failures.push((worker, error)),
            }
        }
        result
    }

    /// Subscribes to the farm's [`Event`]s. The first subscription also sees the worker
    /// events from before it (since `create`), up to the channel's capacity; later ones
    /// start now. [`Event::CallDone`] is sent only once someone has subscribed, so a farm
    /// nobody watches pays nothing per call for events.
    /// A subscriber that falls behind by more than 4096 events gets
    /// [`RecvError::Lagged`](tokio::sync::broadcast::error::RecvError::Lagged).
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.core.subscribed.store(true, Ordering::Relaxed);
        let mut first = self
            .core
            .first_events
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        first.take().unwrap_or_else(|| self.core.events.subscribe())
    }

    /// Waits until every worker has finished its handshake (jest-worker's `start()`), so
    /// start-up problems surface here rather than on the first call, and the first calls
    /// do not pay for process start-up.
    ///
    /// # Errors
    ///
    /// [`CallError::WorkerStart`] once workers have failed to start several times in a row
    /// (see the README on start failures), [`CallError::ShutDown`] if the farm stops first.
    pub async fn ready(&self) -> Result<(), CallError> {
        self.core
            .request(Command::Ready)
            .await
            .unwrap_or(Err(CallError::ShutDown))
    }

    /// The last lines the workers of pool slot `slot` wrote to their stderr, oldest first,
    /// with the worker and pid that wrote each (jest-worker's `getStderr()`). The lines
    /// survive the worker: a replacement adds to its slot's lines, so what a crashed worker
    /// said before it died is here. At most [`FarmOptions::stderr_capture`] lines per slot
    /// (100 by default), whatever the [`StderrMode`](crate::StderrMode); none for a slot
    /// the farm does not have. Lines reach it as the farm reads them, shortly after the
    /// worker writes them.
    ///
    /// [`FarmOptions::stderr_capture`]: crate::FarmOptions::stderr_capture
    ///
    /// ```no_run
    /// # fn demo(farm: &workfarm::Farm) {
    /// for line in farm.stderr(0) {
    ///     println!("[slot 0, pid {}] {}", line.pid, line.line);
    /// }
    /// # }
    /// ```
    pub fn stderr(&self, slot: usize) -> Vec<StderrLine> {
        self.core.stderr.lines(slot)
    }

    /// What the farm has done so far: calls by outcome, workers by how they ended, run and
    /// wait times, per pool slot and in total (see [`Stats`]). Counts survive worker
    /// replacement; after the farm stopped, the final figures.
    ///
    /// ```no_run
    /// # async fn demo(farm: workfarm::Farm) {
    /// let stats = farm.stats().await;
    /// println!(
    ///     "{} ok, {} failed, p99 run {:?}, {} workers started",
    ///     stats.total.calls.succeeded,
    ///     stats.total.calls.failed,
    ///     stats.total.run_time.p99,
    ///     stats.total.workers.spawned,
    /// );
    /// # }
    /// ```
    pub async fn stats(&self) -> Stats {
        match self.core.request(Command::Stats).await {
            Some(stats) => stats,
            None => self
                .core
                .final_stats
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .unwrap_or_default(),
        }
    }

    /// A snapshot of the workers and the queue. Empty once the farm has stopped.
    pub async fn status(&self) -> Status {
        self.core.request(Command::Status).await.unwrap_or_default()
    }

    /// Graceful stop: queued calls fail with [`CallError::ShutDown`], calls in flight run to
    /// the end, then each worker's stdin is closed (`SIGKILL` after `kill_timeout` if it
    /// lingers). Later calls fail at once. Returns when every worker has exited.
    pub async fn shutdown(&self) {
        self.core.request(Command::Shutdown).await;
    }

    /// Immediate stop: queued and in-flight calls fail with [`CallError::ShutDown`] at
    /// once, and every worker gets `SIGTERM`, then `SIGKILL` after `kill_timeout`. Returns
    /// when every worker has exited.
    pub async fn kill(&self) {
        self.core.kill().await;
    }

    /// The serializer this farm uses.
    pub fn serializer(&self) -> &S {
        &self.serializer
    }

    /// Encodes and queues a call (or, with `wait`, readies it to wait for a place).
    fn submit<A: Serialize>(
        &self,
        method: &str,
        args: &A,
        opts: Option<Box<CallOpts>>,
        wait: bool,
    ) -> Result<Submitted, CallError> {
        let id = self.core.next_call.fetch_add(1, Ordering::Relaxed);
        let frame = self.encode_call(id, method, |s, buf| s.encode(args, buf), type_name::<A>())?;
        self.core.queue(frame, opts, wait)
    }

    /// A complete Call frame: the header, then what `args` writes.
    fn encode_call(
        &self,
        id: u64,
        method: &str,
        args: impl FnOnce(&S, &mut Vec<u8>) -> Result<(), crate::serializer::SerializeError>,
        type_name: &'static str,
    ) -> Result<Box<[u8]>, CallError> {
        if method.len() > u16::MAX as usize {
            return Err(CallError::Serialize {
                type_name,
                message: "method name longer than 65535 bytes".into(),
            });
        }
        let hint = self.core.frame_hint.load(Ordering::Relaxed);
        // Capped, so a small call after a huge one does not reserve a huge buffer.
        let mut buf = Vec::with_capacity(hint.clamp(32, 16 << 20));
        let start = frame::begin(&mut buf);
        protocol::encode_call_head(id, method, &mut buf);
        args(&self.serializer, &mut buf).map_err(|e| CallError::Serialize {
            type_name,
            message: e.to_string(),
        })?;
        frame::finish(&mut buf, start, self.core.max_frame).map_err(|e| CallError::Serialize {
            type_name,
            message: e.to_string(),
        })?;
        if buf.len() != hint {
            self.core.frame_hint.store(buf.len(), Ordering::Relaxed);
        }
        Ok(buf.into_boxed_slice())
    }
}

fn type_name<A>() -> &'static str {
    std::any::type_name::<A>()
}

fn decode_result<S: Serializer, T: DeserializeOwned>(
    serializer: &S,
    method: &str,
    body: &[u8],
) -> Result<T, CallError> {
    serializer.decode(body).map_err(|e| CallError::Deserialize {
        method: method.to_owned(),
        type_name: std::any::type_name::<T>(),
        message: e.to_string(),
    })
}

/// The farm's first frame to each worker.
/// The handshake for the workers of `slot`, with its set-up arguments encoded.
fn hello_frame<S: Serializer>(
    settings: &crate::options::Settings,
    serializer: &S,
    slot: usize,
    setup: Option<&crate::options::SetupArgs>,
) -> Result<Box<[u8]>, CreateError> {
    let setup = match setup {
        None => None,
        Some(args) => {
            let mut bytes = Vec::new();
            serializer
                .encode(&*args.0, &mut bytes)
                .map_err(|e| CreateError::SetupArgs {
                    slot,
                    message: e.to_string(),
                })?;
            Some(Bytes::from(bytes))
        }
    };
    let has_setup = setup.is_some();
    let mut hello = Vec::new();
    let start = frame::begin(&mut hello);
    protocol::encode_hello(
        &Hello {
            version: PROTOCOL_VERSION,
            max_frame: u32::try_from(settings.max_frame).unwrap_or(u32::MAX),
            serializer: serializer.name().to_owned(),
            setup,
        },
        &mut hello,
    );
    frame::finish(&mut hello, start, settings.max_frame).map_err(|e| {
        if has_setup {
            CreateError::SetupArgs {
                slot,
                message: e.to_string(),
            }
        } else {
            CreateError::InvalidOption {
                name: "max_frame",
                reason: "too small for the handshake",
            }
        }
    })?;
    Ok(hello.into_boxed_slice())
}

/// The driver the current runtime lacks, if any: the farm's timers need `time`, its pipes
/// `io`. tokio has no way to ask but to try, and trying panics (caught here; the panic
/// hook still prints it, and with `panic = "abort"` the process ends instead).
fn missing_runtime_driver() -> Option<&'static str> {
    let time = std::panic::catch_unwind(|| drop(tokio::time::sleep(std::time::Duration::ZERO)));
    if time.is_err() {
        return Some("time");
    }
    let (read, _write) = crate::sys::pipe().ok()?;
    let io =
        std::panic::catch_unwind(move || tokio::net::unix::pipe::Receiver::from_owned_fd(read));
    io.is_err().then_some("io")
}

/// Whether `program` is this very executable.
fn is_current_exe(program: &std::path::Path) -> bool {
    let canonical = |p: &std::path::Path| std::fs::canonicalize(p).ok();
    let this = std::env::current_exe().ok();
    match (this.as_deref().and_then(canonical), canonical(program)) {
        (Some(this), Some(program)) => this == program,
        _ => false,
    }
}

fn spawn_error(program: &std::path::Path, source: std::io::Error) -> CreateError {
    match source.kind() {
        std::io::ErrorKind::NotFound => CreateError::WorkerNotFound {
            path: program.to_owned(),
        },
        std::io::ErrorKind::PermissionDenied => CreateError::NotExecutable {
            path: program.to_owned(),
        },
        _ => CreateError::Spawn {
            path: program.to_owned(),
            source,
        },
    }
}

/// The caller's hold on a call's place: dropping it before the call settles abandons the
/// call.
struct Abandon(Place);

impl Drop for Abandon {
    fn drop(&mut self) {
        self.0.abandon();
    }
}
