//! Call timeouts and the kill timeout against real workers: the timed-out call fails (or is
//! retried), its worker is stopped (SIGTERM, then SIGKILL after `kill_timeout`), and the calls
//! that shared the worker are re-queued without being charged a retry.
//! Ports workestrator's "respect timeout", "restart after timeout", "kill timeout when SIGINT
//! ignored" / "no kill timeout when SIGINT works" and node-worker-farm's "call timeout test".

mod support;

use std::time::Duration;
use support::*;
use tokio::time::{timeout, Instant};
use workfarm::{CallError, Event, Farm};

fn exited(event: &Event) -> (u32, workfarm::ExitInfo) {
    match event {
        Event::Exited { pid, exit, .. } => (*pid, *exit),
        other => panic!("not an Exited event: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn spinning_call_times_out_and_its_worker_is_replaced() {
    let after = Duration::from_millis(400);
    let farm = Farm::create(options(1).max_retries(0).timeout(after)).unwrap();
    let mut events = farm.events();
    let quick: u32 = farm.run_method("sleep", 50u64).await.unwrap();

    let started = Instant::now();
    let err = timeout(SOON, farm.run_method::<_, ()>("spin", ()))
        .await
        .expect("the call settles")
        .unwrap_err();
    let elapsed = started.elapsed();
    assert_eq!(err, CallError::Timeout { after });
    assert!(elapsed >= after, "timed out after {elapsed:?}");
    assert!(
        elapsed < Duration::from_secs(5),
        "timed out after {elapsed:?}"
    );

    // The worker is stopped with SIGTERM (it does not ignore it), well before kill_timeout.
    let (pid, exit) =
        exited(&wait_for_event(&mut events, SOON, |e| matches!(e, Event::Exited { .. })).await);
    assert_eq!(pid, quick);
    assert_eq!(exit.signal, Some(15), "{exit:?}");
    wait_gone(quick, SOON).await;

    // A replacement serves the next call.
    let next: u32 = timeout(SOON, farm.run_method("pid", ()))
        .await
        .unwrap()
        .unwrap();
    assert_ne!(next, quick);
    farm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn timed_out_call_is_retried_on_the_other_worker_and_succeeds() {
    // `slow_once` blocks its first run past the timeout and answers at once after that.
    let path = counter_file("slow-once");
    let after = Duration::from_millis(400);
    let farm = Farm::create(options(2).max_retries(1).timeout(after)).unwrap();
    let mut events = farm.events();
    let first: Vec<u32> =
        collect_events(&mut events, 2, SOON, |e| matches!(e, Event::Online { .. }))
            .await
            .iter()
            .map(|e| match e {
                Event::Online { pid, .. } => *pid,
                _ => unreachable!(),
            })
            .collect();
    let started = Instant::now();
    let ran_on: u32 = timeout(
        SOON,
        farm.run_method("slow_once", (path.display().to_string(), 5000u64)),
    )
    .await
    .expect("settles")
    .expect("the retry succeeds");
    assert!(started.elapsed() >= after);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "did not wait for the slow run"
    );
    // The first attempt's worker was stopped; the retry ran on the other original worker.
    let (stopped, exit) =
        exited(&wait_for_event(&mut events, SOON, |e| matches!(e, Event::Exited { .. })).await);
    assert!(exit.is_signal(), "{exit:?}");
    assert!(
        first.contains(&stopped) && first.contains(&ran_on),
        "{first:?}"
    );
    assert_ne!(ran_on, stopped);
    let _ = std::fs::remove_file(&path);
    farm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn time_waiting_in_the_queue_does_not_count() {
    // One worker running one call at a time: the second call waits ~400 ms for the first,
    // then runs 400 ms; 800 ms in all, but only 400 ms of it on a worker.
    let after = Duration::from_millis(700);
    let farm = Farm::create(
        options(1)
            .max_concurrent_calls_per_worker(1)
            .max_retries(0)
            .timeout(after),
    )
    .unwrap();
    let pid: u32 = farm.run_method("pid", ()).await.unwrap();
    let started = Instant::now();
    let a = farm.run_method::<_, u32>("sleep", 400u64);
    let b = farm.run_method::<_, u32>("sleep", 400u64);
    assert_eq!(timeout(SOON, a).await.unwrap(), Ok(pid));
    assert_eq!(timeout(SOON, b).await.unwrap(), Ok(pid));
    assert!(started.elapsed() >= Duration::from_millis(800));
    farm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_call_times_out_and_quick_calls_succeed() {
    // node-worker-farm "call timeout test": 1 worker; short calls pass, a long one times out,
    // a call after it runs on a new worker.
    let after = Duration::from_millis(400);
    let farm = Farm::create(options(1).max_retries(0).timeout(after)).unwrap();
    let first: u32 = farm.run_method("sleep", 50u64).await.unwrap();
    let second: u32 = farm.run_method("sleep", 50u64).await.unwrap();
    assert_eq!(first, second);
    let started = Instant::now();
    let err = timeout(SOON, farm.run_method::<_, u32>("sleep", 3000u64))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err, CallError::Timeout { after });
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "did not wait for the call"
    );
    let next: u32 = timeout(SOON, farm.run_method("sleep", 50u64))
        .await
        .unwrap()
        .unwrap();
    assert_ne!(next, first);
    farm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_sharing_a_timed_out_worker_are_requeued_uncharged() {
    // One single-threaded worker, pipelined: `spin` wedges it, so the calls sent after it
    // wait inside it. When `spin` times out they must run on the replacement, even with no
    // retries.
    let after = Duration::from_millis(1000);
    let farm = Farm::create(
        options(1)
            .max_retries(0)
            .timeout(after)
            .max_concurrent_calls_per_worker(5),
    )
    .unwrap();
    let mut events = farm.events();
    wait_for_event(&mut events, SOON, |e| matches!(e, Event::Online { .. })).await;
    let spin = farm.run_method::<_, ()>("spin", ());
    let others: Vec<_> = (0..4i64)
        .map(|i| farm.run_method::<_, i64>("add", (i, 10)))
        .collect();
    // All five calls go to the one worker; four of them wait behind `spin`, and within
    // about 10 ms the stalled worker gives them back to the farm's queue (see Pipelining).
    // Either way they must run on the replacement. (Waiting for "4 waiting inside" raced
    // with that take-back.)
    wait_status(&farm, SOON, |s| {
        s.in_flight() >= 1 && s.in_flight() + s.queued == 5
    })
    .await;

    assert_eq!(
        timeout(SOON, spin).await.unwrap().unwrap_err(),
        CallError::Timeout { after }
    );
    for (i, call) in others.into_iter().enumerate() {
        let sum = timeout(SOON, call).await.expect("the call settles");
        assert_eq!(sum, Ok(i as i64 + 10));
    }
    farm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn requeued_calls_keep_their_retry_budget() {
    // `stubborn` with n = 1 dies once, then answers 12: it needs exactly one retry. It shares
    // the spinning worker twice (spin is retried once), so it is re-queued twice uncharged
    // before it runs; if those re-queues were charged it would exhaust max_retries(1).
    let path = counter_file("budget");
    let after = Duration::from_millis(400);
    let farm = Farm::create(options(1).max_retries(1).timeout(after)).unwrap();
    let mut events = farm.events();
    wait_for_event(&mut events, SOON, |e| matches!(e, Event::Online { .. })).await;
    let spin = farm.run_method::<_, ()>("spin", ());
    let stubborn = farm.run_method::<_, u32>("stubborn", (path.display().to_string(), 1));

    let err = timeout(SOON, spin).await.unwrap().unwrap_err();
    assert!(
        matches!(err, CallError::RetriesExhausted { attempts: 2, .. }),
        "spin: {err:?}"
    );
    let got = timeout(SOON, stubborn).await.expect("the call settles");
    assert_eq!(got, Ok(12));
    let _ = std::fs::remove_file(&path);
    farm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn worker_ignoring_sigterm_is_killed_after_kill_timeout() {
    let after = Duration::from_millis(300);
    let grace = Duration::from_millis(700);
    let farm = Farm::create(options(1).max_retries(0).timeout(after).kill_timeout(grace)).unwrap();
    let mut events = farm.events();
    let pid: u32 = farm.run_method("ignore_sigterm", ()).await.unwrap();

    let started = Instant::now();
    let err = timeout(SOON, farm.run_method::<_, ()>("spin", ()))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err, CallError::Timeout { after });
    let (dead, exit) =
        exited(&wait_for_event(&mut events, SOON, |e| matches!(e, Event::Exited { .. })).await);
    let elapsed = started.elapsed();
    assert_eq!(dead, pid);
    assert_eq!(exit.signal, Some(9), "{exit:?}");
    assert_eq!(exit.code, None);
    assert!(elapsed >= after + grace, "SIGKILL came after {elapsed:?}");
    wait_gone(pid, SOON).await;
    farm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_escalates_to_sigkill_for_a_busy_worker_ignoring_sigterm() {
    let grace = Duration::from_millis(600);
    let farm = Farm::create(options(1).kill_timeout(grace)).unwrap();
    let mut events = farm.events();
    let pid: u32 = farm.run_method("ignore_sigterm", ()).await.unwrap();
    let spin = farm.run_method::<_, ()>("spin", ());
    wait_status(&farm, SOON, |s| s.in_flight() == 1).await;

    let started = Instant::now();
    timeout(SOON, farm.kill()).await.expect("kill returns");
    let elapsed = started.elapsed();
    assert_eq!(spin.await, Err(CallError::ShutDown));
    let (dead, exit) =
        exited(&wait_for_event(&mut events, SOON, |e| matches!(e, Event::Exited { .. })).await);
    assert_eq!(dead, pid);
    assert_eq!(exit.signal, Some(9), "{exit:?}");
    assert!(elapsed >= grace, "kill returned after {elapsed:?}");
    assert!(!process_alive(pid));
}

#[tokio::test(flavor = "multi_thread")]
async fn normal_worker_exits_on_sigterm_before_kill_timeout() {
    let grace = Duration::from_secs(5);
    let farm = Farm::create(options(1).kill_timeout(grace)).unwrap();
    let mut events = farm.events();
    let pid: u32 = farm.run_method("pid", ()).await.unwrap();
    let spin = farm.run_method::<_, ()>("spin", ());
    wait_status(&farm, SOON, |s| s.in_flight() == 1).await;

    let started = Instant::now();
    timeout(SOON, farm.kill()).await.expect("kill returns");
    let elapsed = started.elapsed();
    assert_eq!(spin.await, Err(CallError::ShutDown));
    let (dead, exit) =
        exited(&wait_for_event(&mut events, SOON, |e| matches!(e, Event::Exited { .. })).await);
    assert_eq!(dead, pid);
    assert_eq!(exit.signal, Some(15), "{exit:?}");
    assert!(elapsed < Duration::from_secs(2), "kill took {elapsed:?}");
    assert!(!process_alive(pid));
}
