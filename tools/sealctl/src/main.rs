//! sealctl: Sealgate's host CLI (benchmarks and a box's peer table now; config signing, keys
//! and images later). `main` only parses arguments and runs the subcommand.

mod client;
mod device;
mod hq;
mod image;
mod message;
mod peers;
mod sink;
mod stats;
mod tls;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgGroup, Args, Parser, Subcommand};

use crate::client::{BenchConfig, TlsMode};
use crate::sink::{Sink, SinkConfig};

/// Exit status for bad arguments (clap uses the same).
const EXIT_USAGE: u8 = 2;

/// Sealgate's host CLI.
#[derive(Debug, Parser)]
#[command(name = "sealctl", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Benchmarks: an SMTP load generator and a reference sink
    #[command(subcommand)]
    Bench(BenchCommand),
    /// The peer table of a box's state directory: list, reset
    #[command(subcommand)]
    Peers(peers::PeersCommand),
    /// Generate an HQ config-signing key pair (Ed25519): PREFIX.key and PREFIX.pub
    ///
    /// Exit status: 0 written, 1 a file exists already (never overwritten) or cannot be
    /// written, 2 usage.
    #[command(verbatim_doc_comment)]
    Keygen(hq::KeygenArgs),
    /// Signed config blobs: sign a site TOML, verify and show a blob
    #[command(subcommand)]
    Config(hq::ConfigCommand),
    /// A box's management API over HTTPS: status, push-config, push-update, reboot,
    /// peer-reset, queue
    ///
    /// The box's certificate is checked by --pin SHA256 (of its DER) or --ca CA.pem; the admin
    /// is a pinned client certificate (--cert/--key) or a bearer token (--token-file).
    ///
    /// Exit status: 0 done, 1 refused by the box (the reason and check are printed) or not
    /// reachable, 2 usage.
    #[command(verbatim_doc_comment)]
    Device(device::DeviceArgs),
    /// The appliance image: build it, sign update bundles, run it under QEMU
    #[command(subcommand)]
    Image(image::ImageCommand),
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Load-generate against any SMTP server; report throughput and latency
    ///
    /// Runs --conns concurrent sessions until --msgs messages have been sent,
    /// --per-session per connection. Latency of a message is measured from
    /// connect to the 250 after the final dot for the first message of a
    /// session, and from MAIL to that 250 for later ones.
    ///
    /// TLS (--starttls, --implicit-tls) accepts ANY server certificate
    /// (verifier `NoCertificateVerification`): this is a benchmark tool, not a
    /// mail client; never use it to send real mail.
    ///
    /// TLS session resumption is on: all connections share one client
    /// session store (rustls' in-memory store sized for --conns; TLS 1.3
    /// tickets, TLS 1.2 session ids or tickets), so sessions after the first
    /// ones resume. --no-resume turns it off (every handshake full) for
    /// comparison. Per handshake kind (full, full with HelloRetryRequest,
    /// resumed) the report gives the count, the handshake latency p50/p99
    /// (from the ClientHello until the client side of the handshake is
    /// complete) and handshakes/s = count / the wall time during which at
    /// least one handshake of that kind was in flight (overlapping
    /// handshakes count once; SMTP time is excluded). That is the rate
    /// achieved under this load, not a capacity unless the server is
    /// saturated; with many connections it follows the session rate. The
    /// kinds of one run share the load, so the report adds an "all" row:
    /// compare its rate with the full rate of a --no-resume run.
    ///
    /// Exit status: 0 if every message was accepted, 1 if any failed, 2 on
    /// usage errors.
    #[command(verbatim_doc_comment)]
    Smtp(SmtpArgs),
    /// The bare reference sink: a BENCHMARK REFERENCE, NOT A MAIL SERVER
    ///
    /// Speaks just enough SMTP (EHLO with PIPELINING, and STARTTLS with
    /// --tls-self-signed), writes each message body to a new file in --dir
    /// and fsyncs it before answering 250. Nothing else: no parsing, no
    /// checks, no relaying. It is the baseline the Sealgate performance goal
    /// is measured against. Prints "listening on ADDR" on its first line of
    /// standard output and runs until interrupted (Ctrl-C / SIGTERM).
    #[command(verbatim_doc_comment)]
    Sink(SinkArgs),
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("tls").args(["starttls", "implicit_tls"])))]
#[command(group(ArgGroup::new("resume").args(["no_resume"]).requires("tls")))]
struct SmtpArgs {
    /// Server address, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    addr: String,
    /// Concurrent connections.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    conns: u64,
    /// Messages to send in total.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    msgs: u64,
    /// Message size in bytes (header and body; the header alone is ~300 B).
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..=1 << 30))]
    size: u64,
    /// Messages per session (connection).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    per_session: u64,
    /// Upgrade with STARTTLS; accepts any certificate (see above).
    #[arg(long, conflicts_with = "implicit_tls")]
    starttls: bool,
    /// TLS from the first byte (port 465 style); accepts any certificate.
    #[arg(long)]
    implicit_tls: bool,
    /// Disable TLS session resumption: every handshake is full (compare
    /// with a run without it). Needs --starttls or --implicit-tls.
    #[arg(long)]
    no_resume: bool,
    /// Envelope sender (also the From header).
    #[arg(long, default_value = "bench@sealctl.invalid", value_parser = mailbox)]
    from: String,
    /// Envelope recipient; with --rcpts K > 1, K recipients are derived from
    /// it: local+2@domain, local+3@domain, ...
    #[arg(long, default_value = "rcpt@example.test", value_parser = mailbox)]
    to: String,
    /// Recipients per message.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1000))]
    rcpts: u64,
    /// TLS server name to send (and to key session resumption by); default:
    /// the host of --addr.
    #[arg(long, value_name = "NAME")]
    sni: Option<String>,
    /// EHLO argument.
    #[arg(long, default_value = "sealctl.invalid", value_parser = mailbox_domain)]
    helo: String,
    /// Timeout of each network operation, in seconds.
    #[arg(long, default_value_t = 30.0, value_parser = seconds)]
    timeout: f64,
    /// Print the report as a JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct SinkArgs {
    /// Address to listen on, HOST:PORT (port 0 picks a free port).
    #[arg(long, value_name = "HOST:PORT")]
    listen: String,
    /// Directory the messages are written to, one file each.
    #[arg(long)]
    dir: PathBuf,
    /// Offer STARTTLS with a fresh in-memory self-signed ECDSA P-256
    /// certificate.
    #[arg(long)]
    tls_self_signed: bool,
    /// Also fsync the directory after creating each file.
    #[arg(long, conflicts_with = "no_fsync")]
    sync_dir: bool,
    /// NOT DURABLE: answer 250 without any fsync. For a next hop that must not
    /// be the bottleneck of a relay benchmark; never a reference for acceptance.
    #[arg(long)]
    no_fsync: bool,
    /// Most concurrent sessions.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_conns: u64,
    /// Timeout of each read or write, in seconds.
    #[arg(long, default_value_t = 60.0, value_parser = seconds)]
    timeout: f64,
}

/// A mailbox without characters that could break the SMTP command line.
fn mailbox(s: &str) -> Result<String, String> {
    if s.is_empty()
        || s.bytes()
            .any(|b| b.is_ascii_control() || b == b' ' || b == b'<' || b == b'>')
    {
        return Err("must be non-empty, without spaces, controls or angle brackets".into());
    }
    Ok(s.to_owned())
}

fn mailbox_domain(s: &str) -> Result<String, String> {
    mailbox(s)
}

fn seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 86_400.0 => Ok(v),
        _ => Err("must be a number of seconds in (0, 86400]".into()),
    }
}

/// `count` recipients derived from `to`: `to` itself, then `local+N@domain`.
fn recipients(to: &str, count: u64) -> Vec<String> {
    let (local, domain) = to.rsplit_once('@').unwrap_or((to, ""));
    (1..=count)
        .map(|i| match (i, domain.is_empty()) {
            (1, _) => to.to_owned(),
            (_, true) => format!("{local}+{i}"),
            (_, false) => format!("{local}+{i}@{domain}"),
        })
        .collect()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let cli = match cli.command {
        Command::Peers(cmd) => return peers::run(cmd),
        Command::Keygen(args) => return hq::keygen(args),
        Command::Config(cmd) => return hq::config(cmd),
        Command::Device(args) => return device::run(args),
        Command::Image(cmd) => return image::run(cmd),
        other => Cli { command: other },
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("sealctl: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Bench(BenchCommand::Smtp(args)) => runtime.block_on(bench_smtp(args)),
        Command::Bench(BenchCommand::Sink(args)) => runtime.block_on(bench_sink(args)),
        Command::Peers(cmd) => peers::run(cmd),
        Command::Keygen(args) => hq::keygen(args),
        Command::Config(cmd) => hq::config(cmd),
        Command::Device(args) => device::run(args),
        Command::Image(cmd) => image::run(cmd),
    }
}

async fn bench_smtp(args: SmtpArgs) -> ExitCode {
    let mode = match (args.starttls, args.implicit_tls) {
        (true, _) => TlsMode::StartTls,
        (_, true) => TlsMode::Implicit,
        _ => TlsMode::Plain,
    };
    let Ok(size) = usize::try_from(args.size) else {
        eprintln!("sealctl: --size too large for this machine");
        return ExitCode::from(EXIT_USAGE);
    };
    let cfg = BenchConfig {
        addr: args.addr,
        conns: args.conns,
        msgs: args.msgs,
        per_session: args.per_session,
        size,
        mode,
        resume: !args.no_resume,
        from: args.from,
        rcpts: recipients(&args.to, args.rcpts),
        sni: args.sni,
        helo: args.helo,
        timeout: Duration::from_secs_f64(args.timeout),
    };
    match client::run(cfg).await {
        Ok(report) => {
            if args.json {
                println!("{}", report.to_json());
            } else {
                print!("{}", report.to_text());
            }
            if report.all_accepted() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("sealctl bench smtp: {e}");
            if e.is_usage() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

async fn bench_sink(args: SinkArgs) -> ExitCode {
    let tls = if args.tls_self_signed {
        match tls::self_signed_server_config(&["localhost", "sealctl-sink.invalid"]) {
            Ok(config) => Some(config),
            Err(e) => {
                eprintln!("sealctl bench sink: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    let cfg = SinkConfig {
        dir: args.dir,
        tls,
        timeout: Duration::from_secs_f64(args.timeout),
        max_conns: usize::try_from(args.max_conns).unwrap_or(usize::MAX),
        sync_dir: args.sync_dir,
        no_fsync: args.no_fsync,
    };
    let sink = match Sink::bind(&args.listen, cfg).await {
        Ok(sink) => sink,
        Err(e) => {
            eprintln!("sealctl bench sink: {e}");
            return ExitCode::FAILURE;
        }
    };
    match sink.local_addr() {
        Ok(addr) => println!("listening on {addr}"),
        Err(e) => {
            eprintln!("sealctl bench sink: {e}");
            return ExitCode::FAILURE;
        }
    }
    let stored = sink.run(shutdown_signal()).await;
    eprintln!("sealctl bench sink: stopped, {stored} messages stored");
    ExitCode::SUCCESS
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => ctrl_c.await,
        }
    }
    #[cfg(not(unix))]
    ctrl_c.await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn derived_recipients() {
        assert_eq!(recipients("r@x.test", 1), ["r@x.test"]);
        assert_eq!(
            recipients("r@x.test", 3),
            ["r@x.test", "r+2@x.test", "r+3@x.test"]
        );
    }

    #[test]
    fn argument_checks() {
        assert!(mailbox("a@b").is_ok());
        assert!(mailbox("a@b>\r\nRCPT").is_err());
        assert!(mailbox("").is_err());
        assert!(seconds("0").is_err());
        assert!(seconds("1.5").is_ok());
        let parsed = Cli::try_parse_from([
            "sealctl",
            "bench",
            "smtp",
            "--addr",
            "127.0.0.1:25",
            "--starttls",
            "--implicit-tls",
        ]);
        assert!(parsed.is_err());
        let bench = |extra: &[&str]| {
            let mut argv = vec!["sealctl", "bench", "smtp", "--addr", "127.0.0.1:25"];
            argv.extend_from_slice(extra);
            Cli::try_parse_from(argv)
        };
        // --no-resume only with TLS.
        assert!(bench(&["--no-resume"]).is_err());
        for tls in ["--starttls", "--implicit-tls"] {
            let Ok(Cli {
                command: Command::Bench(BenchCommand::Smtp(args)),
            }) = bench(&[tls, "--no-resume"])
            else {
                panic!("{tls} --no-resume rejected");
            };
            assert!(args.no_resume);
        }
        let Ok(Cli {
            command: Command::Bench(BenchCommand::Smtp(args)),
        }) = bench(&["--starttls"])
        else {
            panic!("--starttls rejected");
        };
        assert!(!args.no_resume);
    }
}
