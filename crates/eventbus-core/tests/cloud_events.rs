//! Envelope ⇄ CloudEvents 1.0: round trips in structured and binary mode
//! (Kafka and NATS header names), the spec's own JSON examples, and the
//! errors that name the missing attribute.
#![cfg(feature = "cloudevents")]

use eventbus_core::cloud_events::{self, Binding};
use eventbus_core::{Envelope, ErrorKind, ValidationError};

fn envelopes() -> Vec<Envelope> {
    let plain = Envelope::builder("order-1", "OrderPlaced", 3)
        .json_payload(&serde_json::json!({"total": 12.5, "items": ["a", "b"], "note": "ünï"}))
        .unwrap()
        .timestamp(chrono::DateTime::parse_from_rfc3339("2026-11-30T10:00:00.123456789Z").unwrap())
        .build()
        .unwrap();
    let full = Envelope::builder("acct-7", "Charged", 9_007_199_254_740_993)
        .json_payload(&serde_json::json!([1, 2, 3]))
        .unwrap()
        .tenant_id(42)
        .trace_id("trace-1")
        .correlation_id("corr-1")
        .timestamp(chrono::DateTime::parse_from_rfc3339("2026-11-30T10:00:00Z").unwrap())
        .build()
        .unwrap();
    vec![plain, full]
}

#[test]
fn round_trips_in_structured_and_binary_mode() {
    for e in envelopes() {
        let event = cloud_events::to_cloud_event(&e, "/billing").unwrap();
        assert_eq!(cloud_events::from_cloud_event(&event).unwrap(), e);

        let structured = cloud_events::structured_message(&e, "/billing", "orders").unwrap();
        assert_eq!(
            structured.headers.get("content-type"),
            Some(cloud_events::STRUCTURED_CONTENT_TYPE)
        );
        let json: serde_json::Value = serde_json::from_slice(&structured.payload).unwrap();
        assert_eq!(json["specversion"], "1.0");
        assert_eq!(json["id"], e.event_id.as_str());
        assert_eq!(json["type"], e.event_type.as_str());
        assert_eq!(json["source"], "/billing");
        assert_eq!(json["subject"], e.aggregate_id.as_str());
        assert_eq!(json["aggregateid"], e.aggregate_id.as_str());
        assert_eq!(json["eventversion"], e.event_version);
        assert_eq!(
            json["data"],
            serde_json::from_str::<serde_json::Value>(e.payload.get()).unwrap()
        );
        assert_eq!(structured.key.as_deref(), Some(e.aggregate_id.as_bytes()));
        for binding in [Binding::Kafka, Binding::Nats] {
            assert_eq!(cloud_events::from_message(&structured, binding).unwrap(), e);
        }

        for (binding, prefix) in [(Binding::Kafka, "ce_"), (Binding::Nats, "ce-")] {
            let binary = cloud_events::binary_message(&e, "/billing", "orders", binding).unwrap();
            assert_eq!(binary.headers.get(&format!("{prefix}specversion")), Some("1.0"));
            assert_eq!(
                binary.headers.get(&format!("{prefix}id")),
                Some(e.event_id.as_str())
            );
            assert_eq!(
                binary.headers.get(&format!("{prefix}eventversion")),
                Some(e.event_version.to_string().as_str())
            );
            assert_eq!(binary.headers.get("content-type"), Some("application/json"));
            let body: serde_json::Value = serde_json::from_slice(&binary.payload).unwrap();
            assert_eq!(
                body,
                serde_json::from_str::<serde_json::Value>(e.payload.get()).unwrap()
            );
            assert_eq!(cloud_events::from_message(&binary, binding).unwrap(), e);
        }
    }
}

#[test]
fn a_zone_offset_becomes_the_same_instant_in_utc() {
    let e = Envelope::builder("order-1", "OrderPlaced", 1)
        .json_payload(&serde_json::json!({}))
        .unwrap()
        .timestamp(chrono::DateTime::parse_from_rfc3339("2026-11-30T18:00:00+08:00").unwrap())
        .build()
        .unwrap();
    let back = cloud_events::from_cloud_event(&cloud_events::to_cloud_event(&e, "/x").unwrap()).unwrap();
    assert_eq!(back.timestamp, e.timestamp);
    assert_eq!(back.timestamp.offset().local_minus_utc(), 0);
}

fn field(e: eventbus_core::Error) -> String {
    assert_eq!(e.kind(), ErrorKind::Validation, "{e}");
    std::error::Error::source(&e)
        .and_then(|s| s.downcast_ref::<ValidationError>())
        .map(|v| v.field.to_string())
        .unwrap_or_else(|| panic!("no field in {e}"))
}

#[test]
fn the_spec_examples_are_read_and_what_an_envelope_needs_is_named() {
    let example: serde_json::Value =
        serde_json::from_str(include_str!("cloudevents/spec-example.json")).unwrap();
    let event: cloud_events::sdk::Event = serde_json::from_value(example.clone()).unwrap();
    // The spec's event has no aggregate id or version: named, not guessed.
    assert_eq!(
        field(cloud_events::from_cloud_event(&event).unwrap_err()),
        "aggregateid"
    );
    let mut with_subject = example.clone();
    with_subject["subject"] = "order-9".into();
    let event: cloud_events::sdk::Event = serde_json::from_value(with_subject.clone()).unwrap();
    assert_eq!(
        field(cloud_events::from_cloud_event(&event).unwrap_err()),
        "eventversion"
    );
    with_subject["eventversion"] = 4.into();
    let event: cloud_events::sdk::Event = serde_json::from_value(with_subject).unwrap();
    let e = cloud_events::from_cloud_event(&event).unwrap();
    assert_eq!((e.aggregate_id.as_str(), e.event_version), ("order-9", 4));
    assert_eq!(e.event_id, "A234-1234-1234");
    assert_eq!(e.event_type, "com.example.someevent");
    assert_eq!(e.timestamp.to_rfc3339(), "2018-04-05T17:31:00+00:00");
    let data: serde_json::Value = serde_json::from_str(e.payload.get()).unwrap();
    assert_eq!(data, example["data"]);

    // The binary-data example: not JSON, so not an envelope payload.
    let mut base64: serde_json::Value =
        serde_json::from_str(include_str!("cloudevents/spec-example-base64.json")).unwrap();
    base64["data_base64"] = "AAEC".into();
    base64["aggregateid"] = "order-9".into();
    base64["eventversion"] = "4".into();
    let event: cloud_events::sdk::Event = serde_json::from_value(base64).unwrap();
    assert_eq!(field(cloud_events::from_cloud_event(&event).unwrap_err()), "data");
}

#[test]
fn bad_input_is_a_typed_error() {
    let e = &envelopes()[0];
    assert_eq!(field(cloud_events::to_cloud_event(e, "").unwrap_err()), "source");
    let mut binary = cloud_events::binary_message(e, "/x", "orders", Binding::Kafka).unwrap();
    binary.headers.insert("ce_eventversion", "three");
    assert_eq!(
        field(cloud_events::from_message(&binary, Binding::Kafka).unwrap_err()),
        "eventversion"
    );
    let mut bad_id = cloud_events::binary_message(e, "/x", "orders", Binding::Nats).unwrap();
    bad_id.headers.insert("ce-aggregateid", "has space");
    assert_eq!(
        field(cloud_events::from_message(&bad_id, Binding::Nats).unwrap_err()),
        "aggregate_id"
    );
    let plain = eventbus_core::Message::new("orders", "{}");
    assert_eq!(
        cloud_events::from_message(&plain, Binding::Kafka)
            .unwrap_err()
            .kind(),
        ErrorKind::Serialization
    );
    let mut garbled = cloud_events::structured_message(e, "/x", "orders").unwrap();
    garbled.payload = bytes::Bytes::from_static(b"{not json");
    assert_eq!(
        cloud_events::from_message(&garbled, Binding::Kafka)
            .unwrap_err()
            .kind(),
        ErrorKind::Serialization
    );
}
