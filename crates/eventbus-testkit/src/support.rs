//! Small helpers of the suite and of backends' own tests: test envelopes,
//! bounded polling, unique names, a handler held until released.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use eventbus_core::{Envelope, EventBus, SubscribeOptions, Subscription};

/// Polls `done` every 5 ms until it holds or `timeout` passes; returns whether it held.
pub async fn eventually(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    done()
}

/// A topic or group name unique to one run of one case.
pub fn unique(prefix: &str) -> String {
    let id = uuid::Uuid::now_v7().simple().to_string();
    format!("{prefix}-{}", &id[id.len() - 12..])
}

/// A valid envelope of `aggregate` at `version` with a small JSON payload.
pub fn envelope(aggregate: &str, version: i64) -> Envelope {
    Envelope::builder(aggregate, "TestEvent", version)
        .json_payload(&serde_json::json!({ "aggregate": aggregate, "version": version }))
        .and_then(|b| b.build())
        .expect("valid test envelope")
}

/// A handler that holds every attempt until [`HeldHandler::release`]: for
/// lag and backpressure cases, which need events fetched and unsettled.
/// Counts the attempts started, those running now and the events handled.
#[derive(Debug, Clone)]
pub struct HeldHandler {
    hold: Arc<AtomicBool>,
    started: Arc<AtomicUsize>,
    running: Arc<AtomicUsize>,
    handled: Arc<AtomicUsize>,
}

/// One running attempt of a [`HeldHandler`]: counted out when it ends,
/// cancelled ones (a revoke, a close) included.
struct Running(Arc<AtomicUsize>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Default for HeldHandler {
    fn default() -> Self {
        Self::new()
    }
}

impl HeldHandler {
    /// A handler that holds from the start.
    pub fn new() -> Self {
        Self {
            hold: Arc::new(AtomicBool::new(true)),
            started: Arc::new(AtomicUsize::new(0)),
            running: Arc::new(AtomicUsize::new(0)),
            handled: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Subscribes it to `topic` as a member of `group`.
    ///
    /// # Panics
    /// When the subscription fails.
    pub async fn subscribe(&self, bus: &EventBus, topic: &str, group: &str) -> Subscription {
        let this = self.clone();
        bus.subscribe_envelope(topic, SubscribeOptions::group(group), move |_e: Envelope| {
            let this = this.clone();
            async move {
                this.started.fetch_add(1, Ordering::SeqCst);
                this.running.fetch_add(1, Ordering::SeqCst);
                let _running = Running(this.running.clone());
                while this.hold.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                this.handled.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::io::Error>(())
            }
        })
        .await
        .expect("subscribe the held handler")
    }

    /// Lets every held and later attempt finish.
    pub fn release(&self) {
        self.hold.store(false, Ordering::SeqCst);
    }

    /// Attempts started so far (count).
    pub fn started(&self) -> usize {
        self.started.load(Ordering::SeqCst)
    }

    /// Attempts running now (count): started and neither finished nor
    /// cancelled.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }

    /// Events handled so far (count).
    pub fn handled(&self) -> usize {
        self.handled.load(Ordering::SeqCst)
    }
}
