//! Leases on a three-member etcd cluster, each member in a network namespace of its own
//! on a bridge the test creates: the lease outlives its leader's death, and a holder cut
//! off with a minority stops trusting its lease before the majority gives the key to
//! someone else. Needs root (namespaces) and etcd; skipped without them unless
//! `CASTOR_REQUIRE_ETCD=1`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ha_lease::{Claim, LeaseConfig, claim, wait_claim};
use ha_tests::{Etcd, EtcdNode};

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether this test can run here; panics if it is required and cannot.
fn available() -> bool {
    let etcd = Command::new("etcd")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let netns = Command::new("ip")
        .args(["netns", "list"])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let root = std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
    });
    let ok = etcd && netns && root;
    if !ok {
        assert!(
            std::env::var("CASTOR_REQUIRE_ETCD").as_deref() != Ok("1"),
            "CASTOR_REQUIRE_ETCD=1 but etcd={etcd} ip-netns={netns} root={root}"
        );
        eprintln!("skipping: needs etcd, ip netns and root");
    }
    ok
}

/// Three etcd members in namespaces `<tag>-1..3` on bridge `<tag>br`, subnet 10.251.N.0/24.
struct Cluster {
    tag: String,
    net: u32,
    members: Vec<Option<Etcd>>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn start(test: u32) -> Self {
        let net = (std::process::id() * 4 + test) % 250;
        let tag = format!("cl{net}");
        let dir = tempfile::tempdir().unwrap();
        let br = format!("{tag}br");
        let _ = Command::new("ip").args(["link", "del", &br]).output();
        run(&["ip", "link", "add", &br, "type", "bridge"]);
        run(&[
            "ip",
            "addr",
            "add",
            &format!("10.251.{net}.1/24"),
            "dev",
            &br,
        ]);
        run(&["ip", "link", "set", &br, "up"]);
        let ip = |i: u32| format!("10.251.{net}.{}", i + 1);
        let mut c = Self {
            tag: tag.clone(),
            net,
            members: Vec::new(),
            _dir: dir,
        };
        for i in 1..=3u32 {
            let ns = format!("{tag}-{i}");
            let veth = format!("{tag}v{i}");
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
            run(&["ip", "netns", "add", &ns]);
            run(&[
                "ip", "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ]);
            run(&["ip", "link", "set", &veth, "master", &br, "up"]);
            run(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", ip(i)),
                "dev",
                "eth0",
            ]);
            run(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
            run(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        }
        let namespaces: Vec<String> = (1..=3).map(|i| format!("{tag}-{i}")).collect();
        let nodes: Vec<EtcdNode<'_>> = (1..=3u32)
            .zip(["m1", "m2", "m3"])
            .zip(&namespaces)
            .map(|((i, name), ns)| EtcdNode {
                name,
                netns: Some(ns),
                ip: ip(i).parse().unwrap(),
            })
            .collect();
        c.members = Etcd::start_members(c._dir.path(), &nodes, &["--initial-cluster-state=new"])
            .into_iter()
            .map(Some)
            .collect();
        c.wait_ready();
        c
    }

    fn endpoint(&self, i: u32) -> String {
        format!("http://10.251.{}.{}:2379", self.net, i + 1)
    }

    fn endpoints(&self, which: &[u32]) -> Vec<String> {
        which.iter().map(|&i| self.endpoint(i)).collect()
    }

    fn config(&self, which: &[u32], holder: &str) -> LeaseConfig {
        LeaseConfig {
            ttl: Duration::from_secs(3),
            margin: Duration::from_millis(750),
            ..LeaseConfig::new(self.endpoints(which), "/castor/guests/g1", holder)
        }
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let cfg = LeaseConfig {
            key: "/castor/ready".into(),
            ..self.config(&[1, 2, 3], "probe")
        };
        loop {
            match claim(&cfg) {
                Ok(Claim::Ours(l)) => return l.release().unwrap(),
                Ok(Claim::Theirs { .. }) => return,
                Err(e) => {
                    assert!(Instant::now() < deadline, "cluster did not come up: {e}");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }

    /// The member (1..=3) that leads, asked through member `via`.
    fn leader(&self, via: u32) -> u32 {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut c = etcd_client::Client::connect([self.endpoint(via)], None)
                .await
                .unwrap();
            let leader = c.status().await.unwrap().leader();
            let members = c.member_list().await.unwrap();
            let m = members.members().iter().find(|m| m.id() == leader).unwrap();
            m.name()[1..].parse().unwrap()
        })
    }

    fn kill(&mut self, i: u32) {
        // Dropping the member kills it.
        self.members[(i - 1) as usize].take();
    }

    /// Cut member `i` off the bridge: it and whoever talks only to it are a minority.
    fn isolate(&self, i: u32) {
        run(&["ip", "link", "set", &format!("{}v{i}", self.tag), "down"]);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 1..=3 {
            self.kill(i);
            let _ = Command::new("ip")
                .args(["netns", "del", &format!("{}-{i}", self.tag)])
                .output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &format!("{}br", self.tag)])
            .output();
    }
}

#[test]
fn a_lease_outlives_its_leaders_death() {
    if !available() {
        return;
    }
    let mut c = Cluster::start(0);
    let a = match claim(&c.config(&[1, 2, 3], "primary-a")).unwrap() {
        Claim::Ours(l) => l,
        Claim::Theirs { holder } => panic!("held by {holder}"),
    };
    let leader = c.leader(1);
    c.kill(leader);
    // Three TTLs after the leader died, the keep-alives (through the others) still hold.
    std::thread::sleep(Duration::from_secs(9));
    assert!(
        a.is_held(),
        "lost after the leader (m{leader}) died: {:?} {:?}",
        a.lost(),
        a.failing()
    );
    let rest: Vec<u32> = (1..=3).filter(|&i| i != leader).collect();
    match claim(&c.config(&rest, "backup-b")).unwrap() {
        Claim::Theirs { holder } => assert_eq!(holder, "primary-a"),
        Claim::Ours(_) => panic!("the key was free while the primary held it"),
    }
}

#[test]
fn a_holder_in_a_minority_lets_go_before_the_majority_moves_on() {
    if !available() {
        return;
    }
    let c = Cluster::start(1);
    // The primary reaches etcd through member 1 only, the backup through 2 and 3.
    let a = match claim(&c.config(&[1], "primary-a")).unwrap() {
        Claim::Ours(l) => l,
        Claim::Theirs { holder } => panic!("held by {holder}"),
    };
    c.isolate(1);
    let cut = Instant::now();
    let b = wait_claim(&c.config(&[2, 3], "backup-b"), Duration::from_secs(30)).unwrap();
    let claimed = Instant::now();
    let trusted_until = a.held_until();
    assert!(
        trusted_until.is_none_or(|u| u < claimed),
        "the primary trusted its lease until {:?} after the cut, the backup claimed at {:?}",
        trusted_until.map(|u| u - cut),
        claimed - cut
    );
    assert!(!a.is_held());
    assert!(b.is_held());
}
