//! Workers that are not interchangeable: each holds its own access token to a rate-limited
//! API (the use case of disperse.js). A token allows a few requests per window; a worker
//! whose token is used up refuses with `Refuse::retry_after`, so the farm sends nothing to
//! its slot until the window refreshes and runs the call on another worker, uncharged.
//! One token is read-only, and its worker refuses writes outright (`Refuse::elsewhere`).
//!
//! ```text
//! cargo run --release --example quota            # 200 requests, 4 tokens
//! cargo run --release --example quota -- 1000
//! ```
//!
//! The program is its own worker (`serve_if_worker`); the "API" is simulated in the worker.

use serde::{Deserialize, Serialize};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use workfarm::worker::{Refuse, Worker};
use workfarm::{Farm, FarmOptions, PerWorker};

/// What each slot's worker is given at set-up: its token and what the token allows.
#[derive(Serialize, Deserialize, Clone)]
struct Token {
    name: String,
    /// Requests allowed per window.
    per_window: u32,
    window_ms: u64,
    read_only: bool,
}

/// The worker's client for the API: its token and the quota left in this window.
struct Client {
    token: Token,
    window: Mutex<(Instant, u32)>,
}

#[derive(Serialize, Deserialize)]
struct Request {
    id: u32,
    write: bool,
}

#[derive(Serialize, Deserialize, Debug)]
struct Response {
    id: u32,
    token: String,
}

impl Client {
    fn request(&self, req: Request) -> Result<Response, Refuse> {
        if req.write && self.token.read_only {
            return Err(Refuse::elsewhere().because("read-only token"));
        }
        let window = Duration::from_millis(self.token.window_ms);
        let mut used = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if used.0.elapsed() >= window {
            *used = (Instant::now(), 0);
        }
        if used.1 >= self.token.per_window {
            let left = window.saturating_sub(used.0.elapsed());
            return Err(Refuse::retry_after(left).because("quota used up"));
        }
        used.1 += 1;
        drop(used);
        std::thread::sleep(Duration::from_millis(5)); // the API call
        Ok(Response {
            id: req.id,
            token: self.token.name.clone(),
        })
    }
}

fn tokens() -> Vec<Token> {
    let token = |name: &str, per_window, read_only| Token {
        name: name.to_owned(),
        per_window,
        window_ms: 250,
        read_only,
    };
    vec![
        token("alice", 20, false),
        token("bob", 10, false),
        token("carol", 5, false),
        token("dave (read-only)", 20, true),
    ]
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    Worker::new()
        .setup(|token: Token| {
            Ok::<_, std::convert::Infallible>(Client {
                token,
                window: Mutex::new((Instant::now(), 0)),
            })
        })
        .try_method_with("request", |client: &Client, req: Request| {
            client.request(req)
        })
        .serve_if_worker();

    let n: u32 = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(200);
    let tokens = tokens();
    let slots = tokens.clone();
    let farm = Farm::create(
        FarmOptions::current_exe()
            .workers(tokens.len())
            // Refusals are not retries: a call refused by every token still succeeds once
            // a window refreshes.
            .max_retries(0)
            .per_worker(move |slot| PerWorker::new().setup_args(slots[slot].clone())),
    )?;
    farm.ready().await?;

    let started = Instant::now();
    let calls: Vec<_> = (0..n)
        .map(|id| {
            let write = id % 4 == 0;
            farm.call::<_, Response>("request", Request { id, write })
                .start()
        })
        .collect();
    let mut served = vec![0u32; tokens.len()];
    for call in calls {
        let (response, info) = call.with_info().await?;
        assert_eq!(response.token, tokens[info.worker.slot()].name);
        served[info.worker.slot()] += 1;
    }
    let took = started.elapsed();

    let stats = farm.stats().await;
    println!(
        "{n} requests in {:.2} s; a write every 4th",
        took.as_secs_f64()
    );
    println!(
        "{:<18} {:>6} {:>10} {:>9}",
        "token", "served", "quota/win", "refusals"
    );
    for (slot, token) in tokens.iter().enumerate() {
        println!(
            "{:<18} {:>6} {:>10} {:>9}",
            token.name, served[slot], token.per_window, stats.slots[slot].calls.refusals
        );
    }
    let c = stats.total.calls;
    println!(
        "succeeded {}, failed {}, retried {}, refusals {}; wait p50 {:?}, p99 {:?}",
        c.succeeded,
        c.failed,
        c.retried,
        c.refusals,
        stats.total.wait_time.p50,
        stats.total.wait_time.p99
    );
    farm.shutdown().await;
    Ok(())
}
