//! Start failures: a binary that cannot start is restarted with backoff, never in a hot
//! loop, and after a few failures in a row with no worker online, calls fail fast.
//!
//! Only a worker that never proved it can serve counts: one that went before its
//! handshake, or within [`EARLY_DEATH`] of it before it was handed any call. A worker that
//! goes while running calls is a worker failure: its calls follow the retry policy, nothing
//! fails fast, and its replacement starts at once, unless workers keep dying young without
//! answering a single call (a binary that dies 30 ms after start, whatever it runs): then
//! replacements are paced, 10 ms doubling to 1 s, so even that is no hot loop. Any answer
//! resets the pace, so a poison call costs its neighbours at most a few milliseconds.

use crate::error::ExitInfo;
use std::time::Duration;

/// Consecutive start failures after which `ready()` waiters learn why, and (with no worker
/// online) calls fail fast.
pub(crate) const FAILURES_BEFORE_FAILING: u32 = 3;
const BACKOFF_FIRST: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
const PACE_FIRST: Duration = Duration::from_millis(10);
const PACE_MAX: Duration = Duration::from_secs(1);
/// A worker that goes this soon after its handshake, before being handed a call, failed to
/// start (a worker that exits on its own at once, say).
pub(crate) const EARLY_DEATH: Duration = Duration::from_secs(1);

/// Whether a worker has yet to prove it can serve: `online_for` is how long ago its
/// handshake completed (`None`: not yet), `handed_any` whether it was ever given a call.
pub(crate) fn is_young(online_for: Option<Duration>, handed_any: bool) -> bool {
    match online_for {
        None => true,
        Some(t) => !handed_any && t < EARLY_DEATH,
    }
}

/// What to do after a start failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Verdict {
    /// Wait this long before spawning again.
    pub(crate) backoff: Duration,
    /// Tell `ready()` waiters: workers are not about to come up.
    pub(crate) fail_ready: bool,
    /// Fail queued and new calls with this failure until a worker comes online.
    pub(crate) fail_calls: bool,
}

/// The farm's start-up record.
#[derive(Debug, Default)]
pub(crate) struct Startup {
    failures: u32,
    /// Workers in a row that died young while running calls, answering none.
    young_crashes: u32,
    /// Set while calls fail fast: why no worker starts.
    failing: Option<String>,
}

impl Startup {
    /// A worker failed to start (`why`); `any_online` whether another worker serves.
    pub(crate) fn failed(&mut self, why: &str, any_online: bool) -> Verdict {
        self.failures = self.failures.saturating_add(1);
        let exp = self.failures.saturating_sub(1).min(10);
        let backoff = (BACKOFF_FIRST * 2u32.pow(exp)).min(BACKOFF_MAX);
        let over = self.failures >= FAILURES_BEFORE_FAILING;
        if over && !any_online {
            self.failing = Some(why.to_owned());
        }
        Verdict {
            backoff,
            fail_ready: over,
            fail_calls: over && !any_online,
        }
    }

    /// A worker completed its handshake: calls may be taken again (the failure count, and
    /// so the backoff, is kept until a worker answers a call).
    pub(crate) fn online(&mut self) {
        self.failing = None;
    }

    /// A worker answered its first call: the binary works.
    pub(crate) fn proved(&mut self) {
        self.failures = 0;
        self.young_crashes = 0;
    }

    /// A worker died young while running calls (a worker failure, not a start failure):
    /// how long to wait before its replacement.
    pub(crate) fn crashed_young(&mut self) -> Duration {
        let exp = self.young_crashes.min(10);
        self.young_crashes = self.young_crashes.saturating_add(1);
        (PACE_FIRST * 2u32.pow(exp)).min(PACE_MAX)
    }

    /// Why calls fail fast, while they do.
    pub(crate) fn failing(&self) -> Option<&str> {
        self.failing.as_deref()
    }

    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }
}

/// What the dispatcher knows of a worker that ended.
#[derive(Debug, Clone, Default)]
pub(crate) struct Life {
    /// Why the farm stopped it as a start failure, if it did.
    pub(crate) start_failure: Option<String>,
    /// How long ago its handshake completed (`None`: never).
    pub(crate) online_for: Option<Duration>,
    pub(crate) handed_any: bool,
    pub(crate) answered: bool,
    /// The farm had asked it to stop (idle, ttl, a timeout, a fault, shutdown).
    pub(crate) stopped_by_farm: bool,
}

/// How a worker's life ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ending {
    /// It never proved it could serve: count a start failure (backoff, perhaps fail fast).
    FailedStart(String),
    /// It died on its own after proving itself, or while running calls. `young`: it died
    /// within [`EARLY_DEATH`] of its handshake having answered nothing (its replacement is
    /// paced).
    Crashed { young: bool },
    /// The farm stopped it; whatever follows was decided then.
    Stopped,
}

/// Judges a worker's end from its life.
pub(crate) fn judge_exit(
    life: Life,
    program: &str,
    exit: ExitInfo,
    stderr_tail: &[String],
) -> Ending {
    let young = is_young(life.online_for, life.handed_any);
    match (life.start_failure, life.online_for) {
        (Some(why), _) => Ending::FailedStart(why),
        (None, None) => Ending::FailedStart(exit_message(
            program,
            "exited during startup",
            exit,
            stderr_tail,
        )),
        (None, Some(_)) if life.stopped_by_farm => Ending::Stopped,
        (None, Some(_)) if young => Ending::FailedStart(exit_message(
            program,
            "exited right after its handshake",
            exit,
            stderr_tail,
        )),
        (None, Some(t)) => Ending::Crashed {
            young: !life.answered && t < EARLY_DEATH,
        },
    }
}

/// The start-failure message for a worker that ended: the program, what happened, how it
/// ended, and its last stderr lines.
pub(crate) fn exit_message(
    program: &str,
    what: &str,
    exit: ExitInfo,
    stderr_tail: &[String],
) -> String {
    let mut why = format!("{program} {what} with {exit}");
    if !stderr_tail.is_empty() {
        why.push_str("; last stderr lines:\n");
        why.push_str(&stderr_tail.join("\n"));
    }
    why
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn youth_ends_with_the_first_call_or_after_a_second() {
        let table = [
            (None, false, true),
            (None, true, true),
            (Some(Duration::from_millis(10)), false, true),
            (Some(Duration::from_millis(10)), true, false),
            (Some(EARLY_DEATH), false, false),
        ];
        for (online_for, handed, young) in table {
            assert_eq!(
                is_young(online_for, handed),
                young,
                "{online_for:?} {handed}"
            );
        }
    }

    #[test]
    fn endings_are_judged_from_the_life() {
        let exit = ExitInfo {
            code: Some(4),
            signal: None,
        };
        let ms = Duration::from_millis;
        let judge = |life: Life| judge_exit(life, "w", exit, &["oops".into()]);
        let before_handshake = judge(Life::default());
        assert!(
            matches!(&before_handshake, Ending::FailedStart(m) if m.contains("during startup") && m.contains("oops"))
        );
        let idle_death = judge(Life {
            online_for: Some(ms(30)),
            ..Life::default()
        });
        assert!(
            matches!(&idle_death, Ending::FailedStart(m) if m.contains("right after its handshake"))
        );
        let poison = Life {
            online_for: Some(ms(30)),
            handed_any: true,
            ..Life::default()
        };
        assert_eq!(judge(poison.clone()), Ending::Crashed { young: true });
        let seasoned = Life {
            answered: true,
            ..poison.clone()
        };
        assert_eq!(judge(seasoned), Ending::Crashed { young: false });
        let stopped = Life {
            stopped_by_farm: true,
            ..poison
        };
        assert_eq!(judge(stopped), Ending::Stopped);
        let refused = Life {
            start_failure: Some("bad version".into()),
            online_for: Some(ms(1)),
            stopped_by_farm: true,
            ..Life::default()
        };
        assert_eq!(judge(refused), Ending::FailedStart("bad version".into()));
    }

    #[test]
    fn backoff_doubles_to_a_cap() {
        let mut s = Startup::default();
        let delays: Vec<_> = (0..10).map(|_| s.failed("x", true).backoff).collect();
        assert_eq!(delays[0], Duration::from_millis(50));
        assert_eq!(delays[1], Duration::from_millis(100));
        assert_eq!(delays[2], Duration::from_millis(200));
        assert_eq!(delays[9], BACKOFF_MAX);
    }

    #[test]
    fn calls_fail_fast_only_with_no_worker_online() {
        let mut s = Startup::default();
        assert!(!s.failed("x", false).fail_calls);
        assert!(!s.failed("x", false).fail_calls);
        let third = s.failed("boom", false);
        assert!(third.fail_calls && third.fail_ready);
        assert_eq!(s.failing(), Some("boom"));
        s.online();
        assert_eq!(s.failing(), None);

        let mut s = Startup::default();
        for _ in 0..5 {
            let v = s.failed("x", true);
            assert!(!v.fail_calls);
        }
        assert!(s.failed("x", true).fail_ready);
    }

    #[test]
    fn young_crashes_are_paced_gently_and_reset_by_an_answer() {
        let mut s = Startup::default();
        let paces: Vec<_> = (0..9).map(|_| s.crashed_young()).collect();
        assert_eq!(paces[0], Duration::from_millis(10));
        assert_eq!(paces[1], Duration::from_millis(20));
        assert_eq!(paces[8], PACE_MAX);
        assert_eq!(s.failures(), 0, "a crash is not a start failure");
        s.proved();
        assert_eq!(s.crashed_young(), Duration::from_millis(10));
    }

    #[test]
    fn a_served_call_resets_the_count() {
        let mut s = Startup::default();
        s.failed("x", false);
        s.failed("x", false);
        s.proved();
        assert_eq!(s.failures(), 0);
        assert_eq!(s.failed("x", false).backoff, Duration::from_millis(50));
    }
}
