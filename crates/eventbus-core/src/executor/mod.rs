//! The ordered executor: one per bus, shared by all its subscriptions.
//!
//! - **Order.** Each key (subscription, aggregate id) has its own FIFO queue
//!   and at most one task draining it, so one aggregate's events run one at a
//!   time in fetch order. Keys are per subscription, so one topic's events
//!   never wait behind another topic's (the original's Bug 1 mixed topics in
//!   one shared queue).
//! - **No head-of-line blocking.** Queues are per key, not per hash lane: a
//!   slow or parked aggregate delays only its own later events.
//! - **Parallelism.** Handlers of different keys run at once, up to
//!   `consumer.concurrency` (a semaphore taken around each handler attempt,
//!   released while a retry waits).
//! - **Bounded memory.** Every queued or running message holds one of
//!   `consumer.max_in_flight` slots; fetch loops take a slot *before* fetching,
//!   so at the limit they wait and nothing is dropped or refused.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::subscription::{SubscriptionShared, Work};

/// What must run in order: one aggregate of one subscription, or (unordered
/// subscriptions) one message alone.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Key {
    Aggregate { subscription: u64, aggregate: Arc<str> },
    Unordered(u64),
}

/// A fetched message waiting for, or in, its handler.
pub(crate) struct Job {
    pub(crate) work: Work,
    pub(crate) subscription: Arc<SubscriptionShared>,
    pub(crate) slot: OwnedSemaphorePermit,
}

pub(crate) struct OrderedExecutor {
    slots: Arc<Semaphore>,
    concurrency: Arc<Semaphore>,
    queues: Mutex<HashMap<Key, VecDeque<Job>>>,
}

impl OrderedExecutor {
    pub(crate) fn new(max_in_flight: usize, concurrency: usize) -> Arc<Self> {
        Arc::new(Self {
            slots: Arc::new(Semaphore::new(max_in_flight)),
            concurrency: Arc::new(Semaphore::new(concurrency)),
            queues: Mutex::new(HashMap::new()),
        })
    }

    /// Waits for room for one more message (backpressure for fetch loops).
    pub(crate) async fn reserve(&self) -> OwnedSemaphorePermit {
        self.slots
            .clone()
            .acquire_owned()
            .await
            .expect("the executor never closes its slot semaphore")
    }

    /// Queues `job` behind earlier jobs of `key`, starting a drain task when
    /// the key was idle. Never waits: the slot was reserved beforehand.
    pub(crate) fn submit(self: &Arc<Self>, key: Key, job: Job) {
        let mut queues = self.queues.lock().unwrap();
        match queues.entry(key) {
            Entry::Occupied(mut queue) => queue.get_mut().push_back(job),
            Entry::Vacant(idle) => {
                let key = idle.key().clone();
                idle.insert(VecDeque::new());
                drop(queues);
                tokio::spawn(self.clone().drain(key, job));
            }
        }
    }

    async fn drain(self: Arc<Self>, key: Key, first: Job) {
        let mut job = first;
        loop {
            let Job {
                work,
                subscription,
                slot,
            } = job;
            subscription.process(work, &self.concurrency).await;
            drop(slot);
            let mut queues = self.queues.lock().unwrap();
            match queues.get_mut(&key).and_then(VecDeque::pop_front) {
                Some(next) => job = next,
                None => {
                    queues.remove(&key);
                    return;
                }
            }
        }
    }
}
