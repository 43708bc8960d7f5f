//! The failover drill as CI runs it: a short drill on a real KVM guest must end with a
//! continuity verdict of OK and report every figure the README promises.

use std::process::Command;

#[test]
fn short_drill_fails_over_with_continuity() {
    if !ha_tests::kvm_or_skip() {
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_ha-bench"))
        .args([
            "drill",
            "--seconds",
            "2",
            "--after",
            "1",
            "--memory",
            "64M",
            "--seed",
            "7",
            "--json",
        ])
        .output()
        .expect("ha-bench runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "drill failed:\n{stdout}\n{stderr}");
    let r: serde_json::Value =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    for key in [
        "epochs_committed",
        "pause_ms_p50",
        "pause_ms_p99",
        "wire_bytes_per_epoch",
        "raw_bytes_per_epoch",
        "detection_ms",
        "activation_ms",
        "failover_ms",
        "continuity_ok",
        "outputs_released",
    ] {
        assert!(!r[key].is_null(), "missing {key}: {r}");
    }
    assert_eq!(r["continuity_ok"], true, "{r}");
    assert!(r["epochs_committed"].as_u64().unwrap_or(0) >= 10, "{r}");
    assert!(r["outputs_released"].as_u64().unwrap_or(0) > 0, "{r}");
    let raw = r["raw_bytes_per_epoch"].as_f64().unwrap_or(0.0);
    let wire = r["wire_bytes_per_epoch"].as_f64().unwrap_or(f64::MAX);
    assert!(wire < raw, "fgbi sends less than the raw dirty pages: {r}");
}

/// The disk workloads: the drill makes the disk and its replica, and after the failover
/// the replica passes the disk checks (db: every update the world saw acknowledged reads
/// back as written; both: the replica is the committed disk plus the resumed guest's
/// writes), reported in the JSON.
#[test]
fn disk_drills_check_the_replica_after_the_failover() {
    if !ha_tests::kvm_or_skip() {
        return;
    }
    for workload in ["db", "files"] {
        let out = Command::new(env!("CARGO_BIN_EXE_ha-bench"))
            .args([
                "drill",
                "--workload",
                workload,
                "--disk-size",
                "16M",
                "--seconds",
                "1",
                "--after",
                "0.5",
                "--memory",
                "64M",
                "--seed",
                "9",
                "--json",
            ])
            .output()
            .expect("ha-bench runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "{workload} drill failed:\n{stdout}\n{stderr}"
        );
        let r: serde_json::Value =
            serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
        assert_eq!(r["continuity_ok"], true, "{r}");
        let disk = &r["disk"];
        assert_eq!(disk["disk_bytes"], 16 << 20, "{r}");
        let resumed = r["progress_at_resume"].as_u64().unwrap_or(u64::MAX);
        let at = disk["replica_progress"].as_u64().unwrap_or(0);
        assert!(at >= resumed, "replica at {at}, resumed at {resumed}: {r}");
        let names: Vec<&str> = r["checks"]
            .as_array()
            .map(|c| c.iter().filter_map(|c| c[0].as_str()).collect())
            .unwrap_or_default();
        assert!(
            names.contains(&"the replica is the committed disk plus the resumed guest's writes"),
            "{r}"
        );
        if workload == "db" {
            assert!(disk["acked_updates"].as_u64().unwrap_or(0) > 0, "{r}");
            assert_eq!(disk["acked_checked"], disk["acked_updates"], "{r}");
            assert!(
                names.contains(&"every update the world saw acknowledged is on the replica"),
                "{r}"
            );
        }
    }
}

#[test]
fn the_failover_sweep_runs_every_size_and_writes_its_table_csv_and_plot() {
    if !ha_tests::kvm_or_skip() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("ha-bench-failover-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = Command::new(env!("CARGO_BIN_EXE_ha-bench"))
        .args([
            "failover",
            "--memory",
            "32M,64M",
            "--repeat",
            "1",
            "--seconds",
            "1",
            "--after",
            "0.5",
            "--seed",
            "3",
            "--out",
        ])
        .arg(&dir)
        .output()
        .expect("ha-bench runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "sweep failed:\n{stdout}\n{stderr}");
    for size in ["32M", "64M"] {
        assert!(
            stdout.contains(&format!("| {size} | 1 |")) && stdout.contains("| ok |"),
            "{stdout}"
        );
    }
    let csv = std::fs::read_to_string(dir.join("failover.csv")).expect("csv");
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows.len(), 3, "{csv}");
    assert!(
        rows[1].starts_with("32M,32,1,") && rows[2].starts_with("64M,64,1,"),
        "{csv}"
    );
    assert!(rows[1..].iter().all(|r| r.ends_with(",true")), "{csv}");
    let png = std::fs::read(dir.join("failover.png")).expect("png");
    assert_eq!(&png[1..4], b"PNG");
    let _ = std::fs::remove_dir_all(&dir);
}
