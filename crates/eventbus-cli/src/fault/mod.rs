//! `eventbus fault`: the multi-process fault harness. Per backend it starts
//! a broker that survives its own SIGKILL (nats-server with a file store;
//! tansu keeping its log in an S3-compatible store, moto), a producer and
//! one to three members of one consumer group as separate OS processes
//! (this same binary, hidden subcommands `fault-producer` /
//! `fault-member`), then, as handling progresses, runs its plan (see
//! `--members`): SIGKILLs of members and of the broker, a member joining, a
//! member frozen with SIGSTOP past its lease, a member stopped gracefully.
//! It waits until every acked event was handled (bounded), and judges the
//! logs with the strict order checker ([`check`]).
//!
//! Exit status is non-zero when an acked event was lost, or the order was
//! broken (violations or overlaps). Duplicates (re-handling after a crash
//! or redelivery) are reported, not failed.

mod check;
pub(crate) mod worker;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use eventbus::{Error, Result};
use eventbus_testkit::server::{NatsServer, S3Server, TansuServer};

use crate::backends::BackendKind;
use worker::now_ns;

/// Options of `eventbus fault`.
#[derive(Debug, Args)]
pub(crate) struct FaultArgs {
    /// Backend: nats, kafka or all (memory has no separate broker process).
    #[arg(long, value_enum, default_value_t = BackendKind::All)]
    backend: BackendKind,
    /// Aggregates.
    #[arg(long, default_value_t = 500)]
    aggregates: usize,
    /// Versions per aggregate (events = aggregates × versions).
    #[arg(long, default_value_t = 40)]
    versions: i64,
    /// Topics.
    #[arg(long, default_value_t = 5)]
    topics: usize,
    /// Producer rate, events per second.
    #[arg(long, default_value_t = 2_000)]
    rate: u64,
    /// Handler time per attempt, in µs.
    #[arg(long, default_value_t = 500)]
    handler_us: u64,
    /// Group members at the start, and the plan. 1: each member kill stops
    /// the group until its replacement starts; 2: kills hit one member while
    /// the other runs (both plans: member 1 killed and replaced, the broker
    /// killed and restarted, then the other member killed and replaced).
    /// 3: the scale-out plan: member 1 SIGKILLed (not replaced), a fourth
    /// member joins, member 2 frozen (SIGSTOP) for two leases plus 1 s then
    /// resumed, the broker killed and restarted, member 3 stopped gracefully
    /// (SIGTERM); every member must handle a share.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=3))]
    members: u8,
    /// NATS: partitions of each topic (0: unpartitioned, one active member
    /// per group and the others standing by).
    #[arg(long, default_value_t = 8)]
    partitions: u32,
    /// NATS: the members' partition lease, in ms (`consumer.lease_ms`).
    #[arg(long, default_value_t = 5_000)]
    lease_ms: u64,
    /// Kill the broker only once the producer finished (mid-consume, not
    /// mid-publish). tansu can lose writes it acknowledged just before a
    /// SIGKILL (INFRA.md), which shows up here as lost events and gaps that
    /// are the broker's, not the client's.
    #[arg(long)]
    broker_kill_after_publish: bool,
    /// Skip the broker kill (consumer kills only).
    #[arg(long)]
    no_broker_kill: bool,
    /// Longest wait for every acked event to be handled, in seconds.
    #[arg(long, default_value_t = 240)]
    timeout_secs: u64,
    /// Directory for the logs (default: a temporary one, removed afterwards).
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// The broker of one run, killable and restartable.
enum Broker {
    Nats(NatsServer),
    /// The store lives as long as the broker (dropped after it).
    Kafka(TansuServer, #[allow(dead_code)] S3Server),
}

impl Broker {
    async fn start(kind: BackendKind) -> Result<Self> {
        Ok(match kind {
            BackendKind::Nats => Self::Nats(NatsServer::start().await?),
            BackendKind::Kafka => {
                let s3 = S3Server::start().await?;
                let tansu = TansuServer::start_on_s3(&s3).await?;
                Self::Kafka(tansu, s3)
            }
            other => {
                return Err(Error::config(format!(
                    "fault runs on nats or kafka, not {other:?}"
                )));
            }
        })
    }

    fn address_args(&self) -> Vec<String> {
        match self {
            Self::Nats(s) => vec!["--backend".into(), "nats".into(), "--nats-url".into(), s.url()],
            Self::Kafka(t, _) => vec![
                "--backend".into(),
                "kafka".into(),
                "--kafka-brokers".into(),
                t.bootstrap(),
            ],
        }
    }

    fn kill(&mut self) {
        match self {
            Self::Nats(s) => s.kill(),
            Self::Kafka(t, _) => t.kill(),
        }
    }

    async fn restart(&mut self) -> Result<()> {
        match self {
            Self::Nats(s) => s.restart().await,
            Self::Kafka(t, _) => t.restart().await,
        }
    }
}

/// A child process of the run (producer or member), killed on drop.
struct Worker {
    member: u64,
    child: Child,
    log: PathBuf,
    out: PathBuf,
    killed_at: Option<u128>,
    frozen_at: Vec<u128>,
}

/// One step of a run's plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// SIGKILL the broker, restart it 2 s later.
    Broker,
    /// SIGKILL the member at this index.
    Kill(usize),
    /// SIGKILL the member at this index, start a new one 1 s later.
    Replace(usize),
    /// Start one more member.
    Join,
    /// SIGSTOP the member at this index for two leases plus 1 s, then SIGCONT.
    Freeze(usize),
    /// SIGTERM the member at this index: it closes its subscriptions and exits.
    Leave(usize),
}

/// ms from `at` to the first handling by `member` after it.
fn first_by(verdict: &check::Verdict, member: u64, at: u128) -> Option<f64> {
    verdict
        .first_handling_by(member, at)
        .map(|t| (t - at) as f64 / 1e6)
}

impl Worker {
    fn spawn(dir: &Path, name: &str, member: u64, args: &[String]) -> Result<Self> {
        let log = dir.join(format!("{name}.log"));
        let out_path = dir.join(format!("{name}.out"));
        let out = std::fs::File::create(&out_path)
            .map_err(|e| Error::config("cannot create a worker output file").with_source(e))?;
        let err = out
            .try_clone()
            .map_err(|e| Error::config("cannot create a worker output file").with_source(e))?;
        let exe =
            std::env::current_exe().map_err(|e| Error::config("cannot find this binary").with_source(e))?;
        let child = Command::new(exe)
            .args(args)
            .arg("--log")
            .arg(&log)
            // The backends' revokes (info) mark redelivery points for the checker.
            .env("RUST_LOG", "warn,eventbus_kafka=info,eventbus_nats=info")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| Error::config("cannot start a worker process").with_source(e))?;
        Ok(Self {
            member,
            child,
            log,
            out: out_path,
            killed_at: None,
            frozen_at: Vec::new(),
        })
    }

    /// Waits (at most 2 s) until the kernel reports the process stopped
    /// (state `T` in `/proc/<pid>/stat`) after a SIGSTOP.
    async fn wait_stopped(&self) {
        let stat = format!("/proc/{}/stat", self.child.id());
        for _ in 0..200 {
            let stopped = std::fs::read_to_string(&stat)
                .ok()
                .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with(['T', 't'])))
                .unwrap_or(true);
            if stopped {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Sends `signal` (`STOP`, `CONT`, `TERM`) by PID.
    fn signal(&self, signal: &str) -> Result<()> {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .map_err(|e| Error::config("cannot run kill").with_source(e))?;
        match status.success() {
            true => Ok(()),
            false => Err(Error::config(format!("kill -{signal} failed ({status})"))),
        }
    }

    /// SIGTERM, then waits (at most 30 s, then SIGKILL) for the member to
    /// close its subscriptions and exit.
    async fn terminate(&mut self) -> Result<()> {
        self.signal("TERM")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!("member {} did not exit within 30 s of SIGTERM", self.member);
        self.kill();
        Ok(())
    }

    /// SIGKILL, as a crash.
    fn kill(&mut self) {
        if self.killed_at.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.killed_at = Some(now_ns());
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One row of the report.
#[derive(Debug)]
struct Row {
    backend: &'static str,
    published: usize,
    acked: usize,
    handled: usize,
    lost: usize,
    violations: u64,
    overlaps: u64,
    duplicates: u64,
    /// (fault, ms from the fault to its aggregates being handled again)
    recoveries: Vec<(String, Option<f64>)>,
    /// Successful handlings per member (count).
    shares: Vec<(u64, usize)>,
    elapsed: Duration,
}

/// Runs the harness on each chosen backend and prints the table.
pub(crate) async fn run(args: FaultArgs) -> Result<()> {
    // SIGTERM or SIGINT stops the harness: the run is dropped, and with it
    // every worker and server process it started (killed on drop), so
    // nothing is left running.
    let stop = tokio_util::sync::CancellationToken::new();
    crate::signals::drain_on_signal(stop.clone())?;
    tokio::select! {
        outcome = run_all(args) => outcome,
        _ = stop.cancelled() => Err(Error::new(
            eventbus::ErrorKind::Closed,
            "interrupted: the fault run was stopped and its processes killed",
        )),
    }
}

async fn run_all(args: FaultArgs) -> Result<()> {
    let kinds: Vec<BackendKind> = args
        .backend
        .each()
        .into_iter()
        .filter(|k| *k != BackendKind::Memory)
        .collect();
    let mut rows = Vec::new();
    for kind in kinds {
        let mut temp = None;
        let dir = match &args.dir {
            Some(d) => {
                let d = d.join(format!("{kind:?}").to_lowercase());
                std::fs::create_dir_all(&d)
                    .map_err(|e| Error::config("cannot create --dir").with_source(e))?;
                d
            }
            None => {
                let t = tempfile::tempdir()
                    .map_err(|e| Error::config("cannot create a temp dir").with_source(e))?;
                let path = t.path().to_owned();
                temp = Some(t);
                path
            }
        };
        let row = one(kind, &args, &dir).await?;
        eprintln!("fault[{}]: {}", row.backend, row.markdown(args.members));
        if row.lost > 0 || row.violations > 0 || row.overlaps > 0 {
            // Keep the logs of a failed run for a look.
            if let Some(t) = temp.take() {
                eprintln!("fault[{}]: logs kept in {}", row.backend, t.keep().display());
            }
        }
        rows.push(row);
    }
    println!();
    println!(
        "| backend | published | acked | handled | lost | violations | overlaps | duplicates | recovery (ms from the fault to its aggregates handled again) | handled per member | run |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!("{}", r.markdown(args.members));
    }
    let failed: Vec<&str> = rows
        .iter()
        .filter(|r| {
            r.lost > 0
                || r.violations > 0
                || r.overlaps > 0
                || (args.members == 3 && r.shares.iter().any(|(_, n)| *n == 0))
        })
        .map(|r| r.backend)
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Error::new(
            eventbus::ErrorKind::Handler,
            format!("lost events or broken order on {failed:?}"),
        ))
    }
}

/// Which `lost` events the broker still has, with their position, and how
/// many distinct events of each affected topic it read back: from the
/// topic's beginning until nothing arrives for 10 s (120 s at most per
/// topic). An event there was skipped by the consumers; one missing was
/// dropped by the broker after it acknowledged it.
async fn locate(
    broker: &Broker,
    kind: BackendKind,
    lost: &[check::Event],
) -> Result<(
    Vec<(check::Event, eventbus::Position)>,
    Vec<(String, usize, crate::read_back::ReadBack)>,
)> {
    let (nats_url, kafka_brokers) = match broker {
        Broker::Nats(s) => (Some(s.url()), None),
        Broker::Kafka(t, _) => (None, Some(t.bootstrap())),
    };
    let brokers = crate::backends::BrokerArgs {
        nats_url,
        kafka_brokers,
        config: None,
        nats_config: None,
        kafka_config: None,
    };
    let target =
        crate::backends::Target::connect(kind, &brokers, crate::backends::WhenMissing::DefaultAddress)
            .await?;
    let bus = target.bus(eventbus::BusConfig::default()).await?;
    let wanted: std::collections::HashSet<&check::Event> = lost.iter().collect();
    let topics: std::collections::BTreeSet<&str> = lost.iter().map(|e| e.0.as_str()).collect();
    let (mut found, mut read) = (Vec::new(), Vec::new());
    for topic in topics {
        let mut seen = std::collections::HashSet::new();
        let log = crate::read_back::read_back(&bus, topic, |e, position| {
            let event = (topic.to_owned(), e.aggregate_id, e.event_version);
            if wanted.contains(&event) && !seen.contains(&event) {
                found.push((event.clone(), position));
            }
            seen.insert(event);
        })
        .await?;
        read.push((topic.to_owned(), seen.len(), log));
    }
    bus.close().await?;
    Ok((found, read))
}

impl Row {
    /// The row of the markdown table.
    fn markdown(&self, members: u8) -> String {
        let recoveries: Vec<String> = self
            .recoveries
            .iter()
            .map(|(what, ms)| format!("{what}: {}", ms.map_or("none".into(), |ms| format!("{ms:.0}"))))
            .collect();
        let shares: Vec<String> = self.shares.iter().map(|(m, n)| format!("m{m} {n}")).collect();
        format!(
            "| {} ({members} members) | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} s |",
            self.backend,
            self.published,
            self.acked,
            self.handled,
            self.lost,
            self.violations,
            self.overlaps,
            self.duplicates,
            recoveries.join(", "),
            shares.join(", "),
            self.elapsed.as_secs_f64()
        )
    }
}

async fn one(kind: BackendKind, args: &FaultArgs, dir: &Path) -> Result<Row> {
    let started = Instant::now();
    let mut broker = Broker::start(kind).await?;
    let events = args.aggregates * args.versions as usize;
    let mut address = broker.address_args();
    if kind == BackendKind::Kafka {
        // tansu on an S3 store answers each fetch slowly: fewer, longer
        // fetches keep it from drowning in them. 500 ms is also the
        // default; it is written here so the run never depends on that.
        let settings = dir.join("kafka.toml");
        std::fs::write(&settings, "[consumer]\nfetch_wait_max_ms = 500\n")
            .map_err(|e| Error::config("cannot write the Kafka settings").with_source(e))?;
        address.extend(["--kafka-config".to_owned(), settings.display().to_string()]);
    }
    if kind == BackendKind::Nats {
        let settings = dir.join("nats.toml");
        let mut toml = format!("[consumer]\nlease_ms = {}\n", args.lease_ms);
        if args.partitions > 0 {
            toml.push_str("[partitions]\n");
            for t in 0..args.topics {
                toml.push_str(&format!(
                    "\"{}\" = {}\n",
                    worker::topic_of(t, args.topics),
                    args.partitions
                ));
            }
        }
        std::fs::write(&settings, toml)
            .map_err(|e| Error::config("cannot write the NATS settings").with_source(e))?;
        address.extend(["--nats-config".to_owned(), settings.display().to_string()]);
    }
    let common = |what: &str| -> Vec<String> {
        let mut a = vec![what.to_owned()];
        a.extend(address.iter().cloned());
        a.extend([
            "--topics".into(),
            args.topics.to_string(),
            "--aggregates".into(),
            args.aggregates.to_string(),
            "--versions".into(),
            args.versions.to_string(),
        ]);
        a
    };
    let member_args = |id: u64| -> Vec<String> {
        let mut a = common("fault-member");
        a.extend([
            "--member".into(),
            id.to_string(),
            "--handler-us".into(),
            args.handler_us.to_string(),
        ]);
        a
    };
    let mut producer_args = common("fault-producer");
    producer_args.extend(["--rate".into(), args.rate.to_string()]);

    let mut members = Vec::new();
    for id in 1..=u64::from(args.members) {
        members.push(Worker::spawn(dir, &format!("member-{id}"), id, &member_args(id))?);
    }
    let mut producer = Worker::spawn(dir, "producer", 0, &producer_args)?;
    let logs = |members: &[Worker]| members.iter().map(|m| m.log.clone()).collect::<Vec<_>>();
    let handled_now = |members: &[Worker]| {
        let paths = logs(members);
        let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
        check::handled(&refs).len()
    };

    // (step, fraction of events handled when it happens)
    let mut plan: Vec<(Step, f64)> = Vec::new();
    if args.members == 3 {
        plan.push((Step::Kill(0), 0.2));
        plan.push((Step::Join, 0.35));
        plan.push((Step::Freeze(1), 0.5));
        if !args.no_broker_kill {
            plan.push((Step::Broker, 0.6));
        }
        plan.push((Step::Leave(2), 0.75));
    } else {
        plan.push((Step::Replace(0), 0.2));
        if !args.no_broker_kill {
            plan.push((Step::Broker, 0.45));
        }
        plan.push((Step::Replace(usize::from(args.members) - 1), 0.7));
    }
    // (what, member hit (0: the broker), at, when it was back or replaced)
    let mut faults: Vec<(String, u64, u128, u128)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let mut next_id = u64::from(args.members) + 1;
    for (step, fraction) in plan {
        let wait_producer = step == Step::Broker && args.broker_kill_after_publish;
        while handled_now(&members) < (events as f64 * fraction) as usize
            || (wait_producer && !matches!(producer.child.try_wait(), Ok(Some(_))))
        {
            if Instant::now() > deadline {
                return Err(Error::timeout(format!(
                    "fault[{kind:?}]: stuck before {step:?} (see {})",
                    dir.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let at = now_ns();
        match step {
            Step::Broker => {
                broker.kill();
                eprintln!("fault[{kind:?}]: broker killed");
                tokio::time::sleep(Duration::from_secs(2)).await;
                broker.restart().await?;
                faults.push(("broker".into(), 0, at, now_ns()));
            }
            Step::Kill(index) => {
                members[index].kill();
                let id = members[index].member;
                eprintln!("fault[{kind:?}]: member {id} killed");
                faults.push((format!("member {id} killed"), id, at, at));
            }
            Step::Replace(index) => {
                members[index].kill();
                let id = members[index].member;
                eprintln!("fault[{kind:?}]: member {id} killed");
                tokio::time::sleep(Duration::from_secs(1)).await;
                let replacement =
                    Worker::spawn(dir, &format!("member-{next_id}"), next_id, &member_args(next_id))?;
                next_id += 1;
                // The replacement takes the killed member's place for the next kill.
                let dead = std::mem::replace(&mut members[index], replacement);
                members.push(dead);
                faults.push((format!("member {id} killed"), id, at, now_ns()));
            }
            Step::Join => {
                members.push(Worker::spawn(
                    dir,
                    &format!("member-{next_id}"),
                    next_id,
                    &member_args(next_id),
                )?);
                eprintln!("fault[{kind:?}]: member {next_id} joined");
                faults.push((format!("member {next_id} joined"), next_id, at, at));
                next_id += 1;
            }
            Step::Freeze(index) => {
                let pause = Duration::from_millis(2 * args.lease_ms + 1_000);
                let id = members[index].member;
                members[index].signal("STOP")?;
                // A signal lands asynchronously: the member may still start an
                // attempt after `kill -STOP` returned. The freeze is marked once
                // the kernel reports it stopped, so every attempt it started
                // before is cut here (a later success is a fence breach).
                members[index].wait_stopped().await;
                members[index].frozen_at.push(now_ns());
                eprintln!("fault[{kind:?}]: member {id} frozen for {pause:?}");
                tokio::time::sleep(pause).await;
                members[index].signal("CONT")?;
                faults.push((format!("member {id} frozen"), id, at, at));
            }
            Step::Leave(index) => {
                let id = members[index].member;
                eprintln!("fault[{kind:?}]: member {id} stopping (SIGTERM)");
                members[index].terminate().await?;
                faults.push((format!("member {id} left"), id, at, at));
            }
        }
    }
    // Drain: the producer ends by itself; then every acked event must be handled.
    let mut complete = false;
    while Instant::now() < deadline {
        let producer_done = matches!(producer.child.try_wait(), Ok(Some(_)));
        if producer_done {
            let acked = check::acked(&producer.log);
            let paths = logs(&members);
            let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
            if acked.is_subset(&check::handled(&refs)) {
                complete = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if !complete {
        eprintln!(
            "fault[{kind:?}]: not every acked event was handled within {} s",
            args.timeout_secs
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await; // late duplicates, if any
    for m in &mut members {
        m.kill();
    }
    producer.kill();
    let member_logs: Vec<check::MemberLog<'_>> = members
        .iter()
        .map(|m| check::MemberLog {
            member: m.member,
            path: &m.log,
            out: &m.out,
            killed_at: m.killed_at,
            frozen_at: m.frozen_at.clone(),
        })
        .collect();
    let broker_restarts: Vec<u128> = faults
        .iter()
        .filter(|(_, member, ..)| *member == 0)
        .map(|(_, _, killed, _)| *killed)
        .collect();
    let verdict = check::judge(&producer.log, &member_logs, &broker_restarts);
    if verdict.fence_breaches > 0 {
        eprintln!(
            "fault[{kind:?}]: {} attempts cut by a freeze past the lease succeeded after it (counted as overlaps)",
            verdict.fence_breaches
        );
    }
    if !verdict.lost.is_empty() {
        eprintln!(
            "fault[{kind:?}]: lost (first 10): {:?}",
            &verdict.lost[..verdict.lost.len().min(10)]
        );
    }
    if !verdict.lost.is_empty() {
        match locate(&broker, kind, &verdict.lost).await {
            Ok((found, read)) => {
                // The read-back is complete when it saw every acked event of
                // the topic that it did not report lost.
                let acked = check::acked(&producer.log);
                for (topic, events, log) in &read {
                    let expected = acked.iter().filter(|e| &e.0 == topic).count();
                    eprintln!(
                        "fault[{kind:?}]: read back {events} distinct events of {topic}; {expected} were acked ({log})"
                    );
                }
                let whole = read.iter().all(|(_, _, log)| log.is_whole());
                eprintln!(
                    "fault[{kind:?}]: of {} lost, {} are in the broker's log (never handled: the bus skipped them; first: {:?}), {} are not ({})",
                    verdict.lost.len(),
                    found.len(),
                    found.first(),
                    verdict.lost.len() - found.len(),
                    if whole {
                        "the broker dropped writes it had acknowledged"
                    } else {
                        "or the read-back missed them: it was not whole"
                    }
                );
            }
            Err(e) => eprintln!("fault[{kind:?}]: could not read the broker's log back: {e}"),
        }
    }
    let recoveries = faults
        .iter()
        .map(|(what, member, at, back)| {
            let ms = if what.ends_with("joined") {
                // A join: until the new member handled its first event.
                first_by(&verdict, *member, *at)
            } else if *member == 0 || at != back {
                // The broker, or a member with a replacement: the first
                // handling after the restart.
                let first = verdict.successes.iter().find(|&&t| t > *back);
                first.map(|t| (t - at) as f64 / 1e6)
            } else {
                // A member gone or frozen: its aggregates handled by another.
                verdict.takeover_ms(*member, *at)
            };
            (what.clone(), ms)
        })
        .collect();
    drop(broker);
    Ok(Row {
        backend: if kind == BackendKind::Nats {
            "nats"
        } else {
            "kafka"
        },
        published: events,
        acked: verdict.acked,
        handled: verdict.handled,
        lost: verdict.lost.len(),
        violations: verdict.order.violations(),
        overlaps: verdict.order.overlaps,
        duplicates: verdict.order.duplicates,
        recoveries,
        shares: {
            let mut ids: Vec<u64> = members.iter().map(|m| m.member).collect();
            ids.sort_unstable();
            ids.iter()
                .map(|m| (*m, verdict.per_member.get(m).copied().unwrap_or(0)))
                .collect()
        },
        elapsed: started.elapsed(),
    })
}
