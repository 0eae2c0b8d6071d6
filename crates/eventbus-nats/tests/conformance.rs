//! The conformance suite against a real nats-server, one test (and one
//! server) per case. Consumers use a 1 s `ack_wait`, so every case also runs
//! under a redelivery deadline shorter than its slow handlers and queues.

use std::sync::Arc;

use eventbus_core::{BusConfig, EventBus};
use eventbus_nats::{NatsBackend, NatsConfig};
use eventbus_testkit::conformance::{BusFactory, Capabilities};
use eventbus_testkit::server::NatsServer;

async fn start(partitions: Option<u32>) -> (impl BusFactory, Capabilities) {
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
            nats.consumer.lease_ms = 2_000;
            if let Some(p) = partitions {
                nats.partitions.insert(">".into(), p);
            }
            let backend = NatsBackend::connect(nats).await.unwrap();
            EventBus::new(backend, config).unwrap()
        }
    };
    let caps = Capabilities {
        keys: false, // NATS messages have no record key
        // Unpartitioned: one member consumes, the others stand by.
        shares_groups: partitions.is_some(),
        ..Capabilities::all(if partitions.is_some() {
            "nats-partitioned"
        } else {
            "nats"
        })
    };
    (factory, caps)
}

/// Every topic unpartitioned: one durable consumer per group, one active member.
async fn setup() -> (impl BusFactory, Capabilities) {
    start(None).await
}

eventbus_testkit::conformance_tests!(setup);

/// Every topic in 4 partitions shared by the members of a group.
mod partitioned {
    use super::*;

    async fn setup() -> (impl BusFactory, Capabilities) {
        start(Some(4)).await
    }

    eventbus_testkit::conformance_tests!(setup);
}
