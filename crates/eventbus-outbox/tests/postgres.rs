//! The outbox and inbox on a real, throwaway PostgreSQL cluster: the shared
//! outbox store suite (a database per case), and what only PostgreSQL does
//! (several relays sharing the work, a broker outage).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use eventbus_core::{BusConfig, Envelope, EventBus, MemoryBackend, SubscribeOptions};
use eventbus_nats::{NatsBackend, NatsConfig};
use eventbus_outbox::{OutboxEvent, OutboxStore, Relay, RelayConfig, append};
use eventbus_testkit::server::NatsServer;
use eventbus_testkit::server::PostgresServer;
use eventbus_testkit::{OrderChecker, envelope, eventually};
use tokio_util::sync::CancellationToken;

async fn store(pg: &PostgresServer) -> (OutboxStore, sqlx::PgPool) {
    let store = OutboxStore::connect(&pg.url(), 10).await.unwrap();
    store.migrate().await.unwrap();
    let OutboxStore::Postgres(pool) = &store else {
        unreachable!()
    };
    (store.clone(), pool.clone())
}

async fn setup() -> impl eventbus_testkit::outbox::StoreFactory {
    let pg = Arc::new(
        PostgresServer::start()
            .await
            .expect("PostgreSQL (scripts/install-test-deps installs it)"),
    );
    move || {
        let pg = pg.clone();
        async move {
            let name = eventbus_testkit::unique("db").replace('-', "_");
            database(&pg, &name).await
        }
    }
}

/// A new database `name` on `pg`, with a migrated outbox store on it.
async fn database(pg: &PostgresServer, name: &str) -> OutboxStore {
    let admin = sqlx::PgPool::connect(&pg.url()).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    let base = pg.url();
    let url = format!("{}/{name}", base.rsplit_once('/').unwrap().0);
    let store = OutboxStore::connect(&url, 10).await.unwrap();
    store.migrate().await.unwrap();
    store
}

eventbus_testkit::outbox_store_tests!(setup);

fn fast() -> RelayConfig {
    RelayConfig {
        poll_interval_ms: 50,
        backoff: eventbus_core::RetryPolicy::fixed(100, 100),
        ..RelayConfig::default()
    }
}

/// A subscription to `topic` on `bus` recording into a new order checker.
async fn checked(bus: &EventBus, topic: &str) -> (Arc<OrderChecker>, eventbus_core::Subscription) {
    let checker = Arc::new(OrderChecker::new());
    let (c, t) = (checker.clone(), topic.to_owned());
    let sub = bus
        .subscribe_envelope(topic, SubscribeOptions::group("consumer"), move |e: Envelope| {
            c.record(&t, &e);
            async { Ok::<_, std::io::Error>(()) }
        })
        .await
        .unwrap();
    (checker, sub)
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
    three_relays_share_in_order(500, 20).await;
}

/// Few aggregates with many pending versions each: rounds take versions
/// after their heads, and three relays racing for the 5 heads still
/// publish every aggregate strictly in order, each row once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_relays_drain_five_hot_aggregates_in_order() {
    three_relays_share_in_order(5, 400).await;
}

/// Three relays relay `aggregates` × `versions` events, committed version
/// by version in transactions of up to 100 aggregates while they run:
/// strictly in order, each row published once, the work shared.
async fn three_relays_share_in_order(aggregates: usize, versions: i64) {
    let total = aggregates * versions as usize;
    let pg = PostgresServer::start()
        .await
        .expect("PostgreSQL (scripts/install-test-deps installs it)");
    let (store, pool) = store(&pg).await;
    let backend = MemoryBackend::default();
    let consumer = EventBus::new(backend.clone(), BusConfig::default()).unwrap();
    let (checker, _sub) = checked(&consumer, "orders").await;
    let shutdown = CancellationToken::new();
    let relays: Vec<_> = (0..3)
        .map(|_| {
            let bus = EventBus::new(backend.clone(), BusConfig::default()).unwrap();
            spawn_relay(Relay::new(store.clone(), bus, fast()), &shutdown)
        })
        .collect();
    for v in 1..=versions {
        for chunk in (0..aggregates).step_by(100) {
            let mut tx = pool.begin().await.unwrap();
            for a in chunk..(chunk + 100).min(aggregates) {
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
        eventually(Duration::from_secs(120), || checker.report().received
            >= total as u64)
        .await,
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
    assert_eq!(per_relay.iter().sum::<u64>(), total as u64, "{per_relay:?}");
    assert!(
        per_relay.iter().filter(|n| **n > 0).count() >= 2,
        "the relays did not share the work: {per_relay:?}"
    );
    assert_eq!(
        store.status().await.unwrap().counts.get("published"),
        Some(&(total as i64))
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
    let (tx_seen, _sub) = checked(&bus, "orders").await;
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

/// PostgreSQL crashes (immediate shutdown) under a running relay while an
/// application keeps inserting, and comes back 2 s later: inserts that
/// failed while it was down are retried by the application; every committed
/// row is published once the database is back, each aggregate in order, and
/// every event is stored once in the stream: a round whose mark failed
/// retries the mark once the database is back, instead of leaving its rows
/// claimed for the whole lease (120 s) and then publishing them again, past
/// the stream's 2-minute dedup window (seen: 2,050 stored of 2,000, after
/// 122 s). Before the test kit signalled the postmaster itself, `crash()`
/// stopped only `runuser`, and this test never crashed PostgreSQL at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_under_a_running_relay_loses_nothing() {
    let mut pg = PostgresServer::start().await.unwrap();
    let (store, pool) = store(&pg).await;
    let nats = NatsServer::start().await.unwrap();
    let backend = NatsBackend::connect(NatsConfig::with_servers([nats.url()]))
        .await
        .unwrap();
    let bus = EventBus::new(backend, BusConfig::default()).unwrap();
    let (checker, _sub) = checked(&bus, "pg-restart").await;
    let relay = Relay::new(store.clone(), bus.clone(), fast());
    let stats = relay.stats();
    let shutdown = CancellationToken::new();
    let running = spawn_relay(relay, &shutdown);

    // The application: 50 aggregates × 40 versions, one transaction per
    // version round, retried until committed.
    const AGGREGATES: usize = 50;
    const VERSIONS: i64 = 40;
    let committed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let app = {
        let (pool, committed) = (pool.clone(), committed.clone());
        tokio::spawn(async move {
            let mut failures = 0;
            for v in 1..=VERSIONS {
                loop {
                    let attempt = async {
                        let mut tx = pool.begin().await?;
                        for a in 0..AGGREGATES {
                            append(
                                &mut *tx,
                                OutboxEvent::new("pg-restart", &envelope(&format!("pg-{a}"), v), "Order"),
                            )
                            .await
                            .map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
                        }
                        tx.commit().await
                    };
                    match tokio::time::timeout(Duration::from_secs(10), attempt).await {
                        Ok(Ok(())) => break,
                        _ => {
                            failures += 1;
                            assert!(failures < 300, "inserts never recovered");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
                committed.fetch_add(AGGREGATES, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            failures
        })
    };
    let total = AGGREGATES * VERSIONS as usize;
    assert!(
        eventually(Duration::from_secs(60), || committed.load(Ordering::SeqCst)
            >= total / 3)
        .await
    );
    let published_before = stats.published.load(Ordering::Relaxed);
    pg.crash().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    pg.restart().await.unwrap();
    let insert_failures = tokio::time::timeout(Duration::from_secs(120), app)
        .await
        .expect("the application finished inserting")
        .unwrap();
    // Well inside the 120 s lease: no aggregate waits out a claim.
    assert!(
        eventually(Duration::from_secs(60), || checker.report().received
            >= total as u64)
        .await,
        "{:?}",
        checker.report()
    );
    // Let the relay mark what it published, then check the table and stream.
    assert!(
        eventually(Duration::from_secs(60), || stats
            .published
            .load(Ordering::Relaxed)
            >= total as u64)
        .await
    );
    shutdown.cancel();
    running.await.unwrap();
    let report = checker.report();
    eprintln!(
        "postgres restart: {total} rows, {published_before} published before the crash, \
         {insert_failures} failed insert transactions retried, relay failures {}, {report:?}",
        stats.failed.load(Ordering::Relaxed)
    );
    assert!(report.is_strictly_ordered(), "{report}");
    assert_eq!(report.received, total as u64, "{report:?}");
    let status = store.status().await.unwrap();
    assert_eq!(
        status.counts.get("published"),
        Some(&(total as i64)),
        "{status:?}"
    );
    let client = async_nats::connect(nats.url()).await.unwrap();
    let mut stream = async_nats::jetstream::new(client)
        .get_stream("BUSINESS_STREAM_pg-restart")
        .await
        .unwrap();
    assert_eq!(
        stream.info().await.unwrap().state.messages,
        total as u64,
        "stored once each"
    );
}

/// The parent PID of `pid`, from `/proc/<pid>/stat` (field 4).
fn parent_pid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces.
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

/// Whether `pid` runs (a zombie, exited but not reaped, does not count).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, rest)| rest.trim_start().to_owned()))
        .is_some_and(|rest| !rest.starts_with('Z'))
}

/// The test kit's cluster must not outlive it: its `Drop` stops the
/// postmaster itself. (It used to signal `runuser`, which ran the server;
/// after the 10 s fallback SIGKILLed `runuser`, the postmaster and its
/// backends ran on with their data directory deleted.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_test_cluster_leaves_no_postgres_running() {
    let pg = PostgresServer::start().await.unwrap();
    let pool = sqlx::PgPool::connect(&pg.url()).await.unwrap();
    let (backend,): (i32,) = sqlx::query_as("SELECT pg_backend_pid()")
        .fetch_one(&pool)
        .await
        .unwrap();
    let backend = u32::try_from(backend).unwrap();
    let postmaster = parent_pid(backend).expect("the backend's parent");
    let held = pg.process().pid();
    pool.close().await;
    let started = std::time::Instant::now();
    drop(pg);
    let took = started.elapsed();
    let orphan = running(postmaster);
    if orphan {
        // Do not leave it behind for the next test run.
        let _ = std::process::Command::new("kill")
            .arg(postmaster.to_string())
            .status();
    }
    assert!(
        !orphan,
        "postmaster {postmaster} still runs after Drop (took {took:?})"
    );
    assert_eq!(
        held,
        Some(postmaster),
        "the test kit holds the postmaster's own PID"
    );
    // Its backends notice the postmaster's exit by themselves: give them 5 s.
    assert!(
        eventually(Duration::from_secs(5), || !running(backend)).await,
        "backend {backend} still runs 5 s after Drop"
    );
    eprintln!("the cluster stopped in {took:?}");
}

/// A claim rewrites every row it takes (`claimed_by`, `lease_until`, no
/// indexed column): on pages the outbox's inserts filled, that update must
/// stay heap-only (HOT: the new row version on the same page, no index
/// entries), or every claimed row costs an insert into each of the table's
/// six indexes. A relay round over 500 fresh rows updates each row twice:
/// the claim, and the mark, which changes `status` (indexed) and so is
/// never heap-only. With the fillfactor of 70 set before migration 0003,
/// only about a third of the claims were heap-only, and one relay drained
/// 18,776–22,090 events/s instead of 26,046–28,597 (README, outbox
/// benchmark).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_of_freshly_written_rows_is_a_heap_only_update() {
    let pg = PostgresServer::start()
        .await
        .expect("PostgreSQL (scripts/install-test-deps installs it)");
    let (store, pool) = store(&pg).await;
    // 500 aggregates, one version each: one round claims all 500 heads.
    let mut tx = pool.begin().await.unwrap();
    for n in 0..500 {
        append(
            &mut *tx,
            OutboxEvent::new("orders", &envelope(&format!("agg-{n}"), 1), "Order"),
        )
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
    let bus = EventBus::new(MemoryBackend::default(), BusConfig::default()).unwrap();
    let relay = Relay::new(store.clone(), bus, fast());
    assert_eq!(relay.run_once().await.unwrap(), 500);
    assert_eq!(relay.stats().published.load(Ordering::Relaxed), 500);
    let TableStats {
        updated, heap_only, ..
    } = table_stats(&pool, 1_000).await;
    assert_eq!(updated, 1_000, "one claim and one mark per row");
    assert_eq!(
        heap_only, 500,
        "only {heap_only} of the 500 claims were updated in place"
    );
}

/// Makes the statistics of an idle outbox (every row published when the
/// table was analyzed, autovacuum off so they stay), then a burst of 5,000
/// pending rows: 1,000 aggregates, 5 versions each.
async fn burst_after_an_idle_analyze(pool: &sqlx::PgPool) {
    let run = |sql: &'static str| async move { sqlx::query(sql).execute(pool).await.unwrap() };
    run("ALTER TABLE outbox_events SET (autovacuum_enabled = false)").await;
    run(
        "INSERT INTO outbox_events (id, aggregate_type, aggregate_id, event_type, event_version, topic,
             envelope, status, next_attempt_at, created_at, published_at, idempotency_key)
         SELECT 'old-' || n, 'Order', 'old-' || (n % 1000), 'Placed', n / 1000 + 1, 'orders',
             '{}', 'published', 0, 0, 1, 'old-' || n FROM generate_series(0, 4999) n",
    )
    .await;
    run("ANALYZE outbox_events").await;
    run("DELETE FROM outbox_events").await;
    let mut tx = pool.begin().await.unwrap();
    for n in 0..5_000 {
        let e = envelope(&format!("agg-{}", n % 1_000), n / 1_000 + 1);
        append(&mut *tx, OutboxEvent::new("orders", &e, "Order"))
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
}

/// `outbox_events`' cumulative statistics (`pg_stat_user_tables`).
struct TableStats {
    /// Rows updated.
    updated: i64,
    /// Of those, updated in place (heap-only).
    heap_only: i64,
    /// Rows fetched through indexes.
    fetched: i64,
}

/// [`TableStats`] once at least `updates` updates are reported (PostgreSQL
/// 15 reports a connection's statistics within about 10 s of it going
/// idle), or as they stand after 30 s.
async fn table_stats(pool: &sqlx::PgPool, updates: i64) -> TableStats {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (updated, heap_only, fetched): (i64, i64, i64) = sqlx::query_as(
            "SELECT n_tup_upd, n_tup_hot_upd, coalesce(idx_tup_fetch, 0) FROM pg_stat_user_tables WHERE relname = 'outbox_events'",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        if updated >= updates || tokio::time::Instant::now() >= deadline {
            return TableStats {
                updated,
                heap_only,
                fetched,
            };
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One relay round over the burst of [`burst_after_an_idle_analyze`], on a
/// fresh cluster, with a bus that is open or closed (every publish fails):
/// (rows published, updates of `outbox_events`, rows fetched through
/// indexes).
async fn one_round_after_an_idle_analyze(bus_closed: bool) -> (u64, i64, i64) {
    let pg = PostgresServer::start()
        .await
        .expect("PostgreSQL (scripts/install-test-deps installs it)");
    let (store, pool) = store(&pg).await;
    burst_after_an_idle_analyze(&pool).await;
    let bus = EventBus::new(MemoryBackend::default(), BusConfig::default()).unwrap();
    if bus_closed {
        bus.close().await.unwrap();
    }
    let relay = Relay::new(store.clone(), bus, fast());
    let _ = relay.run_once().await;
    let published = relay.stats().published.load(Ordering::Relaxed);
    let TableStats { updated, fetched, .. } = table_stats(&pool, 1_000).await;
    (published, updated, fetched)
}

/// A table analyzed while nothing was pending (idle, every row published)
/// has PostgreSQL estimate one pending row. A burst after that was claimed
/// by scanning every pending row once per candidate head and once per
/// claimed row: 14 s per claim of 500 among 50,000 pending, and the outbox
/// bench fell from 15,000 to 640 events/s. Counted here as rows fetched
/// through indexes, which does not depend on the machine's speed: one relay
/// round over 500 of 5,000 pending rows must fetch a few rows per row it
/// claims and marks, not thousands.
#[tokio::test]
async fn a_claim_after_the_table_was_analyzed_with_nothing_pending_probes_each_row_once() {
    let (published, updated, fetched) = one_round_after_an_idle_analyze(false).await;
    assert_eq!(published, 500);
    assert_eq!(updated, 1_000, "one claim and one mark per row");
    assert!(
        fetched < 10_000,
        "claiming and marking 500 rows fetched {fetched} rows through indexes"
    );
}

/// As above, for a round whose publishes all fail (the bus is closed): each
/// failure record found its row by scanning every pending row.
#[tokio::test]
async fn failures_recorded_after_the_table_was_analyzed_with_nothing_pending_find_their_row_by_id() {
    let (published, updated, fetched) = one_round_after_an_idle_analyze(true).await;
    assert_eq!(published, 0);
    assert_eq!(updated, 1_000, "one claim and one failure record per row");
    assert!(
        fetched < 10_000,
        "claiming 500 rows and recording their failures fetched {fetched} rows through indexes"
    );
}

/// A claim renewal waiting on the database (here: the round's rows locked
/// by another transaction; in production a slow or failing-over server, up
/// to the pool's acquire timeout) must not hold the round's publishes: v2
/// goes out when v1's ACK comes, while the renewal still waits. The mark
/// waits for the renewal (the two never run at once: they lock the same
/// rows in different orders), and nothing is lost or reordered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_waiting_on_the_database_does_not_hold_the_rounds_publishes() {
    let pg = PostgresServer::start()
        .await
        .expect("PostgreSQL (scripts/install-test-deps installs it)");
    let (store, pool) = store(&pg).await;
    let backend = MemoryBackend::default();
    let consumer = EventBus::new(backend.clone(), BusConfig::default()).unwrap();
    let (checker, _sub) = checked(&consumer, "orders").await;
    let mut tx = pool.begin().await.unwrap();
    for v in 1..=2 {
        append(
            &mut *tx,
            OutboxEvent::new("orders", &envelope("slow", v), "Order"),
        )
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
    // v1's ACK comes 1.5 s after its publish; the lease is 3 s, renewed every second.
    let slow = eventbus_testkit::outbox::slow_first_ack(backend.clone(), Duration::from_millis(1_500));
    let relay = Relay::new(
        store.clone(),
        EventBus::new(slow, BusConfig::default()).unwrap(),
        RelayConfig {
            lease_ms: 3_000,
            rounds_in_flight: 1,
            ..fast()
        },
    );
    let shutdown = CancellationToken::new();
    let running = spawn_relay(relay, &shutdown);
    assert!(
        eventually(Duration::from_secs(5), || checker.report().received >= 1).await,
        "v1 was not published"
    );
    // Lock the claimed rows: the renewal due about 1 s after the claim waits.
    let mut lock = pool.begin().await.unwrap();
    let locked: Vec<(String,)> =
        sqlx::query_as("SELECT id FROM outbox_events WHERE claimed_by IS NOT NULL FOR UPDATE")
            .fetch_all(&mut *lock)
            .await
            .unwrap();
    assert_eq!(locked.len(), 2, "both versions are in the round");
    let locked_at = std::time::Instant::now();
    // The renewal (due about 1 s after the claim) must be waiting on the lock.
    let mut renewal_waits = false;
    for _ in 0..60 {
        let (waiting,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%SET lease_until%'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if waiting > 0 {
            renewal_waits = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        renewal_waits,
        "no renewal waited on the locked rows (taken too late?)"
    );
    // v1's ACK comes at about 1.5 s: v2 must follow while the renewal waits.
    let v2 = eventually(Duration::from_millis(2_200), || checker.report().received >= 2).await;
    let waited = locked_at.elapsed();
    lock.rollback().await.unwrap();
    assert!(
        v2,
        "v2 was not published within {waited:?} of locking the rows (v1's ACK was due about 1.5 s after its publish): the renewal held the round"
    );
    let mut marked = None;
    for _ in 0..200 {
        marked = store.status().await.unwrap().counts.get("published").copied();
        if marked == Some(2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(marked, Some(2), "both rows are marked published");
    shutdown.cancel();
    running.await.unwrap();
    let report = checker.report();
    assert!(report.is_strictly_ordered(), "{report}");
    assert_eq!(report.received, 2, "{report}");
}

/// Sends `signal` (`STOP`, `CONT`) to the cluster's postmaster and to every
/// process it started (each session's backend, the checkpointer, ...), by
/// PID: `STOP` freezes the whole server, which then answers nothing and
/// sends no error, as a frozen or partitioned database host would.
fn signal_cluster(pg: &PostgresServer, signal: &str) {
    let postmaster = pg.process().pid().expect("the cluster runs");
    let mut pids = vec![postmaster];
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let pid = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok());
        if let Some(pid) = pid.filter(|&pid| parent_pid(pid) == Some(postmaster)) {
            pids.push(pid);
        }
    }
    for pid in pids {
        let _ = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status();
    }
}

/// The whole cluster frozen (`STOP`) until dropped (`CONT`), so a test
/// that fails meanwhile leaves no PostgreSQL process stopped.
struct Frozen<'a>(&'a PostgresServer);

impl<'a> Frozen<'a> {
    fn new(pg: &'a PostgresServer) -> Self {
        signal_cluster(pg, "STOP");
        Self(pg)
    }
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        signal_cluster(self.0, "CONT");
    }
}

/// Asks `running` to stop (`shutdown`) and asserts it ends within 5 s
/// (waiting at most 20 s to say how long it took); the cluster is thawed
/// (`frozen` dropped) before the assertion.
async fn assert_stops_within_grace(
    frozen: Frozen<'_>,
    shutdown: &CancellationToken,
    running: tokio::task::JoinHandle<Relay>,
    frozen_since: &str,
) {
    let asked = std::time::Instant::now();
    shutdown.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(20), running).await;
    let took = asked.elapsed();
    drop(frozen);
    stopped
        .expect("the relay stopped within 20 s of shutdown")
        .unwrap();
    eprintln!("the relay stopped {took:?} after shutdown, its database frozen {frozen_since}");
    assert!(took < Duration::from_secs(5), "stopping took {took:?}");
}

fn frozen_database_config() -> RelayConfig {
    RelayConfig {
        lease_ms: 60_000,
        shutdown_grace_ms: 1_000,
        ..fast()
    }
}

/// A relay stops within its shutdown grace while its database is frozen
/// (every PostgreSQL process SIGSTOPped) under a claim. Before, the claim
/// waited on the frozen server, and `run` with it, until the server woke:
/// without end here (more than 20 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_stops_within_its_grace_while_the_database_is_frozen_under_a_claim() {
    let pg = PostgresServer::start().await.unwrap();
    let (store, _pool) = store(&pg).await;
    let bus = EventBus::new(MemoryBackend::default(), BusConfig::default()).unwrap();
    let shutdown = CancellationToken::new();
    let running = spawn_relay(Relay::new(store, bus, frozen_database_config()), &shutdown);
    // Idle: its lanes claim every 50 ms; the next claim meets the frozen server.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let frozen = Frozen::new(&pg);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_stops_within_grace(frozen, &shutdown, running, "under a claim").await;
}

/// A relay stops within its shutdown grace while its database is frozen
/// under the mark of a round it published: the mark is given up (the row
/// waits out its lease, to be published again, unless the server runs the
/// mark it was sent once it wakes), rather than waited for until
/// `lease_ms` (60 s here, before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_stops_within_its_grace_while_the_database_is_frozen_under_a_mark() {
    let pg = PostgresServer::start().await.unwrap();
    let (store, pool) = store(&pg).await;
    let backend = eventbus_testkit::outbox::slow_first_ack(MemoryBackend::default(), Duration::from_secs(4));
    let bus = EventBus::new(backend, BusConfig::default()).unwrap();
    let mut tx = pool.begin().await.unwrap();
    append(
        &mut *tx,
        OutboxEvent::new("frozen", &envelope("frozen-1", 1), "Order"),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let relay = Relay::new(store, bus, frozen_database_config());
    let stats = relay.stats();
    let shutdown = CancellationToken::new();
    let running = spawn_relay(relay, &shutdown);
    // Claimed and published; its ACK comes 4 s after the publish.
    assert!(
        eventually(Duration::from_secs(10), || stats.rounds.load(Ordering::Relaxed)
            >= 1)
        .await
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let frozen = Frozen::new(&pg);
    // The ACK has come: the mark waits on the frozen server.
    tokio::time::sleep(Duration::from_millis(4_500)).await;
    assert_eq!(
        stats.published.load(Ordering::Relaxed),
        0,
        "marked before the freeze"
    );
    assert_stops_within_grace(frozen, &shutdown, running, "under a mark").await;
}

/// A relay started while its database is frozen stops within its grace.
/// Before, `run` first set up LISTEN, with no bound and deaf to shutdown:
/// it waited for the pool's connection check (30 s) and then returned
/// that error, ending the relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_started_on_a_frozen_database_stops_within_its_grace() {
    let pg = PostgresServer::start().await.unwrap();
    let (store, _pool) = store(&pg).await;
    let bus = EventBus::new(MemoryBackend::default(), BusConfig::default()).unwrap();
    let shutdown = CancellationToken::new();
    let frozen = Frozen::new(&pg);
    let running = spawn_relay(Relay::new(store, bus, frozen_database_config()), &shutdown);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_stops_within_grace(frozen, &shutdown, running, "since its start").await;
}

/// Commits `version` of aggregate `aggregate` to the outbox, retrying for
/// at most 30 s while the server comes back.
async fn commit_one(pool: &sqlx::PgPool, topic: &str, aggregate: &str, version: i64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let attempt = async {
            let mut tx = pool.begin().await.map_err(|e| e.to_string())?;
            append(
                &mut *tx,
                OutboxEvent::new(topic, &envelope(aggregate, version), "Order"),
            )
            .await
            .map_err(|e| e.to_string())?;
            tx.commit().await.map_err(|e| e.to_string())
        };
        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Ok(())) => return,
            failed => assert!(
                std::time::Instant::now() < deadline,
                "the insert never succeeded: {failed:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A relay hears new rows again (LISTEN) after the server ended its LISTEN
/// session and refused its first reconnect, and once PostgreSQL is back
/// after a crash; a relay started while the database is down runs, and
/// hears rows once it is back. Its poll is 60 s, so within the 5 s each
/// step allows only a notice (or the round that follows setting LISTEN up
/// again) relays a row, and each step commits once a LISTEN session is
/// back. Before, the relay's listener gave up at the first failed
/// reconnect (the second step) and the relay only polled from then on
/// (every `poll_interval_ms`, 500 ms by default: that much added to
/// commit→ACK for good). The last two steps pass on the old code too, the
/// database being back within sqlx's connect retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_hears_new_rows_again_after_postgres_comes_back() {
    let mut pg = PostgresServer::start().await.unwrap();
    let pg_url = pg.url();
    // The outbox in a database of its own, which `postgres` can close to new sessions.
    let store = database(&pg, "relisten").await;
    let server = sqlx::PgPool::connect(&pg.url()).await.unwrap();
    let OutboxStore::Postgres(pool) = store.clone() else {
        unreachable!()
    };
    let bus = EventBus::new(MemoryBackend::default(), BusConfig::default()).unwrap();
    let (checker, _sub) = checked(&bus, "relisten").await;
    let config = RelayConfig {
        poll_interval_ms: 60_000,
        ..fast()
    };
    let heard = |n: u64| {
        let checker = checker.clone();
        async move {
            eventually(Duration::from_secs(5), || {
                let report = checker.report();
                report.received - report.duplicates >= n
            })
            .await
        }
    };
    // A LISTEN session on the outbox's database is there within 15 s.
    let listening = || async {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            let count = async {
                let server = sqlx::PgPool::connect(&pg_url).await?;
                let count = sqlx::query_scalar::<_, i64>(
                    "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = 'relisten' AND query LIKE 'LISTEN%'",
                )
                .fetch_one(&server)
                .await;
                server.close().await;
                count
            };
            if count.await.is_ok_and(|n| n >= 1) {
                return true;
            }
            if std::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let shutdown = CancellationToken::new();
    let running = spawn_relay(Relay::new(store.clone(), bus.clone(), config.clone()), &shutdown);
    assert!(listening().await, "LISTEN set up at start");
    commit_one(&pool, "relisten", "relisten-1", 1).await;
    assert!(heard(1).await, "relayed at once at first");

    // Its LISTEN session, with every other session of its database, is
    // ended by the server (an administrator's `pg_terminate_backend`, a
    // fast shutdown, a failover proxy), and its first reconnect is
    // refused with an error that is not transient (the
    // database closed to new sessions for maintenance; an authentication
    // failure during a password rotation would do the same).
    sqlx::query("ALTER DATABASE relisten ALLOW_CONNECTIONS false")
        .execute(&server)
        .await
        .unwrap();
    let sessions: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = 'relisten' AND query LIKE 'LISTEN%'",
    )
    .fetch_one(&server)
    .await
    .unwrap();
    assert_eq!(sessions, 1, "the relay's one LISTEN session");
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'relisten'")
        .execute(&server)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    sqlx::query("ALTER DATABASE relisten ALLOW_CONNECTIONS true")
        .execute(&server)
        .await
        .unwrap();
    server.close().await;
    assert!(listening().await, "LISTEN set up again");
    commit_one(&pool, "relisten", "relisten-1", 2).await;
    assert!(
        heard(2).await,
        "relayed at once after its LISTEN session was ended: {:?}",
        checker.report()
    );

    pg.crash().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    pg.restart().await.unwrap();
    assert!(listening().await, "LISTEN set up again after the restart");
    commit_one(&pool, "relisten", "relisten-1", 3).await;
    assert!(
        heard(3).await,
        "relayed at once after the restart: {:?}",
        checker.report()
    );

    // A second relay started while the database is down runs, and hears
    // rows once it is back (the first relay is stopped first).
    shutdown.cancel();
    running.await.unwrap();
    pg.crash().unwrap();
    let shutdown = CancellationToken::new();
    let running = spawn_relay(Relay::new(store, bus, config), &shutdown);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !running.is_finished(),
        "the relay gave up on a database that is down"
    );
    pg.restart().await.unwrap();
    assert!(
        listening().await,
        "LISTEN set up by a relay started while the database was down"
    );
    commit_one(&pool, "relisten", "relisten-1", 4).await;
    assert!(
        heard(4).await,
        "relayed at once by a relay started while the database was down: {:?}",
        checker.report()
    );
    let report = checker.report();
    assert!(report.is_strictly_ordered(), "{report}");
    shutdown.cancel();
    running.await.unwrap();
}

/// A claim cut off before its BEGIN is answered (the database frozen past
/// the claim's `lease_ms`) leaves no session inside a transaction in the
/// pool. sqlx 0.8.6 gives such a session back still in the transaction
/// (transact-rs/sqlx#4393); the next statement on it (a mark, a renewal)
/// then ran inside a transaction nobody commits, invisible to everyone
/// else. The pool here has one session, and checks none before handing it
/// out, so the statement after the thaw gets whatever the claim left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_cut_off_before_its_begin_is_answered_leaves_no_open_transaction_in_the_pool() {
    let pg = PostgresServer::start().await.unwrap();
    let pool = one_session_pool(&pg).await;
    let store = OutboxStore::Postgres(pool.clone());
    let relay = Relay::new(
        store,
        EventBus::memory(),
        RelayConfig {
            lease_ms: 300,
            ..fast()
        },
    );
    let frozen = Frozen::new(&pg);
    let round = tokio::time::timeout(Duration::from_secs(10), relay.run_once()).await;
    drop(frozen);
    assert!(
        matches!(round, Ok(Err(_))),
        "the claim on a frozen database ended by its lease: {round:?}"
    );
    assert_a_write_through_the_pool_is_seen_by_another_session(&pg, &pool, "claim").await;
}

/// Writes a row through `pool` (after a thaw) and asserts another session
/// sees it: the session the pool handed out was not left inside a
/// transaction by the cut-off `what` (nobody would commit the write).
async fn assert_a_write_through_the_pool_is_seen_by_another_session(
    pg: &PostgresServer,
    pool: &sqlx::PgPool,
    what: &str,
) {
    let write = "INSERT INTO outbox_relay_lease (name, holder, lease_until) VALUES ('probe', 'test', 0)";
    tokio::time::timeout(Duration::from_secs(10), sqlx::query(write).execute(pool))
        .await
        .expect("the write after the thaw ended within 10 s")
        .unwrap();
    let mut other = <sqlx::PgConnection as sqlx::Connection>::connect(&pg.url())
        .await
        .unwrap();
    let (seen,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM outbox_relay_lease WHERE name = 'probe'")
        .fetch_one(&mut other)
        .await
        .unwrap();
    assert_eq!(
        seen, 1,
        "the write ran inside the transaction the cut-off {what} left open"
    );
}

/// A pool of one session that checks nothing before handing it out, so the
/// statement after a cut-off claim or inbox call gets whatever it left on it.
async fn one_session_pool(pg: &PostgresServer) -> sqlx::PgPool {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .test_before_acquire(false)
        .connect(&pg.url())
        .await
        .unwrap();
    OutboxStore::Postgres(pool.clone()).migrate().await.unwrap();
    // The session must be idle in the pool before a test freezes the
    // cluster, so that the call under test sends its BEGIN at once (not
    // still waiting for the migration's session to come back, which would
    // send no BEGIN at all and pass on any code).
    let idle = tokio::time::timeout(Duration::from_secs(10), async {
        while pool.num_idle() != 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(idle.is_ok(), "the pool's one session came back idle within 10 s");
    pool
}

/// Runs `call` (an inbox call on `pool`) on a frozen cluster until it is
/// cut off after 300 ms, as a handler timeout cuts off a handler, thaws the
/// cluster, then writes through `pool` and asserts another session sees
/// the write: the cut-off call left no transaction open on the pooled
/// session.
async fn assert_a_cut_off_inbox_call_leaves_no_open_transaction(
    pg: &PostgresServer,
    pool: &sqlx::PgPool,
    call: impl std::future::Future,
) {
    let frozen = Frozen::new(pg);
    let cut = tokio::time::timeout(Duration::from_millis(300), call).await;
    drop(frozen);
    assert!(cut.is_err(), "the inbox call on a frozen database was cut off");
    assert_a_write_through_the_pool_is_seen_by_another_session(pg, pool, "inbox call").await;
}

/// `handle_once_postgres` cut off (a handler timeout, a shutdown) while its
/// BEGIN is sent but not answered: sqlx 0.8 counts the transaction only
/// once BEGIN is answered, so dropping the call there put the session back
/// into the caller's pool inside a transaction (transact-rs/sqlx#4393), and
/// the pool's next user (a relay's mark, the service's own writes) wrote
/// into a transaction nobody commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handle_once_cut_off_before_its_begin_is_answered_leaves_no_open_transaction_in_the_pool() {
    let pg = PostgresServer::start().await.unwrap();
    let pool = one_session_pool(&pg).await;
    let call = eventbus_outbox::handle_once_postgres(&pool, "billing", "e-1", |_| Box::pin(async { Ok(()) }));
    assert_a_cut_off_inbox_call_leaves_no_open_transaction(&pg, &pool, call).await;
}

/// A handler behind the inbox layer that writes nothing.
async fn hand_back(
    request: eventbus_outbox::InboxRequest<sqlx::Postgres>,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, eventbus_core::BoxError> {
    Ok(request.tx)
}

/// As above, through [`eventbus_outbox::InboxLayer`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbox_layer_cut_off_before_its_begin_is_answered_leaves_no_open_transaction_in_the_pool() {
    use tower::ServiceExt as _;
    let pg = PostgresServer::start().await.unwrap();
    let pool = one_session_pool(&pg).await;
    let service = tower_layer::Layer::layer(
        &eventbus_outbox::InboxLayer::new(pool.clone(), "billing"),
        tower::service_fn(hand_back),
    );
    let call = service.oneshot(envelope("order-1", 1));
    assert_a_cut_off_inbox_call_leaves_no_open_transaction(&pg, &pool, call).await;
}
