//! Spans captured in memory for the tracing conformance case: an
//! OpenTelemetry tracer provider with an in-memory exporter behind
//! `tracing-opentelemetry`, installed once per test process as the global
//! `tracing` subscriber. Only traces of topics starting with
//! [`TRACED_PREFIX`] are sampled (the other cases running alongside are
//! left out).

use std::sync::OnceLock;

use opentelemetry::trace::{Link, SpanKind, TraceContextExt, TraceId, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::{
    InMemorySpanExporter, Sampler, SamplingDecision, SamplingResult, SdkTracerProvider, ShouldSample,
    SpanData,
};
use tracing_subscriber::layer::SubscriberExt;

/// Topics whose traces are captured start with this.
pub const TRACED_PREFIX: &str = "traced-";

/// Samples root spans of traced topics; children follow their parent.
#[derive(Debug, Clone)]
struct TracedTopics;

impl ShouldSample for TracedTopics {
    fn should_sample(
        &self,
        parent: Option<&Context>,
        _trace_id: TraceId,
        _name: &str,
        _kind: &SpanKind,
        attributes: &[KeyValue],
        _links: &[Link],
    ) -> SamplingResult {
        let traced = attributes.iter().any(|kv| {
            kv.key.as_str() == "messaging.destination.name" && kv.value.as_str().starts_with(TRACED_PREFIX)
        });
        SamplingResult {
            decision: match traced {
                true => SamplingDecision::RecordAndSample,
                false => SamplingDecision::Drop,
            },
            attributes: Vec::new(),
            trace_state: parent
                .map(|cx| cx.span().span_context().trace_state().clone())
                .unwrap_or_default(),
        }
    }
}

/// The process's span capture.
#[derive(Debug)]
pub struct SpanCapture {
    exporter: InMemorySpanExporter,
    provider: SdkTracerProvider,
}

impl SpanCapture {
    /// The capture, installed as the global `tracing` subscriber at the
    /// first call.
    ///
    /// # Panics
    /// When another global subscriber is installed already.
    pub fn global() -> &'static SpanCapture {
        static CAPTURE: OnceLock<SpanCapture> = OnceLock::new();
        CAPTURE.get_or_init(|| {
            let exporter = InMemorySpanExporter::default();
            let provider = SdkTracerProvider::builder()
                .with_simple_exporter(exporter.clone())
                .with_sampler(Sampler::ParentBased(Box::new(TracedTopics)))
                .build();
            let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("eventbus-testkit"));
            tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer))
                .expect("no other global tracing subscriber in this test process");
            SpanCapture { exporter, provider }
        })
    }

    /// Every finished span so far.
    pub fn spans(&self) -> Vec<SpanData> {
        let _ = self.provider.force_flush();
        self.exporter.get_finished_spans().unwrap_or_default()
    }
}

/// The string value of attribute `key` of `span`.
pub fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.as_str().into_owned())
}
