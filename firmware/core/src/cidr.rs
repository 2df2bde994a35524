//! IP networks in CIDR notation (`192.168.1.0/24`, `::1/128`, a bare address = a host).
//!
//! [`Cidr`] wraps [`ipnet::IpNet`]; what is added here is the config's reading of it: a bare
//! address is a host (`/32`, `/128`), host bits below the prefix are refused (`10.0.0.1/8` is a
//! typo more often than not), each failure has its own reason, and an IPv4 client seen on a
//! dual-stack socket as `::ffff:a.b.c.d` is matched as `a.b.c.d`.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

/// A network (no host bits set below its prefix).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Cidr(IpNet);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("not an IP address")]
    Address,
    #[error("prefix length must be 0..=32 for IPv4, 0..=128 for IPv6")]
    Prefix,
    #[error("host bits set below the prefix (did you mean the network address?)")]
    HostBits,
}

impl Cidr {
    /// Whether `ip` is in this network; an IPv4-mapped IPv6 address counts as its IPv4 address
    /// (and so is in IPv4 networks only).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.0.contains(&ip)
    }
}

impl FromStr for Cidr {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Self, CidrError> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| CidrError::Address)?;
        let net = match prefix {
            None => IpNet::from(addr),
            Some(p) => {
                let len = p.parse::<u8>().map_err(|_| CidrError::Prefix)?;
                IpNet::new(addr, len).map_err(|_| CidrError::Prefix)?
            }
        };
        if net.addr() != net.network() {
            return Err(CidrError::HostBits);
        }
        Ok(Cidr(net))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.0.addr(), self.0.prefix_len())
    }
}

/// The same text as the struct this type was before it wrapped `IpNet`.
impl fmt::Debug for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cidr")
            .field("addr", &self.0.addr())
            .field("prefix", &self.0.prefix_len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let cases = [
            ("127.0.0.0/8", "127.0.0.9", true),
            ("127.0.0.1/32", "127.0.0.9", false),
            ("127.0.0.1", "127.0.0.1", true),
            ("0.0.0.0/0", "203.0.113.7", true),
            ("10.0.0.0/8", "::ffff:10.1.2.3", true),
            ("::1/128", "::1", true),
            ("2001:db8::/32", "2001:db8:1::5", true),
            ("2001:db8::/32", "127.0.0.1", false),
        ];
        for (net, ip, want) in cases {
            let c: Cidr = net.parse().unwrap();
            assert_eq!(c.contains(ip.parse().unwrap()), want, "{net} ∋ {ip}");
        }
        for bad in [
            "10.0.0.0/33",
            "10.0.0.1/8",
            "nonsense",
            "::/129",
            "1.2.3.4/x",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    /// (network, address, contained): edges of the prefix, both families, mapped addresses.
    #[test]
    fn contains_table() {
        let cases = [
            ("10.0.0.0/8", "10.255.255.255", true),
            ("10.0.0.0/8", "11.0.0.0", false),
            ("10.0.0.0/8", "9.255.255.255", false),
            ("192.168.1.128/25", "192.168.1.127", false),
            ("192.168.1.128/25", "192.168.1.128", true),
            ("192.168.1.128/25", "192.168.1.255", true),
            ("203.0.113.7", "203.0.113.7", true),
            ("203.0.113.7", "203.0.113.8", false),
            ("0.0.0.0/0", "0.0.0.0", true),
            ("0.0.0.0/0", "::1", false),
            ("0.0.0.0/0", "::ffff:1.2.3.4", true),
            ("::/0", "::1", true),
            ("::/0", "1.2.3.4", false),
            // A mapped client address is matched as IPv4, so not by an IPv6 network.
            ("::/0", "::ffff:1.2.3.4", false),
            ("::ffff:0:0/96", "::ffff:1.2.3.4", false),
            ("::ffff:0:0/96", "1.2.3.4", false),
            ("10.0.0.0/8", "::10.1.2.3", false),
            ("::1", "::1", true),
            ("::1", "::2", false),
            ("2001:db8::/32", "2001:db9::", false),
            ("2001:db8::/127", "2001:db8::1", true),
            ("2001:db8::/127", "2001:db8::2", false),
        ];
        for (net, ip, want) in cases {
            let c: Cidr = net.parse().unwrap();
            assert_eq!(c.contains(ip.parse().unwrap()), want, "{net} ∋ {ip}");
        }
    }

    /// (input, Display of the parsed network or the error's text).
    #[test]
    fn parse_table() {
        let prefix = "prefix length must be 0..=32 for IPv4, 0..=128 for IPv6";
        let host = "host bits set below the prefix (did you mean the network address?)";
        let addr = "not an IP address";
        let cases = [
            ("10.0.0.0/8", "10.0.0.0/8"),
            ("  10.0.0.0/8 ", "10.0.0.0/8"),
            ("10.0.0.0/08", "10.0.0.0/8"),
            ("10.0.0.0/+8", "10.0.0.0/8"),
            ("10.1.2.3", "10.1.2.3/32"),
            ("10.1.2.3/32", "10.1.2.3/32"),
            ("0.0.0.0/0", "0.0.0.0/0"),
            ("::1", "::1/128"),
            ("::/0", "::/0"),
            ("2001:DB8::/32", "2001:db8::/32"),
            ("::ffff:10.0.0.0/104", "::ffff:10.0.0.0/104"),
            ("10.0.0.0/33", prefix),
            ("10.0.0.0/-1", prefix),
            ("10.0.0.0/", prefix),
            ("10.0.0.0/ 8", prefix),
            ("10.0.0.0/256", prefix),
            ("10.0.0.0/8/8", prefix),
            ("1.2.3.4/x", prefix),
            ("::/129", prefix),
            ("10.0.0.1/8", host),
            ("11.0.0.0/7", host),
            ("10.0.0.0/7", "10.0.0.0/7"),
            ("2001:db8::1/32", host),
            ("::1/127", host),
            ("nonsense", addr),
            ("", addr),
            ("/8", addr),
            ("10.0.0.0 /8", addr),
            ("10.0.0/8", addr),
            ("[::1]/128", addr),
            ("fe80::1%eth0/64", addr),
            ("example.com/24", addr),
        ];
        for (input, want) in cases {
            let got = match input.parse::<Cidr>() {
                Ok(c) => c.to_string(),
                Err(e) => e.to_string(),
            };
            assert_eq!(got, want, "{input:?}");
        }
    }

    #[test]
    fn debug_text_is_unchanged() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert_eq!(format!("{c:?}"), "Cidr { addr: 10.0.0.0, prefix: 8 }");
    }
}
