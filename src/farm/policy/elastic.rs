//! Elastic pools (`min_workers`..`workers`): how many workers the farm wants.
//!
//! The pool starts at its floor, grows by one worker per call left waiting for room (less
//! the workers already starting, which will take them), never past the maximum, and
//! shrinks by one each time a worker sits idle for `max_idle_time`, never below the floor.
//! A fixed pool is the case floor = maximum, except that without `min_workers` an idle
//! worker may stop (floor 0 for shrinking) and comes back when calls need it.

/// The pool's bounds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bounds {
    /// Workers started at first, and kept however idle (`min_workers`, else `workers`).
    pub(crate) start: usize,
    /// The fewest an idle pool shrinks to (`min_workers`, else 0).
    pub(crate) floor: usize,
    pub(crate) max: usize,
}

impl Bounds {
    pub(crate) fn new(min_workers: Option<usize>, workers: usize) -> Self {
        Bounds {
            start: min_workers.unwrap_or(workers),
            floor: min_workers.unwrap_or(0),
            max: workers,
        }
    }

    /// The size the pool wants, from `size`, with `waiting` calls that found no room and
    /// `starting` workers not yet online.
    pub(crate) fn grow(self, size: usize, waiting: usize, starting: usize) -> usize {
        let more = waiting.saturating_sub(starting);
        size.saturating_add(more).min(self.max).max(size)
    }

    /// Whether an idle worker may stop, with `live` workers starting or online.
    pub(crate) fn may_shrink(self, live: usize) -> bool {
        live > self.floor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_one_per_waiting_call_to_the_max_and_shrinks_to_the_floor() {
        let elastic = Bounds::new(Some(1), 4);
        assert_eq!((elastic.start, elastic.floor), (1, 1));
        assert_eq!(elastic.grow(1, 0, 0), 1);
        assert_eq!(elastic.grow(1, 1, 0), 2);
        assert_eq!(elastic.grow(2, 1, 1), 2, "the starting worker will take it");
        assert_eq!(elastic.grow(1, 100, 0), 4);
        assert!(elastic.may_shrink(2) && !elastic.may_shrink(1));
        let fixed = Bounds::new(None, 4);
        assert_eq!((fixed.start, fixed.floor), (4, 0));
        assert!(fixed.may_shrink(1), "idle workers stop, as before");
    }
}
