//! Quarantine: a slot whose workers keep crashing is sidelined for a growing back-off, so
//! its calls go to healthy slots instead of feeding a worker that dies.

use crate::error::{ExitInfo, Sidelined};
use std::collections::VecDeque;
use std::time::Duration;
use tokio::time::Instant;

const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(300);

#[derive(Debug, Default, Clone)]
struct Record {
    /// Crash times within the window, oldest first.
    crashes: VecDeque<Instant>,
    /// Times sidelined since a worker of the slot last answered a call.
    sidelinings: u32,
    /// While sidelined: until when.
    until: Option<Instant>,
    /// Crashes that got it sidelined.
    counted: u32,
    last_exit: Option<ExitInfo>,
}

/// Each slot's crash record.
#[derive(Debug)]
pub(crate) struct Quarantine {
    /// `(crashes, window)`; `None`: off.
    limit: Option<(u32, Duration)>,
    slots: Vec<Record>,
}

impl Quarantine {
    pub(crate) fn new(limit: Option<(u32, Duration)>, slots: usize) -> Self {
        Quarantine {
            limit,
            slots: vec![Record::default(); slots],
        }
    }

    /// A worker of `slot` crashed with `exit`: the back-off if the slot is now sidelined.
    pub(crate) fn crashed(
        &mut self,
        slot: usize,
        exit: ExitInfo,
        now: Instant,
    ) -> Option<(u32, Duration)> {
        let (limit, window) = self.limit?;
        let record = self.slots.get_mut(slot)?;
        record.last_exit = Some(exit);
        record.crashes.push_back(now);
        while record
            .crashes
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) > window)
        {
            record.crashes.pop_front();
        }
        let crashes = record.crashes.len() as u32;
        if crashes < limit || record.until.is_some() {
            return None;
        }
        let backoff = BACKOFF_FIRST
            .saturating_mul(2u32.saturating_pow(record.sidelinings.min(16)))
            .min(BACKOFF_MAX);
        record.sidelinings = record.sidelinings.saturating_add(1);
        record.until = Some(now + backoff);
        record.counted = crashes;
        record.crashes.clear();
        Some((crashes, backoff))
    }

    pub(crate) fn is_sidelined(&self, slot: usize) -> bool {
        self.slots.get(slot).is_some_and(|r| r.until.is_some())
    }

    /// The back-off of `slot` ended: it is tried again (with its record of sidelinings).
    pub(crate) fn release(&mut self, slot: usize) -> bool {
        self.slots
            .get_mut(slot)
            .is_some_and(|r| r.until.take().is_some())
    }

    /// A worker of `slot` answered a call: its next sidelining starts from the first
    /// back-off again.
    pub(crate) fn proved(&mut self, slot: usize) {
        if let Some(record) = self.slots.get_mut(slot) {
            record.sidelinings = 0;
        }
    }

    /// Every slot is sidelined: each, for the error report. `None` otherwise.
    pub(crate) fn all_sidelined(&self, now: impl FnOnce() -> Instant) -> Option<Vec<Sidelined>> {
        self.limit?;
        if !self.slots.iter().all(|r| r.until.is_some()) {
            return None;
        }
        // The clock is read only when it is so.
        let now = now();
        Some(
            self.slots
                .iter()
                .enumerate()
                .map(|(slot, r)| Sidelined {
                    slot,
                    crashes: r.counted,
                    last_exit: r.last_exit,
                    retry_in: r
                        .until
                        .map_or(Duration::ZERO, |t| t.saturating_duration_since(now)),
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXIT: ExitInfo = ExitInfo {
        code: None,
        signal: Some(9),
    };

    #[tokio::test(start_paused = true)]
    async fn n_crashes_within_the_window_sideline_a_slot_with_a_growing_back_off() {
        let mut q = Quarantine::new(Some((3, Duration::from_secs(10))), 2);
        let now = Instant::now();
        assert_eq!(q.crashed(0, EXIT, now), None);
        assert_eq!(q.crashed(0, EXIT, now), None);
        assert_eq!(q.crashed(1, EXIT, now), None, "slots are counted apart");
        assert_eq!(q.crashed(0, EXIT, now), Some((3, BACKOFF_FIRST)));
        assert!(q.is_sidelined(0) && !q.is_sidelined(1));
        assert!(q.all_sidelined(|| now).is_none());
        assert!(q.release(0));
        for _ in 0..2 {
            assert_eq!(q.crashed(0, EXIT, now), None);
        }
        assert_eq!(q.crashed(0, EXIT, now), Some((3, BACKOFF_FIRST * 2)));
        q.release(0);
        q.proved(0);
        for _ in 0..2 {
            q.crashed(0, EXIT, now);
        }
        assert_eq!(q.crashed(0, EXIT, now), Some((3, BACKOFF_FIRST)), "reset");
    }

    #[tokio::test(start_paused = true)]
    async fn old_crashes_fall_out_of_the_window() {
        let mut q = Quarantine::new(Some((2, Duration::from_secs(1))), 1);
        let now = Instant::now();
        q.crashed(0, EXIT, now);
        assert_eq!(q.crashed(0, EXIT, now + Duration::from_secs(2)), None);
        assert!(q.crashed(0, EXIT, now + Duration::from_secs(2)).is_some());
        let all = q.all_sidelined(|| now + Duration::from_secs(2)).unwrap();
        assert_eq!(
            (all.len(), all[0].slot, all[0].last_exit),
            (1, 0, Some(EXIT))
        );
    }

    #[test]
    fn off_by_default() {
        let mut q = Quarantine::new(None, 1);
        for _ in 0..100 {
            assert_eq!(q.crashed(0, EXIT, Instant::now()), None);
        }
    }
}
