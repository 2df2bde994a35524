//! Release versions `MAJOR.MINOR.PATCH` (three decimal `u16`s) of images, bundles and slots,
//! ordered numerically (the rollback floor compares them).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A release version, `1.2.3`. Orders by major, then minor, then patch.
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default, Serialize, Deserialize,
)]
pub struct Version {
    pub major: u16,
    pub minor: u16,
    pub patch: u16,
}

impl Version {
    /// `major.minor.patch`.
    pub const fn new(major: u16, minor: u16, patch: u16) -> Self {
        Version {
            major,
            minor,
            patch,
        }
    }
}

/// Why a string is not a version; the message quotes it (shortened).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a version MAJOR.MINOR.PATCH (three numbers 0..=65535): {0:?}")]
pub struct VersionError(pub String);

impl FromStr for Version {
    type Err = VersionError;

    /// Exactly three dot-separated decimal numbers, each 0..=65535, digits only (no sign,
    /// no spaces, no pre-release suffix).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || VersionError(s.chars().take(40).collect());
        let mut parts = s.split('.');
        let mut next = || -> Result<u16, VersionError> {
            let p = parts.next().ok_or_else(err)?;
            if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(err());
            }
            p.parse::<u16>().map_err(|_| err())
        };
        let v = Version::new(next()?, next()?, next()?);
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(v)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn parse_display_round_trip() {
        for s in ["0.0.0", "1.2.3", "65535.65535.65535", "10.0.7"] {
            let v: Version = s.parse().unwrap();
            assert_eq!(v.to_string(), s);
        }
        assert_eq!("01.2.3".parse::<Version>().unwrap(), Version::new(1, 2, 3));
    }

    #[test]
    fn refusals() {
        for s in [
            "",
            "1",
            "1.2",
            "1.2.3.4",
            "1..3",
            "a.b.c",
            "1.2.3-rc1",
            " 1.2.3",
            "+1.2.3",
            "65536.0.0",
            "1.2.",
            "000001.2.3",
        ] {
            let e = s.parse::<Version>().unwrap_err();
            assert!(e.to_string().contains("MAJOR.MINOR.PATCH"), "{s}: {e}");
        }
    }

    #[test]
    fn ordering_is_numeric() {
        let v = |s: &str| s.parse::<Version>().unwrap();
        assert!(v("1.10.0") > v("1.9.9"));
        assert!(v("2.0.0") > v("1.65535.65535"));
        assert!(v("0.0.1") > v("0.0.0"));
        assert_eq!(Version::default(), v("0.0.0"));
    }

    #[test]
    fn serde_form() {
        let j = serde_json::to_string(&Version::new(1, 2, 3)).unwrap();
        assert_eq!(j, r#"{"major":1,"minor":2,"patch":3}"#);
        let back: Version = serde_json::from_str(&j).unwrap();
        assert_eq!(back, Version::new(1, 2, 3));
    }
}
