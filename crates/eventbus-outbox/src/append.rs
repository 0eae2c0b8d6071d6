//! Appending events inside the caller's own transaction.

use eventbus_core::{Envelope, Error, ErrorKind, Result, validate_topic};

use crate::store::{Dialect, db, now_us};

const INSERT: &str = "INSERT INTO outbox_events
    (id, tenant_id, aggregate_type, aggregate_id, event_type, event_version, topic, envelope,
     trace_id, correlation_id, status, attempts, next_attempt_at, created_at, idempotency_key)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', 0, ?, ?, ?)
    ON CONFLICT DO NOTHING";

/// An event to append: the envelope, where it goes, and its aggregate's type.
#[derive(Debug, Clone)]
pub struct OutboxEvent<'a> {
    /// Destination topic.
    pub topic: &'a str,
    /// The envelope, published as is (its event id is the broker's dedup id).
    pub envelope: &'a Envelope,
    /// The aggregate's type, e.g. `Order`.
    pub aggregate_type: &'a str,
    /// Deduplicates appends of one business operation; default the event id.
    pub idempotency_key: Option<&'a str>,
    /// How the stored (and so published) JSON writes `tenant_id`; default
    /// an integer. See [`TenantIdFormat`](eventbus_core::TenantIdFormat).
    pub tenant_id_format: eventbus_core::TenantIdFormat,
}

impl<'a> OutboxEvent<'a> {
    /// An event for `topic` with the event id as idempotency key.
    pub fn new(topic: &'a str, envelope: &'a Envelope, aggregate_type: &'a str) -> Self {
        Self {
            topic,
            envelope,
            aggregate_type,
            idempotency_key: None,
            tenant_id_format: eventbus_core::TenantIdFormat::Integer,
        }
    }
}

/// Appends `event` through `conn`, normally `&mut *tx` of the caller's own
/// transaction, so the business change and the outbox row commit or roll
/// back together. Returns false when a row with the same event id or
/// idempotency key already exists (nothing is written).
///
/// ```no_run
/// # async fn demo(pool: sqlx::SqlitePool, order_id: &str) -> eventbus_core::Result<()> {
/// use eventbus_core::Envelope;
/// use eventbus_outbox::{OutboxEvent, append};
/// let mut tx = pool.begin().await.unwrap();
/// sqlx::query("INSERT INTO orders (id, total) VALUES (?, ?)")
///     .bind(order_id).bind(1990).execute(&mut *tx).await.unwrap();
/// let event = Envelope::builder(order_id, "OrderPlaced", 1).json_payload(&1990)?.build()?;
/// append(&mut *tx, OutboxEvent::new("orders", &event, "Order")).await?;
/// tx.commit().await.unwrap(); // both rows, or neither
/// # Ok(()) }
/// ```
///
/// # Errors
/// [`Validation`](ErrorKind::Validation) for an invalid envelope or topic
/// (nothing is written), `Backend` when the database fails.
pub async fn append<C: OutboxConnection>(conn: &mut C, event: OutboxEvent<'_>) -> Result<bool> {
    validate_topic(event.topic)?;
    let json = event.envelope.encode_with(event.tenant_id_format)?;
    let json = String::from_utf8(json.to_vec())
        .map_err(|e| Error::new(ErrorKind::Serialization, "envelope").with_source(e))?;
    conn.insert(&event, json).await
}

/// A database connection [`append`] writes through: implemented for
/// `SqliteConnection` and `PgConnection` (pass `&mut *tx` of a transaction).
pub trait OutboxConnection: Send {
    /// Inserts one outbox row; true when inserted.
    fn insert(&mut self, event: &OutboxEvent<'_>, json: String) -> impl Future<Output = Result<bool>> + Send;
}

mod connections {
    use super::*;

    macro_rules! outbox_connection {
        ($conn:ty, $dialect:expr) => {
            impl OutboxConnection for $conn {
                async fn insert(&mut self, event: &OutboxEvent<'_>, json: String) -> Result<bool> {
                    let e = event.envelope;
                    let now = now_us();
                    let done = sqlx::query(&$dialect.sql(INSERT))
                        .bind(&e.event_id)
                        .bind(e.tenant_id)
                        .bind(event.aggregate_type)
                        .bind(&e.aggregate_id)
                        .bind(&e.event_type)
                        .bind(e.event_version)
                        .bind(event.topic)
                        .bind(json)
                        .bind(&e.trace_id)
                        .bind(&e.correlation_id)
                        .bind(now)
                        .bind(now)
                        .bind(event.idempotency_key.unwrap_or(&e.event_id))
                        .execute(&mut *self)
                        .await
                        .map_err(db("append"))?;
                    Ok(done.rows_affected() == 1)
                }
            }
        };
    }

    outbox_connection!(sqlx::SqliteConnection, Dialect::Sqlite);
    outbox_connection!(sqlx::PgConnection, Dialect::Postgres);
}
