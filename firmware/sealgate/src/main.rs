//! `sealgate`: the gateway daemon's command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use sealgate::daemon::{ConfigSource, run};
use sealgate_board::{Board, DevBoard};

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
    /// Install the first trusted config-signing keys into the sealed store (once; later keys
    /// change only by a signed config blob). The gateway must not be running.
    Provision {
        /// An HQ public key (`sealctl keygen` writes PREFIX.pub); repeatable.
        #[arg(long = "trust", value_name = "KEY.pub", required = true)]
        trust: Vec<PathBuf>,
    },
    /// Show this box's identity and trusted state: serial, sealed store generation, trusted
    /// config-signing keys, applied config sequence. The gateway must not be running.
    Device,
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
    match &cli.command {
        Some(Command::Provision { trust }) => return report(provision(&cli.state, trust)),
        Some(Command::Device) => return report(device(&cli.state)),
        _ => {}
    }
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

fn report(r: Result<String, String>) -> ExitCode {
    match r {
        Ok(s) => {
            print!("{s}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sealgate: {e}");
            ExitCode::FAILURE
        }
    }
}

fn open_store(
    state: &std::path::Path,
) -> Result<(DevBoard, sealgate::sealed::SealedStore), String> {
    let board = DevBoard::open(state).map_err(|e| e.to_string())?;
    let store =
        sealgate::sealed::SealedStore::open(&board.sealed_dir(), board.secret(), board.serial())
            .map_err(|e| e.to_string())?;
    Ok((board, store))
}

fn provision(state: &std::path::Path, files: &[PathBuf]) -> Result<String, String> {
    let keys = files
        .iter()
        .map(|f| sealgate::blob::read_public_key(f).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    let (board, mut store) = open_store(state)?;
    sealgate::site::provision(&mut store, &keys).map_err(|e| e.to_string())?;
    store.commit().map_err(|e| e.to_string())?;
    let ids: Vec<String> = keys
        .iter()
        .map(|k| sealgate::blob::key_id_hex(&sealgate::blob::key_id(k)))
        .collect();
    Ok(format!(
        "provisioned {}: trusting config-signing key(s) {}\n",
        board.serial(),
        ids.join(", ")
    ))
}

fn device(state: &std::path::Path) -> Result<String, String> {
    let (board, store) = open_store(state)?;
    let keys: Vec<String> = sealgate::site::trusted(&store)
        .keys()
        .map(sealgate::blob::key_id_hex)
        .collect();
    let seq = sealgate::site::stored_sequence(&store)
        .map(|s| s.to_string())
        .unwrap_or_else(|| "none".into());
    Ok(format!(
        "serial: {}\nsealed store generation: {}\ntrusted config keys: {}\nconfig sequence: {seq}\n",
        board.serial(),
        store.generation(),
        if keys.is_empty() {
            "none (not provisioned)".to_string()
        } else {
            keys.join(", ")
        },
    ))
}
