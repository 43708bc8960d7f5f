//! Runs `ha-bench encoder` as a user would, on a small simulated guest, and checks what it
//! reports: every mode fed the same epochs, the modes' bytes in their expected order, and
//! a saved trace that replays to the same figures.

use std::process::Command;

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ha-bench"))
        .args(args)
        .output()
        .expect("ha-bench runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn rows(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect()
}

#[test]
fn every_mode_encodes_the_same_epochs_and_a_saved_trace_replays_them() {
    let dir = std::env::temp_dir().join(format!("castor-encoder-cli-{}", std::process::id()));
    let base = [
        "encoder",
        "--guest",
        "sim",
        "--workloads",
        "web",
        "--memory",
        "32M",
        "--epochs",
        "12",
        "--warmup",
        "0.2",
        "--repeat",
        "1",
        "--json",
    ];
    let dir_arg = dir.to_str().expect("utf-8 temp dir");
    let (ok, live, stderr) = run(&[&base[..], &["--save", dir_arg]].concat());
    assert!(ok, "{stderr}");
    let live = rows(&live);
    let modes: Vec<&str> = live.iter().filter_map(|r| r["mode"].as_str()).collect();
    assert_eq!(modes, ["remus", "xbzrle", "fgbi"]);
    for r in &live {
        assert_eq!(r["epochs"], 12, "{r}");
        assert_eq!(r["pages_per_epoch"], live[0]["pages_per_epoch"], "{r}");
        assert!(r["cpu_ms_mean"].as_f64().is_some_and(|c| c > 0.0), "{r}");
    }
    assert!(live[0]["pages_per_epoch"].as_f64().is_some_and(|p| p > 0.0));
    let wire = |r: &serde_json::Value| r["wire_kb_per_epoch"].as_f64().unwrap_or(f64::NAN);
    assert!(
        wire(&live[2]) < wire(&live[1]) && wire(&live[1]) < wire(&live[0]),
        "fgbi < xbzrle < remus: {live:?}"
    );

    // The trace replays to the same pages and bytes in every mode.
    let (ok, replay, stderr) = run(&[&base[..], &["--load", dir_arg]].concat());
    assert!(ok, "{stderr}");
    let replay = rows(&replay);
    for (a, b) in live.iter().zip(&replay) {
        for key in [
            "mode",
            "epochs",
            "pages_per_epoch",
            "wire_kb_per_epoch",
            "kinds",
        ] {
            assert_eq!(a[key], b[key], "{key}");
        }
    }

    // A damaged trace is refused with its path.
    let trace = dir.join("web.trace");
    let bytes = std::fs::read(&trace).expect("trace written");
    std::fs::write(&trace, &bytes[..bytes.len() / 2]).expect("trace cut");
    let (ok, _, stderr) = run(&[&base[..], &["--load", dir_arg]].concat());
    assert!(!ok);
    assert!(stderr.contains("web.trace"), "{stderr}");
    std::fs::remove_dir_all(&dir).expect("temp dir removed");
}
