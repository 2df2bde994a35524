//! The peer table (F-PEERS) on disk and in the running daemon: `STATE/peers.json`, replaced
//! atomically (temp file, `fsync`, `rename`, directory `fsync`), written at most once a second
//! after a change and at shutdown; admin resets arrive as request files in
//! `STATE/peers-reset/`, so `sealctl peers reset` works whether the daemon runs or not.
//!
//! The file format is JSON with a format number (`{"format": 1, "peers": [...]}`), the same
//! shape `sealctl peers list --json` prints; it is the box's memory of which peers did TLS, so
//! a file that does not parse is moved aside (`peers.json.bad`, logged loudly) rather than
//! trusted or silently overwritten.
//!
//! Architecture invariant: only the holder of the state directory's lock writes `peers.json`
//! (the daemon, or `sealctl` while no daemon runs); everyone else asks by reset request.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sealgate_proto::policy::{
    self, Counts, Decision, PeerAuth, PeerKey, PeerMatch, PeerRecord, PeerTable, Plan, RouteFacts,
    Settings, TlsSuccess,
};
use serde::{Deserialize, Serialize};

use crate::time::unix_now;

/// The table's file in the state directory.
pub const FILE: &str = "peers.json";
/// Directory of pending admin reset requests.
pub const RESET_DIR: &str = "peers-reset";
/// The file format written here.
pub const FORMAT: u32 = 1;
/// Largest table file read (10 000 peers take about 4 MiB).
const MAX_FILE: u64 = 64 << 20;
/// Largest reset request, and most requests taken per round.
const MAX_REQUEST: u64 = 1024;
const MAX_REQUESTS: usize = 256;
/// How often the daemon applies resets, expires marks and writes a changed table.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// How often inbound statistics alone cause a write.
const CLIENTS_EVERY: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum PeersError {
    #[error("{path}: cannot read: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path}: not a peer table: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("{path}: cannot write: {source}")]
    Write { path: PathBuf, source: io::Error },
}

/// The file: format number and records in key order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerFile {
    pub format: u32,
    /// Outbound peers (the policy engine's memory).
    pub peers: Vec<PeerEntry>,
    /// Inbound clients, by address (what they did last; no policy state).
    #[serde(default)]
    pub clients: Vec<ClientEntry>,
}

/// One inbound client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientEntry {
    pub ip: IpAddr,
    /// Its last EHLO/HELO name.
    pub helo: Option<String>,
    /// Its last TLS session; `fingerprint` is its client certificate's SHA-256, if any.
    pub last_tls: Option<TlsEntry>,
    /// The subject of its client certificate when that verified against its VPN peer CA.
    pub vpn_peer: Option<String>,
    pub counts: ClientCounts,
    pub last_seen: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientCounts {
    /// Sessions that used TLS.
    pub tls: u64,
    /// Sessions that stayed plaintext.
    pub plaintext: u64,
    /// Messages accepted.
    pub messages: u64,
}

/// What an inbound session's TLS was, for [`PeerStore::client_seen`].
#[derive(Debug, Clone, Copy)]
pub struct ClientTlsSeen<'a> {
    pub version: &'a str,
    pub cipher: &'a str,
    /// SHA-256 of the client certificate.
    pub client_cert: Option<&'a str>,
    /// Subject of a client certificate verified against the peer's CA.
    pub verified_subject: Option<&'a str>,
}

/// One peer as stored and as `sealctl peers list --json` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerEntry {
    pub ip: IpAddr,
    pub name: String,
    pub starttls_offered: Option<bool>,
    pub last_tls: Option<TlsEntry>,
    pub tls_broken_until: Option<u64>,
    pub downgrade_flagged: Option<FlagEntry>,
    pub counts: CountsEntry,
    pub last_seen: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsEntry {
    pub at: u64,
    pub version: String,
    pub cipher: String,
    pub fingerprint: Option<String>,
    /// Outbound only: how the peer was authenticated (`none`, `ca`, `pin`, `dane`); absent in
    /// tables written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlagEntry {
    pub at: u64,
    pub reason: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CountsEntry {
    pub tls: u64,
    pub plaintext: u64,
    pub failures: u64,
    pub deferred: u64,
}

impl PeerEntry {
    pub fn of(key: &PeerKey, r: &PeerRecord) -> Self {
        PeerEntry {
            ip: key.ip,
            name: key.name.clone(),
            starttls_offered: r.starttls_offered,
            last_tls: r.last_tls.as_ref().map(|t| TlsEntry {
                at: t.at,
                version: t.version.clone(),
                cipher: t.cipher.clone(),
                fingerprint: t.fingerprint.clone(),
                auth: Some(t.auth.name().to_string()),
            }),
            tls_broken_until: r.tls_broken_until,
            downgrade_flagged: r.downgrade_flagged.as_ref().map(|(at, reason)| FlagEntry {
                at: *at,
                reason: reason.clone(),
            }),
            counts: CountsEntry {
                tls: r.counts.tls,
                plaintext: r.counts.plaintext,
                failures: r.counts.failures,
                deferred: r.counts.deferred,
            },
            last_seen: r.last_seen,
        }
    }

    pub fn into_record(self) -> (PeerKey, PeerRecord) {
        let record = PeerRecord {
            starttls_offered: self.starttls_offered,
            last_tls: self.last_tls.map(|t| TlsSuccess {
                at: t.at,
                version: t.version,
                cipher: t.cipher,
                fingerprint: t.fingerprint,
                auth: t
                    .auth
                    .as_deref()
                    .and_then(PeerAuth::from_name)
                    .unwrap_or_default(),
            }),
            tls_broken_until: self.tls_broken_until,
            downgrade_flagged: self.downgrade_flagged.map(|f| (f.at, f.reason)),
            counts: Counts {
                tls: self.counts.tls,
                plaintext: self.counts.plaintext,
                failures: self.counts.failures,
                deferred: self.counts.deferred,
            },
            last_seen: self.last_seen,
        };
        (PeerKey::new(self.ip, self.name), record)
    }
}

/// The tables as their file.
pub fn to_file(table: &PeerTable, clients: &Clients) -> PeerFile {
    PeerFile {
        format: FORMAT,
        peers: table.iter().map(|(k, r)| PeerEntry::of(k, r)).collect(),
        clients: clients.map.values().cloned().collect(),
    }
}

/// Inbound clients by address, at most `max` (the least recently seen is evicted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Clients {
    max: usize,
    map: BTreeMap<IpAddr, ClientEntry>,
}

impl Clients {
    pub fn new(max: usize) -> Self {
        Clients {
            max: max.max(1),
            map: BTreeMap::new(),
        }
    }

    pub fn get(&self, ip: &IpAddr) -> Option<&ClientEntry> {
        self.map.get(ip)
    }

    fn insert(&mut self, e: ClientEntry) {
        if !self.map.contains_key(&e.ip) {
            while self.map.len() >= self.max {
                let oldest = self.map.values().min_by_key(|c| c.last_seen).map(|c| c.ip);
                match oldest {
                    Some(ip) => self.map.remove(&ip),
                    None => break,
                };
            }
        }
        self.map.insert(e.ip, e);
    }

    /// Records one finished session of `ip`.
    pub fn seen(
        &mut self,
        ip: IpAddr,
        helo: Option<&str>,
        tls: Option<ClientTlsSeen<'_>>,
        messages: usize,
        now: u64,
    ) {
        let mut e = self.map.get(&ip).cloned().unwrap_or(ClientEntry {
            ip,
            helo: None,
            last_tls: None,
            vpn_peer: None,
            counts: ClientCounts::default(),
            last_seen: now,
        });
        if let Some(h) = helo {
            // Bounded: an EHLO argument is at most a command line anyway.
            e.helo = Some(h.chars().take(255).collect());
        }
        match tls {
            Some(t) => {
                e.counts.tls += 1;
                e.last_tls = Some(TlsEntry {
                    at: now,
                    version: t.version.to_string(),
                    cipher: t.cipher.to_string(),
                    fingerprint: t.client_cert.map(str::to_string),
                    auth: None,
                });
                e.vpn_peer = t.verified_subject.map(str::to_string);
            }
            None => e.counts.plaintext += 1,
        }
        e.counts.messages += messages as u64;
        e.last_seen = now;
        self.insert(e);
    }
}

/// Reads `STATE/peers.json` into a table of at most `max` peers (and as many clients); no file
/// is an empty table.
pub fn load(state_dir: &Path, max: usize) -> Result<PeerTable, PeersError> {
    load_all(state_dir, max).map(|(t, _)| t)
}

/// [`load`], with the inbound clients.
pub fn load_all(state_dir: &Path, max: usize) -> Result<(PeerTable, Clients), PeersError> {
    let path = state_dir.join(FILE);
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok((PeerTable::new(max), Clients::new(max)));
        }
        Err(source) => return Err(PeersError::Read { path, source }),
    };
    let mut text = Vec::new();
    file.take(MAX_FILE + 1)
        .read_to_end(&mut text)
        .map_err(|source| PeersError::Read {
            path: path.clone(),
            source,
        })?;
    if text.len() as u64 > MAX_FILE {
        return Err(PeersError::Parse {
            path,
            reason: format!("larger than {MAX_FILE} bytes"),
        });
    }
    parse(&text, max).map_err(|reason| PeersError::Parse { path, reason })
}

/// The tables from a file's bytes (at most `max` peers and as many clients), or why not.
pub fn parse(text: &[u8], max: usize) -> Result<(PeerTable, Clients), String> {
    let parsed: PeerFile = serde_json::from_slice(text).map_err(|e| e.to_string())?;
    if parsed.format != FORMAT {
        return Err(format!(
            "format {} (this firmware reads {FORMAT})",
            parsed.format
        ));
    }
    let mut table = PeerTable::new(max);
    let mut clients = Clients::new(max);
    for entry in parsed.peers {
        let (key, record) = entry.into_record();
        table.insert(key, record);
    }
    for c in parsed.clients {
        clients.insert(c);
    }
    Ok((table, clients))
}

/// Replaces `STATE/peers.json` atomically with the tables.
pub fn save(state_dir: &Path, table: &PeerTable, clients: &Clients) -> Result<(), PeersError> {
    let path = state_dir.join(FILE);
    let tmp = state_dir.join(format!("{FILE}.tmp"));
    let werr = |p: &Path| {
        let p = p.to_path_buf();
        move |source| PeersError::Write { path: p, source }
    };
    let text = serde_json::to_vec_pretty(&to_file(table, clients))
        .map_err(|e| io::Error::other(e.to_string()))
        .map_err(werr(&path))?;
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(werr(&tmp))?;
    f.write_all(&text).map_err(werr(&tmp))?;
    f.sync_all().map_err(werr(&tmp))?;
    drop(f);
    fs::rename(&tmp, &path).map_err(werr(&path))?;
    File::open(state_dir)
        .and_then(|d| d.sync_all())
        .map_err(werr(state_dir))
}

/// Asks for an admin reset of `peer` (an IP or a host name): a request file, created under a
/// temporary name and renamed, so a reader never sees half of one.
pub fn request_reset(state_dir: &Path, peer: &str) -> Result<PathBuf, PeersError> {
    let dir = state_dir.join(RESET_DIR);
    let werr = |p: &Path| {
        let p = p.to_path_buf();
        move |source| PeersError::Write { path: p, source }
    };
    fs::create_dir_all(&dir).map_err(werr(&dir))?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let name = format!("{nanos}-{}.req", std::process::id());
    let tmp = dir.join(format!(".{name}"));
    let path = dir.join(&name);
    let mut f = File::create(&tmp).map_err(werr(&tmp))?;
    f.write_all(peer.trim().as_bytes()).map_err(werr(&tmp))?;
    f.sync_all().map_err(werr(&tmp))?;
    fs::rename(&tmp, &path).map_err(werr(&path))?;
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(werr(&dir))?;
    Ok(path)
}

/// Pending reset requests, oldest first (at most [`MAX_REQUESTS`]); unreadable or oversized
/// ones are returned with an empty peer so that they are removed too.
pub fn pending_resets(state_dir: &Path) -> Vec<(PathBuf, String)> {
    let Ok(rd) = fs::read_dir(state_dir.join(RESET_DIR)) else {
        return Vec::new();
    };
    let mut names: Vec<PathBuf> = rd
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(".req") && !n.starts_with('.'))
        })
        .collect();
    names.sort();
    names.truncate(MAX_REQUESTS);
    names
        .into_iter()
        .map(|p| {
            let peer = File::open(&p)
                .and_then(|f| {
                    let mut s = String::new();
                    f.take(MAX_REQUEST).read_to_string(&mut s)?;
                    Ok(s)
                })
                .unwrap_or_default();
            (p, peer.trim().to_string())
        })
        .collect()
}

/// Applies reset requests to `table`; returns how many peer records were reset.
pub fn apply_resets(table: &mut PeerTable, requests: &[(PathBuf, String)]) -> usize {
    let mut n = 0;
    for (path, peer) in requests {
        if peer.is_empty() {
            tracing::warn!(request = %path.display(), "ignoring an empty or unreadable peer reset request");
            continue;
        }
        let matched = table.reset(&PeerMatch::parse(peer));
        tracing::info!(peer = %peer, matched, "peer reset by the admin");
        n += matched;
    }
    n
}

/// The peer table of the running daemon: the policy engine's decisions are applied here and
/// written out by [`PeerStore::run`].
#[derive(Debug)]
pub struct PeerStore {
    state_dir: PathBuf,
    settings: Mutex<Settings>,
    table: Mutex<PeerTable>,
    clients: Mutex<Clients>,
    /// Policy state changed: written within a second.
    dirty: AtomicBool,
    /// Only inbound statistics changed: written every [`CLIENTS_EVERY`] at most (a busy
    /// gateway sees new sessions every second; they are not worth a write each).
    clients_dirty: AtomicBool,
    clients_saved: Mutex<std::time::Instant>,
}

impl PeerStore {
    /// Loads the table; a file that does not parse is moved aside and the table starts empty.
    pub fn open(state_dir: &Path, max: usize, settings: Settings) -> PeerStore {
        let (table, clients) = match load_all(state_dir, max) {
            Ok(t) => t,
            Err(e) => {
                let bad = state_dir.join(format!("{FILE}.bad"));
                let moved = fs::rename(state_dir.join(FILE), &bad).is_ok();
                tracing::error!(
                    error = %e,
                    moved_to = %bad.display(),
                    moved,
                    "the peer table is unreadable: starting with an empty one (TLS history, \
                     broken marks and downgrade flags are lost)"
                );
                (PeerTable::new(max), Clients::new(max))
            }
        };
        tracing::info!(
            peers = table.len(),
            clients = clients.map.len(),
            "peer table loaded"
        );
        PeerStore {
            state_dir: state_dir.to_path_buf(),
            settings: Mutex::new(settings),
            table: Mutex::new(table),
            clients: Mutex::new(clients),
            dirty: AtomicBool::new(false),
            clients_dirty: AtomicBool::new(false),
            clients_saved: Mutex::new(std::time::Instant::now()),
        }
    }

    /// Records a finished inbound session.
    pub fn client_seen(
        &self,
        ip: IpAddr,
        helo: Option<&str>,
        tls: Option<ClientTlsSeen<'_>>,
        messages: usize,
        now: u64,
    ) {
        if let Ok(mut c) = self.clients.lock() {
            c.seen(ip, helo, tls, messages, now);
            self.clients_dirty.store(true, Ordering::Release);
        }
    }

    /// The policy settings in force.
    pub fn settings(&self) -> Settings {
        self.settings.lock().map(|s| *s).unwrap_or_default()
    }

    /// New policy settings (a new config was applied).
    pub fn set_settings(&self, settings: Settings) {
        if let Ok(mut s) = self.settings.lock() {
            *s = settings;
        }
    }

    /// Plans a connection to `key` from its record, recording the plan's effects.
    pub fn plan(&self, route: &RouteFacts, key: &PeerKey, now: u64) -> Decision<Plan> {
        let settings = self.settings();
        let Ok(mut table) = self.table.lock() else {
            // A poisoned table: plan as for a peer never seen, which never goes below what
            // the route asks for.
            return policy::plan(route, key, &PeerRecord::new(), now, &settings);
        };
        let decision = policy::plan(route, key, table.record(key), now, &settings);
        if !decision.effects.is_empty() {
            table.apply(key, now, &decision);
            self.dirty.store(true, Ordering::Release);
        }
        decision
    }

    /// Records a decision's effects for `key`.
    pub fn apply<A>(&self, key: &PeerKey, now: u64, decision: &Decision<A>) {
        if let Ok(mut table) = self.table.lock() {
            table.apply(key, now, decision);
            self.dirty.store(true, Ordering::Release);
        }
    }

    /// A copy of one record (tests, logs).
    pub fn record(&self, key: &PeerKey) -> Option<PeerRecord> {
        self.table.lock().ok().and_then(|t| t.get(key).cloned())
    }

    /// The whole table as its file shows it (management API).
    pub fn file(&self) -> PeerFile {
        let table = self
            .table
            .lock()
            .map(|t| t.clone())
            .unwrap_or_else(|p| p.into_inner().clone());
        let clients = self.clients.lock().map(|c| c.clone()).unwrap_or_default();
        to_file(&table, &clients)
    }

    /// Admin reset of every record matching `peer` (an IP or a host name), as
    /// `sealctl peers reset` asks; written out by the next [`PeerStore::flush`]. Returns how
    /// many records matched.
    pub fn reset(&self, peer: &str) -> usize {
        let Ok(mut table) = self.table.lock() else {
            return 0;
        };
        let n = table.reset(&PeerMatch::parse(peer));
        if n > 0 {
            self.dirty.store(true, Ordering::Release);
        }
        tracing::info!(peer = %peer, matched = n, "peer reset by the admin (management API)");
        n
    }

    /// Applies pending resets, expires marks, and writes the table if its policy state changed
    /// (or inbound statistics did, [`CLIENTS_EVERY`] after the last write).
    pub fn flush(&self) -> Result<(), PeersError> {
        self.flush_if(false)
    }

    /// [`PeerStore::flush`], writing whatever changed (shutdown).
    pub fn flush_all(&self) -> Result<(), PeersError> {
        self.flush_if(true)
    }

    fn flush_if(&self, all: bool) -> Result<(), PeersError> {
        let clients_due = self.clients_dirty.load(Ordering::Acquire)
            && (all
                || self
                    .clients_saved
                    .lock()
                    .map(|t| t.elapsed() >= CLIENTS_EVERY)
                    .unwrap_or(true));
        if clients_due {
            self.clients_dirty.store(false, Ordering::Release);
            self.dirty.store(true, Ordering::Release);
            if let Ok(mut t) = self.clients_saved.lock() {
                *t = std::time::Instant::now();
            }
        }
        let requests = pending_resets(&self.state_dir);
        let snapshot = {
            let Ok(mut table) = self.table.lock() else {
                return Ok(());
            };
            if !requests.is_empty() {
                apply_resets(&mut table, &requests);
                self.dirty.store(true, Ordering::Release);
            }
            if table.expire(unix_now(), &self.settings()) > 0 {
                self.dirty.store(true, Ordering::Release);
            }
            if !self.dirty.swap(false, Ordering::AcqRel) {
                return Ok(());
            }
            let clients = self.clients.lock().map(|c| c.clone()).unwrap_or_default();
            (table.clone(), clients)
        };
        if let Err(e) = save(&self.state_dir, &snapshot.0, &snapshot.1) {
            self.dirty.store(true, Ordering::Release);
            return Err(e);
        }
        // Requests go only after the table that applied them is on disk: a crash in between
        // applies them again, which is harmless.
        for (path, _) in requests {
            let _ = fs::remove_file(path);
        }
        Ok(())
    }
}

/// The table for people: one line per peer.
pub fn render(file: &PeerFile, now: u64) -> String {
    let when = |t: u64| {
        if t == 0 {
            "-".to_string()
        } else if t <= now {
            format!("{}s ago", now - t)
        } else {
            format!("in {}s", t - now)
        }
    };
    let mut out = format!(
        "{:<40} {:<8} {:<27} {:<14} {:<10} {:>5} {:>5} {:>5} {:>5}  {}\n",
        "PEER",
        "STARTTLS",
        "LAST TLS (AUTH)",
        "BROKEN UNTIL",
        "SEEN",
        "TLS",
        "PLAIN",
        "FAIL",
        "DEFER",
        "DOWNGRADE FLAG"
    );
    for p in &file.peers {
        let key = PeerKey::new(p.ip, p.name.clone());
        let offered = match p.starttls_offered {
            None => "-",
            Some(true) => "yes",
            Some(false) => "no",
        };
        let last_tls = p
            .last_tls
            .as_ref()
            .map(|t| {
                let auth = t.auth.as_deref().unwrap_or("none");
                format!("{} {auth} {}", t.version, when(t.at))
            })
            .unwrap_or_else(|| "-".into());
        let broken = p
            .tls_broken_until
            .filter(|u| *u > now)
            .map(when)
            .unwrap_or_else(|| "-".into());
        let flag = p
            .downgrade_flagged
            .as_ref()
            .map(|f| format!("{} ({})", when(f.at), f.reason))
            .unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "{:<40} {:<8} {:<27} {:<14} {:<10} {:>5} {:>5} {:>5} {:>5}  {}\n",
            key.to_string(),
            offered,
            last_tls,
            broken,
            when(p.last_seen),
            p.counts.tls,
            p.counts.plaintext,
            p.counts.failures,
            p.counts.deferred,
            flag
        ));
    }
    if !file.clients.is_empty() {
        out.push_str(&format!(
            "\n{:<40} {:<30} {:<22} {:>5} {:>5} {:>6} {:<10}  {}\n",
            "INBOUND CLIENT", "HELO", "LAST TLS", "TLS", "PLAIN", "MSGS", "SEEN", "VPN PEER"
        ));
        for c in &file.clients {
            let last_tls = c
                .last_tls
                .as_ref()
                .map(|t| format!("{} {}", t.version, when(t.at)))
                .unwrap_or_else(|| "-".into());
            out.push_str(&format!(
                "{:<40} {:<30} {:<22} {:>5} {:>5} {:>6} {:<10}  {}\n",
                c.ip.to_string(),
                c.helo.as_deref().unwrap_or("-"),
                last_tls,
                c.counts.tls,
                c.counts.plaintext,
                c.counts.messages,
                when(c.last_seen),
                c.vpn_peer.as_deref().unwrap_or("-"),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sealgate-peers-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn sample() -> PeerTable {
        let mut t = PeerTable::new(10);
        let k = PeerKey::new("127.0.0.2".parse().unwrap(), "mx.b.test");
        t.update(&k, 100, |r| {
            r.tls_succeeded(TlsSuccess {
                at: 90,
                version: "TLSv1.3".into(),
                cipher: "TLS13_AES_128_GCM_SHA256".into(),
                fingerprint: Some("ab".repeat(32)),
                auth: PeerAuth::Dane,
            });
            r.flag_downgrade(95, "did not offer STARTTLS".into());
        });
        let k2 = PeerKey::new("127.0.0.3".parse().unwrap(), "127.0.0.3");
        t.update(&k2, 120, |r| r.mark_broken(4_000_000_000));
        t
    }

    #[test]
    fn save_and_load_round_trip() {
        let d = tmpdir("rt");
        assert!(load(&d, 10).unwrap().is_empty());
        let t = sample();
        let mut c = Clients::new(10);
        let ip: IpAddr = "127.0.0.9".parse().unwrap();
        c.seen(ip, Some("mx.c.test"), None, 0, 100);
        let tls = ClientTlsSeen {
            version: "TLSv1.3",
            cipher: "TLS_AES_128_GCM_SHA256",
            client_cert: Some("cd"),
            verified_subject: Some("CN=gw-c.vpn.test"),
        };
        c.seen(ip, Some("mx.c.test"), Some(tls), 2, 110);
        let e = c.get(&ip).unwrap();
        assert_eq!(
            (e.counts.tls, e.counts.plaintext, e.counts.messages),
            (1, 1, 2)
        );
        assert_eq!(e.vpn_peer.as_deref(), Some("CN=gw-c.vpn.test"));
        save(&d, &t, &c).unwrap();
        let (back, back_c) = load_all(&d, 10).unwrap();
        assert_eq!(to_file(&back, &back_c), to_file(&t, &c));
        assert!(!d.join(format!("{FILE}.tmp")).exists());
        let text = render(&to_file(&back, &back_c), 130);
        assert!(text.contains("CN=gw-c.vpn.test"), "{text}");
        assert!(text.contains("mx.b.test [127.0.0.2]"), "{text}");
        assert!(text.contains("did not offer STARTTLS"), "{text}");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        let d = tmpdir("bad");
        let cases: [(&[u8], &str); 3] = [
            (b"{not json", "not a peer table"),
            (b"{\"format\": 9, \"peers\": []}", "format 9"),
            (
                b"{\"format\": 1, \"peers\": [{\"ip\": \"x\"}]}",
                "not a peer table",
            ),
        ];
        for (text, want) in cases {
            fs::write(d.join(FILE), text).unwrap();
            let e = load(&d, 10).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains(FILE), "{e}");
        }
        // the daemon moves such a file aside and starts empty
        let store = PeerStore::open(&d, 10, Settings::default());
        assert!(
            store
                .record(&PeerKey::new("127.0.0.2".parse().unwrap(), "x"))
                .is_none()
        );
        assert!(d.join(format!("{FILE}.bad")).exists());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn reset_requests_are_applied_saved_and_removed() {
        let d = tmpdir("reset");
        save(&d, &sample(), &Clients::new(10)).unwrap();
        let store = PeerStore::open(&d, 10, Settings::default());
        request_reset(&d, "127.0.0.2").unwrap();
        request_reset(&d, "nobody.test").unwrap();
        assert_eq!(pending_resets(&d).len(), 2);
        store.flush().unwrap();
        assert!(pending_resets(&d).is_empty());
        let t = load(&d, 10).unwrap();
        let k = PeerKey::new("127.0.0.2".parse().unwrap(), "mx.b.test");
        let r = t.get(&k).unwrap();
        assert_eq!(r.downgrade_flagged, None);
        assert_eq!(r.last_tls, None);
        // the other peer is untouched
        let k2 = PeerKey::new("127.0.0.3".parse().unwrap(), "127.0.0.3");
        assert_eq!(t.get(&k2).unwrap().tls_broken_until, Some(4_000_000_000));
        fs::remove_dir_all(&d).unwrap();
    }
}
