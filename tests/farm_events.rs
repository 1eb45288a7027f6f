//! Events: each kind is emitted when it should be, and names its worker.

mod support;

use std::time::{Duration, Instant};
use support::*;
use tokio::sync::broadcast::Receiver;
use workfarm::{CallError, Event, Farm, FarmOptions, WorkerId};

fn spawned(e: &Event) -> Option<(WorkerId, u32)> {
    match e {
        Event::Spawned { worker, pid } => Some((*worker, *pid)),
        _ => None,
    }
}

/// The next event matching `pred`, mapped by it.
async fn next<T>(events: &mut Receiver<Event>, mut pick: impl FnMut(&Event) -> Option<T>) -> T {
    let e = wait_for_event(events, SOON, |e| pick(e).is_some()).await;
    pick(&e).unwrap()
}

#[tokio::test]
async fn spawned_then_online_with_the_worker_pid() {
    let farm = Farm::create(options(2)).unwrap();
    let mut events = farm.events();
    let mut spawned_workers = Vec::new();
    let mut online = Vec::new();
    while online.len() < 2 {
        match wait_for_event(&mut events, SOON, |_| true).await {
            Event::Spawned { worker, pid } => {
                assert!(
                    !online.iter().any(|(w, _)| *w == worker),
                    "Spawned after Online"
                );
                spawned_workers.push((worker, pid));
            }
            Event::Online { worker, pid } => {
                let (_, spawned_pid) = spawned_workers
                    .iter()
                    .find(|(w, _)| *w == worker)
                    .expect("Online for a worker that was never Spawned");
                assert_eq!(*spawned_pid, pid);
                online.push((worker, pid));
            }
            other => panic!("unexpected event during start: {other:?}"),
        }
    }
    assert_eq!(spawned_workers.len(), 2);
    assert_ne!(spawned_workers[0].0, spawned_workers[1].0);

    // The pid in Online is the pid the worker reports itself.
    let pids = farm.broadcast_method::<_, u32>("pid", ()).await;
    for (worker, pid) in pids.successes {
        let (_, online_pid) = online.iter().find(|(w, _)| *w == worker).unwrap();
        assert_eq!(*online_pid, pid);
    }
    farm.shutdown().await;
}

#[tokio::test]
async fn call_done_reports_success_and_failure() {
    let farm = Farm::create(options(1)).unwrap();
    let mut events = farm.events();
    let (worker, _) = next(&mut events, spawned).await;

    let _: i64 = farm.run_method("add", (1, 2)).await.unwrap();
    let (w, call_ok, ok) = next(&mut events, |e| match e {
        Event::CallDone { worker, call, ok } => Some((*worker, *call, *ok)),
        _ => None,
    })
    .await;
    assert_eq!((w, ok), (worker, true));

    let _ = farm.run_method::<_, ()>("fail", "x").await.unwrap_err();
    let (w, call_err, ok) = next(&mut events, |e| match e {
        Event::CallDone { worker, call, ok } => Some((*worker, *call, *ok)),
        _ => None,
    })
    .await;
    assert_eq!((w, ok), (worker, false));
    assert_ne!(call_ok, call_err, "each call has its own id");

    // A panic and an unknown method are answers too: the worker replied, the handler failed.
    let _ = farm
        .run_method::<_, ()>("panic_async", "x")
        .await
        .unwrap_err();
    let ok = next(&mut events, |e| match e {
        Event::CallDone { ok, .. } => Some(*ok),
        _ => None,
    })
    .await;
    assert!(!ok);
    farm.shutdown().await;
}

#[tokio::test]
async fn exited_with_the_exit_code_when_a_worker_exits() {
    let farm = Farm::create(options(1).max_retries(0)).unwrap();
    let mut events = farm.events();
    let (worker, spawned_pid) = next(&mut events, spawned).await;
    let pid: u32 = farm.run_method("pid", ()).await.unwrap();
    assert_eq!(pid, spawned_pid);

    let err = farm.run_method::<_, ()>("exit", 7).await.unwrap_err();
    assert!(matches!(err, CallError::WorkerDied { .. }), "{err:?}");
    let (w, p, exit) = next(&mut events, |e| match e {
        Event::Exited { worker, pid, exit } => Some((*worker, *pid, *exit)),
        _ => None,
    })
    .await;
    assert_eq!((w, p), (worker, pid));
    assert_eq!(exit.code, Some(7));
    assert!(!exit.is_signal());
    wait_gone(pid, SOON).await;

    // A replacement with a new id and pid.
    let (replacement, new_pid) = next(&mut events, spawned).await;
    assert_ne!(replacement, worker);
    assert_ne!(new_pid, pid);
    farm.shutdown().await;
}

#[tokio::test]
async fn exited_with_a_signal_when_killed() {
    let farm = Farm::create(options(2)).unwrap();
    let mut events = farm.events();
    let pids = farm.broadcast_method::<_, u32>("pid", ()).await;
    assert_eq!(pids.successes.len(), 2);
    let (victim, victim_pid) = pids.successes[0];
    let (busy, busy_pid) = pids.successes[1];

    // Killed from outside with SIGKILL.
    let status = std::process::Command::new("kill")
        .args(["-KILL", &victim_pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let (p, exit) = next(&mut events, |e| match e {
        Event::Exited { worker, pid, exit } if *worker == victim => Some((*pid, *exit)),
        _ => None,
    })
    .await;
    assert_eq!(p, victim_pid);
    assert_eq!(exit.signal, Some(9));
    assert_eq!(exit.code, None);
    assert!(exit.is_signal());

    // Killed by the farm while a handler blocks it (so it cannot see its stdin close first):
    // SIGTERM.
    let call = farm.run_method::<_, u32>("block", 5000u64);
    let deadline = tokio::time::Instant::now() + SOON;
    while farm.status().await.in_flight() == 0 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let started = Instant::now();
    farm.kill().await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(call.await, Err(CallError::ShutDown));
    let exits: Vec<_> = drain(&mut events)
        .into_iter()
        .filter_map(|e| match e {
            Event::Exited { worker, pid, exit } => Some((worker, pid, exit)),
            _ => None,
        })
        .collect();
    let (_, _, exit) = exits
        .iter()
        .find(|(w, p, _)| *w == busy && *p == busy_pid)
        .unwrap_or_else(|| panic!("no exit for the busy worker: {exits:?}"));
    assert_eq!(
        exit.signal,
        Some(15),
        "SIGTERM ends the blocked worker: {exit:?}"
    );
}

#[tokio::test]
async fn ttl_reached_then_the_worker_is_replaced() {
    let farm = Farm::create(options(1).ttl(2)).unwrap();
    let mut events = farm.events();
    let (first, first_pid) = next(&mut events, spawned).await;
    let a: u32 = farm.run_method("pid", ()).await.unwrap();
    let b: u32 = farm.run_method("pid", ()).await.unwrap();
    assert_eq!((a, b), (first_pid, first_pid));
    let w = next(&mut events, |e| match e {
        Event::TtlReached { worker } => Some(*worker),
        _ => None,
    })
    .await;
    assert_eq!(w, first);
    let (second, second_pid) = next(&mut events, spawned).await;
    assert_ne!(second, first);
    let (w, p) = next(&mut events, |e| match e {
        Event::Exited { worker, pid, .. } => Some((*worker, *pid)),
        _ => None,
    })
    .await;
    assert_eq!((w, p), (first, first_pid));
    let c: u32 = farm.run_method("pid", ()).await.unwrap();
    assert_eq!(c, second_pid);
    farm.shutdown().await;
}

#[tokio::test]
async fn idle_reached_after_max_idle_time() {
    let idle = Duration::from_millis(300);
    let farm = Farm::create(options(1).max_idle_time(idle)).unwrap();
    let mut events = farm.events();
    let (first, _) = next(&mut events, spawned).await;
    let pid: u32 = farm.run_method("pid", ()).await.unwrap();
    let returned = Instant::now();
    let w = next(&mut events, |e| match e {
        Event::IdleReached { worker } => Some(*worker),
        _ => None,
    })
    .await;
    assert_eq!(w, first);
    // Not before the idle time (the clock started when the call was answered, a little
    // before we saw the answer).
    assert!(
        returned.elapsed() >= idle - Duration::from_millis(50),
        "{:?}",
        returned.elapsed()
    );
    let (w, p) = next(&mut events, |e| match e {
        Event::Exited { worker, pid, .. } => Some((*worker, *pid)),
        _ => None,
    })
    .await;
    assert_eq!((w, p), (first, pid));

    // The next call starts a new worker.
    let new_pid: u32 = tokio::time::timeout(SOON, farm.run_method("pid", ()))
        .await
        .unwrap()
        .unwrap();
    assert_ne!(new_pid, pid);
    let (second, _) = next(&mut events, spawned).await;
    assert_ne!(second, first);
    farm.shutdown().await;
}

#[tokio::test]
async fn busy_workers_are_not_idle() {
    let farm = Farm::create(options(1).max_idle_time(Duration::from_millis(200))).unwrap();
    let mut events = farm.events();
    // Calls back to back, each longer than the idle time, keep the same worker.
    let mut pids = Vec::new();
    for _ in 0..3 {
        pids.push(farm.run_method::<_, u32>("sleep", 250u64).await.unwrap());
    }
    assert!(pids.windows(2).all(|w| w[0] == w[1]), "{pids:?}");
    assert!(
        !drain(&mut events)
            .iter()
            .any(|e| matches!(e, Event::IdleReached { .. })),
        "no idle event while calls were in flight"
    );
    farm.shutdown().await;
}

/// A worker that answers the handshake and then announces a 2 GiB reply to its first call.
fn rogue_options() -> FarmOptions {
    const SCRIPT: &str = r#"
dd bs=1 count=16 of=/dev/null 2>/dev/null
printf '\014\000\000\000\201\007\000\000\000\000\000\001\000\000\000\000'
dd bs=1 count=4 of=/dev/null 2>/dev/null
printf '\377\377\377\177'
exec cat > /dev/null
"#;
    trace_init();
    FarmOptions::new("/bin/sh")
        .args(["-c", SCRIPT])
        .workers(1)
        .max_retries(0)
}

#[tokio::test]
async fn error_on_a_protocol_violation() {
    let farm = Farm::create(rogue_options()).unwrap();
    let mut events = farm.events();
    let (worker, pid) = next(&mut events, spawned).await;
    let err = tokio::time::timeout(SOON, farm.run_method::<_, u32>("pid", ()))
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, CallError::Protocol { .. }), "{err:?}");
    let (w, error) = next(&mut events, |e| match e {
        Event::Error { worker, error } => Some((*worker, error.clone())),
        _ => None,
    })
    .await;
    assert_eq!(w, Some(worker));
    match error {
        CallError::Protocol { worker: w, message } => {
            assert_eq!(w, worker);
            assert!(message.contains("exceeds"), "{message}");
        }
        other => panic!("expected Protocol, got {other:?}"),
    }
    // The violator is stopped.
    let (w, p) = next(&mut events, |e| match e {
        Event::Exited { worker, pid, .. } => Some((*worker, *pid)),
        _ => None,
    })
    .await;
    assert_eq!((w, p), (worker, pid));
    farm.kill().await;
}

#[tokio::test]
async fn error_when_a_worker_exits_at_start() {
    let farm = Farm::create(options(1).env("WORKER_EXIT_AT_START", "3")).unwrap();
    let mut events = farm.events();
    let (worker, pid) = next(&mut events, spawned).await;
    let (w, p, exit) = next(&mut events, |e| match e {
        Event::Exited { worker, pid, exit } => Some((*worker, *pid, *exit)),
        _ => None,
    })
    .await;
    assert_eq!((w, p, exit.code), (worker, pid, Some(3)));
    let (w, error) = next(&mut events, |e| match e {
        Event::Error { worker, error } => Some((*worker, error.clone())),
        _ => None,
    })
    .await;
    assert_eq!(w, Some(worker));
    match error {
        CallError::WorkerStart { message } => {
            assert!(message.contains("exit code 3"), "{message}");
            assert!(
                message.contains("exiting at start as asked"),
                "stderr tail: {message}"
            );
        }
        other => panic!("expected WorkerStart, got {other:?}"),
    }
    // The farm keeps trying, with a new worker each time.
    let (again, _) = next(&mut events, spawned).await;
    assert_ne!(again, worker);
    // After a few failures calls fail fast with the reason.
    let err = tokio::time::timeout(SOON, farm.run_method::<_, u32>("pid", ()))
        .await
        .unwrap()
        .unwrap_err();
    match err {
        CallError::WorkerStart { message } => assert!(message.contains("exit code 3"), "{message}"),
        other => panic!("expected WorkerStart, got {other:?}"),
    }
    farm.kill().await;
}

#[tokio::test]
async fn every_event_names_its_worker() {
    let farm = Farm::create(options(1).ttl(1).max_retries(0)).unwrap();
    let mut events = farm.events();
    let _: u32 = farm.run_method("pid", ()).await.unwrap();
    let _ = farm.run_method::<_, ()>("fail", "x").await;
    farm.shutdown().await;
    let all = drain(&mut events);
    assert!(all.iter().any(|e| matches!(e, Event::TtlReached { .. })));
    assert!(all.iter().any(|e| matches!(e, Event::CallDone { .. })));
    assert!(all.iter().any(|e| matches!(e, Event::Exited { .. })));
    for e in &all {
        let named = match e {
            Event::Spawned { worker, .. }
            | Event::Online { worker, .. }
            | Event::Exited { worker, .. }
            | Event::TtlReached { worker }
            | Event::IdleReached { worker }
            | Event::CallDone { worker, .. } => Some(*worker),
            Event::Error { worker, .. } => *worker,
            _ => None,
        };
        assert!(named.is_some(), "{e:?}");
        assert_eq!(e.worker(), named);
        let spawned_before = all
            .iter()
            .take_while(|x| !std::ptr::eq(*x, e))
            .any(|x| matches!(x, Event::Spawned { worker, .. } if Some(*worker) == named));
        assert!(
            spawned_before || matches!(e, Event::Spawned { .. }),
            "event for a worker never spawned: {e:?}"
        );
    }
}

#[tokio::test]
async fn later_subscribers_start_now() {
    let farm = Farm::create(options(1)).unwrap();
    let mut first = farm.events();
    next(&mut first, |e| {
        matches!(e, Event::Online { .. }).then_some(())
    })
    .await;
    let mut second = farm.events();
    assert!(
        second.try_recv().is_err(),
        "a later subscriber does not see the past"
    );
    let _: u32 = farm.run_method("pid", ()).await.unwrap();
    let ok = next(&mut second, |e| match e {
        Event::CallDone { ok, .. } => Some(*ok),
        _ => None,
    })
    .await;
    assert!(ok);
    farm.shutdown().await;
}
