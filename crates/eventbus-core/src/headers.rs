//! Broker headers ([`Headers`]) and the header names of the envelope's
//! fields; the mapping between an envelope and its headers is in
//! [`codec`](crate::codec).
//!
//! Header names are those of the original Go SDK (see `ORIGIN.md`), so services
//! written against it read ours and we read theirs.

/// Header carrying [`Envelope::event_id`](crate::Envelope::event_id).
pub const EVENT_ID: &str = "X-Event-ID";
/// Header carrying [`Envelope::aggregate_id`](crate::Envelope::aggregate_id).
pub const AGGREGATE_ID: &str = "X-Aggregate-ID";
/// Header carrying [`Envelope::event_type`](crate::Envelope::event_type).
pub const EVENT_TYPE: &str = "X-Event-Type";
/// Header carrying [`Envelope::event_version`](crate::Envelope::event_version) in decimal.
pub const EVENT_VERSION: &str = "X-Event-Version";
/// Header carrying [`Envelope::timestamp`](crate::Envelope::timestamp) in RFC 3339 with nanoseconds.
pub const TIMESTAMP: &str = "X-Timestamp";
/// Header carrying [`Envelope::trace_id`](crate::Envelope::trace_id), when set.
pub const TRACE_ID: &str = "X-Trace-ID";
/// Header carrying [`Envelope::correlation_id`](crate::Envelope::correlation_id), when set.
pub const CORRELATION_ID: &str = "X-Correlation-ID";
/// Header carrying [`Envelope::tenant_id`](crate::Envelope::tenant_id) in decimal, when set.
pub const TENANT_ID: &str = "X-Tenant-ID";
/// Added to a dead-lettered message: the topic it was consumed from.
pub const ORIGINAL_TOPIC: &str = "X-Original-Topic";
/// Added to a dead-lettered message: the last handler error, as text.
pub const ERROR_MESSAGE: &str = "X-Error-Message";
/// Added to a replayed dead letter ([`dead_letter::replay`](crate::dead_letter::replay)):
/// `<dead-letter topic>@<position>` it was replayed from.
pub const REPLAYED_FROM: &str = "X-Replayed-From";

/// Ordered broker headers: name/value pairs, names matched case-insensitively.
///
/// Values are UTF-8 text; Kafka and NATS both carry them as bytes on the wire.
/// Cloning is a reference-count increment; the first change after a clone
/// copies the pairs (copy on write).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(std::sync::Arc<Vec<(Name, String)>>);

/// A header name: the envelope's own names are static, so building the
/// headers of an envelope allocates only their values.
type Name = std::borrow::Cow<'static, str>;

/// The names [`Headers::insert`] keeps without copying.
const KNOWN: [&str; 11] = [
    EVENT_ID,
    AGGREGATE_ID,
    EVENT_TYPE,
    EVENT_VERSION,
    TIMESTAMP,
    TRACE_ID,
    CORRELATION_ID,
    TENANT_ID,
    ORIGINAL_TOPIC,
    ERROR_MESSAGE,
    REPLAYED_FROM,
];

impl Headers {
    /// Headers from pairs whose names are already distinct (no
    /// case-insensitive merge): the codec's fast path.
    pub(crate) fn from_distinct(pairs: Vec<(Name, String)>) -> Self {
        Self(std::sync::Arc::new(pairs))
    }

    /// No headers.
    pub fn new() -> Self {
        Self::default()
    }

    /// No headers, with room for `n` (count) without growing: a backend
    /// converting a received message's headers knows how many come.
    pub fn with_capacity(n: usize) -> Self {
        Self(std::sync::Arc::new(Vec::with_capacity(n)))
    }

    /// Sets `name` to `value`, replacing an existing value of that name.
    /// The envelope's own header names (this module's constants, spelled
    /// exactly so) are not copied: a received message's headers allocate
    /// only their values.
    pub fn insert(&mut self, name: impl AsRef<str>, value: impl Into<String>) {
        let (name, value) = (name.as_ref(), value.into());
        let pairs = std::sync::Arc::make_mut(&mut self.0);
        match pairs.iter_mut().find(|(n, _)| n.eq_ignore_ascii_case(name)) {
            Some(slot) => slot.1 = value,
            None => {
                let name = match KNOWN.iter().find(|known| **known == name) {
                    Some(known) => Name::Borrowed(known),
                    None => Name::Owned(name.to_owned()),
                };
                pairs.push((name, value));
            }
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
        self.0.iter().map(|(n, v)| (n.as_ref(), v.as_str()))
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
            h.insert(k.into(), v);
        }
        h
    }
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
}
