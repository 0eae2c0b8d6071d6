//! `eventbus bench`: the original SDK's performance test (ORIGIN.md), measured honestly.
//!
//! Per load level: a fresh bus, one envelope subscription per topic, every
//! aggregate publishing versions 1..n in order to topic (index mod topics).
//! Throughput is events received divided by the time from the first send to
//! the last receive; no fixed sleeps.

mod report;
mod run;
mod scenario;
mod target;

use clap::{Args, ValueEnum};

pub(crate) use report::LevelReport;
pub(crate) use scenario::Scenario;
use target::Target;

/// Options of `eventbus bench`.
#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// Backend to measure.
    #[arg(long, value_enum, default_value_t = BackendKind::Memory)]
    backend: BackendKind,
    /// Load levels: envelopes per level, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "500,2000,5000,10000")]
    levels: Vec<usize>,
    /// Number of topics.
    #[arg(long, default_value_t = 5)]
    topics: usize,
    /// Aggregates per level; default n/10 clamped to 50..=1000 (the original's rule).
    #[arg(long)]
    aggregates: Option<usize>,
    /// Payload size in bytes (JSON padded to this length).
    #[arg(long, default_value_t = 256)]
    payload_bytes: usize,
    /// Longest wait for a level's deliveries, in seconds.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    /// NATS server URL; without it the bench starts a local nats-server.
    #[arg(long, env = "EVENTBUS_NATS_URL")]
    nats_url: Option<String>,
}

/// The backends the bench can drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum BackendKind {
    /// The in-process memory backend.
    Memory,
    /// NATS JetStream.
    Nats,
    /// Every backend in turn.
    All,
}

/// Runs every level on the chosen backend and prints the table.
pub(crate) async fn run(args: BenchArgs) -> eventbus::Result<()> {
    let scenario = Scenario {
        topics: args.topics.max(1),
        aggregates: args.aggregates,
        payload_bytes: args.payload_bytes,
        timeout: std::time::Duration::from_secs(args.timeout_secs),
    };
    let mut reports = Vec::new();
    for target in targets(&args).await? {
        for &level in &args.levels {
            let bus = target.bus(eventbus::BusConfig::default()).await?;
            let report = run::level(&bus, &scenario, level).await?;
            bus.close().await?;
            eprintln!("{}", report.one_line());
            reports.push(report);
        }
        eprintln!("{} done", target.name());
    }
    println!("{}", report::table(&reports));
    Ok(())
}

async fn targets(args: &BenchArgs) -> eventbus::Result<Vec<Target>> {
    let all = args.backend == BackendKind::All;
    let mut targets = Vec::new();
    if all || args.backend == BackendKind::Memory {
        targets.push(Target::memory());
    }
    if all || args.backend == BackendKind::Nats {
        targets.push(Target::nats(args.nats_url.clone()).await?);
    }
    Ok(targets)
}
