//! What both our run and the raw baselines record: deliveries (order,
//! duplicates, end-to-end latency) and process resources (RSS, tasks).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eventbus::Envelope;
use eventbus_testkit::OrderChecker;
use hdrhistogram::Histogram;
use indicatif::ProgressBar;

/// Aggregate id of readiness probes: one per topic, sent before timing starts.
pub(crate) const PROBE_AGGREGATE: &str = "bench-probe";

/// A latency histogram in µs, 1 µs to 1 h, 3 significant digits.
pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// Records every delivery of one level.
pub(crate) struct Recorder {
    checker: OrderChecker,
    end_to_end_us: Mutex<Histogram<u64>>,
    received: AtomicU64,
    probes: AtomicUsize,
    last_receive: Mutex<Option<Instant>>,
    progress: ProgressBar,
}

impl Recorder {
    /// A recorder with a bounded checker (the last 64 versions of each
    /// aggregate: violations, gaps and overlaps are judged the same), so a
    /// run's peak RSS is the client's, not a record of every event.
    pub(crate) fn new(progress: ProgressBar) -> Arc<Self> {
        Self::with_checker(progress, OrderChecker::with_replay_window(64))
    }

    /// A recorder judging deliveries with `checker` (a soak's bounded one).
    pub(crate) fn with_checker(progress: ProgressBar, checker: OrderChecker) -> Arc<Self> {
        Arc::new(Self {
            checker,
            end_to_end_us: Mutex::new(histogram()),
            received: AtomicU64::new(0),
            probes: AtomicUsize::new(0),
            last_receive: Mutex::new(None),
            progress,
        })
    }

    /// Records one handled envelope of `topic`; probes only count as readiness.
    pub(crate) fn record(&self, topic: &str, e: &Envelope) {
        self.record_as(0, topic, e);
    }

    /// [`record`](Recorder::record) by group member `member`.
    pub(crate) fn record_as(&self, member: u64, topic: &str, e: &Envelope) {
        if e.aggregate_id == PROBE_AGGREGATE {
            self.probes.fetch_add(1, Ordering::AcqRel);
            return;
        }
        let latency = chrono::Utc::now()
            .signed_duration_since(e.timestamp)
            .num_microseconds()
            .unwrap_or(i64::MAX)
            .max(1);
        self.end_to_end_us
            .lock()
            .unwrap()
            .saturating_record(latency as u64);
        self.checker.record_as(member, topic, e);
        *self.last_receive.lock().unwrap() = Some(Instant::now());
        self.received.fetch_add(1, Ordering::AcqRel);
        self.progress.inc(1);
    }

    /// Waits until `topics` probes arrived (consumers joined and fetching).
    pub(crate) async fn wait_ready(&self, topics: usize, timeout: Duration) -> bool {
        wait(timeout, || self.probes.load(Ordering::Acquire) >= topics).await
    }

    /// Waits until `events` deliveries arrived; false at the deadline.
    pub(crate) async fn wait_received(&self, events: u64, timeout: Duration) -> bool {
        wait(timeout, || self.received.load(Ordering::Acquire) >= events).await
    }

    /// Deliveries recorded so far (probes not counted).
    pub(crate) fn received(&self) -> u64 {
        self.received.load(Ordering::Acquire)
    }

    pub(crate) fn report(&self) -> eventbus_testkit::OrderReport {
        self.checker.report()
    }

    pub(crate) fn end_to_end(&self) -> Histogram<u64> {
        self.end_to_end_us.lock().unwrap().clone()
    }

    pub(crate) fn last_receive(&self) -> Option<Instant> {
        *self.last_receive.lock().unwrap()
    }
}

/// What a level's publish loop measured, turned into its report with the
/// recorder's deliveries and the sampler's resources.
pub(crate) struct Published {
    pub(crate) label: String,
    pub(crate) events: usize,
    pub(crate) aggregates: usize,
    pub(crate) acked: usize,
    pub(crate) publish_us: Histogram<u64>,
    pub(crate) first_send: Instant,
}

impl Published {
    pub(crate) async fn report(self, recorder: &Recorder, sampler: Sampler) -> super::LevelReport {
        let last = recorder.last_receive().unwrap_or(self.first_send);
        super::LevelReport {
            label: self.label,
            run: 0,
            events: self.events,
            aggregates: self.aggregates,
            acked: self.acked,
            order: recorder.report(),
            publish_us: self.publish_us,
            end_to_end_us: recorder.end_to_end(),
            elapsed: last.duration_since(self.first_send),
            resources: sampler.finish(self.first_send, last).await,
        }
    }
}

/// Polls `done` every millisecond until it holds (true) or `timeout` passed (false).
pub(crate) async fn wait_until(timeout: Duration, done: impl Fn() -> bool) -> bool {
    wait(timeout, done).await
}

async fn wait(timeout: Duration, done: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    true
}

/// Resident memory and live tasks: before, peak while running, after;
/// CPU spent while running.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub(crate) struct Resources {
    /// This process's CPU time (user and system, all threads) from the
    /// first publish to the last delivery, ms (sampled every 10 ms): the
    /// client's whole cost, its library's threads included. Runs alternate
    /// in one process, so each run's figure is its own client's.
    pub(crate) cpu_ms: f64,
    /// Share of the machine's cores busy over the same time, percent of
    /// all cores (Linux `/proc/stat`): near 100, the run was bound by CPU,
    /// the broker's included.
    pub(crate) machine_busy_pct: f64,
    /// Share of the cores' time over the same time that a virtual
    /// machine's host gave to other guests (steal, Linux `/proc/stat`; it
    /// counts in `machine_busy_pct`), percent: a run the host took much
    /// from is slower for reasons outside the bench.
    pub(crate) machine_steal_pct: f64,
    pub(crate) rss_before_mb: f64,
    pub(crate) rss_peak_mb: f64,
    pub(crate) rss_after_mb: f64,
    pub(crate) tasks_before: usize,
    pub(crate) tasks_peak: usize,
    pub(crate) tasks_after: usize,
}

/// Samples RSS, live tokio tasks and CPU every 10 ms until stopped.
pub(crate) struct Sampler {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(f64, usize, Vec<CpuSample>)>,
    before: (f64, usize),
}

/// CPU counters at one instant: this process's ms, the machine's ticks.
#[derive(Clone, Copy)]
struct CpuSample {
    at: Instant,
    process_ms: f64,
    machine: Option<Ticks>,
}

impl CpuSample {
    fn now() -> Self {
        Self {
            at: Instant::now(),
            process_ms: process_cpu_ms(),
            machine: cpu_ticks(),
        }
    }
}

impl Sampler {
    pub(crate) fn start() -> Self {
        let before = (rss_mb(), live_tasks());
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let (mut rss, mut tasks, mut cpu) = (0.0_f64, 0, Vec::new());
            while !flag.load(Ordering::Relaxed) {
                rss = rss.max(rss_mb());
                tasks = tasks.max(live_tasks());
                cpu.push(CpuSample::now());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (rss, tasks, cpu)
        });
        Self { stop, task, before }
    }

    /// Stops sampling; `after` is read now (call it once the bus is
    /// closed). CPU counts from the last sample at or before `from` to the
    /// first at or after `to` (the first publish and the last delivery).
    pub(crate) async fn finish(self, from: Instant, to: Instant) -> Resources {
        let end = CpuSample::now();
        self.stop.store(true, Ordering::Relaxed);
        let (peak_rss, peak_tasks, mut cpu) = self.task.await.unwrap_or_default();
        cpu.push(end);
        let start = cpu.iter().rev().find(|c| c.at <= from).unwrap_or(&cpu[0]);
        let stop = cpu.iter().find(|c| c.at >= to).unwrap_or(&end);
        let cpu_ms = stop.process_ms - start.process_ms;
        let (machine_busy_pct, machine_steal_pct) = Ticks::pcts(start.machine, stop.machine);
        // Let closed tasks finish unwinding before counting what is left.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        Resources {
            cpu_ms,
            machine_busy_pct,
            machine_steal_pct,
            rss_before_mb: self.before.0,
            rss_peak_mb: peak_rss.max(self.before.0),
            rss_after_mb: rss_mb(),
            tasks_before: self.before.1,
            tasks_peak: peak_tasks.max(self.before.1),
            tasks_after: live_tasks(),
        }
    }
}

/// Resident set size of this process in MiB (Linux `/proc/self/statm`).
fn rss_mb() -> f64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<f64>().ok()))
        .unwrap_or(0.0);
    pages * 4096.0 / (1024.0 * 1024.0)
}

/// CPU time (user plus system) of process `pid` and of its children, the
/// running ones and those it has waited for, ms (Linux `/proc/<pid>/stat`;
/// `None` elsewhere or once `pid` is gone). Of a PostgreSQL postmaster:
/// the whole cluster (each session's backend, the background workers).
/// A child's time counts in its own line while it runs and in its
/// parent's waited-for time once it has exited, so the difference of two
/// readings is the time spent between them.
pub(crate) fn process_tree_cpu_ms(pid: u32) -> Option<f64> {
    // SAFETY: sysconf reads a constant.
    let ticks_per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks_per_s <= 0 {
        return None;
    }
    // The fields after the command's closing parenthesis (the command may
    // hold spaces): [1] ppid, [11] utime, [12] stime, [13] cutime, [14] cstime.
    let fields = |pid: &str| -> Option<Vec<u64>> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let rest = &stat[stat.rfind(')')? + 1..];
        Some(rest.split_whitespace().map(|f| f.parse().unwrap_or(0)).collect())
    };
    let ticks = |f: &[u64]| f.get(11..15).map_or(0, |t| t.iter().sum::<u64>());
    let mut total = ticks(&fields(&pid.to_string())?);
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        let Some(child) = name.to_str().filter(|n| n.bytes().all(|b| b.is_ascii_digit())) else {
            continue;
        };
        if let Some(f) = fields(child).filter(|f| f.get(1) == Some(&u64::from(pid))) {
            total += ticks(&f);
        }
    }
    Some(total as f64 * 1000.0 / ticks_per_s as f64)
}

/// CPU time of this process so far (user plus system, every thread), ms.
pub(crate) fn process_cpu_ms() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0.0;
    }
    let ms = |t: libc::timeval| t.tv_sec as f64 * 1000.0 + t.tv_usec as f64 / 1000.0;
    ms(usage.ru_utime) + ms(usage.ru_stime)
}

/// The machine's cores busy between two [`Ticks`] readings,
/// percent of all cores; 0 when either is missing.
fn busy_pct(before: Option<(u64, u64)>, after: Option<(u64, u64)>) -> f64 {
    match (before, after) {
        (Some((busy0, total0)), Some((busy1, total1))) if total1 > total0 => {
            100.0 * busy1.saturating_sub(busy0) as f64 / (total1 - total0) as f64
        }
        _ => 0.0,
    }
}

/// How busy the machine's cores are from [`start`](CoresBusy::start) to
/// [`pcts`](CoresBusy::pcts): whether a measurement was bound by CPU, and
/// how much of their time the host gave to other guests.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CoresBusy(Option<Ticks>);

impl CoresBusy {
    pub(crate) fn start() -> Self {
        Self(cpu_ticks())
    }

    /// Percent of all cores busy since `start`, and percent of their time
    /// that a virtual machine's host took for other guests (steal, counted
    /// in the first), from one reading of Linux `/proc/stat` (0 elsewhere):
    /// a measurement the host took much from is not comparable with one it
    /// took little from.
    pub(crate) fn pcts(&self) -> (f64, f64) {
        Ticks::pcts(self.0, cpu_ticks())
    }
}

/// The first line of Linux `/proc/stat`: every core's ticks so far.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Ticks {
    /// user, nice, system, irq, softirq and steal (guest is in user).
    busy: u64,
    /// steal alone.
    steal: u64,
    /// all of the above, idle and iowait.
    total: u64,
}

impl Ticks {
    /// `cpu  user nice system idle iowait irq softirq steal ...`; `None`
    /// when it has fewer than 5 numbers.
    fn parse(stat: &str) -> Option<Self> {
        let ticks: Vec<u64> = stat
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .take(8)
            .filter_map(|t| t.parse().ok())
            .collect();
        if ticks.len() < 5 {
            return None;
        }
        let total: u64 = ticks.iter().sum();
        Some(Self {
            busy: total - ticks[3] - ticks[4],
            steal: ticks.get(7).copied().unwrap_or(0),
            total,
        })
    }

    /// Percent of all cores busy between two readings, and percent of
    /// their time the host took (steal); 0 when either reading is missing.
    fn pcts(before: Option<Self>, after: Option<Self>) -> (f64, f64) {
        (
            busy_pct(before.map(Self::busy), after.map(Self::busy)),
            busy_pct(before.map(Self::steal), after.map(Self::steal)),
        )
    }

    fn busy(self) -> (u64, u64) {
        (self.busy, self.total)
    }

    fn steal(self) -> (u64, u64) {
        (self.steal, self.total)
    }
}

fn cpu_ticks() -> Option<Ticks> {
    Ticks::parse(&std::fs::read_to_string("/proc/stat").ok()?)
}

fn live_tasks() -> usize {
    tokio::runtime::Handle::current().metrics().num_alive_tasks()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_ticks_count_steal_as_busy_and_apart() {
        let stat = "cpu  100 5 50 800 20 3 2 40 0 0\ncpu0 50 2 25 400 10 1 1 20 0 0\n";
        let t = Ticks::parse(stat).unwrap();
        assert_eq!(t.total, 1020);
        assert_eq!(t.busy, 200, "idle and iowait are not busy");
        assert_eq!(t.steal, 40);
        let later = Ticks::parse("cpu  200 5 50 880 20 3 2 60 0 0\n").unwrap();
        assert_eq!(busy_pct(Some(t.steal()), Some(later.steal())), 10.0);
        assert_eq!(busy_pct(Some(t.busy()), Some(later.busy())), 60.0);
        assert_eq!(Ticks::parse("cpu 1 2 3\n"), None);
    }
}
