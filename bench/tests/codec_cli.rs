//! Runs `ha-bench codec` as a user would, on small inputs, and checks what it reports.

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
fn every_case_roundtrips_and_fgbi_never_sends_more_than_xbzrle() {
    for cache in ["warm", "hashes", "cold"] {
        let (ok, stdout, stderr) = run(&[
            "codec",
            "--pages",
            "128",
            "--reps",
            "1",
            "--json",
            "--no-pairs",
            "--cache",
            cache,
        ]);
        assert!(ok, "{stderr}");
        let rows = rows(&stdout);
        assert_eq!(rows.len(), 8 * 4, "8 cases x 4 modes");
        for r in &rows {
            for key in [
                "case",
                "mode",
                "cache",
                "pages",
                "bytes_in",
                "bytes_out",
                "encode_gbps",
                "decode_gbps",
                "memcpy_gbps",
            ] {
                assert!(r.get(key).is_some(), "missing {key} in {r}");
            }
            assert_eq!(r["roundtrip_ok"], true, "{r}");
            assert_eq!(r["pages"], 128);
        }
        for case in rows
            .iter()
            .filter_map(|r| r["case"].as_str())
            .collect::<std::collections::BTreeSet<_>>()
        {
            let bytes = |m: &str| {
                rows.iter()
                    .find(|r| r["case"] == case && r["mode"] == m)
                    .and_then(|r| r["wire_bytes"].as_u64())
                    .unwrap_or_else(|| panic!("no {m} row for {case}"))
            };
            assert!(
                bytes("fgbi") <= bytes("xbzrle"),
                "{case} {cache}: fgbi {} > xbzrle {}",
                bytes("fgbi"),
                bytes("xbzrle")
            );
            assert!(bytes("xbzrle") <= bytes("remus"), "{case} {cache}");
        }
    }
}

#[test]
fn real_page_pairs_roundtrip() {
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/data/pagepairs/httpd_100ms_1.pgpairs.zst"
    );
    if !std::path::Path::new(dir).exists() {
        eprintln!("skipped: {dir} is not here");
        return;
    }
    let (ok, stdout, stderr) = run(&[
        "codec",
        "--case",
        "a",
        "--pages",
        "1",
        "--pairs",
        dir,
        "--reps",
        "1",
        "--json",
        "--mode",
        "xbzrle,fgbi",
    ]);
    assert!(ok, "{stderr}");
    let rows = rows(&stdout);
    let httpd: Vec<_> = rows
        .iter()
        .filter(|r| r["case"] == "httpd_100ms_1")
        .collect();
    assert_eq!(httpd.len(), 2);
    assert!(
        httpd
            .iter()
            .all(|r| r["roundtrip_ok"] == true && r["pages"] == 348)
    );
    assert!(httpd[1]["wire_bytes"].as_u64() < httpd[0]["wire_bytes"].as_u64());
}

#[test]
fn bad_arguments_are_named() {
    let (ok, _, stderr) = run(&["codec", "--block-size", "48", "--no-pairs"]);
    assert!(!ok);
    assert!(
        stderr.contains("block size 48 is not a power of two from 32 to 1024"),
        "{stderr}"
    );
    let (ok, _, stderr) = run(&["codec", "--mode", "gzip", "--no-pairs"]);
    assert!(!ok);
    assert!(stderr.contains("unknown mode \"gzip\""), "{stderr}");
    let (ok, _, stderr) = run(&[
        "codec",
        "--pairs",
        "/nonexistent.pgpairs",
        "--case",
        "a",
        "--pages",
        "1",
    ]);
    assert!(!ok);
    assert!(stderr.contains("/nonexistent.pgpairs"), "{stderr}");
}

#[test]
fn every_simd_path_of_the_delta_encoder_sends_the_same_bytes_and_the_path_is_named() {
    use ha_codec::block::SimdPath;
    let paths: Vec<SimdPath> = SimdPath::ALL
        .into_iter()
        .filter(|p| p.available())
        .collect();
    let mut modes: Vec<String> = paths
        .iter()
        .map(|p| format!("delta/{}", p.name()))
        .collect();
    modes.push("delta".into());
    let (ok, stdout, stderr) = run(&[
        "codec",
        "--pages",
        "256",
        "--reps",
        "1",
        "--json",
        "--no-pairs",
        "--mode",
        &modes.join(","),
    ]);
    assert!(ok, "{stderr}");
    let rows = rows(&stdout);
    assert_eq!(rows.len(), 8 * modes.len());
    let best = format!("delta/{}", SimdPath::best().name());
    for case in rows
        .iter()
        .filter_map(|r| r["case"].as_str())
        .collect::<std::collections::BTreeSet<_>>()
    {
        let of_case: Vec<_> = rows.iter().filter(|r| r["case"] == case).collect();
        // The plain `delta` row is the best path's, named after it.
        assert_eq!(
            of_case
                .iter()
                .filter(|r| r["mode"] == best.as_str())
                .count(),
            2,
            "{case}"
        );
        for r in &of_case {
            assert_eq!(r["roundtrip_ok"], true, "{r}");
            assert_eq!(r["bytes_out"], of_case[0]["bytes_out"], "{case}: {r}");
        }
    }
    let (ok, _, stderr) = run(&["codec", "--pages", "8", "--mode", "delta/avx3"]);
    assert!(!ok);
    assert!(stderr.contains("\"avx3\" is not a SIMD path"), "{stderr}");
}
