//! `eventbus dlq`: list, show and replay dead letters.
//!
//! Dead letters are read without a consumer group ([`EventBus::browse`]),
//! so listing takes nothing away. A replay publishes each chosen dead
//! letter back ([`dead_letter::replay`]), one at a time, waiting for the
//! broker's ACK before the next, in the dead-letter topic's order, then
//! records it in the ledger topic `<dead-letter topic>.replayed` (one record
//! per dead letter, naming its position and event id; every record under
//! one key, so on Kafka they share a partition and keep their order).
//!
//! - **At most once across runs**: before replaying, a replay appends a
//!   marker to the ledger and reads the ledger until the marker comes back
//!   (60 s at most, else it does not start), so it knows every earlier
//!   record however slow the broker; a dead letter recorded there (same
//!   position, same event id) is not replayed again. An interrupted replay
//!   is simply run again.
//! - **Each aggregate's order**: dead letters go back in dead-letter order;
//!   once one of an aggregate's dead letters is left behind (filtered out,
//!   no destination), its later ones are held back too (counted in
//!   `held_back`) rather than overtake it.
//! - **Stops** on the first failed publish (the counts so far are printed),
//!   and between two dead letters on SIGINT or SIGTERM.
//!
//! The one window: a replay whose ACK arrived but whose ledger record was
//! not written (the process killed between the two) is replayed again by
//! the next run. Its dedup id is the same both times, so NATS (within the
//! stream's duplicate window, 2 min by default) stores it once; elsewhere
//! the subscription's event-id memory (`consumer.dedup_window`, recent ids
//! of one process) may absorb it. Keep the ledger topic's retention at
//! least the dead-letter topic's: a record that expired no longer stops a
//! second replay.

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
    /// The topic's end is when nothing arrived for this long (ms, at least
    /// 100). A replay reads the ledger to its true end regardless.
    #[arg(long, default_value_t = 2_000, value_name = "MS", value_parser = clap::value_parser!(u64).range(100..))]
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

/// A ledger record that marks where a replay started reading the ledger:
/// every record before it has been read once it is seen.
#[derive(Debug, Serialize, Deserialize)]
struct Marker {
    marker: String,
}

/// Longest wait for a replay's marker to come back through the ledger.
const LEDGER_READ_LIMIT: Duration = Duration::from_secs(60);

/// The dead letters the ledger records as replayed: name to event id.
#[derive(Debug, Default)]
struct Ledger(std::collections::HashMap<String, Option<String>>);

impl Ledger {
    fn add(&mut self, bytes: &[u8]) -> Option<String> {
        if let Ok(m) = serde_json::from_slice::<Marker>(bytes) {
            return Some(m.marker);
        }
        match serde_json::from_slice::<Replayed>(bytes) {
            Ok(r) => {
                self.0.insert(r.dead_letter, r.event_id);
            }
            Err(e) => tracing::warn!(error = %e, "skipping a ledger record that is not one"),
        }
        None
    }

    /// Whether the dead letter called `name`, holding `event_id`, was
    /// replayed: same position and same event (a dead-letter topic that was
    /// deleted and created again reuses positions).
    fn contains(&self, name: &str, event_id: Option<&str>) -> bool {
        self.0.get(name).is_some_and(|id| id.as_deref() == event_id)
    }
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
    /// Matching, not replayed because an earlier dead letter of the same
    /// aggregate is not replayed (filtered out, no destination, held back):
    /// replaying it first would break the aggregate's order.
    held_back: u64,
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

    /// The ledger's record key: one key, so every record of this
    /// dead-letter topic is in one partition (Kafka), in order.
    fn ledger_key(&self) -> String {
        self.topic.clone()
    }

    /// The ledger read until nothing arrives for the idle time: for
    /// showing (`dlq list`, `--dry-run`), where a record read late only
    /// shows a dead letter as not replayed.
    async fn ledger_shown(&self, bus: &EventBus) -> Result<Ledger> {
        let idle = Duration::from_millis(self.idle_ms);
        let mut reader = match Reader::open(bus, &self.ledger_topic(), idle, CancellationToken::new()).await {
            Ok(r) => r,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Ledger::default()),
            Err(e) => return Err(e),
        };
        let mut ledger = Ledger::default();
        for m in reader.read_to_end().await? {
            ledger.add(&m.message.payload);
        }
        Ok(ledger)
    }

    /// The whole ledger, for a replay: a marker record is appended (same
    /// key, so after every earlier record), and the ledger is read until the
    /// marker comes back, however slow the broker; nothing is assumed from
    /// a pause.
    ///
    /// # Errors
    /// A publish or read error, or `Timeout` when the marker did not come
    /// back within 60 s: the replay does not start.
    async fn ledger_complete(&self, bus: &EventBus) -> Result<Ledger> {
        let marker = uuid::Uuid::now_v7().simple().to_string();
        let body = serde_json::to_vec(&Marker {
            marker: marker.clone(),
        })?;
        publish_acked(
            bus,
            Message::new(self.ledger_topic(), body).with_key(self.ledger_key()),
        )
        .await?;
        let read = async {
            let mut stream = bus.browse(&self.ledger_topic()).await?;
            let mut ledger = Ledger::default();
            while let Some(m) = futures::StreamExt::next(&mut stream).await {
                if ledger.add(&m?.message.payload).as_deref() == Some(marker.as_str()) {
                    return Ok(ledger);
                }
            }
            Err(Error::new(
                ErrorKind::Backend,
                "the ledger stream ended before its marker",
            ))
        };
        tokio::time::timeout(LEDGER_READ_LIMIT, read).await.map_err(|_| {
            Error::new(
                ErrorKind::Timeout,
                format!(
                    "the ledger {} was not read to its end within {} s: not replaying",
                    self.ledger_topic(),
                    LEDGER_READ_LIMIT.as_secs()
                ),
            )
        })?
    }
}

/// The aggregate a dead letter belongs to, for keeping order: the
/// envelope's aggregate id, else the record key.
fn aggregate_of(m: &BrowsedMessage, envelope: Option<&Envelope>) -> Option<String> {
    envelope.map(|e| e.aggregate_id.clone()).or_else(|| {
        m.message
            .key
            .as_ref()
            .map(|k| String::from_utf8_lossy(k).into_owned())
    })
}

async fn list(args: ListArgs) -> Result<()> {
    let (_target, bus) = args.source.open().await?;
    let done = args.source.ledger_shown(&bus).await?;
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
        let replayed = done.contains(
            &args.source.name_of(&m),
            envelope.as_ref().map(|e| e.event_id.as_str()),
        );
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
    let progress = indicatif::ProgressBar::new_spinner();
    progress.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg} [{elapsed}]").expect("a valid template"),
    );
    progress.enable_steady_tick(Duration::from_millis(200));
    let mut counts = Counts::default();
    let outcome = replay_all(&args, &bus, &stop, &progress, &mut counts).await;
    progress.finish_and_clear();
    let verb = if args.dry_run { "would replay" } else { "replayed" };
    if args.json {
        println!("{}", serde_json::to_string(&counts)?);
    } else {
        println!(
            "read {}, matched {}, already replayed {}, {verb} {}, without destination {}, held back behind an earlier dead letter {}",
            counts.read,
            counts.matched,
            counts.already_replayed,
            counts.replayed,
            counts.no_destination,
            counts.held_back
        );
    }
    if stop.is_cancelled() {
        eprintln!("interrupted: run the same command again to go on");
    }
    let closed = bus.close().await;
    outcome.and(closed)
}

/// The replay loop: see the module docs. Counts what it did in `counts`,
/// also when it stops on an error.
async fn replay_all(
    args: &ReplayArgs,
    bus: &EventBus,
    stop: &CancellationToken,
    progress: &indicatif::ProgressBar,
    counts: &mut Counts,
) -> Result<()> {
    let done = match args.dry_run {
        true => args.source.ledger_shown(bus).await?,
        false => args.source.ledger_complete(bus).await?,
    };
    let ledger = args.source.ledger_topic();
    let mut reader = args.source.reader(bus, stop.clone()).await?;
    // Aggregates with a dead letter left behind in this run: their later
    // dead letters wait too, so no aggregate's order breaks.
    let mut blocked: HashSet<String> = HashSet::new();
    let verb = if args.dry_run { "would replay" } else { "replayed" };
    loop {
        if args.limit.is_some_and(|n| counts.replayed >= n) || stop.is_cancelled() {
            return Ok(());
        }
        let m = match reader.next().await? {
            Next::Message(m) => m,
            Next::Idle | Next::Stopped => return Ok(()),
        };
        counts.read += 1;
        let envelope = view::envelope_of(&m).ok();
        let name = args.source.name_of(&m);
        let aggregate = aggregate_of(&m, envelope.as_ref());
        if done.contains(&name, envelope.as_ref().map(|e| e.event_id.as_str())) {
            if args.filter.matches(envelope.as_ref()) {
                counts.matched += 1;
                counts.already_replayed += 1;
            }
            continue;
        }
        if !args.filter.matches(envelope.as_ref()) {
            blocked.extend(aggregate);
            continue;
        }
        counts.matched += 1;
        if aggregate.as_ref().is_some_and(|a| blocked.contains(a)) {
            counts.held_back += 1;
            continue;
        }
        let (original, _) = view::dead_letter_headers(&m);
        let Some(to) = args.to.clone().or(original.map(str::to_owned)) else {
            counts.no_destination += 1;
            blocked.extend(aggregate);
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
            publish_acked(bus, dead_letter::replay(&m.message, &to, &name))
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
            publish_acked(
                bus,
                Message::new(&ledger, body).with_key(args.source.ledger_key()),
            )
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
}

/// Publishes `message` and waits for the broker's ACK.
async fn publish_acked(bus: &EventBus, message: Message) -> Result<()> {
    bus.publish_message(message).await?.await.into_result().map(drop)
}
