mod support;

use std::collections::HashSet;
use support::*;
use workfarm::{CallError, Farm};

#[tokio::test]
async fn default_method_and_named_methods() {
    let farm = Farm::create(options(2)).unwrap();
    let v: serde_json::Value = farm.run(serde_json::json!({"a": [1, 2, 3]})).await.unwrap();
    assert_eq!(v, serde_json::json!({"a": [1, 2, 3]}));
    let sum: i64 = farm.run_method("add", (40, 2)).await.unwrap();
    assert_eq!(sum, 42);
    let none: serde_json::Value = farm.run(()).await.unwrap();
    assert_eq!(none, serde_json::Value::Null);
    farm.shutdown().await;
}

#[tokio::test]
async fn calls_spread_over_workers() {
    let farm = Farm::create(options(2)).unwrap();
    let calls: Vec<_> = (0..20)
        .map(|_| farm.run_method::<_, u32>("sleep", 50u64))
        .collect();
    let mut pids = HashSet::new();
    for c in calls {
        pids.insert(c.await.unwrap());
    }
    assert_eq!(pids.len(), 2);
    farm.shutdown().await;
}

#[tokio::test]
async fn handler_errors_and_panics_reach_the_caller() {
    let farm = Farm::create(options(1)).unwrap();
    let err = farm.run_method::<_, ()>("fail", "nope").await.unwrap_err();
    assert_eq!(
        err,
        CallError::Handler {
            method: "fail".into(),
            message: "nope".into()
        }
    );
    let err = farm.run_method::<_, ()>("panic", "boom").await.unwrap_err();
    assert_eq!(
        err,
        CallError::Panic {
            method: "panic".into(),
            message: "boom".into()
        }
    );
    let err = farm
        .run_method::<_, ()>("panic_async", "boom2")
        .await
        .unwrap_err();
    assert_eq!(
        err,
        CallError::Panic {
            method: "panic_async".into(),
            message: "boom2".into()
        }
    );
    let err = farm.run_method::<_, ()>("nope", ()).await.unwrap_err();
    assert_eq!(
        err,
        CallError::UnknownMethod {
            method: "nope".into()
        }
    );
    let ok: i64 = farm.run_method("add", (1, 1)).await.unwrap();
    assert_eq!(ok, 2);
    farm.shutdown().await;
}

/// `FarmOptions::sibling` finds a binary of the package next to the running one; from this
/// test (in `target/<profile>/deps/`) that is the reference worker in `target/<profile>/`.
#[tokio::test]
async fn a_sibling_binary_is_found_next_to_the_current_executable() {
    if std::env::var_os("WORKFARM_WORKER_BIN").is_some() {
        eprintln!("skipped: WORKFARM_WORKER_BIN names a worker elsewhere");
        return;
    }
    // Builds the reference worker into this test's target/<profile>/, as every test does.
    let _ = worker_bin();
    let options = workfarm::FarmOptions::sibling("workfarm-worker").workers(1);
    let farm = Farm::create(options).expect("the reference worker is built beside the tests");
    assert_eq!(farm.run_method::<_, i64>("add", (20, 22)).await, Ok(42));
    farm.shutdown().await;
    let missing = Farm::create(workfarm::FarmOptions::sibling("no-such-worker")).unwrap_err();
    assert!(
        missing.to_string().contains("no-such-worker"),
        "names the path it tried: {missing}"
    );
}
