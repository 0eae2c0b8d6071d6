//! The outbox on SQLite: embedded, one relay at a time. A relay runs rounds
//! only while it holds the database's relay lease (table
//! `outbox_relay_lease`), so two processes sharing a file never interleave.

use std::time::Duration;

use async_trait::async_trait;
use eventbus_core::{Error, Result};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};

use super::{Claimed, Database, Dialect, Follower, Taken, Wakeups, db};

/// Name of the lease a SQLite relay holds (one relay per SQLite database).
const RELAY_LEASE: &str = "sqlite-relay";

/// The database's clock in µs since the Unix epoch (embedded: this process's).
pub(super) const NOW_US: &str = "CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER)";

pub(super) async fn connect(url: &str, max_connections: u32) -> Result<SqlitePool> {
    let options: SqliteConnectOptions = url
        .parse::<SqliteConnectOptions>()
        .map_err(|e| Error::config("invalid SQLite URL").with_source(e))?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(10));
    SqlitePoolOptions::new()
        .max_connections(max_connections)
        .connect_with(options)
        .await
        .map_err(db("connect"))
}

#[async_trait]
impl Database for SqlitePool {
    async fn migrate(&self) -> Result<()> {
        sqlx::migrate!("./migrations/sqlite")
            .run(self)
            .await
            .map_err(|e| Error::backend("outbox migration failed", e))
    }

    async fn claim(&self, claim: &str, limit: i64, per_aggregate: usize, lease: Duration) -> Result<Taken> {
        let sql = format!(
            "UPDATE outbox_events SET claimed_by = ?, lease_until = {NOW_US} + ? WHERE seq IN ({}) {}",
            super::heads_sql(NOW_US, ""),
            super::RETURNING
        );
        let mut tx = self.begin().await.map_err(db("claim"))?;
        let heads = sqlx::query_as::<_, Claimed>(&sql)
            .bind(claim)
            .bind(lease.as_micros() as i64)
            .bind(super::now_us())
            .bind(limit)
            .fetch_all(&mut *tx)
            .await
            .map_err(db("claim"))?;
        let taken = claim_followers!(tx, Dialect::Sqlite, heads_waiting, find_followers, heads: heads, claim: claim, limit: limit, per_aggregate: per_aggregate, lease: lease);
        tx.commit().await.map_err(db("claim"))?;
        Ok(taken)
    }

    async fn may_run(&self, relay: &str, lease: Duration) -> Result<bool> {
        let sql = format!(
            "INSERT INTO outbox_relay_lease (name, holder, lease_until) VALUES (?, ?, {NOW_US} + ?)
            ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, lease_until = excluded.lease_until
            WHERE outbox_relay_lease.holder = excluded.holder OR outbox_relay_lease.lease_until < {NOW_US}"
        );
        let affected = sqlx::query(&sql)
            .bind(RELAY_LEASE)
            .bind(relay)
            .bind(lease.as_micros() as i64)
            .execute(self)
            .await
            .map_err(db("lease"))?
            .rows_affected();
        Ok(affected == 1)
    }

    async fn resign(&self, relay: &str) -> Result<()> {
        sqlx::query("DELETE FROM outbox_relay_lease WHERE name = ? AND holder = ?")
            .bind(RELAY_LEASE)
            .bind(relay)
            .execute(self)
            .await
            .map_err(db("resign lease"))
            .map(drop)
    }

    fn wakeups(&self) -> Option<Wakeups> {
        None
    }
}

/// Which of `heads` (JSON, oldest first) have a pending row after them:
/// the seqs of the oldest `room` that do, one range of
/// `outbox_events_pending_heads` each.
async fn heads_waiting(tx: &mut sqlx::SqliteConnection, heads: String, room: usize) -> Result<Vec<i64>> {
    let sql = "SELECT CAST(json_extract(j.value, '$.seq') AS INTEGER) FROM json_each(?) j
         WHERE EXISTS (SELECT 1 FROM outbox_events e
             WHERE e.aggregate_id = json_extract(j.value, '$.aggregate_id') AND e.status = 'pending'
               AND (e.event_version, e.seq)
                   > (json_extract(j.value, '$.event_version'), json_extract(j.value, '$.seq')))
         LIMIT ?";
    sqlx::query_scalar::<_, i64>(sql)
        .bind(heads)
        .bind(i64::try_from(room).unwrap_or(i64::MAX))
        .fetch_all(tx)
        .await
        .map_err(db("claim"))
}

/// The follower probe: the next `each` pending rows after each of `heads`
/// (JSON); per head one range of `outbox_events_pending_heads` (a
/// correlated list subquery), then each row by its rowid.
async fn find_followers(tx: &mut sqlx::SqliteConnection, heads: String, each: i64) -> Result<Vec<Follower>> {
    let sql = format!(
        "SELECT p.seq, p.aggregate_id, p.event_version, {} AS claimable
         FROM json_each(?) h JOIN outbox_events p ON p.seq IN (
             SELECT q.seq FROM outbox_events q
             WHERE q.aggregate_id = json_extract(h.value, '$.aggregate_id') AND q.status = 'pending'
               AND (q.event_version, q.seq)
                   > (json_extract(h.value, '$.event_version'), json_extract(h.value, '$.seq'))
             ORDER BY q.aggregate_id, q.event_version, q.seq LIMIT ?)",
        super::follower_claimable(NOW_US)
    );
    sqlx::query_as::<_, Follower>(&sql)
        .bind(super::now_us())
        .bind(heads)
        .bind(each)
        .fetch_all(tx)
        .await
        .map_err(db("claim"))
}
