//! Shared memory leaves nothing behind: a worker's rings and slot table go with it,
//! and after shutdown the farm's process holds no ring, open or mapped. Alone in its test
//! binary, since it counts what the whole process holds.

#![cfg(target_os = "linux")]

mod support;

use serde_bytes::ByteBuf;
use std::time::Duration;
use support::*;
use workfarm::serializer::Cbor;
use workfarm::Farm;

/// Rings this process has open, and has mapped.
fn rings_held() -> (usize, usize) {
    let open = std::fs::read_dir("/proc/self/fd")
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter(|target| target.to_string_lossy().contains("memfd:workfarm"))
                .count()
        })
        .unwrap_or(0);
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mapped = maps
        .lines()
        .filter(|l| l.contains("memfd:workfarm"))
        .count();
    (open, mapped)
}

async fn wait_rings(want: (usize, usize)) {
    let deadline = tokio::time::Instant::now() + SOON;
    while rings_held() != want {
        assert!(
            tokio::time::Instant::now() < deadline,
            "rings held: {:?}, want {want:?}",
            rings_held()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn rings_go_with_their_workers_and_their_farm() {
    assert_eq!(rings_held(), (0, 0));
    let farm = Farm::create(options(2).serializer(Cbor)).unwrap();
    let status = all_online(&farm, 2).await;
    assert_eq!(
        rings_held(),
        (6, 6),
        "two rings and a slot table per worker"
    );

    // A worker killed while it holds large calls: its calls run again elsewhere, intact.
    let big = ByteBuf::from(vec![5u8; 1 << 20]);
    let calls: Vec<_> = (0..16)
        .map(|_| farm.run_method::<_, ByteBuf>("bytes", &big))
        .collect();
    let victim = status.workers[0].pid;
    let _ = std::process::Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status();
    for call in calls {
        assert!(tokio::time::timeout(SOON, call).await.unwrap().unwrap() == big);
    }
    all_online(&farm, 2).await;
    wait_rings((6, 6)).await;

    farm.shutdown().await;
    wait_rings((0, 0)).await;
}
