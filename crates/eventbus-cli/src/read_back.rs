//! Reading a topic's stored log back, without a consumer group: how the
//! fault harness and the outbox bench tell a write the broker dropped from
//! one the consumers skipped.

use std::time::{Duration, Instant};

use eventbus::{Envelope, EventBus, Position, Result};
use futures::StreamExt;

/// How long the log may stay silent before the read counts as complete.
const IDLE: Duration = Duration::from_secs(10);
/// The bound on one read.
const MAX: Duration = Duration::from_secs(120);

/// What one read of a topic's log saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ReadBack {
    /// Messages read (envelopes or not).
    pub(crate) messages: usize,
    /// Messages that did not decode as envelopes.
    pub(crate) undecodable: usize,
    /// Errors the log's stream returned (the read went on past each).
    pub(crate) errors: usize,
    /// Messages read at a position an earlier message of the read already
    /// had (a Kafka partition and offset given twice): a broker that stores
    /// two writes at one offset, whose second a group consumer fetching
    /// past that offset never gets.
    pub(crate) repeated_positions: usize,
    /// Whether the read ended on 10 s of silence (the log read to its end,
    /// as far as a reader can tell) rather than at its 120 s bound.
    pub(crate) complete: bool,
}

impl ReadBack {
    /// Whether the read can be trusted to have seen the whole log: it ended
    /// on silence, and no message was lost to an error or a decode failure.
    pub(crate) fn is_whole(&self) -> bool {
        self.complete && self.errors == 0 && self.undecodable == 0
    }
}

impl std::fmt::Display for ReadBack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} messages read, {} undecodable, {} stream errors, {} at a position read before, {}",
            self.messages,
            self.undecodable,
            self.errors,
            self.repeated_positions,
            if self.complete {
                "ended after 10 s without a message"
            } else {
                "cut off at 120 s"
            }
        )
    }
}

/// Reads `topic` through `bus` from its oldest stored message (the
/// backend's `browse`: no consumer group), handing each envelope and its
/// position to `each`, until 10 s pass without a message or 120 s in all.
///
/// # Errors
/// What the backend's `browse` returns when the read cannot start.
pub(crate) async fn read_back(
    bus: &EventBus,
    topic: &str,
    mut each: impl FnMut(Envelope, Position),
) -> Result<ReadBack> {
    let mut log = bus.browse(topic).await?;
    let mut read = ReadBack::default();
    let mut positions = std::collections::HashSet::new();
    let deadline = Instant::now() + MAX;
    while Instant::now() < deadline {
        let next = match tokio::time::timeout(IDLE, log.next()).await {
            Ok(Some(next)) => next,
            Ok(None) | Err(_) => {
                read.complete = true;
                break;
            }
        };
        match next {
            Ok(m) => {
                read.messages += 1;
                if !positions.insert(m.position) {
                    read.repeated_positions += 1;
                }
                match Envelope::decode(&m.message.payload) {
                    Ok(e) => each(e, m.position),
                    Err(_) => read.undecodable += 1,
                }
            }
            Err(_) => {
                read.errors += 1;
                // An error stream must not spin the read.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    Ok(read)
}

/// `positions` as at most `limit` ranges, in order: `partition 3: 120-179`
/// for Kafka offsets, `seq 40-52` for stream sequences, joined by `, `,
/// with a count of the ranges left out.
pub(crate) fn position_ranges(positions: &[Position], limit: usize) -> String {
    let mut keyed: Vec<(i64, i64)> = positions
        .iter()
        .map(|p| match p {
            Position::Offset { partition, offset } => (i64::from(*partition), *offset),
            Position::Sequence(s) => (-1, *s as i64),
        })
        .collect();
    keyed.sort_unstable();
    let mut ranges: Vec<(i64, i64, i64)> = Vec::new();
    for (part, at) in keyed {
        match ranges.last_mut() {
            Some((p, _, end)) if *p == part && *end + 1 == at => *end = at,
            _ => ranges.push((part, at, at)),
        }
    }
    let shown: Vec<String> = ranges
        .iter()
        .take(limit)
        .map(|(p, from, to)| {
            let place = if *p < 0 {
                "seq".to_owned()
            } else {
                format!("partition {p}:")
            };
            if from == to {
                format!("{place} {from}")
            } else {
                format!("{place} {from}-{to}")
            }
        })
        .collect();
    let left = ranges.len().saturating_sub(limit);
    if left > 0 {
        format!("{} (and {left} more ranges)", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_read_as_ranges_per_partition() {
        let at = |partition, offset| Position::Offset { partition, offset };
        let positions = [
            at(2, 11),
            at(2, 10),
            at(0, 5),
            at(2, 12),
            at(2, 20),
            Position::Sequence(7),
        ];
        assert_eq!(
            position_ranges(&positions, 10),
            "seq 7, partition 0: 5, partition 2: 10-12, partition 2: 20"
        );
        assert_eq!(
            position_ranges(&positions, 2),
            "seq 7, partition 0: 5 (and 2 more ranges)"
        );
    }
}
