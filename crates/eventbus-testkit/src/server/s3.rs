//! [`S3Server`]: a throwaway S3-compatible store (moto), so that a Kafka
//! broker keeping its data there survives its own SIGKILL.

use std::time::Duration;

use eventbus_core::{Error, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{LocalProcess, binary, free_port, temp_dir};

/// The region buckets are made in (any works with moto; tansu needs one).
pub const S3_REGION: &str = "eu-west-2";

/// `moto_server` on 127.0.0.1, on a free port, in memory; killed on `Drop`.
///
/// The binary is `$MOTO_SERVER_BIN`, else `moto_server` on the `PATH` (the
/// pip package `moto[server]`; `scripts/install-test-deps` installs it).
/// Source of the setup: `../shared/brief/INFRA.md`.
#[derive(Debug)]
pub struct S3Server {
    process: LocalProcess,
    _dir: tempfile::TempDir,
}

impl S3Server {
    /// Starts moto and waits until it accepts connections (at most 30 s).
    ///
    /// # Errors
    /// `Config` when the binary cannot be started, `Timeout` when it does not
    /// listen in time.
    pub async fn start() -> Result<Self> {
        let dir = temp_dir()?;
        let port = free_port()?;
        let mut process = LocalProcess::new(
            "moto_server",
            binary("MOTO_SERVER_BIN", "moto_server"),
            port,
            dir.path().join("moto.log"),
        )
        .args(["-H", "127.0.0.1", "-p", &port.to_string()]);
        process.spawn(Duration::from_secs(30)).await?;
        Ok(Self { process, _dir: dir })
    }

    /// The port it listens on, on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.process.port()
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.process.port())
    }

    /// Creates `bucket` in [`S3_REGION`] (S3 `CreateBucket`, unsigned: moto
    /// does not check credentials).
    ///
    /// # Errors
    /// `Backend` when the request fails or is refused.
    pub async fn create_bucket(&self, bucket: &str) -> Result<()> {
        let body = format!(
            "<CreateBucketConfiguration><LocationConstraint>{S3_REGION}</LocationConstraint></CreateBucketConfiguration>"
        );
        let request = format!(
            "PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.process.port(),
            body.len()
        );
        let io = |e: std::io::Error| Error::backend("S3 CreateBucket failed", e);
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.process.port()))
            .await
            .map_err(io)?;
        stream.write_all(request.as_bytes()).await.map_err(io)?;
        let mut response = String::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut response))
            .await
            .map_err(|_| Error::config("S3 CreateBucket: no answer within 10 s"))?
            .map_err(io)?;
        if response.starts_with("HTTP/1.1 200") {
            Ok(())
        } else {
            Err(Error::config(format!(
                "S3 CreateBucket {bucket}: {}",
                response.lines().next().unwrap_or("")
            )))
        }
    }
}
