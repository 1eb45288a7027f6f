//! `Farm::ready`: wait for every worker's handshake, or learn why they cannot start.

mod support;

use support::*;
use workfarm::{CallError, Farm, WorkerState};

#[tokio::test]
async fn ready_waits_for_every_worker() {
    let farm = Farm::create(options(2)).unwrap();
    tokio::time::timeout(SOON, farm.ready())
        .await
        .expect("ready answers")
        .unwrap();
    let status = farm.status().await;
    assert_eq!(status.workers.len(), 2);
    assert!(status
        .workers
        .iter()
        .all(|w| w.state == WorkerState::Online));
    // Once ready, it answers at once.
    farm.ready().await.unwrap();
    farm.shutdown().await;
}

#[tokio::test]
async fn ready_reports_workers_that_cannot_start() {
    let farm = Farm::create(options(1).env("WORKER_EXIT_AT_START", "6")).unwrap();
    let err = tokio::time::timeout(SOON, farm.ready())
        .await
        .expect("ready answers")
        .unwrap_err();
    match err {
        CallError::WorkerStart { message } => assert!(message.contains("exit code 6"), "{message}"),
        other => panic!("expected WorkerStart, got {other:?}"),
    }
    farm.kill().await;
}

#[tokio::test]
async fn ready_after_shutdown_is_shut_down() {
    let farm = Farm::create(options(1)).unwrap();
    farm.shutdown().await;
    assert_eq!(farm.ready().await, Err(CallError::ShutDown));
}

#[tokio::test]
async fn ready_restarts_idle_reaped_workers() {
    let farm =
        Farm::create(options(2).max_idle_time(std::time::Duration::from_millis(100))).unwrap();
    let mut events = farm.events();
    farm.ready().await.unwrap();
    collect_events(&mut events, 2, SOON, |e| {
        matches!(e, workfarm::Event::Exited { .. })
    })
    .await;
    assert!(farm.status().await.workers.is_empty());
    tokio::time::timeout(SOON, farm.ready())
        .await
        .expect("ready answers after idle reaping")
        .unwrap();
    farm.shutdown().await;
}
