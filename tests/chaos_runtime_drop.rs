//! Chaos: the runtime shuts down under a live farm. Alone in its test binary, because any
//! other runtime in the process could reap the workers on tokio's behalf and hide a zombie.

mod support;

use std::time::{Duration, Instant};
use support::*;
use workfarm::Farm;

/// A farm is created and answers a call; then its runtime is dropped while the farm handle
/// is still held. Within 2 s every worker is killed and reaped: not even a zombie is left.
#[test]
fn dropping_the_runtime_under_a_live_farm_leaves_no_zombie() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (farm, pids) = runtime.block_on(async {
        let farm = Farm::create(options(2)).unwrap();
        let pids = farm.broadcast_method::<_, u32>("pid", ()).await;
        assert_eq!(pids.successes.len(), 2, "{:?}", pids.failures);
        let pids: Vec<u32> = pids.successes.into_iter().map(|(_, pid)| pid).collect();
        (farm, pids)
    });
    drop(runtime);
    let deadline = Instant::now() + Duration::from_secs(2);
    while pids.iter().any(|&pid| process_state(pid).is_some()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let left: Vec<(u32, char)> = pids
        .iter()
        .filter_map(|&pid| process_state(pid).map(|s| (pid, s)))
        .collect();
    assert!(
        left.is_empty(),
        "workers left 2 s after the runtime went: {left:?}"
    );
    drop(farm);
}
