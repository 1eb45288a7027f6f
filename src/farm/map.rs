//! [`Farm::map`] and [`Farm::map_unordered`]: a method over an iterator of inputs, as a
//! stream of results, with a bound on the calls in flight.

use super::Farm;
use crate::error::CallError;
use crate::serializer::Serializer;
use futures_core::Stream;
use futures_util::stream::{FuturesOrdered, FuturesUnordered, StreamExt};
use serde::{de::DeserializeOwned, Serialize};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

type Pending<T> = Pin<Box<dyn Future<Output = Result<T, CallError>> + Send>>;
type Indexed<T> = Pin<Box<dyn Future<Output = (usize, Result<T, CallError>)> + Send>>;

/// What both maps share: the inputs not yet sent, and how many calls may be out at once.
struct Feed<S: Serializer, I> {
    farm: Farm<S>,
    method: Box<str>,
    inputs: I,
    /// The input iterator ended.
    exhausted: bool,
    /// Set by `in_flight`; else what the farm can hold at once.
    limit: Option<usize>,
    next_index: usize,
}

impl<S: Serializer, I: Iterator> Feed<S, I> {
    fn new(farm: Farm<S>, method: &str, inputs: I) -> Self {
        Feed {
            farm,
            method: method.into(),
            inputs,
            exhausted: false,
            limit: None,
            next_index: 0,
        }
    }

    fn limit(&self) -> usize {
        self.limit
            .unwrap_or_else(|| self.farm.core.capacity())
            .max(1)
    }

    /// The next input while fewer than the limit are out, with its index.
    fn next_input(&mut self, out: usize) -> Option<(usize, I::Item)> {
        if self.exhausted || out >= self.limit() {
            return None;
        }
        match self.inputs.next() {
            Some(input) => {
                let index = self.next_index;
                self.next_index += 1;
                Some((index, input))
            }
            None => {
                self.exhausted = true;
                None
            }
        }
    }
}

/// The stream [`Farm::map`] returns: results in input order.
///
/// Inputs are pulled from the iterator only as calls complete, so at most
/// [`in_flight`](Self::in_flight) calls are out at a time (by default, as many as the
/// farm's workers can hold at once: their threads, or the calls each may have waiting,
/// or `max_concurrent_calls_per_worker`) and an endless iterator is fine. A result that
/// comes early waits for the ones before it; [`MapUnordered`] does not wait. A failed call
/// is an `Err` item, and the map goes on.
///
/// ```no_run
/// # use workfarm::{Farm, CallError};
/// use futures_util::StreamExt;
/// # async fn demo(farm: Farm) -> Result<(), CallError> {
/// let mut squares = farm.map::<_, _, u64>("square", 0..1_000_000u64).in_flight(64);
/// while let Some(square) = squares.next().await {
///     let _square = square?;
/// }
/// # Ok(())
/// # }
/// ```
#[must_use = "streams do nothing unless polled"]
pub struct Map<S: Serializer, I, T> {
    feed: Feed<S, I>,
    out: FuturesOrdered<Pending<T>>,
}

impl<S: Serializer, I, T> Map<S, I, T> {
    pub(super) fn new(farm: Farm<S>, method: &str, inputs: I) -> Self
    where
        I: Iterator,
    {
        Map {
            feed: Feed::new(farm, method, inputs),
            out: FuturesOrdered::new(),
        }
    }

    /// At most `n` calls out at a time (at least 1).
    pub fn in_flight(mut self, n: usize) -> Self {
        self.feed.limit = Some(n.max(1));
        self
    }
}

// Nothing in a map is pinned structurally: the calls in flight are boxed.
impl<S: Serializer, I, T> Unpin for Map<S, I, T> {}
impl<S: Serializer, I, T> Unpin for MapUnordered<S, I, T> {}

impl<S, I, T> Stream for Map<S, I, T>
where
    S: Serializer,
    I: Iterator,
    I::Item: Serialize,
    T: DeserializeOwned + Send + 'static,
{
    type Item = Result<T, CallError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        while let Some((_, input)) = this.feed.next_input(this.out.len()) {
            let call = this.feed.farm.run_method(&this.feed.method, input);
            this.out.push_back(Box::pin(call));
        }
        match this.out.poll_next_unpin(cx) {
            Poll::Ready(None) if !this.feed.exhausted => {
                // Nothing out and nothing pulled: only with a limit reached, which cannot
                // be with nothing out; pull again on the next poll.
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            other => other,
        }
    }
}

impl<S: Serializer, I, T> std::fmt::Debug for Map<S, I, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Map")
            .field("method", &self.feed.method)
            .field("in_flight", &self.out.len())
            .finish_non_exhaustive()
    }
}

/// The stream [`Farm::map_unordered`] returns: each result as it completes, with the index
/// of its input. The same bound as [`Map`].
#[must_use = "streams do nothing unless polled"]
pub struct MapUnordered<S: Serializer, I, T> {
    feed: Feed<S, I>,
    out: FuturesUnordered<Indexed<T>>,
}

impl<S: Serializer, I, T> MapUnordered<S, I, T> {
    pub(super) fn new(farm: Farm<S>, method: &str, inputs: I) -> Self
    where
        I: Iterator,
    {
        MapUnordered {
            feed: Feed::new(farm, method, inputs),
            out: FuturesUnordered::new(),
        }
    }

    /// At most `n` calls out at a time (at least 1).
    pub fn in_flight(mut self, n: usize) -> Self {
        self.feed.limit = Some(n.max(1));
        self
    }
}

impl<S, I, T> Stream for MapUnordered<S, I, T>
where
    S: Serializer,
    I: Iterator,
    I::Item: Serialize,
    T: DeserializeOwned + Send + 'static,
{
    type Item = (usize, Result<T, CallError>);

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        while let Some((index, input)) = this.feed.next_input(this.out.len()) {
            let call = this.feed.farm.run_method(&this.feed.method, input);
            this.out.push(Box::pin(async move { (index, call.await) }));
        }
        match this.out.poll_next_unpin(cx) {
            Poll::Ready(None) if !this.feed.exhausted => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            other => other,
        }
    }
}

impl<S: Serializer, I, T> std::fmt::Debug for MapUnordered<S, I, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MapUnordered")
            .field("method", &self.feed.method)
            .field("in_flight", &self.out.len())
            .finish_non_exhaustive()
    }
}
