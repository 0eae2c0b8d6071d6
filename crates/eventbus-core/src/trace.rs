//! Tracing of publishes and deliveries: `tracing` spans named and
//! attributed by the OpenTelemetry messaging semantic conventions
//! (`publish <topic>` as producer, `receive <topic>` and `process <topic>`
//! as consumer; `messaging.system`, `messaging.destination.name`,
//! `messaging.operation.type`, `messaging.message.id`,
//! `messaging.consumer.group.name`), and, with the feature `otel`, the W3C
//! trace context carried through the broker: `traceparent` and
//! `tracestate` headers written at publish and read at receive, so one
//! trace spans the publish and every handling of the event. The
//! `X-Trace-ID` header of the envelope (read by the Go services) is left as
//! it is.
//!
//! Spans are created at `info` level on the target `eventbus`; with no
//! subscriber interested they cost next to nothing. To export them to
//! OpenTelemetry, install `tracing-opentelemetry`'s layer.

use tracing::Span;

use crate::headers::Headers;
use crate::message::Message;

/// W3C trace context header: version, trace id, parent span id, flags.
pub const TRACEPARENT: &str = "traceparent";
/// W3C vendor-specific trace state header.
pub const TRACESTATE: &str = "tracestate";

/// The producer span of one publish to `topic`.
pub(crate) fn publish_span(system: &str, topic: &str, message_id: Option<&str>) -> Span {
    tracing::info_span!(
        target: "eventbus",
        "publish",
        otel.name = %format_args!("publish {topic}"),
        otel.kind = "producer",
        messaging.system = %system,
        messaging.destination.name = %topic,
        messaging.operation.type = "publish",
        messaging.message.id = message_id,
    )
}

/// Writes `span`'s trace context into `headers` (feature `otel`; without
/// it, nothing).
pub(crate) fn inject(span: &Span, headers: &mut Headers) {
    #[cfg(feature = "otel")]
    otel::inject(span, headers);
    #[cfg(not(feature = "otel"))]
    let _ = (span, headers);
}

/// The consumer span of one delivery of `message` to `group`, from fetch
/// to settlement; with the feature `otel`, a child of the publish whose
/// trace context the message carries.
pub(crate) fn receive_span(system: &str, group: &str, message: &Message, message_id: Option<&str>) -> Span {
    let span = tracing::info_span!(
        target: "eventbus",
        "receive",
        otel.name = %format_args!("receive {}", message.topic),
        otel.kind = "consumer",
        messaging.system = %system,
        messaging.destination.name = %message.topic,
        messaging.consumer.group.name = %group,
        messaging.operation.type = "receive",
        messaging.message.id = message_id,
    );
    #[cfg(feature = "otel")]
    otel::extract_parent(&span, &message.headers);
    span
}

/// The span of one handler attempt, inside the delivery's `receive` span.
pub(crate) fn process_span(parent: &Span, topic: &str) -> Span {
    tracing::info_span!(
        target: "eventbus",
        parent: parent,
        "process",
        otel.name = %format_args!("process {topic}"),
        otel.kind = "consumer",
        messaging.operation.type = "process",
    )
}

#[cfg(feature = "otel")]
mod otel {
    use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
    use opentelemetry_sdk::propagation::TraceContextPropagator;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    use super::{Headers, Span};

    struct Write<'a>(&'a mut Headers);

    impl Injector for Write<'_> {
        fn set(&mut self, key: &str, value: String) {
            self.0.insert(key, value);
        }
    }

    struct Read<'a>(&'a Headers);

    impl Extractor for Read<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            self.0.get(key)
        }

        fn keys(&self) -> Vec<&str> {
            self.0.iter().map(|(k, _)| k).collect()
        }
    }

    pub(super) fn inject(span: &Span, headers: &mut Headers) {
        if span.is_disabled() {
            return; // no subscriber records it: no context to carry
        }
        let cx = span.context();
        TraceContextPropagator::new().inject_context(&cx, &mut Write(headers));
    }

    pub(super) fn extract_parent(span: &Span, headers: &Headers) {
        if span.is_disabled() {
            return;
        }
        if headers.get(super::TRACEPARENT).is_none() {
            return;
        }
        let cx = TraceContextPropagator::new().extract(&Read(headers));
        let _ = span.set_parent(cx);
    }
}
