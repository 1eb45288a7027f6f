//! The caller's side: [`Farm::connect`] gives a [`Farm`] whose calls are added to the
//! farm's calls stream and settled from this caller's results stream. The call paths of
//! `Farm` (encode, queue bound, futures, handles, cancel, map) are the local farm's: only
//! the dispatcher behind the channels differs.

use super::conn::{self, Backoff, COMMAND_TIMEOUT};
use super::keys::{self, Keys};
use super::wire::{self, ResultEntry};
use crate::error::{CallError, CreateError};
use crate::event::WorkerId;
use crate::farm::{Answer, Book, Call, CancelWhy, Command, Core, Inputs, Reply, StderrCapture};
use crate::serializer::{Json, Serializer};
use crate::CallInfo;
use crate::{Farm, Status};
use bytes::Bytes;
use redis::aio::ConnectionManager;
use redis::Client;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// How long a blocking read of results waits on the engine before it asks again.
const RESULT_BLOCK: Duration = Duration::from_secs(1);
/// How often a caller with event subscribers looks at who serves the farm.
const NODE_WATCH: Duration = Duration::from_secs(1);
/// Calls a caller may have outstanding by default (bounds `Farm::map`'s default window).
const DEFAULT_CAPACITY: usize = 256;

/// Settings for [`Farm::connect`]: which engine, which farm, and the defaults of its calls.
#[derive(Debug, Clone)]
pub struct RemoteOptions<S = Json> {
    url: String,
    farm: String,
    serializer: S,
    max_retries: u32,
    timeout: Option<Duration>,
    connect_timeout: Duration,
    engine_timeout: Duration,
    max_concurrent_calls: Option<usize>,
    max_frame: usize,
}

impl RemoteOptions<Json> {
    /// Calls to farm `farm` through the Redis server at `url` (`redis://host:port`,
    /// `rediss://…`, `redis+unix:///path/to/socket`).
    pub fn new(url: impl Into<String>, farm: impl Into<String>) -> Self {
        RemoteOptions {
            url: url.into(),
            farm: farm.into(),
            serializer: Json,
            max_retries: 3,
            timeout: None,
            connect_timeout: Duration::from_secs(5),
            engine_timeout: Duration::from_secs(30),
            max_concurrent_calls: None,
            max_frame: crate::protocol::frame::DEFAULT_MAX_FRAME,
        }
    }
}

impl<S: Serializer> RemoteOptions<S> {
    /// The serializer of arguments and results; the nodes' must be the same.
    pub fn serializer<S2: Serializer>(self, serializer: S2) -> RemoteOptions<S2> {
        RemoteOptions {
            url: self.url,
            farm: self.farm,
            serializer,
            max_retries: self.max_retries,
            timeout: self.timeout,
            connect_timeout: self.connect_timeout,
            engine_timeout: self.engine_timeout,
            max_concurrent_calls: self.max_concurrent_calls,
            max_frame: self.max_frame,
        }
    }

    /// Re-runs of a call whose node died, lost its lease, or whose worker there died or
    /// timed out, all counted together. Default 3.
    pub fn max_retries(mut self, n: u32) -> Self {
        self.max_retries = n;
        self
    }

    /// Per call, from when its handler starts on a node (a call's own `timeout` overrides
    /// it). Default: none.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Longest [`Farm::connect`] waits for the engine. Default 5 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long the engine may stay unreachable before the calls outstanding fail with
    /// [`CallError::Engine`]. Default 30 s.
    pub fn engine_timeout(mut self, timeout: Duration) -> Self {
        self.engine_timeout = timeout;
        self
    }

    /// Largest encoded call, in bytes: a larger one fails with `CallError::Serialize`
    /// before it reaches the engine. Default: the local farm's, 64 MiB. (Each node's own
    /// `max_frame` bounds what its workers take and return.)
    pub fn max_frame(mut self, bytes: usize) -> Self {
        self.max_frame = bytes;
        self
    }

    /// Calls outstanding at once; beyond it `run` waits for a place and `try_run` fails
    /// with `QueueFull`. Default: unbounded.
    pub fn max_concurrent_calls(mut self, n: usize) -> Self {
        self.max_concurrent_calls = Some(n);
        self
    }
}

impl<S: Serializer> Farm<S> {
    /// A farm served by nodes on other machines ([`remote::Node`](crate::remote::Node), or
    /// the `workfarm-node` binary) through the Redis server in `options` (feature `redis`).
    /// The calls are the local farm's (`run`, `call(..)` with `timeout`, `retries`,
    /// `deadline`, `cancel`, `tell`, `map`); see the README for what differs.
    ///
    /// # Errors
    ///
    /// [`CreateError::Engine`] when the server cannot be reached within the connect timeout
    /// or refuses the farm's stream; [`CreateError::NoRuntime`] outside a tokio runtime.
    pub async fn connect(options: RemoteOptions<S>) -> Result<Farm<S>, CreateError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(CreateError::NoRuntime);
        }
        let client = conn::client(&options.url)?;
        let mut manager = conn::manager(&client, options.connect_timeout).await?;
        let keys = Keys::new(&options.farm);
        conn::ensure_group(&mut manager, &keys.calls())
            .await
            .map_err(|e| CreateError::Engine {
                message: format!("cannot create the calls stream: {e}"),
            })?;
        let run_id = conn::run_id(&mut manager).await;
        let stderr = Arc::new(StderrCapture::new(0, 0));
        let (core, inputs) = Core::new(
            options.max_concurrent_calls,
            options.max_frame,
            DEFAULT_CAPACITY,
            stderr,
        );
        let client_id = keys::unique_name();
        let (results_tx, results_rx) = mpsc::unbounded_channel();
        tokio::spawn(read_results(
            client.clone(),
            manager.clone(),
            keys.results(&client_id),
            options.connect_timeout,
            run_id,
            results_tx,
        ));
        let caller = Caller {
            keys,
            client_id,
            fmt: options.serializer.name().to_owned(),
            max_retries: options.max_retries,
            timeout: options.timeout,
            engine_timeout: options.engine_timeout,
            conn: manager,
            outstanding: HashMap::new(),
            deadlines: BTreeSet::new(),
            book: Book::new(0, inputs.epoch),
            down_since: None,
            duplicates: 0,
            stopping: false,
            waiters: Vec::new(),
            broadcasts: HashMap::new(),
            events: None,
            nodes_seen: Default::default(),
            nodes_checked: None,
        };
        tokio::spawn(caller.run(inputs, results_rx));
        Ok(Farm::from_core(core, options.serializer))
    }
}

/// A call added to the stream and not yet answered.
struct Outstanding {
    call: Call,
    /// Its entry in the calls stream, deleted if the caller gives up before a node takes it.
    entry: String,
    deadline: Option<Instant>,
}

/// What the results reader tells the caller.
enum FromReader {
    Result(ResultEntry),
    /// The engine could not be read.
    Down(String),
    /// It can be read again.
    Up,
    /// It came back without its data (a server restarted without persistence).
    Lost,
}

struct Caller {
    keys: Keys,
    client_id: String,
    fmt: String,
    max_retries: u32,
    timeout: Option<Duration>,
    engine_timeout: Duration,
    conn: ConnectionManager,
    outstanding: HashMap<u64, Outstanding>,
    deadlines: BTreeSet<(Instant, u64)>,
    book: Book,
    down_since: Option<(Instant, String)>,
    duplicates: u64,
    stopping: bool,
    waiters: Vec<oneshot::Sender<()>>,
    /// Broadcasts waiting for nodes' answers: call id → node → its workers' replies.
    broadcasts: HashMap<u64, HashMap<String, Vec<(WorkerId, Reply)>>>,
    /// The nodes last seen serving (for `NodeJoined` and `NodeLeft`), and when.
    nodes_seen: std::collections::HashSet<String>,
    nodes_checked: Option<Instant>,
    /// Where events go, and whether anyone listens.
    events: Option<(
        tokio::sync::broadcast::Sender<crate::Event>,
        Arc<std::sync::atomic::AtomicBool>,
    )>,
}

impl Caller {
    fn report(&self) -> crate::Stats {
        let mut stats = self.book.report();
        stats.duplicates = self.duplicates;
        stats
    }

    async fn run(mut self, mut inputs: Inputs, mut results: mpsc::UnboundedReceiver<FromReader>) {
        self.events = Some((inputs.events.clone(), inputs.subscribed.clone()));
        let mut calls = Vec::with_capacity(256);
        let (mut calls_open, mut commands_open) = (true, true);
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next_deadline = self.deadlines.first().map(|&(at, _)| at);
            tokio::select! {
                biased;
                Some(message) = results.recv() => self.on_reader(message).await,
                n = inputs.calls.recv_many(&mut calls, 256), if calls_open => {
                    calls_open = n > 0;
                    let batch = std::mem::replace(&mut calls, Vec::with_capacity(256));
                    self.submit(batch).await;
                }
                command = inputs.commands.recv(), if commands_open => match command {
                    Some(command) => self.on_command(command).await,
                    None => commands_open = false,
                },
                () = sleep_until(next_deadline), if next_deadline.is_some() => self.expire(),
                _ = tick.tick() => {
                    self.check_engine();
                    self.check_broadcasts().await;
                    self.watch_nodes().await;
                }
            }
            self.book.tick();
            let finished =
                self.stopping && self.outstanding.is_empty() && self.broadcasts.is_empty();
            if finished || (!calls_open && !commands_open) {
                break;
            }
        }
        for (_, pending) in self.outstanding.drain() {
            pending.call.reply.send(Err(CallError::ShutDown));
        }
        for (_, reply) in self
            .broadcasts
            .drain()
            .flat_map(|(_, nodes)| nodes)
            .flat_map(|(_, w)| w)
        {
            reply.send(Err(CallError::ShutDown));
        }
        let report = self.report();
        *inputs.final_stats.lock().unwrap_or_else(|e| e.into_inner()) = Some(report);
        let key = self.keys.results(&self.client_id);
        let _ = tokio::time::timeout(
            COMMAND_TIMEOUT,
            redis::cmd("DEL").arg(&key).exec_async(&mut self.conn),
        )
        .await;
        for waiter in self.waiters.drain(..) {
            let _ = waiter.send(());
        }
        tracing::debug!(duplicates = self.duplicates, "remote farm stopped");
    }

    /// Adds `calls` to the calls stream, in one pipeline.
    async fn submit(&mut self, calls: Vec<Call>) {
        let stream = self.keys.calls();
        let mut pipe = redis::pipe();
        let mut sent = Vec::with_capacity(calls.len());
        for call in calls {
            if self.stopping {
                self.settle(call, Err(CallError::ShutDown));
                continue;
            }
            if call.reply.is_closed() {
                continue;
            }
            if call.expired() {
                self.settle(call, Err(CallError::Deadline { ran: false }));
                continue;
            }
            let Some(args) = crate::protocol::args_of_call_frame(&call.frame) else {
                let error = CallError::Engine {
                    message: "batched map items (chunk_size) cannot travel across machines yet"
                        .to_owned(),
                };
                self.settle(call, Err(error));
                continue;
            };
            let opts = call.opts.as_deref();
            let retries = opts.and_then(|o| o.retries).unwrap_or(self.max_retries);
            let deadline = opts.and_then(|o| o.deadline);
            let timeout = opts.and_then(|o| o.timeout).or(self.timeout);
            let at = deadline.map(|deadline| {
                let left = deadline.saturating_duration_since(Instant::now());
                keys::now_ms().saturating_add(left.as_millis() as u64)
            });
            let head = wire::call_head(
                call.id(),
                &self.client_id,
                &self.fmt,
                retries.saturating_add(1),
                at,
                timeout,
                call.method(),
            );
            pipe.cmd("XADD")
                .arg(&stream)
                .arg("*")
                .arg("h")
                .arg(head)
                .arg("b")
                .arg(args);
            sent.push((call, deadline));
        }
        if sent.is_empty() {
            return;
        }
        let mut added = tokio::time::timeout(
            COMMAND_TIMEOUT,
            pipe.query_async::<Vec<String>>(&mut self.conn),
        )
        .await;
        if let Ok(Err(e)) = &added {
            if e.is_io_error() || e.is_connection_dropped() {
                // The shared connection broke (the server closed it, or restarted) and
                // reconnects: try once more. Calls the first try added run twice at
                // worst, and settle once.
                added = tokio::time::timeout(
                    COMMAND_TIMEOUT,
                    pipe.query_async::<Vec<String>>(&mut self.conn),
                )
                .await;
            }
        }
        let entries = match added {
            Ok(Ok(entries)) if entries.len() == sent.len() => entries,
            Ok(Ok(_)) => {
                return self.fail_all(sent, "the engine answered the submission oddly".into())
            }
            Ok(Err(e)) => return self.fail_all(sent, format!("could not submit: {e}")),
            Err(_) => {
                return self.fail_all(sent, format!("could not submit within {COMMAND_TIMEOUT:?}"))
            }
        };
        for ((call, deadline), entry) in sent.into_iter().zip(entries) {
            let id = call.id();
            if let Some(at) = deadline {
                self.deadlines.insert((at, id));
            }
            self.outstanding.insert(
                id,
                Outstanding {
                    call,
                    entry,
                    deadline,
                },
            );
        }
    }

    fn fail_all(&mut self, calls: Vec<(Call, Option<Instant>)>, message: String) {
        tracing::warn!(%message, calls = calls.len(), "engine error");
        for (call, _) in calls {
            let error = CallError::Engine {
                message: message.clone(),
            };
            self.settle(call, Err(error));
        }
    }

    fn settle(&mut self, call: Call, outcome: Result<Bytes, CallError>) {
        match &outcome {
            Ok(_) => self.book.succeeded(0),
            Err(e) => self.book.failed(None, e),
        }
        call.reply.send(outcome);
    }

    fn take(&mut self, id: u64) -> Option<Outstanding> {
        let pending = self.outstanding.remove(&id)?;
        if let Some(at) = pending.deadline {
            self.deadlines.remove(&(at, id));
        }
        Some(pending)
    }

    async fn on_reader(&mut self, message: FromReader) {
        match message {
            FromReader::Result(result) if result.broadcast.is_some() => {
                self.on_broadcast_answer(result);
            }
            FromReader::Result(result) => {
                let Some(pending) = self.take(result.id) else {
                    // A second answer (a node that lost its lease finished too), or one for
                    // a call this caller gave up on.
                    self.duplicates += 1;
                    return;
                };
                let call = pending.call;
                tracing::trace!(call = result.id, node = %result.node, deliveries = result.deliveries, "result");
                let worker = result
                    .ran
                    .map(|ran| WorkerId::remote(&result.node, ran.slot));
                if let (Some(worker), Some((events, subscribed))) = (worker, &self.events) {
                    if subscribed.load(std::sync::atomic::Ordering::Relaxed) {
                        let ok = result.outcome.is_ok();
                        let _ = events.send(crate::Event::CallDone {
                            worker,
                            call: result.id,
                            ok,
                        });
                    }
                }
                let made = call.opts.as_ref().and_then(|o| o.made);
                match (result.outcome, made, result.ran.zip(worker)) {
                    (Ok(body), Some(made), Some((ran, worker))) => {
                        let queued_for = made.elapsed().saturating_sub(ran.ran_for);
                        let info = CallInfo {
                            id: call.id(),
                            worker,
                            pid: ran.pid,
                            attempts: result.deliveries.saturating_sub(1) + ran.attempts,
                            queued_for,
                            ran_for: ran.ran_for,
                        };
                        self.book.succeeded(0);
                        call.reply.send_answer(Ok(Answer {
                            body: Bytes::from(body),
                            info: Some(info),
                        }));
                    }
                    (outcome, _, _) => {
                        let outcome = outcome.map(Bytes::from).map_err(|(kind, message)| {
                            wire::decode_error(&kind, message, call.method(), &result.node)
                        });
                        self.settle(call, outcome);
                    }
                }
            }
            FromReader::Down(message) => {
                if self.down_since.is_none() {
                    tracing::warn!(%message, "engine unreachable");
                    self.down_since = Some((Instant::now(), message));
                }
            }
            FromReader::Up => self.down_since = None,
            FromReader::Lost => {
                // A new server (restarted, or failed over). Calls whose entry it does not
                // have were lost with the old one's data: submit them again. A node still
                // running one answers too; the second answer is dropped.
                // The group first: calls added to a stream without it would wait unread.
                let mut backoff = Backoff::new();
                for _ in 0..5 {
                    match conn::ensure_group(&mut self.conn, &self.keys.calls()).await {
                        Ok(()) => break,
                        Err(e) => tracing::warn!(error = %e, "cannot re-create the calls stream"),
                    }
                    backoff.wait().await;
                }
                let mut pipe = redis::pipe();
                let ids: Vec<u64> = self.outstanding.keys().copied().collect();
                for id in &ids {
                    let entry = &self.outstanding[id].entry;
                    pipe.cmd("XRANGE")
                        .arg(self.keys.calls())
                        .arg(entry)
                        .arg(entry);
                }
                let present: Vec<Vec<redis::Value>> = if ids.is_empty() {
                    Vec::new()
                } else {
                    match tokio::time::timeout(COMMAND_TIMEOUT, pipe.query_async(&mut self.conn))
                        .await
                    {
                        Ok(Ok(present)) => present,
                        // Cannot tell: submit them all again (at least once, not lost).
                        _ => vec![Vec::new(); ids.len()],
                    }
                };
                let lost: Vec<Call> = ids
                    .iter()
                    .zip(present)
                    .filter(|(_, found)| found.is_empty())
                    .filter_map(|(id, _)| self.take(*id).map(|p| p.call))
                    .collect();
                tracing::warn!(
                    lost = lost.len(),
                    "a new engine server; submitting the calls it lost again"
                );
                self.submit(lost).await;
            }
        }
    }

    /// Fails the calls outstanding once the engine has been unreachable too long.
    fn check_engine(&mut self) {
        let Some((since, message)) = &self.down_since else {
            return;
        };
        if since.elapsed() < self.engine_timeout || self.outstanding.is_empty() {
            return;
        }
        let message = format!(
            "the engine has been unreachable for {:?}: {message}",
            since.elapsed()
        );
        let ids: Vec<u64> = self.outstanding.keys().copied().collect();
        for id in ids {
            if let Some(pending) = self.take(id) {
                self.forget_entry(pending.entry);
                let error = CallError::Engine {
                    message: message.clone(),
                };
                self.settle(pending.call, Err(error));
            }
        }
    }

    /// Settles calls whose deadline passed (a node that takes one later does not run it).
    fn expire(&mut self) {
        let now = Instant::now();
        while let Some(&(at, id)) = self.deadlines.first() {
            if at > now {
                break;
            }
            self.deadlines.pop_first();
            if let Some(pending) = self.outstanding.remove(&id) {
                self.forget_entry(pending.entry);
                self.settle(pending.call, Err(CallError::Deadline { ran: true }));
            }
        }
    }

    /// Deletes a cancelled call's entry (so a node that has not taken it never does), and
    /// asks the node running it, if one is, to stop it (best effort).
    fn stop_entry(&mut self, entry: String) {
        let mut conn = self.conn.clone();
        let keys = self.keys.clone();
        tokio::spawn(async move {
            let stop = async {
                let calls = keys.calls();
                redis::cmd("XDEL")
                    .arg(&calls)
                    .arg(&entry)
                    .exec_async(&mut conn)
                    .await?;
                let held: redis::streams::StreamPendingCountReply = redis::cmd("XPENDING")
                    .arg(&calls)
                    .arg(super::keys::GROUP)
                    .arg(&entry)
                    .arg(&entry)
                    .arg(1)
                    .query_async(&mut conn)
                    .await?;
                if let Some(held) = held.ids.first() {
                    redis::cmd("XADD")
                        .arg(keys.inbox(&held.consumer))
                        .arg("*")
                        .arg("h")
                        .arg(wire::cancel_head(&entry))
                        .exec_async(&mut conn)
                        .await?;
                }
                Ok::<_, redis::RedisError>(())
            };
            let _ = tokio::time::timeout(COMMAND_TIMEOUT, stop).await;
        });
    }

    /// Deletes a call's entry, so a node that has not taken it never does (best effort).
    fn forget_entry(&mut self, entry: String) {
        let mut conn = self.conn.clone();
        let stream = self.keys.calls();
        tokio::spawn(async move {
            let mut deleted = redis::cmd("XDEL");
            deleted.arg(stream).arg(entry);
            let _ = tokio::time::timeout(COMMAND_TIMEOUT, deleted.exec_async(&mut conn)).await;
        });
    }

    async fn on_command(&mut self, command: Command) {
        match command {
            Command::Cancel { call, why } => {
                if let Some(pending) = self.take(call) {
                    self.stop_entry(pending.entry);
                    let error = match why {
                        CancelWhy::Cancelled => CallError::Cancelled,
                        CancelWhy::Expired => CallError::Deadline { ran: true },
                    };
                    self.settle(pending.call, Err(error));
                }
            }
            Command::Broadcast { frame, replies } => {
                let sent = self.broadcast(&frame).await;
                let _ = replies.send(sent);
            }
            Command::Status(tx) => {
                tokio::spawn(status(self.conn.clone(), self.keys.clone(), tx));
            }
            Command::Stats(tx) => {
                let _ = tx.send(self.report());
            }
            Command::Ready(tx) => {
                tokio::spawn(wait_for_a_node(self.conn.clone(), self.keys.clone(), tx));
            }
            Command::Shutdown(tx) => {
                self.stopping = true;
                self.waiters.push(tx);
            }
            Command::Kill(tx) => {
                self.stopping = true;
                let ids: Vec<u64> = self.outstanding.keys().copied().collect();
                for id in ids {
                    if let Some(pending) = self.take(id) {
                        self.forget_entry(pending.entry);
                        self.settle(pending.call, Err(CallError::ShutDown));
                    }
                }
                self.waiters.push(tx);
            }
            Command::Sweep | Command::Nudge => {}
        }
    }
}

impl Caller {
    /// Sends a broadcast to the inbox of every live node; one reply per worker they have.
    async fn broadcast(
        &mut self,
        frame: &[u8],
    ) -> Result<crate::farm::BroadcastReceivers, CallError> {
        if self.stopping {
            return Err(CallError::ShutDown);
        }
        let id = crate::protocol::id_of_call_frame(frame);
        let method = crate::protocol::method_of_call_frame(frame).to_owned();
        let args = crate::protocol::args_of_call_frame(frame).ok_or_else(|| CallError::Engine {
            message: "a malformed broadcast frame".to_owned(),
        })?;
        let nodes =
            live_nodes(&mut self.conn, &self.keys)
                .await
                .map_err(|e| CallError::Engine {
                    message: format!("cannot list the nodes: {e}"),
                })?;
        if nodes.is_empty() {
            return Err(CallError::WorkerStart {
                message: "no node is serving the farm".to_owned(),
            });
        }
        let mut pipe = redis::pipe();
        let head = wire::call_head(id, &self.client_id, &self.fmt, 1, None, None, &method);
        for (node, _) in &nodes {
            pipe.cmd("XADD")
                .arg(self.keys.inbox(node))
                .arg("*")
                .arg("h")
                .arg(&head)
                .arg("b")
                .arg(args)
                .ignore();
        }
        let sent = tokio::time::timeout(COMMAND_TIMEOUT, pipe.exec_async(&mut self.conn)).await;
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(CallError::Engine {
                    message: format!("could not send the broadcast: {e}"),
                })
            }
            Err(_) => {
                return Err(CallError::Engine {
                    message: "could not send the broadcast: the engine stopped answering"
                        .to_owned(),
                })
            }
        }
        let mut receivers = Vec::new();
        let mut waiting = HashMap::new();
        for (node, workers) in nodes {
            let mut replies = Vec::with_capacity(workers);
            for slot in 0..workers {
                let worker = WorkerId::remote(&node, slot);
                let (reply, rx) = Reply::new(None);
                receivers.push((worker, rx));
                replies.push((worker, reply));
            }
            waiting.insert(node, replies);
        }
        self.broadcasts.insert(id, waiting);
        Ok(receivers)
    }

    /// One node answered a broadcast: each of its workers' outcome, by slot.
    fn on_broadcast_answer(&mut self, result: ResultEntry) {
        let Some(nodes) = self.broadcasts.get_mut(&result.id) else {
            self.duplicates += 1;
            return;
        };
        let Some(replies) = nodes.remove(&result.node) else {
            self.duplicates += 1;
            return;
        };
        if nodes.is_empty() {
            self.broadcasts.remove(&result.id);
        }
        let outcomes = result
            .broadcast
            .as_deref()
            .and_then(wire::decode_broadcast)
            .unwrap_or_default();
        let mut by_slot: HashMap<usize, wire::WorkerOutcome> = outcomes.into_iter().collect();
        for (worker, reply) in replies {
            let outcome = match by_slot.remove(&worker.slot()) {
                Some(Ok(body)) => Ok(Bytes::from(body)),
                Some(Err((kind, message))) => {
                    Err(wire::decode_error(&kind, message, "", &result.node))
                }
                None => Err(CallError::NodeLost {
                    node: result.node.clone(),
                    message: "the node answered the broadcast without this worker".to_owned(),
                }),
            };
            reply.send(outcome);
        }
    }

    /// Reports nodes joining and leaving, once a second, once someone listens.
    async fn watch_nodes(&mut self) {
        let Some((events, subscribed)) = &self.events else {
            return;
        };
        let due = self
            .nodes_checked
            .map_or(true, |at| at.elapsed() >= NODE_WATCH);
        if !due || !subscribed.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        self.nodes_checked = Some(Instant::now());
        let Ok(Ok(live)) =
            tokio::time::timeout(COMMAND_TIMEOUT, live_nodes(&mut self.conn, &self.keys)).await
        else {
            return;
        };
        for (node, workers) in &live {
            if !self.nodes_seen.contains(node) {
                let _ = events.send(crate::Event::NodeJoined {
                    node: node.clone(),
                    workers: *workers,
                });
            }
        }
        let now: std::collections::HashSet<String> = live.into_iter().map(|(n, _)| n).collect();
        for node in self.nodes_seen.difference(&now) {
            let _ = events.send(crate::Event::NodeLeft { node: node.clone() });
        }
        self.nodes_seen = now;
    }

    /// Fails the workers of nodes that stopped beating while a broadcast waited for them.
    async fn check_broadcasts(&mut self) {
        if self.broadcasts.is_empty() {
            return;
        }
        let mut names: Vec<String> = self
            .broadcasts
            .values()
            .flat_map(|nodes| nodes.keys().cloned())
            .collect();
        names.sort();
        names.dedup();
        let mut lost = Vec::new();
        for node in names {
            let alive = redis::cmd("EXISTS")
                .arg(self.keys.node(&node))
                .query_async::<u64>(&mut self.conn)
                .await;
            if matches!(alive, Ok(0)) {
                lost.push(node);
            }
        }
        for node in lost {
            for nodes in self.broadcasts.values_mut() {
                for (_, reply) in nodes.remove(&node).into_iter().flatten() {
                    reply.send(Err(CallError::NodeLost {
                        node: node.clone(),
                        message: "the node stopped beating while the broadcast waited for it"
                            .to_owned(),
                    }));
                }
            }
        }
        self.broadcasts.retain(|_, nodes| !nodes.is_empty());
    }
}

/// Answers `status()`: the live nodes, what each holds, and the calls not yet taken.
async fn status(mut conn: ConnectionManager, keys: Keys, tx: oneshot::Sender<Status>) {
    let asked = async {
        let nodes = live_nodes(&mut conn, &keys).await?;
        let pending: redis::streams::StreamPendingReply = redis::cmd("XPENDING")
            .arg(keys.calls())
            .arg(super::keys::GROUP)
            .query_async(&mut conn)
            .await?;
        let holding: HashMap<String, usize> = match pending {
            redis::streams::StreamPendingReply::Data(data) => data
                .consumers
                .into_iter()
                .map(|c| (c.name, c.pending))
                .collect(),
            _ => HashMap::new(),
        };
        let groups: Vec<HashMap<String, redis::Value>> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(keys.calls())
            .query_async(&mut conn)
            .await?;
        let queued = groups
            .iter()
            .find(|g| {
                g.get("name").is_some_and(|n| {
                    redis::from_redis_value_ref::<String>(n).ok().as_deref()
                        == Some(super::keys::GROUP)
                })
            })
            .and_then(|g| g.get("lag"))
            .and_then(|lag| redis::from_redis_value_ref::<usize>(lag).ok())
            .unwrap_or(0);
        let nodes = nodes
            .into_iter()
            .map(|(name, workers)| {
                let holding = holding.get(&name).copied().unwrap_or(0);
                crate::NodeStatus {
                    name,
                    workers,
                    holding,
                }
            })
            .collect();
        Ok::<_, redis::RedisError>(Status {
            nodes,
            queued,
            ..Status::default()
        })
    };
    match tokio::time::timeout(COMMAND_TIMEOUT, asked).await {
        Ok(Ok(status)) => {
            let _ = tx.send(status);
        }
        // The engine cannot say: an empty status (no node known to be serving).
        _ => {
            let _ = tx.send(Status::default());
        }
    }
}

/// The nodes whose liveness key is still there (it expires with their lease), with their
/// worker counts; members that beat in the last 30 s are the candidates.
async fn live_nodes(
    conn: &mut ConnectionManager,
    keys: &Keys,
) -> redis::RedisResult<Vec<(String, usize)>> {
    let since = keys::now_ms().saturating_sub(30_000);
    let names: Vec<String> = redis::cmd("ZRANGEBYSCORE")
        .arg(keys.nodes())
        .arg(since)
        .arg("+inf")
        .query_async(conn)
        .await?;
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let mut get = redis::cmd("MGET");
    for name in &names {
        get.arg(keys.node(name));
    }
    let beats: Vec<Option<String>> = get.query_async(conn).await?;
    Ok(names
        .into_iter()
        .zip(beats)
        .filter_map(|(name, beat)| Some((name, wire::Beat::parse(&beat?)?.workers)))
        .collect())
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Answers `ready()`: once a node's liveness key exists (or the caller stops waiting).
async fn wait_for_a_node(
    mut conn: ConnectionManager,
    keys: Keys,
    tx: oneshot::Sender<Result<(), CallError>>,
) {
    loop {
        if tx.is_closed() {
            return;
        }
        match live_nodes(&mut conn, &keys).await {
            Ok(nodes) if !nodes.is_empty() => {
                let _ = tx.send(Ok(()));
                return;
            }
            Ok(_) => {}
            Err(e) if e.is_unrecoverable_error() => {
                let _ = tx.send(Err(CallError::Engine {
                    message: e.to_string(),
                }));
                return;
            }
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads this caller's results stream on a connection of its own, forever, until the
/// caller is gone; rebuilds the connection when it breaks.
async fn read_results(
    client: Client,
    mut conn: ConnectionManager,
    key: String,
    connect_timeout: Duration,
    mut run: Option<String>,
    tx: mpsc::UnboundedSender<FromReader>,
) {
    let mut last = "0-0".to_owned();
    let mut backoff = Backoff::new();
    let mut reader = None;
    let mut down = false;
    while !tx.is_closed() {
        let blocking = match reader.take() {
            Some(c) => c,
            None => match conn::blocking(&client, connect_timeout).await {
                Ok(c) => c,
                Err(e) => {
                    down = true;
                    let _ = tx.send(FromReader::Down(e.to_string()));
                    backoff.wait().await;
                    continue;
                }
            },
        };
        let mut blocking = blocking;
        let mut xread = redis::cmd("XREAD");
        xread
            .arg("COUNT")
            .arg(512)
            .arg("BLOCK")
            .arg(RESULT_BLOCK.as_millis() as u64)
            .arg("STREAMS")
            .arg(&key)
            .arg(&last);
        let read = xread.query_async::<redis::Value>(&mut blocking);
        match tokio::time::timeout(RESULT_BLOCK + COMMAND_TIMEOUT, read).await {
            Ok(Ok(reply)) => {
                let mut seen = false;
                for entry in wire::read_reply(reply) {
                    last.clone_from(&entry.id);
                    seen = true;
                    let id = entry.id.clone();
                    match ResultEntry::parse(entry) {
                        Some(result) => {
                            let _ = tx.send(FromReader::Result(result));
                        }
                        None => tracing::warn!(entry = %id, "malformed result entry"),
                    }
                }
                if seen {
                    // Read: let them go, whole blocks at a time (deleting entries one by one
                    // costs the engine some microseconds each).
                    let mut trimmed = redis::cmd("XTRIM");
                    trimmed.arg(&key).arg("MINID").arg("~").arg(&last);
                    let _ =
                        tokio::time::timeout(COMMAND_TIMEOUT, trimmed.exec_async(&mut conn)).await;
                }
                if down {
                    // Asked on this fresh connection: the shared one may still hold a
                    // socket to the old server and fail its first command.
                    match conn::run_id(&mut blocking).await {
                        Some(now) => {
                            down = false;
                            backoff.reset();
                            if run.as_ref().is_some_and(|before| *before != now) {
                                // A new server: its results stream starts from scratch.
                                last = "0-0".to_owned();
                                let _ = tx.send(FromReader::Lost);
                            }
                            run = Some(now);
                            let _ = tx.send(FromReader::Up);
                        }
                        None => {
                            // The server will not say (an ACL without INFO): it may be
                            // a new one, so check as if it were (calls whose entries
                            // are gone are submitted again; results read twice are
                            // dropped as duplicates).
                            down = false;
                            backoff.reset();
                            last = "0-0".to_owned();
                            let _ = tx.send(FromReader::Lost);
                            let _ = tx.send(FromReader::Up);
                        }
                    }
                }
                reader = Some(blocking);
            }
            Ok(Err(e)) => {
                down = true;
                let _ = tx.send(FromReader::Down(e.to_string()));
                backoff.wait().await;
            }
            Err(_) => {
                down = true;
                let _ = tx.send(FromReader::Down("the engine stopped answering".to_owned()));
                backoff.wait().await;
            }
        }
    }
}
