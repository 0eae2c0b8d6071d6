//! The two kinds of child process of `eventbus fault`: a producer and a
//! group member. Each appends one line per fact to its own log, with a
//! single `write` on an `O_APPEND` file, so a SIGKILL loses no line already
//! written:
//!
//! - producer: `A <topic> <aggregate> <version>` once the broker acked it;
//! - member: `S <member> <topic> <aggregate> <version> <ns>` when a handler
//!   attempt starts, `E …` when it succeeded (written before the handler
//!   returns, so before the ack), `X …` when the attempt ended without
//!   succeeding (its handler was cancelled: close, revoke, lost lease).
//!
//! Times are nanoseconds of the system clock, comparable across processes
//! on one machine.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Args;
use eventbus::{BusConfig, Envelope, Error, Result, SubscribeOptions};

use crate::backends::{BackendKind, BrokerArgs, Target, WhenMissing};

/// The consumer group of every member.
pub(crate) const GROUP: &str = "fault";

/// Options shared by the producer and the members.
#[derive(Debug, Clone, Args)]
pub(crate) struct WorkerArgs {
    /// Backend (nats or kafka).
    #[arg(long, value_enum)]
    pub(crate) backend: BackendKind,
    #[command(flatten)]
    pub(crate) brokers: BrokerArgs,
    /// Topics `fault-0` … `fault-<n-1>`.
    #[arg(long, default_value_t = 5)]
    pub(crate) topics: usize,
    /// Aggregates; aggregate `a-<i>` goes to topic `fault-<i mod topics>`.
    #[arg(long, default_value_t = 500)]
    pub(crate) aggregates: usize,
    /// Versions per aggregate.
    #[arg(long, default_value_t = 40)]
    pub(crate) versions: i64,
    /// Where this process appends its lines.
    #[arg(long)]
    pub(crate) log: PathBuf,
}

/// Options of a member.
#[derive(Debug, Clone, Args)]
pub(crate) struct MemberArgs {
    #[command(flatten)]
    pub(crate) common: WorkerArgs,
    /// This process's member id (unique per start).
    #[arg(long)]
    pub(crate) member: u64,
    /// Handler time per attempt, in µs.
    #[arg(long, default_value_t = 500)]
    pub(crate) handler_us: u64,
}

/// Options of the producer.
#[derive(Debug, Clone, Args)]
pub(crate) struct ProducerArgs {
    #[command(flatten)]
    pub(crate) common: WorkerArgs,
    /// Events per second over all aggregates (each aggregate publishes its
    /// versions one after another, each after the previous one's ACK).
    #[arg(long, default_value_t = 2_000)]
    pub(crate) rate: u64,
}

pub(crate) fn topic_of(aggregate: usize, topics: usize) -> String {
    format!("fault-{}", aggregate % topics)
}

pub(crate) fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default()
}

/// An append-only log written one whole line per `write` call.
struct LineLog(std::fs::File);

impl LineLog {
    fn open(path: &Path) -> Result<Self> {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map(Self)
            .map_err(|e| Error::config(format!("cannot open {}", path.display())).with_source(e))
    }

    fn line(&self, line: String) {
        if let Err(e) = (&self.0).write_all(line.as_bytes()) {
            eprintln!("log write failed: {e}");
        }
    }
}

/// Runs `attempt` every 500 ms until it succeeds or 60 s passed: a process
/// started while the broker restarts waits for it, as a restarted service would.
async fn retrying<T, F: Future<Output = Result<T>>>(what: &str, mut attempt: impl FnMut() -> F) -> Result<T> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match attempt().await {
            Ok(done) => return Ok(done),
            Err(e) if tokio::time::Instant::now() < deadline => {
                eprintln!("{what} failed, retrying: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Connects (retrying, see [`retrying`]).
async fn bus(args: &WorkerArgs, config: BusConfig) -> Result<(Target, eventbus::EventBus)> {
    let target = Target::connect(args.backend, &args.brokers, WhenMissing::DefaultAddress).await?;
    let bus = retrying("connect", || target.bus(config.clone())).await?;
    Ok((target, bus))
}

/// A group member: subscribes every topic in group [`GROUP`] and runs until killed.
pub(crate) async fn member(args: MemberArgs) -> Result<()> {
    let log = Arc::new(LineLog::open(&args.common.log)?);
    let (_target, bus) = bus(&args.common, BusConfig::default()).await?;
    let mut subscriptions = Vec::new();
    for t in 0..args.common.topics {
        let topic = format!("fault-{t}");
        let (log, member, pause) = (log.clone(), args.member, Duration::from_micros(args.handler_us));
        let name = topic.clone();
        let handler = move |e: Envelope| {
            let (log, name) = (log.clone(), name.clone());
            async move {
                let fact = format!("{member} {name} {} {}", e.aggregate_id, e.event_version);
                log.line(format!("S {fact} {}\n", now_ns()));
                let mut running = Running {
                    log,
                    fact,
                    done: false,
                };
                tokio::time::sleep(pause).await;
                running.log.line(format!("E {} {}\n", running.fact, now_ns()));
                running.done = true;
                Ok::<_, std::io::Error>(())
            }
        };
        let subscribe = || bus.subscribe_envelope(&topic, SubscribeOptions::group(GROUP), handler.clone());
        let sub = retrying(&format!("subscribe {topic}"), subscribe).await?;
        subscriptions.push(sub);
    }
    eprintln!("member {} subscribed", args.member);
    // Runs until the harness kills it (SIGKILL) or stops it (SIGTERM, Ctrl-C):
    // a stop closes every subscription (drain, hand partitions over).
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Error::config("cannot listen for SIGTERM").with_source(e))?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    eprintln!("member {} leaving", args.member);
    for sub in subscriptions {
        let _ = sub.close().await;
    }
    bus.close().await
}

/// A handler attempt in progress: writes `X` if dropped before it succeeded.
struct Running {
    log: Arc<LineLog>,
    fact: String,
    done: bool,
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.done {
            self.log.line(format!("X {} {}\n", self.fact, now_ns()));
        }
    }
}

/// The producer: every aggregate publishes versions 1..=versions in order,
/// each after the previous one's ACK, retrying a version (same event id, so
/// the broker can drop the copy) until acked or 120 s passed.
pub(crate) async fn producer(args: ProducerArgs) -> Result<()> {
    let log = Arc::new(LineLog::open(&args.common.log)?);
    let mut config = BusConfig::default();
    config.publish.timeout_ms = 2_000;
    config.publish.ack_timeout_ms = 5_000;
    let (_target, bus) = bus(&args.common, config).await?;
    let aggregates = args.common.aggregates;
    // Each aggregate publishes at rate / aggregates per second.
    let period = Duration::from_secs_f64(aggregates as f64 / args.rate.max(1) as f64);
    let start = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for a in 0..aggregates {
        let (bus, log) = (bus.clone(), log.clone());
        let topic = topic_of(a, args.common.topics);
        let versions = args.common.versions;
        let offset = period.mul_f64(a as f64 / aggregates as f64);
        tasks.spawn(async move {
            let mut unacked = 0u64;
            for v in 1..=versions {
                tokio::time::sleep_until(start + offset + period * (v as u32 - 1)).await;
                let envelope = Envelope::builder(format!("a-{a}"), "FaultTested", v)
                    .json_payload(&serde_json::json!({ "a": a, "v": v }))
                    .and_then(|b| b.build())
                    .expect("valid envelope");
                let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
                let acked = loop {
                    let outcome = match bus.publish_envelope(&topic, &envelope).await {
                        Ok(handle) => handle.await.error.map(|e| e.to_string()),
                        Err(e) => Some(e.to_string()),
                    };
                    match outcome {
                        None => break true,
                        Some(e) if tokio::time::Instant::now() > deadline => {
                            eprintln!("a-{a} v{v}: not acked within 120 s; last error: {e}");
                            break false;
                        }
                        Some(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                    }
                };
                if acked {
                    log.line(format!("A {topic} a-{a} {v}\n"));
                } else {
                    // The aggregate cannot go on without a gap: stop it here.
                    unacked += (versions - v + 1) as u64;
                    break;
                }
            }
            unacked
        });
    }
    let mut unacked = 0;
    while let Some(done) = tasks.join_next().await {
        unacked += done.map_err(|e| Error::config("producer task failed").with_source(e))?;
    }
    eprintln!("producer done: {unacked} events not acked");
    bus.close().await
}
