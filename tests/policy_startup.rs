//! Starting workers: a binary that cannot be run is refused by `create`; a worker that exits
//! or hangs before its handshake fails the calls with `WorkerStart` (path, exit status, last
//! stderr line) within a bounded time, and is respawned with backoff, never in a hot loop.

mod support;

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;
use support::*;
use tokio::sync::broadcast;
use tokio::time::{timeout, Instant};
use workfarm::{CallError, CreateError, Event, Farm, FarmOptions};

fn temp_path(tag: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    std::env::temp_dir().join(format!(
        "workfarm-startup-{tag}-{}-{nanos}",
        std::process::id()
    ))
}

fn write_file(path: &PathBuf, text: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Every event until `deadline`.
async fn events_until(events: &mut broadcast::Receiver<Event>, deadline: Instant) -> Vec<Event> {
    let mut out = Vec::new();
    while let Ok(received) = tokio::time::timeout_at(deadline, events.recv()).await {
        match received {
            Ok(event) => out.push(event),
            Err(broadcast::error::RecvError::Lagged(n)) => {
                panic!("lagged by {n} events: a hot loop?")
            }
            Err(broadcast::error::RecvError::Closed) => break,
        }
    }
    out
}

#[tokio::test]
async fn missing_binary_is_refused() {
    let path = temp_path("missing");
    match Farm::create(FarmOptions::new(&path).workers(1)) {
        Err(CreateError::WorkerNotFound { path: p }) => assert_eq!(p, path),
        other => panic!("expected WorkerNotFound, got {other:?}"),
    }
}

/// A working directory that does not exist is named as such, not reported as a missing
/// worker binary (which is what the spawn's ENOENT alone would suggest).
#[tokio::test]
async fn missing_current_dir_is_named() {
    let dir = temp_path("no-such-dir");
    match Farm::create(options(1).current_dir(&dir)) {
        Err(err @ CreateError::CurrentDirNotFound { .. }) => {
            assert!(err.to_string().contains(&*dir.to_string_lossy()), "{err}");
            assert!(err.to_string().contains("current_dir"), "{err}");
        }
        other => panic!("expected CurrentDirNotFound, got {other:?}"),
    }
}

#[tokio::test]
async fn non_executable_file_is_refused() {
    let path = temp_path("noexec");
    write_file(&path, "#!/bin/sh\nexit 0\n", 0o644);
    let result = Farm::create(FarmOptions::new(&path).workers(1));
    let _ = std::fs::remove_file(&path);
    match result {
        Err(CreateError::NotExecutable { path: p }) => assert_eq!(p, path),
        other => panic!("expected NotExecutable, got {other:?}"),
    }
    // A directory is not an executable either.
    let dir = std::env::temp_dir();
    assert!(matches!(
        Farm::create(FarmOptions::new(&dir).workers(1)),
        Err(CreateError::NotExecutable { .. })
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn worker_exiting_at_start_fails_calls_with_the_reason() {
    let farm = Farm::create(options(1).env("WORKER_EXIT_AT_START", "5")).unwrap();
    let mut events = farm.events();
    let created = Instant::now();
    let err = timeout(Duration::from_secs(5), farm.run_method::<_, u32>("pid", ()))
        .await
        .expect("the call fails within a bounded time")
        .unwrap_err();
    let CallError::WorkerStart { message } = &err else {
        panic!("expected WorkerStart, got {err:?}");
    };
    let path = worker_bin().display().to_string();
    assert!(message.contains(&path), "names the path: {message}");
    assert!(
        message.contains("exit code 5"),
        "names the exit status: {message}"
    );
    assert!(
        message.contains("worker-bin: exiting at start as asked"),
        "carries the last stderr line: {message}"
    );

    // Later calls fail fast with the same reason.
    let fast = Instant::now();
    let again = timeout(Duration::from_secs(1), farm.run_method::<_, u32>("pid", ()))
        .await
        .expect("a later call fails at once")
        .unwrap_err();
    assert!(matches!(again, CallError::WorkerStart { .. }), "{again:?}");
    assert!(fast.elapsed() < Duration::from_millis(500));

    // Respawns back off: a handful of spawns in two seconds, not a hot loop.
    let seen = events_until(&mut events, created + Duration::from_secs(2)).await;
    let spawned = spawned_pids(&seen);
    assert!(
        spawned.len() >= 3,
        "it does retry: {} spawns",
        spawned.len()
    );
    assert!(spawned.len() <= 8, "{} spawns in 2 s", spawned.len());
    let start_errors = seen
        .iter()
        .filter(|e| {
            matches!(
                e,
                Event::Error {
                    error: CallError::WorkerStart { .. },
                    ..
                }
            )
        })
        .count();
    assert!(start_errors >= 3, "each failed start is reported: {seen:?}");
    assert!(seen
        .iter()
        .any(|e| matches!(e, Event::Exited { exit, .. } if exit.code == Some(5))));
    assert!(!seen.iter().any(|e| matches!(e, Event::Online { .. })));

    timeout(SOON, farm.kill()).await.expect("kill returns");
    for pid in spawned {
        assert!(!process_alive(pid));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn worker_hanging_before_handshake_is_killed_after_startup_timeout() {
    let startup = Duration::from_millis(500);
    let farm = Farm::create(
        options(1)
            .env("WORKER_HANG_AT_START", "1")
            .startup_timeout(startup),
    )
    .unwrap();
    let mut events = farm.events();
    let created = Instant::now();
    let err = timeout(Duration::from_secs(8), farm.run_method::<_, u32>("pid", ()))
        .await
        .expect("the call fails within a bounded time")
        .unwrap_err();
    let elapsed = created.elapsed();
    let CallError::WorkerStart { message } = &err else {
        panic!("expected WorkerStart, got {err:?}");
    };
    assert!(
        message.contains("handshake"),
        "mentions the handshake: {message}"
    );
    assert!(
        message.contains(&worker_bin().display().to_string()),
        "names the path: {message}"
    );
    assert!(
        elapsed >= startup,
        "failed after {elapsed:?}, before the startup timeout"
    );

    // The hung workers were killed (by a signal), not left behind.
    timeout(SOON, farm.kill()).await.expect("kill returns");
    let seen = events_until(&mut events, Instant::now() + Duration::from_millis(100)).await;
    let spawned = spawned_pids(&seen);
    assert!(spawned.len() >= 3, "{seen:?}");
    let exits: Vec<_> = seen
        .iter()
        .filter_map(|e| match e {
            Event::Exited { exit, .. } => Some(*exit),
            _ => None,
        })
        .collect();
    assert_eq!(exits.len(), spawned.len(), "{seen:?}");
    assert!(exits.iter().all(|e| e.is_signal()), "{exits:?}");
    assert!(!seen.iter().any(|e| matches!(e, Event::Online { .. })));
    for pid in spawned {
        assert!(!process_alive(pid), "hung worker {pid} outlived the farm");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_wait_through_a_transient_start_failure() {
    // The first start fails (a wrapper script exits before running the worker); the retry,
    // after a short backoff, starts the real worker, and the queued calls run on it.
    let marker = temp_path("marker");
    let script = temp_path("wrapper");
    write_file(
        &script,
        &format!(
            "#!/bin/sh\nif [ ! -e '{m}' ]; then touch '{m}'; echo 'first start fails' >&2; exit 3; fi\nexec '{bin}'\n",
            m = marker.display(),
            bin = worker_bin().display()
        ),
        0o755,
    );
    trace_init();
    let farm = Farm::create(FarmOptions::new(&script).workers(1)).unwrap();
    let mut events = farm.events();
    let calls: Vec<_> = (0..3i64)
        .map(|i| farm.run_method::<_, i64>("add", (i, i)))
        .collect();
    for (i, call) in calls.into_iter().enumerate() {
        assert_eq!(
            timeout(SOON, call).await.expect("settles"),
            Ok(2 * i as i64)
        );
    }
    let failure = wait_for_event(&mut events, SOON, |e| matches!(e, Event::Error { .. })).await;
    let Event::Error {
        error: CallError::WorkerStart { message },
        ..
    } = failure
    else {
        panic!("expected a WorkerStart error event, got {failure:?}");
    };
    assert!(
        message.contains("exit code 3") && message.contains("first start fails"),
        "{message}"
    );
    wait_for_event(&mut events, SOON, |e| matches!(e, Event::Online { .. })).await;
    farm.shutdown().await;
    let _ = std::fs::remove_file(&script);
    let _ = std::fs::remove_file(&marker);
}

#[tokio::test(flavor = "multi_thread")]
async fn start_failures_of_several_workers_still_back_off() {
    let farm = Farm::create(options(2).env("WORKER_EXIT_AT_START", "2")).unwrap();
    let mut events = farm.events();
    let created = Instant::now();
    let err = timeout(Duration::from_secs(5), farm.run::<_, serde_json::Value>(1))
        .await
        .expect("the call fails within a bounded time")
        .unwrap_err();
    assert!(matches!(err, CallError::WorkerStart { .. }), "{err:?}");
    let seen = events_until(&mut events, created + Duration::from_secs(2)).await;
    let spawned: HashSet<u32> = spawned_pids(&seen).into_iter().collect();
    assert!(spawned.len() <= 16, "{} spawns in 2 s", spawned.len());
    timeout(SOON, farm.kill()).await.expect("kill returns");
    for pid in spawned {
        assert!(!process_alive(pid));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn startup_timeout_does_not_limit_calls() {
    let startup = Duration::from_millis(300);
    let farm = Farm::create(options(1).startup_timeout(startup)).unwrap();
    let pid: u32 = farm.run_method("pid", ()).await.unwrap();
    let slow: u32 = timeout(SOON, farm.run_method("sleep", 900u64))
        .await
        .expect("settles")
        .expect("a call longer than startup_timeout completes");
    assert_eq!(slow, pid);
    let status = farm.status().await;
    assert_eq!(status.workers.len(), 1);
    assert_eq!(status.workers[0].pid, pid);
    farm.shutdown().await;
}
