//! The one set of backend arguments every command takes (`--backend`,
//! `--nats-url`, `--kafka-brokers`), and the one place a bus is built from
//! them ([`Target::bus`]).

use clap::{Args, ValueEnum};
use eventbus::kafka::{KafkaBackend, KafkaConfig, KafkaConsumer};
use eventbus::nats::{NatsBackend, NatsConfig};
use eventbus::{BusConfig, Error, EventBus, Result};
use eventbus_testkit::server::{NatsServer, TansuServer};

/// The fetch wait, in ms, of a Kafka member against the tansu this CLI
/// starts: tansu 0.6 holds every fetch for the whole wait, so librdkafka's
/// 500 ms would make each fetch take a quarter to a half second
/// (`KafkaConsumer::fetch_wait_max_ms`).
const TANSU_FETCH_WAIT_MS: u64 = 20;

/// A backend to talk to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum BackendKind {
    /// The in-process memory backend (nothing outside the process sees its events).
    Memory,
    /// NATS JetStream (`--nats-url`).
    Nats,
    /// Kafka (`--kafka-brokers`).
    Kafka,
    /// Every backend in turn (`bench` only).
    All,
}

impl BackendKind {
    /// The backends this choice stands for, in order.
    pub(crate) fn each(self) -> Vec<BackendKind> {
        match self {
            Self::All => vec![Self::Memory, Self::Nats, Self::Kafka],
            one => vec![one],
        }
    }
}

/// Where the brokers are.
#[derive(Clone, Args)]
pub(crate) struct BrokerArgs {
    /// NATS server URLs, comma-separated (credentials in a URL are used and
    /// never printed). Default: `bench` starts a local nats-server; other
    /// commands use the settings' `[nats] servers` (nats://127.0.0.1:4222).
    #[arg(long, env = "EVENTBUS_NATS_URL", hide_env_values = true)]
    pub(crate) nats_url: Option<String>,
    /// Kafka bootstrap brokers, comma-separated. Default: `bench` starts a
    /// local tansu broker (in memory; its members fetch with a 20 ms wait
    /// unless the settings choose a wait other than the default 500 ms);
    /// other commands use the settings' `[kafka] brokers`, else
    /// 127.0.0.1:9092.
    #[arg(long, env = "EVENTBUS_KAFKA_BROKERS")]
    pub(crate) kafka_brokers: Option<String>,
    /// One settings file (TOML, or YAML for .yaml/.yml) with sections
    /// `[bus]` (`BusConfig`), `[nats]` (`NatsConfig`: TLS, auth, streams),
    /// `[kafka]` (`KafkaConfig`: SASL, SSL, librdkafka properties) and, for
    /// `outbox relay`, `[relay]` (`RelayConfig`); each section is optional. `--nats-config`, `--kafka-config` and the flags
    /// take precedence; `EVENTBUS_*` variables override `[bus]`. Put secrets
    /// in the environment or in files the settings name, not on the command
    /// line; they are never printed.
    #[arg(long, env = "EVENTBUS_CONFIG")]
    pub(crate) config: Option<std::path::PathBuf>,
    /// NATS client settings (`NatsConfig`) from a TOML file; `--nats-url`
    /// replaces its `servers`.
    #[arg(long, env = "EVENTBUS_NATS_CONFIG")]
    pub(crate) nats_config: Option<std::path::PathBuf>,
    /// Kafka client settings (`KafkaConfig`) from a TOML file, e.g.
    /// `[consumer] fetch_wait_max_ms = 20` against tansu 0.6 in memory;
    /// `--kafka-brokers` replaces its `brokers`.
    #[arg(long, env = "EVENTBUS_KAFKA_CONFIG")]
    pub(crate) kafka_config: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for BrokerArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerArgs")
            .field("nats_url", &self.nats_url.as_deref().map(eventbus::redact_url))
            .field("kafka_brokers", &self.kafka_brokers)
            .field("config", &self.config)
            .field("nats_config", &self.nats_config)
            .field("kafka_config", &self.kafka_config)
            .finish()
    }
}

/// The figment provider of a settings file: YAML for `.yaml`/`.yml`, else TOML.
fn file_provider(path: &std::path::Path) -> figment::Figment {
    use figment::providers::Format as _;
    match path.extension().and_then(|e| e.to_str()) {
        Some("yaml" | "yml") => figment::Figment::from(figment::providers::Yaml::file_exact(path)),
        _ => figment::Figment::from(figment::providers::Toml::file_exact(path)),
    }
}

/// Settings of type `T`: `T::default()`, then section `section` of the
/// `--config` file, then the whole of the section's own file (`own`).
pub(crate) fn settings<T: serde::de::DeserializeOwned + serde::Serialize + Default>(
    config: Option<&std::path::Path>,
    section: &str,
    own: Option<&std::path::Path>,
) -> Result<T> {
    let mut figment = figment::Figment::from(figment::providers::Serialized::defaults(T::default()));
    let mut shown = Vec::new();
    if let Some(path) = config {
        figment = figment.merge(file_provider(path).focus(section));
        shown.push(format!("[{section}] of {}", path.display()));
    }
    if let Some(path) = own {
        figment = figment.merge(file_provider(path));
        shown.push(path.display().to_string());
    }
    figment.extract().map_err(|e| {
        // The error quotes the offending value, which may be a URL with credentials.
        let message = eventbus::redact_url(&e.to_string()).into_owned();
        Error::config(format!("invalid settings in {}: {message}", shown.join(" or ")))
    })
}

impl BrokerArgs {
    /// The bus settings: defaults, `[bus]` of `--config`, `EVENTBUS_*` variables.
    ///
    /// # Errors
    /// `Config` naming the file and the bad key.
    pub(crate) fn bus_config(&self) -> Result<BusConfig> {
        use figment::providers::Serialized;
        let mut figment = figment::Figment::from(Serialized::defaults(BusConfig::default()));
        if let Some(path) = &self.config {
            figment = figment.merge(file_provider(path).focus("bus"));
        }
        let config: BusConfig = figment.merge(BusConfig::env()).extract().map_err(|e| {
            let message = eventbus::redact_url(&e.to_string()).into_owned();
            Error::config(format!("invalid bus settings: {message}"))
        })?;
        config.validate()?;
        Ok(config)
    }
}

/// What to do when a broker address is not given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WhenMissing {
    /// Start a throwaway local server (benchmarks).
    StartLocal,
    /// Use the client's usual local address.
    DefaultAddress,
}

/// A backend with its address, and the local server started for it, if any
/// (stopped when the target is dropped).
pub(crate) enum Target {
    Memory,
    Nats {
        url: String,
        config: Box<NatsConfig>,
        _server: Option<NatsServer>,
    },
    Kafka {
        brokers: String,
        config: Box<KafkaConfig>,
        _server: Option<TansuServer>,
    },
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Target {
    /// The target for one backend `kind` (not `All`).
    ///
    /// # Errors
    /// `Config` for `All`; what starting a local server returns.
    pub(crate) async fn connect(
        kind: BackendKind,
        brokers: &BrokerArgs,
        missing: WhenMissing,
    ) -> Result<Self> {
        let file = brokers.config.as_deref();
        let nats: Box<NatsConfig> = Box::new(settings(file, "nats", brokers.nats_config.as_deref())?);
        let kafka: Box<KafkaConfig> = Box::new(settings(file, "kafka", brokers.kafka_config.as_deref())?);
        Ok(match kind {
            BackendKind::Memory => Self::Memory,
            BackendKind::Nats => match (&brokers.nats_url, missing) {
                (Some(url), _) => Self::Nats {
                    url: url.clone(),
                    config: nats,
                    _server: None,
                },
                // The settings' servers (`[nats] servers`; default nats://127.0.0.1:4222).
                (None, WhenMissing::DefaultAddress) => Self::Nats {
                    url: nats.servers.join(","),
                    config: nats,
                    _server: None,
                },
                (None, WhenMissing::StartLocal) => {
                    let server = NatsServer::start().await?;
                    eprintln!("started nats-server on {}", server.url());
                    Self::Nats {
                        url: server.url(),
                        config: nats,
                        _server: Some(server),
                    }
                }
            },
            BackendKind::Kafka => match (&brokers.kafka_brokers, missing) {
                (Some(b), _) => Self::Kafka {
                    brokers: b.clone(),
                    config: kafka,
                    _server: None,
                },
                // The settings' brokers (`[kafka] brokers`), else 127.0.0.1:9092.
                (None, WhenMissing::DefaultAddress) => Self::Kafka {
                    brokers: match kafka.brokers.is_empty() {
                        true => "127.0.0.1:9092".into(),
                        false => kafka.brokers.join(","),
                    },
                    config: kafka,
                    _server: None,
                },
                (None, WhenMissing::StartLocal) => {
                    let server = TansuServer::start().await?;
                    eprintln!("started tansu on {}", server.bootstrap());
                    let mut kafka = kafka;
                    // tansu 0.6 in memory holds every fetch for the whole
                    // wait: unless the settings chose a wait other than the
                    // default, 20 ms (KafkaConsumer::fetch_wait_max_ms).
                    if kafka.consumer.fetch_wait_max_ms == KafkaConsumer::default().fetch_wait_max_ms {
                        kafka.consumer.fetch_wait_max_ms = TANSU_FETCH_WAIT_MS;
                    }
                    Self::Kafka {
                        brokers: server.bootstrap(),
                        config: kafka,
                        _server: Some(server),
                    }
                }
            },
            BackendKind::All => return Err(Error::config("choose one backend: memory, nats or kafka")),
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

    /// `n` fresh buses over this backend, each its own connection (memory:
    /// clients of one in-process broker), for the members of one group.
    /// With more than one, NATS topics are split into 8 partitions (unless
    /// the NATS settings already partition them), so the members share them.
    ///
    /// # Errors
    /// What connecting the backend returns (`Connection`, `Config`).
    pub(crate) async fn group_buses(&self, n: usize, config: BusConfig) -> Result<Vec<EventBus>> {
        let mut buses = Vec::with_capacity(n);
        match self {
            Self::Memory => {
                let broker = eventbus::MemoryBackend::new(config.memory.clone());
                for _ in 0..n {
                    buses.push(EventBus::new(broker.connect(), config.clone())?);
                }
            }
            Self::Nats {
                url, config: nats, ..
            } if n > 1 => {
                for _ in 0..n {
                    let mut nats = NatsConfig {
                        servers: url.split(',').map(str::to_owned).collect(),
                        ..(**nats).clone()
                    };
                    if nats.partitions.is_empty() {
                        nats.partitions.insert(">".into(), 8);
                    }
                    buses.push(EventBus::new(NatsBackend::connect(nats).await?, config.clone())?);
                }
            }
            _ => {
                for _ in 0..n {
                    buses.push(self.bus(config.clone()).await?);
                }
            }
        }
        Ok(buses)
    }

    /// Sets what the backend does with the streams or topics its settings
    /// declare, at connect (`eventbus topics`); under `ValidateOnly`, Kafka
    /// creates no topic on first use either.
    pub(crate) fn set_provision(&mut self, strategy: eventbus::ProvisionStrategy) {
        match self {
            Self::Memory => {}
            Self::Nats { config, .. } => config.provision = strategy,
            Self::Kafka { config, .. } => {
                config.provision = strategy;
                if strategy == eventbus::ProvisionStrategy::ValidateOnly {
                    config.auto_create_topics = false;
                }
            }
        }
    }

    /// A fresh client of this backend (provisioning what its settings
    /// declare, per their `provision` strategy).
    ///
    /// # Errors
    /// What connecting the backend returns (`Connection`, `Config`,
    /// `NotFound`, `Conflict`).
    pub(crate) async fn backend(&self) -> Result<std::sync::Arc<dyn eventbus::Backend>> {
        Ok(match self {
            Self::Memory => std::sync::Arc::new(eventbus::MemoryBackend::new(Default::default())),
            Self::Nats {
                url, config: nats, ..
            } => {
                let nats = NatsConfig {
                    servers: url.split(',').map(str::to_owned).collect(),
                    ..(**nats).clone()
                };
                std::sync::Arc::new(NatsBackend::connect(nats).await?)
            }
            Self::Kafka {
                brokers,
                config: kafka,
                ..
            } => {
                let kafka = KafkaConfig {
                    brokers: brokers.split(',').map(str::to_owned).collect(),
                    ..(**kafka).clone()
                };
                std::sync::Arc::new(KafkaBackend::connect(kafka).await?)
            }
        })
    }

    /// A fresh bus over this backend.
    ///
    /// # Errors
    /// What connecting the backend returns (`Connection`, `Config`).
    pub(crate) async fn bus(&self, config: BusConfig) -> Result<EventBus> {
        match self {
            Self::Memory => EventBus::memory_with(config),
            _ => EventBus::from_arc(self.backend().await?, config),
        }
    }
}
