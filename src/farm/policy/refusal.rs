//! Refusals ([`Refuse`](crate::worker::Refuse)): each slot's back-off, and whether a refused
//! call waits for a slot or fails.
//!
//! A refusal is never charged: the call goes back for another slot. A slot backing off
//! takes no calls, so a call every slot refuses waits for the first back-off to end (no
//! busy loop between refusing workers), unless that is further than `max_refusal_wait`
//! from its first refusal, or no slot is left that did not refuse it "not here": then it
//! fails.

use std::time::Duration;
use tokio::time::Instant;

/// When each slot's back-off ends.
#[derive(Debug)]
pub(crate) struct Backoffs {
    until: Vec<Option<Instant>>,
}

impl Backoffs {
    pub(crate) fn new(slots: usize) -> Self {
        Backoffs {
            until: vec![None; slots],
        }
    }

    /// Slot `slot` backs off until `until` (a later end wins); whether it was taking calls.
    pub(crate) fn back_off(&mut self, slot: usize, until: Instant) -> bool {
        let Some(entry) = self.until.get_mut(slot) else {
            return false;
        };
        let began = entry.is_none();
        *entry = Some(entry.map_or(until, |old| old.max(until)));
        began
    }

    /// When slot `slot`'s back-off ends, if it backs off.
    pub(crate) fn until(&self, slot: usize) -> Option<Instant> {
        self.until.get(slot).copied().flatten()
    }

    /// The back-off's timer fired: whether it really ended (it may have been extended, in
    /// which case the timer is armed again for the new end).
    pub(crate) fn end_if_due(&mut self, slot: usize, now: Instant) -> bool {
        match self.until.get_mut(slot) {
            Some(entry) if entry.is_some_and(|t| t <= now) => {
                *entry = None;
                true
            }
            _ => false,
        }
    }
}

/// What becomes of a refused call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// It waits for a slot (one may take it now, or soon enough).
    Wait,
    /// No slot will take it in time.
    Fail,
}

/// Judges a refused call: `open` has, for each slot that did not refuse it "not here", when
/// that slot takes calls again (`None`: now).
pub(crate) fn next(
    open: impl IntoIterator<Item = Option<Instant>>,
    first_refused: Instant,
    max_wait: Duration,
) -> Next {
    let mut soonest: Option<Instant> = None;
    for until in open {
        match until {
            None => return Next::Wait,
            Some(t) => soonest = Some(soonest.map_or(t, |s| s.min(t))),
        }
    }
    match soonest {
        Some(t) if t.saturating_duration_since(first_refused) <= max_wait => Next::Wait,
        _ => Next::Fail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_call_waits_for_the_first_back_off_within_the_bound() {
        let now = Instant::now();
        let ms = Duration::from_millis;
        let wait = ms(1000);
        assert_eq!(next([None, Some(now + ms(5))], now, wait), Next::Wait);
        assert_eq!(
            next([Some(now + ms(900)), Some(now + ms(5000))], now, wait),
            Next::Wait,
            "the first back-off ends within the bound"
        );
        assert_eq!(next([Some(now + ms(1500))], now, wait), Next::Fail);
        assert_eq!(next([], now, wait), Next::Fail, "every slot said not here");
    }

    #[tokio::test(start_paused = true)]
    async fn back_offs_extend_and_end_once_due() {
        let now = Instant::now();
        let ms = Duration::from_millis;
        let mut b = Backoffs::new(2);
        assert!(b.back_off(1, now + ms(100)));
        assert!(!b.back_off(1, now + ms(50)), "already backing off");
        assert_eq!(b.until(1), Some(now + ms(100)), "the later end wins");
        assert!(!b.end_if_due(1, now + ms(60)));
        assert!(b.end_if_due(1, now + ms(100)));
        assert_eq!(b.until(1), None);
        assert!(!b.back_off(7, now), "no such slot");
    }
}
