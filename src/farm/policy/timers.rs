//! Every deadline the farm keeps, in one place, with one rule: a timer belongs to a call or
//! a worker and is removed when its owner goes, so the table never outgrows what is live.

use crate::event::WorkerId;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;
use tokio::time::Instant;

/// Stands in for a deadline too far away to represent.
const FAR_FUTURE: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// What a deadline is for. At most one of each is armed at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Timer {
    /// A call's `timeout`, from when its handler started.
    CallTimeout { worker: WorkerId, call: u64 },
    /// A worker's `max_idle_time`.
    Idle(WorkerId),
    /// `SIGKILL` for a worker that was asked to stop `kill_timeout` ago.
    Kill(WorkerId),
    /// A worker's `startup_timeout`.
    Startup(WorkerId),
    /// The end of a start-failure backoff.
    Respawn,
    /// The end of a slot's back-off after a refusal.
    Resume(usize),
    /// The end of a slot's quarantine.
    Release(usize),
    /// The next `max_memory` measurement.
    MemoryCheck,
    /// The next check of workers holding waiting calls (see `policy::pipeline`).
    StallCheck,
    /// The next look, in a farm whose handles are all gone, for a caller still waiting.
    OrphanCheck,
}

type Key = (Instant, u64);

/// The armed timers, soonest first.
#[derive(Debug, Default)]
pub(crate) struct Timers {
    queue: BTreeMap<Key, Timer>,
    /// FxHash: timers are keyed by farm-chosen ids, and two are touched per call.
    armed: HashMap<Timer, Key, rustc_hash::FxBuildHasher>,
    seq: u64,
}

impl Timers {
    /// Arms `timer` to fire `after` from now, replacing it if it was armed.
    pub(crate) fn set(&mut self, timer: Timer, after: Duration) {
        self.cancel(timer);
        self.seq += 1;
        let now = Instant::now();
        // Options are validated, so this cannot overflow; saturate rather than panic anyway.
        let at = now.checked_add(after).unwrap_or(now + FAR_FUTURE);
        let key = (at, self.seq);
        self.queue.insert(key, timer);
        self.armed.insert(timer, key);
    }

    /// Disarms `timer`; whether it was armed.
    pub(crate) fn cancel(&mut self, timer: Timer) -> bool {
        match self.armed.remove(&timer) {
            Some(key) => self.queue.remove(&key).is_some(),
            None => false,
        }
    }

    /// Disarms every timer of `worker` but its calls' (the caller cancels those as it takes
    /// the calls away).
    pub(crate) fn cancel_worker(&mut self, worker: WorkerId) {
        for timer in [
            Timer::Idle(worker),
            Timer::Kill(worker),
            Timer::Startup(worker),
        ] {
            self.cancel(timer);
        }
    }

    pub(crate) fn is_set(&self, timer: Timer) -> bool {
        self.armed.contains_key(&timer)
    }

    /// When the soonest timer fires.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.queue.keys().next().map(|k| k.0)
    }

    /// Takes the soonest timer if it is due at `now`.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<Timer> {
        let entry = self.queue.first_entry()?;
        if entry.key().0 > now {
            return None;
        }
        let timer = entry.remove();
        self.armed.remove(&timer);
        Some(timer)
    }

    /// Armed timers.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.queue.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(n: u64) -> WorkerId {
        WorkerId::new(std::num::NonZeroU64::new(n).unwrap(), 0)
    }

    #[tokio::test(start_paused = true)]
    async fn timers_fire_in_order_and_once() {
        let mut t = Timers::default();
        t.set(Timer::Kill(worker(1)), Duration::from_secs(2));
        t.set(Timer::Idle(worker(1)), Duration::from_secs(1));
        assert_eq!(t.pop_due(Instant::now()), None);
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(t.pop_due(Instant::now()), Some(Timer::Idle(worker(1))));
        assert_eq!(t.pop_due(Instant::now()), Some(Timer::Kill(worker(1))));
        assert_eq!(t.pop_due(Instant::now()), None);
        assert_eq!(t.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn setting_again_replaces() {
        let mut t = Timers::default();
        t.set(Timer::Respawn, Duration::from_secs(1));
        t.set(Timer::Respawn, Duration::from_secs(5));
        assert_eq!(t.len(), 1);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(t.pop_due(Instant::now()), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_worker_takes_its_timers_with_it() {
        let mut t = Timers::default();
        t.set(Timer::Startup(worker(1)), Duration::from_secs(10));
        t.set(Timer::Kill(worker(1)), Duration::from_secs(10));
        t.set(Timer::Idle(worker(2)), Duration::from_secs(10));
        t.cancel_worker(worker(1));
        assert_eq!(t.len(), 1);
        assert!(t.is_set(Timer::Idle(worker(2))));
        assert!(!t.cancel(Timer::Kill(worker(1))));
    }

    #[tokio::test(start_paused = true)]
    async fn far_deadlines_saturate() {
        let mut t = Timers::default();
        t.set(Timer::Respawn, Duration::MAX);
        assert!(t.next_deadline().is_some());
    }
}
