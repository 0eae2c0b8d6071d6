//! Broker headers, and the one mapping between an [`Envelope`] and its headers.
//!
//! Header names are those of the original Go SDK (see `ORIGIN.md`), so services
//! written against it read ours and we read theirs.

use chrono::{DateTime, Utc};

use crate::envelope::{Envelope, Payload};
use crate::error::{Result, ValidationError};

/// Header carrying [`Envelope::event_id`].
pub const EVENT_ID: &str = "X-Event-ID";
/// Header carrying [`Envelope::aggregate_id`].
pub const AGGREGATE_ID: &str = "X-Aggregate-ID";
/// Header carrying [`Envelope::event_type`].
pub const EVENT_TYPE: &str = "X-Event-Type";
/// Header carrying [`Envelope::event_version`] in decimal.
pub const EVENT_VERSION: &str = "X-Event-Version";
/// Header carrying [`Envelope::timestamp`] in RFC 3339 with nanoseconds.
pub const TIMESTAMP: &str = "X-Timestamp";
/// Header carrying [`Envelope::trace_id`], when set.
pub const TRACE_ID: &str = "X-Trace-ID";
/// Header carrying [`Envelope::correlation_id`], when set.
pub const CORRELATION_ID: &str = "X-Correlation-ID";
/// Header carrying [`Envelope::tenant_id`] in decimal, when set.
pub const TENANT_ID: &str = "X-Tenant-ID";
/// Added to a dead-lettered message: the topic it was consumed from.
pub const ORIGINAL_TOPIC: &str = "X-Original-Topic";
/// Added to a dead-lettered message: the last handler error, as text.
pub const ERROR_MESSAGE: &str = "X-Error-Message";

/// Ordered broker headers: name/value pairs, names matched case-insensitively.
///
/// Values are UTF-8 text; Kafka and NATS both carry them as bytes on the wire.
/// Cloning is a reference-count increment; the first change after a clone
/// copies the pairs (copy on write).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(std::sync::Arc<Vec<(String, String)>>);

impl Headers {
    /// No headers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `name` to `value`, replacing an existing value of that name.
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<String>) {
        let (name, value) = (name.into(), value.into());
        let pairs = std::sync::Arc::make_mut(&mut self.0);
        match pairs.iter_mut().find(|(n, _)| n.eq_ignore_ascii_case(&name)) {
            Some(slot) => slot.1 = value,
            None => pairs.push((name, value)),
        }
    }

    /// The value of `name`, matched case-insensitively.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Removes `name` and returns its value.
    pub fn remove(&mut self, name: &str) -> Option<String> {
        let i = self.0.iter().position(|(n, _)| n.eq_ignore_ascii_case(name))?;
        Some(std::sync::Arc::make_mut(&mut self.0).remove(i).1)
    }

    /// The pairs in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    /// Number of headers.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no headers.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut h = Headers::new();
        for (k, v) in iter {
            h.insert(k, v);
        }
        h
    }
}

/// The headers that travel with `envelope`: `X-Event-ID`, `X-Aggregate-ID`,
/// `X-Event-Type`, `X-Event-Version`, `X-Timestamp`, and when set
/// `X-Trace-ID`, `X-Correlation-ID`, `X-Tenant-ID`.
pub fn envelope_headers(envelope: &Envelope) -> Headers {
    let mut h = Vec::with_capacity(8);
    h.push((EVENT_ID.into(), envelope.event_id.clone()));
    h.push((AGGREGATE_ID.into(), envelope.aggregate_id.clone()));
    h.push((EVENT_TYPE.into(), envelope.event_type.clone()));
    h.push((EVENT_VERSION.into(), envelope.event_version.to_string()));
    h.push((
        TIMESTAMP.into(),
        crate::envelope::format_timestamp(&envelope.timestamp),
    ));
    if let Some(v) = &envelope.trace_id {
        h.push((TRACE_ID.into(), v.clone()));
    }
    if let Some(v) = &envelope.correlation_id {
        h.push((CORRELATION_ID.into(), v.clone()));
    }
    if let Some(v) = envelope.tenant_id {
        h.push((TENANT_ID.into(), v.to_string()));
    }
    Headers(std::sync::Arc::new(h))
}

/// The reverse of [`envelope_headers`]: rebuilds and validates an envelope from
/// its headers and a raw JSON payload (for producers that send the payload
/// alone as the message body).
///
/// # Errors
/// [`Validation`](crate::ErrorKind::Validation) naming the header's field when
/// a required header is missing or unparsable, or the envelope breaks a rule.
pub fn envelope_from_headers(headers: &Headers, payload: Payload) -> Result<Envelope> {
    let required = |name: &str, field: &'static str| {
        headers
            .get(name)
            .map(str::to_owned)
            .ok_or_else(|| ValidationError::new(field, format!("header {name} is missing")))
    };
    let parse_int = |field: &'static str, v: &str| {
        v.parse::<i64>()
            .map_err(|e| ValidationError::new(field, format!("not an integer: {e}")))
    };
    let timestamp = required(TIMESTAMP, "timestamp")?;
    let timestamp = DateTime::parse_from_rfc3339(&timestamp)
        .map_err(|e| ValidationError::new("timestamp", format!("not RFC 3339: {e}")))?
        .with_timezone(&Utc);
    let envelope = Envelope {
        event_id: required(EVENT_ID, "event_id")?,
        aggregate_id: required(AGGREGATE_ID, "aggregate_id")?,
        event_type: required(EVENT_TYPE, "event_type")?,
        event_version: parse_int("event_version", &required(EVENT_VERSION, "event_version")?)?,
        timestamp,
        trace_id: headers.get(TRACE_ID).map(str::to_owned),
        correlation_id: headers.get(CORRELATION_ID).map(str::to_owned),
        tenant_id: headers
            .get(TENANT_ID)
            .map(|v| parse_int("tenant_id", v))
            .transpose()?,
        payload,
    };
    envelope.validate()?;
    Ok(envelope)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_match_names_case_insensitively_and_replace() {
        let mut h = Headers::new();
        h.insert("X-Event-ID", "a");
        h.insert("x-event-id", "b");
        assert_eq!(h.len(), 1);
        assert_eq!(h.get("X-EVENT-ID"), Some("b"));
        assert_eq!(h.remove("x-event-ID"), Some("b".into()));
        assert!(h.is_empty());
    }

    #[test]
    fn a_clone_is_not_changed_by_writes_to_the_original() {
        let mut a: Headers = [("k", "1")].into_iter().collect();
        let b = a.clone();
        a.insert("k", "2");
        assert_eq!((a.get("k"), b.get("k")), (Some("2"), Some("1")));
    }

    #[test]
    fn envelope_headers_round_trip() {
        let env = Envelope::builder("order-1", "OrderCreated", 7)
            .trace_id("t")
            .tenant_id(42)
            .json_payload(&serde_json::json!({"a": 1}))
            .unwrap()
            .build()
            .unwrap();
        let h = envelope_headers(&env);
        assert_eq!(h.get(AGGREGATE_ID), Some("order-1"));
        assert_eq!(h.get(TENANT_ID), Some("42"));
        assert_eq!(h.get(CORRELATION_ID), None);
        let back = envelope_from_headers(&h, env.payload.clone()).unwrap();
        assert_eq!(back, env);
    }

    #[test]
    fn missing_header_names_the_field() {
        let err = envelope_from_headers(&Headers::new(), Payload::from_raw("{}").unwrap()).unwrap_err();
        assert_eq!(err.validation().unwrap().field, "timestamp");
    }
}
