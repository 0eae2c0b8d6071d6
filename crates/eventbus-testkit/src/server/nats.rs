//! [`NatsServer`]: a throwaway `nats-server` with JetStream.

use std::time::Duration;

use eventbus_core::Result;

use super::{LocalProcess, binary, free_port, temp_dir};

/// A `nats-server -js` on 127.0.0.1, on a free port, with a temporary store
/// directory that survives [`kill`](NatsServer::kill) and
/// [`restart`](NatsServer::restart); killed and removed on `Drop`.
///
/// The binary is `$NATS_SERVER_BIN`, else `nats-server` on the `PATH`
/// (Debian's package gives 2.9.10, which suffices).
#[derive(Debug)]
pub struct NatsServer {
    process: LocalProcess,
    _store: tempfile::TempDir,
}

impl NatsServer {
    /// Starts a server and waits until it accepts connections (at most 10 s).
    ///
    /// # Errors
    /// `Config` when the binary cannot be started, `Timeout` when it does not
    /// listen in time.
    pub async fn start() -> Result<Self> {
        let store = temp_dir()?;
        let port = free_port()?;
        let mut process = LocalProcess::new(
            "nats-server",
            binary("NATS_SERVER_BIN", "nats-server"),
            port,
            store.path().join("server.log"),
        )
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .args([store.path()]);
        process.spawn(Duration::from_secs(10)).await?;
        Ok(Self {
            process,
            _store: store,
        })
    }

    /// Starts a server from a configuration file holding the listen
    /// address, JetStream's store and then `extra` (nats-server's config
    /// syntax: `authorization { ... }`, `tls { ... }`), and waits until it
    /// accepts TCP connections (at most 10 s).
    ///
    /// # Errors
    /// As [`start`](NatsServer::start), and `Config` when the file cannot
    /// be written.
    pub async fn start_with_config(extra: &str) -> Result<Self> {
        let store = temp_dir()?;
        let port = free_port()?;
        let file = store.path().join("server.conf");
        let config = format!(
            "listen: \"127.0.0.1:{port}\"\njetstream {{ store_dir: {:?} }}\n{extra}\n",
            store.path().join("js")
        );
        std::fs::write(&file, config).map_err(|e| {
            eventbus_core::Error::config("cannot write the nats-server config").with_source(e)
        })?;
        let mut process = LocalProcess::new(
            "nats-server",
            binary("NATS_SERVER_BIN", "nats-server"),
            port,
            store.path().join("server.log"),
        )
        .args(["-c"])
        .args([&file]);
        process.spawn(Duration::from_secs(10)).await?;
        Ok(Self {
            process,
            _store: store,
        })
    }

    /// The client URL, `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.process.port())
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.process.port()
    }

    /// The server process (PID, signals such as SIGSTOP, log).
    pub fn process(&self) -> &LocalProcess {
        &self.process
    }

    /// Kills the server with SIGKILL (as a crash would), keeping its store.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts the server again on the same port and store.
    ///
    /// # Errors
    /// As [`start`](NatsServer::start).
    pub async fn restart(&mut self) -> Result<()> {
        self.process.spawn(Duration::from_secs(10)).await
    }
}
