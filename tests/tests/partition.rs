//! The partition campaign (issue 19): a three-member etcd cluster (Debian's `etcd`, real),
//! each member on a host of its own, and a pair (`ha-primary`, `ha-backup` with `--etcd`
//! to all three members, the simulated guest under load) on two more hosts; every two
//! hosts share a link of their own ([`Mesh`]), so a scenario cuts any set of them, holds
//! the cut for three lease TTLs and heals it. Checked in every scenario: the world never
//! sees two copies releasing output (nothing from the primary once the backup released,
//! no skip, no repeat with other content, no release ahead of a commit unless the primary
//! runs unprotected with the backup gone); a backup that takes over resumes from the last
//! committed epoch; a primary that lost etcd stopped releasing before the backup held the
//! key (the lease timing, from both sides' event timestamps); wherever the side running
//! the guest still reaches a quorum of etcd the guest keeps running there, and when only
//! the backup does the guest moves there; after the cut heals the guest runs on exactly
//! one side. A table of the scenarios and their outcomes goes to stderr.
//!
//! The fixed scenarios run by default; `CASTOR_PARTITION_RUNS=K` adds K random link sets
//! drawn from `CASTOR_PARTITION_SEED` (default 1), `CASTOR_PARTITION_ONLY=PREFIX` runs the
//! named one alone. Skips without root or etcd unless `CASTOR_REQUIRE_NETNS=1` /
//! `CASTOR_REQUIRE_ETCD=1`.

use ha_tests::{
    Etcd, Mesh, NetPair, Proc, Rng, Scratch, World, WorldView, etcd_or_skip, events, keygen,
    wait_addr, wait_event,
};
use serde_json::Value;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const MEMBERS: [&str; 3] = ["e1", "e2", "e3"];
const NODES: [&str; 5] = ["p", "b", "e1", "e2", "e3"];
/// The lease TTL both daemons use.
const TTL: Duration = Duration::from_secs(3);

/// One scenario: a name and the links it cuts.
#[derive(Debug, Clone)]
struct Scenario {
    name: String,
    /// Links cut a TTL and a half before the others (empty: all at once).
    first: Vec<(&'static str, &'static str)>,
    cuts: Vec<(&'static str, &'static str)>,
}

fn scenario(name: &str, cuts: &[(&'static str, &'static str)]) -> Scenario {
    Scenario {
        name: name.to_owned(),
        first: Vec::new(),
        cuts: cuts.to_vec(),
    }
}

/// The fixed set: one link, a host from all or most of etcd, combinations, and splits of
/// etcd itself.
fn fixed() -> Vec<Scenario> {
    let all = |h| [(h, "e1"), (h, "e2"), (h, "e3")];
    vec![
        scenario("primary-backup", &[("p", "b")]),
        scenario("primary-all-etcd", &all("p")),
        scenario("primary-majority-of-etcd", &[("p", "e1"), ("p", "e2")]),
        scenario("backup-all-etcd", &all("b")),
        scenario(
            "primary-backup+primary-etcd",
            &[&[("p", "b")][..], &all("p")].concat(),
        ),
        scenario(
            "primary-backup+backup-etcd",
            &[&[("p", "b")][..], &all("b")].concat(),
        ),
        scenario("member-split", &[("e1", "e2"), ("e1", "e3")]),
        scenario(
            "primary-only-to-minority-member",
            &[("p", "e2"), ("p", "e3"), ("e1", "e2"), ("e1", "e3")],
        ),
        // The primary runs unprotected (and releases) for a while, then loses etcd too.
        Scenario {
            first: vec![("p", "b")],
            ..scenario("primary-backup-then-primary-etcd", &all("p"))
        },
    ]
}

/// `runs` random link sets from `seed`: each link cut with probability 3/10, at least one.
fn random(seed: u64, runs: u64) -> Vec<Scenario> {
    let mut links = Vec::new();
    for (i, a) in NODES.iter().enumerate() {
        for b in &NODES[i + 1..] {
            links.push((*a, *b));
        }
    }
    let mut rng = Rng(seed);
    (0..runs)
        .map(|n| {
            let mut cuts: Vec<_> = links
                .iter()
                .copied()
                .filter(|_| rng.range(0, 10) < 3)
                .collect();
            if cuts.is_empty() {
                cuts.push(links[usize::try_from(rng.range(0, 10)).unwrap_or(0)]);
            }
            Scenario {
                name: format!("random-{seed}-{n}"),
                first: Vec::new(),
                cuts,
            }
        })
        .collect()
}

impl Scenario {
    fn up(&self, a: &str, b: &str) -> bool {
        !self
            .first
            .iter()
            .chain(&self.cuts)
            .any(|&(x, y)| (x, y) == (a, b) || (x, y) == (b, a))
    }

    /// Whether the primary ran unprotected, released, and lost etcd after: the backup's
    /// image is behind what the world saw, so it must not take over, and no copy may
    /// run the guest (the only current one lost its lease).
    fn stale(&self) -> bool {
        self.first.contains(&("p", "b")) && !self.reaches_quorum("p")
    }

    /// Whether `host` reaches a member that is in a quorum (two or three members that
    /// reach each other) while the cut holds: etcd answers it then.
    fn reaches_quorum(&self, host: &str) -> bool {
        MEMBERS.iter().any(|m| {
            self.up(host, m) && MEMBERS.iter().filter(|o| *o == m || self.up(m, o)).count() >= 2
        })
    }

    fn cuts_text(&self) -> String {
        let text = |c: &[(&str, &str)]| {
            c.iter()
                .map(|(a, b)| format!("{a}-{b}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        if self.first.is_empty() {
            text(&self.cuts)
        } else {
            format!("{}, then {}", text(&self.first), text(&self.cuts))
        }
    }
}

/// One scenario's outcome: what happened, and what was wrong (empty: passed).
#[derive(Debug)]
struct Outcome {
    during: String,
    after: String,
    timing: String,
    failures: Vec<String>,
}

fn s(v: impl ToString) -> String {
    v.to_string()
}

/// The pair of one scenario: its files, the world, both daemons.
struct Pair {
    dir: Scratch,
    world: World,
    backup: Proc,
    primary: Proc,
}

impl Pair {
    fn start(mesh: &Mesh, urls: &str, n: usize) -> Result<Self, String> {
        let dir = Scratch::new(&format!("partition-{n}"));
        let key = keygen(&dir.file("pair.key")).display().to_string();
        let world = World::start_on(SocketAddr::from(([0, 0, 0, 0], 0)), dir.file("ack.log"))
            .map_err(|e| format!("world: {e}"))?;
        let world_at = |h| -> Result<String, String> {
            Ok(SocketAddr::from((mesh.world_ip(h)?, world.addr.port())).to_string())
        };
        let file = |f: &str| dir.file(f).display().to_string();
        let lease = [
            s("--etcd"),
            s(urls),
            s("--lease-key"),
            format!("/castor/partition/{n}"),
            s("--lease-ttl"),
            format!("{}s", TTL.as_secs()),
            s("--key"),
            key,
            s("--memory"),
            s("32M"),
            s("--guest"),
            s("sim"),
            s("--interval"),
            s("25ms"),
            s("--mode"),
            s("fgbi"),
        ];
        let mut args = vec![
            s("--listen"),
            SocketAddr::from((mesh.ip("b")?, 0)).to_string(),
            s("--port-file"),
            file("port"),
            // Generous on a shared 2-core machine: scheduling stalls of tens of ms must not
            // look like a dead primary.
            s("--detect-timeout"),
            s("400ms"),
            s("--output"),
            world_at("b")?,
            s("--events"),
            file("backup.events"),
            s("--ack-log"),
            file("ack.log"),
            s("--exit-after"),
            s("120s"),
        ];
        args.extend_from_slice(&lease);
        let backup = Proc::spawn_in(
            Some(mesh.ns("b")?),
            "ha-backup",
            &args,
            dir.file("backup.log"),
        );
        let at = wait_addr(&dir.file("port"), Duration::from_secs(20));
        let mut args = vec![
            s("--backup"),
            at.to_string(),
            s("--workload"),
            s("web"),
            s("--rate"),
            s("20000"),
            s("--output-every"),
            s("32"),
            s("--seed"),
            n.to_string(),
            s("--output"),
            world_at("p")?,
            s("--events"),
            file("primary.events"),
            s("--ack-timeout"),
            s("1s"),
        ];
        args.extend_from_slice(&lease);
        let primary = Proc::spawn_in(
            Some(mesh.ns("p")?),
            "ha-primary",
            &args,
            dir.file("primary.log"),
        );
        Ok(Self {
            dir,
            world,
            backup,
            primary,
        })
    }

    fn events(&self, side: &str) -> Vec<Value> {
        events(&self.dir.file(&format!("{side}.events")))
    }

    fn first(&self, side: &str, name: &str) -> Option<Value> {
        self.events(side).into_iter().find(|e| e["event"] == name)
    }

    fn logs(&self) -> String {
        format!(
            "--- primary log (tail) ---\n{}\n--- backup log (tail) ---\n{}",
            tail(&self.primary.log_text(), 12),
            tail(&self.backup.log_text(), 12)
        )
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn t_ms(e: &Value) -> u64 {
    e["t_ms"].as_u64().unwrap_or(0)
}

/// Run one scenario on `mesh` with etcd at `urls`.
fn run(mesh: &Mesh, members: &[Etcd], urls: &str, n: usize, sc: &Scenario) -> Outcome {
    let mut fail = Vec::new();
    let mut out = Outcome {
        during: String::new(),
        after: String::new(),
        timing: s("-"),
        failures: Vec::new(),
    };
    for m in members {
        m.wait_healthy(Duration::from_secs(30));
    }
    let mut p = match Pair::start(mesh, urls, n) {
        Ok(p) => p,
        Err(e) => {
            out.failures.push(format!("starting the pair: {e}"));
            return out;
        }
    };
    if wait_event(
        &p.dir.file("primary.events"),
        "protected",
        Duration::from_secs(30),
    )
    .is_none()
    {
        out.failures.push(format!("never protected\n{}", p.logs()));
        return out;
    }
    // Under load for a while, then the cut.
    std::thread::sleep(Duration::from_millis(1000));
    if p.world.view().from_primary == 0 {
        fail.push(s("no output released before the cut"));
    }
    let (p_q, b_q) = (sc.reaches_quorum("p"), sc.reaches_quorum("b"));
    for (a, b) in &sc.first {
        if let Err(e) = mesh.set_link(a, b, false) {
            fail.push(format!("cutting {a}-{b}: {e}"));
        }
    }
    if !sc.first.is_empty() {
        std::thread::sleep(TTL + TTL / 2);
    }
    for (a, b) in &sc.cuts {
        if let Err(e) = mesh.set_link(a, b, false) {
            fail.push(format!("cutting {a}-{b}: {e}"));
        }
    }
    let cut_at = ha_wire::output::unix_ms();
    // Hold it for three TTLs, looking at the world once a TTL.
    let mut slices: Vec<WorldView> = vec![p.world.view()];
    for _ in 0..3 {
        std::thread::sleep(TTL);
        slices.push(p.world.view());
    }
    if let Err(e) = mesh.heal_all() {
        fail.push(format!("healing: {e}"));
    }
    let heal_at = ha_wire::output::unix_ms();
    let grew = |f: fn(&WorldView) -> u64| slices.windows(2).all(|w| f(&w[1]) > f(&w[0]));
    let backup_active = p.first("backup", "active");
    let active_in_cut = backup_active.as_ref().is_some_and(|a| t_ms(a) < heal_at);
    let fenced = p.first("primary", "self_fenced");
    // What happened while the cut held.
    if p_q {
        // The primary reaches a quorum: the guest keeps running there, never fenced.
        if !grew(|v| v.from_primary) {
            fail.push(format!(
                "the primary reaches a quorum but its output stalled during the cut: {:?}",
                slices.iter().map(|v| v.from_primary).collect::<Vec<_>>()
            ));
        }
        if let Some(f) = &fenced {
            fail.push(format!(
                "the primary reaches a quorum but fenced itself: {f}"
            ));
        }
        if backup_active.is_some() {
            fail.push(s("the backup activated while the primary held the key"));
        }
        out.during = s("ran on the primary");
    } else if sc.stale() {
        // The backup must refuse: its image is behind what the unprotected primary released.
        let refused = p.first("backup", "not_taking_over");
        if backup_active.is_some()
            || !refused
                .as_ref()
                .is_some_and(|r| r["reason"].as_str().unwrap_or("").contains("unprotected"))
        {
            fail.push(format!(
                "the backup's image is stale but it did not refuse for that: {refused:?}"
            ));
        }
        out.during = s("stopped: the backup refused its stale image");
    } else if b_q {
        // Only the backup reaches a quorum: the guest moves there within the cut.
        if !active_in_cut {
            fail.push(s(
                "only the backup reaches a quorum, but it did not take the guest over during the cut",
            ));
        }
        out.during = if active_in_cut {
            s("moved to the backup")
        } else {
            s("stopped")
        };
    } else {
        out.during = s("no side reaches a quorum");
    }
    // The lease timing: a fenced primary stopped releasing before the backup held the key.
    let claimed = p.first("backup", "lease_claimed");
    if let Some(c) = &claimed {
        let v = p.world.view();
        let from = fenced.as_ref().map(t_ms);
        match from {
            Some(f) if f < t_ms(c) && v.primary_last_ms < t_ms(c) => {
                let since = |t: u64| t.cast_signed() - cut_at.cast_signed();
                out.timing = format!(
                    "fenced {:+} ms, last release {:+} ms, key claimed {:+} ms",
                    since(f),
                    since(v.primary_last_ms),
                    since(t_ms(c))
                );
            }
            _ if p.primary.child.try_wait().ok().flatten().is_some() && from.is_none() => {
                out.timing = s("primary exited before the claim");
            }
            _ => fail.push(format!(
                "the backup claimed the key at {} while the primary (fenced at {from:?}) \
                 last released at {}",
                t_ms(c),
                v.primary_last_ms
            )),
        }
    }
    // After the heal (etcd's too): settle, then exactly one side releases.
    for m in members {
        m.wait_healthy(Duration::from_secs(30));
    }
    std::thread::sleep(TTL);
    let before = p.world.view();
    std::thread::sleep(Duration::from_millis(1500));
    let after = p.world.view();
    let dp = after.from_primary - before.from_primary;
    let db = after.from_backup - before.from_backup;
    let code = |pr: &mut Proc| match pr.child.try_wait() {
        Ok(Some(st)) => format!("exited {}", st.code().unwrap_or(-1)),
        _ => s("running"),
    };
    let (pc, bc) = (code(&mut p.primary), code(&mut p.backup));
    out.after = match (dp > 0, db > 0) {
        (true, false) => format!("on the primary (backup {bc})"),
        (false, true) => format!("on the backup (primary {pc})"),
        (true, true) => {
            fail.push(s("both sides released output after the heal"));
            s("on BOTH")
        }
        (false, false) if sc.stale() => format!("on neither (primary {pc}, backup {bc})"),
        (false, false) => {
            fail.push(format!(
                "no side released output after the heal (primary {pc}, backup {bc})"
            ));
            s("on neither")
        }
    };
    if p_q && db > 0 {
        fail.push(s("the guest left the primary, which reached a quorum"));
    }
    // Never two copies releasing: nothing from the primary once the backup released.
    if after.from_backup > 0
        && after.from_primary > 0
        && after.primary_last_ms >= after.backup_first_ms
    {
        fail.push(format!(
            "the primary released at {} after the backup's first release at {}",
            after.primary_last_ms, after.backup_first_ms
        ));
    }
    // Violations: an unprotected primary's releases ahead of the commits are by design
    // only while the backup never runs the guest.
    let bad: Vec<&String> = after
        .violations
        .iter()
        .filter(|v| after.from_backup > 0 || !v.contains("before a checkpoint"))
        .collect();
    if !bad.is_empty() {
        fail.push(format!(
            "the world saw {} violations, the first: {:?}",
            bad.len(),
            &bad[..bad.len().min(3)]
        ));
    }
    // No committed epoch lost: the backup resumed from the last commit.
    if let Some(a) = &backup_active {
        let acks = ha_wire::output::read_ack_log(&p.dir.file("ack.log"));
        match acks.last() {
            Some(&(epoch, head)) if a["epoch"] == epoch && a["out_head"] == head => {}
            last => fail.push(format!(
                "the backup resumed from {a}, the last commit is {last:?}"
            )),
        }
    }
    if !fail.is_empty() {
        fail.push(p.logs());
    }
    out.failures = fail;
    out
}

#[test]
fn partition_campaign() {
    if !NetPair::available() || !etcd_or_skip() {
        return;
    }
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let mut all = fixed();
    all.extend(random(
        env("CASTOR_PARTITION_SEED").unwrap_or(1),
        env("CASTOR_PARTITION_RUNS").unwrap_or(0),
    ));
    if let Ok(only) = std::env::var("CASTOR_PARTITION_ONLY") {
        all.retain(|sc| sc.name.starts_with(&only));
    }
    let mesh =
        Mesh::create(&NODES, &["p", "b"]).unwrap_or_else(|e| panic!("making the hosts: {e}"));
    let dir = Scratch::new("partition-etcd");
    let members = Etcd::start_cluster(&dir.0, &mesh, &MEMBERS);
    let urls = members
        .iter()
        .map(|m| m.url.as_str())
        .collect::<Vec<_>>()
        .join(",");
    let t = Instant::now();
    let mut rows = Vec::new();
    for (n, sc) in all.iter().enumerate() {
        let o = run(&mesh, &members, &urls, n, sc);
        eprintln!(
            "scenario {} ({}): {} / {}{}",
            sc.name,
            sc.cuts_text(),
            o.during,
            o.after,
            if o.failures.is_empty() { "" } else { " FAILED" }
        );
        rows.push((sc, o));
    }
    eprintln!(
        "\n{} scenarios in {:.0?} (TTL {:?}, each cut held {:?})\n\
         | scenario | cut | primary reaches quorum | backup reaches quorum | during the cut | after the heal | lease timing | verdict |\n|---|---|---|---|---|---|---|---|",
        rows.len(),
        t.elapsed(),
        TTL,
        TTL * 3
    );
    for (sc, o) in &rows {
        eprintln!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            sc.name,
            sc.cuts_text(),
            sc.reaches_quorum("p"),
            sc.reaches_quorum("b"),
            o.during,
            o.after,
            o.timing,
            if o.failures.is_empty() {
                "ok"
            } else {
                "FAILED"
            }
        );
    }
    let failed: Vec<String> = rows
        .iter()
        .filter(|(_, o)| !o.failures.is_empty())
        .map(|(sc, o)| {
            format!(
                "== {} ({}) ==\n{}",
                sc.name,
                sc.cuts_text(),
                o.failures.join("\n")
            )
        })
        .collect();
    assert!(failed.is_empty(), "{}", failed.join("\n\n"));
}
