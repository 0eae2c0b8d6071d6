//! The end-to-end heartbeat: the original SDK's optional health-check
//! publisher and subscriber. A bus with a heartbeat publishes a small
//! message to a heartbeat topic every `interval_ms` and reads the topic
//! back (without a consumer group, [`Backend::browse`](crate::Backend::browse));
//! when none of its own beats came back for `timeout_ms`, its health raises
//! the heartbeat alert. It proves the whole path (publish, broker storage,
//! fetch) rather than the connection alone.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::error::{Result, ValidationError};
use crate::message::Message;

/// Settings of the end-to-end heartbeat ([`EventBus::start_heartbeat`](crate::EventBus::start_heartbeat)).
///
/// In configuration files: `[heartbeat] topic = "...", interval_ms = ...,
/// timeout_ms = ...`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HeartbeatConfig {
    /// The topic beats go to. Default `eventbus.heartbeat`.
    pub topic: String,
    /// Time between two beats, in ms. Default 10,000.
    pub interval_ms: u64,
    /// The alert is raised when none of this bus's beats came back for
    /// this long, in ms; more than `interval_ms`. Default 30,000 (three
    /// beats).
    pub timeout_ms: u64,
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        Self {
            topic: "eventbus.heartbeat".to_owned(),
            interval_ms: 10_000,
            timeout_ms: 30_000,
        }
    }
}

impl HeartbeatConfig {
    /// Checks the settings.
    ///
    /// # Errors
    /// [`ValidationError`] on `interval_ms` when 0, on `timeout_ms` when
    /// not above `interval_ms`.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.interval_ms == 0 {
            return Err(ValidationError::new("interval_ms", "must be at least 1"));
        }
        if self.timeout_ms <= self.interval_ms {
            return Err(ValidationError::new("timeout_ms", "must be above interval_ms"));
        }
        Ok(())
    }
}

/// The heartbeat's state in [`Health`](crate::Health).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeartbeatHealth {
    /// The heartbeat topic.
    pub topic: String,
    /// Beats published and acknowledged by the broker (count).
    pub sent: u64,
    /// Beats that failed to publish (count).
    pub failed: u64,
    /// This bus's beats read back (count).
    pub received: u64,
    /// Time since the last beat came back (or since the heartbeat started,
    /// when none has), in ms.
    pub silent_ms: u64,
    /// Publish-to-read time of the last beat read back, in ms.
    pub last_round_trip_ms: Option<u64>,
    /// `silent_ms` is above `timeout_ms`.
    pub alert: bool,
}

/// One beat on the wire: JSON `{"instance": "...", "sent_at_ms": ...}`.
#[derive(Debug, Serialize, Deserialize)]
struct Beat {
    instance: String,
    sent_at_ms: i64,
}

/// A running heartbeat of one bus.
#[derive(Debug)]
pub(crate) struct Heartbeat {
    config: HeartbeatConfig,
    instance: String,
    started: Instant,
    last_seen: Mutex<Option<Instant>>,
    last_round_trip_ms: AtomicU64,
    sent: AtomicU64,
    failed: AtomicU64,
    received: AtomicU64,
    /// `sent_at_ms` of the newest own beat read back.
    newest_sent_at_ms: std::sync::atomic::AtomicI64,
    pub(crate) stop: CancellationToken,
}

impl Heartbeat {
    pub(crate) fn new(config: HeartbeatConfig) -> Arc<Self> {
        Arc::new(Self {
            config,
            instance: crate::new_event_id(),
            started: Instant::now(),
            last_seen: Mutex::new(None),
            last_round_trip_ms: AtomicU64::new(u64::MAX),
            sent: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            received: AtomicU64::new(0),
            newest_sent_at_ms: std::sync::atomic::AtomicI64::new(i64::MIN),
            stop: CancellationToken::new(),
        })
    }

    /// The next beat to publish.
    pub(crate) fn beat(&self) -> Message {
        let beat = Beat {
            instance: self.instance.clone(),
            sent_at_ms: chrono::Utc::now().timestamp_millis(),
        };
        let body = serde_json::to_vec(&beat).unwrap_or_default();
        Message::new(&self.config.topic, body).with_key(self.instance.clone())
    }

    pub(crate) fn interval(&self) -> Duration {
        Duration::from_millis(self.config.interval_ms)
    }

    pub(crate) fn topic(&self) -> &str {
        &self.config.topic
    }

    pub(crate) fn published(&self, ok: bool) {
        match ok {
            true => self.sent.fetch_add(1, Ordering::Relaxed),
            false => self.failed.fetch_add(1, Ordering::Relaxed),
        };
    }

    /// Reads beats from `stream` until stopped or the stream ends.
    pub(crate) async fn read(
        &self,
        mut stream: futures::stream::BoxStream<'static, Result<crate::BrowsedMessage>>,
    ) {
        loop {
            let item = tokio::select! {
                item = stream.next() => item,
                _ = self.stop.cancelled() => return,
            };
            match item {
                None => return,
                Some(Err(e)) => {
                    // The caller reads again from a fresh stream.
                    tracing::debug!(error = %e, "heartbeat read failed");
                    return;
                }
                Some(Ok(m)) => {
                    let Ok(beat) = serde_json::from_slice::<Beat>(&m.message.payload) else {
                        continue;
                    };
                    // A fresh stream reads from the start: only beats newer
                    // than the newest seen count.
                    if beat.instance != self.instance
                        || beat.sent_at_ms <= self.newest_sent_at_ms.load(Ordering::Relaxed)
                    {
                        continue;
                    }
                    self.newest_sent_at_ms.store(beat.sent_at_ms, Ordering::Relaxed);
                    let rtt = chrono::Utc::now().timestamp_millis() - beat.sent_at_ms;
                    self.last_round_trip_ms
                        .store(rtt.max(0) as u64, Ordering::Relaxed);
                    self.received.fetch_add(1, Ordering::Relaxed);
                    *self.last_seen.lock().unwrap() = Some(Instant::now());
                }
            }
        }
    }

    pub(crate) fn health(&self) -> HeartbeatHealth {
        let since = self.last_seen.lock().unwrap().unwrap_or(self.started);
        let silent_ms = since.elapsed().as_millis() as u64;
        HeartbeatHealth {
            topic: self.config.topic.clone(),
            sent: self.sent.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            received: self.received.load(Ordering::Relaxed),
            silent_ms,
            last_round_trip_ms: match self.last_round_trip_ms.load(Ordering::Relaxed) {
                u64::MAX => None,
                ms => Some(ms),
            },
            alert: silent_ms > self.config.timeout_ms,
        }
    }
}
