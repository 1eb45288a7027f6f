//! `workfarm-worker --<scenario>`: the binary as a parent that owns a farm of copies of
//! itself, for tests that must kill, interrupt or starve the farm's own process. Each
//! scenario prints what the test needs on stdout, one fact per line.

use std::time::Duration;
use workfarm::{CallError, Event, Farm, FarmOptions};

/// The first arguments that make this binary a parent rather than a worker.
pub const SCENARIOS: &[&str] = &[
    "--parent",
    "--stalled-stderr",
    "--grandchildren",
    "--sigpipe",
    "--forgot-serve",
];

pub fn run(args: &[String]) {
    let scenario = args[0].as_str();
    let arg = |i: usize| args.get(i).map(String::as_str).unwrap_or("");
    let runtime = if scenario == "--stalled-stderr" {
        // The worst case for a blocking write: one thread runs the farm and every timer.
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Runtime::new()
    };
    let Ok(runtime) = runtime else {
        std::process::exit(2);
    };
    runtime.block_on(async {
        match scenario {
            "--parent" => graceful_on_sigint(arg(1).parse().unwrap_or(2)).await,
            "--stalled-stderr" => stalled_stderr().await,
            "--grandchildren" => grandchildren(arg(1).parse().unwrap_or(2), arg(2) == "busy").await,
            "--sigpipe" => sigpipe().await,
            "--forgot-serve" => forgot_serve(arg(1)).await,
            other => {
                eprintln!("parent: unknown scenario {other}");
                std::process::exit(2);
            }
        }
    });
}

fn create(options: FarmOptions) -> Farm {
    match Farm::create(options) {
        Ok(farm) => farm,
        Err(e) => {
            eprintln!("parent: {e}");
            std::process::exit(2);
        }
    }
}

/// Prints each worker's pid, then `ready`, then waits. On SIGINT it shuts the farm down
/// gracefully and prints how each worker exited, then `done`.
async fn graceful_on_sigint(workers: usize) {
    let farm = create(FarmOptions::current_exe().workers(workers));
    let mut events = farm.events();
    let pids = farm.broadcast_method::<_, u32>("pid", ()).await;
    for (_, pid) in &pids.successes {
        println!("{pid}");
    }
    // Listen for SIGINT before saying we are ready, so a test may send it right away.
    let mut interrupt =
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()) {
            Ok(interrupt) => interrupt,
            Err(e) => {
                eprintln!("parent: {e}");
                std::process::exit(2);
            }
        };
    println!("ready");
    let _ = interrupt.recv().await;
    farm.shutdown().await;
    while let Ok(event) = events.try_recv() {
        if let Event::Exited { pid, exit, .. } = event {
            println!("exited {pid} {exit}");
        }
    }
    println!("done");
}

/// Run with a stderr nobody reads: 200 calls whose workers write 200 KB each to stderr,
/// with a 3 s timeout. Prints `settled ok=<n> err=<n> dropped=<lines>`.
async fn stalled_stderr() {
    let farm = create(
        FarmOptions::current_exe()
            .workers(2)
            .timeout(Duration::from_secs(3)),
    );
    let mut events = farm.events();
    let calls: Vec<_> = (0..200)
        .map(|_| farm.run_method::<_, usize>("chatty", 100_000))
        .collect();
    let (mut ok, mut err) = (0, 0);
    for call in calls {
        match call.await {
            Ok(_) => ok += 1,
            Err(_) => err += 1,
        }
    }
    farm.shutdown().await;
    let mut dropped = 0;
    while let Ok(event) = events.try_recv() {
        if let Event::StderrDropped { lines, .. } = event {
            dropped += lines;
        }
    }
    println!("settled ok={ok} err={err} dropped={dropped}");
}

/// Each of `workers` workers starts `sleep 1000`; prints `worker <pid>` and `child <pid>`
/// lines, then (with `busy`, once every worker is inside a long sync call, so only the
/// parent-death signal can reach it) `ready`, and waits to be killed.
async fn grandchildren(workers: usize, busy: bool) {
    let farm = create(FarmOptions::current_exe().workers(workers));
    let pids = farm.broadcast_method::<_, u32>("pid", ()).await;
    let sleeps = farm.broadcast_method::<_, u32>("spawn_sleep", ()).await;
    if pids.successes.len() != workers || sleeps.successes.len() != workers {
        eprintln!(
            "parent: not every worker answered: {:?} {:?}",
            pids.failures, sleeps.failures
        );
        std::process::exit(2);
    }
    for (_, pid) in &pids.successes {
        println!("worker {pid}");
    }
    for (_, pid) in &sleeps.successes {
        println!("child {pid}");
    }
    if busy {
        for _ in 0..workers {
            let call = farm.run_method::<_, u32>("block", 600_000u64);
            tokio::spawn(call);
        }
        while farm.status().await.in_flight() < workers {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    println!("ready");
    std::future::pending::<()>().await;
}

/// With `SIGPIPE` at its default (as in a C host), a worker that closes its stdin and lives
/// on: its calls must fail, not kill this process. Prints `settled ok=<n> err=<n>`.
async fn sigpipe() {
    // SAFETY: restoring the default disposition of SIGPIPE has no memory effects.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let farm = create(FarmOptions::current_exe().workers(1).max_retries(0));
    if farm.run_method::<_, u32>("close_input", ()).await.is_err() {
        eprintln!("parent: close_input failed");
        std::process::exit(2);
    }
    // One at a time: the worker's reading thread was already blocked reading the old pipe,
    // so it still reads what the farm writes next; after that read the pipe has no reader.
    let (mut ok, mut err) = (0, 0);
    for i in 0..5 {
        match farm.run_method::<_, i64>("noop", i).await {
            Ok(_) => ok += 1,
            Err(e) => {
                eprintln!("parent: call failed: {e}");
                err += 1;
            }
        }
    }
    farm.shutdown().await;
    println!("settled ok={ok} err={err}");
}

/// A program that uses `FarmOptions::current_exe()` but forgot `serve_if_worker()`: every
/// process appends `<pid> <ppid>` to `log` first. Prints `refused <message>` with the error
/// `ready()` returns.
async fn forgot_serve(log: &str) {
    use std::io::Write;
    if let Ok(mut file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
    {
        // SAFETY: getppid has no preconditions.
        let ppid = unsafe { libc::getppid() };
        let _ = writeln!(file, "{} {ppid}", std::process::id());
    }
    // Should the farm's refusal ever regress, this stops the recursion at the second
    // generation (the test then fails on the log) instead of filling the process table.
    let depth: u32 = std::env::var("FORGOT_SERVE_DEPTH")
        .ok()
        .and_then(|d| d.parse().ok())
        .unwrap_or(0);
    if depth >= 2 {
        eprintln!("parent: recursion reached depth {depth}; stopping");
        std::process::exit(3);
    }
    let options = FarmOptions::current_exe()
        .workers(2)
        .args(["--forgot-serve", log])
        .env("FORGOT_SERVE_DEPTH", (depth + 1).to_string());
    let farm = create(options);
    match farm.ready().await {
        Err(CallError::WorkerStart { message }) => {
            println!("refused {}", message.replace('\n', " | "));
        }
        other => println!("unexpected {other:?}"),
    }
    farm.kill().await;
}
