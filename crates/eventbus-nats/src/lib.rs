//! NATS JetStream backend of the event bus, over `async-nats`.
//!
//! ```no_run
//! # async fn run() -> eventbus_core::Result<()> {
//! use eventbus_nats::{NatsBackend, NatsConfig};
//! let backend = NatsBackend::connect(NatsConfig::with_servers(["nats://127.0.0.1:4222"])).await?;
//! let bus = eventbus_core::EventBus::new(backend, eventbus_core::BusConfig::default())?;
//! # bus.close().await }
//! ```

mod backend;
mod config;
mod connect;
mod group;
mod topology;

pub use backend::{MSG_ID_HEADER, NatsBackend};
pub use config::{
    Discard, NatsAuth, NatsConfig, NatsConsumer, NatsReconnect, NatsTls, Retention, Storage, StreamSpec,
};
pub use connect::ConnectionEvent;
/// The provisioning strategy, shared by every backend (re-exported from `eventbus-core`).
pub use eventbus_core::ProvisionStrategy;
