//! The few system calls that neither std nor rustix wraps safely: loading a kernel module from
//! a file, the watchdog ioctls, the IPv4 interface and route ioctls, and adopting an inherited
//! file descriptor. Each `unsafe` block says why it is sound; everything else in the crate is
//! safe code on top of these functions.
#![allow(unsafe_code)]

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// `_IOC(dir, 'W', nr, sizeof(int))` of `<linux/watchdog.h>`.
const fn wdioc(dir: libc::Ioctl, nr: libc::Ioctl) -> libc::Ioctl {
    (dir << 30)
        | ((size_of::<libc::c_int>() as libc::Ioctl) << 16)
        | ((b'W' as libc::Ioctl) << 8)
        | nr
}
const IOC_WRITE: libc::Ioctl = 1;
const IOC_READ: libc::Ioctl = 2;
/// `_IOR('W', 5, int)`.
const WDIOC_KEEPALIVE: libc::Ioctl = wdioc(IOC_READ, 5);
/// `_IOWR('W', 6, int)`.
const WDIOC_SETTIMEOUT: libc::Ioctl = wdioc(IOC_READ | IOC_WRITE, 6);
/// `_IOR('W', 7, int)`.
const WDIOC_GETTIMEOUT: libc::Ioctl = wdioc(IOC_READ, 7);

fn check(r: libc::c_long) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `finit_module(fd, "", 0)`: loads the kernel module in the open file `fd`.
pub(crate) fn finit_module(fd: BorrowedFd<'_>) -> io::Result<()> {
    let params = c"";
    // SAFETY: finit_module(2) takes an open file descriptor (valid for the borrow), a pointer to
    // a NUL-terminated parameter string (a static C string literal) and flags (0); it does not
    // keep either pointer past the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            fd.as_raw_fd(),
            params.as_ptr(),
            0 as libc::c_int,
        )
    };
    check(r)
}

/// An ioctl whose argument is a pointer to one `int` (the watchdog ioctls).
fn ioctl_int(fd: BorrowedFd<'_>, request: libc::Ioctl, value: &mut libc::c_int) -> io::Result<()> {
    // SAFETY: `fd` is open for the borrow; the watchdog ioctls read and/or write exactly one
    // `int` through the pointer, which points to a live, exclusively borrowed `c_int`.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request, value as *mut libc::c_int) };
    check(r.into())
}

/// `WDIOC_KEEPALIVE`: restarts the watchdog's countdown.
pub(crate) fn watchdog_keepalive(fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut ignored = 0;
    ioctl_int(fd, WDIOC_KEEPALIVE, &mut ignored)
}

/// `WDIOC_SETTIMEOUT`: sets the timeout; returns the one the driver actually chose.
pub(crate) fn watchdog_set_timeout(fd: BorrowedFd<'_>, seconds: u32) -> io::Result<u32> {
    let mut v = libc::c_int::try_from(seconds)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "watchdog timeout too large"))?;
    ioctl_int(fd, WDIOC_SETTIMEOUT, &mut v)?;
    Ok(u32::try_from(v).unwrap_or(seconds))
}

/// `WDIOC_GETTIMEOUT`: the current timeout in seconds.
pub(crate) fn watchdog_get_timeout(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut v = 0;
    ioctl_int(fd, WDIOC_GETTIMEOUT, &mut v)?;
    u32::try_from(v)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "negative watchdog timeout"))
}

/// Takes ownership of a descriptor this process inherited (named by the environment), after
/// checking that it is open and that `accept` (given it borrowed) agrees; when either check
/// fails the descriptor is left as it was, open and not owned. The caller must make sure
/// nothing else in the process owns it (the appliance module adopts the watchdog descriptor at
/// most once per process).
pub(crate) fn adopt_inherited_fd(
    fd: RawFd,
    accept: impl FnOnce(BorrowedFd<'_>) -> io::Result<()>,
) -> io::Result<OwnedFd> {
    if fd < 3 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("descriptor {fd} is one of stdin, stdout or stderr"),
        ));
    }
    // SAFETY: fcntl(F_GETFD) only queries the descriptor table; any integer is acceptable and an
    // unused one yields EBADF.
    let r = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    check(r.into())?;
    // SAFETY: the descriptor is open (checked above) and stays open for the borrow, which
    // ends with this call (`accept` cannot keep it: the lifetime is local).
    accept(unsafe { BorrowedFd::borrow_raw(fd) })?;
    // SAFETY: the descriptor is open (checked above), was handed to this process by its parent
    // for it to own, and the only caller adopts it at most once, so no other owner exists.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An interface request naming `ifname`, with `ifru` as the payload.
fn ifreq(ifname: &str, ifru: libc::__c_anonymous_ifr_ifru) -> io::Result<libc::ifreq> {
    let mut name = [0 as libc::c_char; libc::IFNAMSIZ];
    let bytes = ifname.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {ifname:?}"),
        ));
    }
    for (d, s) in name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    Ok(libc::ifreq {
        ifr_name: name,
        ifr_ifru: ifru,
    })
}

/// `struct sockaddr` holding the IPv4 address `addr` (port 0), as `struct sockaddr_in` lays it
/// out: family, port (2 bytes), address (4 bytes), zeros.
pub(crate) fn sockaddr_v4(addr: Ipv4Addr) -> libc::sockaddr {
    let mut data = [0 as libc::c_char; 14];
    for (d, s) in data[2..6].iter_mut().zip(addr.octets()) {
        *d = s as libc::c_char;
    }
    libc::sockaddr {
        sa_family: libc::AF_INET as libc::sa_family_t,
        sa_data: data,
    }
}

/// An ioctl on a socket whose argument is a `struct ifreq` or `struct rtentry`.
fn ioctl_ptr<T>(sock: BorrowedFd<'_>, request: libc::Ioctl, arg: &mut T) -> io::Result<()> {
    // SAFETY: `sock` is an open socket for the borrow; the SIOC* requests used here read and/or
    // write the one `struct ifreq` / `struct rtentry` the pointer refers to, which is live and
    // exclusively borrowed for the call; the structs are the C layouts from `libc`.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), request, arg as *mut T) };
    check(r.into())
}

/// `SIOCSIFADDR`: sets the interface's IPv4 address.
pub(crate) fn set_if_addr(sock: BorrowedFd<'_>, ifname: &str, addr: Ipv4Addr) -> io::Result<()> {
    let mut req = ifreq(
        ifname,
        libc::__c_anonymous_ifr_ifru {
            ifru_addr: sockaddr_v4(addr),
        },
    )?;
    ioctl_ptr(sock, libc::SIOCSIFADDR, &mut req)
}

/// `SIOCSIFNETMASK`: sets the interface's IPv4 netmask.
pub(crate) fn set_if_netmask(sock: BorrowedFd<'_>, ifname: &str, mask: Ipv4Addr) -> io::Result<()> {
    let mut req = ifreq(
        ifname,
        libc::__c_anonymous_ifr_ifru {
            ifru_netmask: sockaddr_v4(mask),
        },
    )?;
    ioctl_ptr(sock, libc::SIOCSIFNETMASK, &mut req)
}

/// `SIOCGIFFLAGS` then `SIOCSIFFLAGS` with `IFF_UP` added.
pub(crate) fn set_if_up(sock: BorrowedFd<'_>, ifname: &str) -> io::Result<()> {
    let mut req = ifreq(ifname, libc::__c_anonymous_ifr_ifru { ifru_flags: 0 })?;
    ioctl_ptr(sock, libc::SIOCGIFFLAGS, &mut req)?;
    // SAFETY: SIOCGIFFLAGS succeeded, so the kernel wrote the `ifru_flags` member; it was also
    // initialised by us before, so reading this `c_short` reads an initialised value either way.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    ioctl_ptr(sock, libc::SIOCSIFFLAGS, &mut req)
}

/// `SIOCADDRT`: adds the default route (0.0.0.0/0) via `gateway`.
pub(crate) fn add_default_route(sock: BorrowedFd<'_>, gateway: Ipv4Addr) -> io::Result<()> {
    let mut rt = libc::rtentry {
        rt_pad1: 0,
        rt_dst: sockaddr_v4(Ipv4Addr::UNSPECIFIED),
        rt_gateway: sockaddr_v4(gateway),
        rt_genmask: sockaddr_v4(Ipv4Addr::UNSPECIFIED),
        rt_flags: libc::RTF_UP | libc::RTF_GATEWAY,
        rt_pad2: 0,
        rt_pad3: 0,
        rt_tos: 0,
        rt_class: 0,
        rt_pad4: [0; 3],
        rt_metric: 0,
        rt_dev: std::ptr::null_mut(),
        rt_mtu: 0,
        rt_window: 0,
        rt_irtt: 0,
    };
    ioctl_ptr(sock, libc::SIOCADDRT, &mut rt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_request_numbers_match_linux_watchdog_h() {
        assert_eq!(WDIOC_KEEPALIVE, 0x8004_5705);
        assert_eq!(WDIOC_SETTIMEOUT, 0xC004_5706);
        assert_eq!(WDIOC_GETTIMEOUT, 0x8004_5707);
    }

    #[test]
    fn sockaddr_v4_has_the_sockaddr_in_layout() {
        let sa = sockaddr_v4(Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(sa.sa_family, libc::AF_INET as libc::sa_family_t);
        let data: Vec<u8> = sa.sa_data.iter().map(|&c| c as u8).collect();
        assert_eq!(data, [0, 0, 10, 0, 2, 15, 0, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn bad_interface_names_are_refused() {
        for name in ["", "0123456789abcdef", "a\0b"] {
            assert!(ifreq(name, libc::__c_anonymous_ifr_ifru { ifru_flags: 0 }).is_err());
        }
        assert!(ifreq("eth0", libc::__c_anonymous_ifr_ifru { ifru_flags: 0 }).is_ok());
    }

    #[test]
    fn adopting_a_closed_or_standard_descriptor_fails() {
        assert!(adopt_inherited_fd(1, |_| Ok(())).is_err());
        assert!(adopt_inherited_fd(1_000_000, |_| Ok(())).is_err());
    }
}
