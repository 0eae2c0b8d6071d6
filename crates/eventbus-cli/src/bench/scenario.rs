//! The scenario of the original performance test (ORIGIN.md).

use std::time::Duration;

/// What one bench run does at each level.
#[derive(Debug, Clone)]
pub(crate) struct Scenario {
    /// Topics; aggregate `i` publishes to topic `i mod topics`.
    pub(crate) topics: usize,
    /// Aggregates per level; `None` for the original's n/10 clamped to 50..=1000.
    pub(crate) aggregates: Option<usize>,
    /// Payload size in bytes.
    pub(crate) payload_bytes: usize,
    /// Longest wait for a level's deliveries.
    pub(crate) timeout: Duration,
    /// `consumer.concurrency` of our bus; `None`: its default.
    pub(crate) concurrency: Option<usize>,
    /// Our bus's settings: defaults, `[bus]` of `--config`, `EVENTBUS_*`
    /// variables (`--concurrency` overrides `consumer.concurrency`).
    pub(crate) bus: eventbus::BusConfig,
}

impl Scenario {
    /// Aggregates used for a level of `events`.
    pub(crate) fn aggregates_for(&self, events: usize) -> usize {
        self.aggregates
            .unwrap_or((events / 10).clamp(50, 1_000))
            .clamp(1, events.max(1))
    }

    /// Publish order: round-robin over aggregates, each publishing versions
    /// 1, 2, ... in order; yields (aggregate index, version). Exactly `events` items.
    pub(crate) fn plan(&self, events: usize) -> Vec<(usize, i64)> {
        let aggregates = self.aggregates_for(events);
        (0..events)
            .map(|i| (i % aggregates, (i / aggregates) as i64 + 1))
            .collect()
    }

    /// Topic names of one run: `<run>-0`, `<run>-1`, ...
    pub(crate) fn topic_names(&self, run: &str) -> Vec<String> {
        (0..self.topics).map(|t| format!("{run}-{t}")).collect()
    }

    /// The envelopes of a level in publish order, built lazily so each
    /// timestamp is taken just before its publish: (topic index, envelope).
    pub(crate) fn envelopes(
        &self,
        events: usize,
    ) -> eventbus::Result<impl Iterator<Item = (usize, eventbus::Envelope)>> {
        let payload = eventbus::Payload::from_raw(self.payload())?;
        let aggregates: Vec<String> = (0..self.aggregates_for(events))
            .map(|a| format!("agg-{a}"))
            .collect();
        let topics = self.topics;
        Ok(self.plan(events).into_iter().map(move |(a, version)| {
            let e = eventbus::Envelope::builder(&aggregates[a], "BenchEvent", version)
                .payload(payload.clone())
                .build()
                .expect("bench envelopes are valid");
            (a % topics, e)
        }))
    }

    /// A JSON payload of about `payload_bytes` bytes.
    pub(crate) fn payload(&self) -> String {
        let pad = self.payload_bytes.saturating_sub(10);
        format!("{{\"pad\":\"{}\"}}", "x".repeat(pad))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenario() -> Scenario {
        Scenario {
            topics: 5,
            aggregates: None,
            payload_bytes: 256,
            timeout: Duration::from_secs(1),
            concurrency: None,
            bus: eventbus::BusConfig::default(),
        }
    }

    #[test]
    fn aggregates_follow_the_original_rule() {
        let s = scenario();
        assert_eq!(s.aggregates_for(500), 50);
        assert_eq!(s.aggregates_for(2_000), 200);
        assert_eq!(s.aggregates_for(10_000), 1_000);
        assert_eq!(s.aggregates_for(100_000), 1_000);
    }

    #[test]
    fn plan_publishes_each_aggregates_versions_in_order() {
        let plan = scenario().plan(2_000);
        assert_eq!(plan.len(), 2_000);
        let mut last = vec![0; 200];
        for (a, v) in plan {
            assert_eq!(v, last[a] + 1);
            last[a] = v;
        }
        assert_eq!(scenario().payload().len(), 256);
    }
}
