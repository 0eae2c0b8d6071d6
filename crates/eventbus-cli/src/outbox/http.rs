//! The relay's HTTP endpoints: `/metrics` (Prometheus text) and `/health` (JSON).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::State as Extract;
use axum::http::StatusCode;
use axum::routing::get;
use eventbus::{EventBus, Result};
use eventbus_outbox::{OutboxStore, RelayStats};
use metrics_exporter_prometheus::PrometheusHandle;
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

async fn metrics(Extract(state): Extract<State>) -> String {
    let mut text = state.metrics.render();
    let s = &state.stats;
    for (name, value) in [
        (
            "eventbus_outbox_relay_published",
            s.published.load(Ordering::Relaxed),
        ),
        (
            "eventbus_outbox_relay_failed_attempts",
            s.failed.load(Ordering::Relaxed),
        ),
        (
            "eventbus_outbox_relay_dead_lettered",
            s.dead_lettered.load(Ordering::Relaxed),
        ),
    ] {
        text.push_str(&format!("# TYPE {name} counter\n{name} {value}\n"));
    }
    if let Ok(status) = state.store.status().await {
        text.push_str("# TYPE eventbus_outbox_rows gauge\n");
        for (status, count) in &status.counts {
            text.push_str(&format!("eventbus_outbox_rows{{status=\"{status}\"}} {count}\n"));
        }
        let age = status.oldest_pending_age_ms.unwrap_or(0);
        text.push_str(&format!(
            "# TYPE eventbus_outbox_oldest_pending_ms gauge\neventbus_outbox_oldest_pending_ms {age}\n"
        ));
    }
    text
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
