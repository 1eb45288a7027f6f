//! Retry policy against real workers: which failures are retried, how attempts are counted,
//! what a call fails with when they run out, and that calls move off a dead worker.
//! Ports node-worker-farm's "durability" and "max retries after process terminate" tests and
//! workestrator's "respect maxRetries" and "redistribute on kill".

mod support;

use std::collections::HashSet;
use std::time::Duration;
use support::*;
use tokio::time::timeout;
use workfarm::{CallError, Event, ExitInfo, Farm, Status, WorkerState};

fn online(status: &Status) -> usize {
    status
        .workers
        .iter()
        .filter(|w| w.state == WorkerState::Online)
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_without_retries_fails_with_the_cause_itself() {
    let farm = Farm::create(options(1).max_retries(0)).unwrap();
    let pid: u32 = farm.run_method("pid", ()).await.unwrap();
    let err = timeout(SOON, farm.run_method::<_, ()>("exit", 3))
        .await
        .expect("the call settles")
        .unwrap_err();
    match err {
        CallError::WorkerDied {
            pid: died, exit, ..
        } => {
            assert_eq!(died, pid);
            assert_eq!(
                exit,
                ExitInfo {
                    code: Some(3),
                    signal: None
                }
            );
        }
        other => panic!("expected WorkerDied, got {other:?}"),
    }
    farm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn crashed_call_is_retried_on_a_surviving_worker() {
    // `stubborn` with n = 1 kills its first worker, then answers 12. The retry must run on
    // the other worker, which is online, not wait for the dead one's replacement.
    let path = counter_file("survivor");
    let farm = Farm::create(options(2).max_retries(1)).unwrap();
    let mut events = farm.events();
    let online: Vec<_> =
        collect_events(&mut events, 2, SOON, |e| matches!(e, Event::Online { .. }))
            .await
            .iter()
            .map(|e| e.worker().unwrap())
            .collect();
    let got: u32 = timeout(
        SOON,
        farm.run_method("stubborn", (path.display().to_string(), 1)),
    )
    .await
    .expect("the call settles")
    .unwrap();
    assert_eq!(got, 12);
    let dead = wait_for_event(&mut events, SOON, |e| matches!(e, Event::Exited { .. }))
        .await
        .worker()
        .unwrap();
    let done = wait_for_event(&mut events, SOON, |e| {
        matches!(e, Event::CallDone { ok: true, .. })
    })
    .await
    .worker()
    .unwrap();
    assert!(online.contains(&dead));
    assert!(
        online.contains(&done),
        "ran on {done}, one of the first workers {online:?}"
    );
    assert_ne!(done, dead);
    let _ = std::fs::remove_file(&path);
    farm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_pill_exhausts_retries_and_the_farm_keeps_serving() {
    let farm = Farm::create(options(2).max_retries(2)).unwrap();
    let mut events = farm.events();
    let err = timeout(SOON, farm.run_method::<_, ()>("exit", 3))
        .await
        .expect("the call settles")
        .unwrap_err();
    let CallError::RetriesExhausted {
        attempts,
        last,
        earlier,
    } = &err
    else {
        panic!("expected RetriesExhausted, got {err:?}");
    };
    assert_eq!(*attempts, 3);
    assert!(err.is_worker_lost());
    // Every attempt's failure is kept: three victims, three different processes.
    assert_eq!(earlier.len(), 2, "{err:?}");
    let mut victims = HashSet::new();
    for failure in earlier.iter().chain(std::iter::once(&**last)) {
        match failure {
            CallError::WorkerDied { exit, pid, .. } => {
                assert_eq!(exit.code, Some(3));
                victims.insert(*pid);
            }
            other => panic!("expected WorkerDied, got {other:?}"),
        }
    }
    assert_eq!(victims.len(), 3, "{err:?}");
    let exits = collect_events(
        &mut events,
        3,
        SOON,
        |e| matches!(e, Event::Exited { exit, .. } if exit.code == Some(3)),
    )
    .await;
    let pids: HashSet<u32> = exits
        .iter()
        .map(|e| match e {
            Event::Exited { pid, .. } => *pid,
            _ => unreachable!(),
        })
        .collect();
    assert_eq!(pids, victims, "the error names the workers that exited");

    // The farm still serves, on a full set of workers.
    let sums: Vec<_> = (0..10i64)
        .map(|i| farm.run_method::<_, i64>("add", (i, 1)))
        .collect();
    for (i, sum) in sums.into_iter().enumerate() {
        assert_eq!(timeout(SOON, sum).await.unwrap().unwrap(), i as i64 + 1);
    }
    wait_status(&farm, SOON, |s| online(s) == 2).await;
    farm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn stubborn_job_succeeds_within_max_retries() {
    let path = counter_file("ok");
    let farm = Farm::create(options(2).max_retries(5)).unwrap();
    let got: u32 = timeout(
        SOON,
        farm.run_method("stubborn", (path.display().to_string(), 5)),
    )
    .await
    .expect("the call settles")
    .unwrap();
    assert_eq!(got, 12);
    let seen = std::fs::read_to_string(&path).unwrap();
    assert_eq!(
        seen.trim(),
        "5",
        "the job died five times before succeeding"
    );
    let _ = std::fs::remove_file(&path);
    farm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn stubborn_job_fails_after_max_retries() {
    let path = counter_file("exhausted");
    let farm = Farm::create(options(2).max_retries(3)).unwrap();
    let err = timeout(
        SOON,
        farm.run_method::<_, u32>("stubborn", (path.display().to_string(), 5)),
    )
    .await
    .expect("the call settles")
    .unwrap_err();
    match &err {
        CallError::RetriesExhausted {
            attempts,
            last,
            earlier,
        } => {
            assert_eq!(*attempts, 4);
            assert_eq!(earlier.len(), 3);
            for failure in earlier.iter().chain(std::iter::once(&**last)) {
                assert!(
                    matches!(failure, CallError::WorkerDied { exit, .. } if exit.code == Some(9)),
                    "failure: {failure:?}"
                );
            }
        }
        other => panic!("expected RetriesExhausted, got {other:?}"),
    }
    let seen = std::fs::read_to_string(&path).unwrap();
    assert_eq!(seen.trim(), "4", "four attempts ran, each one died");
    let _ = std::fs::remove_file(&path);
    farm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn handler_errors_are_not_retried_by_default() {
    let farm = Farm::create(options(2).max_retries(3)).unwrap();
    let mut events = farm.events();
    let err = farm.run_method::<_, ()>("fail", "nope").await.unwrap_err();
    assert_eq!(
        err,
        CallError::Handler {
            method: "fail".into(),
            message: "nope".into()
        }
    );
    let err = farm.run_method::<_, ()>("panic", "boom").await.unwrap_err();
    assert_eq!(
        err,
        CallError::Panic {
            method: "panic".into(),
            message: "boom".into()
        }
    );
    // A marker call: once its CallDone is seen, every earlier CallDone has been emitted.
    let marker: i64 = farm.run_method("add", (1, 1)).await.unwrap();
    assert_eq!(marker, 2);
    let mut failed = 0;
    while let Event::CallDone { ok: false, .. } =
        wait_for_event(&mut events, SOON, |e| matches!(e, Event::CallDone { .. })).await
    {
        failed += 1;
    }
    assert_eq!(failed, 2, "each failing call ran exactly once");
    farm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn handler_errors_are_retried_on_another_worker_when_asked() {
    let farm = Farm::create(options(2).max_retries(2).retry_handler_errors(true)).unwrap();
    let mut events = farm.events();
    collect_events(&mut events, 2, SOON, |e| matches!(e, Event::Online { .. })).await;
    let err = farm.run_method::<_, ()>("fail", "again").await.unwrap_err();
    match &err {
        CallError::RetriesExhausted { attempts, last, .. } => {
            assert_eq!(*attempts, 3);
            assert_eq!(
                **last,
                CallError::Handler {
                    method: "fail".into(),
                    message: "again".into()
                }
            );
        }
        other => panic!("expected RetriesExhausted, got {other:?}"),
    }
    assert!(err.is_handler());
    let attempts = collect_events(&mut events, 3, SOON, |e| {
        matches!(e, Event::CallDone { ok: false, .. })
    })
    .await;
    let workers: Vec<_> = attempts.iter().map(|e| e.worker().unwrap()).collect();
    // Each retry avoids the worker of the attempt before it, since another one has room.
    assert_ne!(workers[0], workers[1], "attempts: {workers:?}");
    assert_ne!(workers[1], workers[2], "attempts: {workers:?}");
    farm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn handler_error_with_zero_retries_is_the_error_itself() {
    let farm = Farm::create(options(1).max_retries(0).retry_handler_errors(true)).unwrap();
    let err = farm.run_method::<_, ()>("fail", "once").await.unwrap_err();
    assert_eq!(
        err,
        CallError::Handler {
            method: "fail".into(),
            message: "once".into()
        }
    );
    farm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn timed_out_call_is_retried_then_fails_with_timeout_as_last_cause() {
    let after = Duration::from_millis(300);
    let farm = Farm::create(options(2).max_retries(1).timeout(after)).unwrap();
    let mut events = farm.events();
    let first: Vec<_> = collect_events(&mut events, 2, SOON, |e| matches!(e, Event::Online { .. }))
        .await
        .iter()
        .map(|e| e.worker().unwrap())
        .collect();
    let started = tokio::time::Instant::now();
    let err = timeout(SOON, farm.run_method::<_, ()>("spin", ()))
        .await
        .expect("the call settles")
        .unwrap_err();
    assert!(
        started.elapsed() >= after * 2,
        "two attempts of {after:?} each"
    );
    assert_eq!(
        err,
        CallError::RetriesExhausted {
            attempts: 2,
            last: Box::new(CallError::Timeout { after }),
            earlier: vec![CallError::Timeout { after }],
        }
    );
    assert!(err.is_timeout());
    // Both attempts' workers were stopped, and they were two different workers.
    let exits = collect_events(&mut events, 2, SOON, |e| matches!(e, Event::Exited { .. })).await;
    assert_ne!(exits[0].worker(), exits[1].worker());
    // The retry ran on the other worker that was already online, not on a replacement.
    for exit in &exits {
        assert!(
            first.contains(&exit.worker().unwrap()),
            "{exits:?} vs {first:?}"
        );
    }
    farm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_sharing_a_crashed_worker_are_charged_a_retry() {
    // Unlike a timeout, a crash charges every call the worker had: with no retries the
    // bystander fails with the crash, with one retry it completes on the replacement.
    // The crash is `stubborn` with n = 1: it takes down one worker, then answers 12.
    for (max_retries, expect_ok) in [(0, false), (1, true)] {
        let path = counter_file(&format!("bystander{max_retries}"));
        let farm = Farm::create(options(1).max_retries(max_retries)).unwrap();
        let pid: u32 = farm.run_method("pid", ()).await.unwrap();
        let bystander = farm.run_method::<_, u32>("sleep", 1000u64);
        wait_status(&farm, SOON, |s| s.in_flight() == 1).await;
        let crash = farm.run_method::<_, u32>("stubborn", (path.display().to_string(), 1));
        let crash = timeout(SOON, crash).await.expect("settles");
        let result = timeout(SOON, bystander).await.expect("settles");
        if expect_ok {
            assert_eq!(crash, Ok(12));
            let ran_on = result.expect("retried on the replacement");
            assert_ne!(ran_on, pid);
        } else {
            assert!(
                crash.as_ref().is_err_and(|e| e.is_worker_lost()),
                "{crash:?}"
            );
            match result {
                Err(CallError::WorkerDied {
                    pid: died, exit, ..
                }) => {
                    assert_eq!(died, pid);
                    assert_eq!(exit.code, Some(9));
                }
                other => panic!("expected WorkerDied, got {other:?}"),
            }
        }
        let _ = std::fs::remove_file(&path);
        farm.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn call_of_a_killed_worker_moves_to_the_other_worker() {
    let farm = Farm::create(options(2)).unwrap();
    let mut events = farm.events();
    collect_events(&mut events, 2, SOON, |e| matches!(e, Event::Online { .. })).await;
    let first = farm.run_method::<_, u32>("sleep", 3000u64);
    let second = farm.run_method::<_, u32>("sleep", 3000u64);
    // Least-loaded dispatch puts one call on each worker.
    let status = wait_status(&farm, SOON, |s| {
        s.workers.len() == 2 && s.workers.iter().all(|w| w.in_flight == 1)
    })
    .await;
    let victim = status.workers[0].pid;
    let survivor = status.workers[1].pid;
    let killed = std::process::Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let exit = wait_for_event(
        &mut events,
        SOON,
        |e| matches!(e, Event::Exited { pid, .. } if *pid == victim),
    )
    .await;
    let Event::Exited { exit, .. } = exit else {
        unreachable!()
    };
    assert_eq!(exit.signal, Some(9));

    // A replacement comes online while the survivor runs both calls; the next call goes to
    // the replacement, the least loaded worker.
    let Event::Online {
        pid: replacement, ..
    } = wait_for_event(
        &mut events,
        SOON,
        |e| matches!(e, Event::Online { pid, .. } if *pid != victim && *pid != survivor),
    )
    .await
    else {
        unreachable!()
    };
    let status = wait_status(&farm, SOON, |s| online(s) == 2).await;
    assert_eq!(
        status
            .workers
            .iter()
            .find(|w| w.pid == survivor)
            .map(|w| w.in_flight),
        Some(2),
        "the killed worker's call moved to the survivor: {status:?}"
    );
    let next: u32 = timeout(SOON, farm.run_method("pid", ()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(next, replacement);

    let a = timeout(SOON, first).await.unwrap().unwrap();
    let b = timeout(SOON, second).await.unwrap().unwrap();
    assert_eq!(
        (a, b),
        (survivor, survivor),
        "both calls completed on the survivor"
    );
    let status = farm.status().await;
    assert_eq!(online(&status), 2, "back to two live workers: {status:?}");
    assert!(status.workers.iter().all(|w| w.pid != victim));
    farm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn durability_every_call_settles_once_while_workers_die() {
    // node-worker-farm "durability": calls that kill their worker half of the time.
    let farm = Farm::create(options(2).max_concurrent_calls_per_worker(1)).unwrap();
    let mut events = farm.events();
    let calls: Vec<_> = (0..20)
        .map(|_| farm.run_method::<_, u32>("exit_sometimes", 0.5))
        .collect();
    let mut pids = HashSet::new();
    let mut ok = 0;
    for call in calls {
        match timeout(SOON, call).await.expect("every call settles") {
            Ok(pid) => {
                ok += 1;
                pids.insert(pid);
            }
            Err(CallError::RetriesExhausted { attempts, last, .. }) => {
                assert_eq!(attempts, 4);
                assert!(last.is_worker_lost(), "last cause: {last:?}");
            }
            Err(other) => panic!("unexpected failure: {other:?}"),
        }
    }
    assert!(ok > 0, "some calls succeed");
    for event in drain(&mut events) {
        if let Event::Exited { pid, .. } = event {
            pids.insert(pid);
        }
    }
    assert!(pids.len() > 2, "workers died and were replaced: {pids:?}");
    farm.shutdown().await;
}
