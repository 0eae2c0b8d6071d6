//! `eventbus`: the event bus's command-line tool.

mod backends;
mod bench;
mod fault;
mod ops;
mod outbox;
mod read_back;
mod signals;
mod soak;

use clap::{Parser, Subcommand};

/// Event bus tools.
#[derive(Debug, Parser)]
#[command(name = "eventbus", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the original SDK's performance scenario and reports honest figures.
    Bench(bench::BenchArgs),
    /// Multi-process fault harness: producer and two group members as
    /// processes, SIGKILLs of members and broker mid-stream, strict order check.
    Fault(fault::FaultArgs),
    /// A producer process of `eventbus fault`.
    #[command(hide = true)]
    FaultProducer(fault::worker::ProducerArgs),
    /// A group member process of `eventbus fault`.
    #[command(hide = true)]
    FaultMember(fault::worker::MemberArgs),
    /// A long steady run on one backend, sampling memory every second:
    /// RSS slope after warm-up, lost events and order violations.
    Soak(soak::SoakArgs),
    /// Transactional outbox: run a relay, show status.
    #[command(subcommand)]
    Outbox(outbox::OutboxCommand),
    /// Print a topic's messages, decoded, from its oldest stored one
    /// (without joining any consumer group).
    Tail(ops::tail::TailArgs),
    /// Publish envelopes from a file or stdin (one JSON envelope, or JSON
    /// lines) and print each one's ACK result.
    Publish(ops::publish::PublishArgs),
    /// Dead letters: list, show, replay to the original topic.
    #[command(subcommand)]
    Dlq(ops::dlq::DlqCommand),
    /// How far behind a consumer group is: pending per partition, age of
    /// the oldest unsettled message, rate of change.
    Lag(ops::lag::LagArgs),
    /// Create or check the streams and topics a settings file declares.
    #[command(subcommand)]
    Topics(ops::topics::TopicsCommand),
}

/// mimalloc instead of glibc's malloc: on the bench's sustained level it
/// took ours from 94,000 to 147,000 events/s on memory and NATS from 68 % to
/// 86 % of raw (2026-12-01, README "Benchmark"); allocation and freeing were
/// about 27 % of the bus's CPU under glibc (`docs/flamegraph-memory.svg`).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let outcome = match Cli::parse().command {
        Command::Bench(args) => bench::run(args).await,
        Command::Outbox(command) => outbox::run(command).await,
        Command::Soak(args) => soak::run(args).await,
        Command::Tail(args) => ops::tail::run(args).await,
        Command::Publish(args) => ops::publish::run(args).await,
        Command::Dlq(command) => ops::dlq::run(command).await,
        Command::Lag(args) => ops::lag::run(args).await,
        Command::Topics(command) => ops::topics::run(command).await,
        Command::Fault(args) => fault::run(args).await,
        Command::FaultProducer(args) => fault::worker::producer(args).await,
        Command::FaultMember(args) => fault::worker::member(args).await,
    };
    // Exit now: dropping the runtime would wait for blocking client
    // teardown (librdkafka's consumer close) that serves no purpose here.
    match outcome {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1)
        }
    }
}
