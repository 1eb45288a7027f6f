//! What becomes of a call whose attempt failed, or whose worker went before it started.
//!
//! A call is charged an attempt only for what it may have caused: its handler was running
//! when its worker crashed, hung or broke the protocol. A call that only waited inside the
//! worker, or that shared its worker with a call that timed out, goes back to the queue free.

use crate::error::CallError;

/// Upper bound on free re-queues of one call, so a call cannot circle for ever through
/// workers that die for other reasons before it starts; past it, the call settles.
pub(crate) const MAX_DISPLACED: u32 = 100;

/// The verdict on one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Run it again; the failed attempt counts against `max_retries`.
    RequeueCharged,
    /// Run it again; nothing is charged.
    RequeueFree,
    /// It is done: settle it with its error.
    Settle,
}

/// The farm's retry settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RetryPolicy {
    pub(crate) max_retries: u32,
    pub(crate) retry_handler_errors: bool,
}

/// What the policy is told about a call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Attempt {
    /// Attempts started so far, this one included.
    pub(crate) attempts: u32,
    /// Free re-queues so far.
    pub(crate) displaced: u32,
    /// A broadcast call: bound to its worker, never moved.
    pub(crate) pinned: bool,
    /// The farm still takes calls (not shutting down or killed).
    pub(crate) accepting: bool,
    /// Its own `retries`, overriding the farm's.
    pub(crate) max_retries: Option<u32>,
    /// Nobody will take its result: cancelled, abandoned, or past its deadline.
    pub(crate) unwanted: bool,
}

impl RetryPolicy {
    /// Whether a running attempt that failed with `error` may be run again at all.
    pub(crate) fn retryable(&self, error: &CallError) -> bool {
        match error {
            CallError::WorkerDied { .. }
            | CallError::Protocol { .. }
            | CallError::Timeout { .. } => true,
            CallError::Handler { .. } | CallError::Panic { .. } => self.retry_handler_errors,
            _ => false,
        }
    }

    /// A running attempt failed with `error`.
    pub(crate) fn failed(&self, error: &CallError, call: Attempt) -> Verdict {
        if call.pinned || !call.accepting || call.unwanted || !self.retryable(error) {
            return Verdict::Settle;
        }
        if call.attempts <= call.max_retries.unwrap_or(self.max_retries) {
            Verdict::RequeueCharged
        } else {
            Verdict::Settle
        }
    }

    /// The call's worker went (died, timed out on another call, was dropped) while the
    /// call was not to blame: it had not started, or the culprit is known to be another.
    pub(crate) fn displaced(&self, call: Attempt) -> Verdict {
        if call.pinned || !call.accepting || call.unwanted || call.displaced >= MAX_DISPLACED {
            Verdict::Settle
        } else {
            Verdict::RequeueFree
        }
    }

    /// The error a call settles with after `error` ended its last attempt: the cause alone
    /// for a call that was tried once, or every attempt's failure once retries ran out.
    pub(crate) fn final_error(
        &self,
        error: CallError,
        attempts: u32,
        earlier: Vec<CallError>,
    ) -> CallError {
        if self.retryable(&error) && (attempts > 1 || !earlier.is_empty()) {
            CallError::RetriesExhausted {
                attempts,
                last: Box::new(error),
                earlier,
            }
        } else {
            error
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ExitInfo;
    use crate::event::WorkerId;
    use std::time::Duration;

    fn died() -> CallError {
        CallError::WorkerDied {
            worker: WorkerId::new(std::num::NonZeroU64::MIN, 0),
            pid: 1,
            exit: ExitInfo {
                code: Some(1),
                signal: None,
            },
            running: true,
        }
    }

    fn handler() -> CallError {
        CallError::Handler {
            method: "m".into(),
            message: "no".into(),
        }
    }

    fn attempt(attempts: u32) -> Attempt {
        Attempt {
            attempts,
            displaced: 0,
            pinned: false,
            accepting: true,
            max_retries: None,
            unwanted: false,
        }
    }

    const POLICY: RetryPolicy = RetryPolicy {
        max_retries: 2,
        retry_handler_errors: false,
    };

    #[test]
    fn failed_attempts_are_charged_until_retries_run_out() {
        let timeout = CallError::Timeout {
            after: Duration::from_secs(1),
        };
        let table = [
            (died(), 1, Verdict::RequeueCharged),
            (died(), 2, Verdict::RequeueCharged),
            (died(), 3, Verdict::Settle),
            (timeout.clone(), 1, Verdict::RequeueCharged),
            (timeout, 3, Verdict::Settle),
            (handler(), 1, Verdict::Settle),
            (CallError::ShutDown, 1, Verdict::Settle),
        ];
        for (error, attempts, expected) in table {
            assert_eq!(
                POLICY.failed(&error, attempt(attempts)),
                expected,
                "{error:?} #{attempts}"
            );
        }
    }

    #[test]
    fn handler_errors_are_retried_only_when_asked() {
        let policy = RetryPolicy {
            retry_handler_errors: true,
            ..POLICY
        };
        assert_eq!(
            policy.failed(&handler(), attempt(1)),
            Verdict::RequeueCharged
        );
        assert_eq!(POLICY.failed(&handler(), attempt(1)), Verdict::Settle);
    }

    #[test]
    fn broadcast_calls_and_a_stopping_farm_never_retry() {
        for call in [
            Attempt {
                pinned: true,
                ..attempt(1)
            },
            Attempt {
                accepting: false,
                ..attempt(1)
            },
            Attempt {
                unwanted: true,
                ..attempt(1)
            },
        ] {
            assert_eq!(POLICY.failed(&died(), call), Verdict::Settle);
            assert_eq!(POLICY.displaced(call), Verdict::Settle);
        }
    }

    #[test]
    fn a_call_s_own_retries_override_the_farm_s() {
        let own = |n| Attempt {
            max_retries: Some(n),
            ..attempt(2)
        };
        assert_eq!(POLICY.failed(&died(), own(0)), Verdict::Settle);
        assert_eq!(POLICY.failed(&died(), own(5)), Verdict::RequeueCharged);
    }

    #[test]
    fn displaced_calls_go_back_free_up_to_a_bound() {
        let zero_retries = RetryPolicy {
            max_retries: 0,
            ..POLICY
        };
        assert_eq!(zero_retries.displaced(attempt(0)), Verdict::RequeueFree);
        let worn = Attempt {
            displaced: MAX_DISPLACED,
            ..attempt(0)
        };
        assert_eq!(zero_retries.displaced(worn), Verdict::Settle);
    }

    #[test]
    fn final_error_wraps_only_retried_calls() {
        assert_eq!(POLICY.final_error(died(), 1, Vec::new()), died());
        assert!(matches!(
            POLICY.final_error(died(), 3, vec![died(), died()]),
            CallError::RetriesExhausted { attempts: 3, .. }
        ));
        assert_eq!(POLICY.final_error(handler(), 1, Vec::new()), handler());
    }
}
