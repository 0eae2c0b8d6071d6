//! Every attempt of one delivery hands the handler the same envelope: the
//! first attempt gets the envelope decoded at fetch (moved, not copied),
//! each retry one decoded again from the message.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventbus_core::{BusConfig, DeadLetterPolicy, Envelope, EventBus, RetryPolicy, SubscribeOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_see_the_envelope_the_first_attempt_saw() {
    let mut config = BusConfig::default();
    config.consumer.retry = RetryPolicy::fixed(3, 10);
    config.consumer.dead_letter = DeadLetterPolicy::Disabled;
    let bus = EventBus::memory_with(config).unwrap();
    let seen: Arc<Mutex<Vec<Envelope>>> = Arc::default();
    let record = seen.clone();
    let _sub = bus
        .subscribe_envelope("attempts", SubscribeOptions::group("g"), move |e: Envelope| {
            let mut seen = record.lock().unwrap();
            seen.push(e);
            let fail = seen.len() < 3;
            async move {
                match fail {
                    true => Err(std::io::Error::other("not yet")),
                    false => Ok(()),
                }
            }
        })
        .await
        .unwrap();
    let sent = Envelope::builder("order-1", "OrderCreated", 1)
        .trace_id("trace-1")
        .correlation_id("corr-1")
        .tenant_id(7)
        .json_payload(&serde_json::json!({"total": 42, "lines": [1, 2]}))
        .and_then(|b| b.build())
        .unwrap();
    bus.publish_envelope_sync("attempts", &sent).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while bus.health().subscriptions[0].handled < 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not handled: {:?}",
            bus.health()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 3, "two failed attempts, then the one that succeeded");
    for (attempt, e) in seen.iter().enumerate() {
        assert_eq!(e, &sent, "attempt {}", attempt + 1);
        assert_eq!(
            e.payload.get(),
            sent.payload.get(),
            "attempt {}: payload bytes",
            attempt + 1
        );
        assert_eq!(e.timestamp.offset(), sent.timestamp.offset());
    }
}
