//! The outbox store suite: every case runs on each database the outbox
//! supports (SQLite and PostgreSQL) through [`outbox_store_tests!`](crate::outbox_store_tests),
//! one `#[test]` per case, so the two databases are held to the same
//! behaviour by the same code. Relaying goes through the memory backend;
//! broker faults are each backend's own tests.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use eventbus_core::{
    AckFuture, Backend, BackendSubscription, BusConfig, ConnectionState, Envelope, ErrorKind, EventBus,
    MemoryBackend, Message, RetryPolicy, SubscribeOptions, SubscribeSpec, Subscription, headers,
};
use eventbus_outbox::{InboxOutcome, OutboxEvent, OutboxStore, Relay, RelayConfig, append, append_all};
use futures::FutureExt;
use futures::future::BoxFuture;

use crate::{OrderChecker, envelope, eventually};

/// Makes a fresh, migrated [`OutboxStore`] (its own database or file) per call.
#[async_trait]
pub trait StoreFactory: Send + Sync {
    /// A new, empty, migrated store.
    async fn store(&self) -> OutboxStore;
}

#[async_trait]
impl<F, Fut> StoreFactory for F
where
    F: Fn() -> Fut + Send + Sync,
    Fut: Future<Output = OutboxStore> + Send,
{
    async fn store(&self) -> OutboxStore {
        self().await
    }
}

/// One case of the suite.
pub type Case = for<'a> fn(&'a dyn StoreFactory) -> BoxFuture<'a, ()>;

/// Generates the outbox store suite in a test file: one `#[test]` per case.
/// `$setup` is an `async fn() -> F` where `F:` [`StoreFactory`] (owning any
/// server it started).
#[macro_export]
macro_rules! outbox_store_tests {
    ($setup:path) => {
        $crate::outbox_store_tests!(@list [@cases $setup;]);
    };
    (@list [$($then:tt)*]) => {
        $crate::outbox_store_tests!($($then)*
            a_rolled_back_transaction_publishes_nothing_and_a_committed_one_everything,
            the_relay_keeps_per_aggregate_order_and_dead_letters_a_poison_event,
            cleanup_removes_only_published_rows_past_retention,
            the_inbox_runs_a_redelivered_event_once,
            an_unpublishable_row_goes_to_the_dead_letter_topic_with_its_headers,
            a_relay_whose_claim_expired_never_undoes_another_relays_work,
            a_relay_frozen_past_its_lease_publishes_no_more_on_waking,
            a_relay_frozen_past_its_lease_dead_letters_nothing_on_waking,
            a_slow_ack_holds_only_its_own_aggregate,
            a_round_claims_at_most_batch_size_rows,
            a_round_takes_the_versions_after_a_head_and_publishes_them_in_order,
            a_round_publishes_no_version_after_one_that_failed,
            a_round_gives_its_room_to_the_aggregates_with_versions_waiting,
            a_backlog_goes_out_in_chains_from_a_quarter_of_the_batchs_aggregates,
            a_stuck_lane_shows_in_the_relay_liveness,
            a_mark_refused_by_the_database_is_retried_not_left_for_the_lease,
            with_no_retention_a_round_deletes_what_it_published_in_order,
            with_no_retention_a_refused_delete_is_retried_not_left_for_the_lease,
            with_no_retention_a_relay_frozen_past_its_lease_deletes_nothing_of_anothers,
            with_no_retention_a_retried_delete_counts_the_rows_another_relay_holds_as_lost,
            the_inbox_layer_gives_one_effect_per_event_and_handler,
            append_all_writes_the_rows_append_writes_in_one_statement,
        );
    };
    (@all; $($case:ident),* $(,)?) => {
        /// Every case, by name.
        pub fn cases() -> Vec<(&'static str, Case)> {
            vec![$((stringify!($case), $case as Case)),*]
        }
    };
    (@cases $setup:path; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("runtime");
                let factory = runtime.block_on($setup());
                $crate::outbox::run_case(&runtime, stringify!($case), &factory);
                drop(factory);
            }
        )*
    };
}

outbox_store_tests!(@list [@all;]);

/// Runs the case called `name` on `runtime`, bounded by 120 s.
///
/// # Panics
/// When the case fails, does not finish in time, or no case has that name.
pub fn run_case(runtime: &tokio::runtime::Runtime, name: &str, factory: &dyn StoreFactory) {
    let case = cases()
        .into_iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("no outbox store case {name}"))
        .1;
    let outcome =
        runtime.block_on(async { tokio::time::timeout(Duration::from_secs(120), case(factory)).await });
    assert!(outcome.is_ok(), "outbox case {name} did not finish within 120 s");
}

/// `sql` with `?` placeholders, numbered `$1, $2, …` for PostgreSQL.
fn sql(store: &OutboxStore, sql: &str) -> String {
    match store {
        OutboxStore::Postgres(_) => {
            let mut n = 0;
            sql.chars()
                .map(|c| {
                    if c == '?' {
                        n += 1;
                        format!("${n}")
                    } else {
                        c.to_string()
                    }
                })
                .collect()
        }
        OutboxStore::Sqlite(_) => sql.to_owned(),
    }
}

/// Runs `$body` once per pool type, with `$pool` bound to the store's pool.
macro_rules! on_pool {
    ($store:expr, |$pool:ident| $body:expr) => {
        match $store {
            OutboxStore::Sqlite($pool) => $body,
            OutboxStore::Postgres($pool) => $body,
        }
    };
}

/// In one transaction: a business row in `orders`, then `events` appended to
/// the outbox (topic `orders`); committed or rolled back. Returns what each
/// `append` returned (false: the idempotency key was already there).
async fn business_write(store: &OutboxStore, order: &str, events: &[Envelope], commit: bool) -> Vec<bool> {
    let insert = sql(store, "INSERT INTO orders (id, total) VALUES (?, 100)");
    on_pool!(store, |pool| {
        let mut tx = pool.begin().await.expect("begin");
        sqlx::query(&insert)
            .bind(order)
            .execute(&mut *tx)
            .await
            .expect("business write");
        let mut inserted = Vec::new();
        for e in events {
            inserted.push(
                append(&mut *tx, OutboxEvent::new("orders", e, "Order"))
                    .await
                    .expect("append"),
            );
        }
        if commit {
            tx.commit().await.expect("commit");
        } else {
            tx.rollback().await.expect("rollback");
        }
        inserted
    })
}

/// A fresh store with the business table `orders`.
async fn store(f: &dyn StoreFactory) -> OutboxStore {
    let store = f.store().await;
    on_pool!(&store, |pool| {
        sqlx::query("CREATE TABLE orders (id TEXT PRIMARY KEY, total BIGINT NOT NULL)")
            .execute(pool)
            .await
            .map(drop)
            .expect("create orders")
    });
    store
}

/// Inserts a row by hand (bypassing `append`'s checks): `topic` and the
/// stored `envelope` text as given.
async fn insert_raw(
    store: &OutboxStore,
    id: &str,
    aggregate: &str,
    version: i64,
    topic: &str,
    envelope: &str,
) {
    let insert = sql(
        store,
        "INSERT INTO outbox_events (id, aggregate_type, aggregate_id, event_type, event_version, topic, envelope, next_attempt_at, created_at, idempotency_key) VALUES (?, 'Order', ?, 'T', ?, ?, ?, 0, 0, ?)",
    );
    on_pool!(store, |pool| {
        sqlx::query(&insert)
            .bind(id)
            .bind(aggregate)
            .bind(version)
            .bind(topic)
            .bind(envelope)
            .bind(id)
            .execute(pool)
            .await
            .map(drop)
            .expect("raw insert")
    });
}

/// `(event_version, status)` of every row, by version.
async fn statuses(store: &OutboxStore) -> Vec<(i64, String)> {
    let q = "SELECT event_version, status FROM outbox_events ORDER BY event_version";
    on_pool!(store, |pool| sqlx::query_as::<_, (i64, String)>(q)
        .fetch_all(pool)
        .await
        .expect("statuses"))
}

fn fast() -> RelayConfig {
    RelayConfig {
        poll_interval_ms: 20,
        backoff: RetryPolicy::fixed(3, 20),
        ..RelayConfig::default()
    }
}

/// Records deliveries of `topic` in a strict order checker, except those of
/// aggregate `poisoned` (whose v1 is dead-lettered by design), counted apart.
async fn recorder(bus: &EventBus, topic: &str) -> (Subscription, Arc<OrderChecker>, Arc<AtomicUsize>) {
    let checker = Arc::new(OrderChecker::new());
    let poisoned = Arc::new(AtomicUsize::new(0));
    let (c, p, name) = (checker.clone(), poisoned.clone(), topic.to_owned());
    let sub = bus
        .subscribe_envelope(topic, SubscribeOptions::group("consumer"), move |e: Envelope| {
            if e.aggregate_id == "poisoned" {
                p.fetch_add(1, Ordering::SeqCst);
            } else {
                c.record(&name, &e);
            }
            async { Ok::<_, std::io::Error>(()) }
        })
        .await
        .expect("subscribe");
    (sub, checker, poisoned)
}

/// A fresh store, a memory broker, a bus on it (with `consumer`'s
/// settings) and a recorder subscribed to `orders`.
async fn relayed(
    f: &dyn StoreFactory,
    consumer: BusConfig,
) -> (
    OutboxStore,
    MemoryBackend,
    EventBus,
    Subscription,
    Arc<OrderChecker>,
) {
    let store = store(f).await;
    let backend = MemoryBackend::default();
    let bus = EventBus::new(backend.clone(), consumer).unwrap();
    let (sub, checker, _) = recorder(&bus, "orders").await;
    (store, backend, bus, sub, checker)
}

fn a_rolled_back_transaction_publishes_nothing_and_a_committed_one_everything(
    f: &dyn StoreFactory,
) -> BoxFuture<'_, ()> {
    Box::pin(async move {
        let store = store(f).await;
        let bus = EventBus::memory();
        let (_sub, checker, _) = recorder(&bus, "orders").await;
        business_write(&store, "o-1", &[envelope("o-1", 1)], false).await;
        assert!(
            store.status().await.unwrap().counts.is_empty(),
            "a rolled-back append left a row"
        );
        let committed = envelope("o-2", 1);
        let inserted = business_write(&store, "o-2", &[committed.clone(), committed], true).await;
        assert_eq!(
            inserted,
            [true, false],
            "the second append of one event id is a no-op"
        );

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
    })
}

/// Writes 25 aggregates × 20 versions (returned), then aggregate
/// `poisoned`: v1 whose topic is invalid (every publish fails), and v2.
async fn write_bulk_and_poison(store: &OutboxStore) -> Vec<Envelope> {
    let events: Vec<Envelope> = (1..=20)
        .flat_map(|v| (0..25).map(move |a| envelope(&format!("a-{a}"), v)))
        .collect();
    business_write(store, "bulk", &events, true).await;
    let poison = envelope("poisoned", 1);
    let json = String::from_utf8(poison.encode().unwrap().to_vec()).unwrap();
    insert_raw(store, &poison.event_id, "poisoned", 1, "bad topic", &json).await;
    business_write(store, "after-poison", &[envelope("poisoned", 2)], true).await;
    events
}

fn the_relay_keeps_per_aggregate_order_and_dead_letters_a_poison_event(
    f: &dyn StoreFactory,
) -> BoxFuture<'_, ()> {
    Box::pin(async move {
        let store = store(f).await;
        let bus = EventBus::memory();
        let (_sub, checker, poisoned) = recorder(&bus, "orders").await;
        write_bulk_and_poison(&store).await;

        let relay = Relay::new(store.clone(), bus.clone(), fast());
        let stats = relay.stats();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let running = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { relay.run(shutdown).await }
        });
        assert!(
            eventually(Duration::from_secs(60), || checker.report().received == 500
                && poisoned.load(Ordering::SeqCst) == 1)
            .await,
            "{}",
            checker.report()
        );
        let report = checker.report();
        assert!(report.is_strictly_ordered() && report.duplicates == 0, "{report}");
        shutdown.cancel();
        running.await.unwrap().unwrap();
        assert_eq!(stats.dead_lettered.load(Ordering::Relaxed), 1);
        let status = store.status().await.unwrap();
        assert_eq!(status.counts.get("dead_lettered"), Some(&1));
        assert_eq!(
            status.counts.get("published"),
            Some(&501),
            "poisoned v2 went out after v1 was dead-lettered"
        );
    })
}

/// `retention_ms = 0`: each round deletes the rows it published instead
/// of marking them. Order holds as with marks (a deleted row is no longer
/// pending, so its successor becomes the head), the poisoned row stays as
/// dead-lettered, no published row is left, and an event id is forgotten
/// once published: appended again, it goes out again (the trade-off
/// RelayConfig::retention_ms documents).
fn with_no_retention_a_round_deletes_what_it_published_in_order(f: &dyn StoreFactory) -> BoxFuture<'_, ()> {
    Box::pin(async move {
        let store = store(f).await;
        let bus = EventBus::memory();
        let (_sub, checker, poisoned) = recorder(&bus, "orders").await;
        let events = write_bulk_and_poison(&store).await;

        let relay = Relay::new(
            store.clone(),
            bus.clone(),
            RelayConfig {
                retention_ms: 0,
                ..fast()
            },
        );
        let stats = relay.stats();
        let (shutdown, running) = run_relay(relay);
        // Counted once its delete committed, so the table is read after.
        let all = eventually(Duration::from_secs(60), || {
            checker.report().received == 500
                && poisoned.load(Ordering::SeqCst) == 1
                && stats.published.load(Ordering::SeqCst) == 501
        })
        .await;
        let report = checker.report();
        assert!(
            all,
            "{report}, {} counted published",
            stats.published.load(Ordering::SeqCst)
        );
        assert!(report.is_strictly_ordered() && report.duplicates == 0, "{report}");
        let counts = store.status().await.unwrap().counts;
        assert_eq!(
            counts,
            [("dead_lettered".to_owned(), 1)].into(),
            "published rows were kept, or rows were left pending"
        );
        assert_eq!(stats.lost_claims.load(Ordering::SeqCst), 0);
        // Forgotten once published: the same event appended again goes out
        // again (the consumer's event-id memory then drops it).
        let again = business_write(&store, "again", &events[..1], true).await;
        assert_eq!(again, [true], "a published event id was still remembered");
        let republished = eventually(Duration::from_secs(30), || {
            stats.published.load(Ordering::SeqCst) == 502
        })
        .await;
        shutdown.cancel();
        running.await.unwrap().unwrap();
        assert!(republished, "the event appended again was not published");
        assert!(!store.status().await.unwrap().counts.contains_key("pending"));
    })
}

fn cleanup_removes_only_published_rows_past_retention(f: &dyn StoreFactory) -> BoxFuture<'_, ()> {
    Box::pin(async move {
        let store = store(f).await;
        let events: Vec<Envelope> = (1..=3).map(|v| envelope("c", v)).collect();
        business_write(&store, "c", &events, true).await;
        let one_version = RelayConfig {
            versions_per_aggregate: 1,
            ..fast()
        };
        let relay = Relay::new(store.clone(), EventBus::memory(), one_version);
        relay.run_once().await.unwrap(); // v1 only: one event per aggregate per round
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
    })
}

/// Rows of `inbox_events` and of `orders` (counts).
async fn inbox_and_orders(store: &OutboxStore) -> (i64, i64) {
    let (inbox, orders): ((i64,), (i64,)) = on_pool!(store, |pool| (
        sqlx::query_as("SELECT COUNT(*) FROM inbox_events")
            .fetch_one(pool)
            .await
            .unwrap(),
        sqlx::query_as("SELECT COUNT(*) FROM orders")
            .fetch_one(pool)
            .await
            .unwrap()
    ));
    (inbox.0, orders.0)
}

fn the_inbox_runs_a_redelivered_event_once(f: &dyn StoreFactory) -> BoxFuture<'_, ()> {
    Box::pin(async move {
        let store = store(f).await;
        let e = envelope("i", 1);
        let insert = sql(&store, "INSERT INTO orders (id, total) VALUES (?, 1)");
        for expected in [InboxOutcome::Processed, InboxOutcome::Duplicate] {
            let outcome = match &store {
                OutboxStore::Sqlite(pool) => {
                    eventbus_outbox::handle_once_sqlite(pool, "billing", &e.event_id, |conn| {
                        let q = insert.clone();
                        async move {
                            sqlx::query(&q).bind("i").execute(&mut *conn).await?;
                            Ok(())
                        }
                        .boxed()
                    })
                    .await
                }
                OutboxStore::Postgres(pool) => {
                    eventbus_outbox::handle_once_postgres(pool, "billing", &e.event_id, |conn| {
                        let q = insert.clone();
                        async move {
                            sqlx::query(&q).bind("i").execute(&mut *conn).await?;
                            Ok(())
                        }
                        .boxed()
                    })
                    .await
                }
            };
            assert_eq!(outcome.unwrap(), expected);
        }
        // A failing handler rolls back its inbox row too, so a redelivery runs it again.
        let failing = match &store {
            OutboxStore::Sqlite(pool) => {
                eventbus_outbox::handle_once_sqlite(pool, "billing", "other-event", |_| {
                    async { Err("downstream down".into()) }.boxed()
                })
                .await
            }
            OutboxStore::Postgres(pool) => {
                eventbus_outbox::handle_once_postgres(pool, "billing", "other-event", |_| {
                    async { Err("downstream down".into()) }.boxed()
                })
                .await
            }
        };
        assert_eq!(failing.unwrap_err().kind(), ErrorKind::Handler);
        let (inbox, orders) = inbox_and_orders(&store).await;
        assert_eq!((inbox, orders), (1, 1), "one effect, one inbox row");
    })
}

fn an_unpublishable_row_goes_to_the_dead_letter_topic_with_its_headers(
    f: &dyn StoreFactory,
) -> BoxFuture<'_, ()> {
    Box::pin(async move {
        let store = store(f).await;
        let bus = EventBus::memory();
        let dead = Arc::new(Mutex::new(Vec::<Message>::new()));
        let sink = dead.clone();
        let _dlq = bus
            .subscribe("orders.dlq", SubscribeOptions::group("ops"), move |m: Message| {
                sink.lock().unwrap().push(m);
                async { Ok::<_, std::io::Error>(()) }
            })
            .await
            .unwrap();
        let (_sub, checker, _) = recorder(&bus, "orders").await;
        // A row whose stored envelope is corrupt can never be published.
        insert_raw(&store, "corrupt-1", "x", 1, "orders", "{not json").await;
        business_write(&store, "y", &[envelope("y", 1)], true).await;
        let config = RelayConfig {
            dead_letter: eventbus_core::DeadLetterPolicy::suffix(".dlq"),
            backoff: RetryPolicy::fixed(2, 20),
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
        assert_eq!(m.headers.get(headers::ORIGINAL_TOPIC), Some("orders"));
        assert_eq!(m.headers.get(headers::EVENT_ID), Some("corrupt-1"));
        assert!(m.headers.get(headers::ERROR_MESSAGE).unwrap().contains("invalid"));
        assert_eq!(&m.payload[..], b"{not json");
        assert_eq!(
            store.status().await.unwrap().counts.get("dead_lettered"),
            Some(&1)
        );
    })
}

/// `inner` with the ACK of its first publish `stall` late, the runtime
/// running on (a slow broker): for relay tests outside this suite.
pub fn slow_first_ack(inner: MemoryBackend, stall: Duration) -> impl Backend {
    StallFirstAck {
        inner,
        stall,
        how: Stall::Slow,
        armed: true.into(),
    }
}

/// A backend whose first publish's ACK is held for `stall`, as `how` says.
struct StallFirstAck {
    inner: MemoryBackend,
    stall: Duration,
    how: Stall,
    armed: AtomicBool,
}

/// How [`StallFirstAck`] holds its ACK.
#[derive(Debug, Clone, Copy)]
enum Stall {
    /// A slow broker: it confirms late while the runtime runs on.
    Slow,
    /// The whole (current-thread) runtime frozen, as a relay stopped by
    /// SIGSTOP or a long pause would be (its claim renewals cannot run
    /// meanwhile); then the ACK is lost.
    FreezeThenLose,
    /// Frozen the same way; then the broker's confirmation arrives.
    FreezeThenConfirm,
}

impl std::fmt::Debug for StallFirstAck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StallFirstAck")
            .field("stall", &self.stall)
            .field("how", &self.how)
            .finish()
    }
}

#[async_trait]
impl Backend for StallFirstAck {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn publish(&self, message: Message) -> eventbus_core::Result<AckFuture> {
        let ack = self.inner.publish(message).await?;
        if !self.armed.swap(false, Ordering::SeqCst) {
            return Ok(ack);
        }
        let (stall, how) = (self.stall, self.how);
        Ok(async move {
            let confirmed = ack.await; // stored and delivered either way
            match how {
                Stall::Slow => tokio::time::sleep(stall).await,
                Stall::FreezeThenLose => {
                    std::thread::sleep(stall);
                    return Err(eventbus_core::Error::timeout("ACK lost"));
                }
                Stall::FreezeThenConfirm => std::thread::sleep(stall),
            }
            confirmed
        }
        .boxed())
    }

    async fn subscribe(&self, spec: &SubscribeSpec) -> eventbus_core::Result<Box<dyn BackendSubscription>> {
        self.inner.subscribe(spec).await
    }

    fn connection_state(&self) -> ConnectionState {
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
fn a_relay_whose_claim_expired_never_undoes_another_relays_work(f: &dyn StoreFactory) -> BoxFuture<'_, ()> {
    Box::pin(claim_expired_while_frozen(
        f,
        Stall::FreezeThenLose,
        2,
        32,
        false,
        KEEP,
    ))
}

/// As [`a_relay_frozen_past_its_lease_publishes_no_more_on_waking`], with
/// `retention_ms = 0`: relay B deletes what it publishes, and A's delete of
/// v1 on waking (answered, finding nothing under its claim) counts v1 as a
/// lost claim, not as published by A.
fn with_no_retention_a_relay_frozen_past_its_lease_deletes_nothing_of_anothers(
    f: &dyn StoreFactory,
) -> BoxFuture<'_, ()> {
    Box::pin(claim_expired_while_frozen(
        f,
        Stall::FreezeThenConfirm,
        3,
        2,
        false,
        0,
    ))
}

/// `retention_ms` of the cases that keep published rows (the default).
const KEEP: u64 = 24 * 3_600_000;

/// Relay A claims v1..v3, publishes v1 and is frozen past its lease before
/// the ACK comes; relay B takes the rows over (v1 and v2 in one round, v3
/// when A's claim on it is gone) and publishes v1..v3. When A wakes to
/// v1's confirmation, it must not go on to v2 and v3: they are B's, and
/// sending them again would put v2 after v3 (a consumer without its
/// event-id memory saw 1, 1, 2, 3, 2, 3). Nor may A's claim renewal on
/// waking, which finds v3 still under A's token, let it go on.
fn a_relay_frozen_past_its_lease_publishes_no_more_on_waking(f: &dyn StoreFactory) -> BoxFuture<'_, ()> {
    Box::pin(claim_expired_while_frozen(
        f,
        Stall::FreezeThenConfirm,
        3,
        2,
        false,
        KEEP,
    ))
}

/// Relay A's last attempt at v1 loses its ACK while A is frozen past its
/// lease, and relay B publishes v1 meanwhile. A must not dead-letter v1 on
/// waking: it would be both published and in the dead-letter topic, and a
/// replay of the dead letter would send it again after later versions.
fn a_relay_frozen_past_its_lease_dead_letters_nothing_on_waking(f: &dyn StoreFactory) -> BoxFuture<'_, ()> {
    Box::pin(claim_expired_while_frozen(
        f,
        Stall::FreezeThenLose,
        1,
        32,
        true,
        KEEP,
    ))
}

/// Relay A's first ACK is held `how` for 800 ms, far past its 100 ms
/// lease, while relay B (taking up to `b_versions` per aggregate and
/// round) relays `versions` versions of one aggregate; with
/// `last_attempt`, each row has one attempt and failures go to
/// `orders.dlq`; both keep published rows `retention_ms`. A publishes
/// only v1 (before it froze), discards its result, and changes no row;
/// every version but v1 reaches the broker once, in order, and nothing is
/// dead-lettered.
async fn claim_expired_while_frozen(
    f: &dyn StoreFactory,
    how: Stall,
    versions: i64,
    b_versions: usize,
    last_attempt: bool,
    retention_ms: u64,
) {
    let (store, backend, bus, sub, checker) = relayed(f, BusConfig::default()).await;
    // Every delivery, repeats included (no event-id memory).
    let mut every = BusConfig::default();
    every.consumer.dedup_window = 0;
    let raw_bus = EventBus::new(backend.clone(), every).unwrap();
    let (raw_sub, deliveries) = versions_handled(&raw_bus, "lease-x").await;
    let dead_letters = Arc::new(AtomicUsize::new(0));
    let counted = dead_letters.clone();
    let dlq_sub = bus
        .subscribe("orders.dlq", SubscribeOptions::group("ops"), move |_: Message| {
            counted.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, std::io::Error>(()) }
        })
        .await
        .expect("subscribe to the dead-letter topic");
    let events: Vec<Envelope> = (1..=versions).map(|v| envelope("lease-x", v)).collect();
    business_write(&store, "lease", &events, true).await;
    let mut config = RelayConfig {
        lease_ms: 100,
        retention_ms,
        ..fast()
    };
    if last_attempt {
        config.backoff = RetryPolicy::fixed(1, 20);
        config.dead_letter = eventbus_core::DeadLetterPolicy::suffix(".dlq");
    }
    let (store_a, config_a, backend_a) = (store.clone(), config.clone(), backend.clone());
    // Relay A on a runtime of its own, which the held ACK freezes.
    let relay_a = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let store_a = own_pool(&store_a).await;
            let frozen = StallFirstAck {
                inner: backend_a,
                stall: Duration::from_millis(800),
                how,
                armed: true.into(),
            };
            let bus = EventBus::new(frozen, BusConfig::default()).unwrap();
            let relay = Relay::new(store_a.clone(), bus, config_a);
            relay.run_once().await.unwrap();
            on_pool!(&store_a, |pool| pool.close().await);
            relay.stats()
        })
    });
    let relay_b = Relay::new(
        store.clone(),
        bus.clone(),
        RelayConfig {
            versions_per_aggregate: b_versions,
            ..config
        },
    );
    // Once A holds v1 (then it is frozen within milliseconds), past A's lease.
    for _ in 0..1_000 {
        if rows_of(&store, "lease-x").await[0].3 == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    // B's first round, while A is frozen; A then wakes to whatever of its
    // claim B did not take.
    relay_b.run_once().await.unwrap();
    let stats_a = tokio::task::spawn_blocking(move || relay_a.join().unwrap())
        .await
        .unwrap();
    for _ in 0..200 {
        if statuses(&store).await.iter().all(|(_, s)| s == "published") {
            break;
        }
        relay_b.run_once().await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Whatever A did on waking, B keeps relaying for a while.
    for _ in 0..20 {
        relay_b.run_once().await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Deleted as published (`retention_ms = 0`), else all marked.
    let want: Vec<(i64, String)> = match retention_ms {
        0 => Vec::new(),
        _ => (1..=versions).map(|v| (v, "published".into())).collect(),
    };
    assert_eq!(statuses(&store).await, want, "a stale claim changed a row");
    assert!(
        eventually(Duration::from_secs(5), || checker.report().received
            >= versions as u64)
        .await
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let report = checker.report();
    assert!(report.is_strictly_ordered(), "{report}");
    assert_eq!(
        stats_a.lost_claims.load(Ordering::SeqCst),
        1,
        "A discards its result (v1), and has no other"
    );
    let mut want: Vec<i64> = vec![1];
    want.extend(1..=versions);
    assert_eq!(
        *deliveries.lock().unwrap(),
        want,
        "at the broker: A's v1, then B's v1..v{versions}, nothing later"
    );
    assert_eq!(
        dead_letters.load(Ordering::SeqCst),
        0,
        "a published row was dead-lettered"
    );
    dlq_sub.close().await.unwrap();
    raw_sub.close().await.unwrap();
    raw_bus.close().await.unwrap();
    sub.close().await.unwrap();
    bus.close().await.unwrap();
}

/// Runs `relay` in a task until the returned token is cancelled.
fn run_relay(
    relay: Relay,
) -> (
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<eventbus_core::Result<()>>,
) {
    let shutdown = tokio_util::sync::CancellationToken::new();
    let stop = shutdown.clone();
    (shutdown, tokio::spawn(async move { relay.run(stop).await }))
}

/// A relay runs `rounds_in_flight` rounds at once: while one round waits
/// for a slow ACK of `slow` v1, another publishes `quick` v1 and v2; `slow`
/// v2 waits for v1's ACK (its head is still pending), then follows in order.
fn a_slow_ack_holds_only_its_own_aggregate(f: &dyn StoreFactory) -> BoxFuture<'_, ()> {
    Box::pin(async move {
        let (store, backend, bus, sub, checker) = relayed(f, BusConfig::default()).await;
        business_write(
            &store,
            "lanes-1",
            &[envelope("slow", 1), envelope("slow", 2)],
            true,
        )
        .await;
        business_write(
            &store,
            "lanes-2",
            &[envelope("quick", 1), envelope("quick", 2)],
            true,
        )
        .await;
        let stalled = StallFirstAck {
            inner: backend.clone(),
            stall: Duration::from_millis(2_000),
            how: Stall::Slow,
            armed: true.into(),
        };
        let relay = Relay::new(
            store.clone(),
            EventBus::new(stalled, BusConfig::default()).unwrap(),
            RelayConfig {
                batch_size: 1,
                rounds_in_flight: 2,
                ..fast()
            },
        );
        let (shutdown, running) = run_relay(relay);
        // slow v1 (sent, ACK pending), then quick v1 and v2 from the other lane.
        assert!(
            eventually(Duration::from_millis(1_500), || checker.report().received >= 3).await,
            "the other aggregate waited for the slow ACK: {}",
            checker.report()
        );
        // Give a wrongly early slow v2 time to show (v1's ACK is still 0.5 s or more away).
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(checker.report().received, 3, "slow v2 went before v1's ACK");
        assert!(eventually(Duration::from_secs(10), || checker.report().received >= 4).await);
        shutdown.cancel();
        running.await.unwrap().unwrap();
        let report = checker.report();
        assert!(report.is_strictly_ordered(), "{report}");
        assert_eq!(report.received, 4, "{report}");
        assert!(statuses(&store).await.iter().all(|(_, s)| s == "published"));
        sub.close().await.unwrap();
        bus.close().await.unwrap();
    })
}

/// One lane stuck on a publish that does not complete makes the relay
/// look stuck (`seconds_since_last_round`, the `/health` check), although
/// its other lane keeps running rounds.
fn a_stuck_lane_shows_in_the_relay_liveness(f: &dyn StoreFactory) -> BoxFuture<'_, ()> {
    Box::pin(async move {
        let store = store(f).await;
        business_write(&store, "stuck-1", &[envelope("stuck", 1)], true).await;
        let stalled = StallFirstAck {
            inner: MemoryBackend::default(),
            stall: Duration::from_secs(600),
            how: Stall::Slow,
            armed: true.into(),
        };
        let mut config = BusConfig::default();
        config.publish.ack_timeout_ms = 3_500; // the stuck lane ends in a bounded time
        let relay = Relay::new(
            store.clone(),
            EventBus::new(stalled, config).unwrap(),
            RelayConfig {
                rounds_in_flight: 2,
                ..fast()
            },
        );
        let stats = relay.stats();
        let (shutdown, running) = run_relay(relay);
        tokio::time::sleep(Duration::from_millis(2_600)).await;
        let stale = stats.seconds_since_last_round();
        shutdown.cancel();
        running.await.unwrap().unwrap();
        assert!(
            stale >= 2,
            "one lane waited 2.6 s on a publish, the relay reported {stale} s"
        );
        assert!(
            stats.rounds.load(Ordering::SeqCst) > 10,
            "the other lane kept running"
        );
    })
}

/// Runs each statement on the store's pool.
async fn execute(store: &OutboxStore, statements: &[&str]) {
    for statement in statements {
        on_pool!(store, |pool| {
            sqlx::query(statement)
                .execute(pool)
                .await
                .map(drop)
                .unwrap_or_else(|e| panic!("{statement}: {e}"))
        });
    }
}

/// The database refuses to mark rows published or delete them (triggers
/// stand in for an outage between the ACK and the mark) while
/// `outbox_fault.on_mark` is 1.
async fn refuse_marks(store: &OutboxStore) {
    let table = [
        "CREATE TABLE outbox_fault (on_mark INTEGER NOT NULL)",
        "INSERT INTO outbox_fault (on_mark) VALUES (1)",
    ];
    execute(store, &table).await;
    match store {
        OutboxStore::Sqlite(_) => {
            execute(
                store,
                &[
                    "CREATE TRIGGER outbox_fault_mark BEFORE UPDATE OF status ON outbox_events \
                   WHEN NEW.status = 'published' AND (SELECT on_mark FROM outbox_fault) = 1 \
                   BEGIN SELECT RAISE(ABORT, 'injected: mark refused'); END",
                    "CREATE TRIGGER outbox_fault_delete BEFORE DELETE ON outbox_events \
                   WHEN (SELECT on_mark FROM outbox_fault) = 1 \
                   BEGIN SELECT RAISE(ABORT, 'injected: delete refused'); END",
                ],
            )
            .await;
        }
        OutboxStore::Postgres(_) => {
            execute(
                store,
                &[
                    "CREATE FUNCTION outbox_fault_mark() RETURNS trigger LANGUAGE plpgsql AS $$ \
                     BEGIN IF NEW.status = 'published' AND (SELECT on_mark FROM outbox_fault) = 1 \
                     THEN RAISE EXCEPTION 'injected: mark refused'; END IF; RETURN NEW; END $$",
                    "CREATE TRIGGER outbox_fault_mark BEFORE UPDATE ON outbox_events \
                     FOR EACH ROW EXECUTE FUNCTION outbox_fault_mark()",
                    "CREATE FUNCTION outbox_fault_delete() RETURNS trigger LANGUAGE plpgsql AS $$ \
                     BEGIN IF (SELECT on_mark FROM outbox_fault) = 1 \
                     THEN RAISE EXCEPTION 'injected: delete refused'; END IF; RETURN OLD; END $$",
                    "CREATE TRIGGER outbox_fault_delete BEFORE DELETE ON outbox_events \
                     FOR EACH ROW EXECUTE FUNCTION outbox_fault_delete()",
                ],
            )
            .await;
        }
    }
}

/// A mark that fails after the broker confirmed (the database went away
/// between the two) is retried until the database takes it: the event is
/// published once, its successor follows within seconds, and nothing waits
/// for the claim's lease. (Before, the round gave up on the first error:
/// its rows stayed claimed for `lease_ms`, their aggregates waited, and
/// then they were published again, past a broker's dedup window.)
fn a_mark_refused_by_the_database_is_retried_not_left_for_the_lease(
    f: &dyn StoreFactory,
) -> BoxFuture<'_, ()> {
    Box::pin(mark_refused_then_taken(f, RelayConfig::default().retention_ms))
}

/// As [`a_mark_refused_by_the_database_is_retried_not_left_for_the_lease`],
/// with `retention_ms = 0`: the mark is a delete, refused, then retried.
fn with_no_retention_a_refused_delete_is_retried_not_left_for_the_lease(
    f: &dyn StoreFactory,
) -> BoxFuture<'_, ()> {
    Box::pin(mark_refused_then_taken(f, 0))
}

/// The marks of a relay keeping published rows `retention_ms` are refused
/// for 500 ms after v1's ACK, then taken.
async fn mark_refused_then_taken(f: &dyn StoreFactory, retention_ms: u64) {
    let (store, _backend, bus, _sub, checker) = relayed(f, BusConfig::default()).await;
    refuse_marks(&store).await;
    business_write(&store, "mark", &[envelope("mark", 1), envelope("mark", 2)], true).await;
    let relay = Relay::new(
        store.clone(),
        bus.clone(),
        RelayConfig {
            lease_ms: 60_000,
            // v1 alone in its round: v2 needs v1's mark to be claimed.
            versions_per_aggregate: 1,
            retention_ms,
            ..fast()
        },
    );
    let stats = relay.stats();
    let (shutdown, running) = run_relay(relay);
    assert!(
        eventually(Duration::from_secs(10), || checker.report().received >= 1).await,
        "v1 was never published"
    );
    tokio::time::sleep(Duration::from_millis(500)).await; // marks refused meanwhile
    assert_eq!(checker.report().received, 1, "v2 went out before v1 was marked");
    execute(&store, &["UPDATE outbox_fault SET on_mark = 0"]).await;
    let both = eventually(Duration::from_secs(10), || checker.report().received >= 2).await;
    let report = checker.report();
    shutdown.cancel();
    running.await.unwrap().unwrap();
    assert!(both, "v2 waited for v1's lease: {report:?}");
    assert!(report.is_strictly_ordered(), "{report}");
    assert_eq!(report.duplicates, 0, "v1 was published again: {report:?}");
    assert_eq!(stats.published.load(Ordering::SeqCst), 2);
    assert_eq!(stats.lost_claims.load(Ordering::SeqCst), 0);
    let counts = store.status().await.unwrap().counts;
    if retention_ms == 0 {
        assert!(counts.is_empty(), "published rows were kept: {counts:?}");
    } else {
        assert_eq!(counts.get("published"), Some(&2), "{counts:?}");
    }
}

/// `retention_ms = 0`, a delete retried after an error: one round's three
/// rows are confirmed, their delete refused; then, in one transaction, the
/// refusal ends, another relay takes row 1 over (its claim token) and row
/// 2 is deleted (as by an attempt whose answer was lost). The retry
/// deletes row 3 only; the relay counts rows 2 and 3 as its own and row 1,
/// still in the table, as a lost claim.
fn with_no_retention_a_retried_delete_counts_the_rows_another_relay_holds_as_lost(
    f: &dyn StoreFactory,
) -> BoxFuture<'_, ()> {
    Box::pin(async move {
        let (store, _backend, bus, _sub, checker) = relayed(f, BusConfig::default()).await;
        refuse_marks(&store).await;
        let rows: Vec<Envelope> = ["r-1", "r-2", "r-3"].iter().map(|a| envelope(a, 1)).collect();
        business_write(&store, "retried", &rows, true).await;
        let relay = Relay::new(
            store.clone(),
            bus.clone(),
            RelayConfig {
                lease_ms: 60_000,
                retention_ms: 0,
                ..fast()
            },
        );
        let stats = relay.stats();
        let (shutdown, running) = run_relay(relay);
        assert!(
            eventually(Duration::from_secs(10), || checker.report().received == 3).await,
            "the round was never published: {}",
            checker.report()
        );
        // The round's delete follows the ACKs at once, and is refused, then
        // retried at most 1 s apart: a second is ample for one refusal (the
        // case needs the flip below to come after one).
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (taken, gone) = (&rows[0].event_id, &rows[1].event_id);
        let statements = [
            "UPDATE outbox_fault SET on_mark = 0".to_owned(),
            format!("UPDATE outbox_events SET claimed_by = 'another-relay' WHERE id = '{taken}'"),
            format!("DELETE FROM outbox_events WHERE id = '{gone}'"),
        ];
        on_pool!(&store, |pool| {
            let mut tx = pool.begin().await.unwrap();
            for statement in &statements {
                sqlx::query(statement).execute(&mut *tx).await.unwrap();
            }
            tx.commit().await.unwrap();
        });
        let counted = eventually(Duration::from_secs(10), || {
            stats.published.load(Ordering::SeqCst) + stats.lost_claims.load(Ordering::SeqCst) == 3
        })
        .await;
        shutdown.cancel();
        running.await.unwrap().unwrap();
        assert!(counted, "the retried delete never finished");
        assert_eq!(stats.published.load(Ordering::SeqCst), 2, "rows 2 and 3");
        assert_eq!(
            stats.lost_claims.load(Ordering::SeqCst),
            1,
            "row 1, another relay's"
        );
        let left: Vec<String> = on_pool!(&store, |pool| sqlx::query_scalar("SELECT id FROM outbox_events")
            .fetch_all(pool)
            .await
            .unwrap());
        assert_eq!(
            left,
            std::slice::from_ref(taken),
            "only the row another relay holds is left"
        );
    })
}

/// A round claims at most `batch_size` rows, however the database plans the
/// claim (on PostgreSQL a re-run locking subquery once claimed 4 of 1).
fn a_round_claims_at_most_batch_size_rows(f: &dyn StoreFactory) -> BoxFuture<'_, ()> {
    Box::pin(async move {
        let store = store(f).await;
        let bus = EventBus::memory();
        for n in 0..4 {
            let aggregate = format!("limit-{n}");
            business_write(&store, &aggregate, &[envelope(&aggregate, 1)], true).await;
        }
        let relay = Relay::new(
            store.clone(),
            bus.clone(),
            RelayConfig {
                batch_size: 1,
                ..fast()
            },
        );
        for round in 0..4 {
            assert_eq!(relay.run_once().await.unwrap(), 1, "round {round}");
        }
        assert_eq!(relay.run_once().await.unwrap(), 0);
        bus.close().await.unwrap();
    })
}

/// The versions of aggregate `aggregate` that a subscription to `orders`
/// handled, in the order it handled them.
async fn versions_handled(bus: &EventBus, aggregate: &str) -> (Subscription, Arc<Mutex<Vec<i64>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (s, name) = (seen.clone(), aggregate.to_owned());
    let sub = bus
        .subscribe_envelope(
            "orders",
            SubscribeOptions::group("versions"),
            move |e: Envelope| {
                if e.aggregate_id == name {
                    s.lock().unwrap().push(e.event_version);
                }
                async { Ok::<_, std::io::Error>(()) }
            },
        )
        .await
        .expect("subscribe");
    (sub, seen)
}

/// A pool of its own on `store`'s database, for a relay on a runtime of its
/// own: a pool's PostgreSQL connections belong to the runtime that opened
/// them, and are dead in any other once it has shut down.
async fn own_pool(store: &OutboxStore) -> OutboxStore {
    match store {
        OutboxStore::Postgres(pool) => OutboxStore::Postgres(
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(4)
                .connect_with((*pool.connect_options()).clone())
                .await
                .expect("a second pool"),
        ),
        OutboxStore::Sqlite(pool) => OutboxStore::Sqlite(
            sqlx::sqlite::SqlitePoolOptions::new()
                .max_connections(4)
                .connect_with((*pool.connect_options()).clone())
                .await
                .expect("a second pool"),
        ),
    }
}

/// `(event_version, status, attempts, held)` of every row of `aggregate`,
/// by version; `held` is 1 while a claim holds the row (a claim token and
/// a lease), else 0.
async fn rows_of(store: &OutboxStore, aggregate: &str) -> Vec<(i64, String, i32, i64)> {
    let q = sql(
        store,
        "SELECT event_version, status, attempts,
                CAST(CASE WHEN status = 'pending' AND claimed_by IS NOT NULL AND lease_until IS NOT NULL THEN 1 ELSE 0 END AS BIGINT)
         FROM outbox_events WHERE aggregate_id = ? ORDER BY event_version",
    );
    on_pool!(store, |pool| sqlx::query_as::<_, (i64, String, i32, i64)>(&q)
        .bind(aggregate)
        .fetch_all(pool)
        .await
        .expect("rows of an aggregate"))
}

/// A round takes an aggregate's head and, while the heads leave room in
/// `batch_size`, up to `versions_per_aggregate - 1` versions after it, and
/// publishes them in order: 10 hot versions and a cold head in one round
/// (a relay claiming heads only took 2), and an aggregate with 40 pending
/// versions drains in 4 rounds rather than 40, strictly in order. (How
/// the room is shared among aggregates: the store's unit tests.)
fn a_round_takes_the_versions_after_a_head_and_publishes_them_in_order(
    f: &dyn StoreFactory,
) -> BoxFuture<'_, ()> {
    Box::pin(async move {
        let (store, _backend, bus, sub, checker) = relayed(f, BusConfig::default()).await;
        let hot: Vec<Envelope> = (1..=40).map(|v| envelope("hot", v)).collect();
        business_write(&store, "hot", &hot, true).await;
        business_write(&store, "cold", &[envelope("cold", 1)], true).await;
        let relay = Relay::new(
            store.clone(),
            bus.clone(),
            RelayConfig {
                batch_size: 12,
                versions_per_aggregate: 10,
                ..fast()
            },
        );
        assert_eq!(relay.run_once().await.unwrap(), 11, "hot v1..v10 and cold v1");
        let hot_rows = rows_of(&store, "hot").await;
        for (version, status, _, held) in &hot_rows {
            let want = if *version <= 10 { "published" } else { "pending" };
            assert_eq!(
                (status.as_str(), *held),
                (want, 0),
                "hot v{version}: {hot_rows:?}"
            );
        }
        let mut rounds = 1;
        while relay.run_once().await.unwrap() > 0 {
            rounds += 1;
        }
        assert_eq!(rounds, 4, "v11..v20, v21..v30, v31..v40");
        assert!(eventually(Duration::from_secs(30), || checker.report().received == 41).await);
        let report = checker.report();
        assert!(report.is_strictly_ordered() && report.duplicates == 0, "{report}");
        assert_eq!(store.status().await.unwrap().counts.get("published"), Some(&41));
        sub.close().await.unwrap();
        bus.close().await.unwrap();
    })
}

/// The room the heads leave goes to the aggregates that have versions
/// waiting, however many older heads have none or fewer: 10 one-version
/// aggregates, 10 two-version ones, then one with 100 versions, and a
/// batch of 40 takes the 21 heads, the 10 second versions and 9 hot
/// versions. (The first review found a probe of the 19 oldest heads only,
/// which took 21 rows; the second a probe of an even share per head only,
/// which left the room the short aggregates did not use: 33.)
fn a_round_gives_its_room_to_the_aggregates_with_versions_waiting(f: &dyn StoreFactory) -> BoxFuture<'_, ()> {
    Box::pin(async move {
        let store = store(f).await;
        for i in 0..10 {
            let cold = format!("cold-{i}");
            business_write(&store, &cold, &[envelope(&cold, 1)], true).await;
        }
        for i in 0..10 {
            let warm = format!("warm-{i}");
            business_write(&store, &warm, &[envelope(&warm, 1), envelope(&warm, 2)], true).await;
        }
        let hot: Vec<Envelope> = (1..=100).map(|v| envelope("hot", v)).collect();
        business_write(&store, "hot", &hot, true).await;
        let bus = EventBus::memory();
        let relay = Relay::new(
            store.clone(),
            bus.clone(),
            RelayConfig {
                batch_size: 40,
                ..fast()
            },
        );
        assert_eq!(relay.run_once().await.unwrap(), 40);
        let published = rows_of(&store, "hot")
            .await
            .iter()
            .filter(|r| r.1 == "published")
            .count();
        assert_eq!(published, 10, "hot v1..v10");
        bus.close().await.unwrap();
    })
}

/// A backlog of aggregates with many versions goes out in chains from a
/// quarter of a batch's aggregates, not one version of each of many, so
/// fewer aggregates are in flight and later claims walk fewer held rows: 20
/// aggregates with 10 versions each and a batch of 40, and the first round
/// publishes v1..v4 of the 10 oldest aggregates (before: v1 and v2 of all
/// 20). With one version per aggregate, the room the heads leave goes to
/// more heads: a batch of 40 over 60 such aggregates takes 40.
fn a_backlog_goes_out_in_chains_from_a_quarter_of_the_batchs_aggregates(
    f: &dyn StoreFactory,
) -> BoxFuture<'_, ()> {
    Box::pin(async move {
        let store = store(f).await;
        for a in 0..20 {
            let aggregate = format!("deep-{a:02}");
            let versions: Vec<Envelope> = (1..=10).map(|v| envelope(&aggregate, v)).collect();
            business_write(&store, &aggregate, &versions, true).await;
        }
        let bus = EventBus::memory();
        let relay = Relay::new(
            store.clone(),
            bus.clone(),
            RelayConfig {
                batch_size: 40,
                ..fast()
            },
        );
        assert_eq!(relay.run_once().await.unwrap(), 40);
        for a in 0..20 {
            let aggregate = format!("deep-{a:02}");
            let published: Vec<i64> = rows_of(&store, &aggregate)
                .await
                .iter()
                .filter(|r| r.1 == "published")
                .map(|r| r.0)
                .collect();
            let expected: Vec<i64> = if a < 10 { vec![1, 2, 3, 4] } else { vec![] };
            assert_eq!(published, expected, "{aggregate}");
        }
        for a in 0..60 {
            let aggregate = format!("wide-{a:02}");
            business_write(&store, &aggregate, &[envelope(&aggregate, 1)], true).await;
        }
        // The deep aggregates' next versions come first (oldest), then the wide ones.
        let mut rounds = Vec::new();
        loop {
            match relay.run_once().await.unwrap() {
                0 => break,
                n => rounds.push(n),
            }
        }
        assert_eq!(rounds.iter().sum::<usize>(), 200 - 40 + 60, "{rounds:?}");
        assert!(rounds.iter().all(|n| *n <= 40), "{rounds:?}");
        assert_eq!(
            rounds.iter().filter(|n| **n < 40).count(),
            1,
            "every round but the last full: {rounds:?}"
        );
        assert_eq!(store.status().await.unwrap().counts.get("published"), Some(&260));
        bus.close().await.unwrap();
    })
}

/// A version whose publish fails stops its aggregate's round there: the
/// versions after it stay pending, given back at once (no claim holds them
/// for a lease), and go out only after it is dead-lettered, in order.
fn a_round_publishes_no_version_after_one_that_failed(f: &dyn StoreFactory) -> BoxFuture<'_, ()> {
    Box::pin(async move {
        let store = store(f).await;
        let bus = EventBus::memory();
        let (sub, seen) = versions_handled(&bus, "chain").await;
        business_write(
            &store,
            "chain-1",
            &[envelope("chain", 1), envelope("chain", 2)],
            true,
        )
        .await;
        // v3 names an invalid topic: every publish of it fails.
        let poison = envelope("chain", 3);
        let json = String::from_utf8(poison.encode().unwrap().to_vec()).unwrap();
        insert_raw(&store, &poison.event_id, "chain", 3, "bad topic", &json).await;
        business_write(
            &store,
            "chain-2",
            &[envelope("chain", 4), envelope("chain", 5)],
            true,
        )
        .await;
        let relay = Relay::new(store.clone(), bus.clone(), fast());
        assert_eq!(relay.run_once().await.unwrap(), 5, "one chain: v1..v5");
        let after_first = rows_of(&store, "chain").await;
        assert_eq!(
            after_first,
            vec![
                (1, "published".into(), 0, 0),
                (2, "published".into(), 0, 0),
                (3, "pending".into(), 1, 0),
                (4, "pending".into(), 0, 0),
                (5, "pending".into(), 0, 0),
            ],
            "v4 and v5 are neither published nor left held"
        );
        // Rounds until v3 is dead-lettered (3 attempts, 20 ms apart), then v4 and v5.
        for _ in 0..100 {
            let rows = rows_of(&store, "chain").await;
            if rows[2].1 == "pending" {
                tokio::time::sleep(Duration::from_millis(100)).await;
                assert!(
                    !seen.lock().unwrap().contains(&4),
                    "v4 went out while v3 was pending: {rows:?}"
                );
            }
            if rows.iter().all(|r| r.1 != "pending") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
            relay.run_once().await.unwrap();
        }
        let rows = rows_of(&store, "chain").await;
        let statuses: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
        assert_eq!(
            statuses,
            [
                "published",
                "published",
                "dead_lettered",
                "published",
                "published"
            ],
            "{rows:?}"
        );
        assert!(eventually(Duration::from_secs(10), || seen.lock().unwrap().len() == 4).await);
        assert_eq!(*seen.lock().unwrap(), [1, 2, 4, 5]);
        sub.close().await.unwrap();
        bus.close().await.unwrap();
    })
}

/// [`InboxLayer`](eventbus_outbox::InboxLayer) around a subscription's
/// handler: a redelivered event (published twice, with the bus's own event id
/// memory off) has one effect per handler name; a handler error after its
/// write rolls the write and the inbox row back, and the retry writes once;
/// two handler names each process every event once.
fn the_inbox_layer_gives_one_effect_per_event_and_handler(f: &dyn StoreFactory) -> BoxFuture<'_, ()> {
    use eventbus_outbox::{InboxLayer, InboxRequest};
    use tower::ServiceBuilder;
    Box::pin(async move {
        let store = store(f).await;
        let mut config = BusConfig::default();
        config.consumer.dedup_window = 0;
        config.consumer.retry = RetryPolicy::fixed(5, 10);
        let bus = EventBus::memory_with(config).unwrap();
        let topic = crate::unique("inbox-layer");
        let insert = sql(&store, "INSERT INTO orders (id, total) VALUES (?, ?)");
        let fail_once = Arc::new(AtomicBool::new(true));
        let mut subs = Vec::new();
        let sneak_once = Arc::new(AtomicBool::new(true));
        for name in ["billing", "audit", "sneaky"] {
            let (insert, fail_once, sneak_once) = (insert.clone(), fail_once.clone(), sneak_once.clone());
            let sub = on_pool!(&store, |pool| {
                let own_pool = pool.clone();
                let service = ServiceBuilder::new()
                    .layer(InboxLayer::new(pool.clone(), name))
                    .service_fn(move |mut request: InboxRequest<_>| {
                        let (insert, fail_once, sneak_once) =
                            (insert.clone(), fail_once.clone(), sneak_once.clone());
                        let own_pool = own_pool.clone();
                        async move {
                            if name == "sneaky" && sneak_once.swap(false, Ordering::SeqCst) {
                                // Writes in a transaction of its own and hands
                                // that back: the layer must refuse to commit it.
                                let version = request.envelope.event_version;
                                drop(request);
                                let mut other = own_pool.begin().await?;
                                sqlx::query(&insert)
                                    .bind(format!("sneaky/{}", uuid::Uuid::now_v7()))
                                    .bind(version)
                                    .execute(&mut *other)
                                    .await?;
                                return Ok(other);
                            }
                            let e = &request.envelope;
                            sqlx::query(&insert)
                                .bind(format!("{name}/{}/{}", e.event_id, uuid::Uuid::now_v7()))
                                .bind(e.event_version)
                                .execute(&mut *request.tx)
                                .await?;
                            if name == "billing"
                                && e.event_version == 2
                                && fail_once.swap(false, Ordering::SeqCst)
                            {
                                return Err::<_, eventbus_core::BoxError>(
                                    "downstream down after the write".into(),
                                );
                            }
                            Ok(request.tx)
                        }
                    });
                bus.subscribe_service(&topic, SubscribeOptions::group(name), service)
                    .await
                    .expect("subscribe")
            });
            subs.push(sub);
        }
        let first = envelope("inbox-order", 1);
        let second = envelope("inbox-order", 2);
        for e in [&first, &second, &first] {
            bus.publish_envelope_sync(&topic, e).await.unwrap();
        }
        assert!(
            eventually(Duration::from_secs(30), || subs
                .iter()
                .all(|s| s.health().handled == 3))
            .await,
            "handled: {:?}",
            subs.iter().map(|s| s.health().handled).collect::<Vec<_>>()
        );
        assert!(!fail_once.load(Ordering::SeqCst), "the failing attempt ran");
        let (inbox, orders) = inbox_and_orders(&store).await;
        assert_eq!(inbox, 6, "two events, three handler names");
        assert_eq!(
            orders, 6,
            "one effect per event and handler; the failed attempt's and the foreign transaction's rolled back"
        );
        assert!(
            !sneak_once.load(Ordering::SeqCst),
            "the foreign transaction was handed back"
        );
        for sub in subs {
            assert_eq!(sub.health().dead_lettered, 0);
            sub.close().await.unwrap();
        }
        bus.close().await.unwrap();
    })
}

/// Every column of every row but those set at insert time (`seq`,
/// `created_at`, `next_attempt_at`), in `seq` order.
type Columns = (
    String,
    Option<i64>,
    String,
    String,
    String,
    i64,
    String,
    String,
    Option<String>,
    Option<String>,
    String,
    i32,
    String,
);

/// [`Columns`] in two halves, which compare and print.
type StoredRow = (
    (String, Option<i64>, String, String, String, i64, String),
    (String, Option<String>, Option<String>, String, i32, String),
);

async fn stored_rows(store: &OutboxStore) -> Vec<StoredRow> {
    let q = "SELECT id, tenant_id, aggregate_type, aggregate_id, event_type, event_version, topic, envelope, \
             trace_id, correlation_id, status, attempts, idempotency_key FROM outbox_events ORDER BY seq";
    let rows = on_pool!(store, |pool| sqlx::query_as::<_, Columns>(q)
        .fetch_all(pool)
        .await
        .expect("rows"));
    rows.into_iter()
        .map(|(a, b, c, d, e, f, g, h, i, j, k, l, m)| ((a, b, c, d, e, f, g), (h, i, j, k, l, m)))
        .collect()
}

/// `append_all` writes, in one statement, the rows `append` writes one by
/// one (same columns, in the order given), says which it skipped (already
/// there, or earlier in the same call), writes nothing when one event is
/// invalid, and the relay publishes them in per-aggregate order.
fn append_all_writes_the_rows_append_writes_in_one_statement(f: &dyn StoreFactory) -> BoxFuture<'_, ()> {
    Box::pin(async move {
        let (one_by_one, all_at_once) = (store(f).await, store(f).await);
        let traced = Envelope::builder("a-2", "OrderShipped", 1)
            .trace_id("trace-1")
            .correlation_id("corr-1")
            .tenant_id(42)
            .json_payload(&serde_json::json!({"say": "\"quoted\" \\ and ünïcode"}))
            .unwrap()
            .build()
            .unwrap();
        let first = envelope("a-1", 1);
        let later = [envelope("a-1", 2), traced, envelope("a-1", 3)];
        for store in [&one_by_one, &all_at_once] {
            business_write(store, "o-1", std::slice::from_ref(&first), true).await;
        }
        let (keyed, rekeyed) = (envelope("a-3", 1), envelope("a-3", 2));
        let mut batch = vec![first.clone()];
        batch.extend(later.iter().cloned());
        batch.push(later[0].clone());
        batch.extend([keyed, rekeyed.clone(), rekeyed]);
        let mut events: Vec<OutboxEvent<'_>> = batch
            .iter()
            .map(|e| OutboxEvent::new("orders", e, "Order"))
            .collect();
        // One business operation's key on two events (the second is
        // skipped), then the second event again under a key of its own.
        events[5].idempotency_key = Some("operation-1");
        events[6].idempotency_key = Some("operation-1");
        events[7].idempotency_key = Some("operation-2");

        let mut bad = events.clone();
        bad[2].topic = "";
        let refused = on_pool!(&all_at_once, |pool| {
            let mut tx = pool.begin().await.expect("begin");
            let refused = append_all(&mut *tx, &bad).await;
            tx.commit().await.expect("commit");
            refused
        });
        assert_eq!(
            refused.map_err(|e| e.kind()).unwrap_err(),
            ErrorKind::Validation,
            "an invalid topic is refused"
        );
        assert_eq!(
            stored_rows(&all_at_once).await.len(),
            1,
            "a refused call wrote nothing"
        );

        let inserted = on_pool!(&all_at_once, |pool| {
            let mut tx = pool.begin().await.expect("begin");
            assert!(append_all(&mut *tx, &[]).await.expect("no events").is_empty());
            let inserted = append_all(&mut *tx, &events).await.expect("append_all");
            tx.commit().await.expect("commit");
            inserted
        });
        assert_eq!(inserted, [false, true, true, true, false, true, false, true]);
        let one_at_a_time = on_pool!(&one_by_one, |pool| {
            let mut tx = pool.begin().await.expect("begin");
            let mut inserted = Vec::new();
            for event in &events {
                inserted.push(append(&mut *tx, event.clone()).await.expect("append"));
            }
            tx.commit().await.expect("commit");
            inserted
        });
        assert_eq!(one_at_a_time, inserted, "append says the same");
        let rows = stored_rows(&all_at_once).await;
        assert_eq!(
            rows,
            stored_rows(&one_by_one).await,
            "append writes the same rows"
        );
        let ids: Vec<&str> = rows.iter().map(|r| r.0.0.as_str()).collect();
        let expected: Vec<&str> = [0, 1, 2, 3, 5, 7]
            .iter()
            .map(|&i| batch[i].event_id.as_str())
            .collect();
        assert_eq!(ids, expected, "rows in the order given");

        let bus = EventBus::memory();
        let (_sub, checker, _) = recorder(&bus, "orders").await;
        let relay = Relay::new(all_at_once.clone(), bus.clone(), fast());
        while relay.run_once().await.unwrap() > 0 {}
        assert!(eventually(Duration::from_secs(30), || checker.report().received == 6).await);
        let report = checker.report();
        assert!(report.is_strictly_ordered(), "{report}");
    })
}
