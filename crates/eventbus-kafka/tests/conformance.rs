//! The conformance suite against a real Kafka-protocol broker (tansu).

use eventbus_core::testing::{Capabilities, run_suite};
use eventbus_core::{BusConfig, EventBus};
use eventbus_kafka::{KafkaBackend, KafkaConfig, TansuServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_backend_passes_the_conformance_suite() {
    let broker = TansuServer::start()
        .await
        .expect("tansu (scripts/install-test-deps installs it)");
    let bootstrap = broker.bootstrap();
    let factory = move |config: BusConfig| {
        let bootstrap = bootstrap.clone();
        async move {
            let backend = KafkaBackend::connect(KafkaConfig::with_brokers([bootstrap]))
                .await
                .unwrap();
            EventBus::new(backend, config).unwrap()
        }
    };
    run_suite(&factory, Capabilities::all("kafka")).await;
}
