//! The relay's HTTP endpoints: `/metrics` (Prometheus text) and `/health` (JSON).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::State as Extract;
use axum::http::StatusCode;
use axum::routing::get;
use eventbus::prometheus::PrometheusHandle;
use eventbus::{EventBus, Result};
use eventbus_outbox::{OutboxStore, RelayStats};
use tokio_util::sync::CancellationToken;

/// What the endpoints read.
#[derive(Clone)]
pub(crate) struct State {
    pub(crate) metrics: PrometheusHandle,
    pub(crate) store: OutboxStore,
    pub(crate) bus: EventBus,
    pub(crate) stats: Arc<RelayStats>,
    pub(crate) relay_id: String,
}

/// Binds `addr` and serves until `shutdown`.
pub(crate) async fn serve(
    addr: SocketAddr,
    state: State,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>> {
    let app = axum::Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| eventbus::Error::config(format!("cannot listen on {addr}")).with_source(e))?;
    Ok(tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
    }))
}

/// The Prometheus exposition of every metric (the relay's and the bus's),
/// after setting the outbox gauges from the database.
async fn metrics(Extract(state): Extract<State>) -> String {
    use eventbus::telemetry::{OUTBOX_OLDEST_PENDING_AGE, OUTBOX_ROWS};
    if let Ok(status) = state.store.status().await {
        for status_name in ["pending", "published", "dead_lettered"] {
            let count = status.counts.get(status_name).copied().unwrap_or(0);
            metrics::gauge!(OUTBOX_ROWS, "status" => status_name).set(count as f64);
        }
        let age_ms = status.oldest_pending_age_ms.unwrap_or(0);
        metrics::gauge!(OUTBOX_OLDEST_PENDING_AGE).set(age_ms as f64 / 1000.0);
    }
    state.metrics.render()
}

/// Liveness: 200 while the relay's bus is open and its rounds run (one
/// finished within the last minute, or it is waiting for work); 503 means
/// restart it.
async fn livez(Extract(state): Extract<State>) -> (StatusCode, &'static str) {
    let bus = state.bus.health();
    let stuck = state.stats.seconds_since_last_round() > 60;
    match bus.is_live() && !stuck {
        true => (StatusCode::OK, "live\n"),
        false => (StatusCode::SERVICE_UNAVAILABLE, "not live\n"),
    }
}

/// Readiness: 200 when the broker connection is up and the database
/// answers; 503 otherwise (take it out of service, do not restart it).
async fn readyz(Extract(state): Extract<State>) -> (StatusCode, &'static str) {
    let ready = state.bus.health().is_ready() && state.store.status().await.is_ok();
    match ready {
        true => (StatusCode::OK, "ready\n"),
        false => (StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
    }
}

async fn health(Extract(state): Extract<State>) -> (StatusCode, Json<serde_json::Value>) {
    let bus = state.bus.health();
    let outbox = state.store.status().await;
    let healthy = bus.connection == eventbus::ConnectionState::Connected && outbox.is_ok();
    let body = serde_json::json!({
        "healthy": healthy,
        "relay": state.relay_id,
        "backend": bus.backend,
        "connection": format!("{:?}", bus.connection),
        "publishes_in_flight": bus.publishes_in_flight,
        "published": state.stats.published.load(Ordering::Relaxed),
        "outbox": outbox.as_ref().ok(),
        "database_error": outbox.as_ref().err().map(|e| e.to_string()),
    });
    let code = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body))
}
