//! Identical-block sharing (the *share* stage).
//!
//! A block (or a whole page) equal to one the backup already has is sent as a reference
//! instead of its bytes. Candidates are found through a hash index and confirmed by
//! comparing bytes against the content the reference will resolve to at the backup, so a
//! false share is impossible. Stale entries (the block has changed since it was indexed)
//! simply fail the comparison.
//!
//! The index is bounded: when it reaches its capacity it is cleared and refills with what
//! is sent next, so its memory never grows past the bound.

use crate::block::Page;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Default number of block entries the index may hold (about 32 MiB).
pub const DEFAULT_BLOCK_ENTRIES: usize = 1 << 20;

/// Where a shared block lives at the backup: block `block` of page `page`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockRef {
    /// Page index.
    pub page: u64,
    /// Block index inside the page.
    pub block: u8,
}

/// Pages as the backup will see them when a reference is resolved.
pub trait PageView {
    /// The content of `page` at the backup, if the primary knows it.
    fn page(&self, page: u64) -> Option<&Page>;

    /// Read 4 KiB block `block` of the disk replica, as the backup holds it when the
    /// record is resolved, into `out` (a `DiskRef` record). A view without a disk refuses.
    fn disk_block(&self, block: u64, out: &mut Page) -> Result<(), crate::codec::CodecError> {
        let _ = out;
        Err(crate::codec::CodecError::DiskRefUnresolved {
            block,
            why: "the session has no disk".to_string(),
        })
    }
}

/// The keys are already hashes: use them as they are.
#[derive(Default)]
struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

type IdMap<V> = HashMap<u64, V, BuildHasherDefault<IdentityHasher>>;

/// Sharing counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ShareStats {
    /// Lookups whose hash matched and whose bytes were equal.
    pub confirmed: u64,
    /// Lookups whose hash matched but whose bytes were not (stale or colliding entries).
    pub rejected: u64,
    /// Times the block index was cleared for reaching its capacity.
    pub resets: u64,
}

/// Hash → location indexes of blocks and pages the backup holds.
#[derive(Debug)]
pub struct ShareIndex {
    block_size: usize,
    blocks: IdMap<u64>,
    pages: IdMap<u64>,
    max_blocks: usize,
    stats: ShareStats,
}

impl std::fmt::Debug for IdentityHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IdentityHasher")
    }
}

impl ShareIndex {
    /// An empty index for blocks of `block_size` bytes holding at most `max_blocks` block
    /// entries (and as many page entries).
    pub fn new(block_size: usize, max_blocks: usize) -> Self {
        Self {
            block_size,
            blocks: IdMap::default(),
            pages: IdMap::default(),
            max_blocks: max_blocks.max(1),
            stats: ShareStats::default(),
        }
    }

    /// Remember that block `block` of `page` has fingerprint `hash`.
    pub fn insert_block(&mut self, hash: u64, page: u64, block: u8) {
        if self.blocks.len() >= self.max_blocks {
            self.blocks.clear();
            self.stats.resets += 1;
        }
        self.blocks.insert(hash, page << 8 | u64::from(block));
    }

    /// Remember that `page` has whole-page fingerprint `hash`.
    pub fn insert_page(&mut self, hash: u64, page: u64) {
        if self.pages.len() >= self.max_blocks {
            self.pages.clear();
            self.stats.resets += 1;
        }
        self.pages.insert(hash, page);
    }

    /// A block the backup holds with exactly these bytes, other than `not` (the block
    /// being encoded).
    pub fn find_block(
        &mut self,
        hash: u64,
        bytes: &[u8],
        not: BlockRef,
        view: &impl PageView,
    ) -> Option<BlockRef> {
        let loc = *self.blocks.get(&hash)?;
        let r = BlockRef {
            page: loc >> 8,
            block: loc as u8,
        };
        if r == not {
            return None;
        }
        let start = usize::from(r.block) * self.block_size;
        let ok = view
            .page(r.page)
            .and_then(|p| p.get(start..start + self.block_size))
            .is_some_and(|b| b == bytes);
        self.count(ok);
        ok.then_some(r)
    }

    /// A page other than `not` that the backup holds with exactly this content.
    pub fn find_page(
        &mut self,
        hash: u64,
        content: &Page,
        not: u64,
        view: &impl PageView,
    ) -> Option<u64> {
        let q = *self.pages.get(&hash)?;
        if q == not {
            return None;
        }
        let ok = view.page(q).is_some_and(|p| p == content);
        self.count(ok);
        ok.then_some(q)
    }

    /// The counters so far.
    pub fn stats(&self) -> ShareStats {
        self.stats
    }

    /// Number of block entries held.
    pub fn block_entries(&self) -> usize {
        self.blocks.len()
    }

    fn count(&mut self, ok: bool) {
        if ok {
            self.stats.confirmed += 1;
        } else {
            self.stats.rejected += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PAGE_SIZE;
    use crate::hashes::hash;

    struct View(Vec<Page>);
    impl PageView for View {
        fn page(&self, page: u64) -> Option<&Page> {
            self.0.get(page as usize)
        }
    }

    #[test]
    fn a_hash_match_is_confirmed_by_bytes() {
        let mut view = View(vec![[0u8; PAGE_SIZE]; 3]);
        view.0[1][64..128].fill(7);
        let mut idx = ShareIndex::new(64, 16);
        let blk = [7u8; 64];
        idx.insert_block(hash(&blk), 1, 1);
        let me = BlockRef { page: 2, block: 0 };
        assert_eq!(
            idx.find_block(hash(&blk), &blk, me, &view),
            Some(BlockRef { page: 1, block: 1 })
        );
        // The indexed block changed at the backup: the stale entry is refused.
        view.0[1][64] = 8;
        assert_eq!(idx.find_block(hash(&blk), &blk, me, &view), None);
        // A forged hash match (same key, other bytes) is refused too.
        let other = [9u8; 64];
        assert_eq!(idx.find_block(hash(&blk), &other, me, &view), None);
        assert_eq!(idx.stats().confirmed, 1);
        assert_eq!(idx.stats().rejected, 2);
    }

    #[test]
    fn page_refs_and_self_reference() {
        let view = View(vec![[5u8; PAGE_SIZE], [5u8; PAGE_SIZE]]);
        let mut idx = ShareIndex::new(64, 16);
        let h = hash(&view.0[0]);
        idx.insert_page(h, 0);
        assert_eq!(idx.find_page(h, &[5u8; PAGE_SIZE], 1, &view), Some(0));
        assert_eq!(idx.find_page(h, &[5u8; PAGE_SIZE], 0, &view), None);
    }

    #[test]
    fn index_stays_bounded() {
        let mut idx = ShareIndex::new(64, 8);
        for i in 0..100u64 {
            idx.insert_block(i * 0x1234_5678_9abc, i, 0);
            assert!(idx.block_entries() <= 8);
        }
        assert!(idx.stats().resets >= 11);
    }
}
