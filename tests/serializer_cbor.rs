//! CBOR carries what JSON cannot (NaN, ±infinity, -0.0, byte strings, non-string map keys):
//! through a real farm, and at the level of the serializers themselves. Where JSON differs,
//! the tests pin down what JSON actually does.

mod support;

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use std::collections::BTreeMap;
use support::*;
use workfarm::serializer::{Builtin, Cbor, Json, Postcard, Serializer};
use workfarm::{CallError, Farm};

/// The argument and result of the worker's `floats` method.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Floats {
    values: Vec<f64>,
}

fn specials() -> Vec<f64> {
    vec![
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
        -0.0,
        0.0,
        f64::MIN_POSITIVE,
        f64::MAX,
        1.0 / 3.0,
    ]
}

/// Same value, bit for bit where it matters: NaN is NaN, zeros keep their sign.
fn assert_same_floats(got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
    for (g, w) in got.iter().zip(want) {
        if w.is_nan() {
            assert!(g.is_nan(), "{g} should be NaN");
        } else {
            assert_eq!(g, w);
            assert_eq!(g.is_sign_negative(), w.is_sign_negative(), "sign of {w}");
        }
    }
}

fn cbor_farm(n: usize) -> Farm<Cbor> {
    Farm::create(options(n).serializer(Cbor)).unwrap()
}

// ===== through a farm =====

/// Postcard's own decode errors say only "Serde Deserialization Error": what the farm adds
/// names the method and the type, on both sides.
#[tokio::test]
async fn postcard_decode_errors_name_the_method_and_the_type() {
    let farm = Farm::create(options(1).serializer(Postcard)).unwrap();
    let err = farm
        .run_method::<_, Vec<String>>("sum", vec![1.0f64, 2.0])
        .await
        .unwrap_err();
    match &err {
        CallError::Deserialize {
            method, type_name, ..
        } => {
            assert_eq!(method, "sum");
            assert!(
                type_name.contains("Vec<alloc::string::String>"),
                "{type_name}"
            );
        }
        other => panic!("expected Deserialize, got {other:?}"),
    }
    assert!(err.to_string().contains("\"sum\""), "{err}");
    let err = farm
        .run_method::<_, f64>("sum", "not floats")
        .await
        .unwrap_err();
    match &err {
        CallError::BadArguments { method, message } => {
            assert_eq!(method, "sum");
            assert!(message.contains("Vec<f64>"), "{message}");
        }
        other => panic!("expected BadArguments, got {other:?}"),
    }
    farm.shutdown().await;
}

#[tokio::test]
async fn cbor_farm_answers_ordinary_calls() {
    let farm = cbor_farm(1);
    assert_eq!(farm.serializer().name(), "cbor");
    let sum: i64 = farm.run_method("add", (40, 2)).await.unwrap();
    assert_eq!(sum, 42);
    let s: String = farm.run("through the default method").await.unwrap();
    assert_eq!(s, "through the default method");
    let err = farm
        .run_method::<_, ()>("fail", "cbor error")
        .await
        .unwrap_err();
    assert_eq!(
        err,
        CallError::Handler {
            method: "fail".into(),
            message: "cbor error".into()
        }
    );
    let err = farm.run_method::<_, i64>("add", "nope").await.unwrap_err();
    assert!(matches!(err, CallError::BadArguments { .. }), "{err:?}");
    let err = farm.run_method::<_, u32>("echo", "text").await.unwrap_err();
    assert!(
        matches!(
            err,
            CallError::Deserialize {
                type_name: "u32",
                ..
            }
        ),
        "{err:?}"
    );
    farm.shutdown().await;
}

#[tokio::test]
async fn cbor_carries_nan_infinities_and_negative_zero() {
    let farm = cbor_farm(1);
    let sent = Floats { values: specials() };
    let back: Floats = farm.run_method("floats", &sent).await.unwrap();
    assert_same_floats(&back.values, &sent.values);
    let neg_zero = back.values[3];
    assert_eq!(
        neg_zero.to_bits(),
        (-0.0f64).to_bits(),
        "the sign bit of -0.0 survives"
    );

    // The worker computes with them too.
    let nan: f64 = farm.run_method("sum", vec![1.0, f64::NAN]).await.unwrap();
    assert!(nan.is_nan());
    let inf: f64 = farm
        .run_method("sum", vec![f64::INFINITY, 1.0])
        .await
        .unwrap();
    assert_eq!(inf, f64::INFINITY);
    let neg: f64 = farm.run_method("sum", vec![-0.0, -0.0]).await.unwrap();
    assert!(neg == 0.0 && neg.is_sign_negative());
    farm.shutdown().await;
}

#[tokio::test]
async fn json_turns_nan_and_infinities_into_null() {
    let farm = Farm::create(options(1)).unwrap();
    // The worker's `floats` needs f64s; JSON sends null for NaN: its decoder refuses.
    let err = farm
        .run_method::<_, Floats>(
            "floats",
            Floats {
                values: vec![1.0, f64::NAN],
            },
        )
        .await
        .unwrap_err();
    match &err {
        CallError::BadArguments { method, message } => {
            assert_eq!(method, "floats");
            assert!(message.contains("null"), "{message}");
        }
        other => panic!("expected BadArguments, got {other:?}"),
    }
    let err = farm
        .run_method::<_, f64>("sum", vec![f64::INFINITY])
        .await
        .unwrap_err();
    assert!(matches!(err, CallError::BadArguments { .. }), "{err:?}");

    // Through the echo, NaN comes back as null: an error for f64, None for Option<f64>.
    let err = farm
        .run_method::<_, f64>("echo", f64::NAN)
        .await
        .unwrap_err();
    match &err {
        CallError::Deserialize {
            type_name, message, ..
        } => {
            assert_eq!(*type_name, "f64");
            assert!(message.contains("null"), "{message}");
        }
        other => panic!("expected Deserialize, got {other:?}"),
    }
    let back: Vec<Option<f64>> = farm
        .run_method("echo", vec![f64::NAN, f64::NEG_INFINITY, 2.5])
        .await
        .unwrap();
    assert_eq!(back, vec![None, None, Some(2.5)]);

    // -0.0 does survive JSON (written as "-0.0").
    let back: Floats = farm
        .run_method("floats", Floats { values: vec![-0.0] })
        .await
        .unwrap();
    assert_eq!(back.values[0].to_bits(), (-0.0f64).to_bits());
    farm.shutdown().await;
}

#[tokio::test]
async fn cbor_carries_byte_strings() {
    let farm = cbor_farm(1);
    let all: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    for payload in [Vec::new(), vec![0u8], vec![0xff, 0x00, 0x7f, 0x80], all] {
        let back: ByteBuf = farm
            .run_method("bytes", ByteBuf::from(payload.clone()))
            .await
            .unwrap();
        assert_eq!(back.into_vec(), payload);
    }
    farm.shutdown().await;
}

#[tokio::test]
async fn json_carries_bytes_as_an_array_of_numbers() {
    let farm = Farm::create(options(1)).unwrap();
    let payload = vec![0u8, 1, 254, 255];
    let back: ByteBuf = farm
        .run_method("bytes", ByteBuf::from(payload.clone()))
        .await
        .unwrap();
    assert_eq!(back.into_vec(), payload);
    // What the worker sent back is a JSON array of numbers.
    let raw: serde_json::Value = farm
        .run_method("bytes", ByteBuf::from(payload))
        .await
        .unwrap();
    assert_eq!(raw, serde_json::json!([0, 1, 254, 255]));
    farm.shutdown().await;
}

#[tokio::test]
async fn cbor_carries_maps_with_integer_keys() {
    let farm = cbor_farm(1);
    let map: BTreeMap<i64, String> = [
        (i64::MIN, "min".to_owned()),
        (-5, "minus five".to_owned()),
        (0, "zero".to_owned()),
        (1 << 40, "big".to_owned()),
        (i64::MAX, "max".to_owned()),
    ]
    .into();
    let back: BTreeMap<i64, String> = farm.run_method("int_keys", &map).await.unwrap();
    assert_eq!(back, map);
    farm.shutdown().await;
}

#[tokio::test]
async fn json_carries_integer_keys_as_strings_and_refuses_other_keys() {
    let farm = Farm::create(options(1)).unwrap();
    let map: BTreeMap<i64, String> = [(-5, "a".to_owned()), (7, "b".to_owned())].into();
    // serde_json writes integer keys as strings and parses them back.
    let back: BTreeMap<i64, String> = farm.run_method("int_keys", &map).await.unwrap();
    assert_eq!(back, map);
    let raw: serde_json::Value = farm.run_method("int_keys", &map).await.unwrap();
    assert_eq!(raw, serde_json::json!({"-5": "a", "7": "b"}));

    // Keys that are not strings or numbers: JSON cannot encode them, and says so at once.
    let pairs: BTreeMap<(i32, i32), String> = [((1, 2), "x".to_owned())].into();
    let err = farm
        .run_method::<_, serde_json::Value>("echo", &pairs)
        .await
        .unwrap_err();
    assert!(matches!(err, CallError::Serialize { .. }), "{err:?}");
    assert_eq!(
        farm.status().await.workers[0].handed,
        2,
        "the bad call never left"
    );
    farm.shutdown().await;
}

#[tokio::test]
async fn one_worker_binary_serves_json_and_cbor_farms_side_by_side() {
    let json = Farm::create(options(1)).unwrap();
    let cbor = cbor_farm(1);
    let a: Floats = json
        .run_method("floats", Floats { values: vec![1.5] })
        .await
        .unwrap();
    let b: Floats = cbor
        .run_method(
            "floats",
            Floats {
                values: vec![f64::NAN],
            },
        )
        .await
        .unwrap();
    assert_eq!(a.values, vec![1.5]);
    assert!(b.values[0].is_nan());
    json.shutdown().await;
    cbor.shutdown().await;
}

// ===== the serializers alone =====

fn round_trip<S: Serializer, T: Serialize + serde::de::DeserializeOwned>(s: &S, value: &T) -> T {
    let mut bytes = Vec::new();
    s.encode(value, &mut bytes).unwrap();
    s.decode(&bytes).unwrap()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Shape {
    Unit,
    Circle { r: f64 },
    Poly(Vec<(i32, i32)>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Record {
    id: u64,
    name: String,
    tags: Vec<String>,
    maybe: Option<i8>,
    shapes: Vec<Shape>,
    nested: BTreeMap<String, Vec<u16>>,
}

fn record() -> Record {
    Record {
        id: u64::MAX,
        name: "naïve — ✓".into(),
        tags: vec![String::new(), "b".into()],
        maybe: Some(-128),
        shapes: vec![
            Shape::Unit,
            Shape::Circle { r: 0.5 },
            Shape::Poly(vec![(1, -1), (0, 0)]),
        ],
        nested: [("k".to_owned(), vec![0, 65535])].into(),
    }
}

#[test]
fn both_serializers_round_trip_ordinary_values() {
    let r = record();
    assert_eq!(round_trip(&Json, &r), r);
    assert_eq!(round_trip(&Cbor, &r), r);
    assert_eq!(round_trip(&Builtin::Json, &r), r);
    assert_eq!(round_trip(&Builtin::Cbor, &r), r);
    assert_eq!(round_trip(&Json, &()), ());
    assert_eq!(round_trip(&Cbor, &()), ());
    assert_eq!(
        round_trip(&Cbor, &(1u8, "two".to_owned(), 3.0f32)),
        (1u8, "two".to_owned(), 3.0f32)
    );
}

#[test]
fn cbor_is_exact_for_every_special_float() {
    let back: Vec<f64> = round_trip(&Cbor, &specials());
    assert_same_floats(&back, &specials());
    let back: f64 = round_trip(&Cbor, &-0.0f64);
    assert_eq!(back.to_bits(), (-0.0f64).to_bits());
    // A NaN with a payload is still a NaN after the trip.
    let odd_nan = f64::from_bits(0x7ff8_0000_0000_1234);
    let back: f64 = round_trip(&Cbor, &odd_nan);
    assert!(back.is_nan());
    let back: f32 = round_trip(&Cbor, &f32::NEG_INFINITY);
    assert_eq!(back, f32::NEG_INFINITY);
}

#[test]
fn json_writes_null_for_nan_and_infinities() {
    for x in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let mut bytes = Vec::new();
        Json.encode(&x, &mut bytes).unwrap();
        assert_eq!(bytes, b"null");
        assert!(Json.decode::<f64>(&bytes).is_err());
        assert_eq!(Json.decode::<Option<f64>>(&bytes).unwrap(), None);
    }
    let back: f64 = round_trip(&Json, &-0.0f64);
    assert_eq!(back.to_bits(), (-0.0f64).to_bits());
}

#[test]
fn cbor_writes_bytes_as_a_byte_string_and_json_as_numbers() {
    let b = ByteBuf::from(vec![1u8, 2, 3]);
    let mut cbor = Vec::new();
    Cbor.encode(&b, &mut cbor).unwrap();
    // Major type 2 (byte string), length 3, then the bytes themselves.
    assert_eq!(cbor, vec![0x43, 1, 2, 3]);
    let mut json = Vec::new();
    Json.encode(&b, &mut json).unwrap();
    assert_eq!(json, b"[1,2,3]");
    let back: ByteBuf = Cbor.decode(&cbor).unwrap();
    assert_eq!(back.into_vec(), vec![1, 2, 3]);

    let big = ByteBuf::from(vec![200u8; 10_000]);
    let mut cbor = Vec::new();
    Cbor.encode(&big, &mut cbor).unwrap();
    let mut json = Vec::new();
    Json.encode(&big, &mut json).unwrap();
    assert!(cbor.len() < 10_010, "{}", cbor.len());
    assert!(json.len() > 30_000, "{}", json.len());
}

#[test]
fn map_keys() {
    let map: BTreeMap<i64, String> = [(-1, "a".to_owned()), (2, "b".to_owned())].into();
    assert_eq!(round_trip(&Cbor, &map), map);
    assert_eq!(round_trip(&Json, &map), map);
    let mut json = Vec::new();
    Json.encode(&map, &mut json).unwrap();
    assert_eq!(json, br#"{"-1":"a","2":"b"}"#);

    let pairs: BTreeMap<(i32, i32), bool> = [((1, 2), true), ((-3, 4), false)].into();
    assert_eq!(round_trip(&Cbor, &pairs), pairs);
    let mut json = Vec::new();
    assert!(Json.encode(&pairs, &mut json).is_err());
}

#[test]
fn decoders_refuse_garbage_and_trailing_bytes() {
    let mut bytes = Vec::new();
    Cbor.encode(&5u32, &mut bytes).unwrap();
    bytes.push(0x00);
    let err = Cbor.decode::<u32>(&bytes).unwrap_err();
    assert!(err.message().contains("trailing"), "{err}");
    assert!(Json.decode::<u32>(b"5 x").is_err());
    assert!(Cbor.decode::<u32>(&[]).is_err());
    assert!(Json.decode::<u32>(b"").is_err());
    assert!(Cbor.decode::<String>(&[0xff, 0xff]).is_err());
    // A value of the wrong shape.
    let mut bytes = Vec::new();
    Cbor.encode("text", &mut bytes).unwrap();
    assert!(Cbor.decode::<u32>(&bytes).is_err());
}

#[test]
fn encode_appends_to_the_buffer() {
    let mut out = b"head".to_vec();
    Cbor.encode(&1u8, &mut out).unwrap();
    assert_eq!(out, b"head\x01");
    let mut out = b"head".to_vec();
    Json.encode(&1u8, &mut out).unwrap();
    assert_eq!(out, b"head1");
}

#[test]
fn names_and_selection() {
    assert_eq!(Json.name(), "json");
    assert_eq!(Cbor.name(), "cbor");
    assert_eq!(Builtin::Json.name(), "json");
    assert_eq!(Builtin::Cbor.name(), "cbor");
    assert_eq!(Builtin::default(), Builtin::Json);
    assert_eq!(Builtin::Json.select("cbor"), Some(Builtin::Cbor));
    assert_eq!(Builtin::Cbor.select("json"), Some(Builtin::Json));
    assert_eq!(Builtin::Json.select("msgpack"), None);
    assert_eq!(Cbor.select("cbor"), Some(Cbor));
    assert_eq!(Cbor.select("json"), None);
    assert_eq!(Json.select("cbor"), None);
    // Builtin encodes exactly as the serializer it names.
    let r = record();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    Builtin::Cbor.encode(&r, &mut a).unwrap();
    Cbor.encode(&r, &mut b).unwrap();
    assert_eq!(a, b);
}
