//! Reading a topic without a consumer group ([`EventBus::browse`]), up to
//! its end: the end is when nothing arrived for `idle` (brokers differ in
//! how, and whether truly, they report a log's end; tansu's log-end offsets
//! are wrong), or when the command is interrupted.

use std::time::Duration;

use eventbus::{BrowsedMessage, EventBus, Result};
use futures::StreamExt;
use futures::stream::BoxStream;
use tokio_util::sync::CancellationToken;

/// What waiting for the next message gave.
#[derive(Debug)]
pub(crate) enum Next {
    /// A message.
    Message(Box<BrowsedMessage>),
    /// Nothing for the idle time: the reader is at the topic's end.
    Idle,
    /// The command was interrupted (SIGINT, SIGTERM), or the stream ended.
    Stopped,
}

/// A topic being read from its first message.
pub(crate) struct Reader {
    stream: BoxStream<'static, Result<BrowsedMessage>>,
    idle: Duration,
    stop: CancellationToken,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("idle", &self.idle)
            .finish_non_exhaustive()
    }
}

impl Reader {
    /// Starts reading `topic` from its first stored message.
    ///
    /// # Errors
    /// What [`EventBus::browse`] returns (`NotFound` when nothing stores the topic).
    pub(crate) async fn open(
        bus: &EventBus,
        topic: &str,
        idle: Duration,
        stop: CancellationToken,
    ) -> Result<Self> {
        Ok(Self {
            stream: bus.browse(topic).await?,
            idle,
            stop,
        })
    }

    /// The next message, [`Next::Idle`] after `idle` without one, or
    /// [`Next::Stopped`].
    ///
    /// # Errors
    /// The broker's error while reading.
    pub(crate) async fn next(&mut self) -> Result<Next> {
        tokio::select! {
            item = tokio::time::timeout(self.idle, self.stream.next()) => match item {
                Ok(Some(Ok(m))) => Ok(Next::Message(Box::new(m))),
                Ok(Some(Err(e))) => Err(e),
                Ok(None) => Ok(Next::Stopped),
                Err(_) => Ok(Next::Idle),
            },
            _ = self.stop.cancelled() => Ok(Next::Stopped),
        }
    }

    /// Every message up to the topic's end (or the interruption).
    ///
    /// # Errors
    /// The broker's error while reading.
    pub(crate) async fn read_to_end(&mut self) -> Result<Vec<BrowsedMessage>> {
        let mut out = Vec::new();
        while let Next::Message(m) = self.next().await? {
            out.push(*m);
        }
        Ok(out)
    }
}
