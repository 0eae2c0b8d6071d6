//! [`PostgresServer`]: a throwaway PostgreSQL cluster for tests and benches.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use eventbus_core::local::free_port;
use eventbus_core::{Error, ErrorKind, Result};

/// A PostgreSQL cluster made by `initdb` in a temporary directory, serving
/// 127.0.0.1 on a free port; stopped (fast shutdown) and removed on `Drop`.
///
/// Binaries come from `$PG_BIN_DIR`, else the newest `/usr/lib/postgresql/*/bin`
/// (Debian's `postgresql` package). PostgreSQL refuses to run as root, so as
/// root the cluster is made and run as the `postgres` user.
pub struct PostgresServer {
    child: Option<Child>,
    port: u16,
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for PostgresServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresServer")
            .field("port", &self.port)
            .finish()
    }
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

/// `program args...`, as the `postgres` user when we are root.
fn command(program: &Path, root: bool) -> Command {
    if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

impl PostgresServer {
    /// Makes and starts a cluster; waits until it accepts connections (at most 30 s).
    ///
    /// # Errors
    /// [`Config`](ErrorKind::Config) when PostgreSQL is missing or initdb fails,
    /// [`Timeout`](ErrorKind::Timeout) when the server does not listen in time.
    pub async fn start() -> Result<Self> {
        let bin = bin_dir()?;
        let root = is_root();
        let dir =
            tempfile::tempdir().map_err(|e| Error::config("cannot create a temp dir").with_source(e))?;
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
        let init = command(&bin.join("initdb"), root)
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
        let log = std::fs::File::create(dir.path().join("postgres.log"))
            .map_err(|e| Error::config("cannot create the server log").with_source(e))?;
        let child = command(&bin.join("postgres"), root)
            .arg("-D")
            .arg(&data)
            .args([
                "-p",
                &port.to_string(),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "max_connections=200",
                "-k",
            ])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| Error::config("cannot start postgres").with_source(e))?;
        let server = Self {
            child: Some(child),
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if sqlx::PgPool::connect(&server.url()).await.is_ok() {
                return Ok(server);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(Error::new(
            ErrorKind::Timeout,
            "postgres did not accept connections within 30 s",
        ))
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SIGINT is PostgreSQL's fast shutdown; SIGKILL would orphan its backends.
        let _ = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}
