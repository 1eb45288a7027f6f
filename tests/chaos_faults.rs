//! Chaos: faults injected into a running farm (kill -9, poison pills, a parent killed or
//! interrupted, floods of output, undecodable results, workers that cannot start, garbage on
//! the frame stream). Each test checks that every call settles, with the promised result or
//! error, and that the farm recovers.

mod support;

use std::collections::{HashMap, HashSet};
use std::process::Stdio;
use std::time::{Duration, Instant};
use support::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::broadcast;
use tokio::time::timeout;
use workfarm::{CallError, CreateError, Event, Farm, FarmOptions, Status, WorkerState};

fn online_pids(status: &Status) -> HashSet<u32> {
    status
        .workers
        .iter()
        .filter(|w| w.state == WorkerState::Online)
        .map(|w| w.pid)
        .collect()
}

/// Collects every event until `within` has passed since `start`.
async fn events_until(
    events: &mut broadcast::Receiver<Event>,
    start: tokio::time::Instant,
    within: Duration,
) -> Vec<Event> {
    let mut out = Vec::new();
    while let Ok(Ok(event)) = tokio::time::timeout_at(start + within, events.recv()).await {
        out.push(event);
    }
    out
}

fn kill_signal(signal: &str, target: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, "--", target])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {signal} {target} failed");
}

fn kill9(pid: u32) {
    kill_signal("-9", &pid.to_string());
}

// ===== (a) kill -9 with calls in flight =====

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_with_calls_in_flight_reruns_each_once_elsewhere() {
    let farm = Farm::create(options(2).max_concurrent_calls_per_worker(5)).unwrap();
    let mut events = farm.events();
    collect_events(&mut events, 2, SOON, |e| matches!(e, Event::Online { .. })).await;

    let calls: Vec<_> = (0..10)
        .map(|_| tokio::spawn(farm.run_method::<_, u32>("sleep", 1500u64)))
        .collect();
    let status = wait_status(&farm, SOON, |s| {
        s.workers.len() == 2
            && s.workers
                .iter()
                .all(|w| w.state == WorkerState::Online && w.in_flight == 5)
    })
    .await;
    let victim = status.workers[0].pid;
    let survivor = status.workers[1].pid;
    kill9(victim);

    let mut by_pid: HashMap<u32, usize> = HashMap::new();
    for call in calls {
        let pid = timeout(SOON, call)
            .await
            .expect("call settles")
            .expect("task")
            .expect("a killed worker's calls are re-run, not failed");
        assert_ne!(pid, victim, "a call was answered by the killed worker");
        *by_pid.entry(pid).or_default() += 1;
    }
    assert_eq!(
        by_pid.remove(&survivor),
        Some(5),
        "the survivor answers its own 5: {by_pid:?}"
    );
    assert_eq!(
        by_pid.len(),
        1,
        "the 5 re-run calls go to one replacement: {by_pid:?}"
    );
    let replacement = *by_pid.keys().next().unwrap();

    // Each call was answered exactly once; the killed worker's exit was seen as SIGKILL.
    let seen = drain(&mut events);
    let mut done: HashMap<u64, usize> = HashMap::new();
    for event in &seen {
        if let Event::CallDone { call, ok, .. } = event {
            assert!(ok);
            *done.entry(*call).or_default() += 1;
        }
    }
    assert_eq!(done.len(), 10, "10 distinct calls answered: {done:?}");
    assert!(
        done.values().all(|&n| n == 1),
        "a call answered twice: {done:?}"
    );
    assert!(
        seen.iter().any(|e| matches!(e, Event::Exited { pid, exit, .. } if *pid == victim && exit.signal == Some(9))),
        "no Exited(SIGKILL) event for the victim: {seen:?}"
    );
    assert!(
        seen.iter()
            .any(|e| matches!(e, Event::Online { pid, .. } if *pid == replacement)),
        "no Online event for the replacement: {seen:?}"
    );

    let status = farm.status().await;
    assert_eq!(status.workers.len(), 2, "{status:?}");
    assert_eq!(
        online_pids(&status),
        HashSet::from([survivor, replacement]),
        "{status:?}"
    );
    farm.shutdown().await;
}

// ===== (b) poison pill =====

#[tokio::test(flavor = "multi_thread")]
async fn poison_pill_exhausts_its_retries_while_other_calls_succeed() {
    // One call per worker at a time, so the normal calls never share the poisoned worker
    // (co-located calls are legitimately charged a retry when it dies).
    let farm = Farm::create(options(3).max_concurrent_calls_per_worker(1).max_retries(3)).unwrap();
    let mut events = farm.events();
    collect_events(&mut events, 3, SOON, |e| matches!(e, Event::Online { .. })).await;

    let poison = tokio::spawn(farm.run_method::<_, ()>("exit", 17));
    let normal: Vec<_> = (0..60i64)
        .map(|i| tokio::spawn(farm.run_method::<_, i64>("add", (i, 1000))))
        .collect();

    let err = timeout(SOON, poison)
        .await
        .expect("poison settles")
        .unwrap()
        .unwrap_err();
    match &err {
        CallError::RetriesExhausted {
            attempts: 4, last, ..
        } => match &**last {
            CallError::WorkerDied { exit, .. } => assert_eq!(exit.code, Some(17), "{err:?}"),
            other => panic!("last cause should be WorkerDied, got {other:?}"),
        },
        other => panic!("expected RetriesExhausted {{ attempts: 4 }}, got {other:?}"),
    }
    for (i, call) in normal.into_iter().enumerate() {
        let v = timeout(SOON, call)
            .await
            .expect("settles")
            .unwrap()
            .expect("normal call succeeds");
        assert_eq!(v, i as i64 + 1000);
    }
    let poisoned = drain(&mut events)
        .into_iter()
        .filter(|e| matches!(e, Event::Exited { exit, .. } if exit.code == Some(17)))
        .count();
    assert_eq!(poisoned, 4, "the pill killed one worker per attempt");
    wait_status(&farm, SOON, |s| online_pids(s).len() == 3).await;
    farm.shutdown().await;
}

// ===== (c), (d) the farm's parent killed or interrupted =====

/// Spawns `workfarm-worker --parent 2` and reads its workers' pids up to `ready`.
async fn spawn_parent(
    own_group: bool,
) -> (
    tokio::process::Child,
    tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    Vec<u32>,
) {
    let mut cmd = tokio::process::Command::new(worker_bin());
    cmd.args(["--parent", "2"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true);
    if own_group {
        cmd.process_group(0);
    }
    let mut child = cmd.spawn().expect("spawn the parent");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut pids = Vec::new();
    loop {
        let line = timeout(SOON, lines.next_line())
            .await
            .expect("parent prints ready")
            .unwrap()
            .expect("parent stdout ended before ready");
        if line == "ready" {
            break;
        }
        pids.push(line.parse::<u32>().expect("a pid line"));
    }
    assert_eq!(pids.len(), 2, "{pids:?}");
    for &pid in &pids {
        assert!(
            process_alive(pid),
            "worker {pid} alive while the parent runs"
        );
    }
    (child, lines, pids)
}

#[tokio::test(flavor = "multi_thread")]
async fn parent_sigkilled_takes_its_workers_with_it() {
    let (mut child, _lines, pids) = spawn_parent(false).await;
    kill9(child.id().unwrap());
    for pid in pids {
        wait_gone(pid, Duration::from_secs(1)).await;
    }
    let status = timeout(SOON, child.wait())
        .await
        .expect("parent reaped")
        .unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigint_to_the_parents_group_lets_the_farm_shut_down_gracefully() {
    let (mut child, mut lines, pids) = spawn_parent(true).await;
    let pgid = child.id().unwrap();
    // The parent prints `ready` just before it installs its SIGINT handler: wait for it.
    wait_catches_sigint(pgid).await;
    kill_signal("-INT", &format!("-{pgid}"));
    let mut exited = HashMap::new();
    loop {
        let line = timeout(SOON, lines.next_line())
            .await
            .expect("parent prints done")
            .unwrap()
            .expect("parent stdout ended before done");
        if line == "done" {
            break;
        }
        let rest = line
            .strip_prefix("exited ")
            .unwrap_or_else(|| panic!("unexpected line {line:?}"));
        let (pid, how) = rest.split_once(' ').unwrap();
        exited.insert(pid.parse::<u32>().unwrap(), how.to_owned());
    }
    for pid in &pids {
        assert_eq!(
            exited.get(pid).map(String::as_str),
            Some("exit code 0"),
            "worker {pid} should exit because the farm stopped it, not from SIGINT: {exited:?}"
        );
        assert!(!process_alive(*pid));
    }
    let status = timeout(SOON, child.wait())
        .await
        .expect("parent exits")
        .unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}");
}

/// Waits until `pid` catches SIGINT (its SigCgt mask in /proc says so).
async fn wait_catches_sigint(pid: u32) {
    let deadline = tokio::time::Instant::now() + SOON;
    loop {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("parent alive");
        let caught = status
            .lines()
            .find_map(|l| l.strip_prefix("SigCgt:"))
            .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
            .expect("SigCgt in /proc/<pid>/status");
        if caught & (1 << (libc::SIGINT - 1)) != 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the parent never caught SIGINT"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// ===== (e) floods of stdout/stderr =====

/// Points this process's stderr at /dev/null while alive (the farm copies each worker's
/// stderr to ours; tens of megabytes of `x` would bury the test output).
struct QuietStderr(libc::c_int);

impl QuietStderr {
    fn new() -> Self {
        // SAFETY: dup/open/dup2 on plain descriptors; the saved one is restored on drop.
        unsafe {
            let saved = libc::dup(2);
            assert!(saved >= 0);
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY);
            assert!(null >= 0);
            libc::dup2(null, 2);
            libc::close(null);
            QuietStderr(saved)
        }
    }
}

impl Drop for QuietStderr {
    fn drop(&mut self) {
        // SAFETY: restores the descriptor saved in `new`.
        unsafe {
            libc::dup2(self.0, 2);
            libc::close(self.0);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn megabytes_of_stdout_and_stderr_neither_stall_nor_corrupt() {
    let quiet = if std::env::var_os("CHAOS_SHOW_STDERR").is_some() {
        None
    } else {
        Some(QuietStderr::new())
    };
    let farm = Farm::create(options(2)).unwrap();
    let started = Instant::now();
    let mut chatty = Vec::new();
    let mut echoes = Vec::new();
    for i in 0..220usize {
        if i % 11 == 5 {
            chatty.push(tokio::spawn(
                farm.run_method::<_, usize>("chatty", 1_000_000usize),
            ));
        } else {
            let value = serde_json::json!({ "i": i, "s": "é\u{1F600}\n\"".repeat(i % 7), "v": [i, -1, 2.5] });
            echoes.push((
                value.clone(),
                tokio::spawn(farm.run_method::<_, serde_json::Value>("echo", value)),
            ));
        }
    }
    assert_eq!((chatty.len(), echoes.len()), (20, 200));
    let all = async {
        for call in chatty {
            assert_eq!(call.await.unwrap().unwrap(), 1_000_000);
        }
        for (value, call) in echoes {
            assert_eq!(call.await.unwrap().unwrap(), value);
        }
    };
    timeout(Duration::from_secs(60), all)
        .await
        .expect("chatty workers stalled the farm");
    let elapsed = started.elapsed();
    farm.shutdown().await;
    drop(quiet);
    eprintln!("20 x 2 MB of output + 200 echoes in {elapsed:?}");
}

// ===== (f) an undecodable result =====

#[derive(Debug, serde::Deserialize)]
#[allow(dead_code)]
struct Point {
    x: i64,
    y: i64,
}

#[tokio::test(flavor = "multi_thread")]
async fn undecodable_result_fails_only_that_call() {
    let farm = Farm::create(options(1)).unwrap();
    let mut events = farm.events();
    let pid: u32 = farm.run_method("pid", ()).await.unwrap();
    let err = timeout(SOON, farm.run_method::<_, Point>("echo", "not a point"))
        .await
        .expect("settles")
        .unwrap_err();
    match &err {
        CallError::Deserialize { type_name, .. } => {
            assert!(type_name.ends_with("Point"), "names the type: {type_name}")
        }
        other => panic!("expected Deserialize, got {other:?}"),
    }
    assert_eq!(
        farm.run_method::<_, u32>("pid", ()).await.unwrap(),
        pid,
        "same worker"
    );
    assert_eq!(farm.run_method::<_, i64>("add", (2, 3)).await.unwrap(), 5);
    let seen = drain(&mut events);
    assert!(
        !seen
            .iter()
            .any(|e| matches!(e, Event::Exited { .. } | Event::Error { .. })),
        "{seen:?}"
    );
    farm.shutdown().await;
}

// ===== (g) workers that cannot start =====

#[tokio::test(flavor = "multi_thread")]
async fn missing_binary_is_a_create_error_at_once() {
    let started = Instant::now();
    let err = Farm::create(FarmOptions::new("/nonexistent/dir/workfarm-worker")).unwrap_err();
    assert!(matches!(err, CreateError::WorkerNotFound { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread")]
async fn non_executable_binary_is_a_create_error_at_once() {
    let path = std::env::temp_dir().join(format!("workfarm-chaos-noexec-{}", std::process::id()));
    std::fs::write(&path, b"#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let started = Instant::now();
    let result = Farm::create(FarmOptions::new(&path));
    let _ = std::fs::remove_file(&path);
    let err = result.unwrap_err();
    assert!(matches!(err, CreateError::NotExecutable { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(1));
}

/// Creates a farm of workers that cannot start, checks that a call fails with `WorkerStart`
/// within `fail_within`, that spawns over ~2 s stay few, and that no process is left.
async fn start_failure(options: FarmOptions, fail_within: Duration, expect_in_message: &str) {
    let created = tokio::time::Instant::now();
    let farm = Farm::create(options).unwrap();
    let mut events = farm.events();
    let err = timeout(fail_within, farm.run_method::<_, i64>("add", (1, 2)))
        .await
        .expect("a call on a farm whose workers cannot start fails in bounded time")
        .unwrap_err();
    match &err {
        CallError::WorkerStart { message } => {
            assert!(
                message.contains("workfarm-worker"),
                "names the binary: {message}"
            );
            assert!(message.contains(expect_in_message), "{message}");
        }
        other => panic!("expected WorkerStart, got {other:?}"),
    }
    // Later calls fail fast.
    let again = Instant::now();
    let err = timeout(SOON, farm.run_method::<_, i64>("add", (1, 2)))
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, CallError::WorkerStart { .. }), "{err:?}");
    assert!(
        again.elapsed() < Duration::from_millis(500),
        "{:?}",
        again.elapsed()
    );

    let seen = events_until(&mut events, created, Duration::from_secs(2)).await;
    let spawned: Vec<u32> = seen
        .iter()
        .filter_map(|e| match e {
            Event::Spawned { pid, .. } => Some(*pid),
            _ => None,
        })
        .collect();
    assert!(
        (3..=8).contains(&spawned.len()),
        "{} spawns in 2 s: backoff should keep this small: {seen:?}",
        spawned.len()
    );
    assert!(
        seen.iter().any(|e| matches!(
            e,
            Event::Error {
                error: CallError::WorkerStart { .. },
                ..
            }
        )),
        "start failures are reported as events"
    );
    farm.kill().await;
    for pid in spawned {
        assert!(!process_alive(pid), "worker {pid} outlived kill()");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn worker_exiting_at_start_fails_calls_without_a_respawn_loop() {
    start_failure(
        options(1).env("WORKER_EXIT_AT_START", "3"),
        Duration::from_secs(5),
        "exit code 3",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn worker_hanging_before_handshake_fails_calls_without_a_respawn_loop() {
    start_failure(
        options(1)
            .env("WORKER_HANG_AT_START", "1")
            .startup_timeout(Duration::from_millis(300)),
        Duration::from_secs(5),
        "handshake",
    )
    .await;
}

// ===== (h) garbage on the frame stream =====

fn protocol_errors(seen: &[Event]) -> Vec<(workfarm::WorkerId, String)> {
    seen.iter()
        .filter_map(|e| match e {
            Event::Error {
                worker: Some(w),
                error: CallError::Protocol { worker, message },
            } => {
                assert_eq!(w, worker);
                Some((*w, message.clone()))
            }
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_frames_drop_the_worker_and_fail_only_that_call() {
    // One call per worker, so only the call that provoked the garbage shares its worker.
    let farm = Farm::create(options(2).max_concurrent_calls_per_worker(1).max_retries(0)).unwrap();
    let mut events = farm.events();
    collect_events(&mut events, 2, SOON, |e| matches!(e, Event::Online { .. })).await;

    for (kind, expect) in [
        ("oversize", "exceeds"),
        ("tag", "unknown message tag"),
        ("shared", "shared-memory"),
    ] {
        let before = online_pids(&farm.status().await);
        let normal: Vec<_> = (0..40i64)
            .map(|i| tokio::spawn(farm.run_method::<_, i64>("add", (i, 7))))
            .collect();
        let err = timeout(SOON, farm.run_method::<_, u32>("garbage", kind))
            .await
            .expect("settles")
            .unwrap_err();
        let CallError::Protocol { worker, message } = &err else {
            panic!("{kind}: expected Protocol, got {err:?}");
        };
        assert!(message.contains(expect), "{kind}: {message}");
        for (i, call) in normal.into_iter().enumerate() {
            assert_eq!(
                timeout(SOON, call).await.unwrap().unwrap().unwrap(),
                i as i64 + 7
            );
        }
        // Reported, dropped, replaced.
        let mut seen = Vec::new();
        wait_for_event(&mut events, SOON, |e| {
            seen.push(e.clone());
            matches!(e, Event::Exited { worker: w, .. } if w == worker)
        })
        .await;
        let Some(Event::Exited { pid: bad_pid, .. }) = seen.last().cloned() else {
            unreachable!()
        };
        assert!(before.contains(&bad_pid));
        let status = wait_status(&farm, SOON, |s| online_pids(s).len() == 2).await;
        assert!(!online_pids(&status).contains(&bad_pid));
        seen.extend(drain(&mut events));
        let errors = protocol_errors(&seen);
        assert_eq!(
            errors.len(),
            1,
            "{kind}: one Event::Error(Protocol): {errors:?}"
        );
        assert_eq!(errors[0].0, *worker);
    }
    assert_eq!(farm.run_method::<_, i64>("add", (1, 1)).await.unwrap(), 2);
    farm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_on_every_attempt_exhausts_the_retries() {
    let farm = Farm::create(options(2).max_concurrent_calls_per_worker(1).max_retries(2)).unwrap();
    let mut events = farm.events();
    collect_events(&mut events, 2, SOON, |e| matches!(e, Event::Online { .. })).await;
    let normal: Vec<_> = (0..40i64)
        .map(|i| tokio::spawn(farm.run_method::<_, i64>("add", (i, 9))))
        .collect();
    let err = timeout(SOON, farm.run_method::<_, u32>("garbage", "tag"))
        .await
        .expect("settles")
        .unwrap_err();
    match &err {
        CallError::RetriesExhausted {
            attempts: 3, last, ..
        } => {
            assert!(matches!(**last, CallError::Protocol { .. }), "{err:?}")
        }
        other => panic!("expected RetriesExhausted {{ attempts: 3 }}, got {other:?}"),
    }
    for (i, call) in normal.into_iter().enumerate() {
        assert_eq!(
            timeout(SOON, call).await.unwrap().unwrap().unwrap(),
            i as i64 + 9
        );
    }
    wait_status(&farm, SOON, |s| online_pids(s).len() == 2).await;
    let errors = protocol_errors(&drain(&mut events));
    assert_eq!(errors.len(), 3, "one Event::Error per attempt: {errors:?}");
    let distinct: HashSet<_> = errors.iter().map(|(w, _)| *w).collect();
    assert_eq!(distinct.len(), 3, "each attempt dropped a different worker");
    farm.shutdown().await;
}
