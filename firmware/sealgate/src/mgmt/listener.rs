//! The management API's listeners: rustls with the served certificate (or a throwaway when the
//! sealed store is unavailable), the accept loops with their connection slots, and each
//! connection served by hyper's HTTP/1.1 with the axum router, within the handshake, header and
//! connection time limits and the header bounds. The connection's peer address and
//! client-certificate pin reach the router as a request extension ([`ConnInfo`]).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper::service::Service as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use sealgate_core::config::Config;
use sealgate_core::verifiers::{OfferClientAuth, provider};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;

use super::auth::{hex, sha256};
use super::routes::{self, ConnInfo};
use super::{
    HANDSHAKE_TIMEOUT, HEADER_TIMEOUT, MAX_CONNECTIONS, MAX_HEADER_BYTES, MAX_HEADERS,
    MAX_PER_ADDRESS, Mgmt, UPDATE_TIMEOUT,
};
use crate::live::Live;

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

/// The API's TLS side, ready to accept.
pub(super) struct Tls {
    acceptor: TlsAcceptor,
    /// `mgmt.certificate` at start.
    name: String,
    /// SHA-256 of the served leaf at start, for the console.
    fingerprint: Option<String>,
    /// The served certificate is a throwaway made now (no sealed store).
    pub ephemeral: bool,
}

impl Tls {
    /// The certificate to serve and the rustls configuration, or `None` (logged): no such
    /// certificate, or no sealed store and no throwaway either.
    pub fn new(mgmt: &Mgmt, config: &Config) -> Option<Tls> {
        let name = config.mgmt.certificate.clone();
        let live_key = mgmt
            .live
            .get()
            .server_tls
            .as_ref()
            .and_then(|t| t.certified_key(&name));
        let mut at_start = {
            let guard = mgmt.store.lock().unwrap_or_else(|p| p.into_inner());
            guard
                .as_ref()
                .and_then(|s| crate::tls::sealed_key(s, &name))
                .map(|k| (name.clone(), k))
        };
        let mut ephemeral = false;
        if at_start.is_none() && live_key.is_none() {
            at_start = Some((name.clone(), throwaway(mgmt, config, &name)?));
            ephemeral = true;
        }
        let fingerprint = live_key
            .as_ref()
            .or(at_start.as_ref().map(|(_, k)| k))
            .and_then(|k| k.cert.first())
            .map(|c| hex(&sha256(c.as_ref())));
        let served = ServedCert {
            live: mgmt.live.clone(),
            at_start,
        };
        match server_config(served) {
            Ok(c) => Some(Tls {
                acceptor: TlsAcceptor::from(c),
                name,
                fingerprint,
                ephemeral,
            }),
            Err(e) => {
                tracing::error!(error = %e, "management API off: TLS configuration");
                None
            }
        }
    }
}

/// No sealed store (another board's disk, tampering): the box must still be reachable to say
/// so. A throwaway certificate, made in memory now and never stored, serves the API; no key of
/// the sealed store is used. `None` (logged) when the store is fine but has no such
/// certificate, or none can be made.
fn throwaway(mgmt: &Mgmt, config: &Config, name: &str) -> Option<Arc<CertifiedKey>> {
    if mgmt.sealed_error.is_none() {
        tracing::error!(certificate = %name, "management API off: no such certificate");
        return None;
    }
    match throwaway_key(&config.hostname, name) {
        Ok(k) => {
            tracing::warn!(
                "management API on a throwaway certificate: the sealed store is not available"
            );
            Some(k)
        }
        Err(e) => {
            tracing::error!(error = %e, "management API off: cannot make a throwaway certificate");
            None
        }
    }
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

fn server_config(cert: ServedCert) -> Result<Arc<ServerConfig>, rustls::Error> {
    let mut sc = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        // A client certificate is asked for, not required; it is judged by its pin per request.
        .with_client_cert_verifier(Arc::new(OfferClientAuth::new(Vec::new())))
        .with_cert_resolver(Arc::new(cert));
    sc.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(sc))
}

/// Binds every address and serves it with one router and one set of connection slots;
/// returns the bound addresses (one that cannot be bound is logged and skipped).
pub(super) async fn bind(mgmt: Arc<Mgmt>, addrs: Vec<SocketAddr>, tls: Tls) -> Vec<SocketAddr> {
    let app = routes::router(mgmt.clone());
    let slots = Arc::new(Admission::default());
    let mut bound = Vec::new();
    for addr in addrs {
        match TcpListener::bind(addr).await {
            Ok(l) => {
                let at = l.local_addr().unwrap_or(addr);
                println!("sealgate mgmt: https://{at}");
                if let Some(fp) = &tls.fingerprint {
                    println!(
                        "sealgate mgmt: certificate sha256 {fp}{}",
                        if tls.ephemeral { " (throwaway)" } else { "" }
                    );
                }
                tracing::info!(listen = %at, certificate = %tls.name, "management API listening");
                bound.push(at);
                let server = Server {
                    tls: tls.acceptor.clone(),
                    app: app.clone(),
                    mgmt: mgmt.clone(),
                };
                tokio::spawn(serve(l, server, slots.clone()));
            }
            Err(e) => {
                tracing::error!(listen = %addr, error = %e, "management API: cannot listen")
            }
        }
    }
    bound
}

/// Who gets a connection slot: at most [`MAX_PER_ADDRESS`] per client address and
/// [`MAX_CONNECTIONS`] in all. With all taken, the oldest connection not proven an admin's (no
/// pinned admin certificate in its handshake) is closed to make room for the new one, so
/// strangers holding every slot delay an admin by at most the time it takes
/// [`MAX_CONNECTIONS`] newer connections to arrive, and never refuse one. Only when every open
/// connection is an admin's is a new one refused.
#[derive(Debug, Default)]
struct Admission {
    state: Mutex<Slots>,
}

#[derive(Debug, Default)]
struct Slots {
    per_address: HashMap<IpAddr, usize>,
    /// Open connections by admission number, oldest first: whether an admin certificate was
    /// seen, and the signal that closes it.
    open: BTreeMap<u64, (bool, Arc<Notify>)>,
    next: u64,
}

impl Admission {
    /// A slot for a connection from `ip` (closing the oldest stranger's when all are taken),
    /// or why not.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, &'static str> {
        let mut st = self.state.lock().map_err(|_| "internal error")?;
        if st.per_address.get(&ip).copied().unwrap_or(0) >= MAX_PER_ADDRESS {
            return Err("too many connections from this address");
        }
        if st.open.len() >= MAX_CONNECTIONS {
            let victim = st
                .open
                .iter()
                .find(|(_, (admin, _))| !admin)
                .map(|(k, _)| *k);
            match victim.and_then(|k| st.open.remove(&k)) {
                Some((_, close)) => close.notify_one(),
                None => return Err("too many connections"),
            }
        }
        let id = st.next;
        st.next += 1;
        let close = Arc::new(Notify::new());
        st.open.insert(id, (false, close.clone()));
        *st.per_address.entry(ip).or_insert(0) += 1;
        Ok(Slot {
            id,
            ip,
            close,
            admission: self.clone(),
        })
    }

    /// The connection presented a pinned admin certificate: it is never closed to make room.
    fn mark_admin(&self, slot: &Slot) {
        if let Ok(mut st) = self.state.lock()
            && let Some(entry) = st.open.get_mut(&slot.id)
        {
            entry.0 = true;
        }
    }
}

/// A connection's slot, given back when the connection ends.
#[derive(Debug)]
struct Slot {
    id: u64,
    ip: IpAddr,
    /// Notified when the slot was taken away to make room: the connection must end.
    close: Arc<Notify>,
    admission: Arc<Admission>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut st) = self.admission.state.lock() {
            st.open.remove(&self.id);
            if let Some(n) = st.per_address.get_mut(&self.ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    st.per_address.remove(&self.ip);
                }
            }
        }
    }
}

/// What serving a connection needs.
#[derive(Clone)]
struct Server {
    tls: TlsAcceptor,
    app: Router,
    mgmt: Arc<Mgmt>,
}

/// Accepts connections while a slot is free for them; one without is closed at once (logged).
async fn serve(listener: TcpListener, server: Server, slots: Arc<Admission>) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "management API: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let slot = match slots.admit(peer.ip()) {
            Ok(s) => s,
            Err(why) => {
                tracing::warn!(%peer, limit = MAX_CONNECTIONS, per_address = MAX_PER_ADDRESS, "management API: {why}; closed");
                continue;
            }
        };
        let server = server.clone();
        tokio::spawn(async move {
            connection(tcp, peer, server, slot).await;
        });
    }
}

/// One connection, ended early when its slot is taken away for a newer one.
async fn connection(tcp: TcpStream, peer: SocketAddr, server: Server, slot: Slot) {
    let close = slot.close.clone();
    tokio::select! {
        _ = close.notified() => {
            tracing::info!(%peer, limit = MAX_CONNECTIONS, "management API: all connections taken; the oldest stranger's closed to make room");
        }
        _ = serve_one(tcp, peer, server, &slot) => {}
    }
}

/// The TLS handshake, then one request (no keep-alive) through the router.
async fn serve_one(tcp: TcpStream, peer: SocketAddr, server: Server, slot: &Slot) {
    let Server { tls, app, mgmt } = server;
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
    if certificate.is_some_and(|c| mgmt.is_admin_certificate(&c)) {
        slot.admission.mark_admin(slot);
    }
    let info = ConnInfo { peer, certificate };
    let app = TowerToHyperService::new(app);
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(info.clone());
        app.call(req)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: usize) -> IpAddr {
        IpAddr::from([127, 1, (n / 250) as u8, (n % 250) as u8 + 1])
    }

    #[test]
    fn slots_per_address_and_in_all_with_the_oldest_stranger_closed_to_make_room() {
        let a = Arc::new(Admission::default());
        let one: Vec<Slot> = (0..MAX_PER_ADDRESS)
            .filter_map(|_| a.admit(ip(0)).ok())
            .collect();
        assert_eq!(one.len(), MAX_PER_ADDRESS);
        assert!(a.admit(ip(0)).is_err(), "the per-address bound");
        drop(one);
        assert!(a.admit(ip(0)).is_ok(), "slots come back");
        let mut held: Vec<Slot> = (0..MAX_CONNECTIONS)
            .map(|n| a.admit(ip(n / MAX_PER_ADDRESS + 1)).expect("a slot"))
            .collect();
        // Connections 0 and 1 are admins'; the oldest stranger's is number 2.
        a.mark_admin(&held[0]);
        a.mark_admin(&held[1]);
        let newcomer = a.admit(ip(10_000)).expect("room is made");
        assert_eq!(a.state.lock().unwrap().open.len(), MAX_CONNECTIONS);
        for (n, s) in held.iter().enumerate() {
            let closed = Arc::strong_count(&s.close) == 1;
            assert_eq!(closed, n == 2, "slot {n}");
        }
        // The closed connection's task then ends and drops its slot.
        held.remove(2);
        assert_eq!(a.state.lock().unwrap().open.len(), MAX_CONNECTIONS);
        drop(newcomer);
        // With nothing but admins open, a new connection is refused.
        drop(held);
        let admins: Vec<Slot> = (0..MAX_CONNECTIONS)
            .map(|n| a.admit(ip(n / MAX_PER_ADDRESS + 1)).expect("a slot"))
            .collect();
        admins.iter().for_each(|s| a.mark_admin(s));
        assert_eq!(a.admit(ip(20_000)).err(), Some("too many connections"));
    }

    #[tokio::test]
    async fn a_closed_slot_wakes_its_connection() {
        let a = Arc::new(Admission::default());
        let first = a.admit(ip(1)).unwrap();
        let _rest: Vec<Slot> = (1..MAX_CONNECTIONS)
            .map(|n| a.admit(ip(n / MAX_PER_ADDRESS + 2)).unwrap())
            .collect();
        let _newcomer = a.admit(ip(9_999)).unwrap();
        tokio::time::timeout(Duration::from_secs(5), first.close.notified())
            .await
            .expect("the oldest stranger is told to close");
    }
}
