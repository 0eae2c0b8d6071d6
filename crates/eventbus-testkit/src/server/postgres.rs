//! [`PostgresServer`]: a throwaway PostgreSQL cluster.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use eventbus_core::{Error, ErrorKind, Result};

use super::{LocalProcess, StopWith, free_port, temp_dir};

/// A PostgreSQL cluster made by `initdb` in a temporary directory, serving
/// 127.0.0.1 on a free port; stopped (fast shutdown, SIGINT) and removed on
/// `Drop`.
///
/// Binaries come from `$PG_BIN_DIR`, else the newest `/usr/lib/postgresql/*/bin`
/// (Debian's `postgresql` package). PostgreSQL refuses to run as root, so as
/// root the cluster is made and run as the `postgres` user.
#[derive(Debug)]
pub struct PostgresServer {
    process: LocalProcess,
    _dir: tempfile::TempDir,
}

fn bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("PG_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|e| {
            Error::config("PostgreSQL is not installed (apt-get install postgresql)").with_source(e)
        })?
        .filter_map(|d| d.ok().map(|d| d.path().join("bin")))
        .filter(|d| d.join("initdb").exists())
        .collect();
    dirs.sort();
    dirs.pop()
        .ok_or_else(|| Error::config("no initdb under /usr/lib/postgresql"))
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// `program`, as the `postgres` user when we are root.
fn command(program: &Path, root: bool) -> Result<Command> {
    let mut c = Command::new(program);
    if root {
        super::run_as(&mut c, "postgres")?;
    }
    Ok(c)
}

impl PostgresServer {
    /// Makes and starts a cluster; waits until it accepts connections (at most 30 s).
    ///
    /// # Errors
    /// `Config` when PostgreSQL is missing or initdb fails, `Timeout` when
    /// the server does not accept connections in time.
    pub async fn start() -> Result<Self> {
        let bin = bin_dir()?;
        let root = is_root();
        let dir = temp_dir()?;
        let data = dir.path().join("data");
        if root {
            let owned = Command::new("chown")
                .args(["-R", "postgres:"])
                .arg(dir.path())
                .status();
            if !owned.is_ok_and(|s| s.success()) {
                return Err(Error::config("cannot chown the cluster directory to postgres"));
            }
        }
        let init = command(&bin.join("initdb"), root)?
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync", "-D"])
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| Error::config("cannot run initdb").with_source(e))?;
        if !init.success() {
            return Err(Error::config(format!("initdb failed ({init})")));
        }
        let port = free_port()?;
        let mut process = LocalProcess::new(
            "postgres",
            bin.join("postgres"),
            port,
            dir.path().join("postgres.log"),
        )
        .args(["-D"])
        .args([&data])
        .args([
            "-p",
            &port.to_string(),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "max_connections=200",
            "-k",
        ])
        .args([dir.path()])
        .stop_with(StopWith::Interrupt);
        if root {
            process = process.as_user("postgres");
        }
        process.spawn(Duration::from_secs(30)).await?;
        let server = Self { process, _dir: dir };
        server.wait_for_sessions().await?;
        Ok(server)
    }

    /// Listening comes before accepting sessions ("the database system is
    /// starting up", or recovering after a crash): waits at most 30 s.
    async fn wait_for_sessions(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(pool) = sqlx::PgPool::connect(&self.url()).await {
                pool.close().await;
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(Error::new(
            ErrorKind::Timeout,
            "postgres did not accept connections within 30 s",
        ))
    }

    /// Stops the server as a crash would: SIGQUIT (immediate shutdown: every
    /// session dropped, no checkpoint; the next start recovers from the
    /// WAL), waiting for the process to exit. Not SIGKILL, which would
    /// leave its backends running.
    ///
    /// # Errors
    /// `Config` when it is not running.
    pub fn crash(&mut self) -> Result<()> {
        self.process.signal("QUIT")?;
        self.process.wait_exit(Duration::from_secs(10));
        Ok(())
    }

    /// Starts the server again on the same port and data directory, and
    /// waits until it accepts sessions (at most 30 s each).
    ///
    /// # Errors
    /// As [`start`](PostgresServer::start).
    pub async fn restart(&mut self) -> Result<()> {
        self.process.spawn(Duration::from_secs(30)).await?;
        self.wait_for_sessions().await
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.process.port())
    }

    /// The server process (PID, signals, log).
    pub fn process(&self) -> &LocalProcess {
        &self.process
    }
}
