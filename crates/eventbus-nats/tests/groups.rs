//! Consumer groups on NATS against a real nats-server: a member joining a
//! running group (a rolling deploy), partitioned topics' subjects, and the
//! members' shares in health.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventbus_core::{BusConfig, Envelope, EventBus, SubscribeOptions, Subscription};
use eventbus_nats::{NatsBackend, NatsConfig};
use eventbus_testkit::server::NatsServer;
use eventbus_testkit::{OrderChecker, envelope, eventually};

async fn bus(server: &NatsServer, partitions: &[(&str, u32)]) -> EventBus {
    let mut config = NatsConfig::with_servers([server.url()]);
    config.consumer.lease_ms = 2_000;
    config.consumer.ack_wait_ms = 2_000;
    for (topic, n) in partitions {
        config.partitions.insert((*topic).into(), *n);
    }
    let backend = NatsBackend::connect(config).await.unwrap();
    EventBus::new(backend, BusConfig::default()).unwrap()
}

type Covered = Arc<Mutex<HashSet<(String, i64)>>>;

/// A member recording every attempt as `id`, 50 ms of work per event.
async fn member(
    bus: &EventBus,
    topic: &str,
    id: u64,
    checker: &Arc<OrderChecker>,
    covered: &Covered,
    count: &Arc<AtomicUsize>,
) -> Subscription {
    let (checker, covered, count, t) = (checker.clone(), covered.clone(), count.clone(), topic.to_owned());
    bus.subscribe_envelope(topic, SubscribeOptions::group("g"), move |e: Envelope| {
        let attempt = checker.begin_as(id, &t, &e);
        let (covered, count) = (covered.clone(), count.clone());
        async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            attempt.succeeded();
            covered.lock().unwrap().insert((e.aggregate_id, e.event_version));
            count.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>(())
        }
    })
    .await
    .unwrap()
}

/// A rolling deploy: the new instance subscribes while the old one has
/// unacked messages. The old one keeps consuming (its consumer is neither
/// deleted nor rewound under it), the new one stands by, and takes over in
/// order when the old one leaves (events published before and after).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_joining_with_acks_pending_leaves_the_running_member_alone() {
    let server = NatsServer::start().await.unwrap();
    let (old, new) = (bus(&server, &[]).await, bus(&server, &[]).await);
    let events: Vec<Envelope> = (1..=60)
        .flat_map(|v| (0..10).map(move |a| envelope(&format!("r-{a}"), v)))
        .collect();
    let (first, second) = events.split_at(events.len() / 2);
    for e in first {
        old.publish_envelope_sync("rolling", e).await.unwrap();
    }
    let checker = Arc::new(OrderChecker::new());
    let covered: Covered = Default::default();
    let (by_old, by_new) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let old_sub = member(&old, "rolling", 1, &checker, &covered, &by_old).await;
    assert!(eventually(Duration::from_secs(20), || by_old.load(Ordering::SeqCst) >= 30).await);
    let new_sub = member(&new, "rolling", 2, &checker, &covered, &by_new).await;
    let before = by_old.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(
        old_sub.health().fetching,
        "the running member stopped fetching when another joined"
    );
    assert!(
        by_old.load(Ordering::SeqCst) > before,
        "the running member stopped handling when another joined"
    );
    assert_eq!(
        by_new.load(Ordering::SeqCst),
        0,
        "two members consumed one unpartitioned topic at once"
    );
    old_sub.close().await.unwrap();
    old.close().await.unwrap();
    for e in second {
        new.publish_envelope_sync("rolling", e).await.unwrap();
    }
    let all = eventually(Duration::from_secs(30), || {
        covered.lock().unwrap().len() == events.len()
    })
    .await;
    let r = checker.report();
    assert!(all, "events lost across the handover: {r}");
    assert!(
        by_new.load(Ordering::SeqCst) > 0,
        "the new member never took over: {r}"
    );
    assert!(r.is_strictly_ordered(), "order broken across the handover: {r}");
    assert!(new_sub.health().fetching);
    new_sub.close().await.unwrap();
    new.close().await.unwrap();
}

/// A partitioned topic's event is stored on the subject of its aggregate's
/// partition, `<topic>.<partition_for(aggregate id)>`, in the stream the
/// topic got at its first use, `BUSINESS_STREAM_<topic>`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_topic_stores_each_aggregate_on_its_partition_subject() {
    let server = NatsServer::start().await.unwrap();
    let bus = bus(&server, &[("parts", 4)]).await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    for aggregate in ["order-1", "order-2", "order-3", "order-4", "order-5"] {
        let e = envelope(aggregate, 1);
        bus.publish_envelope_sync("parts", &e).await.unwrap();
        let stream = js.get_stream("BUSINESS_STREAM_parts").await.unwrap();
        let p = eventbus_core::partition_for(aggregate.as_bytes(), 4);
        let stored = stream
            .get_last_raw_message_by_subject(&format!("parts.{p}"))
            .await
            .unwrap();
        let got = Envelope::decode(&stored.payload).unwrap();
        assert_eq!(got.event_id, e.event_id, "{aggregate} is not on partition {p}");
    }
    bus.close().await.unwrap();
}

/// Health shows each member's partitions and the group's size; when one
/// member leaves, the other takes every partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_shows_each_members_partitions_and_a_leave_hands_them_over() {
    let server = NatsServer::start().await.unwrap();
    let (a, b) = (
        bus(&server, &[("shares", 4)]).await,
        bus(&server, &[("shares", 4)]).await,
    );
    let handler = |_e: Envelope| async { Ok::<_, std::io::Error>(()) };
    let sa = a
        .subscribe_envelope("shares", SubscribeOptions::group("g"), handler)
        .await
        .unwrap();
    let sb = b
        .subscribe_envelope("shares", SubscribeOptions::group("g"), handler)
        .await
        .unwrap();
    let owned = |s: &Subscription| s.health().assignment.map(|a| (a.owned.len(), a.members));
    let split = eventually(Duration::from_secs(20), || {
        owned(&sa) == Some((2, 2)) && owned(&sb) == Some((2, 2))
    })
    .await;
    assert!(
        split,
        "no even split: {:?} / {:?}",
        sa.health().assignment,
        sb.health().assignment
    );
    let mut all: Vec<u32> = [&sa, &sb]
        .iter()
        .flat_map(|s| s.health().assignment.unwrap().owned)
        .collect();
    all.sort();
    assert_eq!(all, vec![0, 1, 2, 3], "each partition has exactly one owner");
    sa.close().await.unwrap();
    assert!(
        eventually(Duration::from_secs(10), || owned(&sb) == Some((4, 1))).await,
        "the remaining member did not take over: {:?}",
        sb.health().assignment
    );
    assert!(sb.health().assignment.unwrap().rebalances >= 2);
    sb.close().await.unwrap();
    a.close().await.unwrap();
    b.close().await.unwrap();
}

/// On a partitioned topic, a parked aggregate holds at most
/// `consumer.max_ack_pending_per_partition` messages of its partition; the
/// subscription's other partitions flow, though the parked one has more
/// queued than the subscription's `max_in_flight`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_aggregate_holds_back_only_its_partition() {
    let server = NatsServer::start().await.unwrap();
    let mut nats = NatsConfig::with_servers([server.url()]);
    nats.partitions.insert("parks".into(), 4);
    nats.consumer.max_ack_pending_per_partition = 20;
    nats.consumer.lease_ms = 2_000;
    let mut config = BusConfig::default();
    config.consumer.max_in_flight = 50;
    config.close_timeout_ms = 500; // the parked aggregate's backoff is cut at close
    config.consumer.retry = eventbus_core::RetryPolicy::fixed(1, 10);
    let bus = EventBus::new(NatsBackend::connect(nats).await.unwrap(), config).unwrap();
    let stuck = "stuck-1".to_owned();
    let stuck_partition = eventbus_core::partition_for(stuck.as_bytes(), 4);
    let free: Vec<String> = (0..)
        .map(|i| format!("free-{i}"))
        .filter(|a| eventbus_core::partition_for(a.as_bytes(), 4) != stuck_partition)
        .take(5)
        .collect();
    let got = Arc::new(AtomicUsize::new(0));
    let g = got.clone();
    let sub = bus
        .subscribe_envelope(
            "parks",
            SubscribeOptions::group("g").park_on_failure(),
            move |e: Envelope| {
                let (g, stuck) = (g.clone(), e.aggregate_id == "stuck-1");
                async move {
                    if stuck {
                        return Err(std::io::Error::other("downstream down"));
                    }
                    g.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            },
        )
        .await
        .unwrap();
    for v in 1..=100 {
        bus.publish_envelope_sync("parks", &envelope(&stuck, v))
            .await
            .unwrap();
    }
    assert!(eventually(Duration::from_secs(20), || sub.health().stalled_aggregates == 1).await);
    for v in 1..=20 {
        for a in &free {
            bus.publish_envelope_sync("parks", &envelope(a, v)).await.unwrap();
        }
    }
    let flowed = eventually(Duration::from_secs(20), || got.load(Ordering::SeqCst) == 100).await;
    assert!(
        flowed,
        "other partitions stopped behind a parked aggregate: {} of 100, {:?}",
        got.load(Ordering::SeqCst),
        sub.health()
    );
    assert!(sub.health().in_flight <= 50, "{:?}", sub.health());
    let _ = sub.close().await;
    let _ = bus.close().await;
}

/// A Go service's stream and messages: subject = topic, no headers, no
/// `Nats-Msg-Id`, no dead-letter subject, the timestamp in the sender's
/// zone and an old release's string tenant id. A Rust subscriber with the
/// default settings handles it with every field equal, zone included, and
/// a Rust publisher with the default settings lands on the Go subject.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_go_published_event_on_a_go_stream_is_handled_with_every_field_equal() {
    let server = NatsServer::start().await.unwrap();
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    // As the Go SDK creates it: `<JetStream.Stream.Name>_<topic>`, subjects [topic].
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "GO_STREAM_go-orders".into(),
        subjects: vec!["go-orders".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let go_json = r#"{"event_id":"0199e4a8-6b1c-7c3e-9a55-3f1d2b7c8e90","aggregate_id":"order-42","event_type":"OrderCreated","event_version":3,"timestamp":"2025-10-26T15:04:05.1234+08:00","trace_id":"t-1","tenant_id":"7","payload":{"total":"19.90"}}"#;
    js.publish("go-orders", go_json.as_bytes().to_vec().into())
        .await
        .unwrap()
        .await
        .unwrap();
    let mut config = NatsConfig::with_servers([server.url()]);
    config.consumer.lease_ms = 2_000; // everything else is the default
    let bus = EventBus::new(
        NatsBackend::connect(config.clone()).await.unwrap(),
        BusConfig::default(),
    )
    .unwrap();
    let got: Arc<Mutex<Vec<Envelope>>> = Default::default();
    let sink = got.clone();
    let sub = bus
        .subscribe_envelope(
            "go-orders",
            SubscribeOptions::group("billing").park_on_failure(),
            move |e: Envelope| {
                sink.lock().unwrap().push(e);
                async { Ok::<_, std::io::Error>(()) }
            },
        )
        .await
        .unwrap();
    assert!(eventually(Duration::from_secs(20), || got.lock().unwrap().len() == 1).await);
    let e = got.lock().unwrap()[0].clone();
    assert_eq!(e.event_id, "0199e4a8-6b1c-7c3e-9a55-3f1d2b7c8e90");
    assert_eq!(e.aggregate_id, "order-42");
    assert_eq!(e.event_type, "OrderCreated");
    assert_eq!(e.event_version, 3);
    assert_eq!(e.trace_id.as_deref(), Some("t-1"));
    assert_eq!(e.tenant_id, Some(7));
    assert_eq!(e.payload.get(), r#"{"total":"19.90"}"#);
    assert_eq!(
        e.timestamp.offset().local_minus_utc(),
        8 * 3600,
        "the zone is kept"
    );
    let back: serde_json::Value = serde_json::from_slice(&e.encode().unwrap()).unwrap();
    assert_eq!(back["timestamp"], "2025-10-26T15:04:05.1234+08:00");
    // Rust to Go: a default publisher stores the event in the Go stream on
    // subject = topic, the body alone being what a Go consumer decodes.
    let reply = Envelope::builder("order-42", "OrderPaid", 4)
        .tenant_id(7)
        .json_payload(&serde_json::json!({"paid": true}))
        .unwrap()
        .build()
        .unwrap();
    bus.publish_envelope_sync("go-orders", &reply).await.unwrap();
    let stored = js
        .get_stream("GO_STREAM_go-orders")
        .await
        .unwrap()
        .get_last_raw_message_by_subject("go-orders")
        .await
        .unwrap();
    assert_eq!(Envelope::decode(&stored.payload).unwrap(), reply);
    // A subscription dead-lettering to `go-orders.dlq` (the default) gets
    // a stream for it, named the Go way.
    let audit = bus
        .subscribe_envelope(
            "go-orders",
            SubscribeOptions::group("audit"),
            |_e: Envelope| async { Ok::<_, std::io::Error>(()) },
        )
        .await
        .unwrap();
    assert!(js.get_stream("BUSINESS_STREAM_go-orders_dlq").await.is_ok());
    audit.close().await.unwrap();
    // Without provisioning, a dead-letter topic no stream stores is refused
    // at subscribe, naming its subject.
    let mut strict = config;
    strict.provision = eventbus_core::ProvisionStrategy::ValidateOnly;
    let strict_bus =
        EventBus::new(NatsBackend::connect(strict).await.unwrap(), BusConfig::default()).unwrap();
    let err = strict_bus
        .subscribe_envelope(
            "go-orders",
            SubscribeOptions::group("audit").dead_letter_topic("go-orders.poison"),
            |_e: Envelope| async { Ok::<_, std::io::Error>(()) },
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), eventbus_core::ErrorKind::NotFound, "{err}");
    assert!(err.to_string().contains("go-orders.poison"), "{err}");
    sub.close().await.unwrap();
    bus.close().await.unwrap();
    strict_bus.close().await.unwrap();
}

/// A server restart while a member holds its lease: messages the server
/// delivered while the connection was down never arrived, and would only
/// be redelivered after `ack_wait` (30 s here), behind newer versions. The
/// member starts its partitions again from their ack floor on reconnect:
/// every event is handled well before `ack_wait`, with no gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_under_a_held_lease_loses_no_event_in_flight() {
    let mut server = NatsServer::start().await.unwrap();
    let mut nats = NatsConfig::with_servers([server.url()]);
    nats.consumer.lease_ms = 20_000; // the lease outlives the restart
    nats.consumer.ack_wait_ms = 30_000;
    let bus = EventBus::new(NatsBackend::connect(nats).await.unwrap(), BusConfig::default()).unwrap();
    let events: Vec<Envelope> = (1..=100)
        .flat_map(|v| (0..20).map(move |a| envelope(&format!("r-{a}"), v)))
        .collect();
    for e in &events {
        bus.publish_envelope_sync("restart", e).await.unwrap();
    }
    let checker = Arc::new(OrderChecker::new());
    let covered: Covered = Default::default();
    let count = Arc::new(AtomicUsize::new(0));
    let sub = member(&bus, "restart", 1, &checker, &covered, &count).await;
    assert!(eventually(Duration::from_secs(20), || count.load(Ordering::SeqCst) >= 100).await);
    server.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.restart().await.unwrap();
    let all = eventually(Duration::from_secs(20), || {
        covered.lock().unwrap().len() == events.len()
    })
    .await;
    let r = checker.report();
    assert!(
        all,
        "events still missing 20 s after the restart (waiting for ack_wait?): {} of {}; {r}",
        covered.lock().unwrap().len(),
        events.len()
    );
    assert!(r.is_strictly_ordered(), "{r}");
    let _ = sub.close().await;
    let _ = bus.close().await;
}
