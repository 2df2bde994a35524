//! AUTH in the runtime (F-AUTH; `docs/auth.md`): the credentials of an `AUTH` exchange checked
//! against the login domain's backend over verified TLS, throttled, with a success cache.
//!
//! The decisions are `sealgate_core::auth`'s (throttle, cache, login and LDAP text) and
//! `sealgate_proto::authclient`'s (the IMAP, POP3 and SMTP dialogs); this module owns the
//! sockets, the TLS, the timeouts, the delay before a `535`, and the log lines, which name the
//! user and never the password.

mod ldap;
mod mail;
mod recipients;

pub use recipients::RecipientChecker;

use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use sealgate_core::auth::{Admission, SuccessCache, Throttle, ThrottleSettings, split_login};
use sealgate_core::config::{AuthConfig, BackendKind};
use sealgate_proto::sasl::{Credentials, Password};
use sealgate_proto::server::AuthResult;
use tokio::sync::Semaphore;

use crate::live::Snapshot;

/// Successful logins remembered at most (the cache's bound).
const CACHE_ENTRIES: usize = 4096;

/// Client addresses and users whose failures are tracked at most (the throttle's bound).
const THROTTLE_ENTRIES: usize = 16_384;

/// What a backend (or the lookup of one) answered.
#[derive(Debug)]
enum Answer {
    Accepted,
    /// Wrong login or password; the reason is for the log.
    Rejected(&'static str),
    /// The check could not be made (down, hung, TLS refused, protocol error).
    Unavailable(String),
}

/// Checks logins; one per daemon, so throttling and the cache survive config changes (their
/// settings are read at start).
#[derive(Debug)]
pub struct Authenticator {
    throttle: Mutex<Throttle>,
    cache: Mutex<SuccessCache>,
    /// Backend checks in flight (`auth.max_checks`).
    checks: Semaphore,
}

/// A check admitted by the throttle: counted as in flight until it is resolved, and as
/// abandoned (not a failure) if its session goes away first.
struct Ticket<'a> {
    auth: &'a Authenticator,
    client: IpAddr,
    login: &'a str,
    resolved: bool,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if !self.resolved {
            self.auth.throttle().abandoned(self.client, self.login);
        }
    }
}

impl Authenticator {
    pub fn new(config: &AuthConfig) -> Authenticator {
        let settings = ThrottleSettings {
            fail_delay: config.fail_delay,
            max_fail_delay: config.max_fail_delay,
            lockout_after: config.lockout_after,
            lockout_time: config.lockout_time,
            max_entries: THROTTLE_ENTRIES,
        };
        Authenticator {
            throttle: Mutex::new(Throttle::new(settings)),
            cache: Mutex::new(SuccessCache::new(config.cache_ttl, CACHE_ENTRIES)),
            checks: Semaphore::new(config.max_checks),
        }
    }

    fn throttle(&self) -> MutexGuard<'_, Throttle> {
        self.throttle.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cache(&self) -> MutexGuard<'_, SuccessCache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The verdict on `creds` from `client`, after the failure delay when it is a `535`.
    pub async fn check(&self, snap: &Snapshot, client: IpAddr, creds: &Credentials) -> AuthResult {
        let login = creds.login.as_str();
        let password = creds.password.expose();
        let now = Instant::now();
        let admission = self.throttle().admit(client, login, now);
        if let Admission::Locked { retry_after } = admission {
            tracing::warn!(user = %login, client = %client, retry_after_s = retry_after.as_secs(), "auth locked");
            return AuthResult::Unavailable;
        }
        let mut ticket = Ticket {
            auth: self,
            client,
            login,
            resolved: false,
        };
        if self.cache().check(login, password, now) {
            ticket.resolved = true;
            self.throttle().succeeded(client, login, now);
            tracing::info!(user = %login, client = %client, "auth cached");
            return AuthResult::Accepted;
        }
        let started = Instant::now();
        let (answer, backend) = self.ask(snap, login, &creds.password).await;
        let ms = started.elapsed().as_millis();
        ticket.resolved = true;
        match answer {
            Answer::Accepted => {
                self.throttle().succeeded(client, login, Instant::now());
                self.cache().insert(login, password, Instant::now());
                tracing::info!(user = %login, backend = %backend, client = %client, ms, "auth accepted");
                AuthResult::Accepted
            }
            Answer::Rejected(reason) => {
                let delay = self.throttle().failed(client, login, Instant::now());
                tracing::info!(user = %login, backend = %backend, client = %client, reason = %reason, delay_ms = delay.as_millis(), "auth refused");
                tokio::time::sleep(delay).await;
                AuthResult::Rejected
            }
            Answer::Unavailable(reason) => {
                self.throttle().abandoned(client, login);
                tracing::warn!(user = %login, backend = %backend, client = %client, reason = %reason, ms, "auth unavailable");
                AuthResult::Unavailable
            }
        }
    }

    /// Asks the backend of the login's domain; also names it for the log.
    async fn ask<'s>(
        &self,
        snap: &'s Snapshot,
        login: &str,
        password: &Password,
    ) -> (Answer, &'s str) {
        let Some((user, domain)) = split_login(login) else {
            return (Answer::Rejected("the login is not user@domain"), "-");
        };
        let Some(b) = snap.config.auth.backend_for(&domain) else {
            return (Answer::Rejected("no backend for the login's domain"), "-");
        };
        let name = b.name.as_str();
        let Some(tls) = snap.client_tls.backend(name) else {
            return (Answer::Unavailable("no TLS configuration".into()), name);
        };
        let deadline = tokio::time::Instant::now() + b.timeout;
        let Ok(Ok(_permit)) = tokio::time::timeout_at(deadline, self.checks.acquire()).await else {
            return (
                Answer::Unavailable("too many checks in flight".into()),
                name,
            );
        };
        let check = async {
            match b.kind {
                BackendKind::Ldap => {
                    let names = ldap::Names {
                        user,
                        address: login,
                        domain: &domain,
                    };
                    ldap::check(b, tls, &names, password, &snap.secrets).await
                }
                BackendKind::Imap | BackendKind::Pop3 | BackendKind::Smtp => {
                    mail::check(
                        b,
                        tls,
                        user,
                        login,
                        &domain,
                        password,
                        &snap.config.hostname,
                    )
                    .await
                }
            }
        };
        let answer = match tokio::time::timeout_at(deadline, Box::pin(check)).await {
            Ok(answer) => answer,
            Err(_) => Answer::Unavailable(format!("no answer within {}", secs(b.timeout))),
        };
        (answer, name)
    }
}

fn secs(d: Duration) -> String {
    format!("{}s", d.as_secs())
}
