//! The figures of one level, and the table printed at the end.

use std::time::Duration;

use eventbus::testing::OrderReport;
use hdrhistogram::Histogram;

/// What one level measured.
#[derive(Debug, Clone)]
pub(crate) struct LevelReport {
    pub(crate) backend: &'static str,
    /// Envelopes published.
    pub(crate) events: usize,
    pub(crate) aggregates: usize,
    /// Publishes the broker confirmed.
    pub(crate) acked: usize,
    pub(crate) order: OrderReport,
    /// Publish-call latency (stage one), µs.
    pub(crate) publish_us: Histogram<u64>,
    /// Receive time minus envelope timestamp, µs.
    pub(crate) end_to_end_us: Histogram<u64>,
    /// First send to last receive.
    pub(crate) elapsed: Duration,
}

impl LevelReport {
    /// Distinct events received, as a percentage of those sent.
    pub(crate) fn success_pct(&self) -> f64 {
        let distinct = self.order.received - self.order.duplicates;
        100.0 * distinct as f64 / self.events.max(1) as f64
    }

    /// Events received per second, first send to last receive.
    pub(crate) fn throughput(&self) -> f64 {
        self.order.received as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// A progress line for stderr.
    pub(crate) fn one_line(&self) -> String {
        format!(
            "{} level {}: received {}/{} in {:.3}s, {} order violations",
            self.backend,
            self.events,
            self.order.received,
            self.events,
            self.elapsed.as_secs_f64(),
            self.order.violations
        )
    }
}

fn ms(h: &Histogram<u64>, q: f64) -> String {
    format!("{:.3}", h.value_at_quantile(q) as f64 / 1000.0)
}

/// A fixed-width table of every level.
pub(crate) fn table(reports: &[LevelReport]) -> String {
    let mut out = format!(
        "{:<8} {:>7} {:>6} {:>7} {:>8} {:>8} {:>10} {:>10} {:>10} {:>10} {:>12} {:>10} {:>6}\n",
        "backend",
        "events",
        "aggs",
        "sent",
        "received",
        "success%",
        "pub p50ms",
        "pub p99ms",
        "e2e p50ms",
        "e2e p99ms",
        "events/s",
        "violations",
        "dups"
    );
    for r in reports {
        out.push_str(&format!(
            "{:<8} {:>7} {:>6} {:>7} {:>8} {:>8.2} {:>10} {:>10} {:>10} {:>10} {:>12.0} {:>10} {:>6}\n",
            r.backend,
            r.events,
            r.aggregates,
            r.acked,
            r.order.received,
            r.success_pct(),
            ms(&r.publish_us, 0.5),
            ms(&r.publish_us, 0.99),
            ms(&r.end_to_end_us, 0.5),
            ms(&r.end_to_end_us, 0.99),
            r.throughput(),
            r.order.violations,
            r.order.duplicates
        ));
    }
    out
}
