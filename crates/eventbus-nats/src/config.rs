//! [`NatsConfig`]: connection, topology and consumer settings of the NATS backend.

use std::collections::BTreeMap;
use std::path::PathBuf;

use eventbus_core::ProvisionStrategy;
use eventbus_core::Secret;
use serde::{Deserialize, Serialize};

/// Settings of the NATS JetStream backend. Deserializes from the `nats`
/// section of a configuration file; every field has a default.
///
/// `Debug` and `Serialize` never show a secret: server URLs come out with
/// their credentials replaced by `***` ([`redact_url`](eventbus_core::redact_url))
/// and [`Secret`]s as `***`.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URLs; the client uses all of them (the original dialed only the first).
    /// Default `["nats://127.0.0.1:4222"]`. Credentials in a URL
    /// (`nats://user:password@host`, `nats://token@host`) are used and
    /// never shown. A `tls://` URL requires TLS, as [`tls`](NatsConfig::tls) does.
    #[serde(serialize_with = "redacted_urls")]
    pub servers: Vec<String>,
    /// Client name shown in the server's monitoring.
    pub client_name: Option<String>,
    /// Authentication.
    pub auth: NatsAuth,
    /// TLS; `None` for plain TCP (unless a server URL is `tls://`). When set,
    /// the connection is TLS or fails: a server that does not offer TLS is
    /// a `Connection` error, never a plaintext fallback.
    pub tls: Option<NatsTls>,
    /// Reconnect behaviour.
    pub reconnect: NatsReconnect,
    /// Prefix prepended to a topic to make its subject. Default empty:
    /// subject = topic, as the Go SDK publishes (topic `orders` is subject
    /// `orders`). A prefix such as `events.` keeps the bus's subjects apart
    /// from other traffic; Go services then see none of them.
    pub subject_prefix: String,
    /// Streams to provision at connect, each with its own subjects. Default
    /// none: every topic gets its own stream from
    /// [`topic_streams`](NatsConfig::topic_streams) when no stream stores it.
    pub streams: Vec<StreamSpec>,
    /// The stream a topic gets when no stream stores its subject, created at
    /// the topic's first publish or subscribe (or its dead-letter topic's
    /// check at subscribe) when [`provision`](NatsConfig::provision) creates.
    /// Its [`name`](StreamSpec::name) is a prefix: topic `orders.v1` gets
    /// stream `<name>_orders_v1` storing subject `<subject_prefix>orders.v1`
    /// (a partitioned topic: its partition subjects), with this spec's
    /// storage, retention and limits. Its `subjects` must be empty.
    ///
    /// The default name `BUSINESS_STREAM` is the Go SDK's default
    /// `JetStream.Stream.Name`, and the Go SDK names the stream it creates
    /// for a topic the same way (`<name>_<topic, . as _>`, subjects
    /// `[topic]`), so a Go service and a Rust service starting in either
    /// order use one stream. (The Go SDK's own defaults limit that stream to
    /// 24 h and 100 MB; ours keeps everything: set
    /// [`max_age_ms`](StreamSpec::max_age_ms) and
    /// [`max_bytes`](StreamSpec::max_bytes) for limits.)
    pub topic_streams: StreamSpec,
    /// What to do with [`streams`](NatsConfig::streams) at connect, with a
    /// topic's stream ([`topic_streams`](NatsConfig::topic_streams)) at its
    /// first use, and with the group-lease bucket
    /// ([`NatsConsumer::groups_bucket`]) at the first subscribe:
    /// `create_or_update` (default) and `create_only` create what is
    /// missing (a topic's existing stream is never updated); `validate_only` requires it to exist (a topic no stream
    /// stores is then a `NotFound` error at publish and subscribe, naming
    /// its subject); `skip` checks nothing.
    pub provision: ProvisionStrategy,
    /// Partitioned topics: topic (or pattern) to partition count. Default
    /// empty: every topic is unpartitioned.
    ///
    /// A partitioned topic `t` with `P` partitions is published to subjects
    /// `<subject_prefix>t.0` … `<subject_prefix>t.<P-1>`: an event goes to
    /// [`partition_for`](eventbus_core::partition_for)`(aggregate id, P)`
    /// (sarama's FNV-1a hash partitioner), and each partition is one durable
    /// consumer that one member of a group owns at a time, so up to `P`
    /// members share the topic with per-aggregate order. An unpartitioned
    /// topic is the one subject `<subject_prefix>t` with one durable consumer
    /// per group, consumed by one member at a time (the others stand by and
    /// take over when it leaves or its lease expires), which is what Go
    /// services publishing to subject = topic need.
    ///
    /// Keys are topic names, or patterns whose `*` matches one
    /// `.`-separated token and a final `>` one or more; an exact name wins
    /// over patterns, then patterns in key order. Every publisher and
    /// consumer of a topic must use the same count: changing it is a
    /// migration (drain the topic's groups, then change it everywhere).
    /// Topic names `<partitioned topic>.<digits>` are taken by the partitions.
    pub partitions: BTreeMap<String, u32>,
    /// Consumer settings.
    pub consumer: NatsConsumer,
    /// JetStream API and publish-ACK timeout, in ms. Default 10,000.
    pub request_timeout_ms: u64,
}

/// How to authenticate. At most one of token, user/password, NKey seed and
/// credentials file is usually set.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsAuth {
    /// User name, with [`password`](NatsAuth::password).
    pub user: Option<String>,
    /// Password of [`user`](NatsAuth::user).
    pub password: Option<Secret>,
    /// Token authentication.
    pub token: Option<Secret>,
    /// NKey seed (`SU...`).
    pub nkey_seed: Option<Secret>,
    /// A `.creds` file (JWT and NKey seed).
    pub credentials_file: Option<PathBuf>,
}

/// TLS settings. Present means required: the client upgrades every
/// connection to TLS and refuses a server that does not offer it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsTls {
    /// PEM file of CA certificates to trust, beside the system's roots.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, with [`key_file`](NatsTls::key_file), for
    /// mutual TLS. One without the other is a `Config` error at connect.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of [`cert_file`](NatsTls::cert_file).
    pub key_file: Option<PathBuf>,
}

/// Reconnect settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsReconnect {
    /// Reconnect attempts before giving up; `None` retries forever (default).
    pub max_reconnects: Option<usize>,
    /// Timeout of one connection attempt, in ms. Default 5,000.
    pub connect_timeout_ms: u64,
    /// Keep retrying when no server is reachable at start. Default false:
    /// connecting fails with a `Connection` error instead.
    pub retry_on_initial_connect: bool,
}

/// One JetStream stream, as provisioned. Field meanings are JetStream's
/// (`nats-server` stream configuration); 0 means unlimited.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamSpec {
    /// Stream name (no `.`, `*`, `>` or whitespace). Default `BUSINESS_STREAM`.
    pub name: String,
    /// Subjects stored, at least one (none for
    /// [`NatsConfig::topic_streams`], whose subjects are the topic's).
    /// Default empty.
    pub subjects: Vec<String>,
    /// `file` (default) or `memory`.
    pub storage: Storage,
    /// `limits` (default), `interest` or `work_queue`.
    pub retention: Retention,
    /// Oldest message kept, in ms; 0 = forever.
    pub max_age_ms: u64,
    /// Largest stream size, in bytes; 0 = unlimited.
    pub max_bytes: i64,
    /// Most messages kept; 0 = unlimited.
    pub max_messages: i64,
    /// Replicas in a cluster, 1..=5. Default 1.
    pub replicas: usize,
    /// Window in which a repeated `Nats-Msg-Id` is acked as a duplicate, in ms. Default 120,000.
    pub duplicate_window_ms: u64,
    /// `old` (default: drop oldest) or `new` (refuse new) when a limit is reached.
    pub discard: Discard,
}

/// Stream storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Storage {
    /// On disk.
    #[default]
    File,
    /// In server memory.
    Memory,
}

/// Stream retention policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Retention {
    /// Kept until a limit (age, bytes, count) removes it.
    #[default]
    Limits,
    /// Kept while some consumer has not acked it.
    Interest,
    /// Removed once acked.
    WorkQueue,
}

/// What a full stream does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Discard {
    /// Drop the oldest messages.
    #[default]
    Old,
    /// Refuse new messages (publishes fail).
    New,
}

/// Pull-consumer settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConsumer {
    /// Time the server waits for an ack before redelivering, in ms. Every
    /// message a member holds unsettled (queued, running, in retry backoff
    /// or parked) is kept alive with "in progress" every third of it.
    /// Default 30,000.
    pub ack_wait_ms: u64,
    /// Messages delivered and unacked per consumer of an unpartitioned
    /// topic (JetStream's `max_ack_pending`). Default 10,000.
    pub max_ack_pending: i64,
    /// Messages delivered and unacked per partition of a partitioned topic
    /// (each partition's consumer's `max_ack_pending`): past it the server
    /// stops delivering that partition while the others flow, so a parked
    /// or slow aggregate holds back only its partition, as Kafka's
    /// `max_in_flight_per_partition` does. Default 1,000.
    pub max_ack_pending_per_partition: i64,
    /// Lease of a member on a partition (or on an unpartitioned topic's
    /// consumer), in ms. Default 5,000. A member renews its leases every
    /// fifth of it and stops starting attempts on a partition once 4/5 of it
    /// passed without a renewal, so it is fenced before the lease can expire
    /// on the server; a crashed member's partitions flow again after about
    /// one lease. It is the lease bucket's `max_age`, so every member using
    /// one bucket must use the same value. At least 500 (a `Config` error at
    /// subscribe otherwise).
    pub lease_ms: u64,
    /// The key-value bucket holding group members and partition leases.
    /// Default `EVENTBUS_GROUPS`; created at the first subscribe when
    /// provisioning creates, with as many replicas as the most replicated
    /// of [`streams`](NatsConfig::streams) and
    /// [`topic_streams`](NatsConfig::topic_streams).
    pub groups_bucket: String,
    /// Longest wait, when a rebalance moves a partition away, for its
    /// running handlers to finish before they are cancelled, in ms.
    /// Default 5,000. The lease is renewed meanwhile.
    pub revoke_timeout_ms: u64,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            servers: vec!["nats://127.0.0.1:4222".into()],
            client_name: None,
            auth: NatsAuth::default(),
            tls: None,
            reconnect: NatsReconnect::default(),
            subject_prefix: String::new(),
            streams: Vec::new(),
            topic_streams: StreamSpec::default(),
            provision: ProvisionStrategy::default(),
            partitions: BTreeMap::new(),
            consumer: NatsConsumer::default(),
            request_timeout_ms: 10_000,
        }
    }
}

impl Default for NatsReconnect {
    fn default() -> Self {
        Self {
            max_reconnects: None,
            connect_timeout_ms: 5_000,
            retry_on_initial_connect: false,
        }
    }
}

impl Default for StreamSpec {
    fn default() -> Self {
        Self {
            name: "BUSINESS_STREAM".into(),
            subjects: Vec::new(),
            storage: Storage::File,
            retention: Retention::Limits,
            max_age_ms: 0,
            max_bytes: 0,
            max_messages: 0,
            replicas: 1,
            duplicate_window_ms: 120_000,
            discard: Discard::Old,
        }
    }
}

impl Default for NatsConsumer {
    fn default() -> Self {
        Self {
            ack_wait_ms: 30_000,
            max_ack_pending: 10_000,
            max_ack_pending_per_partition: 1_000,
            lease_ms: 5_000,
            groups_bucket: "EVENTBUS_GROUPS".into(),
            revoke_timeout_ms: 5_000,
        }
    }
}

impl NatsConfig {
    /// The partition count of `topic`: from [`partitions`](NatsConfig::partitions),
    /// `None` when the topic is unpartitioned.
    pub fn partitions_of(&self, topic: &str) -> Option<u32> {
        if let Some(n) = self.partitions.get(topic) {
            return Some((*n).max(1));
        }
        self.partitions
            .iter()
            .find(|(pattern, _)| matches_pattern(pattern, topic))
            .map(|(_, n)| (*n).max(1))
    }

    /// Defaults with these server URLs.
    pub fn with_servers<I: IntoIterator<Item = S>, S: Into<String>>(servers: I) -> Self {
        Self {
            servers: servers.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }
}

impl std::fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let servers: Vec<_> = self
            .servers
            .iter()
            .map(|s| eventbus_core::redact_url(s))
            .collect();
        f.debug_struct("NatsConfig")
            .field("servers", &servers)
            .field("client_name", &self.client_name)
            .field("auth", &self.auth)
            .field("tls", &self.tls)
            .field("reconnect", &self.reconnect)
            .field("subject_prefix", &self.subject_prefix)
            .field("streams", &self.streams)
            .field("topic_streams", &self.topic_streams)
            .field("provision", &self.provision)
            .field("partitions", &self.partitions)
            .field("consumer", &self.consumer)
            .field("request_timeout_ms", &self.request_timeout_ms)
            .finish()
    }
}

fn redacted_urls<S: serde::Serializer>(urls: &[String], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(urls.iter().map(|u| eventbus_core::redact_url(u)))
}

/// NATS subject-style matching on `.` tokens: `*` one token, a final `>` the rest.
fn matches_pattern(pattern: &str, topic: &str) -> bool {
    let mut topic_tokens = topic.split('.');
    for p in pattern.split('.') {
        match (p, topic_tokens.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (p, Some(t)) if p == t => {}
            _ => return false,
        }
    }
    topic_tokens.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_counts_by_name_then_pattern() {
        let mut c = NatsConfig::default();
        c.partitions.insert("orders".into(), 8);
        c.partitions.insert("billing.*".into(), 4);
        c.partitions.insert("audit.>".into(), 2);
        assert_eq!(c.partitions_of("orders"), Some(8));
        assert_eq!(c.partitions_of("orders.v2"), None);
        assert_eq!(c.partitions_of("billing.invoices"), Some(4));
        assert_eq!(c.partitions_of("billing.invoices.dlq"), None);
        assert_eq!(c.partitions_of("audit.a.b"), Some(2));
        assert_eq!(c.partitions_of("audit"), None);
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let mut c = NatsConfig::default();
        c.auth.password = Some("s3cret".into());
        c.auth.token = Some("t0ken".into());
        c.servers = vec!["nats://svc:pa55@a:4222".into(), "nats://tok3n@b:4222".into()];
        for shown in [format!("{c:?}"), serde_json::to_string(&c).unwrap()] {
            for secret in ["s3cret", "t0ken", "pa55", "tok3n"] {
                assert!(!shown.contains(secret), "{secret} in {shown}");
            }
            assert!(shown.contains("nats://svc:***@a:4222"), "{shown}");
        }
    }
}
