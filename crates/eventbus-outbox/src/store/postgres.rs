//! The outbox on PostgreSQL: many relays share the work. Claims lock head
//! rows with `FOR UPDATE SKIP LOCKED` (rows another relay is claiming are
//! left to it) and re-check status and lease on the locked row; relays wake
//! on `NOTIFY outbox_events` (sent by the insert trigger) besides polling.

use std::time::Duration;

use async_trait::async_trait;
use eventbus_core::{Error, Result};
use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};

use super::{Ask, Claimed, Database, Dialect, Follower, Taken, db};

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

    async fn claim(&self, ask: Ask<'_>) -> Result<Taken> {
        // The lock is taken inside the limited scan: rows another relay is
        // claiming are skipped and the LIMIT fills with later heads, so
        // concurrent relays take disjoint sets instead of colliding on the
        // same oldest heads. A row claimed and committed meanwhile fails the
        // re-check of status and lease on its newest version. The scan is a
        // materialized CTE, run once: as a `seq IN (...)` subquery the
        // planner may run it again per outer row, and each run locks and
        // returns more rows (a claim of 1 took 4).
        //
        // Two parts are written so that the plan holds whatever the
        // statistics say. A table analyzed while nothing was pending (idle
        // after every row was published) has PostgreSQL estimate 1 pending
        // row; then a burst of 50,000 pending rows was claimed by scanning
        // every pending row per candidate and per claimed row (25 million
        // rows filtered, 14 s per claim of 500: the outbox bench fell from
        // 15,000 to 640 events/s). So:
        // - the probe for an earlier pending row of the aggregate ends in
        //   `ORDER BY` the key of `outbox_events_pending_heads` and
        //   `OFFSET 0`: the OFFSET keeps it a per-row subquery (an EXISTS
        //   with one is not turned into a join), and the ORDER BY, with
        //   sorts off, leaves that index as its only cheap path: one index
        //   probe per candidate;
        // - the update finds the picked rows by primary key (`seq = ANY`),
        //   and re-checks status as `(status = 'pending') IS TRUE`, which no
        //   status index can serve, so the planner cannot prefer scanning
        //   the pending rows it believes to be one.
        let sql = format!(
            "WITH picked AS MATERIALIZED ({} FOR UPDATE OF o SKIP LOCKED)
             UPDATE outbox_events t SET claimed_by = ?, lease_until = {NOW_US} + ?
             WHERE t.seq = ANY (ARRAY(SELECT seq FROM picked)) AND (t.status = 'pending') IS TRUE
               AND (t.lease_until IS NULL OR t.lease_until < {NOW_US}) {}",
            super::heads_sql(NOW_US, "ORDER BY p.aggregate_id, p.event_version, p.seq OFFSET 0"),
            super::RETURNING
        );
        let sql = Dialect::Postgres.sql(&sql);
        let mut session = Session(Some(self.acquire().await.map_err(db("claim"))?));
        let conn = session.0.as_mut().expect("held until the commit");
        let mut tx = sqlx::Connection::begin_with(&mut **conn, BEGIN_PINNED)
            .await
            .map_err(db("claim"))?;
        let heads = |after: i64, limit: i64| {
            sqlx::query_as::<_, Claimed>(&sql)
                .bind(super::now_us())
                .bind(after)
                .bind(limit)
                .bind(ask.claim)
                .bind(ask.lease.as_micros() as i64)
        };
        let taken = claim_in_passes!(tx, Dialect::Postgres, heads_waiting, find_followers,
            heads(after, count) => heads(after, count).fetch_all(&mut *tx).await.map_err(db("claim"))?,
            claim: ask.claim, limit: ask.limit, per_aggregate: ask.per_aggregate, lease: ask.lease, probe_depth: ask.probe_depth);
        tx.commit().await.map_err(db("claim"))?;
        session.release();
        Ok(taken)
    }

    async fn may_run(&self, _relay: &str, _lease: Duration) -> Result<bool> {
        Ok(true)
    }

    async fn resign(&self, _relay: &str) -> Result<()> {
        Ok(())
    }

    async fn rejoin(&self, _relay: &str) -> Result<()> {
        Ok(())
    }

    fn wakeups(&self) -> Option<Wakeups> {
        Some(Wakeups::new(self.clone()))
    }
}

/// The channel the insert trigger notifies (migration 0001).
const CHANNEL: &str = "outbox_events";
/// The most a LISTEN setup (a session from the pool, then the statement) may take.
const LISTEN_SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// The wait before setting LISTEN up again after a failed setup or a lost
/// session; it doubles with each one in a row...
const FIRST_RETRY: Duration = Duration::from_millis(100);
/// ... up to this; a session that lasted this long starts the count again.
const LAST_RETRY: Duration = Duration::from_secs(5);

/// A LISTEN setup under way (kept across the relay's polls, which drop
/// [`Wakeups::next`] whenever they come first).
type Setup = futures::future::BoxFuture<'static, Result<PgListener>>;

/// "Rows were inserted" notices (`LISTEN outbox_events`; the insert
/// trigger sends `NOTIFY`), kept up across lost sessions: after a session
/// the server ended, or a server restarted or unreachable for a while, the
/// relay sets LISTEN up again on a session of its own, 100 ms after the
/// loss, then twice as long after each failure in a row, at most 5 s
/// apart, each try bounded by 10 s; it polls meanwhile
/// (`poll_interval_ms`). Before, the first failed reconnect of sqlx's
/// listener (a refused session; a database down longer than the pool's
/// connect retries) ended the notices for good, and the relay only polled.
pub(crate) struct Wakeups {
    pool: PgPool,
    listener: Option<PgListener>,
    /// When `listener` was set up.
    listening_since: tokio::time::Instant,
    setup: Option<Setup>,
    /// A session was lost or a setup failed since the last setup: rows may
    /// have been inserted unheard, so the next setup wakes the relay.
    missed: bool,
    /// When the next setup may start, after a failure or a loss.
    retry_at: Option<tokio::time::Instant>,
    /// The wait after the next failure or loss.
    backoff: Duration,
}

/// A LISTEN session of its own from `pool`, at most 10 s. A lost session
/// comes back through [`Wakeups::listen`], bounded and with backoff,
/// rather than through sqlx's reconnect (`eager_reconnect(false)`).
async fn set_up(pool: PgPool) -> Result<PgListener> {
    let setup = async {
        let mut listener = PgListener::connect_with(&pool).await?;
        listener.eager_reconnect(false);
        listener.listen(CHANNEL).await?;
        Ok(listener)
    };
    match tokio::time::timeout(LISTEN_SETUP_TIMEOUT, setup).await {
        Ok(set_up) => set_up.map_err(db("listen")),
        Err(_) => Err(Error::timeout(format!(
            "outbox LISTEN setup took more than {} s",
            LISTEN_SETUP_TIMEOUT.as_secs()
        ))),
    }
}

impl Wakeups {
    fn new(pool: PgPool) -> Self {
        Self {
            pool,
            listener: None,
            listening_since: tokio::time::Instant::now(),
            setup: None,
            missed: false,
            retry_at: None,
            backoff: FIRST_RETRY,
        }
    }

    /// Sets up LISTEN unless it is up: no sooner than the wait after a
    /// failure or a loss (at most 5 s), then at most 10 s for the session
    /// and the statement. Cancel-safe: a setup under way is kept for the
    /// next call.
    ///
    /// # Errors
    /// `Backend` when the session or the statement fails, `Timeout` after 10 s.
    pub(crate) async fn listen(&mut self) -> Result<()> {
        if self.listener.is_some() {
            return Ok(());
        }
        if self.setup.is_none()
            && let Some(at) = self.retry_at
        {
            tokio::time::sleep_until(at).await;
        }
        let pool = self.pool.clone();
        let setup = self.setup.get_or_insert_with(|| Box::pin(set_up(pool)));
        let set_up = setup.await;
        self.setup = None;
        match set_up {
            Ok(listener) => {
                self.listener = Some(listener);
                self.listening_since = tokio::time::Instant::now();
                self.retry_at = None;
                Ok(())
            }
            Err(e) => {
                self.wait_before_next_setup();
                Err(e)
            }
        }
    }

    /// After a failed setup or a lost session: the next setup waits the
    /// backoff, which doubles (from 100 ms again when the session lost had
    /// lasted 5 s).
    fn wait_before_next_setup(&mut self) {
        self.missed = true;
        self.retry_at = Some(tokio::time::Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(LAST_RETRY);
    }

    /// Waits for the next notice, or, after a lost session, until LISTEN
    /// is set up again (rows may have come unheard meanwhile). Failures
    /// are logged and retried, so it returns only then. Cancel-safe.
    pub(crate) async fn next(&mut self) {
        loop {
            let Some(listener) = self.listener.as_mut() else {
                match self.listen().await {
                    Ok(()) if std::mem::take(&mut self.missed) => return,
                    Ok(()) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "outbox LISTEN setup failed: retrying, the relay polls meanwhile");
                    }
                }
                continue;
            };
            let lost = match listener.try_recv().await {
                Ok(Some(_)) => return,
                // The session ended (no reconnect: `eager_reconnect(false)`).
                Ok(None) => "the session ended".to_owned(),
                Err(e) => e.to_string(),
            };
            tracing::warn!(error = %lost, "outbox LISTEN session lost: setting it up again");
            self.listener = None;
            if self.listening_since.elapsed() >= LAST_RETRY {
                self.backoff = FIRST_RETRY;
            }
            self.wait_before_next_setup();
        }
    }
}

/// Which of `heads` (JSON, oldest first) have a pending row after them:
/// the seqs of the oldest `room` that do, one index probe of
/// `outbox_events_pending_heads` each. The probe ends in that index's key
/// and `OFFSET 0`, as in the heads claim: without it PostgreSQL made the
/// EXISTS a semi join, and on statistics taken with nothing pending it
/// compared each head with every pending row in seq order (300 heads at
/// their last version among 50,000 pending rows: 15 million rows filtered,
/// 1.5 s; with it, about 1 ms).
async fn heads_waiting(tx: &mut sqlx::PgConnection, heads: String, room: usize) -> Result<Vec<i64>> {
    let sql = "SELECT j.seq FROM jsonb_to_recordset(?::jsonb) AS j(aggregate_id TEXT, event_version BIGINT, seq BIGINT)
         WHERE EXISTS (SELECT 1 FROM outbox_events q
             WHERE q.aggregate_id = j.aggregate_id AND q.status = 'pending'
               AND (q.event_version, q.seq) > (j.event_version, j.seq)
             ORDER BY q.aggregate_id, q.event_version, q.seq OFFSET 0)
         LIMIT ?";
    sqlx::query_scalar::<_, i64>(&Dialect::Postgres.sql(sql))
        .bind(heads)
        .bind(i64::try_from(room).unwrap_or(i64::MAX))
        .fetch_all(tx)
        .await
        .map_err(db("claim"))
}

/// The follower probe: the next `each` pending rows after each of `heads`
/// (JSON), one index range of `outbox_events_pending_heads` per head (the
/// ORDER BY is that index's key, and sorts are off), stopped at the limit.
async fn find_followers(tx: &mut sqlx::PgConnection, heads: String, each: i64) -> Result<Vec<Follower>> {
    let sql = format!(
        "SELECT x.seq, h.aggregate_id, x.event_version, x.claimable
         FROM jsonb_to_recordset(?::jsonb) AS h(aggregate_id TEXT, event_version BIGINT, seq BIGINT)
         CROSS JOIN LATERAL (
             SELECT p.seq, p.event_version, {} AS claimable FROM outbox_events p
             WHERE p.aggregate_id = h.aggregate_id AND p.status = 'pending'
               AND (p.event_version, p.seq) > (h.event_version, h.seq)
             ORDER BY p.aggregate_id, p.event_version, p.seq LIMIT ?) x",
        super::follower_claimable(NOW_US)
    );
    sqlx::query_as::<_, Follower>(&Dialect::Postgres.sql(&sql))
        .bind(heads)
        .bind(super::now_us())
        .bind(each)
        .fetch_all(tx)
        .await
        .map_err(db("claim"))
}

/// A claim's pooled session: closed, not given back to the pool, unless
/// the claim committed ([`release`](Session::release)). sqlx 0.8.6 gives a
/// session back still inside a transaction when the claim stops before
/// its BEGIN's answer (cut off by `lease_ms` or the shutdown grace, or one
/// of [`BEGIN_PINNED`]'s settings failing): its ROLLBACK guard counts the
/// transaction only once that answer is read, and the pool's check on
/// release does not look at the session's transaction status
/// (transact-rs/sqlx#4393, fixed after 0.9.0 by #4394). The next user of
/// that session (a mark, a renewal) would then write inside a transaction
/// nobody commits.
struct Session(Option<sqlx::pool::PoolConnection<sqlx::Postgres>>);

impl Session {
    /// The claim committed: the session goes back to the pool.
    fn release(mut self) {
        drop(self.0.take());
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(conn) = self.0.as_mut() {
            conn.close_on_drop();
        }
    }
}

/// Begins a claim's transaction with its plans pinned to the ones that
/// stop early (the settings are local to it), in one round trip (a simple
/// query of several statements; before, the settings were a statement of
/// their own). The claim walks the pending rows by seq (partial index),
/// probes each for an earlier pending row of its aggregate and stops at
/// the limit; the follower probes read one index probe or range per head.
/// On stale statistics (the table analyzed while few rows were pending: a
/// relay catching up after an outage) the planner otherwise probes every
/// pending row and sorts them: a claim of 500 rows took 131 ms instead of
/// 6 on 50,000 pending rows.
const BEGIN_PINNED: &str = "BEGIN; SET LOCAL enable_sort = off; SET LOCAL enable_bitmapscan = off; \
     SET LOCAL enable_seqscan = off; SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off";
