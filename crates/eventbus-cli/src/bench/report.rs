//! The figures of one level, and the table, markdown and JSON outputs.

use std::time::Duration;

use eventbus_testkit::OrderReport;
use hdrhistogram::Histogram;
use serde::Serialize;

use super::measure::Resources;

/// What one level measured, for our bus or a raw client.
#[derive(Debug, Clone)]
pub(crate) struct LevelReport {
    /// `memory`, `nats`, `kafka`; raw baselines add `-raw`.
    pub(crate) label: String,
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
    pub(crate) resources: Resources,
}

/// Latency percentiles in ms.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Percentiles {
    p50: f64,
    p90: f64,
    p95: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Self {
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        Self {
            p50: ms(0.5),
            p90: ms(0.9),
            p95: ms(0.95),
            p99: ms(0.99),
            p999: ms(0.999),
            max: h.max() as f64 / 1000.0,
        }
    }
}

/// One row of the JSON output.
#[derive(Debug, Serialize)]
pub(crate) struct Row {
    label: String,
    events: usize,
    aggregates: usize,
    sent_acked: usize,
    received: u64,
    success_pct: f64,
    throughput_per_s: f64,
    /// Our throughput over the raw client's at this level, when both ran.
    ratio_to_raw: Option<f64>,
    publish_ms: Percentiles,
    end_to_end_ms: Percentiles,
    order_violations: u64,
    overlaps: u64,
    duplicates: u64,
    resources: Resources,
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
            "{} level {}: received {}/{} in {:.3}s ({:.0}/s), {} order violations, {} overlaps, {} duplicates",
            self.label,
            self.events,
            self.order.received,
            self.events,
            self.elapsed.as_secs_f64(),
            self.throughput(),
            self.order.violations(),
            self.order.overlaps,
            self.order.duplicates
        )
    }

    fn row(&self, all: &[LevelReport]) -> Row {
        Row {
            label: self.label.clone(),
            events: self.events,
            aggregates: self.aggregates,
            sent_acked: self.acked,
            received: self.order.received,
            success_pct: self.success_pct(),
            throughput_per_s: self.throughput(),
            ratio_to_raw: ratio_to_raw(self, all),
            publish_ms: Percentiles::of(&self.publish_us),
            end_to_end_ms: Percentiles::of(&self.end_to_end_us),
            order_violations: self.order.violations(),
            overlaps: self.order.overlaps,
            duplicates: self.order.duplicates,
            resources: self.resources,
        }
    }
}

/// Our throughput over the raw client's at the same level.
fn ratio_to_raw(ours: &LevelReport, all: &[LevelReport]) -> Option<f64> {
    if ours.label.ends_with("-raw") {
        return None;
    }
    // Every member count compares with the one raw consumer ("nats ×3" with "nats-raw").
    let backend = ours.label.split(' ').next().unwrap_or(&ours.label);
    let raw_label = format!("{backend}-raw");
    let raw = all
        .iter()
        .find(|r| r.label == raw_label && r.events == ours.events)?;
    Some(ours.throughput() / raw.throughput().max(1e-9))
}

/// Every row, for `--json`.
pub(crate) fn rows(reports: &[LevelReport]) -> Vec<Row> {
    reports.iter().map(|r| r.row(reports)).collect()
}

const HEADERS: [&str; 17] = [
    "backend",
    "events",
    "aggs",
    "acked",
    "received",
    "success%",
    "events/s",
    "vs raw",
    "pub p50",
    "pub p99",
    "pub max",
    "e2e p50",
    "e2e p99",
    "e2e max",
    "order viol.",
    "overlaps",
    "dups",
];

fn cells(r: &Row) -> Vec<String> {
    vec![
        r.label.clone(),
        r.events.to_string(),
        r.aggregates.to_string(),
        r.sent_acked.to_string(),
        r.received.to_string(),
        format!("{:.2}", r.success_pct),
        format!("{:.0}", r.throughput_per_s),
        r.ratio_to_raw
            .map_or("-".into(), |x| format!("{:.0}%", x * 100.0)),
        format!("{:.3}", r.publish_ms.p50),
        format!("{:.3}", r.publish_ms.p99),
        format!("{:.3}", r.publish_ms.max),
        format!("{:.2}", r.end_to_end_ms.p50),
        format!("{:.2}", r.end_to_end_ms.p99),
        format!("{:.2}", r.end_to_end_ms.max),
        r.order_violations.to_string(),
        r.overlaps.to_string(),
        r.duplicates.to_string(),
    ]
}

/// A fixed-width table (latencies in ms).
pub(crate) fn table(reports: &[LevelReport]) -> String {
    let rows: Vec<Vec<String>> = rows(reports).iter().map(cells).collect();
    let widths: Vec<usize> = (0..HEADERS.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([HEADERS[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[String]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:>w$}"))
            .collect();
        padded.join("  ") + "\n"
    };
    let mut out = line(&HEADERS.map(String::from));
    for r in &rows {
        out.push_str(&line(r));
    }
    out.push_str(&resources_table(reports));
    out
}

fn resources_table(reports: &[LevelReport]) -> String {
    let mut out = String::from("\nbackend  events  rss before/peak/after MiB  tasks before/peak/after\n");
    for r in reports {
        let x = &r.resources;
        out.push_str(&format!(
            "{:<10} {:>7}  {:>6.1} / {:>6.1} / {:>6.1}  {:>6} / {:>6} / {:>6}\n",
            r.label,
            r.events,
            x.rss_before_mb,
            x.rss_peak_mb,
            x.rss_after_mb,
            x.tasks_before,
            x.tasks_peak,
            x.tasks_after
        ));
    }
    out
}

/// A GitHub markdown table (latencies in ms).
pub(crate) fn markdown(reports: &[LevelReport]) -> String {
    let mut out = format!("| {} | peak RSS MiB | tasks after |\n", HEADERS.join(" | "));
    out.push_str(&format!("|{}\n", "---|".repeat(HEADERS.len() + 2)));
    for (row, r) in rows(reports).iter().zip(reports) {
        out.push_str(&format!(
            "| {} | {:.1} | {} |\n",
            cells(row).join(" | "),
            r.resources.rss_peak_mb,
            r.resources.tasks_after
        ));
    }
    out
}
