//! Building the client from [`NatsConfig`], and its connection events.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::{ConnectOptions, Event, ServerAddr};
use eventbus_core::{Error, ErrorKind, Result};
use tokio::sync::broadcast;

use crate::config::NatsConfig;

/// A change of the client's connection, from
/// [`NatsBackend::connection_events`](crate::NatsBackend::connection_events).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectionEvent {
    /// (Re)connected to a server.
    Connected,
    /// The connection dropped; the client reconnects.
    Disconnected,
    /// The server is shutting down (lame duck mode).
    LameDuck,
    /// The client closed.
    Closed,
    /// A server or client error, as text.
    Error(String),
}

pub(crate) async fn client(
    config: &NatsConfig,
    events: broadcast::Sender<ConnectionEvent>,
    reconnects: Arc<AtomicU64>,
) -> Result<async_nats::Client> {
    let servers = config
        .servers
        .iter()
        .map(|s| s.parse::<ServerAddr>())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::config("invalid NATS server URL").with_source(e))?;
    if servers.is_empty() {
        return Err(Error::config("nats.servers is empty"));
    }
    let options = options(config).await?.event_callback(move |event| {
        let events = events.clone();
        let reconnects = reconnects.clone();
        async move {
            let event = match event {
                Event::Connected => {
                    reconnects.fetch_add(1, Ordering::Relaxed);
                    ConnectionEvent::Connected
                }
                Event::Disconnected => ConnectionEvent::Disconnected,
                Event::LameDuckMode => ConnectionEvent::LameDuck,
                Event::Closed => ConnectionEvent::Closed,
                other => ConnectionEvent::Error(other.to_string()),
            };
            tracing::info!(?event, "NATS connection event");
            let _ = events.send(event);
        }
    });
    options
        .connect(servers)
        .await
        .map_err(|e| Error::new(ErrorKind::Connection, "cannot connect to NATS").with_source(e))
}

async fn options(config: &NatsConfig) -> Result<ConnectOptions> {
    let mut o = ConnectOptions::new()
        .connection_timeout(Duration::from_millis(config.reconnect.connect_timeout_ms))
        .max_reconnects(config.reconnect.max_reconnects);
    if config.reconnect.retry_on_initial_connect {
        o = o.retry_on_initial_connect();
    }
    if let Some(name) = &config.client_name {
        o = o.name(name);
    }
    let auth = &config.auth;
    if let (Some(user), Some(password)) = (&auth.user, &auth.password) {
        o = o.user_and_password(user.clone(), password.expose().to_owned());
    }
    if let Some(token) = &auth.token {
        o = o.token(token.expose().to_owned());
    }
    if let Some(seed) = &auth.nkey_seed {
        o = o.nkey(seed.expose().to_owned());
    }
    if let Some(path) = &auth.credentials_file {
        o = o.credentials_file(path).await.map_err(|e| {
            Error::config(format!("cannot read NATS credentials {}", path.display())).with_source(e)
        })?;
    }
    if let Some(tls) = &config.tls {
        if let Some(ca) = &tls.ca_file {
            o = o.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
            o = o.add_client_certificate(cert.clone(), key.clone());
        }
        o = o.require_tls(tls.required);
    }
    Ok(o)
}
