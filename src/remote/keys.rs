//! The farm's keys. The `{F}` hash tag keeps them in one Redis Cluster slot, so MULTI and
//! Lua scripts may touch several.

/// The consumer group of the calls stream: every node reads through it.
pub(crate) const GROUP: &str = "nodes";

/// Key names of farm `F`.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    prefix: String,
}

impl Keys {
    pub(crate) fn new(farm: &str) -> Self {
        Keys {
            prefix: format!("wf:{{{farm}}}:"),
        }
    }

    /// The calls stream, read by the nodes through [`GROUP`].
    pub(crate) fn calls(&self) -> String {
        format!("{}calls", self.prefix)
    }

    /// One caller's results stream.
    pub(crate) fn results(&self, client: &str) -> String {
        format!("{}res:{client}", self.prefix)
    }

    /// A node's liveness key (expires with its lease).
    pub(crate) fn node(&self, node: &str) -> String {
        format!("{}node:{node}", self.prefix)
    }

    /// A node's inbox: broadcasts addressed to it.
    pub(crate) fn inbox(&self, node: &str) -> String {
        format!("{}inbox:{node}", self.prefix)
    }

    /// The nodes that held a call and lost it (died, or their lease ran out), oldest
    /// first: what `RetriesExhausted` names.
    pub(crate) fn tried(&self, entry: &str) -> String {
        format!("{}tried:{entry}", self.prefix)
    }

    /// Members: node → last heartbeat (ms since the Unix epoch).
    pub(crate) fn nodes(&self) -> String {
        format!("{}nodes", self.prefix)
    }
}

/// A name unique to this process start: `host-pid-n` (never reused: a reused name would
/// inherit a dead process's pending calls as if they were still running).
pub(crate) fn unique_name() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "{}-{}-{:x}{}",
        hostname(),
        std::process::id(),
        nanos,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".to_owned())
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_a_hash_tag_and_names_are_unique() {
        let k = Keys::new("f");
        assert_eq!(k.calls(), "wf:{f}:calls");
        assert_eq!(k.results("c"), "wf:{f}:res:c");
        assert_ne!(unique_name(), unique_name());
    }
}
