//! The cases of the conformance suite.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;

use super::{BusFactory, Capabilities, Case};
use crate::{HeldHandler, OrderChecker, envelope, eventually, unique};
use eventbus_core::{BusConfig, Envelope, ErrorKind, Message, RetryPolicy, SubscribeOptions, headers};

crate::conformance_tests!(@list [@all;]);

type Seen<T> = Arc<Mutex<Vec<T>>>;

fn seen<T>() -> Seen<T> {
    Arc::new(Mutex::new(Vec::new()))
}

fn config_with_retry(attempts: u32, backoff_ms: u64) -> BusConfig {
    let mut config = BusConfig::default();
    config.consumer.retry = RetryPolicy::fixed(attempts, backoff_ms);
    config
}

fn len<T>(s: &Seen<T>) -> usize {
    s.lock().unwrap().len()
}

/// Subscribes an envelope handler that records every handled envelope.
async fn record_envelopes(
    bus: &eventbus_core::EventBus,
    topic: &str,
    group: &str,
) -> (eventbus_core::Subscription, Seen<Envelope>) {
    let out = seen();
    let sink = out.clone();
    let sub = bus
        .subscribe_envelope(topic, SubscribeOptions::group(group), move |e: Envelope| {
            sink.lock().unwrap().push(e);
            async { Ok::<_, std::io::Error>(()) }
        })
        .await
        .expect("subscribe");
    (sub, out)
}

/// Subscribes a raw handler that records every message.
async fn record_raw(
    bus: &eventbus_core::EventBus,
    topic: &str,
    group: &str,
) -> (eventbus_core::Subscription, Seen<Message>) {
    let out = seen();
    let sink = out.clone();
    let sub = bus
        .subscribe(topic, SubscribeOptions::group(group), move |m: Message| {
            sink.lock().unwrap().push(m);
            async { Ok::<_, std::io::Error>(()) }
        })
        .await
        .expect("subscribe");
    (sub, out)
}

async fn publish_all(bus: &eventbus_core::EventBus, topic: &str, events: &[Envelope]) {
    let mut handles = Vec::with_capacity(events.len());
    for e in events {
        handles.push(bus.publish_envelope(topic, e).await.expect("publish accepted"));
    }
    for h in handles {
        let r = h.await;
        assert!(r.is_success(), "publish failed: {:?}", r.error);
    }
}

fn round_trip_keeps_payload_headers_and_key<'a>(
    f: &'a dyn BusFactory,
    caps: &'a Capabilities,
) -> BoxFuture<'a, ()> {
    Box::pin(async move {
        let bus = f.bus(BusConfig::default()).await;
        let topic = unique("roundtrip");
        let (raw_sub, raw) = record_raw(&bus, &topic, "g").await;
        let message = Message::new(&topic, &b"\x00binary\xffpayload"[..])
            .with_key("key-1")
            .with_header("X-Custom", "value with spaces")
            .with_dedup_id(format!("{topic}-1"));
        bus.publish_message(message.clone())
            .await
            .unwrap()
            .await
            .into_result()
            .unwrap();
        assert!(
            eventually(caps.timeout, || len(&raw) == 1).await,
            "raw message not received"
        );
        let got = raw.lock().unwrap()[0].clone();
        assert_eq!(got.payload, message.payload);
        assert_eq!(got.headers.get("X-Custom"), Some("value with spaces"));
        assert_eq!(
            got.dedup_id, None,
            "a dedup id tells the broker how to store a message; no backend delivers it"
        );
        if caps.keys {
            assert_eq!(got.key, message.key);
        }
        raw_sub.close().await.unwrap();

        let topic = unique("roundtrip-env");
        let (sub, got) = record_envelopes(&bus, &topic, "g").await;
        let sent = Envelope::builder("order-7", "OrderPlaced", 1)
            .trace_id("trace-1")
            .correlation_id("corr-1")
            .tenant_id(3)
            .json_payload(&serde_json::json!({"items": [1, 2], "note": "ünïcode"}))
            .unwrap()
            .build()
            .unwrap();
        bus.publish_envelope_sync(&topic, &sent).await.unwrap();
        assert!(
            eventually(caps.timeout, || len(&got) == 1).await,
            "envelope not received"
        );
        assert_eq!(got.lock().unwrap()[0], sent);
        sub.close().await.unwrap();
        bus.close().await.unwrap();
    })
}

fn concurrent_publishers_all_received<'a>(
    f: &'a dyn BusFactory,
    caps: &'a Capabilities,
) -> BoxFuture<'a, ()> {
    Box::pin(async move {
        let bus = f.bus(BusConfig::default()).await;
        let topic = unique("concurrent");
        let (sub, got) = record_envelopes(&bus, &topic, "g").await;
        let mut publishers = Vec::new();
        for p in 0..50 {
            let (bus, topic) = (bus.clone(), topic.clone());
            publishers.push(tokio::spawn(async move {
                let events: Vec<Envelope> = (1..=100).map(|v| envelope(&format!("pub-{p}"), v)).collect();
                publish_all(&bus, &topic, &events).await;
                events.into_iter().map(|e| e.event_id).collect::<Vec<_>>()
            }));
        }
        let mut sent = HashSet::new();
        for p in publishers {
            sent.extend(p.await.unwrap());
        }
        assert_eq!(sent.len(), 5_000);
        assert!(
            eventually(caps.timeout, || len(&got) >= 5_000).await,
            "received {} of 5000",
            len(&got)
        );
        let received: HashSet<String> = got.lock().unwrap().iter().map(|e| e.event_id.clone()).collect();
        assert_eq!(received, sent);
        sub.close().await.unwrap();
        bus.close().await.unwrap();
    })
}

fn topics_are_isolated<'a>(f: &'a dyn BusFactory, caps: &'a Capabilities) -> BoxFuture<'a, ()> {
    Box::pin(async move {
        let bus = f.bus(BusConfig::default()).await;
        let prefix = unique("iso");
        let topics: Vec<String> = (0..20).map(|i| format!("{prefix}-{i}")).collect();
        let mut subs = Vec::new();
        for t in &topics {
            subs.push(record_envelopes(&bus, t, "g").await);
        }
        for (i, t) in topics.iter().enumerate() {
            let events: Vec<Envelope> = (1..=10).map(|v| envelope(&format!("topic-{i}"), v)).collect();
            publish_all(&bus, t, &events).await;
        }
        for (i, (_, got)) in subs.iter().enumerate() {
            assert!(
                eventually(caps.timeout, || len(got) >= 10).await,
                "topic {i} got {}",
                len(got)
            );
        }
        // Every topic's own events arrived; one more publish round-trip gives strays time to show.
        bus.publish_envelope_sync(&topics[0], &envelope("topic-0", 11))
            .await
            .unwrap();
        assert!(eventually(caps.timeout, || len(&subs[0].1) == 11).await);
        for (i, (sub, got)) in subs.iter().enumerate() {
            let got = got.lock().unwrap().clone();
            assert!(
                got.iter().all(|e| e.aggregate_id == format!("topic-{i}")),
                "topic {i} got another topic's event"
            );
            assert_eq!(got.len(), if i == 0 { 11 } else { 10 });
            sub.close().await.unwrap();
        }
        bus.close().await.unwrap();
    })
}

fn per_aggregate_order_over_five_topics<'a>(
    f: &'a dyn BusFactory,
    caps: &'a Capabilities,
) -> BoxFuture<'a, ()> {
    Box::pin(async move {
        const TOPICS: usize = 5;
        const AGGREGATES: usize = 250;
        const VERSIONS: i64 = 40; // 250 × 40 = 10,000 events
        let bus = f.bus(BusConfig::default()).await;
        let prefix = unique("order");
        let checker = Arc::new(OrderChecker::new());
        let running = Arc::new(AtomicUsize::new(0));
        let max_running = Arc::new(AtomicUsize::new(0));
        let mut subs = Vec::new();
        for t in 0..TOPICS {
            let topic = format!("{prefix}-{t}");
            let (checker, running, max_running) = (checker.clone(), running.clone(), max_running.clone());
            let name = topic.clone();
            let handler = move |e: Envelope| {
                let (checker, running, max_running, name) = (
                    checker.clone(),
                    running.clone(),
                    max_running.clone(),
                    name.clone(),
                );
                async move {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    max_running.fetch_max(now, Ordering::SeqCst);
                    let attempt = checker.begin(&name, &e);
                    tokio::task::yield_now().await;
                    running.fetch_sub(1, Ordering::SeqCst);
                    attempt.succeeded();
                    Ok::<_, std::io::Error>(())
                }
            };
            subs.push(
                bus.subscribe_envelope(&topic, SubscribeOptions::group("g"), handler)
                    .await
                    .unwrap(),
            );
        }
        // Interleave aggregates as the original test did: round-robin over versions.
        let mut handles = Vec::new();
        for v in 1..=VERSIONS {
            for a in 0..AGGREGATES {
                let topic = format!("{prefix}-{}", a % TOPICS);
                let e = envelope(&format!("agg-{a}"), v);
                handles.push(bus.publish_envelope(&topic, &e).await.unwrap());
            }
        }
        for h in handles {
            assert!(h.await.is_success());
        }
        let total = (AGGREGATES as u64) * VERSIONS as u64;
        assert!(
            eventually(caps.timeout, || checker.report().received >= total).await,
            "received {:?} of {total}",
            checker.report()
        );
        let report = checker.report();
        assert!(report.is_strictly_ordered(), "{report}");
        assert_eq!(report.duplicates, 0, "{report}");
        assert!(
            max_running.load(Ordering::SeqCst) > 1,
            "aggregates never ran in parallel"
        );
        for s in subs {
            s.close().await.unwrap();
        }
        bus.close().await.unwrap();
    })
}

fn retry_after_error_or_panic_keeps_order<'a>(
    f: &'a dyn BusFactory,
    caps: &'a Capabilities,
) -> BoxFuture<'a, ()> {
    Box::pin(async move {
        let bus = f.bus(config_with_retry(3, 10)).await;
        let topic = unique("retry");
        let handled = seen::<i64>();
        let attempts = Arc::new(Mutex::new(HashMap::<i64, u32>::new()));
        let checker = Arc::new(OrderChecker::new());
        let (sink, tries, check, name) = (handled.clone(), attempts.clone(), checker.clone(), topic.clone());
        let sub = bus
            .subscribe_envelope(&topic, SubscribeOptions::group("g"), move |e: Envelope| {
                let n = {
                    let mut t = tries.lock().unwrap();
                    let n = t.entry(e.event_version).or_default();
                    *n += 1;
                    *n
                };
                let sink = sink.clone();
                // Every attempt is recorded, failed ones too (the guard drops on panic).
                let attempt = check.begin(&name, &e);
                async move {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    match (e.event_version, n) {
                        (2, 1) => Err(std::io::Error::other("transient failure")),
                        (3, 1) => panic!("handler panic on first attempt"),
                        _ => {
                            sink.lock().unwrap().push(e.event_version);
                            attempt.succeeded();
                            Ok(())
                        }
                    }
                }
            })
            .await
            .unwrap();
        let events: Vec<Envelope> = (1..=5).map(|v| envelope("acct-1", v)).collect();
        publish_all(&bus, &topic, &events).await;
        assert!(
            eventually(caps.timeout, || len(&handled) == 5).await,
            "handled {:?}",
            handled.lock().unwrap()
        );
        assert_eq!(*handled.lock().unwrap(), vec![1, 2, 3, 4, 5]);
        assert_eq!(attempts.lock().unwrap()[&2], 2);
        assert_eq!(attempts.lock().unwrap()[&3], 2);
        assert_eq!(sub.health().failed_attempts, 2);
        let report = checker.report();
        assert!(report.is_strictly_ordered(), "{report}");
        assert_eq!(
            (report.attempts, report.retries, report.duplicates),
            (7, 2, 0),
            "{report}"
        );
        sub.close().await.unwrap();
        bus.close().await.unwrap();
    })
}

fn exhausted_message_is_dead_lettered_with_headers<'a>(
    f: &'a dyn BusFactory,
    caps: &'a Capabilities,
) -> BoxFuture<'a, ()> {
    Box::pin(async move {
        let bus = f.bus(config_with_retry(2, 10)).await;
        let topic = unique("dlq");
        let dlq = format!("{topic}.dlq");
        let (dlq_sub, dead) = record_raw(&bus, &dlq, "inspect").await;
        let handled = seen::<i64>();
        let attempts = Arc::new(AtomicUsize::new(0));
        let (sink, tries) = (handled.clone(), attempts.clone());
        let sub = bus
            .subscribe_envelope(&topic, SubscribeOptions::group("g"), move |e: Envelope| {
                let (sink, tries) = (sink.clone(), tries.clone());
                async move {
                    if e.event_version == 2 {
                        tries.fetch_add(1, Ordering::SeqCst);
                        return Err(std::io::Error::other("poison\nevent"));
                    }
                    sink.lock().unwrap().push(e.event_version);
                    Ok(())
                }
            })
            .await
            .unwrap();
        let events: Vec<Envelope> = (1..=3).map(|v| envelope("poisoned", v)).collect();
        publish_all(&bus, &topic, &events).await;
        assert!(eventually(caps.timeout, || len(&dead) == 1 && len(&handled) == 2).await);
        assert_eq!(
            *handled.lock().unwrap(),
            vec![1, 3],
            "later events continue after the dead letter"
        );
        assert_eq!(attempts.load(Ordering::SeqCst), 2, "max attempts");
        let dead = dead.lock().unwrap()[0].clone();
        assert_eq!(dead.headers.get(headers::ORIGINAL_TOPIC), Some(topic.as_str()));
        assert_eq!(dead.headers.get(headers::ERROR_MESSAGE), Some("poison event"));
        assert_eq!(
            dead.headers.get(headers::EVENT_ID),
            Some(events[1].event_id.as_str())
        );
        assert_eq!(Envelope::decode(&dead.payload).unwrap(), events[1]);
        assert_eq!(sub.health().dead_lettered, 1);
        sub.close().await.unwrap();
        dlq_sub.close().await.unwrap();
        bus.close().await.unwrap();
    })
}

fn message_without_aggregate_id_is_dead_lettered<'a>(
    f: &'a dyn BusFactory,
    caps: &'a Capabilities,
) -> BoxFuture<'a, ()> {
    Box::pin(async move {
        let bus = f.bus(config_with_retry(3, 10)).await;
        let topic = unique("noagg");
        let (dlq_sub, dead) = record_raw(&bus, &format!("{topic}.dlq"), "inspect").await;
        let (sub, got) = record_envelopes(&bus, &topic, "g").await;
        bus.publish(&topic, &b"not an envelope"[..])
            .await
            .unwrap()
            .await
            .into_result()
            .unwrap();
        bus.publish_envelope_sync(&topic, &envelope("fine", 1))
            .await
            .unwrap();
        assert!(eventually(caps.timeout, || len(&dead) == 1 && len(&got) == 1).await);
        let dead = dead.lock().unwrap()[0].clone();
        assert_eq!(&dead.payload[..], b"not an envelope");
        let reason = dead.headers.get(headers::ERROR_MESSAGE).unwrap();
        assert!(reason.contains("no aggregate id"), "{reason}");
        sub.close().await.unwrap();
        dlq_sub.close().await.unwrap();
        bus.close().await.unwrap();
    })
}

fn parked_aggregate_is_reported_stalled_then_recovers<'a>(
    f: &'a dyn BusFactory,
    caps: &'a Capabilities,
) -> BoxFuture<'a, ()> {
    Box::pin(async move {
        let bus = f.bus(config_with_retry(2, 10)).await;
        let topic = unique("park");
        let healthy = Arc::new(AtomicBool::new(false));
        let handled = seen::<i64>();
        let overtaken = Arc::new(AtomicBool::new(false));
        let (sink, ok, over) = (handled.clone(), healthy.clone(), overtaken.clone());
        let options = SubscribeOptions::group("g").park_on_failure();
        let sub = bus
            .subscribe_envelope(&topic, options, move |e: Envelope| {
                let (sink, ok, over) = (sink.clone(), ok.clone(), over.clone());
                async move {
                    if e.event_version == 2 && !sink.lock().unwrap().contains(&1) {
                        over.store(true, Ordering::SeqCst); // v2 attempted while v1 is parked
                    }
                    if !ok.load(Ordering::SeqCst) {
                        return Err(std::io::Error::other("downstream unavailable"));
                    }
                    sink.lock().unwrap().push(e.event_version);
                    Ok(())
                }
            })
            .await
            .unwrap();
        publish_all(&bus, &topic, &[envelope("parked", 1), envelope("parked", 2)]).await;
        assert!(
            eventually(caps.timeout, || sub.health().stalled_aggregates == 1).await,
            "not reported stalled"
        );
        assert!(!bus.health().is_healthy());
        assert!(len(&handled) == 0, "a parked message was skipped");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !overtaken.load(Ordering::SeqCst),
            "v2 was attempted while v1 was parked"
        );
        healthy.store(true, Ordering::SeqCst);
        assert!(eventually(caps.timeout, || len(&handled) == 2).await);
        assert_eq!(*handled.lock().unwrap(), vec![1, 2]);
        assert!(
            !overtaken.load(Ordering::SeqCst),
            "v2 was attempted while v1 was parked"
        );
        assert_eq!(sub.health().stalled_aggregates, 0);
        sub.close().await.unwrap();
        bus.close().await.unwrap();
    })
}

fn blocked_aggregate_does_not_stall_others<'a>(
    f: &'a dyn BusFactory,
    caps: &'a Capabilities,
) -> BoxFuture<'a, ()> {
    Box::pin(async move {
        let bus = f.bus(BusConfig::default()).await;
        let topic = unique("hol");
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let handled = seen::<(String, i64)>();
        let (sink, g) = (handled.clone(), gate.clone());
        let sub = bus
            .subscribe_envelope(&topic, SubscribeOptions::group("g"), move |e: Envelope| {
                let (sink, g) = (sink.clone(), g.clone());
                async move {
                    if e.aggregate_id == "slow" && e.event_version == 1 {
                        let _ = g.acquire().await.unwrap();
                    }
                    sink.lock().unwrap().push((e.aggregate_id, e.event_version));
                    Ok::<_, std::io::Error>(())
                }
            })
            .await
            .unwrap();
        let mut events = vec![envelope("slow", 1), envelope("slow", 2)];
        events.extend((0..1_000).map(|a| envelope(&format!("fast-{a}"), 1)));
        publish_all(&bus, &topic, &events).await;
        assert!(
            eventually(caps.timeout, || len(&handled) == 1_000).await,
            "others stalled behind a blocked aggregate: {} of 1000",
            len(&handled)
        );
        assert!(
            handled.lock().unwrap().iter().all(|(a, _)| a != "slow"),
            "slow v2 overtook v1"
        );
        gate.add_permits(1);
        assert!(eventually(caps.timeout, || len(&handled) == 1_002).await);
        let slow: Vec<i64> = handled
            .lock()
            .unwrap()
            .iter()
            .filter(|(a, _)| a == "slow")
            .map(|(_, v)| *v)
            .collect();
        assert_eq!(slow, vec![1, 2]);
        sub.close().await.unwrap();
        bus.close().await.unwrap();
    })
}

fn close_flushes_every_publish_with_one_result<'a>(
    f: &'a dyn BusFactory,
    caps: &'a Capabilities,
) -> BoxFuture<'a, ()> {
    Box::pin(async move {
        let mut config = BusConfig::default();
        config.results.enabled = true;
        let bus = f.bus(config).await;
        let mut results = bus.results().expect("results enabled");
        let collector = tokio::spawn(async move {
            let mut all = Vec::new();
            while let Some(r) = results.next().await {
                all.push(r);
            }
            all
        });
        let topic = unique("flush");
        let events: Vec<Envelope> = (1..=1_000).map(|v| envelope("flushed", v)).collect();
        for e in &events {
            // Handles dropped on purpose: close must still deliver every result.
            drop(bus.publish_envelope(&topic, e).await.unwrap());
        }
        bus.close().await.unwrap();
        let all = tokio::time::timeout(caps.timeout, collector)
            .await
            .expect("results stream ends")
            .unwrap();
        assert_eq!(all.len(), 1_000);
        assert!(all.iter().all(|r| r.is_success()));
        let ids: HashSet<&str> = all.iter().map(|r| r.event_id.as_str()).collect();
        assert_eq!(ids, events.iter().map(|e| e.event_id.as_str()).collect());
    })
}

fn resubscribe_in_same_group_loses_nothing<'a>(
    f: &'a dyn BusFactory,
    caps: &'a Capabilities,
) -> BoxFuture<'a, ()> {
    Box::pin(async move {
        if !caps.persistent {
            return;
        }
        let config = BusConfig {
            close_timeout_ms: 100,
            ..BusConfig::default()
        };
        let bus = f.bus(config).await;
        let topic = unique("resub");
        let handled = seen::<String>();
        let subscribe = |sink: Seen<String>| {
            let bus = bus.clone();
            let topic = topic.clone();
            async move {
                bus.subscribe_envelope(&topic, SubscribeOptions::group("durable"), move |e: Envelope| {
                    let sink = sink.clone();
                    async move {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        sink.lock().unwrap().push(e.event_id);
                        Ok::<_, std::io::Error>(())
                    }
                })
                .await
                .unwrap()
            }
        };
        let first = subscribe(handled.clone()).await;
        let events: Vec<Envelope> = (0..300)
            .map(|i| envelope(&format!("r-{}", i % 30), i / 30 + 1))
            .collect();
        publish_all(&bus, &topic, &events).await;
        assert!(eventually(caps.timeout, || len(&handled) >= 50).await);
        let _ = first.close().await; // may time out: unfinished messages are redelivered
        let second = subscribe(handled.clone()).await;
        let all: HashSet<String> = events.iter().map(|e| e.event_id.clone()).collect();
        let complete = || handled.lock().unwrap().iter().cloned().collect::<HashSet<_>>() == all;
        assert!(
            eventually(caps.timeout, complete).await,
            "lost events after re-subscribing"
        );
        second.close().await.unwrap();
        bus.close().await.unwrap();
    })
}

fn two_groups_each_get_everything<'a>(f: &'a dyn BusFactory, caps: &'a Capabilities) -> BoxFuture<'a, ()> {
    Box::pin(async move {
        let bus = f.bus(BusConfig::default()).await;
        let topic = unique("groups");
        let (a_sub, a) = record_envelopes(&bus, &topic, "group-a").await;
        let (b_sub, b) = record_envelopes(&bus, &topic, "group-b").await;
        let events: Vec<Envelope> = (1..=100).map(|v| envelope("shared", v)).collect();
        publish_all(&bus, &topic, &events).await;
        assert!(
            eventually(caps.timeout, || len(&a) == 100 && len(&b) == 100).await,
            "{} / {}",
            len(&a),
            len(&b)
        );
        assert_eq!(*a.lock().unwrap(), events);
        assert_eq!(*b.lock().unwrap(), events);
        a_sub.close().await.unwrap();
        b_sub.close().await.unwrap();
        bus.close().await.unwrap();
    })
}

fn invalid_envelope_is_rejected_and_nothing_sent<'a>(
    f: &'a dyn BusFactory,
    caps: &'a Capabilities,
) -> BoxFuture<'a, ()> {
    Box::pin(async move {
        let bus = f.bus(BusConfig::default()).await;
        let topic = unique("invalid");
        let (sub, got) = record_raw(&bus, &topic, "g").await;
        let mut bad = envelope("ok", 1);
        bad.aggregate_id = "has space".into();
        let err = bus.publish_envelope(&topic, &bad).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Validation);
        assert_eq!(err.validation().unwrap().field, "aggregate_id");
        let mut bad_version = envelope("ok", 1);
        bad_version.event_version = 0;
        let err = bus
            .publish_batch(&topic, &[envelope("ok", 1), bad_version])
            .await
            .unwrap_err();
        assert_eq!(err.validation().unwrap().field, "event_version");
        let err = bus
            .publish_envelope("bad topic", &envelope("ok", 1))
            .await
            .unwrap_err();
        assert_eq!(err.validation().unwrap().field, "topic");
        let good = envelope("ok", 1);
        bus.publish_envelope_sync(&topic, &good).await.unwrap();
        assert!(eventually(caps.timeout, || len(&got) >= 1).await);
        let got = got.lock().unwrap().clone();
        assert_eq!(got.len(), 1, "an invalid envelope reached the broker");
        assert_eq!(
            got[0].headers.get(headers::EVENT_ID),
            Some(good.event_id.as_str())
        );
        sub.close().await.unwrap();
        bus.close().await.unwrap();
    })
}

fn operations_after_close_fail_closed<'a>(
    f: &'a dyn BusFactory,
    _caps: &'a Capabilities,
) -> BoxFuture<'a, ()> {
    Box::pin(async move {
        let bus = f.bus(BusConfig::default()).await;
        let topic = unique("closed");
        bus.close().await.unwrap();
        bus.close().await.expect("close is idempotent");
        fn kind<T>(r: eventbus_core::Result<T>) -> ErrorKind {
            r.map(|_| ()).unwrap_err().kind()
        }
        assert_eq!(
            kind(bus.publish_envelope(&topic, &envelope("a", 1)).await),
            ErrorKind::Closed
        );
        assert_eq!(kind(bus.publish(&topic, "x").await), ErrorKind::Closed);
        assert_eq!(
            kind(bus.publish_batch(&topic, &[envelope("a", 1)]).await),
            ErrorKind::Closed
        );
        assert_eq!(kind(bus.tenant_results(1)), ErrorKind::Closed);
        let sub = bus
            .subscribe_envelope(&topic, SubscribeOptions::group("g"), |_e: Envelope| async {
                Ok::<_, std::io::Error>(())
            })
            .await;
        assert_eq!(kind(sub), ErrorKind::Closed);
        assert_eq!(bus.health().connection, eventbus_core::ConnectionState::Closed);
    })
}

fn every_envelope_yields_one_result_with_its_event_id<'a>(
    f: &'a dyn BusFactory,
    caps: &'a Capabilities,
) -> BoxFuture<'a, ()> {
    Box::pin(async move {
        let mut config = BusConfig::default();
        config.results.enabled = true;
        let bus = f.bus(config).await;
        let mut results = bus.results().unwrap();
        assert!(bus.results().is_none(), "the results stream is given once");
        let mut tenant_7 = bus.tenant_results(7).unwrap();
        let topic = unique("results");
        let mut sent = HashMap::new();
        for i in 0..500 {
            let e = Envelope::builder(format!("t-{}", i % 10), "Counted", i / 10 + 1)
                .tenant_id(if i % 2 == 0 { 7 } else { 8 })
                .json_payload(&i)
                .unwrap()
                .build()
                .unwrap();
            let handle = bus.publish_envelope(&topic, &e).await.unwrap();
            sent.insert(e.event_id.clone(), (e, handle));
        }
        let batch: Vec<Envelope> = (1..=10).map(|v| envelope("batched", v)).collect();
        let batch_results = bus.publish_batch(&topic, &batch).await.unwrap();
        assert_eq!(batch_results.len(), 10);
        for (r, e) in batch_results.iter().zip(&batch) {
            assert!(r.is_success());
            assert_eq!(r.event_id, e.event_id);
            assert!(r.position.is_some(), "the broker position is reported");
        }
        for (id, (e, handle)) in sent.iter_mut() {
            let r = handle.await;
            assert_eq!(&r.event_id, id);
            assert_eq!(r.aggregate_id, e.aggregate_id);
            assert_eq!(r.tenant_id, e.tenant_id);
            assert_eq!(r.topic, topic);
        }
        let mut global = Vec::new();
        while global.len() < 510 {
            let r = tokio::time::timeout(caps.timeout, results.next())
                .await
                .unwrap()
                .unwrap();
            global.push(r.event_id);
        }
        let unique_ids: HashSet<&String> = global.iter().collect();
        assert_eq!(unique_ids.len(), 510, "one result per envelope");
        assert!(sent.keys().all(|id| unique_ids.contains(id)));
        let mut tenant = 0;
        while tenant < 250 {
            let r = tokio::time::timeout(caps.timeout, tenant_7.next())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(r.tenant_id, Some(7));
            tenant += 1;
        }
        bus.close().await.unwrap();
        assert!(
            results.next().await.is_none(),
            "exactly one result each: nothing more after close"
        );
    })
}

/// One aggregate's queue outlasts the broker's redelivery deadline (NATS
/// `ack_wait`, when the backend runs its suite with a short one): every
/// queued event must still be handled once, in order (issue 9, break 1).
fn slow_handler_with_a_deep_queue_keeps_order<'a>(
    f: &'a dyn BusFactory,
    caps: &'a Capabilities,
) -> BoxFuture<'a, ()> {
    Box::pin(async move {
        const EVENTS: i64 = 8;
        let bus = f.bus(BusConfig::default()).await;
        let topic = unique("slow");
        let checker = Arc::new(OrderChecker::new());
        let (check, name) = (checker.clone(), topic.clone());
        let sub = bus
            .subscribe_envelope(&topic, SubscribeOptions::group("g"), move |e: Envelope| {
                let attempt = check.begin(&name, &e);
                async move {
                    tokio::time::sleep(caps_slow_handler()).await;
                    attempt.succeeded();
                    Ok::<_, std::io::Error>(())
                }
            })
            .await
            .unwrap();
        let events: Vec<Envelope> = (1..=EVENTS).map(|v| envelope("slow-1", v)).collect();
        publish_all(&bus, &topic, &events).await;
        assert!(
            eventually(caps.timeout, || checker.report().received >= EVENTS as u64).await,
            "{}",
            checker.report()
        );
        // Give a late redelivered copy time to show up.
        tokio::time::sleep(caps_slow_handler() * 4).await;
        let report = checker.report();
        assert!(report.is_strictly_ordered(), "{report}");
        assert_eq!(
            (report.received, report.duplicates),
            (EVENTS as u64, 0),
            "{report}"
        );
        sub.close().await.unwrap();
        bus.close().await.unwrap();
    })
}

/// 300 ms: 8 of them outlast a 2 s redelivery deadline.
fn caps_slow_handler() -> Duration {
    Duration::from_millis(300)
}

/// One parked aggregate fills its subscription's in-flight limit; another
/// subscription of the same bus keeps flowing (issue 9, break 4).
fn parked_aggregate_does_not_stop_another_subscription<'a>(
    f: &'a dyn BusFactory,
    caps: &'a Capabilities,
) -> BoxFuture<'a, ()> {
    Box::pin(async move {
        let mut config = config_with_retry(1, 10);
        config.consumer.max_in_flight = 50;
        let bus = f.bus(config).await;
        let parked_topic = unique("parked-a");
        let flowing_topic = unique("flowing-b");
        let parked = bus
            .subscribe_envelope(
                &parked_topic,
                SubscribeOptions::group("g").park_on_failure(),
                |_e: Envelope| async { Err::<(), _>(std::io::Error::other("downstream down")) },
            )
            .await
            .unwrap();
        let (flowing, got) = record_envelopes(&bus, &flowing_topic, "g").await;
        let stuck: Vec<Envelope> = (1..=100).map(|v| envelope("stuck", v)).collect();
        publish_all(&bus, &parked_topic, &stuck).await;
        assert!(
            eventually(caps.timeout, || parked.health().stalled_aggregates == 1).await,
            "the parked aggregate is reported"
        );
        let events: Vec<Envelope> = (1..=100).map(|v| envelope("free", v)).collect();
        publish_all(&bus, &flowing_topic, &events).await;
        assert!(
            eventually(caps.timeout, || len(&got) == 100).await,
            "another subscription stopped behind a parked aggregate: {} of 100",
            len(&got)
        );
        assert!(parked.health().in_flight <= 50, "{:?}", parked.health());
        let _ = parked.close().await;
        flowing.close().await.unwrap();
        let _ = bus.close().await;
    })
}

/// A member killed mid-stream (its runtime dropped, as a crashed process
/// ends: no close, no flush, settlements in flight lost) and a new member
/// started in the same group: every event is handled, the new member replays
/// each aggregate in order from where the group's settlements stopped
/// (strict checker, per member), never from the start.
fn killed_member_restarted_in_its_group_loses_nothing_and_keeps_order<'a>(
    f: &'a dyn BusFactory,
    caps: &'a Capabilities,
) -> BoxFuture<'a, ()> {
    Box::pin(async move {
        if !caps.restartable {
            return;
        }
        let topic = unique("crash");
        let group = unique("g");
        let events: Vec<Envelope> = (1..=20)
            .flat_map(|v| (0..50).map(move |a| envelope(&format!("k-{a}"), v)))
            .collect();
        let checker = Arc::new(OrderChecker::new());
        let handled = Arc::new(AtomicUsize::new(0));
        let covered: Arc<Mutex<HashSet<(String, i64)>>> = Default::default();
        let (kill_tx, kill_rx) = std::sync::mpsc::channel::<()>();
        // The victim runs on a runtime of its own, on a thread of its own, so
        // that dropping the runtime kills it the way a crash would.
        let victim = {
            let (checker, victim_handled, covered) = (checker.clone(), handled.clone(), covered.clone());
            let (topic, group, events) = (topic.clone(), group.clone(), events.clone());
            tokio::task::block_in_place(|| {
                std::thread::scope(|scope| {
                    let thread = scope.spawn(move || {
                        let runtime = tokio::runtime::Builder::new_multi_thread()
                            .worker_threads(1)
                            .enable_all()
                            .build()
                            .expect("victim runtime");
                        let bus = runtime.block_on(async {
                            let bus = f.bus(BusConfig::default()).await;
                            publish_all(&bus, &topic, &events).await;
                            let t = topic.clone();
                            let _sub = bus
                                .subscribe_envelope(
                                    &topic,
                                    SubscribeOptions::group(&group),
                                    move |e: Envelope| {
                                        let attempt = checker.begin_as(1, &t, &e);
                                        let (handled, covered) = (victim_handled.clone(), covered.clone());
                                        async move {
                                            tokio::time::sleep(Duration::from_millis(1)).await;
                                            attempt.succeeded();
                                            covered.lock().unwrap().insert((e.aggregate_id, e.event_version));
                                            handled.fetch_add(1, Ordering::SeqCst);
                                            Ok::<_, std::io::Error>(())
                                        }
                                    },
                                )
                                .await
                                .expect("subscribe");
                            std::mem::forget(_sub); // no close: the crash ends it
                            bus
                        });
                        let _ = kill_rx.recv_timeout(caps.timeout);
                        runtime.shutdown_timeout(Duration::from_secs(5));
                        drop(bus);
                    });
                    let deadline = std::time::Instant::now() + caps.timeout;
                    while handled.load(Ordering::SeqCst) < 200 && std::time::Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    let _ = kill_tx.send(());
                    thread.join().is_ok()
                })
            })
        };
        assert!(victim, "the victim panicked");
        let before = handled.load(Ordering::SeqCst);
        assert!(before >= 200, "the victim handled only {before} before the kill");
        assert!(before < events.len(), "the victim finished before it was killed");

        let bus = f.bus(BusConfig::default()).await;
        let second = Arc::new(AtomicUsize::new(0));
        let (c, s, t, cov) = (checker.clone(), second.clone(), topic.clone(), covered.clone());
        let sub = bus
            .subscribe_envelope(&topic, SubscribeOptions::group(&group), move |e: Envelope| {
                c.record_as(2, &t, &e);
                s.fetch_add(1, Ordering::SeqCst);
                cov.lock().unwrap().insert((e.aggregate_id, e.event_version));
                async { Ok::<_, std::io::Error>(()) }
            })
            .await
            .expect("subscribe");
        let all_handled = eventually(caps.timeout, || covered.lock().unwrap().len() == events.len()).await;
        let r = checker.report();
        assert!(all_handled, "events lost across the crash: {r}");
        assert!(r.is_strictly_ordered(), "order broken across the crash: {r}");
        assert!(
            second.load(Ordering::SeqCst) < events.len(),
            "the restarted member started from the beginning: nothing was settled before the crash"
        );
        sub.close().await.expect("close");
        bus.close().await.expect("close bus");
    })
}

/// An envelope whose event id the subscription already settled (a broker
/// redelivering what it had not recorded as acked, or a producer publishing
/// it twice) is acked without calling the handler again, so a member never
/// goes back to a version it handled (`consumer.dedup_window`).
fn an_event_settled_before_is_not_handled_again<'a>(
    f: &'a dyn BusFactory,
    caps: &'a Capabilities,
) -> BoxFuture<'a, ()> {
    Box::pin(async move {
        let bus = f.bus(BusConfig::default()).await;
        let topic = unique("again");
        let (sub, seen) = record_envelopes(&bus, &topic, &unique("g")).await;
        let first = envelope("x", 1);
        publish_all(&bus, &topic, std::slice::from_ref(&first)).await;
        assert!(eventually(caps.timeout, || len(&seen) == 1).await);
        // The same event again (a broker may store it again or drop it), then the next version.
        publish_all(&bus, &topic, &[first.clone(), envelope("x", 2)]).await;
        assert!(
            eventually(caps.timeout, || seen
                .lock()
                .unwrap()
                .iter()
                .any(|e| e.event_version == 2))
            .await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let versions: Vec<i64> = seen.lock().unwrap().iter().map(|e| e.event_version).collect();
        assert_eq!(
            versions,
            [1, 2],
            "[{}] an event settled before was handled again",
            caps.name
        );
        sub.close().await.expect("close");
        bus.close().await.expect("close bus");
    })
}

/// Handled versions per member, and every (aggregate, version) handled.
#[derive(Default)]
struct GroupRecord {
    per_member: Mutex<HashMap<u64, usize>>,
    covered: Mutex<HashSet<(String, i64)>>,
}

impl GroupRecord {
    fn handled_by(&self, member: u64) -> usize {
        self.per_member.lock().unwrap().get(&member).copied().unwrap_or(0)
    }

    fn covered(&self) -> usize {
        self.covered.lock().unwrap().len()
    }
}

/// A member of `group` on a bus of its own: every attempt goes to `checker`
/// as member `id` (2 ms of work each), every success to `record`.
async fn group_member(
    bus: &eventbus_core::EventBus,
    topic: &str,
    group: &str,
    id: u64,
    checker: &Arc<OrderChecker>,
    record: &Arc<GroupRecord>,
) -> eventbus_core::Subscription {
    let (checker, record, t) = (checker.clone(), record.clone(), topic.to_owned());
    bus.subscribe_envelope(topic, SubscribeOptions::group(group), move |e: Envelope| {
        let attempt = checker.begin_as(id, &t, &e);
        let record = record.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(2)).await;
            attempt.succeeded();
            *record.per_member.lock().unwrap().entry(id).or_default() += 1;
            record
                .covered
                .lock()
                .unwrap()
                .insert((e.aggregate_id, e.event_version));
            Ok::<_, std::io::Error>(())
        }
    })
    .await
    .expect("subscribe")
}

/// Whether every subscription owns at least one partition of its group
/// (reported by the backend in health), within `timeout`.
async fn each_owns_a_share(subs: &[&eventbus_core::Subscription], timeout: Duration) -> bool {
    eventually(timeout, || {
        subs.iter()
            .all(|s| s.health().assignment.is_some_and(|a| !a.owned.is_empty()))
    })
    .await
}

/// Three members of one group (separate buses, as separate processes
/// would be); a fourth joins mid-stream and the first leaves gracefully
/// mid-stream. Every event is handled, each aggregate strictly in order
/// with no overlap across members, and (where groups are shared) every
/// member that stayed handled a share.
fn three_members_share_a_group_in_order_through_join_and_leave<'a>(
    f: &'a dyn BusFactory,
    caps: &'a Capabilities,
) -> BoxFuture<'a, ()> {
    Box::pin(async move {
        let topic = unique("members");
        let group = unique("g");
        let (aggregates, versions) = (60, 20);
        let checker = Arc::new(OrderChecker::new());
        let record = Arc::new(GroupRecord::default());
        let mut members = Vec::new();
        for id in 1..=3 {
            let bus = f.bus(BusConfig::default()).await;
            let sub = group_member(&bus, &topic, &group, id, &checker, &record).await;
            members.push((id, bus, sub));
        }
        if caps.shares_groups {
            let subs: Vec<_> = members.iter().map(|(_, _, s)| s).collect();
            assert!(
                each_owns_a_share(&subs, caps.timeout).await,
                "three members never each owned a share: {:?}",
                subs.iter().map(|s| s.health().assignment).collect::<Vec<_>>()
            );
        }
        let publisher = f.bus(BusConfig::default()).await;
        for v in 1..=versions {
            let round: Vec<Envelope> = (0..aggregates).map(|a| envelope(&format!("m-{a}"), v)).collect();
            publish_all(&publisher, &topic, &round).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            if v == versions / 3 {
                let bus = f.bus(BusConfig::default()).await;
                let sub = group_member(&bus, &topic, &group, 4, &checker, &record).await;
                if caps.shares_groups {
                    assert!(
                        each_owns_a_share(&[&sub], caps.timeout).await,
                        "the fourth member never got a share"
                    );
                }
                members.push((4, bus, sub));
            }
            if v == 2 * versions / 3 {
                let (_, bus, sub) = members.remove(0);
                sub.close().await.expect("graceful leave");
                bus.close().await.expect("close the leaving bus");
            }
        }
        let total = (aggregates * versions) as usize;
        let all = eventually(caps.timeout, || record.covered() == total).await;
        let r = checker.report();
        assert!(all, "events lost: {} of {total} handled; {r}", record.covered());
        assert!(r.is_strictly_ordered(), "order broken across members: {r}");
        if caps.shares_groups {
            for id in [2, 3, 4] {
                assert!(record.handled_by(id) > 0, "member {id} handled nothing: {r}");
            }
        }
        for (_, bus, sub) in members {
            sub.close().await.expect("close");
            bus.close().await.expect("close bus");
        }
        publisher.close().await.expect("close publisher");
    })
}

/// One of three members of a group is killed mid-stream (its runtime
/// dropped: no close, no flush, settlements in flight lost); the two
/// others take over its share, including events published after the
/// crash. Nothing is lost and the strict order holds across the three.
fn killed_member_among_three_loses_nothing_and_keeps_order<'a>(
    f: &'a dyn BusFactory,
    caps: &'a Capabilities,
) -> BoxFuture<'a, ()> {
    Box::pin(async move {
        if !caps.restartable {
            return;
        }
        let topic = unique("crash3");
        let group = unique("g");
        let events: Vec<Envelope> = (1..=20)
            .flat_map(|v| (0..50).map(move |a| envelope(&format!("k-{a}"), v)))
            .collect();
        let checker = Arc::new(OrderChecker::new());
        let record = Arc::new(GroupRecord::default());
        let handle = tokio::runtime::Handle::current();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
        let (kill_tx, kill_rx) = std::sync::mpsc::channel::<()>();
        let survivors = tokio::task::block_in_place(|| {
            std::thread::scope(|scope| {
                let victim = {
                    let (checker, record, topic, group) =
                        (checker.clone(), record.clone(), topic.clone(), group.clone());
                    scope.spawn(move || {
                        let runtime = tokio::runtime::Builder::new_multi_thread()
                            .worker_threads(1)
                            .enable_all()
                            .build()
                            .expect("victim runtime");
                        let bus = runtime.block_on(async {
                            let bus = f.bus(BusConfig::default()).await;
                            let sub = group_member(&bus, &topic, &group, 1, &checker, &record).await;
                            std::mem::forget(sub); // no close: the crash ends it
                            bus
                        });
                        let _ = ready_tx.send(());
                        let _ = kill_rx.recv_timeout(caps.timeout * 2);
                        runtime.shutdown_timeout(Duration::from_secs(5));
                        drop(bus);
                    })
                };
                ready_rx.recv_timeout(caps.timeout).expect("victim subscribed");
                let survivors = handle.block_on(async {
                    let mut survivors = Vec::new();
                    for id in [2, 3] {
                        let bus = f.bus(BusConfig::default()).await;
                        let sub = group_member(&bus, &topic, &group, id, &checker, &record).await;
                        survivors.push((bus, sub));
                    }
                    if caps.shares_groups {
                        let subs: Vec<_> = survivors.iter().map(|(_, s)| s).collect();
                        assert!(
                            each_owns_a_share(&subs, caps.timeout).await,
                            "the survivors never got a share"
                        );
                    }
                    let publisher = f.bus(BusConfig::default()).await;
                    publish_all(&publisher, &topic, &events[..events.len() / 2]).await;
                    let victim_worked = eventually(caps.timeout, || record.handled_by(1) >= 20).await;
                    assert!(victim_worked, "the victim handled only {}", record.handled_by(1));
                    (survivors, publisher)
                });
                let _ = kill_tx.send(());
                assert!(victim.join().is_ok(), "the victim panicked");
                survivors
            })
        });
        let (survivors, publisher) = survivors;
        // The second half comes after the crash: the victim's share must flow to the others.
        publish_all(&publisher, &topic, &events[events.len() / 2..]).await;
        publisher.close().await.expect("close publisher");
        let all = eventually(caps.timeout, || record.covered() == events.len()).await;
        let r = checker.report();
        assert!(
            all,
            "events lost across the crash: {} of {}; {r}",
            record.covered(),
            events.len()
        );
        assert!(r.is_strictly_ordered(), "order broken across the crash: {r}");
        for (bus, sub) in survivors {
            sub.close().await.expect("close");
            bus.close().await.expect("close bus");
        }
    })
}

/// The bad-input matrix: messages tied to aggregate `agg` by their
/// `X-Aggregate-ID` header and record key whose bodies are no valid envelope (not JSON,
/// empty, each required field missing, wrong types, an invalid aggregate
/// id, version 0 or negative) are each dead-lettered once, without calling
/// the handler, with a reason naming the field; the aggregate's valid
/// events around them are all handled, in order; a header value with a
/// control character is refused at publish (`Validation` naming the
/// header) or delivered with its envelope; nothing panics.
fn bad_input_is_dead_lettered_naming_the_field<'a>(
    f: &'a dyn BusFactory,
    caps: &'a Capabilities,
) -> BoxFuture<'a, ()> {
    Box::pin(async move {
        let bus = f.bus(config_with_retry(3, 10)).await;
        let topic = unique("badinput");
        let (dlq_sub, dead) = record_raw(&bus, &format!("{topic}.dlq"), "inspect").await;
        let (sub, got) = record_envelopes(&bus, &topic, "g").await;
        let valid = |v: i64| serde_json::to_value(envelope("agg", v)).unwrap();
        let without = |field: &str| {
            let mut e = valid(99);
            e.as_object_mut().unwrap().remove(field);
            e.to_string()
        };
        let with = |field: &str, value: serde_json::Value| {
            let mut e = valid(99);
            e[field] = value;
            e.to_string()
        };
        // (body, the field the reason must name, or "" for any reason)
        let mut bad: Vec<(String, &str)> = vec![
            ("{not json".into(), ""),
            (String::new(), ""),
            ("[1,2,3]".into(), ""),
            ("null".into(), ""),
        ];
        for field in [
            "event_id",
            "aggregate_id",
            "event_type",
            "event_version",
            "timestamp",
            "payload",
        ] {
            bad.push((without(field), field));
        }
        bad.extend([
            (with("event_version", "3".into()), "event_version"),
            (with("event_version", 1.5.into()), "event_version"),
            (with("timestamp", 1_700_000_000.into()), "timestamp"),
            (with("timestamp", "yesterday".into()), "timestamp"),
            (with("aggregate_id", 42.into()), "aggregate_id"),
            (with("event_type", serde_json::json!(["T"])), "event_type"),
            (with("tenant_id", "seven".into()), "tenant_id"),
            (with("aggregate_id", "agg with spaces".into()), "aggregate_id"),
            (with("aggregate_id", "a".repeat(257).into()), "aggregate_id"),
            (with("event_version", 0.into()), "event_version"),
            (with("event_version", (-1).into()), "event_version"),
            (with("event_type", " ".into()), "event_type"),
            (with("payload", serde_json::Value::Null), "payload"),
        ]);
        let publish_bad = |body: String| {
            let bus = bus.clone();
            let topic = topic.clone();
            async move {
                let m = Message::new(&topic, body.into_bytes())
                    .with_key("agg")
                    .with_header(headers::AGGREGATE_ID, "agg");
                bus.publish_message(m).await.unwrap().await.into_result().unwrap();
            }
        };
        // v1, every bad message, v2..v3: the bad ones sit between valid versions.
        bus.publish_envelope_sync(&topic, &envelope("agg", 1))
            .await
            .unwrap();
        for (body, _) in &bad {
            publish_bad(body.clone()).await;
        }
        for v in 2..=3 {
            bus.publish_envelope_sync(&topic, &envelope("agg", v))
                .await
                .unwrap();
        }
        // A header value with a control character: refused, or carried as is.
        let odd = Message::new(&topic, serde_json::to_vec(&valid(4)).unwrap())
            .with_key("agg")
            .with_header("X-Odd", "bell\u{7}tab\there");
        let odd_sent = match bus.publish_message(odd).await {
            Ok(handle) => {
                handle.await.into_result().unwrap();
                true
            }
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::Validation, "{e}");
                assert!(e.to_string().contains("header"), "{e}");
                false
            }
        };
        if !odd_sent {
            bus.publish_envelope_sync(&topic, &envelope("agg", 4))
                .await
                .unwrap();
        }
        assert!(
            eventually(caps.timeout, || len(&dead) == bad.len() && len(&got) == 4).await,
            "dead-lettered {} of {}, handled {} of 4: {:?}",
            len(&dead),
            bad.len(),
            len(&got),
            got.lock()
                .unwrap()
                .iter()
                .map(|e| e.event_version)
                .collect::<Vec<_>>()
        );
        let versions: Vec<i64> = got.lock().unwrap().iter().map(|e| e.event_version).collect();
        assert_eq!(
            versions,
            vec![1, 2, 3, 4],
            "the aggregate's valid events, in order"
        );
        let dead = dead.lock().unwrap().clone();
        for (body, field) in &bad {
            let letter = dead
                .iter()
                .find(|m| m.payload == body.as_bytes())
                .unwrap_or_else(|| panic!("not dead-lettered: {body:.80}"));
            let reason = letter.headers.get(headers::ERROR_MESSAGE).unwrap_or_default();
            assert!(!reason.is_empty(), "no reason for {body:.80}");
            assert!(
                reason.contains(field),
                "reason {reason:?} does not name {field} ({body:.80})"
            );
            assert_eq!(letter.headers.get(headers::ORIGINAL_TOPIC), Some(topic.as_str()));
        }
        assert_eq!(sub.health().dead_lettered, bad.len() as u64);
        sub.close().await.unwrap();
        dlq_sub.close().await.unwrap();
        bus.close().await.unwrap();
    })
}

/// A message above the backend's size limit (2 MiB; NATS's default
/// `max_payload` and librdkafka's `message.max.bytes` are 1 MB, the memory
/// backend's `memory.max_message_bytes` 1 MiB) is refused with a
/// `Validation` error naming the payload, at publish or as the publish's
/// result, never a hang or a silent drop; the next publish goes through.
fn oversized_message_is_refused_at_publish<'a>(
    f: &'a dyn BusFactory,
    caps: &'a Capabilities,
) -> BoxFuture<'a, ()> {
    Box::pin(async move {
        let bus = f.bus(BusConfig::default()).await;
        let topic = unique("oversized");
        let (sub, got) = record_envelopes(&bus, &topic, "g").await;
        let big = Envelope::builder("big", "T", 1)
            .json_payload(&"x".repeat(2 << 20))
            .unwrap()
            .build()
            .unwrap();
        let outcome = match bus.publish_envelope(&topic, &big).await {
            Err(e) => Arc::new(e),
            Ok(handle) => tokio::time::timeout(caps.timeout, handle)
                .await
                .expect("the oversized publish got no result")
                .error
                .expect("an oversized message was reported delivered"),
        };
        assert_eq!(outcome.kind(), ErrorKind::Validation, "{outcome}");
        assert!(outcome.to_string().contains("payload"), "{outcome}");
        bus.publish_envelope_sync(&topic, &envelope("big", 1))
            .await
            .unwrap();
        assert!(eventually(caps.timeout, || len(&got) == 1).await);
        assert_eq!(
            got.lock().unwrap()[0].payload.len(),
            envelope("big", 1).payload.len()
        );
        sub.close().await.unwrap();
        bus.close().await.unwrap();
    })
}

/// Lag: 30 events published while the handler is held count 30 in health
/// (and raise the alert at `consumer.lag_alert_messages` = 20); once
/// released and handled, the lag goes back to 0 and the alert clears.
fn lag_counts_what_the_group_has_not_settled<'a>(
    f: &'a dyn BusFactory,
    caps: &'a Capabilities,
) -> BoxFuture<'a, ()> {
    Box::pin(async move {
        if !caps.lag {
            return;
        }
        let mut config = BusConfig::default();
        config.consumer.lag_alert_messages = 20;
        let bus = f.bus(config).await;
        let topic = unique("lag");
        let held = HeldHandler::new();
        let sub = held.subscribe(&bus, &topic, "g").await;
        let events: Vec<Envelope> = (1..=10)
            .flat_map(|v| (0..3).map(move |a| envelope(&format!("lag-{a}"), v)))
            .collect();
        publish_all(&bus, &topic, &events).await;
        assert!(
            eventually(caps.timeout, || sub.health().lag == Some(30)).await,
            "lag with 30 unsettled: {:?}",
            sub.health().lag
        );
        assert!(sub.health().lag_alert, "30 is past the alert threshold of 20");
        held.release();
        assert!(eventually(caps.timeout, || held.handled() == 30).await);
        assert!(
            eventually(caps.timeout, || sub.health().lag == Some(0)).await,
            "lag after handling everything: {:?}",
            sub.health().lag
        );
        assert!(!sub.health().lag_alert);
        sub.close().await.unwrap();
        bus.close().await.unwrap();
    })
}

/// Handler middleware ([`eventbus_core::layer`]) around a tower service:
/// tracing, a timeout that fires on the first attempt of every version 3, a
/// concurrency limit of 2 and a token bucket. Every event is handled once
/// it succeeds, in order, with no two attempts of an aggregate at once (a
/// timed-out attempt is dropped before the retry starts), and never more
/// than 2 calls at once.
fn layers_run_inside_the_aggregate_slot<'a>(
    f: &'a dyn BusFactory,
    caps: &'a Capabilities,
) -> BoxFuture<'a, ()> {
    use eventbus_core::layer::{ConcurrencyLimitLayer, RateLimitLayer, TimeoutLayer, TraceLayer};
    use tower::ServiceBuilder;
    Box::pin(async move {
        let bus = f.bus(config_with_retry(5, 10)).await;
        let topic = unique("layers");
        let checker = Arc::new(OrderChecker::new());
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let timed_out = Arc::new(Mutex::new(HashSet::<String>::new()));
        let handler = {
            let (checker, running, most, timed_out, topic) = (
                checker.clone(),
                running.clone(),
                most.clone(),
                timed_out.clone(),
                topic.clone(),
            );
            tower::service_fn(move |e: Envelope| {
                let (checker, running, most, timed_out, topic) = (
                    checker.clone(),
                    running.clone(),
                    most.clone(),
                    timed_out.clone(),
                    topic.clone(),
                );
                async move {
                    let attempt = checker.begin(&topic, &e);
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    struct Leave(Arc<AtomicUsize>);
                    impl Drop for Leave {
                        fn drop(&mut self) {
                            self.0.fetch_sub(1, Ordering::SeqCst);
                        }
                    }
                    let _leave = Leave(running);
                    let first =
                        e.event_version == 3 && timed_out.lock().unwrap().insert(e.aggregate_id.clone());
                    if first {
                        tokio::time::sleep(Duration::from_secs(30)).await; // past the timeout
                    } else {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    attempt.succeeded();
                    Ok::<_, std::io::Error>(())
                }
            })
        };
        let service = ServiceBuilder::new()
            .layer(TraceLayer::new(topic.clone(), "g").system(bus.backend_name()))
            .layer(TimeoutLayer::new(Duration::from_millis(300)))
            .layer(ConcurrencyLimitLayer::new(2))
            .layer(RateLimitLayer::per_second(2_000, 50).unwrap())
            .service(handler);
        let sub = bus
            .subscribe_service(&topic, SubscribeOptions::group("g"), service)
            .await
            .expect("subscribe");
        let events: Vec<Envelope> = (1..=8)
            .flat_map(|v| (0..10).map(move |a| envelope(&format!("layered-{a}"), v)))
            .collect();
        publish_all(&bus, &topic, &events).await;
        assert!(
            eventually(caps.timeout, || checker.report().received >= 80).await,
            "handled {}",
            checker.report()
        );
        let report = checker.report();
        assert_eq!(report.received, 80, "{report}");
        assert!(report.is_strictly_ordered(), "{report}");
        assert_eq!(report.overlaps, 0, "{report}");
        assert_eq!(
            timed_out.lock().unwrap().len(),
            10,
            "each version 3 timed out once"
        );
        assert!(
            report.attempts >= 90,
            "the timed-out attempts count as attempts: {report}"
        );
        let most = most.load(Ordering::SeqCst);
        assert!(most <= 2, "{most} calls at once under a limit of 2");
        // The checker sees the last success inside the handler; the
        // subscription counts it once the handler returned and it settled.
        eventually(Duration::from_secs(5), || sub.health().handled >= 80).await;
        let health = sub.health();
        assert_eq!(health.handled, 80);
        assert_eq!(health.dead_lettered, 0);
        sub.close().await.unwrap();
        bus.close().await.unwrap();
    })
}

/// `browse` reads a topic from its first message without a group: every
/// message with a distinct position, each aggregate in publish order; it
/// follows new messages; a second browse reads everything again; and a
/// group subscribing afterwards still receives everything.
fn browse_reads_without_moving_any_group<'a>(
    f: &'a dyn BusFactory,
    caps: &'a Capabilities,
) -> BoxFuture<'a, ()> {
    Box::pin(async move {
        let bus = f.bus(BusConfig::default()).await;
        let topic = unique("browse");
        let events: Vec<Envelope> = (1..=5)
            .flat_map(|v| ["browse-a", "browse-b"].map(|a| envelope(a, v)))
            .collect();
        publish_all(&bus, &topic, &events).await;
        let read = |n: usize| {
            let bus = bus.clone();
            let topic = topic.clone();
            async move {
                let mut stream = bus.browse(&topic).await.expect("browse");
                let mut got = Vec::new();
                while got.len() < n {
                    match tokio::time::timeout(caps.timeout, stream.next()).await {
                        Ok(Some(item)) => got.push(item.expect("browsed message")),
                        other => panic!("browse stopped after {} of {n}: {other:?}", got.len()),
                    }
                }
                (stream, got)
            }
        };
        let (mut stream, first) = read(10).await;
        let positions: HashSet<_> = first.iter().map(|b| b.position).collect();
        assert_eq!(positions.len(), 10, "distinct positions");
        let decoded: Vec<Envelope> = first
            .iter()
            .map(|b| eventbus_core::codec::decode_envelope(&b.message).expect("an envelope"))
            .collect();
        for aggregate in ["browse-a", "browse-b"] {
            let versions: Vec<i64> = decoded
                .iter()
                .filter(|e| e.aggregate_id == aggregate)
                .map(|e| e.event_version)
                .collect();
            assert_eq!(versions, vec![1, 2, 3, 4, 5], "{aggregate} in order");
        }
        assert!(first.iter().all(|b| b.message.topic == topic));
        // It follows: a later publish arrives on the open stream.
        bus.publish_envelope_sync(&topic, &envelope("browse-a", 6))
            .await
            .unwrap();
        let next = tokio::time::timeout(caps.timeout, stream.next())
            .await
            .expect("a followed message")
            .expect("stream open")
            .expect("browsed message");
        assert_eq!(
            eventbus_core::codec::decode_envelope(&next.message)
                .unwrap()
                .event_version,
            6
        );
        drop(stream);
        let (_, again) = read(11).await;
        assert_eq!(again.len(), 11);
        let (sub, got) = record_envelopes(&bus, &topic, "after-browse").await;
        assert!(
            eventually(caps.timeout, || len(&got) >= 11).await,
            "the group got {} of 11",
            len(&got)
        );
        sub.close().await.unwrap();
        bus.close().await.unwrap();
    })
}

/// `group_lag` from outside the group: a group that never subscribed has
/// everything pending; once a member handled everything, 0 on every
/// partition (Kafka: only where the broker's log-end offsets are true).
fn group_lag_is_measured_without_joining<'a>(
    f: &'a dyn BusFactory,
    caps: &'a Capabilities,
) -> BoxFuture<'a, ()> {
    Box::pin(async move {
        if !caps.group_lag {
            eprintln!(
                "{}: log-end offsets untrusted here; group lag tested elsewhere",
                caps.name
            );
            return;
        }
        let bus = f.bus(BusConfig::default()).await;
        let topic = unique("group-lag");
        let events: Vec<Envelope> = (1..=10)
            .flat_map(|v| (0..3).map(move |a| envelope(&format!("lagged-{a}"), v)))
            .collect();
        publish_all(&bus, &topic, &events).await;
        let total = |lags: &[eventbus_core::PartitionLag]| lags.iter().map(|l| l.pending).sum::<u64>();
        let before = bus.group_lag(&topic, "late").await.expect("group lag");
        assert_eq!(total(&before), 30, "{before:?}");
        let (sub, got) = record_envelopes(&bus, &topic, "late").await;
        assert!(eventually(caps.timeout, || len(&got) >= 30).await);
        // Committed offsets and ack floors trail the handler a little.
        let deadline = tokio::time::Instant::now() + caps.timeout;
        let (settled, after) = loop {
            let lags = bus.group_lag(&topic, "late").await.expect("group lag");
            if total(&lags) == 0 || tokio::time::Instant::now() >= deadline {
                break (total(&lags) == 0, lags);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert!(settled, "still pending: {after:?}");
        assert!(after.iter().all(|l| l.oldest_unsettled_at.is_none()), "{after:?}");
        sub.close().await.unwrap();
        bus.close().await.unwrap();
    })
}

/// One OpenTelemetry trace spans each event's publish and handling: the
/// W3C trace context travels in the broker's headers, so every `receive`
/// span is a child of its `publish` span, and every handler attempt's
/// `process` span a child of its `receive` span, with the messaging
/// attributes (captured by an in-memory exporter).
fn one_trace_spans_publish_and_handle<'a>(
    f: &'a dyn BusFactory,
    caps: &'a Capabilities,
) -> BoxFuture<'a, ()> {
    use crate::otel::{SpanCapture, TRACED_PREFIX, attribute};
    use opentelemetry::trace::SpanKind;
    Box::pin(async move {
        let capture = SpanCapture::global();
        let bus = f.bus(config_with_retry(3, 10)).await;
        let topic = unique(&format!("{TRACED_PREFIX}orders"));
        let failed_once = Arc::new(AtomicBool::new(false));
        let handled = Arc::new(AtomicUsize::new(0));
        let (flag, count) = (failed_once.clone(), handled.clone());
        let sub = bus
            .subscribe_envelope(&topic, SubscribeOptions::group("traced"), move |e: Envelope| {
                let fail = e.event_version == 2 && !flag.swap(true, Ordering::SeqCst);
                if !fail {
                    count.fetch_add(1, Ordering::SeqCst);
                }
                async move {
                    match fail {
                        true => Err(std::io::Error::other("first attempt fails")),
                        false => Ok(()),
                    }
                }
            })
            .await
            .expect("subscribe");
        let events: Vec<Envelope> = (1..=3).map(|v| envelope("traced-order", v)).collect();
        publish_all(&bus, &topic, &events).await;
        assert!(eventually(caps.timeout, || handled.load(Ordering::SeqCst) == 3).await);
        sub.close().await.unwrap();
        let of_topic = |spans: &[opentelemetry_sdk::trace::SpanData]| {
            spans
                .iter()
                .filter(|s| s.name.ends_with(&format!(" {topic}")))
                .cloned()
                .collect::<Vec<_>>()
        };
        // Spans end when their work settles; wait for all of them.
        let mut spans = Vec::new();
        let deadline = tokio::time::Instant::now() + caps.timeout;
        while tokio::time::Instant::now() < deadline {
            spans = of_topic(&capture.spans());
            let process = spans.iter().filter(|s| s.name.starts_with("process ")).count();
            let receive = spans.iter().filter(|s| s.name.starts_with("receive ")).count();
            if process >= 4 && receive >= 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for e in &events {
            let with_id = |name: &str| {
                spans
                    .iter()
                    .filter(|s| {
                        s.name.starts_with(name)
                            && attribute(s, "messaging.message.id").as_deref() == Some(e.event_id.as_str())
                    })
                    .cloned()
                    .collect::<Vec<_>>()
            };
            let publish = with_id("publish ");
            assert_eq!(
                publish.len(),
                1,
                "one publish span of v{}: {spans:#?}",
                e.event_version
            );
            let publish = &publish[0];
            assert_eq!(publish.span_kind, SpanKind::Producer);
            assert_eq!(
                attribute(publish, "messaging.system").as_deref(),
                Some(bus.backend_name())
            );
            assert_eq!(
                attribute(publish, "messaging.operation.type").as_deref(),
                Some("publish")
            );
            let trace = publish.span_context.trace_id();
            let receives = with_id("receive ");
            assert!(!receives.is_empty(), "no receive span of v{}", e.event_version);
            for receive in &receives {
                assert_eq!(
                    receive.span_context.trace_id(),
                    trace,
                    "receive in the publish's trace"
                );
                assert_eq!(receive.parent_span_id, publish.span_context.span_id());
                assert_eq!(receive.span_kind, SpanKind::Consumer);
                assert_eq!(
                    attribute(receive, "messaging.consumer.group.name").as_deref(),
                    Some("traced")
                );
                assert_eq!(
                    attribute(receive, "messaging.destination.name").as_deref(),
                    Some(topic.as_str())
                );
            }
            let process: Vec<_> = spans
                .iter()
                .filter(|s| {
                    s.name.starts_with("process ")
                        && receives
                            .iter()
                            .any(|r| r.span_context.span_id() == s.parent_span_id)
                })
                .collect();
            let expected = if e.event_version == 2 { 2 } else { 1 };
            assert!(
                process.len() >= expected,
                "v{}: {} process spans, expected {expected}",
                e.event_version,
                process.len()
            );
            assert!(process.iter().all(|p| p.span_context.trace_id() == trace));
        }
        bus.close().await.unwrap();
    })
}

/// The metrics of a known workload, exactly, through the `metrics` facade:
/// 10 events, v3 failing both attempts and dead-lettered: published 10
/// (and 1 to the dead-letter topic), handled 9, handler errors 2, retries 1,
/// dead-lettered 1, histograms with a sample per attempt and per handled
/// event, in-flight back to 0; labels backend, topic, group only.
fn metrics_count_a_known_workload_exactly<'a>(
    f: &'a dyn BusFactory,
    caps: &'a Capabilities,
) -> BoxFuture<'a, ()> {
    use crate::metrics_capture::MetricsCapture;
    use eventbus_core::telemetry::{
        DEAD_LETTERED, END_TO_END_LATENCY, HANDLED, HANDLER_DURATION, HANDLER_ERRORS, IN_FLIGHT, PUBLISHED,
        RETRIES,
    };
    use metrics_util::MetricKind;
    use metrics_util::debugging::DebugValue;
    Box::pin(async move {
        let capture = MetricsCapture::global();
        let bus = f.bus(config_with_retry(2, 10)).await;
        let topic = unique("metered");
        let sub = bus
            .subscribe_envelope(
                &topic,
                SubscribeOptions::group("billing"),
                |e: Envelope| async move {
                    match e.event_version {
                        3 => Err(std::io::Error::other("always fails")),
                        _ => Ok(()),
                    }
                },
            )
            .await
            .expect("subscribe");
        let events: Vec<Envelope> = (1..=10).map(|v| envelope("metered-1", v)).collect();
        publish_all(&bus, &topic, &events).await;
        assert!(
            eventually(caps.timeout, || {
                let h = sub.health();
                h.handled == 9 && h.dead_lettered == 1
            })
            .await,
            "{:?}",
            sub.health()
        );
        sub.close().await.unwrap();
        let series = capture.series();
        let of = |kind: MetricKind, name: &str, topic: &str| {
            series
                .iter()
                .filter(|(k, n, labels, _)| {
                    *k == kind && n == name && labels.iter().any(|(l, v)| l == "topic" && v == topic)
                })
                .collect::<Vec<_>>()
        };
        let counter = |name: &str, topic: &str| -> u64 {
            of(MetricKind::Counter, name, topic)
                .iter()
                .map(|(_, _, _, v)| match v {
                    DebugValue::Counter(n) => *n,
                    _ => 0,
                })
                .sum()
        };
        let mine: Vec<String> = series
            .iter()
            .filter(|(_, _, labels, _)| labels.iter().any(|(_, v)| v.starts_with(&topic)))
            .map(|(k, n, l, _)| format!("{k:?} {n} {l:?}"))
            .collect();
        assert_eq!(counter(PUBLISHED, &topic), 10, "{mine:#?}");
        assert_eq!(counter(PUBLISHED, &format!("{topic}.dlq")), 1, "the dead letter");
        assert_eq!(counter(HANDLED, &topic), 9);
        assert_eq!(counter(HANDLER_ERRORS, &topic), 2, "both attempts of v3");
        assert_eq!(counter(RETRIES, &topic), 1);
        assert_eq!(counter(DEAD_LETTERED, &topic), 1);
        let samples = |name: &str| -> usize {
            of(MetricKind::Histogram, name, &topic)
                .iter()
                .map(|(_, _, _, v)| match v {
                    DebugValue::Histogram(s) => s.len(),
                    _ => 0,
                })
                .sum()
        };
        assert!(
            samples(HANDLER_DURATION) >= 11,
            "one per attempt: {}",
            samples(HANDLER_DURATION)
        );
        assert_eq!(samples(END_TO_END_LATENCY), 9, "one per handled event");
        let in_flight: f64 = of(MetricKind::Gauge, IN_FLIGHT, &topic)
            .iter()
            .map(|(_, _, _, v)| match v {
                DebugValue::Gauge(g) => g.into_inner(),
                _ => 0.0,
            })
            .sum();
        assert_eq!(in_flight, 0.0);
        let (_, _, labels, _) = of(MetricKind::Counter, HANDLED, &topic)[0];
        let mut names: Vec<String> = labels.iter().map(|(l, v)| format!("{l}={v}")).collect();
        names.sort();
        assert_eq!(
            names,
            [
                format!("backend={}", bus.backend_name()),
                "group=billing".to_owned(),
                format!("topic={topic}")
            ]
        );
        bus.close().await.unwrap();
    })
}
