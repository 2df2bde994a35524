//! The management API (F-MGMT): HTTPS with the box's certificate, HTTP/1.1 (hyper), JSON in and
//! out, for `sealctl device` and, later, a web UI. Endpoints, authentication and every error are
//! documented in `docs/mgmt-api.md`.
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

use std::convert::Infallible;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use ring::{digest, hmac};
use rustls::ServerConfig;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;

use crate::control::{BlobApplied, ControlError};
use crate::delivery::{AdminError, Queue};
use crate::live::Live;
use crate::peers::PeerStore;
use crate::spool::unix_now;
use sealgate_core::sealed::SealedStore;
use sealgate_core::site::{self, SiteError};
use sealgate_core::verifiers::{OfferClientAuth, provider};

/// Where the API listens without `mgmt.listen`: loopback on the dev board.
pub const DEV_LISTEN: &str = "127.0.0.1:8443";
/// … and every address on the appliance (HQ reaches it over the network).
pub const APPLIANCE_LISTEN: &str = "0.0.0.0:8443";
/// The dev board's token file in the state directory.
pub const TOKEN_FILE: &str = "mgmt-token";
/// Concurrent connections; more are closed at once.
pub const MAX_CONNECTIONS: usize = 16;
/// TLS handshake, request header and request body (between two chunks) time limits.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
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
/// Longest peer (IP or host name) and queue id in a path.
const MAX_PEER: usize = 255;
const MAX_ID: usize = 64;

// ---------------------------------------------------------------------------------------------
// What only the appliance can do

/// A refusal: HTTP status, a short machine-readable check name, and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub check: &'static str,
    pub error: String,
}

impl ApiError {
    pub fn new(status: StatusCode, check: &'static str, error: impl Into<String>) -> ApiError {
        ApiError {
            status,
            check,
            error: error.into(),
        }
    }

    fn json(&self) -> Value {
        json!({ "error": self.error, "check": self.check })
    }
}

/// The appliance's slots, updates and reboot; `None` on the dev board (501 there).
pub trait ApplianceOps: Send + Sync + std::fmt::Debug {
    /// Running slot and version, both slots, rollback floor, last update, health.
    fn status(&self) -> Value;
    /// Blocking (run from `spawn_blocking`): installs the bundle read from `body` into the
    /// inactive slot; `Ok` describes what was installed.
    fn install(&self, body: &mut dyn Read) -> Result<Value, ApiError>;
    /// Reboots shortly after the reply went out.
    fn reboot(&self);
    /// Running slot and health state, from memory (no I/O): for the unauthenticated health
    /// endpoint.
    fn summary(&self) -> Value;
    /// Powers off shortly after the reply went out.
    fn poweroff(&self);
    /// PEM files of the admin client certificates baked into the image (pinned).
    fn admin_certificates(&self) -> Vec<PathBuf>;
}

impl ApplianceOps for crate::appliance::Appliance {
    fn status(&self) -> Value {
        let mut v = self.installer.status();
        if let Some(o) = v.as_object_mut() {
            o.insert(
                "health".into(),
                serde_json::to_value(self.health()).unwrap_or(Value::Null),
            );
        }
        v
    }

    fn install(&self, body: &mut dyn Read) -> Result<Value, ApiError> {
        use crate::appliance::update::UpdateError as U;
        match self.installer.install(body) {
            Ok(outcome) => Ok(serde_json::to_value(outcome).unwrap_or(Value::Null)),
            Err(e) => {
                let status = match &e {
                    U::NotAppliance => StatusCode::NOT_IMPLEMENTED,
                    U::Busy | U::RunningOnTrial(_) => StatusCode::CONFLICT,
                    U::FloorRose { .. } => StatusCode::UNPROCESSABLE_ENTITY,
                    U::Bundle(_) => StatusCode::UNPROCESSABLE_ENTITY,
                    U::Body(_) => StatusCode::BAD_REQUEST,
                    U::BootCtl(_) | U::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
                };
                Err(ApiError::new(status, e.check(), e.to_string()))
            }
        }
    }

    fn reboot(&self) {
        self.schedule_reboot();
    }

    fn poweroff(&self) {
        self.schedule_poweroff();
    }

    fn summary(&self) -> Value {
        json!({ "running_slot": self.slot, "health": self.health().state })
    }

    fn admin_certificates(&self) -> Vec<PathBuf> {
        self.admin_certs.clone()
    }
}

// ---------------------------------------------------------------------------------------------
// Routing (pure)

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// Unauthenticated liveness: serial, slot, health, whether the sealed store opened.
    Health,
    Status,
    PushConfig,
    PushUpdate {
        reboot: bool,
    },
    Reboot,
    Poweroff,
    PeerReset(String),
    QueueList,
    QueueRelease(String),
    QueueDelete(String),
}

/// Maps method and path (and query) to an endpoint, or the error to answer.
pub fn route(method: &Method, path: &str, query: Option<&str>) -> Result<Endpoint, ApiError> {
    let not_found = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "route",
            format!("no such endpoint: {}", printable(path)),
        )
    };
    let rest = path.strip_prefix("/api/v1/").ok_or_else(not_found)?;
    let segs: Vec<&str> = rest.split('/').collect();
    // (endpoint if the method fits, the methods this path allows)
    let (found, allowed): (Option<Endpoint>, &'static str) = match segs.as_slice() {
        ["status"] => ((method == Method::GET).then_some(Endpoint::Status), "GET"),
        ["health"] => ((method == Method::GET).then_some(Endpoint::Health), "GET"),
        ["config"] => (
            (method == Method::PUT).then_some(Endpoint::PushConfig),
            "PUT",
        ),
        ["update"] => {
            let reboot = match query {
                None | Some("") | Some("reboot=0") => false,
                Some("reboot=1") => true,
                Some(q) => {
                    return Err(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "query",
                        format!(
                            "unknown query {:?}: only reboot=1 or reboot=0",
                            printable(q)
                        ),
                    ));
                }
            };
            (
                (method == Method::PUT).then_some(Endpoint::PushUpdate { reboot }),
                "PUT",
            )
        }
        ["reboot"] => ((method == Method::POST).then_some(Endpoint::Reboot), "POST"),
        ["poweroff"] => (
            (method == Method::POST).then_some(Endpoint::Poweroff),
            "POST",
        ),
        ["peers", peer, "reset"] => {
            let peer = segment(peer, MAX_PEER, |b| {
                b.is_ascii_alphanumeric() || matches!(b, b'.' | b':' | b'-' | b'_')
            })?;
            (
                (method == Method::POST).then_some(Endpoint::PeerReset(peer)),
                "POST",
            )
        }
        ["queue"] => (
            (method == Method::GET).then_some(Endpoint::QueueList),
            "GET",
        ),
        ["queue", id, "release"] => {
            let id = queue_id(id)?;
            (
                (method == Method::POST).then_some(Endpoint::QueueRelease(id)),
                "POST",
            )
        }
        ["queue", id] => {
            let id = queue_id(id)?;
            (
                (method == Method::DELETE).then_some(Endpoint::QueueDelete(id)),
                "DELETE",
            )
        }
        _ => return Err(not_found()),
    };
    if query.is_some_and(|q| !q.is_empty()) && !matches!(found, Some(Endpoint::PushUpdate { .. })) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "query",
            "this endpoint takes no query",
        ));
    }
    found.ok_or_else(|| {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method",
            format!("{} takes {allowed}, not {method}", printable(path)),
        )
    })
}

fn queue_id(raw: &str) -> Result<String, ApiError> {
    segment(raw, MAX_ID, |b| {
        b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')
    })
}

/// A percent-decoded path segment, non-empty, at most `max` bytes, each byte `ok`.
fn segment(raw: &str, max: usize, ok: impl Fn(u8) -> bool) -> Result<String, ApiError> {
    let bad = |why: &str| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "path",
            format!("path segment {:?}: {why}", printable(raw)),
        )
    };
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| bad("bad percent-encoding"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    if out.is_empty() || out.len() > max {
        return Err(bad(&format!("must be 1 to {max} bytes")));
    }
    if !out.iter().all(|&b| ok(b)) {
        return Err(bad("contains a character that is not allowed"));
    }
    String::from_utf8(out).map_err(|_| bad("not UTF-8"))
}

/// Text for a log line or an error: at most 200 characters, controls as `?`.
fn printable(s: &str) -> String {
    s.chars()
        .take(200)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Authentication (pure but for the HMAC key)

/// How a request was authorised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    /// A pinned admin client certificate.
    Certificate,
    /// A bearer token whose SHA-256 is in `mgmt.admin_token_sha256`.
    Token,
    /// The dev board's `STATE/mgmt-token` (no credentials configured).
    DevToken,
    /// No credential exists anywhere: a config push, authorised by its HQ signature.
    FirstContact,
    /// `GET /api/v1/health`, which needs none.
    Anonymous,
}

impl Auth {
    pub fn name(self) -> &'static str {
        match self {
            Auth::Certificate => "certificate",
            Auth::Token => "token",
            Auth::DevToken => "dev-token",
            Auth::FirstContact => "first-contact",
            Auth::Anonymous => "anonymous",
        }
    }
}

/// Accepted bearer tokens, kept as HMAC tags of their SHA-256 under a per-process key, so that
/// each comparison is ring's constant-time tag check.
#[derive(Debug)]
pub struct TokenSet {
    key: hmac::Key,
}

impl TokenSet {
    pub fn new() -> Result<TokenSet, ring::error::Unspecified> {
        let rng = ring::rand::SystemRandom::new();
        Ok(TokenSet {
            key: hmac::Key::generate(hmac::HMAC_SHA256, &rng)?,
        })
    }

    fn tag(&self, sha256: &[u8; 32]) -> hmac::Tag {
        hmac::sign(&self.key, sha256)
    }

    /// Whether SHA-256(`token`) equals one of `hashes` (each compared in constant time).
    fn matches(&self, token: &[u8], hashes: &[[u8; 32]]) -> bool {
        let presented = sha256(token);
        let mut any = false;
        for h in hashes {
            any |= hmac::verify(&self.key, &presented, self.tag(h).as_ref()).is_ok();
        }
        any
    }
}

/// What a request presents.
#[derive(Debug, Clone, Copy, Default)]
pub struct Presented<'a> {
    /// SHA-256 of the client certificate (DER), if one was sent.
    pub certificate: Option<&'a [u8; 32]>,
    /// The bearer token, if an `Authorization: Bearer` header was sent.
    pub bearer: Option<&'a [u8]>,
}

/// The credentials in force.
#[derive(Debug, Clone, Copy)]
pub struct Credentials<'a> {
    /// `mgmt.admin_certificates` and the image's baked admin certificates.
    pub pins: &'a [[u8; 32]],
    /// `mgmt.admin_token_sha256`.
    pub tokens: &'a [[u8; 32]],
    /// SHA-256 of the dev board's token (offered only while nothing above is configured).
    pub dev_token: Option<&'a [u8; 32]>,
}

impl Credentials<'_> {
    fn configured(&self) -> bool {
        !self.pins.is_empty() || !self.tokens.is_empty()
    }
}

/// Decides whether a request may proceed; `config_push` says it is `PUT /api/v1/config`.
pub fn authorize(
    creds: &Credentials<'_>,
    tokens: &TokenSet,
    p: &Presented<'_>,
    config_push: bool,
) -> Result<Auth, ApiError> {
    let denied = |why: String| ApiError::new(StatusCode::UNAUTHORIZED, "auth", why);
    if let Some(c) = p.certificate
        && creds.pins.contains(c)
    {
        return Ok(Auth::Certificate);
    }
    let dev = creds.dev_token.filter(|_| !creds.configured());
    if let Some(t) = p.bearer {
        if tokens.matches(t, creds.tokens) {
            return Ok(Auth::Token);
        }
        if let Some(d) = dev
            && tokens.matches(t, std::slice::from_ref(d))
        {
            return Ok(Auth::DevToken);
        }
    }
    if !creds.configured() && dev.is_none() {
        return if config_push {
            Ok(Auth::FirstContact)
        } else {
            Err(denied(
                "no admin credential is configured yet: only PUT /api/v1/config (a blob signed \
                 by HQ) is accepted; it can pin admin certificates or tokens"
                    .into(),
            ))
        };
    }
    Err(denied(match (p.bearer, p.certificate) {
        (Some(_), _) => "the bearer token is not accepted".into(),
        (None, Some(c)) => format!(
            "client certificate {} is not a pinned admin certificate",
            hex(c)
        ),
        (None, None) => "authentication required: a pinned admin client certificate or an \
             Authorization: Bearer token"
            .into(),
    }))
}

fn bearer(req: &Request<Incoming>) -> Result<Option<&[u8]>, ApiError> {
    let Some(v) = req.headers().get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let v = v.as_bytes();
    let scheme_ok = v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ");
    let token = if scheme_ok {
        v[7..].trim_ascii()
    } else {
        &[][..]
    };
    if token.is_empty() {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "auth",
            "Authorization header: only \"Bearer TOKEN\" is understood",
        ));
    }
    Ok(Some(token))
}

// ---------------------------------------------------------------------------------------------
// TLS

/// The served certificate: `mgmt.certificate` as the running config loaded it (so a new
/// certificate applies with a new config), else as the sealed store held it at start.
#[derive(Debug)]
struct ServedCert {
    live: Arc<Live>,
    at_start: Option<(String, Arc<CertifiedKey>)>,
}

impl ResolvesServerCert for ServedCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let snap = self.live.get();
        let name = &snap.config.mgmt.certificate;
        snap.server_tls
            .as_ref()
            .and_then(|t| t.certified_key(name))
            .or_else(|| {
                self.at_start
                    .as_ref()
                    .filter(|(n, _)| n == name)
                    .map(|(_, k)| k.clone())
            })
    }
}

fn server_config(cert: ServedCert) -> Result<Arc<ServerConfig>, rustls::Error> {
    let mut sc = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        // A client certificate is asked for, not required; it is judged by its pin per request.
        .with_client_cert_verifier(Arc::new(OfferClientAuth::new(Vec::new())))
        .with_cert_resolver(Arc::new(cert));
    sc.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(sc))
}

// ---------------------------------------------------------------------------------------------
// The server

/// Everything the API reads and changes.
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

/// Per connection: who is there.
#[derive(Debug)]
struct ConnInfo {
    peer: SocketAddr,
    certificate: Option<[u8; 32]>,
}

impl Mgmt {
    /// Binds the listeners (`mgmt.listen`, else the board's default) and serves them. A
    /// listener that cannot be bound is logged and skipped: the gateway runs without it.
    /// Prints `sealgate mgmt: https://ADDR` per listener; returns the bound addresses.
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        live: Arc<Live>,
        peers: Arc<PeerStore>,
        queue: Arc<Queue>,
        store: Arc<Mutex<Option<SealedStore>>>,
        serial: String,
        state_dir: PathBuf,
        appliance: Option<Arc<dyn ApplianceOps>>,
        sealed_error: Option<String>,
    ) -> Vec<SocketAddr> {
        let config = live.get().config.clone();
        let addrs: Vec<SocketAddr> = match &config.mgmt.listen {
            Some(a) => a.clone(),
            None => {
                let d = if appliance.is_some() {
                    APPLIANCE_LISTEN
                } else {
                    DEV_LISTEN
                };
                d.parse().into_iter().collect()
            }
        };
        if addrs.is_empty() {
            tracing::info!("management API off (mgmt.listen is empty)");
            return Vec::new();
        }
        let tokens = match TokenSet::new() {
            Ok(t) => t,
            Err(_) => {
                tracing::error!("management API off: no random key for token checks");
                return Vec::new();
            }
        };
        let dev_token = if appliance.is_none() {
            match dev_token(&state_dir) {
                Ok(h) => Some(h),
                Err(e) => {
                    tracing::error!(error = %e, "management API: no dev token file");
                    None
                }
            }
        } else {
            None
        };
        let baked_pins = appliance
            .as_ref()
            .map(|a| pins_of_pem_files(&a.admin_certificates()))
            .unwrap_or_default();
        let name = config.mgmt.certificate.clone();
        let mut at_start = {
            let guard = store.lock().unwrap_or_else(|p| p.into_inner());
            guard
                .as_ref()
                .and_then(|s| crate::tls::sealed_key(s, &name))
                .map(|k| (name.clone(), k))
        };
        let mut ephemeral_cert = false;
        let live_key = live
            .get()
            .server_tls
            .as_ref()
            .and_then(|t| t.certified_key(&name));
        if at_start.is_none() && live_key.is_none() {
            // No sealed store (another board's disk, tampering): the box must still be
            // reachable to say so. A throwaway certificate, made in memory now and never
            // stored, serves the API; no key of the sealed store is used.
            match (
                sealed_error.is_some(),
                throwaway_key(&config.hostname, &name),
            ) {
                (true, Ok(k)) => {
                    tracing::warn!(
                        "management API on a throwaway certificate: the sealed store is not available"
                    );
                    ephemeral_cert = true;
                    at_start = Some((name.clone(), k));
                }
                (true, Err(e)) => {
                    tracing::error!(error = %e, "management API off: cannot make a throwaway certificate");
                    return Vec::new();
                }
                (false, _) => {
                    tracing::error!(certificate = %name, "management API off: no such certificate");
                    return Vec::new();
                }
            }
        }
        let served_fp = live_key
            .as_ref()
            .or(at_start.as_ref().map(|(_, k)| k))
            .and_then(|k| k.cert.first())
            .map(|c| hex(&sha256(c.as_ref())));
        let tls = match server_config(ServedCert {
            live: live.clone(),
            at_start,
        }) {
            Ok(c) => TlsAcceptor::from(c),
            Err(e) => {
                tracing::error!(error = %e, "management API off: TLS configuration");
                return Vec::new();
            }
        };
        let me = Arc::new(Mgmt {
            live,
            peers,
            queue,
            store,
            serial,
            state_dir,
            appliance,
            started: Instant::now(),
            tokens,
            dev_token,
            baked_pins,
            sealed_error,
            ephemeral_cert,
        });
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let mut bound = Vec::new();
        for addr in addrs {
            match TcpListener::bind(addr).await {
                Ok(l) => {
                    let at = l.local_addr().unwrap_or(addr);
                    println!("sealgate mgmt: https://{at}");
                    if let Some(fp) = &served_fp {
                        println!(
                            "sealgate mgmt: certificate sha256 {fp}{}",
                            if ephemeral_cert { " (throwaway)" } else { "" }
                        );
                    }
                    tracing::info!(listen = %at, certificate = %name, "management API listening");
                    bound.push(at);
                    tokio::spawn(me.clone().serve(l, tls.clone(), slots.clone()));
                }
                Err(e) => {
                    tracing::error!(listen = %addr, error = %e, "management API: cannot listen")
                }
            }
        }
        bound
    }

    async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        tls: TlsAcceptor,
        slots: Arc<Semaphore>,
    ) {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "management API: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                tracing::warn!(%peer, limit = MAX_CONNECTIONS, "management API: too many connections; closed");
                continue;
            };
            let me = self.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                me.connection(tcp, peer, tls).await;
                drop(permit);
            });
        }
    }

    async fn connection(
        self: Arc<Self>,
        tcp: tokio::net::TcpStream,
        peer: SocketAddr,
        tls: TlsAcceptor,
    ) {
        let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::info!(%peer, error = %e, "management API: TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::info!(%peer, "management API: TLS handshake timed out");
                return;
            }
        };
        let certificate = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| sha256(c));
        let info = Arc::new(ConnInfo { peer, certificate });
        let me = self.clone();
        let service = hyper::service::service_fn(move |req| {
            let me = me.clone();
            let info = info.clone();
            async move { Ok::<_, Infallible>(me.request(req, &info).await) }
        });
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .max_header_size(MAX_HEADER_BYTES)
            .max_headers(MAX_HEADERS)
            .max_buf_size(64 * 1024)
            .keep_alive(false);
        let conn = http.serve_connection(TokioIo::new(stream), service);
        match tokio::time::timeout(UPDATE_TIMEOUT, conn).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::info!(%peer, error = %e, "management API: connection error"),
            Err(_) => {
                tracing::warn!(%peer, "management API: connection closed after the time limit")
            }
        }
    }

    /// One request: route, authenticate, run, log.
    async fn request(
        self: Arc<Self>,
        req: Request<Incoming>,
        info: &ConnInfo,
    ) -> Response<Full<Bytes>> {
        let method = req.method().clone();
        let path = printable(req.uri().path());
        let (status, auth, body) = match self.clone().answer(req, info).await {
            Ok((auth, status, body)) => (status, Some(auth), body),
            Err((auth, e)) => (e.status, auth, e.json()),
        };
        let error = body.get("error").and_then(|e| e.as_str()).unwrap_or("");
        tracing::info!(
            peer = %info.peer,
            %method,
            path = %path,
            auth = auth.map_or("none", Auth::name),
            status = status.as_u16(),
            error,
            "management API request"
        );
        respond(status, &body)
    }

    async fn answer(
        self: Arc<Self>,
        req: Request<Incoming>,
        info: &ConnInfo,
    ) -> Result<(Auth, StatusCode, Value), (Option<Auth>, ApiError)> {
        let (endpoint, auth) = match self.admit(&req, info) {
            Ok(ok) => ok,
            Err(e) => {
                drain(req.into_body()).await;
                return Err((None, e));
            }
        };
        let body = req.into_body();
        let is_update = matches!(endpoint, Endpoint::PushUpdate { .. });
        let run = async {
            match endpoint {
                Endpoint::Health => Ok((StatusCode::OK, self.health())),
                Endpoint::Status => self.status().await,
                Endpoint::PushConfig => self.push_config(body, info).await,
                Endpoint::PushUpdate { reboot } => return self.push_update(body, reboot).await,
                Endpoint::Reboot => self.reboot(false),
                Endpoint::Poweroff => self.reboot(true),
                Endpoint::PeerReset(p) => self.peer_reset(p).await,
                Endpoint::QueueList => Ok((StatusCode::OK, self.queue_list())),
                Endpoint::QueueRelease(id) => self.queue_release(&id).await,
                Endpoint::QueueDelete(id) => self.queue_delete(&id).await,
            }
        };
        let result = if is_update {
            run.await
        } else {
            tokio::time::timeout(REQUEST_TIMEOUT, run)
                .await
                .unwrap_or_else(|_| {
                    Err(ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "timeout",
                        format!(
                            "the request took longer than {} s",
                            REQUEST_TIMEOUT.as_secs()
                        ),
                    ))
                })
        };
        result
            .map(|(status, v)| (auth, status, v))
            .map_err(|e| (Some(auth), e))
    }

    /// Route and authentication: what the request asks for and who may ask.
    fn admit(
        &self,
        req: &Request<Incoming>,
        info: &ConnInfo,
    ) -> Result<(Endpoint, Auth), ApiError> {
        let endpoint = route(req.method(), req.uri().path(), req.uri().query())?;
        if endpoint == Endpoint::Health {
            return Ok((endpoint, Auth::Anonymous));
        }
        let config = self.live.get().config.clone();
        let mut pins = config.mgmt.admin_certificates.clone();
        pins.extend_from_slice(&self.baked_pins);
        let creds = Credentials {
            pins: &pins,
            tokens: &config.mgmt.admin_token_sha256,
            dev_token: self.dev_token.as_ref(),
        };
        let presented = Presented {
            certificate: info.certificate.as_ref(),
            bearer: bearer(req)?,
        };
        let auth = authorize(
            &creds,
            &self.tokens,
            &presented,
            endpoint == Endpoint::PushConfig,
        )?;
        Ok((endpoint, auth))
    }

    // --- endpoints

    /// What anyone reaching the port may know, from memory: identity, slot and health state,
    /// and whether the sealed store opened (a disk moved to another board says so here). No
    /// version (which would help pick an exploit) and no health details.
    fn health(&self) -> Value {
        let summary = self.appliance.as_ref().map(|a| a.summary());
        json!({
            "serial": self.serial,
            "board": if self.appliance.is_some() { "appliance" } else { "dev" },
            "running_slot": summary.as_ref().map(|s| s["running_slot"].clone()),
            "health": summary.as_ref().map(|s| s["health"].clone()),
            "sealed_store": match &self.sealed_error {
                None => json!({"ok": true}),
                Some(e) => json!({"ok": false, "error": e}),
            },
            "mgmt_certificate": if self.ephemeral_cert { "throwaway (sealed store unavailable)" } else { "sealed" },
            "rss_bytes": rss_bytes(),
        })
    }

    async fn status(&self) -> Result<(StatusCode, Value), ApiError> {
        let snap = self.live.get();
        let store = self.store.clone();
        let config = snap.config.clone();
        let sealed = tokio::task::spawn_blocking(move || {
            let guard = store.lock().unwrap_or_else(|p| p.into_inner());
            sealed_status(guard.as_ref(), &config)
        })
        .await
        .map_err(|e| internal(&e))?;
        let c = &snap.config;
        let pins = c.mgmt.admin_certificates.len() + self.baked_pins.len();
        let tokens = c.mgmt.admin_token_sha256.len();
        let v = json!({
            "version": env!("CARGO_PKG_VERSION"),
            "board": if self.appliance.is_some() { "appliance" } else { "dev" },
            "serial": self.serial,
            "hostname": c.hostname,
            "now": unix_now(),
            "uptime_seconds": self.started.elapsed().as_secs(),
            "rss_bytes": rss_bytes(),
            "slot": self.appliance.as_ref().map(|a| a.status()),
            "sealed_store": match &self.sealed_error {
                None => json!({"ok": true}),
                Some(e) => json!({"ok": false, "error": e}),
            },
            "config": sealed.config,
            "certificates": sealed.certificates,
            "queue": self.queue.counts(),
            "peers": self.peers.file(),
            "mgmt": {
                "certificate": c.mgmt.certificate,
                "pinned_certificates": pins,
                "tokens": tokens,
                "dev_token": self.dev_token.is_some() && pins == 0 && tokens == 0,
                "first_contact": pins == 0 && tokens == 0 && self.dev_token.is_none(),
            },
        });
        Ok((StatusCode::OK, v))
    }

    async fn push_config(
        &self,
        body: Incoming,
        info: &ConnInfo,
    ) -> Result<(StatusCode, Value), ApiError> {
        let bytes = read_body(body, sealgate_core::blob::MAX_BLOB).await?;
        let (live, peers, store, serial) = (
            self.live.clone(),
            self.peers.clone(),
            self.store.clone(),
            self.serial.clone(),
        );
        let origin = format!("management API push from {}", info.peer);
        let outcome = tokio::task::spawn_blocking(move || {
            crate::control::apply_blob(&live, &peers, &store, &serial, &bytes, &origin)
        })
        .await
        .map_err(|e| internal(&e))?;
        match outcome {
            Ok(BlobApplied::Applied { sequence, key_id }) => {
                tracing::info!(sequence, key_id = %key_id, "configuration pushed and applied (management API)");
                Ok((
                    StatusCode::OK,
                    json!({ "applied": true, "sequence": sequence, "key_id": key_id,
                            "result": "signed config applied; stored sequence raised" }),
                ))
            }
            Ok(BlobApplied::AlreadyApplied { sequence, key_id }) => Ok((
                StatusCode::OK,
                json!({ "applied": false, "sequence": sequence, "key_id": key_id,
                        "result": "signed config already applied (same sequence, same bytes): nothing to do" }),
            )),
            Err(e) => {
                let err = config_refusal(&e);
                tracing::error!(error = %e, check = err.check, "pushed configuration NOT applied; the running one stays");
                Err(err)
            }
        }
    }

    async fn push_update(
        &self,
        body: Incoming,
        reboot: bool,
    ) -> Result<(StatusCode, Value), ApiError> {
        let Some(app) = self.appliance.clone() else {
            drain(body).await;
            return Err(ApiError::new(
                StatusCode::NOT_IMPLEMENTED,
                "appliance",
                "updates need the appliance",
            ));
        };
        if let Some(len) = content_length(&body)
            && len > MAX_UPDATE_BYTES
        {
            return Err(too_large(MAX_UPDATE_BYTES));
        }
        let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(UPDATE_CHANNEL);
        let installer = app.clone();
        let job = tokio::task::spawn_blocking(move || {
            let mut reader = ChannelReader::new(rx);
            installer.install(&mut reader)
        });
        pump(body, tx, MAX_UPDATE_BYTES).await;
        let outcome = job.await.map_err(|e| internal(&e))??;
        if reboot {
            app.reboot();
        }
        Ok((
            StatusCode::OK,
            json!({ "installed": outcome, "rebooting": reboot }),
        ))
    }

    /// Reboot, or with `off` power off: the answer goes out first.
    fn reboot(&self, off: bool) -> Result<(StatusCode, Value), ApiError> {
        let what = if off { "poweroff" } else { "reboot" };
        let Some(app) = &self.appliance else {
            return Err(ApiError::new(
                StatusCode::NOT_IMPLEMENTED,
                "appliance",
                format!("{what} needs the appliance"),
            ));
        };
        tracing::warn!(what, "requested through the management API");
        if off {
            app.poweroff();
            Ok((StatusCode::ACCEPTED, json!({ "powering_off": true })))
        } else {
            app.reboot();
            Ok((StatusCode::ACCEPTED, json!({ "rebooting": true })))
        }
    }

    async fn peer_reset(&self, peer: String) -> Result<(StatusCode, Value), ApiError> {
        let n = self.peers.reset(&peer);
        if n == 0 {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "peer",
                format!("no peer matches {peer}"),
            ));
        }
        let peers = self.peers.clone();
        match tokio::task::spawn_blocking(move || peers.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "io",
                    format!("reset {n} record(s), but the peer table was not written: {e}"),
                ));
            }
            Err(e) => return Err(internal(&e)),
        }
        Ok((StatusCode::OK, json!({ "peer": peer, "reset": n })))
    }

    fn queue_list(&self) -> Value {
        let all = self.queue.messages();
        let total = all.len();
        let list: Vec<Value> = all
            .iter()
            .take(MAX_QUEUE_LIST)
            .map(sealgate_core::queue_list::to_json)
            .collect();
        json!({ "count": total, "truncated": total > MAX_QUEUE_LIST, "messages": list })
    }

    async fn queue_release(&self, id: &str) -> Result<(StatusCode, Value), ApiError> {
        let m = self
            .queue
            .release(id)
            .await
            .map_err(|e| queue_refusal(id, e))?;
        Ok((
            StatusCode::OK,
            json!({ "released": true, "message": sealgate_core::queue_list::to_json(&m) }),
        ))
    }

    async fn queue_delete(&self, id: &str) -> Result<(StatusCode, Value), ApiError> {
        let m = self
            .queue
            .delete(id)
            .await
            .map_err(|e| queue_refusal(id, e))?;
        Ok((
            StatusCode::OK,
            json!({ "deleted": true, "message": sealgate_core::queue_list::to_json(&m) }),
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn respond(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut text = serde_json::to_vec_pretty(body).unwrap_or_else(|_| b"{}".to_vec());
    text.push(b'\n');
    let mut r = Response::new(Full::new(Bytes::from(text)));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if status == StatusCode::UNAUTHORIZED {
        h.insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"sealgate\""),
        );
    }
    r
}

fn internal(e: &dyn std::fmt::Display) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
}

fn too_large(max: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "size",
        format!("request body larger than {max} bytes"),
    )
}

fn content_length(body: &Incoming) -> Option<u64> {
    hyper::body::Body::size_hint(body).exact()
}

/// The whole body, at most `max` bytes, each chunk within the idle timeout.
async fn read_body(mut body: Incoming, max: usize) -> Result<Vec<u8>, ApiError> {
    if content_length(&body).is_some_and(|n| n > max as u64) {
        return Err(too_large(max as u64));
    }
    let mut out = Vec::new();
    loop {
        match tokio::time::timeout(BODY_IDLE_TIMEOUT, body.frame()).await {
            Err(_) => return Err(body_timeout()),
            Ok(None) => return Ok(out),
            Ok(Some(Err(e))) => return Err(body_error(&e)),
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    if out.len() + data.len() > max {
                        return Err(too_large(max as u64));
                    }
                    out.extend_from_slice(&data);
                }
            }
        }
    }
}

/// Reads and drops what a client sends of a body we will not use, within bounds.
async fn drain(mut body: Incoming) {
    if content_length(&body).is_some_and(|n| n > DRAIN_BYTES) {
        return;
    }
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
        let mut seen = 0u64;
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, |d| d.len() as u64);
            if seen > DRAIN_BYTES {
                break;
            }
        }
    })
    .await;
}

fn body_timeout() -> ApiError {
    ApiError::new(
        StatusCode::REQUEST_TIMEOUT,
        "timeout",
        format!(
            "request body: nothing received for {} s",
            BODY_IDLE_TIMEOUT.as_secs()
        ),
    )
}

fn body_error(e: &hyper::Error) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "body",
        format!("request body: {e}"),
    )
}

/// Feeds the body into `tx` chunk by chunk (the channel's bound is the backpressure); an error
/// or a body over `max` reaches the reader as an I/O error. Stops when the reader is gone.
async fn pump(mut body: Incoming, tx: mpsc::Sender<io::Result<Bytes>>, max: u64) {
    let mut total = 0u64;
    loop {
        let item = match tokio::time::timeout(BODY_IDLE_TIMEOUT, body.frame()).await {
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                body_timeout().error,
            )),
            Ok(None) => return,
            Ok(Some(Err(e))) => Err(io::Error::other(body_error(&e).error)),
            Ok(Some(Ok(frame))) => match frame.into_data() {
                Ok(d) => {
                    total += d.len() as u64;
                    if total > max {
                        Err(io::Error::other(too_large(max).error))
                    } else {
                        Ok(d)
                    }
                }
                Err(_) => continue,
            },
        };
        let last = item.is_err();
        if tx.send(item).await.is_err() || last {
            return;
        }
    }
}

/// A blocking `Read` over the chunks [`pump`] sends (used inside `spawn_blocking`).
#[derive(Debug)]
struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    chunk: Bytes,
}

impl ChannelReader {
    fn new(rx: mpsc::Receiver<io::Result<Bytes>>) -> ChannelReader {
        ChannelReader {
            rx,
            chunk: Bytes::new(),
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rx.blocking_recv() {
                None => return Ok(0),
                Some(Err(e)) => return Err(e),
                Some(Ok(b)) => self.chunk = b,
            }
        }
        let n = buf.len().min(self.chunk.len());
        let head = self.chunk.split_to(n);
        buf[..n].copy_from_slice(&head);
        Ok(n)
    }
}

/// The HTTP answer to a refused config: which check failed and the reason.
pub fn config_refusal(e: &ControlError) -> ApiError {
    use sealgate_core::blob::BlobError as B;
    let unprocessable =
        |check: &'static str| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, check, e.to_string());
    match e {
        ControlError::Site(SiteError::Blob(b)) => unprocessable(match b {
            B::Truncated
            | B::BadMagic
            | B::UnsupportedFormat(_)
            | B::TooLarge
            | B::TrailingBytes(_)
            | B::LengthMismatch { .. }
            | B::Malformed(_) => "format",
            B::UnknownKey(_) | B::BadSignature => "signature",
            B::WrongDevice { .. } => "device",
            B::Replayed { .. } | B::SameSequenceDifferentContent(_) => "sequence",
            B::NotYetValid { .. } | B::Expired { .. } => "time-window",
            B::NeedsFirmware { .. } => "firmware",
            B::LastKeyRetired => "key-rotation",
        }),
        ControlError::Site(SiteError::Config(_)) => unprocessable("semantic"),
        ControlError::Site(SiteError::NotProvisioned) => unprocessable("provisioning"),
        ControlError::Apply(_) => unprocessable("apply"),
        ControlError::NoStore => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "sealed-store",
            e.to_string(),
        ),
        _ => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "record", e.to_string()),
    }
}

fn queue_refusal(id: &str, e: AdminError) -> ApiError {
    let (status, check) = match &e {
        AdminError::NotFound => (StatusCode::NOT_FOUND, "queue-id"),
        AdminError::InFlight => (StatusCode::CONFLICT, "in-flight"),
        AdminError::Spool(_) => (StatusCode::INTERNAL_SERVER_ERROR, "spool"),
    };
    ApiError::new(status, check, format!("{id}: {e}"))
}

/// What the status shows from the sealed store.
struct SealedStatus {
    config: Value,
    certificates: Vec<Value>,
}

fn sealed_status(
    store: Option<&SealedStore>,
    config: &sealgate_core::config::Config,
) -> SealedStatus {
    let mut certificates = Vec::new();
    let configured = |name: &str| config.tls.certificates.iter().any(|c| c.name == name);
    let cert_entry = |name: &str, source: &str, pem: &[u8]| -> Value {
        let mut v = match sealgate_core::certs::info(pem) {
            Ok(i) => {
                let expires = sealgate_core::certs::rfc3339(i.not_after);
                let mut v = serde_json::to_value(&i).unwrap_or(Value::Null);
                if let Some(o) = v.as_object_mut() {
                    o.insert("expires".into(), json!(expires));
                    o.insert("expired".into(), json!(i.not_after < unix_now()));
                }
                v
            }
            Err(e) => json!({ "error": e.to_string() }),
        };
        if let Some(o) = v.as_object_mut() {
            o.insert("name".into(), json!(name));
            o.insert("source".into(), json!(source));
            o.insert("configured".into(), json!(configured(name)));
            o.insert("mgmt".into(), json!(config.mgmt.certificate == name));
        }
        v
    };
    let mut config_v = json!({
        "sealed_store": store.is_some(),
        "sequence": null,
        "key_id": null,
        "trusted_keys": [],
    });
    if let Some(s) = store {
        let key_id = s
            .get(site::CURRENT)
            .and_then(|b| sealgate_core::blob::decode(b).ok())
            .map(|b| sealgate_core::blob::key_id_hex(&b.header().key_id));
        let trusted: Vec<String> = site::trusted(s)
            .keys()
            .map(sealgate_core::blob::key_id_hex)
            .collect();
        config_v = json!({
            "sealed_store": true,
            "sequence": site::stored_sequence(s),
            "key_id": key_id,
            "trusted_keys": trusted,
        });
        for rec in s.names() {
            if let Some(name) = rec
                .strip_prefix("tls/")
                .and_then(|n| n.strip_suffix("/chain"))
                && let Some(pem) = s.get(&rec)
            {
                certificates.push(cert_entry(name, "sealed", pem));
            }
        }
    }
    for c in &config.tls.certificates {
        if let Some(f) = &c.cert_file {
            match std::fs::read(f) {
                Ok(pem) => certificates.push(cert_entry(&c.name, "file", &pem)),
                Err(e) => certificates.push(json!({
                    "name": c.name, "source": "file",
                    "error": format!("{}: {e}", f.display()),
                })),
            }
        }
    }
    SealedStatus {
        config: config_v,
        certificates,
    }
}

/// The dev board's token: read from `STATE/mgmt-token`, or made there (0600) on first use.
/// Returns its SHA-256; the token itself is never logged.
fn dev_token(state_dir: &Path) -> io::Result<[u8; 32]> {
    let path = state_dir.join(TOKEN_FILE);
    match std::fs::read(&path) {
        Ok(t) if !t.trim_ascii().is_empty() => return Ok(sha256(t.trim_ascii())),
        Ok(_) => std::fs::remove_file(&path)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut raw = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
        .map_err(|_| io::Error::other("no random bytes"))?;
    let token = hex(&raw);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    f.write_all(token.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    tracing::info!(file = %path.display(), "management API: made a dev token (dev board only; accepted while no admin credential is configured)");
    Ok(sha256(token.as_bytes()))
}

/// SHA-256 of every certificate in the PEM files (unreadable files are logged and skipped).
pub fn pins_of_pem_files(files: &[PathBuf]) -> Vec<[u8; 32]> {
    let mut pins = Vec::new();
    for f in files {
        let certs = std::fs::read(f).map(|pem| {
            CertificateDer::pem_slice_iter(&pem)
                .filter_map(Result::ok)
                .map(|c| sha256(&c))
                .collect::<Vec<_>>()
        });
        match certs {
            Ok(c) if !c.is_empty() => pins.extend(c),
            Ok(_) => {
                tracing::warn!(file = %f.display(), "admin certificate file holds no certificate")
            }
            Err(e) => {
                tracing::warn!(file = %f.display(), error = %e, "cannot read an admin certificate")
            }
        }
    }
    pins
}

/// The daemon's resident set size (`VmRSS` of /proc/self/status), if readable.
fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A self-signed certificate made in memory for the API when the sealed store is unavailable.
fn throwaway_key(hostname: &str, name: &str) -> Result<Arc<CertifiedKey>, String> {
    let ck = rcgen::generate_simple_self_signed(vec![hostname.to_string()])
        .map_err(|e| e.to_string())?;
    crate::tls::sealed_certified_key(
        name,
        &ck.signing_key.serialize_der(),
        ck.cert.pem().as_bytes(),
    )
    .map_err(|e| e.to_string())
}

fn sha256(data: &[u8]) -> [u8; 32] {
    let d = digest::digest(&digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        use Endpoint::*;
        let ok = [
            ("GET", "/api/v1/status", None, Status),
            ("PUT", "/api/v1/config", None, PushConfig),
            ("PUT", "/api/v1/update", None, PushUpdate { reboot: false }),
            (
                "PUT",
                "/api/v1/update",
                Some("reboot=1"),
                PushUpdate { reboot: true },
            ),
            ("POST", "/api/v1/reboot", None, Reboot),
            ("POST", "/api/v1/poweroff", None, Poweroff),
            (
                "POST",
                "/api/v1/peers/127.0.0.5/reset",
                None,
                PeerReset("127.0.0.5".into()),
            ),
            (
                "POST",
                "/api/v1/peers/%3A%3A1/reset",
                None,
                PeerReset("::1".into()),
            ),
            (
                "POST",
                "/api/v1/peers/mx.example.com/reset",
                None,
                PeerReset("mx.example.com".into()),
            ),
            ("GET", "/api/v1/queue", None, QueueList),
            (
                "POST",
                "/api/v1/queue/0001A-b_c/release",
                None,
                QueueRelease("0001A-b_c".into()),
            ),
            (
                "DELETE",
                "/api/v1/queue/0001A",
                None,
                QueueDelete("0001A".into()),
            ),
        ];
        for (m, p, q, want) in ok {
            let m: Method = m.parse().unwrap();
            assert_eq!(route(&m, p, q), Ok(want), "{m} {p}");
        }
        let bad = [
            ("GET", "/", None, 404, "route"),
            ("GET", "/api/v1/nothing", None, 404, "route"),
            ("GET", "/api/v2/status", None, 404, "route"),
            ("POST", "/api/v1/status", None, 405, "method"),
            ("GET", "/api/v1/config", None, 405, "method"),
            ("GET", "/api/v1/queue/X", None, 405, "method"),
            ("PUT", "/api/v1/update", Some("reboot=yes"), 400, "query"),
            ("GET", "/api/v1/status", Some("x=1"), 400, "query"),
            ("POST", "/api/v1/peers/a%2Fb/reset", None, 400, "path"),
            ("POST", "/api/v1/peers/%zz/reset", None, 400, "path"),
            ("POST", "/api/v1/peers//reset", None, 400, "path"),
            ("DELETE", "/api/v1/queue/..%2f..%2fetc", None, 400, "path"),
            ("DELETE", "/api/v1/queue/a%0Ab", None, 400, "path"),
        ];
        for (m, p, q, status, check) in bad {
            let m: Method = m.parse().unwrap();
            let e = route(&m, p, q).unwrap_err();
            assert_eq!(
                (e.status.as_u16(), e.check),
                (status, check),
                "{m} {p}: {e:?}"
            );
        }
        let long = format!("/api/v1/queue/{}", "a".repeat(65));
        assert_eq!(
            route(&Method::DELETE, &long, None).unwrap_err().check,
            "path"
        );
    }

    #[test]
    fn authorization_rules() {
        let tokens = TokenSet::new().unwrap();
        let pin = [1u8; 32];
        let other = [2u8; 32];
        let tok = sha256(b"good-token");
        let dev = sha256(b"dev-token");
        let creds = |pins: &'static [[u8; 32]], toks: Vec<[u8; 32]>, dev: Option<[u8; 32]>| {
            (pins, toks, dev)
        };
        #[allow(clippy::type_complexity)]
        let cases: Vec<(
            (&[[u8; 32]], Vec<[u8; 32]>, Option<[u8; 32]>),
            Option<[u8; 32]>,
            Option<&[u8]>,
            bool,
            Result<Auth, &str>,
        )> = vec![
            // pinned certificate, with or without a token
            (
                creds(&[[1u8; 32]], vec![], None),
                Some(pin),
                None,
                false,
                Ok(Auth::Certificate),
            ),
            (
                creds(&[[1u8; 32]], vec![], None),
                Some(other),
                None,
                false,
                Err("not a pinned"),
            ),
            (
                creds(&[[1u8; 32]], vec![], None),
                None,
                None,
                false,
                Err("authentication required"),
            ),
            // tokens
            (
                creds(&[], vec![tok], None),
                None,
                Some(b"good-token"),
                false,
                Ok(Auth::Token),
            ),
            (
                creds(&[], vec![tok], None),
                None,
                Some(b"bad-token"),
                false,
                Err("not accepted"),
            ),
            (
                creds(&[], vec![tok], None),
                Some(other),
                Some(b"good-token"),
                false,
                Ok(Auth::Token),
            ),
            // the dev token only while nothing is configured
            (
                creds(&[], vec![], Some(dev)),
                None,
                Some(b"dev-token"),
                false,
                Ok(Auth::DevToken),
            ),
            (
                creds(&[], vec![tok], Some(dev)),
                None,
                Some(b"dev-token"),
                false,
                Err("not accepted"),
            ),
            (
                creds(&[], vec![], Some(dev)),
                None,
                None,
                true,
                Err("authentication required"),
            ),
            // first contact: config push only
            (
                creds(&[], vec![], None),
                None,
                None,
                true,
                Ok(Auth::FirstContact),
            ),
            (
                creds(&[], vec![], None),
                None,
                Some(b"x"),
                true,
                Ok(Auth::FirstContact),
            ),
            (
                creds(&[], vec![], None),
                None,
                None,
                false,
                Err("only PUT /api/v1/config"),
            ),
            (
                creds(&[[1u8; 32]], vec![], None),
                None,
                None,
                true,
                Err("authentication required"),
            ),
        ];
        for (i, ((pins, toks, dev), cert, bearer, push, want)) in cases.into_iter().enumerate() {
            let c = Credentials {
                pins,
                tokens: &toks,
                dev_token: dev.as_ref(),
            };
            let p = Presented {
                certificate: cert.as_ref(),
                bearer,
            };
            match (authorize(&c, &tokens, &p, push), want) {
                (Ok(a), Ok(w)) => assert_eq!(a, w, "case {i}"),
                (Err(e), Err(w)) => {
                    assert_eq!(e.status, StatusCode::UNAUTHORIZED, "case {i}");
                    assert!(e.error.contains(w), "case {i}: {}", e.error);
                }
                (got, w) => panic!("case {i}: got {got:?}, want {w:?}"),
            }
        }
    }

    #[test]
    fn channel_reader_streams_and_reports_errors() {
        let (tx, rx) = mpsc::channel(2);
        let t = std::thread::spawn(move || {
            let mut r = ChannelReader::new(rx);
            let mut out = Vec::new();
            let res = r.read_to_end(&mut out);
            (out, res.map_err(|e| e.to_string()))
        });
        tx.blocking_send(Ok(Bytes::from_static(b"abc"))).unwrap();
        tx.blocking_send(Ok(Bytes::from_static(b"defg"))).unwrap();
        tx.blocking_send(Err(io::Error::other("cut"))).unwrap();
        let (out, res) = t.join().unwrap();
        assert_eq!(out, b"abcdefg");
        assert_eq!(res, Err("cut".into()));
        let (tx, rx) = mpsc::channel(2);
        tx.blocking_send(Ok(Bytes::from_static(b"xy"))).unwrap();
        drop(tx);
        let mut r = ChannelReader::new(rx);
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"xy");
    }

    #[test]
    fn refusals_name_the_check() {
        use sealgate_core::blob::BlobError;
        let cases = [
            (BlobError::BadSignature, "signature"),
            (BlobError::Replayed { blob: 1, stored: 2 }, "sequence"),
            (BlobError::Truncated, "format"),
            (
                BlobError::Expired {
                    not_after: 0,
                    now: 1,
                },
                "time-window",
            ),
        ];
        for (b, check) in cases {
            let e = config_refusal(&ControlError::Site(SiteError::Blob(b.clone())));
            assert_eq!(
                (e.status, e.check),
                (StatusCode::UNPROCESSABLE_ENTITY, check)
            );
            assert_eq!(e.error, b.to_string());
        }
        assert_eq!(
            config_refusal(&ControlError::NoStore).status,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn dev_token_file_is_private_and_stable() {
        use std::os::unix::fs::PermissionsExt;
        let d = std::env::temp_dir().join(format!("sg-mgmt-token-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let h1 = dev_token(&d).unwrap();
        let meta = std::fs::metadata(d.join(TOKEN_FILE)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let text = std::fs::read_to_string(d.join(TOKEN_FILE)).unwrap();
        assert_eq!(sha256(text.trim().as_bytes()), h1);
        assert_eq!(dev_token(&d).unwrap(), h1, "read back, not remade");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
