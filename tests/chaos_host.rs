//! Chaos from outside any call: the farm's own process has a stderr nobody reads, dies with
//! grandchildren about, keeps `SIGPIPE` at its default, or forgot `serve_if_worker`. Each
//! test runs the farm in a separate parent process (`workfarm-worker --<scenario>`, see
//! `worker-bin/src/parent.rs`) and checks what a user would see from outside it.

mod support;

use std::process::Stdio;
use std::time::Duration;
use support::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};
use tokio::time::timeout;

type Lines = tokio::io::Lines<BufReader<ChildStdout>>;

/// Starts `workfarm-worker <args>` as a parent in a process group of its own (so the test
/// can clean up the whole tree), with its stdout piped.
fn start_parent(args: &[&str], stderr: Stdio) -> (Child, Lines) {
    let mut child = Command::new(worker_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the parent");
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    (child, lines)
}

async fn next_line(lines: &mut Lines, within: Duration) -> String {
    timeout(within, lines.next_line())
        .await
        .unwrap_or_else(|_| panic!("the parent printed nothing within {within:?}"))
        .unwrap()
        .expect("the parent's stdout ended")
}

/// Parses `key=<n>` out of a line like `settled ok=3 err=1`.
fn field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

fn kill9(pid: u32) {
    // SAFETY: kill(2) with integer arguments.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
}

/// SIGKILLs the process group a parent leads (its workers lead groups of their own).
fn kill_group(pgid: u32) {
    // SAFETY: kill(2) with integer arguments.
    unsafe { libc::kill(-(pgid as libc::pid_t), libc::SIGKILL) };
}

// ===== item 1: a stderr nobody reads =====

/// The parent's stderr is a pipe the test holds open and never reads, and its workers
/// write 40 MB to stderr while serving (on a current-thread runtime, the worst case): the
/// 200 calls, each with a 3 s timeout, all succeed, and the lines that did not fit are
/// reported as dropped.
#[tokio::test]
async fn a_stderr_nobody_reads_stalls_nothing() {
    let (mut child, mut lines) = start_parent(&["--stalled-stderr"], Stdio::piped());
    // Held, never read: the parent's writes to it block once its 64 KiB are full.
    let _stderr = child.stderr.take().unwrap();
    let line = next_line(&mut lines, Duration::from_secs(120)).await;
    assert!(line.starts_with("settled "), "{line}");
    assert_eq!(field(&line, "ok"), 200, "{line}");
    assert_eq!(field(&line, "err"), 0, "{line}");
    assert!(field(&line, "dropped") > 0, "the drops are counted: {line}");
    let status = timeout(SOON, child.wait())
        .await
        .expect("parent exits")
        .unwrap();
    assert!(status.success(), "{status:?}");
}

// ===== item 3: grandchildren when the parent dies =====

/// Each worker starts `sleep 1000`; the parent is SIGKILLed. Within 2 s neither the workers
/// nor the sleeps are alive. With `busy`, every worker is inside a long sync call when the
/// parent dies, so only the parent-death signal reaches it (it is not reading its stdin).
async fn grandchildren_die_with_the_parent(mode: &str) {
    let (mut child, mut lines) = start_parent(&["--grandchildren", "2", mode], Stdio::inherit());
    let pgid = child.id().unwrap();
    let mut tree = Vec::new();
    loop {
        let line = next_line(&mut lines, SOON).await;
        if line == "ready" {
            break;
        }
        let (_, pid) = line
            .split_once(' ')
            .expect("`worker <pid>` or `child <pid>`");
        tree.push(pid.parse::<u32>().unwrap());
    }
    assert_eq!(tree.len(), 4, "two workers and two sleeps: {tree:?}");
    for &pid in &tree {
        assert!(process_alive(pid), "{pid} alive while the parent runs");
    }
    kill9(pgid);
    let _ = timeout(SOON, child.wait()).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while tree.iter().any(|&pid| process_alive(pid)) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let alive: Vec<u32> = tree.iter().copied().filter(|&p| process_alive(p)).collect();
    for &pid in &alive {
        kill9(pid);
    }
    assert!(
        alive.is_empty(),
        "still alive 2 s after the parent died: {alive:?}"
    );
}

#[tokio::test]
async fn grandchildren_of_idle_workers_die_with_the_parent() {
    grandchildren_die_with_the_parent("idle").await;
}

#[tokio::test]
async fn grandchildren_of_busy_workers_die_with_the_parent() {
    grandchildren_die_with_the_parent("busy").await;
}

// ===== item 5: SIGPIPE at its default =====

/// The parent sets SIGPIPE to its default (as a C host would) and its worker stops reading
/// its stdin after the handshake: the parent lives, the call sent to the deaf worker fails
/// (no retries), and the later calls succeed on its replacement.
#[tokio::test]
async fn a_worker_that_closes_its_stdin_does_not_kill_a_host_with_default_sigpipe() {
    let (mut child, mut lines) = start_parent(&["--sigpipe"], Stdio::inherit());
    let pgid = child.id().unwrap();
    let line = timeout(SOON, lines.next_line()).await;
    let status = timeout(SOON, child.wait())
        .await
        .expect("parent exits")
        .unwrap();
    kill_group(pgid);
    assert!(status.success(), "the parent died: {status:?}");
    let line = line
        .unwrap()
        .unwrap()
        .expect("the parent printed its tally");
    assert_eq!(field(&line, "ok") + field(&line, "err"), 5, "{line}");
    assert!(
        field(&line, "err") >= 1,
        "the deaf worker's call failed: {line}"
    );
}

// ===== item 9: current_exe without serve_if_worker =====

/// A program that builds `FarmOptions::current_exe()` but never calls `serve_if_worker()`:
/// its workers stop at once, `ready()` says why, and no worker starts workers of its own.
#[tokio::test]
async fn current_exe_without_serve_if_worker_stops_after_one_generation() {
    let log = std::env::temp_dir().join(format!("workfarm-forgot-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let (mut child, mut lines) =
        start_parent(&["--forgot-serve", log.to_str().unwrap()], Stdio::null());
    let pgid = child.id().unwrap();
    let line = timeout(SOON, lines.next_line()).await;
    let _ = timeout(SOON, child.wait()).await;
    kill_group(pgid);
    let line = line.expect("ready() answered").unwrap().expect("a line");
    assert!(line.starts_with("refused "), "{line}");
    assert!(line.contains("serve_if_worker"), "{line}");
    let entries: Vec<(u32, u32)> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| {
            let (pid, ppid) = l.split_once(' ').unwrap();
            (pid.parse().unwrap(), ppid.parse().unwrap())
        })
        .collect();
    let _ = std::fs::remove_file(&log);
    // Should a generation have started another, leave nothing of it behind.
    for &(pid, _) in &entries {
        kill_group(pid);
        kill9(pid);
    }
    let parent = entries[0].0;
    assert_eq!(parent, pgid, "the first entry is the parent's");
    assert!(entries.len() >= 2, "workers were started: {entries:?}");
    for &(pid, ppid) in &entries[1..] {
        assert_eq!(ppid, parent, "{pid} was started by a worker: {entries:?}");
    }
}
