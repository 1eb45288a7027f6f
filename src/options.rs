//! [`FarmOptions`]: every setting of a farm and its default, in one place.

use crate::error::CreateError;
use crate::protocol::frame::DEFAULT_MAX_FRAME;
use crate::serializer::{Json, Serializer};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Where a worker's stderr goes. Whatever the mode, the farm always drains the pipe (so a
/// chatty worker never blocks on it) and keeps the last lines for error reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum StderrMode {
    /// Copied to the parent's stderr as it comes.
    #[default]
    Forward,
    /// Each line becomes a `tracing` event (level INFO, target `workfarm::worker`, with
    /// fields `worker` (its number), `slot` and `pid`).
    Log,
    /// Dropped.
    Discard,
}

/// Settings for [`Farm::create`](crate::Farm::create). Setters take and return the options
/// by value; nothing is checked until `create`, which refuses out-of-range values with
/// [`CreateError::InvalidOption`].
///
/// **Moving many numbers or bytes?** Set
/// [`serializer(Postcard)`](FarmOptions::serializer) ([`Postcard`](crate::serializer::Postcard)): the default, JSON, takes any serde
/// type and is self-describing, but moves a 1 MiB `Vec<f64>` at about a twelfth of
/// Postcard's speed (see the README's performance section).
///
/// # Examples
///
/// ```no_run
/// use std::time::Duration;
/// use workfarm::{FarmOptions, serializer::Cbor};
///
/// let options = FarmOptions::new("target/release/my-worker")
///     .workers(4)
///     .timeout(Duration::from_secs(30))
///     .ttl(10_000)
///     .serializer(Cbor);
/// ```
#[derive(Debug, Clone)]
#[must_use = "options do nothing until passed to Farm::create"]
pub struct FarmOptions<S = Json> {
    pub(crate) settings: Settings,
    pub(crate) serializer: S,
}

/// Every setting but the serializer: what the dispatcher and the transport read. One struct,
/// shared, so no setting is copied field by field on its way in.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) program: PathBuf,
    pub(crate) args: Vec<OsString>,
    pub(crate) envs: Vec<(OsString, OsString)>,
    pub(crate) cwd: Option<PathBuf>,
    pub(crate) stderr: StderrMode,
    /// Lines of stderr kept per slot for `Farm::stderr`.
    pub(crate) stderr_capture: usize,
    /// The most workers, and the number of pool slots.
    pub(crate) workers: usize,
    /// The fewest workers kept (see [`FarmOptions::min_workers`]); `None`: start `workers`,
    /// and let `max_idle_time` stop any of them.
    pub(crate) min_workers: Option<usize>,
    pub(crate) max_refusal_wait: Duration,
    /// `(crashes, window)`: a slot with that many crashes within the window is sidelined.
    pub(crate) quarantine: Option<(u32, Duration)>,
    pub(crate) max_concurrent_calls: Option<usize>,
    /// `None`: up to `policy::pipeline::SYNC_CALLS_PER_WORKER` sync calls (at least the
    /// worker's threads) and [`ASYNC_CALLS_PER_WORKER`] async ones.
    pub(crate) max_concurrent_calls_per_worker: Option<usize>,
    pub(crate) max_retries: u32,
    pub(crate) retry_handler_errors: bool,
    pub(crate) timeout: Option<Duration>,
    pub(crate) ttl: Option<u64>,
    pub(crate) max_idle_time: Option<Duration>,
    pub(crate) max_memory: Option<u64>,
    pub(crate) kill_timeout: Duration,
    pub(crate) startup_timeout: Duration,
    pub(crate) max_frame: usize,
    /// Set-up arguments for every worker, encoded at `create`.
    pub(crate) setup_args: Option<SetupArgs>,
    /// Per-slot configuration, evaluated for each slot at `create`.
    pub(crate) per_worker: Option<PerWorkerFn>,
    /// What `per_worker` said for each slot (filled in by `create`).
    pub(crate) slots: Vec<SlotSpec>,
}

/// A set-up argument value, waiting for the farm's serializer.
#[derive(Clone)]
pub(crate) struct SetupArgs(pub(crate) Arc<dyn erased_serde::Serialize + Send + Sync>);

impl std::fmt::Debug for SetupArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SetupArgs(..)")
    }
}

/// The user's per-slot configuration function.
#[derive(Clone)]
pub(crate) struct PerWorkerFn(pub(crate) Arc<dyn Fn(usize) -> PerWorker + Send + Sync>);

impl std::fmt::Debug for PerWorkerFn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PerWorkerFn(..)")
    }
}

/// One slot's extra command line and environment.
#[derive(Debug, Clone, Default)]
pub(crate) struct SlotSpec {
    pub(crate) args: Vec<OsString>,
    pub(crate) envs: Vec<(OsString, OsString)>,
}

/// What [`FarmOptions::per_worker`] sets for one pool slot: arguments and environment
/// added to the farm-wide ones, and set-up arguments that replace
/// [`FarmOptions::setup_args`] for that slot.
///
/// ```
/// use workfarm::PerWorker;
///
/// let tokens = ["t0", "t1"];
/// let slot = 1;
/// let config = PerWorker::new()
///     .env("API_TOKEN", tokens[slot])
///     .arg("--verbose")
///     .setup_args(format!("region-{slot}"));
/// ```
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct PerWorker {
    pub(crate) spec: SlotSpec,
    pub(crate) setup_args: Option<SetupArgs>,
}

impl PerWorker {
    /// Nothing beyond the farm-wide settings.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an argument to this slot's command line (after the farm-wide ones).
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.spec.args.push(arg.into());
        self
    }

    /// Sets an environment variable for this slot's workers (after the farm-wide ones, so
    /// it wins over them).
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.spec.envs.push((key.into(), value.into()));
        self
    }

    /// This slot's set-up arguments (see [`FarmOptions::setup_args`]).
    pub fn setup_args<A: serde::Serialize + Send + Sync + 'static>(mut self, args: A) -> Self {
        self.setup_args = Some(SetupArgs(Arc::new(args)));
        self
    }
}

/// Async calls one worker runs at once unless `max_concurrent_calls_per_worker` says
/// otherwise.
pub(crate) const ASYNC_CALLS_PER_WORKER: usize = 10;

impl FarmOptions<Json> {
    /// Options for a farm of `program`, with every other setting at its default.
    pub fn new(program: impl AsRef<Path>) -> Self {
        FarmOptions {
            settings: Settings {
                program: program.as_ref().to_path_buf(),
                args: Vec::new(),
                envs: Vec::new(),
                cwd: None,
                stderr: StderrMode::Forward,
                stderr_capture: 100,
                workers: num_cpus::get(),
                min_workers: None,
                max_refusal_wait: Duration::from_secs(30),
                quarantine: None,
                max_concurrent_calls: None,
                max_concurrent_calls_per_worker: None,
                max_retries: 3,
                retry_handler_errors: false,
                timeout: None,
                ttl: None,
                max_idle_time: None,
                max_memory: None,
                kill_timeout: Duration::from_millis(500),
                startup_timeout: Duration::from_secs(10),
                max_frame: DEFAULT_MAX_FRAME,
                setup_args: None,
                per_worker: None,
                slots: Vec::new(),
            },
            serializer: Json,
        }
    }

    /// Options for a farm whose workers are the current executable, re-entered as workers
    /// (see [`Worker::serve_if_worker`](crate::worker::Worker::serve_if_worker)).
    ///
    /// A program started this way that reaches this call instead of serving (it forgot
    /// `serve_if_worker`) would start a farm of itself, and so on without end: instead, it
    /// tells its farm why in the protocol and exits, and the farm's calls and
    /// [`Farm::ready`](crate::Farm::ready) fail with [`CallError::WorkerStart`](crate::CallError::WorkerStart)
    /// saying so.
    pub fn current_exe() -> Self {
        crate::worker::refuse_to_recurse();
        Self::new(std::env::current_exe().unwrap_or_default())
    }

    /// Options for a farm of the binary `name` that sits next to the current executable:
    /// a worker binary built in the same Cargo package (`src/bin/<name>.rs`, or a
    /// `[[bin]]`), which Cargo puts in the same `target/<profile>/` directory. From a test,
    /// example or benchmark, which Cargo puts one directory deeper (`deps/`, `examples/`),
    /// it looks in the directory above.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// // target/release/my-worker, next to target/release/my-app
    /// let farm = workfarm::Farm::create(workfarm::FarmOptions::sibling("my-worker"))?;
    /// # Ok(()) }
    /// ```
    ///
    /// A missing binary is a [`CreateError`](crate::CreateError) from `Farm::create` naming
    /// the path it tried. In an integration test of the package, `env!("CARGO_BIN_EXE_<name>")`
    /// names the binary too, and makes Cargo build it first.
    pub fn sibling(name: impl AsRef<Path>) -> Self {
        let name = name.as_ref();
        let beside = std::env::current_exe().ok().and_then(|exe| {
            let dir = exe.parent()?;
            let nested = ["deps", "examples"].map(std::ffi::OsStr::new);
            let dir = match dir.file_name() {
                Some(leaf) if nested.contains(&leaf) => dir.parent()?,
                _ => dir,
            };
            Some(dir.join(name))
        });
        Self::new(beside.unwrap_or_else(|| name.to_path_buf()))
    }
}

impl<S: Serializer> FarmOptions<S> {
    /// Adds an argument to the worker's command line. Default: none.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.settings.args.push(arg.into());
        self
    }

    /// Adds arguments to the worker's command line. Default: none.
    pub fn args<I: IntoIterator<Item = A>, A: Into<OsString>>(mut self, args: I) -> Self {
        self.settings.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable for the worker, on top of the parent's environment.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.settings.envs.push((key.into(), value.into()));
        self
    }

    /// Arguments for every worker's set-up ([`Worker::setup`](crate::worker::Worker::setup)),
    /// encoded with the farm's serializer at [`Farm::create`](crate::Farm::create) (an
    /// encoding failure is [`CreateError::SetupArgs`]) and passed in the handshake; the
    /// worker decodes them as its set-up's argument type. Default: none (a set-up then
    /// decodes its argument from `()`, which suits `()` and `Option<T>`).
    /// [`per_worker`](Self::per_worker) may replace them slot by slot. A worker without a
    /// set-up refuses to start when it is given some.
    pub fn setup_args<A: serde::Serialize + Send + Sync + 'static>(mut self, args: A) -> Self {
        self.settings.setup_args = Some(SetupArgs(Arc::new(args)));
        self
    }

    /// Configures each pool slot: `f(slot)` for each slot `0..workers`, called once at
    /// [`Farm::create`](crate::Farm::create), gives that slot's extra arguments,
    /// environment and set-up arguments ([`PerWorker`]). A replacement worker inherits its
    /// slot, and so its configuration: one access token per slot stays one per worker.
    ///
    /// ```no_run
    /// use workfarm::{FarmOptions, PerWorker};
    ///
    /// let tokens = vec!["token-a".to_owned(), "token-b".to_owned()];
    /// let options = FarmOptions::new("target/release/my-worker")
    ///     .workers(tokens.len())
    ///     .per_worker(move |slot| PerWorker::new().env("API_TOKEN", &tokens[slot]));
    /// ```
    pub fn per_worker(mut self, f: impl Fn(usize) -> PerWorker + Send + Sync + 'static) -> Self {
        self.settings.per_worker = Some(PerWorkerFn(Arc::new(f)));
        self
    }

    /// The worker's working directory. Default: the parent's.
    pub fn current_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.settings.cwd = Some(dir.as_ref().to_path_buf());
        self
    }

    /// Where workers' stderr goes. Default: [`StderrMode::Forward`] (the parent's stderr).
    pub fn stderr(mut self, mode: StderrMode) -> Self {
        self.settings.stderr = mode;
        self
    }

    /// Lines of stderr kept per pool slot for [`Farm::stderr`](crate::Farm::stderr), in
    /// every [`StderrMode`]; 0 keeps none. Default: 100 (a line is at most 4 KiB).
    pub fn stderr_capture(mut self, lines: usize) -> Self {
        self.settings.stderr_capture = lines;
        self
    }

    /// Number of worker processes, and of pool slots (`0..n`). Default: the number of
    /// CPUs. Must be at least 1. With [`min_workers`](Self::min_workers) it is the most the
    /// pool grows to ([`max_workers`](Self::max_workers) is the same setting).
    pub fn workers(mut self, n: usize) -> Self {
        self.settings.workers = n;
        self
    }

    /// The most workers an elastic pool grows to: the same setting as
    /// [`workers`](Self::workers).
    pub fn max_workers(self, n: usize) -> Self {
        self.workers(n)
    }

    /// Makes the pool elastic (piscina's `minThreads`/`maxThreads`/`idleTimeout`): it
    /// starts `n` workers, grows by one worker per call left waiting for room (never past
    /// [`max_workers`](Self::max_workers)), and, with
    /// [`max_idle_time`](Self::max_idle_time), shrinks back to `n` as workers sit idle.
    /// Default: unset, which starts `workers` workers and lets `max_idle_time` stop any of
    /// them (they come back when calls need them). At most `max_workers`; may be 0.
    pub fn min_workers(mut self, n: usize) -> Self {
        self.settings.min_workers = Some(n);
        self
    }

    /// Longest a refused call ([`Refuse`](crate::worker::Refuse)) waits for a slot to take
    /// it, from its first refusal: when every slot that might take it backs off past
    /// that, it fails with [`CallError::Refused`](crate::CallError::Refused) at once rather
    /// than wait. Default: 30 s.
    pub fn max_refusal_wait(mut self, wait: Duration) -> Self {
        self.settings.max_refusal_wait = wait;
        self
    }

    /// Sidelines a slot whose workers crash `crashes` times within `window` (a bad token,
    /// a bad GPU, a poisoned cache): no worker is started in it for a back-off that starts
    /// at 1 s and doubles with each sidelining (to at most 5 minutes), and its calls go to
    /// the other slots. [`Event::Quarantined`](crate::Event::Quarantined) says so, and
    /// [`Event::Released`](crate::Event::Released) when it is tried again. When every slot
    /// is sidelined, calls fail with
    /// [`CallError::Quarantined`](crate::CallError::Quarantined) naming the slots and their
    /// last exits. A crash is a worker that ended without being asked to (killed by a
    /// signal, exited, failed to start); the back-off resets once a worker of the slot has
    /// answered a call. Default: off (a crashed worker is replaced, paced by the start-up
    /// back-off, however often it happens).
    pub fn quarantine(mut self, crashes: u32, window: Duration) -> Self {
        self.settings.quarantine = Some((crashes, window));
        self
    }

    /// Most calls queued plus in flight; beyond it a call fails at once with
    /// [`CallError::QueueFull`](crate::CallError::QueueFull). Default: unbounded.
    pub fn max_concurrent_calls(mut self, n: impl Into<Option<usize>>) -> Self {
        self.settings.max_concurrent_calls = n.into();
        self
    }

    /// Most calls one worker holds at once, running or waiting to run.
    ///
    /// Default: up to 32 sync calls (or the worker's thread count, if larger), of which the
    /// worker runs as many as it has threads (1 for a default worker, `n` with
    /// `Worker::threads(n)`) and the rest wait inside it (at most 4 MiB of them), and up to
    /// 10 async calls. Sending calls ahead saves a round trip per call: many times the
    /// throughput for short calls.
    ///
    /// A waiting call is taken back at once (through a table the farm shares with the
    /// worker) whenever waiting could cost it: from a worker that neither starts nor
    /// finishes a call for a whole 5 ms check period, for a worker that is idle while
    /// nothing waits in the farm's queue, and when its caller has gone. It is never charged
    /// for its worker's death or another call's timeout (it is re-queued free), and its
    /// `timeout` clock starts only when its handler starts. Where there is no shared memory
    /// (not Linux), nothing could be taken back, so by default nothing waits.
    ///
    /// `1` (or `n` for `Worker::threads(n)`) keeps every call in the farm's queue until a
    /// worker can start it; a larger value than the default pipelines deeper.
    pub fn max_concurrent_calls_per_worker(mut self, n: usize) -> Self {
        self.settings.max_concurrent_calls_per_worker = Some(n);
        self
    }

    /// How many times a call is retried after its worker died, timed out or broke the
    /// protocol (and, with [`retry_handler_errors`](Self::retry_handler_errors), after a
    /// handler error). Default: 3.
    pub fn max_retries(mut self, n: u32) -> Self {
        self.settings.max_retries = n;
        self
    }

    /// Whether a handler's own error or panic is retried too. Default: `false`, since
    /// retrying a deterministic error only repeats it.
    pub fn retry_handler_errors(mut self, yes: bool) -> Self {
        self.settings.retry_handler_errors = yes;
        self
    }

    /// Longest a call may run, from when its handler starts (time spent queued, or waiting
    /// inside a worker behind another call, does not count); the worker is then stopped, the
    /// call fails with [`CallError::Timeout`](crate::CallError::Timeout) (or is retried), and
    /// the other calls on that worker are re-queued without being charged. Default: none.
    pub fn timeout(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.settings.timeout = timeout.into();
        self
    }

    /// Calls a worker is handed before it is retired and replaced. Default: none.
    pub fn ttl(mut self, calls: impl Into<Option<u64>>) -> Self {
        self.settings.ttl = calls.into();
        self
    }

    /// How long a worker may have no call in flight before it is stopped; a replacement is
    /// started when calls need it. Default: none.
    pub fn max_idle_time(mut self, idle: impl Into<Option<Duration>>) -> Self {
        self.settings.max_idle_time = idle.into();
        self
    }

    /// Resident memory (RSS, bytes) above which a worker is recycled: it takes no new calls,
    /// finishes the ones it has and is replaced (jest's `idleMemoryLimit`, loky's memory
    /// guard). Checked every 500 ms; Linux only (elsewhere it is never exceeded).
    /// Default: none.
    pub fn max_memory(mut self, bytes: impl Into<Option<u64>>) -> Self {
        self.settings.max_memory = bytes.into();
        self
    }

    /// Grace between a polite stop (stdin closed, `SIGTERM`) and `SIGKILL`. Default: 500 ms.
    pub fn kill_timeout(mut self, grace: Duration) -> Self {
        self.settings.kill_timeout = grace;
        self
    }

    /// Longest a worker may take from spawn to handshake before it is killed as failed to
    /// start. The handshake ends when the worker is ready, so this covers its
    /// [`Worker::setup`](crate::worker::Worker::setup) too (a model to load, a connection
    /// to open): raise it for a slow set-up; [`Farm::ready`](crate::Farm::ready) waits for
    /// it. Default: 10 s.
    pub fn startup_timeout(mut self, timeout: Duration) -> Self {
        self.settings.startup_timeout = timeout;
        self
    }

    /// Largest frame, in bytes, either side may send. A bigger call fails at once with
    /// [`CallError::Serialize`](crate::CallError::Serialize). Workers learn the cap in the
    /// handshake: a `workfarm` worker whose result is bigger answers with an error instead
    /// ([`CallError::Handler`](crate::CallError::Handler), "could not encode the result"),
    /// and a worker that sends a bigger frame anyway is dropped as a protocol violation.
    /// Default: 64 MiB.
    pub fn max_frame(mut self, bytes: usize) -> Self {
        self.settings.max_frame = bytes;
        self
    }

    /// The serializer for arguments and results. Default: [`Json`].
    pub fn serializer<T: Serializer>(self, serializer: T) -> FarmOptions<T> {
        FarmOptions {
            settings: self.settings,
            serializer,
        }
    }

    /// The worker binary.
    pub fn get_program(&self) -> &Path {
        &self.settings.program
    }

    /// The number of workers.
    pub fn get_workers(&self) -> usize {
        self.settings.workers
    }

    /// The serializer.
    pub fn get_serializer(&self) -> &S {
        &self.serializer
    }

    /// Checks every value; `Farm::create` calls this first.
    pub(crate) fn validate(&self) -> Result<(), CreateError> {
        self.settings.validate_durations()?;
        self.settings.validate_limits()?;
        if self.serializer.name().is_empty() || self.serializer.name().len() > 255 {
            return invalid("serializer", "name must be 1 to 255 bytes");
        }
        self.settings.validate_program()
    }
}

fn invalid(name: &'static str, reason: &'static str) -> Result<(), CreateError> {
    Err(CreateError::InvalidOption { name, reason })
}

impl Settings {
    fn validate_durations(&self) -> Result<(), CreateError> {
        for (name, d) in [
            ("timeout", self.timeout),
            ("max_idle_time", self.max_idle_time),
            ("kill_timeout", Some(self.kill_timeout)),
            ("startup_timeout", Some(self.startup_timeout)),
            ("max_refusal_wait", Some(self.max_refusal_wait)),
            ("quarantine", self.quarantine.map(|q| q.1)),
        ] {
            if d.is_some_and(|d| d > MAX_DURATION) {
                return invalid(name, "must be at most 100 years (use None for no limit)");
            }
            if d.is_some_and(|d| d.is_zero()) {
                return invalid(name, "must be longer than zero");
            }
        }
        Ok(())
    }

    fn validate_limits(&self) -> Result<(), CreateError> {
        if self.workers == 0 {
            return invalid("workers", "must be at least 1");
        }
        if self.workers > MAX_WORKERS {
            return invalid("workers", "must be at most 4096");
        }
        if self.min_workers.is_some_and(|min| min > self.workers) {
            return invalid("min_workers", "must be at most max_workers");
        }
        if self.quarantine.is_some_and(|q| q.0 == 0) {
            return invalid("quarantine", "crashes must be at least 1");
        }
        match self.max_concurrent_calls {
            Some(0) => return invalid("max_concurrent_calls", "must be at least 1"),
            Some(n) if n > tokio::sync::Semaphore::MAX_PERMITS => {
                return invalid(
                    "max_concurrent_calls",
                    "is beyond what can be counted (use None for unbounded)",
                )
            }
            _ => {}
        }
        if self.max_concurrent_calls_per_worker == Some(0) {
            return invalid("max_concurrent_calls_per_worker", "must be at least 1");
        }
        if self.ttl == Some(0) {
            return invalid("ttl", "must be at least 1");
        }
        if self.max_memory == Some(0) {
            return invalid("max_memory", "must be at least 1 byte");
        }
        if self.max_frame < 64 || self.max_frame > u32::MAX as usize {
            return invalid("max_frame", "must be between 64 bytes and 4 GiB");
        }
        Ok(())
    }

    fn validate_program(&self) -> Result<(), CreateError> {
        match std::fs::metadata(&self.program) {
            Err(_) => Err(CreateError::WorkerNotFound {
                path: self.program.clone(),
            }),
            Ok(meta) if !is_executable(&meta) => Err(CreateError::NotExecutable {
                path: self.program.clone(),
            }),
            Ok(_) => Ok(()),
        }
    }
}

/// Longest duration an option takes: deadlines must stay representable.
const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
/// Most workers a farm starts.
const MAX_WORKERS: usize = 4096;

#[cfg(unix)]
fn is_executable(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt;
    meta.is_file() && meta.permissions().mode() & 0o111 != 0
}

#[cfg(not(unix))]
fn is_executable(meta: &std::fs::Metadata) -> bool {
    meta.is_file()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> FarmOptions {
        FarmOptions::new(std::env::current_exe().unwrap())
    }

    fn refused(o: FarmOptions) -> &'static str {
        match o.validate() {
            Err(CreateError::InvalidOption { name, .. }) => name,
            other => panic!("expected InvalidOption, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_valid() {
        let o = ok();
        assert!(o.validate().is_ok());
        assert_eq!(o.settings.workers, num_cpus::get());
        assert_eq!(o.settings.max_concurrent_calls_per_worker, None);
        assert_eq!(o.settings.max_retries, 3);
        assert_eq!(o.settings.kill_timeout, Duration::from_millis(500));
        assert_eq!(o.settings.max_concurrent_calls, None);
        assert_eq!(o.settings.timeout, None);
        assert_eq!(o.settings.ttl, None);
        assert_eq!(o.settings.max_idle_time, None);
        assert!(!o.settings.retry_handler_errors);
    }

    #[test]
    fn zero_values_are_refused() {
        assert_eq!(refused(ok().workers(0)), "workers");
        assert_eq!(
            refused(ok().max_concurrent_calls(0)),
            "max_concurrent_calls"
        );
        assert_eq!(
            refused(ok().max_concurrent_calls_per_worker(0)),
            "max_concurrent_calls_per_worker"
        );
        assert_eq!(refused(ok().timeout(Duration::ZERO)), "timeout");
        assert_eq!(refused(ok().ttl(0)), "ttl");
        assert_eq!(
            refused(ok().workers(2).min_workers(3)),
            "min_workers",
            "min above max"
        );
        assert_eq!(
            refused(ok().quarantine(0, Duration::from_secs(1))),
            "quarantine"
        );
        assert_eq!(
            refused(ok().max_refusal_wait(Duration::ZERO)),
            "max_refusal_wait"
        );
        assert_eq!(refused(ok().max_idle_time(Duration::ZERO)), "max_idle_time");
        assert_eq!(refused(ok().kill_timeout(Duration::ZERO)), "kill_timeout");
        assert_eq!(
            refused(ok().startup_timeout(Duration::ZERO)),
            "startup_timeout"
        );
        assert_eq!(refused(ok().max_frame(10)), "max_frame");
    }

    #[test]
    fn values_too_large_to_handle_are_refused() {
        assert_eq!(refused(ok().timeout(Duration::MAX)), "timeout");
        assert_eq!(refused(ok().max_idle_time(Duration::MAX)), "max_idle_time");
        assert_eq!(refused(ok().kill_timeout(Duration::MAX)), "kill_timeout");
        assert_eq!(
            refused(ok().startup_timeout(Duration::MAX)),
            "startup_timeout"
        );
        assert_eq!(
            refused(ok().max_concurrent_calls(usize::MAX)),
            "max_concurrent_calls"
        );
        assert_eq!(refused(ok().workers(usize::MAX)), "workers");
    }

    #[test]
    fn missing_or_unexecutable_program_is_refused() {
        assert!(matches!(
            FarmOptions::new("/no/such/worker").validate(),
            Err(CreateError::WorkerNotFound { .. })
        ));
        assert!(matches!(
            FarmOptions::new("/").validate(),
            Err(CreateError::NotExecutable { .. })
        ));
        assert!(matches!(
            FarmOptions::new("Cargo.toml").validate(),
            Err(CreateError::NotExecutable { .. })
        ));
    }
}
