//! Outbound delivery: the in-memory index of the queue, the scheduler (retries with backoff,
//! expiry, ETRN), routing per recipient domain, SMTP delivery with connection reuse, Maildir
//! delivery, and DSNs.
//!
//! Architecture invariant: a recipient is marked delivered in the spool only after the next
//! hop's `250` (or the Maildir file's fsync); a message leaves the spool only when every
//! recipient is delivered or failed for good (and its DSN, if any, is itself queued).

pub mod dns;
mod hops;
pub mod maildir;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::CertificateDer;
use sealgate_proto::client::{
    ClientError, ClientEvent, ClientParams, ClientSession, StartTlsMode, Transaction,
};
use sealgate_proto::dsn::{self, Action, DsnParams, RecipientStatus};
use sealgate_proto::envelope::domain_of;
use sealgate_proto::policy::{
    AfterEhlo, AfterFailure, AfterHandshake, Attempt, DaneState, Handshake, HandshakeFailure,
    Level, PeerAuth, PeerKey, Plan, RouteFacts, StsState, Tlsa,
};
use sealgate_proto::server::EtrnResult;
use sealgate_proto::{BodyType, Envelope, Reply};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, Semaphore};
use tokio_rustls::TlsConnector;

use crate::conn::Conn;
use crate::delivery::dns::{Dns, MxHosts};
use crate::delivery::hops::{HopSlot, HopSlots};
use crate::delivery::maildir::Maildirs;
use crate::live::{Live, Snapshot};
use crate::peers::PeerStore;
use crate::spool::{COPY_CHUNK, QueuedMessage, RcptStatus, Spool, unix_now};
use crate::tls::client::CertCheck;
use crate::tls::{suite_name, version_name};
use sealgate_core::config::{Config, Destination, Route};
use sealgate_core::delivery::{self as decide, Group, Outcome, Source, Status};
use sealgate_core::x509::subject_of;

/// How long an idle parked connection is kept.
const POOL_IDLE: Duration = Duration::from_secs(20);
/// Longest a delivery waits for a connection to its next hop when all
/// `queue.max_connections_per_hop` are busy; then it is deferred.
const HOP_WAIT: Duration = Duration::from_secs(120);
/// Parked connections that fail on reuse before a delivery stops trying the pool.
const REUSE_TRIES: usize = 3;
/// Longest a write to a next hop may block (it stopped reading): then the session fails.
const WRITE_TIMEOUT: Duration = Duration::from_secs(300);
/// Header bytes of the original returned in a DSN.
const DSN_HEADER_MAX: usize = 64 * 1024;

/// Queue counts for the status API.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct QueueCounts {
    /// Messages in the queue.
    pub messages: usize,
    /// Recipients not yet delivered or failed.
    pub recipients_pending: usize,
    /// Messages that have had at least one attempt.
    pub deferred: usize,
    /// Messages with a delivery attempt running now.
    pub in_flight: usize,
}

/// Why an admin operation on a queued message was not done (nothing changed).
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("no such message in the queue")]
    NotFound,
    #[error("a delivery attempt of this message is running; try again when it has ended")]
    InFlight,
    #[error(transparent)]
    Spool(#[from] crate::spool::SpoolError),
}

/// A parked connection's key: the address and everything its TLS state was judged under —
/// peer name, STARTTLS mode, level, CA, pins, TLSA records and client certificate — so a
/// plaintext or unverified connection never serves a route that asks for more.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    addr: SocketAddr,
    peer_name: String,
    starttls: StartTlsMode,
    level: Level,
    ca: Option<String>,
    pins: Vec<String>,
    tlsa: Vec<Tlsa>,
    client_certificate: Option<String>,
}

impl PoolKey {
    fn new(addr: SocketAddr, route: &Route, attempt: &Attempt) -> Self {
        Self {
            addr,
            peer_name: attempt.peer().name.clone(),
            starttls: attempt.starttls(),
            level: attempt.level(),
            ca: route.ca.clone(),
            pins: route.fingerprints.clone(),
            tlsa: attempt.tlsa().to_vec(),
            client_certificate: route.client_certificate.clone(),
        }
    }
}

#[derive(Debug, Default)]
struct QueueState {
    messages: HashMap<String, QueuedMessage>,
    /// (next attempt unix seconds, id) of messages waiting; in-flight ones are not in here.
    schedule: BTreeSet<(u64, String)>,
}

/// The delivery side of the queue.
#[derive(Debug)]
pub struct Queue {
    /// The configuration in force; an attempt reads it as it goes.
    live: Arc<Live>,
    spool: Arc<Spool>,
    state: Mutex<QueueState>,
    wake: Notify,
    dns: Option<Dns>,
    pool: Mutex<HashMap<PoolKey, Vec<(Instant, ClientConn)>>>,
    /// Connections open per next-hop address (busy or parked).
    hops: Arc<HopSlots>,
    peers: Arc<PeerStore>,
    slots: Arc<Semaphore>,
    /// Relative Maildir paths are taken from here.
    state_dir: PathBuf,
    maildirs: Maildirs,
}

impl Queue {
    pub fn new(
        live: Arc<Live>,
        spool: Arc<Spool>,
        recovered: Vec<QueuedMessage>,
        peers: Arc<PeerStore>,
        state_dir: PathBuf,
    ) -> Arc<Queue> {
        let config = live.get().config.clone();
        let dns = match Dns::new(&config.dns) {
            Ok(d) => Some(d),
            Err(e) => {
                tracing::warn!(error = %e, "no DNS resolver; MX routes will defer");
                None
            }
        };
        let mut st = QueueState::default();
        for m in recovered {
            st.schedule.insert((m.next_attempt, m.id.clone()));
            st.messages.insert(m.id.clone(), m);
        }
        Arc::new(Queue {
            slots: Arc::new(Semaphore::new(config.queue.max_deliveries)),
            live,
            spool,
            state: Mutex::new(st),
            wake: Notify::new(),
            dns,
            pool: Mutex::new(HashMap::new()),
            hops: Arc::new(HopSlots::default()),
            peers,
            state_dir,
            maildirs: Maildirs::default(),
        })
    }

    pub fn len(&self) -> usize {
        self.state.lock().map(|s| s.messages.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A freshly committed message: deliver now.
    pub fn enqueue(&self, m: QueuedMessage) {
        if let Ok(mut st) = self.state.lock() {
            st.schedule.insert((m.next_attempt, m.id.clone()));
            st.messages.insert(m.id.clone(), m);
        }
        self.wake.notify_one();
    }

    /// ETRN: everything queued with a pending recipient in `domain` is due now.
    pub fn etrn(&self, domain: &str) -> EtrnResult {
        let domain = domain.trim_start_matches('@').to_ascii_lowercase();
        let Ok(mut st) = self.state.lock() else {
            return EtrnResult::NoMessages;
        };
        let due: Vec<(u64, String)> = st
            .schedule
            .iter()
            .filter(|(_, id)| {
                st.messages.get(id).is_some_and(|m| {
                    m.pending()
                        .any(|(_, r)| domain_of(&r.address).as_deref() == Some(domain.as_str()))
                })
            })
            .cloned()
            .collect();
        if due.is_empty() {
            return EtrnResult::NoMessages;
        }
        for (t, id) in due {
            st.schedule.remove(&(t, id.clone()));
            st.schedule.insert((0, id));
        }
        drop(st);
        self.wake.notify_one();
        EtrnResult::Started
    }

    /// Every queued message (management API), oldest first.
    pub fn messages(&self) -> Vec<QueuedMessage> {
        let Ok(st) = self.state.lock() else {
            return Vec::new();
        };
        let mut v: Vec<QueuedMessage> = st.messages.values().cloned().collect();
        v.sort_by(|a, b| (a.arrival, &a.id).cmp(&(b.arrival, &b.id)));
        v
    }

    /// Counts for the status API.
    pub fn counts(&self) -> QueueCounts {
        let Ok(st) = self.state.lock() else {
            return QueueCounts::default();
        };
        let messages = st.messages.len();
        QueueCounts {
            messages,
            recipients_pending: st.messages.values().map(|m| m.pending().count()).sum(),
            deferred: st.messages.values().filter(|m| m.attempts > 0).count(),
            in_flight: messages.saturating_sub(st.schedule.len()),
        }
    }

    /// Takes a waiting message off the schedule for an admin operation: `Ok` holds its
    /// schedule entry (to put back if the operation fails) and a copy of it.
    fn take_for_admin(&self, id: &str) -> Result<((u64, String), QueuedMessage), AdminError> {
        let mut st = self.state.lock().map_err(|_| AdminError::NotFound)?;
        let Some(m) = st.messages.get(id).cloned() else {
            return Err(AdminError::NotFound);
        };
        let Some(entry) = st.schedule.iter().find(|(_, i)| i == id).cloned() else {
            return Err(AdminError::InFlight);
        };
        st.schedule.remove(&entry);
        Ok((entry, m))
    }

    /// Admin "release": the message's next attempt is now, recorded durably in the spool
    /// like any delivery state.
    pub async fn release(&self, id: &str) -> Result<QueuedMessage, AdminError> {
        let (entry, mut m) = self.take_for_admin(id)?;
        m.next_attempt = unix_now();
        if let Err(e) = self.spool.save_state(&m).await {
            if let Ok(mut st) = self.state.lock() {
                st.schedule.insert(entry);
            }
            return Err(AdminError::Spool(e));
        }
        if let Ok(mut st) = self.state.lock() {
            st.schedule.insert((0, m.id.clone()));
            st.messages.insert(m.id.clone(), m.clone());
        }
        tracing::info!(queue_id = %m.id, "released by the admin: delivery attempt now");
        self.wake.notify_one();
        Ok(m)
    }

    /// Admin "delete": the message leaves the queue durably (a `done` record in the spool),
    /// without a DSN.
    pub async fn delete(&self, id: &str) -> Result<QueuedMessage, AdminError> {
        let (entry, m) = self.take_for_admin(id)?;
        if let Err(e) = self.spool.remove(&m.id).await {
            if let Ok(mut st) = self.state.lock() {
                st.schedule.insert(entry);
            }
            return Err(AdminError::Spool(e));
        }
        if let Ok(mut st) = self.state.lock() {
            st.messages.remove(&m.id);
        }
        tracing::warn!(
            queue_id = %m.id,
            pending = m.pending().count(),
            "deleted from the queue by the admin (no DSN)"
        );
        Ok(m)
    }

    /// The scheduler: starts due attempts, bounded by `queue.max_deliveries`.
    pub async fn run(self: Arc<Self>) {
        let mut sweep = tokio::time::interval(Duration::from_secs(5));
        loop {
            let now = unix_now();
            let mut next_due = None;
            loop {
                let Ok(permit) = self.slots.clone().try_acquire_owned() else {
                    break;
                };
                let msg = {
                    let Ok(mut st) = self.state.lock() else {
                        return;
                    };
                    match st.schedule.first().cloned() {
                        Some((t, id)) if t <= now => {
                            st.schedule.remove(&(t, id.clone()));
                            st.messages.get(&id).cloned()
                        }
                        Some((t, _)) => {
                            next_due = Some(t);
                            None
                        }
                        None => None,
                    }
                };
                let Some(msg) = msg else { break };
                let me = self.clone();
                tokio::spawn(async move {
                    me.attempt(msg).await;
                    drop(permit);
                    me.wake.notify_one();
                });
            }
            let wait = next_due
                .map(|t| Duration::from_secs(t.saturating_sub(now).max(1)))
                .unwrap_or(Duration::from_secs(60));
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = sweep.tick() => self.sweep_pool(),
            }
        }
    }

    /// Closes parked connections idle for [`POOL_IDLE`], each with `QUIT` (in its own task:
    /// a slow server delays nobody).
    fn sweep_pool(&self) {
        let mut expired = Vec::new();
        if let Ok(mut pool) = self.pool.lock() {
            for conns in pool.values_mut() {
                let (old, keep): (Vec<_>, Vec<_>) =
                    conns.drain(..).partition(|(t, _)| t.elapsed() >= POOL_IDLE);
                *conns = keep;
                expired.extend(old.into_iter().map(|(_, c)| c));
            }
            pool.retain(|_, v| !v.is_empty());
        }
        for conn in expired {
            tokio::spawn(conn.quit());
        }
    }

    /// A parked connection for `key` that is still usable: idle less than [`POOL_IDLE`], and
    /// nothing arrived on it meanwhile (a stray reply, or the server closing) — such a
    /// connection would answer the next command with the wrong reply, so it is dropped.
    async fn pooled(&self, key: &PoolKey) -> Option<ClientConn> {
        loop {
            let (parked, conn) = self.pool.lock().ok()?.get_mut(key)?.pop()?;
            if parked.elapsed() >= POOL_IDLE {
                tokio::spawn(conn.quit());
                continue;
            }
            if let Some(conn) = conn.still_idle().await {
                return Some(conn);
            }
        }
    }

    /// One delivery attempt of every pending recipient of `msg`.
    async fn attempt(&self, mut msg: QueuedMessage) {
        // The message is read in pieces by each delivery; here it must merely be there.
        if let Err(e) = self.spool.open_message(&msg.id) {
            {
                tracing::error!(queue_id = %msg.id, error = %e, "cannot read queued message");
                self.reschedule(msg, false).await;
                return;
            }
        }
        let config = self.live.get().config.clone();
        let pending = msg.pending().map(|(i, r)| (i, r.address.as_str()));
        let groups = decide::group_by_route(&config, pending);
        for group in groups {
            let outcomes = match &group.route {
                None => group
                    .recipients
                    .iter()
                    .map(|&i| (i, Outcome::Failed(decide::no_route())))
                    .collect(),
                Some(route) => self.deliver_group(&msg, route, &group).await,
            };
            for (i, o) in outcomes {
                if let Some(r) = msg.recipients.get_mut(i) {
                    tracing::info!(
                        queue_id = %msg.id,
                        rcpt = %r.address,
                        result = %o,
                        "delivery"
                    );
                    match o {
                        Outcome::Delivered(t) => r.status = RcptStatus::Delivered(t),
                        Outcome::Failed(t) => r.status = RcptStatus::Failed(t),
                        Outcome::Deferred(t) => r.last_error = Some(t),
                    }
                }
            }
        }
        msg.attempts += 1;
        self.reschedule(msg, true).await;
    }

    /// After an attempt: finish (DSN, remove) or persist the state and schedule the retry.
    /// `body` is `None` when the message could not be read (then it is only retried).
    async fn reschedule(&self, mut msg: QueuedMessage, readable: bool) {
        let now = unix_now();
        let config = self.live.get().config.clone();
        let expired = decide::is_expired(msg.arrival, config.queue.max_queue_time, now);
        if expired && readable {
            for r in msg.recipients.iter_mut() {
                if r.status == RcptStatus::Pending {
                    let why = Status::expired(r.last_error.as_ref(), msg.attempts);
                    r.status = RcptStatus::Failed(why);
                }
            }
        }
        if msg.is_done() {
            if let Err(e) = self.bounce(&msg).await {
                // Keep the message: better a late DSN than a lost one.
                tracing::error!(queue_id = %msg.id, error = %e, "cannot queue DSN; keeping message");
                return self.put_back(msg, now.saturating_add(60)).await;
            }
            // Delivered everywhere: a removal lost in a power cut only means one more delivery.
            let delivered = msg
                .recipients
                .iter()
                .all(|r| matches!(r.status, RcptStatus::Delivered(_)));
            let removed = if delivered {
                self.spool.remove_delivered(&msg.id).await
            } else {
                self.spool.remove(&msg.id).await
            };
            if let Err(e) = removed {
                tracing::error!(queue_id = %msg.id, error = %e, "cannot remove finished message");
            }
            if let Ok(mut st) = self.state.lock() {
                st.messages.remove(&msg.id);
            }
            tracing::info!(queue_id = %msg.id, attempts = msg.attempts, "done");
            return;
        }
        let next = decide::next_attempt(&config.queue.retry_schedule, msg.attempts, now);
        msg.next_attempt = next;
        if let Err(e) = self.spool.save_state(&msg).await {
            tracing::error!(queue_id = %msg.id, error = %e, "cannot save delivery state");
        }
        self.put_back(msg, next).await;
    }

    async fn put_back(&self, mut msg: QueuedMessage, next: u64) {
        msg.next_attempt = next;
        if let Ok(mut st) = self.state.lock() {
            st.schedule.insert((next, msg.id.clone()));
            st.messages.insert(msg.id.clone(), msg);
        }
    }

    /// Queues a DSN to the sender for every failed recipient (none for a null sender).
    async fn bounce(&self, msg: &QueuedMessage) -> Result<(), crate::spool::SpoolError> {
        let failed: Vec<RecipientStatus> = msg
            .recipients
            .iter()
            .filter_map(|r| match &r.status {
                RcptStatus::Failed(why) => Some(RecipientStatus {
                    recipient: r.address.clone(),
                    action: Action::Failed,
                    status: why
                        .enhanced
                        .map_or_else(|| "5.0.0".to_string(), |e| e.to_string()),
                    diagnostic: why.to_string(),
                    remote_mta: None,
                }),
                _ => None,
            })
            .collect();
        if failed.is_empty() || msg.mail_from.is_empty() {
            return Ok(());
        }
        // Only the header section goes back (RFC 3464 text/rfc822-headers), read up to its bound.
        let original = self.spool.read_head(&msg.id, DSN_HEADER_MAX + 2).await?;
        let sink = self.spool.begin(Vec::new());
        let config = self.live.get().config.clone();
        let message_id = format!("{}.dsn@{}", sink.id(), config.hostname);
        let bytes = dsn::build(&DsnParams {
            reporting_mta: &config.hostname,
            to: &msg.mail_from,
            queue_id: &msg.id,
            arrival_time: msg.arrival,
            now: unix_now(),
            recipients: &failed,
            original_headers: dsn::header_section(&original, DSN_HEADER_MAX),
            message_id: &message_id,
        });
        let mut sink = sink;
        sink.append(bytes).await?;
        let env = Envelope {
            mail_from: String::new(),
            rcpt_to: vec![msg.mail_from.clone()],
            body: BodyType::EightBitMime,
            smtputf8: false,
            declared_size: None,
        };
        let dsn_msg = self.spool.commit(sink, &env).await?;
        tracing::info!(queue_id = %dsn_msg.id, original = %msg.id, to = %msg.mail_from, "DSN queued");
        self.enqueue(dsn_msg);
        Ok(())
    }

    async fn deliver_group(
        &self,
        msg: &QueuedMessage,
        route: &Route,
        group: &Group,
    ) -> Vec<(usize, Outcome)> {
        let idx = group.recipients.as_slice();
        let all = |o: Outcome| idx.iter().map(|&i| (i, o.clone())).collect::<Vec<_>>();
        // The hosts, and whether the lookup that named them was DNSSEC-validated (next hops
        // are named by the config, which is signed).
        let (hosts, names_secure): (Vec<(String, u16)>, bool) = match &route.destination {
            Destination::Maildir(dir) => return self.deliver_maildir(msg, dir, idx).await,
            Destination::NextHops(h) => (h.clone(), true),
            Destination::Mx(port) => match self.mx_hosts(group.mx_domain()).await {
                Ok(mx) => (
                    mx.hosts.into_iter().map(|h| (h, *port)).collect(),
                    mx.secure,
                ),
                Err(o) => return all(o),
            },
        };
        let mut last_error = Status::transient(Source::Connection, 4, 1, "no next hop reachable");
        // RFC 5321 §5.1: when no host of the list has an address at all, that is an error to
        // report (bounce), not a reason to retry for days.
        let mut all_unresolvable = !hosts.is_empty();
        for (host, port) in &hosts {
            let addrs = match self.addresses(host).await {
                Ok(a) => a,
                Err(status) => {
                    all_unresolvable &= status.class() == decide::Class::Permanent;
                    last_error = status;
                    continue;
                }
            };
            all_unresolvable = false;
            let dane = self
                .dane_state(route, group.mx_domain(), host, *port, names_secure)
                .await;
            for ip in addrs {
                let addr = SocketAddr::new(ip, *port);
                match self.deliver_smtp(msg, route, host, addr, idx, &dane).await {
                    Ok(outcomes) => return outcomes,
                    Err(e) => {
                        tracing::info!(queue_id = %msg.id, peer = %addr, error = %e, "next hop failed");
                        last_error = e;
                    }
                }
            }
        }
        if all_unresolvable {
            return all(Outcome::Failed(last_error.with_code(550)));
        }
        all(Outcome::Deferred(last_error))
    }

    /// What DANE finds for one host of a `dane`/`dane-only` route (not looked up for other
    /// levels): the TLSA records of `_PORT._tcp.HOST`, looked up only when the name of the host
    /// came from a validated MX RRset (or the config) — RFC 7672 §2.2.1.
    async fn dane_state(
        &self,
        route: &Route,
        domain: &str,
        host: &str,
        port: u16,
        names_secure: bool,
    ) -> DaneState {
        if !matches!(route.tls, Level::Dane | Level::DaneOnly) {
            return DaneState::NotLookedUp;
        }
        if !names_secure {
            return DaneState::Insecure(format!(
                "the MX records of {domain} are not DNSSEC-validated"
            ));
        }
        if host.parse::<std::net::IpAddr>().is_ok() {
            return DaneState::Insecure(format!("the next hop {host} is an IP address"));
        }
        match &self.dns {
            Some(dns) => dns.tlsa(host, port).await,
            None => DaneState::Failed("no DNS resolver available".into()),
        }
    }

    /// The MX hosts of `domain`, best first; the outcome for every recipient when there are
    /// none to try.
    async fn mx_hosts(&self, domain: &str) -> Result<MxHosts, Outcome> {
        let Some(dns) = &self.dns else {
            return Err(Outcome::Deferred(Status::transient(
                Source::Dns,
                4,
                3,
                "no DNS resolver available",
            )));
        };
        dns.mx_hosts(domain).await.map_err(Outcome::of)
    }

    /// The addresses of a next hop (an IP literal is its own).
    async fn addresses(&self, host: &str) -> Result<Vec<std::net::IpAddr>, Status> {
        if let Ok(ip) = host.parse::<std::net::IpAddr>() {
            return Ok(vec![ip]);
        }
        match &self.dns {
            Some(dns) => dns.addresses(host).await,
            None => Err(Status::transient(
                Source::Dns,
                4,
                3,
                format!("cannot resolve {host}: no DNS resolver"),
            )),
        }
    }

    /// Delivers to one server. `Err` means "try the next hop" (nothing was accepted).
    async fn deliver_smtp(
        &self,
        msg: &QueuedMessage,
        route: &Route,
        host: &str,
        addr: SocketAddr,
        idx: &[usize],
        dane: &DaneState,
    ) -> Result<Vec<(usize, Outcome)>, Status> {
        let snap = self.live.get();
        let key = PeerKey::new(addr.ip(), host);
        let facts = RouteFacts {
            level: route.tls,
            forced: snap.config.is_forced_tls(addr.ip()),
            pins: route.fingerprints.clone(),
            dane: dane.clone(),
            // MTA-STS policies are not fetched yet (issue 13).
            sts: StsState::None,
        };
        let attempt = match self.peers.plan(&facts, &key, unix_now()).action {
            Plan::Connect(a) => a,
            Plan::Defer(d) => {
                tracing::info!(queue_id = %msg.id, peer = %addr, host, policy = %d, "delivery deferred by the TLS policy");
                return Err(policy_status(&d));
            }
        };
        let tag = PoolKey::new(addr, route, &attempt);
        let limit = snap.config.queue.max_connections_per_hop;
        let mut reuse_failures = 0;
        loop {
            match self
                .connection_for(&tag, limit, reuse_failures < REUSE_TRIES)
                .await?
            {
                Next::Reuse(conn) => match self.transact(*conn, msg, host, &tag, idx).await {
                    Ok(v) => return Ok(v),
                    // A parked connection may have been closed by the server meanwhile; `Err`
                    // means nothing was sent, so another connection is safe.
                    Err(e) => {
                        reuse_failures += 1;
                        tracing::debug!(peer = %addr, error = %e, "reused connection failed");
                    }
                },
                Next::Open(slot) => {
                    let mut conn = self.connect(&snap, route, attempt, host, addr).await?;
                    conn.hop = Some(slot);
                    return self.transact(conn, msg, host, &tag, idx).await;
                }
            }
        }
    }

    /// A parked connection for `tag`, or a slot to open a new one to its address; when all
    /// `limit` slots are taken, waits (at most [`HOP_WAIT`]) for one to be parked or freed.
    /// A connection parked under another key for the same address is closed to make room.
    async fn connection_for(
        &self,
        tag: &PoolKey,
        limit: usize,
        reuse: bool,
    ) -> Result<Next, Status> {
        let deadline = tokio::time::Instant::now() + HOP_WAIT;
        loop {
            let freed = self.hops.freed();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if reuse && let Some(conn) = self.pooled(tag).await {
                return Ok(Next::Reuse(Box::new(conn)));
            }
            if let Some(slot) = self.hops.try_take(tag.addr, limit) {
                return Ok(Next::Open(slot));
            }
            // After failed reuses, parked connections of this very key go too.
            self.evict_parked(tag, !reuse);
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return Err(Status::transient(
                    Source::Local,
                    4,
                    5,
                    format!(
                        "{}: all {limit} connections (queue.max_connections_per_hop) stayed busy for {} s",
                        tag.addr,
                        HOP_WAIT.as_secs()
                    ),
                ));
            }
        }
    }

    /// Closes one connection parked for `tag`'s address under another key (other TLS
    /// demands; or under `tag` itself too when `own`), so that its slot comes free.
    fn evict_parked(&self, tag: &PoolKey, own: bool) {
        let victim = self.pool.lock().ok().and_then(|mut pool| {
            let key = pool
                .iter()
                .find(|(k, v)| k.addr == tag.addr && (own || *k != tag) && !v.is_empty())
                .map(|(k, _)| k.clone())?;
            let conns = pool.get_mut(&key)?;
            let (_, conn) = conns.remove(0);
            if conns.is_empty() {
                pool.remove(&key);
            }
            Some(conn)
        });
        if let Some(conn) = victim {
            tokio::spawn(conn.quit());
        }
    }

    /// Runs one transaction on a ready connection and parks it afterwards.
    async fn transact(
        &self,
        mut conn: ClientConn,
        msg: &QueuedMessage,
        host: &str,
        key: &PoolKey,
        idx: &[usize],
    ) -> Result<Vec<(usize, Outcome)>, Status> {
        let addr = key.addr;
        let rcpts: Vec<String> = idx
            .iter()
            .filter_map(|&i| msg.recipients.get(i).map(|r| r.address.clone()))
            .collect();
        let tx = Transaction {
            mail_from: msg.mail_from.clone(),
            rcpt_to: rcpts,
            size: msg.size,
            eightbit: msg.body_type == BodyType::EightBitMime,
            smtputf8: msg.smtputf8,
        };
        if let Err(e) = conn.session.send_transaction(tx, Instant::now()) {
            if e == ClientError::Unexpected {
                // The session is not ready (a reused one that failed meanwhile): nothing was
                // sent, so a fresh connection may try.
                return Err(session_failure(addr, e));
            }
            let o = refused_transaction(&e);
            return Ok(idx.iter().map(|&i| (i, o.clone())).collect());
        }
        conn.uses = conn.uses.saturating_add(1);
        let mut sent = false;
        loop {
            let failure: Status = match conn.next_event().await {
                Ok(ClientEvent::SendBody) => {
                    sent = true;
                    match self.send_body(&mut conn, &msg.id).await {
                        Ok(()) => continue,
                        Err(e) => e,
                    }
                }
                Ok(ClientEvent::TransactionDone { rcpt, mail, data }) => {
                    let peer = format!("{host} [{}] ({})", addr, conn.tls_desc());
                    let replies = decide::Replies {
                        mail: mail.as_ref(),
                        rcpt: &rcpt,
                        data: data.as_ref(),
                    };
                    let outcomes: Vec<(usize, Outcome)> = idx
                        .iter()
                        .copied()
                        .zip(decide::outcomes(&replies, idx.len(), &peer))
                        .collect();
                    log_attempt(&conn, &msg.id, host, &replies, &outcomes);
                    // Reuse: the session is Ready again and nothing else is pending; park it.
                    if let Ok(ClientEvent::Ready(_)) = conn.next_event().await
                        && conn.session.poll_event().is_none()
                    {
                        self.park(key, conn);
                    }
                    return Ok(outcomes);
                }
                Ok(ClientEvent::Ready(_)) => continue,
                Ok(ClientEvent::StartTls) => session_failure(addr, "unexpected STARTTLS state"),
                Ok(ClientEvent::Failed(e)) => session_failure(addr, e),
                Ok(ClientEvent::Closed) => session_failure(addr, "connection closed"),
                Err(e) => e,
            };
            tracing::info!(
                queue_id = %msg.id,
                peer = %addr,
                host,
                tls = %conn.tls_desc(),
                result = %failure,
                "delivery attempt failed"
            );
            // Once the body went out it may have arrived: at-least-once means defer, and not
            // try another hop now. Before that, nothing was accepted: the next hop may try.
            return if sent {
                Ok(idx
                    .iter()
                    .map(|&i| (i, Outcome::Deferred(failure.clone())))
                    .collect())
            } else {
                Err(failure)
            };
        }
    }

    /// Streams the queued message `id` as the DATA of `conn`, a [`COPY_CHUNK`] piece at a time
    /// (read, dot-stuffed, written), so no message is ever held whole. An error leaves the
    /// transaction without its final dot: the server accepted nothing.
    async fn send_body(&self, conn: &mut ClientConn, id: &str) -> Result<(), Status> {
        let addr = conn.addr;
        let mut reader = self.spool.open_message(id).map_err(|e| {
            Status::transient(Source::Local, 3, 0, format!("cannot read the message: {e}"))
        })?;
        loop {
            let piece = reader.next_chunk(COPY_CHUNK).await.map_err(|e| {
                Status::transient(Source::Local, 3, 0, format!("cannot read the message: {e}"))
            })?;
            let last = piece.is_none();
            conn.session.send_body_piece(
                piece.as_deref().unwrap_or_default(),
                last,
                Instant::now(),
            );
            conn.write_out()
                .await
                .map_err(|e| session_failure(addr, e))?;
            if last {
                return Ok(());
            }
        }
    }

    /// Parks a connection that is ready for the next transaction and wakes the deliveries
    /// waiting for one. (Their number is bounded by its slot: `queue.max_connections_per_hop`.)
    fn park(&self, key: &PoolKey, conn: ClientConn) {
        if let Ok(mut p) = self.pool.lock() {
            p.entry(key.clone())
                .or_default()
                .push((Instant::now(), conn));
        }
        self.hops.wake();
    }

    /// Opens a session to `addr` as the policy engine says, and consults it at each step: after
    /// EHLO (STARTTLS offered or not), after a failed handshake (one plaintext reconnect for
    /// `may`, else defer) and after a completed one (the certificate as the level demands).
    /// Every step's effects go to the peer table. `Ok` is a session ready for mail.
    async fn connect(
        &self,
        snap: &Snapshot,
        route: &Route,
        mut attempt: Attempt,
        host: &str,
        addr: SocketAddr,
    ) -> Result<ClientConn, Status> {
        let key = attempt.peer().clone();
        let mut reconnected = false;
        loop {
            let mut conn = self.open(&snap.config, addr, &attempt).await?;
            let event = conn.next_event().await?;
            let now = unix_now();
            let secured = match event {
                ClientEvent::StartTls => self.secure(snap, route, &attempt, host, conn).await,
                // A refused STARTTLS counts like a failed handshake (`may` falls back).
                ClientEvent::Failed(ClientError::StartTlsRefused(r)) => {
                    let d = attempt.after_ehlo(true, now);
                    self.peers.apply(&key, now, &d);
                    let why =
                        HandshakeFailure::Failed(format!("STARTTLS refused: {}", r.one_line()));
                    self.tls_failed(&attempt, addr, host, &why)
                }
                event => return self.no_tls(&attempt, addr, host, event, conn),
            };
            match secured {
                Secured::Ready(conn) => return Ok(*conn),
                Secured::Defer(status) => return Err(status),
                Secured::Plaintext {
                    reason,
                    attempt: plain,
                } if !reconnected => {
                    tracing::warn!(peer = %addr, host, policy = %reason, "TLS fallback");
                    attempt = plain;
                    reconnected = true;
                    continue;
                }
                Secured::Plaintext { reason, .. } => {
                    return Err(Status::transient(
                        Source::TlsPolicy,
                        7,
                        5,
                        format!("{addr}: {reason}"),
                    ));
                }
            }
        }
    }

    /// The session went on without a TLS attempt: ready in plaintext (as the policy allows),
    /// STARTTLS missing, response injection, or another failure.
    fn no_tls(
        &self,
        attempt: &Attempt,
        addr: SocketAddr,
        host: &str,
        event: ClientEvent,
        conn: ClientConn,
    ) -> Result<ClientConn, Status> {
        let key = attempt.peer().clone();
        let now = unix_now();
        match event {
            ClientEvent::Ready(caps) => {
                let d = attempt.after_ehlo(caps.starttls, now);
                self.peers.apply(&key, now, &d);
                match d.action {
                    AfterEhlo::Plaintext(reason) => {
                        tracing::info!(peer = %addr, host, policy = %reason, "plaintext session");
                        Ok(conn)
                    }
                    AfterEhlo::Defer(d) => Err(policy_status(&d)),
                    AfterEhlo::UseTls => Err(session_failure(
                        addr,
                        "the session went on without the STARTTLS the policy asked for",
                    )),
                }
            }
            ClientEvent::Failed(ClientError::TlsNotOffered) => {
                let d = attempt.after_ehlo(false, now);
                self.peers.apply(&key, now, &d);
                Err(match d.action {
                    AfterEhlo::Defer(d) => {
                        tracing::warn!(peer = %addr, host, policy = %d, "STARTTLS missing");
                        policy_status(&d)
                    }
                    _ => Status::transient(
                        Source::TlsPolicy,
                        7,
                        4,
                        format!("{addr}: the server did not offer STARTTLS"),
                    ),
                })
            }
            ClientEvent::Failed(e @ ClientError::ResponseInjection) => {
                tracing::warn!(peer = %addr, host, error = %e, "STARTTLS response injection; session aborted");
                Err(injection(addr))
            }
            ClientEvent::Failed(e) => Err(session_failure(addr, e)),
            other => Err(session_failure(addr, format!("unexpected {other:?}"))),
        }
    }

    /// STARTTLS was answered `220`: the handshake, then the certificate judged as the level
    /// demands; each step's effects go to the peer table.
    async fn secure(
        &self,
        snap: &Snapshot,
        route: &Route,
        attempt: &Attempt,
        host: &str,
        mut conn: ClientConn,
    ) -> Secured {
        let key = attempt.peer().clone();
        let addr = conn.addr;
        let now = unix_now();
        let d = attempt.after_ehlo(true, now);
        self.peers.apply(&key, now, &d);
        let config = snap.client_tls.config(route.client_certificate.as_deref());
        let timeout = snap.config.tls.handshake_timeout;
        let done = match conn.handshake(config, host, timeout).await {
            Ok(done) => done,
            Err(StartTlsError::Injection) => {
                tracing::warn!(peer = %addr, host, "STARTTLS response injection (bytes after the 220); session aborted");
                return Secured::Defer(injection(addr));
            }
            Err(StartTlsError::Handshake(failure)) => {
                return self.tls_failed(attempt, addr, host, &failure);
            }
        };
        let (cert, detail) = snap.client_tls.facts(
            attempt.level(),
            route.ca.as_deref(),
            attempt.tlsa(),
            host,
            &done.chain,
        );
        let hs = Handshake {
            version: done.version.clone(),
            cipher: done.cipher.clone(),
            cert,
        };
        let now = unix_now();
        let d = attempt.after_handshake(&hs, now);
        self.peers.apply(&key, now, &d);
        if let AfterHandshake::Defer(d) = d.action {
            let detail = detail.map(|x| format!(" [{x}]")).unwrap_or_default();
            tracing::warn!(peer = %addr, host, policy = %d, detail = %detail, "TLS peer rejected");
            let mut status = policy_status(&d);
            status.text.push_str(&detail);
            return Secured::Defer(status);
        }
        tracing::debug!(peer = %addr, host, policy = attempt.reason(), "TLS established");
        conn.tls = Some(TlsInfo {
            subject: done
                .chain
                .first()
                .and_then(|c| subject_of(c))
                .unwrap_or_default(),
            version: done.version,
            cipher: done.cipher,
            fingerprint: hs.cert.fingerprint_sha256,
            check: CertCheck::of(attempt.level()),
            auth: attempt.auth(),
            resumed: done.resumed,
        });
        conn.session.tls_established(Instant::now());
        match conn.next_event().await {
            Ok(ClientEvent::Ready(_)) => Secured::Ready(Box::new(conn)),
            Ok(ClientEvent::Failed(e)) => Secured::Defer(session_failure(addr, e)),
            Ok(other) => Secured::Defer(session_failure(addr, format!("unexpected {other:?}"))),
            Err(e) => Secured::Defer(e),
        }
    }

    /// The handshake failed (or STARTTLS was refused): the policy engine says whether to
    /// reconnect in plaintext (`may`, remembered) or defer; its effects go to the peer table.
    fn tls_failed(
        &self,
        attempt: &Attempt,
        addr: SocketAddr,
        host: &str,
        failure: &HandshakeFailure,
    ) -> Secured {
        let now = unix_now();
        let d = attempt.after_handshake_failure(failure, now);
        self.peers.apply(attempt.peer(), now, &d);
        match d.action {
            AfterFailure::ReconnectPlaintext { reason, attempt } => {
                Secured::Plaintext { reason, attempt }
            }
            AfterFailure::Defer(d) => {
                tracing::warn!(peer = %addr, host, policy = %d, "TLS handshake failed");
                Secured::Defer(policy_status(&d))
            }
        }
    }

    /// A TCP connection and a fresh session machine in the attempt's STARTTLS mode.
    async fn open(
        &self,
        config: &Config,
        addr: SocketAddr,
        attempt: &Attempt,
    ) -> Result<ClientConn, Status> {
        let failed = |why: String| Status::transient(Source::Connection, 4, 1, why);
        let tcp = tokio::time::timeout(config.queue.connect_timeout, tcp_connect(config, addr))
            .await
            .map_err(|_| failed(format!("connect to {addr} timed out")))?
            .map_err(|e| failed(format!("connect to {addr}: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let params = ClientParams {
            helo: config.hostname.clone(),
            starttls: attempt.starttls(),
            ..Default::default()
        };
        Ok(ClientConn {
            conn: Conn::Plain(tcp),
            addr,
            session: ClientSession::new(params, Instant::now()),
            buf: vec![0; 8192],
            tls: None,
            level: attempt.level(),
            hop: None,
            uses: 0,
        })
    }

    async fn deliver_maildir(
        &self,
        msg: &QueuedMessage,
        dir: &std::path::Path,
        idx: &[usize],
    ) -> Vec<(usize, Outcome)> {
        let dir: PathBuf = if dir.is_absolute() {
            dir.to_path_buf()
        } else {
            self.state_dir.join(dir)
        };
        let hostname = self.live.get().config.hostname.clone();
        let mut out = Vec::new();
        for &i in idx {
            let Some(r) = msg.recipients.get(i) else {
                continue;
            };
            let head = format!(
                "Return-Path: <{}>\r\nDelivered-To: {}\r\n",
                msg.mail_from, r.address
            );
            let name = format!("{}.{}_{}.{}", unix_now(), msg.id, i, hostname);
            let reader = self.spool.open_message(&msg.id);
            let content = move |f: &mut std::fs::File| {
                let mut reader = reader.map_err(std::io::Error::other)?;
                std::io::Write::write_all(f, head.as_bytes())?;
                reader.copy_to(f).map(|_| ())
            };
            let o = match self.maildirs.deliver(&dir, name, content).await {
                Ok(()) => Outcome::Delivered(
                    Status::new(
                        Source::Local,
                        decide::Enhanced(2, 0, 0),
                        format!("delivered to Maildir {}", dir.display()),
                    )
                    .with_code(250),
                ),
                Err(e) => Outcome::Deferred(Status::transient(
                    Source::Local,
                    3,
                    0,
                    format!("Maildir {}: {e}", dir.display()),
                )),
            };
            out.push((i, o));
        }
        out
    }
}

/// A TCP connection to `addr`, from `queue.bind_address` when one is configured (of the same
/// address family; otherwise the kernel chooses).
async fn tcp_connect(config: &Config, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    if let Some(ip) = config.queue.bind_address
        && ip.is_ipv4() == addr.is_ipv4()
    {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    socket.connect(addr).await
}

/// What became of STARTTLS on a connection.
enum Secured {
    /// TLS is up and the certificate accepted: ready for mail.
    Ready(Box<ClientConn>),
    /// The policy says: reconnect in plaintext (`may` after a failed handshake), and why.
    Plaintext { reason: String, attempt: Attempt },
    /// Quit; the recipients stay queued with this status.
    Defer(Status),
}

/// Why STARTTLS did not give a TLS session.
enum StartTlsError {
    /// The handshake failed or timed out.
    Handshake(HandshakeFailure),
    /// Bytes arrived after the `220` to STARTTLS, before the handshake.
    Injection,
}

/// The status of a session aborted for STARTTLS response injection.
fn injection(addr: SocketAddr) -> Status {
    Status::transient(
        Source::TlsPolicy,
        7,
        0,
        format!("{addr}: {}", ClientError::ResponseInjection),
    )
}

/// A transaction the client machine refused to start: too large for the server's SIZE
/// (`552 5.3.4`), SMTPUTF8 needed but not offered (`550 5.6.7`), else a session fault.
fn refused_transaction(e: &ClientError) -> Outcome {
    match e {
        ClientError::TooLarge(_) => {
            Outcome::Failed(Status::permanent(Source::Remote, 3, 4, e.to_string()).with_code(552))
        }
        ClientError::NoSmtpUtf8 => {
            Outcome::Failed(Status::permanent(Source::Remote, 6, 7, e.to_string()))
        }
        other => Outcome::Deferred(Status::transient(
            Source::Connection,
            4,
            2,
            other.to_string(),
        )),
    }
}

/// The log line of a finished transaction: the peer, its TLS facts and the result.
fn log_attempt(
    conn: &ClientConn,
    queue_id: &str,
    host: &str,
    replies: &decide::Replies<'_>,
    outcomes: &[(usize, Outcome)],
) {
    let tls = conn.tls.as_ref();
    let result = replies
        .data
        .or(replies.mail)
        .map(Reply::one_line)
        .unwrap_or_else(|| "no recipient accepted".into());
    tracing::info!(
        queue_id = %queue_id,
        peer = %conn.addr,
        host,
        tls = %tls.map_or("none", |t| t.version.as_str()),
        cipher = %tls.map_or("none", |t| t.cipher.as_str()),
        level = %conn.level,
        cert = %tls.map_or("-", |t| t.check.name()),
        auth = %tls.map_or("none", |t| t.auth.name()),
        peer_cert = %tls.map_or("-", |t| t.fingerprint.as_str()),
        subject = ?tls.map_or("-", |t| t.subject.as_str()),
        resumed = tls.is_some_and(|t| t.resumed),
        conn_use = conn.uses,
        rcpts = outcomes.len(),
        accepted = outcomes.iter().filter(|(_, o)| matches!(o, Outcome::Delivered(_))).count(),
        result = %result,
        "delivery attempt"
    );
}

/// A policy deferral (`4.7.4 …`, `4.7.5 …`) as a status.
fn policy_status(d: &sealgate_proto::policy::Deferral) -> Status {
    let enhanced = decide::parse_enhanced(d.status).unwrap_or(decide::Enhanced(4, 7, 0));
    Status::new(Source::TlsPolicy, enhanced, d.reason.clone())
}

/// A session that failed on the way (closed, timed out, malformed replies): `4.4.2 ADDR: why`.
fn session_failure(addr: SocketAddr, why: impl std::fmt::Display) -> Status {
    Status::transient(Source::Connection, 4, 2, format!("{addr}: {why}"))
}

/// One outbound SMTP connection and its session machine.
#[derive(Debug)]
struct ClientConn {
    conn: Conn,
    /// The next hop it is connected to.
    addr: SocketAddr,
    session: ClientSession,
    buf: Vec<u8>,
    tls: Option<TlsInfo>,
    /// The effective TLS level it was opened under.
    level: Level,
    /// Its place among its next hop's connections (`None` until it is ready for mail).
    hop: Option<HopSlot>,
    /// Transactions run on it so far (Postfix's `conn_use`).
    uses: u32,
}

/// What [`Queue::connection_for`] found.
enum Next {
    /// A parked connection, still idle.
    Reuse(Box<ClientConn>),
    /// Room for a new connection.
    Open(HopSlot),
}

/// The TLS session of a connection, for logs.
#[derive(Debug)]
struct TlsInfo {
    version: String,
    cipher: String,
    /// SHA-256 of the peer's certificate, hex.
    fingerprint: String,
    /// Its subject, `CN=…, O=…`.
    subject: String,
    check: CertCheck,
    /// How the peer was authenticated (the log's `auth=`).
    auth: PeerAuth,
    resumed: bool,
}

/// A completed client handshake.
struct Handshaken {
    version: String,
    cipher: String,
    chain: Vec<CertificateDer<'static>>,
    resumed: bool,
}

impl ClientConn {
    fn tls_desc(&self) -> String {
        match &self.tls {
            Some(t) => format!("{} {}", t.version, t.cipher),
            None => "plaintext".into(),
        }
    }

    /// Ends the session politely: `QUIT`, its reply awaited briefly, then the close.
    async fn quit(mut self) {
        self.session.quit(Instant::now());
        let out = self.session.take_output();
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            if self.conn.write_all(&out).await.is_ok() && self.conn.flush().await.is_ok() {
                let _ = self.conn.read(&mut self.buf).await;
            }
            let _ = self.conn.shutdown().await;
        })
        .await;
    }

    /// `Some(self)` when nothing arrived while it was parked (checked without waiting); a
    /// connection with pending input or closed by the server is ended.
    async fn still_idle(mut self) -> Option<Self> {
        match tokio::time::timeout(Duration::ZERO, self.conn.read(&mut self.buf)).await {
            Err(_) => Some(self),
            Ok(Ok(0)) | Ok(Err(_)) => None,
            Ok(Ok(n)) => {
                tracing::debug!(peer = %self.addr, bytes = n, "parked connection got unexpected input; dropped");
                None
            }
        }
    }

    /// Writes what the machine has to send, bounded by [`WRITE_TIMEOUT`]: a next hop that
    /// stops reading cannot wedge the connection.
    async fn write_out(&mut self) -> std::io::Result<()> {
        let out = self.session.take_output();
        if out.is_empty() {
            return Ok(());
        }
        let write = async {
            self.conn.write_all(&out).await?;
            self.conn.flush().await
        };
        tokio::time::timeout(WRITE_TIMEOUT, write)
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "write timed out"))?
    }

    /// Drives I/O until the machine has an event.
    async fn next_event(&mut self) -> Result<ClientEvent, Status> {
        let addr = self.addr;
        loop {
            self.write_out()
                .await
                .map_err(|e| session_failure(addr, e))?;
            if let Some(ev) = self.session.poll_event() {
                return Ok(ev);
            }
            let read = match self.session.deadline() {
                Some(d) => {
                    match tokio::time::timeout_at(d.into(), self.conn.read(&mut self.buf)).await {
                        Ok(r) => r,
                        Err(_) => {
                            self.session.handle_timeout(Instant::now());
                            continue;
                        }
                    }
                }
                None => self.conn.read(&mut self.buf).await,
            };
            match read {
                Ok(0) => return Err(session_failure(addr, "connection closed by server")),
                Ok(n) => {
                    let data = self.buf.get(..n).unwrap_or(&[]).to_vec();
                    self.session.feed(&data, Instant::now());
                }
                Err(e) => return Err(session_failure(addr, e)),
            }
        }
    }

    /// The TLS handshake after the server's `220` to STARTTLS, bounded by `timeout`.
    async fn handshake(
        &mut self,
        config: Arc<rustls::ClientConfig>,
        host: &str,
        timeout: Duration,
    ) -> Result<Handshaken, StartTlsError> {
        let failed = |why: String| StartTlsError::Handshake(HandshakeFailure::Failed(why));
        let tcp = self
            .conn
            .take_plain()
            .ok_or_else(|| failed("STARTTLS on a connection that is not plaintext".into()))?;
        // Anything the server sent after its 220 and before our ClientHello, in whatever read
        // it arrived, is an attack (response injection): nothing may be pending now.
        let mut probe = [0u8; 1];
        match tcp.try_read(&mut probe) {
            Ok(0) => return Err(failed("connection closed after the 220 to STARTTLS".into())),
            Ok(_) => return Err(StartTlsError::Injection),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(failed(e.to_string())),
        }
        let name = rustls::pki_types::ServerName::try_from(host.to_string())
            .map_err(|e| failed(format!("bad server name {host}: {e}")))?;
        let s = tokio::time::timeout(timeout, TlsConnector::from(config).connect(name, tcp))
            .await
            .map_err(|_| StartTlsError::Handshake(HandshakeFailure::Timeout))?
            .map_err(|e| failed(e.to_string()))?;
        let (_, cc) = s.get_ref();
        let done = Handshaken {
            version: version_name(cc.protocol_version()),
            cipher: suite_name(cc.negotiated_cipher_suite()),
            chain: cc
                .peer_certificates()
                .map(|c| c.iter().map(|d| d.clone().into_owned()).collect())
                .unwrap_or_default(),
            resumed: cc.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
        };
        self.conn = Conn::ClientTls(Box::new(s));
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn admin_release_and_delete_are_durable() {
        use crate::spool::scan;
        let dir = std::env::temp_dir().join(format!(
            "sg-delivery-admin-{}-{}",
            std::process::id(),
            unix_now()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let config = Config::from_toml("[smtp]\nlisten = [\"127.0.0.1:25\"]\n", "t").unwrap();
        let live = Arc::new(Live::new(Snapshot::build(config, None).unwrap()));
        let (spool, _) = Spool::open(&dir.join("queue"), 0).unwrap();
        let spool = Arc::new(spool);
        let peers = Arc::new(PeerStore::open(&dir, 10, Default::default()));
        let queue = Queue::new(live, spool.clone(), Vec::new(), peers, dir.clone());
        let env = Envelope {
            mail_from: "a@b.test".into(),
            rcpt_to: vec!["x@y.test".into()],
            ..Default::default()
        };
        let mut ids = Vec::new();
        for _ in 0..3 {
            let sink = spool.begin(b"Subject: t\r\n\r\nbody\r\n".to_vec());
            let mut m = spool.commit(sink, &env).await.unwrap();
            m.attempts = 2;
            m.next_attempt = unix_now() + 3600;
            spool.save_state(&m).await.unwrap();
            ids.push(m.id.clone());
            queue.put_back(m.clone(), m.next_attempt).await;
        }
        let c = queue.counts();
        assert_eq!(
            (c.messages, c.recipients_pending, c.deferred, c.in_flight),
            (3, 3, 3, 0)
        );
        assert!(matches!(
            queue.release("nosuch").await,
            Err(AdminError::NotFound)
        ));
        assert!(matches!(
            queue.delete("nosuch").await,
            Err(AdminError::NotFound)
        ));

        let released = queue.release(&ids[0]).await.unwrap();
        assert!(released.next_attempt <= unix_now());
        assert!(
            queue
                .state
                .lock()
                .unwrap()
                .schedule
                .contains(&(0, ids[0].clone()))
        );
        queue.delete(&ids[1]).await.unwrap();
        assert_eq!(queue.messages().len(), 2);

        // An attempt in progress (off the schedule) is left alone.
        let entry = {
            let st = queue.state.lock().unwrap();
            st.schedule
                .iter()
                .find(|(_, i)| *i == ids[2])
                .cloned()
                .unwrap()
        };
        queue.state.lock().unwrap().schedule.remove(&entry);
        assert_eq!(queue.counts().in_flight, 1);
        assert!(matches!(
            queue.delete(&ids[2]).await,
            Err(AdminError::InFlight)
        ));
        assert!(matches!(
            queue.release(&ids[2]).await,
            Err(AdminError::InFlight)
        ));

        // What the spool says after a restart.
        let on_disk = scan(&dir.join("queue")).unwrap();
        let by_id = |id: &str| on_disk.iter().find(|m| m.id == id);
        assert!(by_id(&ids[0]).unwrap().next_attempt <= unix_now());
        assert!(by_id(&ids[1]).is_none(), "deleted for good");
        assert!(by_id(&ids[2]).unwrap().next_attempt > unix_now());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
