//! The many-pairs drill as CI runs it: three pairs of small KVM guests on three hosts
//! (network namespaces), each pair with its own key, ports, lease key and a spare, and a
//! real etcd; host 0 is killed. Host 0 is one pair's primary, another's backup and the
//! third's spare, so every outcome is checked: the guest it ran fails over to its backup
//! once its lease expired, resumes from the last commit and is protected again to its
//! spare; the pair that lost its backup keeps its primary running; the pair that lost
//! only its spare is not disturbed. Nothing of the run is left behind. A second run
//! kills host 1 with its link down first (`--power-off`: no connection closes, the
//! others notice by their timeouts), with the same outcomes.

use std::process::Command;

#[test]
fn killing_a_host_moves_its_guests_and_leaves_the_other_pairs_running() {
    if !ha_tests::kvm_or_skip() || !ha_tests::etcd_or_skip() || !ha_tests::NetPair::available() {
        return;
    }
    // One after the other: two drills at once would share the machine's two cores.
    check_drill(0, &[]);
    check_drill(1, &["--power-off"]);
}

/// Run the drill on three pairs and three hosts, killing `host` (with `extra` options),
/// and check every pair's outcome.
fn check_drill(host: u32, extra: &[&str]) {
    let child = Command::new(env!("CARGO_BIN_EXE_ha-bench"))
        .args([
            "drill",
            "--pairs",
            "3",
            "--hosts",
            "3",
            "--memory",
            "32M",
            "--seconds",
            "2",
            "--after",
            "2",
            "--lease-ttl",
            "2s",
            "--json",
            "--kill-host",
        ])
        .arg(host.to_string())
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("ha-bench starts");
    let pid = child.id();
    let out = child.wait_with_output().expect("ha-bench runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Torn down whatever the verdict: no host namespace of this run is left.
    let left = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    let prefix = format!("castor-h{}-", pid % 100_000);
    let namespaces = String::from_utf8_lossy(&left.stdout);
    assert!(
        !namespaces.contains(&prefix)
            && !namespaces.contains(&format!("castor-hub{}", pid % 100_000)),
        "namespaces left behind: {namespaces}"
    );
    let links = Command::new("ip")
        .args(["-br", "link"])
        .output()
        .expect("ip link");
    let links = String::from_utf8_lossy(&links.stdout);
    let bench_end = format!("cb{}", pid % 100_000);
    assert!(
        !links
            .lines()
            .any(|l| l.starts_with(&format!("{bench_end} "))
                || l.starts_with(&format!("{bench_end}@"))),
        "the bench's veth was left behind: {links}"
    );
    assert!(out.status.success(), "drill failed:\n{stdout}\n{stderr}");
    let r: serde_json::Value =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["killed_host"], host, "{r}");
    let pairs = r["pairs"].as_array().expect("pairs");
    assert_eq!(pairs.len(), 3, "{r}");
    // The host ran one process of every pair.
    assert_eq!(r["killed_processes"], 3, "{r}");
    let role = |name: &str| {
        pairs
            .iter()
            .find(|p| p["killed_role"] == name)
            .unwrap_or_else(|| panic!("no pair whose {name} was on host {host}: {r}"))
    };
    for p in pairs {
        assert_eq!(p["ok"], true, "{p}");
        let hosts = [&p["primary_host"], &p["backup_host"], &p["spare_host"]];
        assert!(
            hosts[0] != hosts[1] && hosts[1] != hosts[2] && hosts[0] != hosts[2],
            "{p}"
        );
        assert!(
            p["outputs_at_end"].as_u64() > p["outputs_at_kill"].as_u64(),
            "{p}"
        );
    }
    // The guest the host ran: on its backup's host from the last commit, after the dead
    // primary's lease expired, and protected again to its spare, which commits.
    let moved = role("primary");
    assert_eq!(moved["runs_on"], moved["backup_host"], "{moved}");
    assert_eq!(moved["protected_by"], moved["spare_host"], "{moved}");
    let passed = |p: &serde_json::Value, name: &str| {
        p["checks"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c[0] == name && c[1] == true))
    };
    for check in [
        "resumed from the last committed checkpoint",
        "restored progress equals the checkpoint's",
        "the guest goes on at the backup",
        "output: no gap, no changed repeat, nothing released before its commit",
        "protected again to the spare",
        "stays protected: the spare commits its checkpoints",
        "the backup held the guest's key before it ran the guest",
    ] {
        assert!(passed(moved, check), "{check}: {moved}");
    }
    // The backup ran the guest only once it held the key (a check above). The dead
    // primary refreshed its lease every third of the TTL (2 s), so the key cannot have
    // been free sooner than about 1.3 s after the kill: 1 s leaves room for a late
    // keep-alive on a loaded host.
    assert!(moved["lease_wait_ms"].as_u64().unwrap_or(0) > 0, "{moved}");
    assert!(
        moved["failover_ms"].as_u64().unwrap_or(0) >= 1000,
        "the guest ran again before the dead primary's lease could expire: {moved}"
    );
    assert!(moved["reprotect_ms"].as_u64().is_some(), "{moved}");
    assert!(
        moved["commits_after_kill"].as_u64().unwrap_or(0) >= 10,
        "{moved}"
    );
    // The pair that lost its backup: its primary runs on, unprotected.
    let orphan = role("backup");
    assert_eq!(orphan["runs_on"], orphan["primary_host"], "{orphan}");
    assert!(orphan["protected_by"].is_null(), "{orphan}");
    assert!(passed(orphan, "no other host took the guest"), "{orphan}");
    assert!(
        orphan["outcome"]
            .as_str()
            .is_some_and(|o| o.contains("runs on unprotected")),
        "{orphan}"
    );
    // The pair that lost only its spare: still protected, checkpoints commit.
    let kept = role("spare");
    assert_eq!(kept["runs_on"], kept["primary_host"], "{kept}");
    assert_eq!(kept["protected_by"], kept["backup_host"], "{kept}");
    assert!(
        kept["commits_after_kill"].as_u64().unwrap_or(0) >= 10,
        "{kept}"
    );
    assert!(kept["failover_ms"].is_null(), "{kept}");
}
