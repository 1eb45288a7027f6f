//! The worker side: what a worker binary writes to serve a farm's calls.
//!
//! Register a default method and named methods, then [`serve`](Worker::serve). Handlers may
//! be sync or async, and may return a plain value or a `Result` whose error's `Display`
//! reaches the caller. A panic in a handler is caught and returned as
//! [`CallError::Panic`](crate::CallError::Panic); the worker keeps serving.
//!
//! ```no_run
//! use workfarm::worker::Worker;
//!
//! fn main() {
//!     Worker::new()
//!         .default_method(|x: i64| x)
//!         .method("add", |(a, b): (i64, i64)| a + b)
//!         .try_method("div", |(a, b): (i64, i64)| a.checked_div(b).ok_or("division by zero"))
//!         .method_async("sleep", |ms: u64| async move {
//!             tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
//!             ms
//!         })
//!         .serve()
//!         .expect("not started by a farm");
//! }
//! ```
//!
//! # Threads
//!
//! Like a Node worker, a worker runs its sync (CPU-bound) handlers on **one thread** by
//! default, one at a time, right where it reads its calls: no hand-off between threads, and
//! never inside a tokio runtime, so a handler may use a blocking client that builds its own.
//! Async handlers, if the worker has any, run on a small runtime of their own and interleave
//! while they await. [`threads`](Worker::threads) opts out: with `threads(n)` up to `n` sync
//! handlers run in parallel (and the async runtime gets `n` threads).
//!
//! The worker tells the farm in its handshake how many sync handlers it runs at once and
//! which methods are async, so the farm knows which of the calls it sent are running and
//! which only wait (see the README on failures: a waiting call is never charged for a
//! crash or a hang it had no part in).
//!
//! # Standard streams
//!
//! Frames travel on a private duplicate of the original stdout; fd 1 is pointed at stderr
//! before any handler runs, so `println!` in a handler (or a child process it starts)
//! cannot corrupt the stream. The farm forwards the worker's stderr to its own.
//!
//! The worker exits when the farm says Stop and closes its stdin, after finishing the calls
//! it has. If instead the farm died (its stdin ended without Stop, or the parent-death
//! signal arrived mid-call), it SIGKILLs its process group at once: itself and every process its
//! handlers started, which would otherwise outlive the farm. The parent-death signal is
//! `SIGHUP`: handler code must leave `SIGHUP`'s disposition alone, and a `SIGHUP` sent to a
//! worker by hand ends its whole group.

mod handler;
mod refuse;
mod serve;

pub use refuse::Refuse;

use crate::protocol::launch::{PARENT_PID_ENV, WORKER_ENV};
use crate::serializer::{Builtin, Serializer};
use crate::sys;
use handler::{async_handler, sync_handler, Handler};
use serde::{de::DeserializeOwned, Serialize};
use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt::{self, Display};
use std::future::Future;
use std::sync::{Arc, OnceLock};

/// The name of the default method on the wire.
pub const DEFAULT_METHOD: &str = "";

/// A worker: a table of handlers, served over stdin/stdout to the farm that started it.
///
/// `St` is the state its [`setup`](Worker::setup) builds (`()` without one), which the
/// handlers registered with [`method_with`](Worker::method_with) and its siblings are given.
pub struct Worker<S: Serializer = Builtin, St = ()> {
    serializer: S,
    handlers: HashMap<String, Handler<S>>,
    threads: usize,
    /// Set by the set-up before the worker reports ready (at once when there is none).
    state: SharedState<St>,
    setup: Option<Setup<S>>,
}

/// A set-up's argument when the farm gave none: `()` if it decodes from `()`, else from
/// `None` (a non-self-describing format such as Postcard encodes the two differently).
fn decode_nothing<S: Serializer, A: DeserializeOwned>(
    serializer: &S,
) -> Result<A, crate::serializer::SerializeError> {
    let mut bytes = Vec::new();
    serializer.encode(&(), &mut bytes)?;
    serializer.decode(&bytes).or_else(|first| {
        bytes.clear();
        serializer.encode(&None::<()>, &mut bytes)?;
        serializer.decode(&bytes).map_err(|_| first)
    })
}

/// Where the set-up leaves the state, for every handler that takes it.
type SharedState<St> = Arc<OnceLock<Arc<St>>>;

/// The state the set-up built. Handlers run only after the set-up succeeded (the worker
/// reports ready only then), so it is always there; were it not, the handler's panic would
/// be caught and answered as `CallError::Panic`.
fn state_of<St>(state: &SharedState<St>) -> &Arc<St> {
    match state.get() {
        Some(state) => state,
        None => panic!("workfarm: a handler ran before the worker's set-up"),
    }
}

/// A set-up, type-erased: decodes its arguments (`None`: the farm sent none) with the
/// farm's serializer, runs, and stores the state; or says why it could not.
pub(crate) type Setup<S> = Box<dyn FnOnce(&S, Option<&[u8]>) -> Result<(), String> + Send>;

impl<St> fmt::Debug for Worker<Builtin, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("methods", &self.handlers.keys().collect::<Vec<_>>())
            .field("threads", &self.threads)
            .field("setup", &self.setup.is_some())
            .finish()
    }
}

impl Default for Worker<Builtin> {
    fn default() -> Self {
        Self::new()
    }
}

impl Worker<Builtin> {
    /// A worker with no methods that speaks every built-in serializer (JSON, CBOR and
    /// Postcard), choosing the one the farm names in its handshake.
    pub fn new() -> Self {
        Worker::with_serializer(Builtin::Json)
    }

    /// Whether this process was started by a farm as one of its workers.
    ///
    /// A process a worker's handler starts inherits the worker's environment, but not the
    /// pipe the farm gave the worker as stdin, which is what this checks; so it answers
    /// `false` there. A wrapper between farm and worker must pass that stdin through as it
    /// is (`sh -c`, `env`, `timeout` do; `ssh` or `docker run -i`, which copy it through a
    /// pipe of their own, do not).
    ///
    /// ```
    /// use workfarm::worker::Worker;
    ///
    /// if Worker::is_worker() {
    ///     // started by a farm
    /// }
    /// ```
    pub fn is_worker() -> bool {
        started_by_farm()
    }

    /// This worker's pool slot, `0..workers` (as [`WorkerStatus::slot`] says), if a farm
    /// started it: a replacement inherits the slot of the worker it replaces, so a slot
    /// can stand for a per-worker resource (an access token, a GPU, a port).
    ///
    /// [`WorkerStatus::slot`]: crate::WorkerStatus::slot
    pub fn slot() -> Option<usize> {
        if !started_by_farm() {
            return None;
        }
        std::env::var(crate::protocol::launch::SLOT_ENV)
            .ok()?
            .parse()
            .ok()
    }
}

/// Set once [`Worker::serve`] has begun.
static SERVING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether the farm's marker names this process's stdin (see [`Worker::is_worker`]).
/// Decided once: serving points stdin elsewhere.
fn started_by_farm() -> bool {
    static STARTED_BY_FARM: OnceLock<bool> = OnceLock::new();
    *STARTED_BY_FARM.get_or_init(|| {
        let marker = std::env::var_os(WORKER_ENV);
        marker.is_some() && marker == sys::file_identity(0).map(Into::into)
    })
}

/// Stops a program that a farm started as its own worker
/// ([`FarmOptions::current_exe`](crate::FarmOptions::current_exe)) but that did not call
/// [`Worker::serve_if_worker`] first thing in `main`: such a program would start a farm of
/// itself, which would start another, and so on. It tells the farm why in the protocol and
/// exits, so the farm reports it as the reason its workers cannot start.
pub(crate) fn refuse_to_recurse() {
    // Once serving, a handler may legitimately start a farm of this binary.
    if !started_by_farm() || SERVING.load(std::sync::atomic::Ordering::Relaxed) {
        return;
    }
    let message = "this program was started as a farm's worker (FarmOptions::current_exe) but \
                   builds a farm of itself: call Worker::serve_if_worker() first thing in main";
    let mut frame_bytes = Vec::new();
    let start = crate::protocol::frame::begin(&mut frame_bytes);
    crate::protocol::encode_fatal(message, &mut frame_bytes);
    let _ = crate::protocol::frame::finish(&mut frame_bytes, start, usize::MAX);
    let mut stdout = std::io::stdout().lock();
    let _ = std::io::Write::write_all(&mut stdout, &frame_bytes);
    let _ = std::io::Write::flush(&mut stdout);
    eprintln!("workfarm: {message}");
    std::process::exit(1);
}

/// Why [`Worker::serve`] could not serve.
#[derive(Debug)]
pub struct ServeError {
    message: String,
}

impl Display for ServeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ServeError {}

fn serve_error(message: impl Display) -> ServeError {
    ServeError {
        message: message.to_string(),
    }
}

impl<S: Serializer> Worker<S> {
    /// A worker that speaks only `serializer` (and whatever its
    /// [`select`](Serializer::select) accepts).
    pub fn with_serializer(serializer: S) -> Self {
        Worker {
            serializer,
            handlers: HashMap::new(),
            threads: 1,
            state: Arc::new(OnceLock::from(Arc::new(()))),
            setup: None,
        }
    }

    /// Runs `f` once in each worker process, after the farm's handshake and before the
    /// worker reports ready, and hands what it returns to the handlers registered with
    /// [`method_with`](Worker::method_with) (and its siblings): load a model, open a
    /// connection, read a per-worker token. ProcessPoolExecutor's `initializer`,
    /// jest-worker's `setupArgs`.
    ///
    /// `f` gets the farm's set-up arguments ([`FarmOptions::setup_args`], or its slot's
    /// [`PerWorker::setup_args`]) decoded as `A`; with none given, `A` is decoded from `()`
    /// (so `()` or `Option<T>` need none). The farm's
    /// [`startup_timeout`](crate::FarmOptions::startup_timeout) covers the set-up, and
    /// [`Farm::ready`](crate::Farm::ready) waits for it. A set-up that fails (returns
    /// `Err`, panics, or gets arguments that do not decode) is a start failure: the worker
    /// tells the farm why and exits, and the farm reports it as
    /// [`CallError::WorkerStart`](crate::CallError::WorkerStart) naming the worker (its
    /// slot and pid) and the message, backing off before it starts that slot again.
    ///
    /// ```no_run
    /// use workfarm::worker::Worker;
    ///
    /// struct Model {
    ///     weights: Vec<f64>,
    /// }
    ///
    /// fn main() {
    ///     Worker::new()
    ///         .setup(|path: Option<String>| -> Result<Model, std::io::Error> {
    ///             let path = path.unwrap_or_else(|| "model.bin".into());
    ///             let bytes = std::fs::read(path)?;
    ///             Ok(Model { weights: bytes.iter().map(|&b| f64::from(b)).collect() })
    ///         })
    ///         .method_with("score", |model: &Model, x: f64| model.weights.iter().sum::<f64>() * x)
    ///         .serve()
    ///         .expect("started by a farm");
    /// }
    /// ```
    ///
    /// [`FarmOptions::setup_args`]: crate::FarmOptions::setup_args
    /// [`PerWorker::setup_args`]: crate::PerWorker::setup_args
    #[must_use]
    pub fn setup<A, St, E, F>(self, f: F) -> Worker<S, St>
    where
        A: DeserializeOwned,
        St: Send + Sync + 'static,
        E: Display,
        F: FnOnce(A) -> Result<St, E> + Send + 'static,
    {
        let state = Arc::new(OnceLock::new());
        let filled = state.clone();
        let setup: Setup<S> = Box::new(move |serializer: &S, args: Option<&[u8]>| {
            let decoded = match args {
                Some(bytes) => serializer.decode(bytes),
                None => decode_nothing(serializer),
            };
            let args: A = decoded.map_err(|e| {
                let hint = if args.is_none() {
                    " (the farm gave none: set FarmOptions::setup_args)"
                } else {
                    ""
                };
                format!(
                    "set-up arguments do not decode as {}: {e}{hint}",
                    std::any::type_name::<A>()
                )
            })?;
            let made = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(args)))
                .map_err(|p| format!("set-up panicked: {}", handler::panic_message(&*p)))?
                .map_err(|e| format!("set-up failed: {e}"))?;
            let _ = filled.set(Arc::new(made));
            Ok(())
        });
        Worker {
            serializer: self.serializer,
            handlers: self.handlers,
            threads: self.threads,
            state,
            setup: Some(setup),
        }
    }
}

impl<S: Serializer, St: Send + Sync + 'static> Worker<S, St> {
    /// Runs up to `n` sync handlers in parallel, each on a thread of its own. Default: 1
    /// (one thread, like a Node worker).
    #[must_use]
    pub fn threads(mut self, n: usize) -> Self {
        self.threads = n.max(1);
        self
    }

    /// Registers the default method (what [`Farm::run`](crate::Farm::run) calls): a sync
    /// function from its arguments to its result.
    #[must_use]
    pub fn default_method<A, T, F>(self, f: F) -> Self
    where
        A: DeserializeOwned,
        T: Serialize,
        F: Fn(A) -> T + Send + Sync + 'static,
    {
        self.method(DEFAULT_METHOD, f)
    }

    /// Registers a sync method that cannot fail.
    #[must_use]
    pub fn method<A, T, F>(mut self, name: &str, f: F) -> Self
    where
        A: DeserializeOwned,
        T: Serialize,
        F: Fn(A) -> T + Send + Sync + 'static,
    {
        let handler = sync_handler(move |a| Ok::<T, Infallible>(f(a)));
        self.handlers.insert(name.to_owned(), handler);
        self
    }

    /// Registers a sync method given the worker's state (what [`setup`](Worker::setup)
    /// built).
    #[must_use]
    pub fn method_with<A, T, F>(self, name: &str, f: F) -> Self
    where
        A: DeserializeOwned,
        T: Serialize,
        F: Fn(&St, A) -> T + Send + Sync + 'static,
    {
        self.try_method_with(name, move |state: &St, a: A| {
            Ok::<T, Infallible>(f(state, a))
        })
    }

    /// Registers a sync method given the worker's state, that returns a `Result` (as
    /// [`try_method`](Worker::try_method)).
    #[must_use]
    pub fn try_method_with<A, T, E, F>(mut self, name: &str, f: F) -> Self
    where
        A: DeserializeOwned,
        T: Serialize,
        E: Display + 'static,
        F: Fn(&St, A) -> Result<T, E> + Send + Sync + 'static,
    {
        let state = self.state.clone();
        let handler = sync_handler(move |a| f(state_of(&state), a));
        self.handlers.insert(name.to_owned(), handler);
        self
    }

    /// Registers an async method given the worker's state (shared: the future may
    /// outlive the call that started it).
    #[must_use]
    pub fn method_async_with<A, T, F, Fut>(self, name: &str, f: F) -> Self
    where
        A: DeserializeOwned,
        T: Serialize,
        F: Fn(Arc<St>, A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = T> + Send + 'static,
    {
        self.try_method_async_with(name, move |state: Arc<St>, a: A| {
            let future = f(state, a);
            async move { Ok::<T, Infallible>(future.await) }
        })
    }

    /// Registers an async method given the worker's state, that returns a `Result`.
    #[must_use]
    pub fn try_method_async_with<A, T, E, F, Fut>(mut self, name: &str, f: F) -> Self
    where
        A: DeserializeOwned,
        T: Serialize,
        E: Display + 'static,
        F: Fn(Arc<St>, A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        let state = self.state.clone();
        let handler = async_handler(move |a| f(state_of(&state).clone(), a));
        self.handlers.insert(name.to_owned(), handler);
        self
    }

    /// Registers a sync method that returns a `Result`; the error's `Display` reaches the
    /// caller as [`CallError::Handler`](crate::CallError::Handler). An error that is a
    /// [`Refuse`] sends the call to another worker instead.
    #[must_use]
    pub fn try_method<A, T, E, F>(mut self, name: &str, f: F) -> Self
    where
        A: DeserializeOwned,
        T: Serialize,
        E: Display + 'static,
        F: Fn(A) -> Result<T, E> + Send + Sync + 'static,
    {
        self.handlers.insert(name.to_owned(), sync_handler(f));
        self
    }

    /// Registers an async method that cannot fail.
    #[must_use]
    pub fn method_async<A, T, F, Fut>(mut self, name: &str, f: F) -> Self
    where
        A: DeserializeOwned,
        T: Serialize,
        F: Fn(A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = T> + Send + 'static,
    {
        let handler = async_handler(move |a| {
            let future = f(a);
            async move { Ok::<T, Infallible>(future.await) }
        });
        self.handlers.insert(name.to_owned(), handler);
        self
    }

    /// Registers an async method that returns a `Result`.
    #[must_use]
    pub fn try_method_async<A, T, E, F, Fut>(mut self, name: &str, f: F) -> Self
    where
        A: DeserializeOwned,
        T: Serialize,
        E: Display + 'static,
        F: Fn(A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        self.handlers.insert(name.to_owned(), async_handler(f));
        self
    }

    /// If this process was started by a farm, serves it and then exits the process;
    /// otherwise returns at once. Call it first thing in `main` of a program that is its
    /// own worker ([`FarmOptions::current_exe`](crate::FarmOptions::current_exe)), as
    /// procspawn's `init()`.
    pub fn serve_if_worker(self) {
        if !started_by_farm() {
            return;
        }
        match self.serve() {
            Ok(()) => std::process::exit(0),
            Err(e) => {
                eprintln!("workfarm worker: {e}");
                std::process::exit(1)
            }
        }
    }

    /// Serves calls from the farm on stdin/stdout until the farm closes stdin, then returns
    /// once every call has been answered.
    ///
    /// # Errors
    ///
    /// When stdin/stdout are not the pipes of a farm, the handshake fails, or the farm
    /// breaks the protocol.
    pub fn serve(self) -> Result<(), ServeError> {
        // Read, never removed: children a handler starts inherit the markers but fail the
        // stdin check, and the environment is not touched once threads may exist.
        let by_farm = started_by_farm();
        let farm = by_farm
            .then(|| std::env::var(PARENT_PID_ENV).ok()?.parse().ok())
            .flatten();
        SERVING.store(true, std::sync::atomic::Ordering::Relaxed);
        sys::follow_farm(farm);
        let output = sys::take_stdout_for_frames().map_err(serve_error)?;
        let input = sys::take_stdin().map_err(serve_error)?;
        let run = move || serve::serve(self, input, output, by_farm);
        if tokio::runtime::Handle::try_current().is_ok() {
            // Called from inside a runtime (say `#[tokio::main]`): serve on a thread of our
            // own, so sync handlers run outside any runtime.
            std::thread::spawn(run)
                .join()
                .unwrap_or_else(|_| Err(serve_error("worker thread panicked")))
        } else {
            run()
        }
    }
}

impl<S: Serializer, St> Worker<S, St> {
    /// The names of the async methods, announced in the handshake.
    fn async_methods(&self) -> Vec<String> {
        self.handlers
            .iter()
            .filter(|(_, h)| matches!(h, Handler::Async(_)))
            .map(|(name, _)| name.clone())
            .collect()
    }
}
