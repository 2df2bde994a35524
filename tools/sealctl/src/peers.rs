//! `sealctl peers`: the peer table (F-PEERS) of a box's state directory — list it as a table or
//! JSON, and reset a peer — whether the daemon runs or not. While it runs, the daemon owns
//! `peers.json` and a reset is a request it applies within a second; while it does not, sealctl
//! takes the state directory's lock and rewrites the table itself.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use sealgate_board::{BoardError, DevBoard};
use sealgate_core::peers::{self, PeersError};
use sealgate_core::time::unix_now;
use sealgate_proto::policy::PeerMatch;

/// Bound of a table read by sealctl (the daemon's own bound is `tls.max_peers`).
const MAX_PEERS: usize = 1_000_000;

#[derive(Debug, Subcommand)]
pub enum PeersCommand {
    /// Show the peer table: STARTTLS offered, last TLS, TLS-broken mark, downgrade flag, counts
    List(ListArgs),
    /// Forget a peer's TLS history (last TLS, broken mark, downgrade flag; counts stay), so
    /// that the next delivery to it starts afresh
    Reset(ResetArgs),
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// The box's state directory
    #[arg(long, default_value = "var")]
    state: PathBuf,
    /// Print JSON (`{"format": 1, "peers": [...]}`) instead of a table
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct ResetArgs {
    /// The box's state directory
    #[arg(long, default_value = "var")]
    state: PathBuf,
    /// An IP address (every name seen at it) or a host name (every address seen under it)
    peer: String,
    /// Seconds to wait for a running daemon to apply the reset
    #[arg(long, default_value_t = 10)]
    wait: u64,
}

pub fn run(cmd: PeersCommand) -> ExitCode {
    let result = match cmd {
        PeersCommand::List(a) => list(&a),
        PeersCommand::Reset(a) => reset(&a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sealctl peers: {e}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("{0}: no such state directory")]
    NoState(PathBuf),
    #[error(transparent)]
    Peers(#[from] PeersError),
    #[error(transparent)]
    Board(#[from] BoardError),
    #[error(
        "the running gateway did not apply the reset within {secs} s; the request stays \
         queued at {path}"
    )]
    NotApplied { secs: u64, path: PathBuf },
}

fn state_dir(p: &Path) -> Result<&Path, Error> {
    if p.is_dir() {
        Ok(p)
    } else {
        Err(Error::NoState(p.to_path_buf()))
    }
}

fn list(a: &ListArgs) -> Result<ExitCode, Error> {
    let (table, clients) = peers::load_all(state_dir(&a.state)?, MAX_PEERS)?;
    let file = peers::to_file(&table, &clients);
    if a.json {
        match serde_json::to_string_pretty(&file) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("sealctl peers: {e}");
                return Ok(ExitCode::FAILURE);
            }
        }
    } else {
        print!("{}", peers::render(&file, unix_now()));
    }
    Ok(ExitCode::SUCCESS)
}

fn reset(a: &ResetArgs) -> Result<ExitCode, Error> {
    let dir = state_dir(&a.state)?;
    let which = PeerMatch::parse(&a.peer);
    match DevBoard::lock_only(dir) {
        Ok(_lock) => {
            // No daemon: apply it (and any requests left over) under the lock ourselves.
            let (mut table, clients) = peers::load_all(dir, MAX_PEERS)?;
            let pending = peers::pending_resets(dir);
            peers::apply_resets(&mut table, &pending);
            let n = table.reset(&which);
            peers::save(dir, &table, &clients)?;
            for (p, _) in pending {
                let _ = std::fs::remove_file(p);
            }
            Ok(report(n, &a.peer, ""))
        }
        Err(BoardError::Busy(_)) => {
            let saved = peers::load(dir, MAX_PEERS)?;
            let n = saved.iter().filter(|(k, _)| which.matches(k)).count();
            let path = peers::request_reset(dir, &a.peer)?;
            let deadline = Instant::now() + Duration::from_secs(a.wait);
            while path.exists() {
                if Instant::now() >= deadline {
                    return Err(Error::NotApplied { secs: a.wait, path });
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(report(n, &a.peer, " (applied by the running gateway)"))
        }
        Err(e) => Err(e.into()),
    }
}

fn report(n: usize, peer: &str, how: &str) -> ExitCode {
    if n == 0 {
        eprintln!("sealctl peers: no peer matches {peer}{how}");
        return ExitCode::FAILURE;
    }
    println!("reset {n} peer record(s) matching {peer}{how}");
    ExitCode::SUCCESS
}
