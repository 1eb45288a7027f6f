//! The blocking API from a program with no async runtime of its own: plain threads share
//! one `workfarm::blocking::Farm`, whose workers are this same executable.
//!
//! ```text
//! cargo run --release --example blocking
//! ```

use std::time::Duration;
use workfarm::blocking::Farm;
use workfarm::worker::Worker;
use workfarm::{CallError, FarmOptions};

/// How many primes are below `n` (a sieve): real work for a worker.
fn primes_below(n: usize) -> usize {
    let mut composite = vec![false; n];
    let mut count = 0;
    for i in 2..n {
        if !composite[i] {
            count += 1;
            for j in (i * i..n).step_by(i) {
                composite[j] = true;
            }
        }
    }
    count
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    Worker::new()
        .method("primes_below", primes_below)
        .method("nap", |ms: u64| {
            std::thread::sleep(Duration::from_millis(ms))
        })
        .serve_if_worker();

    let farm = Farm::create(FarmOptions::current_exe().workers(num_cpus::get()))?;
    farm.ready()?;

    // One call, blocking until its result is in.
    let below_a_million: usize = farm.run_method("primes_below", 1_000_000usize)?;
    println!("primes below 1,000,000: {below_a_million}");

    // A map is an iterator: results in input order, calls in flight ahead of it.
    for (n, count) in [10usize, 100, 1_000, 10_000, 100_000]
        .into_iter()
        .zip(farm.map::<_, _, usize>("primes_below", [10usize, 100, 1_000, 10_000, 100_000]))
    {
        println!("primes below {n:>7}: {}", count?);
    }

    // Plain threads share the farm.
    let threads: Vec<_> = (1..=4usize)
        .map(|t| {
            let farm = farm.clone();
            std::thread::spawn(move || farm.run_method::<_, usize>("primes_below", t * 250_000))
        })
        .collect();
    for (t, thread) in threads.into_iter().enumerate() {
        let count = thread.join().map_err(|_| "thread panicked")??;
        println!(
            "thread {}: primes below {:>9}: {count}",
            t + 1,
            (t + 1) * 250_000
        );
    }

    // Per-call options work the same: this one may not take longer than 100 ms.
    match farm
        .call::<_, ()>("nap", 5_000u64)
        .timeout(Duration::from_millis(100))
        .retries(0)
        .run()
    {
        Err(CallError::Timeout { after }) => println!("the long nap timed out after {after:?}"),
        other => println!("unexpected: {other:?}"),
    }

    farm.shutdown();
    Ok(())
}
