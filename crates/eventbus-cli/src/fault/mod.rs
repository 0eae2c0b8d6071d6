//! `eventbus fault`: the multi-process fault harness. Per backend it starts
//! a broker that survives its own SIGKILL (nats-server with a file store;
//! tansu keeping its log in an S3-compatible store, moto), a producer and
//! two members of one consumer group as separate OS processes (this same
//! binary, hidden subcommands `fault-producer` / `fault-member`), then, as
//! handling progresses: SIGKILLs member 1 and starts a new member, SIGKILLs
//! the broker and restarts it, SIGKILLs member 2 and starts a new member.
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
    /// Group members running at once: 2 (kills hit one while the other
    /// runs), or 1 (each kill stops the group until its replacement starts).
    /// NATS durable consumers are single-member for ordered handling
    /// (partitioned groups are issue 12): 2 members on NATS break order.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=2))]
    members: u8,
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
            // The Kafka backend's revokes (info) mark redelivery points for the checker.
            .env("RUST_LOG", "warn,eventbus_kafka=info")
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
        })
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
    /// (fault, ms from the kill to the first handling that started after the restart)
    recoveries: Vec<(&'static str, Option<f64>)>,
    elapsed: Duration,
}

/// Runs the harness on each chosen backend and prints the table.
pub(crate) async fn run(args: FaultArgs) -> Result<()> {
    let kinds: Vec<BackendKind> = args
        .backend
        .each()
        .into_iter()
        .filter(|k| *k != BackendKind::Memory)
        .collect();
    let mut rows = Vec::new();
    for kind in kinds {
        let temp;
        let dir = match &args.dir {
            Some(d) => {
                let d = d.join(format!("{kind:?}").to_lowercase());
                std::fs::create_dir_all(&d)
                    .map_err(|e| Error::config("cannot create --dir").with_source(e))?;
                d
            }
            None => {
                temp = tempfile::tempdir()
                    .map_err(|e| Error::config("cannot create a temp dir").with_source(e))?;
                temp.path().to_owned()
            }
        };
        let row = one(kind, &args, &dir).await?;
        eprintln!("fault[{}]: {}", row.backend, row.markdown(args.members));
        rows.push(row);
    }
    println!();
    println!(
        "| backend | published | acked | handled | lost | violations | overlaps | duplicates | recovery (ms from kill to first handling after restart) | run |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!("{}", r.markdown(args.members));
    }
    let failed: Vec<&str> = rows
        .iter()
        .filter(|r| r.lost > 0 || r.violations > 0 || r.overlaps > 0)
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

impl Row {
    /// The row of the markdown table.
    fn markdown(&self, members: u8) -> String {
        let recoveries: Vec<String> = self
            .recoveries
            .iter()
            .map(|(what, ms)| format!("{what}: {}", ms.map_or("none".into(), |ms| format!("{ms:.0}"))))
            .collect();
        format!(
            "| {} ({members} members) | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} s |",
            self.backend,
            self.published,
            self.acked,
            self.handled,
            self.lost,
            self.violations,
            self.overlaps,
            self.duplicates,
            recoveries.join(", "),
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
        // fetches (librdkafka's default wait) keep it from drowning in them.
        let settings = dir.join("kafka.toml");
        std::fs::write(&settings, "[consumer]\nfetch_wait_max_ms = 500\n")
            .map_err(|e| Error::config("cannot write the Kafka settings").with_source(e))?;
        address.extend(["--kafka-config".to_owned(), settings.display().to_string()]);
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

    let mut members = vec![Worker::spawn(dir, "member-1", 1, &member_args(1))?];
    if args.members == 2 {
        members.push(Worker::spawn(dir, "member-2", 2, &member_args(2))?);
    }
    let mut producer = Worker::spawn(dir, "producer", 0, &producer_args)?;
    let logs = |members: &[Worker]| members.iter().map(|m| m.log.clone()).collect::<Vec<_>>();
    let handled_now = |members: &[Worker]| {
        let paths = logs(members);
        let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
        check::handled(&refs).len()
    };

    // (fault, fraction of events handled when it strikes)
    let mut plan: Vec<(&'static str, f64)> = vec![("member 1", 0.2)];
    if !args.no_broker_kill {
        plan.push(("broker", 0.45));
    }
    plan.push((
        if args.members == 2 {
            "member 2"
        } else {
            "member 1 again"
        },
        0.7,
    ));
    let mut faults: Vec<(&'static str, u128, u128)> = Vec::new(); // (what, killed at, restarted at)
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let mut next_id = 3;
    for (what, fraction) in plan {
        let wait_producer = what == "broker" && args.broker_kill_after_publish;
        while handled_now(&members) < (events as f64 * fraction) as usize
            || (wait_producer && !matches!(producer.child.try_wait(), Ok(Some(_))))
        {
            if Instant::now() > deadline {
                return Err(Error::timeout(format!(
                    "fault[{kind:?}]: stuck before the {what} kill (see {})",
                    dir.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let killed = now_ns();
        match what {
            "broker" => {
                broker.kill();
                eprintln!("fault[{kind:?}]: broker killed");
                tokio::time::sleep(Duration::from_secs(2)).await;
                broker.restart().await?;
            }
            member => {
                let index = if member == "member 2" { 1 } else { 0 };
                members[index].kill();
                eprintln!("fault[{kind:?}]: {member} killed");
                tokio::time::sleep(Duration::from_secs(1)).await;
                let name = format!("member-{next_id}");
                members.push(Worker::spawn(dir, &name, next_id, &member_args(next_id))?);
                next_id += 1;
                // The replacement takes the killed member's place for the next kill.
                let replacement = members.pop().expect("just pushed");
                let dead = std::mem::replace(&mut members[index], replacement);
                members.push(dead);
            }
        }
        faults.push((what, killed, now_ns()));
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
        })
        .collect();
    let broker_restarts: Vec<u128> = faults
        .iter()
        .filter(|(what, ..)| *what == "broker")
        .map(|(_, killed, _)| *killed)
        .collect();
    let verdict = check::judge(&producer.log, &member_logs, &broker_restarts);
    if !verdict.lost.is_empty() {
        eprintln!(
            "fault[{kind:?}]: lost (first 10): {:?}",
            &verdict.lost[..verdict.lost.len().min(10)]
        );
    }
    let recoveries = faults
        .iter()
        .map(|(what, killed, restarted)| {
            let first = verdict.successes.iter().find(|&&t| t > *restarted);
            (*what, first.map(|t| (t - killed) as f64 / 1e6))
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
        elapsed: started.elapsed(),
    })
}
