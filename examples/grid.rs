//! The π example across machines: the same worker code, served by `workfarm-node`s
//! through Redis, and a caller that uses the `Farm` API as on one machine.
//!
//! ```text
//! redis-server --port 6379 --save '' --appendonly no &
//! cargo build --release --features redis --example grid --bin workfarm-node
//! target/release/workfarm-node --redis redis://127.0.0.1:6379 --farm pi --workers 2 -- target/release/examples/grid &
//! target/release/workfarm-node --redis redis://127.0.0.1:6379 --farm pi --workers 2 -- target/release/examples/grid &
//! target/release/examples/grid redis://127.0.0.1:6379        # 16 chunks of 5,000,000 draws
//! ```
//!
//! Started by a node, this program is a worker (`serve_if_worker`); started by hand, it is
//! the caller.

use std::time::Instant;
use workfarm::remote::RemoteOptions;
use workfarm::worker::Worker;
use workfarm::Farm;

/// Draws `n` points with xorshift32 from `seed`; returns how many fell inside the quarter
/// circle.
fn count_inside(n: u64, seed: u32) -> u64 {
    let mut s = seed;
    let mut step = move || {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        f64::from(s) / 4_294_967_296.0
    };
    (0..n)
        .filter(|_| {
            let (x, y) = (step(), step());
            x * x + y * y <= 1.0
        })
        .count() as u64
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    Worker::new()
        .method("pi", |(n, seed): (u64, u32)| count_inside(n, seed))
        .serve_if_worker();

    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned());
    let chunks: u32 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(16);
    let per_chunk: u64 = 5_000_000;
    let farm = Farm::connect(RemoteOptions::new(url, "pi")).await?;
    farm.ready().await?;
    let started = Instant::now();
    let calls: Vec<_> = (0..chunks)
        .map(|k| farm.run_method::<_, u64>("pi", (per_chunk, 2_463_534_242u32.wrapping_add(k))))
        .collect();
    let mut inside = 0;
    for call in calls {
        inside += call.await?;
    }
    let draws = u64::from(chunks) * per_chunk;
    let estimate = 4.0 * inside as f64 / draws as f64;
    println!(
        "{chunks} chunks of {per_chunk} draws across the nodes: pi ≈ {estimate:.7}, off by {:.7}, in {:.1} ms",
        (estimate - std::f64::consts::PI).abs(),
        started.elapsed().as_secs_f64() * 1e3
    );
    farm.shutdown().await;
    Ok(())
}
