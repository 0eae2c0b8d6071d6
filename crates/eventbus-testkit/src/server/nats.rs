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

/// A cluster of `nats-server`s with JetStream on 127.0.0.1 (free client and
/// route ports, one store directory each), for replicated (R3) streams and
/// node loss; every node is killed and its stores removed on `Drop`.
///
/// Node `i` is named `n<i>` (the `server_name` JetStream reports as a
/// stream's leader); [`node_index`](NatsCluster::node_index) maps back.
#[derive(Debug)]
pub struct NatsCluster {
    nodes: Vec<LocalProcess>,
    _store: tempfile::TempDir,
}

impl NatsCluster {
    /// Starts `size` nodes routed to each other and waits until each accepts
    /// client connections (at most 10 s each). JetStream elects its meta
    /// leader a little later: retry the first API call (see
    /// [`wait_for_jetstream`](NatsCluster::wait_for_jetstream)).
    ///
    /// # Errors
    /// As [`NatsServer::start`], and `Config` when a file cannot be written.
    pub async fn start(size: usize) -> Result<Self> {
        let store = temp_dir()?;
        let ports: Vec<(u16, u16)> = (0..size)
            .map(|_| Ok((free_port()?, free_port()?)))
            .collect::<Result<_>>()?;
        let mut nodes = Vec::with_capacity(size);
        for (i, (client, route)) in ports.iter().enumerate() {
            let routes: Vec<String> = ports
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, (_, r))| format!("\"nats-route://127.0.0.1:{r}\""))
                .collect();
            let config = format!(
                "server_name: n{i}\nlisten: \"127.0.0.1:{client}\"\n\
                 jetstream {{ store_dir: {:?} }}\n\
                 cluster {{ name: eventbus, listen: \"127.0.0.1:{route}\", routes: [{}] }}\n",
                store.path().join(format!("n{i}")),
                routes.join(", ")
            );
            let file = store.path().join(format!("n{i}.conf"));
            std::fs::write(&file, config).map_err(|e| {
                eventbus_core::Error::config("cannot write the nats-server config").with_source(e)
            })?;
            let process = LocalProcess::new(
                "nats-server",
                binary("NATS_SERVER_BIN", "nats-server"),
                *client,
                store.path().join(format!("n{i}.log")),
            )
            .args(["-c"])
            .args([&file]);
            nodes.push(process);
        }
        for node in &mut nodes {
            node.spawn(Duration::from_secs(10)).await?;
        }
        Ok(Self { nodes, _store: store })
    }

    /// Waits until JetStream answers account info through node 0 with a
    /// meta leader elected (at most `timeout`).
    ///
    /// # Errors
    /// [`Timeout`](eventbus_core::ErrorKind::Timeout) when it does not.
    pub async fn wait_for_jetstream(&self, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            if let Ok(client) = async_nats_probe(&self.url(0)).await
                && client
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(eventbus_core::Error::new(
            eventbus_core::ErrorKind::Timeout,
            format!("the JetStream cluster had no meta leader within {timeout:?}"),
        ))
    }

    /// The client URL of node `i`.
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[i].port())
    }

    /// Every node's client URL.
    pub fn urls(&self) -> Vec<String> {
        (0..self.nodes.len()).map(|i| self.url(i)).collect()
    }

    /// The index of the node JetStream calls `server_name`.
    pub fn node_index(&self, server_name: &str) -> Option<usize> {
        server_name
            .strip_prefix('n')
            .and_then(|i| i.parse().ok())
            .filter(|i| *i < self.nodes.len())
    }

    /// Node `i`'s process (PID, signals, log).
    pub fn node(&self, i: usize) -> &LocalProcess {
        &self.nodes[i]
    }

    /// Kills node `i` with SIGKILL, keeping its store.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Starts node `i` again on its ports and store.
    ///
    /// # Errors
    /// As [`NatsServer::start`].
    pub async fn restart(&mut self, i: usize) -> Result<()> {
        self.nodes[i].spawn(Duration::from_secs(10)).await
    }
}

/// Whether JetStream answers `$JS.API.INFO` with no error through `url`,
/// using a bare NATS request (no client library in the test kit).
async fn async_nats_probe(url: &str) -> Result<bool> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let addr = url.trim_start_matches("nats://");
    let io = |e: std::io::Error| {
        eventbus_core::Error::new(eventbus_core::ErrorKind::Connection, "probe").with_source(e)
    };
    let stream = tokio::net::TcpStream::connect(addr).await.map_err(io)?;
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    write
        .write_all(b"CONNECT {\"verbose\":false,\"headers\":true}\r\nSUB _probe 1\r\nPUB $JS.API.INFO _probe 0\r\n\r\nPING\r\n")
        .await
        .map_err(io)?;
    let answer = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(line) = lines.next_line().await.map_err(io)? {
            if line.starts_with("MSG _probe") {
                let body = lines.next_line().await.map_err(io)?.unwrap_or_default();
                return Ok::<_, eventbus_core::Error>(Some(body));
            }
        }
        Ok(None)
    })
    .await;
    Ok(matches!(answer, Ok(Ok(Some(body))) if !body.contains("\"error\"")))
}
