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

/// Prometheus exposition of the bus's metrics (feature `prometheus`), through
/// `metrics-exporter-prometheus`.
#[cfg(feature = "prometheus")]
pub mod prometheus {
    pub use metrics_exporter_prometheus::PrometheusHandle;

    /// Installs a Prometheus recorder as this process's `metrics` recorder
    /// and describes every metric of [`telemetry`](crate::telemetry) (with
    /// `# HELP` and units). Serve [`PrometheusHandle::render`] on your
    /// `/metrics` endpoint.
    ///
    /// # Errors
    /// [`Config`](crate::ErrorKind::Config) when a recorder is already installed.
    pub fn install() -> crate::Result<PrometheusHandle> {
        let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
            .install_recorder()
            .map_err(|e| crate::Error::config("cannot install the Prometheus recorder").with_source(e))?;
        crate::telemetry::describe_again();
        Ok(handle)
    }
}
