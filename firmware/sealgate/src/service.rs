//! Start-up and the life of the daemon: board, config, TLS, spool recovery, listeners,
//! the delivery scheduler, and the ready line.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sealgate_board::{Board, DevBoard};
use tokio::net::TcpListener;

use crate::appliance::Appliance;
use crate::control::{ApplyError, ControlError};
use crate::delivery::Queue;
use crate::live::{Live, Snapshot};
use crate::peers::PeerStore;
use crate::smtp::{ListenerKind, Smtpd};
use crate::spool::Spool;
use crate::spool::unix_now;
use crate::tls::{ServerTls, ensure_dev_certificate, export_chains};
use sealgate_core::blob::Verdict;
use sealgate_core::config::Config;
use sealgate_core::sealed::SealedStore;
use sealgate_core::site::{self, SiteError};

/// How long SIGTERM waits for open SMTP sessions before the process exits.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Board(#[from] sealgate_board::BoardError),
    #[error(transparent)]
    Config(#[from] sealgate_core::config::ConfigError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Spool(#[from] crate::spool::SpoolError),
    #[error(transparent)]
    Site(#[from] SiteError),
    #[error("{path}: cannot read: {source}")]
    ReadConfig {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the sealed store is not available (see the log): signed configs cannot be verified")]
    NoStore,
    #[error("no usable configuration: {0}")]
    Refused(String),
    #[error("cannot record the applied config: {0}")]
    Record(String),
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Where the daemon's configuration comes from.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    Embedded,
    File(PathBuf),
}

/// Runs the gateway on the dev board until the process is stopped.
pub async fn run(source: ConfigSource, state: &Path) -> Result<(), StartError> {
    let board = DevBoard::open(state)?;
    run_on(Box::new(board), source, None).await
}

/// Runs the gateway on `board` (on the appliance with its slots, watchdog and health check)
/// until the process is stopped.
pub async fn run_on(
    board: Box<dyn Board>,
    source: ConfigSource,
    appliance: Option<Arc<Appliance>>,
) -> Result<(), StartError> {
    if let Some(a) = &appliance {
        a.spawn_watchdog();
        a.spawn_reaper();
    }
    // What the appliance's health check must hear about (on the dev board these are logged or
    // fatal as before).
    let mut problems: Vec<String> = Vec::new();
    let (live, store, sealed_error) =
        start_config(board.as_ref(), &source, appliance.as_deref(), &mut problems).await?;
    let state_dir = board.state_dir().to_path_buf();
    let config = live.get().config.clone();
    let (spool, recovered) = Spool::open(&state_dir.join("queue"), config.queue.min_free_bytes)?;
    let spool = Arc::new(spool);
    tracing::info!(messages = recovered.len(), "queue recovered");
    let peers = Arc::new(PeerStore::open(
        &state_dir,
        config.tls.max_peers,
        config.policy_settings(),
    ));
    tokio::spawn(crate::peers::flush_loop(peers.clone()));
    let queue = Queue::new(
        live.clone(),
        spool.clone(),
        recovered,
        peers.clone(),
        state_dir.clone(),
    );
    tokio::spawn(queue.clone().run());
    let smtpd = Smtpd::new(live.clone(), spool, queue.clone(), peers.clone());
    let smtp = listen_smtp(&smtpd, &live, appliance.is_some(), &mut problems).await?;
    let mut bound_other = smtp.implicit.clone();
    // The management API (F-MGMT): its own listeners; one that cannot be bound is logged.
    let mgmt_bound = crate::mgmt::Mgmt::start(crate::mgmt::MgmtDeps {
        live: live.clone(),
        peers: peers.clone(),
        queue: queue.clone(),
        store: store.clone(),
        serial: board.serial().to_string(),
        state_dir: state_dir.clone(),
        appliance: appliance
            .clone()
            .map(|a| a as Arc<dyn crate::mgmt::ApplianceOps>),
        sealed_error,
    })
    .await;
    if mgmt_bound.is_empty() {
        problems.push("the management API is not listening".into());
    }
    bound_other.extend(mgmt_bound);
    spawn_spool_free_refresh(smtpd.clone());
    print_ready(&live, &smtp.ready, &state_dir);
    if let Some(a) = &appliance {
        a.spawn_health_check(
            smtp.starttls,
            bound_other,
            state_dir.join("queue"),
            problems,
        );
    }
    if let ConfigSource::File(path) = &source {
        let reload = crate::control::Reload {
            live: live.clone(),
            peers: peers.clone(),
            store: store.clone(),
            path: path.clone(),
            serial: board.serial().to_string(),
        };
        tokio::spawn(crate::control::reload_on_hangup(reload));
    }
    wait_for_shutdown().await;
    shut_down(smtp.tasks, &smtpd, &peers).await;
    Ok(())
}

/// The shared sealed store, as start-up leaves it to the rest of the daemon.
type SharedStore = Arc<Mutex<Option<SealedStore>>>;

/// The config to start on, made live: the sealed store opened (its error kept for the API's
/// health answer), the baked trust anchors provisioned on the appliance, the device identity
/// and a dev certificate made when missing, the server TLS loaded, and a signed config that
/// was applied recorded.
async fn start_config(
    board: &dyn Board,
    source: &ConfigSource,
    appliance: Option<&Appliance>,
    problems: &mut Vec<String>,
) -> Result<(Arc<Live>, SharedStore, Option<String>), StartError> {
    let (mut store, sealed_error) = open_store(board);
    if let Some(e) = &sealed_error {
        problems.push(format!("the sealed store cannot be opened: {e}"));
    }
    if let (Some(a), Some(s)) = (appliance, store.as_mut()) {
        provision_baked(s, &a.trust)?;
    }
    let (config, origin, checked) = match appliance {
        Some(_) => appliance_config(store.as_ref(), board.serial(), problems)?,
        None => initial_config(source, store.as_ref(), board.serial())?,
    };
    if let Some(s) = store.as_mut() {
        ensure_keys(&config, s, board.state_dir())?;
    }
    let server_tls = ServerTls::load(&config, store.as_ref())?;
    if server_tls.is_none() {
        tracing::warn!("no certificate installed: STARTTLS is not offered, implicit TLS is off");
    }
    let fresh = checked
        .as_ref()
        .map(|c| c.secrets.clone())
        .unwrap_or_default();
    let secrets = site::resolve_secrets(store.as_ref(), &config, &fresh)?;
    let live = Arc::new(Live::new(
        Snapshot::build(config, server_tls)?.with_secrets(secrets),
    ));
    let store = Arc::new(Mutex::new(store));
    if let Some(c) = checked {
        let store = store.clone();
        tokio::task::spawn_blocking(move || crate::control::record(&store, &c))
            .await
            .map_err(|e| StartError::Record(e.to_string()))??;
        tracing::info!(config = %origin, "signed configuration applied");
    }
    Ok((live, store, sealed_error))
}

/// Makes the device identity key and, where the config asks for one, the dev certificate in
/// the sealed store when they are missing; exports the public certificate chains.
fn ensure_keys(config: &Config, s: &mut SealedStore, state_dir: &Path) -> Result<(), StartError> {
    if site::ensure_identity(s).map_err(|e| StartError::Record(e.to_string()))? {
        s.commit().map_err(SiteError::from)?;
        tracing::info!("made the device identity key (Ed25519) in the sealed store");
    }
    if site::ensure_encryption_key(s).map_err(|e| StartError::Record(e.to_string()))? {
        s.commit().map_err(SiteError::from)?;
        tracing::info!(
            "made the device encryption key (X25519, for config secrets) in the sealed store"
        );
    }
    if ensure_dev_certificate(config, s)? {
        s.commit().map_err(SiteError::from)?;
        tracing::warn!(
            host = %config.hostname,
            "made a self-signed development certificate in the sealed store"
        );
    }
    export_chains(s, state_dir);
    Ok(())
}

/// The SMTP listeners that were bound.
struct SmtpListeners {
    /// Accept loops, aborted at shutdown.
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// STARTTLS listeners (the health check expects a `220` there).
    starttls: Vec<std::net::SocketAddr>,
    /// Implicit-TLS listeners.
    implicit: Vec<std::net::SocketAddr>,
    /// `smtp=ADDR` / `smtps=ADDR` for the ready line.
    ready: Vec<String>,
}

/// Binds every SMTP listener (implicit TLS only with a certificate) and starts its accept
/// loop. On the appliance a listener that cannot be bound is a health-check problem (the
/// management API must stay reachable); on the dev board it is fatal.
async fn listen_smtp(
    smtpd: &Arc<Smtpd>,
    live: &Live,
    appliance: bool,
    problems: &mut Vec<String>,
) -> Result<SmtpListeners, StartError> {
    let config = live.get().config.clone();
    let mut out = SmtpListeners {
        tasks: Vec::new(),
        starttls: Vec::new(),
        implicit: Vec::new(),
        ready: Vec::new(),
    };
    for (addrs, kind) in [
        (&config.smtp.listen, ListenerKind::Smtp),
        (&config.smtp.implicit_tls, ListenerKind::ImplicitTls),
        (&config.smtp.submission, ListenerKind::Submission),
    ] {
        for addr in addrs {
            if kind != ListenerKind::Smtp && live.get().server_tls.is_none() {
                tracing::warn!(%addr, "no certificate installed: TLS-only SMTP listener not started");
                continue;
            }
            let listener = match TcpListener::bind(addr).await {
                Ok(l) => l,
                Err(source) if appliance => {
                    tracing::error!(%addr, error = %source, "cannot listen");
                    problems.push(format!("cannot listen on {addr}: {source}"));
                    continue;
                }
                Err(source) => {
                    return Err(StartError::Listen {
                        addr: *addr,
                        source,
                    });
                }
            };
            let bound = listener.local_addr().unwrap_or(*addr);
            match kind {
                ListenerKind::ImplicitTls => {
                    out.implicit.push(bound);
                    out.ready.push(format!("smtps={bound}"));
                }
                // Both greet with `220` in plaintext, which is what the health check reads.
                ListenerKind::Smtp => {
                    out.starttls.push(bound);
                    out.ready.push(format!("smtp={bound}"));
                }
                ListenerKind::Submission => {
                    out.starttls.push(bound);
                    out.ready.push(format!("submission={bound}"));
                }
            }
            out.tasks
                .push(tokio::spawn(smtpd.clone().serve(listener, kind)));
        }
    }
    Ok(out)
}

/// Refreshes the spool's free-space figure (for `452 4.3.1`) every 2 s, off the async threads.
fn spawn_spool_free_refresh(smtpd: Arc<Smtpd>) {
    tokio::spawn(async move {
        let mut t = tokio::time::interval(Duration::from_secs(2));
        loop {
            t.tick().await;
            let s = smtpd.clone();
            let _ = tokio::task::spawn_blocking(move || s.refresh_spool_free()).await;
        }
    });
}

/// The ready line on stdout (tests and the README wait for it), and a swaks line to try.
fn print_ready(live: &Live, ready: &[String], state_dir: &Path) {
    let snap = live.get();
    println!(
        "sealgate ready: {} state={}",
        ready.join(" "),
        state_dir.display()
    );
    if let Some(smtp) = snap.config.smtp.listen.first() {
        let tls_flag = if snap.server_tls.is_some() {
            " -tls"
        } else {
            ""
        };
        let domain = snap
            .config
            .smtp
            .local_domains
            .first()
            .map(String::as_str)
            .unwrap_or("example.test");
        println!(
            "try: swaks --server {smtp}{tls_flag} --from you@{domain} --to postmaster@{domain}"
        );
    }
}

/// Stops accepting and gives running sessions a grace period to finish their transactions.
/// Whatever is cut off was never acknowledged, and everything acknowledged is in the queue.
/// The peer table is written last.
async fn shut_down(
    listeners: Vec<tokio::task::JoinHandle<()>>,
    smtpd: &Smtpd,
    peers: &Arc<PeerStore>,
) {
    for l in listeners {
        l.abort();
    }
    let active = smtpd.active_sessions();
    tracing::info!(sessions = active, "shutting down");
    if active > 0 && !smtpd.drain(SHUTDOWN_GRACE).await {
        tracing::warn!(
            sessions = smtpd.active_sessions(),
            "sessions still open after the grace period; closing them"
        );
    }
    let store = peers.clone();
    match tokio::task::spawn_blocking(move || store.flush_all()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "cannot write the peer table at shutdown"),
        Err(e) => tracing::error!(error = %e, "peer table writer failed at shutdown"),
    }
}

/// The sealed store, or `None` (logged) when it cannot be opened: then no signed config can
/// be verified (fail closed) and nothing is written to it.
fn open_store(board: &dyn Board) -> (Option<SealedStore>, Option<String>) {
    match SealedStore::open(&board.sealed_dir(), board.secret(), board.serial()) {
        Ok(s) => {
            for why in s.refused() {
                tracing::warn!(copy = %why, "a copy of the sealed store was not used");
            }
            (Some(s), None)
        }
        Err(e) => {
            println!("sealgate: THE SEALED STORE CANNOT BE OPENED: {e}");
            tracing::error!(
                error = %e,
                "the sealed store cannot be opened: signed configs cannot be verified (the \
                 queue is kept)"
            );
            (None, Some(e.to_string()))
        }
    }
}

/// First boot of an appliance image: the trust anchors baked in at image build are installed
/// into an unprovisioned sealed store.
fn provision_baked(store: &mut SealedStore, keys: &[[u8; 32]]) -> Result<(), StartError> {
    if !site::trusted(store).is_empty() || keys.is_empty() {
        return Ok(());
    }
    site::provision(store, keys)?;
    store.commit().map_err(SiteError::from)?;
    println!(
        "sealgate: provisioned {} trusted config-signing key(s) baked into the image",
        keys.len()
    );
    Ok(())
}

/// The appliance never runs on TOML: the last applied signed blob, else the appliance default
/// (no relaying, no local domains: it waits for its signed config).
fn appliance_config(
    store: Option<&SealedStore>,
    serial: &str,
    problems: &mut Vec<String>,
) -> Result<(Config, String, Option<site::Checked>), StartError> {
    if let Some(s) = store
        && let Some(b) = s.get(site::CURRENT)
    {
        match site::verify(s, b, serial, unix_now(), "the last applied config") {
            Ok(c) => return Ok((c.config, "last applied signed config".into(), None)),
            Err(e) => {
                tracing::error!(error = %e, "the last applied signed config is refused; running on the appliance default");
                problems.push(format!("the last applied signed config is refused: {e}"));
            }
        }
    }
    tracing::warn!(
        "no signed config applied yet: appliance default (accepts no mail; push a signed config)"
    );
    Ok((
        Config::appliance_default(serial),
        "appliance default".into(),
        None,
    ))
}

/// The config to start on: a signed blob (verified; on failure the last applied one, if any),
/// a TOML file (dev board, loudly), or without `--config` the last applied blob, else the
/// embedded default. Returns what must be recorded once it runs.
fn initial_config(
    source: &ConfigSource,
    store: Option<&SealedStore>,
    serial: &str,
) -> Result<(Config, String, Option<site::Checked>), StartError> {
    let now = unix_now();
    let last_good = |why: &dyn std::fmt::Display| -> Result<_, StartError> {
        let bytes = store.and_then(|s| s.get(site::CURRENT));
        match (store, bytes) {
            (Some(s), Some(b)) => {
                let c = site::verify(s, b, serial, now, "the last applied config")?;
                tracing::error!(reason = %why, sequence = c.blob.header().sequence, "running on the last applied signed config");
                Ok((c.config, "last applied signed config".to_string(), None))
            }
            _ => Err(StartError::Refused(why.to_string())),
        }
    };
    match source {
        ConfigSource::Embedded => match store.and_then(|s| s.get(site::CURRENT)) {
            Some(_) => last_good(&"no --config given"),
            None => {
                tracing::warn!("running on the embedded default config (dev board only)");
                Ok((Config::embedded_default(), "embedded default".into(), None))
            }
        },
        ConfigSource::File(p) => {
            let origin = p.display().to_string();
            let bytes = std::fs::read(p).map_err(|source| StartError::ReadConfig {
                path: p.clone(),
                source,
            })?;
            if !site::is_blob(&bytes) {
                let config = Config::from_toml(&String::from_utf8_lossy(&bytes), &origin)?;
                tracing::warn!(config = %origin, "running on an unsigned TOML config (dev board only)");
                return Ok((config, origin, None));
            }
            let Some(s) = store else {
                return Err(StartError::NoStore);
            };
            match site::verify(s, &bytes, serial, now, &origin) {
                Ok(c) if c.verdict == Verdict::NoOp => Ok((c.config.clone(), origin, None)),
                Ok(c) => Ok((c.config.clone(), origin, Some(c))),
                Err(e) => {
                    tracing::error!(config = %origin, error = %e, "signed config refused");
                    last_good(&format!("{origin}: {e}"))
                }
            }
        }
    }
}

async fn wait_for_shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
