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
    let example = block_after(&format!("example:{name}"), "toml");
    let dir = std::env::temp_dir().join(format!("castor-{name}-doc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("example.toml");
    std::fs::write(&path, example).expect("write the example");
    path
}

/// The first ```` ```{lang} ```` block after `<!-- {marker} -->`.
fn block_after(marker: &str, lang: &str) -> String {
    let at = DOC
        .find(&format!("<!-- {marker} -->"))
        .unwrap_or_else(|| panic!("<!-- {marker} --> in the doc"));
    let rest = &DOC[at..];
    let open = format!("```{lang}\n");
    let start = rest.find(&open).expect("a code block") + open.len();
    let len = rest[start..].find("```").expect("end of the block");
    rest[start..start + len].to_string()
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

/// The `ExecStart` line of the systemd unit after `<!-- unit:{name} -->`, split into words,
/// and the unit's text.
fn unit(name: &str) -> (Vec<String>, String) {
    let text = block_after(&format!("unit:{name}"), "ini");
    let exec = text
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("an ExecStart line");
    (exec.split_whitespace().map(String::from).collect(), text)
}

/// The units run the daemons with options they take (`%i` as a guest name), and the
/// backup's unit does not restart after exactly the exit the doc says needs an operator.
#[test]
fn the_systemd_units_run_the_daemons_with_options_they_take() {
    let (primary, _) = unit("castor-primary@");
    assert!(primary[0].ends_with("/ha-primary"), "{primary:?}");
    let args: Vec<String> = primary.iter().map(|a| a.replace("%i", "web1")).collect();
    ha_primary::cli::Cli::command()
        .try_get_matches_from(&args)
        .expect("the primary's unit parses");
    let (backup, text) = unit("castor-backup@");
    assert!(backup[0].ends_with("/ha-backup"), "{backup:?}");
    let args: Vec<String> = backup.iter().map(|a| a.replace("%i", "web1")).collect();
    ha_backup::config::Cli::command()
        .try_get_matches_from(&args)
        .expect("the backup's unit parses");
    let prevent = text
        .lines()
        .find_map(|l| l.strip_prefix("RestartPreventExitStatus="))
        .expect("RestartPreventExitStatus");
    assert_eq!(
        prevent,
        ha_backup::Exit::VerifyFailed.code().to_string(),
        "the backup's unit must stop at a failed digest only"
    );
}
