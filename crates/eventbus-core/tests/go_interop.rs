//! Rust's envelope bytes against Go's own `encoding/json`: a Go program
//! (`tests/go/envelope_check.go`, standard library only) decodes what
//! `Envelope::encode` writes into the Go SDK's `Envelope` struct, current
//! and old (string `tenant_id`), and writes it back as a Go service would;
//! Rust decodes that with every field equal, zone offset included.
//!
//! Needs the `go` tool (Debian's `golang-go`; `scripts/install-test-deps`
//! installs it). A missing `go` fails the test, naming the package.

use std::io::Write;
use std::process::{Command, Stdio};

use chrono::{FixedOffset, TimeZone};
use eventbus_core::{Envelope, Payload, TenantIdFormat};

#[derive(serde::Deserialize)]
struct GoResult {
    current: Box<serde_json::value::RawValue>,
    #[serde(default)]
    current_error: String,
    old: Box<serde_json::value::RawValue>,
    #[serde(default)]
    old_error: String,
}

/// Runs the Go program over `lines`, one result per line.
fn go_round_trip(lines: &[Vec<u8>]) -> Vec<GoResult> {
    let program = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/go/envelope_check.go");
    let mut child = Command::new("go")
        .args(["run", program])
        .env("GO111MODULE", "off")
        .env("GOFLAGS", "")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the `go` tool is needed: apt-get install golang-go (scripts/install-test-deps does it)");
    {
        let mut stdin = child.stdin.take().unwrap();
        for line in lines {
            stdin.write_all(line).unwrap();
            stdin.write_all(b"\n").unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "go run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results: Vec<GoResult> = out
        .stdout
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    assert_eq!(results.len(), lines.len());
    results
}

/// A small deterministic generator (xorshift), so the cases are the same
/// on every run and need no extra dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pick<'a>(&mut self, items: &'a [&'a str]) -> &'a str {
        items[(self.next() % items.len() as u64) as usize]
    }
}

/// Strings Go writes byte for byte as serde_json does.
const PLAIN: &[&str] = &[
    "OrderCreated",
    "订单已创建",
    "quote \" and backslash \\",
    "tab\tnewline\nreturn\r",
    "control \u{1}\u{1f}",
    "emoji 🦀",
    "slash / é",
];
/// Strings both read alike but Go writes differently: HTML characters
/// (`\u003c`), U+2028/2029 and `\b` `\f` (`\u0008` where serde_json writes `\b`).
const ESCAPED: &[&str] = &["<b>&amp;</b>", "line\u{2028}sep\u{2029}", "bell\u{8}feed\u{c}"];

fn envelopes() -> Vec<(Envelope, bool)> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut out = Vec::new();
    for i in 0..300 {
        let plain = i % 4 != 3;
        let text = |rng: &mut Rng| rng.pick(if plain { PLAIN } else { ESCAPED }).to_owned();
        // Offsets from -12:00 to +14:00 in quarter hours; nanoseconds with
        // trailing zeros of every length (Go trims them).
        let offset = FixedOffset::east_opt(((rng.next() % 105) as i32 - 48) * 900).unwrap();
        let nanos = match i % 5 {
            0 => 0,
            1 => 500_000_000,
            2 => 123_400_000,
            3 => 123_456_789,
            _ => (rng.next() % 1_000_000_000) as u32,
        };
        let secs = 1_600_000_000 + (rng.next() % 400_000_000) as i64;
        let timestamp = offset.timestamp_opt(secs, nanos).unwrap();
        let version = match i % 3 {
            0 => 1 + (rng.next() % 1_000) as i64,
            1 => (1 << 53) + 1 + (rng.next() % 1_000) as i64,
            _ => i64::MAX - (rng.next() % 1_000) as i64,
        };
        let payload = format!(
            r#"{{"n":{},"s":{},"list":[1,2.5,null,true],"nested":{{"k":"v"}}}}"#,
            rng.next() % 10_000,
            serde_json::to_string(&text(&mut rng)).unwrap()
        );
        let mut builder = Envelope::builder(format!("order-{}", rng.next() % 1_000), text(&mut rng), version)
            .timestamp(timestamp)
            .payload(Payload::from_raw(payload).unwrap());
        if i % 2 == 0 {
            builder = builder.trace_id(text(&mut rng));
        }
        if i % 3 == 0 {
            builder = builder.correlation_id(format!("c-{i}"));
        }
        if i % 4 != 0 {
            builder = builder.tenant_id((rng.next() % 100_000) as i64 - 50);
        }
        out.push((builder.build().unwrap(), plain));
    }
    out
}

/// Every field equal, the zone offset too; the payload as the same JSON
/// value (Go re-escapes `<`, `>`, `&`, U+2028 and U+2029 inside a
/// `json.RawMessage` it writes, so only its text may differ there).
fn assert_same_event(back: &Envelope, e: &Envelope, context: &str) {
    let mut same_payload = back.clone();
    same_payload.payload = e.payload.clone();
    assert_eq!(&same_payload, e, "{context}");
    assert_eq!(
        back.timestamp.offset(),
        e.timestamp.offset(),
        "zone offset lost: {context}"
    );
    let value = |p: &Payload| serde_json::from_str::<serde_json::Value>(p.get()).unwrap();
    assert_eq!(value(&back.payload), value(&e.payload), "{context}");
}

#[test]
fn go_decodes_what_rust_writes_and_writes_back_the_same_event() {
    let cases = envelopes();
    let lines: Vec<Vec<u8>> = cases.iter().map(|(e, _)| e.encode().unwrap().to_vec()).collect();
    let results = go_round_trip(&lines);
    let mut identical = 0;
    for (((e, plain), line), r) in cases.iter().zip(&lines).zip(&results) {
        let ours = std::str::from_utf8(line).unwrap();
        assert!(
            r.current_error.is_empty(),
            "Go refused {ours}: {}",
            r.current_error
        );
        let go = r.current.get();
        let back = Envelope::decode(go.as_bytes()).unwrap();
        assert_same_event(&back, e, &format!("\n ours: {ours}\n   go: {go}"));
        if *plain {
            // Byte for byte what Go writes, timestamp text included.
            assert_eq!(go, ours, "Go wrote different bytes");
            identical += 1;
        } else {
            assert_ne!(
                go, ours,
                "the escaping difference is gone: update ESCAPED and the README"
            );
        }
    }
    assert_eq!(identical, 225);
}

#[test]
fn old_go_releases_read_the_string_tenant_form_and_refuse_the_integer() {
    let cases: Vec<Envelope> = envelopes()
        .into_iter()
        .map(|(e, _)| e)
        .filter(|e| e.tenant_id.is_some())
        .take(50)
        .collect();
    let mut lines: Vec<Vec<u8>> = cases
        .iter()
        .map(|e| e.encode_with(TenantIdFormat::String).unwrap().to_vec())
        .collect();
    lines.push(cases[0].encode().unwrap().to_vec());
    let results = go_round_trip(&lines);
    for ((e, line), r) in cases.iter().zip(&lines).zip(&results) {
        assert!(
            r.old_error.is_empty(),
            "an old Go release refused {}: {}",
            String::from_utf8_lossy(line),
            r.old_error
        );
        let back = Envelope::decode(r.old.get().as_bytes()).unwrap();
        assert_same_event(&back, e, r.old.get());
        assert!(
            !r.current_error.is_empty(),
            "the current struct reads an int only"
        );
    }
    let integer = results.last().unwrap();
    assert!(
        integer.old_error.contains("tenant_id"),
        "old releases cannot read the integer form: {}",
        integer.old_error
    );
}
