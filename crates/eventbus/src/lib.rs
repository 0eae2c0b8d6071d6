//! Event bus for event-driven microservices: one async API over Kafka, NATS
//! JetStream and an in-process memory backend (features `nats`, `kafka`).
//!
//! With both backend features on, this page is the project's README, whose
//! Rust examples compile as doc tests.
#![cfg_attr(all(feature = "nats", feature = "kafka"), doc = include_str!("../../../README.md"))]

pub use eventbus_core::*;

/// The NATS JetStream backend (feature `nats`).
#[cfg(feature = "nats")]
pub use eventbus_nats as nats;

/// The Kafka backend (feature `kafka`).
#[cfg(feature = "kafka")]
pub use eventbus_kafka as kafka;
