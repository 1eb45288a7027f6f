//! The soak: many calls through 4 workers while a chaos task SIGKILLs a random online worker
//! every ~300 ms and a share of the calls sleep past the timeout. Ignored by default; run with
//!
//! ```sh
//! cargo test --release --test chaos_soak -- --ignored --nocapture
//! ```
//!
//! `SOAK_CALLS` (default 100000) sets the number of calls, `SOAK_SLEEP_EVERY` (default 100,
//! so 1%) makes every n-th call a `sleep(3000)` that cannot finish within the 2 s timeout,
//! `SOAK_WINDOW` (default 1000) bounds the calls outstanding at once.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;
use tokio::sync::Semaphore;
use workfarm::{CallError, Farm, WorkerState};

const TIMEOUT: Duration = Duration::from_secs(2);
const SLEEP_MS: u64 = 3000;
const CHAOS_EVERY: Duration = Duration::from_millis(300);
const HARD_DEADLINE: Duration = Duration::from_secs(600);

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    // SAFETY: sysconf has no preconditions.
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64
}

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// How one call settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settled {
    Ok,
    FailedTimeout,
    FailedWorkerDied,
}

#[test]
#[ignore = "soak (minutes): cargo test --release --test chaos_soak -- --ignored --nocapture"]
fn soak_under_kills_and_timeouts() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        tokio::time::timeout(HARD_DEADLINE, soak())
            .await
            .expect("the soak hung: not every call settled within the hard deadline");
    });
}

async fn soak() {
    let calls = env_or("SOAK_CALLS", 100_000);
    let sleep_every = env_or("SOAK_SLEEP_EVERY", 100).max(1);
    let window = env_or("SOAK_WINDOW", 1000).max(1);
    let _ = worker_bin();
    let (rss_before, fds_before) = (rss_bytes(), fd_count());
    let started = Instant::now();

    let farm = Farm::create(options(4).timeout(TIMEOUT).max_retries(3)).unwrap();

    // Chaos: SIGKILL a random online worker every ~300 ms.
    let stop_chaos = Arc::new(AtomicBool::new(false));
    let kills = Arc::new(AtomicU64::new(0));
    let chaos = {
        let (farm, stop, kills) = (farm.clone(), stop_chaos.clone(), kills.clone());
        tokio::spawn(async move {
            let mut seed: u64 = 0x2545_F491_4F6C_DD1D ^ u64::from(std::process::id());
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(CHAOS_EVERY).await;
                let online: Vec<u32> = farm
                    .status()
                    .await
                    .workers
                    .iter()
                    .filter(|w| w.state == WorkerState::Online)
                    .map(|w| w.pid)
                    .collect();
                if online.is_empty() {
                    continue;
                }
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let pid = online[(seed % online.len() as u64) as usize];
                // SAFETY: kill(2) with integer arguments; the pid is a worker the farm has
                // not reaped yet (it is still in its status).
                if unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) } == 0 {
                    kills.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };

    // The calls, at most `window` outstanding; each reports how it settled.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Settled)>();
    let permits = Arc::new(Semaphore::new(window));
    let submitter = {
        let farm = farm.clone();
        tokio::spawn(async move {
            for i in 0..calls {
                let permit = permits.clone().acquire_owned().await.unwrap();
                let tx = tx.clone();
                if i % sleep_every == sleep_every / 2 {
                    let call = farm.run_method::<_, u32>("sleep", SLEEP_MS);
                    tokio::spawn(async move {
                        let result = call.await;
                        let settled = match result {
                            Ok(pid) => panic!(
                                "call {i}: sleep({SLEEP_MS}) beat a {TIMEOUT:?} timeout on {pid}"
                            ),
                            Err(e) => classify(i, &e),
                        };
                        let _ = tx.send((i, settled));
                        drop(permit);
                    });
                } else {
                    let call = farm.run_method::<_, i64>("noop", i as i64);
                    tokio::spawn(async move {
                        let settled = match call.await {
                            Ok(v) => {
                                assert_eq!(v, i as i64, "call {i}: wrong result");
                                Settled::Ok
                            }
                            Err(e) => classify(i, &e),
                        };
                        let _ = tx.send((i, settled));
                        drop(permit);
                    });
                }
            }
        })
    };

    let mut seen = vec![0u8; calls];
    let (mut settled, mut successes, mut timeouts, mut died) = (0usize, 0usize, 0usize, 0usize);
    let mut failed_noops = 0usize;
    while settled < calls {
        let (i, how) = rx.recv().await.expect("a call task panicked (see above)");
        seen[i] += 1;
        assert_eq!(seen[i], 1, "call {i} settled twice");
        settled += 1;
        match how {
            Settled::Ok => successes += 1,
            Settled::FailedTimeout => timeouts += 1,
            Settled::FailedWorkerDied => died += 1,
        }
        if how != Settled::Ok && i % sleep_every != sleep_every / 2 {
            failed_noops += 1;
        }
        if settled % 10_000 == 0 {
            eprintln!(
                "soak: {settled}/{calls} settled after {:?}",
                started.elapsed()
            );
        }
    }
    submitter.await.unwrap();
    assert!(seen.iter().all(|&n| n == 1), "a call never settled");
    // Nothing else arrives: every sender is gone once every call task has finished.
    assert!(rx.recv().await.is_none(), "a call settled more than once");

    stop_chaos.store(true, Ordering::Relaxed);
    chaos.await.unwrap();
    farm.shutdown().await;
    drop(farm);
    let wall = started.elapsed();
    let failures = timeouts + died;
    let sleeps = (0..calls)
        .filter(|i| i % sleep_every == sleep_every / 2)
        .count();
    assert_eq!(successes, calls - failures);
    assert!(successes >= calls - sleeps - failed_noops);
    // A long-lived worker is the exception here, so noops die with their worker now and
    // then; but most calls must succeed.
    assert!(
        failed_noops <= (calls - sleeps) / 100,
        "{failed_noops} noop calls failed out of {}",
        calls - sleeps
    );

    // Settle the process: the dead workers' descriptors are closed and their tasks end.
    let tasks = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while (fd_count() > fds_before + 16 || tasks() > 0) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (rss_after, fds_after, tasks_after) = (rss_bytes(), fd_count(), tasks());
    let kills = kills.load(Ordering::Relaxed);
    println!(
        "soak: calls {calls} (sleep every {sleep_every}), kills {kills}, successes {successes}, failures {failures} \
         (timeout-rooted {timeouts}, worker-died-rooted {died}; noops among them {failed_noops}), retries unknown \
         (not exposed by the API), wall {wall:.1?}, RSS {} -> {} MiB, fds {fds_before} -> {fds_after}, tasks left {tasks_after}",
        rss_before / (1 << 20),
        rss_after / (1 << 20)
    );
    assert!(kills > 0, "the chaos task killed nothing");
    assert!(
        rss_after < rss_before + 64 * (1 << 20),
        "RSS grew from {rss_before} to {rss_after} bytes"
    );
    assert!(
        fds_after <= fds_before + 16,
        "fds: {fds_before} -> {fds_after}"
    );
    assert_eq!(tasks_after, 0, "tasks still alive after the farm shut down");
}

/// Checks a failure is one the policy allows here and says which root it has.
fn classify(i: usize, e: &CallError) -> Settled {
    assert!(
        matches!(
            e,
            CallError::RetriesExhausted { .. } | CallError::Timeout { .. }
        ),
        "call {i}: unexpected failure {e:?}"
    );
    match e.root() {
        CallError::Timeout { .. } => Settled::FailedTimeout,
        CallError::WorkerDied { .. } => Settled::FailedWorkerDied,
        other => panic!("call {i}: unexpected root cause {other:?} of {e:?}"),
    }
}
