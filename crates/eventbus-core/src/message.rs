//! Raw messages as they cross a broker, deliveries and their acknowledgement.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::Result;
use crate::headers::Headers;

/// A message as sent to or received from a broker.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Message {
    /// The topic (Kafka topic; mapped to a NATS subject).
    pub topic: String,
    /// The record key. Envelope publishes set it to the aggregate id, so Kafka
    /// keeps one aggregate's events in one partition.
    pub key: Option<Bytes>,
    /// Broker headers.
    pub headers: Headers,
    /// The body. For envelope publishes, the envelope's JSON.
    pub payload: Bytes,
}

impl Message {
    /// A message with no key or headers.
    pub fn new(topic: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Self {
            topic: topic.into(),
            payload: payload.into(),
            ..Self::default()
        }
    }

    /// Sets the record key.
    #[must_use]
    pub fn with_key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Adds a header.
    #[must_use]
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name, value);
        self
    }
}

/// Where a broker stored a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Position {
    /// A stream sequence number (NATS JetStream, memory backend).
    Sequence(u64),
    /// A Kafka partition and offset.
    Offset {
        /// The partition.
        partition: i32,
        /// The offset within the partition.
        offset: i64,
    },
}

/// What a broker answered for an accepted publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ack {
    /// Where the message was stored, where the broker tells.
    pub position: Option<Position>,
    /// The broker recognised the message id as already stored (NATS
    /// `Nats-Msg-Id` dedup window) and did not store it again.
    pub duplicate: bool,
}

/// Settles one delivery with its backend. Implemented by each backend.
///
/// The bus calls exactly one of [`ack`](Acker::ack) or [`term`](Acker::term)
/// once the handler succeeded or the failure path finished, or neither when
/// the subscription closed first (the backend then redelivers).
#[async_trait]
pub trait Acker: Send + Sync + 'static {
    /// The message is done; it must not be delivered again to this group.
    async fn ack(&self) -> Result<()>;

    /// The message was dead-lettered and must never be redelivered
    /// (NATS `+TERM`). Defaults to [`ack`](Acker::ack).
    async fn term(&self) -> Result<()> {
        self.ack().await
    }

    /// The handler is still working: extend the redelivery deadline (NATS `+WPI`).
    async fn in_progress(&self) -> Result<()> {
        Ok(())
    }

    /// How often the bus should call [`in_progress`](Acker::in_progress) while
    /// a handler runs; `None` when the backend has no redelivery deadline.
    fn in_progress_interval(&self) -> Option<Duration> {
        None
    }
}

/// One received message, with the handle that acknowledges it.
pub struct Delivery {
    /// The message.
    pub message: Message,
    /// Where the broker stored it.
    pub position: Option<Position>,
    /// How many times it has been delivered, counting this one (1 = first).
    pub delivery_count: u64,
    /// Settles the delivery.
    pub acker: Box<dyn Acker>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("message", &self.message)
            .field("position", &self.position)
            .field("delivery_count", &self.delivery_count)
            .finish_non_exhaustive()
    }
}
