//! The event bus's test kit: a dev-dependency, never a dependency of a
//! library.
//!
//! - [`conformance`]: the suite every backend passes, one `#[test]` per case
//!   through [`conformance_tests!`], with capability flags (Watermill's
//!   `TestPubSub` is the model).
//! - [`OrderChecker`]: the one strict per-aggregate order check, used by the
//!   suite, the backends' fault tests and the bench.
//! - [`server`]: throwaway local servers (nats-server, tansu, PostgreSQL,
//!   an S3-compatible store) behind one spawn / wait / kill-on-drop helper.
//! - [`outbox`]: the outbox store suite, run over SQLite and PostgreSQL.
//! - [`envelope`], [`eventually`], [`unique`]: small helpers.

pub mod conformance;
pub mod metrics_capture;
mod order;
pub mod otel;
pub mod outbox;
pub mod server;
mod support;
pub mod tls;

pub use order::{Attempt, OrderChecker, OrderReport};
pub use support::{HeldHandler, envelope, eventually, unique};
