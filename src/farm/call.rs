//! A pending call and its reply slot.

use crate::error::CallError;
use crate::event::WorkerId;
use bytes::Bytes;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{oneshot, Semaphore};
use tokio::time::Instant;

/// What a call settles with: the encoded result, or why there is none. Both are boxed so
/// the reply slot a queued call allocates stays small (80 bytes instead of 112); the box is
/// only filled when the call completes.
pub(crate) type Outcome = Result<Box<Answer>, Box<CallError>>;

/// A call's encoded result, and where it ran when the caller asked (calls made with
/// options only; see [`CallOpts`]).
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) body: Bytes,
    pub(crate) info: Option<CallInfo>,
}

/// Where and how a call ran: what [`CallHandle::with_info`](crate::CallHandle::with_info)
/// yields beside the value.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CallInfo {
    /// The call's id, as in [`Event::CallDone`](crate::Event::CallDone).
    pub id: u64,
    /// The worker that answered it.
    pub worker: WorkerId,
    /// That worker's process id.
    pub pid: u32,
    /// Attempts started, the last one included (1 unless it was retried).
    pub attempts: u32,
    /// From the call being made to its last attempt starting: time in the farm's queue
    /// and waiting inside a worker, and earlier failed attempts.
    pub queued_for: Duration,
    /// From its last attempt starting to its answer arriving.
    pub ran_for: Duration,
}

/// What a call made with options asks beyond the farm's settings. Boxed in the [`Call`],
/// so a plain call pays one null pointer for them.
#[derive(Debug)]
pub(crate) struct CallOpts {
    /// Overrides the farm's `timeout`.
    pub(crate) timeout: Option<Duration>,
    /// Overrides the farm's `max_retries`.
    pub(crate) retries: Option<u32>,
    /// End to end: past it the call is not sent, or is stopped.
    pub(crate) deadline: Option<Instant>,
    /// Sticky routing: the hash of the caller's key.
    pub(crate) key: Option<u64>,
    /// When the call was made, if the caller may ask where it ran (a [`CallHandle`]); std's
    /// clock, for reporting only. `None`: no clock is read for it.
    ///
    /// [`CallHandle`]: crate::CallHandle
    pub(crate) made: Option<std::time::Instant>,
    /// When its last attempt started.
    pub(crate) started: Option<std::time::Instant>,
    /// Cancelled while it ran: its reply is settled, its worker's answer will be discarded.
    pub(crate) cancelled: bool,
}

impl CallOpts {
    pub(crate) fn new() -> Self {
        CallOpts {
            timeout: None,
            retries: None,
            deadline: None,
            key: None,
            made: None,
            started: None,
            cancelled: false,
        }
    }

    /// Whether it has a deadline and that has passed (the clock is read only if it has).
    pub(crate) fn expired(&self) -> bool {
        self.deadline.is_some_and(|d| d <= Instant::now())
    }
}

/// The caller's end of a call. Settles exactly once: by [`Reply::send`], or, if the call is
/// dropped unanswered (farm killed, dispatcher gone, runtime shut down), by the channel
/// closing, which the caller reads as [`CallError::ShutDown`] (hyper's dispatch `Callback`
/// does the same with a drop guard).
#[derive(Debug)]
pub(crate) struct Reply {
    tx: oneshot::Sender<Outcome>,
    place: Option<Place>,
}

/// `max_concurrent_calls`: the semaphore, and how many calls were abandoned since the
/// dispatcher last swept them out of its queue.
#[derive(Debug)]
pub(crate) struct Limiter {
    pub(crate) semaphore: Arc<Semaphore>,
    pub(crate) limit: usize,
    pub(crate) abandoned: AtomicUsize,
}

/// One permit of the `max_concurrent_calls` semaphore, acquired and forgotten when the call
/// is made, held twice: by the call's [`Reply`] and by the caller's future. Whichever lets
/// go first gives it back, once: the reply when the call settles (before the caller is
/// woken, so a caller that awaits each call before making the next never sees `QueueFull`),
/// or the caller's future when it is dropped (an abandoned call frees its place at once,
/// even while it still waits in the queue).
#[derive(Debug)]
pub(crate) struct Place(Arc<PlaceInner>);

#[derive(Debug)]
struct PlaceInner {
    limiter: Arc<Limiter>,
    given_back: AtomicBool,
}

impl Place {
    /// Takes a permit, or `None` if there is none.
    pub(crate) fn acquire(limiter: &Arc<Limiter>) -> Option<Place> {
        limiter.semaphore.try_acquire().ok()?.forget();
        Some(Place::taken(limiter))
    }

    /// Waits for a permit (first come, first served); `None` only if the semaphore closed.
    pub(crate) async fn wait(limiter: &Arc<Limiter>) -> Option<Place> {
        limiter
            .semaphore
            .clone()
            .acquire_owned()
            .await
            .ok()?
            .forget();
        Some(Place::taken(limiter))
    }

    fn taken(limiter: &Arc<Limiter>) -> Place {
        Place(Arc::new(PlaceInner {
            limiter: limiter.clone(),
            given_back: AtomicBool::new(false),
        }))
    }

    /// The second holder of the same permit.
    pub(crate) fn share(&self) -> Place {
        Place(self.0.clone())
    }

    /// Gives the permit back unless the other holder did; whether this one did.
    fn give_back(&self) -> bool {
        let first = !self.0.given_back.swap(true, Ordering::AcqRel);
        if first {
            self.0.limiter.semaphore.add_permits(1);
        }
        first
    }

    /// The caller's future is dropped: if the call had not settled, it is abandoned.
    pub(crate) fn abandon(&self) {
        if self.give_back() {
            self.0.limiter.abandoned.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.give_back();
    }
}

impl Reply {
    pub(crate) fn new(place: Option<Place>) -> (Reply, oneshot::Receiver<Outcome>) {
        let (tx, rx) = oneshot::channel();
        (Reply { tx, place }, rx)
    }

    /// A reply nobody waits for: stands in for one already settled (a cancelled call that
    /// still occupies its worker until it answers).
    pub(crate) fn detached() -> Reply {
        Reply::new(None).0
    }

    pub(crate) fn send(self, outcome: Result<Bytes, CallError>) {
        self.send_answer(outcome.map(|body| Answer { body, info: None }));
    }

    pub(crate) fn send_answer(self, outcome: Result<Answer, CallError>) {
        let Reply { tx, place } = self;
        drop(place);
        let _ = tx.send(outcome.map(Box::new).map_err(Box::new));
    }

    /// Whether the caller stopped waiting (dropped its future).
    pub(crate) fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// A call on its way through the farm: queued, in flight, or waiting for a retry.
///
/// Kept small (56 bytes), since a million of them may wait in the queue: the id and method
/// are read back from the frame, and rarely used parts are boxed.
#[derive(Debug)]
pub(crate) struct Call {
    /// The complete Call frame (which holds the call's id and method), written again for each attempt.
    pub(crate) frame: Box<[u8]>,
    /// Attempts started so far: times a worker began running it.
    pub(crate) attempts: u32,
    /// When the farm took it, on the statistics clock (see `stats::Book::now`); it fills
    /// what would be padding.
    pub(crate) taken: u32,
    /// Broadcast calls run on this worker only and are never retried elsewhere.
    pub(crate) pinned: Option<WorkerId>,
    /// What earlier attempts left behind (`None` until one fails).
    pub(crate) retry: Option<Box<Retry>>,
    /// Per-call options (`None` for a plain call).
    pub(crate) opts: Option<Box<CallOpts>>,
    pub(crate) reply: Reply,
}

/// What a call's failed attempts left behind.
#[derive(Debug, Default)]
pub(crate) struct Retry {
    /// The worker of the last failed attempt, avoided where another can take the call.
    pub(crate) avoid: Option<WorkerId>,
    /// Why earlier attempts failed, oldest first, with the workers that died while it only
    /// waited in them (`WorkerDied { running: false, .. }`, not charged).
    pub(crate) failures: Vec<CallError>,
    /// Times it lost its worker before it started (re-queued free).
    pub(crate) displaced: u32,
    /// It was taken back from a worker where it waited: it goes next to a worker where it
    /// starts at once (else it would bounce back to wait again).
    pub(crate) withdrawn: bool,
    /// Workers' refusals of it, oldest first (at most [`MAX_REFUSALS`] kept).
    pub(crate) refusals: Vec<crate::error::Refusal>,
    /// When it was first refused.
    pub(crate) first_refused: Option<Instant>,
}

/// Refusals a call keeps for its error report.
const MAX_REFUSALS: usize = 32;

impl Retry {
    /// Records a refusal; "not here" refusals are all kept (they steer the call), back-off
    /// ones only as space allows.
    pub(crate) fn refused(&mut self, refusal: crate::error::Refusal, now: Instant) {
        self.first_refused.get_or_insert(now);
        if self.refusals.len() >= MAX_REFUSALS {
            match self.refusals.iter().position(|r| r.backoff.is_some()) {
                Some(i) => {
                    self.refusals.remove(i);
                }
                None if refusal.backoff.is_some() => return,
                None => {}
            }
        }
        self.refusals.push(refusal);
    }

    /// Whether a worker in `slot` refused it "not here".
    pub(crate) fn not_here(&self, slot: usize) -> bool {
        self.refusals
            .iter()
            .any(|r| r.backoff.is_none() && r.worker.is_some_and(|w| w.slot() == slot))
    }
}

impl Call {
    pub(crate) fn new(frame: Box<[u8]>, pinned: Option<WorkerId>, reply: Reply) -> Self {
        Call {
            frame,
            attempts: 0,
            taken: 0,
            pinned,
            retry: None,
            opts: None,
            reply,
        }
    }

    /// The routing key's hash, for a call made with [`key`](crate::CallBuilder::key).
    pub(crate) fn key(&self) -> Option<u64> {
        self.opts.as_ref().and_then(|o| o.key)
    }

    /// Whether it was cancelled while it ran: the caller has its outcome already (and the
    /// statistics counted it), the worker's answer is discarded.
    pub(crate) fn settled(&self) -> bool {
        self.opts.as_ref().is_some_and(|o| o.cancelled)
    }

    /// Whether it has a deadline and that has passed.
    pub(crate) fn expired(&self) -> bool {
        self.opts.as_ref().is_some_and(|o| o.expired())
    }

    /// The call's id, unique within the farm; workers echo it in their reply.
    pub(crate) fn id(&self) -> u64 {
        crate::protocol::id_of_call_frame(&self.frame)
    }

    /// The worker to avoid, if an earlier attempt failed there.
    pub(crate) fn avoid(&self) -> Option<WorkerId> {
        self.retry.as_ref().and_then(|r| r.avoid)
    }

    /// Whether a worker in `slot` refused it "not here" (it never goes there again).
    pub(crate) fn not_here(&self, slot: usize) -> bool {
        self.retry.as_ref().is_some_and(|r| r.not_here(slot))
    }

    /// Whether it was taken back from a worker and not yet handed again.
    pub(crate) fn was_withdrawn(&self) -> bool {
        self.retry.as_ref().is_some_and(|r| r.withdrawn)
    }

    /// The method called (empty for the default method).
    pub(crate) fn method(&self) -> &str {
        crate::protocol::method_of_call_frame(&self.frame)
    }

    /// What earlier attempts left behind, created on first use.
    pub(crate) fn retry_mut(&mut self) -> &mut Retry {
        self.retry.get_or_insert_with(Box::default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queued_call_stays_small() {
        assert!(
            std::mem::size_of::<Call>() <= 64,
            "{}",
            std::mem::size_of::<Call>()
        );
    }

    #[test]
    fn reply_settles_once_with_the_value() {
        let (reply, mut rx) = Reply::new(None);
        reply.send(Ok(Bytes::from_static(b"1")));
        assert_eq!(
            rx.try_recv().unwrap().unwrap().body,
            Bytes::from_static(b"1")
        );
    }

    #[test]
    fn dropped_reply_closes_the_channel() {
        let (reply, mut rx) = Reply::new(None);
        drop(reply);
        assert!(matches!(
            rx.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        ));
    }

    fn limiter(n: usize) -> Arc<Limiter> {
        Arc::new(Limiter {
            semaphore: Arc::new(Semaphore::new(n)),
            limit: n,
            abandoned: AtomicUsize::new(0),
        })
    }

    #[test]
    fn a_place_is_given_back_once_by_whichever_holder_goes_first() {
        let limiter = limiter(1);
        let place = Place::acquire(&limiter).unwrap();
        assert!(Place::acquire(&limiter).is_none());
        let (reply, mut rx) = Reply::new(Some(place.share()));
        reply.send(Ok(Bytes::new()));
        assert!(rx.try_recv().is_ok());
        assert_eq!(
            limiter.semaphore.available_permits(),
            1,
            "back before the caller looks"
        );
        place.abandon();
        assert_eq!(limiter.semaphore.available_permits(), 1, "not twice");
        assert_eq!(
            limiter.abandoned.load(Ordering::Relaxed),
            0,
            "it had settled"
        );
    }

    #[test]
    fn an_abandoned_call_gives_its_place_back_at_once() {
        let limiter = limiter(1);
        let place = Place::acquire(&limiter).unwrap();
        let (reply, _rx) = Reply::new(Some(place.share()));
        place.abandon();
        assert_eq!(limiter.semaphore.available_permits(), 1);
        assert_eq!(limiter.abandoned.load(Ordering::Relaxed), 1);
        drop(reply);
        assert_eq!(limiter.semaphore.available_permits(), 1);
    }

    #[test]
    fn closed_when_caller_is_gone() {
        let (reply, rx) = Reply::new(None);
        assert!(!reply.is_closed());
        drop(rx);
        assert!(reply.is_closed());
    }
}
