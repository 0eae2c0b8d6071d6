//! [`MemoryBackend`]: an in-process broker with the semantics of a persistent one.
//!
//! Each topic is a log of messages numbered from 1, split into
//! `memory.partitions` partitions by the message key (the aggregate id) with
//! [`partition_for`]. Each consumer group reads every message; the members of
//! one group split the partitions evenly ([`fair_share`], sticky: a partition
//! moves only when a member's share changes), so each aggregate is with one
//! member at a time and in publish order.
//!
//! Join, leave and redelivery work as on a broker with partitioned groups:
//! - a member joining takes its share; a partition that moves is first
//!   revoked from its old member ([`Ownership`]: no attempt starts there any
//!   more, running attempts finish within 30 s or are cancelled), then its
//!   unsettled messages go back, ahead of newer ones, to the new member;
//! - a member that leaves (closes, or is dropped without closing, as a
//!   crashed process) has its partitions revoked the same way.
//!
//! A message stays in the log until every group has acknowledged it. A
//! topic holds at most `memory.max_messages_per_topic` messages: publishers
//! then wait (and time out through the bus) instead of the log growing
//! without bound.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::FutureExt;
use futures::stream::{BoxStream, StreamExt};
use tokio::sync::watch;

use crate::backend::{AckFuture, Backend, BackendSubscription, BrowsedMessage, SubscribeSpec};
use crate::config::MemoryConfig;
use crate::error::{Error, Result};
use crate::health::ConnectionState;
use crate::message::{Ack, Acker, Delivery, Message, Ownership, Position};
use crate::partition::{GroupAssignment, fair_share, partition_for};

/// Longest wait for a revoked partition's running attempts before they are cancelled.
const REVOKE_GRACE: Duration = Duration::from_secs(30);

/// The in-process backend. Cheap to clone; clones share the topics, so two
/// buses over clones of one backend talk to each other.
///
/// [`connect`](MemoryBackend::connect) gives another client of the same
/// in-process broker that closes on its own, as a second process
/// connecting to one broker would (used to run several members of a group).
#[derive(Clone, Debug)]
pub struct MemoryBackend {
    inner: Arc<Inner>,
    closed: Arc<AtomicBool>,
}

#[derive(Debug)]
struct Inner {
    config: MemoryConfig,
    topics: Mutex<HashMap<String, Arc<Topic>>>,
    next_member: AtomicU64,
}

#[derive(Debug)]
struct Topic {
    partitions: u32,
    /// `memory.max_in_flight_per_partition`.
    per_partition: usize,
    state: Mutex<TopicState>,
    /// Bumped for consumers: new message (only while one watches, see
    /// `watching`), redelivery, room under a partition's bound, rebalance,
    /// close.
    changed: watch::Sender<u64>,
    /// Consumers watching `changed`: registered before they mark it seen
    /// and look, until they wake from its wait or find a message
    /// ([`Watching`]). A publish bumps `changed` only when there are some.
    watching: AtomicUsize,
    /// Bumped for publishers waiting on a full log: trim, close.
    space: watch::Sender<u64>,
}

#[derive(Debug)]
struct TopicState {
    /// Sequence number of `log[0]`.
    base: u64,
    /// Messages and their partitions.
    log: VecDeque<(Message, u32)>,
    groups: HashMap<String, Group>,
}

#[derive(Debug)]
struct Group {
    /// Next sequence not yet routed to its partition's queue.
    next: u64,
    partitions: Vec<PartitionState>,
    /// Delivered and unsettled: sequence to (member, partition).
    pending: BTreeMap<u64, (u64, u32)>,
    /// Deliveries so far of messages delivered more than once.
    counts: HashMap<u64, u64, foldhash::fast::RandomState>,
    /// Live members, by id.
    members: BTreeMap<u64, Arc<Mutex<GroupAssignment>>>,
}

#[derive(Debug, Default)]
struct PartitionState {
    /// The member allowed to take from this partition; `None` while unowned
    /// or while a former owner's attempts are stopping.
    owner: Option<u64>,
    /// The owner's hold, given to each delivery.
    ownership: Ownership,
    /// Routed here, never delivered (ascending).
    ready: VecDeque<u64>,
    /// Returned by a member that left or lost the partition; delivered first.
    redeliver: BTreeSet<u64>,
    /// The former owner whose revoked attempts are being stopped: nobody
    /// takes the partition until they did.
    stopping: Option<u64>,
    /// Taken and not yet settled (count): bounded by
    /// `memory.max_in_flight_per_partition`.
    in_flight: usize,
}

/// A partition taken from `from`, whose attempts under `ownership` must
/// stop before anyone else gets it.
type Revoked = (u32, u64, Ownership);

impl Group {
    fn new(next: u64, partitions: u32) -> Self {
        Self {
            next,
            partitions: (0..partitions).map(|_| PartitionState::default()).collect(),
            pending: BTreeMap::new(),
            counts: HashMap::default(),
            members: BTreeMap::new(),
        }
    }

    fn floor(&self) -> u64 {
        let mut floor = self.next;
        if let Some(seq) = self.pending.keys().next() {
            floor = floor.min(*seq);
        }
        for p in &self.partitions {
            if let Some(seq) = p.redeliver.first() {
                floor = floor.min(*seq);
            }
            if let Some(seq) = p.ready.front() {
                floor = floor.min(*seq);
            }
        }
        floor
    }

    /// Moves `member`'s unsettled messages of `partition` (all partitions
    /// when `None`) back to be delivered again, ahead of newer ones.
    fn give_back(&mut self, member: u64, partition: Option<u32>) {
        let mine: Vec<(u64, u32)> = self
            .pending
            .iter()
            .filter(|(_, (m, p))| *m == member && partition.is_none_or(|want| want == *p))
            .map(|(seq, (_, p))| (*seq, *p))
            .collect();
        for (seq, p) in mine {
            self.pending.remove(&seq);
            let part = &mut self.partitions[p as usize];
            part.redeliver.insert(seq);
            part.in_flight = part.in_flight.saturating_sub(1);
            *self.counts.entry(seq).or_insert(1) += 1;
        }
    }

    /// Takes partition `p` from its owner: no attempt starts under its
    /// ownership any more; nobody gets it until those running stopped.
    fn revoke(&mut self, p: u32) -> Option<Revoked> {
        let state = &mut self.partitions[p as usize];
        let from = state.owner.take()?;
        state.stopping = Some(from);
        state.ownership.revoke();
        Some((p, from, state.ownership.clone()))
    }

    /// Recomputes who owns what after a join, a leave or a finished stop.
    /// Partitions of members that left, and those above a member's fair
    /// share (its highest), are revoked; free partitions go to members
    /// below their share. Returns the revocations to complete.
    fn rebalance(&mut self) -> Vec<Revoked> {
        let members: Vec<u64> = self.members.keys().copied().collect();
        let count = self.partitions.len() as u32;
        let target = |m: u64| {
            members
                .iter()
                .position(|x| *x == m)
                .map_or(0, |i| fair_share(count, members.len(), i) as usize)
        };
        let mut revoked = Vec::new();
        for p in 0..count {
            if self.partitions[p as usize]
                .owner
                .is_some_and(|o| !self.members.contains_key(&o))
            {
                revoked.extend(self.revoke(p));
            }
        }
        let owned_by = |parts: &[PartitionState], m: u64| -> Vec<u32> {
            (0..parts.len() as u32)
                .filter(|i| parts[*i as usize].owner == Some(m))
                .collect()
        };
        for &m in &members {
            let mine = owned_by(&self.partitions, m);
            let extra = mine.len().saturating_sub(target(m));
            for &p in mine.iter().rev().take(extra) {
                revoked.extend(self.revoke(p));
            }
        }
        let mut free: VecDeque<u32> = (0..count)
            .filter(|i| {
                let p = &self.partitions[*i as usize];
                p.owner.is_none() && p.stopping.is_none()
            })
            .collect();
        for &m in &members {
            let need = target(m).saturating_sub(owned_by(&self.partitions, m).len());
            for _ in 0..need {
                let Some(p) = free.pop_front() else { break };
                let state = &mut self.partitions[p as usize];
                state.owner = Some(m);
                state.ownership = Ownership::new();
            }
        }
        revoked
    }

    /// Publishes each member's share to its health view.
    fn show(&self) {
        let members = self.members.len();
        for (&m, view) in &self.members {
            let owned: Vec<u32> = (0..self.partitions.len() as u32)
                .filter(|p| self.partitions[*p as usize].owner == Some(m))
                .collect();
            let mut v = view.lock().unwrap();
            if v.owned != owned {
                v.rebalances += 1;
                metrics::counter!("eventbus_rebalances_total", "backend" => "memory").increment(1);
                v.owned = owned;
            }
            v.members = members;
            v.partition_count = self.partitions.len() as u32;
        }
    }
}

/// A stored message as a consumer receives it: as from a broker, without
/// its dedup id, which told the broker how to store it and is not part of
/// what it delivers (NATS and Kafka deliver none either).
fn received(stored: &Message) -> Message {
    Message {
        topic: stored.topic.clone(),
        key: stored.key.clone(),
        headers: stored.headers.clone(),
        payload: stored.payload.clone(),
        dedup_id: None,
    }
}

impl TopicState {
    /// Drops the prefix every group has settled; true when anything was dropped.
    fn trim(&mut self) -> bool {
        let Some(floor) = self.groups.values().map(Group::floor).min() else {
            return false;
        };
        let before = self.base;
        while self.base < floor && !self.log.is_empty() {
            self.log.pop_front();
            self.base += 1;
        }
        self.base != before
    }
}

/// A consumer watching a topic's `changed` ([`Topic::watch`]).
struct Watching(Arc<Topic>);

impl Drop for Watching {
    fn drop(&mut self) {
        self.0.watching.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Topic {
    fn notify(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// [`notify`](Topic::notify) after a publish, skipped when no consumer
    /// watches. Called after the message is in the log and the state lock
    /// released: a consumer registers as watching before it locks the
    /// state to look, so either it sees the message or this sees it.
    fn notify_published(&self) {
        if self.watching.load(Ordering::SeqCst) > 0 {
            self.notify();
        }
    }

    /// Registers a consumer as watching `changed` until the guard drops.
    fn watch(self: &Arc<Self>) -> Watching {
        self.watching.fetch_add(1, Ordering::SeqCst);
        Watching(self.clone())
    }

    fn notify_space(&self) {
        if self.space.receiver_count() > 0 {
            self.space.send_modify(|v| *v = v.wrapping_add(1));
        }
    }

    /// Runs a rebalance of `group` and completes each revocation it makes
    /// on a thread of its own (it waits on a condition variable, and must
    /// run even while a runtime shuts down): wait for the former owner's
    /// attempts (cancelled after 30 s), give its unsettled messages back
    /// ahead of newer ones, free the partition and rebalance again.
    fn rebalance(self: &Arc<Self>, group: &str) {
        let revoked = {
            let mut state = self.state.lock().unwrap();
            let Some(g) = state.groups.get_mut(group) else {
                return;
            };
            let revoked = g.rebalance();
            g.show();
            revoked
        };
        for (partition, from, ownership) in revoked {
            let topic = self.clone();
            let group = group.to_owned();
            let idle = ownership.running_attempts() == 0;
            let finish = move || {
                ownership.stop_running(std::time::Instant::now() + REVOKE_GRACE, Duration::from_secs(1));
                {
                    let mut state = topic.state.lock().unwrap();
                    if let Some(g) = state.groups.get_mut(&group) {
                        g.give_back(from, Some(partition));
                        g.partitions[partition as usize].stopping = None;
                    }
                }
                topic.rebalance(&group);
            };
            if idle {
                finish();
            } else {
                std::thread::spawn(finish);
            }
        }
        self.notify();
    }
}

/// Messages a subscription takes from the log per lock.
const TAKE_BATCH: usize = 64;

impl Default for MemoryBackend {
    fn default() -> Self {
        Self::new(MemoryConfig::default())
    }
}

impl MemoryBackend {
    /// A backend with no topics yet.
    pub fn new(config: MemoryConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                topics: Mutex::new(HashMap::new()),
                next_member: AtomicU64::new(0),
            }),
            closed: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Another client of this in-process broker: it sees the same topics
    /// and groups, and its [`close`](Backend::close) closes only itself.
    pub fn connect(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            closed: Arc::new(AtomicBool::new(false)),
        }
    }

    fn topic(&self, name: &str) -> Arc<Topic> {
        let mut topics = self.inner.topics.lock().unwrap();
        // Looked up by `&str` first: the name is copied only for a new topic.
        if let Some(topic) = topics.get(name) {
            return topic.clone();
        }
        topics
            .entry(name.to_owned())
            .or_insert_with(|| {
                Arc::new(Topic {
                    partitions: self.inner.config.partitions.max(1),
                    per_partition: self.inner.config.max_in_flight_per_partition.max(1),
                    state: Mutex::new(TopicState {
                        base: 1,
                        log: VecDeque::new(),
                        groups: HashMap::new(),
                    }),
                    changed: watch::Sender::new(0),
                    watching: AtomicUsize::new(0),
                    space: watch::Sender::new(0),
                })
            })
            .clone()
    }

    /// Messages retained in `topic` (published and not yet acked by every group).
    pub fn retained(&self, topic: &str) -> usize {
        self.topic(topic).state.lock().unwrap().log.len()
    }

    fn ensure_open(&self) -> Result<()> {
        match self.closed.load(Ordering::Acquire) {
            true => Err(Error::closed("memory backend")),
            false => Ok(()),
        }
    }
}

#[async_trait]
impl Backend for MemoryBackend {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn publish(&self, message: Message) -> Result<AckFuture> {
        self.ensure_open()?;
        let size = message.payload.len()
            + message.key.as_ref().map_or(0, |k| k.len())
            + message
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>();
        if size > self.inner.config.max_message_bytes {
            return Err(crate::ValidationError::new(
                "payload",
                format!(
                    "a message of {size} bytes is above memory.max_message_bytes ({})",
                    self.inner.config.max_message_bytes
                ),
            )
            .into());
        }
        let topic = self.topic(&message.topic);
        let partition = partition_for(message.key.as_deref().unwrap_or_default(), topic.partitions);
        let mut changed: Option<watch::Receiver<u64>> = None;
        let mut message = Some(message);
        loop {
            {
                let mut state = topic.state.lock().unwrap();
                if state.log.len() < self.inner.config.max_messages_per_topic {
                    let seq = state.base + state.log.len() as u64;
                    state
                        .log
                        .push_back((message.take().expect("pushed once"), partition));
                    drop(state);
                    topic.notify_published();
                    let ack = Ack {
                        position: Some(Position::Sequence(seq)),
                        duplicate: false,
                    };
                    return Ok(futures::future::ready(Ok(ack)).boxed());
                }
            }
            // Full: wait for a trim (or close), as a broker's full buffer would.
            match changed.as_mut() {
                None => changed = Some(topic.space.subscribe()),
                Some(rx) => {
                    let _ = rx.changed().await;
                    self.ensure_open()?;
                }
            }
        }
    }

    async fn subscribe(&self, spec: &SubscribeSpec) -> Result<Box<dyn BackendSubscription>> {
        self.ensure_open()?;
        let topic = self.topic(&spec.topic);
        let member = self.inner.next_member.fetch_add(1, Ordering::Relaxed);
        let view = Arc::new(Mutex::new(GroupAssignment::default()));
        {
            let mut state = topic.state.lock().unwrap();
            let base = state.base;
            let partitions = topic.partitions;
            let group = state
                .groups
                .entry(spec.group.clone())
                .or_insert_with(|| Group::new(base, partitions));
            group.members.insert(member, view.clone());
        }
        topic.rebalance(&spec.group);
        let per_partition = topic.per_partition;
        Ok(Box::new(MemorySubscription {
            buffer: VecDeque::new(),
            changed: topic.changed.subscribe(),
            topic,
            group: spec.group.as_str().into(),
            member,
            view,
            next_partition: 0,
            per_partition,
            left: false,
            backend: self.clone(),
        }))
    }

    /// Reads what the topic's log retains (a message leaves the log once
    /// every group acked it; a topic without groups, such as a dead-letter
    /// topic, keeps all), then follows it; ends when the backend closes.
    async fn browse(&self, topic: &str) -> Result<BoxStream<'static, Result<BrowsedMessage>>> {
        self.ensure_open()?;
        let topic = self.topic(topic);
        let changed = topic.changed.subscribe();
        let start = (self.clone(), topic, changed, 1u64);
        Ok(
            futures::stream::unfold(start, |(backend, topic, mut changed, next)| async move {
                loop {
                    let _watching = topic.watch();
                    changed.borrow_and_update();
                    if backend.ensure_open().is_err() {
                        return None;
                    }
                    let found = {
                        let state = topic.state.lock().unwrap();
                        let seq = next.max(state.base);
                        state
                            .log
                            .get((seq - state.base) as usize)
                            .map(|(m, _)| (seq, received(m)))
                    };
                    if let Some((seq, message)) = found {
                        let item = BrowsedMessage {
                            message,
                            position: Position::Sequence(seq),
                        };
                        return Some((Ok(item), (backend, topic, changed, seq + 1)));
                    }
                    if changed.changed().await.is_err() {
                        return None;
                    }
                }
            })
            .boxed(),
        )
    }

    /// Per partition: queued, returned, taken and unsettled, and not yet
    /// routed messages of the group; a group that never subscribed has
    /// everything retained pending.
    async fn group_lag(&self, topic: &str, group: &str) -> Result<Vec<crate::PartitionLag>> {
        self.ensure_open()?;
        let topic = self.topic(topic);
        let state = topic.state.lock().unwrap();
        let mut out: Vec<crate::PartitionLag> = (0..topic.partitions)
            .map(|p| crate::PartitionLag {
                partition: Some(p),
                consumer: group.to_owned(),
                pending: 0,
                oldest_unsettled_at: None,
            })
            .collect();
        let (next, floor) = match state.groups.get(group) {
            Some(g) => {
                for (p, part) in g.partitions.iter().enumerate() {
                    out[p].pending += (part.ready.len() + part.redeliver.len() + part.in_flight) as u64;
                }
                (g.next, g.floor())
            }
            None => (state.base, state.base),
        };
        for (i, (message, p)) in state.log.iter().enumerate() {
            let seq = state.base + i as u64;
            let lag = &mut out[*p as usize];
            if seq >= next {
                lag.pending += 1;
            }
            if seq >= floor && lag.oldest_unsettled_at.is_none() && lag.pending > 0 {
                lag.oldest_unsettled_at = message
                    .headers
                    .get(crate::headers::TIMESTAMP)
                    .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                    .map(|t| t.with_timezone(&chrono::Utc));
            }
        }
        Ok(out)
    }

    fn connection_state(&self) -> ConnectionState {
        match self.closed.load(Ordering::Acquire) {
            true => ConnectionState::Closed,
            false => ConnectionState::Connected,
        }
    }

    async fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        for topic in self.inner.topics.lock().unwrap().values() {
            topic.notify();
            topic.space.send_modify(|v| *v = v.wrapping_add(1));
        }
        Ok(())
    }
}

struct MemorySubscription {
    /// Taken from the log (pending for this member), not yet handed out.
    buffer: VecDeque<Delivery>,
    topic: Arc<Topic>,
    group: Arc<str>,
    member: u64,
    view: Arc<Mutex<GroupAssignment>>,
    /// Where the next batch starts among the partitions (round robin).
    next_partition: usize,
    /// `memory.max_in_flight_per_partition`.
    per_partition: usize,
    left: bool,
    changed: watch::Receiver<u64>,
    backend: MemoryBackend,
}

impl MemorySubscription {
    /// Routes newly published messages to their partitions' queues, then
    /// moves up to [`TAKE_BATCH`] deliverable messages of this member's
    /// partitions into `self.buffer` under one lock; they are pending for
    /// this member from now on.
    fn take_batch(&mut self) {
        let mut state = self.topic.state.lock().unwrap();
        let state = &mut *state;
        let (base, end) = (state.base, state.base + state.log.len() as u64);
        let Some(group) = state.groups.get_mut(&*self.group) else {
            return;
        };
        while group.next < end {
            let partition = state.log[(group.next - base) as usize].1;
            group.partitions[partition as usize].ready.push_back(group.next);
            group.next += 1;
        }
        let count = group.partitions.len();
        let mut taken = Vec::new();
        for i in 0..count {
            let p = (self.next_partition + i) % count;
            let part = &mut group.partitions[p];
            if part.owner != Some(self.member) {
                continue;
            }
            while taken.len() < TAKE_BATCH && part.in_flight < self.per_partition {
                let Some(seq) = part.redeliver.pop_first().or_else(|| part.ready.pop_front()) else {
                    break;
                };
                part.in_flight += 1;
                taken.push((seq, p as u32, part.ownership.clone()));
            }
            if taken.len() == TAKE_BATCH {
                self.next_partition = p + 1;
                break;
            }
        }
        for (seq, partition, ownership) in taken {
            group.pending.insert(seq, (self.member, partition));
            let delivery_count = group.counts.get(&seq).map_or(1, |c| c + 1);
            let message = received(&state.log[(seq - base) as usize].0);
            self.buffer.push_back(Delivery {
                message,
                position: Some(Position::Sequence(seq)),
                delivery_count,
                acker: Box::new(MemoryAcker {
                    topic: self.topic.clone(),
                    group: self.group.clone(),
                    seq,
                    partition,
                }),
                ownership: Some(ownership),
            });
        }
    }

    /// Leaves the group: unsettled messages go back to it, partitions to
    /// the remaining members.
    fn leave(&mut self) {
        if std::mem::replace(&mut self.left, true) {
            return;
        }
        // Buffered deliveries are pending for this member: returned below with the rest.
        self.buffer.clear();
        {
            let mut state = self.topic.state.lock().unwrap();
            if let Some(group) = state.groups.get_mut(&*self.group) {
                group.give_back(self.member, None);
                group.members.remove(&self.member);
            }
        }
        self.topic.rebalance(&self.group);
    }
}

impl Drop for MemorySubscription {
    /// A member dropped without `close` (its process "crashed") leaves too.
    fn drop(&mut self) {
        self.leave();
    }
}

#[async_trait]
impl BackendSubscription for MemorySubscription {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        if let Some(delivery) = self.try_next() {
            return Some(delivery);
        }
        loop {
            // Watching and seen before looking, so a change after the look
            // wakes the wait.
            let _watching = self.topic.watch();
            self.changed.borrow_and_update();
            self.backend.ensure_open().ok()?;
            if let Some(delivery) = self.try_next() {
                return Some(delivery);
            }
            if self.changed.changed().await.is_err() {
                return None;
            }
        }
    }

    fn try_next(&mut self) -> Option<Result<Delivery>> {
        // As `next`: nothing more once the backend is closed.
        self.backend.ensure_open().ok()?;
        if self.buffer.is_empty() {
            self.take_batch();
        }
        self.buffer.pop_front().map(Ok)
    }

    async fn close(mut self: Box<Self>) -> Result<()> {
        self.leave();
        Ok(())
    }

    fn assignment(&self) -> Option<Arc<Mutex<GroupAssignment>>> {
        Some(self.view.clone())
    }

    fn lag_probe(&self) -> Option<crate::LagProbe> {
        let (topic, group, member) = (self.topic.clone(), self.group.clone(), self.member);
        Some(Arc::new(move || topic.lag(&group, member)))
    }
}

impl Topic {
    /// Messages of `member`'s partitions its group has not settled: queued,
    /// returned for redelivery, taken and unsettled, and published but not
    /// yet routed (count). `None` once the group is gone.
    fn lag(&self, group: &str, member: u64) -> Option<u64> {
        let state = self.state.lock().unwrap();
        let g = state.groups.get(group)?;
        let owned = |p: u32| g.partitions[p as usize].owner == Some(member);
        let queued: usize = g
            .partitions
            .iter()
            .filter(|part| part.owner == Some(member))
            .map(|part| part.ready.len() + part.redeliver.len() + part.in_flight)
            .sum();
        let skip = g.next.saturating_sub(state.base) as usize;
        let unrouted = state.log.iter().skip(skip).filter(|(_, p)| owned(*p)).count();
        Some((queued + unrouted) as u64)
    }
}

struct MemoryAcker {
    topic: Arc<Topic>,
    group: Arc<str>,
    seq: u64,
    partition: u32,
}

#[async_trait]
impl Acker for MemoryAcker {
    async fn ack(&self) -> Result<()> {
        self.settle()
    }

    fn ack_now(&self) -> Option<Result<()>> {
        Some(self.settle())
    }
}

impl MemoryAcker {
    /// Settles the message for its group (nothing to wait for in process).
    fn settle(&self) -> Result<()> {
        let mut unblocked = false;
        let mut state = self.topic.state.lock().unwrap();
        if let Some(group) = state.groups.get_mut(&*self.group) {
            let part = self.partition as usize;
            if group.pending.remove(&self.seq).is_some() {
                let p = &mut group.partitions[part];
                // A partition at its bound may take again: wake its member.
                unblocked = p.in_flight == self.topic.per_partition;
                p.in_flight = p.in_flight.saturating_sub(1);
            } else {
                // Handed back by a revoke after it was handled: settled all the same.
                group.partitions[part].redeliver.remove(&self.seq);
            }
            group.counts.remove(&self.seq);
        }
        // The log's first message is unsettled by some group (each ack of it
        // trims), so only an ack of that very message can free a prefix.
        let trimmed = self.seq == state.base && state.trim();
        drop(state);
        if trimmed {
            self.topic.notify_space();
        }
        if unblocked {
            self.topic.notify();
        }
        Ok(())
    }
}
