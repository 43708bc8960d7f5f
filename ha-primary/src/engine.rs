//! The epoch engine: initial synchronization, then every interval a checkpoint (pause,
//! harvest, copy, save, resume), encoded and sent while the next epoch runs; output held
//! until the checkpoint's ack; and what to do when the backup is lost.
//!
//! A lost backup ends the session for good: the link is closed and heartbeats stop, so a
//! backup that is only slow or was stopped learns it at once. Under `--fence` the guest
//! pauses here and the closed link lets the backup take over. Under the default policy the
//! primary sends a stand-down first (the backup then never takes over) and releases held
//! output only once the stand-down is on the wire.
//!
//! A primary that stood still (see [`crate::stall`]) for long enough that the backup may
//! have declared it lost releases nothing until the backup acknowledges an epoch taken
//! after the stall; if the backup is lost instead, the primary assumes it took over and
//! fences under either policy.

use crate::cow::{Chooser, CopyPolicy};
use crate::encode::{self, Encoded, Job};
use crate::harvest::{self, Pages};
use crate::hold::{HeldOutput, HoldError, PacketHold};
use crate::link::{self, Control, LinkEvent};
use crate::metrics::Metrics;
use crate::report::{EpochRow, StatsCsv};
use crate::stall::StallWatch;
use crossbeam_channel::{Receiver, Sender, bounded, unbounded};
use ha_codec::PAGE_SIZE;
use ha_codec::bitmap::PageBitmap;
use ha_codec::block::is_zero;
use ha_codec::cache::PageCache;
use ha_codec::codec::{CodecConfig, ConfigError, Encoding, Mode, PageEncoder};
use ha_codec::hashes::BlockHashes;
use ha_daemon::events::{EventError, EventLog};
use ha_guest::domain::{Domain, DomainError};
use ha_wire::output::{OutputError, OutputSink, Source};
use ha_wire::session::{Hello, SESSION_VERSION};
use ha_workloads::guest_abi::page_count;
use serde_json::json;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Pages per pre-copy epoch.
const PRECOPY_CHUNK: usize = 8192;

/// Errors that stop the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The guest backend failed.
    #[error("guest")]
    Domain(#[from] DomainError),
    /// The link to the backup could not be set up.
    #[error("link")]
    Link(#[from] link::LinkError),
    /// The codec configuration is invalid.
    #[error("codec configuration")]
    Codec(#[from] ConfigError),
    /// The output sink cannot be reached.
    #[error("releasing output")]
    Output(#[from] OutputError),
    /// Releasing or marking held output failed.
    #[error("holding output")]
    Hold(#[from] HoldError),
    /// The event log cannot be opened (or another running process holds it).
    #[error(transparent)]
    Events(#[from] EventError),
    /// A report file cannot be written.
    #[error("cannot write {path}")]
    Report {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The page cache size is invalid.
    #[error("page cache")]
    Cache(#[from] ha_codec::cache::CacheError),
    /// The encoder thread is gone.
    #[error("the encoder thread stopped")]
    EncoderGone,
    /// The stall watch thread cannot start.
    #[error("cannot start the stall watch thread")]
    Watch(#[source] std::io::Error),
    /// The thread reaching for a backup again (`--reprotect`) cannot start.
    #[error("cannot start the re-protection thread")]
    Reconnect(#[source] std::io::Error),
    /// The initial sync of the disk failed.
    #[error(transparent)]
    DiskSync(#[from] crate::disksync::SyncError),
    /// The guest's lease was lost while this primary was self-fenced: the backup may take
    /// the guest over, so this side must not resume it.
    #[error(
        "the guest's lease in etcd was lost ({0}); the guest stays paused here and the \
         backup may take it over"
    )]
    LeaseLost(String),
    /// A switchover's handover frame could not be written (the guest stays paused).
    #[error("the switchover's handover could not be sent to the backup; the guest stays paused")]
    Handover,
}

/// How the primary runs.
#[derive(Debug, Clone)]
pub struct Config {
    /// The backup's address.
    pub backup: SocketAddr,
    /// Codec settings (mode, block size, general codec).
    pub codec: CodecConfig,
    /// Page cache capacity in bytes (xbzrle, fgbi).
    pub cache_bytes: usize,
    /// Epoch interval: how long the guest runs between checkpoints.
    pub interval: Duration,
    /// Checkpoints that may be in flight (taken, not yet acknowledged); see
    /// [`default_pipeline`].
    pub pipeline: usize,
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// The backup is lost when an epoch waits longer than this for its ack.
    pub ack_timeout: Duration,
    /// Pause the guest when the backup is lost (instead of continuing unprotected).
    pub fence: bool,
    /// Unprotected after losing the backup, reconnect to `backup` (and, in turn, to
    /// `reprotect_also`) in the background and protect the guest again when a backup
    /// there welcomes it.
    pub reprotect: bool,
    /// Other backups to try in turn after `backup` when re-protecting (a re-protecting
    /// ha-backup's other `--reprotect-to` addresses).
    pub reprotect_also: Vec<SocketAddr>,
    /// Send a whole-memory digest every this many checkpoints (0: never).
    pub verify_every: u64,
    /// Page-cache teleportation (fgbi, a guest with a disk): pages equal to a block of the
    /// backup's disk replica go as disk references ([`crate::teleport`]).
    pub teleport: bool,
    /// Pre-copy rounds at most.
    pub precopy_rounds: usize,
    /// Pre-copy stops when a round finds at most this many dirty pages.
    pub precopy_threshold: usize,
    /// Stop after this long (None: until asked to stop).
    pub run_for: Option<Duration>,
    /// Where released output goes.
    pub output: Option<SocketAddr>,
    /// Per-epoch CSV.
    pub stats: Option<PathBuf>,
    /// JSON-lines events.
    pub events: Option<PathBuf>,
    /// The pair key that encrypts and authenticates the link (None: `--insecure`, plain
    /// TCP).
    pub key: Option<ha_wire::secure::PairKey>,
    /// Shape the replication stream to this many bits per second (a token bucket at the
    /// sender); None: as fast as the socket takes it.
    pub link_rate: Option<u64>,
    /// The backend that runs the guest, announced in the Hello (the backup refuses another).
    pub backend: ha_guest::backend::BackendKind,
    /// How checkpoints copy their pages: in the pause, copy-on-write, or chosen per
    /// checkpoint from measured costs ([`crate::cow`]).
    pub copy: CopyPolicy,
}

/// Checkpoints in flight by default for a guest of `guest`'s backend: 2, so that the guest
/// runs on while the last checkpoint is encoded and sent; 1 for Xen, whose hold is the
/// guest's own suspend: an encoder still busy with the last checkpoint takes CPU from it
/// (in the rig, a shared CPU, the hold's p50 went from 913 to 287 ms at 1).
pub fn default_pipeline(guest: ha_backend::BackendKind) -> usize {
    match guest {
        ha_backend::BackendKind::Xen => 1,
        _ => 2,
    }
}

/// What a run achieved.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Summary {
    /// Checkpoints acknowledged by the backup.
    pub epochs_committed: u64,
    /// Pause times of the checkpoints, in microseconds.
    #[serde(skip)]
    pub pauses_us: Vec<u64>,
    /// Pause time p50, ms.
    pub pause_ms_p50: f64,
    /// Pause time p99, ms.
    pub pause_ms_p99: f64,
    /// Wire bytes of the checkpoints (their disk records included).
    pub wire_bytes: u64,
    /// Wire bytes of the checkpoints' disk records (part of `wire_bytes`).
    pub disk_wire_bytes: u64,
    /// Bytes the guest wrote to its disk in the checkpoints' epochs.
    pub disk_raw_bytes: u64,
    /// Disk writes the checkpoints carried.
    pub disk_writes: u64,
    /// Raw bytes (dirty pages × 4096) of the checkpoints.
    pub raw_bytes: u64,
    /// Output records released.
    pub outputs_released: u64,
    /// Marks set in the network buffers (`--net-buffer`), one per checkpoint at most.
    pub net_marks: u64,
    /// Checkpoints that set no mark of their own because the previous one still waited
    /// (their packets went with the next mark).
    pub net_folded: u64,
    /// Whether the backup was lost.
    pub backup_lost: bool,
    /// Times the guest was protected again after its backup was lost (`--reprotect`).
    pub reprotected: u64,
    /// Checkpoints that copied their pages in the pause.
    pub pause_copies: u64,
    /// Checkpoints that took their pages copy-on-write.
    pub cow_copies: u64,
    /// Pages of copy-on-write checkpoints the guest wrote before their copy.
    pub cow_faulted: u64,
    /// The initial sync of the disk (a guest with a disk).
    pub disk_sync: Option<DiskSyncSummary>,
    /// The memory comparison with an image the backup already held (re-protection).
    pub memory_resync: Option<MemoryResync>,
    /// Wire bytes of the pre-copy epochs (memory and disk), acknowledged.
    pub precopy_wire_bytes: u64,
    /// Page-cache teleportation, when it ran.
    pub teleport: Option<TeleportSummary>,
    /// Milliseconds from the start of the sync until the backup held the first checkpoint.
    pub sync_ms: u64,
    /// The guest was handed over to the backup (planned switchover): it is stopped here.
    pub switched_over: bool,
}

/// What page-cache teleportation did ([`crate::teleport`]).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TeleportSummary {
    /// Disk blocks indexed when the index was built (all-zero ones are not).
    pub blocks_indexed: u64,
    /// Milliseconds reading and fingerprinting the disk.
    pub build_ms: u64,
    /// Pages of the acknowledged pre-copy epochs sent as disk references.
    pub precopy_refs: u64,
    /// Pages of the acknowledged checkpoints sent as disk references.
    pub checkpoint_refs: u64,
}

/// What the comparison of memory with the image the backup held found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct MemoryResync {
    /// Guest pages.
    pub pages: u64,
    /// Pages of the backup's image that differed (sent in the first pre-copy round).
    pub differ: u64,
    /// Fingerprint bytes both ways (requests and answers).
    pub fingerprint_bytes: u64,
    /// Round trips of the comparison.
    pub round_trips: u32,
    /// Milliseconds the comparison took.
    pub compare_ms: u64,
}

/// What the initial sync of the disk cost.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DiskSyncSummary {
    /// The disk's size in bytes.
    pub disk_bytes: u64,
    /// 4 KiB blocks of the replica that differed.
    pub blocks: u64,
    /// Fingerprint bytes both ways (requests and answers).
    pub fingerprint_bytes: u64,
    /// Round trips of the comparison.
    pub round_trips: u32,
    /// Wire bytes of the differing blocks' disk records (acknowledged epochs).
    pub block_wire_bytes: u64,
    /// Milliseconds the comparison took.
    pub compare_ms: u64,
    /// Milliseconds from the comparison's start until the blocks were all queued.
    pub ms: u64,
}

impl DiskSyncSummary {
    /// Bytes that crossed for the disk (fingerprints and blocks) per byte of disk.
    pub fn sent_ratio(&self) -> f64 {
        (self.fingerprint_bytes + self.block_wire_bytes) as f64 / self.disk_bytes.max(1) as f64
    }
}

/// The engine's state, for logs and events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Syncing,
    Protected,
    Unprotected,
    Fenced,
}

impl Phase {
    /// The name in `castor_state{state=…}`.
    fn name(self) -> &'static str {
        match self {
            Phase::Syncing => "syncing",
            Phase::Protected => "protected",
            Phase::Unprotected => "unprotected",
            Phase::Fenced => "fenced",
        }
    }
}

struct Engine<'a> {
    cfg: &'a Config,
    d: &'a mut dyn Domain,
    jobs: Sender<Job>,
    done: crossbeam_channel::Receiver<Encoded>,
    link: crossbeam_channel::Receiver<LinkEvent>,
    held: HeldOutput,
    /// Epochs taken (or queued) and not yet acknowledged.
    inflight: BTreeMap<u64, InFlight>,
    stats: Option<StatsCsv>,
    events: EventLog,
    epoch: u64,
    first_checkpoint: Option<u64>,
    phase: Phase,
    summary: Summary,
    checkpoints: u64,
    metrics: &'a Metrics,
    /// Output records released as last counted in `metrics`.
    released_seen: u64,
    /// When the engine started: the stats' time origin.
    born: Instant,
    /// Ends the session (stand-down or close), ahead of queued epochs.
    ctl: crossbeam_channel::Sender<Control>,
    /// Whether this process stood still.
    stall: StallWatch,
    /// A stall this long may have let the backup declare this primary lost.
    stall_limit: Duration,
    /// Set after such a stall, until the backup acknowledges an epoch taken after it.
    suspect: Option<Suspect>,
    /// Under the default policy, when the stand-down to a lost backup was queued: output
    /// stays held until it is on the wire (or the link is gone, or the wait runs out).
    standing_down: Option<Instant>,
    /// Whether etcd holds this primary's stale mark for the backup's image (see
    /// [`Engine::release_unprotected`]).
    stale_marked: bool,
    /// Verifications put off in a row (memory written while the guest was held).
    verify_put_off: u32,
    /// The next checkpoint carries the digests whatever `verify_every` says (the first
    /// after a disk sync: protection starts when they agree).
    verify_next: bool,
    /// The teleportation index built after the disk sync, for the encoder with the next
    /// job; and whether pre-copy epochs carry the disk's writes (they must once it is).
    teleport: (Option<Box<crate::teleport::Teleport<std::fs::File>>>, bool),
    /// The guest's key in etcd, held while this primary runs it.
    lease: Option<ha_lease::Lease>,
    /// Page buffers the encoder is done with, for the next checkpoints to fill.
    spent: (Sender<Pages>, Receiver<Pages>),
    /// Unprotected with `--reprotect`: the thread trying to reach a backup again.
    reconnecting: Option<Reconnecting>,
    /// A session a backup opened again: the run goes on with it.
    again: Option<link::Link>,
    /// The last checkpoint the backup acknowledged.
    last_acked: u64,
    /// When the status was last published, and the checkpoint wire bytes then.
    published: Option<(Instant, u64)>,
    /// Raised by the operator (SIGUSR1): switch over to the backup.
    switchover: Option<&'a AtomicBool>,
    /// The handover is on the wire: the backup takes the guest over.
    handed_over: bool,
    /// Picks each checkpoint's copy path.
    cow: Chooser,
    /// The backup holds an image of this guest already: pre-copy sends only what differs.
    backup_holds_image: bool,
}

/// An epoch on its way: its report row, filled in as the stages report (encoder, sender,
/// ack), and when it began to wait for its ack.
#[derive(Debug)]
struct InFlight {
    row: EpochRow,
    since: Instant,
}

/// A stall after which the backup may have taken over.
#[derive(Debug, Clone, Copy)]
struct Suspect {
    /// The longest stall seen.
    stalled: Duration,
    /// An ack for this epoch or a later one proves the backup still follows.
    clears_at: u64,
}

/// How long a stopping primary waits for its backup to take the stand-down.
const STAND_DOWN_WAIT: Duration = Duration::from_secs(10);

/// Protect `d` until `stop` is set, `cfg.run_for` passes, or the guest fails.
pub fn run(cfg: &Config, d: &mut dyn Domain, stop: &AtomicBool) -> Result<Summary, EngineError> {
    run_with_metrics(cfg, d, stop, &Metrics::new())
}

/// [`run`], updating `metrics` as it goes.
pub fn run_with_metrics(
    cfg: &Config,
    d: &mut dyn Domain,
    stop: &AtomicBool,
    metrics: &Metrics,
) -> Result<Summary, EngineError> {
    run_leased(cfg, d, stop, metrics, None, None, Vec::new())
}

/// [`run`] with the guest's packets held by `plugs` (closed already): each checkpoint
/// marks them in its pause, each ack releases its mark ([`crate::hold`]).
pub fn run_with_plugs(
    cfg: &Config,
    d: &mut dyn Domain,
    stop: &AtomicBool,
    plugs: Vec<Box<dyn PacketHold>>,
) -> Result<Summary, EngineError> {
    run_leased(cfg, d, stop, &Metrics::new(), None, None, plugs)
}

/// [`run_with_metrics`] for a guest whose key this primary holds under `lease` (claimed
/// before the guest started): the guest runs only while the lease may be trusted. When it
/// cannot be refreshed in time the guest is paused and its output held (self-fenced) until
/// the same lease is refreshed again; if it is lost instead, the run ends with
/// [`EngineError::LeaseLost`] and the guest stays paused. A guest that ends with this
/// process gives the key up at the end, so the backup can claim it at once.
///
/// `plugs` hold the guest's packets on host interfaces (`--net-buffer`, set up and closed
/// by the caller). At the end they are removed, unless the guest outlives this process
/// and its held packets may not go out (fenced, or a backup that may take over): then
/// they stay closed in the kernel.
pub fn run_leased(
    cfg: &Config,
    d: &mut dyn Domain,
    stop: &AtomicBool,
    metrics: &Metrics,
    lease: Option<ha_lease::Lease>,
    switchover: Option<&AtomicBool>,
    plugs: Vec<Box<dyn PacketHold>>,
) -> Result<Summary, EngineError> {
    metrics.set_state(Phase::Syncing.name());
    let mut connected = connect(cfg, d)?;
    connected.plugs = plugs;
    run_connected(connected, cfg, d, stop, metrics, lease, switchover)
}

/// A primary whose backup welcomed it: the session is open, nothing sent yet.
pub struct Connected {
    link: link::Link,
    /// The guest's packets held on host interfaces (see [`run_leased`]); none unless the
    /// caller puts them here.
    pub plugs: Vec<Box<dyn PacketHold>>,
}

impl std::fmt::Debug for Connected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connected")
            .field("link", &self.link)
            .field("plugs", &self.plugs.len())
            .finish()
    }
}

/// Open the session with the backup at `cfg.backup` for guest `d` (the Hello, the secure
/// channel, the Welcome). Nothing of the guest is touched: a caller that cannot reach a
/// backup (re-protection after a failover) keeps running the guest as it was and tries
/// again later.
pub fn connect(cfg: &Config, d: &mut dyn Domain) -> Result<Connected, EngineError> {
    let link = link::connect(
        cfg.backup,
        &hello(cfg, d),
        cfg.heartbeat,
        CONNECT_TIMEOUT,
        cfg.key.as_ref(),
        cfg.link_rate,
    )?;
    Ok(Connected {
        link,
        plugs: Vec::new(),
    })
}

/// Checkpoints in a row that try a verification put off because memory was written while
/// the guest was held ([`ha_guest::domain::Domain::written_since_harvest`]); then it is
/// dropped until the next one due.
const VERIFY_TRIES: u32 = 8;

/// How long opening a session may take (the TCP connect, then each handshake read).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a primary that lost its backup tries to reach one again (`--reprotect`).
pub const RECONNECT_EVERY: Duration = Duration::from_millis(200);

/// What this primary tells a backup about guest `d`.
fn hello(cfg: &Config, d: &mut dyn Domain) -> Hello {
    Hello {
        version: SESSION_VERSION,
        memory_size: d.memory_size(),
        page_size: PAGE_SIZE as u32,
        block_size: cfg.codec.block_size,
        mode: cfg.codec.mode,
        backend: cfg.backend,
        layout: cfg.backend.guest_layout(),
        disk_size: d.disk().map_or(0, |k| k.disk_size()),
    }
}

/// Try to open a session with the backup at `cfg.backup`, then each of
/// `cfg.reprotect_also`, a round every [`RECONNECT_EVERY`], on a thread of its own (a
/// connect or handshake can take seconds, and the guest's output must flow meanwhile),
/// until one is open or `stop` is set. The open link is sent on the returned channel.
fn reconnect(
    cfg: &Config,
    hello: Hello,
    stop: Arc<AtomicBool>,
) -> Result<Receiver<link::Link>, EngineError> {
    let (tx, rx) = bounded(1);
    let mut addrs = vec![cfg.backup];
    addrs.extend(cfg.reprotect_also.iter().filter(|a| **a != cfg.backup));
    let (heartbeat, key, rate) = (cfg.heartbeat, cfg.key.clone(), cfg.link_rate);
    std::thread::Builder::new()
        .name("castor-reconnect".into())
        .spawn(move || {
            let mut first_round = true;
            while !stop.load(Ordering::Relaxed) {
                for &addr in &addrs {
                    match link::connect(
                        addr,
                        &hello,
                        heartbeat,
                        CONNECT_TIMEOUT,
                        key.as_ref(),
                        rate,
                    ) {
                        Ok(l) => {
                            let _ = tx.send(l);
                            return;
                        }
                        Err(e) if first_round => tracing::info!(
                            backup = %addr,
                            error = %ha_daemon::error_chain(&e),
                            "re-protection: no backup there yet; the guest runs unprotected; \
                             retrying every {RECONNECT_EVERY:?}"
                        ),
                        Err(_) => {}
                    }
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                }
                first_round = false;
                std::thread::sleep(RECONNECT_EVERY);
            }
        })
        .map_err(EngineError::Reconnect)?;
    Ok(rx)
}

/// The background attempts to reach a backup again; they stop when this is dropped.
struct Reconnecting {
    rx: Receiver<link::Link>,
    stop: Arc<AtomicBool>,
    /// Since when the guest runs unprotected.
    since: Instant,
}

impl Reconnecting {
    /// A session a backup opened, if one has.
    fn ready(&self) -> Option<link::Link> {
        self.rx.try_recv().ok()
    }
}

impl Drop for Reconnecting {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// [`run_leased`] on a session [`connect`] opened. With `--reprotect`, a session whose
/// backup was lost is followed by another once a backup at the same address welcomes
/// this primary; the events and statistics go on in the same files.
pub fn run_connected(
    conn: Connected,
    cfg: &Config,
    d: &mut dyn Domain,
    stop: &AtomicBool,
    metrics: &Metrics,
    lease: Option<ha_lease::Lease>,
    switchover: Option<&AtomicBool>,
) -> Result<Summary, EngineError> {
    // Files are opened once the backup welcomed this primary: a primary it refuses (a
    // second one) touches nothing of a running one's.
    let mut files = Files {
        events: EventLog::open(cfg.events.as_deref())?,
        stats: match &cfg.stats {
            Some(p) => Some(StatsCsv::create(p).map_err(|source| EngineError::Report {
                path: p.clone(),
                source,
            })?),
            None => None,
        },
    };
    let (mut conn, mut lease, mut summary) = (conn, lease, Summary::default());
    let started = Instant::now();
    loop {
        let s = Session {
            cfg,
            stop,
            metrics,
            switchover,
            started,
        };
        match s.run(conn, d, lease, files, summary)? {
            Ended::Done(s) => return Ok(*s),
            Ended::Again(next) => {
                (conn, lease, files, summary) = (next.conn, next.lease, next.files, next.summary);
            }
        }
    }
}

/// The files a primary writes across its sessions.
struct Files {
    events: EventLog,
    stats: Option<StatsCsv>,
}

/// What one session needs besides its link.
struct Session<'a> {
    cfg: &'a Config,
    stop: &'a AtomicBool,
    metrics: &'a Metrics,
    switchover: Option<&'a AtomicBool>,
    /// When the first session started (`--run-for` counts from there).
    started: Instant,
}

/// How a session ended.
enum Ended {
    /// For good: the run is over.
    Done(Box<Summary>),
    /// The backup was lost and a backup welcomed this primary again.
    Again(Box<Next>),
}

/// What the next session takes over from one that ended with its backup lost.
struct Next {
    conn: Connected,
    lease: Option<ha_lease::Lease>,
    files: Files,
    summary: Summary,
}

impl Session<'_> {
    fn run(
        self,
        Connected { link, plugs }: Connected,
        d: &mut dyn Domain,
        lease: Option<ha_lease::Lease>,
        files: Files,
        summary: Summary,
    ) -> Result<Ended, EngineError> {
        let Session {
            cfg,
            stop,
            metrics,
            switchover,
            started,
        } = self;
        metrics.set_state(Phase::Syncing.name());
        let pages = page_count(d.memory_size());
        let stall = StallWatch::start().map_err(EngineError::Watch)?;
        let welcome = link.welcome;
        tracing::info!(
            backup = %link.peer,
            next_epoch = welcome.next_epoch,
            backup_detect_ms = welcome.detect_timeout.as_millis() as u64,
            "connected to the backup"
        );
        let Files { mut events, stats } = files;
        events.note(
            "connected",
            json!({
                "backup": link.peer.to_string(),
                "next_epoch": welcome.next_epoch,
                "backup_detect_ms": welcome.detect_timeout.as_millis() as u64,
            }),
        );

        let cache = match cfg.codec.mode {
            Mode::Remus => None,
            // The options refuse a size the cache cannot use; a caller that passes one anyway
            // gets the cache's own error, not a silently smaller cache.
            // Its memory is taken up front: no more than the guest could fill.
            _ => Some(PageCache::lru(
                cfg.cache_bytes.min(
                    pages
                        .saturating_mul(ha_codec::PAGE_SIZE)
                        .max(ha_codec::PAGE_SIZE),
                ),
            )?),
        };
        let hashes =
            (cfg.codec.mode == Mode::Fgbi).then(|| BlockHashes::new(pages, cfg.codec.block_size));
        let enc = PageEncoder::new(cfg.codec, cache, hashes)?;
        let (jobs, job_rx) = bounded::<Job>(1);
        let (done_tx, done) = unbounded();
        let link_tx = link.tx;
        std::thread::Builder::new()
            .name("castor-encode".into())
            .spawn(move || encode::run(enc, job_rx, link_tx, done_tx))
            .map_err(|_| EngineError::EncoderGone)?;

        let sink = match cfg.output {
            Some(a) => Some(OutputSink::connect(a, Source::Primary)?),
            None => None,
        };
        let mut e = Engine {
            cfg,
            d,
            jobs,
            done,
            link: link.events,
            held: HeldOutput::with_plugs(sink, plugs),
            inflight: BTreeMap::new(),
            stats,
            events,
            epoch: welcome.next_epoch,
            first_checkpoint: None,
            phase: Phase::Syncing,
            summary,
            checkpoints: 0,
            metrics,
            released_seen: 0,
            born: Instant::now(),
            ctl: link.ctl,
            stall,
            stall_limit: stall_limit(welcome.detect_timeout, cfg.heartbeat),
            suspect: None,
            standing_down: None,
            stale_marked: false,
            verify_next: false,
            verify_put_off: 0,
            lease,
            last_acked: 0,
            published: None,
            switchover,
            handed_over: false,
            cow: Chooser::new(cfg.copy),
            backup_holds_image: welcome.holds_image,
            teleport: (None, false),
            spent: bounded(2),
            reconnecting: None,
            again: None,
        };
        let run = e.sync(pages).and_then(|()| e.protect(stop, started));
        if run.is_ok()
            && let Some(link) = e.again.take()
        {
            // The backup was lost and a backup welcomed this primary again: the next session
            // takes the guest's key, its plugs (closed again) and the files over.
            e.fold_session();
            e.summary.reprotected += 1;
            let plugs = e.held.take_plugs();
            let lease = e.lease.take();
            let Engine {
                events,
                stats,
                summary,
                ..
            } = e;
            return Ok(Ended::Again(Box::new(Next {
                conn: Connected { link, plugs },
                lease,
                files: Files { events, stats },
                summary,
            })));
        }
        let lease_lost = matches!(run, Err(EngineError::LeaseLost(_)));
        // Stand the backup down only while the guest still runs here: a domain that died or
        // crashed is the backup's to bring back, and so is one whose lease was lost.
        if e.d.outlives_vmm() && e.d.check_health().is_ok() && !lease_lost && !e.handed_over {
            let why = match &run {
                Ok(()) => "protection stopped on request".to_string(),
                Err(err) => format!("protection stopped: {}", ha_daemon::error_chain(err)),
            };
            e.stand_down(&why);
        }
        if let Some(l) = e.lease.take()
            && !lease_lost
            && (!e.d.outlives_vmm() || e.handed_over)
        {
            // The guest ends with this process: the backup may claim its key at once.
            match l.release() {
                Ok(()) => tracing::info!("lease: released the guest's key"),
                Err(err) => tracing::warn!(
                    error = %ha_daemon::error_chain(&err),
                    "lease: cannot release the guest's key; it passes on when the lease expires"
                ),
            }
        }
        // A guest that runs on (or may be resumed) after this process keeps its plugs closed
        // unless they were released for good (unprotected, or the backup stood down).
        let keep = e.d.outlives_vmm() && !e.held.plugs_open();
        e.held.finish(keep);
        run?;
        e.finish();
        e.summary.switched_over = e.handed_over;
        Ok(Ended::Done(Box::new(e.summary)))
    }
}

impl Engine<'_> {
    /// Initial synchronization: every non-zero page while the guest runs, then rounds of
    /// what it dirtied meanwhile until a round is small, then the first checkpoint.
    fn sync(&mut self, pages: usize) -> Result<(), EngineError> {
        let t = Instant::now();
        tracing::info!(
            memory_mib = self.d.memory_size() >> 20,
            "syncing: pre-copy while the guest runs"
        );
        self.events.note("syncing", json!({}));
        if self.d.is_paused() {
            self.d.resume()?;
        }
        self.sync_disk()?;
        let mut dirty = PageBitmap::new(pages);
        self.d.harvest_dirty(&mut dirty)?; // tracking starts now
        // Round 0: every non-zero page (the backup's image is all zero), or every page
        // that differs from the image the backup holds; in chunks. A page written after
        // its fingerprint or its copy was taken is in the dirty log.
        let round0: Box<dyn Iterator<Item = usize>> = if self.backup_holds_image {
            match self.resync_memory()? {
                Some(differ) => Box::new(differ.into_iter()),
                None => return Ok(()),
            }
        } else {
            Box::new(0..pages)
        };
        let mut chunk = Pages::default();
        let mut page = [0u8; PAGE_SIZE];
        let mut sent = 0usize;
        for p in round0 {
            self.d.read_memory(p as u64 * PAGE_SIZE as u64, &mut page)?;
            if !self.backup_holds_image && is_zero(&page) {
                continue;
            }
            chunk.index.push(p as u64);
            chunk.data.extend_from_slice(&page);
            if chunk.len() == PRECOPY_CHUNK {
                sent += chunk.len();
                self.send_precopy(std::mem::take(&mut chunk))?;
            }
        }
        sent += chunk.len();
        if !chunk.is_empty() {
            self.send_precopy(chunk)?;
        }
        let mut rounds = 1;
        // Whether `dirty` holds pages not sent yet (they go with the first checkpoint).
        let mut pending = false;
        while rounds < self.cfg.precopy_rounds && self.phase == Phase::Syncing {
            dirty.clear();
            self.d.harvest_dirty(&mut dirty)?;
            if dirty.count() <= self.cfg.precopy_threshold {
                pending = true;
                break;
            }
            let mut round = Pages::default();
            harvest::copy_pages(self.d, &dirty, false, &mut round)?;
            sent += round.len();
            for part in split(round) {
                self.send_precopy(part)?;
            }
            rounds += 1;
            self.pump(Duration::ZERO)?;
        }
        if !pending {
            dirty.clear();
        }
        tracing::info!(
            rounds,
            pages = sent,
            ms = t.elapsed().as_millis() as u64,
            "pre-copy done; taking the first checkpoint"
        );
        self.events.note(
            "synced",
            json!({ "rounds": rounds, "pages": sent, "ms": t.elapsed().as_millis() as u64 }),
        );
        if self.phase != Phase::Syncing {
            return Ok(());
        }
        let first = self.epoch;
        self.checkpoint(&mut dirty)?;
        self.first_checkpoint = Some(first);
        Ok(())
    }

    /// Compare this guest's memory with the image the backup holds, by fingerprints
    /// ([`crate::disksync`], memory frames): the pages that differ, ascending, or None
    /// when the backup was lost meanwhile (the policy was followed). The first checkpoint
    /// then carries the digest, so a fingerprint collision cannot go unseen.
    fn resync_memory(&mut self) -> Result<Option<Vec<usize>>, EngineError> {
        let size = self.d.memory_size();
        tracing::info!(
            memory_mib = size >> 20,
            "resync: comparing the backup's image of this guest with its memory"
        );
        let wait = crate::disksync::answer_wait(self.cfg.ack_timeout, size);
        let local = crate::disksync::MemoryReader(&*self.d);
        let outcome = crate::disksync::compare(
            &local,
            ha_wire::disksync::Target::Memory,
            &self.ctl,
            &self.link,
            wait,
        )?;
        let c = match outcome {
            crate::disksync::Outcome::Compared(c) => c,
            crate::disksync::Outcome::Closed(why) => {
                self.backup_lost(&why)?;
                return Ok(None);
            }
        };
        let r = MemoryResync {
            pages: size / PAGE_SIZE as u64,
            differ: c.blocks.len() as u64,
            fingerprint_bytes: c.fingerprint_bytes,
            round_trips: c.round_trips,
            compare_ms: c.took.as_millis() as u64,
        };
        tracing::info!(
            pages = r.pages,
            differ = r.differ,
            fingerprint_bytes = r.fingerprint_bytes,
            round_trips = r.round_trips,
            ms = r.compare_ms,
            "resync: sending the pages that differ"
        );
        self.events.note("memory_compared", json!(r));
        self.summary.memory_resync = Some(r);
        self.verify_next = true;
        Ok(Some(c.blocks.into_iter().map(|b| b as usize).collect()))
    }

    /// Bring the backup's disk replica level with this disk ([`crate::disksync`]): the
    /// differing blocks go in pre-copy epochs; writes from now on go with the checkpoints.
    fn sync_disk(&mut self) -> Result<(), EngineError> {
        let Some(size) = self.d.disk().map(|k| k.disk_size()) else {
            return Ok(());
        };
        let t = Instant::now();
        // Writes completed before this are on the disk the comparison reads; the ones
        // after it are drained at the first checkpoint.
        self.d.pause()?;
        let mut before = Vec::new();
        let drained = self
            .d
            .disk()
            .map_or(Ok(()), |k| k.drain_writes(&mut before));
        self.d.resume()?;
        drained?;
        tracing::info!(
            disk_mib = size >> 20,
            "disk sync: comparing the backup's replica with this disk"
        );
        let wait = crate::disksync::answer_wait(self.cfg.ack_timeout, size);
        let outcome = match self.d.disk() {
            Some(k) => crate::disksync::compare(
                &crate::disksync::DiskReader(&*k),
                ha_wire::disksync::Target::Disk,
                &self.ctl,
                &self.link,
                wait,
            )?,
            None => return Ok(()),
        };
        let c = match outcome {
            crate::disksync::Outcome::Compared(c) => c,
            crate::disksync::Outcome::Closed(why) => return self.backup_lost(&why),
        };
        tracing::info!(
            blocks = c.blocks.len(),
            mib = (c.blocks.len() as u64 * crate::disksync::BLOCK) >> 20,
            fingerprint_bytes = c.fingerprint_bytes,
            round_trips = c.round_trips,
            ms = c.took.as_millis() as u64,
            "disk sync: sending the blocks that differ"
        );
        // Counted from here: sync epochs acknowledged while later ones are sent add their
        // bytes as they go.
        self.summary.disk_sync = Some(DiskSyncSummary {
            disk_bytes: size,
            blocks: c.blocks.len() as u64,
            fingerprint_bytes: c.fingerprint_bytes,
            round_trips: c.round_trips,
            block_wire_bytes: 0,
            compare_ms: c.took.as_millis() as u64,
            ms: 0,
        });
        for runs in crate::disksync::epochs(&c.blocks) {
            if self.phase != Phase::Syncing {
                break;
            }
            let writes = match self.d.disk() {
                Some(k) => crate::disksync::read_runs(&*k, &runs)?,
                None => break,
            };
            self.send_precopy_with(Pages::default(), writes, Vec::new())?;
            self.pump(Duration::ZERO)?;
        }
        self.verify_next = true;
        if let Some(sync) = &mut self.summary.disk_sync {
            sync.ms = t.elapsed().as_millis() as u64;
        }
        if self.cfg.teleport && self.cfg.codec.mode == Mode::Fgbi && self.phase == Phase::Syncing {
            self.build_teleport()?;
        }
        Ok(())
    }

    /// Index this disk for teleportation, now that the replica equals it (up to the writes
    /// since the sync's drain, which the next epoch carries). From here on every pre-copy
    /// epoch carries the disk's writes, so the index can follow the replica.
    fn build_teleport(&mut self) -> Result<(), EngineError> {
        let Some(file) = self
            .d
            .disk()
            .map(|k| k.image_reader())
            .transpose()?
            .flatten()
        else {
            tracing::info!("teleportation: the disk has no image to read; off");
            return Ok(());
        };
        let t = Instant::now();
        match crate::teleport::Teleport::build(file) {
            Ok(tp) => {
                let s = TeleportSummary {
                    blocks_indexed: tp.index().known() as u64,
                    build_ms: t.elapsed().as_millis() as u64,
                    ..Default::default()
                };
                tracing::info!(
                    blocks = tp.index().blocks(),
                    indexed = s.blocks_indexed,
                    ms = s.build_ms,
                    "teleportation: disk indexed"
                );
                self.summary.teleport = Some(s);
                self.teleport = (Some(Box::new(tp)), true);
            }
            Err(e) => tracing::warn!(
                error = %ha_daemon::error_chain(&e),
                "teleportation: the disk cannot be indexed; off"
            ),
        }
        Ok(())
    }

    /// A memory pre-copy epoch; with teleportation, it carries the disk's writes drained
    /// so far (the replica must follow this disk for the index to describe it).
    fn send_precopy(&mut self, pages: Pages) -> Result<(), EngineError> {
        let (mut writes, mut reads) = (Vec::new(), Vec::new());
        if self.teleport.1
            && let Some(k) = self.d.disk()
        {
            k.drain_writes(&mut writes)?;
            k.drain_reads(&mut reads)?;
        }
        self.send_precopy_with(pages, writes, reads)
    }

    /// A pre-copy epoch: `pages` and the initial disk sync's blocks or the disk's writes
    /// `disk`, and the reads that filled pages from the disk meanwhile `reads`.
    fn send_precopy_with(
        &mut self,
        pages: Pages,
        disk: Vec<ha_guest::domain::DiskWrite>,
        reads: Vec<ha_guest::domain::DiskRead>,
    ) -> Result<(), EngineError> {
        let epoch = self.epoch;
        self.epoch += 1;
        let n = pages.len();
        self.inflight.insert(
            epoch,
            InFlight {
                row: EpochRow {
                    epoch,
                    checkpoint: false,
                    dirty_pages: n,
                    ..Default::default()
                },
                since: Instant::now(),
            },
        );
        self.submit(Job {
            epoch,
            pages,
            state: None,
            disk,
            reads,
            verify: None,
            verify_disk: None,
            teleport: None,
            recycle: None,
        })
    }

    /// Hand an epoch to the encoder. The encoder stops when the link is gone, so a refused
    /// job means the backup is lost: the policy decides what happens next.
    fn submit(&mut self, mut job: Job) -> Result<(), EngineError> {
        job.teleport = self.teleport.0.take();
        if self.jobs.send(job).is_err() && matches!(self.phase, Phase::Syncing | Phase::Protected) {
            let why = match self.link.try_recv() {
                Ok(LinkEvent::Closed(why)) => why,
                _ => "the link to the backup is gone".to_string(),
            };
            self.backup_lost(&why)?;
        }
        Ok(())
    }

    /// Take a checkpoint and submit it for encoding; returns when the guest was let go on
    /// (the start of the next epoch).
    fn checkpoint(&mut self, dirty: &mut PageBitmap) -> Result<Instant, EngineError> {
        self.checkpoints += 1;
        let verify = std::mem::take(&mut self.verify_next)
            || (self.cfg.verify_every > 0
                && self.checkpoints.is_multiple_of(self.cfg.verify_every));
        let epoch = self.epoch;
        let held = &mut self.held;
        let mut mark = || {
            held.mark(epoch).map_err(|e| DomainError::Backend {
                op: "marking the network buffers",
                source: Box::new(e),
            })
        };
        let spare = self.spent.1.try_recv().unwrap_or_default();
        let cp = harvest::take(
            self.d,
            epoch,
            dirty,
            verify,
            &mut self.cow,
            &mut mark,
            spare,
        )?;
        self.epoch += 1;
        self.held.hold(cp.epoch, cp.outputs);
        self.summary.pauses_us.push(cp.pause.as_micros() as u64);
        self.metrics.pause_seconds.observe(cp.pause.as_secs_f64());
        self.inflight.insert(
            cp.epoch,
            InFlight {
                row: EpochRow {
                    epoch: cp.epoch,
                    checkpoint: true,
                    pause: cp.pause,
                    copy: Some(cp.path),
                    pause_parts: cp.parts,
                    dirty_pages: cp.pages.len(),
                    at: Some(cp.taken.saturating_duration_since(self.born)),
                    progress: cp.status.map(|s| s.progress),
                    ..Default::default()
                },
                since: cp.taken,
            },
        );
        if cp.verify_skipped > 0 {
            // Dom0's backends wrote guest memory while it was held (a packet, a disk read):
            // a digest would not be of this checkpoint; the next one tries, up to
            // VERIFY_TRIES checkpoints in a row.
            self.verify_put_off += 1;
            let again = self.verify_put_off < VERIFY_TRIES;
            tracing::info!(
                epoch = cp.epoch,
                pages = cp.verify_skipped,
                again,
                "verification put off: memory was written while the guest was held"
            );
            self.events.note(
                "verify_put_off",
                json!({ "epoch": cp.epoch, "pages": cp.verify_skipped, "again": again }),
            );
            self.verify_next = again;
            if !again {
                self.verify_put_off = 0;
            }
        } else if cp.verify.is_some() {
            self.verify_put_off = 0;
        }
        let resumed = cp.taken + cp.pause;
        self.submit(Job {
            epoch: cp.epoch,
            pages: cp.pages,
            state: Some(cp.state),
            disk: cp.disk,
            reads: cp.reads,
            verify: cp.verify,
            verify_disk: cp.verify_disk,
            teleport: None,
            recycle: Some(self.spent.0.clone()),
        })?;
        Ok(resumed)
    }

    /// The epoch loop.
    fn protect(&mut self, stop: &AtomicBool, started: Instant) -> Result<(), EngineError> {
        let pages = page_count(self.d.memory_size());
        let mut dirty = PageBitmap::new(pages);
        let mut next = Instant::now() + self.cfg.interval;
        loop {
            if stop.load(Ordering::Relaxed)
                || self.cfg.run_for.is_some_and(|r| started.elapsed() >= r)
            {
                return Ok(());
            }
            if !self.lease_ok(stop)? {
                return Ok(());
            }
            self.publish_status();
            if self.phase == Phase::Protected
                && self
                    .switchover
                    .is_some_and(|f| f.swap(false, Ordering::Relaxed))
                && self.switch_over()?
            {
                return Ok(());
            }
            let wait = next
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(5));
            self.pump(wait)?;
            self.d.check_health()?;
            match self.phase {
                Phase::Syncing | Phase::Protected => {
                    if let Some(&oldest) = self.inflight.keys().next()
                        && self.waited(oldest) > self.cfg.ack_timeout
                    {
                        let why = format!(
                            "no ack for epoch {oldest} within {:?}",
                            self.cfg.ack_timeout
                        );
                        self.backup_lost(&why)?;
                        continue;
                    }
                    let checkpoints_in_flight =
                        self.inflight.values().filter(|f| f.row.checkpoint).count();
                    if Instant::now() >= next && checkpoints_in_flight < self.cfg.pipeline.max(1) {
                        dirty.clear();
                        let resumed = self.checkpoint(&mut dirty)?;
                        // The guest runs a whole interval before the next checkpoint,
                        // however long this one held it (a Xen guest's suspend can take
                        // longer than the interval); if the link held us back, the
                        // interval stretched instead of memory growing.
                        next = resumed + self.cfg.interval;
                    }
                }
                Phase::Unprotected => {
                    // A new session only once nothing is held here: output waiting for the
                    // stand-down to go out is released first (it would be lost with this
                    // session).
                    if self.standing_down.is_none()
                        && let Some(link) = self.reconnecting.as_ref().and_then(Reconnecting::ready)
                    {
                        let unprotected_ms = self
                            .reconnecting
                            .as_ref()
                            .map_or(0, |r| r.since.elapsed().as_millis() as u64);
                        tracing::info!(
                            backup = %link.peer,
                            unprotected_ms,
                            "re-protection: a backup welcomed this primary again; protecting \
                             the guest anew"
                        );
                        self.events.note(
                            "reprotecting",
                            json!({
                                "backup": link.peer.to_string(),
                                "unprotected_ms": unprotected_ms,
                            }),
                        );
                        self.again = Some(link);
                        return Ok(());
                    }
                    if Instant::now() >= next {
                        let mut recs = Vec::new();
                        if let Some(o) = self.d.output_channel() {
                            o.drain(&mut recs)?;
                        }
                        // Unprotected, the disk's writes go nowhere: drop them.
                        if let Some(k) = self.d.disk() {
                            k.drain_writes(&mut Vec::new())?;
                        }
                        self.held.hold(self.epoch, recs);
                        self.release_if_stood_down()?;
                        next = Instant::now() + self.cfg.interval;
                    }
                }
                Phase::Fenced => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }

    /// A planned switchover: take a last checkpoint and keep the guest paused from then
    /// on (what it does after that checkpoint is not kept: the backup resumes from it),
    /// wait for its ack (its output is released with it), then hand the guest over. True
    /// once handed over; false when the backup was lost on the way (the guest resumes
    /// here, unprotected or fenced as the policy says).
    fn switch_over(&mut self) -> Result<bool, EngineError> {
        let t = Instant::now();
        tracing::info!("switchover requested: taking the last checkpoint");
        let mut dirty = PageBitmap::new(page_count(self.d.memory_size()));
        let last = self.epoch;
        self.checkpoint(&mut dirty)?;
        self.d.pause()?;
        let paused = Instant::now();
        while self.last_acked < last {
            self.pump(Duration::from_millis(2))?;
            if self.phase != Phase::Protected {
                tracing::error!("switchover failed: the backup was lost; the guest goes on here");
                if self.phase == Phase::Unprotected {
                    self.d.resume()?;
                }
                return Ok(false);
            }
            if self.waited(last) > self.cfg.ack_timeout {
                let why = format!("no ack for the switchover's checkpoint {last}");
                self.backup_lost(&why)?;
            }
        }
        let reason = format!("planned switchover at checkpoint {last}");
        let _ = self.ctl.send(Control::Handover(reason));
        let deadline = Instant::now() + self.cfg.ack_timeout;
        while !self.handed_over && Instant::now() < deadline {
            self.pump(Duration::from_millis(2))?;
        }
        if !self.handed_over {
            tracing::error!(
                "switchover: the handover could not be written; the guest stays paused"
            );
            return Err(EngineError::Handover);
        }
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        tracing::info!(
            epoch = last,
            paused_ms = format!("{:.1}", ms(paused.elapsed())),
            total_ms = format!("{:.1}", ms(t.elapsed())),
            "switched over: the backup takes the guest over from checkpoint {last}"
        );
        self.events.note(
            "switched_over",
            json!({
                "epoch": last,
                "paused_ms": ms(paused.elapsed()),
                "paused_unix_ms": std::time::SystemTime::now()
                    .checked_sub(paused.elapsed())
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_millis() as u64),
            }),
        );
        self.set_phase(Phase::Fenced);
        Ok(true)
    }

    /// With a lease, once a second: this pair's status under the guest's key, for the
    /// cluster view (`ha-primary cluster`); it goes with the lease.
    fn publish_status(&mut self) {
        let Some(lease) = &self.lease else {
            return;
        };
        let now = Instant::now();
        let bytes = self.summary.wire_bytes;
        let rate = match self.published {
            Some((at, _)) if now.duration_since(at) < Duration::from_secs(1) => return,
            Some((at, b)) => bytes.saturating_sub(b) as f64 / now.duration_since(at).as_secs_f64(),
            None => 0.0,
        };
        self.published = Some((now, bytes));
        let lag_ms = self
            .inflight
            .keys()
            .next()
            .map_or(0, |&e| self.waited(e).as_millis() as u64);
        let status = json!({
            "role": "primary",
            "host": ha_lease::hostname(),
            "backup": self.cfg.backup.to_string(),
            "state": self.phase.name(),
            "last_epoch": self.last_acked,
            "lag_ms": lag_ms,
            "bytes_per_s": rate.round(),
            "mode": self.cfg.codec.mode.to_string(),
            "updated_unix_ms": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        });
        lease.publish(
            &ha_lease::status_key(lease.key()),
            status.to_string().into_bytes(),
        );
    }

    /// With a lease: true while it may be trusted. When it may not (no keep-alive answered
    /// in time) the guest is paused and its output held (self-fenced) before the lease can
    /// expire in etcd, until the same lease is refreshed (resumed, true), it is lost for
    /// good ([`EngineError::LeaseLost`]), or this primary is asked to stop (false).
    fn lease_ok(&mut self, stop: &AtomicBool) -> Result<bool, EngineError> {
        let Some(lease) = &self.lease else {
            return Ok(true);
        };
        if lease.is_held() {
            return Ok(true);
        }
        let why = lease
            .failing()
            .or_else(|| lease.lost())
            .unwrap_or_else(|| "no keep-alive answered in time".into());
        tracing::error!(
            reason = %why,
            held = self.held.held_records(),
            "lease: not refreshed in time: pausing the guest and holding its output \
             (self-fenced) before the lease can expire in etcd"
        );
        self.events.note("self_fenced", json!({ "reason": why }));
        let was_paused = self.d.is_paused();
        if !was_paused {
            self.d.pause()?;
        }
        self.metrics.set_state(Phase::Fenced.name());
        let t = Instant::now();
        loop {
            let Some(lease) = &self.lease else {
                return Ok(true);
            };
            // Past its TTL with no keep-alive answered, the lease has expired in etcd: it
            // cannot come back, so waiting on would only keep the backup from taking over
            // (the link stays up and carries heartbeats while etcd is out of reach here).
            let expired = lease
                .expired_by()
                .is_some_and(|t| Instant::now() >= t)
                .then(|| {
                    format!(
                        "no keep-alive answered within the lease's TTL ({why}): it expired in \
                         etcd"
                    )
                });
            if let Some(lost) = lease.lost().or(expired) {
                tracing::error!(
                    reason = %lost,
                    "lease: lost; the backup may take the guest over: it stays paused here"
                );
                self.events.note("lease_lost", json!({ "reason": lost }));
                return Err(EngineError::LeaseLost(lost));
            }
            if lease.is_held() {
                let ms = t.elapsed().as_millis() as u64;
                tracing::warn!(
                    fenced_ms = ms,
                    "lease: refreshed again (nobody else can have taken the key): resuming \
                     the guest"
                );
                self.events
                    .note("lease_recovered", json!({ "fenced_ms": ms }));
                if !was_paused {
                    self.d.resume()?;
                }
                self.metrics.set_state(self.phase.name());
                return Ok(true);
            }
            if stop.load(Ordering::Relaxed) {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// How long `epoch` has waited for its ack since it was taken, its pause not counted
    /// (a long pause, such as the first checkpoint's digests after a disk sync, is this
    /// side's time, not the backup's).
    fn waited(&self, epoch: u64) -> Duration {
        self.inflight.get(&epoch).map_or(Duration::ZERO, |f| {
            f.since.elapsed().saturating_sub(f.row.pause)
        })
    }

    /// Handle what the link and the encoder reported, waiting up to `wait` for the first.
    fn pump(&mut self, wait: Duration) -> Result<(), EngineError> {
        // Whether this process stood still is settled before anything the link reports
        // is acted on: a loss that follows a stall is read in its light.
        self.watch();
        self.take_encoded();
        let first = if wait.is_zero() {
            self.link.try_recv().ok()
        } else {
            self.link.recv_timeout(wait).ok()
        };
        let mut next_ev = first;
        while let Some(ev) = next_ev {
            match ev {
                LinkEvent::Ack(n, at) => {
                    // The encoder reports an epoch before handing it to the sender, so
                    // its report is in `done` by the time the epoch's ack arrives: take
                    // it first, or the epoch's row would go out without its figures.
                    self.take_encoded();
                    self.acked(n, at)?;
                }
                LinkEvent::Sent(n, took) => {
                    if let Some(f) = self.inflight.get_mut(&n) {
                        f.row.send = Some(took);
                    }
                }
                LinkEvent::Sums(_) => {
                    tracing::warn!("the backup sent disk sync fingerprints nobody asked for");
                }
                LinkEvent::HandedOver => self.handed_over = true,
                LinkEvent::StoodDown => {
                    if self.standing_down.take().is_some() {
                        tracing::info!(
                            "the stand-down is on the wire: the backup will not take over; \
                             releasing held output"
                        );
                        self.release_unprotected()?;
                    }
                }
                LinkEvent::Closed(why) => {
                    if matches!(self.phase, Phase::Syncing | Phase::Protected) {
                        self.backup_lost(&why)?;
                    } else if self.standing_down.take().is_some() {
                        tracing::warn!(
                            reason = %why,
                            "the link closed before the stand-down was written; releasing \
                             held output (the backup is gone or closed the session itself)"
                        );
                        self.release_unprotected()?;
                    }
                }
            }
            next_ev = self.link.try_recv().ok();
        }
        self.take_encoded();
        self.count_output();
        Ok(())
    }

    /// Put the encoder's reports into their epochs' rows (an epoch no longer in flight,
    /// after the backup was lost, only counts in the metrics).
    fn take_encoded(&mut self) {
        while let Ok(enc) = self.done.try_recv() {
            self.count_encoded(&enc);
            if let Some(f) = self.inflight.get_mut(&enc.epoch) {
                f.row.encoded = Some(enc);
            }
        }
    }

    /// An epoch left the encoder: its bytes and the cache's hit rate.
    fn count_encoded(&self, enc: &Encoded) {
        self.metrics
            .add_wire(&enc.stats, enc.wire_bytes - enc.disk.wire_bytes);
        self.metrics.add_disk(&enc.disk);
        self.metrics
            .raw_bytes
            .inc_by((enc.pages * PAGE_SIZE) as u64);
        if let Some(c) = enc.cache {
            self.metrics.cache_hit_rate.set(c.hit_rate());
        }
    }

    /// Output held now and released since the last count.
    fn count_output(&mut self) {
        let held = i64::try_from(self.held.held_records()).unwrap_or(i64::MAX);
        self.metrics.output_held.set(held);
        let released = self.held.released;
        self.metrics
            .output_released
            .inc_by(released.saturating_sub(self.released_seen));
        self.released_seen = released;
    }

    /// Enter `phase` (and show it in `castor_state`).
    fn set_phase(&mut self, phase: Phase) {
        self.phase = phase;
        self.metrics.set_state(phase.name());
    }

    /// Record a stall long enough for the backup to have declared this primary lost.
    fn watch(&mut self) {
        let stalled = self.stall.take();
        if stalled < self.stall_limit || !matches!(self.phase, Phase::Syncing | Phase::Protected) {
            return;
        }
        let worst = self.suspect.map_or(stalled, |s| s.stalled.max(stalled));
        self.suspect = Some(Suspect {
            stalled: worst,
            clears_at: self.epoch,
        });
        tracing::warn!(
            stalled_ms = stalled.as_millis() as u64,
            limit_ms = self.stall_limit.as_millis() as u64,
            held = self.held.held_records(),
            "this primary stood still long enough for the backup to take over: releasing \
             nothing until the backup acknowledges epoch {} or later",
            self.epoch
        );
        self.events.note(
            "stalled",
            json!({ "ms": stalled.as_millis() as u64, "clears_at": self.epoch }),
        );
    }

    fn acked(&mut self, n: u64, at: Instant) -> Result<(), EngineError> {
        if let Some(s) = self.suspect
            && n >= s.clears_at
        {
            tracing::info!(
                epoch = n,
                "the backup acknowledged an epoch taken after the stall: it did not take over"
            );
            self.suspect = None;
        }
        // Release first, so each row records what is still held after this ack. After a
        // stall nothing is released until the backup proves it still follows, and a
        // fenced primary releases nothing (the backup it closed the link to re-releases).
        if self.suspect.is_none() && matches!(self.phase, Phase::Syncing | Phase::Protected) {
            self.held.ack(n)?;
        }
        let held = self.held.held_records();
        let done: Vec<u64> = self.inflight.range(..=n).map(|(&e, _)| e).collect();
        for e in done {
            let Some(InFlight { mut row, since }) = self.inflight.remove(&e) else {
                continue;
            };
            row.ack_latency = Some(at.saturating_duration_since(since));
            row.held = held;
            if row.checkpoint {
                self.last_acked = e;
                self.summary.epochs_committed += 1;
                self.metrics.epochs_committed.inc();
                if let Some(l) = row.ack_latency {
                    self.metrics.ack_latency_seconds.observe(l.as_secs_f64());
                }
                if let Some(enc) = &row.encoded {
                    if let Some(t) = &mut self.summary.teleport {
                        t.checkpoint_refs += enc.stats.kind(Encoding::DiskRef).pages;
                    }
                    self.summary.wire_bytes += enc.wire_bytes;
                    self.summary.disk_wire_bytes += enc.disk.wire_bytes;
                    self.summary.disk_raw_bytes += enc.disk.raw_bytes;
                    self.summary.disk_writes += enc.disk.writes;
                }
                self.summary.raw_bytes += (row.dirty_pages * PAGE_SIZE) as u64;
            } else if let Some(enc) = &row.encoded {
                if let Some(t) = &mut self.summary.teleport {
                    t.precopy_refs += enc.stats.kind(Encoding::DiskRef).pages;
                }
                self.summary.precopy_wire_bytes += enc.wire_bytes;
                if let Some(sync) = &mut self.summary.disk_sync {
                    sync.block_wire_bytes += enc.disk.wire_bytes;
                }
            }
            if let Some(s) = &mut self.stats
                && let Err(err) = s.row(&row)
            {
                tracing::warn!(error = %err, "cannot write the stats file");
            }
        }
        if self.phase == Phase::Syncing && self.first_checkpoint.is_some_and(|f| n >= f) {
            self.set_phase(Phase::Protected);
            // Protected again after running unprotected: the backup's image is current.
            if let Some(lease) = &self.lease
                && (self.stale_marked || self.summary.reprotected > 0)
            {
                match lease.mark_stale(None) {
                    Ok(()) => self.stale_marked = false,
                    Err(e) => tracing::warn!(
                        error = %ha_daemon::error_chain(&e),
                        "lease: cannot clear the stale mark in etcd; a failover to this \
                         backup will be refused until it is cleared"
                    ),
                }
            }
            tracing::info!(
                epoch = n,
                "protected: the backup holds a committed checkpoint"
            );
            self.summary.sync_ms = self.born.elapsed().as_millis() as u64;
            self.events.note(
                "protected",
                json!({
                    "epoch": n,
                    "sync_ms": self.summary.sync_ms,
                    "precopy_wire_bytes": self.summary.precopy_wire_bytes,
                }),
            );
            if let Some(sync) = &self.summary.disk_sync {
                tracing::info!(
                    epoch = n,
                    blocks = sync.blocks,
                    disk_bytes = sync.disk_bytes,
                    sent_bytes = sync.fingerprint_bytes + sync.block_wire_bytes,
                    percent_of_disk = format!("{:.2}", 100.0 * sync.sent_ratio()),
                    "disk in sync: the backup checked its replica against this disk's digest"
                );
                self.events.note("disk_synced", json!(sync));
            }
        }
        Ok(())
    }

    /// The backup is lost: end the session for good and follow the policy. After a stall
    /// the backup may have taken over, so the guest is fenced whatever the policy.
    fn backup_lost(&mut self, why: &str) -> Result<(), EngineError> {
        self.watch();
        self.summary.backup_lost = true;
        self.inflight.clear();
        let held = self.held.held_records();
        // Holding the guest's key, this primary knows the backup cannot have taken over:
        // it runs on (the lease, not the policy, fences it if it loses etcd too).
        let leased = self.lease.as_ref().is_some_and(ha_lease::Lease::is_held);
        if leased {
            tracing::warn!(
                reason = why,
                held,
                "backup lost: this primary holds the guest's key in etcd, so the backup cannot \
                 take over; continuing unprotected"
            );
            self.events
                .note("backup_lost", json!({ "reason": why, "policy": "lease" }));
            let reason = format!(
                "the primary declared this backup lost ({why}) and runs on unprotected, holding \
                 the guest's key"
            );
            if self.ctl.send(Control::StandDown(reason)).is_ok() {
                self.standing_down = Some(Instant::now());
            }
            self.set_phase(Phase::Unprotected);
            self.start_reconnecting()?;
            self.release_if_stood_down()?;
        } else if let Some(s) = self.suspect {
            let stalled_ms = s.stalled.as_millis() as u64;
            tracing::error!(
                reason = why,
                stalled_ms,
                held,
                "backup lost after this primary stood still for {stalled_ms} ms: assuming the \
                 backup took over the guest; fencing it here (paused; held output is never \
                 released)"
            );
            self.events.note(
                "backup_lost",
                json!({
                    "reason": why,
                    "policy": "fence",
                    "stalled_ms": stalled_ms,
                    "assumed": "the backup took over",
                }),
            );
            self.fence()?;
        } else if self.cfg.fence {
            tracing::error!(
                reason = why,
                held,
                "backup lost: fencing the guest (paused; held output stays held; the link \
                 is closed so a live backup takes over)"
            );
            self.events
                .note("backup_lost", json!({ "reason": why, "policy": "fence" }));
            self.fence()?;
        } else {
            tracing::warn!(
                reason = why,
                held,
                "backup lost: continuing unprotected (telling the backup to stand down; held \
                 output is released once that is on the wire)"
            );
            self.events.note(
                "backup_lost",
                json!({ "reason": why, "policy": "continue" }),
            );
            let reason =
                format!("the primary declared this backup lost ({why}) and runs on unprotected");
            if self.ctl.send(Control::StandDown(reason)).is_ok() {
                self.standing_down = Some(Instant::now());
            }
            self.set_phase(Phase::Unprotected);
            self.start_reconnecting()?;
            self.release_if_stood_down()?;
        }
        self.count_output();
        Ok(())
    }

    /// With `--reprotect`, start trying to reach a backup at the same address again.
    fn start_reconnecting(&mut self) -> Result<(), EngineError> {
        if !self.cfg.reprotect || self.reconnecting.is_some() {
            return Ok(());
        }
        let stop = Arc::new(AtomicBool::new(false));
        let rx = reconnect(self.cfg, hello(self.cfg, self.d), Arc::clone(&stop))?;
        self.reconnecting = Some(Reconnecting {
            rx,
            stop,
            since: Instant::now(),
        });
        Ok(())
    }

    /// Pause the guest, close the link, and stay fenced.
    fn fence(&mut self) -> Result<(), EngineError> {
        let _ = self.ctl.send(Control::Close);
        if !self.d.is_paused() {
            self.d.pause()?;
        }
        self.set_phase(Phase::Fenced);
        Ok(())
    }

    /// Unprotected: release what is held unless a stand-down is still on its way (then
    /// wait for it, at most the ack timeout).
    fn release_if_stood_down(&mut self) -> Result<(), EngineError> {
        if let Some(since) = self.standing_down {
            if since.elapsed() < self.cfg.ack_timeout {
                return Ok(());
            }
            tracing::warn!(
                waited_ms = since.elapsed().as_millis() as u64,
                "the stand-down is still not written (the backup reads nothing); releasing \
                 held output: should the backup resume, it reads the stand-down first"
            );
            self.standing_down = None;
        }
        self.release_unprotected()
    }

    /// Release held output the backup never committed. With a lease, only once etcd says
    /// the backup's image is stale ([`ha_lease::stale_key`]): should this primary lose its
    /// lease later, the backup must not take over from behind output the world saw. Until
    /// etcd has the mark the output stays held (tried again at the next interval).
    fn release_unprotected(&mut self) -> Result<(), EngineError> {
        if let Some(lease) = &self.lease
            && !self.stale_marked
        {
            let why = format!(
                "{} ran the guest unprotected after checkpoint {}",
                ha_lease::holder("ha-primary"),
                self.last_acked
            );
            match lease.mark_stale(Some(why)) {
                Ok(()) => {
                    tracing::info!(
                        last_acked = self.last_acked,
                        "lease: etcd marks the backup's image stale; releasing unprotected output"
                    );
                    self.events.note(
                        "backup_marked_stale",
                        json!({ "last_acked": self.last_acked }),
                    );
                    self.stale_marked = true;
                }
                Err(e) => {
                    tracing::warn!(
                        error = %ha_daemon::error_chain(&e),
                        held = self.held.held_records(),
                        "lease: cannot mark the backup's image stale in etcd; output stays held"
                    );
                    return Ok(());
                }
            }
        }
        self.held.release_all()?;
        Ok(())
    }

    /// Tell the backup to stand down: the guest goes on without this primary (a Xen domain
    /// outlives ha-primary), so a takeover would run it twice. Waits up to
    /// [`STAND_DOWN_WAIT`] for the backup to close the session; says so if it could not.
    fn stand_down(&mut self, why: &str) {
        if !matches!(self.phase, Phase::Syncing | Phase::Protected) {
            return; // the session has ended already
        }
        // Sent (the link's writer says so), then the backup closes the session once it has
        // read it. The two come from different threads: the reader may see the backup close
        // before the writer reports the frame written.
        let (mut sent, mut closed) = (false, false);
        // The backup's close when it came before the frame was written: it may have read
        // the stand-down, or died just before (a dead backup takes nothing over either).
        let mut closed_first = None;
        if self.ctl.send(Control::StandDown(why.to_owned())).is_ok() {
            let deadline = Instant::now() + STAND_DOWN_WAIT;
            while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                match self.link.recv_timeout(left) {
                    Ok(LinkEvent::StoodDown) => {
                        sent = true;
                        // The backup will not take over: the guest's packets may go.
                        if let Err(err) = self.held.open_plugs() {
                            tracing::warn!(
                                error = %ha_daemon::error_chain(&err),
                                "cannot release held output after the stand-down"
                            );
                        }
                    }
                    // Before the frame was written, the writer's word is still to come; a
                    // second close (the writer's own failure) ends the wait.
                    Ok(LinkEvent::Closed(close)) if sent || !closed => {
                        if !sent {
                            closed_first = Some(close);
                        }
                        closed = true;
                    }
                    Ok(LinkEvent::Closed(_)) | Err(_) => break,
                    Ok(_) => {}
                }
                if sent && closed {
                    match &closed_first {
                        None => tracing::warn!(
                            reason = why,
                            "the backup stood down: the guest goes on here, unprotected"
                        ),
                        Some(close) => tracing::warn!(
                            reason = why,
                            close = %close,
                            "the backup closed the session as the stand-down was sent (it \
                             read it, or was gone): the guest goes on here, unprotected"
                        ),
                    }
                    self.events.note("stood_down", json!({ "reason": why }));
                    return;
                }
            }
        }
        if sent {
            tracing::warn!(
                reason = why,
                "told the backup to stand down; it did not close the session within {:?}",
                STAND_DOWN_WAIT
            );
            self.events
                .note("stood_down", json!({ "reason": why, "confirmed": false }));
            return;
        }
        tracing::error!(
            reason = why,
            "could not tell the backup to stand down: it may take over while the guest \
             still runs here"
        );
    }

    /// Add this session's counters to the run's summary (a run with `--reprotect` may
    /// have several sessions).
    fn fold_session(&mut self) {
        self.summary.outputs_released += self.held.released;
        self.summary.net_marks += self.held.marks;
        self.summary.net_folded += self.held.folded;
        self.summary.pause_copies += self.cow.taken[0];
        self.summary.cow_copies += self.cow.taken[1];
        self.summary.cow_faulted += self.cow.faulted();
        self.count_output();
    }

    fn finish(&mut self) {
        let mut p = self.summary.pauses_us.clone();
        p.sort_unstable();
        let pct = |q: usize| {
            p.get((p.len().saturating_sub(1) * q) / 100)
                .map_or(0.0, |&v| v as f64 / 1000.0)
        };
        self.summary.pause_ms_p50 = pct(50);
        self.summary.pause_ms_p99 = pct(99);
        self.fold_session();
        self.events.note(
            "stopped",
            serde_json::to_value(&self.summary).unwrap_or_default(),
        );
    }
}

/// How long this process may stand still before the backup, which declares it lost after
/// `detect` without a frame, may have done so: the last frame before a stall can be up to
/// a `heartbeat` old, so `detect - heartbeat`, and never more than half of `detect`.
fn stall_limit(detect: Duration, heartbeat: Duration) -> Duration {
    detect.saturating_sub(heartbeat).min(detect / 2)
}

/// Split pages into pre-copy-sized epochs.
fn split(p: Pages) -> Vec<Pages> {
    if p.len() <= PRECOPY_CHUNK {
        return vec![p];
    }
    p.index
        .chunks(PRECOPY_CHUNK)
        .zip(p.data.chunks(PRECOPY_CHUNK * PAGE_SIZE))
        .map(|(i, d)| Pages {
            index: i.to_vec(),
            data: d.to_vec(),
            pending: None,
        })
        .collect()
}
