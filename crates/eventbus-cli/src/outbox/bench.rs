//! `eventbus outbox bench`: relay throughput at saturation and
//! commit-to-ACK latency at a steady insert rate.
//!
//! **Saturation**, once per relay count in `--relays`: `--events`
//! envelopes (`--per-aggregate` versions per aggregate, interleaved as a
//! service's would be) are appended first, in transactions of 100, with no
//! relay running; then the relays start (each with its own bus connection
//! and database pool, as separate processes would) and the figure is events
//! over relay start to the last row marked published, with the CPU per
//! event over that time of the database cluster (when the bench started
//! it: `--database postgres`) and of this process.
//!
//! **Latency**: one relay runs while a writer appends `--rate` events/s
//! (a transaction every 10 ms) for `--rate-secs`; the figures are each
//! row's `published_at - created_at` (µs on the database row: append time
//! to the relay's mark after the broker's ACK), as percentiles.
//!
//! Every phase publishes to its own topic, consumed by a group whose
//! handler feeds the strict [`OrderChecker`]; the command fails when an
//! event is lost, order breaks, or a phase exceeds its bound.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use eventbus::{Envelope, EventBus, Result, SubscribeOptions};
use eventbus_outbox::{OutboxEvent, OutboxStore, Relay, RelayConfig, append_all};
use eventbus_testkit::OrderChecker;
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
    /// Events appended before the relays start, per saturation run (count).
    #[arg(long, default_value_t = 50_000)]
    events: usize,
    /// Versions per aggregate (count); aggregates = events / this.
    #[arg(long, default_value_t = 20)]
    per_aggregate: usize,
    /// Relay counts measured at saturation, comma-separated (SQLite runs
    /// one relay at a time whatever the count: its relays share one lease).
    #[arg(long, value_delimiter = ',', default_value = "1,3")]
    relays: Vec<usize>,
    /// Steady insert rate of the latency run, in events/s (0 skips it).
    #[arg(long, default_value_t = 5_000)]
    rate: u64,
    /// Length of the latency run, in seconds.
    #[arg(long, default_value_t = 10)]
    rate_secs: u64,
    /// Rows a relay claims per round (count); default `RelayConfig`'s.
    #[arg(long)]
    batch_size: Option<i64>,
    /// Rounds each relay runs at once (count); default `RelayConfig`'s.
    #[arg(long)]
    rounds_in_flight: Option<usize>,
    /// Most rows of one aggregate a round claims (count); default `RelayConfig`'s.
    #[arg(long)]
    versions_per_aggregate: Option<usize>,
    /// A relay lane's nap after a claim that found nothing, in ms (the
    /// relay's own default is 500; PostgreSQL relays also wake on inserts).
    #[arg(long, default_value_t = 5)]
    poll_interval_ms: u64,
    /// How long published rows are kept, in ms, in the saturation runs;
    /// default `RelayConfig`'s (24 h). 0 deletes each row as it is
    /// published. The latency run always keeps them: it reads their
    /// `published_at`.
    #[arg(long)]
    retention_ms: Option<u64>,
}

pub(crate) async fn run(args: BenchArgs) -> Result<()> {
    let tmp = tempfile::tempdir()
        .map_err(|e| eventbus::Error::config("cannot create a temp dir").with_source(e))?;
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
    let database = if url.starts_with("sqlite") {
        "sqlite"
    } else {
        "postgres"
    };
    let target = Target::connect(args.backend, &args.brokers, WhenMissing::StartLocal).await?;
    let writer = OutboxStore::connect(&url, 4).await?;
    writer.migrate().await?;
    let mut relay_config = RelayConfig {
        poll_interval_ms: args.poll_interval_ms,
        ..RelayConfig::default()
    };
    if let Some(n) = args.batch_size {
        relay_config.batch_size = n;
    }
    if let Some(n) = args.rounds_in_flight {
        relay_config.rounds_in_flight = n;
    }
    if let Some(n) = args.versions_per_aggregate {
        relay_config.versions_per_aggregate = n;
    }
    let latency_config = relay_config.clone();
    if let Some(ms) = args.retention_ms {
        relay_config.retention_ms = ms;
    }
    // The throwaway cluster's postmaster: its CPU (and its children's) per phase.
    let cluster = _pg.as_ref().and_then(|pg| pg.process().pid());
    let mut failed = Vec::new();
    for &relays in &args.relays {
        let mut phase = Phase::start(&target, &url, relays.max(1), false).await?;
        insert(&writer, &phase.topic, args.events, args.per_aggregate, None).await?;
        let started = Instant::now();
        let busy = crate::bench::measure::CoresBusy::start();
        let cpu = CpuPerEvent::start(cluster);
        phase.relay(&relay_config);
        let bound = Duration::from_secs(60) + Duration::from_millis(args.events as u64);
        phase.wait_published(args.events, started + bound).await?;
        let elapsed = started.elapsed();
        let (busy, steal) = busy.pcts();
        let cpu = cpu.per_event(args.events);
        let topic = phase.topic.clone();
        let report = phase.finish(args.events, args.backend).await?;
        println!(
            "outbox saturation: {} events ({} aggregates), {database}, {:?}, {relays} relay(s) x {} rounds in flight, up to {} versions per aggregate, {}: {:.0} events/s ({:.2}s from relay start to last mark, cores {busy:.0} % busy ({steal:.0} % taken by the host){cpu}, topic {}); order: {report}",
            args.events,
            (args.events / args.per_aggregate.max(1)).max(1),
            args.backend,
            relay_config.rounds_in_flight,
            relay_config.versions_per_aggregate,
            if relay_config.retention_ms == 0 {
                "rows deleted as published".to_owned()
            } else {
                format!("rows kept {} ms", relay_config.retention_ms)
            },
            args.events as f64 / elapsed.as_secs_f64(),
            elapsed.as_secs_f64(),
            topic,
        );
        if !report.is_strictly_ordered() || handled(&report) < args.events as u64 {
            failed.push(format!("saturation with {relays} relay(s): {report}"));
        }
        reset(&writer).await?;
    }
    if args.rate > 0 {
        let events = (args.rate * args.rate_secs) as usize;
        let mut phase = Phase::start(&target, &url, 1, true).await?;
        phase.relay(&latency_config);
        let started = Instant::now();
        insert(&writer, &phase.topic, events, args.per_aggregate, Some(args.rate)).await?;
        let inserted = started.elapsed();
        phase
            .wait_published(events, Instant::now() + Duration::from_secs(60))
            .await?;
        let report = phase.finish(events, args.backend).await?;
        let (p50, p99, max) = latency_ms(&writer).await?;
        println!(
            "outbox latency: {events} events at {:.0} events/s for {:.1}s, {database}, {:?}, 1 relay: commit->ACK p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms; order: {report}",
            events as f64 / inserted.as_secs_f64(),
            inserted.as_secs_f64(),
            args.backend,
        );
        if !report.is_strictly_ordered() || handled(&report) < events as u64 {
            failed.push(format!("latency run: {report}"));
        }
        reset(&writer).await?;
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(eventbus::Error::config(format!(
            "outbox bench: events lost or order broken: {}",
            failed.join("; ")
        )))
    }
}

/// CPU per event of a saturation phase, from relay start to the last
/// mark: the database cluster's (when the bench started it) and this
/// process's (relays, buses, the checking consumer).
struct CpuPerEvent {
    cluster: Option<(u32, f64)>,
    ours_ms: f64,
}

impl CpuPerEvent {
    fn start(cluster: Option<u32>) -> Self {
        Self {
            cluster: cluster.and_then(|pid| Some((pid, crate::bench::measure::process_tree_cpu_ms(pid)?))),
            ours_ms: crate::bench::measure::process_cpu_ms(),
        }
    }

    /// `", CPU µs/event: database D, this process P"` (the database part
    /// only when measured) over `events`.
    fn per_event(&self, events: usize) -> String {
        let per_event = |ms: f64| ms * 1000.0 / events.max(1) as f64;
        let ours = per_event(crate::bench::measure::process_cpu_ms() - self.ours_ms);
        let database = self.cluster.and_then(|(pid, before)| {
            let after = crate::bench::measure::process_tree_cpu_ms(pid)?;
            Some(format!("database {:.0}, ", per_event(after - before)))
        });
        format!(
            ", CPU µs/event: {}this process {ours:.0}",
            database.unwrap_or_default()
        )
    }
}

/// Distinct events the checker saw handled: successes less the repeats of
/// an already handled version (a duplicate must not stand in for a missing
/// event).
fn handled(report: &eventbus_testkit::OrderReport) -> u64 {
    report.received.saturating_sub(report.duplicates)
}

/// One measured run: its topic, the checking consumer, the relays' buses.
struct Phase {
    topic: String,
    checker: Arc<OrderChecker>,
    checking: EventBus,
    /// The checker's subscription (its member's offset gaps).
    subscription: eventbus::Subscription,
    relays: Vec<(EventBus, OutboxStore)>,
    shutdown: CancellationToken,
    running: Vec<tokio::task::JoinHandle<Result<()>>>,
    stats: Vec<Arc<eventbus_outbox::RelayStats>>,
}

impl Phase {
    /// Subscribes the checker to a fresh topic and connects `relays` buses and pools.
    async fn start(target: &Target, url: &str, relays: usize, latency: bool) -> Result<Self> {
        let topic = crate::bench::run_id(if latency { "outbox-lat" } else { "outbox" }, relays);
        let mut buses = target
            .group_buses(relays + 1, eventbus::BusConfig::default())
            .await?;
        let checking = buses.remove(0);
        let checker = Arc::new(OrderChecker::new());
        let c = checker.clone();
        let name = topic.clone();
        let subscription = checking
            .subscribe_envelope(
                &topic,
                SubscribeOptions::group(format!("{topic}-check")),
                move |e: Envelope| {
                    c.begin(&name, &e).succeeded();
                    async { Ok::<_, std::io::Error>(()) }
                },
            )
            .await?;
        let mut with_pools = Vec::with_capacity(relays);
        for bus in buses {
            with_pools.push((bus, OutboxStore::connect(url, 4).await?));
        }
        Ok(Self {
            topic,
            checker,
            checking,
            subscription,
            relays: with_pools,
            shutdown: CancellationToken::new(),
            running: Vec::new(),
            stats: Vec::new(),
        })
    }

    /// Starts the relays.
    fn relay(&mut self, config: &RelayConfig) {
        for (bus, store) in &self.relays {
            let relay = Relay::new(store.clone(), bus.clone(), config.clone());
            self.stats.push(relay.stats());
            let stop = self.shutdown.clone();
            self.running
                .push(tokio::spawn(async move { relay.run(stop).await }));
        }
    }

    /// Waits until the relays marked `events` rows published (their
    /// counters: polling the table would load the database being measured).
    ///
    /// # Errors
    /// `Timeout` past `deadline`, with the count reached.
    async fn wait_published(&self, events: usize, deadline: Instant) -> Result<()> {
        loop {
            let published: u64 = self
                .stats
                .iter()
                .map(|s| s.published.load(std::sync::atomic::Ordering::Relaxed))
                .sum();
            if published >= events as u64 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(eventbus::Error::timeout(format!(
                    "outbox bench: {published} of {events} rows published before the deadline"
                )));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Reads the topic back (see [`crate::read_back`]) and prints whether
    /// the broker holds every event the relays published after an ACK: the
    /// checking consumer skipped some (or was slower than its 60 s), or the
    /// broker dropped acknowledged writes. Only a whole read may say the
    /// latter.
    async fn say_where_the_missing_are(&self, events: usize) {
        let mut seen = std::collections::HashSet::new();
        let mut never_handled = Vec::new();
        let read = crate::read_back::read_back(&self.checking, &self.topic, |e, at| {
            if !self
                .checker
                .attempted(&self.topic, &e.aggregate_id, e.event_version)
            {
                never_handled.push(at);
            }
            seen.insert((e.aggregate_id, e.event_version));
        })
        .await;
        if !never_handled.is_empty() {
            println!(
                "outbox bench: {}: stored, never handled: {}",
                self.topic,
                crate::read_back::position_ranges(&never_handled, 20)
            );
        }
        // The consumer ran on during the read: was it only late?
        let received = handled(&self.checker.report());
        let gaps = self.subscription.health().assignment.map_or(0, |a| a.offset_gaps);
        let verdict = match &read {
            Err(e) => format!("reading it back failed: {e}"),
            Ok(_) if seen.len() >= events && received >= events as u64 => format!(
                "the broker holds all {events}, and the consumer has now handled {received}: it was late, not skipping"
            ),
            Ok(log) if seen.len() >= events && gaps > 0 => format!(
                "the broker holds all {events} ({log}), the consumer has handled {received}, and the broker \
                 served it a record past the offset it asked for {gaps} time(s) (each logged with its partition \
                 and offsets at RUST_LOG=eventbus_kafka=debug): where those gaps cover the positions above, the \
                 broker stored them late, after a later batch (tansu 0.6 raises the high watermark before it \
                 stores a batch: README, Known broker limits)"
            ),
            Ok(log) if seen.len() >= events => format!(
                "the broker holds all {events} ({log}), the consumer has handled {received} and was served \
                 no record past the offset it asked for: it skipped some"
            ),
            Ok(log) if log.is_whole() => format!(
                "the broker holds {} of {events} ({log}): it dropped writes it had acknowledged",
                seen.len()
            ),
            Ok(log) => format!(
                "read {} of {events} back, but the read was not whole ({log}): no verdict",
                seen.len()
            ),
        };
        println!("outbox bench: {}: {verdict}", self.topic);
    }

    /// Stops the relays, waits (at most 60 s) for the checker to see
    /// `events`, closes every bus and returns the checker's report (taken
    /// before any read-back). When events are missing on a broker that
    /// keeps its log (not memory, which trims what every group settled),
    /// prints where they are.
    async fn finish(mut self, events: usize, backend: BackendKind) -> Result<eventbus_testkit::OrderReport> {
        self.shutdown.cancel();
        for task in std::mem::take(&mut self.running) {
            let _ = task.await;
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while handled(&self.checker.report()) < events as u64 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let report = self.checker.report();
        if handled(&report) < events as u64 && backend != BackendKind::Memory {
            // Every row was marked published only after the broker's ACK:
            // tell a write the broker dropped from one the consumer skipped
            // (or was still too late for).
            self.say_where_the_missing_are(events).await;
        }
        for (bus, _) in &self.relays {
            bus.close().await?;
        }
        self.checking.close().await?;
        Ok(report)
    }
}

/// Appends `events` envelopes for `topic`, aggregate `n % aggregates` at
/// version `n / aggregates + 1`, each transaction's in one statement
/// ([`append_all`]): transactions of 100 without a `rate`; at `rate`
/// events/s, one transaction of `rate / 100` every 10 ms, late ones
/// caught up at once so the average holds.
async fn insert(
    store: &OutboxStore,
    topic: &str,
    events: usize,
    per_aggregate: usize,
    rate: Option<u64>,
) -> Result<()> {
    let aggregates = (events / per_aggregate.max(1)).max(1);
    let chunk = rate.map_or(100, |r| (r as usize / 100).max(1));
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let db = |e: sqlx::Error| eventbus::Error::backend("insert failed", e);
    for start in (0..events).step_by(chunk) {
        if rate.is_some() {
            tick.tick().await;
        }
        let envelopes: Vec<Envelope> = (start..(start + chunk).min(events))
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
        let events: Vec<OutboxEvent<'_>> = envelopes
            .iter()
            .map(|e| OutboxEvent::new(topic, e, "Bench"))
            .collect();
        match store {
            OutboxStore::Sqlite(pool) => {
                let mut tx = pool.begin().await.map_err(db)?;
                append_all(&mut *tx, &events).await?;
                tx.commit().await.map_err(db)?;
            }
            OutboxStore::Postgres(pool) => {
                let mut tx = pool.begin().await.map_err(db)?;
                append_all(&mut *tx, &events).await?;
                tx.commit().await.map_err(db)?;
            }
        }
    }
    Ok(())
}

/// Deletes every row, so the next phase starts from an empty table.
async fn reset(store: &OutboxStore) -> Result<()> {
    let sql = "DELETE FROM outbox_events";
    let db = |e: sqlx::Error| eventbus::Error::backend("reset failed", e);
    match store {
        OutboxStore::Sqlite(pool) => {
            sqlx::query(sql).execute(pool).await.map_err(db)?;
        }
        OutboxStore::Postgres(pool) => {
            sqlx::query(sql).execute(pool).await.map_err(db)?;
        }
    }
    Ok(())
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
