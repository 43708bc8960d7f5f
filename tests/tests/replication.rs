//! End-to-end replication: `ha-primary` and `ha-backup` as separate processes on loopback,
//! a real KVM guest (a simulated one where the test says so), the world checking every
//! released output record against the backup's ack log. The pair shares a key made by
//! `ha-primary keygen` in the test's scratch directory, so the link is encrypted; one test
//! runs the `--insecure` path.

use ha_tests::{
    Etcd, EtcdTls, Fault, NetPair, Proc, Proxy, Rng, Scratch, World, etcd_or_skip, events, keygen,
    kvm_or_skip, sample, scrape, wait_addr, wait_event,
};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

/// One pair under test.
struct Pair {
    dir: Scratch,
    world: World,
    backup: Proc,
    primary: Option<Proc>,
    /// The spare backup ([`Opts::spare`]).
    spare: Option<Proc>,
}

struct Opts<'a> {
    guest: &'a str,
    workload: &'a str,
    memory: &'a str,
    mode: &'a str,
    verify_every: u32,
    run_for: Option<&'a str>,
    fence: bool,
    fault: Fault,
    exit_after: &'a str,
    /// Both daemons with `--insecure` instead of a pair key.
    insecure: bool,
    /// Run each daemon on its own host (network namespace) of this pair, instead of
    /// both on loopback.
    net: Option<&'a NetPair>,
    /// The backup's ack log (default: `ack.log` in the scratch directory).
    ack_log: Option<&'a str>,
    /// The primary's disk (`primary.img`, zeros) of this many bytes (0: none).
    disk: u64,
    /// The backup's replica (`replica.img`, zeros) of this many bytes (0: none).
    replica: u64,
    /// The workload's seed (`--seed`).
    seed: u64,
    /// Leave the disk files to the daemons: `--disk-size` instead of a file made here.
    create_disks: bool,
    /// Both daemons keep the guest's key under a lease in this etcd (`--etcd`), TTL 3 s.
    etcd: Option<&'a str>,
    /// A spare backup (`spare.*` files, its ack log checked by the world too) is started
    /// first, and the backup protects the guest again after a failover towards it
    /// (`--reprotect-to`).
    spare: bool,
    /// The workload's rate (`--rate`; default 20000).
    rate: &'a str,
    /// More options for the backup.
    backup_args: &'a [String],
    /// More options for the primary.
    primary_args: &'a [String],
}

impl Default for Opts<'_> {
    fn default() -> Self {
        Self {
            guest: "kvm",
            workload: "web",
            memory: "32M",
            mode: "fgbi",
            verify_every: 0,
            run_for: None,
            fence: false,
            fault: Fault::None,
            exit_after: "400ms",
            insecure: false,
            net: None,
            ack_log: None,
            disk: 0,
            replica: 0,
            seed: 1,
            create_disks: false,
            etcd: None,
            spare: false,
            rate: "20000",
            backup_args: &[],
            primary_args: &[],
        }
    }
}

/// `--etcd URL --lease-key … --lease-ttl 3s`, the same on both daemons.
fn lease_args(o: &Opts) -> Vec<String> {
    o.etcd.map_or_else(Vec::new, |url| {
        vec![
            s("--etcd"),
            s(url),
            s("--lease-key"),
            s("/castor/tests/guest"),
            s("--lease-ttl"),
            s("3s"),
        ]
    })
}

/// `--disk PATH` for a disk of `bytes`: the file made here (zeros, kept if it exists), or
/// with `create` left to the daemon (`--disk-size`).
fn disk_args(path: &std::path::Path, bytes: u64, create: bool) -> [String; 2] {
    if create {
        return [s("--disk-size"), bytes.to_string()];
    }
    [s("--disk"), zero_image(path, bytes)]
}

fn s(v: &str) -> String {
    v.to_string()
}

/// A disk image of `bytes` zeros at `path` (kept if it exists); its path as an argument.
fn zero_image(path: &std::path::Path, bytes: u64) -> String {
    if !path.exists() {
        std::fs::File::create(path)
            .and_then(|f| f.set_len(bytes))
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
    path.display().to_string()
}

/// The world's address as a daemon reaches it: on loopback, or through its host's link.
fn world_addr(world: &World, via: Option<Ipv4Addr>) -> String {
    match via {
        Some(ip) => SocketAddr::new(IpAddr::V4(ip), world.addr.port()).to_string(),
        None => world.addr.to_string(),
    }
}

impl Pair {
    fn start(tag: &str, o: &Opts) -> Self {
        let mut p = Self::start_backup(tag, o);
        let target: SocketAddr = match o.fault {
            Fault::None => p.backup_addr(),
            f => Proxy::start(p.backup_addr(), f).addr,
        };
        let key = p.key_args(o);
        p.primary = Some(p.spawn_primary(o, target, "primary", &key));
        p
    }

    /// The backup alone, listening, with a pair key made by `ha-primary keygen` in the
    /// scratch directory (or `--insecure` when the options say so).
    fn start_backup(tag: &str, o: &Opts) -> Self {
        let dir = Scratch::new(tag);
        if !o.insecure {
            keygen(&dir.file("pair.key"));
        }
        let (listen, world_bind) = match o.net {
            Some(n) => (IpAddr::V4(n.backup_ip), IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            None => (
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V4(Ipv4Addr::LOCALHOST),
            ),
        };
        // The spares' ack logs too: after a re-protection, the re-protecting host's
        // releases are checked against the spare's commits (a second spare's, `spare2.`,
        // when the first dies too).
        let world = World::start_chain(
            SocketAddr::new(world_bind, 0),
            vec![
                dir.file("ack.log"),
                dir.file("spare.ack.log"),
                dir.file("spare2.ack.log"),
            ],
        )
        .unwrap_or_else(|e| panic!("world: {e}"));
        let mut args = backup_args(
            &dir,
            o,
            SocketAddr::new(listen, 0),
            &world_addr(&world, o.net.map(|n| n.world_from_backup)),
            "",
        );
        if let Some(a) = o.ack_log {
            args.extend([s("--ack-log"), s(a)]);
        }
        args.extend([
            s("--stats"),
            dir.file("backup.csv").display().to_string(),
            s("--exit-after"),
            s(o.exit_after),
        ]);
        args.extend(lease_args(o));
        let spare = o.spare.then(|| {
            let spare = spawn_spare(&dir, o, &world);
            let to = wait_addr(&dir.file("spare.port"), Duration::from_secs(20));
            args.extend([s("--reprotect-to"), to.to_string()]);
            spare
        });
        args.extend_from_slice(o.backup_args);
        if o.replica > 0 {
            let path = dir.file("replica.img");
            if o.create_disks {
                args.extend([s("--disk"), path.display().to_string()]);
            }
            args.extend(disk_args(&path, o.replica, o.create_disks));
        }
        let ns = o.net.map(|n| n.backup_ns.as_str());
        let backup = Proc::spawn_in(ns, "ha-backup", &args, dir.file("backup.log"));
        wait_addr(&dir.file("port"), Duration::from_secs(20));
        Self {
            dir,
            world,
            backup,
            primary: None,
            spare,
        }
    }

    fn backup_addr(&self) -> SocketAddr {
        wait_addr(&self.dir.file("port"), Duration::from_secs(20))
    }

    /// The key options matching the backup's.
    fn key_args(&self, o: &Opts) -> Vec<String> {
        if o.insecure {
            vec![s("--insecure")]
        } else {
            vec![s("--key"), self.dir.file("pair.key").display().to_string()]
        }
    }

    /// Start a primary against `target` with `key` options; its log, events and stats are
    /// `<name>.log`, `<name>.events`, `<name>.csv` in the scratch directory.
    fn spawn_primary(&self, o: &Opts, target: SocketAddr, name: &str, key: &[String]) -> Proc {
        self.spawn_primary_with_files(o, target, (name, name), key)
    }

    /// [`Pair::spawn_primary`] with its log named after `log` and its events and stats
    /// after `files`.
    fn spawn_primary_with_files(
        &self,
        o: &Opts,
        target: SocketAddr,
        (log, name): (&str, &str),
        key: &[String],
    ) -> Proc {
        let dir = &self.dir;
        let mut args = vec![
            s("--backup"),
            target.to_string(),
            s("--guest"),
            s(o.guest),
            s("--workload"),
            s(o.workload),
            s("--memory"),
            s(o.memory),
            s("--mode"),
            s(o.mode),
            s("--interval"),
            s("25ms"),
            s("--rate"),
            s(o.rate),
            s("--output-every"),
            s("32"),
            s("--seed"),
            o.seed.to_string(),
            s("--output"),
            world_addr(&self.world, o.net.map(|n| n.world_from_primary)),
            s("--events"),
            dir.file(&format!("{name}.events")).display().to_string(),
            s("--stats"),
            dir.file(&format!("{name}.csv")).display().to_string(),
            s("--verify-every"),
            o.verify_every.to_string(),
            s("--ack-timeout"),
            s("1s"),
        ];
        args.extend_from_slice(key);
        args.extend(lease_args(o));
        args.extend_from_slice(o.primary_args);
        if o.disk > 0 {
            let path = dir.file("primary.img");
            if o.create_disks {
                args.extend([s("--disk"), path.display().to_string()]);
            }
            args.extend(disk_args(&path, o.disk, o.create_disks));
        }
        if let Some(r) = o.run_for {
            args.extend([s("--run-for"), s(r)]);
        }
        if o.fence {
            args.push(s("--fence"));
        }
        let ns = o.net.map(|n| n.primary_ns.as_str());
        Proc::spawn_in(ns, "ha-primary", &args, dir.file(&format!("{log}.log")))
    }

    fn primary_events(&self) -> std::path::PathBuf {
        self.dir.file("primary.events")
    }

    fn backup_events(&self) -> std::path::PathBuf {
        self.dir.file("backup.events")
    }

    fn wait_protected(&self) -> serde_json::Value {
        wait_event(&self.primary_events(), "protected", Duration::from_secs(30))
            .unwrap_or_else(|| self.fail("primary never protected"))
    }

    fn ack_log(&self) -> Vec<(u64, u64)> {
        committed(&self.dir.file("ack.log"))
    }

    /// After a backup (events `events`, ack log `acks`) took the guest over: it resumed
    /// from its last commit, and the world saw no violation and output past it. `what`
    /// names the takeover in failures. The last commit.
    fn check_resumed_at(
        &self,
        active: &serde_json::Value,
        acks: &std::path::Path,
        what: &str,
    ) -> (u64, u64) {
        self.check_resumed_after(active, acks, what, false)
    }

    /// A backup `b` (events `events`, `what` in failures) that took the guest over: it
    /// became active, the guest's progress went on from where it resumed, and it exited 0
    /// at its `--exit-after`. Its `active` event.
    fn check_took_over(
        &self,
        b: &mut Proc,
        events_file: &std::path::Path,
        what: &str,
    ) -> serde_json::Value {
        let Some(active) = wait_event(events_file, "active", Duration::from_secs(20)) else {
            self.fail(&format!("{what} never took over: {}", b.log_text()))
        };
        let code = b.wait_for(Duration::from_secs(20));
        if code != Some(0) {
            self.fail(&format!("{what} exited {code:?}: {}", b.log_text()));
        }
        let from = active["progress"].as_u64().unwrap_or(u64::MAX);
        let progress: Vec<u64> = events(events_file)
            .iter()
            .filter(|e| e["event"] == "progress")
            .filter_map(|e| e["progress"].as_u64())
            .collect();
        if progress.is_empty() || progress.iter().any(|&x| x < from) {
            self.fail(&format!("no progress at {what} from {from}: {progress:?}"));
        }
        active
    }

    /// [`Pair::check_resumed_at`]; with `unprotected`, a primary ran the guest unprotected
    /// on the way, so its releases ahead of any commit are allowed (not skips or changed
    /// repeats).
    fn check_resumed_after(
        &self,
        active: &serde_json::Value,
        acks: &std::path::Path,
        what: &str,
        unprotected: bool,
    ) -> (u64, u64) {
        let Some(&(last_epoch, last_head)) = committed(acks).last() else {
            self.fail(&format!("{what}: the ack log is empty"))
        };
        if active["epoch"] != last_epoch || active["out_head"] != last_head {
            self.fail(&format!(
                "{what}: resumed from {active}, the last commit is {last_epoch} {last_head}"
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
        let v = self.world.view();
        let bad: Vec<&String> = if unprotected {
            beyond_unprotected(&v.violations)
        } else {
            v.violations.iter().collect()
        };
        if !bad.is_empty() {
            self.fail(&format!("{what}: the world saw violations: {bad:?}"));
        }
        if v.next_seq <= last_head {
            self.fail(&format!("{what}: no output after it: {v:?}"));
        }
        (last_epoch, last_head)
    }

    fn fail(&self, what: &str) -> ! {
        panic!(
            "{what}\n--- primary log ---\n{}\n--- backup log ---\n{}\n--- backup events ---\n{:?}",
            self.primary
                .as_ref()
                .map(Proc::log_text)
                .unwrap_or_default(),
            self.backup.log_text(),
            events(&self.backup_events()),
        )
    }

    /// A verified run of `--run-for`: the primary exits 0 with at least 10 checkpoints
    /// acknowledged, the backup logged each and no digest failed. The primary's summary.
    fn check_verified_run(&mut self) -> serde_json::Value {
        let mut primary = self
            .primary
            .take()
            .unwrap_or_else(|| self.fail("no primary"));
        let code = primary.wait_for(Duration::from_secs(60));
        let out = primary.stdout();
        self.primary = Some(primary);
        if code != Some(0) {
            self.fail(&format!("primary exited {code:?}: {out}"));
        }
        let summary: serde_json::Value = serde_json::from_str(out.trim())
            .unwrap_or_else(|e| self.fail(&format!("summary {out:?}: {e}")));
        let committed = summary["epochs_committed"].as_u64().unwrap_or(0);
        if committed < 10 {
            self.fail(&format!("only {committed} checkpoints committed"));
        }
        let ev = events(&self.backup_events());
        if ev.iter().any(|e| e["event"] == "verify_failed") {
            self.fail("a checkpoint's digest did not match");
        }
        let checkpoints = ev.iter().filter(|e| e["event"] == "checkpoint").count() as u64;
        if checkpoints < committed {
            self.fail(&format!(
                "backup logged {checkpoints} checkpoints, primary saw {committed} acks"
            ));
        }
        summary
    }

    /// Protected, then `fault` on the link: the backup declares the primary lost (the
    /// event, returned) and no digest failed (a damaged epoch never reached the image or
    /// the replica).
    fn wait_lost_after(&self, fault: Fault) -> serde_json::Value {
        self.wait_protected();
        let lost = wait_event(
            &self.backup_events(),
            "primary_lost",
            Duration::from_secs(20),
        )
        .unwrap_or_else(|| self.fail(&format!("{fault:?}: the backup never noticed")));
        if events(&self.backup_events())
            .iter()
            .any(|e| e["event"] == "verify_failed")
        {
            self.fail(&format!(
                "{fault:?}: a damaged epoch reached the image or replica"
            ));
        }
        lost
    }

    /// After the backup took over: check it resumed from its last commit and went on.
    fn check_failover(&mut self) -> serde_json::Value {
        let active = wait_event(&self.backup_events(), "active", Duration::from_secs(20))
            .unwrap_or_else(|| self.fail("backup never became active"));
        let acks = self.ack_log();
        let Some(&(last_epoch, last_out_head)) = acks.last() else {
            self.fail("empty ack log")
        };
        if active["epoch"] != last_epoch {
            self.fail(&format!(
                "activated from epoch {} but the last commit is {last_epoch}",
                active["epoch"]
            ));
        }
        // The restored guest's own status equals the committed checkpoint's.
        let cp = events(&self.backup_events())
            .into_iter()
            .rfind(|e| e["event"] == "checkpoint" && e["epoch"] == last_epoch)
            .unwrap_or_else(|| self.fail("no checkpoint event for the last commit"));
        for key in ["progress", "checksum", "out_head"] {
            if active[key] != cp[key] {
                self.fail(&format!(
                    "restored guest {key} {} != checkpoint's {}",
                    active[key], cp[key]
                ));
            }
        }
        if active["out_head"] != last_out_head {
            self.fail(&format!(
                "active out_head {} != committed {last_out_head}",
                active["out_head"]
            ));
        }
        // The guest goes on at the backup: progress never goes back, and increases.
        let start = active["progress"].as_u64().unwrap_or(0);
        let code = self.backup.wait_for(Duration::from_secs(20));
        if code != Some(0) {
            self.fail(&format!("backup exited with {code:?}"));
        }
        let progress: Vec<u64> = events(&self.backup_events())
            .iter()
            .filter(|e| e["event"] == "progress")
            .filter_map(|e| e["progress"].as_u64())
            .collect();
        if progress.is_empty()
            || progress.iter().any(|&p| p < start)
            || progress.last() <= Some(&start)
        {
            self.fail(&format!(
                "no progress after activation from {start}: {progress:?}"
            ));
        }
        if progress.windows(2).any(|w| w[1] < w[0]) {
            self.fail(&format!("progress went back: {progress:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
        let v = self.world.view();
        if !v.violations.is_empty() {
            self.fail(&format!("the world saw violations: {:?}", v.violations));
        }
        if v.from_backup == 0 || v.next_seq <= last_out_head {
            self.fail(&format!("no output from the backup after failover: {v:?}"));
        }
        active
    }
}

/// Verification mode: a digest of the whole memory with every checkpoint, checked at the
/// backup (which exits 3 on a mismatch); the primary's summary and the backup's
/// checkpoints agree.
#[test]
fn kvm_pair_commits_verified_checkpoints() {
    if !kvm_or_skip() {
        return;
    }
    let mut p = Pair::start(
        "verify",
        &Opts {
            verify_every: 4,
            run_for: Some("1500ms"),
            ..Opts::default()
        },
    );
    p.check_verified_run();
    // The primary stopping looks like its death to the backup: it fails over cleanly.
    p.check_failover();
}

/// kill -9 of the primary at seeded random moments: every time, the backup resumes from
/// its last committed checkpoint and the world sees no gap and no changed repeat.
#[test]
fn kill_primary_at_random_moments() {
    if !kvm_or_skip() {
        return;
    }
    let runs: u64 = std::env::var("CASTOR_KILL_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let mut rng = Rng(0xC0FFEE);
    for i in 0..runs {
        let workload = ["web", "kv", "memwrite"][(i % 3) as usize];
        let mode = ["fgbi", "xbzrle", "remus"][(i / 3 % 3) as usize];
        let mut p = Pair::start(
            &format!("kill{i}"),
            &Opts {
                workload,
                mode,
                ..Opts::default()
            },
        );
        p.wait_protected();
        // Anywhere in an epoch: mid-epoch, mid-send, after send before the ack.
        let delay = rng.range(0, 700) * 1000 + rng.range(0, 1000);
        std::thread::sleep(Duration::from_micros(delay));
        if let Some(pr) = p.primary.as_mut() {
            pr.kill9();
        }
        let active = p.check_failover();
        eprintln!(
            "run {i}: {workload}/{mode} killed after {delay} us; resumed from epoch {} at progress {}",
            active["epoch"], active["progress"]
        );
    }
}

/// A bit flipped in the ciphertext, a replayed (duplicated) Noise message, and a
/// connection cut mid-frame: the message fails to authenticate (or the epoch is cut), the
/// epoch is rejected whole, and the failover that follows starts from the previous commit. Both sides live on, as
/// in a partition, so the primary runs with `--fence`: under the default policy it would
/// release uncommitted output while the backup takes over (split brain).
#[test]
fn corrupted_or_cut_stream_fails_over_to_the_previous_commit() {
    if !kvm_or_skip() {
        return;
    }
    for fault in [
        Fault::FlipAfter(Duration::from_millis(700)),
        Fault::DuplicateAfter(Duration::from_millis(700)),
        Fault::CutAfter(Duration::from_millis(700)),
    ] {
        let mut p = Pair::start(
            "fault",
            &Opts {
                fault,
                verify_every: 1,
                fence: true,
                ..Opts::default()
            },
        );
        let lost = p.wait_lost_after(fault);
        let reason = lost["reason"].as_str().unwrap_or_default();
        if !matches!(fault, Fault::CutAfter(_))
            && !reason.contains("encrypted message")
            && !reason.contains("fails to authenticate")
        {
            p.fail(&format!("{fault:?}: not refused by the channel: {reason}"));
        }
        let active = p.check_failover();
        eprintln!(
            "{fault:?}: lost ({}), resumed from epoch {}",
            lost["reason"], active["epoch"]
        );
    }
}

/// The backup dies: the primary continues unprotected by default, or pauses with --fence;
/// either way it says so. The unfenced run uses `--insecure` on both sides: the plain-TCP
/// path keeps a test (and its loud warning is checked).
#[test]
fn backup_killed_primary_continues_or_fences() {
    if !kvm_or_skip() {
        return;
    }
    for fence in [false, true] {
        let mut p = Pair::start(
            "bkill",
            &Opts {
                fence,
                insecure: !fence,
                run_for: Some("2500ms"),
                ..Opts::default()
            },
        );
        p.wait_protected();
        std::thread::sleep(Duration::from_millis(300));
        p.backup.kill9();
        let lost = wait_event(&p.primary_events(), "backup_lost", Duration::from_secs(10))
            .unwrap_or_else(|| p.fail("primary never noticed the backup's death"));
        let at_loss = p.world.view();
        std::thread::sleep(Duration::from_millis(500));
        let later = p.world.view();
        let mut primary = p.primary.take().unwrap_or_else(|| p.fail("no primary"));
        let code = primary.wait_for(Duration::from_secs(20));
        if code != Some(0) {
            p.fail(&format!("primary exited {code:?}"));
        }
        let log = primary.log_text();
        let warned = log.contains("replication is NOT encrypted or authenticated");
        assert_eq!(warned, !fence, "the --insecure warning: {log}");
        if fence {
            assert_eq!(lost["policy"], "fence");
            assert!(log.contains("fencing the guest"), "{log}");
            assert_eq!(
                later.next_seq, at_loss.next_seq,
                "a fenced primary released output"
            );
        } else {
            assert_eq!(lost["policy"], "continue");
            assert!(log.contains("continuing unprotected"), "{log}");
            assert!(
                later.next_seq > at_loss.next_seq,
                "an unprotected primary keeps releasing output: {at_loss:?} then {later:?}"
            );
        }
        // No gap and no changed repeat either way (releases without a commit are the
        // unprotected policy, so only those violations are expected).
        let bad = beyond_unprotected(&later.violations);
        assert!(bad.is_empty(), "{bad:?}");
    }
}

/// A partition: primary and backup on two hosts (network namespaces joined by veth); the
/// replication link goes down while both live, dropping packets silently (no reset reaches
/// either side). The backup notices the silence and takes over from its last commit. The
/// primary, receiving no acks, never releases output produced after the cut (every
/// record it released is below the out_head the backup resumed from) and follows its
/// policy: with `--fence` it pauses its guest and releases nothing more; without, it
/// says it continues unprotected (split brain, as docs/SECURITY.md warns) and does.
#[test]
fn partition_backup_takes_over_and_the_primary_follows_its_policy() {
    if !kvm_or_skip() || !NetPair::available() {
        return;
    }
    for (id, fence) in [(1u8, true), (2, false)] {
        let net = NetPair::create(id).unwrap_or_else(|e| panic!("making the hosts: {e}"));
        let mut p = Pair::start(
            "partition",
            &Opts {
                net: Some(&net),
                fence,
                run_for: Some("3500ms"),
                exit_after: "600ms",
                ..Opts::default()
            },
        );
        p.wait_protected();
        std::thread::sleep(Duration::from_millis(700));
        if p.world.view().from_primary == 0 {
            p.fail("no output released before the cut");
        }
        net.cut()
            .unwrap_or_else(|e| p.fail(&format!("cutting the link: {e}")));
        let lost = wait_event(&p.backup_events(), "primary_lost", Duration::from_secs(10))
            .unwrap_or_else(|| p.fail("the backup never noticed the partition"));
        let reason = lost["reason"].as_str().unwrap_or_default().to_string();
        if !reason.starts_with("no frame for") {
            p.fail(&format!("a partition is silence, not: {reason}"));
        }
        let plost = wait_event(&p.primary_events(), "backup_lost", Duration::from_secs(10))
            .unwrap_or_else(|| p.fail("the primary never noticed the partition"));
        let policy = if fence { "fence" } else { "continue" };
        if plost["policy"] != policy {
            p.fail(&format!("primary policy {} != {policy}", plost["policy"]));
        }
        let at_loss = p.world.view();
        let mut primary = p.primary.take().unwrap_or_else(|| p.fail("no primary"));
        let code = primary.wait_for(Duration::from_secs(20));
        let log = primary.log_text();
        if code != Some(0) {
            p.fail(&format!("primary exited {code:?}: {log}"));
        }
        let after = p.world.view();
        if fence {
            assert!(log.contains("fencing the guest"), "{log}");
            assert_eq!(
                after.from_primary, at_loss.from_primary,
                "a fenced primary released output after losing the backup"
            );
            // The backup resumed from its last commit, re-released, went on; the world
            // saw no gap, no changed repeat, no release ahead of a commit.
            let active = p.check_failover();
            let resumed = active["out_head"].as_u64().unwrap_or(0);
            let released = p.world.view().primary_next;
            assert!(
                released <= resumed,
                "the primary released up to seq {released}, past the committed out_head \
                 {resumed} the backup resumed from"
            );
            eprintln!(
                "fence: backup lost after {}, primary released < {released}, backup resumed \
                 at out_head {resumed} (epoch {})",
                reason, active["epoch"]
            );
        } else {
            assert!(log.contains("continuing unprotected"), "{log}");
            assert!(
                after.from_primary > at_loss.from_primary,
                "an unfenced primary keeps releasing: {at_loss:?} then {after:?}"
            );
            let active = wait_event(&p.backup_events(), "active", Duration::from_secs(20))
                .unwrap_or_else(|| p.fail("backup never became active"));
            let last = p.ack_log().last().map_or(0, |a| a.0);
            assert_eq!(active["epoch"], last, "activated from the last commit");
        }
    }
}

/// A primary with another key, and one without a key (`--insecure`), are refused at the
/// Noise handshake: each exits 1 naming the handshake, the backup logs and records the
/// refusal (stage `noise`), nothing reaches staging, and it keeps listening: a primary
/// with the pair key is then protected, and its failover works.
#[test]
fn wrong_key_and_no_key_primaries_are_refused_then_the_right_one_works() {
    if !kvm_or_skip() {
        return;
    }
    let o = Opts {
        run_for: None,
        ..Opts::default()
    };
    let mut p = Pair::start_backup("wrongkey", &o);
    let other = keygen(&p.dir.file("other.key"));
    let target = p.backup_addr();
    for (name, key, says) in [
        (
            "wrong",
            vec![s("--key"), other.display().to_string()],
            "closed the connection during the secure handshake (it holds another pair key",
        ),
        (
            "nokey",
            vec![s("--insecure")],
            "closed the connection without answering (it runs with a pair key",
        ),
    ] {
        let mut bad = p.spawn_primary(&o, target, name, &key);
        let code = bad.wait_for(Duration::from_secs(30));
        let log = bad.log_text();
        if code != Some(1) {
            p.fail(&format!("{name}: primary exited {code:?}: {log}"));
        }
        if !log.contains(says) {
            p.fail(&format!("{name}: no handshake error in its log: {log}"));
        }
    }
    // The backup records a refusal just after it closes the connection (handshakes run on
    // their own threads): wait, bounded, for both to be written.
    let refusals = || -> Vec<serde_json::Value> {
        events(&p.backup_events())
            .into_iter()
            .filter(|e| e["event"] == "refused")
            .collect()
    };
    let t = std::time::Instant::now();
    while refusals().len() < 2 && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let refused = refusals();
    if refused.len() != 2 || refused.iter().any(|e| e["stage"] != "noise") {
        p.fail(&format!("expected two noise refusals: {refused:?}"));
    }
    if !refused[0]["reason"]
        .as_str()
        .unwrap_or("")
        .contains("the peer does not hold the pair key")
    {
        p.fail(&format!("wrong key reason: {}", refused[0]["reason"]));
    }
    if !refused[1]["reason"]
        .as_str()
        .unwrap_or("")
        // The plaintext Hello frame's length prefix read as a Noise message length: its
        // 1-byte type and 40-byte body (session v6: backend kind, guest layout, disk size).
        .contains("handshake message of 41 bytes")
    {
        p.fail(&format!("plaintext Hello reason: {}", refused[1]["reason"]));
    }
    if !p.ack_log().is_empty()
        || events(&p.backup_events())
            .iter()
            .any(|e| e["event"] == "checkpoint")
    {
        p.fail("a refused peer's bytes reached staging");
    }
    if !p.backup.log_text().contains("still listening") {
        p.fail("the backup did not say it keeps listening");
    }
    let key = p.key_args(&o);
    p.primary = Some(p.spawn_primary(&o, target, "primary", &key));
    p.wait_protected();
    std::thread::sleep(Duration::from_millis(300));
    if let Some(pr) = p.primary.as_mut() {
        pr.kill9();
    }
    p.check_failover();
}

/// While a session runs, a second primary (with the right key) is refused with a message
/// naming the session in progress; the first stays protected and fails over normally.
#[test]
fn a_second_primary_is_refused_while_one_is_connected() {
    if !kvm_or_skip() {
        return;
    }
    let o = Opts::default();
    let mut p = Pair::start("second", &o);
    p.wait_protected();
    let key = p.key_args(&o);
    // Given the first one's events and stats files, as a careless operator would.
    let mut second = p.spawn_primary_with_files(&o, p.backup_addr(), ("second", "primary"), &key);
    let code = second.wait_for(Duration::from_secs(30));
    let log = second.log_text();
    if code != Some(1) || !log.contains("another primary") || !log.contains("already connected") {
        p.fail(&format!("second primary exited {code:?}: {log}"));
    }
    if events(&p.backup_events())
        .iter()
        .any(|e| e["event"] == "primary_lost")
    {
        p.fail("the second primary disturbed the session");
    }
    if !p.backup.log_text().contains("refused a second primary") {
        p.fail("the backup did not log the refusal");
    }
    let first = std::fs::read_to_string(p.primary_events()).unwrap_or_default();
    if !first.starts_with("{") || first.contains('\0') || !first.contains("\"protected\"") {
        p.fail(&format!(
            "the refused primary touched the first one's events: {first:?}"
        ));
    }
    let before = p.ack_log().len();
    std::thread::sleep(Duration::from_millis(300));
    if p.ack_log().len() <= before {
        p.fail("the first primary stopped committing");
    }
    if let Some(pr) = p.primary.as_mut() {
        pr.kill9();
    }
    p.check_failover();
}

/// A primary and a backup of different backends never replicate: the backup refuses the
/// Hello and the primary stops, both naming the two kinds. (The backup runs `--guest kvm`,
/// which only warns where KVM is missing; the primary runs the simulated guest: no KVM is
/// needed.)
#[test]
fn a_primary_of_another_backend_is_refused_and_both_sides_name_the_kinds() {
    let backup = Opts {
        guest: "kvm",
        ..Opts::default()
    };
    let primary = Opts {
        guest: "sim",
        ..Opts::default()
    };
    let mut p = Pair::start_backup("backend", &backup);
    let key = p.key_args(&primary);
    let mut pr = p.spawn_primary(&primary, p.backup_addr(), "primary", &key);
    let code = pr.wait_for(Duration::from_secs(30));
    let log = pr.log_text();
    p.primary = Some(pr);
    let says = "backend mismatch: primary has sim, backup has kvm";
    if code != Some(1) || !log.contains(&format!("backup refused the session: {says}")) {
        p.fail(&format!("the primary exited {code:?}: {log}"));
    }
    // The backup records the refusal once its answer is sent: wait for it.
    let refused = wait_event(&p.backup_events(), "refused", Duration::from_secs(20));
    if refused.as_ref().map(|e| &e["reason"]) != Some(&says.into()) {
        p.fail(&format!("the backup's refusal: {refused:?}"));
    }
    if !p.ack_log().is_empty() {
        p.fail("the backup committed a checkpoint of another backend");
    }
}

/// A key file others can read is refused by both daemons, naming the file and its mode.
#[test]
fn key_files_readable_by_others_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = Scratch::new("keymode");
    let key = keygen(&dir.file("pair.key"));
    let mode = std::fs::metadata(&key)
        .map(|m| m.permissions().mode() & 0o777)
        .unwrap_or(0);
    assert_eq!(mode, 0o600, "keygen writes 0600");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644))
        .unwrap_or_else(|e| panic!("chmod: {e}"));
    let k = key.display().to_string();
    let want = format!("pair key {k} has mode 0644: group and others must have no access");
    for (name, args) in [
        (
            "ha-backup",
            vec![
                s("--guest"),
                s("sim"),
                s("--listen"),
                s("127.0.0.1:0"),
                s("--key"),
                k.clone(),
            ],
        ),
        (
            "ha-primary",
            vec![
                s("--guest"),
                s("sim"),
                s("--memory"),
                s("8M"),
                s("--key"),
                k.clone(),
            ],
        ),
    ] {
        let mut pr = Proc::spawn(name, &args, dir.file(&format!("{name}.log")));
        let code = pr.wait_for(Duration::from_secs(20));
        let log = pr.log_text();
        assert_eq!(code, Some(1), "{name}: {log}");
        assert!(log.contains(&want), "{name}: {log}");
    }
}

/// The backup stands still (SIGSTOP) past the primary's ack timeout. The primary declares
/// it lost and ends the session for good. Under the default policy it stands the backup
/// down, which on resuming exits without taking over (it would otherwise resume, later,
/// from a checkpoint the world has long overtaken); under `--fence` it closes the link, so
/// the resumed backup takes over at once from its last commit.
#[test]
fn a_backup_stopped_past_the_ack_timeout_is_dropped_for_good() {
    if !kvm_or_skip() {
        return;
    }
    for fence in [false, true] {
        let mut p = Pair::start(
            "bstop",
            &Opts {
                fence,
                run_for: Some("4s"),
                ..Opts::default()
            },
        );
        p.wait_protected();
        std::thread::sleep(Duration::from_millis(300));
        // The primary's ack timeout is 1 s.
        p.backup.freeze_for(Duration::from_millis(1800));
        let lost = wait_event(&p.primary_events(), "backup_lost", Duration::from_secs(10))
            .unwrap_or_else(|| p.fail("the primary never declared the frozen backup lost"));
        if fence {
            assert_eq!(lost["policy"], "fence");
            p.check_failover();
        } else {
            assert_eq!(lost["policy"], "continue");
            let code = p.backup.wait_for(Duration::from_secs(10));
            let evs = events(&p.backup_events());
            if code != Some(0)
                || !evs.iter().any(|e| e["event"] == "primary_stood_down")
                || evs.iter().any(|e| e["event"] == "active")
            {
                p.fail(&format!(
                    "the dropped backup did not stand down (exit {code:?})"
                ));
            }
            let mut primary = p.primary.take().unwrap_or_else(|| p.fail("no primary"));
            let _ = primary.wait_for(Duration::from_secs(20));
            // The unprotected primary releases without commits (its policy); nothing
            // else may go wrong, and the backup released nothing.
            let v = p.world.view();
            let bad = beyond_unprotected(&v.violations);
            assert!(bad.is_empty() && v.from_backup == 0, "{v:?}");
        }
    }
}

/// The primary stands still (SIGSTOP) past the backup's detection timeout, and the backup
/// takes over. The resumed primary must not release anything or run on: it knows it was
/// silent long enough to be replaced, assumes it was, and fences, under the default
/// policy too. The world sees one guest's output, with no changed repeat and no release
/// ahead of the commits.
#[test]
fn a_primary_stopped_past_the_detection_timeout_does_not_run_twice() {
    if !kvm_or_skip() {
        return;
    }
    let mut p = Pair::start(
        "pstop",
        &Opts {
            run_for: Some("4s"),
            exit_after: "1500ms",
            ..Opts::default()
        },
    );
    p.wait_protected();
    std::thread::sleep(Duration::from_millis(300));
    // The backup's detection timeout is 400 ms.
    if let Some(pr) = p.primary.as_mut() {
        pr.freeze_for(Duration::from_millis(1500));
    }
    let lost = wait_event(&p.primary_events(), "backup_lost", Duration::from_secs(10))
        .unwrap_or_else(|| p.fail("the resumed primary never noticed its backup left"));
    if lost["assumed"] != "the backup took over" || lost["policy"] != "fence" {
        p.fail(&format!("the resumed primary did not fence: {lost}"));
    }
    p.check_failover();
    let mut primary = p.primary.take().unwrap_or_else(|| p.fail("no primary"));
    let _ = primary.wait_for(Duration::from_secs(20));
    let v = p.world.view();
    assert!(v.violations.is_empty(), "{v:?}");
}

/// Idle connections (no key needed to open one) cannot hold a legitimate primary back:
/// handshakes run side by side, and the primary is protected as usual.
#[test]
fn idle_connections_cannot_lock_the_primary_out() {
    if !kvm_or_skip() {
        return;
    }
    let o = Opts::default();
    let mut p = Pair::start_backup("idle", &o);
    let idle: Vec<_> = (0..6)
        .map(|_| {
            std::net::TcpStream::connect(p.backup_addr())
                .unwrap_or_else(|e| panic!("idle connection: {e}"))
        })
        .collect();
    let key = p.key_args(&o);
    p.primary = Some(p.spawn_primary(&o, p.backup_addr(), "primary", &key));
    p.wait_protected();
    drop(idle);
    if let Some(pr) = p.primary.as_mut() {
        pr.kill9();
    }
    p.check_failover();
}

/// A second backup started on a port in use fails, and leaves the running one's events,
/// stats and ack log as they were.
#[test]
fn a_refused_second_backup_leaves_the_first_ones_files_alone() {
    let o = Opts {
        guest: "sim",
        insecure: true,
        ..Opts::default()
    };
    let p = Pair::start_backup("second-backup", &o);
    let port = p.backup_addr().to_string();
    let events_before = std::fs::read_to_string(p.backup_events()).unwrap_or_default();
    assert!(events_before.contains("listening"), "{events_before}");
    let file = |n: &str| p.dir.file(n).display().to_string();
    let args = vec![
        s("--listen"),
        port,
        s("--memory"),
        s(o.memory),
        s("--guest"),
        s("sim"),
        s("--insecure"),
        s("--events"),
        file("backup.events"),
        s("--stats"),
        file("backup.csv"),
        s("--ack-log"),
        file("ack.log"),
    ];
    let mut second = Proc::spawn("ha-backup", &args, p.dir.file("second.log"));
    let code = second.wait_for(Duration::from_secs(20));
    let log = second.log_text();
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("cannot listen"), "{log}");
    let events_after = std::fs::read_to_string(p.backup_events()).unwrap_or_default();
    assert!(
        events_after.starts_with(&events_before) && !events_after.contains('\0'),
        "the refused backup touched the running one's events: {events_after:?}"
    );
    // The running backup still serves a primary.
    let key = p.key_args(&o);
    let mut primary = p.spawn_primary(&o, p.backup_addr(), "primary", &key);
    let protected = wait_event(&p.primary_events(), "protected", Duration::from_secs(30));
    primary.kill9();
    assert!(protected.is_some(), "{}", p.backup.log_text());
}

/// A backup that cannot write its ack log (the disk is full) acks nothing more, ends the
/// session, and tells the primary why; the primary's log names the backup's disk, not a
/// network fault.
#[test]
fn a_backup_whose_disk_is_full_says_so_to_the_primary() {
    let o = Opts {
        guest: "sim",
        insecure: true,
        run_for: Some("3s"),
        ack_log: Some("/dev/full"),
        ..Opts::default()
    };
    let mut p = Pair::start("fulldisk", &o);
    let code = p.backup.wait_for(Duration::from_secs(20));
    let blog = p.backup.log_text();
    assert_eq!(code, Some(1), "{blog}");
    let lost = wait_event(&p.primary_events(), "backup_lost", Duration::from_secs(10))
        .unwrap_or_else(|| p.fail("the primary never noticed"));
    let reason = lost["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("the backup ended the session")
            && reason.contains("/dev/full")
            && reason.contains("No space left on device"),
        "{reason}"
    );
}

// ---------------------------------------------------------------------------------------
// Disks: the db workload on the sim, the primary's disk replicated to the backup's replica
// ---------------------------------------------------------------------------------------

/// 32M of guest memory and a 1 MiB disk, as `--guest sim --workload db` runs them here.
fn db_opts<'a>(disk: u64) -> Opts<'a> {
    Opts {
        guest: "sim",
        workload: "db",
        disk,
        replica: disk,
        ..Opts::default()
    }
}

/// With a Verify frame every checkpoint, the backup checks its replica against the
/// primary's disk digest after each commit (and exits 3 on a mismatch): over a 5 s run, every
/// checkpoint's replica equals the primary's disk. Then the primary stops, and the backup
/// takes the db guest over on its replica.
#[test]
fn db_replica_equals_the_primary_disk_at_every_verified_checkpoint() {
    let mut p = Pair::start(
        "dbverify",
        &Opts {
            verify_every: 1,
            run_for: Some("5s"),
            ..db_opts(1 << 20)
        },
    );
    let summary = p.check_verified_run();
    let writes = summary["disk_writes"].as_u64().unwrap_or(0);
    let disk_bytes = summary["disk_wire_bytes"].as_u64().unwrap_or(0);
    if writes == 0 || disk_bytes == 0 {
        p.fail(&format!("no disk writes replicated: {summary}"));
    }
    p.check_failover();
}

/// A replica need not start equal: scattered blocks of it differ from the primary's disk,
/// and before protection the pair compares fingerprints and sends only the blocks that
/// differ. Every checkpoint's replica then equals the primary's disk (verified each time),
/// and the bytes that crossed for the disk are a small part of it.
#[test]
fn a_replica_that_differs_is_brought_level_with_the_blocks_that_differ() {
    let disk: u64 = 16 << 20;
    let o = Opts {
        verify_every: 1,
        run_for: Some("1500ms"),
        ..db_opts(disk)
    };
    let mut p = Pair::start_backup("dbdiffer", &o);
    // 40 blocks scattered over the replica hold something else than the primary's zeros.
    let mut replica = vec![0u8; disk as usize];
    let mut rng = Rng(0x5EED);
    let mut differ = std::collections::BTreeSet::new();
    while differ.len() < 40 {
        differ.insert(rng.range(0, disk / 4096 - 1));
    }
    for &b in &differ {
        let at = (b * 4096) as usize;
        for x in replica[at..at + 4096].iter_mut() {
            *x = rng.range(1, 255) as u8;
        }
    }
    std::fs::write(p.dir.file("replica.img"), &replica)
        .unwrap_or_else(|e| p.fail(&format!("replica: {e}")));
    let key = p.key_args(&o);
    p.primary = Some(p.spawn_primary(&o, p.backup_addr(), "primary", &key));
    let summary = p.check_verified_run();
    let sync = &summary["disk_sync"];
    let blocks = sync["blocks"].as_u64().unwrap_or(0);
    let sent = sync["fingerprint_bytes"].as_u64().unwrap_or(u64::MAX)
        + sync["block_wire_bytes"].as_u64().unwrap_or(u64::MAX);
    // The guest's own early writes differ too; the 40 blocks at least. The primary's
    // blocks are zeros (zero records), so little but the fingerprints crosses.
    if blocks < 40 || sent > disk / 20 {
        p.fail(&format!(
            "{blocks} blocks, {sent} bytes sent for the disk: {sync}"
        ));
    }
    let synced = wait_event(&p.primary_events(), "disk_synced", Duration::from_secs(5));
    if synced.is_none() {
        p.fail("no disk_synced event");
    }
}

/// A pair running a `files` guest on `guest` (None: KVM is not here) for 2 s, every
/// checkpoint verified, both disk files created by the daemons (4 MiB): the primary's
/// image with the document tree, the replica empty.
fn files_pair(name: &str, guest: &'static str, primary_args: &[String]) -> Option<Pair> {
    if guest == "kvm" && !kvm_or_skip() {
        return None;
    }
    Some(Pair::start(
        &format!("{name}-{guest}"),
        &Opts {
            guest,
            workload: "files",
            verify_every: 1,
            run_for: Some("2s"),
            create_disks: true,
            primary_args,
            ..db_opts(4 << 20)
        },
    ))
}

/// The files workload with both disk files created by the daemons (`--disk-size`): the
/// primary's image gets the document tree, the backup's replica starts empty, the sync
/// sends the tree, every checkpoint verifies, and the backup takes over on the replica.
/// On the sim and on KVM.
#[test]
fn files_disks_created_by_the_daemons_sync_and_fail_over() {
    for guest in ["sim", "kvm"] {
        let Some(mut p) = files_pair("filescreate", guest, &[]) else {
            continue;
        };
        let summary = p.check_verified_run();
        let sync = &summary["disk_sync"];
        let image = std::fs::read(p.dir.file("primary.img"))
            .unwrap_or_else(|e| p.fail(&format!("primary image: {e}")));
        let tree = image
            .chunks(4096)
            .filter(|b| b.iter().any(|&x| x != 0))
            .count() as u64;
        if tree < 64 || sync["blocks"].as_u64().unwrap_or(0) < tree / 2 {
            p.fail(&format!(
                "{guest}: {tree} non-zero blocks on the primary's disk; sync: {sync}"
            ));
        }
        p.check_failover();
    }
}

/// Page-cache teleportation (issue 18): a `files` guest that ran a moment before the
/// backup was contacted holds file pages in its page cache, byte-equal to blocks of its
/// disk; the pre-copy and the checkpoints send such pages as disk references, resolved on
/// the backup against its replica. Every checkpoint verifies (memory and disk digests),
/// and the backup takes over. On the sim and on KVM.
#[test]
fn files_pages_equal_to_disk_blocks_go_as_disk_references_and_verify() {
    for guest in ["sim", "kvm"] {
        let Some(mut p) = files_pair("teleport", guest, &[s("--warm-up"), s("1s")]) else {
            continue;
        };
        let summary = p.check_verified_run();
        let t = &summary["teleport"];
        let refs =
            t["precopy_refs"].as_u64().unwrap_or(0) + t["checkpoint_refs"].as_u64().unwrap_or(0);
        if t["blocks_indexed"].as_u64().unwrap_or(0) < 64 || refs == 0 {
            p.fail(&format!("{guest}: no disk references: {summary}"));
        }
        p.check_failover();
    }
}

/// The check above is live: a replica changed behind the backup's back (its last page,
/// which the db's log reaches only after 16k updates) fails the next verified checkpoint
/// (exit 3, `verify_failed` for the disk).
#[test]
fn a_replica_changed_behind_the_backup_fails_verification() {
    let o = Opts {
        verify_every: 1,
        run_for: Some("20s"),
        ..db_opts(1 << 20)
    };
    let mut p = Pair::start("dbtamper", &o);
    p.wait_protected();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(p.dir.file("replica.img"))
            .unwrap_or_else(|e| p.fail(&format!("replica: {e}")));
        f.write_all_at(&[1], (1 << 20) - 1)
            .unwrap_or_else(|e| p.fail(&format!("replica: {e}")));
    }
    let code = p.backup.wait_for(Duration::from_secs(30));
    let failed = events(&p.backup_events())
        .into_iter()
        .find(|e| e["event"] == "verify_failed");
    match failed {
        Some(e) if code == Some(3) && e["what"] == "disk" => {}
        other => p.fail(&format!("backup exited {code:?}, verify_failed: {other:?}")),
    }
}

/// A replica of another size, and a disk on one side only, are refused at the handshake
/// with both sizes (or the missing disk) named, on both sides.
#[test]
fn a_disk_size_mismatch_is_refused_naming_both_sizes() {
    for (disk, replica, says) in [
        (
            1 << 20,
            2 << 20,
            "disk size mismatch: primary has 1048576, backup has 2097152",
        ),
        (
            1 << 20,
            0,
            "disk size mismatch: primary has 1048576, backup has no disk (no --disk)",
        ),
        (
            0,
            1 << 20,
            "disk size mismatch: primary has no disk (no --disk), backup has 1048576",
        ),
    ] {
        let o = Opts {
            workload: if disk > 0 { "db" } else { "kv" },
            disk,
            replica,
            ..db_opts(0)
        };
        let mut p = Pair::start_backup("dbsize", &o);
        let key = p.key_args(&o);
        let mut pr = p.spawn_primary(&o, p.backup_addr(), "primary", &key);
        let code = pr.wait_for(Duration::from_secs(30));
        let log = pr.log_text();
        p.primary = Some(pr);
        if code != Some(1) || !log.contains(&format!("backup refused the session: {says}")) {
            p.fail(&format!("the primary exited {code:?}: {log}"));
        }
        let refused = wait_event(&p.backup_events(), "refused", Duration::from_secs(20));
        if refused.as_ref().map(|e| &e["reason"]) != Some(&says.into()) {
            p.fail(&format!("the backup's refusal: {refused:?}"));
        }
    }
}

/// kill -9 of a db primary at seeded random moments: the backup takes over on its
/// replica, every update the world saw acknowledged (an output record with progress p:
/// updates 1..=p are durable) is in the replica's log, as the reference model wrote it,
/// and the replica holds every committed write (it is the committed disk plus the
/// resumed guest's writes).
#[test]
fn db_failover_keeps_every_update_the_world_saw_acknowledged() {
    let runs: u64 = std::env::var("CASTOR_KILL_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    db_kill9_runs("dbkill", "sim", runs, 0xD15C);
}

/// The same on KVM: 20 kill -9s of a db primary (a real guest driving its virtio-blk
/// disk) at seeded random moments, each with its own workload seed, the daemons as
/// separate processes. After each, the backup took over on its replica from its last
/// commit, every update the world saw acknowledged reads back from the replica's log as
/// the reference model wrote it, and the replica is the committed disk plus the resumed
/// guest's writes (the model's disk at some progress from the resumed one). Short runs (a 32 MiB guest, 0.1–0.8 s protected, the
/// backup running on for 0.4 s), so the twenty take a minute or two here.
#[test]
fn kvm_db_kill9_failovers_keep_every_update_the_world_saw_acknowledged() {
    if !kvm_or_skip() {
        return;
    }
    db_kill9_runs("kvmdbkill", "kvm", 20, 0x0D15_C0C5);
}

/// `runs` db pairs on `guest`, each with a workload seed and a kill moment (0.1–0.8 s into
/// protection) drawn from `seed`: kill -9 the primary, check the failover, and check the
/// replica ([`check_db_replica`]). Every run must have had acknowledged updates to check
/// (a record every 32 updates).
fn db_kill9_runs(tag: &str, guest: &str, runs: u64, seed: u64) {
    // Large enough that the log does not wrap in the few seconds a run lasts.
    let disk: u64 = 16 << 20;
    let mut rng = Rng(seed);
    for i in 0..runs {
        let o = Opts {
            guest,
            seed: rng.range(1, 1 << 32),
            ..db_opts(disk)
        };
        let mut p = Pair::start(&format!("{tag}{i}"), &o);
        p.wait_protected();
        let delay = rng.range(100, 800);
        std::thread::sleep(Duration::from_millis(delay));
        if let Some(pr) = p.primary.as_mut() {
            pr.kill9();
        }
        let active = p.check_failover();
        let acked = check_db_replica(&p, &o, &active);
        eprintln!(
            "{guest} run {i} (seed {}): killed after {delay} ms; updates 1..={acked} on the replica",
            o.seed
        );
    }
}

/// After a failover of a db pair run with `o`, resumed as `active` says: every update the
/// world saw acknowledged (the progress word of the last record the primary released) is
/// in the replica's log as the reference model wrote it
/// (`ha_workloads::db::check_acknowledged`), and the replica is the committed disk plus
/// the writes of the guest resumed from it: the model's disk at some progress from the
/// resumed one on (`ImageModel::run_until_disk_equals`). Returns the acknowledged
/// progress.
fn check_db_replica(p: &Pair, o: &Opts, active: &serde_json::Value) -> u64 {
    use ha_workloads::db::{Layout, acknowledged, check_acknowledged};
    let acked = acknowledged(&p.world.view().primary_last_payload).unwrap_or(0);
    if acked == 0 {
        p.fail("the world saw no acknowledged update");
    }
    let replica = std::fs::read(p.dir.file("replica.img"))
        .unwrap_or_else(|e| p.fail(&format!("replica: {e}")));
    // The primary's guest, as `ha-primary` builds it (see its main).
    let memory = memory_bytes(o.memory);
    let params = ha_workloads::guest_abi::GuestParams {
        workload: ha_workloads::guest_abi::Workload::Db,
        seed: o.seed,
        heap_gpa: ha_workloads::guest_abi::HEAP_GPA,
        heap_size: memory - ha_workloads::guest_abi::HEAP_GPA - (1 << 20),
        rate: 20000,
        tsc_khz: 0,
        output_every: 32,
        doorbell_every: 256,
        disk_size: o.disk,
    };
    let l = Layout::of(&params).unwrap_or_else(|| p.fail("no db layout"));
    let mut model = ha_workloads::model::ImageModel::fresh(memory, &params);
    model.run_to(acked);
    match check_acknowledged(&l, &replica, &model.disk, acked) {
        Ok(window) if window.start == 1 => {}
        Ok(window) => p.fail(&format!("the log wrapped: {window:?}")),
        Err(e) => p.fail(&e.to_string()),
    }
    let resumed = active["progress"].as_u64().unwrap_or(0);
    let end = events(&p.backup_events())
        .iter()
        .filter(|e| e["event"] == "progress")
        .filter_map(|e| e["progress"].as_u64())
        .max()
        .unwrap_or(resumed);
    model.run_to(resumed);
    let limit = end + end.saturating_sub(resumed).max(1000);
    if let Err(e) = model.run_until_disk_equals(&replica, limit) {
        p.fail(&format!(
            "the replica is not the committed disk plus the resumed guest's writes \
             (resumed at {resumed}, ran to {end}): {e}"
        ));
    }
    acked
}

/// Bytes of a `--memory` value the tests use ("32M").
fn memory_bytes(v: &str) -> u64 {
    v.strip_suffix('M')
        .and_then(|m| m.parse::<u64>().ok())
        .map_or_else(|| panic!("memory {v:?}: give it in M"), |m| m << 20)
}

/// A flipped bit (on a plain-TCP link, past the channel: the epoch's digest or frame checks
/// refuse it, or a flipped length stalls the epoch until the primary gives up and closes),
/// a cut connection, and a replayed message (on the encrypted link) in a stream carrying
/// disk records: the damaged epoch never commits, every earlier checkpoint's replica
/// matched the primary's disk (verified each time), and the backup takes over on a replica
/// holding every update the world saw acknowledged. `--fence`, as both sides live on.
#[test]
fn a_damaged_epoch_with_disk_records_leaves_the_replica_at_the_last_commit() {
    let disk: u64 = 16 << 20;
    for (fault, insecure) in [
        (Fault::FlipAfter(Duration::from_millis(700)), true),
        (Fault::CutAfter(Duration::from_millis(700)), true),
        (Fault::DuplicateAfter(Duration::from_millis(700)), false),
    ] {
        let o = Opts {
            fault,
            insecure,
            verify_every: 1,
            fence: true,
            ..db_opts(disk)
        };
        let mut p = Pair::start("dbfault", &o);
        let lost = p.wait_lost_after(fault);
        let active = p.check_failover();
        let acked = check_db_replica(&p, &o, &active);
        eprintln!(
            "{fault:?}: lost ({}), resumed from epoch {}, updates 1..={acked} on the replica",
            lost["reason"], active["epoch"]
        );
    }
}

/// A backup killed while it applied checkpoint 7's disk writes (its journal marked
/// committed, the replica half written) replays the journal at its next start; one
/// killed before the memory commit (the journal only staged) discards it.
#[test]
fn a_restarted_backup_replays_a_committed_journal_and_discards_a_staged_one() {
    use ha_backup::replica::Replica;
    use ha_guest::domain::DiskWrite;
    let o = Opts {
        insecure: true,
        ..db_opts(0)
    };
    for committed in [true, false] {
        let dir = Scratch::new("journal");
        let img = dir.file("replica.img");
        std::fs::write(&img, vec![0u8; 64 << 10]).unwrap_or_else(|e| panic!("{e}"));
        let writes = [
            DiskWrite {
                offset: 4096,
                data: vec![7; 4096],
            },
            DiskWrite {
                offset: 0,
                data: vec![8; 512],
            },
        ];
        {
            let (mut r, _) = Replica::open(&img).unwrap_or_else(|e| panic!("{e}"));
            r.stage(7, &writes).unwrap_or_else(|e| panic!("{e}"));
            if committed {
                r.mark_committed().unwrap_or_else(|e| panic!("{e}"));
            }
        }
        // Committed: half of the apply happened before the kill. Staged: none of it.
        let mut half = vec![0u8; 64 << 10];
        if committed {
            half[4096..8192].fill(7);
        }
        std::fs::write(&img, &half).unwrap_or_else(|e| panic!("{e}"));
        let args = vec![
            s("--listen"),
            s("127.0.0.1:0"),
            s("--port-file"),
            dir.file("port").display().to_string(),
            s("--memory"),
            s(o.memory),
            s("--guest"),
            s("sim"),
            s("--insecure"),
            s("--disk"),
            img.display().to_string(),
            s("--events"),
            dir.file("backup.events").display().to_string(),
        ];
        let mut backup = Proc::spawn("ha-backup", &args, dir.file("backup.log"));
        wait_addr(&dir.file("port"), Duration::from_secs(20));
        let ev = events(&dir.file("backup.events"))
            .into_iter()
            .find(|e| e["event"] == "disk_journal");
        let replica = std::fs::read(&img).unwrap_or_else(|e| panic!("{e}"));
        let journal = std::fs::metadata(dir.file("replica.img.journal")).map(|m| m.len());
        backup.kill9();
        let want_action = if committed { "replayed" } else { "discarded" };
        let mut want = half.clone();
        if committed {
            want[..512].fill(8);
        }
        assert!(
            ev.as_ref()
                .is_some_and(|e| e["action"] == want_action && e["epoch"] == 7),
            "{ev:?}\n{}",
            backup.log_text()
        );
        assert!(replica == want, "committed {committed}: the replica");
        assert_eq!(journal.ok(), Some(0), "the journal is emptied");
    }
}

// ---------------------------------------------------------------------------------------
// Leases on etcd: who runs the guest is decided by its key
// ---------------------------------------------------------------------------------------

/// With etcd, kill -9 of the primary: its lease is neither refreshed nor given up, so the
/// backup claims the guest's key only once it expired, and only then activates, with
/// continuity. Running the guest, the backup then fences itself when etcd stops answering.
#[test]
fn with_etcd_a_killed_primary_hands_the_guest_over_once_its_lease_expires() {
    if !etcd_or_skip() {
        return;
    }
    let etcd_dir = Scratch::new("lease-kill-etcd");
    let etcd = Etcd::start(&etcd_dir.0);
    let mut p = Pair::start(
        "lease-kill",
        &Opts {
            guest: "sim",
            etcd: Some(&etcd.url),
            ..Opts::default()
        },
    );
    p.wait_protected();
    // The cluster view lists the guest with the status its primary publishes each second.
    let row = cluster_row(&p, &etcd.url, |r| {
        r["status"]["last_epoch"].as_u64().unwrap_or(0) > 0
    });
    if row["status"]["state"] != "protected"
        || !row["holder"]
            .as_str()
            .unwrap_or("")
            .starts_with("ha-primary on")
    {
        p.fail(&format!("cluster view row: {row}"));
    }
    if let Some(pr) = p.primary.as_mut() {
        pr.kill9();
    }
    let claimed = wait_event(&p.backup_events(), "lease_claimed", Duration::from_secs(20))
        .unwrap_or_else(|| p.fail("the backup never claimed the guest's key"));
    // The primary's last keep-alive was at most a third of the TTL before the kill: the
    // key cannot pass on much sooner than the TTL.
    let waited = claimed["waited_ms"].as_u64().unwrap_or(0);
    if waited < 1000 {
        p.fail(&format!(
            "the key passed on after {waited} ms, before the lease expired"
        ));
    }
    p.check_failover();
}

/// etcd over TLS with client certificates (`--client-cert-auth`; CA and certificates made
/// with openssl here): a primary given another CA is refused at once with an error that
/// names the certificate problem and the endpoint; with the right CA the pair runs on
/// it, and a killed primary's guest is taken over by the backup once its lease expired,
/// with continuity.
#[test]
fn with_etcd_over_tls_failover_works_and_a_wrong_ca_is_named() {
    if !etcd_or_skip() {
        return;
    }
    let etcd_dir = Scratch::new("lease-tls-etcd");
    let tls = EtcdTls::generate(&etcd_dir.0).unwrap_or_else(|e| panic!("certificates: {e}"));
    let etcd = Etcd::start_tls(&etcd_dir.0, &tls);
    // The wrong CA: the primary stops before it starts the guest, naming the problem.
    let wrong = std::process::Command::new(ha_tests::bin("ha-primary"))
        .args([
            "--backup",
            "127.0.0.1:9",
            "--guest",
            "sim",
            "--insecure",
            "--etcd",
        ])
        .arg(&etcd.url)
        .args(["--lease-key", "/castor/tests/guest", "--lease-ttl", "3s"])
        .args(tls.args(&tls.other_ca))
        .output()
        .unwrap_or_else(|e| panic!("ha-primary: {e}"));
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(
        !wrong.status.success() && err.contains(&etcd.url) && err.contains("certificate"),
        "a wrong CA: exit {:?}, {err}",
        wrong.status.code()
    );
    let good = tls.args(&tls.ca);
    let mut p = Pair::start(
        "lease-tls",
        &Opts {
            guest: "sim",
            etcd: Some(&etcd.url),
            primary_args: &good,
            backup_args: &good,
            ..Opts::default()
        },
    );
    p.wait_protected();
    if let Some(pr) = p.primary.as_mut() {
        pr.kill9();
    }
    let claimed = wait_event(&p.backup_events(), "lease_claimed", Duration::from_secs(20))
        .unwrap_or_else(|| p.fail("the backup never claimed the guest's key over TLS"));
    p.check_failover();
    eprintln!(
        "over TLS: the key passed on after {} ms; a wrong CA: {}",
        claimed["waited_ms"],
        err.lines().last().unwrap_or_default()
    );
}

/// With etcd, the link between the two is cut while both live and reach etcd: the backup
/// cannot claim the key the primary holds, so it does not activate (exit 4,
/// `not_taking_over`), and the primary runs on unprotected instead of fencing its healthy
/// guest, although it was started with --fence.
#[test]
fn with_etcd_a_cut_link_runs_the_guest_once() {
    if !etcd_or_skip() {
        return;
    }
    let etcd_dir = Scratch::new("lease-cut-etcd");
    let etcd = Etcd::start(&etcd_dir.0);
    let mut p = Pair::start(
        "lease-cut",
        &Opts {
            guest: "sim",
            etcd: Some(&etcd.url),
            fence: true,
            fault: Fault::CutAfter(Duration::from_millis(1500)),
            run_for: Some("12s"),
            ..Opts::default()
        },
    );
    p.wait_protected();
    let code = p.backup.wait_for(Duration::from_secs(30));
    let ev = events(&p.backup_events());
    let refused = ev.iter().find(|e| e["event"] == "not_taking_over");
    if code != Some(4) || refused.is_none() || ev.iter().any(|e| e["event"] == "active") {
        p.fail(&format!("backup exited {code:?}; events {ev:?}"));
    }
    let lost = wait_event(&p.primary_events(), "backup_lost", Duration::from_secs(10))
        .unwrap_or_else(|| p.fail("the primary never noticed"));
    if lost["policy"] != "lease" {
        p.fail(&format!("the primary's policy: {lost}"));
    }
    let mut pr = p.primary.take().unwrap_or_else(|| p.fail("no primary"));
    let code = pr.wait_for(Duration::from_secs(30));
    let out = pr.stdout();
    p.primary = Some(pr);
    if code != Some(0) || primary_fenced(&p) {
        p.fail(&format!("primary exited {code:?}: {out}"));
    }
}

/// Whether the primary's events say it fenced or self-fenced its guest.
fn primary_fenced(p: &Pair) -> bool {
    events(&p.primary_events())
        .iter()
        .any(|e| e["event"] == "self_fenced" || e["policy"] == "fence")
}

/// With etcd, the primary cut off from etcd (the member stopped) cannot refresh its lease:
/// it pauses the guest and holds its output before the lease can expire (`self_fenced`),
/// and releases nothing meanwhile. When etcd answers again it either finds the same lease
/// alive and resumes (`lease_recovered`, output flows again) or finds it gone and stays
/// paused, exiting non-zero (`lease_lost`) — never running on with a lost lease.
#[test]
fn with_etcd_a_primary_cut_off_from_etcd_fences_itself() {
    if !etcd_or_skip() {
        return;
    }
    let etcd_dir = Scratch::new("lease-fence-etcd");
    let etcd = Etcd::start(&etcd_dir.0);
    let mut p = Pair::start(
        "lease-fence",
        &Opts {
            guest: "sim",
            etcd: Some(&etcd.url),
            run_for: Some("20s"),
            ..Opts::default()
        },
    );
    p.wait_protected();
    etcd.signal("STOP");
    let fenced = wait_event(&p.primary_events(), "self_fenced", Duration::from_secs(10));
    let seen_at_fence = p.world.view().from_primary;
    std::thread::sleep(Duration::from_millis(300));
    let seen_later = p.world.view().from_primary;
    etcd.signal("CONT");
    if fenced.is_none() {
        p.fail("the primary never fenced itself");
    }
    if seen_later != seen_at_fence {
        p.fail(&format!(
            "output released while fenced: {seen_at_fence} then {seen_later} records"
        ));
    }
    let t = std::time::Instant::now();
    let outcome = loop {
        let ev = events(&p.primary_events());
        if let Some(e) = ev
            .iter()
            .find(|e| e["event"] == "lease_recovered" || e["event"] == "lease_lost")
        {
            break e["event"].as_str().unwrap_or("").to_string();
        }
        if t.elapsed() > Duration::from_secs(20) {
            p.fail("neither recovered nor lost after etcd came back");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut pr = p.primary.take().unwrap_or_else(|| p.fail("no primary"));
    let code = pr.wait_for(Duration::from_secs(40));
    let log = pr.log_text();
    p.primary = Some(pr);
    match outcome.as_str() {
        "lease_recovered" => {
            if code != Some(0) || p.world.view().from_primary <= seen_later {
                p.fail(&format!(
                    "recovered, then exited {code:?}, no new output: {log}"
                ));
            }
        }
        _ => {
            if code == Some(0) || !log.contains("lease in etcd was lost") {
                p.fail(&format!("lost the lease, then exited {code:?}: {log}"));
            }
        }
    }
    eprintln!("after etcd came back: {outcome}");
}

/// The test guest's row of `ha-primary cluster --json` once `ready` holds (at most 10 s).
fn cluster_row(
    p: &Pair,
    url: &str,
    ready: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let t = std::time::Instant::now();
    loop {
        let out = std::process::Command::new(ha_tests::bin("ha-primary"))
            .args(["cluster", "--etcd", url, "--json"])
            .output()
            .unwrap_or_else(|e| p.fail(&format!("ha-primary cluster: {e}")));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let row = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|r| r["key"] == "/castor/tests/guest");
        match row {
            Some(r) if ready(&r) => return r,
            _ if t.elapsed() > Duration::from_secs(10) => p.fail(&format!(
                "cluster view: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            )),
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// A planned switchover (SIGUSR1 to the primary): the primary takes a last checkpoint,
/// keeps its guest paused, waits for the ack and hands the guest over; the backup takes
/// over at once (no detection timeout) from that checkpoint, with continuity, and the
/// primary exits 0. With etcd the primary gives its key up, so the backup claims it at
/// once too. On KVM.
#[test]
fn a_planned_switchover_moves_the_guest_with_continuity() {
    if !kvm_or_skip() {
        return;
    }
    let etcd_dir = Scratch::new("switchover-etcd");
    let etcd = etcd_or_skip().then(|| Etcd::start(&etcd_dir.0));
    let mut p = Pair::start(
        "switchover",
        &Opts {
            etcd: etcd.as_ref().map(|e| e.url.as_str()),
            ..Opts::default()
        },
    );
    p.wait_protected();
    std::thread::sleep(Duration::from_millis(500));
    let mut pr = p.primary.take().unwrap_or_else(|| p.fail("no primary"));
    pr.signal(libc::SIGUSR1);
    let code = pr.wait_for(Duration::from_secs(30));
    p.primary = Some(pr);
    let switched = wait_event(&p.primary_events(), "switched_over", Duration::from_secs(5))
        .unwrap_or_else(|| p.fail("the primary never switched over"));
    if code != Some(0) {
        p.fail(&format!("the primary exited {code:?}"));
    }
    let lost = wait_event(&p.backup_events(), "primary_lost", Duration::from_secs(10))
        .unwrap_or_else(|| p.fail("the backup never took the handover"));
    if !lost["reason"]
        .as_str()
        .unwrap_or("")
        .starts_with("handed over")
    {
        p.fail(&format!("the backup's reason: {lost}"));
    }
    let active = p.check_failover();
    if etcd.is_some() {
        let claimed = wait_event(&p.backup_events(), "lease_claimed", Duration::from_secs(5))
            .unwrap_or_else(|| p.fail("no lease_claimed"));
        // Given up by the primary, the key is free at the first try: well under the TTL.
        if claimed["waited_ms"].as_u64().unwrap_or(u64::MAX) >= 3000 {
            p.fail(&format!("the key was not free at once: {claimed}"));
        }
    }
    eprintln!(
        "switchover: paused at {} ms, backup active at {} ms (epoch {} → {})",
        switched["paused_unix_ms"], active["t_ms"], switched["epoch"], active["epoch"]
    );
}

/// The spare backup of [`Opts::spare`]: like the pair's backup (same key, mode, memory),
/// on its own port, its files `spare.*`.
fn spawn_spare(dir: &Scratch, o: &Opts, world: &World) -> Proc {
    let mut args = backup_args(
        dir,
        o,
        SocketAddr::from(([127, 0, 0, 1], 0)),
        &world.addr.to_string(),
        "spare.",
    );
    args.extend([s("--exit-after"), s("1s")]);
    Proc::spawn("ha-backup", &args, dir.file("spare.log"))
}

/// A backup's options as the tests run it: listening on `listen`, the pair's memory,
/// mode and backend, releasing to `output`, its files in `dir` (`{prefix}port`,
/// `{prefix}ack.log`, `{prefix}events` — the pair's own backup has the prefix "" and
/// names its events `backup.events`), the pair key (or `--insecure`).
fn backup_args(
    dir: &Scratch,
    o: &Opts,
    listen: SocketAddr,
    output: &str,
    prefix: &str,
) -> Vec<String> {
    let file = |name: &str| dir.file(&format!("{prefix}{name}")).display().to_string();
    let events = if prefix.is_empty() {
        dir.file("backup.events").display().to_string()
    } else {
        file("events")
    };
    let mut args = vec![
        s("--listen"),
        listen.to_string(),
        s("--port-file"),
        file("port"),
        s("--memory"),
        s(o.memory),
        s("--mode"),
        s(o.mode),
        s("--guest"),
        s(o.guest),
        s("--interval"),
        s("25ms"),
        // Generous on a shared 2-core machine: scheduling stalls of tens of ms must not
        // look like a dead primary.
        s("--detect-timeout"),
        s("400ms"),
        s("--output"),
        s(output),
        s("--events"),
        events,
    ];
    if prefix.is_empty() {
        // `--ack-log` of the pair's backup: the default, or Opts::ack_log (added after).
        if o.ack_log.is_none() {
            args.extend([s("--ack-log"), file("ack.log")]);
        }
    } else {
        args.extend([s("--ack-log"), file("ack.log")]);
    }
    if o.insecure {
        args.push(s("--insecure"));
    } else {
        args.extend([s("--key"), dir.file("pair.key").display().to_string()]);
    }
    args
}

/// Re-protection after a kill: A protects the guest to B, B is told to re-protect to a
/// spare C. A is killed: B takes over, finds C, syncs it and protects the guest as its
/// primary; then B is killed too, and C takes over from B's last checkpoint with
/// continuity — the world sees no skip, no changed repeat and no release ahead of a
/// commit across both failovers.
#[test]
fn a_failed_over_guest_is_protected_again_and_survives_a_second_failover() {
    if !kvm_or_skip() {
        return;
    }
    let o = Opts {
        exit_after: "60s",
        spare: true,
        ..Opts::default()
    };
    let mut p = Pair::start("reprotect", &o);
    p.wait_protected();
    std::thread::sleep(Duration::from_millis(500));
    let mut a = p.primary.take().unwrap_or_else(|| p.fail("no primary"));
    a.kill9();
    p.primary = Some(a);
    let active = wait_event(&p.backup_events(), "active", Duration::from_secs(20))
        .unwrap_or_else(|| p.fail("B never took over"));
    let reprotect_events = p.dir.file("backup.events.reprotect");
    let protected = wait_event(&reprotect_events, "protected", Duration::from_secs(30))
        .unwrap_or_else(|| p.fail("B never protected the guest again"));
    let reprotect_ms = protected["t_ms"]
        .as_u64()
        .unwrap_or(0)
        .saturating_sub(active["t_ms"].as_u64().unwrap_or(0));
    // Some of B's checkpoints committed at the spare, then B dies too.
    let spare_acks = p.dir.file("spare.ack.log");
    let t = std::time::Instant::now();
    while committed(&spare_acks).len() < 10 && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let b_acks = committed(&spare_acks).len();
    if b_acks < 10 {
        p.fail(&format!(
            "the spare committed only {b_acks} of B's checkpoints"
        ));
    }
    p.backup.kill9();
    let mut spare = p.spare.take().unwrap_or_else(|| p.fail("no spare"));
    let c_active = p.check_took_over(&mut spare, &p.dir.file("spare.events"), "the spare");
    let (last_epoch, _) = p.check_resumed_at(&c_active, &spare_acks, "the second failover");
    eprintln!(
        "re-protection: B active from epoch {}, protected again {reprotect_ms} ms later \
         (pre-copy {} bytes); {b_acks} of B's checkpoints committed at C; C active from \
         epoch {last_epoch}",
        active["epoch"], protected["precopy_wire_bytes"],
    );
}

/// Re-protection past the loss of the new backup (`reprotect_also`): B is told to
/// re-protect to C1, then C2. A is killed: B takes over and protects the guest to C1; C1
/// is killed after some checkpoints, and B, the guest's primary now, runs it unprotected
/// and tries C1 again and C2, where a backup starts only after C1's death. C2 gets the
/// guest, commits B's checkpoints, and takes over from B's last one with continuity when
/// B is killed in turn (B's releases while unprotected are the only ones ahead of a
/// commit).
#[test]
fn a_reprotecting_backup_whose_new_backup_dies_protects_the_guest_to_its_next_address() {
    let c2_addr = free_port();
    let next = [s("--reprotect-to"), c2_addr.to_string()];
    let o = Opts {
        guest: "sim",
        exit_after: "60s",
        spare: true,
        backup_args: &next,
        ..Opts::default()
    };
    let mut p = Pair::start("reprotect-also", &o);
    p.wait_protected();
    if let Some(a) = &mut p.primary {
        a.kill9();
    }
    wait_event(&p.backup_events(), "active", Duration::from_secs(20))
        .unwrap_or_else(|| p.fail("B never took over"));
    let b_events = p.dir.file("backup.events.reprotect");
    let to_c1 = wait_event(&b_events, "connected", Duration::from_secs(30))
        .unwrap_or_else(|| p.fail("B never reached C1"));
    let c1_addr = wait_addr(&p.dir.file("spare.port"), Duration::from_secs(1));
    if to_c1["backup"] != c1_addr.to_string() {
        p.fail(&format!(
            "B protected the guest first to {to_c1}, not C1 {c1_addr}"
        ));
    }
    let wait_commits = |acks: &std::path::Path, n: usize| {
        let t = std::time::Instant::now();
        while committed(acks).len() < n && t.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(50));
        }
        committed(acks).len()
    };
    let c1_acks = wait_commits(&p.dir.file("spare.ack.log"), 10);
    if c1_acks < 10 {
        p.fail(&format!("C1 committed only {c1_acks} of B's checkpoints"));
    }
    let mut c1 = p.spare.take().unwrap_or_else(|| p.fail("no C1"));
    c1.kill9();
    wait_event(&b_events, "backup_lost", Duration::from_secs(10))
        .unwrap_or_else(|| p.fail("B never noticed C1's death"));
    // Unprotected a while (B keeps trying C1's dead address and C2's, where nothing
    // listens yet); then C2 starts.
    std::thread::sleep(Duration::from_millis(500));
    let mut args = backup_args(&p.dir, &o, c2_addr, &p.world.addr.to_string(), "spare2.");
    args.extend([s("--exit-after"), s("1s")]);
    let mut c2 = Proc::spawn("ha-backup", &args, p.dir.file("spare2.log"));
    let again = wait_event(&b_events, "reprotecting", Duration::from_secs(20))
        .unwrap_or_else(|| p.fail(&format!("B never reached C2: {}", c2.log_text())));
    if again["backup"] != c2_addr.to_string()
        || again["unprotected_ms"].as_u64().is_none_or(|ms| ms < 400)
    {
        p.fail(&format!(
            "B protected the guest again with {again}, C2 is {c2_addr}"
        ));
    }
    let c2_acks_path = p.dir.file("spare2.ack.log");
    let c2_acks = wait_commits(&c2_acks_path, 10);
    if c2_acks < 10 {
        p.fail(&format!(
            "C2 committed only {c2_acks} of B's checkpoints: {}",
            c2.log_text()
        ));
    }
    p.backup.kill9();
    let c2_active = p.check_took_over(&mut c2, &p.dir.file("spare2.events"), "C2");
    let (last_epoch, _) = p.check_resumed_after(&c2_active, &c2_acks_path, "C2's takeover", true);
    eprintln!(
        "re-protection to the next address: {c1_acks} of B's checkpoints at C1, then B \
         unprotected {} ms until C2; {c2_acks} at C2; C2 active from epoch {last_epoch}",
        again["unprotected_ms"]
    );
}

/// Re-protection's metrics: a backup with `--metrics` on loopback fails over and protects
/// the guest again to a spare (`--reprotect-to`); its one endpoint then serves the
/// primary's families beside its own: `castor_primary_epochs_committed` counts up as the
/// spare commits the new primary's checkpoints, `castor_primary_state` is `protected`, and
/// the backup's own `castor_state` is `reprotected`.
#[test]
fn a_reprotecting_backup_serves_the_primarys_metrics_on_its_endpoint() {
    let mdir = Scratch::new("reprotect-metrics-port");
    let mport = mdir.file("metrics.port");
    let metrics = [
        s("--metrics"),
        s("127.0.0.1:0"),
        s("--metrics-port-file"),
        mport.display().to_string(),
    ];
    let o = Opts {
        guest: "sim",
        exit_after: "60s",
        spare: true,
        backup_args: &metrics,
        ..Opts::default()
    };
    let mut p = Pair::start("reprotect-metrics", &o);
    p.wait_protected();
    let maddr = wait_addr(&mport, Duration::from_secs(20));
    let before = scrape(maddr);
    // Served from the start, at zero: the primary's families are the backup's too.
    for (name, want) in [
        ("castor_state{state=\"receiving\"}", 1.0),
        ("castor_primary_epochs_committed_total", 0.0),
        ("castor_primary_state{state=\"protected\"}", 0.0),
    ] {
        if sample(&before, name) != Some(want) {
            p.fail(&format!(
                "before the failover, {name} is not {want}:\n{before}"
            ));
        }
    }
    if let Some(a) = &mut p.primary {
        a.kill9();
    }
    wait_event(&p.backup_events(), "active", Duration::from_secs(20))
        .unwrap_or_else(|| p.fail("B never took over"));
    wait_event(
        &p.dir.file("backup.events.reprotect"),
        "protected",
        Duration::from_secs(30),
    )
    .unwrap_or_else(|| p.fail("B never protected the guest again"));
    let counted = |body: &str| sample(body, "castor_primary_epochs_committed_total");
    let first = scrape(maddr);
    let first_n = counted(&first).unwrap_or_else(|| p.fail(&format!("no counter:\n{first}")));
    // More of the new primary's checkpoints are acknowledged by the spare: the counter
    // follows them.
    let t = std::time::Instant::now();
    let mut last = first.clone();
    while counted(&last).is_none_or(|n| n < first_n + 10.0) && t.elapsed() < Duration::from_secs(20)
    {
        std::thread::sleep(Duration::from_millis(50));
        last = scrape(maddr);
    }
    let last_n = counted(&last).unwrap_or(0.0);
    if last_n < first_n + 10.0 {
        p.fail(&format!(
            "castor_primary_epochs_committed went from {first_n} to {last_n} in 20 s:\n{last}"
        ));
    }
    let spare_commits = committed(&p.dir.file("spare.ack.log")).len();
    if spare_commits < 10 {
        p.fail(&format!("the spare committed {spare_commits} checkpoints"));
    }
    for (name, want) in [
        ("castor_state{state=\"reprotected\"}", 1.0),
        ("castor_state{state=\"active\"}", 0.0),
        ("castor_primary_state{state=\"protected\"}", 1.0),
    ] {
        if sample(&last, name) != Some(want) {
            p.fail(&format!("re-protecting, {name} is not {want}:\n{last}"));
        }
    }
    if sample(&last, "castor_primary_wire_bytes_total{encoding=\"other\"}").unwrap_or(0.0) <= 0.0 {
        p.fail(&format!("no bytes counted as sent:\n{last}"));
    }
    eprintln!(
        "re-protection metrics: castor_primary_epochs_committed {first_n} → {last_n}; the \
         spare's ack log has {spare_commits} checkpoints"
    );
}

/// The world's violations other than releases ahead of any commit, which an unprotected
/// primary makes by policy.
fn beyond_unprotected(violations: &[String]) -> Vec<&String> {
    violations
        .iter()
        .filter(|v| !v.contains("before a checkpoint"))
        .collect()
}

/// The `epoch out_head` lines of an ack log.
fn committed(path: &std::path::Path) -> Vec<(u64, u64)> {
    ha_wire::output::read_ack_log(path)
}

/// Write the config of the backup the primary's host becomes (`--become-backup`):
/// listening on `listen`, the pair's key, memory and mode, the world as its output, its
/// ack log `spare.ack.log` (checked by the world), its events `a2.events`, `extra` TOML.
fn write_backup_config(
    p: &Pair,
    o: &Opts,
    path: &std::path::Path,
    listen: SocketAddr,
    extra: &str,
) {
    let toml = format!(
        "listen = \"{listen}\"\nmemory = \"{}\"\nmode = \"{}\"\nguest = \"{}\"\n\
         interval = \"25ms\"\ndetect_timeout = \"400ms\"\noutput = \"{}\"\n\
         ack_log = \"{}\"\nevents = \"{}\"\nexit_after = \"2s\"\nkey = \"{}\"\n{extra}",
        o.memory,
        o.mode,
        o.guest,
        p.world.addr,
        p.dir.file("spare.ack.log").display(),
        p.dir.file("a2.events").display(),
        p.dir.file("pair.key").display(),
    );
    std::fs::write(path, toml).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// With etcd, the host of a killed primary comes back (its service restarted with the
/// same options): the guest's key is held by the backup that took it over, so the
/// returning `ha-primary --become-backup` becomes that host's backup instead of refusing
/// to start; the new primary (`--reprotect-to` it) protects the guest to it, with no
/// operator action; and when the new primary is killed in turn, the guest comes back to
/// the first host from the last checkpoint, once the lease expired.
#[test]
fn with_etcd_a_returning_primary_host_becomes_the_backup_and_takes_the_guest_back() {
    if !etcd_or_skip() {
        return;
    }
    let etcd_dir = Scratch::new("return-etcd");
    let etcd = Etcd::start(&etcd_dir.0);
    let a_listen = free_port();
    let dir = Scratch::new("return-cfg");
    let cfg = dir.file("a-backup.toml");
    let reprotect = [s("--reprotect-to"), a_listen.to_string()];
    let become_backup = [s("--become-backup"), cfg.display().to_string()];
    let o = Opts {
        guest: "sim",
        etcd: Some(&etcd.url),
        exit_after: "60s",
        backup_args: &reprotect,
        primary_args: &become_backup,
        ..Opts::default()
    };
    let mut p = Pair::start_backup("return", &o);
    let lease = format!(
        "etcd = \"{}\"\nlease_key = \"/castor/tests/guest\"\nlease_ttl = \"3s\"\n",
        etcd.url
    );
    write_backup_config(&p, &o, &cfg, a_listen, &lease);
    let key = p.key_args(&o);
    p.primary = Some(p.spawn_primary(&o, p.backup_addr(), "primary", &key));
    p.wait_protected();
    if let Some(a) = &mut p.primary {
        a.kill9();
    }
    wait_event(&p.backup_events(), "active", Duration::from_secs(20))
        .unwrap_or_else(|| p.fail("B never took over"));
    // A's host comes back: the same command line as before.
    let again = p.spawn_primary(&o, p.backup_addr(), "primary-again", &key);
    p.primary = Some(again);
    let b_events = p.dir.file("backup.events.reprotect");
    wait_event(&b_events, "protected", Duration::from_secs(30))
        .unwrap_or_else(|| p.fail("B never protected the guest to the returning host"));
    let spare_acks = p.dir.file("spare.ack.log");
    let t = std::time::Instant::now();
    while committed(&spare_acks).len() < 10 && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(50));
    }
    p.backup.kill9();
    let a_active = wait_event(&p.dir.file("a2.events"), "active", Duration::from_secs(30))
        .unwrap_or_else(|| p.fail("the returning host never took the guest back"));
    let claimed = wait_event(
        &p.dir.file("a2.events"),
        "lease_claimed",
        Duration::from_secs(1),
    )
    .unwrap_or_else(|| p.fail("the returning host activated without the key"));
    let mut a = p.primary.take().unwrap_or_else(|| p.fail("no A"));
    let code = a.wait_for(Duration::from_secs(20));
    if code != Some(0) {
        p.fail(&format!(
            "the returning host exited {code:?}: {}",
            a.log_text()
        ));
    }
    let (last_epoch, _) = p.check_resumed_at(&a_active, &spare_acks, "the return");
    eprintln!(
        "returning host: backup of B, then active from epoch {last_epoch} after the key \
         passed on ({} ms)",
        claimed["waited_ms"]
    );
}

/// A free loopback port (bound, read, released: the daemon that gets it binds it again).
fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap_or_else(|e| panic!("no free port: {e}"))
}

/// A planned switchover with the roles swapped, there: `p`'s backup (B, started with
/// `--reprotect-to a_listen`) is running, A's backup configuration (`cfg`, listening at
/// `a_listen`, with `extra` TOML lines) is written, A starts with `--become-backup cfg`
/// (in `o`), and once the guest is protected A hands it over and becomes B's backup. B's
/// `active` event and the re-protecting primary's `protected` event.
fn swap_there(
    p: &mut Pair,
    o: &Opts,
    (cfg, a_listen, extra): (&std::path::Path, SocketAddr, &str),
) -> (serde_json::Value, serde_json::Value) {
    write_backup_config(p, o, cfg, a_listen, extra);
    let key = p.key_args(o);
    p.primary = Some(p.spawn_primary(o, p.backup_addr(), "primary", &key));
    p.wait_protected();
    std::thread::sleep(Duration::from_millis(500));
    if let Some(a) = &mut p.primary {
        a.signal(libc::SIGUSR1);
    }
    wait_event(
        &p.primary_events(),
        "switched_over",
        Duration::from_secs(10),
    )
    .unwrap_or_else(|| p.fail("A never switched over"));
    let b_active = wait_event(&p.backup_events(), "active", Duration::from_secs(10))
        .unwrap_or_else(|| p.fail("B never took over"));
    let protected = wait_event(
        &p.dir.file("backup.events.reprotect"),
        "protected",
        Duration::from_secs(30),
    )
    .unwrap_or_else(|| p.fail("B never protected the guest to A"));
    (b_active, protected)
}

/// After [`swap_there`]: A commits ten of B's checkpoints with no digest failing, then B
/// hands the guest back and A resumes it with continuity. The epoch A resumed from.
fn swap_back(p: &mut Pair) -> u64 {
    let a2_events = p.dir.file("a2.events");
    let acks = p.dir.file("spare.ack.log");
    let t = std::time::Instant::now();
    while committed(&acks).len() < 10 && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(50));
    }
    if committed(&acks).len() < 10 {
        p.fail("A acknowledged fewer than 10 of B's checkpoints");
    }
    if events(&a2_events)
        .iter()
        .any(|e| e["event"] == "verify_failed")
    {
        p.fail("A's image plus the resync did not match B's guest");
    }
    p.backup.signal(libc::SIGUSR1);
    let code = p.backup.wait_for(Duration::from_secs(20));
    if code != Some(0) {
        p.fail(&format!("B exited {code:?} after handing back"));
    }
    let a_active = wait_event(&a2_events, "active", Duration::from_secs(10))
        .unwrap_or_else(|| p.fail("A never took the guest back"));
    let mut a = p.primary.take().unwrap_or_else(|| p.fail("no A"));
    let code = a.wait_for(Duration::from_secs(20));
    if code != Some(0) {
        p.fail(&format!(
            "A (as backup, then active) exited {code:?}: {}",
            a.log_text()
        ));
    }
    p.check_resumed_at(&a_active, &acks, "the switch back").0
}

/// Switchover there and back, with the roles swapped: A (`--become-backup`) hands the
/// guest over to B and becomes B's backup in the same process, starting from the guest's
/// memory at the handover; B (`--reprotect-to` A) protects the guest as its primary,
/// sending only the pages its guest changed since (compared by fingerprints; the first
/// checkpoint's digest checks the result). Then B hands the guest back to A. The world
/// sees no skip, no changed repeat and no release ahead of a commit throughout.
#[test]
fn a_switchover_swaps_the_roles_and_a_second_one_moves_the_guest_back() {
    if !kvm_or_skip() {
        return;
    }
    let a_listen = free_port();
    let dir = Scratch::new("swap-cfg");
    // A's backup configuration: the pair's key and the world are known once the pair
    // starts, so they are written into it below.
    let cfg = dir.file("a-backup.toml");
    let reprotect = [s("--reprotect-to"), a_listen.to_string()];
    let become_backup = [s("--become-backup"), cfg.display().to_string()];
    // The web workload at its own rate (a real web server's): at 20000 units/s it would
    // touch most of a 32 MiB guest's pages in the moment B waits for A's backup to listen.
    let o = Opts {
        exit_after: "60s",
        rate: "2500",
        backup_args: &reprotect,
        primary_args: &become_backup,
        ..Opts::default()
    };
    let mut p = Pair::start_backup("swap", &o);
    let (b_active, protected) = swap_there(&mut p, &o, (&cfg, a_listen, ""));
    let compared = wait_event(
        &p.dir.file("backup.events.reprotect"),
        "memory_compared",
        Duration::from_secs(1),
    )
    .unwrap_or_else(|| p.fail("B did not compare A's image"));
    let (pages, differ) = (
        compared["pages"].as_u64().unwrap_or(0),
        compared["differ"].as_u64().unwrap_or(u64::MAX),
    );
    // A's image is the checkpoint B resumed from: only what B's guest wrote since differs.
    if pages == 0 || differ * 4 > pages {
        p.fail(&format!("resync sent {differ} of {pages} pages"));
    }
    let last_epoch = swap_back(&mut p);
    eprintln!(
        "role swap: B active from epoch {}; resync sent {differ} of {pages} pages \
         ({} bytes of fingerprints, pre-copy {} bytes), protected {} ms after B's sync began; \
         back at A from epoch {last_epoch}",
        b_active["epoch"],
        compared["fingerprint_bytes"],
        protected["precopy_wire_bytes"],
        protected["sync_ms"],
    );
}

/// The role swap with a disk: A's backup configuration names A's own disk as its
/// replica, so after the handover A holds both halves of the checkpoint B resumed from
/// (memory and disk). B protects the guest again to A by fingerprints of both: only the
/// pages and blocks B's guest wrote since differ; the first checkpoint's memory and disk
/// digests match at A; then B hands the guest back and A resumes it on that disk.
#[test]
fn a_switchover_with_a_disk_swaps_the_roles_and_resyncs_only_what_changed() {
    if !kvm_or_skip() {
        return;
    }
    let disk: u64 = 8 << 20;
    let a_listen = free_port();
    let dir = Scratch::new("swap-disk-cfg");
    let cfg = dir.file("a-backup.toml");
    let reprotect = [s("--reprotect-to"), a_listen.to_string()];
    let become_backup = [s("--become-backup"), cfg.display().to_string()];
    let o = Opts {
        workload: "db",
        disk,
        replica: disk,
        exit_after: "60s",
        rate: "2000",
        backup_args: &reprotect,
        primary_args: &become_backup,
        ..Opts::default()
    };
    let mut p = Pair::start_backup("swapdisk", &o);
    let a_disk = format!("disk = \"{}\"\n", p.dir.file("primary.img").display());
    swap_there(&mut p, &o, (&cfg, a_listen, &a_disk));
    let b_events = p.dir.file("backup.events.reprotect");
    let synced = wait_event(&b_events, "disk_synced", Duration::from_secs(1))
        .unwrap_or_else(|| p.fail("B did not compare A's disk"));
    let compared = wait_event(&b_events, "memory_compared", Duration::from_secs(1))
        .unwrap_or_else(|| p.fail("B did not compare A's image"));
    let blocks = synced["blocks"].as_u64().unwrap_or(u64::MAX);
    // A's disk is the checkpoint's: only the blocks B's guest wrote since differ (the
    // db guest writes a few per request; it ran well under a second before the sync).
    if blocks == 0 || blocks * 4 > disk / 4096 {
        p.fail(&format!(
            "the disk resync found {blocks} blocks differing: {synced}"
        ));
    }
    let (pages, differ) = (
        compared["pages"].as_u64().unwrap_or(0),
        compared["differ"].as_u64().unwrap_or(u64::MAX),
    );
    if pages == 0 || differ * 4 > pages {
        p.fail(&format!("resync sent {differ} of {pages} pages"));
    }
    swap_back(&mut p);
    eprintln!(
        "role swap with a disk: {blocks} of {} blocks and {differ} of {pages} pages resynced",
        disk / 4096
    );
}

/// A primary that lost its backup protects the guest again (`--reprotect`): the backup is
/// killed, the guest runs on unprotected, a new backup starts at the same address, and the
/// primary syncs it and checkpoints to it; then the primary is killed and the new backup
/// resumes the guest from its last commit. The world sees no gap and no changed repeat
/// (releases without a commit are the unprotected stretch's, so only those are allowed).
#[test]
fn a_primary_whose_backup_died_protects_the_guest_again_when_one_is_back() {
    if !kvm_or_skip() {
        return;
    }
    let reprotect = [s("--reprotect")];
    reprotect_after_backup_death(
        "reconnect",
        &Opts {
            insecure: true,
            primary_args: &reprotect,
            ..Opts::default()
        },
    );
}

/// With etcd, the same on the simulated guest: running unprotected, the primary marks the
/// dead backup's image stale in etcd before it releases uncommitted output; protected
/// again, it clears the mark, so the new backup takes the guest over when the primary is
/// killed (once its lease expired) instead of refusing a stale image.
#[test]
fn with_etcd_a_primary_protected_again_clears_the_stale_mark() {
    if !etcd_or_skip() {
        return;
    }
    let etcd_dir = Scratch::new("stale-etcd");
    let etcd = Etcd::start(&etcd_dir.0);
    let reprotect = [s("--reprotect")];
    let p = reprotect_after_backup_death(
        "stale",
        &Opts {
            guest: "sim",
            insecure: true,
            etcd: Some(&etcd.url),
            primary_args: &reprotect,
            ..Opts::default()
        },
    );
    if wait_event(
        &p.primary_events(),
        "backup_marked_stale",
        Duration::from_secs(1),
    )
    .is_none()
    {
        p.fail("the unprotected primary released output without marking the backup stale");
    }
}

/// The backup of a pair started with `o` (the primary with `--reprotect`) is killed; a new
/// one on the same address is protected by the primary again, commits, and takes over
/// with continuity when the primary is killed in turn.
fn reprotect_after_backup_death(tag: &str, o: &Opts) -> Pair {
    let mut p = Pair::start(tag, o);
    p.wait_protected();
    let addr = p.backup_addr();
    std::thread::sleep(Duration::from_millis(300));
    p.backup.kill9();
    wait_event(&p.primary_events(), "backup_lost", Duration::from_secs(10))
        .unwrap_or_else(|| p.fail("the primary never noticed the backup's death"));
    // Unprotected for a while: the primary keeps trying the dead address meanwhile.
    std::thread::sleep(Duration::from_millis(700));
    let mut args = backup_args(&p.dir, o, addr, &p.world.addr.to_string(), "spare.");
    args.extend([s("--exit-after"), s("1s")]);
    args.extend(lease_args(o));
    let mut spare = Proc::spawn("ha-backup", &args, p.dir.file("spare.log"));
    let again = wait_event(&p.primary_events(), "reprotecting", Duration::from_secs(20))
        .unwrap_or_else(|| p.fail("the primary never reached the new backup"));
    assert!(
        again["unprotected_ms"].as_u64().is_some_and(|ms| ms >= 500),
        "{again}"
    );
    let spare_acks = p.dir.file("spare.ack.log");
    let t = std::time::Instant::now();
    while committed(&spare_acks).len() < 10 && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
    }
    if committed(&spare_acks).len() < 10 {
        p.fail(&format!(
            "the new backup committed {} checkpoints: {}",
            committed(&spare_acks).len(),
            spare.log_text()
        ));
    }
    let mut a = p.primary.take().unwrap_or_else(|| p.fail("no primary"));
    a.kill9();
    let primary_log = a.log_text();
    p.primary = Some(a);
    assert!(
        primary_log.contains("a backup welcomed this primary again"),
        "{primary_log}"
    );
    let spare_events = p.dir.file("spare.events");
    let Some(active) = wait_event(&spare_events, "active", Duration::from_secs(20)) else {
        p.fail(&format!(
            "the new backup never took over: {}",
            spare.log_text()
        ))
    };
    let code = spare.wait_for(Duration::from_secs(20));
    if code != Some(0) {
        p.fail(&format!(
            "the new backup exited {code:?}: {}",
            spare.log_text()
        ));
    }
    let Some(&(last_epoch, last_head)) = committed(&spare_acks).last() else {
        p.fail("the new backup's ack log is empty")
    };
    assert_eq!(active["epoch"], last_epoch, "{active}");
    assert_eq!(active["out_head"], last_head, "{active}");
    std::thread::sleep(Duration::from_millis(50));
    let v = p.world.view();
    let bad = beyond_unprotected(&v.violations);
    assert!(bad.is_empty(), "{bad:?}");
    assert!(
        v.next_seq > last_head,
        "no output after the takeover: {v:?}"
    );
    eprintln!(
        "re-protection by the primary: unprotected {} ms; the new backup resumed the guest \
         from epoch {last_epoch} ({} releases without a commit while unprotected)",
        again["unprotected_ms"],
        v.violations.len()
    );
    p
}
