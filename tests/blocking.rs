//! `workfarm::blocking::Farm` from plain threads, no runtime of the caller's: the same
//! calls, maps as iterators, and a drop that leaves no worker behind.

mod support;

use std::time::{Duration, Instant};
use support::*;
use workfarm::blocking::Farm;
use workfarm::CallError;

fn pids(farm: &Farm) -> Vec<u32> {
    farm.status().workers.iter().map(|w| w.pid).collect()
}

fn wait_gone_blocking(pid: u32) {
    let deadline = Instant::now() + SOON;
    while process_alive(pid) {
        assert!(Instant::now() < deadline, "worker {pid} outlived its farm");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn calls_run_without_a_runtime_of_the_caller_s() {
    let farm = Farm::create(options(2)).unwrap();
    farm.ready().unwrap();
    assert_eq!(farm.run_method::<_, i64>("add", (2, 3)), Ok(5));
    assert_eq!(
        farm.call::<_, u32>("block", 5_000u64)
            .timeout(Duration::from_millis(200))
            .retries(0)
            .run(),
        Err(CallError::Timeout {
            after: Duration::from_millis(200)
        })
    );
    let (value, info) = farm.call::<_, i64>("noop", 9).run_with_info().unwrap();
    assert_eq!(value, 9);
    assert_eq!(info.attempts, 1);
    let all = farm.broadcast_method::<_, u32>("pid", ());
    assert_eq!(all.successes.len(), 2);
    farm.shutdown();
}

#[test]
fn map_is_an_iterator_in_input_order() {
    let farm = Farm::create(options(2)).unwrap();
    let out: Vec<i64> = farm
        .map::<_, _, i64>("noop", 0..2_000i64)
        .map(Result::unwrap)
        .collect();
    assert_eq!(out, (0..2_000).collect::<Vec<_>>());
    let mut unordered: Vec<usize> = farm
        .map_unordered::<_, _, i64>("noop", 0..100i64)
        .map(|(i, r)| {
            assert_eq!(r.unwrap(), i as i64);
            i
        })
        .collect();
    unordered.sort();
    assert_eq!(unordered, (0..100).collect::<Vec<_>>());
    farm.shutdown();
}

#[test]
fn threads_share_one_farm() {
    let farm = Farm::create(options(2)).unwrap();
    let threads: Vec<_> = (0..8i64)
        .map(|t| {
            let farm = farm.clone();
            std::thread::spawn(move || {
                for i in 0..200 {
                    assert_eq!(farm.run_method::<_, i64>("add", (t, i)), Ok(t + i));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    farm.shutdown();
}

#[test]
fn dropping_the_last_handle_stops_every_worker() {
    let farm = Farm::create(options(2)).unwrap();
    farm.ready().unwrap();
    let workers = pids(&farm);
    assert_eq!(workers.len(), 2);
    let clone = farm.clone();
    drop(farm);
    assert_eq!(
        clone.run_method::<_, i64>("noop", 1),
        Ok(1),
        "a clone keeps it"
    );
    drop(clone);
    // The drop returned once the workers were gone: already reaped.
    for pid in workers {
        wait_gone_blocking(pid);
    }
}

#[test]
fn a_missing_worker_binary_is_a_typed_error() {
    let err = Farm::create(workfarm::FarmOptions::new("/nonexistent/worker")).unwrap_err();
    assert!(
        matches!(err, workfarm::CreateError::WorkerNotFound { .. }),
        "{err:?}"
    );
}
