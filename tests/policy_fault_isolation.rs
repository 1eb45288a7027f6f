//! A crash or a hang costs only its own call: the calls that merely shared its worker are
//! not failed, not charged and not held back. One test (at least) per way that used to go
//! wrong, against real worker processes.

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};
use support::*;
use tokio::time::timeout;
use workfarm::{CallError, Event, Farm, FarmOptions};

/// A reply leaves as soon as its handler returns, not with the replies of later calls that
/// arrived in the same read.
#[tokio::test(flavor = "multi_thread")]
async fn a_reply_is_not_held_back_by_a_slow_call_behind_it() {
    let farm = Farm::create(options(1).max_concurrent_calls_per_worker(3)).unwrap();
    all_online(&farm, 1).await;
    // The first call keeps the worker busy, so the next two reach it in one read.
    let first = tokio::spawn(farm.run_method::<_, u32>("block", 300u64));
    wait_status(&farm, SOON, |s| s.in_flight() == 1).await;
    let quick = farm.run_method::<_, i64>("noop", 7);
    let slow = tokio::spawn(farm.run_method::<_, u32>("block", 6000u64));
    // Sent ahead behind the busy call (the stalled worker may hand them back to the farm
    // within ~10 ms; either way they are all the farm's calls now).
    wait_status(&farm, SOON, |s| {
        s.in_flight() >= 1 && s.in_flight() + s.queued == 3
    })
    .await;
    let answered = timeout(Duration::from_secs(4), quick).await;
    assert_eq!(answered.expect("answered before the slow call ends"), Ok(7));
    assert!(first.await.unwrap().is_ok());
    assert!(!slow.is_finished(), "the slow call is still running");
    farm.kill().await;
}

/// Calls that only waited inside a worker are not charged for its crash.
#[tokio::test(flavor = "multi_thread")]
async fn calls_waiting_behind_a_crash_are_rerun_free() {
    let farm = Farm::create(
        options(1)
            .max_retries(0)
            .max_concurrent_calls_per_worker(6)
            .stderr(workfarm::StderrMode::Discard),
    )
    .unwrap();
    all_online(&farm, 1).await;
    // A busy first call, so the crash and its victims are all sent ahead into the worker.
    let first = farm.run_method::<_, u32>("block", 300u64);
    let crash = farm.run_method::<_, ()>("exit", 3);
    let victims: Vec<_> = (0..4i64)
        .map(|i| farm.run_method::<_, i64>("noop", i))
        .collect();
    // (The stalled worker may hand the waiting ones back within ~10 ms.)
    wait_status(&farm, SOON, |s| {
        s.in_flight() >= 1 && s.in_flight() + s.queued == 6
    })
    .await;
    assert!(first.await.is_ok());
    match timeout(SOON, crash).await.expect("settles") {
        Err(CallError::WorkerDied { running, exit, .. }) => {
            assert!(running, "the culprit was running");
            assert_eq!(exit.code, Some(3));
        }
        other => panic!("expected WorkerDied, got {other:?}"),
    }
    for (i, call) in victims.into_iter().enumerate() {
        assert_eq!(timeout(SOON, call).await.expect("settles"), Ok(i as i64));
    }
    farm.shutdown().await;
}

/// A waiting call's timeout clock starts when its handler starts.
#[tokio::test(flavor = "multi_thread")]
async fn timeout_counts_from_the_start_of_the_handler() {
    let farm = Farm::create(
        options(1)
            .timeout(Duration::from_millis(1500))
            .max_concurrent_calls_per_worker(3),
    )
    .unwrap();
    all_online(&farm, 1).await;
    // Each runs 1 s; the last waits 2 s first: more than the timeout from when it was sent.
    let calls: Vec<_> = (0..3)
        .map(|_| farm.run_method::<_, u32>("block", 1000u64))
        .collect();
    let mut pids = HashSet::new();
    for call in calls {
        pids.insert(
            timeout(SOON, call)
                .await
                .expect("settles")
                .expect("in time"),
        );
    }
    assert_eq!(
        pids.len(),
        1,
        "all ran on the one worker, none was restarted"
    );
    farm.shutdown().await;
}

/// node-worker-farm's durability test: 2 workers, 20 calls that kill their worker half the
/// time, generous retries. Every call settles with a result; crashes are not start failures,
/// so nothing backs off for seconds and nothing fails fast.
async fn durability(farm: Farm) {
    let mut events = farm.events();
    let started = Instant::now();
    let calls: Vec<_> = (0..20)
        .map(|_| farm.run_method::<_, u32>("exit_sometimes", 0.5f64))
        .collect();
    let mut pids = HashSet::new();
    for call in calls {
        let pid = timeout(SOON, call).await.expect("settles");
        pids.insert(pid.expect("a result after retries"));
    }
    assert!(pids.len() > 2, "workers were replaced: {pids:?}");
    let start_errors = drain(&mut events)
        .into_iter()
        .filter(|e| {
            matches!(
                e,
                Event::Error {
                    error: CallError::WorkerStart { .. },
                    ..
                }
            )
        })
        .count();
    assert_eq!(start_errors, 0, "a crash mid-call is not a start failure");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    farm.kill().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn durability_at_the_default_concurrency() {
    let options = options(2)
        .max_retries(30)
        .stderr(workfarm::StderrMode::Discard);
    durability(Farm::create(options).unwrap()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn durability_pipelined() {
    let options = options(2)
        .max_retries(30)
        .max_concurrent_calls_per_worker(10)
        .stderr(workfarm::StderrMode::Discard);
    durability(Farm::create(options).unwrap()).await;
}

/// A protocol fault from a worker that is serving is that worker's failure only.
#[tokio::test(flavor = "multi_thread")]
async fn a_protocol_fault_poisons_no_unrelated_call() {
    let farm = Farm::create(options(2).max_retries(1)).unwrap();
    all_online(&farm, 2).await;
    // The first call a fresh worker gets breaks the protocol, then the next one too.
    let rogue = farm.run_method::<_, u32>("garbage", "oversize");
    let others: Vec<_> = (0..50i64)
        .map(|i| farm.run_method::<_, i64>("noop", i))
        .collect();
    let err = timeout(SOON, rogue).await.expect("settles").unwrap_err();
    assert!(
        matches!(&err, CallError::RetriesExhausted { last, .. } if matches!(**last, CallError::Protocol { .. })),
        "{err:?}"
    );
    for (i, call) in others.into_iter().enumerate() {
        assert_eq!(timeout(SOON, call).await.expect("settles"), Ok(i as i64));
    }
    farm.shutdown().await;
}

/// A worker that closes its frame stream but keeps running is ended, and its call settles.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_that_closes_its_frames_is_ended() {
    let farm = Farm::create(options(1).max_retries(0)).unwrap();
    all_online(&farm, 1).await;
    let pid: u32 = farm.run_method("pid", ()).await.unwrap();
    let err = timeout(SOON, farm.run_method::<_, u32>("close_frames", ()))
        .await
        .expect("the call settles without a timeout set")
        .unwrap_err();
    match err {
        CallError::WorkerDied {
            pid: died, running, ..
        } => assert!(died == pid && running, "{err:?}"),
        other => panic!("expected WorkerDied, got {other:?}"),
    }
    wait_gone(pid, SOON).await;
    let after: u32 = timeout(SOON, farm.run_method("pid", ()))
        .await
        .unwrap()
        .unwrap();
    assert_ne!(after, pid);
    farm.shutdown().await;
}

/// A queued call whose future was dropped gives its `max_concurrent_calls` place back at
/// once, without waiting for a worker to have room.
#[tokio::test(flavor = "multi_thread")]
async fn an_abandoned_queued_call_frees_its_place_at_once() {
    let farm = Farm::create(options(1).max_concurrent_calls(2)).unwrap();
    all_online(&farm, 1).await;
    let busy = farm.run_method::<_, u32>("block", 1500u64);
    wait_status(&farm, SOON, |s| s.in_flight() == 1).await;
    let queued = farm.run_method::<_, i64>("noop", 1);
    drop(queued);
    let next = farm.run_method::<_, i64>("noop", 2);
    assert_eq!(timeout(SOON, next).await.expect("settles"), Ok(2));
    busy.await.unwrap();
    farm.shutdown().await;
}

/// A broadcast abandoned while its worker is busy is skipped, not run later.
#[tokio::test(flavor = "multi_thread")]
async fn an_abandoned_broadcast_is_skipped() {
    let farm = Farm::create(options(1)).unwrap();
    all_online(&farm, 1).await;
    let mut events = farm.events();
    let pid: u32 = farm.run_method("pid", ()).await.unwrap();
    let busy = farm.run_method::<_, u32>("block", 1000u64);
    wait_status(&farm, SOON, |s| s.in_flight() == 1).await;
    // Had it run, this broadcast would kill the worker.
    let abandoned = timeout(
        Duration::from_millis(100),
        farm.broadcast_method::<_, ()>("exit", 5),
    );
    assert!(abandoned.await.is_err(), "the worker was busy");
    assert_eq!(busy.await, Ok(pid));
    let after: u32 = timeout(SOON, farm.run_method("pid", ()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(after, pid, "the same worker, still alive");
    let exits = drain(&mut events)
        .into_iter()
        .filter(|e| matches!(e, Event::Exited { .. }))
        .count();
    assert_eq!(exits, 0);
    farm.shutdown().await;
}

/// Broadcast calls waiting for one busy worker are bounded.
#[tokio::test(flavor = "multi_thread")]
async fn broadcasts_waiting_for_a_busy_worker_are_bounded() {
    let farm = Farm::create(options(1)).unwrap();
    all_online(&farm, 1).await;
    let busy = farm.run_method::<_, u32>("block", 3000u64);
    wait_status(&farm, SOON, |s| s.in_flight() == 1).await;
    let waiting: Vec<_> = (0..1100)
        .map(|_| {
            let farm = farm.clone();
            tokio::spawn(async move { farm.broadcast_method::<_, i64>("noop", 1).await })
        })
        .collect();
    let mut refused = 0;
    let mut answered = 0;
    for task in waiting {
        let result = timeout(SOON, task).await.unwrap().unwrap();
        answered += result.successes.len();
        refused += result
            .failures
            .iter()
            .filter(|(_, e)| matches!(e, CallError::QueueFull { .. }))
            .count();
    }
    assert_eq!(answered, 1024, "the bound's worth ran");
    assert_eq!(refused, 1100 - 1024);
    busy.await.unwrap();
    farm.shutdown().await;
}

/// The culprit and the calls that waited behind it are told apart: each attempt says
/// whether the call was running when its worker died.
#[tokio::test(flavor = "multi_thread")]
async fn culprit_and_victims_are_told_apart() {
    let farm = Farm::create(
        options(1)
            .max_retries(0)
            .stderr(workfarm::StderrMode::Discard),
    )
    .unwrap();
    // Two poison calls: the second waits behind the first, then takes down the replacement.
    // Made while the worker starts, both are handed to it in one write once it is ready.
    let first = farm.run_method::<_, ()>("exit", 3);
    let second = farm.run_method::<_, ()>("exit", 4);
    let first = timeout(SOON, first).await.expect("settles").unwrap_err();
    assert!(
        matches!(first, CallError::WorkerDied { running: true, .. }),
        "{first:?}"
    );
    match timeout(SOON, second).await.expect("settles").unwrap_err() {
        CallError::RetriesExhausted {
            attempts,
            last,
            earlier,
        } => {
            assert_eq!(
                attempts, 1,
                "waiting behind the first crash was not an attempt"
            );
            assert!(
                matches!(*last, CallError::WorkerDied { running: true, exit, .. } if exit.code == Some(4))
            );
            assert!(
                matches!(earlier[..], [CallError::WorkerDied { running: false, exit, .. }] if exit.code == Some(3)),
                "{earlier:?}"
            );
        }
        other => panic!("expected RetriesExhausted, got {other:?}"),
    }
    farm.shutdown().await;
}

/// The validation job in small: 300 calls on 2 workers, 3 of which abort their worker and
/// 1 of which spins. Exactly those fail, as what they are; the others all succeed; and the
/// job takes about as long as it does with one call per worker.
async fn validation_job(options: FarmOptions) -> Duration {
    let farm = Farm::create(
        options
            .timeout(Duration::from_secs(2))
            .max_retries(1)
            .stderr(workfarm::StderrMode::Discard),
    )
    .unwrap();
    all_online(&farm, 2).await;
    let started = Instant::now();
    let calls: Vec<_> = (0..300)
        .map(|i| {
            let (method, args) = match i {
                50 | 120 | 200 => ("abort", serde_json::Value::Null),
                150 => ("spin", serde_json::Value::Null),
                _ => ("block", serde_json::json!(5)),
            };
            farm.run_method::<_, serde_json::Value>(method, args)
        })
        .collect();
    let (mut ok, mut crashed, mut timed_out) = (0, Vec::new(), Vec::new());
    for (i, call) in calls.into_iter().enumerate() {
        match timeout(SOON, call).await.expect("every call settles") {
            Ok(_) => ok += 1,
            Err(e) if e.is_timeout() => timed_out.push(i),
            Err(e) if e.is_worker_lost() => crashed.push(i),
            Err(e) => panic!("call {i}: {e:?}"),
        }
    }
    let took = started.elapsed();
    assert_eq!(
        (ok, crashed, timed_out),
        (296, vec![50, 120, 200], vec![150])
    );
    farm.kill().await;
    took
}

#[tokio::test(flavor = "multi_thread")]
async fn the_validation_job_charges_exactly_the_culprits() {
    let at_default = validation_job(options(2)).await;
    let one_per_worker = validation_job(options(2).max_concurrent_calls_per_worker(1)).await;
    let pipelined = validation_job(options(2).max_concurrent_calls_per_worker(10)).await;
    eprintln!("validation job: default {at_default:?}, one per worker {one_per_worker:?}, pipelined {pipelined:?}");
    let bound = one_per_worker.mul_f64(1.5) + Duration::from_millis(500);
    assert!(at_default <= bound, "{at_default:?} vs {one_per_worker:?}");
    assert!(pipelined <= bound, "{pipelined:?} vs {one_per_worker:?}");
}

/// On a one-thread worker an async call sent while a sync handler runs is not read until
/// the handler ends: it waits, so the sync call's crash does not charge it (no retries, and
/// it still succeeds, on the replacement).
#[tokio::test(flavor = "multi_thread")]
async fn an_async_call_behind_a_running_sync_call_is_not_charged() {
    let farm = Farm::create(
        options(1)
            .max_retries(0)
            .stderr(workfarm::StderrMode::Discard),
    )
    .unwrap();
    all_online(&farm, 1).await;
    let pid: u32 = farm.run_method("pid", ()).await.unwrap();
    let crash = farm.run_method::<_, u32>("abort", ());
    let sleeper = farm.run_method::<_, u32>("sleep", 10u64);
    let err = timeout(SOON, crash).await.expect("settles").unwrap_err();
    assert!(
        matches!(err, CallError::WorkerDied { running: true, .. }),
        "{err:?}"
    );
    let ran_on = timeout(SOON, sleeper).await.expect("settles").unwrap();
    assert_ne!(ran_on, pid, "it ran on the replacement");
    farm.shutdown().await;
}

/// An async call does not wait in the farm's queue behind a sync call that has no thread
/// to run on: on a worker with two sync threads (which reads while they run), async calls
/// keep their concurrency.
#[tokio::test(flavor = "multi_thread")]
async fn async_calls_pass_sync_calls_that_wait_for_a_thread() {
    let farm = Farm::create(options(1).env("WORKER_THREADS", "2")).unwrap();
    all_online(&farm, 1).await;
    let busy: Vec<_> = (0..2)
        .map(|_| tokio::spawn(farm.run_method::<_, u32>("block", 4000u64)))
        .collect();
    wait_status(&farm, SOON, |s| s.in_flight() == 2).await;
    let behind = tokio::spawn(farm.run_method::<_, u32>("block", 1u64));
    wait_status(&farm, SOON, |s| s.queued == 1).await;
    let sleeper = farm.run_method::<_, u32>("sleep", 10u64);
    let answered = timeout(Duration::from_secs(3), sleeper).await;
    assert!(answered.expect("not held behind the sync call").is_ok());
    assert!(busy.iter().all(|t| !t.is_finished()) && !behind.is_finished());
    farm.kill().await;
}

/// With `Worker::threads(2)` two sync calls really run at once; a third waits in the farm
/// until one of them is done (sent ahead, it is taken back from the stalled worker within
/// about 10 ms).
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_with_two_threads_runs_two_sync_calls() {
    let farm = Farm::create(options(1).env("WORKER_THREADS", "2")).unwrap();
    all_online(&farm, 1).await;
    let calls: Vec<_> = (0..3)
        .map(|_| tokio::spawn(farm.run_method::<_, u32>("block", 1000u64)))
        .collect();
    let status = wait_status(&farm, SOON, |s| s.in_flight() == 2).await;
    assert_eq!(
        (status.queued, status.workers[0].waiting),
        (1, 0),
        "{status:?}"
    );
    for call in calls {
        assert!(timeout(SOON, call).await.unwrap().unwrap().is_ok());
    }
    farm.shutdown().await;
}

/// Calls made and dropped while every worker is busy do not pile up in the queue: their
/// places come back at once, and the queue is swept.
#[tokio::test(flavor = "multi_thread")]
async fn abandoned_calls_do_not_pile_up() {
    let farm = Farm::create(options(1).max_concurrent_calls(10)).unwrap();
    all_online(&farm, 1).await;
    let busy = farm.run_method::<_, u32>("block", 1500u64);
    wait_status(&farm, SOON, |s| s.in_flight() == 1).await;
    for i in 0..10_000i64 {
        drop(farm.run_method::<_, i64>("noop", i));
    }
    wait_status(&farm, SOON, |s| s.queued <= 20).await;
    busy.await.unwrap();
    assert_eq!(
        timeout(SOON, farm.run_method::<_, i64>("noop", 5))
            .await
            .unwrap(),
        Ok(5)
    );
    farm.shutdown().await;
}
