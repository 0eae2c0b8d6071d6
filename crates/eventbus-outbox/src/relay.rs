//! [`Relay`]: publishes claimed outbox rows through any backend, in
//! per-aggregate order, and records their ACKs.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use eventbus_core::{Envelope, EventBus, Message, PublishResult, Result, RetryPolicy, headers};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::store::{OutboxRow, OutboxStore, now_us};

/// Name of the lease a SQLite relay holds (one relay per SQLite database).
const SQLITE_LEASE: &str = "sqlite-relay";

/// Relay settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelayConfig {
    /// Rows claimed per round (count). Default 500.
    pub batch_size: i64,
    /// Wait between polls when idle, in ms (PostgreSQL also wakes on NOTIFY). Default 500.
    pub poll_interval_ms: u64,
    /// How long a claim (or the SQLite relay lease) lasts without renewal, in ms.
    /// A dead relay's rows are claimable again after it. Default 30,000.
    pub lease_ms: u64,
    /// Publish attempts before a row is dead-lettered. Default 5.
    pub max_attempts: i32,
    /// Backoff between a row's attempts.
    pub backoff: RetryPolicy,
    /// Also publish dead-lettered rows to `<topic><suffix>` when set. Default none.
    pub dead_letter_suffix: Option<String>,
    /// Published rows are deleted after this long, in ms. Default 24 h.
    pub retention_ms: u64,
    /// How often cleanup runs, in ms. Default 60,000.
    pub cleanup_interval_ms: u64,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            batch_size: 500,
            poll_interval_ms: 500,
            lease_ms: 30_000,
            max_attempts: 5,
            backoff: RetryPolicy {
                max_attempts: 5,
                initial_backoff_ms: 200,
                max_backoff_ms: 30_000,
                multiplier: 2.0,
                jitter: 0.2,
            },
            dead_letter_suffix: None,
            retention_ms: 24 * 3_600_000,
            cleanup_interval_ms: 60_000,
        }
    }
}

/// Counters of one relay.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Rows confirmed by the broker and marked published.
    pub published: AtomicU64,
    /// Failed publish attempts.
    pub failed: AtomicU64,
    /// Rows dead-lettered.
    pub dead_lettered: AtomicU64,
    /// Rounds run.
    pub rounds: AtomicU64,
}

/// Publishes outbox rows through a bus.
///
/// Each round claims the head row of each aggregate (at most one event per
/// aggregate in flight, strictly in `event_version` order), publishes them
/// all, waits for every ACK, marks the confirmed ones published in one
/// statement, and reschedules failures with backoff; after `max_attempts` a
/// row is dead-lettered and its aggregate moves on. A failed row blocks its
/// aggregate's later rows until then.
pub struct Relay {
    store: OutboxStore,
    bus: EventBus,
    config: RelayConfig,
    id: String,
    stats: Arc<RelayStats>,
}

impl Relay {
    /// A relay over `store` publishing through `bus`.
    pub fn new(store: OutboxStore, bus: EventBus, config: RelayConfig) -> Self {
        Self {
            store,
            bus,
            config,
            id: format!("relay-{}", eventbus_core::new_event_id()),
            stats: Arc::new(RelayStats::default()),
        }
    }

    /// This relay's counters.
    pub fn stats(&self) -> Arc<RelayStats> {
        self.stats.clone()
    }

    /// This relay's id (its claims carry it).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Runs rounds until `shutdown` is cancelled; sleeps `poll_interval_ms`
    /// when idle (PostgreSQL: or until a NOTIFY on insert).
    ///
    /// # Errors
    /// Database errors are logged and retried; only a failed LISTEN setup returns.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<()> {
        let mut listener = self.listener().await?;
        let mut last_cleanup = tokio::time::Instant::now();
        let cleanup_every = Duration::from_millis(self.config.cleanup_interval_ms);
        while !shutdown.is_cancelled() {
            let busy = match self.run_once().await {
                Ok(n) => n > 0,
                Err(e) => {
                    tracing::warn!(error = %e, "relay round failed");
                    false
                }
            };
            if last_cleanup.elapsed() >= cleanup_every {
                last_cleanup = tokio::time::Instant::now();
                match self
                    .store
                    .cleanup(Duration::from_millis(self.config.retention_ms))
                    .await
                {
                    Ok(n) if n > 0 => tracing::info!(deleted = n, "outbox cleanup"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "outbox cleanup failed"),
                }
            }
            if !busy {
                let poll = tokio::time::sleep(Duration::from_millis(self.config.poll_interval_ms));
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = poll => {}
                    _ = notified(&mut listener) => {}
                }
            }
        }
        Ok(())
    }

    async fn listener(&self) -> Result<Option<sqlx::postgres::PgListener>> {
        let OutboxStore::Postgres(pool) = &self.store else {
            return Ok(None);
        };
        let mut listener = sqlx::postgres::PgListener::connect_with(pool)
            .await
            .map_err(crate::store::db("listen"))?;
        listener
            .listen("outbox_events")
            .await
            .map_err(crate::store::db("listen"))?;
        Ok(Some(listener))
    }

    /// One round; returns the rows it claimed.
    ///
    /// # Errors
    /// `Backend` when the database fails (claimed rows are claimable again after their lease).
    pub async fn run_once(&self) -> Result<usize> {
        let lease = Duration::from_millis(self.config.lease_ms);
        if matches!(self.store, OutboxStore::Sqlite(_))
            && !self.store.acquire_lease(SQLITE_LEASE, &self.id, lease).await?
        {
            return Ok(0);
        }
        let rows = self.store.claim(&self.id, self.config.batch_size, lease).await?;
        self.stats.rounds.fetch_add(1, Ordering::Relaxed);
        if rows.is_empty() {
            return Ok(0);
        }
        let results = self.publish_all(&rows).await;
        let mut published = Vec::with_capacity(rows.len());
        for (row, outcome) in rows.iter().zip(results) {
            match outcome {
                Ok(()) => published.push(row.id.clone()),
                Err(error) => self.failed(row, &error).await?,
            }
        }
        self.store.mark_published(&published).await?;
        self.stats
            .published
            .fetch_add(published.len() as u64, Ordering::Relaxed);
        metrics::counter!("eventbus_outbox_published_total").increment(published.len() as u64);
        Ok(rows.len())
    }

    /// Publishes every row (stage one for all, then every ACK); one outcome per row.
    async fn publish_all(&self, rows: &[OutboxRow]) -> Vec<Result<(), String>> {
        let mut pending = Vec::with_capacity(rows.len());
        for row in rows {
            let sent = match Envelope::decode(row.envelope.as_bytes()) {
                Ok(envelope) => self
                    .bus
                    .publish_envelope(&row.topic, &envelope)
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(format!("stored envelope is invalid: {e}")),
            };
            pending.push(sent);
        }
        let mut outcomes = Vec::with_capacity(rows.len());
        for sent in pending {
            outcomes.push(match sent {
                Ok(handle) => confirmed(handle.await),
                Err(e) => Err(e),
            });
        }
        outcomes
    }

    async fn failed(&self, row: &OutboxRow, error: &str) -> Result<()> {
        let attempt = row.attempts + 1;
        self.stats.failed.fetch_add(1, Ordering::Relaxed);
        let exhausted = attempt >= self.config.max_attempts;
        let next = now_us() + self.config.backoff.backoff(attempt as u32).as_micros() as i64;
        if exhausted && !self.publish_dead_letter(row, error).await {
            // The dead-letter topic is unreachable too: keep the row, try later.
            return self.store.fail(&row.id, error, next, false).await;
        }
        if exhausted {
            self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("eventbus_outbox_dead_lettered_total").increment(1);
            tracing::warn!(event_id = %row.id, error, "outbox row dead-lettered");
        }
        self.store.fail(&row.id, error, next, exhausted).await
    }

    /// Publishes to the dead-letter topic when one is configured; true when
    /// there is none or the broker confirmed.
    async fn publish_dead_letter(&self, row: &OutboxRow, error: &str) -> bool {
        let Some(suffix) = &self.config.dead_letter_suffix else {
            return true;
        };
        let mut message = Message::new(
            format!("{}{suffix}", row.topic),
            row.envelope.clone().into_bytes(),
        );
        message.headers.insert(headers::EVENT_ID, row.id.clone());
        message.headers.insert(headers::ORIGINAL_TOPIC, row.topic.clone());
        message
            .headers
            .insert(headers::ERROR_MESSAGE, error.replace(['\r', '\n'], " "));
        match self.bus.publish_message(message).await {
            Ok(handle) => handle.await.is_success(),
            Err(_) => false,
        }
    }
}

fn confirmed(result: PublishResult) -> Result<(), String> {
    match result.error {
        None => Ok(()),
        Some(e) => Err(e.to_string()),
    }
}

async fn notified(listener: &mut Option<sqlx::postgres::PgListener>) {
    match listener {
        Some(l) => {
            if l.recv().await.is_err() {
                // The connection dropped: fall back to polling.
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}
