//! The operator's interface of the `ha-backup` binary: a `--config` file, and the
//! Prometheus metrics served on `--metrics` through receiving and failover.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use ha_daemon::testing::{http_get as get, sample};
use ha_sim::SimFactory;

fn wait_for_file(p: &std::path::Path) -> String {
    let end = Instant::now() + DEADLINE;
    loop {
        if let Ok(s) = std::fs::read_to_string(p)
            && !s.is_empty()
        {
            return s;
        }
        assert!(Instant::now() < end, "{} never appeared", p.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn config_file_and_metrics_through_a_failover() {
    let dir = scratch("metrics");
    let conf = dir.join("backup.toml");
    // The file sets what the command line does not; the command line's --guest wins.
    std::fs::write(
        &conf,
        "guest = \"kvm\"\nmemory = \"4M\"\ndetect_timeout = \"2s\"\nexit_after = \"3s\"\n\
         metrics = \"127.0.0.1:0\"\n",
    )
    .expect("config file");
    let mport = dir.join("metrics.port");
    let mut b = Backup::start(
        &dir,
        &[
            "--config",
            conf.to_str().expect("utf-8 path"),
            "--guest",
            "sim",
            "--metrics-port-file",
            mport.to_str().expect("utf-8 path"),
        ],
    );
    let maddr: SocketAddr = wait_for_file(&mport)
        .trim()
        .parse()
        .expect("metrics address");

    let (status, body) = get(maddr, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(
        sample(&body, "castor_state{state=\"listening\"}"),
        Some(1.0),
        "{body}"
    );
    let (status, _) = get(maddr, "/nope");
    assert!(status.starts_with("HTTP/1.1 404"), "{status}");

    let mut p = FakePrimary::connect(&SimFactory::new(), &sim_spec(), b.addr, None);
    p.epoch(false, Verify::None);
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(15));
        p.epoch(true, Verify::Right);
    }
    let (_, body) = get(maddr, "/metrics");
    for name in [
        "castor_backup_epochs_committed_total",
        "castor_backup_checkpoints_total",
        "castor_backup_commit_seconds_count",
        "castor_backup_wire_bytes_total",
        "castor_backup_detection_seconds",
        "castor_backup_activation_seconds",
    ] {
        assert!(sample(&body, name).is_some(), "{name} missing:\n{body}");
    }
    assert_eq!(
        sample(&body, "castor_backup_epochs_committed_total"),
        Some(4.0),
        "{body}"
    );
    assert_eq!(
        sample(&body, "castor_backup_checkpoints_total"),
        Some(3.0),
        "{body}"
    );
    assert_eq!(
        sample(&body, "castor_backup_commit_seconds_count"),
        Some(4.0),
        "{body}"
    );
    assert!(sample(&body, "castor_backup_wire_bytes_total").unwrap_or(0.0) > 0.0);
    assert_eq!(
        sample(&body, "castor_state{state=\"receiving\"}"),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        sample(&body, "castor_state{state=\"listening\"}"),
        Some(0.0),
        "{body}"
    );

    // The primary goes away: failover, and the failover gauges are set.
    drop(p);
    let end = Instant::now() + DEADLINE;
    let body = loop {
        let (_, body) = get(maddr, "/metrics");
        if sample(&body, "castor_state{state=\"active\"}") == Some(1.0) {
            break body;
        }
        assert!(
            Instant::now() < end,
            "never active:\n{body}\n{}",
            b.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        sample(&body, "castor_backup_activation_seconds").unwrap_or(0.0) > 0.0,
        "{body}"
    );
    assert_eq!(
        sample(&body, "castor_state{state=\"receiving\"}"),
        Some(0.0),
        "{body}"
    );
    let status = b.wait();
    assert_eq!(status.code(), Some(0), "stderr:\n{}", b.stderr());
    assert!(b.stderr().contains("serving metrics"), "{}", b.stderr());
}

/// Nonsense values stop the backup before it listens, with exit 1 and a message naming the
/// option and the rule: the primary's words for the same values.
#[test]
fn nonsense_values_stop_the_backup_naming_the_option() {
    for (args, says) in [
        (
            &["--memory", "3M"][..],
            "ha-backup: error: --memory 3M is not a positive multiple of 2M",
        ),
        (
            &["--interval", "0"],
            "ha-backup: error: --interval 0ns is below the minimum of 1ms",
        ),
        (
            &["--reprotect-link-rate", "100mbps"],
            "ha-backup: error: --reprotect-link-rate: \"100mbps\" is not a link rate",
        ),
    ] {
        let mut argv = vec!["--guest", "sim", "--insecure", "--listen", "127.0.0.1:0"];
        argv.extend_from_slice(args);
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ha-backup"))
            .args(&argv)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run ha-backup");
        // A backup that accepts the value listens until stopped: stop it rather than hang.
        let end = Instant::now() + DEADLINE;
        while child.try_wait().expect("wait for ha-backup").is_none() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(10));
        }
        let accepted = child.try_wait().expect("wait for ha-backup").is_none();
        if accepted {
            let _ = child.kill();
        }
        let out = child.wait_with_output().expect("ha-backup's stderr");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!accepted, "{args:?} was accepted: {err}");
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(
            !err.contains("listening for the primary"),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn a_refused_second_backup_leaves_the_running_ones_files_alone() {
    let dir = scratch("second");
    let mut b = Backup::start(&dir, &["--guest", "sim", "--memory", "4M"]);
    let end = Instant::now() + DEADLINE;
    while b.event("listening").is_none() {
        assert!(Instant::now() < end, "never listening:\n{}", b.stderr());
        std::thread::sleep(Duration::from_millis(10));
    }
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).expect(name);
    let (events, stats) = (read("events.jsonl"), read("stats.csv"));

    // A second backup on another port with the same files: refused by their locks, and
    // it says why. (On the same port it fails to listen before it opens any file.)
    let second = std::process::Command::new(env!("CARGO_BIN_EXE_ha-backup"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--guest",
            "sim",
            "--memory",
            "4M",
        ])
        .arg("--events")
        .arg(dir.join("events.jsonl"))
        .arg("--stats")
        .arg(dir.join("stats.csv"))
        .arg("--ack-log")
        .arg(dir.join("ack.log"))
        .arg("--key")
        .arg(dir.join("pair.key"))
        .output()
        .expect("run a second ha-backup");
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{err}");
    assert!(err.contains("in use by another running process"), "{err}");
    assert_eq!(
        read("events.jsonl"),
        events,
        "the first's events were touched"
    );
    assert_eq!(read("stats.csv"), stats, "the first's stats were touched");

    // The first goes on writing its files whole: JSON lines and CSV rows, no holes.
    let mut p = FakePrimary::connect(&SimFactory::new(), &sim_spec(), b.addr, None);
    p.epoch(false, Verify::None);
    p.epoch(true, Verify::Right);
    // Rows are written after each ack: wait for both.
    let end = Instant::now() + DEADLINE;
    let stats_now = loop {
        let now = read("stats.csv");
        if now.lines().count() >= stats.lines().count() + 2 {
            break now;
        }
        assert!(Instant::now() < end, "no rows:\n{now}\n{}", b.stderr());
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(stats_now.starts_with(&stats), "{stats_now:?}");
    assert!(!stats_now.contains('\0'), "{stats_now:?}");
    // Every event line parses (no NUL bytes, no torn line).
    assert!(b.event("checkpoint").is_some(), "{:?}", b.events());
    assert!(
        b.child.try_wait().expect("try_wait").is_none(),
        "the first died"
    );
}
