//! Elastic pools against real workers: `min_workers`..`workers`, growing while calls wait and
//! shrinking back after `max_idle_time`.

mod support;

use std::collections::HashSet;
use std::time::Duration;
use support::*;
use tokio::time::Instant;
use workfarm::{Event, Farm, WorkerState};

#[tokio::test]
async fn an_elastic_pool_grows_to_its_max_while_calls_wait_and_shrinks_to_its_min() {
    let farm = Farm::create(
        options(4)
            .min_workers(1)
            .max_idle_time(Duration::from_millis(400)),
    )
    .unwrap();
    farm.ready().await.unwrap();
    let status = farm.status().await;
    assert_eq!(status.workers.len(), 1, "starts at its min");
    let mut events = farm.events();
    // 12 calls of 300 ms at once on one worker would take 3.6 s; the pool grows to 4 (the
    // calls sent ahead to wait inside the first worker count as waiting).
    let calls: Vec<_> = (0..12)
        .map(|_| farm.run_method::<_, u32>("block", 300u64))
        .collect();
    let pids: HashSet<u32> = futures::future::join_all(calls)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    assert!(pids.len() > 1, "it grew");
    let spawned: Vec<_> = drain(&mut events)
        .into_iter()
        .filter_map(|e| match e {
            Event::Spawned { worker, .. } => Some(worker.slot()),
            _ => None,
        })
        .collect();
    // The first `events()` sees the farm's events from its creation: the first worker too.
    assert_eq!(
        spawned.len(),
        4,
        "grew to the max and no further: {spawned:?}"
    );
    assert_eq!(
        spawned.iter().copied().collect::<HashSet<_>>(),
        HashSet::from([0, 1, 2, 3])
    );
    // Idle: back to one worker, never fewer.
    let deadline = Instant::now() + SOON;
    let mut idle = 0;
    while idle < 3 {
        let event = tokio::time::timeout_at(deadline, events.recv())
            .await
            .expect("shrank")
            .unwrap();
        if matches!(event, Event::IdleReached { .. }) {
            idle += 1;
        }
    }
    let settled = wait_status(&farm, SOON, |s| s.workers.len() == 1).await;
    assert_eq!(settled.workers[0].state, WorkerState::Online);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        farm.status().await.workers.len(),
        1,
        "the min is kept however idle"
    );
    assert!(
        !drain(&mut events)
            .iter()
            .any(|e| matches!(e, Event::IdleReached { .. })),
        "the last worker is not stopped"
    );
    farm.shutdown().await;
}

#[tokio::test]
async fn an_elastic_pool_grows_one_worker_per_waiting_call() {
    let farm = Farm::create(options(8).min_workers(0).max_concurrent_calls_per_worker(1)).unwrap();
    assert_eq!(
        farm.status().await.workers.len(),
        0,
        "min 0: no worker until a call"
    );
    let mut events = farm.events();
    let (a, b) = tokio::join!(
        farm.run_method::<_, u32>("block", 200u64),
        farm.run_method::<_, u32>("block", 200u64)
    );
    assert_ne!(a.unwrap(), b.unwrap(), "two calls, two workers");
    let spawned = drain(&mut events)
        .into_iter()
        .filter(|e| matches!(e, Event::Spawned { .. }))
        .count();
    assert_eq!(
        spawned,
        2,
        "not grown past the calls waiting: {:#?}",
        farm.status().await
    );
    assert_eq!(farm.status().await.workers.len(), 2);
    farm.shutdown().await;
}
