//! The age half of the lag alert: a parked aggregate's head event ages
//! past `consumer.lag_alert_age_ms` and raises `lag_alert` (readiness
//! false) while the count of messages stays far below its threshold; once
//! the handler succeeds, nothing is unsettled and the alert clears.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use eventbus_core::{BusConfig, DeadLetterPolicy, Envelope, EventBus, RetryPolicy, SubscribeOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_unsettled_event_raises_the_lag_alert() {
    let mut config = BusConfig::default();
    config.consumer.lag_alert_age_ms = 800;
    config.consumer.retry = RetryPolicy::fixed(1, 20);
    config.consumer.dead_letter = DeadLetterPolicy::Disabled; // the aggregate parks
    let bus = EventBus::memory_with(config).unwrap();
    let broken = Arc::new(AtomicBool::new(true));
    let flag = broken.clone();
    let sub = bus
        .subscribe_envelope("aging", SubscribeOptions::group("g"), move |e: Envelope| {
            let fail = e.aggregate_id == "stuck" && flag.load(Ordering::SeqCst);
            async move {
                match fail {
                    true => Err(std::io::Error::other("downstream down")),
                    false => Ok(()),
                }
            }
        })
        .await
        .unwrap();
    let event = |aggregate: &str, version: i64| {
        Envelope::builder(aggregate, "T", version)
            .json_payload(&serde_json::json!({}))
            .and_then(|b| b.build())
            .unwrap()
    };
    bus.publish_envelope_sync("aging", &event("stuck", 1))
        .await
        .unwrap();
    bus.publish_envelope_sync("aging", &event("fine", 1))
        .await
        .unwrap();
    let health = || bus.health().subscriptions[0].clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !health().lag_alert {
        assert!(tokio::time::Instant::now() < deadline, "no alert: {:?}", health());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let h = health();
    assert!(h.oldest_unsettled_age_ms.unwrap() >= 800, "{h:?}");
    assert!(
        h.lag.unwrap_or(0) < 1_000,
        "the count alone would not alert: {h:?}"
    );
    assert_eq!(h.handled, 1, "the other aggregate flows");
    assert!(!bus.health().is_ready());

    broken.store(false, Ordering::SeqCst);
    while health().lag_alert || health().handled < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "alert not cleared: {:?}",
            health()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(health().oldest_unsettled_age_ms, None);
    sub.close().await.unwrap();
    bus.close().await.unwrap();
}
