//! MTA-STS (RFC 8461) without I/O: the `_mta-sts` TXT record, the policy file served at
//! `https://mta-sts.DOMAIN/.well-known/mta-sts.txt`, and whether an MX host matches it. Strict:
//! anything the RFC requires and the input lacks is an error naming the check; what the RFC
//! says to ignore (unknown keys, extra TXT fields) is ignored.

use std::fmt;

/// Largest policy file accepted (RFC 8461 §3.3 suggests 64 KiB).
pub const MAX_POLICY_BYTES: usize = 64 * 1024;
/// Largest `max_age` (RFC 8461 §3.2: 31557600 seconds, about a year).
pub const MAX_MAX_AGE: u64 = 31_557_600;
/// `mx` patterns kept at most; a policy with more is refused.
pub const MAX_MX_PATTERNS: usize = 64;
/// Longest TXT `id` (RFC 8461 §3.1: 1 to 32 letters and digits).
pub const MAX_ID: usize = 32;

/// Why a TXT record or a policy was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StsError {
    #[error("TXT record: {0}")]
    Txt(String),
    #[error("more than one TXT record starts with v=STSv1 (RFC 8461 §3.1: no policy)")]
    SeveralTxt,
    #[error("policy is {0} bytes, over the {MAX_POLICY_BYTES}-byte bound")]
    TooLarge(usize),
    #[error("policy: {0}")]
    Policy(String),
}

/// The `_mta-sts` TXT record's fields that matter: the policy id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StsTxt {
    pub id: String,
}

/// Parses one TXT record (its strings joined). `Ok(None)`: not an STS record (another
/// version or no `v=` first), to be ignored.
pub fn parse_txt(txt: &str) -> Result<Option<StsTxt>, StsError> {
    let mut fields = txt.split(';').map(str::trim).filter(|f| !f.is_empty());
    match fields.next().map(|f| f.split_once('=')) {
        Some(Some(("v", "STSv1"))) => {}
        _ => return Ok(None),
    }
    let mut id = None;
    for f in fields {
        let Some((k, v)) = f.split_once('=') else {
            return Err(StsError::Txt(format!("field {f:?} is not key=value")));
        };
        if k == "id" {
            if id.is_some() {
                return Err(StsError::Txt("two id fields".into()));
            }
            let ok =
                !v.is_empty() && v.len() <= MAX_ID && v.bytes().all(|b| b.is_ascii_alphanumeric());
            if !ok {
                return Err(StsError::Txt(format!(
                    "id {v:?} is not 1 to {MAX_ID} letters and digits"
                )));
            }
            id = Some(v.to_string());
        }
    }
    id.map(|id| Some(StsTxt { id }))
        .ok_or_else(|| StsError::Txt("no id field".into()))
}

/// The STS record among a name's TXT records: none, exactly one, or an error (one that does
/// not parse, or several — RFC 8461 §3.1 says both mean "no policy").
pub fn select_txt<'a>(
    records: impl IntoIterator<Item = &'a str>,
) -> Result<Option<StsTxt>, StsError> {
    let mut found = None;
    for r in records {
        if let Some(t) = parse_txt(r)? {
            if found.is_some() {
                return Err(StsError::SeveralTxt);
            }
            found = Some(t);
        }
    }
    Ok(found)
}

/// A policy's mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// MX hosts must match and present a certificate valid for their name; else defer.
    Enforce,
    /// Deliver as without a policy; report failures.
    Testing,
    /// No policy (a domain withdrawing one).
    None,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Testing => "testing",
            Mode::None => "none",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A parsed policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub mode: Mode,
    /// Lower-case patterns without a trailing dot: `mx.example.com` or `*.example.com`.
    pub mx: Vec<String>,
    /// Seconds the policy may be cached.
    pub max_age: u64,
}

impl Policy {
    /// Parses the body of `mta-sts.txt` (RFC 8461 §3.2): `key: value` lines ending in CRLF or
    /// LF; `version: STSv1`, `mode`, `max_age` once each, `mx` at least once unless the mode is
    /// `none`; unknown keys are ignored.
    pub fn parse(body: &[u8]) -> Result<Policy, StsError> {
        if body.len() > MAX_POLICY_BYTES {
            return Err(StsError::TooLarge(body.len()));
        }
        let text =
            std::str::from_utf8(body).map_err(|_| StsError::Policy("not UTF-8 text".into()))?;
        let (mut version, mut mode, mut max_age, mut mx) = (None, None, None, Vec::new());
        for (n, line) in text.split('\n').enumerate() {
            let line = line.strip_suffix('\r').unwrap_or(line);
            if line.trim().is_empty() {
                continue;
            }
            let bad = |why: String| StsError::Policy(format!("line {}: {why}", n + 1));
            let Some((key, value)) = line.split_once(':') else {
                return Err(bad(format!("{line:?} is not key: value")));
            };
            let (key, value) = (key.trim(), value.trim());
            let twice = || bad(format!("{key} given twice"));
            match key {
                "version" => {
                    if version.is_some() {
                        return Err(twice());
                    }
                    version = Some(value.to_string());
                }
                "mode" => {
                    if mode.is_some() {
                        return Err(twice());
                    }
                    mode = Some(parse_mode(value).ok_or_else(|| {
                        bad(format!("mode {value:?}: use enforce, testing or none"))
                    })?);
                }
                "max_age" => {
                    if max_age.is_some() {
                        return Err(twice());
                    }
                    max_age = Some(parse_max_age(value).ok_or_else(|| {
                        bad(format!(
                            "max_age {value:?} is not 0 to {MAX_MAX_AGE} seconds"
                        ))
                    })?);
                }
                "mx" => {
                    if mx.len() == MAX_MX_PATTERNS {
                        return Err(bad(format!("more than {MAX_MX_PATTERNS} mx patterns")));
                    }
                    mx.push(parse_pattern(value).ok_or_else(|| {
                        bad(format!("mx {value:?} is not a host name or *.domain"))
                    })?);
                }
                _ => {}
            }
        }
        finish(version, mode, max_age, mx)
    }

    /// Whether `host` (an MX host name) matches one of the patterns: exactly, or `*.` standing
    /// for exactly one leftmost label; case and a trailing dot ignored.
    pub fn mx_matches(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.mx.iter().any(|p| match p.strip_prefix("*.") {
            Some(suffix) => host
                .split_once('.')
                .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
            None => *p == host,
        })
    }
}

fn finish(
    version: Option<String>,
    mode: Option<Mode>,
    max_age: Option<u64>,
    mx: Vec<String>,
) -> Result<Policy, StsError> {
    let missing = |k: &str| StsError::Policy(format!("no {k} line"));
    match version.as_deref() {
        Some("STSv1") => {}
        Some(v) => return Err(StsError::Policy(format!("version {v:?} is not STSv1"))),
        None => return Err(missing("version")),
    }
    let mode = mode.ok_or_else(|| missing("mode"))?;
    let max_age = max_age.ok_or_else(|| missing("max_age"))?;
    if mx.is_empty() && mode != Mode::None {
        return Err(missing("mx"));
    }
    Ok(Policy { mode, mx, max_age })
}

fn parse_mode(v: &str) -> Option<Mode> {
    match v {
        "enforce" => Some(Mode::Enforce),
        "testing" => Some(Mode::Testing),
        "none" => Some(Mode::None),
        _ => None,
    }
}

/// 1 to 10 digits (RFC 8461 §3.2), at most [`MAX_MAX_AGE`].
fn parse_max_age(v: &str) -> Option<u64> {
    let ok = !v.is_empty() && v.len() <= 10 && v.bytes().all(|b| b.is_ascii_digit());
    ok.then(|| v.parse().ok())
        .flatten()
        .filter(|n| *n <= MAX_MAX_AGE)
}

/// A host name, or `*.` and a host name of at least two labels; lower-cased.
fn parse_pattern(v: &str) -> Option<String> {
    let v = v.trim_end_matches('.').to_ascii_lowercase();
    let (wild, name) = match v.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, v.as_str()),
    };
    let labels: Vec<&str> = name.split('.').collect();
    let label_ok = |l: &&str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    let ok = name.len() <= 253 && labels.iter().all(label_ok) && (!wild || labels.len() >= 2);
    ok.then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn txt_records() {
        let id = |s: &str| Ok(Some(StsTxt { id: s.into() }));
        let table: &[(&str, Result<Option<StsTxt>, StsError>)] = &[
            ("v=STSv1; id=20160831085700Z;", id("20160831085700Z")),
            ("v=STSv1;id=abc", id("abc")),
            ("  v=STSv1 ;  id=abc ; ext=1 ", id("abc")),
            ("v=spf1 -all", Ok(None)),
            ("id=abc; v=STSv1", Ok(None)), // v= must come first
            ("v=STSv2; id=abc", Ok(None)),
            ("v=STSv1", Err(StsError::Txt("no id field".into()))),
            (
                "v=STSv1; id=",
                Err(StsError::Txt(
                    "id \"\" is not 1 to 32 letters and digits".into(),
                )),
            ),
            (
                "v=STSv1; id=a-b",
                Err(StsError::Txt(
                    "id \"a-b\" is not 1 to 32 letters and digits".into(),
                )),
            ),
            (
                "v=STSv1; id=a; id=b",
                Err(StsError::Txt("two id fields".into())),
            ),
            (
                "v=STSv1; junk",
                Err(StsError::Txt("field \"junk\" is not key=value".into())),
            ),
        ];
        for (txt, want) in table {
            assert_eq!(&parse_txt(txt), want, "{txt}");
        }
        let long = format!("v=STSv1; id={}", "a".repeat(33));
        assert!(parse_txt(&long).is_err());
        assert_eq!(select_txt(["v=spf1", "v=STSv1; id=x"]), id("x"));
        assert_eq!(select_txt(["v=spf1"]), Ok(None));
        assert_eq!(
            select_txt(["v=STSv1; id=x", "v=STSv1; id=y"]),
            Err(StsError::SeveralTxt)
        );
    }

    const GOOD: &str = "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\nmx: backupmx.example.com.\r\nmax_age: 604800\r\n";

    #[test]
    fn the_rfc_example_parses() {
        let p = Policy::parse(GOOD.as_bytes()).unwrap();
        assert_eq!(p.mode, Mode::Enforce);
        assert_eq!(p.max_age, 604_800);
        assert_eq!(
            p.mx,
            ["mail.example.com", "*.example.net", "backupmx.example.com"]
        );
        // LF line ends, unknown keys and blank lines are fine
        let lf = "version: STSv1\nmode: testing\nfoo: bar\n\nmx: MX.Example.COM\nmax_age: 0";
        let p = Policy::parse(lf.as_bytes()).unwrap();
        assert_eq!(
            (p.mode, p.max_age, p.mx.as_slice()),
            (Mode::Testing, 0, &["mx.example.com".to_string()][..])
        );
        let none = Policy::parse(b"version: STSv1\nmode: none\nmax_age: 86400\n").unwrap();
        assert_eq!((none.mode, none.mx.len()), (Mode::None, 0));
    }

    #[test]
    fn bad_policies_name_the_check() {
        let table = [
            ("mode: enforce\nmx: a.test\nmax_age: 1", "no version line"),
            (
                "version: STSv2\nmode: enforce\nmx: a.test\nmax_age: 1",
                "not STSv1",
            ),
            ("version: STSv1\nmx: a.test\nmax_age: 1", "no mode line"),
            (
                "version: STSv1\nmode: strict\nmx: a.test\nmax_age: 1",
                "use enforce, testing or none",
            ),
            ("version: STSv1\nmode: enforce\nmax_age: 1", "no mx line"),
            (
                "version: STSv1\nmode: enforce\nmx: a.test",
                "no max_age line",
            ),
            (
                "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 31557601",
                "not 0 to 31557600",
            ),
            (
                "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: -1",
                "not 0 to",
            ),
            (
                "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 1 day",
                "not 0 to",
            ),
            (
                "version: STSv1\nmode: enforce\nmode: testing\nmx: a.test\nmax_age: 1",
                "line 3: mode given twice",
            ),
            (
                "version: STSv1\nmode: enforce\nmx: *.test\nmax_age: 1",
                "not a host name",
            ),
            (
                "version: STSv1\nmode: enforce\nmx: a..test\nmax_age: 1",
                "not a host name",
            ),
            (
                "version: STSv1\nmode: enforce\nmx: mx.*.test\nmax_age: 1",
                "not a host name",
            ),
            (
                "version: STSv1\nmode: enforce\nmx a.test\nmax_age: 1",
                "line 3: \"mx a.test\" is not key: value",
            ),
        ];
        for (body, needle) in table {
            let e = Policy::parse(body.as_bytes()).unwrap_err().to_string();
            assert!(e.contains(needle), "{body:?}: {e}");
        }
        assert_eq!(
            Policy::parse(&vec![b'a'; MAX_POLICY_BYTES + 1]),
            Err(StsError::TooLarge(MAX_POLICY_BYTES + 1))
        );
        assert!(Policy::parse(b"version: STSv1\xff").is_err());
        let many: String = (0..=MAX_MX_PATTERNS)
            .map(|i| format!("mx: m{i}.test\n"))
            .collect();
        let body = format!("version: STSv1\nmode: enforce\nmax_age: 1\n{many}");
        assert!(
            Policy::parse(body.as_bytes())
                .unwrap_err()
                .to_string()
                .contains("more than 64")
        );
    }

    #[test]
    fn mx_patterns_match_one_label() {
        let p = Policy::parse(GOOD.as_bytes()).unwrap();
        let table = [
            ("mail.example.com", true),
            ("MAIL.example.com.", true),
            ("backupmx.example.com", true),
            ("a.example.net", true),
            ("example.net", false),     // `*.` needs a label
            ("a.b.example.net", false), // and exactly one
            ("other.example.com", false),
            ("mail.example.com.evil.test", false),
            ("", false),
        ];
        for (host, want) in table {
            assert_eq!(p.mx_matches(host), want, "{host}");
        }
    }
}
