//! The disk driven the way a guest drives it: a small driver in guest memory (descriptor
//! table, available and used rings) programming the device through its MMIO registers.

use std::path::PathBuf;

use ha_guest::domain::{DiskRead, DiskWrite};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::blk::{
    Blk, BlkError, DISK_ID, MAX_REQUEST_BYTES, SECTOR_SIZE, STATUS_IOERR, STATUS_OK, STATUS_UNSUPP,
};
use crate::mmio::MMIO_MAGIC;

const MEM: usize = 1 << 20;
const QSIZE: u16 = 16;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const HEADER: u64 = 0x4000;
const STATUS: u64 = 0x4100;
const BUF: u64 = 0x10000;
/// Disk size used by most tests: 256 KiB.
const DISK: u64 = 256 << 10;

/// A scratch image of `size` bytes holding a pattern, so reads of unwritten sectors are
/// checked too.
fn image(name: &str, size: u64) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ha-virtio-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("disk.img");
    let bytes: Vec<u8> = (0..size).map(|i| (i * 7 + i / 512) as u8).collect();
    std::fs::write(&p, bytes).unwrap();
    p
}

/// One buffer of a request: where it is in guest memory and its length.
#[derive(Clone, Copy)]
struct Buf {
    addr: u64,
    len: u32,
}

/// A polling driver, as the built-in guests' will be.
struct Driver {
    mem: GuestMemoryMmap,
    next_avail: u16,
    seen_used: u16,
}

impl Driver {
    fn new() -> Self {
        Self {
            mem: GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap(),
            next_avail: 0,
            seen_used: 0,
        }
    }

    fn reg(&self, blk: &Blk, offset: u32) -> u32 {
        let mut b = [0u8; 4];
        blk.mmio_read(u64::from(offset), &mut b);
        u32::from_le_bytes(b)
    }

    fn set(&self, blk: &mut Blk, offset: u32, v: u32) -> usize {
        blk.mmio_write(&self.mem, u64::from(offset), &v.to_le_bytes())
    }

    /// The virtio 1.x initialisation sequence; `version_1` false plays a legacy driver.
    fn init(&self, blk: &mut Blk, version_1: bool) -> u32 {
        self.set(blk, VIRTIO_MMIO_STATUS, 0);
        self.set(blk, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        self.set(blk, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_DRIVER);
        self.set(blk, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        let high = self.reg(blk, VIRTIO_MMIO_DEVICE_FEATURES);
        assert_ne!(
            high & (1 << (VIRTIO_F_VERSION_1 - 32)),
            0,
            "VERSION_1 offered"
        );
        self.set(blk, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        self.set(
            blk,
            VIRTIO_MMIO_DRIVER_FEATURES,
            if version_1 { high } else { 0 },
        );
        self.set(blk, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_FEATURES_OK);
        let status = self.reg(blk, VIRTIO_MMIO_STATUS);
        if status & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            return status;
        }
        self.set(blk, VIRTIO_MMIO_QUEUE_SEL, 0);
        assert!(self.reg(blk, VIRTIO_MMIO_QUEUE_NUM_MAX) >= u32::from(QSIZE));
        self.set(blk, VIRTIO_MMIO_QUEUE_NUM, u32::from(QSIZE));
        for (low, high, addr) in [
            (
                VIRTIO_MMIO_QUEUE_DESC_LOW,
                VIRTIO_MMIO_QUEUE_DESC_HIGH,
                DESC,
            ),
            (
                VIRTIO_MMIO_QUEUE_AVAIL_LOW,
                VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
                AVAIL,
            ),
            (
                VIRTIO_MMIO_QUEUE_USED_LOW,
                VIRTIO_MMIO_QUEUE_USED_HIGH,
                USED,
            ),
        ] {
            self.set(blk, low, addr as u32);
            self.set(blk, high, (addr >> 32) as u32);
        }
        self.set(blk, VIRTIO_MMIO_QUEUE_READY, 1);
        self.set(blk, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_DRIVER_OK);
        self.reg(blk, VIRTIO_MMIO_STATUS)
    }

    /// Write descriptor `i`.
    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(DESC + 16 * u64::from(i));
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&d, at).unwrap();
    }

    /// Make the chain headed by descriptor `head` available (without ringing).
    fn offer(&mut self, head: u16) {
        let slot = AVAIL + 4 + 2 * u64::from(self.next_avail % QSIZE);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.next_avail = self.next_avail.wrapping_add(1);
        self.mem
            .write_obj(self.next_avail, GuestAddress(AVAIL + 2))
            .unwrap();
    }

    /// A request as a chain 0..: header, `bufs` (device-writable for IN and GET_ID), status;
    /// rung at once. Returns (status byte, used length) from the used ring.
    fn request(&mut self, blk: &mut Blk, kind: u32, sector: u64, bufs: &[Buf]) -> (u8, u32) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(HEADER)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let inbound = kind == VIRTIO_BLK_T_IN || kind == VIRTIO_BLK_T_GET_ID;
        let n = bufs.len() as u16;
        self.desc(0, HEADER, 16, VRING_DESC_F_NEXT as u16, 1);
        for (i, b) in bufs.iter().enumerate() {
            let w = if inbound {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            let i = i as u16 + 1;
            self.desc(i, b.addr, b.len, w | VRING_DESC_F_NEXT as u16, i + 1);
        }
        self.desc(n + 1, STATUS, 1, VRING_DESC_F_WRITE as u16, 0);
        self.offer(0);
        self.ring(blk)
    }

    /// Ring the doorbell and read the completion of the one chain offered.
    fn ring(&mut self, blk: &mut Blk) -> (u8, u32) {
        assert_eq!(
            self.set(blk, VIRTIO_MMIO_QUEUE_NOTIFY, 0),
            1,
            "one completion"
        );
        let used_idx: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap();
        assert_eq!(used_idx, self.seen_used.wrapping_add(1));
        let elem = USED + 4 + 8 * u64::from(self.seen_used % QSIZE);
        self.seen_used = used_idx;
        let id: u32 = self.mem.read_obj(GuestAddress(elem)).unwrap();
        assert_eq!(id, 0, "the head of the chain");
        let len: u32 = self.mem.read_obj(GuestAddress(elem + 4)).unwrap();
        (self.mem.read_obj(GuestAddress(STATUS)).unwrap(), len)
    }

    fn bytes(&self, b: Buf) -> Vec<u8> {
        let mut v = vec![0u8; b.len as usize];
        self.mem.read_slice(&mut v, GuestAddress(b.addr)).unwrap();
        v
    }
}

/// A small deterministic generator (xorshift) for the seeded cases.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// `total` bytes split into 1 to 3 buffers at unaligned guest addresses.
fn split(rng: &mut Rng, total: u32) -> Vec<Buf> {
    let parts = 1 + rng.below(3) as u32;
    let mut bufs = Vec::new();
    let mut addr = BUF + rng.below(64);
    let mut left = total;
    for i in 0..parts {
        let len = if i + 1 == parts {
            left
        } else {
            (rng.below(u64::from(left) + 1)) as u32
        };
        if len == 0 {
            continue;
        }
        bufs.push(Buf { addr, len });
        addr += u64::from(len) + 1 + rng.below(100);
        left -= len;
    }
    bufs
}

fn live(name: &str) -> (Driver, Blk, PathBuf) {
    let path = image(name, DISK);
    let mut blk = Blk::open(&path).unwrap();
    let d = Driver::new();
    let status = d.init(&mut blk, true);
    assert_eq!(
        status & VIRTIO_CONFIG_S_DRIVER_OK,
        VIRTIO_CONFIG_S_DRIVER_OK
    );
    assert_eq!(status & VIRTIO_CONFIG_S_FAILED, 0);
    (d, blk, path)
}

#[test]
fn registers_identify_a_block_device_of_the_files_size() {
    let path = image("regs", DISK);
    let blk = Blk::open(&path).unwrap();
    let d = Driver::new();
    assert_eq!(d.reg(&blk, VIRTIO_MMIO_MAGIC_VALUE), MMIO_MAGIC);
    assert_eq!(d.reg(&blk, VIRTIO_MMIO_VERSION), 2);
    assert_eq!(d.reg(&blk, VIRTIO_MMIO_DEVICE_ID), 2);
    let mut cap = [0u8; 8];
    blk.mmio_read(u64::from(VIRTIO_MMIO_CONFIG), &mut cap);
    assert_eq!(u64::from_le_bytes(cap), DISK / SECTOR_SIZE);
    assert_eq!(blk.size(), DISK);
}

#[test]
fn a_legacy_driver_does_not_get_features_ok_and_notifies_are_ignored() {
    let path = image("legacy", DISK);
    let mut blk = Blk::open(&path).unwrap();
    let d = Driver::new();
    let status = d.init(&mut blk, false);
    assert_eq!(status & VIRTIO_CONFIG_S_FEATURES_OK, 0);
    // DRIVER_OK without FEATURES_OK marks the driver failed; the doorbell does nothing.
    d.set(&mut blk, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_DRIVER_OK);
    assert_ne!(d.reg(&blk, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FAILED, 0);
    assert_eq!(d.set(&mut blk, VIRTIO_MMIO_QUEUE_NOTIFY, 0), 0);
}

#[test]
fn every_size_and_alignment_reads_back_as_the_model_says_and_the_log_replays_it() {
    let (mut d, mut blk, path) = live("rw");
    let original = std::fs::read(&path).unwrap();
    let mut model = original.clone();
    let mut rng = Rng(0x5eed);
    let mut log = Vec::new();
    for round in 0..300 {
        let sectors = 1 + rng.below(32);
        let sector = rng.below(DISK / SECTOR_SIZE - sectors + 1);
        let total = (sectors * SECTOR_SIZE) as u32;
        let bufs = split(&mut rng, total);
        let at = (sector * SECTOR_SIZE) as usize;
        if rng.below(2) == 0 {
            let mut expect = Vec::new();
            for b in &bufs {
                let bytes: Vec<u8> = (0..b.len).map(|_| rng.next() as u8).collect();
                d.mem.write_slice(&bytes, GuestAddress(b.addr)).unwrap();
                expect.extend_from_slice(&bytes);
            }
            assert_eq!(
                d.request(&mut blk, VIRTIO_BLK_T_OUT, sector, &bufs),
                (STATUS_OK, 1),
                "round {round}"
            );
            model[at..at + expect.len()].copy_from_slice(&expect);
        } else {
            assert_eq!(
                d.request(&mut blk, VIRTIO_BLK_T_IN, sector, &bufs),
                (STATUS_OK, total + 1),
                "round {round}"
            );
            let got: Vec<u8> = bufs.iter().flat_map(|b| d.bytes(*b)).collect();
            assert_eq!(got, model[at..at + total as usize], "round {round}");
        }
        if round % 37 == 0 {
            blk.drain_writes(&mut log);
        }
    }
    blk.drain_writes(&mut log);
    assert_eq!(
        std::fs::read(&path).unwrap(),
        model,
        "the image is the model"
    );
    // Replaying the drained writes on the original image gives the same disk: what the
    // backup's replica will do at commit.
    let mut replica = original;
    for DiskWrite { offset, data } in &log {
        let o = *offset as usize;
        replica[o..o + data.len()].copy_from_slice(data);
    }
    assert_eq!(replica, model);
}

#[test]
fn malformed_requests_get_an_error_status_and_change_nothing() {
    let (mut d, mut blk, path) = live("bad");
    let before = std::fs::read(&path).unwrap();
    let ok = Buf {
        addr: BUF,
        len: 512,
    };
    let outside = Buf {
        addr: MEM as u64 - 256,
        len: 512,
    };
    let far = Buf {
        addr: u64::MAX - 100,
        len: 512,
    };
    let last = DISK / SECTOR_SIZE;
    for (what, kind, sector, bufs, want) in [
        (
            "write from outside memory",
            VIRTIO_BLK_T_OUT,
            0,
            vec![outside],
            STATUS_IOERR,
        ),
        (
            "write from an overflowing address",
            VIRTIO_BLK_T_OUT,
            0,
            vec![far],
            STATUS_IOERR,
        ),
        (
            "read into outside memory",
            VIRTIO_BLK_T_IN,
            0,
            vec![outside],
            STATUS_IOERR,
        ),
        (
            "write past the end",
            VIRTIO_BLK_T_OUT,
            last,
            vec![ok],
            STATUS_IOERR,
        ),
        (
            "read across the end",
            VIRTIO_BLK_T_IN,
            last - 1,
            vec![Buf {
                addr: BUF,
                len: 1024,
            }],
            STATUS_IOERR,
        ),
        (
            "sector number overflowing",
            VIRTIO_BLK_T_OUT,
            u64::MAX / 2,
            vec![ok],
            STATUS_IOERR,
        ),
        (
            "part of a sector",
            VIRTIO_BLK_T_OUT,
            0,
            vec![Buf {
                addr: BUF,
                len: 100,
            }],
            STATUS_IOERR,
        ),
        (
            "too large",
            VIRTIO_BLK_T_IN,
            0,
            vec![Buf {
                addr: BUF,
                len: MAX_REQUEST_BYTES + 512,
            }],
            STATUS_IOERR,
        ),
        ("unknown type", 77, 0, vec![ok], STATUS_UNSUPP),
    ] {
        let (status, len) = d.request(&mut blk, kind, sector, &bufs);
        assert_eq!(status, want, "{what}");
        assert_eq!(len, 1, "{what}: only the status byte");
    }
    // A write whose data buffer the device would write (wrong direction) fails too.
    d.desc(0, HEADER, 16, VRING_DESC_F_NEXT as u16, 1);
    d.mem
        .write_slice(&VIRTIO_BLK_T_OUT.to_le_bytes(), GuestAddress(HEADER))
        .unwrap();
    d.desc(
        1,
        BUF,
        512,
        (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) as u16,
        2,
    );
    d.desc(2, STATUS, 1, VRING_DESC_F_WRITE as u16, 0);
    d.offer(0);
    assert_eq!(d.ring(&mut blk), (STATUS_IOERR, 1));
    // A header the device may write, or one too short.
    d.desc(
        0,
        HEADER,
        16,
        (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) as u16,
        1,
    );
    d.desc(1, STATUS, 1, VRING_DESC_F_WRITE as u16, 0);
    d.offer(0);
    assert_eq!(d.ring(&mut blk), (STATUS_IOERR, 1));
    d.desc(0, HEADER, 8, VRING_DESC_F_NEXT as u16, 1);
    d.offer(0);
    assert_eq!(d.ring(&mut blk), (STATUS_IOERR, 1));
    // No status byte at all: completed with nothing written, the device goes on.
    d.desc(0, HEADER, 16, VRING_DESC_F_NEXT as u16, 1);
    d.desc(1, BUF, 512, 0, 0);
    d.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    d.offer(0);
    assert_eq!(d.ring(&mut blk), (0xff, 0));
    // A chain that loops on itself ends at the queue size and is refused.
    d.desc(0, HEADER, 16, VRING_DESC_F_NEXT as u16, 0);
    d.offer(0);
    assert_eq!(d.ring(&mut blk).1, 0);
    // Nothing reached the disk or the log, and the device still works.
    let mut log = Vec::new();
    blk.drain_writes(&mut log);
    assert!(log.is_empty(), "{} writes logged", log.len());
    assert_eq!(std::fs::read(&path).unwrap(), before);
    assert_eq!(
        d.request(&mut blk, VIRTIO_BLK_T_IN, 3, &[ok]),
        (STATUS_OK, 513)
    );
    assert_eq!(d.bytes(ok), before[3 * 512..4 * 512]);
}

#[test]
fn flush_and_get_id() {
    let (mut d, mut blk, _) = live("flush");
    assert_eq!(
        d.request(&mut blk, VIRTIO_BLK_T_FLUSH, 0, &[]),
        (STATUS_OK, 1)
    );
    let id = Buf { addr: BUF, len: 20 };
    assert_eq!(
        d.request(&mut blk, VIRTIO_BLK_T_GET_ID, 0, &[id]),
        (STATUS_OK, 21)
    );
    assert_eq!(&d.bytes(id)[..DISK_ID.len()], DISK_ID);
}

#[test]
fn a_restored_disk_carries_on_where_the_driver_was() {
    let (mut d, mut blk, path) = live("restore");
    let b = Buf {
        addr: BUF,
        len: 1024,
    };
    d.mem.write_slice(&[0xab; 1024], GuestAddress(BUF)).unwrap();
    for s in 0..5 {
        assert_eq!(
            d.request(&mut blk, VIRTIO_BLK_T_OUT, s * 2, &[b]).0,
            STATUS_OK
        );
    }
    let state = blk.state();
    assert_eq!(state.queue.next_avail, 5);
    drop(blk);
    // The same registers over the same image: the driver's next request just works.
    let mut blk = Blk::restore(&path, &state).unwrap();
    assert_eq!(blk.state(), state);
    assert_eq!(
        d.request(&mut blk, VIRTIO_BLK_T_IN, 8, &[b]),
        (STATUS_OK, 1025)
    );
    assert_eq!(d.bytes(b), vec![0xab; 1024]);
    // A state naming features the device never offered is refused.
    let mut bad = state.clone();
    bad.driver_features |= 1 << 3;
    assert!(matches!(
        Blk::restore(&path, &bad),
        Err(BlkError::Transport(_))
    ));
}

#[test]
fn images_that_are_not_whole_sectors_or_missing_are_refused_by_name() {
    let path = image("odd", 1000);
    let e = Blk::open(&path).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "disk image {} is 1000 bytes, not a positive multiple of 512",
            path.display()
        )
    );
    let missing = path.with_file_name("missing.img");
    let e = Blk::open(&missing).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("cannot open the disk image {}", missing.display())
    );
}

#[test]
fn the_vmm_reads_the_image_without_logging_and_not_past_its_end() {
    let path = image("read-at", DISK);
    let blk = Blk::open(&path).unwrap();
    let file = std::fs::read(&path).unwrap();
    let mut buf = vec![0u8; 1000];
    blk.read_at(DISK - 1000, &mut buf).unwrap();
    assert_eq!(buf, file[(DISK - 1000) as usize..]);
    let mut blk = blk;
    let mut writes = Vec::new();
    blk.drain_writes(&mut writes);
    assert!(writes.is_empty());
    let e = blk.read_at(DISK - 999, &mut buf).unwrap_err();
    assert!(matches!(e, BlkError::Range { size: DISK, .. }), "{e}");
    assert!(matches!(
        blk.read_at(u64::MAX, &mut buf),
        Err(BlkError::Range { .. })
    ));
}

#[test]
fn page_aligned_reads_of_whole_blocks_are_reported_and_others_are_not() {
    let (mut d, mut blk, _) = live("reads");
    let two = Buf {
        addr: BUF,
        len: 8192,
    };
    let half = Buf {
        addr: BUF,
        len: 2048,
    };
    // Sector 16: block 2, into guest pages 16 and 17 (BUF = 0x10000). Then reads that are
    // not whole blocks at a block boundary, or not a whole page: not reported.
    for (sector, buf) in [(16, two), (17, two), (8, half)] {
        assert_eq!(
            d.request(&mut blk, VIRTIO_BLK_T_IN, sector, &[buf]).0,
            STATUS_OK
        );
    }
    let mut reads = Vec::new();
    blk.drain_reads(&mut reads);
    assert_eq!(
        reads,
        vec![
            DiskRead { page: 16, block: 2 },
            DiskRead { page: 17, block: 3 }
        ]
    );
    blk.drain_reads(&mut reads);
    assert_eq!(reads.len(), 2, "drained once");
}
