//! Pipelining is on by default (sync calls wait inside a busy worker instead of paying a
//! round trip each), and must stay safe: a call waiting behind a hung or long call is taken
//! back and run elsewhere, a call is never run twice, and one whose caller has gone never
//! runs. Against real worker processes.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};
use support::*;
use tokio::time::timeout;
use workfarm::Farm;

/// How many times each tag was logged by the worker's `log_run`.
fn runs(path: &std::path::Path) -> HashMap<u64, usize> {
    let mut runs = HashMap::new();
    let text = std::fs::read_to_string(path).unwrap_or_default();
    for line in text.lines() {
        *runs
            .entry(line.parse().expect("a tag per line"))
            .or_default() += 1;
    }
    runs
}

/// Calls pipelined behind a call that blocks for 5 s are answered by the other worker
/// long before it ends, at the defaults and with an explicit deep window.
#[tokio::test(flavor = "multi_thread")]
async fn calls_waiting_behind_a_hung_call_move_to_a_free_worker() {
    for window in [None, Some(32)] {
        let mut options = options(2);
        if let Some(n) = window {
            options = options.max_concurrent_calls_per_worker(n);
        }
        let farm = Farm::create(options).unwrap();
        all_online(&farm, 2).await;
        let hung = tokio::spawn(farm.run_method::<_, u32>("block", 5000u64));
        wait_status(&farm, SOON, |s| s.in_flight() == 1).await;
        let started = Instant::now();
        // Handed out in one turn: about half go behind the blocked call.
        let calls: Vec<_> = (0..40i64)
            .map(|i| farm.run_method::<_, i64>("noop", i))
            .collect();
        for (i, call) in calls.into_iter().enumerate() {
            assert_eq!(call.await, Ok(i as i64), "window {window:?}");
        }
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(2500),
            "window {window:?}: the calls waited for the hung one ({took:?})"
        );
        assert!(!hung.is_finished(), "the blocked call is still running");
        farm.kill().await;
    }
}

/// With one worker there is nowhere else to go: calls given back by a stalled worker wait
/// in the farm and run, each once, when it is free again.
#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_single_worker_still_runs_every_call_once() {
    let log = counter_file("stalled-once");
    let farm = Farm::create(options(1)).unwrap();
    all_online(&farm, 1).await;
    let busy = farm.run_method::<_, u32>("block", 300u64);
    let path = log.display().to_string();
    let calls: Vec<_> = (0..30u64)
        .map(|tag| farm.run_method::<_, u64>("log_run", (path.clone(), tag)))
        .collect();
    // Behind the blocked call they wait inside the worker, and are given back.
    wait_status(&farm, SOON, |s| s.queued > 0).await;
    busy.await.unwrap();
    for (tag, call) in calls.into_iter().enumerate() {
        assert_eq!(timeout(SOON, call).await.unwrap(), Ok(tag as u64));
    }
    let runs = runs(&log);
    assert_eq!(runs.len(), 30);
    assert!(runs.values().all(|&n| n == 1), "{runs:?}");
    farm.shutdown().await;
    let _ = std::fs::remove_file(&log);
}

/// Many withdrawals, stalls and steals (short calls mixed with 15 ms ones on two workers):
/// every call is answered with its own result and ran exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn withdrawals_never_run_a_call_twice() {
    let log = counter_file("withdraw-once");
    let path = log.display().to_string();
    let farm = Farm::create(options(2)).unwrap();
    all_online(&farm, 2).await;
    let mut calls = Vec::new();
    for tag in 0..400u64 {
        if tag % 20 == 0 {
            calls.push((
                None,
                farm.run_method::<_, u64>("log_run", (path.clone(), tag)),
            ));
            let slow = farm.run_method::<_, u32>("block", 15u64);
            calls.push((
                Some(slow),
                farm.run_method::<_, u64>("log_run", (path.clone(), tag + 1000)),
            ));
        } else {
            calls.push((
                None,
                farm.run_method::<_, u64>("log_run", (path.clone(), tag)),
            ));
        }
    }
    let mut tags = Vec::new();
    for (slow, call) in calls {
        tags.push(timeout(SOON, call).await.unwrap().unwrap());
        if let Some(slow) = slow {
            timeout(SOON, slow).await.unwrap().unwrap();
        }
    }
    let runs = runs(&log);
    assert_eq!(runs.len(), tags.len());
    for tag in tags {
        assert_eq!(runs.get(&tag), Some(&1), "tag {tag}");
    }
    let status = farm.status().await;
    assert_eq!(status.workers.iter().map(|w| w.handed).sum::<u64>(), 440);
    farm.shutdown().await;
    let _ = std::fs::remove_file(&log);
}
