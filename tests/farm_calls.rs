//! Calls through a real farm: arguments, named and default methods, sync and async handlers,
//! every way a call can fail, frame caps, cancellation, and the auto traits callers rely on.

mod support;

use serde::{Deserialize, Serialize};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;
use support::*;
use workfarm::serializer::Cbor;
use workfarm::{CallError, Event, Farm, FarmOptions, WorkerId};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Point {
    x: i64,
    y: i64,
    label: String,
}

/// Polls `f` exactly once: `Ready` means it settled without waiting for anything.
async fn poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
    std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *f).poll(cx))).await
}

/// The pid of the worker that answers a `pid` call.
async fn pid_of(farm: &Farm) -> u32 {
    tokio::time::timeout(SOON, farm.run_method("pid", ()))
        .await
        .expect("pid call timed out")
        .expect("pid call failed")
}

// ===== arguments and methods =====

#[tokio::test]
async fn unit_tuple_and_struct_arguments() {
    let farm = Farm::create(options(1)).unwrap();
    // Unit: no arguments.
    let pid: u32 = farm.run_method("pid", ()).await.unwrap();
    assert!(pid > 1);
    // A tuple: several arguments.
    let sum: i64 = farm.run_method("add", (-7, 50)).await.unwrap();
    assert_eq!(sum, 43);
    // A struct, through the default method and through a named one.
    let p = Point {
        x: 3,
        y: -4,
        label: "ünïcode ✓".into(),
    };
    let back: Point = farm.run(p.clone()).await.unwrap();
    assert_eq!(back, p);
    let back: Point = farm.run_method("echo", &p).await.unwrap();
    assert_eq!(back, p);
    // A scalar.
    let n: i64 = farm
        .run_method("noop", 9_007_199_254_740_993_i64)
        .await
        .unwrap();
    assert_eq!(n, 9_007_199_254_740_993);
    // A borrowed argument type.
    let s: String = farm.run_method("echo", "borrowed").await.unwrap();
    assert_eq!(s, "borrowed");
    farm.shutdown().await;
}

#[tokio::test]
async fn default_method_with_and_without_arguments() {
    let farm = Farm::create(options(1)).unwrap();
    let v: Option<i64> = farm.run(()).await.unwrap();
    assert_eq!(v, None, "() travels as null and the echo returns it");
    let v: (i64, String, bool) = farm.run((1, "two", true)).await.unwrap();
    assert_eq!(v, (1, "two".to_owned(), true));
    farm.shutdown().await;
}

#[tokio::test]
async fn sync_and_async_methods_answer() {
    let farm = Farm::create(options(1)).unwrap();
    let pid = pid_of(&farm).await;
    let slept: u32 = farm.run_method("sleep", 20u64).await.unwrap();
    let blocked: u32 = farm.run_method("block", 20u64).await.unwrap();
    assert_eq!(slept, pid);
    assert_eq!(blocked, pid);
    let sum: f64 = farm.run_method("sum", vec![0.5, 0.25, 2.0]).await.unwrap();
    assert_eq!(sum, 2.75);
    farm.shutdown().await;
}

// ===== handler failures =====

#[tokio::test]
async fn handler_errors_arrive_with_method_and_message() {
    let farm = Farm::create(options(1)).unwrap();
    let err = farm
        .run_method::<_, ()>("fail", "disk is full")
        .await
        .unwrap_err();
    assert_eq!(
        err,
        CallError::Handler {
            method: "fail".into(),
            message: "disk is full".into()
        }
    );
    assert!(err.is_handler());
    assert!(!err.is_worker_lost());
    let err = farm
        .run_method::<_, ()>("fail_async", "later")
        .await
        .unwrap_err();
    assert_eq!(
        err,
        CallError::Handler {
            method: "fail_async".into(),
            message: "later".into()
        }
    );
    farm.shutdown().await;
}

#[tokio::test]
async fn handler_errors_are_not_retried_by_default() {
    let farm = Farm::create(options(1).max_retries(3)).unwrap();
    let mut events = farm.events();
    let err = farm.run_method::<_, ()>("fail", "once").await.unwrap_err();
    assert!(matches!(err, CallError::Handler { .. }), "{err:?}");
    let status = farm.status().await;
    assert_eq!(status.workers.len(), 1);
    assert_eq!(
        status.workers[0].handed, 1,
        "a handler error is not retried"
    );
    // Exactly one CallDone, and it failed.
    let done = wait_for_event(&mut events, SOON, |e| matches!(e, Event::CallDone { .. })).await;
    assert!(matches!(done, Event::CallDone { ok: false, .. }));
    farm.shutdown().await;
}

#[tokio::test]
async fn sync_and_async_panics_are_caught_and_the_worker_keeps_serving() {
    let farm = Farm::create(options(1)).unwrap();
    let pid = pid_of(&farm).await;

    let err = farm
        .run_method::<_, ()>("panic", "sync boom")
        .await
        .unwrap_err();
    assert_eq!(
        err,
        CallError::Panic {
            method: "panic".into(),
            message: "sync boom".into()
        }
    );
    assert!(err.is_handler());
    assert_eq!(
        pid_of(&farm).await,
        pid,
        "the same process serves after a sync panic"
    );

    let err = farm
        .run_method::<_, ()>("panic_async", "async boom")
        .await
        .unwrap_err();
    assert_eq!(
        err,
        CallError::Panic {
            method: "panic_async".into(),
            message: "async boom".into()
        }
    );
    assert_eq!(
        pid_of(&farm).await,
        pid,
        "the same process serves after an async panic"
    );

    // A panic does not disturb calls running next to it.
    let sleeper = farm.run_method::<_, u32>("sleep", 200u64);
    let err = farm
        .run_method::<_, ()>("panic_async", "mid-flight")
        .await
        .unwrap_err();
    assert!(matches!(err, CallError::Panic { .. }));
    assert_eq!(sleeper.await.unwrap(), pid);

    let status = farm.status().await;
    assert_eq!(status.workers.len(), 1);
    assert_eq!(status.workers[0].pid, pid);
    farm.shutdown().await;
}

#[tokio::test]
async fn unknown_method() {
    let farm = Farm::create(options(1)).unwrap();
    let pid = pid_of(&farm).await;
    let err = farm
        .run_method::<_, ()>("no_such_method", (1, 2))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        CallError::UnknownMethod {
            method: "no_such_method".into()
        }
    );
    assert!(err.to_string().contains("no_such_method"), "{err}");
    assert_eq!(pid_of(&farm).await, pid);
    farm.shutdown().await;
}

#[tokio::test]
async fn bad_arguments_name_the_method() {
    let farm = Farm::create(options(1)).unwrap();
    let pid = pid_of(&farm).await;
    // `add` takes (i64, i64).
    let err = farm
        .run_method::<_, i64>("add", "not a pair")
        .await
        .unwrap_err();
    match &err {
        CallError::BadArguments { method, message } => {
            assert_eq!(method, "add");
            assert!(!message.is_empty());
        }
        other => panic!("expected BadArguments, got {other:?}"),
    }
    assert!(!err.is_handler());
    // Wrong arity, and the wrong type for an async method.
    let err = farm
        .run_method::<_, i64>("add", (1, 2, 3))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CallError::BadArguments { method, .. } if method == "add"),
        "{err:?}"
    );
    let err = farm
        .run_method::<_, u32>("sleep", "soon")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CallError::BadArguments { method, .. } if method == "sleep"),
        "{err:?}"
    );
    assert_eq!(
        pid_of(&farm).await,
        pid,
        "bad arguments do not hurt the worker"
    );
    farm.shutdown().await;
}

// ===== results =====

#[tokio::test]
async fn result_of_the_wrong_type_is_a_deserialize_error_naming_the_type() {
    let farm = Farm::create(options(1)).unwrap();
    let pid = pid_of(&farm).await;

    let err = farm.run_method::<_, u32>("echo", "text").await.unwrap_err();
    match &err {
        CallError::Deserialize {
            method,
            type_name,
            message,
        } => {
            assert_eq!(method, "echo");
            assert_eq!(*type_name, "u32");
            assert!(!message.is_empty());
        }
        other => panic!("expected Deserialize, got {other:?}"),
    }

    let err = farm
        .run_method::<_, Point>("echo", (1, 2))
        .await
        .unwrap_err();
    match &err {
        CallError::Deserialize { type_name, .. } => {
            assert!(type_name.ends_with("Point"), "{type_name}");
        }
        other => panic!("expected Deserialize, got {other:?}"),
    }
    assert!(err.to_string().contains("Point"), "{err}");

    // The worker did nothing wrong: it is the same process, still serving.
    assert_eq!(pid_of(&farm).await, pid);
    let status = farm.status().await;
    assert_eq!(status.workers.len(), 1);
    assert_eq!(status.workers[0].pid, pid);
    farm.shutdown().await;
}

#[tokio::test]
async fn argument_frame_over_max_frame_fails_at_once() {
    let farm = Farm::create(options(1).max_frame(1024)).unwrap();
    let pid = pid_of(&farm).await;
    // Keep the only worker busy, so an answer that needed it could not come soon.
    let busy = farm.run_method::<_, u32>("block", 1500u64);

    let mut call = Box::pin(farm.run_method::<_, String>("echo", "x".repeat(2000)));
    let err = match poll_once(&mut call).await {
        Poll::Ready(result) => result.unwrap_err(),
        Poll::Pending => panic!("an oversized argument must fail without waiting"),
    };
    match &err {
        CallError::Serialize { type_name, message } => {
            assert!(type_name.contains("String"), "{type_name}");
            assert!(message.contains("1024"), "{message}");
        }
        other => panic!("expected Serialize, got {other:?}"),
    }

    // Just under the cap still goes through, and the oversized call never reached the worker.
    assert_eq!(busy.await.unwrap(), pid);
    let s: String = farm.run_method("echo", "y".repeat(900)).await.unwrap();
    assert_eq!(s.len(), 900);
    let status = farm.status().await;
    assert_eq!(
        status.workers[0].handed, 3,
        "pid, block and the small echo; not the big one"
    );
    farm.shutdown().await;
}

/// The reference worker keeps to the frame cap the farm announced: a result that would
/// exceed it is not sent; the call fails with a handler error and the worker lives on.
#[tokio::test]
async fn result_over_max_frame_from_a_conforming_worker_fails_the_call_only() {
    let farm = Farm::create(options(1).max_frame(4096)).unwrap();
    let mut events = farm.events();
    let pid = pid_of(&farm).await;
    let err = farm
        .run_method::<_, String>("big", 10_000usize)
        .await
        .unwrap_err();
    match &err {
        CallError::Handler { method, message } => {
            assert_eq!(method, "big");
            assert!(message.contains("could not encode the result"), "{message}");
            assert!(message.contains("4096"), "{message}");
        }
        other => panic!("expected Handler, got {other:?}"),
    }
    let ok: String = farm.run_method("big", 3000usize).await.unwrap();
    assert_eq!(ok.len(), 3000);
    assert_eq!(pid_of(&farm).await, pid, "the worker was not dropped");
    farm.shutdown().await;
    let mut seen = Vec::new();
    while let Ok(e) = events.try_recv() {
        seen.push(e);
    }
    assert!(
        !seen.iter().any(|e| matches!(e, Event::Error { .. })),
        "no protocol error: {seen:?}"
    );
}

/// A worker that handshakes, then answers its first call with a frame header announcing
/// 2 GiB: more than any cap. With `mode == "once"` only the first process misbehaves (a
/// flag file remembers it); later ones `exec` the reference worker.
fn rogue_options(flag: &std::path::Path, mode: &str) -> FarmOptions {
    const SCRIPT: &str = r#"
case "$3" in
  once) if [ -e "$2" ]; then exec "$1"; fi; : > "$2" ;;
esac
dd bs=1 count=16 of=/dev/null 2>/dev/null
printf '\014\000\000\000\201\007\000\000\000\000\000\001\000\000\000\000'
dd bs=1 count=4 of=/dev/null 2>/dev/null
printf '\377\377\377\177'
exec cat > /dev/null
"#;
    trace_init();
    FarmOptions::new("/bin/sh")
        .arg("-c")
        .arg(SCRIPT)
        .arg("rogue-worker")
        .arg(worker_bin())
        .arg(flag)
        .arg(mode)
        .workers(1)
}

fn flag_path(name: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("workfarm-{name}-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

#[tokio::test]
async fn oversized_reply_drops_the_worker_and_the_call_is_retried() {
    let flag = flag_path("calls-rogue-once");
    let farm = Farm::create(rogue_options(&flag, "once").max_retries(3)).unwrap();
    let mut events = farm.events();
    let first =
        match wait_for_event(&mut events, SOON, |e| matches!(e, Event::Spawned { .. })).await {
            Event::Spawned { worker, .. } => worker,
            _ => unreachable!(),
        };

    let v: String = tokio::time::timeout(SOON, farm.run_method("echo", "survived"))
        .await
        .expect("call timed out")
        .expect("the retry on a healthy worker succeeds");
    assert_eq!(v, "survived");

    let error = wait_for_event(&mut events, SOON, |e| matches!(e, Event::Error { .. })).await;
    match error {
        Event::Error {
            worker: Some(w),
            error: CallError::Protocol { worker, message },
        } => {
            assert_eq!(w, first);
            assert_eq!(worker, first);
            assert!(message.contains("exceeds"), "{message}");
        }
        other => panic!("expected a protocol error on the first worker, got {other:?}"),
    }
    let status = farm.status().await;
    assert!(status.workers.iter().all(|w| w.id != first), "{status:?}");
    farm.shutdown().await;
    let _ = std::fs::remove_file(&flag);
}

#[tokio::test]
async fn oversized_reply_without_retries_fails_with_protocol() {
    let flag = flag_path("calls-rogue-always-0");
    let farm = Farm::create(rogue_options(&flag, "always").max_retries(0)).unwrap();
    let err = tokio::time::timeout(SOON, farm.run_method::<_, String>("echo", "lost"))
        .await
        .expect("call timed out")
        .unwrap_err();
    assert!(matches!(err, CallError::Protocol { .. }), "{err:?}");
    assert!(err.is_worker_lost());
    farm.kill().await;
}

#[tokio::test]
async fn oversized_replies_exhaust_the_retries() {
    let flag = flag_path("calls-rogue-always-2");
    let farm = Farm::create(rogue_options(&flag, "always").max_retries(2)).unwrap();
    let err = tokio::time::timeout(SOON, farm.run_method::<_, String>("echo", "lost"))
        .await
        .expect("call timed out")
        .unwrap_err();
    match &err {
        CallError::RetriesExhausted { attempts, last, .. } => {
            assert_eq!(*attempts, 3);
            assert!(matches!(**last, CallError::Protocol { .. }), "{last:?}");
        }
        other => panic!("expected RetriesExhausted, got {other:?}"),
    }
    assert!(err.is_worker_lost());
    farm.kill().await;
}

// ===== cancellation =====

#[tokio::test]
async fn a_call_dropped_while_queued_never_runs() {
    let farm = Farm::create(options(1).max_concurrent_calls_per_worker(1)).unwrap();
    let mut events = farm.events();
    let pid = pid_of(&farm).await;

    let busy = farm.run_method::<_, u32>("block", 500u64);
    // Wait until the block call occupies the only slot, so the next call has to queue.
    let deadline = tokio::time::Instant::now() + SOON;
    while farm.status().await.in_flight() != 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "block call never started"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Would kill the worker if it ran.
    let doomed = farm.run_method::<_, ()>("exit", 3);
    let status = farm.status().await;
    assert_eq!(status.queued, 1, "{status:?}");
    drop(doomed);

    let after = farm.run_method::<_, u32>("pid", ());
    assert_eq!(busy.await.unwrap(), pid);
    assert_eq!(
        after.await.unwrap(),
        pid,
        "the worker is still the same process"
    );

    let status = farm.status().await;
    assert_eq!(status.workers.len(), 1);
    assert_eq!(status.workers[0].pid, pid);
    assert_eq!(
        status.workers[0].handed, 3,
        "pid, block, pid: the dropped call was never handed"
    );
    assert_eq!(status.queued, 0);
    farm.shutdown().await;
    let mut exits = 0;
    while let Ok(e) = events.try_recv() {
        if let Event::Exited { exit, .. } = e {
            assert_ne!(exit.code, Some(3), "the dropped exit call ran");
            exits += 1;
        }
    }
    assert_eq!(exits, 1, "only the shutdown exit");
}

#[tokio::test]
async fn dropping_a_running_call_does_not_disturb_the_worker() {
    let farm = Farm::create(options(1)).unwrap();
    let pid = pid_of(&farm).await;
    let call = farm.run_method::<_, u32>("sleep", 300u64);
    let deadline = tokio::time::Instant::now() + SOON;
    while farm.status().await.in_flight() != 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "sleep call never started"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(call);
    assert_eq!(pid_of(&farm).await, pid);
    // The abandoned call still runs to its end and then leaves the worker.
    let deadline = tokio::time::Instant::now() + SOON;
    while farm.status().await.in_flight() != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "abandoned call never finished"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    farm.shutdown().await;
}

// ===== auto traits =====

fn assert_send_sync<T: Send + Sync + 'static>() {}
fn assert_spawnable<F: Future + Send + 'static>(_: &F)
where
    F::Output: Send + 'static,
{
}

#[test]
fn public_types_are_send_and_sync() {
    assert_send_sync::<Farm>();
    assert_send_sync::<Farm<Cbor>>();
    assert_send_sync::<CallError>();
    assert_send_sync::<Event>();
    assert_send_sync::<WorkerId>();
    assert_send_sync::<workfarm::CreateError>();
    assert_send_sync::<workfarm::Status>();
    assert_send_sync::<workfarm::Broadcast<String>>();
    assert_send_sync::<FarmOptions>();
    fn is_error<E: std::error::Error + Send + Sync + 'static>() {}
    is_error::<CallError>();
    is_error::<workfarm::CreateError>();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_futures_are_send_and_static_and_outlive_the_borrow() {
    let farm = Farm::create(options(1)).unwrap();
    let (a, b) = {
        // The futures borrow neither the handle nor the arguments.
        let local = farm.clone();
        let arg = String::from("spawned");
        let a = local.run_method::<_, String>("echo", &arg);
        let b = local.run::<_, i64>(41);
        assert_spawnable(&a);
        assert_spawnable(&b);
        (a, b)
    };
    let a = tokio::spawn(a);
    let b = tokio::spawn(b);
    assert_eq!(a.await.unwrap().unwrap(), "spawned");
    assert_eq!(b.await.unwrap().unwrap(), 41);
    // A handle moved into a task works there too.
    let moved = farm.clone();
    let sum = tokio::spawn(async move { moved.run_method::<_, i64>("add", (2, 3)).await })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sum, 5);
    farm.shutdown().await;
}

#[tokio::test]
async fn calls_after_shutdown_fail_at_once() {
    let farm = Farm::create(options(1)).unwrap();
    let _ = pid_of(&farm).await;
    farm.shutdown().await;
    let mut call = Box::pin(farm.run_method::<_, u32>("pid", ()));
    // The dispatcher is gone: the call settles on its first poll or right after.
    let result = match poll_once(&mut call).await {
        Poll::Ready(r) => r,
        Poll::Pending => tokio::time::timeout(Duration::from_secs(2), call)
            .await
            .expect("a call after shutdown must not hang"),
    };
    assert_eq!(result, Err(CallError::ShutDown));
}
