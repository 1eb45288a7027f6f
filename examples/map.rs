//! Maps a function over 100,000 inputs on a farm whose workers are this same executable,
//! with a progress line: `Farm::map` keeps a bounded number of calls in flight and pulls
//! the next input only as results come back, so the input could as well be endless.
//!
//! ```text
//! cargo run --release --example map                # 100,000 inputs, chunks of 100
//! cargo run --release --example map -- 1000000 500 # a million inputs, chunks of 500
//! cargo run --release --example map -- 100000 1    # one call per input
//! ```

use futures_util::StreamExt;
use std::io::Write;
use std::time::Instant;
use workfarm::worker::Worker;
use workfarm::{Farm, FarmOptions};

/// Steps of the Collatz sequence from `n` down to 1: cheap, uneven work.
fn collatz_steps(mut n: u64) -> u32 {
    let mut steps = 0;
    while n > 1 {
        n = if n % 2 == 0 { n / 2 } else { 3 * n + 1 };
        steps += 1;
    }
    steps
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    Worker::new()
        .method("collatz", collatz_steps)
        .serve_if_worker();

    let mut args = std::env::args().skip(1);
    let inputs: u64 = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(100_000);
    let chunk_size: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(100);
    let workers = num_cpus::get();
    let farm = Farm::create(FarmOptions::current_exe().workers(workers))?;
    farm.ready().await?;

    let start = Instant::now();
    let mut results = farm
        .map::<_, _, u32>("collatz", 1..=inputs)
        .chunk_size(chunk_size);
    let (mut done, mut longest, mut longest_at) = (0u64, 0u32, 0u64);
    let mut out = std::io::stdout();
    while let Some(steps) = results.next().await {
        let steps = steps?;
        done += 1;
        if steps > longest {
            (longest, longest_at) = (steps, done);
        }
        if done % 10_000 == 0 || done == inputs {
            write!(out, "\r{done:>9} / {inputs} done")?;
            out.flush()?;
        }
    }
    let took = start.elapsed();
    println!();
    println!("longest: {longest} steps, from {longest_at}");
    println!(
        "{inputs} inputs on {workers} workers, chunks of {chunk_size}: {:.0} ms, {:.0} inputs/s",
        took.as_secs_f64() * 1e3,
        inputs as f64 / took.as_secs_f64()
    );
    farm.shutdown().await;
    Ok(())
}
