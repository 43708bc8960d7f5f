//! Page-cache teleportation (part of the *share* stage): a dirty page whose content equals
//! a 4 KiB block of the guest's disk, as the backup's replica holds it, is sent as a
//! `DiskRef` record naming the block instead of its bytes (Akiyama et al., CCGrid 2013;
//! issue 18).
//!
//! This module holds the pure half: the [`DiskLookup`] hook the encoder asks, and the
//! [`DiskIndex`] of fingerprints a lookup starts from. Reading the disk to confirm a
//! candidate byte for byte is the primary's (`ha_primary::teleport`).

use crate::block::Page;
use std::collections::HashMap;

/// Bytes of a disk block a `DiskRef` names (one guest page).
pub const DISK_BLOCK: u64 = crate::PAGE_SIZE as u64;

/// Where the encoder looks for a disk block with a page's content.
pub trait DiskLookup {
    /// A disk block whose content, as the backup's replica will hold it when a record
    /// sent now is resolved, is exactly `content`, the new content of guest page `page`
    /// (its fingerprint is `hash`, [`crate::hashes::hash`]). An implementation confirms
    /// its candidate byte for byte before answering.
    fn find(&mut self, page: u64, content: &Page, hash: u64) -> Option<u64>;
}

/// Fingerprints of the disk blocks whose replica content the primary knows, and a
/// fingerprint → block index over them.
///
/// The fingerprint of a block is [`crate::hashes::hash`] of its 4096 bytes. All-zero
/// blocks are not indexed (a zero page is sent as `Zero`). The index never grows past one
/// entry per block: an entry whose block changed since is stale and fails the check of
/// [`DiskIndex::candidate`].
#[derive(Debug, Clone)]
pub struct DiskIndex {
    fps: Vec<u64>,
    known: Vec<bool>,
    by_fp: HashMap<u64, u64>,
}

impl DiskIndex {
    /// An index for a disk of `blocks` 4 KiB blocks, knowing none.
    pub fn new(blocks: u64) -> Self {
        let n = usize::try_from(blocks).unwrap_or(0);
        Self {
            fps: vec![0; n],
            known: vec![false; n],
            by_fp: HashMap::new(),
        }
    }

    /// Blocks of the disk.
    pub fn blocks(&self) -> u64 {
        self.fps.len() as u64
    }

    /// Blocks whose fingerprint is known.
    pub fn known(&self) -> usize {
        self.known.iter().filter(|&&k| k).count()
    }

    /// The replica's block `block` now holds `content`.
    pub fn set(&mut self, block: u64, content: &Page) {
        if crate::block::is_zero(content) {
            self.forget(block);
            return;
        }
        self.set_fingerprint(block, crate::hashes::hash(content));
    }

    /// The replica's block `block` now holds content of fingerprint `fp` (not all zero).
    pub fn set_fingerprint(&mut self, block: u64, fp: u64) {
        let Some(i) = usize::try_from(block).ok().filter(|&i| i < self.fps.len()) else {
            return;
        };
        self.fps[i] = fp;
        self.known[i] = true;
        self.by_fp.insert(fp, block);
    }

    /// The replica's content of `block` is no longer known (a partial write, or a write
    /// whose content the primary did not see whole).
    pub fn forget(&mut self, block: u64) {
        if let Some(k) = usize::try_from(block)
            .ok()
            .and_then(|i| self.known.get_mut(i))
        {
            *k = false;
        }
    }

    /// The fingerprint of `block`, if known.
    pub fn fingerprint(&self, block: u64) -> Option<u64> {
        let i = usize::try_from(block).ok()?;
        self.known.get(i)?.then(|| self.fps[i])
    }

    /// A block whose known fingerprint is `fp` (to be confirmed by its bytes).
    pub fn candidate(&self, fp: u64) -> Option<u64> {
        let &b = self.by_fp.get(&fp)?;
        (self.fingerprint(b) == Some(fp)).then_some(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PAGE_SIZE;
    use crate::block::BlockSize;
    use crate::codec::{
        Batch, CodecConfig, CodecError, EncodedBatch, Encoding, PageEncoder, decode_page,
    };
    use crate::hashes::hash;

    /// A disk the backup's replica holds, and a lookup over it that confirms by bytes.
    struct Disk {
        blocks: Vec<Page>,
        index: DiskIndex,
    }

    impl DiskLookup for Disk {
        fn find(&mut self, _page: u64, content: &Page, hash: u64) -> Option<u64> {
            let b = self.index.candidate(hash)?;
            (self.blocks.get(b as usize)? == content).then_some(b)
        }
    }

    struct View<'a>(&'a [Page], &'a [Page]);

    impl crate::share::PageView for View<'_> {
        fn page(&self, page: u64) -> Option<&Page> {
            self.0.get(page as usize)
        }
        fn disk_block(&self, block: u64, out: &mut Page) -> Result<(), CodecError> {
            let b = self
                .1
                .get(block as usize)
                .ok_or(CodecError::DiskRefPastEnd {
                    block,
                    blocks: self.1.len() as u64,
                })?;
            out.copy_from_slice(b);
            Ok(())
        }
    }

    #[test]
    fn a_page_equal_to_a_disk_block_goes_as_a_reference_and_decodes_to_it() {
        let mut blocks = vec![[0u8; PAGE_SIZE]; 300];
        for (i, b) in blocks.iter_mut().enumerate() {
            b.iter_mut()
                .enumerate()
                .for_each(|(j, x)| *x = (i * 31 + j * 7 % 251) as u8 ^ (j >> 6) as u8);
        }
        let mut index = DiskIndex::new(300);
        for (i, b) in blocks.iter().enumerate() {
            index.set(i as u64, b);
        }
        let mut disk = Disk { blocks, index };
        // Page 0 holds disk block 299, page 1 something else, page 2 block 7 with a byte
        // changed (not a reference).
        let mut data = Vec::new();
        data.extend_from_slice(&disk.blocks[299]);
        data.extend_from_slice(&[5u8; PAGE_SIZE]);
        let mut near = disk.blocks[7];
        near[100] ^= 1;
        data.extend_from_slice(&near);
        let mut enc = PageEncoder::new(CodecConfig::default(), None, None).unwrap();
        let mut out = EncodedBatch::default();
        enc.encode_batch_with_disk(
            Batch {
                pages: &[0, 1, 2],
                data: &data,
            },
            &mut out,
            Some(&mut disk),
        );
        let kinds: Vec<_> = out.records.iter().map(|r| r.encoding).collect();
        assert_eq!(kinds[0], Encoding::DiskRef);
        assert_ne!(kinds[1], Encoding::DiskRef);
        assert_ne!(kinds[2], Encoding::DiskRef);
        assert_eq!(out.payload(&out.records[0]), &[0xAB, 0x02], "varint 299");
        assert_eq!(enc.stats().kind(Encoding::DiskRef).pages, 1);
        let image = vec![[0u8; PAGE_SIZE]; 3];
        let view = View(&image, &disk.blocks);
        for (k, r) in out.records.iter().enumerate() {
            let mut pg = [0u8; PAGE_SIZE];
            decode_page(
                r.encoding,
                out.payload(r),
                r.page,
                BlockSize::DEFAULT,
                &view,
                &mut pg,
            )
            .unwrap();
            assert!(pg[..] == data[k * PAGE_SIZE..(k + 1) * PAGE_SIZE]);
        }
        // Past the disk's end.
        let mut pg = [0u8; PAGE_SIZE];
        assert_eq!(
            decode_page(
                Encoding::DiskRef,
                &[0xAC, 0x02],
                0,
                BlockSize::DEFAULT,
                &view,
                &mut pg
            ),
            Err(CodecError::DiskRefPastEnd {
                block: 300,
                blocks: 300
            })
        );
        // Without a lookup the same page is not a reference.
        let mut out2 = EncodedBatch::default();
        let mut plain = PageEncoder::new(CodecConfig::default(), None, None).unwrap();
        plain.encode_batch(
            Batch {
                pages: &[0],
                data: &data[..PAGE_SIZE],
            },
            &mut out2,
        );
        assert_ne!(out2.records[0].encoding, Encoding::DiskRef);
    }

    #[test]
    fn candidates_follow_the_latest_content_and_forget() {
        let mut idx = DiskIndex::new(4);
        let a = [1u8; PAGE_SIZE];
        let b = [2u8; PAGE_SIZE];
        idx.set(1, &a);
        idx.set(2, &b);
        assert_eq!(idx.candidate(hash(&a)), Some(1));
        // Block 1 rewritten: its old content is no longer a candidate.
        idx.set(1, &b);
        assert_eq!(idx.candidate(hash(&a)), None);
        assert_eq!(idx.candidate(hash(&b)), Some(1));
        idx.forget(1);
        assert_eq!(idx.candidate(hash(&b)), None);
        assert_eq!(idx.fingerprint(2), Some(hash(&b)));
        // Zero blocks are not indexed; blocks past the end are ignored.
        idx.set(3, &[0u8; PAGE_SIZE]);
        idx.set(9, &a);
        assert_eq!(idx.fingerprint(3), None);
        assert_eq!(idx.candidate(hash(&a)), None);
        assert_eq!(idx.known(), 1);
    }
}
