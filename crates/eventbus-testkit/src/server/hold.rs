//! [`RequestHold`]: a TCP proxy in front of an HTTP server that can hold
//! back one request, so a test can make one write of a broker's storage
//! slow while the others go through (tansu on an S3-compatible store: one
//! batch stored late).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventbus_core::{Error, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One armed hold: the request line it waits for, and for how long.
#[derive(Debug, Clone)]
struct Armed {
    method: String,
    path_contains: String,
    hold: Duration,
}

/// A TCP proxy on 127.0.0.1 (a free port) to an HTTP/1.1 server on
/// 127.0.0.1; stopped on `Drop`.
///
/// Armed with [`hold_next`](RequestHold::hold_next), it holds the next
/// request whose request line has the method and contains the path part:
/// that request's bytes, and everything after them on its connection, reach
/// the server only once the hold passed. Other connections are not held.
/// It looks for the request line in each chunk read from the client, which
/// is where HTTP clients put a request head (a head split across two reads
/// would go through unheld).
#[derive(Debug)]
pub struct RequestHold {
    port: u16,
    armed: Arc<Mutex<Option<Armed>>>,
    held: Arc<AtomicU64>,
    accept: tokio::task::JoinHandle<()>,
}

impl RequestHold {
    /// Starts the proxy to 127.0.0.1:`server_port`.
    ///
    /// # Errors
    /// `Config` when no local port can be bound.
    pub async fn start(server_port: u16) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| Error::config("request hold: cannot bind").with_source(e))?;
        let port = listener
            .local_addr()
            .map_err(|e| Error::config("request hold: no local address").with_source(e))?
            .port();
        let armed: Arc<Mutex<Option<Armed>>> = Arc::default();
        let held = Arc::new(AtomicU64::new(0));
        let (a, h) = (armed.clone(), held.clone());
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(relay(client, server_port, a.clone(), h.clone()));
            }
        });
        Ok(Self {
            port,
            armed,
            held,
            accept,
        })
    }

    /// `http://127.0.0.1:<port>`: give this to the client instead of the
    /// server's address.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Arms the hold: the next request whose request line starts with
    /// `method` and contains `path_contains` waits `hold` before it goes on
    /// to the server. One request only; arming again replaces an unused arm.
    pub fn hold_next(&self, method: &str, path_contains: &str, hold: Duration) {
        *self.armed.lock().unwrap() = Some(Armed {
            method: method.to_owned(),
            path_contains: path_contains.to_owned(),
            hold,
        });
    }

    /// Requests held so far (count); a hold counts when it begins.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Acquire)
    }
}

impl Drop for RequestHold {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Whether `chunk` has a request line `METHOD <path with part> ...`.
fn matches(chunk: &[u8], armed: &Armed) -> bool {
    let text = String::from_utf8_lossy(chunk);
    let prefix = format!("{} ", armed.method);
    text.split("\r\n")
        .any(|line| line.starts_with(&prefix) && line.contains(&armed.path_contains))
}

/// Copies one connection both ways, holding the client's bytes once when
/// they carry the armed request.
async fn relay(client: TcpStream, server_port: u16, armed: Arc<Mutex<Option<Armed>>>, held: Arc<AtomicU64>) {
    let Ok(server) = TcpStream::connect(("127.0.0.1", server_port)).await else {
        return;
    };
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let back = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match client_read.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let hold = {
            let mut armed = armed.lock().unwrap();
            match armed.as_ref() {
                Some(a) if matches(&buf[..n], a) => armed.take().map(|a| a.hold),
                _ => None,
            }
        };
        if let Some(hold) = hold {
            held.fetch_add(1, Ordering::AcqRel);
            tokio::time::sleep(hold).await;
        }
        if server_write.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = server_write.shutdown().await;
    let _ = back.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_armed_method_and_path_match() {
        let armed = Armed {
            method: "PUT".into(),
            path_contains: ".batch".into(),
            hold: Duration::ZERO,
        };
        assert!(matches(
            b"PUT /b/records/0001.batch HTTP/1.1\r\nHost: x\r\n\r\n",
            &armed
        ));
        assert!(!matches(b"GET /b/records/0001.batch HTTP/1.1\r\n\r\n", &armed));
        assert!(!matches(b"PUT /b/watermark.json HTTP/1.1\r\n\r\n", &armed));
        assert!(
            !matches(b"body mentioning PUT x.batch", &armed),
            "not at a line start"
        );
    }
}
