//! Authentication decisions without I/O: failure throttling, the success cache, login splitting and LDAP escaping.
//!
//! The runtime (`sealgate::auth`) asks [`Throttle::admit`] before a check, reports the outcome
//! (`failed` returns the delay before the `535`), consults the [`SuccessCache`] before asking a
//! backend, and builds LDAP DNs and filters with [`expand_template`] and the escapes here. Time
//! comes in as `Instant`; nothing here reads a clock.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ring::hmac;

/// How failures are throttled (`[auth]` keys; `max_entries` is the runtime's bound).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThrottleSettings {
    pub fail_delay: Duration,
    pub max_fail_delay: Duration,
    pub lockout_after: u32,
    pub lockout_time: Duration,
    pub max_entries: usize,
}

impl Default for ThrottleSettings {
    fn default() -> Self {
        ThrottleSettings {
            fail_delay: Duration::from_secs(1),
            max_fail_delay: Duration::from_secs(30),
            lockout_after: 10,
            lockout_time: Duration::from_secs(900),
            max_entries: 10_000,
        }
    }
}

/// Whether a check may go ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Go,
    Locked { retry_after: Duration },
}

/// A throttled party: a client address (IPv6 by its /64) or a user (login, lower case).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Addr(IpAddr),
    User(String),
}

#[derive(Debug, Clone)]
struct Entry {
    failures: u32,
    /// Checks admitted and not yet resolved.
    pending: u32,
    last_failure: Option<Instant>,
    locked_until: Option<Instant>,
    touched: Instant,
}

/// Failed-login throttling per client address and per user, bounded.
///
/// - Each failure delays its answer: `fail_delay × 2^(n−1)`, n the larger failure count of the
///   address and the user, at most `max_fail_delay`.
/// - `lockout_after` failures (checks in flight counted, so parallel sessions cannot slip
///   past) lock the address for `lockout_time`.
/// - A user with `lockout_after` failures is locked only for addresses that have a failure on
///   record: the real user can still log in from a clean address, and a botnet gets at most
///   one guess per fresh address per lockout period.
/// - A success clears the user's failures, not the address's (one valid account must not reset
///   the guessing at others). Failures are forgotten `lockout_time` after the last one.
/// - At most `max_entries` entries: forgotten ones are dropped first, then the least recently
///   touched without a check in flight; if none can go, a new party is locked (fail closed).
#[derive(Debug)]
pub struct Throttle {
    settings: ThrottleSettings,
    entries: HashMap<Key, Entry>,
}

impl Throttle {
    pub fn new(settings: ThrottleSettings) -> Throttle {
        Throttle {
            settings,
            entries: HashMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Before a check of `user` from `ip`: go (counted as in flight) or locked.
    pub fn admit(&mut self, ip: IpAddr, user: &str, now: Instant) -> Admission {
        let (addr, user) = keys(ip, user);
        let limit = self.settings.lockout_after;
        let lock = self.settings.lockout_time;
        let addr_failed = match self.entry(addr.clone(), now) {
            None => return locked(lock),
            Some(e) => {
                if let Some(wait) = e.lock_left(now) {
                    return locked(wait);
                }
                if e.failures.saturating_add(e.pending) >= limit {
                    e.locked_until = Some(now + lock);
                    return locked(lock);
                }
                e.failures > 0
            }
        };
        match self.entry(user.clone(), now) {
            None => return locked(lock),
            Some(e) if addr_failed => {
                if let Some(wait) = e.lock_left(now) {
                    return locked(wait);
                }
                if e.failures.saturating_add(e.pending) >= limit {
                    e.locked_until = Some(now + lock);
                    return locked(lock);
                }
            }
            Some(_) => {}
        }
        for key in [addr, user] {
            if let Some(e) = self.entries.get_mut(&key) {
                e.pending = e.pending.saturating_add(1);
            }
        }
        Admission::Go
    }

    /// A wrong password: counted for both; returns the delay before answering.
    pub fn failed(&mut self, ip: IpAddr, user: &str, now: Instant) -> Duration {
        let (addr, user) = keys(ip, user);
        let settings = self.settings;
        let mut n = 0;
        for key in [addr, user] {
            if let Some(e) = self.entry(key, now) {
                e.pending = e.pending.saturating_sub(1);
                e.failures = e.failures.saturating_add(1);
                e.last_failure = Some(now);
                if e.failures >= settings.lockout_after {
                    e.locked_until = Some(now + settings.lockout_time);
                }
                n = n.max(e.failures);
            }
        }
        let factor = 1u32.checked_shl(n.saturating_sub(1)).unwrap_or(u32::MAX);
        settings
            .fail_delay
            .checked_mul(factor)
            .unwrap_or(Duration::MAX)
            .min(settings.max_fail_delay)
    }

    /// A right password: the user's failures and lock are cleared; the address keeps its count.
    pub fn succeeded(&mut self, ip: IpAddr, user: &str, now: Instant) {
        let (addr, user) = keys(ip, user);
        if let Some(e) = self.entries.get_mut(&addr) {
            e.pending = e.pending.saturating_sub(1);
            e.touched = now;
        }
        if let Some(e) = self.entries.get_mut(&user) {
            e.pending = e.pending.saturating_sub(1);
            e.failures = 0;
            e.last_failure = None;
            e.locked_until = None;
            e.touched = now;
        }
    }

    /// No verdict (backend unavailable, session gone): not counted.
    pub fn abandoned(&mut self, ip: IpAddr, user: &str) {
        let (addr, user) = keys(ip, user);
        for key in [addr, user] {
            if let Some(e) = self.entries.get_mut(&key) {
                e.pending = e.pending.saturating_sub(1);
            }
        }
    }

    /// The entry of `key`, made (within the bound) if new, with old failures forgotten.
    fn entry(&mut self, key: Key, now: Instant) -> Option<&mut Entry> {
        if !self.entries.contains_key(&key) && self.entries.len() >= self.settings.max_entries {
            self.make_room(now);
            if self.entries.len() >= self.settings.max_entries {
                return None;
            }
        }
        let forget = self.settings.lockout_time;
        let e = self.entries.entry(key).or_insert(Entry {
            failures: 0,
            pending: 0,
            last_failure: None,
            locked_until: None,
            touched: now,
        });
        if e.last_failure
            .is_some_and(|t| now.duration_since(t) > forget)
            && e.lock_left(now).is_none()
        {
            e.failures = 0;
            e.last_failure = None;
        }
        e.touched = now;
        Some(e)
    }

    /// Drops forgotten entries; if none, the least recently touched without a check in flight.
    fn make_room(&mut self, now: Instant) {
        let forget = self.settings.lockout_time;
        self.entries.retain(|_, e| {
            e.pending > 0
                || e.lock_left(now).is_some()
                || e.last_failure
                    .is_some_and(|t| now.duration_since(t) <= forget)
        });
        if self.entries.len() < self.settings.max_entries {
            return;
        }
        let oldest = self
            .entries
            .iter()
            .filter(|(_, e)| e.pending == 0)
            .min_by_key(|(_, e)| e.touched)
            .map(|(k, _)| k.clone());
        if let Some(k) = oldest {
            self.entries.remove(&k);
        }
    }
}

impl Entry {
    fn lock_left(&self, now: Instant) -> Option<Duration> {
        self.locked_until
            .filter(|&t| t > now)
            .map(|t| t.duration_since(now))
    }
}

fn locked(retry_after: Duration) -> Admission {
    Admission::Locked { retry_after }
}

fn keys(ip: IpAddr, user: &str) -> (Key, Key) {
    let addr = match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(prefix.into())
        }
    };
    (Key::Addr(addr), Key::User(user.to_lowercase()))
}

/// Successful logins remembered for `ttl`: an HMAC-SHA256 of login and password under a key
/// made at start, never the password.
#[derive(Debug)]
pub struct SuccessCache {
    key: Option<hmac::Key>,
    ttl: Duration,
    max: usize,
    entries: HashMap<String, (hmac::Tag, Instant)>,
}

impl SuccessCache {
    /// A cache of at most `max` logins; `ttl` zero (or no randomness) is a cache that never hits.
    pub fn new(ttl: Duration, max: usize) -> SuccessCache {
        let rng = ring::rand::SystemRandom::new();
        let key = (!ttl.is_zero())
            .then(|| hmac::Key::generate(hmac::HMAC_SHA256, &rng).ok())
            .flatten();
        SuccessCache {
            key,
            ttl,
            max,
            entries: HashMap::new(),
        }
    }

    fn message(login: &str, password: &[u8]) -> Vec<u8> {
        let mut m = login.to_lowercase().into_bytes();
        m.push(0);
        m.extend_from_slice(password);
        m
    }

    /// Whether `login` logged in with this very password less than `ttl` ago.
    pub fn check(&self, login: &str, password: &[u8], now: Instant) -> bool {
        let Some(key) = &self.key else {
            return false;
        };
        let Some((tag, expires)) = self.entries.get(&login.to_lowercase()) else {
            return false;
        };
        let message = zeroize::Zeroizing::new(Self::message(login, password));
        now < *expires && hmac::verify(key, &message, tag.as_ref()).is_ok()
    }

    pub fn insert(&mut self, login: &str, password: &[u8], now: Instant) {
        let Some(key) = &self.key else {
            return;
        };
        let message = zeroize::Zeroizing::new(Self::message(login, password));
        let tag = hmac::sign(key, &message);
        let name = login.to_lowercase();
        if !self.entries.contains_key(&name) && self.entries.len() >= self.max {
            self.entries.retain(|_, (_, expires)| *expires > now);
            if self.entries.len() >= self.max {
                let oldest = self
                    .entries
                    .iter()
                    .min_by_key(|(_, (_, e))| *e)
                    .map(|(k, _)| k.clone());
                if let Some(k) = oldest {
                    self.entries.remove(&k);
                }
            }
        }
        if self.max > 0 {
            self.entries.insert(name, (tag, now + self.ttl));
        }
    }

    pub fn forget(&mut self, login: &str) {
        self.entries.remove(&login.to_lowercase());
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Recipient lookups remembered (F-RCPT): whether the directory knew an address, until the
/// answer's TTL runs out; at most `max` entries (expired ones go first, then the soonest to
/// expire). Keys are the caller's (the lookup's settings and the lower-cased address), so a
/// changed filter or base never answers from the old one's entries.
#[derive(Debug, Default)]
pub struct LookupCache {
    entries: HashMap<String, (bool, Instant)>,
}

impl LookupCache {
    /// The remembered answer for `key`, if still fresh.
    pub fn get(&self, key: &str, now: Instant) -> Option<bool> {
        self.entries
            .get(key)
            .filter(|(_, expires)| now < *expires)
            .map(|(exists, _)| *exists)
    }

    /// Remembers `exists` for `ttl` (zero: not at all) within a bound of `max` entries.
    pub fn insert(&mut self, key: String, exists: bool, ttl: Duration, max: usize, now: Instant) {
        if ttl.is_zero() || max == 0 {
            self.entries.remove(&key);
            return;
        }
        if !self.entries.contains_key(&key) && self.entries.len() >= max {
            self.entries.retain(|_, (_, expires)| *expires > now);
            while self.entries.len() >= max {
                let soonest = self
                    .entries
                    .iter()
                    .min_by_key(|(_, (_, e))| *e)
                    .map(|(k, _)| k.clone());
                match soonest {
                    Some(k) => self.entries.remove(&k),
                    None => break,
                };
            }
        }
        self.entries.insert(key, (exists, now + ttl));
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// `local@domain` split at the last `@`: both non-empty, no whitespace or control characters;
/// the domain lower case without a trailing dot.
pub fn split_login(login: &str) -> Option<(&str, String)> {
    if login.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return None;
    }
    let (local, domain) = login.rsplit_once('@')?;
    let domain = domain.trim_end_matches('.').to_lowercase();
    (!local.is_empty() && !domain.is_empty()).then_some((local, domain))
}

/// An attribute value for a DN (RFC 4514 §2.4).
pub fn escape_dn_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let last = s.chars().count().saturating_sub(1);
    for (i, c) in s.chars().enumerate() {
        match c {
            '"' | '+' | ',' | ';' | '<' | '>' | '\\' | '=' => {
                out.push('\\');
                out.push(c);
            }
            '#' if i == 0 => out.push_str("\\#"),
            ' ' if i == 0 || i == last => out.push_str("\\ "),
            '\0' => out.push_str("\\00"),
            c => out.push(c),
        }
    }
    out
}

/// An assertion value for a search filter (RFC 4515 §3).
pub fn escape_filter_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '*' => out.push_str("\\2a"),
            '(' => out.push_str("\\28"),
            ')' => out.push_str("\\29"),
            '\\' => out.push_str("\\5c"),
            '\0' => out.push_str("\\00"),
            c => out.push(c),
        }
    }
    out
}

/// What is wrong with a template.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("unknown placeholder {{{0}}}: use {{user}}, {{address}} or {{domain}}")]
    Unknown(String),
    #[error("unbalanced brace")]
    Unbalanced,
}

const PLACEHOLDERS: [&str; 3] = ["user", "address", "domain"];

/// Only `{user}`, `{address}` and `{domain}`, with balanced braces.
pub fn check_template(t: &str) -> Result<(), TemplateError> {
    let mut rest = t;
    while let Some(open) = rest.find(['{', '}']) {
        let tail = rest.get(open..).unwrap_or_default();
        if tail.starts_with('}') {
            return Err(TemplateError::Unbalanced);
        }
        let close = tail.find('}').ok_or(TemplateError::Unbalanced)?;
        let name = tail.get(1..close).unwrap_or_default();
        if name.contains('{') {
            return Err(TemplateError::Unbalanced);
        }
        if !PLACEHOLDERS.contains(&name) {
            return Err(TemplateError::Unknown(name.to_owned()));
        }
        rest = tail.get(close + 1..).unwrap_or_default();
    }
    Ok(())
}

/// `t` with each placeholder's value passed through `escape` (a checked template).
pub fn expand_template(
    t: &str,
    user: &str,
    address: &str,
    domain: &str,
    escape: fn(&str) -> String,
) -> String {
    // One pass, so that a value containing `{domain}` is never expanded again.
    let mut out = String::with_capacity(t.len() + address.len());
    let mut rest = t;
    while let Some(open) = rest.find('{') {
        out.push_str(rest.get(..open).unwrap_or_default());
        let tail = rest.get(open..).unwrap_or_default();
        let Some(close) = tail.find('}') else {
            break;
        };
        match tail.get(1..close).unwrap_or_default() {
            "user" => out.push_str(&escape(user)),
            "address" => out.push_str(&escape(address)),
            "domain" => out.push_str(&escape(domain)),
            other => {
                out.push('{');
                out.push_str(other);
                out.push('}');
            }
        }
        rest = tail.get(close + 1..).unwrap_or_default();
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_cache_expires_and_stays_bounded() {
        let t0 = Instant::now();
        let mut c = LookupCache::default();
        c.insert("a".into(), true, Duration::from_secs(10), 2, t0);
        c.insert("b".into(), false, Duration::from_secs(5), 2, t0);
        assert_eq!(c.get("a", t0), Some(true));
        assert_eq!(c.get("b", t0 + Duration::from_secs(4)), Some(false));
        assert_eq!(c.get("b", t0 + Duration::from_secs(5)), None, "expired");
        // full: the one soonest to expire goes
        c.insert("c".into(), true, Duration::from_secs(20), 2, t0);
        assert_eq!(
            (c.len(), c.get("b", t0), c.get("a", t0)),
            (2, None, Some(true))
        );
        // a zero TTL remembers nothing and forgets what was there
        c.insert("a".into(), false, Duration::ZERO, 2, t0);
        assert_eq!(c.get("a", t0), None);
        for i in 0..100 {
            c.insert(format!("k{i}"), true, Duration::from_secs(60), 8, t0);
        }
        assert_eq!(c.len(), 8);
    }

    fn settings(after: u32) -> ThrottleSettings {
        ThrottleSettings {
            fail_delay: Duration::from_secs(1),
            max_fail_delay: Duration::from_secs(8),
            lockout_after: after,
            lockout_time: Duration::from_secs(60),
            max_entries: 100,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn delays_grow_then_the_address_is_locked() {
        let mut t = Throttle::new(settings(5));
        let now = Instant::now();
        let a = ip("192.0.2.1");
        let mut delays = Vec::new();
        for i in 0..5 {
            assert_eq!(t.admit(a, &format!("u{i}@x"), now), Admission::Go);
            delays.push(t.failed(a, &format!("u{i}@x"), now).as_secs());
        }
        assert_eq!(delays, [1, 2, 4, 8, 8]);
        assert!(matches!(
            t.admit(a, "other@x", now),
            Admission::Locked { .. }
        ));
        // Another address is not affected; the lock ends, and the failures are forgotten.
        assert_eq!(t.admit(ip("192.0.2.2"), "u0@x", now), Admission::Go);
        let later = now + Duration::from_secs(61);
        assert_eq!(t.admit(a, "u0@x", later), Admission::Go);
        assert_eq!(
            t.failed(a, "u0@x", later),
            Duration::from_secs(1),
            "forgotten"
        );
    }

    #[test]
    fn a_locked_user_can_still_log_in_from_a_clean_address() {
        let mut t = Throttle::new(settings(3));
        let now = Instant::now();
        for last in 1..=3 {
            let a = ip(&format!("198.51.100.{last}"));
            assert_eq!(t.admit(a, "Bob@x", now), Admission::Go);
            t.failed(a, "bob@x", now);
        }
        // Addresses that failed for bob are locked for him; a clean one is not.
        t.abandoned(ip("198.51.100.1"), "bob@x");
        assert!(matches!(
            t.admit(ip("198.51.100.2"), "bob@x", now),
            Admission::Locked { .. }
        ));
        assert_eq!(t.admit(ip("203.0.113.9"), "bob@x", now), Admission::Go);
        t.succeeded(ip("203.0.113.9"), "bob@x", now);
        // The success cleared bob's lock.
        assert_eq!(t.admit(ip("198.51.100.2"), "bob@x", now), Admission::Go);
    }

    #[test]
    fn checks_in_flight_count_toward_the_lockout() {
        let mut t = Throttle::new(settings(4));
        let now = Instant::now();
        let a = ip("192.0.2.7");
        let admitted = (0..20)
            .filter(|i| t.admit(a, &format!("u{i}@x"), now) == Admission::Go)
            .count();
        assert_eq!(admitted, 4);
    }

    #[test]
    fn the_table_stays_bounded_and_ipv6_counts_by_64() {
        let mut t = Throttle::new(settings(3));
        let now = Instant::now();
        for i in 0..20_000u32 {
            let a = IpAddr::V4(i.into());
            if t.admit(a, "u@x", now) == Admission::Go {
                t.failed(a, "u@x", now);
            }
            assert!(t.len() <= 100);
        }
        let mut t = Throttle::new(settings(2));
        for host in ["2001:db8::1", "2001:db8::2"] {
            assert_eq!(t.admit(ip(host), &format!("{host}@x"), now), Admission::Go);
            t.failed(ip(host), &format!("{host}@x"), now);
        }
        assert!(matches!(
            t.admit(ip("2001:db8::3"), "z@x", now),
            Admission::Locked { .. }
        ));
        assert_eq!(t.admit(ip("2001:db8:0:1::1"), "z@x", now), Admission::Go);
    }

    #[test]
    fn cache_hits_only_the_same_password_within_ttl() {
        let now = Instant::now();
        let mut c = SuccessCache::new(Duration::from_secs(60), 2);
        c.insert("Alice@a.test", b"pw", now);
        assert!(c.check("alice@a.test", b"pw", now));
        assert!(!c.check("alice@a.test", b"pw2", now));
        assert!(!c.check("alice@a.test", b"pw", now + Duration::from_secs(61)));
        c.insert("b@a.test", b"x", now);
        c.insert("c@a.test", b"y", now + Duration::from_secs(1));
        assert_eq!(c.len(), 2);
        assert!(c.check("c@a.test", b"y", now));
        c.forget("c@a.test");
        assert!(!c.check("c@a.test", b"y", now));
        let mut off = SuccessCache::new(Duration::ZERO, 10);
        off.insert("a@b", b"pw", now);
        assert!(!off.check("a@b", b"pw", now));
    }

    #[test]
    fn logins_split_at_the_last_at() {
        let cases = [
            ("alice@A.Test.", Some(("alice", "a.test"))),
            ("\"a@b\"@c.test", Some(("\"a@b\"", "c.test"))),
            ("alice", None),
            ("@a.test", None),
            ("alice@", None),
            ("al ice@a.test", None),
            ("alice@a.test\r\n", None),
        ];
        for (login, want) in cases {
            let got = split_login(login);
            assert_eq!(
                got.as_ref().map(|(l, d)| (*l, d.as_str())),
                want,
                "{login:?}"
            );
        }
    }

    #[test]
    fn escapes_follow_rfc_4514_and_4515() {
        assert_eq!(escape_filter_value("*)(uid=*"), "\\2a\\29\\28uid=\\2a");
        assert_eq!(escape_filter_value("a\\b\0"), "a\\5cb\\00");
        assert_eq!(escape_dn_value(" #a,b+c "), "\\ #a\\,b\\+c\\ ");
        assert_eq!(escape_dn_value("#x=y;<>\""), "\\#x\\=y\\;\\<\\>\\\"");
        assert_eq!(escape_dn_value("carl+lists"), "carl\\+lists");
        assert_eq!(escape_dn_value("a\0"), "a\\00");
    }

    #[test]
    fn templates_are_checked_and_expanded_once() {
        assert_eq!(check_template("uid={user},ou=p,dc={domain}"), Ok(()));
        assert_eq!(
            check_template("uid={name}"),
            Err(TemplateError::Unknown("name".into()))
        );
        assert_eq!(check_template("uid={user"), Err(TemplateError::Unbalanced));
        assert_eq!(check_template("uid=user}"), Err(TemplateError::Unbalanced));
        let dn = expand_template(
            "uid={user},o={domain}",
            "a,{domain}",
            "x",
            "d",
            escape_dn_value,
        );
        assert_eq!(dn, "uid=a\\,{domain},o=d");
        assert_eq!(
            expand_template("{address}", "a", "a@b", "b", str::to_owned),
            "a@b"
        );
    }
}
