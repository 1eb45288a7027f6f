//! A worker that dies on its own right after its handshake is treated like one that fails to
//! start: respawned with backoff, never in a hot loop.

mod support;

use std::time::Duration;
use support::*;
use workfarm::{CallError, Event, Farm};

#[tokio::test]
async fn worker_dying_right_after_handshake_is_respawned_with_backoff() {
    let farm = Farm::create(options(1).env("WORKER_EXIT_AFTER_MS", "30")).unwrap();
    let mut events = farm.events();
    // Count spawns over two seconds: a hot loop would spawn about every 30 ms (60+).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut spawned = 0;
    let mut online = 0;
    while let Ok(Ok(event)) = tokio::time::timeout_at(deadline, events.recv()).await {
        match event {
            Event::Spawned { .. } => spawned += 1,
            Event::Online { .. } => online += 1,
            _ => {}
        }
    }
    assert!(online >= 1, "the worker came online at least once");
    assert!(
        spawned <= 8,
        "{spawned} spawns in 2 s: backoff is not working"
    );
    // After three early deaths in a row, calls fail fast with the reason.
    let err = tokio::time::timeout(SOON, farm.run_method::<_, i64>("noop", 1))
        .await
        .expect("the call settles");
    match err {
        Err(CallError::WorkerStart { message }) => {
            assert!(message.contains("right after its handshake"), "{message}");
            assert!(message.contains("exit code 4"), "{message}");
        }
        // The worker may be online at the moment of the call and die under it.
        Err(e) if e.is_worker_lost() => {}
        other => panic!("expected WorkerStart, got {other:?}"),
    }
    farm.kill().await;
}

/// The same with calls waiting: the worker dies with calls in flight, which are retried, but
/// its replacements still come with backoff rather than as fast as the OS allows.
#[tokio::test]
async fn early_deaths_with_calls_queued_still_back_off() {
    let farm = Farm::create(
        options(1)
            .env("WORKER_EXIT_AFTER_MS", "30")
            .stderr(workfarm::StderrMode::Discard),
    )
    .unwrap();
    let mut events = farm.events();
    let calls: Vec<_> = (0..200)
        .map(|_| farm.run_method::<_, u32>("sleep", 200u64))
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut spawned = 0;
    while let Ok(Ok(event)) = tokio::time::timeout_at(deadline, events.recv()).await {
        if matches!(event, Event::Spawned { .. }) {
            spawned += 1;
        }
    }
    assert!(
        spawned <= 10,
        "{spawned} spawns in 2 s with calls queued: no backoff"
    );
    farm.kill().await;
    for call in calls {
        let settled = tokio::time::timeout(SOON, call)
            .await
            .expect("every call settles");
        assert!(settled.is_err());
    }
}
