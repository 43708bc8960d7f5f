//! The contract between a built-in workload guest and the VMM that runs it.
//!
//! Every backend (KVM, simulated) lays out the same pages at the same guest-physical
//! addresses, so the epoch engine, the drill and the tests can read a guest's progress and
//! drain its output the same way whatever runs it. All integers are little-endian.
//!
//! ```text
//! 0x0000_1000  params page   written by the VMM before the first run, read-only to the guest
//! 0x0000_2000  status page   progress counter, checksum, output head (guest) / tail (VMM)
//! 0x0000_4000  output ring   OUTPUT_RING_SLOTS records of 64 bytes
//! 0x0006_0000  disk queue    the virtqueue of the disk driver (KVM; see `disk`)
//! 0x0010_0000  heap          the workload's working set starts here (HEAP_GPA)
//! 0x4_0000_0000 disk window  the virtio-mmio registers of the disk (KVM; no memory there)
//! ```
//! Other addresses below the heap belong to the backend (page tables, code, stack).

use ha_codec::PAGE_SIZE;

/// Guest-physical address of the parameter page.
pub const PARAMS_GPA: u64 = 0x1000;
/// Guest-physical address of the status page.
pub const STATUS_GPA: u64 = 0x2000;
/// Guest-physical address of the output ring.
pub const OUTPUT_RING_GPA: u64 = 0x4000;
/// Number of 64-byte slots in the output ring (16 pages).
pub const OUTPUT_RING_SLOTS: u64 = 1024;
/// Size of one output record slot.
pub const OUTPUT_RECORD_SIZE: usize = 64;
/// Payload bytes carried by one output record.
pub const OUTPUT_PAYLOAD: usize = 48;
/// Lowest guest-physical address a workload's heap may use.
pub const HEAP_GPA: u64 = 0x10_0000;
/// The I/O port a guest writes to when it wants its output ring drained.
pub const DOORBELL_PORT: u16 = 0xC45;
/// Magic number at the start of the params page: "CASTORG1".
pub const PARAMS_MAGIC: u64 = u64::from_le_bytes(*b"CASTORG1");
/// Version of this ABI.
pub const ABI_VERSION: u32 = 3;

/// Byte offsets inside the params page.
pub mod params {
    /// u64 [`super::PARAMS_MAGIC`].
    pub const MAGIC: usize = 0;
    /// u32 [`super::ABI_VERSION`].
    pub const VERSION: usize = 8;
    /// u32 workload number ([`super::Workload`] as u32).
    pub const WORKLOAD: usize = 12;
    /// u64 PRNG seed.
    pub const SEED: usize = 16;
    /// u64 first GPA of the working set.
    pub const HEAP_GPA: usize = 24;
    /// u64 size of the working set in bytes (a multiple of 4096).
    pub const HEAP_SIZE: usize = 32;
    /// u64 target write operations per second (0: as fast as it can).
    pub const RATE: usize = 40;
    /// u64 TSC frequency in kHz, for pacing (0: unknown, no pacing).
    pub const TSC_KHZ: usize = 48;
    /// u64 emit one output record every this many work units (0: never).
    pub const OUTPUT_EVERY: usize = 56;
    /// u64 ring the doorbell after this many undrained records.
    pub const DOORBELL_EVERY: usize = 64;
    /// u64 size of the guest's disk in bytes (0: no disk), written by the VMM.
    pub const DISK_SIZE: usize = 72;
}

/// The disk as the built-in guests use it: 512-byte sectors, 4 KiB requests. On KVM the
/// guest drives a virtio-blk device (virtio-mmio) through one virtqueue at fixed addresses
/// below the heap; the transport's registers sit in a window above any guest memory.
pub mod disk {
    /// Bytes per sector (virtio-blk's unit of `sector`).
    pub const SECTOR: u64 = 512;
    /// Bytes per disk page, the unit the disk workloads read and write.
    pub const PAGE: u64 = 4096;
    /// Guest-physical address of the virtio-mmio register window (16 GiB: above the
    /// largest guest memory, so every access exits to the VMM).
    pub const MMIO_GPA: u64 = 0x4_0000_0000;
    /// Size of the register window.
    pub const MMIO_SIZE: u64 = 0x1000;
    /// Entries of the virtqueue.
    pub const QUEUE_SIZE: u16 = 16;
    /// The descriptor table (16 bytes per entry).
    pub const DESC_GPA: u64 = 0x6_0000;
    /// The available ring.
    pub const AVAIL_GPA: u64 = 0x6_1000;
    /// The used ring.
    pub const USED_GPA: u64 = 0x6_2000;
    /// Request headers, 16 bytes per request slot.
    pub const HEADERS_GPA: u64 = 0x6_3000;
    /// Status bytes, 16 bytes apart, one per request slot.
    pub const STATUS_GPA: u64 = 0x6_3800;
    /// Most requests the driver puts in one batch (one doorbell).
    pub const MAX_BATCH: u64 = 4;
}

/// Byte offsets inside the status page.
pub mod status {
    /// u64 work units completed (guest-owned). Never goes back, never skips.
    pub const PROGRESS: usize = 0;
    /// u64 running checksum of every value the guest wrote (guest-owned).
    pub const CHECKSUM: usize = 8;
    /// u64 number of output records produced = next sequence number (guest-owned).
    pub const OUT_HEAD: usize = 16;
    /// u64 PRNG state of the workload (guest-owned).
    pub const RNG: usize = 24;
    /// u64 disk requests that completed with an error status or read back wrong
    /// (guest-owned; the disk workloads go on after one).
    pub const DISK_ERRORS: usize = 32;
    /// u64 non-zero once the guest's disk driver has set its device up (guest-owned).
    pub const DISK_READY: usize = 40;
    /// u64 number of output records drained by the VMM (VMM-owned; own cache line).
    pub const OUT_TAIL: usize = 64;
}

/// The built-in workloads a guest can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// Does nothing but keep its counters; dirties almost nothing.
    Idle = 0,
    /// lmbench-style sequential sweep over the working set, one word per block.
    Memwrite = 1,
    /// Apache/SPECweb-like: a Zipf-hot session record of 1 to 16 scattered words, a log
    /// append, and a partial response-buffer write every other request (calibrated to the
    /// real httpd page pairs; see docs/GUESTS.md).
    Web = 2,
    /// Random 128-byte record updates, 80 % to a 10 % hot set.
    Kv = 3,
    /// Dense array sweeps (NPB-like).
    Npb = 4,
    /// A write-ahead-logged key-value store on the guest's disk: record updates in memory,
    /// a log page written and flushed every `output_every` updates, table pages written
    /// back in place and read back and checked (needs a disk; docs/GUESTS.md).
    Db = 5,
    /// A file server over a document tree on the guest's disk: files read into a bounded
    /// page cache in guest memory and served (their content hashed into a response),
    /// an access log appended to the disk, now and then a file rewritten (needs a disk
    /// holding the tree; docs/GUESTS.md).
    Files = 6,
}

impl Workload {
    /// All workloads, in ABI order.
    pub const ALL: [Workload; 7] = [
        Workload::Idle,
        Workload::Memwrite,
        Workload::Web,
        Workload::Kv,
        Workload::Npb,
        Workload::Db,
        Workload::Files,
    ];

    /// The workloads that need nothing but memory (every one but the disk workloads).
    pub const MEMORY: [Workload; 5] = [
        Workload::Idle,
        Workload::Memwrite,
        Workload::Web,
        Workload::Kv,
        Workload::Npb,
    ];

    /// Whether the workload needs a disk.
    pub fn needs_disk(self) -> bool {
        matches!(self, Workload::Db | Workload::Files)
    }

    /// The workload with ABI number `n`.
    pub fn from_u32(n: u32) -> Option<Self> {
        Self::ALL.get(n as usize).copied()
    }

    /// The lowercase name used on command lines.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Idle => "idle",
            Workload::Memwrite => "memwrite",
            Workload::Web => "web",
            Workload::Kv => "kv",
            Workload::Npb => "npb",
            Workload::Db => "db",
            Workload::Files => "files",
        }
    }

    /// The default pace in work units per second.
    ///
    /// `web` runs 2 500 requests/s: calibrated (docs/GUESTS.md, "`web` calibration") to the
    /// real busybox-httpd page pairs `httpd_100ms_1`, about 370 dirty pages per 100 ms with a
    /// median of 7 changed 64-byte blocks per dirty page in a 256 MiB guest (the trace: 348
    /// pages, median 6). The others keep the historical 20 000 units/s.
    pub fn default_rate(self) -> u64 {
        match self {
            Workload::Web => 2_500,
            Workload::Idle | Workload::Memwrite | Workload::Kv | Workload::Npb => 20_000,
            // Every 16th update writes a table page back and every 32nd reads one, through
            // the disk's doorbell (an MMIO exit of ~30 µs on the PVM host).
            Workload::Db => 2_000,
            // A request hashes a whole file (1 to 16 pages) and misses now and then.
            Workload::Files => 1_000,
        }
    }

    /// The default working-set size for a guest of `memory_size` bytes: all memory above
    /// [`HEAP_GPA`] less 1 MiB, rounded down to whole pages (0 if the guest is too small).
    ///
    /// The same for every workload: the `web` calibration hardly depends on the heap (the
    /// model gives 318–368 dirty pages per 100 ms from 16 MiB to 254 MiB heaps at its default
    /// rate), so it needs no specific working set.
    pub fn default_heap(self, memory_size: u64) -> u64 {
        let heap = memory_size.saturating_sub(HEAP_GPA + (1 << 20));
        heap - heap % PAGE_SIZE as u64
    }
}

impl std::str::FromStr for Workload {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|w| w.name() == s)
            .ok_or_else(|| {
                format!("unknown workload {s:?} (idle, memwrite, web, kv, npb, db, files)")
            })
    }
}

/// What the VMM tells a guest before it first runs.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GuestParams {
    /// Which workload to run.
    pub workload: Workload,
    /// PRNG seed.
    pub seed: u64,
    /// First GPA of the working set.
    pub heap_gpa: u64,
    /// Working-set size in bytes.
    pub heap_size: u64,
    /// Target write operations per second (0: unthrottled).
    pub rate: u64,
    /// TSC frequency in kHz (0: no pacing).
    pub tsc_khz: u64,
    /// One output record every this many work units (0: none).
    pub output_every: u64,
    /// Doorbell after this many undrained records.
    pub doorbell_every: u64,
    /// Size of the guest's disk in bytes (0: none). The backend fills it in from the disk
    /// it attaches, as it does `tsc_khz`.
    #[serde(default)]
    pub disk_size: u64,
}

impl GuestParams {
    /// Serialize into a params page.
    pub fn write_page(&self, page: &mut [u8]) {
        put_u64(page, params::MAGIC, PARAMS_MAGIC);
        page[params::VERSION..params::VERSION + 4].copy_from_slice(&ABI_VERSION.to_le_bytes());
        page[params::WORKLOAD..params::WORKLOAD + 4]
            .copy_from_slice(&(self.workload as u32).to_le_bytes());
        put_u64(page, params::SEED, self.seed);
        put_u64(page, params::HEAP_GPA, self.heap_gpa);
        put_u64(page, params::HEAP_SIZE, self.heap_size);
        put_u64(page, params::RATE, self.rate);
        put_u64(page, params::TSC_KHZ, self.tsc_khz);
        put_u64(page, params::OUTPUT_EVERY, self.output_every);
        put_u64(page, params::DOORBELL_EVERY, self.doorbell_every);
        put_u64(page, params::DISK_SIZE, self.disk_size);
    }

    /// Parse a params page; `None` if the magic or version is wrong.
    pub fn read_page(page: &[u8]) -> Option<Self> {
        if get_u64(page, params::MAGIC) != PARAMS_MAGIC {
            return None;
        }
        let version =
            u32::from_le_bytes(page[params::VERSION..params::VERSION + 4].try_into().ok()?);
        if version != ABI_VERSION {
            return None;
        }
        let w = u32::from_le_bytes(
            page[params::WORKLOAD..params::WORKLOAD + 4]
                .try_into()
                .ok()?,
        );
        Some(Self {
            workload: Workload::from_u32(w)?,
            seed: get_u64(page, params::SEED),
            heap_gpa: get_u64(page, params::HEAP_GPA),
            heap_size: get_u64(page, params::HEAP_SIZE),
            rate: get_u64(page, params::RATE),
            tsc_khz: get_u64(page, params::TSC_KHZ),
            output_every: get_u64(page, params::OUTPUT_EVERY),
            doorbell_every: get_u64(page, params::DOORBELL_EVERY),
            disk_size: get_u64(page, params::DISK_SIZE),
        })
    }
}

/// A snapshot of a guest's status page.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GuestStatus {
    /// Work units completed.
    pub progress: u64,
    /// Running checksum of what the guest wrote.
    pub checksum: u64,
    /// Output records produced (next sequence number).
    pub out_head: u64,
    /// Output records drained by the VMM.
    pub out_tail: u64,
    /// Disk requests that failed or read back wrong (the disk workloads).
    #[serde(default)]
    pub disk_errors: u64,
}

impl GuestStatus {
    /// Parse a status page.
    pub fn read_page(page: &[u8]) -> Self {
        Self {
            progress: get_u64(page, status::PROGRESS),
            checksum: get_u64(page, status::CHECKSUM),
            out_head: get_u64(page, status::OUT_HEAD),
            out_tail: get_u64(page, status::OUT_TAIL),
            disk_errors: get_u64(page, status::DISK_ERRORS),
        }
    }
}

/// One output record: the guest's "network output", held back by output commit.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OutputRecord {
    /// Sequence number: 0, 1, 2, … with no gaps.
    pub seq: u64,
    /// Payload, at most [`OUTPUT_PAYLOAD`] bytes.
    pub payload: Vec<u8>,
}

impl OutputRecord {
    /// Guest-physical address of the ring slot that holds sequence number `seq`.
    pub fn slot_gpa(seq: u64) -> u64 {
        OUTPUT_RING_GPA + (seq % OUTPUT_RING_SLOTS) * OUTPUT_RECORD_SIZE as u64
    }

    /// Parse a 64-byte slot: u64 seq, u32 len, u32 reserved, 48 bytes payload.
    /// `None` if the length is out of range.
    pub fn read_slot(slot: &[u8]) -> Option<Self> {
        if slot.len() < OUTPUT_RECORD_SIZE {
            return None;
        }
        let seq = get_u64(slot, 0);
        let len = u32::from_le_bytes(slot[8..12].try_into().ok()?) as usize;
        if len > OUTPUT_PAYLOAD {
            return None;
        }
        Some(Self {
            seq,
            payload: slot[16..16 + len].to_vec(),
        })
    }

    /// Serialize into a 64-byte slot (payload truncated to [`OUTPUT_PAYLOAD`]).
    pub fn write_slot(&self, slot: &mut [u8]) {
        let len = self.payload.len().min(OUTPUT_PAYLOAD);
        slot[..OUTPUT_RECORD_SIZE].fill(0);
        put_u64(slot, 0, self.seq);
        slot[8..12].copy_from_slice(&(len as u32).to_le_bytes());
        slot[16..16 + len].copy_from_slice(&self.payload[..len]);
    }
}

/// The running checksum step every workload applies to each value it writes:
/// `sum = (sum rotl 5) ^ value) * K`. Backends implement it identically.
pub fn checksum_step(sum: u64, value: u64) -> u64 {
    (sum.rotate_left(5) ^ value).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Number of pages a guest of `memory_size` bytes has.
pub fn page_count(memory_size: u64) -> usize {
    (memory_size / PAGE_SIZE as u64) as usize
}

fn get_u64(buf: &[u8], off: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[off..off + 8]);
    u64::from_le_bytes(b)
}

fn put_u64(buf: &mut [u8], off: usize, v: u64) {
    buf[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_roundtrip_and_reject_bad_magic() {
        let p = GuestParams {
            workload: Workload::Kv,
            seed: 7,
            heap_gpa: HEAP_GPA,
            heap_size: 1 << 20,
            rate: 1000,
            tsc_khz: 2_000_000,
            output_every: 64,
            doorbell_every: 32,
            disk_size: 1 << 20,
        };
        let mut page = vec![0u8; PAGE_SIZE];
        p.write_page(&mut page);
        assert_eq!(GuestParams::read_page(&page), Some(p));
        page[0] ^= 1;
        assert_eq!(GuestParams::read_page(&page), None);
    }

    #[test]
    fn record_slot_roundtrip_and_length_check() {
        let r = OutputRecord {
            seq: 1025,
            payload: b"hello".to_vec(),
        };
        let mut slot = [0u8; OUTPUT_RECORD_SIZE];
        r.write_slot(&mut slot);
        assert_eq!(OutputRecord::read_slot(&slot), Some(r));
        assert_eq!(OutputRecord::slot_gpa(1025), OUTPUT_RING_GPA + 64);
        slot[8] = 49;
        assert_eq!(OutputRecord::read_slot(&slot), None);
    }

    #[test]
    fn workload_names_parse() {
        for w in Workload::ALL {
            assert_eq!(w.name().parse::<Workload>(), Ok(w));
        }
        assert!("apache".parse::<Workload>().is_err());
    }

    #[test]
    fn default_parameters() {
        assert_eq!(Workload::Web.default_rate(), 2_500);
        for w in [
            Workload::Idle,
            Workload::Memwrite,
            Workload::Kv,
            Workload::Npb,
        ] {
            assert_eq!(w.default_rate(), 20_000);
        }
        assert!(
            Workload::ALL
                .iter()
                .all(|w| w.needs_disk() != Workload::MEMORY.contains(w))
        );
        for w in Workload::ALL {
            assert_eq!(w.default_heap(256 << 20), 254 << 20);
            assert_eq!(w.default_heap((2 << 20) + 5000), 4096);
            assert_eq!(w.default_heap(1 << 20), 0);
        }
    }
}
