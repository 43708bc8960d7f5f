//! The fault campaign as CI runs it: `ha-bench chaos` over every scenario under both
//! policies on real KVM guests (18 seeded runs), with no run breaking an invariant.

use std::process::Command;

#[test]
fn short_campaign_finds_no_defect() {
    if !ha_tests::kvm_or_skip() {
        return;
    }
    // SAFETY: geteuid(2) reads the process's effective user id; no memory is involved.
    let root = unsafe { libc::geteuid() } == 0;
    let mut scenarios = vec![
        "kill-primary",
        "kill-backup",
        "stop-primary",
        "stop-backup",
        "cut-link",
        "stall-link",
        "delay-acks",
        "restart-backup",
    ];
    if root {
        scenarios.push("full-disk"); // it mounts a small tmpfs
    } else {
        eprintln!("not root: the full-disk scenario is left out");
    }
    let runs = 2 * scenarios.len();
    let out = Command::new(env!("CARGO_BIN_EXE_ha-bench"))
        .args(["chaos", "--seed", "7", "--json", "--runs"])
        .arg(runs.to_string())
        .arg("--scenarios")
        .arg(scenarios.join(","))
        .output()
        .expect("ha-bench runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "campaign failed:\n{stdout}\n{stderr}");
    let rows: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(rows.len(), runs, "{stdout}");
    let verdicts = ["output", "one_copy", "running", "committed"];
    for r in &rows {
        for v in verdicts {
            assert_ne!(r[v]["verdict"], "defect", "{r}");
        }
    }
    for sc in &scenarios {
        for policy in ["continue", "fence"] {
            let r = rows
                .iter()
                .find(|r| r["scenario"] == *sc && r["policy"] == policy)
                .unwrap_or_else(|| panic!("no {sc} run under {policy}: {stdout}"));
            match *sc {
                // A dead primary: the backup takes over from its last commit.
                "kill-primary" => {
                    assert!(
                        r["outcome"]
                            .as_str()
                            .unwrap_or("")
                            .contains("backup took over"),
                        "{r}"
                    );
                    assert_eq!(r["committed"]["verdict"], "ok", "{r}");
                    assert!(r["records"][1].as_u64().unwrap_or(0) > 0, "{r}");
                }
                // A dead backup: the policy decides, and says so.
                "kill-backup" if policy == "fence" => {
                    assert_eq!(r["running"]["verdict"], "by_design", "{r}");
                    assert_eq!(r["output"]["verdict"], "ok", "{r}");
                }
                "kill-backup" => {
                    assert_eq!(r["running"]["verdict"], "ok", "{r}");
                    assert_eq!(r["output"]["verdict"], "by_design", "{r}");
                }
                _ => {}
            }
        }
    }
}
