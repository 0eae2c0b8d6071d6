//! [`NatsServer`]: a throwaway `nats-server` with JetStream, for tests and the bench.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use eventbus_core::local::{free_port, wait_for_port};
use eventbus_core::{Error, Result};

/// A `nats-server -js` child process on 127.0.0.1, on a free port, with a
/// temporary store directory; killed and cleaned up on `Drop`.
///
/// The binary is `$NATS_SERVER_BIN`, else `nats-server` on the `PATH`
/// (`apt-get install nats-server` gives 2.9.10, which suffices).
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    store: tempfile::TempDir,
}

impl std::fmt::Debug for NatsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsServer").field("port", &self.port).finish()
    }
}

impl NatsServer {
    /// Starts a server and waits until it accepts connections (at most 10 s).
    ///
    /// # Errors
    /// [`Config`](ErrorKind::Config) when the binary cannot be started,
    /// [`Timeout`](ErrorKind::Timeout) when it does not listen in time.
    pub async fn start() -> Result<Self> {
        let store = tempfile::tempdir()
            .map_err(|e| Error::config("cannot create a store directory").with_source(e))?;
        let port = free_port()?;
        let mut server = Self {
            child: None,
            port,
            store,
        };
        server.spawn().await?;
        Ok(server)
    }

    /// The client URL, `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server (as a crash would), keeping its store directory.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and store, after [`kill`](NatsServer::kill).
    ///
    /// # Errors
    /// As [`start`](NatsServer::start).
    pub async fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn().await
    }

    async fn spawn(&mut self) -> Result<()> {
        let bin =
            std::env::var_os("NATS_SERVER_BIN").map_or_else(|| PathBuf::from("nats-server"), PathBuf::from);
        let log = std::fs::File::create(self.store.path().join("server.log"))
            .map_err(|e| Error::config("cannot create the server log").with_source(e))?;
        let child = Command::new(&bin)
            .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string(), "-sd"])
            .arg(self.store.path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| {
                Error::config(format!("cannot start {} (install nats-server)", bin.display())).with_source(e)
            })?;
        self.child = Some(child);
        wait_for_port(self.port, Duration::from_secs(10), "nats-server").await
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
