//! End-to-end tests: the `ha-backup` binary against a fake primary over a sim guest (and
//! one over KVM when /dev/kvm opens).

mod common;

use std::time::{Duration, Instant};

use common::*;
use ha_backup::commit::Committed;
use ha_backup::config::{Cli, Config};
use ha_backup::stage::Stager;
use ha_guest::backend::BackendKind;
use ha_guest::domain::{DomainError, DomainFactory};
use ha_sim::SimFactory;
use ha_wire::frame::Frame;
use ha_wire::frame::{FrameType, split_frame};
use ha_wire::output::{OutputChecker, Source, committed_out_head};
use ha_wire::session::Hello;

const MEM: &str = "4M";

fn sim_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["--guest", "sim", "--memory", MEM];
    v.extend_from_slice(extra);
    v
}

/// A primary of another backend is refused at the handshake, the refusal naming both kinds
/// (the backup could not restore its checkpoints at failover), and the backup keeps
/// listening for a primary of its own.
#[test]
fn a_primary_of_another_backend_is_refused_naming_both_kinds() {
    let dir = scratch("backend");
    let mut b = Backup::start(&dir, &sim_args(&["--detect-timeout", "100ms"]));
    let mut reasons = Vec::new();
    for kind in [BackendKind::Kvm, BackendKind::Xen] {
        let h = Hello {
            backend: kind,
            layout: kind.guest_layout(),
            disk_size: 0,
            ..hello(4 * MIB)
        };
        let (_s, _, (ty, body)) = open_session(b.addr, &h);
        assert_eq!(
            ty,
            FrameType::Refuse as u8,
            "{}",
            String::from_utf8_lossy(&body)
        );
        let reason = String::from_utf8_lossy(&body).to_string();
        assert_eq!(
            reason,
            format!("backend mismatch: primary has {kind}, backup has sim")
        );
        reasons.push(reason);
    }
    let (s, _, (ty, body)) = open_session(b.addr, &hello(4 * MIB));
    assert_eq!(
        ty,
        FrameType::Welcome as u8,
        "{}",
        String::from_utf8_lossy(&body)
    );
    let refused = b.events_named("refused", 2);
    assert_eq!(refused.len(), 2, "{refused:?}");
    for (e, reason) in refused.iter().zip(&reasons) {
        assert_eq!(e["reason"], reason.as_str());
        assert_eq!(e["stage"], "session");
    }
    drop(s);
    assert_eq!(b.wait().code(), Some(2), "stderr:\n{}", b.stderr());
}

#[test]
fn mismatched_primary_is_refused_and_the_backup_keeps_listening() {
    let dir = scratch("refuse");
    let mut b = Backup::start(&dir, &sim_args(&["--detect-timeout", "100ms"]));
    let (_s, _, (ty, body)) = open_session(b.addr, &hello(8 * MIB));
    assert_eq!(ty, FrameType::Refuse as u8);
    let reason = String::from_utf8_lossy(&body).to_string();
    assert_eq!(
        reason,
        "guest memory size mismatch: primary has 8388608, backup has 4194304"
    );
    let mut bad = hello(4 * MIB);
    bad.mode = ha_codec::codec::Mode::Remus;
    let (_s, _, (ty, body)) = open_session(b.addr, &bad);
    assert_eq!(ty, FrameType::Refuse as u8);
    assert_eq!(
        String::from_utf8_lossy(&body),
        "mode mismatch: primary has remus, backup has fgbi"
    );
    // A correct primary is welcomed.
    let (s, _, (ty, body)) = open_session(b.addr, &hello(4 * MIB));
    assert_eq!(
        ty,
        FrameType::Welcome as u8,
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(
        ha_wire::session::Welcome::parse(&body).map(|w| w.next_epoch),
        Ok(1)
    );
    let refused = b.events_named("refused", 2);
    assert_eq!(refused.len(), 2);
    assert_eq!(refused[0]["reason"], reason);
    // It then loses that primary before any checkpoint: exit 2, with the message.
    drop(s);
    let status = b.wait();
    assert_eq!(status.code(), Some(2), "stderr:\n{}", b.stderr());
    assert!(
        b.stderr()
            .contains("primary lost before the first checkpoint: nothing to resume"),
        "{}",
        b.stderr()
    );
    assert_eq!(b.event("exit").map(|e| e["code"].clone()), Some(2.into()));
}

#[test]
fn lost_after_precopy_only_exits_2() {
    let dir = scratch("precopy-only");
    // The fake primary sends no heartbeats between epochs: the timeout must outlast
    // building an epoch on a loaded machine.
    let mut b = Backup::start(&dir, &sim_args(&["--detect-timeout", "400ms"]));
    let mut p = FakePrimary::connect(&SimFactory::new(), &sim_spec(), b.addr, None);
    p.epoch(false, Verify::None);
    p.epoch(false, Verify::None);
    // Silence: detected by the timeout (the connection stays open).
    let status = b.wait();
    assert_eq!(status.code(), Some(2), "stderr:\n{}", b.stderr());
    let lost = b.event("primary_lost").expect("primary_lost event");
    assert_eq!(lost["last_epoch"], 2);
    assert!(
        lost["reason"].as_str().unwrap_or("").contains("no frame"),
        "{lost}"
    );
    drop(p);
}

#[test]
fn epochs_commit_ack_and_log_then_a_wrong_verify_is_fatal() {
    let dir = scratch("verify");
    let mut b = Backup::start(&dir, &sim_args(&["--detect-timeout", "2s"]));
    let mut p = FakePrimary::connect(&SimFactory::new(), &sim_spec(), b.addr, None);
    p.epoch(false, Verify::None);
    let mut heads = Vec::new();
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(15));
        let built = p.epoch(true, Verify::Right);
        let (epoch, head) = (built.epoch, built.status.out_head);
        heads.push((epoch, head));
        // The ack log line was written before the ack we just received.
        assert_eq!(b.ack_log().last(), Some(&(epoch, head)));
    }
    assert!(
        heads.last().is_some_and(|h| h.1 > 0),
        "the guest produced output: {heads:?}"
    );
    assert_eq!(b.ack_log(), heads);
    let cps: Vec<_> = b
        .events()
        .into_iter()
        .filter(|e| e["event"] == "checkpoint")
        .map(|e| {
            (
                e["epoch"].as_u64().unwrap_or(0),
                e["out_head"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(cps, heads);
    // The stats row is written just after the ack (its ack time is measured).
    let end = Instant::now() + DEADLINE;
    let stats = loop {
        let s = std::fs::read_to_string(dir.join("stats.csv")).expect("stats");
        if s.lines().count() >= 6 || Instant::now() > end {
            break s;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let rows: Vec<&str> = stats.lines().collect();
    assert_eq!(rows.len(), 1 + 5, "{stats}");
    assert!(rows[1].starts_with("1,0,"), "{stats}");
    assert!(rows[2].starts_with("2,1,"), "{stats}");

    // A checkpoint whose Verify digest is wrong: the backup stops with code 3, no ack.
    let bad = p.epochs.next(true, Verify::Wrong);
    p.send(&bad.bytes);
    let status = b.wait();
    assert_eq!(status.code(), Some(3), "stderr:\n{}", b.stderr());
    assert!(b.stderr().contains("VERIFY FAILED"), "{}", b.stderr());
    assert_eq!(
        b.event("verify_failed").map(|e| e["epoch"].clone()),
        Some(bad.epoch.into())
    );
    assert!(
        p.ack().is_err(),
        "no ack for a checkpoint that failed verification"
    );
}

/// Feeds epochs through the library's stage and commit directly: the committed image
/// equals the primary's memory at every checkpoint, and a corrupted epoch leaves it alone.
#[test]
fn committed_image_equals_primary_memory_and_corrupt_epochs_leave_it() {
    let spec = sim_spec();
    let cli: Cli = clap::Parser::try_parse_from(["ha-backup", "--memory", MEM]).expect("cli");
    let cfg = Config::from_cli(&cli).expect("config");
    let mut stager = Stager::new(&cfg, 1);
    let mut committed = Committed::new(spec.memory_size as usize, true).expect("image");
    let mut src = Epochs::new(&SimFactory::new(), &spec);
    let feed = |stager: &mut Stager, committed: &mut Committed, bytes: &[u8]| {
        let mut at = 0;
        let mut done = None;
        while let Some((ty, _, n)) = split_frame(&bytes[at..]).map_err(|e| e.to_string())? {
            let f = Frame {
                ty,
                raw: bytes[at..at + n].to_vec(),
            };
            if let Some(v) = stager
                .push(&f, committed.image(), None)
                .map_err(|e| e.to_string())?
            {
                done = Some(committed.apply(v.staged).map_err(|e| e.to_string())?);
            }
            at += n;
        }
        Ok::<_, String>(done)
    };
    for i in 0..4 {
        std::thread::sleep(Duration::from_millis(10));
        let b = src.next(i > 0, Verify::Right);
        let applied = feed(&mut stager, &mut committed, &b.bytes)
            .expect("epoch commits")
            .expect("trailer seen");
        assert_eq!(applied.epoch, b.epoch);
        assert!(
            committed.image() == &b.memory[..],
            "image differs at epoch {}",
            b.epoch
        );
    }
    let before = committed.image().to_vec();
    std::thread::sleep(Duration::from_millis(10));
    let b = src.next(true, Verify::Right);
    let fr = frames(&b.bytes);
    assert!(fr.len() >= 3);
    // A flipped bit in the Pages frame.
    let mut bad = b.bytes.clone();
    bad[fr[1].start + 20] ^= 0x10;
    assert!(feed(&mut stager, &mut committed, &bad).is_err());
    assert!(
        committed.image() == &before[..],
        "a corrupt epoch changed the image"
    );
    // Cut mid-epoch: the partial epoch is discarded.
    let cut = &b.bytes[..fr[1].end];
    assert_eq!(feed(&mut stager, &mut committed, cut), Ok(None));
    assert!(stager.discard());
    assert!(committed.image() == &before[..]);
    // The intact epoch still commits afterwards.
    let applied = feed(&mut stager, &mut committed, &b.bytes)
        .expect("intact epoch commits")
        .expect("trailer");
    assert_eq!(applied.epoch, b.epoch);
    assert!(committed.image() == &b.memory[..]);
}

/// Runs checkpoints 1..=3 (after one pre-copy epoch), then `spoil` with the next epoch's
/// bytes; the backup must fail over from the last good checkpoint.
/// Returns the backup's events.
fn fails_over_from_previous_commit(
    name: &str,
    spoil: impl FnOnce(&mut FakePrimary, Built),
) -> Vec<serde_json::Value> {
    let dir = scratch(name);
    let mut b = Backup::start(
        &dir,
        &sim_args(&["--detect-timeout", "150ms", "--exit-after", "300ms"]),
    );
    let mut p = FakePrimary::connect(&SimFactory::new(), &sim_spec(), b.addr, None);
    p.epoch(false, Verify::None);
    let mut last = (0, 0);
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(15));
        let built = p.epoch(true, Verify::Right);
        last = (built.epoch, built.status.progress);
    }
    std::thread::sleep(Duration::from_millis(15));
    let next = p.epochs.next(true, Verify::Right);
    p.epochs.guest.pause().expect("primary guest stops");
    spoil(&mut p, next);
    let status = b.wait();
    assert_eq!(status.code(), Some(0), "stderr:\n{}", b.stderr());
    let lost = b.event("primary_lost").expect("primary_lost");
    assert_eq!(lost["last_epoch"], last.0, "{lost}");
    let active = b.event("active").expect("active");
    assert_eq!(active["epoch"], last.0, "{active}");
    assert_eq!(active["progress"], last.1, "{active}");
    assert_eq!(b.ack_log().last().map(|x| x.0), Some(last.0));
    drop(p);
    b.events()
}

#[test]
fn corrupt_frame_fails_over_to_the_previous_commit() {
    let events = fails_over_from_previous_commit("corrupt", |p, next| {
        let fr = frames(&next.bytes);
        let mut bad = next.bytes.clone();
        bad[fr[1].start + 30] ^= 0x01;
        p.send(&bad);
        assert!(p.ack().is_err(), "a corrupt epoch is not acked");
    });
    let lost = events.iter().find(|e| e["event"] == "primary_lost");
    assert!(
        lost.and_then(|e| e["reason"].as_str())
            .is_some_and(|r| r.starts_with("corrupt stream: epoch digest mismatch")),
        "{events:?}"
    );
}

#[test]
fn connection_cut_mid_epoch_fails_over_to_the_previous_commit() {
    let events = fails_over_from_previous_commit("cut", |p, next| {
        let fr = frames(&next.bytes);
        p.send(&next.bytes[..fr[1].end]);
        let _ = p.stream.get_ref().shutdown(std::net::Shutdown::Both);
    });
    let lost = events.iter().find(|e| e["event"] == "primary_lost");
    assert_eq!(
        lost.map(|e| e["reason"].clone()),
        Some("connection closed".into())
    );
}

#[test]
fn failover_continues_progress_and_output_without_gap() {
    let dir = scratch("failover");
    let world = World::start();
    let detect = Duration::from_millis(120);
    let mut b = Backup::start(
        &dir,
        &sim_args(&[
            "--detect-timeout",
            "120ms",
            "--exit-after",
            "600ms",
            "--output",
            &world.addr.to_string(),
        ]),
    );
    let mut p = FakePrimary::connect(&SimFactory::new(), &sim_spec(), b.addr, Some(world.addr));
    p.epoch(false, Verify::None);
    let mut last = None;
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(25));
        let built = p.epoch(true, Verify::Right);
        last = Some((built.epoch, built.status));
    }
    let Some((cp_epoch, cp_status)) = last else {
        panic!("no checkpoint sent");
    };
    // The primary dies silently: its guest stops, the connection stays open.
    p.epochs.guest.pause().expect("pause");
    let silent_since = Instant::now();
    let status = b.wait();
    assert_eq!(status.code(), Some(0), "stderr:\n{}", b.stderr());

    let lost = b.event("primary_lost").expect("primary_lost");
    let detect_ms = lost["detect_ms"].as_u64().unwrap_or(0);
    assert!(
        detect_ms >= detect.as_millis() as u64 && detect_ms < 1000,
        "detect_ms {detect_ms}"
    );
    assert!(silent_since.elapsed() >= detect);
    let active = b.event("active").expect("active");
    assert_eq!(active["epoch"], cp_epoch);
    assert_eq!(active["progress"], cp_status.progress);
    assert_eq!(active["out_head"], cp_status.out_head);
    assert!(active["activation_ms"].as_u64().is_some());
    assert_eq!(
        active["rereleased"], cp_status.out_head,
        "ring holds every record so far"
    );
    let progress: Vec<u64> = b
        .events()
        .into_iter()
        .filter(|e| e["event"] == "progress")
        .filter_map(|e| e["progress"].as_u64())
        .collect();
    assert!(!progress.is_empty(), "no progress events");
    assert!(progress.windows(2).all(|w| w[0] <= w[1]), "{progress:?}");
    assert!(
        progress.last().is_some_and(|&x| x > cp_status.progress),
        "the guest did not continue: {progress:?} after {}",
        cp_status.progress
    );

    // The world: primary output (committed only), then the backup's re-release and new
    // output, with no gap.
    drop(p);
    let end = Instant::now() + DEADLINE;
    let ack_log = dir.join("ack.log");
    let committed = committed_out_head(&ack_log).expect("ack log");
    let recs = loop {
        let r = world.records();
        let backup_max = r
            .iter()
            .filter(|(s, _)| *s == Source::Backup)
            .map(|(_, r)| r.seq)
            .max();
        if backup_max.is_some_and(|m| m >= cp_status.out_head) || Instant::now() > end {
            break r;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut checker = OutputChecker::default();
    for (src, r) in &recs {
        checker
            .check(*src, r, || committed)
            .unwrap_or_else(|v| panic!("output violation: {v}"));
    }
    let from_backup = recs.iter().filter(|(s, _)| *s == Source::Backup).count();
    assert!(
        from_backup as u64 >= cp_status.out_head,
        "re-release missing"
    );
    assert!(
        checker.next_seq() > cp_status.out_head,
        "no new output after failover: next {} vs committed {}",
        checker.next_seq(),
        cp_status.out_head
    );
}

#[test]
fn kvm_failover_continues_progress() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(ha_kvm::KVM_DEVICE)
    {
        let reason = format!("cannot open {}: {e}", ha_kvm::KVM_DEVICE);
        if std::env::var("CASTOR_REQUIRE_KVM").as_deref() == Ok("1") {
            panic!("CASTOR_REQUIRE_KVM=1 but {reason}");
        }
        eprintln!("skipping the KVM failover test: {reason}");
        return;
    }
    let factory = ha_kvm::KvmFactory::new();
    let mut spec = sim_spec();
    spec.params.output_every = 0;
    spec.params.doorbell_every = 0;
    spec.params.rate = 0;
    let dir = scratch("kvm");
    let mut b = Backup::start(
        &dir,
        &[
            "--guest",
            "kvm",
            "--memory",
            MEM,
            "--detect-timeout",
            "600ms",
            "--exit-after",
            "400ms",
        ],
    );
    let mut p = FakePrimary::connect(&factory as &dyn DomainFactory, &spec, b.addr, None);
    p.epoch(false, Verify::None);
    let mut last = None;
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(20));
        let built = p.epoch(true, Verify::Right);
        last = Some((built.epoch, built.status.progress));
    }
    let Some((cp, progress)) = last else {
        panic!("no checkpoint");
    };
    p.epochs.guest.pause().expect("pause");
    let status = b.wait();
    assert_eq!(status.code(), Some(0), "stderr:\n{}", b.stderr());
    let active = b.event("active").expect("active");
    assert_eq!(active["epoch"], cp);
    assert_eq!(active["progress"], progress);
    let after = b
        .events()
        .into_iter()
        .filter(|e| e["event"] == "progress")
        .filter_map(|e| e["progress"].as_u64())
        .max();
    assert!(
        after.is_some_and(|a| a > progress),
        "{after:?} vs {progress}"
    );
    drop(p);
}

#[test]
fn sigterm_stops_a_listening_backup_with_code_0() {
    let dir = scratch("sigterm");
    let mut b = Backup::start(&dir, &sim_args(&[]));
    let pid = libc::pid_t::try_from(b.child.id()).expect("pid fits");
    // SAFETY: sending SIGTERM to our own child process, whose pid we just read and which
    // has not been waited for (so the pid is not reused).
    let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let status = b.wait();
    assert_eq!(status.code(), Some(0), "stderr:\n{}", b.stderr());
    assert_eq!(b.event("exit").map(|e| e["code"].clone()), Some(0.into()));
}

#[test]
fn heartbeats_keep_the_primary_alive_even_inside_an_epoch() {
    let dir = scratch("heartbeat");
    let mut b = Backup::start(&dir, &sim_args(&["--detect-timeout", "100ms"]));
    let mut p = FakePrimary::connect(&SimFactory::new(), &sim_spec(), b.addr, None);
    p.epoch(false, Verify::None);
    p.epoch(true, Verify::Right);
    let mut hb = Vec::new();
    ha_wire::session::put_heartbeat(&mut hb);
    // 400 ms of heartbeats only, then an epoch with heartbeats between its frames.
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(40));
        p.send(&hb);
    }
    let next = p.epochs.next(true, Verify::Right);
    for r in frames(&next.bytes) {
        p.send(&next.bytes[r]);
        p.send(&hb);
        std::thread::sleep(Duration::from_millis(40));
    }
    assert_eq!(p.ack().expect("ack after heartbeats"), next.epoch);
    assert!(b.event("primary_lost").is_none(), "{:?}", b.events());
    assert_eq!(b.ack_log().last().map(|x| x.0), Some(next.epoch));
    // Now a clean close: failover from the last checkpoint.
    let _ = p.stream.get_ref().shutdown(std::net::Shutdown::Both);
    p.epochs.guest.pause().expect("pause");
    let pid = libc::pid_t::try_from(b.child.id()).expect("pid fits");
    let end = Instant::now() + DEADLINE;
    while b.event("active").is_none() {
        assert!(Instant::now() < end, "no activation:\n{}", b.stderr());
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: SIGTERM to our own, not yet waited-for child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    assert_eq!(b.wait().code(), Some(0), "{}", b.stderr());
    let lost = b.event("primary_lost").expect("lost");
    assert_eq!(lost["reason"], "connection closed");
    assert_eq!(
        b.event("active").map(|a| a["epoch"].clone()),
        Some(next.epoch.into())
    );
}

#[test]
fn a_restore_failure_is_printed_with_its_cause_and_exits_1() {
    let dir = scratch("bad-state");
    let mut b = Backup::start(&dir, &sim_args(&["--detect-timeout", "100ms"]));
    let mut p = FakePrimary::connect(&SimFactory::new(), &sim_spec(), b.addr, None);
    p.epochs.state_override = Some(b"not a sim state".to_vec());
    p.epoch(true, Verify::Right);
    let _ = p.stream.get_ref().shutdown(std::net::Shutdown::Both);
    let status = b.wait();
    assert_eq!(status.code(), Some(1), "stderr:\n{}", b.stderr());
    let err = b.stderr();
    assert!(
        err.contains(
            "ha-backup: error: failover failed: cannot restore the guest from checkpoint 1 \
             with the sim backend: saved guest state is invalid"
        ),
        "{err}"
    );
    assert_eq!(b.event("exit").map(|e| e["code"].clone()), Some(1.into()));
}

/// Peers that fail the Noise handshake — plaintext, garbage, another key, a trickler — are
/// closed before any frame is read (event `refused`, stage `noise`), nothing reaches
/// staging, and the backup keeps listening for the right primary.
#[test]
fn peers_without_the_pair_key_are_refused_before_any_frame() {
    use std::io::Write as _;
    let dir = scratch("noise-refuse");
    let b = Backup::start(&dir, &sim_args(&["--detect-timeout", "2s"]));
    // A primary without a key: its plaintext Hello is not a Noise message.
    let mut plain = std::net::TcpStream::connect(b.addr).expect("connect");
    let mut out = Vec::new();
    hello(4 * MIB).put(&mut out);
    plain.write_all(&out).expect("hello");
    assert!(
        wait_closed(&mut plain).is_empty(),
        "no answer to a plaintext peer"
    );
    // Garbage.
    let mut junk = std::net::TcpStream::connect(b.addr).expect("connect");
    junk.write_all(b"GET / HTTP/1.0\r\n\r\n").expect("junk");
    assert!(wait_closed(&mut junk).is_empty());
    // Another key: a well-formed first message that does not authenticate.
    let mut other = std::net::TcpStream::connect(b.addr).expect("connect");
    other
        .set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    let wrong = ha_wire::secure::PairKey::from_bytes([9; 32]);
    let e = ha_wire::secure::initiate(&mut other, &wrong, &ha_wire::secure::Deadline::handshake())
        .expect_err("wrong key");
    assert!(
        matches!(
            e,
            ha_wire::secure::SecureError::Closed | ha_wire::secure::SecureError::Io(_)
        ),
        "{e:?}"
    );
    // A trickler: a valid length, then a byte every 300 ms; cut off 5 s after connecting.
    let mut slow = std::net::TcpStream::connect(b.addr).expect("connect");
    let t0 = Instant::now();
    slow.write_all(&48u16.to_le_bytes()).expect("len");
    let mut closed = false;
    while t0.elapsed() < Duration::from_secs(8) {
        std::thread::sleep(Duration::from_millis(300));
        if slow.write_all(&[1]).is_err() {
            closed = true;
            break;
        }
    }
    let took = t0.elapsed();
    assert!(closed || wait_closed(&mut slow).is_empty());
    assert!(took >= Duration::from_secs(4), "{took:?}");
    let refused = b.events_named("refused", 4);
    assert_eq!(refused.len(), 4, "{refused:?}");
    assert!(refused.iter().all(|e| e["stage"] == "noise"), "{refused:?}");
    let reasons: Vec<&str> = refused
        .iter()
        .map(|e| e["reason"].as_str().unwrap_or(""))
        .collect();
    assert!(reasons[0].contains("handshake message of"), "{reasons:?}");
    assert!(reasons[1].contains("handshake message of"), "{reasons:?}");
    assert!(
        reasons[2].contains("the peer does not hold the pair key"),
        "{reasons:?}"
    );
    assert!(
        reasons[3].contains("did not complete within 5s"),
        "{reasons:?}"
    );
    assert!(b.event("checkpoint").is_none() && b.ack_log().is_empty());
    assert!(
        b.stderr().contains("failed the secure handshake"),
        "{}",
        b.stderr()
    );
    // The right primary is welcomed and commits.
    let mut p = FakePrimary::connect(&SimFactory::new(), &sim_spec(), b.addr, None);
    p.epoch(false, Verify::None);
    let built = p.epoch(true, Verify::Right);
    let epoch = built.epoch;
    assert_eq!(b.ack_log().last().map(|a| a.0), Some(epoch));
}

/// A second primary, while a session runs, is answered Refuse (over its own Noise
/// channel) naming the session; the first goes on.
#[test]
fn a_second_primary_is_refused_while_a_session_runs() {
    let dir = scratch("second");
    let b = Backup::start(&dir, &sim_args(&["--detect-timeout", "2s"]));
    let mut p = FakePrimary::connect(&SimFactory::new(), &sim_spec(), b.addr, None);
    p.epoch(false, Verify::None);
    let (_s, _, (ty, body)) = open_session(b.addr, &hello(4 * MIB));
    assert_eq!(ty, FrameType::Refuse as u8);
    let reason = String::from_utf8_lossy(&body).to_string();
    assert!(
        reason.starts_with("another primary (127.0.0.1:")
            && reason.ends_with(") is already connected; this backup serves one session"),
        "{reason}"
    );
    let built = p.epoch(true, Verify::Right);
    let epoch = built.epoch;
    assert_eq!(b.ack_log().last().map(|a| a.0), Some(epoch));
    assert!(b.event("primary_lost").is_none());
}

/// A Hello announcing more memory than --max-memory is refused, naming both.
#[test]
fn a_hello_above_max_memory_is_refused() {
    let dir = scratch("max-memory");
    let _b = Backup::start(&dir, &sim_args(&["--max-memory", "4M"]));
    let (_s, _, (ty, body)) = open_session(_b.addr, &hello(1 << 40));
    assert_eq!(ty, FrameType::Refuse as u8);
    assert_eq!(
        String::from_utf8_lossy(&body),
        "guest memory 1099511627776 exceeds this backup's --max-memory 4194304"
    );
}

/// `--insecure`: plain TCP, with the warning; a keyed primary's Noise message is refused
/// as a bad frame.
#[test]
fn insecure_backup_speaks_plain_tcp_and_warns() {
    let dir = scratch("insecure");
    let mut b = Backup::start(
        &dir,
        &sim_args(&["--insecure", "--detect-timeout", "200ms"]),
    );
    let (s, (ty, body)) = open_session_plain(b.addr, &hello(4 * MIB));
    assert_eq!(
        ty,
        FrameType::Welcome as u8,
        "{}",
        String::from_utf8_lossy(&body)
    );
    drop(s);
    assert_eq!(b.wait().code(), Some(2));
    assert!(
        b.stderr()
            .contains("replication is NOT encrypted or authenticated"),
        "{}",
        b.stderr()
    );
}

/// A primary whose guest outlives it (Xen) ends with a stand-down: the backup keeps its
/// commit and exits 0 without taking over, even though the connection then closes.
#[test]
fn a_stand_down_ends_the_session_without_a_takeover() {
    let dir = scratch("stand-down");
    let mut b = Backup::start(&dir, &sim_args(&["--detect-timeout", "150ms"]));
    let mut p = FakePrimary::connect(&SimFactory::new(), &sim_spec(), b.addr, None);
    p.epoch(false, Verify::None);
    let mut last = 0;
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(15));
        last = p.epoch(true, Verify::Right).epoch;
    }
    let mut bye = Vec::new();
    ha_wire::session::put_stand_down(&mut bye, "protection stopped on request");
    p.send(&bye);
    let _ = p.stream.get_ref().shutdown(std::net::Shutdown::Both);
    let status = b.wait();
    assert_eq!(status.code(), Some(0), "stderr:\n{}", b.stderr());
    let stood = b.event("primary_stood_down").expect("primary_stood_down");
    assert_eq!(stood["last_epoch"], last, "{stood}");
    assert_eq!(stood["reason"], "protection stopped on request", "{stood}");
    assert!(b.event("active").is_none(), "no takeover: {:?}", b.events());
    assert!(b.event("primary_lost").is_none(), "{:?}", b.events());
    assert!(b.stderr().contains("not taking over"), "{}", b.stderr());
}

/// A sim guest behind a backend that hides its capabilities: no output channel, no status
/// probe (as a Xen Linux guest has none).
struct Opaque(SimFactory);

struct Hidden(Box<dyn ha_guest::domain::Domain>);

impl ha_guest::domain::Domain for Hidden {
    fn memory_size(&self) -> u64 {
        self.0.memory_size()
    }
    fn read_memory(&self, gpa: u64, buf: &mut [u8]) -> Result<(), DomainError> {
        self.0.read_memory(gpa, buf)
    }
    fn pause(&mut self) -> Result<(), DomainError> {
        self.0.pause()
    }
    fn resume(&mut self) -> Result<(), DomainError> {
        self.0.resume()
    }
    fn is_paused(&self) -> bool {
        self.0.is_paused()
    }
    fn harvest_dirty(
        &mut self,
        dirty: &mut ha_codec::bitmap::PageBitmap,
    ) -> Result<(), DomainError> {
        self.0.harvest_dirty(dirty)
    }
    fn save_state(&mut self) -> Result<Vec<u8>, DomainError> {
        self.0.save_state()
    }
    fn check_health(&self) -> Result<(), DomainError> {
        self.0.check_health()
    }
}

impl DomainFactory for Opaque {
    fn name(&self) -> &'static str {
        "sim"
    }
    fn create(
        &self,
        spec: &ha_guest::domain::GuestSpec,
    ) -> Result<Box<dyn ha_guest::domain::Domain>, DomainError> {
        Ok(Box::new(Hidden(self.0.create(spec)?)))
    }
    fn restore(
        &self,
        image: &[u8],
        state: &[u8],
        devices: &ha_guest::domain::Devices,
    ) -> Result<Box<dyn ha_guest::domain::Domain>, DomainError> {
        Ok(Box::new(Hidden(self.0.restore(image, state, devices)?)))
    }
}

/// The backup learns a guest's status and output only through the restored domain's
/// capabilities: the same checkpoint restored on the sim re-releases its ring and reports
/// its status; restored without an output channel or a status probe, nothing is
/// re-released and no status is invented from what memory holds at the built-in guests'
/// addresses.
#[test]
fn a_guest_without_capabilities_gets_no_rerelease_and_no_invented_status() {
    use ha_backup::activate::activate;
    use ha_backup::commit::Resumable;
    use ha_guest::image::GuestImage;
    let f = SimFactory::new();
    let mut d = f.create(&sim_spec()).expect("create");
    d.resume().expect("resume");
    let end = Instant::now() + DEADLINE;
    while d.status().expect("status").out_head < 5 {
        assert!(Instant::now() < end, "no output");
        std::thread::sleep(Duration::from_millis(5));
    }
    d.pause().expect("pause");
    let state = d.save_state().expect("save");
    let checkpoint = || {
        let mut image =
            GuestImage::new(usize::try_from(d.memory_size()).expect("size")).expect("image");
        d.read_memory(0, image.as_mut_slice()).expect("read");
        Resumable {
            image,
            state: state.clone(),
            epoch: 9,
        }
    };
    let net = Default::default();
    let mut full = activate(
        &f,
        checkpoint(),
        &Default::default(),
        None,
        &net,
        Instant::now(),
    )
    .expect("activate on the sim");
    assert!(full.rereleased >= 5, "{full:?}");
    let st = full.resumed_from.expect("the sim reports its status");
    assert!(st.out_head >= 5, "{st:?}");
    assert!(full.status().expect("status").is_some());
    full.pump(&mut Vec::new()).expect("pump");

    let mut opaque = activate(
        &Opaque(SimFactory::new()),
        checkpoint(),
        &Default::default(),
        None,
        &net,
        Instant::now(),
    )
    .expect("activate");
    assert_eq!(opaque.rereleased, 0, "{opaque:?}");
    assert!(opaque.resumed_from.is_none(), "{opaque:?}");
    assert!(opaque.status().expect("status").is_none());
    let mut buf = Vec::new();
    opaque.pump(&mut buf).expect("pump");
    assert!(buf.is_empty() && opaque.released == 0, "{opaque:?}");
}
