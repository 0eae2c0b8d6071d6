//! The domain-event [`Envelope`]: its JSON format, validation and builder.
//!
//! The JSON field names and rules are those of the original Go SDK
//! (`ORIGIN.md`, "The envelope"), so both exchange envelopes on the wire.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Datelike, FixedOffset, Timelike, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

use crate::error::{Error, Result, ValidationError};

/// Longest accepted `aggregate_id`, in characters (ORIGIN.md).
pub const MAX_AGGREGATE_ID_LEN: usize = 256;
/// Longest accepted `event_id`, in characters (it becomes the NATS `Nats-Msg-Id`).
pub const MAX_EVENT_ID_LEN: usize = 256;

/// One domain event with its metadata, as exchanged on the wire.
///
/// JSON shape (fields as in the original SDK):
/// `{"event_id","aggregate_id","event_type","event_version","timestamp",
/// "trace_id"?,"correlation_id"?,"tenant_id"?,"payload"}`.
/// Optional fields are omitted when `None`; an empty string decodes as `None`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Unique id of the event; a UUIDv7 when generated. Used as the broker's dedup id.
    pub event_id: String,
    /// The aggregate this event belongs to: 1..=256 chars of `A-Z a-z 0-9 : _ - . /`.
    pub aggregate_id: String,
    /// The event's type name, non-blank (e.g. `OrderCreated`).
    pub event_type: String,
    /// Per-aggregate sequence number, > 0.
    pub event_version: i64,
    /// When the event was created, with the sender's zone offset, as the Go
    /// SDK writes it: RFC 3339 in Go's `RFC3339Nano` layout (fraction with
    /// trailing zeros trimmed, `Z` for UTC, else `+hh:mm`). Decoding and
    /// encoding keep the offset, so a re-published event keeps its text;
    /// equality and ordering are by instant.
    #[serde(with = "rfc3339")]
    pub timestamp: crate::Timestamp,
    /// Distributed-tracing id.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "non_empty"
    )]
    pub trace_id: Option<String>,
    /// Correlation id linking events of one business operation.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "non_empty"
    )]
    pub correlation_id: Option<String>,
    /// Tenant of the event, for multi-tenant services. Written as a JSON
    /// integer; read from an integer or, as Go SDK releases from late
    /// October 2025 to February 2026 write it, a string holding an integer
    /// (`"7"`; `""` reads as none).
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "tenant")]
    pub tenant_id: Option<i64>,
    /// The event body, raw JSON kept byte for byte.
    pub payload: Payload,
}

impl fmt::Debug for Envelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Envelope")
            .field("event_id", &self.event_id)
            .field("aggregate_id", &self.aggregate_id)
            .field("event_type", &self.event_type)
            .field("event_version", &self.event_version)
            .field("timestamp", &self.timestamp)
            .field("tenant_id", &self.tenant_id)
            .field("payload_bytes", &self.payload.len())
            .finish_non_exhaustive()
    }
}

impl Envelope {
    /// Starts a builder with the three fields every event needs; the event id
    /// (UUIDv7) and timestamp (now) are filled in by [`EnvelopeBuilder::build`].
    pub fn builder(
        aggregate_id: impl Into<String>,
        event_type: impl Into<String>,
        event_version: i64,
    ) -> EnvelopeBuilder {
        EnvelopeBuilder {
            aggregate_id: aggregate_id.into(),
            event_type: event_type.into(),
            event_version,
            event_id: None,
            timestamp: None,
            trace_id: None,
            correlation_id: None,
            tenant_id: None,
            payload: None,
        }
    }

    /// Checks the rules of ORIGIN.md.
    ///
    /// # Errors
    /// A [`ValidationError`] naming the first field that breaks a rule.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.event_id.trim().is_empty() {
            return Err(ValidationError::new("event_id", "must not be blank"));
        }
        if self.event_id.chars().count() > MAX_EVENT_ID_LEN {
            return Err(ValidationError::new("event_id", "longer than 256 characters"));
        }
        validate_aggregate_id(&self.aggregate_id)?;
        if self.event_type.trim().is_empty() {
            return Err(ValidationError::new("event_type", "must not be blank"));
        }
        if self.event_version <= 0 {
            return Err(ValidationError::new("event_version", "must be greater than 0"));
        }
        if self.payload.get().trim() == "null" {
            return Err(ValidationError::new("payload", "must not be null"));
        }
        Ok(())
    }

    /// Serializes to JSON bytes after validating.
    ///
    /// # Errors
    /// [`Validation`](crate::ErrorKind::Validation) when a rule is broken.
    pub fn encode(&self) -> Result<Bytes> {
        self.encode_with(TenantIdFormat::Integer)
    }

    /// Serializes to JSON bytes after validating, writing `tenant_id` in
    /// `format` (every other byte is as [`encode`](Envelope::encode) writes it).
    ///
    /// # Errors
    /// [`Validation`](crate::ErrorKind::Validation) when a rule is broken.
    pub fn encode_with(&self, format: TenantIdFormat) -> Result<Bytes> {
        self.encode_at(format, &format_timestamp(&self.timestamp))
    }

    /// [`encode_with`](Envelope::encode_with) with the timestamp already
    /// formatted (`format_timestamp`): a publish formats it once for the
    /// body and the `X-Timestamp` header. The buffer is sized for the
    /// payload up front, so the payload is copied once.
    pub(crate) fn encode_at(&self, format: TenantIdFormat, timestamp: &str) -> Result<Bytes> {
        self.validate()?;
        let tenant_id = self.tenant_id.map(|tenant| match format {
            TenantIdFormat::Integer => WireTenant::Integer(tenant),
            TenantIdFormat::String => WireTenant::String(tenant),
        });
        let wire = Wire {
            event_id: &self.event_id,
            aggregate_id: &self.aggregate_id,
            event_type: &self.event_type,
            event_version: self.event_version,
            timestamp,
            trace_id: self.trace_id.as_deref(),
            correlation_id: self.correlation_id.as_deref(),
            tenant_id,
            payload: &self.payload,
        };
        let fields: usize = [&self.event_id, &self.aggregate_id, &self.event_type]
            .iter()
            .map(|f| f.len())
            .sum::<usize>()
            + self.trace_id.as_ref().map_or(0, String::len)
            + self.correlation_id.as_ref().map_or(0, String::len);
        let mut out = Vec::with_capacity(WIRE_OVERHEAD + fields + timestamp.len() + self.payload.get().len());
        serde_json::to_writer(&mut out, &wire)?;
        Ok(Bytes::from(out))
    }

    /// Parses and validates JSON bytes. Never panics, whatever the input.
    ///
    /// # Errors
    /// [`Serialization`](crate::ErrorKind::Serialization) when the bytes are not
    /// an envelope, [`Validation`](crate::ErrorKind::Validation) when one is but
    /// breaks a rule.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let envelope: Envelope = match serde_json::from_slice(bytes) {
            Ok(envelope) => envelope,
            Err(e) => return Err(Self::decode_error(bytes, e)),
        };
        envelope.validate()?;
        Ok(envelope)
    }

    /// The error of bytes that are not an envelope, naming the field when
    /// one is at fault (serde_json names a missing field, not one of the
    /// wrong type): decoded again, off the fast path, tracking the path.
    #[cold]
    fn decode_error(bytes: &[u8], e: serde_json::Error) -> Error {
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let detailed = match serde_path_to_error::deserialize::<_, Envelope>(&mut de) {
            // `.` is the top level and `?` an unknown position (a syntax
            // error between fields): no field to name there.
            Err(pathed) if !matches!(pathed.path().to_string().as_str(), "" | "." | "?") => {
                format!("{}: {}", pathed.path(), pathed.inner())
            }
            _ => e.to_string(),
        };
        Error::new(
            crate::ErrorKind::Serialization,
            format!("not an envelope: {detailed}"),
        )
        .with_source(e)
    }
}

/// How [`Envelope::encode_with`] writes `tenant_id`.
///
/// The Go SDK writes an integer; its releases from late October 2025 to
/// February 2026 typed it as a string and cannot read the integer (their
/// decoder fails on `"tenant_id":7`). Every form is read whatever this says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TenantIdFormat {
    /// A JSON integer (`"tenant_id":7`), as the current Go SDK writes it. Default.
    #[default]
    Integer,
    /// A JSON string holding the integer (`"tenant_id":"7"`), for consumers
    /// on those older Go releases.
    String,
}

/// Bytes of an encoded envelope besides its fields' text: names, quotes,
/// separators, the version and tenant digits (an estimate; the buffer
/// grows past it if needed).
const WIRE_OVERHEAD: usize = 192;

/// The envelope's JSON as written: field for field and in the same order
/// as [`Envelope`]'s own serialization, with the timestamp already
/// formatted and `tenant_id` in the chosen [`TenantIdFormat`].
#[derive(Serialize)]
struct Wire<'a> {
    event_id: &'a str,
    aggregate_id: &'a str,
    event_type: &'a str,
    event_version: i64,
    timestamp: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    trace_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    correlation_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tenant_id: Option<WireTenant>,
    payload: &'a Payload,
}

/// `tenant_id` on the wire: `7` or `"7"`.
enum WireTenant {
    Integer(i64),
    String(i64),
}

impl Serialize for WireTenant {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match *self {
            WireTenant::Integer(n) => s.serialize_i64(n),
            WireTenant::String(n) => s.collect_str(&n),
        }
    }
}

/// Checks an aggregate id: 1..=256 characters of `A-Z a-z 0-9 : _ - . /`.
///
/// # Errors
/// A [`ValidationError`] on field `aggregate_id`.
pub fn validate_aggregate_id(id: &str) -> Result<(), ValidationError> {
    if id.is_empty() {
        return Err(ValidationError::new("aggregate_id", "must not be empty"));
    }
    if id.len() > MAX_AGGREGATE_ID_LEN {
        return Err(ValidationError::new("aggregate_id", "longer than 256 characters"));
    }
    match id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, ':' | '_' | '-' | '.' | '/')))
    {
        Some(c) => Err(ValidationError::new(
            "aggregate_id",
            format!("character {c:?} is not one of A-Z a-z 0-9 : _ - . /"),
        )),
        None => Ok(()),
    }
}

/// A new UUIDv7 event id, as lowercase hyphenated text.
pub fn new_event_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// `t` in Go's `time.RFC3339Nano` layout (`2006-01-02T15:04:05.999999999Z07:00`):
/// the fraction's trailing zeros trimmed (no fraction when zero), `Z` for a
/// zero offset, else `+hh:mm` / `-hh:mm`.
pub(crate) fn format_timestamp(t: &DateTime<FixedOffset>) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(36);
    let (date, time) = (t.date_naive(), t.time());
    if !(0..=9999).contains(&date.year()) {
        // chrono's own layout for a year of five digits or a sign.
        let _ = write!(out, "{}", t.format("%Y-%m-%dT%H:%M:%S"));
    } else {
        // The common case, written digit by digit: chrono's `format` parses
        // its pattern on every call, and this runs on every publish.
        let fields = [
            (date.year() as u32, 4, '-'),
            (date.month(), 2, '-'),
            (date.day(), 2, 'T'),
            (time.hour(), 2, ':'),
            (time.minute(), 2, ':'),
            // A leap second's nanoseconds run past 10^9: written as second 60.
            (time.second() + t.nanosecond() / 1_000_000_000, 2, ' '),
        ];
        for (value, width, separator) in fields {
            push_digits(&mut out, value, width);
            if separator != ' ' {
                out.push(separator);
            }
        }
    }
    let nanos = t.nanosecond() % 1_000_000_000; // a leap second's extra second is not written
    if nanos > 0 {
        let mut digits = 9;
        let mut fraction = nanos;
        while fraction % 10 == 0 {
            fraction /= 10;
            digits -= 1;
        }
        out.push('.');
        push_digits(&mut out, fraction, digits);
    }
    match t.offset().local_minus_utc() {
        0 => out.push('Z'),
        secs => {
            let (sign, secs) = if secs < 0 { ('-', -secs) } else { ('+', secs) };
            // Whole minutes, rounded as chrono's `%:z` rounds an offset with seconds.
            let minutes = (secs + 30) / 60;
            let _ = write!(out, "{sign}{:02}:{:02}", minutes / 60, minutes % 60);
        }
    }
    out
}

/// Appends the `width` lowest decimal digits of `value`, zero-padded.
fn push_digits(out: &mut String, value: u32, width: u32) {
    for i in (0..width).rev() {
        out.push(char::from(b'0' + ((value / 10u32.pow(i)) % 10) as u8));
    }
}

mod rfc3339 {
    use super::*;

    pub(super) fn serialize<S: Serializer>(t: &DateTime<FixedOffset>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_timestamp(t))
    }

    /// Parsed from the text as the decoder hands it over: no copy (serde's
    /// `Cow<str>` would always take one, on every decoded envelope).
    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<FixedOffset>, D::Error> {
        struct Text;
        impl serde::de::Visitor<'_> for Text {
            type Value = DateTime<FixedOffset>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an RFC 3339 timestamp")
            }

            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Self::Value, E> {
                DateTime::parse_from_rfc3339(s).map_err(E::custom)
            }

            /// A format that hands text over as bytes (as serde's `Cow<str>` took it).
            fn visit_bytes<E: serde::de::Error>(self, b: &[u8]) -> Result<Self::Value, E> {
                let s = std::str::from_utf8(b).map_err(E::custom)?;
                self.visit_str(s)
            }
        }
        d.deserialize_str(Text)
    }
}

/// A tenant id from a JSON integer or a string holding one.
fn tenant<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Tenant<'a> {
        Number(i64),
        #[serde(borrow)]
        Text(std::borrow::Cow<'a, str>),
    }
    match Option::<Tenant<'de>>::deserialize(d)? {
        None => Ok(None),
        Some(Tenant::Number(n)) => Ok(Some(n)),
        Some(Tenant::Text(t)) if t.is_empty() => Ok(None),
        Some(Tenant::Text(t)) => t.parse().map(Some).map_err(|_| {
            serde::de::Error::custom(format!(
                "tenant_id {t:?} is neither an integer nor a string holding one"
            ))
        }),
    }
}

fn non_empty<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(Option::<String>::deserialize(d)?.filter(|s| !s.is_empty()))
}

/// The event body: raw JSON, kept byte for byte and shared cheaply on clone.
///
/// Decoding an envelope copies the payload's bytes once and never parses it
/// into a value; encoding writes them back verbatim.
#[derive(Clone)]
pub struct Payload(Arc<RawValue>);

impl Payload {
    /// Wraps JSON text after checking it is one valid JSON value.
    ///
    /// # Errors
    /// [`Serialization`](crate::ErrorKind::Serialization) when `json` is not valid JSON.
    pub fn from_raw(json: impl Into<String>) -> Result<Self> {
        Ok(Self(Arc::from(RawValue::from_string(json.into())?)))
    }

    /// Serializes `value` to JSON.
    ///
    /// # Errors
    /// [`Serialization`](crate::ErrorKind::Serialization) when `value` cannot be serialized.
    pub fn from_json<T: Serialize + ?Sized>(value: &T) -> Result<Self> {
        Ok(Self(Arc::from(serde_json::value::to_raw_value(value)?)))
    }

    /// The JSON text.
    pub fn get(&self) -> &str {
        self.0.get()
    }

    /// Length of the JSON text in bytes.
    pub fn len(&self) -> usize {
        self.get().len()
    }

    /// Whether the JSON text is empty (never true for a valid payload).
    pub fn is_empty(&self) -> bool {
        self.get().is_empty()
    }

    /// Deserializes the payload into `T`.
    ///
    /// # Errors
    /// [`Serialization`](crate::ErrorKind::Serialization) when it does not fit `T`.
    pub fn deserialize<'a, T: Deserialize<'a>>(&'a self) -> Result<T> {
        Ok(serde_json::from_str(self.get())?)
    }
}

impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

impl Eq for Payload {}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.get())
    }
}

impl Serialize for Payload {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Payload {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Self(Arc::from(Box::<RawValue>::deserialize(d)?)))
    }
}

/// Builds an [`Envelope`]; see [`Envelope::builder`].
#[derive(Debug, Clone)]
#[must_use]
pub struct EnvelopeBuilder {
    aggregate_id: String,
    event_type: String,
    event_version: i64,
    event_id: Option<String>,
    timestamp: Option<DateTime<FixedOffset>>,
    trace_id: Option<String>,
    correlation_id: Option<String>,
    tenant_id: Option<i64>,
    payload: Option<Payload>,
}

impl EnvelopeBuilder {
    /// Uses this event id instead of a new UUIDv7.
    pub fn event_id(mut self, id: impl Into<String>) -> Self {
        self.event_id = Some(id.into());
        self
    }

    /// Uses this timestamp instead of now; its zone offset is kept on the
    /// wire (`DateTime<Utc>`, `DateTime<Local>` and `DateTime<FixedOffset>`
    /// all convert).
    pub fn timestamp(mut self, t: impl Into<DateTime<FixedOffset>>) -> Self {
        self.timestamp = Some(t.into());
        self
    }

    /// Sets the trace id; an empty string leaves it unset.
    pub fn trace_id(mut self, id: impl Into<String>) -> Self {
        self.trace_id = Some(id.into()).filter(|s: &String| !s.is_empty());
        self
    }

    /// Sets the correlation id; an empty string leaves it unset.
    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into()).filter(|s: &String| !s.is_empty());
        self
    }

    /// Sets the tenant id.
    pub fn tenant_id(mut self, id: i64) -> Self {
        self.tenant_id = Some(id);
        self
    }

    /// Sets an already-built payload.
    pub fn payload(mut self, payload: Payload) -> Self {
        self.payload = Some(payload);
        self
    }

    /// Serializes `value` as the payload.
    ///
    /// # Errors
    /// [`Serialization`](crate::ErrorKind::Serialization) when `value` cannot be serialized.
    pub fn json_payload<T: Serialize + ?Sized>(self, value: &T) -> Result<Self> {
        Ok(self.payload(Payload::from_json(value)?))
    }

    /// Fills the defaults and validates.
    ///
    /// # Errors
    /// [`Validation`](crate::ErrorKind::Validation) naming the field, when a
    /// rule is broken or no payload was given.
    pub fn build(self) -> Result<Envelope> {
        let payload = self
            .payload
            .ok_or_else(|| Error::from(ValidationError::new("payload", "is required")))?;
        let envelope = Envelope {
            event_id: self.event_id.unwrap_or_else(new_event_id),
            aggregate_id: self.aggregate_id,
            event_type: self.event_type,
            event_version: self.event_version,
            timestamp: self.timestamp.unwrap_or_else(|| Utc::now().fixed_offset()),
            trace_id: self.trace_id,
            correlation_id: self.correlation_id,
            tenant_id: self.tenant_id,
            payload,
        };
        envelope.validate()?;
        Ok(envelope)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layout through chrono's own formatting (the former implementation).
    fn reference_layout(t: &DateTime<FixedOffset>) -> String {
        let mut out = t.format("%Y-%m-%dT%H:%M:%S").to_string();
        let nanos = t.nanosecond() % 1_000_000_000;
        if nanos > 0 {
            out.push('.');
            out.push_str(format!("{nanos:09}").trim_end_matches('0'));
        }
        match t.offset().local_minus_utc() {
            0 => out.push('Z'),
            _ => out.push_str(&t.format("%:z").to_string()),
        }
        out
    }

    #[test]
    fn the_digit_by_digit_layout_matches_chronos() {
        let offsets = [0, 3600, -3600, 19_800, -34_200, 45_900, -1];
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for i in 0..20_000 {
            let secs = (next() % 400_000_000_000) as i64 - 100_000_000_000;
            let nanos = match i % 4 {
                0 => 0,
                1 => (next() % 1_000) as u32 * 1_000_000,
                2 => (next() % 1_000_000) as u32 * 1_000,
                _ => (next() % 1_000_000_000) as u32,
            };
            let offset = offsets[i % offsets.len()];
            let offset = match offset {
                -1 => -((next() % 86_000) as i32),
                fixed => fixed,
            };
            let offset = FixedOffset::east_opt(offset).unwrap();
            let Some(t) = DateTime::from_timestamp(secs, nanos) else {
                continue;
            };
            let t = t.with_timezone(&offset);
            assert_eq!(format_timestamp(&t), reference_layout(&t), "{t:?}");
        }
        let t = DateTime::parse_from_rfc3339("2024-01-15T10:30:00.1234+05:30").unwrap();
        assert_eq!(format_timestamp(&t), "2024-01-15T10:30:00.1234+05:30");
        // A leap second keeps its 60 (from_timestamp never makes one).
        let t = DateTime::parse_from_rfc3339("2016-12-31T23:59:60.5Z").unwrap();
        assert_eq!(format_timestamp(&t), reference_layout(&t));
        assert_eq!(format_timestamp(&t), "2016-12-31T23:59:60.5Z");
    }

    fn sample() -> EnvelopeBuilder {
        Envelope::builder("order-1", "OrderCreated", 1).payload(Payload::from_raw(r#"{"x":1}"#).unwrap())
    }

    #[test]
    fn the_wire_form_is_the_derived_serialization_byte_for_byte() {
        for (trace, correlation, tenant) in [
            (None, None, None),
            (Some("t-1"), None, None),
            (None, Some("c\"1"), Some(-7)),
            (Some("t"), Some("c"), Some(i64::MAX)),
        ] {
            let mut e = sample().build().unwrap();
            e.trace_id = trace.map(str::to_owned);
            e.correlation_id = correlation.map(str::to_owned);
            e.tenant_id = tenant;
            let derived = serde_json::to_vec(&e).unwrap();
            assert_eq!(e.encode().unwrap(), derived, "{e:?}");
            let as_string = e.encode_with(TenantIdFormat::String).unwrap();
            let derived = String::from_utf8(derived).unwrap();
            let expected = match tenant {
                Some(t) => {
                    derived.replace(&format!("\"tenant_id\":{t},"), &format!("\"tenant_id\":\"{t}\","))
                }
                None => derived,
            };
            assert_eq!(
                std::str::from_utf8(&as_string).unwrap(),
                expected,
                "byte for byte"
            );
            assert_eq!(Envelope::decode(&as_string).unwrap(), e);
        }
    }

    #[test]
    fn builder_fills_uuid_v7_and_timestamp() {
        let e = sample().build().unwrap();
        let id = uuid::Uuid::parse_str(&e.event_id).unwrap();
        assert_eq!(id.get_version_num(), 7);
        assert!(Utc::now().signed_duration_since(e.timestamp).num_seconds() < 5);
    }

    #[test]
    fn each_rule_names_its_field() {
        let cases: Vec<(EnvelopeBuilder, &str)> = vec![
            (Envelope::builder("", "T", 1), "aggregate_id"),
            (Envelope::builder("a b", "T", 1), "aggregate_id"),
            (Envelope::builder("a".repeat(257), "T", 1), "aggregate_id"),
            (Envelope::builder("a", " ", 1), "event_type"),
            (Envelope::builder("a", "T", 0), "event_version"),
            (Envelope::builder("a", "T", 1).event_id(" "), "event_id"),
        ];
        for (b, field) in cases {
            let err = b.payload(Payload::from_raw("{}").unwrap()).build().unwrap_err();
            assert_eq!(err.validation().unwrap().field, field, "{err}");
        }
        let err = Envelope::builder("a", "T", 1).build().unwrap_err();
        assert_eq!(err.validation().unwrap().field, "payload");
        let err = Envelope::builder("a", "T", 1)
            .payload(Payload::from_raw("null").unwrap())
            .build()
            .unwrap_err();
        assert_eq!(err.validation().unwrap().field, "payload");
    }

    #[test]
    fn full_charset_and_max_length_aggregate_ids_are_valid() {
        validate_aggregate_id("Az09:_-./x").unwrap();
        validate_aggregate_id(&"a".repeat(256)).unwrap();
    }

    #[test]
    fn payload_bytes_are_kept_verbatim() {
        let raw = r#"{ "b" : 2,   "a":[1, 2.50] }"#;
        let e = sample().payload(Payload::from_raw(raw).unwrap()).build().unwrap();
        let bytes = e.encode().unwrap();
        let back = Envelope::decode(&bytes).unwrap();
        assert_eq!(back.payload.get(), raw);
    }

    #[test]
    fn empty_optional_strings_decode_as_none() {
        let json = r#"{"event_id":"e","aggregate_id":"a","event_type":"T","event_version":1,
            "timestamp":"2025-10-01T12:00:00.123456789+08:00","trace_id":"","payload":{}}"#;
        let e = Envelope::decode(json.as_bytes()).unwrap();
        assert_eq!(e.trace_id, None);
        assert_eq!(e.timestamp.timestamp_subsec_nanos(), 123_456_789);
    }

    #[test]
    fn garbage_is_a_serialization_error() {
        let err = Envelope::decode(b"{not json").unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Serialization);
    }
}
