//! The conformance suite against a real nats-server.

use eventbus_core::testing::{Capabilities, run_suite};
use eventbus_core::{BusConfig, EventBus};
use eventbus_nats::{NatsBackend, NatsConfig, NatsServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_backend_passes_the_conformance_suite() {
    let server = NatsServer::start()
        .await
        .expect("nats-server (scripts/install-test-deps installs it)");
    let url = server.url();
    let factory = move |config: BusConfig| {
        let url = url.clone();
        async move {
            let backend = NatsBackend::connect(NatsConfig::with_servers([url]))
                .await
                .unwrap();
            EventBus::new(backend, config).unwrap()
        }
    };
    let caps = Capabilities {
        keys: false, // NATS messages have no record key
        ..Capabilities::all("nats")
    };
    run_suite(&factory, caps).await;
}
