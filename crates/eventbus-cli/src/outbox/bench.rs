//! `eventbus outbox bench`: relay throughput and commit-to-ACK latency.
//!
//! Appends `events` envelopes (20 per aggregate) in transactions of 100
//! while one relay runs; throughput is events over first commit to last
//! ACK; latency is each row's `published_at - created_at` (µs, from the
//! database), as percentiles.

use std::time::{Duration, Instant};

use clap::Args;
use eventbus::{Envelope, Result};
use eventbus_outbox::{OutboxEvent, OutboxStore, Relay, RelayConfig, append};
use eventbus_testkit::server::PostgresServer;
use tokio_util::sync::CancellationToken;

use crate::backends::{BackendKind, BrokerArgs, Target, WhenMissing};

/// Options of `eventbus outbox bench`.
#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// `sqlite` (a temporary file), `postgres` (a throwaway local cluster), or a database URL.
    #[arg(long, default_value = "sqlite")]
    database: String,
    /// Backend the relay publishes through (without an address, a local
    /// server is started).
    #[arg(long, value_enum, default_value_t = BackendKind::Memory)]
    backend: BackendKind,
    #[command(flatten)]
    brokers: BrokerArgs,
    /// Events to relay.
    #[arg(long, default_value_t = 10_000)]
    events: usize,
}

pub(crate) async fn run(args: BenchArgs) -> Result<()> {
    let tmp = tempfile_dir()?;
    let (_pg, url) = match args.database.as_str() {
        "sqlite" => (
            None,
            format!("sqlite://{}", tmp.path().join("outbox.db").display()),
        ),
        "postgres" => {
            let pg = PostgresServer::start().await?;
            let url = pg.url();
            (Some(pg), url)
        }
        url => (None, url.to_owned()),
    };
    let target = Target::connect(args.backend, &args.brokers, WhenMissing::StartLocal).await?;
    let bus = target.bus(eventbus::BusConfig::default()).await?;
    let store = OutboxStore::connect(&url, 8).await?;
    store.migrate().await?;
    let relay = Relay::new(
        store.clone(),
        bus.clone(),
        RelayConfig {
            poll_interval_ms: 5,
            ..RelayConfig::default()
        },
    );
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let running = tokio::spawn(async move { relay.run(stop).await });
    let started = Instant::now();
    insert(&store, args.events).await?;
    let inserted = started.elapsed();
    while published(&store).await? < args.events as i64 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    shutdown.cancel();
    let _ = running.await;
    let (p50, p99, max) = latency_ms(&store).await?;
    println!(
        "outbox relay: {} events, database {}, backend {:?}: {:.0} events/s (first commit to last ACK {:.2}s; inserts took {:.2}s); commit->ACK p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms",
        args.events,
        if url.starts_with("sqlite") {
            "sqlite"
        } else {
            "postgres"
        },
        args.backend,
        args.events as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64(),
        inserted.as_secs_f64(),
    );
    bus.close().await
}

fn tempfile_dir() -> Result<tempfile::TempDir> {
    tempfile::tempdir().map_err(|e| eventbus::Error::config("cannot create a temp dir").with_source(e))
}

async fn insert(store: &OutboxStore, events: usize) -> Result<()> {
    let aggregates = (events / 20).max(1);
    let db = |e: sqlx::Error| eventbus::Error::backend("insert failed", e);
    for chunk in 0..events.div_ceil(100) {
        let range = chunk * 100..((chunk + 1) * 100).min(events);
        let envelopes: Vec<Envelope> = range
            .map(|n| {
                Envelope::builder(
                    format!("agg-{}", n % aggregates),
                    "BenchEvent",
                    (n / aggregates + 1) as i64,
                )
                .json_payload(&n)
                .and_then(|b| b.build())
            })
            .collect::<Result<_>>()?;
        match store {
            OutboxStore::Sqlite(pool) => {
                let mut tx = pool.begin().await.map_err(db)?;
                for e in &envelopes {
                    append(&mut *tx, OutboxEvent::new("bench", e, "Bench")).await?;
                }
                tx.commit().await.map_err(db)?;
            }
            OutboxStore::Postgres(pool) => {
                let mut tx = pool.begin().await.map_err(db)?;
                for e in &envelopes {
                    append(&mut *tx, OutboxEvent::new("bench", e, "Bench")).await?;
                }
                tx.commit().await.map_err(db)?;
            }
        }
    }
    Ok(())
}

async fn published(store: &OutboxStore) -> Result<i64> {
    Ok(store
        .status()
        .await?
        .counts
        .get("published")
        .copied()
        .unwrap_or(0))
}

/// (p50, p99, max) of `published_at - created_at`, in ms.
async fn latency_ms(store: &OutboxStore) -> Result<(f64, f64, f64)> {
    let sql = "SELECT published_at - created_at FROM outbox_events WHERE status = 'published'";
    let db = |e: sqlx::Error| eventbus::Error::backend("latency query failed", e);
    let mut values: Vec<i64> = match store {
        OutboxStore::Sqlite(pool) => sqlx::query_scalar(sql).fetch_all(pool).await.map_err(db)?,
        OutboxStore::Postgres(pool) => sqlx::query_scalar(sql).fetch_all(pool).await.map_err(db)?,
    };
    values.sort_unstable();
    let at = |q: f64| {
        values
            .get(((values.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or(0) as f64
            / 1000.0
    };
    Ok((at(0.5), at(0.99), at(1.0)))
}
