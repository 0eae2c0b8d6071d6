//! `eventbus outbox relay` and `eventbus outbox status`.

mod bench;
mod http;

use std::net::SocketAddr;
use std::sync::Arc;

use clap::{Args, Subcommand};
use eventbus::{Result, RetryPolicy, Secret};
use eventbus_outbox::{OutboxStore, Relay, RelayConfig};
use tokio_util::sync::CancellationToken;

use crate::backends::{BackendKind, BrokerArgs, Target, WhenMissing};

/// Outbox commands.
#[derive(Debug, Subcommand)]
pub(crate) enum OutboxCommand {
    /// Runs a relay: publishes committed outbox rows through a backend.
    /// Serves `/metrics` (Prometheus text format) and `/health` (JSON) over HTTP.
    Relay(RelayArgs),
    /// Shows row counts by status and the age of the oldest pending row.
    Status(StatusArgs),
    /// Measures relay throughput and commit-to-ACK latency.
    Bench(bench::BenchArgs),
}

/// Options of `eventbus outbox relay`.
#[derive(Debug, Args)]
pub(crate) struct RelayArgs {
    /// Database URL: `sqlite://FILE` or `postgres://...`. Never printed
    /// (help hides the environment variable's value).
    #[arg(long, env = "EVENTBUS_DATABASE_URL", hide_env_values = true)]
    database: Secret,
    /// Backend to publish through.
    #[arg(long, value_enum)]
    backend: BackendKind,
    #[command(flatten)]
    brokers: BrokerArgs,
    /// Address of the `/metrics` and `/health` endpoints.
    #[arg(long, default_value = "127.0.0.1:9464")]
    listen: SocketAddr,
    /// Rows claimed per round (default 500). Overrides `[relay] batch_size`.
    #[arg(long)]
    batch_size: Option<i64>,
    /// Rounds run at once (default 2): one claims while another waits for
    /// ACKs. Overrides `[relay] rounds_in_flight`.
    #[arg(long)]
    rounds_in_flight: Option<usize>,
    /// Most rows of one aggregate a round claims (default 32), published
    /// one after another. Overrides `[relay] versions_per_aggregate`.
    #[arg(long)]
    versions_per_aggregate: Option<usize>,
    /// Idle poll interval, in ms (default 500). Overrides `[relay] poll_interval_ms`.
    #[arg(long)]
    poll_interval_ms: Option<u64>,
    /// Publish attempts before a row is dead-lettered (default 5).
    /// Overrides `[relay] backoff.max_attempts`.
    #[arg(long)]
    max_attempts: Option<u32>,
    /// How long a claim lasts without renewal, in ms (database clock): a
    /// killed relay's rows are taken over after it. Keep it well above the
    /// publish ACK timeout (30,000 ms by default). Overrides `[relay] lease_ms`.
    #[arg(long)]
    lease_ms: Option<u64>,
}

/// Options of `eventbus outbox status`.
#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// Database URL: `sqlite://FILE` or `postgres://...`. Never printed
    /// (help hides the environment variable's value).
    #[arg(long, env = "EVENTBUS_DATABASE_URL", hide_env_values = true)]
    database: Secret,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn run(command: OutboxCommand) -> Result<()> {
    match command {
        OutboxCommand::Relay(args) => relay(args).await,
        OutboxCommand::Status(args) => status(args).await,
        OutboxCommand::Bench(args) => bench::run(args).await,
    }
}

async fn relay(args: RelayArgs) -> Result<()> {
    let metrics = eventbus::prometheus::install()?;
    let store = OutboxStore::connect(args.database.expose(), 8).await?;
    store.migrate().await?;
    let target = Target::connect(args.backend, &args.brokers, WhenMissing::DefaultAddress).await?;
    let bus = target.bus(args.brokers.bus_config()?).await?;
    // `[relay]` of --config, then the flags.
    let mut config: RelayConfig = crate::backends::settings(args.brokers.config.as_deref(), "relay", None)?;
    if let Some(n) = args.batch_size {
        config.batch_size = n;
    }
    if let Some(n) = args.rounds_in_flight {
        config.rounds_in_flight = n;
    }
    if let Some(n) = args.versions_per_aggregate {
        config.versions_per_aggregate = n;
    }
    if let Some(ms) = args.poll_interval_ms {
        config.poll_interval_ms = ms;
    }
    if let Some(ms) = args.lease_ms {
        config.lease_ms = ms;
    }
    if let Some(n) = args.max_attempts {
        config.backoff = RetryPolicy {
            max_attempts: n,
            ..config.backoff
        };
    }
    let relay = Arc::new(Relay::new(store.clone(), bus.clone(), config));
    let shutdown = CancellationToken::new();
    let state = http::State {
        metrics,
        store,
        bus: bus.clone(),
        stats: relay.stats(),
        relay_id: relay.id().to_owned(),
    };
    let server = http::serve(args.listen, state, shutdown.clone()).await?;
    eprintln!(
        "relay {} running; metrics and health on http://{}",
        relay.id(),
        args.listen
    );
    crate::signals::drain_on_signal(shutdown.clone())?;
    relay.run(shutdown.clone()).await?;
    shutdown.cancel();
    let _ = server.await;
    bus.close().await
}

async fn status(args: StatusArgs) -> Result<()> {
    let store = OutboxStore::connect(args.database.expose(), 1).await?;
    let status = store.status().await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    for (state, count) in &status.counts {
        println!("{state:<14} {count}");
    }
    match status.oldest_pending_age_ms {
        Some(ms) => println!("oldest pending  {:.3} s", ms as f64 / 1000.0),
        None => println!("oldest pending  -"),
    }
    Ok(())
}
