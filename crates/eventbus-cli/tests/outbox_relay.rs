//! `eventbus outbox relay` as a process: killed (SIGKILL) mid-stream and
//! restarted, against real PostgreSQL and nats-server. Every event is
//! published at least once and none is lost; JetStream's dedup by event id
//! suppresses the re-sends.

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventbus::{BusConfig, Envelope, EventBus, SubscribeOptions};
use eventbus_nats::{NatsBackend, NatsConfig};
use eventbus_outbox::{OutboxEvent, OutboxStore, append};
use eventbus_testkit::server::NatsServer;
use eventbus_testkit::server::PostgresServer;

fn relay(database: &str, nats: &str, port: u16) -> Child {
    Command::new(env!("CARGO_BIN_EXE_eventbus"))
        .args([
            "outbox",
            "relay",
            "--backend",
            "nats",
            "--batch-size",
            "50",
            "--poll-interval-ms",
            "20",
            // A short lease: the killed relay's claims are taken over soon.
            "--lease-ms",
            "3000",
        ])
        .args([
            "--database",
            database,
            "--nats-url",
            nats,
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the eventbus binary")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn http_get(port: u16, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    Some(out)
}

async fn published(store: &OutboxStore) -> i64 {
    store
        .status()
        .await
        .unwrap()
        .counts
        .get("published")
        .copied()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_relay_process_restarted_loses_nothing() {
    let pg = PostgresServer::start()
        .await
        .expect("PostgreSQL (scripts/install-test-deps installs it)");
    let nats = NatsServer::start().await.unwrap();
    let store = OutboxStore::connect(&pg.url(), 4).await.unwrap();
    store.migrate().await.unwrap();
    let OutboxStore::Postgres(pool) = &store else {
        unreachable!()
    };

    let backend = NatsBackend::connect(NatsConfig::with_servers([nats.url()]))
        .await
        .unwrap();
    let consumer = EventBus::new(backend, BusConfig::default()).unwrap();
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = seen.clone();
    let _sub = consumer
        .subscribe_envelope(
            "orders",
            SubscribeOptions::group("billing"),
            move |e: Envelope| {
                sink.lock().unwrap().push(e.event_id);
                async { Ok::<_, std::io::Error>(()) }
            },
        )
        .await
        .unwrap();

    let mut ids = HashSet::new();
    for chunk in 0..20 {
        let mut tx = pool.begin().await.unwrap();
        for i in 0..100 {
            let n = chunk * 100 + i;
            let e = Envelope::builder(format!("agg-{}", n % 200), "OrderPlaced", (n / 200 + 1) as i64)
                .json_payload(&n)
                .unwrap()
                .build()
                .unwrap();
            append(&mut *tx, OutboxEvent::new("orders", &e, "Order"))
                .await
                .unwrap();
            ids.insert(e.event_id.clone());
        }
        tx.commit().await.unwrap();
    }

    let port = free_port();
    let mut first = relay(&pg.url(), &nats.url(), port);
    let mut health = None;
    for _ in 0..300 {
        health = http_get(port, "/health").await;
        if health.is_some() && published(&store).await >= 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let metrics = http_get(port, "/metrics").await.unwrap_or_default();
    first.kill().unwrap(); // SIGKILL mid-stream
    first.wait().unwrap();
    let health = health.expect("/health answered");
    assert!(
        health.contains("200 OK") && health.contains("\"healthy\":true"),
        "{health}"
    );
    assert!(metrics.contains("eventbus_outbox_rows"), "{metrics}");
    let before = published(&store).await;
    assert!(before < 2_000, "the relay finished before it was killed");

    // Its claims expire after their lease; the restarted relay takes them over.
    let mut second = relay(&pg.url(), &nats.url(), free_port());
    let mut done = false;
    for _ in 0..600 {
        if published(&store).await == 2_000
            && seen.lock().unwrap().iter().collect::<HashSet<_>>().len() == 2_000
        {
            done = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    second.kill().unwrap();
    second.wait().unwrap();
    assert!(
        done,
        "published {} of 2000 after the restart",
        published(&store).await
    );
    let got: HashSet<String> = seen.lock().unwrap().iter().cloned().collect();
    assert_eq!(got, ids, "events lost");
}

/// SIGTERM drains a running relay (it finishes its round, marks what it
/// published, flushes and exits 0); its `/metrics` is the Prometheus
/// exporter's text with `# HELP` for every metric, nothing hand-written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_relay_and_it_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let database = format!("sqlite://{}", dir.path().join("outbox.db").display());
    let nats = NatsServer::start().await.unwrap();
    let store = OutboxStore::connect(&database, 2).await.unwrap();
    store.migrate().await.unwrap();
    let OutboxStore::Sqlite(pool) = &store else {
        unreachable!()
    };
    let mut tx = pool.begin().await.unwrap();
    for n in 0..500 {
        let e = Envelope::builder(format!("agg-{}", n % 50), "OrderPlaced", (n / 50 + 1) as i64)
            .json_payload(&n)
            .unwrap()
            .build()
            .unwrap();
        append(&mut *tx, OutboxEvent::new("orders", &e, "Order"))
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    let port = free_port();
    let mut child = relay(&database, &nats.url(), port);
    let mut metrics = String::new();
    for _ in 0..300 {
        if published(&store).await > 0
            && let Some(text) = http_get(port, "/metrics").await
        {
            metrics = text;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        metrics.contains("# HELP eventbus_outbox_published_total"),
        "{metrics}"
    );
    assert!(
        metrics.contains("eventbus_outbox_rows{status=\"pending\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("# HELP eventbus_published_total"), "{metrics}");
    let livez = http_get(port, "/livez").await.unwrap_or_default();
    assert!(livez.contains("200 OK") && livez.contains("live"), "{livez}");
    let readyz = http_get(port, "/readyz").await.unwrap_or_default();
    assert!(readyz.contains("200 OK") && readyz.contains("ready"), "{readyz}");
    let started = std::time::Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the relay did not drain in 20 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(exit.success(), "exit status {exit}");
    // Every row is published, or still pending for the next relay.
    let status = store.status().await.unwrap();
    let published = status.counts.get("published").copied().unwrap_or(0);
    let pending = status.counts.get("pending").copied().unwrap_or(0);
    assert_eq!(published + pending, 500, "{status:?}");
    eprintln!(
        "drained after {:?}: published {published}, pending {pending}",
        started.elapsed()
    );
}

/// `--config` reaches every setting: a relay whose settings file gives the
/// NATS servers and TLS (`[nats]`, `[nats.tls]`) and its own settings
/// (`[relay]`) publishes through a server that requires TLS; the same file
/// without `[nats.tls]` makes the relay fail, publishing nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_file_sets_tls_for_the_relay() {
    use eventbus_testkit::tls::TestPki;
    let pki = TestPki::generate().unwrap();
    let nats = NatsServer::start_with_config(&format!(
        "tls {{ cert_file: {:?}, key_file: {:?}, ca_file: {:?}, timeout: 2 }}",
        pki.server_cert(),
        pki.server_key(),
        pki.ca()
    ))
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let database = format!("sqlite://{}", dir.path().join("outbox.db").display());
    let store = OutboxStore::connect(&database, 1).await.unwrap();
    store.migrate().await.unwrap();
    let OutboxStore::Sqlite(pool) = &store else {
        unreachable!()
    };
    let mut ids = HashSet::new();
    let mut tx = pool.begin().await.unwrap();
    for n in 0..50 {
        let e = Envelope::builder(format!("agg-{}", n % 5), "OrderPlaced", (n / 5 + 1) as i64)
            .json_payload(&n)
            .unwrap()
            .build()
            .unwrap();
        append(&mut *tx, OutboxEvent::new("tls-orders", &e, "Order"))
            .await
            .unwrap();
        ids.insert(e.event_id.clone());
    }
    tx.commit().await.unwrap();

    let mut consumer_config = NatsConfig::with_servers([nats.url()]);
    consumer_config.tls = Some(eventbus_nats::NatsTls {
        ca_file: Some(pki.ca()),
        ..Default::default()
    });
    let consumer = EventBus::new(
        NatsBackend::connect(consumer_config).await.unwrap(),
        BusConfig::default(),
    )
    .unwrap();
    let seen = Arc::new(Mutex::new(HashSet::<String>::new()));
    let sink = seen.clone();
    let _sub = consumer
        .subscribe_envelope(
            "tls-orders",
            SubscribeOptions::group("billing"),
            move |e: Envelope| {
                sink.lock().unwrap().insert(e.event_id);
                async { Ok::<_, std::io::Error>(()) }
            },
        )
        .await
        .unwrap();

    let plain = format!(
        "[nats]\nservers = [{:?}]\n\n[relay]\npoll_interval_ms = 20\n",
        nats.url()
    );
    let with_tls = format!(
        "{plain}\n[nats.tls]\nca_file = {:?}\n",
        pki.ca().display().to_string()
    );
    let run = |settings: &str| {
        let file = dir.path().join(format!("relay-{}.toml", settings.len()));
        std::fs::write(&file, settings).unwrap();
        Command::new(env!("CARGO_BIN_EXE_eventbus"))
            .args(["outbox", "relay", "--backend", "nats", "--config"])
            .arg(&file)
            .args([
                "--database",
                &database,
                "--listen",
                &format!("127.0.0.1:{}", free_port()),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the eventbus binary")
    };

    // Without the TLS section: refused (the server requires TLS), nothing published.
    let mut refused = run(&plain);
    let mut status = None;
    for _ in 0..300 {
        status = refused.try_wait().unwrap();
        if status.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if status.is_none() {
        refused.kill().unwrap();
        panic!("a relay without the TLS settings kept running against a TLS-only server");
    }
    assert!(!status.unwrap().success());
    assert_eq!(published(&store).await, 0);

    let mut relay = run(&with_tls);
    let mut done = false;
    for _ in 0..300 {
        if seen.lock().unwrap().len() == ids.len() {
            done = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    relay.kill().unwrap();
    relay.wait().unwrap();
    assert!(done, "received {} of {}", seen.lock().unwrap().len(), ids.len());
    assert_eq!(*seen.lock().unwrap(), ids);
}
