//! Per-worker set-up (`Worker::setup`, `FarmOptions::setup_args`) and per-slot configuration
//! (`FarmOptions::per_worker`) against real workers.

mod support;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;
use support::*;
use tokio::time::Instant;
use workfarm::serializer::{Cbor, Postcard};
use workfarm::{CallError, CreateError, Event, Farm, PerWorker};

#[derive(Serialize, Default, Clone)]
struct SetupArgs {
    token: Option<String>,
    fail: Option<String>,
    panic: bool,
    delay_ms: u64,
}

#[derive(Deserialize, Debug, PartialEq)]
struct State {
    token: Option<String>,
    slot: Option<usize>,
    pid: u32,
    env_token: Option<String>,
}

fn token(slot: usize) -> SetupArgs {
    SetupArgs {
        token: Some(format!("token-{slot}")),
        ..SetupArgs::default()
    }
}

#[tokio::test]
async fn four_slots_have_their_own_tokens_and_a_replacement_inherits_its_slot_s() {
    let farm = Farm::create(options(4).per_worker(|slot| {
        PerWorker::new()
            .env("TOKEN", format!("env-{slot}"))
            .setup_args(token(slot))
    }))
    .unwrap();
    farm.ready().await.unwrap();
    let states = farm.broadcast_method::<_, State>("state", ()).await;
    assert!(states.failures.is_empty(), "{:?}", states.failures);
    let by_slot: BTreeMap<usize, State> = states
        .successes
        .into_iter()
        .map(|(worker, state)| (worker.slot(), state))
        .collect();
    assert_eq!(by_slot.len(), 4);
    for (slot, state) in &by_slot {
        assert_eq!(state.slot, Some(*slot));
        assert_eq!(
            state.token.as_deref(),
            Some(format!("token-{slot}").as_str())
        );
        assert_eq!(
            state.env_token.as_deref(),
            Some(format!("env-{slot}").as_str())
        );
    }
    // Kill slot 2's worker: its replacement has slot 2's token again.
    let old = by_slot[&2].pid;
    let mut events = farm.events();
    unsafe_kill(old);
    wait_for_event(
        &mut events,
        SOON,
        |e| matches!(e, Event::Online { worker, pid } if worker.slot() == 2 && *pid != old),
    )
    .await;
    let states = farm.broadcast_method::<_, State>("state_async", ()).await;
    let replaced = states
        .successes
        .iter()
        .find(|(w, _)| w.slot() == 2)
        .map(|(_, s)| s)
        .unwrap();
    assert_ne!(replaced.pid, old);
    assert_eq!(replaced.token.as_deref(), Some("token-2"));
    assert_eq!(replaced.env_token.as_deref(), Some("env-2"));
    farm.shutdown().await;
}

fn unsafe_kill(pid: u32) {
    let status = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn a_set_up_that_fails_on_one_slot_is_reported_and_the_others_serve() {
    let farm = Farm::create(options(4).per_worker(|slot| {
        let mut args = token(slot);
        if slot == 2 {
            args.fail = Some("no licence for slot 2".into());
        }
        PerWorker::new().setup_args(args)
    }))
    .unwrap();
    let err = farm.ready().await.unwrap_err();
    let CallError::WorkerStart { message } = &err else {
        panic!("expected WorkerStart, got {err:?}");
    };
    assert!(message.contains("(slot 2)"), "{message}");
    assert!(
        message.contains("set-up failed: no licence for slot 2"),
        "{message}"
    );
    assert!(message.contains("pid"), "{message}");
    // The other slots serve; nothing runs in slot 2.
    for _ in 0..50 {
        let state: State = farm.run_method("state", ()).await.unwrap();
        assert!(matches!(state.slot, Some(0 | 1 | 3)), "{state:?}");
        assert_eq!(state.token, Some(format!("token-{}", state.slot.unwrap())));
    }
    // Slot 2 is retried with a growing back-off, not in a hot loop. (The first
    // subscription sees the events since `create`; the second starts now.)
    drop(farm.events());
    let mut events = farm.events();
    let watch = Instant::now();
    let mut spawns = 0;
    while watch.elapsed() < Duration::from_secs(2) {
        match tokio::time::timeout(Duration::from_millis(100), events.recv()).await {
            Ok(Ok(Event::Spawned { worker, .. })) if worker.slot() == 2 => spawns += 1,
            Ok(Ok(Event::Spawned { worker, .. })) => panic!("{worker} respawned"),
            _ => {}
        }
    }
    assert!(spawns <= 10, "{spawns} spawns of slot 2 in 2 s");
    farm.kill().await;
}

#[tokio::test]
async fn a_set_up_that_panics_is_a_typed_start_failure_with_the_message() {
    let args = SetupArgs {
        panic: true,
        ..SetupArgs::default()
    };
    let farm = Farm::create(options(1).setup_args(args)).unwrap();
    let err = farm.ready().await.unwrap_err();
    assert!(
        matches!(&err, CallError::WorkerStart { message }
            if message.contains("set-up panicked: set-up panicked on purpose")),
        "{err:?}"
    );
    let call = farm.run_method::<_, i64>("noop", 1).await.unwrap_err();
    assert!(matches!(call, CallError::WorkerStart { .. }), "{call:?}");
    farm.kill().await;
}

#[tokio::test]
async fn the_startup_timeout_covers_the_set_up_and_ready_waits_for_it() {
    let slow = SetupArgs {
        delay_ms: 1500,
        ..SetupArgs::default()
    };
    let farm = Farm::create(
        options(1)
            .setup_args(slow.clone())
            .startup_timeout(Duration::from_millis(500)),
    )
    .unwrap();
    let err = farm.ready().await.unwrap_err();
    assert!(
        matches!(&err, CallError::WorkerStart { message }
            if message.contains("set-up included") && message.contains("startup_timeout")),
        "{err:?}"
    );
    farm.kill().await;

    let farm = Farm::create(
        options(2)
            .setup_args(slow)
            .startup_timeout(Duration::from_secs(20)),
    )
    .unwrap();
    let started = Instant::now();
    farm.ready().await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "ready waited for the set-up"
    );
    let state: State = farm.run_method("state", ()).await.unwrap();
    assert!(state.slot.is_some());
    farm.shutdown().await;
}

#[tokio::test]
async fn set_up_arguments_travel_in_each_serializer() {
    // Postcard is not self-describing: the worker's `Option<SetupArgs>` needs a `Some`.
    let farm = Farm::create(options(1).serializer(Postcard).setup_args(Some(token(0)))).unwrap();
    let state: State = farm.run_method("state", ()).await.unwrap();
    assert_eq!(state.token.as_deref(), Some("token-0"));
    farm.shutdown().await;
    let farm = Farm::create(options(1).setup_args(token(0)).serializer(Cbor)).unwrap();
    let state: State = farm.run_method("state", ()).await.unwrap();
    assert_eq!(
        state.token.as_deref(),
        Some("token-0"),
        "encoded at create, with CBOR"
    );
    farm.shutdown().await;
    // No arguments at all: the worker's Option<SetupArgs> decodes as None, in Postcard too.
    let farm = Farm::create(options(1).serializer(Postcard)).unwrap();
    let state: State = farm.run_method("state", ()).await.unwrap();
    assert_eq!(state.token, None);
    farm.shutdown().await;
}

#[tokio::test]
async fn set_up_arguments_that_do_not_decode_are_a_clear_start_failure() {
    let farm = Farm::create(options(1).setup_args("not a struct")).unwrap();
    let err = farm.ready().await.unwrap_err();
    assert!(
        matches!(&err, CallError::WorkerStart { message }
            if message.contains("set-up arguments do not decode as")),
        "{err:?}"
    );
    farm.kill().await;
}

#[tokio::test]
async fn set_up_arguments_that_cannot_be_encoded_fail_create() {
    // Postcard cannot encode a map of unknown length from an iterator... but it can encode
    // most things; a frame cap smaller than the arguments fails just as well.
    let big = "x".repeat(1000);
    let err = Farm::create(options(1).max_frame(256).setup_args(big)).unwrap_err();
    assert!(
        matches!(err, CreateError::SetupArgs { slot: 0, .. }),
        "{err:?}"
    );
}
