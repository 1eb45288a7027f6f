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
//! Like a Node worker, a worker runs on **one thread** by default: async handlers interleave
//! while they await, and sync (CPU-bound) handlers run one at a time, right in the read
//! loop. So `N` workers × 10 concurrent calls keep `N` cores busy, not `10·N` threads.
//! [`threads`](Worker::threads) opts out: with `threads(n)` up to `n` handlers run in
//! parallel on a multi-threaded runtime.
//!
//! # Standard streams
//!
//! Frames travel on a private duplicate of the original stdout; fd 1 is pointed at stderr
//! before any handler runs, so `println!` in a handler (or a child process it starts)
//! cannot corrupt the stream. The farm forwards the worker's stderr to its own.
//!
//! The worker exits when the farm closes its stdin, after finishing the calls it has.

mod handler;

use crate::farm::process::{PARENT_PID_ENV, WORKER_ENV};
use crate::protocol::frame::{self, FrameDecoder, DEFAULT_MAX_FRAME};
use crate::protocol::{self, FailureKind, ToWorker, PROTOCOL_VERSION};
use crate::serializer::{Builtin, Serializer};
use crate::sys;
use bytes::BytesMut;
use handler::{async_handler, error_frame, reply_frame, sync_handler, Failure, Handler};
use serde::{de::DeserializeOwned, Serialize};
use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt::{self, Display};
use std::future::Future;
use std::os::fd::OwnedFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::mpsc;

/// The name of the default method on the wire.
pub const DEFAULT_METHOD: &str = "";

/// A worker: a table of handlers, served over stdin/stdout to the farm that started it.
pub struct Worker<S: Serializer = Builtin> {
    serializer: S,
    handlers: HashMap<String, Handler<S>>,
    threads: usize,
}

impl fmt::Debug for Worker<Builtin> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("methods", &self.handlers.keys().collect::<Vec<_>>())
            .field("threads", &self.threads)
            .finish()
    }
}

impl Default for Worker<Builtin> {
    fn default() -> Self {
        Self::new()
    }
}

impl Worker<Builtin> {
    /// A worker with no methods that speaks both built-in serializers (JSON and CBOR).
    pub fn new() -> Self {
        Worker::with_serializer(Builtin::Json)
    }
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
        }
    }

    /// Runs up to `n` handlers in parallel on a multi-threaded runtime. Default: 1 (one
    /// thread, like a Node worker).
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

    /// Registers a sync method that returns a `Result`; the error's `Display` reaches the
    /// caller as [`CallError::Handler`](crate::CallError::Handler).
    #[must_use]
    pub fn try_method<A, T, E, F>(mut self, name: &str, f: F) -> Self
    where
        A: DeserializeOwned,
        T: Serialize,
        E: Display,
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
        E: Display,
        F: Fn(A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        self.handlers.insert(name.to_owned(), async_handler(f));
        self
    }

    /// Whether this process was started by a farm.
    pub fn is_worker() -> bool {
        std::env::var_os(WORKER_ENV).is_some_and(|v| v == "1")
    }

    /// If this process was started by a farm, serves it and then exits the process;
    /// otherwise returns at once. Call it first thing in `main` of a program that is its
    /// own worker ([`FarmOptions::current_exe`](crate::FarmOptions::current_exe)), as
    /// procspawn's `init()`.
    pub fn serve_if_worker(self) {
        if !Self::is_worker() {
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
        let parent = std::env::var(PARENT_PID_ENV)
            .ok()
            .and_then(|p| p.parse().ok());
        // Children a handler starts must not think a farm started them. (Still
        // single-threaded here, unless called from inside a runtime.)
        std::env::remove_var(WORKER_ENV);
        std::env::remove_var(PARENT_PID_ENV);
        sys::die_with_parent(parent);
        let output = sys::take_stdout_for_frames().map_err(serve_error)?;
        let input = sys::take_stdin().map_err(serve_error)?;
        let threads = self.threads;
        let run = move || {
            let mut builder = if threads <= 1 {
                tokio::runtime::Builder::new_current_thread()
            } else {
                let mut b = tokio::runtime::Builder::new_multi_thread();
                b.worker_threads(threads);
                b
            };
            let runtime = builder.enable_all().build().map_err(serve_error)?;
            runtime.block_on(self.serve_on(input, output))
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            // Called from inside a runtime (say `#[tokio::main]`): serve on a thread of our own.
            std::thread::spawn(run)
                .join()
                .unwrap_or_else(|_| Err(serve_error("worker thread panicked")))
        } else {
            run()
        }
    }

    async fn serve_on(self, input: OwnedFd, output: OwnedFd) -> Result<(), ServeError> {
        let not_a_pipe = |e| {
            serve_error(format_args!("stdin/stdout are not a farm's pipes ({e}); start this binary through workfarm::Farm"))
        };
        let mut reader = pipe::Receiver::from_owned_fd(input).map_err(not_a_pipe)?;
        let mut writer = pipe::Sender::from_owned_fd(output).map_err(not_a_pipe)?;
        let mut buf = BytesMut::with_capacity(64 * 1024);
        let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME);

        // Handshake: the farm's Hello first, then our Ready (or Fatal).
        let hello = loop {
            match decoder.decode(&mut buf).map_err(serve_error)? {
                Some(payload) => {
                    break protocol::decode_to_worker(payload.freeze()).map_err(serve_error)?
                }
                None => {
                    if reader.read_buf(&mut buf).await.map_err(serve_error)? == 0 {
                        return Err(serve_error("the farm closed stdin before the handshake"));
                    }
                }
            }
        };
        let ToWorker::Hello(hello) = hello else {
            return Err(serve_error("the farm did not start with a handshake"));
        };
        let max_frame = hello.max_frame as usize;
        let mut out = Vec::with_capacity(64 * 1024);
        let refusal = if hello.version != PROTOCOL_VERSION {
            Some(format!(
                "farm speaks protocol version {}, worker speaks {PROTOCOL_VERSION}",
                hello.version
            ))
        } else if self.serializer.select(&hello.serializer).is_none() {
            Some(format!(
                "worker does not speak serializer {:?}",
                hello.serializer
            ))
        } else {
            None
        };
        if let Some(why) = refusal {
            let start = frame::begin(&mut out);
            protocol::encode_fatal(&why, &mut out);
            let _ = frame::finish(&mut out, start, max_frame);
            let _ = writer.write_all(&out).await;
            return Err(serve_error(why));
        }
        let Some(serializer) = self.serializer.select(&hello.serializer) else {
            return Err(serve_error("serializer vanished"));
        };
        decoder = FrameDecoder::new(max_frame);
        let start = frame::begin(&mut out);
        protocol::encode_ready(std::process::id(), &mut out);
        let _ = frame::finish(&mut out, start, max_frame);
        writer.write_all(&out).await.map_err(serve_error)?;
        out.clear();

        let parallel = self.threads > 1;
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let mut pending = 0usize;
        let mut eof = false;
        while !eof || pending > 0 {
            tokio::select! {
                read = reader.read_buf(&mut buf), if !eof => {
                    if read.map_err(serve_error)? == 0 {
                        eof = true;
                    }
                    loop {
                        let payload = match decoder.decode(&mut buf) {
                            Ok(Some(payload)) => payload,
                            Ok(None) => break,
                            Err(e) => return Err(serve_error(format_args!("bad frame from the farm: {e}"))),
                        };
                        let (id, method, args) = match protocol::decode_to_worker(payload.freeze()) {
                            Ok(ToWorker::Call { id, method, args }) => (id, method, args),
                            Ok(ToWorker::Hello(_)) => return Err(serve_error("second handshake from the farm")),
                            Err(e) => return Err(serve_error(format_args!("bad message from the farm: {e}"))),
                        };
                        let method = protocol::method_name(&method);
                        match self.handlers.get(method) {
                            None => error_frame(id, &Failure::new(FailureKind::UnknownMethod, method), max_frame, &mut out),
                            Some(Handler::Sync(f)) if !parallel => {
                                reply_frame(id, max_frame, &mut out, |out| f(&serializer, &args, out));
                            }
                            Some(Handler::Sync(f)) => {
                                let (f, s, done) = (f.clone(), serializer.clone(), done_tx.clone());
                                pending += 1;
                                tokio::spawn(async move {
                                    let mut frame = Vec::new();
                                    reply_frame(id, max_frame, &mut frame, |out| f(&s, &args, out));
                                    let _ = done.send(frame);
                                });
                            }
                            Some(Handler::Async(f)) => match f(&serializer, &args, id, max_frame) {
                                Ok(future) => {
                                    pending += 1;
                                    let done = done_tx.clone();
                                    tokio::spawn(async move {
                                        let _ = done.send(future.await);
                                    });
                                }
                                Err(failure) => error_frame(id, &failure, max_frame, &mut out),
                            },
                        }
                    }
                }
                Some(frame) = done_rx.recv(), if pending > 0 => {
                    pending -= 1;
                    out.extend_from_slice(&frame);
                }
            }
            while let Ok(frame) = done_rx.try_recv() {
                pending -= 1;
                out.extend_from_slice(&frame);
            }
            if !out.is_empty() {
                writer.write_all(&out).await.map_err(serve_error)?;
                out.clear();
                if out.capacity() > 1024 * 1024 {
                    out.shrink_to(64 * 1024);
                }
            }
            if buf.capacity() - buf.len() < 16 * 1024 {
                buf.reserve(64 * 1024);
            }
        }
        Ok(())
    }
}
