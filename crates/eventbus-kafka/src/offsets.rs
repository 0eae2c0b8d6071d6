//! Contiguous-prefix offset tracking, as Confluent's Parallel Consumer does:
//! a partition's committable offset is the lowest offset still in flight, or
//! one past the highest fetched when none is. A crash therefore never skips
//! an unfinished message; finished ones above a gap are consumed again.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eventbus_core::Ownership;

/// (topic, partition). The topic is shared: a key is made per fetched
/// message, and cloning it must not copy the name.
pub(crate) type PartitionKey = (Arc<str>, i32);

#[derive(Debug, Default)]
struct Partition {
    in_flight: BTreeSet<i64>,
    next_after_fetched: i64,
    /// Revoked in a rebalance: its offsets are no longer ours to commit.
    revoked: bool,
    /// Bumped on each revoke, so a late finish of an earlier assignment's
    /// message cannot touch offsets fetched again after a re-assignment.
    generation: u64,
    /// This assignment's hold on its deliveries: revoked on revoke, so the
    /// bus starts no attempt of them afterwards (fencing by generation).
    ownership: Ownership,
}

impl Partition {
    fn committable(&self) -> i64 {
        self.in_flight.first().copied().unwrap_or(self.next_after_fetched)
    }
}

/// The in-flight offsets of one consumer's partitions.
#[derive(Debug, Default)]
pub(crate) struct OffsetTracker {
    partitions: Mutex<HashMap<PartitionKey, Partition, foldhash::fast::RandomState>>,
    /// Notified on every finish: a poll task waiting to resume a partition
    /// paused at its in-flight bound re-checks at once, not at its next tick.
    pub(crate) finishes: tokio::sync::Notify,
}

/// Longest wait, after a revoke cancelled running handlers, for them to stop.
const ABORT_WAIT: Duration = Duration::from_secs(2);

impl OffsetTracker {
    /// A message was fetched; returns the assignment generation to finish it
    /// with, and the assignment's ownership.
    pub(crate) fn fetched(&self, key: &PartitionKey, offset: i64) -> (u64, Ownership) {
        let mut parts = self.partitions.lock().unwrap();
        let p = match parts.get_mut(key) {
            Some(p) => p,
            None => parts.entry(key.clone()).or_default(),
        };
        if p.revoked {
            p.revoked = false;
            p.next_after_fetched = 0;
            p.ownership = Ownership::new();
        }
        p.in_flight.insert(offset);
        p.next_after_fetched = p.next_after_fetched.max(offset + 1);
        (p.generation, p.ownership.clone())
    }

    /// Messages of `key` fetched and not finished (count).
    pub(crate) fn in_flight(&self, key: &PartitionKey) -> usize {
        self.partitions
            .lock()
            .unwrap()
            .get(key)
            .map_or(0, |p| p.in_flight.len())
    }

    /// A message finished; returns the new committable offset when the
    /// contiguous prefix advanced and the partition is still ours.
    pub(crate) fn finished(&self, key: &PartitionKey, offset: i64, generation: u64) -> Option<i64> {
        let mut parts = self.partitions.lock().unwrap();
        let p = parts.get_mut(key).filter(|p| p.generation == generation)?;
        let before = p.committable();
        p.in_flight.remove(&offset);
        self.finishes.notify_one();
        let after = p.committable();
        (after != before && !p.revoked).then_some(after)
    }

    /// Fences revoked partitions: their ownership is revoked (no attempt of
    /// a queued or retrying message starts any more, backoffs end), running
    /// attempts get until `timeout` to finish and are then cancelled. Then
    /// returns the committable offsets (the finished contiguous prefix; the
    /// unfinished rest goes to the next owner) of the partitions fetched
    /// since their last revoke, and forgets the partitions' in-flight
    /// offsets.
    pub(crate) fn revoke(&self, keys: &[PartitionKey], timeout: Duration) -> Vec<(PartitionKey, i64)> {
        let deadline = Instant::now() + timeout;
        let owned: Vec<Ownership> = {
            let parts = self.partitions.lock().unwrap();
            keys.iter()
                .filter_map(|k| parts.get(k).map(|p| p.ownership.clone()))
                .collect()
        };
        for o in &owned {
            o.revoke();
        }
        for o in &owned {
            if !o.stop_running(deadline, ABORT_WAIT) {
                tracing::warn!("a revoked partition's handler did not stop; set consumer.handler_timeout_ms");
            }
        }
        let mut parts = self.partitions.lock().unwrap();
        keys.iter()
            .filter_map(|k| {
                // Revoked before and nothing fetched since (fetching makes it
                // ours again): its offset is the earlier assignment's, which
                // another owner may have moved past. Nothing to commit.
                let p = parts.get_mut(k).filter(|p| !p.revoked)?;
                let committable = p.committable();
                p.revoked = true;
                p.generation += 1;
                p.in_flight.clear();
                (committable > 0).then(|| (k.clone(), committable))
            })
            .collect()
    }

    /// Committable offsets of every partition still ours.
    pub(crate) fn committable(&self) -> Vec<(PartitionKey, i64)> {
        let parts = self.partitions.lock().unwrap();
        parts
            .iter()
            .filter(|(_, p)| !p.revoked && p.next_after_fetched > 0)
            .map(|(k, p)| (k.clone(), p.committable()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> PartitionKey {
        ("t".into(), 0)
    }

    #[test]
    fn only_the_contiguous_finished_prefix_is_committable() {
        let t = OffsetTracker::default();
        for o in 10..15 {
            t.fetched(&key(), o);
        }
        assert_eq!(t.finished(&key(), 12, 0), None, "a gap below 12 stays");
        assert_eq!(t.finished(&key(), 11, 0), None);
        assert_eq!(t.finished(&key(), 10, 0), Some(13));
        assert_eq!(t.finished(&key(), 14, 0), None);
        assert_eq!(t.finished(&key(), 13, 0), Some(15));
        assert_eq!(t.committable(), vec![(key(), 15)]);
    }

    #[test]
    fn revoke_fences_the_assignment_and_commits_the_finished_prefix() {
        let t = OffsetTracker::default();
        let (generation, ownership) = t.fetched(&key(), 0);
        t.fetched(&key(), 1);
        t.fetched(&key(), 2);
        assert_eq!(t.finished(&key(), 0, generation), Some(1));
        let got = t.revoke(&[key()], Duration::from_secs(5));
        assert!(ownership.is_revoked(), "queued offsets 1 and 2 must not start");
        assert_eq!(got, vec![(key(), 1)], "1 and 2 go to the next owner");
        assert!(t.committable().is_empty());
        assert_eq!(t.finished(&key(), 1, generation), None, "stale generation");
        let (next, fresh) = t.fetched(&key(), 1);
        assert_eq!(next, generation + 1);
        assert!(!fresh.is_revoked(), "a re-assignment is owned anew");
    }

    /// A partition assigned back after a revoke and revoked again before
    /// anything was fetched from it has nothing of its own to commit: the
    /// offset left from the earlier assignment may be behind what another
    /// owner committed meanwhile, and committing it would move the group
    /// back.
    #[test]
    fn a_partition_revoked_again_before_any_fetch_commits_nothing() {
        let t = OffsetTracker::default();
        let (generation, _) = t.fetched(&key(), 99);
        t.finished(&key(), 99, generation);
        assert_eq!(t.revoke(&[key()], Duration::from_secs(1)), vec![(key(), 100)]);
        assert_eq!(
            t.revoke(&[key()], Duration::from_secs(1)),
            vec![],
            "nothing fetched since the last revoke"
        );
        let (generation, _) = t.fetched(&key(), 250);
        t.finished(&key(), 250, generation);
        assert_eq!(
            t.revoke(&[key()], Duration::from_secs(1)),
            vec![(key(), 251)],
            "fetched again: its own prefix"
        );
    }

    #[test]
    fn revoke_gives_up_at_its_deadline_and_keeps_the_gap() {
        let t = OffsetTracker::default();
        t.fetched(&key(), 5);
        t.fetched(&key(), 6);
        t.finished(&key(), 6, 0);
        assert_eq!(t.revoke(&[key()], Duration::from_millis(20)), vec![(key(), 5)]);
    }
}
