//! How the commands show a message: one line of text, or one JSON object.

use eventbus::{BrowsedMessage, Envelope, Position, codec, headers};
use serde::Serialize;

/// `seq 12` (NATS, memory) or `p3@45` (Kafka partition 3, offset 45).
pub(crate) fn position(p: &Position) -> String {
    match p {
        Position::Sequence(s) => format!("seq {s}"),
        Position::Offset { partition, offset } => format!("p{partition}@{offset}"),
    }
}

/// The position as an id: `12` (sequence) or `3:45` (partition 3, offset
/// 45); `<dead-letter topic>@<this>` names a dead letter (`X-Replayed-From`,
/// the replay ledger, `dlq show`).
pub(crate) fn position_id(p: &Position) -> String {
    match p {
        Position::Sequence(s) => s.to_string(),
        Position::Offset { partition, offset } => format!("{partition}:{offset}"),
    }
}

/// A browsed message as the commands print it (`--json`: this object).
#[derive(Debug, Serialize)]
pub(crate) struct Shown {
    /// Where the broker stored it (see [`position_id`]).
    pub(crate) position: String,
    /// The envelope, when the body is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) envelope: Option<serde_json::Value>,
    /// Why the body is not an envelope.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) not_an_envelope: Option<String>,
    /// The body as text (lossy UTF-8), with `--raw` or when not an envelope.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) body: Option<String>,
    /// Broker headers, with `--headers` (always for dead letters).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) headers: Option<std::collections::BTreeMap<String, String>>,
}

/// The envelope in `m`, or why there is none.
pub(crate) fn envelope_of(m: &BrowsedMessage) -> Result<Envelope, String> {
    codec::decode_envelope(&m.message).map_err(|e| match std::error::Error::source(&e) {
        Some(source) => format!("{e}: {source}"),
        None => e.to_string(),
    })
}

/// What to print of `m`.
pub(crate) fn shown(m: &BrowsedMessage, with_headers: bool, raw: bool) -> Shown {
    let envelope = if raw { Err(String::new()) } else { envelope_of(m) };
    let headers = with_headers.then(|| {
        m.message
            .headers
            .iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    });
    match envelope {
        Ok(e) => Shown {
            position: position_id(&m.position),
            envelope: e
                .encode()
                .ok()
                .and_then(|bytes| serde_json::from_slice(&bytes).ok()),
            not_an_envelope: None,
            body: None,
            headers,
        },
        Err(reason) => Shown {
            position: position_id(&m.position),
            envelope: None,
            not_an_envelope: (!raw).then_some(reason),
            body: Some(String::from_utf8_lossy(&m.message.payload).into_owned()),
            headers,
        },
    }
}

/// One line of text for `m`: position, aggregate id and version, event
/// type, event id, timestamp and payload; or the body of a message that is
/// not an envelope.
pub(crate) fn line(m: &BrowsedMessage, with_headers: bool, raw: bool) -> String {
    let mut out = match (raw, envelope_of(m)) {
        (false, Ok(e)) => format!(
            "{:<14} {} v{} {} id={} at={} payload={}",
            position(&m.position),
            e.aggregate_id,
            e.event_version,
            e.event_type,
            e.event_id,
            e.timestamp.to_rfc3339(),
            e.payload.get()
        ),
        (true, _) => format!(
            "{:<14} {}",
            position(&m.position),
            String::from_utf8_lossy(&m.message.payload)
        ),
        (false, Err(reason)) => format!(
            "{:<14} (not an envelope: {reason}) {}",
            position(&m.position),
            String::from_utf8_lossy(&m.message.payload)
        ),
    };
    if with_headers {
        for (k, v) in m.message.headers.iter() {
            out.push_str(&format!("\n    {k}: {v}"));
        }
    }
    out
}

/// The dead-letter headers of `m`: (original topic, error message).
pub(crate) fn dead_letter_headers(m: &BrowsedMessage) -> (Option<&str>, Option<&str>) {
    (
        m.message.headers.get(headers::ORIGINAL_TOPIC),
        m.message.headers.get(headers::ERROR_MESSAGE),
    )
}
