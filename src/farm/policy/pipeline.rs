//! Pipelining: a worker may hold sync calls beyond those it runs, so short calls do not
//! pay a round trip each; the waiting ones are taken back (withdrawn) whenever waiting
//! there could cost them, so no call is held up behind another call's hang or long run.
//!
//! A call waits in a worker only with a place in the slot table the two share
//! (`crate::shm::Slots`): taking it back is one compare-and-swap there, decided at once,
//! even while the worker is deep in a handler. No shared memory, no waiting calls.
//!
//! Three rules take waiting calls back, and they only ever move calls that have not started:
//! - **Stalled.** A worker that holds waiting calls and neither started nor finished a call
//!   over a whole [`STALL_CHECK`] period gives all of them back, and takes no more waiting
//!   calls until a check sees it finish more than one call per thread in a period. So a
//!   call waits behind a hang or a long call for at most two periods (plus a round trip),
//!   and calls longer than a period are pipelined once at most (for them a round trip is
//!   nothing). A call taken back goes next where it starts at once.
//! - **Abandoned.** At each check, a waiting call whose caller has gone is asked back and
//!   dropped, broadcast calls included, so a dropped call that had not started never runs.
//! - **Idle.** When nothing waits in the farm's queue and a worker has a free thread, the
//!   newest waiting call of the worker with the most of them is withdrawn for it, one per
//!   free thread at a time.

use std::time::Duration;

/// Sync calls a default worker holds, running or waiting (at least its thread count).
pub(crate) const SYNC_CALLS_PER_WORKER: usize = 32;

/// Frame bytes of the calls waiting in one worker, at most (a call that would start at once
/// is always sent): for large calls a few waiting already hide the round trip.
pub(crate) const WAITING_BYTES_PER_WORKER: usize = 4 * 1024 * 1024;

/// How often workers that hold waiting calls are checked for progress.
pub(crate) const STALL_CHECK: Duration = Duration::from_millis(5);

/// Whether a worker that holds waiting calls is stalled: `progress` calls of it started or
/// finished since the last check, and that is none.
pub(crate) fn is_stalled(progress: u64) -> bool {
    progress == 0
}

/// Whether a stalled worker may take waiting calls again: over the last check period it
/// finished (and started) more than one call per thread, so its calls are short again.
pub(crate) fn is_quick(progress: u64, threads: usize) -> bool {
    progress > 2 * threads as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_is_stalled_only_without_progress() {
        assert!(is_stalled(0));
        assert!(!is_stalled(1));
    }

    #[test]
    fn a_stalled_worker_is_quick_again_past_one_call_per_thread_per_check() {
        // A start and an end per call: two per call.
        assert!(!is_quick(2, 1));
        assert!(is_quick(3, 1));
        assert!(!is_quick(8, 4));
        assert!(is_quick(9, 4));
    }
}
