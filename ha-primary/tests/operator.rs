//! The operator's interface of the `ha-primary` binary: a `--config` file, and the
//! Prometheus metrics served on `--metrics`, against a minimal in-test backup.

use ha_common::PAGE_SIZE;
use ha_common::block::BlockSize;
use ha_common::codec::Mode;
use ha_common::session::{self, Hello};
use ha_common::stream::{Staging, split_frame};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MEM: u64 = 8 << 20;
const DEADLINE: Duration = Duration::from_secs(20);

/// Accept one primary, welcome it, stage and commit its epochs, and ack each.
fn fake_backup(l: TcpListener) {
    let Ok((mut s, _)) = l.accept() else { return };
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
                session::put_welcome(&mut out, 1);
                s.write_all(&out).expect("welcome");
                hello_done = true;
                continue;
            }
            if ty == session::frame_type::HEARTBEAT {
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

/// `GET path` on `addr`: (status line, body).
fn get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).expect("connect to the metrics server");
    write!(s, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").expect("request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("response");
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

/// The value of the sample `name` (with labels, if any) in an exposition.
fn sample(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
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

#[test]
fn config_file_and_metrics() {
    let dir = std::env::temp_dir().join(format!("ha-primary-operator-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let backup = l.local_addr().expect("addr");
    let b = std::thread::spawn(move || fake_backup(l));

    // The file sets the run; the command line's --interval beats the file's.
    let conf = dir.join("primary.toml");
    std::fs::write(
        &conf,
        format!(
            "backup = \"{backup}\"\nguest = \"sim\"\nworkload = \"kv\"\nmemory = \"8M\"\n\
             rate = 50000\noutput_every = 16\ninterval = \"1s\"\nrun_for = \"2s\"\n\
             precopy_rounds = 3\nprecopy_threshold = 64\nmetrics = \"127.0.0.1:0\"\n"
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
