//! Value checks shared by the sections: durations, addresses, CIDRs, names, fingerprints.
//!
//! Each takes the key it reports errors under; the reasons are part of the interface (tests
//! and admins read them), so their text does not change.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use super::{ConfigError, invalid};
use crate::cidr::Cidr;

/// Parses `30s`, `5m`, `3h`, `3d`, `250ms` (a bare number is seconds; blanks around the number
/// and between it and the unit are allowed).
///
/// humantime does the arithmetic; its wider grammar (`1h 30m`, `2 hours`, `1.5s`, `1w`, `5M` for
/// months, `us`, `ns`) is not let through, so that a config is read the same by every Sealgate
/// version (and `5M` cannot silently mean five months where five minutes was meant).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let text = match unit.trim() {
        "" => format!("{num}s"),
        // humantime counts milliseconds in a u64 of nanoseconds; giving the whole seconds apart
        // keeps every u64 of milliseconds readable, as before.
        "ms" => {
            let n: u64 = num.parse().ok()?;
            format!("{}s {}ms", n / 1000, n % 1000)
        }
        unit @ ("s" | "m" | "h" | "d") => format!("{num}{unit}"),
        _ => return None,
    };
    humantime::parse_duration(&text).ok()
}

/// `v` as a duration under `key`, or `default` when the key is absent.
pub(super) fn duration(
    key: &str,
    v: Option<&str>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match v {
        None => Ok(default),
        Some(s) => parse_duration(s).ok_or_else(|| {
            invalid(
                key,
                format!("{s:?} is not a duration (use e.g. 30s, 5m, 3h, 3d)"),
            )
        }),
    }
}

/// A duration's allowed range, shown in errors as the admin writes durations.
#[derive(Debug, Clone, Copy)]
pub(super) struct Range {
    pub min: Duration,
    pub max: Duration,
}

/// `1s`, `5m`, `3h`, `30d`: the largest whole unit, for error messages.
fn shown(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 if d.is_zero() => "0s".into(),
        0 => format!("{}ms", d.as_millis()),
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// [`duration`] within `range` (inclusive): out of range names the key and the range.
pub(super) fn duration_in(
    key: &str,
    v: Option<&str>,
    default: Duration,
    range: Range,
) -> Result<Duration, ConfigError> {
    let d = duration(key, v, default)?;
    if d < range.min || d > range.max {
        return Err(invalid(
            key,
            format!(
                "must be between {} and {}",
                shown(range.min),
                shown(range.max)
            ),
        ));
    }
    Ok(d)
}

/// The range of a timeout: 1 second to 1 day.
pub(super) const TIMEOUT: Range = Range {
    min: Duration::from_secs(1),
    max: Duration::from_secs(86_400),
};

/// Days, for the ranges of lifetimes and memories.
pub(super) const fn days(n: u64) -> Duration {
    Duration::from_secs(n * 86_400)
}

pub(super) fn socket_addrs(key: &str, v: &[String]) -> Result<Vec<SocketAddr>, ConfigError> {
    v.iter()
        .map(|s| {
            s.parse()
                .map_err(|_| invalid(key, format!("{s:?} is not an IP:port address")))
        })
        .collect()
}

pub(super) fn ip_addr(key: &str, s: &str) -> Result<IpAddr, ConfigError> {
    s.parse()
        .map_err(|_| invalid(key, format!("{s:?} is not an IP address")))
}

/// Pinned SHA-256 fingerprints: 64 hex digits each (`:` and whitespace allowed), stored as lower
/// case hex; at most 64 of them.
pub(super) fn fingerprints(key: &str, v: Option<&[String]>) -> Result<Vec<String>, ConfigError> {
    let v = v.unwrap_or(&[]);
    if v.len() > 64 {
        return Err(invalid(key, "at most 64 fingerprints"));
    }
    v.iter()
        .map(|f| {
            let hex: String = f
                .chars()
                .filter(|c| *c != ':' && !c.is_whitespace())
                .map(|c| c.to_ascii_lowercase())
                .collect();
            if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                Ok(hex)
            } else {
                Err(invalid(
                    key,
                    format!("{f:?} is not a SHA-256 fingerprint (64 hex digits)"),
                ))
            }
        })
        .collect()
}

/// Lists of SHA-256 values (see [`fingerprints`]) as bytes.
pub(super) fn sha256_list(key: &str, v: Option<&[String]>) -> Result<Vec<[u8; 32]>, ConfigError> {
    fingerprints(key, v)?
        .iter()
        .map(|hex| {
            let mut out = [0u8; 32];
            for (i, b) in out.iter_mut().enumerate() {
                *b = hex
                    .get(2 * i..2 * i + 2)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| invalid(key, format!("{hex:?} is not 64 hex digits")))?;
            }
            Ok(out)
        })
        .collect()
}

pub(super) fn cidrs(key: &str, v: &[String]) -> Result<Vec<Cidr>, ConfigError> {
    v.iter()
        .map(|s| s.parse().map_err(|e| invalid(key, format!("{s:?}: {e}"))))
        .collect()
}

/// A host or domain name: trimmed, without a trailing dot, lower case; labels of letters,
/// digits, `-` and `_`, at most 63 long, at most 253 in all.
pub(super) fn domain_name(key: &str, s: &str) -> Result<String, ConfigError> {
    let d = s.trim().trim_end_matches('.').to_ascii_lowercase();
    let ok = !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if ok {
        Ok(d)
    } else {
        Err(invalid(key, format!("{s:?} is not a domain name")))
    }
}

pub(super) fn domain_names(key: &str, v: &[String]) -> Result<Vec<String>, ConfigError> {
    v.iter().map(|d| domain_name(key, d)).collect()
}

/// `host:port` with an IP (`[v6]` or bare) or a domain name as host.
pub(super) fn host_port(key: &str, s: &str) -> Result<(String, u16), ConfigError> {
    let bad = || invalid(key, format!("{s:?} is not host:port"));
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok((sa.ip().to_string(), sa.port()));
    }
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.parse::<IpAddr>().is_ok() {
        return Ok((host.to_string(), port));
    }
    Ok((domain_name(key, host)?, port))
}

/// A name of a certificate or CA: letters, digits, `-` and `_`, not empty.
pub(super) fn name(key: String, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!("{name:?}: use letters, digits, '-' and '_'"),
        ))
    }
}

/// Refuses `name` if an earlier entry of the same list has it.
pub(super) fn unique<'a>(
    key: String,
    name: &str,
    mut earlier: impl Iterator<Item = &'a str>,
) -> Result<(), ConfigError> {
    if earlier.any(|x| x == name) {
        return Err(invalid(key, format!("{name:?} is listed twice")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hand-written parser `parse_duration` was before humantime: the oracle for
    /// `same_as_before`.
    fn before(s: &str) -> Option<Duration> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num.parse().ok()?;
        let secs = match unit.trim() {
            "ms" => return Some(Duration::from_millis(n)),
            "" | "s" => n,
            "m" => n.checked_mul(60)?,
            "h" => n.checked_mul(3600)?,
            "d" => n.checked_mul(86_400)?,
            _ => return None,
        };
        Some(Duration::from_secs(secs))
    }

    /// (input, milliseconds or refused).
    #[test]
    fn durations() {
        let cases = [
            ("30s", Some(30_000)),
            ("5m", Some(300_000)),
            ("3h", Some(10_800_000)),
            ("3d", Some(259_200_000)),
            ("250ms", Some(250)),
            ("1500ms", Some(1500)),
            ("10", Some(10_000)),
            ("0", Some(0)),
            ("0s", Some(0)),
            ("007s", Some(7000)),
            (" 30 s ", Some(30_000)),
            ("5\tm", Some(300_000)),
            ("10 ", Some(10_000)),
            ("\u{a0}5s\u{a0}", Some(5000)),
            ("5x", None),
            ("", None),
            (" ", None),
            ("m", None),
            ("ms", None),
            ("-5s", None),
            ("+5s", None),
            ("1.5s", None),
            ("5e3s", None),
            ("1h30m", None),
            ("1h 30m", None),
            ("2 hours", None),
            ("5sec", None),
            ("5min", None),
            ("5M", None),
            ("30D", None),
            ("1w", None),
            ("1y", None),
            ("1us", None),
            ("1ns", None),
            ("5 5s", None),
            ("5s5", None),
            ("١s", None),
            ("99999999999999999999s", None),
        ];
        for (s, ms) in cases {
            assert_eq!(parse_duration(s).map(|d| d.as_millis()), ms, "{s:?}");
            assert_eq!(before(s).map(|d| d.as_millis()), ms, "{s:?} before");
        }
    }

    /// (input, whole seconds): the ends of the u64 range, where humantime and the old parser
    /// could part.
    #[test]
    fn duration_bounds() {
        let max = u64::MAX;
        let cases = [
            ("18446744073709551615", Some(max)),
            ("18446744073709551615s", Some(max)),
            ("18446744073709551616s", None),
            ("18446744073709551615ms", Some(max / 1000)),
            ("18446744073709551616ms", None),
            ("307445734561825860m", Some(307_445_734_561_825_860 * 60)),
            ("307445734561825861m", None),
            ("5124095576030431h", Some(5_124_095_576_030_431 * 3600)),
            ("5124095576030432h", None),
            ("213503982334601d", Some(213_503_982_334_601 * 86_400)),
            ("213503982334602d", None),
        ];
        for (s, secs) in cases {
            assert_eq!(parse_duration(s).map(|d| d.as_secs()), secs, "{s:?}");
            assert_eq!(before(s).map(|d| d.as_secs()), secs, "{s:?} before");
        }
    }

    /// Every number × unit × spacing combination reads as the hand-written parser read it.
    #[test]
    fn same_as_before() {
        let numbers = [
            "",
            "0",
            "1",
            "007",
            "59",
            "999",
            "1000",
            "1001",
            "86400",
            "18446744073709",
            "18446744073710",
            "213503982334601",
            "213503982334602",
            "307445734561825861",
            "18446744073709551615",
            "18446744073709551616",
            "1.5",
            "-1",
        ];
        let units = [
            "", "ms", "s", "m", "h", "d", "M", "S", "H", "D", "w", "y", "us", "ns", "sec", "min",
            "hours", "days", "msec", "1s", "s1", "m 5s", ".",
        ];
        let blanks = ["", " ", "\t", "  "];
        for n in numbers {
            for u in units {
                for gap in blanks {
                    for pad in blanks {
                        let s = format!("{pad}{n}{gap}{u}{pad}");
                        assert_eq!(parse_duration(&s), before(&s), "{s:?}");
                    }
                }
            }
        }
    }

    /// (input, (host, port) or the error's reason).
    #[test]
    fn host_ports() {
        let cases = [
            ("127.0.0.1:25", Ok(("127.0.0.1", 25))),
            ("[::1]:26", Ok(("::1", 26))),
            ("::1:27", Ok(("::1", 27))),
            ("[relay.test]:25", Ok(("relay.test", 25))),
            ("Relay.Example.NET.:2525", Ok(("relay.example.net", 2525))),
            ("a:0", Ok(("a", 0))),
            ("nohost", Err("\"nohost\" is not host:port")),
            ("a:port", Err("\"a:port\" is not host:port")),
            ("a:70000", Err("\"a:70000\" is not host:port")),
            ("a: 25", Err("\"a: 25\" is not host:port")),
            ("bad host:25", Err("\"bad host\" is not a domain name")),
            (":25", Err("\"\" is not a domain name")),
        ];
        for (s, want) in cases {
            let got = host_port("k", s).map_err(|e| match e {
                ConfigError::Invalid { reason, .. } => reason,
                other => other.to_string(),
            });
            let want = want
                .map(|(h, p)| (h.to_string(), p))
                .map_err(str::to_string);
            assert_eq!(got, want, "{s:?}");
        }
    }

    /// (input, normalised name or refused).
    #[test]
    fn domain_names_table() {
        let long_label = "a".repeat(63);
        let too_long_label = "a".repeat(64);
        let long_name = ["a"; 127].join(".");
        let too_long_name = format!("{long_name}a.b");
        let cases = [
            ("Example.COM", Some("example.com")),
            ("example.com.", Some("example.com")),
            (" x.test ", Some("x.test")),
            ("a_b-c.test", Some("a_b-c.test")),
            ("localhost", Some("localhost")),
            (long_label.as_str(), Some(long_label.as_str())),
            (long_name.as_str(), Some(long_name.as_str())),
            (too_long_label.as_str(), None),
            (too_long_name.as_str(), None),
            ("", None),
            (".", None),
            ("a..b", None),
            (".a", None),
            ("a b", None),
            ("*", None),
            ("ex/ample", None),
            ("bücher.test", None),
        ];
        for (s, want) in cases {
            assert_eq!(domain_name("k", s).ok().as_deref(), want, "{s:?}");
        }
    }

    /// (input, normalised fingerprint or refused).
    #[test]
    fn fingerprint_forms() {
        let lower = "ab".repeat(32);
        let colons = vec!["AB"; 32].join(":");
        let spaced = format!(" {} ", vec!["abab"; 16].join(" "));
        let cases = [
            (lower.as_str(), Some(lower.as_str())),
            (colons.as_str(), Some(lower.as_str())),
            (spaced.as_str(), Some(lower.as_str())),
            ("abc", None),
            (&lower[2..], None),
            ("zz", None),
        ];
        for (s, want) in cases {
            let got = fingerprints("k", Some(&[s.to_string()])).ok();
            assert_eq!(
                got.as_ref().and_then(|v| v.first()).map(String::as_str),
                want,
                "{s:?}"
            );
        }
        let many = vec![lower.clone(); 65];
        assert!(fingerprints("k", Some(&many)).is_err());
        assert_eq!(
            sha256_list("k", Some(&many[..64])).map(|v| v.len()).ok(),
            Some(64)
        );
    }
}
