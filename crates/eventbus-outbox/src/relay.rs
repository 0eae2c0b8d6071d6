//! [`Relay`]: publishes claimed outbox rows through any backend, in
//! per-aggregate order, and records their ACKs.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use eventbus_core::{
    DeadLetterPolicy, Envelope, EventBus, Message, PublishHandle, PublishResult, Result, RetryPolicy,
    dead_letter, headers, lease_clock,
};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::store::{Ask, Claim, OutboxRow, OutboxStore, Wakeups, now_us};

/// Relay settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelayConfig {
    /// Rows claimed per round (count). Default 500.
    pub batch_size: i64,
    /// Most rows of one aggregate a round claims (count; 0 counts as 1):
    /// its head, then, while the heads leave room in `batch_size`, up to
    /// this many minus one versions after it. With 3 or more, a claim
    /// over a deep backlog (two or more versions waiting per head, on
    /// average) takes a quarter of `batch_size` in heads first and fills
    /// the room with their versions, so fewer aggregates are in flight at
    /// once and claims walk fewer held rows (3 relays on PostgreSQL:
    /// 25–48 % more events/s, stop 37; see the README). A round publishes each
    /// aggregate's rows one after another, each only after its
    /// predecessor's ACK, and stops at the first that fails. With 1, one
    /// version per aggregate per round: an aggregate with many pending
    /// events then drains at one event per round (21 events/s each for 10
    /// aggregates with 1,000 pending each, in the outbox bench on
    /// PostgreSQL; 32 gave 380–450 each). The cost: a round publishes in
    /// waves (every aggregate's next version, then their ACKs), so it lasts
    /// up to this many waves, each as long as its slowest ACK, and its rows
    /// are marked at its end: the next versions of the other aggregates in
    /// it wait that long too. Versions of one aggregate must
    /// commit in version order, as with 1: a lower version committed after
    /// a higher one was published comes after it. Default 32.
    pub versions_per_aggregate: usize,
    /// Rounds one relay runs at once (count, at least 1): while one waits
    /// for ACKs or marks its rows, another claims and publishes other
    /// aggregates' heads. Default 2 (measured on PostgreSQL with the memory
    /// backend, 2 cores: 1 lane 18,700 events/s, 2 lanes 21,600–26,500;
    /// see the README).
    pub rounds_in_flight: usize,
    /// Wait between polls when idle, in ms (PostgreSQL also wakes on NOTIFY). Default 500.
    pub poll_interval_ms: u64,
    /// How long a claim (or the SQLite relay lease) lasts without renewal, in
    /// ms, on the database's clock. A relay renews its claims every third of
    /// it while a round waits for ACKs; a dead or frozen relay's rows are
    /// claimable again after it. Keep it well above the bus's
    /// `publish.ack_timeout_ms` (default 30,000). Default 120,000.
    pub lease_ms: u64,
    /// Publish attempts of a row (`max_attempts`, after which it is
    /// dead-lettered) and the backoff between them. Default 5 attempts,
    /// 200 ms × 2 up to 30 s, 20 % jitter.
    pub backoff: RetryPolicy,
    /// Where rows go after `backoff.max_attempts` failed publishes, besides
    /// being marked `dead_lettered` in the table. Default
    /// [`Disabled`](DeadLetterPolicy::Disabled): the table only.
    pub dead_letter: DeadLetterPolicy,
    /// Published rows are deleted after this long, in ms (by the cleanup
    /// every `cleanup_interval_ms`). Default 24 h (the Go SDK's).
    ///
    /// 0 deletes each row in the statement that would mark it published:
    /// the cheapest way for the database. A mark writes a new version of
    /// the row and an entry in each of the four indexes that keep
    /// published rows (it changes the status, which the pending indexes'
    /// predicate reads, so PostgreSQL cannot make it heap-only); a delete
    /// writes neither. Measured on PostgreSQL: 0.32 against 2.13 ms for 80
    /// rows; in the outbox bench the database's CPU per event fell from
    /// 52–66 to 25–33 µs, and one relay publishing to NATS went from
    /// 10,115–12,938 to 12,667–16,828 events/s (5 pairs; see the README).
    ///
    /// What 0 gives up:
    /// - An event id or idempotency key is forgotten once its row is
    ///   published (with 24 h an append of it is skipped within the day).
    ///   A writer that retries a committed append (its commit's answer
    ///   lost) after the relay published it publishes it again, after any
    ///   later versions of its aggregate that went out meanwhile: an
    ///   earlier version after a later one, which only a consumer's
    ///   event-id memory (`consumer.dedup_window`) or the broker's
    ///   duplicate window (JetStream's, 2 min) drops.
    /// - No published row is left to look at: `outbox status` and the
    ///   `eventbus_outbox_rows{status="published"}` gauge count none.
    /// - A delete retried after an error cannot tell rows an earlier
    ///   attempt deleted (its answer lost) from rows another relay took
    ///   over and deleted since: it counts them in `published`, not in
    ///   `lost_claims`, so two relays may both count such a row.
    pub retention_ms: u64,
    /// How often cleanup runs, in ms. Default 60,000.
    pub cleanup_interval_ms: u64,
    /// How long after shutdown [`Relay::run`] lets its database
    /// statements (claims, marks, failure records, releases, cleanup, the
    /// SQLite lease hand-over) still run, in ms: one deadline for all of
    /// them, after which each is given up (0: at once). A database that
    /// answers nothing (a frozen or partitioned server sends no error)
    /// otherwise holds shutdown until TCP gives up. Rows whose mark was
    /// given up wait out their lease and are published again (duplicates,
    /// never a gap: their aggregates' later versions wait behind them).
    /// Default 5,000.
    pub shutdown_grace_ms: u64,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            batch_size: 500,
            versions_per_aggregate: 32,
            rounds_in_flight: 2,
            poll_interval_ms: 500,
            lease_ms: 120_000,
            backoff: RetryPolicy {
                max_attempts: 5,
                initial_backoff_ms: 200,
                max_backoff_ms: 30_000,
                multiplier: 2.0,
                jitter: 0.2,
            },
            dead_letter: DeadLetterPolicy::Disabled,
            retention_ms: 24 * 3_600_000,
            cleanup_interval_ms: 60_000,
            shutdown_grace_ms: 5_000,
        }
    }
}

/// Counters of one relay.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Rows confirmed by the broker and marked published.
    pub published: AtomicU64,
    /// Failed publish attempts.
    pub failed: AtomicU64,
    /// Rows dead-lettered.
    pub dead_lettered: AtomicU64,
    /// Rounds run.
    pub rounds: AtomicU64,
    /// Results discarded because the row's claim was lost (its lease expired
    /// and another relay took it) before the result was recorded.
    pub lost_claims: AtomicU64,
    /// When the stalest lane last started a round or retried a database
    /// write of one (a sign of life through a database outage), in ms since
    /// the Unix epoch (0: never).
    pub last_round_started_ms: AtomicU64,
}

impl RelayStats {
    /// Seconds since the last round started (0 before the first: starting):
    /// a relay whose rounds stopped starting is stuck (liveness).
    pub fn seconds_since_last_round(&self) -> u64 {
        match self.last_round_started_ms.load(Ordering::Relaxed) {
            0 => 0,
            at => now_ms().saturating_sub(at) / 1000,
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Publishes outbox rows through a bus.
///
/// Each round claims the head row of each aggregate and, while the heads
/// leave room in `batch_size`, the versions right after it
/// (`versions_per_aggregate`; over a deep backlog, heads for a quarter of
/// the batch first, then their versions); it publishes the aggregates in
/// parallel and each aggregate's rows one at a time, strictly in
/// `event_version` order, each after its predecessor's ACK (at most one
/// event per aggregate in flight), marks the confirmed ones published in one statement, and
/// reschedules failures with backoff; after `backoff.max_attempts` a row is
/// dead-lettered and its aggregate moves on. A failed row blocks its
/// aggregate's later rows until then: the round publishes none after it.
#[derive(Debug)]
pub struct Relay {
    store: OutboxStore,
    bus: EventBus,
    config: RelayConfig,
    id: String,
    stats: Arc<RelayStats>,
    /// Held while a lane claims: a relay's lanes overlap their publishing,
    /// never their claims (concurrent claims scan past each other's rows).
    /// Holds what the claims saw of the backlog's depth.
    claiming: tokio::sync::Mutex<Depth>,
    /// When each lane last started a round, in ms since the Unix epoch (0: not yet).
    lanes_started: Vec<AtomicU64>,
}

impl Relay {
    /// A relay over `store` publishing through `bus`.
    pub fn new(store: OutboxStore, bus: EventBus, config: RelayConfig) -> Self {
        let lanes = config.rounds_in_flight.max(1);
        Self {
            store,
            bus,
            config,
            id: format!("relay-{}", eventbus_core::new_event_id()),
            stats: Arc::new(RelayStats::default()),
            claiming: tokio::sync::Mutex::new(Depth::default()),
            lanes_started: (0..lanes).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// This relay's counters.
    pub fn stats(&self) -> Arc<RelayStats> {
        self.stats.clone()
    }

    /// This relay's id (its claims carry it).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Runs rounds until `shutdown` is cancelled; sleeps `poll_interval_ms`
    /// when idle (PostgreSQL: or until a NOTIFY on insert).
    ///
    /// `rounds_in_flight` lanes each run claim → publish → ACKs → mark in a
    /// loop, so one lane claims while another waits for ACKs or marks, and
    /// a slow ACK holds only its own round. Order is unaffected: a claim
    /// starts each aggregate at its head, and a head exists only once every
    /// earlier version of its aggregate is settled (published after its
    /// ACK, or dead-lettered); a row waiting in another lane's round, or
    /// failed and backing off, is still pending, so its successors are not
    /// heads, and the versions a round claims after a head are ones no
    /// other round can claim while that head is pending. Two rounds
    /// therefore never hold one aggregate, and nothing is published before
    /// its predecessor's ACK.
    ///
    /// On shutdown every running round finishes, then the relay gives up
    /// its hold on the database (SQLite's relay lease), so a relay started
    /// next takes over at once rather than after `lease_ms`. Every wait
    /// after shutdown is bounded: no claim starts and no write is retried,
    /// the database statements still running or to come (a round's marks)
    /// share one deadline, `shutdown_grace_ms` after shutdown, and a
    /// round's ACKs are bounded by the bus's `publish.ack_timeout_ms`.
    ///
    /// PostgreSQL relays wake on `NOTIFY` as soon as rows commit, besides
    /// polling every `poll_interval_ms`. A lost LISTEN session (ended by
    /// the server, a restart, a database unreachable for a while) is set up
    /// again, after 100 ms then twice as long after each failure in a row,
    /// at most 5 s apart, with a round right after, for rows committed
    /// unheard; the relay polls meanwhile.
    ///
    /// # Errors
    /// None today: database errors, LISTEN's included, are logged and
    /// retried (before, a failed LISTEN setup at start returned).
    pub async fn run(&self, shutdown: CancellationToken) -> Result<()> {
        let mut wakeups = self.store.database().wakeups();
        if let Some(listening) = wakeups.as_mut() {
            // Before the first round, so rows committed during it are
            // heard; at most 10 s, and not at all after shutdown. When it
            // fails the lane sets it up later, polling meanwhile.
            tokio::select! {
                set_up = listening.listen() => if let Err(e) = set_up {
                    tracing::warn!(error = %e, "outbox LISTEN setup failed: retrying, the relay polls meanwhile");
                },
                () = shutdown.cancelled() => {}
            }
        }
        let grace_ends = OnceLock::new();
        let first = Lane {
            index: 0,
            shutdown: &shutdown,
            grace_ends: &grace_ends,
        };
        self.rejoin(&first).await;
        let mut lanes = vec![self.lane(0, &shutdown, &grace_ends, wakeups)];
        for lane in 1..self.lanes_started.len() {
            lanes.push(self.lane(lane, &shutdown, &grace_ends, None));
        }
        futures::future::join_all(lanes).await;
        // Every round has finished: hand the database over at once.
        let resign = self.store.database().resign(&self.id);
        if let Err(e) = self.within_grace(&first, "relay lease hand-over", resign).await {
            tracing::warn!(error = %e, "giving up the relay lease failed: it lapses after lease_ms");
        }
        Ok(())
    }

    /// Lane `lane` of [`run`](Self::run): rounds back to back while there
    /// is work, else a nap (woken by `wakeups` when it has them); lane 0
    /// also deletes old published rows.
    async fn lane(
        &self,
        index: usize,
        shutdown: &CancellationToken,
        grace_ends: &OnceLock<tokio::time::Instant>,
        mut wakeups: Option<Wakeups>,
    ) {
        let lane = Lane {
            index,
            shutdown,
            grace_ends,
        };
        let mut last_cleanup = tokio::time::Instant::now();
        let cleanup_every = Duration::from_millis(self.config.cleanup_interval_ms);
        while !shutdown.is_cancelled() {
            self.round_started(index);
            let busy = match self.round(&lane).await {
                Ok(n) => n > 0,
                Err(e) => {
                    tracing::warn!(error = %e, "relay round failed");
                    false
                }
            };
            if index == 0 && last_cleanup.elapsed() >= cleanup_every {
                last_cleanup = tokio::time::Instant::now();
                let retention = Duration::from_millis(self.config.retention_ms);
                match self
                    .within_grace(&lane, "cleanup", self.store.cleanup(retention))
                    .await
                {
                    Ok(n) if n > 0 => tracing::info!(deleted = n, "outbox cleanup"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "outbox cleanup failed"),
                }
            }
            if !busy {
                let poll = tokio::time::sleep(Duration::from_millis(self.config.poll_interval_ms));
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = poll => {}
                    _ = notified(&mut wakeups) => {}
                }
            }
        }
    }

    /// One round; returns the rows it claimed.
    ///
    /// The round's claim token is unique, and every status change is a
    /// compare-and-set on it and on `pending`: a relay whose claim expired
    /// (frozen, or slower than its lease) and was taken over discards its
    /// results instead of undoing the other relay's work. Claims are renewed
    /// every `lease_ms / 3` while the round waits for ACKs.
    ///
    /// # Errors
    /// `Backend` when the database fails (claimed rows are claimable again after their lease).
    pub async fn run_once(&self) -> Result<usize> {
        self.round_started(0);
        let never = CancellationToken::new();
        let lane = Lane {
            index: 0,
            shutdown: &never,
            grace_ends: &OnceLock::new(),
        };
        self.rejoin(&lane).await;
        self.round(&lane).await
    }

    /// Takes back a hold on the database this relay gave up when a run
    /// of it ended (SQLite's relay lease), so this relay may hold it again;
    /// a failure is logged, and the lease then comes back after `lease_ms`.
    async fn rejoin(&self, lane: &Lane<'_>) {
        let rejoin = self.store.database().rejoin(&self.id);
        if let Err(e) = self.within_grace(lane, "relay lease", rejoin).await {
            tracing::warn!(error = %e, "taking back the relay lease this relay gave up failed");
        }
    }

    /// Claims and finishes one round.
    async fn round(&self, lane: &Lane<'_>) -> Result<usize> {
        match self.claim(lane).await? {
            Some(round) => self.finish(lane, round).await,
            None => Ok(0),
        }
    }

    /// Records that lane `lane` starts a round. The relay's
    /// `last_round_started_ms` is its stalest lane's, so one lane stuck on
    /// a publish shows as a stuck relay even while the others run.
    fn round_started(&self, lane: usize) {
        if let Some(at) = self.lanes_started.get(lane) {
            at.store(now_ms(), Ordering::Relaxed);
        }
        let stalest = self
            .lanes_started
            .iter()
            .map(|at| at.load(Ordering::Relaxed))
            .filter(|&at| at > 0)
            .min()
            .unwrap_or(0);
        self.stats.last_round_started_ms.store(stalest, Ordering::Relaxed);
    }

    /// How long a claim lasts without renewal (`lease_ms`).
    fn lease(&self) -> Duration {
        Duration::from_millis(self.config.lease_ms)
    }

    /// How long a statement may still run after shutdown (`shutdown_grace_ms`).
    fn grace(&self) -> Duration {
        Duration::from_millis(self.config.shutdown_grace_ms)
    }

    /// Runs a database `statement` to its end, or, once `lane`'s shutdown
    /// has come, until `shutdown_grace_ms` after it (one deadline for
    /// every statement of the run, however many follow one another).
    ///
    /// # Errors
    /// The statement's, or `Timeout` when the grace ran out. The statement
    /// is dropped, though the database may still run what it was sent:
    /// every write is a compare-and-set on the claim token, so one cut off
    /// midway is safe to repeat, and a claim that commits after it was
    /// given up (and after its release) leaves its rows to their lease.
    async fn within_grace<T>(
        &self,
        lane: &Lane<'_>,
        what: &'static str,
        statement: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        tokio::pin!(statement);
        tokio::select! {
            biased;
            done = &mut statement => done,
            () = lane.shutdown.cancelled() => {
                let ends = *lane
                    .grace_ends
                    .get_or_init(|| tokio::time::Instant::now() + self.grace());
                tokio::time::timeout_at(ends, statement).await.unwrap_or_else(|_| {
                    Err(eventbus_core::Error::timeout(format!(
                        "outbox {what} did not complete within shutdown_grace_ms ({} ms) of shutdown",
                        self.config.shutdown_grace_ms
                    )))
                })
            }
        }
    }

    /// Claims the next round's rows (none: `None`, also after shutdown).
    ///
    /// The claim is given up after `lease_ms` (its rows' leases would have
    /// run out: the fence lets it publish nothing), or at the end of the
    /// shutdown grace; then it is released, but a claim the database still
    /// commits after its release leaves its rows to their lease.
    async fn claim(&self, lane: &Lane<'_>) -> Result<Option<Round>> {
        let mut depth = self.claiming.lock().await;
        // A lane that waited for the lock through the shutdown claims nothing more.
        if lane.shutdown.is_cancelled() {
            return Ok(None);
        }
        let lease = self.lease();
        let may_run = self.store.database().may_run(&self.id, lease);
        if !self.within_grace(lane, "relay lease", may_run).await? {
            return Ok(None);
        }
        let claim = format!("{}/{}", self.id, eventbus_core::new_event_id());
        // Taken before the claim is sent: the lease the database gives
        // starts later, so the fence ends no later than the lease.
        let fence = Fence::new(lease);
        let statement = self.store.claim(Ask {
            claim: &claim,
            limit: self.config.batch_size,
            per_aggregate: self.config.versions_per_aggregate.max(1),
            lease,
            probe_depth: depth.probe(),
        });
        let claimed = match tokio::time::timeout(lease, self.within_grace(lane, "claim", statement)).await {
            Ok(claimed) => claimed,
            Err(_) => Err(eventbus_core::Error::timeout(format!(
                "outbox claim did not complete within lease_ms ({} ms)",
                self.config.lease_ms
            ))),
        };
        if let Ok(claimed) = &claimed {
            depth.saw(claimed.deep);
        }
        drop(depth);
        let Claim { chains, stranded, .. } = match claimed {
            Ok(claimed) => claimed,
            Err(e) => {
                // The claim may have committed with its answer lost (the
                // database went away): give its rows back rather than let
                // them wait out their lease.
                if let Err(release) = self
                    .persist(lane, "release claim", || self.store.release(&claim))
                    .await
                {
                    tracing::warn!(error = %release, "releasing a failed claim failed: its rows wait for their lease");
                }
                return Err(e);
            }
        };
        self.stats.rounds.fetch_add(1, Ordering::Relaxed);
        // A claim holding rows in no chain only (an aggregate with two
        // heads in it) is a round too: finishing it releases them.
        Ok((!chains.is_empty() || stranded > 0).then_some(Round {
            claim,
            chains,
            stranded,
            fence,
        }))
    }

    /// Runs a database write of a round (a mark, a failure record, a claim
    /// release) until it succeeds, retrying every 50 ms doubling up to 1 s
    /// for at most `lease_ms` in all, each attempt included (an attempt on
    /// a connection that hangs is cut off at that deadline). Its rows are
    /// published (or failed) already: giving up on the first error would
    /// leave them claimed for the whole lease, their aggregates waiting,
    /// and then publish them again, beyond a broker's dedup window
    /// (JetStream's is 2 min). Every write is a compare-and-set on the
    /// claim token, so a late one cannot undo another relay's work, and an
    /// attempt cut off midway is safe to repeat. Each retry stamps the
    /// lane's liveness (a database outage is no reason to restart the
    /// relay); shutdown stops the retries, and an attempt ends by the
    /// run's grace deadline, `shutdown_grace_ms` after shutdown (the rows
    /// then wait for their lease).
    ///
    /// # Errors
    /// The last error, once `lease_ms` has passed or on shutdown.
    async fn persist<T, F>(
        &self,
        lane: &Lane<'_>,
        what: &'static str,
        mut write: impl FnMut() -> F,
    ) -> Result<T>
    where
        F: Future<Output = Result<T>>,
    {
        const RETRY: RetryPolicy = RetryPolicy {
            max_attempts: u32::MAX,
            initial_backoff_ms: 50,
            max_backoff_ms: 1_000,
            multiplier: 2.0,
            jitter: 0.2,
        };
        let deadline = tokio::time::Instant::now() + self.lease();
        let mut attempt = 1;
        loop {
            let error = match tokio::time::timeout_at(deadline, self.within_grace(lane, what, write())).await
            {
                Ok(Ok(done)) => return Ok(done),
                Ok(Err(e)) => e,
                Err(_) => eventbus_core::Error::timeout(format!(
                    "outbox {what} did not complete within lease_ms ({} ms)",
                    self.config.lease_ms
                )),
            };
            let wait = RETRY.backoff(attempt);
            if lane.shutdown.is_cancelled() || tokio::time::Instant::now() + wait >= deadline {
                return Err(error);
            }
            tracing::warn!(error = %error, attempt, "outbox {what} failed: retrying");
            tokio::select! {
                _ = lane.shutdown.cancelled() => return Err(error),
                _ = tokio::time::sleep(wait) => {}
            }
            self.round_started(lane.index);
            attempt = attempt.saturating_add(1);
        }
    }

    /// Publishes a claimed round (each chain in order, each row after its
    /// predecessor's ACK), reschedules or dead-letters the failed rows (all
    /// renewing the claim), marks the confirmed ones, then gives back the
    /// rows it held but did not publish; returns the rows it held.
    async fn finish(&self, lane: &Lane<'_>, round: Round) -> Result<usize> {
        let Round {
            claim,
            chains,
            stranded,
            fence,
        } = round;
        let lease = self.lease();
        let held = stranded + chains.iter().map(Vec::len).sum::<usize>();
        // The round's statements on its rows take turns with its renewal.
        let turn = tokio::sync::Mutex::new(());
        let turn = &turn;
        // Failures (each may wait for a dead-letter ACK) and the mark run
        // under the renewal too, so the confirmed rows of a round with many
        // failures, or a mark retried through a database outage, keep their
        // claim until they are marked (renewed between the statements'
        // attempts: each attempt holds the round's turn).
        self.renewing(&claim, lease, &fence, turn, async {
            let outcomes = self.publish_chains(&chains, &fence).await;
            let mut published = Vec::with_capacity(held);
            let mut unpublished = stranded;
            let mut failure = Ok(());
            for (row, outcome) in chains.iter().flatten().zip(outcomes.into_iter().flatten()) {
                match outcome {
                    Sent::Confirmed => published.push(row.id.clone()),
                    Sent::HeldBack => unpublished += 1,
                    // A failure record that could not be written still
                    // lets the confirmed rows be marked.
                    Sent::Failed(error) => {
                        if let Err(e) = self.failed(lane, turn, &claim, &fence, row, &error).await {
                            failure = Err(e);
                        }
                    }
                }
            }
            // `retention_ms = 0`: the mark deletes the rows (see RelayConfig).
            let delete = self.config.retention_ms == 0;
            let attempts = AtomicU32::new(0);
            let marked = self
                .persist_in_turn(lane, turn, "mark published", || {
                    attempts.fetch_add(1, Ordering::Relaxed);
                    async {
                        if delete {
                            self.store.delete_published(&claim, &published).await
                        } else {
                            self.store.mark_published(&claim, &published).await
                        }
                    }
                })
                .await?;
            let all = published.len() as u64;
            let ours = if marked == all {
                marked
            } else if !delete {
                // A retried mark finds rows an earlier attempt marked
                // before its answer was lost: ours, not another relay's.
                self.persist_in_turn(lane, turn, "count published", || {
                    self.store.count_published(&claim, &published)
                })
                .await?
            } else if attempts.load(Ordering::Relaxed) > 1 {
                // A retried delete does not find the rows an earlier
                // attempt deleted before its answer was lost. Those still
                // in the table are another relay's now; the rest count as
                // ours (another relay may have deleted some: no way to tell).
                let present = self
                    .persist_in_turn(lane, turn, "count present", || {
                        self.store.count_present(&published)
                    })
                    .await?;
                all - present.min(all)
            } else {
                // Answered on its first attempt: the rows it missed are
                // another relay's.
                marked
            };
            self.count_published(ours);
            let lost = all - ours;
            if lost > 0 {
                self.lost_claims(lost);
            }
            // Rows after a failure (or past the fence) go back at once
            // rather than wait out the lease; after the mark, so no
            // published row becomes claimable again.
            if unpublished > 0 {
                self.persist_in_turn(lane, turn, "release held-back rows", || {
                    self.store.release(&claim)
                })
                .await?;
            }
            failure
        })
        .await?;
        Ok(held)
    }

    fn count_published(&self, n: u64) {
        self.stats.published.fetch_add(n, Ordering::Relaxed);
        metrics::counter!(eventbus_core::telemetry::OUTBOX_PUBLISHED).increment(n);
    }

    /// Runs `work` while renewing `claim` every third of `lease`, beside
    /// it: a renewal waiting on the database (locked rows, a slow or
    /// failing-over server) holds none of the round's publishes. A renewal
    /// that still finds rows held, and came back before `fence` passed,
    /// moves it on; one that takes more than a third of `lease` is given
    /// up until the next. Each renewal takes `turn`, as the round's own
    /// statements on its rows do ([`Relay::persist_in_turn`]): a renewal
    /// and a mark at once lock the same rows in different orders, a
    /// deadlock PostgreSQL breaks only after `deadlock_timeout` (about 1 s).
    async fn renewing<T>(
        &self,
        claim: &str,
        lease: Duration,
        fence: &Fence,
        turn: &tokio::sync::Mutex<()>,
        work: impl Future<Output = T>,
    ) -> T {
        let every = lease / 3;
        let renewals = async {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            // After a stall, one renewal, not a burst of them.
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let _turn = turn.lock().await;
                let sent = lease_clock();
                // Bounded by the tick, so a renewal stuck in the database
                // holds the round's statements (waiting for the turn) no
                // longer than that; the next tick tries again.
                match tokio::time::timeout(every, self.store.renew(claim, lease)).await {
                    Ok(Ok(held)) if held > 0 => fence.extend(sent, lease),
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "renewing outbox claims failed"),
                    Err(_) => tracing::warn!(
                        "renewing outbox claims took more than a third of lease_ms: given up until the next tick"
                    ),
                }
            }
        };
        // The renewal first when both are ready (on waking from a pause):
        // it is sent before the next publish, which the fence decides.
        tokio::select! {
            biased;
            () = renewals => unreachable!("renewals run until the work ends"),
            out = work => out,
        }
    }

    /// [`Relay::persist`] of a statement on a round's rows: each attempt
    /// takes the round's `turn`, so it never runs beside the round's claim
    /// renewal (see [`Relay::renewing`]).
    async fn persist_in_turn<T, F>(
        &self,
        lane: &Lane<'_>,
        turn: &tokio::sync::Mutex<()>,
        what: &'static str,
        mut write: impl FnMut() -> F,
    ) -> Result<T>
    where
        F: Future<Output = Result<T>>,
    {
        self.persist(lane, what, || {
            let statement = write();
            async move {
                let _turn = turn.lock().await;
                statement.await
            }
        })
        .await
    }

    fn lost_claims(&self, n: u64) {
        self.stats.lost_claims.fetch_add(n, Ordering::Relaxed);
        metrics::counter!(eventbus_core::telemetry::OUTBOX_LOST_CLAIMS).increment(n);
        tracing::warn!(rows = n, "outbox claim lost to another relay: result discarded");
    }

    /// Publishes the chains in waves: wave k sends the k-th row of every
    /// chain whose row before it was confirmed (stage one for all, then
    /// every ACK), so within a chain each row goes out only after its
    /// predecessor's ACK, none after a failure, and none once `fence` has
    /// passed (the claim may have been taken over: a relay frozen past its
    /// lease must not publish rows another relay now holds). Chains of one
    /// row, the usual case, are one wave. One outcome per row, in the
    /// chains' shape.
    async fn publish_chains(&self, chains: &[Vec<OutboxRow>], fence: &Fence) -> Vec<Vec<Sent>> {
        let mut outcomes: Vec<Vec<Sent>> = chains.iter().map(|c| Vec::with_capacity(c.len())).collect();
        let longest = chains.iter().map(Vec::len).max().unwrap_or(0);
        let mut wave = Vec::with_capacity(chains.len());
        for k in 0..longest {
            for (i, chain) in chains.iter().enumerate() {
                let Some(row) = chain.get(k) else { continue };
                let after_confirmed = outcomes[i].last().is_none_or(|o| matches!(o, Sent::Confirmed));
                if !after_confirmed || !fence.holds() {
                    outcomes[i].push(Sent::HeldBack);
                    continue;
                }
                wave.push((i, self.send_row(row).await));
            }
            for (i, sent) in wave.drain(..) {
                let outcome = match sent {
                    Ok(handle) => confirmed(handle.await),
                    Err(error) => Err(error),
                };
                outcomes[i].push(match outcome {
                    Ok(()) => Sent::Confirmed,
                    Err(error) => Sent::Failed(error),
                });
            }
        }
        outcomes
    }

    /// Stage one of publishing a row: its ACK's handle.
    async fn send_row(&self, row: &OutboxRow) -> Result<PublishHandle, String> {
        let envelope = Envelope::decode(row.envelope.as_bytes())
            .map_err(|e| format!("stored envelope is invalid: {e}"))?;
        self.bus
            .publish_envelope(&row.topic, &envelope)
            .await
            .map_err(|e| e.to_string())
    }

    /// Records a failed publish of `row`: back to pending with backoff, or
    /// dead-lettered once `backoff.max_attempts` are used up. The dead
    /// letter is published only while `fence` holds: a relay that woke past
    /// its lease may find the row published by another relay meanwhile
    /// (its failure record is then discarded by the compare-and-set, and a
    /// row nobody took is dead-lettered by the next round).
    async fn failed(
        &self,
        lane: &Lane<'_>,
        turn: &tokio::sync::Mutex<()>,
        claim: &str,
        fence: &Fence,
        row: &OutboxRow,
        error: &str,
    ) -> Result<()> {
        let attempt = row.attempts + 1;
        self.stats.failed.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(eventbus_core::telemetry::OUTBOX_FAILED_ATTEMPTS).increment(1);
        let exhausted = attempt >= self.config.backoff.max_attempts as i32;
        let next = now_us() + self.config.backoff.backoff(attempt as u32).as_micros() as i64;
        // The dead-letter topic is unreachable too: keep the row, try later.
        let dead = exhausted && fence.holds() && self.publish_dead_letter(row, error).await;
        let recorded = self
            .persist_in_turn(lane, turn, "record failure", || {
                self.store.fail(claim, &row.id, error, next, dead)
            })
            .await?;
        if !recorded {
            self.lost_claims(1);
            return Ok(());
        }
        if dead {
            self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(eventbus_core::telemetry::OUTBOX_DEAD_LETTERED).increment(1);
            tracing::warn!(event_id = %row.id, error, "outbox row dead-lettered");
        }
        Ok(())
    }

    /// Publishes to the dead-letter topic when one is configured (built by
    /// [`eventbus_core::dead_letter`], as a subscription's are); true when
    /// there is none or the broker confirmed.
    async fn publish_dead_letter(&self, row: &OutboxRow, error: &str) -> bool {
        let Some(dead_letter_topic) = self.config.dead_letter.topic_for(&row.topic) else {
            return true;
        };
        let stored = Message::new(row.topic.clone(), row.envelope.clone().into_bytes())
            .with_header(headers::EVENT_ID, row.id.clone());
        let message = dead_letter::dead_letter(&stored, &row.topic, &dead_letter_topic, error);
        match self.bus.publish_message(message).await {
            Ok(handle) => handle.await.is_success(),
            Err(_) => false,
        }
    }
}

/// The lane a round runs in: its index (liveness), the relay's shutdown,
/// and when the grace after it ends (set by the first statement that
/// meets the shutdown, shared by every lane of the run).
struct Lane<'a> {
    index: usize,
    shutdown: &'a CancellationToken,
    grace_ends: &'a OnceLock<tokio::time::Instant>,
}

/// What a relay's claims saw of the backlog's depth. A claim that looks
/// (asks for a quarter of its heads first, see `store::heads_first`) costs
/// up to three more statements when the backlog is shallow, and the relay
/// claims one round at a time: measured with one relay over 25,000
/// aggregates of 2 versions, that cost a fifth of its rate. So after a
/// claim saw a shallow backlog, claims ask for all their heads at once,
/// and every 16th looks again; after one saw a deep backlog, or none saw
/// anything yet, every claim looks.
#[derive(Debug, Default)]
struct Depth {
    /// Claims since one saw a shallow backlog (0: look at every claim).
    shallow_for: u32,
}

impl Depth {
    /// Whether the next claim looks at the depth.
    fn probe(&self) -> bool {
        self.shallow_for % 16 == 0
    }

    /// Takes in what a claim saw (`None`: it did not look, or heads were
    /// too few to tell).
    fn saw(&mut self, deep: Option<bool>) {
        self.shallow_for = match deep {
            Some(true) => 0,
            Some(false) => 1,
            None if self.shallow_for > 0 => self.shallow_for.wrapping_add(1).max(1),
            None => 0,
        };
    }
}

/// The rows one round claimed, under its claim token.
struct Round {
    claim: String,
    /// One chain per aggregate: its head, then the versions after it.
    chains: Vec<Vec<OutboxRow>>,
    /// Rows held in no chain (see `Claim::stranded`).
    stranded: usize,
    fence: Fence,
}

/// How one claimed row fared in its round.
enum Sent {
    Confirmed,
    Failed(String),
    /// Not published: a version before it failed, or the fence passed.
    HeldBack,
}

/// Until when a round's claim surely holds, on
/// [`eventbus_core::lease_clock`] (which runs on while the process is
/// stopped, by SIGSTOP or a pause, and on Linux while the machine is
/// suspended, as the database's lease does): the
/// time before the claim (or the last renewal that
/// still found rows held and came back before the fence passed) was sent,
/// plus the lease. The database's lease starts later, so it ends later
/// (unless the database's wall clock steps forward). It is checked before
/// each row's publish and each dead letter; a publish already waiting for
/// room in the bus's window when the fence passes still goes out (bounded
/// by `publish.timeout_ms`).
struct Fence(std::sync::Mutex<Duration>);

impl Fence {
    fn new(lease: Duration) -> Self {
        Self(std::sync::Mutex::new(lease_clock() + lease))
    }

    /// After a renewal sent at `sent` came back: the lease runs from
    /// `sent` on, but only if the renewal came back before the fence passed.
    /// Then the database ran it while every row of the round was still
    /// leased (its leases end after the fence), so none can have been taken
    /// over. A later one may have revived the rows no other relay took
    /// while those it took are gone: the round must stay fenced.
    fn extend(&self, sent: Duration, lease: Duration) {
        let mut until = self.0.lock().unwrap();
        if lease_clock() < *until {
            *until = (*until).max(sent + lease);
        }
    }

    fn holds(&self) -> bool {
        lease_clock() < *self.0.lock().unwrap()
    }
}

fn confirmed(result: PublishResult) -> Result<(), String> {
    match result.error {
        None => Ok(()),
        Some(e) => Err(e.to_string()),
    }
}

async fn notified(wakeups: &mut Option<Wakeups>) {
    match wakeups {
        Some(w) => w.next().await,
        None => std::future::pending::<()>().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Claims look at the depth until one sees a shallow backlog, then one
    /// in 16 does, until one sees a deep backlog again.
    #[test]
    fn claims_look_at_the_depth_again_every_16th_while_shallow() {
        let mut depth = Depth::default();
        assert!(depth.probe(), "nothing seen yet");
        depth.saw(None);
        assert!(depth.probe(), "heads too few to tell");
        depth.saw(Some(false));
        let looked: Vec<bool> = (0..32)
            .map(|_| {
                let probe = depth.probe();
                depth.saw(if probe { Some(false) } else { None });
                probe
            })
            .collect();
        assert_eq!(looked.iter().filter(|p| **p).count(), 2, "{looked:?}");
        assert!(!looked[0] && looked[15], "{looked:?}");
        while !depth.probe() {
            depth.saw(None);
        }
        depth.saw(Some(true));
        assert!(depth.probe(), "a deep backlog: every claim looks");
        depth.saw(Some(true));
        assert!(depth.probe());
    }

    /// The fence passes after its lease (its clock is core's
    /// `lease_clock`, tested there).
    #[test]
    fn the_fence_passes_after_its_lease() {
        let fence = Fence::new(Duration::from_millis(30));
        assert!(fence.holds());
        std::thread::sleep(Duration::from_millis(40));
        assert!(!fence.holds(), "the fence passed after its lease");
    }
}
