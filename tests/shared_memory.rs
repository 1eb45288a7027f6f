//! Large frames travel through the shared rings (Linux): intact both ways under load, with
//! the pipe taking over when a ring is full, and nothing left behind. Against real workers.

#![cfg(target_os = "linux")]

mod support;

use serde_bytes::ByteBuf;
use support::*;
use tokio::time::timeout;
use workfarm::serializer::{Cbor, Postcard};
use workfarm::Farm;

fn payload(seed: u32, len: usize) -> ByteBuf {
    let mut x = seed.wrapping_mul(2_654_435_761) | 1;
    ByteBuf::from(
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect::<Vec<u8>>(),
    )
}

/// Resident bytes of this process's mappings of shared ring `name` (`to-worker` or
/// `to-farm`), from `/proc/<pid>/smaps`.
fn ring_rss(pid: u32, name: &str) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut rss = 0;
    let mut inside = false;
    for line in smaps.lines() {
        if line.contains(" /memfd:")
            || line.contains("-") && line.contains(':') && !line.contains("kB")
        {
            inside = line.contains(&format!("memfd:workfarm-{name}"));
        } else if inside && line.starts_with("Rss:") {
            let kb: u64 = line
                .split_whitespace()
                .nth(1)
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            rss += kb * 1024;
        }
    }
    rss
}

/// 1 MiB arguments and results, each different, 60 calls on 2 workers at once: every
/// result is its own argument back, and both rings of the workers carry them.
#[tokio::test(flavor = "multi_thread")]
async fn large_arguments_and_results_come_back_intact() {
    let farm = Farm::create(options(2).serializer(Cbor)).unwrap();
    let status = all_online(&farm, 2).await;
    for w in &status.workers {
        assert_eq!(
            ring_rss(w.pid, "to-worker"),
            0,
            "nothing touched before a large frame"
        );
    }
    let sent: Vec<ByteBuf> = (0..60)
        .map(|i| payload(i, (1 << 20) + i as usize))
        .collect();
    let calls: Vec<_> = sent
        .iter()
        .map(|p| farm.run_method::<_, ByteBuf>("bytes", p))
        .collect();
    for (i, call) in calls.into_iter().enumerate() {
        let back = timeout(SOON, call).await.unwrap().unwrap();
        assert!(
            back == sent[i],
            "call {i}: the result differs from its argument"
        );
    }
    for w in &farm.status().await.workers {
        assert!(
            ring_rss(w.pid, "to-worker") >= 1 << 20,
            "worker {}: arguments through its ring",
            w.id
        );
        assert!(
            ring_rss(w.pid, "to-farm") >= 1 << 20,
            "worker {}: results through its ring",
            w.id
        );
    }
    farm.shutdown().await;
}

/// Results are copied out of the worker's ring as they arrive, so 48 results of 1 MiB
/// (more than the ring's 32 MiB) all arrive intact though none is decoded before the last
/// is in. (A full ring handing over to the pipe is tested in `shm`'s unit tests.)
#[tokio::test(flavor = "multi_thread")]
async fn results_decoded_late_arrive_intact() {
    let farm = Farm::create(options(1).serializer(Postcard)).unwrap();
    all_online(&farm, 1).await;
    let sent: Vec<ByteBuf> = (0..48).map(|i| payload(100 + i, 1 << 20)).collect();
    let calls: Vec<_> = sent
        .iter()
        .map(|p| farm.run_method::<_, ByteBuf>("bytes", p))
        .collect();
    // Every reply is in before any is decoded.
    wait_status(&farm, SOON, |s| s.in_flight() == 0 && s.queued == 0).await;
    for (i, call) in calls.into_iter().enumerate() {
        let back = timeout(SOON, call).await.unwrap().unwrap();
        assert!(
            back == sent[i],
            "call {i}: the result differs from its argument"
        );
    }
    // And the ring is usable again once they are.
    let again = payload(7, 1 << 20);
    let back: ByteBuf = farm.run_method("bytes", &again).await.unwrap();
    assert!(back == again);
    farm.shutdown().await;
}

/// The shared files are sealed at their size: a worker that tries to shrink them (which
/// would make the farm fault with SIGBUS on its next large frame) cannot, and the farm goes
/// on moving large frames.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_cannot_shrink_the_shared_memory() {
    let farm = Farm::create(options(1).serializer(Cbor)).unwrap();
    all_online(&farm, 1).await;
    let big = payload(1, 1 << 20);
    assert!(farm.run_method::<_, ByteBuf>("bytes", &big).await.unwrap() == big);
    let (open, shrunk): (usize, usize) = farm.run_method("shrink_rings", ()).await.unwrap();
    assert_eq!(open, 3, "the worker holds its two rings and its slot table");
    assert_eq!(shrunk, 0, "a shared memory file could be shrunk");
    for _ in 0..40 {
        assert!(farm.run_method::<_, ByteBuf>("bytes", &big).await.unwrap() == big);
    }
    farm.shutdown().await;
}

/// `max_memory` counts a worker's own memory, not the rings it shares with the farm: a worker
/// whose rings have 16 MiB touched stays under a 12 MiB limit.
#[tokio::test(flavor = "multi_thread")]
async fn shared_rings_do_not_count_against_max_memory() {
    let farm = Farm::create(options(1).serializer(Postcard).max_memory(12 << 20)).unwrap();
    let mut events = farm.events();
    let pid = all_online(&farm, 1).await.workers[0].pid;
    let sent: Vec<ByteBuf> = (0..30).map(|i| payload(200 + i, 1 << 20)).collect();
    let calls: Vec<_> = sent
        .iter()
        .map(|p| farm.run_method::<_, ByteBuf>("bytes", p))
        .collect();
    wait_status(&farm, SOON, |s| s.in_flight() == 0 && s.queued == 0).await;
    let shared = ring_rss(pid, "to-farm") + ring_rss(pid, "to-worker");
    assert!(
        shared > 12 << 20,
        "the rings hold {shared} bytes, over the limit"
    );
    // Memory is measured every 500 ms: three checks pass while the results stay held.
    tokio::time::sleep(std::time::Duration::from_millis(1600)).await;
    let recycled = drain(&mut events)
        .into_iter()
        .any(|e| matches!(e, workfarm::Event::MemoryLimitReached { .. }));
    assert!(
        !recycled,
        "a worker was recycled for memory it shares with the farm"
    );
    for (i, call) in calls.into_iter().enumerate() {
        assert!(
            timeout(SOON, call).await.unwrap().unwrap() == sent[i],
            "call {i}"
        );
    }
    farm.shutdown().await;
}
