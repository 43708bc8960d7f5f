//! The primary engine against a minimal in-test backup built on `Staging`: every
//! checkpoint's whole-memory digest must match the backup's committed image, and no output
//! may reach the world before its checkpoint is acknowledged.

use ha_codec::PAGE_SIZE;
use ha_codec::bitmap::PageBitmap;
use ha_codec::block::BlockSize;
use ha_codec::codec::{CodecConfig, GeneralCodec, Mode};
use ha_guest::backend::BackendKind;
use ha_guest::domain::{Domain, DomainError, DomainFactory, GuestSpec};
use ha_primary::cow::CopyPolicy;
use ha_primary::engine::{self, Config};
use ha_primary::hold::PacketHold;
use ha_wire::frame::{FrameType, split_frame};
use ha_wire::output::{OutputChecker, read_records};
use ha_wire::secure::{self, Deadline, PairKey};
use ha_wire::session::{self, Hello};
use ha_wire::stream::Staging;
use ha_workloads::guest_abi::{
    GuestParams, GuestStatus, HEAP_GPA, OutputRecord, STATUS_GPA, Workload,
};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const MEM: u64 = 8 << 20;

/// The pair key of the primary and the in-test backup.
fn pair_key() -> PairKey {
    PairKey::from_bytes([7; 32])
}

#[derive(Debug, Default)]
struct BackupReport {
    checkpoints: u64,
    /// Bytes of each committed checkpoint epoch's frames, in order.
    checkpoint_bytes: Vec<u64>,
    precopy: u64,
    verified: u64,
    errors: Vec<String>,
    /// The reason of a stand-down frame, if the primary sent one.
    stood_down: Option<String>,
    /// The backend the primary's Hello announced.
    hello_backend: Option<BackendKind>,
}

/// Accept one primary, stage and commit epochs, verify digests, ack; publish the committed
/// out_head before each ack.
fn fake_backup(
    l: TcpListener,
    mode: Mode,
    committed: Arc<AtomicU64>,
    report: Arc<Mutex<BackupReport>>,
) {
    let Ok((mut s, _)) = l.accept() else { return };
    // The link is encrypted: the Noise handshake first, then frames as before.
    let Ok(t) = secure::respond(&mut s, &pair_key(), &Deadline::handshake()) else {
        report.lock().unwrap().errors.push("noise handshake".into());
        return;
    };
    let mut s = t.stream(s);
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 1 << 16];
    let mut image = vec![0u8; MEM as usize];
    let mut staging = Staging::new(mode, BlockSize::DEFAULT, MEM / PAGE_SIZE as u64, 1);
    let mut hello_done = false;
    let mut epoch_bytes = 0u64;
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
                report.lock().unwrap().hello_backend = Some(h.backend);
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
            if ty == FrameType::StandDown as u8 {
                // Like ha-backup: the session ends here, without a takeover.
                report.lock().unwrap().stood_down = Some(String::from_utf8_lossy(body).into());
                return;
            }
            epoch_bytes += len as u64;
            match staging.push(ty, &raw[5..], &raw, &image) {
                Ok(Some(ep)) => {
                    ep.commit(&mut image);
                    let mut r = report.lock().unwrap();
                    if let Err(e) = ep.check_image(&image) {
                        r.errors.push(e.to_string());
                    } else if ep.verify.is_some() {
                        r.verified += 1;
                    }
                    if ep.state.is_some() {
                        r.checkpoints += 1;
                        r.checkpoint_bytes.push(epoch_bytes);
                        let st = GuestStatus::read_page(&image[STATUS_GPA as usize..][..PAGE_SIZE]);
                        committed.store(st.out_head, Ordering::SeqCst);
                    } else {
                        r.precopy += 1;
                    }
                    epoch_bytes = 0;
                    drop(r);
                    let mut out = Vec::new();
                    session::put_ack(&mut out, ep.epoch);
                    if s.write_all(&out).is_err() {
                        return;
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    report.lock().unwrap().errors.push(e.to_string());
                    return;
                }
            }
        }
        buf.drain(..at);
    }
}

fn spec(workload: Workload) -> GuestSpec {
    GuestSpec {
        memory_size: MEM,
        params: GuestParams {
            workload,
            seed: 7,
            heap_gpa: HEAP_GPA,
            heap_size: MEM - HEAP_GPA - (1 << 20),
            rate: 50_000,
            tsc_khz: 0,
            output_every: 16,
            doorbell_every: 64,
            disk_size: 0,
        },
        devices: Default::default(),
    }
}

fn config(backup: std::net::SocketAddr, output: std::net::SocketAddr, mode: Mode) -> Config {
    Config {
        backup,
        codec: CodecConfig {
            mode,
            block_size: BlockSize::DEFAULT,
            general: GeneralCodec::Zlib,
            zlib_level: 1,
        },
        cache_bytes: 4 << 20,
        interval: Duration::from_millis(20),
        pipeline: 2,
        heartbeat: Duration::from_millis(20),
        ack_timeout: Duration::from_secs(5),
        fence: false,
        reprotect: false,
        reprotect_also: Vec::new(),
        verify_every: 1,
        teleport: true,
        precopy_rounds: 3,
        precopy_threshold: 64,
        run_for: Some(Duration::from_millis(800)),
        output: Some(output),
        stats: None,
        events: None,
        key: Some(pair_key()),
        link_rate: None,
        backend: BackendKind::Sim,
        copy: CopyPolicy::Auto,
    }
}

/// Protect a `workload` guest from `factory` in `mode` against the staging backup for
/// `config`'s run, with the world checking output against the backup's commits. Returns the
/// primary's summary, the backup's report, the records released in sequence, and the
/// world's violations.
fn protected_run(
    factory: &dyn DomainFactory,
    mode: Mode,
    workload: Workload,
) -> (engine::Summary, BackupReport, u64, Vec<String>) {
    protected_run_as(factory, mode, workload, false, &|_| {}, &|_, _| Vec::new())
}

/// A guest that says it outlives its VMM (as a Xen domain does) when `.1`, and counts its
/// pauses in `.2`; otherwise `inner`.
struct Outliving(Box<dyn Domain>, bool, Arc<AtomicU64>);

impl Domain for Outliving {
    fn memory_size(&self) -> u64 {
        self.0.memory_size()
    }
    fn read_memory(&self, gpa: u64, buf: &mut [u8]) -> Result<(), DomainError> {
        self.0.read_memory(gpa, buf)
    }
    fn pause(&mut self) -> Result<(), DomainError> {
        self.2.fetch_add(1, Ordering::SeqCst);
        self.0.pause()
    }
    fn resume(&mut self) -> Result<(), DomainError> {
        self.0.resume()
    }
    fn is_paused(&self) -> bool {
        self.0.is_paused()
    }
    fn harvest_dirty(&mut self, dirty: &mut PageBitmap) -> Result<(), DomainError> {
        self.0.harvest_dirty(dirty)
    }
    fn save_state(&mut self) -> Result<Vec<u8>, DomainError> {
        self.0.save_state()
    }
    fn drain_output(&mut self, out: &mut Vec<OutputRecord>) -> Result<(), DomainError> {
        self.0.drain_output(out)
    }
    fn status(&self) -> Result<GuestStatus, DomainError> {
        self.0.status()
    }
    fn check_health(&self) -> Result<(), DomainError> {
        self.0.check_health()
    }
    fn output_channel(&mut self) -> Option<&mut dyn ha_guest::domain::OutputChannel> {
        self.0.output_channel()
    }
    fn status_probe(&self) -> Option<&dyn ha_guest::domain::StatusProbe> {
        self.0.status_probe()
    }
    fn disk(&mut self) -> Option<&mut dyn ha_guest::domain::Disk> {
        self.0.disk()
    }
    fn cow_memory(&mut self) -> Option<&mut dyn ha_guest::cow::CowMemory> {
        self.0.cow_memory()
    }
    fn outlives_vmm(&self) -> bool {
        self.1
    }
}

/// Makes the packet holds of a run from the backup's report and the guest's pause count.
type Plugs<'a> = &'a dyn Fn(Arc<Mutex<BackupReport>>, Arc<AtomicU64>) -> Vec<Box<dyn PacketHold>>;

/// [`protected_run`], the guest outliving its VMM when `outlives`, the engine's
/// configuration changed by `tune`, its packets held by `plugs`.
fn protected_run_as(
    factory: &dyn DomainFactory,
    mode: Mode,
    workload: Workload,
    outlives: bool,
    tune: &dyn Fn(&mut Config),
    plugs: Plugs<'_>,
) -> (engine::Summary, BackupReport, u64, Vec<String>) {
    let bl = TcpListener::bind("127.0.0.1:0").unwrap();
    let ol = TcpListener::bind("127.0.0.1:0").unwrap();
    let (baddr, oaddr) = (bl.local_addr().unwrap(), ol.local_addr().unwrap());
    let committed = Arc::new(AtomicU64::new(0));
    let report = Arc::new(Mutex::new(BackupReport::default()));
    let backup = {
        let (c, r) = (committed.clone(), report.clone());
        std::thread::spawn(move || fake_backup(bl, mode, c, r))
    };
    let consumer = {
        let c = committed.clone();
        std::thread::spawn(move || {
            let (s, _) = ol.accept().unwrap();
            let mut checker = OutputChecker::default();
            let mut violations = Vec::new();
            read_records(s, |src, r| {
                if let Err(v) = checker.check(src, &r, || c.load(Ordering::SeqCst)) {
                    violations.push(v.to_string());
                }
            })
            .unwrap();
            (checker.next_seq(), violations)
        })
    };
    let mut d = factory.create(&spec(workload)).unwrap();
    d.resume().unwrap();
    let pauses = Arc::new(AtomicU64::new(0));
    let mut d: Box<dyn Domain> = Box::new(Outliving(d, outlives, pauses.clone()));
    let kind: BackendKind = factory.name().parse().expect("a backend's name");
    let mut cfg = Config {
        backend: kind,
        ..config(baddr, oaddr, mode)
    };
    tune(&mut cfg);
    let plugs = plugs(report.clone(), pauses);
    let summary = engine::run_with_plugs(&cfg, d.as_mut(), &AtomicBool::new(false), plugs).unwrap();
    drop(d);
    let (released, violations) = consumer.join().unwrap();
    backup.join().unwrap();
    let r = std::mem::take(&mut *report.lock().unwrap());
    assert_eq!(
        r.hello_backend,
        Some(kind),
        "the Hello announces the guest's backend"
    );
    (summary, r, released, violations)
}

#[test]
fn every_checkpoint_matches_and_output_waits_for_its_ack() {
    for (mode, workload) in [
        (Mode::Fgbi, Workload::Web),
        (Mode::Xbzrle, Workload::Kv),
        (Mode::Remus, Workload::Memwrite),
        (Mode::Fgbi, Workload::Npb),
        (Mode::Fgbi, Workload::Idle),
    ] {
        let (summary, r, released, violations) =
            protected_run(&ha_sim::SimFactory::new(), mode, workload);
        assert!(r.errors.is_empty(), "{mode}: {:?}", r.errors);
        assert!(
            r.checkpoints >= 5,
            "{mode}: only {} checkpoints",
            r.checkpoints
        );
        assert!(r.precopy >= 1, "{mode}: no pre-copy epoch");
        assert_eq!(
            r.verified, r.checkpoints,
            "{mode}: every checkpoint carries a digest that matched"
        );
        assert!(violations.is_empty(), "{mode}: {violations:?}");
        assert_eq!(
            r.stood_down, None,
            "{mode}: a KVM or sim guest ends with its VMM"
        );
        assert!(released > 0, "{mode}: no output released");
        assert_eq!(summary.outputs_released, released, "{mode}");
        assert!(
            summary.epochs_committed >= r.checkpoints.saturating_sub(2),
            "{mode}: {summary:?}"
        );
        assert!(!summary.backup_lost);
        // Every acknowledged checkpoint is counted with its bytes (an ack that overtook
        // the encoder's report once left epochs counted as 0 bytes).
        let n = usize::try_from(summary.epochs_committed).unwrap();
        assert_eq!(
            summary.wire_bytes,
            r.checkpoint_bytes[..n].iter().sum::<u64>(),
            "{mode}: the primary's wire bytes are the committed checkpoints' bytes"
        );
    }
}

/// A primary whose guest outlives it (Xen) tells the backup to stand down when it stops,
/// after its last checkpoint; one whose guest ends with it does not (above).
#[test]
fn a_guest_that_outlives_the_primary_ends_with_a_stand_down() {
    let (summary, r, _, violations) = protected_run_as(
        &ha_sim::SimFactory::new(),
        Mode::Fgbi,
        Workload::Web,
        true,
        &|_| {},
        &|_, _| Vec::new(),
    );
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert!(violations.is_empty(), "{violations:?}");
    assert!(r.checkpoints >= 5, "only {} checkpoints", r.checkpoints);
    assert!(!summary.backup_lost);
    assert_eq!(
        r.stood_down.as_deref(),
        Some("protection stopped on request"),
        "{r:?}"
    );
}

/// What a [`CheckedPlug`] saw.
#[derive(Debug, Default)]
struct PlugLog {
    marks: u64,
    released: u64,
    indefinite: u64,
    /// `Some(keep)` once the run finished with it.
    finished: Option<bool>,
    /// Marks released before the backup committed their checkpoint, and marks set while
    /// another waited (the kernel's plug would forget an epoch).
    violations: Vec<String>,
}

/// A packet hold that checks each release against the backup's commits: a mark set in
/// the pause of the guest's k-th checkpoint may be released only once the backup has
/// committed k checkpoints.
#[derive(Debug)]
struct CheckedPlug {
    report: Arc<Mutex<BackupReport>>,
    pauses: Arc<AtomicU64>,
    waiting: Option<u64>,
    log: Arc<Mutex<PlugLog>>,
}

impl PacketHold for CheckedPlug {
    fn iface(&self) -> &str {
        "vif-test"
    }
    fn buffer(&mut self) -> Result<(), ha_netbuf::NetbufError> {
        let k = self.pauses.load(Ordering::SeqCst);
        let mut log = self.log.lock().unwrap();
        if let Some(w) = self.waiting {
            log.violations.push(format!(
                "mark at checkpoint {k} while checkpoint {w}'s waits"
            ));
        }
        self.waiting = Some(k);
        log.marks += 1;
        Ok(())
    }
    fn release_one(&mut self) -> Result<(), ha_netbuf::NetbufError> {
        let committed = self.report.lock().unwrap().checkpoints;
        let mut log = self.log.lock().unwrap();
        match self.waiting.take() {
            Some(k) if k > committed => log.violations.push(format!(
                "checkpoint {k}'s packets released with {committed} committed"
            )),
            Some(_) => {}
            None => log.violations.push("a release without a mark".into()),
        }
        log.released += 1;
        Ok(())
    }
    fn release_indefinite(&mut self) -> Result<(), ha_netbuf::NetbufError> {
        self.waiting = None;
        self.log.lock().unwrap().indefinite += 1;
        Ok(())
    }
    fn finish(self: Box<Self>, keep: bool) {
        self.log.lock().unwrap().finished = Some(keep);
    }
}

/// The network buffer's marks follow the checkpoints and its releases the acks: every
/// mark is set in a checkpoint's pause and released only once the backup committed that
/// checkpoint; with one checkpoint in flight each checkpoint has its own mark. A guest
/// that outlives the primary ends with a stand-down, then its plug is opened and removed.
#[test]
fn network_buffer_marks_follow_checkpoints_and_acks() {
    for pipeline in [1, 2] {
        let log = Arc::new(Mutex::new(PlugLog::default()));
        let (summary, r, _, violations) = protected_run_as(
            &ha_sim::SimFactory::new(),
            Mode::Fgbi,
            Workload::Web,
            true,
            &|c| c.pipeline = pipeline,
            &|report, pauses| {
                vec![Box::new(CheckedPlug {
                    report,
                    pauses,
                    waiting: None,
                    log: log.clone(),
                })]
            },
        );
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert!(violations.is_empty(), "{violations:?}");
        let log = std::mem::take(&mut *log.lock().unwrap());
        assert!(
            log.violations.is_empty(),
            "pipeline {pipeline}: {:?}",
            log.violations
        );
        assert!(log.marks >= 5, "pipeline {pipeline}: {log:?}");
        assert!(
            log.released + 1 >= log.marks,
            "pipeline {pipeline}: {log:?}"
        );
        assert_eq!(summary.net_marks, log.marks);
        // Every checkpoint taken marked or folded; the backup committed all but at most the
        // last (the stand-down may overtake its ack).
        let taken = summary.net_marks + summary.net_folded;
        assert!(
            (r.checkpoints..=r.checkpoints + 1).contains(&taken),
            "{taken} checkpoints marked or folded, {} committed",
            r.checkpoints
        );
        if pipeline == 1 {
            assert_eq!(
                summary.net_folded, 0,
                "one mark per checkpoint: {summary:?}"
            );
        }
        assert_eq!((log.indefinite, log.finished), (1, Some(false)), "{log:?}");
    }
}

#[test]
fn backup_lost_continues_or_fences() {
    for fence in [false, true] {
        let bl = TcpListener::bind("127.0.0.1:0").unwrap();
        let ol = TcpListener::bind("127.0.0.1:0").unwrap();
        let (baddr, oaddr) = (bl.local_addr().unwrap(), ol.local_addr().unwrap());
        // A backup that welcomes, acks nothing, and hangs up after 300 ms.
        let backup = std::thread::spawn(move || {
            let (mut s, _) = bl.accept().unwrap();
            let t = secure::respond(&mut s, &pair_key(), &Deadline::handshake()).unwrap();
            let mut s = t.stream(s);
            let mut out = Vec::new();
            session::Welcome {
                next_epoch: 1,
                detect_timeout: Duration::from_secs(1),
                holds_image: false,
            }
            .put(&mut out);
            // A Hello frame: 5 bytes of frame header, 28 of body.
            let mut hello = [0u8; 33];
            s.read_exact(&mut hello).unwrap();
            s.write_all(&out).unwrap();
            let t = std::time::Instant::now();
            let mut sink = [0u8; 1 << 16];
            s.get_ref()
                .set_read_timeout(Some(Duration::from_millis(20)))
                .unwrap();
            while t.elapsed() < Duration::from_millis(300) {
                let _ = s.read(&mut sink);
            }
            drop(s);
        });
        let consumer = std::thread::spawn(move || {
            let (s, _) = ol.accept().unwrap();
            let mut n = 0u64;
            read_records(s, |_, _| n += 1).unwrap();
            n
        });
        let mut cfg = config(baddr, oaddr, Mode::Fgbi);
        cfg.fence = fence;
        cfg.verify_every = 0;
        let dir = std::env::temp_dir().join(format!(
            "castor-primary-lost-{}-{fence}",
            std::process::id()
        ));
        cfg.events = Some(dir.with_extension("events"));
        let mut d = ha_sim::SimFactory::new()
            .create(&spec(Workload::Kv))
            .unwrap();
        d.resume().unwrap();
        // Its vif's packets: a plug that no ack may open.
        let log = Arc::new(Mutex::new(PlugLog::default()));
        let plug = CheckedPlug {
            report: Arc::default(),
            pauses: Arc::default(),
            waiting: None,
            log: log.clone(),
        };
        let summary = engine::run_with_plugs(
            &cfg,
            d.as_mut(),
            &AtomicBool::new(false),
            vec![Box::new(plug)],
        )
        .unwrap();
        let plug = std::mem::take(&mut *log.lock().unwrap());
        assert!(plug.violations.is_empty(), "{fence}: {:?}", plug.violations);
        assert_eq!(plug.released, 0, "{fence}: a mark released without an ack");
        // The default policy opens the plug for good once unprotected; --fence keeps it
        // closed. The sim guest ends with the primary: removed at the end either way.
        assert_eq!(plug.indefinite, u64::from(!fence), "{fence}: {plug:?}");
        assert_eq!(plug.finished, Some(false), "{fence}: {plug:?}");
        let paused = d.is_paused();
        let progress_at_end = d.status().unwrap().progress;
        std::thread::sleep(Duration::from_millis(100));
        let progress_later = d.status().unwrap().progress;
        drop(d);
        backup.join().unwrap();
        let released = consumer.join().unwrap();
        let events = std::fs::read_to_string(dir.with_extension("events")).unwrap();
        let _ = std::fs::remove_file(dir.with_extension("events"));
        assert!(summary.backup_lost);
        assert_eq!(summary.epochs_committed, 0);
        if fence {
            assert!(paused, "fenced guest must be paused");
            assert_eq!(
                progress_at_end, progress_later,
                "fenced guest made progress"
            );
            assert_eq!(released, 0, "a fenced primary released uncommitted output");
            assert!(events.contains("\"policy\":\"fence\""), "{events}");
        } else {
            assert!(!paused);
            assert!(released > 0, "unprotected primary releases its output");
            assert!(events.contains("\"policy\":\"continue\""), "{events}");
        }
        let _ = TcpStream::connect(baddr);
    }
}

/// Whether /dev/kvm can be used; without it a KVM test skips with a message, or fails
/// under `CASTOR_REQUIRE_KVM=1`.
fn kvm_available() -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            assert!(
                std::env::var("CASTOR_REQUIRE_KVM").as_deref() != Ok("1"),
                "CASTOR_REQUIRE_KVM=1 but /dev/kvm: {e}"
            );
            eprintln!("skipped: /dev/kvm cannot be opened ({e})");
            false
        }
    }
}

/// The same end-to-end check with a real KVM guest (its kernel dirty log drives the epochs).
#[test]
fn kvm_guest_checkpoints_match_byte_for_byte() {
    if !kvm_available() {
        return;
    }
    for (mode, workload) in [(Mode::Fgbi, Workload::Web), (Mode::Xbzrle, Workload::Kv)] {
        let (summary, r, released, violations) =
            protected_run(&ha_kvm::KvmFactory::new(), mode, workload);
        assert!(r.errors.is_empty(), "{mode}: {:?}", r.errors);
        assert!(
            r.checkpoints >= 5,
            "{mode}: only {} checkpoints",
            r.checkpoints
        );
        assert_eq!(r.verified, r.checkpoints, "{mode}");
        assert!(violations.is_empty(), "{mode}: {violations:?}");
        assert!(
            released > 0 && summary.outputs_released == released,
            "{mode}"
        );
    }
}

/// Copy-on-write checkpoints of a real KVM guest that keeps writing while each checkpoint's
/// pages are copied behind it: over many checkpoints, every committed image equals the
/// guest's memory at its checkpoint (the digest taken in the pause, verified by the
/// backup at every checkpoint), and the guest did write pages before their copy.
#[test]
fn kvm_copy_on_write_checkpoints_equal_memory_at_each_checkpoint() {
    if !kvm_available() {
        return;
    }
    for (mode, workload) in [(Mode::Fgbi, Workload::Npb), (Mode::Xbzrle, Workload::Kv)] {
        let (summary, r, released, violations) = protected_run_as(
            &ha_kvm::KvmFactory::new(),
            mode,
            workload,
            false,
            &|c| {
                c.copy = CopyPolicy::Cow;
                c.verify_every = 1;
                c.run_for = Some(Duration::from_secs(3));
            },
            &|_, _| Vec::new(),
        );
        eprintln!(
            "{workload:?}: {} checkpoints committed, {} copy-on-write, {} pages copied in \
             write faults",
            r.checkpoints, summary.cow_copies, summary.cow_faulted
        );
        assert!(r.errors.is_empty(), "{workload:?}: {:?}", r.errors);
        assert!(
            r.checkpoints >= 40,
            "{workload:?}: only {} checkpoints",
            r.checkpoints
        );
        assert_eq!(
            r.verified, r.checkpoints,
            "{workload:?}: every one verified"
        );
        assert_eq!(summary.pause_copies, 0, "{workload:?}");
        assert!(summary.cow_copies >= r.checkpoints, "{workload:?}");
        assert!(
            summary.cow_faulted > 0,
            "{workload:?}: the guest never wrote a page before its copy"
        );
        assert!(violations.is_empty(), "{workload:?}: {violations:?}");
        assert!(released > 0, "{workload:?}");
    }
}
