//! Errors: [`CallError`] for a call, [`CreateError`] for starting a farm.
//!
//! Display strings are short, lowercase and describe this level only; the wording may change,
//! so match on variants, not on text.

use crate::event::WorkerId;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// How a worker process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ExitInfo {
    /// The exit code, if the process exited on its own.
    pub code: Option<i32>,
    /// The signal that ended it, if one did (Unix).
    pub signal: Option<i32>,
}

impl ExitInfo {
    pub(crate) fn from_status(status: std::process::ExitStatus) -> Self {
        #[cfg(unix)]
        let signal = std::os::unix::process::ExitStatusExt::signal(&status);
        #[cfg(not(unix))]
        let signal = None;
        ExitInfo {
            code: status.code(),
            signal,
        }
    }

    /// Whether the process was ended by a signal (a kill, the OOM killer, a crash).
    pub fn is_signal(&self) -> bool {
        self.signal.is_some()
    }
}

impl fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.code, self.signal) {
            (Some(code), _) => write!(f, "exit code {code}"),
            (None, Some(sig)) => write!(f, "signal {sig}{}", signal_name(sig)),
            (None, None) => f.write_str("unknown exit status"),
        }
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        1 => " (SIGHUP)",
        2 => " (SIGINT)",
        3 => " (SIGQUIT)",
        6 => " (SIGABRT)",
        9 => " (SIGKILL)",
        11 => " (SIGSEGV)",
        13 => " (SIGPIPE)",
        15 => " (SIGTERM)",
        _ => "",
    }
}

/// Why a call failed. Every call settles exactly once, with a value or one of these.
///
/// Errors that reach many callers at once (a crash with calls in flight) are cloned.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum CallError {
    /// The handler returned an error; `message` is its `Display`.
    Handler {
        /// The method called (empty for the default method).
        method: String,
        /// The error's message.
        message: String,
    },
    /// The handler panicked; `message` is the panic's payload.
    Panic {
        /// The method called (empty for the default method).
        method: String,
        /// The panic message.
        message: String,
    },
    /// The worker has no handler under that name.
    UnknownMethod {
        /// The method asked for.
        method: String,
    },
    /// The worker could not decode the arguments into the handler's argument type.
    BadArguments {
        /// The method called.
        method: String,
        /// The decoder's message.
        message: String,
    },
    /// The call ran longer than the farm's `timeout`; its worker was stopped.
    Timeout {
        /// The timeout that elapsed.
        after: Duration,
    },
    /// The call's [`deadline`](crate::CallBuilder::deadline) passed. `ran: false`: it
    /// never started (it was not sent, or was taken back before it started); `ran: true`:
    /// it started, ran past the deadline and its worker was stopped. Never retried.
    Deadline {
        /// Whether any attempt of it started.
        ran: bool,
    },
    /// The call was cancelled ([`CallHandle::cancel`](crate::CallHandle::cancel), or its
    /// handle dropped with `cancel_on_drop`). Never retried.
    Cancelled,
    /// Workers refused the call ([`Refuse`](crate::worker::Refuse)) and no slot is left to
    /// take it: every slot refused it "not here", or every slot that might take it backs
    /// off past [`max_refusal_wait`](crate::FarmOptions::max_refusal_wait). Refusals are
    /// never charged as retries.
    Refused {
        /// The refusals, oldest first (at most 32 are kept).
        refusals: Vec<Refusal>,
    },
    /// Every slot of the pool is sidelined for crashing too often
    /// ([`quarantine`](crate::FarmOptions::quarantine)): no worker is left to run the call.
    Quarantined {
        /// Each sidelined slot, with its last worker's exit.
        slots: Vec<Sidelined>,
    },
    /// The worker holding the call died.
    WorkerDied {
        /// The worker.
        worker: WorkerId,
        /// Its process id.
        pid: u32,
        /// How it ended.
        exit: ExitInfo,
        /// Whether the call's handler was running when the worker died. `false`: it only
        /// waited inside the worker behind other calls, so it cannot have caused the death;
        /// such an attempt is not charged against `max_retries` (the call is re-run free).
        running: bool,
    },
    /// The worker broke the protocol (a malformed or oversized frame) and was dropped.
    Protocol {
        /// The worker.
        worker: WorkerId,
        /// What was wrong.
        message: String,
    },
    /// A node of a farm across machines ([`Farm::connect`](crate::Farm::connect)) could not
    /// run the call: its worker died there on the last attempt the budget allowed, or the
    /// node's earlier deliveries of it never completed (the nodes died or lost their lease).
    NodeLost {
        /// The node, as it names itself (`host-pid-n`); empty when no node is known.
        node: String,
        /// What happened there.
        message: String,
    },
    /// The engine between machines (Redis) failed or could not be reached; the call may or
    /// may not have run.
    Engine {
        /// The engine's error.
        message: String,
    },
    /// The call failed on every attempt the retry policy allows.
    RetriesExhausted {
        /// How many times it was tried.
        attempts: u32,
        /// The failure of the last attempt.
        last: Box<CallError>,
        /// The failures of the attempts before the last, oldest first: for a poison pill,
        /// every worker it took down, with its pid and exit status. Workers that died while
        /// the call only waited in them appear too, as `WorkerDied { running: false, .. }`;
        /// those were not charged and do not count in `attempts`.
        earlier: Vec<CallError>,
    },
    /// `max_concurrent_calls` calls are already queued or in flight.
    QueueFull {
        /// The limit.
        limit: usize,
    },
    /// The farm was shut down or killed before the call completed, or the call was made
    /// after that.
    ShutDown,
    /// No worker can start; the message says why (path, exit status, last stderr lines).
    WorkerStart {
        /// What went wrong, with the worker's last stderr lines.
        message: String,
    },
    /// The arguments could not be encoded, or made a frame larger than the cap.
    Serialize {
        /// The argument type.
        type_name: &'static str,
        /// The encoder's message.
        message: String,
    },
    /// The result could not be decoded into the caller's type.
    Deserialize {
        /// The method called (empty for the default method).
        method: String,
        /// The type asked for.
        type_name: &'static str,
        /// The decoder's message.
        message: String,
    },
}

impl CallError {
    /// Whether the call ran out of time (its timeout, or its deadline; directly, or on its
    /// last attempt).
    pub fn is_timeout(&self) -> bool {
        matches!(
            self.root(),
            CallError::Timeout { .. } | CallError::Deadline { .. }
        )
    }

    /// Whether the handler itself failed (returned an error or panicked).
    pub fn is_handler(&self) -> bool {
        matches!(
            self.root(),
            CallError::Handler { .. } | CallError::Panic { .. }
        )
    }

    /// Whether a worker died or was dropped while running the call.
    pub fn is_worker_lost(&self) -> bool {
        matches!(
            self.root(),
            CallError::WorkerDied { .. } | CallError::Protocol { .. }
        )
    }

    /// The error of the last attempt, looking through [`CallError::RetriesExhausted`].
    pub fn root(&self) -> &CallError {
        match self {
            CallError::RetriesExhausted { last, .. } => last.root(),
            other => other,
        }
    }
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallError::Handler { method, message } => {
                write!(f, "{} failed: {message}", MethodName(method))
            }
            CallError::Panic { method, message } => {
                write!(f, "{} panicked: {message}", MethodName(method))
            }
            CallError::UnknownMethod { method } => {
                write!(f, "{} is not defined in the worker", MethodName(method))
            }
            CallError::BadArguments { method, message } => {
                write!(f, "bad arguments for {}: {message}", MethodName(method))
            }
            CallError::Timeout { after } => write!(f, "call timed out after {after:?}"),
            CallError::Deadline { ran: false } => {
                f.write_str("call's deadline passed before it started; it never ran")
            }
            CallError::Deadline { ran: true } => {
                f.write_str("call's deadline passed while it ran; its worker was stopped")
            }
            CallError::Cancelled => f.write_str("call cancelled"),
            CallError::Refused { refusals } => {
                write!(f, "call refused by every worker that could take it")?;
                if let Some(last) = refusals.last() {
                    write!(f, "; last: {last}")?;
                }
                Ok(())
            }
            CallError::Quarantined { slots } => {
                f.write_str("every slot is quarantined for crashing:")?;
                for slot in slots {
                    write!(f, " {slot};")?;
                }
                Ok(())
            }
            CallError::WorkerDied {
                worker,
                pid,
                exit,
                running,
            } => {
                let when = if *running {
                    ""
                } else {
                    " while the call waited"
                };
                write!(f, "{worker} (pid {pid}) died{when}: {exit}")
            }
            CallError::Protocol { worker, message } => {
                write!(f, "{worker} broke the protocol: {message}")
            }
            CallError::NodeLost { node, message } if node.is_empty() => {
                write!(f, "no node completed the call: {message}")
            }
            CallError::NodeLost { node, message } => write!(f, "node {node}: {message}"),
            CallError::Engine { message } => write!(f, "engine error: {message}"),
            CallError::RetriesExhausted { attempts, last, .. } => {
                write!(f, "call failed after {attempts} attempts; last: {last}")
            }
            CallError::QueueFull { limit } => {
                write!(f, "farm is full ({limit} calls queued or in flight)")
            }
            CallError::ShutDown => f.write_str("farm shut down"),
            CallError::WorkerStart { message } => write!(f, "no worker could start: {message}"),
            CallError::Serialize { type_name, message } => {
                write!(f, "could not encode {type_name}: {message}")
            }
            CallError::Deserialize {
                method,
                type_name,
                message,
            } => write!(
                f,
                "result of {} does not decode as {type_name}: {message}",
                MethodName(method)
            ),
        }
    }
}

impl std::error::Error for CallError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CallError::RetriesExhausted { last, .. } => Some(&**last),
            CallError::Handler { .. }
            | CallError::Panic { .. }
            | CallError::UnknownMethod { .. }
            | CallError::BadArguments { .. }
            | CallError::Timeout { .. }
            | CallError::Deadline { .. }
            | CallError::Cancelled
            | CallError::Refused { .. }
            | CallError::Quarantined { .. }
            | CallError::WorkerDied { .. }
            | CallError::Protocol { .. }
            | CallError::NodeLost { .. }
            | CallError::Engine { .. }
            | CallError::QueueFull { .. }
            | CallError::ShutDown
            | CallError::WorkerStart { .. }
            | CallError::Serialize { .. }
            | CallError::Deserialize { .. } => None,
        }
    }
}

/// One worker's refusal of a call (see [`CallError::Refused`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Refusal {
    /// The worker that refused (with its slot); `None` for an item of a
    /// [`chunk_size`](crate::Map::chunk_size) batch.
    pub worker: Option<WorkerId>,
    /// The back-off it asked for; `None` for "not here" ([`Refuse::elsewhere`]).
    ///
    /// [`Refuse::elsewhere`]: crate::worker::Refuse::elsewhere
    pub backoff: Option<Duration>,
    /// Why, as the handler said.
    pub reason: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.worker {
            Some(worker) => write!(f, "{worker}")?,
            None => f.write_str("a worker")?,
        }
        match self.backoff {
            Some(d) => write!(f, " backs off for {d:?}")?,
            None => f.write_str(" does not serve it")?,
        }
        if !self.reason.is_empty() {
            write!(f, " ({})", self.reason)?;
        }
        Ok(())
    }
}

/// A slot sidelined by [`quarantine`](crate::FarmOptions::quarantine).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Sidelined {
    /// The pool slot.
    pub slot: usize,
    /// Crashes counted in the window.
    pub crashes: u32,
    /// How its last worker ended.
    pub last_exit: Option<ExitInfo>,
    /// How long until it is tried again.
    pub retry_in: Duration,
}

impl fmt::Display for Sidelined {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "slot {} ({} crashes", self.slot, self.crashes)?;
        if let Some(exit) = self.last_exit {
            write!(f, ", last {exit}")?;
        }
        write!(f, "; retried in {:?})", self.retry_in)
    }
}

struct MethodName<'a>(&'a str);

impl fmt::Display for MethodName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("default method")
        } else {
            write!(f, "method \"{}\"", self.0)
        }
    }
}

/// Why [`Farm::create`](crate::Farm::create) refused to start a farm.
#[derive(Debug)]
#[non_exhaustive]
pub enum CreateError {
    /// An option is out of range.
    InvalidOption {
        /// The option's name, as its setter is named.
        name: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The worker binary does not exist.
    WorkerNotFound {
        /// The path given.
        path: PathBuf,
    },
    /// The worker binary exists but cannot be executed.
    NotExecutable {
        /// The path given.
        path: PathBuf,
    },
    /// The operating system refused to start the worker.
    Spawn {
        /// The path given.
        path: PathBuf,
        /// The error from the operating system.
        source: std::io::Error,
    },
    /// The working directory given with
    /// [`FarmOptions::current_dir`](crate::FarmOptions::current_dir) does not exist.
    CurrentDirNotFound {
        /// The directory given.
        path: PathBuf,
    },
    /// The set-up arguments ([`FarmOptions::setup_args`](crate::FarmOptions::setup_args),
    /// or a slot's [`PerWorker::setup_args`](crate::PerWorker::setup_args)) could not be
    /// encoded, or do not fit in a frame.
    SetupArgs {
        /// The slot whose arguments failed.
        slot: usize,
        /// The encoder's message.
        message: String,
    },
    /// The engine between machines (Redis) could not be reached, or refused the farm's set-up
    /// ([`Farm::connect`](crate::Farm::connect), [`Node::start`](crate::remote::Node::start)).
    Engine {
        /// The engine's error.
        message: String,
    },
    /// A node's workers could not start ([`Node::start`](crate::remote::Node::start)); the
    /// message says why.
    WorkerStart {
        /// What went wrong.
        message: String,
    },
    /// `create` was called outside a tokio runtime.
    NoRuntime,
    /// [`blocking::Farm`](crate::blocking::Farm) could not start its runtime thread.
    Runtime {
        /// Why.
        source: std::io::Error,
    },
    /// The tokio runtime lacks a driver the farm needs (`"time"` or `"io"`): build it with
    /// `enable_all()` (as `#[tokio::main]` does).
    RuntimeDriverMissing {
        /// The driver: `"time"` or `"io"`.
        driver: &'static str,
    },
}

impl fmt::Display for CreateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CreateError::InvalidOption { name, reason } => {
                write!(f, "invalid option `{name}`: {reason}")
            }
            CreateError::WorkerNotFound { path } => {
                write!(f, "worker binary {} not found", path.display())
            }
            CreateError::NotExecutable { path } => {
                write!(f, "worker binary {} is not executable", path.display())
            }
            CreateError::Spawn { path, .. } => {
                write!(f, "could not start worker {}", path.display())
            }
            CreateError::CurrentDirNotFound { path } => {
                write!(
                    f,
                    "the workers' current_dir {} does not exist",
                    path.display()
                )
            }
            CreateError::SetupArgs { slot, message } => {
                write!(f, "could not encode the set-up arguments of slot {slot}: {message}")
            }
            CreateError::Engine { message } => write!(f, "engine error: {message}"),
            CreateError::WorkerStart { message } => write!(f, "workers cannot start: {message}"),
            CreateError::NoRuntime => f.write_str(
                "Farm::create must be called within a tokio runtime (or use workfarm::blocking::Farm)",
            ),
            CreateError::Runtime { .. } => f.write_str("could not start the farm's runtime"),
            CreateError::RuntimeDriverMissing { driver } => write!(
                f,
                "the tokio runtime has no {driver} driver: build it with enable_all() \
                 (or enable_{driver}())"
            ),
        }
    }
}

impl std::error::Error for CreateError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CreateError::Spawn { source, .. } | CreateError::Runtime { source } => Some(source),
            CreateError::InvalidOption { .. }
            | CreateError::WorkerNotFound { .. }
            | CreateError::NotExecutable { .. }
            | CreateError::CurrentDirNotFound { .. }
            | CreateError::SetupArgs { .. }
            | CreateError::Engine { .. }
            | CreateError::WorkerStart { .. }
            | CreateError::NoRuntime
            | CreateError::RuntimeDriverMissing { .. } => None,
        }
    }
}
