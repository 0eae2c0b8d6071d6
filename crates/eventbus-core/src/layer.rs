//! Handler middleware: an envelope handler can be any
//! [`tower::Service<Envelope>`](Service) ([`EventBus::subscribe_service`](crate::EventBus::subscribe_service)),
//! so behaviour is added as layers around it, as in tower, instead of being
//! written into each handler.
//!
//! Shipped here: [`TimeoutLayer`] and [`ConcurrencyLimitLayer`] (tower's
//! own), [`RateLimitLayer`] (a token bucket, governor's GCRA) and
//! [`TraceLayer`] (a `tracing` span per handler call). The inbox layer
//! (exactly-once effect per event id and handler) is in `eventbus-outbox`,
//! next to its tables.
//!
//! **Order is unchanged by layers.** The whole layered service is the
//! handler: the bus calls it inside the aggregate's slot, one event of an
//! aggregate at a time, and a layer's error (a timeout, a refused request) is
//! a failed attempt like a handler error: retried with the subscription's
//! [`RetryPolicy`](crate::RetryPolicy), then dead-lettered. A layer that waits
//! (rate limit, concurrency limit) holds the aggregate's slot while it waits,
//! and one of the bus's `consumer.concurrency` permits, and the bus's own
//! `consumer.handler_timeout_ms` counts the wait. So:
//! - put [`TimeoutLayer`] inside (after) the waiting layers, as in the
//!   example, so the timeout measures the handler and not the queue;
//! - a limit far below the traffic fills the bus's permits with waiting
//!   calls: give a throttled subscription its own bus, or keep
//!   `consumer.concurrency` above what it can hold.
//!
//! ```
//! use std::time::Duration;
//! use eventbus_core::{Envelope, EventBus, SubscribeOptions, layer};
//! use tower::ServiceBuilder;
//!
//! # async fn demo(bus: EventBus) -> eventbus_core::Result<()> {
//! let handler = ServiceBuilder::new()
//!     .layer(layer::TraceLayer::new("orders", "billing"))
//!     .layer(layer::RateLimitLayer::per_second(100, 10)?)
//!     .layer(layer::TimeoutLayer::new(Duration::from_secs(5)))
//!     .service_fn(|e: Envelope| async move {
//!         println!("{} v{}", e.aggregate_id, e.event_version);
//!         Ok::<_, std::io::Error>(())
//!     });
//! bus.subscribe_service("orders", SubscribeOptions::group("billing"), handler).await?;
//! # Ok(()) }
//! ```

use std::num::NonZeroU32;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::FutureExt;
use futures::future::BoxFuture;
use tower_layer::Layer;
use tower_service::Service;
use tracing::Instrument;

use crate::envelope::Envelope;
use crate::error::{BoxError, ValidationError};

/// Fails a handler call that takes longer than its limit, dropping its
/// future; the error is tower's `Elapsed`, and the attempt counts as failed
/// (retried, then dead-lettered). Tower's layer, re-exported.
///
/// The bus has a timeout of its own too (`consumer.handler_timeout_ms`);
/// this one applies to one subscription, or to one part of a stack.
pub use tower::timeout::TimeoutLayer;

/// At most N handler calls of one subscription at once, across its
/// aggregates (the bus's `consumer.concurrency` bounds the whole bus).
/// Tower's layer, re-exported: clones of the service share one semaphore.
pub use tower::limit::ConcurrencyLimitLayer;

/// A token bucket in front of the handler: at most `burst` calls at once,
/// then one every `1 / rate` seconds on average. A call waits for its token
/// (it never fails for want of one), holding its aggregate's slot.
///
/// The original Go SDK's rate limiter option, as a layer. Clones of the
/// service share one bucket, so the limit is per layer instance: build the
/// layer once per subscription for a per-subscription limit, or share one
/// layer between subscriptions for a common limit. The bucket is
/// [governor](https://docs.rs/governor)'s GCRA, which admits the same calls
/// as a token bucket of the same rate and size.
#[derive(Clone)]
pub struct RateLimitLayer {
    limiter: Arc<governor::DefaultDirectRateLimiter>,
}

impl std::fmt::Debug for RateLimitLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimitLayer").finish_non_exhaustive()
    }
}

impl RateLimitLayer {
    /// `rate` calls per second on average, `burst` at once.
    ///
    /// # Errors
    /// [`ValidationError`] when `rate` or `burst` is 0.
    pub fn per_second(rate: u32, burst: u32) -> Result<Self, ValidationError> {
        let rate = NonZeroU32::new(rate)
            .ok_or_else(|| ValidationError::new("rate", "must be at least 1 per second"))?;
        let burst =
            NonZeroU32::new(burst).ok_or_else(|| ValidationError::new("burst", "must be at least 1"))?;
        let quota = governor::Quota::per_second(rate).allow_burst(burst);
        Ok(Self {
            limiter: Arc::new(governor::RateLimiter::direct(quota)),
        })
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            inner,
            limiter: self.limiter.clone(),
        }
    }
}

/// The service of [`RateLimitLayer`].
#[derive(Clone)]
pub struct RateLimit<S> {
    inner: S,
    limiter: Arc<governor::DefaultDirectRateLimiter>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for RateLimit<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimit")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, R> Service<R> for RateLimit<S>
where
    S: Service<R> + Clone + Send + 'static,
    S::Future: Send + 'static,
    R: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        // The inner service was made ready by poll_ready: call it with this
        // instance, and leave a fresh clone in its place (tower's idiom).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let limiter = self.limiter.clone();
        async move {
            limiter.until_ready().await;
            inner.call(request).await
        }
        .boxed()
    }
}

/// A `tracing` span around each handler call, named `process <topic>` with
/// the OpenTelemetry messaging attributes (`messaging.system`,
/// `messaging.destination.name`, `messaging.consumer.group.name`,
/// `messaging.operation.type = process`, `messaging.message.id` = event id)
/// and the envelope's `eventbus.aggregate_id` and `eventbus.event_version`.
/// A failed call is logged inside the span at `warn` with its error.
#[derive(Debug, Clone)]
pub struct TraceLayer {
    names: Arc<TraceNames>,
}

#[derive(Debug, Clone)]
struct TraceNames {
    system: String,
    topic: String,
    group: String,
}

impl TraceLayer {
    /// Spans for the subscription of `group` to `topic`
    /// (`messaging.system` = `eventbus`; see [`TraceLayer::system`]).
    pub fn new(topic: impl Into<String>, group: impl Into<String>) -> Self {
        Self {
            names: Arc::new(TraceNames {
                system: "eventbus".to_owned(),
                topic: topic.into(),
                group: group.into(),
            }),
        }
    }

    /// Sets `messaging.system` (the semantic conventions' `kafka`, `nats`, ...;
    /// [`EventBus::backend_name`](crate::EventBus::backend_name) gives it).
    pub fn system(mut self, system: impl Into<String>) -> Self {
        Arc::make_mut(&mut self.names).system = system.into();
        self
    }
}

impl<S> Layer<S> for TraceLayer {
    type Service = Trace<S>;

    fn layer(&self, inner: S) -> Trace<S> {
        Trace {
            inner,
            names: self.names.clone(),
        }
    }
}

/// The service of [`TraceLayer`].
#[derive(Debug, Clone)]
pub struct Trace<S> {
    inner: S,
    names: Arc<TraceNames>,
}

impl<S> Service<Envelope> for Trace<S>
where
    S: Service<Envelope>,
    S::Future: Send + 'static,
    S::Error: std::fmt::Display,
    S::Response: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, envelope: Envelope) -> Self::Future {
        let n = &self.names;
        let span = tracing::info_span!(
            "process",
            otel.name = %format_args!("process {}", n.topic),
            otel.kind = "consumer",
            messaging.system = %n.system,
            messaging.destination.name = %n.topic,
            messaging.consumer.group.name = %n.group,
            messaging.operation.type = "process",
            messaging.message.id = %envelope.event_id,
            eventbus.aggregate_id = %envelope.aggregate_id,
            eventbus.event_version = envelope.event_version,
        );
        let call = span.in_scope(|| self.inner.call(envelope));
        async move {
            let outcome = call.await;
            if let Err(e) = &outcome {
                tracing::warn!(error = %e, "handler failed");
            }
            outcome
        }
        .instrument(span)
        .boxed()
    }
}

/// Wraps `service` as the bus's handler: each call clones it, waits until it
/// is ready, calls it (tower's idiom for shared services).
pub(crate) fn handler_of<S>(service: S) -> crate::consume::process::HandlerFn<Envelope>
where
    S: Service<Envelope, Response = ()> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    Arc::new(move |envelope| {
        let mut service = service.clone();
        async move {
            futures::future::poll_fn(|cx| service.poll_ready(cx))
                .await
                .map_err(Into::into)?;
            service.call(envelope).await.map_err(Into::into)
        }
        .boxed()
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use tower::{ServiceBuilder, ServiceExt};
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    fn envelope(version: i64) -> Envelope {
        Envelope::builder("order-1", "Placed", version)
            .json_payload(&serde_json::json!({}))
            .and_then(|b| b.build())
            .unwrap()
    }

    #[tokio::test]
    async fn the_token_bucket_admits_the_burst_then_the_rate() {
        assert_eq!(RateLimitLayer::per_second(0, 1).unwrap_err().field, "rate");
        assert_eq!(RateLimitLayer::per_second(1, 0).unwrap_err().field, "burst");
        let layer = RateLimitLayer::per_second(20, 5).unwrap();
        let service = ServiceBuilder::new()
            .layer(layer)
            .service_fn(|_: Envelope| async { Ok::<_, std::io::Error>(()) });
        let started = Instant::now();
        for v in 1..=5 {
            service.clone().oneshot(envelope(v)).await.unwrap();
        }
        let burst = started.elapsed();
        for v in 6..=25 {
            service.clone().oneshot(envelope(v)).await.unwrap();
        }
        // 20 calls past the burst at 20/s: about 1 s; clones share the bucket.
        let all = started.elapsed();
        assert!(burst < Duration::from_millis(200), "the burst waited {burst:?}");
        assert!(all >= Duration::from_millis(900), "25 calls took {all:?}");
    }

    #[derive(Default)]
    struct Spans(Mutex<Vec<String>>);

    struct Record(std::sync::Arc<Spans>);

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Record {
        fn on_new_span(
            &self,
            attrs: &tracing::span::Attributes<'_>,
            _: &tracing::span::Id,
            _: tracing_subscriber::layer::Context<'_, S>,
        ) {
            struct Fields(String);
            impl tracing::field::Visit for Fields {
                fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                    self.0.push_str(&format!("{}={:?};", field.name(), value));
                }
            }
            let mut fields = Fields(format!("{}:", attrs.metadata().name()));
            attrs.record(&mut fields);
            self.0.0.lock().unwrap().push(fields.0);
        }
    }

    #[tokio::test]
    async fn the_trace_layer_opens_a_span_with_the_messaging_attributes() {
        let spans = std::sync::Arc::new(Spans::default());
        let subscriber = tracing_subscriber::registry().with(Record(spans.clone()));
        let _guard = tracing::subscriber::set_default(subscriber);
        let service = ServiceBuilder::new()
            .layer(TraceLayer::new("orders", "billing").system("kafka"))
            .service_fn(|e: Envelope| async move {
                tracing::info_span!("inner").in_scope(|| ());
                if e.event_version == 2 {
                    Err("refused")
                } else {
                    Ok(())
                }
            });
        let e = envelope(1);
        service.clone().oneshot(e.clone()).await.unwrap();
        assert!(service.oneshot(envelope(2)).await.is_err());
        let spans = spans.0.lock().unwrap().clone();
        let process: Vec<&String> = spans.iter().filter(|s| s.starts_with("process:")).collect();
        assert_eq!(process.len(), 2, "{spans:?}");
        for needle in [
            "otel.name=process orders;",
            "messaging.system=kafka;",
            "messaging.destination.name=orders;",
            "messaging.consumer.group.name=billing;",
            "messaging.operation.type=\"process\";",
            &format!("messaging.message.id={};", e.event_id),
            "eventbus.aggregate_id=order-1;",
            "eventbus.event_version=1;",
        ] {
            assert!(process[0].contains(needle), "{needle} missing in {}", process[0]);
        }
        assert!(
            spans.iter().any(|s| s.starts_with("inner:")),
            "the handler runs inside the span"
        );
    }
}
