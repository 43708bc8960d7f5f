//! Two hosts on one machine: network namespaces joined by a veth pair (the replication
//! link, which a test can cut while both sides live), each with a second veth to the
//! test's own namespace, where the world listens. Needs root and iproute2's `ip`.

use std::net::Ipv4Addr;
use std::process::Command;

/// A primary host and a backup host, in namespaces this test created.
#[derive(Debug)]
pub struct NetPair {
    /// The primary's namespace.
    pub primary_ns: String,
    /// The backup's namespace.
    pub backup_ns: String,
    /// The primary's address on the replication link.
    pub primary_ip: Ipv4Addr,
    /// The backup's address on the replication link.
    pub backup_ip: Ipv4Addr,
    /// The world's address as the primary reaches it.
    pub world_from_primary: Ipv4Addr,
    /// The world's address as the backup reaches it.
    pub world_from_backup: Ipv4Addr,
    link_p: String,
    link_b: String,
}

/// Run `ip` with `args`; the error names the command and what it printed.
pub(crate) fn ip(args: &[&str]) -> Result<(), String> {
    run_tool("ip", args)
}

/// Run `tool` with `args`; the error names the command and what it printed.
pub(crate) fn run_tool(tool: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(tool)
        .args(args)
        .output()
        .map_err(|e| format!("{tool} {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{tool} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl NetPair {
    /// Create both namespaces and their three links; `id` keeps names and subnets apart
    /// from other pairs (1..=250).
    pub fn create(id: u8) -> Result<Self, String> {
        let tag = format!("{}{id}", std::process::id() % 10_000);
        let p = Self {
            primary_ns: format!("castor-p{tag}"),
            backup_ns: format!("castor-b{tag}"),
            primary_ip: Ipv4Addr::new(10, 213, id, 1),
            backup_ip: Ipv4Addr::new(10, 213, id, 2),
            world_from_primary: Ipv4Addr::new(10, 214, id, 1),
            world_from_backup: Ipv4Addr::new(10, 215, id, 1),
            link_p: format!("crp{tag}"),
            link_b: format!("crb{tag}"),
        };
        // Clean leftovers of a crashed earlier run with the same names.
        let _ = ip(&["netns", "del", &p.primary_ns]);
        let _ = ip(&["netns", "del", &p.backup_ns]);
        ip(&["netns", "add", &p.primary_ns])?;
        ip(&["netns", "add", &p.backup_ns])?;
        // The replication link.
        let (pa, ba) = (
            format!("{}/24", p.primary_ip),
            format!("{}/24", p.backup_ip),
        );
        p.veth(
            (&p.link_p, Some(&p.primary_ns), &pa),
            (&p.link_b, Some(&p.backup_ns), &ba),
        )?;
        // The world links: the test's namespace ↔ each host.
        for (ns, world, n) in [
            (&p.primary_ns, p.world_from_primary, "p"),
            (&p.backup_ns, p.world_from_backup, "b"),
        ] {
            let o = world.octets();
            let host = format!("{}.{}.{}.2/24", o[0], o[1], o[2]);
            p.veth(
                (&format!("cw{n}{tag}"), None, &format!("{world}/24")),
                (&format!("cv{n}{tag}"), Some(ns), &host),
            )?;
        }
        for ns in [&p.primary_ns, &p.backup_ns] {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(p)
    }

    /// A veth pair `(name, namespace, address/prefix)` per end, both up.
    fn veth(
        &self,
        a: (&str, Option<&str>, &str),
        b: (&str, Option<&str>, &str),
    ) -> Result<(), String> {
        ip(&["link", "add", a.0, "type", "veth", "peer", "name", b.0])?;
        for (name, ns, addr) in [a, b] {
            if let Some(ns) = ns {
                ip(&["link", "set", name, "netns", ns])?;
            }
            let mut pre: Vec<&str> = Vec::new();
            if let Some(ns) = ns {
                pre.extend(["-n", ns]);
            }
            ip(&[&pre[..], &["addr", "add", addr, "dev", name]].concat())?;
            ip(&[&pre[..], &["link", "set", name, "up"]].concat())?;
        }
        Ok(())
    }

    /// Cut the replication link: both ends go down, so packets are dropped silently (no
    /// reset reaches either side) while both hosts keep running.
    pub fn cut(&self) -> Result<(), String> {
        ip(&["-n", &self.primary_ns, "link", "set", &self.link_p, "down"])?;
        ip(&["-n", &self.backup_ns, "link", "set", &self.link_b, "down"])
    }

    /// Whether namespaces can be made here: `true`, or `false` to skip (the reason
    /// printed); panics when `CASTOR_REQUIRE_NETNS=1` and they cannot.
    pub fn available() -> bool {
        // One name per call: tests that ask at the same time must not share a probe.
        static PROBES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let probe = format!("castor-probe{}-{n}", std::process::id());
        let res = ip(&["netns", "add", &probe]);
        let _ = ip(&["netns", "del", &probe]);
        match res {
            Ok(()) => true,
            Err(e) => {
                assert!(
                    std::env::var("CASTOR_REQUIRE_NETNS").as_deref() != Ok("1"),
                    "CASTOR_REQUIRE_NETNS=1 but network namespaces cannot be made: {e}"
                );
                eprintln!("skipped: network namespaces cannot be made here ({e})");
                false
            }
        }
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        // Deleting a namespace destroys its veth ends, and with them their peers.
        let _ = ip(&["netns", "del", &self.primary_ns]);
        let _ = ip(&["netns", "del", &self.backup_ns]);
    }
}

/// A guest's network as Xen lays it out, in three namespaces this test created: the
/// guest's (its interface `eth0` is one end of a veth pair), dom0's (the other end is the
/// guest's *vif*, a port of bridge `br0` together with a link to the client), and the
/// client's (`eth0` on the same subnet). Addresses are fixed and neighbours static, so no
/// ARP or IPv6 chatter crosses the vif.
#[derive(Debug)]
pub struct GuestLan {
    /// The guest's namespace.
    pub guest_ns: String,
    /// Dom0's namespace (the vif, the bridge).
    pub dom0_ns: String,
    /// The client's namespace.
    pub client_ns: String,
    /// The vif's name in dom0.
    pub vif: String,
    /// The guest's address.
    pub guest_ip: Ipv4Addr,
    /// The client's address.
    pub client_ip: Ipv4Addr,
    /// The guest's MAC.
    pub guest_mac: [u8; 6],
}

/// Run `ip -n ns args`.
pub(crate) fn ip_in(ns: &str, args: &[&str]) -> Result<(), String> {
    ip(&[&["-n", ns][..], args].concat())
}

/// Run `sysctl -w` in `ns` (through `ip netns exec`).
pub(crate) fn sysctl_in(ns: &str, setting: &str) -> Result<(), String> {
    ip(&["netns", "exec", ns, "sysctl", "-q", "-w", setting])
}

impl GuestLan {
    /// Create the three namespaces and their links; `id` keeps names and subnets apart
    /// (1..=250).
    pub fn create(id: u8) -> Result<Self, String> {
        let tag = format!("{}{id}", std::process::id() % 10_000);
        let lan = Self {
            guest_ns: format!("castor-g{tag}"),
            dom0_ns: format!("castor-d{tag}"),
            client_ns: format!("castor-c{tag}"),
            vif: format!("vif{tag}"),
            guest_ip: Ipv4Addr::new(10, 216, id, 2),
            client_ip: Ipv4Addr::new(10, 216, id, 3),
            guest_mac: [0x02, 0xca, 0x57, 0, id, 2],
        };
        let client_mac = format!("02:ca:57:00:{id:02x}:03");
        for ns in [&lan.guest_ns, &lan.dom0_ns, &lan.client_ns] {
            let _ = ip(&["netns", "del", ns]);
            ip(&["netns", "add", ns])?;
            sysctl_in(ns, "net.ipv6.conf.all.disable_ipv6=1")?;
            sysctl_in(ns, "net.ipv6.conf.default.disable_ipv6=1")?;
            ip_in(ns, &["link", "set", "lo", "up"])?;
        }
        let guest_mac = format!("02:ca:57:00:{id:02x}:02");
        let cl = format!("cl{tag}");
        ip(&[
            "link",
            "add",
            "eth0",
            "netns",
            &lan.guest_ns,
            "address",
            &guest_mac,
            "type",
            "veth",
            "peer",
            "name",
            &lan.vif,
            "netns",
            &lan.dom0_ns,
        ])?;
        ip(&[
            "link",
            "add",
            "eth0",
            "netns",
            &lan.client_ns,
            "address",
            &client_mac,
            "type",
            "veth",
            "peer",
            "name",
            &cl,
            "netns",
            &lan.dom0_ns,
        ])?;
        ip_in(&lan.dom0_ns, &["link", "add", "br0", "type", "bridge"])?;
        for port in [&lan.vif, &cl] {
            ip_in(&lan.dom0_ns, &["link", "set", port, "master", "br0", "up"])?;
        }
        ip_in(&lan.dom0_ns, &["link", "set", "br0", "up"])?;
        for (ns, me, peer, peer_mac) in [
            (
                &lan.guest_ns,
                lan.guest_ip,
                lan.client_ip,
                client_mac.as_str(),
            ),
            (
                &lan.client_ns,
                lan.client_ip,
                lan.guest_ip,
                guest_mac.as_str(),
            ),
        ] {
            ip_in(ns, &["addr", "add", &format!("{me}/24"), "dev", "eth0"])?;
            ip_in(ns, &["link", "set", "eth0", "up"])?;
            let p = peer.to_string();
            ip_in(
                ns,
                &[
                    "neigh",
                    "replace",
                    &p,
                    "lladdr",
                    peer_mac,
                    "dev",
                    "eth0",
                    "nud",
                    "permanent",
                ],
            )?;
        }
        Ok(lan)
    }

    /// Run `f` on a thread inside namespace `ns` and return what it returns; sockets it
    /// opens stay in that namespace.
    pub fn run_in<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                enter(ns);
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }
}

/// Move the calling thread into network namespace `ns` (made by `ip netns add`).
pub(crate) fn enter(ns: &str) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(format!("/run/netns/{ns}"))
        .unwrap_or_else(|e| panic!("opening /run/netns/{ns}: {e}"));
    // SAFETY: `f` is an open namespace file for the whole call; setns only changes this
    // thread's network namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "setns into {ns}: {}",
        std::io::Error::last_os_error()
    );
}

impl Drop for GuestLan {
    fn drop(&mut self) {
        for ns in [&self.guest_ns, &self.dom0_ns, &self.client_ns] {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}
