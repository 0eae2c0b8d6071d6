//! Helpers for the throwaway local servers that tests and benches start
//! (nats-server, tansu, PostgreSQL): a free port, and waiting for a listener.

use std::time::Duration;

use crate::error::{Error, ErrorKind, Result};

/// A TCP port on 127.0.0.1 that was free a moment ago (bound, then released).
///
/// # Errors
/// [`Config`](ErrorKind::Config) when no port can be bound.
pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| Error::config("cannot find a free port").with_source(e))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| Error::config("cannot find a free port").with_source(e))
}

/// Waits until 127.0.0.1:`port` accepts TCP connections, polling every 50 ms.
///
/// # Errors
/// [`Timeout`](ErrorKind::Timeout) naming `what` when `timeout` passes first.
pub async fn wait_for_port(port: u16, timeout: Duration, what: &str) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(Error::new(
        ErrorKind::Timeout,
        format!("{what} did not listen on {port} within {timeout:?}"),
    ))
}
