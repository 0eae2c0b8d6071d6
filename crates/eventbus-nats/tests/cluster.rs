//! A 3-node nats-server cluster with R3 streams: the stream leader is
//! SIGKILLed mid-publish and mid-consume and restarted. Every publish gets a
//! result or a typed error; an event whose publish failed is published
//! again with its event id (the dedup id) until acked, so it is stored once;
//! every acked event is handled, with 0 violations and 0 overlaps by the
//! strict checker.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventbus_core::{BusConfig, Envelope, ErrorKind, EventBus, SubscribeOptions};
use eventbus_nats::{NatsBackend, NatsConfig};
use eventbus_testkit::server::NatsCluster;
use eventbus_testkit::{OrderChecker, envelope, eventually};

const TOPIC: &str = "cluster-orders";
const AGGREGATES: usize = 40;
const VERSIONS: i64 = 30;

fn config(cluster: &NatsCluster) -> NatsConfig {
    let mut c = NatsConfig::with_servers(cluster.urls());
    c.topic_streams.replicas = 3;
    c.consumer.lease_ms = 3_000;
    c.consumer.ack_wait_ms = 5_000;
    c.request_timeout_ms = 3_000;
    c.reconnect.connect_timeout_ms = 2_000;
    c
}

/// The node leading the topic's stream now.
async fn stream_leader(cluster: &NatsCluster) -> usize {
    for _ in 0..100 {
        for url in cluster.urls() {
            let Ok(client) = async_nats::connect(&url).await else {
                continue;
            };
            let js = async_nats::jetstream::new(client);
            if let Ok(mut stream) = js.get_stream("BUSINESS_STREAM_cluster-orders").await
                && let Ok(info) = stream.info().await
                && let Some(leader) = info.cluster.as_ref().and_then(|c| c.leader.clone())
                && let Some(i) = cluster.node_index(&leader)
            {
                return i;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no stream leader");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_stream_leader_mid_publish_and_mid_consume_loses_nothing() {
    let mut cluster = NatsCluster::start(3).await.unwrap();
    cluster.wait_for_jetstream(Duration::from_secs(30)).await.unwrap();
    // The first connect may race the meta-leader election: retry briefly.
    let mut backend = None;
    for _ in 0..50 {
        match NatsBackend::connect(config(&cluster)).await {
            Ok(b) => {
                backend = Some(b);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    let bus = EventBus::new(backend.expect("connected to the cluster"), BusConfig::default()).unwrap();
    let checker = Arc::new(OrderChecker::new());
    let handled: Arc<Mutex<HashSet<(String, i64)>>> = Default::default();
    let (c, h) = (checker.clone(), handled.clone());
    // Subscribing first creates the R3 stream and the lease bucket.
    let mut sub = None;
    for _ in 0..50 {
        let (c, h) = (c.clone(), h.clone());
        match bus
            .subscribe_envelope(TOPIC, SubscribeOptions::group("billing"), move |e: Envelope| {
                let (c, h) = (c.clone(), h.clone());
                async move {
                    let attempt = c.begin(TOPIC, &e);
                    tokio::time::sleep(Duration::from_millis(50)).await; // consumption lags publishing
                    h.lock()
                        .unwrap()
                        .insert((e.aggregate_id.clone(), e.event_version));
                    attempt.succeeded();
                    Ok::<_, std::io::Error>(())
                }
            })
            .await
        {
            Ok(s) => {
                sub = Some(s);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    let sub = sub.expect("subscribed");

    // Producer: each aggregate's versions in order, the next only after the
    // previous was acked; a failed publish is retried with the same event
    // id. Every failure must be a typed, retriable error.
    let acked = Arc::new(Mutex::new(0usize));
    let typed_failures = Arc::new(Mutex::new(Vec::<ErrorKind>::new()));
    let producer = {
        let (bus, acked, typed_failures) = (bus.clone(), acked.clone(), typed_failures.clone());
        tokio::spawn(async move {
            let mut tasks = Vec::new();
            for a in 0..AGGREGATES {
                let (bus, acked, typed_failures) = (bus.clone(), acked.clone(), typed_failures.clone());
                tasks.push(tokio::spawn(async move {
                    for v in 1..=VERSIONS {
                        let e = envelope(&format!("order-{a}"), v);
                        let mut tries = 0;
                        loop {
                            tries += 1;
                            assert!(tries < 200, "order-{a} v{v} never acked");
                            let result = match bus.publish_envelope(TOPIC, &e).await {
                                Ok(handle) => handle.await.into_result().map(|_| ()),
                                Err(err) => Err(err),
                            };
                            match result {
                                Ok(()) => {
                                    *acked.lock().unwrap() += 1;
                                    break;
                                }
                                Err(err) => {
                                    assert!(err.is_retriable(), "untyped or final failure: {err:?}");
                                    typed_failures.lock().unwrap().push(err.kind());
                                    tokio::time::sleep(Duration::from_millis(100)).await;
                                }
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
        })
    };
    let total = AGGREGATES * VERSIONS as usize;

    // Mid-publish: kill the stream leader, restart it 3 s later.
    assert!(eventually(Duration::from_secs(60), || *acked.lock().unwrap() >= total / 4).await);
    let consumed_at_first_kill = handled.lock().unwrap().len();
    let leader = stream_leader(&cluster).await;
    cluster.kill(leader);
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.restart(leader).await.unwrap();
    // Mid-consume: once publishing is done, with events still queued.
    tokio::time::timeout(Duration::from_secs(180), producer)
        .await
        .expect("the producer finished")
        .unwrap();
    let consumed_before = handled.lock().unwrap().len();
    assert!(
        consumed_before < total,
        "nothing left to consume at the second kill"
    );
    let leader = stream_leader(&cluster).await;
    cluster.kill(leader);
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.restart(leader).await.unwrap();

    assert!(
        eventually(Duration::from_secs(120), || handled.lock().unwrap().len()
            == total)
        .await,
        "handled {} of {total} (acked {})",
        handled.lock().unwrap().len(),
        acked.lock().unwrap()
    );
    let report = checker.report();
    let failures = typed_failures.lock().unwrap().clone();
    eprintln!(
        "cluster: acked {} of {total}, publish failures {} ({:?}), consumed at the first kill {consumed_at_first_kill}, before the second {consumed_before}, {report:?}",
        acked.lock().unwrap(),
        failures.len(),
        failures.iter().collect::<HashSet<_>>()
    );
    assert_eq!(*acked.lock().unwrap(), total);
    assert_eq!(report.violations(), 0, "{report:?}");
    assert_eq!(report.overlaps, 0, "{report:?}");
    // Retried publishes were stored once (the dedup window absorbed them).
    let mut stored = None;
    for _ in 0..60 {
        let Ok(client) = async_nats::connect(cluster.url(0)).await else {
            continue;
        };
        if let Ok(mut stream) = async_nats::jetstream::new(client)
            .get_stream("BUSINESS_STREAM_cluster-orders")
            .await
            && let Ok(info) = stream.info().await
        {
            stored = Some(info.state.messages);
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(stored, Some(total as u64), "stored once each");
    sub.close().await.unwrap();
    bus.close().await.unwrap();
}
