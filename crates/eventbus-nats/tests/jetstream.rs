//! NATS-specific behaviour against a real nats-server: dedup, server
//! restarts, progress acks, stream provisioning, dead-letter storage.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventbus_core::{BusConfig, ConnectionState, Envelope, ErrorKind, EventBus, Position, SubscribeOptions};
use eventbus_nats::{ConnectionEvent, NatsBackend, NatsConfig, ProvisionStrategy, StreamSpec};
use eventbus_testkit::server::NatsServer;
use eventbus_testkit::{envelope, eventually};

async fn bus(server: &NatsServer, config: BusConfig) -> EventBus {
    let backend = NatsBackend::connect(NatsConfig::with_servers([server.url()]))
        .await
        .unwrap();
    EventBus::new(backend, config).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_republished_event_id_is_acked_as_duplicate_and_stored_once() {
    let server = NatsServer::start().await.unwrap();
    let bus = bus(&server, BusConfig::default()).await;
    let got = Arc::new(Mutex::new(Vec::new()));
    let sink = got.clone();
    let _sub = bus
        .subscribe_envelope("dedup", SubscribeOptions::group("g"), move |e: Envelope| {
            sink.lock().unwrap().push(e.event_id);
            async { Ok::<_, std::io::Error>(()) }
        })
        .await
        .unwrap();
    let e = envelope("a", 1);
    let first = bus.publish_envelope_sync("dedup", &e).await.unwrap();
    let second = bus.publish_envelope_sync("dedup", &e).await.unwrap();
    assert!(!first.duplicate);
    assert!(
        second.duplicate,
        "JetStream should report the repeat as a duplicate"
    );
    assert_eq!(first.position, second.position);
    assert!(matches!(first.position, Some(Position::Sequence(_))));
    bus.publish_envelope_sync("dedup", &envelope("a", 2))
        .await
        .unwrap();
    assert!(eventually(Duration::from_secs(10), || got.lock().unwrap().len() == 2).await);
    assert_eq!(got.lock().unwrap()[0], e.event_id);
    bus.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_while_publishing_gives_every_publish_a_result_or_typed_error() {
    let mut server = NatsServer::start().await.unwrap();
    let mut config = BusConfig::default();
    config.publish.timeout_ms = 2_000;
    config.publish.ack_timeout_ms = 5_000;
    let backend = NatsBackend::connect(NatsConfig::with_servers([server.url()]))
        .await
        .unwrap();
    let mut events = backend.connection_events();
    let bus = EventBus::new(backend, config).unwrap();
    let mut handles = Vec::new();
    let mut refused = Vec::new();
    for i in 1..=3_000 {
        if i == 1_000 {
            server.kill();
        }
        if i == 2_000 {
            server.restart().await.unwrap();
        }
        match bus.publish_envelope("restart", &envelope("r", i)).await {
            Ok(h) => handles.push(h),
            Err(e) => {
                assert!(
                    matches!(
                        e.kind(),
                        ErrorKind::Timeout | ErrorKind::Connection | ErrorKind::Backend
                    ),
                    "{e}"
                );
                refused.push(e);
            }
        }
    }
    let results = tokio::time::timeout(Duration::from_secs(60), futures::future::join_all(handles))
        .await
        .expect("a publish handle hung");
    let ok = results.iter().filter(|r| r.is_success()).count();
    let failed: Vec<_> = results.iter().filter_map(|r| r.error.as_ref()).collect();
    assert!(
        failed.iter().all(|e| e.is_retriable()),
        "untyped failure: {failed:?}"
    );
    assert!(
        ok >= 1_000,
        "publishes before the kill or after the restart were lost: {ok}"
    );
    assert_eq!(ok + failed.len() + refused.len(), 3_000);
    let mut saw = Vec::new();
    while let Ok(e) = events.try_recv() {
        saw.push(e);
    }
    assert!(saw.contains(&ConnectionEvent::Disconnected), "{saw:?}");
    assert!(saw.contains(&ConnectionEvent::Connected), "{saw:?}");
    assert_eq!(bus.health().connection, ConnectionState::Connected);
    bus.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_provisioning_strategy_does_what_it_says() {
    let server = NatsServer::start().await.unwrap();
    let config = |strategy, max_age_ms| NatsConfig {
        provision: strategy,
        subject_prefix: "prov.".into(),
        streams: vec![StreamSpec {
            name: "PROV".into(),
            subjects: vec!["prov.>".into()],
            max_age_ms,
            ..StreamSpec::default()
        }],
        ..NatsConfig::with_servers([server.url()])
    };
    let kind = |r: eventbus_core::Result<NatsBackend>| r.map(|_| ()).unwrap_err().kind();

    // Skip: nothing is created, so subscribing finds no stream.
    let skipped = NatsBackend::connect(config(ProvisionStrategy::Skip, 0))
        .await
        .unwrap();
    let bus = EventBus::new(skipped, BusConfig::default()).unwrap();
    let err = bus
        .subscribe_envelope("t", SubscribeOptions::group("g"), |_e: Envelope| async {
            Ok::<_, std::io::Error>(())
        })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);

    assert_eq!(
        kind(NatsBackend::connect(config(ProvisionStrategy::ValidateOnly, 0)).await),
        ErrorKind::NotFound
    );
    NatsBackend::connect(config(ProvisionStrategy::CreateOnly, 0))
        .await
        .unwrap();
    NatsBackend::connect(config(ProvisionStrategy::ValidateOnly, 0))
        .await
        .unwrap();
    // Create-only leaves an existing stream alone...
    NatsBackend::connect(config(ProvisionStrategy::CreateOnly, 600_000))
        .await
        .unwrap();
    let err = NatsBackend::connect(config(ProvisionStrategy::ValidateOnly, 600_000))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict);
    assert!(err.to_string().contains("max_age"), "{err}");
    // ...create-or-update changes it.
    NatsBackend::connect(config(ProvisionStrategy::CreateOrUpdate, 600_000))
        .await
        .unwrap();
    NatsBackend::connect(config(ProvisionStrategy::ValidateOnly, 600_000))
        .await
        .unwrap();
}

#[tokio::test]
async fn an_unreachable_server_is_a_connection_error() {
    let mut config = NatsConfig::with_servers(["nats://127.0.0.1:1"]);
    config.reconnect.connect_timeout_ms = 500;
    let err = NatsBackend::connect(config).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connection);
    let err = NatsBackend::connect(NatsConfig::with_servers(["not a url at all://"]))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_longer_than_ack_wait_sends_progress_and_is_not_redelivered() {
    let server = NatsServer::start().await.unwrap();
    let mut nats = NatsConfig::with_servers([server.url()]);
    nats.consumer.ack_wait_ms = 1_000;
    let bus = EventBus::new(NatsBackend::connect(nats).await.unwrap(), BusConfig::default()).unwrap();
    let calls = Arc::new(Mutex::new(Vec::new()));
    let sink = calls.clone();
    let _sub = bus
        .subscribe_envelope("slow", SubscribeOptions::group("g"), move |e: Envelope| {
            let sink = sink.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(2_500)).await; // 2.5 × ack_wait
                sink.lock().unwrap().push(e.event_version);
                Ok::<_, std::io::Error>(())
            }
        })
        .await
        .unwrap();
    bus.publish_envelope_sync("slow", &envelope("s", 1))
        .await
        .unwrap();
    bus.publish_envelope_sync("slow", &envelope("s", 2))
        .await
        .unwrap();
    assert!(eventually(Duration::from_secs(20), || calls.lock().unwrap().len() >= 2).await);
    // Had the server redelivered v1 after 1 s, it would have run again.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(*calls.lock().unwrap(), vec![1, 2]);
    bus.close().await.unwrap();
}

/// Issue 9, break 5: a dead-letter topic that no stream stores fails at
/// subscribe time, naming the subject to add; a dead-letter publish that
/// starts failing later is a failed attempt: the aggregate is reported
/// stalled at once, and close honours `close_timeout_ms`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_that_cannot_be_stored_is_refused_or_reported_stalled() {
    let server = NatsServer::start().await.unwrap();
    let stream = |name: &str, subject: &str| StreamSpec {
        name: name.into(),
        subjects: vec![subject.into()],
        ..StreamSpec::default()
    };
    let mut nats = NatsConfig {
        subject_prefix: "events.".into(),
        streams: vec![
            stream("WORK", "events.work"),
            stream("WORKDLQ", "events.work.dlq"),
            stream("ORPHAN", "events.orphan"),
        ],
        ..NatsConfig::with_servers([server.url()])
    };
    // Creates the streams, and the group-lease bucket at a first subscribe.
    let creating = EventBus::new(
        NatsBackend::connect(nats.clone()).await.unwrap(),
        BusConfig::default(),
    )
    .unwrap();
    let first = creating
        .subscribe_envelope("work", SubscribeOptions::group("setup"), |_e: Envelope| async {
            Ok::<_, std::io::Error>(())
        })
        .await
        .unwrap();
    first.close().await.unwrap();
    creating.close().await.unwrap();
    // A topic's own stream would store the missing dead-letter subject:
    // validate, so that only the configured streams exist.
    nats.provision = ProvisionStrategy::ValidateOnly;
    let backend = NatsBackend::connect(nats).await.unwrap();
    let js = backend.jetstream().clone();
    let mut config = BusConfig {
        close_timeout_ms: 500,
        ..BusConfig::default()
    };
    config.consumer.retry = eventbus_core::RetryPolicy::fixed(2, 50);
    let bus = EventBus::new(backend, config).unwrap();
    let noop = |_e: Envelope| async { Ok::<_, std::io::Error>(()) };

    let err = bus
        .subscribe_envelope("orphan", SubscribeOptions::group("g"), noop)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert!(err.to_string().contains("events.orphan.dlq"), "{err}");

    let sub = bus
        .subscribe_envelope("work", SubscribeOptions::group("g"), |_e: Envelope| async {
            Err::<(), _>(std::io::Error::other("always fails"))
        })
        .await
        .unwrap();
    js.delete_stream("WORKDLQ").await.unwrap();
    bus.publish_envelope_sync("work", &envelope("w", 1))
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(20), || sub.health().stalled_aggregates == 1).await,
        "a failing dead-letter publish is not reported: {:?}",
        sub.health()
    );
    let last = sub.health().last_error.unwrap_or_default();
    assert!(last.contains("dead-letter publish"), "{last}");
    let started = std::time::Instant::now();
    let _ = tokio::time::timeout(Duration::from_secs(10), sub.close())
        .await
        .expect("close honours close_timeout_ms");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let _ = bus.close().await;
}

/// With the defaults, each topic is subject = topic in a stream of its own,
/// named as the Go SDK names it, created at first use with the
/// `topic_streams` settings; a partitioned topic's stream stores its
/// partition subjects. Without provisioning, a topic no stream stores is a
/// `NotFound` error at publish naming its subject; invalid stream settings
/// are `Config` errors at connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_topic_gets_its_own_stream_named_the_go_way() {
    let server = NatsServer::start().await.unwrap();
    let mut config = NatsConfig::with_servers([server.url()]);
    config.topic_streams.max_age_ms = 3_600_000;
    config.partitions.insert("parted".into(), 3);
    let bus = EventBus::new(
        NatsBackend::connect(config.clone()).await.unwrap(),
        BusConfig::default(),
    )
    .unwrap();
    let e = Envelope::builder("a-1", "T", 1)
        .json_payload(&1)
        .unwrap()
        .build()
        .unwrap();
    bus.publish_envelope_sync("orders.v1", &e).await.unwrap();
    bus.publish_envelope_sync("parted", &e).await.unwrap();
    let js = async_nats::jetstream::new(async_nats::connect(server.url()).await.unwrap());
    let mut stream = js.get_stream("BUSINESS_STREAM_orders_v1").await.unwrap();
    let info = stream.info().await.unwrap().config.clone();
    assert_eq!(info.subjects, vec!["orders.v1".to_owned()]);
    assert_eq!(info.max_age, Duration::from_secs(3_600));
    let stored = stream.get_last_raw_message_by_subject("orders.v1").await.unwrap();
    assert_eq!(Envelope::decode(&stored.payload).unwrap(), e);
    let mut parted = js.get_stream("BUSINESS_STREAM_parted").await.unwrap();
    assert_eq!(
        parted.info().await.unwrap().config.subjects,
        vec!["parted.0".to_owned(), "parted.1".into(), "parted.2".into()]
    );
    bus.close().await.unwrap();

    let mut strict = config.clone();
    strict.provision = ProvisionStrategy::ValidateOnly;
    let strict = EventBus::new(NatsBackend::connect(strict).await.unwrap(), BusConfig::default()).unwrap();
    strict.publish_envelope_sync("orders.v1", &e).await.unwrap();
    let err = strict.publish_envelope("nowhere", &e).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert!(err.to_string().contains("subject nowhere"), "{err}");
    strict.close().await.unwrap();

    let mut no_subjects = config.clone();
    no_subjects.streams = vec![StreamSpec {
        name: "EMPTY".into(),
        ..StreamSpec::default()
    }];
    let err = NatsBackend::connect(no_subjects).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    let mut template_subjects = config;
    template_subjects.topic_streams.subjects = vec!["x.>".into()];
    let err = NatsBackend::connect(template_subjects).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.to_string().contains("topic_streams.subjects"), "{err}");
}
