//! The outbound TLS policy engine (PRODUCT.md F-TLS-OUT) and the peer table (F-PEERS), without
//! I/O: route facts, the peer's record and what a session observed go in; decisions with
//! human-readable reasons and the record updates that go with them come out.
//!
//! The runtime drives one delivery attempt like this (rustls' `Expect*` style: each step is a
//! method of the [`Attempt`] that [`plan`] returned):
//!
//! 1. [`plan`] before connecting: [`Plan::Defer`], or [`Plan::Connect`] with an [`Attempt`]
//!    whose [`Attempt::starttls`] is the mode for [`crate::client::ClientParams`].
//! 2. [`Attempt::after_ehlo`] once the EHLO reply is known — on `ClientEvent::StartTls`,
//!    on the first `ClientEvent::Ready`, or on `Failed(ClientError::TlsNotOffered)` — with
//!    whether STARTTLS was offered: [`AfterEhlo::UseTls`], [`AfterEhlo::Plaintext`] or
//!    [`AfterEhlo::Defer`].
//! 3. If the handshake fails or times out: [`Attempt::after_handshake_failure`] →
//!    [`AfterFailure::ReconnectPlaintext`] (carrying the plaintext [`Attempt`] for the one
//!    reconnect within the same delivery attempt) or [`AfterFailure::Defer`].
//! 4. If it completes: [`Attempt::after_handshake`] with the certificate facts →
//!    [`AfterHandshake::Proceed`] or [`AfterHandshake::Defer`].
//!
//! Every step returns a [`Decision`]: the action plus the [`Effect`]s to record for the peer.
//! The engine never changes a record itself; the caller applies the effects
//! ([`Decision::apply`], [`PeerTable::apply`]) and persists the table (the record types have
//! plain pub fields for that).
//!
//! Decisions beyond PRODUCT.md:
//! - The effective level is the route's level, raised to `encrypt` if the peer's IP is on the
//!   forced outbound list; reasons say which of the two applies.
//! - Downgrade protection and the TLS-broken memory apply to the effective level `may` only;
//!   `none` never uses TLS and the required levels never go plaintext anyway.
//! - A `may` peer under downgrade protection (TLS completed within `downgrade_window`,
//!   `downgrade = refuse`) is planned with `StartTlsMode::Required`, so a missing STARTTLS fails
//!   closed in the client machine even before `after_ehlo` is consulted. Protection wins over a
//!   TLS-broken mark (possible after switching from `allow` to `refuse`).
//! - A downgrade flag lasts until `downgrade_window` after the peer's last TLS success (after
//!   the flag's own time if no success is recorded), until the admin resets the peer, or until a
//!   TLS session with it completes; with `downgrade = allow` flags are ignored.
//! - A completed TLS session clears both the TLS-broken mark and the downgrade flag.
//! - An admin reset forgets the peer's TLS history (offered, last TLS, broken mark, flag) but
//!   keeps its counts; forgetting only the flag would defer the next delivery again.
//! - Deferrals carry an enhanced status: `4.7.4` (STARTTLS missing or downgrade flag) or
//!   `4.7.5` (handshake or certificate failure); the runtime turns them into `5.7.x` at expiry.
//! - Fingerprints are compared as hex, ignoring case, `:` and whitespace.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use crate::client::StartTlsMode;
pub use crate::dane::{DaneMatch, DaneState, Tlsa};
use crate::received::rfc5322_date;

/// Default `broken_tls_ttl`: 3 days.
pub const DEFAULT_BROKEN_TLS_TTL: u64 = 3 * 86_400;
/// Default `downgrade_window`: 30 days.
pub const DEFAULT_DOWNGRADE_WINDOW: u64 = 30 * 86_400;
/// Default bound of the [`PeerTable`].
pub const DEFAULT_MAX_PEERS: usize = 10_000;

/// Enhanced status of a deferral for a missing STARTTLS ("security features not supported").
pub const STATUS_NO_STARTTLS: &str = "4.7.4";
/// Enhanced status of a deferral for a failed handshake or a rejected certificate.
pub const STATUS_TLS_FAILED: &str = "4.7.5";

/// Outbound TLS level of a route (Postfix's names), weakest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Never STARTTLS.
    None,
    /// STARTTLS when offered, no certificate check; plaintext otherwise (with fallback memory
    /// and downgrade protection).
    May,
    /// STARTTLS required, no certificate check.
    Encrypt,
    /// STARTTLS required, the certificate must chain to a trusted CA and match the name.
    Verify,
    /// STARTTLS required, the certificate's or SPKI's SHA-256 must be pinned.
    Fingerprint,
    /// DANE (RFC 7672): with secure TLSA records, STARTTLS required and the chain must match
    /// one; with none (an unsigned zone, or a validated "no such records"), as `may`; a lookup
    /// that fails or does not validate defers. As an effective level (an [`Attempt`]'s): the
    /// match is required.
    Dane,
    /// DANE or nothing: without usable secure TLSA records, defer. Never an effective level.
    DaneOnly,
}

impl Level {
    /// The config name: `none`, `may`, `encrypt`, `verify`, `fingerprint`.
    pub fn name(self) -> &'static str {
        match self {
            Level::None => "none",
            Level::May => "may",
            Level::Encrypt => "encrypt",
            Level::Verify => "verify",
            Level::Fingerprint => "fingerprint",
            Level::Dane => "dane",
            Level::DaneOnly => "dane-only",
        }
    }

    /// Whether this level never delivers in plaintext.
    pub fn requires_tls(self) -> bool {
        self >= Level::Encrypt
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What to do with a `may` peer that did TLS before and now does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Downgrade {
    /// Defer and flag the peer (default).
    Refuse,
    /// Go plaintext as for any `may` peer.
    Allow,
}

/// Policy settings from the `[tls]` config section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Seconds a peer stays remembered as TLS-broken after a failed handshake.
    pub broken_tls_ttl: u64,
    /// Seconds after its last TLS success during which a peer is protected from downgrades.
    pub downgrade_window: u64,
    pub downgrade: Downgrade,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            broken_tls_ttl: DEFAULT_BROKEN_TLS_TTL,
            downgrade_window: DEFAULT_DOWNGRADE_WINDOW,
            downgrade: Downgrade::Refuse,
        }
    }
}

/// An outbound peer: the address connected to and the host name it was found under.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerKey {
    pub ip: IpAddr,
    pub name: String,
}

impl PeerKey {
    pub fn new(ip: IpAddr, name: impl Into<String>) -> Self {
        PeerKey {
            ip,
            name: name.into(),
        }
    }
}

/// `name [ip]`, or just the IP when the name is empty or the IP itself.
impl fmt::Display for PeerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ip = self.ip.to_string();
        let name = self.name.trim_matches(['[', ']']);
        if name.is_empty() || name == ip {
            f.write_str(&ip)
        } else {
            write!(f, "{} [{ip}]", self.name)
        }
    }
}

/// What the route and the config say about one delivery target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteFacts {
    /// The route's `tls` level.
    pub level: Level,
    /// The peer's IP is on the forced outbound list (`tls.force`).
    pub forced: bool,
    /// Pinned SHA-256 fingerprints (hex) of certificates or SPKIs, for `fingerprint`.
    pub pins: Vec<String>,
    /// What the TLSA lookup found, for `dane` and `dane-only`.
    pub dane: DaneState,
    /// The recipient domain's MTA-STS policy as it applies to this MX host.
    pub sts: StsState,
}

/// The MTA-STS policy (RFC 8461) of the recipient domain, as it applies to one MX host.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum StsState {
    /// No policy (none published, `mode: none`, not an MX route, or `tls.mta_sts = false`).
    #[default]
    None,
    /// `mode: enforce` of `domain`; whether the host matches one of its `mx` patterns.
    Enforce { domain: String, mx_matches: bool },
    /// `mode: testing`: delivery as without a policy; failures are only reported.
    Testing { domain: String, mx_matches: bool },
}

impl RouteFacts {
    pub fn new(level: Level, forced: bool) -> Self {
        RouteFacts {
            level,
            forced,
            pins: Vec::new(),
            dane: DaneState::NotLookedUp,
            sts: StsState::None,
        }
    }
}

/// Why the effective level applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The route's level.
    Route,
    /// The forced list raised the route's weaker level (the payload) to `encrypt`.
    ForcedList(Level),
    /// The route's level, which is at least `encrypt`; the peer is also on the forced list.
    RouteAndForcedList,
    /// `dane`/`dane-only` by the route, with this many usable secure TLSA records.
    DaneSecure(usize),
    /// `dane` by the route; the TLSA records are secure but none is usable (RFC 7672 §2.2:
    /// TLS is still required, without authentication).
    DaneUnusable,
    /// `dane` by the route; there are no secure TLSA records (why: in the plan's reason).
    DaneInsecure,
    /// `verify` (system roots, the MX name) by the recipient domain's MTA-STS policy in
    /// enforce mode; the route said the payload.
    MtaSts(Level),
}

/// One successful TLS session with a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSuccess {
    /// Unix seconds.
    pub at: u64,
    /// E.g. `TLSv1.3`.
    pub version: String,
    pub cipher: String,
    /// SHA-256 of the peer's certificate (hex).
    pub fingerprint: Option<String>,
    /// How the peer's certificate was authenticated in that session.
    pub auth: PeerAuth,
}

/// How an outbound peer was authenticated (the delivery log's `auth=`, the peer table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PeerAuth {
    /// Not at all (`may`, `encrypt`; or not recorded, in an older peer table).
    #[default]
    None,
    /// Chain to a trusted CA and host name (`verify`).
    Ca,
    /// A pinned fingerprint (`fingerprint`).
    Pin,
    /// A secure TLSA record (`dane`).
    Dane,
    /// The system roots and the MX name, demanded by an MTA-STS policy in enforce mode.
    MtaSts,
}

impl PeerAuth {
    /// What a completed session at the effective `level` authenticated.
    pub fn of(level: Level) -> PeerAuth {
        match level {
            Level::Verify => PeerAuth::Ca,
            Level::Fingerprint => PeerAuth::Pin,
            Level::Dane | Level::DaneOnly => PeerAuth::Dane,
            Level::None | Level::May | Level::Encrypt => PeerAuth::None,
        }
    }

    /// `none`, `ca`, `pin`, `dane`.
    pub fn name(self) -> &'static str {
        match self {
            PeerAuth::None => "none",
            PeerAuth::Ca => "ca",
            PeerAuth::Pin => "pin",
            PeerAuth::Dane => "dane",
            PeerAuth::MtaSts => "mta-sts",
        }
    }

    /// The inverse of [`PeerAuth::name`].
    pub fn from_name(s: &str) -> Option<PeerAuth> {
        [
            PeerAuth::None,
            PeerAuth::Ca,
            PeerAuth::Pin,
            PeerAuth::Dane,
            PeerAuth::MtaSts,
        ]
        .into_iter()
        .find(|a| a.name() == s)
    }
}

/// Per-peer counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Sessions that completed a TLS handshake (and passed the certificate check).
    pub tls: u64,
    /// Sessions that went on in plaintext.
    pub plaintext: u64,
    /// Failed or timed-out handshakes and rejected certificates.
    pub failures: u64,
    /// Deferrals by the policy.
    pub deferred: u64,
}

/// What Sealgate remembers about one peer (F-PEERS).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerRecord {
    /// Whether its last EHLO reply offered STARTTLS; `None` before the first EHLO.
    pub starttls_offered: Option<bool>,
    pub last_tls: Option<TlsSuccess>,
    /// Remembered as TLS-broken until this Unix time (exclusive).
    pub tls_broken_until: Option<u64>,
    /// Flagged for a possible downgrade: when, and why.
    pub downgrade_flagged: Option<(u64, String)>,
    pub counts: Counts,
    /// Unix seconds of the last update (for the table's eviction).
    pub last_seen: u64,
}

/// The record of a peer never seen.
static UNKNOWN: PeerRecord = PeerRecord::new();

impl PeerRecord {
    pub const fn new() -> Self {
        PeerRecord {
            starttls_offered: None,
            last_tls: None,
            tls_broken_until: None,
            downgrade_flagged: None,
            counts: Counts {
                tls: 0,
                plaintext: 0,
                failures: 0,
                deferred: 0,
            },
            last_seen: 0,
        }
    }

    /// The EHLO reply did (not) offer STARTTLS.
    pub fn offered(&mut self, offered: bool) {
        self.starttls_offered = Some(offered);
    }

    /// A TLS session completed: remember it, and forget broken marks and downgrade flags.
    pub fn tls_succeeded(&mut self, success: TlsSuccess) {
        self.starttls_offered = Some(true);
        self.last_tls = Some(success);
        self.tls_broken_until = None;
        self.downgrade_flagged = None;
        self.counts.tls = self.counts.tls.saturating_add(1);
    }

    /// A session went on in plaintext.
    pub fn plaintext(&mut self) {
        self.counts.plaintext = self.counts.plaintext.saturating_add(1);
    }

    /// A handshake failed or timed out, or the certificate was rejected.
    pub fn failed(&mut self) {
        self.counts.failures = self.counts.failures.saturating_add(1);
    }

    /// The policy deferred a delivery.
    pub fn deferred(&mut self) {
        self.counts.deferred = self.counts.deferred.saturating_add(1);
    }

    /// Remember the peer as TLS-broken until `until` (Unix seconds).
    pub fn mark_broken(&mut self, until: u64) {
        self.tls_broken_until = Some(until);
    }

    /// Flag a possible downgrade attack (kept from the first flag if already flagged).
    pub fn flag_downgrade(&mut self, at: u64, reason: String) {
        if self.downgrade_flagged.is_none() {
            self.downgrade_flagged = Some((at, reason));
        }
    }

    /// Admin reset: forget the TLS history (offered, last TLS, broken mark, downgrade flag);
    /// counts and `last_seen` stay.
    pub fn reset(&mut self) {
        self.starttls_offered = None;
        self.last_tls = None;
        self.tls_broken_until = None;
        self.downgrade_flagged = None;
    }

    /// Apply one effect of a [`Decision`].
    pub fn apply(&mut self, effect: &Effect) {
        match effect {
            Effect::Offered(o) => self.offered(*o),
            Effect::TlsSucceeded(s) => self.tls_succeeded(s.clone()),
            Effect::Plaintext => self.plaintext(),
            Effect::Failed => self.failed(),
            Effect::Deferred => self.deferred(),
            Effect::MarkBroken { until } => self.mark_broken(*until),
            Effect::FlagDowngrade { at, reason } => self.flag_downgrade(*at, reason.clone()),
        }
    }

    /// The broken mark, if it still holds at `now`.
    pub fn broken_until(&self, now: u64) -> Option<u64> {
        self.tls_broken_until.filter(|&until| until > now)
    }

    /// The time of the last TLS success, if it lies within `window` seconds before `now`.
    pub fn tls_within(&self, now: u64, window: u64) -> Option<u64> {
        let at = self.last_tls.as_ref()?.at;
        (at.saturating_add(window) > now).then_some(at)
    }

    /// When the downgrade flag (if any) ends: `window` after the last TLS success, or after
    /// the flag itself if no success is recorded.
    pub fn downgrade_flag_ends(&self, window: u64) -> Option<u64> {
        let (flagged_at, _) = self.downgrade_flagged.as_ref()?;
        let since = self.last_tls.as_ref().map_or(*flagged_at, |t| t.at);
        Some(since.saturating_add(window))
    }

    /// The downgrade flag, if it still holds at `now`.
    pub fn downgrade_flag(&self, now: u64, window: u64) -> Option<&(u64, String)> {
        let ends = self.downgrade_flag_ends(window)?;
        self.downgrade_flagged.as_ref().filter(|_| ends > now)
    }
}

/// A record update the caller applies after a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// [`PeerRecord::offered`].
    Offered(bool),
    /// [`PeerRecord::tls_succeeded`].
    TlsSucceeded(TlsSuccess),
    /// [`PeerRecord::plaintext`].
    Plaintext,
    /// [`PeerRecord::failed`].
    Failed,
    /// [`PeerRecord::deferred`].
    Deferred,
    /// [`PeerRecord::mark_broken`].
    MarkBroken { until: u64 },
    /// [`PeerRecord::flag_downgrade`].
    FlagDowngrade { at: u64, reason: String },
}

/// A decision and what to record for the peer because of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision<A> {
    pub action: A,
    pub effects: Vec<Effect>,
}

impl<A> Decision<A> {
    fn new(action: A, effects: Vec<Effect>) -> Self {
        Decision { action, effects }
    }

    /// Apply the effects to the peer's record.
    pub fn apply(&self, record: &mut PeerRecord) {
        for e in &self.effects {
            record.apply(e);
        }
    }
}

/// A delivery deferred by the policy: the message stays queued with this reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deferral {
    /// Enhanced status: [`STATUS_NO_STARTTLS`] or [`STATUS_TLS_FAILED`].
    pub status: &'static str,
    /// For logs, the queue entry and the DSN.
    pub reason: String,
}

/// `4.7.4 reason`.
impl fmt::Display for Deferral {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.status, self.reason)
    }
}

/// Before connecting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    Connect(Attempt),
    Defer(Deferral),
}

/// After the EHLO reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterEhlo {
    /// STARTTLS and run the handshake (the client machine does so in modes other than `Never`).
    UseTls,
    /// Go on without TLS, for this reason.
    Plaintext(String),
    /// Quit; the message stays queued.
    Defer(Deferral),
}

/// How a handshake went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// The TLS library's error.
    Failed(String),
    /// Not finished within `handshake_timeout`.
    Timeout,
}

/// After a failed handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterFailure {
    /// Reconnect once, in plaintext, within this delivery attempt, driven by `attempt`
    /// (`StartTlsMode::Never`).
    ReconnectPlaintext {
        reason: String,
        attempt: Attempt,
    },
    Defer(Deferral),
}

/// What the runtime learnt about the peer's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFacts {
    /// The chain leads to the route's pinned CA (or the system roots).
    pub chain_verified: bool,
    /// The certificate is valid for the peer's host name.
    pub name_matches: bool,
    /// SHA-256 of the end-entity certificate (DER), hex.
    pub fingerprint_sha256: String,
    /// SHA-256 of its SubjectPublicKeyInfo (DER), hex.
    pub spki_sha256: String,
    /// The chain against the attempt's TLSA records (checked for the effective level `dane`).
    pub dane: DaneMatch,
}

/// A completed handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handshake {
    pub version: String,
    pub cipher: String,
    pub cert: CertFacts,
}

/// After a completed handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterHandshake {
    /// Send mail over this TLS session.
    Proceed,
    Defer(Deferral),
}

/// One connection of a delivery attempt, as planned by [`plan`]; consulted at each step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    key: PeerKey,
    level: Level,
    source: Source,
    starttls: StartTlsMode,
    pins: Vec<String>,
    /// The usable secure TLSA records, for the effective level `dane`.
    tlsa: Vec<Tlsa>,
    settings: Settings,
    /// Last TLS success that puts this `may` peer under downgrade protection.
    protected_since: Option<u64>,
    reason: String,
}

/// Decide how to connect to `key` for `route`, given what is remembered about it.
pub fn plan(
    route: &RouteFacts,
    key: &PeerKey,
    record: &PeerRecord,
    now: u64,
    settings: &Settings,
) -> Decision<Plan> {
    let (level, source, note) = match effective_level(route) {
        Ok(x) => x,
        Err(why) => {
            let deferral = Deferral {
                status: STATUS_TLS_FAILED,
                reason: format!("no delivery to {key} now: {why}"),
            };
            return Decision::new(Plan::Defer(deferral), vec![Effect::Deferred]);
        }
    };
    let mut attempt = Attempt {
        key: key.clone(),
        level,
        source,
        starttls: StartTlsMode::Required,
        pins: route.pins.clone(),
        tlsa: match level {
            Level::Dane => route.dane.usable(),
            _ => Vec::new(),
        },
        settings: *settings,
        protected_since: None,
        reason: String::new(),
    };
    let peer = key;
    let policy = attempt.policy();
    let (starttls, reason) = match level {
        Level::None => (
            StartTlsMode::Never,
            format!("plaintext to {peer}: STARTTLS is never used ({policy})"),
        ),
        Level::May => match plan_may(&mut attempt, record, now, &policy) {
            Ok(mode) => mode,
            Err(deferral) => {
                return Decision::new(Plan::Defer(deferral), vec![Effect::Deferred]);
            }
        },
        Level::Encrypt | Level::Verify | Level::Fingerprint | Level::Dane | Level::DaneOnly => (
            StartTlsMode::Required,
            format!("TLS required by policy for {peer} ({policy})"),
        ),
    };
    attempt.starttls = starttls;
    attempt.reason = match note {
        Some(note) => format!("{reason}; {note}"),
        None => reason,
    };
    Decision::new(Plan::Connect(attempt), Vec::new())
}

/// The precedence of the outbound TLS rules, in one place: the level to use, where it comes
/// from and a note for the plan's reason — or why no connection may be made now.
///
/// 1. DANE (`dane`, `dane-only`): secure usable TLSA records make it `dane` (TLS required,
///    the chain must match); secure records none of which is usable make `dane` `encrypt`
///    and `dane-only` defer; no secure records make `dane` `may` and `dane-only` defer; a
///    lookup that failed or did not validate defers both (RFC 7672 §2.2).
/// 2. Without secure TLSA, an MTA-STS policy in enforce mode (RFC 8461 §5): an MX host that
///    matches none of its patterns defers; one that does gets `verify` (the system roots and
///    the MX name) unless the level is already `verify` or `fingerprint` (the admin's own
///    authentication stays). Testing mode changes nothing (it is noted in the reason).
/// 3. Otherwise the route's level.
/// 4. The forced list (`tls.force`) raises the result to at least `encrypt`.
///
/// Downgrade protection and the TLS-broken memory then apply to an effective `may` only.
pub fn effective_level(route: &RouteFacts) -> Result<(Level, Source, Option<String>), String> {
    let (level, source, note) = match route.level {
        Level::Dane | Level::DaneOnly => dane_level(route.level, &route.dane)?,
        other => (other, Source::Route, None),
    };
    let (level, source, note) = if level == Level::Dane {
        (level, source, note)
    } else {
        sts_level(route, level, source, note)?
    };
    Ok(match (route.forced, source) {
        (true, _) if level < Level::Encrypt => {
            (Level::Encrypt, Source::ForcedList(route.level), note)
        }
        (true, Source::Route) => (level, Source::RouteAndForcedList, note),
        _ => (level, source, note),
    })
}

/// Step 2 of [`effective_level`].
fn sts_level(
    route: &RouteFacts,
    level: Level,
    source: Source,
    note: Option<String>,
) -> Result<(Level, Source, Option<String>), String> {
    let join = |n: Option<String>, m: String| Some(n.map_or(m.clone(), |n| format!("{n}; {m}")));
    match &route.sts {
        StsState::None => Ok((level, source, note)),
        StsState::Enforce {
            domain,
            mx_matches: false,
        } => Err(format!(
            "the host is not among the MX patterns of the MTA-STS policy of {domain} (mode \
             enforce)"
        )),
        StsState::Enforce { .. } if level >= Level::Verify => Ok((level, source, note)),
        StsState::Enforce { domain, .. } => Ok((
            Level::Verify,
            Source::MtaSts(route.level),
            join(note, format!("MTA-STS policy of {domain}: enforce")),
        )),
        StsState::Testing { domain, mx_matches } => {
            let m = format!(
                "MTA-STS policy of {domain}: testing{}",
                if *mx_matches {
                    ""
                } else {
                    " (the host matches none of its MX patterns)"
                }
            );
            Ok((level, source, join(note, m)))
        }
    }
}

/// Step 1 of [`effective_level`].
fn dane_level(route: Level, state: &DaneState) -> Result<(Level, Source, Option<String>), String> {
    let only = route == Level::DaneOnly;
    match state {
        DaneState::Secure(all) => match all.iter().filter(|r| r.usable()).count() {
            0 if only => Err(format!(
                "level dane-only, and none of the {} secure TLSA records is usable",
                all.len()
            )),
            0 => Ok((
                Level::Encrypt,
                Source::DaneUnusable,
                Some(format!(
                    "none of the {} secure TLSA records is usable",
                    all.len()
                )),
            )),
            n => Ok((Level::Dane, Source::DaneSecure(n), None)),
        },
        DaneState::Insecure(why) if only => Err(format!("level dane-only, but {why}")),
        DaneState::Insecure(why) => Ok((Level::May, Source::DaneInsecure, Some(why.clone()))),
        DaneState::Failed(why) => Err(format!("the TLSA lookup failed ({why})")),
        DaneState::NotLookedUp => Err("the TLSA records were not looked up".into()),
    }
}

/// The STARTTLS mode and reason for a `may` peer (`attempt.key`; `policy` describes the level),
/// setting `attempt.protected_since` under downgrade protection; `Err` when the peer is flagged
/// for a possible downgrade and the setting is to refuse.
fn plan_may(
    attempt: &mut Attempt,
    record: &PeerRecord,
    now: u64,
    policy: &str,
) -> Result<(StartTlsMode, String), Deferral> {
    let refuse = attempt.settings.downgrade == Downgrade::Refuse;
    let window = attempt.settings.downgrade_window;
    let peer = &attempt.key;
    if let Some((at, why)) = record.downgrade_flag(now, window).filter(|_| refuse) {
        let until = record.downgrade_flag_ends(window).unwrap_or(now);
        let reason = format!(
            "{peer} is flagged for a possible TLS downgrade since {} ({why}); {policy} \
             with downgrade = refuse: deferred until {} or until an admin resets the \
             peer",
            date(*at),
            date(until),
        );
        return Err(Deferral {
            status: STATUS_NO_STARTTLS,
            reason,
        });
    }
    let protected_since = record.tls_within(now, window).filter(|_| refuse);
    let mode = match (protected_since, record.tls_broken_until) {
        (Some(at), _) => (
            StartTlsMode::Required,
            format!(
                "TLS required for {peer} ({policy}): it completed TLS on {}, so \
                 downgrade protection holds until {}",
                date(at),
                date(at.saturating_add(window)),
            ),
        ),
        (None, Some(until)) if until > now => (
            StartTlsMode::Never,
            format!(
                "plaintext to {peer} without STARTTLS: remembered as TLS-broken until \
                 {} ({policy})",
                date(until),
            ),
        ),
        (None, Some(until)) => (
            StartTlsMode::IfOffered,
            format!(
                "probing TLS with {peer} again: its TLS-broken mark expired on {} \
                 ({policy})",
                date(until),
            ),
        ),
        (None, None) => (
            StartTlsMode::IfOffered,
            format!("STARTTLS with {peer} when offered ({policy})"),
        ),
    };
    attempt.protected_since = protected_since;
    Ok(mode)
}

impl Attempt {
    /// The mode for the client session machine.
    pub fn starttls(&self) -> StartTlsMode {
        self.starttls
    }

    /// The effective level.
    pub fn level(&self) -> Level {
        self.level
    }

    /// Why the effective level applies.
    pub fn source(&self) -> Source {
        self.source
    }

    pub fn peer(&self) -> &PeerKey {
        &self.key
    }

    /// The planning decision, for the session log.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// How a session that passes [`Attempt::after_handshake`] authenticates the peer.
    pub fn auth(&self) -> PeerAuth {
        match self.source {
            Source::MtaSts(_) => PeerAuth::MtaSts,
            _ => PeerAuth::of(self.level),
        }
    }

    /// The usable secure TLSA records the chain must match (effective level `dane`).
    pub fn tlsa(&self) -> &[Tlsa] {
        &self.tlsa
    }

    /// The EHLO reply did (not) offer STARTTLS.
    pub fn after_ehlo(&self, starttls_offered: bool, now: u64) -> Decision<AfterEhlo> {
        let peer = &self.key;
        let policy = self.policy();
        let mut effects = vec![Effect::Offered(starttls_offered)];
        let action = if self.starttls == StartTlsMode::Never {
            effects.push(Effect::Plaintext);
            AfterEhlo::Plaintext(self.reason.clone())
        } else if starttls_offered {
            AfterEhlo::UseTls
        } else if self.level.requires_tls() {
            effects.push(Effect::Deferred);
            AfterEhlo::Defer(Deferral {
                status: STATUS_NO_STARTTLS,
                reason: format!(
                    "TLS required by policy for {peer} ({policy}), but the server did not \
                     offer STARTTLS"
                ),
            })
        } else if let Some(at) = self.protected_since {
            let reason = format!(
                "{peer} completed TLS on {} but now did not offer STARTTLS (possible STARTTLS \
                 stripping); {policy} with downgrade = refuse: deferred and flagged until {} \
                 or until an admin resets the peer",
                date(at),
                date(at.saturating_add(self.settings.downgrade_window)),
            );
            self.flag(
                &mut effects,
                now,
                "did not offer STARTTLS (possible STARTTLS stripping)",
            );
            AfterEhlo::Defer(Deferral {
                status: STATUS_NO_STARTTLS,
                reason,
            })
        } else {
            effects.push(Effect::Plaintext);
            AfterEhlo::Plaintext(format!(
                "plaintext to {peer}: the server did not offer STARTTLS ({policy})"
            ))
        };
        Decision::new(action, effects)
    }

    /// The handshake failed or did not finish in time.
    pub fn after_handshake_failure(
        &self,
        kind: &HandshakeFailure,
        now: u64,
    ) -> Decision<AfterFailure> {
        let peer = &self.key;
        let policy = self.policy();
        let what = match kind {
            HandshakeFailure::Failed(e) => format!("the TLS handshake failed ({})", clean(e)),
            HandshakeFailure::Timeout => {
                "the TLS handshake did not finish within the handshake timeout".to_string()
            }
        };
        let mut effects = vec![Effect::Failed];
        let action = if self.level.requires_tls() {
            effects.push(Effect::Deferred);
            AfterFailure::Defer(Deferral {
                status: STATUS_TLS_FAILED,
                reason: format!("TLS required by policy for {peer} ({policy}), but {what}"),
            })
        } else if let Some(at) = self.protected_since {
            let reason = format!(
                "{peer} completed TLS on {} but now {what} (possible downgrade attack); \
                 {policy} with downgrade = refuse: deferred and flagged until {} or until an \
                 admin resets the peer",
                date(at),
                date(at.saturating_add(self.settings.downgrade_window)),
            );
            self.flag(
                &mut effects,
                now,
                &format!("{what} (possible downgrade attack)"),
            );
            AfterFailure::Defer(Deferral {
                status: STATUS_TLS_FAILED,
                reason,
            })
        } else {
            let until = now.saturating_add(self.settings.broken_tls_ttl);
            effects.push(Effect::MarkBroken { until });
            let reason = format!(
                "reconnecting to {peer} in plaintext: {what} ({policy}); remembered as \
                 TLS-broken until {}",
                date(until),
            );
            let attempt = Attempt {
                starttls: StartTlsMode::Never,
                protected_since: None,
                reason: reason.clone(),
                ..self.clone()
            };
            AfterFailure::ReconnectPlaintext { reason, attempt }
        };
        Decision::new(action, effects)
    }

    /// The handshake completed; check the certificate as the level demands.
    pub fn after_handshake(&self, tls: &Handshake, now: u64) -> Decision<AfterHandshake> {
        let peer = &self.key;
        let cert = &tls.cert;
        let problem = match self.level {
            Level::Verify => match (cert.chain_verified, cert.name_matches) {
                (true, true) => None,
                (false, true) => Some("its certificate does not chain to a trusted CA".into()),
                (true, false) => Some(format!(
                    "its certificate does not match the name {:?}",
                    peer.name
                )),
                (false, false) => Some(format!(
                    "its certificate does not chain to a trusted CA and does not match the \
                     name {:?}",
                    peer.name
                )),
            },
            Level::Fingerprint if self.pinned(cert) => None,
            Level::Fingerprint => Some(format!(
                "neither its certificate (SHA-256 {}) nor its public key (SPKI SHA-256 {}) is \
                 among the {} pinned fingerprints",
                cert.fingerprint_sha256,
                cert.spki_sha256,
                self.pins.len(),
            )),
            Level::Dane | Level::DaneOnly => match &cert.dane {
                DaneMatch::Matched(_) => None,
                DaneMatch::NoMatch(why) => Some(format!(
                    "its certificate chain matches none of the {} usable TLSA records ({why})",
                    self.tlsa.len()
                )),
                DaneMatch::NotChecked => {
                    Some("its certificate was not checked against the TLSA records".into())
                }
            },
            Level::None | Level::May | Level::Encrypt => None,
        };
        match problem {
            None => Decision::new(
                AfterHandshake::Proceed,
                vec![Effect::TlsSucceeded(TlsSuccess {
                    at: now,
                    version: tls.version.clone(),
                    cipher: tls.cipher.clone(),
                    fingerprint: Some(cert.fingerprint_sha256.clone()).filter(|f| !f.is_empty()),
                    auth: self.auth(),
                })],
            ),
            Some(problem) => Decision::new(
                AfterHandshake::Defer(Deferral {
                    status: STATUS_TLS_FAILED,
                    reason: format!("TLS with {peer} rejected: {problem} ({})", self.policy()),
                }),
                vec![Effect::Failed, Effect::Deferred],
            ),
        }
    }

    /// `level encrypt by the forced list; the route says may`, for reasons.
    fn policy(&self) -> String {
        match self.source {
            Source::Route => format!("level {} by the route", self.level),
            Source::ForcedList(route) => {
                format!(
                    "level {} by the forced list; the route says {route}",
                    self.level
                )
            }
            Source::RouteAndForcedList => {
                format!("level {} by the route; also on the forced list", self.level)
            }
            Source::DaneSecure(n) => {
                format!("level dane by the route: {n} usable secure TLSA records")
            }
            Source::DaneUnusable => {
                "level encrypt: the route says dane, the secure TLSA records are unusable".into()
            }
            Source::DaneInsecure => {
                "level may: the route says dane, there are no secure TLSA records".into()
            }
            Source::MtaSts(route) => {
                format!("level verify by the domain's MTA-STS policy; the route says {route}")
            }
        }
    }

    fn flag(&self, effects: &mut Vec<Effect>, now: u64, reason: &str) {
        effects.push(Effect::FlagDowngrade {
            at: now,
            reason: reason.to_string(),
        });
        effects.push(Effect::Deferred);
    }

    fn pinned(&self, cert: &CertFacts) -> bool {
        let candidates = [hex(&cert.fingerprint_sha256), hex(&cert.spki_sha256)];
        self.pins
            .iter()
            .map(|p| hex(p))
            .filter(|p| !p.is_empty())
            .any(|p| candidates.contains(&p))
    }
}

/// A fingerprint in one form: lower-case hex without `:` or whitespace.
fn hex(s: &str) -> String {
    s.chars()
        .filter(|c| *c != ':' && !c.is_whitespace())
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// Longest TLS error text copied into a reason.
const MAX_ERROR: usize = 200;

/// A TLS library error fit for logs and DSNs: one line, bounded.
fn clean(s: &str) -> String {
    let one_line: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let words: Vec<&str> = one_line.split_whitespace().collect();
    words.join(" ").chars().take(MAX_ERROR).collect()
}

fn date(unix_time: u64) -> String {
    rfc5322_date(unix_time)
}

/// Which peers an admin reset applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerMatch {
    Key(PeerKey),
    /// Every name seen at this address.
    Ip(IpAddr),
    /// Every address seen under this host name (case-insensitive).
    Name(String),
}

impl PeerMatch {
    /// An IP (optionally in brackets) or a host name, as given to `sealctl peers reset PEER`.
    pub fn parse(s: &str) -> Self {
        let s = s.trim();
        match s.trim_start_matches('[').trim_end_matches(']').parse() {
            Ok(ip) => PeerMatch::Ip(ip),
            Err(_) => PeerMatch::Name(s.to_string()),
        }
    }

    pub fn matches(&self, key: &PeerKey) -> bool {
        match self {
            PeerMatch::Key(k) => k == key,
            PeerMatch::Ip(ip) => key.ip == *ip,
            PeerMatch::Name(n) => key.name.eq_ignore_ascii_case(n),
        }
    }
}

/// The bounded peer table: at most `max` records; inserting a new peer into a full table
/// evicts the least recently seen one (a linear scan, only then). Listed in key order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerTable {
    max: usize,
    peers: BTreeMap<PeerKey, PeerRecord>,
}

impl Default for PeerTable {
    fn default() -> Self {
        PeerTable::new(DEFAULT_MAX_PEERS)
    }
}

impl PeerTable {
    /// An empty table holding at most `max` peers (at least one).
    pub fn new(max: usize) -> Self {
        PeerTable {
            max: max.max(1),
            peers: BTreeMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    pub fn get(&self, key: &PeerKey) -> Option<&PeerRecord> {
        self.peers.get(key)
    }

    /// The peer's record, or an empty one for a peer never seen (what [`plan`] takes).
    pub fn record(&self, key: &PeerKey) -> &PeerRecord {
        self.peers.get(key).unwrap_or(&UNKNOWN)
    }

    /// Change the peer's record (created if new, evicting if full) and mark it seen at `now`.
    pub fn update(
        &mut self,
        key: &PeerKey,
        now: u64,
        f: impl FnOnce(&mut PeerRecord),
    ) -> &PeerRecord {
        if !self.peers.contains_key(key) {
            self.make_room();
        }
        let record = self.peers.entry(key.clone()).or_default();
        record.last_seen = now;
        f(record);
        record
    }

    /// Apply a decision's effects to the peer's record.
    pub fn apply<A>(&mut self, key: &PeerKey, now: u64, decision: &Decision<A>) -> &PeerRecord {
        self.update(key, now, |r| decision.apply(r))
    }

    /// Put a record back as it was (loading a persisted table), evicting if full.
    pub fn insert(&mut self, key: PeerKey, record: PeerRecord) {
        if !self.peers.contains_key(&key) {
            self.make_room();
        }
        self.peers.insert(key, record);
    }

    /// Admin reset of every matching peer ([`PeerRecord::reset`]); returns how many matched.
    pub fn reset(&mut self, which: &PeerMatch) -> usize {
        let mut n = 0;
        for (_, r) in self.peers.iter_mut().filter(|(k, _)| which.matches(k)) {
            r.reset();
            n += 1;
        }
        n
    }

    /// Drop downgrade flags whose window has passed and broken marks past their TTL; returns
    /// how many records changed.
    pub fn expire(&mut self, now: u64, settings: &Settings) -> usize {
        let mut n = 0;
        for r in self.peers.values_mut() {
            let mut changed = false;
            if r.downgrade_flagged.is_some()
                && r.downgrade_flag(now, settings.downgrade_window).is_none()
            {
                r.downgrade_flagged = None;
                changed = true;
            }
            if r.tls_broken_until.is_some() && r.broken_until(now).is_none() {
                r.tls_broken_until = None;
                changed = true;
            }
            n += usize::from(changed);
        }
        n
    }

    /// All records in key order (IP, then name).
    pub fn iter(&self) -> impl Iterator<Item = (&PeerKey, &PeerRecord)> {
        self.peers.iter()
    }

    fn make_room(&mut self) {
        while self.peers.len() >= self.max {
            let oldest = self
                .peers
                .iter()
                .min_by_key(|(_, r)| r.last_seen)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => self.peers.remove(&k),
                None => return,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;
    const HOUR: u64 = 3_600;
    const DAY: u64 = 86_400;
    const PIN_CERT: &str = "AA:BB:CC:01";
    const PIN_SPKI: &str = "dd ee ff 02";

    fn key() -> PeerKey {
        PeerKey::new(IpAddr::from([127, 0, 0, 3]), "mx.peer.test")
    }

    fn settings(downgrade: Downgrade) -> Settings {
        Settings {
            downgrade,
            ..Settings::default()
        }
    }

    fn cert(chain: bool, name: bool, fp: &str, spki: &str) -> CertFacts {
        CertFacts {
            chain_verified: chain,
            name_matches: name,
            fingerprint_sha256: fp.into(),
            spki_sha256: spki.into(),
            dane: DaneMatch::NotChecked,
        }
    }

    fn good() -> CertFacts {
        cert(true, true, "aabbcc01", "0000")
    }

    fn tls_at(at: u64) -> TlsSuccess {
        TlsSuccess {
            at,
            version: "TLSv1.3".into(),
            cipher: "TLS_AES_256_GCM_SHA384".into(),
            fingerprint: Some("aabbcc01".into()),
            auth: PeerAuth::None,
        }
    }

    /// Records a row may start from.
    #[derive(Debug, Clone, Copy)]
    enum Rec {
        Fresh,
        /// TLS a day ago: inside the downgrade window.
        TlsRecent,
        /// TLS 31 days ago: outside the window.
        TlsOld,
        /// Broken for another hour.
        Broken,
        /// Broken mark expired a second ago.
        BrokenExpired,
        /// TLS a day ago, flagged an hour ago.
        Flagged,
        /// Flagged, but the last TLS was 31 days ago.
        FlaggedOld,
    }

    fn record(r: Rec) -> PeerRecord {
        let mut p = PeerRecord::new();
        match r {
            Rec::Fresh => {}
            Rec::TlsRecent => p.tls_succeeded(tls_at(NOW - DAY)),
            Rec::TlsOld => p.tls_succeeded(tls_at(NOW - 31 * DAY)),
            Rec::Broken => p.mark_broken(NOW + HOUR),
            Rec::BrokenExpired => p.mark_broken(NOW - 1),
            Rec::Flagged => {
                p.tls_succeeded(tls_at(NOW - DAY));
                p.flag_downgrade(NOW - HOUR, "no STARTTLS".into());
            }
            Rec::FlaggedOld => {
                p.tls_succeeded(tls_at(NOW - 31 * DAY));
                p.flag_downgrade(NOW - 2 * DAY, "no STARTTLS".into());
            }
        }
        p
    }

    /// What the session observes.
    #[derive(Debug, Clone)]
    enum Obs {
        NoStartTls,
        Fails,
        Timeout,
        Cert(CertFacts),
    }

    /// How the attempt ends.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum End {
        /// Deferred before connecting.
        PlanDefer,
        Plaintext,
        Tls,
        Defer,
        /// Plaintext reconnect after a failed handshake (+ broken mark).
        Reconnect,
    }

    /// Runs one attempt through the engine; returns the mode, the end, its reason and the
    /// effects of all steps.
    fn run(
        route: &RouteFacts,
        rec: &PeerRecord,
        s: &Settings,
        obs: &Obs,
    ) -> (Option<StartTlsMode>, End, String, Vec<Effect>) {
        let k = key();
        let planned = plan(route, &k, rec, NOW, s);
        let mut effects = planned.effects;
        let a = match planned.action {
            Plan::Defer(d) => return (None, End::PlanDefer, d.to_string(), effects),
            Plan::Connect(a) => a,
        };
        let mode = Some(a.starttls());
        let ehlo = a.after_ehlo(!matches!(obs, Obs::NoStartTls), NOW);
        effects.extend(ehlo.effects);
        match ehlo.action {
            AfterEhlo::Plaintext(r) => return (mode, End::Plaintext, r, effects),
            AfterEhlo::Defer(d) => return (mode, End::Defer, d.to_string(), effects),
            AfterEhlo::UseTls => {}
        }
        let failure = match obs {
            Obs::NoStartTls => unreachable!("STARTTLS used although not offered"),
            Obs::Fails => HandshakeFailure::Failed("bad record\r\nMAC".into()),
            Obs::Timeout => HandshakeFailure::Timeout,
            Obs::Cert(c) => {
                let hs = Handshake {
                    version: "TLSv1.3".into(),
                    cipher: "TLS_AES_256_GCM_SHA384".into(),
                    cert: c.clone(),
                };
                let d = a.after_handshake(&hs, NOW);
                effects.extend(d.effects);
                return match d.action {
                    AfterHandshake::Proceed => (mode, End::Tls, a.reason().into(), effects),
                    AfterHandshake::Defer(d) => (mode, End::Defer, d.to_string(), effects),
                };
            }
        };
        let d = a.after_handshake_failure(&failure, NOW);
        effects.extend(d.effects);
        match d.action {
            AfterFailure::ReconnectPlaintext { reason, attempt } => {
                assert_eq!(attempt.starttls(), StartTlsMode::Never);
                // The reconnect goes plaintext whatever the server offers.
                let again = attempt.after_ehlo(true, NOW);
                assert_eq!(again.action, AfterEhlo::Plaintext(reason.clone()));
                effects.extend(again.effects);
                (mode, End::Reconnect, reason, effects)
            }
            AfterFailure::Defer(d) => (mode, End::Defer, d.to_string(), effects),
        }
    }

    use Level::{Encrypt, Fingerprint, May, None as NoTls, Verify};

    /// `(route level, forced, observation) → (mode, end, reason contains)`.
    type LevelRow<'a> = (Level, bool, &'a Obs, StartTlsMode, End, &'a [&'a str]);
    /// `(record, downgrade, observation) → (mode, end, reason contains)` for route level `may`.
    type MemoryRow<'a> = (
        Rec,
        Downgrade,
        &'a Obs,
        Option<StartTlsMode>,
        End,
        &'a [&'a str],
    );
    use StartTlsMode::{IfOffered, Never, Required};

    /// Every row of the F-TLS-OUT table, plus the forced list.
    #[test]
    fn levels_table() {
        let missing = Obs::NoStartTls;
        let bad_chain = Obs::Cert(cert(false, true, "aabbcc01", "0000"));
        let bad_name = Obs::Cert(cert(true, false, "aabbcc01", "0000"));
        let bad_both = Obs::Cert(cert(false, false, "", ""));
        let pinned_cert = Obs::Cert(cert(false, false, "aabbcc01", "0000"));
        let pinned_spki = Obs::Cert(cert(false, false, "1234", "DDEEFF02"));
        let unpinned = Obs::Cert(cert(true, true, "1234", "5678"));
        let ok = Obs::Cert(good());
        #[rustfmt::skip]
        let rows: Vec<LevelRow> = vec![
            // none: never STARTTLS, whatever the server does.
            (NoTls, false, &missing, Never, End::Plaintext, &["127.0.0.3", "level none by the route", "never"]),
            (NoTls, false, &ok, Never, End::Plaintext, &["level none"]),
            (NoTls, false, &Obs::Fails, Never, End::Plaintext, &["level none"]),
            (NoTls, false, &Obs::Timeout, Never, End::Plaintext, &["level none"]),
            (NoTls, false, &bad_chain, Never, End::Plaintext, &["level none"]),
            // may: TLS when offered, certificate only recorded, plaintext fallback.
            (May, false, &missing, IfOffered, End::Plaintext, &["mx.peer.test [127.0.0.3]", "did not offer STARTTLS", "level may by the route"]),
            (May, false, &ok, IfOffered, End::Tls, &["level may"]),
            (May, false, &bad_chain, IfOffered, End::Tls, &[]),
            (May, false, &bad_name, IfOffered, End::Tls, &[]),
            (May, false, &unpinned, IfOffered, End::Tls, &[]),
            (May, false, &Obs::Fails, IfOffered, End::Reconnect, &["127.0.0.3", "handshake failed (bad record MAC)", "reconnecting to", "TLS-broken until", "level may"]),
            (May, false, &Obs::Timeout, IfOffered, End::Reconnect, &["did not finish within the handshake timeout", "reconnecting to"]),
            // encrypt: required, no certificate check.
            (Encrypt, false, &missing, Required, End::Defer, &["4.7.4", "TLS required by policy for mx.peer.test [127.0.0.3]", "level encrypt by the route", "did not offer STARTTLS"]),
            (Encrypt, false, &Obs::Fails, Required, End::Defer, &["4.7.5", "level encrypt by the route", "handshake failed (bad record MAC)"]),
            (Encrypt, false, &Obs::Timeout, Required, End::Defer, &["4.7.5", "level encrypt", "handshake timeout"]),
            (Encrypt, false, &ok, Required, End::Tls, &[]),
            (Encrypt, false, &bad_chain, Required, End::Tls, &[]),
            (Encrypt, false, &bad_name, Required, End::Tls, &[]),
            // verify: chain and name.
            (Verify, false, &missing, Required, End::Defer, &["4.7.4", "level verify by the route", "did not offer STARTTLS"]),
            (Verify, false, &Obs::Fails, Required, End::Defer, &["4.7.5", "level verify", "handshake failed"]),
            (Verify, false, &Obs::Timeout, Required, End::Defer, &["level verify", "handshake timeout"]),
            (Verify, false, &ok, Required, End::Tls, &[]),
            (Verify, false, &bad_chain, Required, End::Defer, &["4.7.5", "127.0.0.3", "does not chain to a trusted CA", "level verify by the route"]),
            (Verify, false, &bad_name, Required, End::Defer, &["does not match the name \"mx.peer.test\"", "level verify"]),
            (Verify, false, &bad_both, Required, End::Defer, &["trusted CA and does not match the name"]),
            // fingerprint: certificate or SPKI pinned.
            (Fingerprint, false, &missing, Required, End::Defer, &["4.7.4", "level fingerprint by the route", "did not offer STARTTLS"]),
            (Fingerprint, false, &Obs::Fails, Required, End::Defer, &["level fingerprint", "handshake failed"]),
            (Fingerprint, false, &Obs::Timeout, Required, End::Defer, &["level fingerprint", "handshake timeout"]),
            (Fingerprint, false, &pinned_cert, Required, End::Tls, &[]),
            (Fingerprint, false, &pinned_spki, Required, End::Tls, &[]),
            (Fingerprint, false, &unpinned, Required, End::Defer, &["4.7.5", "127.0.0.3", "SHA-256 1234", "SPKI SHA-256 5678", "2 pinned", "level fingerprint by the route"]),
            // The forced list raises none and may to encrypt, never lowers anything.
            (NoTls, true, &missing, Required, End::Defer, &["TLS required by policy for mx.peer.test [127.0.0.3]", "level encrypt by the forced list; the route says none", "did not offer STARTTLS"]),
            (NoTls, true, &ok, Required, End::Tls, &[]),
            (May, true, &missing, Required, End::Defer, &["4.7.4", "level encrypt by the forced list; the route says may"]),
            (May, true, &Obs::Fails, Required, End::Defer, &["4.7.5", "forced list", "handshake failed"]),
            (May, true, &Obs::Timeout, Required, End::Defer, &["forced list", "handshake timeout"]),
            (May, true, &bad_chain, Required, End::Tls, &[]),
            (Encrypt, true, &missing, Required, End::Defer, &["level encrypt by the route; also on the forced list"]),
            (Verify, true, &bad_chain, Required, End::Defer, &["trusted CA", "level verify by the route; also on the forced list"]),
            (Verify, true, &ok, Required, End::Tls, &[]),
            (Fingerprint, true, &unpinned, Required, End::Defer, &["level fingerprint by the route; also on the forced list"]),
        ];
        for (level, forced, obs, want_mode, want_end, want_reason) in rows {
            let route = RouteFacts {
                level,
                forced,
                pins: vec![PIN_CERT.into(), PIN_SPKI.into()],
                dane: DaneState::NotLookedUp,
                sts: StsState::None,
            };
            let s = Settings::default();
            let row = format!("{level} forced={forced} {obs:?}");
            let (mode, end, reason, effects) = run(&route, &PeerRecord::new(), &s, obs);
            assert_eq!(mode, Some(want_mode), "{row}");
            assert_eq!(end, want_end, "{row}: {reason}");
            for w in want_reason {
                assert!(reason.contains(w), "{row}: {w:?} not in {reason:?}");
            }
            // Effects agree with the end.
            let mut r = PeerRecord::new();
            for e in &effects {
                r.apply(e);
            }
            let c = r.counts;
            match end {
                End::Tls => {
                    assert_eq!((c.tls, c.plaintext, c.deferred), (1, 0, 0), "{row}");
                    assert!(r.last_tls.is_some(), "{row}");
                }
                End::Plaintext => assert_eq!((c.tls, c.plaintext, c.deferred), (0, 1, 0), "{row}"),
                End::Defer => {
                    assert_eq!((c.tls, c.plaintext, c.deferred), (0, 0, 1), "{row}");
                    assert!(
                        r.last_tls.is_none() && r.tls_broken_until.is_none(),
                        "{row}"
                    );
                    // Without TLS history nothing is flagged.
                    assert!(r.downgrade_flagged.is_none(), "{row}");
                }
                End::Reconnect => {
                    assert_eq!((c.failures, c.plaintext, c.deferred), (1, 1, 0), "{row}");
                    assert_eq!(
                        r.tls_broken_until,
                        Some(NOW + DEFAULT_BROKEN_TLS_TTL),
                        "{row}"
                    );
                }
                End::PlanDefer => panic!("{row}: deferred before connecting"),
            }
            if matches!(obs, Obs::Fails | Obs::Timeout) && mode != Some(Never) {
                assert_eq!(c.failures, 1, "{row}");
            }
            if mode != Some(Never) {
                let offered = !matches!(obs, Obs::NoStartTls);
                assert_eq!(r.starttls_offered, Some(offered), "{row}");
            }
        }
    }

    /// Fallback with memory and downgrade protection for `may`, by starting record.
    #[test]
    fn may_memory_table() {
        use Downgrade::{Allow, Refuse};
        let ok = Obs::Cert(good());
        #[rustfmt::skip]
        let rows: Vec<MemoryRow> = vec![
            // Never seen: the first failure reconnects in plaintext and marks the peer.
            (Rec::Fresh, Refuse, &Obs::Fails, Some(IfOffered), End::Reconnect, &["127.0.0.3", "reconnecting to", "TLS-broken until"]),
            (Rec::Fresh, Refuse, &Obs::NoStartTls, Some(IfOffered), End::Plaintext, &["did not offer STARTTLS"]),
            // Remembered broken: plaintext directly, STARTTLS not even tried.
            (Rec::Broken, Refuse, &ok, Some(Never), End::Plaintext, &["127.0.0.3", "remembered as TLS-broken until", "level may by the route"]),
            (Rec::Broken, Refuse, &Obs::NoStartTls, Some(Never), End::Plaintext, &["TLS-broken"]),
            // After the TTL: probe TLS again.
            (Rec::BrokenExpired, Refuse, &ok, Some(IfOffered), End::Tls, &["probing TLS", "again"]),
            (Rec::BrokenExpired, Refuse, &Obs::Fails, Some(IfOffered), End::Reconnect, &["reconnecting to"]),
            // TLS before, within the window, refuse: no silent downgrade.
            (Rec::TlsRecent, Refuse, &Obs::NoStartTls, Some(Required), End::Defer, &["4.7.4", "mx.peer.test [127.0.0.3]", "completed TLS on", "did not offer STARTTLS", "stripping", "downgrade = refuse", "flagged", "level may by the route"]),
            (Rec::TlsRecent, Refuse, &Obs::Fails, Some(Required), End::Defer, &["4.7.5", "handshake failed", "possible downgrade attack", "flagged"]),
            (Rec::TlsRecent, Refuse, &Obs::Timeout, Some(Required), End::Defer, &["handshake timeout", "flagged"]),
            (Rec::TlsRecent, Refuse, &ok, Some(Required), End::Tls, &["downgrade protection"]),
            // allow: plain `may` behaviour.
            (Rec::TlsRecent, Allow, &Obs::NoStartTls, Some(IfOffered), End::Plaintext, &["did not offer STARTTLS"]),
            (Rec::TlsRecent, Allow, &Obs::Fails, Some(IfOffered), End::Reconnect, &["reconnecting to"]),
            // The window has passed.
            (Rec::TlsOld, Refuse, &Obs::NoStartTls, Some(IfOffered), End::Plaintext, &["did not offer STARTTLS"]),
            (Rec::TlsOld, Refuse, &Obs::Fails, Some(IfOffered), End::Reconnect, &["TLS-broken until"]),
            // Flagged: deferred before connecting while the flag holds (refuse only).
            (Rec::Flagged, Refuse, &ok, None, End::PlanDefer, &["4.7.4", "mx.peer.test [127.0.0.3]", "flagged for a possible TLS downgrade", "no STARTTLS", "downgrade = refuse", "admin resets", "level may by the route"]),
            (Rec::Flagged, Allow, &Obs::NoStartTls, Some(IfOffered), End::Plaintext, &[]),
            (Rec::FlaggedOld, Refuse, &Obs::NoStartTls, Some(IfOffered), End::Plaintext, &[]),
        ];
        for (rec, downgrade, obs, want_mode, want_end, want_reason) in rows {
            let row = format!("{rec:?} {downgrade:?} {obs:?}");
            let s = settings(downgrade);
            let (mode, end, reason, effects) =
                run(&RouteFacts::new(May, false), &record(rec), &s, obs);
            assert_eq!(mode, want_mode, "{row}");
            assert_eq!(end, want_end, "{row}: {reason}");
            for w in want_reason {
                assert!(reason.contains(w), "{row}: {w:?} not in {reason:?}");
            }
            let flagged = effects
                .iter()
                .any(|e| matches!(e, Effect::FlagDowngrade { .. }));
            assert_eq!(flagged, end == End::Defer, "{row}: {effects:?}");
            let broken = effects
                .iter()
                .any(|e| matches!(e, Effect::MarkBroken { .. }));
            assert_eq!(broken, end == End::Reconnect, "{row}: {effects:?}");
        }
    }

    /// A broken mark or a TLS history never weakens a required level.
    #[test]
    fn memory_does_not_weaken_required_levels() {
        for rec in [Rec::Broken, Rec::Flagged, Rec::TlsRecent] {
            for level in [Encrypt, Verify, Fingerprint] {
                let route = RouteFacts::new(level, false);
                let s = Settings::default();
                let (mode, end, reason, _) = run(&route, &record(rec), &s, &Obs::NoStartTls);
                assert_eq!((mode, end), (Some(Required), End::Defer), "{rec:?} {level}");
                assert!(reason.contains("TLS required by policy"), "{reason}");
            }
            let forced = RouteFacts::new(May, true);
            let s = Settings::default();
            let (mode, end, _, _) = run(&forced, &record(rec), &s, &Obs::Fails);
            assert_eq!((mode, end), (Some(Required), End::Defer), "{rec:?} forced");
        }
    }

    /// First failure → reconnect plaintext + mark; while remembered → plaintext directly;
    /// after the TTL → TLS probe; a success forgets the mark.
    #[test]
    fn fallback_with_memory_sequence() {
        let s = Settings {
            broken_tls_ttl: 600,
            ..Settings::default()
        };
        let route = RouteFacts::new(May, false);
        let k = key();
        let mut table = PeerTable::default();

        let p = plan(&route, &k, table.record(&k), NOW, &s);
        let Plan::Connect(a) = p.action else {
            panic!("{p:?}")
        };
        assert_eq!(a.starttls(), IfOffered);
        table.apply(&k, NOW, &a.after_ehlo(true, NOW));
        let d = a.after_handshake_failure(&HandshakeFailure::Timeout, NOW);
        let AfterFailure::ReconnectPlaintext { attempt, .. } = &d.action else {
            panic!("{d:?}")
        };
        table.apply(&k, NOW, &d);
        table.apply(&k, NOW, &attempt.after_ehlo(true, NOW));
        let r = table.record(&k);
        assert_eq!(r.tls_broken_until, Some(NOW + 600));
        assert_eq!((r.counts.failures, r.counts.plaintext), (1, 1));
        assert_eq!(r.starttls_offered, Some(true));

        // The second delivery goes plaintext without trying.
        let later = NOW + 599;
        let p = plan(&route, &k, table.record(&k), later, &s);
        let Plan::Connect(a) = p.action else {
            panic!("{p:?}")
        };
        assert_eq!(a.starttls(), Never);
        assert!(
            a.reason().contains("remembered as TLS-broken until"),
            "{}",
            a.reason()
        );
        let d = a.after_ehlo(true, later);
        assert!(matches!(d.action, AfterEhlo::Plaintext(_)), "{d:?}");

        // After the TTL, TLS is tried again; success clears the mark.
        let after = NOW + 600;
        let p = plan(&route, &k, table.record(&k), after, &s);
        let Plan::Connect(a) = p.action else {
            panic!("{p:?}")
        };
        assert_eq!(a.starttls(), IfOffered);
        assert!(a.reason().contains("probing TLS"), "{}", a.reason());
        assert_eq!(a.after_ehlo(true, after).action, AfterEhlo::UseTls);
        let hs = Handshake {
            version: "TLSv1.3".into(),
            cipher: "TLS13_CHACHA20_POLY1305_SHA256".into(),
            cert: good(),
        };
        let d = a.after_handshake(&hs, after);
        assert_eq!(d.action, AfterHandshake::Proceed);
        table.apply(&k, after, &d);
        let r = table.record(&k);
        assert_eq!(r.tls_broken_until, None);
        let last = r.last_tls.clone().unwrap_or_else(|| tls_at(0));
        assert_eq!(last.at, after);
        assert_eq!(last.cipher, "TLS13_CHACHA20_POLY1305_SHA256");
        assert_eq!(last.fingerprint.as_deref(), Some("aabbcc01"));
        assert_eq!(r.counts.tls, 1);
    }

    /// Downgrade: TLS seen, then STARTTLS stripped → deferred and flagged; deferred at plan
    /// time while flagged; an admin reset lets it through; the window also ends it.
    #[test]
    fn downgrade_flag_and_reset() {
        let s = Settings::default();
        let route = RouteFacts::new(May, false);
        let k = key();
        let mut table = PeerTable::default();
        table.update(&k, NOW - DAY, |r| r.tls_succeeded(tls_at(NOW - DAY)));

        let p = plan(&route, &k, table.record(&k), NOW, &s);
        let Plan::Connect(a) = p.action else {
            panic!("{p:?}")
        };
        let d = a.after_ehlo(false, NOW);
        assert!(matches!(d.action, AfterEhlo::Defer(_)), "{d:?}");
        table.apply(&k, NOW, &d);
        let r = table.record(&k);
        let (at, why) = r.downgrade_flagged.clone().unwrap_or_default();
        assert_eq!(at, NOW);
        assert!(why.contains("stripping"), "{why}");
        assert_eq!((r.counts.deferred, r.starttls_offered), (1, Some(false)));

        // While flagged: deferred before connecting, counted.
        let p = plan(&route, &k, table.record(&k), NOW + HOUR, &s);
        let Plan::Defer(def) = &p.action else {
            panic!("{p:?}")
        };
        assert!(def.reason.contains("flagged"), "{}", def.reason);
        table.apply(&k, NOW + HOUR, &p);
        assert_eq!(table.record(&k).counts.deferred, 2);

        // expire() keeps the flag inside the window, drops it after.
        let ends = NOW - DAY + s.downgrade_window;
        assert_eq!(
            table.record(&k).downgrade_flag_ends(s.downgrade_window),
            Some(ends)
        );
        assert_eq!(table.expire(ends - 1, &s), 0);
        let mut aged = table.clone();
        assert_eq!(aged.expire(ends, &s), 1);
        assert_eq!(aged.record(&k).downgrade_flagged, None);
        let p = plan(&route, &k, aged.record(&k), ends, &s);
        let Plan::Connect(a) = p.action else {
            panic!("{p:?}")
        };
        assert_eq!(a.starttls(), IfOffered);

        // Admin reset by IP: the peer goes plaintext like any `may` peer without STARTTLS.
        assert_eq!(table.reset(&PeerMatch::parse("127.0.0.3")), 1);
        let r = table.record(&k);
        assert_eq!(
            (r.last_tls.as_ref(), r.downgrade_flagged.as_ref()),
            (None, None)
        );
        assert_eq!(r.counts.deferred, 2, "counts survive a reset");
        let p = plan(&route, &k, table.record(&k), NOW + HOUR, &s);
        let Plan::Connect(a) = p.action else {
            panic!("{p:?}")
        };
        assert_eq!(a.starttls(), IfOffered);
        assert!(matches!(
            a.after_ehlo(false, NOW + HOUR).action,
            AfterEhlo::Plaintext(_)
        ));
    }

    #[test]
    fn protection_wins_over_a_broken_mark() {
        let mut r = record(Rec::TlsRecent);
        r.mark_broken(NOW + HOUR);
        let (mode, end, _, _) = run(
            &RouteFacts::new(May, false),
            &r,
            &Settings::default(),
            &Obs::NoStartTls,
        );
        assert_eq!((mode, end), (Some(Required), End::Defer));
        let (mode, end, _, _) = run(
            &RouteFacts::new(May, false),
            &r,
            &settings(Downgrade::Allow),
            &Obs::NoStartTls,
        );
        assert_eq!((mode, end), (Some(Never), End::Plaintext));
    }

    #[test]
    fn fingerprints_compare_as_hex() {
        let mut route = RouteFacts::new(Fingerprint, false);
        let k = key();
        let s = Settings::default();
        let hs = |fp: &str, spki: &str| Handshake {
            version: "TLSv1.2".into(),
            cipher: "x".into(),
            cert: cert(true, true, fp, spki),
        };
        // Nothing pinned: nothing matches, not even empty fingerprints.
        route.pins = vec![String::new(), " : ".into()];
        let Plan::Connect(a) = plan(&route, &k, &PeerRecord::new(), NOW, &s).action else {
            panic!()
        };
        assert!(matches!(
            a.after_handshake(&hs("", ""), NOW).action,
            AfterHandshake::Defer(_)
        ));
        route.pins = vec!["AB:cd:EF".into()];
        let Plan::Connect(a) = plan(&route, &k, &PeerRecord::new(), NOW, &s).action else {
            panic!()
        };
        for (fp, spki, want) in [
            ("abcdef", "", true),
            ("ABCDEF", "", true),
            ("00", "ab cd ef", true),
            ("abcdee", "abcd", false),
        ] {
            let d = a.after_handshake(&hs(fp, spki), NOW);
            assert_eq!(d.action == AfterHandshake::Proceed, want, "{fp} {spki}");
        }
    }

    #[test]
    fn table_is_bounded_lru() {
        let mut t = PeerTable::new(2);
        let k = |i: u8, n: &str| PeerKey::new(IpAddr::from([127, 0, 0, i]), n);
        t.update(&k(1, "a"), 10, |r| r.plaintext());
        t.update(&k(2, "b"), 20, |r| r.plaintext());
        t.update(&k(1, "a"), 30, |r| r.plaintext()); // a is now the most recent
        t.update(&k(3, "c"), 40, |r| r.plaintext()); // evicts b
        let keys: Vec<_> = t.iter().map(|(k, _)| k.name.clone()).collect();
        assert_eq!(keys, ["a", "c"]);
        assert_eq!(t.get(&k(1, "a")).map(|r| r.counts.plaintext), Some(2));
        assert_eq!(t.get(&k(2, "b")), None);
        assert_eq!(t.record(&k(2, "b")), &PeerRecord::new());
        t.insert(k(4, "d"), PeerRecord::new()); // evicts the least recent: a (30)
        assert_eq!(t.len(), 2);
        assert!(t.get(&k(4, "d")).is_some() && t.get(&k(1, "a")).is_none());
        let zero = PeerTable::new(0);
        assert!(zero.is_empty());
    }

    #[test]
    fn reset_by_key_ip_or_name_and_expire() {
        let mut t = PeerTable::default();
        let a = PeerKey::new(IpAddr::from([127, 0, 0, 3]), "mx.peer.test");
        let b = PeerKey::new(IpAddr::from([127, 0, 0, 3]), "other.test");
        let c = PeerKey::new(IpAddr::from([127, 0, 0, 4]), "MX.peer.test");
        for k in [&a, &b, &c] {
            t.update(k, NOW, |r| {
                r.tls_succeeded(tls_at(NOW));
                r.mark_broken(NOW + HOUR);
            });
        }
        assert_eq!(PeerMatch::parse("[127.0.0.3]"), PeerMatch::Ip(a.ip));
        assert_eq!(t.reset(&PeerMatch::parse("mx.peer.test")), 2);
        assert!(t.record(&b).last_tls.is_some());
        assert_eq!(t.reset(&PeerMatch::Key(b.clone())), 1);
        assert_eq!(t.reset(&PeerMatch::parse("::1")), 0);
        assert!(t.iter().all(|(_, r)| r.last_tls.is_none()));

        // expire drops broken marks past their TTL.
        t.update(&a, NOW, |r| r.mark_broken(NOW + HOUR));
        assert_eq!(t.expire(NOW + HOUR - 1, &Settings::default()), 0);
        assert_eq!(t.expire(NOW + HOUR, &Settings::default()), 1);
        assert!(t.iter().all(|(_, r)| r.tls_broken_until.is_none()));
    }

    #[test]
    fn peer_display_and_levels() {
        assert_eq!(key().to_string(), "mx.peer.test [127.0.0.3]");
        assert_eq!(
            PeerKey::new(IpAddr::from([127, 0, 0, 3]), "127.0.0.3").to_string(),
            "127.0.0.3"
        );
        assert_eq!(
            PeerKey::new(IpAddr::from([127, 0, 0, 3]), "[127.0.0.3]").to_string(),
            "127.0.0.3"
        );
        assert_eq!(
            PeerKey::new(IpAddr::from([127, 0, 0, 3]), "").to_string(),
            "127.0.0.3"
        );
        assert!(NoTls < May && May < Encrypt && Encrypt < Verify && Verify < Fingerprint);
        assert!(!May.requires_tls() && Encrypt.requires_tls());
        let d = Deferral {
            status: STATUS_NO_STARTTLS,
            reason: "why".into(),
        };
        assert_eq!(d.to_string(), "4.7.4 why");
    }

    /// The issue's example message, with the example's own peer (an IP as name).
    #[test]
    fn issue_example_reason() {
        let k = PeerKey::new(IpAddr::from([127, 0, 0, 3]), "127.0.0.3");
        let Plan::Connect(a) = plan(
            &RouteFacts::new(May, true),
            &k,
            &PeerRecord::new(),
            NOW,
            &Settings::default(),
        )
        .action
        else {
            panic!()
        };
        let AfterEhlo::Defer(d) = a.after_ehlo(false, NOW).action else {
            panic!()
        };
        assert_eq!(
            d.reason,
            "TLS required by policy for 127.0.0.3 (level encrypt by the forced list; the route \
             says may), but the server did not offer STARTTLS"
        );
        assert_eq!(a.source(), Source::ForcedList(May));
        assert_eq!((a.level(), a.peer()), (Encrypt, &k));
    }

    fn tlsa(u: u8) -> Tlsa {
        Tlsa {
            usage: u,
            selector: 1,
            matching: 1,
            data: vec![1; 32],
        }
    }

    fn dane_cert(m: DaneMatch) -> Obs {
        Obs::Cert(CertFacts {
            // DANE never asks for a CA or the name (RFC 7672 §3.1.1 for DANE-EE; the
            // runtime checks the name for DANE-TA)
            chain_verified: false,
            name_matches: false,
            dane: m,
            ..good()
        })
    }

    /// The precedence function and a whole attempt for `dane` / `dane-only`:
    /// `(route level, forced, TLSA state, observation) → (effective level, mode, end, reason
    /// contains)`.
    #[test]
    fn dane_precedence_table() {
        use DaneState::{Failed, Insecure, NotLookedUp, Secure};
        use StartTlsMode::{IfOffered, Required};
        let secure = Secure(vec![tlsa(3), tlsa(1)]);
        let unusable = Secure(vec![tlsa(1), tlsa(0)]);
        let insecure = Insecure("the zone of mx.test is not signed".into());
        let failed = Failed("bogus: RRSIG expired".into());
        let matched = dane_cert(DaneMatch::Matched(tlsa(3)));
        let nomatch = dane_cert(DaneMatch::NoMatch("leaf SPKI 0a0b".into()));
        let unchecked = dane_cert(DaneMatch::NotChecked);
        let any = Obs::Cert(good());
        type Row<'a> = (
            Level,
            bool,
            &'a DaneState,
            &'a Obs,
            Option<Level>,
            Option<StartTlsMode>,
            End,
            &'a [&'a str],
        );
        let table: &[Row] = &[
            // secure usable TLSA: TLS required, the match decides
            (
                Level::Dane,
                false,
                &secure,
                &matched,
                Some(Level::Dane),
                Some(Required),
                End::Tls,
                &["1 usable secure TLSA records"],
            ),
            (
                Level::Dane,
                false,
                &secure,
                &nomatch,
                Some(Level::Dane),
                Some(Required),
                End::Defer,
                &[
                    "4.7.5",
                    "matches none of the 1 usable TLSA records",
                    "leaf SPKI 0a0b",
                ],
            ),
            (
                Level::Dane,
                false,
                &secure,
                &unchecked,
                Some(Level::Dane),
                Some(Required),
                End::Defer,
                &["not checked against the TLSA records"],
            ),
            (
                Level::Dane,
                false,
                &secure,
                &Obs::NoStartTls,
                Some(Level::Dane),
                Some(Required),
                End::Defer,
                &["4.7.4", "did not offer STARTTLS"],
            ),
            (
                Level::Dane,
                false,
                &secure,
                &Obs::Fails,
                Some(Level::Dane),
                Some(Required),
                End::Defer,
                &["4.7.5", "handshake failed"],
            ),
            (
                Level::DaneOnly,
                false,
                &secure,
                &matched,
                Some(Level::Dane),
                Some(Required),
                End::Tls,
                &["usable secure TLSA"],
            ),
            // the forced list changes nothing about a DANE peer
            (
                Level::Dane,
                true,
                &secure,
                &nomatch,
                Some(Level::Dane),
                Some(Required),
                End::Defer,
                &["matches none"],
            ),
            // secure but unusable: encrypt for dane (any certificate), defer for dane-only
            (
                Level::Dane,
                false,
                &unusable,
                &any,
                Some(Level::Encrypt),
                Some(Required),
                End::Tls,
                &["none of the 2 secure TLSA records is usable"],
            ),
            (
                Level::Dane,
                false,
                &unusable,
                &Obs::NoStartTls,
                Some(Level::Encrypt),
                Some(Required),
                End::Defer,
                &["4.7.4"],
            ),
            (
                Level::DaneOnly,
                false,
                &unusable,
                &any,
                None,
                None,
                End::PlanDefer,
                &[
                    "4.7.5",
                    "dane-only",
                    "none of the 2 secure TLSA records is usable",
                ],
            ),
            // insecure: may for dane (with the fallback memory), defer for dane-only
            (
                Level::Dane,
                false,
                &insecure,
                &Obs::NoStartTls,
                Some(Level::May),
                Some(IfOffered),
                End::Plaintext,
                &["did not offer STARTTLS"],
            ),
            (
                Level::Dane,
                false,
                &insecure,
                &any,
                Some(Level::May),
                Some(IfOffered),
                End::Tls,
                &["no secure TLSA records", "not signed"],
            ),
            (
                Level::Dane,
                false,
                &insecure,
                &Obs::Fails,
                Some(Level::May),
                Some(IfOffered),
                End::Reconnect,
                &["plaintext"],
            ),
            // ... raised to encrypt by the forced list
            (
                Level::Dane,
                true,
                &insecure,
                &Obs::NoStartTls,
                Some(Level::Encrypt),
                Some(Required),
                End::Defer,
                &["forced list; the route says dane"],
            ),
            (
                Level::DaneOnly,
                false,
                &insecure,
                &any,
                None,
                None,
                End::PlanDefer,
                &["dane-only, but the zone of mx.test is not signed"],
            ),
            // a failed or bogus lookup: this host is not used now
            (
                Level::Dane,
                false,
                &failed,
                &any,
                None,
                None,
                End::PlanDefer,
                &["4.7.5", "TLSA lookup failed", "bogus"],
            ),
            (
                Level::DaneOnly,
                true,
                &failed,
                &any,
                None,
                None,
                End::PlanDefer,
                &["bogus"],
            ),
            (
                Level::Dane,
                false,
                &NotLookedUp,
                &any,
                None,
                None,
                End::PlanDefer,
                &["not looked up"],
            ),
            // other levels ignore the TLSA state
            (
                Level::May,
                false,
                &failed,
                &Obs::NoStartTls,
                Some(Level::May),
                Some(IfOffered),
                End::Plaintext,
                &[],
            ),
            (
                Level::Verify,
                false,
                &secure,
                &any,
                Some(Level::Verify),
                Some(Required),
                End::Tls,
                &[],
            ),
        ];
        for (level, forced, state, obs, want_level, want_mode, want_end, needles) in table {
            let route = RouteFacts {
                dane: (*state).clone(),
                ..RouteFacts::new(*level, *forced)
            };
            let row = format!("{level} forced={forced} {state:?} {obs:?}");
            let eff = effective_level(&route).ok().map(|(l, _, _)| l);
            assert_eq!(eff, *want_level, "{row}");
            let (mode, end, reason, _) = run(&route, &PeerRecord::new(), &Settings::default(), obs);
            assert_eq!((mode, end), (*want_mode, *want_end), "{row}: {reason}");
            for n in *needles {
                assert!(reason.contains(n), "{row}: {reason:?} lacks {n:?}");
            }
        }
    }

    #[test]
    fn a_dane_attempt_carries_only_the_usable_records() {
        let route = RouteFacts {
            dane: DaneState::Secure(vec![tlsa(3), tlsa(1), tlsa(2)]),
            ..RouteFacts::new(Level::Dane, false)
        };
        let Plan::Connect(a) = plan(
            &route,
            &key(),
            &PeerRecord::new(),
            NOW,
            &Settings::default(),
        )
        .action
        else {
            panic!("deferred")
        };
        assert_eq!(a.tlsa(), &[tlsa(3), tlsa(2)]);
        let plain = plan(
            &RouteFacts::new(Level::Encrypt, false),
            &key(),
            &PeerRecord::new(),
            NOW,
            &Settings::default(),
        );
        let Plan::Connect(a) = plain.action else {
            panic!()
        };
        assert!(a.tlsa().is_empty());
    }

    /// MTA-STS in the precedence: `(route level, forced, TLSA state, policy, observation) →
    /// (effective level, end, reason contains, auth on success)`.
    #[test]
    fn mta_sts_precedence_table() {
        use StsState::{Enforce, Testing};
        let enforce = |m: bool| Enforce {
            domain: "sts.test".into(),
            mx_matches: m,
        };
        let testing = |m: bool| Testing {
            domain: "sts.test".into(),
            mx_matches: m,
        };
        let secure = DaneState::Secure(vec![tlsa(3)]);
        let insecure = DaneState::Insecure("unsigned".into());
        let verified = Obs::Cert(good());
        let unverified = Obs::Cert(cert(false, true, "aabbcc01", "0000"));
        let matched = dane_cert(DaneMatch::Matched(tlsa(3)));
        type Row<'a> = (
            Level,
            bool,
            DaneState,
            StsState,
            &'a Obs,
            Option<Level>,
            End,
            &'a [&'a str],
            PeerAuth,
        );
        let table: Vec<Row> = vec![
            // enforce raises may / encrypt / none to verify, by the system roots and the name
            (
                Level::May,
                false,
                DaneState::NotLookedUp,
                enforce(true),
                &verified,
                Some(Level::Verify),
                End::Tls,
                &["MTA-STS policy of sts.test: enforce", "the route says may"],
                PeerAuth::MtaSts,
            ),
            (
                Level::May,
                false,
                DaneState::NotLookedUp,
                enforce(true),
                &unverified,
                Some(Level::Verify),
                End::Defer,
                &["4.7.5", "does not chain to a trusted CA"],
                PeerAuth::None,
            ),
            (
                Level::May,
                false,
                DaneState::NotLookedUp,
                enforce(true),
                &Obs::NoStartTls,
                Some(Level::Verify),
                End::Defer,
                &["4.7.4"],
                PeerAuth::None,
            ),
            (
                Level::May,
                false,
                DaneState::NotLookedUp,
                enforce(true),
                &Obs::Fails,
                Some(Level::Verify),
                End::Defer,
                &["4.7.5"],
                PeerAuth::None,
            ),
            (
                Level::None,
                false,
                DaneState::NotLookedUp,
                enforce(true),
                &verified,
                Some(Level::Verify),
                End::Tls,
                &["the route says none"],
                PeerAuth::MtaSts,
            ),
            (
                Level::Encrypt,
                true,
                DaneState::NotLookedUp,
                enforce(true),
                &verified,
                Some(Level::Verify),
                End::Tls,
                &["MTA-STS"],
                PeerAuth::MtaSts,
            ),
            // a host the policy does not name: deferred before connecting
            (
                Level::May,
                false,
                DaneState::NotLookedUp,
                enforce(false),
                &verified,
                None,
                End::PlanDefer,
                &[
                    "4.7.5",
                    "not among the MX patterns of the MTA-STS policy of sts.test",
                ],
                PeerAuth::None,
            ),
            // the admin's own authentication stays
            (
                Level::Fingerprint,
                false,
                DaneState::NotLookedUp,
                enforce(true),
                &verified,
                Some(Level::Fingerprint),
                End::Tls,
                &[],
                PeerAuth::Pin,
            ),
            (
                Level::Verify,
                false,
                DaneState::NotLookedUp,
                enforce(true),
                &verified,
                Some(Level::Verify),
                End::Tls,
                &[],
                PeerAuth::Ca,
            ),
            // secure TLSA wins over the policy; insecure TLSA leaves it to the policy
            (
                Level::Dane,
                false,
                secure.clone(),
                enforce(false),
                &matched,
                Some(Level::Dane),
                End::Tls,
                &["usable secure TLSA"],
                PeerAuth::Dane,
            ),
            (
                Level::Dane,
                false,
                insecure.clone(),
                enforce(true),
                &verified,
                Some(Level::Verify),
                End::Tls,
                &[
                    "unsigned",
                    "MTA-STS policy of sts.test: enforce",
                    "the route says dane",
                ],
                PeerAuth::MtaSts,
            ),
            (
                Level::Dane,
                false,
                insecure,
                enforce(false),
                &verified,
                None,
                End::PlanDefer,
                &["not among the MX patterns"],
                PeerAuth::None,
            ),
            // testing: as without a policy, noted
            (
                Level::May,
                false,
                DaneState::NotLookedUp,
                testing(false),
                &Obs::NoStartTls,
                Some(Level::May),
                End::Plaintext,
                &[],
                PeerAuth::None,
            ),
            (
                Level::May,
                false,
                DaneState::NotLookedUp,
                testing(false),
                &unverified,
                Some(Level::May),
                End::Tls,
                &["testing (the host matches none of its MX patterns)"],
                PeerAuth::None,
            ),
        ];
        for (level, forced, dane, sts, obs, want_level, want_end, needles, want_auth) in table {
            let route = RouteFacts {
                dane,
                sts,
                pins: vec!["aabbcc01".to_string()], // the pin of good()
                ..RouteFacts::new(level, forced)
            };
            let row = format!(
                "{level} forced={forced} {:?} {:?} {obs:?}",
                route.dane, route.sts
            );
            let eff = effective_level(&route).ok().map(|(l, _, _)| l);
            assert_eq!(eff, want_level, "{row}");
            let (_, end, reason, effects) =
                run(&route, &PeerRecord::new(), &Settings::default(), obs);
            assert_eq!(end, want_end, "{row}: {reason}");
            for n in needles {
                assert!(reason.contains(n), "{row}: {reason:?} lacks {n:?}");
            }
            let auth = effects.iter().find_map(|e| match e {
                Effect::TlsSucceeded(t) => Some(t.auth),
                _ => None,
            });
            assert_eq!(auth.unwrap_or_default(), want_auth, "{row}");
        }
    }
}
