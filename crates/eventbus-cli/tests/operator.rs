//! The operator's commands as processes against real brokers: a stuck
//! consumer diagnosed and repaired with the CLI alone (`publish`, `lag`,
//! `tail`, `dlq list`, `dlq show`, `dlq replay` with `--dry-run`, an
//! interrupted run and its re-run), on nats-server and on tansu.
//!
//! Set `EVENTBUS_SHOW_CLI=1` to print every command's output.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use eventbus::{BusConfig, Envelope, EventBus, RetryPolicy, SubscribeOptions, Subscription};
use eventbus_testkit::OrderChecker;
use eventbus_testkit::server::{NatsServer, TansuServer};

/// Runs `eventbus ARGS`, with `stdin` fed in; returns (success, stdout, stderr).
fn eventbus(args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_eventbus"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the eventbus binary runs");
    {
        use std::io::Write as _;
        let mut input = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            input.write_all(text.as_bytes()).unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    if std::env::var_os("EVENTBUS_SHOW_CLI").is_some() {
        let shown: String = stdout.lines().take(12).collect::<Vec<_>>().join("\n");
        eprintln!("$ eventbus {}\n{shown}\n{stderr}", args.join(" "));
    }
    (out.status.success(), stdout, stderr)
}

/// `n_aggregates` × `versions` envelopes as JSON lines, versions ascending.
fn events(n_aggregates: usize, versions: i64) -> String {
    let mut out = String::new();
    for v in 1..=versions {
        for a in 0..n_aggregates {
            out.push_str(
                &serde_json::json!({
                    "aggregate_id": format!("acct-{a}"),
                    "event_type": "Charged",
                    "event_version": v,
                    "payload": { "amount": v * 10 },
                })
                .to_string(),
            );
            out.push('\n');
        }
    }
    out
}

/// The consumer with the bug: while `broken`, every event fails and, with
/// one attempt, is dead-lettered; once fixed, it records what it handles.
async fn consumer(
    bus: &EventBus,
    topic: &str,
    broken: Arc<AtomicBool>,
    checker: Arc<OrderChecker>,
) -> Subscription {
    let name = topic.to_owned();
    let options = SubscribeOptions::group("billing").retry(RetryPolicy::fixed(1, 0));
    bus.subscribe_envelope(topic, options, move |e: Envelope| {
        let ok = !broken.load(Ordering::SeqCst);
        if ok {
            checker.record(&name, &e);
        }
        async move {
            match ok {
                true => Ok(()),
                false => Err(std::io::Error::other("amount field renamed: cannot charge")),
            }
        }
    })
    .await
    .expect("subscribe")
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The whole session on one broker; `broker` is the CLI's broker arguments.
async fn session(bus: EventBus, broker: &[&str], aggregates: usize, versions: i64, lag: bool) {
    let total = aggregates * versions as usize;
    let topic = format!("orders-{}", uuid::Uuid::now_v7().simple());
    let dlq = format!("{topic}.dlq");
    let cli = |args: &[&str], stdin: Option<&str>| {
        let mut all: Vec<&str> = args.to_vec();
        all.extend_from_slice(broker);
        eventbus(&all, stdin)
    };

    // 1. Publish from stdin: one ACK result per event.
    let (ok, out, err) = cli(
        &["publish", &topic, "--json"],
        Some(&events(aggregates, versions)),
    );
    assert!(ok, "publish failed: {err}");
    let results: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(results.len(), total);
    assert!(
        results
            .iter()
            .all(|r| r["error"].is_null() && r["position"].is_string()),
        "{out}"
    );

    // 2. Lag before any member: everything pending.
    if lag {
        let (ok, out, err) = cli(
            &[
                "lag",
                &topic,
                "--group",
                "billing",
                "--interval-ms",
                "200",
                "--json",
            ],
            None,
        );
        assert!(ok, "lag failed: {err}");
        let pending: u64 = out
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["pending"]
                    .as_u64()
                    .unwrap()
            })
            .sum();
        assert_eq!(pending, total as u64, "{out}");
    }

    // 3. Tail one aggregate: its versions, in order, nothing consumed.
    let (ok, out, err) = cli(
        &[
            "tail",
            &topic,
            "--aggregate",
            "acct-7",
            "--json",
            "--idle-ms",
            "1500",
        ],
        None,
    );
    assert!(ok, "tail failed: {err}");
    let tailed: Vec<i64> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["envelope"]["event_version"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(tailed, (1..=versions).collect::<Vec<_>>());
    let (ok, out, _) = cli(&["tail", &topic, "--last", "3", "--idle-ms", "1500"], None);
    assert!(ok);
    assert_eq!(out.lines().count(), 3, "{out}");

    // 4. The buggy consumer dead-letters everything.
    let broken = Arc::new(AtomicBool::new(true));
    let checker = Arc::new(OrderChecker::new());
    let sub = consumer(&bus, &topic, broken.clone(), checker.clone()).await;
    wait_for("every event dead-lettered", || {
        sub.health().dead_lettered == total as u64
    })
    .await;

    // 5. List and show the dead letters.
    let (ok, out, err) = cli(&["dlq", "list", &dlq, "--json", "--idle-ms", "1500"], None);
    assert!(ok, "dlq list failed: {err}");
    let listed: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(listed.len(), total);
    assert!(listed.iter().all(|d| d["original_topic"] == topic.as_str()
        && d["error"].as_str().unwrap().contains("amount field renamed")
        && d["replayed"] == false));
    let (ok, table, _) = cli(
        &["dlq", "list", &dlq, "--aggregate", "acct-3", "--idle-ms", "1500"],
        None,
    );
    assert!(ok);
    assert_eq!(
        table.lines().count(),
        1 + versions as usize,
        "header and one row per version:\n{table}"
    );
    let event_id = listed[0]["message"]["envelope"]["event_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (ok, shown, err) = cli(&["dlq", "show", &dlq, &event_id, "--idle-ms", "1500"], None);
    assert!(ok, "dlq show failed: {err}");
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown["message"]["envelope"]["event_id"], event_id.as_str());
    assert_eq!(shown["original_topic"], topic.as_str());
    let (ok, _, err) = cli(&["dlq", "show", &dlq, "no-such-event", "--idle-ms", "1000"], None);
    assert!(!ok && err.contains("no dead letter"), "{err}");

    // 6. Fix the bug; a dry run publishes nothing.
    broken.store(false, Ordering::SeqCst);
    let (ok, out, err) = cli(
        &["dlq", "replay", &dlq, "--dry-run", "--json", "--idle-ms", "1500"],
        None,
    );
    assert!(ok, "dry run failed: {err}");
    let counts: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(counts["replayed"], total as u64, "{out}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(checker.report().received, 0, "a dry run replayed something");

    // 7. Replay, interrupted after 40 %, then run again, then once more.
    let first = (total * 2 / 5).to_string();
    let (ok, out, err) = cli(
        &[
            "dlq",
            "replay",
            &dlq,
            "--limit",
            &first,
            "--json",
            "--idle-ms",
            "1500",
        ],
        None,
    );
    assert!(ok, "replay failed: {err}");
    let counts: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(counts["replayed"], total as u64 * 2 / 5);
    let (ok, out, err) = cli(&["dlq", "replay", &dlq, "--json", "--idle-ms", "1500"], None);
    assert!(ok, "replay re-run failed: {err}");
    let counts: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(counts["already_replayed"], total as u64 * 2 / 5, "{out}");
    assert_eq!(counts["replayed"], total as u64 - total as u64 * 2 / 5, "{out}");
    let (ok, out, _) = cli(&["dlq", "replay", &dlq, "--json", "--idle-ms", "1500"], None);
    assert!(ok);
    let counts: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        (counts["replayed"].as_u64(), counts["already_replayed"].as_u64()),
        (Some(0), Some(total as u64))
    );

    // 8. Every event handled once, each aggregate in order.
    wait_for("every replayed event handled", || {
        checker.report().received >= total as u64
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let report = checker.report();
    assert_eq!(report.received, total as u64, "{report}");
    assert_eq!(report.duplicates, 0, "{report}");
    assert!(report.is_strictly_ordered(), "{report}");
    let (ok, out, _) = cli(&["dlq", "list", &dlq, "--json", "--idle-ms", "1500"], None);
    assert!(ok);
    assert!(out.lines().all(|l| l.contains("\"replayed\":true")));

    // 9. Caught up: nothing pending.
    if lag {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let (ok, out, _) = cli(
                &["lag", &topic, "--group", "billing", "--interval-ms", "200"],
                None,
            );
            assert!(ok);
            let total_row = out
                .lines()
                .find(|l| l.trim_start().starts_with("total"))
                .unwrap()
                .to_owned();
            if total_row.split_whitespace().nth(1) == Some("0") {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "still behind: {out}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    sub.close().await.unwrap();
    bus.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_consumer_is_diagnosed_and_repaired_with_the_cli_on_nats() {
    let server = NatsServer::start().await.unwrap();
    let backend = eventbus_nats::NatsBackend::connect(eventbus_nats::NatsConfig {
        servers: vec![server.url()],
        ..Default::default()
    })
    .await
    .unwrap();
    let bus = EventBus::new(backend, BusConfig::default()).unwrap();
    let url = server.url();
    // 1,000 dead letters over 100 aggregates.
    session(bus, &["--backend", "nats", "--nats-url", &url], 100, 10, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_consumer_is_diagnosed_and_repaired_with_the_cli_on_kafka() {
    let server = TansuServer::start().await.unwrap();
    let mut kafka = eventbus::kafka::KafkaConfig::with_brokers([server.bootstrap()]);
    // tansu 0.6 holds every fetch for the whole wait (KafkaConsumer::fetch_wait_max_ms).
    kafka.consumer.fetch_wait_max_ms = 20;
    let backend = eventbus::kafka::KafkaBackend::connect(kafka).await.unwrap();
    let bus = EventBus::new(backend, BusConfig::default()).unwrap();
    let brokers = server.bootstrap();
    // The CLI's own consumers (tail, dlq) fetch with the same 20 ms.
    let dir = tempfile::tempdir().unwrap();
    let settings = dir.path().join("kafka.toml");
    std::fs::write(&settings, "[consumer]\nfetch_wait_max_ms = 20\n").unwrap();
    let settings = settings.display().to_string();
    // Tansu's log-end offsets are wrong: lag is not checked here (the
    // conformance suite checks it on librdkafka's mock cluster's terms).
    session(
        bus,
        &[
            "--backend",
            "kafka",
            "--kafka-brokers",
            &brokers,
            "--kafka-config",
            &settings,
        ],
        20,
        5,
        false,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_validate_names_what_is_missing_and_ensure_creates_it() {
    let server = NatsServer::start().await.unwrap();
    let url = server.url();
    let dir = tempfile::tempdir().unwrap();
    let toml = dir.path().join("eventbus.toml");
    std::fs::write(
        &toml,
        "[bus]\nclose_timeout_ms = 5000\n\n[nats]\nstreams = [{ name = \"SHOP_ORDERS\", subjects = [\"shop.orders\"] }]\n",
    )
    .unwrap();
    let yaml = dir.path().join("eventbus.yaml");
    std::fs::write(
        &yaml,
        "nats:\n  streams:\n    - name: SHOP_ORDERS\n      subjects: [shop.orders]\n",
    )
    .unwrap();
    let broker = ["--backend", "nats", "--nats-url", url.as_str()];
    let run = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend_from_slice(&broker);
        eventbus(&all, None)
    };
    let toml = toml.to_str().unwrap();
    let yaml = yaml.to_str().unwrap();
    let (ok, _, err) = run(&["topics", "validate", "--config", toml]);
    assert!(
        !ok && err.contains("NotFound") && err.contains("SHOP_ORDERS"),
        "{err}"
    );
    let (ok, out, err) = run(&["topics", "ensure", "--config", toml, "shop.payments"]);
    assert!(ok, "{err}");
    assert!(out.contains("shop.payments: ok"), "{out}");
    let (ok, _, err) = run(&[
        "topics",
        "validate",
        "--config",
        yaml,
        "shop.payments",
        "shop.orders",
    ]);
    assert!(ok, "{err}");
    let (ok, _, err) = run(&["topics", "validate", "--config", yaml, "shop.missing"]);
    assert!(
        !ok && err.contains("NotFound") && err.contains("shop.missing"),
        "{err}"
    );
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[nats]\nno_such_setting = 1\n").unwrap();
    let (ok, _, err) = run(&["topics", "validate", "--config", bad.to_str().unwrap()]);
    assert!(!ok && err.contains("no_such_setting"), "{err}");
}

/// A filtered replay never lets an aggregate's later dead letter overtake an
/// earlier one left behind: `--since` excludes v1, so v2 waits (held back);
/// the unfiltered run then replays v1 before v2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filtered_replay_holds_back_what_would_overtake() {
    let server = NatsServer::start().await.unwrap();
    let url = server.url();
    let backend = eventbus_nats::NatsBackend::connect(eventbus_nats::NatsConfig {
        servers: vec![url.clone()],
        ..Default::default()
    })
    .await
    .unwrap();
    let bus = EventBus::new(backend, BusConfig::default()).unwrap();
    let topic = format!("held-{}", uuid::Uuid::now_v7().simple());
    let dlq = format!("{topic}.dlq");
    let broker = [
        "--backend",
        "nats",
        "--nats-url",
        url.as_str(),
        "--idle-ms",
        "1000",
    ];
    let cli = |args: &[&str], stdin: Option<&str>| {
        let mut all = args.to_vec();
        all.extend_from_slice(&broker);
        eventbus(&all, stdin)
    };
    let input = [("2026-01-01T00:00:00Z", 1), ("2026-01-02T00:00:00Z", 2)]
        .map(|(t, v)| {
            serde_json::json!({"aggregate_id": "acct-1", "event_type": "Charged", "event_version": v,
                "timestamp": t, "payload": {}})
            .to_string()
        })
        .join("\n");
    let (ok, _, err) = eventbus(
        &["publish", &topic, "--backend", "nats", "--nats-url", &url],
        Some(&input),
    );
    assert!(ok, "{err}");
    let broken = Arc::new(AtomicBool::new(true));
    let checker = Arc::new(OrderChecker::new());
    let sub = consumer(&bus, &topic, broken.clone(), checker.clone()).await;
    wait_for("both dead-lettered", || sub.health().dead_lettered == 2).await;
    broken.store(false, Ordering::SeqCst);
    let (ok, out, err) = cli(
        &["dlq", "replay", &dlq, "--since", "2026-01-01T12:00:00Z", "--json"],
        None,
    );
    assert!(ok, "{err}");
    let counts: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        (counts["replayed"].as_u64(), counts["held_back"].as_u64()),
        (Some(0), Some(1)),
        "{out}"
    );
    let (ok, out, err) = cli(&["dlq", "replay", &dlq, "--json"], None);
    assert!(ok, "{err}");
    let counts: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(counts["replayed"], 2, "{out}");
    wait_for("both handled", || checker.report().received == 2).await;
    let report = checker.report();
    assert!(report.is_strictly_ordered(), "{report}");
    sub.close().await.unwrap();
    bus.close().await.unwrap();
}

/// `tail --follow` prints what is stored, then what arrives later, and
/// exits 0 on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_follow_prints_new_events_and_stops_on_sigterm() {
    use std::io::BufRead as _;
    let server = NatsServer::start().await.unwrap();
    let url = server.url();
    let topic = format!("follow-{}", uuid::Uuid::now_v7().simple());
    let broker = ["--backend", "nats", "--nats-url", url.as_str()];
    let publish = |version: i64| {
        let line = serde_json::json!({"aggregate_id": "acct-1", "event_type": "Charged",
            "event_version": version, "payload": {}})
        .to_string();
        let mut args = vec!["publish", topic.as_str()];
        args.extend_from_slice(&broker);
        let (ok, _, err) = eventbus(&args, Some(&line));
        assert!(ok, "{err}");
    };
    publish(1);
    let mut child = Command::new(env!("CARGO_BIN_EXE_eventbus"))
        .args(["tail", &topic, "--follow", "--json", "--idle-ms", "500"])
        .args(broker)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let version = |line: String| -> i64 {
        serde_json::from_str::<serde_json::Value>(&line).unwrap()["envelope"]["event_version"]
            .as_i64()
            .unwrap()
    };
    let first = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the stored event");
    assert_eq!(version(first), 1);
    publish(2);
    let second = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the event published later");
    assert_eq!(version(second), 2);
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let mut status = None;
    for _ in 0..100 {
        status = child.try_wait().unwrap();
        if status.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = status.unwrap_or_else(|| {
        let _ = child.kill();
        panic!("tail --follow did not stop on SIGTERM")
    });
    assert!(status.success(), "{status}");
}
