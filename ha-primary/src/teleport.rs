//! Page-cache teleportation on the primary (issue 18; part of the *share* stage): the
//! fingerprint index of the backup's disk replica, kept current with every write the
//! checkpoints carry, and the byte-for-byte check against this host's disk that each
//! `DiskRef` passes before it is sent.
//!
//! What the index must describe is the replica as the backup holds it when a page record
//! of epoch n is resolved. With teleportation an epoch's Disk frames go before its Pages
//! frames, so that is the last commit's replica with epoch n's writes over it: this disk
//! as of epoch n's drain (a page the guest read or wrote to the disk in the same epoch
//! can be a reference too). The rules that keep the index so:
//!
//! - It is built by reading this disk once the initial disk sync has sent its blocks
//!   ([`Teleport::build`]), and from then on every pre-copy epoch and every checkpoint
//!   carries the disk's writes drained since the previous one; so every write after the
//!   build is in some epoch's writes.
//! - Before an epoch's pages are encoded, its writes are applied ([`Teleport::apply`]): a
//!   block written whole takes the written content's fingerprint, a block written in
//!   part is forgotten (its content is not known whole).
//! - On KVM the device also reports which guest pages it filled with which blocks (the
//!   exact map, [`Teleport::note_reads`]): that block is a dirty page's first candidate.
//!   An entry lasts until its page is encoded (the read made it dirty); a later write
//!   to its page or its block changes the content or the fingerprint, and the candidate
//!   fails the checks below like any other.
//! - A candidate is read from this disk and must equal the page byte for byte. A write the
//!   guest made after the drain has changed the block here but not in the replica: the
//!   read bytes then differ from the indexed fingerprint, and the candidate is refused
//!   (only a 64-bit fingerprint collision between the old and the new content could let
//!   one through; the verification digests would catch it).

use ha_codec::PAGE_SIZE;
use ha_codec::block::Page;
use ha_codec::teleport::{DISK_BLOCK, DiskIndex, DiskLookup};
use ha_guest::domain::{DiskRead, DiskWrite};
use ha_wire::disksync::ReadAt;
use std::collections::HashMap;

/// Errors building the index.
#[derive(Debug, thiserror::Error)]
pub enum TeleportError {
    /// The disk cannot be read.
    #[error("cannot read the disk at byte {offset} to index it")]
    Read {
        /// Byte offset.
        offset: u64,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// What the lookups did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TeleportStats {
    /// Pages sent as disk references.
    pub hits: u64,
    /// Of which found through the device's reads (the exact map).
    pub read_hits: u64,
    /// Candidates refused: their bytes differ here (written since the drain).
    pub refused: u64,
    /// Candidates that could not be read (treated as refused).
    pub read_errors: u64,
}

/// The index of the backup's replica and a reader of this disk (see the module's rules).
#[derive(Debug)]
pub struct Teleport<R> {
    index: DiskIndex,
    disk: R,
    reads: HashMap<u64, u64>,
    stats: TeleportStats,
    buf: Box<Page>,
}

impl<R: ReadAt> Teleport<R> {
    /// Index every 4 KiB block of `disk` (which the replica equals, the initial sync done).
    pub fn build(disk: R) -> Result<Self, TeleportError> {
        let blocks = disk.size() / DISK_BLOCK;
        let mut index = DiskIndex::new(blocks);
        let mut chunk = vec![0u8; 256 * PAGE_SIZE];
        let mut b = 0;
        while b < blocks {
            let n = (blocks - b).min(256);
            let buf = &mut chunk[..n as usize * PAGE_SIZE];
            let offset = b * DISK_BLOCK;
            disk.read_at(offset, buf)
                .map_err(|source| TeleportError::Read { offset, source })?;
            for (k, page) in buf.chunks_exact(PAGE_SIZE).enumerate() {
                if let Ok(page) = <&Page>::try_from(page) {
                    index.set(b + k as u64, page);
                }
            }
            b += n;
        }
        Ok(Self {
            index,
            disk,
            reads: HashMap::new(),
            stats: TeleportStats::default(),
            buf: Box::new([0; PAGE_SIZE]),
        })
    }

    /// The index.
    pub fn index(&self) -> &DiskIndex {
        &self.index
    }

    /// The counters so far.
    pub fn stats(&self) -> TeleportStats {
        self.stats
    }

    /// Before encoding an epoch's pages: the device filled these guest pages with these
    /// blocks (the last read of a page wins).
    pub fn note_reads(&mut self, reads: &[DiskRead]) {
        self.reads.extend(reads.iter().map(|r| (r.page, r.block)));
    }

    /// Before encoding an epoch's pages: the replica will hold `writes` (in order) when
    /// they are resolved (the epoch's Disk frames go first).
    pub fn apply(&mut self, writes: &[DiskWrite]) {
        for w in writes {
            for b in blocks_of(w) {
                let start = b * DISK_BLOCK;
                let whole =
                    w.offset <= start && start + DISK_BLOCK <= w.offset + w.data.len() as u64;
                let at = (start.saturating_sub(w.offset)) as usize;
                match w.data.get(at..at + PAGE_SIZE).map(<&Page>::try_from) {
                    Some(Ok(content)) if whole => self.index.set(b, content),
                    _ => self.index.forget(b),
                }
            }
        }
    }
}

impl<R: ReadAt> DiskLookup for Teleport<R> {
    fn find(&mut self, page: u64, content: &Page, hash: u64) -> Option<u64> {
        let read = self
            .reads
            .remove(&page)
            .filter(|&b| self.index.fingerprint(b) == Some(hash));
        let b = read.or_else(|| self.index.candidate(hash))?;
        if self
            .disk
            .read_at(b * DISK_BLOCK, &mut self.buf[..])
            .is_err()
        {
            self.stats.read_errors += 1;
            return None;
        }
        if self.buf[..] != content[..] {
            self.stats.refused += 1;
            return None;
        }
        self.stats.hits += 1;
        self.stats.read_hits += u64::from(read.is_some());
        Some(b)
    }
}

/// The 4 KiB blocks a write touches.
fn blocks_of(w: &DiskWrite) -> std::ops::Range<u64> {
    let end = w.offset + w.data.len() as u64;
    w.offset / DISK_BLOCK..end.div_ceil(DISK_BLOCK)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ha_codec::block::BlockSize;
    use ha_codec::cache::PageCache;
    use ha_codec::codec::disk::DiskEncoder;
    use ha_codec::codec::{Batch, CodecConfig, EncodedBatch, Encoding, GeneralCodec, PageEncoder};
    use ha_codec::hashes::BlockHashes;
    use ha_wire::disk::DiskRecords;
    use ha_wire::frame::split_frame;
    use ha_wire::stream::{EpochHeader, EpochWriter, Staging};
    use proptest::prelude::*;
    use std::sync::{Arc, Mutex};

    const PAGES: usize = 24;
    const BLOCKS: usize = 16;

    /// The primary's disk, shared between the test (the guest writing it) and the index's
    /// reader (the encoder thread reading it).
    #[derive(Clone)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl ReadAt for Shared {
        fn size(&self) -> u64 {
            self.0.lock().map_or(0, |d| d.len() as u64)
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
            let d = self
                .0
                .lock()
                .map_err(|_| std::io::Error::other("poisoned"))?;
            let at = offset as usize;
            buf.copy_from_slice(
                d.get(at..at + buf.len())
                    .ok_or(std::io::ErrorKind::UnexpectedEof)?,
            );
            Ok(())
        }
    }

    impl Shared {
        fn write(&self, w: &DiskWrite) {
            let mut d = self.0.lock().unwrap();
            d[w.offset as usize..w.offset as usize + w.data.len()].copy_from_slice(&w.data);
        }
        fn snapshot(&self) -> Vec<u8> {
            self.0.lock().unwrap().clone()
        }
    }

    /// What the guest does between two checkpoints.
    #[derive(Clone, Debug)]
    enum Op {
        /// A disk write: block, first sector, sectors (8 at 0: the whole block), fill byte.
        Disk(usize, usize, usize, u8),
        /// A page gets random-ish content.
        Page(usize, u8),
        /// A page gets a copy of a disk block as it is now (a read into the page cache).
        Read(usize, usize),
        /// A disk write after the checkpoint, before the encoder ran (next epoch's).
        Late(usize, u8),
        /// A page gets a copy of a disk block as it was at the start (a stale cache page).
        Old(usize, usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..BLOCKS, 0usize..8, 1usize..=8, any::<u8>()).prop_map(|(b, s, n, x)| Op::Disk(
                b,
                s.min(8 - n),
                n,
                x
            )),
            (0..BLOCKS, any::<u8>()).prop_map(|(b, x)| Op::Disk(b, 0, 8, x)),
            (0..PAGES, any::<u8>()).prop_map(|(p, x)| Op::Page(p, x)),
            (0..PAGES, 0..BLOCKS).prop_map(|(p, b)| Op::Read(p, b)),
            (0..PAGES, 0..BLOCKS).prop_map(|(p, b)| Op::Read(p, b)),
            (0..BLOCKS, any::<u8>()).prop_map(|(b, x)| Op::Late(b, x)),
            (0..PAGES, 0..BLOCKS).prop_map(|(p, b)| Op::Old(p, b)),
        ]
    }

    fn content(x: u8, salt: usize) -> Vec<u8> {
        (0..PAGE_SIZE)
            .map(|i| x.wrapping_add((i * 13 + salt * 7) as u8) ^ (i >> 9) as u8)
            .collect()
    }

    /// Apply one epoch's bytes at a backup; commit memory and replica.
    fn feed(st: &mut Staging, bytes: &[u8], image: &mut [u8], replica: &mut Vec<u8>) {
        let mut at = 0;
        while let Some((ty, body, n)) = split_frame(&bytes[at..]).unwrap() {
            let raw = &bytes[at..at + n];
            let staged = st
                .push_with_replica(ty, body, raw, image, Some(&*replica))
                .unwrap_or_else(|e| panic!("{}", ha_daemon::error_chain(&e)));
            if let Some(mut staged) = staged {
                staged.commit(image);
                for w in staged.take_disk().writes {
                    let o = w.offset as usize;
                    replica[o..o + w.data.len()].copy_from_slice(&w.data);
                }
            }
            at += n;
        }
    }

    /// Run `epochs` of ops through the real encoder, index and stager; check the backup
    /// against the primary at every checkpoint. Returns the disk references sent.
    fn run(epochs: &[Vec<Op>]) -> u64 {
        let size = BLOCKS * PAGE_SIZE;
        let mut disk0 = vec![0u8; size];
        for b in 0..BLOCKS {
            disk0[b * PAGE_SIZE..(b + 1) * PAGE_SIZE].copy_from_slice(&content(b as u8, b));
        }
        let disk = Shared(Arc::new(Mutex::new(disk0.clone())));
        let mut replica = disk0;
        let mut mem = vec![0u8; PAGES * PAGE_SIZE];
        let mut image = mem.clone();
        let cfg = CodecConfig::default();
        let mut enc = PageEncoder::new(
            cfg,
            Some(PageCache::shadow(PAGES)),
            Some(BlockHashes::new(PAGES, BlockSize::DEFAULT)),
        )
        .unwrap();
        let mut denc = DiskEncoder::new(GeneralCodec::Zlib, 1).with_cache(8);
        let mut tp = Teleport::build(disk.clone()).unwrap();
        let mut st = Staging::new(cfg.mode, cfg.block_size, PAGES as u64, 1).with_disk(size as u64);
        let mut pending: Vec<DiskWrite> = Vec::new();
        for (e, ops) in epochs.iter().enumerate() {
            let mut writes = std::mem::take(&mut pending);
            let mut late = Vec::new();
            let mut dirty = std::collections::BTreeSet::new();
            for op in ops {
                match *op {
                    Op::Disk(b, s, n, x) => {
                        let w = DiskWrite {
                            offset: (b * PAGE_SIZE + s * 512) as u64,
                            data: content(x, b)[..n * 512].to_vec(),
                        };
                        disk.write(&w);
                        writes.push(w);
                    }
                    Op::Page(p, x) => {
                        mem[p * PAGE_SIZE..(p + 1) * PAGE_SIZE].copy_from_slice(&content(x, p));
                        dirty.insert(p);
                    }
                    Op::Read(p, b) => {
                        let mut blk = vec![0u8; PAGE_SIZE];
                        disk.read_at((b * PAGE_SIZE) as u64, &mut blk).unwrap();
                        mem[p * PAGE_SIZE..(p + 1) * PAGE_SIZE].copy_from_slice(&blk);
                        dirty.insert(p);
                    }
                    Op::Old(p, b) => {
                        mem[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]
                            .copy_from_slice(&content(b as u8, b));
                        dirty.insert(p);
                    }
                    Op::Late(b, x) => late.push(DiskWrite {
                        offset: (b * PAGE_SIZE) as u64,
                        data: content(x, b + 1),
                    }),
                }
            }
            // Checkpoint: the state the backup must reach.
            let (want_mem, want_disk) = (mem.clone(), disk.snapshot());
            // The guest runs on: its next writes reach this disk before the encoder reads.
            for w in &late {
                disk.write(w);
            }
            pending = late;
            let idx: Vec<u64> = dirty.iter().map(|&p| p as u64).collect();
            let data: Vec<u8> = dirty
                .iter()
                .flat_map(|&p| want_mem[p * PAGE_SIZE..(p + 1) * PAGE_SIZE].to_vec())
                .collect();
            let mut batch = EncodedBatch::default();
            tp.apply(&writes);
            enc.encode_batch_with_disk(
                Batch {
                    pages: &idx,
                    data: &data,
                },
                &mut batch,
                Some(&mut tp),
            );
            let recs = DiskRecords::encode(&mut denc, &writes).unwrap();
            let mut out = Vec::new();
            let h = EpochHeader {
                epoch: e as u64 + 1,
                mode: cfg.mode,
                block_size: cfg.block_size,
                records: EpochWriter::records_in(&batch) + recs.records(),
            };
            let mut w = EpochWriter::begin(&mut out, h);
            if !recs.is_empty() {
                w.disk(&mut out, &recs);
            }
            w.pages(&mut out, &batch);
            w.finish(&mut out).unwrap();
            feed(&mut st, &out, &mut image, &mut replica);
            assert!(image == want_mem, "memory after checkpoint {}", e + 1);
            assert!(replica == want_disk, "disk after checkpoint {}", e + 1);
        }
        enc.stats().kind(Encoding::DiskRef).pages
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn the_backup_equals_the_primary_at_every_checkpoint(
            epochs in proptest::collection::vec(proptest::collection::vec(op(), 0..12), 1..8)
        ) {
            run(&epochs);
        }
    }

    #[test]
    fn pages_read_from_the_disk_go_as_references_except_blocks_rewritten_since() {
        // Epoch 1: pages 0..4 read blocks 0..4. Epoch 2: page 5 reads block 6, which the
        // same epoch rewrote (the replica holds it when the page resolves); page 6 reads
        // block 7, rewritten after the checkpoint (late: the replica does not hold that
        // content at this checkpoint); page 7 reads block 8.
        let epochs = vec![
            (0..4).map(|i| Op::Read(i, i)).collect(),
            vec![
                Op::Disk(6, 0, 8, 0x42),
                Op::Read(5, 6),
                Op::Late(7, 9),
                Op::Read(6, 7),
                Op::Read(7, 8),
            ],
            // Epoch 3: block 7's late write is this epoch's.
            vec![Op::Read(8, 6), Op::Read(9, 7)],
            vec![Op::Read(10, 7)],
        ];
        // All but the late block 7 in epoch 2 (its content here is not the replica's at
        // that checkpoint).
        assert_eq!(run(&epochs), 4 + 2 + 2 + 1);
    }

    #[test]
    fn the_devices_reads_name_a_block_the_content_index_has_lost() {
        // Blocks 2 and 5 hold the same bytes; the index's entry for them names block 5,
        // which a partial write then makes unknown. By content the page is not found any
        // more; the device's read (page 9 ← block 2) still finds it, confirmed by bytes.
        let mut d = vec![0u8; BLOCKS * PAGE_SIZE];
        let same = content(7, 1);
        for b in [2, 5] {
            d[b * PAGE_SIZE..(b + 1) * PAGE_SIZE].copy_from_slice(&same);
        }
        let disk = Shared(Arc::new(Mutex::new(d)));
        let mut tp = Teleport::build(disk.clone()).unwrap();
        let w = DiskWrite {
            offset: (5 * PAGE_SIZE + 512) as u64,
            data: vec![1; 512],
        };
        disk.write(&w);
        tp.apply(&[w]);
        let page: &Page = same[..].try_into().unwrap();
        let h = ha_codec::hashes::hash(page);
        assert_eq!(tp.find(9, page, h), None);
        tp.note_reads(&[DiskRead { page: 9, block: 2 }]);
        assert_eq!(tp.find(9, page, h), Some(2));
        assert_eq!((tp.stats().hits, tp.stats().read_hits), (1, 1));
        // The entry is used once; a read whose page then holds other bytes is refused.
        assert_eq!(tp.find(9, page, h), None);
        tp.note_reads(&[DiskRead { page: 9, block: 3 }]);
        assert_eq!(tp.find(9, page, h), None);
    }

    #[test]
    fn a_partial_write_forgets_its_block_until_it_is_written_whole() {
        let epochs = vec![
            vec![Op::Disk(3, 2, 1, 7)],
            vec![Op::Read(0, 3)],
            vec![Op::Disk(3, 0, 8, 7)],
            vec![Op::Read(1, 3)],
        ];
        assert_eq!(run(&epochs), 1);
    }
}
