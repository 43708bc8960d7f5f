//! Replays the committed fuzz corpora (`tests/fuzz/corpus/<target>/`) through the same checks
//! the libFuzzer targets run, on stable Rust with no fuzzer: every input the fuzzer ever
//! kept, and every crash it found, stays a regression test of `cargo test`.
//!
//! The checks and the seed generator live in `tests/fuzz/src/` and are included here with
//! `#[path]`, so the fuzz targets and this test cannot drift apart. A missing or empty
//! corpus directory fails the test. `docs/FUZZING.md` explains the corpus and how to grow
//! it; `cargo test -p ha-wire --test fuzz_corpus -- --ignored write_seed_corpus`
//! regenerates the seed files.

#[path = "../../../tests/fuzz/src/checks.rs"]
mod checks;
#[path = "../../../tests/fuzz/src/seeds.rs"]
mod seeds;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

/// `tests/fuzz/corpus/<target>`.
fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fuzz/corpus")
        .join(target)
}

/// Every file of a target's corpus, sorted by name; panics when the directory is missing
/// or holds no file, so the regression corpus cannot silently vanish.
fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = corpus_dir(target);
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus directory {} is missing: {e}", dir.display()));
    let mut files: Vec<(PathBuf, Vec<u8>)> = entries
        .map(|e| e.expect("readable directory entry").path())
        .filter(|p| p.is_file())
        .map(|p| {
            let data = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, data)
        })
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "corpus directory {} is empty",
        dir.display()
    );
    files
}

/// Run `check` on every input of `target`'s corpus, naming the file that fails.
fn replay(target: &str, check: fn(&[u8])) {
    for (path, data) in corpus(target) {
        if catch_unwind(AssertUnwindSafe(|| check(&data))).is_err() {
            panic!("{target}: corpus input {} fails its check", path.display());
        }
    }
}

#[test]
fn xbzrle_decode_corpus() {
    replay("xbzrle_decode", |d| {
        checks::check_xbzrle(d);
    });
}

#[test]
fn page_decode_corpus() {
    replay("page_decode", |d| {
        checks::check_page_decode(d);
    });
}

#[test]
fn epoch_apply_corpus() {
    replay("epoch_apply", |d| {
        checks::check_epoch(d);
    });
}

#[test]
fn handshake_corpus() {
    replay("handshake", |d| {
        checks::check_handshake(d);
    });
}

/// The seeds are what they claim: real deltas apply, real records decode, real epochs
/// commit (raw: all three in a row; reframed: every epoch), and the rejection seeds are
/// rejected. A seed that stopped being valid (a format change) would leave the fuzzer
/// starting from noise.
#[test]
fn seeds_are_valid_inputs() {
    for (name, data) in seeds::xbzrle_seeds() {
        let ok = checks::check_xbzrle(&data).is_some();
        assert_eq!(ok, !name.starts_with("bad-"), "{name}");
    }
    for (name, data) in seeds::page_decode_seeds() {
        let ok = checks::check_page_decode(&data);
        assert_eq!(ok, !name.starts_with("bad-"), "{name}");
    }
    let seeds = seeds::page_decode_seeds();
    for enc in ["zero", "pageref", "delta", "blocks", "general", "raw"] {
        assert!(
            seeds.iter().any(|(n, _)| n.starts_with(enc)),
            "no {enc} page_decode seed"
        );
    }
    for (name, data) in seeds::epoch_seeds() {
        let want = if name.ends_with("epochs1-3") { 3 } else { 1 };
        assert_eq!(checks::check_epoch(&data), want, "{name}");
    }
    for (name, data) in seeds::handshake_seeds() {
        let welcomed = checks::check_handshake(&data) == checks::Opening::Welcomed;
        assert_eq!(welcomed, !name.starts_with("bad-"), "{name}");
    }
}

/// Write the seeds into `fuzz/corpus/<target>/seed-<name>` (run with `--ignored`).
#[test]
#[ignore = "writes the seed corpus; run by hand, see docs/FUZZING.md"]
fn write_seed_corpus() {
    let sets = [
        ("xbzrle_decode", seeds::xbzrle_seeds()),
        ("page_decode", seeds::page_decode_seeds()),
        ("epoch_apply", seeds::epoch_seeds()),
        ("handshake", seeds::handshake_seeds()),
    ];
    for (target, seeds) in sets {
        let dir = corpus_dir(target);
        std::fs::create_dir_all(&dir).expect("create the corpus directory");
        for (name, data) in seeds {
            std::fs::write(dir.join(format!("seed-{name}")), data).expect("write a seed");
        }
    }
}
