//! The benchmark suite as CI runs it: a short `ha-bench compare` on real KVM guests (web
//! and kv, every mode, through a 1 Gbit/s link shaper) must report every figure for every
//! run (fgbi also at block size 128), write the table, the CSV and the plots, and show
//! fgbi sending fewer bytes than remus on both workloads.

use std::path::Path;
use std::process::{Command, Output};

/// `ha-bench compare` with 1 s runs after 0.5 s of warm-up on 64 MiB guests, JSON out,
/// results in `out_dir`, plus `args`.
fn compare(args: &[&str], out_dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ha-bench"))
        .args([
            "compare",
            "--seconds",
            "1",
            "--warmup",
            "0.5",
            "--memory",
            "64M",
            "--json",
        ])
        .args(args)
        .arg("--out")
        .arg(out_dir)
        .output()
        .expect("ha-bench runs")
}

/// A successful `--json` comparison's output and its runs, one per line.
fn json_runs(out: &Output) -> (String, Vec<serde_json::Value>) {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "compare failed:\n{stdout}\n{stderr}");
    let runs = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    (stdout, runs)
}

#[test]
fn short_compare_reports_every_mode_and_writes_plots() {
    if !ha_tests::kvm_or_skip() {
        return;
    }
    let out_dir = std::env::temp_dir().join(format!("castor-compare-ci-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out_dir);
    let out = compare(
        &[
            "--workloads",
            "web,kv",
            "--link",
            "1gbit",
            "--block-sizes",
            "128",
        ],
        &out_dir,
    );
    let (stdout, runs) = json_runs(&out);
    assert_eq!(
        runs.len(),
        10,
        "2 workloads x 4 modes, and fgbi at block 128: {stdout}"
    );
    let find = |w: &str, m: &str| {
        runs.iter()
            .find(|r| r["workload"] == w && r["mode"] == m)
            .unwrap_or_else(|| panic!("no {w} {m} run: {stdout}"))
    };
    for w in ["web", "kv"] {
        assert!(find(w, "none")["progress_per_s"].as_f64().unwrap_or(0.0) > 0.0);
        for m in ["remus", "xbzrle", "fgbi"] {
            let r = find(w, m);
            for key in [
                "interval_ms",
                "overhead_pct",
                "pause_ms_p50",
                "pause_ms_p99",
                "wire_bytes_per_epoch",
                "epochs_per_s",
                "encode_cpu_ms_per_epoch",
            ] {
                assert!(r[key].is_number(), "{w} {m}: {key} missing: {r}");
            }
            assert_eq!(r["link"], "1gbit", "{r}");
            assert_eq!(r["interval_ms"].as_f64(), Some(25.0), "{r}");
            assert!(r["checkpoints"].as_u64().unwrap_or(0) >= 3, "{r}");
            assert!(r["progress_per_s"].as_f64().unwrap_or(0.0) > 0.0, "{r}");
        }
        let swept = runs
            .iter()
            .find(|r| r["workload"] == w && r["mode"] == "fgbi" && r["block_size"] == 128)
            .unwrap_or_else(|| panic!("no {w} fgbi block 128 run: {stdout}"));
        assert!(swept["checkpoints"].as_u64().unwrap_or(0) >= 3, "{swept}");
        let wire = |m: &str| find(w, m)["wire_bytes_per_epoch"].as_f64().unwrap_or(0.0);
        assert!(
            wire("fgbi") < wire("remus"),
            "{w}: fgbi {} B/epoch, remus {}",
            wire("fgbi"),
            wire("remus")
        );
    }
    let csv = std::fs::read_to_string(out_dir.join("compare.csv")).expect("compare.csv");
    assert_eq!(csv.lines().count(), 11, "{csv}");
    let md = std::fs::read_to_string(out_dir.join("compare.md")).expect("compare.md");
    assert!(md.contains("| kv | fgbi | 25 ms | 1gbit | 64 |"), "{md}");
    for png in ["pause.png", "wire.png", "blocksize.png"] {
        let bytes = std::fs::read(out_dir.join(png)).unwrap_or_default();
        assert!(
            bytes.starts_with(b"\x89PNG"),
            "{png} is not a PNG ({} bytes); install fonts-dejavu-core for the plots",
            bytes.len()
        );
    }
    let _ = std::fs::remove_dir_all(&out_dir);
}

/// `--paired`: every protected run gets its own `none` right before it, and its overhead
/// is against that baseline, not the pass's first `none` (both are in runs.csv).
#[test]
fn paired_runs_take_the_overhead_against_their_own_baseline() {
    if !ha_tests::kvm_or_skip() {
        return;
    }
    let out_dir = std::env::temp_dir().join(format!("castor-paired-ci-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out_dir);
    let out = compare(
        &[
            "--workloads",
            "kv",
            "--modes",
            "none,fgbi",
            "--paired",
            "--no-plots",
        ],
        &out_dir,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "compare failed:\n{stderr}");
    let runs = std::fs::read_to_string(out_dir.join("runs.csv")).expect("runs.csv");
    let rows: Vec<Vec<&str>> = runs
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    let modes: Vec<&str> = rows.iter().map(|r| r[1]).collect();
    assert_eq!(modes, ["none", "none", "fgbi"], "{runs}");
    let progress = |r: &Vec<&str>| r[7].parse::<f64>().expect("progress_per_s");
    let overhead: f64 = rows[2][8].parse().expect("overhead_pct");
    let against = |base: f64| 100.0 * (1.0 - progress(&rows[2]) / base);
    assert!(
        (overhead - against(progress(&rows[1]))).abs() < 0.01,
        "overhead {overhead} is not against the paired baseline: {runs}"
    );
    // The table has one `none` row (the pass's) and the fgbi row.
    let csv = std::fs::read_to_string(out_dir.join("compare.csv")).expect("compare.csv");
    assert_eq!(csv.lines().count(), 3, "{csv}");
    let _ = std::fs::remove_dir_all(&out_dir);
}

/// The disk workloads beside the others: each run (the unprotected one too) gets a fresh
/// disk, and a protected run's bytes per checkpoint are split into memory and disk.
#[test]
fn db_and_files_run_on_disks_and_split_their_bytes() {
    if !ha_tests::kvm_or_skip() {
        return;
    }
    let out_dir = std::env::temp_dir().join(format!("castor-compare-disk-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out_dir);
    let out = compare(
        &[
            "--workloads",
            "db,files",
            "--modes",
            "none,fgbi",
            "--disk-size",
            "16M",
            "--no-plots",
        ],
        &out_dir,
    );
    let (stdout, runs) = json_runs(&out);
    assert_eq!(runs.len(), 4, "{stdout}");
    for w in ["db", "files"] {
        let run = |m: &str| {
            runs.iter()
                .find(|r| r["workload"] == w && r["mode"] == m)
                .unwrap_or_else(|| panic!("no {w} {m} run: {stdout}"))
        };
        assert!(run("none")["progress_per_s"].as_f64().unwrap_or(0.0) > 0.0);
        let r = run("fgbi");
        let num = |k: &str| r[k].as_f64().unwrap_or(-1.0);
        assert!(num("progress_per_s") > 0.0, "{r}");
        assert!(num("overhead_pct").is_finite(), "{r}");
        // Both workloads write their disk every few dozen units, so the window's
        // checkpoints carry disk bytes, and those are part of the wire bytes.
        assert!(num("disk_raw_bytes_per_epoch") > 0.0, "{w}: {r}");
        assert!(num("disk_wire_bytes_per_epoch") > 0.0, "{w}: {r}");
        assert!(
            num("disk_wire_bytes_per_epoch") < num("wire_bytes_per_epoch"),
            "{w}: memory bytes too: {r}"
        );
    }
    let md = std::fs::read_to_string(out_dir.join("compare.md")).expect("compare.md");
    assert!(md.contains("memory / disk KB/epoch"), "{md}");
    let csv = std::fs::read_to_string(out_dir.join("compare.csv")).expect("compare.csv");
    assert!(
        csv.lines()
            .next()
            .is_some_and(|h| h.ends_with("disk_wire_bytes_per_epoch,disk_raw_bytes_per_epoch")),
        "{csv}"
    );
    let _ = std::fs::remove_dir_all(&out_dir);
}
