//! `Farm::map` and `Farm::map_unordered` against real workers: order, the bound on calls in
//! flight, lazy input, and failures as items.

mod support;

use futures::StreamExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use support::*;
use workfarm::{CallError, Farm};

#[tokio::test]
async fn map_yields_every_result_in_input_order() {
    let farm = Farm::create(options(3)).unwrap();
    let results: Vec<i64> = farm
        .map::<_, _, i64>("noop", 0..5_000i64)
        .map(|r| r.unwrap())
        .collect()
        .await;
    assert_eq!(results, (0..5_000).collect::<Vec<_>>());
    farm.shutdown().await;
}

#[tokio::test]
async fn map_unordered_yields_every_result_with_its_index() {
    let farm = Farm::create(options(2)).unwrap();
    // Early inputs sleep longest, so completion order differs from input order.
    let inputs: Vec<u64> = (0..20).map(|i| 200 - i * 10).collect();
    let mut seen: Vec<(usize, u32)> = farm
        .map_unordered::<_, _, u32>("sleep", inputs.clone())
        .map(|(i, r)| (i, r.unwrap()))
        .collect()
        .await;
    let completion: Vec<usize> = seen.iter().map(|(i, _)| *i).collect();
    seen.sort();
    assert_eq!(
        seen.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        (0..20).collect::<Vec<_>>()
    );
    assert_ne!(completion, (0..20).collect::<Vec<_>>(), "as they complete");
    farm.shutdown().await;
}

/// The input iterator is pulled only as calls complete: never more than the bound ahead
/// of what has been yielded, so an endless iterator works.
#[tokio::test]
async fn map_pulls_inputs_lazily_within_its_bound() {
    let farm = Farm::create(options(2)).unwrap();
    let pulled = Arc::new(AtomicUsize::new(0));
    let counter = pulled.clone();
    let endless = (0i64..).inspect(move |_| {
        counter.fetch_add(1, Ordering::SeqCst);
    });
    let mut stream = farm.map::<_, _, i64>("noop", endless).in_flight(8);
    for expected in 0..1_000i64 {
        assert_eq!(stream.next().await.unwrap().unwrap(), expected);
        let ahead = pulled.load(Ordering::SeqCst) as i64 - (expected + 1);
        assert!(ahead <= 8, "pulled {ahead} ahead of what was yielded");
        // The farm never holds more than the bound.
    }
    drop(stream);
    farm.shutdown().await;
}

#[tokio::test]
async fn the_bound_limits_calls_in_flight() {
    let farm = Farm::create(options(2).env("WORKER_THREADS", "4")).unwrap();
    all_online(&farm, 2).await;
    let watcher = farm.clone();
    let stream = farm
        .map_unordered::<_, _, u32>("block", vec![100u64; 24])
        .in_flight(3);
    let sampler = tokio::spawn(async move {
        let mut most = 0;
        for _ in 0..100 {
            let s = watcher.status().await;
            most = most.max(s.in_flight() + s.queued);
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        most
    });
    let results: Vec<_> = stream.collect().await;
    assert_eq!(results.len(), 24);
    let most = sampler.await.unwrap();
    assert!(most <= 3, "{most} calls out at once");
    assert!(most >= 2, "the bound is used: {most}");
    farm.shutdown().await;
}

#[tokio::test]
async fn a_failed_call_is_an_item_and_the_map_goes_on() {
    let farm = Farm::create(options(1)).unwrap();
    let inputs = vec!["ok".to_owned(), "boom".to_owned(), "ok".to_owned()];
    let methods: Vec<Result<String, CallError>> = farm
        .map("echo", inputs.iter().map(|s| serde_json::json!(s)))
        .collect()
        .await;
    assert!(methods.iter().all(Result::is_ok));
    let results: Vec<Result<(), CallError>> = farm.map("fail", inputs).collect().await;
    assert_eq!(results.len(), 3);
    for r in results {
        assert!(matches!(r, Err(CallError::Handler { .. })), "{r:?}");
    }
    farm.shutdown().await;
}

#[tokio::test]
async fn dropping_a_map_abandons_its_calls() {
    let farm = Farm::create(options(1).max_concurrent_calls_per_worker(1)).unwrap();
    all_online(&farm, 1).await;
    let log = counter_file("map-drop");
    let path = log.display().to_string();
    let mut stream = farm
        .map::<_, _, u64>("log_run", (0..1000u64).map(move |i| (path.clone(), i)))
        .in_flight(4);
    assert_eq!(stream.next().await.unwrap().unwrap(), 0);
    drop(stream);
    wait_status(&farm, SOON, |s| s.in_flight() == 0 && s.queued == 0).await;
    let runs = std::fs::read_to_string(&log).unwrap().lines().count();
    assert!(runs <= 5, "{runs} ran after the map was dropped");
    farm.shutdown().await;
}

#[tokio::test]
async fn chunks_keep_input_order_and_send_one_call_per_chunk() {
    let farm = Farm::create(options(2)).unwrap();
    let mut events = farm.events();
    let out: Vec<i64> = farm
        .map::<_, _, i64>("noop", 0..1_003i64)
        .chunk_size(10)
        .map(Result::unwrap)
        .collect()
        .await;
    assert_eq!(out, (0..1_003).collect::<Vec<_>>());
    let calls = drain(&mut events)
        .iter()
        .filter(|e| matches!(e, workfarm::Event::CallDone { .. }))
        .count();
    assert_eq!(calls, 101, "1003 inputs in chunks of 10");
    let mut unordered: Vec<(usize, i64)> = farm
        .map_unordered::<_, _, i64>("noop", 0..95i64)
        .chunk_size(8)
        .map(|(i, r)| (i, r.unwrap()))
        .collect()
        .await;
    unordered.sort();
    assert!(unordered.iter().all(|(i, v)| *i as i64 == *v));
    assert_eq!(unordered.len(), 95);
    farm.shutdown().await;
}

/// In a chunk each input succeeds or fails on its own: a bad argument or a panic fails
/// its input only.
#[tokio::test]
async fn a_failing_input_fails_only_itself_within_its_chunk() {
    let farm = Farm::create(options(1)).unwrap();
    let inputs = vec![
        serde_json::json!(1),
        serde_json::json!("not a number"),
        serde_json::json!(3),
    ];
    let results: Vec<Result<i64, CallError>> =
        farm.map("noop", inputs).chunk_size(3).collect().await;
    assert_eq!(results[0], Ok(1));
    assert!(
        matches!(results[1], Err(CallError::BadArguments { .. })),
        "{results:?}"
    );
    assert_eq!(results[2], Ok(3));
    let panics: Vec<Result<(), CallError>> = farm
        .map("panic", vec!["a", "b"])
        .chunk_size(2)
        .collect()
        .await;
    assert!(
        panics
            .iter()
            .all(|r| matches!(r, Err(CallError::Panic { .. }))),
        "{panics:?}"
    );
    // The worker survived its handlers' panics.
    assert_eq!(farm.run_method::<_, i64>("noop", 4).await, Ok(4));
    farm.shutdown().await;
}

#[tokio::test]
async fn chunks_run_async_handlers_too() {
    let farm = Farm::create(options(1)).unwrap();
    let pids: Vec<u32> = farm
        .map::<_, _, u32>("sleep", vec![10u64; 12])
        .chunk_size(4)
        .map(Result::unwrap)
        .collect()
        .await;
    assert_eq!(pids.len(), 12);
    assert!(pids.iter().all(|&p| p == pids[0]));
    farm.shutdown().await;
}

#[tokio::test]
async fn a_chunk_whose_worker_dies_fails_every_input_of_it() {
    let farm = Farm::create(options(1).max_retries(0)).unwrap();
    let results: Vec<Result<(), CallError>> = farm
        .map("exit", vec![3, 3, 3])
        .chunk_size(3)
        .collect()
        .await;
    assert_eq!(results.len(), 3);
    assert!(
        results
            .iter()
            .all(|r| matches!(r, Err(CallError::WorkerDied { .. }))),
        "{results:?}"
    );
    farm.shutdown().await;
}
