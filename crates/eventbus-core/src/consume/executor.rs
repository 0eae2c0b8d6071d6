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
//!   demand and kept: each key made ready claims an idle worker or starts
//!   one, so keys made ready together run together. A semaphore of the
//!   same size caps handlers running at once, retrying ones included.
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
    /// Workers started (they are kept until shutdown), at most `max_workers`.
    workers: AtomicUsize,
    /// Workers waiting for a ready key that no key has claimed yet. Once
    /// the pool is full it also counts every ready key no worker could
    /// claim, once a worker back from a key takes it (so it can pass
    /// `workers`, by at most the largest backlog of ready keys): harmless,
    /// as no worker can be started then anyway.
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

    /// Finds a worker for a key just made ready: claims an idle one, else
    /// starts one when the pool is not full (a full pool's workers take
    /// it in turn).
    ///
    /// An idle worker is claimed for one key only, before it wakes: keys
    /// made ready one right after another (a fetched batch) each get a
    /// worker of their own. Checking for an idle worker without claiming
    /// it let every key of a batch count on the same one, which took them
    /// one after another while the pool stayed small.
    fn ensure_worker(self: &Arc<Self>) {
        let claimed = self
            .idle_workers
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        if claimed.is_ok() {
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

    /// A pooled worker. It counts itself idle before each wait for a
    /// ready key, except the first: a worker is started for the key that
    /// started it. The key that wakes it claimed it
    /// ([`ensure_worker`](Self::ensure_worker)), so it does not count itself
    /// out on waking.
    async fn worker(self: Arc<Self>) {
        let mut first = true;
        loop {
            if !first {
                self.idle_workers.fetch_add(1, Ordering::AcqRel);
            }
            first = false;
            let permit = self.ready_count.acquire().await;
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use tokio::sync::Barrier;

    use super::*;

    /// A task that waits (at most 2 s) until every task sharing its
    /// barrier runs, then counts itself met.
    struct Meet {
        barrier: Arc<Barrier>,
        met: Arc<AtomicUsize>,
    }

    impl Task for Meet {
        async fn first(self, _: &Semaphore) -> Option<Self> {
            if tokio::time::timeout(Duration::from_secs(2), self.barrier.wait())
                .await
                .is_ok()
            {
                self.met.fetch_add(1, Ordering::SeqCst);
            }
            None
        }

        async fn retry(self, _: &Semaphore) {}
    }

    fn key(aggregate: u64) -> Key {
        Key::Aggregate {
            subscription: 1,
            aggregate,
        }
    }

    /// Waits (at most 5 s) until `met` reaches `n`.
    async fn until_met(met: &AtomicUsize, n: usize) -> usize {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while met.load(Ordering::SeqCst) < n && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        met.load(Ordering::SeqCst)
    }

    /// Keys made ready one right after another (as a fetched batch is
    /// submitted) while one worker waits idle run at once, each on a
    /// worker. Before, each counted on the one idle worker, so none was
    /// started: it took them one after another, and here each waited
    /// for the others in vain.
    #[tokio::test]
    async fn keys_made_ready_together_after_a_worker_went_idle_run_at_once() {
        let executor = OrderedExecutor::new(8);
        let met = Arc::new(AtomicUsize::new(0));
        // One key starts a worker, which then waits idle.
        executor.submit(
            key(0),
            Meet {
                barrier: Arc::new(Barrier::new(1)),
                met: met.clone(),
            },
        );
        assert_eq!(until_met(&met, 1).await, 1);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let barrier = Arc::new(Barrier::new(4));
        for aggregate in 1..=4 {
            executor.submit(
                key(aggregate),
                Meet {
                    barrier: barrier.clone(),
                    met: met.clone(),
                },
            );
        }
        assert_eq!(
            until_met(&met, 5).await,
            5,
            "the four keys ran at once ({} workers started)",
            executor.workers.load(Ordering::SeqCst)
        );
        assert_eq!(
            executor.workers.load(Ordering::SeqCst),
            4,
            "the idle worker and three new ones"
        );
        executor.shutdown();
    }

    /// A full pool takes ready keys in turn: with 2 workers, 4 keys that
    /// each wait for one other run two by two, and no worker is started
    /// past the pool's size.
    #[tokio::test]
    async fn a_full_pool_takes_ready_keys_in_turn() {
        let executor = OrderedExecutor::new(2);
        let met = Arc::new(AtomicUsize::new(0));
        for pair in 0..2u64 {
            let barrier = Arc::new(Barrier::new(2));
            for aggregate in [2 * pair, 2 * pair + 1] {
                executor.submit(
                    key(aggregate),
                    Meet {
                        barrier: barrier.clone(),
                        met: met.clone(),
                    },
                );
            }
        }
        assert_eq!(until_met(&met, 4).await, 4, "both pairs met");
        assert_eq!(executor.workers.load(Ordering::SeqCst), 2);
        executor.shutdown();
    }
}
