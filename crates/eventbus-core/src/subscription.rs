//! Subscriptions: the fetch loop feeding the ordered executor, the retry and
//! dead-letter path of each message, and the [`Subscription`] handle.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::backend::{Backend, BackendSubscription};
use crate::envelope::{Envelope, Payload};
use crate::error::{BoxError, Error, ErrorKind, Result};
use crate::executor::{Job, Key, OrderedExecutor};
use crate::headers;
use crate::health::SubscriptionHealth;
use crate::message::{Delivery, Message};
use crate::retry::RetryPolicy;

/// Longest `X-Error-Message` header value, in bytes (headers must stay small).
const MAX_ERROR_HEADER_BYTES: usize = 1024;

pub(crate) type HandlerFn<T> = Arc<dyn Fn(T) -> BoxFuture<'static, Result<(), BoxError>> + Send + Sync>;

/// A user's handler: raw messages (unordered) or envelopes (ordered per aggregate).
pub(crate) enum Handler {
    Raw(HandlerFn<Message>),
    Envelope(HandlerFn<Envelope>),
}

/// Where a subscription sends messages whose attempts are exhausted.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum DeadLetter {
    /// The bus's default: `<topic><consumer.dead_letter_suffix>` when
    /// `consumer.dead_letter` is true, else [`Park`](DeadLetter::Park).
    #[default]
    Default,
    /// This topic.
    Topic(String),
    /// No dead-letter topic: the aggregate stays parked, retried with capped
    /// backoff and reported as stalled in health, until the handler succeeds.
    Park,
}

/// Options of one subscription: its consumer group, retry policy and dead-letter topic.
#[derive(Debug, Clone, PartialEq)]
pub struct SubscribeOptions {
    /// The consumer group. Each group gets every message; the members of one
    /// group (subscriptions with the same group, in any process) share them.
    pub group: String,
    /// Overrides `consumer.retry` for this subscription.
    pub retry: Option<RetryPolicy>,
    /// Where exhausted messages go.
    pub dead_letter: DeadLetter,
}

impl SubscribeOptions {
    /// Options for consumer group `group`, with the bus's retry and dead-letter defaults.
    pub fn group(group: impl Into<String>) -> Self {
        Self {
            group: group.into(),
            retry: None,
            dead_letter: DeadLetter::Default,
        }
    }

    /// Uses this retry policy.
    #[must_use]
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = Some(policy);
        self
    }

    /// Dead-letters to `topic`.
    #[must_use]
    pub fn dead_letter_topic(mut self, topic: impl Into<String>) -> Self {
        self.dead_letter = DeadLetter::Topic(topic.into());
        self
    }

    /// Parks failing aggregates instead of dead-lettering.
    #[must_use]
    pub fn park_on_failure(mut self) -> Self {
        self.dead_letter = DeadLetter::Park;
        self
    }
}

/// A fetched message and what the handler will get.
pub(crate) struct Work {
    delivery: Delivery,
    input: Input,
}

enum Input {
    Raw,
    Envelope(Envelope),
    /// Not an envelope: dead-lettered without calling the handler.
    Invalid(String),
}

/// What the fast path did with a message.
pub(crate) enum Outcome {
    /// Settled (acked, or left for redelivery on abort).
    Done,
    /// The first attempt failed with this error: continue on the slow path.
    Retry(Box<Work>, String),
}

enum Settle {
    Ack,
    DeadLetter(String),
    /// Closed first: left unsettled for the backend to redeliver.
    Abandon,
}

/// State shared by a subscription's fetch loop, its jobs and its handle.
pub(crate) struct SubscriptionShared {
    id: u64,
    topic: String,
    group: String,
    handler: Handler,
    retry: RetryPolicy,
    dead_letter_topic: Option<String>,
    backend: Arc<dyn Backend>,
    ack_timeout: Duration,
    stop_fetch: CancellationToken,
    abort: CancellationToken,
    fetching: AtomicBool,
    in_flight: AtomicUsize,
    idle: Notify,
    stalled: AtomicUsize,
    handled: AtomicU64,
    failed_attempts: AtomicU64,
    dead_lettered: AtomicU64,
    unordered_seq: AtomicU64,
    last_error: Mutex<Option<String>>,
}

pub(crate) struct SubscriptionParams {
    pub(crate) id: u64,
    pub(crate) topic: String,
    pub(crate) group: String,
    pub(crate) handler: Handler,
    pub(crate) retry: RetryPolicy,
    pub(crate) dead_letter_topic: Option<String>,
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) ack_timeout: Duration,
}

impl SubscriptionShared {
    pub(crate) fn new(p: SubscriptionParams) -> Arc<Self> {
        Arc::new(Self {
            id: p.id,
            topic: p.topic,
            group: p.group,
            handler: p.handler,
            retry: p.retry,
            dead_letter_topic: p.dead_letter_topic,
            backend: p.backend,
            ack_timeout: p.ack_timeout,
            stop_fetch: CancellationToken::new(),
            abort: CancellationToken::new(),
            fetching: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            idle: Notify::new(),
            stalled: AtomicUsize::new(0),
            handled: AtomicU64::new(0),
            failed_attempts: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            unordered_seq: AtomicU64::new(0),
            last_error: Mutex::new(None),
        })
    }

    /// Decides the ordering key and the handler's input of a delivery.
    fn classify(&self, delivery: Delivery) -> (Key, Work) {
        if let Handler::Raw(_) = self.handler {
            let key = Key::Unordered(self.unordered_seq.fetch_add(1, Ordering::Relaxed));
            return (
                key,
                Work {
                    delivery,
                    input: Input::Raw,
                },
            );
        }
        let (aggregate, input) = match decode_envelope(&delivery.message) {
            Ok(envelope) => (Some(envelope.aggregate_id.clone()), Input::Envelope(envelope)),
            Err(e) => (
                fallback_aggregate_id(&delivery.message),
                Input::Invalid(e.to_string()),
            ),
        };
        let key = match aggregate {
            Some(aggregate) => Key::Aggregate {
                subscription: self.id,
                aggregate: aggregate.into(),
            },
            None => {
                let input = match input {
                    Input::Invalid(e) => Input::Invalid(format!(
                        "{e}; no aggregate id in the body, the X-Aggregate-ID header or the key"
                    )),
                    other => other,
                };
                return (
                    Key::Unordered(self.unordered_seq.fetch_add(1, Ordering::Relaxed)),
                    Work { delivery, input },
                );
            }
        };
        (key, Work { delivery, input })
    }

    /// The fast path: one handler attempt. On success or abort the message is
    /// settled here; on failure it is handed back for [`process_retrying`].
    pub(crate) async fn process(&self, work: Work, concurrency: &Semaphore) -> Outcome {
        match self.attempt(&work.delivery, &work.input, concurrency).await {
            Some(Ok(())) => self.finish(&work.delivery, Settle::Ack).await,
            None => self.finish(&work.delivery, Settle::Abandon).await,
            Some(Err(error)) => return Outcome::Retry(Box::new(work), error),
        }
        Outcome::Done
    }

    /// The slow path, after a failed first attempt: retries with backoff, then
    /// dead-letters or parks, and settles.
    pub(crate) async fn process_retrying(&self, work: Work, error: String, concurrency: &Semaphore) {
        let settle = self
            .settle_after_failure(&work.delivery, &work.input, concurrency, error)
            .await;
        self.finish(&work.delivery, settle).await;
    }

    /// Acks, terms or leaves the delivery, and counts it out of the in-flight set.
    async fn finish(&self, delivery: &Delivery, settle: Settle) {
        let settled = match settle {
            Settle::Ack => delivery.acker.ack().await.map(|()| Some(&self.handled)),
            Settle::DeadLetter(reason) => match self.dead_letter(&delivery.message, &reason).await {
                true => delivery.acker.term().await.map(|()| Some(&self.dead_lettered)),
                false => Ok(None),
            },
            Settle::Abandon => Ok(None),
        };
        match settled {
            Ok(Some(counter)) => {
                counter.fetch_add(1, Ordering::Relaxed);
            }
            Ok(None) => {}
            // The broker will redeliver: at-least-once.
            Err(e) => self.record_error(format!("ack failed: {e}")),
        }
        if self.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
    }

    async fn settle_after_failure(
        &self,
        delivery: &Delivery,
        input: &Input,
        concurrency: &Semaphore,
        first_error: String,
    ) -> Settle {
        let mut attempt = 1;
        let mut error = first_error;
        let mut stalled = false;
        let settle = loop {
            self.failed_attempts.fetch_add(1, Ordering::Relaxed);
            self.record_error(error.clone());
            let exhausted = attempt >= self.retry.max_attempts || matches!(input, Input::Invalid(_));
            if exhausted && self.dead_letter_topic.is_some() {
                break Settle::DeadLetter(error);
            }
            if exhausted && !stalled {
                stalled = true;
                self.stalled.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(topic = %self.topic, group = %self.group, %error, "aggregate parked: no dead-letter topic");
            }
            if !self.sleep(self.retry.backoff(attempt)).await {
                break Settle::Abandon;
            }
            attempt = attempt.saturating_add(1);
            error = match self.attempt(delivery, input, concurrency).await {
                None => break Settle::Abandon,
                Some(Ok(())) => break Settle::Ack,
                Some(Err(e)) => e,
            };
        };
        if stalled {
            self.stalled.fetch_sub(1, Ordering::Relaxed);
        }
        settle
    }

    /// One handler call; `None` when the subscription was aborted first.
    async fn attempt(
        &self,
        delivery: &Delivery,
        input: &Input,
        concurrency: &Semaphore,
    ) -> Option<Result<(), String>> {
        let _permit = tokio::select! {
            p = concurrency.acquire() => p.expect("the concurrency semaphore never closes"),
            _ = self.abort.cancelled() => return None,
        };
        let call = match (&self.handler, input) {
            (_, Input::Invalid(reason)) => return Some(Err(reason.clone())),
            (Handler::Raw(h), _) => h(delivery.message.clone()),
            (Handler::Envelope(h), Input::Envelope(e)) => h(e.clone()),
            (Handler::Envelope(_), Input::Raw) => {
                unreachable!("envelope subscriptions classify every delivery")
            }
        };
        let call = AssertUnwindSafe(call).catch_unwind();
        let run = with_progress(call, delivery);
        tokio::select! {
            outcome = run => Some(match outcome {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(panic) => Err(format!("handler panicked: {}", panic_message(&panic))),
            }),
            _ = self.abort.cancelled() => None,
        }
    }

    /// Publishes a copy to the dead-letter topic, retrying with backoff until
    /// it is confirmed; false when the subscription was aborted first.
    async fn dead_letter(&self, message: &Message, reason: &str) -> bool {
        let topic = self.dead_letter_topic.clone().expect("checked by the caller");
        let mut dead = message.clone();
        dead.topic = topic;
        dead.headers.insert(headers::ORIGINAL_TOPIC, self.topic.clone());
        dead.headers.insert(headers::ERROR_MESSAGE, header_safe(reason));
        let mut attempt = 1;
        loop {
            match self.publish_confirmed(dead.clone()).await {
                Ok(()) => {
                    tracing::warn!(topic = %self.topic, dlq = %dead.topic, reason, "message dead-lettered");
                    return true;
                }
                Err(e) => self.record_error(format!("dead-letter publish failed: {e}")),
            }
            if !self.sleep(self.retry.backoff(attempt)).await {
                return false;
            }
            attempt = attempt.saturating_add(1);
        }
    }

    async fn publish_confirmed(&self, message: Message) -> Result<()> {
        let ack = self.backend.publish(message).await?;
        tokio::time::timeout(self.ack_timeout, ack)
            .await
            .map_err(|_| Error::timeout("dead-letter ACK"))??;
        Ok(())
    }

    /// Sleeps unless aborted; false when aborted.
    async fn sleep(&self, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => true,
            _ = self.abort.cancelled() => false,
        }
    }

    fn record_error(&self, error: String) {
        *self.last_error.lock().unwrap() = Some(error);
    }

    async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.in_flight.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }

    pub(crate) fn health(&self) -> SubscriptionHealth {
        SubscriptionHealth {
            topic: self.topic.clone(),
            group: self.group.clone(),
            ordered: matches!(self.handler, Handler::Envelope(_)),
            fetching: self.fetching.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            stalled_aggregates: self.stalled.load(Ordering::Relaxed),
            handled: self.handled.load(Ordering::Relaxed),
            failed_attempts: self.failed_attempts.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            last_error: self.last_error.lock().unwrap().clone(),
        }
    }
}

/// The body as an envelope; failing that, an envelope rebuilt from its
/// `X-Event-*` headers around a raw JSON body.
fn decode_envelope(message: &Message) -> Result<Envelope> {
    let body_error = match Envelope::decode(&message.payload) {
        Ok(envelope) => return Ok(envelope),
        Err(e) => e,
    };
    if message.headers.get(headers::EVENT_ID).is_none() {
        return Err(body_error);
    }
    let payload = std::str::from_utf8(&message.payload)
        .map_err(|e| Error::new(ErrorKind::Serialization, "payload is not UTF-8").with_source(e))
        .and_then(|s| Payload::from_raw(s.to_owned()));
    headers::envelope_from_headers(&message.headers, payload?)
}

/// The aggregate id of a message that is not a valid envelope: the
/// `X-Aggregate-ID` header, then the record key (ORIGIN.md's order after the body).
fn fallback_aggregate_id(message: &Message) -> Option<String> {
    let from_header = message.headers.get(headers::AGGREGATE_ID).map(str::to_owned);
    let from_key = || {
        message
            .key
            .as_ref()
            .and_then(|k| String::from_utf8(k.to_vec()).ok())
    };
    from_header.or_else(from_key).filter(|id| !id.is_empty())
}

async fn with_progress<F: Future>(call: F, delivery: &Delivery) -> F::Output {
    let Some(every) = delivery.acker.in_progress_interval() else {
        return call.await;
    };
    tokio::pin!(call);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            out = &mut call => return out,
            _ = tick.tick() => {
                if let Err(e) = delivery.acker.in_progress().await {
                    tracing::debug!(error = %e, "in-progress ack failed");
                }
            }
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic".into())
}

/// One line of at most [`MAX_ERROR_HEADER_BYTES`]: NATS headers cannot hold CR/LF.
fn header_safe(reason: &str) -> String {
    let mut s: String = reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if s.len() > MAX_ERROR_HEADER_BYTES {
        let mut end = MAX_ERROR_HEADER_BYTES;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// A running subscription. Cloning gives another handle to the same one.
///
/// Created by [`EventBus::subscribe`](crate::EventBus::subscribe) or
/// [`EventBus::subscribe_envelope`](crate::EventBus::subscribe_envelope);
/// closed by [`close`](Subscription::close) or with its bus.
#[derive(Clone)]
pub struct Subscription {
    inner: Arc<SubscriptionInner>,
}

struct SubscriptionInner {
    shared: Arc<SubscriptionShared>,
    fetch: tokio::sync::Mutex<Option<JoinHandle<Box<dyn BackendSubscription>>>>,
    close_timeout: Duration,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("topic", &self.inner.shared.topic)
            .field("group", &self.inner.shared.group)
            .finish()
    }
}

impl Subscription {
    pub(crate) fn start(
        shared: Arc<SubscriptionShared>,
        executor: Arc<OrderedExecutor>,
        source: Box<dyn BackendSubscription>,
        close_timeout: Duration,
    ) -> Self {
        shared.fetching.store(true, Ordering::Relaxed);
        let fetch = tokio::spawn(fetch_loop(shared.clone(), executor, source));
        Self {
            inner: Arc::new(SubscriptionInner {
                shared,
                fetch: tokio::sync::Mutex::new(Some(fetch)),
                close_timeout,
            }),
        }
    }

    /// The topic consumed.
    pub fn topic(&self) -> &str {
        &self.inner.shared.topic
    }

    /// The consumer group.
    pub fn group(&self) -> &str {
        &self.inner.shared.group
    }

    /// Counters and state of this subscription.
    pub fn health(&self) -> SubscriptionHealth {
        self.inner.shared.health()
    }

    /// Whether [`close`](Subscription::close) has run.
    pub fn is_closed(&self) -> bool {
        self.inner.shared.stop_fetch.is_cancelled()
    }

    /// Stops fetching, lets in-flight handlers finish within the bus's
    /// `close_timeout_ms`, then leaves the group. Unsettled messages are
    /// redelivered to the group later. Idempotent.
    ///
    /// # Errors
    /// [`Timeout`](ErrorKind::Timeout) when handlers were still running at the
    /// deadline (they are cancelled and their messages redelivered later).
    pub async fn close(&self) -> Result<()> {
        let mut fetch = self.inner.fetch.lock().await;
        let Some(task) = fetch.take() else { return Ok(()) };
        let shared = &self.inner.shared;
        shared.stop_fetch.cancel();
        let source = task
            .await
            .map_err(|e| Error::new(ErrorKind::Backend, "fetch loop failed").with_source(e))?;
        let drained = tokio::time::timeout(self.inner.close_timeout, shared.wait_idle()).await;
        shared.abort.cancel();
        shared.wait_idle().await;
        let left = source.close().await;
        drained.map_err(|_| {
            Error::timeout(format!(
                "handlers of {} still running after {:?}; their messages will be redelivered",
                shared.topic, self.inner.close_timeout
            ))
        })?;
        left
    }
}

async fn fetch_loop(
    shared: Arc<SubscriptionShared>,
    executor: Arc<OrderedExecutor>,
    mut source: Box<dyn BackendSubscription>,
) -> Box<dyn BackendSubscription> {
    loop {
        let slot = tokio::select! {
            _ = shared.stop_fetch.cancelled() => break,
            slot = executor.reserve() => slot,
        };
        let next = tokio::select! {
            _ = shared.stop_fetch.cancelled() => break,
            next = source.next() => next,
        };
        match next {
            None => break,
            Some(Err(e)) => {
                tracing::warn!(topic = %shared.topic, error = %e, "fetch failed");
                shared.record_error(format!("fetch failed: {e}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Some(Ok(delivery)) => {
                let (key, work) = shared.classify(delivery);
                shared.in_flight.fetch_add(1, Ordering::AcqRel);
                let job = Job {
                    work,
                    subscription: shared.clone(),
                    slot,
                };
                executor.submit(key, job);
            }
        }
    }
    shared.fetching.store(false, Ordering::Relaxed);
    source
}
