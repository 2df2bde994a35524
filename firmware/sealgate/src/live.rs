//! The running configuration: the checked config with the TLS material built from it, swapped
//! as one snapshot when a new config is applied. Every SMTP session and delivery attempt takes
//! the snapshot current when it starts and keeps it to its end, so applying a config never
//! changes a session midway and never drops one; new sessions get the new config and
//! certificates.
//!
//! Fixed at start (a restart applies changes to them): the listener addresses, the global
//! connection and delivery caps (their semaphores), and the DNS resolver.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use sealgate_proto::server::{ServerLimits, ServerParams};

use crate::tls::client::ClientTls;
use crate::tls::{ServerTls, TlsError};
use sealgate_core::config::Config;
use sealgate_core::secrets::SecretValue;

/// One consistent view of the configuration.
#[derive(Debug)]
pub struct Snapshot {
    pub config: Arc<Config>,
    /// The server session machine's parameters derived from `config`.
    pub params: Arc<ServerParams>,
    /// `None` when no certificate is installed (no STARTTLS, implicit TLS refused).
    pub server_tls: Option<Arc<ServerTls>>,
    pub client_tls: Arc<ClientTls>,
    /// The secrets the config names (F-SECRETS), from the sealed store or the blob applied.
    pub secrets: Arc<BTreeMap<String, SecretValue>>,
}

impl Snapshot {
    /// Builds the TLS material of `config`; fails, changing nothing, when a certificate or CA
    /// it names cannot be loaded.
    pub fn build(config: Config, server_tls: Option<ServerTls>) -> Result<Snapshot, TlsError> {
        let client_tls = ClientTls::load(&config, server_tls.as_ref())?;
        let s = &config.smtp;
        let params = ServerParams {
            hostname: config.hostname.clone(),
            limits: ServerLimits {
                max_message_bytes: s.max_message_bytes,
                max_recipients: s.max_recipients,
                max_errors: s.max_errors,
                command_timeout: s.command_timeout,
                data_timeout: s.data_timeout,
                ..Default::default()
            },
            local_domains: s.local_domains.clone(),
            sender_binding: config.auth.sender_binding,
            validated_domains: config.recipients.iter().map(|r| r.domain.clone()).collect(),
        };
        Ok(Snapshot {
            config: Arc::new(config),
            params: Arc::new(params),
            server_tls: server_tls.map(Arc::new),
            client_tls: Arc::new(client_tls),
            secrets: Arc::new(BTreeMap::new()),
        })
    }

    /// The snapshot with the secrets its config names.
    pub fn with_secrets(mut self, secrets: BTreeMap<String, SecretValue>) -> Snapshot {
        self.secrets = Arc::new(secrets);
        self
    }
}

/// The current snapshot, replaced whole.
#[derive(Debug)]
pub struct Live {
    current: RwLock<Arc<Snapshot>>,
}

impl Live {
    pub fn new(snapshot: Snapshot) -> Live {
        Live {
            current: RwLock::new(Arc::new(snapshot)),
        }
    }

    /// The snapshot in force now.
    pub fn get(&self) -> Arc<Snapshot> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Makes `snapshot` current for everything that starts from now on.
    pub fn set(&self, snapshot: Snapshot) {
        let new = Arc::new(snapshot);
        match self.current.write() {
            Ok(mut g) => *g = new,
            Err(poisoned) => *poisoned.into_inner() = new,
        }
    }
}
