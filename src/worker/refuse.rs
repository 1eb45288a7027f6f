//! A handler's "not now" or "not here": [`Refuse`], and the worker's own back-off clock.
//!
//! A refused call goes back to the farm uncharged and runs elsewhere. A refusal with a
//! back-off also closes the worker to calls until it ends: calls that reach the worker in
//! the meantime (sent before the farm heard of the refusal) are refused without running, so
//! no handler runs during a back-off, whatever was already in flight.

use std::any::Any;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A handler's answer that it will not serve this call: return it as the error of a
/// [`try_method`](super::Worker::try_method) (or any fallible handler whose error type is
/// `Refuse`, or a `Box<dyn Error + Send + Sync>` holding one).
///
/// The farm puts the call back at the front of its queue for **another** worker, without
/// charging it a retry.
/// - [`Refuse::retry_after`]: "not now" (a quota refreshed on its own clock). This worker's
///   slot takes no calls until the back-off ends, and the worker itself refuses, without
///   running them, calls that reach it before then.
/// - [`Refuse::elsewhere`]: "never here" (a worker-side filter). The call is not offered to
///   this slot again; the worker takes other calls at once.
///
/// A call that every slot refuses waits for the first back-off to end, at most
/// [`max_refusal_wait`](crate::FarmOptions::max_refusal_wait) after its first refusal,
/// then fails with [`CallError::Refused`](crate::CallError::Refused); a call every slot
/// refuses `elsewhere` fails at once.
///
/// ```no_run
/// use std::time::Duration;
/// use workfarm::worker::{Refuse, Worker};
///
/// Worker::new()
///     .try_method("fetch", |url: String| {
///         if url.starts_with("ftp:") {
///             return Err(Refuse::elsewhere().because("this worker speaks http only"));
///         }
///         Ok(url.len())
///     })
///     .serve()
///     .expect("not started by a farm");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refuse {
    retry_after: Option<Duration>,
    reason: String,
}

impl Refuse {
    /// Not now: this worker takes no calls for `backoff`.
    pub fn retry_after(backoff: Duration) -> Self {
        Refuse {
            retry_after: Some(backoff),
            reason: String::new(),
        }
    }

    /// Never here: the call is for another worker; this one goes on taking others.
    pub fn elsewhere() -> Self {
        Refuse {
            retry_after: None,
            reason: String::new(),
        }
    }

    /// Says why (reported in [`CallError::Refused`](crate::CallError::Refused) and logs).
    #[must_use]
    pub fn because(mut self, reason: impl fmt::Display) -> Self {
        self.reason = reason.to_string();
        self
    }

    /// The back-off, for [`retry_after`](Self::retry_after); `None` for
    /// [`elsewhere`](Self::elsewhere).
    pub fn backoff(&self) -> Option<Duration> {
        self.retry_after
    }

    /// Why, if the handler said.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl fmt::Display for Refuse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.retry_after {
            Some(d) => write!(f, "refused; retry after {d:?}")?,
            None => f.write_str("refused; not served here")?,
        }
        if !self.reason.is_empty() {
            write!(f, ": {}", self.reason)?;
        }
        Ok(())
    }
}

impl std::error::Error for Refuse {}

/// The refusal inside a handler's error, if it is one.
pub(crate) fn refusal_in<'a>(error: &'a (dyn Any + 'static)) -> Option<&'a Refuse> {
    if let Some(refuse) = error.downcast_ref::<Refuse>() {
        return Some(refuse);
    }
    type Boxed = Box<dyn std::error::Error + Send + Sync>;
    error
        .downcast_ref::<Boxed>()
        .and_then(|boxed| boxed.downcast_ref::<Refuse>())
}

/// When this worker's back-off ends, in milliseconds since [`epoch`] (0: none yet). One per
/// process, as a process serves one farm.
static REFUSING_UNTIL: AtomicU64 = AtomicU64::new(0);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// A handler refused with `backoff`: the worker refuses calls until it ends.
pub(crate) fn back_off(backoff: Duration) {
    let until = now_ms().saturating_add(u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX));
    REFUSING_UNTIL.fetch_max(until, Ordering::Relaxed);
}

/// What is left of the worker's back-off, if one runs. One relaxed load when none does.
pub(crate) fn backing_off() -> Option<Duration> {
    let until = REFUSING_UNTIL.load(Ordering::Relaxed);
    if until == 0 {
        return None;
    }
    let now = now_ms();
    (until > now).then(|| Duration::from_millis(until - now))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_found_plain_or_boxed() {
        let plain = Refuse::retry_after(Duration::from_millis(5));
        assert_eq!(refusal_in(&plain), Some(&plain));
        let boxed: Box<dyn std::error::Error + Send + Sync> =
            Box::new(Refuse::elsewhere().because("no"));
        assert_eq!(refusal_in(&boxed).map(Refuse::backoff), Some(None));
        assert!(refusal_in(&"an error").is_none());
        assert_eq!(
            Refuse::elsewhere().because("ftp").to_string(),
            "refused; not served here: ftp"
        );
    }
}
