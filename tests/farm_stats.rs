//! `Farm::stats` against real workers: counts that survive replacement, failures by kind,
//! retries, cancellations and refusals, histograms, per-slot sums.

mod support;

use std::time::Duration;
use support::*;
use workfarm::{Farm, Stats};

fn sums_match(stats: &Stats) {
    let per_slot = |f: fn(&workfarm::SlotStats) -> u64| stats.slots.iter().map(f).sum::<u64>();
    assert_eq!(per_slot(|s| s.calls.succeeded), stats.total.calls.succeeded);
    assert_eq!(per_slot(|s| s.workers.spawned), stats.total.workers.spawned);
    assert_eq!(per_slot(|s| s.run_time.count), stats.total.run_time.count);
    let t = &stats.total.run_time;
    assert!(
        t.min <= t.p50 && t.p50 <= t.p90 && t.p90 <= t.p99 && t.p99 <= t.max,
        "{t:?}"
    );
}

#[tokio::test]
async fn counts_survive_worker_replacement() {
    let farm = Farm::create(options(2).ttl(5)).unwrap();
    for i in 0..20i64 {
        let v: i64 = farm.run_method("noop", i).await.unwrap();
        assert_eq!(v, i);
    }
    let stats = wait_stats(&farm, |s| s.total.workers.recycled >= 3).await;
    assert_eq!(stats.total.calls.succeeded, 20);
    assert_eq!(stats.total.calls.failed, 0);
    assert!(
        stats.total.workers.spawned >= 5,
        "{:?}",
        stats.total.workers
    );
    assert_eq!(stats.total.run_time.count, 20);
    assert_eq!(stats.total.wait_time.count, 20);
    assert_eq!(stats.slots.len(), 2);
    sums_match(&stats);
    farm.shutdown().await;
    let last = farm.stats().await;
    assert_eq!(last.total.calls.succeeded, 20, "kept after shutdown");
    assert_eq!(
        last.total.workers.spawned,
        last.total.workers.recycled + last.total.workers.shut_down,
        "{:?}",
        last.total.workers
    );
}

async fn wait_stats(farm: &Farm, pred: impl Fn(&Stats) -> bool) -> Stats {
    let deadline = tokio::time::Instant::now() + SOON;
    loop {
        let stats = farm.stats().await;
        if pred(&stats) {
            return stats;
        }
        assert!(tokio::time::Instant::now() < deadline, "{stats:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn failures_are_counted_once_by_kind_and_retries_apart() {
    let farm = Farm::create(
        options(1)
            .max_retries(1)
            .timeout(Duration::from_millis(300)),
    )
    .unwrap();
    all_online(&farm, 1).await;
    farm.run_method::<_, ()>("fail", "no").await.unwrap_err();
    farm.run_method::<_, ()>("panic", "boom").await.unwrap_err();
    farm.run_method::<_, u32>("block", 5_000u64)
        .await
        .unwrap_err();
    farm.run_method::<_, ()>("exit", 3).await.unwrap_err();
    let ok: i64 = farm.run_method("noop", 1).await.unwrap();
    assert_eq!(ok, 1);
    let stats = wait_stats(&farm, |s| s.total.workers.crashed >= 2).await;
    let c = stats.total.calls;
    assert_eq!((c.succeeded, c.failed), (1, 4), "{c:?}");
    assert_eq!(c.handler, 2, "an error and a panic: {c:?}");
    assert_eq!(c.timed_out, 1, "{c:?}");
    assert_eq!(c.worker_lost, 1, "{c:?}");
    assert_eq!(
        c.retried, 2,
        "the timeout and the crash were each retried once: {c:?}"
    );
    let w = stats.total.workers;
    assert_eq!(w.stopped, 2, "stopped twice for the timed-out call: {w:?}");
    assert_eq!(w.crashed, 2, "the exit, twice: {w:?}");
    assert_eq!(stats.slots[0].calls, c, "one slot: all of it");
    farm.shutdown().await;
}

#[tokio::test]
async fn run_and_wait_times_are_measured() {
    let farm = Farm::create(options(1).max_concurrent_calls_per_worker(1)).unwrap();
    all_online(&farm, 1).await;
    // Four 100 ms calls at once on one worker: each runs 100 ms; the last waits ~300 ms.
    let calls: Vec<_> = (0..4)
        .map(|_| farm.run_method::<_, u32>("block", 100u64))
        .collect();
    for call in futures::future::join_all(calls).await {
        call.unwrap();
    }
    let stats = farm.stats().await;
    let run = stats.total.run_time;
    assert_eq!(run.count, 4);
    assert!(run.min >= Duration::from_millis(95), "{run:?}");
    assert!(run.p50 < Duration::from_secs(2), "{run:?}");
    let wait = stats.total.wait_time;
    assert_eq!(wait.count, 4);
    assert!(
        wait.max >= Duration::from_millis(250),
        "the last waited for three: {wait:?}"
    );
    assert!(stats.total.utilization > 0.0 && stats.slots[0].utilization > 0.0);
    sums_match(&stats);
    farm.shutdown().await;
}

#[tokio::test]
async fn cancellations_and_refusals_are_counted() {
    let farm = Farm::create(options(2).max_retries(0)).unwrap();
    all_online(&farm, 2).await;
    let handle = farm.call::<_, ()>("sleep", 10_000u64).start();
    tokio::time::sleep(Duration::from_millis(100)).await;
    handle.cancel();
    handle.await.unwrap_err();
    let slot: Option<usize> = farm.run_method("only_on", vec![1usize]).await.unwrap();
    assert_eq!(slot, Some(1));
    let stats = wait_stats(&farm, |s| s.total.calls.cancelled == 1).await;
    let c = stats.total.calls;
    assert_eq!(c.cancelled, 1, "{c:?}");
    assert!(c.refusals <= 1, "slot 0 refused at most once: {c:?}");
    assert_eq!(c.succeeded, 1);
    farm.shutdown().await;
}
