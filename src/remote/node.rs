//! A node: a local farm of the user's worker binary that pulls calls from the engine while
//! it has room, holds a lease on each one it runs, and posts the results.

use super::conn::{self, Backoff, COMMAND_TIMEOUT};
use super::keys::{self, Keys, GROUP};
use super::wire::{self, Answered, Beat, CallEntry, Entry, Presence, RanOn, WIRE_VERSION};
use crate::error::{CallError, CreateError};
use crate::options::FarmOptions;
use crate::serializer::{Json, Serializer};
use crate::Farm;
use redis::aio::{ConnectionManager, MultiplexedConnection};
use redis::streams::{StreamId, StreamPendingReply, StreamReadReply};
use redis::Client;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Renews the leases this node still holds: per entry, only if the group says this node
/// owns it, resets its idle time (`XCLAIM … JUSTID` does not count a delivery). Returns the
/// entries still owned, so the node learns which ones it lost.
/// `KEYS[1]` the calls stream; `ARGV[1]` the group, `ARGV[2]` this node, then the entries.
const RENEW: &str = r"
local owned = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    local claimed = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    if #claimed > 0 then
      owned[#owned + 1] = ARGV[i]
    end
  end
end
return owned
";

/// Acknowledges answered entries and lets the stream go of them: trimmed away (cheap: whole
/// blocks at a time) up to the oldest entry still pending or not yet read, and deleted one
/// by one (`XDEL`, some microseconds each) only while such an entry has held the trimming
/// back for longer than `ARGV[2]` ms, so a long call does not make the stream grow.
/// `KEYS[1]` the calls stream; `ARGV[1]` the group, `ARGV[2]` that hold-back, then the
/// entries.
const SETTLE: &str = r"
redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 3))
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local bound_ms, bound_seq
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local name, last
  for i = 1, #g, 2 do
    if g[i] == 'name' then name = g[i + 1] elseif g[i] == 'last-delivered-id' then last = g[i + 1] end
  end
  if name == ARGV[1] and last then
    bound_ms, bound_seq = parse(last)
    bound_seq = bound_seq + 1
  end
end
if not bound_ms then
  return 0
end
local p = redis.call('XPENDING', KEYS[1], ARGV[1])
if p[1] > 0 then
  local ms, seq = parse(p[2])
  if ms < bound_ms or (ms == bound_ms and seq < bound_seq) then
    bound_ms, bound_seq = ms, seq
  end
end
redis.call('XTRIM', KEYS[1], 'MINID', '~', string.format('%d-%d', bound_ms, bound_seq))
local now = redis.call('TIME')
if bound_ms < tonumber(now[1]) * 1000 - tonumber(ARGV[2]) then
  redis.call('XDEL', KEYS[1], unpack(ARGV, 3))
end
return 1
";

/// How long the oldest unfinished call may hold back the trimming of the calls stream
/// before the calls answered after it are deleted one by one.
const TRIM_HOLD_BACK: Duration = Duration::from_secs(5);

/// Forgets a node that is gone (its liveness key expired) once nothing is pending for it,
/// atomically, so a call it takes meanwhile is never erased with it. `KEYS`: the calls
/// stream, the members set, the node's liveness key, its inbox; `ARGV`: the group, the node.
const FORGET: &str = r"
if redis.call('EXISTS', KEYS[3]) == 1 then
  return 0
end
local p = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('DEL', KEYS[4])
if #p > 0 then
  return 0
end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
";

/// How long a node's liveness key lives without a beat; it beats four times as often.
/// Separate from the lease on a call: a node that stops beating loses its calls to a peer
/// within about this long, however long the lease (a live node's call is never taken).
const LIVENESS: Duration = Duration::from_secs(2);

/// Claims, for this node, the calls pending for nodes found dead: pairs of a node and how it
/// was found, `k` (its liveness key expired: checked again here, so a node that beat
/// meanwhile keeps its calls) or `c` (its connection to the engine is gone). `KEYS[1]` the
/// calls stream; `ARGV[1]` the group, `ARGV[2]` this node, `ARGV[3]` the liveness keys'
/// prefix, `ARGV[4]` the most to take, `ARGV[5]` the prefix of the lists of nodes that
/// held each call, `ARGV[6]` their time to live (ms), then the pairs. Returns entry ids and
/// their delivery counts (after this claim), alternately.
const CLAIM_DEAD: &str = r"
local out = {}
local most = tonumber(ARGV[4])
for i = 7, #ARGV, 2 do
  local owner, how = ARGV[i], ARGV[i + 1]
  if owner ~= ARGV[2] and (how == 'c' or redis.call('EXISTS', ARGV[3] .. owner) == 0) then
    local left = most - #out / 2
    if left <= 0 then
      break
    end
    for _, p in ipairs(redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', left, owner)) do
      local claimed = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, p[1], 'RETRYCOUNT', p[4] + 1, 'JUSTID')
      if #claimed > 0 then
        redis.call('RPUSH', ARGV[5] .. p[1], owner)
        redis.call('PEXPIRE', ARGV[5] .. p[1], ARGV[6])
        out[#out + 1] = p[1]
        out[#out + 1] = p[4] + 1
      end
    end
  end
end
return out
";

/// Claims, for this node, other nodes' calls whose lease ran out (idle for `ARGV[3]` ms:
/// not renewed),
/// at most `ARGV[4]`, and notes their owner in each call's list of the nodes that held it
/// (prefix `ARGV[5]`, time to live `ARGV[6]` ms). An entry deleted meanwhile is not claimed
/// (`XCLAIM` drops it from the pending list). `KEYS[1]` the calls stream; `ARGV[1]` the
/// group, `ARGV[2]` this node. Returns entry ids and delivery counts, alternately.
const CLAIM_IDLE: &str = r"
local out = {}
for _, p in ipairs(redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', ARGV[3], '-', '+', ARGV[4])) do
  local claimed = {}
  if p[2] ~= ARGV[2] then
    claimed = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], p[1], 'RETRYCOUNT', p[4] + 1, 'JUSTID')
  end
  if #claimed > 0 then
    redis.call('RPUSH', ARGV[5] .. p[1], p[2])
    redis.call('PEXPIRE', ARGV[5] .. p[1], ARGV[6])
    out[#out + 1] = p[1]
    out[#out + 1] = p[4] + 1
  end
end
return out
";

/// How often a node with room looks for dead nodes' calls.
const DEAD_CHECK: Duration = Duration::from_millis(150);
/// How long a node's connection must stay gone before it counts as dead: longer than a
/// beat, so a node that reconnected has re-announced itself by then.
const GONE_FOR: Duration = Duration::from_millis(300);

/// Most answers posted in one pipeline.
const POST_BATCH: usize = 256;

/// How much work a node may hold beyond one call per worker: what its workers finish in
/// this long at their recent pace. Calls of 5 ms or longer are therefore held one per
/// worker (a node claims only what it can start); noop-sized calls are held by the dozen,
/// so reads and posts carry many calls each.
const PREFETCH_HORIZON: Duration = Duration::from_millis(10);
/// The most calls a node holds per worker, whatever their pace.
const MAX_HELD_PER_WORKER: usize = 64;

/// A node's recent pace (calls answered per second), which sets how many it holds.
struct Pace {
    at: Instant,
    answered: u64,
    per_s: f64,
}

impl Pace {
    fn new() -> Self {
        Pace {
            at: Instant::now(),
            answered: 0,
            per_s: 0.0,
        }
    }

    /// Calls to hold, given the count answered so far: one per worker, plus what they
    /// answer within [`PREFETCH_HORIZON`] at the pace of the last tenths of a second.
    fn capacity(&mut self, workers: usize, answered: u64) -> usize {
        let elapsed = self.at.elapsed();
        if elapsed >= Duration::from_millis(100) {
            let now = (answered - self.answered) as f64 / elapsed.as_secs_f64();
            self.per_s = (self.per_s + now) / 2.0;
            self.at = Instant::now();
            self.answered = answered;
        }
        let extra = (self.per_s * PREFETCH_HORIZON.as_secs_f64()) as usize;
        workers.max(1) + extra.min(workers.max(1) * (MAX_HELD_PER_WORKER - 1))
    }
}

/// A call's outcome on its way to the engine.
struct Answer {
    entry: String,
    who: Option<(String, u64)>,
    deliveries: u32,
    outcome: Result<Vec<u8>, CallError>,
    ran: Option<RanOn>,
}

enum ToPoster {
    Answer(Answer),
    /// Answers once everything sent before it is posted.
    Flush(oneshot::Sender<()>),
}

/// Settings of a [`Node`].
#[derive(Debug, Clone)]
pub struct NodeOptions<S = Json> {
    url: String,
    farm: String,
    options: FarmOptions<S>,
    lease: Duration,
    block: Duration,
    max_in_flight: Option<usize>,
    connect_timeout: Duration,
    result_ttl: Duration,
}

impl<S: Serializer> NodeOptions<S> {
    /// A node of farm `farm` on the Redis server at `url`, running its calls on a local farm
    /// made with `options` (the worker binary, its count and every local policy). The
    /// serializer in `options` must be the callers'.
    pub fn new(url: impl Into<String>, farm: impl Into<String>, options: FarmOptions<S>) -> Self {
        NodeOptions {
            url: url.into(),
            farm: farm.into(),
            options,
            lease: Duration::from_secs(10),
            block: Duration::from_millis(500),
            max_in_flight: None,
            connect_timeout: Duration::from_secs(5),
            result_ttl: Duration::from_secs(3600),
        }
    }

    /// How long a call this node took stays its own without a renewal (renewed every third
    /// of it); a node silent that long loses its calls to other nodes. Default 10 s, at
    /// least 300 ms.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Calls this node holds at once (running or waiting for a local worker), fixed.
    /// Default: one per worker, plus what its workers answer within 10 ms at their recent
    /// pace (so calls of 5 ms or more are held one per worker: a node claims only what it
    /// can start; noop-sized calls by the dozen, so each read and post carries many).
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = Some(n);
        self
    }

    /// Longest [`Node::start`] waits for the engine. Default 5 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }
}

/// A running node. [`stop`](Node::stop) it to leave the farm gracefully; dropped, it keeps
/// running until the runtime ends.
#[derive(Debug)]
pub struct Node {
    id: String,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Node {
    /// Starts the local farm, waits until its workers are online, registers with the
    /// engine and starts pulling calls.
    ///
    /// # Errors
    ///
    /// [`CreateError::Engine`] when the engine cannot be reached within the connect timeout;
    /// the local farm's own `CreateError`s; [`CreateError::WorkerStart`] when its workers
    /// cannot start (a node that could not run calls would only fail them).
    pub async fn start<S: Serializer>(options: NodeOptions<S>) -> Result<Node, CreateError> {
        if options.lease < Duration::from_millis(300) {
            return Err(CreateError::InvalidOption {
                name: "lease",
                reason: "must be at least 300 ms",
            });
        }
        let client = conn::client(&options.url)?;
        let mut manager = conn::manager(&client, options.connect_timeout).await?;
        let keys = Keys::new(&options.farm);
        conn::ensure_group(&mut manager, &keys.calls())
            .await
            .map_err(|e| CreateError::Engine {
                message: format!("cannot create the calls stream: {e}"),
            })?;
        let workers = options.options.settings.workers;
        let farm = Farm::create(options.options)?;
        farm.ready().await.map_err(|e| CreateError::WorkerStart {
            message: e.to_string(),
        })?;
        let id = keys::unique_name();
        let state = Arc::new(Shared {
            owned: Mutex::new(HashMap::new()),
            done: Notify::new(),
            answered: AtomicU64::new(0),
            presence: Mutex::new(None),
        });
        let (answers, to_post) = mpsc::unbounded_channel();
        let node = Puller {
            id: id.clone(),
            keys,
            client,
            conn: manager,
            farm,
            state,
            max_in_flight: options.max_in_flight.map(|n| n.max(1)),
            workers,
            answers,
            lease: options.lease,
            block: options.block,
            connect_timeout: options.connect_timeout,
            result_ttl: options.result_ttl,
        };
        let heart = node
            .connect_heart()
            .await
            .map_err(|e| CreateError::Engine {
                message: format!("cannot register the node: {e}"),
            })?;
        let (stop, stopped) = watch::channel(false);
        let span = tracing::info_span!("node", id = %id);
        let task = tokio::spawn(tracing::Instrument::instrument(
            node.run(stopped, to_post, heart),
            span,
        ));
        Ok(Node { id, stop, task })
    }

    /// This node's name in the farm (`host-pid-n`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Stops taking calls, finishes the ones it holds and posts their results, leaves the
    /// farm and shuts its local farm down.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Resolves once a stop is asked for; never if the [`Node`] handle was dropped without one
/// (a dropped node keeps running).
async fn stop_requested(stopped: &mut watch::Receiver<bool>) {
    loop {
        if *stopped.borrow_and_update() {
            return;
        }
        if stopped.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// What the puller and the calls it runs share.
struct Shared {
    /// Entries this node runs → the task running each.
    owned: Mutex<HashMap<String, tokio::task::AbortHandle>>,
    /// A call finished: there is room again.
    done: Notify,
    /// Calls answered so far: the node's pace, which sets how many it holds.
    answered: AtomicU64,
    /// The engine's id for this node's heartbeat connection, and when it opened: peers take
    /// this node for dead once that connection is gone.
    presence: Mutex<Option<Presence>>,
}

/// Nodes whose heartbeat connection was missing from the engine, with that connection and
/// since when.
#[derive(Default)]
struct Suspects(HashMap<String, (u64, Instant)>);

/// How a node was found dead.
#[derive(Debug, Clone, Copy)]
enum Death {
    /// Its liveness key expired.
    Expired,
    /// Its heartbeat connection is gone.
    Disconnected,
}

impl Death {
    fn code(self) -> &'static str {
        match self {
            Death::Expired => "k",
            Death::Disconnected => "c",
        }
    }
}

impl Shared {
    fn presence(&self) -> std::sync::MutexGuard<'_, Option<Presence>> {
        self.presence.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn owned(&self) -> std::sync::MutexGuard<'_, HashMap<String, tokio::task::AbortHandle>> {
        self.owned.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct Puller<S: Serializer> {
    id: String,
    keys: Keys,
    client: Client,
    conn: ConnectionManager,
    farm: Farm<S>,
    state: Arc<Shared>,
    /// The user's fixed bound on calls held, if any; else [`Pace`] sets it.
    max_in_flight: Option<usize>,
    /// Outcomes on their way to the engine, posted in batches.
    answers: mpsc::UnboundedSender<ToPoster>,
    /// Its local workers: what a broadcast reaches here (the liveness key says it).
    workers: usize,
    lease: Duration,
    block: Duration,
    connect_timeout: Duration,
    result_ttl: Duration,
}

impl<S: Serializer> Puller<S> {
    async fn run(
        self,
        mut stopped: watch::Receiver<bool>,
        to_post: mpsc::UnboundedReceiver<ToPoster>,
        heart: MultiplexedConnection,
    ) {
        let this = Arc::new(self);
        let poster = tokio::spawn(this.clone().post_answers(to_post));
        let mut pace = Pace::new();
        let beats = tokio::spawn(this.clone().renew_forever());
        let heart = tokio::spawn(this.clone().beat_forever(heart));
        let watcher = tokio::spawn(this.clone().watch_dead(stopped.clone()));
        let inbox = tokio::spawn(this.clone().serve_inbox());
        let mut reader: Option<MultiplexedConnection> = None;
        let mut backoff = Backoff::new();
        let mut last_orphan_check = Instant::now() - this.lease;
        while !*stopped.borrow() {
            // Listening before looking: a call that finishes in between still wakes us.
            let done = this.state.done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            let capacity = match this.max_in_flight {
                Some(n) => n,
                None => pace.capacity(this.workers, this.state.answered.load(Ordering::Relaxed)),
            };
            let free = capacity.saturating_sub(this.state.owned().len());
            if free == 0 {
                tokio::select! {
                    () = done => {}
                    () = stop_requested(&mut stopped) => {}
                }
                continue;
            }
            if last_orphan_check.elapsed() >= this.lease / 4 {
                last_orphan_check = Instant::now();
                match this.claim_orphans(free).await {
                    Ok(0) => {}
                    Ok(_) => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot claim orphaned calls");
                        if conn::is_nogroup(&e) {
                            let mut conn = this.conn.clone();
                            let _ = conn::ensure_group(&mut conn, &this.keys.calls()).await;
                        }
                        backoff.wait().await;
                        continue;
                    }
                }
            }
            let mut blocking = match reader.take() {
                Some(c) => c,
                None => match conn::blocking(&this.client, this.connect_timeout).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "engine unreachable");
                        backoff.wait().await;
                        continue;
                    }
                },
            };
            let mut xread = redis::cmd("XREADGROUP");
            xread
                .arg("GROUP")
                .arg(GROUP)
                .arg(&this.id)
                .arg("COUNT")
                .arg(free)
                .arg("BLOCK")
                .arg(this.block.as_millis() as u64)
                .arg("STREAMS")
                .arg(this.keys.calls())
                .arg(">");
            let read = xread.query_async::<redis::Value>(&mut blocking);
            // Not raced against a stop: a read cut short would leave the calls it took
            // pending here until the lease ran out, and cost them a delivery. A stop waits
            // for the read (at most `block`), and the calls it returns run.
            let outcome = tokio::time::timeout(this.block + COMMAND_TIMEOUT, read).await;
            match outcome {
                Ok(Ok(reply)) => {
                    backoff.reset();
                    reader = Some(blocking);
                    for entry in wire::read_reply(reply) {
                        this.take_call(entry, 1).await;
                    }
                }
                Ok(Err(e)) if conn::is_nogroup(&e) => {
                    tracing::warn!("the calls stream is gone (engine restarted?); re-creating it");
                    let mut conn = this.conn.clone();
                    if let Err(e) = conn::ensure_group(&mut conn, &this.keys.calls()).await {
                        tracing::warn!(error = %e, "cannot re-create the calls stream");
                        backoff.wait().await;
                    }
                    reader = Some(blocking);
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot read calls");
                    backoff.wait().await;
                }
                Err(_) => {
                    tracing::warn!("the engine stopped answering");
                    backoff.wait().await;
                }
            }
        }
        // Graceful stop: finish what this node holds, then leave.
        loop {
            let notified = this.state.done.notified();
            if this.state.owned().is_empty() {
                break;
            }
            notified.await;
        }
        let (flushed, flush) = oneshot::channel();
        if this.answers.send(ToPoster::Flush(flushed)).is_ok() {
            let _ = flush.await;
        }
        poster.abort();
        watcher.abort();
        beats.abort();
        heart.abort();
        inbox.abort();
        this.leave().await;
        this.farm.shutdown().await;
    }

    /// Every [`DEAD_CHECK`], while it has room for a call per worker and is not stopping:
    /// claims the calls of dead nodes. Apart from the read loop, whose reads block for up
    /// to half a second when the stream is empty.
    async fn watch_dead(self: Arc<Self>, stopped: watch::Receiver<bool>) {
        let mut suspects = Suspects::default();
        let room = self.max_in_flight.unwrap_or(self.workers).max(1);
        loop {
            tokio::time::sleep(DEAD_CHECK).await;
            if *stopped.borrow() {
                return;
            }
            let free = room.saturating_sub(self.state.owned().len());
            if free == 0 {
                continue;
            }
            if let Err(e) = self.claim_from_dead(free, &mut suspects).await {
                tracing::debug!(error = %e, "cannot claim dead nodes' calls");
            }
        }
    }

    /// Claims calls of dead nodes (see [`Self::dead_nodes`]): how many it took.
    async fn claim_from_dead(
        self: &Arc<Self>,
        free: usize,
        suspects: &mut Suspects,
    ) -> redis::RedisResult<usize> {
        let dead = self.dead_nodes(suspects).await?;
        if dead.is_empty() {
            return Ok(0);
        }
        let mut conn = self.conn.clone();
        let calls = self.keys.calls();
        let script = redis::Script::new(CLAIM_DEAD);
        let mut invocation = script.key(&calls);
        invocation
            .arg(GROUP)
            .arg(&self.id)
            .arg(self.keys.node(""))
            .arg(free)
            .arg(self.keys.tried(""))
            .arg(self.result_ttl.as_millis() as u64);
        for (node, how) in &dead {
            invocation.arg(node).arg(how.code());
        }
        let claimed: Vec<String> = invocation.invoke_async(&mut conn).await?;
        for (node, how) in &dead {
            tracing::debug!(node, ?how, "a dead node's calls are claimed");
        }
        self.take_claimed(claimed, "took over a call of a dead node")
            .await
    }

    /// Claims calls whose lease ran out while their node still beats (it cannot renew, or
    /// lost track of them): how many it took.
    async fn claim_orphans(self: &Arc<Self>, free: usize) -> redis::RedisResult<usize> {
        let mut conn = self.conn.clone();
        let claimed: Vec<String> = redis::Script::new(CLAIM_IDLE)
            .key(self.keys.calls())
            .arg(GROUP)
            .arg(&self.id)
            .arg(self.lease.as_millis() as u64)
            .arg(free)
            .arg(self.keys.tried(""))
            .arg(self.result_ttl.as_millis() as u64)
            .invoke_async(&mut conn)
            .await?;
        self.take_claimed(claimed, "claimed an orphaned call").await
    }

    /// Runs the calls a claim returned (entry ids and delivery counts, alternately): how
    /// many it took.
    async fn take_claimed(
        self: &Arc<Self>,
        claimed: Vec<String>,
        what: &'static str,
    ) -> redis::RedisResult<usize> {
        let mut conn = self.conn.clone();
        let calls = self.keys.calls();
        let mut taken = 0;
        for pair in claimed.chunks(2) {
            let [entry, deliveries] = pair else { continue };
            let deliveries: u32 = deliveries.parse().unwrap_or(u32::MAX);
            let found: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
                .arg(&calls)
                .arg(entry)
                .arg(entry)
                .query_async(&mut conn)
                .await?;
            match found.ids.first() {
                Some(call) => {
                    tracing::info!(entry = %entry, deliveries, "{what}");
                    self.take_call(Entry::from_stream_id(call), deliveries)
                        .await;
                    taken += 1;
                }
                None => {
                    // Deleted meanwhile (its caller gave up): nothing to run.
                    let _ = redis::cmd("XACK")
                        .arg(&calls)
                        .arg(GROUP)
                        .arg(entry)
                        .exec_async(&mut conn)
                        .await;
                }
            }
        }
        Ok(taken)
    }

    /// Runs a call it claimed (its `deliveries`-th delivery), or answers it at once.
    async fn take_call(self: &Arc<Self>, entry: Entry, deliveries: u32) {
        let entry_id = entry.id.clone();
        let call = match CallEntry::parse(entry) {
            Ok(call) => call,
            Err((who, message)) => {
                tracing::warn!(entry = %entry_id, %message, "malformed call");
                let error = CallError::NodeLost {
                    node: self.id.clone(),
                    message,
                };
                self.answer(&entry_id, who, deliveries, Err(error));
                return;
            }
        };
        let who = Some((call.client.clone(), call.id));
        let refused = if call.version != WIRE_VERSION {
            Some(CallError::NodeLost {
                node: self.id.clone(),
                message: format!(
                    "the call speaks wire version {:?}, this node {WIRE_VERSION}",
                    call.version
                ),
            })
        } else if deliveries > call.maxd {
            Some(self.exhausted(&call.entry, deliveries).await)
        } else if call.deadline.is_some_and(|at| keys::now_ms() >= at) {
            Some(CallError::Deadline { ran: false })
        } else if call.fmt != self.farm.serializer().name() {
            Some(CallError::BadArguments {
                method: call.method.clone(),
                message: format!(
                    "the call is encoded as {}, this node's workers speak {}",
                    call.fmt,
                    self.farm.serializer().name()
                ),
            })
        } else {
            None
        };
        if let Some(error) = refused {
            self.answer(&call.entry, who, deliveries, Err(error));
            return;
        }
        let left = call
            .deadline
            .map(|at| Duration::from_millis(at.saturating_sub(keys::now_ms())));
        let limit = match (call.timeout, left) {
            (Some(t), Some(l)) => Some(t.min(l)),
            (t, l) => t.or(l),
        };
        let by_deadline = left.is_some() && limit == left;
        let retries = call.maxd.saturating_sub(deliveries);
        let run = self
            .farm
            .run_raw_with(&call.method, &call.body, limit, retries);
        let this = self.clone();
        let mut owned = self.state.owned();
        let task = tokio::spawn(async move {
            let outcome = match run.await {
                Err(CallError::Timeout { .. }) if by_deadline => {
                    Err(CallError::Deadline { ran: true })
                }
                other => other,
            };
            let ran = outcome
                .as_ref()
                .ok()
                .and_then(|answer| answer.info.as_ref())
                .map(|info| RanOn {
                    slot: info.worker.slot(),
                    pid: info.pid,
                    attempts: info.attempts,
                    ran_for: info.ran_for,
                });
            let outcome = outcome.map(|answer| answer.body.to_vec());
            // Still held until the answer is posted (the poster lets it go), so a graceful
            // stop waits for it.
            let still_ours = this.state.owned().contains_key(&call.entry);
            if still_ours {
                this.answer_ran(&call.entry, who, deliveries, outcome, ran);
            } else {
                tracing::info!(entry = %call.entry, "lease lost: the result is another node's to give");
                this.state.done.notify_waiters();
            }
        });
        owned.insert(entry_id, task.abort_handle());
    }

    /// The error for a call delivered more often than its budget: each earlier delivery's
    /// node died or lost its lease while it ran the call (the claims noted them).
    async fn exhausted(&self, entry: &str, deliveries: u32) -> CallError {
        let mut conn = self.conn.clone();
        let held: Vec<String> = redis::cmd("LRANGE")
            .arg(self.keys.tried(entry))
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .unwrap_or_default();
        let lost = |node: String| CallError::NodeLost {
            node,
            message: "the node died or lost its lease while it ran the call".to_owned(),
        };
        let mut earlier: Vec<CallError> = held.into_iter().map(lost).collect();
        let last = earlier.pop().unwrap_or_else(|| lost(String::new()));
        CallError::RetriesExhausted {
            attempts: deliveries - 1,
            last: Box::new(last),
            earlier,
        }
    }

    /// Hands the outcome of entry `entry` to the poster. A call whose caller is unknown is
    /// only removed.
    fn answer(
        &self,
        entry: &str,
        who: Option<(String, u64)>,
        deliveries: u32,
        outcome: Result<Vec<u8>, CallError>,
    ) {
        self.answer_ran(entry, who, deliveries, outcome, None);
    }

    /// As [`answer`](Self::answer), for a call that ran here on a worker.
    fn answer_ran(
        &self,
        entry: &str,
        who: Option<(String, u64)>,
        deliveries: u32,
        outcome: Result<Vec<u8>, CallError>,
        ran: Option<RanOn>,
    ) {
        let answer = Answer {
            entry: entry.to_owned(),
            who,
            deliveries,
            outcome,
            ran,
        };
        // The poster lives as long as the puller: a send fails only once the node stopped.
        let _ = self.answers.send(ToPoster::Answer(answer));
    }

    /// Posts answers as they come, each batch in one pipeline, then lets their calls go.
    async fn post_answers(self: Arc<Self>, mut to_post: mpsc::UnboundedReceiver<ToPoster>) {
        let mut batch = Vec::with_capacity(POST_BATCH);
        while to_post.recv_many(&mut batch, POST_BATCH).await > 0 {
            let mut answers = Vec::with_capacity(batch.len());
            let mut flushed = Vec::new();
            for message in batch.drain(..) {
                match message {
                    ToPoster::Answer(answer) => answers.push(answer),
                    ToPoster::Flush(tx) => flushed.push(tx),
                }
            }
            if !answers.is_empty() {
                self.post(&answers).await;
                let mut owned = self.state.owned();
                for answer in &answers {
                    owned.remove(&answer.entry);
                }
                drop(owned);
                self.state
                    .answered
                    .fetch_add(answers.len() as u64, Ordering::Relaxed);
                self.state.done.notify_waiters();
            }
            for tx in flushed {
                let _ = tx.send(());
            }
        }
    }

    /// Posts each answer to its caller's results stream, then acknowledges and deletes the
    /// entries, in one pipeline (in that order: a node that dies in between has its calls
    /// run again, and the caller drops the second answer). Whichever delivery of a call
    /// finishes first answers it; a node that lost its lease and finished anyway answers
    /// too, and its acknowledgement ends the new owner's run (its renewal finds the entry
    /// gone).
    async fn post(&self, answers: &[Answer]) {
        let calls = self.keys.calls();
        let mut pipe = redis::pipe();
        let mut callers: Vec<&str> = Vec::new();
        for answer in answers {
            let Some((client, id)) = &answer.who else {
                continue;
            };
            let cmd = pipe.cmd("XADD");
            cmd.arg(self.keys.results(client)).arg("*").arg("h");
            match &answer.outcome {
                Ok(body) => {
                    let answered = Answered::Ok(answer.ran);
                    let head = wire::result_head(*id, &self.id, answer.deliveries, answered);
                    cmd.arg(head).arg("b").arg(body.as_slice());
                }
                Err(error) => {
                    let (kind, message) = wire::encode_error(error);
                    let answered = Answered::Err(kind);
                    let head = wire::result_head(*id, &self.id, answer.deliveries, answered);
                    cmd.arg(head).arg("b").arg(message);
                }
            }
            cmd.ignore();
            if !callers.contains(&client.as_str()) {
                callers.push(client);
            }
        }
        for client in callers {
            pipe.cmd("PEXPIRE")
                .arg(self.keys.results(client))
                .arg(self.result_ttl.as_millis() as u64)
                .ignore();
        }
        let script = redis::Script::new(SETTLE);
        let mut settle = script.key(&calls);
        settle.arg(GROUP).arg(TRIM_HOLD_BACK.as_millis() as u64);
        for answer in answers {
            settle.arg(&answer.entry);
        }
        pipe.invoke_script(&settle).ignore();
        let mut backoff = Backoff::new();
        let mut posted = false;
        for _ in 0..5 {
            let mut conn = self.conn.clone();
            let outcome = if posted {
                // The results went out; only the settling failed (a server that restarted
                // no longer knows the script: this loads it).
                tokio::time::timeout(COMMAND_TIMEOUT, settle.invoke_async::<()>(&mut conn)).await
            } else {
                tokio::time::timeout(COMMAND_TIMEOUT, pipe.exec_async(&mut conn)).await
            };
            match outcome {
                Ok(Ok(())) => return,
                Ok(Err(e))
                    if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    posted = true;
                    continue;
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, calls = answers.len(), "cannot post results")
                }
                Err(_) => tracing::warn!(
                    calls = answers.len(),
                    "cannot post results: the engine stopped answering"
                ),
            }
            backoff.wait().await;
        }
        // The entries stay pending: other nodes run them again once this one is gone or
        // their leases run out.
        tracing::error!(
            calls = answers.len(),
            "results not posted; the calls will be re-run elsewhere"
        );
    }

    /// The nodes holding calls that are dead: their liveness key expired, or their
    /// heartbeat connection has been gone from the engine for [`GONE_FOR`] (a killed
    /// process's sockets close at once: its calls restart within a second). Connections are
    /// judged only while this node's own is known to the engine, and only ids of the
    /// server's current run (see [`Presence`]), so an engine restart does not make every
    /// node look dead.
    async fn dead_nodes(
        &self,
        suspects: &mut Suspects,
    ) -> redis::RedisResult<Vec<(String, Death)>> {
        let mut conn = self.conn.clone();
        let calls = self.keys.calls();
        let pending: StreamPendingReply = redis::cmd("XPENDING")
            .arg(&calls)
            .arg(GROUP)
            .query_async(&mut conn)
            .await?;
        let StreamPendingReply::Data(pending) = pending else {
            suspects.0.clear();
            return Ok(Vec::new());
        };
        let holders: Vec<String> = pending
            .consumers
            .into_iter()
            .filter(|c| c.pending > 0 && c.name != self.id)
            .map(|c| c.name)
            .collect();
        if holders.is_empty() {
            suspects.0.clear();
            return Ok(Vec::new());
        }
        let mut get = redis::cmd("MGET");
        for node in &holders {
            get.arg(self.keys.node(node));
        }
        let beats: Vec<Option<String>> = get.query_async(&mut conn).await?;
        let mut dead = Vec::new();
        let mut connected = Vec::new();
        for (node, beat) in holders.into_iter().zip(beats) {
            match beat.as_deref().and_then(Beat::parse) {
                None if beat.is_none() => dead.push((node, Death::Expired)),
                Some(Beat {
                    presence: Some(presence),
                    ..
                }) => connected.push((node, presence)),
                _ => {}
            }
        }
        let own = self.state.presence().clone();
        let Some(own) = own.filter(|_| !connected.is_empty()) else {
            suspects.0.clear();
            return Ok(dead);
        };
        let mut list = redis::cmd("CLIENT");
        list.arg("LIST").arg("ID").arg(own.client);
        for (_, presence) in &connected {
            list.arg(presence.client);
        }
        let listed: String = match list.query_async(&mut conn).await {
            Ok(listed) => listed,
            Err(e) => {
                // Not allowed (an ACL without CLIENT): liveness keys alone, then.
                tracing::debug!(error = %e, "cannot list the engine's clients");
                return Ok(dead);
            }
        };
        let present: Vec<u64> = listed
            .lines()
            .filter_map(|line| line.strip_prefix("id=")?.split(' ').next()?.parse().ok())
            .collect();
        if !present.contains(&own.client) {
            // This node's own connection is not listed: the engine is not the one it knew.
            suspects.0.clear();
            return Ok(dead);
        }
        let mut still = HashMap::new();
        let mut gone = Vec::new();
        for (node, presence) in connected {
            if present.contains(&presence.client) {
                continue;
            }
            let since = match suspects.0.get(&node) {
                Some(&(c, since)) if c == presence.client => since,
                _ => Instant::now(),
            };
            if since.elapsed() >= GONE_FOR {
                gone.push((node.clone(), presence.run));
            }
            still.insert(node, (presence.client, since));
        }
        suspects.0 = still;
        if !gone.is_empty() {
            // Only ids of this server run mean anything: after a restart, a node's key may
            // still hold its old connection's id until it reconnects and beats again.
            let now = conn::run_id(&mut conn).await;
            dead.extend(
                gone.into_iter()
                    .filter(|(_, run)| now.as_deref() == Some(run.as_str()))
                    .map(|(node, _)| (node, Death::Disconnected)),
            );
        }
        Ok(dead)
    }

    /// Opens the heartbeat connection (the engine's list of clients shows it while this
    /// process lives) and announces the node on it.
    async fn connect_heart(&self) -> redis::RedisResult<MultiplexedConnection> {
        let mut heart =
            conn::dedicated(&self.client, self.connect_timeout, Some(COMMAND_TIMEOUT)).await?;
        let client: Option<u64> = redis::cmd("CLIENT")
            .arg("ID")
            .query_async(&mut heart)
            .await
            .ok();
        let run = conn::run_id(&mut heart).await;
        *self.state.presence() = client
            .zip(run)
            .map(|(client, run)| Presence { client, run });
        self.beat(&mut heart).await?;
        Ok(heart)
    }

    /// Announces the node (its liveness key, holding its workers and heartbeat connection,
    /// and its last beat).
    async fn beat(&self, heart: &mut MultiplexedConnection) -> redis::RedisResult<()> {
        let beat = Beat {
            workers: self.workers,
            presence: self.state.presence().clone(),
        };
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(self.keys.node(&self.id))
            .arg(beat.to_string())
            .arg("PX")
            .arg(LIVENESS.as_millis() as u64)
            .ignore();
        pipe.cmd("ZADD")
            .arg(self.keys.nodes())
            .arg(keys::now_ms())
            .arg(&self.id)
            .ignore();
        pipe.exec_async(heart).await
    }

    /// Beats four times per [`LIVENESS`], reconnecting when the connection breaks.
    async fn beat_forever(self: Arc<Self>, heart: MultiplexedConnection) {
        let mut heart = Some(heart);
        loop {
            tokio::time::sleep(LIVENESS / 4).await;
            let beaten = match heart.as_mut() {
                Some(conn) => self.beat(conn).await,
                None => match self.connect_heart().await {
                    Ok(conn) => {
                        heart = Some(conn);
                        Ok(())
                    }
                    Err(e) => Err(e),
                },
            };
            if let Err(e) = beaten {
                tracing::warn!(error = %e, "heartbeat failed");
                heart = None;
            }
        }
    }

    /// Every third of the lease: renew the leases held, drop the calls whose lease was
    /// lost, and clear away nodes long dead.
    async fn renew_forever(self: Arc<Self>) {
        let script = redis::Script::new(RENEW);
        let mut last_sweep = Instant::now();
        loop {
            tokio::time::sleep(self.lease / 3).await;
            let held: Vec<String> = self.state.owned().keys().cloned().collect();
            if !held.is_empty() {
                let mut conn = self.conn.clone();
                let mut invocation = script.key(self.keys.calls());
                invocation.arg(GROUP).arg(&self.id);
                for entry in &held {
                    invocation.arg(entry);
                }
                match invocation.invoke_async::<Vec<String>>(&mut conn).await {
                    Ok(still) => {
                        let mut owned = self.state.owned();
                        for entry in held.iter().filter(|e| !still.contains(e)) {
                            if let Some(task) = owned.remove(entry) {
                                tracing::warn!(entry, "lease lost; dropping the call here");
                                task.abort();
                            }
                        }
                        drop(owned);
                        self.state.done.notify_waiters();
                    }
                    Err(e) => tracing::warn!(error = %e, "lease renewal failed"),
                }
            }
            if last_sweep.elapsed() >= Duration::from_secs(10) {
                last_sweep = Instant::now();
                self.sweep_dead_nodes().await;
            }
        }
    }

    /// Forgets nodes silent for three leases whose pending calls have all been claimed.
    async fn sweep_dead_nodes(&self) {
        let mut conn = self.conn.clone();
        let before = keys::now_ms().saturating_sub(3 * self.lease.as_millis() as u64);
        let dead: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.keys.nodes())
            .arg("-inf")
            .arg(before)
            .query_async(&mut conn)
            .await
            .unwrap_or_default();
        let script = redis::Script::new(FORGET);
        for node in dead.into_iter().filter(|n| *n != self.id) {
            let forgotten = script
                .key(self.keys.calls())
                .key(self.keys.nodes())
                .key(self.keys.node(&node))
                .key(self.keys.inbox(&node))
                .arg(GROUP)
                .arg(&node)
                .invoke_async::<i64>(&mut conn)
                .await;
            if let Err(e) = forgotten {
                tracing::debug!(error = %e, node, "cannot forget a dead node");
            }
        }
    }

    /// Runs the broadcasts addressed to this node on every local worker, and answers each
    /// once with every worker's outcome.
    async fn serve_inbox(self: Arc<Self>) {
        let inbox = self.keys.inbox(&self.id);
        let mut last = "0-0".to_owned();
        let mut backoff = Backoff::new();
        let mut reader = None;
        loop {
            let mut blocking = match reader.take() {
                Some(c) => c,
                None => match conn::blocking(&self.client, self.connect_timeout).await {
                    Ok(c) => c,
                    Err(_) => {
                        backoff.wait().await;
                        continue;
                    }
                },
            };
            let mut xread = redis::cmd("XREAD");
            xread
                .arg("COUNT")
                .arg(16)
                .arg("BLOCK")
                .arg(self.block.as_millis() as u64)
                .arg("STREAMS")
                .arg(&inbox)
                .arg(&last);
            let read = xread.query_async::<Option<StreamReadReply>>(&mut blocking);
            match tokio::time::timeout(self.block + COMMAND_TIMEOUT, read).await {
                Ok(Ok(reply)) => {
                    backoff.reset();
                    reader = Some(blocking);
                    for stream in reply.map(|r| r.keys).unwrap_or_default() {
                        for entry in &stream.ids {
                            last.clone_from(&entry.id);
                            tokio::spawn(self.clone().broadcast(entry.clone()));
                        }
                    }
                }
                _ => backoff.wait().await,
            }
        }
    }

    /// Stops a call its caller cancelled, if this node runs it: the worker's call is
    /// cancelled, and the entry acknowledged without an answer (its caller settled it).
    fn cancel(&self, entry: &str) {
        let Some(task) = self.state.owned().get(entry).cloned() else {
            return;
        };
        task.abort();
        tracing::debug!(entry, "cancelled by its caller");
        self.answer(entry, None, 0, Err(CallError::Cancelled));
    }

    /// Serves one entry of the inbox: a broadcast to run on every worker, or a cancel.
    async fn broadcast(self: Arc<Self>, entry: StreamId) {
        let inbox = self.keys.inbox(&self.id);
        let mut conn = self.conn.clone();
        let _ = redis::cmd("XDEL")
            .arg(&inbox)
            .arg(&entry.id)
            .exec_async(&mut conn)
            .await;
        let entry = Entry::from_stream_id(&entry);
        if let Some(cancelled) = wire::parse_cancel(&entry.head) {
            self.cancel(cancelled);
            return;
        }
        let call = match CallEntry::parse(entry) {
            Ok(call) if call.fmt == self.farm.serializer().name() => call,
            Ok(call) => {
                let error = CallError::BadArguments {
                    method: call.method.clone(),
                    message: format!(
                        "the call is encoded as {}, this node's workers speak {}",
                        call.fmt,
                        self.farm.serializer().name()
                    ),
                };
                let outcomes: Vec<_> = (0..self.workers).map(|s| (s, Err(error.clone()))).collect();
                self.post_broadcast(&call.client, call.id, &outcomes).await;
                return;
            }
            Err(_) => return,
        };
        let result = self
            .farm
            .broadcast_raw(&call.method, bytes::Bytes::from(call.body))
            .await;
        let mut outcomes: Vec<(usize, Result<Vec<u8>, CallError>)> = result
            .successes
            .into_iter()
            .map(|(w, body)| (w.slot(), Ok(body.to_vec())))
            .chain(result.failures.into_iter().map(|(w, e)| (w.slot(), Err(e))))
            .collect();
        if let Some(why) = result.unreached {
            outcomes = (0..self.workers).map(|s| (s, Err(why.clone()))).collect();
        }
        outcomes.sort_by_key(|(slot, _)| *slot);
        self.post_broadcast(&call.client, call.id, &outcomes).await;
    }

    async fn post_broadcast(
        &self,
        client: &str,
        id: u64,
        outcomes: &[(usize, Result<Vec<u8>, CallError>)],
    ) {
        let results = self.keys.results(client);
        let mut pipe = redis::pipe();
        pipe.cmd("XADD")
            .arg(&results)
            .arg("*")
            .arg("h")
            .arg(wire::result_head(id, &self.id, 1, Answered::Broadcast))
            .arg("b")
            .arg(wire::encode_broadcast(outcomes))
            .ignore();
        pipe.cmd("PEXPIRE")
            .arg(&results)
            .arg(self.result_ttl.as_millis() as u64)
            .ignore();
        let mut conn = self.conn.clone();
        if let Err(e) = pipe.exec_async(&mut conn).await {
            tracing::warn!(error = %e, "cannot post a broadcast's results");
        }
    }

    /// Leaves the farm: its liveness and membership go, and so does its consumer once
    /// nothing is pending for it.
    async fn leave(&self) {
        let mut conn = self.conn.clone();
        let _ = redis::cmd("DEL")
            .arg(self.keys.node(&self.id))
            .exec_async(&mut conn)
            .await;
        let script = redis::Script::new(FORGET);
        let mut invocation = script.key(self.keys.calls());
        invocation
            .key(self.keys.nodes())
            .key(self.keys.node(&self.id))
            .key(self.keys.inbox(&self.id))
            .arg(GROUP)
            .arg(&self.id);
        let forgotten = invocation.invoke_async::<i64>(&mut conn);
        if let Ok(Ok(0)) = tokio::time::timeout(COMMAND_TIMEOUT, forgotten).await {
            tracing::warn!("left with calls still pending here; other nodes claim them");
        }
        tracing::info!("node left the farm");
    }
}
