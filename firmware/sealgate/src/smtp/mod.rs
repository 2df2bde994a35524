//! The SMTP listeners: accept loop with connection caps, and the driver that runs one
//! [`ServerSession`] over a socket (STARTTLS and implicit TLS via rustls, spool commits,
//! timeouts, logging).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::tls::stream::ServerStream;
use sealgate_proto::Envelope;
use sealgate_proto::received::{ReceivedFields, received_header};
use sealgate_proto::server::{AuthOffer, ClientInfo, Event, ServerSession, StoreResult, TlsInfo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::auth::{Authenticator, RecipientChecker};
use crate::conn::Conn;
use crate::delivery::Queue;
use crate::live::{Live, Snapshot};
use crate::peers::{ClientTlsSeen, PeerStore};
use crate::spool::{BodySink, Spool, SpoolError, unix_now};
use crate::tls::{ClientCheck, ServerTls, suite_name, version_name};
use sealgate_core::x509::sha256_hex;

/// Bodies are moved from the session machine to the spool sink in chunks of at least this.
const BODY_CHUNK: usize = 64 * 1024;
/// The read buffer inside DATA (throughput) and while commands arrive (where a session idles:
/// command lines are at most 512 octets, and the machine buffers pipelined input itself).
const READ_BUF: usize = 16 * 1024;
const IDLE_READ_BUF: usize = 1024;

/// Everything a session needs, shared by all listeners.
#[derive(Debug)]
pub struct Smtpd {
    /// The configuration in force; each session keeps the snapshot it started with.
    pub live: Arc<Live>,
    /// `smtp.max_connections` at start (the semaphore's size).
    max_connections: usize,
    pub spool: Arc<Spool>,
    pub queue: Arc<Queue>,
    /// Inbound clients are recorded in the peer table too.
    pub peers: Arc<PeerStore>,
    /// Checks AUTH credentials (throttle and cache shared by all sessions).
    auth: Authenticator,
    recipients: RecipientChecker,
    sessions: Arc<Semaphore>,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    spool_free: AtomicU64,
    shutdown: watch::Sender<bool>,
    /// Whether the gateway is under stress ([`Smtpd::stressed`]); idle sessions watch it to
    /// shorten their deadline at once.
    stress: watch::Sender<bool>,
}

/// Releases the per-IP slot when the session ends.
struct IpSlot<'a> {
    smtpd: &'a Smtpd,
    ip: IpAddr,
    /// The global connection slot, released first when the session ends.
    permit: Option<OwnedSemaphorePermit>,
}

impl Drop for IpSlot<'_> {
    fn drop(&mut self) {
        drop(self.permit.take());
        if let Ok(mut m) = self.smtpd.per_ip.lock()
            && let Some(n) = m.get_mut(&self.ip)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
        self.smtpd.update_stress();
    }
}

impl Smtpd {
    pub fn new(
        live: Arc<Live>,
        spool: Arc<Spool>,
        queue: Arc<Queue>,
        peers: Arc<PeerStore>,
    ) -> Arc<Smtpd> {
        let max_connections = live.get().config.smtp.max_connections;
        let free = spool.free_bytes();
        let auth = Authenticator::new(&live.get().config.auth);
        Arc::new(Smtpd {
            auth,
            recipients: RecipientChecker::default(),
            sessions: Arc::new(Semaphore::new(max_connections)),
            max_connections,
            per_ip: Mutex::new(HashMap::new()),
            spool_free: AtomicU64::new(free),
            shutdown: watch::Sender::new(false),
            stress: watch::Sender::new(false),
            live,
            spool,
            queue,
            peers,
        })
    }

    /// Sessions open right now.
    pub fn active_sessions(&self) -> usize {
        self.max_connections - self.sessions.available_permits()
    }

    /// More than three quarters of the connection slots are taken: sessions idling outside a
    /// transaction get the short stress timeout.
    fn stressed(&self) -> bool {
        self.sessions.available_permits().saturating_mul(4) < self.max_connections
    }

    /// Tells idle sessions when stress begins or ends.
    fn update_stress(&self) {
        let now = self.stressed();
        let changed = self
            .stress
            .send_if_modified(|v| std::mem::replace(v, now) != now);
        if changed {
            tracing::warn!(
                sessions = self.active_sessions(),
                max = self.max_connections,
                stress = now,
                "connection stress: idle sessions outside a transaction now time out after {}",
                if now { "10s" } else { "smtp.command_timeout" }
            );
        }
    }

    /// Closes idle sessions at once and waits until every session has ended, at most `grace`;
    /// `true` if they all did.
    pub async fn drain(&self, grace: std::time::Duration) -> bool {
        self.shutdown.send_replace(true);
        let all = u32::try_from(self.max_connections).unwrap_or(u32::MAX);
        tokio::time::timeout(grace, self.sessions.acquire_many(all))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Re-measures free spool space (called periodically; sessions read the cached value).
    pub fn refresh_spool_free(&self) {
        self.spool_free
            .store(self.spool.free_bytes(), Ordering::Relaxed);
    }

    fn admit(&self, ip: IpAddr) -> Result<IpSlot<'_>, &'static str> {
        let permit = self
            .sessions
            .clone()
            .try_acquire_owned()
            .map_err(|_| "421 4.7.0 Too many connections, try again later\r\n")?;
        let mut m = self
            .per_ip
            .lock()
            .map_err(|_| "421 4.3.0 Internal error\r\n")?;
        let n = m.entry(ip).or_insert(0);
        if *n >= self.live.get().config.smtp.max_connections_per_ip {
            return Err("421 4.7.0 Too many connections from your address\r\n");
        }
        *n += 1;
        drop(m);
        self.update_stress();
        Ok(IpSlot {
            smtpd: self,
            ip,
            permit: Some(permit),
        })
    }

    /// Accepts connections until the process ends.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, kind: ListenerKind) {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let me = self.clone();
            tokio::spawn(async move {
                me.connection(stream, peer, kind).await;
            });
        }
    }

    async fn connection(&self, mut stream: TcpStream, peer: SocketAddr, kind: ListenerKind) {
        let implicit_tls = kind == ListenerKind::ImplicitTls;
        let snap = self.live.get();
        let local = match stream.local_addr() {
            Ok(a) => a,
            Err(_) => return,
        };
        let _slot = match self.admit(peer.ip()) {
            Ok(x) => x,
            Err(reply) => {
                tracing::info!(client = %peer.ip(), local = %local, result = reply.trim_end(), "session refused");
                if !implicit_tls {
                    let _ = stream.write_all(reply.as_bytes()).await;
                }
                return;
            }
        };
        let mut conn = Conn::Plain(stream);
        let mut implicit = None;
        let mut implicit_cert = None;
        if implicit_tls {
            let Some(tls) = &snap.server_tls else {
                tracing::warn!(client = %peer.ip(), "implicit TLS connection but no certificate installed");
                return;
            };
            let timeout = snap.config.tls.handshake_timeout;
            // Boxed (here and below): a rare step's large future is allocated while it runs
            // instead of widening every idle session's task by its size.
            match Box::pin(self.handshake(&mut conn, tls, timeout, local.ip(), peer.ip())).await {
                Ok((info, cert)) => {
                    implicit = Some(info);
                    implicit_cert = cert;
                }
                Err(e) => {
                    tracing::info!(client = %peer.ip(), local = %local, result = %e, "TLS handshake failed");
                    return;
                }
            }
        }
        let ip = peer.ip();
        // A VPN peer address relays only with a verified client certificate, even when it is
        // also in trusted_networks.
        let verified = implicit
            .as_ref()
            .is_some_and(|t: &TlsInfo| t.verified_client.is_some());
        let info = ClientInfo {
            peer,
            local,
            relay_allowed: verified
                || (snap.config.is_trusted(ip) && snap.config.peer_for(ip).is_none()),
            starttls_available: snap.server_tls.is_some(),
            tls_required: snap.config.is_forced_tls(ip) || kind == ListenerKind::Submission,
            implicit_tls: implicit,
            auth: kind.auth_offer(&snap.config.auth),
        };
        let mut stats = SessionStats {
            client_cert: implicit_cert,
            ..Default::default()
        };
        let result = Box::pin(self.run_session(&snap, &mut conn, info, &mut stats)).await;
        let _ = conn.shutdown().await;
        self.session_done(ip, local, &stats, &result);
    }

    /// The session's log line, and what the peer table keeps of an inbound client.
    fn session_done(
        &self,
        ip: IpAddr,
        local: SocketAddr,
        stats: &SessionStats,
        result: &SessionEnd,
    ) {
        let (tls_v, tls_c) = stats
            .tls
            .as_ref()
            .map(|t| (t.version.as_str(), t.cipher.as_str()))
            .unwrap_or(("none", "none"));
        tracing::info!(
            client = %ip,
            local = %local,
            helo = stats.helo.as_deref().unwrap_or("-"),
            tls = tls_v,
            cipher = tls_c,
            client_cert = stats
                .tls
                .as_ref()
                .and_then(|t| t.verified_client.as_deref())
                .unwrap_or("-"),
            user = stats.user.as_deref().unwrap_or("-"),
            messages = stats.queued.len(),
            queue_ids = %stats.queued.join(","),
            result = %result,
            "session"
        );
        self.peers.client_seen(
            ip,
            stats.helo.as_deref(),
            stats.tls.as_ref().map(|t| ClientTlsSeen {
                version: &t.version,
                cipher: &t.cipher,
                client_cert: stats.client_cert.as_deref(),
                verified_subject: t.verified_client.as_deref(),
            }),
            stats.queued.len(),
            unix_now(),
        );
    }

    async fn handshake(
        &self,
        conn: &mut Conn,
        tls: &ServerTls,
        timeout: std::time::Duration,
        local: IpAddr,
        client: IpAddr,
    ) -> Result<(TlsInfo, Option<String>), String> {
        let tcp = conn.take_plain().ok_or("already TLS")?;
        let hs = tokio::time::timeout(timeout, ServerStream::accept(tcp, tls.for_local(local)))
            .await
            .map_err(|_| "handshake timeout".to_string())?
            .map_err(|e| e.to_string())?;
        let sc = hs.state();
        let client_cert = sc
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| sha256_hex(c));
        let verified_client = match tls.check_client(client, sc.peer_certificates()) {
            ClientCheck::Verified(subject) => Some(subject),
            ClientCheck::NotPeer => None,
            ClientCheck::NoCertificate => {
                tracing::info!(client = %client, "VPN peer address without a client certificate: no relay");
                None
            }
            ClientCheck::Rejected(reason) => {
                tracing::warn!(client = %client, reason = %reason, "client certificate rejected: no relay");
                None
            }
        };
        let info = TlsInfo {
            version: version_name(sc.protocol_version()),
            cipher: suite_name(sc.negotiated_cipher_suite()),
            // The unbuffered connection does not expose it; nothing uses it.
            sni: None,
            verified_client,
        };
        *conn = Conn::ServerTls(Box::new(hs));
        Ok((info, client_cert))
    }

    async fn run_session(
        &self,
        snap: &Snapshot,
        conn: &mut Conn,
        info: ClientInfo,
        stats: &mut SessionStats,
    ) -> SessionEnd {
        let client_ip = info.peer.ip();
        stats.tls = info.implicit_tls.clone();
        let mut s = SessionIo {
            local_ip: info.local.ip(),
            client_ip,
            session: ServerSession::new(snap.params.clone(), info, Instant::now()),
            sink: None,
        };
        s.session
            .set_spool_free(self.spool_free.load(Ordering::Relaxed));
        let mut buf = Vec::new();
        let mut shutdown = self.shutdown.subscribe();
        let mut stress = self.stress.subscribe();
        loop {
            while let Some(ev) = s.session.poll_event() {
                if let Some(end) = self.perform(snap, conn, &mut s, stats, ev).await {
                    return end;
                }
            }
            if s.session.body_len() >= BODY_CHUNK
                && let Some(sink) = s.sink.as_mut()
                && let Err(e) = Box::pin(sink.append(s.session.take_body())).await
            {
                tracing::error!(error = %e, "spool write failed");
                return SessionEnd::SpoolWrite;
            }
            if let Err(e) = flush(conn, &mut s.session).await {
                return SessionEnd::Write(e);
            }
            stats.helo = s.session.helo().map(str::to_string).or(stats.helo.take());
            if s.session.is_closed() {
                return SessionEnd::Closed;
            }
            if !s.session.wants_input() {
                return SessionEnd::Stalled;
            }
            s.session.set_stress(self.stressed());
            let mut wake = Wake {
                shutdown: &mut shutdown,
                stress: &mut stress,
            };
            if let Some(end) = read_input(conn, &mut s, &mut buf, &mut wake).await {
                return end;
            }
        }
    }

    /// Performs one event of the session machine; `Some` ends the session.
    async fn perform(
        &self,
        snap: &Snapshot,
        conn: &mut Conn,
        s: &mut SessionIo,
        stats: &mut SessionStats,
        ev: Event,
    ) -> Option<SessionEnd> {
        match ev {
            Event::StartTls => return Box::pin(self.start_tls(snap, conn, s, stats)).await,
            Event::MessageStart => {
                s.session
                    .set_spool_free(self.spool_free.load(Ordering::Relaxed));
                s.sink = Some(Box::pin(self.begin_message(snap, s)).await);
            }
            Event::MessageComplete(envelope) => {
                if s.session.is_closed() {
                    // The session already ended (input overflow behind the dot): the client
                    // will never see a 250, so storing would only duplicate.
                    s.sink = None;
                    return None;
                }
                let result = Box::pin(self.store_message(s, &envelope, stats)).await;
                s.session.message_stored(result, Instant::now());
            }
            Event::Etrn(domain) => {
                let r = self.queue.etrn(&domain);
                s.session.etrn_result(r, Instant::now());
            }
            Event::Authenticate(credentials) => {
                let r = Box::pin(self.auth.check(snap, s.client_ip, &credentials)).await;
                s.session.auth_result(r, Instant::now());
                stats.user = s.session.authenticated().map(str::to_owned);
            }
            Event::CheckRecipient(address) => {
                let r = Box::pin(self.recipients.check(snap, &address)).await;
                s.session.rcpt_result(r, Instant::now());
            }
            Event::Close => {
                stats.helo = s.session.helo().map(str::to_string);
                let _ = flush(conn, &mut s.session).await;
                return Some(SessionEnd::Closed);
            }
        }
        None
    }

    /// STARTTLS: the `220` out, the handshake, the machine told (it resets the session and
    /// discards what arrived before); a verified VPN peer may relay from here on.
    async fn start_tls(
        &self,
        snap: &Snapshot,
        conn: &mut Conn,
        s: &mut SessionIo,
        stats: &mut SessionStats,
    ) -> Option<SessionEnd> {
        if let Err(e) = flush(conn, &mut s.session).await {
            return Some(SessionEnd::Write(e));
        }
        let Some(tls) = &snap.server_tls else {
            return Some(SessionEnd::NoCertificate);
        };
        let timeout = snap.config.tls.handshake_timeout;
        match Box::pin(self.handshake(conn, tls, timeout, s.local_ip, s.client_ip)).await {
            Ok((t, cert)) => {
                stats.tls = Some(t.clone());
                stats.client_cert = cert;
                let peer_verified = t.verified_client.is_some();
                s.session.tls_established(t, Instant::now());
                if peer_verified {
                    s.session.set_relay_allowed(true);
                }
                None
            }
            Err(e) => Some(SessionEnd::Handshake(e)),
        }
    }

    /// A new message's spool sink, starting with its `Received:` header.
    async fn begin_message(&self, snap: &Snapshot, s: &SessionIo) -> BodySink {
        let mut sink = self.spool.begin(Vec::new());
        let tls = s
            .session
            .tls()
            .map(|t| (t.version.as_str(), t.cipher.as_str()));
        let header = received_header(&ReceivedFields {
            helo: s.session.helo().unwrap_or("unknown"),
            client_ip: s.client_ip,
            by: &snap.config.hostname,
            protocol: s.session.protocol(),
            tls,
            queue_id: sink.id(),
            for_rcpt: None,
            unix_time: unix_now(),
        });
        if let Err(e) = sink.append(header.into_bytes()).await {
            tracing::error!(error = %e, "spool write failed");
        }
        sink
    }

    /// The rest of the body to the spool and the commit (fsync) before the machine may say
    /// `250`; the message then goes to the delivery queue.
    async fn store_message(
        &self,
        s: &mut SessionIo,
        envelope: &Envelope,
        stats: &mut SessionStats,
    ) -> StoreResult {
        let Some(mut sink) = s.sink.take() else {
            return StoreResult::Failed;
        };
        let stored = match sink.append(s.session.take_body()).await {
            Ok(()) => self.spool.commit(sink, envelope).await,
            Err(e) => Err(e),
        };
        match stored {
            Ok(msg) => {
                let id = msg.id.clone();
                tracing::info!(
                    queue_id = %id,
                    client = %s.client_ip,
                    from = %msg.mail_from,
                    rcpts = msg.recipients.len(),
                    size = msg.size,
                    user = s.session.authenticated().unwrap_or("-"),
                    "queued"
                );
                self.queue.enqueue(msg);
                stats.queued.push(id.clone());
                StoreResult::Queued(id)
            }
            Err(SpoolError::NoSpace) => StoreResult::NoSpace,
            Err(e) => {
                tracing::error!(error = %e, "spool commit failed");
                StoreResult::Failed
            }
        }
    }
}

/// What a listener is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    /// `smtp.listen`: STARTTLS offered; AUTH under TLS only with `auth.on_listen`.
    Smtp,
    /// `smtp.implicit_tls`: TLS from the first byte; AUTH when backends exist.
    ImplicitTls,
    /// `smtp.submission` (RFC 6409): STARTTLS, then AUTH, before MAIL.
    Submission,
}

impl ListenerKind {
    fn auth_offer(self, auth: &sealgate_core::config::AuthConfig) -> AuthOffer {
        let any = !auth.backends.is_empty();
        match self {
            ListenerKind::Submission => AuthOffer::Required,
            ListenerKind::ImplicitTls if any => AuthOffer::Offered,
            ListenerKind::Smtp if any && auth.on_listen => AuthOffer::Offered,
            ListenerKind::ImplicitTls | ListenerKind::Smtp => AuthOffer::None,
        }
    }
}

/// One session's machine and what the driver keeps beside it.
struct SessionIo {
    local_ip: IpAddr,
    client_ip: IpAddr,
    session: ServerSession,
    /// The message being received, once DATA started.
    sink: Option<BodySink>,
}

/// Waits for input until the machine's deadline (then tells it) or shutdown: a session not
/// inside DATA is told `421 4.3.2` and closed at once; one inside DATA may finish its message
/// within the grace period. `Some` ends the session.
/// What ends an idle session's wait besides input and its deadline.
struct Wake<'a> {
    shutdown: &'a mut watch::Receiver<bool>,
    stress: &'a mut watch::Receiver<bool>,
}

async fn read_input(
    conn: &mut Conn,
    s: &mut SessionIo,
    buf: &mut Vec<u8>,
    wake: &mut Wake<'_>,
) -> Option<SessionEnd> {
    // Far in the future when the machine sets no deadline.
    let deadline = s
        .session
        .deadline()
        .unwrap_or_else(|| Instant::now() + std::time::Duration::from_secs(86_400));
    let idle = s.sink.is_none();
    // Between commands the session waits for input with no buffer at all; inside DATA the
    // larger buffer is kept from read to read.
    let want = if idle { IDLE_READ_BUF } else { READ_BUF };
    let read_some = async {
        if idle {
            conn.readable().await?;
        }
        if buf.len() != want {
            *buf = vec![0; want];
        }
        conn.read(buf).await
    };
    let read = tokio::select! {
        r = tokio::time::timeout_at(deadline.into(), read_some) => match r {
            Ok(r) => r,
            Err(_) => {
                s.session.handle_timeout(Instant::now());
                return None;
            }
        },
        // Stress began or ended: the deadline is computed again.
        Ok(()) = wake.stress.changed(), if idle => return None,
        _ = wake.shutdown.changed(), if idle => {
            let _ = conn
                .write_all(b"421 4.3.2 Service shutting down, try again later\r\n")
                .await;
            return Some(SessionEnd::Shutdown);
        }
    };
    match read {
        Ok(0) => Some(SessionEnd::Disconnected),
        Ok(n) => {
            s.session.feed(buf.get(..n).unwrap_or(&[]), Instant::now());
            if idle {
                *buf = Vec::new();
            }
            None
        }
        Err(e) => Some(SessionEnd::Read(e)),
    }
}

/// Why a session ended, for its log line.
#[derive(Debug, thiserror::Error)]
enum SessionEnd {
    #[error("closed")]
    Closed,
    #[error("closed by shutdown")]
    Shutdown,
    #[error("client disconnected")]
    Disconnected,
    #[error("session stalled")]
    Stalled,
    #[error("spool write failed")]
    SpoolWrite,
    #[error("STARTTLS without certificate")]
    NoCertificate,
    #[error("TLS handshake failed: {0}")]
    Handshake(String),
    #[error("write error: {0}")]
    Write(std::io::Error),
    #[error("read error: {0}")]
    Read(std::io::Error),
}

#[derive(Debug, Default)]
struct SessionStats {
    helo: Option<String>,
    tls: Option<TlsInfo>,
    /// SHA-256 of the client certificate, if one was presented.
    client_cert: Option<String>,
    /// The login, once AUTH succeeded.
    user: Option<String>,
    queued: Vec<String>,
}

async fn flush(conn: &mut Conn, session: &mut ServerSession) -> std::io::Result<()> {
    if session.has_output() {
        let out = session.take_output();
        conn.write_all(&out).await?;
        conn.flush().await?;
    }
    Ok(())
}
