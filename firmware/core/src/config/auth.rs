//! `[auth]` and `[[auth.backend]]`: how mail clients authenticate (F-AUTH), each login domain
//! checked by its backend over TLS whose certificate is verified.

use std::time::Duration;

use super::raw::{RawAuth, RawBackend, RawBinding};
use super::values::{Range, TIMEOUT, days, domain_names, duration_in, host_port, name, unique};
use super::{
    AuthBackend, AuthConfig, BackendKind, BackendTls, CaConfig, ConfigError, SenderBinding,
    SmtpConfig, invalid,
};

/// `auth.cache_ttl`: off (0) up to a day.
const CACHE_TTL: Range = Range {
    min: Duration::ZERO,
    max: days(1),
};

/// `auth.fail_delay` and `auth.max_fail_delay`: 0 to 10 minutes.
const FAIL_DELAY: Range = Range {
    min: Duration::ZERO,
    max: Duration::from_secs(600),
};

/// `auth.backend[].timeout`: 1 second to 5 minutes.
const BACKEND_TIMEOUT: Range = Range {
    min: Duration::from_secs(1),
    max: Duration::from_secs(300),
};

pub(super) fn check(
    a: &RawAuth,
    smtp: &SmtpConfig,
    cas: &[CaConfig],
) -> Result<AuthConfig, ConfigError> {
    let backends = a
        .backend
        .iter()
        .enumerate()
        .map(|(i, b)| backend(i, b, cas))
        .collect::<Result<Vec<_>, _>>()?;
    domains_once(&backends)?;
    if backends.is_empty() && !smtp.submission.is_empty() {
        return Err(invalid(
            "smtp.submission",
            "a submission listener needs at least one [[auth.backend]] to check logins",
        ));
    }
    let fail_delay = duration_in(
        "auth.fail_delay",
        a.fail_delay.as_deref(),
        Duration::from_secs(1),
        FAIL_DELAY,
    )?;
    let max_fail_delay = duration_in(
        "auth.max_fail_delay",
        a.max_fail_delay.as_deref(),
        Duration::from_secs(30),
        FAIL_DELAY,
    )?;
    if max_fail_delay < fail_delay {
        return Err(invalid(
            "auth.max_fail_delay",
            "must not be shorter than auth.fail_delay",
        ));
    }
    Ok(AuthConfig {
        sender_binding: sender_binding(a.sender_must_match.as_ref())?,
        cache_ttl: duration_in(
            "auth.cache_ttl",
            a.cache_ttl.as_deref(),
            Duration::from_secs(300),
            CACHE_TTL,
        )?,
        fail_delay,
        max_fail_delay,
        lockout_after: match a.lockout_after.unwrap_or(10) {
            n @ 1..=1000 => n,
            _ => return Err(invalid("auth.lockout_after", "must be 1 to 1000")),
        },
        lockout_time: duration_in(
            "auth.lockout_time",
            a.lockout_time.as_deref(),
            Duration::from_secs(900),
            TIMEOUT,
        )?,
        max_checks: match a.max_checks.unwrap_or(16) {
            n @ 1..=1024 => n,
            _ => return Err(invalid("auth.max_checks", "must be 1 to 1024")),
        },
        on_listen: a.on_listen.unwrap_or(false),
        backends,
    })
}

/// `sender_must_match`: `true` (the login itself), `"domain"`, `false` (default).
fn sender_binding(v: Option<&RawBinding>) -> Result<SenderBinding, ConfigError> {
    match v {
        None | Some(RawBinding::Flag(false)) => Ok(SenderBinding::Off),
        Some(RawBinding::Flag(true)) => Ok(SenderBinding::Address),
        Some(RawBinding::Word(w)) if w == "address" => Ok(SenderBinding::Address),
        Some(RawBinding::Word(w)) if w == "domain" => Ok(SenderBinding::Domain),
        Some(RawBinding::Word(w)) => Err(invalid(
            "auth.sender_must_match",
            format!("{w:?}: use true, false, \"address\" or \"domain\""),
        )),
    }
}

/// One `[[auth.backend]]`.
fn backend(i: usize, b: &RawBackend, cas: &[CaConfig]) -> Result<AuthBackend, ConfigError> {
    let key = |k: &str| format!("auth.backend[{i}].{k}");
    name(key("name"), &b.name)?;
    let kind = match b.kind.as_str() {
        "ldap" => BackendKind::Ldap,
        "imap" => BackendKind::Imap,
        "pop3" => BackendKind::Pop3,
        "smtp" => BackendKind::Smtp,
        other => {
            return Err(invalid(
                key("kind"),
                format!("{other:?}: use ldap, imap, pop3 or smtp"),
            ));
        }
    };
    let (tls, host, port) = url(&key("url"), kind, &b.url, b.starttls)?;
    if let Some(ca) = &b.ca
        && !cas.iter().any(|c| &c.name == ca)
    {
        return Err(invalid(key("ca"), format!("no [[tls.ca]] named {ca:?}")));
    }
    let tls_name = match &b.tls_name {
        Some(n) => super::values::domain_name(&key("tls_name"), n)?,
        None => host.clone(),
    };
    let domains = domain_names(&key("domains"), &b.domains)?;
    if domains.is_empty() {
        return Err(invalid(key("domains"), "name the login domains it checks"));
    }
    let login = template(&key("login"), b.login.as_deref().unwrap_or("{address}"))?;
    let bind_dn = match (kind, &b.bind_dn) {
        (BackendKind::Ldap, Some(t)) => Some(template(&key("bind_dn"), t)?),
        (BackendKind::Ldap, None) => {
            return Err(invalid(
                key("bind_dn"),
                "an ldap backend needs a DN template, e.g. \"uid={user},ou=people,dc=example,dc=com\"",
            ));
        }
        (_, Some(_)) => return Err(invalid(key("bind_dn"), "only for kind = \"ldap\"")),
        (_, None) => None,
    };
    Ok(AuthBackend {
        name: b.name.clone(),
        kind,
        tls,
        host,
        port,
        ca: b.ca.clone(),
        tls_name,
        domains,
        timeout: duration_in(
            &key("timeout"),
            b.timeout.as_deref(),
            Duration::from_secs(10),
            BACKEND_TIMEOUT,
        )?,
        bind_dn,
        login,
    })
}

/// `scheme://host[:port][/]`: the scheme fits the kind; a plaintext scheme needs
/// `starttls = true` (no password ever crosses a network in the clear).
fn url(
    key: &str,
    kind: BackendKind,
    url: &str,
    starttls: Option<bool>,
) -> Result<(BackendTls, String, u16), ConfigError> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| invalid(key, format!("{url:?} is not scheme://host[:port]")))?;
    let scheme = scheme.to_ascii_lowercase();
    let (plain, implicit, plain_port, implicit_port) = match kind {
        BackendKind::Ldap => ("ldap", "ldaps", 389, 636),
        BackendKind::Imap => ("imap", "imaps", 143, 993),
        BackendKind::Pop3 => ("pop3", "pop3s", 110, 995),
        BackendKind::Smtp => ("smtp", "smtps", 587, 465),
    };
    let (tls, default_port) = match (scheme.as_str(), starttls) {
        (s, None | Some(false)) if s == implicit => (BackendTls::Implicit, implicit_port),
        (s, Some(true)) if s == plain => (BackendTls::StartTls, plain_port),
        (s, Some(true)) if s == implicit => {
            return Err(invalid(
                key,
                format!("{implicit}:// is TLS already: drop starttls"),
            ));
        }
        (s, _) if s == plain => {
            return Err(invalid(
                key,
                format!(
                    "{plain}:// without starttls = true would send passwords in plaintext; \
                     set starttls = true or use {implicit}://"
                ),
            ));
        }
        _ => {
            return Err(invalid(
                key,
                format!("{scheme:?}: a {kind:?} backend takes {implicit}:// or {plain}://"),
            ));
        }
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains(['/', '?', '#', '@']) {
        return Err(invalid(key, format!("{url:?}: only scheme://host[:port]")));
    }
    let has_port = authority.rsplit_once(':').is_some_and(|(h, p)| {
        !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(':')
    });
    let with_port = if has_port {
        authority.to_owned()
    } else {
        format!("{authority}:{default_port}")
    };
    let (host, port) = host_port(key, &with_port)?;
    Ok((tls, host, port))
}

/// A template of `{user}`, `{address}` and `{domain}`.
fn template(key: &str, t: &str) -> Result<String, ConfigError> {
    crate::auth::check_template(t).map_err(|e| invalid(key, format!("{t:?}: {e}")))?;
    Ok(t.to_owned())
}

/// Each login domain is checked by one backend only.
fn domains_once(backends: &[AuthBackend]) -> Result<(), ConfigError> {
    for (i, b) in backends.iter().enumerate() {
        let earlier: Vec<&str> = backends
            .iter()
            .take(i)
            .flat_map(|e| e.domains.iter().map(String::as_str))
            .collect();
        for d in &b.domains {
            unique(
                format!("auth.backend[{i}].domains"),
                d,
                earlier.iter().copied(),
            )?;
        }
    }
    Ok(())
}
