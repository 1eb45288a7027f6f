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

/// What one call of a map yields: one result, or a chunk's.
enum Done<T> {
    One(Result<T, CallError>),
    Chunk(std::vec::IntoIter<Result<T, CallError>>),
}

impl<T> Done<T> {
    /// The next result, leaving the rest (of a chunk) in `rest`.
    fn split(
        self,
        rest: &mut Option<std::vec::IntoIter<Result<T, CallError>>>,
    ) -> Option<Result<T, CallError>> {
        match self {
            Done::One(result) => Some(result),
            Done::Chunk(mut results) => {
                let first = results.next();
                *rest = Some(results);
                first
            }
        }
    }
}

type Pending<T> = Pin<Box<dyn Future<Output = Done<T>> + Send>>;
type Indexed<T> = Pin<Box<dyn Future<Output = (usize, Done<T>)> + Send>>;

/// What both maps share: the inputs not yet sent, and how many calls may be out at once.
struct Feed<S: Serializer, I> {
    farm: Farm<S>,
    method: Box<str>,
    inputs: I,
    /// The input iterator ended.
    exhausted: bool,
    /// Set by `in_flight`; else what the farm can hold at once.
    limit: Option<usize>,
    /// Inputs sent in one call (1: a call per input).
    chunk_size: usize,
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
            chunk_size: 1,
            next_index: 0,
        }
    }

    fn limit(&self) -> usize {
        self.limit
            .unwrap_or_else(|| self.farm.core.capacity())
            .max(1)
    }

    /// The next call to make while fewer than the limit are out: the index of its first
    /// input, and the call's future.
    fn next_call<T>(&mut self, out: usize) -> Option<(usize, Pending<T>)>
    where
        I::Item: Serialize,
        T: DeserializeOwned + Send + 'static,
    {
        if self.exhausted || out >= self.limit() {
            return None;
        }
        let index = self.next_index;
        if self.chunk_size <= 1 {
            let Some(input) = self.inputs.next() else {
                self.exhausted = true;
                return None;
            };
            self.next_index += 1;
            let call = self.farm.run_method(&self.method, input);
            return Some((index, Box::pin(async move { Done::One(call.await) })));
        }
        let chunk: Vec<I::Item> = self.inputs.by_ref().take(self.chunk_size).collect();
        if chunk.len() < self.chunk_size {
            self.exhausted = true;
        }
        if chunk.is_empty() {
            return None;
        }
        self.next_index += chunk.len();
        let call = self.farm.run_batch(&self.method, &chunk);
        Some((
            index,
            Box::pin(async move { Done::Chunk(call.await.into_iter()) }),
        ))
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
    /// What is left of the chunk being yielded.
    rest: Option<std::vec::IntoIter<Result<T, CallError>>>,
}

impl<S: Serializer, I, T> Map<S, I, T> {
    pub(super) fn new(farm: Farm<S>, method: &str, inputs: I) -> Self
    where
        I: Iterator,
    {
        Map {
            feed: Feed::new(farm, method, inputs),
            out: FuturesOrdered::new(),
            rest: None,
        }
    }

    /// At most `n` calls out at a time (at least 1).
    pub fn in_flight(mut self, n: usize) -> Self {
        self.feed.limit = Some(n.max(1));
        self
    }

    /// Sends `n` inputs per call (ProcessPoolExecutor's `chunksize`): the worker runs the
    /// method on each in turn and answers them together, so short calls pay the round trip
    /// once per chunk. Results still come one per input; a failed input is its own `Err`,
    /// a failed call (a crash, a timeout) is every input's of the chunk. The bound counts
    /// calls, so up to `in_flight × n` inputs are out. Default 1.
    pub fn chunk_size(mut self, n: usize) -> Self {
        self.feed.chunk_size = n.max(1);
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
        loop {
            if let Some(result) = this.rest.as_mut().and_then(Iterator::next) {
                return Poll::Ready(Some(result));
            }
            this.rest = None;
            while let Some((_, call)) = this.feed.next_call(this.out.len()) {
                this.out.push_back(call);
            }
            match this.out.poll_next_unpin(cx) {
                Poll::Ready(Some(done)) => {
                    if let Some(result) = done.split(&mut this.rest) {
                        return Poll::Ready(Some(result));
                    }
                }
                Poll::Ready(None) if this.feed.exhausted => return Poll::Ready(None),
                // Nothing out yet more inputs: cannot be (they would have been sent);
                // loop to send them.
                Poll::Ready(None) => {}
                Poll::Pending => return Poll::Pending,
            }
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
    /// What is left of the chunk being yielded, and the index of its next input.
    rest: Option<(usize, std::vec::IntoIter<Result<T, CallError>>)>,
}

impl<S: Serializer, I, T> MapUnordered<S, I, T> {
    pub(super) fn new(farm: Farm<S>, method: &str, inputs: I) -> Self
    where
        I: Iterator,
    {
        MapUnordered {
            feed: Feed::new(farm, method, inputs),
            out: FuturesUnordered::new(),
            rest: None,
        }
    }

    /// At most `n` calls out at a time (at least 1).
    pub fn in_flight(mut self, n: usize) -> Self {
        self.feed.limit = Some(n.max(1));
        self
    }

    /// Sends `n` inputs per call; see [`Map::chunk_size`].
    pub fn chunk_size(mut self, n: usize) -> Self {
        self.feed.chunk_size = n.max(1);
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
        loop {
            if let Some((index, rest)) = &mut this.rest {
                if let Some(result) = rest.next() {
                    *index += 1;
                    return Poll::Ready(Some((*index - 1, result)));
                }
            }
            this.rest = None;
            while let Some((index, call)) = this.feed.next_call(this.out.len()) {
                this.out.push(Box::pin(async move { (index, call.await) }));
            }
            match this.out.poll_next_unpin(cx) {
                Poll::Ready(Some((index, done))) => {
                    let mut rest = None;
                    let first = done.split(&mut rest);
                    this.rest = rest.map(|rest| (index + 1, rest));
                    if let Some(result) = first {
                        return Poll::Ready(Some((index, result)));
                    }
                }
                Poll::Ready(None) if this.feed.exhausted => return Poll::Ready(None),
                Poll::Ready(None) => {}
                Poll::Pending => return Poll::Pending,
            }
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
