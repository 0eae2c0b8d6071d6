//! `eventbus tail`: print a topic's messages, decoded, from its first one.

use std::collections::VecDeque;
use std::time::Duration;

use clap::Args;
use eventbus::Result;
use tokio_util::sync::CancellationToken;

use super::read::{Next, Reader};
use super::view;
use crate::backends::{BackendKind, BrokerArgs, Target, WhenMissing};

/// Options of `eventbus tail`.
#[derive(Debug, Args)]
pub(crate) struct TailArgs {
    /// The topic to read (its stream on NATS).
    topic: String,
    /// The broker.
    #[arg(long, value_enum, default_value_t = BackendKind::Nats)]
    backend: BackendKind,
    #[command(flatten)]
    brokers: BrokerArgs,
    /// Only the events of this aggregate id.
    #[arg(long)]
    aggregate: Option<String>,
    /// Only the last N messages that match (the topic is read to its end first).
    #[arg(long, value_name = "N")]
    last: Option<usize>,
    /// Keep printing new messages until interrupted (Ctrl-C), instead of
    /// stopping at the topic's end.
    #[arg(long, short)]
    follow: bool,
    /// Print each message's headers too.
    #[arg(long)]
    headers: bool,
    /// Print bodies as text, without decoding envelopes (for topics that
    /// carry other messages).
    #[arg(long)]
    raw: bool,
    /// The topic's end is when nothing arrived for this long (ms).
    #[arg(long, default_value_t = 2_000, value_name = "MS", value_parser = clap::value_parser!(u64).range(100..))]
    idle_ms: u64,
    /// One JSON object per line instead of text.
    #[arg(long)]
    json: bool,
}

/// Reads the topic without joining a consumer group: it takes nothing from
/// any group and moves no group's position. It starts at the topic's
/// oldest stored message.
///
/// # Errors
/// Connecting, `NotFound` when nothing stores the topic, a broker error
/// while reading.
pub(crate) async fn run(args: TailArgs) -> Result<()> {
    let target = Target::connect(args.backend, &args.brokers, WhenMissing::DefaultAddress).await?;
    let bus = target.bus(args.brokers.bus_config()?).await?;
    let stop = CancellationToken::new();
    crate::signals::drain_on_signal(stop.clone())?;
    let mut reader = Reader::open(&bus, &args.topic, Duration::from_millis(args.idle_ms), stop).await?;
    let matches = |m: &eventbus::BrowsedMessage| match &args.aggregate {
        None => true,
        Some(a) => view::envelope_of(m).is_ok_and(|e| &e.aggregate_id == a),
    };
    let mut printed = 0u64;
    let mut print = |m: &eventbus::BrowsedMessage| {
        printed += 1;
        if args.json {
            let shown = view::shown(m, args.headers, args.raw);
            println!("{}", serde_json::to_string(&shown).unwrap_or_default());
        } else {
            println!("{}", view::line(m, args.headers, args.raw));
        }
    };
    let mut held: VecDeque<eventbus::BrowsedMessage> = VecDeque::new();
    let mut at_end = false;
    loop {
        match reader.next().await? {
            Next::Message(m) if matches(&m) => match args.last {
                Some(n) if !at_end => {
                    held.push_back(*m);
                    if held.len() > n {
                        held.pop_front();
                    }
                }
                _ => {
                    print(&m);
                }
            },
            Next::Message(_) => {}
            Next::Idle => {
                if !at_end {
                    at_end = true;
                    for m in held.drain(..) {
                        print(&m);
                    }
                }
                if !args.follow {
                    break;
                }
            }
            Next::Stopped => break,
        }
    }
    for m in held.drain(..) {
        print(&m);
    }
    eprintln!("{printed} message(s) from {}", args.topic);
    drop(reader);
    bus.close().await
}
