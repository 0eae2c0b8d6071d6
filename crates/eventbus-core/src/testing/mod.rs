//! The conformance suite every backend passes, modelled on Watermill's
//! universal pub/sub tests: [`run_suite`] takes a [`BusFactory`] and the
//! backend's [`Capabilities`] and runs every case against it.
//!
//! Each case uses topics and groups of its own (random suffix), so cases can
//! share one broker. Waits are liveness bounds ([`Capabilities::timeout`]),
//! never performance assertions.

mod cases;
mod support;

use std::time::Duration;

use async_trait::async_trait;

use crate::{BusConfig, EventBus};

pub use support::{OrderChecker, OrderReport, envelope, eventually};

/// What a backend can do, so the suite skips what does not apply.
#[derive(Debug, Clone)]
pub struct Capabilities {
    /// The backend's name, for messages.
    pub name: &'static str,
    /// Unacked messages survive their subscriber and go to the next member
    /// of the group (NATS durable consumers, Kafka committed offsets, memory).
    pub persistent: bool,
    /// Raw messages keep their record key end to end.
    pub keys: bool,
    /// Longest wait for any expected delivery or result.
    pub timeout: Duration,
}

impl Capabilities {
    /// Every capability, with a 60 s bound.
    pub fn all(name: &'static str) -> Self {
        Self {
            name,
            persistent: true,
            keys: true,
            timeout: Duration::from_secs(60),
        }
    }
}

/// Makes a fresh [`EventBus`] over the backend under test, with `config`.
/// Buses of one factory talk to the same broker.
#[async_trait]
pub trait BusFactory: Send + Sync {
    /// A new bus.
    async fn bus(&self, config: BusConfig) -> EventBus;
}

#[async_trait]
impl<F, Fut> BusFactory for F
where
    F: Fn(BusConfig) -> Fut + Send + Sync,
    Fut: Future<Output = EventBus> + Send,
{
    async fn bus(&self, config: BusConfig) -> EventBus {
        self(config).await
    }
}

/// One case of the suite.
pub type Case = for<'a> fn(&'a dyn BusFactory, &'a Capabilities) -> futures::future::BoxFuture<'a, ()>;

/// Every case, by name.
pub fn cases() -> Vec<(&'static str, Case)> {
    cases::all()
}

/// Runs every case in turn; panics with the case's name on the first failure.
pub async fn run_suite(factory: &dyn BusFactory, caps: Capabilities) {
    for (name, case) in cases() {
        let started = std::time::Instant::now();
        eprintln!("conformance[{}]: {name} ...", caps.name);
        match tokio::time::timeout(caps.timeout * 3, case(factory, &caps)).await {
            Ok(()) => eprintln!("conformance[{}]: {name} ok ({:?})", caps.name, started.elapsed()),
            Err(_) => panic!(
                "conformance[{}]: {name} did not finish within {:?}",
                caps.name,
                caps.timeout * 3
            ),
        }
    }
}
