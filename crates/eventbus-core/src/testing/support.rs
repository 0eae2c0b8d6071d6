//! Helpers of the conformance suite, public for backends' own tests and the bench.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use crate::Envelope;

/// Counts order violations and duplicates per (topic, aggregate id).
///
/// A duplicate is a version already seen for that key. A violation is a
/// new version other than the last one plus 1 (a reorder or a gap), given
/// that every aggregate publishes versions 1, 2, 3, ... in order.
#[derive(Debug, Default)]
pub struct OrderChecker {
    /// Per (topic, aggregate id): the highest version and every version seen.
    state: Mutex<HashMap<(String, String), VersionsSeen>>,
    report: Mutex<OrderReport>,
}

type VersionsSeen = (i64, HashSet<i64>);

/// What an [`OrderChecker`] saw.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OrderReport {
    /// Events recorded (count).
    pub received: u64,
    /// Versions seen before (count).
    pub duplicates: u64,
    /// New versions out of sequence (count).
    pub violations: u64,
}

impl OrderChecker {
    /// An empty checker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records one handled envelope of `topic`.
    pub fn record(&self, topic: &str, envelope: &Envelope) {
        let mut state = self.state.lock().unwrap();
        let (last, seen) = state
            .entry((topic.to_owned(), envelope.aggregate_id.clone()))
            .or_insert_with(|| (0, HashSet::new()));
        let mut report = self.report.lock().unwrap();
        report.received += 1;
        if !seen.insert(envelope.event_version) {
            report.duplicates += 1;
            return;
        }
        if envelope.event_version != *last + 1 {
            report.violations += 1;
        }
        *last = (*last).max(envelope.event_version);
    }

    /// The counts so far.
    pub fn report(&self) -> OrderReport {
        *self.report.lock().unwrap()
    }
}

/// Polls `done` every 5 ms until it holds or `timeout` passes; returns whether it held.
pub async fn eventually(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    done()
}

/// A topic or group name unique to one run of one case.
pub(crate) fn unique(prefix: &str) -> String {
    let id = uuid::Uuid::now_v7().simple().to_string();
    format!("{prefix}-{}", &id[id.len() - 12..])
}

/// A valid envelope of `aggregate` at `version` with a small JSON payload.
pub fn envelope(aggregate: &str, version: i64) -> Envelope {
    Envelope::builder(aggregate, "TestEvent", version)
        .json_payload(&serde_json::json!({ "aggregate": aggregate, "version": version }))
        .and_then(|b| b.build())
        .expect("valid test envelope")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checker_separates_duplicates_from_violations() {
        let c = OrderChecker::new();
        for v in [1, 2, 2, 4, 3] {
            c.record("t", &envelope("a", v));
        }
        c.record("u", &envelope("a", 1));
        assert_eq!(
            c.report(),
            OrderReport {
                received: 6,
                duplicates: 1,
                violations: 2
            }
        );
    }
}
