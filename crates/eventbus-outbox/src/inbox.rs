//! The inbox: consumer-side idempotency keyed by (event id, handler name).

use eventbus_core::{BoxError, Error, ErrorKind, Result};
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

const INSERT: &str =
    "INSERT INTO inbox_events (event_id, handler, processed_at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING";

macro_rules! handle_once {
    ($(#[$doc:meta])* $name:ident, $pool:ty, $conn:ty, $dialect:expr) => {
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
            let mut tx = pool.begin().await.map_err(db("begin"))?;
            let inserted = sqlx::query(&$dialect.sql(INSERT))
                .bind(event_id)
                .bind(handler)
                .bind(now_us())
                .execute(&mut *tx)
                .await
                .map_err(db("inbox insert"))?
                .rows_affected();
            if inserted == 0 {
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
    sqlx::SqlitePool,
    sqlx::SqliteConnection,
    Dialect::Sqlite
);

handle_once!(
    /// As [`handle_once_sqlite`], on PostgreSQL.
    handle_once_postgres,
    sqlx::PgPool,
    sqlx::PgConnection,
    Dialect::Postgres
);
