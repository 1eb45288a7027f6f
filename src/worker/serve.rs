//! The worker's serving loop: the handshake, then read → run → write, on plain blocking
//! descriptors.
//!
//! Sync handlers run on the thread that reads (one at a time, the default) or on a pool of
//! `threads` threads, never inside a tokio runtime, so a handler may build and block on a
//! runtime of its own. Async handlers run on a runtime started only if the worker has any.
//! Every reply is written as soon as its handler returns: before the next handler starts,
//! the replies and `Started` reports gathered so far leave in one `write`.

use super::handler::{error_frame, reply_frame, Failure, Handler, SyncFn};
use super::{serve_error, ServeError, Worker};
use crate::protocol::frame::{self, FrameDecoder, DEFAULT_MAX_FRAME};
use crate::protocol::{self, FailureKind, Ready, ToWorker, PROTOCOL_VERSION};
use crate::serializer::Serializer;
use crate::sys;
use bytes::{Bytes, BytesMut};
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::sync::{mpsc, Arc, Condvar, Mutex};

/// The farm's end of the worker's frames: shared by the reading thread, the pool and the
/// async runtime, each writing whole frames.
struct Output {
    file: Mutex<File>,
}

impl Output {
    fn write(&self, bytes: &[u8]) -> std::io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        file.write_all(bytes)
    }
}

/// Frames from the farm.
struct Input {
    fd: OwnedFd,
    buf: BytesMut,
    decoder: FrameDecoder,
}

impl Input {
    /// The next complete frame already read, if any.
    fn try_next(&mut self) -> Result<Option<Bytes>, ServeError> {
        match self.decoder.decode(&mut self.buf) {
            Ok(frame) => Ok(frame.map(BytesMut::freeze)),
            Err(e) => Err(serve_error(format_args!("bad frame from the farm: {e}"))),
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
    count: Mutex<usize>,
    zero: Condvar,
}

impl Pending {
    fn begin(&self) {
        *self.count.lock().unwrap_or_else(|e| e.into_inner()) += 1;
    }

    fn end(&self) {
        let mut count = self.count.lock().unwrap_or_else(|e| e.into_inner());
        *count = count.saturating_sub(1);
        if *count == 0 {
            self.zero.notify_all();
        }
    }

    fn wait_for_zero(&self) {
        let mut count = self.count.lock().unwrap_or_else(|e| e.into_inner());
        while *count > 0 {
            count = self.zero.wait(count).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// One sync call for the pool.
struct Job<S> {
    id: u64,
    queued: bool,
    args: Bytes,
    f: Arc<SyncFn<S>>,
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
    /// Sync calls go here when the worker has more than one thread.
    pool: Option<mpsc::Sender<Job<S>>>,
    /// For async handlers; started with the first async call.
    runtime: Option<tokio::runtime::Runtime>,
    /// Replies and Started reports not yet written.
    out: Vec<u8>,
}

/// Serves `worker` on the farm's pipes until the farm closes `input`, then returns once every
/// call has been answered.
pub(super) fn serve<S: Serializer>(
    worker: Worker<S>,
    input: OwnedFd,
    output: OwnedFd,
) -> Result<(), ServeError> {
    let not_a_pipe = |e| {
        serve_error(format_args!(
            "stdin/stdout are not a farm's pipes ({e}); start this binary through workfarm::Farm"
        ))
    };
    sys::set_blocking(&input).map_err(not_a_pipe)?;
    sys::set_blocking(&output).map_err(not_a_pipe)?;
    let mut input = Input {
        fd: input,
        buf: BytesMut::with_capacity(64 * 1024),
        decoder: FrameDecoder::new(DEFAULT_MAX_FRAME),
    };
    let output = Arc::new(Output {
        file: Mutex::new(File::from(output)),
    });
    let (serializer, max_frame) = handshake(&worker, &mut input, &output)?;
    input.decoder = FrameDecoder::new(max_frame);
    let mut server = Server::start(worker, serializer, max_frame, output)?;
    let served = server.run(&mut input);
    if matches!(served, Ok(Ending::Abandoned)) {
        // The input ended without Stop: the farm died or dropped us. Nobody is left to
        // answer, and a handler's children must not outlive the farm.
        sys::kill_own_group();
    }
    server.finish();
    served.map(|_| ())
}

/// Reads the farm's Hello and answers Ready, or Fatal if this worker cannot serve it.
fn handshake<S: Serializer>(
    worker: &Worker<S>,
    input: &mut Input,
    output: &Output,
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
    } else if let Some(serializer) = selected {
        let ready = Ready {
            version: PROTOCOL_VERSION,
            pid: std::process::id(),
            threads: u16::try_from(worker.threads).unwrap_or(u16::MAX),
            async_methods: worker.async_methods(),
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
    fn start(
        worker: Worker<S>,
        serializer: S,
        max_frame: usize,
        output: Arc<Output>,
    ) -> Result<Self, ServeError> {
        let pending = Arc::new(Pending::default());
        let pool = (worker.threads > 1).then(|| {
            start_pool(
                worker.threads,
                serializer.clone(),
                max_frame,
                &output,
                &pending,
            )
        });
        Ok(Server {
            serializer,
            handlers: worker.handlers,
            threads: worker.threads,
            max_frame,
            output,
            pending,
            pool,
            runtime: None,
            out: Vec::with_capacity(64 * 1024),
        })
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
                    }) => self.call(id, protocol::method_name(&method), args, queued)?,
                    Ok(ToWorker::Stop) => stopped = true,
                    Ok(ToWorker::Hello(_)) => {
                        return Err(serve_error("second handshake from the farm"))
                    }
                    Err(e) => {
                        return Err(serve_error(format_args!("bad message from the farm: {e}")))
                    }
                }
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

    /// Starts one call (or answers it at once if it cannot start).
    fn call(&mut self, id: u64, method: &str, args: Bytes, queued: bool) -> Result<(), ServeError> {
        let max_frame = self.max_frame;
        match self.handlers.get(method) {
            None => {
                let failure = Failure::new(FailureKind::UnknownMethod, method);
                error_frame(id, &failure, max_frame, &mut self.out);
            }
            Some(Handler::Sync(f)) => match &self.pool {
                Some(pool) => {
                    self.pending.begin();
                    let job = Job {
                        id,
                        queued,
                        args,
                        f: f.clone(),
                    };
                    if pool.send(job).is_err() {
                        self.pending.end();
                        return Err(serve_error("the worker's thread pool is gone"));
                    }
                }
                None => {
                    let f = f.clone();
                    if queued {
                        protocol_started(id, max_frame, &mut self.out);
                    }
                    // What is ready leaves before a handler that may take a while.
                    self.flush()?;
                    let serializer = &self.serializer;
                    reply_frame(id, max_frame, &mut self.out, |out| {
                        f(serializer, &args, out)
                    });
                }
            },
            Some(Handler::Async(f)) => match f(&self.serializer, &args, id, max_frame) {
                Ok(future) => {
                    if queued {
                        // Before the reply can overtake it from the runtime's thread.
                        protocol_started(id, max_frame, &mut self.out);
                        self.flush()?;
                    }
                    self.spawn(future)?;
                }
                Err(failure) => error_frame(id, &failure, max_frame, &mut self.out),
            },
        }
        Ok(())
    }

    fn spawn(&mut self, future: super::handler::BoxFuture) -> Result<(), ServeError> {
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
        let (output, pending) = (self.output.clone(), self.pending.clone());
        pending.begin();
        runtime.spawn(async move {
            let frame = future.await;
            let _ = output.write(&frame);
            pending.end();
        });
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
        self.pool = None;
        self.pending.wait_for_zero();
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
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
) -> mpsc::Sender<Job<S>> {
    let (tx, rx) = mpsc::channel::<Job<S>>();
    let rx = Arc::new(Mutex::new(rx));
    for n in 0..threads {
        let (rx, s, output, pending) = (
            rx.clone(),
            serializer.clone(),
            output.clone(),
            pending.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name(format!("workfarm-sync-{n}"))
            .spawn(move || run_jobs(&rx, &s, max_frame, &output, &pending));
        if spawned.is_err() {
            // The handshake promised `threads` handlers at once: fewer would leave calls
            // the farm counts as running waiting here.
            eprintln!("workfarm worker: could not start handler thread {n} of {threads}");
            std::process::exit(1);
        }
    }
    tx
}

fn run_jobs<S: Serializer>(
    jobs: &Mutex<mpsc::Receiver<Job<S>>>,
    serializer: &S,
    max_frame: usize,
    output: &Output,
    pending: &Pending,
) {
    let mut frame = Vec::new();
    loop {
        let job = jobs.lock().unwrap_or_else(|e| e.into_inner()).recv();
        let Ok(job) = job else {
            return;
        };
        if job.queued {
            protocol_started(job.id, max_frame, &mut frame);
            let _ = output.write(&frame);
            frame.clear();
        }
        reply_frame(job.id, max_frame, &mut frame, |out| {
            (job.f)(serializer, &job.args, out)
        });
        // A failed write means the farm is gone; the reading thread sees the end of input.
        let _ = output.write(&frame);
        frame.clear();
        pending.end();
    }
}
