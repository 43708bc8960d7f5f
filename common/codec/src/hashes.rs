//! Per-block fingerprints of every page the backup holds (part of the *identify* stage).
//!
//! FGBI's memory-cheap alternative to a full content cache: 8 bytes (an xxh3 hash) per
//! 64-byte block, so the primary can find the changed blocks of a dirty page even when the
//! page's old content is no longer cached. A changed block whose new hash equals the old
//! one would be missed; with 64-bit hashes that happens with probability 2^-64 per block.

use crate::bitmap::PageBitmap;
use crate::block::{BlockMask, BlockSize, Page};
use xxhash_rust::xxh3::{Xxh3, xxh3_64};

/// The fingerprint of one block (or page).
pub fn hash(bytes: &[u8]) -> u64 {
    xxh3_64(bytes)
}

/// [`hash`] of bytes that arrive in pieces: the fingerprint of their concatenation, so a
/// large chunk can be read through a small buffer that stays in the CPU's cache.
#[derive(Clone, Default)]
pub struct Hasher(Xxh3);

impl std::fmt::Debug for Hasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hasher")
    }
}

impl Hasher {
    /// Add the next piece.
    pub fn update(&mut self, piece: &[u8]) {
        self.0.update(piece);
    }

    /// The fingerprint of everything added.
    pub fn finish(&self) -> u64 {
        self.0.digest()
    }
}

/// Fingerprint every block of `page` into `out` (`bs.per_page()` entries). All-zero blocks
/// take the zero block's fingerprint without being hashed.
pub fn page_hashes(page: &Page, bs: BlockSize, out: &mut [u64]) {
    blocks_hashes(page, bs, BlockMask::all(bs), zero_hash(bs), out);
}

/// The fingerprint of an all-zero block of `bs`.
pub fn zero_hash(bs: BlockSize) -> u64 {
    xxh3_64(&ZEROS[..bs.bytes()])
}

const ZEROS: [u8; 1024] = [0; 1024];

/// Fingerprint the blocks of `page` in `mask` into their slots of `out`, leaving the other
/// slots as they are; an all-zero block takes `zero` (its fingerprint, [`zero_hash`])
/// without being hashed. Returns a bit per block of `mask` that is all zero.
pub fn blocks_hashes(
    page: &Page,
    bs: BlockSize,
    mask: BlockMask,
    zero: u64,
    out: &mut [u64],
) -> u128 {
    let mut zeros = 0u128;
    for b in mask.iter() {
        let blk = &page[bs.range(b)];
        if let Some(h) = out.get_mut(b) {
            *h = if crate::block::is_zero(blk) {
                zeros |= 1 << b;
                zero
            } else {
                xxh3_64(blk)
            };
        }
    }
    zeros
}

/// A whole page's fingerprint from its blocks' fingerprints: cheaper than hashing the page
/// again once its blocks are fingerprinted, and as good a key for the share index (a
/// match is confirmed byte for byte).
pub fn combine(block_hashes: &[u64]) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut acc = block_hashes
        .iter()
        .fold(K, |acc, &h| (acc ^ h).wrapping_mul(K).rotate_left(31));
    // murmur3's finaliser: every input bit reaches the high bits the index's table uses.
    acc ^= acc >> 33;
    acc = acc.wrapping_mul(0xff51_afd7_ed55_8ccd);
    acc ^= acc >> 33;
    acc = acc.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    acc ^ (acc >> 33)
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
    /// Fingerprints for `pages` pages, none known yet; their memory (12.5 % of the
    /// guest's at 64-byte blocks) taken and faulted in now, not page by page as
    /// checkpoints fill it.
    pub fn new(pages: usize, bs: BlockSize) -> Self {
        let mut hashes = vec![0; pages * bs.per_page()];
        crate::prefault(&mut hashes, u64::MAX);
        Self {
            bs,
            hashes,
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

    #[test]
    fn blocks_fingerprinted_apart_equal_the_whole_page_fingerprinted() {
        let bs = BlockSize::new(64).unwrap();
        let mut page = [0u8; PAGE_SIZE];
        for (i, b) in page[..2048].iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        let mut full = vec![0u64; bs.per_page()];
        page_hashes(&page, bs, &mut full);
        assert_eq!(full[0], hash(&page[..64]));
        assert_eq!(full[63], zero_hash(bs));
        assert_eq!(zero_hash(bs), hash(&[0u8; 64]));
        // Rehash only what changed on top of the old fingerprints.
        let mut inc = full.clone();
        page[100] ^= 1;
        page[4000] = 1;
        let mask = BlockMask::from_bits(1 << 1 | 1 << 40 | 1 << 62, bs);
        let zeros = blocks_hashes(&page, bs, mask, zero_hash(bs), &mut inc);
        assert_eq!(zeros, 1 << 40, "only block 40 of those hashed is all zero");
        page_hashes(&page, bs, &mut full);
        assert_eq!(inc, full);
        // The combined fingerprint sees every block.
        let c = combine(&full);
        inc[5] ^= 1;
        assert_ne!(combine(&inc), c);
    }

    proptest::proptest! {
        /// Both sides of a comparison may fingerprint one chunk differently (one in a single
        /// call, the other in pieces through a buffer): the results must agree.
        #[test]
        fn pieces_hash_as_the_whole(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..20_000),
            cuts in proptest::collection::vec(0usize..20_000, 0..8),
        ) {
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(bytes.len())).collect();
            cuts.sort_unstable();
            let mut h = Hasher::default();
            let mut from = 0;
            for c in cuts.into_iter().chain([bytes.len()]) {
                h.update(&bytes[from..c]);
                from = c;
            }
            proptest::prop_assert_eq!(h.finish(), hash(&bytes));
        }
    }
}
