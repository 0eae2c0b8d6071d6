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
/// copies the pairs (copy on write). All values share one text buffer, so
/// an envelope's headers take three allocations however many there are (a
/// buffer per value cost about five more on every publish and delivery);
/// a name other than the envelope's and the trace context's
/// (`traceparent`, `tracestate`) takes one more.
#[derive(Clone, Default)]
pub struct Headers(std::sync::Arc<Pairs>);

/// A header name: the envelope's own names are static, so building the
/// headers of an envelope or of a received message copies no name.
type Name = std::borrow::Cow<'static, str>;

/// The pairs behind [`Headers`].
#[derive(Clone, Default)]
struct Pairs {
    /// Every value back to back (and those replaced or removed, until
    /// [`Pairs::compact`] drops them).
    text: String,
    /// Each name with its value's byte range in `text`, in insertion order.
    index: Vec<(Name, std::ops::Range<usize>)>,
    /// Bytes of `text` no pair points at any more.
    unused: usize,
}

impl Pairs {
    fn value(&self, range: &std::ops::Range<usize>) -> &str {
        &self.text[range.clone()]
    }

    /// Appends `value` to the text; its range.
    fn append(&mut self, value: &str) -> std::ops::Range<usize> {
        let start = self.text.len();
        self.text.push_str(value);
        start..self.text.len()
    }

    /// Rebuilds the text without unused bytes once they are most of it
    /// (values replaced or removed again and again stay bounded).
    fn compact(&mut self) {
        if self.unused < 256 || self.unused * 2 < self.text.len() {
            return;
        }
        let mut text = String::with_capacity(self.text.len() - self.unused);
        for (_, range) in &mut self.index {
            let start = text.len();
            text.push_str(&self.text[range.clone()]);
            *range = start..text.len();
        }
        self.text = text;
        self.unused = 0;
    }
}

/// Every header name the bus writes itself: the envelope's, a dead
/// letter's and a replay's (this module's constants) and the W3C trace
/// context's (`traceparent`, `tracestate`). [`Headers::insert`] keeps these
/// names without copying them; a backend may likewise hand them to its
/// client as static names (all are plain ASCII tokens).
pub const BUS_NAMES: [&str; 13] = [
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
    crate::trace::TRACEPARENT,
    crate::trace::TRACESTATE,
];

/// `name` as one of [`BUS_NAMES`] (compared exactly), if it is one.
pub fn bus_name(name: &str) -> Option<&'static str> {
    BUS_NAMES.iter().find(|known| **known == name).copied()
}

impl Headers {
    /// No headers, with room for `pairs` (count) and `text` (bytes of
    /// values) without growing: the codec's fast path.
    pub(crate) fn with_room(pairs: usize, text: usize) -> Self {
        Self(std::sync::Arc::new(Pairs {
            text: String::with_capacity(text),
            index: Vec::with_capacity(pairs),
            unused: 0,
        }))
    }

    /// Appends a pair whose name is not among those already set (no
    /// case-insensitive merge): the codec's fast path.
    pub(crate) fn push_distinct(&mut self, name: &'static str, value: &str) {
        let pairs = std::sync::Arc::make_mut(&mut self.0);
        let range = pairs.append(value);
        pairs.index.push((Name::Borrowed(name), range));
    }

    /// No headers.
    pub fn new() -> Self {
        Self::default()
    }

    /// No headers, with room for `n` (count) without growing: a backend
    /// converting a received message's headers knows how many come.
    pub fn with_capacity(n: usize) -> Self {
        // Envelope header values are 36 bytes or less, most of them.
        Self::with_room(n, n * 32)
    }

    /// Sets `name` to `value`, replacing an existing value of that name.
    /// The envelope's own header names (this module's constants, spelled
    /// exactly so) are not copied: a received message's headers copy only
    /// their values, into the text buffer they share.
    pub fn insert(&mut self, name: impl AsRef<str>, value: impl AsRef<str>) {
        let (name, value) = (name.as_ref(), value.as_ref());
        let pairs = std::sync::Arc::make_mut(&mut self.0);
        let range = pairs.append(value);
        match pairs.index.iter_mut().find(|(n, _)| n.eq_ignore_ascii_case(name)) {
            Some(slot) => {
                let old = std::mem::replace(&mut slot.1, range);
                pairs.unused += old.len();
                pairs.compact();
            }
            None => {
                let name = match bus_name(name) {
                    Some(known) => Name::Borrowed(known),
                    None => Name::Owned(name.to_owned()),
                };
                pairs.index.push((name, range));
            }
        }
    }

    /// The value of `name`, matched case-insensitively.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .index
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, range)| self.0.value(range))
    }

    /// Removes `name` and returns its value.
    pub fn remove(&mut self, name: &str) -> Option<String> {
        let i = self
            .0
            .index
            .iter()
            .position(|(n, _)| n.eq_ignore_ascii_case(name))?;
        let pairs = std::sync::Arc::make_mut(&mut self.0);
        let (_, range) = pairs.index.remove(i);
        let value = pairs.value(&range).to_owned();
        pairs.unused += range.len();
        pairs.compact();
        Some(value)
    }

    /// The pairs in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0
            .index
            .iter()
            .map(|(n, range)| (n.as_ref(), self.0.value(range)))
    }

    /// Number of headers.
    pub fn len(&self) -> usize {
        self.0.index.len()
    }

    /// Whether there are no headers.
    pub fn is_empty(&self) -> bool {
        self.0.index.is_empty()
    }
}

impl std::fmt::Debug for Headers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Headers")
            .field(&self.iter().collect::<Vec<_>>())
            .finish()
    }
}

/// Equal when the same pairs come in the same order (names compared as
/// spelled; unused text does not count).
impl PartialEq for Headers {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl Eq for Headers {}

impl<K: AsRef<str>, V: AsRef<str>> FromIterator<(K, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut h = Headers::new();
        for (k, v) in iter {
            h.insert(k, v);
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
    fn values_replaced_and_removed_again_and_again_leave_a_bounded_text() {
        let mut h = Headers::new();
        h.insert("keep", "k");
        for i in 0..=10_000 {
            h.insert("x-n", format!("value {i}"));
            if i % 3 == 0 {
                assert_eq!(h.remove("X-N"), Some(format!("value {i}")));
            }
        }
        assert_eq!(
            h.iter().collect::<Vec<_>>(),
            [("keep", "k"), ("x-n", "value 10000")]
        );
        assert!(h.0.text.len() < 1_024, "text of {} bytes", h.0.text.len());
    }

    /// Against a `Vec` of pairs as the model, with multi-byte values and
    /// clones taken along the way (copy on write): the same pairs after
    /// every step, the unused bytes counted exactly, the text bounded.
    #[test]
    fn headers_behave_like_a_vec_of_pairs_and_keep_their_text_bounded() {
        let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let names = ["X-Event-ID", "x-event-id", "a", "A", "b", "X-Trace-ID"];
        let values: Vec<String> = vec![
            String::new(),
            "v".into(),
            "é".into(),
            "日本語".into(),
            "ü".repeat(200),
            "x".repeat(300),
        ];
        let (mut h, mut model) = (Headers::new(), Vec::<(String, String)>::new());
        let pairs = |h: &Headers| {
            h.iter()
                .map(|(n, v)| (n.to_owned(), v.to_owned()))
                .collect::<Vec<_>>()
        };
        for step in 0..20_000 {
            let snapshot = (step % 2 == 0).then(|| (h.clone(), model.clone()));
            let name = names[(next() % names.len() as u64) as usize];
            if next() % 3 == 0 {
                let want = model
                    .iter()
                    .position(|(n, _)| n.eq_ignore_ascii_case(name))
                    .map(|i| model.remove(i).1);
                assert_eq!(h.remove(name), want, "step {step}");
            } else {
                let value = &values[(next() % values.len() as u64) as usize];
                match model.iter_mut().find(|(n, _)| n.eq_ignore_ascii_case(name)) {
                    Some(slot) => slot.1 = value.clone(),
                    None => model.push((name.to_owned(), value.clone())),
                }
                h.insert(name, value);
            }
            assert_eq!(pairs(&h), model, "step {step}");
            if let Some((old, old_model)) = snapshot {
                assert_eq!(pairs(&old), old_model, "a clone changed, step {step}");
            }
            let live: usize = model.iter().map(|(_, v)| v.len()).sum();
            assert_eq!(h.0.text.len() - h.0.unused, live, "step {step}");
            assert!(
                h.0.text.len() <= 2 * live + 512,
                "text {} live {live}",
                h.0.text.len()
            );
        }
    }

    #[test]
    fn headers_equal_by_their_pairs_not_their_text() {
        let mut a: Headers = [("a", "1"), ("b", "2")].into_iter().collect();
        a.insert("a", "1");
        let b: Headers = [("a", "1"), ("b", "2")].into_iter().collect();
        assert_eq!(a, b);
        assert_ne!(a, [("b", "2"), ("a", "1")].into_iter().collect::<Headers>());
    }

    #[test]
    fn a_clone_is_not_changed_by_writes_to_the_original() {
        let mut a: Headers = [("k", "1")].into_iter().collect();
        let b = a.clone();
        a.insert("k", "2");
        assert_eq!((a.get("k"), b.get("k")), (Some("2"), Some("1")));
    }
}
