//! Stopping a farm against real workers: `kill()`, `shutdown()`, dropping the last handle and
//! `kill_all()`. Every call settles exactly once, and no worker process outlives its farm.
//! Ports workestrator's "kill", "kill all farms", "no recreation after kill" and
//! node-worker-farm's "end" tests.

mod support;

use std::time::Duration;
use support::*;
use tokio::sync::RwLock;
use tokio::time::{timeout, Instant};
use workfarm::{CallError, Event, Farm, Status};

/// `kill_all()` kills every farm of this process, so its test runs alone: it takes this lock
/// for writing, every other test for reading.
static EXCLUSIVE: RwLock<()> = RwLock::const_new(());

fn pids(status: &Status) -> Vec<u32> {
    status.workers.iter().map(|w| w.pid).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_fails_queued_and_in_flight_calls_at_once() {
    let _shared = EXCLUSIVE.read().await;
    let farm = Farm::create(options(1).max_concurrent_calls_per_worker(1)).unwrap();
    let calls: Vec<_> = (0..3)
        .map(|_| farm.run_method::<_, u32>("sleep", 5000u64))
        .collect();
    let status = wait_status(&farm, SOON, |s| s.in_flight() == 1 && s.queued == 2).await;
    let workers = pids(&status);

    let started = Instant::now();
    timeout(SOON, farm.kill()).await.expect("kill returns");
    for call in calls {
        let result = timeout(Duration::from_secs(2), call)
            .await
            .expect("settled by kill");
        assert_eq!(result, Err(CallError::ShutDown));
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "calls did not wait for their 5 s sleeps"
    );
    for pid in workers {
        assert!(!process_alive(pid), "worker {pid} outlived kill()");
    }

    // Later calls fail at once, and nothing is re-created.
    let late = timeout(Duration::from_secs(1), farm.run_method::<_, u32>("pid", ()))
        .await
        .expect("a call after kill settles at once");
    assert_eq!(late, Err(CallError::ShutDown));
    assert!(farm.status().await.workers.is_empty());
    let b = farm.broadcast_method::<_, u32>("pid", ()).await;
    assert!(b.successes.is_empty() && b.failures.is_empty());
    // A second kill (and a shutdown) after the farm stopped return at once.
    timeout(Duration::from_secs(1), farm.kill())
        .await
        .expect("second kill returns");
    timeout(Duration::from_secs(1), farm.shutdown())
        .await
        .expect("shutdown after kill returns");
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_finishes_in_flight_calls_and_fails_queued_ones() {
    let _shared = EXCLUSIVE.read().await;
    let farm = Farm::create(options(2).max_concurrent_calls_per_worker(1)).unwrap();
    let mut events = farm.events();
    let running: Vec<_> = (0..2)
        .map(|_| farm.run_method::<_, u32>("sleep", 700u64))
        .collect();
    let queued: Vec<_> = (0..3)
        .map(|_| farm.run_method::<_, u32>("sleep", 700u64))
        .collect();
    let status = wait_status(&farm, SOON, |s| s.in_flight() == 2 && s.queued == 3).await;
    let workers = pids(&status);

    let stopper = farm.clone();
    let shutdown = tokio::spawn(async move { stopper.shutdown().await });
    // Queued calls fail at once, while the running ones are still running.
    let started = Instant::now();
    for call in queued {
        let result = timeout(Duration::from_secs(2), call)
            .await
            .expect("queued call settles");
        assert_eq!(result, Err(CallError::ShutDown));
    }
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "queued calls waited for the running ones"
    );
    // Calls made during the shutdown fail at once too.
    let late = timeout(
        Duration::from_millis(500),
        farm.run_method::<_, u32>("pid", ()),
    )
    .await
    .expect("a call during shutdown settles at once");
    assert_eq!(late, Err(CallError::ShutDown));

    let mut done = Vec::new();
    for call in running {
        done.push(
            timeout(SOON, call)
                .await
                .unwrap()
                .expect("in-flight call completes"),
        );
    }
    done.sort_unstable();
    let mut expected = workers.clone();
    expected.sort_unstable();
    assert_eq!(done, expected, "each worker finished its call");

    timeout(SOON, shutdown)
        .await
        .expect("shutdown returns")
        .unwrap();
    // Workers left on their own once idle (stdin closed), not by a signal.
    for _ in 0..2 {
        let Event::Exited { exit, pid, .. } =
            wait_for_event(&mut events, SOON, |e| matches!(e, Event::Exited { .. })).await
        else {
            unreachable!()
        };
        assert!(workers.contains(&pid));
        assert_eq!(exit.code, Some(0), "{exit:?}");
    }
    for pid in workers {
        assert!(!process_alive(pid), "worker {pid} outlived shutdown()");
    }
    assert_eq!(
        farm.run_method::<_, u32>("pid", ()).await,
        Err(CallError::ShutDown)
    );
    assert!(farm.status().await.workers.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_of_an_idle_farm_returns_promptly() {
    let _shared = EXCLUSIVE.read().await;
    let farm = Farm::create(options(2)).unwrap();
    let b = farm.broadcast_method::<_, u32>("pid", ()).await;
    assert_eq!(b.successes.len(), 2);
    let started = Instant::now();
    timeout(SOON, farm.shutdown())
        .await
        .expect("shutdown returns");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    for (_, pid) in b.successes {
        assert!(!process_alive(pid));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn dropping_the_last_handle_stops_every_worker() {
    let _shared = EXCLUSIVE.read().await;
    let farm = Farm::create(options(2)).unwrap();
    let b = farm.broadcast_method::<_, u32>("pid", ()).await;
    let workers: Vec<u32> = b.successes.iter().map(|(_, pid)| *pid).collect();
    assert_eq!(workers.len(), 2);
    // A clone keeps the farm alive.
    let clone = farm.clone();
    drop(farm);
    assert_eq!(
        timeout(SOON, clone.run_method::<_, i64>("add", (2, 2)))
            .await
            .unwrap(),
        Ok(4)
    );

    // Calls outstanding keep the farm alive after its last handle is gone: they finish.
    let in_flight = clone.run_method::<_, u32>("sleep", 300u64);
    let queued: Vec<_> = (0..30)
        .map(|_| clone.run_method::<_, u32>("sleep", 300u64))
        .collect();
    wait_status(&clone, SOON, |s| s.in_flight() == 20 && s.queued == 11).await;
    drop(clone);
    let pid = timeout(SOON, in_flight).await.expect("settles").unwrap();
    assert!(workers.contains(&pid));
    for call in queued {
        let pid = timeout(SOON, call).await.expect("settles").unwrap();
        assert!(workers.contains(&pid));
    }
    // The last of them settled: nothing holds the farm, and its workers stop.
    for pid in workers {
        wait_gone(pid, SOON).await;
    }
}

/// Call futures dropped unawaited release the farm as well: with no handle and no call
/// left, every worker stops at once, long calls or not.
#[tokio::test(flavor = "multi_thread")]
async fn dropping_the_last_handle_and_the_last_call_stops_every_worker() {
    let _shared = EXCLUSIVE.read().await;
    let farm = Farm::create(options(2)).unwrap();
    let status = all_online(&farm, 2).await;
    let calls: Vec<_> = (0..10)
        .map(|_| farm.run_method::<_, u32>("sleep", 30_000u64))
        .collect();
    wait_status(&farm, SOON, |s| s.in_flight() == 10).await;
    drop(farm);
    let dropped = Instant::now();
    drop(calls);
    for worker in status.workers {
        wait_gone(worker.pid, SOON).await;
    }
    assert!(
        dropped.elapsed() < Duration::from_secs(5),
        "workers outlived their calls: {:?}",
        dropped.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_all_kills_every_farm() {
    let _alone = EXCLUSIVE.write().await;
    let first = Farm::create(options(1)).unwrap();
    let second = Farm::create(options(2)).unwrap();
    let a = first.run_method::<_, u32>("sleep", 5000u64);
    let b = second.run_method::<_, u32>("sleep", 5000u64);
    let first_pids = pids(&wait_status(&first, SOON, |s| s.in_flight() == 1).await);
    let second_pids = pids(
        &wait_status(&second, SOON, |s| {
            s.in_flight() == 1 && s.workers.len() == 2
        })
        .await,
    );

    let started = Instant::now();
    timeout(SOON, workfarm::kill_all())
        .await
        .expect("kill_all returns");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(timeout(SOON, a).await.unwrap(), Err(CallError::ShutDown));
    assert_eq!(timeout(SOON, b).await.unwrap(), Err(CallError::ShutDown));
    for pid in first_pids.into_iter().chain(second_pids) {
        assert!(!process_alive(pid), "worker {pid} outlived kill_all()");
    }
    assert_eq!(
        first.run_method::<_, u32>("pid", ()).await,
        Err(CallError::ShutDown)
    );
    assert_eq!(
        second.run_method::<_, u32>("pid", ()).await,
        Err(CallError::ShutDown)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_all_ignores_dropped_farms() {
    let _alone = EXCLUSIVE.write().await;
    let gone = Farm::create(options(1)).unwrap();
    let pid: u32 = gone.run_method("pid", ()).await.unwrap();
    drop(gone);
    wait_gone(pid, SOON).await;
    let alive = Farm::create(options(1)).unwrap();
    let alive_pid: u32 = alive.run_method("pid", ()).await.unwrap();
    timeout(SOON, workfarm::kill_all())
        .await
        .expect("kill_all returns");
    assert!(!process_alive(alive_pid));
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_during_shutdown_fails_the_in_flight_calls_at_once() {
    let _shared = EXCLUSIVE.read().await;
    let farm = Farm::create(options(1)).unwrap();
    let call = farm.run_method::<_, u32>("sleep", 5000u64);
    let pid = wait_status(&farm, SOON, |s| s.in_flight() == 1)
        .await
        .workers[0]
        .pid;
    let stopper = farm.clone();
    let shutdown = tokio::spawn(async move { stopper.shutdown().await });
    // The graceful stop waits for the call...
    wait_status(&farm, SOON, |s| {
        s.workers
            .iter()
            .all(|w| w.state == workfarm::WorkerState::Retiring)
    })
    .await;
    // ...until kill() escalates it.
    let started = Instant::now();
    timeout(SOON, farm.kill()).await.expect("kill returns");
    assert_eq!(
        timeout(Duration::from_secs(2), call)
            .await
            .expect("settled by kill"),
        Err(CallError::ShutDown)
    );
    timeout(SOON, shutdown)
        .await
        .expect("shutdown returns too")
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(!process_alive(pid));
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_kills_a_worker_that_lingers_after_kill_timeout() {
    // A worker hung before its handshake never reads its closed stdin: SIGKILL follows.
    let _shared = EXCLUSIVE.read().await;
    let grace = Duration::from_millis(300);
    let farm = Farm::create(
        options(1)
            .env("WORKER_HANG_AT_START", "1")
            .kill_timeout(grace),
    )
    .unwrap();
    let mut events = farm.events();
    let Event::Spawned { pid, .. } =
        wait_for_event(&mut events, SOON, |e| matches!(e, Event::Spawned { .. })).await
    else {
        unreachable!()
    };
    let started = Instant::now();
    timeout(SOON, farm.shutdown())
        .await
        .expect("shutdown returns");
    let elapsed = started.elapsed();
    assert!(elapsed >= grace, "returned after {elapsed:?}");
    assert!(
        elapsed < Duration::from_secs(5),
        "returned after {elapsed:?}"
    );
    let Event::Exited { exit, .. } =
        wait_for_event(&mut events, SOON, |e| matches!(e, Event::Exited { .. })).await
    else {
        unreachable!()
    };
    assert_eq!(exit.signal, Some(9), "{exit:?}");
    assert!(!process_alive(pid));
}

#[test]
fn runtime_shutdown_kills_the_workers_of_a_live_farm() {
    let _shared = EXCLUSIVE.blocking_read();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (farm, workers) = runtime.block_on(async {
        let farm = Farm::create(options(2)).unwrap();
        let b = farm.broadcast_method::<_, u32>("pid", ()).await;
        let workers: Vec<u32> = b.successes.iter().map(|(_, pid)| *pid).collect();
        (farm, workers)
    });
    assert_eq!(workers.len(), 2);
    // The farm handle outlives its runtime.
    drop(runtime);
    let deadline = std::time::Instant::now() + SOON;
    for pid in workers {
        while process_alive(pid) {
            assert!(
                std::time::Instant::now() < deadline,
                "worker {pid} outlived the runtime"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    drop(farm);
}
