//! Farms across machines, against a real `redis-server` (started by each test on a unix
//! socket) and nodes as separate `workfarm-node` processes running the reference worker.
//! Without `redis-server` the tests fail when `CI` is set and are skipped otherwise.
#![cfg(feature = "redis")]

mod support;

use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use support::*;
use tokio::time::Instant;
use workfarm::remote::RemoteOptions;
use workfarm::{CallError, CreateError, Event, Farm};

/// How a test's `redis-server` runs, beyond its unix socket in a fresh directory.
#[derive(Debug, Clone, Default)]
struct Setup {
    /// `--appendonly yes --appendfsync always`: every write is on disk before the server
    /// answers it, so the data survives a SIGKILL and [`Redis::restart`] loads it again.
    persistent: bool,
    /// More arguments (a TCP or TLS port and its files), after the defaults.
    args: Vec<String>,
}

/// A `redis-server` of the test's own, on a unix socket in a fresh directory.
struct Redis {
    child: Child,
    dir: PathBuf,
    setup: Setup,
    /// Its unix socket, for the test's own connections (and, unless the test says
    /// otherwise, the nodes' and callers').
    url: String,
}

/// Starts `redis-server` in `dir` (its log in `dir/redis.log`) and waits until its unix
/// socket accepts connections.
fn redis_server(dir: &Path, setup: &Setup) -> Child {
    try_redis_server(dir, setup).unwrap_or_else(|log| panic!("redis-server did not start:\n{log}"))
}

/// The server, or its log if it exited (or did not listen in time).
fn try_redis_server(dir: &Path, setup: &Setup) -> Result<Child, String> {
    let socket = dir.join("r.sock");
    let _ = std::fs::remove_file(&socket);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("redis.log"))
        .expect("redis-server's log file");
    let mut command = Command::new("redis-server");
    command
        .args(["--port", "0", "--unixsocket"])
        .arg(&socket)
        .args(["--save", "", "--dir"])
        .arg(dir);
    if setup.persistent {
        command.args(["--appendonly", "yes", "--appendfsync", "always"]);
    } else {
        command.args(["--appendonly", "no"]);
    }
    let mut child = command
        .args(&setup.args)
        .stdout(log)
        .spawn()
        .expect("start redis-server");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        let exited = child.try_wait().ok().flatten();
        if exited.is_some() || std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(dir.join("redis.log")).unwrap_or_default();
            return Err(format!("({exited:?}) {log}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(child)
}

/// Whether `redis-server` is installed; if not, the test is skipped (`false`), or fails
/// under `CI`.
fn have_redis_server() -> bool {
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok();
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "redis-server is not installed (apt-get install -y redis-server)"
        );
        eprintln!("skipped: redis-server is not installed");
    }
    found
}

/// A fresh directory for one test's server and files.
fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "workfarm-{tag}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

impl Redis {
    /// `None` (test skipped) when there is no `redis-server` outside CI.
    fn start() -> Option<Redis> {
        Redis::start_with(Setup::default())
    }

    fn start_with(setup: Setup) -> Option<Redis> {
        if !have_redis_server() {
            return None;
        }
        Some(Redis::start_in(temp_dir("redis"), setup))
    }

    /// A server in `dir` (removed when the server is dropped).
    fn start_in(dir: PathBuf, setup: Setup) -> Redis {
        let child = redis_server(&dir, &setup);
        Redis {
            child,
            url: format!("redis+unix://{}", dir.join("r.sock").display()),
            dir,
            setup,
        }
    }

    /// A server in `dir` that also listens on a TCP port of 127.0.0.1: `args(port)` are its
    /// arguments for it (`--port`, or `--tls-port` and its files). A port taken between
    /// [`free_port`] and the server's bind is tried again with another.
    fn start_on_tcp(dir: PathBuf, args: impl Fn(u16) -> Vec<String>) -> (Redis, u16) {
        for _ in 0..5 {
            let port = free_port();
            let _ = std::fs::remove_file(dir.join("redis.log"));
            let setup = Setup {
                args: args(port),
                ..Setup::default()
            };
            match try_redis_server(&dir, &setup) {
                Ok(child) => {
                    let url = format!("redis+unix://{}", dir.join("r.sock").display());
                    let redis = Redis {
                        child,
                        dir,
                        setup,
                        url,
                    };
                    return (redis, port);
                }
                Err(log) if log.contains("Address already in use") => continue,
                Err(log) => panic!("redis-server did not start:\n{log}"),
            }
        }
        panic!("no free port for redis-server in 5 tries");
    }

    /// SIGKILL, then a new server on the same socket and directory: it loads the old
    /// one's data if the setup is persistent, and starts empty otherwise.
    fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = redis_server(&self.dir, &self.setup);
    }

    /// Waits until the server answers commands (a restarted one first loads its data,
    /// answering `LOADING` meanwhile).
    async fn loaded(&self) {
        let deadline = Instant::now() + SOON;
        loop {
            let mut conn = self.conn().await;
            let ping = redis::cmd("PING").query_async::<String>(&mut conn).await;
            match ping {
                Ok(_) => return,
                Err(e) => assert!(Instant::now() < deadline, "the server never loaded: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A `workfarm-node` process (in a process group of its own), killed with its workers on
/// drop.
struct NodeProc(Child);

impl NodeProc {
    fn start(redis: &Redis, farm: &str, workers: usize, lease_ms: u64) -> NodeProc {
        NodeProc::start_url(&redis.url, farm, workers, lease_ms)
    }

    fn start_url(url: &str, farm: &str, workers: usize, lease_ms: u64) -> NodeProc {
        NodeProc::start_env(url, farm, workers, lease_ms, &[])
    }

    /// With these environment variables (beside the test's).
    fn start_env(
        url: &str,
        farm: &str,
        workers: usize,
        lease_ms: u64,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> NodeProc {
        let mut command = Command::new(env!("CARGO_BIN_EXE_workfarm-node"));
        command
            .envs(env.iter().copied())
            .args(["--redis", url, "--farm", farm])
            .args(["--workers", &workers.to_string()])
            .args(["--lease-ms", &lease_ms.to_string(), "--"])
            .arg(worker_bin())
            .process_group(0);
        // SAFETY: prctl in the child before exec; no allocation, no locks. A node dies with
        // the test thread that started it, even if the test is killed.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            })
        };
        let child = command.spawn().expect("start workfarm-node");
        NodeProc(child)
    }

    /// SIGKILL to its process group (its workers follow: they die with their parent).
    fn kill(&mut self) {
        let group = -(self.0.id() as i32);
        // SAFETY: kill(2) has no memory effects.
        unsafe { libc::kill(group, libc::SIGKILL) };
        let _ = self.0.wait();
    }

    /// SIGTERM (a graceful stop), and its exit status.
    fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) has no memory effects.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        self.0.wait().expect("wait for the node")
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until `n` nodes have registered with farm `farm`.
async fn nodes_live(redis: &Redis, farm: &str, n: usize) {
    let mut conn = redis.conn().await;
    let deadline = Instant::now() + SOON;
    loop {
        let live: usize = redis::cmd("ZCARD")
            .arg(format!("wf:{{{farm}}}:nodes"))
            .query_async(&mut conn)
            .await
            .unwrap();
        if live >= n {
            return;
        }
        assert!(Instant::now() < deadline, "{live} of {n} nodes registered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `n` calls are pending in the group (claimed by nodes).
async fn pending_calls(redis: &Redis, farm: &str, n: u64) {
    let deadline = Instant::now() + SOON;
    loop {
        let (_, pending) = leftovers(redis, farm).await;
        if pending >= n {
            return;
        }
        assert!(Instant::now() < deadline, "{pending} of {n} calls claimed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the calls stream holds `n` entries.
async fn stream_len(redis: &Redis, farm: &str, n: u64) {
    let deadline = Instant::now() + SOON;
    loop {
        let (len, _) = leftovers(redis, farm).await;
        if len >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{len} of {n} calls in the stream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the run log at `runs` has `n` lines (each run of a logging method adds
/// one); fails the test with `what` after [`SOON`].
async fn wait_for_runs(runs: &Path, n: usize, what: &str) {
    let deadline = Instant::now() + SOON;
    while std::fs::read_to_string(runs)
        .unwrap_or_default()
        .lines()
        .count()
        < n
    {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Entries left in the calls stream, and calls pending in its group.
async fn leftovers(redis: &Redis, farm: &str) -> (u64, u64) {
    let mut conn = redis.conn().await;
    let key = format!("wf:{{{farm}}}:calls");
    let len: u64 = redis::cmd("XLEN")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    let pending: redis::streams::StreamPendingReply = redis::cmd("XPENDING")
        .arg(&key)
        .arg("nodes")
        .query_async(&mut conn)
        .await
        .unwrap();
    (len, pending.count() as u64)
}

async fn connect(redis: &Redis, farm: &str) -> Farm {
    trace_init();
    Farm::connect(RemoteOptions::new(redis.url.clone(), farm))
        .await
        .expect("connect")
}

#[tokio::test]
async fn a_thousand_mixed_calls_through_two_nodes_each_settle_once_and_leave_nothing() {
    let Some(redis) = Redis::start() else { return };
    let _a = NodeProc::start(&redis, "mixed", 2, 10_000);
    let _b = NodeProc::start(&redis, "mixed", 2, 10_000);
    nodes_live(&redis, "mixed", 2).await;
    let farm = connect(&redis, "mixed").await;
    farm.ready().await.unwrap();
    let calls: Vec<_> = (0..1000i64)
        .map(|i| {
            let farm = farm.clone();
            async move {
                match i % 3 {
                    0 => farm.run_method::<_, i64>("noop", i).await.map(|v| (i, v)),
                    1 => farm
                        .run_method::<_, i64>("add", (i, 1))
                        .await
                        .map(|v| (i, v - 1)),
                    _ => match farm.run_method::<_, ()>("fail", format!("no {i}")).await {
                        Err(CallError::Handler { message, .. }) if message == format!("no {i}") => {
                            Ok((i, i))
                        }
                        other => panic!("call {i}: {other:?}"),
                    },
                }
            }
        })
        .collect();
    for result in futures::future::join_all(calls).await {
        let (i, v) = result.expect("every call succeeds");
        assert_eq!(i, v);
    }
    let stats = farm.stats().await;
    assert_eq!(stats.total.calls.succeeded, 667);
    assert_eq!(stats.total.calls.handler, 333);
    // Empty once the last answers are settled on the engine (a node may post an answer
    // before it acks the call).
    nothing_left(&redis, "mixed").await;
    farm.shutdown().await;
}

#[tokio::test]
async fn a_call_whose_node_is_killed_completes_on_the_other_node() {
    let Some(redis) = Redis::start() else { return };
    let runs = counter_file("remote-kill");
    // The default lease, 10 s: the call is taken over because A's liveness key expires
    // (2 s), not because its lease ran out.
    let mut a = NodeProc::start(&redis, "kill", 1, 10_000);
    nodes_live(&redis, "kill", 1).await;
    let farm = connect(&redis, "kill").await;
    let path = runs.to_string_lossy().into_owned();
    let call = tokio::spawn({
        let farm = farm.clone();
        let path = path.clone();
        async move {
            farm.run_method::<_, u32>("log_block", (path, 1_000u64))
                .await
        }
    });
    // Node A runs it (its worker logged its pid); then B joins and A dies.
    wait_for_runs(&runs, 1, "node A never ran the call").await;
    let _b = NodeProc::start(&redis, "kill", 1, 10_000);
    nodes_live(&redis, "kill", 2).await;
    let killed = Instant::now();
    a.kill();
    let pid = tokio::time::timeout(SOON, call)
        .await
        .expect("settles")
        .unwrap()
        .expect("completes on node B");
    let took = killed.elapsed();
    let logged = std::fs::read_to_string(&*runs).unwrap();
    let pids: Vec<&str> = logged.lines().collect();
    assert_eq!(pids.len(), 2, "ran on A, then once on B: {pids:?}");
    assert_eq!(pids[1], pid.to_string(), "the answer came from B's worker");
    // Liveness (2 s) + a check (0.5 s) + the 1 s re-run, with slack; a takeover by the
    // lease would take over 10 s.
    assert!(took < Duration::from_secs(8), "took {took:?}");
    eprintln!("a killed node's 1 s call completed elsewhere {took:?} after the kill");
    nothing_left(&redis, "kill").await;
    farm.shutdown().await;
}

#[tokio::test]
async fn a_call_longer_than_the_lease_is_not_stolen_by_an_idle_node() {
    let Some(redis) = Redis::start() else { return };
    let runs = counter_file("remote-lease");
    let _a = NodeProc::start(&redis, "lease", 1, 600);
    let _b = NodeProc::start(&redis, "lease", 1, 600);
    nodes_live(&redis, "lease", 2).await;
    let farm = connect(&redis, "lease").await;
    let path = runs.to_string_lossy().into_owned();
    // Five lease lengths, while the other node polls for orphans.
    let pid: u32 = farm
        .run_method("log_block", (path, 3_000u64))
        .await
        .unwrap();
    let logged = std::fs::read_to_string(&*runs).unwrap();
    assert_eq!(
        logged.lines().collect::<Vec<_>>(),
        [pid.to_string()],
        "ran once"
    );
    farm.shutdown().await;
}

#[tokio::test]
async fn a_poison_pill_that_kills_its_nodes_stops_after_max_retries_plus_one_deliveries() {
    let Some(redis) = Redis::start() else { return };
    let mut nodes: Vec<NodeProc> = (0..4)
        .map(|_| NodeProc::start(&redis, "poison", 1, 500))
        .collect();
    nodes_live(&redis, "poison", 4).await;
    let farm = Farm::connect(RemoteOptions::new(redis.url.clone(), "poison").max_retries(2))
        .await
        .unwrap();
    let pill = tokio::spawn({
        let farm = farm.clone();
        async move { farm.run_method::<_, ()>("kill_parent", ()).await }
    });
    // Other calls keep flowing meanwhile.
    for i in 0..20i64 {
        let v: i64 = tokio::time::timeout(SOON, farm.run_method("noop", i))
            .await
            .expect("other calls flow")
            .unwrap();
        assert_eq!(v, i);
    }
    let err = tokio::time::timeout(Duration::from_secs(60), pill)
        .await
        .expect("the pill settles")
        .unwrap()
        .unwrap_err();
    match &err {
        CallError::RetriesExhausted {
            attempts,
            last,
            earlier,
        } => {
            assert_eq!(*attempts, 3, "{err}");
            // Each delivery's node, in order: the last one, and the two before it.
            let mut nodes: Vec<&str> = earlier
                .iter()
                .chain(std::iter::once(&**last))
                .map(|e| match e {
                    CallError::NodeLost { node, .. } => node.as_str(),
                    other => panic!("a lost node, not {other:?}"),
                })
                .collect();
            assert_eq!(nodes.len(), 3, "{err}");
            nodes.sort_unstable();
            nodes.dedup();
            assert_eq!(nodes.len(), 3, "three different nodes: {err}");
        }
        other => panic!("expected RetriesExhausted, got {other:?}"),
    }
    let dead = nodes
        .iter_mut()
        .filter_map(|n| n.0.try_wait().ok().flatten())
        .count();
    assert_eq!(dead, 3, "exactly max_retries + 1 = 3 nodes died");
    farm.shutdown().await;
}

#[tokio::test]
async fn connecting_to_an_engine_that_is_not_there_is_a_typed_error_in_time() {
    let started = Instant::now();
    let connected = Farm::connect(
        RemoteOptions::new("redis+unix:///nonexistent/r.sock", "none")
            .connect_timeout(Duration::from_secs(1)),
    )
    .await;
    let Err(err) = connected else {
        panic!("connected to no engine")
    };
    assert!(matches!(err, CreateError::Engine { .. }), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_node_stopped_gracefully_finishes_its_calls_and_leaves() {
    let Some(redis) = Redis::start() else { return };
    let mut a = NodeProc::start(&redis, "graceful", 2, 10_000);
    nodes_live(&redis, "graceful", 1).await;
    let farm = connect(&redis, "graceful").await;
    let calls: Vec<_> = (0..2)
        .map(|_| {
            let farm = farm.clone();
            tokio::spawn(async move { farm.run_method::<_, u32>("block", 800u64).await })
        })
        .collect();
    pending_calls(&redis, "graceful", 2).await;
    let status = a.terminate();
    assert!(status.success(), "{status:?}");
    for call in calls {
        tokio::time::timeout(SOON, call)
            .await
            .expect("settles")
            .unwrap()
            .expect("finished before the node left");
    }
    let mut conn = redis.conn().await;
    let members: Vec<String> = redis::cmd("ZRANGE")
        .arg("wf:{graceful}:nodes")
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(members.is_empty(), "left the farm: {members:?}");
    assert_eq!(
        leftovers(&redis, "graceful").await,
        (0, 0),
        "nothing to redeliver"
    );
    farm.shutdown().await;
}

#[tokio::test]
async fn a_deadline_settles_the_call_at_its_deadline_and_a_late_node_does_not_run_it() {
    let Some(redis) = Redis::start() else { return };
    let farm = connect(&redis, "late").await;
    let runs = counter_file("remote-late");
    let path = runs.to_string_lossy().into_owned();
    let started = Instant::now();
    let err = farm
        .call::<_, u64>("log_run", (path, 1u64))
        .deadline(Instant::now() + Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    // An entry already past its deadline when a node reads it (as if the caller were
    // gone): the node answers without running it, and removes it.
    let mut conn = redis.conn().await;
    let _: String = redis::cmd("XADD")
        .arg("wf:{late}:calls")
        .arg("*")
        // The header: version, id, client, fmt, deliveries allowed, deadline (unix ms),
        // timeout, method.
        .arg("h")
        .arg("2 999 gone json 4 1 - log_run")
        .arg("b")
        .arg(serde_json::to_vec(&(runs.to_string_lossy(), 2u64)).unwrap())
        .query_async(&mut conn)
        .await
        .unwrap();
    let _a = NodeProc::start(&redis, "late", 1, 10_000);
    nodes_live(&redis, "late", 1).await;
    let v: i64 = farm.run_method("noop", 5).await.unwrap();
    assert_eq!(v, 5);
    assert!(!runs.exists(), "neither expired call ran");
    // And both are gone.
    nothing_left(&redis, "late").await;
    farm.shutdown().await;
}

#[tokio::test]
async fn a_node_frozen_past_its_lease_loses_the_call_and_the_caller_settles_once() {
    let Some(redis) = Redis::start() else { return };
    let runs = counter_file("remote-frozen");
    let mut a = NodeProc::start(&redis, "frozen", 1, 600);
    nodes_live(&redis, "frozen", 1).await;
    let farm = connect(&redis, "frozen").await;
    let path = runs.to_string_lossy().into_owned();
    let call = tokio::spawn({
        let farm = farm.clone();
        async move {
            farm.run_method::<_, u32>("log_block", (path, 1_500u64))
                .await
        }
    });
    wait_for_runs(&runs, 1, "node A never ran the call").await;
    // Freeze A (its worker runs on) well past its lease; B takes the call over.
    // SAFETY: kill(2) has no memory effects.
    unsafe { libc::kill(a.0.id() as i32, libc::SIGSTOP) };
    let _b = NodeProc::start(&redis, "frozen", 1, 600);
    let pid = tokio::time::timeout(SOON, call)
        .await
        .expect("settles")
        .unwrap()
        .expect("completes");
    // SAFETY: as above.
    unsafe { libc::kill(a.0.id() as i32, libc::SIGCONT) };
    let logged = std::fs::read_to_string(&*runs).unwrap();
    let pids: Vec<&str> = logged.lines().collect();
    assert_eq!(pids.len(), 2, "ran on A and again on B: {pids:?}");
    assert_eq!(pids[1], pid.to_string(), "settled by B's run");
    // A woke up: its late answer (if any) is dropped; later calls still settle once each.
    for i in 0..10i64 {
        let v: i64 = farm.run_method("noop", i).await.unwrap();
        assert_eq!(v, i);
    }
    let stats = farm.stats().await;
    assert_eq!(stats.total.calls.succeeded, 11, "each call settled once");
    a.kill();
    farm.shutdown().await;
}

#[tokio::test]
async fn a_call_timeout_stops_the_call_on_its_node() {
    let Some(redis) = Redis::start() else { return };
    let _a = NodeProc::start(&redis, "timeout", 1, 10_000);
    nodes_live(&redis, "timeout", 1).await;
    let farm = Farm::connect(RemoteOptions::new(redis.url.clone(), "timeout").max_retries(0))
        .await
        .unwrap();
    let started = Instant::now();
    let err = farm
        .call::<_, u32>("block", 10_000u64)
        .timeout(Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(
        matches!(err, CallError::Timeout { after } if after == Duration::from_millis(300)),
        "{err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let v: i64 = farm.run_method("noop", 1).await.unwrap();
    assert_eq!(v, 1, "the node replaced its stopped worker");
    farm.shutdown().await;
}

#[tokio::test]
async fn an_engine_that_restarts_without_its_data_loses_no_call() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let mut a = NodeProc::start(&redis, "restart", 1, 1_000);
    nodes_live(&redis, "restart", 1).await;
    let farm = connect(&redis, "restart").await;
    let started: u32 = farm.run_method("pid", ()).await.unwrap();
    // One call runs on the node, one waits in the stream behind it (one worker).
    let running = tokio::spawn({
        let farm = farm.clone();
        async move { farm.run_method::<_, u32>("block", 3_000u64).await }
    });
    // Longer than the caller's blocking read of results, so the restart is noticed by
    // the reconnect, not by a result.
    pending_calls(&redis, "restart", 1).await;
    let queued = tokio::spawn({
        let farm = farm.clone();
        async move { farm.run_method::<_, i64>("noop", 42).await }
    });
    stream_len(&redis, "restart", 2).await;
    redis.restart();
    // The caller notices the new server and submits both again; the node re-registers
    // and serves them.
    let ran = tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("never hangs")
        .unwrap()
        .expect("the running call settles with its result");
    assert!(ran > 0 && started > 0);
    let v = tokio::time::timeout(Duration::from_secs(30), queued)
        .await
        .expect("never hangs")
        .unwrap()
        .expect("the queued call was submitted again and ran");
    assert_eq!(v, 42);
    let stats = farm.stats().await;
    assert_eq!(stats.total.calls.succeeded, 3, "each settled once");
    a.kill();
    farm.shutdown().await;
}

/// The lines of a run log (`log_run`, `log_block`): one per run.
fn logged(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Waits until the run log at `path` has at least `n` lines.
async fn runs_logged(path: &Path, n: usize) {
    let deadline = Instant::now() + SOON;
    loop {
        let runs = logged(path).len();
        if runs >= n {
            return;
        }
        assert!(Instant::now() < deadline, "{runs} of {n} runs logged");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the calls stream and the pending list are both empty.
async fn nothing_left(redis: &Redis, farm: &str) {
    let deadline = Instant::now() + SOON;
    loop {
        let left = leftovers(redis, farm).await;
        if left == (0, 0) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "left in the stream and pending: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn an_engine_that_restarts_with_its_data_runs_a_queued_call_once() {
    let Some(mut redis) = Redis::start_with(Setup {
        persistent: true,
        ..Setup::default()
    }) else {
        return;
    };
    // Two nodes of one worker each, holding one call at a time (max_in_flight defaults to
    // the workers); a lease short enough that the restart tests the renewals too.
    let _a = NodeProc::start(&redis, "durable", 1, 1_000);
    let _b = NodeProc::start(&redis, "durable", 1, 1_000);
    nodes_live(&redis, "durable", 2).await;
    let farm = connect(&redis, "durable").await;
    farm.ready().await.unwrap();
    // One call running on each node...
    let logs: Vec<TempFile> = (0..2)
        .map(|i| counter_file(&format!("remote-durable-{i}")))
        .collect();
    let running: Vec<_> = logs
        .iter()
        .map(|log| {
            let farm = farm.clone();
            let path = log.to_string_lossy().into_owned();
            tokio::spawn(async move {
                farm.run_method::<_, u32>("log_block", (path, 4_000u64))
                    .await
            })
        })
        .collect();
    for log in &logs {
        runs_logged(log, 1).await;
    }
    // ... and one queued in the stream behind them, delivered to no node yet.
    let queued_log = counter_file("remote-durable-queued");
    let queued = tokio::spawn({
        let farm = farm.clone();
        let path = queued_log.to_string_lossy().into_owned();
        async move { farm.run_method::<_, u64>("log_run", (path, 42u64)).await }
    });
    stream_len(&redis, "durable", 3).await;
    assert_eq!(
        leftovers(&redis, "durable").await,
        (3, 2),
        "two calls delivered, one queued"
    );
    redis.restart();
    redis.loaded().await;
    // The restarted server loaded the stream, the group and its pending list.
    assert_eq!(
        leftovers(&redis, "durable").await,
        (3, 2),
        "the restarted server has the calls and the deliveries"
    );
    for (call, log) in running.into_iter().zip(&logs) {
        let pid = tokio::time::timeout(Duration::from_secs(60), call)
            .await
            .expect("never hangs")
            .unwrap()
            .expect("the running call settles with its result");
        let runs = logged(log);
        assert!(
            runs.contains(&pid.to_string()),
            "answered by one of its runs: {pid} in {runs:?}"
        );
        assert!(runs.len() <= 2, "ran at most twice: {runs:?}");
        eprintln!(
            "a call running across the restart ran {} time(s)",
            runs.len()
        );
    }
    let v = tokio::time::timeout(Duration::from_secs(60), queued)
        .await
        .expect("never hangs")
        .unwrap()
        .expect("the queued call settles with its result");
    assert_eq!(v, 42);
    nothing_left(&redis, "durable").await;
    assert_eq!(
        logged(&queued_log),
        ["42"],
        "the queued call survived in the stream and ran once (not submitted again)"
    );
    let stats = farm.stats().await;
    assert_eq!(stats.total.calls.succeeded, 3, "each settled once");
    farm.shutdown().await;
}

#[tokio::test]
async fn calls_fail_with_a_typed_error_while_the_engine_is_gone() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let _a = NodeProc::start(&redis, "gone", 1, 1_000);
    nodes_live(&redis, "gone", 1).await;
    let farm = Farm::connect(
        RemoteOptions::new(redis.url.clone(), "gone").engine_timeout(Duration::from_secs(2)),
    )
    .await
    .unwrap();
    let outstanding = tokio::spawn({
        let farm = farm.clone();
        async move { farm.run_method::<_, u32>("block", 3_000u64).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = redis.child.kill();
    let _ = redis.child.wait();
    let started = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(20), outstanding)
        .await
        .expect("never hangs")
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, CallError::Engine { .. }), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let new = tokio::time::timeout(SOON, farm.run_method::<_, i64>("noop", 1))
        .await
        .expect("a new call fails fast")
        .unwrap_err();
    assert!(matches!(new, CallError::Engine { .. }), "{new:?}");
    farm.kill().await;
}

#[tokio::test]
async fn a_broadcast_reaches_every_worker_of_every_live_node_and_reports_a_lost_one() {
    let Some(redis) = Redis::start() else { return };
    let mut nodes: Vec<NodeProc> = (0..3)
        .map(|_| NodeProc::start(&redis, "bcast", 2, 1_000))
        .collect();
    nodes_live(&redis, "bcast", 3).await;
    let farm = connect(&redis, "bcast").await;
    let pids = farm.broadcast_method::<_, u32>("pid", ()).await;
    assert!(
        pids.failures.is_empty() && pids.unreached.is_none(),
        "{pids:?}"
    );
    let distinct: std::collections::HashSet<u32> = pids.successes.iter().map(|(_, p)| *p).collect();
    assert_eq!(distinct.len(), 6, "3 nodes x 2 workers: {pids:?}");
    // One node dies while the broadcast runs: its two workers are reported lost, the
    // four others answer.
    let runs = counter_file("remote-bcast");
    let path = runs.to_string_lossy().into_owned();
    let slow = tokio::spawn({
        let farm = farm.clone();
        async move {
            farm.broadcast_method::<_, u32>("log_block", (path, 1_500u64))
                .await
        }
    });
    wait_for_runs(&runs, 6, "the broadcast did not reach 6 workers").await;
    nodes[0].kill();
    // A node that joins now receives nothing of it.
    let late = NodeProc::start(&redis, "bcast", 2, 1_000);
    let result = tokio::time::timeout(SOON, slow)
        .await
        .expect("settles")
        .unwrap();
    assert_eq!(result.successes.len(), 4, "{result:?}");
    assert_eq!(result.failures.len(), 2, "{result:?}");
    assert!(
        result
            .failures
            .iter()
            .all(|(_, e)| matches!(e, CallError::NodeLost { .. })),
        "{result:?}"
    );
    nodes_live(&redis, "bcast", 3).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let logged = std::fs::read_to_string(&*runs).unwrap();
    assert_eq!(logged.lines().count(), 6, "the late node ran none of it");
    drop(late);
    farm.shutdown().await;
}

/// The soak: `REMOTE_SOAK_CALLS` (100,000 by default) noop calls through three nodes, one
/// of which is SIGKILLed and replaced every 300 ms: every call settles with its own value,
/// and the stream and the pending list end empty.
/// `cargo test --release --features redis --test remote_redis -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak: minutes; run with --ignored"]
async fn soak_calls_through_nodes_killed_every_300_ms() {
    let Some(redis) = Redis::start() else { return };
    let calls: i64 = std::env::var("REMOTE_SOAK_CALLS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(100_000);
    let nodes: Vec<NodeProc> = (0..3)
        .map(|_| NodeProc::start(&redis, "soak", 2, 500))
        .collect();
    nodes_live(&redis, "soak", 3).await;
    let farm = Farm::connect(RemoteOptions::new(redis.url.clone(), "soak").max_retries(20))
        .await
        .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let killer = std::thread::spawn({
        let stop = stop.clone();
        let url = redis.url.clone();
        let mut nodes = nodes;
        move || {
            let mut kills = 0u32;
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(300));
                nodes[i].kill();
                nodes[i] = NodeProc::start_url(&url, "soak", 2, 500);
                kills += 1;
                i = (i + 1) % nodes.len();
            }
            (kills, nodes)
        }
    });
    let started = Instant::now();
    let window = 2_000;
    let mut next = 0i64;
    while next < calls {
        let end = (next + window).min(calls);
        let batch: Vec<_> = (next..end)
            .map(|i| farm.run_method::<_, i64>("noop", i))
            .collect();
        for (i, call) in (next..end).zip(futures::future::join_all(batch).await) {
            assert_eq!(call.unwrap_or_else(|e| panic!("call {i}: {e}")), i);
        }
        next = end;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (kills, _nodes) = killer.join().unwrap();
    let took = started.elapsed();
    eprintln!(
        "soak: {calls} calls in {took:?} ({:.0}/s) with {kills} nodes killed",
        calls as f64 / took.as_secs_f64()
    );
    assert!(
        kills >= 2,
        "the soak killed too few nodes to prove anything"
    );
    let stats = farm.stats().await;
    assert_eq!(stats.total.calls.succeeded, calls as u64);
    assert_eq!(stats.total.calls.failed, 0);
    let deadline = Instant::now() + SOON;
    loop {
        let left = leftovers(&redis, "soak").await;
        if left == (0, 0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left in the stream and pending: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    farm.shutdown().await;
}

/// Not a test on its own: the caller process of
/// `a_caller_that_dies_leaves_its_calls_to_finish_and_its_results_to_expire`, which starts
/// this test binary again to run it.
#[tokio::test]
#[ignore = "run by another test as a separate caller process"]
async fn caller_process() {
    let (Ok(url), Ok(path)) = (
        std::env::var("REMOTE_CALLER_URL"),
        std::env::var("REMOTE_CALLER_LOG"),
    ) else {
        return;
    };
    let farm = Farm::connect(RemoteOptions::new(url, "orphan"))
        .await
        .unwrap();
    let calls: Vec<_> = (0..4)
        .map(|_| farm.run_method::<_, u32>("log_block", (path.clone(), 1_000u64)))
        .collect();
    // Queued at once; then wait to be killed.
    let _ = futures::future::join_all(calls).await;
    std::future::pending::<()>().await;
}

#[tokio::test]
async fn a_caller_that_dies_leaves_its_calls_to_finish_and_its_results_to_expire() {
    let Some(redis) = Redis::start() else { return };
    let _a = NodeProc::start(&redis, "orphan", 2, 10_000);
    let _b = NodeProc::start(&redis, "orphan", 2, 10_000);
    nodes_live(&redis, "orphan", 2).await;
    let runs = counter_file("remote-orphan");
    let mut caller = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "caller_process", "--ignored", "--nocapture"])
        .env("REMOTE_CALLER_URL", &redis.url)
        .env("REMOTE_CALLER_LOG", &*runs)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    pending_calls(&redis, "orphan", 4).await;
    caller.kill().unwrap();
    caller.wait().unwrap();
    // Another caller is unaffected meanwhile.
    let farm = connect(&redis, "orphan").await;
    let v: i64 = tokio::time::timeout(SOON, farm.run_method("noop", 3))
        .await
        .expect("another caller's call settles")
        .unwrap();
    assert_eq!(v, 3);
    // The dead caller's four calls finish, and their results wait to expire.
    let deadline = Instant::now() + SOON;
    while leftovers(&redis, "orphan").await != (0, 0) {
        assert!(
            Instant::now() < deadline,
            "the dead caller's calls did not finish"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let logged = std::fs::read_to_string(&*runs).unwrap();
    assert_eq!(logged.lines().count(), 4, "each ran once");
    let mut conn = redis.conn().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("wf:{orphan}:res:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut expiring = 0;
    for key in keys {
        let len: u64 = redis::cmd("XLEN")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        let ttl: i64 = redis::cmd("PTTL")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        if len == 4 {
            assert!(
                ttl > 0 && ttl <= 3_600_000,
                "the dead caller's results expire: {ttl}"
            );
            expiring += 1;
        }
    }
    assert_eq!(
        expiring, 1,
        "one results stream holds the dead caller's four results"
    );
    farm.shutdown().await;
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Every command nodes and callers send, besides `AUTH` (always allowed): the rules of a
/// Redis ACL user that may serve and call farms, and nothing else (keys `wf:*` only, no
/// channels). `INFO` (the server's run id and uptime: a restart is noticed by it) and
/// `CLIENT ID` / `CLIENT LIST` (a node is dead once its heartbeat connection is gone) touch
/// no key; `XCLAIM`, `XTRIM`, `XINFO GROUPS`, `TIME`, `RPUSH`, `ZREM` and `XGROUP
/// DELCONSUMER` are sent from the scripts (`XINFO GROUPS` and `XPENDING` by `status()` too).
const FARM_ACL: &str = "resetkeys ~wf:* resetchannels -@all \
    +ping +info +evalsha +script|load +client|id +client|list +time \
    +xadd +xread +xreadgroup +xrange +xpending +xclaim +xack +xdel +xtrim +xinfo|groups \
    +xgroup|create +xgroup|delconsumer \
    +set +mget +exists +del +pexpire +zadd +zrem +zrangebyscore +rpush +lrange";

/// And, on Redis 7.2 or later, `CLIENT SETINFO` (the `redis` crate names itself on each
/// connection; 7.0 does not know the command, and the crate ignores its error).
const FARM_ACL_SINCE_7_2: &str = "+client|setinfo";

/// The entries of the server's `ACL LOG` (commands, keys or logins it refused).
async fn acl_log(
    conn: &mut redis::aio::MultiplexedConnection,
) -> Vec<HashMap<String, redis::Value>> {
    redis::cmd("ACL")
        .arg("LOG")
        .query_async(conn)
        .await
        .unwrap()
}

#[tokio::test]
async fn an_acl_user_in_the_url_serves_and_calls_and_a_wrong_password_is_a_typed_error() {
    if !have_redis_server() {
        return;
    }
    let (mut redis, port) = Redis::start_on_tcp(temp_dir("redis-acl"), |port| {
        ["--port", &port.to_string(), "--bind", "127.0.0.1"]
            .map(String::from)
            .to_vec()
    });
    // An admin for the test's own look-ups, the farm's user, and no default user.
    let mut conn = redis.conn().await;
    let users = [
        "admin on >adminpw ~* &* +@all".to_owned(),
        format!("wfuser on >s3cret {FARM_ACL} {FARM_ACL_SINCE_7_2}"),
        "default off".to_owned(),
    ];
    for rules in &users {
        let set = |rules: &str| {
            redis::cmd("ACL")
                .arg("SETUSER")
                .arg(rules.split_whitespace().collect::<Vec<_>>())
                .to_owned()
        };
        let mut done = set(rules).query_async::<()>(&mut conn).await;
        if matches!(&done, Err(e) if e.to_string().contains(FARM_ACL_SINCE_7_2)) {
            // Redis 7.0: no CLIENT SETINFO.
            let older = rules.replace(FARM_ACL_SINCE_7_2, "");
            done = set(&older).query_async::<()>(&mut conn).await;
        }
        done.unwrap_or_else(|e| panic!("ACL SETUSER {rules}: {e}"));
    }
    drop(conn);
    redis.url = format!("{}?user=admin&pass=adminpw", redis.url);
    let anonymous = redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await;
    let refused = match anonymous {
        Ok(mut c) => redis::cmd("PING").query_async::<String>(&mut c).await.err(),
        Err(e) => Some(e),
    };
    assert!(
        refused.is_some(),
        "the server refuses a client without a login"
    );

    let url = format!("redis://wfuser:s3cret@127.0.0.1:{port}");
    // A lease of 600 ms: leases are renewed during the 1 s call.
    let mut a = NodeProc::start_url(&url, "acl", 2, 600);
    let _b = NodeProc::start_url(&url, "acl", 2, 600);
    nodes_live(&redis, "acl", 2).await;
    trace_init();
    let farm = Farm::connect(RemoteOptions::new(url.clone(), "acl"))
        .await
        .expect("connects as wfuser");
    farm.ready().await.unwrap();
    let long = tokio::spawn({
        let farm = farm.clone();
        async move { farm.run_method::<_, u32>("block", 1_000u64).await }
    });
    let calls: Vec<_> = (0..50i64)
        .map(|i| farm.run_method::<_, i64>("add", (i, 1)))
        .collect();
    for (i, v) in (0..50i64).zip(futures::future::join_all(calls).await) {
        assert_eq!(v.unwrap(), i + 1);
    }
    let failed = farm.run_method::<_, ()>("fail", "no".to_owned()).await;
    assert!(
        matches!(&failed, Err(CallError::Handler { message, .. }) if message == "no"),
        "{failed:?}"
    );
    let pids = farm.broadcast_method::<_, u32>("pid", ()).await;
    assert_eq!(pids.successes.len(), 4, "2 nodes x 2 workers: {pids:?}");
    tokio::time::timeout(SOON, long)
        .await
        .expect("settles")
        .unwrap()
        .expect("the long call completes");
    let mut admin = redis.conn().await;
    let refusals = acl_log(&mut admin).await;
    assert!(
        refusals.is_empty(),
        "the server refused commands or keys to wfuser: {refusals:?}"
    );
    // A graceful stop: the node leaves the farm (its keys, its consumer) as wfuser.
    let status = a.terminate();
    assert!(status.success(), "{status:?}");
    farm.shutdown().await;
    let refusals = acl_log(&mut admin).await;
    assert!(
        refusals.is_empty(),
        "the server refused commands or keys to wfuser: {refusals:?}"
    );
    nothing_left(&redis, "acl").await;

    // A wrong password: a typed error from connect, within its connect timeout, and a
    // node that exits with a failure.
    let wrong = format!("redis://wfuser:wrong@127.0.0.1:{port}");
    let started = Instant::now();
    let connected = Farm::connect(
        RemoteOptions::new(wrong.clone(), "acl").connect_timeout(Duration::from_secs(2)),
    )
    .await;
    let took = started.elapsed();
    let Err(err) = connected else {
        panic!("connected with a wrong password")
    };
    assert!(matches!(err, CreateError::Engine { .. }), "{err:?}");
    assert!(took < Duration::from_secs(2), "took {took:?}: {err}");
    eprintln!("a wrong password failed connect in {took:?}: {err}");
    let mut c = NodeProc::start_url(&wrong, "acl", 1, 600);
    let deadline = Instant::now() + SOON;
    let status = loop {
        if let Some(status) = c.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "a node with a wrong password runs on"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(!status.success(), "{status:?}");
    let refusals = acl_log(&mut admin).await;
    assert!(
        refusals
            .iter()
            .any(|e| e.get("reason") == Some(&redis::Value::BulkString(b"auth".to_vec()))),
        "the server saw the failed logins: {refusals:?}"
    );
}

/// A private CA and a certificate it signed for 127.0.0.1 and localhost, written to `dir`
/// as PEM files: the CA's certificate, the server's certificate and the server's key.
fn tls_files(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.distinguished_name
        .push(DnType::CommonName, "workfarm test CA");
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut server =
        CertificateParams::new(["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
    server
        .distinguished_name
        .push(DnType::CommonName, "workfarm test redis-server");
    let server = server.signed_by(&key, &ca, &ca_key).unwrap();
    let paths = (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, server.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

/// Whether this `redis-server` was built with TLS: one that was accepts `--tls-port` (and
/// then finds nothing to listen on); one that was not refuses the directive.
fn redis_tls_support() -> Result<(), String> {
    let probe = Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            "0",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .current_dir(std::env::temp_dir())
        .output()
        .map_err(|e| e.to_string())?;
    let said = String::from_utf8_lossy(&probe.stdout);
    if said.contains("not listen anywhere") {
        Ok(())
    } else {
        Err(said.lines().last().unwrap_or("no output").to_owned())
    }
}

/// Not a test on its own: the caller process of
/// `nodes_and_a_caller_over_tls_check_the_server_against_a_private_ca`, which starts this
/// test binary again, with `SSL_CERT_FILE` set, to run it.
#[tokio::test]
#[ignore = "run by another test as a separate caller process"]
async fn tls_caller_process() {
    let Ok(url) = std::env::var("REMOTE_TLS_URL") else {
        return;
    };
    let farm = Farm::connect(RemoteOptions::new(url, "tls"))
        .await
        .expect("connects over TLS");
    farm.ready().await.unwrap();
    let calls: Vec<_> = (0..100i64)
        .map(|i| farm.run_method::<_, i64>("add", (i, 1)))
        .collect();
    for (i, v) in (0..100i64).zip(futures::future::join_all(calls).await) {
        assert_eq!(v.unwrap(), i + 1);
    }
    let pids = farm.broadcast_method::<_, u32>("pid", ()).await;
    assert_eq!(pids.successes.len(), 4, "2 nodes x 2 workers: {pids:?}");
    let stats = farm.stats().await;
    assert_eq!(stats.total.calls.succeeded, 100);
    farm.shutdown().await;
    println!("tls caller: 100 calls and a broadcast of 4 over TLS");
}

#[tokio::test]
async fn nodes_and_a_caller_over_tls_check_the_server_against_a_private_ca() {
    if !have_redis_server() {
        return;
    }
    if let Err(why) = redis_tls_support() {
        assert!(
            std::env::var_os("CI").is_none(),
            "redis-server has no TLS support: {why}"
        );
        eprintln!("skipped: redis-server has no TLS support: {why}");
        return;
    }
    let dir = temp_dir("redis-tls");
    let (ca, cert, key) = tls_files(&dir);
    // Only TLS on TCP (`--port 0`); the unix socket, plain, is the test's.
    let (redis, port) = Redis::start_on_tcp(dir, |port| {
        let mut args: Vec<String> = ["--tls-port", &port.to_string(), "--bind", "127.0.0.1"]
            .map(String::from)
            .to_vec();
        for (flag, file) in [
            ("--tls-cert-file", &cert),
            ("--tls-key-file", &key),
            ("--tls-ca-cert-file", &ca),
        ] {
            args.push(flag.to_owned());
            args.push(file.to_string_lossy().into_owned());
        }
        args.extend(["--tls-auth-clients", "no"].map(String::from));
        args
    });
    let url = format!("rediss://127.0.0.1:{port}");
    // The nodes trust the private CA through SSL_CERT_FILE (which replaces the system's
    // roots for rustls-native-certs); the server's name, 127.0.0.1, is checked.
    let trust = [("SSL_CERT_FILE", ca.as_os_str())];
    let _a = NodeProc::start_env(&url, "tls", 2, 10_000, &trust);
    let _b = NodeProc::start_env(&url, "tls", 2, 10_000, &trust);
    nodes_live(&redis, "tls", 2).await;
    // This process does not trust the CA: the certificate is refused, a typed error in time.
    trace_init();
    let started = Instant::now();
    let untrusted = Farm::connect(
        RemoteOptions::new(url.clone(), "tls").connect_timeout(Duration::from_secs(2)),
    )
    .await;
    let took = started.elapsed();
    let Err(err) = untrusted else {
        panic!("connected to a server whose certificate no trusted CA signed")
    };
    assert!(
        matches!(&err, CreateError::Engine { message } if message.contains("certificate")),
        "{err:?}"
    );
    assert!(took < Duration::from_secs(8), "took {took:?}: {err}");
    eprintln!("without the CA, connect failed in {took:?}: {err}");
    // A caller process that trusts it: calls and a broadcast round-trip.
    let child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "tls_caller_process", "--ignored", "--nocapture"])
        .env("REMOTE_TLS_URL", &url)
        .env("SSL_CERT_FILE", &ca)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), child)
        .await
        .expect("the TLS caller finishes")
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("1 passed"),
        "the TLS caller failed ({:?}):\n{said}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("over TLS"), "{said}");
    nothing_left(&redis, "tls").await;
}

#[tokio::test]
async fn a_killed_node_is_found_dead_by_its_lost_connection_while_its_liveness_key_still_says_alive(
) {
    let Some(redis) = Redis::start() else { return };
    // Leases of a minute: no call is taken over because its lease ran out.
    let mut a = NodeProc::start(&redis, "gone", 1, 60_000);
    nodes_live(&redis, "gone", 1).await;
    let farm = connect(&redis, "gone").await;
    let runs = counter_file("remote-gone");
    let path = runs.to_string_lossy().into_owned();
    let call = tokio::spawn({
        let farm = farm.clone();
        async move {
            farm.run_method::<_, u32>("log_block", (path, 5_000u64))
                .await
        }
    });
    wait_for_runs(&runs, 1, "node A never ran the call").await;
    let _b = NodeProc::start(&redis, "gone", 1, 60_000);
    nodes_live(&redis, "gone", 2).await;
    let mut conn = redis.conn().await;
    let members: Vec<String> = redis::cmd("ZRANGE")
        .arg("wf:{gone}:nodes")
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    // A's liveness key, kept alive by the test after A dies: only A's closed connection
    // can tell B that A is gone.
    let mut keys = Vec::new();
    for m in &members {
        let key = format!("wf:{{gone}}:node:{m}");
        let beat: Option<String> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        keys.push((key, beat.unwrap()));
    }
    let killed = Instant::now();
    a.kill();
    for (key, beat) in &keys {
        let _: () = redis::cmd("SET")
            .arg(key)
            .arg(beat)
            .arg("PX")
            .arg(120_000)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let pid = tokio::time::timeout(SOON, call)
        .await
        .expect("taken over well before the lease, with A's liveness key still there")
        .unwrap()
        .expect("completes on node B");
    let took = killed.elapsed();
    let logged = std::fs::read_to_string(&*runs).unwrap();
    let pids: Vec<&str> = logged.lines().collect();
    assert_eq!(pids.len(), 2, "ran on A, then once on B: {pids:?}");
    assert_eq!(pids[1], pid.to_string());
    eprintln!("a killed node's 5 s call completed elsewhere {took:?} after the kill");
    farm.shutdown().await;
}

#[tokio::test]
async fn a_remote_farm_reports_where_calls_ran_its_nodes_and_their_events() {
    let Some(redis) = Redis::start() else { return };
    let farm = connect(&redis, "seen").await;
    let mut events = farm.events();
    let _a = NodeProc::start(&redis, "seen", 2, 10_000);
    let _b = NodeProc::start(&redis, "seen", 1, 10_000);
    nodes_live(&redis, "seen", 2).await;
    // Status: both nodes, with their workers.
    let deadline = Instant::now() + SOON;
    let status = loop {
        let status = farm.status().await;
        if status.nodes.len() == 2 {
            break status;
        }
        assert!(Instant::now() < deadline, "{status:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut workers: Vec<usize> = status.nodes.iter().map(|n| n.workers).collect();
    workers.sort_unstable();
    assert_eq!(workers, [1, 2], "{status:?}");
    assert!(status.workers.is_empty());
    // with_info: the node's worker, its pid (the worker's own), attempts.
    let mut nodes_seen = std::collections::HashSet::new();
    for _ in 0..40 {
        let (pid, info) = farm
            .call::<_, u32>("pid", ())
            .start()
            .with_info()
            .await
            .unwrap();
        assert_eq!(info.pid, pid, "{info:?}");
        assert_eq!(info.attempts, 1);
        let node = info.worker.node().expect("a remote worker names its node");
        assert!(status.nodes.iter().any(|n| *n.name == *node), "{node}");
        assert!(info.worker.to_string().contains(&*node));
        nodes_seen.insert(node);
    }
    assert_eq!(nodes_seen.len(), 2, "calls went to both nodes");
    // Events: both nodes joined; each call done, by its node's worker.
    let mut joined = 0;
    let mut done = 0;
    let deadline = Instant::now() + SOON;
    while joined < 2 || done < 40 {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events.recv()).await {
            Ok(Ok(Event::NodeJoined { node, workers })) => {
                assert!(status
                    .nodes
                    .iter()
                    .any(|n| n.name == node && n.workers == workers));
                joined += 1;
            }
            Ok(Ok(Event::CallDone { worker, ok, .. })) => {
                assert!(ok && worker.node().is_some());
                done += 1;
            }
            Ok(Ok(_)) => {}
            other => panic!("{joined} joins and {done} calls done, then {other:?}"),
        }
    }
    // A broadcast's answers name their nodes too.
    let reached = farm.broadcast_method::<_, u32>("pid", ()).await;
    assert_eq!(reached.successes.len(), 3, "{:?}", reached.failures);
    assert!(reached.successes.iter().all(|(w, _)| w.node().is_some()));
    assert_eq!(farm.stats().await.duplicates, 0);
    farm.shutdown().await;
}

#[tokio::test]
async fn cancelling_a_call_a_node_runs_stops_it_there() {
    let Some(redis) = Redis::start() else { return };
    // One worker: while the cancelled call ran there, nothing else could. A lease of a
    // minute: the node renews it every 20 s, and only then would it find the entry gone.
    let _a = NodeProc::start(&redis, "stop", 1, 60_000);
    nodes_live(&redis, "stop", 1).await;
    let farm = connect(&redis, "stop").await;
    let runs = counter_file("remote-stop");
    let path = runs.to_string_lossy().into_owned();
    let call = farm.call::<_, u32>("log_block", (path, 30_000u64)).start();
    wait_for_runs(&runs, 1, "the node never ran the call").await;
    call.cancel();
    assert!(matches!(call.await, Err(CallError::Cancelled)));
    // The node's only worker is free again long before the 30 s call would have ended.
    let v: i64 = tokio::time::timeout(Duration::from_secs(10), farm.run_method("noop", 7))
        .await
        .expect("the cancelled call no longer holds the worker")
        .unwrap();
    assert_eq!(v, 7);
    nothing_left(&redis, "stop").await;
    farm.shutdown().await;
}

#[tokio::test]
async fn a_call_over_max_frame_is_refused_before_it_reaches_the_engine() {
    let Some(redis) = Redis::start() else { return };
    let farm = Farm::connect(RemoteOptions::new(redis.url.clone(), "big").max_frame(4096))
        .await
        .unwrap();
    let err = farm
        .run_method::<_, String>("echo", "x".repeat(10_000))
        .await
        .unwrap_err();
    assert!(matches!(err, CallError::Serialize { .. }), "{err:?}");
    assert_eq!(leftovers(&redis, "big").await, (0, 0), "nothing was added");
    farm.shutdown().await;
}

#[tokio::test]
async fn malformed_entries_written_by_something_else_are_acknowledged_and_crash_nothing() {
    let Some(redis) = Redis::start() else { return };
    let _a = NodeProc::start(&redis, "junk", 1, 10_000);
    nodes_live(&redis, "junk", 1).await;
    let farm = connect(&redis, "junk").await;
    let v: i64 = farm.run_method("noop", 1).await.unwrap();
    assert_eq!(v, 1);
    let mut conn = redis.conn().await;
    // Into the calls stream: no header; a header that is not one; an old wire version.
    for fields in [
        vec![("junk", "1")],
        vec![("h", "not a header"), ("b", "x")],
        vec![("h", "1 5 someone json 4 - - noop"), ("b", "5")],
    ] {
        let _: String = redis::cmd("XADD")
            .arg("wf:{junk}:calls")
            .arg("*")
            .arg(&fields)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    // The old-version call is answered (with an error) to its caller, "someone".
    let deadline = Instant::now() + SOON;
    loop {
        let answered: bool = redis::cmd("EXISTS")
            .arg("wf:{junk}:res:someone")
            .query_async(&mut conn)
            .await
            .unwrap();
        if answered {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the old-version call was never answered"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Into the caller's results stream.
    let mut results: Vec<String> = redis::cmd("KEYS")
        .arg("wf:{junk}:res:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    results.retain(|k| !k.ends_with(":res:someone"));
    assert_eq!(results.len(), 1, "{results:?}");
    for fields in [vec![("junk", "1")], vec![("h", "x y z"), ("b", "1")]] {
        let _: String = redis::cmd("XADD")
            .arg(&results[0])
            .arg("*")
            .arg(&fields)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    // The node and the caller go on serving, and the junk leaves the calls stream.
    for i in 0..20i64 {
        let v: i64 = tokio::time::timeout(SOON, farm.run_method("noop", i))
            .await
            .expect("calls flow after the junk")
            .unwrap();
        assert_eq!(v, i);
    }
    nothing_left(&redis, "junk").await;
    farm.shutdown().await;
}
