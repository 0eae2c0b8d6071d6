//! `eventbus soak`: a long run at a steady rate on one backend, sampling the
//! process's resident memory every second, to show that memory stays flat
//! (no leak per event) and nothing is lost or reordered over time.
//!
//! One process publishes (`--rate` envelopes/s, round-robin over
//! `--aggregates` aggregates and `--topics` topics, each aggregate's
//! versions in order) and consumes them (one envelope subscription per
//! topic, every attempt judged by the strict order checker). The report
//! gives the RSS slope after warm-up (least squares, MB/min), the RSS range,
//! and lost, violations, overlaps and duplicates; the command fails when an
//! event is lost or order breaks.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use clap::Args;
use eventbus::{BusConfig, Envelope, SubscribeOptions};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use serde::Serialize;

use crate::backends::{BackendKind, BrokerArgs, Target, WhenMissing};

/// Options of `eventbus soak`.
#[derive(Debug, Args)]
pub(crate) struct SoakArgs {
    /// Backend to run on (one; `all` runs each in turn).
    #[arg(long, value_enum, default_value_t = BackendKind::Memory)]
    backend: BackendKind,
    /// Length of the steady run, in minutes.
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// Envelopes published per second.
    #[arg(long, default_value_t = 2_000)]
    rate: u64,
    /// Aggregates, published round-robin.
    #[arg(long, default_value_t = 500)]
    aggregates: usize,
    /// Topics.
    #[arg(long, default_value_t = 5)]
    topics: usize,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 256)]
    payload_bytes: usize,
    /// Seconds of warm-up left out of the RSS slope.
    #[arg(long, default_value_t = 60)]
    warmup_secs: u64,
    #[command(flatten)]
    brokers: BrokerArgs,
    /// Also write the report and every sample as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Run the raw broker client (rdkafka, async-nats, a channel) instead of
    /// the bus, with the same publishing, consuming, checker and sampling:
    /// the baseline a slope is compared with.
    #[arg(long)]
    raw: bool,
    /// Serve the bus's metrics (Prometheus text) on `http://ADDR/metrics`
    /// while the soak runs: the consumer's handled, lag, in-flight and
    /// latency figures, scraped as a service's would be.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
}

/// Serves `handle`'s exposition on `http://addr/metrics` until the process ends.
async fn serve_metrics(
    addr: std::net::SocketAddr,
    handle: eventbus::prometheus::PrometheusHandle,
) -> eventbus::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let handle = handle.clone();
            async move { handle.render() }
        }),
    );
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| eventbus::Error::config(format!("cannot listen on {addr}")).with_source(e))?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    eprintln!("metrics on http://{addr}/metrics");
    Ok(())
}

/// One sample, taken every second.
#[derive(Debug, Clone, Copy, Serialize)]
struct Sample {
    /// Seconds since the start.
    secs: f64,
    /// Resident set size, in KiB (`VmRSS`).
    rss_kib: u64,
    /// Bytes the C allocator has handed out and not had back, in KiB
    /// (glibc `mallinfo2`: `uordblks + hblkhd`, every arena; Rust and
    /// librdkafka both allocate there). RSS minus this is memory the
    /// allocator keeps for reuse. 0 where glibc is not the allocator (the
    /// CLI's default `mimalloc` feature: build with `--no-default-features`
    /// to measure it).
    heap_kib: u64,
    /// Envelopes acked by the broker so far (count).
    acked: u64,
    /// Envelopes handled so far (count).
    handled: u64,
}

/// What one soak run measured.
#[derive(Debug, Serialize)]
struct SoakReport {
    backend: String,
    minutes: f64,
    rate: u64,
    published: u64,
    acked: u64,
    publish_failures: u64,
    handled: u64,
    lost: u64,
    violations: u64,
    overlaps: u64,
    duplicates: u64,
    rss_start_mib: f64,
    rss_after_warmup_mib: f64,
    rss_end_mib: f64,
    rss_max_mib: f64,
    /// Least-squares slope of RSS after warm-up, in MiB per minute.
    rss_slope_mib_per_min: f64,
    heap_after_warmup_mib: f64,
    heap_end_mib: f64,
    heap_max_mib: f64,
    /// Least-squares slope of the live heap after warm-up, in MiB per minute:
    /// a leak shows here; growth of RSS alone is the allocator's retention.
    heap_slope_mib_per_min: f64,
    /// RSS after the run, once the subscriptions are closed and
    /// `malloc_trim(0)` (and `mi_collect` under mimalloc) has returned free pages to the system, in MiB.
    rss_after_trim_mib: f64,
    samples: Vec<Sample>,
}

/// The process's resident set size, in KiB, from `/proc/self/status`.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// Live heap bytes of the C allocator, in KiB (see [`Sample::heap_kib`]).
/// Only where glibc's malloc is the Rust allocator too (the `mimalloc`
/// feature off): under mimalloc, `mallinfo2` would count librdkafka alone.
#[cfg(all(target_os = "linux", target_env = "gnu", not(feature = "mimalloc")))]
fn heap_kib() -> u64 {
    // SAFETY: mallinfo2 only reads the allocator's counters (glibc >= 2.33).
    let info = unsafe { libc::mallinfo2() };
    ((info.uordblks + info.hblkhd) / 1024) as u64
}

#[cfg(not(all(target_os = "linux", target_env = "gnu", not(feature = "mimalloc"))))]
fn heap_kib() -> u64 {
    0
}

/// Returns free heap pages to the system, so the RSS that follows is what
/// is really in use.
fn trim_heap() {
    #[cfg(feature = "mimalloc")]
    // SAFETY: mi_collect only frees mimalloc's own unused pages; it has no preconditions.
    unsafe {
        libmimalloc_sys::mi_collect(true);
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Least-squares slope of `y` over `x`.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let (sx, sy) = points.iter().fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let (num, den) = points.iter().fold((0.0, 0.0), |(a, b), (x, y)| {
        (a + (x - mx) * (y - my), b + (x - mx) * (x - mx))
    });
    if den == 0.0 { 0.0 } else { num / den }
}

/// Runs the soak on each chosen backend and prints the reports.
///
/// # Errors
/// What connecting or subscribing returns, and `Backend` when an event was
/// lost or order broke.
pub(crate) async fn run(args: SoakArgs) -> eventbus::Result<()> {
    if let Some(addr) = args.metrics_listen {
        serve_metrics(addr, eventbus::prometheus::install()?).await?;
    }
    let mut reports = Vec::new();
    for kind in args.backend.each() {
        let target = Target::connect(kind, &args.brokers, WhenMissing::StartLocal).await?;
        let report = soak(&target, &args).await?;
        println!(
            "{}: {:.1} min at {}/s: published {}, acked {}, publish failures {}, handled {}, lost {}, \
             violations {}, overlaps {}, duplicates {}; RSS {:.1} MiB at start, {:.1} after warm-up, \
             {:.1} at end, max {:.1}; slope after warm-up {:+.3} MiB/min; live heap {:.1} MiB after \
             warm-up, {:.1} at end, max {:.1}, slope {:+.3} MiB/min; RSS after close and trim {:.1} MiB",
            report.backend,
            report.minutes,
            report.rate,
            report.published,
            report.acked,
            report.publish_failures,
            report.handled,
            report.lost,
            report.violations,
            report.overlaps,
            report.duplicates,
            report.rss_start_mib,
            report.rss_after_warmup_mib,
            report.rss_end_mib,
            report.rss_max_mib,
            report.rss_slope_mib_per_min,
            report.heap_after_warmup_mib,
            report.heap_end_mib,
            report.heap_max_mib,
            report.heap_slope_mib_per_min,
            report.rss_after_trim_mib
        );
        reports.push(report);
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&reports)?)
            .map_err(|e| eventbus::Error::config("cannot write the soak report").with_source(e))?;
    }
    match reports
        .iter()
        .find(|r| r.lost > 0 || r.violations > 0 || r.overlaps > 0)
    {
        Some(r) => Err(eventbus::Error::new(
            eventbus::ErrorKind::Backend,
            format!(
                "{}: lost {}, violations {}, overlaps {}",
                r.backend, r.lost, r.violations, r.overlaps
            ),
        )),
        None => Ok(()),
    }
}

/// What a soak publishes through and consumes with: the bus, or the raw client.
enum Client {
    Bus {
        bus: eventbus::EventBus,
        subs: Vec<eventbus::Subscription>,
        pending: FuturesUnordered<eventbus::PublishHandle>,
    },
    Raw {
        sink: Box<dyn crate::bench::raw::RawSink>,
    },
}

/// Counts one publish result into (acked, failed).
fn tally(result: &eventbus::PublishResult, counts: &mut (u64, u64)) {
    match result.error {
        None => counts.0 += 1,
        Some(_) => counts.1 += 1,
    }
}

impl Client {
    async fn publish(&mut self, topics: &[String], topic: usize, e: &Envelope) -> eventbus::Result<()> {
        match self {
            Client::Bus { bus, pending, .. } => pending.push(bus.publish_envelope(&topics[topic], e).await?),
            Client::Raw { sink, .. } => sink.publish(topic, e).await?,
        }
        Ok(())
    }

    /// (acked, failed) since the last call, without waiting.
    fn settled_now(&mut self) -> (u64, u64) {
        match self {
            Client::Bus { pending, .. } => {
                let mut counts = (0, 0);
                while let Some(Some(result)) = futures::FutureExt::now_or_never(pending.next()) {
                    tally(&result, &mut counts);
                }
                counts
            }
            Client::Raw { sink, .. } => {
                let (acked, failed) = sink.settled_now();
                (acked as u64, failed as u64)
            }
        }
    }

    /// (acked, failed) of everything outstanding, waiting at most 60 s per ACK.
    async fn settle_all(&mut self) -> (u64, u64) {
        match self {
            Client::Bus { pending, .. } => {
                let mut counts = (0, 0);
                while let Ok(Some(result)) =
                    tokio::time::timeout(Duration::from_secs(60), pending.next()).await
                {
                    tally(&result, &mut counts);
                }
                counts
            }
            Client::Raw { sink, .. } => {
                let before = sink.settled_now();
                (before.0 as u64 + sink.acked().await as u64, before.1 as u64)
            }
        }
    }

    async fn close(self) {
        match self {
            Client::Bus { bus, subs, .. } => {
                for sub in subs {
                    let _ = sub.close().await;
                }
                let _ = bus.close().await;
            }
            Client::Raw { mut sink } => sink.stop(),
        }
    }
}

async fn soak(target: &Target, args: &SoakArgs) -> eventbus::Result<SoakReport> {
    let id = crate::bench::run_id(if args.raw { "soakraw" } else { "soak" }, 0);
    let topics: Vec<String> = (0..args.topics.max(1)).map(|t| format!("{id}-t{t}")).collect();
    // One recorder for both clients, so each handling does the same work;
    // its checker is bounded: its own memory must not grow with the events.
    let recorder = crate::bench::measure::Recorder::with_checker(
        indicatif::ProgressBar::hidden(),
        eventbus_testkit::OrderChecker::with_replay_window(64),
    );
    let mut client = if args.raw {
        Client::Raw {
            sink: crate::bench::raw::start(target, &topics, &recorder).await?,
        }
    } else {
        let bus = target.bus(BusConfig::default()).await?;
        let mut subs = Vec::new();
        for topic in &topics {
            let (recorder, name) = (recorder.clone(), topic.clone());
            subs.push(
                bus.subscribe_envelope(
                    topic,
                    SubscribeOptions::group(format!("{id}-g")),
                    move |e: Envelope| {
                        recorder.record(&name, &e);
                        async { Ok::<_, std::io::Error>(()) }
                    },
                )
                .await?,
            );
        }
        let pending = FuturesUnordered::new();
        Client::Bus { bus, subs, pending }
    };
    let payload = serde_json::json!({ "pad": "x".repeat(args.payload_bytes.saturating_sub(12)) });
    let aggregates = args.aggregates.max(1);
    let mut versions: HashMap<usize, i64> = HashMap::new();
    let started = Instant::now();
    let end = started + Duration::from_secs_f64(args.minutes * 60.0);
    let mut samples = vec![Sample {
        secs: 0.0,
        rss_kib: rss_kib(),
        heap_kib: heap_kib(),
        acked: 0,
        handled: 0,
    }];
    let mut next_sample = started + Duration::from_secs(1);
    let (mut published, mut acked, mut failures) = (0u64, 0u64, 0u64);
    let tick = Duration::from_millis(10);
    let per_tick = (args.rate as f64 * tick.as_secs_f64()).max(1.0);
    let mut owed = 0.0;
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    // SIGTERM or SIGINT ends the steady run early; what was published is
    // still awaited, handled and checked.
    let stop = tokio_util::sync::CancellationToken::new();
    crate::signals::drain_on_signal(stop.clone())?;
    while Instant::now() < end && !stop.is_cancelled() {
        interval.tick().await;
        owed += per_tick;
        while owed >= 1.0 {
            owed -= 1.0;
            let a = (published as usize) % aggregates;
            let v = versions.entry(a).or_insert(0);
            *v += 1;
            let e = Envelope::builder(format!("soak-{a}"), "Soaked", *v)
                .json_payload(&payload)?
                .build()?;
            client.publish(&topics, a % topics.len(), &e).await?;
            published += 1;
        }
        // Collect the ACKs that are in, without waiting.
        let (ok, failed) = client.settled_now();
        acked += ok;
        failures += failed;
        if Instant::now() >= next_sample {
            next_sample += Duration::from_secs(1);
            samples.push(Sample {
                secs: started.elapsed().as_secs_f64(),
                rss_kib: rss_kib(),
                heap_kib: heap_kib(),
                acked,
                handled: recorder.received(),
            });
        }
    }
    let (ok, failed) = client.settle_all().await;
    acked += ok;
    failures += failed;
    let deadline = Instant::now() + Duration::from_secs(120);
    while recorder.received() < acked && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let handled = recorder.received();
    client.close().await;
    trim_heap();
    let rss_after_trim = rss_kib();
    let report = recorder.report();
    let mib = |kib: u64| kib as f64 / 1024.0;
    let warm: Vec<(f64, f64)> = samples
        .iter()
        .filter(|s| s.secs >= args.warmup_secs as f64)
        .map(|s| (s.secs / 60.0, mib(s.rss_kib)))
        .collect();
    let warm_heap: Vec<(f64, f64)> = samples
        .iter()
        .filter(|s| s.secs >= args.warmup_secs as f64)
        .map(|s| (s.secs / 60.0, mib(s.heap_kib)))
        .collect();
    Ok(SoakReport {
        backend: if args.raw {
            format!("{}-raw", target.name())
        } else {
            target.name().to_owned()
        },
        minutes: args.minutes,
        rate: args.rate,
        published,
        acked,
        publish_failures: failures,
        handled,
        lost: acked.saturating_sub(report.received.saturating_sub(report.duplicates)),
        violations: report.violations(),
        overlaps: report.overlaps,
        duplicates: report.duplicates,
        rss_start_mib: mib(samples[0].rss_kib),
        rss_after_warmup_mib: warm.first().map_or(0.0, |p| p.1),
        rss_end_mib: samples.last().map_or(0.0, |s| mib(s.rss_kib)),
        rss_max_mib: mib(samples.iter().map(|s| s.rss_kib).max().unwrap_or(0)),
        rss_slope_mib_per_min: slope(&warm),
        heap_after_warmup_mib: warm_heap.first().map_or(0.0, |p| p.1),
        heap_end_mib: samples.last().map_or(0.0, |s| mib(s.heap_kib)),
        heap_max_mib: mib(samples.iter().map(|s| s.heap_kib).max().unwrap_or(0)),
        heap_slope_mib_per_min: slope(&warm_heap),
        rss_after_trim_mib: mib(rss_after_trim),
        samples,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_is_least_squares() {
        assert_eq!(slope(&[(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)]), 2.0);
        assert_eq!(slope(&[(0.0, 1.0)]), 0.0);
        assert!(rss_kib() > 0);
        #[cfg(all(target_os = "linux", target_env = "gnu", not(feature = "mimalloc")))]
        assert!(heap_kib() > 0);
        // Under mimalloc glibc's counters would miss the Rust heap: none reported.
        #[cfg(feature = "mimalloc")]
        assert_eq!(heap_kib(), 0);
    }
}
