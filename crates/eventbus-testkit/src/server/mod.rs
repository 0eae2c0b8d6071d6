//! Throwaway local servers for tests and the bench: nats-server
//! ([`NatsServer`]), tansu ([`TansuServer`], Kafka protocol, in memory or on
//! an S3-compatible store), PostgreSQL ([`PostgresServer`]) and moto
//! ([`S3Server`]), all behind one helper, [`LocalProcess`]: spawn on
//! 127.0.0.1 and a free port, wait until it listens, kill on `Drop`. And
//! [`RequestHold`], an in-process proxy that holds one HTTP request to such
//! a server (one storage write of a broker) for a while.
//!
//! `scripts/install-test-deps` installs every binary.

mod hold;
mod nats;
mod postgres;
mod s3;
mod tansu;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use eventbus_core::{Error, ErrorKind, Result};

pub use hold::RequestHold;
pub use nats::{NatsCluster, NatsServer};
pub use postgres::PostgresServer;
pub use s3::{S3_REGION, S3Server};
pub use tansu::{TansuOptions, TansuServer, TansuStorage};

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

/// How a [`LocalProcess`] is stopped on `Drop` or [`stop`](LocalProcess::stop).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopWith {
    /// SIGKILL, as a crash (nats-server, tansu, moto).
    Kill,
    /// SIGINT, then SIGKILL after 10 s (PostgreSQL's fast shutdown; a
    /// SIGKILL would orphan its backends).
    Interrupt,
}

/// One spawned server process on 127.0.0.1:`port`, with its output in a log
/// file; stopped on `Drop` ([`StopWith`]). Can be killed, frozen (SIGSTOP),
/// resumed and spawned again with the same command, port and files, as a
/// crashed or restarted server would be.
pub struct LocalProcess {
    name: &'static str,
    program: PathBuf,
    args: Vec<std::ffi::OsString>,
    envs: Vec<(String, String)>,
    log: PathBuf,
    port: u16,
    stop_with: StopWith,
    /// Runs as this user (name) instead of ours; see [`LocalProcess::as_user`].
    user: Option<String>,
    child: Option<Child>,
}

impl std::fmt::Debug for LocalProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalProcess")
            .field("name", &self.name)
            .field("port", &self.port)
            .field("pid", &self.pid())
            .finish()
    }
}

impl LocalProcess {
    /// A process `program args…` that will listen on `port`, logging to `log`.
    /// Nothing runs until [`spawn`](LocalProcess::spawn).
    pub fn new(name: &'static str, program: impl Into<PathBuf>, port: u16, log: impl Into<PathBuf>) -> Self {
        Self {
            name,
            program: program.into(),
            args: Vec::new(),
            envs: Vec::new(),
            log: log.into(),
            port,
            stop_with: StopWith::Kill,
            user: None,
            child: None,
        }
    }

    /// Adds arguments.
    #[must_use]
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        self.args.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Adds an environment variable.
    #[must_use]
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.envs.push((key.into(), value.into()));
        self
    }

    /// How `Drop` stops it. Default [`StopWith::Kill`].
    #[must_use]
    pub fn stop_with(mut self, stop_with: StopWith) -> Self {
        self.stop_with = stop_with;
        self
    }

    /// Runs the program as `user` (PostgreSQL refuses root): the child
    /// switches to the user's uid and gid itself before `exec`, so the PID
    /// signalled and waited for is the server's own. (Through `runuser`, the
    /// PID was `runuser`'s: a stop that killed it orphaned the server.)
    #[must_use]
    pub fn as_user(mut self, user: &str) -> Self {
        self.user = Some(user.to_owned());
        self
    }

    /// Starts the process (killing a running one first) and waits until its
    /// port accepts connections, at most `timeout`.
    ///
    /// # Errors
    /// [`Config`](ErrorKind::Config) when the program cannot be started (the
    /// message names it), [`Timeout`](ErrorKind::Timeout) when it does not
    /// listen in time (see its log).
    pub async fn spawn(&mut self, timeout: Duration) -> Result<()> {
        self.kill();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| Error::config(format!("cannot open {}", self.log.display())).with_source(e))?;
        let err = log
            .try_clone()
            .map_err(|e| Error::config("cannot open the log").with_source(e))?;
        let mut command = Command::new(&self.program);
        if let Some(user) = &self.user {
            run_as(&mut command, user)?;
        }
        let child = command
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| {
                Error::config(format!(
                    "cannot start {} ({}; scripts/install-test-deps installs it)",
                    self.name,
                    self.program.display()
                ))
                .with_source(e)
            })?;
        self.child = Some(child);
        wait_for_port(self.port, timeout, self.name)
            .await
            .map_err(|e| Error::new(ErrorKind::Timeout, format!("{e} (log: {})", self.log.display())))
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The log file (stdout and stderr, appended across restarts).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Kills it with SIGKILL, as a crash would, and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` (e.g. `"STOP"`, `"CONT"`, `"TERM"`) to it by PID.
    ///
    /// # Errors
    /// [`Config`](ErrorKind::Config) when it is not running or `kill` fails.
    pub fn signal(&self, signal: &str) -> Result<()> {
        let pid = self
            .pid()
            .ok_or_else(|| Error::config(format!("{} is not running", self.name)))?;
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .map_err(|e| Error::config("cannot run kill").with_source(e))?;
        if status.success() {
            Ok(())
        } else {
            Err(Error::config(format!("kill -{signal} {pid} failed ({status})")))
        }
    }

    /// Waits up to `timeout` for the process to exit by itself (after a
    /// signal), then kills it; reaps it either way.
    pub fn wait_exit(&mut self, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(_)) = child.try_wait()
            {
                self.child = None;
                return;
            }
            if self.child.is_none() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
    }

    /// Stops it as configured ([`StopWith`]); SIGKILL after 10 s.
    pub fn stop(&mut self) {
        if self.stop_with == StopWith::Interrupt && self.signal("INT").is_ok() {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while std::time::Instant::now() < deadline {
                if let Some(child) = self.child.as_mut()
                    && let Ok(Some(_)) = child.try_wait()
                {
                    self.child = None;
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.kill();
    }
}

impl Drop for LocalProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Makes `command` run as `user`: the child takes the user's uid and gid
/// before `exec` (dropping root's supplementary groups), in `/`, as our
/// working directory may be closed to that user.
///
/// # Errors
/// As [`user_ids`].
pub(crate) fn run_as(command: &mut Command, user: &str) -> Result<()> {
    let (uid, gid) = user_ids(user)?;
    std::os::unix::process::CommandExt::uid(command, uid);
    std::os::unix::process::CommandExt::gid(command, gid);
    command.current_dir("/");
    Ok(())
}

/// The uid and gid of `user`, from `/etc/passwd`.
///
/// # Errors
/// [`Config`](ErrorKind::Config) when the file cannot be read or has no such user.
fn user_ids(user: &str) -> Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd")
        .map_err(|e| Error::config("cannot read /etc/passwd").with_source(e))?;
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.first() == Some(&user))
        .and_then(|f| Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?)))
        .ok_or_else(|| Error::config(format!("no user {user:?} in /etc/passwd")))
}

/// A new temporary directory.
pub(crate) fn temp_dir() -> Result<tempfile::TempDir> {
    tempfile::tempdir().map_err(|e| Error::config("cannot create a temporary directory").with_source(e))
}

/// `$var` when set, else `default` (looked up on the `PATH`).
pub(crate) fn binary(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var).map_or_else(|| PathBuf::from(default), PathBuf::from)
}
