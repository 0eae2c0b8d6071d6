//! `eventbus publish`: publish envelopes from a file or stdin and print
//! each one's ACK result.

use std::io::Read as _;
use std::path::PathBuf;

use clap::Args;
use eventbus::{Envelope, Error, ErrorKind, Result};
use serde::Serialize;

use super::view;
use crate::backends::{BackendKind, BrokerArgs, Target, WhenMissing};

/// Options of `eventbus publish`.
#[derive(Debug, Args)]
pub(crate) struct PublishArgs {
    /// The topic to publish to.
    topic: String,
    /// The broker.
    #[arg(long, value_enum, default_value_t = BackendKind::Nats)]
    backend: BackendKind,
    #[command(flatten)]
    brokers: BrokerArgs,
    /// Read envelopes from this file instead of stdin: one JSON envelope,
    /// or one per line (JSON lines). `event_id` and `timestamp` may be
    /// left out: a new UUIDv7 and the current time are used.
    #[arg(long, short)]
    file: Option<PathBuf>,
    /// One JSON object per result instead of a table.
    #[arg(long)]
    json: bool,
}

/// One publish's outcome as printed.
#[derive(Debug, Serialize)]
struct Outcome {
    event_id: String,
    aggregate_id: String,
    event_version: i64,
    /// Where the broker stored it.
    #[serde(skip_serializing_if = "Option::is_none")]
    position: Option<String>,
    /// The broker had it already (its dedup window).
    duplicate: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// The envelopes in `text`: one JSON object, or JSON lines; a missing
/// `event_id` or `timestamp` is filled in.
///
/// # Errors
/// `Validation` naming the line and the field of the first bad envelope:
/// nothing is published then.
fn parse(text: &str) -> Result<Vec<Envelope>> {
    let whole = text.trim();
    let objects: Vec<(usize, &str)> = match serde_json::from_str::<serde_json::Value>(whole) {
        Ok(serde_json::Value::Object(_)) => vec![(1, whole)],
        _ => text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| (i + 1, l))
            .collect(),
    };
    objects
        .into_iter()
        .map(|(line, raw)| {
            let bad = |e: &dyn std::fmt::Display| {
                Error::new(
                    ErrorKind::Validation,
                    format!("line {line}: not a valid envelope: {e}"),
                )
            };
            let mut value: serde_json::Value = serde_json::from_str(raw).map_err(|e| bad(&e))?;
            let object = value
                .as_object_mut()
                .ok_or_else(|| bad(&"expected a JSON object"))?;
            object
                .entry("event_id")
                .or_insert_with(|| eventbus::new_event_id().into());
            object
                .entry("timestamp")
                .or_insert_with(|| chrono::Utc::now().to_rfc3339().into());
            let bytes = serde_json::to_vec(&value).map_err(|e| bad(&e))?;
            Envelope::decode(&bytes).map_err(|e| bad(&e))
        })
        .collect()
}

/// Publishes every envelope (pipelined, in input order), then prints each
/// result as it arrives, in input order.
///
/// # Errors
/// A bad input line (nothing published), connecting, or `Backend` naming
/// how many publishes failed.
pub(crate) async fn run(args: PublishArgs) -> Result<()> {
    let text = match &args.file {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| Error::config(format!("cannot read {}", path.display())).with_source(e))?,
        None => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| Error::config("cannot read stdin").with_source(e))?;
            text
        }
    };
    let envelopes = parse(&text)?;
    let target = Target::connect(args.backend, &args.brokers, WhenMissing::DefaultAddress).await?;
    let bus = target.bus(args.brokers.bus_config()?).await?;
    // SIGTERM or SIGINT stops sending; what was sent still gets its result.
    let stop = tokio_util::sync::CancellationToken::new();
    crate::signals::drain_on_signal(stop.clone())?;
    let mut handles = Vec::with_capacity(envelopes.len());
    for e in &envelopes {
        if stop.is_cancelled() {
            break;
        }
        handles.push(bus.publish_envelope(&args.topic, e).await);
    }
    let unsent = envelopes.len() - handles.len();
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::NOTHING);
    table.set_header(["EVENT ID", "AGGREGATE", "VERSION", "RESULT"]);
    let mut failed = 0;
    for (e, handle) in envelopes.iter().zip(handles) {
        let result = match handle {
            Ok(handle) => handle.await.into_result(),
            Err(e) => Err(e),
        };
        let mut outcome = Outcome {
            event_id: e.event_id.clone(),
            aggregate_id: e.aggregate_id.clone(),
            event_version: e.event_version,
            position: None,
            duplicate: false,
            error: None,
        };
        match result {
            Ok(r) => {
                outcome.position = r.position.as_ref().map(view::position);
                outcome.duplicate = r.duplicate;
            }
            Err(err) => {
                failed += 1;
                outcome.error = Some(err.to_string());
            }
        }
        if args.json {
            println!("{}", serde_json::to_string(&outcome).unwrap_or_default());
        } else {
            let result = match (&outcome.error, &outcome.position) {
                (Some(err), _) => format!("failed: {err}"),
                (None, Some(p)) if outcome.duplicate => format!("duplicate of {p}"),
                (None, Some(p)) => format!("stored at {p}"),
                (None, None) => "stored".to_owned(),
            };
            table.add_row([
                outcome.event_id,
                outcome.aggregate_id,
                outcome.event_version.to_string(),
                result,
            ]);
        }
    }
    if !args.json {
        println!("{table}");
    }
    bus.close().await?;
    if unsent > 0 {
        return Err(Error::new(
            ErrorKind::Closed,
            format!("interrupted: {unsent} of {} envelopes not sent", envelopes.len()),
        ));
    }
    match failed {
        0 => Ok(()),
        n => Err(Error::new(
            ErrorKind::Backend,
            format!("{n} of {} publishes failed", envelopes.len()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_object_or_json_lines_with_ids_and_times_filled_in() {
        let one = r#"{"aggregate_id":"o-1","event_type":"Placed","event_version":1,"payload":{"n":1}}"#;
        let parsed = parse(one).unwrap();
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].aggregate_id, "o-1");
        assert!(!parsed[0].event_id.is_empty());
        let pretty = "{\n  \"aggregate_id\": \"o-1\",\n  \"event_type\": \"Placed\",\n  \"event_version\": 2,\n  \"payload\": {}\n}\n";
        assert_eq!(parse(pretty).unwrap()[0].event_version, 2);
        let lines = format!(
            "{one}\n\n{}\n",
            one.replace("\"event_version\":1", "\"event_version\":2")
        );
        let parsed = parse(&lines).unwrap();
        assert_eq!(parsed.iter().map(|e| e.event_version).collect::<Vec<_>>(), [1, 2]);
        assert_ne!(parsed[0].event_id, parsed[1].event_id);
        let bad = format!(
            "{one}\n{}",
            one.replace("\"event_version\":1", "\"event_version\":0")
        );
        let err = parse(&bad).unwrap_err().to_string();
        assert!(err.contains("line 2: not a valid envelope"), "{err}");
        assert!(err.contains("event_version"), "{err}");
    }
}
