//! JSON against CBOR, encode and decode apart, on the shapes of value calls carry.
//!
//! ```text
//! cargo bench --bench serialization [-- <filter>]
//! ```
//!
//! Bench names read `<value>/<format>/<encode|decode>`; throughput is in bytes of the
//! encoding, so the two formats' figures compare time per byte they actually move.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_bytes::ByteBuf;
use std::collections::BTreeMap;
use std::time::Duration;
use workfarm::serializer::{Cbor, Json, Postcard, Serializer};

/// A typical small argument: a few scalars and a short string.
#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct Small {
    id: u64,
    name: String,
    ratio: f64,
    flags: [bool; 3],
    tag: Option<i32>,
}

/// A record dominated by strings, some needing escapes in JSON.
#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct Record {
    title: String,
    author: String,
    body: String,
    tags: Vec<String>,
    path: String,
}

/// A map of maps, as configuration or a JSON document would be.
type Nested = BTreeMap<String, BTreeMap<String, Vec<i64>>>;

/// 1 MiB of float64, the `payload` workload's argument.
const FLOATS: usize = 131_072;
/// 1 MiB of bytes.
const BYTES: usize = 1 << 20;

fn small() -> Small {
    Small {
        id: 1_234_567,
        name: "worker-07".into(),
        ratio: 0.618_033_988_749_894_9,
        flags: [true, false, true],
        tag: Some(-42),
    }
}

fn record() -> Record {
    Record {
        title: "Farming calls out to child processes".into(),
        author: "Ada \"the pool\" Lovelace".into(),
        body: "Each call is a length-prefixed frame; the worker answers in any order.\n\t\
               Unicode too: λ, π ≈ 3.14159, 日本語, emoji 🚜.\n"
            .repeat(20),
        tags: (0..16).map(|i| format!("tag-{i:02}")).collect(),
        path: r"C:\work\farm\target\release\workfarm-worker.exe".into(),
    }
}

fn floats() -> Vec<f64> {
    (0..FLOATS)
        .map(|i| (i as f64 * 0.618_033_988_749_894_9) % 1.0)
        .collect()
}

fn bytes() -> ByteBuf {
    ByteBuf::from(
        (0..BYTES)
            .map(|i| (i * 31 % 251) as u8)
            .collect::<Vec<u8>>(),
    )
}

fn nested() -> Nested {
    (0..32)
        .map(|i| {
            let inner = (0..8)
                .map(|j| {
                    (
                        format!("field_{j}"),
                        (0..8).map(|k| i * 1000 + j * 10 + k - 300).collect(),
                    )
                })
                .collect();
            (format!("section_{i:02}"), inner)
        })
        .collect()
}

/// Benches encode and decode of `value` with `serializer`, under `<group>/<format>/...`.
fn bench_format<T, S>(c: &mut Criterion, group: &str, serializer: S, value: &T)
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
    S: Serializer,
{
    let mut encoded = Vec::new();
    serializer
        .encode(value, &mut encoded)
        .unwrap_or_else(|e| panic!("{group}/{}: encode failed: {e}", serializer.name()));
    let back: T = serializer
        .decode(&encoded)
        .unwrap_or_else(|e| panic!("{group}/{}: decode failed: {e}", serializer.name()));
    if &back != value {
        // Not fatal: JSON without serde_json's `float_roundtrip` may move a float by an ulp.
        eprintln!(
            "note: {group}/{}: the round trip changed the value",
            serializer.name()
        );
    }

    let mut g = c.benchmark_group(group);
    g.throughput(Throughput::Bytes(encoded.len() as u64));
    let mut out = Vec::with_capacity(encoded.len());
    g.bench_function(BenchmarkId::new(serializer.name(), "encode"), |b| {
        b.iter(|| {
            out.clear();
            serializer.encode(black_box(value), &mut out).unwrap();
            black_box(out.len())
        })
    });
    g.bench_function(BenchmarkId::new(serializer.name(), "decode"), |b| {
        b.iter(|| serializer.decode::<T>(black_box(&encoded)).unwrap())
    });
    g.finish();
}

fn bench_all<T>(c: &mut Criterion, group: &str, value: T)
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    bench_format(c, group, Json, &value);
    bench_format(c, group, Cbor, &value);
    bench_format(c, group, Postcard, &value);
}

/// How many of `xs` come back different after a round trip, and the largest distance in ulps.
fn float_drift<S: Serializer>(serializer: S, xs: &[f64]) -> (usize, u64) {
    let mut encoded = Vec::new();
    serializer.encode(xs, &mut encoded).unwrap();
    let back: Vec<f64> = serializer.decode(&encoded).unwrap();
    assert_eq!(back.len(), xs.len());
    xs.iter()
        .zip(&back)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .fold((0, 0), |(n, worst), (a, b)| {
            (n + 1, worst.max(a.to_bits().abs_diff(b.to_bits())))
        })
}

fn serialization(c: &mut Criterion) {
    let xs = floats();
    for (name, (changed, ulps)) in [
        ("json", float_drift(Json, &xs)),
        ("cbor", float_drift(Cbor, &xs)),
        ("postcard", float_drift(Postcard, &xs)),
    ] {
        eprintln!(
            "note: floats_1MiB/{name}: {changed} of {} values change in a round trip (at most {ulps} ulp)",
            xs.len()
        );
    }
    bench_all(c, "small_struct", small());
    bench_all(c, "string_record", record());
    bench_all(c, "floats_1MiB", floats());
    bench_all(c, "bytes_1MiB", bytes());
    bench_all(c, "nested_map", nested());
}

fn config() -> Criterion {
    Criterion::default()
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(20)
}

criterion_group! {
    name = benches;
    config = config();
    targets = serialization
}
criterion_main!(benches);
