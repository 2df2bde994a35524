//! The `ldap` backend: a simple bind as the user over LDAPS or LDAP + StartTLS (ldap3 on our
//! verifying rustls configuration).

use std::sync::Arc;

use ldap3::{LdapConnAsync, LdapConnSettings};
use rustls::ClientConfig;
use sealgate_core::auth::{escape_dn_value, expand_template};
use sealgate_core::config::{AuthBackend, BackendTls};
use sealgate_proto::sasl::Password;

use super::Answer;

/// LDAP's `invalidCredentials` (RFC 4511 §4.1.9).
const INVALID_CREDENTIALS: u32 = 49;

pub(super) async fn check(
    b: &AuthBackend,
    tls: Arc<ClientConfig>,
    user: &str,
    login: &str,
    domain: &str,
    password: &Password,
) -> Answer {
    let Some(template) = &b.bind_dn else {
        return Answer::Unavailable("no bind_dn".into());
    };
    let Ok(password) = std::str::from_utf8(password.expose()) else {
        return Answer::Rejected("the password is not UTF-8 (LDAP needs it)");
    };
    // Each value RFC 4514-escaped: a login cannot add RDNs or change the DN's shape.
    let dn = expand_template(template, user, login, domain, escape_dn_value);
    let (scheme, starttls) = match b.tls {
        BackendTls::Implicit => ("ldaps", false),
        BackendTls::StartTls => ("ldap", true),
    };
    let host = match b.host.parse::<std::net::Ipv6Addr>() {
        Ok(_) => format!("[{}]", b.host),
        Err(_) => b.host.clone(),
    };
    let url = format!("{scheme}://{host}:{}", b.port);
    let settings = LdapConnSettings::new()
        .set_conn_timeout(b.timeout)
        .set_config(tls)
        .set_starttls(starttls);
    let (conn, mut ldap) = match LdapConnAsync::with_settings(settings, &url).await {
        Ok(x) => x,
        Err(e) => return Answer::Unavailable(format!("connect: {e}")),
    };
    ldap3::drive!(conn);
    let bound = ldap.simple_bind(&dn, password).await;
    let _ = ldap.unbind().await;
    match bound {
        Ok(r) if r.rc == 0 => Answer::Accepted,
        Ok(r) if r.rc == INVALID_CREDENTIALS => Answer::Rejected("invalid credentials"),
        Ok(r) => Answer::Unavailable(format!("bind result {}", r.rc)),
        Err(e) => Answer::Unavailable(format!("bind: {e}")),
    }
}
