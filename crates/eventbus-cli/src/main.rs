//! `eventbus`: the event bus's command-line tool.
#![warn(missing_docs, unreachable_pub)]

mod bench;

use clap::{Parser, Subcommand};

/// Event bus tools.
#[derive(Debug, Parser)]
#[command(name = "eventbus", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the original SDK's performance scenario and reports honest figures.
    Bench(bench::BenchArgs),
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let outcome = match Cli::parse().command {
        Command::Bench(args) => bench::run(args).await,
    };
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
