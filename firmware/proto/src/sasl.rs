//! SASL PLAIN and LOGIN (RFC 4616, RFC 4954) on the server side: the exchange after `AUTH`, fed lines, yielding credentials.
//!
//! The server session machine starts an [`Exchange`] for `AUTH mechanism [initial-response]`
//! and feeds it the client's continuation lines; the exchange answers with the next `334`
//! challenge or with the [`Credentials`] to check. Nothing here checks a password: the runtime
//! does, against the login domain's backend.
//!
//! Decisions:
//! - PLAIN's authorization identity must be empty or equal to the authentication identity
//!   (no proxy authorization); identities are UTF-8 without control characters, at most 255
//!   octets (RFC 4616 §2), passwords at most [`MAX_PASSWORD`] octets and never empty.
//! - LOGIN (the de-facto mechanism of older Outlook versions) asks `Username:` then `Password:`;
//!   an initial response to `AUTH LOGIN` is the user name, as clients send it.
//! - `*` cancels (RFC 4954 §4); `=` is an empty initial response.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use zeroize::Zeroizing;

/// Longest `AUTH` command or continuation line, CRLF included (RFC 4954 §4).
pub const MAX_AUTH_LINE: usize = 12288;

/// Longest accepted password, in octets.
pub const MAX_PASSWORD: usize = 1024;

/// Longest authentication identity, in octets (RFC 4616 §2).
pub const MAX_IDENTITY: usize = 255;

/// The mechanisms offered, as the EHLO keyword's argument.
pub const ADVERTISED: &str = "PLAIN LOGIN";

/// `Username:` and `Password:` in base64, LOGIN's two challenges.
const LOGIN_USER: &str = "VXNlcm5hbWU6";
const LOGIN_PASSWORD: &str = "UGFzc3dvcmQ6";

/// A SASL mechanism this server offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    Plain,
    Login,
}

impl Mechanism {
    /// The mechanism named (case-insensitive), if offered.
    pub fn parse(name: &str) -> Option<Mechanism> {
        if name.eq_ignore_ascii_case("PLAIN") {
            Some(Mechanism::Plain)
        } else if name.eq_ignore_ascii_case("LOGIN") {
            Some(Mechanism::Login)
        } else {
            None
        }
    }
}

/// A password, wiped when dropped; its `Debug` form shows no byte of it.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(Zeroizing<Vec<u8>>);

impl Password {
    pub fn new(bytes: Vec<u8>) -> Password {
        Password(Zeroizing::new(bytes))
    }

    /// The password's octets, for the one place that sends them on (over TLS).
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

/// What a client presented: its login (an address, checked by the runtime) and password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub login: String,
    pub password: Password,
}

/// Why an exchange ended without credentials; each maps to its own `501` reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SaslError {
    #[error("Authentication cancelled")]
    Cancelled,
    #[error("Cannot decode response")]
    BadBase64,
    #[error("Authorization identity must be empty or the login")]
    ProxyAuthorization,
    #[error("Malformed authentication response")]
    Malformed,
    #[error("Login or password too long")]
    TooLong,
}

/// The next step of an exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Send `334 <text>` (base64, maybe empty) and feed the client's next line to `respond`.
    Challenge(&'static str),
    /// The exchange is complete: check these.
    Done(Credentials),
}

/// One SASL exchange in progress.
#[derive(Debug)]
pub struct Exchange {
    mechanism: Mechanism,
    /// LOGIN: the user name, once given.
    user: Option<String>,
}

impl Exchange {
    /// Starts `mechanism`; `initial` is the initial response of the `AUTH` line, if any.
    pub fn start(
        mechanism: Mechanism,
        initial: Option<&str>,
    ) -> Result<(Exchange, Progress), SaslError> {
        let mut exchange = Exchange {
            mechanism,
            user: None,
        };
        let progress = match initial {
            None => match mechanism {
                Mechanism::Plain => Progress::Challenge(""),
                Mechanism::Login => Progress::Challenge(LOGIN_USER),
            },
            Some(response) => exchange.respond(response)?,
        };
        Ok((exchange, progress))
    }

    /// The client's response line (without CRLF) to the last challenge.
    pub fn respond(&mut self, line: &str) -> Result<Progress, SaslError> {
        let line = line.trim_ascii();
        if line == "*" {
            return Err(SaslError::Cancelled);
        }
        let decoded = Zeroizing::new(decode(line)?);
        match (self.mechanism, self.user.take()) {
            (Mechanism::Plain, _) => plain(&decoded).map(Progress::Done),
            (Mechanism::Login, None) => {
                self.user = Some(identity(&decoded)?);
                Ok(Progress::Challenge(LOGIN_PASSWORD))
            }
            (Mechanism::Login, Some(login)) => Ok(Progress::Done(Credentials {
                login,
                password: password(&decoded)?,
            })),
        }
    }
}

/// Base64 of a response; `=` is the empty response (RFC 4954 §4).
fn decode(line: &str) -> Result<Vec<u8>, SaslError> {
    if line == "=" {
        return Ok(Vec::new());
    }
    STANDARD.decode(line).map_err(|_| SaslError::BadBase64)
}

/// PLAIN's message: `[authzid] NUL authcid NUL passwd` (RFC 4616 §2).
fn plain(message: &[u8]) -> Result<Credentials, SaslError> {
    let mut parts = message.splitn(3, |&b| b == 0);
    let (Some(authzid), Some(authcid), Some(passwd)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(SaslError::Malformed);
    };
    let login = identity(authcid)?;
    if !authzid.is_empty() && authzid != login.as_bytes() {
        return Err(SaslError::ProxyAuthorization);
    }
    Ok(Credentials {
        login,
        password: password(passwd)?,
    })
}

/// An identity: UTF-8, 1 to [`MAX_IDENTITY`] octets, no control characters or NUL.
fn identity(bytes: &[u8]) -> Result<String, SaslError> {
    if bytes.len() > MAX_IDENTITY {
        return Err(SaslError::TooLong);
    }
    let text = std::str::from_utf8(bytes).map_err(|_| SaslError::Malformed)?;
    if text.is_empty() || text.chars().any(char::is_control) {
        return Err(SaslError::Malformed);
    }
    Ok(text.to_owned())
}

/// A password: 1 to [`MAX_PASSWORD`] octets without NUL (RFC 4616 §2).
fn password(bytes: &[u8]) -> Result<Password, SaslError> {
    if bytes.len() > MAX_PASSWORD {
        return Err(SaslError::TooLong);
    }
    if bytes.is_empty() || bytes.contains(&0) {
        return Err(SaslError::Malformed);
    }
    Ok(Password::new(bytes.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &[u8]) -> String {
        STANDARD.encode(s)
    }

    fn creds(login: &str, password: &str) -> Progress {
        Progress::Done(Credentials {
            login: login.into(),
            password: Password::new(password.as_bytes().to_vec()),
        })
    }

    #[test]
    fn plain_with_and_without_initial_response() {
        let ir = b64(b"\0alice@a.test\0s3cret");
        let (_, p) = Exchange::start(Mechanism::Plain, Some(&ir)).expect("ok");
        assert_eq!(p, creds("alice@a.test", "s3cret"));
        let (mut e, p) = Exchange::start(Mechanism::Plain, None).expect("ok");
        assert_eq!(p, Progress::Challenge(""));
        let same = b64(b"alice@a.test\0alice@a.test\0s3cret");
        assert_eq!(e.respond(&same), Ok(creds("alice@a.test", "s3cret")));
    }

    #[test]
    fn login_asks_user_then_password() {
        let (mut e, p) = Exchange::start(Mechanism::Login, None).expect("ok");
        assert_eq!(p, Progress::Challenge("VXNlcm5hbWU6"));
        assert_eq!(
            e.respond(&b64(b"bob@b.test")),
            Ok(Progress::Challenge("UGFzc3dvcmQ6"))
        );
        assert_eq!(e.respond(&b64(b"pw")), Ok(creds("bob@b.test", "pw")));
        // The initial response of AUTH LOGIN is the user name.
        let (mut e, p) = Exchange::start(Mechanism::Login, Some(&b64(b"bob"))).expect("ok");
        assert_eq!(p, Progress::Challenge("UGFzc3dvcmQ6"));
        assert_eq!(e.respond(&b64(b"pw")), Ok(creds("bob", "pw")));
    }

    #[test]
    fn bad_responses_have_their_own_errors() {
        let long = "x".repeat(MAX_PASSWORD + 1);
        let cases: Vec<(String, SaslError)> = vec![
            ("*".into(), SaslError::Cancelled),
            ("not base64!".into(), SaslError::BadBase64),
            ("=".into(), SaslError::Malformed),
            (b64(b"alice\0pw"), SaslError::Malformed),
            (b64(b"\0\0pw"), SaslError::Malformed),
            (b64(b"\0alice\0"), SaslError::Malformed),
            (b64(b"\0alice\0p\0w"), SaslError::Malformed),
            (b64(b"\0al\nice\0pw"), SaslError::Malformed),
            (b64(b"\0\xff\xfe\0pw"), SaslError::Malformed),
            (b64(b"mallory\0alice\0pw"), SaslError::ProxyAuthorization),
            (
                b64(format!("\0alice\0{long}").as_bytes()),
                SaslError::TooLong,
            ),
            (
                b64(format!("\0{}\0pw", "u".repeat(256)).as_bytes()),
                SaslError::TooLong,
            ),
        ];
        for (line, want) in cases {
            let got = Exchange::start(Mechanism::Plain, Some(&line)).map(|(_, p)| p);
            assert_eq!(got, Err(want), "{line}");
        }
        let (mut e, _) = Exchange::start(Mechanism::Login, None).expect("ok");
        assert_eq!(e.respond("*"), Err(SaslError::Cancelled));
    }

    #[test]
    fn mechanism_names_and_redacted_debug() {
        assert_eq!(Mechanism::parse("plain"), Some(Mechanism::Plain));
        assert_eq!(Mechanism::parse("LOGIN"), Some(Mechanism::Login));
        assert_eq!(Mechanism::parse("CRAM-MD5"), None);
        let p = Password::new(b"hunter2".to_vec());
        let shown = format!("{:?}", creds("a@b", "hunter2"));
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!format!("{p:?}").contains("hunter2"));
    }
}
