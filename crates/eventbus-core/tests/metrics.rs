//! The consumer and publisher metrics through the `metrics` facade, read
//! back with `metrics-util`'s debugging recorder: names, labels (backend,
//! topic, group; never an aggregate or event id), units and descriptions.

use std::time::Duration;

use eventbus_core::telemetry::{
    DEAD_LETTERED, END_TO_END_LATENCY, HANDLED, HANDLER_DURATION, HANDLER_ERRORS, IN_FLIGHT, PUBLISHED,
    RETRIES,
};
use eventbus_core::{BusConfig, Envelope, EventBus, RetryPolicy, SubscribeOptions};
use eventbus_testkit::{envelope, eventually};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use metrics_util::{CompositeKey, MetricKind};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_and_publisher_metrics_are_recorded_with_bounded_labels() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().unwrap();

    let mut config = BusConfig::default();
    config.consumer.retry = RetryPolicy::fixed(2, 10);
    let bus = EventBus::memory_with(config).unwrap();
    let sub = bus
        .subscribe_envelope(
            "m-orders",
            SubscribeOptions::group("billing"),
            |e: Envelope| async move {
                tokio::time::sleep(Duration::from_millis(2)).await;
                match e.event_version {
                    3 => Err(std::io::Error::other("always fails")), // 2 attempts, then dead-lettered
                    _ => Ok(()),
                }
            },
        )
        .await
        .unwrap();
    for v in 1..=5 {
        bus.publish_envelope_sync("m-orders", &envelope("agg-1", v))
            .await
            .unwrap();
    }
    assert!(
        eventually(Duration::from_secs(10), || sub.health().handled == 4
            && sub.health().dead_lettered == 1)
        .await
    );
    sub.close().await.unwrap();

    let snapshot = snapshotter.snapshot().into_vec();
    let find = |name: &str, kind: MetricKind| -> Vec<(CompositeKey, &DebugValue)> {
        snapshot
            .iter()
            .filter(|(k, _, _, _)| k.kind() == kind && k.key().name() == name)
            .map(|(k, _, _, v)| (k.clone(), v))
            .collect()
    };
    let counter_of = |name: &str, topic: &str| -> u64 {
        find(name, MetricKind::Counter)
            .iter()
            .filter(|(k, _)| k.key().labels().any(|l| l.key() == "topic" && l.value() == topic))
            .map(|(_, v)| match v {
                DebugValue::Counter(n) => *n,
                _ => 0,
            })
            .sum()
    };
    let counter = |name: &str| counter_of(name, "m-orders");
    assert_eq!(counter(HANDLED), 4);
    assert_eq!(counter(HANDLER_ERRORS), 2, "both attempts of v3");
    assert_eq!(counter(RETRIES), 1);
    assert_eq!(counter(DEAD_LETTERED), 1);
    assert_eq!(counter(PUBLISHED), 5);
    assert_eq!(counter_of(PUBLISHED, "m-orders.dlq"), 1, "the dead letter");
    let handled = &find(HANDLED, MetricKind::Counter)[0].0;
    let mut labels: Vec<String> = handled
        .key()
        .labels()
        .map(|l| format!("{}={}", l.key(), l.value()))
        .collect();
    labels.sort();
    assert_eq!(labels, ["backend=memory", "group=billing", "topic=m-orders"]);
    for name in [HANDLER_DURATION, END_TO_END_LATENCY] {
        let histograms = find(name, MetricKind::Histogram);
        let samples: usize = histograms
            .iter()
            .map(|(_, v)| match v {
                DebugValue::Histogram(s) => s.len(),
                _ => 0,
            })
            .sum();
        assert!(samples >= 4, "{name}: {samples} samples");
    }
    let in_flight: f64 = find(IN_FLIGHT, MetricKind::Gauge)
        .iter()
        .map(|(_, v)| match v {
            DebugValue::Gauge(g) => g.into_inner(),
            _ => 0.0,
        })
        .sum();
    assert_eq!(in_flight, 0.0, "every fetched message settled");
    // Units and descriptions were registered.
    let described = snapshotter.snapshot().into_vec();
    let (_, unit, description, _) = described
        .iter()
        .find(|(k, _, _, _)| k.key().name() == HANDLER_DURATION)
        .unwrap();
    assert_eq!(*unit, Some(metrics::Unit::Seconds));
    assert!(description.is_some());
    bus.close().await.unwrap();
}
