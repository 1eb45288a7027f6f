//! Shared helpers for the integration tests.
//!
//! The reference worker lives in its own workspace member (`worker-bin/`), so Cargo does not
//! build it for this package's tests: [`worker_bin`] builds it once per test process with
//! `cargo build -p workfarm-worker` (a no-op when it is fresh) in the same profile, and
//! returns its path. `WORKFARM_WORKER_BIN` overrides the path.
#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;
use tokio::sync::broadcast;
use workfarm::{Event, Farm, FarmOptions, Status, WorkerState};

/// Installs a per-test tracing subscriber (`RUST_LOG=workfarm=debug` to see the farm's logs).
pub fn trace_init() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// The reference worker binary, built on first use.
pub fn worker_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(path) = std::env::var_os("WORKFARM_WORKER_BIN") {
            return PathBuf::from(path);
        }
        // Tests run from target/<profile>/deps/<test>-<hash>.
        let exe = std::env::current_exe().expect("test executable path");
        let profile_dir = exe
            .parent()
            .and_then(|deps| deps.parent())
            .expect("test executable lives in target/<profile>/deps");
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = std::process::Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", "workfarm-worker"])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if release {
            cmd.arg("--release");
        }
        if let Some(target) = profile_dir.parent() {
            cmd.env("CARGO_TARGET_DIR", target);
        }
        let status = cmd.status().expect("run cargo build for the worker");
        assert!(status.success(), "building workfarm-worker failed");
        profile_dir.join("workfarm-worker")
    })
    .clone()
}

/// Farm options for the reference worker with `n` workers.
pub fn options(n: usize) -> FarmOptions {
    trace_init();
    FarmOptions::new(worker_bin()).workers(n)
}

/// Generous bound for anything that should happen "soon".
pub const SOON: Duration = Duration::from_secs(20);

/// Waits for the first event matching `pred`, failing the test after `within`.
pub async fn wait_for_event(
    events: &mut broadcast::Receiver<Event>,
    within: Duration,
    mut pred: impl FnMut(&Event) -> bool,
) -> Event {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(event)) if pred(&event) => return event,
            Ok(Ok(_)) => {}
            Ok(Err(broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(broadcast::error::RecvError::Closed)) => panic!("event stream closed"),
            Err(_) => panic!("no matching event within {within:?}"),
        }
    }
}

/// Collects events matching `pred` until `count` have arrived.
pub async fn collect_events(
    events: &mut broadcast::Receiver<Event>,
    count: usize,
    within: Duration,
    mut pred: impl FnMut(&Event) -> bool,
) -> Vec<Event> {
    let mut out = Vec::new();
    while out.len() < count {
        out.push(wait_for_event(events, within, &mut pred).await);
    }
    out
}

/// `/proc/<pid>/stat`'s state letter (`'Z'` for a zombie), if the process exists.
pub fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Whether a process with this pid exists (and is not a zombie).
pub fn process_alive(pid: u32) -> bool {
    process_state(pid).is_some_and(|state| state != 'Z')
}

/// Waits until `pid` is gone, failing the test after `within`.
pub async fn wait_gone(pid: u32, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    while process_alive(pid) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "process {pid} still alive after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls the farm's status until `pred` holds, failing the test after `within`.
pub async fn wait_status<S: workfarm::serializer::Serializer>(
    farm: &Farm<S>,
    within: Duration,
    mut pred: impl FnMut(&Status) -> bool,
) -> Status {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let status = farm.status().await;
        if pred(&status) {
            return status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "status condition not met within {within:?}: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A fresh path for a counter file (the worker's `stubborn` and `slow_once` methods),
/// unique to this test run; the file is removed when the value is dropped.
pub fn counter_file(tag: &str) -> TempFile {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    TempFile(std::env::temp_dir().join(format!("workfarm-{tag}-{}-{nanos}", std::process::id())))
}

/// A path in the temporary directory whose file is removed on drop.
#[derive(Debug)]
pub struct TempFile(PathBuf);

impl std::ops::Deref for TempFile {
    type Target = std::path::Path;

    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl AsRef<std::path::Path> for TempFile {
    fn as_ref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Every event already received, without waiting; fails the test if the receiver lagged
/// (an event the test may need was lost).
pub fn drain(events: &mut broadcast::Receiver<Event>) -> Vec<Event> {
    let mut out = Vec::new();
    loop {
        match events.try_recv() {
            Ok(event) => out.push(event),
            Err(broadcast::error::TryRecvError::Lagged(n)) => {
                panic!("event receiver lagged by {n}")
            }
            Err(_) => return out,
        }
    }
}

/// The pids of the `Spawned` events among `events`.
pub fn spawned_pids(events: &[Event]) -> Vec<u32> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Spawned { pid, .. } => Some(*pid),
            _ => None,
        })
        .collect()
}

/// Waits until the farm has exactly `n` workers, all online; fails the test after [`SOON`].
pub async fn all_online<S: workfarm::serializer::Serializer>(farm: &Farm<S>, n: usize) -> Status {
    wait_status(farm, SOON, |s| {
        s.workers.len() == n && s.workers.iter().all(|w| w.state == WorkerState::Online)
    })
    .await
}
