//! The conformance suite on the memory backend, one test per case.

use eventbus_core::testing::Capabilities;
use eventbus_core::{BusConfig, EventBus};

async fn setup() -> (impl eventbus_core::testing::BusFactory, Capabilities) {
    let factory = |config: BusConfig| async move { EventBus::memory_with(config).unwrap() };
    (factory, Capabilities::all("memory"))
}

eventbus_core::conformance_tests!(setup);
