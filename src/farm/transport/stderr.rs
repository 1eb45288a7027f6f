//! A worker's stderr: drained as it comes (so the worker never blocks on it), passed on as
//! the farm's [`StderrMode`] says, its lines captured for `Farm::stderr`, and its last
//! lines kept for error reports.
//!
//! Forwarded lines go through one thread per process that writes them to our stderr, with
//! a bounded queue in front of it: when our stderr does not keep up (a pipe nobody reads, a
//! paused terminal), lines are dropped and counted rather than blocking the farm. The farm
//! sends an event for them; the thread logs them once our stderr takes writes again (a log
//! line written from the farm's own task could block on that very stderr).

use super::Inbound;
use crate::event::WorkerId;
use crate::farm::capture::StderrCapture;
use crate::options::StderrMode;
use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::process::ChildStderr;
use tokio::sync::mpsc;

/// Lines of a worker's stderr kept for error reports.
const STDERR_TAIL_LINES: usize = 10;
/// Forwarded bytes that may wait for our stderr, all workers together, besides the batch
/// being written; past this, lines are dropped.
const FORWARD_QUEUE_BYTES: usize = 1024 * 1024;
/// Dropped lines are reported at most this often per worker (and once more at its end).
const DROP_REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// Drains the worker's stderr (so the pipe never fills), passes it on as `mode` says, and
/// returns its last lines. Reads in chunks, so a line without end costs bounded memory.
pub(super) async fn forward_stderr(
    mut stderr: ChildStderr,
    worker: WorkerId,
    pid: u32,
    mode: StderrMode,
    capture: Arc<StderrCapture>,
    inbound: mpsc::UnboundedSender<Inbound>,
) -> Vec<String> {
    let mut buf = vec![0u8; 16 * 1024];
    let mut tail = StderrTail::default();
    let mut forward = (mode == StderrMode::Forward).then(|| Forwarding::new(worker, inbound));
    loop {
        let n = match stderr.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        if let Some(forward) = &mut forward {
            forward.feed(chunk);
        }
        tail.feed(chunk, |line| on_line(line, worker, pid, mode, &capture));
    }
    tail.finish(|line| on_line(line, worker, pid, mode, &capture));
    if let Some(forward) = &mut forward {
        forward.finish();
    }
    tracing::trace!(pid, "worker stderr closed");
    tail.lines.into()
}

/// A whole line of a worker's stderr: logged (in [`StderrMode::Log`]) and captured.
fn on_line(line: &str, worker: WorkerId, pid: u32, mode: StderrMode, capture: &StderrCapture) {
    if mode == StderrMode::Log {
        tracing::info!(
            target: "workfarm::worker",
            worker = worker.as_u64(),
            slot = worker.slot(),
            pid,
            "{line}"
        );
    }
    capture.push(worker, pid, line);
}

/// One worker's stderr on its way to ours, in whole lines.
struct Forwarding {
    worker: WorkerId,
    inbound: mpsc::UnboundedSender<Inbound>,
    /// The end of the last chunk, not yet a whole line.
    partial: Vec<u8>,
    /// Lines dropped since the last report.
    dropped: u64,
    last_report: Instant,
}

impl Forwarding {
    fn new(worker: WorkerId, inbound: mpsc::UnboundedSender<Inbound>) -> Self {
        Forwarding {
            worker,
            inbound,
            partial: Vec::new(),
            dropped: 0,
            last_report: Instant::now(),
        }
    }

    /// Passes on the whole lines in `chunk` (and a line-less run once it is long).
    fn feed(&mut self, chunk: &[u8]) {
        let lines = match chunk.iter().rposition(|&b| b == b'\n') {
            Some(end) => {
                let mut lines = std::mem::take(&mut self.partial);
                lines.extend_from_slice(&chunk[..=end]);
                self.partial.extend_from_slice(&chunk[end + 1..]);
                lines
            }
            None => {
                self.partial.extend_from_slice(chunk);
                if self.partial.len() < StderrTail::MAX_LINE {
                    return;
                }
                std::mem::take(&mut self.partial)
            }
        };
        self.offer(lines);
        if self.dropped > 0 && self.last_report.elapsed() >= DROP_REPORT_INTERVAL {
            self.report();
        }
    }

    fn finish(&mut self) {
        if !self.partial.is_empty() {
            let mut rest = std::mem::take(&mut self.partial);
            rest.push(b'\n');
            self.offer(rest);
        }
        if self.dropped > 0 {
            self.report();
        }
    }

    fn offer(&mut self, lines: Vec<u8>) {
        let count = lines.iter().filter(|&&b| b == b'\n').count().max(1) as u64;
        let taken = match StderrWriter::get() {
            Some(writer) => writer.offer(lines, count),
            None => false,
        };
        if !taken {
            self.dropped += count;
        }
    }

    fn report(&mut self) {
        let _ = self.inbound.send(Inbound::StderrDropped {
            worker: self.worker,
            lines: std::mem::take(&mut self.dropped),
        });
        self.last_report = Instant::now();
    }
}

/// The thread that writes forwarded lines to our stderr, and the bounded queue before it.
struct StderrWriter {
    queue: Mutex<Queue>,
    wake: Condvar,
    /// Lines dropped since the thread last logged it.
    dropped: AtomicU64,
}

#[derive(Default)]
struct Queue {
    chunks: VecDeque<Vec<u8>>,
    bytes: usize,
}

impl StderrWriter {
    /// The process's writer, started on first use; `None` if no thread could be started.
    fn get() -> Option<&'static StderrWriter> {
        static WRITER: OnceLock<Option<&'static StderrWriter>> = OnceLock::new();
        *WRITER.get_or_init(|| {
            let writer: &'static StderrWriter = Box::leak(Box::new(StderrWriter {
                queue: Mutex::new(Queue::default()),
                wake: Condvar::new(),
                dropped: AtomicU64::new(0),
            }));
            std::thread::Builder::new()
                .name("workfarm-stderr".into())
                .spawn(move || writer.run())
                .ok()
                .map(|_| writer)
        })
    }

    /// Queues `lines` (`count` of them) unless the queue is full; whether they were taken.
    fn offer(&self, lines: Vec<u8>, count: u64) -> bool {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if queue.bytes + lines.len() > FORWARD_QUEUE_BYTES {
            self.dropped.fetch_add(count, Ordering::Relaxed);
            return false;
        }
        queue.bytes += lines.len();
        queue.chunks.push_back(lines);
        self.wake.notify_one();
        true
    }

    fn run(&self) {
        loop {
            let batch: Vec<Vec<u8>> = {
                let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
                while queue.chunks.is_empty() {
                    queue = self.wake.wait(queue).unwrap_or_else(|e| e.into_inner());
                }
                queue.bytes = 0;
                queue.chunks.drain(..).collect()
            };
            let dropped = self.dropped.swap(0, Ordering::Relaxed);
            if dropped > 0 {
                tracing::warn!(
                    lines = dropped,
                    "dropped lines of worker stderr: the farm's own stderr did not keep up"
                );
            }
            let mut stderr = std::io::stderr().lock();
            for chunk in &batch {
                // Blocks while our stderr is stalled; the queue fills meanwhile and lines
                // are dropped, but no farm waits.
                let _ = stderr.write_all(chunk);
            }
            let _ = stderr.flush();
        }
    }
}

/// The last lines of a worker's stderr, assembled from chunks.
#[derive(Debug, Default)]
struct StderrTail {
    lines: VecDeque<String>,
    partial: Vec<u8>,
}

impl StderrTail {
    /// Longest line kept whole; longer ones are cut into pieces of this size.
    const MAX_LINE: usize = 4096;

    fn feed(&mut self, mut chunk: &[u8], mut on_line: impl FnMut(&str)) {
        while !chunk.is_empty() {
            let room = Self::MAX_LINE - self.partial.len();
            match chunk.iter().take(room).position(|&b| b == b'\n') {
                Some(i) => {
                    self.partial.extend_from_slice(&chunk[..i]);
                    chunk = &chunk[i + 1..];
                    self.end_line(&mut on_line);
                }
                None => {
                    let take = chunk.len().min(room);
                    self.partial.extend_from_slice(&chunk[..take]);
                    chunk = &chunk[take..];
                    if self.partial.len() == Self::MAX_LINE {
                        self.end_line(&mut on_line);
                    }
                }
            }
        }
    }

    fn finish(&mut self, mut on_line: impl FnMut(&str)) {
        if !self.partial.is_empty() {
            self.end_line(&mut on_line);
        }
    }

    fn end_line(&mut self, on_line: &mut impl FnMut(&str)) {
        let line = String::from_utf8_lossy(&self.partial).trim_end().to_owned();
        self.partial.clear();
        on_line(&line);
        if self.lines.len() == STDERR_TAIL_LINES {
            self.lines.pop_front();
        }
        self.lines.push_back(line.chars().take(500).collect());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines_of(chunks: &[&[u8]]) -> (Vec<String>, Vec<String>) {
        let mut tail = StderrTail::default();
        let mut seen = Vec::new();
        for chunk in chunks {
            tail.feed(chunk, |l| seen.push(l.to_owned()));
        }
        tail.finish(|l| seen.push(l.to_owned()));
        (seen, tail.lines.into())
    }

    #[test]
    fn lines_are_assembled_across_chunks() {
        let (seen, _) = lines_of(&[b"he", b"llo\nwor", b"ld\n", b"end"]);
        assert_eq!(seen, ["hello", "world", "end"]);
    }

    #[test]
    fn only_the_last_lines_are_kept() {
        let text: String = (0..50).map(|i| format!("line {i}\n")).collect();
        let (seen, tail) = lines_of(&[text.as_bytes()]);
        assert_eq!(seen.len(), 50);
        assert_eq!(tail.len(), STDERR_TAIL_LINES);
        assert_eq!(tail.last().map(String::as_str), Some("line 49"));
    }

    #[test]
    fn an_endless_line_costs_bounded_memory() {
        let chunk = vec![b'x'; 10_000];
        let mut tail = StderrTail::default();
        for _ in 0..100 {
            tail.feed(&chunk, |_| {});
            assert!(tail.partial.len() <= StderrTail::MAX_LINE);
        }
        assert!(tail.lines.iter().all(|l| l.len() <= 500));
    }
}
