//! Recycling: a worker is retired (takes no new calls, finishes what it has, is replaced)
//! once it was handed `ttl` calls or grew past `max_memory`; it is stopped once it had no
//! call for `max_idle_time`, and replaced only when calls need it.

/// The recycling limits.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RecyclePolicy {
    pub(crate) ttl: Option<u64>,
    pub(crate) max_memory: Option<u64>,
}

impl RecyclePolicy {
    /// Whether a worker that has just been handed its `handed`-th call must retire.
    pub(crate) fn ttl_reached(&self, handed: u64) -> bool {
        self.ttl == Some(handed)
    }

    /// Whether a worker using `rss` bytes must retire.
    pub(crate) fn memory_exceeded(&self, rss: Option<u64>) -> Option<u64> {
        match (self.max_memory, rss) {
            (Some(limit), Some(rss)) if rss > limit => Some(rss),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_fires_once_at_the_limit() {
        let p = RecyclePolicy {
            ttl: Some(3),
            ..Default::default()
        };
        let fired: Vec<u64> = (1..=6).filter(|&n| p.ttl_reached(n)).collect();
        assert_eq!(fired, [3]);
        assert!(!RecyclePolicy::default().ttl_reached(1));
    }

    #[test]
    fn memory_limit_needs_a_measurement_above_it() {
        let p = RecyclePolicy {
            max_memory: Some(100),
            ..Default::default()
        };
        assert_eq!(p.memory_exceeded(Some(101)), Some(101));
        assert_eq!(p.memory_exceeded(Some(100)), None);
        assert_eq!(p.memory_exceeded(None), None);
        assert_eq!(
            RecyclePolicy::default().memory_exceeded(Some(u64::MAX)),
            None
        );
    }
}
