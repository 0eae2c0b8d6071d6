//! Consumer groups on JetStream: which member consumes which partition.
//!
//! Every subscription is a member of its (group, topic). A topic has `P`
//! partitions (`P = 1` for an unpartitioned topic), each one subject and one
//! durable pull consumer. A member consumes a partition only while it holds
//! that partition's **lease**: a key in the key-value bucket
//! `consumer.groups_bucket`, whose `max_age` is `consumer.lease_ms`, so a
//! lease the server stored `lease_ms` ago and nobody renewed disappears by
//! itself (the server's clock, not the members').
//!
//! Keys, under `<durable>` = the group's durable name for the topic:
//! - `<durable>.m.<member id>`: the member is alive (rewritten every heartbeat);
//! - `<durable>.p.<partition>`: the partition's owner; taken with `create`
//!   (fails if held), renewed with `update` at the revision last written
//!   (fails if someone else took it), released with a revision-checked delete.
//!
//! Every heartbeat (a fifth of the lease) a member renews its leases, lists
//! the live members, and moves towards its [`fair_share`] (members sorted by
//! id): above it, it gives up its highest partitions after draining them;
//! below it, it takes free ones. A joining member thus gets its share within
//! a few heartbeats plus the drain of the partitions it takes; a member that
//! leaves releases at once; a crashed member's partitions are free one lease
//! after its last renewal.
//!
//! **Fencing.** A lease renewed by a request sent at `t` cannot expire on
//! the server before `t + lease`; the member treats it as lost at
//! `t + 4/5 lease` ([`Ownership::set_lease_deadline`], `t` read on [`lease_clock`]): from then no attempt of the
//! partition starts and no running handler is polled again, even if the
//! process was frozen (SIGSTOP) and wakes before this coordinator runs.
//! **Order on takeover.** Each owner consumes through a durable consumer of
//! its own, named after its lease revision (`<durable>[-p<n>]-g<revision>`).
//! The new owner creates its consumer at the previous owner's ack floor
//! and deletes the previous one, so unsettled messages come again first, in
//! stream order, never after newer versions, and a member that lost its
//! lease while frozen or cut off can pull nothing more: its consumer is gone.

use std::collections::{BTreeMap, HashMap};
use std::future::IntoFuture;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::kv;
use async_nats::jetstream::{self, AckKind};
use async_trait::async_trait;
use bytes::Bytes;
use eventbus_core::{
    Acker, BackendSubscription, Delivery, Error, ErrorKind, GroupAssignment, Message, Ownership, Position,
    ProvisionStrategy, Result, SubscribeSpec, fair_share, lease_clock,
};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::NatsConfig;
use crate::topology::{self, api};

/// Shortest lease (`consumer.lease_ms`), in ms: members renew every fifth of it.
pub(crate) const MIN_LEASE_MS: u64 = 500;

/// Deliveries fetched ahead of the bus, per subscription (count).
const CHANNEL: usize = 256;

/// Reply subjects of the messages this member fetched and has not settled,
/// by stream sequence, with their partition and the lease revision they
/// were fetched under (a settlement of an earlier holding of the partition
/// must not touch a later copy).
type Unsettled = Arc<Mutex<HashMap<u64, Held, foldhash::fast::RandomState>>>;

/// One unsettled message's entry in [`Unsettled`].
#[derive(Clone)]
struct Held {
    partition: u32,
    generation: u64,
    reply: async_nats::Subject,
}

/// Opens the lease bucket, creating it when `provision` creates.
///
/// # Errors
/// [`NotFound`](ErrorKind::NotFound) when it is missing and may not be
/// created; [`Conflict`](ErrorKind::Conflict) when its `max_age` is not
/// `consumer.lease_ms` (the members of one bucket must agree on the lease).
pub(crate) async fn lease_bucket(js: &jetstream::Context, config: &NatsConfig) -> Result<kv::Store> {
    let name = &config.consumer.groups_bucket;
    if config.consumer.lease_ms < MIN_LEASE_MS {
        return Err(Error::config(format!(
            "consumer.lease_ms is {} ms; at least {MIN_LEASE_MS} ms (0 would make leases never expire)",
            config.consumer.lease_ms
        )));
    }
    let lease = Duration::from_millis(config.consumer.lease_ms);
    let store = match js.get_key_value(name).await {
        Ok(store) => store,
        Err(e)
            if !matches!(
                config.provision,
                ProvisionStrategy::CreateOnly | ProvisionStrategy::CreateOrUpdate
            ) =>
        {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("the group-lease bucket {name} does not exist (create it with max_age = consumer.lease_ms)"),
            )
            .with_source(e));
        }
        Err(_) => {
            // The key-value stream as the KV API makes it, created directly:
            // async-nats' `create_key_value` cannot read nats-server 2.9's
            // account info.
            js.create_stream(jetstream::stream::Config {
                name: format!("KV_{name}"),
                description: Some("eventbus consumer-group members and partition leases".into()),
                subjects: vec![format!("$KV.{name}.>")],
                max_messages_per_subject: 1,
                max_age: lease,
                storage: jetstream::stream::StorageType::File,
                // As replicated as the most replicated stream, so losing a
                // node does not lose the leases of the topics it outlives.
                num_replicas: config
                    .streams
                    .iter()
                    .map(|s| s.replicas)
                    .chain([config.topic_streams.replicas])
                    .max()
                    .unwrap_or(1),
                allow_rollup: true,
                deny_delete: true,
                allow_direct: true,
                discard: jetstream::stream::DiscardPolicy::New,
                ..Default::default()
            })
            .await
            .map_err(|e| api("create the group-lease bucket", e))?;
            js.get_key_value(name)
                .await
                .map_err(|e| api("open the group-lease bucket", e))?
        }
    };
    let mut stream = store.stream.clone();
    let have = stream
        .info()
        .await
        .map_err(|e| api("group-lease bucket info", e))?
        .config
        .max_age;
    if have != lease {
        return Err(Error::new(
            ErrorKind::Conflict,
            format!(
                "the group-lease bucket {name} expires keys after {} ms, but consumer.lease_ms is {} ms",
                have.as_millis(),
                lease.as_millis()
            ),
        ));
    }
    Ok(store)
}

/// What a member needs from its backend.
#[derive(Clone)]
pub(crate) struct GroupContext {
    pub(crate) client: async_nats::Client,
    pub(crate) js: jetstream::Context,
    pub(crate) config: NatsConfig,
    pub(crate) bucket: kv::Store,
    /// The connection's events: a reconnect makes every owned partition
    /// start again from its ack floor.
    pub(crate) events: tokio::sync::broadcast::Sender<crate::connect::ConnectionEvent>,
}

/// Joins (group, topic) and starts the member's coordinator.
///
/// # Errors
/// [`NotFound`](ErrorKind::NotFound) when no stream stores the topic's subject.
pub(crate) async fn subscribe(
    ctx: GroupContext,
    spec: &SubscribeSpec,
) -> Result<Box<dyn BackendSubscription>> {
    let layout = Layout::new(&ctx.config, &spec.topic, &spec.group);
    let subject = layout.subject(0);
    topology::stream_name_of(&ctx.js, &subject).await?;
    let (tx, rx) = mpsc::channel(CHANNEL);
    let unsettled: Unsettled = Arc::new(Mutex::new(HashMap::default()));
    let view = Arc::new(Mutex::new(GroupAssignment {
        partition_count: layout.count(),
        ..GroupAssignment::default()
    }));
    let lease = Duration::from_millis(ctx.config.consumer.lease_ms);
    let ack_wait = Duration::from_millis(ctx.config.consumer.ack_wait_ms);
    let keep_alive = tokio::spawn(keep_alive(
        ctx.client.clone(),
        unsettled.clone(),
        (ack_wait / 3).max(Duration::from_millis(10)),
    ));
    let stop = CancellationToken::new();
    let lag = eventbus_core::MeasuredLag::new();
    let member = Member {
        // UUIDv7 starts with the time: members sort by age, so the oldest
        // keep what they own (a standby or a new member gets the rest).
        id: uuid::Uuid::now_v7().simple().to_string(),
        ctx: ctx.clone(),
        layout,
        lease,
        tx,
        unsettled,
        view: view.clone(),
        owned: BTreeMap::new(),
        lag: lag.clone(),
        lag_measured: None,
    };
    let coordinator = tokio::spawn(member.run(stop.clone()));
    Ok(Box::new(GroupSubscription {
        rx,
        lag,
        stop,
        coordinator: Some(coordinator),
        keep_alive,
        view,
        leave_bound: lease * 2 + Duration::from_secs(5),
    }))
}

/// Subjects, consumer names and lease keys of one (group, topic).
pub(crate) struct Layout {
    prefix: String,
    topic: String,
    durable: String,
    partitioned: Option<u32>,
}

impl Layout {
    /// The layout of `group` on `topic` under `config`.
    pub(crate) fn new(config: &NatsConfig, topic: &str, group: &str) -> Self {
        Self {
            prefix: config.subject_prefix.clone(),
            topic: topic.to_owned(),
            durable: topology::durable_name(group, topic),
            partitioned: config.partitions_of(topic),
        }
    }

    /// Whether the topic is split into partition subjects.
    pub(crate) fn partitioned(&self) -> bool {
        self.partitioned.is_some()
    }

    pub(crate) fn count(&self) -> u32 {
        self.partitioned.unwrap_or(1)
    }

    pub(crate) fn subject(&self, p: u32) -> String {
        match self.partitioned {
            Some(_) => topology::partition_subject(&self.prefix, &self.topic, p),
            None => topology::subject(&self.prefix, &self.topic),
        }
    }

    /// The durable consumer names of partition `p` start with this; each
    /// owner's consumer ends with the revision of its lease, so a member
    /// that lost its lease can only pull from a consumer that no longer
    /// exists.
    fn consumer_prefix(&self, p: u32) -> String {
        match self.partitioned {
            Some(_) => format!("{}-p{p}-g", self.durable),
            None => format!("{}-g", self.durable),
        }
    }

    /// The generation of a consumer name of partition `p`: its lease
    /// revision; 0 for the name an unpartitioned topic had before leases
    /// (taken over like any other); `None` for another partition's or group's.
    pub(crate) fn generation(&self, p: u32, name: &str) -> Option<u64> {
        if self.partitioned.is_none() && name == self.durable {
            return Some(0);
        }
        name.strip_prefix(&self.consumer_prefix(p))?.parse().ok()
    }

    fn lease_key(&self, p: u32) -> String {
        format!("{}.p.{p}", self.durable)
    }

    fn member_key(&self, id: &str) -> String {
        format!("{}.m.{id}", self.durable)
    }
}

/// A partition this member holds.
struct Owned {
    /// The lease's current revision (moves at each renewal).
    revision: u64,
    /// The revision the lease was taken at: names the consumer and tags
    /// the unsettled messages of this holding.
    generation: u64,
    ownership: Ownership,
    fetch: Fetcher,
    /// Set when a rebalance gives it up: no new attempt starts, running ones finish.
    draining_since: Option<Instant>,
    /// When the request that last wrote the lease (take or renewal) was
    /// sent, on [`lease_clock`] (a suspend since counts).
    written_at: Duration,
    /// Revoked by a disconnect: restarted from the ack floor on reconnect
    /// (not released when its fetch task ends meanwhile).
    suspended: bool,
}

/// A partition's fetch task, aborted on drop.
struct Fetcher(JoinHandle<()>);

impl Fetcher {
    /// Aborts the task and waits until it no longer runs, so it cannot
    /// record another unsettled message after this returns.
    async fn stop(mut self) {
        self.0.abort();
        let _ = (&mut self.0).await;
    }
}

impl Drop for Fetcher {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One member's coordinator: leases, rebalance, one fetch task per owned partition.
struct Member {
    id: String,
    ctx: GroupContext,
    layout: Layout,
    lease: Duration,
    tx: mpsc::Sender<Result<Delivery>>,
    unsettled: Unsettled,
    view: Arc<Mutex<GroupAssignment>>,
    owned: BTreeMap<u32, Owned>,
    /// This member's lag, measured at most every [`LAG_EVERY`].
    lag: Arc<eventbus_core::MeasuredLag>,
    lag_measured: Option<Instant>,
}

/// How often a member measures its lag (one consumer-info request per owned partition).
const LAG_EVERY: Duration = Duration::from_secs(1);

impl Member {
    /// Sums pending and ack-pending messages of every partition this member
    /// holds (its consumers' info); left as it was when a request fails.
    async fn measure_lag(&mut self) {
        if self.lag_measured.is_some_and(|t| t.elapsed() < LAG_EVERY) {
            return;
        }
        self.lag_measured = Some(Instant::now());
        let mut total = 0u64;
        let held: Vec<(u32, u64)> = self.owned.iter().map(|(p, o)| (*p, o.generation)).collect();
        for (p, generation) in held {
            let name = format!("{}{generation}", self.layout.consumer_prefix(p));
            let subject = self.layout.subject(p);
            let js = self.ctx.js.clone();
            let info = self
                .bounded("lag measurement", async move {
                    let stream = js.stream_by_subject(subject).await.map_err(|e| e.to_string())?;
                    let stream = js.get_stream(&stream).await.map_err(|e| e.to_string())?;
                    stream.consumer_info(&name).await.map_err(|e| e.to_string())
                })
                .await;
            match info {
                Some(info) => total += info.num_pending + info.num_ack_pending as u64,
                None => return,
            }
        }
        self.lag.set(total);
    }
    fn heartbeat(&self) -> Duration {
        self.lease / 5
    }

    /// How long after sending a renewal the lease still counts as held here.
    fn held_for(&self) -> Duration {
        self.lease * 4 / 5
    }

    async fn run(mut self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.heartbeat());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut events = self.ctx.events.subscribe();
        let mut reconnected = false;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
                event = events.recv() => {
                    use crate::connect::ConnectionEvent;
                    use tokio::sync::broadcast::error::RecvError;
                    match event {
                        Ok(ConnectionEvent::Disconnected) => {
                            // Messages may be lost in flight from now on: no
                            // queued message of these holdings may start, or
                            // a newer version could run before a lost one.
                            self.suspend();
                            reconnected = true;
                        }
                        Ok(ConnectionEvent::Connected) | Err(RecvError::Lagged(_)) => {
                            self.suspend();
                            self.restart_after_reconnect().await;
                            reconnected = false;
                        }
                        Ok(_) | Err(RecvError::Closed) => {}
                    }
                    continue;
                }
            }
            self.round().await;
            if std::mem::take(&mut reconnected) {
                self.restart_after_reconnect().await;
            }
        }
        self.leave().await;
    }

    /// After a reconnect, every partition this member still holds starts
    /// again from its ack floor on a fresh consumer: messages the server
    /// delivered while the connection was down never arrived here, and the
    /// server would redeliver them only after `ack_wait`, behind newer
    /// versions. Queued messages of the old holding do not start (they come
    /// again from the new consumer).
    /// Revokes every active holding at once (no queued message starts);
    /// they are restarted by [`restart_after_reconnect`](Member::restart_after_reconnect).
    fn suspend(&mut self) {
        for o in self.owned.values_mut() {
            if o.draining_since.is_none() {
                o.ownership.revoke();
                o.suspended = true;
            }
        }
    }

    async fn restart_after_reconnect(&mut self) {
        let held: Vec<u32> = self
            .owned
            .iter()
            .filter(|(_, o)| o.suspended && !o.ownership.is_expired())
            .map(|(p, _)| *p)
            .collect();
        for p in held {
            let Some(o) = self.owned.remove(&p) else { continue };
            let Some((revision, written_at)) = self.stop_holding(p, o, "reconnected").await else {
                continue;
            };
            // The same lease, a new holding: its consumer is named after the
            // lease's current revision, newer than the old consumer's.
            if let Err(e) = self.take(p, revision, written_at).await {
                tracing::warn!(topic = %self.layout.topic, partition = p, error = %e, "cannot consume a partition after a reconnect");
                let key = self.layout.lease_key(p);
                let bucket = self.ctx.bucket.clone();
                self.bounded(
                    "lease release",
                    bucket.delete_expect_revision(&key, Some(revision)),
                )
                .await;
            }
        }
    }

    /// Bounds one request to the server by a heartbeat.
    async fn bounded<T, E: std::fmt::Display>(
        &self,
        what: &str,
        f: impl Future<Output = std::result::Result<T, E>>,
    ) -> Option<T> {
        match tokio::time::timeout(self.heartbeat().max(Duration::from_millis(200)), f).await {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                tracing::debug!(topic = %self.layout.topic, error = %e, "{what} failed");
                None
            }
            Err(_) => {
                tracing::debug!(topic = %self.layout.topic, "{what} timed out");
                None
            }
        }
    }

    /// One request's bound: a heartbeat, at least 200 ms.
    fn request_bound(&self) -> Duration {
        self.heartbeat().max(Duration::from_millis(200))
    }

    async fn round(&mut self) {
        // A lease past its deadline is lost (draining or not): stop at once.
        let expired: Vec<u32> = self
            .owned
            .iter()
            .filter(|(_, o)| o.ownership.is_expired())
            .map(|(p, _)| *p)
            .collect();
        for p in expired {
            self.lose(p, "lease expired").await;
        }
        // A consumer gone under an active partition: hand it back, take it again later.
        let gone: Vec<u32> = self
            .owned
            .iter()
            .filter(|(_, o)| o.draining_since.is_none() && !o.suspended && o.fetch.0.is_finished())
            .map(|(p, _)| *p)
            .collect();
        for p in gone {
            self.release(p, "consumer gone").await;
        }
        self.renew().await;
        self.measure_lag().await;
        let bucket = self.ctx.bucket.clone();
        let member_key = self.layout.member_key(&self.id);
        self.bounded("member heartbeat", bucket.put(&member_key, Bytes::new()))
            .await;
        // Who is in the group, and this member's share.
        let Some(members) = self.members().await else {
            return;
        };
        let index = members
            .iter()
            .position(|m| *m == self.id)
            .unwrap_or(members.len());
        let count = self.layout.count();
        let target = fair_share(count, members.len().max(index + 1), index) as usize;
        self.show(members.len().max(index + 1));
        // Finish drains: no attempt left, or the revoke timeout passed.
        let limit = Duration::from_millis(self.ctx.config.consumer.revoke_timeout_ms);
        let drained: Vec<u32> = self
            .owned
            .iter()
            .filter_map(|(p, o)| {
                let since = o.draining_since?;
                (o.ownership.running_attempts() == 0 || since.elapsed() >= limit).then_some(*p)
            })
            .collect();
        for p in drained {
            self.release(p, "rebalance").await;
        }
        // Give up partitions above the share: drain them first (the lease
        // is renewed meanwhile; queued messages will not start).
        let active: Vec<u32> = self
            .owned
            .iter()
            .filter(|(_, o)| o.draining_since.is_none())
            .map(|(p, _)| *p)
            .collect();
        for p in active.iter().rev().take(active.len().saturating_sub(target)) {
            if let Some(o) = self.owned.get_mut(p) {
                tracing::info!(topic = %self.layout.topic, partition = *p, "draining a partition for a rebalance");
                o.ownership.revoke();
                o.draining_since = Some(Instant::now());
            }
        }
        // Take free partitions below the share, starting at an offset so
        // members do not all race for the same one.
        let mut need = target.saturating_sub(active.len());
        let start = (index as u32)
            .wrapping_mul(count / (members.len().max(1) as u32))
            .min(count);
        for i in 0..count {
            if need == 0 {
                break;
            }
            let p = (start + i) % count;
            if self.owned.contains_key(&p) {
                continue;
            }
            let sent = lease_clock();
            let Some(revision) = self.claim(p).await else {
                continue;
            };
            match self.take(p, revision, sent).await {
                Ok(()) => need -= 1,
                Err(e) => {
                    tracing::warn!(topic = %self.layout.topic, partition = p, error = %e, "cannot consume a claimed partition");
                    let _ = self.tx.try_send(Err(e));
                    let key = self.layout.lease_key(p);
                    self.bounded(
                        "lease release",
                        bucket.delete_expect_revision(&key, Some(revision)),
                    )
                    .await;
                }
            }
        }
        self.show(members.len().max(index + 1));
    }

    /// Renews every held lease, concurrently, each bounded by a request
    /// bound. A renewal refused because the revision moved is checked
    /// against the key: still ours (an earlier renewal that timed out here
    /// but was stored) keeps the lease at its old deadline, else it is lost.
    async fn renew(&mut self) {
        let bucket = self.ctx.bucket.clone();
        let bound = self.request_bound();
        let id = Bytes::from(self.id.clone());
        let renewals = self.owned.iter().map(|(p, o)| {
            let (bucket, key, id, revision, p) = (
                bucket.clone(),
                self.layout.lease_key(*p),
                id.clone(),
                o.revision,
                *p,
            );
            async move {
                let sent = lease_clock();
                let outcome = tokio::time::timeout(bound, bucket.update(&key, id, revision)).await;
                (p, sent, outcome)
            }
        });
        for (p, sent, outcome) in futures::future::join_all(renewals).await {
            match outcome {
                Ok(Ok(revision)) => {
                    let until = sent + self.held_for();
                    if let Some(o) = self.owned.get_mut(&p) {
                        o.revision = revision;
                        o.written_at = sent;
                        o.ownership.set_lease_deadline(until);
                    }
                }
                Ok(Err(e)) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    match self.ours(p).await {
                        Some(revision) => {
                            if let Some(o) = self.owned.get_mut(&p) {
                                o.revision = revision;
                            }
                        }
                        None => self.lose(p, "lease taken by another member").await,
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(topic = %self.layout.topic, partition = p, error = %e, "lease renewal failed")
                }
                Err(_) => {
                    tracing::warn!(topic = %self.layout.topic, partition = p, "lease renewal timed out")
                }
            }
        }
    }

    /// The revision of `p`'s lease when the server says this member holds it.
    async fn ours(&self, p: u32) -> Option<u64> {
        let key = self.layout.lease_key(p);
        let entry = self.bounded("lease read", self.ctx.bucket.entry(key)).await??;
        (entry.operation == kv::Operation::Put && entry.value == self.id.as_bytes()).then_some(entry.revision)
    }

    /// Takes `p`'s lease if it is free: its revision, or `None` when held
    /// (by another member, or by this one's earlier holding) or when the
    /// answer was lost. A claim stored but unanswered is not adopted: its
    /// write time is unknown here, and an earlier lease of this member read
    /// back could be close to expiring; it expires and is claimed again.
    async fn claim(&self, p: u32) -> Option<u64> {
        let key = self.layout.lease_key(p);
        let created = tokio::time::timeout(
            self.request_bound(),
            self.ctx.bucket.create(&key, Bytes::from(self.id.clone())),
        )
        .await;
        match created {
            Ok(Ok(revision)) => Some(revision),
            _ => None,
        }
    }

    /// Live member ids, sorted: keys `<durable>.m.*` the server still holds.
    async fn members(&self) -> Option<Vec<String>> {
        let filter = format!("{}{}", self.ctx.bucket.prefix, self.layout.member_key("*"));
        let prefix = format!("{}{}", self.ctx.bucket.prefix, self.layout.member_key(""));
        let mut info = self
            .bounded("member list", self.ctx.bucket.stream.info_with_subjects(filter))
            .await?;
        let mut members = Vec::new();
        while let Some(item) = info.next().await {
            match item {
                Ok((subject, _)) => members.extend(subject.strip_prefix(&prefix).map(str::to_owned)),
                Err(e) => {
                    tracing::debug!(error = %e, "member list failed");
                    return None;
                }
            }
        }
        if !members.contains(&self.id) {
            members.push(self.id.clone());
        }
        members.sort();
        Some(members)
    }

    fn show(&self, members: usize) {
        let owned: Vec<u32> = self
            .owned
            .iter()
            .filter(|(_, o)| o.draining_since.is_none())
            .map(|(p, _)| *p)
            .collect();
        let mut view = self.view.lock().unwrap();
        if view.owned != owned {
            view.rebalances += 1;
            metrics::counter!("eventbus_rebalances_total", "backend" => "nats").increment(1);
            view.owned = owned;
        }
        view.members = members;
    }

    /// Starts consuming partition `p`, whose lease (revision `revision`)
    /// was written at `sent` (on [`lease_clock`]); bounded by the lease's
    /// local deadline.
    async fn take(&mut self, p: u32, revision: u64, sent: Duration) -> Result<()> {
        let ownership = Ownership::new();
        let deadline = sent + self.held_for();
        ownership.set_lease_deadline(deadline);
        let remaining = deadline.saturating_sub(lease_clock());
        let started = tokio::time::timeout(remaining, async {
            let consumer = self.consumer(p, revision, &ownership).await?;
            consumer.messages().await.map_err(|e| api("pull", e))
        })
        .await;
        let messages = match started {
            Ok(Ok(messages)) => messages,
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(Error::timeout(format!(
                    "partition {p} of {}: its consumer was not ready before the lease deadline",
                    self.layout.topic
                )));
            }
        };
        tracing::info!(topic = %self.layout.topic, partition = p, "partitions assigned");
        let fetch = tokio::spawn(fetch(
            messages,
            p,
            revision,
            self.layout.topic.clone(),
            ownership.clone(),
            self.unsettled.clone(),
            self.tx.clone(),
        ));
        self.owned.insert(
            p,
            Owned {
                revision,
                generation: revision,
                ownership,
                fetch: Fetcher(fetch),
                draining_since: None,
                written_at: sent,
                suspended: false,
            },
        );
        Ok(())
    }

    /// A new durable consumer of partition `p` for the lease of revision
    /// `revision`, starting at the ack floor of the previous owner's
    /// consumer, which is deleted: this member holds the lease, so nobody
    /// else may consume the partition, and a member that lost its lease
    /// while cut off or frozen finds its consumer gone (its pull requests
    /// cannot receive anything more). Unacked messages of the previous owner
    /// come again first, in stream order.
    async fn consumer(
        &self,
        p: u32,
        revision: u64,
        ownership: &Ownership,
    ) -> Result<jetstream::consumer::Consumer<pull::Config>> {
        let subject = self.layout.subject(p);
        let js = &self.ctx.js;
        let stream_name = topology::stream_name_of(js, &subject).await?;
        let stream = js
            .get_stream(&stream_name)
            .await
            .map_err(|e| api("get stream", e))?;
        let mut previous: Vec<(u64, String)> = Vec::new();
        let mut names = stream.consumer_names();
        while let Some(name) = names.next().await {
            let name = name.map_err(|e| api("consumer names", e))?;
            if let Some(generation) = self.layout.generation(p, &name) {
                previous.push((generation, name));
            }
        }
        previous.sort();
        // Revisions are unique per write: an equal one is this holding's own
        // consumer (restarted after a reconnect), a higher one a newer owner's.
        if previous.last().is_some_and(|(g, _)| *g > revision) {
            // A later owner exists: this claim is stale (its lease lapsed
            // while it was being taken). Never touch the newer consumer.
            return Err(Error::new(
                ErrorKind::Conflict,
                format!("partition {p} of {} has a newer owner", self.layout.topic),
            ));
        }
        // The latest previous consumer that still exists gives the start.
        let mut deliver_policy = None;
        for (_, name) in previous.iter().rev() {
            let info = match stream.consumer_info(name).await {
                Ok(info) => info,
                Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => continue,
                Err(e) => return Err(api("consumer info", e)),
            };
            // A consumer created at a start sequence reports an ack floor
            // of 0 until its first ack: never go below its start.
            let created_at = match info.config.deliver_policy {
                DeliverPolicy::ByStartSequence { start_sequence } => start_sequence,
                _ => 1,
            };
            let start_sequence = (info.ack_floor.stream_sequence + 1).max(created_at);
            if info.num_ack_pending > 0 {
                tracing::info!(consumer = %name, start_sequence, "rewinding to the previous owner's ack floor");
            }
            deliver_policy = Some(DeliverPolicy::ByStartSequence { start_sequence });
            break;
        }
        let deliver_policy = match (deliver_policy, previous.is_empty()) {
            (Some(policy), _) => policy,
            (None, true) => DeliverPolicy::All,
            // Listed, then gone before it could be read: try again later
            // rather than replay the whole partition.
            (None, false) => {
                return Err(Error::new(
                    ErrorKind::Conflict,
                    format!(
                        "partition {p} of {}: the previous consumer vanished",
                        self.layout.topic
                    ),
                ));
            }
        };
        if ownership.is_lost() {
            return Err(Error::timeout(format!(
                "partition {p} of {}: the lease ended while taking it",
                self.layout.topic
            )));
        }
        let durable = format!("{}{revision}", self.layout.consumer_prefix(p));
        let delete = |name: String| {
            let stream = stream.clone();
            async move {
                match stream.delete_consumer(&name).await {
                    Ok(_) => Ok(()),
                    Err(e)
                        if matches!(e.kind(), jetstream::stream::ConsumerErrorKind::JetStream(ref js)
                            if js.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND) =>
                    {
                        Ok(())
                    }
                    Err(e) => Err(api("delete consumer", e)),
                }
            }
        };
        // This holding's own consumer (restarted after a reconnect, same
        // revision) must go before it is created again under its name.
        if previous.iter().any(|(_, name)| *name == durable) {
            delete(durable.clone()).await?;
        }
        let consumer = &self.ctx.config.consumer;
        let config = pull::Config {
            durable_name: Some(durable.clone()),
            filter_subject: subject,
            deliver_policy,
            ack_policy: AckPolicy::Explicit,
            ack_wait: Duration::from_millis(consumer.ack_wait_ms),
            max_ack_pending: match self.layout.partitioned {
                Some(_) => consumer.max_ack_pending_per_partition,
                None => consumer.max_ack_pending,
            },
            max_deliver: -1,
            ..Default::default()
        };
        // Create first, then delete the previous ones: if anything fails in
        // between, the partition still has a consumer holding its ack floor
        // (never a replay from the start).
        let created = stream
            .create_consumer(config)
            .await
            .map_err(|e| api("create consumer", e))?;
        for (_, name) in previous {
            if name != durable {
                delete(name).await?;
            }
        }
        Ok(created)
    }

    /// Stops consuming `p` at once: its lease is gone (or past its local
    /// deadline). No attempt starts, running ones are cancelled, nothing is
    /// settled, and the lease is left to expire on the server (deleting it
    /// could let another member start while a cancelled handler is still
    /// being dropped).
    async fn lose(&mut self, p: u32, why: &str) {
        let Some(o) = self.owned.remove(&p) else { return };
        o.ownership.revoke();
        o.ownership
            .stop_running(std::time::Instant::now(), Duration::ZERO);
        o.fetch.stop().await;
        self.forget(p, o.generation);
        tracing::info!(topic = %self.layout.topic, partition = p, reason = why, "partitions revoked");
    }

    /// Hands `p` over: no attempt starts, running ones are cancelled (they
    /// had their drain; waits at most one second for them to stop), acks
    /// are pushed out, then the lease is deleted so the next owner can take
    /// it at once. A handler that would not stop keeps the lease until it
    /// expires instead.
    async fn release(&mut self, p: u32, why: &str) {
        let Some(o) = self.owned.remove(&p) else { return };
        let stopped = self.stop_holding(p, o, why).await;
        self.bounded("flush", self.ctx.client.flush()).await;
        let Some((revision, _)) = stopped else {
            return;
        };
        let key = self.layout.lease_key(p);
        let bucket = self.ctx.bucket.clone();
        self.bounded(
            "lease release",
            bucket.delete_expect_revision(&key, Some(revision)),
        )
        .await;
    }

    /// Ends holding `o` of `p`: no attempt starts, running ones are
    /// cancelled (waiting at most one second for them), the fetch task
    /// stops and its unsettled messages are no longer kept alive. The
    /// lease's (revision, write time) when nothing runs any more; `None`
    /// when a handler would not stop (its lease is left to expire).
    async fn stop_holding(&self, p: u32, o: Owned, why: &str) -> Option<(u64, Duration)> {
        o.ownership.revoke();
        if o.ownership.running_attempts() > 0 {
            o.ownership
                .stop_running(std::time::Instant::now(), Duration::ZERO);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
            while o.ownership.running_attempts() > 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        o.fetch.stop().await;
        self.forget(p, o.generation);
        tracing::info!(topic = %self.layout.topic, partition = p, reason = why, "partitions revoked");
        if o.ownership.running_attempts() > 0 {
            tracing::warn!(topic = %self.layout.topic, partition = p, "a handler did not stop; its lease is left to expire");
            return None;
        }
        Some((o.revision, o.written_at))
    }

    /// Stops keeping `p`'s unsettled messages of holding `generation`
    /// alive: the next owner gets them.
    fn forget(&self, p: u32, generation: u64) {
        self.unsettled
            .lock()
            .unwrap()
            .retain(|_, h| !(h.partition == p && h.generation == generation));
    }

    /// Leaves the group (on close, after the bus drained its handlers):
    /// releases every partition and removes the member key.
    async fn leave(&mut self) {
        let partitions: Vec<u32> = self.owned.keys().copied().collect();
        for p in partitions {
            self.release(p, "leaving the group").await;
        }
        let subject = format!("{}{}", self.ctx.bucket.prefix, self.layout.member_key(&self.id));
        self.bounded(
            "member removal",
            self.ctx.bucket.stream.purge().filter(subject).into_future(),
        )
        .await;
        self.show(0);
    }
}

/// Pulls one partition's messages into the subscription's channel until
/// aborted, the consumer goes away, or the subscription is dropped.
async fn fetch(
    mut messages: pull::Stream,
    partition: u32,
    generation: u64,
    topic: String,
    ownership: Ownership,
    unsettled: Unsettled,
    tx: mpsc::Sender<Result<Delivery>>,
) {
    while let Some(next) = messages.next().await {
        if ownership.is_lost() {
            // The lease ended (or the partition is draining): whatever comes
            // now stays unacked for the next owner, who recreates the consumer.
            return;
        }
        let item = match next {
            Ok(m) => match delivery(m, (partition, generation), &topic, &ownership, &unsettled) {
                Some(d) => Ok(d),
                None => continue,
            },
            Err(e) => {
                let end = matches!(
                    e.kind(),
                    pull::MessagesErrorKind::ConsumerDeleted
                        | pull::MessagesErrorKind::PushBasedConsumer
                        | pull::MessagesErrorKind::NoResponders
                );
                let err = api("pull", e);
                if end {
                    // The coordinator sees this task end and takes the partition again (rewound).
                    let _ = tx.send(Err(err)).await;
                    return;
                }
                Err(err)
            }
        };
        if tx.send(item).await.is_err() {
            return;
        }
    }
}

/// The delivery of `m`; `None` for a redelivered copy of a message this
/// member still holds (it must not be queued twice).
fn delivery(
    m: jetstream::Message,
    (partition, generation): (u32, u64),
    topic: &str,
    ownership: &Ownership,
    unsettled: &Unsettled,
) -> Option<Delivery> {
    let (position, delivery_count, sequence) = match m.info() {
        Ok(info) => (
            Some(Position::Sequence(info.stream_sequence)),
            info.delivered.max(1) as u64,
            Some(info.stream_sequence),
        ),
        Err(_) => (None, 1, None),
    };
    if let (Some(seq), Some(reply)) = (sequence, m.message.reply.clone()) {
        let mut unsettled = unsettled.lock().unwrap();
        if unsettled.contains_key(&seq) {
            tracing::debug!(seq, "dropping a redelivered copy of a message still in flight");
            return None;
        }
        unsettled.insert(
            seq,
            Held {
                partition,
                generation,
                reply,
            },
        );
    }
    let headers = crate::backend::headers_of(m.message.headers.as_ref());
    let message = Message {
        topic: topic.to_owned(),
        key: None,
        headers,
        payload: m.message.payload.clone(),
        dedup_id: None,
    };
    Some(Delivery {
        message,
        position,
        delivery_count,
        acker: Box::new(NatsAcker {
            message: m,
            sequence,
            generation,
            unsettled: unsettled.clone(),
        }),
        ownership: Some(ownership.clone()),
    })
}

/// Sends `+WPI` for every unsettled message every `every`: one timer per
/// subscription, not one per message. Ends when the subscription closes.
async fn keep_alive(client: async_nats::Client, unsettled: Unsettled, every: Duration) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let replies: Vec<async_nats::Subject> = unsettled
            .lock()
            .unwrap()
            .values()
            .map(|h| h.reply.clone())
            .collect();
        for reply in replies {
            if let Err(e) = client.publish(reply, Bytes::from_static(b"+WPI")).await {
                tracing::debug!(error = %e, "in-progress ack failed");
            }
        }
    }
}

/// One member of a group, as the bus's source of deliveries.
struct GroupSubscription {
    rx: mpsc::Receiver<Result<Delivery>>,
    /// Pending plus ack-pending of the owned partitions' consumers.
    lag: Arc<eventbus_core::MeasuredLag>,
    stop: CancellationToken,
    coordinator: Option<JoinHandle<()>>,
    keep_alive: JoinHandle<()>,
    view: Arc<Mutex<GroupAssignment>>,
    /// Longest wait in `close` for the coordinator to leave the group.
    leave_bound: Duration,
}

impl Drop for GroupSubscription {
    /// Dropped without `close` (a crash): leases lapse on the server.
    fn drop(&mut self) {
        self.keep_alive.abort();
        if let Some(c) = self.coordinator.take() {
            c.abort();
        }
    }
}

#[async_trait]
impl BackendSubscription for GroupSubscription {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        self.rx.recv().await
    }

    fn try_next(&mut self) -> Option<Result<Delivery>> {
        self.rx.try_recv().ok()
    }

    async fn close(mut self: Box<Self>) -> Result<()> {
        self.keep_alive.abort();
        self.stop.cancel();
        let Some(mut c) = self.coordinator.take() else {
            return Ok(());
        };
        // Releasing takes a few requests per partition; a server that does
        // not answer leaves the leases to expire.
        match tokio::time::timeout(self.leave_bound, &mut c).await {
            Ok(joined) => {
                joined.map_err(|e| Error::new(ErrorKind::Backend, "group coordinator failed").with_source(e))
            }
            Err(_) => {
                c.abort();
                Err(Error::timeout(format!(
                    "leaving the group took over {} ms; its leases will expire",
                    self.leave_bound.as_millis()
                )))
            }
        }
    }

    fn assignment(&self) -> Option<Arc<Mutex<GroupAssignment>>> {
        Some(self.view.clone())
    }

    fn lag_probe(&self) -> Option<eventbus_core::LagProbe> {
        Some(self.lag.probe())
    }
}

struct NatsAcker {
    message: jetstream::Message,
    sequence: Option<u64>,
    /// The holding it was fetched under: settling it must not touch a
    /// later holding's copy of the same message.
    generation: u64,
    unsettled: Unsettled,
}

impl NatsAcker {
    /// Settles the message: it is no longer kept alive, and a later copy is
    /// a new delivery.
    async fn send(&self, kind: AckKind) -> Result<()> {
        if let Some(seq) = self.sequence {
            let mut unsettled = self.unsettled.lock().unwrap();
            if unsettled
                .get(&seq)
                .is_some_and(|h| h.generation == self.generation)
            {
                unsettled.remove(&seq);
            }
        }
        self.message
            .ack_with(kind)
            .await
            .map_err(|e| Error::new(ErrorKind::Connection, "NATS ack failed").with_source(e))
    }
}

#[async_trait]
impl Acker for NatsAcker {
    async fn ack(&self) -> Result<()> {
        self.send(AckKind::Ack).await
    }

    async fn term(&self) -> Result<()> {
        self.send(AckKind::Term).await
    }

    async fn nak(&self, delay: Option<Duration>) -> Result<()> {
        self.send(AckKind::Nak(delay)).await
    }

    // In-progress acks come from the subscription's keep-alive timer.
}
