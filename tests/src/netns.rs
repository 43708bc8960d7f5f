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
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
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
        let probe = format!("castor-probe{}", std::process::id());
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
