//! A node of a farm across machines: runs the calls of farm NAME on the Redis server at URL
//! with N local workers of PROGRAM, until SIGTERM or SIGINT, then leaves gracefully
//! (finishes the calls it holds).
//!
//! ```text
//! workfarm-node --redis URL --farm NAME [--workers N] [--serializer json|cbor|postcard]
//!               [--lease-ms MS] [--max-in-flight N] -- PROGRAM [ARGS...]
//! ```

use std::process::ExitCode;
use std::time::Duration;
use workfarm::remote::{Node, NodeOptions};
use workfarm::serializer::Builtin;
use workfarm::FarmOptions;

const USAGE: &str = "\
usage: workfarm-node --redis URL --farm NAME [options] -- PROGRAM [ARGS...]

Serves the calls of farm NAME, made with Farm::connect on any machine, by running them on
local workers: PROGRAM is your worker binary (built with workfarm::worker), unchanged.

  --redis URL          the Redis server: redis://[user:password@]host:port,
                       rediss://... (TLS; a private CA through SSL_CERT_FILE=ca.pem),
                       or redis+unix:///path/to/socket
  --farm NAME          the farm's name (callers use the same)
  --workers N          local worker processes (default: the number of CPUs)
  --serializer FORMAT  json (default), cbor or postcard: the callers' serializer
  --lease-ms MS        how long a call stays this node's without a renewal (default 10000)
  --max-in-flight N    calls held at once (default: one per worker, plus what the
                       workers finish in 10 ms at their recent pace)
  -h, --help           this text

SIGTERM or Ctrl-C stops it gracefully: it takes no new calls, finishes the ones it holds
and leaves the farm. Logs go to stderr; RUST_LOG sets the level (default info).

example:
  workfarm-node --redis redis://127.0.0.1:6379 --farm pi --workers 4 -- ./target/release/my-worker";

struct Args {
    url: String,
    farm: String,
    workers: Option<usize>,
    serializer: Builtin,
    lease: Option<Duration>,
    max_in_flight: Option<usize>,
    program: String,
    program_args: Vec<String>,
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let (mut url, mut farm, mut workers, mut lease, mut max_in_flight) =
        (None, None, None, None, None);
    let mut serializer = Builtin::Json;
    let number = |flag: &str, v: Option<String>| -> Result<u64, String> {
        v.ok_or_else(|| format!("{flag} needs a value"))?
            .parse()
            .map_err(|_| format!("{flag} needs a number"))
    };
    loop {
        let Some(arg) = args.next() else {
            return Err("missing -- PROGRAM".to_owned());
        };
        match arg.as_str() {
            "-h" | "--help" => return Err(String::new()),
            "--redis" => url = args.next(),
            "--farm" => farm = args.next(),
            "--workers" => workers = Some(number("--workers", args.next())? as usize),
            "--lease-ms" => lease = Some(Duration::from_millis(number("--lease-ms", args.next())?)),
            "--max-in-flight" => {
                max_in_flight = Some(number("--max-in-flight", args.next())? as usize)
            }
            "--serializer" => {
                serializer = match args.next().as_deref() {
                    Some("json") => Builtin::Json,
                    Some("cbor") => Builtin::Cbor,
                    Some("postcard") => Builtin::Postcard,
                    other => return Err(format!("unknown serializer {other:?}")),
                }
            }
            "--" => break,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let program = args.next().ok_or("missing PROGRAM after --")?;
    Ok(Args {
        url: url.ok_or("missing --redis URL")?,
        farm: farm.ok_or("missing --farm NAME")?,
        workers,
        serializer,
        lease,
        max_in_flight,
        program,
        program_args: args.collect(),
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(message) if message.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("workfarm-node: {message}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let mut options = FarmOptions::new(&args.program)
        .args(&args.program_args)
        .serializer(args.serializer);
    if let Some(n) = args.workers {
        options = options.workers(n);
    }
    let mut node_options = NodeOptions::new(args.url, args.farm, options);
    if let Some(lease) = args.lease {
        node_options = node_options.lease(lease);
    }
    if let Some(n) = args.max_in_flight {
        node_options = node_options.max_in_flight(n);
    }
    let node = match Node::start(node_options).await {
        Ok(node) => node,
        Err(e) => {
            eprintln!("workfarm-node: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(node = node.id(), "serving");
    let (mut term, mut int) = match (
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()),
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        _ => {
            eprintln!("workfarm-node: cannot handle signals");
            node.stop().await;
            return ExitCode::FAILURE;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("stopping: finishing the calls held, then leaving the farm");
    node.stop().await;
    ExitCode::SUCCESS
}
