//! `sealgate`: the gateway daemon's command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use sealgate::daemon::{ConfigSource, run};

/// Sealgate secure mail gateway.
///
/// Without --config it runs the embedded default: a demo gateway on 127.0.0.1 (SMTP with
/// STARTTLS on 2525, implicit TLS on 4465) that delivers mail for example.test into
/// STATE/maildir, trusts 127.0.0.0/8 for relaying, and uses a generated self-signed
/// certificate.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Config file (TOML, dev board only; see docs/config.md).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// State directory: spool, certificates, Maildir of the demo.
    #[arg(long, value_name = "DIR", default_value = "var", global = true)]
    state: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Inspect the mail queue of a state directory (read-only; works while the daemon runs).
    Queue {
        #[command(subcommand)]
        command: QueueCommand,
    },
}

#[derive(Debug, clap::Subcommand)]
enum QueueCommand {
    /// List queued messages with each recipient's status and last error.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Queue {
        command: QueueCommand::List { json },
    }) = cli.command
    {
        return match sealgate::queue_list::print(&cli.state.join("queue"), json) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("sealgate queue list: {e}");
                ExitCode::FAILURE
            }
        };
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SEALGATE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sealgate: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let source = match cli.config {
        Some(p) => ConfigSource::File(p),
        None => ConfigSource::Embedded,
    };
    match runtime.block_on(run(source, &cli.state)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sealgate: {e}");
            ExitCode::FAILURE
        }
    }
}
