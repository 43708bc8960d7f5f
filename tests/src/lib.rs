//! Test harness for end-to-end Castor tests: start `ha-backup` and `ha-primary` as separate
//! processes on loopback, stand in for the world (an output consumer that checks output
//! commit against the backup's ack log), inject faults on the link (a TCP proxy), and read
//! the daemons' JSON-lines events.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

mod mesh;
mod netns;
pub use mesh::Mesh;
pub use netns::{GuestLan, NetPair};

/// The daemons [`bin`] builds on its first call.
const DAEMONS: [&str; 2] = ["ha-primary", "ha-backup"];

/// Where the workspace's daemon binaries are: beside this test's own executable, in its
/// profile's folder. The first call in a test process builds them (`cargo build -p
/// ha-primary -p ha-backup` with this test's profile and target folder; a no-op when they
/// are current), so a test never runs binaries older than the source;
/// `CASTOR_NO_BUILD=1` skips the build and takes the binaries as they are.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let dir = profile_dir();
    if std::env::var("CASTOR_NO_BUILD").as_deref() != Ok("1")
        && let Err(e) = BUILT.get_or_init(|| build_daemons(&dir))
    {
        panic!("{e}");
    }
    dir.join(name)
}

/// The folder of this profile's binaries: `<target>/<profile>/` above the test's
/// `deps/`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe()
        .unwrap_or_else(|e| panic!("cannot find this test's executable: {e}"));
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// The cargo profile whose output folder is named `dir_name` (`dev` writes to `debug/`).
fn cargo_profile(dir_name: &str) -> &str {
    match dir_name {
        "debug" => "dev",
        other => other,
    }
}

/// Build [`DAEMONS`] into `dir` (`<target>/<profile>`) with the profile that folder holds.
fn build_daemons(dir: &Path) -> Result<(), String> {
    let (Some(target), Some(profile)) = (dir.parent(), dir.file_name().and_then(|n| n.to_str()))
    else {
        return Err(format!(
            "cannot tell the target folder and profile from {} (set CASTOR_NO_BUILD=1 and build the daemons yourself)",
            dir.display()
        ));
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet", "--profile", cargo_profile(profile)])
        .arg("--target-dir")
        .arg(target);
    for d in DAEMONS {
        cmd.args(["-p", d]);
    }
    match cmd.status() {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(format!("building {} failed ({s})", DAEMONS.join(" and "))),
        Err(e) => Err(format!("cannot run cargo to build the daemons: {e}")),
    }
}

/// Whether KVM tests run here: `Ok(true)` with /dev/kvm, `Ok(false)` to skip (with the
/// reason printed), a panic when `CASTOR_REQUIRE_KVM=1` and it is missing.
pub fn kvm_or_skip() -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            assert!(
                std::env::var("CASTOR_REQUIRE_KVM").as_deref() != Ok("1"),
                "CASTOR_REQUIRE_KVM=1 but /dev/kvm cannot be opened: {e}"
            );
            eprintln!("skipped: /dev/kvm cannot be opened ({e})");
            false
        }
    }
}

/// A scratch directory for one test, removed on drop.
#[derive(Debug)]
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// A fresh directory named after `tag`.
    pub fn new(tag: &str) -> Self {
        let p =
            std::env::temp_dir().join(format!("castor-{tag}-{}-{}", std::process::id(), unique()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        Self(p)
    }

    /// A path inside it.
    pub fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn unique() -> u64 {
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A child process that is killed when dropped.
#[derive(Debug)]
pub struct Proc {
    /// The child.
    pub child: Child,
    /// Its name, for messages.
    pub name: String,
    /// Its stderr log file.
    pub log: PathBuf,
}

impl Proc {
    /// Start `bin` with `args`, stderr to `log`.
    pub fn spawn(name: &str, args: &[String], log: PathBuf) -> Self {
        Self::spawn_in(None, name, args, log)
    }

    /// Start `bin` with `args` inside network namespace `netns` (through `ip netns exec`,
    /// which execs the binary, so the child is the daemon itself), stderr to `log`.
    pub fn spawn_in(netns: Option<&str>, name: &str, args: &[String], log: PathBuf) -> Self {
        let err = std::fs::File::create(&log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin(name));
                c
            }
            None => Command::new(bin(name)),
        };
        let child = cmd
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin(name).display()));
        Self {
            child,
            name: name.to_string(),
            log,
        }
    }

    /// SIGKILL it now.
    pub fn kill9(&mut self) {
        // SAFETY: plain kill(2) on our own child's pid; no memory is involved.
        unsafe {
            libc::kill(self.child.id().cast_signed(), libc::SIGKILL);
        }
        let _ = self.child.wait();
    }

    /// Send it `sig` (SIGSTOP, SIGCONT, SIGTERM, …), if it still runs.
    pub fn signal(&mut self, sig: i32) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: plain kill(2) on our own child's pid, which has not been reaped (so
            // the pid is still ours); no memory is involved.
            unsafe {
                libc::kill(self.child.id().cast_signed(), sig);
            }
        }
    }

    /// Stop it (SIGSTOP) for `d`, then let it go on (SIGCONT): a stalled process.
    pub fn freeze_for(&mut self, d: Duration) {
        self.signal(libc::SIGSTOP);
        std::thread::sleep(d);
        self.signal(libc::SIGCONT);
    }

    /// Wait for it to exit (at most `limit`), returning the exit code (None: killed or
    /// still running after the limit, then it is killed).
    pub fn wait_for(&mut self, limit: Duration) -> Option<i32> {
        let t = Instant::now();
        while t.elapsed() < limit {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill9();
        None
    }

    /// Its stdout so far, once it has exited.
    pub fn stdout(&mut self) -> String {
        let mut s = String::new();
        if let Some(o) = self.child.stdout.as_mut() {
            let _ = o.read_to_string(&mut s);
        }
        s
    }

    /// Its log.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill9();
        }
    }
}

/// Create a pair key at `path` with `ha-primary keygen` (mode 0600), as an operator
/// would; panics when keygen fails.
pub fn keygen(path: &Path) -> PathBuf {
    let out = Command::new(bin("ha-primary"))
        .arg("keygen")
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("ha-primary keygen: {e}"));
    assert!(
        out.status.success(),
        "ha-primary keygen {} failed: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    path.to_path_buf()
}

/// Read a JSON-lines events file.
pub fn events(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The first event named `name`, waiting up to `limit` for it to appear.
pub fn wait_event(path: &Path, name: &str, limit: Duration) -> Option<serde_json::Value> {
    let t = Instant::now();
    loop {
        if let Some(e) = events(path).into_iter().find(|e| e["event"] == name) {
            return Some(e);
        }
        if t.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Wait for a file to exist and hold a socket address.
pub fn wait_addr(path: &Path, limit: Duration) -> SocketAddr {
    let t = Instant::now();
    loop {
        if let Ok(s) = std::fs::read_to_string(path)
            && let Ok(a) = s.trim().parse()
        {
            return a;
        }
        assert!(
            t.elapsed() < limit,
            "no address in {} after {limit:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The body of `GET /metrics` on a daemon's `--metrics` address (it must answer 200).
pub fn scrape(addr: SocketAddr) -> String {
    let (status, body) = ha_daemon::testing::http_get(addr, "/metrics");
    assert!(
        status.starts_with("HTTP/1.1 200"),
        "metrics at {addr}: {status}"
    );
    body
}

/// The value of the sample `name` (with its labels, if any, as written) in an exposition.
pub use ha_daemon::testing::sample;

/// The world: the output consumer shared with the drill.
pub use ha_wire::output::{Consumer as World, WorldView};

/// A fault to inject on the primary → backup direction, some time after the first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything.
    None,
    /// Flip one bit in the middle of the first chunk read after this long, then keep
    /// forwarding.
    FlipAfter(Duration),
    /// Forward half of the first chunk read after this long, then close both directions
    /// (a connection cut mid-frame).
    CutAfter(Duration),
    /// Replay: the first whole Noise message (`u16 LE length | message`, the channel's
    /// framing) that starts after this long is forwarded twice. Only meaningful on an
    /// encrypted link.
    DuplicateAfter(Duration),
}

/// A TCP proxy between primary and backup that can corrupt or cut the stream.
#[derive(Debug)]
pub struct Proxy {
    /// Where the primary should connect.
    pub addr: SocketAddr,
}

impl Proxy {
    /// Proxy to `backup`, injecting `fault` on the first connection.
    pub fn start(backup: SocketAddr, fault: Fault) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("bind: {e}"));
        let addr = l.local_addr().unwrap_or_else(|e| panic!("addr: {e}"));
        std::thread::spawn(move || {
            let Ok((down, _)) = l.accept() else { return };
            let Ok(up) = TcpStream::connect(backup) else {
                return;
            };
            let (mut d2, mut u2) = match (down.try_clone(), up.try_clone()) {
                (Ok(a), Ok(b)) => (a, b),
                _ => return,
            };
            // backup → primary: plain copy.
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut u2, &mut d2);
            });
            let (mut down, mut up) = (down, up);
            if let Fault::DuplicateAfter(d) = fault {
                replay_one_message(&mut down, &mut up, d);
                let _ = up.shutdown(std::net::Shutdown::Both);
                return;
            }
            let mut buf = [0u8; 16 << 10];
            let mut start = None;
            let mut flipped = false;
            loop {
                let n = match down.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let t0 = *start.get_or_insert_with(Instant::now);
                let chunk = &mut buf[..n];
                match fault {
                    Fault::FlipAfter(d) if !flipped && t0.elapsed() >= d => {
                        chunk[n / 2] ^= 0x10;
                        flipped = true;
                    }
                    Fault::CutAfter(d) if t0.elapsed() >= d => {
                        let _ = up.write_all(&chunk[..n / 2]);
                        let _ = up.shutdown(std::net::Shutdown::Both);
                        let _ = down.shutdown(std::net::Shutdown::Both);
                        return;
                    }
                    _ => {}
                }
                if up.write_all(chunk).is_err() {
                    break;
                }
            }
            let _ = up.shutdown(std::net::Shutdown::Both);
        });
        Self { addr }
    }
}

/// Forward Noise messages one by one from `down` to `up`; the first one that begins
/// `after` the first byte goes out twice.
fn replay_one_message(down: &mut TcpStream, up: &mut TcpStream, after: Duration) {
    let mut start = None;
    let mut replayed = false;
    loop {
        let mut len = [0u8; 2];
        if down.read_exact(&mut len).is_err() {
            return;
        }
        let t0 = *start.get_or_insert_with(Instant::now);
        let mut msg = vec![0u8; 2 + usize::from(u16::from_le_bytes(len))];
        msg[..2].copy_from_slice(&len);
        if down.read_exact(&mut msg[2..]).is_err() {
            return;
        }
        if up.write_all(&msg).is_err() {
            return;
        }
        if !replayed && t0.elapsed() >= after {
            replayed = true;
            if up.write_all(&msg).is_err() {
                return;
            }
        }
    }
}

/// A small deterministic PRNG (splitmix64) for seeded fault schedules.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo).max(1)
    }
}

/// Whether `etcd` (Debian's `etcd-server`) can be started here; a missing one fails the
/// run when `CASTOR_REQUIRE_ETCD=1`, else the caller skips.
pub fn etcd_or_skip() -> bool {
    let found = Command::new("etcd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var("CASTOR_REQUIRE_ETCD").as_deref() != Ok("1"),
            "CASTOR_REQUIRE_ETCD=1 but etcd is not installed (apt-get install etcd-server)"
        );
        eprintln!("skipped: etcd is not installed (apt-get install etcd-server)");
    }
    found
}

/// One etcd member, on loopback or in a network namespace, in its own data directory,
/// killed with the value.
#[derive(Debug)]
pub struct Etcd {
    child: Child,
    /// Its client URL.
    pub url: String,
    /// Its namespace (None: this one).
    netns: Option<String>,
}

/// Where one member of a cluster runs: its name, its network namespace (`None`: this one)
/// and the address it listens on (clients on port 2379, peers on 2380).
#[derive(Debug, Clone, Copy)]
pub struct EtcdNode<'a> {
    /// The member's name (`--name`), also its data directory's and log's.
    pub name: &'a str,
    /// The network namespace it runs in (made by `ip netns add`).
    pub netns: Option<&'a str>,
    /// Its address in that namespace.
    pub ip: std::net::Ipv4Addr,
}

/// A free TCP port on loopback.
fn loopback_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("port: {e}"))
}

impl Etcd {
    /// Start a member on loopback in `dir` and wait (at most 30 s) until it reports
    /// healthy.
    pub fn start(dir: &Path) -> Self {
        let (client, peer) = (loopback_port(), loopback_port());
        let peer_url = format!("http://127.0.0.1:{peer}");
        let e = Self::spawn(
            dir,
            None,
            ("n1", &format!("http://127.0.0.1:{client}"), &peer_url),
            &format!("n1={peer_url}"),
            &[],
        );
        e.wait_healthy(Duration::from_secs(30));
        e
    }

    /// Start a member on loopback serving clients over TLS with client certificates
    /// (`--client-cert-auth`, its certificate and CA from `tls`), and wait (at most 30 s)
    /// until it says it serves them. Its URL is `https://127.0.0.1:PORT`.
    pub fn start_tls(dir: &Path, tls: &EtcdTls) -> Self {
        let (client, peer) = (loopback_port(), loopback_port());
        let peer_url = format!("http://127.0.0.1:{peer}");
        let e = Self::spawn(
            dir,
            None,
            ("tls", &format!("https://127.0.0.1:{client}"), &peer_url),
            &format!("tls={peer_url}"),
            &[
                &format!("--cert-file={}", tls.server_cert.display()),
                &format!("--key-file={}", tls.server_key.display()),
                &format!("--trusted-ca-file={}", tls.ca.display()),
                "--client-cert-auth",
            ],
        );
        let log_path = dir.join("etcd-tls.log");
        let t = Instant::now();
        while !std::fs::read_to_string(&log_path)
            .unwrap_or_default()
            .contains("serving client requests on")
        {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "etcd over TLS did not come up: see {}",
                log_path.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        e
    }

    /// Start a three-member cluster, one member per node of `members` in `mesh` (client
    /// port 2379, peer port 2380 on the node's address, `--pre-vote` so that a member
    /// rejoining after a partition does not depose the leader), data and logs in `dir`,
    /// and wait (at most 30 s) until each reports healthy.
    pub fn start_cluster(dir: &Path, mesh: &Mesh, members: &[&str]) -> Vec<Self> {
        let nodes: Vec<EtcdNode<'_>> = members
            .iter()
            .map(|m| EtcdNode {
                name: m,
                netns: Some(mesh.ns(m).unwrap_or_else(|e| panic!("{e}"))),
                ip: mesh.ip(m).unwrap_or_else(|e| panic!("{e}")),
            })
            .collect();
        Self::start_members(dir, &nodes, &["--pre-vote"])
    }

    /// Start one cluster of a member per node of `nodes` (clients on port 2379 and peers
    /// on 2380 of the node's address, with `more` options), data and logs in `dir`, and
    /// wait (at most 30 s each) until every member reports healthy.
    pub fn start_members(dir: &Path, nodes: &[EtcdNode<'_>], more: &[&str]) -> Vec<Self> {
        let cluster = nodes
            .iter()
            .map(|n| format!("{}=http://{}:2380", n.name, n.ip))
            .collect::<Vec<_>>()
            .join(",");
        let all: Vec<Self> = nodes
            .iter()
            .map(|n| {
                let (client, peer) = (
                    format!("http://{}:2379", n.ip),
                    format!("http://{}:2380", n.ip),
                );
                Self::spawn(dir, n.netns, (n.name, &client, &peer), &cluster, more)
            })
            .collect();
        for e in &all {
            e.wait_healthy(Duration::from_secs(30));
        }
        all
    }

    /// Start member `name` serving clients at `url` (`http://` or `https://` host:port)
    /// and peers at `peer_url`, in `netns` if given, one of `cluster` (`name=peer_url,…`),
    /// with `more` options; its data in `dir/etcd-<name>`, its log `dir/etcd-<name>.log`.
    fn spawn(
        dir: &Path,
        netns: Option<&str>,
        (name, url, peer_url): (&str, &str, &str),
        cluster: &str,
        more: &[&str],
    ) -> Self {
        let log = std::fs::File::create(dir.join(format!("etcd-{name}.log")))
            .unwrap_or_else(|e| panic!("{e}"));
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "etcd"]);
                c
            }
            None => Command::new("etcd"),
        };
        let child = cmd
            .arg(format!("--name={name}"))
            .arg(format!(
                "--data-dir={}",
                dir.join(format!("etcd-{name}")).display()
            ))
            .arg(format!("--listen-client-urls={url}"))
            .arg(format!("--advertise-client-urls={url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster={cluster}"))
            .args(more)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("etcd: {e}"));
        Self {
            child,
            url: url.to_owned(),
            netns: netns.map(str::to_owned),
        }
    }

    /// Wait until the member answers healthy (it has a leader and serves reads); panics
    /// after `limit`.
    pub fn wait_healthy(&self, limit: Duration) {
        let t = Instant::now();
        while !self.healthy() {
            assert!(
                t.elapsed() < limit,
                "etcd {} did not become healthy within {limit:?}",
                self.url
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether `GET /health` answers healthy (asked from the member's namespace).
    pub fn healthy(&self) -> bool {
        let addr = self.url.trim_start_matches("http://");
        let ask = || {
            let Ok(a) = addr.parse::<SocketAddr>() else {
                return false;
            };
            let Ok(mut s) = TcpStream::connect_timeout(&a, Duration::from_secs(1)) else {
                return false;
            };
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let req = format!("GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n");
            let mut out = String::new();
            s.write_all(req.as_bytes()).is_ok()
                && s.read_to_string(&mut out).is_ok()
                && out.contains("\"health\":\"true\"")
        };
        match &self.netns {
            Some(ns) => GuestLan::run_in(ns, ask),
            None => ask(),
        }
    }

    /// Send `sig` (`STOP`, `CONT`, …) to the member.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{sig} etcd");
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Certificates for etcd over TLS, made with `openssl` at test time in a directory: a CA,
/// the member's certificate (for 127.0.0.1) and a client's, all signed by it, and a
/// second CA that signed none of them.
#[derive(Debug)]
pub struct EtcdTls {
    /// The CA certificate (PEM).
    pub ca: PathBuf,
    /// The member's certificate and key.
    pub server_cert: PathBuf,
    /// The member's key.
    pub server_key: PathBuf,
    /// A client's certificate.
    pub client_cert: PathBuf,
    /// The client's key.
    pub client_key: PathBuf,
    /// Another CA, which signed none of these.
    pub other_ca: PathBuf,
}

impl EtcdTls {
    /// Make them in `dir` (P-256 keys, valid one day).
    pub fn generate(dir: &Path) -> Result<Self, String> {
        let f = |name: &str| dir.join(name);
        let openssl = |args: &[&str]| netns::run_tool("openssl", args);
        let p = |path: PathBuf| path.display().to_string();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        for (name, cn) in [("ca", "castor test CA"), ("other-ca", "another CA")] {
            openssl(
                &[
                    &["req", "-x509"][..],
                    &ec,
                    &[
                        "-days",
                        "1",
                        "-subj",
                        &format!("/CN={cn}"),
                        "-keyout",
                        &p(f(&format!("{name}.key"))),
                        "-out",
                        &p(f(&format!("{name}.pem"))),
                    ],
                ]
                .concat(),
            )?;
        }
        for (name, ext) in [
            (
                "server",
                "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
            ),
            ("client", "extendedKeyUsage=clientAuth\n"),
        ] {
            let extfile = f(&format!("{name}.ext"));
            std::fs::write(&extfile, ext).map_err(|e| format!("{}: {e}", extfile.display()))?;
            openssl(
                &[
                    &["req"][..],
                    &ec,
                    &[
                        "-subj",
                        &format!("/CN=castor {name}"),
                        "-keyout",
                        &p(f(&format!("{name}.key"))),
                        "-out",
                        &p(f(&format!("{name}.csr"))),
                    ],
                ]
                .concat(),
            )?;
            openssl(&[
                "x509",
                "-req",
                "-days",
                "1",
                "-in",
                &p(f(&format!("{name}.csr"))),
                "-CA",
                &p(f("ca.pem")),
                "-CAkey",
                &p(f("ca.key")),
                "-CAcreateserial",
                "-extfile",
                &p(extfile),
                "-out",
                &p(f(&format!("{name}.pem"))),
            ])?;
        }
        Ok(Self {
            ca: f("ca.pem"),
            server_cert: f("server.pem"),
            server_key: f("server.key"),
            client_cert: f("client.pem"),
            client_key: f("client.key"),
            other_ca: f("other-ca.pem"),
        })
    }

    /// `--etcd-ca CA --etcd-cert … --etcd-key …` for a daemon, with `ca` as its CA.
    pub fn args(&self, ca: &Path) -> Vec<String> {
        [
            ("--etcd-ca", ca),
            ("--etcd-cert", &self.client_cert),
            ("--etcd-key", &self.client_key),
        ]
        .iter()
        .flat_map(|(o, v)| [(*o).to_owned(), v.display().to_string()])
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_daemons_are_looked_for_in_this_tests_profile_folder() {
        let exe = std::env::current_exe().unwrap();
        assert_eq!(profile_dir().join("deps"), exe.parent().unwrap());
        assert_eq!(cargo_profile("debug"), "dev");
        assert_eq!(cargo_profile("release"), "release");
        assert_eq!(cargo_profile("bench-fast"), "bench-fast");
    }
}
