//! Runs one level against a bus.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eventbus::testing::OrderChecker;
use eventbus::{Envelope, EventBus, Payload, SubscribeOptions};
use hdrhistogram::Histogram;

use super::{LevelReport, Scenario};

/// What the handlers of one level record.
struct Receipts {
    checker: OrderChecker,
    end_to_end_us: Mutex<Histogram<u64>>,
    received: AtomicU64,
    last_receive: Mutex<Option<Instant>>,
}

/// Publishes and consumes one level of `events`, then reports.
pub(crate) async fn level(
    bus: &EventBus,
    scenario: &Scenario,
    events: usize,
) -> eventbus::Result<LevelReport> {
    let run = format!("bench-{events}-{}", &eventbus::new_event_id()[24..]);
    let topics: Vec<String> = (0..scenario.topics).map(|t| format!("{run}-{t}")).collect();
    let receipts = Arc::new(Receipts {
        checker: OrderChecker::new(),
        end_to_end_us: Mutex::new(histogram()),
        received: AtomicU64::new(0),
        last_receive: Mutex::new(None),
    });
    let mut subscriptions = Vec::new();
    for topic in &topics {
        subscriptions.push(subscribe(bus, topic, receipts.clone()).await?);
    }
    let payload = Payload::from_raw(scenario.payload())?;
    let aggregates: Vec<String> = (0..scenario.aggregates_for(events))
        .map(|a| format!("agg-{a}"))
        .collect();
    let mut publish_us = histogram();
    let mut handles = Vec::with_capacity(events);
    let first_send = Instant::now();
    for (a, version) in scenario.plan(events) {
        let envelope = Envelope::builder(&aggregates[a], "BenchEvent", version)
            .payload(payload.clone())
            .build()?;
        let started = Instant::now();
        handles.push(bus.publish_envelope(&topics[a % topics.len()], &envelope).await?);
        publish_us.saturating_record(started.elapsed().as_micros() as u64);
    }
    let acked = futures::future::join_all(handles)
        .await
        .iter()
        .filter(|r| r.is_success())
        .count();
    let deadline = Instant::now() + scenario.timeout;
    while receipts.received.load(Ordering::Acquire) < events as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    for s in subscriptions {
        s.close().await?;
    }
    let last = receipts.last_receive.lock().unwrap().unwrap_or(first_send);
    Ok(LevelReport {
        backend: bus.backend_name(),
        events,
        aggregates: aggregates.len(),
        acked,
        order: receipts.checker.report(),
        publish_us,
        end_to_end_us: receipts.end_to_end_us.lock().unwrap().clone(),
        elapsed: last.duration_since(first_send),
    })
}

async fn subscribe(
    bus: &EventBus,
    topic: &str,
    receipts: Arc<Receipts>,
) -> eventbus::Result<eventbus::Subscription> {
    let name = topic.to_owned();
    bus.subscribe_envelope(topic, SubscribeOptions::group("bench"), move |e: Envelope| {
        let latency = (chrono::Utc::now() - e.timestamp)
            .num_microseconds()
            .unwrap_or(i64::MAX)
            .max(0);
        receipts
            .end_to_end_us
            .lock()
            .unwrap()
            .saturating_record(latency as u64);
        receipts.checker.record(&name, &e);
        *receipts.last_receive.lock().unwrap() = Some(Instant::now());
        receipts.received.fetch_add(1, Ordering::Release);
        async { Ok::<_, std::convert::Infallible>(()) }
    })
    .await
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}
