//! The ordered executor: one per bus, shared by all its subscriptions.
//!
//! - **Order.** Each key (subscription, aggregate id) has its own FIFO queue,
//!   drained by at most one worker at a time, so one aggregate's events run
//!   one at a time in fetch order. Keys are per subscription, so one topic's
//!   events never wait behind another topic's (the original's Bug 1 mixed
//!   topics in one shared queue).
//! - **No head-of-line blocking.** Queues are per key, not per hash lane. A
//!   message whose first attempt fails leaves the worker pool: its key moves
//!   to a task of its own for the retries (backoff, dead letter, parking),
//!   so a failing aggregate delays only itself.
//! - **Parallelism.** Up to `consumer.concurrency` pooled workers, started on
//!   demand and kept; a semaphore of the same size caps handlers running at
//!   once, retrying ones included.
//! - **Bounded memory.** Every queued or running message holds one of
//!   `consumer.max_in_flight` slots; fetch loops take a slot *before* fetching,
//!   so at the limit they wait and nothing is dropped or refused.
//! - **No allocation per message** for the executor itself: pooled workers
//!   run the first attempt inline (a task per message cost a ~3 KB future).

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::subscription::{Outcome, SubscriptionShared, Work};

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
    concurrency: Semaphore,
    max_workers: usize,
    /// Active keys and their queued jobs; a key is present while a worker or
    /// a retry task owns it, or while it waits in `ready`.
    queues: Mutex<HashMap<Key, VecDeque<Job>>>,
    ready: Mutex<VecDeque<Key>>,
    /// One permit per key in `ready`; closed on shutdown to stop the workers.
    ready_count: Semaphore,
    workers: AtomicUsize,
    idle_workers: AtomicUsize,
}

impl OrderedExecutor {
    pub(crate) fn new(max_in_flight: usize, concurrency: usize) -> Arc<Self> {
        Arc::new(Self {
            slots: Arc::new(Semaphore::new(max_in_flight)),
            concurrency: Semaphore::new(concurrency),
            max_workers: concurrency,
            queues: Mutex::new(HashMap::new()),
            ready: Mutex::new(VecDeque::new()),
            ready_count: Semaphore::new(0),
            workers: AtomicUsize::new(0),
            idle_workers: AtomicUsize::new(0),
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

    /// Queues `job` behind earlier jobs of `key`, or makes the idle key ready
    /// for a worker. Never waits: the slot was reserved beforehand.
    pub(crate) fn submit(self: &Arc<Self>, key: Key, job: Job) {
        let mut queues = self.queues.lock().unwrap();
        match queues.entry(key) {
            Entry::Occupied(mut queue) => queue.get_mut().push_back(job),
            Entry::Vacant(idle) => {
                let key = idle.key().clone();
                idle.insert(VecDeque::from([job]));
                drop(queues);
                self.make_ready(key);
            }
        }
    }

    /// Hands an owned key with queued jobs to the workers.
    fn make_ready(self: &Arc<Self>, key: Key) {
        self.ready.lock().unwrap().push_back(key);
        self.ready_count.add_permits(1);
        self.ensure_worker();
    }

    /// Starts a worker when none is idle and the pool is not full.
    fn ensure_worker(self: &Arc<Self>) {
        if self.idle_workers.load(Ordering::Acquire) > 0 {
            return;
        }
        let started = self
            .workers
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_workers).then_some(n + 1)
            });
        if started.is_ok() {
            tokio::spawn(self.clone().worker());
        }
    }

    async fn worker(self: Arc<Self>) {
        loop {
            self.idle_workers.fetch_add(1, Ordering::AcqRel);
            let permit = self.ready_count.acquire().await;
            self.idle_workers.fetch_sub(1, Ordering::AcqRel);
            let Ok(permit) = permit else { return };
            permit.forget();
            let key = self
                .ready
                .lock()
                .unwrap()
                .pop_front()
                .expect("one ready key per permit");
            self.drain(key).await;
        }
    }

    /// Runs the jobs of `key` in order until its queue is empty, or hands the
    /// key to a retry task when a first attempt fails.
    async fn drain(self: &Arc<Self>, key: Key) {
        loop {
            let Some(Job {
                work,
                subscription,
                slot,
            }) = self.next_job(&key)
            else {
                return;
            };
            match subscription.process(work, &self.concurrency).await {
                Outcome::Done => drop(slot),
                Outcome::Retry(work, error) => {
                    let job = Job {
                        work: *work,
                        subscription,
                        slot,
                    };
                    tokio::spawn(self.clone().retry(key, job, error));
                    return;
                }
            }
        }
    }

    /// The retry path of one message; then the key goes back to the workers.
    async fn retry(self: Arc<Self>, key: Key, job: Job, error: String) {
        let Job {
            work,
            subscription,
            slot,
        } = job;
        subscription
            .process_retrying(work, error, &self.concurrency)
            .await;
        drop(slot);
        let more = {
            let mut queues = self.queues.lock().unwrap();
            let more = queues.get(&key).is_some_and(|q| !q.is_empty());
            if !more {
                queues.remove(&key);
            }
            more
        };
        if more {
            self.make_ready(key);
        }
    }

    /// The next job of `key`; removes the key when its queue is empty.
    fn next_job(&self, key: &Key) -> Option<Job> {
        let mut queues = self.queues.lock().unwrap();
        let job = queues.get_mut(key).and_then(VecDeque::pop_front);
        if job.is_none() {
            queues.remove(key);
        }
        job
    }

    /// Stops the pooled workers (they hold the executor alive otherwise).
    pub(crate) fn shutdown(&self) {
        self.ready_count.close();
    }
}
