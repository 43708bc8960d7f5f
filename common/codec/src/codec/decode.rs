//! The backup's page decoder: one page record applied to the backup's copy of its page,
//! references resolved against the image before the record (the *stage* stage). Every
//! malformed payload is an error; nothing here panics or writes past the page.

use super::general::{CODEC_RAW, decompress};
use super::{CodecError, Encoding, TAG_LITERAL, TAG_REF, TAG_ZERO};
use crate::PAGE_SIZE;
use crate::block::{BlockMask, BlockSize, Page};
use crate::share::PageView;
use crate::{varint, xbzrle};

/// Decode one page record into `out`, which holds the backup's current content of `page`
/// on entry. References resolve through `view` (the image before this record).
/// On error `out` may be partly written: decode into a copy.
pub fn decode_page(
    encoding: Encoding,
    payload: &[u8],
    page: u64,
    bs: BlockSize,
    view: &impl PageView,
    out: &mut Page,
) -> Result<(), CodecError> {
    let malformed = |why| CodecError::Malformed { encoding, why };
    match encoding {
        Encoding::Zero => {
            if !payload.is_empty() {
                return Err(malformed("zero page with a payload"));
            }
            out.fill(0);
        }
        Encoding::Raw => {
            if payload.len() != PAGE_SIZE {
                return Err(malformed("raw page is not 4096 bytes"));
            }
            out.copy_from_slice(payload);
        }
        Encoding::Delta => {
            xbzrle::decode(payload, out)?;
        }
        Encoding::PageRef => {
            let (q, n) = varint::get_delta(payload, page).ok_or(malformed("bad page reference"))?;
            if n != payload.len() {
                return Err(malformed("trailing bytes after page reference"));
            }
            if q == page {
                return Err(CodecError::BadRef(q));
            }
            out.copy_from_slice(view.page(q).ok_or(CodecError::BadRef(q))?);
        }
        Encoding::General => {
            let (&codec, data) = payload.split_first().ok_or(malformed("empty payload"))?;
            if codec == CODEC_RAW {
                return Err(malformed("general page without a codec"));
            }
            decompress(codec, data, out, encoding)?;
        }
        Encoding::Blocks => decode_blocks(payload, page, bs, view, out)?,
        Encoding::DiskRef => {
            let (block, n) = varint::get(payload).ok_or(malformed("bad disk reference"))?;
            if n != payload.len() {
                return Err(malformed("trailing bytes after disk reference"));
            }
            view.disk_block(block, out)?;
        }
        Encoding::Unchanged => return Err(CodecError::NotSendable(encoding)),
    }
    Ok(())
}

fn decode_blocks(
    payload: &[u8],
    page: u64,
    bs: BlockSize,
    view: &impl PageView,
    out: &mut Page,
) -> Result<(), CodecError> {
    let malformed = |why| CodecError::Malformed {
        encoding: Encoding::Blocks,
        why,
    };
    let per = bs.per_page();
    let mask_bytes = per.div_ceil(8);
    let raw_mask = payload
        .get(..mask_bytes)
        .ok_or(malformed("short block mask"))?;
    let mut bits = [0u8; 16];
    bits[..mask_bytes].copy_from_slice(raw_mask);
    let raw_bits = u128::from_le_bytes(bits);
    let mask = BlockMask::from_bits(raw_bits, bs);
    if mask.bits() != raw_bits {
        return Err(malformed("block mask has bits past the last block"));
    }
    let changed = mask.changed();
    let tags_len = (changed * 2).div_ceil(8);
    let tags = payload
        .get(mask_bytes..mask_bytes + tags_len)
        .ok_or(malformed("short tags"))?;
    let mut at = mask_bytes + tags_len;
    // First pass: references and zero blocks, counting literals.
    let mut literal_blocks = Vec::with_capacity(changed);
    let mut refs = Vec::new();
    for (k, b) in mask.iter().enumerate() {
        match tags[k / 4] >> (2 * (k % 4)) & 3 {
            TAG_LITERAL => literal_blocks.push(b),
            TAG_ZERO => out[bs.range(b)].fill(0),
            TAG_REF => {
                let (q, n) = varint::get_delta(&payload[at..], page)
                    .ok_or(malformed("bad block reference"))?;
                at += n;
                let &c = payload.get(at).ok_or(malformed("short block reference"))?;
                at += 1;
                if usize::from(c) >= per {
                    return Err(malformed("block reference past the page"));
                }
                if q == page && usize::from(c) == b {
                    return Err(CodecError::BadRef(q));
                }
                refs.push((b, q, usize::from(c)));
            }
            _ => return Err(malformed("unknown block tag")),
        }
    }
    // References read the view before this record: resolve them before writing literals
    // (a reference may name a block of this same page).
    for &(b, q, c) in &refs {
        let src = view.page(q).ok_or(CodecError::BadRef(q))?;
        let blk: [u8; 1024] = {
            let mut t = [0u8; 1024];
            t[..bs.bytes()].copy_from_slice(&src[bs.range(c)]);
            t
        };
        out[bs.range(b)].copy_from_slice(&blk[..bs.bytes()]);
    }
    let (&codec, data) = payload
        .get(at..)
        .and_then(<[u8]>::split_first)
        .ok_or(malformed("missing literal section"))?;
    let mut lits = vec![0u8; literal_blocks.len() * bs.bytes()];
    if codec == CODEC_RAW && data.len() != lits.len() {
        return Err(malformed("literal bytes do not match the literal blocks"));
    }
    decompress(codec, data, &mut lits, Encoding::Blocks)?;
    for (k, &b) in literal_blocks.iter().enumerate() {
        out[bs.range(b)].copy_from_slice(&lits[k * bs.bytes()..(k + 1) * bs.bytes()]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::tests::Image;
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn decoder_never_panics_on_garbage(
            enc in 0u8..9,
            payload in proptest::collection::vec(any::<u8>(), 0..600),
            shift in 5u32..=10,
            page in 0u64..6,
        ) {
            let image = Image(vec![[3u8; PAGE_SIZE]; 4]);
            let mut out = [1u8; PAGE_SIZE];
            if let Some(e) = Encoding::from_u8(enc) {
                let _ = decode_page(e, &payload, page, BlockSize::new(1 << shift).unwrap(), &image, &mut out);
            }
        }
    }

    #[test]
    fn decode_rejections_are_specific() {
        let image = Image(vec![[3u8; PAGE_SIZE]; 2]);
        let bs = BlockSize::DEFAULT;
        let mut out = [0u8; PAGE_SIZE];
        let dec = |e, p: &[u8], out: &mut Page| decode_page(e, p, 0, bs, &image, out);
        assert!(matches!(
            dec(Encoding::Zero, &[1], &mut out),
            Err(CodecError::Malformed { .. })
        ));
        assert!(matches!(
            dec(Encoding::Raw, &[0; 10], &mut out),
            Err(CodecError::Malformed { .. })
        ));
        // PageRef to itself, and past the image.
        assert_eq!(
            dec(Encoding::PageRef, &[0], &mut out),
            Err(CodecError::BadRef(0))
        );
        assert_eq!(
            dec(Encoding::PageRef, &[4], &mut out),
            Err(CodecError::BadRef(2))
        );
        assert_eq!(dec(Encoding::PageRef, &[2], &mut out), Ok(()));
        assert_eq!(out, [3u8; PAGE_SIZE]);
        assert_eq!(
            dec(Encoding::Unchanged, &[], &mut out),
            Err(CodecError::NotSendable(Encoding::Unchanged))
        );
        assert!(matches!(
            dec(Encoding::General, &[2, 1, 2, 3], &mut out),
            Err(CodecError::Decompress { .. })
        ));
        assert!(matches!(
            dec(Encoding::Delta, &[0, 9, 1], &mut out),
            Err(CodecError::Delta(_))
        ));
        // Blocks: one changed block, literal, but the literal bytes are short.
        let mut p = vec![1, 0, 0, 0, 0, 0, 0, 0, 0, CODEC_RAW];
        p.extend_from_slice(&[5; 63]);
        assert!(matches!(
            dec(Encoding::Blocks, &p, &mut out),
            Err(CodecError::Malformed { .. })
        ));
        p.push(5);
        assert_eq!(dec(Encoding::Blocks, &p, &mut out), Ok(()));
        assert_eq!(&out[..64], &[5; 64]);
        // 1024-byte blocks: 4 blocks, one mask byte; bit 4 names no block.
        let big = BlockSize::new(1024).unwrap();
        let r = decode_page(
            Encoding::Blocks,
            &[0x10, 0, CODEC_RAW],
            0,
            big,
            &image,
            &mut out,
        );
        assert!(
            matches!(
                r,
                Err(CodecError::Malformed {
                    why: "block mask has bits past the last block",
                    ..
                })
            ),
            "{r:?}"
        );
        assert_eq!(Encoding::from_u8(8), None);
        // A disk reference, where the view has no disk.
        assert!(matches!(
            dec(Encoding::DiskRef, &[3], &mut out),
            Err(CodecError::DiskRefUnresolved { block: 3, .. })
        ));
        assert!(matches!(
            dec(Encoding::DiskRef, &[3, 0], &mut out),
            Err(CodecError::Malformed { .. })
        ));
    }
}
