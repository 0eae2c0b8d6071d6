//! The envelope ⇄ broker message mapping, both ways: body, headers, record
//! key and dedup id on publish; body first, then headers, then key on
//! receive (ORIGIN.md's order); the envelope ⇄ headers mapping; and what a
//! publish result reports about an envelope or a raw message. Header names
//! (the Go SDK's) are in [`headers`].

use bytes::Bytes;
use chrono::DateTime;

use crate::envelope::{Envelope, Payload};
use crate::error::{Error, ErrorKind, Result, ValidationError};
use crate::headers::{self, Headers};
use crate::message::Message;
use crate::publish::ResultMeta;

/// The broker message of an envelope publish: body = the envelope's JSON,
/// key = the aggregate id (Kafka keeps an aggregate in one partition),
/// the `X-Event-*` headers, dedup id = the event id; `tenant_id` written in
/// `tenant_format`.
///
/// # Errors
/// [`Serialization`](ErrorKind::Serialization) when the envelope cannot be encoded.
pub(crate) fn envelope_message(
    topic: &str,
    envelope: &Envelope,
    tenant_format: crate::TenantIdFormat,
) -> Result<Message> {
    let timestamp = crate::envelope::format_timestamp(&envelope.timestamp);
    let payload = envelope.encode_at(tenant_format, &timestamp)?;
    Ok(Message {
        topic: topic.to_owned(),
        key: Some(Bytes::copy_from_slice(envelope.aggregate_id.as_bytes())),
        headers: headers_with_timestamp(envelope, timestamp),
        payload,
        dedup_id: Some(envelope.event_id.clone()),
    })
}

/// The headers that travel with `envelope`: `X-Event-ID`, `X-Aggregate-ID`,
/// `X-Event-Type`, `X-Event-Version`, `X-Timestamp`, and when set
/// `X-Trace-ID`, `X-Correlation-ID`, `X-Tenant-ID`.
pub fn envelope_headers(envelope: &Envelope) -> Headers {
    headers_with_timestamp(envelope, crate::envelope::format_timestamp(&envelope.timestamp))
}

/// [`envelope_headers`] with the timestamp already formatted.
fn headers_with_timestamp(envelope: &Envelope, timestamp: String) -> Headers {
    let mut version = itoa::Buffer::new();
    let version = version.format(envelope.event_version);
    let optional = [envelope.trace_id.as_deref(), envelope.correlation_id.as_deref()];
    let text = envelope.event_id.len()
        + envelope.aggregate_id.len()
        + envelope.event_type.len()
        + version.len()
        + timestamp.len()
        + optional.iter().flatten().map(|v| v.len()).sum::<usize>()
        + 20 // a tenant id
        + 55; // the trace context's `traceparent`, when the `otel` feature adds it
    let mut h = Headers::with_room(9, text);
    h.push_distinct(headers::EVENT_ID, &envelope.event_id);
    h.push_distinct(headers::AGGREGATE_ID, &envelope.aggregate_id);
    h.push_distinct(headers::EVENT_TYPE, &envelope.event_type);
    h.push_distinct(headers::EVENT_VERSION, version);
    h.push_distinct(headers::TIMESTAMP, &timestamp);
    if let Some(v) = &envelope.trace_id {
        h.push_distinct(headers::TRACE_ID, v);
    }
    if let Some(v) = &envelope.correlation_id {
        h.push_distinct(headers::CORRELATION_ID, v);
    }
    if let Some(v) = envelope.tenant_id {
        h.push_distinct(headers::TENANT_ID, itoa::Buffer::new().format(v));
    }
    h
}

/// The reverse of [`envelope_headers`]: rebuilds and validates an envelope from
/// its headers and a raw JSON payload (for producers that send the payload
/// alone as the message body).
///
/// # Errors
/// [`Validation`](crate::ErrorKind::Validation) naming the header's field when
/// a required header is missing or unparsable, or the envelope breaks a rule.
pub fn envelope_from_headers(map: &Headers, payload: Payload) -> Result<Envelope> {
    let required = |name: &str, field: &'static str| {
        map.get(name)
            .map(str::to_owned)
            .ok_or_else(|| ValidationError::new(field, format!("header {name} is missing")))
    };
    let parse_int = |field: &'static str, v: &str| {
        v.parse::<i64>()
            .map_err(|e| ValidationError::new(field, format!("not an integer: {e}")))
    };
    let timestamp = required(headers::TIMESTAMP, "timestamp")?;
    let timestamp = DateTime::parse_from_rfc3339(&timestamp)
        .map_err(|e| ValidationError::new("timestamp", format!("not RFC 3339: {e}")))?;
    let envelope = Envelope {
        event_id: required(headers::EVENT_ID, "event_id")?,
        aggregate_id: required(headers::AGGREGATE_ID, "aggregate_id")?,
        event_type: required(headers::EVENT_TYPE, "event_type")?,
        event_version: parse_int(
            "event_version",
            &required(headers::EVENT_VERSION, "event_version")?,
        )?,
        timestamp,
        trace_id: map.get(headers::TRACE_ID).map(str::to_owned),
        correlation_id: map.get(headers::CORRELATION_ID).map(str::to_owned),
        tenant_id: map
            .get(headers::TENANT_ID)
            .map(|v| parse_int("tenant_id", v))
            .transpose()?,
        payload,
    };
    envelope.validate()?;
    Ok(envelope)
}

/// What the result of publishing `envelope` to `topic` reports; `report`:
/// whether it goes to the results streams (envelope publishes do, except
/// batch members already reported by their batch).
pub(crate) fn envelope_result_meta(topic: &str, envelope: &Envelope, report: bool) -> ResultMeta {
    ResultMeta {
        event_id: envelope.event_id.clone(),
        topic: topic.to_owned(),
        aggregate_id: envelope.aggregate_id.clone(),
        event_type: envelope.event_type.clone(),
        tenant_id: envelope.tenant_id,
        report,
    }
}

/// What the result of publishing a raw `message` reports: the envelope
/// fields its `X-Event-*` headers carry (empty when absent); raw publishes
/// do not go to the results streams.
pub(crate) fn message_result_meta(message: &Message) -> ResultMeta {
    let header = |name: &str| message.headers.get(name).unwrap_or_default().to_owned();
    ResultMeta {
        event_id: header(headers::EVENT_ID),
        topic: message.topic.clone(),
        aggregate_id: header(headers::AGGREGATE_ID),
        event_type: header(headers::EVENT_TYPE),
        tenant_id: None,
        report: false,
    }
}

/// A received message as an envelope, as subscriptions decode it: the body
/// as an envelope; failing that, an envelope rebuilt from its `X-Event-*`
/// headers around a raw JSON body (ORIGIN.md's order). Never panics,
/// whatever the bytes.
///
/// # Errors
/// The body's decode error when there are no envelope headers, else the
/// header mapping's error.
pub fn decode_envelope(message: &Message) -> Result<Envelope> {
    let body_error = match Envelope::decode(&message.payload) {
        Ok(envelope) => return Ok(envelope),
        Err(e) => e,
    };
    if message.headers.get(headers::EVENT_ID).is_none() {
        return Err(body_error);
    }
    let payload = std::str::from_utf8(&message.payload)
        .map_err(|e| Error::new(ErrorKind::Serialization, "payload is not UTF-8").with_source(e))
        .and_then(|s| Payload::from_raw(s.to_owned()));
    envelope_from_headers(&message.headers, payload?)
}

/// The aggregate id of a message that is not a valid envelope: the
/// `X-Aggregate-ID` header, then the record key when it is UTF-8
/// (ORIGIN.md's order after the body); `None` when neither is there.
pub fn fallback_aggregate_id(message: &Message) -> Option<String> {
    let from_header = message.headers.get(headers::AGGREGATE_ID).map(str::to_owned);
    let from_key = || {
        message
            .key
            .as_ref()
            .and_then(|k| String::from_utf8(k.to_vec()).ok())
    };
    from_header.or_else(from_key).filter(|id| !id.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(h.get(headers::AGGREGATE_ID), Some("order-1"));
        assert_eq!(h.get(headers::TENANT_ID), Some("42"));
        assert_eq!(h.get(headers::CORRELATION_ID), None);
        let back = envelope_from_headers(&h, env.payload.clone()).unwrap();
        assert_eq!(back, env);
    }

    #[test]
    fn missing_header_names_the_field() {
        let err = envelope_from_headers(&Headers::new(), Payload::from_raw("{}").unwrap()).unwrap_err();
        assert_eq!(err.validation().unwrap().field, "timestamp");
    }
}
