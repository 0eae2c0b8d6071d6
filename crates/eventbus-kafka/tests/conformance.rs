//! The conformance suite against a real Kafka-protocol broker (tansu), one
//! test (and one broker) per case.

use std::sync::Arc;

use eventbus_core::{BusConfig, EventBus};
use eventbus_kafka::{KafkaBackend, KafkaConfig};
use eventbus_testkit::conformance::{BusFactory, Capabilities};
use eventbus_testkit::server::TansuServer;

async fn setup() -> (impl BusFactory, Capabilities) {
    let broker = Arc::new(
        TansuServer::start()
            .await
            .expect("tansu (scripts/install-test-deps installs it)"),
    );
    let factory = move |config: BusConfig| {
        let broker = broker.clone();
        async move {
            let mut kafka = KafkaConfig::with_brokers([broker.bootstrap()]);
            // tansu 0.6 holds every fetch for the whole wait (KafkaConsumer::fetch_wait_max_ms).
            kafka.consumer.fetch_wait_max_ms = 20;
            let backend = KafkaBackend::connect(kafka).await.unwrap();
            EventBus::new(backend, config).unwrap()
        }
    };
    // Tansu's log-end offsets by ListOffsets are wrong (INFRA.md): the group
    // lag case runs against librdkafka's mock cluster in tests/kafka.rs
    // instead. A member's lag takes them from its fetch responses: tested here.
    let caps = Capabilities {
        group_lag: false,
        ..Capabilities::all("kafka")
    };
    (factory, caps)
}

eventbus_testkit::conformance_tests!(setup);
