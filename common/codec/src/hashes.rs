//! Per-block fingerprints of every page the backup holds (part of the *identify* stage).
//!
//! FGBI's memory-cheap alternative to a full content cache: 8 bytes (an xxh3 hash) per
//! 64-byte block, so the primary can find the changed blocks of a dirty page even when the
//! page's old content is no longer cached. A changed block whose new hash equals the old
//! one would be missed; with 64-bit hashes that happens with probability 2^-64 per block.

use crate::bitmap::PageBitmap;
use crate::block::{BlockMask, BlockSize, Page};
use xxhash_rust::xxh3::xxh3_64;

/// The fingerprint of one block (or page).
pub fn hash(bytes: &[u8]) -> u64 {
    xxh3_64(bytes)
}

/// Fingerprint every block of `page` into `out` (`bs.per_page()` entries).
pub fn page_hashes(page: &Page, bs: BlockSize, out: &mut [u64]) {
    for (h, blk) in out.iter_mut().zip(page.chunks_exact(bs.bytes())) {
        *h = xxh3_64(blk);
    }
}

/// Block fingerprints for every page of a guest, with a bit per page saying whether they
/// are known.
#[derive(Debug, Clone)]
pub struct BlockHashes {
    bs: BlockSize,
    hashes: Vec<u64>,
    known: PageBitmap,
}

impl BlockHashes {
    /// Fingerprints for `pages` pages, none known yet.
    pub fn new(pages: usize, bs: BlockSize) -> Self {
        Self {
            bs,
            hashes: vec![0; pages * bs.per_page()],
            known: PageBitmap::new(pages),
        }
    }

    /// The block size fingerprinted.
    pub fn block_size(&self) -> BlockSize {
        self.bs
    }

    /// Memory the fingerprints take, in bytes.
    pub fn memory_bytes(&self) -> usize {
        self.hashes.len() * 8
    }

    /// The stored fingerprints of a page, if known.
    pub fn get(&self, page: u64) -> Option<&[u64]> {
        let i = usize::try_from(page).ok()?;
        if !self.known.get(i) {
            return None;
        }
        let n = self.bs.per_page();
        self.hashes.get(i * n..(i + 1) * n)
    }

    /// The blocks whose fingerprints differ from `new_hashes`, if the page is known.
    pub fn changed(&self, page: u64, new_hashes: &[u64]) -> Option<BlockMask> {
        let old = self.get(page)?;
        let mut bits = 0u128;
        for (b, (o, n)) in old.iter().zip(new_hashes).enumerate() {
            bits |= u128::from(o != n) << b;
        }
        Some(BlockMask::from_bits(bits, self.bs))
    }

    /// Store the fingerprints of a page the backup now holds. Out-of-range pages are
    /// ignored.
    pub fn store(&mut self, page: u64, new_hashes: &[u64]) {
        let Ok(i) = usize::try_from(page) else { return };
        let n = self.bs.per_page();
        if let Some(slot) = self.hashes.get_mut(i * n..(i + 1) * n) {
            slot.copy_from_slice(&new_hashes[..n]);
            self.known.set(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PAGE_SIZE;

    #[test]
    fn finds_changed_blocks_without_old_content() {
        let bs = BlockSize::new(128).unwrap();
        let mut h = BlockHashes::new(4, bs);
        let old = [1u8; PAGE_SIZE];
        let mut hv = vec![0u64; bs.per_page()];
        page_hashes(&old, bs, &mut hv);
        assert!(h.changed(2, &hv).is_none());
        h.store(2, &hv);
        let mut new = old;
        new[5] = 9;
        new[4095] = 9;
        page_hashes(&new, bs, &mut hv);
        let m = h.changed(2, &hv).unwrap();
        assert_eq!(m.iter().collect::<Vec<_>>(), vec![0, 31]);
        assert_eq!(h.memory_bytes(), 4 * 32 * 8);
        h.store(99, &hv); // out of range: ignored
        assert!(h.get(99).is_none());
    }
}
