//! Recycling workers against real processes: `ttl` (calls per worker) and `max_idle_time`.
//! Ports node-worker-farm's "single/two calls per worker", workestrator's "respect ttl",
//! "restart after TTL", "respect maxIdleTime" and "reset idleTimer", and checks that idle time
//! counts only while a worker has no call in flight (workestrator kills long calls there).

mod support;

use std::collections::{HashMap, HashSet};
use std::time::Duration;
use support::*;
use tokio::time::{timeout, Instant};
use workfarm::{Event, Farm, WorkerState};

#[tokio::test(flavor = "multi_thread")]
async fn worker_is_replaced_after_ttl_calls() {
    let farm = Farm::create(options(1).ttl(3)).unwrap();
    let mut events = farm.events();
    let mut pids = Vec::new();
    for _ in 0..3 {
        pids.push(
            timeout(SOON, farm.run_method::<_, u32>("pid", ()))
                .await
                .unwrap()
                .unwrap(),
        );
    }
    assert!(
        pids.iter().all(|p| *p == pids[0]),
        "first three calls on one worker: {pids:?}"
    );
    let old = pids[0];

    let Event::TtlReached { worker } =
        wait_for_event(&mut events, SOON, |e| matches!(e, Event::TtlReached { .. })).await
    else {
        unreachable!()
    };
    // The retired worker exits on its own (stdin closed), not by a signal.
    let exited = wait_for_event(&mut events, SOON, |e| matches!(e, Event::Exited { .. })).await;
    let Event::Exited {
        worker: gone,
        pid,
        exit,
    } = exited
    else {
        unreachable!()
    };
    assert_eq!((gone, pid), (worker, old));
    assert_eq!(exit.code, Some(0), "{exit:?}");
    wait_gone(old, SOON).await;

    let next: u32 = timeout(SOON, farm.run_method("pid", ()))
        .await
        .unwrap()
        .unwrap();
    assert_ne!(next, old, "a new worker took the fourth call");
    farm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn retiring_worker_finishes_its_calls_and_takes_no_more() {
    let farm = Farm::create(options(1).ttl(2)).unwrap();
    let mut events = farm.events();
    wait_for_event(&mut events, SOON, |e| matches!(e, Event::Online { .. })).await;
    // Five concurrent calls: two per worker, then the next worker.
    let calls: Vec<_> = (0..5)
        .map(|_| farm.run_method::<_, u32>("sleep", 300u64))
        .collect();
    let mut per_pid: HashMap<u32, usize> = HashMap::new();
    let mut order = Vec::new();
    for call in calls {
        let pid = timeout(SOON, call)
            .await
            .expect("the call settles")
            .expect("calls of a retiring worker complete");
        *per_pid.entry(pid).or_default() += 1;
        order.push(pid);
    }
    assert_eq!(
        per_pid.len(),
        3,
        "5 calls with ttl 2 need 3 workers: {order:?}"
    );
    assert!(
        per_pid.values().all(|n| *n <= 2),
        "no worker ran more than ttl calls: {order:?}"
    );
    assert_eq!(order[0], order[1]);
    assert_eq!(order[2], order[3]);

    let ttl_events = drain(&mut events)
        .into_iter()
        .filter(|e| matches!(e, Event::TtlReached { .. }))
        .count();
    assert_eq!(ttl_events, 2, "the first two workers reached their ttl");
    farm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ttl_one_gives_each_call_a_fresh_worker() {
    // node-worker-farm "single call per worker".
    let farm = Farm::create(options(1).ttl(1)).unwrap();
    let calls: Vec<_> = (0..8)
        .map(|_| farm.run_method::<_, u32>("pid", ()))
        .collect();
    let mut pids = HashSet::new();
    for call in calls {
        pids.insert(timeout(SOON, call).await.unwrap().unwrap());
    }
    assert_eq!(pids.len(), 8);
    farm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn broadcasts_do_not_count_towards_ttl() {
    let farm = Farm::create(options(1).ttl(2)).unwrap();
    let first: u32 = farm.run_method("pid", ()).await.unwrap();
    for _ in 0..3 {
        let b = farm.broadcast_method::<_, u32>("pid", ()).await;
        assert!(b.failures.is_empty(), "{:?}", b.failures);
        assert_eq!(b.successes.len(), 1);
        assert_eq!(b.successes[0].1, first);
    }
    let second: u32 = farm.run_method("pid", ()).await.unwrap();
    assert_eq!(second, first, "the second call is within ttl");
    let third: u32 = farm.run_method("pid", ()).await.unwrap();
    assert_ne!(third, first, "the third call is beyond ttl");
    farm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn call_longer_than_max_idle_time_is_not_killed() {
    let idle = Duration::from_millis(300);
    let farm = Farm::create(options(1).max_idle_time(idle)).unwrap();
    let mut events = farm.events();
    let pid: u32 = farm.run_method("pid", ()).await.unwrap();
    // Started after a reply (the workestrator case): runs three idle periods.
    let slow: u32 = timeout(SOON, farm.run_method("sleep", 1000u64))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(slow, pid, "the long call ran to the end on the same worker");
    // Back-to-back calls keep resetting the idle clock.
    for _ in 0..6 {
        let again: u32 = farm.run_method("sleep", 100u64).await.unwrap();
        assert_eq!(again, pid);
    }
    let seen = drain(&mut events);
    assert!(
        !seen
            .iter()
            .any(|e| matches!(e, Event::IdleReached { .. } | Event::Exited { .. })),
        "no idle stop while calls were running: {seen:?}"
    );
    farm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_worker_exits_and_next_call_starts_a_new_one() {
    let idle = Duration::from_millis(300);
    let farm = Farm::create(options(1).max_idle_time(idle)).unwrap();
    let mut events = farm.events();
    let pid: u32 = farm.run_method("pid", ()).await.unwrap();
    let returned = Instant::now();

    let Event::IdleReached { worker } = wait_for_event(&mut events, SOON, |e| {
        matches!(e, Event::IdleReached { .. })
    })
    .await
    else {
        unreachable!()
    };
    let waited = returned.elapsed();
    assert!(
        waited >= idle - Duration::from_millis(50),
        "idle after {waited:?}"
    );
    let Event::Exited {
        worker: gone,
        pid: gone_pid,
        exit,
    } = wait_for_event(&mut events, SOON, |e| matches!(e, Event::Exited { .. })).await
    else {
        unreachable!()
    };
    assert_eq!((gone, gone_pid), (worker, pid));
    assert_eq!(
        exit.code,
        Some(0),
        "an idle worker exits on its own: {exit:?}"
    );
    wait_gone(pid, SOON).await;

    // No replacement until a call needs one.
    let status = farm.status().await;
    assert!(
        !status
            .workers
            .iter()
            .any(|w| matches!(w.state, WorkerState::Starting | WorkerState::Online)),
        "{status:?}"
    );
    assert!(
        !drain(&mut events)
            .iter()
            .any(|e| matches!(e, Event::Spawned { .. })),
        "spawned a worker nobody needed"
    );

    let next: u32 = timeout(SOON, farm.run_method("pid", ()))
        .await
        .unwrap()
        .unwrap();
    assert_ne!(next, pid);
    wait_for_event(
        &mut events,
        SOON,
        |e| matches!(e, Event::Spawned { pid, .. } if *pid == next),
    )
    .await;
    farm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn fresh_worker_that_never_gets_a_call_goes_idle() {
    let idle = Duration::from_millis(300);
    let farm = Farm::create(options(2).max_idle_time(idle)).unwrap();
    let mut events = farm.events();
    // Each worker reports IdleReached, then exits (the two sequences may interleave).
    let seen = collect_events(&mut events, 4, SOON, |e| {
        matches!(e, Event::IdleReached { .. } | Event::Exited { .. })
    })
    .await;
    let idle: HashSet<_> = seen
        .iter()
        .filter(|e| matches!(e, Event::IdleReached { .. }))
        .map(|e| e.worker())
        .collect();
    let exited: HashSet<_> = seen
        .iter()
        .filter(|e| matches!(e, Event::Exited { exit, .. } if exit.code == Some(0)))
        .map(|e| e.worker())
        .collect();
    assert_eq!(idle.len(), 2, "{seen:?}");
    assert_eq!(idle, exited, "{seen:?}");
    let calls: Vec<_> = (0..4)
        .map(|_| farm.run_method::<_, u32>("sleep", 100u64))
        .collect();
    for call in calls {
        timeout(SOON, call).await.unwrap().unwrap();
    }
    farm.shutdown().await;
}
