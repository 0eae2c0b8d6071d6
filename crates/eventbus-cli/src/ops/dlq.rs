//! `eventbus dlq`: list, show and replay dead letters.
//!
//! Dead letters are read without a consumer group ([`EventBus::browse`]),
//! so listing takes nothing away. A replay publishes each chosen dead
//! letter back ([`dead_letter::replay`]), one at a time, waiting for the
//! broker's ACK before the next, in the dead-letter topic's order (so each
//! aggregate's dead letters keep their order), then records it in the
//! ledger topic `<dead-letter topic>.replayed` (one record per dead letter,
//! keyed by its position). A dead letter already in the ledger is never
//! replayed again, so an interrupted replay is simply run again.
//!
//! The one window: a replay whose ACK arrived but whose ledger record was
//! not written (the process killed between the two) is replayed again by
//! the next run. Its dedup id is the same both times, so NATS (within the
//! stream's duplicate window, 2 min by default) stores it once; on Kafka
//! the subscription's event-id memory (`consumer.dedup_window`) absorbs it.

use std::collections::HashSet;
use std::time::Duration;

use clap::{Args, Subcommand};
use eventbus::{BrowsedMessage, Envelope, Error, ErrorKind, EventBus, Message, Result, dead_letter};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::read::{Next, Reader};
use super::view;
use crate::backends::{BackendKind, BrokerArgs, Target, WhenMissing};

/// `eventbus dlq` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum DlqCommand {
    /// List dead letters: position, original topic, event, error, and
    /// whether it was replayed.
    List(ListArgs),
    /// Show one dead letter in full (envelope and headers), by position
    /// (`12`, or `3:45` for Kafka partition 3 offset 45) or event id.
    Show(ShowArgs),
    /// Send dead letters back to their original topic (or `--to`), in
    /// order, each at most once across runs (see the ledger in `--help`).
    Replay(ReplayArgs),
}

/// Where the dead letters are, and how to read them.
#[derive(Debug, Args)]
pub(crate) struct Source {
    /// The dead-letter topic (by default `<topic>.dlq`).
    topic: String,
    /// The broker.
    #[arg(long, value_enum, default_value_t = BackendKind::Nats)]
    backend: BackendKind,
    #[command(flatten)]
    brokers: BrokerArgs,
    /// The topic's end is when nothing arrived for this long (ms).
    #[arg(long, default_value_t = 2_000, value_name = "MS")]
    idle_ms: u64,
    /// The ledger of replayed dead letters (default `<topic>.replayed`).
    #[arg(long)]
    ledger_topic: Option<String>,
}

/// Which dead letters a command takes. A dead letter that is not an
/// envelope matches only when no filter is given.
#[derive(Debug, Clone, Args)]
pub(crate) struct Filter {
    /// Only this aggregate id.
    #[arg(long)]
    aggregate: Option<String>,
    /// Only this event type.
    #[arg(long)]
    event_type: Option<String>,
    /// Only events whose envelope timestamp is at or after this time (RFC 3339).
    #[arg(long, value_parser = parse_time)]
    since: Option<chrono::DateTime<chrono::FixedOffset>>,
    /// Only events whose envelope timestamp is before this time (RFC 3339).
    #[arg(long, value_parser = parse_time)]
    until: Option<chrono::DateTime<chrono::FixedOffset>>,
}

fn parse_time(s: &str) -> std::result::Result<chrono::DateTime<chrono::FixedOffset>, String> {
    chrono::DateTime::parse_from_rfc3339(s).map_err(|e| format!("{s:?} is not an RFC 3339 time: {e}"))
}

impl Filter {
    fn is_empty(&self) -> bool {
        self.aggregate.is_none() && self.event_type.is_none() && self.since.is_none() && self.until.is_none()
    }

    fn matches(&self, envelope: Option<&Envelope>) -> bool {
        let Some(e) = envelope else {
            return self.is_empty();
        };
        self.aggregate.as_ref().is_none_or(|a| &e.aggregate_id == a)
            && self.event_type.as_ref().is_none_or(|t| &e.event_type == t)
            && self.since.is_none_or(|t| e.timestamp >= t)
            && self.until.is_none_or(|t| e.timestamp < t)
    }
}

/// Options of `eventbus dlq list`.
#[derive(Debug, Args)]
pub(crate) struct ListArgs {
    #[command(flatten)]
    source: Source,
    #[command(flatten)]
    filter: Filter,
    /// One JSON object per dead letter instead of a table.
    #[arg(long)]
    json: bool,
}

/// Options of `eventbus dlq show`.
#[derive(Debug, Args)]
pub(crate) struct ShowArgs {
    #[command(flatten)]
    source: Source,
    /// The dead letter: its position (`12`, `3:45`) or its event id.
    id: String,
}

/// Options of `eventbus dlq replay`.
#[derive(Debug, Args)]
pub(crate) struct ReplayArgs {
    #[command(flatten)]
    source: Source,
    #[command(flatten)]
    filter: Filter,
    /// Publish to this topic instead of each dead letter's `X-Original-Topic`.
    #[arg(long)]
    to: Option<String>,
    /// Show what would be replayed; publish and record nothing.
    #[arg(long)]
    dry_run: bool,
    /// Replay at most this many, then stop (a later run goes on).
    #[arg(long)]
    limit: Option<u64>,
    /// Print the counts as JSON.
    #[arg(long)]
    json: bool,
}

/// One ledger record: this dead letter was replayed.
#[derive(Debug, Serialize, Deserialize)]
struct Replayed {
    /// `<dead-letter topic>@<position>`.
    dead_letter: String,
    event_id: Option<String>,
    to: String,
    replayed_at: String,
}

/// What a replay did, in counts.
#[derive(Debug, Default, Serialize)]
struct Counts {
    /// Dead letters read.
    read: u64,
    /// Of those, matching the filter.
    matched: u64,
    /// Matching, and replayed by an earlier run (in the ledger).
    already_replayed: u64,
    /// Replayed now (or, with `--dry-run`, that would be).
    replayed: u64,
    /// Matching, with no `X-Original-Topic` and no `--to`: left alone.
    no_destination: u64,
}

pub(crate) async fn run(command: DlqCommand) -> Result<()> {
    match command {
        DlqCommand::List(args) => list(args).await,
        DlqCommand::Show(args) => show(args).await,
        DlqCommand::Replay(args) => replay(args).await,
    }
}

impl Source {
    async fn open(&self) -> Result<(Target, EventBus)> {
        let target = Target::connect(self.backend, &self.brokers, WhenMissing::DefaultAddress).await?;
        let bus = target.bus(self.brokers.bus_config()?).await?;
        Ok((target, bus))
    }

    fn ledger_topic(&self) -> String {
        self.ledger_topic
            .clone()
            .unwrap_or_else(|| format!("{}.replayed", self.topic))
    }

    fn name_of(&self, m: &BrowsedMessage) -> String {
        format!("{}@{}", self.topic, view::position_id(&m.position))
    }

    async fn reader(&self, bus: &EventBus, stop: CancellationToken) -> Result<Reader> {
        Reader::open(bus, &self.topic, Duration::from_millis(self.idle_ms), stop).await
    }

    /// The dead letters the ledger says were replayed (their names).
    async fn replayed(&self, bus: &EventBus) -> Result<HashSet<String>> {
        let idle = Duration::from_millis(self.idle_ms);
        let mut reader = match Reader::open(bus, &self.ledger_topic(), idle, CancellationToken::new()).await {
            Ok(r) => r,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(HashSet::new()),
            Err(e) => return Err(e),
        };
        let mut done = HashSet::new();
        for m in reader.to_end().await? {
            match serde_json::from_slice::<Replayed>(&m.message.payload) {
                Ok(r) => {
                    done.insert(r.dead_letter);
                }
                Err(e) => tracing::warn!(error = %e, "skipping a ledger record that is not one"),
            }
        }
        Ok(done)
    }
}

async fn list(args: ListArgs) -> Result<()> {
    let (_target, bus) = args.source.open().await?;
    let done = args.source.replayed(&bus).await?;
    let mut reader = args.source.reader(&bus, CancellationToken::new()).await?;
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::NOTHING);
    table.set_header([
        "POSITION",
        "ORIGINAL TOPIC",
        "AGGREGATE",
        "VERSION",
        "TYPE",
        "EVENT ID",
        "REPLAYED",
        "ERROR",
    ]);
    let mut shown = 0;
    while let Next::Message(m) = reader.next().await? {
        let envelope = view::envelope_of(&m).ok();
        if !args.filter.matches(envelope.as_ref()) {
            continue;
        }
        shown += 1;
        let (original, error) = view::dead_letter_headers(&m);
        let replayed = done.contains(&args.source.name_of(&m));
        if args.json {
            let mut shown = view::shown(&m, true, false);
            shown.headers.get_or_insert_default();
            let line = serde_json::json!({
                "position": view::position_id(&m.position),
                "original_topic": original,
                "error": error,
                "replayed": replayed,
                "message": shown,
            });
            println!("{line}");
            continue;
        }
        let cut = |s: &str, n: usize| match s.char_indices().nth(n) {
            Some((i, _)) => format!("{}…", &s[..i]),
            None => s.to_owned(),
        };
        table.add_row([
            view::position_id(&m.position),
            original.unwrap_or("-").to_owned(),
            envelope.as_ref().map_or("-".into(), |e| e.aggregate_id.clone()),
            envelope
                .as_ref()
                .map_or("-".into(), |e| e.event_version.to_string()),
            envelope
                .as_ref()
                .map_or("(not an envelope)".into(), |e| e.event_type.clone()),
            envelope.as_ref().map_or("-".into(), |e| e.event_id.clone()),
            if replayed { "yes" } else { "no" }.to_owned(),
            cut(error.unwrap_or("-"), 80),
        ]);
    }
    if !args.json {
        println!("{table}");
    }
    eprintln!("{shown} dead letter(s) in {}", args.source.topic);
    bus.close().await
}

async fn show(args: ShowArgs) -> Result<()> {
    let (_target, bus) = args.source.open().await?;
    let mut reader = args.source.reader(&bus, CancellationToken::new()).await?;
    while let Next::Message(m) = reader.next().await? {
        let by_position = view::position_id(&m.position) == args.id;
        let by_event = view::envelope_of(&m).is_ok_and(|e| e.event_id == args.id);
        if by_position || by_event {
            let (original, error) = view::dead_letter_headers(&m);
            let out = serde_json::json!({
                "position": view::position_id(&m.position),
                "original_topic": original,
                "error": error,
                "message": view::shown(&m, true, false),
            });
            println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
            return bus.close().await;
        }
    }
    bus.close().await?;
    Err(Error::new(
        ErrorKind::NotFound,
        format!(
            "no dead letter at position or with event id {} in {}",
            args.id, args.source.topic
        ),
    ))
}

async fn replay(args: ReplayArgs) -> Result<()> {
    let (_target, bus) = args.source.open().await?;
    let stop = CancellationToken::new();
    crate::signals::drain_on_signal(stop.clone())?;
    let done = args.source.replayed(&bus).await?;
    let ledger = args.source.ledger_topic();
    let mut reader = args.source.reader(&bus, stop.clone()).await?;
    let progress = indicatif::ProgressBar::new_spinner();
    progress.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg} [{elapsed}]").expect("a valid template"),
    );
    progress.enable_steady_tick(Duration::from_millis(200));
    let mut counts = Counts::default();
    let verb = if args.dry_run { "would replay" } else { "replayed" };
    loop {
        if args.limit.is_some_and(|n| counts.replayed >= n) {
            break;
        }
        let m = match reader.next().await? {
            Next::Message(m) => m,
            Next::Idle | Next::Stopped => break,
        };
        counts.read += 1;
        let envelope = view::envelope_of(&m).ok();
        if !args.filter.matches(envelope.as_ref()) {
            continue;
        }
        counts.matched += 1;
        let name = args.source.name_of(&m);
        if done.contains(&name) {
            counts.already_replayed += 1;
            continue;
        }
        let (original, _) = view::dead_letter_headers(&m);
        let Some(to) = args.to.clone().or(original.map(str::to_owned)) else {
            counts.no_destination += 1;
            continue;
        };
        if args.dry_run {
            let shown = match args.json {
                true => serde_json::json!({ "would_replay": name, "to": to, "message": view::shown(&m, false, false) })
                    .to_string(),
                false => format!("{verb} {name} to {to}: {}", view::line(&m, false, false)),
            };
            progress.suspend(|| println!("{shown}"));
        } else {
            publish_acked(&bus, dead_letter::replay(&m.message, &to, &name))
                .await
                .map_err(|e| {
                    Error::new(
                        e.kind(),
                        format!("replay of {name} to {to} failed, stopping: {e}"),
                    )
                })?;
            let record = Replayed {
                dead_letter: name.clone(),
                event_id: envelope.as_ref().map(|e| e.event_id.clone()),
                to: to.clone(),
                replayed_at: chrono::Utc::now().to_rfc3339(),
            };
            let body = serde_json::to_vec(&record)?;
            publish_acked(&bus, Message::new(&ledger, body).with_key(name.clone()))
                .await
                .map_err(|e| {
                    Error::new(
                        e.kind(),
                        format!("{name} was replayed to {to} but its ledger record failed ({e}); stopping"),
                    )
                })?;
        }
        counts.replayed += 1;
        progress.set_message(format!(
            "read {}, {verb} {}, already replayed {}",
            counts.read, counts.replayed, counts.already_replayed
        ));
    }
    progress.finish_and_clear();
    if args.json {
        println!("{}", serde_json::to_string(&counts)?);
    } else {
        println!(
            "read {}, matched {}, already replayed {}, {verb} {}, without destination {}",
            counts.read, counts.matched, counts.already_replayed, counts.replayed, counts.no_destination
        );
    }
    bus.close().await
}

/// Publishes `message` and waits for the broker's ACK.
async fn publish_acked(bus: &EventBus, message: Message) -> Result<()> {
    bus.publish_message(message).await?.await.into_result().map(drop)
}
