//! Two-stage publishing: [`PublishHandle`] resolves to a [`PublishResult`]
//! once the broker answers; the optional lossless [`PublishResults`] stream
//! carries one result per envelope publish.
//!
//! One collector task per bus awaits every pending ACK (no task per message),
//! forwards its result to the results streams (waiting when they are full,
//! never dropping), then to the handle, then frees the in-flight slot.
//!
//! The collector keeps each pending publish's result data in a slab and
//! polls only small tagged ACK futures. Every ACK of a bus waits the same
//! `publish.ack_timeout_ms`, so deadlines come in the order publishes do:
//! one timer, set to the oldest pending deadline, times them all out (no
//! timer per publish). A timed-out ACK future stays polled until it ends
//! (its late outcome is ignored); past [`ORPHANS_MAX`] of those the set is
//! rebuilt without them, so a backend whose ACKs never end holds no more
//! than that many.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, Stream, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError, mpsc, oneshot};

use crate::backend::AckFuture;
use crate::error::{Error, ErrorKind, Result};
use crate::message::{Ack, Position};

/// The outcome of one publish, as the broker reported it.
#[derive(Debug, Clone)]
pub struct PublishResult {
    /// The envelope's event id (or the raw message's `X-Event-ID` header, else empty).
    pub event_id: String,
    /// The topic published to.
    pub topic: String,
    /// The envelope's aggregate id (raw messages: `X-Aggregate-ID`, else empty).
    pub aggregate_id: String,
    /// The envelope's event type (raw messages: `X-Event-Type`, else empty).
    pub event_type: String,
    /// The envelope's tenant id.
    pub tenant_id: Option<i64>,
    /// When the result became known.
    pub timestamp: DateTime<Utc>,
    /// Where the broker stored the message, where it tells.
    pub position: Option<Position>,
    /// The broker had already stored this event id (dedup window) and kept one copy.
    pub duplicate: bool,
    /// `None` on success; else why the broker did not confirm it.
    pub error: Option<Arc<Error>>,
}

impl PublishResult {
    /// Whether the broker confirmed the message.
    pub fn is_success(&self) -> bool {
        self.error.is_none()
    }

    /// `Ok(self)` on success, else the error (kind kept, this result's error as source).
    ///
    /// # Errors
    /// The publish's error.
    pub fn into_result(self) -> Result<PublishResult> {
        match &self.error {
            None => Ok(self),
            Some(e) => Err(
                Error::new(e.kind(), format!("publish of event {:?} failed", self.event_id))
                    .with_source(e.clone()),
            ),
        }
    }

    pub(crate) fn new(meta: ResultMeta, outcome: Result<Ack>) -> Self {
        let (ack, error) = match outcome {
            Ok(ack) => (ack, None),
            Err(e) => (Ack::default(), Some(Arc::new(e))),
        };
        Self {
            event_id: meta.event_id,
            topic: meta.topic,
            aggregate_id: meta.aggregate_id,
            event_type: meta.event_type,
            tenant_id: meta.tenant_id,
            timestamp: Utc::now(),
            position: ack.position,
            duplicate: ack.duplicate,
            error,
        }
    }
}

/// What a result says about the message, known before it is sent.
#[derive(Debug, Clone, Default)]
pub(crate) struct ResultMeta {
    pub(crate) event_id: String,
    pub(crate) topic: String,
    pub(crate) aggregate_id: String,
    pub(crate) event_type: String,
    pub(crate) tenant_id: Option<i64>,
    /// Envelope publishes report to the results streams; raw ones do not.
    pub(crate) report: bool,
}

/// The second stage of a publish: a future of the broker's [`PublishResult`].
///
/// The result is produced whether or not the handle is awaited; dropping the
/// handle does not cancel the publish.
#[derive(Debug)]
#[must_use = "await the handle to learn whether the broker confirmed the message"]
pub struct PublishHandle {
    rx: oneshot::Receiver<PublishResult>,
}

impl Future for PublishHandle {
    type Output = PublishResult;

    /// The collector always answers; it is gone only when the runtime shuts
    /// down, and then the result is a `Closed` error without metadata.
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<PublishResult> {
        self.rx.poll_unpin(cx).map(|r| {
            r.unwrap_or_else(|_| PublishResult::new(ResultMeta::default(), Err(Error::closed("publisher"))))
        })
    }
}

/// A lossless stream of [`PublishResult`]s, from
/// [`EventBus::results`](crate::EventBus::results) or
/// [`EventBus::tenant_results`](crate::EventBus::tenant_results).
///
/// It is bounded (`results.capacity`): when nobody reads it, publishers wait
/// and then time out rather than a result being dropped. It ends after the
/// bus is closed and every result was delivered.
#[derive(Debug)]
pub struct PublishResults(mpsc::Receiver<PublishResult>);

impl Stream for PublishResults {
    type Item = PublishResult;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<PublishResult>> {
        self.0.poll_recv(cx)
    }
}

struct Pending {
    ack: AckFuture,
    /// When the ACK wait ends (`publish.ack_timeout_ms` after stage one).
    deadline: tokio::time::Instant,
    meta: ResultMeta,
    reply: oneshot::Sender<PublishResult>,
    permit: OwnedSemaphorePermit,
}

/// What a pending publish's result needs besides the ACK, in the slab.
struct Waiting {
    /// Tells this publish from a later one in the same slab slot.
    seq: u64,
    meta: ResultMeta,
    reply: oneshot::Sender<PublishResult>,
    permit: OwnedSemaphorePermit,
}

/// A pending ACK, tagged with its slab slot and sequence number.
struct Tagged {
    ack: AckFuture,
    slot: usize,
    seq: u64,
}

impl Future for Tagged {
    type Output = (usize, u64, Result<Ack>);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let (slot, seq) = (self.slot, self.seq);
        self.ack.as_mut().poll(cx).map(|outcome| (slot, seq, outcome))
    }
}

/// Timed-out ACK futures still polled, at most (count), before the set of
/// pending ACKs is rebuilt without them.
const ORPHANS_MAX: usize = 1024;

#[derive(Default)]
struct ResultRoutes {
    global: Option<mpsc::Sender<PublishResult>>,
    tenants: HashMap<i64, mpsc::Sender<PublishResult>>,
}

/// The publishing half of a bus: the in-flight window and the ACK collector.
pub(crate) struct Publisher {
    window: Arc<Semaphore>,
    max_in_flight: usize,
    pending: mpsc::UnboundedSender<Pending>,
    routes: Arc<Mutex<ResultRoutes>>,
    results_capacity: usize,
    global_results: Mutex<Option<PublishResults>>,
    timeout: Duration,
    ack_timeout: Duration,
    /// The backend's name, the `backend` label of the publish metrics.
    backend: &'static str,
}

impl Publisher {
    /// A publisher with a window of `window` publishes awaiting their ACK.
    pub(crate) fn new(config: &crate::BusConfig, window: usize, backend: &'static str) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let routes = Arc::new(Mutex::new(ResultRoutes::default()));
        let mut global_results = None;
        if config.results.enabled {
            let (gtx, grx) = mpsc::channel(config.results.capacity);
            routes.lock().unwrap().global = Some(gtx);
            global_results = Some(PublishResults(grx));
        }
        let ack_timeout = Duration::from_millis(config.publish.ack_timeout_ms);
        tokio::spawn(collect(rx, routes.clone(), backend, ack_timeout));
        Self {
            // The unbounded channel holds at most `max_in_flight` items: each carries a permit.
            window: Arc::new(Semaphore::new(window)),
            max_in_flight: window,
            pending: tx,
            routes,
            results_capacity: config.results.capacity,
            global_results: Mutex::new(global_results),
            timeout: Duration::from_millis(config.publish.timeout_ms),
            ack_timeout: Duration::from_millis(config.publish.ack_timeout_ms),
            backend,
        }
    }

    /// Waits for room in the window, then runs `accept` (stage one) and queues
    /// its ACK for the collector.
    pub(crate) async fn publish<F>(&self, meta: ResultMeta, accept: F) -> Result<PublishHandle>
    where
        F: Future<Output = Result<AckFuture>>,
    {
        let permit = match self.window.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(TryAcquireError::Closed) => return Err(Error::closed("publisher")),
            Err(TryAcquireError::NoPermits) => {
                tokio::time::timeout(self.timeout, self.window.clone().acquire_owned())
                    .await
                    .map_err(|_| {
                        Error::timeout(format!(
                            "no room in the publish window of {} after {:?}",
                            self.max_in_flight, self.timeout
                        ))
                    })?
                    .map_err(|_| Error::closed("publisher"))?
            }
        };
        // Most backends accept at once: only a pending accept pays for a timer.
        let mut accept = std::pin::pin!(accept);
        let accepted = match futures::poll!(accept.as_mut()) {
            Poll::Ready(accepted) => accepted,
            Poll::Pending => tokio::time::timeout(self.timeout, accept)
                .await
                .unwrap_or_else(|_| {
                    Err(Error::timeout(format!(
                        "backend did not accept the message within {:?}",
                        self.timeout
                    )))
                }),
        };
        let ack = accepted.inspect_err(|_| {
            metrics::counter!(
                crate::telemetry::PUBLISH_ERRORS,
                "backend" => self.backend,
                "topic" => meta.topic.clone()
            )
            .increment(1);
        })?;
        let (reply, rx) = oneshot::channel();
        let pending = Pending {
            ack,
            deadline: tokio::time::Instant::now() + self.ack_timeout,
            meta,
            reply,
            permit,
        };
        self.pending
            .send(pending)
            .map_err(|_| Error::closed("publisher"))?;
        Ok(PublishHandle { rx })
    }

    pub(crate) fn take_results(&self) -> Option<PublishResults> {
        self.global_results.lock().unwrap().take()
    }

    pub(crate) fn tenant_results(&self, tenant_id: i64) -> PublishResults {
        let (tx, rx) = mpsc::channel(self.results_capacity);
        self.routes.lock().unwrap().tenants.insert(tenant_id, tx);
        PublishResults(rx)
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.max_in_flight - self.window.available_permits()
    }

    /// Waits until every accepted publish has its result, then refuses new ones.
    pub(crate) async fn flush_and_close(&self, timeout: Duration) -> Result<()> {
        let all = u32::try_from(self.max_in_flight).unwrap_or(u32::MAX);
        let drained = tokio::time::timeout(timeout, self.window.acquire_many(all)).await;
        self.window.close();
        let mut routes = self.routes.lock().unwrap();
        routes.global = None;
        routes.tenants.clear();
        match drained {
            Ok(_) => Ok(()),
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!(
                    "{} publishes still without a result after {timeout:?}",
                    self.in_flight()
                ),
            )),
        }
    }
}

/// The published and failed counters of each topic, labelled once.
struct TopicCounters {
    backend: &'static str,
    by_topic:
        std::collections::HashMap<String, (metrics::Counter, metrics::Counter), foldhash::fast::RandomState>,
}

impl TopicCounters {
    fn count(&mut self, topic: &str, success: bool) {
        // Looked up by `&str`: the topic is copied only the first time.
        let (published, failed) = match self.by_topic.get(topic) {
            Some(counters) => counters,
            None => {
                let labels = [("backend", self.backend.to_owned()), ("topic", topic.to_owned())];
                let counters = (
                    metrics::counter!(crate::telemetry::PUBLISHED, &labels),
                    metrics::counter!(crate::telemetry::PUBLISH_ERRORS, &labels),
                );
                self.by_topic.entry(topic.to_owned()).or_insert(counters)
            }
        };
        match success {
            true => published.increment(1),
            false => failed.increment(1),
        }
    }
}

/// The pending publishes of one bus: results data by slot, ACK futures,
/// deadlines in publish order.
struct InFlight {
    waiting: slab::Slab<Waiting>,
    acks: FuturesUnordered<Tagged>,
    /// (deadline, slot, seq), oldest first; entries of settled publishes
    /// are dropped from the front as they come up, and all at once when
    /// they are more than the pending ones and [`ORPHANS_MAX`].
    deadlines: VecDeque<(tokio::time::Instant, usize, u64)>,
    next_seq: u64,
    /// Timed-out ACK futures still in `acks`.
    orphans: usize,
}

impl InFlight {
    fn add(&mut self, p: Pending) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let Pending {
            ack,
            deadline,
            meta,
            reply,
            permit,
        } = p;
        // Publishers on several threads may send out of deadline order by
        // a few µs: keep the queue ordered (a deadline only moves later).
        let deadline = self
            .deadlines
            .back()
            .map_or(deadline, |&(last, ..)| deadline.max(last));
        let slot = self.waiting.insert(Waiting {
            seq,
            meta,
            reply,
            permit,
        });
        self.acks.push(Tagged { ack, slot, seq });
        self.deadlines.push_back((deadline, slot, seq));
    }

    fn is_live(&self, slot: usize, seq: u64) -> bool {
        self.waiting.get(slot).is_some_and(|w| w.seq == seq)
    }

    /// The publish an ACK outcome belongs to, if it still waits (not timed out).
    fn settle(&mut self, slot: usize, seq: u64) -> Option<Waiting> {
        if !self.is_live(slot, seq) {
            self.orphans = self.orphans.saturating_sub(1);
            return None;
        }
        let waiting = self.waiting.remove(slot);
        while let Some(&(_, s, q)) = self.deadlines.front() {
            if self.is_live(s, q) {
                break;
            }
            self.deadlines.pop_front();
        }
        // An old ACK still pending holds settled entries behind it: keep
        // the queue within twice the pending publishes.
        if self.deadlines.len() > 2 * self.waiting.len() + ORPHANS_MAX {
            let waiting = &self.waiting;
            self.deadlines
                .retain(|&(_, s, q)| waiting.get(s).is_some_and(|w| w.seq == q));
        }
        Some(waiting)
    }

    /// The publishes whose deadline passed by `now`, oldest first.
    fn expire(&mut self, now: tokio::time::Instant) -> Vec<Waiting> {
        let mut expired = Vec::new();
        while let Some(&(deadline, slot, seq)) = self.deadlines.front() {
            if self.is_live(slot, seq) {
                if deadline > now {
                    break;
                }
                expired.push(self.waiting.remove(slot));
                self.orphans += 1;
            }
            self.deadlines.pop_front();
        }
        if self.orphans > ORPHANS_MAX {
            let acks = std::mem::take(&mut self.acks);
            self.acks = acks.into_iter().filter(|t| self.is_live(t.slot, t.seq)).collect();
            self.orphans = 0;
        }
        expired
    }

    fn next_deadline(&self) -> Option<tokio::time::Instant> {
        self.deadlines.front().map(|&(deadline, ..)| deadline)
    }
}

async fn collect(
    mut rx: mpsc::UnboundedReceiver<Pending>,
    routes: Arc<Mutex<ResultRoutes>>,
    backend: &'static str,
    ack_timeout: Duration,
) {
    let mut counters = TopicCounters {
        backend,
        by_topic: std::collections::HashMap::default(),
    };
    let mut pending = InFlight {
        waiting: slab::Slab::new(),
        acks: FuturesUnordered::new(),
        deadlines: VecDeque::new(),
        next_seq: 0,
        orphans: 0,
    };
    let timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(timer);
    // Whether the timer is set (to a deadline that may be older than the
    // oldest pending one: it then fires early and is set again).
    let mut armed = false;
    let mut open = true;
    while open || !pending.waiting.is_empty() {
        if !armed && let Some(deadline) = pending.next_deadline() {
            timer.as_mut().reset(deadline);
            armed = true;
        }
        tokio::select! {
            Some((slot, seq, outcome)) = pending.acks.next(), if !pending.acks.is_empty() => {
                if let Some(w) = pending.settle(slot, seq) {
                    finish(&routes, &mut counters, w, outcome).await;
                }
            }
            () = &mut timer, if armed => {
                armed = false;
                let now = tokio::time::Instant::now();
                // An ACK that is in is a success however late the collector
                // gets to it (it may have waited on a full results stream):
                // take every publish sent and every ACK in before expiring,
                // outside tokio's task budget (a channel out of budget would
                // read as not in yet). Bounded: one pass over the pending.
                tokio::task::unconstrained(async {
                    while let Ok(p) = rx.try_recv() {
                        pending.add(p);
                    }
                    for _ in 0..pending.acks.len() {
                        let Some(Some((slot, seq, outcome))) = pending.acks.next().now_or_never() else {
                            break;
                        };
                        if let Some(w) = pending.settle(slot, seq) {
                            finish(&routes, &mut counters, w, outcome).await;
                        }
                    }
                })
                .await;
                for w in pending.expire(now) {
                    let timeout = Err(Error::timeout(format!("no ACK within {ack_timeout:?}")));
                    finish(&routes, &mut counters, w, timeout).await;
                }
            }
            next = rx.recv(), if open => match next {
                Some(p) => pending.add(p),
                None => open = false,
            },
        }
    }
}

/// Counts one publish's result, forwards it to the results streams (for
/// an envelope publish), then to its handle, then frees its window slot.
async fn finish(
    routes: &Mutex<ResultRoutes>,
    counters: &mut TopicCounters,
    w: Waiting,
    outcome: Result<Ack>,
) {
    let Waiting {
        meta, reply, permit, ..
    } = w;
    let report = meta.report;
    let result = PublishResult::new(meta, outcome);
    counters.count(&result.topic, result.is_success());
    let (global, tenant) = {
        let r = routes.lock().unwrap();
        let tenant = result.tenant_id.and_then(|t| r.tenants.get(&t).cloned());
        (r.global.clone(), tenant)
    };
    // A closed receiver means nobody listens any more: nothing a listener could see is lost.
    if report {
        if let Some(tx) = global {
            let _ = tx.send(result.clone()).await;
        }
        if let Some(tx) = tenant {
            let _ = tx.send(result.clone()).await;
        }
    }
    let _ = reply.send(result);
    drop(permit);
}
