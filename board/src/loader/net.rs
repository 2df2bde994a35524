//! Network bring-up of the appliance: `lo` up, and `eth0` configured from the kernel command
//! line (`sealgate.ip=A.B.C.D/N`, `sealgate.gw=G`) with the IPv4 ioctls — no DHCP, no netlink.

use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::appliance::cmdline_value;

/// The interface configured from the command line.
pub const IFACE: &str = "eth0";

/// The IPv4 configuration of [`IFACE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetConfig {
    pub addr: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
}

impl NetConfig {
    /// The netmask of [`NetConfig::prefix`].
    pub fn netmask(&self) -> Ipv4Addr {
        netmask(self.prefix)
    }
}

/// The netmask of a prefix length (0..=32).
pub fn netmask(prefix: u8) -> Ipv4Addr {
    match prefix {
        0 => Ipv4Addr::UNSPECIFIED,
        p if p >= 32 => Ipv4Addr::BROADCAST,
        p => Ipv4Addr::from(u32::MAX << (32 - u32::from(p))),
    }
}

/// `A.B.C.D/N` (N in 0..=32; a bare address means /32).
pub fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let (a, n) = s.split_once('/').unwrap_or((s, "32"));
    let addr: Ipv4Addr = a.parse().map_err(|_| format!("bad IPv4 address {a:?}"))?;
    let prefix: u8 = n
        .parse()
        .ok()
        .filter(|p| *p <= 32)
        .ok_or_else(|| format!("bad prefix length {n:?}"))?;
    Ok((addr, prefix))
}

/// The configuration named on `cmdline`: `Ok(None)` without `sealgate.ip`; the gateway must
/// lie inside the interface's subnet.
pub fn config_from_cmdline(cmdline: &str) -> Result<Option<NetConfig>, String> {
    let Some(ip) = cmdline_value(cmdline, "sealgate.ip") else {
        return Ok(None);
    };
    let (addr, prefix) = parse_cidr(ip).map_err(|e| format!("sealgate.ip: {e}"))?;
    let gateway = match cmdline_value(cmdline, "sealgate.gw") {
        None => None,
        Some(g) => {
            let g: Ipv4Addr = g
                .parse()
                .map_err(|_| format!("sealgate.gw: bad IPv4 address {g:?}"))?;
            let m = u32::from(netmask(prefix));
            if u32::from(g) & m != u32::from(addr) & m {
                return Err(format!("sealgate.gw: {g} is outside {addr}/{prefix}"));
            }
            Some(g)
        }
    };
    Ok(Some(NetConfig {
        addr,
        prefix,
        gateway,
    }))
}

fn socket() -> std::io::Result<std::os::fd::OwnedFd> {
    Ok(rustix::net::socket(
        rustix::net::AddressFamily::INET,
        rustix::net::SocketType::DGRAM,
        None,
    )?)
}

/// Brings `lo` up (the kernel gives it 127.0.0.1/8 itself).
pub fn loopback_up() -> Result<(), String> {
    let s = socket().map_err(|e| format!("socket: {e}"))?;
    crate::sys::set_if_up(s.as_fd(), "lo").map_err(|e| format!("lo up: {e}"))
}

/// Waits (polling every 50 ms, at most `timeout`) for `/sys/class/net/<ifname>`.
pub fn wait_interface(ifname: &str, timeout: Duration) -> bool {
    let p = Path::new("/sys/class/net").join(ifname);
    let start = Instant::now();
    loop {
        if p.exists() {
            return true;
        }
        if start.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Address, netmask, up, default route — each failure names its step.
pub fn configure(ifname: &str, cfg: &NetConfig) -> Result<(), String> {
    let s = socket().map_err(|e| format!("socket: {e}"))?;
    let s = s.as_fd();
    crate::sys::set_if_addr(s, ifname, cfg.addr)
        .map_err(|e| format!("{ifname}: set address {}: {e}", cfg.addr))?;
    crate::sys::set_if_netmask(s, ifname, cfg.netmask())
        .map_err(|e| format!("{ifname}: set netmask {}: {e}", cfg.netmask()))?;
    crate::sys::set_if_up(s, ifname).map_err(|e| format!("{ifname}: up: {e}"))?;
    if let Some(gw) = cfg.gateway {
        crate::sys::add_default_route(s, gw).map_err(|e| format!("default route via {gw}: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netmasks() {
        assert_eq!(netmask(0), Ipv4Addr::new(0, 0, 0, 0));
        assert_eq!(netmask(8), Ipv4Addr::new(255, 0, 0, 0));
        assert_eq!(netmask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(netmask(25), Ipv4Addr::new(255, 255, 255, 128));
        assert_eq!(netmask(32), Ipv4Addr::new(255, 255, 255, 255));
    }

    #[test]
    fn cidr_parsing() {
        assert_eq!(
            parse_cidr("10.0.2.15/24"),
            Ok((Ipv4Addr::new(10, 0, 2, 15), 24))
        );
        assert_eq!(
            parse_cidr("10.0.2.15"),
            Ok((Ipv4Addr::new(10, 0, 2, 15), 32))
        );
        for bad in [
            "10.0.2/24",
            "10.0.2.15/33",
            "10.0.2.15/",
            "x/24",
            "10.0.2.15/-1",
        ] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn config_from_the_command_line() {
        let c = "console=ttyS0 sealgate.ip=10.0.2.15/24 sealgate.gw=10.0.2.2";
        assert_eq!(
            config_from_cmdline(c),
            Ok(Some(NetConfig {
                addr: Ipv4Addr::new(10, 0, 2, 15),
                prefix: 24,
                gateway: Some(Ipv4Addr::new(10, 0, 2, 2)),
            }))
        );
        assert_eq!(config_from_cmdline("console=ttyS0"), Ok(None));
        let no_gw = config_from_cmdline("sealgate.ip=192.168.7.2/30").unwrap_or_default();
        assert_eq!(no_gw.map(|c| c.gateway), Some(None));
        let e = config_from_cmdline("sealgate.ip=10.0.2.15/24 sealgate.gw=10.0.3.2").unwrap_err();
        assert!(e.contains("outside"), "{e}");
        assert!(config_from_cmdline("sealgate.ip=10.0.2.15/24 sealgate.gw=nope").is_err());
        assert!(config_from_cmdline("sealgate.ip=nope").is_err());
    }
}
