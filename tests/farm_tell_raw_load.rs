//! Fire-and-forget calls, raw bytes through the farm, and the load signal, against real
//! workers.

mod support;

use bytes::Bytes;
use std::time::Duration;
use support::*;
use workfarm::serializer::{Postcard, Serializer};
use workfarm::{CallError, Event, Farm};

#[tokio::test]
async fn tell_runs_the_call_and_reports_only_its_failure() {
    let farm = Farm::create(options(1)).unwrap();
    let mut events = farm.events();
    let log = counter_file("tell");
    let id = farm
        .tell("log_run", (log.display().to_string(), 7u64))
        .unwrap();
    let done = wait_for_event(
        &mut events,
        SOON,
        |e| matches!(e, Event::CallDone { call, .. } if *call == id),
    )
    .await;
    assert!(matches!(done, Event::CallDone { ok: true, .. }));
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "7\n");

    let failing = farm.tell("fail", "no luck").unwrap();
    let failed = wait_for_event(&mut events, SOON, |e| matches!(e, Event::TellFailed { .. })).await;
    match failed {
        Event::TellFailed {
            call,
            method,
            error,
        } => {
            assert_eq!(call, failing);
            assert_eq!(method, "fail");
            assert!(matches!(error, CallError::Handler { .. }), "{error:?}");
        }
        other => panic!("{other:?}"),
    }
    farm.shutdown().await;
}

#[tokio::test]
async fn tell_never_waits_for_a_place() {
    let farm = Farm::create(options(1).max_concurrent_calls(1)).unwrap();
    all_online(&farm, 1).await;
    let busy = farm.run_method::<_, u32>("block", 300u64);
    assert_eq!(farm.tell("noop", 1), Err(CallError::QueueFull { limit: 1 }));
    busy.await.unwrap();
    farm.shutdown().await;
}

/// A tell keeps its farm alive until it has run, like any outstanding call.
#[tokio::test]
async fn a_tell_outlives_the_last_handle() {
    let farm = Farm::create(options(1)).unwrap();
    let log = counter_file("tell-alive");
    all_online(&farm, 1).await;
    farm.tell("block", 300u64).unwrap();
    farm.tell("log_run", (log.display().to_string(), 1u64))
        .unwrap();
    drop(farm);
    let deadline = tokio::time::Instant::now() + SOON;
    while std::fs::read_to_string(&log).unwrap_or_default() != "1\n" {
        assert!(tokio::time::Instant::now() < deadline, "the tell never ran");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn raw_bytes_pass_through_untouched() {
    let farm = Farm::create(options(2)).unwrap();
    let out = farm
        .run_raw("add", Bytes::from_static(b"[20,22]"))
        .await
        .unwrap();
    assert_eq!(&out[..], b"42");
    // Malformed arguments are the worker's to refuse.
    let err = farm
        .run_raw("add", Bytes::from_static(b"not json"))
        .await
        .unwrap_err();
    assert!(matches!(err, CallError::BadArguments { .. }), "{err:?}");
    all_online(&farm, 2).await;
    let all = farm.broadcast_raw("noop", Bytes::from_static(b"5")).await;
    assert_eq!(all.successes.len(), 2);
    assert!(all.successes.iter().all(|(_, b)| &b[..] == b"5"));
    farm.shutdown().await;
}

#[tokio::test]
async fn raw_bytes_are_in_the_farm_s_serializer() {
    let farm = Farm::create(options(1).serializer(Postcard)).unwrap();
    let mut args = Vec::new();
    Postcard.encode(&(2i64, 3i64), &mut args).unwrap();
    let out = farm.run_raw("add", Bytes::from(args)).await.unwrap();
    let sum: i64 = Postcard.decode(&out).unwrap();
    assert_eq!(sum, 5);
    farm.shutdown().await;
}

#[tokio::test]
async fn load_follows_calls_in_and_out() {
    let farm = Farm::create(options(1).max_concurrent_calls_per_worker(2)).unwrap();
    let mut load = farm.load();
    all_online(&farm, 1).await;
    let idle = *load
        .wait_for(|l| l.free == 2 && l.in_flight == 0)
        .await
        .unwrap();
    assert_eq!(idle.queued, 0);
    let calls: Vec<_> = (0..5)
        .map(|_| farm.run_method::<_, u32>("block", 300u64))
        .collect();
    let busy = *tokio::time::timeout(SOON, load.wait_for(|l| l.in_flight == 2 && l.queued == 3))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(busy.free, 0);
    for call in calls {
        call.await.unwrap();
    }
    tokio::time::timeout(
        SOON,
        load.wait_for(|l| l.in_flight == 0 && l.queued == 0 && l.free == 2),
    )
    .await
    .unwrap()
    .unwrap();
    farm.shutdown().await;
}
