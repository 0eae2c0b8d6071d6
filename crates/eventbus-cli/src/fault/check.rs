//! Reads the logs of a fault run and judges it with the strict
//! [`OrderChecker`]: every attempt replayed in order of start time across
//! all members, attempts cut by a kill ended (failed) at the kill.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use eventbus_testkit::{Attempt, OrderChecker, OrderReport};

/// One (topic, aggregate, version).
pub(crate) type Event = (String, String, i64);

/// A member's log, its output (where the Kafka and NATS backends report
/// each partition revoke), when (ns) the harness killed it, if it did, and
/// when it froze it (SIGSTOP), if it did.
#[derive(Debug)]
pub(crate) struct MemberLog<'a> {
    pub(crate) member: u64,
    pub(crate) path: &'a Path,
    pub(crate) out: &'a Path,
    pub(crate) killed_at: Option<u128>,
    pub(crate) frozen_at: Vec<u128>,
}

/// Times (ns) of the partition revokes the Kafka or NATS backend logged in
/// `out` (tracing's `partitions revoked` line, RFC 3339 time first): each
/// ends the member's run, since the partitions it gets next are fetched
/// again from the group's committed offsets or ack floor (redelivery).
fn revokes(out: &Path) -> Vec<u128> {
    std::fs::read_to_string(out)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("partitions revoked"))
        .filter_map(|l| {
            let plain: String = strip_ansi(l);
            let stamp = plain.split_whitespace().next()?;
            let t = chrono::DateTime::parse_from_rfc3339(stamp).ok()?;
            u128::try_from(t.timestamp_nanos_opt()?).ok()
        })
        .collect()
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ ... letter
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The verdict of one run.
#[derive(Debug, Default)]
pub(crate) struct Verdict {
    pub(crate) acked: usize,
    pub(crate) handled: usize,
    pub(crate) lost: Vec<Event>,
    pub(crate) order: OrderReport,
    /// ns of every successful handling (for recovery times).
    pub(crate) successes: Vec<u128>,
    /// Successful handlings per member (count).
    pub(crate) per_member: std::collections::BTreeMap<u64, usize>,
    /// Attempts cut by a freeze (SIGSTOP) past the member's lease that
    /// still succeeded after it woke: the fence failed (each also counted
    /// as an overlap).
    pub(crate) fence_breaches: u64,
    /// (ns, member, topic, aggregate) of every attempt start and success, in time order.
    starts: Vec<(u128, u64, String, String)>,
    handlings: Vec<(u128, u64, String, String)>,
}

impl Verdict {
    /// ns of the first handling by `member` after `at`.
    pub(crate) fn first_handling_by(&self, member: u64, at: u128) -> Option<u128> {
        self.handlings
            .iter()
            .find(|(t, m, ..)| *t > at && *m == member)
            .map(|(t, ..)| *t)
    }

    /// ms from `at` until another member first handled an aggregate that
    /// `member` was the last to start before `at` (its partitions flowing
    /// again after a kill, freeze or leave).
    pub(crate) fn takeover_ms(&self, member: u64, at: u128) -> Option<f64> {
        let mut last: HashMap<(&str, &str), u64> = HashMap::new();
        for (t, m, topic, aggregate) in &self.starts {
            if *t > at {
                break;
            }
            last.insert((topic.as_str(), aggregate.as_str()), *m);
        }
        self.handlings
            .iter()
            .find(|(t, m, topic, aggregate)| {
                *t > at && *m != member && last.get(&(topic.as_str(), aggregate.as_str())) == Some(&member)
            })
            .map(|(t, ..)| (t - at) as f64 / 1e6)
    }
}

#[derive(Debug)]
struct Record {
    at: u128,
    fact: Fact,
    member: u64,
    event: Event,
}

/// What a record says; at one instant ends and kills come before starts, so
/// an attempt that ended does not overlap one starting then.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fact {
    Succeeded,
    /// The attempt ended without succeeding (cancelled).
    Failed,
    /// The harness killed the member: its running attempts end, failed.
    Killed,
    /// The harness froze the member past its lease: its running attempts
    /// must never resume (they end here, failed; a later success is a breach).
    Frozen,
    Started,
}

fn parse_member(line: &str) -> Option<Record> {
    let mut f = line.split(' ');
    let kind = f.next()?;
    let member = f.next()?.parse().ok()?;
    let topic = f.next()?.to_owned();
    let aggregate = f.next()?.to_owned();
    let version = f.next()?.parse().ok()?;
    let at = f.next()?.parse().ok()?;
    Some(Record {
        at,
        fact: match kind {
            "S" => Fact::Started,
            "E" => Fact::Succeeded,
            "X" => Fact::Failed,
            _ => return None,
        },
        member,
        event: (topic, aggregate, version),
    })
}

/// The acked events of the producer's log.
pub(crate) fn acked(path: &Path) -> HashSet<Event> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            (f.next()? == "A").then_some(())?;
            Some((
                f.next()?.to_owned(),
                f.next()?.to_owned(),
                f.next()?.parse().ok()?,
            ))
        })
        .collect()
}

/// Distinct events handled successfully so far, over `logs`.
pub(crate) fn handled(logs: &[&Path]) -> HashSet<Event> {
    let mut out = HashSet::new();
    for path in logs {
        for line in std::fs::read_to_string(path).unwrap_or_default().lines() {
            if let Some(r) = parse_member(line).filter(|r| r.fact == Fact::Succeeded) {
                out.insert(r.event);
            }
        }
    }
    out
}

/// Replays every attempt of every member in order of start and judges.
///
/// A run (the checker's member) is one member process between two
/// redelivery points: a broker crash (times in `broker_restarts`, ns: the
/// broker redelivers what it had not recorded as acked, since acks and
/// commits in flight are lost with it) and, on Kafka, each partition revoke
/// of that member (its next assignment starts again from the committed
/// offsets). A new run may replay an aggregate from below, in order; inside
/// a run, going back is a regression as always.
pub(crate) fn judge(producer: &Path, members: &[MemberLog<'_>], broker_restarts: &[u128]) -> Verdict {
    let acked = acked(producer);
    let mut records = Vec::new();
    let mut redeliveries: HashMap<u64, Vec<u128>> = HashMap::new();
    for m in members {
        let mut points = revokes(m.out);
        points.extend_from_slice(broker_restarts);
        redeliveries.insert(m.member, points);
        let lines = std::fs::read_to_string(m.path).unwrap_or_default();
        records.extend(lines.lines().filter_map(parse_member));
        if let Some(at) = m.killed_at {
            let event = (String::new(), String::new(), 0);
            records.push(Record {
                at,
                fact: Fact::Killed,
                member: m.member,
                event,
            });
        }
        for &at in &m.frozen_at {
            let event = (String::new(), String::new(), 0);
            records.push(Record {
                at,
                fact: Fact::Frozen,
                member: m.member,
                event,
            });
        }
    }
    records.sort_by_key(|r| (r.at, r.fact));
    let checker = Arc::new(OrderChecker::new());
    let mut running: HashMap<(u64, Event), Attempt> = HashMap::new();
    let mut successes = Vec::new();
    let mut handled = HashSet::new();
    let mut cut: HashSet<(u64, Event)> = HashSet::new();
    let (mut fence_breaches, mut per_member) = (0, std::collections::BTreeMap::new());
    let (mut starts, mut handlings) = (Vec::new(), Vec::new());
    for r in records {
        match r.fact {
            Fact::Killed => {
                // Dropping an attempt's guard records it as failed.
                running.retain(|(member, _), _| *member != r.member);
                continue;
            }
            Fact::Frozen => {
                let frozen: Vec<(u64, Event)> =
                    running.keys().filter(|(m, _)| *m == r.member).cloned().collect();
                for key in frozen {
                    running.remove(&key);
                    cut.insert(key);
                }
                continue;
            }
            Fact::Failed => {
                let key = (r.member, r.event);
                running.remove(&key);
                cut.remove(&key);
                continue;
            }
            Fact::Succeeded if cut.remove(&(r.member, r.event.clone())) => {
                fence_breaches += 1;
                continue;
            }
            _ => {}
        }
        let epoch = redeliveries
            .get(&r.member)
            .map_or(0, |p| p.iter().filter(|&&b| b <= r.at).count()) as u64;
        let run = r.member * 100_000 + epoch;
        let key = (r.member, r.event.clone());
        if r.fact == Fact::Started {
            let (topic, aggregate, version) = &r.event;
            let envelope = eventbus_testkit::envelope(aggregate, *version);
            starts.push((r.at, r.member, topic.clone(), aggregate.clone()));
            running.insert(key, checker.begin_as(run, topic, &envelope));
        } else if let Some(attempt) = running.remove(&key) {
            attempt.succeeded();
            successes.push(r.at);
            *per_member.entry(r.member).or_insert(0) += 1;
            handlings.push((r.at, r.member, r.event.0.clone(), r.event.1.clone()));
            handled.insert(r.event);
        }
    }
    drop(running);
    let mut lost: Vec<Event> = acked.difference(&handled).cloned().collect();
    lost.sort();
    successes.sort_unstable();
    let mut order = checker.report();
    order.overlaps += fence_breaches;
    Verdict {
        acked: acked.len(),
        handled: handled.len(),
        lost,
        order,
        successes,
        per_member,
        fence_breaches,
        starts,
        handlings,
    }
}
