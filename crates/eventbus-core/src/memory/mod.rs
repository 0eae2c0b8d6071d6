//! [`MemoryBackend`]: an in-process broker with the semantics of a persistent one.
//!
//! Each topic is a log of messages numbered from 1. Each consumer group has
//! a cursor, so every group gets every message; the members of one group
//! share the group's cursor. A message stays in the log until every group
//! has acknowledged it; a message delivered to a member that leaves without
//! settling it goes back to its group and is delivered again before newer
//! ones. A topic holds at most `memory.max_messages_per_topic` messages:
//! publishers then wait (and time out through the bus) instead of the log
//! growing without bound.
//!
//! Order: one member sees a topic's messages in publish order (redeliveries
//! first). With several members in one group, each aggregate's order is kept
//! only within a member: use one member per group when order matters, as
//! with a single-partition topic.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures::FutureExt;
use tokio::sync::watch;

use crate::backend::{AckFuture, Backend, BackendSubscription, SubscribeSpec};
use crate::config::MemoryConfig;
use crate::error::{Error, Result};
use crate::health::ConnectionState;
use crate::message::{Ack, Acker, Delivery, Message, Position};

/// The in-process backend. Cheap to clone; clones share the topics, so two
/// buses over clones of one backend talk to each other.
#[derive(Clone, Debug)]
pub struct MemoryBackend {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: MemoryConfig,
    topics: Mutex<HashMap<String, Arc<Topic>>>,
    closed: AtomicBool,
    next_member: AtomicU64,
}

#[derive(Debug)]
struct Topic {
    state: Mutex<TopicState>,
    /// Bumped for consumers: new message, redelivery, close.
    changed: watch::Sender<u64>,
    /// Bumped for publishers waiting on a full log: trim, close.
    space: watch::Sender<u64>,
}

#[derive(Debug)]
struct TopicState {
    /// Sequence number of `log[0]`.
    base: u64,
    log: VecDeque<Message>,
    groups: HashMap<String, Group>,
}

#[derive(Debug)]
struct Group {
    /// Next sequence never delivered to this group.
    next: u64,
    /// Delivered and unsettled: sequence to member.
    pending: BTreeMap<u64, u64>,
    /// Returned by leaving members, delivered again first.
    redeliver: BTreeSet<u64>,
    /// Deliveries so far of messages delivered more than once.
    counts: HashMap<u64, u64>,
}

impl Group {
    fn floor(&self) -> u64 {
        let pending = self.pending.keys().next().copied().unwrap_or(u64::MAX);
        let redeliver = self.redeliver.first().copied().unwrap_or(u64::MAX);
        self.next.min(pending).min(redeliver)
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

impl Topic {
    fn notify(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn notify_space(&self) {
        if self.space.receiver_count() > 0 {
            self.space.send_modify(|v| *v = v.wrapping_add(1));
        }
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
                closed: AtomicBool::new(false),
                next_member: AtomicU64::new(0),
            }),
        }
    }

    fn topic(&self, name: &str) -> Arc<Topic> {
        let mut topics = self.inner.topics.lock().unwrap();
        topics
            .entry(name.to_owned())
            .or_insert_with(|| {
                Arc::new(Topic {
                    state: Mutex::new(TopicState {
                        base: 1,
                        log: VecDeque::new(),
                        groups: HashMap::new(),
                    }),
                    changed: watch::Sender::new(0),
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
        match self.inner.closed.load(Ordering::Acquire) {
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
        let topic = self.topic(&message.topic);
        let mut changed: Option<watch::Receiver<u64>> = None;
        let mut message = Some(message);
        loop {
            {
                let mut state = topic.state.lock().unwrap();
                if state.log.len() < self.inner.config.max_messages_per_topic {
                    let seq = state.base + state.log.len() as u64;
                    state.log.push_back(message.take().expect("pushed once"));
                    drop(state);
                    topic.notify();
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
        {
            let mut state = topic.state.lock().unwrap();
            let base = state.base;
            state.groups.entry(spec.group.clone()).or_insert_with(|| Group {
                next: base,
                pending: BTreeMap::new(),
                redeliver: BTreeSet::new(),
                counts: HashMap::new(),
            });
        }
        Ok(Box::new(MemorySubscription {
            buffer: VecDeque::new(),
            changed: topic.changed.subscribe(),
            topic,
            group: spec.group.as_str().into(),
            member: self.inner.next_member.fetch_add(1, Ordering::Relaxed),
            backend: self.clone(),
        }))
    }

    fn connection_state(&self) -> ConnectionState {
        match self.inner.closed.load(Ordering::Acquire) {
            true => ConnectionState::Closed,
            false => ConnectionState::Connected,
        }
    }

    async fn close(&self) -> Result<()> {
        self.inner.closed.store(true, Ordering::Release);
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
    changed: watch::Receiver<u64>,
    backend: MemoryBackend,
}

impl MemorySubscription {
    /// Moves up to [`TAKE_BATCH`] deliverable messages into `self.buffer`
    /// under one lock; they are pending for this member from now on.
    fn take_batch(&mut self) {
        let mut state = self.topic.state.lock().unwrap();
        let (base, len) = (state.base, state.log.len() as u64);
        let Some(group) = state.groups.get_mut(&*self.group) else {
            return;
        };
        let mut taken = Vec::new();
        while taken.len() < TAKE_BATCH {
            let seq = match group.redeliver.pop_first() {
                Some(seq) => seq,
                None if group.next < base + len => {
                    group.next += 1;
                    group.next - 1
                }
                None => break,
            };
            group.pending.insert(seq, self.member);
            taken.push((seq, group.counts.get(&seq).map_or(1, |c| c + 1)));
        }
        for (seq, delivery_count) in taken {
            let message = state.log[(seq - base) as usize].clone();
            self.buffer.push_back(Delivery {
                message,
                position: Some(Position::Sequence(seq)),
                delivery_count,
                acker: Box::new(MemoryAcker {
                    topic: self.topic.clone(),
                    group: self.group.clone(),
                    seq,
                }),
                ownership: None,
            });
        }
    }
}

#[async_trait]
impl BackendSubscription for MemorySubscription {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        loop {
            self.changed.borrow_and_update();
            if self.backend.ensure_open().is_err() {
                return None;
            }
            if self.buffer.is_empty() {
                self.take_batch();
            }
            if let Some(delivery) = self.buffer.pop_front() {
                return Some(Ok(delivery));
            }
            if self.changed.changed().await.is_err() {
                return None;
            }
        }
    }

    async fn close(mut self: Box<Self>) -> Result<()> {
        // Buffered deliveries are pending for this member: returned below with the rest.
        self.buffer.clear();
        let mut state = self.topic.state.lock().unwrap();
        if let Some(group) = state.groups.get_mut(&*self.group) {
            let mine: Vec<u64> = group
                .pending
                .iter()
                .filter(|(_, member)| **member == self.member)
                .map(|(seq, _)| *seq)
                .collect();
            for seq in mine {
                group.pending.remove(&seq);
                group.redeliver.insert(seq);
                *group.counts.entry(seq).or_insert(1) += 1;
            }
        }
        drop(state);
        self.topic.notify();
        Ok(())
    }
}

struct MemoryAcker {
    topic: Arc<Topic>,
    group: Arc<str>,
    seq: u64,
}

#[async_trait]
impl Acker for MemoryAcker {
    async fn ack(&self) -> Result<()> {
        let mut state = self.topic.state.lock().unwrap();
        if let Some(group) = state.groups.get_mut(&*self.group) {
            group.pending.remove(&self.seq);
            group.counts.remove(&self.seq);
        }
        let trimmed = state.trim();
        drop(state);
        if trimmed {
            self.topic.notify_space();
        }
        Ok(())
    }
}
