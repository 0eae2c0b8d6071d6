//! The outbox on SQLite: embedded, one relay at a time. A relay runs rounds
//! only while it holds the database's relay lease (table
//! `outbox_relay_lease`), so two processes sharing a file never interleave.

use std::time::Duration;

use async_trait::async_trait;
use eventbus_core::{Error, Result};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};

use super::{Ask, Claimed, Database, Dialect, Follower, Taken, Wakeups, db};

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

    async fn claim(&self, ask: Ask<'_>) -> Result<Taken> {
        let sql = format!(
            "UPDATE outbox_events SET claimed_by = ?, lease_until = {NOW_US} + ? WHERE seq IN ({}) {}",
            super::heads_sql(NOW_US, ""),
            super::RETURNING
        );
        let mut tx = self.begin().await.map_err(db("claim"))?;
        let heads = |after: i64, limit: i64| {
            sqlx::query_as::<_, Claimed>(&sql)
                .bind(ask.claim)
                .bind(ask.lease.as_micros() as i64)
                .bind(super::now_us())
                .bind(after)
                .bind(limit)
        };
        let taken = claim_in_passes!(tx, Dialect::Sqlite, heads_waiting, find_followers,
            heads(after, count) => heads(after, count).fetch_all(&mut *tx).await.map_err(db("claim"))?,
            claim: ask.claim, limit: ask.limit, per_aggregate: ask.per_aggregate, lease: ask.lease, probe_depth: ask.probe_depth);
        tx.commit().await.map_err(db("claim"))?;
        Ok(taken)
    }

    /// Takes or renews the lease: the holder renews it unless it resigned
    /// (`lease_until = 0`, see [`resign`](Database::resign)); another
    /// relay takes it once it has run out or was given up.
    async fn may_run(&self, relay: &str, lease: Duration) -> Result<bool> {
        let sql = format!(
            "INSERT INTO outbox_relay_lease (name, holder, lease_until) VALUES (?, ?, {NOW_US} + ?)
            ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, lease_until = excluded.lease_until
            WHERE (outbox_relay_lease.holder = excluded.holder AND outbox_relay_lease.lease_until <> 0)
               OR (outbox_relay_lease.holder <> excluded.holder AND outbox_relay_lease.lease_until < {NOW_US})"
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

    /// Gives the lease up as run out (`lease_until = 0`), and for `relay`
    /// until it rejoins: a lease statement of its own that the database
    /// runs later (sent before the shutdown, given up by the relay after
    /// its grace) cannot take it back, so the next relay takes it at once
    /// rather than after `lease_ms`.
    async fn resign(&self, relay: &str) -> Result<()> {
        sqlx::query("UPDATE outbox_relay_lease SET lease_until = 0 WHERE name = ? AND holder = ?")
            .bind(RELAY_LEASE)
            .bind(relay)
            .execute(self)
            .await
            .map_err(db("resign lease"))
            .map(drop)
    }

    /// Makes the lease `relay` gave up one of its own that ran out
    /// (`lease_until = 1`), which its `may_run` renews.
    async fn rejoin(&self, relay: &str) -> Result<()> {
        sqlx::query(
            "UPDATE outbox_relay_lease SET lease_until = 1 WHERE name = ? AND holder = ? AND lease_until = 0",
        )
        .bind(RELAY_LEASE)
        .bind(relay)
        .execute(self)
        .await
        .map_err(db("rejoin lease"))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A relay's lease statement that the database runs after the relay
    /// resigned (sent before its shutdown, held behind another writer's
    /// lock past the shutdown grace, given up by the relay but run all the
    /// same) does not take the lease back: the next relay takes it at once
    /// rather than after `lease_ms`. Before, the late statement renewed
    /// the lease of a relay that had stopped.
    #[tokio::test]
    async fn a_lease_statement_run_after_its_relay_resigned_does_not_take_the_lease_back() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("outbox.db").display());
        let pool = connect(&url, 2).await.unwrap();
        pool.migrate().await.unwrap();
        let lease = Duration::from_secs(120);
        assert!(pool.may_run("stopping", lease).await.unwrap());
        assert!(!pool.may_run("next", lease).await.unwrap(), "the lease is held");
        pool.resign("stopping").await.unwrap();
        assert!(
            !pool.may_run("stopping", lease).await.unwrap(),
            "a statement of the stopped relay, run late, took the lease back"
        );
        assert!(
            pool.may_run("next", lease).await.unwrap(),
            "the next relay takes the lease at once"
        );
        assert!(pool.may_run("next", lease).await.unwrap(), "and renews it");
        assert!(!pool.may_run("stopping", lease).await.unwrap());
        pool.resign("next").await.unwrap();
        pool.rejoin("next").await.unwrap();
        assert!(
            pool.may_run("next", lease).await.unwrap(),
            "a relay that runs again takes back the lease it gave up"
        );
        pool.rejoin("stopping").await.unwrap();
        assert!(
            !pool.may_run("stopping", lease).await.unwrap(),
            "rejoining takes no lease another relay holds"
        );
    }

    /// A relay whose lease ran out while nobody took it over (it was
    /// frozen) takes it again on waking.
    #[tokio::test]
    async fn a_relay_takes_its_own_lapsed_lease_again() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("outbox.db").display());
        let pool = connect(&url, 2).await.unwrap();
        pool.migrate().await.unwrap();
        assert!(pool.may_run("frozen", Duration::from_millis(1)).await.unwrap());
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(pool.may_run("frozen", Duration::from_secs(120)).await.unwrap());
        assert!(!pool.may_run("other", Duration::from_secs(120)).await.unwrap());
    }
}
