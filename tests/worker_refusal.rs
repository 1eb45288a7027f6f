//! Refusal and back-off from the worker (`Refuse`), against real workers: a refused call runs
//! elsewhere uncharged, a slot backing off takes no calls, a "not here" filter routes calls,
//! and a call no slot will take fails with a typed error instead of looping.

mod support;

use serde::Deserialize;
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;
use support::*;
use tokio::time::Instant;
use workfarm::{CallError, Event, Farm, PerWorker};

#[derive(Deserialize, Debug)]
struct Served {
    slot: Option<usize>,
    pid: u32,
    token: Option<String>,
    at_ns: u128,
}

fn quota(limited: &[usize], every: u32, backoff_ms: u64) -> serde_json::Value {
    serde_json::json!({ "limited": limited, "every": every, "backoff_ms": backoff_ms })
}

/// As [`quota`], each served call taking `work_ms`.
fn quota_working(
    limited: &[usize],
    every: u32,
    backoff_ms: u64,
    work_ms: u64,
) -> serde_json::Value {
    serde_json::json!({
        "limited": limited, "every": every, "backoff_ms": backoff_ms, "work_ms": work_ms
    })
}

#[tokio::test]
async fn two_slots_that_refuse_for_500_ms_after_every_3_calls_lose_no_call_and_charge_none() {
    // max_retries(0): a refusal charged as a retry would fail its call. Each slot has its
    // own access token, as each worker of disperse.js calls its API with its own.
    let farm = Farm::create(
        options(4)
            .max_retries(0)
            .per_worker(|slot| PerWorker::new().env("TOKEN", format!("token-{slot}"))),
    )
    .unwrap();
    all_online(&farm, 4).await;
    let mut events = farm.events();
    let backoff = Duration::from_millis(500);
    // 10 ms a call: the 200 take over a second, so the limited slots refuse again and again.
    let args = quota_working(&[1, 3], 3, 500, 10);
    let handles: Vec<_> = (0..200)
        .map(|_| farm.call::<_, Served>("quota", args.clone()).start())
        .collect();
    let mut served = Vec::new();
    for handle in handles {
        let (value, info) = handle.with_info().await.expect("every call succeeds");
        assert_eq!(info.attempts, 1, "a refused call is not charged");
        assert_eq!(Some(info.worker.slot()), value.slot);
        let token = format!("token-{}", info.worker.slot());
        assert_eq!(
            value.token.as_deref(),
            Some(token.as_str()),
            "its slot's token"
        );
        served.push(value);
    }
    assert_eq!(served.len(), 200);
    // The refusal times, from each worker (no worker was replaced: the pids are the ones
    // that served).
    let logs = farm
        .broadcast_method::<_, (Option<usize>, u32, Vec<u128>)>("quota_log", ())
        .await;
    assert!(logs.failures.is_empty(), "{:?}", logs.failures);
    let mut refusals: BTreeMap<usize, Vec<u128>> = BTreeMap::new();
    for (_, (slot, _pid, times)) in &logs.successes {
        refusals.insert(slot.unwrap(), times.clone());
    }
    for slot in [1, 3] {
        assert!(
            refusals[&slot].len() >= 2,
            "slot {slot} refused {:?}: the test proves little",
            refusals[&slot]
        );
    }
    for slot in [0, 2] {
        assert!(refusals[&slot].is_empty());
    }
    for call in &served {
        let slot = call.slot.unwrap();
        for &refused_at in &refusals[&slot] {
            let during = refused_at <= call.at_ns && call.at_ns < refused_at + backoff.as_nanos();
            assert!(
                !during,
                "a call ran on slot {slot} {} ms into its back-off",
                (call.at_ns - refused_at) / 1_000_000
            );
        }
    }
    // The limited slots served at most 3 calls per back-off, so the others carried the rest.
    let per_slot = |s| served.iter().filter(|c| c.slot == Some(s)).count();
    for slot in [1, 3] {
        assert!(per_slot(slot) <= 3 * (refusals[&slot].len() + 1));
    }
    assert_eq!((0..4).map(per_slot).sum::<usize>(), 200);
    let backing_off = drain(&mut events)
        .into_iter()
        .filter(|e| matches!(e, Event::BackingOff { .. }))
        .count();
    assert!(backing_off >= 2, "each back-off is announced");
    let pids: HashSet<u32> = served.iter().map(|c| c.pid).collect();
    assert_eq!(pids.len(), 4, "no worker was stopped for refusing");
    // No busy loop: a refusal reached the farm for each logged one, and for each call that
    // was already waiting in a worker when it began to back off (refused unrun there, once);
    // fewer in all than there were calls. Bouncing between two refusing slots for 500 ms
    // would make thousands.
    let stats = farm.stats().await;
    let logged: usize = refusals.values().map(Vec::len).sum();
    let c = stats.total.calls;
    // 200 calls and the broadcast's 4.
    assert_eq!((c.succeeded, c.failed, c.retried), (204, 0, 0), "{c:?}");
    assert!(c.refusals >= logged as u64, "{c:?} vs {logged} logged");
    assert!(c.refusals < 200, "refusals bounced: {c:?}");
    farm.shutdown().await;
}

#[tokio::test]
async fn a_slot_backing_off_is_sent_nothing_until_the_back_off_ends() {
    // One worker, which refuses its 2nd call for 800 ms: the next calls wait in the farm
    // (they are not bounced between refusals), then run after the back-off.
    let farm = Farm::create(options(1).max_retries(0)).unwrap();
    all_online(&farm, 1).await;
    let args = quota(&[0], 1, 800);
    let first: Served = farm.call("quota", args.clone()).await.unwrap();
    let started = Instant::now();
    let handles: Vec<_> = (0..3)
        .map(|_| farm.call::<_, Served>("quota", args.clone()).start())
        .collect();
    let mut later = Vec::new();
    for handle in handles {
        later.push(handle.with_info().await.unwrap());
    }
    assert!(
        started.elapsed() >= Duration::from_millis(700),
        "the calls waited for the back-off: {:?}",
        started.elapsed()
    );
    let log = farm
        .broadcast_method::<_, (Option<usize>, u32, Vec<u128>)>("quota_log", ())
        .await;
    let (_, (_, _, refused)) = &log.successes[0];
    // One served call per window: each later call is refused once, then runs after that
    // back-off. Refusals are a back-off apart, so the farm sent nothing during one (a busy
    // loop would show as refusals close together, or a call run inside a window).
    assert_eq!(refused.len(), 3, "{refused:?}");
    for pair in refused.windows(2) {
        assert!(pair[1] - pair[0] >= 790_000_000, "{refused:?}");
    }
    for (call, info) in &later {
        assert_eq!(info.attempts, 1);
        for &r in refused {
            assert!(!(r <= call.at_ns && call.at_ns < r + 800_000_000));
        }
    }
    assert!(started.elapsed() >= Duration::from_millis(2300));
    assert!(first.at_ns < refused[0]);
    farm.shutdown().await;
}

#[tokio::test]
async fn a_worker_side_filter_routes_each_call_to_a_slot_that_serves_it() {
    let farm = Farm::create(options(3).max_retries(0)).unwrap();
    all_online(&farm, 3).await;
    for _ in 0..30 {
        let slot: Option<usize> = farm.run_method("only_on", vec![2usize]).await.unwrap();
        assert_eq!(slot, Some(2));
    }
    // Served by slots 0 or 1 only, never 2.
    for _ in 0..30 {
        let slot: Option<usize> = farm.run_method("only_on", vec![0usize, 1]).await.unwrap();
        assert!(matches!(slot, Some(0 | 1)), "{slot:?}");
    }
    farm.shutdown().await;
}

#[tokio::test]
async fn a_call_every_slot_refuses_here_fails_at_once_with_each_refusal() {
    let farm = Farm::create(options(2).max_retries(0)).unwrap();
    all_online(&farm, 2).await;
    let started = Instant::now();
    let err = farm
        .run_method::<_, Option<usize>>("only_on", vec![7usize])
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    let CallError::Refused { refusals } = &err else {
        panic!("expected Refused, got {err:?}");
    };
    let slots: HashSet<usize> = refusals.iter().map(|r| r.worker.unwrap().slot()).collect();
    assert_eq!(slots, HashSet::from([0, 1]), "{refusals:?}");
    assert!(refusals
        .iter()
        .all(|r| r.backoff.is_none() && r.reason == "not my slot"));
    assert!(err.to_string().contains("refused"), "{err}");
    // The farm serves on.
    let fine: Option<usize> = farm.run_method("only_on", vec![0usize, 1]).await.unwrap();
    assert!(fine.is_some());
    farm.shutdown().await;
}

#[tokio::test]
async fn a_call_refused_past_the_bound_fails_instead_of_waiting() {
    // Every slot backs off for 10 s, past a max_refusal_wait of 1 s: the call fails at its
    // refusal rather than wait (and a call refused within the bound waits and succeeds).
    let farm = Farm::create(
        options(2)
            .max_retries(0)
            .max_refusal_wait(Duration::from_secs(1)),
    )
    .unwrap();
    all_online(&farm, 2).await;
    let long = quota(&[0, 1], 0, 10_000);
    let started = Instant::now();
    let err = farm
        .run_method::<_, Served>("quota", long)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CallError::Refused { refusals } if refusals.len() == 2),
        "{err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "it did not wait out the back-off"
    );
    farm.shutdown().await;

    let farm = Farm::create(options(2).max_retries(0)).unwrap();
    all_online(&farm, 2).await;
    // Both slots refuse the first call they see, for 300 ms: the call waits for the
    // first back-off to end, then runs.
    let started = Instant::now();
    let slot: Option<usize> = farm.run_method("refuse_first", 300u64).await.unwrap();
    assert!(slot.is_some());
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );
    farm.shutdown().await;
}
