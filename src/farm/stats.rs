//! [`Farm::stats`](crate::Farm::stats): what the farm has done, per pool slot and in total.
//!
//! The dispatcher keeps one [`Book`] and writes to it as calls settle and workers come and
//! go, so counts outlive the workers they describe. It is always on, so it is cheap: no
//! clock read per call (the dispatcher reads one per turn, [`Book::tick`], and stamps calls
//! with it as 32-bit microsecond counts), no allocation, two histogram records per call.

use crate::error::CallError;
use hdrhistogram::Histogram;
use std::time::{Duration, Instant};

/// Longest time a histogram records exactly enough (1 hour, in µs); longer saturates.
const HISTOGRAM_MAX_US: u64 = 3_600_000_000;

/// What a farm has done since it was created.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Stats {
    /// Since `Farm::create`.
    pub uptime: Duration,
    /// All slots together, with the calls that never reached a worker.
    pub total: SlotStats,
    /// Per pool slot (`0..workers`): its workers, one after another.
    pub slots: Vec<SlotStats>,
    /// Answers dropped because their call had settled already: on a farm made with
    /// `Farm::connect`, second answers of calls that ran twice (a node thought dead, or
    /// frozen past its lease, finished too); 0 on a local farm.
    pub duplicates: u64,
}

/// One slot's statistics (or the farm's, in [`Stats::total`]).
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct SlotStats {
    /// Calls, by how they ended.
    pub calls: CallCounts,
    /// Workers, by how they ended.
    pub workers: WorkerCounts,
    /// From a handler starting to its answer arriving, per answered attempt.
    pub run_time: Latency,
    /// From the farm taking a call to its handler starting, per started attempt (time in
    /// the farm's queue and waiting inside a worker).
    pub wait_time: Latency,
    /// The fraction of the time the slot spent running calls (piscina's utilization):
    /// summed run time over uptime, so a worker with several threads or async calls may
    /// exceed 1. In the total: over uptime × slots.
    pub utilization: f64,
}

/// Calls counted once each, when they settle (and, for `retried` and `refusals`, per
/// attempt), under the slot of the worker of their last attempt.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CallCounts {
    /// Answered with a value. (A value the caller then fails to decode, a
    /// [`CallError::Deserialize`], is counted here: the farm delivered it.)
    pub succeeded: u64,
    /// Failed, of every kind below.
    pub failed: u64,
    /// The handler failed: an error, a panic, an unknown method, bad arguments.
    pub handler: u64,
    /// Ran out of time: `Timeout`, or `Deadline`.
    pub timed_out: u64,
    /// Its worker died or broke the protocol (on the last attempt).
    pub worker_lost: u64,
    /// Refused by every slot that could take it (`CallError::Refused`).
    pub refused: u64,
    /// Cancelled by the caller.
    pub cancelled: u64,
    /// No worker could start, or every slot was quarantined.
    pub unavailable: u64,
    /// The farm shut down first.
    pub shut_down: u64,
    /// Anything else (a broadcast queue full, say).
    pub other: u64,
    /// Attempts re-run after a charged failure (a crash, a timeout; see `max_retries`).
    pub retried: u64,
    /// Refusals by workers (each uncharged; the call went on elsewhere).
    pub refusals: u64,
}

/// Workers, by how they ended (and how many were started).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerCounts {
    /// Processes started.
    pub spawned: u64,
    /// Ended on their own after starting: a crash, a kill from outside, an exit.
    pub crashed: u64,
    /// Never became ready, or ended right after: a start failure.
    pub failed_to_start: u64,
    /// Stopped at `ttl` or `max_memory` and replaced.
    pub recycled: u64,
    /// Stopped after `max_idle_time`.
    pub idle: u64,
    /// Stopped by the farm for a call: a timeout, a cancel, a protocol fault.
    pub stopped: u64,
    /// Stopped by `shutdown` or `kill`.
    pub shut_down: u64,
}

/// A latency summary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Latency {
    /// Samples recorded.
    pub count: u64,
    /// The shortest.
    pub min: Duration,
    /// The mean.
    pub mean: Duration,
    /// The median.
    pub p50: Duration,
    /// The 90th percentile.
    pub p90: Duration,
    /// The 99th percentile.
    pub p99: Duration,
    /// The longest.
    pub max: Duration,
}

/// Why the farm stopped a worker, for [`WorkerCounts`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopReason {
    Recycled,
    Idle,
    ForACall,
    ShutDown,
}

/// How a worker ended, for [`WorkerCounts`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    Crashed,
    FailedToStart,
    Stopped(StopReason),
}

struct SlotBook {
    calls: CallCounts,
    workers: WorkerCounts,
    run: Histogram<u64>,
    wait: Histogram<u64>,
    busy_us: u64,
}

impl SlotBook {
    fn new() -> Self {
        SlotBook {
            calls: CallCounts::default(),
            workers: WorkerCounts::default(),
            run: histogram(),
            wait: histogram(),
            busy_us: 0,
        }
    }
}

/// Now on the statistics clock started at `epoch`: µs, truncated to 32 bits. Callers stamp
/// their calls with it when they submit them, so wait times include the time in the channel.
pub(crate) fn stamp(epoch: Instant) -> u32 {
    epoch.elapsed().as_micros() as u32
}

fn histogram() -> Histogram<u64> {
    // Two significant digits: 1% error, a few KiB per histogram. Constant, valid bounds:
    // this cannot fail.
    Histogram::new_with_bounds(1, HISTOGRAM_MAX_US, 2).expect("valid histogram bounds")
}

/// The dispatcher's statistics.
pub(crate) struct Book {
    epoch: Instant,
    /// The turn's clock, in µs since `epoch`, truncated to 32 bits (durations are taken
    /// with wrapping subtraction: right for anything under 71 minutes).
    now_us: u32,
    slots: Vec<SlotBook>,
    /// Calls that settled without reaching a worker.
    unplaced: CallCounts,
}

impl std::fmt::Debug for Book {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Book")
            .field("slots", &self.slots.len())
            .finish()
    }
}

impl Book {
    pub(crate) fn new(slots: usize, epoch: Instant) -> Self {
        Book {
            epoch,
            now_us: 0,
            slots: (0..slots).map(|_| SlotBook::new()).collect(),
            unplaced: CallCounts::default(),
        }
    }

    /// Reads the clock for this turn.
    pub(crate) fn tick(&mut self) {
        self.now_us = stamp(self.epoch);
    }

    /// The turn's clock, to stamp a call with.
    pub(crate) fn now(&self) -> u32 {
        self.now_us
    }

    fn counts(&mut self, slot: Option<usize>) -> &mut CallCounts {
        match slot.and_then(|s| self.slots.get_mut(s)) {
            Some(book) => &mut book.calls,
            None => &mut self.unplaced,
        }
    }

    /// An attempt stamped `taken` (when the farm took the call) started now in `slot`.
    pub(crate) fn started(&mut self, slot: usize, taken: u32) {
        let waited = self.now_us.wrapping_sub(taken);
        if let Some(book) = self.slots.get_mut(slot) {
            book.wait.saturating_record(u64::from(waited));
        }
    }

    /// An attempt that started at `started` was answered now in `slot`.
    pub(crate) fn answered(&mut self, slot: usize, started: u32) {
        let ran = self.now_us.wrapping_sub(started);
        if let Some(book) = self.slots.get_mut(slot) {
            book.run.saturating_record(u64::from(ran));
            book.busy_us += u64::from(ran);
        }
    }

    pub(crate) fn succeeded(&mut self, slot: usize) {
        self.counts(Some(slot)).succeeded += 1;
    }

    /// A call settled with `error`, last tried in `slot` (`None`: it never reached one).
    pub(crate) fn failed(&mut self, slot: Option<usize>, error: &CallError) {
        let counts = self.counts(slot);
        counts.failed += 1;
        let kind = match error.root() {
            CallError::Handler { .. }
            | CallError::Panic { .. }
            | CallError::UnknownMethod { .. }
            | CallError::BadArguments { .. } => &mut counts.handler,
            CallError::Timeout { .. } | CallError::Deadline { .. } => &mut counts.timed_out,
            CallError::WorkerDied { .. }
            | CallError::Protocol { .. }
            | CallError::NodeLost { .. } => &mut counts.worker_lost,
            CallError::Refused { .. } => &mut counts.refused,
            CallError::Cancelled => &mut counts.cancelled,
            CallError::WorkerStart { .. }
            | CallError::Quarantined { .. }
            | CallError::Engine { .. } => &mut counts.unavailable,
            CallError::ShutDown => &mut counts.shut_down,
            _ => &mut counts.other,
        };
        *kind += 1;
    }

    pub(crate) fn retried(&mut self, slot: usize) {
        self.counts(Some(slot)).retried += 1;
    }

    pub(crate) fn refused(&mut self, slot: usize) {
        self.counts(Some(slot)).refusals += 1;
    }

    pub(crate) fn spawned(&mut self, slot: usize) {
        if let Some(book) = self.slots.get_mut(slot) {
            book.workers.spawned += 1;
        }
    }

    pub(crate) fn ended(&mut self, slot: usize, how: Ended) {
        let Some(book) = self.slots.get_mut(slot) else {
            return;
        };
        let w = &mut book.workers;
        let count = match how {
            Ended::Crashed => &mut w.crashed,
            Ended::FailedToStart => &mut w.failed_to_start,
            Ended::Stopped(StopReason::Recycled) => &mut w.recycled,
            Ended::Stopped(StopReason::Idle) => &mut w.idle,
            Ended::Stopped(StopReason::ForACall) => &mut w.stopped,
            Ended::Stopped(StopReason::ShutDown) => &mut w.shut_down,
        };
        *count += 1;
    }

    /// The statistics as of now.
    pub(crate) fn report(&self) -> Stats {
        let uptime = self.epoch.elapsed();
        let up_us = (uptime.as_micros() as f64).max(1.0);
        let mut run = histogram();
        let mut wait = histogram();
        let mut total = SlotStats {
            calls: self.unplaced,
            ..SlotStats::default()
        };
        let mut busy = 0u64;
        let slots = self
            .slots
            .iter()
            .map(|book| {
                let _ = run.add(&book.run);
                let _ = wait.add(&book.wait);
                busy += book.busy_us;
                add_calls(&mut total.calls, &book.calls);
                add_workers(&mut total.workers, &book.workers);
                SlotStats {
                    calls: book.calls,
                    workers: book.workers,
                    run_time: latency(&book.run),
                    wait_time: latency(&book.wait),
                    utilization: book.busy_us as f64 / up_us,
                }
            })
            .collect::<Vec<_>>();
        total.run_time = latency(&run);
        total.wait_time = latency(&wait);
        total.utilization = busy as f64 / (up_us * self.slots.len().max(1) as f64);
        Stats {
            uptime,
            total,
            slots,
            duplicates: 0,
        }
    }
}

fn add_calls(to: &mut CallCounts, from: &CallCounts) {
    let CallCounts {
        succeeded,
        failed,
        handler,
        timed_out,
        worker_lost,
        refused,
        cancelled,
        unavailable,
        shut_down,
        other,
        retried,
        refusals,
    } = *from;
    to.succeeded += succeeded;
    to.failed += failed;
    to.handler += handler;
    to.timed_out += timed_out;
    to.worker_lost += worker_lost;
    to.refused += refused;
    to.cancelled += cancelled;
    to.unavailable += unavailable;
    to.shut_down += shut_down;
    to.other += other;
    to.retried += retried;
    to.refusals += refusals;
}

fn add_workers(to: &mut WorkerCounts, from: &WorkerCounts) {
    let WorkerCounts {
        spawned,
        crashed,
        failed_to_start,
        recycled,
        idle,
        stopped,
        shut_down,
    } = *from;
    to.spawned += spawned;
    to.crashed += crashed;
    to.failed_to_start += failed_to_start;
    to.recycled += recycled;
    to.idle += idle;
    to.stopped += stopped;
    to.shut_down += shut_down;
}

fn latency(h: &Histogram<u64>) -> Latency {
    if h.is_empty() {
        return Latency::default();
    }
    let us = Duration::from_micros;
    Latency {
        count: h.len(),
        min: us(h.min()),
        mean: Duration::from_secs_f64(h.mean() / 1e6),
        p50: us(h.value_at_quantile(0.5)),
        p90: us(h.value_at_quantile(0.9)),
        p99: us(h.value_at_quantile(0.99)),
        max: us(h.max()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_add_up_per_slot_and_in_total() {
        let mut book = Book::new(2, Instant::now());
        book.tick();
        let t = book.now();
        book.started(0, t);
        book.answered(0, t);
        book.succeeded(0);
        book.failed(Some(1), &CallError::Cancelled);
        book.failed(
            Some(1),
            &CallError::RetriesExhausted {
                attempts: 2,
                last: Box::new(CallError::Timeout {
                    after: Duration::from_secs(1),
                }),
                earlier: vec![],
            },
        );
        book.failed(None, &CallError::ShutDown);
        book.retried(1);
        book.refused(0);
        book.spawned(0);
        book.ended(0, Ended::Stopped(StopReason::Recycled));
        let stats = book.report();
        assert_eq!(stats.slots[0].calls.succeeded, 1);
        assert_eq!(stats.slots[1].calls.failed, 2);
        assert_eq!(
            stats.slots[1].calls.timed_out, 1,
            "by the last attempt's kind"
        );
        assert_eq!(stats.slots[1].calls.cancelled, 1);
        let total = stats.total.calls;
        assert_eq!((total.succeeded, total.failed, total.shut_down), (1, 3, 1));
        assert_eq!((total.retried, total.refusals), (1, 1));
        assert_eq!(stats.total.workers.recycled, 1);
        assert_eq!(stats.total.run_time.count, 1);
        assert_eq!(stats.slots[1].run_time, Latency::default());
    }
}
