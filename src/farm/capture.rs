//! The last lines of each pool slot's stderr, kept for [`Farm::stderr`](crate::Farm::stderr)
//! (jest-worker's `getStderr()`): one bounded ring per slot, which a replacement worker
//! inherits, so the lines a crashed worker wrote before it died are still there.

use crate::event::WorkerId;
use std::collections::VecDeque;
use std::sync::Mutex;

/// One line a worker wrote to its stderr (without its line end; lines longer than 4 KiB
/// arrive in pieces of 4 KiB).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StderrLine {
    /// The worker that wrote it (its slot: [`WorkerId::slot`]).
    pub worker: WorkerId,
    /// That worker's process id.
    pub pid: u32,
    /// The line, decoded as UTF-8 (invalid bytes replaced).
    pub line: String,
}

/// Every slot's ring.
#[derive(Debug)]
pub(crate) struct StderrCapture {
    /// Lines kept per slot; 0 keeps none.
    lines: usize,
    slots: Vec<Mutex<VecDeque<StderrLine>>>,
}

impl StderrCapture {
    pub(crate) fn new(slots: usize, lines: usize) -> Self {
        StderrCapture {
            lines,
            slots: (0..slots).map(|_| Mutex::new(VecDeque::new())).collect(),
        }
    }

    /// Keeps `line` from `worker`, dropping the slot's oldest once it holds `lines`.
    pub(crate) fn push(&self, worker: WorkerId, pid: u32, line: &str) {
        let Some(ring) = self.slots.get(worker.slot()) else {
            return;
        };
        if self.lines == 0 {
            return;
        }
        let mut ring = ring.lock().unwrap_or_else(|e| e.into_inner());
        if ring.len() == self.lines {
            ring.pop_front();
        }
        ring.push_back(StderrLine {
            worker,
            pid,
            line: line.to_owned(),
        });
    }

    /// Slot `slot`'s lines, oldest first (none for a slot the farm does not have).
    pub(crate) fn lines(&self, slot: usize) -> Vec<StderrLine> {
        self.slots.get(slot).map_or_else(Vec::new, |ring| {
            let ring = ring.lock().unwrap_or_else(|e| e.into_inner());
            ring.iter().cloned().collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64, slot: usize) -> WorkerId {
        WorkerId::new(std::num::NonZeroU64::new(n).expect("non-zero"), slot)
    }

    #[test]
    fn each_slot_keeps_its_last_lines() {
        let capture = StderrCapture::new(2, 3);
        let (a, b) = (id(1, 0), id(2, 1));
        for i in 0..5 {
            capture.push(a, 10, &format!("a{i}"));
        }
        capture.push(b, 20, "b0");
        let lines: Vec<String> = capture.lines(0).into_iter().map(|l| l.line).collect();
        assert_eq!(lines, ["a2", "a3", "a4"]);
        assert_eq!(capture.lines(1)[0].pid, 20);
        assert!(capture.lines(7).is_empty());
    }

    #[test]
    fn zero_keeps_nothing() {
        let capture = StderrCapture::new(1, 0);
        capture.push(id(1, 0), 1, "x");
        assert!(capture.lines(0).is_empty());
    }
}
