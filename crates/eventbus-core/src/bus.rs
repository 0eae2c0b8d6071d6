//! [`EventBus`]: the one API over every backend.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use tracing::Instrument;

use crate::backend::{Backend, SubscribeSpec};
use crate::codec::{self, envelope_message};
use crate::config::BusConfig;
use crate::consume::executor::OrderedExecutor;
use crate::consume::process::Job;
use crate::consume::process::{Handler, HandlerFn, SubscriptionParams, SubscriptionShared};
use crate::consume::subscription::{SubscribeOptions, Subscription};
use crate::envelope::Envelope;
use crate::error::{BoxError, Error, Result, ValidationError};
use crate::health::{ConnectionState, Health};
use crate::memory::MemoryBackend;
use crate::message::Message;
use crate::publish::{PublishHandle, PublishResult, PublishResults, Publisher};
use crate::retry::RetryPolicy;

/// Longest topic name, in characters (Kafka's limit, `Topic.java`).
pub const MAX_TOPIC_LEN: usize = 249;

/// An event bus over one backend: publish, subscribe, health, close.
///
/// Cheap to clone; clones share the bus. Needs a running tokio runtime.
///
/// ```
/// # #[tokio::main] async fn main() -> eventbus_core::Result<()> {
/// use eventbus_core::{Envelope, EventBus, SubscribeOptions};
/// let bus = EventBus::memory();
/// let sub = bus
///     .subscribe_envelope("orders", SubscribeOptions::group("billing"), |e: Envelope| async move {
///         println!("{} v{}", e.aggregate_id, e.event_version);
///         Ok::<_, std::io::Error>(())
///     })
///     .await?;
/// let event = Envelope::builder("order-1", "OrderCreated", 1).json_payload(&42)?.build()?;
/// let result = bus.publish_envelope("orders", &event).await?.await;
/// assert!(result.is_success());
/// sub.close().await?;
/// bus.close().await
/// # }
/// ```
#[derive(Clone)]
pub struct EventBus {
    inner: Arc<BusInner>,
}

struct BusInner {
    backend: Arc<dyn Backend>,
    config: BusConfig,
    publisher: Arc<Publisher>,
    executor: Arc<OrderedExecutor<Box<Job>>>,
    closed: AtomicBool,
    close_done: tokio::sync::Mutex<bool>,
    subscriptions: Mutex<Vec<Subscription>>,
    next_subscription: AtomicU64,
    /// The end-to-end heartbeat, once started.
    heartbeat: Mutex<Option<Arc<crate::heartbeat::Heartbeat>>>,
}

impl Drop for BusInner {
    fn drop(&mut self) {
        self.executor.shutdown();
    }
}

impl std::fmt::Debug for EventBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventBus")
            .field("backend", &self.inner.backend.name())
            .finish()
    }
}

impl EventBus {
    /// A bus over `backend`.
    ///
    /// # Errors
    /// [`Config`](crate::ErrorKind::Config) when a limit in `config` is 0.
    ///
    /// # Panics
    /// Outside a tokio runtime (it spawns the ACK collector).
    pub fn new(backend: impl Backend, config: BusConfig) -> Result<Self> {
        Self::from_arc(Arc::new(backend), config)
    }

    /// As [`new`](EventBus::new), for a backend already shared.
    ///
    /// # Errors
    /// As [`new`](EventBus::new).
    pub fn from_arc(backend: Arc<dyn Backend>, config: BusConfig) -> Result<Self> {
        config.validate()?;
        crate::telemetry::describe();
        let executor = OrderedExecutor::new(config.consumer.concurrency);
        let window = config
            .publish
            .max_in_flight
            .unwrap_or_else(|| backend.publish_window())
            .max(1);
        let publisher = Arc::new(Publisher::new(&config, window, backend.name()));
        Ok(Self {
            inner: Arc::new(BusInner {
                backend,
                publisher,
                executor,
                config,
                closed: AtomicBool::new(false),
                close_done: tokio::sync::Mutex::new(false),
                subscriptions: Mutex::new(Vec::new()),
                next_subscription: AtomicU64::new(0),
                heartbeat: Mutex::new(None),
            }),
        })
    }

    /// A bus over a new in-process [`MemoryBackend`] with default settings.
    pub fn memory() -> Self {
        Self::memory_with(BusConfig::default()).expect("the default configuration is valid")
    }

    /// A bus over a new [`MemoryBackend`] with `config`.
    ///
    /// # Errors
    /// As [`new`](EventBus::new).
    pub fn memory_with(config: BusConfig) -> Result<Self> {
        let backend = MemoryBackend::new(config.memory.clone());
        Self::new(backend, config)
    }

    /// The configuration in force.
    pub fn config(&self) -> &BusConfig {
        &self.inner.config
    }

    /// The backend's name (`memory`, `nats`, `kafka`).
    pub fn backend_name(&self) -> &'static str {
        self.inner.backend.name()
    }

    /// Whether [`close`](EventBus::close) has been called.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }

    fn ensure_open(&self) -> Result<()> {
        match self.is_closed() {
            true => Err(Error::closed("bus")),
            false => Ok(()),
        }
    }

    /// Publishes raw bytes to `topic` (stage one). See [`publish_message`](EventBus::publish_message).
    ///
    /// # Errors
    /// As [`publish_message`](EventBus::publish_message).
    pub async fn publish(&self, topic: &str, payload: impl Into<Bytes>) -> Result<PublishHandle> {
        self.publish_message(Message::new(topic, payload)).await
    }

    /// Publishes a raw message, with its key and headers, and returns once the
    /// backend accepted it; the handle resolves with the broker's answer.
    /// Raw publishes do not report to the results streams.
    ///
    /// # Errors
    /// - [`Validation`](crate::ErrorKind::Validation) on field `topic` when the topic is not
    ///   1..=249 chars of `A-Z a-z 0-9 . _ -`;
    /// - [`Timeout`](crate::ErrorKind::Timeout) when the in-flight window stayed
    ///   full, or the backend did not accept, for `publish.timeout_ms`;
    /// - [`Closed`](crate::ErrorKind::Closed) after [`close`](EventBus::close);
    /// - the backend's error when it refused the message.
    pub async fn publish_message(&self, message: Message) -> Result<PublishHandle> {
        self.ensure_open()?;
        validate_topic(&message.topic)?;
        let meta = codec::message_result_meta(&message);
        self.send(meta, message).await
    }

    /// Hands `message` to the publisher inside its `publish` span, whose
    /// trace context the message's headers carry (feature `otel`). The
    /// span's message id is `X-Event-ID`, else the dedup id.
    async fn send(&self, meta: crate::publish::ResultMeta, mut message: Message) -> Result<PublishHandle> {
        let id = message
            .headers
            .get(crate::headers::EVENT_ID)
            .or(message.dedup_id.as_deref());
        let span = crate::trace::publish_span(self.backend_name(), &message.topic, id);
        crate::trace::inject(&span, &mut message.headers);
        self.inner
            .publisher
            .publish(meta, self.inner.backend.publish(message))
            .instrument(span)
            .await
    }

    /// Publishes an envelope (stage one): validates, serializes, and returns
    /// once the backend accepted it. The message carries the envelope's
    /// headers and the aggregate id as key. The handle resolves to its
    /// [`PublishResult`], which also goes to the results streams.
    ///
    /// # Errors
    /// [`Validation`](crate::ErrorKind::Validation) naming the field (nothing is
    /// sent), and those of [`publish_message`](EventBus::publish_message).
    pub async fn publish_envelope(&self, topic: &str, envelope: &Envelope) -> Result<PublishHandle> {
        self.ensure_open()?;
        validate_topic(topic)?;
        let message = envelope_message(topic, envelope, self.inner.config.publish.tenant_id_format)?;
        let meta = codec::envelope_result_meta(topic, envelope, true);
        self.send(meta, message).await
    }

    /// Publishes an envelope and waits for the broker's ACK.
    ///
    /// # Errors
    /// Those of [`publish_envelope`](EventBus::publish_envelope), and the
    /// result's error when the broker did not confirm.
    pub async fn publish_envelope_sync(&self, topic: &str, envelope: &Envelope) -> Result<PublishResult> {
        self.publish_envelope(topic, envelope).await?.await.into_result()
    }

    /// Publishes every envelope in order, then waits for every ACK; returns
    /// one result per envelope, in input order. A publish refused at stage
    /// one gets a failed result; later envelopes are still sent.
    ///
    /// # Errors
    /// [`Validation`](crate::ErrorKind::Validation) when any envelope is
    /// invalid (nothing is sent), [`Closed`](crate::ErrorKind::Closed).
    pub async fn publish_batch(&self, topic: &str, envelopes: &[Envelope]) -> Result<Vec<PublishResult>> {
        self.ensure_open()?;
        validate_topic(topic)?;
        for envelope in envelopes {
            envelope.validate()?;
        }
        let mut handles = Vec::with_capacity(envelopes.len());
        for envelope in envelopes {
            handles.push(match self.publish_envelope(topic, envelope).await {
                Ok(handle) => handle.left_future(),
                Err(e) => {
                    let meta = codec::envelope_result_meta(topic, envelope, false);
                    futures::future::ready(PublishResult::new(meta, Err(e))).right_future()
                }
            });
        }
        Ok(futures::future::join_all(handles).await)
    }

    /// The lossless stream of every envelope publish's result, when
    /// `results.enabled`. Given once; later calls return `None`.
    pub fn results(&self) -> Option<PublishResults> {
        self.inner.publisher.take_results()
    }

    /// A lossless stream of the results of envelopes with `tenant_id`
    /// (besides the global stream). A second call for the same tenant
    /// replaces the first stream.
    ///
    /// # Errors
    /// [`Closed`](crate::ErrorKind::Closed) after [`close`](EventBus::close).
    pub fn tenant_results(&self, tenant_id: i64) -> Result<PublishResults> {
        self.ensure_open()?;
        Ok(self.inner.publisher.tenant_results(tenant_id))
    }

    /// Reads `topic` from its oldest stored message without joining a group
    /// (nothing acked, no group's position moved), then follows it: see
    /// [`Backend::browse`]. Drop the stream to stop. Used by operators'
    /// tools (`eventbus tail`, `eventbus dlq`).
    ///
    /// # Errors
    /// [`Closed`](crate::ErrorKind::Closed), an invalid topic
    /// ([`Validation`](crate::ErrorKind::Validation)), or the backend's
    /// error ([`Unsupported`](crate::ErrorKind::Unsupported),
    /// [`NotFound`](crate::ErrorKind::NotFound), a client error).
    pub async fn browse(
        &self,
        topic: &str,
    ) -> Result<futures::stream::BoxStream<'static, Result<crate::BrowsedMessage>>> {
        self.ensure_open()?;
        validate_topic(topic)?;
        self.inner.backend.browse(topic).await
    }

    /// The backlog of consumer group `group` on `topic`, per partition,
    /// measured without joining the group: see [`Backend::group_lag`].
    ///
    /// # Errors
    /// [`Closed`](crate::ErrorKind::Closed), an invalid topic, or the
    /// backend's error ([`Unsupported`](crate::ErrorKind::Unsupported),
    /// [`NotFound`](crate::ErrorKind::NotFound), a client error).
    pub async fn group_lag(&self, topic: &str, group: &str) -> Result<Vec<crate::PartitionLag>> {
        self.ensure_open()?;
        validate_topic(topic)?;
        self.inner.backend.group_lag(topic, group).await
    }

    /// Subscribes to raw messages of `topic`: handled concurrently, in no
    /// particular order, with the same retry and dead-letter path as envelopes.
    ///
    /// # Errors
    /// [`Closed`](crate::ErrorKind::Closed), invalid topic or group, or the backend's error.
    pub async fn subscribe<F, Fut, E>(
        &self,
        topic: &str,
        options: SubscribeOptions,
        handler: F,
    ) -> Result<Subscription>
    where
        F: Fn(Message) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError>,
    {
        let handler: HandlerFn<Message> =
            Arc::new(move |m| handler(m).map(|r| r.map_err(Into::into)).boxed());
        self.start_subscription(topic, options, Handler::Raw(handler))
            .await
    }

    /// Subscribes to envelopes of `topic`: events of one aggregate are handled
    /// strictly in order, one at a time; aggregates run in parallel.
    /// At-least-once: a redelivered event runs again. Messages that are not
    /// envelopes are dead-lettered without calling the handler.
    ///
    /// # Errors
    /// As [`subscribe`](EventBus::subscribe).
    pub async fn subscribe_envelope<F, Fut, E>(
        &self,
        topic: &str,
        options: SubscribeOptions,
        handler: F,
    ) -> Result<Subscription>
    where
        F: Fn(Envelope) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError>,
    {
        let handler: HandlerFn<Envelope> =
            Arc::new(move |e| handler(e).map(|r| r.map_err(Into::into)).boxed());
        self.start_subscription(topic, options, Handler::Envelope(handler))
            .await
    }

    /// Subscribes to envelopes of `topic` with a [`tower::Service`](tower_service::Service)
    /// as the handler, so middleware ([`layer`](crate::layer): timeout, rate
    /// limit, concurrency limit, tracing, the outbox crate's inbox) wraps it
    /// as layers. Order and retries are those of
    /// [`subscribe_envelope`](EventBus::subscribe_envelope): the whole layered
    /// service runs inside the aggregate's slot, and its error, a layer's
    /// included, is a failed attempt.
    ///
    /// Each call clones `service`, waits for `poll_ready`, then calls it
    /// (tower's idiom): clones must share whatever state the service keeps.
    ///
    /// # Errors
    /// As [`subscribe`](EventBus::subscribe).
    pub async fn subscribe_service<S>(
        &self,
        topic: &str,
        options: SubscribeOptions,
        service: S,
    ) -> Result<Subscription>
    where
        S: tower_service::Service<Envelope, Response = ()> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        self.start_subscription(
            topic,
            options,
            Handler::Envelope(crate::layer::handler_of(service)),
        )
        .await
    }

    async fn start_subscription(
        &self,
        topic: &str,
        options: SubscribeOptions,
        handler: Handler,
    ) -> Result<Subscription> {
        self.ensure_open()?;
        validate_topic(topic)?;
        if options.group.trim().is_empty() {
            return Err(ValidationError::new("group", "must not be blank").into());
        }
        let consumer = &self.inner.config.consumer;
        let dead_letter_topic = options
            .dead_letter
            .as_ref()
            .unwrap_or(&consumer.dead_letter)
            .topic_for(topic);
        if let Some(dlq) = &dead_letter_topic {
            validate_topic(dlq).map_err(|e| ValidationError::new("dead_letter_topic", e.reason))?;
            self.inner.backend.check_publishable(dlq).await?;
        }
        let spec = SubscribeSpec {
            topic: topic.to_owned(),
            group: options.group.clone(),
        };
        let source = self.inner.backend.subscribe(&spec).await?;
        let shared = SubscriptionShared::new(SubscriptionParams {
            id: self.inner.next_subscription.fetch_add(1, Ordering::Relaxed),
            topic: spec.topic,
            group: spec.group,
            handler,
            retry: options.retry.unwrap_or_else(|| consumer.retry.clone()),
            dead_letter_topic,
            backend: self.inner.backend.clone(),
            publisher: self.inner.publisher.clone(),
            handler_timeout: consumer.handler_timeout_ms.map(Duration::from_millis),
            max_in_flight: consumer.max_in_flight,
            dedup_window: consumer.dedup_window,
            assignment: source.assignment(),
            lag: source.lag_probe(),
            lag_alert_messages: consumer.lag_alert_messages,
            lag_alert_age_ms: consumer.lag_alert_age_ms,
        });
        let subscription = Subscription::start(
            shared,
            self.inner.executor.clone(),
            source,
            self.inner.config.close_timeout(),
        );
        let mut subscriptions = self.inner.subscriptions.lock().unwrap();
        subscriptions.retain(|s| !s.is_closed());
        subscriptions.push(subscription.clone());
        Ok(subscription)
    }

    /// The state of the connection, publishes and open subscriptions.
    pub fn health(&self) -> Health {
        let connection = match self.is_closed() {
            true => ConnectionState::Closed,
            false => self.inner.backend.connection_state(),
        };
        let subscriptions = self.inner.subscriptions.lock().unwrap();
        Health {
            backend: self.inner.backend.name(),
            connection,
            publishes_in_flight: self.inner.publisher.in_flight(),
            subscriptions: subscriptions
                .iter()
                .filter(|s| !s.is_closed())
                .map(Subscription::health)
                .collect(),
            heartbeat: self.inner.heartbeat.lock().unwrap().as_ref().map(|h| h.health()),
        }
    }

    /// Starts the end-to-end heartbeat (see [`heartbeat`](crate::heartbeat)):
    /// a beat published to `config.topic` every `interval_ms` and read back
    /// without a consumer group; [`Health::heartbeat`](crate::Health::heartbeat)
    /// reports it, with an alert after `timeout_ms` without one of this
    /// bus's beats (readiness false meanwhile). The first beat is published
    /// and acknowledged before this returns. A second call replaces the
    /// first heartbeat; [`close`](EventBus::close) stops it.
    ///
    /// # Errors
    /// [`Validation`](crate::ErrorKind::Validation) for invalid settings or
    /// topic; [`Closed`](crate::ErrorKind::Closed); the first beat's publish
    /// error; what [`browse`](EventBus::browse) returns.
    pub async fn start_heartbeat(&self, config: crate::heartbeat::HeartbeatConfig) -> Result<()> {
        self.ensure_open()?;
        config.validate()?;
        validate_topic(&config.topic)?;
        let beat = crate::heartbeat::Heartbeat::new(config);
        // The first beat creates the topic where it is created on use.
        self.publish_message(beat.beat()).await?.await.into_result()?;
        beat.published(true);
        let stream = self.browse(beat.topic()).await?;
        if let Some(old) = self.inner.heartbeat.lock().unwrap().replace(beat.clone()) {
            old.stop.cancel();
        }
        // The tasks hold the bus weakly: a bus dropped without close stops them.
        let weak = Arc::downgrade(&self.inner);
        let reader = beat.clone();
        tokio::spawn(async move {
            let mut stream = Some(stream);
            loop {
                if let Some(s) = stream.take() {
                    reader.read(s).await;
                }
                tokio::select! {
                    _ = tokio::time::sleep(reader.interval()) => {}
                    _ = reader.stop.cancelled() => return,
                }
                // The read ended (the broker failed it): read again.
                let Some(inner) = weak.upgrade() else { return };
                stream = EventBus { inner }.browse(reader.topic()).await.ok();
            }
        });
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(beat.interval());
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = beat.stop.cancelled() => return,
                }
                let Some(inner) = weak.upgrade() else { return };
                let bus = EventBus { inner };
                let ok = match bus.publish_message(beat.beat()).await {
                    Ok(handle) => handle.await.is_success(),
                    Err(_) => false,
                };
                beat.published(ok);
            }
        });
        Ok(())
    }

    /// Closes the bus: refuses new calls with [`Closed`](crate::ErrorKind::Closed),
    /// closes every subscription (in-flight handlers get `close_timeout_ms`),
    /// waits until every accepted publish has its result, then closes the
    /// backend. Idempotent: later calls wait for the first and return `Ok`.
    ///
    /// # Errors
    /// The first of: a subscription's close error, a publish flush
    /// [`Timeout`](crate::ErrorKind::Timeout), the backend's close error. The
    /// remaining steps still run.
    pub async fn close(&self) -> Result<()> {
        let mut done = self.inner.close_done.lock().await;
        if *done {
            return Ok(());
        }
        self.inner.closed.store(true, Ordering::Release);
        if let Some(heartbeat) = self.inner.heartbeat.lock().unwrap().as_ref() {
            heartbeat.stop.cancel();
        }
        let subscriptions: Vec<Subscription> = std::mem::take(&mut *self.inner.subscriptions.lock().unwrap());
        let closes = futures::future::join_all(subscriptions.iter().map(Subscription::close)).await;
        let flushed = self
            .inner
            .publisher
            .flush_and_close(self.inner.config.close_timeout())
            .await;
        let backend = self.inner.backend.close().await;
        self.inner.executor.shutdown();
        *done = true;
        closes.into_iter().collect::<Result<Vec<()>>>()?;
        flushed?;
        backend
    }
}

/// Checks a topic name: 1..=249 characters of `A-Z a-z 0-9 . _ -`, the
/// characters legal in both Kafka topics and NATS subject tokens.
///
/// # Errors
/// A [`ValidationError`] on field `topic`.
pub fn validate_topic(topic: &str) -> Result<(), ValidationError> {
    if topic.is_empty() || topic.len() > MAX_TOPIC_LEN {
        return Err(ValidationError::new("topic", "must be 1..=249 characters"));
    }
    match topic
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        Some(c) => Err(ValidationError::new(
            "topic",
            format!("character {c:?} is not one of A-Z a-z 0-9 . _ -"),
        )),
        None => Ok(()),
    }
}

/// Builds an [`EventBus`] from a backend and settings.
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct EventBusBuilder {
    config: BusConfig,
}

impl EventBusBuilder {
    /// Starts from [`BusConfig::default`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts from `config`.
    pub fn config(mut self, config: BusConfig) -> Self {
        self.config = config;
        self
    }

    /// Enables the publish-results stream ([`EventBus::results`]).
    pub fn results(mut self, enabled: bool) -> Self {
        self.config.results.enabled = enabled;
        self
    }

    /// Sets `consumer.concurrency` (handlers at once).
    pub fn concurrency(mut self, handlers: usize) -> Self {
        self.config.consumer.concurrency = handlers;
        self
    }

    /// Sets `consumer.max_in_flight` (messages fetched and unsettled).
    pub fn consumer_max_in_flight(mut self, messages: usize) -> Self {
        self.config.consumer.max_in_flight = messages;
        self
    }

    /// Sets `publish.max_in_flight` (publishes awaiting their ACK).
    pub fn publish_max_in_flight(mut self, messages: usize) -> Self {
        self.config.publish.max_in_flight = Some(messages);
        self
    }

    /// Sets the default retry policy.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.config.consumer.retry = policy;
        self
    }

    /// Sets `close_timeout_ms`.
    pub fn close_timeout(mut self, timeout: Duration) -> Self {
        self.config.close_timeout_ms = timeout.as_millis() as u64;
        self
    }

    /// The settings so far.
    pub fn build_config(self) -> BusConfig {
        self.config
    }

    /// A bus over `backend`.
    ///
    /// # Errors
    /// As [`EventBus::new`].
    pub fn build(self, backend: impl Backend) -> Result<EventBus> {
        EventBus::new(backend, self.config)
    }

    /// A bus over a new [`MemoryBackend`].
    ///
    /// # Errors
    /// As [`EventBus::new`].
    pub fn build_memory(self) -> Result<EventBus> {
        EventBus::memory_with(self.config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_follow_kafka_rules() {
        validate_topic("orders.v1-x_y").unwrap();
        for bad in ["", "a b", "a*", "a>", &"a".repeat(250)] {
            assert_eq!(validate_topic(bad).unwrap_err().field, "topic", "{bad}");
        }
    }
}
