//! Monte Carlo estimate of π, first in this process, then on a farm whose workers are this
//! same executable (as workestrator's pi example).
//!
//! ```text
//! cargo run --release --example pi            # 8 chunks of 5,000,000 draws
//! cargo run --release --example pi -- 16 10000000
//! ```
//!
//! The program is its own worker: `Worker::serve_if_worker` turns the process into a worker
//! when a farm started it, and returns at once otherwise. So the farm needs no separate
//! binary: `FarmOptions::current_exe()`.

use std::time::{Duration, Instant};
use workfarm::worker::Worker;
use workfarm::{Farm, FarmOptions};

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

fn report(label: &str, inside: u64, draws: u64, took: Duration) {
    let estimate = 4.0 * inside as f64 / draws as f64;
    println!(
        "{label:<22} pi ≈ {estimate:.7}  off by {:.7}  in {:>8.1} ms",
        (estimate - std::f64::consts::PI).abs(),
        took.as_secs_f64() * 1e3
    );
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    Worker::new()
        .method("pi", |(n, seed): (u64, u32)| count_inside(n, seed))
        .serve_if_worker();

    let mut args = std::env::args().skip(1);
    let chunks: u32 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(8);
    let per_chunk: u64 = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(5_000_000);
    let seeds: Vec<u32> = (0..chunks)
        .map(|k| 2_463_534_242u32.wrapping_add(k))
        .collect();
    let draws = u64::from(chunks) * per_chunk;
    println!("{chunks} chunks of {per_chunk} draws");

    let start = Instant::now();
    let inside: u64 = seeds
        .iter()
        .map(|&seed| count_inside(per_chunk, seed))
        .sum();
    let single = start.elapsed();
    report("one process:", inside, draws, single);

    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let workers = num_cpus::get();
        let farm = Farm::create(FarmOptions::current_exe().workers(workers))?;
        // Start-up is not what we measure: wait until every worker is online.
        farm.ready().await?;

        let start = Instant::now();
        let calls: Vec<_> = seeds
            .iter()
            .map(|&seed| farm.run_method::<_, u64>("pi", (per_chunk, seed)))
            .collect();
        let mut farmed = 0;
        for call in calls {
            farmed += call.await?;
        }
        let took = start.elapsed();
        report(&format!("farm of {workers} workers:"), farmed, draws, took);
        println!("speedup: {:.2}x", single.as_secs_f64() / took.as_secs_f64());
        if farmed != inside {
            return Err(format!("the farm counted {farmed}, one process counted {inside}").into());
        }
        farm.shutdown().await;
        Ok(())
    })
}
