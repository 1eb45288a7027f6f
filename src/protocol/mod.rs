//! The wire protocol between a farm and its workers. No I/O and no user API here: this
//! module turns messages into frame payloads and back, so any transport that moves frames
//! (a pipe today, a network stream later) can carry it.
//!
//! Every frame payload starts with a one-byte tag; integers are little-endian.
//!
//! | tag    | direction | message | body                                                   |
//! |--------|-----------|---------|--------------------------------------------------------|
//! | `0x01` | to worker | Hello   | version u16, max frame u32, serializer name (u8 len), then optionally 1 and the encoded set-up arguments |
//! | `0x02` | to worker | Call    | call id u64, method (u16 len), encoded arguments       |
//! | `0x03` | to worker | Call, queued | as Call; the worker reports Started when it starts it |
//! | `0x04` | to worker | Stop    | empty: the polite stop; no calls follow                |
//! | `0x05` | to worker | Slot    | slot u16, generation u32: the next "Call, queued" waits in this place of the shared slot table |
//! | `0x06` | to worker | Shared  | offset u64, length u32: the real payload is in the shared ring |
//! | `0x08` | to worker | Batch   | as Call, arguments a batch: count u32, then each item's encoded arguments (u32 len); answered by one Ok whose result is a batch: count u32, then per item status u8 (0 ok, else the Err kind), u32 len, the encoded result or the UTF-8 message |
//! | `0x09` | to worker | Batch, queued | as Batch; the worker reports Started when it starts it |
//! | `0x07` | to worker | Cancel  | call id u64: the caller gave up; an async handler still running is dropped and answered Err Cancelled |
//! | `0x81` | to farm   | Ready   | version u16, pid u32, threads u16, async method names (u16 count, each u16 len), flags u8 (bit 0: maps the shared rings) |
//! | `0x82` | to farm   | Ok      | call id u64, encoded result                            |
//! | `0x83` | to farm   | Err     | call id u64, kind u8, UTF-8 message                    |
//! | `0x84` | to farm   | Fatal   | UTF-8 message: the worker cannot serve and will exit   |
//! | `0x85` | to farm   | Started | call id u64: a queued call's handler has started       |
//! | `0x87` | to farm   | Shared  | offset u64, length u32: the real payload is in the shared ring |
//! | `0x88` | to farm   | Refused | call id u64, back-off in ms u64 (`u64::MAX`: "not here"), UTF-8 reason: the handler refused the call; it did not run to an answer |
//!
//! The farm writes Hello first; the worker answers Ready (or Fatal) before anything else.
//!
//! **Running or waiting.** The farm must know which of a worker's calls are running (a
//! crash or a hang may be theirs) and which only wait behind them (innocent, re-run free).
//! Ready says how many sync handlers the worker runs at once (`threads`) and which methods
//! are async (they start the moment they arrive). The farm sends a plain Call only when the
//! worker will start it on arrival; any other call goes as "Call, queued", and the worker
//! writes Started for it, before its handler runs, when it gets to it.
//!
//! **Withdrawn.** A queued call may come with a place in the slot table the farm shares
//! with the worker (see `crate::shm::Slots`). The farm may take the call back (its worker is
//! stuck, or another is idle) by moving the place from waiting to withdrawn; the worker, on
//! reaching the call, moves it from waiting to started, or finds it withdrawn and skips the
//! call without a word. One atomic word decides, so no call both runs and moves.
//!
//! **Shared.** A large frame's payload may travel through the sender's shared-memory ring
//! (see `crate::shm`) while the pipe carries a Shared frame naming its place; the receiver
//! reads the payload there and handles it as if it had come through the pipe. A worker
//! says in its Ready whether it mapped the rings; until it does, everything takes the pipe.
//!
//! **Stop, or gone.** The farm says Stop before it closes a worker's input; the worker then
//! answers the calls it has and exits. Input that ends without Stop means the farm died or
//! dropped the worker: nobody is left to answer, and the worker kills its process group.

pub(crate) mod frame;

/// How a farm tells a process that it is one of its workers.
pub(crate) mod launch {
    /// Environment variable that marks a process as started by a farm.
    pub(crate) const WORKER_ENV: &str = "WORKFARM_WORKER";
    /// Environment variable carrying the parent's pid, for the worker's parent-death check.
    pub(crate) const PARENT_PID_ENV: &str = "WORKFARM_PARENT_PID";
    /// Environment variable naming the inherited descriptors of the worker's shared
    /// memory, `to-worker ring,to-farm ring,slot table` (see `crate::shm`); absent when the
    /// farm has none.
    pub(crate) const RINGS_ENV: &str = "WORKFARM_RINGS";
    /// Environment variable carrying the worker's pool slot (`0..workers`), which its
    /// replacement inherits.
    pub(crate) const SLOT_ENV: &str = "WORKFARM_SLOT";
}

use bytes::{Buf, Bytes};
use std::fmt;

/// Version of the wire protocol; the handshake refuses a worker that speaks another.
pub const PROTOCOL_VERSION: u16 = 7;

const TAG_HELLO: u8 = 0x01;
const TAG_CALL: u8 = 0x02;
const TAG_CALL_QUEUED: u8 = 0x03;
const TAG_STOP: u8 = 0x04;
const TAG_SLOT: u8 = 0x05;
const TAG_SHARED_TO_WORKER: u8 = 0x06;
const TAG_CANCEL: u8 = 0x07;
const TAG_BATCH: u8 = 0x08;
const TAG_BATCH_QUEUED: u8 = 0x09;
const TAG_READY: u8 = 0x81;
const TAG_OK: u8 = 0x82;
const TAG_ERR: u8 = 0x83;
const TAG_FATAL: u8 = 0x84;
const TAG_STARTED: u8 = 0x85;
const TAG_SHARED_TO_FARM: u8 = 0x87;
const TAG_REFUSED: u8 = 0x88;

/// Which way a frame goes (a Shared frame has a tag of each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    ToWorker,
    ToFarm,
}

/// Encodes a Shared frame's payload: the real payload is at `offset`, `len` bytes, in the
/// sender's ring.
pub(crate) fn encode_shared(direction: Direction, offset: u64, len: u32, out: &mut Vec<u8>) {
    out.push(match direction {
        Direction::ToWorker => TAG_SHARED_TO_WORKER,
        Direction::ToFarm => TAG_SHARED_TO_FARM,
    });
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
}

/// If `payload` is a Shared frame going `direction`: the place it names.
pub(crate) fn shared_place(
    direction: Direction,
    payload: &[u8],
) -> Option<Result<(u64, u32), ProtocolError>> {
    let tag = match direction {
        Direction::ToWorker => TAG_SHARED_TO_WORKER,
        Direction::ToFarm => TAG_SHARED_TO_FARM,
    };
    if payload.first() != Some(&tag) {
        return None;
    }
    let mut p = &payload[1..];
    if p.len() != 12 {
        return Some(Err(malformed("shared")));
    }
    Some(Ok((p.get_u64_le(), p.get_u32_le())))
}

/// Why a handler's call failed, as the worker reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FailureKind {
    /// The handler returned an error.
    Handler = 1,
    /// The handler panicked.
    Panic = 2,
    /// No handler is registered under that name.
    UnknownMethod = 3,
    /// The arguments did not deserialize into the handler's argument type.
    BadArguments = 4,
    /// The handler's result could not be serialized or framed.
    BadResult = 5,
    /// The farm cancelled the call and its handler was dropped.
    Cancelled = 6,
    /// The handler refused the call (in a batch item; a whole call's refusal is a Refused
    /// frame).
    Refused = 7,
}

impl FailureKind {
    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => FailureKind::Handler,
            2 => FailureKind::Panic,
            3 => FailureKind::UnknownMethod,
            4 => FailureKind::BadArguments,
            5 => FailureKind::BadResult,
            6 => FailureKind::Cancelled,
            7 => FailureKind::Refused,
            _ => return None,
        })
    }
}

/// A message that does not parse. Fatal for the stream it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProtocolError(pub(crate) String);

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ProtocolError {}

fn malformed(what: &str) -> ProtocolError {
    ProtocolError(format!("malformed {what} message"))
}

// ===== farm → worker =====

/// What the farm tells a worker first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Hello {
    pub(crate) version: u16,
    pub(crate) max_frame: u32,
    pub(crate) serializer: String,
    /// The set-up arguments (`FarmOptions::setup_args`), encoded, if the farm has any.
    pub(crate) setup: Option<Bytes>,
}

/// A message from the farm to a worker.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ToWorker {
    Hello(Hello),
    Call {
        id: u64,
        /// The method name; valid UTF-8, checked when decoded (see [`method_name`]).
        method: Bytes,
        args: Bytes,
        /// The farm counts the call as waiting until the worker reports it Started.
        queued: bool,
        /// `args` is a batch of items, each run by the handler (see [`batch_items`]).
        batch: bool,
    },
    /// The polite stop: no more calls follow; answer the ones you have, then exit. A worker
    /// whose input ends without it knows the farm is gone (or dropped it).
    Stop,
    /// The next queued Call waits in place `slot` of the slot table, at `generation`.
    Slot {
        slot: u16,
        generation: u32,
    },
    /// The caller gave up on call `id`.
    Cancel {
        id: u64,
    },
}

/// A framed Cancel message for call `id`.
pub(crate) fn cancel_frame(id: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(frame::HEAD_LEN + 9);
    let start = frame::begin(&mut out);
    out.push(TAG_CANCEL);
    out.extend_from_slice(&id.to_le_bytes());
    // Cannot fail: 9 bytes fit any cap.
    let _ = frame::finish(&mut out, start, usize::MAX);
    out
}

/// Encodes a Stop message.
pub(crate) fn encode_stop(out: &mut Vec<u8>) {
    out.push(TAG_STOP);
}

pub(crate) fn encode_slot(slot: u16, generation: u32, out: &mut Vec<u8>) {
    out.push(TAG_SLOT);
    out.extend_from_slice(&slot.to_le_bytes());
    out.extend_from_slice(&generation.to_le_bytes());
}

pub(crate) fn encode_hello(hello: &Hello, out: &mut Vec<u8>) {
    let name = hello.serializer.as_bytes();
    let name = &name[..name.len().min(u8::MAX as usize)];
    out.push(TAG_HELLO);
    out.extend_from_slice(&hello.version.to_le_bytes());
    out.extend_from_slice(&hello.max_frame.to_le_bytes());
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    if let Some(setup) = &hello.setup {
        out.push(1);
        out.extend_from_slice(setup);
    }
}

/// Writes a Call's header; the caller appends the encoded arguments right after it.
/// Method names longer than `u16::MAX` bytes are refused by the caller beforehand.
pub(crate) fn encode_call_head(id: u64, method: &str, out: &mut Vec<u8>) {
    out.push(TAG_CALL);
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&(method.len() as u16).to_le_bytes());
    out.extend_from_slice(method.as_bytes());
}

/// Makes a complete Call frame a Batch: its arguments are a count and items (see
/// [`push_batch_item`]).
pub(crate) fn mark_batch(frame: &mut [u8]) {
    if let Some(tag) = frame.get_mut(frame::HEAD_LEN) {
        *tag = TAG_BATCH;
    }
}

/// Appends one length-prefixed item to a batch being written: `write` appends its bytes.
pub(crate) fn push_batch_item<E>(
    out: &mut Vec<u8>,
    write: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
) -> Result<(), E> {
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    write(out)?;
    let len = u32::try_from(out.len() - at - 4).unwrap_or(u32::MAX);
    out[at..at + 4].copy_from_slice(&len.to_le_bytes());
    Ok(())
}

/// Splits a batch (count u32, then u32-length-prefixed items) into its items.
pub(crate) fn batch_items(mut p: Bytes) -> Result<Vec<Bytes>, ProtocolError> {
    if p.remaining() < 4 {
        return Err(malformed("batch"));
    }
    let count = p.get_u32_le() as usize;
    // Each item takes at least its 4-byte length: a count beyond that is a lie.
    if count > p.remaining() / 4 + 1 {
        return Err(malformed("batch"));
    }
    let mut items = Vec::with_capacity(count);
    for _ in 0..count {
        if p.remaining() < 4 {
            return Err(malformed("batch"));
        }
        let n = p.get_u32_le() as usize;
        if p.remaining() < n {
            return Err(malformed("batch"));
        }
        items.push(p.split_to(n));
    }
    if p.has_remaining() {
        return Err(malformed("batch"));
    }
    Ok(items)
}

/// One item of a batch result: its encoded value, or why it failed.
pub(crate) type BatchItem = Result<Bytes, (FailureKind, String)>;

/// Splits a batch result (count u32, then per item status u8, u32 len, bytes) into its items.
pub(crate) fn batch_results(mut p: Bytes) -> Result<Vec<BatchItem>, ProtocolError> {
    if p.remaining() < 4 {
        return Err(malformed("batch result"));
    }
    let count = p.get_u32_le() as usize;
    if count > p.remaining() / 5 + 1 {
        return Err(malformed("batch result"));
    }
    let mut items = Vec::with_capacity(count);
    for _ in 0..count {
        if p.remaining() < 5 {
            return Err(malformed("batch result"));
        }
        let status = p.get_u8();
        let n = p.get_u32_le() as usize;
        if p.remaining() < n {
            return Err(malformed("batch result"));
        }
        let body = p.split_to(n);
        items.push(match status {
            0 => Ok(body),
            kind => {
                let kind = FailureKind::from_u8(kind).ok_or_else(|| malformed("batch result"))?;
                Err((kind, String::from_utf8_lossy(&body).into_owned()))
            }
        });
    }
    if p.has_remaining() {
        return Err(malformed("batch result"));
    }
    Ok(items)
}

/// Appends one item of a batch result: `write` appends the encoded value, or fails with
/// the item's failure (kind and message).
pub(crate) fn push_batch_result(
    out: &mut Vec<u8>,
    write: impl FnOnce(&mut Vec<u8>) -> Result<(), (FailureKind, String)>,
) {
    let at = out.len();
    out.extend_from_slice(&[0; 5]);
    let status = match write(out) {
        Ok(()) => 0,
        Err((kind, message)) => {
            out.truncate(at + 5);
            out.extend_from_slice(message.as_bytes());
            kind as u8
        }
    };
    let len = u32::try_from(out.len() - at - 5).unwrap_or(u32::MAX);
    out[at] = status;
    out[at + 1..at + 5].copy_from_slice(&len.to_le_bytes());
}

/// Marks a complete Call (or Batch) frame as queued (the worker reports when it starts
/// it) or not.
pub(crate) fn set_call_queued(frame: &mut [u8], queued: bool) {
    if let Some(tag) = frame.get_mut(frame::HEAD_LEN) {
        let batch = matches!(*tag, TAG_BATCH | TAG_BATCH_QUEUED);
        *tag = match (batch, queued) {
            (false, false) => TAG_CALL,
            (false, true) => TAG_CALL_QUEUED,
            (true, false) => TAG_BATCH,
            (true, true) => TAG_BATCH_QUEUED,
        };
    }
}

/// The call id inside a complete Call frame (length prefix included), or 0 if the frame is
/// not one.
pub(crate) fn id_of_call_frame(frame: &[u8]) -> u64 {
    frame
        .get(frame::HEAD_LEN + 1..frame::HEAD_LEN + 9)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

/// The method name inside a complete Call frame (length prefix included), or `""` if the
/// frame is not one.
pub(crate) fn method_of_call_frame(frame: &[u8]) -> &str {
    const METHOD_LEN_AT: usize = frame::HEAD_LEN + 1 + 8;
    let Some(len) = frame.get(METHOD_LEN_AT..METHOD_LEN_AT + 2) else {
        return "";
    };
    let len = u16::from_le_bytes([len[0], len[1]]) as usize;
    frame
        .get(METHOD_LEN_AT + 2..METHOD_LEN_AT + 2 + len)
        .and_then(|m| std::str::from_utf8(m).ok())
        .unwrap_or_default()
}

/// The encoded arguments inside a complete Call frame (length prefix included): what a
/// farm across machines ships, with the id and method beside them. `None` for a frame that
/// is not a plain Call (a batch, say).
#[cfg(feature = "redis")]
pub(crate) fn args_of_call_frame(frame: &[u8]) -> Option<&[u8]> {
    const METHOD_LEN_AT: usize = frame::HEAD_LEN + 1 + 8;
    if !matches!(
        frame.get(frame::HEAD_LEN),
        Some(&(TAG_CALL | TAG_CALL_QUEUED))
    ) {
        return None;
    }
    let len = frame.get(METHOD_LEN_AT..METHOD_LEN_AT + 2)?;
    let len = u16::from_le_bytes([len[0], len[1]]) as usize;
    frame.get(METHOD_LEN_AT + 2 + len..)
}

/// The method name of a decoded Call (checked as UTF-8 by [`decode_to_worker`]).
pub(crate) fn method_name(method: &Bytes) -> &str {
    std::str::from_utf8(method).unwrap_or_default()
}

pub(crate) fn decode_to_worker(mut p: Bytes) -> Result<ToWorker, ProtocolError> {
    if p.is_empty() {
        return Err(ProtocolError("empty frame".into()));
    }
    match p.get_u8() {
        TAG_HELLO => {
            if p.remaining() < 7 {
                return Err(malformed("hello"));
            }
            let version = p.get_u16_le();
            let max_frame = p.get_u32_le();
            let n = p.get_u8() as usize;
            if p.remaining() < n {
                return Err(malformed("hello"));
            }
            let name = p.split_to(n);
            let serializer = String::from_utf8(name.to_vec()).map_err(|_| malformed("hello"))?;
            let setup = match p.first() {
                None => None,
                Some(1) => Some(p.slice(1..)),
                Some(_) => return Err(malformed("hello")),
            };
            Ok(ToWorker::Hello(Hello {
                version,
                max_frame,
                serializer,
                setup,
            }))
        }
        tag @ (TAG_CALL | TAG_CALL_QUEUED | TAG_BATCH | TAG_BATCH_QUEUED) => {
            if p.remaining() < 10 {
                return Err(malformed("call"));
            }
            let id = p.get_u64_le();
            let n = p.get_u16_le() as usize;
            if p.remaining() < n {
                return Err(malformed("call"));
            }
            let method = p.split_to(n);
            if std::str::from_utf8(&method).is_err() {
                return Err(malformed("call"));
            }
            Ok(ToWorker::Call {
                id,
                method,
                args: p,
                queued: matches!(tag, TAG_CALL_QUEUED | TAG_BATCH_QUEUED),
                batch: matches!(tag, TAG_BATCH | TAG_BATCH_QUEUED),
            })
        }
        TAG_STOP if p.is_empty() => Ok(ToWorker::Stop),
        TAG_STOP => Err(malformed("stop")),
        TAG_SLOT if p.remaining() == 6 => Ok(ToWorker::Slot {
            slot: p.get_u16_le(),
            generation: p.get_u32_le(),
        }),
        TAG_SLOT => Err(malformed("slot")),
        TAG_CANCEL if p.remaining() == 8 => Ok(ToWorker::Cancel { id: p.get_u64_le() }),
        TAG_CANCEL => Err(malformed("cancel")),
        tag => Err(ProtocolError(format!("unknown message tag {tag:#04x}"))),
    }
}

// ===== worker → farm =====

/// A message from a worker to the farm.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum FromWorker {
    Ready(Ready),
    Started {
        id: u64,
    },
    Ok {
        id: u64,
        body: Bytes,
    },
    Err {
        id: u64,
        kind: FailureKind,
        message: String,
    },
    Fatal {
        message: String,
    },
    /// The handler refused the call: `retry_after` is its back-off, `None` for "not here".
    Refused {
        id: u64,
        retry_after: Option<std::time::Duration>,
        message: String,
    },
}

/// What a worker says about itself in its handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ready {
    pub(crate) version: u16,
    pub(crate) pid: u32,
    /// Sync handlers it runs at once.
    pub(crate) threads: u16,
    /// Its async methods: they start as they arrive, however many are running.
    pub(crate) async_methods: Vec<String>,
    /// It mapped the shared-memory rings the farm passed it.
    pub(crate) shared_memory: bool,
}

/// Encodes a Ready; names that do not fit (over 65535 bytes, or past 65535 names) are left
/// out, which only makes the farm treat those methods as sync (more careful, never wrong).
pub(crate) fn encode_ready(ready: &Ready, out: &mut Vec<u8>) {
    out.push(TAG_READY);
    out.extend_from_slice(&ready.version.to_le_bytes());
    out.extend_from_slice(&ready.pid.to_le_bytes());
    out.extend_from_slice(&ready.threads.to_le_bytes());
    let names: Vec<&String> = ready
        .async_methods
        .iter()
        .filter(|n| n.len() <= u16::MAX as usize)
        .take(u16::MAX as usize)
        .collect();
    out.extend_from_slice(&(names.len() as u16).to_le_bytes());
    for name in names {
        out.extend_from_slice(&(name.len() as u16).to_le_bytes());
        out.extend_from_slice(name.as_bytes());
    }
    out.push(u8::from(ready.shared_memory));
}

fn decode_ready(mut p: Bytes) -> Result<Ready, ProtocolError> {
    if p.remaining() < 10 {
        return Err(malformed("ready"));
    }
    let version = p.get_u16_le();
    let pid = p.get_u32_le();
    if version != PROTOCOL_VERSION {
        // Say which version it speaks, whatever the rest of a foreign Ready looks like.
        return Ok(Ready {
            version,
            pid,
            threads: 1,
            async_methods: Vec::new(),
            shared_memory: false,
        });
    }
    let threads = p.get_u16_le();
    let count = p.get_u16_le() as usize;
    let mut async_methods = Vec::with_capacity(count.min(1024));
    for _ in 0..count {
        if p.remaining() < 2 {
            return Err(malformed("ready"));
        }
        let n = p.get_u16_le() as usize;
        if p.remaining() < n {
            return Err(malformed("ready"));
        }
        let name = String::from_utf8(p.split_to(n).to_vec()).map_err(|_| malformed("ready"))?;
        async_methods.push(name);
    }
    if p.remaining() != 1 || threads == 0 {
        return Err(malformed("ready"));
    }
    let flags = p.get_u8();
    Ok(Ready {
        version,
        pid,
        threads,
        async_methods,
        shared_memory: flags & 1 != 0,
    })
}

pub(crate) fn encode_started(id: u64, out: &mut Vec<u8>) {
    out.push(TAG_STARTED);
    out.extend_from_slice(&id.to_le_bytes());
}

/// Writes an Ok's header; the caller appends the encoded result right after it.
pub(crate) fn encode_ok_head(id: u64, out: &mut Vec<u8>) {
    out.push(TAG_OK);
    out.extend_from_slice(&id.to_le_bytes());
}

pub(crate) fn encode_err(id: u64, kind: FailureKind, message: &str, out: &mut Vec<u8>) {
    out.push(TAG_ERR);
    out.extend_from_slice(&id.to_le_bytes());
    out.push(kind as u8);
    out.extend_from_slice(message.as_bytes());
}

pub(crate) fn encode_refused(
    id: u64,
    retry_after: Option<std::time::Duration>,
    message: &str,
    out: &mut Vec<u8>,
) {
    out.push(TAG_REFUSED);
    out.extend_from_slice(&id.to_le_bytes());
    let ms = retry_after.map_or(u64::MAX, |d| {
        u64::try_from(d.as_millis()).unwrap_or(u64::MAX - 1)
    });
    out.extend_from_slice(&ms.to_le_bytes());
    out.extend_from_slice(message.as_bytes());
}

pub(crate) fn encode_fatal(message: &str, out: &mut Vec<u8>) {
    out.push(TAG_FATAL);
    out.extend_from_slice(message.as_bytes());
}

pub(crate) fn decode_from_worker(mut p: Bytes) -> Result<FromWorker, ProtocolError> {
    if p.is_empty() {
        return Err(ProtocolError("empty frame".into()));
    }
    match p.get_u8() {
        TAG_READY => decode_ready(p).map(FromWorker::Ready),
        TAG_STARTED => {
            if p.remaining() != 8 {
                return Err(malformed("started"));
            }
            Ok(FromWorker::Started { id: p.get_u64_le() })
        }
        TAG_OK => {
            if p.remaining() < 8 {
                return Err(malformed("ok"));
            }
            let id = p.get_u64_le();
            Ok(FromWorker::Ok { id, body: p })
        }
        TAG_ERR => {
            if p.remaining() < 9 {
                return Err(malformed("err"));
            }
            let id = p.get_u64_le();
            let kind = FailureKind::from_u8(p.get_u8()).ok_or_else(|| malformed("err"))?;
            let message = String::from_utf8_lossy(&p).into_owned();
            Ok(FromWorker::Err { id, kind, message })
        }
        TAG_REFUSED => {
            if p.remaining() < 16 {
                return Err(malformed("refused"));
            }
            let id = p.get_u64_le();
            let ms = p.get_u64_le();
            let retry_after = (ms != u64::MAX).then(|| std::time::Duration::from_millis(ms));
            let message = String::from_utf8_lossy(&p).into_owned();
            Ok(FromWorker::Refused {
                id,
                retry_after,
                message,
            })
        }
        TAG_FATAL => Ok(FromWorker::Fatal {
            message: String::from_utf8_lossy(&p).into_owned(),
        }),
        tag => Err(ProtocolError(format!("unknown message tag {tag:#04x}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn farm_messages_round_trip() {
        let hello = Hello {
            version: PROTOCOL_VERSION,
            max_frame: 1234,
            serializer: "cbor".into(),
            setup: None,
        };
        let mut out = Vec::new();
        encode_hello(&hello, &mut out);
        assert_eq!(
            decode_to_worker(out.into()).unwrap(),
            ToWorker::Hello(hello)
        );
        for setup in [&b""[..], b"\x01\x02"] {
            let hello = Hello {
                version: PROTOCOL_VERSION,
                max_frame: 1234,
                serializer: "json".into(),
                setup: Some(Bytes::copy_from_slice(setup)),
            };
            let mut out = Vec::new();
            encode_hello(&hello, &mut out);
            assert_eq!(
                decode_to_worker(out.into()).unwrap(),
                ToWorker::Hello(hello)
            );
        }

        let mut out = Vec::new();
        encode_call_head(7, "add", &mut out);
        out.extend_from_slice(b"[1,2]");
        assert_eq!(
            decode_to_worker(out.into()).unwrap(),
            ToWorker::Call {
                id: 7,
                method: Bytes::from_static(b"add"),
                args: Bytes::from_static(b"[1,2]"),
                queued: false,
                batch: false,
            }
        );
        let mut frame = Vec::new();
        let start = frame::begin(&mut frame);
        encode_call_head(8, "add", &mut frame);
        frame.extend_from_slice(&0u32.to_le_bytes());
        frame::finish(&mut frame, start, usize::MAX).unwrap();
        mark_batch(&mut frame);
        set_call_queued(&mut frame, true);
        let decoded = decode_to_worker(Bytes::copy_from_slice(&frame[frame::HEAD_LEN..]));
        assert!(matches!(
            decoded,
            Ok(ToWorker::Call {
                id: 8,
                queued: true,
                batch: true,
                ..
            })
        ));
        set_call_queued(&mut frame, false);
        let decoded = decode_to_worker(Bytes::copy_from_slice(&frame[frame::HEAD_LEN..]));
        assert!(matches!(
            decoded,
            Ok(ToWorker::Call {
                queued: false,
                batch: true,
                ..
            })
        ));
    }

    #[test]
    fn worker_messages_round_trip() {
        let ready = Ready {
            version: PROTOCOL_VERSION,
            pid: 42,
            threads: 3,
            async_methods: vec!["sleep".into(), "".into()],
            shared_memory: true,
        };
        let mut out = Vec::new();
        encode_ready(&ready, &mut out);
        assert_eq!(
            decode_from_worker(out.into()).unwrap(),
            FromWorker::Ready(ready)
        );

        let mut out = Vec::new();
        encode_started(11, &mut out);
        assert_eq!(
            decode_from_worker(out.into()).unwrap(),
            FromWorker::Started { id: 11 }
        );

        let mut out = Vec::new();
        encode_slot(13, 77, &mut out);
        assert_eq!(
            decode_to_worker(out.into()).unwrap(),
            ToWorker::Slot {
                slot: 13,
                generation: 77
            }
        );

        let mut out = Vec::new();
        encode_ok_head(9, &mut out);
        out.extend_from_slice(b"3");
        assert_eq!(
            decode_from_worker(out.into()).unwrap(),
            FromWorker::Ok {
                id: 9,
                body: Bytes::from_static(b"3")
            }
        );

        let mut out = Vec::new();
        encode_refused(
            4,
            Some(std::time::Duration::from_millis(500)),
            "quota",
            &mut out,
        );
        assert_eq!(
            decode_from_worker(std::mem::take(&mut out).into()).unwrap(),
            FromWorker::Refused {
                id: 4,
                retry_after: Some(std::time::Duration::from_millis(500)),
                message: "quota".into()
            }
        );
        encode_refused(5, None, "", &mut out);
        assert!(matches!(
            decode_from_worker(std::mem::take(&mut out).into()).unwrap(),
            FromWorker::Refused {
                id: 5,
                retry_after: None,
                ..
            }
        ));
        encode_err(9, FailureKind::Panic, "boom", &mut out);
        assert_eq!(
            decode_from_worker(out.into()).unwrap(),
            FromWorker::Err {
                id: 9,
                kind: FailureKind::Panic,
                message: "boom".into()
            }
        );
    }

    #[test]
    fn method_is_read_back_from_a_call_frame() {
        let mut out = Vec::new();
        let start = frame::begin(&mut out);
        encode_call_head(7, "add", &mut out);
        out.extend_from_slice(b"[1,2]");
        frame::finish(&mut out, start, 1024).unwrap();
        assert_eq!(method_of_call_frame(&out), "add");
        assert_eq!(id_of_call_frame(&out), 7);
        assert_eq!(method_of_call_frame(&out[..14]), "");
        set_call_queued(&mut out, true);
        let payload = Bytes::copy_from_slice(&out[frame::HEAD_LEN..]);
        assert!(matches!(
            decode_to_worker(payload).unwrap(),
            ToWorker::Call {
                queued: true,
                id: 7,
                ..
            }
        ));
    }

    #[test]
    fn batches_round_trip_and_garbage_is_refused() {
        let mut args = 3u32.to_le_bytes().to_vec();
        for item in [&b"a"[..], b"", b"ccc"] {
            push_batch_item::<()>(&mut args, |out| {
                out.extend_from_slice(item);
                Ok(())
            })
            .unwrap();
        }
        let items = batch_items(Bytes::from(args.clone())).unwrap();
        assert_eq!(items, [&b"a"[..], b"", b"ccc"]);
        let mut results = 2u32.to_le_bytes().to_vec();
        push_batch_result(&mut results, |out| {
            out.extend_from_slice(b"ok");
            Ok(())
        });
        push_batch_result(&mut results, |out| {
            out.extend_from_slice(b"partial result, dropped");
            Err((FailureKind::Panic, "boom".into()))
        });
        let back = batch_results(Bytes::from(results)).unwrap();
        assert_eq!(back[0], Ok(Bytes::from_static(b"ok")));
        assert_eq!(back[1], Err((FailureKind::Panic, "boom".to_owned())));
        for bad in [
            &b""[..],
            b"\x01\0\0\0",
            b"\xff\xff\xff\xff\0\0\0\0",
            b"\x01\0\0\0\x09\0\0\0ab",
        ] {
            assert!(batch_items(Bytes::copy_from_slice(bad)).is_err(), "{bad:?}");
            assert!(
                batch_results(Bytes::copy_from_slice(bad)).is_err(),
                "{bad:?}"
            );
        }
        let mut trailing = args;
        trailing.push(0);
        assert!(batch_items(Bytes::from(trailing)).is_err());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bad in [
            &b""[..],
            b"\x00",
            b"\x81\x01",
            b"\x82abc",
            b"\x83\0\0\0\0\0\0\0\0\x09",
            b"\x02\0",
            b"\x85\0\0",
            b"\x05\0",
            b"\x81\x07\0\0\0\0\0\x01\0\x05\0",
        ] {
            assert!(
                decode_from_worker(Bytes::copy_from_slice(bad)).is_err(),
                "{bad:?}"
            );
            assert!(decode_to_worker(Bytes::copy_from_slice(bad)).is_err());
        }
        assert!(decode_to_worker(Bytes::from_static(b"\x04junk")).is_err());
        let mut shared = Vec::new();
        encode_shared(Direction::ToFarm, 7, 9, &mut shared);
        assert_eq!(shared_place(Direction::ToFarm, &shared), Some(Ok((7, 9))));
        assert_eq!(shared_place(Direction::ToWorker, &shared), None);
        assert!(matches!(
            shared_place(Direction::ToFarm, &shared[..5]),
            Some(Err(_))
        ));
        assert_eq!(
            decode_to_worker(Bytes::from_static(b"\x04")).ok(),
            Some(ToWorker::Stop)
        );
    }
}
