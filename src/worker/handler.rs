//! Adapters from user closures to the worker's handler table, and panic capture.

use crate::protocol::{self, frame, FailureKind};
use crate::serializer::Serializer;
use serde::{de::DeserializeOwned, Serialize};
use std::any::Any;
use std::fmt::Display;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

/// Longest error message sent back, so an error frame always fits the frame cap.
const MAX_MESSAGE: usize = 16 * 1024;

pub(crate) type BoxFuture = Pin<Box<dyn Future<Output = Vec<u8>> + Send + 'static>>;

/// Why one call failed inside the worker.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) kind: FailureKind,
    pub(crate) message: String,
    /// For [`FailureKind::Refused`]: the back-off asked for (`None`: "not here").
    pub(crate) retry_after: Option<Duration>,
}

impl Failure {
    pub(crate) fn new(kind: FailureKind, message: impl Display) -> Self {
        Failure {
            kind,
            message: message.to_string(),
            retry_after: None,
        }
    }

    /// A handler's error: a [`Refuse`](super::Refuse) is a refusal, anything else a
    /// handler failure.
    pub(crate) fn from_error<E: Display + 'static>(error: E) -> Self {
        match super::refuse::refusal_in(&error) {
            Some(refuse) => Failure::refused(refuse.backoff(), refuse.reason()),
            None => Failure::new(FailureKind::Handler, error),
        }
    }

    pub(crate) fn refused(retry_after: Option<Duration>, reason: impl Display) -> Self {
        Failure {
            kind: FailureKind::Refused,
            message: reason.to_string(),
            retry_after,
        }
    }
}

/// Decodes arguments, runs the user function, encodes its result into the buffer.
pub(crate) type SyncFn<S> = dyn Fn(&S, &[u8], &mut Vec<u8>) -> Result<(), Failure> + Send + Sync;
/// Decodes arguments and starts the user's future; the future yields a complete reply frame.
pub(crate) type AsyncFn<S> =
    dyn Fn(&S, &[u8], u64, usize) -> Result<BoxFuture, Failure> + Send + Sync;

pub(crate) enum Handler<S> {
    Sync(Arc<SyncFn<S>>),
    Async(Arc<AsyncFn<S>>),
}

impl<S> Clone for Handler<S> {
    fn clone(&self) -> Self {
        match self {
            Handler::Sync(f) => Handler::Sync(f.clone()),
            Handler::Async(f) => Handler::Async(f.clone()),
        }
    }
}

/// Why arguments did not decode, naming the type they were decoded as (some decoders, such
/// as Postcard's, say only "Serde Deserialization Error").
fn bad_arguments<A>(error: impl Display) -> Failure {
    Failure::new(
        FailureKind::BadArguments,
        format_args!("{error} (decoding {})", std::any::type_name::<A>()),
    )
}

pub(crate) fn sync_handler<S, A, T, E, F>(f: F) -> Handler<S>
where
    S: Serializer,
    A: DeserializeOwned,
    T: Serialize,
    E: Display + 'static,
    F: Fn(A) -> Result<T, E> + Send + Sync + 'static,
{
    Handler::Sync(Arc::new(move |s: &S, args: &[u8], out: &mut Vec<u8>| {
        let args: A = s.decode(args).map_err(bad_arguments::<A>)?;
        let value = catch_unwind(AssertUnwindSafe(|| f(args)))
            .map_err(|p| Failure::new(FailureKind::Panic, panic_message(&*p)))?
            .map_err(Failure::from_error)?;
        s.encode(&value, out)
            .map_err(|e| Failure::new(FailureKind::BadResult, e))
    }))
}

pub(crate) fn async_handler<S, A, T, E, F, Fut>(f: F) -> Handler<S>
where
    S: Serializer,
    A: DeserializeOwned,
    T: Serialize,
    E: Display + 'static,
    F: Fn(A) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<T, E>> + Send + 'static,
{
    Handler::Async(Arc::new(
        move |s: &S, args: &[u8], id: u64, max_frame: usize| {
            // A user `Deserialize` impl may panic too, not only the handler.
            let future = catch_unwind(AssertUnwindSafe(|| {
                let args: A = s.decode(args).map_err(bad_arguments::<A>)?;
                Ok(f(args))
            }))
            .map_err(|p| Failure::new(FailureKind::Panic, panic_message(&*p)))??;
            let s = s.clone();
            Ok(Box::pin(async move {
                let outcome = CatchUnwind(Box::pin(future)).await;
                let mut out = Vec::new();
                reply_frame(id, max_frame, &mut out, |out| {
                    let value = outcome
                        .map_err(|m| Failure::new(FailureKind::Panic, m))?
                        .map_err(Failure::from_error)?;
                    s.encode(&value, out)
                        .map_err(|e| Failure::new(FailureKind::BadResult, e))
                });
                out
            }) as BoxFuture)
        },
    ))
}

/// Appends a complete reply frame for call `id`: an Ok frame with what `body` encodes, or an
/// Err frame if `body` fails, panics (say, in a user `Serialize` impl), or the result is over
/// the frame cap.
pub(crate) fn reply_frame(
    id: u64,
    max_frame: usize,
    out: &mut Vec<u8>,
    body: impl FnOnce(&mut Vec<u8>) -> Result<(), Failure>,
) {
    let start = frame::begin(out);
    protocol::encode_ok_head(id, out);
    let outcome = catch_unwind(AssertUnwindSafe(|| body(&mut *out)))
        .unwrap_or_else(|p| Err(Failure::new(FailureKind::Panic, panic_message(&*p))));
    let failure = match outcome {
        Ok(()) => match frame::finish(out, start, max_frame) {
            Ok(()) => return,
            Err(e) => Failure::new(FailureKind::BadResult, e),
        },
        Err(failure) => {
            out.truncate(start);
            failure
        }
    };
    error_frame(id, &failure, max_frame, out);
}

pub(crate) fn error_frame(id: u64, failure: &Failure, max_frame: usize, out: &mut Vec<u8>) {
    let start = frame::begin(out);
    let limit = MAX_MESSAGE.min(max_frame.saturating_sub(16));
    let mut end = failure.message.len().min(limit);
    while !failure.message.is_char_boundary(end) {
        end -= 1;
    }
    let message = &failure.message[..end];
    if failure.kind == FailureKind::Refused {
        if let Some(backoff) = failure.retry_after {
            super::refuse::back_off(backoff);
        }
        protocol::encode_refused(id, failure.retry_after, message, out);
    } else {
        protocol::encode_err(id, failure.kind, message, out);
    }
    // Cannot fail: the message was cut to fit.
    let _ = frame::finish(out, start, max_frame);
}

/// The message of a panic payload (`panic!("...")` gives a `&str` or a `String`).
pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_owned()
    }
}

/// Turns a panic while polling the inner future into an `Err` with its message.
struct CatchUnwind<F>(Pin<Box<F>>);

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.0.as_mut();
        match catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Ready(value)) => Poll::Ready(Ok(value)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(payload) => Poll::Ready(Err(panic_message(&*payload))),
        }
    }
}
