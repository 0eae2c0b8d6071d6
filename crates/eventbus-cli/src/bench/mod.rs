//! `eventbus bench`: the original SDK's performance test (ORIGIN.md),
//! measured honestly, on every backend, beside the raw clients.
//!
//! Two parts per backend:
//! - the original's four short levels (500 to 10,000 envelopes), kept for
//!   comparison with the original SDK's figures;
//! - the sustained level, the headline: at least `--sustained` envelopes
//!   (200,000) or `--sustained-secs` (30 s) at the rate the levels showed,
//!   run `--runs` times (3) alternating ours and the raw client's (ours,
//!   raw, ours, raw, ...), reported as median and range, so no ratio rests
//!   on one noisy pair.
//!
//! Per load level: a fresh bus, one envelope subscription per topic, every
//! aggregate publishing versions 1..n in order to topic (index mod topics).
//! Timing starts after every consumer has received a readiness probe (so a
//! Kafka group join is not counted), and throughput is events received
//! divided by first send to last receive; no fixed sleeps. The raw client
//! then does the same work without our layer.

pub(crate) mod measure;
mod plot;
pub(crate) mod raw;
mod report;
mod run;
mod scenario;

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use crate::backends::{BackendKind, BrokerArgs, Target, WhenMissing};
pub(crate) use report::LevelReport;
pub(crate) use scenario::Scenario;

/// Options of `eventbus bench`.
#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// Backend to measure.
    #[arg(long, value_enum, default_value_t = BackendKind::Memory)]
    backend: BackendKind,
    /// Load levels: envelopes per level, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "500,2000,5000,10000")]
    levels: Vec<usize>,
    /// Skip the short levels (run only the sustained level).
    #[arg(long)]
    no_levels: bool,
    /// Envelopes of the sustained level, at least (count); 0 skips it.
    #[arg(long, default_value_t = 200_000)]
    sustained: usize,
    /// The sustained level is made long enough to last about this many
    /// seconds at the throughput our bus showed at the largest short level
    /// (capped by `--sustained-max`); 0 keeps `--sustained` as it is.
    #[arg(long, default_value_t = 30)]
    sustained_secs: u64,
    /// Most envelopes a sustained level is sized to (count).
    #[arg(long, default_value_t = 2_000_000)]
    sustained_max: usize,
    /// Runs of the sustained level, each ours then the raw client's.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Number of topics.
    #[arg(long, default_value_t = 5)]
    topics: usize,
    /// Aggregates per level; default n/10 clamped to 50..=1000 (the original's rule).
    #[arg(long)]
    aggregates: Option<usize>,
    /// `consumer.concurrency` of our bus (handlers running at once, count);
    /// default: the bus's default.
    #[arg(long)]
    concurrency: Option<usize>,
    /// Payload size in bytes (JSON padded to this length).
    #[arg(long, default_value_t = 256)]
    payload_bytes: usize,
    /// Longest wait for a level's deliveries, in seconds.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    /// Skip the raw-client baselines.
    #[arg(long)]
    no_raw: bool,
    /// Skip our bus and run the raw-client baselines alone (to profile a
    /// baseline: `RAW=1 scripts/profile`).
    #[arg(long, conflicts_with = "no_raw")]
    no_ours: bool,
    /// Members of the consumer group, comma-separated: each level runs once
    /// per count, the members in this process, each with its own bus and
    /// broker connection (memory: clients of one broker). With more than one,
    /// NATS topics are split into 8 partitions. The raw baseline runs once,
    /// with one consumer.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    members: Vec<usize>,
    #[command(flatten)]
    brokers: BrokerArgs,
    /// Also write every figure as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Print a markdown table (for the README) instead of the plain one.
    #[arg(long)]
    markdown: bool,
    /// Also draw throughput and latency per level and backend to this SVG file.
    #[arg(long)]
    plot: Option<PathBuf>,
}

/// A name unique to one level of one run, for topics and groups.
pub(crate) fn run_id(kind: &str, events: usize) -> String {
    let id = eventbus::new_event_id();
    format!("bench-{kind}-{events}-{}", &id[id.len() - 8..])
}

/// Runs every level on the chosen backends and prints the report.
pub(crate) async fn run(args: BenchArgs) -> eventbus::Result<()> {
    let scenario = Scenario {
        topics: args.topics.max(1),
        aggregates: args.aggregates,
        payload_bytes: args.payload_bytes,
        timeout: Duration::from_secs(args.timeout_secs),
        concurrency: args.concurrency,
        bus: args.brokers.bus_config()?,
    };
    let levels = if args.no_levels {
        Vec::new()
    } else {
        args.levels.clone()
    };
    let mut reports = Vec::new();
    // SIGTERM or SIGINT: the running level finishes, no other starts, and
    // the levels done are reported.
    let stop = tokio_util::sync::CancellationToken::new();
    crate::signals::drain_on_signal(stop.clone())?;
    for target in targets(&args).await? {
        for &events in &levels {
            if stop.is_cancelled() {
                break;
            }
            one_round(&args, &target, &scenario, events, 0, &stop, &mut reports).await?;
        }
        let events = sustained_events(&args, &reports, target.name());
        for run in 1..=args.runs {
            if events == 0 || stop.is_cancelled() {
                break;
            }
            one_round(&args, &target, &scenario, events, run, &stop, &mut reports).await?;
        }
    }
    write_outputs(&args, &reports)
}

/// Ours (once per member count), then the raw client's, at one level;
/// `run` is the sustained run's number (0 for a short level).
async fn one_round(
    args: &BenchArgs,
    target: &Target,
    scenario: &Scenario,
    events: usize,
    run: usize,
    stop: &tokio_util::sync::CancellationToken,
    reports: &mut Vec<LevelReport>,
) -> eventbus::Result<()> {
    let tag = |label: String| match run {
        0 => label,
        n => format!("{label} (run {n})"),
    };
    let members = if args.no_ours { &[][..] } else { &args.members[..] };
    for &members in members {
        if stop.is_cancelled() {
            return Ok(());
        }
        let label = match members {
            0 | 1 => target.name().to_owned(),
            n => format!("{} ×{n}", target.name()),
        };
        let mut report = run::level(target, scenario, events, members, bar(&tag(label), events)).await?;
        report.run = run;
        eprintln!("{}", report.one_line());
        reports.push(report);
    }
    if !args.no_raw && !stop.is_cancelled() {
        let label = format!("{}-raw", target.name());
        let mut report = raw::level(target, scenario, events, bar(&tag(label), events)).await?;
        report.run = run;
        eprintln!("{}", report.one_line());
        reports.push(report);
    }
    Ok(())
}

/// Envelopes of `backend`'s sustained level: `--sustained`, raised to last
/// `--sustained-secs` at the throughput of our largest short level, at most
/// `--sustained-max`; 0 when skipped.
fn sustained_events(args: &BenchArgs, reports: &[LevelReport], backend: &str) -> usize {
    if args.sustained == 0 || args.runs == 0 {
        return 0;
    }
    let rate = reports
        .iter()
        .filter(|r| r.label == backend && r.run == 0)
        .max_by_key(|r| r.events)
        .map_or(0.0, LevelReport::throughput);
    let timed = (rate * args.sustained_secs as f64) as usize;
    args.sustained.max(timed.min(args.sustained_max))
}

fn write_outputs(args: &BenchArgs, reports: &[LevelReport]) -> eventbus::Result<()> {
    let io = |e: std::io::Error| eventbus::Error::config("cannot write the bench output").with_source(e);
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report::document(reports))?;
        std::fs::write(path, json).map_err(io)?;
    }
    if let Some(path) = &args.plot {
        std::fs::write(path, plot::svg(reports)).map_err(io)?;
    }
    match args.markdown {
        true => println!("{}", report::markdown(reports)),
        false => println!("{}", report::table(reports)),
    }
    Ok(())
}

fn bar(label: &str, events: usize) -> ProgressBar {
    let bar = ProgressBar::new(events as u64);
    let style = ProgressStyle::with_template("{prefix:>12} {bar:40} {pos}/{len} {per_sec}")
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_prefix(format!("{label} {events}"));
    bar
}

async fn targets(args: &BenchArgs) -> eventbus::Result<Vec<Target>> {
    let mut targets = Vec::new();
    for kind in args.backend.each() {
        targets.push(Target::connect(kind, &args.brokers, WhenMissing::StartLocal).await?);
    }
    Ok(targets)
}
