//! Core of the event bus: the domain-event [`Envelope`], the [`EventBus`] API
//! that drives every backend, the ordered executor behind envelope
//! subscriptions and the in-process [`MemoryBackend`]. The conformance suite
//! every backend passes is in the `eventbus-testkit` crate.
//!
//! Backends live in their own crates (`eventbus-nats`, ...) and implement
//! [`Backend`]; users reach everything through the `eventbus` facade crate.

mod backend;
mod bus;
#[cfg(feature = "cloudevents")]
pub mod cloud_events;
pub mod codec;
mod config;
mod consume;
pub mod dead_letter;
mod envelope;
mod error;
pub mod headers;
mod health;
pub mod heartbeat;
pub mod layer;
mod memory;
mod message;
mod partition;
mod provision;
mod publish;
mod retry;
mod secret;
pub mod telemetry;
pub mod trace;

pub use backend::{
    AckFuture, Backend, BackendSubscription, BrowsedMessage, LagProbe, MeasuredLag, PartitionLag,
    SubscribeSpec,
};
/// The date-time crate of [`Envelope::timestamp`], so users build
/// timestamps without depending on it themselves.
pub use chrono;
/// The type of [`Envelope::timestamp`]: an instant with the sender's zone offset.
pub type Timestamp = chrono::DateTime<chrono::FixedOffset>;
pub use bus::{EventBus, EventBusBuilder, MAX_TOPIC_LEN, validate_topic};
pub use config::{BusConfig, ConsumerConfig, ENV_PREFIX, MemoryConfig, PublishConfig, ResultsConfig};
pub use consume::subscription::{SubscribeOptions, Subscription};
pub use dead_letter::DeadLetterPolicy;
pub use envelope::{
    Envelope, EnvelopeBuilder, MAX_AGGREGATE_ID_LEN, MAX_EVENT_ID_LEN, Payload, TenantIdFormat, new_event_id,
    validate_aggregate_id,
};
pub use error::{BoxError, Error, ErrorKind, Result, ValidationError};
pub use headers::Headers;
pub use health::{ConnectionState, Health, SubscriptionHealth};
pub use memory::MemoryBackend;
pub use message::{Ack, Acker, Delivery, Message, Ownership, Position, lease_clock};
pub use partition::{GroupAssignment, fair_share, partition_for};
pub use provision::ProvisionStrategy;
pub use publish::{PublishHandle, PublishResult, PublishResults};
pub use retry::RetryPolicy;
pub use secret::{REDACTED, Secret, redact_url};
