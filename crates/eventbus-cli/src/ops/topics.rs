//! `eventbus topics ensure|validate`: provision, or check, the streams and
//! topics a settings file declares, with the one provisioning strategy type
//! ([`ProvisionStrategy`]).

use clap::{Args, Subcommand};
use eventbus::{ProvisionStrategy, Result};

use crate::backends::{BackendKind, BrokerArgs, Target, WhenMissing};

/// `eventbus topics` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum TopicsCommand {
    /// Create what is missing and update what differs: the NATS streams
    /// (`[nats] streams`) or Kafka topics (`[kafka] topics`) of the
    /// settings, then each TOPIC given (NATS: its stream from
    /// `topic_streams`; Kafka: created with `default_topic`).
    Ensure(TopicsArgs),
    /// Change nothing; fail naming the first stream or topic that is
    /// missing (`NotFound`) or differs from the settings (`Conflict`).
    Validate(TopicsArgs),
}

/// Options of `eventbus topics`.
#[derive(Debug, Args)]
pub(crate) struct TopicsArgs {
    /// Topics to check beyond those the settings declare.
    topics: Vec<String>,
    /// The broker.
    #[arg(long, value_enum, default_value_t = BackendKind::Nats)]
    backend: BackendKind,
    #[command(flatten)]
    brokers: BrokerArgs,
    /// With `ensure`: create missing ones only, never change existing ones.
    #[arg(long)]
    create_only: bool,
}

pub(crate) async fn run(command: TopicsCommand) -> Result<()> {
    let (args, strategy) = match command {
        TopicsCommand::Ensure(args) => {
            let strategy = match args.create_only {
                true => ProvisionStrategy::CreateOnly,
                false => ProvisionStrategy::CreateOrUpdate,
            };
            (args, strategy)
        }
        TopicsCommand::Validate(args) => (args, ProvisionStrategy::ValidateOnly),
    };
    let mut target = Target::connect(args.backend, &args.brokers, WhenMissing::DefaultAddress).await?;
    target.set_provision(strategy);
    // Connecting provisions (or validates) what the settings declare.
    let backend = target.backend().await?;
    println!("{} settings: {strategy:?} done", target.name());
    for topic in &args.topics {
        eventbus::validate_topic(topic)?;
        backend.check_publishable(topic).await?;
        println!("{topic}: ok");
    }
    backend.close().await
}
