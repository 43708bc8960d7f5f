//! `ha-bench switchover` as CI runs it: on small KVM guests, over an unlimited and a
//! 100 Mbit/s link, a planned switchover keeps the guest's state and moves it with its
//! last checkpoint, a failover keeps it with nothing more crossing, and a cold restart
//! loses it and pays a new initial sync.

use std::process::Command;

#[test]
fn switchover_failover_and_cold_restart_are_measured_per_link() {
    if !ha_tests::kvm_or_skip() {
        return;
    }
    let out_dir = std::env::temp_dir().join(format!("castor-switchover-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_ha-bench"))
        .args([
            "switchover",
            "--memory",
            "32M",
            "--warmup",
            "1",
            "--link",
            "unlimited,100mbit",
            "--json",
            "--out",
        ])
        .arg(&out_dir)
        .output()
        .expect("ha-bench runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "switchover failed:\n{stdout}\n{stderr}"
    );
    let table = std::fs::read_to_string(out_dir.join("switchover.md")).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&out_dir);
    let rows: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(rows.len(), 6, "{stdout}");
    assert_eq!(table.lines().count(), 8, "{table}");
    for link in ["unlimited", "100 Mbit/s"] {
        let row = |m: &str| {
            rows.iter()
                .find(|r| r["link"] == link && r["method"] == m)
                .unwrap_or_else(|| panic!("no {m} over {link}: {stdout}"))
        };
        let sw = row("switchover");
        assert_eq!(sw["state_kept"], true, "{sw}");
        assert!(sw["move_bytes"].as_u64().unwrap_or(0) > 0, "{sw}");
        assert!(sw["progress_after"].as_u64().unwrap_or(0) > 0, "{sw}");
        let fo = row("failover");
        assert_eq!(fo["state_kept"], true, "{fo}");
        assert_eq!(fo["move_bytes"], 0, "{fo}");
        assert!(
            fo["progress_after"].as_u64() >= fo["progress_before"].as_u64(),
            "the failover resumed behind the last commit seen before the kill: {fo}"
        );
        let cold = row("cold_restart");
        assert_eq!(cold["state_kept"], false, "{cold}");
        assert!(cold["move_bytes"].as_u64().unwrap_or(0) > 0, "{cold}");
    }
}
