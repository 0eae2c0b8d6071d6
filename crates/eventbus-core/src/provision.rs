//! [`ProvisionStrategy`]: what a backend does with the streams or topics its
//! configuration declares, at connect. One type for every backend.

use serde::{Deserialize, Serialize};

/// What a backend does at connect with the destinations (NATS streams, Kafka
/// topics) its configuration declares. In configuration files:
/// `provision = "create_or_update"` (snake case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ProvisionStrategy {
    /// Create missing destinations; leave existing ones as they are.
    CreateOnly,
    /// Create missing destinations and update existing ones to the
    /// configuration (NATS: stream settings; Kafka: topic configs, and
    /// partitions grown, never shrunk).
    #[default]
    CreateOrUpdate,
    /// Change nothing; connect fails with `NotFound` when a destination is
    /// missing and `Conflict` when it differs from the configuration (Kafka:
    /// fewer partitions than configured).
    ValidateOnly,
    /// Change and check nothing (destinations are managed elsewhere).
    Skip,
}
