//! The outbox and inbox on SQLite, relayed through the memory backend.

use std::sync::Arc;
use std::time::Duration;

use eventbus_core::{BusConfig, Envelope, EventBus, MemoryBackend, SubscribeOptions};
use eventbus_outbox::{
    InboxOutcome, OutboxEvent, OutboxStore, Relay, RelayConfig, append, handle_once_sqlite,
};
use eventbus_testkit::{OrderChecker, envelope, eventually};
use futures::FutureExt;

async fn store() -> (OutboxStore, sqlx::SqlitePool, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("app.db").display());
    let store = OutboxStore::connect(&url, 4).await.unwrap();
    store.migrate().await.unwrap();
    let OutboxStore::Sqlite(pool) = &store else {
        unreachable!()
    };
    sqlx::query("CREATE TABLE orders (id TEXT PRIMARY KEY, total INTEGER NOT NULL)")
        .execute(pool)
        .await
        .unwrap();
    (store.clone(), pool.clone(), dir)
}

static POISONED_RECEIVED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn fast() -> RelayConfig {
    RelayConfig {
        poll_interval_ms: 20,
        backoff: eventbus_core::RetryPolicy::fixed(3, 20),
        ..RelayConfig::default()
    }
}

/// Records deliveries in an order checker; the aggregate `poisoned` (whose
/// v1 is dead-lettered, leaving a gap by design) is counted apart.
async fn recorder(bus: &EventBus, topic: &str) -> (eventbus_core::Subscription, Arc<OrderChecker>) {
    let checker = Arc::new(OrderChecker::new());
    let c = checker.clone();
    let name = topic.to_owned();
    let sub = bus
        .subscribe_envelope(topic, SubscribeOptions::group("consumer"), move |e: Envelope| {
            match e.aggregate_id.as_str() {
                "poisoned" => POISONED_RECEIVED.fetch_add(1, std::sync::atomic::Ordering::SeqCst),
                _ => {
                    c.record(&name, &e);
                    0
                }
            };
            async { Ok::<_, std::io::Error>(()) }
        })
        .await
        .unwrap();
    (sub, checker)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_transaction_publishes_nothing_and_a_committed_one_everything() {
    let (store, pool, _dir) = store().await;
    let backend = MemoryBackend::default();
    let bus = EventBus::new(backend.clone(), BusConfig::default()).unwrap();
    let (_sub, checker) = recorder(&bus, "orders").await;

    let mut tx = pool.begin().await.unwrap();
    sqlx::query("INSERT INTO orders VALUES ('o-1', 100)")
        .execute(&mut *tx)
        .await
        .unwrap();
    assert!(
        append(&mut *tx, OutboxEvent::new("orders", &envelope("o-1", 1), "Order"))
            .await
            .unwrap()
    );
    tx.rollback().await.unwrap();

    let mut tx = pool.begin().await.unwrap();
    sqlx::query("INSERT INTO orders VALUES ('o-2', 200)")
        .execute(&mut *tx)
        .await
        .unwrap();
    let committed = envelope("o-2", 1);
    append(&mut *tx, OutboxEvent::new("orders", &committed, "Order"))
        .await
        .unwrap();
    assert!(
        !append(&mut *tx, OutboxEvent::new("orders", &committed, "Order"))
            .await
            .unwrap(),
        "idempotent"
    );
    tx.commit().await.unwrap();

    let relay = Relay::new(store.clone(), bus.clone(), fast());
    while relay.run_once().await.unwrap() > 0 {}
    assert!(eventually(Duration::from_secs(30), || checker.report().received == 1).await);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        checker.report().received,
        1,
        "the rolled-back event was published"
    );
    let status = store.status().await.unwrap();
    assert_eq!(status.counts.get("published"), Some(&1));
    assert_eq!(status.counts.get("pending"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_keeps_per_aggregate_order_and_dead_letters_a_poison_event() {
    let (store, pool, _dir) = store().await;
    let backend = MemoryBackend::default();
    let bus = EventBus::new(backend.clone(), BusConfig::default()).unwrap();
    let (_sub, checker) = recorder(&bus, "orders").await;
    let mut tx = pool.begin().await.unwrap();
    for v in 1..=20 {
        for a in 0..25 {
            append(
                &mut *tx,
                OutboxEvent::new("orders", &envelope(&format!("a-{a}"), v), "Order"),
            )
            .await
            .unwrap();
        }
    }
    // A poison event: its topic is invalid, so every publish fails.
    let poison = envelope("poisoned", 1);
    sqlx::query("INSERT INTO outbox_events (id, aggregate_type, aggregate_id, event_type, event_version, topic, envelope, next_attempt_at, created_at, idempotency_key) VALUES (?, 'Order', 'poisoned', 'T', 1, 'bad topic', ?, 0, 0, ?)")
        .bind(&poison.event_id)
        .bind(String::from_utf8(poison.encode().unwrap().to_vec()).unwrap())
        .bind(&poison.event_id)
        .execute(&mut *tx)
        .await
        .unwrap();
    append(
        &mut *tx,
        OutboxEvent::new("orders", &envelope("poisoned", 2), "Order"),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();

    let relay = Relay::new(store.clone(), bus.clone(), fast());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = {
        let (shutdown, relay) = (shutdown.clone(), relay);
        tokio::spawn(async move {
            relay.run(shutdown).await.unwrap();
            relay
        })
    };
    let poisoned = || POISONED_RECEIVED.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        eventually(Duration::from_secs(30), || checker.report().received == 500
            && poisoned() == 1)
        .await,
        "{:?}",
        checker.report()
    );
    let report = checker.report();
    assert!(report.is_strictly_ordered() && report.duplicates == 0, "{report}");
    shutdown.cancel();
    let relay = running.await.unwrap();
    assert_eq!(
        relay
            .stats()
            .dead_lettered
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    let status = store.status().await.unwrap();
    assert_eq!(status.counts.get("dead_lettered"), Some(&1));
    assert_eq!(
        status.counts.get("published"),
        Some(&501),
        "poisoned v2 went out after v1 was dead-lettered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_removes_only_published_rows_past_retention() {
    let (store, pool, _dir) = store().await;
    let bus = EventBus::memory();
    let mut tx = pool.begin().await.unwrap();
    for v in 1..=3 {
        append(&mut *tx, OutboxEvent::new("orders", &envelope("c", v), "Order"))
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    let relay = Relay::new(store.clone(), bus, fast());
    relay.run_once().await.unwrap(); // publishes v1 only: one event per aggregate per round
    assert_eq!(
        store.cleanup(Duration::from_secs(3600)).await.unwrap(),
        0,
        "too recent"
    );
    assert_eq!(
        store.cleanup(Duration::ZERO).await.unwrap(),
        1,
        "only the published row"
    );
    let status = store.status().await.unwrap();
    assert_eq!(status.counts.get("pending"), Some(&2));
    assert!(status.oldest_pending_age_ms.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_one_relay_holds_the_sqlite_lease() {
    let (store, pool, _dir) = store().await;
    let mut tx = pool.begin().await.unwrap();
    append(&mut *tx, OutboxEvent::new("orders", &envelope("l", 1), "Order"))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let first = Relay::new(store.clone(), EventBus::memory(), fast());
    let second = Relay::new(store.clone(), EventBus::memory(), fast());
    assert_eq!(first.run_once().await.unwrap(), 1);
    let mut tx = pool.begin().await.unwrap();
    append(&mut *tx, OutboxEvent::new("orders", &envelope("l", 2), "Order"))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        second.run_once().await.unwrap(),
        0,
        "the second relay must wait for the lease"
    );
    assert_eq!(first.run_once().await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbox_runs_a_redelivered_event_once() {
    let (_store, pool, _dir) = store().await;
    let e = envelope("i", 1);
    for expected in [InboxOutcome::Processed, InboxOutcome::Duplicate] {
        let outcome = handle_once_sqlite(&pool, "billing", &e.event_id, |conn| {
            async move {
                sqlx::query("INSERT INTO orders VALUES ('i', 1)")
                    .execute(&mut *conn)
                    .await?;
                Ok(())
            }
            .boxed()
        })
        .await
        .unwrap();
        assert_eq!(outcome, expected);
    }
    // A failing handler rolls back its inbox row too, so a redelivery runs it again.
    let failing = handle_once_sqlite(&pool, "billing", "other-event", |_conn| {
        async { Err::<(), _>("downstream down".into()) }.boxed()
    })
    .await
    .unwrap_err();
    assert_eq!(failing.kind(), eventbus_core::ErrorKind::Handler);
    let count: (i64,) = sqlx::query_as("SELECT COUNT(*) FROM inbox_events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(count.0, 1);
    let orders: (i64,) = sqlx::query_as("SELECT COUNT(*) FROM orders")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(orders.0, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpublishable_row_goes_to_the_dead_letter_topic_with_its_headers() {
    let (store, pool, _dir) = store().await;
    let bus = EventBus::memory();
    let dead = Arc::new(std::sync::Mutex::new(Vec::<eventbus_core::Message>::new()));
    let sink = dead.clone();
    let _dlq = bus
        .subscribe(
            "orders.dlq",
            SubscribeOptions::group("ops"),
            move |m: eventbus_core::Message| {
                sink.lock().unwrap().push(m);
                async { Ok::<_, std::io::Error>(()) }
            },
        )
        .await
        .unwrap();
    let (_sub, checker) = recorder(&bus, "orders").await;
    // A row whose stored envelope is corrupt can never be published.
    sqlx::query("INSERT INTO outbox_events (id, aggregate_type, aggregate_id, event_type, event_version, topic, envelope, next_attempt_at, created_at, idempotency_key) VALUES ('corrupt-1', 'Order', 'x', 'T', 1, 'orders', '{not json', 0, 0, 'corrupt-1')")
        .execute(&pool)
        .await
        .unwrap();
    let mut tx = pool.begin().await.unwrap();
    append(&mut *tx, OutboxEvent::new("orders", &envelope("y", 1), "Order"))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let config = RelayConfig {
        dead_letter_suffix: Some(".dlq".into()),
        backoff: eventbus_core::RetryPolicy::fixed(2, 20),
        ..fast()
    };
    let relay = Relay::new(store.clone(), bus.clone(), config);
    for _ in 0..100 {
        relay.run_once().await.unwrap();
        if !dead.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        eventually(Duration::from_secs(30), || dead.lock().unwrap().len() == 1
            && checker.report().received == 1)
        .await
    );
    let m = dead.lock().unwrap()[0].clone();
    assert_eq!(
        m.headers.get(eventbus_core::headers::ORIGINAL_TOPIC),
        Some("orders")
    );
    assert_eq!(m.headers.get(eventbus_core::headers::EVENT_ID), Some("corrupt-1"));
    assert!(
        m.headers
            .get(eventbus_core::headers::ERROR_MESSAGE)
            .unwrap()
            .contains("invalid")
    );
    assert_eq!(&m.payload[..], b"{not json");
    assert_eq!(
        store.status().await.unwrap().counts.get("dead_lettered"),
        Some(&1)
    );
}

/// A backend whose first publish's ACK is lost after freezing the whole
/// (current-thread) runtime for `freeze`, as a relay stopped by SIGSTOP or a
/// long pause would be: its claim renewals cannot run meanwhile.
struct FreezeOnFirstAck {
    inner: MemoryBackend,
    freeze: Duration,
    armed: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl eventbus_core::Backend for FreezeOnFirstAck {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn publish(
        &self,
        message: eventbus_core::Message,
    ) -> eventbus_core::Result<eventbus_core::AckFuture> {
        let ack = self.inner.publish(message).await?;
        if !self.armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
            return Ok(ack);
        }
        let freeze = self.freeze;
        Ok(async move {
            let _ = ack.await; // stored and delivered; only the ACK is lost
            std::thread::sleep(freeze);
            Err(eventbus_core::Error::timeout("ACK lost"))
        }
        .boxed())
    }

    async fn subscribe(
        &self,
        spec: &eventbus_core::SubscribeSpec,
    ) -> eventbus_core::Result<Box<dyn eventbus_core::BackendSubscription>> {
        self.inner.subscribe(spec).await
    }

    fn connection_state(&self) -> eventbus_core::ConnectionState {
        self.inner.connection_state()
    }

    async fn close(&self) -> eventbus_core::Result<()> {
        self.inner.close().await
    }
}

/// Issue 9, break 3: relay A's ACK is lost while it is frozen past its
/// lease; relay B takes the row over and publishes v1 and v2. When A wakes,
/// its stale claim must not put v1 back to pending (which re-sent v1 after
/// v2: the consumer saw 1, 1, 2, 1).
#[test]
fn a_relay_whose_claim_expired_never_undoes_another_relays_work() {
    let control = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (store, pool, _dir) = control.block_on(store());
    let backend = MemoryBackend::default();
    let (bus, sub, checker) = control.block_on(async {
        let bus = EventBus::new(backend.clone(), BusConfig::default()).unwrap();
        let (sub, checker) = recorder(&bus, "orders").await;
        let mut tx = pool.begin().await.unwrap();
        for v in 1..=2 {
            append(
                &mut *tx,
                OutboxEvent::new("orders", &envelope("lease-x", v), "Order"),
            )
            .await
            .unwrap();
        }
        tx.commit().await.unwrap();
        (bus, sub, checker)
    });
    let config = RelayConfig {
        lease_ms: 100,
        ..fast()
    };
    let (store_a, config_a, backend_a) = (store.clone(), config.clone(), backend.clone());
    let relay_a = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let frozen = FreezeOnFirstAck {
                inner: backend_a,
                freeze: Duration::from_millis(800),
                armed: true.into(),
            };
            let bus = EventBus::new(frozen, BusConfig::default()).unwrap();
            let relay = Relay::new(store_a, bus, config_a);
            relay.run_once().await.unwrap();
            relay.stats()
        })
    });
    let relay_b = Relay::new(store.clone(), bus.clone(), config);
    let statuses = || async {
        sqlx::query_as::<_, (i64, String)>(
            "SELECT event_version, status FROM outbox_events ORDER BY event_version",
        )
        .fetch_all(&pool)
        .await
        .unwrap()
    };
    control.block_on(async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        for _ in 0..200 {
            relay_b.run_once().await.unwrap();
            if statuses().await.iter().all(|(_, s)| s == "published") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let stats_a = relay_a.join().unwrap();
    control.block_on(async {
        // Whatever A did on waking, B keeps relaying for a while.
        for _ in 0..20 {
            relay_b.run_once().await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let rows = statuses().await;
        assert_eq!(
            rows,
            vec![(1, "published".to_owned()), (2, "published".to_owned())],
            "a stale claim changed a row"
        );
        assert!(eventually(Duration::from_secs(5), || checker.report().received >= 2).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let report = checker.report();
        assert!(report.is_strictly_ordered(), "{report}");
        assert_eq!(
            stats_a.lost_claims.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "A discards its result"
        );
        sub.close().await.unwrap();
        bus.close().await.unwrap();
    });
}
