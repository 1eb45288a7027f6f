//! Farms across machines: noop calls through a real `redis-server` (started here on a unix
//! socket) and two nodes of two workers each, in this process. Prints one JSON line per
//! metric, like `benches/farm.rs`.
//!
//! ```text
//! cargo bench --features redis --bench remote                 # 20,000 calls, default in-flight
//! cargo bench --features redis --bench remote -- 20000 64     # 64 calls in flight per node
//! (then `payload`: 100 calls of `sum` on 1 MiB of float64, JSON and Postcard)
//! REMOTE_BENCH_COMMANDSTATS=1 cargo bench ...               # and the engine's per-command costs
//! ```

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use workfarm::remote::{Node, NodeOptions, RemoteOptions};
use workfarm::serializer::{Json, Postcard, Serializer};
use workfarm::{Farm, FarmOptions};

fn worker_bin() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("bench path");
    let profile = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>/deps");
    let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["build", "--quiet", "--release", "-p", "workfarm-worker"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("CARGO_TARGET_DIR", profile.parent().expect("target dir"))
        .status()
        .expect("cargo build");
    assert!(status.success());
    profile.join("workfarm-worker")
}

/// A command's answer through `redis-cli` (for the engine's own per-command statistics).
fn redis_cli(socket: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .arg("-s")
        .arg(socket)
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `payload`: 100 calls of `sum` on 131,072 float64 (1 MiB raw) at once, through 2 nodes of
/// 2 workers speaking `serializer`; MB/s counts the raw float64 bytes, as the peers' do.
async fn payload<S: Serializer>(url: &str, worker: &std::path::Path, serializer: S) {
    const CALLS: usize = 100;
    let name = serializer.name().to_owned();
    let farm_name = format!("payload-{name}");
    let mut nodes = Vec::new();
    for _ in 0..2 {
        let local = FarmOptions::new(worker)
            .workers(2)
            .serializer(serializer.clone());
        nodes.push(
            Node::start(NodeOptions::new(url, &farm_name, local))
                .await
                .expect("node"),
        );
    }
    let options = RemoteOptions::new(url, &farm_name).serializer(serializer);
    let farm = Farm::connect(options).await.expect("connect");
    farm.ready().await.expect("ready");
    let xs: Vec<f64> = (0..131_072)
        .map(|i| (i as f64 * 0.618_033_988_749_894_9) % 1.0)
        .collect();
    let want = xs.iter().fold(0.0, |acc, x| acc + x);
    for _ in 0..2 {
        let got: f64 = farm.run_method("sum", &xs).await.expect("warm-up");
        assert!((got - want).abs() <= 1e-9 * want);
    }
    let started = Instant::now();
    let futures: Vec<_> = (0..CALLS)
        .map(|_| farm.run_method::<_, f64>("sum", &xs))
        .collect();
    for f in futures {
        let got = f.await.expect("sum");
        assert!((got - want).abs() <= 1e-9 * want, "{got} != {want}");
    }
    let seconds = started.elapsed().as_secs_f64();
    let mb_per_s = (CALLS * xs.len() * 8) as f64 / 1e6 / seconds;
    println!(
        r#"{{"workload":"remote_payload","metric":"MB_per_s","value":{mb_per_s:.0},"params":{{"calls":{CALLS},"serializer":"{name}","nodes":2,"workers_per_node":2}}}}"#
    );
    farm.shutdown().await;
    for node in nodes {
        node.stop().await;
    }
}

fn main() {
    let mut args = std::env::args().skip(1).filter(|a| !a.starts_with("--"));
    let calls: i64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let in_flight: Option<usize> = args.next().and_then(|a| a.parse().ok());
    let dir = std::env::temp_dir().join(format!("workfarm-bench-redis-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let socket = dir.join("r.sock");
    let mut server = Command::new("redis-server")
        .args(["--port", "0", "--unixsocket"])
        .arg(&socket)
        .args(["--save", "", "--appendonly", "no", "--dir"])
        .arg(&dir)
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server (apt-get install -y redis-server)");
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        std::thread::sleep(Duration::from_millis(10));
    }
    let url = format!("redis+unix://{}", socket.display());
    let worker = worker_bin();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut nodes = Vec::new();
        for _ in 0..2 {
            let mut options = NodeOptions::new(&url, "bench", FarmOptions::new(&worker).workers(2));
            if let Some(n) = in_flight {
                options = options.max_in_flight(n);
            }
            nodes.push(Node::start(options).await.expect("node"));
        }
        let farm = Farm::connect(RemoteOptions::new(&url, "bench")).await.expect("connect");
        farm.ready().await.expect("ready");
        for i in 0..200i64 {
            let v: i64 = farm.run_method("noop", i).await.expect("warm-up");
            assert_eq!(v, i);
        }
        let stats = std::env::var_os("REMOTE_BENCH_COMMANDSTATS").is_some();
        if stats {
            redis_cli(&socket, &["CONFIG", "RESETSTAT"]);
        }
        let started = Instant::now();
        let futures: Vec<_> = (0..calls).map(|i| farm.run_method::<_, i64>("noop", i)).collect();
        for (i, f) in futures.into_iter().enumerate() {
            assert_eq!(f.await.expect("noop"), i as i64);
        }
        let rate = calls as f64 / started.elapsed().as_secs_f64();
        if stats {
            eprintln!("{}", redis_cli(&socket, &["INFO", "commandstats"]));
        }
        let mut latencies = Vec::new();
        for i in 0..500i64 {
            let t = Instant::now();
            let _: i64 = farm.run_method("noop", i).await.expect("noop");
            latencies.push(t.elapsed());
        }
        latencies.sort();
        let p = |q: f64| latencies[((latencies.len() as f64 - 1.0) * q) as usize].as_secs_f64() * 1e6;
        let in_flight = in_flight.map_or("default".to_owned(), |n| n.to_string());
        println!(r#"{{"workload":"remote_noop","metric":"calls_per_s","value":{rate:.0},"params":{{"calls":{calls},"nodes":2,"workers_per_node":2,"max_in_flight":"{in_flight}"}}}}"#);
        println!(r#"{{"workload":"remote_noop","metric":"latency_p50_us","value":{:.0}}}"#, p(0.5));
        println!(r#"{{"workload":"remote_noop","metric":"latency_p99_us","value":{:.0}}}"#, p(0.99));
        farm.shutdown().await;
        for node in nodes {
            node.stop().await;
        }
        payload(&url, &worker, Json).await;
        payload(&url, &worker, Postcard).await;
    });
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
