//! Topic provisioning through the admin API, and auto-creation on first use.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventbus_core::{Error, ErrorKind, ProvisionStrategy, Result};
use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, NewPartitions, NewTopic, ResourceSpecifier, TopicReplication,
};
use rdkafka::client::ClientContext;
use rdkafka::error::KafkaError;
use rdkafka::producer::Producer as _;
use rdkafka::types::RDKafkaErrorCode;

use crate::config::{KafkaConfig, TopicSpec};

const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The admin client's context: logs librdkafka's errors.
#[derive(Default)]
pub(crate) struct AdminContext;

impl ClientContext for AdminContext {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(%error, reason, "librdkafka error (admin client)");
    }
}

/// The connect probe's context: remembers the last authentication failure
/// librdkafka reported (through the error callback only, served by `poll`).
#[derive(Default)]
struct ProbeContext {
    auth_failure: Mutex<Option<String>>,
}

impl ClientContext for ProbeContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(
            error.rdkafka_error_code(),
            Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed)
        ) {
            *self.auth_failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason.to_owned());
        }
        tracing::debug!(%error, reason, "librdkafka error (connect probe)");
    }
}

impl rdkafka::producer::ProducerContext for ProbeContext {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: Self::DeliveryOpaque) {}
}

/// Asks the brokers for metadata through a throwaway client, waiting at
/// most `timeout`, then serves its error events.
///
/// # Errors
/// [`Auth`](ErrorKind::Auth) when a broker refused the credentials,
/// [`Connection`](ErrorKind::Connection) when none answered in time,
/// [`Config`](ErrorKind::Config) when the client cannot be made.
pub(crate) async fn probe(config: &KafkaConfig, timeout: Duration) -> Result<()> {
    let mut props = config.client_properties();
    config.apply_extra(&mut props);
    let client: rdkafka::producer::BaseProducer<ProbeContext> = props
        .create_with_context(ProbeContext::default())
        .map_err(|e| crate::config::creation_error("cannot create the Kafka client", e))?;
    let (answer, auth_failure) = tokio::task::spawn_blocking(move || {
        // Short tries, serving error events between them (SASL failures
        // among them), so refused credentials fail in a fraction of a second.
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let answer = client
                .client()
                .fetch_metadata(None, left.min(Duration::from_millis(250)))
                .map(|_| ());
            client.poll(Duration::ZERO);
            let failure = client
                .context()
                .auth_failure
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            if answer.is_ok() || failure.is_some() || std::time::Instant::now() >= deadline {
                break (answer, failure);
            }
        }
    })
    .await
    .map_err(|e| Error::backend("the metadata probe panicked", e))?;
    match (answer, auth_failure) {
        (_, Some(reason)) => Err(Error::new(
            ErrorKind::Auth,
            format!("the Kafka broker refused the credentials: {reason}"),
        )),
        (Ok(()), None) => Ok(()),
        (Err(e), None) => Err(Error::new(
            ErrorKind::Connection,
            format!("no Kafka broker answered within {} ms", timeout.as_millis()),
        )
        .with_source(e)),
    }
}

pub(crate) struct Topics {
    admin: Arc<AdminClient<AdminContext>>,
    known: Mutex<HashSet<String>>,
    default: TopicSpec,
    auto_create: bool,
}

impl Topics {
    pub(crate) fn new(config: &KafkaConfig) -> Result<Self> {
        let mut props = config.client_properties();
        config.apply_extra(&mut props);
        let admin = props
            .create_with_context(AdminContext)
            .map_err(|e| crate::config::creation_error("cannot create the Kafka admin client", e))?;
        Ok(Self {
            admin: Arc::new(admin),
            known: Mutex::new(HashSet::new()),
            default: config.default_topic.clone(),
            auto_create: config.auto_create_topics,
        })
    }

    /// Applies `strategy` to every spec.
    ///
    /// # Errors
    /// `NotFound` / `Conflict` when validating, `Backend` when the admin API fails.
    pub(crate) async fn provision(&self, specs: &[TopicSpec], strategy: ProvisionStrategy) -> Result<()> {
        for spec in specs {
            match strategy {
                ProvisionStrategy::Skip => {}
                ProvisionStrategy::CreateOnly => {
                    self.create(spec).await?;
                }
                ProvisionStrategy::CreateOrUpdate => {
                    if !self.create(spec).await? {
                        self.update(spec).await?;
                    }
                }
                ProvisionStrategy::ValidateOnly => self.validate(spec).await?,
            }
        }
        Ok(())
    }

    /// Makes sure `topic` exists, creating it with the default spec when
    /// auto-creation is on. Cached: one admin call per topic per process.
    pub(crate) async fn ensure(&self, topic: &str) -> Result<()> {
        if !self.auto_create || self.known.lock().unwrap().contains(topic) {
            return Ok(());
        }
        let spec = TopicSpec {
            name: topic.to_owned(),
            ..self.default.clone()
        };
        self.create(&spec).await?;
        Ok(())
    }

    /// Makes sure `topic` can take messages: created when auto-creation is
    /// on, else it must exist.
    ///
    /// # Errors
    /// `NotFound` naming the topic when auto-creation is off and it is
    /// missing; `Backend` when the metadata lookup fails.
    pub(crate) async fn check_exists(&self, topic: &str) -> Result<()> {
        if self.auto_create {
            return self.ensure(topic).await;
        }
        if self.known.lock().unwrap().contains(topic) || self.partition_count(topic).await?.is_some() {
            return Ok(());
        }
        Err(Error::new(
            ErrorKind::NotFound,
            format!(
                "Kafka topic {topic} does not exist and auto_create_topics is off: \
                 create it (or list it in `topics` with provisioning on), or choose another dead-letter topic"
            ),
        ))
    }

    /// Creates the topic; false when it already existed.
    async fn create(&self, spec: &TopicSpec) -> Result<bool> {
        let retention = spec.retention_ms.map(|r| r.to_string());
        let mut topic = NewTopic::new(
            &spec.name,
            spec.partitions,
            TopicReplication::Fixed(spec.replication),
        );
        if let Some(r) = &retention {
            topic = topic.set("retention.ms", r);
        }
        if let Some(c) = spec.compression {
            topic = topic.set("compression.type", c.as_str());
        }
        if let Some(p) = &spec.cleanup_policy {
            topic = topic.set("cleanup.policy", p);
        }
        let options = AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT));
        let results = self
            .admin
            .create_topics([&topic], &options)
            .await
            .map_err(|e| admin("create topic", e))?;
        let created = match results.into_iter().next() {
            Some(Ok(_)) => true,
            Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => false,
            Some(Err((name, code))) => {
                return Err(Error::backend(
                    format!("cannot create topic {name}"),
                    code.to_string(),
                ));
            }
            None => true,
        };
        self.known.lock().unwrap().insert(spec.name.clone());
        Ok(created)
    }

    async fn update(&self, spec: &TopicSpec) -> Result<()> {
        let have = self.partition_count(&spec.name).await?.unwrap_or(0);
        let options = AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT));
        if (have as i32) < spec.partitions {
            let grow = NewPartitions::new(&spec.name, spec.partitions as usize);
            let results = self
                .admin
                .create_partitions([&grow], &options)
                .await
                .map_err(|e| admin("add partitions", e))?;
            if let Some(Err((name, code))) = results.into_iter().next() {
                return Err(Error::new(
                    ErrorKind::Conflict,
                    format!("cannot grow {name}: {code}"),
                ));
            }
        }
        let retention = spec.retention_ms.map(|r| r.to_string());
        let mut change = AlterConfig::new(ResourceSpecifier::Topic(&spec.name));
        let mut any = false;
        for (key, value) in [
            ("retention.ms", retention.as_deref()),
            ("compression.type", spec.compression.map(|c| c.as_str())),
            ("cleanup.policy", spec.cleanup_policy.as_deref()),
        ] {
            if let Some(v) = value {
                change = change.set(key, v);
                any = true;
            }
        }
        if any {
            let results = self
                .admin
                .alter_configs([&change], &options)
                .await
                .map_err(|e| admin("alter configs", e))?;
            if let Some(Err((_, code))) = results.into_iter().next() {
                return Err(Error::new(
                    ErrorKind::Conflict,
                    format!("cannot update topic {}: {code}", spec.name),
                ));
            }
        }
        Ok(())
    }

    async fn validate(&self, spec: &TopicSpec) -> Result<()> {
        match self.partition_count(&spec.name).await? {
            None => Err(Error::new(
                ErrorKind::NotFound,
                format!("topic {} does not exist", spec.name),
            )),
            Some(have) if (have as i32) < spec.partitions => Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "topic {}: partitions {have} < configured {}",
                    spec.name, spec.partitions
                ),
            )),
            Some(_) => Ok(()),
        }
    }

    /// Partitions of `topic`; `None` when it does not exist. Lists every
    /// topic rather than asking for this one, because a metadata request
    /// naming a topic may auto-create it (tansu does).
    pub(crate) async fn partition_count(&self, topic: &str) -> Result<Option<usize>> {
        let client = self.admin.clone();
        let metadata =
            tokio::task::spawn_blocking(move || client.inner().fetch_metadata(None, ADMIN_TIMEOUT))
                .await
                .map_err(|e| Error::backend("metadata lookup failed", e))?
                .map_err(|e| admin("metadata", e))?;
        Ok(metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map(|t| t.partitions().len()))
    }
}

fn admin(what: &'static str, e: rdkafka::error::KafkaError) -> Error {
    Error::backend(format!("Kafka {what} failed"), e)
}
