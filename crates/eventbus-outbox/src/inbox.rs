//! The inbox: consumer-side idempotency keyed by (event id, handler name),
//! called by hand ([`handle_once_sqlite`], [`handle_once_postgres`]) or as
//! handler middleware ([`InboxLayer`]).

use std::sync::Arc;

use eventbus_core::{BoxError, Envelope, Error, ErrorKind, Result};
use futures::future::BoxFuture;

use crate::store::{Dialect, db, now_us};

/// What [`handle_once_sqlite`] / [`handle_once_postgres`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InboxOutcome {
    /// The handler ran and its work committed with the inbox row.
    Processed,
    /// This handler already processed this event: nothing ran.
    Duplicate,
}

/// Takes a session from `pool`, then begins a transaction on it in a task
/// of its own and waits for that.
///
/// Dropping the caller's future (a handler timeout, a shutdown) then cannot
/// cut the BEGIN off between sending it and reading its answer. sqlx 0.8
/// counts a transaction only once PostgreSQL answered its BEGIN, so a BEGIN
/// cut off there put the session back into the pool inside a transaction
/// nobody would commit or roll back, and the pool's next user (the
/// service's own writes, a relay's marks on a shared pool) wrote into it,
/// unseen by everyone else (transact-rs/sqlx#4393; the fix, #4394, is in
/// no release up to 0.9.0). Here a cut-off caller leaves the task to finish
/// the BEGIN and drop the transaction, which queues a ROLLBACK that the
/// pool sends before handing the session to anyone else.
///
/// The acquire stays in the caller: an unfinished acquire is safe to cut
/// off (it just leaves the pool's queue), and a caller cut off while
/// waiting for a session leaves no task behind to take one later for
/// nobody. The task holds its session until PostgreSQL answers the BEGIN
/// (no bound of its own; sqlx's check of a session given back waits the
/// same way). It runs in the caller's span. SQLite needs none of this
/// (sqlx's SQLite worker rolls back a BEGIN nobody received), but takes
/// the same path.
///
/// The relay's PostgreSQL claim meets the same bug differently (`Session`
/// in `store/postgres.rs`: it holds the session and closes it unless the
/// claim committed, which also covers a failing `SET LOCAL` in its BEGIN);
/// the inbox hands the handler a transaction that owns its session, so it
/// cannot hold the session beside it, and its plain BEGIN cannot fail half
/// done.
///
/// `sqlx::Transaction::begin` is public but hidden from sqlx's docs: it is
/// what `Pool::begin` calls on the session it acquired; a sqlx upgrade
/// that changes it fails to compile here rather than behaving differently.
///
/// # Errors
/// `Backend` when no session comes within the pool's `acquire_timeout`,
/// when the database refuses the BEGIN or the session fails, or when the
/// task ended without an answer (a panic, the runtime shutting down).
async fn begin<DB: sqlx::Database>(pool: &sqlx::Pool<DB>) -> Result<sqlx::Transaction<'static, DB>> {
    use tracing::Instrument as _;
    let session = pool.acquire().await.map_err(db("begin (acquire)"))?;
    tokio::spawn(sqlx::Transaction::begin(session, None).in_current_span())
        .await
        .map_err(|e| Error::backend("outbox database: begin failed (its task ended)", e))?
        .map_err(db("begin"))
}

const INSERT: &str =
    "INSERT INTO inbox_events (event_id, handler, processed_at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING";

macro_rules! handle_once {
    ($(#[$doc:meta])* $name:ident, $db:ty, $pool:ty, $conn:ty) => {
        $(#[$doc])*
        ///
        /// # Errors
        /// [`Handler`](ErrorKind::Handler) with the handler's error (the
        /// transaction rolls back, so a redelivery runs it again), `Backend`
        /// when the database fails.
        pub async fn $name<F>(pool: &$pool, handler: &str, event_id: &str, work: F) -> Result<InboxOutcome>
        where
            F: for<'t> FnOnce(&'t mut $conn) -> BoxFuture<'t, std::result::Result<(), BoxError>>,
        {
            let mut tx = begin(pool).await?;
            if !<$db as InboxDatabase>::claim(&mut tx, handler, event_id).await? {
                return Ok(InboxOutcome::Duplicate);
            }
            work(&mut *tx)
                .await
                .map_err(|e| Error::new(ErrorKind::Handler, format!("handler {handler} failed")).with_source(e))?;
            tx.commit().await.map_err(db("commit"))?;
            Ok(InboxOutcome::Processed)
        }
    };
}

handle_once!(
    /// Runs `work` (the handler's own database writes) and records
    /// (event id, handler) in one SQLite transaction, unless already recorded:
    /// a redelivered event has no second effect.
    handle_once_sqlite,
    sqlx::Sqlite,
    sqlx::SqlitePool,
    sqlx::SqliteConnection
);

handle_once!(
    /// As [`handle_once_sqlite`], on PostgreSQL.
    handle_once_postgres,
    sqlx::Postgres,
    sqlx::PgPool,
    sqlx::PgConnection
);

/// The databases the inbox runs on: SQLite and PostgreSQL (sealed).
pub trait InboxDatabase: sqlx::Database + sealed::Sealed {
    /// Inserts the inbox row (event id, handler) in `tx` unless it exists;
    /// `true` when inserted (the handler has not processed this event).
    #[doc(hidden)]
    fn claim<'t>(
        tx: &'t mut sqlx::Transaction<'static, Self>,
        handler: &'t str,
        event_id: &'t str,
    ) -> BoxFuture<'t, Result<bool>>;

    /// Checks, in `tx`, that the inbox row of (event id, handler) is there:
    /// the transaction a handler hands back must be the one that holds it,
    /// and must not be aborted (PostgreSQL would turn its COMMIT into a
    /// silent ROLLBACK).
    #[doc(hidden)]
    fn confirm<'t>(
        tx: &'t mut sqlx::Transaction<'static, Self>,
        handler: &'t str,
        event_id: &'t str,
    ) -> BoxFuture<'t, Result<()>>;
}

const CONFIRM: &str = "SELECT COUNT(*) FROM inbox_events WHERE event_id = ? AND handler = ?";

mod sealed {
    pub trait Sealed {}
    impl Sealed for sqlx::Sqlite {}
    impl Sealed for sqlx::Postgres {}
}

macro_rules! inbox_database {
    ($db:ty, $dialect:expr) => {
        impl InboxDatabase for $db {
            fn claim<'t>(
                tx: &'t mut sqlx::Transaction<'static, Self>,
                handler: &'t str,
                event_id: &'t str,
            ) -> BoxFuture<'t, Result<bool>> {
                Box::pin(async move {
                    let inserted = sqlx::query(&$dialect.sql(INSERT))
                        .bind(event_id)
                        .bind(handler)
                        .bind(now_us())
                        .execute(&mut **tx)
                        .await
                        .map_err(db("inbox insert"))?
                        .rows_affected();
                    Ok(inserted > 0)
                })
            }

            fn confirm<'t>(
                tx: &'t mut sqlx::Transaction<'static, Self>,
                handler: &'t str,
                event_id: &'t str,
            ) -> BoxFuture<'t, Result<()>> {
                Box::pin(async move {
                    let (rows,): (i64,) = sqlx::query_as(&$dialect.sql(CONFIRM))
                        .bind(event_id)
                        .bind(handler)
                        .fetch_one(&mut **tx)
                        .await
                        .map_err(|e| {
                            Error::new(
                                ErrorKind::Handler,
                                format!(
                                    "handler {handler} handed back a transaction that cannot commit \
                                     (a statement in it failed?): its writes are rolled back"
                                ),
                            )
                            .with_source(e)
                        })?;
                    match rows {
                        1 => Ok(()),
                        _ => Err(Error::new(
                            ErrorKind::Handler,
                            format!(
                                "handler {handler} handed back a transaction without the inbox row of event \
                                 {event_id}: return the request's own transaction"
                            ),
                        )),
                    }
                })
            }
        }
    };
}

inbox_database!(sqlx::Sqlite, Dialect::Sqlite);
inbox_database!(sqlx::Postgres, Dialect::Postgres);

/// What a handler behind [`InboxLayer`] receives: the envelope and the open
/// transaction that already holds its inbox row. The handler makes its
/// writes in `tx` and returns it; the layer commits it.
pub struct InboxRequest<DB: sqlx::Database> {
    /// The event.
    pub envelope: Envelope,
    /// The transaction to write in; hand it back to commit.
    pub tx: sqlx::Transaction<'static, DB>,
}

impl<DB: sqlx::Database> std::fmt::Debug for InboxRequest<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboxRequest")
            .field("envelope", &self.envelope)
            .finish_non_exhaustive()
    }
}

/// The inbox as handler middleware ([`EventBus::subscribe_service`](eventbus_core::EventBus::subscribe_service)):
/// exactly one effect per (event id, handler name), whatever the broker
/// redelivers.
///
/// Each call opens a transaction, inserts the inbox row, and calls the inner
/// service with an [`InboxRequest`]; the inner service writes in the
/// transaction and returns it, and the layer checks the inbox row is in it
/// (a different or aborted transaction is a `Handler` error: nothing
/// commits) and commits. An event this handler
/// already processed is settled without a call (the row exists); an inner
/// error drops the transaction, so the row and the writes roll back together
/// and the retry or redelivery runs again. Effects outside the database are
/// not covered: they run at least once.
///
/// The wrapped service is a `Service<Envelope, Response = (), Error = BoxError>`.
/// Errors: the inner service's, or a `Backend` [`Error`] when the database
/// fails (both are failed attempts: retried, then dead-lettered).
pub struct InboxLayer<DB: sqlx::Database> {
    pool: sqlx::Pool<DB>,
    handler: Arc<str>,
}

impl<DB: sqlx::Database> Clone for InboxLayer<DB> {
    fn clone(&self) -> Self {
        Self {
            pool: self.pool.clone(),
            handler: self.handler.clone(),
        }
    }
}

impl<DB: sqlx::Database> std::fmt::Debug for InboxLayer<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboxLayer")
            .field("handler", &self.handler)
            .finish_non_exhaustive()
    }
}

impl<DB: InboxDatabase> InboxLayer<DB> {
    /// The inbox in the `inbox_events` table of `pool` (SQLite or
    /// PostgreSQL; created by [`OutboxStore::migrate`](crate::OutboxStore::migrate)),
    /// for the handler called `handler`: each handler name has its own
    /// record of what it processed.
    pub fn new(pool: sqlx::Pool<DB>, handler: &str) -> Self {
        Self {
            pool,
            handler: handler.into(),
        }
    }
}

impl<S, DB: sqlx::Database> tower_layer::Layer<S> for InboxLayer<DB> {
    type Service = Inbox<S, DB>;

    fn layer(&self, inner: S) -> Inbox<S, DB> {
        Inbox {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service of [`InboxLayer`].
pub struct Inbox<S, DB: sqlx::Database> {
    inner: S,
    layer: InboxLayer<DB>,
}

impl<S: Clone, DB: sqlx::Database> Clone for Inbox<S, DB> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            layer: self.layer.clone(),
        }
    }
}

impl<S: std::fmt::Debug, DB: sqlx::Database> std::fmt::Debug for Inbox<S, DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox")
            .field("inner", &self.inner)
            .field("handler", &self.layer.handler)
            .finish()
    }
}

impl<S, DB> tower_service::Service<Envelope> for Inbox<S, DB>
where
    DB: InboxDatabase,
    S: tower_service::Service<InboxRequest<DB>, Response = sqlx::Transaction<'static, DB>>
        + Clone
        + Send
        + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = ();
    type Error = BoxError;
    type Future = BoxFuture<'static, std::result::Result<(), BoxError>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::result::Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, envelope: Envelope) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let InboxLayer { pool, handler } = self.layer.clone();
        Box::pin(async move {
            let mut tx = begin(&pool).await?;
            if !DB::claim(&mut tx, &handler, &envelope.event_id).await? {
                tracing::debug!(%handler, event_id = %envelope.event_id, "inbox: already processed, not handled again");
                return Ok(());
            }
            let event_id = envelope.event_id.clone();
            let mut tx = inner
                .call(InboxRequest { envelope, tx })
                .await
                .map_err(Into::into)?;
            DB::confirm(&mut tx, &handler, &event_id).await?;
            tx.commit().await.map_err(db("commit"))?;
            Ok(())
        })
    }
}
