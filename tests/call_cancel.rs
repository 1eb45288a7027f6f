//! Cancellation against real workers: queued calls never run, async handlers are dropped
//! in the worker, a sync handler running alone costs its worker and nothing else, and a
//! cancel racing the result settles the call once.

mod support;

use std::time::Duration;
use support::*;
use workfarm::{CallError, Event, Farm};

fn lines(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Waits until the file at `path` has `n` lines.
async fn wait_lines(path: &std::path::Path, n: usize) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + SOON;
    loop {
        let lines = lines(path);
        if lines.len() >= n {
            return lines;
        }
        assert!(tokio::time::Instant::now() < deadline, "{lines:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_cancelled_queued_call_never_runs() {
    let farm = Farm::create(options(1).max_concurrent_calls_per_worker(1)).unwrap();
    all_online(&farm, 1).await;
    let log = counter_file("cancel-queued");
    let busy = farm.run_method::<_, u32>("block", 500u64);
    let queued = farm
        .call::<_, u64>("log_run", (log.display().to_string(), 1u64))
        .start();
    wait_status(&farm, SOON, |s| s.queued == 1).await;
    queued.cancel();
    assert_eq!(queued.await, Err(CallError::Cancelled));
    busy.await.unwrap();
    let after: u64 = farm
        .call("log_run", (log.display().to_string(), 2u64))
        .await
        .unwrap();
    assert_eq!(after, 2);
    assert_eq!(lines(&log), ["2"], "the cancelled call never ran");
    farm.shutdown().await;
}

#[tokio::test]
async fn a_cancelled_call_waiting_inside_a_worker_never_runs() {
    // At the defaults, sync calls wait inside their worker behind the running one.
    let farm = Farm::create(options(1)).unwrap();
    all_online(&farm, 1).await;
    let log = counter_file("cancel-waiting");
    let busy = farm.run_method::<_, u32>("block", 600u64);
    let waiting = farm
        .call::<_, u64>("log_run", (log.display().to_string(), 1u64))
        .start();
    let _ = wait_status(&farm, SOON, |s| s.in_flight() + s.queued == 2).await;
    waiting.cancel();
    assert_eq!(waiting.await, Err(CallError::Cancelled));
    busy.await.unwrap();
    farm.run_method::<_, u64>("log_run", (log.display().to_string(), 2u64))
        .await
        .unwrap();
    assert_eq!(lines(&log), ["2"]);
    farm.shutdown().await;
}

#[tokio::test]
async fn cancelling_a_running_async_call_drops_its_future_in_the_worker() {
    let farm = Farm::create(options(1)).unwrap();
    let mut events = farm.events();
    let status = all_online(&farm, 1).await;
    let pid = status.workers[0].pid;
    let log = counter_file("cancel-async");
    let path = log.display().to_string();
    let doomed = farm
        .call::<_, u32>("guarded_sleep", (path.clone(), 1u64, 30_000u64))
        .start();
    let neighbour = farm
        .call::<_, u32>("guarded_sleep", (path.clone(), 2u64, 300u64))
        .start();
    wait_status(&farm, SOON, |s| s.in_flight() == 2).await;
    let started = tokio::time::Instant::now();
    doomed.cancel();
    assert_eq!(doomed.await, Err(CallError::Cancelled));
    assert!(started.elapsed() < Duration::from_secs(5));
    // The worker dropped the handler's future, and stayed up: its neighbour finished there.
    assert_eq!(neighbour.await.unwrap(), pid);
    let mut seen = wait_lines(&log, 2).await;
    seen.sort();
    assert_eq!(seen, ["1 dropped", "2 done"]);
    assert!(drain(&mut events)
        .iter()
        .all(|e| !matches!(e, Event::Exited { .. })));
    farm.shutdown().await;
}

#[tokio::test]
async fn cancelling_a_sync_call_running_alone_stops_its_worker_and_nothing_else_fails() {
    let farm = Farm::create(options(1).max_retries(0)).unwrap();
    let mut events = farm.events();
    let status = all_online(&farm, 1).await;
    let pid = status.workers[0].pid;
    let doomed = farm.call::<_, u32>("block", 30_000u64).start();
    // These wait inside the same worker behind it (or in the queue): innocent.
    let behind: Vec<_> = (0..5)
        .map(|i| farm.run_method::<_, i64>("noop", i))
        .collect();
    wait_status(&farm, SOON, |s| s.in_flight() >= 1).await;
    doomed.cancel();
    assert_eq!(doomed.await, Err(CallError::Cancelled));
    wait_gone(pid, SOON).await;
    for (i, call) in behind.into_iter().enumerate() {
        assert_eq!(call.await, Ok(i as i64), "retries(0), yet not charged");
    }
    let exited = wait_for_event(&mut events, SOON, |e| matches!(e, Event::Exited { .. })).await;
    assert_eq!(exited.worker(), Some(status.workers[0].id));
    farm.shutdown().await;
}

#[tokio::test]
async fn cancelling_a_sync_call_that_shares_its_worker_discards_its_result() {
    // Two threads: the cancelled call runs beside another, so the worker is kept.
    let farm = Farm::create(options(1).env("WORKER_THREADS", "2")).unwrap();
    let status = all_online(&farm, 1).await;
    let pid = status.workers[0].pid;
    let log = counter_file("cancel-shared");
    let doomed = farm.call::<_, u32>("block", 600u64).start();
    let neighbour = farm.run_method::<_, u32>("block", 600u64);
    wait_status(&farm, SOON, |s| s.in_flight() == 2).await;
    doomed.cancel();
    assert_eq!(doomed.await, Err(CallError::Cancelled));
    assert_eq!(neighbour.await.unwrap(), pid);
    let tag: u64 = farm
        .run_method("log_run", (log.display().to_string(), 3u64))
        .await
        .unwrap();
    assert_eq!(tag, 3);
    assert_eq!(farm.status().await.workers[0].pid, pid, "worker kept");
    farm.shutdown().await;
}

#[tokio::test]
async fn a_cancelled_call_is_never_retried() {
    let farm = Farm::create(options(1).max_retries(5)).unwrap();
    all_online(&farm, 1).await;
    let log = counter_file("cancel-no-retry");
    let path = log.display().to_string();
    let doomed = farm
        .call::<_, u32>("guarded_sleep", (path, 1u64, 30_000u64))
        .start();
    wait_status(&farm, SOON, |s| s.in_flight() == 1).await;
    doomed.cancel();
    assert_eq!(doomed.await, Err(CallError::Cancelled));
    assert_eq!(wait_lines(&log, 1).await, ["1 dropped"]);
    // Give a retry every chance to show up; none does.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(lines(&log), ["1 dropped"]);
    assert_eq!(farm.status().await.in_flight(), 0);
    farm.shutdown().await;
}

/// The case: `tokio::time::timeout` around a call returns, and with
/// `cancel_on_drop` the call does not stay in flight to delay the next one.
#[tokio::test]
async fn cancel_on_drop_stops_a_call_that_lost_a_timeout() {
    let farm = Farm::create(options(1)).unwrap();
    all_online(&farm, 1).await;
    let lost = tokio::time::timeout(
        Duration::from_millis(300),
        farm.call::<_, u32>("block", 30_000u64).cancel_on_drop(),
    )
    .await;
    assert!(lost.is_err());
    let started = tokio::time::Instant::now();
    assert_eq!(farm.run_method::<_, i64>("noop", 5).await, Ok(5));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the next call waited for the abandoned one: {:?}",
        started.elapsed()
    );
    farm.shutdown().await;
}

/// Without `cancel_on_drop`, dropping the future only abandons the call: it runs on.
#[tokio::test]
async fn dropping_without_cancel_on_drop_lets_the_call_finish() {
    let farm = Farm::create(options(1)).unwrap();
    all_online(&farm, 1).await;
    let log = counter_file("drop-no-cancel");
    let path = log.display().to_string();
    let call = farm
        .call::<_, u32>("guarded_sleep", (path, 1u64, 300u64))
        .start();
    wait_status(&farm, SOON, |s| s.in_flight() == 1).await;
    drop(call);
    assert_eq!(wait_lines(&log, 1).await, ["1 done"]);
    farm.shutdown().await;
}

/// A cancel racing the result: whichever the farm sees first wins, and the call settles
/// exactly once, with a value or with `Cancelled`, never both and never neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_racing_the_result_settles_the_call_once() {
    let farm = Farm::create(options(2)).unwrap();
    all_online(&farm, 2).await;
    let (mut values, mut cancelled) = (0, 0);
    for round in 0..400u64 {
        let method = if round % 2 == 0 { "noop" } else { "sleep" };
        let arg = if round % 2 == 0 { round as i64 } else { 0 };
        let handle = farm.call::<_, serde_json::Value>(method, arg).start();
        let canceller = handle.cancel_handle();
        let race = tokio::spawn(async move { canceller.cancel() });
        match handle.await {
            Ok(_) => values += 1,
            Err(CallError::Cancelled) => cancelled += 1,
            Err(other) => panic!("round {round}: {other:?}"),
        }
        race.await.unwrap();
    }
    assert_eq!(values + cancelled, 400);
    // The farm is intact: nothing stuck in flight, and calls still work.
    wait_status(&farm, SOON, |s| s.in_flight() == 0 && s.queued == 0).await;
    assert_eq!(farm.run_method::<_, i64>("noop", 1).await, Ok(1));
    farm.shutdown().await;
}

#[tokio::test]
async fn cancelling_a_call_waiting_for_a_place_frees_nothing_and_sends_nothing() {
    let farm = Farm::create(options(1).max_concurrent_calls(1)).unwrap();
    all_online(&farm, 1).await;
    let log = counter_file("cancel-place");
    let busy = farm.run_method::<_, u32>("block", 300u64);
    let mut waiting = farm
        .call::<_, u64>("log_run", (log.display().to_string(), 1u64))
        .start();
    assert!(futures::poll!(&mut waiting).is_pending());
    waiting.cancel();
    assert_eq!(waiting.await, Err(CallError::Cancelled));
    busy.await.unwrap();
    assert_eq!(farm.run_method::<_, i64>("noop", 2).await, Ok(2));
    assert!(lines(&log).is_empty());
    farm.shutdown().await;
}

/// Regression: a cancelled sync call that shares its worker runs on unwanted; its
/// deadline must no longer stop the worker (and re-run the innocent call beside it).
#[tokio::test]
async fn a_cancelled_call_s_deadline_does_not_stop_its_shared_worker() {
    let farm = Farm::create(options(1).env("WORKER_THREADS", "2")).unwrap();
    let mut events = farm.events();
    let status = all_online(&farm, 1).await;
    let doomed = farm
        .call::<_, u32>("block", 1500u64)
        .deadline(tokio::time::Instant::now() + Duration::from_millis(500))
        .start();
    let innocent = farm.run_method::<_, u32>("block", 1000u64);
    wait_status(&farm, SOON, |s| s.in_flight() == 2).await;
    doomed.cancel();
    assert_eq!(doomed.await, Err(CallError::Cancelled));
    assert_eq!(innocent.await.unwrap(), status.workers[0].pid);
    let exits: Vec<_> = drain(&mut events)
        .into_iter()
        .filter(|e| matches!(e, Event::Exited { .. }))
        .collect();
    assert!(exits.is_empty(), "{exits:?}");
    farm.shutdown().await;
}
