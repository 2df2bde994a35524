//! Start-up and the life of the daemon: board, config, TLS, spool recovery, listeners,
//! the delivery scheduler, and the ready line.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sealgate_board::{Board, DevBoard};
use tokio::net::TcpListener;

use crate::config::Config;
use crate::delivery::Queue;
use crate::live::{Live, Snapshot};
use crate::peers::PeerStore;
use crate::smtpd::Smtpd;
use crate::spool::Spool;
use crate::tls::ServerTls;

/// How long SIGTERM waits for open SMTP sessions before the process exits.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Board(#[from] sealgate_board::BoardError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Spool(#[from] crate::spool::SpoolError),
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

/// Runs the gateway until the process is stopped.
pub async fn run(source: ConfigSource, state: &Path) -> Result<(), StartError> {
    let board = DevBoard::open(state)?;
    let (config, origin) = match &source {
        ConfigSource::Embedded => (Config::embedded_default(), "embedded default".to_string()),
        ConfigSource::File(p) => (Config::load(p)?, p.display().to_string()),
    };
    tracing::warn!(
        config = %origin,
        "running on an unsigned TOML config (dev board only)"
    );
    let state_dir = board.state_dir().to_path_buf();
    let server_tls = ServerTls::load(&config, &state_dir)?;
    if server_tls.is_none() {
        tracing::warn!("no certificate installed: STARTTLS is not offered, implicit TLS is off");
    }
    let live = Arc::new(Live::new(Snapshot::build(config, server_tls)?));
    let config = live.get().config.clone();
    let (spool, recovered) = Spool::open(&state_dir.join("queue"), config.queue.min_free_bytes)?;
    let spool = Arc::new(spool);
    tracing::info!(messages = recovered.len(), "queue recovered");
    let peers = Arc::new(PeerStore::open(
        &state_dir,
        config.tls.max_peers,
        config.policy_settings(),
    ));
    tokio::spawn(peers.clone().run());
    let queue = Queue::new(
        live.clone(),
        spool.clone(),
        recovered,
        peers.clone(),
        state_dir.clone(),
    );
    tokio::spawn(queue.clone().run());
    let smtpd = Smtpd::new(live.clone(), spool, queue, peers.clone());

    let mut ready = Vec::new();
    let mut listeners = Vec::new();
    for (addrs, implicit) in [
        (&config.smtp.listen, false),
        (&config.smtp.implicit_tls, true),
    ] {
        for addr in addrs {
            if implicit && live.get().server_tls.is_none() {
                continue;
            }
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Listen {
                    addr: *addr,
                    source,
                })?;
            let bound = listener.local_addr().unwrap_or(*addr);
            ready.push(if implicit {
                format!("smtps={bound}")
            } else {
                format!("smtp={bound}")
            });
            listeners.push(tokio::spawn(smtpd.clone().serve(listener, implicit)));
        }
    }
    {
        let smtpd = smtpd.clone();
        tokio::spawn(async move {
            let mut t = tokio::time::interval(Duration::from_secs(2));
            loop {
                t.tick().await;
                let s = smtpd.clone();
                let _ = tokio::task::spawn_blocking(move || s.refresh_spool_free()).await;
            }
        });
    }
    println!(
        "sealgate ready: {} state={}",
        ready.join(" "),
        state_dir.display()
    );
    if let Some(smtp) = config.smtp.listen.first() {
        let tls_flag = if live.get().server_tls.is_some() {
            " -tls"
        } else {
            ""
        };
        let domain = config
            .smtp
            .local_domains
            .first()
            .map(String::as_str)
            .unwrap_or("example.test");
        println!(
            "try: swaks --server {smtp}{tls_flag} --from you@{domain} --to postmaster@{domain}"
        );
    }
    if let ConfigSource::File(path) = &source {
        let (live, peers, path, state_dir) =
            (live.clone(), peers.clone(), path.clone(), state_dir.clone());
        tokio::spawn(async move { reload_on_hangup(live, peers, path, state_dir).await });
    }
    wait_for_shutdown().await;
    // Stop accepting; give running sessions a grace period to finish their transactions.
    // Whatever is cut off was never acknowledged, and everything acknowledged is in the queue.
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
    Ok(())
}

/// Why a new configuration was not applied (the running one stays).
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// Builds everything a checked config needs (certificates, CAs) and only then makes it current;
/// on any error nothing changes.
pub fn apply(
    live: &Live,
    peers: &PeerStore,
    config: Config,
    state_dir: &Path,
) -> Result<(), ApplyError> {
    let old = live.get();
    let server_tls = ServerTls::load(&config, state_dir)?;
    let snapshot = Snapshot::build(config, server_tls)?;
    let new = &snapshot.config;
    if new.smtp.listen != old.config.smtp.listen
        || new.smtp.implicit_tls != old.config.smtp.implicit_tls
        || new.smtp.max_connections != old.config.smtp.max_connections
        || new.queue.max_deliveries != old.config.queue.max_deliveries
        || new.dns_resolvers != old.config.dns_resolvers
    {
        tracing::warn!(
            "listeners, max_connections, max_deliveries and dns.resolver change at the next \
             restart; everything else applies now"
        );
    }
    peers.set_settings(new.policy_settings());
    live.set(snapshot);
    Ok(())
}

/// SIGHUP: re-read the TOML config file and apply it (dev board).
async fn reload_on_hangup(live: Arc<Live>, peers: Arc<PeerStore>, path: PathBuf, state: PathBuf) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        return;
    };
    while hup.recv().await.is_some() {
        let (live, peers, path, state) = (live.clone(), peers.clone(), path.clone(), state.clone());
        let result = tokio::task::spawn_blocking(move || {
            let config = Config::load(&path)?;
            apply(&live, &peers, config, &state)
        })
        .await;
        match result {
            Ok(Ok(())) => tracing::info!("configuration reloaded and applied (SIGHUP)"),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "configuration NOT applied; the running one stays")
            }
            Err(e) => tracing::error!(error = %e, "configuration reload failed"),
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
