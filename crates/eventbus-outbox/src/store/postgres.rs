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
        // The lock is taken inside the limited scan: rows another relay is
        // claiming are skipped and the LIMIT fills with later heads, so
        // concurrent relays take disjoint sets instead of colliding on the
        // same oldest heads. A row claimed and committed meanwhile fails the
        // re-check of status and lease on its newest version. The scan is a
        // materialized CTE, run once: as a `seq IN (...)` subquery the
        // planner may run it again per outer row, and each run locks and
        // returns more rows (a claim of 1 took 4).
        let sql = format!(
            "WITH picked AS MATERIALIZED ({} FOR UPDATE OF o SKIP LOCKED)
             UPDATE outbox_events t SET claimed_by = ?, lease_until = {NOW_US} + ?
             FROM picked
             WHERE t.seq = picked.seq AND t.status = 'pending'
               AND (t.lease_until IS NULL OR t.lease_until < {NOW_US}) {}",
            super::heads_sql(NOW_US),
            super::RETURNING
        );
        // The plan is pinned to the one that stops early: walk the pending
        // rows by seq (partial index), probe each for an earlier pending row
        // of its aggregate, stop at the limit. On stale statistics (the
        // table analyzed while few rows were pending: a relay catching up
        // after an outage) the planner otherwise probes every pending row
        // and sorts them: a claim of 500 rows took 131 ms instead of 6 on
        // 50,000 pending rows. The settings are local to this transaction.
        let mut tx = self.begin().await.map_err(db("claim"))?;
        sqlx::query(
            "SELECT set_config('enable_sort', 'off', true), set_config('enable_bitmapscan', 'off', true),
                    set_config('enable_seqscan', 'off', true), set_config('enable_hashjoin', 'off', true),
                    set_config('enable_mergejoin', 'off', true)",
        )
        .execute(&mut *tx)
        .await
        .map_err(db("claim"))?;
        let rows = sqlx::query_as::<_, OutboxRow>(&Dialect::Postgres.sql(&sql))
            .bind(super::now_us())
            .bind(limit)
            .bind(claim)
            .bind(lease.as_micros() as i64)
            .fetch_all(&mut *tx)
            .await
            .map_err(db("claim"))?;
        tx.commit().await.map_err(db("claim"))?;
        Ok(rows)
    }

    async fn may_run(&self, _relay: &str, _lease: Duration) -> Result<bool> {
        Ok(true)
    }

    async fn resign(&self, _relay: &str) -> Result<()> {
        Ok(())
    }

    async fn wakeups(&self) -> Result<Option<Wakeups>> {
        let mut listener = PgListener::connect_with(self).await.map_err(db("listen"))?;
        listener.listen("outbox_events").await.map_err(db("listen"))?;
        Ok(Some(Wakeups(listener)))
    }
}
