//! `eventbus lag`: how far behind a consumer group is, per partition, and
//! whether it is keeping up.

use std::time::Duration;

use clap::Args;
use eventbus::{PartitionLag, Result};
use serde::Serialize;

use crate::backends::{BackendKind, BrokerArgs, Target, WhenMissing};

/// Options of `eventbus lag`.
#[derive(Debug, Args)]
pub(crate) struct LagArgs {
    /// The topics to measure.
    #[arg(required = true)]
    topics: Vec<String>,
    /// The consumer group (the name given to `subscribe`).
    #[arg(long, short)]
    group: String,
    /// The broker.
    #[arg(long, value_enum, default_value_t = BackendKind::Nats)]
    backend: BackendKind,
    #[command(flatten)]
    brokers: BrokerArgs,
    /// Time between the two measurements the rate comes from (ms).
    #[arg(long, default_value_t = 2_000, value_name = "MS")]
    interval_ms: u64,
    /// One JSON object per partition instead of a table.
    #[arg(long)]
    json: bool,
}

/// One partition's row.
#[derive(Debug, Serialize)]
struct Row {
    topic: String,
    /// `null` for an unpartitioned NATS topic.
    partition: Option<u32>,
    /// The Kafka group id or NATS durable consumer measured.
    consumer: String,
    /// Messages the group has not settled (count), at the second measurement.
    pending: u64,
    /// Seconds since the oldest unsettled message was stored, where the broker tells.
    oldest_age_secs: Option<f64>,
    /// Change of `pending` per second between the two measurements:
    /// negative while the group catches up, positive while it falls behind.
    pending_change_per_sec: f64,
}

/// Measures each topic twice, `interval` apart, and prints pending, the
/// age of the oldest unsettled message and the rate of change.
///
/// # Errors
/// Connecting, `NotFound` for a missing topic, a broker error.
pub(crate) async fn run(args: LagArgs) -> Result<()> {
    let target = Target::connect(args.backend, &args.brokers, WhenMissing::DefaultAddress).await?;
    let bus = target.bus(args.brokers.bus_config()?).await?;
    let mut first = Vec::new();
    for topic in &args.topics {
        first.push(bus.group_lag(topic, &args.group).await?);
    }
    let interval = Duration::from_millis(args.interval_ms.max(1));
    tokio::time::sleep(interval).await;
    let now = chrono::Utc::now();
    let mut rows = Vec::new();
    for (topic, before) in args.topics.iter().zip(first) {
        let after = bus.group_lag(topic, &args.group).await?;
        for lag in after {
            let earlier = before
                .iter()
                .find(|b: &&PartitionLag| b.partition == lag.partition)
                .map_or(lag.pending, |b| b.pending);
            rows.push(Row {
                topic: topic.clone(),
                partition: lag.partition,
                consumer: lag.consumer,
                pending: lag.pending,
                oldest_age_secs: lag
                    .oldest_unsettled_at
                    .map(|t| (now - t).num_milliseconds().max(0) as f64 / 1000.0),
                pending_change_per_sec: (lag.pending as f64 - earlier as f64) / interval.as_secs_f64(),
            });
        }
    }
    if args.json {
        for row in &rows {
            println!("{}", serde_json::to_string(row)?);
        }
    } else {
        let mut table = comfy_table::Table::new();
        table.load_preset(comfy_table::presets::NOTHING);
        table.set_header([
            "TOPIC",
            "PARTITION",
            "CONSUMER",
            "PENDING",
            "OLDEST AGE",
            "CHANGE/S",
        ]);
        for r in &rows {
            table.add_row([
                r.topic.clone(),
                r.partition.map_or("-".into(), |p| p.to_string()),
                r.consumer.clone(),
                r.pending.to_string(),
                r.oldest_age_secs.map_or("-".into(), |a| format!("{a:.1} s")),
                format!("{:+.1}", r.pending_change_per_sec),
            ]);
        }
        let total: u64 = rows.iter().map(|r| r.pending).sum();
        let change: f64 = rows.iter().map(|r| r.pending_change_per_sec).sum();
        table.add_row([
            "total".to_owned(),
            String::new(),
            String::new(),
            total.to_string(),
            String::new(),
            format!("{change:+.1}"),
        ]);
        println!("{table}");
    }
    bus.close().await
}
