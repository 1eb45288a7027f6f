//! Broadcast: one call on every live worker, each worker's success or failure reported apart,
//! never retried elsewhere.

mod support;

use std::collections::HashSet;
use std::time::Duration;
use support::*;
use workfarm::{CallError, Event, Farm};

async fn wait_in_flight(farm: &Farm, n: usize) {
    let deadline = tokio::time::Instant::now() + SOON;
    loop {
        let s = farm.status().await;
        if s.in_flight() == n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never {n} in flight: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test]
async fn broadcast_default_method_reaches_each_worker_once() {
    let farm = Farm::create(options(3)).unwrap();
    let mut events = farm.events();
    // Sent right away: workers that are still starting get it once they are online.
    let result = farm.broadcast::<_, String>("hello all").await;
    assert!(result.failures.is_empty(), "{:?}", result.failures);
    assert_eq!(result.successes.len(), 3);
    assert!(result.successes.iter().all(|(_, v)| v == "hello all"));
    let ids: HashSet<_> = result.successes.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids.len(), 3, "three different workers answered");

    let status = farm.status().await;
    let live: HashSet<_> = status.workers.iter().map(|w| w.id).collect();
    assert_eq!(ids, live);
    // Exactly one successful CallDone per worker.
    let done: Vec<_> = drain(&mut events)
        .into_iter()
        .filter_map(|e| match e {
            Event::CallDone { worker, ok, .. } => Some((worker, ok)),
            _ => None,
        })
        .collect();
    assert_eq!(done.len(), 3, "{done:?}");
    assert!(done.iter().all(|(_, ok)| *ok));
    let done_ids: HashSet<_> = done.iter().map(|(w, _)| *w).collect();
    assert_eq!(done_ids, ids);
    // Broadcasts do not count towards ttl.
    assert!(status.workers.iter().all(|w| w.handed == 0), "{status:?}");
    farm.shutdown().await;
}

#[tokio::test]
async fn broadcast_method_gives_each_worker_pid() {
    let farm = Farm::create(options(2)).unwrap();
    let status = all_online(&farm, 2).await;
    let result = farm.broadcast_method::<_, u32>("pid", ()).await;
    assert!(result.failures.is_empty(), "{:?}", result.failures);
    assert_eq!(result.successes.len(), 2);
    let pids: HashSet<u32> = result.successes.iter().map(|(_, p)| *p).collect();
    assert_eq!(pids.len(), 2, "distinct pids");
    for (id, pid) in &result.successes {
        let w = status
            .workers
            .iter()
            .find(|w| w.id == *id)
            .expect("a live worker");
        assert_eq!(w.pid, *pid);
    }
    // Again, with a tuple argument.
    let sums = farm.broadcast_method::<_, i64>("add", (2, 3)).await;
    assert_eq!(sums.successes.len(), 2);
    assert!(sums.successes.iter().all(|(_, s)| *s == 5));
    farm.shutdown().await;
}

#[tokio::test]
async fn broadcast_waits_for_busy_workers() {
    let farm = Farm::create(options(2).max_concurrent_calls_per_worker(1)).unwrap();
    all_online(&farm, 2).await;
    // Both workers busy: the broadcast runs on each once its slot frees up.
    let busy: Vec<_> = (0..2)
        .map(|_| farm.run_method::<_, u32>("block", 300u64))
        .collect();
    wait_in_flight(&farm, 2).await;
    let start = std::time::Instant::now();
    let result = farm.broadcast_method::<_, u32>("pid", ()).await;
    assert!(
        start.elapsed() >= Duration::from_millis(200),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(result.successes.len(), 2);
    let mut busy_pids = HashSet::new();
    for call in busy {
        busy_pids.insert(call.await.unwrap());
    }
    let pids: HashSet<u32> = result.successes.iter().map(|(_, p)| *p).collect();
    assert_eq!(pids, busy_pids);
    farm.shutdown().await;
}

#[tokio::test]
async fn broadcast_failures_are_reported_per_worker() {
    let farm = Farm::create(options(3).max_retries(0)).unwrap();
    let status = all_online(&farm, 3).await;
    let result = farm.broadcast_method::<_, ()>("fail", "no can do").await;
    assert!(result.successes.is_empty());
    assert_eq!(result.failures.len(), 3);
    for (_, err) in &result.failures {
        assert_eq!(
            *err,
            CallError::Handler {
                method: "fail".into(),
                message: "no can do".into()
            }
        );
    }
    let ids: HashSet<_> = result.failures.iter().map(|(id, _)| *id).collect();
    let live: HashSet<_> = status.workers.iter().map(|w| w.id).collect();
    assert_eq!(ids, live, "each failure names its worker");

    // Mixed: a panic in every worker is a failure for each, and the workers live on.
    let result = farm.broadcast_method::<_, ()>("panic", "all at once").await;
    assert_eq!(result.failures.len(), 3);
    assert!(result
        .failures
        .iter()
        .all(|(_, e)| matches!(e, CallError::Panic { .. })));
    let after = farm.status().await;
    let pids: HashSet<u32> = after.workers.iter().map(|w| w.pid).collect();
    let before: HashSet<u32> = status.workers.iter().map(|w| w.pid).collect();
    assert_eq!(pids, before);
    farm.shutdown().await;
}

#[tokio::test]
async fn broadcast_result_of_the_wrong_type_fails_on_each_worker() {
    let farm = Farm::create(options(2)).unwrap();
    let result = farm
        .broadcast_method::<_, u32>("echo", "not a number")
        .await;
    assert!(result.successes.is_empty());
    assert_eq!(result.failures.len(), 2);
    for (_, e) in &result.failures {
        assert!(
            matches!(
                e,
                CallError::Deserialize {
                    type_name: "u32",
                    ..
                }
            ),
            "{e:?}"
        );
    }
    farm.shutdown().await;
}

/// One worker of two dies during the broadcast: that worker's entry is a `WorkerDied`
/// failure; the call is not retried on the other worker or on the replacement.
#[tokio::test]
async fn a_worker_dying_during_a_broadcast_is_its_failure_only() {
    let counter =
        std::env::temp_dir().join(format!("workfarm-bcast-stubborn-{}", std::process::id()));
    let _ = std::fs::remove_file(&counter);
    let farm = Farm::create(options(2).max_concurrent_calls_per_worker(1).max_retries(3)).unwrap();
    let mut events = farm.events();
    let status = all_online(&farm, 2).await;
    let pids: HashSet<u32> = status.workers.iter().map(|w| w.pid).collect();

    // Hold one worker busy so the other runs `stubborn` first: it bumps the counter from 0
    // to 1 and exits; the busy one runs it a second later, sees 1 and answers 12.
    let busy = farm.run_method::<_, u32>("block", 1000u64);
    wait_in_flight(&farm, 1).await;
    let path = counter.display().to_string();
    let result = farm
        .broadcast_method::<_, u32>("stubborn", (path, 1u32))
        .await;
    let busy_pid = busy.await.unwrap();

    assert_eq!(result.successes.len() + result.failures.len(), 2);
    assert_eq!(result.successes.len(), 1, "{result:?}");
    assert_eq!(result.failures.len(), 1, "{result:?}");
    let (ok_worker, twelve) = result.successes[0];
    assert_eq!(twelve, 12);
    let ok_pid = status
        .workers
        .iter()
        .find(|w| w.id == ok_worker)
        .unwrap()
        .pid;
    assert_eq!(ok_pid, busy_pid);
    let (dead_worker, err) = &result.failures[0];
    match err {
        CallError::WorkerDied {
            worker, pid, exit, ..
        } => {
            assert_eq!(worker, dead_worker);
            assert_ne!(*pid, busy_pid);
            assert!(pids.contains(pid));
            assert_eq!(exit.code, Some(9));
        }
        other => panic!("expected WorkerDied, got {other:?}"),
    }
    assert_eq!(std::fs::read_to_string(&counter).unwrap().trim(), "1");

    // The dead worker is replaced; the broadcast never ran on the replacement.
    let online = wait_for_event(&mut events, SOON, |e| {
        matches!(e, Event::Online { worker, .. } if !status.workers.iter().any(|w| w.id == *worker))
    })
    .await;
    let replacement = online.worker().unwrap();
    farm.shutdown().await;
    let done: Vec<_> = drain(&mut events)
        .into_iter()
        .filter_map(|e| match e {
            Event::CallDone { worker, ok, .. } => Some((worker, ok)),
            _ => None,
        })
        .collect();
    // The block call and the one successful stubborn call: no retry anywhere.
    assert_eq!(done.len(), 2, "{done:?}");
    assert!(done
        .iter()
        .all(|(w, _)| *w == ok_worker && *w != replacement));
    let _ = std::fs::remove_file(&counter);
}

#[tokio::test]
async fn every_worker_exiting_in_a_broadcast_fails_each_without_retry() {
    let farm = Farm::create(options(2).max_retries(3)).unwrap();
    let status = all_online(&farm, 2).await;
    let result = farm.broadcast_method::<_, ()>("exit", 4).await;
    assert!(result.successes.is_empty());
    assert_eq!(result.failures.len(), 2);
    for (id, err) in &result.failures {
        match err {
            CallError::WorkerDied {
                worker, pid, exit, ..
            } => {
                assert_eq!(worker, id);
                assert_eq!(exit.code, Some(4));
                let w = status.workers.iter().find(|w| w.id == *id).unwrap();
                assert_eq!(w.pid, *pid);
            }
            other => panic!("expected WorkerDied, got {other:?}"),
        }
    }
    // Replacements come up and serve.
    let pid: u32 = tokio::time::timeout(SOON, farm.run_method("pid", ()))
        .await
        .unwrap()
        .unwrap();
    assert!(!status.workers.iter().any(|w| w.pid == pid));
    farm.shutdown().await;
}

#[tokio::test]
async fn broadcast_after_shutdown_reaches_no_one() {
    let farm = Farm::create(options(2)).unwrap();
    all_online(&farm, 2).await;
    farm.shutdown().await;
    let result = tokio::time::timeout(SOON, farm.broadcast_method::<_, u32>("pid", ()))
        .await
        .expect("broadcast after shutdown must not hang");
    assert!(result.successes.is_empty());
    assert!(result.failures.is_empty());
    assert_eq!(result.unreached, Some(CallError::ShutDown), "says why");
}

/// With no worker starting or online (they all fail to start, and the farm has given up
/// for now), a broadcast says why it reached no one.
#[tokio::test]
async fn broadcast_with_no_live_worker_says_why() {
    let farm = Farm::create(options(2).env("WORKER_EXIT_AT_START", "3")).unwrap();
    assert!(farm.ready().await.is_err());
    let result = wait_for_unreached(&farm).await;
    match result.unreached {
        Some(CallError::WorkerStart { message }) => {
            assert!(message.contains("exit code 3"), "{message}")
        }
        other => panic!("expected WorkerStart, got {other:?}"),
    }
    farm.kill().await;
}

/// Broadcasts until one reaches no worker (replacements may be starting for a while).
async fn wait_for_unreached(farm: &Farm) -> workfarm::Broadcast<u32> {
    let deadline = tokio::time::Instant::now() + SOON;
    loop {
        let result = farm.broadcast_method::<_, u32>("pid", ()).await;
        if result.unreached.is_some() {
            assert!(result.successes.is_empty() && result.failures.is_empty());
            return result;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "every broadcast reached a worker"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
