//! `[auth]` and `[[auth.backend]]`: how mail clients authenticate (F-AUTH), each login domain
//! checked by its backend over TLS whose certificate is verified.

use std::time::Duration;

use super::raw::{RawAuth, RawBackend, RawBinding, RawRecipients, RawSecretRef};
use super::values::{Range, TIMEOUT, days, domain_names, duration_in, host_port, name, unique};
use super::{
    AuthBackend, AuthConfig, BackendKind, BackendTls, CaConfig, ConfigError, LdapSearch,
    RecipientCheck, SecretRef, SenderBinding, ServiceAccount, SmtpConfig, invalid,
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
    recipients: &[RawRecipients],
) -> Result<AuthConfig, ConfigError> {
    let backends = a
        .backend
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let for_recipients = recipients.iter().any(|r| r.backend == b.name);
            backend(i, b, cas, for_recipients)
        })
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

/// One `[[auth.backend]]`; one that `[[recipients]]` uses may check no logins (no `domains`).
fn backend(
    i: usize,
    b: &RawBackend,
    cas: &[CaConfig],
    for_recipients: bool,
) -> Result<AuthBackend, ConfigError> {
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
    let directory_only = kind == BackendKind::Ldap && for_recipients;
    if domains.is_empty() && !directory_only {
        return Err(invalid(key("domains"), "name the login domains it checks"));
    }
    let login = template(&key("login"), b.login.as_deref().unwrap_or("{address}"))?;
    let (bind_dn, search) = ldap_mode(&key, kind, b, domains.is_empty())?;
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
        search,
        login,
    })
}

/// How an `ldap` backend checks a login: a direct bind (`bind_dn`) or search-then-bind
/// (`search_base`, `search_filter`, optionally a service account).
fn ldap_mode(
    key: &dyn Fn(&str) -> String,
    kind: BackendKind,
    b: &RawBackend,
    no_logins: bool,
) -> Result<(Option<String>, Option<LdapSearch>), ConfigError> {
    let search_keys = b.search_base.is_some()
        || b.search_filter.is_some()
        || b.service_dn.is_some()
        || b.service_password.is_some();
    if kind != BackendKind::Ldap {
        if b.bind_dn.is_some() {
            return Err(invalid(key("bind_dn"), "only for kind = \"ldap\""));
        }
        if search_keys {
            return Err(invalid(key("search_base"), "only for kind = \"ldap\""));
        }
        return Ok((None, None));
    }
    match (&b.bind_dn, &b.search_base) {
        (Some(_), Some(_)) => Err(invalid(
            key("search_base"),
            "give bind_dn (direct bind) or search_base (search-then-bind), not both",
        )),
        (Some(t), None) if !search_keys => Ok((Some(template(&key("bind_dn"), t)?), None)),
        (Some(_), None) => Err(invalid(
            key("search_filter"),
            "search_filter, service_dn and service_password belong to search-then-bind \
             (search_base), not to a direct bind",
        )),
        (None, Some(base)) => {
            let filter = b.search_filter.as_deref().unwrap_or("(mail={address})");
            let search = ldap_search(
                key,
                base,
                filter,
                b.service_dn.as_deref(),
                b.service_password.as_ref(),
                "search_filter",
            )?;
            Ok((None, Some(search)))
        }
        (None, None) if no_logins && !search_keys => Ok((None, None)),
        (None, None) => Err(invalid(
            key("bind_dn"),
            "an ldap backend needs a DN template, e.g. \"uid={user},ou=people,dc=example,dc=com\", \
             or search_base (search-then-bind)",
        )),
    }
}

/// A search: base DN, filter template (`filter_key` names it), and the service account.
fn ldap_search(
    key: &dyn Fn(&str) -> String,
    base: &str,
    filter: &str,
    service_dn: Option<&str>,
    service_password: Option<&RawSecretRef>,
    filter_key: &str,
) -> Result<LdapSearch, ConfigError> {
    if base.trim().is_empty() || base.chars().any(char::is_control) || base.len() > 1024 {
        return Err(invalid(
            key("search_base"),
            "a DN, e.g. \"dc=example,dc=com\"",
        ));
    }
    let filter = template(&key(filter_key), filter)?;
    if !balanced_filter(&filter) {
        return Err(invalid(
            key(filter_key),
            format!("{filter:?}: an LDAP filter in parentheses, e.g. \"(mail={{address}})\""),
        ));
    }
    let service = match (service_dn, service_password) {
        (None, None) => None,
        (Some(dn), Some(p)) => {
            if dn.trim().is_empty() || dn.chars().any(char::is_control) {
                return Err(invalid(key("service_dn"), "a DN"));
            }
            let k = key("service_password");
            crate::secrets::check_name(&p.secret).map_err(|e| invalid(&k, e.to_string()))?;
            Some(ServiceAccount {
                dn: dn.to_owned(),
                password: SecretRef {
                    name: p.secret.clone(),
                    key: k,
                },
            })
        }
        (Some(_), None) => {
            return Err(invalid(
                key("service_password"),
                "service_dn needs service_password = { secret = \"NAME\" } (sealctl config sign --secret)",
            ));
        }
        (None, Some(_)) => {
            return Err(invalid(
                key("service_dn"),
                "service_password needs service_dn",
            ));
        }
    };
    Ok(LdapSearch {
        base: base.to_owned(),
        filter,
        service,
    })
}

/// `( … )` with balanced parentheses and no controls: what an LDAP server can parse at all.
fn balanced_filter(f: &str) -> bool {
    if !f.starts_with('(') || !f.ends_with(')') || f.chars().any(char::is_control) {
        return false;
    }
    let mut depth = 0usize;
    for (i, c) in f.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth = match depth.checked_sub(1) {
                    Some(d) => d,
                    None => return false,
                };
                if depth == 0 && i + 1 != f.len() {
                    return false;
                }
            }
            _ => {}
        }
    }
    depth == 0
}

/// `positive_ttl` / `negative_ttl`: off (0) up to a day.
const LOOKUP_TTL: Range = Range {
    min: Duration::ZERO,
    max: days(1),
};

/// `[[recipients]]`: each names a local domain (once) and an `ldap` backend.
pub(super) fn recipients(
    raw: &[RawRecipients],
    smtp: &SmtpConfig,
    auth: &AuthConfig,
) -> Result<Vec<RecipientCheck>, ConfigError> {
    let mut out: Vec<RecipientCheck> = Vec::with_capacity(raw.len());
    for (i, r) in raw.iter().enumerate() {
        let key = |k: &str| format!("recipients[{i}].{k}");
        let domain = super::values::domain_name(&key("domain"), &r.domain)?;
        if !smtp.local_domains.contains(&domain) {
            return Err(invalid(
                key("domain"),
                format!("{domain} is not in smtp.local_domains"),
            ));
        }
        unique(
            key("domain"),
            &domain,
            out.iter().map(|c| c.domain.as_str()),
        )?;
        match auth.backends.iter().find(|b| b.name == r.backend) {
            Some(b) if b.kind == BackendKind::Ldap => {}
            Some(_) => {
                return Err(invalid(
                    key("backend"),
                    format!("{:?} is not an ldap backend", r.backend),
                ));
            }
            None => {
                return Err(invalid(
                    key("backend"),
                    format!("no [[auth.backend]] named {:?}", r.backend),
                ));
            }
        }
        let filter = r.filter.as_deref().unwrap_or("(mail={address})");
        let search = ldap_search(
            &key,
            &r.search_base,
            filter,
            r.service_dn.as_deref(),
            r.service_password.as_ref(),
            "filter",
        )?;
        let accept_when_unavailable = match r.on_unavailable.as_deref() {
            None | Some("tempfail") => false,
            Some("accept") => true,
            Some(other) => {
                return Err(invalid(
                    key("on_unavailable"),
                    format!("{other:?}: use \"tempfail\" or \"accept\""),
                ));
            }
        };
        let ttl = |k: &str, v: &Option<String>, d: u64| {
            duration_in(&key(k), v.as_deref(), Duration::from_secs(d), LOOKUP_TTL)
        };
        out.push(RecipientCheck {
            domain,
            backend: r.backend.clone(),
            search,
            accept_when_unavailable,
            positive_ttl: ttl("positive_ttl", &r.positive_ttl, 600)?,
            negative_ttl: ttl("negative_ttl", &r.negative_ttl, 120)?,
            max_cached: match r.max_cached.unwrap_or(10_000) {
                n @ 0..=1_000_000 => n,
                _ => return Err(invalid(key("max_cached"), "must be 0 to 1000000")),
            },
        });
    }
    Ok(out)
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
