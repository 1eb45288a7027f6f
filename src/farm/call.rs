//! A pending call and its reply slot.

use crate::error::CallError;
use crate::event::WorkerId;
use bytes::Bytes;
use tokio::sync::{oneshot, OwnedSemaphorePermit};

/// What a call settles with: the encoded result, or why there is none.
pub(crate) type Outcome = Result<Bytes, CallError>;

/// The caller's end of a call. Settles exactly once: by [`Reply::send`], or, if the call is
/// dropped unanswered (farm killed, dispatcher gone, runtime shut down), with
/// [`CallError::ShutDown`] from `Drop` (hyper's dispatch `Callback`).
///
/// It also holds the call's place under `max_concurrent_calls`, and gives it back *before*
/// the caller is woken, so a caller that awaits each call before making the next never
/// sees `QueueFull`.
#[derive(Debug)]
pub(crate) struct Reply {
    tx: Option<oneshot::Sender<Outcome>>,
    permit: Option<OwnedSemaphorePermit>,
}

impl Reply {
    pub(crate) fn new(permit: Option<OwnedSemaphorePermit>) -> (Reply, oneshot::Receiver<Outcome>) {
        let (tx, rx) = oneshot::channel();
        (
            Reply {
                tx: Some(tx),
                permit,
            },
            rx,
        )
    }

    pub(crate) fn send(mut self, outcome: Outcome) {
        self.permit = None;
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(outcome);
        }
    }

    /// Whether the caller stopped waiting (dropped its future).
    pub(crate) fn is_closed(&self) -> bool {
        self.tx.as_ref().map_or(true, |tx| tx.is_closed())
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        self.permit = None;
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Err(CallError::ShutDown));
        }
    }
}

/// A call on its way through the farm: queued, in flight, or waiting for a retry.
#[derive(Debug)]
pub(crate) struct Call {
    /// Unique within the farm; workers echo it in their reply.
    pub(crate) id: u64,
    /// The method name, for error messages.
    pub(crate) method: Box<str>,
    /// The complete Call frame, shared between attempts.
    pub(crate) frame: Bytes,
    /// Attempts started so far.
    pub(crate) attempts: u32,
    /// Broadcast calls run on this worker only and are never retried elsewhere.
    pub(crate) pinned: Option<WorkerId>,
    /// The worker of the last failed attempt, avoided on retry where another can take it.
    pub(crate) avoid: Option<WorkerId>,
    /// Why earlier attempts failed (empty until one does).
    pub(crate) failures: Vec<CallError>,
    pub(crate) reply: Reply,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_settles_once_with_the_value() {
        let (reply, mut rx) = Reply::new(None);
        reply.send(Ok(Bytes::from_static(b"1")));
        assert_eq!(rx.try_recv().unwrap().unwrap(), Bytes::from_static(b"1"));
    }

    #[test]
    fn dropped_reply_settles_with_shut_down() {
        let (reply, mut rx) = Reply::new(None);
        drop(reply);
        assert_eq!(rx.try_recv().unwrap(), Err(CallError::ShutDown));
    }

    #[test]
    fn closed_when_caller_is_gone() {
        let (reply, rx) = Reply::new(None);
        assert!(!reply.is_closed());
        drop(rx);
        assert!(reply.is_closed());
    }
}

#[cfg(test)]
mod permit_tests {
    use super::*;
    use std::sync::Arc;
    use tokio::sync::Semaphore;

    #[test]
    fn place_is_given_back_before_the_caller_sees_the_result() {
        let limit = Arc::new(Semaphore::new(1));
        let permit = limit.clone().try_acquire_owned().unwrap();
        let (reply, mut rx) = Reply::new(Some(permit));
        assert_eq!(limit.available_permits(), 0);
        reply.send(Ok(Bytes::new()));
        assert!(rx.try_recv().is_ok());
        assert_eq!(limit.available_permits(), 1);
    }
}
