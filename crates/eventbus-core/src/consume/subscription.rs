//! Subscriptions: their options, the [`Subscription`] handle, and the
//! fetch loop that feeds the ordered executor under the subscription's own
//! in-flight limit.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::task::JoinHandle;

use super::executor::OrderedExecutor;
use super::process::{Job, SubscriptionShared};
use crate::backend::BackendSubscription;
use crate::dead_letter::DeadLetterPolicy;
use crate::error::{Error, ErrorKind, Result};
use crate::health::SubscriptionHealth;
use crate::retry::RetryPolicy;

/// Longest wait, after `close_timeout_ms` passed and running handlers were
/// cancelled, for their messages to be handed back.
const ABORT_WAIT: Duration = Duration::from_secs(1);

/// Options of one subscription: its consumer group, retry policy and dead-letter topic.
#[derive(Debug, Clone, PartialEq)]
pub struct SubscribeOptions {
    /// The consumer group. Each group gets every message; the members of one
    /// group (subscriptions with the same group, in any process) share them.
    pub group: String,
    /// Overrides `consumer.retry` for this subscription.
    pub retry: Option<RetryPolicy>,
    /// Where exhausted messages go; `None` (default): the bus's
    /// `consumer.dead_letter`.
    pub dead_letter: Option<DeadLetterPolicy>,
}

impl SubscribeOptions {
    /// Options for consumer group `group`, with the bus's retry and dead-letter defaults.
    pub fn group(group: impl Into<String>) -> Self {
        Self {
            group: group.into(),
            retry: None,
            dead_letter: None,
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
        self.dead_letter = Some(DeadLetterPolicy::topic(topic));
        self
    }

    /// Parks failing aggregates instead of dead-lettering
    /// ([`DeadLetterPolicy::Disabled`]).
    #[must_use]
    pub fn park_on_failure(mut self) -> Self {
        self.dead_letter = Some(DeadLetterPolicy::Disabled);
        self
    }
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
        executor: Arc<OrderedExecutor<Box<Job>>>,
        source: Box<dyn BackendSubscription>,
        close_timeout: Duration,
    ) -> Self {
        shared.fetching.store(true, Ordering::Relaxed);
        let fetch = tokio::spawn(fetch_loop(shared.clone(), executor, source));
        // The lag gauge, every second until close.
        let gauge = shared.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = gauge.stop_fetch.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                let _ = gauge.lag();
            }
        });
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
    /// `close_timeout_ms`, then cancels the rest (waiting at most 1 s more for
    /// that), hands unsettled messages back (`nak`) and leaves the group.
    /// Unsettled messages are redelivered to the group. Idempotent.
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
        if tokio::time::timeout(ABORT_WAIT, shared.wait_idle())
            .await
            .is_err()
        {
            tracing::warn!(topic = %shared.topic, "messages still unsettled after cancelling their handlers");
        }
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
    executor: Arc<OrderedExecutor<Box<Job>>>,
    mut source: Box<dyn BackendSubscription>,
) -> Box<dyn BackendSubscription> {
    loop {
        // The non-waiting paths below never yield: let others run now and then.
        tokio::task::coop::consume_budget().await;
        // A backlog goes through the non-waiting paths: no futures per message.
        let slot = match shared.try_reserve() {
            Some(slot) => slot,
            None => tokio::select! {
                biased;
                _ = shared.stop_fetch.cancelled() => break,
                slot = shared.reserve() => slot,
            },
        };
        // Stop once close has begun (also while this loop yielded or waited for room).
        if shared.stop_fetch.is_cancelled() {
            break;
        }
        let next = match source.try_next() {
            Some(next) => Some(next),
            None => tokio::select! {
                biased;
                _ = shared.stop_fetch.cancelled() => break,
                next = source.next() => next,
            },
        };
        match next {
            None => break,
            Some(Err(e)) => {
                tracing::warn!(topic = %shared.topic, error = %e, "fetch failed");
                shared.record_error(format!("fetch failed: {e}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Some(Ok(delivery)) => {
                let (key, job) = shared.job(delivery, slot);
                executor.submit(key, Box::new(job));
            }
        }
    }
    shared.fetching.store(false, Ordering::Relaxed);
    source
}
