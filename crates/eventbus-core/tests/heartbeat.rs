//! The end-to-end heartbeat on the memory backend: beats come back, no
//! alert; invalid settings are refused. (The alert with a broker stopped
//! is `eventbus-nats/tests/heartbeat.rs`.)

use std::time::Duration;

use eventbus_core::heartbeat::HeartbeatConfig;
use eventbus_core::{ErrorKind, EventBus};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beats_come_back_and_settings_are_checked() {
    let bus = EventBus::memory();
    assert!(bus.health().heartbeat.is_none());
    for bad in [
        HeartbeatConfig {
            interval_ms: 0,
            ..Default::default()
        },
        HeartbeatConfig {
            interval_ms: 500,
            timeout_ms: 500,
            ..Default::default()
        },
        HeartbeatConfig {
            topic: "bad topic".into(),
            ..Default::default()
        },
    ] {
        assert_eq!(
            bus.start_heartbeat(bad).await.unwrap_err().kind(),
            ErrorKind::Validation
        );
    }
    let config = HeartbeatConfig {
        topic: "heartbeat.memory".into(),
        interval_ms: 50,
        timeout_ms: 500,
    };
    bus.start_heartbeat(config).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let h = bus.health().heartbeat.unwrap();
        if h.received >= 5 {
            assert!(!h.alert, "{h:?}");
            assert!(h.sent >= 5 && h.failed == 0, "{h:?}");
            assert!(h.last_round_trip_ms.is_some());
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "beats did not come back: {h:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(bus.health().is_ready());
    bus.close().await.unwrap();
}
