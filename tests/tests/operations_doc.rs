//! docs/OPERATIONS.md stays true: each daemon's options table has one row per option of
//! its `--help`, with the same defaults, and its example config file loads.

use clap::{Command, CommandFactory};

const DOC: &str = include_str!("../../docs/OPERATIONS.md");

/// The rows of the options table after `<!-- {marker} -->`: (option cell, default cell).
fn doc_rows(marker: &str) -> Vec<(String, String)> {
    let at = DOC
        .find(&format!("<!-- {marker} -->"))
        .expect("marker in the doc");
    DOC[at..]
        .lines()
        .skip(3)
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            let cells: Vec<&str> = l.split(" | ").collect();
            (
                cells[0].trim_start_matches("| ").to_string(),
                cells.get(1).copied().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// Assert the table after `<!-- options:{name} -->` lists every option of `cmd` with its
/// defaults, and write the example after `<!-- example:{name} -->` to a file for loading.
fn check_table_and_write_example(cmd: Command, name: &str) -> std::path::PathBuf {
    let rows = doc_rows(&format!("options:{name}"));
    let args: Vec<_> = cmd
        .get_arguments()
        .filter(|a| !matches!(a.get_id().as_str(), "help" | "version"))
        .collect();
    assert_eq!(
        rows.len(),
        args.len(),
        "{name}: one row per option: {rows:?}"
    );
    for a in args {
        let long = a.get_long().expect("long option");
        let flag = format!("`--{long}");
        let (_, default) = rows
            .iter()
            .find(|(o, _)| {
                o.strip_prefix(flag.as_str())
                    .is_some_and(|r| r.starts_with(' ') || r.starts_with('`'))
            })
            .unwrap_or_else(|| panic!("{name}: --{long} is not in the table"));
        for d in a.get_default_values() {
            let d = d.to_string_lossy();
            if d != "false" {
                assert!(
                    default.contains(&format!("`{d}`")),
                    "{name} --{long}: {default} vs {d}"
                );
            }
        }
    }
    let at = DOC
        .find(&format!("<!-- example:{name} -->"))
        .expect("example marker in the doc");
    let rest = &DOC[at..];
    let start = rest.find("```toml\n").expect("toml block") + "```toml\n".len();
    let len = rest[start..].find("```").expect("end of the block");
    let dir = std::env::temp_dir().join(format!("castor-{name}-doc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("example.toml");
    std::fs::write(&path, &rest[start..start + len]).expect("write the example");
    path
}

#[test]
fn primary_options_are_documented() {
    let path = check_table_and_write_example(ha_primary::cli::Cli::command(), "ha-primary");
    let p = path.to_string_lossy().to_string();
    ha_primary::cli::Cli::load(["ha-primary", "--config", &p]).expect("the example is valid");
}

#[test]
fn backup_options_are_documented() {
    use ha_backup::config::{Cli, Config};
    let path = check_table_and_write_example(Cli::command(), "ha-backup");
    let p = path.to_string_lossy().to_string();
    let c = Cli::load(["ha-backup", "--config", &p]).expect("the example is valid");
    Config::from_cli(&c).expect("the example is valid");
}
