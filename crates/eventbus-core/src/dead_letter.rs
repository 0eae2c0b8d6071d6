//! The one way a dead letter is built, used by subscriptions and the outbox
//! relay: a copy of the message on the dead-letter topic with
//! `X-Original-Topic` and `X-Error-Message` (the Go SDK's header names), and
//! a dedup id of its own.

use crate::headers;
use crate::message::Message;

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
    dead
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
}
