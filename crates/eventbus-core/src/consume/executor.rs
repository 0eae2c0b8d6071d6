//! The ordered executor: one per bus, shared by all its subscriptions.
//! Generic over the [`Task`] it runs, which the consume code implements:
//! this file imports nothing from it.
//!
//! - **Order.** Each key (subscription, aggregate id: see [`Key`]) has its
//!   own FIFO queue, drained by at most one worker at a time, so one
//!   aggregate's events run one at a time in fetch order. Keys are per
//!   subscription, so one topic's events never wait behind another topic's
//!   (the original's Bug 1 mixed topics in one shared queue).
//! - **No head-of-line blocking.** Queues are per key, not per hash lane
//!   shared by many aggregates (a 64-bit key hash is one queue per
//!   aggregate in practice). A message whose first attempt fails leaves the
//!   worker pool: its key moves to a task of its own for the retries
//!   (backoff, dead letter, parking), so a failing aggregate delays only
//!   itself.
//! - **Parallelism.** Up to `consumer.concurrency` pooled workers, started on
//!   demand and kept; a semaphore of the same size caps handlers running at
//!   once, retrying ones included.
//! - **Bounded memory** is the tasks' business: each carries the in-flight
//!   slot of its subscription (see `consume::subscription`).
//! - **No task per message**: pooled workers run the first attempt inline
//!   (a task per message cost a ~3 KB future). A worker's state is copied
//!   per message, so keep a [`Task`] small (the consume code queues its
//!   jobs boxed) and its `first` future too.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

/// What must run in order: one aggregate of one subscription, or (unordered
/// subscriptions) one message alone.
///
/// An aggregate is keyed by a 64-bit hash of its id under a random seed
/// ([`Key::aggregate`]): no copy of the id per message, and a key is
/// hashed and compared as two integers. Two ids of one subscription with
/// the same hash (about 1 in 2^64 per pair for a good hash; foldhash's
/// fast variant proves no bound) share one queue: both stay in order, but
/// each then waits for the other, retries, dead-letter publishes and
/// parking included.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Key {
    Aggregate { subscription: u64, aggregate: u64 },
    Unordered { subscription: u64, seq: u64 },
}

impl Key {
    /// The key of aggregate `id` in `subscription`, hashed with `seed`
    /// (the same seed for every message of the subscription).
    pub(crate) fn aggregate(subscription: u64, seed: &foldhash::fast::RandomState, id: &str) -> Self {
        use std::hash::BuildHasher;
        Key::Aggregate {
            subscription,
            aggregate: seed.hash_one(id),
        }
    }
}

/// A unit of ordered work: one fetched message and everything it takes
/// (attempts, retries, settlement).
pub(crate) trait Task: Sized + Send + 'static {
    /// The first attempt, run inline on a pooled worker, which holds
    /// `concurrency` permits while handlers run. `Some(self)` hands the task
    /// to [`retry`](Task::retry) on a task of its own, still owning its key.
    fn first(self, concurrency: &Semaphore) -> impl Future<Output = Option<Self>> + Send;

    /// The retry path after a failed first attempt; the key's later tasks
    /// wait until it returns.
    fn retry(self, concurrency: &Semaphore) -> impl Future<Output = ()> + Send;
}

/// Runs tasks one at a time per [`Key`], keys in parallel.
pub(crate) struct OrderedExecutor<T> {
    concurrency: Semaphore,
    max_workers: usize,
    /// Active keys and their queued jobs; a key is present while a worker or
    /// a retry task owns it, or while it waits in `ready`.
    ///
    /// Jobs queued behind the one a worker or retry task runs (or the
    /// one waiting in `ready`): a key with a single job holds an empty,
    /// unallocated queue.
    queues: Mutex<HashMap<Key, VecDeque<T>, foldhash::fast::RandomState>>,
    /// Keys ready for a worker, each with its next job.
    ready: Mutex<VecDeque<(Key, T)>>,
    /// One permit per key in `ready`; closed on shutdown to stop the workers.
    ready_count: Semaphore,
    workers: AtomicUsize,
    idle_workers: AtomicUsize,
}

impl<T: Task> OrderedExecutor<T> {
    /// An executor running at most `concurrency` handlers at once.
    pub(crate) fn new(concurrency: usize) -> Arc<Self> {
        Arc::new(Self {
            concurrency: Semaphore::new(concurrency),
            max_workers: concurrency,
            queues: Mutex::new(HashMap::default()),
            ready: Mutex::new(VecDeque::new()),
            ready_count: Semaphore::new(0),
            workers: AtomicUsize::new(0),
            idle_workers: AtomicUsize::new(0),
        })
    }

    /// Queues `job` behind earlier jobs of `key`, or makes the idle key ready
    /// for a worker. Never waits (callers bound what they submit).
    pub(crate) fn submit(self: &Arc<Self>, key: Key, job: T) {
        let mut queues = self.queues.lock().unwrap();
        match queues.entry(key) {
            Entry::Occupied(mut queue) => queue.get_mut().push_back(job),
            Entry::Vacant(idle) => {
                idle.insert(VecDeque::new());
                drop(queues);
                self.make_ready(key, job);
            }
        }
    }

    /// Hands an owned key and its next job to the workers.
    fn make_ready(self: &Arc<Self>, key: Key, job: T) {
        self.ready.lock().unwrap().push_back((key, job));
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
            let (key, job) = self
                .ready
                .lock()
                .unwrap()
                .pop_front()
                .expect("one ready key per permit");
            self.drain(key, job).await;
        }
    }

    /// Runs `job`, then the queued jobs of `key` in order until its queue
    /// is empty, or hands the key to a retry task when a first attempt fails.
    async fn drain(self: &Arc<Self>, key: Key, mut job: T) {
        loop {
            if let Some(job) = job.first(&self.concurrency).await {
                tokio::spawn(self.clone().retry(key, job));
                return;
            }
            job = match self.next_job(&key) {
                Some(next) => next,
                None => return,
            };
        }
    }

    /// The retry path of one task; then the key goes back to the workers
    /// with its next job, if it has one.
    async fn retry(self: Arc<Self>, key: Key, job: T) {
        job.retry(&self.concurrency).await;
        if let Some(next) = self.next_job(&key) {
            self.make_ready(key, next);
        }
    }

    /// The next job of `key`; removes the key when its queue is empty.
    fn next_job(&self, key: &Key) -> Option<T> {
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
