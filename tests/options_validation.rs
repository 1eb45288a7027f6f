//! `Farm::create` refuses out-of-range options with `CreateError::InvalidOption` naming the
//! option (as its setter is named), before starting any process.

mod support;

use std::time::Duration;
use support::*;
use workfarm::{CreateError, Farm, FarmOptions};

/// The option `create` refuses, or a panic with what it did instead.
fn refused(options: FarmOptions) -> &'static str {
    match Farm::create(options) {
        Err(CreateError::InvalidOption { name, reason }) => {
            assert!(!reason.is_empty());
            let shown = CreateError::InvalidOption { name, reason }.to_string();
            assert!(
                shown.contains(name),
                "the message names the option: {shown}"
            );
            name
        }
        Err(other) => panic!("expected InvalidOption, got {other:?}"),
        Ok(farm) => panic!("expected InvalidOption, got a farm: {farm:?}"),
    }
}

#[tokio::test]
async fn zero_workers_is_refused() {
    assert_eq!(refused(options(1).workers(0)), "workers");
}

#[tokio::test]
async fn zero_concurrency_limits_are_refused() {
    assert_eq!(
        refused(options(1).max_concurrent_calls(0)),
        "max_concurrent_calls"
    );
    assert_eq!(
        refused(options(1).max_concurrent_calls_per_worker(0)),
        "max_concurrent_calls_per_worker"
    );
}

#[tokio::test]
async fn zero_durations_are_refused() {
    assert_eq!(refused(options(1).timeout(Duration::ZERO)), "timeout");
    assert_eq!(
        refused(options(1).max_idle_time(Duration::ZERO)),
        "max_idle_time"
    );
    assert_eq!(
        refused(options(1).kill_timeout(Duration::ZERO)),
        "kill_timeout"
    );
    assert_eq!(
        refused(options(1).startup_timeout(Duration::ZERO)),
        "startup_timeout"
    );
}

#[tokio::test]
async fn zero_ttl_is_refused() {
    assert_eq!(refused(options(1).ttl(0)), "ttl");
}

#[tokio::test]
async fn out_of_range_frame_cap_is_refused() {
    assert_eq!(refused(options(1).max_frame(10)), "max_frame");
    assert_eq!(
        refused(options(1).max_frame(u32::MAX as usize + 1)),
        "max_frame"
    );
}

#[tokio::test]
async fn an_invalid_option_is_reported_before_a_missing_binary() {
    // Option errors come first: nothing is looked up or started for refused options.
    assert_eq!(
        refused(FarmOptions::new("/no/such/worker").workers(0)),
        "workers"
    );
}

#[tokio::test]
async fn smallest_valid_values_are_accepted() {
    let farm = Farm::create(
        options(1)
            .max_concurrent_calls(1)
            .max_concurrent_calls_per_worker(1)
            .max_retries(0)
            .timeout(Duration::from_millis(1))
            .ttl(1)
            .max_idle_time(Duration::from_millis(1))
            .kill_timeout(Duration::from_millis(1))
            .startup_timeout(Duration::from_secs(10))
            .max_frame(64),
    )
    .expect("the smallest valid values are accepted");
    farm.kill().await;
}

#[tokio::test]
async fn unset_optional_limits_are_accepted() {
    let farm = Farm::create(
        options(1)
            .max_concurrent_calls(None)
            .timeout(None)
            .ttl(None)
            .max_idle_time(None),
    )
    .expect("None means no limit");
    let sum: i64 = farm.run_method("add", (1, 2)).await.unwrap();
    assert_eq!(sum, 3);
    farm.shutdown().await;
}

#[test]
fn create_outside_a_runtime_is_refused() {
    assert!(matches!(
        Farm::create(options(1)),
        Err(CreateError::NoRuntime)
    ));
}
