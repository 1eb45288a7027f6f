//! `max_memory`: a worker whose resident memory grows past the limit is recycled after its
//! current calls, and a new worker takes its place.

mod support;

use support::*;
use workfarm::{CallError, Event, Farm};

#[tokio::test]
async fn worker_over_its_memory_limit_is_recycled() {
    let farm = Farm::create(options(1).max_memory(64 * 1024 * 1024)).unwrap();
    let mut events = farm.events();
    let first: u32 = farm.run_method("pid", ()).await.unwrap();
    // Leak 128 MiB of touched memory in the worker.
    let hog: u32 = farm.run_method("hog", 128usize).await.unwrap();
    assert_eq!(hog, first);
    let reached = wait_for_event(&mut events, SOON, |e| {
        matches!(e, Event::MemoryLimitReached { .. })
    })
    .await;
    let Event::MemoryLimitReached { rss, .. } = reached else {
        unreachable!()
    };
    assert!(rss > 64 * 1024 * 1024, "reported rss {rss}");
    // The hog exits cleanly (its stdin is closed) and a new worker serves the next call.
    wait_for_event(
        &mut events,
        SOON,
        |e| matches!(e, Event::Exited { pid, exit, .. } if *pid == first && exit.code == Some(0)),
    )
    .await;
    let next: u32 = farm.run_method("pid", ()).await.unwrap();
    assert_ne!(next, first);
    farm.shutdown().await;
}

#[tokio::test]
async fn calls_in_flight_on_a_recycled_worker_finish() {
    let farm = Farm::create(options(1).max_memory(64 * 1024 * 1024)).unwrap();
    let mut events = farm.events();
    let first: u32 = farm.run_method("pid", ()).await.unwrap();
    // Both go to the only worker at once: the hog returns at once, the long call is still
    // running when the next check (every 500 ms) finds the worker over its limit. It must
    // finish there, not be killed.
    let hog = farm.run_method::<_, u32>("hog", 128usize);
    let long = farm.run_method::<_, u32>("sleep", 2000u64);
    assert_eq!(hog.await.unwrap(), first);
    wait_for_event(&mut events, SOON, |e| {
        matches!(e, Event::MemoryLimitReached { .. })
    })
    .await;
    let pid = tokio::time::timeout(SOON, long)
        .await
        .expect("settles")
        .map_err(|e: CallError| e.to_string())
        .unwrap();
    assert_eq!(pid, first, "the call ran to the end on the recycled worker");
    farm.shutdown().await;
}
