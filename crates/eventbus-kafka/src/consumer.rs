//! One group member per subscription: a `StreamConsumer` whose finished
//! prefix per partition is stored for commit, and which hands over its
//! partitions cleanly on a rebalance.
//!
//! A poll task owns the polling, so the member keeps polling (and stays in
//! its group past `max.poll.interval.ms`) however long the bus takes: it
//! hands deliveries over a small bounded channel, and a partition whose
//! messages cannot be taken now (the channel is full, or the partition has
//! `max_in_flight_per_partition` unsettled messages) is paused and rewound
//! to the first message not handed over, then resumed once there is room.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use eventbus_core::{
    Acker, BackendSubscription, Delivery, Error, ErrorKind, GroupAssignment, Headers, Message, Position,
    Result,
};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{Headers as _, Message as _};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::mpsc;

use crate::offsets::{OffsetTracker, PartitionKey};

/// Rebalance handling: on revoke, fence the revoked partitions (no attempt
/// of their queued or retrying messages starts again here), wait (bounded
/// by `revoke_timeout`, then cancel) for running attempts, then commit
/// their finished prefix (bounded by `commit_timeout`).
pub(crate) struct MemberContext {
    pub(crate) tracker: Arc<OffsetTracker>,
    pub(crate) revoke_timeout: Duration,
    /// The bound of each commit's wait for the coordinator (see [`commit`]).
    pub(crate) commit_timeout: Duration,
    /// Bumped on every assignment: the poll task forgets its pauses.
    pub(crate) rebalances: Arc<AtomicU64>,
    /// This member's partitions, for health.
    pub(crate) view: Arc<std::sync::Mutex<GroupAssignment>>,
    pub(crate) group_id: String,
    /// The backend's connection state, which consumers report too: all
    /// brokers down sets it disconnected; a fetched message or a broker
    /// answering the lag measurement sets it connected (so a consumer-only
    /// process does not stay "disconnected" after a broker restart).
    pub(crate) state: Arc<std::sync::atomic::AtomicU8>,
}

impl MemberContext {
    /// Records the assignment after a rebalance (local, no request: this
    /// runs inside a poll).
    fn show(&self, consumer: &BaseConsumer<Self>) {
        let mut owned: Vec<u32> = consumer
            .assignment()
            .map(|tpl| tpl.elements().iter().map(|e| e.partition() as u32).collect())
            .unwrap_or_default();
        owned.sort_unstable();
        let mut view = self.view.lock().unwrap();
        if view.owned != owned {
            view.rebalances += 1;
            metrics::counter!("eventbus_rebalances_total", "backend" => "kafka").increment(1);
            view.owned = owned;
        }
    }
}

/// Asks the group coordinator for the group's size (at most 1 s) and
/// records it; left unchanged when it cannot say. Runs on the poll task
/// (`block_in_place`) after a rebalance, never in a task of its own: a task
/// holding the consumer could end up dropping it last, after close, when
/// librdkafka's final revoke-and-commit has no broker to answer.
fn refresh_members(consumer: &StreamConsumer<MemberContext>) {
    let fetch = || {
        let context = consumer.context();
        let members = consumer
            .fetch_group_list(Some(&context.group_id), Duration::from_secs(1))
            .ok()
            .and_then(|list| list.groups().first().map(|g| g.members().len()));
        if let Some(members) = members {
            context.view.lock().unwrap().members = members;
        }
    };
    if let Ok(h) = tokio::runtime::Handle::try_current()
        && h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
    {
        tokio::task::block_in_place(fetch);
    }
}

impl ClientContext for MemberContext {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::AllBrokersDown) {
            self.state.store(crate::backend::DISCONNECTED, Ordering::Relaxed);
        }
        tracing::warn!(%error, reason, "librdkafka error (consumer)");
    }
}

impl ConsumerContext for MemberContext {
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(_) = rebalance {
            self.rebalances.fetch_add(1, Ordering::AcqRel);
        }
        self.show(consumer);
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(revoked) = rebalance else {
            return;
        };
        let keys: Vec<PartitionKey> = revoked
            .elements()
            .iter()
            .map(|e| (Arc::<str>::from(e.topic()), e.partition()))
            .collect();
        let revoke = || {
            let offsets = self.tracker.revoke(&keys, self.revoke_timeout);
            if let Err(e) = commit(consumer, &offsets, self.commit_timeout) {
                tracing::warn!(error = %e, "commit on revoke failed; the next owner may see duplicates");
            }
        };
        // This runs inside the fetch loop's poll: let the runtime move other
        // tasks (the handlers we wait for) off this thread meanwhile, and
        // keep them running while the commit waits for its answer.
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(revoke)
            }
            _ => revoke(),
        }
        tracing::info!(partitions = keys.len(), "partitions revoked");
    }
}

/// Commits `offsets` (the next offset to consume, per partition) and waits
/// for the group coordinator's answer at most `timeout`: the result of a
/// commit that takes longer is reported as `OperationTimedOut`, and the
/// commit may still land later (a lower offset than a later owner's
/// commit is refused by the coordinator once the group moved on, or
/// causes duplicates: never a loss).
///
/// librdkafka's synchronous commit (`rd_kafka_commit`, which the rdkafka
/// crate's `CommitMode::Sync` calls) waits for the answer without a bound:
/// against a broker that accepts the connection and never answers, or
/// whose coordinator cannot be found, a member dropped without `close`
/// blocked a tokio worker forever in its final revoke. So the commit is
/// sent with `rd_kafka_commit_queue` to a queue of its own, and that queue
/// is polled with the bound.
pub(crate) fn commit<C: Consumer<X>, X: ConsumerContext>(
    consumer: &C,
    offsets: &[(PartitionKey, i64)],
    timeout: Duration,
) -> std::result::Result<(), rdkafka::error::KafkaError> {
    use rdkafka::bindings as rd;
    use rdkafka::error::KafkaError;
    use rdkafka::types::RDKafkaErrorCode;
    if offsets.is_empty() {
        return Ok(());
    }
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in offsets {
        tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset))?;
    }
    let timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    let client = consumer.client().native_ptr();
    // SAFETY: `client` is valid while `consumer` is borrowed, and `tpl`
    // while it lives (librdkafka copies the list before returning). The
    // queue is ours alone: librdkafka posts the commit's result to it (the
    // callback is unused when the queue is read with `rd_kafka_queue_poll`,
    // the event API), and keeps its own reference to it until then, so
    // destroying it after a timeout is safe (the late result is discarded).
    // The event, when one came, is destroyed after its error is read.
    let err = unsafe {
        let queue = rd::rd_kafka_queue_new(client);
        let mut err = rd::rd_kafka_commit_queue(client, tpl.ptr(), queue, None, std::ptr::null_mut());
        if err == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            let event = rd::rd_kafka_queue_poll(queue, timeout_ms);
            err = if event.is_null() {
                rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR__TIMED_OUT
            } else {
                let e = rd::rd_kafka_event_error(event);
                rd::rd_kafka_event_destroy(event);
                e
            };
        }
        rd::rd_kafka_queue_destroy(queue);
        err
    };
    match err {
        rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR => Ok(()),
        e => Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::from(e))),
    }
}

/// Whether the group coordinator refused a commit because the group has
/// moved on (a rebalance began or ended since this member's last join):
/// the partitions are another member's now, or are being handed over.
/// Kafka's protocol errors `ILLEGAL_GENERATION`, `UNKNOWN_MEMBER_ID`,
/// `REBALANCE_IN_PROGRESS`.
fn refused_by_rebalance(e: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as Code;
    matches!(
        e.rdkafka_error_code(),
        Some(Code::IllegalGeneration | Code::UnknownMemberId | Code::RebalanceInProgress)
    )
}

/// A group member's consumer, never closed on a runtime worker without a
/// bound.
///
/// Dropping an rdkafka consumer closes it there and then: librdkafka's
/// final revoke (our [`MemberContext::pre_rebalance`], its commit bounded
/// by `commit_timeout`), then its own commit of stored offsets and the
/// group leave, each waiting on a broker that does not answer up to
/// `socket.timeout.ms` (60 s by default) and its retries. Whoever drops the
/// last reference on a runtime thread (the poll task cancelled by a
/// runtime shutting down, an acker) would block that worker so long, and
/// the runtime's shutdown with it. So such a drop closes the consumer on a
/// thread of its own ("eventbus-kafka-close") and waits for it at most
/// `commit_timeout` (inside `block_in_place` on a multi-thread runtime):
/// with an answering broker it has committed and left its group when the
/// drop returns, as when it closed in place, so a process exiting right
/// after dropping its bus loses no commit; with a silent one the drop
/// returns at the bound and the thread goes on until librdkafka gives up.
/// No handler can be running then (each holds a reference through its
/// acker), so the final revoke waits for none. Elsewhere (`close`'s own
/// thread) the consumer closes in place.
pub(crate) struct Member(Option<StreamConsumer<MemberContext>>);

/// The name of the thread a member's consumer closes on (a drop on a
/// runtime thread, and `close`).
const CLOSE_THREAD: &str = "eventbus-kafka-close";

impl Member {
    pub(crate) fn new(consumer: StreamConsumer<MemberContext>) -> Self {
        Self(Some(consumer))
    }
}

impl std::ops::Deref for Member {
    type Target = StreamConsumer<MemberContext>;

    fn deref(&self) -> &Self::Target {
        self.0.as_ref().expect("taken only by drop")
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let Some(consumer) = self.0.take() else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return drop(consumer);
        };
        let bound = consumer.context().commit_timeout;
        let (closed, done) = std::sync::mpsc::channel::<()>();
        let closing = std::thread::Builder::new()
            .name(CLOSE_THREAD.into())
            .spawn(move || {
                drop(consumer);
                let _ = closed.send(());
            });
        if let Err(e) = closing {
            // No thread to be had: spawn dropped the closure, which closed
            // the consumer in place, as rdkafka would.
            return tracing::warn!(error = %e, "no thread to close the Kafka consumer on; closed it in place");
        }
        let wait = || done.recv_timeout(bound);
        let waited = match runtime.runtime_flavor() {
            tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(wait),
            _ => wait(),
        };
        match waited {
            Ok(()) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                tracing::warn!(
                    ?bound,
                    "the Kafka consumer did not close within commit_timeout_ms; it goes on closing in the background"
                )
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                tracing::warn!("the thread closing the Kafka consumer failed")
            }
        }
    }
}

/// Deliveries handed from the poll task to the fetch loop (count). Small:
/// the bus's executor is the real queue.
const HANDOVER: usize = 256;

/// How often the poll task polls when nothing arrives (paused or idle).
const POLL_TICK: Duration = Duration::from_millis(500);

/// How long a fetched message waits for room in the handover before its
/// partition is paused and rewound (a busy bus drains it much faster).
const ROOM_WAIT: Duration = Duration::from_secs(1);

pub(crate) struct KafkaSubscription {
    consumer: Arc<Member>,
    tracker: Arc<OffsetTracker>,
    deliveries: mpsc::Receiver<Result<Delivery>>,
    poller: tokio::task::JoinHandle<()>,
    stop: Arc<tokio::sync::Notify>,
    view: Arc<std::sync::Mutex<GroupAssignment>>,
    /// Log end minus committed offset of the assigned partitions.
    lag: Arc<eventbus_core::MeasuredLag>,
}

impl KafkaSubscription {
    pub(crate) fn start(
        consumer: Arc<Member>,
        tracker: Arc<OffsetTracker>,
        rebalances: Arc<AtomicU64>,
        per_partition: usize,
        view: Arc<std::sync::Mutex<GroupAssignment>>,
        topic: &str,
        fetch_wait: Duration,
    ) -> Self {
        let topic = Arc::<str>::from(topic);
        let (tx, deliveries) = mpsc::channel(HANDOVER);
        let stop = Arc::new(tokio::sync::Notify::new());
        let lag = eventbus_core::MeasuredLag::new();
        let poll = Poller {
            lag: lag.clone(),
            lag_measured: None,
            lag_task: None,
            // A lag request to a partition's leader can queue behind this
            // member's fetch, which the broker holds up to the fetch wait
            // (a Kafka broker answers one connection's requests in order).
            lag_request_timeout: fetch_wait + LAG_REQUEST_TIMEOUT,
            resumed: std::collections::HashMap::default(),
            rebalanced_at: None,
            consumer: consumer.clone(),
            tracker: tracker.clone(),
            rebalances,
            seen_rebalances: 0,
            per_partition,
            paused: HashSet::default(),
            next_offset: std::collections::HashMap::default(),
            topic,
            view: view.clone(),
            tx,
        };
        let poller = tokio::spawn(poll.run(stop.clone()));
        Self {
            consumer,
            tracker,
            deliveries,
            poller,
            stop,
            view,
            lag,
        }
    }
}

/// How often the poll task measures the lag (one committed-offsets request,
/// and a watermark request only for a partition whose cached end may be
/// old: see [`Poller::measure_lag`]).
const LAG_EVERY: Duration = Duration::from_secs(1);

/// How long one lag request may take beyond the fetch wait.
const LAG_REQUEST_TIMEOUT: Duration = Duration::from_millis(500);

/// The poll task's state.
struct Poller {
    lag: Arc<eventbus_core::MeasuredLag>,
    lag_measured: Option<std::time::Instant>,
    /// The measurement running, if any.
    lag_task: Option<tokio::task::JoinHandle<Option<()>>>,
    /// The bound of each lag request: the fetch wait plus [`LAG_REQUEST_TIMEOUT`].
    lag_request_timeout: Duration,
    /// Partitions resumed by us, and when: until a fetch response can have
    /// come since (the lag request bound), their cached log end may be
    /// from before the pause, so the lag asks the broker for it.
    resumed: std::collections::HashMap<PartitionKey, std::time::Instant, foldhash::fast::RandomState>,
    /// When this member's assignment last changed: until a fetch response
    /// can have come since, every cached log end may be from an earlier
    /// assignment (librdkafka keeps a partition's across unassign and assign).
    rebalanced_at: Option<std::time::Instant>,
    consumer: Arc<Member>,
    tracker: Arc<OffsetTracker>,
    rebalances: Arc<AtomicU64>,
    seen_rebalances: u64,
    per_partition: usize,
    /// Partitions paused by us, each rewound to its first message not handed over.
    paused: HashSet<PartitionKey, foldhash::fast::RandomState>,
    /// Per partition, the offset expected next: one past the last handed
    /// over, or the rewind target of a pause (for [`Poller::handed_over`]).
    next_offset: std::collections::HashMap<PartitionKey, i64, foldhash::fast::RandomState>,
    /// The subscribed topic, shared by the keys of its messages.
    topic: Arc<str>,
    /// This member's view, for its offset-gap count.
    view: Arc<std::sync::Mutex<GroupAssignment>>,
    tx: mpsc::Sender<Result<Delivery>>,
}

impl Poller {
    /// Log end minus the group's committed offset (or the log start when
    /// nothing is committed) of every assigned partition, at most every
    /// [`LAG_EVERY`], on a blocking thread: the poll loop only starts a
    /// measurement, so a slow broker never holds up fetching.
    ///
    /// One committed-offsets request per measurement; the log start and end
    /// are those of the partition's last fetch response, which librdkafka
    /// keeps ([`cached_watermarks`], no request). The end is the high
    /// watermark: records of a transaction still open count (a broker
    /// request under librdkafka's default `read_committed` would give the
    /// last stable offset). A partition whose cached end may be old costs a
    /// watermark request: one paused by us (not fetched), one resumed or
    /// any after a rebalance until a fetch response can have come since,
    /// one not fetched yet. A request per partition each second made a
    /// broker keeping its log in S3 (tansu) list the partition's whole log
    /// every time: ours went at 53–57 % of raw rdkafka with them, 67 %
    /// without (README "A slow broker").
    ///
    /// Each request blocks up to the fetch wait plus 500 ms (a request to
    /// a partition's leader can queue behind this member's held fetch), the
    /// whole measurement up to twice that. The thread sets the lag, and the
    /// state to connected, the moment the brokers answered (an answer older
    /// than a later broker failure never overrides it); left as it was when
    /// a request fails or the measurement runs out of time. It holds the
    /// consumer only while measuring (a weak reference otherwise), and the
    /// poll task waits for it before ending, so `close` still drops the
    /// consumer last.
    fn measure_lag(&mut self) {
        if self.lag_task.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        if self.lag_measured.is_some_and(|t| t.elapsed() < LAG_EVERY) {
            return;
        }
        let now = std::time::Instant::now();
        self.lag_measured = Some(now);
        let (consumer, lag) = (Arc::downgrade(&self.consumer), self.lag.clone());
        let timeout = self.lag_request_timeout;
        let settled = |since: &std::time::Instant| now.duration_since(*since) > timeout;
        self.resumed.retain(|_, at| !settled(at));
        let all_stale = self.rebalanced_at.is_some_and(|at| !settled(&at));
        let stale: Vec<PartitionKey> = self.paused.iter().chain(self.resumed.keys()).cloned().collect();
        self.lag_task = Some(tokio::task::spawn_blocking(move || {
            let consumer = consumer.upgrade()?;
            let deadline = std::time::Instant::now() + 2 * timeout;
            let committed = consumer.committed(timeout).ok()?;
            let mut total = 0u64;
            for e in committed.elements() {
                let (topic, partition) = (e.topic(), e.partition());
                let fresh = !all_stale && !stale.iter().any(|k| &*k.0 == topic && k.1 == partition);
                let committed = match e.offset() {
                    rdkafka::Offset::Offset(o) => Some(o),
                    _ => None,
                };
                let cached = cached_watermarks(&consumer, topic, partition)
                    .filter(|&(low, _)| fresh && (committed.is_some() || low >= 0));
                let (low, high) = match cached {
                    Some(known) => known,
                    None => {
                        let left = deadline.checked_duration_since(std::time::Instant::now())?;
                        consumer
                            .fetch_watermarks(topic, partition, left.min(timeout))
                            .ok()?
                    }
                };
                total += (high - committed.unwrap_or(low)).max(0) as u64;
            }
            lag.set(total);
            // The brokers answered: connected.
            consumer
                .context()
                .state
                .store(crate::backend::CONNECTED, Ordering::Relaxed);
            Some(())
        }));
    }

    /// The poll loop, then a wait for a running lag measurement (bounded
    /// by its request timeouts), so no thread holds the consumer once this
    /// task ended.
    async fn run(mut self, stop: Arc<tokio::sync::Notify>) {
        self.poll(stop).await;
        if let Some(task) = self.lag_task.take() {
            let _ = task.await;
        }
    }

    async fn poll(&mut self, stop: Arc<tokio::sync::Notify>) {
        let consumer = self.consumer.clone();
        let tracker = self.tracker.clone();
        let tx = self.tx.clone();
        let stopped = stop.notified();
        tokio::pin!(stopped);
        loop {
            self.after_rebalance();
            self.resume_with_room();
            self.measure_lag();
            let next = tokio::select! {
                _ = &mut stopped => return,
                _ = self.tx.closed() => return,
                // A finish may have made room for a paused partition: resume it now.
                _ = tracker.finishes.notified(), if !self.paused.is_empty() => continue,
                next = tokio::time::timeout(POLL_TICK, consumer.recv()) => next,
            };
            let delivery = match next {
                Err(_) => continue, // polled, nothing came: the member stays alive
                Ok(Err(e)) => Err(Error::new(ErrorKind::Backend, "Kafka fetch failed").with_source(e)),
                Ok(Ok(m)) => {
                    self.consumer
                        .context()
                        .state
                        .store(crate::backend::CONNECTED, Ordering::Relaxed);
                    // A rebalance served inside this very poll resets pauses first:
                    // a message of the new assignment is never taken for a paused one.
                    self.after_rebalance();
                    let key = self.key_of(&m);
                    if self.paused.contains(&key) {
                        // Fetched before the pause took effect: fetched again after the resume.
                        continue;
                    }
                    if self.tracker.in_flight(&key) >= self.per_partition && self.pause(&key, m.offset()) {
                        continue;
                    }
                    match tx.try_reserve() {
                        Ok(permit) => {
                            permit.send(Ok(delivery(&self.consumer, &self.tracker, key.clone(), &m)));
                            self.handed_over(&key, m.offset());
                            continue;
                        }
                        Err(mpsc::error::TrySendError::Closed(())) => return,
                        Err(mpsc::error::TrySendError::Full(())) => {}
                    }
                    // No room: wait a little (a busy bus drains the handover
                    // fast); past that, pause and rewind, and keep polling.
                    let owned = m.detach();
                    drop(m);
                    let room = tokio::time::timeout(ROOM_WAIT, tx.reserve()).await;
                    let full = match room {
                        Ok(Ok(permit)) => {
                            permit.send(Ok(delivery(&self.consumer, &self.tracker, key.clone(), &owned)));
                            self.handed_over(&key, owned.offset());
                            false
                        }
                        Ok(Err(_)) => return,
                        Err(_) => true,
                    };
                    if full && !self.pause(&key, owned.offset()) {
                        // Could not rewind: hand it over when there is room (never dropped).
                        let d = delivery(&self.consumer, &self.tracker, key.clone(), &owned);
                        if tx.send(Ok(d)).await.is_err() {
                            return;
                        }
                        self.handed_over(&key, owned.offset());
                    }
                    continue;
                }
            };
            // A fetch error never blocks polling: with no room it is logged and
            // dropped (the client retries by itself; the next poll reports again).
            match self.tx.try_send(delivery) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Closed(_)) => return,
                Err(mpsc::error::TrySendError::Full(Err(e))) => {
                    tracing::warn!(error = %e, "Kafka fetch error while the bus is full");
                }
                Err(mpsc::error::TrySendError::Full(Ok(_))) => {}
            }
        }
    }

    /// The key of `m`'s partition, sharing the subscribed topic's name
    /// (a member subscribes to one topic; any other is copied).
    fn key_of<M: rdkafka::Message>(&self, m: &M) -> PartitionKey {
        let topic = match m.topic() == &*self.topic {
            true => self.topic.clone(),
            false => Arc::from(m.topic()),
        };
        (topic, m.partition())
    }

    /// Records that `offset` of `key` was handed over (see [`Poller::arrived`]).
    fn handed_over(&mut self, key: &PartitionKey, offset: i64) {
        self.arrived(key, offset, offset + 1);
    }

    /// Counts a gap when `offset`, just served for `key`, is past the next
    /// offset expected (one past the last handed over, or the rewind
    /// target), then expects `next`. Kafka leaves gaps legitimately
    /// (transaction markers, compacted records); on a topic with neither, a
    /// gap means the broker served a later record before an earlier one.
    fn arrived(&mut self, key: &PartitionKey, offset: i64, next: i64) {
        // Updated in place: no key copied per message once the partition is known.
        let Some(expected) = self.next_offset.get_mut(key) else {
            self.next_offset.insert(key.clone(), next);
            return;
        };
        let gap = (offset > *expected).then_some(*expected);
        *expected = next;
        if let Some(expected) = gap {
            metrics::counter!(eventbus_core::telemetry::OFFSET_GAPS, "backend" => "kafka", "topic" => key.0.to_string())
                .increment(1);
            self.view.lock().unwrap().offset_gaps += 1;
            tracing::debug!(topic = %key.0, partition = key.1, expected, offset, "offset gap");
        }
    }

    /// Pauses `key` and rewinds it to `offset` (the first message not
    /// handed over); true when both took effect. On a failed rewind the
    /// partition is resumed and false returned: the caller must hand the
    /// message over, since nothing would fetch it again.
    fn pause(&mut self, key: &PartitionKey, offset: i64) -> bool {
        let mut tpl = TopicPartitionList::with_capacity(1);
        tpl.add_partition(&key.0, key.1);
        if let Err(e) = self.consumer.pause(&tpl) {
            tracing::warn!(error = %e, topic = %key.0, partition = key.1, "pause failed");
            return false;
        }
        if let Err(e) = self
            .consumer
            .seek(&key.0, key.1, Offset::Offset(offset), Duration::ZERO)
        {
            tracing::warn!(error = %e, topic = %key.0, partition = key.1, "rewind failed");
            let _ = self.consumer.resume(&tpl);
            return false;
        }
        tracing::debug!(topic = %key.0, partition = key.1, offset, "partition paused");
        // The message that made us pause may itself be past a gap.
        self.arrived(key, offset, offset);
        self.paused.insert(key.clone());
        true
    }

    /// Resumes paused partitions once the handover has room and the
    /// partition is down to half its in-flight bound.
    fn resume_with_room(&mut self) {
        if self.paused.is_empty() || self.tx.capacity() < HANDOVER / 2 {
            return;
        }
        let ready: Vec<PartitionKey> = self
            .paused
            .iter()
            .filter(|k| self.tracker.in_flight(k) <= self.per_partition / 2)
            .cloned()
            .collect();
        for key in ready {
            let mut tpl = TopicPartitionList::with_capacity(1);
            tpl.add_partition(&key.0, key.1);
            if let Err(e) = self.consumer.resume(&tpl) {
                tracing::debug!(error = %e, topic = %key.0, partition = key.1, "resume failed");
            }
            self.paused.remove(&key);
            self.resumed.insert(key, std::time::Instant::now());
        }
    }

    /// After a rebalance the assignment starts from committed offsets, unpaused.
    fn after_rebalance(&mut self) {
        let now = self.rebalances.load(Ordering::Acquire);
        if now == self.seen_rebalances {
            return;
        }
        self.seen_rebalances = now;
        self.rebalanced_at = Some(std::time::Instant::now());
        self.resumed.clear();
        self.next_offset.clear();
        refresh_members(&self.consumer);
        // librdkafka keeps an application pause across unassign and assign:
        // resume every partition we paused, assigned now or not, so one that
        // comes back later is not left paused with nobody to resume it.
        for key in self.paused.drain() {
            let mut tpl = TopicPartitionList::with_capacity(1);
            tpl.add_partition(&key.0, key.1);
            let _ = self.consumer.resume(&tpl);
        }
    }
}

/// The log start and end offsets of `topic`'s `partition` as of its last
/// fetch response (librdkafka's `rd_kafka_get_watermark_offsets`: no
/// request; the rdkafka crate does not wrap it). `None` when librdkafka
/// knows no end yet (nothing fetched) or the topic name holds a NUL; the
/// start is -1 when the broker did not send it.
fn cached_watermarks(
    consumer: &StreamConsumer<MemberContext>,
    topic: &str,
    partition: i32,
) -> Option<(i64, i64)> {
    let topic = std::ffi::CString::new(topic).ok()?;
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client handle is valid while `consumer` is borrowed;
    // librdkafka reads the NUL-terminated `topic` and writes the two
    // offsets, keeping no pointer to any of them after the call. It takes
    // the client's and the partition's locks, so any thread may call it.
    // (Like `rd_kafka_position`, it creates librdkafka's partition object
    // when missing: for a partition just revoked, harmless.)
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    (err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0)
        .then_some((low, high))
}

/// The bus message of a Kafka record: headers whose value is not UTF-8 are
/// kept lossily (the envelope decoder then rejects what it needs), a
/// missing payload is empty.
pub(crate) fn message_of<M: rdkafka::Message>(m: &M) -> Message {
    let received = m.headers();
    let mut headers = Headers::with_capacity(received.map_or(0, |h| h.count()));
    if let Some(h) = received {
        for header in h.iter() {
            let value = header.value.map(String::from_utf8_lossy).unwrap_or_default();
            headers.insert(header.key, value);
        }
    }
    Message {
        topic: m.topic().to_owned(),
        key: m.key().map(bytes::Bytes::copy_from_slice),
        headers,
        payload: bytes::Bytes::copy_from_slice(m.payload().unwrap_or_default()),
        dedup_id: None,
    }
}

/// The delivery of `m`, of partition `key`.
fn delivery<M: rdkafka::Message>(
    consumer: &Arc<Member>,
    tracker: &Arc<OffsetTracker>,
    key: PartitionKey,
    m: &M,
) -> Delivery {
    let (generation, ownership) = tracker.fetched(&key, m.offset());
    let message = message_of(m);
    Delivery {
        message,
        position: Some(Position::Offset {
            partition: m.partition(),
            offset: m.offset(),
        }),
        delivery_count: 1,
        acker: Box::new(KafkaAcker {
            consumer: consumer.clone(),
            tracker: tracker.clone(),
            key,
            offset: m.offset(),
            generation,
        }),
        ownership: Some(ownership),
    }
}

#[async_trait]
impl BackendSubscription for KafkaSubscription {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        self.deliveries.recv().await
    }

    fn try_next(&mut self) -> Option<Result<Delivery>> {
        self.deliveries.try_recv().ok()
    }

    fn assignment(&self) -> Option<Arc<std::sync::Mutex<GroupAssignment>>> {
        Some(self.view.clone())
    }

    fn lag_probe(&self) -> Option<eventbus_core::LagProbe> {
        Some(self.lag.probe())
    }

    async fn close(self: Box<Self>) -> Result<()> {
        let Self {
            consumer,
            tracker,
            deliveries,
            poller,
            stop,
            view: _,
            lag: _,
        } = *self;
        stop.notify_one();
        drop(deliveries);
        let _ = poller.await;
        // Commit the finished prefix, then leave the group: blocking calls,
        // on a thread of their own so a broker that does not answer holds
        // neither a runtime worker nor the runtime's shutdown (see [`Member`]).
        let timeout = consumer.context().commit_timeout;
        let (committed_tx, committed) = tokio::sync::oneshot::channel();
        let (left_tx, left) = tokio::sync::oneshot::channel();
        let leave = move || {
            let result = match commit(&**consumer, &tracker.committable(), timeout) {
                // Another member's join or leave got there first: the
                // partitions are being handed over, and leaving revokes
                // them (the revoke commits what it still may). Nothing is
                // lost: the next owner starts at the last commit and may
                // handle again what this member finished since.
                Err(e) if refused_by_rebalance(&e) => {
                    tracing::warn!(error = %e, "commit at close refused by a rebalance; the next owner may see duplicates");
                    Ok(())
                }
                other => other.map_err(|e| Error::backend("Kafka commit failed", e)),
            };
            let _ = committed_tx.send(result);
            consumer.unsubscribe();
            // The last reference, unless an acker still holds one: then its
            // drop closes the consumer.
            drop(consumer);
            let _ = left_tx.send(());
        };
        std::thread::Builder::new()
            .name(CLOSE_THREAD.into())
            .spawn(leave)
            .map_err(|e| Error::backend("no thread to close the Kafka consumer on", e))?;
        let ended = || {
            Error::new(
                ErrorKind::Backend,
                "the Kafka consumer's close ended without a result",
            )
        };
        // The commit bounds itself; the second more is for the thread's start.
        let commit_wait = timeout + Duration::from_secs(1);
        let committed = match tokio::time::timeout(commit_wait, committed).await {
            Ok(result) => result.unwrap_or_else(|_| Err(ended())),
            Err(_) => Err(Error::timeout(format!(
                "the Kafka commit at close did not end within {commit_wait:?}"
            ))),
        };
        // The final revoke (its handlers done by now; its commit, if any,
        // bounded by `commit_timeout`), librdkafka's commit of stored
        // offsets and the group leave: as long again.
        let left = match tokio::time::timeout(timeout, left).await {
            Ok(left) => left.map_err(|_| ended()),
            Err(_) => Err(Error::timeout(format!(
                "the Kafka consumer did not leave its group within {timeout:?} (commit_timeout_ms); it goes on closing in the background"
            ))),
        };
        committed.and(left)
    }
}

struct KafkaAcker {
    consumer: Arc<Member>,
    tracker: Arc<OffsetTracker>,
    key: PartitionKey,
    offset: i64,
    generation: u64,
}

#[async_trait]
impl Acker for KafkaAcker {
    async fn ack(&self) -> Result<()> {
        self.store();
        Ok(())
    }

    /// Storing the offset is a call into librdkafka that waits for nothing.
    fn ack_now(&self) -> Option<Result<()>> {
        self.store();
        Some(Ok(()))
    }
}

impl KafkaAcker {
    /// Marks the offset handled and stores the partition's next offset to
    /// commit, when this ack moved it.
    fn store(&self) {
        if let Some(next) = self.tracker.finished(&self.key, self.offset, self.generation) {
            // `store_offsets` stores the offset as given (the next to consume);
            // `store_offset` would add 1 (librdkafka's legacy rd_kafka_offset_store).
            let mut tpl = TopicPartitionList::with_capacity(1);
            let stored = tpl
                .add_partition_offset(&self.key.0, self.key.1, Offset::Offset(next))
                .and_then(|()| self.consumer.store_offsets(&tpl));
            // Fails only when the partition was just revoked: then it is not ours to commit.
            if let Err(e) = stored {
                tracing::debug!(error = %e, "offset not stored");
            }
        }
    }
}
