//! Quarantine against real workers: a slot whose workers keep crashing is sidelined with a
//! growing back-off and an event, its calls go to the healthy slots, and when every slot is
//! sidelined calls fail with a typed error naming them, never a hang.

mod support;

use std::time::Duration;
use support::*;
use tokio::time::Instant;
use workfarm::{CallError, Event, Farm};

#[tokio::test]
async fn a_slot_that_keeps_crashing_is_sidelined_and_the_others_serve() {
    let farm = Farm::create(
        options(3)
            .env("WORKER_EXIT_AT_START_IN_SLOT", "1")
            .quarantine(3, Duration::from_secs(30)),
    )
    .unwrap();
    let mut events = farm.events();
    let first = wait_for_event(&mut events, SOON, |e| {
        matches!(e, Event::Quarantined { slot: 1, .. })
    })
    .await;
    let Event::Quarantined {
        crashes,
        backoff,
        last_exit,
        ..
    } = first
    else {
        unreachable!()
    };
    assert_eq!(crashes, 3);
    assert_eq!(backoff, Duration::from_secs(1));
    assert_eq!(last_exit.and_then(|e| e.code), Some(5));
    // Its calls go to the healthy slots.
    for _ in 0..30 {
        let (_, slot): (u32, Option<usize>) = farm.run_method("slot", ()).await.unwrap();
        assert!(matches!(slot, Some(0 | 2)), "{slot:?}");
    }
    // No worker is started in it while sidelined: the next spawn in slot 1 follows the
    // Released event, and the next sidelining backs off twice as long.
    let mut spawned_while_sidelined = 0;
    let deadline = Instant::now() + SOON;
    let second = loop {
        let event = tokio::time::timeout_at(deadline, events.recv())
            .await
            .expect("quarantined again")
            .unwrap();
        match event {
            Event::Spawned { worker, .. } if worker.slot() == 1 => spawned_while_sidelined += 1,
            Event::Released { slot: 1 } => break None,
            Event::Quarantined {
                slot: 1, backoff, ..
            } => break Some(backoff),
            _ => {}
        }
    };
    assert_eq!(second, None, "released before any new sidelining");
    assert_eq!(spawned_while_sidelined, 0);
    let again = wait_for_event(&mut events, SOON, |e| {
        matches!(e, Event::Quarantined { slot: 1, .. })
    })
    .await;
    assert!(
        matches!(again, Event::Quarantined { backoff, .. } if backoff == Duration::from_secs(2)),
        "{again:?}"
    );
    let status = farm.status().await;
    assert!(status
        .workers
        .iter()
        .all(|w| w.slot != 1 || w.state == workfarm::WorkerState::Stopping));
    farm.kill().await;
}

#[tokio::test]
async fn when_every_slot_is_sidelined_calls_fail_naming_the_slots() {
    let farm = Farm::create(
        options(2)
            .max_retries(0)
            .quarantine(2, Duration::from_secs(30)),
    )
    .unwrap();
    all_online(&farm, 2).await;
    let mut events = farm.events();
    let mut sidelined = std::collections::BTreeSet::new();
    // Each call crashes its worker (exit 7); retries(0), so each crash costs one call.
    for _ in 0..40 {
        let err = farm.run_method::<_, ()>("exit", 7).await.unwrap_err();
        if let CallError::Quarantined { .. } = err {
            break;
        }
        for event in drain(&mut events) {
            if let Event::Quarantined { slot, .. } = event {
                sidelined.insert(slot);
            }
        }
        if sidelined.len() == 2 {
            break;
        }
    }
    assert_eq!(sidelined.len(), 2, "both slots sidelined");
    let started = Instant::now();
    let err = farm.run_method::<_, i64>("noop", 1).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "failed at once, no hang"
    );
    let CallError::Quarantined { slots } = &err else {
        panic!("expected Quarantined, got {err:?}");
    };
    assert_eq!(slots.iter().map(|s| s.slot).collect::<Vec<_>>(), [0, 1]);
    assert!(slots
        .iter()
        .all(|s| s.last_exit.and_then(|e| e.code) == Some(7)));
    assert!(err.to_string().contains("slot 0"), "{err}");
    assert!(matches!(
        farm.ready().await,
        Err(CallError::Quarantined { .. })
    ));
    // After the back-off the slots are tried again and serve.
    wait_for_event(&mut events, SOON, |e| matches!(e, Event::Released { .. })).await;
    let deadline = Instant::now() + SOON;
    loop {
        match farm.run_method::<_, i64>("noop", 1).await {
            Ok(1) => break,
            Ok(other) => panic!("{other}"),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("never served again: {e}"),
        }
    }
    farm.kill().await;
}
