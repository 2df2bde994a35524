//! `[mgmt]`: the management API's listeners, served certificate and admin credentials.

use std::net::SocketAddr;

use super::raw::RawMgmt;
use super::values::{name, sha256_list, socket_addrs};
use super::{ConfigError, MgmtConfig, SmtpConfig, invalid};

/// The listeners must not be SMTP listeners of `smtp`.
pub(super) fn check(m: &RawMgmt, smtp: &SmtpConfig) -> Result<MgmtConfig, ConfigError> {
    let listen = m
        .listen
        .as_deref()
        .map(|v| listeners(v, smtp))
        .transpose()?;
    let certificate = m.certificate.as_deref().unwrap_or("default");
    name("mgmt.certificate".to_string(), certificate)?;
    Ok(MgmtConfig {
        listen,
        certificate: certificate.to_string(),
        admin_certificates: sha256_list(
            "mgmt.admin_certificates",
            m.admin_certificates.as_deref(),
        )?,
        admin_token_sha256: sha256_list(
            "mgmt.admin_token_sha256",
            m.admin_token_sha256.as_deref(),
        )?,
    })
}

fn listeners(v: &[String], smtp: &SmtpConfig) -> Result<Vec<SocketAddr>, ConfigError> {
    let addrs = socket_addrs("mgmt.listen", v)?;
    if let Some(a) = addrs
        .iter()
        .find(|a| smtp.listen.contains(a) || smtp.implicit_tls.contains(a))
    {
        return Err(invalid(
            "mgmt.listen",
            format!("{a} is also an SMTP listener"),
        ));
    }
    Ok(addrs)
}
