//! Pipe buffers grown only when large frames need them, within a share of the user's quota.
//!
//! Linux gives each pipe 64 KiB and lets a user's pipes grow to at most
//! `/proc/sys/fs/pipe-user-pages-soft` in all (64 MiB by default); past that, every new pipe
//! of that user, in any program, gets a single page. So a worker's pipes start at the
//! default, and one grows (to at most 1 MiB) when a frame larger than it crosses it, while the
//! whole process has grown its pipes by less than a quarter of that quota.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// The largest buffer asked for (Linux's `pipe-max-size` for unprivileged users, 1 MiB).
pub(super) const MAX_PIPE: usize = 1024 * 1024;
/// The size Linux gives a new pipe, assumed when it cannot be asked.
const DEFAULT_PIPE: usize = 64 * 1024;

/// Bytes of growth beyond the default that all of this process's pipes hold.
static GROWN: AtomicUsize = AtomicUsize::new(0);

/// How much growth the process allows itself: a quarter of the per-user soft limit.
fn budget() -> usize {
    static BUDGET: OnceLock<usize> = OnceLock::new();
    *BUDGET.get_or_init(|| crate::sys::pipe_user_soft_limit().unwrap_or(64 << 20) / 4)
}

/// One end of a pipe the farm may grow; gives its growth back to the budget when dropped.
#[derive(Debug)]
pub(super) struct PipeBuffer {
    fd: RawFd,
    size: usize,
    /// Growth beyond the default that this pipe holds from the budget.
    granted: usize,
}

impl PipeBuffer {
    /// `fd` must stay open as long as this value lives.
    pub(super) fn new(fd: RawFd) -> Self {
        PipeBuffer {
            fd,
            size: crate::sys::pipe_size(fd).unwrap_or(DEFAULT_PIPE),
            granted: 0,
        }
    }

    /// The pipe's buffer size now.
    pub(super) fn size(&self) -> usize {
        self.size
    }

    /// Grows the pipe to hold `len` bytes (rounded up to a power of two, at most
    /// [`MAX_PIPE`]) if it is smaller and the budget allows. Best effort: a small pipe
    /// still works, in more system calls.
    pub(super) fn fit(&mut self, len: usize) {
        if len <= self.size || self.size >= MAX_PIPE {
            return;
        }
        let want = len.next_power_of_two().min(MAX_PIPE);
        let extra = want - self.size;
        let taken = GROWN.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |grown| {
            (grown + extra <= budget()).then_some(grown + extra)
        });
        if taken.is_err() {
            return;
        }
        match crate::sys::set_pipe_size(self.fd, want) {
            Some(got) if got > self.size => {
                let used = got - self.size;
                if used >= extra {
                    GROWN.fetch_add(used - extra, Ordering::Relaxed);
                } else {
                    GROWN.fetch_sub(extra - used, Ordering::Relaxed);
                }
                self.granted += used;
                self.size = got;
            }
            _ => {
                GROWN.fetch_sub(extra, Ordering::Relaxed);
            }
        }
    }
}

impl Drop for PipeBuffer {
    fn drop(&mut self) {
        GROWN.fetch_sub(self.granted, Ordering::Relaxed);
    }
}
