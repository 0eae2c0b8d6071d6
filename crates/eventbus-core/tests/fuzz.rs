//! Property tests ("fuzzing") of every decoder a received message goes
//! through: the body (`Envelope::decode`), the headers
//! (`codec::envelope_from_headers` via `codec::decode_envelope`) and the
//! aggregate-id fallback to the record key (`codec::fallback_aggregate_id`),
//! over arbitrary bytes, mutated valid envelopes and JSON of every shape.
//! Every run checks: no panic, and whatever decodes is a valid envelope
//! that encodes and decodes to itself.
//!
//! `cargo test` runs 256 cases per property (CI); `scripts/fuzz` runs
//! 100,000 per property in release mode (`PROPTEST_CASES` sets the count).

use bytes::Bytes;
use eventbus_core::codec::{decode_envelope, fallback_aggregate_id};
use eventbus_core::{Envelope, Headers, Message, headers};
use proptest::prelude::*;

fn valid_envelope() -> impl Strategy<Value = Envelope> {
    (
        "[A-Za-z0-9:_./-]{1,40}",
        "[A-Za-z]\\PC{0,19}",
        1i64..i64::MAX,
        proptest::option::of("\\PC{0,12}"),
        proptest::option::of(any::<i64>()),
        -50_000i32..50_000,
        any::<i64>(),
    )
        .prop_map(
            |(aggregate, event_type, version, trace, tenant, offset_s, secs)| {
                use chrono::TimeZone;
                let offset = chrono::FixedOffset::east_opt(offset_s).unwrap();
                let t = offset
                    .timestamp_opt(
                        secs.rem_euclid(253_402_300_799),
                        (secs.unsigned_abs() % 1_000_000_000) as u32,
                    )
                    .single()
                    .unwrap();
                let mut b = Envelope::builder(aggregate, event_type, version)
                    .timestamp(t)
                    .json_payload(&serde_json::json!({"n": version, "s": "x"}))
                    .unwrap();
                if let Some(trace) = trace.filter(|t| !t.is_empty()) {
                    b = b.trace_id(trace);
                }
                if let Some(tenant) = tenant {
                    b = b.tenant_id(tenant);
                }
                b.build().unwrap()
            },
        )
}

/// A mutation of a byte string: flip, insert, delete or truncate.
fn mutate(bytes: &mut Vec<u8>, kind: u8, at: prop::sample::Index, byte: u8) {
    if bytes.is_empty() {
        bytes.push(byte);
        return;
    }
    let i = at.index(bytes.len());
    match kind % 4 {
        0 => bytes[i] ^= byte | 1,
        1 => bytes.insert(i, byte),
        2 => {
            bytes.remove(i);
        }
        _ => bytes.truncate(i),
    }
}

/// Whatever decodes must be valid and stable.
fn check(decoded: eventbus_core::Result<Envelope>) -> Result<(), TestCaseError> {
    if let Ok(e) = decoded {
        prop_assert!(e.validate().is_ok());
        let again = Envelope::decode(&e.encode().unwrap()).unwrap();
        prop_assert_eq!(again, e);
    }
    Ok(())
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(Into::into),
        any::<i64>().prop_map(Into::into),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Into::into),
        "\\PC{0,16}".prop_map(Into::into),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Into::into),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

const FIELDS: [&str; 9] = [
    "event_id",
    "aggregate_id",
    "event_type",
    "event_version",
    "timestamp",
    "trace_id",
    "correlation_id",
    "tenant_id",
    "payload",
];

const HEADER_NAMES: [&str; 8] = [
    headers::EVENT_ID,
    headers::AGGREGATE_ID,
    headers::EVENT_TYPE,
    headers::EVENT_VERSION,
    headers::TIMESTAMP,
    headers::TRACE_ID,
    headers::TENANT_ID,
    "X-Other",
];

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn arbitrary_bytes_never_panic_any_decoder(
        body in prop::collection::vec(any::<u8>(), 0..600),
        key in proptest::option::of(prop::collection::vec(any::<u8>(), 0..80)),
    ) {
        check(Envelope::decode(&body))?;
        let mut m = Message::new("t", body);
        if let Some(key) = key {
            m = m.with_key(Bytes::from(key));
        }
        check(decode_envelope(&m))?;
        if let Some(id) = fallback_aggregate_id(&m) {
            prop_assert!(!id.is_empty());
        }
    }

    #[test]
    fn mutated_envelopes_never_panic_and_decode_only_to_valid_ones(
        e in valid_envelope(),
        mutations in prop::collection::vec((any::<u8>(), any::<prop::sample::Index>(), any::<u8>()), 1..6),
    ) {
        let mut bytes = e.encode().unwrap().to_vec();
        for (kind, at, byte) in mutations {
            mutate(&mut bytes, kind, at, byte);
        }
        check(Envelope::decode(&bytes))?;
    }

    #[test]
    fn json_of_any_shape_in_envelope_fields_never_panics(
        values in prop::collection::vec(json_value(), FIELDS.len()),
        present in prop::collection::vec(any::<bool>(), FIELDS.len()),
    ) {
        let object: serde_json::Map<String, serde_json::Value> = FIELDS
            .iter()
            .zip(values)
            .zip(present)
            .filter(|(_, keep)| *keep)
            .map(|((name, value), _)| ((*name).to_owned(), value))
            .collect();
        let bytes = serde_json::to_vec(&object).unwrap();
        match Envelope::decode(&bytes) {
            Ok(e) => check(Ok(e))?,
            Err(err) => prop_assert!(!err.to_string().is_empty()),
        }
    }

    #[test]
    fn arbitrary_headers_never_panic_the_header_decoder(
        entries in prop::collection::vec((0..HEADER_NAMES.len(), "\\PC{0,40}|[\\x00-\\x1f]{0,4}|-?[0-9]{1,20}"), 0..10),
        payload in prop::collection::vec(any::<u8>(), 0..100),
        valid in valid_envelope(),
        use_valid_headers in any::<bool>(),
    ) {
        let mut h = if use_valid_headers {
            eventbus_core::codec::envelope_headers(&valid)
        } else {
            Headers::new()
        };
        for (name, value) in entries {
            h.insert(HEADER_NAMES[name], value);
        }
        let mut m = Message::new("t", payload);
        m.headers = h;
        check(decode_envelope(&m))?;
        let _ = fallback_aggregate_id(&m);
    }
}
