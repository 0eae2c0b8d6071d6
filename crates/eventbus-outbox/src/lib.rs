//! Transactional outbox and inbox for the event bus, on SQLite (embedded,
//! one relay) or PostgreSQL (many relays), through sqlx.
//!
//! - [`append`] writes an event inside the caller's transaction: the
//!   business change and the event commit or roll back together;
//!   [`append_all`] writes several in one statement.
//! - [`Relay`] publishes committed events through any [`EventBus`](eventbus_core::EventBus)
//!   backend, strictly in per-aggregate `event_version` order with at most one
//!   event per aggregate in flight, marks them published when the broker's
//!   ACK arrives, retries with backoff and dead-letters after `backoff.max_attempts`.
//!   On PostgreSQL several relays share the work (`FOR UPDATE SKIP LOCKED`
//!   and a lease that expires when a relay dies) and wake on `NOTIFY`.
//! - [`handle_once_sqlite`] / [`handle_once_postgres`] make a consumer
//!   idempotent: its own writes and the inbox row (event id, handler) commit
//!   together, so a redelivered event has no second effect; [`InboxLayer`]
//!   does the same as handler middleware.
//!
//! The outbox gaps of the original SDK (ORIGIN.md) are closed: rows are
//! claimed (two relays never publish the same row at once), a row is only
//! re-sent after its lease expires, order holds per aggregate, and the event
//! version is the envelope's.

mod append;
mod inbox;
mod relay;
mod store;

pub use append::{OutboxConnection, OutboxEvent, append, append_all};
pub use inbox::{
    Inbox, InboxDatabase, InboxLayer, InboxOutcome, InboxRequest, handle_once_postgres, handle_once_sqlite,
};
pub use relay::{Relay, RelayConfig, RelayStats};
pub use store::{OutboxRow, OutboxStatus, OutboxStore};
