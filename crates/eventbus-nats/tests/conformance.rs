//! The conformance suite against a real nats-server, one test (and one
//! server) per case. Consumers use a 1 s `ack_wait`, so every case also runs
//! under a redelivery deadline shorter than its slow handlers and queues.

use std::sync::Arc;

use eventbus_core::{BusConfig, EventBus};
use eventbus_nats::{NatsBackend, NatsConfig};
use eventbus_testkit::conformance::{BusFactory, Capabilities};
use eventbus_testkit::server::NatsServer;

async fn setup() -> (impl BusFactory, Capabilities) {
    let server = Arc::new(
        NatsServer::start()
            .await
            .expect("nats-server (scripts/install-test-deps installs it)"),
    );
    let factory = move |config: BusConfig| {
        let server = server.clone();
        async move {
            let mut nats = NatsConfig::with_servers([server.url()]);
            nats.consumer.ack_wait_ms = 1_000;
            let backend = NatsBackend::connect(nats).await.unwrap();
            EventBus::new(backend, config).unwrap()
        }
    };
    let caps = Capabilities {
        keys: false, // NATS messages have no record key
        ..Capabilities::all("nats")
    };
    (factory, caps)
}

eventbus_testkit::conformance_tests!(setup);
