//! [`OrderChecker`]: the one strict per-aggregate order check.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use eventbus_core::Envelope;

/// The one strict order check, used by the conformance suite, the fault
/// tests and the bench. Per (topic, aggregate id), across every member of a
/// group, in order of handler start, given that each aggregate's versions
/// are published as 1, 2, 3, ... (none skipped):
///
/// - a **regression**: an attempt of a version below the highest already
///   attempted (even when that version was handled before), except in a
///   *replay*: after an aggregate moves to another member (a rebalance, a
///   crash and restart: see [`begin_as`](OrderChecker::begin_as)), the new
///   member may start again below the highest, and re-handles in order;
///   within one member's run, going back is always a regression;
/// - a **gap**: an attempt of version `v` while some version below `v` was
///   never attempted (a dead-lettered version was attempted, so it is no gap;
///   a message dead-lettered without an attempt must be declared with
///   [`skipped`](OrderChecker::skipped));
/// - an **overlap**: an attempt starting while another attempt of the same
///   aggregate runs;
/// - a **duplicate**: the highest attempted version attempted again after
///   it once succeeded (re-handling after a crash or redelivery). Attempting
///   it again after a failure is a **retry**, which is normal.
///
/// Record every attempt with [`begin`](OrderChecker::begin) and finish it
/// with [`Attempt::succeeded`] (dropping the guard records a failure, so a
/// handler that panics or is cancelled is still counted), or use
/// [`record`](OrderChecker::record) for a handler that cannot fail.
#[derive(Debug, Default)]
pub struct OrderChecker {
    state: Mutex<State>,
    /// Versions kept in each aggregate's `succeeded` below its highest;
    /// `None` keeps them all.
    replay_window: Option<i64>,
}

#[derive(Debug, Default)]
struct State {
    aggregates: HashMap<(String, String), AggregateSeen>,
    report: OrderReport,
}

#[derive(Debug, Default)]
struct AggregateSeen {
    /// Highest version attempted.
    highest: i64,
    /// Every version up to this one was attempted or declared skipped.
    contiguous: i64,
    /// Attempted or skipped versions above `contiguous`.
    above: std::collections::BTreeSet<i64>,
    /// Whether an attempt of `highest` succeeded.
    highest_succeeded: bool,
    /// Versions that once succeeded, below or at `highest`, kept only while
    /// a replay may revisit them.
    succeeded: std::collections::BTreeSet<i64>,
    /// The member of the current run, and the highest version it attempted.
    run_member: u64,
    run_highest: i64,
    /// Attempts running now.
    running: u32,
}

impl AggregateSeen {
    /// Records a success of `version`, forgetting successes more than
    /// `window` versions below the highest.
    fn succeeded(&mut self, version: i64, window: Option<i64>) {
        self.succeeded.insert(version);
        if let Some(window) = window {
            while self.succeeded.first().is_some_and(|v| *v < self.highest - window) {
                self.succeeded.pop_first();
            }
        }
    }

    fn mark(&mut self, version: i64) {
        if version > self.contiguous {
            self.above.insert(version);
        }
        while self.above.first() == Some(&(self.contiguous + 1)) {
            self.above.pop_first();
            self.contiguous += 1;
        }
    }
}

/// What an [`OrderChecker`] saw (counts).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OrderReport {
    /// Attempts recorded.
    pub attempts: u64,
    /// Attempts that succeeded (a version handled).
    pub received: u64,
    /// Attempts of the highest version after an earlier failed attempt of it.
    pub retries: u64,
    /// Attempts of the highest version after it once succeeded.
    pub duplicates: u64,
    /// Attempts of a version below the highest already attempted.
    pub regressions: u64,
    /// Attempts of a version while an earlier one was never attempted.
    pub gaps: u64,
    /// Attempts that started while another attempt of the aggregate ran.
    pub overlaps: u64,
}

impl OrderReport {
    /// Order violations: regressions plus gaps (overlaps are counted apart).
    pub fn violations(&self) -> u64 {
        self.regressions + self.gaps
    }

    /// True when nothing broke the order: no regression, gap or overlap.
    pub fn is_strictly_ordered(&self) -> bool {
        self.violations() == 0 && self.overlaps == 0
    }
}

impl std::fmt::Display for OrderReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} handled ({} attempts), {} violations ({} regressions, {} gaps), {} overlaps, {} duplicates, {} retries",
            self.received,
            self.attempts,
            self.violations(),
            self.regressions,
            self.gaps,
            self.overlaps,
            self.duplicates,
            self.retries
        )
    }
}

/// One running attempt, from [`OrderChecker::begin`]. Dropping it without
/// [`succeeded`](Attempt::succeeded) records a failed attempt.
#[derive(Debug)]
#[must_use = "an attempt ends when this guard is dropped"]
pub struct Attempt {
    checker: Arc<OrderChecker>,
    key: Option<(String, String)>,
    version: i64,
}

impl Attempt {
    /// The attempt succeeded: the version counts as handled.
    pub fn succeeded(mut self) {
        self.end(true);
    }

    fn end(&mut self, ok: bool) {
        let Some(key) = self.key.take() else { return };
        let mut state = self.checker.state.lock().unwrap();
        if ok {
            state.report.received += 1;
        }
        let window = self.checker.replay_window;
        let seen = state.aggregates.get_mut(&key).expect("begun before");
        seen.running -= 1;
        if ok {
            seen.succeeded(self.version, window);
            if self.version == seen.highest {
                seen.highest_succeeded = true;
            }
        }
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        self.end(false);
    }
}

impl OrderChecker {
    /// An empty checker.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty checker for long runs: it remembers the successes of each
    /// aggregate's last `versions` versions only, so its memory stays
    /// bounded (by the aggregates) however many events pass. Only the
    /// classification of a replay's re-handlings reaching further back
    /// changes (retries instead of duplicates); violations, gaps and
    /// overlaps are judged the same.
    pub fn with_replay_window(versions: i64) -> Self {
        Self {
            replay_window: Some(versions.max(1)),
            ..Self::default()
        }
    }

    /// Records the start of a handler attempt for `envelope` on `topic`;
    /// the attempt ends when the returned guard is finished or dropped.
    pub fn begin(self: &Arc<Self>, topic: &str, envelope: &Envelope) -> Attempt {
        self.begin_as(0, topic, envelope)
    }

    /// As [`begin`](OrderChecker::begin), for group member `member` (any id
    /// that differs per member and per restart of a member): an aggregate
    /// whose attempts move to another member starts a replay.
    pub fn begin_as(self: &Arc<Self>, member: u64, topic: &str, envelope: &Envelope) -> Attempt {
        self.start(member, topic, &envelope.aggregate_id, envelope.event_version);
        Attempt {
            checker: self.clone(),
            key: Some((topic.to_owned(), envelope.aggregate_id.clone())),
            version: envelope.event_version,
        }
    }

    /// Records one attempt that started and succeeded at once (a handler that
    /// cannot fail and does not wait).
    pub fn record(&self, topic: &str, envelope: &Envelope) {
        self.record_as(0, topic, envelope);
    }

    /// As [`record`](OrderChecker::record), for group member `member` (see
    /// [`begin_as`](OrderChecker::begin_as)).
    pub fn record_as(&self, member: u64, topic: &str, envelope: &Envelope) {
        self.start(member, topic, &envelope.aggregate_id, envelope.event_version);
        let mut state = self.state.lock().unwrap();
        state.report.received += 1;
        let seen = state
            .aggregates
            .get_mut(&(topic.to_owned(), envelope.aggregate_id.clone()))
            .expect("just started");
        seen.running -= 1;
        seen.succeeded(envelope.event_version, self.replay_window);
        if envelope.event_version == seen.highest {
            seen.highest_succeeded = true;
        }
    }

    /// Declares that `version` of `aggregate` will never reach a handler
    /// (dead-lettered without an attempt), so later versions are no gap.
    pub fn skipped(&self, topic: &str, aggregate: &str, version: i64) {
        let mut state = self.state.lock().unwrap();
        let seen = state
            .aggregates
            .entry((topic.to_owned(), aggregate.to_owned()))
            .or_default();
        seen.mark(version);
    }

    fn start(&self, member: u64, topic: &str, aggregate: &str, version: i64) {
        let mut state = self.state.lock().unwrap();
        let State { aggregates, report } = &mut *state;
        let seen = aggregates
            .entry((topic.to_owned(), aggregate.to_owned()))
            .or_default();
        report.attempts += 1;
        if seen.running > 0 {
            report.overlaps += 1;
        }
        seen.running += 1;
        let new_run = seen.run_member != member;
        if new_run {
            seen.run_member = member;
            seen.run_highest = 0;
        }
        let run_highest = seen.run_highest;
        seen.run_highest = run_highest.max(version);
        if version < seen.highest {
            // Going back: only a replay by another member's run, in order.
            if version < run_highest || run_highest == seen.highest {
                report.regressions += 1;
            } else if seen.succeeded.contains(&version) {
                report.duplicates += 1;
            } else {
                report.retries += 1;
            }
        } else if version == seen.highest {
            if seen.highest_succeeded {
                report.duplicates += 1;
            } else {
                report.retries += 1;
            }
        } else {
            if version > seen.contiguous + 1 {
                report.gaps += 1;
            }
            seen.highest = version;
            seen.highest_succeeded = false;
        }
        seen.mark(version);
    }

    /// Whether `version` of `aggregate` on `topic` was attempted (or
    /// declared [`skipped`](OrderChecker::skipped)): how a read-back of the
    /// topic tells which stored events never reached a handler.
    pub fn attempted(&self, topic: &str, aggregate: &str, version: i64) -> bool {
        let state = self.state.lock().unwrap();
        state
            .aggregates
            .get(&(topic.to_owned(), aggregate.to_owned()))
            .is_some_and(|seen| version <= seen.contiguous || seen.above.contains(&version))
    }

    /// The counts so far.
    pub fn report(&self) -> OrderReport {
        self.state.lock().unwrap().report
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope;

    fn attempts(c: &Arc<OrderChecker>, versions: &[(i64, bool)]) {
        for &(v, ok) in versions {
            let a = c.begin("t", &envelope("a", v));
            if ok {
                a.succeeded();
            }
        }
    }

    #[test]
    fn a_bounded_checker_forgets_old_successes_but_judges_order_the_same() {
        let c = Arc::new(OrderChecker::with_replay_window(4));
        for v in 1..=1_000 {
            c.record("t", &envelope("a", v));
        }
        let kept = c
            .state
            .lock()
            .unwrap()
            .aggregates
            .values()
            .map(|a| a.succeeded.len())
            .max();
        assert_eq!(kept, Some(5), "versions 996..=1000");
        c.record("t", &envelope("a", 999)); // a regression, as ever
        c.record("t", &envelope("a", 1_002)); // a gap, as ever
        let r = c.report();
        assert_eq!((r.regressions, r.gaps), (1, 1));
    }

    #[test]
    fn an_older_version_after_a_newer_one_is_a_regression_even_when_seen_before() {
        let c = Arc::new(OrderChecker::new());
        // The NATS redelivery pattern of issue 9: 1..8, then 4 again.
        attempts(
            &c,
            &[(1, true), (2, true), (3, true), (4, true), (5, true), (4, true)],
        );
        let r = c.report();
        assert_eq!((r.regressions, r.duplicates, r.gaps), (1, 0, 0), "{r}");
    }

    #[test]
    fn retries_duplicates_and_gaps_are_told_apart() {
        let c = Arc::new(OrderChecker::new());
        attempts(&c, &[(1, false), (1, true), (2, true), (2, true), (4, true)]);
        let r = c.report();
        assert_eq!(
            (r.retries, r.duplicates, r.gaps, r.regressions, r.received),
            (1, 1, 1, 0, 4),
            "{r}"
        );
        c.skipped("t", "b", 1);
        c.record("t", &envelope("b", 2));
        c.record("u", &envelope("a", 1));
        assert_eq!(c.report().gaps, 1, "a declared skip and another topic are no gap");
    }

    #[test]
    fn a_new_member_may_replay_in_order_but_never_go_back_within_its_run() {
        let c = Arc::new(OrderChecker::new());
        for v in 1..=5 {
            c.record_as(1, "t", &envelope("a", v));
        }
        // Member 2 takes over from the committed prefix (3): a replay.
        for v in 3..=6 {
            c.record_as(2, "t", &envelope("a", v));
        }
        let r = c.report();
        assert_eq!((r.regressions, r.duplicates, r.gaps), (0, 3, 0), "{r}");
        c.record_as(2, "t", &envelope("a", 4));
        assert_eq!(c.report().regressions, 1, "back within one run");
    }

    #[test]
    fn overlapping_attempts_of_one_aggregate_are_counted() {
        let c = Arc::new(OrderChecker::new());
        let first = c.begin("t", &envelope("a", 1));
        let other = c.begin("t", &envelope("b", 1));
        let second = c.begin("t", &envelope("a", 1));
        assert_eq!(c.report().overlaps, 1);
        drop((first, other, second));
        c.begin("t", &envelope("a", 2)).succeeded();
        assert_eq!(c.report().overlaps, 1);
        assert!(!c.report().is_strictly_ordered());
    }
}
