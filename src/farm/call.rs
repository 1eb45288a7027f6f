//! A pending call and its reply slot.

use crate::error::CallError;
use crate::event::WorkerId;
use bytes::Bytes;
use std::sync::Arc;
use tokio::sync::{oneshot, Semaphore};

/// What a call settles with: the encoded result, or why there is none. Both are boxed so
/// the reply slot a queued call allocates stays small (80 bytes instead of 112); the box is
/// only filled when the call completes.
pub(crate) type Outcome = Result<Box<Bytes>, Box<CallError>>;

/// The caller's end of a call. Settles exactly once: by [`Reply::send`], or, if the call is
/// dropped unanswered (farm killed, dispatcher gone, runtime shut down), by the channel
/// closing, which the caller reads as [`CallError::ShutDown`] (hyper's dispatch `Callback`
/// does the same with a drop guard).
#[derive(Debug)]
pub(crate) struct Reply {
    tx: oneshot::Sender<Outcome>,
}

/// One permit of the `max_concurrent_calls` semaphore, acquired and forgotten when the call
/// is made; given back when dropped. The caller's future holds it, so it comes back the
/// moment the call settles (before the caller sees the result: a caller that awaits each
/// call before making the next never sees `QueueFull`) or the future is dropped (an
/// abandoned call frees its place at once, even while it still waits in the queue).
#[derive(Debug)]
pub(crate) struct Place(pub(crate) Arc<Semaphore>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.add_permits(1);
    }
}

impl Reply {
    pub(crate) fn new() -> (Reply, oneshot::Receiver<Outcome>) {
        let (tx, rx) = oneshot::channel();
        (Reply { tx }, rx)
    }

    pub(crate) fn send(self, outcome: Result<Bytes, CallError>) {
        let _ = self.tx.send(outcome.map(Box::new).map_err(Box::new));
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
    /// Broadcast calls run on this worker only and are never retried elsewhere.
    pub(crate) pinned: Option<WorkerId>,
    /// What earlier attempts left behind (`None` until one fails).
    pub(crate) retry: Option<Box<Retry>>,
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
}

impl Call {
    pub(crate) fn new(frame: Box<[u8]>, pinned: Option<WorkerId>, reply: Reply) -> Self {
        Call {
            frame,
            attempts: 0,
            pinned,
            retry: None,
            reply,
        }
    }

    /// The call's id, unique within the farm; workers echo it in their reply.
    pub(crate) fn id(&self) -> u64 {
        crate::protocol::id_of_call_frame(&self.frame)
    }

    /// The worker to avoid, if an earlier attempt failed there.
    pub(crate) fn avoid(&self) -> Option<WorkerId> {
        self.retry.as_ref().and_then(|r| r.avoid)
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
        let (reply, mut rx) = Reply::new();
        reply.send(Ok(Bytes::from_static(b"1")));
        assert_eq!(*rx.try_recv().unwrap().unwrap(), Bytes::from_static(b"1"));
    }

    #[test]
    fn dropped_reply_closes_the_channel() {
        let (reply, mut rx) = Reply::new();
        drop(reply);
        assert_eq!(rx.try_recv(), Err(oneshot::error::TryRecvError::Closed));
    }

    #[test]
    fn dropped_place_is_given_back() {
        let limit = Arc::new(Semaphore::new(1));
        limit.try_acquire().unwrap().forget();
        let place = Place(limit.clone());
        assert_eq!(limit.available_permits(), 0);
        drop(place);
        assert_eq!(limit.available_permits(), 1);
    }

    #[test]
    fn closed_when_caller_is_gone() {
        let (reply, rx) = Reply::new();
        assert!(!reply.is_closed());
        drop(rx);
        assert!(reply.is_closed());
    }
}
