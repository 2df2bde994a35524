//! The management API (F-MGMT): HTTPS with the box's certificate, HTTP/1.1 (hyper serving an
//! axum router), JSON out, for `sealctl device` and, later, a web UI. Endpoints,
//! authentication and every error are documented in `docs/mgmt-api.md`; the bodies are the
//! serde types of `sealgate-api`.
//!
//! - `listener`: TLS (rustls, the served certificate), accept loops, connection slots,
//!   handshake, header and connection time limits; each connection is served by the router
//!   with its client-certificate pin as a request extension ([`ConnInfo`]).
//! - `routes`: the router — paths and methods, path-segment and query checks, the
//!   authentication middleware, the request deadline, the request log.
//! - `auth`: who may ask (pinned certificates, bearer-token hashes, the dev token, first
//!   contact). `endpoints`: what each endpoint does. `body`: bounded request bodies.
//!   `error`: refusals and JSON answers. `ops`: what only the appliance can do.
//!
//! Authentication, per request: a client certificate whose SHA-256 is pinned
//! (`mgmt.admin_certificates`, or baked into the appliance image), or `Authorization: Bearer T`
//! with SHA-256(T) in `mgmt.admin_token_sha256`. On the dev board without either, the random
//! token in `STATE/mgmt-token` (0600) is accepted. A box with no credential at all accepts only
//! `PUT /api/v1/config` unauthenticated — first contact: the HQ signature on the blob is the
//! authority, and the blob can then pin the admins.
//!
//! Bounded everything: connections ([`MAX_CONNECTIONS`], one request each), TLS handshake,
//! header read and body idle timeouts, header size and count, config bodies up to
//! [`sealgate_core::blob::MAX_BLOB`], update bundles streamed through a small channel into the
//! installer (never held whole), listings capped.
//!
//! Architecture invariant: a pushed config goes through [`crate::control::apply_blob`], the very
//! path of SIGHUP; nothing here verifies or applies a config itself. Tokens and the token file
//! never reach a log line.

mod auth;
mod body;
mod endpoints;
mod error;
mod listener;
mod ops;
mod routes;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::delivery::Queue;
use crate::live::Live;
use crate::peers::PeerStore;
use sealgate_core::config::Config;
use sealgate_core::sealed::SealedStore;

pub use auth::{Auth, Credentials, Presented, TokenSet, authorize, pins_of_pem_files};
pub use error::{ApiError, config_refusal};
pub use ops::{ApplianceOps, Summary};
pub use routes::{ConnInfo, router};

/// Where the API listens without `mgmt.listen`: loopback on the dev board.
pub const DEV_LISTEN: &str = "127.0.0.1:8443";
/// … and every address on the appliance (HQ reaches it over the network).
pub const APPLIANCE_LISTEN: &str = "0.0.0.0:8443";
/// The dev board's token file in the state directory.
pub const TOKEN_FILE: &str = "mgmt-token";
/// Concurrent connections; with all taken, the oldest one without a pinned admin certificate
/// is closed for a new one (an admin is never refused for lack of a slot).
pub const MAX_CONNECTIONS: usize = 256;
/// Connections at once from one client address (strangers need many addresses to fill the
/// slots, and each slot is held at most a handshake plus a header timeout).
pub const MAX_PER_ADDRESS: usize = 8;
/// TLS handshake, request header and request body (between two chunks) time limits.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Whole request, except an update.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Whole connection of an update (64 MiB at 40 KiB/s).
const UPDATE_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Request head: bytes (start line and headers) and header count.
const MAX_HEADER_BYTES: usize = 16 * 1024;
const MAX_HEADERS: usize = 32;
/// Largest update request body: the bundle prefix (192 bytes) and its largest payload
/// (64 MiB); the installer checks the exact bounds.
pub const MAX_UPDATE_BYTES: u64 = (64 << 20) + 4096;
/// Update body chunks in flight between the connection and the installer.
const UPDATE_CHANNEL: usize = 4;
/// A refused request's unread body is read and dropped up to this much (and this long), so
/// that the client, still sending, gets the answer rather than a reset connection.
const DRAIN_BYTES: u64 = 256 * 1024;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// Most messages in one queue listing.
pub const MAX_QUEUE_LIST: usize = 10_000;

/// What the API is started with: everything it reads and changes.
#[derive(Debug)]
pub struct MgmtDeps {
    pub live: Arc<Live>,
    pub peers: Arc<PeerStore>,
    pub queue: Arc<Queue>,
    pub store: Arc<Mutex<Option<SealedStore>>>,
    pub serial: String,
    pub state_dir: PathBuf,
    /// `None` on the dev board (updates, reboot and power-off answer 501 there).
    pub appliance: Option<Arc<dyn ApplianceOps>>,
    /// Why the sealed store did not open, if it did not.
    pub sealed_error: Option<String>,
}

/// Everything the API reads and changes (the router's state).
#[derive(Debug)]
pub struct Mgmt {
    pub live: Arc<Live>,
    pub peers: Arc<PeerStore>,
    pub queue: Arc<Queue>,
    pub store: Arc<Mutex<Option<SealedStore>>>,
    pub serial: String,
    pub state_dir: PathBuf,
    pub appliance: Option<Arc<dyn ApplianceOps>>,
    started: Instant,
    tokens: TokenSet,
    dev_token: Option<[u8; 32]>,
    baked_pins: Vec<[u8; 32]>,
    /// Why the sealed store did not open, if it did not.
    sealed_error: Option<String>,
    /// The served certificate is a throwaway made at start (no sealed store).
    ephemeral_cert: bool,
}

impl Mgmt {
    /// Binds the listeners (`mgmt.listen`, else the board's default) and serves them. A
    /// listener that cannot be bound is logged and skipped: the gateway runs without it.
    /// Prints `sealgate mgmt: https://ADDR` per listener; returns the bound addresses.
    pub async fn start(deps: MgmtDeps) -> Vec<SocketAddr> {
        let config = deps.live.get().config.clone();
        let addrs = listen_addrs(&config, deps.appliance.is_some());
        if addrs.is_empty() {
            tracing::info!("management API off (mgmt.listen is empty)");
            return Vec::new();
        }
        let Some(mut me) = Mgmt::new(deps) else {
            return Vec::new();
        };
        let Some(tls) = listener::Tls::new(&me, &config) else {
            return Vec::new();
        };
        me.ephemeral_cert = tls.ephemeral;
        listener::bind(Arc::new(me), addrs, tls).await
    }

    /// The API's state, or `None` (logged) when the token check cannot be keyed.
    fn new(deps: MgmtDeps) -> Option<Mgmt> {
        let Ok(tokens) = TokenSet::new() else {
            tracing::error!("management API off: no random key for token checks");
            return None;
        };
        let dev_token = if deps.appliance.is_none() {
            match auth::dev_token(&deps.state_dir) {
                Ok(h) => Some(h),
                Err(e) => {
                    tracing::error!(error = %e, "management API: no dev token file");
                    None
                }
            }
        } else {
            None
        };
        let baked_pins = deps
            .appliance
            .as_ref()
            .map(|a| pins_of_pem_files(&a.admin_certificates()))
            .unwrap_or_default();
        Some(Mgmt {
            live: deps.live,
            peers: deps.peers,
            queue: deps.queue,
            store: deps.store,
            serial: deps.serial,
            state_dir: deps.state_dir,
            appliance: deps.appliance,
            started: Instant::now(),
            tokens,
            dev_token,
            baked_pins,
            sealed_error: deps.sealed_error,
            ephemeral_cert: false,
        })
    }
}

/// `mgmt.listen`, else the board's default address.
fn listen_addrs(config: &Config, appliance: bool) -> Vec<SocketAddr> {
    match &config.mgmt.listen {
        Some(a) => a.clone(),
        None => {
            let d = if appliance {
                APPLIANCE_LISTEN
            } else {
                DEV_LISTEN
            };
            d.parse().into_iter().collect()
        }
    }
}

/// Text for a log line or an error: at most 200 characters, controls as `?`.
fn printable(s: &str) -> String {
    s.chars()
        .take(200)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

#[cfg(test)]
mod testing {
    //! A [`Mgmt`] over a temporary state directory, for the router's tests.

    use super::*;
    use crate::live::Snapshot;
    use crate::spool::Spool;

    /// The dev board's state with `toml` as the running config and `dev_token` as the dev
    /// token (`None`: no dev token, so first contact when nothing is configured).
    pub(super) fn mgmt(name: &str, toml: &str, dev_token: Option<&[u8]>) -> (Arc<Mgmt>, PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "sg-mgmt-{name}-{}-{}",
            std::process::id(),
            sealgate_core::time::unix_now()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config = Config::from_toml(toml, "t").unwrap();
        let live = Arc::new(Live::new(Snapshot::build(config, None).unwrap()));
        let (spool, _) = Spool::open(&dir.join("queue"), 0).unwrap();
        let peers = Arc::new(PeerStore::open(&dir, 10, Default::default()));
        let queue = Queue::new(
            live.clone(),
            Arc::new(spool),
            Vec::new(),
            peers.clone(),
            dir.clone(),
        );
        let me = Mgmt {
            live,
            peers,
            queue,
            store: Arc::new(Mutex::new(None)),
            serial: "DEV-TEST".into(),
            state_dir: dir.clone(),
            appliance: None,
            started: Instant::now(),
            tokens: TokenSet::new().unwrap(),
            dev_token: dev_token.map(auth::sha256),
            baked_pins: Vec::new(),
            sealed_error: Some("no store in this test".into()),
            ephemeral_cert: true,
        };
        (Arc::new(me), dir)
    }
}
