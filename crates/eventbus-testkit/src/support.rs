//! Small helpers of the suite and of backends' own tests: test envelopes,
//! bounded polling, unique names.

use std::time::Duration;

use eventbus_core::Envelope;

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
