//! The reference worker for workfarm's tests, examples and benchmarks.
//!
//! It is also the model of a worker binary: build a [`Worker`], register methods, `serve()`.
//! Each method below exists because a test or a benchmark needs it; the comment says which
//! behaviour it lets a test provoke.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;
use workfarm::worker::Worker;

mod parent;

/// What `info` reports about the worker process.
#[derive(Serialize)]
struct Info {
    pid: u32,
    args: Vec<String>,
    cwd: String,
    env: BTreeMap<String, String>,
}

/// A type whose deserialization panics.
struct PanicOnDecode;

impl<'de> Deserialize<'de> for PanicOnDecode {
    fn deserialize<D: serde::Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
        panic!("deserialize panicked")
    }
}

/// A record with strings, for serialization tests.
#[derive(Serialize, Deserialize)]
struct Floats {
    values: Vec<f64>,
}

/// Arguments of `quota`: the slots whose "API" allows `every` calls, then refuses for
/// `backoff_ms`; the others serve everything.
#[derive(Deserialize)]
struct Quota {
    limited: Vec<usize>,
    every: u32,
    backoff_ms: u64,
    /// Time each served call takes (the API call it stands for).
    #[serde(default)]
    work_ms: u64,
}

/// One call `quota` served: where and when (Unix time, ns; comparable across workers).
#[derive(Serialize)]
struct Served {
    slot: Option<usize>,
    pid: u32,
    token: Option<String>,
    at_ns: u128,
}

/// The quota's state in this worker: calls served since the last refusal, and the refusals.
static QUOTA: std::sync::Mutex<(u32, Vec<u128>)> = std::sync::Mutex::new((0, Vec::new()));

fn unix_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

fn quota(q: &Quota) -> Result<Served, workfarm::worker::Refuse> {
    let slot = Worker::slot();
    let at_ns = unix_ns();
    if slot.is_some_and(|s| q.limited.contains(&s)) {
        let mut state = QUOTA.lock().unwrap_or_else(|e| e.into_inner());
        if state.0 >= q.every {
            state.0 = 0;
            state.1.push(at_ns);
            return Err(
                workfarm::worker::Refuse::retry_after(Duration::from_millis(q.backoff_ms))
                    .because("quota used up"),
            );
        }
        state.0 += 1;
    }
    std::thread::sleep(Duration::from_millis(q.work_ms));
    Ok(Served {
        slot,
        pid: std::process::id(),
        token: std::env::var("TOKEN").ok(),
        at_ns,
    })
}

/// This worker's slot, pid and the times (Unix ns) it refused with a back-off.
fn quota_log() -> (Option<usize>, u32, Vec<u128>) {
    let state = QUOTA.lock().unwrap_or_else(|e| e.into_inner());
    (Worker::slot(), std::process::id(), state.1.clone())
}

/// Refuses the first call this worker sees with a back-off of `ms`, then serves.
fn refuse_first(ms: u64) -> Result<Option<usize>, workfarm::worker::Refuse> {
    static REFUSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !REFUSED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        return Err(workfarm::worker::Refuse::retry_after(
            Duration::from_millis(ms),
        ));
    }
    Ok(Worker::slot())
}

fn only_on(slots: &[usize]) -> Result<Option<usize>, workfarm::worker::Refuse> {
    let slot = Worker::slot();
    if slot.is_some_and(|s| slots.contains(&s)) {
        Ok(slot)
    } else {
        Err(workfarm::worker::Refuse::elsewhere().because("not my slot"))
    }
}

/// What the set-up may be asked to do (`FarmOptions::setup_args` / `PerWorker::setup_args`).
#[derive(Deserialize, Default)]
#[serde(default)]
struct SetupArgs {
    token: Option<String>,
    fail: Option<String>,
    panic: bool,
    delay_ms: u64,
}

/// What the set-up built, as `state` reports it.
#[derive(Serialize, Clone)]
struct State {
    token: Option<String>,
    slot: Option<usize>,
    pid: u32,
    env_token: Option<String>,
}

fn setup(args: Option<SetupArgs>) -> Result<State, String> {
    let args = args.unwrap_or_default();
    std::thread::sleep(Duration::from_millis(args.delay_ms));
    if args.panic {
        panic!("set-up panicked on purpose");
    }
    if let Some(message) = args.fail {
        return Err(message);
    }
    Ok(State {
        token: args.token,
        slot: Worker::slot(),
        pid: std::process::id(),
        env_token: std::env::var("TOKEN").ok(),
    })
}

fn main() {
    // `workfarm-worker --<scenario> ...`: act as a parent that owns a farm of copies of
    // itself (for tests that kill, interrupt or starve the parent); see `parent.rs`.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(first) = args.first() {
        if first == "--report-is-worker" {
            // Run by the `child_is_worker` method: what a worker's child thinks it is.
            println!("{}", Worker::is_worker());
            return;
        }
        if parent::SCENARIOS.contains(&first.as_str()) {
            parent::run(&args);
            return;
        }
    }
    // Start-up misbehaviour, chosen by the test through the environment.
    if let Ok(slot) = std::env::var("WORKER_EXIT_AT_START_IN_SLOT") {
        if Worker::slot().is_some_and(|s| s.to_string() == slot) {
            eprintln!("worker-bin: slot {slot} exits at start as asked");
            std::process::exit(5);
        }
    }
    if let Ok(code) = std::env::var("WORKER_EXIT_AT_START") {
        eprintln!("worker-bin: exiting at start as asked");
        std::process::exit(code.parse().unwrap_or(3));
    }
    if let Some(ms) = std::env::var("WORKER_EXIT_AFTER_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        // Dies on its own shortly after starting (after its handshake, if it is quick).
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(ms));
            std::process::exit(4);
        });
    }
    if std::env::var_os("WORKER_HANG_AT_START").is_some() {
        std::thread::sleep(Duration::from_secs(3600));
    }

    let worker = Worker::new()
        // Set-up: by default (no arguments) it does nothing; tests pass `SetupArgs` to make
        // it slow, fail or panic, and `state` reports what it built.
        .setup(setup)
        .method_with("state", |state: &State, ()| state.clone())
        .method_async_with(
            "state_async",
            |state: std::sync::Arc<State>, ()| async move { (*state).clone() },
        )
        // The default method: returns its argument.
        .default_method(|x: serde_json::Value| x)
        .method("echo", |x: serde_json::Value| x)
        .method("noop", |x: i64| x)
        .method("add", |(a, b): (i64, i64)| a + b)
        .method("pid", |()| std::process::id())
        // Its pid and pool slot, as it sees them.
        .method("slot", |()| (std::process::id(), Worker::slot()))
        .method("info", |()| Info {
            pid: std::process::id(),
            args: std::env::args().collect(),
            cwd: std::env::current_dir()
                .map(|d| d.display().to_string())
                .unwrap_or_default(),
            env: std::env::vars().collect(),
        })
        // Sleeps without blocking the worker's other calls; returns its pid.
        .method_async("sleep", |ms: u64| async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            std::process::id()
        })
        // Sleeps like "sleep", logging to `path` "<tag> done" when it finishes or
        // "<tag> dropped" when its future is dropped first (a cancelled call).
        .method_async(
            "guarded_sleep",
            |(path, tag, ms): (String, u64, u64)| async move {
                let mut guard = Guard {
                    path,
                    tag,
                    done: false,
                };
                tokio::time::sleep(Duration::from_millis(ms)).await;
                guard.done = true;
                std::process::id()
            },
        )
        // Blocks the worker's thread, like CPU-bound work; returns its pid.
        .method("block", |ms: u64| {
            std::thread::sleep(Duration::from_millis(ms));
            std::process::id()
        })
        // Appends `tag` as a line to `path` (each run leaves one line); returns it.
        .try_method("log_run", |(path, tag): (String, u64)| log_run(&path, tag))
        // Appends its pid to `path`, then blocks `ms`: counts how often a long call ran.
        .try_method("log_block", |(path, ms): (String, u64)| {
            log_run(&path, u64::from(std::process::id()))?;
            std::thread::sleep(Duration::from_millis(ms));
            Ok::<u32, String>(std::process::id())
        })
        // SIGKILLs this worker's parent (the farm, or a node of a farm across machines).
        .method("kill_parent", |()| -> () {
            // SAFETY: getppid and kill have no memory effects.
            unsafe { libc::kill(libc::getppid(), libc::SIGKILL) };
            std::thread::sleep(Duration::from_secs(60));
        })
        .try_method("fail", |message: String| Err::<(), _>(message))
        .try_method_async("fail_async", |message: String| async move {
            Err::<(), _>(message)
        })
        .method("panic", |message: String| boom(&message))
        .method_async("panic_async", |message: String| async move {
            tokio::task::yield_now().await;
            boom(&message)
        })
        // Exits the whole process with this code, mid-call.
        .method("exit", |code: i32| exit_now(code))
        // Aborts the whole process (SIGABRT), mid-call: a crash in native code, say.
        .method("abort", |()| -> () { std::process::abort() })
        // Closes the frame stream and keeps running (never answers, never exits).
        .method("close_frames", |()| close_frames())
        // Exits (mid-call) when the random draw is below `p`, else returns its pid.
        .method("exit_sometimes", |p: f64| {
            if rand_unit() < p {
                std::process::exit(7);
            }
            std::process::id()
        })
        // Exits until a counter file has been bumped `n` times, then answers 12.
        .method("stubborn", |(path, n): (String, u32)| {
            let seen: u32 = std::fs::read_to_string(&path)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0);
            if seen < n {
                let _ = std::fs::write(&path, (seen + 1).to_string());
                std::process::exit(9);
            }
            12
        })
        // Blocks `ms` the first time (creating the marker file), answers at once after;
        // returns its pid. For "timed out, then retried on another worker" tests.
        .method("slow_once", |(path, ms): (String, u64)| {
            if std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .is_ok()
            {
                std::thread::sleep(Duration::from_millis(ms));
            }
            std::process::id()
        })
        // Never returns: only a timeout (and a kill) ends it.
        .method("spin", |()| -> () {
            #[allow(clippy::empty_loop)]
            loop {
                std::hint::spin_loop();
            }
        })
        // Ignores the polite SIGTERM from now on, for kill-timeout tests.
        .method("ignore_sigterm", |()| {
            // SAFETY: installing SIG_IGN for SIGTERM has no memory effects.
            unsafe { libc::signal(libc::SIGTERM, libc::SIG_IGN) };
            std::process::id()
        })
        // Writes `n` bytes to stdout through print! and to stderr, then returns `n`.
        .method("chatty", |n: usize| {
            let line = "x".repeat(99);
            for _ in 0..n / 100 {
                println!("{line}");
                eprintln!("{line}");
            }
            let _ = std::io::stdout().flush();
            n
        })
        // Writes `n` lines "`tag` i" to stderr; returns its slot and pid.
        .method("stderr_lines", |(tag, n): (String, usize)| {
            let mut err = std::io::stderr().lock();
            for i in 0..n {
                let _ = writeln!(err, "{tag} {i}");
            }
            (Worker::slot(), std::process::id())
        })
        // Returns a string of `n` bytes (for frame-cap tests).
        .method("big", |n: usize| "y".repeat(n))
        // Leaks `mib` MiB of touched memory (for memory-limit tests); returns its pid.
        .method("hog", |mib: usize| {
            let block = vec![1u8; mib * 1024 * 1024];
            std::mem::forget(block);
            std::process::id()
        })
        // Writes raw junk on the frame stream, then answers its pid (for protocol-fault
        // tests): "oversize" is a length prefix over any cap, anything else an unknown tag.
        .method("garbage", |kind: String| garbage(&kind))
        // Arguments whose own Deserialize impl panics (user serde code can panic too).
        .method("decode_panic", |_: PanicOnDecode| 0u8)
        .method_async("decode_panic_async", |_: PanicOnDecode| async { 0u8 })
        .method("bytes", |b: serde_bytes::ByteBuf| b)
        .method("floats", |f: Floats| f)
        .method("int_keys", |m: BTreeMap<i64, String>| m)
        .method("sum", |xs: Vec<f64>| xs.iter().sum::<f64>())
        // Builds a runtime of its own and blocks on it, as blocking clients
        // (`reqwest::blocking`, many SDKs) do inside; returns 7.
        .method("own_runtime", |()| own_runtime())
        // Whether this process is a worker, and whether a child it starts thinks it is one
        // (with the worker's stdin, or with a pipe of its own as stdin).
        .method("is_worker", |()| Worker::is_worker())
        .try_method("child_is_worker", |piped: bool| child_is_worker(piped))
        // Starts `sleep 1000` and returns its pid (a grandchild of the farm).
        .try_method("spawn_sleep", |()| spawn_sleep())
        // Stops reading the farm's pipe (its last reader goes) and lives on, deaf; answers
        // its pid.
        .method("close_input", |()| close_input())
        // The buffer sizes of the worker's two frame pipes: (input, output).
        .method("pipe_sizes", |()| frame_pipe_sizes())
        // Tries to shrink the shared memory files the farm passed: (how many are open, how
        // many it could shrink).
        .method("shrink_rings", |()| shrink_rings())
        .method("pi", |(n, seed): (u64, u32)| pi_kernel(n, seed))
        // Refusals: a quota of `every` calls per `backoff_ms` window on the listed slots,
        // and a filter that serves only the listed slots.
        .try_method("quota", |q: Quota| quota(&q))
        .method("quota_log", |()| quota_log())
        .try_method("only_on", |slots: Vec<usize>| only_on(&slots))
        .try_method("refuse_first", |ms: u64| refuse_first(ms));

    // `WORKER_THREADS=n`: run up to n sync handlers at once.
    let threads = std::env::var("WORKER_THREADS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1);
    if let Err(e) = worker.threads(threads).serve() {
        eprintln!("worker-bin: {e}");
        std::process::exit(1);
    }
}

fn boom(message: &str) {
    panic!("{message}")
}

fn exit_now(code: i32) {
    std::process::exit(code)
}

/// The reference Monte Carlo kernel of the shared workloads: xorshift32, count the draws
/// inside the unit quarter circle.
fn pi_kernel(n: u64, seed: u32) -> u64 {
    let mut s = seed;
    let mut step = move || {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        f64::from(s) / 4_294_967_296.0
    };
    (0..n)
        .filter(|_| {
            let (x, y) = (step(), step());
            x * x + y * y <= 1.0
        })
        .count() as u64
}

/// Writes junk to the frame descriptor (see [`frame_fds`]).
fn garbage(kind: &str) -> u32 {
    // A Shared frame (tag 0x87) naming a place far outside any ring.
    let shared: Vec<u8> = [
        13u32.to_le_bytes().as_slice(),
        &[0x87],
        &u64::MAX.to_le_bytes(),
        &[1, 0, 0, 0],
    ]
    .concat();
    let junk: &[u8] = match kind {
        "oversize" => &[0xff, 0xff, 0xff, 0x7f, b'j', b'u', b'n', b'k'],
        "shared" => &shared,
        _ => &[1, 0, 0, 0, 0xee],
    };
    let Some(fd) = frame_fds().output else {
        panic!("garbage: no frame descriptor found")
    };
    // SAFETY: write(2) from a live slice to an open descriptor.
    unsafe { libc::write(fd, junk.as_ptr().cast(), junk.len()) };
    std::process::id()
}

/// Closes the frame descriptor (see [`frame_fds`]), then blocks for good.
fn close_frames() -> u32 {
    if let Some(fd) = frame_fds().output {
        // SAFETY: closing a descriptor this process owns; nothing else uses it until the
        // worker's next write, which then fails (the point of the test).
        unsafe { libc::close(fd) };
    }
    std::thread::sleep(Duration::from_secs(3600));
    std::process::id()
}

/// A uniform draw in [0, 1) from the clock and pid; good enough for fault injection.
fn rand_unit() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mut x = u64::from(nanos) ^ (u64::from(std::process::id()) << 32) ^ 0x9E37_79B9_7F4A_7C15;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    (x >> 11) as f64 / (1u64 << 53) as f64
}

fn own_runtime() -> u32 {
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return 0;
    };
    runtime.block_on(async {
        tokio::time::sleep(Duration::from_millis(1)).await;
        7
    })
}

fn child_is_worker(piped: bool) -> Result<bool, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--report-is-worker");
    if piped {
        cmd.stdin(std::process::Stdio::piped());
    }
    let out = cmd.output().map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&out.stdout).trim() == "true")
}

fn spawn_sleep() -> Result<u32, String> {
    let child = std::process::Command::new("sleep")
        .arg("1000")
        .stdin(std::process::Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    // Not waited for: it is meant to outlive this call.
    Ok(child.id())
}

/// The worker's private frame descriptors: the pipes among fds 3..64 other than stderr's,
/// told apart by how they are open (`/proc/self/fdinfo`). Serving has pointed fd 0 at
/// `/dev/null` and fd 1 at stderr.
struct FrameFds {
    input: Option<i32>,
    output: Option<i32>,
}

fn frame_fds() -> FrameFds {
    let link = |fd: i32| std::fs::read_link(format!("/proc/self/fd/{fd}")).ok();
    let stderr = link(2);
    let read_only = |fd: i32| {
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
        let flags = info.lines().find_map(|l| l.strip_prefix("flags:"))?;
        Some(u32::from_str_radix(flags.trim(), 8).ok()? & 0o3 == 0)
    };
    let mut fds = FrameFds {
        input: None,
        output: None,
    };
    for fd in 3..64 {
        let Some(target) = link(fd) else { continue };
        if !target.to_string_lossy().starts_with("pipe:") || Some(&target) == stderr.as_ref() {
            continue;
        }
        match read_only(fd) {
            Some(true) => fds.input = fds.input.or(Some(fd)),
            Some(false) => fds.output = fds.output.or(Some(fd)),
            None => {}
        }
    }
    fds
}

fn close_input() -> u32 {
    // A pipe nobody will ever write: the serving loop waits on it for good.
    let mut fds = [0; 2];
    // SAFETY: pipe writes two new descriptors into the array.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return 0;
    }
    if let Some(input) = frame_fds().input {
        // SAFETY: dup2 onto a descriptor this process owns: it now reads the new pipe, and
        // the farm's pipe loses its only reader.
        unsafe { libc::dup2(fds[0], input) };
    }
    std::process::id()
}

fn frame_pipe_sizes() -> (usize, usize) {
    let size = |fd: Option<i32>| {
        // SAFETY: fcntl with integer arguments on a descriptor this process owns.
        fd.and_then(|fd| usize::try_from(unsafe { libc::fcntl(fd, libc::F_GETPIPE_SZ) }).ok())
            .unwrap_or(0)
    };
    let fds = frame_fds();
    (size(fds.input), size(fds.output))
}

/// Logs how a "guarded_sleep" ended.
struct Guard {
    path: String,
    tag: u64,
    done: bool,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let how = if self.done { "done" } else { "dropped" };
        let _ = append_line(&self.path, &format!("{} {how}", self.tag));
    }
}

fn append_line(path: &str, line: &str) -> Result<(), String> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("{path}: {e}"))?;
    file.write_all(format!("{line}\n").as_bytes())
        .map_err(|e| format!("{path}: {e}"))
}

fn log_run(path: &str, tag: u64) -> Result<u64, String> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("{path}: {e}"))?;
    // One write of a whole line: appends from several workers never interleave.
    file.write_all(format!("{tag}\n").as_bytes())
        .map_err(|e| format!("{path}: {e}"))?;
    Ok(tag)
}

fn shrink_rings() -> (usize, usize) {
    let named = std::env::var("WORKFARM_RINGS").unwrap_or_default();
    let fds: Vec<i32> = named
        .split(',')
        .filter_map(|fd| fd.parse().ok())
        // SAFETY: fcntl(F_GETFD) only queries.
        .filter(|&fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0)
        .collect();
    // SAFETY: ftruncate with integer arguments on descriptors this process holds.
    let shrunk = fds
        .iter()
        .filter(|&&fd| unsafe { libc::ftruncate(fd, 0) } == 0)
        .count();
    (fds.len(), shrunk)
}
