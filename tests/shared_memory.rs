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

/// Results nobody has decoded yet hold their regions of the worker's ring: 48 results of
/// 1 MiB fill it (32 MiB), and the rest take the pipe. All arrive intact.
#[tokio::test(flavor = "multi_thread")]
async fn results_take_the_pipe_when_the_ring_is_full() {
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
