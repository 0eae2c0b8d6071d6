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
    /// The sustained level's run number (1, 2, ...); 0 for a short level.
    pub(crate) run: usize,
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
    /// The sustained level's run number; 0 for a short level.
    run: usize,
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
            run: self.run,
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
        .find(|r| r.label == raw_label && r.events == ours.events && r.run == ours.run)?;
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
        match r.run {
            0 => r.label.clone(),
            n => format!("{} #{n}", r.label),
        },
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
    let sustained = summaries(reports);
    if !sustained.is_empty() {
        out.push_str("\nsustained level: median [min–max] over the runs\n");
        out.push_str(&summary_markdown(&sustained));
    }
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
    let sustained = summaries(reports);
    let mut out = String::new();
    if !sustained.is_empty() {
        out.push_str(&summary_markdown(&sustained));
        out.push('\n');
    }
    out += &format!("| {} | peak RSS MiB | tasks after |\n", HEADERS.join(" | "));
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

/// Median and range of one figure over a sustained level's runs.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Spread {
    pub(crate) median: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
}

impl Spread {
    fn of(mut values: Vec<f64>) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        let n = values.len();
        let median = match n % 2 {
            1 => values[n / 2],
            _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
        };
        Some(Self {
            median,
            min: values[0],
            max: values[n - 1],
        })
    }

    fn show(&self, scale: f64, digits: usize) -> String {
        format!(
            "{:.digits$} [{:.digits$}–{:.digits$}]",
            self.median * scale,
            self.min * scale,
            self.max * scale
        )
    }
}

/// One backend's sustained level over its runs, ours beside the raw client's.
#[derive(Debug, Serialize)]
pub(crate) struct Summary {
    label: String,
    events: usize,
    runs: usize,
    /// Events/s.
    throughput: Spread,
    raw_throughput: Option<Spread>,
    /// Ours over the raw client's, per run (the runs alternate).
    ratio_to_raw: Option<Spread>,
    /// End-to-end p99, ms.
    end_to_end_p99_ms: Spread,
    raw_end_to_end_p99_ms: Option<Spread>,
    /// Publish-call p99 (stage one), µs.
    publish_p99_us: Spread,
    /// This process's CPU per event (publish and consume, the client
    /// library's threads included), µs.
    cpu_us_per_event: Spread,
    raw_cpu_us_per_event: Option<Spread>,
    /// The machine's cores busy while running, percent of all cores.
    machine_busy_pct: Spread,
    raw_machine_busy_pct: Option<Spread>,
    /// The share of the cores' time the host took for other guests while
    /// running (steal), percent.
    machine_steal_pct: Spread,
    raw_machine_steal_pct: Option<Spread>,
    order_violations: u64,
    overlaps: u64,
    duplicates: u64,
    /// Peak RSS of each run, MiB, in run order (a fresh bus each run).
    rss_peak_mb: Vec<f64>,
    /// Largest peak RSS of a later run over the first run's, percent.
    rss_growth_pct: f64,
}

/// The sustained level's summaries, one per label of ours (not `-raw`).
pub(crate) fn summaries(reports: &[LevelReport]) -> Vec<Summary> {
    let mut labels: Vec<&str> = Vec::new();
    for r in reports.iter().filter(|r| r.run > 0 && !r.label.ends_with("-raw")) {
        if !labels.contains(&r.label.as_str()) {
            labels.push(&r.label);
        }
    }
    labels
        .into_iter()
        .filter_map(|label| {
            let ours: Vec<&LevelReport> = reports.iter().filter(|r| r.run > 0 && r.label == label).collect();
            let backend = label.split(' ').next().unwrap_or(label);
            let raw_label = format!("{backend}-raw");
            let raw: Vec<&LevelReport> = reports
                .iter()
                .filter(|r| r.run > 0 && r.label == raw_label)
                .collect();
            let p99 = |r: &&LevelReport| r.end_to_end_us.value_at_quantile(0.99) as f64 / 1000.0;
            let cpu = |r: &&LevelReport| 1000.0 * r.resources.cpu_ms / r.events.max(1) as f64;
            let busy = |r: &&LevelReport| r.resources.machine_busy_pct;
            let steal = |r: &&LevelReport| r.resources.machine_steal_pct;
            let rss: Vec<f64> = ours.iter().map(|r| r.resources.rss_peak_mb).collect();
            let first = rss.first().copied().unwrap_or(0.0).max(1e-9);
            let later = rss.iter().skip(1).copied().fold(first, f64::max);
            Some(Summary {
                label: label.to_owned(),
                events: ours.first()?.events,
                runs: ours.len(),
                throughput: Spread::of(ours.iter().map(|r| r.throughput()).collect())?,
                raw_throughput: Spread::of(raw.iter().map(|r| r.throughput()).collect()),
                ratio_to_raw: Spread::of(ours.iter().filter_map(|r| ratio_to_raw(r, reports)).collect()),
                end_to_end_p99_ms: Spread::of(ours.iter().map(p99).collect())?,
                raw_end_to_end_p99_ms: Spread::of(raw.iter().map(p99).collect()),
                publish_p99_us: Spread::of(
                    ours.iter()
                        .map(|r| r.publish_us.value_at_quantile(0.99) as f64)
                        .collect(),
                )?,
                cpu_us_per_event: Spread::of(ours.iter().map(cpu).collect())?,
                raw_cpu_us_per_event: Spread::of(raw.iter().map(cpu).collect()),
                machine_busy_pct: Spread::of(ours.iter().map(busy).collect())?,
                raw_machine_busy_pct: Spread::of(raw.iter().map(busy).collect()),
                machine_steal_pct: Spread::of(ours.iter().map(steal).collect())?,
                raw_machine_steal_pct: Spread::of(raw.iter().map(steal).collect()),
                order_violations: ours.iter().map(|r| r.order.violations()).sum(),
                overlaps: ours.iter().map(|r| r.order.overlaps).sum(),
                duplicates: ours.iter().map(|r| r.order.duplicates).sum(),
                rss_growth_pct: 100.0 * (later - first) / first,
                rss_peak_mb: rss,
            })
        })
        .collect()
}

/// The sustained summaries as a GitHub markdown table.
pub(crate) fn summary_markdown(summaries: &[Summary]) -> String {
    let mut out = String::from(
        "| backend | events | runs | events/s | raw events/s | vs raw | e2e p99 ms | raw e2e p99 ms | pub p99 µs | CPU µs/event | raw CPU µs/event | cores busy % | raw cores busy % | host steal % (medians), ours / raw | viol. / overlaps / dups | peak RSS MiB per run |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let or_dash =
        |s: Option<Spread>, scale: f64, digits: usize| s.map_or("-".into(), |s| s.show(scale, digits));
    for s in summaries {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} / {} | {} / {} / {} | {} |\n",
            s.label,
            s.events,
            s.runs,
            s.throughput.show(1.0, 0),
            or_dash(s.raw_throughput, 1.0, 0),
            s.ratio_to_raw.map_or("-".into(), |r| format!(
                "{:.0} % [{:.0}–{:.0}]",
                r.median * 100.0,
                r.min * 100.0,
                r.max * 100.0
            )),
            s.end_to_end_p99_ms.show(1.0, 1),
            or_dash(s.raw_end_to_end_p99_ms, 1.0, 1),
            s.publish_p99_us.show(1.0, 0),
            s.cpu_us_per_event.show(1.0, 1),
            or_dash(s.raw_cpu_us_per_event, 1.0, 1),
            s.machine_busy_pct.show(1.0, 0),
            or_dash(s.raw_machine_busy_pct, 1.0, 0),
            s.machine_steal_pct.median,
            s.raw_machine_steal_pct.map_or("-".into(), |r| format!("{:.0}", r.median)),
            s.order_violations,
            s.overlaps,
            s.duplicates,
            s.rss_peak_mb
                .iter()
                .map(|m| format!("{m:.0}"))
                .collect::<Vec<_>>()
                .join(" / "),
        ));
    }
    out
}

/// The JSON document of `--json`: when and where, every row, and the
/// sustained summaries.
pub(crate) fn document(reports: &[LevelReport]) -> serde_json::Value {
    serde_json::json!({
        "date": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "machine": machine(),
        "rows": rows(reports),
        "sustained": summaries(reports),
    })
}

/// Cores, memory and kernel of this machine, as the report's context.
pub(crate) fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_default();
    format!("{cores} cores ({cpu}), {mem_gib:.0} GiB")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(label: &str, run: usize, received: u64, secs: f64, rss: f64) -> LevelReport {
        LevelReport {
            label: label.into(),
            run,
            events: received as usize,
            aggregates: 10,
            acked: received as usize,
            order: OrderReport {
                received,
                ..OrderReport::default()
            },
            publish_us: super::super::measure::histogram(),
            end_to_end_us: super::super::measure::histogram(),
            elapsed: Duration::from_secs_f64(secs),
            resources: Resources {
                rss_peak_mb: rss,
                ..Resources::default()
            },
        }
    }

    #[test]
    fn the_sustained_summary_pairs_each_run_with_its_own_raw_run() {
        let mut reports = [
            report("nats", 0, 500, 1.0, 10.0),
            report("nats-raw", 0, 500, 0.5, 10.0),
            report("nats", 1, 1_000, 1.0, 100.0),
            report("nats-raw", 1, 1_000, 0.5, 100.0),
            report("nats", 2, 1_000, 2.0, 105.0),
            report("nats-raw", 2, 1_000, 1.0, 100.0),
            report("nats", 3, 1_000, 0.8, 120.0),
            report("nats-raw", 3, 1_000, 1.0, 100.0),
        ];
        for ((r, cpu_ms), steal) in reports
            .iter_mut()
            .skip(2)
            .zip([2_000.0, 1_000.0, 4_000.0, 1_000.0, 3_000.0, 1_000.0])
            .zip([5.0, 2.0, 15.0, 4.0, 10.0, 3.0])
        {
            r.resources.cpu_ms = cpu_ms;
            r.resources.machine_busy_pct = cpu_ms / 40.0;
            r.resources.machine_steal_pct = steal;
        }
        let s = summaries(&reports);
        assert_eq!(s.len(), 1, "one summary for ours, none for the raw client");
        let s = &s[0];
        assert_eq!((s.label.as_str(), s.runs, s.events), ("nats", 3, 1_000));
        // Throughputs 1,000, 500 and 1,250: median 1,000.
        assert_eq!(
            (s.throughput.median, s.throughput.min, s.throughput.max),
            (1_000.0, 500.0, 1_250.0)
        );
        // Per-run ratios 0.5, 0.5 and 1.25 (never ours of one run over raw of another).
        let ratio = s.ratio_to_raw.unwrap();
        assert_eq!((ratio.median, ratio.min, ratio.max), (0.5, 0.5, 1.25));
        assert_eq!(s.rss_peak_mb, vec![100.0, 105.0, 120.0]);
        // CPU per event: 2, 4 and 3 ms over 1,000 events each; raw 1 ms each.
        assert_eq!(
            (
                s.cpu_us_per_event.median,
                s.cpu_us_per_event.min,
                s.cpu_us_per_event.max
            ),
            (3_000.0, 2_000.0, 4_000.0)
        );
        assert_eq!(s.raw_cpu_us_per_event.unwrap().median, 1_000.0);
        assert_eq!(s.machine_busy_pct.median, 75.0);
        assert_eq!(s.raw_machine_busy_pct.unwrap().max, 25.0);
        // Steal ours 5, 15, 10 and raw 2, 4, 3: the row shows both medians.
        assert_eq!(
            (s.machine_steal_pct.median, s.machine_steal_pct.max),
            (10.0, 15.0)
        );
        assert_eq!(s.raw_machine_steal_pct.unwrap().min, 2.0);
        let row = summary_markdown(std::slice::from_ref(s));
        assert!(
            row.lines()
                .nth(2)
                .is_some_and(|l| l.contains("| 75 [50–100] | 25 [25–25] | 10 / 3 |")),
            "busy, raw busy and the steal medians side by side: {row}"
        );
        assert!((s.rss_growth_pct - 20.0).abs() < 1e-9);
        assert!(summary_markdown(&[]).lines().count() == 2);
    }

    #[test]
    fn an_even_count_has_the_mean_of_the_middle_two_as_median() {
        let s = Spread::of(vec![4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 4.0));
        assert!(Spread::of(Vec::new()).is_none());
    }
}
