//! A worker's stderr: drained as it comes (so the worker never blocks on it), passed on as
//! the farm's [`StderrMode`] says, and its last lines kept for error reports.

use crate::options::StderrMode;
use std::collections::VecDeque;
use std::io::Write;
use tokio::io::AsyncReadExt;
use tokio::process::ChildStderr;

/// Lines of a worker's stderr kept for error reports.
const STDERR_TAIL_LINES: usize = 10;

/// Drains the worker's stderr (so the pipe never fills), passes it on as `mode` says, and
/// returns its last lines. Reads in chunks, so a line without end costs bounded memory.
pub(super) async fn forward_stderr(
    mut stderr: ChildStderr,
    pid: u32,
    mode: StderrMode,
) -> Vec<String> {
    let mut buf = vec![0u8; 16 * 1024];
    let mut tail = StderrTail::default();
    loop {
        let n = match stderr.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        if mode == StderrMode::Forward {
            let _ = std::io::stderr().lock().write_all(chunk);
        }
        tail.feed(chunk, |line| {
            if mode == StderrMode::Log {
                tracing::info!(target: "workfarm::worker", pid, "{line}");
            }
        });
    }
    tail.finish(|line| {
        if mode == StderrMode::Log {
            tracing::info!(target: "workfarm::worker", pid, "{line}");
        }
    });
    tracing::trace!(pid, "worker stderr closed");
    tail.lines.into()
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
