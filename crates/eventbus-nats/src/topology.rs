//! Topics to subjects, streams from configuration, consumer names.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use eventbus_core::{Error, ErrorKind, ProvisionStrategy, Result};

use crate::config::{Discard, Retention, Storage, StreamSpec};

/// The subject of `topic` under `prefix`.
pub(crate) fn subject(prefix: &str, topic: &str) -> String {
    format!("{prefix}{topic}")
}

/// The subject of partition `partition` of a partitioned `topic`:
/// `<prefix><topic>.<partition>`.
pub(crate) fn partition_subject(prefix: &str, topic: &str, partition: u32) -> String {
    format!("{prefix}{topic}.{partition}")
}

/// The durable consumer name of (group, topic): readable, and unique thanks
/// to a hash of the exact pair (durable names may not contain `.`).
pub(crate) fn durable_name(group: &str, topic: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .take(48)
            .collect()
    };
    // FNV-1a: stable across builds and platforms, unlike std's hasher.
    let hash = format!("{group}\u{0}{topic}")
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
    format!("{}-{}-{hash:016x}", clean(group), clean(topic))
}

fn stream_config(spec: &StreamSpec) -> stream::Config {
    stream::Config {
        name: spec.name.clone(),
        subjects: spec.subjects.clone(),
        storage: match spec.storage {
            Storage::File => stream::StorageType::File,
            Storage::Memory => stream::StorageType::Memory,
        },
        retention: match spec.retention {
            Retention::Limits => stream::RetentionPolicy::Limits,
            Retention::Interest => stream::RetentionPolicy::Interest,
            Retention::WorkQueue => stream::RetentionPolicy::WorkQueue,
        },
        max_age: Duration::from_millis(spec.max_age_ms),
        max_bytes: if spec.max_bytes == 0 { -1 } else { spec.max_bytes },
        max_messages: if spec.max_messages == 0 {
            -1
        } else {
            spec.max_messages
        },
        num_replicas: spec.replicas,
        duplicate_window: Duration::from_millis(spec.duplicate_window_ms),
        discard: match spec.discard {
            Discard::Old => stream::DiscardPolicy::Old,
            Discard::New => stream::DiscardPolicy::New,
        },
        ..Default::default()
    }
}

/// Every subject of `topic`: its one subject, or one per partition.
pub(crate) fn topic_subjects(prefix: &str, topic: &str, partitions: Option<u32>) -> Vec<String> {
    match partitions {
        Some(n) => (0..n).map(|p| partition_subject(prefix, topic, p)).collect(),
        None => vec![subject(prefix, topic)],
    }
}

/// The name of the stream [`ensure_topic_stream`] creates for `topic`:
/// `<prefix>_<topic with . as _>`, the Go SDK's naming of a topic's stream.
pub(crate) fn topic_stream_name(prefix: &str, topic: &str) -> String {
    format!("{prefix}_{}", topic.replace('.', "_"))
}

/// Checks the topic-stream template of `NatsConfig::topic_streams`.
///
/// # Errors
/// [`Config`](ErrorKind::Config) when it has subjects or breaks a stream rule.
pub(crate) fn validate_topic_streams(template: &StreamSpec) -> Result<()> {
    if !template.subjects.is_empty() {
        return Err(Error::config(
            "nats.topic_streams.subjects must be empty: a topic's stream stores the topic's own subjects",
        ));
    }
    validate_spec(template)
}

/// Makes sure some stream stores every subject of `topic`, creating
/// `<template.name>_<topic>` (see [`topic_stream_name`]) when none stores
/// any of them and `strategy` creates. A concurrent creator (another
/// member, a Go service) is fine: its stream is used.
///
/// # Errors
/// [`NotFound`](ErrorKind::NotFound) naming a subject no stream stores when
/// `strategy` does not create, or when a stream stores some of a
/// partitioned topic's subjects but not this one (its partition count
/// changed); [`Conflict`](ErrorKind::Conflict) when the stream name is
/// taken by a stream storing other subjects; [`Backend`](ErrorKind::Backend)
/// for other JetStream API errors.
pub(crate) async fn ensure_topic_stream(
    js: &jetstream::Context,
    template: &StreamSpec,
    strategy: ProvisionStrategy,
    topic: &str,
    subjects: &[String],
) -> Result<()> {
    if strategy == ProvisionStrategy::Skip {
        return Ok(());
    }
    let missing = missing_subjects(js, subjects).await?;
    if missing.is_empty() {
        return Ok(());
    }
    let creates = matches!(
        strategy,
        ProvisionStrategy::CreateOnly | ProvisionStrategy::CreateOrUpdate
    );
    if !creates || missing.len() < subjects.len() {
        return Err(Error::new(
            ErrorKind::NotFound,
            format!(
                "no JetStream stream stores subject {} (topic {topic}){}",
                missing[0],
                if creates {
                    ": a stream stores the topic's other partitions, so its partition count changed; \
                     add the subject to that stream"
                } else {
                    ": create a stream for it, or let provisioning create one"
                }
            ),
        ));
    }
    let name = topic_stream_name(&template.name, topic);
    let spec = StreamSpec {
        name: name.clone(),
        subjects: subjects.to_vec(),
        ..template.clone()
    };
    validate_spec(&spec)?;
    if let Err(e) = js.create_stream(stream_config(&spec)).await {
        // Someone else may have created it meanwhile (same name or another
        // stream over these subjects): fine if the subjects are stored now.
        if missing_subjects(js, subjects).await?.is_empty() {
            return Ok(());
        }
        return Err(Error::new(
            ErrorKind::Conflict,
            format!("cannot create stream {name} for topic {topic} (subjects {subjects:?})"),
        )
        .with_source(e));
    }
    tracing::info!(stream = %name, topic, "created the topic's JetStream stream");
    Ok(())
}

/// The subjects of `subjects` that no stream stores.
async fn missing_subjects(js: &jetstream::Context, subjects: &[String]) -> Result<Vec<String>> {
    let mut missing = Vec::new();
    for subject in subjects {
        match js.stream_by_subject(subject.clone()).await {
            Ok(_) => {}
            Err(e) if e.kind() == jetstream::context::GetStreamByNameErrorKind::NotFound => {
                missing.push(subject.clone())
            }
            Err(e) => return Err(api("stream lookup by subject", e)),
        }
    }
    Ok(missing)
}

/// Rules the server would refuse later, checked up front.
fn validate_spec(spec: &StreamSpec) -> Result<()> {
    if spec.max_age_ms > 0 && spec.duplicate_window_ms > spec.max_age_ms {
        return Err(Error::config(format!(
            "stream {}: duplicate_window_ms ({}) must not exceed max_age_ms ({}) (a JetStream rule)",
            spec.name, spec.duplicate_window_ms, spec.max_age_ms
        )));
    }
    if spec.name.is_empty() || spec.name.contains(['.', '*', '>', ' ', '\t']) {
        return Err(Error::config(format!(
            "stream name {:?} must be non-empty without . * > or whitespace",
            spec.name
        )));
    }
    Ok(())
}

/// Where an existing stream differs from its spec: the first field that does.
fn difference(want: &stream::Config, have: &stream::Config) -> Option<&'static str> {
    let mut want_subjects = want.subjects.clone();
    let mut have_subjects = have.subjects.clone();
    want_subjects.sort();
    have_subjects.sort();
    let unlimited = |v: i64| if v <= 0 { -1 } else { v };
    [
        ("subjects", want_subjects != have_subjects),
        ("storage", want.storage != have.storage),
        ("retention", want.retention != have.retention),
        ("max_age", want.max_age != have.max_age),
        (
            "max_bytes",
            unlimited(want.max_bytes) != unlimited(have.max_bytes),
        ),
        (
            "max_messages",
            unlimited(want.max_messages) != unlimited(have.max_messages),
        ),
        ("replicas", want.num_replicas != have.num_replicas),
        ("duplicate_window", want.duplicate_window != have.duplicate_window),
        ("discard", want.discard != have.discard),
    ]
    .into_iter()
    .find_map(|(field, differs)| differs.then_some(field))
}

/// Applies `strategy` to every stream in `specs`.
///
/// # Errors
/// [`NotFound`](ErrorKind::NotFound) when validating a missing stream,
/// [`Conflict`](ErrorKind::Conflict) when validating a stream that differs
/// (naming the field) or when the server refuses an update, and
/// [`Backend`](ErrorKind::Backend) for other JetStream API errors.
pub(crate) async fn provision(
    js: &jetstream::Context,
    specs: &[StreamSpec],
    strategy: ProvisionStrategy,
) -> Result<()> {
    if strategy == ProvisionStrategy::Skip {
        return Ok(());
    }
    for spec in specs {
        validate_spec(spec)?;
        if spec.subjects.is_empty() {
            return Err(Error::config(format!("stream {} has no subjects", spec.name)));
        }
        let want = stream_config(spec);
        let existing = match js.get_stream(&spec.name).await {
            Ok(mut s) => Some(s.info().await.map_err(|e| api("stream info", e))?.config.clone()),
            Err(e) if is_not_found(&e.kind()) => None,
            Err(e) => return Err(api("get stream", e)),
        };
        match (strategy, existing) {
            (ProvisionStrategy::ValidateOnly, None) => {
                return Err(Error::new(
                    ErrorKind::NotFound,
                    format!("stream {} does not exist", spec.name),
                ));
            }
            (ProvisionStrategy::ValidateOnly, Some(have)) => {
                if let Some(field) = difference(&want, &have) {
                    return Err(Error::new(
                        ErrorKind::Conflict,
                        format!("stream {}: {field} differs from the configuration", spec.name),
                    ));
                }
            }
            (_, None) => {
                js.create_stream(want)
                    .await
                    .map_err(|e| api("create stream", e))?;
            }
            (ProvisionStrategy::CreateOrUpdate, Some(have)) if difference(&want, &have).is_some() => {
                js.update_stream(want).await.map_err(|e| {
                    Error::new(
                        ErrorKind::Conflict,
                        format!("stream {} cannot be updated", spec.name),
                    )
                    .with_source(e)
                })?;
            }
            _ => {}
        }
    }
    Ok(())
}

fn is_not_found(kind: &jetstream::context::GetStreamErrorKind) -> bool {
    matches!(kind, jetstream::context::GetStreamErrorKind::JetStream(e)
        if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
}

/// The name of the stream that stores `subject`.
///
/// # Errors
/// [`NotFound`](ErrorKind::NotFound) only when the server answers that no
/// stream stores it; a failed request (timeout, no responders, a refused
/// API call) is a `Backend` error, never taken for a missing stream.
pub(crate) async fn stream_name_of(js: &jetstream::Context, subject: &str) -> Result<String> {
    match js.stream_by_subject(subject.to_owned()).await {
        Ok(name) => Ok(name),
        Err(e) if e.kind() == jetstream::context::GetStreamByNameErrorKind::NotFound => Err(Error::new(
            ErrorKind::NotFound,
            format!("no JetStream stream stores subject {subject}"),
        )
        .with_source(e)),
        Err(e) => Err(api("stream lookup by subject", e)),
    }
}

pub(crate) fn api(what: &'static str, e: impl Into<eventbus_core::BoxError>) -> Error {
    Error::backend(format!("JetStream {what} failed"), e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durable_names_are_valid_and_distinct() {
        let a = durable_name("billing", "orders.v1");
        let b = durable_name("billing", "orders_v1");
        assert_ne!(a, b);
        assert!(!a.contains('.'));
        assert_eq!(a, durable_name("billing", "orders.v1"), "stable");
    }

    #[test]
    fn a_duplicate_window_beyond_max_age_is_a_config_error() {
        let spec = StreamSpec {
            max_age_ms: 1_000,
            ..StreamSpec::default()
        };
        let err = validate_spec(&spec).unwrap_err();
        assert_eq!(err.kind(), eventbus_core::ErrorKind::Config);
        assert!(err.to_string().contains("duplicate_window_ms"));
    }

    #[test]
    fn difference_names_the_field() {
        let spec = StreamSpec::default();
        let mut other = spec.clone();
        other.max_age_ms = 1_000;
        assert_eq!(
            difference(&stream_config(&spec), &stream_config(&other)),
            Some("max_age")
        );
        assert_eq!(difference(&stream_config(&spec), &stream_config(&spec)), None);
    }
}
