//! [`KafkaConfig`]: brokers, security, producer, consumer and topic settings.

use std::collections::BTreeMap;

use eventbus_core::ProvisionStrategy;
use eventbus_core::Secret;
use serde::{Deserialize, Serialize};

/// Settings of the Kafka backend; every field has a default.
///
/// `Debug` and `Serialize` never show a secret: [`Secret`]s come out as
/// `***`, and so do the values of [`extra`](KafkaConfig::extra) properties
/// whose name holds `password`, `secret`, `token`, `jaas` or `.pem`.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap brokers, `host:port`. Default `["127.0.0.1:9092"]`.
    pub brokers: Vec<String>,
    /// librdkafka `client.id`. Default `eventbus`.
    pub client_id: String,
    /// TLS and SASL, passed through to librdkafka.
    pub security: KafkaSecurity,
    /// Producer settings.
    pub producer: KafkaProducer,
    /// Consumer settings.
    pub consumer: KafkaConsumer,
    /// Topics to provision at connect.
    pub topics: Vec<TopicSpec>,
    /// Settings of topics created on first use (publish or subscribe) when
    /// [`auto_create_topics`](KafkaConfig::auto_create_topics) is on.
    pub default_topic: TopicSpec,
    /// Create unknown topics on first use with [`default_topic`](KafkaConfig::default_topic). Default true.
    pub auto_create_topics: bool,
    /// What to do with [`topics`](KafkaConfig::topics) at connect.
    pub provision: ProvisionStrategy,
    /// Further librdkafka properties, set last (they win).
    #[serde(serialize_with = "redacted_extra")]
    pub extra: BTreeMap<String, String>,
    /// Longest wait at connect for a broker to answer a metadata request,
    /// in ms: no answer is a `Connection` error, refused credentials an
    /// `Auth` error, so a misconfigured service fails at start instead of
    /// at its first publish. 0 skips the check: connect then succeeds with
    /// no broker up, and publishes wait in the producer queue until one
    /// answers or `producer.delivery_timeout_ms` passes. Default 10,000.
    pub connect_timeout_ms: u64,
}

/// Whether librdkafka property `name` holds a secret.
fn is_secret_property(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    [
        "password",
        "passphrase",
        "secret",
        "token",
        "jaas",
        ".pem",
        "credential",
    ]
    .iter()
    .any(|s| name.contains(s))
}

/// The error of creating a librdkafka client: a refused property is named
/// with its value hidden when it is a secret (rdkafka's own error prints
/// the value), other errors keep their source.
pub(crate) fn creation_error(what: &'static str, e: rdkafka::error::KafkaError) -> eventbus_core::Error {
    match e {
        rdkafka::error::KafkaError::ClientConfig(_, desc, key, value) => {
            let (desc, value) = match is_secret_property(&key) {
                true => (
                    desc.replace(&value, eventbus_core::REDACTED),
                    eventbus_core::REDACTED.to_owned(),
                ),
                false => (desc, value),
            };
            eventbus_core::Error::config(format!("{what}: librdkafka refused {key} = {value}: {desc}"))
        }
        other => eventbus_core::Error::config(what).with_source(other),
    }
}

fn redacted(extra: &BTreeMap<String, String>) -> BTreeMap<&str, &str> {
    extra
        .iter()
        .map(|(k, v)| {
            let v = if is_secret_property(k) {
                eventbus_core::REDACTED
            } else {
                v.as_str()
            };
            (k.as_str(), v)
        })
        .collect()
}

fn redacted_extra<S: serde::Serializer>(extra: &BTreeMap<String, String>, s: S) -> Result<S::Ok, S::Error> {
    redacted(extra).serialize(s)
}

impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("client_id", &self.client_id)
            .field("security", &self.security)
            .field("producer", &self.producer)
            .field("consumer", &self.consumer)
            .field("topics", &self.topics)
            .field("default_topic", &self.default_topic)
            .field("auto_create_topics", &self.auto_create_topics)
            .field("provision", &self.provision)
            .field("extra", &redacted(&self.extra))
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .finish()
    }
}

/// Security protocol (librdkafka `security.protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SecurityProtocol {
    /// No TLS, no SASL.
    #[default]
    Plaintext,
    /// TLS.
    Ssl,
    /// SASL without TLS.
    SaslPlaintext,
    /// SASL over TLS.
    SaslSsl,
}

/// SASL mechanism (librdkafka `sasl.mechanism`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum SaslMechanism {
    /// `PLAIN`.
    #[default]
    #[serde(rename = "PLAIN")]
    Plain,
    /// `SCRAM-SHA-256`.
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    /// `SCRAM-SHA-512`.
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

/// TLS and SASL settings. Secrets never show in `Debug` output or logs.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaSecurity {
    /// `security.protocol`.
    pub protocol: SecurityProtocol,
    /// `sasl.mechanism`, with SASL protocols.
    pub sasl_mechanism: SaslMechanism,
    /// `sasl.username`.
    pub sasl_username: Option<String>,
    /// `sasl.password`.
    pub sasl_password: Option<Secret>,
    /// `ssl.ca.location`: PEM file of CAs to trust.
    pub ssl_ca_location: Option<String>,
    /// `ssl.certificate.location`: client certificate (PEM).
    pub ssl_certificate_location: Option<String>,
    /// `ssl.key.location`: client key (PEM).
    pub ssl_key_location: Option<String>,
    /// `ssl.key.password`.
    pub ssl_key_password: Option<Secret>,
}

/// How the producer picks a record's partition from its key (librdkafka
/// `partitioner`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Partitioner {
    /// sarama's default hash partitioner, as the Go SDK's producer uses
    /// (librdkafka `fnv1a_random`): FNV-1a 32 of the key, as a signed
    /// integer, remainder by the partition count, absolute value; the same
    /// as [`partition_for`](eventbus_core::partition_for). Keyless records
    /// go to a random partition. The default, so Go and Rust producers put
    /// one aggregate's events on one partition.
    #[default]
    Sarama,
    /// librdkafka's default (`consistent_random`: CRC32 of the key).
    Librdkafka,
    /// The Java client's default (`murmur2_random`), for fleets with Java producers.
    Java,
}

impl Partitioner {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Sarama => "fnv1a_random",
            Self::Librdkafka => "consistent_random",
            Self::Java => "murmur2_random",
        }
    }
}

/// Compression codec (librdkafka `compression.type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    /// None.
    #[default]
    None,
    /// gzip.
    Gzip,
    /// Snappy.
    Snappy,
    /// LZ4.
    Lz4,
    /// Zstandard.
    Zstd,
}

impl Compression {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Gzip => "gzip",
            Self::Snappy => "snappy",
            Self::Lz4 => "lz4",
            Self::Zstd => "zstd",
        }
    }
}

/// Producer settings. The producer is always idempotent with `acks=all`,
/// so one aggregate's events (one key, one partition) keep their order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaProducer {
    /// `compression.type`. Default none.
    pub compression: Compression,
    /// `linger.ms`: batching delay, in ms. Default 5.
    pub linger_ms: u64,
    /// `queue.buffering.max.messages`: the client's local queue (count);
    /// when full, publishing waits (bounded by the bus's publish timeout). Default 100,000.
    pub queue_max_messages: u64,
    /// `message.timeout.ms`: how long the client retries a delivery before
    /// reporting it failed, in ms. Default 30,000.
    pub delivery_timeout_ms: u64,
    /// How a record's key picks its partition. Default
    /// [`Sarama`](Partitioner::Sarama), matching the Go SDK's producers.
    pub partitioner: Partitioner,
}

/// Consumer settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConsumer {
    /// `session.timeout.ms`. Default 10,000.
    pub session_timeout_ms: u64,
    /// `heartbeat.interval.ms`. Default 1,000.
    pub heartbeat_interval_ms: u64,
    /// `auto.commit.interval.ms`: how often the finished prefix is committed, in ms. Default 200.
    pub commit_interval_ms: u64,
    /// On a rebalance revoke, longest wait for in-flight messages of the
    /// revoked partitions before their finished prefix is committed, in ms. Default 5,000.
    pub revoke_timeout_ms: u64,
    /// Longest wait for the group coordinator's answer to a commit this
    /// member makes itself (on a revoke, at `close`, and in the final revoke
    /// of a member dropped without `close`), in ms. Past it the commit is
    /// reported failed (a warning, or `close`'s error): what was finished
    /// since the last commit may be handled again by the next owner
    /// (duplicates, never a loss). librdkafka's own synchronous commit
    /// (`rd_kafka_commit`) waits without a bound. Must be above 0. Default 10,000.
    pub commit_timeout_ms: u64,
    /// `auto.offset.reset` for a new group: `earliest` (default) or `latest`.
    pub auto_offset_reset: String,
    /// `fetch.wait.max.ms`: longest time the broker holds a fetch waiting for
    /// data, in ms. Default 500, librdkafka's own default and Kafka's
    /// (`fetch.max.wait.ms`). A Kafka broker answers a fetch as soon as
    /// `fetch.min.bytes` (1) are there, so a long wait costs no latency on
    /// it, and an idle consumer sends two fetches a second, not fifty.
    ///
    /// tansu 0.6 (the broker of our tests and bench) sleeps after every read
    /// round even when it found data, so there each fetch takes the whole
    /// wait (below 250 ms) or about half of it: the tests and the bench use
    /// 20 against tansu in memory (`tansu-storage/src/service/fetch.rs`,
    /// fixed upstream after 0.6.0 in commit e2a6eab). Against tansu keeping
    /// its log in S3, 20 ms multiplied the store requests of every empty
    /// partition, and a 200-event fault run took 118 s against 38 s at 500
    /// (README "Benchmark", "A slow broker").
    pub fetch_wait_max_ms: u64,
    /// `max.poll.interval.ms`: longest time between two polls before the
    /// client leaves the group, in ms. Each subscription keeps polling (with
    /// its partitions paused) while the bus has no room for more messages,
    /// so a slow or parked handler does not get the member evicted.
    /// Must be ≥ `session_timeout_ms` (librdkafka's rule). Default 300,000.
    pub max_poll_interval_ms: u64,
    /// Messages of one partition fetched and not yet settled (count); past
    /// it the partition is paused (the rest of the subscription flows) until
    /// half of them settled. Bounds what a parked aggregate holds. Default 1,000.
    pub max_in_flight_per_partition: usize,
    /// Use `<group>.<topic>` as the Kafka `group.id` (default true), so each
    /// (group, topic) subscription is its own Kafka group, as a NATS durable
    /// consumer is, and joining one topic never rebalances another. False
    /// uses the group name as-is (one Kafka group across topics).
    pub group_id_per_topic: bool,
}

/// One topic, as provisioned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TopicSpec {
    /// Topic name (ignored in [`KafkaConfig::default_topic`]).
    pub name: String,
    /// Partitions. Default 8.
    pub partitions: i32,
    /// Replication factor. Default 1.
    pub replication: i32,
    /// `retention.ms`; `None` keeps the broker's default.
    pub retention_ms: Option<i64>,
    /// `compression.type` of the topic; `None` keeps the broker's default.
    pub compression: Option<Compression>,
    /// `cleanup.policy` (`delete`, `compact`); `None` keeps the broker's default.
    pub cleanup_policy: Option<String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: vec!["127.0.0.1:9092".into()],
            client_id: "eventbus".into(),
            security: KafkaSecurity::default(),
            producer: KafkaProducer::default(),
            consumer: KafkaConsumer::default(),
            topics: Vec::new(),
            default_topic: TopicSpec::default(),
            auto_create_topics: true,
            provision: ProvisionStrategy::default(),
            extra: BTreeMap::new(),
            connect_timeout_ms: 10_000,
        }
    }
}

impl Default for KafkaProducer {
    fn default() -> Self {
        Self {
            compression: Compression::None,
            linger_ms: 5,
            queue_max_messages: 100_000,
            delivery_timeout_ms: 30_000,
            partitioner: Partitioner::Sarama,
        }
    }
}

impl Default for KafkaConsumer {
    fn default() -> Self {
        Self {
            session_timeout_ms: 10_000,
            heartbeat_interval_ms: 1_000,
            commit_interval_ms: 200,
            revoke_timeout_ms: 5_000,
            commit_timeout_ms: 10_000,
            auto_offset_reset: "earliest".into(),
            fetch_wait_max_ms: 500,
            max_poll_interval_ms: 300_000,
            max_in_flight_per_partition: 1_000,
            group_id_per_topic: true,
        }
    }
}

impl Default for TopicSpec {
    fn default() -> Self {
        Self {
            name: String::new(),
            partitions: 8,
            replication: 1,
            retention_ms: None,
            compression: None,
            cleanup_policy: None,
        }
    }
}

impl KafkaConfig {
    /// The fetch wait a consumer of these settings uses, in ms: `extra`'s
    /// `fetch.wait.max.ms` when it holds a number (librdkafka properties in
    /// `extra` are applied last), else `consumer.fetch_wait_max_ms`.
    pub fn fetch_wait_ms(&self) -> u64 {
        self.extra_number("fetch.wait.max.ms")
            .unwrap_or(self.consumer.fetch_wait_max_ms)
    }

    /// The number a librdkafka property of `extra` holds, if it holds one
    /// (`extra` is applied last, so it wins over the typed setting).
    pub(crate) fn extra_number(&self, property: &str) -> Option<u64> {
        self.extra.get(property).and_then(|v| v.parse::<u64>().ok())
    }

    /// Defaults with these bootstrap brokers.
    pub fn with_brokers<I: IntoIterator<Item = S>, S: Into<String>>(brokers: I) -> Self {
        Self {
            brokers: brokers.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }

    /// The librdkafka properties shared by producer, consumer and admin client.
    pub(crate) fn client_properties(&self) -> rdkafka::ClientConfig {
        let mut c = rdkafka::ClientConfig::new();
        c.set("bootstrap.servers", self.brokers.join(","));
        c.set("client.id", &self.client_id);
        let s = &self.security;
        let protocol = match s.protocol {
            SecurityProtocol::Plaintext => "plaintext",
            SecurityProtocol::Ssl => "ssl",
            SecurityProtocol::SaslPlaintext => "sasl_plaintext",
            SecurityProtocol::SaslSsl => "sasl_ssl",
        };
        c.set("security.protocol", protocol);
        // The mechanism whenever the effective protocol is SASL (also when
        // `extra` sets the protocol) and `extra` does not set it itself:
        // librdkafka would otherwise default to GSSAPI.
        if self.effective_protocol().starts_with("sasl") && self.extra_mechanism().is_none() {
            let mechanism = match s.sasl_mechanism {
                SaslMechanism::Plain => "PLAIN",
                SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
                SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
            };
            c.set("sasl.mechanism", mechanism);
        }
        let optional = [
            ("sasl.username", s.sasl_username.as_deref()),
            ("sasl.password", s.sasl_password.as_ref().map(Secret::expose)),
            ("ssl.ca.location", s.ssl_ca_location.as_deref()),
            ("ssl.certificate.location", s.ssl_certificate_location.as_deref()),
            ("ssl.key.location", s.ssl_key_location.as_deref()),
            (
                "ssl.key.password",
                s.ssl_key_password.as_ref().map(Secret::expose),
            ),
        ];
        for (key, value) in optional {
            if let Some(v) = value {
                c.set(key, v);
            }
        }
        c
    }

    /// Checks the security settings for ones librdkafka would silently
    /// ignore or only refuse at the first connection.
    ///
    /// # Errors
    /// [`Config`](eventbus_core::ErrorKind::Config) naming the setting: a TLS
    /// setting (`ssl_*`) without a TLS protocol (`ssl`, `sasl_ssl`), a SASL
    /// setting without a SASL protocol, a SASL protocol without user name
    /// and password, a client certificate without its key or the reverse;
    /// `consumer.commit_timeout_ms` of 0 (every commit would fail).
    pub fn validate(&self) -> eventbus_core::Result<()> {
        use eventbus_core::Error;
        if self.consumer.commit_timeout_ms == 0 {
            return Err(Error::config(
                "kafka.consumer.commit_timeout_ms is 0: no commit could wait for its answer",
            ));
        }
        let s = &self.security;
        let protocol = self.effective_protocol();
        let tls = protocol.ends_with("ssl");
        let sasl = protocol.starts_with("sasl");
        let tls_settings = [
            ("ssl_ca_location", s.ssl_ca_location.is_some()),
            ("ssl_certificate_location", s.ssl_certificate_location.is_some()),
            ("ssl_key_location", s.ssl_key_location.is_some()),
            ("ssl_key_password", s.ssl_key_password.is_some()),
        ];
        for (name, set) in tls_settings {
            if set && !tls {
                return Err(Error::config(format!(
                    "kafka.security.{name} is set but security.protocol is {protocol}, which would ignore it: \
                     use ssl or sasl_ssl"
                )));
            }
        }
        for (name, set) in [
            ("sasl_username", s.sasl_username.is_some()),
            ("sasl_password", s.sasl_password.is_some()),
        ] {
            if set && !sasl {
                return Err(Error::config(format!(
                    "kafka.security.{name} is set but security.protocol is {protocol}, which would ignore it: \
                     use sasl_plaintext or sasl_ssl"
                )));
            }
        }
        let extra_has = |k: &str| self.extra.contains_key(k);
        // GSSAPI (Kerberos) and OAUTHBEARER log in without a password.
        let password_login = self
            .extra_mechanism()
            .is_none_or(|m| !m.eq_ignore_ascii_case("GSSAPI") && !m.eq_ignore_ascii_case("OAUTHBEARER"));
        if sasl && password_login {
            if s.sasl_username.is_none() && !extra_has("sasl.username") {
                return Err(Error::config(format!(
                    "security.protocol {protocol} needs kafka.security.sasl_username"
                )));
            }
            if s.sasl_password.is_none() && !extra_has("sasl.password") {
                return Err(Error::config(format!(
                    "security.protocol {protocol} needs kafka.security.sasl_password"
                )));
            }
        }
        match (&s.ssl_certificate_location, &s.ssl_key_location) {
            (Some(_), None) => Err(Error::config(
                "kafka.security.ssl_certificate_location is set without ssl_key_location",
            )),
            (None, Some(_)) => Err(Error::config(
                "kafka.security.ssl_key_location is set without ssl_certificate_location",
            )),
            _ => Ok(()),
        }
    }

    /// `security.protocol` as librdkafka will see it: from `extra` when set
    /// there (it wins), else from [`security`](KafkaConfig::security).
    fn effective_protocol(&self) -> String {
        match self.extra.get("security.protocol") {
            Some(p) => p.to_ascii_lowercase(),
            None => match self.security.protocol {
                SecurityProtocol::Plaintext => "plaintext",
                SecurityProtocol::Ssl => "ssl",
                SecurityProtocol::SaslPlaintext => "sasl_plaintext",
                SecurityProtocol::SaslSsl => "sasl_ssl",
            }
            .to_owned(),
        }
    }

    /// The SASL mechanism set through `extra` (`sasl.mechanism` or its
    /// alias `sasl.mechanisms`), if any.
    fn extra_mechanism(&self) -> Option<&str> {
        self.extra
            .get("sasl.mechanism")
            .or_else(|| self.extra.get("sasl.mechanisms"))
            .map(String::as_str)
    }

    pub(crate) fn apply_extra(&self, c: &mut rdkafka::ClientConfig) {
        for (k, v) in &self.extra {
            c.set(k, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_show_in_debug_and_reach_librdkafka() {
        let mut c = KafkaConfig::default();
        c.security.protocol = SecurityProtocol::SaslSsl;
        c.security.sasl_mechanism = SaslMechanism::ScramSha512;
        c.security.sasl_username = Some("svc".into());
        c.security.sasl_password = Some("pa55word".into());
        c.extra
            .insert("ssl.key.pem".into(), "-----BEGIN PRIVATE KEY-----k3y".into());
        c.extra
            .insert("sasl.oauthbearer.client.secret".into(), "cl1ent".into());
        c.extra.insert("linger.ms".into(), "7".into());
        for shown in [format!("{c:?}"), serde_json::to_string(&c).unwrap()] {
            for secret in ["pa55word", "k3y", "cl1ent"] {
                assert!(!shown.contains(secret), "{secret} in {shown}");
            }
            assert!(shown.contains("linger.ms"), "{shown}");
        }
        let props = c.client_properties();
        assert_eq!(props.get("sasl.password"), Some("pa55word"));
        assert_eq!(props.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert_eq!(props.get("security.protocol"), Some("sasl_ssl"));
    }

    #[test]
    fn a_commit_timeout_of_zero_is_a_config_error() {
        let mut c = KafkaConfig::default();
        c.consumer.commit_timeout_ms = 0;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("commit_timeout_ms"), "{err}");
        c.consumer.commit_timeout_ms = 1;
        c.validate().unwrap();
    }

    #[test]
    fn security_settings_that_would_be_ignored_are_config_errors() {
        let check = |f: &dyn Fn(&mut KafkaConfig)| {
            let mut c = KafkaConfig::default();
            f(&mut c);
            c.validate().map_err(|e| e.to_string())
        };
        let err = check(&|c| c.security.ssl_ca_location = Some("ca.pem".into())).unwrap_err();
        assert!(
            err.contains("ssl_ca_location") && err.contains("plaintext"),
            "{err}"
        );
        let err = check(&|c| c.security.sasl_username = Some("svc".into())).unwrap_err();
        assert!(err.contains("sasl_username"), "{err}");
        let err = check(&|c| {
            c.security.protocol = SecurityProtocol::SaslSsl;
            c.security.sasl_username = Some("svc".into());
        })
        .unwrap_err();
        assert!(err.contains("sasl_password"), "{err}");
        let err = check(&|c| {
            c.security.protocol = SecurityProtocol::Ssl;
            c.security.ssl_certificate_location = Some("client.pem".into());
        })
        .unwrap_err();
        assert!(err.contains("ssl_key_location"), "{err}");
        // Consistent settings pass, a protocol from `extra` counts.
        check(&|c| {
            c.security.protocol = SecurityProtocol::Ssl;
            c.security.ssl_ca_location = Some("ca.pem".into());
        })
        .unwrap();
        check(&|c| {
            c.extra.insert("security.protocol".into(), "SSL".into());
            c.security.ssl_ca_location = Some("ca.pem".into());
        })
        .unwrap();
        check(&|_| {}).unwrap();
        // OAUTHBEARER and GSSAPI (either key) need no password.
        for key in ["sasl.mechanism", "sasl.mechanisms"] {
            for mechanism in ["OAUTHBEARER", "GSSAPI"] {
                check(&|c| {
                    c.security.protocol = SecurityProtocol::SaslSsl;
                    c.extra.insert(key.into(), mechanism.into());
                })
                .unwrap();
            }
        }
        // A SASL protocol from `extra` gets the configured mechanism.
        let mut c = KafkaConfig::default();
        c.extra.insert("security.protocol".into(), "sasl_ssl".into());
        c.security.sasl_mechanism = SaslMechanism::ScramSha256;
        c.security.sasl_username = Some("u".into());
        c.security.sasl_password = Some("p".into());
        c.validate().unwrap();
        assert_eq!(c.client_properties().get("sasl.mechanism"), Some("SCRAM-SHA-256"));
    }

    #[test]
    fn a_refused_secret_property_is_named_without_its_value() {
        let mut c = KafkaConfig::default();
        c.extra
            .insert("sasl.jaas.config".into(), "password=\"s3cret\"".into());
        let mut props = c.client_properties();
        c.apply_extra(&mut props);
        let err = props
            .create::<rdkafka::producer::BaseProducer>()
            .map(|_| ())
            .map_err(|e| creation_error("cannot create the Kafka producer", e))
            .unwrap_err();
        let mut shown = format!("{err} {err:?}");
        let mut source = std::error::Error::source(&err);
        while let Some(s) = source {
            shown.push_str(&s.to_string());
            source = s.source();
        }
        assert!(shown.contains("sasl.jaas.config"), "{shown}");
        assert!(!shown.contains("s3cret"), "{shown}");
    }
}
