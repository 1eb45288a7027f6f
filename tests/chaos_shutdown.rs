//! Chaos: `shutdown()` and `kill()` with calls queued and in flight while other tasks keep
//! calling, and farms created and dropped in a loop. Every call settles, nothing is left
//! running, and no process, descriptor or thread leaks.
//!
//! The tests here measure process-wide counts (fds, threads, children), so they run one at
//! a time: each takes a global lock and builds its own runtime inside it.

mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use support::*;
use tokio::time::timeout;
use workfarm::{CallError, Event, Farm, WorkerState};

fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Calls `add` in a loop until the farm refuses with `ShutDown`; returns how many succeeded.
/// Any other error, a wrong sum, or a call that does not settle fails the test.
fn hammer(farm: &Farm, ok: Arc<AtomicUsize>) -> tokio::task::JoinHandle<()> {
    let farm = farm.clone();
    tokio::spawn(async move {
        for i in 0i64.. {
            match timeout(SOON, farm.run_method::<_, i64>("add", (i, 1)))
                .await
                .expect("a call made during shutdown settles")
            {
                Ok(v) => {
                    assert_eq!(v, i + 1);
                    ok.fetch_add(1, Ordering::Relaxed);
                }
                Err(CallError::ShutDown) => return,
                Err(other) => panic!("unexpected error while stopping: {other:?}"),
            }
        }
    })
}

#[derive(Clone, Copy, Debug)]
enum Stop {
    Shutdown,
    Kill,
}

/// One round: 2 workers × 2 slots, 12 sleep calls (4 in flight, 8 queued), two tasks
/// calling in a loop, then `stop`. Checks how each call settled and that every worker that
/// ever ran is gone once `stop` returns.
async fn stop_round(stop: Stop) {
    let farm = Farm::create(
        options(2)
            .max_concurrent_calls_per_worker(2)
            .kill_timeout(Duration::from_millis(300)),
    )
    .unwrap();
    let mut events = farm.events();
    let mut seen = Vec::new();
    collect_events(&mut events, 2, SOON, |e| {
        seen.push(e.clone());
        matches!(e, Event::Online { .. })
    })
    .await;

    let sleeps: Vec<_> = (0..12)
        .map(|_| tokio::spawn(timeout(SOON, farm.run_method::<_, u32>("sleep", 1000u64))))
        .collect();
    let status = wait_status(&farm, SOON, |s| s.in_flight() == 4).await;
    assert_eq!(status.queued, 8, "{status:?}");
    let hammered = Arc::new(AtomicUsize::new(0));
    let hammers: Vec<_> = (0..2).map(|_| hammer(&farm, hammered.clone())).collect();
    tokio::task::yield_now().await;

    let started = Instant::now();
    match stop {
        Stop::Shutdown => timeout(SOON, farm.shutdown())
            .await
            .expect("shutdown returns"),
        Stop::Kill => timeout(SOON, farm.kill()).await.expect("kill returns"),
    }
    let took = started.elapsed();

    // Nothing left running the moment it returns.
    seen.extend(drain(&mut events));
    let pids = spawned_pids(&seen);
    assert!(pids.len() >= 2, "{seen:?}");
    for &pid in &pids {
        assert!(
            !process_alive(pid),
            "{stop:?}: worker {pid} alive after it returned"
        );
    }
    let status = farm.status().await;
    assert!(
        status.workers.is_empty() && status.queued == 0,
        "{status:?}"
    );

    let mut ok = 0;
    for call in sleeps {
        match call.await.unwrap().expect("every call settles") {
            Ok(pid) => {
                assert!(pids.contains(&pid));
                ok += 1;
            }
            Err(CallError::ShutDown) => {}
            Err(other) => panic!("{stop:?}: unexpected error {other:?}"),
        }
    }
    for h in hammers {
        timeout(SOON, h)
            .await
            .expect("callers stop")
            .expect("caller task");
    }
    let exits: Vec<_> = seen
        .iter()
        .filter_map(|e| match e {
            Event::Exited { exit, .. } => Some(*exit),
            _ => None,
        })
        .collect();
    assert_eq!(
        exits.len(),
        pids.len(),
        "every spawned worker was reaped: {seen:?}"
    );
    match stop {
        Stop::Shutdown => {
            // The 4 in flight ran to the end (none of the queued ones could start: they were
            // failed at once); workers left because their stdin closed.
            assert_eq!(ok, 4, "in-flight calls finish on shutdown");
            assert!(exits.iter().all(|e| e.code == Some(0)), "{exits:?}");
            assert!(
                took >= Duration::from_millis(500),
                "shutdown waited for in-flight calls: {took:?}"
            );
        }
        Stop::Kill => {
            assert_eq!(ok, 0, "kill fails in-flight calls at once");
            assert!(took < Duration::from_secs(2), "kill took {took:?}");
        }
    }
    // Later calls are refused at once.
    let err = timeout(SOON, farm.run_method::<_, i64>("add", (1, 1)))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err, CallError::ShutDown);
}

#[test]
fn shutdown_with_calls_queued_and_in_flight_settles_everything() {
    let _serial = serial();
    runtime().block_on(async {
        for _ in 0..3 {
            stop_round(Stop::Shutdown).await;
        }
    });
}

#[test]
fn kill_with_calls_queued_and_in_flight_settles_everything() {
    let _serial = serial();
    runtime().block_on(async {
        for _ in 0..3 {
            stop_round(Stop::Kill).await;
        }
    });
}

#[test]
fn kill_sigkills_a_worker_that_ignores_sigterm() {
    let _serial = serial();
    runtime().block_on(async {
        let farm = Farm::create(options(1).kill_timeout(Duration::from_millis(300))).unwrap();
        let mut events = farm.events();
        let pid: u32 = farm.run_method("ignore_sigterm", ()).await.unwrap();
        let blocked = tokio::spawn(farm.run_method::<_, u32>("block", 30_000u64));
        wait_status(&farm, SOON, |s| s.in_flight() == 1).await;
        let started = Instant::now();
        timeout(SOON, farm.kill()).await.expect("kill returns");
        let took = started.elapsed();
        assert!(took < Duration::from_secs(3), "kill took {took:?}");
        assert!(!process_alive(pid));
        assert_eq!(timeout(SOON, blocked).await.unwrap().unwrap(), Err(CallError::ShutDown));
        let seen = drain(&mut events);
        assert!(
            seen.iter()
                .any(|e| matches!(e, Event::Exited { pid: p, exit, .. } if *p == pid && exit.signal == Some(9))),
            "{seen:?}"
        );
    });
}

#[test]
fn shutdown_and_kill_racing_from_several_tasks_both_return() {
    let _serial = serial();
    runtime().block_on(async {
        for round in 0..3 {
            let farm = Farm::create(options(2).kill_timeout(Duration::from_millis(300))).unwrap();
            let mut events = farm.events();
            let calls: Vec<_> = (0..30)
                .map(|i| {
                    tokio::spawn(timeout(
                        SOON,
                        farm.run_method::<_, u32>("sleep", 50u64 * (i % 5)),
                    ))
                })
                .collect();
            let hammered = Arc::new(AtomicUsize::new(0));
            let hammers: Vec<_> = (0..2).map(|_| hammer(&farm, hammered.clone())).collect();
            let (a, b, c) = (farm.clone(), farm.clone(), farm.clone());
            let stoppers = [
                tokio::spawn(async move { a.shutdown().await }),
                tokio::spawn(async move { b.kill().await }),
                tokio::spawn(async move { c.shutdown().await }),
            ];
            for s in stoppers {
                timeout(SOON, s).await.expect("stop returns").unwrap();
            }
            for pid in spawned_pids(&drain(&mut events)) {
                assert!(!process_alive(pid), "round {round}: worker {pid} alive");
            }
            for call in calls {
                match call.await.unwrap().expect("settles") {
                    Ok(_) | Err(CallError::ShutDown) => {}
                    Err(other) => panic!("unexpected {other:?}"),
                }
            }
            for h in hammers {
                timeout(SOON, h).await.expect("callers stop").unwrap();
            }
        }
    });
}

// ===== leaks =====

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn thread_count() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap()
}

/// Children of this process, zombies included (a zombie is a child nobody reaped).
fn children() -> HashSet<u32> {
    let me = std::process::id().to_string();
    let mut out = HashSet::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1));
        if ppid == Some(me.as_str()) {
            out.insert(pid);
        }
    }
    out
}

/// Polls `check` until it holds, failing with `what` after `within`.
async fn eventually(within: Duration, what: impl Fn() -> String, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "{}", what());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn fifty_farms_created_and_dropped_leak_nothing() {
    let _serial = serial();
    runtime().block_on(async {
        // Warm up: the worker binary, tracing, tokio's process reaper and signal pipe.
        {
            let farm = Farm::create(options(2)).unwrap();
            let mut events = farm.events();
            assert_eq!(farm.run_method::<_, i64>("add", (1, 1)).await.unwrap(), 2);
            let pids = spawned_pids(&drain(&mut events));
            drop(farm);
            for pid in pids {
                wait_gone(pid, SOON).await;
            }
        }
        eventually(
            SOON,
            || format!("warm-up children not reaped: {:?}", children()),
            || children().is_empty(),
        )
        .await;
        let (fds, threads) = (fd_count(), thread_count());

        let mut pids = Vec::new();
        for i in 0..50i64 {
            let farm = Farm::create(options(2)).unwrap();
            let mut events = farm.events();
            match i % 3 {
                // Dropped at once, workers still starting.
                0 => {}
                // Dropped with a call in flight: the call keeps the farm alive until it
                // settles, then the farm goes.
                1 => {
                    let call = farm.run_method::<_, u32>("sleep", 200u64);
                    wait_status(&farm, SOON, |s| s.in_flight() == 1).await;
                    let pending = tokio::spawn(call);
                    pids.extend(spawned_pids(&drain(&mut events)));
                    drop(farm);
                    let settled = timeout(SOON, pending)
                        .await
                        .expect("the call settles")
                        .unwrap();
                    assert!(settled.is_ok(), "{settled:?}");
                    continue;
                }
                // Used, then dropped.
                _ => assert_eq!(
                    farm.run_method::<_, i64>("add", (i, 1)).await.unwrap(),
                    i + 1
                ),
            }
            pids.extend(spawned_pids(&drain(&mut events)));
            drop(farm);
        }
        assert!(pids.len() >= 100, "{} workers seen", pids.len());
        for &pid in &pids {
            wait_gone(pid, SOON).await;
        }
        eventually(
            SOON,
            || format!("children left (zombies included): {:?}", children()),
            || children().is_empty(),
        )
        .await;
        eventually(
            SOON,
            || format!("fds: {fds} before, {} after", fd_count()),
            || fd_count() <= fds + 4,
        )
        .await;
        let after = thread_count();
        assert!(
            after <= threads + 4,
            "threads: {threads} before, {after} after"
        );
        eprintln!(
            "50 farms, {} workers: fds {fds} -> {}, threads {threads} -> {after}",
            pids.len(),
            fd_count()
        );
    });
}

#[test]
fn workers_killed_with_sigkill_leak_no_descriptors() {
    let _serial = serial();
    runtime().block_on(async {
        // Warm up the worker binary, tracing and tokio's process machinery.
        let farm = Farm::create(options(1)).unwrap();
        assert_eq!(farm.run_method::<_, i64>("add", (1, 1)).await.unwrap(), 2);
        farm.shutdown().await;
        let fds = fd_count();

        let farm = Farm::create(options(2)).unwrap();
        let mut events = farm.events();
        collect_events(&mut events, 2, SOON, |e| matches!(e, Event::Online { .. })).await;
        for _ in 0..10 {
            let pid: u32 = farm.run_method("pid", ()).await.unwrap();
            let status = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status()
                .unwrap();
            assert!(status.success());
            wait_for_event(
                &mut events,
                SOON,
                |e| matches!(e, Event::Exited { pid: p, .. } if *p == pid),
            )
            .await;
            wait_for_event(&mut events, SOON, |e| matches!(e, Event::Online { .. })).await;
        }
        farm.shutdown().await;
        drop(farm);
        eventually(
            SOON,
            || {
                format!(
                    "fds: {fds} before 10 kill -9s, {} after shutdown",
                    fd_count()
                )
            },
            || fd_count() <= fds + 2,
        )
        .await;
    });
}

#[test]
fn status_is_empty_after_stop() {
    let _serial = serial();
    runtime().block_on(async {
        let farm = Farm::create(options(2)).unwrap();
        wait_status(&farm, SOON, |s| {
            s.workers
                .iter()
                .filter(|w| w.state == WorkerState::Online)
                .count()
                == 2
        })
        .await;
        farm.shutdown().await;
        let status = farm.status().await;
        assert!(status.workers.is_empty(), "{status:?}");
        // Stopping again is a no-op that returns.
        timeout(SOON, farm.kill())
            .await
            .expect("kill after shutdown returns");
        timeout(SOON, farm.shutdown())
            .await
            .expect("shutdown after shutdown returns");
    });
}
