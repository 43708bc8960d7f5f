//! The announcement after a failover: a gratuitous ARP for the guest's address from the
//! guest's MAC, broadcast on the bridge, so that switches learn the MAC's new port and
//! neighbours refresh their ARP caches before the guest says anything itself.

use std::net::Ipv4Addr;

/// `ETH_P_ARP`.
const ETH_P_ARP: u16 = 0x0806;
/// The shortest Ethernet frame without its checksum.
const MIN_FRAME: usize = 60;

/// Errors announcing a guest.
#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    /// A MAC address that does not parse.
    #[error("{0:?} is not a MAC address (six hex bytes separated by colons)")]
    BadMac(String),
    /// The interface to announce on does not exist.
    #[error("interface {0} does not exist (the bridge the guest's vif is on)")]
    NoInterface(String),
    /// The packet socket cannot be opened or written.
    #[error("sending the gratuitous ARP on {iface}")]
    Send {
        /// The interface.
        iface: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Parse `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], AnnounceError> {
    let bad = || AnnounceError::BadMac(s.to_string());
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next().ok_or_else(bad)?;
        if p.is_empty() || p.len() > 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(mac)
}

/// The gratuitous ARP frame: a broadcast ARP request from `mac` for `ip` (sender and
/// target address both `ip`), padded to the minimum frame size.
pub fn garp_frame(mac: [u8; 6], ip: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(MIN_FRAME);
    f.extend_from_slice(&[0xff; 6]); // destination: broadcast
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    f.extend_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    f.extend_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    f.extend_from_slice(&[6, 4]);
    f.extend_from_slice(&1u16.to_be_bytes()); // request
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ip.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&ip.octets());
    f.resize(MIN_FRAME, 0);
    f
}

/// The index of interface `iface` in this thread's network namespace.
fn if_index(iface: &str) -> Result<i32, AnnounceError> {
    let name =
        std::ffi::CString::new(iface).map_err(|_| AnnounceError::NoInterface(iface.to_string()))?;
    // SAFETY: `name` is a NUL-terminated string that lives across the call; the call only
    // reads it.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    match i32::try_from(index) {
        Ok(i) if i > 0 => Ok(i),
        _ => Err(AnnounceError::NoInterface(iface.to_string())),
    }
}

/// Check that `iface` exists (at start, long before the announcement is needed).
pub fn check_interface(iface: &str) -> Result<(), AnnounceError> {
    if_index(iface).map(drop)
}

/// Broadcast `count` gratuitous ARPs for `ip` from `mac` on `iface` through a raw packet
/// socket.
pub fn gratuitous_arp(
    iface: &str,
    mac: [u8; 6],
    ip: Ipv4Addr,
    count: usize,
) -> Result<(), AnnounceError> {
    let index = if_index(iface)?;
    let send_err = |source| AnnounceError::Send {
        iface: iface.to_string(),
        source,
    };
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(ETH_P_ARP.to_be()),
        )
    };
    if fd < 0 {
        return Err(send_err(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a socket just opened here and owned by nothing else.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let frame = garp_frame(mac, ip);
    // SAFETY: sockaddr_ll is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = ETH_P_ARP.to_be();
    addr.sll_ifindex = index;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    for _ in 0..count.max(1) {
        // SAFETY: `fd` is an open packet socket; `frame` is valid for `frame.len()` bytes
        // and `addr` is a sockaddr_ll of the size passed; both outlive the call.
        let n = unsafe {
            libc::sendto(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                std::ptr::from_ref(&addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(send_err(std::io::Error::last_os_error()));
        }
    }
    tracing::info!(iface, %ip, mac = %format_mac(mac), count, "sent gratuitous ARP");
    Ok(())
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_and_print_back() {
        let m = parse_mac("00:16:3E:0a:b:ff").unwrap();
        assert_eq!(m, [0x00, 0x16, 0x3e, 0x0a, 0x0b, 0xff]);
        assert_eq!(format_mac(m), "00:16:3e:0a:0b:ff");
        for bad in [
            "",
            "00:16:3e:0a:0b",
            "00:16:3e:0a:0b:ff:00",
            "00:16:3e:0a:0b:fff",
            "zz:16:3e:0a:0b:ff",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_frame_is_a_broadcast_arp_request_for_the_guests_own_address() {
        let mac = [2, 0, 0, 0, 0, 7];
        let ip = Ipv4Addr::new(10, 1, 2, 3);
        let f = garp_frame(mac, ip);
        assert_eq!(f.len(), MIN_FRAME);
        assert_eq!(&f[..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &mac);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[20..22], &[0, 1]); // request
        assert_eq!(&f[22..28], &mac); // sender MAC
        assert_eq!(&f[28..32], &ip.octets()); // sender IP
        assert_eq!(&f[38..42], &ip.octets()); // target IP
    }
}
