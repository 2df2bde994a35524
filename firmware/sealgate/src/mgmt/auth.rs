//! Who may use the management API: pinned admin client certificates, bearer tokens by their
//! SHA-256 (compared in constant time), the dev board's token file, first contact. The rules
//! are pure ([`authorize`]); [`Mgmt::authenticate`] feeds them a request and the credentials in
//! force, and the router's admission middleware calls it.

use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use axum::extract::Request;
use axum::http::{HeaderMap, StatusCode, header};
use ring::{digest, hmac};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use super::error::ApiError;
use super::routes::ConnInfo;
use super::{Mgmt, TOKEN_FILE};

/// How a request was authorised (carried on its response for the request log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    /// A pinned admin client certificate.
    Certificate,
    /// A bearer token whose SHA-256 is in `mgmt.admin_token_sha256`.
    Token,
    /// The dev board's `STATE/mgmt-token` (no credentials configured).
    DevToken,
    /// No credential exists anywhere: a config push, authorised by its HQ signature.
    FirstContact,
    /// `GET /api/v1/health`, which needs none.
    Anonymous,
}

impl Auth {
    pub fn name(self) -> &'static str {
        match self {
            Auth::Certificate => "certificate",
            Auth::Token => "token",
            Auth::DevToken => "dev-token",
            Auth::FirstContact => "first-contact",
            Auth::Anonymous => "anonymous",
        }
    }
}

/// Accepted bearer tokens, kept as HMAC tags of their SHA-256 under a per-process key, so that
/// each comparison is ring's constant-time tag check.
#[derive(Debug)]
pub struct TokenSet {
    key: hmac::Key,
}

impl TokenSet {
    pub fn new() -> Result<TokenSet, ring::error::Unspecified> {
        let rng = ring::rand::SystemRandom::new();
        Ok(TokenSet {
            key: hmac::Key::generate(hmac::HMAC_SHA256, &rng)?,
        })
    }

    fn tag(&self, sha256: &[u8; 32]) -> hmac::Tag {
        hmac::sign(&self.key, sha256)
    }

    /// Whether SHA-256(`token`) equals one of `hashes` (each compared in constant time).
    fn matches(&self, token: &[u8], hashes: &[[u8; 32]]) -> bool {
        let presented = sha256(token);
        let mut any = false;
        for h in hashes {
            any |= hmac::verify(&self.key, &presented, self.tag(h).as_ref()).is_ok();
        }
        any
    }
}

/// What a request presents.
#[derive(Debug, Clone, Copy, Default)]
pub struct Presented<'a> {
    /// SHA-256 of the client certificate (DER), if one was sent.
    pub certificate: Option<&'a [u8; 32]>,
    /// The bearer token, if an `Authorization: Bearer` header was sent.
    pub bearer: Option<&'a [u8]>,
}

/// The credentials in force.
#[derive(Debug, Clone, Copy)]
pub struct Credentials<'a> {
    /// `mgmt.admin_certificates` and the image's baked admin certificates.
    pub pins: &'a [[u8; 32]],
    /// `mgmt.admin_token_sha256`.
    pub tokens: &'a [[u8; 32]],
    /// SHA-256 of the dev board's token (offered only while nothing above is configured).
    pub dev_token: Option<&'a [u8; 32]>,
}

impl Credentials<'_> {
    fn configured(&self) -> bool {
        !self.pins.is_empty() || !self.tokens.is_empty()
    }
}

/// Decides whether a request may proceed; `config_push` says it is `PUT /api/v1/config`.
pub fn authorize(
    creds: &Credentials<'_>,
    tokens: &TokenSet,
    p: &Presented<'_>,
    config_push: bool,
) -> Result<Auth, ApiError> {
    let denied = |why: String| ApiError::new(StatusCode::UNAUTHORIZED, "auth", why);
    if let Some(c) = p.certificate
        && creds.pins.contains(c)
    {
        return Ok(Auth::Certificate);
    }
    let dev = creds.dev_token.filter(|_| !creds.configured());
    if let Some(t) = p.bearer {
        if tokens.matches(t, creds.tokens) {
            return Ok(Auth::Token);
        }
        if let Some(d) = dev
            && tokens.matches(t, std::slice::from_ref(d))
        {
            return Ok(Auth::DevToken);
        }
    }
    if !creds.configured() && dev.is_none() {
        return if config_push {
            Ok(Auth::FirstContact)
        } else {
            Err(denied(
                "no admin credential is configured yet: only PUT /api/v1/config (a blob signed \
                 by HQ) is accepted; it can pin admin certificates or tokens"
                    .into(),
            ))
        };
    }
    Err(denied(match (p.bearer, p.certificate) {
        (Some(_), _) => "the bearer token is not accepted".into(),
        (None, Some(c)) => format!(
            "client certificate {} is not a pinned admin certificate",
            hex(c)
        ),
        (None, None) => "authentication required: a pinned admin client certificate or an \
             Authorization: Bearer token"
            .into(),
    }))
}

/// The bearer token of an `Authorization` header, if there is one; any other scheme is
/// refused.
fn bearer(headers: &HeaderMap) -> Result<Option<&[u8]>, ApiError> {
    let Some(v) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let v = v.as_bytes();
    let token = match (v.get(..7), v.get(7..)) {
        (Some(scheme), Some(rest)) if scheme.eq_ignore_ascii_case(b"bearer ") => rest.trim_ascii(),
        _ => &[][..],
    };
    if token.is_empty() {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "auth",
            "Authorization header: only \"Bearer TOKEN\" is understood",
        ));
    }
    Ok(Some(token))
}

impl Mgmt {
    /// Whether `req` may proceed, by the credentials of the running config (a pushed config
    /// that changes `[mgmt]` applies to the next request) and the connection's client
    /// certificate; `config_push`: the request is `PUT /api/v1/config`.
    pub(super) fn authenticate(&self, req: &Request, config_push: bool) -> Result<Auth, ApiError> {
        let config = self.live.get().config.clone();
        let mut pins = config.mgmt.admin_certificates.clone();
        pins.extend_from_slice(&self.baked_pins);
        let creds = Credentials {
            pins: &pins,
            tokens: &config.mgmt.admin_token_sha256,
            dev_token: self.dev_token.as_ref(),
        };
        let presented = Presented {
            certificate: req
                .extensions()
                .get::<ConnInfo>()
                .and_then(|c| c.certificate.as_ref()),
            bearer: bearer(req.headers())?,
        };
        authorize(&creds, &self.tokens, &presented, config_push)
    }
}

impl Mgmt {
    /// Whether `pin` (SHA-256 of a client certificate) is an admin's: pinned in the running
    /// config or baked into the image.
    pub(super) fn is_admin_certificate(&self, pin: &[u8; 32]) -> bool {
        self.live.get().config.mgmt.admin_certificates.contains(pin)
            || self.baked_pins.contains(pin)
    }
}

/// The dev board's token: read from `STATE/mgmt-token`, or made there (0600) on first use.
/// Returns its SHA-256; the token itself is never logged.
pub(super) fn dev_token(state_dir: &Path) -> io::Result<[u8; 32]> {
    let path = state_dir.join(TOKEN_FILE);
    match std::fs::read(&path) {
        Ok(t) if !t.trim_ascii().is_empty() => return Ok(sha256(t.trim_ascii())),
        Ok(_) => std::fs::remove_file(&path)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut raw = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
        .map_err(|_| io::Error::other("no random bytes"))?;
    let token = hex(&raw);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    f.write_all(token.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    tracing::info!(file = %path.display(), "management API: made a dev token (dev board only; accepted while no admin credential is configured)");
    Ok(sha256(token.as_bytes()))
}

/// SHA-256 of every certificate in the PEM files (unreadable files are logged and skipped).
pub fn pins_of_pem_files(files: &[PathBuf]) -> Vec<[u8; 32]> {
    let mut pins = Vec::new();
    for f in files {
        let certs = std::fs::read(f).map(|pem| {
            CertificateDer::pem_slice_iter(&pem)
                .filter_map(Result::ok)
                .map(|c| sha256(&c))
                .collect::<Vec<_>>()
        });
        match certs {
            Ok(c) if !c.is_empty() => pins.extend(c),
            Ok(_) => {
                tracing::warn!(file = %f.display(), "admin certificate file holds no certificate")
            }
            Err(e) => {
                tracing::warn!(file = %f.display(), error = %e, "cannot read an admin certificate")
            }
        }
    }
    pins
}

pub(super) fn sha256(data: &[u8]) -> [u8; 32] {
    let d = digest::digest(&digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

pub(super) fn hex(bytes: &[u8]) -> String {
    sealgate_core::hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorization_rules() {
        let tokens = TokenSet::new().unwrap();
        let pin = [1u8; 32];
        let other = [2u8; 32];
        let tok = sha256(b"good-token");
        let dev = sha256(b"dev-token");
        let creds = |pins: &'static [[u8; 32]], toks: Vec<[u8; 32]>, dev: Option<[u8; 32]>| {
            (pins, toks, dev)
        };
        #[allow(clippy::type_complexity)]
        let cases: Vec<(
            (&[[u8; 32]], Vec<[u8; 32]>, Option<[u8; 32]>),
            Option<[u8; 32]>,
            Option<&[u8]>,
            bool,
            Result<Auth, &str>,
        )> = vec![
            // pinned certificate, with or without a token
            (
                creds(&[[1u8; 32]], vec![], None),
                Some(pin),
                None,
                false,
                Ok(Auth::Certificate),
            ),
            (
                creds(&[[1u8; 32]], vec![], None),
                Some(other),
                None,
                false,
                Err("not a pinned"),
            ),
            (
                creds(&[[1u8; 32]], vec![], None),
                None,
                None,
                false,
                Err("authentication required"),
            ),
            // tokens
            (
                creds(&[], vec![tok], None),
                None,
                Some(b"good-token"),
                false,
                Ok(Auth::Token),
            ),
            (
                creds(&[], vec![tok], None),
                None,
                Some(b"bad-token"),
                false,
                Err("not accepted"),
            ),
            (
                creds(&[], vec![tok], None),
                Some(other),
                Some(b"good-token"),
                false,
                Ok(Auth::Token),
            ),
            // the dev token only while nothing is configured
            (
                creds(&[], vec![], Some(dev)),
                None,
                Some(b"dev-token"),
                false,
                Ok(Auth::DevToken),
            ),
            (
                creds(&[], vec![tok], Some(dev)),
                None,
                Some(b"dev-token"),
                false,
                Err("not accepted"),
            ),
            (
                creds(&[], vec![], Some(dev)),
                None,
                None,
                true,
                Err("authentication required"),
            ),
            // first contact: config push only
            (
                creds(&[], vec![], None),
                None,
                None,
                true,
                Ok(Auth::FirstContact),
            ),
            (
                creds(&[], vec![], None),
                None,
                Some(b"x"),
                true,
                Ok(Auth::FirstContact),
            ),
            (
                creds(&[], vec![], None),
                None,
                None,
                false,
                Err("only PUT /api/v1/config"),
            ),
            (
                creds(&[[1u8; 32]], vec![], None),
                None,
                None,
                true,
                Err("authentication required"),
            ),
        ];
        for (i, ((pins, toks, dev), cert, bearer, push, want)) in cases.into_iter().enumerate() {
            let c = Credentials {
                pins,
                tokens: &toks,
                dev_token: dev.as_ref(),
            };
            let p = Presented {
                certificate: cert.as_ref(),
                bearer,
            };
            match (authorize(&c, &tokens, &p, push), want) {
                (Ok(a), Ok(w)) => assert_eq!(a, w, "case {i}"),
                (Err(e), Err(w)) => {
                    assert_eq!(e.status, StatusCode::UNAUTHORIZED, "case {i}");
                    assert!(e.error.contains(w), "case {i}: {}", e.error);
                }
                (got, w) => panic!("case {i}: got {got:?}, want {w:?}"),
            }
        }
    }

    #[test]
    fn bearer_header_forms() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), Ok(None));
        for (v, want) in [
            ("Bearer abc", Some(&b"abc"[..])),
            ("bearer  abc ", Some(&b"abc"[..])),
            ("Basic abc", None),
            ("Bearer ", None),
            ("Bearer", None),
        ] {
            h.insert(header::AUTHORIZATION, v.parse().unwrap());
            match want {
                Some(t) => assert_eq!(bearer(&h), Ok(Some(t)), "{v}"),
                None => assert_eq!(bearer(&h).unwrap_err().check, "auth", "{v}"),
            }
        }
    }

    #[test]
    fn dev_token_file_is_private_and_stable() {
        use std::os::unix::fs::PermissionsExt;
        let d = std::env::temp_dir().join(format!("sg-mgmt-token-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let h1 = dev_token(&d).unwrap();
        let meta = std::fs::metadata(d.join(TOKEN_FILE)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let text = std::fs::read_to_string(d.join(TOKEN_FILE)).unwrap();
        assert_eq!(sha256(text.trim().as_bytes()), h1);
        assert_eq!(dev_token(&d).unwrap(), h1, "read back, not remade");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
