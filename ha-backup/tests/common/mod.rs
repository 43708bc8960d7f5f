//! Test helpers: a tiny fake primary that follows docs/PROTOCOL.md over a real guest, and a
//! handle on the `ha-backup` binary run as a separate process. The backup runs with a
//! pair key ([`test_key`], written to its scratch directory) unless a test gives
//! `--insecure`; the fake primary speaks through the Noise channel.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ha_codec::PAGE_SIZE;
use ha_codec::bitmap::PageBitmap;
use ha_codec::block::BlockSize;
use ha_codec::cache::PageCache;
use ha_codec::codec::{Batch, CodecConfig, EncodedBatch, Mode, PageEncoder};
use ha_guest::backend::BackendKind;
use ha_guest::domain::{Domain, DomainFactory, GuestSpec};
use ha_wire::frame::{FrameType, split_frame};
use ha_wire::output::{OutputSink, Source, read_records};
use ha_wire::secure::{self, Deadline, PairKey, SecureStream};
use ha_wire::session::{self, Hello, SESSION_VERSION};
use ha_wire::stream::{EpochHeader, EpochWriter};
use ha_workloads::guest_abi::{GuestParams, GuestStatus, HEAP_GPA, OutputRecord, Workload};

pub const MIB: u64 = 1 << 20;
/// Every loop in these tests gives up after this long.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A small sim guest: kv over 1 MiB, paced, with output.
pub fn sim_spec() -> GuestSpec {
    GuestSpec {
        memory_size: 4 * MIB,
        params: GuestParams {
            workload: Workload::Kv,
            seed: 7,
            heap_gpa: HEAP_GPA,
            heap_size: MIB,
            rate: 4000,
            tsc_khz: 0,
            output_every: 20,
            doorbell_every: 8,
            disk_size: 0,
        },
        devices: Default::default(),
    }
}

/// The session parameters matching `memory_size` with the backup's defaults and
/// `--guest sim` (how these tests run it).
pub fn hello(memory_size: u64) -> Hello {
    Hello {
        version: SESSION_VERSION,
        memory_size,
        page_size: PAGE_SIZE as u32,
        block_size: BlockSize::DEFAULT,
        mode: Mode::Fgbi,
        backend: BackendKind::Sim,
        layout: BackendKind::Sim.guest_layout(),
        disk_size: 0,
    }
}

/// The pair key of these tests' backups and fake primaries.
pub fn test_key() -> PairKey {
    PairKey::from_bytes(*b"castor ha-backup tests pair key!")
}

/// The fake primary's connection: the Noise channel over TCP.
pub type Link = SecureStream<TcpStream>;

/// Read one frame (type, body) from a stream with a short read timeout, within `DEADLINE`.
pub fn read_frame<S: Read>(s: &mut S, buf: &mut Vec<u8>) -> std::io::Result<(u8, Vec<u8>)> {
    let end = Instant::now() + DEADLINE;
    loop {
        if let Some((ty, body, n)) = split_frame(buf).map_err(std::io::Error::other)? {
            let out = (ty, body.to_vec());
            buf.drain(..n);
            return Ok(out);
        }
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if Instant::now() > end {
                    return Err(std::io::ErrorKind::TimedOut.into());
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// Connect, run the Noise handshake with [`test_key`], and send a Hello; return the
/// channel and the backup's answer.
pub fn open_session(addr: SocketAddr, h: &Hello) -> (Link, Vec<u8>, (u8, Vec<u8>)) {
    let mut s = TcpStream::connect(addr).expect("connect to the backup");
    s.set_read_timeout(Some(Duration::from_millis(50)))
        .expect("read timeout");
    let t = secure::initiate(&mut s, &test_key(), &Deadline::handshake()).expect("noise");
    let mut s = t.stream(s);
    let mut out = Vec::new();
    h.put(&mut out);
    s.write_all(&out).expect("send hello");
    let mut buf = Vec::new();
    let ans = read_frame(&mut s, &mut buf).expect("answer to hello");
    (s, buf, ans)
}

/// [`open_session`] without encryption (a backup run with `--insecure`).
pub fn open_session_plain(addr: SocketAddr, h: &Hello) -> (TcpStream, (u8, Vec<u8>)) {
    let mut s = TcpStream::connect(addr).expect("connect to the backup");
    s.set_read_timeout(Some(Duration::from_millis(50)))
        .expect("read timeout");
    let mut out = Vec::new();
    h.put(&mut out);
    s.write_all(&out).expect("send hello");
    let mut buf = Vec::new();
    let ans = read_frame(&mut s, &mut buf).expect("answer to hello");
    (s, ans)
}

/// Wait until the peer closes `s` (EOF or reset) within `DEADLINE`; the bytes it sent.
pub fn wait_closed(s: &mut TcpStream) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_millis(50)))
        .expect("read timeout");
    let end = Instant::now() + DEADLINE;
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                assert!(
                    Instant::now() < end,
                    "the backup never closed the connection"
                );
            }
            Err(_) => return got,
        }
    }
}

/// One epoch as the fake primary built it.
#[derive(Debug)]
pub struct Built {
    pub epoch: u64,
    pub bytes: Vec<u8>,
    /// Guest memory at the pause (what the committed image must equal).
    pub memory: Vec<u8>,
    /// The guest's status at the pause.
    pub status: GuestStatus,
    pub checkpoint: bool,
}

/// Verify frame choices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verify {
    None,
    Right,
    Wrong,
}

/// A guest and an encoder producing epochs exactly as PROTOCOL.md says: pause, harvest
/// dirty, copy dirty pages, save state, drain output, resume; encode; frames.
pub struct Epochs {
    pub guest: Box<dyn Domain>,
    enc: PageEncoder,
    dirty: PageBitmap,
    pub epoch: u64,
    /// Output drained at checkpoints, not yet released.
    pub held: Vec<(u64, Vec<OutputRecord>)>,
    /// Send this instead of the saved state (to test a bad state blob).
    pub state_override: Option<Vec<u8>>,
}

impl Epochs {
    pub fn new(factory: &dyn DomainFactory, spec: &GuestSpec) -> Self {
        let mut guest = factory.create(spec).expect("create the primary's guest");
        guest.resume().expect("start the primary's guest");
        let pages = (spec.memory_size / PAGE_SIZE as u64) as usize;
        let cfg = CodecConfig::default();
        Self {
            guest,
            enc: PageEncoder::new(cfg, Some(PageCache::shadow(pages)), None).expect("encoder"),
            dirty: PageBitmap::new(pages),
            epoch: 0,
            held: Vec::new(),
            state_override: None,
        }
    }

    /// Build the next epoch (a checkpoint if `checkpoint`).
    pub fn next(&mut self, checkpoint: bool, verify: Verify) -> Built {
        self.epoch += 1;
        let g = &mut self.guest;
        g.pause().expect("pause");
        self.dirty.clear();
        g.harvest_dirty(&mut self.dirty).expect("harvest");
        let idx: Vec<u64> = self.dirty.iter_set().map(|p| p as u64).collect();
        let mut data = vec![0u8; idx.len() * PAGE_SIZE];
        for (i, &p) in idx.iter().enumerate() {
            g.read_memory(
                p * PAGE_SIZE as u64,
                &mut data[i * PAGE_SIZE..][..PAGE_SIZE],
            )
            .expect("copy page");
        }
        let mut memory = vec![0u8; g.memory_size() as usize];
        g.read_memory(0, &mut memory).expect("snapshot");
        let status = g.status().expect("status");
        let saved = checkpoint.then(|| g.save_state().expect("save state"));
        let state = match (&self.state_override, saved) {
            (Some(o), Some(_)) => Some(o.clone()),
            (_, saved) => saved,
        };
        if checkpoint {
            let mut out = Vec::new();
            g.drain_output(&mut out).expect("drain output");
            self.held.push((self.epoch, out));
        }
        g.resume().expect("resume");

        let mut batch = EncodedBatch::default();
        self.enc.encode_batch(
            Batch {
                pages: &idx,
                data: &data,
            },
            &mut batch,
        );
        let cfg = *self.enc.config();
        let mut bytes = Vec::new();
        let mut w = EpochWriter::begin(
            &mut bytes,
            EpochHeader {
                epoch: self.epoch,
                mode: cfg.mode,
                block_size: cfg.block_size,
                records: EpochWriter::records_in(&batch),
            },
        );
        w.pages(&mut bytes, &batch);
        if let Some(s) = &state {
            w.state(&mut bytes, s);
        }
        match verify {
            Verify::None => {}
            Verify::Right => w.verify(&mut bytes, blake3::hash(&memory).as_bytes()),
            Verify::Wrong => w.verify(&mut bytes, &[0xAB; 32]),
        }
        w.finish(&mut bytes).expect("trailer");
        Built {
            epoch: self.epoch,
            bytes,
            memory,
            status,
            checkpoint,
        }
    }

    /// Output held for epochs up to `acked`, removed from the hold.
    pub fn take_released(&mut self, acked: u64) -> Vec<OutputRecord> {
        let mut out = Vec::new();
        self.held.retain_mut(|(e, recs)| {
            if *e <= acked {
                out.append(recs);
                false
            } else {
                true
            }
        });
        out
    }
}

/// Split an epoch's bytes into its frames.
pub fn frames(bytes: &[u8]) -> Vec<std::ops::Range<usize>> {
    let mut v = Vec::new();
    let mut at = 0;
    while let Ok(Some((_, _, n))) = split_frame(&bytes[at..]) {
        v.push(at..at + n);
        at += n;
    }
    v
}

/// A fake primary: a session plus an epoch source, releasing output on acks.
pub struct FakePrimary {
    pub epochs: Epochs,
    pub stream: Link,
    buf: Vec<u8>,
    pub sink: Option<OutputSink>,
    pub last_built: Option<Built>,
}

impl FakePrimary {
    pub fn connect(
        factory: &dyn DomainFactory,
        spec: &GuestSpec,
        addr: SocketAddr,
        sink: Option<SocketAddr>,
    ) -> Self {
        let backend: BackendKind = factory.name().parse().expect("a backend's name");
        let h = Hello {
            backend,
            layout: backend.guest_layout(),
            disk_size: 0,
            ..hello(spec.memory_size)
        };
        let (stream, buf, (ty, body)) = open_session(addr, &h);
        assert_eq!(
            ty,
            FrameType::Welcome as u8,
            "expected Welcome, got {ty}: {:?}",
            String::from_utf8_lossy(&body)
        );
        assert_eq!(session::Welcome::parse(&body).map(|w| w.next_epoch), Ok(1));
        Self {
            epochs: Epochs::new(factory, spec),
            stream,
            buf,
            sink: sink.map(|a| OutputSink::connect(a, Source::Primary).expect("primary sink")),
            last_built: None,
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send to backup");
    }

    /// Wait for the next Ack.
    pub fn ack(&mut self) -> std::io::Result<u64> {
        let (ty, body) = read_frame(&mut self.stream, &mut self.buf)?;
        assert_eq!(ty, FrameType::Ack as u8, "expected an Ack");
        Ok(session::parse_u64(&body, "ack").expect("ack body"))
    }

    /// Build, send and get the Ack of one epoch; release held output; return the epoch.
    pub fn epoch(&mut self, checkpoint: bool, verify: Verify) -> &Built {
        let b = self.epochs.next(checkpoint, verify);
        self.send(&b.bytes);
        let a = self.ack().expect("ack");
        assert_eq!(a, b.epoch);
        let recs = self.epochs.take_released(a);
        if let Some(s) = &mut self.sink {
            s.release(&recs).expect("release");
        }
        self.last_built.insert(b)
    }
}

/// A test's scratch directory.
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ha-backup-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// The backup binary, run as a child process (killed on drop).
pub struct Backup {
    pub child: Child,
    pub addr: SocketAddr,
    pub dir: PathBuf,
}

impl Backup {
    /// Start `ha-backup` with `--listen 127.0.0.1:0`, files in `dir`, the pair key
    /// [`test_key`] (unless `args` has `--insecure`), and `args`.
    pub fn start(dir: &Path, args: &[&str]) -> Self {
        let port_file = dir.join("port");
        let key_file = dir.join("pair.key");
        let mut key_args = Vec::new();
        if !args.contains(&"--insecure") {
            if !key_file.exists() {
                test_key().write_new(&key_file).expect("write the pair key");
            }
            key_args = vec!["--key".to_string(), key_file.display().to_string()];
        }
        let stderr = std::fs::File::create(dir.join("stderr")).expect("stderr file");
        let child = Command::new(env!("CARGO_BIN_EXE_ha-backup"))
            .args(["--listen", "127.0.0.1:0"])
            .arg("--port-file")
            .arg(&port_file)
            .arg("--events")
            .arg(dir.join("events.jsonl"))
            .arg("--ack-log")
            .arg(dir.join("ack.log"))
            .arg("--stats")
            .arg(dir.join("stats.csv"))
            .args(&key_args)
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn ha-backup");
        let end = Instant::now() + DEADLINE;
        let addr = loop {
            if let Ok(s) = std::fs::read_to_string(&port_file)
                && let Ok(a) = s.trim().parse()
            {
                break a;
            }
            assert!(Instant::now() < end, "backup never wrote its port file");
            std::thread::sleep(Duration::from_millis(5));
        };
        Self {
            child,
            addr,
            dir: dir.to_path_buf(),
        }
    }

    /// Wait (bounded) for the backup to exit.
    pub fn wait(&mut self) -> ExitStatus {
        let end = Instant::now() + DEADLINE;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return s;
            }
            assert!(
                Instant::now() < end,
                "backup did not exit; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default()
    }

    pub fn events(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.join("events.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("event line is JSON"))
            .collect()
    }

    /// The events named `name`, once there are at least `n` of them (waiting at most
    /// [`DEADLINE`]): handshakes run on their own threads, and the backup records a
    /// refusal just after the peer got its answer.
    pub fn events_named(&self, name: &str, n: usize) -> Vec<serde_json::Value> {
        let end = Instant::now() + DEADLINE;
        loop {
            let found: Vec<_> = self
                .events()
                .into_iter()
                .filter(|e| e["event"] == name)
                .collect();
            if found.len() >= n || Instant::now() > end {
                return found;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn event(&self, name: &str) -> Option<serde_json::Value> {
        self.events().into_iter().find(|e| e["event"] == name)
    }

    pub fn ack_log(&self) -> Vec<(u64, u64)> {
        ha_wire::output::read_ack_log(&self.dir.join("ack.log"))
    }
}

impl Drop for Backup {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // Keep the files of a failed test for a look; tidy up otherwise.
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Records received on one connection to the world.
pub type Conn = Arc<Mutex<Vec<(Source, OutputRecord)>>>;

/// A TCP listener standing in for the world: every record from every connection, in
/// arrival order per connection, connections in accept order.
pub struct World {
    pub addr: SocketAddr,
    pub conns: Arc<Mutex<Vec<Conn>>>,
}

impl World {
    pub fn start() -> Self {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind world");
        let addr = l.local_addr().expect("world addr");
        let conns: Arc<Mutex<Vec<Conn>>> = Arc::default();
        let c2 = Arc::clone(&conns);
        std::thread::spawn(move || {
            // Two connections at most: the primary's and the backup's.
            for s in l.incoming().take(2) {
                let Ok(s) = s else { return };
                let recs: Conn = Arc::default();
                c2.lock().expect("lock").push(Arc::clone(&recs));
                std::thread::spawn(move || {
                    let _ = read_records(s, |src, r| recs.lock().expect("lock").push((src, r)));
                });
            }
        });
        Self { addr, conns }
    }

    /// Everything received so far, connection after connection.
    pub fn records(&self) -> Vec<(Source, OutputRecord)> {
        let conns = self.conns.lock().expect("lock");
        conns
            .iter()
            .flat_map(|c| c.lock().expect("lock").clone())
            .collect()
    }
}
