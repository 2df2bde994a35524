//! `sealgate`: the gateway daemon's command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use sealgate::service::{ConfigSource, run};
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
    /// Keys made on this box (F-SEAL). The gateway must not be running.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Certificates in the sealed store. The gateway must not be running.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Run as PID 1 of the appliance image (started by the stage-1 loader, not by hand):
    /// mounts the data and sealed partitions, runs the gateway on the last applied signed
    /// config, pets the watchdog and marks the slot successful after its health check.
    Appliance {
        /// The slot the loader booted (a or b).
        #[arg(long)]
        slot: sealgate_image::bootctl::Slot,
        /// The version of the slot's verified bundle.
        #[arg(long)]
        version: sealgate_image::version::Version,
    },
    /// Show this box's identity and trusted state: serial, identity and encryption keys,
    /// sealed store generation, trusted config-signing keys, applied config sequence. The
    /// gateway must not be running.
    Device {
        /// Print only the encryption key (64 hex digits): the BOX.pub file that `sealctl config
        /// sign --secret … --device-key BOX.pub` encrypts secrets to
        #[arg(long)]
        encryption_key: bool,
    },
}

#[derive(Debug, clap::Subcommand)]
enum KeysCommand {
    /// Make an ECDSA P-256 key inside the sealed store and write a CSR (PKCS#10; CN = the
    /// first --dns name, SAN = every one); the key waits for its certificate (`certs import`)
    /// while the current certificate of NAME, if any, keeps serving.
    Generate {
        #[arg(long)]
        name: String,
        /// DNS names for the certificate (repeatable; the first is the CN)
        #[arg(long = "dns", required = true)]
        dns: Vec<String>,
        /// Where to write the CSR (default: stdout)
        #[arg(long, value_name = "FILE")]
        csr: Option<PathBuf>,
    },
}

#[derive(Debug, clap::Subcommand)]
enum CertsCommand {
    /// Install a certificate for NAME: for the key `keys generate` made, or with --key for an
    /// externally made key. Checked first: chain order and signatures, key match, validity,
    /// names, serverAuth; each failure named.
    Import {
        #[arg(long)]
        name: String,
        /// The certificate (PEM; may already hold the chain, leaf first)
        cert: PathBuf,
        /// Intermediate certificates (PEM), after the leaf
        #[arg(long, value_name = "FILE")]
        chain: Option<PathBuf>,
        /// An externally made private key (PEM: PKCS#8, SEC1 or PKCS#1)
        #[arg(long, value_name = "FILE")]
        key: Option<PathBuf>,
        /// Names the certificate must carry (default: the names given to `keys generate`)
        #[arg(long = "dns")]
        dns: Vec<String>,
    },
    /// List certificates: name, subject, SANs, expiry, SHA-256 fingerprint
    List,
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
        Some(Command::Device { encryption_key }) => {
            return report(device(&cli.state, *encryption_key));
        }
        Some(Command::Keys {
            command: KeysCommand::Generate { name, dns, csr },
        }) => return report(keys_generate(&cli.state, name, dns, csr.as_deref())),
        Some(Command::Certs {
            command:
                CertsCommand::Import {
                    name,
                    cert,
                    chain,
                    key,
                    dns,
                },
        }) => {
            return report(certs_import(
                &cli.state,
                name,
                cert,
                chain.as_deref(),
                key.as_deref(),
                dns,
            ));
        }
        Some(Command::Certs {
            command: CertsCommand::List,
        }) => return report(certs_list(&cli.state)),
        _ => {}
    }
    if let Some(Command::Queue {
        command: QueueCommand::List { json },
    }) = cli.command
    {
        return match sealgate_core::queue_list::print(&cli.state.join("queue"), json) {
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
    match sealgate_board::appliance::raise_nofile_limit() {
        Some(n) => tracing::debug!(limit = n, "open files limit"),
        None => tracing::warn!("cannot raise the open files limit"),
    }
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
    if let Some(Command::Appliance { slot, version }) = cli.command {
        // PID 1 never just exits (that is a kernel panic): it says why, syncs and reboots;
        // on a trial boot that costs the slot a try.
        match runtime.block_on(appliance(slot, version)) {
            Ok(()) => println!("sealgate: the gateway stopped; rebooting"),
            Err(e) => println!("sealgate: appliance start failed: {e}; rebooting"),
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
        sealgate_board::appliance::sync_and_reboot();
    }
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

/// The appliance: partitions, board from fw_cfg, then the daemon with its slot hooks.
async fn appliance(
    slot: sealgate_image::bootctl::Slot,
    version: sealgate_image::version::Version,
) -> Result<(), String> {
    use std::sync::Arc;
    println!(
        "sealgate: appliance start, slot {}, version {version}",
        slot.letter()
    );
    let a =
        tokio::task::spawn_blocking(move || sealgate::appliance::Appliance::prepare(slot, version))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
    let board = sealgate_board::QemuBoard::appliance().map_err(|e| e.to_string())?;
    println!("sealgate: board serial {}", board.serial());
    sealgate::service::run_on(Box::new(board), ConfigSource::Embedded, Some(Arc::new(a)))
        .await
        .map_err(|e| e.to_string())
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
) -> Result<(DevBoard, sealgate_core::sealed::SealedStore), String> {
    let board = DevBoard::open(state).map_err(|e| e.to_string())?;
    let store = sealgate_core::sealed::SealedStore::open(
        &board.sealed_dir(),
        board.secret(),
        board.serial(),
    )
    .map_err(|e| e.to_string())?;
    Ok((board, store))
}

fn provision(state: &std::path::Path, files: &[PathBuf]) -> Result<String, String> {
    let keys = files
        .iter()
        .map(|f| sealgate_core::blob::read_public_key(f).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    let (board, mut store) = open_store(state)?;
    sealgate_core::site::provision(&mut store, &keys).map_err(|e| e.to_string())?;
    // The keys HQ needs from this box exist from provisioning on, not only after a start.
    sealgate_core::site::ensure_identity(&mut store).map_err(|e| e.to_string())?;
    sealgate_core::site::ensure_encryption_key(&mut store).map_err(|e| e.to_string())?;
    store.commit().map_err(|e| e.to_string())?;
    let ids: Vec<String> = keys
        .iter()
        .map(|k| sealgate_core::blob::key_id_hex(&sealgate_core::blob::key_id(k)))
        .collect();
    Ok(format!(
        "provisioned {}: trusting config-signing key(s) {}\n",
        board.serial(),
        ids.join(", ")
    ))
}

fn device(state: &std::path::Path, encryption_key_only: bool) -> Result<String, String> {
    let (board, store) = open_store(state)?;
    let encryption = sealgate_core::site::encryption_public(&store);
    if encryption_key_only {
        return encryption
            .map(|k| format!("{}\n", sealgate_core::hex::encode(&k)))
            .ok_or_else(|| "no encryption key yet: provision or start the box once".into());
    }
    let encryption = encryption
        .map(|k| {
            format!(
                "{} (X25519, key id {})",
                sealgate_core::hex::encode(&k),
                sealgate_core::hex::encode(&sealgate_core::secrets::key_id(&k))
            )
        })
        .unwrap_or_else(|| "not made yet (made at provisioning or first start)".into());
    let keys: Vec<String> = sealgate_core::site::trusted(&store)
        .keys()
        .map(sealgate_core::blob::key_id_hex)
        .collect();
    let seq = sealgate_core::site::stored_sequence(&store)
        .map(|s| s.to_string())
        .unwrap_or_else(|| "none".into());
    let identity = sealgate_core::site::identity_public(&store)
        .map(|k| {
            format!(
                "{} (Ed25519, key id {})",
                k.iter().map(|b| format!("{b:02x}")).collect::<String>(),
                sealgate_core::blob::key_id_hex(&sealgate_core::blob::key_id(&k))
            )
        })
        .unwrap_or_else(|| "not made yet (made at first start)".into());
    Ok(format!(
        "serial: {}\nidentity: {identity}\nencryption key: {encryption}\nsealed store generation: {}\ntrusted config keys: {}\nconfig sequence: {seq}\n",
        board.serial(),
        store.generation(),
        if keys.is_empty() {
            "none (not provisioned)".to_string()
        } else {
            keys.join(", ")
        },
    ))
}

/// A pending key and the names it was made for.
fn pending_key(name: &str) -> String {
    format!("tls/{name}/newkey")
}

fn pending_names(name: &str) -> String {
    format!("tls/{name}/names")
}

fn valid_name(name: &str) -> Result<(), String> {
    if !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        Ok(())
    } else {
        Err(format!(
            "--name {name:?}: use 1-64 letters, digits, '-' or '_'"
        ))
    }
}

fn keys_generate(
    state: &std::path::Path,
    name: &str,
    dns: &[String],
    csr: Option<&std::path::Path>,
) -> Result<String, String> {
    valid_name(name)?;
    let new = sealgate_core::certs::generate(dns).map_err(|e| e.to_string())?;
    let (_board, mut store) = open_store(state)?;
    store.put(&pending_key(name), new.key_pkcs8_der.to_vec());
    store.put(&pending_names(name), dns.join("\n").into_bytes());
    store.commit().map_err(|e| e.to_string())?;
    match csr {
        Some(path) => {
            std::fs::write(path, &new.csr_pem)
                .map_err(|e| format!("{}: cannot write: {e}", path.display()))?;
            Ok(format!(
                "key for {name} made in the sealed store; CSR written to {}\n",
                path.display()
            ))
        }
        None => Ok(new.csr_pem),
    }
}

fn certs_import(
    state: &std::path::Path,
    name: &str,
    cert: &std::path::Path,
    chain: Option<&std::path::Path>,
    key: Option<&std::path::Path>,
    dns: &[String],
) -> Result<String, String> {
    valid_name(name)?;
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| format!("{}: cannot read: {e}", p.display()))
    };
    let mut pem = read(cert)?;
    if let Some(c) = chain {
        pem.push(b'\n');
        pem.extend(read(c)?);
    }
    let (_board, mut store) = open_store(state)?;
    let (key_der, from_pending) = match key {
        Some(k) => (
            sealgate_core::certs::external_key(&read(k)?)
                .map_err(|e| format!("{}: {e}", k.display()))?
                .to_vec(),
            false,
        ),
        None => match store.get(&pending_key(name)) {
            Some(k) => (k.to_vec(), true),
            None => store
                .get(&sealgate::tls::key_record(name))
                .map(|k| (k.to_vec(), false))
                .ok_or_else(|| {
                    format!("no key for {name}: run `keys generate --name {name}` or give --key")
                })?,
        },
    };
    let names: Vec<String> = if dns.is_empty() {
        store
            .get(&pending_names(name))
            .map(|b| {
                String::from_utf8_lossy(b)
                    .lines()
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    } else {
        dns.to_vec()
    };
    if names.is_empty() {
        return Err("which names must the certificate carry? give --dns NAME".into());
    }
    let info =
        sealgate_core::certs::check_import(&key_der, &pem, &names, sealgate::spool::unix_now())
            .map_err(|e| format!("{}: refused: {e}", cert.display()))?;
    store.put(&sealgate::tls::key_record(name), key_der);
    store.put(&sealgate::tls::chain_record(name), pem);
    if from_pending {
        store.remove(&pending_key(name));
    }
    store.commit().map_err(|e| e.to_string())?;
    Ok(format!(
        "imported {name}: {} (SAN {}), valid until {}, SHA-256 {}\n",
        info.subject,
        info.sans.join(", "),
        sealgate_core::certs::rfc3339(info.not_after),
        info.sha256
    ))
}

fn certs_list(state: &std::path::Path) -> Result<String, String> {
    let (_board, store) = open_store(state)?;
    let mut out = String::new();
    for rec in store.names() {
        let Some(name) = rec
            .strip_prefix("tls/")
            .and_then(|n| n.strip_suffix("/chain"))
        else {
            continue;
        };
        let chain = store.get(&rec).unwrap_or_default();
        match sealgate_core::certs::info(chain) {
            Ok(i) => out.push_str(&format!(
                "{name}: {} | SAN {} | issuer {} | valid {} .. {} | SHA-256 {}{}\n",
                i.subject,
                i.sans.join(", "),
                i.issuer,
                sealgate_core::certs::rfc3339(i.not_before),
                sealgate_core::certs::rfc3339(i.not_after),
                i.sha256,
                if store.get(&pending_key(name)).is_some() {
                    " | a new key waits for its certificate"
                } else {
                    ""
                },
            )),
            Err(e) => out.push_str(&format!("{name}: unreadable chain: {e}\n")),
        }
    }
    if out.is_empty() {
        out.push_str("no certificates\n");
    }
    Ok(out)
}
