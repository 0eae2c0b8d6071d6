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
    let options = with_url_credentials(options(config).await?, config, &servers)?;
    // A `tls://` or `wss://` URL asks for TLS: require it on every
    // connection, including servers the cluster advertises later as
    // `nats://` (async-nats decides per address otherwise).
    let tls_url = servers.iter().any(|s| s.tls_required() || s.scheme() == "wss");
    if config.tls.is_some() && servers.iter().any(|s| s.scheme() == "ws") {
        return Err(Error::config(
            "nats.tls is set but a server URL is ws:// (a plain websocket): use wss://",
        ));
    }
    let options = if tls_url {
        options.require_tls(true)
    } else {
        options
    };
    // Credentials are in the options now: hand async-nats URLs without
    // them (it logs server addresses at debug level, password included).
    let servers = servers
        .into_iter()
        .map(|s| {
            let mut url = s.into_inner();
            let _ = url.set_username("");
            let _ = url.set_password(None);
            ServerAddr::from_url(url)
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::config("invalid NATS server URL").with_source(e))?;
    let options = options.event_callback(move |event| {
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
    options.connect(servers).await.map_err(connect_error)
}

/// A typed error for a failed connect: `Auth` when the server refused the
/// credentials (no retry with the same settings can help), `Connection`
/// otherwise (TLS handshake, refused, timed out). Server URLs in the
/// client's message are shown without their credentials.
fn connect_error(e: async_nats::ConnectError) -> Error {
    use async_nats::ConnectErrorKind as K;
    let (kind, what) = match e.kind() {
        K::AuthorizationViolation | K::Authentication => {
            (ErrorKind::Auth, "the NATS server refused the credentials")
        }
        K::Tls => (ErrorKind::Connection, "TLS with the NATS server failed"),
        K::TimedOut => (ErrorKind::Connection, "connecting to NATS timed out"),
        _ => (ErrorKind::Connection, "cannot connect to NATS"),
    };
    let detail = eventbus_core::redact_url(&e.to_string()).into_owned();
    Error::new(kind, format!("{what}: {detail}"))
}

/// Applies credentials written in the server URLs (`nats://user:password@host`,
/// or `nats://token@host`), which async-nats itself does not read: every
/// URL carrying credentials must carry the same ones.
///
/// # Errors
/// [`Config`](ErrorKind::Config) when URLs carry different credentials, or
/// when `nats.auth` sets credentials too (which to use would be a guess).
fn with_url_credentials(
    o: ConnectOptions,
    config: &NatsConfig,
    servers: &[ServerAddr],
) -> Result<ConnectOptions> {
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    let mut found: Option<(String, Option<String>)> = None;
    for server in servers {
        let Some(user) = server.username() else { continue };
        let creds = (decode(user), server.password().map(decode));
        match &found {
            Some(first) if *first != creds => {
                return Err(Error::config(
                    "nats.servers carry different credentials; put one set in nats.auth instead",
                ));
            }
            _ => found = Some(creds),
        }
    }
    let Some((user, password)) = found else {
        return Ok(o);
    };
    let auth = &config.auth;
    if auth.user.is_some()
        || auth.password.is_some()
        || auth.token.is_some()
        || auth.nkey_seed.is_some()
        || auth.credentials_file.is_some()
    {
        return Err(Error::config(
            "credentials are set both in nats.servers URLs and in nats.auth; keep one",
        ));
    }
    Ok(match password {
        Some(password) => o.user_and_password(user, password),
        None => o.token(user),
    })
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
        match (&tls.cert_file, &tls.key_file) {
            (Some(cert), Some(key)) => o = o.add_client_certificate(cert.clone(), key.clone()),
            (None, None) => {}
            (Some(_), None) => {
                return Err(Error::config(
                    "nats.tls.cert_file is set without nats.tls.key_file",
                ));
            }
            (None, Some(_)) => {
                return Err(Error::config(
                    "nats.tls.key_file is set without nats.tls.cert_file",
                ));
            }
        }
        // Configured TLS is required TLS: async-nats would otherwise upgrade
        // only when the server asks, and send credentials in plaintext to a
        // server that does not.
        o = o.require_tls(true);
    }
    Ok(o)
}
