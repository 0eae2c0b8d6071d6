//! Kafka backend of the event bus, over `rdkafka` (bundled librdkafka 2.12).
//!
//! ```no_run
//! # async fn run() -> eventbus_core::Result<()> {
//! use eventbus_kafka::{KafkaBackend, KafkaConfig};
//! let backend = KafkaBackend::connect(KafkaConfig::with_brokers(["127.0.0.1:9092"])).await?;
//! let bus = eventbus_core::EventBus::new(backend, eventbus_core::BusConfig::default())?;
//! # bus.close().await }
//! ```

mod backend;
mod config;
mod consumer;
mod offsets;
mod topics;

pub use backend::KafkaBackend;
pub use config::{
    Compression, KafkaConfig, KafkaConsumer, KafkaProducer, KafkaSecurity, Partitioner, SaslMechanism,
    SecurityProtocol, TopicSpec,
};
/// The provisioning strategy, shared by every backend (re-exported from `eventbus-core`).
pub use eventbus_core::ProvisionStrategy;
