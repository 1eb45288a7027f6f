//! The shared process-pool workloads (`/work/shared/WORKLOADS.md`), run on workfarm.
//!
//! ```text
//! cargo bench --bench farm -- <workload>... [--serializer json|cbor|postcard] [--runtime current-thread|multi-thread]
//! ```
//!
//! Workloads: `noop_throughput`, `latency`, `payload`, `pi`, `startup` (the shared five),
//! then `queue_memory` and `scale64` (workfarm's own), or `all` for every one in that order.
//! Each prints one JSON line per metric on stdout and nothing else there; a failure exits
//! non-zero with `FAILED: <reason>` as the last line on stderr. `PEERS_QUICK=1` divides every
//! count by 10 and marks the lines `"quick": true`. The worker is the reference worker
//! (`worker-bin`), built here with `cargo build --release -p workfarm-worker` unless
//! `WORKFARM_WORKER_BIN` names one.

use serde::Serialize;
use serde_json::{json, Map, Value};
use std::collections::VecDeque;
use std::future::Future;
use std::future::IntoFuture;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use workfarm::serializer::{Cbor, Json, Postcard, Serializer};
use workfarm::{CallError, Farm, FarmOptions};

/// The shared five, in the order `all` runs them, then workfarm's own.
const WORKLOADS: &[&str] = &[
    "noop_throughput",
    "latency",
    "payload",
    "pi",
    "startup",
    "queue_memory",
    "scale64",
    "pipe_floor",
    "call_paths",
];

const WARMUP_CALLS: usize = 100;
/// Longest one workload may take before the run fails instead of hanging.
const WORKLOAD_LIMIT: Duration = Duration::from_secs(600);

/// `payload`: the argument's length, its golden ratio step and its left-to-right sum.
const PAYLOAD_VALUES: usize = 131_072;
const PAYLOAD_STEP: f64 = 0.618_033_988_749_894_9;
const PAYLOAD_SUM: f64 = 65_535.518_974_346_48;

/// `pi`: the seeds are `PI_SEED + k`; the counts the reference kernel gives at 5,000,000.
const PI_SEED: u32 = 2_463_534_242;
const PI_ITERATIONS: u64 = 5_000_000;
const PI_COUNTS: [u64; 8] = [
    3_928_028, 3_928_744, 3_928_361, 3_925_948, 3_927_376, 3_928_023, 3_926_693, 3_927_209,
];

type Outcome = Result<(), String>;

/// What every workload needs besides the serializer.
struct Ctx {
    worker: PathBuf,
    quick: bool,
    peer: String,
    serializer: &'static str,
    runtime: String,
    /// `--per-worker N`: calls in flight per worker; `None` is the library's default.
    per_worker: Option<usize>,
    note: String,
}

impl Ctx {
    /// A shared count, divided by 10 in quick mode.
    fn count(&self, full: usize) -> usize {
        if self.quick {
            full / 10
        } else {
            full
        }
    }

    fn options<S: Serializer>(&self, serializer: S, workers: usize) -> FarmOptions<S> {
        let options = FarmOptions::new(&self.worker).workers(workers);
        let options = match self.per_worker {
            Some(n) => options.max_concurrent_calls_per_worker(n),
            None => options,
        };
        options.serializer(serializer)
    }

    /// Prints one metric line. `extra` holds the workload's own parameters.
    #[allow(clippy::too_many_arguments)]
    fn emit(
        &self,
        workload: &str,
        metric: &str,
        value: f64,
        unit: &str,
        workers: usize,
        calls: usize,
        warmup_calls: usize,
        extra: Value,
    ) {
        let extra = match extra {
            Value::Object(map) => map,
            _ => Map::new(),
        };
        let line = Line {
            peer: &self.peer,
            workload,
            metric,
            value,
            unit,
            params: Params {
                workers,
                calls,
                warmup_calls,
                version: env!("CARGO_PKG_VERSION"),
                note: &self.note,
                serializer: self.serializer,
                runtime: &self.runtime,
                quick: self.quick.then_some(true),
                extra,
            },
        };
        println!(
            "{}",
            serde_json::to_string(&line).expect("a metric line always encodes")
        );
    }
}

#[derive(Serialize)]
struct Line<'a> {
    peer: &'a str,
    workload: &'a str,
    metric: &'a str,
    value: f64,
    unit: &'a str,
    params: Params<'a>,
}

#[derive(Serialize)]
struct Params<'a> {
    workers: usize,
    calls: usize,
    warmup_calls: usize,
    version: &'a str,
    note: &'a str,
    serializer: &'a str,
    runtime: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    quick: Option<bool>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

fn main() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        eprintln!("FAILED: panic: {}", one_line(&info.to_string()));
    }));
    if let Err(reason) = run() {
        eprintln!("FAILED: {}", one_line(&reason));
        std::process::exit(1);
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn run() -> Outcome {
    let mut workloads = Vec::new();
    let mut serializer = String::from("json");
    let mut runtime_flavor = String::from("current-thread");
    let mut per_worker = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--serializer" {
            serializer = args
                .next()
                .ok_or("--serializer needs json, cbor or postcard")?;
        } else if let Some(value) = arg.strip_prefix("--serializer=") {
            serializer = value.to_owned();
        } else if arg == "--runtime" {
            runtime_flavor = args
                .next()
                .ok_or("--runtime needs current-thread or multi-thread")?;
        } else if arg == "--per-worker" {
            let n = args.next().and_then(|n| n.parse().ok());
            per_worker = Some(n.ok_or("--per-worker needs a number of calls")?);
        } else if arg.starts_with("--") {
            // Cargo passes `--bench`; other flags are not ours either.
        } else if arg == "all" {
            workloads.extend(WORKLOADS.iter().map(|w| w.to_string()));
        } else if WORKLOADS.contains(&arg.as_str()) {
            workloads.push(arg);
        } else {
            return Err(format!(
                "unknown workload {arg:?} (expected all or one of {})",
                WORKLOADS.join(", ")
            ));
        }
    }
    if workloads.is_empty() {
        // As `cargo test --all-targets` runs it: nothing to measure, and not a failure.
        eprintln!(
            "no workload given (expected all or one of {}); nothing to do",
            WORKLOADS.join(", ")
        );
        return Ok(());
    }
    let serializer: &'static str = match serializer.as_str() {
        "json" => "json",
        "cbor" => "cbor",
        "postcard" => "postcard",
        other => {
            return Err(format!(
                "unknown serializer {other:?} (expected json, cbor or postcard)"
            ))
        }
    };
    let ctx = Ctx {
        worker: worker_binary()?,
        quick: std::env::var("PEERS_QUICK").is_ok_and(|v| v == "1"),
        peer: format!("workfarm-{serializer}"),
        serializer,
        runtime: runtime_flavor.clone(),
        per_worker,
        note: match per_worker {
            Some(n) => {
                format!("{n} calls in flight per worker (max_concurrent_calls_per_worker({n}))")
            }
            None => "library defaults".to_owned(),
        },
    };
    // The farm's dispatcher and I/O tasks run on the caller's runtime. On a current-thread
    // runtime a round trip wakes two threads (ours and the worker's), as a bare pipe
    // ping-pong does; a multi-thread runtime adds hand-offs between its threads.
    let mut builder = match runtime_flavor.as_str() {
        "current-thread" => tokio::runtime::Builder::new_current_thread(),
        "multi-thread" => tokio::runtime::Builder::new_multi_thread(),
        other => {
            return Err(format!(
                "unknown runtime {other:?} (expected current-thread or multi-thread)"
            ))
        }
    };
    let runtime = builder
        .enable_all()
        .build()
        .map_err(|e| format!("cannot build the tokio runtime: {e}"))?;
    for workload in &workloads {
        let result = match serializer {
            "cbor" => runtime.block_on(limited(workload, run_workload(&ctx, Cbor, workload))),
            "postcard" => {
                runtime.block_on(limited(workload, run_workload(&ctx, Postcard, workload)))
            }
            _ => runtime.block_on(limited(workload, run_workload(&ctx, Json, workload))),
        };
        result.map_err(|e| format!("{workload}: {e}"))?;
    }
    Ok(())
}

async fn limited(workload: &str, fut: impl Future<Output = Outcome>) -> Outcome {
    tokio::time::timeout(WORKLOAD_LIMIT, fut)
        .await
        .map_err(|_| format!("{workload} took longer than {WORKLOAD_LIMIT:?}"))?
}

/// The worker binary: `WORKFARM_WORKER_BIN`, or the reference worker built in release mode.
fn worker_binary() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("WORKFARM_WORKER_BIN") {
        return Ok(PathBuf::from(path));
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(&cargo)
        .args(["build", "--release", "-p", "workfarm-worker"])
        .current_dir(&root)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .map_err(|e| format!("cannot run {}: {e}", cargo.to_string_lossy()))?;
    if !status.success() {
        return Err(format!("building the worker failed ({status})"));
    }
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root.join(dir),
        None => root.join("target"),
    };
    let path = target.join("release").join("workfarm-worker");
    if !path.is_file() {
        return Err(format!("no worker binary at {}", path.display()));
    }
    Ok(path)
}

async fn run_workload<S: Serializer>(ctx: &Ctx, serializer: S, workload: &str) -> Outcome {
    match workload {
        "noop_throughput" => noop_throughput(ctx, serializer).await,
        "latency" => latency(ctx, serializer).await,
        "payload" => payload(ctx, serializer).await,
        "pi" => pi(ctx, serializer).await,
        "startup" => startup(ctx, serializer).await,
        "queue_memory" => queue_memory(ctx, serializer).await,
        "scale64" => scale64(ctx, serializer).await,
        "pipe_floor" => pipe_floor(ctx),
        "call_paths" => call_paths(ctx, serializer).await,
        other => Err(format!("unknown workload {other:?}")),
    }
}

fn create<S: Serializer>(ctx: &Ctx, serializer: S, workers: usize) -> Result<Farm<S>, String> {
    Farm::create(ctx.options(serializer, workers)).map_err(|e| format!("Farm::create: {e}"))
}

fn call_failed(method: &str, i: usize, e: CallError) -> String {
    format!("{method} call {i} failed: {e}")
}

/// Submits `noop(i)` for every `i` in `range` at once, then awaits them all, checking each.
async fn noop_all_at_once<S: Serializer>(farm: &Farm<S>, range: std::ops::Range<usize>) -> Outcome {
    let calls: Vec<_> = range
        .clone()
        .map(|i| farm.run_method::<_, i64>("noop", i as i64))
        .collect();
    for (i, call) in range.zip(calls) {
        let x = call.await.map_err(|e| call_failed("noop", i, e))?;
        if x != i as i64 {
            return Err(format!("noop({i}) returned {x}"));
        }
    }
    Ok(())
}

/// `noop(i)` for every `i` in `range`, with exactly `window` calls outstanding (FIFO).
async fn noop_window<S: Serializer>(farm: &Farm<S>, n: usize, window: usize) -> Outcome {
    let mut outstanding = VecDeque::with_capacity(window);
    let mut next = 0;
    let mut done = 0;
    while done < n {
        while next < n && outstanding.len() < window {
            outstanding.push_back(farm.run_method::<_, i64>("noop", next as i64));
            next += 1;
        }
        let call = outstanding.pop_front().expect("a call is outstanding");
        let x = call.await.map_err(|e| call_failed("noop", done, e))?;
        if x != done as i64 {
            return Err(format!("noop({done}) returned {x}"));
        }
        done += 1;
    }
    Ok(())
}

async fn noop_sequential<S: Serializer>(farm: &Farm<S>, n: usize) -> Outcome {
    for i in 0..n {
        let x: i64 = farm
            .run_method("noop", i as i64)
            .await
            .map_err(|e| call_failed("noop", i, e))?;
        if x != i as i64 {
            return Err(format!("noop({i}) returned {x}"));
        }
    }
    Ok(())
}

/// 1. `noop_throughput`: 2 workers; all at once, then a FIFO window of 64.
async fn noop_throughput<S: Serializer>(ctx: &Ctx, serializer: S) -> Outcome {
    const WORKLOAD: &str = "noop_throughput";
    let workers = 2;
    let n = ctx.count(20_000);
    let farm = create(ctx, serializer, workers)?;
    noop_all_at_once(&farm, 0..WARMUP_CALLS).await?;

    let start = Instant::now();
    noop_all_at_once(&farm, 0..n).await?;
    let all_at_once = start.elapsed();

    let window = 64;
    let start = Instant::now();
    noop_window(&farm, n, window).await?;
    let windowed = start.elapsed();

    // The per-call option path: the same calls, each with its own timeout, awaited as a
    // builder is (`IntoFuture`); then with a handle each (`start()`: cancel, info).
    let start = Instant::now();
    let calls: Vec<_> = (0..n)
        .map(|i| {
            farm.call::<_, i64>("noop", i as i64)
                .timeout(Duration::from_secs(60))
                .into_future()
        })
        .collect();
    for (i, call) in calls.into_iter().enumerate() {
        let x = call.await.map_err(|e| call_failed("noop", i, e))?;
        if x != i as i64 {
            return Err(format!("noop({i}) returned {x}"));
        }
    }
    let with_options = start.elapsed();
    let start = Instant::now();
    let calls: Vec<_> = (0..n)
        .map(|i| {
            farm.call::<_, i64>("noop", i as i64)
                .timeout(Duration::from_secs(60))
                .start()
        })
        .collect();
    for (i, call) in calls.into_iter().enumerate() {
        let x = call.await.map_err(|e| call_failed("noop", i, e))?;
        if x != i as i64 {
            return Err(format!("noop({i}) returned {x}"));
        }
    }
    let with_handles = start.elapsed();

    // A map over the same inputs, at its default bound, one call per input.
    let start = Instant::now();
    let mut mapped = farm.map::<_, _, i64>("noop", 0..n as i64);
    let mut i = 0;
    while let Some(x) = futures_util::StreamExt::next(&mut mapped).await {
        let x = x.map_err(|e| call_failed("noop", i, e))?;
        if x != i as i64 {
            return Err(format!("noop({i}) returned {x}"));
        }
        i += 1;
    }
    let map = start.elapsed();
    farm.shutdown().await;

    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    ctx.emit(
        WORKLOAD,
        "calls_per_s",
        rate(all_at_once),
        "calls/s",
        workers,
        n,
        WARMUP_CALLS,
        json!({}),
    );
    ctx.emit(
        WORKLOAD,
        "calls_per_s_window64",
        rate(windowed),
        "calls/s",
        workers,
        n,
        WARMUP_CALLS,
        json!({ "window": window }),
    );
    ctx.emit(
        WORKLOAD,
        "calls_per_s_options",
        rate(with_options),
        "calls/s",
        workers,
        n,
        WARMUP_CALLS,
        json!({ "path": "farm.call(..).timeout(..) awaited, all at once" }),
    );
    ctx.emit(
        WORKLOAD,
        "calls_per_s_handles",
        rate(with_handles),
        "calls/s",
        workers,
        n,
        WARMUP_CALLS,
        json!({ "path": "farm.call(..).timeout(..).start(), all at once" }),
    );
    ctx.emit(
        WORKLOAD,
        "calls_per_s_map",
        rate(map),
        "calls/s",
        workers,
        n,
        WARMUP_CALLS,
        json!({ "path": "farm.map(..), default bound, chunk_size 1" }),
    );
    Ok(())
}

/// `call_paths`: what per-call options cost. 2 workers, 200,000 noop calls all at once,
/// seven rounds, each running `run_method`, then the awaited `call(..).timeout(..)`, then
/// `call(..).timeout(..).start()` handles, in turn; the median rate of each.
async fn call_paths<S: Serializer>(ctx: &Ctx, serializer: S) -> Outcome {
    const WORKLOAD: &str = "call_paths";
    let workers = 2;
    let n = ctx.count(200_000);
    let farm = create(ctx, serializer, workers)?;
    noop_all_at_once(&farm, 0..WARMUP_CALLS).await?;
    let timeout = Duration::from_secs(60);
    let mut rates: [Vec<f64>; 3] = Default::default();
    for _ in 0..7 {
        let start = Instant::now();
        noop_all_at_once(&farm, 0..n).await?;
        rates[0].push(n as f64 / start.elapsed().as_secs_f64());
        let start = Instant::now();
        let calls: Vec<_> = (0..n)
            .map(|i| {
                farm.call::<_, i64>("noop", i as i64)
                    .timeout(timeout)
                    .into_future()
            })
            .collect();
        for (i, call) in calls.into_iter().enumerate() {
            call.await.map_err(|e| call_failed("noop", i, e))?;
        }
        rates[1].push(n as f64 / start.elapsed().as_secs_f64());
        let start = Instant::now();
        let calls: Vec<_> = (0..n)
            .map(|i| {
                farm.call::<_, i64>("noop", i as i64)
                    .timeout(timeout)
                    .start()
            })
            .collect();
        for (i, call) in calls.into_iter().enumerate() {
            call.await.map_err(|e| call_failed("noop", i, e))?;
        }
        rates[2].push(n as f64 / start.elapsed().as_secs_f64());
    }
    farm.shutdown().await;
    for (metric, mut r) in ["plain_per_s", "options_per_s", "handles_per_s"]
        .into_iter()
        .zip(rates)
    {
        r.sort_by(f64::total_cmp);
        ctx.emit(
            WORKLOAD,
            metric,
            r[r.len() / 2],
            "calls/s",
            workers,
            n,
            WARMUP_CALLS,
            json!({ "rounds": 7 }),
        );
    }
    Ok(())
}

/// 2. `latency`: 1 worker, sequential round trips; nearest-rank p50 and p99.
async fn latency<S: Serializer>(ctx: &Ctx, serializer: S) -> Outcome {
    const WORKLOAD: &str = "latency";
    let workers = 1;
    let n = ctx.count(2_000);
    let farm = create(ctx, serializer, workers)?;
    noop_sequential(&farm, WARMUP_CALLS).await?;

    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let start = Instant::now();
        let x: i64 = farm
            .run_method("noop", i as i64)
            .await
            .map_err(|e| call_failed("noop", i, e))?;
        samples.push(start.elapsed());
        if x != i as i64 {
            return Err(format!("noop({i}) returned {x}"));
        }
    }
    farm.shutdown().await;

    samples.sort_unstable();
    let rank =
        |q: f64| samples[((q * n as f64).ceil() as usize).max(1) - 1].as_nanos() as f64 / 1e3;
    ctx.emit(
        WORKLOAD,
        "p50_us",
        rank(0.50),
        "us",
        workers,
        n,
        WARMUP_CALLS,
        json!({}),
    );
    ctx.emit(
        WORKLOAD,
        "p99_us",
        rank(0.99),
        "us",
        workers,
        n,
        WARMUP_CALLS,
        json!({}),
    );
    Ok(())
}

fn payload_values() -> Vec<f64> {
    (0..PAYLOAD_VALUES)
        .map(|i| (i as f64 * PAYLOAD_STEP) % 1.0)
        .collect()
}

/// Left to right, as the workloads define it.
fn sum_left_to_right(xs: &[f64]) -> f64 {
    xs.iter().fold(0.0, |acc, x| acc + x)
}

fn check_sum(i: usize, got: f64, want: f64) -> Outcome {
    if (got - want).abs() <= 1e-9 * want.abs() {
        Ok(())
    } else {
        Err(format!("sum call {i} returned {got}, expected {want}"))
    }
}

/// 3. `payload`: 2 workers, calls of `sum` on 1 MiB of float64, all at once.
async fn payload<S: Serializer>(ctx: &Ctx, serializer: S) -> Outcome {
    const WORKLOAD: &str = "payload";
    let workers = 2;
    let n = ctx.count(200);
    let xs = payload_values();
    let want = sum_left_to_right(&xs);
    if (want - PAYLOAD_SUM).abs() > 1e-9 * PAYLOAD_SUM {
        return Err(format!(
            "the caller's own sum is {want}, expected {PAYLOAD_SUM}"
        ));
    }
    let farm = create(ctx, serializer, workers)?;
    noop_all_at_once(&farm, 0..WARMUP_CALLS).await?;
    let warm: Vec<_> = (0..2)
        .map(|_| farm.run_method::<_, f64>("sum", xs.clone()))
        .collect();
    for (i, call) in warm.into_iter().enumerate() {
        let got = call.await.map_err(|e| call_failed("warm-up sum", i, e))?;
        check_sum(i, got, want)?;
    }

    // `run_method` takes its argument by value: the copies are made before the clock starts.
    let copies: Vec<Vec<f64>> = (0..n).map(|_| xs.clone()).collect();
    let start = Instant::now();
    let calls: Vec<_> = copies
        .into_iter()
        .map(|xs| farm.run_method::<_, f64>("sum", xs))
        .collect();
    for (i, call) in calls.into_iter().enumerate() {
        let got = call.await.map_err(|e| call_failed("sum", i, e))?;
        check_sum(i, got, want)?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    farm.shutdown().await;

    let bytes = (n * PAYLOAD_VALUES * 8) as f64;
    let extra = json!({ "values": PAYLOAD_VALUES, "bytes_per_call": PAYLOAD_VALUES * 8, "warmup_sum_calls": 2 });
    ctx.emit(
        WORKLOAD,
        "MB_per_s",
        bytes / 1e6 / elapsed,
        "MB/s",
        workers,
        n,
        WARMUP_CALLS,
        extra.clone(),
    );
    ctx.emit(
        WORKLOAD,
        "calls_per_s",
        n as f64 / elapsed,
        "calls/s",
        workers,
        n,
        WARMUP_CALLS,
        extra,
    );
    Ok(())
}

/// The reference kernel, as the worker's `pi_kernel`: xorshift32, draws inside the quarter
/// circle.
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

/// 4. `pi`: 8 Monte Carlo calls, first in this process, then on 2 workers at once.
async fn pi<S: Serializer>(ctx: &Ctx, serializer: S) -> Outcome {
    const WORKLOAD: &str = "pi";
    let workers = 2;
    let iterations = ctx.count(PI_ITERATIONS as usize) as u64;
    let seeds: Vec<u32> = (0..8).map(|k| PI_SEED + k).collect();

    let start = Instant::now();
    let own: Vec<u64> = seeds
        .iter()
        .map(|&seed| pi_kernel(std::hint::black_box(iterations), seed))
        .collect();
    let single = start.elapsed().as_secs_f64();
    if !ctx.quick && own != PI_COUNTS {
        return Err(format!(
            "the caller's own counts are {own:?}, expected {PI_COUNTS:?}"
        ));
    }

    let farm = create(ctx, serializer, workers)?;
    noop_all_at_once(&farm, 0..WARMUP_CALLS).await?;
    let start = Instant::now();
    let calls: Vec<_> = seeds
        .iter()
        .map(|&seed| farm.run_method::<_, u64>("pi", (iterations, seed)))
        .collect();
    let mut counts = Vec::with_capacity(calls.len());
    for (k, call) in calls.into_iter().enumerate() {
        counts.push(call.await.map_err(|e| call_failed("pi", k, e))?);
    }
    let wall = start.elapsed().as_secs_f64();
    farm.shutdown().await;
    if counts != own {
        return Err(format!(
            "the farm's counts are {counts:?}, the caller's own {own:?}"
        ));
    }

    let n = seeds.len();
    let extra = json!({ "iterations": iterations, "first_seed": PI_SEED, "rng": "xorshift32" });
    ctx.emit(
        WORKLOAD,
        "wall_s",
        wall,
        "s",
        workers,
        n,
        WARMUP_CALLS,
        extra.clone(),
    );
    ctx.emit(
        WORKLOAD,
        "speedup",
        single / wall,
        "x",
        workers,
        n,
        WARMUP_CALLS,
        extra.clone(),
    );
    ctx.emit(
        WORKLOAD,
        "single_process_s",
        single,
        "s",
        workers,
        n,
        WARMUP_CALLS,
        extra,
    );
    Ok(())
}

/// 5. `startup`: from before `Farm::create` to the first result of `noop(1)`.
async fn startup<S: Serializer>(ctx: &Ctx, serializer: S) -> Outcome {
    let workers = 2;
    let options = ctx.options(serializer, workers);
    let start = Instant::now();
    let farm = Farm::create(options).map_err(|e| format!("Farm::create: {e}"))?;
    let x: i64 = farm
        .run_method("noop", 1i64)
        .await
        .map_err(|e| call_failed("noop", 1, e))?;
    let elapsed = start.elapsed();
    farm.shutdown().await;
    if x != 1 {
        return Err(format!("noop(1) returned {x}"));
    }
    ctx.emit(
        "startup",
        "ms",
        elapsed.as_secs_f64() * 1e3,
        "ms",
        workers,
        1,
        0,
        json!({}),
    );
    Ok(())
}

/// This process's resident set, in bytes, from `/proc/self/statm`.
fn rss_bytes() -> Result<u64, String> {
    let statm = std::fs::read_to_string("/proc/self/statm")
        .map_err(|e| format!("/proc/self/statm: {e}"))?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| format!("cannot parse /proc/self/statm: {statm:?}"))?;
    // SAFETY: sysconf has no memory effects.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Ok(pages * u64::try_from(page).unwrap_or(4096))
}

/// `queue_memory`: the parent's memory per queued call, 1,000,000 `noop` calls at once.
///
/// Every worker first gets as many `sleep` calls as it takes at once, so none of the `noop`
/// calls can leave the queue before the resident set is read.
async fn queue_memory<S: Serializer>(ctx: &Ctx, serializer: S) -> Outcome {
    const WORKLOAD: &str = "queue_memory";
    const PER_WORKER: usize = 10;
    const HOLD_MS: u64 = 4_000;
    let workers = 2;
    let n = ctx.count(1_000_000);
    let farm = create(ctx, serializer, workers)?;
    noop_all_at_once(&farm, 0..WARMUP_CALLS).await?;

    let holds: Vec<_> = (0..workers * PER_WORKER)
        .map(|_| farm.run_method::<_, u32>("sleep", HOLD_MS))
        .collect();
    // Wait until the holds occupy every slot (on a current-thread runtime the dispatcher
    // only runs when we yield).
    let deadline = Instant::now() + Duration::from_millis(HOLD_MS / 2);
    while farm.status().await.in_flight() < workers * PER_WORKER {
        if Instant::now() > deadline {
            return Err("the hold calls did not all start".into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let before = rss_bytes()?;
    let start = Instant::now();
    let calls: Vec<_> = (0..n)
        .map(|i| farm.run_method::<_, i64>("noop", i as i64))
        .collect();
    // The status request queues behind every call, so the dispatcher holds them all by now.
    let status = farm.status().await;
    let after = rss_bytes()?;
    let submit = start.elapsed().as_secs_f64();
    if status.queued != n {
        return Err(format!(
            "only {} of {n} calls were still queued when measured (submitting took {submit:.2} s, longer than the {HOLD_MS} ms hold)",
            status.queued
        ));
    }
    let future_bytes = calls.first().map_or(0, std::mem::size_of_val);

    for (i, hold) in holds.into_iter().enumerate() {
        hold.await.map_err(|e| call_failed("sleep", i, e))?;
    }
    let start = Instant::now();
    for (i, call) in calls.into_iter().enumerate() {
        let x = call.await.map_err(|e| call_failed("noop", i, e))?;
        if x != i as i64 {
            return Err(format!("noop({i}) returned {x}"));
        }
    }
    let drain = start.elapsed().as_secs_f64();
    farm.shutdown().await;

    let growth = after.saturating_sub(before);
    ctx.emit(
        WORKLOAD,
        "bytes_per_call",
        growth as f64 / n as f64,
        "bytes",
        workers,
        n,
        WARMUP_CALLS,
        json!({
            "measure": "growth of the parent's RSS (/proc/self/statm) while every call is queued, caller's futures included, divided by calls",
            "hold": format!("{} sleep({HOLD_MS} ms) calls fill every worker first, so nothing drains before the measure", workers * PER_WORKER),
            "queued_at_measure": status.queued,
            "caller_future_bytes": future_bytes,
            "rss_before": before,
            "rss_after": after,
            "submit_s": submit,
            "drain_s": drain,
        }),
    );
    Ok(())
}

/// `scale64`: 64 workers, 20,000 `noop` calls at once.
async fn scale64<S: Serializer>(ctx: &Ctx, serializer: S) -> Outcome {
    const WORKLOAD: &str = "scale64";
    let workers = 64;
    let n = ctx.count(20_000);
    let farm = create(ctx, serializer, workers)?;
    noop_all_at_once(&farm, 0..WARMUP_CALLS).await?;
    // Every worker answers once before the clock starts, so none is still starting.
    let hello = farm.broadcast_method::<_, i64>("noop", 7i64).await;
    if let Some((worker, e)) = hello.failures.first() {
        return Err(format!("warm-up broadcast failed on {worker:?}: {e}"));
    }
    if hello.successes.len() != workers || hello.successes.iter().any(|(_, x)| *x != 7) {
        return Err(format!(
            "warm-up broadcast reached {} of {workers} workers",
            hello.successes.len()
        ));
    }

    let start = Instant::now();
    noop_all_at_once(&farm, 0..n).await?;
    let elapsed = start.elapsed().as_secs_f64();
    farm.shutdown().await;

    ctx.emit(
        WORKLOAD,
        "calls_per_s",
        n as f64 / elapsed,
        "calls/s",
        workers,
        n,
        WARMUP_CALLS,
        json!({ "warmup_broadcast": true }),
    );
    Ok(())
}

/// `pipe_floor`: the same 2,000 sequential round trips as `latency`, but of 16 raw bytes
/// through `cat` (no farm, no runtime, no serializer): what the machine allows at the
/// moment, to read the `latency` figures against on this noisy shared machine.
fn pipe_floor(ctx: &Ctx) -> Outcome {
    use std::io::{Read, Write};
    const WORKLOAD: &str = "pipe_floor";
    let n = ctx.count(2_000);
    let mut child = std::process::Command::new("cat")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start cat: {e}"))?;
    let (Some(mut to), Some(mut from)) = (child.stdin.take(), child.stdout.take()) else {
        return Err("cat has no pipes".into());
    };
    let mut buf = [7u8; 16];
    let mut samples = Vec::with_capacity(n);
    for i in 0..WARMUP_CALLS + n {
        let start = Instant::now();
        to.write_all(&buf)
            .map_err(|e| format!("write to cat: {e}"))?;
        from.read_exact(&mut buf)
            .map_err(|e| format!("read from cat: {e}"))?;
        if i >= WARMUP_CALLS {
            samples.push(start.elapsed().as_secs_f64() * 1e6);
        }
    }
    drop(to);
    let _ = child.wait();
    samples.sort_by(f64::total_cmp);
    let rank = |q: f64| samples[((q * n as f64).ceil() as usize).saturating_sub(1)];
    let extra = json!({ "bytes": 16, "peer_process": "cat" });
    ctx.emit(
        WORKLOAD,
        "p50_us",
        rank(0.5),
        "us",
        1,
        n,
        WARMUP_CALLS,
        extra.clone(),
    );
    ctx.emit(
        WORKLOAD,
        "p99_us",
        rank(0.99),
        "us",
        1,
        n,
        WARMUP_CALLS,
        extra,
    );
    Ok(())
}
