//! docs/ARCHITECTURE.md stays true: its crates table has one row per workspace member,
//! with the member's path and crate name, and the row's last column lists exactly the
//! Castor crates the member's manifest depends on (`[dependencies]`; dev-dependencies are
//! free). A new edge between crates therefore changes the page too.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

const DOC: &str = include_str!("../../docs/ARCHITECTURE.md");

/// One row of the crates table.
#[derive(Debug)]
struct Row {
    path: String,
    name: String,
    deps: BTreeSet<String>,
}

/// A cell's backticked words, e.g. "`ha-codec`, `ha-guest`" → {ha-codec, ha-guest}.
fn ticked(cell: &str) -> Vec<String> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

/// The rows after `<!-- crates -->`.
fn doc_rows() -> Vec<Row> {
    let at = DOC
        .find("<!-- crates -->")
        .expect("crates marker in the doc");
    DOC[at..]
        .lines()
        .skip(3)
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split(" | ").collect();
            assert_eq!(cells.len(), 4, "four cells: {l}");
            Row {
                path: ticked(cells[0]).concat().trim_end_matches('/').to_string(),
                name: ticked(cells[1]).concat(),
                deps: ticked(cells[3]).into_iter().collect(),
            }
        })
        .collect()
}

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn manifest(rel: &str) -> toml::Table {
    let p = root().join(rel).join("Cargo.toml");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    text.parse()
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn the_crates_table_lists_every_member_and_its_castor_dependencies() {
    let ws = manifest(".");
    let members: Vec<String> = ws["workspace"]["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| m.as_str().expect("member path").to_string())
        .collect();
    // The Castor crates: the workspace dependencies that are paths in this tree.
    let ours: BTreeMap<String, String> = ws["workspace"]["dependencies"]
        .as_table()
        .expect("workspace.dependencies")
        .iter()
        .filter_map(|(name, v)| Some((name.clone(), v.get("path")?.as_str()?.to_string())))
        .collect();
    let rows = doc_rows();
    let by_path: BTreeMap<&str, &Row> = rows.iter().map(|r| (r.path.as_str(), r)).collect();
    assert_eq!(
        by_path.keys().copied().collect::<BTreeSet<_>>(),
        members.iter().map(String::as_str).collect::<BTreeSet<_>>(),
        "one row per workspace member"
    );
    for m in &members {
        let row = by_path[m.as_str()];
        let pkg = manifest(m);
        let name = pkg["package"]["name"].as_str().expect("package name");
        assert_eq!(row.name, name, "{m}: crate name");
        if let Some(path) = ours.get(name) {
            assert_eq!(path, m, "{name}: the workspace dependency's path");
        }
        let deps: BTreeSet<String> = pkg
            .get("dependencies")
            .and_then(|d| d.as_table())
            .map(|t| {
                t.keys()
                    .filter(|k| ours.contains_key(*k))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(deps, row.deps, "{m}: the Castor crates it depends on");
    }
}

#[test]
fn only_the_codec_gets_the_hot_loop_profile() {
    // The dev-profile override switches off overflow checks and debug assertions: the
    // codec's hot loops want that; a parser of network input must not get it.
    let ws = manifest(".");
    let overridden: Vec<&String> = ws["profile"]["dev"]
        .get("package")
        .and_then(|p| p.as_table())
        .map(|t| t.keys().filter(|k| *k != "*").collect())
        .unwrap_or_default();
    assert_eq!(overridden, vec!["ha-codec"]);
}
