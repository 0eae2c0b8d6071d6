//! [CloudEvents 1.0](https://github.com/cloudevents/spec/blob/v1.0.2/cloudevents/spec.md)
//! for envelopes (feature `cloudevents`), through the official SDK
//! ([`cloudevents-sdk`](https://docs.rs/cloudevents-sdk), re-exported as
//! [`sdk`]), so events cross into CloudEvents-based systems.
//!
//! # Mapping
//!
//! | Envelope | CloudEvents attribute |
//! |---|---|
//! | `event_id` | `id` |
//! | `event_type` | `type` |
//! | `timestamp` | `time` (the instant; the zone offset becomes UTC) |
//! | `aggregate_id` | extension `aggregateid`, and `subject` |
//! | `event_version` | extension `eventversion` (integer) |
//! | `tenant_id` | extension `tenantid` (integer), when set |
//! | `trace_id` | extension `traceid`, when set |
//! | `correlation_id` | extension `correlationid`, when set |
//! | `payload` | `data`, with `datacontenttype` `application/json` |
//! | (the caller's) | `source`, `specversion` = `1.0` |
//!
//! Back from CloudEvents: the aggregate id is `aggregateid`, else
//! `subject`; `eventversion` may be an integer or a decimal string (binary
//! mode carries every attribute as text); `time` is required; `data` must
//! be JSON (`datacontenttype` absent, `application/json` or `…+json`), not
//! `data_base64` of another type. `source` and unknown extensions are not
//! kept. A missing or invalid field is a [`Validation`](crate::ErrorKind::Validation)
//! error naming it.
//!
//! # On the wire
//!
//! - **Structured mode** ([`structured_message`]): the body is the event as
//!   JSON (the spec's JSON event format), `content-type:
//!   application/cloudevents+json`.
//! - **Binary mode** ([`binary_message`]): the body is `data`; the
//!   attributes are headers named per the protocol binding: `ce_<name>`
//!   for Kafka ([Kafka binding](https://github.com/cloudevents/spec/blob/v1.0.2/cloudevents/bindings/kafka-protocol-binding.md) §3.2.3),
//!   `ce-<name>` for NATS and HTTP; `datacontenttype` is `content-type`.
//!
//! [`from_message`] reads either mode.

use std::collections::HashMap;

pub use ::cloudevents as sdk;
use ::cloudevents::event::{Data, ExtensionValue, SpecVersion};
use ::cloudevents::message::{
    BinaryDeserializer, BinarySerializer, Encoding, MessageAttributeValue, MessageDeserializer,
    StructuredDeserializer, StructuredSerializer,
};
use ::cloudevents::{AttributesReader, Event, EventBuilder, EventBuilderV10};
use bytes::Bytes;

use crate::envelope::{Envelope, Payload};
use crate::error::{Error, ErrorKind, Result, ValidationError};
use crate::headers::Headers;
use crate::message::Message;

/// Extension attribute carrying [`Envelope::aggregate_id`].
pub const AGGREGATE_ID: &str = "aggregateid";
/// Extension attribute carrying [`Envelope::event_version`].
pub const EVENT_VERSION: &str = "eventversion";
/// Extension attribute carrying [`Envelope::tenant_id`].
pub const TENANT_ID: &str = "tenantid";
/// Extension attribute carrying [`Envelope::trace_id`].
pub const TRACE_ID: &str = "traceid";
/// Extension attribute carrying [`Envelope::correlation_id`].
pub const CORRELATION_ID: &str = "correlationid";
/// `content-type` of a structured-mode message.
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";

const CONTENT_TYPE: &str = "content-type";

/// How attributes are named as headers in binary mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binding {
    /// `ce_<name>` (the Kafka protocol binding).
    Kafka,
    /// `ce-<name>` (the NATS and HTTP protocol bindings).
    Nats,
}

impl Binding {
    fn prefix(self) -> &'static str {
        match self {
            Self::Kafka => "ce_",
            Self::Nats => "ce-",
        }
    }
}

/// The CloudEvent of `envelope`, with `source` as its `source` (a URI
/// reference naming the producer, e.g. `/billing`).
///
/// # Errors
/// [`Validation`](ErrorKind::Validation) on `source` when it is empty or
/// not a URI reference; `payload` when it is not JSON.
pub fn to_cloud_event(envelope: &Envelope, source: &str) -> Result<Event> {
    if source.is_empty() {
        return Err(ValidationError::new("source", "must not be empty").into());
    }
    let data: serde_json::Value = serde_json::from_str(envelope.payload.get())
        .map_err(|e| ValidationError::new("payload", format!("is not JSON: {e}")))?;
    let mut builder = EventBuilderV10::new()
        .id(envelope.event_id.clone())
        .source(source)
        .ty(envelope.event_type.clone())
        .time(envelope.timestamp.with_timezone(&chrono::Utc))
        .subject(envelope.aggregate_id.clone())
        .extension(AGGREGATE_ID, envelope.aggregate_id.clone())
        .extension(EVENT_VERSION, envelope.event_version)
        .data("application/json", data);
    if let Some(tenant) = envelope.tenant_id {
        builder = builder.extension(TENANT_ID, tenant);
    }
    if let Some(trace) = &envelope.trace_id {
        builder = builder.extension(TRACE_ID, trace.clone());
    }
    if let Some(correlation) = &envelope.correlation_id {
        builder = builder.extension(CORRELATION_ID, correlation.clone());
    }
    builder
        .build()
        .map_err(|e| ValidationError::new("source", e.to_string()).into())
}

fn text(value: &ExtensionValue) -> String {
    match value {
        ExtensionValue::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn integer(event: &Event, name: &'static str) -> Result<Option<i64>> {
    match event.extension(name) {
        None => Ok(None),
        Some(ExtensionValue::Integer(n)) => Ok(Some(*n)),
        Some(ExtensionValue::String(s)) => s
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| ValidationError::new(name, format!("{s:?} is not an integer")).into()),
        Some(other) => Err(ValidationError::new(name, format!("{other} is not an integer")).into()),
    }
}

/// The envelope of `event` (see the mapping in the module docs).
///
/// # Errors
/// [`Validation`](ErrorKind::Validation) naming the missing or invalid
/// attribute (`aggregateid`, `eventversion`, `time`, `data`, `tenantid`),
/// or the envelope field that breaks a rule (e.g. `aggregate_id` with a
/// disallowed character).
pub fn from_cloud_event(event: &Event) -> Result<Envelope> {
    let aggregate = match (event.extension(AGGREGATE_ID), event.subject()) {
        (Some(a), _) => text(a),
        (None, Some(subject)) => subject.to_owned(),
        (None, None) => {
            return Err(ValidationError::new(AGGREGATE_ID, "is required (or subject)").into());
        }
    };
    let version = integer(event, EVENT_VERSION)?
        .ok_or_else(|| Error::from(ValidationError::new(EVENT_VERSION, "is required")))?;
    let time = event
        .time()
        .ok_or_else(|| Error::from(ValidationError::new("time", "is required")))?;
    let json_type = event
        .datacontenttype()
        .is_none_or(|t| t.starts_with("application/json") || t.contains("+json"));
    let payload = match event.data() {
        None => "null".to_owned(),
        Some(Data::Json(v)) => v.to_string(),
        Some(Data::String(s)) if json_type => s.clone(),
        Some(Data::Binary(b)) if json_type => String::from_utf8(b.clone())
            .map_err(|_| Error::from(ValidationError::new("data", "is not UTF-8 JSON")))?,
        Some(_) => {
            return Err(ValidationError::new(
                "data",
                format!(
                    "must be JSON, not {}",
                    event.datacontenttype().unwrap_or("binary data")
                ),
            )
            .into());
        }
    };
    let payload = Payload::from_raw(payload).map_err(|e| match e.kind() {
        ErrorKind::Validation => e,
        _ => ValidationError::new("data", e.to_string()).into(),
    })?;
    let mut builder = Envelope::builder(aggregate, event.ty(), version)
        .event_id(event.id())
        .timestamp(time.fixed_offset())
        .payload(payload);
    if let Some(tenant) = integer(event, TENANT_ID)? {
        builder = builder.tenant_id(tenant);
    }
    if let Some(trace) = event.extension(TRACE_ID) {
        builder = builder.trace_id(text(trace));
    }
    if let Some(correlation) = event.extension(CORRELATION_ID) {
        builder = builder.correlation_id(text(correlation));
    }
    builder.build()
}

fn sdk_error(what: &str, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::new(ErrorKind::Serialization, format!("CloudEvents {what}")).with_source(e)
}

/// A structured-mode message of `envelope` for `topic`: the event as JSON,
/// `content-type: application/cloudevents+json`, keyed by the aggregate id.
///
/// # Errors
/// As [`to_cloud_event`].
pub fn structured_message(envelope: &Envelope, source: &str, topic: &str) -> Result<Message> {
    let event = to_cloud_event(envelope, source)?;
    let body = serde_json::to_vec(&event)?;
    Ok(Message::new(topic, body)
        .with_key(envelope.aggregate_id.clone())
        .with_header(CONTENT_TYPE, STRUCTURED_CONTENT_TYPE)
        .with_dedup_id(envelope.event_id.clone()))
}

/// A binary-mode message of `envelope` for `topic`: the body is the
/// payload, the attributes are headers named for `binding`.
///
/// # Errors
/// As [`to_cloud_event`].
pub fn binary_message(envelope: &Envelope, source: &str, topic: &str, binding: Binding) -> Result<Message> {
    let event = to_cloud_event(envelope, source)?;
    let writer = Writer {
        message: Message::new(topic, Bytes::new())
            .with_key(envelope.aggregate_id.clone())
            .with_dedup_id(envelope.event_id.clone()),
        binding,
    };
    event
        .deserialize_binary(writer)
        .map_err(|e| sdk_error("binary encoding failed", e))
}

/// The envelope in a CloudEvents message, structured (by its
/// `content-type`) or binary (a `specversion` header named for `binding`).
///
/// # Errors
/// [`Serialization`](ErrorKind::Serialization) when the message is not a
/// CloudEvent (no structured content type, no spec version header) or its
/// JSON is invalid; [`Validation`](ErrorKind::Validation) as
/// [`from_cloud_event`].
pub fn from_message(message: &Message, binding: Binding) -> Result<Envelope> {
    let reader = Reader {
        headers: &message.headers,
        body: &message.payload,
        binding,
    };
    let event = MessageDeserializer::into_event(reader)
        .map_err(|e| sdk_error("message is not a valid CloudEvent", e))?;
    from_cloud_event(&event)
}

/// Writes an event into a [`Message`] in binary mode.
struct Writer {
    message: Message,
    binding: Binding,
}

impl BinarySerializer<Message> for Writer {
    fn set_spec_version(mut self, spec_version: SpecVersion) -> cloudevents::message::Result<Self> {
        let name = format!("{}specversion", self.binding.prefix());
        self.message.headers.insert(name, spec_version.to_string());
        Ok(self)
    }

    fn set_attribute(
        mut self,
        name: &str,
        value: MessageAttributeValue,
    ) -> cloudevents::message::Result<Self> {
        let header = match name {
            "datacontenttype" => CONTENT_TYPE.to_owned(),
            _ => format!("{}{name}", self.binding.prefix()),
        };
        self.message.headers.insert(header, value.to_string());
        Ok(self)
    }

    fn set_extension(self, name: &str, value: MessageAttributeValue) -> cloudevents::message::Result<Self> {
        self.set_attribute(name, value)
    }

    fn end_with_data(mut self, bytes: Vec<u8>) -> cloudevents::message::Result<Message> {
        self.message.payload = bytes.into();
        Ok(self.message)
    }

    fn end(self) -> cloudevents::message::Result<Message> {
        Ok(self.message)
    }
}

/// Reads an event from a message's headers and body.
struct Reader<'a> {
    headers: &'a Headers,
    body: &'a Bytes,
    binding: Binding,
}

impl Reader<'_> {
    fn spec_version_header(&self) -> String {
        format!("{}specversion", self.binding.prefix())
    }
}

impl BinaryDeserializer for Reader<'_> {
    fn deserialize_binary<R: Sized, V: BinarySerializer<R>>(
        self,
        visitor: V,
    ) -> cloudevents::message::Result<R> {
        if self.encoding() != Encoding::BINARY {
            return Err(cloudevents::message::Error::WrongEncoding {});
        }
        let version = self.headers.get(&self.spec_version_header()).unwrap_or_default();
        let version = SpecVersion::try_from(version)?;
        let names = version.attribute_names();
        let mut visitor = visitor.set_spec_version(version)?;
        if let Some(t) = self.headers.get(CONTENT_TYPE) {
            visitor =
                visitor.set_attribute("datacontenttype", MessageAttributeValue::String(t.to_owned()))?;
        }
        let prefix = self.binding.prefix();
        let spec_header = self.spec_version_header();
        let attributes: HashMap<&str, &str> = self
            .headers
            .iter()
            .filter(|(n, _)| !n.eq_ignore_ascii_case(&spec_header))
            .filter_map(|(n, v)| {
                let lower = n.get(..prefix.len())?;
                lower
                    .eq_ignore_ascii_case(prefix)
                    .then(|| (&n[prefix.len()..], v))
            })
            .collect();
        for (name, value) in attributes {
            let name = name.to_ascii_lowercase();
            let value = MessageAttributeValue::String(value.to_owned());
            visitor = match names.contains(&name.as_str()) {
                true => visitor.set_attribute(&name, value)?,
                false => visitor.set_extension(&name, value)?,
            };
        }
        match self.body.is_empty() {
            true => visitor.end(),
            false => visitor.end_with_data(self.body.to_vec()),
        }
    }
}

impl StructuredDeserializer for Reader<'_> {
    fn deserialize_structured<R: Sized, V: StructuredSerializer<R>>(
        self,
        visitor: V,
    ) -> cloudevents::message::Result<R> {
        if self.encoding() != Encoding::STRUCTURED {
            return Err(cloudevents::message::Error::WrongEncoding {});
        }
        visitor.set_structured_event(self.body.to_vec())
    }
}

impl MessageDeserializer for Reader<'_> {
    fn encoding(&self) -> Encoding {
        let structured = self
            .headers
            .get(CONTENT_TYPE)
            .is_some_and(|t| t.starts_with(STRUCTURED_CONTENT_TYPE));
        if structured {
            Encoding::STRUCTURED
        } else if self.headers.get(&self.spec_version_header()).is_some() {
            Encoding::BINARY
        } else {
            Encoding::UNKNOWN
        }
    }
}
