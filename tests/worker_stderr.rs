//! `Farm::stderr(slot)`: the last lines of each slot's stderr, with the worker and pid that
//! wrote them, bounded, kept across a crash, in every `StderrMode`.

mod support;

use std::time::Duration;
use support::*;
use workfarm::{Farm, StderrLine, StderrMode};

/// Slot `slot`'s lines once `pred` holds (lines arrive as the farm reads them).
async fn lines_when(
    farm: &Farm,
    slot: usize,
    pred: impl Fn(&[StderrLine]) -> bool,
) -> Vec<StderrLine> {
    let deadline = tokio::time::Instant::now() + SOON;
    loop {
        let lines = farm.stderr(slot);
        if pred(&lines) {
            return lines;
        }
        assert!(tokio::time::Instant::now() < deadline, "{lines:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn texts(lines: &[StderrLine]) -> Vec<&str> {
    lines.iter().map(|l| l.line.as_str()).collect()
}

#[tokio::test]
async fn each_slot_keeps_its_own_lines_with_worker_and_pid() {
    let farm = Farm::create(options(2).stderr(StderrMode::Discard)).unwrap();
    all_online(&farm, 2).await;
    let said = farm
        .broadcast_method::<_, (Option<usize>, u32)>("stderr_lines", ("hello", 3))
        .await;
    assert_eq!(said.successes.len(), 2, "{:?}", said.failures);
    for (worker, (slot, pid)) in &said.successes {
        let slot = slot.expect("a farm's worker knows its slot");
        assert_eq!(slot, worker.slot());
        let lines = lines_when(&farm, slot, |l| l.len() >= 3).await;
        assert_eq!(texts(&lines), ["hello 0", "hello 1", "hello 2"]);
        assert!(lines.iter().all(|l| l.pid == *pid && l.worker == *worker));
    }
    assert!(farm.stderr(2).is_empty(), "no such slot");
    farm.shutdown().await;
}

#[tokio::test]
async fn only_the_last_lines_are_kept() {
    let farm = Farm::create(options(1).stderr(StderrMode::Discard).stderr_capture(5)).unwrap();
    let _: (Option<usize>, u32) = farm.run_method("stderr_lines", ("n", 20)).await.unwrap();
    let lines = lines_when(&farm, 0, |l| l.last().is_some_and(|l| l.line == "n 19")).await;
    assert_eq!(texts(&lines), ["n 15", "n 16", "n 17", "n 18", "n 19"]);
    farm.shutdown().await;
}

#[tokio::test]
async fn a_crashed_workers_lines_stay_and_its_replacement_adds_to_them() {
    let farm = Farm::create(options(1).max_retries(0)).unwrap();
    let (_, first): (Option<usize>, u32) = farm
        .run_method("stderr_lines", ("before", 2))
        .await
        .unwrap();
    farm.run_method::<_, ()>("exit", 3).await.unwrap_err();
    let (_, second): (Option<usize>, u32) =
        farm.run_method("stderr_lines", ("after", 1)).await.unwrap();
    assert_ne!(first, second, "the worker was replaced");
    let lines = lines_when(&farm, 0, |l| l.iter().any(|l| l.line == "after 0")).await;
    let old: Vec<_> = lines.iter().filter(|l| l.pid == first).collect();
    assert_eq!(
        old.iter().map(|l| l.line.as_str()).collect::<Vec<_>>(),
        ["before 0", "before 1"]
    );
    let new = lines.last().expect("the replacement's line");
    assert_eq!((new.pid, new.line.as_str()), (second, "after 0"));
    assert_eq!(new.worker.slot(), 0);
    assert_ne!(new.worker, old[0].worker);
    farm.shutdown().await;
}

#[tokio::test]
async fn forwarded_lines_are_captured_too_and_zero_keeps_none() {
    let farm = Farm::create(options(1)).unwrap();
    let _: (Option<usize>, u32) = farm.run_method("stderr_lines", ("fwd", 1)).await.unwrap();
    lines_when(&farm, 0, |l| texts(l) == ["fwd 0"]).await;
    farm.shutdown().await;

    // The farm stops only once it has read its workers' stderr to the end: after
    // `shutdown`, the lines are there (with the default), or not (with 0).
    for (keep, expected) in [(100, 3), (0, 0)] {
        let options = options(1).stderr(StderrMode::Discard).stderr_capture(keep);
        let farm = Farm::create(options).unwrap();
        let _: (Option<usize>, u32) = farm.run_method("stderr_lines", ("x", 3)).await.unwrap();
        farm.shutdown().await;
        assert_eq!(farm.stderr(0).len(), expected, "stderr_capture({keep})");
    }
}
