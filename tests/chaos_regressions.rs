//! Scenarios found in review that once wedged the farm or a worker. Each must settle.

mod support;

use std::time::Duration;
use support::*;
use workfarm::{CallError, CreateError, Event, Farm, FarmOptions, WorkerState};

/// A worker that prints to stdout before its handshake (a logger set up before `serve()`, or
/// not a workfarm worker at all) fails to start: backoff, then a clear error. It used to be
/// respawned in a hot loop while calls waited forever.
#[tokio::test]
async fn garbage_before_the_handshake_is_a_start_failure() {
    trace_init();
    let farm = Farm::create(
        FarmOptions::new("/bin/sh")
            .args(["-c", "echo garbage; sleep 30"])
            .workers(1),
    )
    .unwrap();
    let mut events = farm.events();
    let call = farm.run_method::<_, i64>("noop", 1);
    let err = tokio::time::timeout(SOON, call)
        .await
        .expect("settles")
        .unwrap_err();
    match &err {
        CallError::WorkerStart { message } => {
            assert!(message.contains("before its handshake"), "{message}")
        }
        other => panic!("expected WorkerStart, got {other:?}"),
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut spawned = 0;
    while let Ok(Ok(event)) = tokio::time::timeout_at(deadline, events.recv()).await {
        if matches!(event, Event::Spawned { .. }) {
            spawned += 1;
        }
    }
    assert!(spawned <= 10, "{spawned} spawns: no backoff");
    farm.kill().await;
}

/// A retiring worker's call re-queued after the replacement was reaped for idleness: the
/// farm must start a worker for it. It used to wait forever with no live worker.
#[tokio::test]
async fn requeued_call_with_no_live_worker_starts_one() {
    let farm = Farm::create(
        options(1)
            .ttl(1)
            .max_idle_time(Duration::from_millis(150))
            .max_retries(1),
    )
    .unwrap();
    let mut events = farm.events();
    // Worker A takes the call and retires (ttl 1); B starts, idles, and is stopped.
    let call = farm.run_method::<_, u32>("sleep", 3000u64);
    let a = match wait_for_event(&mut events, SOON, |e| matches!(e, Event::TtlReached { .. })).await
    {
        Event::TtlReached { worker } => worker,
        _ => unreachable!(),
    };
    wait_for_event(&mut events, SOON, |e| {
        matches!(e, Event::IdleReached { .. })
    })
    .await;
    let pid_a = farm
        .status()
        .await
        .workers
        .iter()
        .find(|w| w.id == a)
        .map(|w| w.pid)
        .expect("A is still running its call");
    std::process::Command::new("kill")
        .args(["-9", &pid_a.to_string()])
        .status()
        .unwrap();
    let pid = tokio::time::timeout(SOON, call)
        .await
        .expect("the re-queued call settles")
        .expect("and succeeds on a new worker");
    assert_ne!(pid, pid_a);
    farm.shutdown().await;
}

/// A panic in a user `Deserialize` impl is a `Panic` error for that call; the worker keeps
/// serving, and (async case) still exits cleanly on shutdown.
#[tokio::test]
async fn panicking_deserialize_is_caught_in_sync_and_async_handlers() {
    let farm = Farm::create(options(1).stderr(workfarm::StderrMode::Discard)).unwrap();
    let pid: u32 = farm.run_method("pid", ()).await.unwrap();
    for method in ["decode_panic", "decode_panic_async"] {
        let err = farm.run_method::<_, u8>(method, 1).await.unwrap_err();
        assert!(
            matches!(&err, CallError::Panic { message, .. } if message.contains("deserialize panicked")),
            "{method}: {err:?}"
        );
    }
    assert_eq!(farm.run_method::<_, u32>("pid", ()).await.unwrap(), pid);
    let mut events = farm.events();
    tokio::time::timeout(SOON, farm.shutdown())
        .await
        .expect("shutdown completes");
    let exited = wait_for_event(&mut events, SOON, |e| matches!(e, Event::Exited { .. })).await;
    assert!(
        matches!(exited, Event::Exited { exit, .. } if exit.code == Some(0)),
        "{exited:?}"
    );
}

/// A broadcast whose arguments cannot be sent reports each live worker as a failure rather
/// than an empty result that looks like "no workers".
#[tokio::test]
async fn broadcast_that_cannot_be_encoded_fails_on_every_worker() {
    let farm = Farm::create(options(2).max_frame(1024)).unwrap();
    let mut events = farm.events();
    collect_events(&mut events, 2, SOON, |e| matches!(e, Event::Online { .. })).await;
    let result = farm
        .broadcast_method::<_, String>("echo", "z".repeat(4096))
        .await;
    assert!(result.successes.is_empty());
    assert_eq!(result.failures.len(), 2);
    for (_, e) in &result.failures {
        assert!(matches!(e, CallError::Serialize { .. }), "{e:?}");
    }
    // Nothing reached the workers: both are still online and idle.
    let status = farm.status().await;
    assert_eq!(status.workers.len(), 2);
    assert!(status
        .workers
        .iter()
        .all(|w| w.state == WorkerState::Online && w.in_flight == 0));
    farm.shutdown().await;
}

/// What `Farm::create` says on a runtime built by `builder`.
fn create_error_on(builder: &mut tokio::runtime::Builder) -> CreateError {
    let runtime = builder.build().unwrap();
    runtime
        .block_on(async { Farm::create(options(1)).map(|_| ()) })
        .unwrap_err()
}

/// A runtime without its time driver: a `CreateError` naming it, not a farm whose every call
/// fails with `ShutDown` after internal panics.
#[test]
fn runtime_without_timers_is_an_error_naming_the_driver() {
    let err = create_error_on(tokio::runtime::Builder::new_current_thread().enable_io());
    assert!(
        matches!(err, CreateError::RuntimeDriverMissing { driver: "time" }),
        "{err:?}"
    );
    assert!(err.to_string().contains("enable_time"), "{err}");
}

/// A runtime without its I/O driver cannot spawn workers: a clear error from `create`, and
/// the process-wide spawner survives for farms on proper runtimes.
#[test]
fn runtime_without_io_is_an_error_and_does_not_break_later_farms() {
    let err = create_error_on(tokio::runtime::Builder::new_current_thread().enable_time());
    assert!(
        matches!(err, CreateError::RuntimeDriverMissing { driver: "io" }),
        "{err:?}"
    );
    assert!(err.to_string().contains("enable_all"), "{err}");
    let good = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    good.block_on(async {
        let farm = Farm::create(options(1)).unwrap();
        assert_eq!(farm.run_method::<_, i64>("add", (1, 2)).await.unwrap(), 3);
        farm.shutdown().await;
    });
}
