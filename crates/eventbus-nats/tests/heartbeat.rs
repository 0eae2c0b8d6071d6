//! The end-to-end heartbeat against a real nats-server: beats come back;
//! the server killed, the alert is raised (readiness false) within the
//! timeout; the server back, beats come back and the alert clears.

use std::time::Duration;

use eventbus_core::heartbeat::{HeartbeatConfig, HeartbeatHealth};
use eventbus_core::{BusConfig, EventBus};
use eventbus_nats::{NatsBackend, NatsConfig};
use eventbus_testkit::server::NatsServer;

async fn until(bus: &EventBus, what: &str, limit: Duration, done: impl Fn(&HeartbeatHealth) -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let h = bus.health().heartbeat.expect("started");
        if done(&h) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: {h:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_heartbeat_alerts_while_the_server_is_down_and_clears_after() {
    let mut server = NatsServer::start().await.unwrap();
    let backend = NatsBackend::connect(NatsConfig {
        servers: vec![server.url()],
        ..Default::default()
    })
    .await
    .unwrap();
    let bus = EventBus::new(backend, BusConfig::default()).unwrap();
    bus.start_heartbeat(HeartbeatConfig {
        topic: "heartbeat.nats".into(),
        interval_ms: 200,
        timeout_ms: 1_500,
    })
    .await
    .unwrap();
    until(&bus, "beats come back", Duration::from_secs(10), |h| {
        h.received >= 3 && !h.alert
    })
    .await;
    assert!(bus.health().is_ready());

    server.kill();
    until(&bus, "the alert is raised", Duration::from_secs(10), |h| h.alert).await;
    assert!(!bus.health().is_ready());

    server.restart().await.unwrap();
    let received = bus.health().heartbeat.unwrap().received;
    until(
        &bus,
        "beats come back after the restart",
        Duration::from_secs(60),
        |h| h.received > received && !h.alert,
    )
    .await;
    bus.close().await.unwrap();
}
