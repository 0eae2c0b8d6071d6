//! Every attempt of one delivery hands the handler the same envelope: the
//! first attempt gets the envelope decoded at fetch (moved, not copied),
//! each retry one decoded again from the message. An attempt past
//! `consumer.handler_timeout_ms` fails and is retried.

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

/// The bus's own handler timeout (`consumer.handler_timeout_ms`, not a
/// tower layer): the first attempt sleeps 30 s, is cut at 100 ms, counts as
/// a failed attempt with the timeout as its error, and the retry handles
/// the event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_past_the_handler_timeout_fails_and_a_retry_handles_the_event() {
    use std::sync::atomic::{AtomicUsize, Ordering};

    let mut config = BusConfig::default();
    config.consumer.retry = RetryPolicy::fixed(3, 10);
    config.consumer.dead_letter = DeadLetterPolicy::Disabled;
    config.consumer.handler_timeout_ms = Some(100);
    let bus = EventBus::memory_with(config).unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let _subscription = bus
        .subscribe_envelope("timeouts", SubscribeOptions::group("g"), move |_e: Envelope| {
            let n = seen.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
                Ok::<_, std::io::Error>(())
            }
        })
        .await
        .unwrap();
    let sent = Envelope::builder("order-1", "OrderCreated", 1)
        .json_payload(&1)
        .and_then(|b| b.build())
        .unwrap();
    let started = std::time::Instant::now();
    bus.publish_envelope_sync("timeouts", &sent).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while bus.health().subscriptions[0].handled < 1 {
        assert!(tokio::time::Instant::now() < deadline, "{:?}", bus.health());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let health = bus.health().subscriptions[0].clone();
    assert_eq!(calls.load(Ordering::SeqCst), 2, "{health:?}");
    assert_eq!(health.failed_attempts, 1, "{health:?}");
    assert!(
        health
            .last_error
            .as_deref()
            .unwrap_or_default()
            .contains("handler timed out after 100 ms (consumer.handler_timeout_ms)"),
        "{health:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "cut at 100 ms, not after 30 s"
    );
}
