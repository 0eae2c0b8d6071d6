//! The envelope's wire format: a golden sample in the original Go SDK's
//! format, and property tests of encode/decode.

use chrono::{DateTime, FixedOffset, TimeZone, Utc};
use eventbus_core::{Envelope, ErrorKind, Payload, TenantIdFormat};
use proptest::prelude::*;

const GOLDEN: &str = include_str!("golden/go_envelope.json");

#[test]
fn decodes_the_go_sdk_format() {
    let e = Envelope::decode(GOLDEN.as_bytes()).unwrap();
    assert_eq!(e.event_id, "0199e4a8-6b1c-7c3e-9a55-3f1d2b7c8e90");
    assert_eq!(e.aggregate_id, "tenant-9:order/2025.10-0042");
    assert_eq!(e.event_type, "OrderCreated");
    assert_eq!(e.event_version, 3);
    let expected = DateTime::parse_from_rfc3339("2025-10-15T00:30:00.123456789Z").unwrap();
    assert_eq!(e.timestamp, expected, "the same instant");
    assert_eq!(
        e.timestamp.offset().local_minus_utc(),
        8 * 3600,
        "the sender's offset kept"
    );
    assert_eq!(e.trace_id.as_deref(), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
    assert_eq!(e.correlation_id.as_deref(), Some("req-77"));
    assert_eq!(e.tenant_id, Some(9));
    assert_eq!(
        e.payload.get(),
        r#"{"order_id":"0042","lines":[{"sku":"A-1","qty":2,"price":"19.90"}],"note":null}"#
    );
}

#[test]
fn encodes_to_the_same_keys_as_the_go_sdk() {
    let golden: serde_json::Value = serde_json::from_str(GOLDEN).unwrap();
    let ours: serde_json::Value =
        serde_json::from_slice(&Envelope::decode(GOLDEN.as_bytes()).unwrap().encode().unwrap()).unwrap();
    let keys = |v: &serde_json::Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(keys(&ours), keys(&golden));
    assert_eq!(ours["payload"], golden["payload"]);
    assert_eq!(
        ours["timestamp"], "2025-10-15T08:30:00.123456789+08:00",
        "re-encoding keeps the Go sender's text"
    );
}

/// Envelopes as Go services write them (`encoding/json` of the Go SDK's
/// struct, `time.RFC3339Nano` timestamps in the sender's zone): every field
/// equal after decoding, and the timestamp text unchanged after re-encoding.
#[test]
fn decodes_go_written_variants_and_keeps_their_timestamps() {
    let cases = [
        // An old Go release: tenant_id as a string.
        (
            r#"{"event_id":"e1","aggregate_id":"a","event_type":"T","event_version":1,"timestamp":"2025-10-26T15:04:05.123456789+08:00","tenant_id":"7","payload":{}}"#,
            Some(7),
            "2025-10-26T15:04:05.123456789+08:00",
        ),
        // Trimmed fraction, a negative offset, an unknown extra field.
        (
            r#"{"event_id":"e2","aggregate_id":"a","event_type":"T","event_version":2,"timestamp":"2025-10-26T02:04:05.1234-05:30","tenant_id":12,"extra":{"x":1},"payload":[1,2]}"#,
            Some(12),
            "2025-10-26T02:04:05.1234-05:30",
        ),
        // No fraction, UTC, no tenant, a version above 2^53.
        (
            r#"{"event_id":"e3","aggregate_id":"a","event_type":"T","event_version":9007199254740993,"timestamp":"2025-10-26T07:04:05Z","payload":"text"}"#,
            None,
            "2025-10-26T07:04:05Z",
        ),
        // An old Go release with an empty tenant string.
        (
            r#"{"event_id":"e4","aggregate_id":"a","event_type":"T","event_version":1,"timestamp":"2025-10-26T07:04:05.5Z","tenant_id":"","payload":{}}"#,
            None,
            "2025-10-26T07:04:05.5Z",
        ),
    ];
    for (json, tenant, stamp) in cases {
        let e = Envelope::decode(json.as_bytes()).unwrap_or_else(|err| panic!("{json}: {err}"));
        assert_eq!(e.tenant_id, tenant, "{json}");
        assert_eq!(
            e.timestamp,
            DateTime::parse_from_rfc3339(stamp).unwrap(),
            "{json}"
        );
        let back: serde_json::Value = serde_json::from_slice(&e.encode().unwrap()).unwrap();
        assert_eq!(back["timestamp"], stamp, "{json}");
        assert!(back.get("extra").is_none(), "unknown fields are not carried");
        if let Some(t) = tenant {
            assert_eq!(back["tenant_id"], t, "written as an integer");
        }
    }
    assert_eq!(
        Envelope::decode(br#"{"event_id":"e","aggregate_id":"a","event_type":"T","event_version":9007199254740993,"timestamp":"2025-10-26T07:04:05Z","payload":{}}"#)
            .unwrap()
            .event_version,
        9_007_199_254_740_993
    );
    let bad = r#"{"event_id":"e","aggregate_id":"a","event_type":"T","event_version":1,"timestamp":"2025-10-26T07:04:05Z","tenant_id":"seven","payload":{}}"#;
    let err = Envelope::decode(bad.as_bytes()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Serialization);
}

#[test]
fn optional_fields_are_omitted_when_unset() {
    let e = Envelope::builder("a", "T", 1)
        .payload(Payload::from_raw("{}").unwrap())
        .build()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&e.encode().unwrap()).unwrap();
    for absent in ["trace_id", "correlation_id", "tenant_id"] {
        assert!(v.get(absent).is_none(), "{absent} should be omitted");
    }
}

#[test]
fn a_missing_required_field_is_a_serialization_error() {
    let mut v: serde_json::Value = serde_json::from_str(GOLDEN).unwrap();
    v.as_object_mut().unwrap().remove("event_type");
    let err = Envelope::decode(v.to_string().as_bytes()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Serialization);
    assert!(err.to_string().contains("event_type"), "{err}");
}

fn aggregate_id() -> impl Strategy<Value = String> {
    "[A-Za-z0-9:_./-]{1,256}"
}

fn opt_text() -> impl Strategy<Value = Option<String>> {
    proptest::option::of("[^\u{0}]{1,40}")
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        ".{0,20}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::btree_map("[a-z]{1,6}", inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

prop_compose! {
    fn envelope()(
        aggregate_id in aggregate_id(),
        event_type in "[A-Za-z][A-Za-z0-9.]{0,30}",
        event_version in 1..i64::MAX,
        nanos in 0i64..4_102_444_800_000_000_000,
        offset_minutes in -(14 * 60)..=(14 * 60),
        trace_id in opt_text(),
        correlation_id in opt_text(),
        tenant_id in proptest::option::of(any::<i64>()),
        payload in json_value(),
    ) -> Envelope {
        Envelope {
            event_id: eventbus_core::new_event_id(),
            aggregate_id,
            event_type,
            event_version,
            timestamp: Utc
                .timestamp_nanos(nanos)
                .with_timezone(&FixedOffset::east_opt(offset_minutes * 60).unwrap()),
            trace_id,
            correlation_id,
            tenant_id,
            payload: Payload::from_json(&payload).unwrap(),
        }
    }
}

proptest! {
    #[test]
    fn encode_then_decode_is_the_identity(e in envelope()) {
        let back = Envelope::decode(&e.encode().unwrap()).unwrap();
        prop_assert_eq!(back.timestamp.offset(), e.timestamp.offset());
        prop_assert_eq!(back, e);
    }

    #[test]
    fn the_string_tenant_form_changes_only_the_tenant(e in envelope()) {
        let integer = String::from_utf8(e.encode().unwrap().to_vec()).unwrap();
        let string = String::from_utf8(e.encode_with(TenantIdFormat::String).unwrap().to_vec()).unwrap();
        match e.tenant_id {
            Some(t) => {
                let expected = integer.replacen(&format!("\"tenant_id\":{t},"), &format!("\"tenant_id\":\"{t}\","), 1);
                prop_assert_eq!(&string, &expected);
            }
            None => prop_assert_eq!(&string, &integer),
        }
        prop_assert_eq!(Envelope::decode(string.as_bytes()).unwrap(), e);
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = Envelope::decode(&bytes);
    }

    #[test]
    fn decoding_mutated_envelopes_never_panics(e in envelope(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut bytes = e.encode().unwrap().to_vec();
        let i = at.index(bytes.len());
        bytes[i] = byte;
        let _ = Envelope::decode(&bytes);
    }
}

/// `publish.tenant_id_format = string` puts the old Go releases' form on the
/// wire; a subscriber reads it back as the same tenant.
#[tokio::test]
async fn a_bus_set_for_old_go_consumers_writes_the_tenant_as_a_string() {
    let mut config = eventbus_core::BusConfig::default();
    config.publish.tenant_id_format = TenantIdFormat::String;
    let bus = eventbus_core::EventBus::memory_with(config).unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let sub = bus
        .subscribe(
            "tenants",
            eventbus_core::SubscribeOptions::group("raw"),
            move |m: eventbus_core::Message| {
                let _ = tx.send(m.payload);
                async { Ok::<_, std::io::Error>(()) }
            },
        )
        .await
        .unwrap();
    let e = Envelope::builder("a", "T", 1)
        .tenant_id(7)
        .payload(Payload::from_raw("{}").unwrap())
        .build()
        .unwrap();
    bus.publish_envelope_sync("tenants", &e).await.unwrap();
    let body = tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["tenant_id"], "7");
    assert_eq!(Envelope::decode(&body).unwrap(), e);
    sub.close().await.unwrap();
    bus.close().await.unwrap();
}
