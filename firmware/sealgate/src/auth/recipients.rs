//! Recipient validation in the runtime (F-RCPT; `docs/auth.md`): the address of a RCPT to a
//! `[[recipients]]` domain looked up in its directory over verified TLS, answers cached
//! (positive and negative TTLs, bounded), lookups capped in number and time.
//!
//! The session machine decides what the answer means at RCPT (`250 2.1.5`, `550 5.1.1`,
//! `451 4.4.3`); `on_unavailable = "accept"` turns a directory that cannot be asked into
//! `Exists` here, logged as such.

use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use sealgate_core::auth::{LookupCache, split_login};
use sealgate_core::config::RecipientCheck;
use sealgate_proto::server::RcptResult;
use tokio::sync::Semaphore;

use super::ldap::{self, Lookup, Names};
use crate::live::Snapshot;

/// Directory lookups in flight at once, over all domains.
const MAX_LOOKUPS: usize = 32;

/// Looks recipients up; one per daemon, so the cache survives config changes (its keys carry
/// the lookup's settings).
#[derive(Debug)]
pub struct RecipientChecker {
    cache: Mutex<LookupCache>,
    lookups: Semaphore,
}

impl Default for RecipientChecker {
    fn default() -> Self {
        RecipientChecker {
            cache: Mutex::new(LookupCache::default()),
            lookups: Semaphore::new(MAX_LOOKUPS),
        }
    }
}

impl RecipientChecker {
    fn cache(&self) -> MutexGuard<'_, LookupCache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The verdict on `address` (a RCPT the session machine asked about).
    pub async fn check(&self, snap: &Snapshot, address: &str) -> RcptResult {
        let Some((user, domain)) = split_login(address) else {
            return RcptResult::Unknown;
        };
        let Some(rc) = snap.config.recipient_check(&domain) else {
            // The config changed under the session: nothing to check any more.
            return RcptResult::Exists;
        };
        let key = cache_key(rc, address);
        if let Some(exists) = self.cache().get(&key, Instant::now()) {
            tracing::debug!(rcpt = %address, exists, "recipient cached");
            return verdict(exists);
        }
        let started = Instant::now();
        let names = Names {
            user,
            address,
            domain: &domain,
        };
        let lookup = self.ask(snap, rc, &names).await;
        let ms = started.elapsed().as_millis();
        let backend = rc.backend.as_str();
        match lookup {
            Lookup::Exists | Lookup::Unknown => {
                let exists = matches!(lookup, Lookup::Exists);
                let ttl = if exists {
                    rc.positive_ttl
                } else {
                    rc.negative_ttl
                };
                self.cache()
                    .insert(key, exists, ttl, rc.max_cached, Instant::now());
                tracing::info!(rcpt = %address, backend = %backend, exists, ms, "recipient looked up");
                verdict(exists)
            }
            Lookup::Unavailable(reason) => {
                let accepted = rc.accept_when_unavailable;
                tracing::warn!(rcpt = %address, backend = %backend, reason = %reason, accepted, ms, "recipient lookup unavailable");
                if accepted {
                    RcptResult::Exists
                } else {
                    RcptResult::Unavailable
                }
            }
        }
    }

    async fn ask(&self, snap: &Snapshot, rc: &RecipientCheck, names: &Names<'_>) -> Lookup {
        let Some(b) = snap
            .config
            .auth
            .backends
            .iter()
            .find(|b| b.name == rc.backend)
        else {
            return Lookup::Unavailable("no such backend".into());
        };
        let Some(tls) = snap.client_tls.backend(&b.name) else {
            return Lookup::Unavailable("no TLS configuration".into());
        };
        let deadline = tokio::time::Instant::now() + b.timeout;
        let Ok(Ok(_permit)) = tokio::time::timeout_at(deadline, self.lookups.acquire()).await
        else {
            return Lookup::Unavailable("too many lookups in flight".into());
        };
        let lookup = ldap::lookup(b, tls, &rc.search, names, &snap.secrets);
        match tokio::time::timeout_at(deadline, Box::pin(lookup)).await {
            Ok(l) => l,
            Err(_) => Lookup::Unavailable(format!("no answer within {}s", b.timeout.as_secs())),
        }
    }
}

/// What a directory answer means at RCPT.
fn verdict(exists: bool) -> RcptResult {
    if exists {
        RcptResult::Exists
    } else {
        RcptResult::Unknown
    }
}

/// The lookup's settings and the address: a changed base, filter or backend never answers
/// from the entries of the old one.
fn cache_key(rc: &RecipientCheck, address: &str) -> String {
    format!(
        "{}\0{}\0{}\0{}",
        rc.backend,
        rc.search.base,
        rc.search.filter,
        address.to_lowercase()
    )
}
