//! The outbox and inbox on SQLite (a file per case): the shared outbox
//! store suite, and what only SQLite does (one relay per database, under a
//! lease row).

use eventbus_core::EventBus;
use eventbus_outbox::{OutboxEvent, OutboxStore, Relay, RelayConfig, append};
use eventbus_testkit::envelope;

/// A store on a new SQLite file, migrated; the directory lives as long as the store's factory.
struct Sqlite {
    dir: tempfile::TempDir,
}

impl Sqlite {
    async fn store(&self) -> OutboxStore {
        let url = format!(
            "sqlite://{}",
            self.dir
                .path()
                .join(format!("{}.db", eventbus_testkit::unique("app")))
                .display()
        );
        let store = OutboxStore::connect(&url, 4).await.unwrap();
        store.migrate().await.unwrap();
        store
    }
}

async fn setup() -> impl eventbus_testkit::outbox::StoreFactory {
    let sqlite = std::sync::Arc::new(Sqlite {
        dir: tempfile::tempdir().unwrap(),
    });
    move || {
        let sqlite = sqlite.clone();
        async move { sqlite.store().await }
    }
}

eventbus_testkit::outbox_store_tests!(setup);

/// A store on a new SQLite file (kept while the first value lives) and its pool.
async fn fresh() -> (Sqlite, OutboxStore, sqlx::SqlitePool) {
    let sqlite = Sqlite {
        dir: tempfile::tempdir().unwrap(),
    };
    let store = sqlite.store().await;
    let OutboxStore::Sqlite(pool) = &store else {
        unreachable!()
    };
    let pool = pool.clone();
    (sqlite, store, pool)
}

fn fast() -> RelayConfig {
    RelayConfig {
        poll_interval_ms: 20,
        backoff: eventbus_core::RetryPolicy::fixed(3, 20),
        ..RelayConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_one_relay_holds_the_sqlite_lease() {
    let (_sqlite, store, pool) = fresh().await;
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

/// A relay that shuts down gives the SQLite relay lease up, so the relay
/// started next (a restart, a deploy) publishes at once instead of waiting
/// out `lease_ms` (120 s by default; it waited before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_relay_hands_the_sqlite_lease_over_at_once() {
    let (_sqlite, store, pool) = fresh().await;
    let first = Relay::new(store.clone(), EventBus::memory(), fast());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let stop = shutdown.clone();
    let running = tokio::spawn(async move { first.run(stop).await });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    shutdown.cancel();
    running.await.unwrap().unwrap();
    let mut tx = pool.begin().await.unwrap();
    append(&mut *tx, OutboxEvent::new("orders", &envelope("h", 1), "Order"))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let second = Relay::new(store.clone(), EventBus::memory(), fast());
    assert_eq!(
        second.run_once().await.unwrap(),
        1,
        "the next relay waited for a stopped relay's lease"
    );
}
