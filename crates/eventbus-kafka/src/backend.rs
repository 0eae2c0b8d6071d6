//! [`KafkaBackend`]: the [`Backend`] over rdkafka.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use eventbus_core::{
    Ack, AckFuture, Backend, BackendSubscription, BrowsedMessage, ConnectionState, Error, ErrorKind, Message,
    Position, Result, SubscribeSpec, ValidationError,
};
use futures::FutureExt;
use futures::StreamExt;
use futures::stream::BoxStream;
use rdkafka::ClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;

use crate::config::KafkaConfig;
use crate::consumer::{KafkaSubscription, MemberContext};
use crate::offsets::OffsetTracker;
use crate::topics::Topics;

/// How long a publish waits between tries while the client's queue is full.
const QUEUE_FULL_RETRY: Duration = Duration::from_millis(1);

/// The Kafka backend.
///
/// - Producer: idempotent, `acks=all`; envelope publishes are keyed by
///   aggregate id, so one aggregate's events stay in one partition, in order.
///   Delivery reports become publish results with partition and offset.
///   A full client queue makes publishing wait, bounded by the bus's
///   `publish.timeout_ms` (the original blocked forever).
/// - Consumer: one group member (`StreamConsumer`) per subscription. Only
///   the contiguous finished prefix of each partition is committed, so a
///   crash never skips an unfinished message. On a revoke, the member waits
///   up to `consumer.revoke_timeout_ms` for in-flight messages of the revoked
///   partitions and commits their finished prefix before handing them over.
#[derive(Clone)]
pub struct KafkaBackend {
    inner: Arc<Inner>,
}

struct Inner {
    config: KafkaConfig,
    /// Made on the first publish (a member that only consumes never
    /// registers a producer id), and made again after a fatal error.
    /// With its generation (1, 2, …).
    producer: std::sync::Mutex<Option<(u64, Arc<FutureProducer<ProducerContext>>)>>,
    topics: Topics,
    state: Arc<AtomicU8>,
    /// The generation of a producer whose delivery was fenced (0: none):
    /// only that producer is replaced, never a newer one by a late report.
    renew: std::sync::atomic::AtomicU64,
    generations: std::sync::atomic::AtomicU64,
}

/// The delivery error after which the producer is replaced although
/// librdkafka raised no fatal error: the broker fenced its producer id, and
/// every later send with it fails the same way (seen with tansu after a
/// restart: `ProducerFenced` for minutes). librdkafka recovers from
/// `InvalidProducerEpoch` and `UnknownProducerId` itself (epoch bump) or
/// raises a fatal error.
const RENEW_ON: [RDKafkaErrorCode; 1] = [RDKafkaErrorCode::ProducerFenced];

impl Inner {
    /// The producer to send with: the current one, or a new one when there
    /// is none yet or the current one hit a fatal error. An idempotent
    /// producer is unusable after a fatal error (e.g. `ProducerFenced` when
    /// a broker lost or reassigned its producer id; seen with tansu after a
    /// restart), so it is replaced; its unconfirmed messages fail, and their
    /// publishers get an error result (and may retry).
    fn producer(&self) -> Result<(u64, Arc<FutureProducer<ProducerContext>>)> {
        let mut current = self.producer.lock().unwrap();
        if let Some((generation, p)) = current.as_ref() {
            let renew = self.renew.load(Ordering::Acquire) == *generation;
            match p.client().fatal_error() {
                None if !renew => return Ok((*generation, p.clone())),
                fatal => {
                    tracing::warn!(
                        ?fatal,
                        "Kafka producer fenced or failed fatally: making a new one"
                    );
                    if let Some(old) = current.take() {
                        // Destroying a client can block: not on this thread.
                        std::thread::spawn(move || drop(old));
                    }
                }
            }
        }
        let producer = Arc::new(self.new_producer()?);
        let generation = self.generations.fetch_add(1, Ordering::AcqRel) + 1;
        *current = Some((generation, producer.clone()));
        Ok((generation, producer))
    }

    fn new_producer(&self) -> Result<FutureProducer<ProducerContext>> {
        let mut props = self.config.client_properties();
        let p = &self.config.producer;
        props
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("compression.type", p.compression.as_str())
            .set("linger.ms", p.linger_ms.to_string())
            .set("queue.buffering.max.messages", p.queue_max_messages.to_string())
            .set("message.timeout.ms", p.delivery_timeout_ms.to_string())
            .set("partitioner", p.partitioner.as_str());
        self.config.apply_extra(&mut props);
        props
            .create_with_context(ProducerContext {
                state: self.state.clone(),
            })
            .map_err(|e| crate::config::creation_error("cannot create the Kafka producer", e))
    }
}

pub(crate) const CONNECTED: u8 = 0;
pub(crate) const DISCONNECTED: u8 = 1;

/// Tracks "all brokers down" reports from librdkafka.
struct ProducerContext {
    state: Arc<AtomicU8>,
}

impl ClientContext for ProducerContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.state.store(DISCONNECTED, Ordering::Relaxed);
        }
        tracing::warn!(%error, reason, "librdkafka error");
    }
}

impl std::fmt::Debug for KafkaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaBackend")
            .field("config", &self.inner.config)
            .finish()
    }
}

impl KafkaBackend {
    /// Checks the configuration, creates the producer and admin client,
    /// waits for a broker to answer (at most `connect_timeout_ms`) and
    /// provisions the configured topics.
    ///
    /// # Errors
    /// [`Config`](ErrorKind::Config) for settings that would be ignored
    /// ([`KafkaConfig::validate`]) or that librdkafka refuses,
    /// [`Auth`](ErrorKind::Auth) when the broker refused the credentials,
    /// [`Connection`](ErrorKind::Connection) when no broker answered, and
    /// the provisioning errors (`NotFound`, `Conflict`, `Backend`).
    pub async fn connect(config: KafkaConfig) -> Result<Self> {
        config.validate()?;
        let state = Arc::new(AtomicU8::new(CONNECTED));
        let topics = Topics::new(&config)?;
        if config.connect_timeout_ms > 0 {
            crate::topics::probe(&config, Duration::from_millis(config.connect_timeout_ms)).await?;
        }
        topics.provision(&config.topics, config.provision).await?;
        let inner = Inner {
            config,
            producer: std::sync::Mutex::new(None),
            topics,
            state,
            renew: std::sync::atomic::AtomicU64::new(0),
            generations: std::sync::atomic::AtomicU64::new(0),
        };
        // Check the producer settings now (librdkafka validates them at creation).
        drop(inner.new_producer()?);
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// The Kafka group id of bus group `group` on `topic`:
    /// `<group>.<topic>`, or `group` itself with `consumer.group_id_per_topic = false`.
    fn group_id(&self, group: &str, topic: &str) -> String {
        match self.inner.config.consumer.group_id_per_topic {
            true => format!("{group}.{topic}"),
            false => group.to_owned(),
        }
    }

    /// Client properties of a consumer that reads without being a group
    /// member (browse, lag): `group_id` for offset lookups only, nothing
    /// committed or stored. The user's `extra` properties come first, so
    /// these win.
    fn outside_group_properties(&self, group_id: &str) -> rdkafka::ClientConfig {
        let mut props = self.inner.config.client_properties();
        self.inner.config.apply_extra(&mut props);
        props
            .set("group.id", group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false");
        props
    }

    fn member(&self, spec: &SubscribeSpec) -> Result<KafkaSubscription> {
        let c = &self.inner.config.consumer;
        let group_id = self.group_id(&spec.group, &spec.topic);
        let mut props = self.inner.config.client_properties();
        props
            .set("group.id", &group_id)
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false")
            .set("auto.commit.interval.ms", c.commit_interval_ms.to_string())
            .set("auto.offset.reset", &c.auto_offset_reset)
            .set("session.timeout.ms", c.session_timeout_ms.to_string())
            .set("heartbeat.interval.ms", c.heartbeat_interval_ms.to_string())
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", c.fetch_wait_max_ms.to_string())
            .set("max.poll.interval.ms", c.max_poll_interval_ms.to_string());
        self.inner.config.apply_extra(&mut props);
        let tracker = Arc::new(OffsetTracker::default());
        let rebalances = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let view = Arc::new(std::sync::Mutex::new(eventbus_core::GroupAssignment {
            partition_count: self.inner.config.default_topic.partitions.max(1) as u32,
            ..Default::default()
        }));
        let context = MemberContext {
            tracker: tracker.clone(),
            revoke_timeout: Duration::from_millis(c.revoke_timeout_ms),
            commit_timeout: Duration::from_millis(c.commit_timeout_ms),
            rebalances: rebalances.clone(),
            view: view.clone(),
            group_id: group_id.clone(),
            state: self.inner.state.clone(),
        };
        let consumer: StreamConsumer<MemberContext> = props
            .create_with_context(context)
            .map_err(|e| crate::config::creation_error("cannot create the Kafka consumer", e))?;
        consumer
            .subscribe(&[&spec.topic])
            .map_err(|e| Error::backend(format!("cannot subscribe to {}", spec.topic), e))?;
        Ok(KafkaSubscription::start(
            Arc::new(crate::consumer::Member::new(consumer)),
            tracker,
            rebalances,
            c.max_in_flight_per_partition.max(1),
            view,
            &spec.topic,
            Duration::from_millis(self.inner.config.fetch_wait_ms()),
        ))
    }
}

/// A record's size as the limits count it: payload, key and headers (bytes).
fn message_size(message: &Message) -> usize {
    message.payload.len()
        + message.key.as_ref().map_or(0, |k| k.len())
        + message
            .headers
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
}

/// A message above the producer's `message.max.bytes` or the broker's
/// `max.message.bytes`: a `Validation` error on the payload.
fn too_large(bytes: usize) -> Error {
    ValidationError::new(
        "payload",
        format!(
            "a message of {bytes} bytes (payload, key and headers) is above the Kafka limit (librdkafka message.max.bytes, \
             default 1,000,000, or the topic's max.message.bytes)"
        ),
    )
    .into()
}

fn kafka_headers(message: &Message) -> OwnedHeaders {
    message.headers.iter().fold(
        OwnedHeaders::new_with_capacity(message.headers.len()),
        |h, (key, value)| {
            h.insert(Header {
                key,
                value: Some(value.as_bytes()),
            })
        },
    )
}

#[async_trait]
impl Backend for KafkaBackend {
    /// 20,000 publishes awaiting their ACK: librdkafka batches what is in
    /// flight, and a window of 4,096 starved it where ACKs are slow. Measured
    /// 2026-12-01 (README "Benchmark"): on tansu keeping its log in S3, 20,000
    /// events went at 3–9 % of raw rdkafka with 4,096 and 48–71 % with
    /// 20,000; on in-memory tansu, 300,000 events at 63,000/s with 4,096
    /// and 75,000/s with 20,000, end-to-end p99 still within 1.2× raw's
    /// (100,000 reached 81,000/s but doubled the p99). Never more than
    /// the producer's own queue (`producer.queue_max_messages`, or
    /// `queue.buffering.max.messages` in `extra`), so a full queue does not
    /// turn waits in the window into `QueueFull` retries.
    fn publish_window(&self) -> usize {
        let queue = self
            .inner
            .config
            .extra_number("queue.buffering.max.messages")
            .unwrap_or(self.inner.config.producer.queue_max_messages);
        usize::try_from(queue).unwrap_or(usize::MAX).clamp(1, 20_000)
    }

    fn name(&self) -> &'static str {
        "kafka"
    }

    async fn publish(&self, message: Message) -> Result<AckFuture> {
        self.inner.topics.ensure(&message.topic).await?;
        let (generation, producer) = self.inner.producer()?;
        // A refused record comes back with its headers: they are built once.
        let mut headers = Some(kafka_headers(&message));
        let delivery = loop {
            let mut record = FutureRecord::to(&message.topic).payload(&message.payload[..]);
            record.headers = headers.take();
            if let Some(key) = &message.key {
                record = record.key(&key[..]);
            }
            match producer.send_result(record) {
                Ok(delivery) => break delivery,
                // Backpressure: the bus bounds this wait with publish.timeout_ms.
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), refused)) => {
                    headers = refused.headers;
                    tokio::time::sleep(QUEUE_FULL_RETRY).await;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge), _)) => {
                    return Err(too_large(message_size(&message)));
                }
                Err((e, _)) => return Err(Error::backend("Kafka producer refused the message", e)),
            }
        };
        let state = self.inner.state.clone();
        let inner = self.inner.clone();
        let size = message_size(&message);
        Ok(async move {
            match delivery.await {
                Ok(Ok(d)) => {
                    state.store(CONNECTED, Ordering::Relaxed);
                    Ok(Ack {
                        position: Some(Position::Offset {
                            partition: d.partition,
                            offset: d.offset,
                        }),
                        duplicate: false,
                    })
                }
                Ok(Err((e, _))) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageSizeTooLarge) => {
                    Err(too_large(size))
                }
                Ok(Err((e, _))) => {
                    if e.rdkafka_error_code().is_some_and(|c| RENEW_ON.contains(&c)) {
                        inner.renew.store(generation, Ordering::Release);
                    }
                    Err(Error::backend("Kafka did not confirm the delivery", e))
                }
                Err(_) => Err(Error::closed("Kafka producer")),
            }
        }
        .boxed())
    }

    /// Creates `topic` when `auto_create_topics` is on; else it must exist
    /// (`NotFound` naming it), so a dead-letter publish cannot wait on a
    /// topic nobody made.
    async fn check_publishable(&self, topic: &str) -> Result<()> {
        self.inner.topics.check_exists(topic).await
    }

    async fn subscribe(&self, spec: &SubscribeSpec) -> Result<Box<dyn BackendSubscription>> {
        self.inner.topics.ensure(&spec.topic).await?;
        Ok(Box::new(self.member(spec)?))
    }

    /// A consumer with every partition of the topic assigned from its
    /// beginning: no group is joined and nothing is committed (its random
    /// `group.id` is never used on the broker). Positions are partition and
    /// offset; order is per partition.
    async fn browse(&self, topic: &str) -> Result<BoxStream<'static, Result<BrowsedMessage>>> {
        let Some(partitions) = self.inner.topics.partition_count(topic).await? else {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("Kafka topic {topic} does not exist"),
            ));
        };
        let mut props =
            self.outside_group_properties(&format!("eventbus-browse-{}", uuid::Uuid::now_v7().simple()));
        props
            .set("enable.partition.eof", "false")
            .set("auto.offset.reset", "earliest")
            .set(
                "fetch.wait.max.ms",
                self.inner.config.consumer.fetch_wait_max_ms.to_string(),
            );
        let consumer: StreamConsumer = props
            .create()
            .map_err(|e| crate::config::creation_error("cannot create the Kafka browse consumer", e))?;
        let mut assignment = rdkafka::TopicPartitionList::with_capacity(partitions);
        for p in 0..partitions as i32 {
            assignment
                .add_partition_offset(topic, p, rdkafka::Offset::Beginning)
                .map_err(|e| Error::backend("cannot assign the browse partitions", e))?;
        }
        consumer
            .assign(&assignment)
            .map_err(|e| Error::backend(format!("cannot assign {topic}'s partitions"), e))?;
        let consumer = Arc::new(consumer);
        Ok(futures::stream::unfold(consumer, |consumer| async move {
            let item = match consumer.recv().await {
                Ok(m) => Ok(BrowsedMessage {
                    message: crate::consumer::message_of(&m),
                    position: Position::Offset {
                        partition: rdkafka::Message::partition(&m),
                        offset: rdkafka::Message::offset(&m),
                    },
                }),
                Err(e) => Err(Error::backend("Kafka browse failed", e)),
            };
            Some((item, consumer))
        })
        .boxed())
    }

    /// Per partition: high watermark minus the group's committed offset
    /// (minus the low watermark when it committed nothing), read with the
    /// group's id without joining it. Wrong on tansu, whose log-end offsets
    /// are wrong; the oldest unsettled message's age is not measured.
    async fn group_lag(&self, topic: &str, group: &str) -> Result<Vec<eventbus_core::PartitionLag>> {
        let Some(partitions) = self.inner.topics.partition_count(topic).await? else {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("Kafka topic {topic} does not exist"),
            ));
        };
        let group_id = self.group_id(group, topic);
        let consumer: rdkafka::consumer::BaseConsumer = self
            .outside_group_properties(&group_id)
            .create()
            .map_err(|e| crate::config::creation_error("cannot create the Kafka lag consumer", e))?;
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || {
            let timeout = Duration::from_secs(10);
            let mut wanted = rdkafka::TopicPartitionList::with_capacity(partitions);
            for p in 0..partitions as i32 {
                wanted.add_partition(&topic, p);
            }
            let committed = consumer.committed_offsets(wanted, timeout).map_err(|e| {
                Error::backend(format!("cannot read group {group_id}'s committed offsets"), e)
            })?;
            let mut out = Vec::with_capacity(partitions);
            for e in committed.elements() {
                if let Err(err) = e.error() {
                    return Err(Error::backend(
                        format!(
                            "cannot read group {group_id}'s committed offset of {topic} partition {}",
                            e.partition()
                        ),
                        err,
                    ));
                }
                let (low, high) = consumer
                    .fetch_watermarks(&topic, e.partition(), timeout)
                    .map_err(|err| Error::backend(format!("cannot read {topic}'s watermarks"), err))?;
                let from = match e.offset() {
                    rdkafka::Offset::Offset(o) => o,
                    _ => low,
                };
                out.push(eventbus_core::PartitionLag {
                    partition: Some(e.partition() as u32),
                    consumer: group_id.clone(),
                    pending: (high - from).max(0) as u64,
                    oldest_unsettled_at: None,
                });
            }
            Ok(out)
        })
        .await
        .map_err(|e| Error::backend("the lag measurement panicked", e))?
    }

    fn connection_state(&self) -> ConnectionState {
        match self.inner.state.load(Ordering::Relaxed) {
            CONNECTED => ConnectionState::Connected,
            _ => ConnectionState::Disconnected,
        }
    }

    async fn close(&self) -> Result<()> {
        let Some((_, producer)) = self.inner.producer.lock().unwrap().clone() else {
            return Ok(()); // never published
        };
        let timeout = Duration::from_millis(self.inner.config.producer.delivery_timeout_ms);
        tokio::task::spawn_blocking(move || producer.flush(timeout))
            .await
            .map_err(|e| Error::backend("flush failed", e))?
            .map_err(|e| Error::new(ErrorKind::Timeout, "Kafka producer flush timed out").with_source(e))
    }
}
