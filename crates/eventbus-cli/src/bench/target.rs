//! The broker a bench runs against: given by URL, or started locally.

use eventbus::kafka::{KafkaBackend, KafkaConfig};
use eventbus::nats::{NatsBackend, NatsConfig};
use eventbus::{BusConfig, EventBus, Result};
use eventbus_testkit::server::{NatsServer, TansuServer};

/// A backend to bench, with the local server it started, if any.
pub(crate) enum Target {
    Memory,
    Nats {
        url: String,
        _server: Option<NatsServer>,
    },
    Kafka {
        brokers: String,
        _server: Option<TansuServer>,
    },
}

impl Target {
    /// The memory backend.
    pub(crate) fn memory() -> Self {
        Self::Memory
    }

    /// NATS at `url`, or a local `nats-server` started now when `url` is `None`.
    pub(crate) async fn nats(url: Option<String>) -> Result<Self> {
        Ok(match url {
            Some(url) => Self::Nats { url, _server: None },
            None => {
                let server = NatsServer::start().await?;
                eprintln!("started nats-server on {}", server.url());
                Self::Nats {
                    url: server.url(),
                    _server: Some(server),
                }
            }
        })
    }

    /// Kafka at `brokers`, or a local tansu broker started now when `brokers` is `None`.
    pub(crate) async fn kafka(brokers: Option<String>) -> Result<Self> {
        Ok(match brokers {
            Some(brokers) => Self::Kafka {
                brokers,
                _server: None,
            },
            None => {
                let server = TansuServer::start().await?;
                eprintln!("started tansu on {}", server.bootstrap());
                Self::Kafka {
                    brokers: server.bootstrap(),
                    _server: Some(server),
                }
            }
        })
    }

    /// The backend's name.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::Nats { .. } => "nats",
            Self::Kafka { .. } => "kafka",
        }
    }

    /// A fresh bus over this backend.
    pub(crate) async fn bus(&self, config: BusConfig) -> Result<EventBus> {
        match self {
            Self::Memory => EventBus::memory_with(config),
            Self::Nats { url, .. } => {
                let backend = NatsBackend::connect(NatsConfig::with_servers([url.clone()])).await?;
                EventBus::new(backend, config)
            }
            Self::Kafka { brokers, .. } => {
                let backend = KafkaBackend::connect(KafkaConfig::with_brokers(brokers.split(','))).await?;
                EventBus::new(backend, config)
            }
        }
    }
}
