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
/// (nothing is written), `Serialization` when the envelope cannot be
/// encoded, `Backend` when the database fails.
pub async fn append<C: OutboxConnection>(conn: &mut C, event: OutboxEvent<'_>) -> Result<bool> {
    validate_topic(event.topic)?;
    let json = event.envelope.encode_with(event.tenant_id_format)?;
    let json = String::from_utf8(json.to_vec())
        .map_err(|e| Error::new(ErrorKind::Serialization, "envelope").with_source(e))?;
    conn.insert(&event, json).await
}

/// Appends `events` through `conn` (normally `&mut *tx` of the caller's own
/// transaction, as for [`append`]) in one statement, so one round trip to
/// the database whatever their count; rows take their `seq` in the order
/// of `events`. Returns, for each event in order, whether it was written:
/// false when a row with its event id or idempotency key already existed,
/// or came earlier in `events`.
///
/// Every event is checked first: one invalid envelope or topic writes
/// nothing. The events travel as one JSON parameter, held in memory:
/// PostgreSQL refuses one above 256 MiB (its `jsonb` limit), SQLite one
/// above 1 GB (`SQLITE_MAX_LENGTH`); split larger batches.
///
/// # Errors
/// [`Validation`](ErrorKind::Validation) for an invalid envelope or topic
/// (nothing is written), `Serialization` when an envelope cannot be
/// encoded, `Backend` when the database fails (on PostgreSQL the caller's
/// transaction is then aborted, as after any failed statement).
pub async fn append_all<C: OutboxConnection>(conn: &mut C, events: &[OutboxEvent<'_>]) -> Result<Vec<bool>> {
    let mut rows = Vec::with_capacity(events.len());
    for event in events {
        validate_topic(event.topic)?;
        let json = event.envelope.encode_with(event.tenant_id_format)?;
        let json = String::from_utf8(json.to_vec())
            .map_err(|e| Error::new(ErrorKind::Serialization, "envelope").with_source(e))?;
        rows.push(json);
    }
    if events.is_empty() {
        return Ok(Vec::new());
    }
    conn.insert_all(events, rows).await
}

/// A database connection [`append`] and [`append_all`] write through:
/// implemented for `SqliteConnection` and `PgConnection` (pass `&mut *tx`
/// of a transaction).
pub trait OutboxConnection: Send {
    /// Inserts one outbox row (`json`: the envelope as stored); true when inserted.
    fn insert(&mut self, event: &OutboxEvent<'_>, json: String) -> impl Future<Output = Result<bool>> + Send;

    /// Inserts `events` (`json[i]`: event `i`'s envelope as stored) in
    /// their order; one flag per event (`events.len()` of them), true when
    /// inserted. SQLite and PostgreSQL insert them in one statement; the
    /// default, one [`insert`](Self::insert) after another.
    fn insert_all(
        &mut self,
        events: &[OutboxEvent<'_>],
        json: Vec<String>,
    ) -> impl Future<Output = Result<Vec<bool>>> + Send {
        async move {
            let mut inserted = Vec::with_capacity(events.len());
            for (event, json) in events.iter().zip(json) {
                inserted.push(self.insert(event, json).await?);
            }
            Ok(inserted)
        }
    }
}

/// One row of [`append_all`]'s statement, in its JSON array parameter.
#[derive(serde::Serialize)]
struct Row<'a> {
    id: &'a str,
    tenant_id: Option<i64>,
    aggregate_type: &'a str,
    aggregate_id: &'a str,
    event_type: &'a str,
    event_version: i64,
    topic: &'a str,
    envelope: &'a str,
    trace_id: Option<&'a str>,
    correlation_id: Option<&'a str>,
    idempotency_key: &'a str,
}

/// [`append_all`]'s statement: the rows of one JSON array parameter in
/// array order (bind the creation time twice, then the array), returning
/// the event id and idempotency key of each row inserted. SQLite wants a
/// `WHERE` before an upsert's `ON CONFLICT` in `INSERT ... SELECT` (its
/// parser would read it as a join).
fn insert_all_sql(dialect: Dialect) -> String {
    let (rows, field, int, order) = match dialect {
        Dialect::Sqlite => ("json_each(?) e", "json_extract(e.value, '$.{}')", "{}", "e.key"),
        Dialect::Postgres => (
            "jsonb_array_elements(?::jsonb) WITH ORDINALITY AS e(value, n)",
            "e.value->>'{}'",
            "({})::BIGINT",
            "e.n",
        ),
    };
    let text = |name: &str| field.replace("{}", name);
    let integer = |name: &str| int.replace("{}", &text(name));
    dialect.sql(&format!(
        "INSERT INTO outbox_events
            (id, tenant_id, aggregate_type, aggregate_id, event_type, event_version, topic, envelope,
             trace_id, correlation_id, status, attempts, next_attempt_at, created_at, idempotency_key)
         SELECT {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, 'pending', 0, ?, ?, {}
         FROM {rows} WHERE true ORDER BY {order}
         ON CONFLICT DO NOTHING RETURNING id, idempotency_key",
        text("id"),
        integer("tenant_id"),
        text("aggregate_type"),
        text("aggregate_id"),
        text("event_type"),
        integer("event_version"),
        text("topic"),
        text("envelope"),
        text("trace_id"),
        text("correlation_id"),
        text("idempotency_key"),
    ))
}

/// For each of `events`, whether its (event id, idempotency key) is among
/// `inserted`: both are unique in the table, so of several events with
/// the same pair only the first can have been written.
fn which_inserted(events: &[OutboxEvent<'_>], inserted: Vec<(String, String)>) -> Vec<bool> {
    let mut inserted: std::collections::HashSet<(String, String)> = inserted.into_iter().collect();
    events
        .iter()
        .map(|e| {
            let id = &e.envelope.event_id;
            let key = (id.clone(), e.idempotency_key.unwrap_or(id).to_owned());
            inserted.remove(&key)
        })
        .collect()
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

                async fn insert_all(
                    &mut self,
                    events: &[OutboxEvent<'_>],
                    json: Vec<String>,
                ) -> Result<Vec<bool>> {
                    let rows: Vec<Row<'_>> = events
                        .iter()
                        .zip(&json)
                        .map(|(event, json)| {
                            let e = event.envelope;
                            Row {
                                id: &e.event_id,
                                tenant_id: e.tenant_id,
                                aggregate_type: event.aggregate_type,
                                aggregate_id: &e.aggregate_id,
                                event_type: &e.event_type,
                                event_version: e.event_version,
                                topic: event.topic,
                                envelope: json,
                                trace_id: e.trace_id.as_deref(),
                                correlation_id: e.correlation_id.as_deref(),
                                idempotency_key: event.idempotency_key.unwrap_or(&e.event_id),
                            }
                        })
                        .collect();
                    let rows = serde_json::to_string(&rows)
                        .map_err(|e| Error::new(ErrorKind::Serialization, "outbox rows").with_source(e))?;
                    let now = now_us();
                    let inserted: Vec<(String, String)> = sqlx::query_as(&insert_all_sql($dialect))
                        .bind(now)
                        .bind(now)
                        .bind(rows)
                        .fetch_all(&mut *self)
                        .await
                        .map_err(db("append"))?;
                    Ok(which_inserted(events, inserted))
                }
            }
        };
    }

    outbox_connection!(sqlx::SqliteConnection, Dialect::Sqlite);
    outbox_connection!(sqlx::PgConnection, Dialect::Postgres);
}
