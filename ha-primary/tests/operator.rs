//! The operator's interface of the `ha-primary` binary: a `--config` file, the Prometheus
//! metrics served on `--metrics`, against a minimal in-test backup; `keygen` and the
//! checks on the pair key.

use ha_codec::PAGE_SIZE;
use ha_codec::block::BlockSize;
use ha_codec::codec::Mode;
use ha_daemon::testing::{http_get as get, sample};
use ha_wire::frame::{FrameType, split_frame};
use ha_wire::secure::{self, Deadline, PairKey};
use ha_wire::session::{self, Hello};
use ha_wire::stream::Staging;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MEM: u64 = 8 << 20;
const DEADLINE: Duration = Duration::from_secs(20);

/// Accept one primary, run the Noise handshake with `key`, welcome it, stage and commit
/// its epochs, and ack each.
fn fake_backup(l: TcpListener, key: PairKey) {
    let Ok((mut s, _)) = l.accept() else { return };
    let Ok(t) = secure::respond(&mut s, &key, &Deadline::handshake()) else {
        return;
    };
    let mut s = t.stream(s);
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 1 << 16];
    let mut image = vec![0u8; MEM as usize];
    let mut staging = Staging::new(Mode::Fgbi, BlockSize::DEFAULT, MEM / PAGE_SIZE as u64, 1);
    let mut hello_done = false;
    loop {
        let n = match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut at = 0;
        while let Ok(Some((ty, body, len))) = split_frame(&buf[at..]) {
            let raw = buf[at..at + len].to_vec();
            at += len;
            if !hello_done {
                let h = Hello::parse(body).expect("hello");
                assert_eq!(h.memory_size, MEM);
                let mut out = Vec::new();
                session::Welcome {
                    next_epoch: 1,
                    detect_timeout: Duration::from_secs(1),
                    holds_image: false,
                }
                .put(&mut out);
                s.write_all(&out).expect("welcome");
                hello_done = true;
                continue;
            }
            if ty == FrameType::Heartbeat as u8 {
                continue;
            }
            match staging.push(ty, &raw[5..], &raw, &image) {
                Ok(Some(ep)) => {
                    ep.commit(&mut image);
                    let mut out = Vec::new();
                    session::put_ack(&mut out, ep.epoch);
                    if s.write_all(&out).is_err() {
                        return;
                    }
                }
                Ok(None) => {}
                Err(_) => return,
            }
        }
        buf.drain(..at);
    }
}

fn wait_for_file(p: &Path) -> String {
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

/// A scratch directory `ha-primary-<tag>-<pid>` with a pair key made by `ha-primary
/// keygen` (checked to read back), and a fake backup holding that key: (directory, key file,
/// the backup's address, its thread).
fn keyed_backup(
    tag: &str,
) -> (
    std::path::PathBuf,
    std::path::PathBuf,
    std::net::SocketAddr,
    std::thread::JoinHandle<()>,
) {
    let dir = std::env::temp_dir().join(format!("ha-primary-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let key_file = dir.join("pair.key");
    let out = ha_primary(&["keygen", &key_file.display().to_string()]);
    assert!(out.status.success(), "{out:?}");
    let key = PairKey::read(&key_file).expect("the new key reads back");
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let backup = l.local_addr().expect("addr");
    let b = std::thread::spawn(move || fake_backup(l, key));
    (dir, key_file, backup, b)
}

#[test]
fn config_file_and_metrics() {
    let (dir, key_file, backup, b) = keyed_backup("operator");

    // The file sets the run; the command line's --interval beats the file's.
    let conf = dir.join("primary.toml");
    std::fs::write(
        &conf,
        format!(
            "backup = \"{backup}\"\nguest = \"sim\"\nworkload = \"kv\"\nmemory = \"8M\"\n\
             rate = 50000\noutput_every = 16\ninterval = \"1s\"\nrun_for = \"2s\"\n\
             precopy_rounds = 3\nprecopy_threshold = 64\nmetrics = \"127.0.0.1:0\"\n\
             key = \"{}\"\n",
            key_file.display()
        ),
    )
    .expect("config file");
    let mport = dir.join("metrics.port");
    let stderr = std::fs::File::create(dir.join("stderr")).expect("stderr file");
    let child = Command::new(env!("CARGO_BIN_EXE_ha-primary"))
        .arg("--config")
        .arg(&conf)
        .args(["--interval", "20ms"])
        .arg("--metrics-port-file")
        .arg(&mport)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("start ha-primary");
    let maddr: SocketAddr = wait_for_file(&mport)
        .trim()
        .parse()
        .expect("metrics address");
    let log = || std::fs::read_to_string(dir.join("stderr")).unwrap_or_default();

    let end = Instant::now() + DEADLINE;
    let body = loop {
        let (status, body) = get(maddr, "/metrics");
        assert_eq!(status, "HTTP/1.1 200 OK");
        if sample(&body, "castor_primary_epochs_committed_total").unwrap_or(0.0) >= 5.0 {
            break body;
        }
        assert!(
            Instant::now() < end,
            "no checkpoints committed:\n{body}\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let (status, _) = get(maddr, "/");
    assert!(status.starts_with("HTTP/1.1 404"), "{status}");
    for name in [
        "castor_primary_epochs_committed_total",
        "castor_primary_pause_seconds_count",
        "castor_primary_pause_seconds_bucket{le=\"0.0001\"}",
        "castor_primary_pause_seconds_bucket{le=\"0.1\"}",
        "castor_primary_wire_bytes_total{encoding=\"other\"}",
        "castor_primary_raw_bytes_total",
        "castor_primary_cache_hit_rate",
        "castor_primary_ack_latency_seconds_count",
        "castor_primary_output_held_records",
        "castor_primary_output_released_records_total",
        "castor_state{state=\"syncing\"}",
        "castor_state{state=\"unprotected\"}",
        "castor_state{state=\"fenced\"}",
    ] {
        assert!(sample(&body, name).is_some(), "{name} missing:\n{body}");
    }
    assert_eq!(
        sample(&body, "castor_state{state=\"protected\"}"),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        sample(&body, "castor_state{state=\"syncing\"}"),
        Some(0.0),
        "{body}"
    );
    assert!(sample(&body, "castor_primary_pause_seconds_count").unwrap_or(0.0) >= 5.0);
    assert!(sample(&body, "castor_primary_raw_bytes_total").unwrap_or(0.0) > 0.0);
    // 20 ms epochs for about 2 s, not 1 s ones: the command line won.
    let out = child.wait_with_output().expect("ha-primary exits");
    assert!(out.status.success(), "stderr:\n{}", log());
    let summary: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("summary on stdout");
    assert!(
        summary["epochs_committed"].as_u64().unwrap_or(0) > 20,
        "{summary}"
    );
    assert!(log().contains("serving metrics"), "{}", log());
    let _ = b.join();
}

/// Run `ha-primary` with `args` to the end.
fn ha_primary(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ha-primary"))
        .args(args)
        .env("RUST_LOG", "info")
        .output()
        .expect("run ha-primary")
}

/// `keygen` writes a 0600 key and never overwrites one; a key file others can read, a
/// malformed one, no key and no `--insecure`, or both, stop the primary before it starts
/// a guest, with a message naming the problem.
#[test]
fn keygen_and_the_key_file_checks() {
    let dir = std::env::temp_dir().join(format!("ha-primary-keys-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let key = dir.join("pair.key");
    let k = key.display().to_string();
    let out = ha_primary(&["keygen", &k]);
    assert!(out.status.success(), "{out:?}");
    let meta = std::fs::metadata(&key).expect("key written");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let text = std::fs::read_to_string(&key).expect("key text");
    assert_eq!(text.trim().len(), 64, "{text:?}");
    let out = ha_primary(&["keygen", &k]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{k} already exists; not overwriting a pair key")),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(&key).expect("key"),
        text,
        "unchanged"
    );
    // Every refusal below happens before a guest or a connection: no backup is needed.
    let run = |extra: &[&str]| {
        let mut args = vec![
            "--guest",
            "sim",
            "--memory",
            "8M",
            "--backup",
            "127.0.0.1:9",
        ];
        args.extend_from_slice(extra);
        let out = ha_primary(&args);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let err = run(&["--key", &k]);
    assert!(
        err.contains(&format!(
            "pair key {k} has mode 0644: group and others must have no access"
        )),
        "{err}"
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let bad = dir.join("bad.key");
    std::fs::write(&bad, "not a key\n").expect("write");
    std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let err = run(&["--key", &bad.display().to_string()]);
    assert!(err.contains("is not a key: wrong length"), "{err}");
    let err = run(&[]);
    assert!(
        err.contains(
            "no pair key: give --key FILE (create one with `ha-primary keygen FILE`) or --insecure"
        ),
        "{err}"
    );
    let err = run(&["--key", &k, "--insecure"]);
    assert!(
        err.contains("--key and --insecure contradict each other"),
        "{err}"
    );
    // --insecure starts (and fails only at the connection), warning loudly.
    let err = run(&["--insecure"]);
    assert!(
        err.contains("replication is NOT encrypted or authenticated"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Nonsense values stop the primary before it starts a guest or connects, with exit 1 and a
/// message naming the option and the rule (the backup's words for the same values).
#[test]
fn nonsense_values_stop_the_primary_naming_the_option() {
    for (args, says) in [
        (
            &["--interval", "0"][..],
            "ha-primary: --interval 0ns is below the minimum of 1ms",
        ),
        (
            &["--heartbeat", "0s"],
            "ha-primary: --heartbeat 0ns is below the minimum of 1ms",
        ),
        (
            &["--memory", "3M"],
            "ha-primary: --memory 3M is not a positive multiple of 2M",
        ),
    ] {
        let mut argv = vec!["--guest", "sim", "--insecure", "--backup", "127.0.0.1:9"];
        argv.extend_from_slice(args);
        let out = ha_primary(&argv);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(!err.contains("ha-primary starting"), "{args:?}: {err}");
    }
}

/// `--net-buffer auto` on a guest with no host interface, and `--net-buffer` with
/// `--no-net-buffer`, stop the primary before it protects the guest, saying why.
#[test]
fn a_network_buffer_that_cannot_be_had_stops_the_primary() {
    for (args, says) in [
        (
            &["--net-buffer", "auto"][..],
            "--net-buffer auto: the guest has no network interface on this host",
        ),
        (
            &["--net-buffer", "vif1.0", "--no-net-buffer"],
            "cannot be used with",
        ),
    ] {
        let mut argv = vec!["--guest", "sim", "--insecure", "--backup", "127.0.0.1:9"];
        argv.extend_from_slice(args);
        let out = ha_primary(&argv);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(0), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(!err.contains("checkpoint copy"), "{args:?}: {err}");
    }
}

/// A second primary given the running one's `--events` and `--stats` is refused before it
/// touches them, and says why; the running one goes on writing them whole.
#[test]
fn a_refused_second_primary_leaves_the_running_ones_files_alone() {
    let (dir, key_file, backup, b) = keyed_backup("second");
    let backup = backup.to_string();
    let (events, stats) = (dir.join("events.jsonl"), dir.join("stats.csv"));
    let primary = |backup: &str| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_ha-primary"));
        c.args(["--backup", backup, "--guest", "sim", "--workload", "kv"])
            .args(["--memory", "8M", "--interval", "20ms", "--run-for", "60s"])
            .arg("--key")
            .arg(&key_file)
            .arg("--events")
            .arg(&events)
            .arg("--stats")
            .arg(&stats)
            .env("RUST_LOG", "info");
        c
    };
    let first_err = std::fs::File::create(dir.join("stderr")).expect("stderr file");
    let mut first = primary(&backup)
        .stdout(Stdio::null())
        .stderr(first_err)
        .spawn()
        .expect("start ha-primary");
    let log = || std::fs::read_to_string(dir.join("stderr")).unwrap_or_default();
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    let end = Instant::now() + DEADLINE;
    while read(&stats).lines().count() < 3 {
        assert!(Instant::now() < end, "no epochs:\n{}", log());
        std::thread::sleep(Duration::from_millis(10));
    }
    let (events_before, stats_before) = (read(&events), read(&stats));

    // Its backup is not there: it fails to connect, and it opens its files only once a
    // backup welcomed it, so it never touches them (the lock would refuse it too).
    let nowhere = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .to_string();
    let second = primary(&nowhere).output().expect("run a second ha-primary");
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "{err}");
    assert!(err.contains("cannot connect to the backup"), "{err}");

    // The first's files kept what they had and grew whole: no truncation, no NUL bytes.
    let end = Instant::now() + DEADLINE;
    while read(&stats).lines().count() <= stats_before.lines().count() {
        assert!(Instant::now() < end, "no more epochs:\n{}", log());
        std::thread::sleep(Duration::from_millis(10));
    }
    let (events_now, stats_now) = (read(&events), read(&stats));
    assert!(events_now.starts_with(&events_before), "{events_now:?}");
    assert!(stats_now.starts_with(&stats_before), "{stats_now:?}");
    assert!(!events_now.contains('\0') && !stats_now.contains('\0'));
    for line in events_now.lines() {
        serde_json::from_str::<serde_json::Value>(line).expect("event line is JSON");
    }
    assert!(first.try_wait().expect("try_wait").is_none(), "{}", log());
    let _ = first.kill();
    let _ = first.wait();
    let _ = b.join();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A backup of another backend refuses the primary at the handshake: the primary exits 1
/// and its message names both kinds (what the backup's Refuse said).
#[test]
fn a_backup_of_another_backend_stops_the_primary_naming_both_kinds() {
    use ha_guest::backend::BackendKind;
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let backup = l.local_addr().expect("addr").to_string();
    // A plaintext (--insecure) backup configured for Xen: it checks the Hello as ha-backup
    // does and refuses with the reason.
    let b = std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("the primary connects");
        s.set_read_timeout(Some(DEADLINE)).expect("read timeout");
        let mut buf = Vec::new();
        let mut chunk = [0u8; 256];
        let h = loop {
            if let Some((ty, body, _)) = split_frame(&buf).expect("a frame") {
                assert_eq!(ty, FrameType::Hello as u8);
                break Hello::parse(body).expect("hello");
            }
            let n = s.read(&mut chunk).expect("the Hello");
            assert!(n > 0, "the primary hung up before its Hello");
            buf.extend_from_slice(&chunk[..n]);
        };
        let ours = Hello {
            backend: BackendKind::Xen,
            layout: BackendKind::Xen.guest_layout(),
            disk_size: 0,
            ..h
        };
        let reason = h.check_against(&ours).expect_err("a mismatch").to_string();
        let mut out = Vec::new();
        session::put_refuse(&mut out, &reason);
        s.write_all(&out).expect("refuse");
        (h.backend, reason)
    });
    let out = ha_primary(&[
        "--guest",
        "sim",
        "--insecure",
        "--backup",
        &backup,
        "--memory",
        "8M",
        "--run-for",
        "10s",
    ]);
    let (announced, reason) = b.join().expect("the fake backup");
    assert_eq!(announced, BackendKind::Sim);
    assert_eq!(reason, "backend mismatch: primary has sim, backup has xen");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(
            "backup refused the session: backend mismatch: primary has sim, backup has xen"
        ),
        "{err}"
    );
}
