//! The conformance suite on the memory backend, one test per case.

use eventbus_core::{BusConfig, EventBus};
use eventbus_testkit::conformance::Capabilities;

async fn setup() -> (impl eventbus_testkit::conformance::BusFactory, Capabilities) {
    let factory = |config: BusConfig| async move { EventBus::memory_with(config).unwrap() };
    // A member's crash is its process's crash, which takes the in-process broker with it.
    let caps = Capabilities {
        restartable: false,
        ..Capabilities::all("memory")
    };
    (factory, caps)
}

eventbus_testkit::conformance_tests!(setup);
