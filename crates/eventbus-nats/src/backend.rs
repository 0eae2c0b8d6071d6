//! [`NatsBackend`]: the [`Backend`] over JetStream.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::{self, AckKind};
use async_nats::{HeaderMap, HeaderName, HeaderValue};
use async_trait::async_trait;
use bytes::Bytes;
use eventbus_core::{
    Ack, AckFuture, Acker, Backend, BackendSubscription, ConnectionState, Delivery, Error, ErrorKind,
    Message, Position, Result, SubscribeSpec, ValidationError,
};
use futures::{FutureExt, StreamExt};
use tokio::sync::broadcast;

use crate::config::NatsConfig;
use crate::connect::{self, ConnectionEvent};
use crate::topology::{self, api};

/// JetStream's dedup header (`Nats-Msg-Id`): the message's
/// [`dedup_id`](Message::dedup_id) (the event id, or for a dead letter
/// `<event id>/dead-letter`).
pub const MSG_ID_HEADER: &str = "Nats-Msg-Id";

/// The NATS JetStream backend.
///
/// - Topic `t` is subject `<subject_prefix>t`, stored by whichever configured
///   stream covers it (streams are provisioned at connect).
/// - Publishes are async JetStream publishes carrying the envelope headers,
///   with `Nats-Msg-Id` = `X-Event-ID`; a repeat within the stream's
///   duplicate window is acked with `duplicate = true` and stored once.
/// - Each (group, topic) is one durable pull consumer with explicit acks.
///   Ordered subscriptions expect one member per group (as with one Kafka
///   partition): pull consumers hand messages to members in no aggregate order.
/// - A fetched message stays owned by its member until settled: one timer
///   per subscription sends `+WPI` for every unsettled message (queued,
///   running, in retry backoff or parked) every `ack_wait / 3`, so the
///   server does not redeliver it behind newer versions; a redelivered copy
///   of a message still unsettled here (same stream sequence) is dropped,
///   never queued twice.
/// - On subscribe, a durable with unacked messages (left by a crashed or
///   closed member) is rewound to its ack floor, so they are redelivered
///   first and in stream order, never after newer events of their aggregate.
///   Acked messages above the floor come again (at-least-once duplicates).
#[derive(Clone)]
pub struct NatsBackend {
    inner: Arc<Inner>,
}

struct Inner {
    client: async_nats::Client,
    js: jetstream::Context,
    config: NatsConfig,
    events: broadcast::Sender<ConnectionEvent>,
    reconnects: Arc<AtomicU64>,
}

impl std::fmt::Debug for NatsBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsBackend")
            .field("config", &self.inner.config)
            .finish()
    }
}

impl NatsBackend {
    /// Connects to every configured server and provisions the streams.
    ///
    /// # Errors
    /// [`Config`](ErrorKind::Config) for an invalid URL or unreadable
    /// credentials, [`Connection`](ErrorKind::Connection) when no server
    /// answers, and the provisioning errors (`NotFound`, `Conflict`, `Backend`).
    pub async fn connect(config: NatsConfig) -> Result<Self> {
        let (events, _) = broadcast::channel(64);
        let reconnects = Arc::new(AtomicU64::new(0));
        let client = connect::client(&config, events.clone(), reconnects.clone()).await?;
        let js = jetstream::ContextBuilder::new()
            .timeout(Duration::from_millis(config.request_timeout_ms))
            .build(client.clone());
        topology::provision(&js, &config.streams, config.provision).await?;
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                js,
                config,
                events,
                reconnects,
            }),
        })
    }

    /// The underlying client.
    pub fn client(&self) -> &async_nats::Client {
        &self.inner.client
    }

    /// The JetStream context.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.inner.js
    }

    /// Connection events from now on (connected, disconnected, errors).
    pub fn connection_events(&self) -> broadcast::Receiver<ConnectionEvent> {
        self.inner.events.subscribe()
    }

    /// Reconnections since connect (count).
    pub fn reconnects(&self) -> u64 {
        self.inner.reconnects.load(Ordering::Relaxed)
    }

    fn subject(&self, topic: &str) -> String {
        topology::subject(&self.inner.config.subject_prefix, topic)
    }

    async fn consumer(&self, spec: &SubscribeSpec) -> Result<jetstream::consumer::Consumer<pull::Config>> {
        let subject = self.subject(&spec.topic);
        let js = &self.inner.js;
        let stream_name = js.stream_by_subject(subject.clone()).await.map_err(|e| {
            Error::new(ErrorKind::NotFound, format!("no stream stores subject {subject}")).with_source(e)
        })?;
        let stream = js
            .get_stream(&stream_name)
            .await
            .map_err(|e| api("get stream", e))?;
        let durable = topology::durable_name(&spec.group, &spec.topic);
        let deliver_policy = match stream.consumer_info(&durable).await {
            Ok(info) if info.num_ack_pending == 0 => {
                return stream
                    .get_consumer(&durable)
                    .await
                    .map_err(|e| api("get consumer", e));
            }
            Ok(info) => {
                let start_sequence = info.ack_floor.stream_sequence + 1;
                tracing::info!(%durable, start_sequence, "rewinding consumer to its ack floor");
                stream
                    .delete_consumer(&durable)
                    .await
                    .map_err(|e| api("delete consumer", e))?;
                DeliverPolicy::ByStartSequence { start_sequence }
            }
            Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => DeliverPolicy::All,
            Err(e) => return Err(api("consumer info", e)),
        };
        let consumer = &self.inner.config.consumer;
        let config = pull::Config {
            durable_name: Some(durable),
            filter_subject: subject,
            deliver_policy,
            ack_policy: AckPolicy::Explicit,
            ack_wait: Duration::from_millis(consumer.ack_wait_ms),
            max_ack_pending: consumer.max_ack_pending,
            max_deliver: -1,
            ..Default::default()
        };
        stream
            .create_consumer(config)
            .await
            .map_err(|e| api("create consumer", e))
    }
}

fn nats_headers(message: &Message) -> Result<HeaderMap> {
    let mut out = HeaderMap::new();
    for (name, value) in message.headers.iter() {
        let n = HeaderName::from_str(name).map_err(|_| {
            ValidationError::new("headers", format!("{name:?} is not a valid NATS header name"))
        })?;
        let v = HeaderValue::from_str(value)
            .map_err(|_| ValidationError::new("headers", format!("header {name} holds CR or LF")))?;
        out.insert(n, v);
    }
    if let Some(id) = &message.dedup_id {
        let id = HeaderValue::from_str(id).map_err(|_| ValidationError::new("dedup_id", "holds CR or LF"))?;
        out.insert(MSG_ID_HEADER, id);
    }
    Ok(out)
}

#[async_trait]
impl Backend for NatsBackend {
    fn name(&self) -> &'static str {
        "nats"
    }

    async fn publish(&self, message: Message) -> Result<AckFuture> {
        let headers = nats_headers(&message)?;
        let subject = self.subject(&message.topic);
        let ack = self
            .inner
            .js
            .publish_with_headers(subject, headers, message.payload)
            .await
            .map_err(|e| Error::new(ErrorKind::Connection, "NATS publish failed").with_source(e))?;
        Ok(async move {
            let ack = ack
                .await
                .map_err(|e| Error::backend("JetStream did not confirm the publish", e))?;
            Ok(Ack {
                position: Some(Position::Sequence(ack.sequence)),
                duplicate: ack.duplicate,
            })
        }
        .boxed())
    }

    async fn subscribe(&self, spec: &SubscribeSpec) -> Result<Box<dyn BackendSubscription>> {
        let consumer = self.consumer(spec).await?;
        let messages = consumer.messages().await.map_err(|e| api("pull", e))?;
        let unsettled = Arc::new(Mutex::new(HashMap::new()));
        let ack_wait = Duration::from_millis(self.inner.config.consumer.ack_wait_ms);
        let keep_alive = tokio::spawn(keep_alive(
            self.inner.client.clone(),
            unsettled.clone(),
            (ack_wait / 3).max(Duration::from_millis(10)),
        ));
        Ok(Box::new(NatsSubscription {
            messages,
            prefix_len: self.inner.config.subject_prefix.len(),
            client: self.inner.client.clone(),
            unsettled,
            keep_alive,
        }))
    }

    async fn check_publishable(&self, topic: &str) -> Result<()> {
        let subject = self.subject(topic);
        match self.inner.js.stream_by_subject(subject.clone()).await {
            Ok(_) => Ok(()),
            Err(e) => Err(Error::new(
                ErrorKind::NotFound,
                format!(
                    "no JetStream stream stores subject {subject} (topic {topic}): add it to a stream's subjects, \
                     or choose another dead-letter topic"
                ),
            )
            .with_source(e)),
        }
    }

    fn connection_state(&self) -> ConnectionState {
        match self.inner.client.connection_state() {
            async_nats::connection::State::Connected => ConnectionState::Connected,
            async_nats::connection::State::Pending => ConnectionState::Reconnecting,
            async_nats::connection::State::Disconnected => ConnectionState::Disconnected,
        }
    }

    async fn close(&self) -> Result<()> {
        self.inner
            .client
            .flush()
            .await
            .map_err(|e| Error::new(ErrorKind::Connection, "NATS flush failed").with_source(e))
    }
}

/// Reply subjects of the messages this member fetched and has not settled,
/// by stream sequence.
type Unsettled = Arc<Mutex<HashMap<u64, async_nats::Subject>>>;

/// Sends `+WPI` for every unsettled message every `every`: one timer per
/// subscription, not one per message. Ends when the subscription closes.
async fn keep_alive(client: async_nats::Client, unsettled: Unsettled, every: Duration) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let replies: Vec<async_nats::Subject> = unsettled.lock().unwrap().values().cloned().collect();
        for reply in replies {
            if let Err(e) = client.publish(reply, Bytes::from_static(b"+WPI")).await {
                tracing::debug!(error = %e, "in-progress ack failed");
            }
        }
    }
}

struct NatsSubscription {
    messages: pull::Stream,
    prefix_len: usize,
    client: async_nats::Client,
    unsettled: Unsettled,
    keep_alive: tokio::task::JoinHandle<()>,
}

impl Drop for NatsSubscription {
    fn drop(&mut self) {
        self.keep_alive.abort();
    }
}

impl NatsSubscription {
    /// The delivery of `m`; `None` for a redelivered copy of a message this
    /// member still holds (it must not be queued twice).
    fn delivery(&self, m: jetstream::Message) -> Option<Delivery> {
        let (position, delivery_count, sequence) = match m.info() {
            Ok(info) => (
                Some(Position::Sequence(info.stream_sequence)),
                info.delivered.max(1) as u64,
                Some(info.stream_sequence),
            ),
            Err(_) => (None, 1, None),
        };
        if let (Some(seq), Some(reply)) = (sequence, m.message.reply.clone()) {
            let mut unsettled = self.unsettled.lock().unwrap();
            if unsettled.contains_key(&seq) {
                tracing::debug!(seq, "dropping a redelivered copy of a message still in flight");
                return None;
            }
            unsettled.insert(seq, reply);
        }
        let mut headers = eventbus_core::Headers::new();
        if let Some(h) = &m.message.headers {
            for (name, values) in h.iter() {
                let name: &str = name.as_ref();
                if name.starts_with("Nats-") {
                    continue;
                }
                if let Some(v) = values.last() {
                    headers.insert(name, v.as_str());
                }
            }
        }
        let topic = m
            .message
            .subject
            .get(self.prefix_len..)
            .unwrap_or_default()
            .to_owned();
        let message = Message {
            topic,
            key: None,
            headers,
            payload: m.message.payload.clone(),
            dedup_id: None,
        };
        Some(Delivery {
            message,
            position,
            delivery_count,
            acker: Box::new(NatsAcker {
                message: m,
                sequence,
                unsettled: self.unsettled.clone(),
            }),
            ownership: None,
        })
    }
}

#[async_trait]
impl BackendSubscription for NatsSubscription {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        loop {
            match self.messages.next().await? {
                Ok(m) => match self.delivery(m) {
                    Some(delivery) => return Some(Ok(delivery)),
                    None => continue,
                },
                Err(e) => return Some(Err(api("pull", e))),
            }
        }
    }

    async fn close(self: Box<Self>) -> Result<()> {
        self.keep_alive.abort();
        // Push out acks still buffered, so the next member's ack floor is current.
        self.client
            .flush()
            .await
            .map_err(|e| Error::new(ErrorKind::Connection, "NATS flush failed").with_source(e))
    }
}

struct NatsAcker {
    message: jetstream::Message,
    sequence: Option<u64>,
    unsettled: Unsettled,
}

impl NatsAcker {
    /// Settles the message: it is no longer kept alive, and a later copy is
    /// a new delivery.
    async fn send(&self, kind: AckKind) -> Result<()> {
        if let Some(seq) = self.sequence {
            self.unsettled.lock().unwrap().remove(&seq);
        }
        self.message
            .ack_with(kind)
            .await
            .map_err(|e| Error::new(ErrorKind::Connection, "NATS ack failed").with_source(e))
    }
}

#[async_trait]
impl Acker for NatsAcker {
    async fn ack(&self) -> Result<()> {
        self.send(AckKind::Ack).await
    }

    async fn term(&self) -> Result<()> {
        self.send(AckKind::Term).await
    }

    async fn nak(&self, delay: Option<Duration>) -> Result<()> {
        self.send(AckKind::Nak(delay)).await
    }

    // In-progress acks come from the subscription's keep-alive timer.
}
