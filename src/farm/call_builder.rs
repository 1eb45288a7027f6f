//! Calls under the caller's control: per-call options ([`CallBuilder`]), and a handle
//! that can cancel its call and tell where it ran ([`CallHandle`]).

use super::call::{Answer, CallInfo, CallOpts, Outcome, Place};
use super::dispatcher::CancelWhy;
use super::{decode_result, type_name, Abandon, Core, Farm, Received, Submitted, Unsent};
use crate::error::CallError;
use crate::serializer::Serializer;
use serde::{de::DeserializeOwned, Serialize};
use std::future::{Future, IntoFuture};
use std::hash::{Hash, Hasher};
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

/// A call with options, from [`Farm::call`]. Nothing is sent until it is awaited or
/// [`start`](Self::start)ed.
///
/// ```no_run
/// # use workfarm::{Farm, CallError};
/// # use std::time::Duration;
/// # async fn demo(farm: Farm) -> Result<(), CallError> {
/// // End to end: queue wait included. Past it the call is not sent, or is stopped.
/// let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
/// let user: String = farm
///     .call("profile", 42)
///     .deadline(deadline)
///     .key(42) // every call for user 42 runs on the same worker
///     .await?;
/// # Ok(())
/// # }
/// ```
#[must_use = "a call is sent only when awaited or started"]
pub struct CallBuilder<'a, S: Serializer, A, T> {
    farm: &'a Farm<S>,
    method: &'a str,
    args: A,
    opts: CallOpts,
    cancel_on_drop: bool,
    _result: PhantomData<fn() -> T>,
}

impl<S: Serializer, A, T> std::fmt::Debug for CallBuilder<'_, S, A, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallBuilder")
            .field("method", &self.method)
            .field("opts", &self.opts)
            .field("cancel_on_drop", &self.cancel_on_drop)
            .finish_non_exhaustive()
    }
}

impl<'a, S, A, T> CallBuilder<'a, S, A, T>
where
    S: Serializer,
    A: Serialize,
    T: DeserializeOwned,
{
    pub(super) fn new(farm: &'a Farm<S>, method: &'a str, args: A) -> Self {
        CallBuilder {
            farm,
            method,
            args,
            opts: CallOpts::new(),
            cancel_on_drop: false,
            _result: PhantomData,
        }
    }

    /// How long each attempt may run once started, instead of the farm's `timeout`.
    /// Past it the call fails with [`CallError::Timeout`] (or is retried) and its worker
    /// is stopped, as for the farm's.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.opts.timeout = Some(timeout);
        self
    }

    /// How many times it may be re-run after an attempt that failed (a crash, a timeout),
    /// instead of the farm's `max_retries`.
    pub fn retries(mut self, retries: u32) -> Self {
        self.opts.retries = Some(retries);
        self
    }

    /// When the call must be done, queue wait included. A call whose deadline passes
    /// before it starts is never sent (or is taken back from the worker where it waits)
    /// and fails with [`CallError::Deadline`]` { ran: false }`; one still running then is
    /// stopped with its worker, as for a timeout, and fails with `Deadline { ran: true }`.
    /// Never retried past it.
    pub fn deadline(mut self, deadline: impl Into<Instant>) -> Self {
        self.opts.deadline = Some(deadline.into());
        self
    }

    /// Sticky routing (jest-worker's `computeWorkerKey`): calls with equal keys run on the
    /// same worker, the one in the pool slot the key hashes to. While that worker is busy
    /// they wait for it, and other calls pass them; when it goes (crash, `ttl`, memory),
    /// every key of its slot moves to its replacement together.
    pub fn key(mut self, key: impl Hash) -> Self {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut hasher);
        self.opts.key = Some(hasher.finish());
        self
    }

    /// Dropping the call's future (or [`CallHandle`]) before it settles cancels the call,
    /// as [`CallHandle::cancel`] does, rather than leave it running; so a call wrapped in
    /// `tokio::time::timeout` or `select!` stops when it loses.
    pub fn cancel_on_drop(mut self) -> Self {
        self.cancel_on_drop = true;
        self
    }

    /// Sends the call (with `max_concurrent_calls` reached, it is sent when a place frees,
    /// while the handle is polled) and returns its handle.
    pub fn start(self) -> CallHandle<T>
    where
        T: 'static,
    {
        match self.begin(true) {
            Ok(handle) => handle,
            Err((handle, _)) => handle,
        }
    }

    /// Sends the call, or fails at once with [`CallError::QueueFull`] when
    /// `max_concurrent_calls` are out (or with the encoding error).
    pub fn try_start(self) -> Result<CallHandle<T>, CallError>
    where
        T: 'static,
    {
        self.begin(false).map_err(|(_, error)| error)
    }

    /// The handle; on an error, also a handle that yields it.
    #[allow(clippy::result_large_err)]
    fn begin(self, wait: bool) -> Result<CallHandle<T>, (CallHandle<T>, CallError)>
    where
        T: 'static,
    {
        let CallBuilder {
            farm,
            method,
            args,
            mut opts,
            cancel_on_drop,
            _result,
        } = self;
        // A handle may be asked where its call ran.
        opts.made = Some(std::time::Instant::now());
        let core = farm.core.clone();
        let id = core.next_call.fetch_add(1, Ordering::Relaxed);
        let deadline = opts.deadline;
        let shared = CancelShared::new(id, &core);
        let submitted = farm
            .encode_call(id, method, |s, buf| s.encode(&args, buf), type_name::<A>())
            .and_then(|frame| core.queue(frame, Some(Box::new(opts)), wait));
        let submitted = match submitted {
            Ok(submitted) => submitted,
            Err(error) => {
                let failed = error.clone();
                let inner = Box::pin(async move { Err(failed) });
                let handle = CallHandle::new(id, inner, shared, false);
                return Err((handle, error));
            }
        };
        if matches!(submitted, Submitted::Queued(..)) {
            shared.sent.store(true, Ordering::SeqCst);
        }
        let serializer = farm.serializer.clone();
        let method: Box<str> = method.into();
        // The rare paths (no place yet; a deadline to watch) are boxed futures of their
        // own, so the common one stays small.
        let start = match submitted {
            Submitted::Queued(rx, place) => Start::Queued(rx, place),
            Submitted::Full(full) => Start::Waiting(Box::pin(wait_for_place(
                core.clone(),
                *full,
                shared.clone(),
                deadline,
            ))),
        };
        let inner = Box::pin(async move {
            let (rx, place) = match start {
                Start::Queued(rx, place) => (rx, place),
                Start::Waiting(waiting) => waiting.await?,
            };
            // Held until the call settles or this future is dropped, whichever comes first.
            let _place = place.map(Abandon);
            let received = match deadline {
                None => rx.await,
                Some(deadline) => Box::pin(watch_deadline(rx, deadline, &core, id)).await,
            };
            let Answer { body, info } = match received {
                Ok(Ok(answer)) => *answer,
                Ok(Err(error)) => return Err(*error),
                Err(_) => return Err(CallError::ShutDown),
            };
            let value = decode_result(&serializer, &method, &body)?;
            Ok((value, info))
        });
        Ok(CallHandle::new(id, inner, shared, cancel_on_drop))
    }
}

/// Where a call's future starts from.
enum Start {
    Queued(oneshot::Receiver<Outcome>, Option<Place>),
    Waiting(Pin<Box<dyn Future<Output = Result<Received, CallError>> + Send>>),
}

/// Waits for a `max_concurrent_calls` place, then queues the call; gives up if it is
/// cancelled or its deadline passes first (it was never sent).
async fn wait_for_place(
    core: Arc<Core>,
    (frame, opts): Unsent,
    flag: Arc<CancelShared>,
    deadline: Option<Instant>,
) -> Result<Received, CallError> {
    let expired = async {
        match deadline {
            Some(deadline) => tokio::time::sleep_until(deadline).await,
            None => std::future::pending().await,
        }
    };
    let queued = tokio::select! {
        queued = core.queue_when_room(frame, opts) => queued?,
        () = flag.notify.notified() => return Err(CallError::Cancelled),
        () = expired => return Err(CallError::Deadline { ran: false }),
    };
    flag.sent.store(true, Ordering::SeqCst);
    if flag.cancelled.load(Ordering::SeqCst) {
        core.cancel(flag.id, CancelWhy::Cancelled);
    }
    Ok(queued)
}

/// Waits for a call's outcome; at its deadline asks the farm to settle it as expired (the
/// farm does, unless it settled first) and goes on waiting for that.
async fn watch_deadline(
    mut rx: oneshot::Receiver<Outcome>,
    deadline: Instant,
    core: &Core,
    id: u64,
) -> Result<Outcome, oneshot::error::RecvError> {
    tokio::select! {
        outcome = &mut rx => return outcome,
        () = tokio::time::sleep_until(deadline) => core.cancel(id, CancelWhy::Expired),
    }
    rx.await
}

impl<'a, S, A, T> IntoFuture for CallBuilder<'a, S, A, T>
where
    S: Serializer,
    A: Serialize,
    T: DeserializeOwned + 'static,
{
    type Output = Result<T, CallError>;
    type IntoFuture = CallFuture<S, T>;

    /// Sends the call (with `max_concurrent_calls` reached, when a place frees, while the
    /// future is polled). Lighter than [`start`](CallBuilder::start): no handle, so nothing
    /// to cancel but by `cancel_on_drop`, and no [`CallInfo`].
    fn into_future(self) -> CallFuture<S, T> {
        let CallBuilder {
            farm,
            method,
            args,
            opts,
            cancel_on_drop,
            _result,
        } = self;
        let id = farm.core.next_call.fetch_add(1, Ordering::Relaxed);
        let deadline = opts.deadline;
        let submitted = farm
            .encode_call(id, method, |s, buf| s.encode(&args, buf), type_name::<A>())
            .and_then(|frame| farm.core.queue(frame, Some(Box::new(opts)), true));
        let state = match submitted {
            Ok(Submitted::Queued(rx, place)) => State::Queued(rx, place.map(Abandon)),
            Ok(Submitted::Full(full)) => {
                let flag = CancelShared::new(id, &farm.core);
                State::Waiting(Box::pin(wait_for_place(
                    farm.core.clone(),
                    *full,
                    flag,
                    deadline,
                )))
            }
            Err(error) => State::Failed(Box::new(error)),
        };
        CallFuture {
            id,
            state,
            serializer: farm.serializer.clone(),
            method: method.into(),
            // Only a call that may send a cancel or an expiry needs to reach the farm.
            core: (cancel_on_drop || deadline.is_some()).then(|| Arc::downgrade(&farm.core)),
            deadline,
            sleep: None,
            cancel_on_drop,
            _result: PhantomData,
        }
    }
}

/// What awaiting a [`CallBuilder`] gives: the call's result. Like a `run` future it keeps
/// its farm alive until the call settles; dropping it abandons the call, or cancels it with
/// [`cancel_on_drop`](CallBuilder::cancel_on_drop).
#[must_use = "futures do nothing unless polled"]
pub struct CallFuture<S: Serializer, T> {
    id: u64,
    state: State,
    serializer: S,
    method: Box<str>,
    /// For a cancel or an expiry (`None` without either); the farm lives on while the
    /// caller waits regardless.
    core: Option<Weak<Core>>,
    deadline: Option<Instant>,
    /// Watches the deadline once the call is queued; `None` once it fired.
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    cancel_on_drop: bool,
    _result: PhantomData<fn() -> T>,
}

enum State {
    /// Sent: its outcome arrives on the receiver. The place is held for its drop.
    Queued(
        oneshot::Receiver<Outcome>,
        #[allow(dead_code)] Option<Abandon>,
    ),
    Waiting(Pin<Box<dyn Future<Output = Result<Received, CallError>> + Send>>),
    Failed(Box<CallError>),
    Done,
}

// Nothing in it is pinned structurally: what needs pinning is boxed.
impl<S: Serializer, T> Unpin for CallFuture<S, T> {}

impl<S: Serializer, T> std::fmt::Debug for CallFuture<S, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallFuture")
            .field("id", &self.id)
            .field("method", &self.method)
            .finish_non_exhaustive()
    }
}

impl<S: Serializer, T: DeserializeOwned> Future for CallFuture<S, T> {
    type Output = Result<T, CallError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                State::Waiting(waiting) => match waiting.as_mut().poll(cx) {
                    Poll::Ready(Ok((rx, place))) => {
                        this.state = State::Queued(rx, place.map(Abandon));
                    }
                    Poll::Ready(Err(error)) => {
                        this.state = State::Done;
                        return Poll::Ready(Err(error));
                    }
                    Poll::Pending => return Poll::Pending,
                },
                State::Queued(rx, _) => {
                    if let Some(deadline) = this.deadline {
                        let sleep = this
                            .sleep
                            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                        if sleep.as_mut().poll(cx).is_ready() {
                            // The farm settles it as expired, unless it settled first.
                            this.deadline = None;
                            this.sleep = None;
                            if let Some(core) = this.core.as_ref().and_then(Weak::upgrade) {
                                core.cancel(this.id, CancelWhy::Expired);
                            }
                        }
                    }
                    let received = match Pin::new(rx).poll(cx) {
                        Poll::Ready(received) => received,
                        Poll::Pending => return Poll::Pending,
                    };
                    this.state = State::Done;
                    return Poll::Ready(match received {
                        Ok(Ok(answer)) => {
                            decode_result(&this.serializer, &this.method, &answer.body)
                        }
                        Ok(Err(error)) => Err(*error),
                        Err(_) => Err(CallError::ShutDown),
                    });
                }
                State::Failed(error) => {
                    let error = std::mem::replace(&mut **error, CallError::ShutDown);
                    this.state = State::Done;
                    return Poll::Ready(Err(error));
                }
                // Polled after it completed.
                State::Done => return Poll::Ready(Err(CallError::ShutDown)),
            }
        }
    }
}

impl<S: Serializer, T> Drop for CallFuture<S, T> {
    fn drop(&mut self) {
        // Only a call that was sent has anything to cancel; one still waiting for a
        // place is never sent once its future is gone.
        if self.cancel_on_drop && matches!(self.state, State::Queued(..)) {
            if let Some(core) = self.core.as_ref().and_then(Weak::upgrade) {
                core.cancel(self.id, CancelWhy::Cancelled);
            }
        }
    }
}

type Inner<T> = Pin<Box<dyn Future<Output = Result<(T, Option<CallInfo>), CallError>> + Send>>;

/// A call in progress, from [`CallBuilder::start`]: a future of its result that can also
/// cancel it. It keeps its farm alive until the call settles.
#[must_use = "dropping the handle abandons the call (and cancels it with cancel_on_drop)"]
pub struct CallHandle<T> {
    id: u64,
    inner: Inner<T>,
    shared: Arc<CancelShared>,
    cancel_on_drop: bool,
    done: bool,
}

impl<T> std::fmt::Debug for CallHandle<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallHandle")
            .field("id", &self.id)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl<T> CallHandle<T> {
    fn new(id: u64, inner: Inner<T>, shared: Arc<CancelShared>, cancel_on_drop: bool) -> Self {
        CallHandle {
            id,
            inner,
            shared,
            cancel_on_drop,
            done: false,
        }
    }

    /// The call's id, unique within its farm: the one [`Event::CallDone`] and
    /// [`Event::TellFailed`] carry.
    ///
    /// [`Event::CallDone`]: crate::Event::CallDone
    /// [`Event::TellFailed`]: crate::Event::TellFailed
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Cancels the call; the handle then yields [`CallError::Cancelled`], unless the call
    /// settled first (then it yields that: a call settles once). Queued, or waiting inside a
    /// worker, the call never runs. Running an async handler, the worker drops the
    /// handler's future. Running a sync handler, which cannot be interrupted, the worker is
    /// stopped if the call is the only one running on it (calls waiting in it move to
    /// other workers, uncharged); otherwise the handler runs to its end and its result is
    /// discarded. A cancelled call is never retried.
    pub fn cancel(&self) {
        self.shared.cancel();
    }

    /// A handle that cancels this call from elsewhere (another task, a signal handler).
    pub fn cancel_handle(&self) -> CancelHandle {
        CancelHandle(self.shared.clone())
    }

    /// The call's value together with where and how it ran.
    pub fn with_info(self) -> WithInfo<T> {
        WithInfo(self)
    }

    fn poll_inner(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(T, Option<CallInfo>), CallError>> {
        if self.done {
            // Polled after completion: the value was taken.
            return Poll::Ready(Err(CallError::ShutDown));
        }
        let ready = self.inner.as_mut().poll(cx);
        if ready.is_ready() {
            self.done = true;
            self.shared.settled.store(true, Ordering::Relaxed);
        }
        ready
    }
}

impl<T> Future for CallHandle<T> {
    type Output = Result<T, CallError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.get_mut()
            .poll_inner(cx)
            .map(|outcome| outcome.map(|(value, _)| value))
    }
}

impl<T> Drop for CallHandle<T> {
    fn drop(&mut self) {
        if self.cancel_on_drop && !self.done {
            self.shared.cancel();
        }
    }
}

/// What [`CallHandle::with_info`] returns: a future of the value and its [`CallInfo`].
#[must_use = "futures do nothing unless polled"]
#[derive(Debug)]
pub struct WithInfo<T>(CallHandle<T>);

impl<T> Future for WithInfo<T> {
    type Output = Result<(T, CallInfo), CallError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.get_mut().0.poll_inner(cx).map(|outcome| {
            let (value, info) = outcome?;
            // Every call made with options answers with its info.
            let info = info.ok_or(CallError::ShutDown)?;
            Ok((value, info))
        })
    }
}

/// Cancels one call from anywhere; see [`CallHandle::cancel`]. Cheap to clone; does not
/// keep the farm alive.
#[derive(Debug, Clone)]
pub struct CancelHandle(Arc<CancelShared>);

impl CancelHandle {
    /// Cancels the call (a no-op once it has settled).
    pub fn cancel(&self) {
        self.0.cancel();
    }
}

/// Shared by a call's handle, its future and its cancel handles.
#[derive(Debug)]
struct CancelShared {
    id: u64,
    core: Weak<Core>,
    /// The call is in the farm's queue: a cancel must go to the dispatcher.
    sent: AtomicBool,
    cancelled: AtomicBool,
    /// Its handle has yielded: nothing left to cancel.
    settled: AtomicBool,
    /// Wakes a call still waiting for a place.
    notify: Notify,
}

impl CancelShared {
    fn new(id: u64, core: &Arc<Core>) -> Arc<Self> {
        Arc::new(CancelShared {
            id,
            core: Arc::downgrade(core),
            sent: AtomicBool::new(false),
            cancelled: AtomicBool::new(false),
            settled: AtomicBool::new(false),
            notify: Notify::new(),
        })
    }

    /// Flags the call cancelled and, if it was sent, tells the dispatcher. Its future does
    /// the same check the other way round once it sends the call, so of the two at least
    /// one tells (the dispatcher ignores a second word).
    fn cancel(&self) {
        if self.settled.load(Ordering::Relaxed) || self.cancelled.swap(true, Ordering::SeqCst) {
            return;
        }
        self.notify.notify_one();
        if self.sent.load(Ordering::SeqCst) {
            if let Some(core) = self.core.upgrade() {
                core.cancel(self.id, CancelWhy::Cancelled);
            }
        }
    }
}
