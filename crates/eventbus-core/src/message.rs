//! Raw messages as they cross a broker, deliveries and their acknowledgement.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::error::Result;
use crate::headers::Headers;

/// A message as sent to or received from a broker.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Message {
    /// The topic (Kafka topic; mapped to a NATS subject).
    pub topic: String,
    /// The record key. Envelope publishes set it to the aggregate id, so Kafka
    /// keeps one aggregate's events in one partition.
    pub key: Option<Bytes>,
    /// Broker headers.
    pub headers: Headers,
    /// The body. For envelope publishes, the envelope's JSON.
    pub payload: Bytes,
    /// The broker dedup id, where the broker has one (NATS `Nats-Msg-Id`):
    /// a repeat within the broker's window is stored once. Envelope
    /// publishes set the event id; dead letters `<event id>/dead-letter`
    /// (see [`dead_letter`](crate::dead_letter)). Not sent as a header.
    pub dedup_id: Option<String>,
}

impl Message {
    /// A message with no key or headers.
    pub fn new(topic: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Self {
            topic: topic.into(),
            payload: payload.into(),
            ..Self::default()
        }
    }

    /// Sets the record key.
    #[must_use]
    pub fn with_key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Adds a header.
    #[must_use]
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        let (name, value): (String, String) = (name.into(), value.into());
        self.headers.insert(name, value);
        self
    }

    /// Sets the broker dedup id.
    #[must_use]
    pub fn with_dedup_id(mut self, id: impl Into<String>) -> Self {
        self.dedup_id = Some(id.into());
        self
    }
}

/// Where a broker stored a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Position {
    /// A stream sequence number (NATS JetStream, memory backend).
    Sequence(u64),
    /// A Kafka partition and offset.
    Offset {
        /// The partition.
        partition: i32,
        /// The offset within the partition.
        offset: i64,
    },
}

/// What a broker answered for an accepted publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ack {
    /// Where the message was stored, where the broker tells.
    pub position: Option<Position>,
    /// The broker recognised the message id as already stored (NATS
    /// `Nats-Msg-Id` dedup window) and did not store it again.
    pub duplicate: bool,
}

/// Settles one delivery with its backend. Implemented by each backend.
///
/// The vocabulary is JetStream's `AckKind`: the bus calls exactly one of
/// [`ack`](Acker::ack) (handled), [`term`](Acker::term) (dead-lettered) or
/// [`nak`](Acker::nak) (handed back unhandled: the subscription closed
/// first), or none when the backend took the delivery back itself
/// ([`Ownership`] revoked).
#[async_trait]
pub trait Acker: Send + Sync + 'static {
    /// The message is done; it must not be delivered again to this group.
    async fn ack(&self) -> Result<()>;

    /// [`ack`](Acker::ack) done at once, for a backend whose ack waits for
    /// nothing (no I/O, no lock held across an await): `Some` with its
    /// outcome. The bus tries it first and calls `ack` on `None` (the
    /// default), so a backend that has it saves the boxed future of `ack`
    /// on every message. When it returns `Some`, it must do exactly what
    /// `ack` does.
    fn ack_now(&self) -> Option<Result<()>> {
        None
    }

    /// The message was dead-lettered and must never be redelivered
    /// (NATS `+TERM`). Defaults to [`ack`](Acker::ack).
    async fn term(&self) -> Result<()> {
        self.ack().await
    }

    /// The message was not handled and goes back to the group, redelivered
    /// after `delay` (`None`: at once). NATS `-NAK`; the default does
    /// nothing (the backend redelivers on its own, e.g. Kafka from the
    /// committed offset, memory when the member leaves).
    async fn nak(&self, delay: Option<Duration>) -> Result<()> {
        let _ = delay;
        Ok(())
    }

    /// The handler is still working: extend the redelivery deadline (NATS `+WPI`).
    async fn in_progress(&self) -> Result<()> {
        Ok(())
    }

    /// How often the bus should call [`in_progress`](Acker::in_progress) while
    /// a handler runs; `None` when the backend has no redelivery deadline.
    fn in_progress_interval(&self) -> Option<Duration> {
        None
    }
}

/// One received message, with the handle that acknowledges it.
pub struct Delivery {
    /// The message.
    pub message: Message,
    /// Where the broker stored it.
    pub position: Option<Position>,
    /// How many times it has been delivered, counting this one (1 = first).
    pub delivery_count: u64,
    /// Settles the delivery.
    pub acker: Box<dyn Acker>,
    /// Set by backends that can take deliveries back (Kafka: revoked
    /// partitions): once revoked, the bus starts no attempt of this delivery.
    pub ownership: Option<Ownership>,
}

/// A backend's hold on a set of deliveries that it may take back, such as
/// one Kafka partition's assignment. The bus checks it before each handler
/// attempt and during retry backoffs; the backend calls
/// [`revoke_blocking`](Ownership::revoke_blocking) when it loses them.
///
/// Guarantee: once `revoke_blocking` returns `true`, no attempt of these
/// deliveries runs and none will start, so the next owner never overlaps.
///
/// A hold can also end by itself at a deadline
/// ([`set_deadline`](Ownership::set_deadline)), as a lease does: from that
/// instant (on [`lease_clock`], which keeps counting while the process is
/// stopped and, on Linux, while the machine is suspended), no attempt
/// starts and a running attempt's handler is not
/// polled again, even before anyone calls `revoke`. The NATS backend's
/// partition leases use it, so a member frozen (SIGSTOP) past its lease
/// handles nothing more from the partitions it lost.
#[derive(Clone, Default)]
pub struct Ownership {
    inner: Arc<OwnershipInner>,
}

/// Attempts start and end with atomics only (no lock per delivery): an
/// attempt counts itself in `running`, then checks `revoked`; `revoke` sets
/// `revoked`, then reads `running`. Both sequentially consistent, so either
/// the attempt sees the revoke and backs out, or the revoker sees the
/// attempt and waits for it. `idle` (with the empty `wait` lock) wakes a
/// revoker when the last attempt ends.
#[derive(Default)]
struct OwnershipInner {
    revoked_flag: AtomicBool,
    running: AtomicUsize,
    wait: Mutex<()>,
    idle: Condvar,
    revoked: CancellationToken,
    aborted: CancellationToken,
    /// Lease end, in ms on [`lease_clock`] plus one; 0 = no deadline.
    deadline: AtomicU64,
}

/// Now on the clock leases are kept on: time since an arbitrary start, the
/// same for the whole process. On Linux `CLOCK_BOOTTIME`: unlike
/// `CLOCK_MONOTONIC` (std's `Instant`), it counts the time the machine
/// spends suspended, as a broker's or a database's lease does, so a member
/// or a relay whose machine slept past its lease (a laptop, a suspended VM)
/// finds the lease gone on waking (clock_gettime(2)). Elsewhere std's
/// `Instant`. Used by [`Ownership::set_deadline`] and by the outbox
/// relay's lease fence.
pub fn lease_clock() -> Duration {
    #[cfg(target_os = "linux")]
    {
        let now = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
        Duration::new(now.tv_sec.unsigned_abs(), now.tv_nsec.unsigned_abs() as u32)
    }
    #[cfg(not(target_os = "linux"))]
    {
        static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        START.get_or_init(Instant::now).elapsed()
    }
}

impl std::fmt::Debug for Ownership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ownership")
            .field("revoked", &self.is_revoked())
            .field("running", &self.running_attempts())
            .field("expired", &self.is_expired())
            .finish()
    }
}

/// One running handler attempt under an [`Ownership`]; ends on drop.
#[derive(Debug)]
pub(crate) struct AttemptGuard(Ownership);

impl Drop for AttemptGuard {
    fn drop(&mut self) {
        let inner = &self.0.inner;
        // Only a revoker waits for zero, and it set `revoked_flag` first.
        if inner.running.fetch_sub(1, Ordering::SeqCst) == 1 && inner.revoked_flag.load(Ordering::SeqCst) {
            // Under the lock: a revoker between its check and its wait
            // holds it, so this wakeup cannot fall between the two.
            let _wait = inner.wait.lock().unwrap();
            inner.idle.notify_all();
        }
    }
}

impl Ownership {
    /// A new hold, not revoked.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the deliveries were taken back.
    pub fn is_revoked(&self) -> bool {
        self.inner.revoked_flag.load(Ordering::SeqCst)
    }

    /// Resolves once revoked.
    pub async fn revoked(&self) {
        self.inner.revoked.cancelled().await;
    }

    /// Resolves once running attempts must stop at once.
    pub(crate) async fn aborted(&self) {
        self.inner.aborted.cancelled().await;
    }

    /// Ends the hold at `at` unless extended again (a lease): from then on
    /// [`is_expired`](Ownership::is_expired) is true, no attempt starts and
    /// running handlers are no longer polled. Extending after expiry does
    /// not revive the hold.
    ///
    /// `at` is counted from now, as `at - Instant::now()` on
    /// [`lease_clock`]: a suspend of the machine after this call counts.
    pub fn set_deadline(&self, at: Instant) {
        self.set_lease_deadline(lease_clock() + at.saturating_duration_since(Instant::now()));
    }

    /// [`set_deadline`](Ownership::set_deadline) with `at` on
    /// [`lease_clock`]: a lease whose start was read on that clock (when
    /// the request that wrote it was sent) counts a suspend of the machine
    /// even between then and this call.
    pub fn set_lease_deadline(&self, at: Duration) {
        let ms = at.as_millis() as u64 + 1;
        let _ = self
            .inner
            .deadline
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |old| {
                (!self.expired_at(old)).then_some(ms)
            });
    }

    fn expired_at(&self, deadline: u64) -> bool {
        deadline != 0 && (lease_clock().as_millis() as u64) + 1 >= deadline
    }

    /// Whether a deadline set by [`set_deadline`](Ownership::set_deadline) has passed.
    pub fn is_expired(&self) -> bool {
        self.expired_at(self.inner.deadline.load(Ordering::Acquire))
    }

    /// Whether no attempt may start: revoked or expired.
    pub fn is_lost(&self) -> bool {
        self.is_expired() || self.is_revoked()
    }

    /// Attempts running now (count). For an instant it may include one
    /// that began just as the hold was revoked and backs out at once.
    pub fn running_attempts(&self) -> usize {
        self.inner.running.load(Ordering::SeqCst)
    }

    /// Registers a running attempt; `None` when already revoked or expired.
    pub(crate) fn begin_attempt(&self) -> Option<AttemptGuard> {
        // Once revoked, nothing is counted any more: after `revoke`, only an
        // attempt already past this check can count itself, and backs out.
        if self.is_revoked() || self.is_expired() {
            return None;
        }
        self.inner.running.fetch_add(1, Ordering::SeqCst);
        // Counted first, then checked (see `OwnershipInner`); backing out
        // drops the guard, which wakes a revoker waiting for zero.
        let guard = AttemptGuard(self.clone());
        if self.is_revoked() || self.is_expired() {
            return None;
        }
        Some(guard)
    }

    /// Takes the deliveries back: no attempt starts from now on, retry
    /// backoffs end. Does not wait; see [`stop_running`](Ownership::stop_running).
    pub fn revoke(&self) {
        self.inner.revoked_flag.store(true, Ordering::SeqCst);
        self.inner.revoked.cancel();
    }

    /// After [`revoke`](Ownership::revoke): gives running attempts until
    /// `deadline` to finish, then cancels them (their handler futures are
    /// dropped) and waits up to `abort_wait` more. Blocks the calling thread
    /// (a rebalance callback is synchronous); returns `true` when no attempt
    /// runs any more.
    pub fn stop_running(&self, deadline: Instant, abort_wait: Duration) -> bool {
        debug_assert!(self.is_revoked(), "revoke first");
        let mut wait = self.inner.wait.lock().unwrap();
        while self.running_attempts() > 0 {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            wait = self.inner.idle.wait_timeout(wait, deadline - now).unwrap().0;
        }
        if self.running_attempts() == 0 {
            return true;
        }
        self.inner.aborted.cancel();
        let deadline = Instant::now() + abort_wait;
        while self.running_attempts() > 0 {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            wait = self.inner.idle.wait_timeout(wait, deadline - now).unwrap().0;
        }
        self.running_attempts() == 0
    }

    /// [`revoke`](Ownership::revoke), then [`stop_running`](Ownership::stop_running)
    /// with `grace` from now.
    pub fn revoke_blocking(&self, grace: Duration, abort_wait: Duration) -> bool {
        self.revoke();
        self.stop_running(Instant::now() + grace, abort_wait)
    }
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("message", &self.message)
            .field("position", &self.position)
            .field("delivery_count", &self.delivery_count)
            .field("ownership", &self.ownership)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lease clock runs at the rate of std's `Instant`, and on Linux
    /// it is `CLOCK_BOOTTIME`: never behind `CLOCK_MONOTONIC`, ahead of it
    /// by the time the machine spent suspended. (A suspend itself cannot
    /// be caused from a test.)
    #[test]
    fn the_lease_clock_counts_what_monotonic_counts_and_on_linux_the_suspended_time() {
        let (clock, instant) = (lease_clock(), Instant::now());
        std::thread::sleep(Duration::from_millis(50));
        let (ran, elapsed) = (lease_clock() - clock, instant.elapsed());
        assert!(ran >= Duration::from_millis(50), "{ran:?}");
        assert!(
            ran <= elapsed + Duration::from_millis(20),
            "{ran:?} against {elapsed:?}"
        );
        #[cfg(target_os = "linux")]
        {
            let mono = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
            let mono = Duration::new(mono.tv_sec.unsigned_abs(), mono.tv_nsec.unsigned_abs() as u32);
            assert!(lease_clock() >= mono, "BOOTTIME is never behind MONOTONIC");
        }
    }

    #[test]
    fn an_expired_lease_starts_nothing_and_cannot_be_revived() {
        let o = Ownership::new();
        assert!(!o.is_expired(), "no deadline: never expires");
        o.set_deadline(Instant::now() + Duration::from_secs(60));
        assert!(o.begin_attempt().is_some());
        o.set_deadline(Instant::now());
        std::thread::sleep(Duration::from_millis(5));
        assert!(o.is_expired() && o.is_lost());
        assert!(o.begin_attempt().is_none(), "no attempt after the lease ended");
        o.set_deadline(Instant::now() + Duration::from_secs(60));
        assert!(o.is_expired(), "a late renewal does not revive an expired hold");
    }

    #[test]
    fn a_revoked_ownership_starts_nothing_and_waits_for_running_attempts() {
        let o = Ownership::new();
        let running = o.begin_attempt().expect("not revoked");
        let o2 = o.clone();
        let waiter = std::thread::spawn(move || o2.revoke_blocking(Duration::from_secs(5), Duration::ZERO));
        while !o.is_revoked() {
            std::thread::yield_now();
        }
        assert!(o.begin_attempt().is_none(), "no attempt starts once revoked");
        std::thread::sleep(Duration::from_millis(20));
        assert!(!waiter.is_finished(), "waits for the running attempt");
        drop(running);
        assert!(waiter.join().unwrap());
    }

    #[test]
    fn no_attempt_runs_after_a_revoke_returned_under_racing_starts() {
        use std::sync::atomic::AtomicBool;
        for _ in 0..200 {
            let o = Ownership::new();
            let revoked = Arc::new(AtomicBool::new(false));
            let attempts: Vec<_> = (0..3)
                .map(|_| {
                    let (o, revoked) = (o.clone(), revoked.clone());
                    std::thread::spawn(move || {
                        for _ in 0..200 {
                            if let Some(guard) = o.begin_attempt() {
                                assert!(
                                    !revoked.load(Ordering::SeqCst),
                                    "an attempt ran after revoke returned"
                                );
                                std::hint::spin_loop();
                                assert!(
                                    !revoked.load(Ordering::SeqCst),
                                    "an attempt ran after revoke returned"
                                );
                                drop(guard);
                            }
                        }
                    })
                })
                .collect();
            assert!(o.revoke_blocking(Duration::from_secs(5), Duration::ZERO));
            revoked.store(true, Ordering::SeqCst);
            for a in attempts {
                a.join().unwrap();
            }
            assert_eq!(o.running_attempts(), 0, "backed-out attempts leave no count");
        }
    }

    #[test]
    fn a_running_attempt_past_the_grace_is_aborted() {
        let o = Ownership::new();
        let _stuck = o.begin_attempt().unwrap();
        assert!(!o.revoke_blocking(Duration::from_millis(10), Duration::from_millis(10)));
        assert!(o.inner.aborted.is_cancelled());
    }
}
