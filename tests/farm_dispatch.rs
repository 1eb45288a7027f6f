//! Dispatch: how many workers, how many calls each runs at once, least-loaded placement, the
//! farm-wide call limit, and what runs concurrently.

mod support;

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, Instant};
use support::*;
use workfarm::{CallError, Event, Farm};

/// Polls `f` exactly once: `Ready` means it settled without waiting for anything.
async fn poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
    std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *f).poll(cx))).await
}

/// Waits until `n` workers are online.
#[tokio::test]
async fn n_workers_have_n_distinct_pids() {
    let farm = Farm::create(options(3)).unwrap();
    let status = all_online(&farm, 3).await;
    let from_status: HashSet<u32> = status.workers.iter().map(|w| w.pid).collect();
    assert_eq!(from_status.len(), 3);
    let ids: HashSet<_> = status.workers.iter().map(|w| w.id).collect();
    assert_eq!(ids.len(), 3);

    let pids = farm.broadcast_method::<_, u32>("pid", ()).await;
    assert!(pids.failures.is_empty(), "{:?}", pids.failures);
    let from_workers: HashSet<u32> = pids.successes.iter().map(|(_, pid)| *pid).collect();
    assert_eq!(from_workers, from_status, "each worker reports its own pid");
    for (id, pid) in &pids.successes {
        let w = status.workers.iter().find(|w| w.id == *id).unwrap();
        assert_eq!(w.pid, *pid, "{id} reports the pid status shows for it");
        assert!(process_alive(*pid));
    }
    farm.shutdown().await;
    for pid in from_status {
        wait_gone(pid, SOON).await;
    }
}

#[tokio::test]
async fn a_single_worker_answers_every_call() {
    let farm = Farm::create(options(1)).unwrap();
    let calls: Vec<_> = (0..10)
        .map(|_| farm.run_method::<_, u32>("pid", ()))
        .collect();
    let mut pids = HashSet::new();
    for call in calls {
        pids.insert(call.await.unwrap());
    }
    assert_eq!(pids.len(), 1);
    let status = farm.status().await;
    assert_eq!(status.workers.len(), 1);
    assert_eq!(status.workers[0].handed, 10);
    assert!(pids.contains(&status.workers[0].pid));
    farm.shutdown().await;
}

#[tokio::test]
async fn two_workers_share_ten_calls() {
    let farm = Farm::create(options(2)).unwrap();
    all_online(&farm, 2).await;
    let calls: Vec<_> = (0..10)
        .map(|_| farm.run_method::<_, u32>("sleep", 100u64))
        .collect();
    let mut pids = HashSet::new();
    for call in calls {
        pids.insert(call.await.unwrap());
    }
    assert_eq!(pids.len(), 2);
    let status = farm.status().await;
    let handed: Vec<u64> = status.workers.iter().map(|w| w.handed).collect();
    assert_eq!(handed, vec![5, 5], "least-loaded dispatch splits evenly");
    farm.shutdown().await;
}

#[tokio::test]
async fn per_worker_limit_holds_calls_in_the_queue() {
    let farm = Farm::create(options(1).max_concurrent_calls_per_worker(5)).unwrap();
    all_online(&farm, 1).await;
    let start = Instant::now();
    let calls: Vec<_> = (0..10)
        .map(|_| farm.run_method::<_, u32>("sleep", 300u64))
        .collect();
    let status = wait_status(&farm, SOON, |s| s.in_flight() > 0).await;
    assert_eq!(status.in_flight(), 5, "{status:?}");
    assert_eq!(status.queued, 5, "{status:?}");
    assert_eq!(status.workers[0].in_flight, 5);
    let mut pids = HashSet::new();
    for call in calls {
        pids.insert(call.await.unwrap());
    }
    assert_eq!(pids.len(), 1);
    // Two waves of 300 ms: never faster than 600 ms.
    assert!(
        start.elapsed() >= Duration::from_millis(600),
        "{:?}",
        start.elapsed()
    );
    let status = farm.status().await;
    assert_eq!((status.in_flight(), status.queued), (0, 0));
    farm.shutdown().await;
}

#[tokio::test]
async fn one_call_per_worker_runs_async_calls_one_after_another() {
    let farm = Farm::create(options(1).max_concurrent_calls_per_worker(1)).unwrap();
    let start = Instant::now();
    let calls: Vec<_> = (0..4)
        .map(|_| farm.run_method::<_, u32>("sleep", 200u64))
        .collect();
    let status = wait_status(&farm, SOON, |s| s.in_flight() > 0).await;
    assert_eq!((status.in_flight(), status.queued), (1, 3), "{status:?}");
    for call in calls {
        call.await.unwrap();
    }
    assert!(
        start.elapsed() >= Duration::from_millis(800),
        "{:?}",
        start.elapsed()
    );
    farm.shutdown().await;
}

#[tokio::test]
async fn least_loaded_dispatch_fills_each_worker_to_its_limit() {
    let farm = Farm::create(options(2).max_concurrent_calls_per_worker(2)).unwrap();
    all_online(&farm, 2).await;
    // Async calls, which run at once: sync ones waiting behind a long call would be handed
    // back by the stalled worker within ~10 ms (see Pipelining).
    let calls: Vec<_> = (0..6)
        .map(|_| farm.run_method::<_, u32>("sleep", 1500u64))
        .collect();
    let status = wait_status(&farm, SOON, |s| s.in_flight() == 4).await;
    assert_eq!(status.queued, 2, "{status:?}");
    for w in &status.workers {
        assert_eq!(w.in_flight, 2, "{status:?}");
    }
    // Done looking: end the calls instead of waiting ~4.5 s for them.
    farm.kill().await;
    for call in calls {
        assert_eq!(call.await, Err(CallError::ShutDown));
    }
}

#[tokio::test]
async fn least_loaded_dispatch_sends_new_calls_to_the_idle_worker() {
    let farm = Farm::create(options(2)).unwrap();
    all_online(&farm, 2).await;
    // Three long calls on the farm: the first two go one to each worker, the third to either.
    let long: Vec<_> = (0..3)
        .map(|_| farm.run_method::<_, u32>("sleep", 1500u64))
        .collect();
    let status = wait_status(&farm, SOON, |s| s.in_flight() == 3).await;
    let mut loads: Vec<usize> = status.workers.iter().map(|w| w.in_flight).collect();
    loads.sort_unstable();
    assert_eq!(loads, vec![1, 2]);
    let lighter = status
        .workers
        .iter()
        .find(|w| w.in_flight == 1)
        .unwrap()
        .pid;
    // The next call goes to the worker with fewer calls in flight.
    let pid: u32 = farm.run_method("pid", ()).await.unwrap();
    assert_eq!(pid, lighter);
    farm.kill().await;
    for call in long {
        assert_eq!(call.await, Err(CallError::ShutDown));
    }
}

#[tokio::test]
async fn try_run_over_max_concurrent_calls_refuses_at_once_then_accepts_again() {
    let farm = Farm::create(
        options(1)
            .max_concurrent_calls(2)
            .max_concurrent_calls_per_worker(2),
    )
    .unwrap();
    all_online(&farm, 1).await;
    let a = farm.run_method::<_, u32>("block", 400u64);
    let b = farm.run_method::<_, u32>("block", 400u64);
    for _ in 0..2 {
        let mut over = Box::pin(farm.try_run_method::<_, u32>("pid", ()));
        match poll_once(&mut over).await {
            Poll::Ready(r) => assert_eq!(r, Err(CallError::QueueFull { limit: 2 })),
            Poll::Pending => panic!("a call over the limit must be refused without waiting"),
        }
    }
    let status = wait_status(&farm, SOON, |s| s.in_flight() == 2).await;
    assert_eq!(status.queued, 0, "{status:?}");
    let pid = a.await.unwrap();
    assert_eq!(b.await.unwrap(), pid);
    // Both settled: there is room again.
    let c = farm.run_method::<_, u32>("pid", ());
    let d = farm.run_method::<_, u32>("pid", ());
    assert_eq!(c.await.unwrap(), pid);
    assert_eq!(d.await.unwrap(), pid);
    farm.shutdown().await;
}

#[tokio::test]
async fn max_concurrent_calls_counts_queued_calls_too() {
    let farm = Farm::create(
        options(1)
            .max_concurrent_calls(2)
            .max_concurrent_calls_per_worker(1),
    )
    .unwrap();
    all_online(&farm, 1).await;
    let a = farm.run_method::<_, u32>("block", 400u64);
    let b = farm.run_method::<_, u32>("block", 400u64);
    let over = farm.try_run_method::<_, u32>("pid", ()).await;
    assert_eq!(over, Err(CallError::QueueFull { limit: 2 }));
    let status = wait_status(&farm, SOON, |s| s.in_flight() == 1).await;
    assert_eq!(status.queued, 1, "{status:?}");
    a.await.unwrap();
    b.await.unwrap();
    assert!(farm.run_method::<_, u32>("pid", ()).await.is_ok());
    farm.shutdown().await;
}

#[tokio::test]
async fn max_concurrent_calls_with_two_workers_and_short_calls() {
    // node-worker-farm's "maxConcurrentCalls + queue": limit 4, 2 workers, 1 per worker.
    let farm = Farm::create(
        options(2)
            .max_concurrent_calls(4)
            .max_concurrent_calls_per_worker(1),
    )
    .unwrap();
    all_online(&farm, 2).await;
    let accepted: Vec<_> = (0..4)
        .map(|_| farm.run_method::<_, u32>("sleep", 50u64))
        .collect();
    for _ in 0..2 {
        let r = farm.try_run_method::<_, u32>("sleep", 50u64).await;
        assert_eq!(r, Err(CallError::QueueFull { limit: 4 }));
    }
    for call in accepted {
        call.await.unwrap();
    }
    let again: Vec<_> = (0..4)
        .map(|_| farm.run_method::<_, u32>("sleep", 50u64))
        .collect();
    let refused = farm.try_run_method::<_, u32>("sleep", 50u64).await;
    assert_eq!(refused, Err(CallError::QueueFull { limit: 4 }));
    for call in again {
        call.await.unwrap();
    }
    farm.shutdown().await;
}

/// `run` over the limit waits for a place instead of failing: it is not queued meanwhile
/// (the farm holds only the limit's worth), and callers get places first come, first
/// served.
#[tokio::test]
async fn run_over_max_concurrent_calls_waits_for_a_place() {
    let farm = Farm::create(
        options(1)
            .max_concurrent_calls(2)
            .max_concurrent_calls_per_worker(1),
    )
    .unwrap();
    all_online(&farm, 1).await;
    let a = farm.run_method::<_, u32>("block", 300u64);
    let b = farm.run_method::<_, u32>("block", 300u64);
    let mut waiting: Vec<_> = (0..3u64)
        .map(|i| Box::pin(farm.run_method::<_, i64>("noop", i as i64)))
        .collect();
    for call in &mut waiting {
        assert!(poll_once(call).await.is_pending(), "waits for a place");
    }
    let status = wait_status(&farm, SOON, |s| s.in_flight() == 1).await;
    assert_eq!(
        status.queued, 1,
        "only the limit's worth is in the farm: {status:?}"
    );
    a.await.unwrap();
    b.await.unwrap();
    for (i, call) in waiting.into_iter().enumerate() {
        assert_eq!(
            tokio::time::timeout(SOON, call).await.unwrap(),
            Ok(i as i64)
        );
    }
    farm.shutdown().await;
}

/// After a call has returned to its caller, its place under `max_concurrent_calls` must be
/// free: a caller that awaits each call before making the next never sees `QueueFull`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn sequential_calls_never_see_queue_full() {
    let farm = Farm::create(options(1).max_concurrent_calls(1)).unwrap();
    all_online(&farm, 1).await;
    for i in 0..500i64 {
        let r = farm.run_method::<_, i64>("noop", i).await;
        assert_eq!(r, Ok(i), "call {i}");
    }
    farm.shutdown().await;
}

#[tokio::test]
async fn many_async_calls_on_one_worker_run_concurrently() {
    let farm = Farm::create(options(1).max_concurrent_calls_per_worker(200)).unwrap();
    all_online(&farm, 1).await;
    let start = Instant::now();
    let calls: Vec<_> = (0..200)
        .map(|_| farm.run_method::<_, u32>("sleep", 300u64))
        .collect();
    let mut pids = HashSet::new();
    for call in calls {
        pids.insert(call.await.unwrap());
    }
    let elapsed = start.elapsed();
    assert_eq!(pids.len(), 1);
    assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
    // One after another would take 60 s.
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    farm.shutdown().await;
}

#[tokio::test]
async fn multiple_concurrent_calls_per_worker_bound_the_parallelism() {
    // node-worker-farm's "multiple concurrent calls": 1 worker, 5 per worker, 20 x 100 ms.
    let farm = Farm::create(options(1).max_concurrent_calls_per_worker(5)).unwrap();
    all_online(&farm, 1).await;
    let start = Instant::now();
    let calls: Vec<_> = (0..20)
        .map(|_| farm.run_method::<_, u32>("sleep", 100u64))
        .collect();
    for call in calls {
        call.await.unwrap();
    }
    let elapsed = start.elapsed();
    // Four waves of five.
    assert!(elapsed >= Duration::from_millis(400), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(4), "{elapsed:?}");
    farm.shutdown().await;
}

#[tokio::test]
async fn blocking_calls_on_one_worker_run_one_at_a_time() {
    let farm = Farm::create(options(1).max_concurrent_calls_per_worker(10)).unwrap();
    all_online(&farm, 1).await;
    let start = Instant::now();
    let calls: Vec<_> = (0..4)
        .map(|_| farm.run_method::<_, u32>("block", 200u64))
        .collect();
    // All four are handed to the worker at once (and, as it makes no progress for 10 ms,
    // the three waiting may be handed back to the farm)...
    let status = wait_status(&farm, SOON, |s| s.in_flight() >= 1).await;
    assert_eq!(status.in_flight() + status.queued, 4);
    let mut pids = HashSet::new();
    for call in calls {
        pids.insert(call.await.unwrap());
    }
    // ...but its single thread runs them one after another.
    assert!(
        start.elapsed() >= Duration::from_millis(800),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(pids.len(), 1);
    farm.shutdown().await;
}

#[tokio::test]
async fn blocking_calls_spread_over_two_workers_run_in_parallel() {
    let farm = Farm::create(options(2)).unwrap();
    all_online(&farm, 2).await;
    let start = Instant::now();
    let calls: Vec<_> = (0..4)
        .map(|_| farm.run_method::<_, u32>("block", 400u64))
        .collect();
    let mut pids = HashSet::new();
    for call in calls {
        pids.insert(call.await.unwrap());
    }
    let elapsed = start.elapsed();
    assert_eq!(pids.len(), 2);
    assert!(elapsed >= Duration::from_millis(800), "{elapsed:?}");
    // Serial on one worker would be 1.6 s; allow a slow machine plenty.
    assert!(elapsed < Duration::from_millis(1550), "{elapsed:?}");
    farm.shutdown().await;
}

#[tokio::test]
async fn calls_made_before_the_workers_are_online_wait_in_the_queue() {
    let farm = Farm::create(options(1)).unwrap();
    let mut events = farm.events();
    let call = farm.run_method::<_, i64>("add", (20, 22));
    wait_for_event(&mut events, SOON, |e| matches!(e, Event::Online { .. })).await;
    assert_eq!(tokio::time::timeout(SOON, call).await.unwrap(), Ok(42));
    farm.shutdown().await;
}

/// Calls made before any worker has finished its handshake spread over every worker that is
/// starting: the first one online does not take the whole queue, even where the per-worker
/// limit would let it (calls never move once handed), so a job submitted right after
/// `create` runs in parallel without `ready()`.
#[tokio::test]
async fn calls_queued_during_startup_spread_over_the_starting_workers() {
    for _ in 0..3 {
        let farm = Farm::create(options(2).max_concurrent_calls_per_worker(8)).unwrap();
        let calls: Vec<_> = (0..8)
            .map(|_| farm.run_method::<_, u32>("block", 100u64))
            .collect();
        let mut per_pid = std::collections::HashMap::new();
        for call in calls {
            *per_pid.entry(call.await.unwrap()).or_insert(0) += 1;
        }
        let mut counts: Vec<u32> = per_pid.values().copied().collect();
        counts.sort_unstable();
        assert_eq!(
            counts,
            [4, 4],
            "8 calls over 2 starting workers: {per_pid:?}"
        );
        farm.shutdown().await;
    }
}
