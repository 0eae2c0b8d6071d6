//! [`BusConfig`]: every setting of the bus, its defaults in one place, and
//! loading from TOML or YAML files with environment overrides.
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `publish.max_in_flight` | the backend's: 4,096; Kafka 20,000 | publishes accepted but not yet acknowledged |
//! | `publish.timeout_ms` | 5,000 | longest wait for room in the in-flight window or for the backend to accept |
//! | `publish.ack_timeout_ms` | 30,000 | longest wait for a broker ACK; then the result is a `Timeout` error |
//! | `results.enabled` | false | keep a lossless stream of publish results |
//! | `results.capacity` | 10,000 | results buffered before publishers wait |
//! | `consumer.concurrency` | 256 | handlers running at once, across all subscriptions |
//! | `consumer.max_in_flight` | 10,000 | messages fetched but not yet settled, per subscription; then its fetching waits |
//! | `consumer.handler_timeout_ms` | none | longest handler attempt; then it counts as failed (and is retried) |
//! | `consumer.retry` | 3 attempts, 100 ms × 2 up to 10 s, 20 % jitter | see [`RetryPolicy`] |
//! | `consumer.dedup_window` | 10,000 | event ids an envelope subscription remembers settling; a repeat is acked without a handler call |
//! | `consumer.lag_alert_messages` | 1,000 | lag (count) that raises `lag_alert` |
//! | `consumer.lag_alert_age_ms` | 300,000 | age of the oldest fetched-and-unsettled event that raises `lag_alert` |
//! | `consumer.dead_letter` | `{ suffix = ".dlq" }` | where exhausted messages go: `{ suffix = S }` (topic + S), `{ topic = T }`, or `"disabled"` (the aggregate parks) |
//! | `close_timeout_ms` | 10,000 | longest wait in `close()` for handlers and publishes |
//! | `memory.max_messages_per_topic` | 100,000 | memory backend: retained messages per topic |
//!
//! Environment overrides use the prefix `EVENTBUS_` and `__` between levels:
//! `EVENTBUS_CONSUMER__CONCURRENCY=64`.

use std::path::Path;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml, Yaml};
use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};
use crate::retry::RetryPolicy;

/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "EVENTBUS_";

/// All settings of an [`EventBus`](crate::EventBus). See the module docs for defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BusConfig {
    /// Publishing.
    pub publish: PublishConfig,
    /// The publish-results stream.
    pub results: ResultsConfig,
    /// Consuming: executor limits, retries, dead letters.
    pub consumer: ConsumerConfig,
    /// Longest wait in `close()` for in-flight handlers and publishes, in ms.
    pub close_timeout_ms: u64,
    /// The memory backend.
    pub memory: MemoryConfig,
}

/// Publishing settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PublishConfig {
    /// Publishes accepted but not yet acknowledged, per bus (count).
    /// `None` (default): the backend's [`publish_window`](crate::Backend::publish_window),
    /// 4,096 on memory and NATS, 20,000 on Kafka.
    pub max_in_flight: Option<usize>,
    /// Longest wait for room in the window and for the backend to accept, in ms.
    pub timeout_ms: u64,
    /// Longest wait for the broker's ACK, in ms, counted from the moment
    /// the backend accepted the message (stage one returned). An ACK that
    /// has arrived is never turned into a timeout, however late it is read.
    pub ack_timeout_ms: u64,
    /// How envelopes write `tenant_id`: `integer` (default, as the Go SDK
    /// does) or `string` for consumers on Go SDK releases from late October
    /// 2025 to February 2026, which read only the string form.
    pub tenant_id_format: crate::TenantIdFormat,
}

/// Publish-results stream settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResultsConfig {
    /// Whether envelope publishes report to [`EventBus::results`](crate::EventBus::results).
    pub enabled: bool,
    /// Results buffered per stream before publishers wait (count).
    pub capacity: usize,
}

/// Consumer settings shared by all subscriptions of a bus.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsumerConfig {
    /// Handlers running at once (count).
    pub concurrency: usize,
    /// Messages fetched and not yet settled, per subscription, before its
    /// fetch loop waits (count). Per subscription, so a parked or slow
    /// aggregate on one topic never stops another subscription.
    pub max_in_flight: usize,
    /// Longest handler attempt, in ms; a longer one is cancelled and counts
    /// as a failed attempt. `None` (default): no limit. Set it below Kafka's
    /// `consumer.revoke_timeout_ms` so a rebalance never waits on a handler.
    pub handler_timeout_ms: Option<u64>,
    /// Default retry policy of subscriptions.
    pub retry: RetryPolicy,
    /// Where exhausted messages go by default. Default `<topic>.dlq`.
    pub dead_letter: crate::dead_letter::DeadLetterPolicy,
    /// Event ids each envelope subscription remembers having handled, the
    /// most recent ones (count; 0 turns it off). A delivery of one of them
    /// again (the broker redelivers what it had not recorded as acked after
    /// a broker crash or a rebalance, or a producer published it twice) is
    /// acked without calling the handler, so a member never goes back to
    /// versions it already handled. Event ids must be unique per event (the
    /// envelope's rule); dead-lettered ids are not remembered, so a redriven
    /// dead letter is handled. A replay longer than the window (on Kafka, a
    /// parked aggregate can hold the committed offset back past it) is
    /// handled again. Across processes, use the inbox. Default 10,000.
    pub dedup_window: usize,
    /// Lag (count) at which a subscription's health raises
    /// [`lag_alert`](crate::SubscriptionHealth::lag_alert); 0 turns it off.
    /// Default 1,000, the original SDK's backlog threshold.
    pub lag_alert_messages: u64,
    /// Age (ms) of the oldest fetched-and-unsettled event, by its envelope
    /// timestamp, at which a subscription's health raises
    /// [`lag_alert`](crate::SubscriptionHealth::lag_alert); 0 turns it off.
    /// Default 300,000 (5 minutes), the original SDK's lag-time threshold.
    pub lag_alert_age_ms: u64,
}

/// Memory backend settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MemoryConfig {
    /// Messages kept per topic until every group has acked them (count);
    /// publishers wait when it is reached.
    pub max_messages_per_topic: usize,
    /// Partitions of every topic (count, at least 1). Default 8. An
    /// aggregate's events go to partition
    /// [`partition_for`](crate::partition_for)`(aggregate id, partitions)`;
    /// the members of a group split the partitions evenly, so up to this
    /// many members of one group share a topic, each aggregate with one
    /// member at a time.
    pub partitions: u32,
    /// Messages of one partition taken by its member and not yet settled
    /// (count): past it the partition waits while the member's others flow,
    /// so a parked aggregate holds back only its partition (as Kafka's
    /// `max_in_flight_per_partition`). Default 1,000.
    pub max_in_flight_per_partition: usize,
    /// Largest message (payload plus headers and key), in bytes; a larger
    /// one is refused at publish with a `Validation` error on `payload`, as
    /// a broker refuses it (NATS `max_payload` defaults to 1 MiB). Default
    /// 1,048,576.
    pub max_message_bytes: usize,
}

impl Default for BusConfig {
    fn default() -> Self {
        Self {
            publish: PublishConfig::default(),
            results: ResultsConfig::default(),
            consumer: ConsumerConfig::default(),
            close_timeout_ms: 10_000,
            memory: MemoryConfig::default(),
        }
    }
}

impl Default for PublishConfig {
    fn default() -> Self {
        Self {
            max_in_flight: None,
            timeout_ms: 5_000,
            ack_timeout_ms: 30_000,
            tenant_id_format: crate::TenantIdFormat::Integer,
        }
    }
}

impl Default for ResultsConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            capacity: 10_000,
        }
    }
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        Self {
            concurrency: 256,
            max_in_flight: 10_000,
            handler_timeout_ms: None,
            retry: RetryPolicy::default(),
            dead_letter: crate::dead_letter::DeadLetterPolicy::default(),
            dedup_window: 10_000,
            lag_alert_messages: 1_000,
            lag_alert_age_ms: 300_000,
        }
    }
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            max_messages_per_topic: 100_000,
            partitions: 8,
            max_in_flight_per_partition: 1_000,
            max_message_bytes: 1 << 20,
        }
    }
}

impl BusConfig {
    /// Defaults, then `path` (TOML for `.toml`, YAML for `.yaml`/`.yml`), then
    /// `EVENTBUS_*` environment variables.
    ///
    /// # Errors
    /// [`Config`](ErrorKind::Config) when the file is missing, of another
    /// extension, or holds unknown keys or wrong types.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let figment = Figment::from(Serialized::defaults(Self::default()));
        let figment = match path.extension().and_then(|e| e.to_str()) {
            Some("toml") => figment.merge(Toml::file_exact(path)),
            Some("yaml" | "yml") => figment.merge(Yaml::file_exact(path)),
            _ => {
                return Err(Error::config(format!(
                    "{}: expected .toml, .yaml or .yml",
                    path.display()
                )));
            }
        };
        Self::extract(figment.merge(Self::env()))
    }

    /// The `EVENTBUS_*` environment variables that set bus settings:
    /// `EVENTBUS_<SECTION>__<KEY>` (for example
    /// `EVENTBUS_CONSUMER__RETRY__MAX_ATTEMPTS=5`) and
    /// `EVENTBUS_CLOSE_TIMEOUT_MS`. Other `EVENTBUS_*` variables (the CLI's
    /// `EVENTBUS_NATS_URL`, `EVENTBUS_DATABASE_URL`, ...) are not bus
    /// settings and are left out, rather than refused as unknown keys.
    pub fn env() -> Env {
        const TOP: [&str; 5] = ["publish", "results", "consumer", "close_timeout_ms", "memory"];
        Env::prefixed(ENV_PREFIX)
            .filter(|key| {
                let key = key.as_str().to_ascii_lowercase();
                TOP.iter()
                    .any(|top| key == *top || key.starts_with(&format!("{top}__")))
            })
            .split("__")
    }

    /// Defaults overridden by `EVENTBUS_*` environment variables.
    ///
    /// # Errors
    /// [`Config`](ErrorKind::Config) when a variable has the wrong type.
    pub fn from_env() -> Result<Self> {
        Self::extract(Figment::from(Serialized::defaults(Self::default())).merge(Self::env()))
    }

    fn extract(figment: Figment) -> Result<Self> {
        let config: Self = figment
            .extract()
            .map_err(|e| Error::new(ErrorKind::Config, "cannot load configuration").with_source(e))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks limits are usable.
    ///
    /// # Errors
    /// [`Config`](ErrorKind::Config) naming the zero limit.
    pub fn validate(&self) -> Result<()> {
        let zero = [
            ("publish.max_in_flight", self.publish.max_in_flight.unwrap_or(1)),
            ("results.capacity", self.results.capacity),
            ("consumer.concurrency", self.consumer.concurrency),
            ("consumer.max_in_flight", self.consumer.max_in_flight),
            (
                "consumer.retry.max_attempts",
                self.consumer.retry.max_attempts as usize,
            ),
            (
                "memory.max_messages_per_topic",
                self.memory.max_messages_per_topic,
            ),
        ];
        match zero.iter().find(|(_, v)| *v == 0) {
            Some((name, _)) => Err(Error::config(format!("{name} must be greater than 0"))),
            None => Ok(()),
        }
    }

    pub(crate) fn close_timeout(&self) -> Duration {
        Duration::from_millis(self.close_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let c = BusConfig::default();
        c.validate().unwrap();
        assert_eq!(c.close_timeout_ms, 10_000);
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's closure must return figment::Error
    fn loads_toml_and_yaml_with_env_override() {
        let dir = tempfile::tempdir().unwrap();
        let toml = dir.path().join("bus.toml");
        std::fs::write(
            &toml,
            "[consumer]\nconcurrency = 8\n[consumer.retry]\nmax_attempts = 5\n",
        )
        .unwrap();
        // In a jail too: jails run one at a time, so another test's
        // variables are not set meanwhile.
        figment::Jail::expect_with(|_| {
            let c = BusConfig::from_file(&toml).unwrap();
            assert_eq!(c.consumer.concurrency, 8);
            assert_eq!(c.consumer.retry.max_attempts, 5);
            assert_eq!(c.publish.max_in_flight, None);
            Ok(())
        });

        let yaml = dir.path().join("bus.yaml");
        std::fs::write(&yaml, "publish:\n  max_in_flight: 7\n").unwrap();
        figment::Jail::expect_with(|jail| {
            jail.set_env("EVENTBUS_PUBLISH__TIMEOUT_MS", "42");
            let c = BusConfig::from_file(&yaml).unwrap();
            assert_eq!(c.publish.max_in_flight, Some(7));
            assert_eq!(c.publish.timeout_ms, 42);
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's closure must return figment::Error
    fn other_eventbus_variables_are_not_bus_settings() {
        figment::Jail::expect_with(|jail| {
            // The CLI's variables share the prefix; they are not unknown bus keys.
            jail.set_env("EVENTBUS_NATS_URL", "nats://127.0.0.1:4222");
            jail.set_env("EVENTBUS_DATABASE_URL", "sqlite://x.db");
            jail.set_env("EVENTBUS_CONSUMER__CONCURRENCY", "12");
            jail.set_env("EVENTBUS_CLOSE_TIMEOUT_MS", "1234");
            let c = BusConfig::from_env().unwrap();
            assert_eq!(c.consumer.concurrency, 12);
            assert_eq!(c.close_timeout_ms, 1234);
            jail.set_env("EVENTBUS_CONSUMER__NO_SUCH_KEY", "1");
            assert!(
                BusConfig::from_env().is_err(),
                "an unknown key of a bus section is still refused"
            );
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's closure must return figment::Error
    fn unknown_keys_and_zero_limits_are_config_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.toml");
        // In a jail: no other test's EVENTBUS_* variables meanwhile.
        figment::Jail::expect_with(|_| {
            std::fs::write(&p, "[consumer]\nconcurency = 8\n").unwrap();
            assert_eq!(BusConfig::from_file(&p).unwrap_err().kind(), ErrorKind::Config);
            std::fs::write(&p, "[consumer]\nconcurrency = 0\n").unwrap();
            let e = BusConfig::from_file(&p).unwrap_err();
            assert!(e.to_string().contains("consumer.concurrency"), "{e}");
            Ok(())
        });
    }
}
