//! The worker's standard streams and process settings: output from handlers never corrupts the
//! frame stream, and the arguments, environment and working directory set in `FarmOptions`
//! reach the worker.

mod support;

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use support::*;
use workfarm::{Farm, FarmOptions};

/// What the worker's `info` method reports.
#[derive(Debug, Deserialize)]
struct Info {
    pid: u32,
    args: Vec<String>,
    cwd: String,
    env: BTreeMap<String, String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_output_does_not_corrupt_results() {
    // Far more than a pipe buffer (64 KiB) per call, on stdout and stderr each (it all ends
    // up on the test's stderr, so not more than that).
    const CHATTY: usize = 256 * 1024;
    let farm = Farm::create(options(2).stderr(workfarm::StderrMode::Discard)).unwrap();
    let mut calls = Vec::new();
    for i in 0..40u32 {
        let echo = farm.run_method::<_, (u32, String)>("echo", (i, format!("value {i}")));
        let chatty = (i % 10 == 0).then(|| farm.run_method::<_, usize>("chatty", CHATTY));
        calls.push((i, echo, chatty));
    }
    for (i, echo, chatty) in calls {
        let (n, s) = tokio::time::timeout(SOON, echo)
            .await
            .expect("echo timed out")
            .expect("echo failed");
        assert_eq!((n, s), (i, format!("value {i}")));
        if let Some(chatty) = chatty {
            let written = tokio::time::timeout(SOON, chatty)
                .await
                .expect("chatty timed out")
                .expect("chatty failed");
            assert_eq!(written, CHATTY);
        }
    }
    // No worker was lost to a garbled stream.
    let status = farm.status().await;
    assert_eq!(status.workers.len(), 2);
    assert!(status
        .workers
        .iter()
        .all(|w| w.state == workfarm::WorkerState::Online));
    assert_eq!(status.workers.iter().map(|w| w.handed).sum::<u64>(), 44);
    farm.shutdown().await;
}

#[tokio::test]
async fn chatty_call_in_flight_with_async_calls_on_the_same_worker() {
    let farm = Farm::create(options(1).stderr(workfarm::StderrMode::Discard)).unwrap();
    let sleepers: Vec<_> = (0..5)
        .map(|_| farm.run_method::<_, u32>("sleep", 100u64))
        .collect();
    let chatty = farm.run_method::<_, usize>("chatty", 256 * 1024);
    let big = farm.run_method::<_, String>("big", 300_000usize);
    assert_eq!(chatty.await.unwrap(), 256 * 1024);
    let big = big.await.unwrap();
    assert_eq!(big.len(), 300_000);
    assert!(big.bytes().all(|b| b == b'y'));
    let mut pids = Vec::new();
    for s in sleepers {
        pids.push(s.await.unwrap());
    }
    assert!(pids.windows(2).all(|w| w[0] == w[1]));
    farm.shutdown().await;
}

/// The worker knows it is one; a process it starts (inheriting its environment, with the
/// worker's stdin or a pipe of its own) does not mistake itself for a worker.
#[tokio::test]
async fn a_workers_children_are_not_workers() {
    let farm = Farm::create(options(1)).unwrap();
    assert!(farm.run_method::<_, bool>("is_worker", ()).await.unwrap());
    for piped in [false, true] {
        let child: bool = farm.run_method("child_is_worker", piped).await.unwrap();
        assert!(
            !child,
            "a child (stdin piped: {piped}) thinks it is a worker"
        );
    }
    assert!(!workfarm::worker::Worker::is_worker(), "nor is the test");
    farm.shutdown().await;
}

/// A sync handler that builds a runtime of its own and blocks on it (what
/// `reqwest::blocking` and many SDKs do inside) works: sync handlers never run inside the
/// worker's runtime, also once async calls have started it, and on a worker with threads.
#[tokio::test]
async fn a_sync_handler_may_build_and_block_on_its_own_runtime() {
    for threads in ["1", "3"] {
        let farm = Farm::create(options(1).env("WORKER_THREADS", threads)).unwrap();
        assert_eq!(
            farm.run_method::<_, u32>("own_runtime", ()).await.unwrap(),
            7
        );
        // Starts the worker's async runtime.
        farm.run_method::<_, u32>("sleep", 1u64).await.unwrap();
        assert_eq!(
            farm.run_method::<_, u32>("own_runtime", ()).await.unwrap(),
            7
        );
        farm.shutdown().await;
    }
}

/// A worker's frame pipes keep the kernel's default size (64 KiB) until a large frame
/// crosses them, so a big farm does not eat the user's pipe quota; one that carries a
/// 1 MiB argument grows, and only that one.
/// Pipes start at the kernel's default. A 1 MiB argument travels through the worker's
/// shared ring, so no pipe grows; one over half the ring (32 MiB) takes the pipe, and that
/// worker's input pipe grows for it.
#[tokio::test]
async fn pipes_grow_only_for_large_frames() {
    const DEFAULT: usize = 64 * 1024;
    let options = options(8)
        .max_concurrent_calls_per_worker(1)
        .serializer(workfarm::serializer::Cbor);
    let farm = Farm::create(options).unwrap();
    let input_sizes = || async {
        let sizes = farm
            .broadcast_method::<_, (usize, usize)>("pipe_sizes", ())
            .await;
        assert_eq!(sizes.successes.len(), 8, "{:?}", sizes.failures);
        for (worker, (input, output)) in &sizes.successes {
            assert!(*input > 0 && *output > 0, "{worker}: found both pipes");
        }
        sizes
            .successes
            .iter()
            .map(|(_, (input, output))| (*input, *output))
            .collect::<Vec<_>>()
    };
    let at_start = input_sizes().await;
    assert!(at_start.iter().all(|&(i, o)| i <= DEFAULT && o <= DEFAULT));

    let bytes = serde_bytes::ByteBuf::from(vec![7u8; 1 << 20]);
    let back: serde_bytes::ByteBuf = farm.run_method("bytes", &bytes).await.unwrap();
    assert_eq!(back, bytes);
    let shared = cfg!(target_os = "linux");
    let sizes = input_sizes().await;
    let grown = sizes.iter().filter(|&&(i, _)| i > DEFAULT).count();
    assert_eq!(
        grown,
        usize::from(!shared),
        "1 MiB: shared memory, where there is any"
    );

    let bytes = serde_bytes::ByteBuf::from(vec![9u8; 17 << 20]);
    let back: serde_bytes::ByteBuf = farm.run_method("bytes", &bytes).await.unwrap();
    assert_eq!(back, bytes);
    let sizes = input_sizes().await;
    let grown = sizes.iter().filter(|&&(i, _)| i > DEFAULT).count();
    let expected = if shared { 1..=1 } else { 1..=2 };
    assert!(
        expected.contains(&grown),
        "17 MiB takes the pipe: {sizes:?}"
    );
    farm.shutdown().await;
}

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("workfarm-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.canonicalize().unwrap()
}

#[tokio::test]
async fn info_reports_env_cwd_and_args() {
    let dir = scratch_dir("stdio-cwd");
    let farm = Farm::create(
        options(1)
            .env("WORKFARM_TEST_VAR", "hello world")
            .env("WORKFARM_TEST_EMPTY", "")
            .current_dir(&dir)
            .arg("--alpha")
            .args(["beta", "gamma with space"]),
    )
    .unwrap();
    let info: Info = farm.run_method("info", ()).await.unwrap();
    assert_eq!(&info.args[1..], ["--alpha", "beta", "gamma with space"]);
    assert!(
        info.args[0].ends_with("workfarm-worker"),
        "{:?}",
        info.args[0]
    );
    assert_eq!(PathBuf::from(&info.cwd), dir);
    assert_eq!(
        info.env.get("WORKFARM_TEST_VAR").map(String::as_str),
        Some("hello world")
    );
    assert_eq!(
        info.env.get("WORKFARM_TEST_EMPTY").map(String::as_str),
        Some("")
    );
    // The farm's markers stay in the environment (the worker never mutates it); what makes
    // a process a worker is that the marker names its stdin (see the test below).
    assert!(info.env.contains_key("WORKFARM_WORKER"));
    // The parent's environment is inherited.
    if let Ok(path) = std::env::var("PATH") {
        assert_eq!(info.env.get("PATH"), Some(&path));
    }
    let pid: u32 = farm.run_method("pid", ()).await.unwrap();
    assert_eq!(info.pid, pid);
    farm.shutdown().await;
    let _ = std::fs::remove_dir(&dir);
}

#[tokio::test]
async fn defaults_are_the_parent_cwd_and_no_args() {
    let farm = Farm::create(options(1)).unwrap();
    let info: Info = farm.run_method("info", ()).await.unwrap();
    assert_eq!(info.args.len(), 1, "{:?}", info.args);
    assert_eq!(
        PathBuf::from(&info.cwd),
        std::env::current_dir().unwrap().canonicalize().unwrap()
    );
    assert!(!info.env.contains_key("WORKFARM_TEST_VAR"));
    farm.shutdown().await;
}

#[tokio::test]
async fn every_worker_and_every_replacement_gets_the_settings() {
    let dir = scratch_dir("stdio-replacement");
    let farm = Farm::create(
        FarmOptions::new(worker_bin())
            .workers(2)
            .ttl(1)
            .env("WORKFARM_TEST_VAR", "again")
            .current_dir(&dir)
            .arg("--flag"),
    )
    .unwrap();
    // ttl(1): each call lands on a fresh worker.
    let mut pids = Vec::new();
    for _ in 0..4 {
        let info: Info = farm.run_method("info", ()).await.unwrap();
        assert_eq!(&info.args[1..], ["--flag"]);
        assert_eq!(PathBuf::from(&info.cwd), dir);
        assert_eq!(
            info.env.get("WORKFARM_TEST_VAR").map(String::as_str),
            Some("again")
        );
        pids.push(info.pid);
    }
    pids.sort_unstable();
    pids.dedup();
    assert_eq!(pids.len(), 4, "a new worker for every call");
    // Broadcast reaches the current workers, which have the settings too.
    let infos = farm.broadcast_method::<_, Info>("info", ()).await;
    assert!(infos.failures.is_empty(), "{:?}", infos.failures);
    assert!(infos.successes.iter().all(|(_, i)| i
        .env
        .get("WORKFARM_TEST_VAR")
        .map(String::as_str)
        == Some("again")));
    farm.shutdown().await;
    let _ = std::fs::remove_dir(&dir);
}

/// `StderrMode::Log` turns each stderr line into a tracing event; `Discard` drops them; both
/// still keep the last lines for start-failure reports.
mod stderr_modes {
    use super::support::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};
    use workfarm::{CallError, Farm, StderrMode};

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn log_mode_turns_lines_into_tracing_events() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let farm = Farm::create(
            workfarm::FarmOptions::new(worker_bin())
                .workers(1)
                .stderr(StderrMode::Log),
        )
        .unwrap();
        let n: usize = farm.run_method("chatty", 300usize).await.unwrap();
        assert_eq!(n, 300);
        let pid: u32 = farm.run_method("pid", ()).await.unwrap();
        farm.shutdown().await;
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let worker_lines = text
            .lines()
            .filter(|l| l.contains("workfarm::worker") && l.contains(&"x".repeat(99)))
            .count();
        // chatty(300) prints 3 lines to stdout (redirected to stderr) and 3 to stderr.
        assert_eq!(worker_lines, 6, "{text}");
        // Each names its worker: number, slot and pid.
        let pid = format!("pid={pid}");
        assert!(
            text.lines()
                .filter(|l| l.contains("workfarm::worker"))
                .all(|l| l.contains("worker=1") && l.contains("slot=0") && l.contains(&pid)),
            "{text}"
        );
    }

    #[tokio::test]
    async fn discard_mode_still_reports_the_last_lines_on_start_failure() {
        let farm = Farm::create(
            options(1)
                .stderr(StderrMode::Discard)
                .env("WORKER_EXIT_AT_START", "5"),
        )
        .unwrap();
        let err = tokio::time::timeout(SOON, farm.run_method::<_, i64>("noop", 1))
            .await
            .expect("settles")
            .unwrap_err();
        match err {
            CallError::WorkerStart { message } => {
                assert!(message.contains("exiting at start as asked"), "{message}")
            }
            other => panic!("expected WorkerStart, got {other:?}"),
        }
        farm.kill().await;
    }
}
