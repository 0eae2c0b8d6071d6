//! The outbox on PostgreSQL: many relays share the work. Claims lock head
//! rows with `FOR UPDATE SKIP LOCKED` (rows another relay is claiming are
//! left to it) and re-check status and lease on the locked row; relays wake
//! on `NOTIFY outbox_events` (sent by the insert trigger) besides polling.

use std::time::Duration;

use async_trait::async_trait;
use eventbus_core::{Error, Result};
use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};

use super::{Database, Dialect, OutboxRow, Wakeups, db};

/// The database's clock in µs since the Unix epoch.
pub(super) const NOW_US: &str = "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000)::BIGINT";

pub(super) async fn connect(url: &str, max_connections: u32) -> Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .connect(url)
        .await
        .map_err(db("connect"))
}

#[async_trait]
impl Database for PgPool {
    async fn migrate(&self) -> Result<()> {
        sqlx::migrate!("./migrations/postgres")
            .run(self)
            .await
            .map_err(|e| Error::backend("outbox migration failed", e))
    }

    async fn claim(&self, claim: &str, limit: i64, lease: Duration) -> Result<Vec<OutboxRow>> {
        let sql = format!(
            "UPDATE outbox_events SET claimed_by = ?, lease_until = {NOW_US} + ?
             WHERE seq IN (SELECT seq FROM outbox_events WHERE seq IN ({}) FOR UPDATE SKIP LOCKED)
               AND status = 'pending' AND (lease_until IS NULL OR lease_until < {NOW_US}) {}",
            super::heads_sql(NOW_US),
            super::RETURNING
        );
        sqlx::query_as::<_, OutboxRow>(&Dialect::Postgres.sql(&sql))
            .bind(claim)
            .bind(lease.as_micros() as i64)
            .bind(super::now_us())
            .bind(limit)
            .fetch_all(self)
            .await
            .map_err(db("claim"))
    }

    async fn may_run(&self, _relay: &str, _lease: Duration) -> Result<bool> {
        Ok(true)
    }

    async fn wakeups(&self) -> Result<Option<Wakeups>> {
        let mut listener = PgListener::connect_with(self).await.map_err(db("listen"))?;
        listener.listen("outbox_events").await.map_err(db("listen"))?;
        Ok(Some(Wakeups(listener)))
    }
}
