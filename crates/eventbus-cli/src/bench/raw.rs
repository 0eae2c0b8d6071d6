//! Baselines: the same level done by the raw client without our layer, so
//! the report shows our overhead as a ratio.
//!
//! - memory: a bounded channel per topic carrying the envelope's JSON, with
//!   the same serialization and decoding as the bus;
//! - nats: raw `async-nats` JetStream async publish (acks awaited after the
//!   loop) and one pull consumer per topic with explicit acks;
//! - kafka: raw `rdkafka` idempotent keyed produce and one group consumer per topic.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, stream};
use bytes::Bytes;
use eventbus::{Envelope, Error, Result};
use futures::StreamExt;
use hdrhistogram::Histogram;
use indicatif::ProgressBar;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::measure::{PROBE_AGGREGATE, Published, Recorder, Sampler, histogram};
use super::{LevelReport, Scenario};
use crate::backends::Target;

/// Publishes awaiting their ACK in the raw NATS baseline, as a raw user
/// would bound them (async-nats itself stops at 5,000 by default).
const NATS_ACK_WINDOW: usize = 4_096;

/// One level by the raw client of `target`.
pub(crate) async fn level(
    target: &Target,
    scenario: &Scenario,
    events: usize,
    progress: ProgressBar,
) -> Result<LevelReport> {
    let sampler = Sampler::start();
    let topics = scenario.topic_names(&super::run_id("raw", events));
    let recorder = Recorder::new(progress);
    let mut sink = start(target, &topics, &recorder).await?;
    for (t, _) in topics.iter().enumerate() {
        let probe = Envelope::builder(PROBE_AGGREGATE, "Probe", 1)
            .json_payload(&0)?
            .build()?;
        sink.publish(t, &probe).await?;
    }
    sink.acked().await;
    if !recorder.wait_ready(topics.len(), scenario.timeout).await {
        return Err(Error::timeout("raw consumers did not become ready"));
    }
    let mut publish_us: Histogram<u64> = histogram();
    let first_send = Instant::now();
    for (t, envelope) in scenario.envelopes(events)? {
        let started = Instant::now();
        sink.publish(t, &envelope).await?;
        publish_us.saturating_record(started.elapsed().as_micros() as u64);
    }
    let acked = sink.acked().await;
    recorder.wait_received(events as u64, scenario.timeout).await;
    sink.stop();
    drop(sink);
    let published = Published {
        label: format!("{}-raw", target.name()),
        events,
        aggregates: scenario.aggregates_for(events),
        acked,
        publish_us,
        first_send,
    };
    Ok(published.report(&recorder, sampler).await)
}

/// The raw client of `target`: its consumers (one per topic, recording
/// into `recorder`) are running when this returns.
pub(crate) async fn start(
    target: &Target,
    topics: &[String],
    recorder: &Arc<Recorder>,
) -> Result<Box<dyn RawSink>> {
    Ok(match target {
        Target::Memory => Box::new(MemoryRaw::start(topics, recorder)),
        Target::Nats { url, .. } => Box::new(NatsRaw::start(url, topics, recorder).await?),
        Target::Kafka { brokers, config, .. } => {
            Box::new(KafkaRaw::start(brokers, config.fetch_wait_ms(), topics, recorder).await?)
        }
    })
}

/// A raw client: publish (stage one), then await every outstanding ACK.
#[async_trait::async_trait]
pub(crate) trait RawSink: Send {
    /// Sends `envelope` to topic number `topic` (stage one).
    async fn publish(&mut self, topic: usize, envelope: &Envelope) -> Result<()>;
    /// Awaits the outstanding ACKs; returns how many publishes were confirmed since the last call.
    async fn acked(&mut self) -> usize;
    /// The ACKs already in, without waiting: (confirmed, failed) since the last call.
    fn settled_now(&mut self) -> (usize, usize);
    /// Stops the consumers.
    fn stop(&mut self);
}

type Pending = futures::stream::FuturesUnordered<futures::future::BoxFuture<'static, bool>>;

/// The ACKs of `pending` already in, without waiting: (confirmed plus `already`, failed).
fn settled_now(pending: &mut Pending, already: &mut usize) -> (usize, usize) {
    let mut failed = 0;
    while let Some(Some(ok)) = futures::FutureExt::now_or_never(pending.next()) {
        match ok {
            true => *already += 1,
            false => failed += 1,
        }
    }
    (std::mem::take(already), failed)
}

/// Awaits every pending ACK; returns the confirmed ones plus `already`.
async fn drain(pending: &mut Pending, already: &mut usize) -> usize {
    while let Some(ok) = pending.next().await {
        *already += usize::from(ok);
    }
    std::mem::take(already)
}

struct MemoryRaw {
    senders: Vec<tokio::sync::mpsc::Sender<Bytes>>,
    consumers: Vec<tokio::task::JoinHandle<()>>,
    sent: usize,
}

impl MemoryRaw {
    fn start(topics: &[String], recorder: &Arc<Recorder>) -> Self {
        let (mut senders, mut consumers) = (Vec::new(), Vec::new());
        for topic in topics {
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(10_000);
            let (topic, recorder) = (topic.clone(), recorder.clone());
            consumers.push(tokio::spawn(async move {
                while let Some(bytes) = rx.recv().await {
                    if let Ok(e) = Envelope::decode(&bytes) {
                        recorder.record(&topic, &e);
                    }
                }
            }));
            senders.push(tx);
        }
        Self {
            senders,
            consumers,
            sent: 0,
        }
    }
}

#[async_trait::async_trait]
impl RawSink for MemoryRaw {
    async fn publish(&mut self, topic: usize, envelope: &Envelope) -> Result<()> {
        let bytes = envelope.encode()?;
        self.sent += usize::from(self.senders[topic].send(bytes).await.is_ok());
        Ok(())
    }

    async fn acked(&mut self) -> usize {
        std::mem::take(&mut self.sent)
    }

    fn settled_now(&mut self) -> (usize, usize) {
        (std::mem::take(&mut self.sent), 0)
    }

    fn stop(&mut self) {
        self.senders.clear();
        self.consumers.iter().for_each(|c| c.abort());
    }
}

struct NatsRaw {
    js: jetstream::Context,
    subjects: Vec<String>,
    consumers: Vec<tokio::task::JoinHandle<()>>,
    pending: Pending,
    confirmed: usize,
}

impl NatsRaw {
    async fn start(url: &str, topics: &[String], recorder: &Arc<Recorder>) -> Result<Self> {
        let client = async_nats::connect(url)
            .await
            .map_err(|e| Error::backend("connect", e))?;
        let js = jetstream::new(client);
        let mut consumers = Vec::new();
        let mut subjects = Vec::new();
        for topic in topics {
            // One stream per topic, as the bus lays its topics out by default.
            let subject = format!("benchraw.{topic}");
            let stream = js
                .get_or_create_stream(stream::Config {
                    name: format!("BENCHRAW_{}", topic.replace('.', "_")),
                    subjects: vec![subject.clone()],
                    ..Default::default()
                })
                .await
                .map_err(|e| Error::backend("stream", e))?;
            let consumer = stream
                .create_consumer(pull::Config {
                    durable_name: Some(format!("raw-{topic}")),
                    filter_subject: subject.clone(),
                    max_ack_pending: 10_000,
                    ..Default::default()
                })
                .await
                .map_err(|e| Error::backend("consumer", e))?;
            let mut messages = consumer.messages().await.map_err(|e| Error::backend("pull", e))?;
            let (topic, recorder) = (topic.clone(), recorder.clone());
            consumers.push(tokio::spawn(async move {
                // A raw user keeps consuming through a transient error
                // (a missed heartbeat, a reconnect): so does the baseline.
                while let Some(next) = messages.next().await {
                    let Ok(m) = next else {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    };
                    if let Ok(e) = Envelope::decode(&m.payload) {
                        recorder.record(&topic, &e);
                    }
                    let _ = m.ack().await;
                }
            }));
            subjects.push(subject);
        }
        Ok(Self {
            js,
            subjects,
            consumers,
            pending: Pending::new(),
            confirmed: 0,
        })
    }
}

#[async_trait::async_trait]
impl RawSink for NatsRaw {
    async fn publish(&mut self, topic: usize, envelope: &Envelope) -> Result<()> {
        while self.pending.len() >= NATS_ACK_WINDOW {
            self.confirmed += usize::from(self.pending.next().await.unwrap_or(false));
        }
        let mut h = async_nats::HeaderMap::new();
        for (name, value) in eventbus::codec::envelope_headers(envelope).iter() {
            h.insert(name, value);
        }
        h.insert("Nats-Msg-Id", envelope.event_id.as_str());
        let ack = self
            .js
            .publish_with_headers(self.subjects[topic].clone(), h, envelope.encode()?)
            .await
            .map_err(|e| Error::backend("publish", e))?;
        self.pending.push(Box::pin(async move { ack.await.is_ok() }));
        Ok(())
    }

    async fn acked(&mut self) -> usize {
        drain(&mut self.pending, &mut self.confirmed).await
    }

    fn settled_now(&mut self) -> (usize, usize) {
        settled_now(&mut self.pending, &mut self.confirmed)
    }

    fn stop(&mut self) {
        self.consumers.iter().for_each(|c| c.abort());
    }
}

struct KafkaRaw {
    producer: FutureProducer,
    topics: Vec<String>,
    consumers: Vec<tokio::task::JoinHandle<()>>,
    pending: Pending,
    confirmed: usize,
}

impl KafkaRaw {
    /// `fetch_wait_ms` is the bus consumer's (`KafkaConfig::fetch_wait_ms`).
    async fn start(
        brokers: &str,
        fetch_wait_ms: u64,
        topics: &[String],
        recorder: &Arc<Recorder>,
    ) -> Result<Self> {
        let mut config = rdkafka::ClientConfig::new();
        config.set("bootstrap.servers", brokers);
        let admin: rdkafka::admin::AdminClient<_> =
            config.create().map_err(|e| Error::backend("admin", e))?;
        let new: Vec<_> = topics
            .iter()
            .map(|t| rdkafka::admin::NewTopic::new(t, 8, rdkafka::admin::TopicReplication::Fixed(1)))
            .collect();
        admin
            .create_topics(&new, &rdkafka::admin::AdminOptions::new())
            .await
            .map_err(|e| Error::backend("create topics", e))?;
        let producer: FutureProducer = config
            .clone()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .create()
            .map_err(|e| Error::backend("producer", e))?;
        let mut consumers = Vec::new();
        for topic in topics {
            let consumer: StreamConsumer = config
                .clone()
                .set("group.id", format!("raw.{topic}"))
                .set("auto.offset.reset", "earliest")
                .set("session.timeout.ms", "10000")
                .set("heartbeat.interval.ms", "1000")
                // The same fetch wait as the bus's consumer.
                .set("fetch.wait.max.ms", fetch_wait_ms.to_string())
                .create()
                .map_err(|e| Error::backend("consumer", e))?;
            consumer
                .subscribe(&[topic])
                .map_err(|e| Error::backend("subscribe", e))?;
            let (topic, recorder) = (topic.clone(), recorder.clone());
            consumers.push(tokio::spawn(async move {
                // librdkafka reports broker errors through recv and retries
                // by itself: the baseline keeps consuming (it is aborted at the end).
                loop {
                    let m = match consumer.recv().await {
                        Ok(m) => m,
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    };
                    if let Some(Ok(e)) = m.payload().map(Envelope::decode) {
                        recorder.record(&topic, &e);
                    }
                }
            }));
        }
        Ok(Self {
            producer,
            topics: topics.to_vec(),
            consumers,
            pending: Pending::new(),
            confirmed: 0,
        })
    }
}

#[async_trait::async_trait]
impl RawSink for KafkaRaw {
    async fn publish(&mut self, topic: usize, envelope: &Envelope) -> Result<()> {
        let payload = envelope.encode()?;
        let headers = eventbus::codec::envelope_headers(envelope).iter().fold(
            OwnedHeaders::new(),
            |h, (key, value)| {
                h.insert(Header {
                    key,
                    value: Some(value.as_bytes()),
                })
            },
        );
        loop {
            let record = FutureRecord::to(&self.topics[topic])
                .key(envelope.aggregate_id.as_bytes())
                .payload(&payload[..])
                .headers(headers.clone());
            match self.producer.send_result(record) {
                Ok(delivery) => {
                    self.pending
                        .push(Box::pin(async move { matches!(delivery.await, Ok(Ok(_))) }));
                    return Ok(());
                }
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    _,
                )) => {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err((e, _)) => return Err(Error::backend("produce", e)),
            }
        }
    }

    async fn acked(&mut self) -> usize {
        drain(&mut self.pending, &mut self.confirmed).await
    }

    fn settled_now(&mut self) -> (usize, usize) {
        settled_now(&mut self.pending, &mut self.confirmed)
    }

    fn stop(&mut self) {
        self.consumers.iter().for_each(|c| c.abort());
    }
}
