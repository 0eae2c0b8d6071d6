//! The outbox and inbox on a real, throwaway PostgreSQL cluster.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use eventbus_core::{BusConfig, Envelope, EventBus, MemoryBackend, SubscribeOptions};
use eventbus_nats::{NatsBackend, NatsConfig};
use eventbus_outbox::{
    InboxOutcome, OutboxEvent, OutboxStore, Relay, RelayConfig, append, handle_once_postgres,
};
use eventbus_testkit::server::NatsServer;
use eventbus_testkit::server::PostgresServer;
use eventbus_testkit::{OrderChecker, envelope, eventually};
use futures::FutureExt;
use tokio_util::sync::CancellationToken;

async fn store(pg: &PostgresServer) -> (OutboxStore, sqlx::PgPool) {
    let store = OutboxStore::connect(&pg.url(), 10).await.unwrap();
    store.migrate().await.unwrap();
    let OutboxStore::Postgres(pool) = &store else {
        unreachable!()
    };
    (store.clone(), pool.clone())
}

fn fast() -> RelayConfig {
    RelayConfig {
        poll_interval_ms: 50,
        backoff: eventbus_core::RetryPolicy::fixed(100, 100),
        ..RelayConfig::default()
    }
}

fn spawn_relay(relay: Relay, shutdown: &CancellationToken) -> tokio::task::JoinHandle<Relay> {
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        relay.run(shutdown).await.unwrap();
        relay
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_relays_publish_ten_thousand_events_in_per_aggregate_order() {
    let pg = PostgresServer::start()
        .await
        .expect("PostgreSQL (scripts/install-test-deps installs it)");
    let (store, pool) = store(&pg).await;
    let backend = MemoryBackend::default();
    let consumer = EventBus::new(backend.clone(), BusConfig::default()).unwrap();
    let checker = Arc::new(OrderChecker::new());
    let c = checker.clone();
    let _sub = consumer
        .subscribe_envelope(
            "orders",
            SubscribeOptions::group("consumer"),
            move |e: Envelope| {
                c.record("orders", &e);
                async { Ok::<_, std::io::Error>(()) }
            },
        )
        .await
        .unwrap();
    let shutdown = CancellationToken::new();
    let relays: Vec<_> = (0..3)
        .map(|_| {
            let bus = EventBus::new(backend.clone(), BusConfig::default()).unwrap();
            spawn_relay(Relay::new(store.clone(), bus, fast()), &shutdown)
        })
        .collect();
    // 500 aggregates × 20 versions, committed in 100 transactions while the relays run.
    for v in 1..=20 {
        for chunk in 0..5 {
            let mut tx = pool.begin().await.unwrap();
            for a in (chunk * 100)..(chunk + 1) * 100 {
                append(
                    &mut *tx,
                    OutboxEvent::new("orders", &envelope(&format!("agg-{a}"), v), "Order"),
                )
                .await
                .unwrap();
            }
            tx.commit().await.unwrap();
        }
    }
    assert!(
        eventually(Duration::from_secs(120), || checker.report().received >= 10_000).await,
        "{:?}",
        checker.report()
    );
    shutdown.cancel();
    let mut per_relay = Vec::new();
    for r in relays {
        per_relay.push(r.await.unwrap().stats().published.load(Ordering::Relaxed));
    }
    let report = checker.report();
    assert!(report.is_strictly_ordered(), "{report}");
    assert_eq!(report.duplicates, 0, "a row was published twice: {report:?}");
    assert_eq!(per_relay.iter().sum::<u64>(), 10_000, "{per_relay:?}");
    assert!(
        per_relay.iter().filter(|n| **n > 0).count() >= 2,
        "the relays did not share the work: {per_relay:?}"
    );
    assert_eq!(
        store.status().await.unwrap().counts.get("published"),
        Some(&10_000)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_stay_pending_while_the_broker_is_down_then_flow() {
    let pg = PostgresServer::start().await.unwrap();
    let (store, pool) = store(&pg).await;
    let mut nats = NatsServer::start().await.unwrap();
    let mut config = BusConfig::default();
    config.publish.ack_timeout_ms = 1_000;
    config.publish.timeout_ms = 1_000;
    let backend = NatsBackend::connect(NatsConfig::with_servers([nats.url()]))
        .await
        .unwrap();
    let bus = EventBus::new(backend, config).unwrap();
    let tx_seen = Arc::new(OrderChecker::new());
    let c = tx_seen.clone();
    let _sub = bus
        .subscribe_envelope(
            "orders",
            SubscribeOptions::group("consumer"),
            move |e: Envelope| {
                c.record("orders", &e);
                async { Ok::<_, std::io::Error>(()) }
            },
        )
        .await
        .unwrap();
    nats.kill();
    let mut tx = pool.begin().await.unwrap();
    for v in 1..=5 {
        for a in 0..20 {
            append(
                &mut *tx,
                OutboxEvent::new("orders", &envelope(&format!("d-{a}"), v), "Order"),
            )
            .await
            .unwrap();
        }
    }
    tx.commit().await.unwrap();
    let relay = Relay::new(store.clone(), bus.clone(), fast());
    let stats = relay.stats();
    let shutdown = CancellationToken::new();
    let running = spawn_relay(relay, &shutdown);
    assert!(
        eventually(Duration::from_secs(30), || stats.failed.load(Ordering::Relaxed)
            >= 20)
        .await,
        "publishes did not fail"
    );
    let status = store.status().await.unwrap();
    assert_eq!(status.counts.get("pending"), Some(&100), "{status:?}");
    assert_eq!(status.counts.get("published"), None);
    nats.restart().await.unwrap();
    assert!(
        eventually(Duration::from_secs(60), || tx_seen.report().received >= 100).await,
        "{:?}",
        tx_seen.report()
    );
    shutdown.cancel();
    running.await.unwrap();
    assert!(tx_seen.report().is_strictly_ordered(), "{}", tx_seen.report());
    assert_eq!(store.status().await.unwrap().counts.get("published"), Some(&100));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_append_is_atomic_and_the_inbox_dedups() {
    let pg = PostgresServer::start().await.unwrap();
    let (store, pool) = store(&pg).await;
    sqlx::query("CREATE TABLE ledger (event_id TEXT PRIMARY KEY, amount BIGINT NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    let mut tx = pool.begin().await.unwrap();
    append(&mut *tx, OutboxEvent::new("orders", &envelope("r", 1), "Order"))
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert!(
        store.status().await.unwrap().counts.is_empty(),
        "a rolled-back append left a row"
    );

    let e = envelope("r", 1);
    for expected in [InboxOutcome::Processed, InboxOutcome::Duplicate] {
        let id = e.event_id.clone();
        let outcome = handle_once_postgres(&pool, "ledger", &e.event_id, move |conn| {
            async move {
                sqlx::query("INSERT INTO ledger VALUES ($1, 10)")
                    .bind(id)
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
    let rows: (i64,) = sqlx::query_as("SELECT COUNT(*) FROM ledger")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows.0, 1);
}
