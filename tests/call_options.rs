//! Per-call options against real workers: timeout and retries that override the farm's,
//! deadlines end to end, sticky keys, and where a call ran.

mod support;

use std::collections::HashSet;
use std::time::Duration;
use support::*;
use tokio::time::Instant;
use workfarm::{CallError, Event, Farm};

#[tokio::test]
async fn a_call_s_own_timeout_overrides_the_farm_s() {
    let farm = Farm::create(options(1).timeout(Duration::from_secs(60)).max_retries(0)).unwrap();
    all_online(&farm, 1).await;
    let own = Duration::from_millis(300);
    let err = farm
        .call::<_, u32>("block", 10_000u64)
        .timeout(own)
        .await
        .unwrap_err();
    assert_eq!(err, CallError::Timeout { after: own });
    // Without the option the farm's (longer) timeout applies: a 500 ms call succeeds.
    let pid: u32 = farm.call("block", 500u64).await.unwrap();
    assert!(pid > 0);
    farm.shutdown().await;
}

#[tokio::test]
async fn a_call_s_own_retries_override_the_farm_s() {
    let farm = Farm::create(options(1).max_retries(5)).unwrap();
    all_online(&farm, 1).await;
    // "exit" kills its worker on every attempt: with retries(0) it fails on the first.
    let err = farm.call::<_, ()>("exit", 3).retries(0).await.unwrap_err();
    assert!(
        matches!(err, CallError::WorkerDied { running: true, .. }),
        "{err:?}"
    );
    let err = farm.call::<_, ()>("exit", 3).retries(2).await.unwrap_err();
    match err {
        CallError::RetriesExhausted { attempts, .. } => assert_eq!(attempts, 3),
        other => panic!("{other:?}"),
    }
    farm.shutdown().await;
}

#[tokio::test]
async fn a_deadline_that_passes_in_the_queue_means_the_call_never_runs() {
    let farm = Farm::create(options(1).max_concurrent_calls_per_worker(1)).unwrap();
    all_online(&farm, 1).await;
    let log = counter_file("deadline-never-ran");
    let busy = farm.run_method::<_, u32>("block", 1500u64);
    let started = Instant::now();
    let late = farm
        .call::<_, u64>("log_run", (log.display().to_string(), 1u64))
        .deadline(started + Duration::from_millis(300))
        .await;
    assert_eq!(late, Err(CallError::Deadline { ran: false }));
    assert!(late.unwrap_err().is_timeout());
    // It failed at its deadline, not when the worker came free.
    assert!(
        started.elapsed() < Duration::from_millis(1200),
        "{:?}",
        started.elapsed()
    );
    busy.await.unwrap();
    // A call after it runs; the expired one never did.
    let tag: u64 = farm
        .call("log_run", (log.display().to_string(), 2u64))
        .await
        .unwrap();
    assert_eq!(tag, 2);
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "2\n");
    farm.shutdown().await;
}

#[tokio::test]
async fn a_deadline_that_passes_while_running_stops_the_call() {
    let farm = Farm::create(options(1).max_retries(3)).unwrap();
    let mut events = farm.events();
    all_online(&farm, 1).await;
    let started = Instant::now();
    let err = farm
        .call::<_, u32>("block", 10_000u64)
        .deadline(started + Duration::from_millis(400))
        .await
        .unwrap_err();
    assert_eq!(err, CallError::Deadline { ran: true });
    assert!(started.elapsed() < Duration::from_secs(5));
    // Its worker was stopped (as for a timeout) and the call not retried.
    wait_for_event(&mut events, SOON, |e| matches!(e, Event::Exited { .. })).await;
    assert_eq!(farm.run_method::<_, i64>("noop", 7).await, Ok(7));
    farm.shutdown().await;
}

#[tokio::test]
async fn calls_with_the_same_key_run_on_the_same_worker() {
    let farm = Farm::create(options(3)).unwrap();
    all_online(&farm, 3).await;
    for key in ["alice", "bob", "carol", "dave"] {
        let calls: Vec<_> = (0..20)
            .map(|_| farm.call::<_, u32>("pid", ()).key(key).start())
            .collect();
        let mut pids = HashSet::new();
        for call in calls {
            pids.insert(call.await.unwrap());
        }
        assert_eq!(pids.len(), 1, "key {key}: {pids:?}");
    }
    farm.shutdown().await;
}

/// A keyed call waits for its busy worker, and calls without a key pass it meanwhile.
#[tokio::test]
async fn a_keyed_call_waits_for_its_worker_without_holding_up_others() {
    let farm = Farm::create(options(2).max_concurrent_calls_per_worker(1)).unwrap();
    all_online(&farm, 2).await;
    let home: u32 = farm.call("pid", ()).key("k").await.unwrap();
    let busy = farm.call::<_, u32>("block", 800u64).key("k").start();
    let keyed = farm.call::<_, u32>("pid", ()).key("k").start();
    // Unkeyed calls behind it go to the other worker at once.
    for _ in 0..5 {
        let pid: u32 = tokio::time::timeout(Duration::from_millis(700), farm.run_method("pid", ()))
            .await
            .expect("an unkeyed call is not held up by a keyed one")
            .unwrap();
        assert_ne!(pid, home);
    }
    assert_eq!(busy.await.unwrap(), home);
    assert_eq!(keyed.await.unwrap(), home);
    farm.shutdown().await;
}

#[tokio::test]
async fn when_a_keyed_worker_dies_its_keys_move_together_to_its_replacement() {
    let farm = Farm::create(options(3)).unwrap();
    all_online(&farm, 3).await;
    let keys: Vec<String> = (0..30).map(|i| format!("user-{i}")).collect();
    let mut before = std::collections::HashMap::new();
    for key in &keys {
        let pid: u32 = farm.call("pid", ()).key(key).await.unwrap();
        before.insert(key.clone(), pid);
    }
    // Kill the worker of the first key; its keys must all land on one new worker.
    let victim = before[&keys[0]];
    let _ = farm.call::<_, ()>("exit", 3).key(&keys[0]).retries(0).await;
    wait_gone(victim, SOON).await;
    let mut moved = HashSet::new();
    for key in &keys {
        let pid: u32 = farm.call("pid", ()).key(key).await.unwrap();
        if before[key] == victim {
            moved.insert(pid);
        } else {
            assert_eq!(pid, before[key], "{key} stays where it was");
        }
    }
    assert_eq!(moved.len(), 1, "{moved:?}");
    assert!(!moved.contains(&victim));
    farm.shutdown().await;
}

#[tokio::test]
async fn a_handle_knows_its_id_and_where_its_call_ran() {
    let farm = Farm::create(options(2)).unwrap();
    let mut events = farm.events();
    let status = all_online(&farm, 2).await;
    let handle = farm.call::<_, u32>("block", 200u64).start();
    let id = handle.id();
    let (pid, info) = handle.with_info().await.unwrap();
    assert_eq!(info.id, id);
    assert_eq!(info.pid, pid);
    assert_eq!(info.attempts, 1);
    assert!(info.ran_for >= Duration::from_millis(200), "{info:?}");
    assert!(status
        .workers
        .iter()
        .any(|w| w.id == info.worker && w.pid == pid));
    let done = wait_for_event(
        &mut events,
        SOON,
        |e| matches!(e, Event::CallDone { call, .. } if *call == id),
    )
    .await;
    assert_eq!(done.worker(), Some(info.worker));
    farm.shutdown().await;
}

#[tokio::test]
async fn queued_for_counts_the_wait_behind_another_call() {
    let farm = Farm::create(options(1).max_concurrent_calls_per_worker(1)).unwrap();
    all_online(&farm, 1).await;
    let busy = farm.run_method::<_, u32>("block", 400u64);
    let (_, info) = farm
        .call::<_, i64>("noop", 1)
        .start()
        .with_info()
        .await
        .unwrap();
    busy.await.unwrap();
    assert!(info.queued_for >= Duration::from_millis(300), "{info:?}");
    assert!(info.ran_for < Duration::from_millis(300), "{info:?}");
    farm.shutdown().await;
}

#[tokio::test]
async fn a_retried_call_reports_its_attempts() {
    let farm = Farm::create(options(1).max_retries(2)).unwrap();
    all_online(&farm, 1).await;
    let log = counter_file("slow-once-info");
    // "stubborn" exits its worker on its first n runs (counted in the file), then answers.
    let (_, info) = farm
        .call::<_, u32>("stubborn", (log.display().to_string(), 1u32))
        .start()
        .with_info()
        .await
        .unwrap();
    assert_eq!(info.attempts, 2, "{info:?}");
    farm.shutdown().await;
}

/// Regression: keyed calls that waited inside a worker once left it counted as holding
/// calls that could be taken back, so once idle it looked stalled at every check (while
/// another worker kept the checks going) and lost its room for waiting calls.
#[tokio::test]
async fn keyed_calls_that_waited_leave_their_worker_its_full_room() {
    let farm = Farm::create(options(2)).unwrap();
    all_online(&farm, 2).await;
    let mut load = farm.load();
    let idle = load.wait_for(|l| l.free > 0).await.unwrap().free;
    // One key for each worker.
    let mut keys: Vec<(u32, u32)> = Vec::new();
    for k in 0u32..200 {
        let pid: u32 = farm.call("pid", ()).key(k).await.unwrap();
        if keys.iter().all(|(_, p)| *p != pid) {
            keys.push((k, pid));
        }
        if keys.len() == 2 {
            break;
        }
    }
    assert_eq!(keys.len(), 2, "no key found for one of the workers");
    // A keyed call waits on each worker; the first is idle again while the second still
    // holds a waiting call, which keeps the stall checks running.
    let a = farm.call::<_, u32>("block", 300u64).key(keys[0].0).start();
    let b = farm.call::<_, i64>("noop", 1).key(keys[0].0).start();
    let c = farm.call::<_, u32>("block", 900u64).key(keys[1].0).start();
    let d = farm.call::<_, i64>("noop", 2).key(keys[1].0).start();
    for call in [a, c] {
        call.await.unwrap();
    }
    for call in [b, d] {
        call.await.unwrap();
    }
    tokio::time::timeout(SOON, load.wait_for(|l| l.in_flight == 0 && l.free == idle))
        .await
        .expect("the idle workers get their room back")
        .unwrap();
    farm.shutdown().await;
}

/// Regression: the deadline counts while a call waits for a `max_concurrent_calls` place.
#[tokio::test]
async fn a_deadline_counts_while_waiting_for_a_place() {
    let farm = Farm::create(options(1).max_concurrent_calls(1)).unwrap();
    all_online(&farm, 1).await;
    let busy = farm.run_method::<_, u32>("block", 2000u64);
    wait_status(&farm, SOON, |s| s.in_flight() == 1).await;
    let started = Instant::now();
    let late = farm
        .call::<_, i64>("noop", 1)
        .deadline(started + Duration::from_millis(200))
        .await;
    assert_eq!(late, Err(CallError::Deadline { ran: false }));
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    busy.await.unwrap();
    farm.shutdown().await;
}

/// Each worker has a pool slot `0..workers`, knows it, and its replacement inherits it.
#[tokio::test]
async fn workers_know_their_slot_and_replacements_inherit_it() {
    let farm = Farm::create(options(3)).unwrap();
    let status = all_online(&farm, 3).await;
    let mut slots: Vec<usize> = status.workers.iter().map(|w| w.slot).collect();
    slots.sort();
    assert_eq!(slots, [0, 1, 2]);
    let seen = farm
        .broadcast_method::<_, (u32, Option<usize>)>("slot", ())
        .await;
    assert_eq!(seen.successes.len(), 3);
    for (id, (pid, slot)) in &seen.successes {
        let w = status.workers.iter().find(|w| w.id == *id).unwrap();
        assert_eq!((w.pid, Some(w.slot)), (*pid, *slot));
    }
    // Kill the worker in slot 1: its replacement takes slot 1.
    let victim = status.workers.iter().find(|w| w.slot == 1).unwrap();
    kill_9(victim.pid);
    wait_gone(victim.pid, SOON).await;
    let after = wait_status(&farm, SOON, |s| {
        s.workers.len() == 3
            && s.workers
                .iter()
                .all(|w| w.state == workfarm::WorkerState::Online && w.pid != victim.pid)
    })
    .await;
    let replacement = after.workers.iter().find(|w| w.slot == 1).unwrap();
    assert_ne!(replacement.id, victim.id);
    farm.shutdown().await;
}

fn kill_9(pid: u32) {
    let status = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}
