//! DANE for SMTP (RFC 7672 on RFC 6698/7671) without I/O: TLSA records as the validating
//! resolver found them, which of them an SMTP client may use, and what the lookup means for a
//! delivery. Matching a certificate chain against the records needs digests and a chain check:
//! `sealgate_core::dane` and the runtime do that; the decision is [`crate::policy`]'s.

use std::fmt;

/// Certificate usage DANE-TA: the record names a trust anchor in the server's chain.
pub const DANE_TA: u8 = 2;
/// Certificate usage DANE-EE: the record names the server's own certificate or key.
pub const DANE_EE: u8 = 3;
/// Selector: the whole certificate (DER).
pub const SELECTOR_CERT: u8 = 0;
/// Selector: its SubjectPublicKeyInfo (DER).
pub const SELECTOR_SPKI: u8 = 1;
/// Matching type: the selected bytes themselves.
pub const MATCH_FULL: u8 = 0;
/// Matching type: SHA-256 of the selected bytes.
pub const MATCH_SHA256: u8 = 1;
/// Matching type: SHA-512 of the selected bytes.
pub const MATCH_SHA512: u8 = 2;

/// Longest association data kept (a full certificate; larger records are unusable).
pub const MAX_DATA: usize = 16 * 1024;
/// TLSA records of one RRset considered at most; the rest are ignored.
pub const MAX_RECORDS: usize = 32;

/// One TLSA record (RFC 6698 §2.1).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Tlsa {
    pub usage: u8,
    pub selector: u8,
    pub matching: u8,
    pub data: Vec<u8>,
}

/// Why the wire form of a TLSA record was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsaError {
    #[error("a TLSA record needs at least 4 bytes, this one has {0}")]
    Short(usize),
    #[error("TLSA association data of {0} bytes is over the {MAX_DATA}-byte bound")]
    TooLong(usize),
}

impl Tlsa {
    /// Parses the RDATA of a TLSA record: usage, selector, matching type, data.
    pub fn from_rdata(rdata: &[u8]) -> Result<Tlsa, TlsaError> {
        let [usage, selector, matching, data @ ..] = rdata else {
            return Err(TlsaError::Short(rdata.len()));
        };
        if data.len() > MAX_DATA {
            return Err(TlsaError::TooLong(data.len()));
        }
        if data.is_empty() {
            return Err(TlsaError::Short(rdata.len()));
        }
        Ok(Tlsa {
            usage: *usage,
            selector: *selector,
            matching: *matching,
            data: data.to_vec(),
        })
    }

    /// Whether an SMTP client may use this record (RFC 7672 §3.1): DANE-TA or DANE-EE (PKIX-TA
    /// and PKIX-EE are unusable for SMTP), a known selector and matching type, and a digest of
    /// the right length.
    pub fn usable(&self) -> bool {
        let usage = matches!(self.usage, DANE_TA | DANE_EE);
        let selector = matches!(self.selector, SELECTOR_CERT | SELECTOR_SPKI);
        let matching = match self.matching {
            MATCH_FULL => !self.data.is_empty(),
            MATCH_SHA256 => self.data.len() == 32,
            MATCH_SHA512 => self.data.len() == 64,
            _ => false,
        };
        usage && selector && matching
    }

    /// `DANE-EE(3) SPKI(1) SHA2-256(1)`, for logs.
    pub fn describe(&self) -> String {
        let usage = match self.usage {
            DANE_TA => "DANE-TA",
            DANE_EE => "DANE-EE",
            0 => "PKIX-TA",
            1 => "PKIX-EE",
            _ => "usage",
        };
        let selector = match self.selector {
            SELECTOR_CERT => "Cert",
            SELECTOR_SPKI => "SPKI",
            _ => "selector",
        };
        let matching = match self.matching {
            MATCH_FULL => "Full",
            MATCH_SHA256 => "SHA2-256",
            MATCH_SHA512 => "SHA2-512",
            _ => "matching",
        };
        format!(
            "{usage}({}) {selector}({}) {matching}({})",
            self.usage, self.selector, self.matching
        )
    }
}

/// `3 1 1 ab12…` (the data cut after 8 bytes), the zone-file form.
impl fmt::Display for Tlsa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {} ", self.usage, self.selector, self.matching)?;
        for b in self.data.iter().take(8) {
            write!(f, "{b:02x}")?;
        }
        if self.data.len() > 8 {
            f.write_str("…")?;
        }
        Ok(())
    }
}

/// What the TLSA lookup for one next hop (`_PORT._tcp.HOST`) found, as the policy engine
/// needs it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum DaneState {
    /// Not looked up: the route's level does not use DANE.
    #[default]
    NotLookedUp,
    /// A DNSSEC-validated TLSA RRset (all of its records, usable or not; at most
    /// [`MAX_RECORDS`]).
    Secure(Vec<Tlsa>),
    /// No validated TLSA records: the zone (or the MX lookup that named the host) is not
    /// signed, or a validated denial says there are none. The reason is for logs.
    Insecure(String),
    /// The lookup failed or did not validate (bogus, SERVFAIL, timeout): this host must not be
    /// used now (RFC 7672 §2.2).
    Failed(String),
}

impl DaneState {
    /// The usable records of a secure RRset.
    pub fn usable(&self) -> Vec<Tlsa> {
        match self {
            DaneState::Secure(records) => records.iter().filter(|r| r.usable()).cloned().collect(),
            _ => Vec::new(),
        }
    }
}

/// How a certificate chain fared against the TLSA records (found by the runtime).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum DaneMatch {
    /// The level does not use DANE.
    #[default]
    NotChecked,
    /// This record matched (for DANE-TA: and the chain leads from the leaf to the matching
    /// certificate, which is valid for the host name).
    Matched(Tlsa),
    /// No record matched; the detail is for logs.
    NoMatch(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(u: u8, s: u8, m: u8, len: usize) -> Tlsa {
        Tlsa {
            usage: u,
            selector: s,
            matching: m,
            data: vec![7; len],
        }
    }

    #[test]
    fn rdata_parses_and_bounds() {
        let t = Tlsa::from_rdata(&[3, 1, 1, 0xab, 0xcd]).unwrap();
        assert_eq!(
            (t.usage, t.selector, t.matching, t.data),
            (3, 1, 1, vec![0xab, 0xcd])
        );
        assert_eq!(Tlsa::from_rdata(&[3, 1, 1]), Err(TlsaError::Short(3)));
        assert_eq!(Tlsa::from_rdata(&[]), Err(TlsaError::Short(0)));
        let big = [&[3u8, 0, 0][..], &vec![0u8; MAX_DATA + 1]].concat();
        assert_eq!(
            Tlsa::from_rdata(&big),
            Err(TlsaError::TooLong(MAX_DATA + 1))
        );
    }

    #[test]
    fn usable_records_per_rfc7672() {
        let table = [
            (rec(3, 1, 1, 32), true),
            (rec(3, 0, 1, 32), true),
            (rec(2, 1, 2, 64), true),
            (rec(2, 0, 0, 500), true),
            (rec(3, 1, 1, 31), false), // a SHA-256 digest has 32 bytes
            (rec(3, 1, 2, 32), false), // a SHA-512 one 64
            (rec(1, 1, 1, 32), false), // PKIX-EE: unusable for SMTP
            (rec(0, 1, 1, 32), false), // PKIX-TA too
            (rec(3, 2, 1, 32), false), // unknown selector
            (rec(3, 1, 3, 32), false), // unknown matching type
        ];
        for (r, want) in table {
            assert_eq!(r.usable(), want, "{}", r.describe());
        }
        let state = DaneState::Secure(vec![rec(1, 1, 1, 32), rec(3, 1, 1, 32)]);
        assert_eq!(state.usable(), vec![rec(3, 1, 1, 32)]);
        assert!(DaneState::Insecure("x".into()).usable().is_empty());
    }

    #[test]
    fn display_forms() {
        assert_eq!(rec(3, 1, 1, 2).to_string(), "3 1 1 0707");
        assert_eq!(rec(2, 0, 1, 32).to_string(), "2 0 1 0707070707070707…");
        assert_eq!(
            rec(3, 1, 1, 32).describe(),
            "DANE-EE(3) SPKI(1) SHA2-256(1)"
        );
    }
}
