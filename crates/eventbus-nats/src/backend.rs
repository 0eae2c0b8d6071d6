//! [`NatsBackend`]: the [`Backend`] over JetStream.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream;
use async_nats::{HeaderMap, HeaderName, HeaderValue};
use async_trait::async_trait;
use eventbus_core::{
    Ack, AckFuture, Backend, BackendSubscription, BrowsedMessage, ConnectionState, Error, ErrorKind, Message,
    Position, Result, SubscribeSpec, ValidationError,
};
use futures::FutureExt;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use tokio::sync::broadcast;

use crate::config::NatsConfig;
use crate::connect::{self, ConnectionEvent};
use crate::group;
use crate::topology;

/// JetStream's dedup header (`Nats-Msg-Id`): the message's
/// [`dedup_id`](Message::dedup_id) (the event id, or for a dead letter
/// `<event id>/dead-letter`).
pub const MSG_ID_HEADER: &str = "Nats-Msg-Id";

/// The NATS JetStream backend.
///
/// - Topic `t` is subject `<subject_prefix>t` (default: `t`, as the Go SDK
///   publishes), stored by whichever stream covers it: a configured one
///   (provisioned at connect) or the topic's own, found or created at its
///   first publish or subscribe (see [`NatsConfig::topic_streams`]).
/// - Publishes are async JetStream publishes carrying the envelope headers,
///   with `Nats-Msg-Id` = `X-Event-ID`; a repeat within the stream's
///   duplicate window is acked with `duplicate = true` and stored once.
/// - Each (group, topic) is a consumer group with leases in a key-value
///   bucket (see the `group` module): an unpartitioned topic is one durable
///   pull consumer with one active member at a time (the others stand by);
///   a topic listed in [`partitions`](NatsConfig::partitions) is `P`
///   subjects and `P` durable consumers shared out among the members, each
///   aggregate with one member at a time. A member joining never deletes or
///   rewinds a consumer another live member uses.
/// - A fetched message stays owned by its member until settled: one timer
///   per subscription sends `+WPI` for every unsettled message (queued,
///   running, in retry backoff or parked) every `ack_wait / 3`, so the
///   server does not redeliver it behind newer versions; a redelivered copy
///   of a message still unsettled here (same stream sequence) is dropped,
///   never queued twice.
/// - A member taking a partition whose consumer has unacked messages (left
///   by a crashed, closed or rebalanced member) rewinds it to its ack floor,
///   so they are redelivered first and in stream order, never after newer
///   events of their aggregate. Acked messages above the floor come again
///   (at-least-once duplicates).
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
    /// The group-lease bucket, opened at the first subscribe.
    bucket: tokio::sync::OnceCell<async_nats::jetstream::kv::Store>,
    /// Topics whose stream is known to exist (checked or created once per
    /// topic; a failed check is tried again at the next use).
    topic_streams: std::sync::Mutex<HashMap<String, Arc<tokio::sync::OnceCell<()>>>>,
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
        topology::validate_topic_streams(&config.topic_streams)?;
        topology::provision(&js, &config.streams, config.provision).await?;
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                js,
                config,
                events,
                reconnects,
                bucket: tokio::sync::OnceCell::new(),
                topic_streams: std::sync::Mutex::new(HashMap::new()),
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

    /// Makes sure a stream stores `topic`'s subjects, once per topic: see
    /// [`NatsConfig::topic_streams`].
    ///
    /// # Errors
    /// Those of `topology::ensure_topic_stream` (`NotFound`, `Conflict`, `Backend`).
    async fn ensure_topic(&self, topic: &str) -> Result<()> {
        let cell = {
            let mut map = self.inner.topic_streams.lock().unwrap_or_else(|e| e.into_inner());
            match map.get(topic) {
                Some(cell) if cell.initialized() => return Ok(()),
                Some(cell) => cell.clone(),
                None => map.entry(topic.to_owned()).or_default().clone(),
            }
        };
        let config = &self.inner.config;
        cell.get_or_try_init(|| async {
            let subjects =
                topology::topic_subjects(&config.subject_prefix, topic, config.partitions_of(topic));
            topology::ensure_topic_stream(
                &self.inner.js,
                &config.topic_streams,
                config.provision,
                topic,
                &subjects,
            )
            .await
        })
        .await
        .map(|_| ())
    }

    /// The subject a message of `topic` with record key `key` goes to: the
    /// topic's subject, or for a partitioned topic the subject of the
    /// key's partition.
    fn subject(&self, topic: &str, key: Option<&[u8]>) -> String {
        let config = &self.inner.config;
        match config.partitions_of(topic) {
            Some(n) => topology::partition_subject(
                &config.subject_prefix,
                topic,
                eventbus_core::partition_for(key.unwrap_or_default(), n),
            ),
            None => topology::subject(&config.subject_prefix, topic),
        }
    }
}

/// The bus headers of a received NATS message: the last value of each
/// header, without the server's own `Nats-*` headers (dedup id, ...).
pub(crate) fn headers_of(h: Option<&HeaderMap>) -> eventbus_core::Headers {
    let mut headers = eventbus_core::Headers::with_capacity(h.map_or(0, |h| h.len()));
    if let Some(h) = h {
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
    headers
}

fn nats_headers(message: &Message) -> Result<HeaderMap> {
    let mut out = HeaderMap::new();
    for (name, value) in message.headers.iter() {
        // The bus's own names go as static names: not copied and validated
        // again for every publish.
        let n = match eventbus_core::headers::bus_name(name) {
            Some(known) => HeaderName::from_static(known),
            None => HeaderName::from_str(name).map_err(|_| {
                ValidationError::new("headers", format!("{name:?} is not a valid NATS header name"))
            })?,
        };
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
        self.ensure_topic(&message.topic).await?;
        let subject = self.subject(&message.topic, message.key.as_deref());
        let ack = self
            .inner
            .js
            .publish_with_headers(subject, headers, message.payload)
            .await
            .map_err(|e| match e.kind() {
                jetstream::context::PublishErrorKind::MaxPayloadExceeded => {
                    Error::from(ValidationError::new(
                        "payload",
                        format!(
                            "the message is above the server's max_payload of {} bytes ({e})",
                            self.inner.client.server_info().max_payload
                        ),
                    ))
                }
                _ => Error::new(ErrorKind::Connection, "NATS publish failed").with_source(e),
            })?;
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
        self.ensure_topic(&spec.topic).await?;
        let inner = &self.inner;
        let bucket = inner
            .bucket
            .get_or_try_init(|| group::lease_bucket(&inner.js, &inner.config))
            .await?
            .clone();
        let ctx = group::GroupContext {
            client: inner.client.clone(),
            js: inner.js.clone(),
            config: inner.config.clone(),
            bucket,
            events: inner.events.clone(),
        };
        group::subscribe(ctx, spec).await
    }

    /// An ordered ephemeral JetStream consumer over the topic's subject (a
    /// partitioned topic: its partition subjects), from the stream's first
    /// message; the server removes it once the stream is dropped. Positions
    /// are stream sequences. Order is the stream's, across partitions too.
    async fn browse(&self, topic: &str) -> Result<BoxStream<'static, Result<BrowsedMessage>>> {
        let config = &self.inner.config;
        let partitions = config.partitions_of(topic);
        let subjects = topology::topic_subjects(&config.subject_prefix, topic, partitions);
        let name = topology::stream_name_of(&self.inner.js, &subjects[0])
            .await
            .map_err(|e| match e.kind() {
                ErrorKind::NotFound => Error::new(
                    ErrorKind::NotFound,
                    format!(
                        "no JetStream stream stores subject {} (topic {topic})",
                        subjects[0]
                    ),
                ),
                _ => e,
            })?;
        let stream = self
            .inner
            .js
            .get_stream(&name)
            .await
            .map_err(|e| topology::api("stream lookup", e))?;
        // One filter subject (servers before 2.10 take no list): a
        // partitioned topic's `<topic>.*` also matches other topics below it,
        // whose messages are skipped here.
        let filter_subject = match partitions {
            Some(_) => format!("{}.*", topology::subject(&config.subject_prefix, topic)),
            None => subjects[0].clone(),
        };
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject,
                deliver_policy: jetstream::consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(|e| topology::api("browse consumer", e))?;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| topology::api("browse messages", e))?;
        let topic = topic.to_owned();
        let wanted: std::collections::HashSet<String> = subjects.into_iter().collect();
        Ok(messages
            .filter_map(move |m| {
                let item = match m {
                    Err(e) => Some(Err(Error::backend("JetStream browse failed", e))),
                    Ok(m) if !wanted.contains(m.subject.as_str()) => None,
                    Ok(m) => {
                        let sequence = match m.info() {
                            Ok(info) => info.stream_sequence,
                            Err(e) => {
                                return std::future::ready(Some(Err(Error::backend(
                                    "a browsed JetStream message has no stream sequence",
                                    e,
                                ))));
                            }
                        };
                        Some(Ok(BrowsedMessage {
                            message: Message {
                                topic: topic.clone(),
                                key: None,
                                headers: headers_of(m.headers.as_ref()),
                                payload: m.payload.clone(),
                                dedup_id: None,
                            },
                            position: Position::Sequence(sequence),
                        }))
                    }
                };
                std::future::ready(item)
            })
            .boxed())
    }

    /// Per partition: the group's newest consumer (the highest lease
    /// generation) and its `num_pending + num_ack_pending`; with no
    /// consumer yet, every message the stream holds on the subject.
    async fn group_lag(&self, topic: &str, group: &str) -> Result<Vec<eventbus_core::PartitionLag>> {
        let layout = group::Layout::new(&self.inner.config, topic, group);
        let js = &self.inner.js;
        let first = layout.subject(0);
        let name = topology::stream_name_of(js, &first).await?;
        let mut stream = js
            .get_stream(&name)
            .await
            .map_err(|e| topology::api("stream lookup", e))?;
        let names: Vec<String> = stream
            .consumer_names()
            .try_collect()
            .await
            .map_err(|e| topology::api("consumer list", e))?;
        let mut out = Vec::new();
        for p in 0..layout.count() {
            let subject = layout.subject(p);
            let newest = names
                .iter()
                .filter_map(|n| layout.generation(p, n).map(|g| (g, n)))
                .max()
                .map(|(_, n)| n.clone());
            let (consumer, pending, floor) = match &newest {
                Some(consumer) => {
                    let info = stream
                        .consumer_info(consumer)
                        .await
                        .map_err(|e| topology::api("consumer info", e))?;
                    let pending = info.num_pending + info.num_ack_pending as u64;
                    (consumer.clone(), pending, info.ack_floor.stream_sequence + 1)
                }
                None => {
                    let mut counts = stream
                        .info_with_subjects(&subject)
                        .await
                        .map_err(|e| topology::api("stream subjects", e))?;
                    let mut stored = 0u64;
                    while let Some(entry) = counts.next().await {
                        let (_, count) = entry.map_err(|e| topology::api("stream subjects", e))?;
                        stored += count as u64;
                    }
                    (
                        "(no consumer yet)".to_owned(),
                        stored,
                        stream.info().await.map_or(1, |i| i.state.first_sequence),
                    )
                }
            };
            // The message after the ack floor is the oldest unsettled one
            // when it is on this subject (a stream of the topic's own).
            let oldest_unsettled_at = match pending {
                0 => None,
                _ => match stream.get_raw_message(floor).await {
                    Ok(m) if m.subject.as_str() == subject => {
                        chrono::DateTime::from_timestamp_nanos(m.time.unix_timestamp_nanos() as i64).into()
                    }
                    _ => None,
                },
            };
            out.push(eventbus_core::PartitionLag {
                partition: layout.partitioned().then_some(p),
                consumer,
                pending,
                oldest_unsettled_at,
            });
        }
        Ok(out)
    }

    async fn check_publishable(&self, topic: &str) -> Result<()> {
        self.ensure_topic(topic).await?;
        let subject = self.subject(topic, None);
        match topology::stream_name_of(&self.inner.js, &subject).await {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Err(Error::new(
                ErrorKind::NotFound,
                format!(
                    "no JetStream stream stores subject {subject} (topic {topic}): add it to a stream's subjects, \
                     or choose another dead-letter topic"
                ),
            )
            .with_source(e)),
            Err(e) => Err(e),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The names passed as static are ones async-nats would accept, and
    /// the same header either way.
    #[test]
    fn static_header_names_are_valid_nats_header_names() {
        for name in eventbus_core::headers::BUS_NAMES {
            assert_eq!(
                HeaderName::from_str(name).ok(),
                Some(HeaderName::from_static(name)),
                "{name}"
            );
        }
        let message = Message::new("orders", "{}")
            .with_header(eventbus_core::headers::EVENT_ID, "e-1")
            .with_header("X-Custom", "v");
        let headers = nats_headers(&message).unwrap();
        assert_eq!(
            headers.get(eventbus_core::headers::EVENT_ID).map(|v| v.as_str()),
            Some("e-1")
        );
        assert_eq!(headers.get("X-Custom").map(|v| v.as_str()), Some("v"));
    }
}
