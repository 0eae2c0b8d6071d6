//! The envelope ⇄ broker message mapping, both ways: body, headers, record
//! key and dedup id on publish; body first, then headers, then key on
//! receive (ORIGIN.md's order); and what a publish result reports about an
//! envelope or a raw message. The header names and the header ⇄ envelope
//! field mapping live in [`headers`](crate::headers).

use bytes::Bytes;

use crate::envelope::{Envelope, Payload};
use crate::error::{Error, ErrorKind, Result};
use crate::headers;
use crate::message::Message;
use crate::publish::ResultMeta;

/// The broker message of an envelope publish: body = the envelope's JSON,
/// key = the aggregate id (Kafka keeps an aggregate in one partition),
/// the `X-Event-*` headers, dedup id = the event id.
///
/// # Errors
/// [`Serialization`](ErrorKind::Serialization) when the envelope cannot be encoded.
pub(crate) fn envelope_message(topic: &str, envelope: &Envelope) -> Result<Message> {
    Ok(Message {
        topic: topic.to_owned(),
        key: Some(Bytes::copy_from_slice(envelope.aggregate_id.as_bytes())),
        headers: headers::envelope_headers(envelope),
        payload: envelope.encode()?,
        dedup_id: Some(envelope.event_id.clone()),
    })
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

/// The body as an envelope; failing that, an envelope rebuilt from its
/// `X-Event-*` headers around a raw JSON body.
///
/// # Errors
/// The body's decode error when there are no envelope headers, else the
/// header mapping's error.
pub(crate) fn decode_envelope(message: &Message) -> Result<Envelope> {
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
    headers::envelope_from_headers(&message.headers, payload?)
}

/// The aggregate id of a message that is not a valid envelope: the
/// `X-Aggregate-ID` header, then the record key (ORIGIN.md's order after the body).
pub(crate) fn fallback_aggregate_id(message: &Message) -> Option<String> {
    let from_header = message.headers.get(headers::AGGREGATE_ID).map(str::to_owned);
    let from_key = || {
        message
            .key
            .as_ref()
            .and_then(|k| String::from_utf8(k.to_vec()).ok())
    };
    from_header.or_else(from_key).filter(|id| !id.is_empty())
}
