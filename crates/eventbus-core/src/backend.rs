//! The [`Backend`] trait each broker crate implements. Users never call it:
//! they drive every backend through [`EventBus`](crate::EventBus).

use async_trait::async_trait;
use futures::future::BoxFuture;
use futures::stream::BoxStream;

use crate::error::Result;
use crate::health::ConnectionState;
use crate::message::{Ack, Delivery, Message, Position};

/// The second stage of a publish: resolves when the broker acknowledges.
pub type AckFuture = BoxFuture<'static, Result<Ack>>;

/// What a subscription asks of a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeSpec {
    /// The topic to consume.
    pub topic: String,
    /// The consumer group: each group gets every message, the members of one
    /// group share them.
    pub group: String,
}

/// A broker, as the bus sees it.
///
/// Contract:
/// - [`publish`](Backend::publish) returns once the broker client has
///   accepted the message, without spawning a task per message; the returned
///   future resolves with the broker's ACK.
/// - A message published with an `X-Event-ID` header is deduplicated by the
///   broker where it can (NATS `Nats-Msg-Id`).
/// - Deliveries of one subscription come from one ordered source, so the
///   bus's fetch loop sees each partition or stream in broker order.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Short name for health and metrics: `memory`, `nats`, `kafka`.
    fn name(&self) -> &'static str;

    /// The publish window this backend works best with: publishes accepted
    /// and not yet acknowledged (count), used when `publish.max_in_flight`
    /// is not set. The default, 4,096, suits brokers that acknowledge
    /// within milliseconds; a larger one trades memory and end-to-end
    /// latency for throughput where acknowledgements are slow. A publish
    /// can wait about window ÷ throughput for its ACK, so
    /// `publish.ack_timeout_ms` (default 30,000) should exceed that on a
    /// slow broker. 0 counts as 1.
    fn publish_window(&self) -> usize {
        4_096
    }

    /// Hands `message` to the broker client.
    ///
    /// # Errors
    /// [`Backend`](crate::ErrorKind::Backend) or
    /// [`Connection`](crate::ErrorKind::Connection) when the client refuses it,
    /// [`Closed`](crate::ErrorKind::Closed) after [`close`](Backend::close).
    async fn publish(&self, message: Message) -> Result<AckFuture>;

    /// Joins `spec.group` on `spec.topic`.
    ///
    /// # Errors
    /// [`NotFound`](crate::ErrorKind::NotFound) when the topic or stream is
    /// missing and may not be created, or a client error.
    async fn subscribe(&self, spec: &SubscribeSpec) -> Result<Box<dyn BackendSubscription>>;

    /// Checks, at subscribe time, that messages to `topic` can be stored
    /// (used for dead-letter topics): a NATS subject that no stream covers or
    /// a Kafka topic that is missing while auto-create is off is an error
    /// naming what to create. The default accepts every topic.
    ///
    /// # Errors
    /// [`NotFound`](crate::ErrorKind::NotFound) naming the missing stream
    /// subject or topic; [`Validation`](crate::ErrorKind::Validation) for a
    /// name the broker refuses.
    async fn check_publishable(&self, topic: &str) -> Result<()> {
        let _ = topic;
        Ok(())
    }

    /// Reads `topic` from its oldest stored message, without a consumer
    /// group: nothing is acked and no group's position moves (JMS calls this
    /// browsing). For operators' tools: tail a topic, list dead letters.
    ///
    /// The stream yields every stored message of the topic with its
    /// position, in broker order within each partition (Kafka), subject
    /// (partitioned NATS topic) or log (memory), then waits for new ones; it
    /// never ends by itself while the broker is up, so readers stop it by
    /// dropping it (for example when nothing arrived for a while). Dropping
    /// it removes what it created on the broker (an ordered ephemeral NATS
    /// consumer; Kafka reads by assignment, with no group and no commit).
    ///
    /// # Errors
    /// [`Unsupported`](crate::ErrorKind::Unsupported) by default;
    /// [`NotFound`](crate::ErrorKind::NotFound) when the broker answers that
    /// nothing stores the topic (never for a failed request; the memory
    /// backend has every topic); a client error. An item is an error when
    /// the broker failed mid-read.
    async fn browse(&self, topic: &str) -> Result<BoxStream<'static, Result<BrowsedMessage>>> {
        Err(crate::Error::new(
            crate::ErrorKind::Unsupported,
            format!("the {} backend cannot browse topic {topic}", self.name()),
        ))
    }

    /// The backlog of consumer group `group` on `topic`, per partition (per
    /// consumer on NATS), measured from outside the group: nothing is
    /// joined, fetched or acked. For operators (`eventbus lag`) and
    /// autoscalers that are not members.
    ///
    /// # Errors
    /// [`Unsupported`](crate::ErrorKind::Unsupported) by default;
    /// [`NotFound`](crate::ErrorKind::NotFound) when the topic is missing;
    /// a client error.
    async fn group_lag(&self, topic: &str, group: &str) -> Result<Vec<PartitionLag>> {
        let _ = group;
        Err(crate::Error::new(
            crate::ErrorKind::Unsupported,
            format!(
                "the {} backend cannot measure a group's lag on {topic}",
                self.name()
            ),
        ))
    }

    /// The connection's state.
    fn connection_state(&self) -> ConnectionState;

    /// Flushes and closes the client. Called once, after every subscription
    /// closed and every publish got its result.
    async fn close(&self) -> Result<()>;
}

/// A message read by [`Backend::browse`], with where the broker stored it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrowsedMessage {
    /// The message (NATS: no record key; the envelope holds the aggregate id).
    pub message: Message,
    /// Its partition and offset, or stream sequence.
    pub position: Position,
}

/// A consumer group's backlog on one partition, from [`Backend::group_lag`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionLag {
    /// The partition; `None` for an unpartitioned NATS topic.
    pub partition: Option<u32>,
    /// What the broker calls the measured thing: the Kafka group id, the
    /// NATS durable consumer, the memory group.
    pub consumer: String,
    /// Messages stored that the group has not settled (count), delivered
    /// and unsettled included. Kafka: high watermark minus committed
    /// offset (wrong on tansu, whose log-end offsets are wrong).
    pub pending: u64,
    /// When the oldest unsettled message was stored or published, where
    /// the backend can tell cheaply (NATS: the stream's time of the message
    /// after the ack floor, for a topic with a stream of its own; memory:
    /// the envelope's `X-Timestamp`); `None` when nothing is pending or it
    /// cannot tell (Kafka).
    pub oldest_unsettled_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// One member of a consumer group, as a source of deliveries.
#[async_trait]
pub trait BackendSubscription: Send + 'static {
    /// The next delivery; `None` when the subscription can deliver no more.
    /// Must be cancel-safe: dropping the future loses no message.
    async fn next(&mut self) -> Option<Result<Delivery>>;

    /// A delivery that is ready now, without waiting: `None` when none is
    /// (the caller then awaits [`next`](BackendSubscription::next)), and
    /// always `None` where `next` would end (closed). It hands out the same
    /// deliveries in the same order as `next`. The fetch loop takes every
    /// ready delivery through it, so a backlog costs no future per message.
    /// The default has none ready.
    fn try_next(&mut self) -> Option<Result<Delivery>> {
        None
    }

    /// Leaves the group. Messages delivered and not settled go back to the
    /// group (at once, or when the broker's redelivery deadline passes).
    async fn close(self: Box<Self>) -> Result<()>;

    /// This member's share of the group, for health; read at each health
    /// call. `None` (the default) where the broker assigns partitions itself.
    fn assignment(&self) -> Option<std::sync::Arc<std::sync::Mutex<crate::GroupAssignment>>> {
        None
    }

    /// How to read this member's lag, at each health call and every second
    /// for the `eventbus_consumer_lag` gauge. `None` (the default) when the
    /// backend cannot tell.
    fn lag_probe(&self) -> Option<LagProbe> {
        None
    }
}

/// Reads a subscription's lag: messages on the member's partitions that
/// the broker holds and the group has not settled (fetched-and-unsettled
/// included), as a count; `None` while not measured yet. Cheap: backends
/// that measure over the network return their last measurement.
pub type LagProbe = std::sync::Arc<dyn Fn() -> Option<u64> + Send + Sync>;

/// A lag measured in the background and read by a [`LagProbe`]: the last
/// value set, or `None` before the first.
#[derive(Debug, Default)]
pub struct MeasuredLag(std::sync::atomic::AtomicU64);

impl MeasuredLag {
    const UNKNOWN: u64 = u64::MAX;

    /// A lag not measured yet.
    pub fn new() -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self(std::sync::atomic::AtomicU64::new(Self::UNKNOWN)))
    }

    /// Records a measurement (count).
    pub fn set(&self, messages: u64) {
        self.0.store(
            messages.min(Self::UNKNOWN - 1),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// The last measurement.
    pub fn get(&self) -> Option<u64> {
        match self.0.load(std::sync::atomic::Ordering::Relaxed) {
            Self::UNKNOWN => None,
            n => Some(n),
        }
    }

    /// A probe reading this measurement.
    pub fn probe(self: &std::sync::Arc<Self>) -> LagProbe {
        let me = self.clone();
        std::sync::Arc::new(move || me.get())
    }
}
