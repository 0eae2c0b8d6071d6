//! The conformance suite on the memory backend, one test per case.

use eventbus_core::{BusConfig, EventBus, MemoryBackend};
use eventbus_testkit::conformance::Capabilities;

async fn setup() -> (impl eventbus_testkit::conformance::BusFactory, Capabilities) {
    // One in-process broker; each bus is a client of its own, as each
    // process of a group would be.
    let broker = MemoryBackend::default();
    let factory = move |config: BusConfig| {
        let backend = broker.connect();
        async move { EventBus::new(backend, config).unwrap() }
    };
    // Each bus is a client of the shared broker, so a member whose runtime
    // is dropped (a crash) leaves the broker and the group running.
    let caps = Capabilities::all("memory");
    (factory, caps)
}

eventbus_testkit::conformance_tests!(setup);
