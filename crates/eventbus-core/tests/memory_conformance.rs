//! The conformance suite on the memory backend.

use eventbus_core::testing::{Capabilities, run_suite};
use eventbus_core::{BusConfig, EventBus};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_backend_passes_the_conformance_suite() {
    let factory = |config: BusConfig| async move { EventBus::memory_with(config).unwrap() };
    run_suite(&factory, Capabilities::all("memory")).await;
}
