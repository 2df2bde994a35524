//! Applying a configuration to the running daemon, from whichever door it comes in: SIGHUP
//! (the config file again) and the management API (a pushed signed blob). Both take the same
//! path — every check first, then the atomic swap of the live snapshot, and only then the
//! stored sequence raised — so `service` (start-up) and `mgmt` depend on this module, not on
//! each other.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use sealgate_core::blob::Verdict;
use sealgate_core::config::Config;
use sealgate_core::sealed::SealedStore;
use sealgate_core::secrets::SecretValue;
use sealgate_core::site::{self, SiteError};
use sealgate_core::time::unix_now;

use crate::live::{Live, Snapshot};
use crate::peers::PeerStore;
use crate::tls::ServerTls;

/// Why a config from SIGHUP or the API was not applied (the running one stays).
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Config(#[from] sealgate_core::config::ConfigError),
    #[error(transparent)]
    Site(#[from] SiteError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error("{path}: cannot read: {source}")]
    ReadConfig {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the sealed store is not available (see the log): signed configs cannot be verified")]
    NoStore,
}

/// Why a new configuration was not applied (the running one stays).
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Config(#[from] sealgate_core::config::ConfigError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Site(#[from] SiteError),
}

/// Builds everything a checked config needs (certificates, CAs) and only then makes it current;
/// on any error nothing changes.
pub fn apply(
    live: &Live,
    peers: &PeerStore,
    config: Config,
    store: Option<&SealedStore>,
    fresh: &BTreeMap<String, SecretValue>,
) -> Result<(), ApplyError> {
    let old = live.get();
    let secrets = site::resolve_secrets(store, &config, fresh)?;
    let server_tls = ServerTls::load(&config, store)?;
    let snapshot = Snapshot::build(config, server_tls)?.with_secrets(secrets);
    let new = &snapshot.config;
    if new.smtp.listen != old.config.smtp.listen
        || new.smtp.implicit_tls != old.config.smtp.implicit_tls
        || new.smtp.submission != old.config.smtp.submission
        || new.smtp.max_connections != old.config.smtp.max_connections
        || new.queue.max_deliveries != old.config.queue.max_deliveries
        || new.dns != old.config.dns
        || new.mgmt.listen != old.config.mgmt.listen
    {
        tracing::warn!(
            "listeners (SMTP and mgmt), max_connections, max_deliveries and [dns] change \
             at the next restart; everything else applies now"
        );
    }
    peers.set_settings(new.policy_settings());
    live.set(snapshot);
    Ok(())
}

/// What a reload needs.
pub struct Reload {
    pub live: Arc<Live>,
    pub peers: Arc<PeerStore>,
    pub store: Arc<Mutex<Option<SealedStore>>>,
    pub path: PathBuf,
    pub serial: String,
}

/// SIGHUP: re-read the config file and apply it: a signed blob after every check (F-CONFIG
/// order), a TOML file on the dev board.
pub async fn reload_on_hangup(r: Reload) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        return;
    };
    let r = Arc::new(r);
    while hup.recv().await.is_some() {
        let r = r.clone();
        match tokio::task::spawn_blocking(move || reload(&r)).await {
            Ok(Ok(what)) => tracing::info!(what, "configuration reloaded and applied (SIGHUP)"),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "configuration NOT applied; the running one stays")
            }
            Err(e) => tracing::error!(error = %e, "configuration reload failed"),
        }
    }
}

fn reload(r: &Reload) -> Result<&'static str, ControlError> {
    let bytes = std::fs::read(&r.path).map_err(|source| ControlError::ReadConfig {
        path: r.path.clone(),
        source,
    })?;
    let origin = r.path.display().to_string();
    if !site::is_blob(&bytes) {
        let config = Config::from_toml(&String::from_utf8_lossy(&bytes), &origin)?;
        let guard = r.store.lock().map_err(|_| ControlError::NoStore)?;
        apply(&r.live, &r.peers, config, guard.as_ref(), &BTreeMap::new())?;
        return Ok("unsigned TOML (dev board)");
    }
    match apply_blob(&r.live, &r.peers, &r.store, &r.serial, &bytes, &origin)? {
        BlobApplied::AlreadyApplied { .. } => {
            Ok("signed config already applied (same sequence, same bytes): nothing to do")
        }
        BlobApplied::Applied { .. } => Ok("signed config"),
    }
}

/// What [`apply_blob`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobApplied {
    /// Applied; the stored sequence is now `sequence`.
    Applied { sequence: u64, key_id: String },
    /// The very blob already applied: nothing done.
    AlreadyApplied { sequence: u64, key_id: String },
}

/// A signed config blob from SIGHUP or the management API: verified in the F-CONFIG order,
/// applied, and only then recorded (sequence, blob, key rotation). The sealed store stays
/// locked from verification to record, so two blobs never interleave; on any error nothing
/// changed.
pub fn apply_blob(
    live: &Live,
    peers: &PeerStore,
    store: &Mutex<Option<SealedStore>>,
    serial: &str,
    bytes: &[u8],
    origin: &str,
) -> Result<BlobApplied, ControlError> {
    let mut guard = store.lock().map_err(|_| ControlError::NoStore)?;
    let s = guard.as_mut().ok_or(ControlError::NoStore)?;
    let checked = site::verify(s, bytes, serial, unix_now(), origin)?;
    let sequence = checked.blob.header().sequence;
    let key_id = sealgate_core::blob::key_id_hex(&checked.blob.header().key_id);
    if checked.verdict == Verdict::NoOp {
        return Ok(BlobApplied::AlreadyApplied { sequence, key_id });
    }
    apply(
        live,
        peers,
        checked.config.clone(),
        Some(s),
        &checked.secrets,
    )?;
    site::record_applied(s, &checked);
    s.commit().map_err(SiteError::from)?;
    tracing::info!(
        sequence,
        "signed configuration applied; stored sequence raised"
    );
    Ok(BlobApplied::Applied { sequence, key_id })
}

/// Raises the stored sequence etc. after an apply, durably.
pub fn record(
    store: &Mutex<Option<SealedStore>>,
    checked: &site::Checked,
) -> Result<(), ControlError> {
    let mut guard = store.lock().map_err(|_| ControlError::NoStore)?;
    let store = guard.as_mut().ok_or(ControlError::NoStore)?;
    site::record_applied(store, checked);
    store.commit().map_err(SiteError::from)?;
    Ok(())
}
