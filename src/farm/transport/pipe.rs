//! The pipe transport: one child process per worker, frames over its stdin and stdout.
//!
//! Nothing here knows about queues, retries or timeouts: the dispatcher sees a worker only
//! through its [`Link`] and the [`Inbound`] messages its tasks send.
//!
//! Each worker gets three tasks: a writer that drains what the pipe could not take at once
//! (see [`Outbox`]), a supervisor that reads and decodes frames and reaps the process, and
//! an stderr forwarder that passes the worker's stderr on and remembers the last lines for
//! error reports (so the pipe never fills).

use super::pipe_buffer::{PipeBuffer, MAX_PIPE};
use super::spawner::{reap_killed, spawn_from_long_lived_thread};
use super::stderr::forward_stderr;
use super::{Inbound, Link, Transport};
use crate::error::ExitInfo;
use crate::event::WorkerId;
use crate::farm::capture::StderrCapture;
use crate::options::Settings;
use crate::protocol::frame::{self, FrameDecoder};
use crate::protocol::{decode_from_worker, launch, Direction, FromWorker};
use crate::shm::{self, Producer, Ring, Slots};
use crate::sys::{kill_group_remnants, signal_group, Signal};
use bytes::{Bytes, BytesMut};
use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::process::{Child, ChildStdout, Command};
use tokio::sync::{mpsc, Notify};
/// Frames at least this big are written on their own instead of being copied into a batch.
const DIRECT_WRITE: usize = 32 * 1024;
/// Read buffer size for a worker's stdout.
const READ_CHUNK: usize = 64 * 1024;
/// How long a worker whose stdin broke may take to exit before it is reported as having
/// closed its input while alive.
const BROKEN_INPUT_GRACE: Duration = Duration::from_millis(500);
/// How long a worker's output may keep draining after it exited (a grandchild may hold the
/// pipe open).
const DRAIN_GRACE: Duration = Duration::from_millis(500);

/// Starts workers as child processes of this one.
#[derive(Debug)]
pub(crate) struct Pipes {
    settings: Arc<Settings>,
    capture: Arc<StderrCapture>,
}

impl Pipes {
    pub(crate) fn new(settings: Arc<Settings>, capture: Arc<StderrCapture>) -> Self {
        Pipes { settings, capture }
    }
}

impl Transport for Pipes {
    type Link = WorkerLink;

    fn spawn(
        &mut self,
        worker: WorkerId,
        slot: usize,
        hello: &[u8],
        inbound: &mpsc::UnboundedSender<Inbound>,
    ) -> std::io::Result<WorkerLink> {
        spawn(
            &self.settings,
            &self.capture,
            worker,
            slot,
            hello,
            inbound.clone(),
        )
    }

    fn describe(&self) -> String {
        self.settings.program.display().to_string()
    }
}

/// The dispatcher's handle on one worker.
#[derive(Debug)]
pub(crate) struct WorkerLink {
    outbox: Option<Arc<Outbox>>,
    /// The writer task, stopped when the link is dropped (its worker has exited by then).
    writer: tokio::task::AbortHandle,
    /// Small frames handed out this turn of the dispatcher, written together by `flush`.
    pending: Vec<u8>,
    /// The worker's stdin, grown when a large frame is sent.
    stdin_buffer: PipeBuffer,
    /// The ring large frames go through, once the worker said it mapped it.
    ring: Option<Producer>,
    /// That ring and the slot table, until then.
    offered: Option<(Ring, Slots)>,
    control: mpsc::UnboundedSender<Signal>,
    pid: u32,
}

impl Link for WorkerLink {
    fn pid(&self) -> u32 {
        self.pid
    }

    /// Queues a frame for the worker; it is written by the next [`flush`](Self::flush) at the
    /// latest. Dropped if the worker's input is already closed.
    fn send(&mut self, frame: &[u8]) {
        let Some(outbox) = &self.outbox else {
            return;
        };
        if frame.len() >= shm::MIN_FRAME {
            if let Some((offset, len)) = self
                .ring
                .as_mut()
                .and_then(|ring| ring.put(&frame[frame::HEAD_LEN..]))
            {
                let at = frame::begin(&mut self.pending);
                crate::protocol::encode_shared(Direction::ToWorker, offset, len, &mut self.pending);
                // Cannot fail: 17 bytes fit any cap.
                let _ = frame::finish(&mut self.pending, at, usize::MAX);
                return;
            }
        }
        if frame.len() >= DIRECT_WRITE {
            self.stdin_buffer.fit(frame.len());
            if !self.pending.is_empty() {
                outbox.submit(&self.pending);
                self.pending.clear();
            }
            outbox.submit(frame);
        } else {
            self.pending.extend_from_slice(frame);
        }
    }

    /// Writes the frames queued since the last flush, in one system call when the pipe has
    /// room (the dispatcher flushes once per turn, so many calls share a `write`).
    fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        if let Some(outbox) = &self.outbox {
            outbox.submit(&self.pending);
        }
        self.pending.clear();
        if self.pending.capacity() > 4 * DIRECT_WRITE {
            self.pending.shrink_to(DIRECT_WRITE);
        }
    }

    /// Says Stop, then closes the worker's stdin once queued frames are written: the polite
    /// stop. (Input that ends without Stop tells the worker its farm is gone.)
    fn close_input(&mut self) {
        if self.outbox.is_some() {
            self.send(&stop_frame());
        }
        self.flush();
        if let Some(outbox) = self.outbox.take() {
            outbox.close();
        }
    }

    fn terminate(&mut self) {
        let _ = self.control.send(Signal::Terminate);
    }

    fn use_shared_memory(&mut self) -> Option<Slots> {
        let (ring, slots) = self.offered.take()?;
        self.ring = Some(Producer::new(ring));
        Some(slots)
    }

    fn kill(&mut self) {
        let _ = self.control.send(Signal::Kill);
    }

    fn memory(&self) -> Option<u64> {
        crate::sys::rss_bytes(self.pid)
    }
}

impl Drop for WorkerLink {
    /// A link is dropped once its worker has exited (or the farm is gone): the writer task and
    /// the pipe must not outlive it.
    fn drop(&mut self) {
        if let Some(outbox) = self.outbox.take() {
            outbox.close();
        }
        // It may wait for a pipe that a runaway grandchild keeps open but never reads.
        self.writer.abort();
    }
}

/// Bytes on their way to one worker's stdin.
///
/// The dispatcher writes straight into the pipe with a non-blocking `write` while nothing is
/// waiting (the common case: no task hop, one system call per worker per dispatcher turn).
/// Whatever the pipe does not take goes to a backlog that the writer task drains as the pipe
/// empties; while it has work, new bytes queue behind it, so they never overtake each other.
#[derive(Debug)]
struct Outbox {
    pipe: pipe::Sender,
    backlog: Mutex<Backlog>,
    wake: Notify,
    /// Told when a write fails: the worker exited, or it closed its stdin and lives on.
    /// Shared with the supervisor, which must not hold the pipe open.
    broke: Arc<Notify>,
}

#[derive(Debug, Default)]
struct Backlog {
    frames: VecDeque<Bytes>,
    writer_busy: bool,
    closed: bool,
    broken: bool,
}

impl Outbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, Backlog> {
        self.backlog.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes `bytes` now if the pipe takes them, or queues a copy of the rest for the writer
    /// task.
    fn submit(&self, bytes: &[u8]) {
        let mut backlog = self.lock();
        if backlog.broken || backlog.closed {
            return;
        }
        let mut written = 0;
        if !backlog.writer_busy {
            while written < bytes.len() {
                match self.pipe.try_write(&bytes[written..]) {
                    Ok(n) => written += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        // The worker exited or closed its stdin; its supervisor tells which.
                        backlog.broken = true;
                        self.broke.notify_one();
                        return;
                    }
                }
            }
            if written == bytes.len() {
                return;
            }
        }
        backlog
            .frames
            .push_back(Bytes::copy_from_slice(&bytes[written..]));
        if !backlog.writer_busy {
            backlog.writer_busy = true;
            self.wake.notify_one();
        }
    }

    /// No more frames: the writer task drains the backlog and drops the pipe (EOF).
    fn close(&self) {
        let mut backlog = self.lock();
        backlog.closed = true;
        if !backlog.writer_busy {
            backlog.writer_busy = true;
            self.wake.notify_one();
        }
    }
}

/// The framed Stop message.
fn stop_frame() -> Vec<u8> {
    let mut frame = Vec::new();
    let start = crate::protocol::frame::begin(&mut frame);
    crate::protocol::encode_stop(&mut frame);
    // One byte fits any frame cap.
    let _ = crate::protocol::frame::finish(&mut frame, start, usize::MAX);
    frame
}

/// Starts a worker process and its tasks; `hello` is the first frame it is sent.
fn spawn(
    spec: &Settings,
    capture: &Arc<StderrCapture>,
    worker: WorkerId,
    slot: usize,
    hello: &[u8],
    inbound: mpsc::UnboundedSender<Inbound>,
) -> std::io::Result<WorkerLink> {
    let (stdin_read, stdin_write) = crate::sys::pipe()?;
    let identity = crate::sys::file_identity(stdin_read.as_raw_fd()).unwrap_or_default();
    let shared = shared_memory();
    let mut cmd = command(spec, slot, stdin_read, &identity);
    cmd.env(launch::SLOT_ENV, slot.to_string());
    if let Some((to_worker, to_farm, slots)) = &shared {
        let fds = vec![to_worker.raw_fd(), to_farm.raw_fd(), slots.raw_fd()];
        cmd.env(
            launch::RINGS_ENV,
            format!("{},{},{}", fds[0], fds[1], fds[2]),
        );
        crate::sys::inherit_in_child(&mut cmd, fds);
    } else {
        // Not a stale value from an enclosing farm: those descriptors are not ours to give.
        cmd.env_remove(launch::RINGS_ENV);
    }
    let mut child = spawn_from_long_lived_thread(cmd)?;
    let (offered, from_worker_ring) = match shared {
        Some((to_worker, to_farm, slots)) => (Some((to_worker, slots)), Some(to_farm)),
        None => (None, None),
    };
    let pid = child.id().unwrap_or(0);
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(std::io::Error::other("child stdio was not piped"));
    };
    let outbox = Arc::new(Outbox {
        pipe: pipe::Sender::from_owned_fd(stdin_write)?,
        backlog: Mutex::new(Backlog::default()),
        wake: Notify::new(),
        broke: Arc::new(Notify::new()),
    });
    let stdin_buffer = PipeBuffer::new(outbox.pipe.as_raw_fd());
    outbox.submit(hello);
    let (control_tx, control_rx) = mpsc::unbounded_channel();
    let writer = tokio::spawn(write_frames(outbox.clone())).abort_handle();
    let stderr_task = tokio::spawn(forward_stderr(
        stderr,
        worker,
        pid,
        spec.stderr,
        capture.clone(),
        inbound.clone(),
    ));
    tokio::spawn(supervise(Supervised {
        worker,
        child,
        pid,
        stdout,
        stderr_task,
        control: control_rx,
        input_broke: outbox.broke.clone(),
        inbound,
        max_frame: spec.max_frame,
        ring: from_worker_ring,
    }));
    Ok(WorkerLink {
        outbox: Some(outbox),
        writer,
        pending: Vec::new(),
        stdin_buffer,
        ring: None,
        offered,
        control: control_tx,
        pid,
    })
}

/// A worker's shared memory: its two rings (to it, from it) and its slot table; none where
/// shared memory is not to be had (every frame then takes the pipe, and calls do not wait
/// inside workers by default).
fn shared_memory() -> Option<(Ring, Ring, Slots)> {
    let made = (|| {
        Ok::<_, std::io::Error>((
            Ring::create(c"workfarm-to-worker")?,
            Ring::create(c"workfarm-to-farm")?,
            Slots::create(c"workfarm-slots")?,
        ))
    })();
    match made {
        Ok(shared) => Some(shared),
        Err(e) => {
            tracing::debug!(error = %e, "no shared memory: large frames take the pipe");
            None
        }
    }
}

/// The worker's command line: its stdin the pipe made for it, named by `identity` in its
/// environment (how it knows a farm started it); its own process group; the farm's pid.
fn command(spec: &Settings, slot: usize, stdin: std::os::fd::OwnedFd, identity: &str) -> Command {
    let mut cmd = Command::new(&spec.program);
    let own = spec.slots.get(slot);
    cmd.args(&spec.args)
        .args(own.into_iter().flat_map(|o| &o.args))
        .envs(spec.envs.iter().map(|(k, v)| (k, v)))
        .envs(
            own.into_iter()
                .flat_map(|o| o.envs.iter().map(|(k, v)| (k, v))),
        )
        .env(launch::WORKER_ENV, identity)
        .env(launch::PARENT_PID_ENV, std::process::id().to_string())
        .stdin(Stdio::from(stdin))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    #[cfg(unix)]
    cmd.process_group(0);
    if let Some(dir) = &spec.cwd {
        cmd.current_dir(dir);
    }
    cmd
}

/// Drains an outbox's backlog into the pipe as the worker reads. Ends (dropping its share of
/// the pipe, so the worker sees EOF once the link has let go too) when the link closes the
/// outbox, or when the worker stops reading.
async fn write_frames(outbox: Arc<Outbox>) {
    loop {
        outbox.wake.notified().await;
        loop {
            let batch: Vec<Bytes> = {
                let mut backlog = outbox.lock();
                if backlog.frames.is_empty() {
                    backlog.writer_busy = false;
                    if backlog.closed {
                        return;
                    }
                    break;
                }
                backlog.frames.drain(..).collect()
            };
            for frame in batch {
                if write_all(&outbox.pipe, &frame).await.is_err() {
                    let mut backlog = outbox.lock();
                    backlog.broken = true;
                    backlog.frames.clear();
                    outbox.broke.notify_one();
                    return;
                }
            }
        }
    }
}

async fn write_all(pipe: &pipe::Sender, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        pipe.writable().await?;
        match pipe.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

struct Supervised {
    worker: WorkerId,
    child: Child,
    pid: u32,
    stdout: ChildStdout,
    stderr_task: tokio::task::JoinHandle<Vec<String>>,
    control: mpsc::UnboundedReceiver<Signal>,
    /// Told when writing to the worker's stdin fails.
    input_broke: Arc<Notify>,
    inbound: mpsc::UnboundedSender<Inbound>,
    max_frame: usize,
    /// The ring the worker's large frames come through.
    ring: Option<Ring>,
}

/// Reads and decodes the worker's frames, delivers signals, and reaps the process. Reports
/// `Exited` last, after everything the worker wrote before dying.
async fn supervise(s: Supervised) {
    let Supervised {
        worker,
        child,
        pid,
        mut stdout,
        stderr_task,
        mut control,
        input_broke: broke,
        inbound,
        max_frame,
        ring,
    } = s;
    let mut guard = GroupGuard {
        pid,
        child: Some(child),
    };
    let mut stdout_buffer = PipeBuffer::new(stdout.as_raw_fd());
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut decoder = FrameDecoder::new(max_frame);
    let mut reading = true;
    let mut control_open = true;
    let mut input_broke = false;
    let mut status = None;
    // Once the process is gone, give its output this long to drain (a grandchild may hold
    // the pipe open); once its stdin broke, give it this long to exit.
    let grace = tokio::time::sleep(Duration::from_secs(3600));
    tokio::pin!(grace);

    while reading || status.is_none() {
        tokio::select! {
            // In this order: an exit that is ready wins over the grace timer (so a crash is
            // never taken for a worker that closed its stdin), and a worker flooding its
            // output cannot starve its own kill. Replies still all come before `Exited`.
            biased;
            exit = wait(&mut guard.child), if status.is_none() => {
                status = Some(guard.reaped(exit.ok()));
                grace.as_mut().reset(tokio::time::Instant::now() + DRAIN_GRACE);
            }
            () = broke.notified(), if !input_broke && status.is_none() => {
                input_broke = true;
                grace.as_mut().reset(tokio::time::Instant::now() + BROKEN_INPUT_GRACE);
            }
            signal = control.recv(), if control_open => match signal {
                // Not yet reaped, so the pid (and the group it leads) is still this worker's.
                Some(signal) if status.is_none() => signal_group(pid, signal),
                Some(_) => {}
                None => control_open = false,
            },
            () = &mut grace, if status.is_some() || input_broke => {
                if status.is_some() {
                    reading = false;
                } else if let Some(exit) = guard.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                    status = Some(guard.reaped(Some(exit)));
                    grace.as_mut().reset(tokio::time::Instant::now() + DRAIN_GRACE);
                } else {
                    // Alive but deaf: calls sent to it would never arrive.
                    input_broke = false;
                    grace.as_mut().reset(tokio::time::Instant::now() + Duration::from_secs(3600));
                    let message = "the worker closed its stdin while alive".to_owned();
                    let _ = inbound.send(Inbound::Fault { worker, message });
                }
            }
            read = read_some(&mut stdout, &mut buf), if reading => {
                if matches!(read, Ok(n) if n >= stdout_buffer.size()) {
                    // The read emptied a full pipe: the worker may have been waiting on it.
                    stdout_buffer.fit(MAX_PIPE);
                }
                reading = deliver(read, worker, &mut decoder, &mut buf, ring.as_ref(), &inbound);
                if !reading && status.is_none() {
                    // The frame stream ended but the process lives on: it can answer
                    // nothing more.
                    let _ = inbound.send(Inbound::Closed { worker });
                }
            }
        }
    }
    let stderr_tail = stderr_tail(stderr_task).await;
    let exit = status.unwrap_or(UNKNOWN_EXIT);
    let _ = inbound.send(Inbound::Exited {
        worker,
        exit,
        stderr_tail,
    });
}

/// A frame's real payload: read from the worker's ring if the frame is a Shared one.
fn from_ring(payload: Bytes, ring: Option<&Ring>, max_frame: usize) -> Result<Bytes, String> {
    match crate::protocol::shared_place(Direction::ToFarm, &payload) {
        None => Ok(payload),
        Some(place) => {
            let (offset, len) = place.map_err(|e| e.to_string())?;
            if len as usize > max_frame {
                return Err(format!(
                    "frame of {len} bytes in shared memory exceeds max_frame"
                ));
            }
            // Copied out at once: the worker could still write to the region, and what the
            // caller decodes must not change under its feet (a string checked as UTF-8,
            // then changed, would be undefined behaviour). The worker trusts the farm's
            // regions as they are.
            let region = ring
                .ok_or("a shared-memory frame, but no ring was shared")?
                .take(offset, len)?;
            Ok(Bytes::copy_from_slice(&region))
        }
    }
}

async fn wait(child: &mut Option<Child>) -> std::io::Result<std::process::ExitStatus> {
    match child {
        Some(child) => child.wait().await,
        None => std::future::pending().await,
    }
}

/// Passes on what one read brought; whether to keep reading (not at the end of the stream,
/// nor after a protocol fault).
fn deliver(
    read: std::io::Result<usize>,
    worker: WorkerId,
    decoder: &mut FrameDecoder,
    buf: &mut BytesMut,
    ring: Option<&Ring>,
    inbound: &mpsc::UnboundedSender<Inbound>,
) -> bool {
    if !matches!(read, Ok(n) if n > 0) {
        return false;
    }
    let (messages, fault) = decode_all(decoder, buf, ring);
    if !messages.is_empty() {
        let _ = inbound.send(Inbound::Messages { worker, messages });
    }
    match fault {
        Some(message) => {
            let _ = inbound.send(Inbound::Fault { worker, message });
            false
        }
        None => true,
    }
}

/// The last lines of the worker's stderr, once the pipe closes (within 200 ms).
async fn stderr_tail(task: tokio::task::JoinHandle<Vec<String>>) -> Vec<String> {
    let abort = task.abort_handle();
    match tokio::time::timeout(Duration::from_millis(200), task).await {
        Ok(Ok(tail)) => tail,
        _ => {
            // A grandchild that left the group may hold the pipe open: stop reading it.
            abort.abort();
            Vec::new()
        }
    }
}

/// Holds the worker's process until it is reaped. If its supervisor is dropped first (the
/// runtime shut down under a live farm), kills the process group and has the process
/// reaped from a thread, so no worker outlives its runtime, not even as a zombie.
struct GroupGuard {
    pid: u32,
    child: Option<Child>,
}

const UNKNOWN_EXIT: ExitInfo = ExitInfo {
    code: None,
    signal: None,
};

impl GroupGuard {
    /// The worker was reaped (with this status, if it could be read): what it left in its
    /// group goes too.
    fn reaped(&mut self, exit: Option<std::process::ExitStatus>) -> ExitInfo {
        self.child = None;
        kill_group_remnants(self.pid);
        exit.map_or(UNKNOWN_EXIT, ExitInfo::from_status)
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            signal_group(self.pid, Signal::Kill);
            reap_killed(child);
        }
    }
}

async fn read_some(stdout: &mut ChildStdout, buf: &mut BytesMut) -> std::io::Result<usize> {
    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
    stdout.read_buf(buf).await
}

fn decode_all(
    decoder: &mut FrameDecoder,
    buf: &mut BytesMut,
    ring: Option<&Ring>,
) -> (Vec<FromWorker>, Option<String>) {
    let mut messages = Vec::new();
    loop {
        match decoder.decode(buf) {
            Ok(Some(payload)) => match from_ring(payload.freeze(), ring, decoder.max_frame())
                .and_then(|payload| decode_from_worker(payload).map_err(|e| e.to_string()))
            {
                Ok(message) => messages.push(message),
                Err(e) => return (messages, Some(e)),
            },
            Ok(None) => return (messages, None),
            Err(e) => return (messages, Some(e.to_string())),
        }
    }
}
