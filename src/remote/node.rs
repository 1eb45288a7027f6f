//! A node: a local farm of the user's worker binary that pulls calls from the engine while
//! it has room, holds a lease on each one it runs, and posts the results.

use super::conn::{self, Backoff, COMMAND_TIMEOUT};
use super::keys::{self, Keys, GROUP};
use super::wire::{self, CallEntry, WIRE_VERSION};
use crate::error::{CallError, CreateError};
use crate::options::FarmOptions;
use crate::serializer::{Json, Serializer};
use crate::Farm;
use redis::aio::{ConnectionManager, MultiplexedConnection};
use redis::streams::{StreamAutoClaimReply, StreamId, StreamPendingCountReply, StreamReadReply};
use redis::Client;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Notify};
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

/// Completes a call, only if no other node owns it now (a node that lost its lease must
/// not ack the new owner's delivery): posts the result to the caller's stream and removes
/// the entry, atomically. An entry pending nowhere (the server restarted without it) is
/// still answered: its caller may be waiting. Returns 0 when another node owns it.
/// `KEYS[1]` the calls stream, `KEYS[2]` the caller's results stream; `ARGV[1]` the group,
/// `ARGV[2]` this node, `ARGV[3]` the entry, `ARGV[4]` the results' time to live (ms), then
/// the result's fields and values (none: only remove the entry).
const COMPLETE: &str = r"
local p = redis.pcall('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if type(p) == 'table' and p.err == nil and p[1] and p[1][2] ~= ARGV[2] then
  return 0
end
if #ARGV > 4 then
  redis.call('XADD', KEYS[2], '*', unpack(ARGV, 5))
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
redis.pcall('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
return 1
";

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

/// Claims the calls pending for nodes whose liveness key has expired (they died), for
/// this node, whatever their idle time. `KEYS[1]` the calls stream; `ARGV[1]` the group,
/// `ARGV[2]` this node, `ARGV[3]` the liveness keys' prefix, `ARGV[4]` the most to take.
/// Returns entry ids and their delivery counts (after this claim), alternately.
const CLAIM_DEAD: &str = r"
local out = {}
local alive = {}
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 200)
for _, p in ipairs(pending) do
  local owner = p[2]
  if owner ~= ARGV[2] then
    if alive[owner] == nil then
      alive[owner] = redis.call('EXISTS', ARGV[3] .. owner)
    end
    if alive[owner] == 0 then
      local claimed = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, p[1], 'JUSTID')
      if #claimed > 0 then
        out[#out + 1] = p[1]
        out[#out + 1] = p[4] + 1
        if #out >= 2 * tonumber(ARGV[4]) then
          break
        end
      end
    end
  end
end
return out
";

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

    /// Calls this node holds at once (running or waiting for a local worker). Default: its
    /// number of workers, so a node claims only what it can start.
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
        });
        let node = Puller {
            id: id.clone(),
            keys,
            client,
            conn: manager,
            farm,
            state,
            capacity: options.max_in_flight.unwrap_or(workers).max(1),
            workers,
            lease: options.lease,
            block: options.block,
            connect_timeout: options.connect_timeout,
            result_ttl: options.result_ttl,
        };
        node.beat().await.map_err(|e| CreateError::Engine {
            message: format!("cannot register the node: {e}"),
        })?;
        let (stop, stopped) = watch::channel(false);
        let span = tracing::info_span!("node", id = %id);
        let task = tokio::spawn(tracing::Instrument::instrument(node.run(stopped), span));
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
}

impl Shared {
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
    capacity: usize,
    /// Its local workers: what a broadcast reaches here (the liveness key says it).
    workers: usize,
    lease: Duration,
    block: Duration,
    connect_timeout: Duration,
    result_ttl: Duration,
}

impl<S: Serializer> Puller<S> {
    async fn run(self, mut stopped: watch::Receiver<bool>) {
        let this = Arc::new(self);
        let beats = tokio::spawn(this.clone().renew_forever());
        let heart = tokio::spawn(this.clone().beat_forever());
        let inbox = tokio::spawn(this.clone().serve_inbox());
        let mut reader: Option<MultiplexedConnection> = None;
        let mut backoff = Backoff::new();
        let mut last_orphan_check = Instant::now() - this.lease;
        let mut cursor = "0-0".to_owned();
        let mut last_dead_check = Instant::now() - LIVENESS;
        while !*stopped.borrow() {
            // Listening before looking: a call that finishes in between still wakes us.
            let done = this.state.done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            let free = this.capacity.saturating_sub(this.state.owned().len());
            if free == 0 {
                tokio::select! {
                    () = done => {}
                    () = stop_requested(&mut stopped) => {}
                }
                continue;
            }
            if last_dead_check.elapsed() >= LIVENESS / 4 {
                last_dead_check = Instant::now();
                match this.claim_from_dead(free).await {
                    Ok(0) => {}
                    Ok(_) => continue,
                    Err(e) => tracing::debug!(error = %e, "cannot claim dead nodes' calls"),
                }
            }
            if last_orphan_check.elapsed() >= this.lease / 4 {
                last_orphan_check = Instant::now();
                match this.claim_orphans(free, &mut cursor).await {
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
            let read = xread.query_async::<Option<StreamReadReply>>(&mut blocking);
            // Not raced against a stop: a read cut short would leave the calls it took
            // pending here until the lease ran out, and cost them a delivery. A stop waits
            // for the read (at most `block`), and the calls it returns run.
            let outcome = tokio::time::timeout(this.block + COMMAND_TIMEOUT, read).await;
            match outcome {
                Ok(Ok(reply)) => {
                    backoff.reset();
                    reader = Some(blocking);
                    for stream in reply.map(|r| r.keys).unwrap_or_default() {
                        for entry in &stream.ids {
                            this.take_call(entry, 1).await;
                        }
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
        beats.abort();
        heart.abort();
        inbox.abort();
        this.leave().await;
        this.farm.shutdown().await;
    }

    /// Claims calls whose lease ran out (their node died or froze): how many it took.
    /// Claims calls of nodes whose liveness key expired: how many it took.
    async fn claim_from_dead(self: &Arc<Self>, free: usize) -> redis::RedisResult<usize> {
        let mut conn = self.conn.clone();
        let calls = self.keys.calls();
        let claimed: Vec<String> = redis::Script::new(CLAIM_DEAD)
            .key(&calls)
            .arg(GROUP)
            .arg(&self.id)
            .arg(self.keys.node(""))
            .arg(free)
            .invoke_async(&mut conn)
            .await?;
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
                    tracing::info!(entry = %entry, deliveries, "took over a call of a dead node");
                    self.take_call(call, deliveries).await;
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

    /// Each check goes on from `cursor` (XAUTOCLAIM scans a bounded part of the pending
    /// list per call), back to the start when it has seen the whole list.
    async fn claim_orphans(
        self: &Arc<Self>,
        free: usize,
        cursor: &mut String,
    ) -> redis::RedisResult<usize> {
        let mut conn = self.conn.clone();
        let calls = self.keys.calls();
        let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
            .arg(&calls)
            .arg(GROUP)
            .arg(&self.id)
            .arg(self.lease.as_millis() as u64)
            .arg(cursor.as_str())
            .arg("COUNT")
            .arg(free)
            .query_async(&mut conn)
            .await?;
        cursor.clone_from(&reply.next_stream_id);
        for gone in &reply.deleted_ids {
            // Deleted while pending (its caller gave up): nothing to run.
            let _ = redis::cmd("XACK")
                .arg(&calls)
                .arg(GROUP)
                .arg(gone)
                .exec_async(&mut conn)
                .await;
        }
        for entry in &reply.claimed {
            let pending: Result<StreamPendingCountReply, _> = redis::cmd("XPENDING")
                .arg(&calls)
                .arg(GROUP)
                .arg(&entry.id)
                .arg(&entry.id)
                .arg(1)
                .query_async(&mut conn)
                .await;
            // Not pending any more (its old owner just completed it), or unknown: skip it;
            // a call still pending here is claimed again at a later check.
            let Some(deliveries) = pending
                .ok()
                .and_then(|p| p.ids.first().map(|p| p.times_delivered))
            else {
                continue;
            };
            tracing::info!(entry = %entry.id, deliveries, "claimed an orphaned call");
            self.take_call(entry, u32::try_from(deliveries).unwrap_or(u32::MAX))
                .await;
        }
        Ok(reply.claimed.len())
    }

    /// Runs a call it claimed (its `deliveries`-th delivery), or answers it at once.
    async fn take_call(self: &Arc<Self>, entry: &StreamId, deliveries: u32) {
        let call = match CallEntry::parse(entry) {
            Ok(call) => call,
            Err((who, message)) => {
                tracing::warn!(entry = %entry.id, %message, "malformed call");
                let error = CallError::NodeLost {
                    node: self.id.clone(),
                    message,
                };
                self.answer(&entry.id, who, deliveries, Err(error)).await;
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
            Some(CallError::RetriesExhausted {
                attempts: deliveries - 1,
                last: Box::new(CallError::NodeLost {
                    node: String::new(),
                    message: "its earlier deliveries never completed: their nodes died or \
                              lost their lease"
                        .to_owned(),
                }),
                earlier: Vec::new(),
            })
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
            self.answer(&call.entry, who, deliveries, Err(error)).await;
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
        let entry_id = call.entry.clone();
        let mut owned = self.state.owned();
        let task = tokio::spawn(async move {
            let outcome = match run.await {
                Err(CallError::Timeout { .. }) if by_deadline => {
                    Err(CallError::Deadline { ran: true })
                }
                other => other.map(|body| body.to_vec()),
            };
            // Still counted as held while the answer is posted, so a graceful stop waits
            // for it.
            let still_ours = this.state.owned().contains_key(&call.entry);
            if still_ours {
                this.answer(&call.entry, who, deliveries, outcome).await;
            } else {
                tracing::info!(entry = %call.entry, "lease lost: the result is another node's to give");
            }
            this.state.owned().remove(&call.entry);
            this.state.done.notify_waiters();
        });
        owned.insert(entry_id, task.abort_handle());
    }

    /// Posts the outcome of entry `entry` to its caller and removes the entry, in one
    /// transaction. A call whose caller is unknown is only removed.
    async fn answer(
        &self,
        entry: &str,
        who: Option<(String, u64)>,
        deliveries: u32,
        outcome: Result<Vec<u8>, CallError>,
    ) {
        let calls = self.keys.calls();
        let script = redis::Script::new(COMPLETE);
        let mut invocation = script.key(&calls);
        match &who {
            Some((client, _)) => invocation.key(self.keys.results(client)),
            None => invocation.key(&calls),
        };
        invocation
            .arg(GROUP)
            .arg(&self.id)
            .arg(entry)
            .arg(self.result_ttl.as_millis() as u64);
        if let Some((_, id)) = &who {
            invocation
                .arg("id")
                .arg(*id)
                .arg("node")
                .arg(&self.id)
                .arg("deliveries")
                .arg(deliveries);
            match &outcome {
                Ok(body) => {
                    invocation
                        .arg("ok")
                        .arg("1")
                        .arg("body")
                        .arg(body.as_slice());
                }
                Err(error) => {
                    let (kind, message) = wire::encode_error(error);
                    invocation
                        .arg("ok")
                        .arg("0")
                        .arg("kind")
                        .arg(kind)
                        .arg("msg")
                        .arg(message);
                }
            }
        }
        let mut backoff = Backoff::new();
        for _ in 0..5 {
            let mut conn = self.conn.clone();
            let completed = invocation.invoke_async::<i64>(&mut conn);
            match tokio::time::timeout(COMMAND_TIMEOUT, completed).await {
                Ok(Ok(1)) => return,
                Ok(Ok(_)) => {
                    tracing::info!(entry, "lease lost: the result is another node's to give");
                    return;
                }
                Ok(Err(e)) => tracing::warn!(error = %e, entry, "cannot post a result"),
                Err(_) => {
                    tracing::warn!(entry, "cannot post a result: the engine stopped answering")
                }
            }
            backoff.wait().await;
        }
        // The entry stays pending: once the lease runs out another node runs it again.
        tracing::error!(
            entry,
            "result not posted; the call will be re-run elsewhere"
        );
    }

    /// Announces the node (its liveness key and heartbeat).
    async fn beat(&self) -> redis::RedisResult<()> {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(self.keys.node(&self.id))
            .arg(self.workers)
            .arg("PX")
            .arg(LIVENESS.as_millis() as u64)
            .ignore();
        pipe.cmd("ZADD")
            .arg(self.keys.nodes())
            .arg(keys::now_ms())
            .arg(&self.id)
            .ignore();
        pipe.exec_async(&mut conn).await
    }

    /// Beats four times per [`LIVENESS`].
    async fn beat_forever(self: Arc<Self>) {
        loop {
            tokio::time::sleep(LIVENESS / 4).await;
            if let Err(e) = self.beat().await {
                tracing::warn!(error = %e, "heartbeat failed");
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

    async fn broadcast(self: Arc<Self>, entry: StreamId) {
        let inbox = self.keys.inbox(&self.id);
        let mut conn = self.conn.clone();
        let _ = redis::cmd("XDEL")
            .arg(&inbox)
            .arg(&entry.id)
            .exec_async(&mut conn)
            .await;
        let call = match CallEntry::parse(&entry) {
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
            .arg("id")
            .arg(id)
            .arg("node")
            .arg(&self.id)
            .arg("ok")
            .arg("b")
            .arg("body")
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
