#![doc = include_str!("../../../README.md")]
#![warn(missing_docs, unreachable_pub)]

pub use eventbus_core::*;

/// The NATS JetStream backend (feature `nats`).
#[cfg(feature = "nats")]
pub use eventbus_nats as nats;

/// The Kafka backend (feature `kafka`).
#[cfg(feature = "kafka")]
pub use eventbus_kafka as kafka;
