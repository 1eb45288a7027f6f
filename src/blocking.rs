//! A blocking API for programs that are not async (the `reqwest::blocking` model).
//!
//! [`Farm`] owns a small tokio runtime on a thread of its own, where the farm's dispatcher
//! runs; each call blocks the calling thread until its result is in. It is `Send + Sync`
//! and cheap to clone, so plain threads can share one farm.
//!
//! ```no_run
//! use workfarm::blocking::Farm;
//! use workfarm::FarmOptions;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let farm = Farm::create(FarmOptions::new("target/release/workfarm-worker").workers(4))?;
//! let sum: i64 = farm.run_method("add", (1, 2))?;
//! assert_eq!(sum, 3);
//! for square in farm.map::<_, _, i64>("noop", 0..10i64) {
//!     println!("{}", square?);
//! }
//! farm.shutdown();
//! # Ok(())
//! # }
//! ```
//!
//! Do not use it from inside an async runtime: blocking there stalls the runtime's thread
//! (use [`crate::Farm`]). Dropping the last handle kills the workers and waits until they
//! have exited; call [`shutdown`](Farm::shutdown) first to let calls in flight (and
//! [`tell`](Farm::tell)s) finish.

use crate::error::{CallError, CreateError};
use crate::event::Event;
use crate::options::FarmOptions;
use crate::serializer::{Json, Serializer};
use crate::{Broadcast, CallInfo, Load, Status};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{de::DeserializeOwned, Serialize};
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;
use tokio::runtime::Runtime;
use tokio::sync::{broadcast, watch};

/// A farm for blocking code. See the [module docs](self).
#[derive(Debug)]
pub struct Farm<S: Serializer = Json> {
    inner: Arc<Inner<S>>,
}

impl<S: Serializer> Clone for Farm<S> {
    fn clone(&self) -> Self {
        Farm {
            inner: self.inner.clone(),
        }
    }
}

#[derive(Debug)]
struct Inner<S: Serializer> {
    farm: crate::Farm<S>,
    handle: tokio::runtime::Handle,
    /// Taken in `Drop`, which decides how the runtime ends.
    runtime: Option<Runtime>,
}

impl<S: Serializer> Drop for Inner<S> {
    fn drop(&mut self) {
        let Some(runtime) = self.runtime.take() else {
            return;
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            // Inside an async context a runtime cannot block; its tasks are dropped, and
            // each worker process with its supervising task.
            runtime.shutdown_background();
        } else {
            runtime.block_on(self.farm.kill());
        }
    }
}

impl<S: Serializer> Farm<S> {
    /// Starts a runtime thread and a farm on it. See [`crate::Farm::create`].
    ///
    /// # Errors
    ///
    /// As [`crate::Farm::create`], and [`CreateError::Runtime`] if the runtime thread
    /// cannot start.
    pub fn create(options: FarmOptions<S>) -> Result<Self, CreateError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("workfarm-runtime")
            .enable_all()
            .build()
            .map_err(|source| CreateError::Runtime { source })?;
        let farm = {
            let _entered = runtime.enter();
            crate::Farm::create(options)?
        };
        Ok(Farm {
            inner: Arc::new(Inner {
                farm,
                handle: runtime.handle().clone(),
                runtime: Some(runtime),
            }),
        })
    }

    /// The async farm inside, for the rare call this API lacks (await it with
    /// [`block_on`](Self::block_on)).
    pub fn as_async(&self) -> &crate::Farm<S> {
        &self.inner.farm
    }

    /// Runs `future` on the farm's runtime and blocks until it completes.
    pub fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.inner.handle.block_on(future)
    }

    /// Runs the default method. See [`crate::Farm::run`].
    pub fn run<A: Serialize, T: DeserializeOwned>(&self, args: A) -> Result<T, CallError> {
        self.run_method("", args)
    }

    /// Runs `method`. See [`crate::Farm::run_method`].
    pub fn run_method<A: Serialize, T: DeserializeOwned>(
        &self,
        method: &str,
        args: A,
    ) -> Result<T, CallError> {
        self.block_on(self.as_async().run_method(method, args))
    }

    /// Runs `method`, failing at once with `QueueFull` when `max_concurrent_calls` are out.
    /// See [`crate::Farm::try_run_method`].
    pub fn try_run_method<A: Serialize, T: DeserializeOwned>(
        &self,
        method: &str,
        args: A,
    ) -> Result<T, CallError> {
        self.block_on(self.as_async().try_run_method(method, args))
    }

    /// A call with per-call options. See [`crate::Farm::call`].
    pub fn call<'a, A, T>(&'a self, method: &'a str, args: A) -> CallBuilder<'a, S, A, T>
    where
        A: Serialize,
        T: DeserializeOwned + 'static,
    {
        CallBuilder {
            farm: self,
            call: self.as_async().call(method, args),
        }
    }

    /// Runs `method` on every live worker. See [`crate::Farm::broadcast_method`].
    pub fn broadcast_method<A: Serialize, T: DeserializeOwned>(
        &self,
        method: &str,
        args: A,
    ) -> Broadcast<T> {
        self.block_on(self.as_async().broadcast_method(method, args))
    }

    /// Queues a call whose result nobody waits for. See [`crate::Farm::tell`].
    pub fn tell<A: Serialize>(&self, method: &str, args: A) -> Result<u64, CallError> {
        self.as_async().tell(method, args)
    }

    /// Runs `method` with pre-encoded arguments. See [`crate::Farm::run_raw`].
    pub fn run_raw(&self, method: &str, args: Bytes) -> Result<Bytes, CallError> {
        self.block_on(self.as_async().run_raw(method, args))
    }

    /// Maps `method` over `inputs`, results in input order, as an [`Iterator`] that keeps
    /// calls in flight ahead of the one it waits for. See [`crate::Farm::map`].
    pub fn map<I, A, T>(&self, method: &str, inputs: I) -> Map<S, I::IntoIter, T>
    where
        I: IntoIterator<Item = A>,
        A: Serialize,
        T: DeserializeOwned + Send + 'static,
    {
        Map {
            farm: self.clone(),
            stream: self.as_async().map(method, inputs),
        }
    }

    /// Maps `method` over `inputs`, each result (with its input's index) as it completes.
    /// See [`crate::Farm::map_unordered`].
    pub fn map_unordered<I, A, T>(&self, method: &str, inputs: I) -> MapUnordered<S, I::IntoIter, T>
    where
        I: IntoIterator<Item = A>,
        A: Serialize,
        T: DeserializeOwned + Send + 'static,
    {
        MapUnordered {
            farm: self.clone(),
            stream: self.as_async().map_unordered(method, inputs),
        }
    }

    /// The farm's events; read them with `blocking_recv`. See [`crate::Farm::events`].
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.as_async().events()
    }

    /// The farm's load. See [`crate::Farm::load`].
    pub fn load(&self) -> watch::Receiver<Load> {
        self.as_async().load()
    }

    /// A snapshot of the workers and the queue.
    pub fn status(&self) -> Status {
        self.block_on(self.as_async().status())
    }

    /// What the farm has done so far. See [`crate::Farm::stats`].
    pub fn stats(&self) -> crate::Stats {
        self.block_on(self.as_async().stats())
    }

    /// The last lines of slot `slot`'s stderr. See [`crate::Farm::stderr`].
    pub fn stderr(&self, slot: usize) -> Vec<crate::StderrLine> {
        self.as_async().stderr(slot)
    }

    /// Blocks until every worker has finished its handshake. See [`crate::Farm::ready`].
    pub fn ready(&self) -> Result<(), CallError> {
        self.block_on(self.as_async().ready())
    }

    /// Graceful stop; returns when every worker has exited. See [`crate::Farm::shutdown`].
    pub fn shutdown(&self) {
        self.block_on(self.as_async().shutdown());
    }

    /// Immediate stop; returns when every worker has exited. See [`crate::Farm::kill`].
    pub fn kill(&self) {
        self.block_on(self.as_async().kill());
    }
}

/// A blocking call with options, from [`Farm::call`]; [`run`](Self::run) sends it and
/// waits. The options are those of [`crate::CallBuilder`].
#[must_use = "a call is sent only when run"]
#[derive(Debug)]
pub struct CallBuilder<'a, S: Serializer, A, T> {
    farm: &'a Farm<S>,
    call: crate::CallBuilder<'a, S, A, T>,
}

impl<S, A, T> CallBuilder<'_, S, A, T>
where
    S: Serializer,
    A: Serialize,
    T: DeserializeOwned + 'static,
{
    /// See [`crate::CallBuilder::timeout`].
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.call = self.call.timeout(timeout);
        self
    }

    /// See [`crate::CallBuilder::retries`].
    pub fn retries(mut self, retries: u32) -> Self {
        self.call = self.call.retries(retries);
        self
    }

    /// See [`crate::CallBuilder::deadline`].
    pub fn deadline(mut self, deadline: impl Into<tokio::time::Instant>) -> Self {
        self.call = self.call.deadline(deadline);
        self
    }

    /// See [`crate::CallBuilder::key`].
    pub fn key(mut self, key: impl Hash) -> Self {
        self.call = self.call.key(key);
        self
    }

    /// Sends the call and blocks until it settles.
    pub fn run(self) -> Result<T, CallError> {
        let handle = self.call.start();
        self.farm.block_on(handle)
    }

    /// Sends the call and blocks until it settles; the value comes with where it ran.
    pub fn run_with_info(self) -> Result<(T, CallInfo), CallError> {
        let handle = self.call.start();
        self.farm.block_on(handle.with_info())
    }
}

/// The iterator [`Farm::map`] returns.
#[derive(Debug)]
pub struct Map<S: Serializer, I, T> {
    farm: Farm<S>,
    stream: crate::Map<S, I, T>,
}

impl<S, I, T> Iterator for Map<S, I, T>
where
    S: Serializer,
    I: Iterator,
    I::Item: Serialize,
    T: DeserializeOwned + Send + 'static,
{
    type Item = Result<T, CallError>;

    fn next(&mut self) -> Option<Self::Item> {
        let next = self.stream.next();
        self.farm.block_on(next)
    }
}

/// The iterator [`Farm::map_unordered`] returns.
#[derive(Debug)]
pub struct MapUnordered<S: Serializer, I, T> {
    farm: Farm<S>,
    stream: crate::MapUnordered<S, I, T>,
}

impl<S, I, T> Iterator for MapUnordered<S, I, T>
where
    S: Serializer,
    I: Iterator,
    I::Item: Serialize,
    T: DeserializeOwned + Send + 'static,
{
    type Item = (usize, Result<T, CallError>);

    fn next(&mut self) -> Option<Self::Item> {
        let next = self.stream.next();
        self.farm.block_on(next)
    }
}
