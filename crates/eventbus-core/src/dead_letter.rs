//! The one way a dead letter is built, used by subscriptions and the outbox
//! relay: a copy of the message on the dead-letter topic with
//! `X-Original-Topic` and `X-Error-Message` (the Go SDK's header names), and
//! a dedup id of its own; and the one way it is sent back ([`replay`], used
//! by `eventbus dlq replay`).

use serde::{Deserialize, Serialize};

use crate::headers;
use crate::message::Message;

/// Where messages go once their attempts are exhausted: the one dead-letter
/// setting of subscriptions (`consumer.dead_letter`, [`SubscribeOptions`](crate::SubscribeOptions))
/// and of the outbox relay.
///
/// In configuration files: `dead_letter = { suffix = ".dlq" }`,
/// `dead_letter = { topic = "all.dlq" }` or `dead_letter = "disabled"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadLetterPolicy {
    /// `<topic><suffix>`. The Go SDK's convention is `.dlq`.
    Suffix(String),
    /// One fixed topic for every source topic.
    Topic(String),
    /// No dead-letter topic. A subscription parks the aggregate instead
    /// (retried with capped backoff, reported stalled in health, until the
    /// handler succeeds); the outbox relay only marks the row
    /// `dead_lettered` in its table.
    Disabled,
}

impl Default for DeadLetterPolicy {
    /// `Suffix(".dlq")`, as the Go SDK.
    fn default() -> Self {
        Self::suffix(".dlq")
    }
}

impl DeadLetterPolicy {
    /// `<topic><suffix>`.
    pub fn suffix(suffix: impl Into<String>) -> Self {
        Self::Suffix(suffix.into())
    }

    /// One fixed topic.
    pub fn topic(topic: impl Into<String>) -> Self {
        Self::Topic(topic.into())
    }

    /// The dead-letter topic of `topic`; `None` when disabled.
    pub fn topic_for(&self, topic: &str) -> Option<String> {
        match self {
            Self::Suffix(suffix) => Some(format!("{topic}{suffix}")),
            Self::Topic(t) => Some(t.clone()),
            Self::Disabled => None,
        }
    }
}

/// Longest `X-Error-Message` header value, in bytes: headers must stay
/// small (NATS counts them in `max_payload`, default 1 MiB).
pub const MAX_ERROR_HEADER_BYTES: usize = 1024;

/// Suffix of a dead letter's dedup id (`<event id>/dead-letter`): the stream
/// that holds the original would otherwise drop the copy as a duplicate.
pub const DEDUP_SUFFIX: &str = "/dead-letter";

/// The dead letter of `message` (which came from `original_topic`), bound for
/// `dead_letter_topic`: same body, key and headers, plus `X-Original-Topic`
/// and `X-Error-Message` = `reason` made header-safe by [`header_safe`].
/// Its dedup id is the event id (`X-Event-ID`, else the message's own dedup
/// id) followed by [`DEDUP_SUFFIX`]; none when neither is known.
pub fn dead_letter(
    message: &Message,
    original_topic: &str,
    dead_letter_topic: &str,
    reason: &str,
) -> Message {
    let mut dead = message.clone();
    dead.topic = dead_letter_topic.to_owned();
    dead.headers.insert(headers::ORIGINAL_TOPIC, original_topic);
    dead.headers.insert(headers::ERROR_MESSAGE, header_safe(reason));
    let id = message
        .headers
        .get(headers::EVENT_ID)
        .map(str::to_owned)
        .or_else(|| message.dedup_id.clone());
    dead.dedup_id = id.map(|id| format!("{id}{DEDUP_SUFFIX}"));
    if dead.key.is_none() {
        // A broker without record keys (NATS) still places the dead letter
        // by its aggregate (a partitioned dead-letter topic, a redrive).
        dead.key = message
            .headers
            .get(headers::AGGREGATE_ID)
            .map(|a| bytes::Bytes::copy_from_slice(a.as_bytes()));
    }
    dead
}

/// The message that sends dead letter `dead` (read from the dead-letter
/// topic at `from`, written `<dead-letter topic>@<position>`) back to `to`:
/// same body and key, the dead-letter headers (`X-Original-Topic`,
/// `X-Error-Message`) removed, `X-Replayed-From` = `from` added. Its dedup id
/// is `<event id>/replay/<from>`: distinct from the original's (which a
/// NATS stream may still remember) and the same for a second replay of the
/// same dead letter, which the broker's dedup window then drops. A message
/// without a key gets its `X-Aggregate-ID` as key.
pub fn replay(dead: &Message, to: &str, from: &str) -> Message {
    let mut out = dead.clone();
    out.topic = to.to_owned();
    out.headers.remove(headers::ORIGINAL_TOPIC);
    out.headers.remove(headers::ERROR_MESSAGE);
    out.headers.insert(headers::REPLAYED_FROM, from);
    let id = dead
        .headers
        .get(headers::EVENT_ID)
        .map(str::to_owned)
        .or_else(|| {
            dead.dedup_id
                .as_ref()
                .and_then(|d| d.strip_suffix(DEDUP_SUFFIX).map(str::to_owned))
        });
    out.dedup_id = id.map(|id| format!("{id}/replay/{from}"));
    if out.key.is_none() {
        out.key = dead
            .headers
            .get(headers::AGGREGATE_ID)
            .map(|a| bytes::Bytes::copy_from_slice(a.as_bytes()));
    }
    out
}

/// One line of at most [`MAX_ERROR_HEADER_BYTES`] bytes: control characters
/// (CR and LF among them, which NATS headers cannot hold) become spaces, and
/// the text is cut at a character boundary.
pub fn header_safe(reason: &str) -> String {
    let mut s: String = reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if s.len() > MAX_ERROR_HEADER_BYTES {
        let mut end = MAX_ERROR_HEADER_BYTES;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_letter_carries_its_origin_a_safe_reason_and_its_own_dedup_id() {
        let m = Message::new("orders", "{}")
            .with_header(headers::EVENT_ID, "e-1")
            .with_dedup_id("e-1");
        let long = format!("bad\r\nthing {}", "é".repeat(2_000));
        let d = dead_letter(&m, "orders", "orders.dlq", &long);
        assert_eq!(d.topic, "orders.dlq");
        assert_eq!(d.headers.get(headers::ORIGINAL_TOPIC), Some("orders"));
        let reason = d.headers.get(headers::ERROR_MESSAGE).unwrap();
        assert!(reason.starts_with("bad  thing "));
        assert!(reason.len() <= MAX_ERROR_HEADER_BYTES);
        assert_eq!(d.dedup_id.as_deref(), Some("e-1/dead-letter"));
        assert_eq!(d.payload, m.payload);
        let raw = dead_letter(&Message::new("t", "x"), "t", "t.dlq", "r");
        assert_eq!(raw.dedup_id, None);
    }

    #[test]
    fn a_replay_drops_the_dead_letter_headers_and_names_its_source() {
        let m = Message::new("orders", "{}")
            .with_header(headers::EVENT_ID, "e-1")
            .with_header(headers::AGGREGATE_ID, "o-1")
            .with_header("X-Custom", "kept");
        let dead = dead_letter(&m, "orders", "orders.dlq", "boom");
        let back = replay(&dead, "orders", "orders.dlq@7");
        assert_eq!(back.topic, "orders");
        assert_eq!(back.headers.get(headers::ORIGINAL_TOPIC), None);
        assert_eq!(back.headers.get(headers::ERROR_MESSAGE), None);
        assert_eq!(back.headers.get(headers::REPLAYED_FROM), Some("orders.dlq@7"));
        assert_eq!(back.headers.get("X-Custom"), Some("kept"));
        assert_eq!(back.dedup_id.as_deref(), Some("e-1/replay/orders.dlq@7"));
        assert_eq!(back.key.as_deref(), Some(&b"o-1"[..]));
        assert_eq!(back.payload, m.payload);
    }
}
