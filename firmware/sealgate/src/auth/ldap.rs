//! The `ldap` backend over LDAPS or LDAP + StartTLS (ldap3 on our verifying rustls
//! configuration): a login checked by a direct bind (`bind_dn`) or by search-then-bind (the
//! user's entry found with a service account or anonymously, then bound as), and recipients
//! looked up for F-RCPT. Every value put into a DN or filter is escaped (RFC 4514, RFC 4515).

use std::collections::BTreeMap;
use std::sync::Arc;

use ldap3::adapters::EntriesOnly;
use ldap3::{Ldap, LdapConnAsync, LdapConnSettings, Scope, SearchEntry, SearchOptions};
use rustls::ClientConfig;
use sealgate_core::auth::{escape_dn_value, escape_filter_value, expand_template};
use sealgate_core::config::{AuthBackend, BackendTls, LdapSearch};
use sealgate_core::secrets::SecretValue;
use sealgate_proto::sasl::Password;

use super::Answer;

/// LDAP's `invalidCredentials` (RFC 4511 §4.1.9).
const INVALID_CREDENTIALS: u32 = 49;

/// LDAP's `sizeLimitExceeded`: more entries matched than asked for.
const SIZE_LIMIT_EXCEEDED: u32 = 4;

/// Entries a search reads at most: one is the answer, two say the filter is ambiguous.
const MAX_ENTRIES: usize = 2;

/// The values a template is expanded with.
pub(super) struct Names<'a> {
    pub user: &'a str,
    pub address: &'a str,
    pub domain: &'a str,
}

/// Checks `password` for a login of `b`'s domains.
pub(super) async fn check(
    b: &AuthBackend,
    tls: Arc<ClientConfig>,
    names: &Names<'_>,
    password: &Password,
    secrets: &BTreeMap<String, SecretValue>,
) -> Answer {
    let Ok(password) = std::str::from_utf8(password.expose()) else {
        return Answer::Rejected("the password is not UTF-8 (LDAP needs it)");
    };
    if password.is_empty() {
        // An empty password would be an unauthenticated bind (RFC 4513 §5.1.2): success
        // that proves nothing.
        return Answer::Rejected("empty password");
    }
    let mut ldap = match connect(b, tls).await {
        Ok(l) => l,
        Err(e) => return Answer::Unavailable(e),
    };
    let answer = bind_user(&mut ldap, b, names, password, secrets).await;
    let _ = ldap.unbind().await;
    answer
}

async fn bind_user(
    ldap: &mut Ldap,
    b: &AuthBackend,
    names: &Names<'_>,
    password: &str,
    secrets: &BTreeMap<String, SecretValue>,
) -> Answer {
    let dn = match (&b.bind_dn, &b.search) {
        // Each value RFC 4514-escaped: a login cannot add RDNs or change the DN's shape.
        (Some(t), _) => {
            expand_template(t, names.user, names.address, names.domain, escape_dn_value)
        }
        (None, Some(search)) => match find(ldap, search, names, secrets).await {
            Ok(Found::One(dn)) => dn,
            Ok(Found::None) => return Answer::Rejected("no directory entry for the login"),
            Ok(Found::Many) => return Answer::Rejected("the login matches more than one entry"),
            Err(e) => return Answer::Unavailable(e),
        },
        (None, None) => return Answer::Unavailable("the backend checks no logins".into()),
    };
    match ldap.simple_bind(&dn, password).await {
        Ok(r) if r.rc == 0 => Answer::Accepted,
        Ok(r) if r.rc == INVALID_CREDENTIALS => Answer::Rejected("invalid credentials"),
        Ok(r) => Answer::Unavailable(format!("bind result {}", r.rc)),
        Err(e) => Answer::Unavailable(format!("bind: {e}")),
    }
}

/// What a recipient lookup found.
#[derive(Debug)]
pub(super) enum Lookup {
    Exists,
    Unknown,
    Unavailable(String),
}

/// Looks `names.address` up with `search` on `b`'s server (F-RCPT).
pub(super) async fn lookup(
    b: &AuthBackend,
    tls: Arc<ClientConfig>,
    search: &LdapSearch,
    names: &Names<'_>,
    secrets: &BTreeMap<String, SecretValue>,
) -> Lookup {
    let mut ldap = match connect(b, tls).await {
        Ok(l) => l,
        Err(e) => return Lookup::Unavailable(e),
    };
    let found = find(&mut ldap, search, names, secrets).await;
    let _ = ldap.unbind().await;
    match found {
        Ok(Found::None) => Lookup::Unknown,
        Ok(Found::One(_) | Found::Many) => Lookup::Exists,
        Err(e) => Lookup::Unavailable(e),
    }
}

enum Found {
    None,
    One(String),
    Many,
}

/// Binds as the service account (if any), then searches the subtree with the expanded
/// filter, reading at most [`MAX_ENTRIES`] entries and no attributes.
async fn find(
    ldap: &mut Ldap,
    search: &LdapSearch,
    names: &Names<'_>,
    secrets: &BTreeMap<String, SecretValue>,
) -> Result<Found, String> {
    if let Some(account) = &search.service {
        let password = secrets
            .get(&account.password.name)
            .and_then(|v| std::str::from_utf8(v.expose()).ok())
            .ok_or_else(|| format!("secret {:?} missing or not UTF-8", account.password.name))?;
        match ldap.simple_bind(&account.dn, password).await {
            Ok(r) if r.rc == 0 => {}
            Ok(r) => return Err(format!("service account bind result {}", r.rc)),
            Err(e) => return Err(format!("service account bind: {e}")),
        }
    }
    // RFC 4515-escaped: `*)(uid=*` in an address is text to match, not filter syntax.
    let filter = expand_template(
        &search.filter,
        names.user,
        names.address,
        names.domain,
        escape_filter_value,
    );
    let limit = i32::try_from(MAX_ENTRIES).unwrap_or(i32::MAX);
    let mut stream = ldap
        .with_search_options(SearchOptions::new().sizelimit(limit))
        .streaming_search_with(
            EntriesOnly::new(),
            &search.base,
            Scope::Subtree,
            &filter,
            vec!["1.1"],
        )
        .await
        .map_err(|e| format!("search: {e}"))?;
    let mut dns = Vec::new();
    while dns.len() < MAX_ENTRIES {
        match stream.next().await {
            Ok(Some(entry)) => dns.push(SearchEntry::construct(entry).dn),
            Ok(None) => break,
            Err(e) => return Err(format!("search: {e}")),
        }
    }
    if dns.len() < MAX_ENTRIES {
        let done = stream.finish().await;
        if done.rc != 0 && done.rc != SIZE_LIMIT_EXCEEDED {
            return Err(format!("search result {} {}", done.rc, done.text));
        }
    }
    Ok(match dns.len() {
        0 => Found::None,
        1 => Found::One(dns.remove(0)),
        _ => Found::Many,
    })
}

/// A connection to `b` with TLS up (LDAPS, or StartTLS before anything else).
async fn connect(b: &AuthBackend, tls: Arc<ClientConfig>) -> Result<Ldap, String> {
    let (scheme, starttls) = match b.tls {
        BackendTls::Implicit => ("ldaps", false),
        BackendTls::StartTls => ("ldap", true),
    };
    let host = match b.host.parse::<std::net::Ipv6Addr>() {
        Ok(_) => format!("[{}]", b.host),
        Err(_) => b.host.clone(),
    };
    let url = format!("{scheme}://{host}:{}", b.port);
    // Our own socket, for TCP_NODELAY: an LDAP request goes out in more than one write, and
    // with Nagle's algorithm against the server's delayed ACK every bind or search waited
    // ~40 ms (measured with tools/bench/auth: 45 ms per LDAPS login, 12 ms per POP3S one).
    let tcp = tokio::time::timeout(
        b.timeout,
        tokio::net::TcpStream::connect((b.host.as_str(), b.port)),
    )
    .await
    .map_err(|_| format!("connect: no connection within {:?}", b.timeout))?
    .and_then(|s| {
        s.set_nodelay(true)?;
        s.into_std()
    })
    .map_err(|e| format!("connect: {e}"))?;
    let settings = LdapConnSettings::new()
        .set_conn_timeout(b.timeout)
        .set_config(tls)
        .set_starttls(starttls)
        .set_std_stream(ldap3::StdStream::Tcp(tcp));
    let (conn, ldap) = LdapConnAsync::with_settings(settings, &url)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    ldap3::drive!(conn);
    Ok(ldap)
}
