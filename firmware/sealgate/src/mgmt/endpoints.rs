//! What each endpoint does, once routed and admitted: the handlers, each answering one of the
//! `sealgate-api` bodies or an [`ApiError`].

use std::io;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Extension, State};
use axum::http::{StatusCode, Uri};
use sealgate_api as api;
use sealgate_core::config::Config;
use sealgate_core::sealed::SealedStore;
use sealgate_core::site;
use tokio::sync::mpsc;

use super::body::{self, ChannelReader};
use super::error::{ApiError, Reply, config_refusal, internal, queue_refusal, too_large};
use super::routes::{ConnInfo, PathArg};
use super::{MAX_QUEUE_LIST, MAX_UPDATE_BYTES, Mgmt, UPDATE_CHANNEL};
use crate::control::BlobApplied;
use crate::spool::{QueuedMessage, RcptStatus, Recipient, unix_now};

type Answer<T> = Result<Reply<T>, ApiError>;

/// `GET /api/v1/health`.
pub(super) async fn health(State(m): State<Arc<Mgmt>>) -> Reply<api::Health> {
    Reply::ok(m.health())
}

/// `GET /api/v1/status`.
pub(super) async fn status(State(m): State<Arc<Mgmt>>) -> Answer<api::Status> {
    m.status().await.map(Reply::ok)
}

/// `PUT /api/v1/config`: a signed blob, verified and applied as by SIGHUP.
pub(super) async fn push_config(
    State(m): State<Arc<Mgmt>>,
    conn: Option<Extension<ConnInfo>>,
    body: Body,
) -> Answer<api::ConfigPushed> {
    let bytes = body::read_body(body, sealgate_core::blob::MAX_BLOB).await?;
    let from = conn.map_or_else(|| "an unknown client".to_string(), |c| c.peer.to_string());
    let origin = format!("management API push from {from}");
    let m2 = m.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        crate::control::apply_blob(&m2.live, &m2.peers, &m2.store, &m2.serial, &bytes, &origin)
    })
    .await
    .map_err(|e| internal(&e))?;
    match outcome {
        Ok(BlobApplied::Applied { sequence, key_id }) => {
            tracing::info!(sequence, key_id = %key_id, "configuration pushed and applied (management API)");
            Ok(Reply::ok(api::ConfigPushed {
                applied: true,
                sequence,
                key_id,
                result: "signed config applied; stored sequence raised".into(),
            }))
        }
        Ok(BlobApplied::AlreadyApplied { sequence, key_id }) => Ok(Reply::ok(api::ConfigPushed {
            applied: false,
            sequence,
            key_id,
            result: "signed config already applied (same sequence, same bytes): nothing to do"
                .into(),
        })),
        Err(e) => {
            let err = config_refusal(&e);
            tracing::error!(error = %e, check = err.check, "pushed configuration NOT applied; the running one stays");
            Err(err)
        }
    }
}

/// `PUT /api/v1/update[?reboot=1]`: the bundle streamed into the installer.
pub(super) async fn push_update(
    State(m): State<Arc<Mgmt>>,
    uri: Uri,
    body: Body,
) -> Answer<api::UpdateInstalled> {
    let Some(app) = m.appliance.clone() else {
        body::drain(body).await;
        return Err(ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "appliance",
            "updates need the appliance",
        ));
    };
    if let Some(len) = body::content_length(&body)
        && len > MAX_UPDATE_BYTES
    {
        return Err(too_large(MAX_UPDATE_BYTES));
    }
    let reboot = uri.query() == Some(api::UPDATE_REBOOT);
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(UPDATE_CHANNEL);
    let installer = app.clone();
    let job = tokio::task::spawn_blocking(move || {
        let mut reader = ChannelReader::new(rx);
        installer.install(&mut reader)
    });
    body::pump(body, tx, MAX_UPDATE_BYTES).await;
    let installed = job.await.map_err(|e| internal(&e))??;
    if reboot {
        app.reboot();
    }
    Ok(Reply::ok(api::UpdateInstalled {
        installed,
        rebooting: reboot,
    }))
}

/// `POST /api/v1/reboot`: the answer goes out first.
pub(super) async fn reboot(State(m): State<Arc<Mgmt>>) -> Answer<api::Rebooting> {
    let app = m.appliance_for("reboot")?;
    app.reboot();
    Ok(Reply(
        StatusCode::ACCEPTED,
        api::Rebooting { rebooting: true },
    ))
}

/// `POST /api/v1/poweroff`: the answer goes out first.
pub(super) async fn poweroff(State(m): State<Arc<Mgmt>>) -> Answer<api::PoweringOff> {
    let app = m.appliance_for("poweroff")?;
    app.poweroff();
    Ok(Reply(
        StatusCode::ACCEPTED,
        api::PoweringOff { powering_off: true },
    ))
}

/// `POST /api/v1/peers/{peer}/reset`: the table is written before the answer.
pub(super) async fn peer_reset(
    State(m): State<Arc<Mgmt>>,
    Extension(PathArg(peer)): Extension<PathArg>,
) -> Answer<api::PeerReset> {
    let n = m.peers.reset(&peer);
    if n == 0 {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "peer",
            format!("no peer matches {peer}"),
        ));
    }
    let peers = m.peers.clone();
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
    Ok(Reply::ok(api::PeerReset {
        peer,
        reset: n as u64,
    }))
}

/// `GET /api/v1/queue`: oldest first, at most [`MAX_QUEUE_LIST`].
pub(super) async fn queue_list(State(m): State<Arc<Mgmt>>) -> Reply<api::QueueList> {
    let all = m.queue.messages();
    let total = all.len();
    Reply::ok(api::QueueList {
        count: total as u64,
        truncated: total > MAX_QUEUE_LIST,
        messages: all.iter().take(MAX_QUEUE_LIST).map(queue_message).collect(),
    })
}

/// `POST /api/v1/queue/{id}/release`: deliver now.
pub(super) async fn queue_release(
    State(m): State<Arc<Mgmt>>,
    Extension(PathArg(id)): Extension<PathArg>,
) -> Answer<api::QueueReleased> {
    let msg = m
        .queue
        .release(&id)
        .await
        .map_err(|e| queue_refusal(&id, e))?;
    Ok(Reply::ok(api::QueueReleased {
        released: true,
        message: queue_message(&msg),
    }))
}

/// `DELETE /api/v1/queue/{id}`: removed durably, no DSN.
pub(super) async fn queue_delete(
    State(m): State<Arc<Mgmt>>,
    Extension(PathArg(id)): Extension<PathArg>,
) -> Answer<api::QueueDeleted> {
    let msg = m
        .queue
        .delete(&id)
        .await
        .map_err(|e| queue_refusal(&id, e))?;
    Ok(Reply::ok(api::QueueDeleted {
        deleted: true,
        message: queue_message(&msg),
    }))
}

/// One queued message, as `sealgate queue list --json` shows it.
fn queue_message(m: &QueuedMessage) -> api::QueueMessage {
    api::QueueMessage {
        id: m.id.clone(),
        from: m.mail_from.clone(),
        size: m.size,
        arrival: m.arrival,
        attempts: m.attempts,
        next_attempt: m.next_attempt,
        recipients: m.recipients.iter().map(queue_recipient).collect(),
    }
}

fn queue_recipient(r: &Recipient) -> api::QueueRecipient {
    let (status, detail) = match &r.status {
        RcptStatus::Pending => (api::RcptState::Pending, r.last_error.as_ref()),
        RcptStatus::Delivered(s) => (api::RcptState::Delivered, Some(s)),
        RcptStatus::Failed(s) => (api::RcptState::Failed, Some(s)),
    };
    api::QueueRecipient {
        address: r.address.clone(),
        status,
        detail: detail.map(|d| d.to_string()),
        source: detail.map(|d| d.source.name().to_string()),
    }
}

impl Mgmt {
    fn board(&self) -> api::Board {
        if self.appliance.is_some() {
            api::Board::Appliance
        } else {
            api::Board::Dev
        }
    }

    fn sealed_store_state(&self) -> api::SealedStoreState {
        api::SealedStoreState {
            ok: self.sealed_error.is_none(),
            error: self.sealed_error.clone(),
        }
    }

    /// The appliance, or `501` for `what` on the dev board.
    fn appliance_for(&self, what: &str) -> Result<&dyn super::ApplianceOps, ApiError> {
        let Some(app) = &self.appliance else {
            return Err(ApiError::new(
                StatusCode::NOT_IMPLEMENTED,
                "appliance",
                format!("{what} needs the appliance"),
            ));
        };
        tracing::warn!(what, "requested through the management API");
        Ok(app.as_ref())
    }

    /// What anyone reaching the port may know, from memory: identity, slot and health state,
    /// and whether the sealed store opened (a disk moved to another board says so here). No
    /// version (which would help pick an exploit) and no health details.
    fn health(&self) -> api::Health {
        let summary = self.appliance.as_ref().map(|a| a.summary());
        api::Health {
            serial: self.serial.clone(),
            board: self.board(),
            running_slot: summary.as_ref().map(|s| s.running_slot.clone()),
            health: summary.map(|s| s.health),
            sealed_store: self.sealed_store_state(),
            mgmt_certificate: if self.ephemeral_cert {
                "throwaway (sealed store unavailable)"
            } else {
                "sealed"
            }
            .into(),
            rss_bytes: rss_bytes(),
        }
    }

    async fn status(&self) -> Result<api::Status, ApiError> {
        let snap = self.live.get();
        let store = self.store.clone();
        let config = snap.config.clone();
        let (config_state, certificates) = tokio::task::spawn_blocking(move || {
            let guard = store.lock().unwrap_or_else(|p| p.into_inner());
            sealed_status(guard.as_ref(), &config)
        })
        .await
        .map_err(|e| internal(&e))?;
        let c = &snap.config;
        let pins = c.mgmt.admin_certificates.len() + self.baked_pins.len();
        let tokens = c.mgmt.admin_token_sha256.len();
        let q = self.queue.counts();
        Ok(api::Status {
            version: env!("CARGO_PKG_VERSION").into(),
            board: self.board(),
            serial: self.serial.clone(),
            hostname: c.hostname.clone(),
            now: unix_now(),
            uptime_seconds: self.started.elapsed().as_secs(),
            rss_bytes: rss_bytes(),
            slot: self.appliance.as_ref().map(|a| a.status()),
            sealed_store: self.sealed_store_state(),
            config: config_state,
            certificates,
            queue: api::QueueCounts {
                messages: q.messages as u64,
                recipients_pending: q.recipients_pending as u64,
                deferred: q.deferred as u64,
                in_flight: q.in_flight as u64,
            },
            peers: serde_json::to_value(self.peers.file()).unwrap_or(serde_json::Value::Null),
            mgmt: api::MgmtState {
                certificate: c.mgmt.certificate.clone(),
                pinned_certificates: pins as u64,
                tokens: tokens as u64,
                dev_token: self.dev_token.is_some() && pins == 0 && tokens == 0,
                first_contact: pins == 0 && tokens == 0 && self.dev_token.is_none(),
            },
        })
    }
}

/// What the status shows from the sealed store (blocking: it reads the store and certificate
/// files): the signed config in force and every certificate chain.
fn sealed_status(
    store: Option<&SealedStore>,
    config: &Config,
) -> (api::ConfigState, Vec<api::Certificate>) {
    let mut certificates = Vec::new();
    let state = match store {
        None => api::ConfigState {
            sealed_store: false,
            sequence: None,
            key_id: None,
            trusted_keys: Vec::new(),
            encryption_key: None,
        },
        Some(s) => {
            for rec in s.names() {
                if let Some(name) = rec
                    .strip_prefix("tls/")
                    .and_then(|n| n.strip_suffix("/chain"))
                    && let Some(pem) = s.get(&rec)
                {
                    certificates.push(cert_entry(config, name, api::CertSource::Sealed, pem));
                }
            }
            config_state(s)
        }
    };
    for c in &config.tls.certificates {
        if let Some(f) = &c.cert_file {
            certificates.push(match std::fs::read(f) {
                Ok(pem) => cert_entry(config, &c.name, api::CertSource::File, &pem),
                Err(e) => api::Certificate {
                    name: c.name.clone(),
                    source: api::CertSource::File,
                    configured: None,
                    mgmt: None,
                    facts: None,
                    error: Some(format!("{}: {e}", f.display())),
                },
            });
        }
    }
    (state, certificates)
}

/// The stored sequence, the key that signed the blob in force, the trusted keys.
fn config_state(s: &SealedStore) -> api::ConfigState {
    let key_id = s
        .get(site::CURRENT)
        .and_then(|b| sealgate_core::blob::decode(b).ok())
        .map(|b| sealgate_core::blob::key_id_hex(&b.header().key_id));
    api::ConfigState {
        sealed_store: true,
        sequence: site::stored_sequence(s),
        key_id,
        trusted_keys: site::trusted(s)
            .keys()
            .map(sealgate_core::blob::key_id_hex)
            .collect(),
        encryption_key: site::encryption_public(s).map(|k| sealgate_core::hex::encode(&k)),
    }
}

/// One chain: the leaf's facts, or why it does not parse.
fn cert_entry(
    config: &Config,
    name: &str,
    source: api::CertSource,
    pem: &[u8],
) -> api::Certificate {
    let (facts, error) = match sealgate_core::certs::info(pem) {
        Ok(i) => (
            Some(api::CertFacts {
                expires: sealgate_core::certs::rfc3339(i.not_after),
                expired: i.not_after < unix_now(),
                subject: i.subject,
                issuer: i.issuer,
                sans: i.sans,
                not_before: i.not_before,
                not_after: i.not_after,
                sha256: i.sha256,
                chain_len: i.chain_len as u64,
            }),
            None,
        ),
        Err(e) => (None, Some(e.to_string())),
    };
    api::Certificate {
        name: name.to_string(),
        source,
        configured: Some(config.tls.certificates.iter().any(|c| c.name == name)),
        mgmt: Some(config.mgmt.certificate == name),
        facts,
        error,
    }
}

/// The daemon's resident set size (`VmRSS` of /proc/self/status), if readable.
fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn queue_items_are_the_queue_listing() {
        use sealgate_core::delivery::{Source, Status};
        let status = |text: &str, source| Status::transient(source, 4, 4, text);
        let m = QueuedMessage {
            id: "X1".into(),
            mail_from: String::new(),
            recipients: vec![
                Recipient {
                    address: "a@b.test".into(),
                    status: RcptStatus::Pending,
                    last_error: Some(status("no route", Source::Dns)),
                },
                Recipient {
                    address: "c@d.test".into(),
                    status: RcptStatus::Delivered(status("ok", Source::Remote)),
                    last_error: None,
                },
                Recipient {
                    address: "e@f.test".into(),
                    status: RcptStatus::Pending,
                    last_error: None,
                },
            ],
            body_type: Default::default(),
            smtputf8: false,
            arrival: 1,
            size: 2,
            attempts: 3,
            next_attempt: 4,
        };
        assert_eq!(
            serde_json::to_value(queue_message(&m)).unwrap(),
            sealgate_core::queue_list::to_json(&m)
        );
    }
}
