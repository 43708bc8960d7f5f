//! Hosts on one machine for the many-pairs drill: one network namespace per host, each
//! joined by a veth to a bridge in a hub namespace, with the bench's own namespace on the
//! same bridge (where etcd and the worlds listen); a real etcd member (Debian's
//! `etcd-server`) there; "killing a host" is SIGKILL to every process in its namespace.
//! Everything is torn down on drop. Needs root and iproute2's `ip`.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::pair::Kill;

/// Errors making the hosts or their etcd.
#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    /// A command could not be run at all.
    #[error("cannot run `{0}`")]
    Run(String, #[source] std::io::Error),
    /// A command failed.
    #[error("`{0}` failed: {1}")]
    Failed(String, String),
    /// etcd could not be started.
    #[error("cannot start etcd (install Debian's etcd-server)")]
    EtcdSpawn(#[source] std::io::Error),
    /// etcd did not answer healthy in time.
    #[error("etcd did not become healthy within {0:?}; see {1}")]
    EtcdStalled(Duration, PathBuf),
    /// Local I/O.
    #[error("hosts I/O")]
    Io(#[from] std::io::Error),
}

/// Run `ip` with `args`.
fn ip(args: &[&str]) -> Result<String, HostsError> {
    let cmd = || format!("ip {}", args.join(" "));
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| HostsError::Run(cmd(), e))?;
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(HostsError::Failed(cmd(), why));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `count` hosts (namespaces) on one bridge, with the bench's namespace on it too.
#[derive(Debug)]
pub struct Hosts {
    /// Each host's namespace.
    pub names: Vec<String>,
    /// Each host's address on the bridge.
    pub ips: Vec<Ipv4Addr>,
    /// The bench's own address on the bridge (etcd and the worlds listen there).
    pub bench_ip: Ipv4Addr,
    hub: String,
    /// The bench's end of its veth to the hub.
    bench_end: String,
}

impl Hosts {
    /// Make `count` (at most 200) host namespaces and the hub; names and the /24 subnet
    /// are taken from this process's id, so runs side by side do not meet.
    pub fn create(count: usize) -> Result<Self, HostsError> {
        let pid = std::process::id();
        let tag = pid % 100_000;
        let net = u8::try_from(pid % 250).unwrap_or(0) + 1;
        let hosts = Self {
            names: (0..count).map(|i| format!("castor-h{tag}-{i}")).collect(),
            ips: (0..count)
                .map(|i| Ipv4Addr::new(10, 220, net, u8::try_from(i + 1).unwrap_or(253)))
                .collect(),
            bench_ip: Ipv4Addr::new(10, 220, net, 254),
            hub: format!("castor-hub{tag}"),
            bench_end: format!("cb{tag}"),
        };
        // From here on, a failure drops `hosts`, which deletes what was made.
        for ns in hosts.names.iter().chain([&hosts.hub]) {
            let _ = ip(&["netns", "del", ns]); // a crashed earlier run's leftover
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        let hub = hosts.hub.as_str();
        ip(&["-n", hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", hub, "link", "set", "br0", "up"])?;
        for (i, (ns, addr)) in hosts.names.iter().zip(&hosts.ips).enumerate() {
            let port = format!("h{i}");
            ip(&[
                "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", &port, "netns",
                hub,
            ])?;
            ip(&["-n", hub, "link", "set", &port, "master", "br0", "up"])?;
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        }
        // The bench's end: deleting the hub deletes its peer, and with it this end.
        let bench_end = hosts.bench_end.as_str();
        let _ = ip(&["link", "del", bench_end]); // a crashed earlier run's leftover
        ip(&[
            "link", "add", bench_end, "type", "veth", "peer", "name", "bench", "netns", hub,
        ])?;
        ip(&["-n", hub, "link", "set", "bench", "master", "br0", "up"])?;
        let bench_addr = format!("{}/24", hosts.bench_ip);
        ip(&["addr", "add", &bench_addr, "dev", bench_end])?;
        ip(&["link", "set", bench_end, "up"])?;
        Ok(hosts)
    }

    /// The processes in host `i`'s namespace.
    pub fn pids(&self, i: usize) -> Vec<i32> {
        self.names.get(i).map_or_else(Vec::new, |ns| pids_in(ns))
    }

    /// Kill host `i`: SIGKILL every process in its namespace, waiting (at most 5 s) until
    /// none is left. With `power_off`, its link goes down first, as when a host loses
    /// power: nothing it sends reaches anyone, so no connection of its closes at the
    /// others. The number of processes killed.
    pub fn kill(&self, i: usize, power_off: bool) -> Result<usize, HostsError> {
        let Some(ns) = self.names.get(i) else {
            return Ok(0);
        };
        if power_off {
            ip(&["-n", ns, "link", "set", "eth0", "down"])?;
        }
        Ok(kill_all(ns))
    }
}

/// The processes in namespace `ns` (`ip netns pids`).
fn pids_in(ns: &str) -> Vec<i32> {
    ip(&["netns", "pids", ns])
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// SIGKILL every process in `ns`, until none is left or 5 s have passed; how many were
/// killed. A killed child of the bench stays a zombie until it is reaped, and a zombie
/// has left its namespace, so the loop ends.
fn kill_all(ns: &str) -> usize {
    let t = Instant::now();
    let mut killed = std::collections::BTreeSet::new();
    loop {
        let pids = pids_in(ns);
        if pids.is_empty() || t.elapsed() > Duration::from_secs(5) {
            return killed.len();
        }
        for pid in pids {
            // SAFETY: kill(2) with a pid read from the namespace's process list; no memory
            // is involved (a pid that ended meanwhile gives ESRCH).
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
            killed.insert(pid);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        // Deleting the hub would take this end with it, but only later: delete it now.
        let _ = ip(&["link", "del", &self.bench_end]);
        for ns in self.names.iter().chain([&self.hub]) {
            kill_all(ns);
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

/// One etcd member listening on the bench's address, killed with the value.
#[derive(Debug)]
pub struct EtcdMember {
    _child: Kill,
    /// Its client URL.
    pub url: String,
}

impl EtcdMember {
    /// Start a member with its data and log in `dir`, listening on `ip`, and wait (at
    /// most 30 s) until it answers healthy.
    pub fn start(dir: &Path, ip: Ipv4Addr) -> Result<Self, HostsError> {
        let port =
            || -> Result<u16, HostsError> { Ok(TcpListener::bind((ip, 0))?.local_addr()?.port()) };
        let client = SocketAddr::from((ip, port()?));
        let peer = format!("http://{ip}:{}", port()?);
        let url = format!("http://{client}");
        let log_path = dir.join("etcd.log");
        let log = std::fs::File::create(&log_path)?;
        let child = Command::new("etcd")
            .arg("--name=n1")
            .arg(format!("--data-dir={}", dir.join("etcd").display()))
            .arg(format!("--listen-client-urls={url}"))
            .arg(format!("--advertise-client-urls={url}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=n1={peer}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(HostsError::EtcdSpawn)?;
        let member = Self {
            _child: Kill(child),
            url,
        };
        let (t, limit) = (Instant::now(), Duration::from_secs(30));
        while !healthy(client) {
            if t.elapsed() > limit {
                return Err(HostsError::EtcdStalled(limit, log_path));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(member)
    }
}

/// Whether etcd at `addr` answers `GET /health` healthy.
fn healthy(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut answer = String::new();
    s.write_all(format!("GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .is_ok()
        && s.read_to_string(&mut answer).is_ok()
        && answer.contains("\"health\":\"true\"")
}
