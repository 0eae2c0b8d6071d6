//! Partitioned consumer groups: which partition an aggregate's events go
//! to, and how many partitions each member of a group should own. Used by
//! the NATS backend's partitioned topics and by the memory backend, so
//! that a group shares work the same way on both.

/// The partition of `key` among `partitions`: sarama's hash partitioner
/// (the Go SDK's Kafka producer), so other languages can reproduce it:
/// the 32-bit FNV-1a hash of the key's bytes (offset basis 2166136261,
/// prime 16777619), read as a signed 32-bit integer, remainder by
/// `partitions`, absolute value. `partitions` 0 is treated as 1.
///
/// ```
/// assert_eq!(eventbus_core::partition_for(b"order-1", 1), 0);
/// assert!(eventbus_core::partition_for(b"order-1", 8) < 8);
/// ```
pub fn partition_for(key: &[u8], partitions: u32) -> u32 {
    let hash = key.iter().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    });
    let n = i64::from(partitions.max(1));
    (i64::from(hash as i32) % n).unsigned_abs() as u32
}

/// How many of `partitions` the member at `index` in the sorted list of
/// `members` live members should own: an even split, the first
/// `partitions % members` members taking one more. Every member computes
/// the same targets from the same member list, and they sum to `partitions`.
pub fn fair_share(partitions: u32, members: usize, index: usize) -> u32 {
    let members = members.max(1) as u32;
    let index = index as u32;
    partitions / members + u32::from(index < partitions % members)
}

/// A member's share of its consumer group, as shown in
/// [`SubscriptionHealth::assignment`](crate::SubscriptionHealth::assignment).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupAssignment {
    /// Partitions of the topic (count); 1 for an unpartitioned NATS topic,
    /// whose one durable consumer has one active member at a time.
    pub partition_count: u32,
    /// The partitions this member owns now, ascending.
    pub owned: Vec<u32>,
    /// Live members of the group, as this member last saw them (count).
    pub members: usize,
    /// Times this member's set of owned partitions changed (count).
    pub rebalances: u64,
    /// Times the broker served this member a record past the offset it
    /// expected next in a partition (count; Kafka only, 0 elsewhere). A
    /// Kafka log leaves such gaps legitimately at transaction markers,
    /// aborted transactions (read committed) and compacted records; on a
    /// topic with none of those, each gap is records this group will never
    /// see (tansu 0.6 serves a later batch before an earlier one is
    /// stored: README, Known broker limits). Counted as
    /// `eventbus_consumer_offset_gaps_total` too.
    pub offset_gaps: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_match_sarama_fnv1a() {
        // FNV-1a 32 of "" is 0x811c9dc5 (negative as i32): |-2128831035 % 7| = 3.
        assert_eq!(partition_for(b"", 7), (2_128_831_035_u32 % 7));
        // "a": 0xe40c292c, negative as i32 = -468,965,076 (Go: -6, then 6).
        assert_eq!(partition_for(b"a", 10), 6);
        assert_eq!(partition_for(b"anything", 0), 0);
    }

    #[test]
    fn fair_shares_sum_to_the_partitions() {
        for partitions in [1, 2, 7, 16] {
            for members in 1..6 {
                let sum: u32 = (0..members).map(|i| fair_share(partitions, members, i)).sum();
                assert_eq!(sum, partitions);
            }
        }
        assert_eq!(fair_share(1, 2, 1), 0, "a standby owns nothing");
    }
}
