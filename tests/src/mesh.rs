//! A partition lab: nodes (hosts, etcd members) in network namespaces of their own, every
//! two of them joined by a link of their own, so that any one link can be cut and healed
//! while the others carry on. Each link is two veths meeting at a bridge in a hub
//! namespace; cutting it takes the hub's two ports down, so both nodes keep their
//! interface, route and neighbour and lose only the carrier: what they send is dropped
//! silently (no reset, no "unreachable"), as in a real partition. Each node has one
//! address (on its loopback) that every other node reaches over their shared link, and
//! named hosts also get a link to the test's own namespace, where the world listens; that
//! link is never cut. Needs root and iproute2's `ip`.

use std::net::Ipv4Addr;

use crate::netns::{ip, ip_in, sysctl_in};

/// Nodes in namespaces, a cuttable link between every two.
#[derive(Debug)]
pub struct Mesh {
    names: Vec<String>,
    namespaces: Vec<String>,
    ips: Vec<Ipv4Addr>,
    /// The world's address as each node reaches it (hosts given a world link only).
    world: Vec<Option<Ipv4Addr>>,
    hub: String,
    /// The test namespace's ends of the world links (deleted on drop).
    world_ends: Vec<String>,
}

impl Mesh {
    /// Make a namespace per node of `nodes` (short names such as `p`, `e1`), a link
    /// between every two, and a world link for each node named in `with_world` (at most
    /// two). Names and subnets come from this process's id, so runs side by side do not
    /// meet.
    pub fn create(nodes: &[&str], with_world: &[&str]) -> Result<Self, String> {
        let pid = std::process::id();
        let tag = pid % 10_000;
        let net = u8::try_from(pid % 250).unwrap_or(0) + 1;
        if with_world.len() > 2 || nodes.len() > 9 {
            return Err(format!(
                "a mesh has at most 9 nodes and 2 world links, not {} and {}",
                nodes.len(),
                with_world.len()
            ));
        }
        let mut m = Self {
            names: nodes.iter().map(|n| (*n).to_owned()).collect(),
            namespaces: nodes.iter().map(|n| format!("castor-m{tag}-{n}")).collect(),
            ips: (0..nodes.len())
                .map(|i| Ipv4Addr::new(10, 217, net, u8::try_from(i + 1).unwrap_or(250)))
                .collect(),
            world: vec![None; nodes.len()],
            hub: format!("castor-m{tag}-hub"),
            world_ends: Vec::new(),
        };
        // From here on, a failure drops `m`, which deletes what was made.
        for ns in m.namespaces.iter().chain([&m.hub]) {
            let _ = ip(&["netns", "del", ns]); // a crashed earlier run's leftover
            ip(&["netns", "add", ns])?;
            sysctl_in(ns, "net.ipv6.conf.all.disable_ipv6=1")?;
            sysctl_in(ns, "net.ipv6.conf.default.disable_ipv6=1")?;
            ip_in(ns, &["link", "set", "lo", "up"])?;
        }
        for (ns, addr) in m.namespaces.iter().zip(&m.ips) {
            ip_in(ns, &["addr", "add", &format!("{addr}/32"), "dev", "lo"])?;
        }
        for i in 0..nodes.len() {
            for j in i + 1..nodes.len() {
                m.link(i, j, net)?;
            }
        }
        for (k, name) in with_world.iter().enumerate() {
            let i = m.index(name)?;
            let o = [10, 218 + u8::try_from(k).unwrap_or(0), net];
            let (here, there) = (
                Ipv4Addr::new(o[0], o[1], o[2], 1),
                Ipv4Addr::new(o[0], o[1], o[2], 2),
            );
            let end = format!("cm{tag}w{k}");
            let _ = ip(&["link", "del", &end]); // a crashed earlier run's leftover
            ip(&[
                "link",
                "add",
                &end,
                "type",
                "veth",
                "peer",
                "name",
                "world",
                "netns",
                &m.namespaces[i],
            ])?;
            m.world_ends.push(end.clone());
            ip(&["addr", "add", &format!("{here}/24"), "dev", &end])?;
            ip(&["link", "set", &end, "up"])?;
            let ns = &m.namespaces[i];
            ip_in(ns, &["addr", "add", &format!("{there}/24"), "dev", "world"])?;
            ip_in(ns, &["link", "set", "world", "up"])?;
            m.world[i] = Some(here);
        }
        Ok(m)
    }

    /// The link between nodes `i` and `j`: `to_<j>` in `i` and `to_<i>` in `j`, each a
    /// veth whose other end is a port of bridge `br<i><j>` in the hub; a /32 route and a
    /// permanent neighbour on each side, so nothing is resolved while it is cut.
    fn link(&self, i: usize, j: usize, net: u8) -> Result<(), String> {
        let hub = self.hub.as_str();
        let bridge = format!("br{i}{j}");
        ip_in(hub, &["link", "add", &bridge, "type", "bridge"])?;
        let mac = |a: usize, b: usize| format!("02:ca:59:{net:02x}:{a:02x}:{b:02x}");
        for (a, b) in [(i, j), (j, i)] {
            let dev = format!("to_{}", self.names[b]);
            let port = self.port(a, b);
            ip(&[
                "link",
                "add",
                &dev,
                "netns",
                &self.namespaces[a],
                "address",
                &mac(a, b),
                "type",
                "veth",
                "peer",
                "name",
                &port,
                "netns",
                hub,
            ])?;
            ip_in(hub, &["link", "set", &port, "master", &bridge, "up"])?;
            let ns = &self.namespaces[a];
            ip_in(ns, &["link", "set", &dev, "up"])?;
            let (me, peer) = (self.ips[a].to_string(), self.ips[b].to_string());
            ip_in(
                ns,
                &[
                    "route",
                    "add",
                    &format!("{peer}/32"),
                    "dev",
                    &dev,
                    "src",
                    &me,
                ],
            )?;
            ip_in(
                ns,
                &[
                    "neigh",
                    "replace",
                    &peer,
                    "lladdr",
                    &mac(b, a),
                    "dev",
                    &dev,
                    "nud",
                    "permanent",
                ],
            )?;
        }
        ip_in(hub, &["link", "set", &bridge, "up"])
    }

    /// The hub's port of node `a`'s veth towards `b`.
    fn port(&self, a: usize, b: usize) -> String {
        format!("p{a}{b}")
    }

    fn index(&self, name: &str) -> Result<usize, String> {
        self.names
            .iter()
            .position(|n| n == name)
            .ok_or_else(|| format!("no node {name:?} in the mesh"))
    }

    /// Node `name`'s namespace.
    pub fn ns(&self, name: &str) -> Result<&str, String> {
        Ok(&self.namespaces[self.index(name)?])
    }

    /// Node `name`'s address (every other node reaches it there over their link).
    pub fn ip(&self, name: &str) -> Result<Ipv4Addr, String> {
        Ok(self.ips[self.index(name)?])
    }

    /// The world's address as node `name` reaches it (an error without a world link).
    pub fn world_ip(&self, name: &str) -> Result<Ipv4Addr, String> {
        self.world[self.index(name)?].ok_or_else(|| format!("node {name:?} has no world link"))
    }

    /// Cut (`up` false) or heal the link between `a` and `b`.
    pub fn set_link(&self, a: &str, b: &str, up: bool) -> Result<(), String> {
        let (i, j) = (self.index(a)?, self.index(b)?);
        if i == j {
            return Err(format!("no link from {a:?} to itself"));
        }
        let state = if up { "up" } else { "down" };
        for (x, y) in [(i, j), (j, i)] {
            ip_in(&self.hub, &["link", "set", &self.port(x, y), state])?;
        }
        Ok(())
    }

    /// Heal every link.
    pub fn heal_all(&self) -> Result<(), String> {
        for i in 0..self.names.len() {
            for j in i + 1..self.names.len() {
                self.set_link(&self.names[i], &self.names[j], true)?;
            }
        }
        Ok(())
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        for end in &self.world_ends {
            let _ = ip(&["link", "del", end]);
        }
        // Deleting a namespace destroys its veth ends, and with them their peers.
        for ns in self.namespaces.iter().chain([&self.hub]) {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}
