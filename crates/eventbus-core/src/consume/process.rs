//! What happens to one fetched message: classify it (ordering key, handler
//! input), run handler attempts, retry with backoff, then dead-letter or
//! park, and settle it with the backend (ack, term or nak).
//!
//! Guarantees enforced here:
//! - an attempt starts only while the delivery is still owned
//!   ([`Ownership`]) and the subscription is not aborted, and is cancelled
//!   when either ends, so a revoked Kafka partition never runs twice;
//! - every wait is bounded or cancellable: handler attempts by
//!   `consumer.handler_timeout_ms`, both stages of a dead-letter publish by
//!   `publish.timeout_ms` / `publish.ack_timeout_ms`, backoffs by close and
//!   revoke;
//! - an aggregate whose message cannot be settled (parked, or its dead
//!   letter cannot be published) is reported stalled at once.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::executor::{Key, Task};
use crate::backend::Backend;
use crate::codec::{self, decode_envelope, fallback_aggregate_id};
use crate::dead_letter;
use crate::envelope::Envelope;
use crate::error::{BoxError, Error, Result};
use crate::health::SubscriptionHealth;
use crate::message::{Delivery, Message, Ownership};
use crate::publish::Publisher;
use crate::retry::RetryPolicy;

pub(crate) type HandlerFn<T> = Arc<dyn Fn(T) -> BoxFuture<'static, Result<(), BoxError>> + Send + Sync>;

/// A user's handler: raw messages (unordered) or envelopes (ordered per aggregate).
pub(crate) enum Handler {
    Raw(HandlerFn<Message>),
    Envelope(HandlerFn<Envelope>),
}

/// A fetched message and what the handler will get.
pub(crate) struct Work {
    delivery: Delivery,
    input: Input,
    /// The delivery's `receive` span, from fetch to settlement.
    span: tracing::Span,
    /// Its entry in the subscription's unsettled event times.
    unsettled_key: usize,
}

enum Input {
    Raw,
    /// An envelope's event id (as the recent ids keep it) and time, and the
    /// envelope itself until the first attempt moves it into the handler
    /// (no copy per delivery; a retry decodes the message again).
    Envelope {
        envelope: Option<Envelope>,
        id: RecentId,
        timestamp: crate::Timestamp,
    },
    /// Not an envelope: dead-lettered without calling the handler.
    Invalid(String),
}

/// How one attempt ended.
enum Attempted {
    Ok,
    Failed(String),
    /// Closed or revoked first: the handler did not run or was cancelled.
    Stopped,
}

/// How a message is settled with its backend.
enum Settle {
    Ack,
    /// Settled before (its event id is among the recent ones): acked, not handled again.
    AckDuplicate,
    DeadLettered,
    /// Closed first: handed back (nak) for redelivery.
    Abandon,
    /// The backend took it back (revoked): not ours to settle.
    Revoked,
}

/// A fetched message in the executor: its work, its subscription and the
/// subscription's in-flight slot it holds until settled.
pub(crate) struct Job {
    work: Work,
    first_error: Option<String>,
    subscription: Arc<SubscriptionShared>,
    _slot: OwnedSemaphorePermit,
}

impl Drop for Job {
    /// Settled, or dropped unsettled (closing): no longer counts for the
    /// oldest unsettled age.
    fn drop(&mut self) {
        let key = self.work.unsettled_key;
        self.subscription.unsettled.lock().unwrap().try_remove(key);
    }
}

/// Boxed in the executor: a job is about 500 bytes, and the queue, the
/// worker and each attempt would otherwise copy it whole.
impl Task for Box<Job> {
    async fn first(mut self, concurrency: &Semaphore) -> Option<Self> {
        let sub = self.subscription.clone();
        if sub.settled_before(&self.work) {
            sub.finish(&self.work, Settle::AckDuplicate).await;
            return None;
        }
        let settle = match sub.attempt(&mut self.work, concurrency).await {
            Attempted::Ok => Settle::Ack,
            Attempted::Stopped => sub.stopped(&self.work.delivery),
            Attempted::Failed(error) => {
                self.first_error = Some(error);
                return Some(self);
            }
        };
        sub.finish(&self.work, settle).await;
        None
    }

    async fn retry(mut self, concurrency: &Semaphore) {
        let sub = self.subscription.clone();
        let error = self.first_error.take().unwrap_or_default();
        let settle = sub.settle_after_failure(&mut self.work, concurrency, error).await;
        sub.finish(&self.work, settle).await;
    }
}

/// State shared by a subscription's fetch loop, its jobs and its handle.
pub(crate) struct SubscriptionShared {
    id: u64,
    pub(crate) topic: String,
    pub(crate) group: String,
    handler: Handler,
    retry: RetryPolicy,
    dead_letter_topic: Option<String>,
    backend: Arc<dyn Backend>,
    /// The bus's publisher: dead letters take its window and timeouts and
    /// count in its metrics, like every other publish.
    publisher: Arc<Publisher>,
    handler_timeout: Option<Duration>,
    /// This subscription's in-flight limit: one permit per fetched, unsettled message.
    slots: Arc<Semaphore>,
    pub(crate) stop_fetch: CancellationToken,
    pub(crate) abort: CancellationToken,
    pub(crate) fetching: AtomicBool,
    in_flight: AtomicUsize,
    idle: Notify,
    stalled: AtomicUsize,
    handled: AtomicU64,
    failed_attempts: AtomicU64,
    dead_lettered: AtomicU64,
    duplicates_skipped: AtomicU64,
    /// Event ids settled most recently (`consumer.dedup_window`).
    recent: Mutex<RecentIds>,
    unordered_seq: AtomicU64,
    /// Hashes aggregate ids into ordering keys ([`Key::aggregate`]).
    aggregate_seed: foldhash::fast::RandomState,
    last_error: Mutex<Option<String>>,
    /// The backend's view of this member's share of the group.
    assignment: Option<Arc<Mutex<crate::GroupAssignment>>>,
    /// The same figures through the `metrics` facade.
    metrics: crate::telemetry::SubscriptionMetrics,
    /// The backend's lag measurement.
    lag: Option<crate::LagProbe>,
    lag_alert_messages: u64,
    lag_alert_age_ms: u64,
    /// Event times (ms since the epoch) of fetched and unsettled
    /// deliveries: the oldest gives the age the health reports. A slab: O(1)
    /// per delivery, at most `max_in_flight` entries, scanned only by
    /// [`health`](SubscriptionShared::health).
    unsettled: Mutex<slab::Slab<i64>>,
}

/// What [`SubscriptionShared::new`] needs.
pub(crate) struct SubscriptionParams {
    pub(crate) id: u64,
    pub(crate) topic: String,
    pub(crate) group: String,
    pub(crate) handler: Handler,
    pub(crate) retry: RetryPolicy,
    pub(crate) dead_letter_topic: Option<String>,
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) publisher: Arc<Publisher>,
    pub(crate) handler_timeout: Option<Duration>,
    pub(crate) max_in_flight: usize,
    pub(crate) dedup_window: usize,
    pub(crate) assignment: Option<Arc<Mutex<crate::GroupAssignment>>>,
    pub(crate) lag: Option<crate::LagProbe>,
    pub(crate) lag_alert_messages: u64,
    pub(crate) lag_alert_age_ms: u64,
}

impl SubscriptionShared {
    pub(crate) fn new(p: SubscriptionParams) -> Arc<Self> {
        let metrics = crate::telemetry::SubscriptionMetrics::new(p.backend.name(), &p.topic, &p.group);
        Arc::new(Self {
            id: p.id,
            topic: p.topic,
            group: p.group,
            handler: p.handler,
            retry: p.retry,
            dead_letter_topic: p.dead_letter_topic,
            backend: p.backend,
            publisher: p.publisher,
            handler_timeout: p.handler_timeout,
            slots: Arc::new(Semaphore::new(p.max_in_flight)),
            stop_fetch: CancellationToken::new(),
            abort: CancellationToken::new(),
            fetching: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            idle: Notify::new(),
            stalled: AtomicUsize::new(0),
            handled: AtomicU64::new(0),
            failed_attempts: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            duplicates_skipped: AtomicU64::new(0),
            recent: Mutex::new(RecentIds::new(p.dedup_window)),
            unordered_seq: AtomicU64::new(0),
            aggregate_seed: foldhash::fast::RandomState::default(),
            last_error: Mutex::new(None),
            metrics,
            lag: p.lag,
            lag_alert_messages: p.lag_alert_messages,
            lag_alert_age_ms: p.lag_alert_age_ms,
            unsettled: Mutex::new(slab::Slab::new()),
            assignment: p.assignment,
        })
    }

    /// Waits for room for one more message in this subscription
    /// (backpressure for its fetch loop; other subscriptions are unaffected).
    pub(crate) async fn reserve(&self) -> OwnedSemaphorePermit {
        self.slots
            .clone()
            .acquire_owned()
            .await
            .expect("a subscription never closes its slot semaphore")
    }

    /// Room for one more message if there is some now, without waiting.
    pub(crate) fn try_reserve(&self) -> Option<OwnedSemaphorePermit> {
        self.slots.clone().try_acquire_owned().ok()
    }

    /// Turns a delivery into a job under its ordering key.
    pub(crate) fn job(self: &Arc<Self>, delivery: Delivery, slot: OwnedSemaphorePermit) -> (Key, Job) {
        let (key, work) = self.classify(delivery);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.metrics.in_flight.increment(1.0);
        let job = Job {
            work,
            first_error: None,
            subscription: self.clone(),
            _slot: slot,
        };
        (key, job)
    }

    /// Decides the ordering key and the handler's input of a delivery.
    fn classify(&self, delivery: Delivery) -> (Key, Work) {
        let (key, input) = self.key_and_input(&delivery);
        let id = match &input {
            Input::Envelope {
                envelope: Some(e), ..
            } => Some(e.event_id.as_str()),
            _ => delivery.message.headers.get(crate::headers::EVENT_ID),
        };
        let span = crate::trace::receive_span(self.backend.name(), &self.group, &delivery.message, id);
        // Its age counts from the envelope's timestamp, else from now.
        let at = match &input {
            Input::Envelope { timestamp, .. } => timestamp.timestamp_millis(),
            _ => chrono::Utc::now().timestamp_millis(),
        };
        let unsettled_key = self.unsettled.lock().unwrap().insert(at);
        (
            key,
            Work {
                delivery,
                input,
                span,
                unsettled_key,
            },
        )
    }

    fn key_and_input(&self, delivery: &Delivery) -> (Key, Input) {
        if let Handler::Raw(_) = self.handler {
            return (self.unordered_key(), Input::Raw);
        }
        let (aggregate, input) = match decode_envelope(&delivery.message) {
            Ok(envelope) => (
                Some(Key::aggregate(
                    self.id,
                    &self.aggregate_seed,
                    &envelope.aggregate_id,
                )),
                Input::Envelope {
                    id: RecentId::of(&envelope.event_id),
                    timestamp: envelope.timestamp,
                    envelope: Some(envelope),
                },
            ),
            Err(e) => (
                fallback_aggregate_id(&delivery.message)
                    .map(|id| Key::aggregate(self.id, &self.aggregate_seed, &id)),
                Input::Invalid(e.to_string()),
            ),
        };
        match aggregate {
            Some(key) => (key, input),
            None => {
                let input = match input {
                    Input::Invalid(e) => Input::Invalid(format!(
                        "{e}; no aggregate id in the body, the X-Aggregate-ID header or the key"
                    )),
                    other => other,
                };
                (self.unordered_key(), input)
            }
        }
    }

    /// A key of its own for a message that needs no order.
    fn unordered_key(&self) -> Key {
        Key::Unordered {
            subscription: self.id,
            seq: self.unordered_seq.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// How a message that was stopped before settling is left.
    fn stopped(&self, delivery: &Delivery) -> Settle {
        match &delivery.ownership {
            Some(o) if o.is_lost() => Settle::Revoked,
            _ => Settle::Abandon,
        }
    }

    /// Whether `work` is an envelope this subscription settled recently.
    fn settled_before(&self, work: &Work) -> bool {
        match &work.input {
            Input::Envelope { id, .. } => self.recent.lock().unwrap().contains(id),
            _ => false,
        }
    }

    /// Acks, terms or naks the delivery, and counts it out of the in-flight set.
    async fn finish(&self, work: &Work, settle: Settle) {
        let delivery = &work.delivery;
        // Handled ones only: a dead letter sent back to its topic (redriven) is handled again.
        if let (Settle::Ack, Input::Envelope { id, .. }) = (&settle, &work.input) {
            self.recent.lock().unwrap().insert(id);
        }
        let ack = || async {
            match delivery.acker.ack_now() {
                Some(acked) => acked,
                None => delivery.acker.ack().await,
            }
        };
        let settled = match settle {
            Settle::Ack => ack().await.map(|()| Some(&self.handled)),
            Settle::AckDuplicate => ack().await.map(|()| Some(&self.duplicates_skipped)),
            Settle::DeadLettered => delivery.acker.term().await.map(|()| Some(&self.dead_lettered)),
            Settle::Abandon => delivery.acker.nak(None).await.map(|()| None),
            Settle::Revoked => Ok(None),
        };
        match settled {
            Ok(Some(counter)) => {
                counter.fetch_add(1, Ordering::Relaxed);
                match settle {
                    Settle::Ack => {
                        self.metrics.handled.increment(1);
                        if let Input::Envelope { timestamp, .. } = &work.input {
                            self.metrics.end_to_end(timestamp);
                        }
                    }
                    Settle::AckDuplicate => self.metrics.duplicates_skipped.increment(1),
                    Settle::DeadLettered => self.metrics.dead_lettered.increment(1),
                    Settle::Abandon | Settle::Revoked => {}
                }
            }
            Ok(None) => {}
            // The broker will redeliver: at-least-once.
            Err(e) => self.record_error(format!("settling failed: {e}")),
        }
        self.metrics.in_flight.decrement(1.0);
        if self.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
    }

    /// After a failed first attempt: retries with backoff, then dead-letters
    /// (retrying the dead-letter publish with backoff until it is confirmed)
    /// or parks the aggregate (retrying the handler with capped backoff).
    async fn settle_after_failure(
        &self,
        work: &mut Work,
        concurrency: &Semaphore,
        first_error: String,
    ) -> Settle {
        let mut attempt = 1;
        let mut error = first_error;
        let mut stalled = false;
        let mut handler_failed = true;
        let settle = loop {
            self.failed_attempts.fetch_add(1, Ordering::Relaxed);
            if handler_failed {
                self.metrics.handler_errors.increment(1);
                self.record_error(error.clone());
            }
            let exhausted = attempt >= self.retry.max_attempts || matches!(work.input, Input::Invalid(_));
            if exhausted && let Some(dlq) = &self.dead_letter_topic {
                match self.publish_dead_letter(&work.delivery, dlq, &error).await {
                    Attempted::Ok => {
                        tracing::warn!(topic = %self.topic, %dlq, reason = %error, "message dead-lettered");
                        break Settle::DeadLettered;
                    }
                    Attempted::Stopped => break self.stopped(&work.delivery),
                    Attempted::Failed(e) => {
                        // A failed dead-letter publish is a failed attempt:
                        // the aggregate is stalled until it goes through.
                        self.record_error(format!(
                            "dead-letter publish to {dlq} failed: {e}; handler error: {error}"
                        ));
                    }
                }
            }
            if exhausted && !stalled {
                stalled = true;
                self.stalled.fetch_add(1, Ordering::Relaxed);
                self.metrics.stalled.increment(1.0);
                tracing::warn!(topic = %self.topic, group = %self.group, %error, "aggregate stalled");
            }
            if !self.sleep(self.retry.backoff(attempt), &work.delivery).await {
                break self.stopped(&work.delivery);
            }
            attempt = attempt.saturating_add(1);
            if exhausted && self.dead_letter_topic.is_some() {
                handler_failed = false;
                continue; // retry the dead letter, not the handler
            }
            self.metrics.retries.increment(1);
            error = match self.attempt(work, concurrency).await {
                Attempted::Stopped => break self.stopped(&work.delivery),
                Attempted::Ok => break Settle::Ack,
                Attempted::Failed(e) => e,
            };
        };
        if stalled {
            self.stalled.fetch_sub(1, Ordering::Relaxed);
            self.metrics.stalled.decrement(1.0);
        }
        settle
    }

    /// One handler call, unless closed or revoked first.
    ///
    /// The common case registers no waiter and no timer: a free permit is
    /// taken without waiting, and a handler that finishes on its first poll
    /// is done before the stop signals are polled.
    async fn attempt(&self, work: &mut Work, concurrency: &Semaphore) -> Attempted {
        let delivery = &work.delivery;
        let ownership = delivery.ownership.as_ref();
        let _permit = match concurrency.try_acquire() {
            Ok(permit) if !self.abort.is_cancelled() => permit,
            _ => tokio::select! {
                biased;
                _ = self.abort.cancelled() => return Attempted::Stopped,
                _ = revoked(ownership) => return Attempted::Stopped,
                p = concurrency.acquire() => p.expect("the concurrency semaphore never closes"),
            },
        };
        let _running = match ownership.map(Ownership::begin_attempt) {
            Some(None) => return Attempted::Stopped,
            Some(guard) => guard,
            None => None,
        };
        let call = match (&self.handler, &mut work.input) {
            (_, Input::Invalid(reason)) => return Attempted::Failed(reason.clone()),
            (Handler::Raw(h), _) => h(delivery.message.clone()),
            (Handler::Envelope(h), Input::Envelope { envelope, .. }) => match envelope.take() {
                Some(envelope) => h(envelope),
                // A retry: the first attempt took the decoded one.
                None => match decode_envelope(&delivery.message) {
                    Ok(envelope) => h(envelope),
                    Err(e) => return Attempted::Failed(e.to_string()),
                },
            },
            (Handler::Envelope(_), Input::Raw) => {
                unreachable!("envelope subscriptions classify every delivery")
            }
        };
        let span = crate::trace::process_span(&work.span, &self.topic);
        let call = AssertUnwindSafe(call.instrument(span.clone())).catch_unwind();
        let limit = self.handler_timeout;
        let metrics = &self.metrics;
        // One async block, its layers built inside it: an async block that
        // awaits a captured future keeps it twice (the capture and the
        // awaited value), so a block per layer doubled the attempt's state
        // at each layer, to 5 KB, copied for every message.
        let run = async move {
            let started = std::time::Instant::now();
            let outcome = match limit {
                Some(limit) => tokio::time::timeout(limit, with_progress(fenced(call, ownership), delivery))
                    .await
                    .ok(),
                None => Some(with_progress(fenced(call, ownership), delivery).await),
            };
            metrics.handler_duration(started.elapsed());
            outcome
        };
        tokio::select! {
            biased;
            outcome = run => match outcome {
                Some(None) => Attempted::Stopped,
                Some(Some(Ok(Ok(())))) => Attempted::Ok,
                Some(Some(Ok(Err(e)))) => Attempted::Failed(e.to_string()),
                Some(Some(Err(panic))) => Attempted::Failed(format!("handler panicked: {}", panic_message(&panic))),
                None => Attempted::Failed(format!(
                    "handler timed out after {} ms (consumer.handler_timeout_ms)",
                    limit.unwrap_or_default().as_millis()
                )),
            },
            _ = self.abort.cancelled() => Attempted::Stopped,
            _ = aborted(ownership) => Attempted::Stopped,
        }
    }

    /// Publishes the dead letter once, through the bus's publisher (its
    /// window, bounded by `publish.timeout_ms`; its ACK wait, bounded by
    /// `publish.ack_timeout_ms`; its metrics); stops on close or revoke.
    async fn publish_dead_letter(&self, delivery: &Delivery, dlq: &str, reason: &str) -> Attempted {
        if delivery.ownership.as_ref().is_some_and(Ownership::is_lost) {
            return Attempted::Stopped; // the next owner decides
        }
        let dead = dead_letter::dead_letter(&delivery.message, &self.topic, dlq, reason);
        let meta = codec::message_result_meta(&dead);
        let publish = async {
            let handle = self.publisher.publish(meta, self.backend.publish(dead)).await?;
            match handle.await.error {
                None => Ok(()),
                Some(e) => Err(Error::new(e.kind(), format!("dead-letter publish: {e}"))),
            }
        };
        tokio::select! {
            r = publish => match r {
                Ok(()) => Attempted::Ok,
                Err(e) => Attempted::Failed(e.to_string()),
            },
            _ = self.abort.cancelled() => Attempted::Stopped,
            _ = revoked(delivery.ownership.as_ref()) => Attempted::Stopped,
        }
    }

    /// Sleeps unless closed or revoked; false when stopped.
    async fn sleep(&self, d: Duration, delivery: &Delivery) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => true,
            _ = self.abort.cancelled() => false,
            _ = revoked(delivery.ownership.as_ref()) => false,
        }
    }

    pub(crate) fn record_error(&self, error: String) {
        *self.last_error.lock().unwrap() = Some(error);
    }

    /// Waits until no message of this subscription is in flight.
    pub(crate) async fn wait_idle(&self) {
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
        let lag = self.lag();
        let oldest = self.unsettled.lock().unwrap().iter().map(|(_, at)| *at).min();
        let oldest_unsettled_age_ms =
            oldest.map(|at| (chrono::Utc::now().timestamp_millis() - at).max(0) as u64);
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
            duplicates_skipped: self.duplicates_skipped.load(Ordering::Relaxed),
            last_error: self.last_error.lock().unwrap().clone(),
            assignment: self.assignment.as_ref().map(|a| a.lock().unwrap().clone()),
            lag,
            oldest_unsettled_age_ms,
            lag_alert: lag.is_some_and(|l| self.lag_alert_messages > 0 && l >= self.lag_alert_messages)
                || oldest_unsettled_age_ms
                    .is_some_and(|a| self.lag_alert_age_ms > 0 && a >= self.lag_alert_age_ms),
        }
    }

    /// The backend's lag measurement, also set on the lag gauge.
    pub(crate) fn lag(&self) -> Option<u64> {
        let lag = self.lag.as_ref().and_then(|probe| probe());
        if let Some(lag) = lag {
            self.metrics.lag.set(lag as f64);
        }
        lag
    }
}

/// The last `capacity` settled event ids, oldest first out.
struct RecentIds {
    uuids: std::collections::HashSet<u128, foldhash::fast::RandomState>,
    /// The same allocations as in `order`.
    texts: std::collections::HashSet<Arc<str>, foldhash::fast::RandomState>,
    order: std::collections::VecDeque<RecentId>,
    capacity: usize,
}

/// An event id as [`RecentIds`] keep it: a UUID in the canonical lowercase
/// form (ours are UUIDv7, the Go SDK's UUIDv4) as its 128 bits, exactly
/// and with no allocation; any other id as its text.
#[derive(Clone)]
enum RecentId {
    Uuid(u128),
    Text(Arc<str>),
}

impl RecentId {
    fn of(id: &str) -> Self {
        match uuid_bits(id) {
            Some(bits) => RecentId::Uuid(bits),
            None => RecentId::Text(Arc::from(id)),
        }
    }
}

impl RecentIds {
    fn new(capacity: usize) -> Self {
        Self {
            uuids: std::collections::HashSet::default(),
            texts: std::collections::HashSet::default(),
            order: std::collections::VecDeque::new(),
            capacity,
        }
    }

    fn contains(&self, id: &RecentId) -> bool {
        match id {
            RecentId::Uuid(bits) => self.uuids.contains(bits),
            RecentId::Text(text) => self.texts.contains(text),
        }
    }

    fn insert(&mut self, id: &RecentId) {
        if self.capacity == 0 || self.contains(id) {
            return;
        }
        if self.order.len() == self.capacity {
            match self.order.pop_front() {
                Some(RecentId::Uuid(bits)) => {
                    self.uuids.remove(&bits);
                }
                Some(RecentId::Text(old)) => {
                    self.texts.remove(&old);
                }
                None => {}
            }
        }
        match id {
            RecentId::Uuid(bits) => {
                self.uuids.insert(*bits);
            }
            RecentId::Text(text) => {
                self.texts.insert(text.clone());
            }
        }
        self.order.push_back(id.clone());
    }
}

/// The 128 bits of `id` when it is a UUID written as
/// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` in lowercase hex (RFC 9562's
/// canonical form, as both SDKs write it); `None` for any other text, so
/// two distinct ids never share bits (`ABC…` and `abc…` stay apart).
fn uuid_bits(id: &str) -> Option<u128> {
    // `uuid` also parses uppercase, braced and undashed forms: keep only
    // ids that are exactly its lowercase hyphenated text.
    let uuid = uuid::Uuid::try_parse(id).ok()?;
    let mut text = uuid::Uuid::encode_buffer();
    (uuid.hyphenated().encode_lower(&mut text) == id).then(|| uuid.as_u128())
}

/// Resolves when `ownership` is revoked or its lease deadline passed
/// (checked every 100 ms); never without one.
async fn revoked(ownership: Option<&Ownership>) {
    let Some(o) = ownership else {
        return std::future::pending().await;
    };
    loop {
        if o.is_lost() {
            return;
        }
        tokio::select! {
            _ = o.revoked() => return,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

/// Resolves when running attempts under `ownership` must stop; never without one.
async fn aborted(ownership: Option<&Ownership>) {
    match ownership {
        Some(o) => o.aborted().await,
        None => std::future::pending().await,
    }
}

/// Polls `call` only while `ownership` holds: once its lease deadline has
/// passed, the handler is not polled again (`None`), even when the process
/// wakes from a stop before the backend noticed the lease was lost.
async fn fenced<F: Future>(call: F, ownership: Option<&Ownership>) -> Option<F::Output> {
    let Some(ownership) = ownership else {
        return Some(call.await);
    };
    let mut call = std::pin::pin!(call);
    std::future::poll_fn(|cx| {
        if ownership.is_expired() {
            return std::task::Poll::Ready(None);
        }
        call.as_mut().poll(cx).map(Some)
    })
    .await
}

async fn with_progress<F: Future>(call: F, delivery: &Delivery) -> F::Output {
    let Some(every) = delivery.acker.in_progress_interval() else {
        return call.await;
    };
    tokio::pin!(call);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            biased;
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

#[cfg(test)]
mod tests {
    use super::{RecentId, RecentIds, uuid_bits};

    /// A pooled worker builds a job's first attempt for every message, and
    /// the attempt's state is copied with it: it must stay small. It was
    /// 5,304 bytes (the first attempt 6,336) while the attempt wrapped the
    /// handler call in an async block per layer, each keeping the layer
    /// inside it twice; 1,120 since stop 30.
    #[tokio::test]
    async fn a_first_attempt_keeps_its_state_small() {
        use std::sync::Arc;
        use std::time::Duration;

        use super::{Handler, HandlerFn, SubscriptionParams, SubscriptionShared};
        use crate::consume::executor::Task;
        use crate::message::{Acker, Delivery, Message};

        struct Settles;
        #[async_trait::async_trait]
        impl Acker for Settles {
            async fn ack(&self) -> crate::Result<()> {
                Ok(())
            }
        }
        let backend: Arc<dyn crate::backend::Backend> =
            Arc::new(crate::memory::MemoryBackend::new(Default::default()));
        let publisher = Arc::new(crate::publish::Publisher::new(
            &crate::BusConfig::default(),
            16,
            "memory",
        ));
        let handler: HandlerFn<crate::Envelope> = Arc::new(|_| Box::pin(async { Ok(()) }));
        let sub = SubscriptionShared::new(SubscriptionParams {
            id: 1,
            topic: "orders".into(),
            group: "g".into(),
            handler: Handler::Envelope(handler),
            retry: Default::default(),
            dead_letter_topic: None,
            backend,
            publisher,
            handler_timeout: Some(Duration::from_secs(1)),
            max_in_flight: 4,
            dedup_window: 16,
            assignment: None,
            lag: None,
            lag_alert_messages: 0,
            lag_alert_age_ms: 0,
        });
        let envelope = crate::Envelope::builder("order-1", "OrderCreated", 1)
            .json_payload(&1)
            .unwrap()
            .build()
            .unwrap();
        let message = crate::codec::envelope_message("orders", &envelope, Default::default()).unwrap();
        let delivery = Delivery {
            message: Message {
                dedup_id: None,
                ..message
            },
            position: None,
            delivery_count: 1,
            acker: Box::new(Settles),
            ownership: None,
        };
        let (_, job) = sub.job(delivery, sub.try_reserve().unwrap());
        let mut job = Box::new(job);
        let concurrency = tokio::sync::Semaphore::new(1);
        let attempt = sub.attempt(&mut job.work, &concurrency);
        let attempt_bytes = std::mem::size_of_val(&attempt);
        drop(attempt);
        let first = job.first(&concurrency);
        let first_bytes = std::mem::size_of_val(&first);
        assert!(
            attempt_bytes <= 2_048 && first_bytes <= 2_560,
            "an attempt's state is {attempt_bytes} bytes, a first attempt's {first_bytes}"
        );
        assert!(first.await.is_none(), "the handler succeeded: nothing to retry");
    }

    #[test]
    fn only_canonical_lowercase_uuids_become_bits() {
        let id = "0192f0e4-7c1a-7b3e-9f00-0123456789ab";
        assert_eq!(uuid_bits(id), Some(0x0192f0e4_7c1a_7b3e_9f00_0123456789ab));
        for other in [
            "0192F0E4-7C1A-7B3E-9F00-0123456789AB", // uppercase: a different id
            "0192f0e47c1a7b3e9f000123456789ab",     // no dashes
            "0192f0e4-7c1a-7b3e-9f00-0123456789ag", // not hex
            "0192f0e4_7c1a-7b3e-9f00-0123456789ab", // wrong separator
            "order-1",
            "",
        ] {
            assert_eq!(uuid_bits(other), None, "{other}");
        }
    }

    #[test]
    fn recent_ids_remember_the_last_capacity_of_either_form_exactly() {
        let [upper, lower, one, two] = [
            "0192F0E4-7C1A-7B3E-9F00-0123456789AB",
            "0192f0e4-7c1a-7b3e-9f00-0123456789ab",
            "order-1",
            "order-2",
        ]
        .map(RecentId::of);
        let mut recent = RecentIds::new(2);
        recent.insert(&upper);
        assert!(recent.contains(&upper));
        assert!(!recent.contains(&lower), "case matters: distinct event ids");
        recent.insert(&lower);
        recent.insert(&lower);
        assert!(recent.contains(&upper) && recent.contains(&lower));
        recent.insert(&one);
        assert!(!recent.contains(&upper), "the oldest is forgotten first");
        assert!(recent.contains(&lower) && recent.contains(&one));
        recent.insert(&two);
        assert!(!recent.contains(&lower));
        assert!(recent.contains(&one) && recent.contains(&RecentId::of("order-2")));
        let mut none = RecentIds::new(0);
        none.insert(&lower);
        assert!(!none.contains(&lower));
    }
}
