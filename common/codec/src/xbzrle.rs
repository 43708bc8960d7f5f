//! XOR + run-length delta in QEMU's XBZRLE format (part of the *encode* stage).
//!
//! A delta turns an old page into a new one. It is a sequence of
//! `zrun nzrun [zrun nzrun]…` where a zero run is a ULEB128 length of unchanged bytes and a
//! non-zero run is a ULEB128 length followed by that many NEW bytes. The trailing zero run
//! is omitted; lengths are at most 0x3FFF (two ULEB128 bytes). Runs are maximal, so the
//! encoding of a page pair is unique and byte-for-byte what QEMU's
//! `xbzrle_encode_buffer` produces. An unchanged page encodes to zero bytes.
//!
//! The encoder reads the runs off a [`DiffMask`] (SIMD compare) and stops as soon as its
//! output would exceed the caller's budget, so a hybrid encoder can give up cheaply.

use crate::PAGE_SIZE;
use crate::block::{DiffMask, Page};

/// Bytes the output buffer must have past the budget: the encoder copies short runs in
/// fixed 16-byte moves.
pub const ENCODE_SLACK: usize = 16;

/// The largest run length the format can carry.
pub const MAX_RUN: usize = 0x3FFF;

/// Why a delta was rejected. Mirrors the checks of QEMU's `xbzrle_decode_buffer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum XbzrleError {
    /// A length field used a third byte (the format allows 14 bits).
    #[error("length at offset {0} is longer than two bytes")]
    LengthTooLong(usize),
    /// A run header begins with fewer than two bytes of input left.
    #[error("input ends inside a run at offset {0}")]
    Truncated(usize),
    /// A zero run of length zero anywhere but at the very start.
    #[error("zero-length zero run at offset {0}")]
    EmptyZeroRun(usize),
    /// A non-zero run of length zero.
    #[error("zero-length non-zero run at offset {0}")]
    EmptyDataRun(usize),
    /// A run reaches past the end of the page.
    #[error("run at offset {0} goes past the end of the page")]
    PastPage(usize),
    /// A non-zero run's bytes reach past the end of the input.
    #[error("run at offset {0} goes past the end of the input")]
    PastInput(usize),
}

/// Encode the delta from `old` to `new` into `out`, using at most `budget` bytes.
///
/// Returns `Some(n)` with the delta in `out[..n]` (`n == 0`: the pages are equal), or
/// `None` when the delta would need more than `budget` bytes. `out` must be at least
/// `min(budget, PAGE_SIZE + 4) + ENCODE_SLACK` bytes long.
pub fn encode(old: &Page, new: &Page, out: &mut [u8], budget: usize) -> Option<usize> {
    encode_with_mask(&DiffMask::new(old, new), new, out, budget)
}

/// [`encode`] with the page comparison already done.
pub fn encode_with_mask(
    mask: &DiffMask,
    new: &Page,
    out: &mut [u8],
    budget: usize,
) -> Option<usize> {
    let budget = budget.min(out.len().saturating_sub(ENCODE_SLACK));
    let changed = mask.changed_bytes();
    if changed == 0 {
        return Some(0);
    }
    // Every changed byte is copied and every run has two length bytes at least: a page
    // that cannot fit is refused before any work.
    let runs = mask.runs();
    if changed + 2 * runs > budget {
        return None;
    }
    // The most the delta can take: every length takes one byte except those of 128 or
    // more, and there are at most PAGE_SIZE / 128 such zero runs and changed / 128 such
    // data runs. When that fits, no run needs its own budget check.
    let worst = changed + 2 * runs + runs.min(PAGE_SIZE / 128) + runs.min(changed / 128);
    if worst <= budget {
        walk::<false>(mask, new, out, budget)
    } else {
        walk::<true>(mask, new, out, budget)
    }
}

/// Emit every run of `mask`, checking the budget at each run when `CHECK`.
///
/// The runs are found by their starts: bit i of `starts` is set where byte i differs and
/// byte i - 1 does not. Only words with a differing byte can hold a start; each run's end
/// is the next equal byte (usually in the same word).
#[inline(always)]
fn walk<const CHECK: bool>(
    mask: &DiffMask,
    new: &Page,
    out: &mut [u8],
    budget: usize,
) -> Option<usize> {
    let words = mask.words();
    let mut d = 0usize;
    let mut zstart = 0usize; // start of the current zero run (end of the previous data run)
    let mut todo = mask.nonzero_words();
    while todo != 0 {
        let wi = todo.trailing_zeros() as usize;
        todo &= todo - 1;
        let w = words[wi];
        let carry = if wi == 0 { 0 } else { words[wi - 1] >> 63 };
        let prev = (w << 1) | carry;
        let mut starts = w & !prev;
        // Run ends (an equal byte after a differing one), in step with the starts: the
        // first end belongs to a run carried in from the word before, already emitted.
        let mut ends = !w & prev;
        ends &= ends.wrapping_sub(carry);
        while starts != 0 {
            let s = wi * 64 + starts.trailing_zeros() as usize;
            starts &= starts - 1;
            // A run with no end in this word goes on into the next ones.
            let e = if ends != 0 {
                wi * 64 + ends.trailing_zeros() as usize
            } else if wi + 1 < words.len() {
                mask.run_end((wi + 1) * 64, true)
            } else {
                PAGE_SIZE
            };
            ends &= ends.wrapping_sub(1);
            d = emit::<CHECK>(out, d, budget, new, s - zstart, s, e)?;
            zstart = e;
        }
    }
    Some(d)
}

/// Write one `zrun nzrun` pair (data `new[nz..end]`) at `out[d..]`; `None` past budget
/// (checked only when `CHECK`: otherwise the caller knows every run fits).
#[inline(always)]
fn emit<const CHECK: bool>(
    out: &mut [u8],
    d: usize,
    budget: usize,
    new: &Page,
    zlen: usize,
    nz: usize,
    end: usize,
) -> Option<usize> {
    let nlen = end - nz;
    let mut d = d;
    if CHECK && d + uleb_len(zlen) + uleb_len(nlen) + nlen > budget {
        return None;
    }
    // Both lengths in one 4-byte store: the bytes past them land in the slack or are
    // overwritten by the data.
    let (z, zl) = uleb_bytes(zlen);
    let (n, nl) = uleb_bytes(nlen);
    out[d..d + 4].copy_from_slice(&(z | n << (8 * zl)).to_le_bytes());
    d += zl + nl;
    let rounded = nlen.next_multiple_of(16);
    if nlen <= 16 && nz + 16 <= PAGE_SIZE {
        out[d..d + 16].copy_from_slice(&new[nz..nz + 16]);
    } else if nlen <= 256 && nz + rounded <= PAGE_SIZE {
        // Fixed-size 16-byte moves: cheaper than a variable memcpy for short runs. The
        // bytes past `nlen` land in the slack or are overwritten by what follows.
        for k in (0..rounded).step_by(16) {
            out[d + k..d + k + 16].copy_from_slice(&new[nz + k..nz + k + 16]);
        }
    } else {
        out[d..d + nlen].copy_from_slice(&new[nz..end]);
    }
    Some(d + nlen)
}

/// Apply a delta to `page` (which holds the old content) in place, returning the number
/// of page bytes the delta spans. Rejects exactly what QEMU's decoder rejects, and never
/// writes outside `page`. On error `page` may be partly updated: decode into a scratch
/// copy when that matters.
pub fn decode(delta: &[u8], page: &mut [u8]) -> Result<usize, XbzrleError> {
    let slen = delta.len();
    let dlen = page.len();
    let mut i = 0usize;
    let mut d = 0usize;
    while i < slen {
        // zero run
        if slen - i < 2 {
            return Err(XbzrleError::Truncated(i));
        }
        let (zlen, n) = get_uleb(&delta[i..]).ok_or(XbzrleError::LengthTooLong(i))?;
        if i != 0 && zlen == 0 {
            return Err(XbzrleError::EmptyZeroRun(i));
        }
        let at = i;
        i += n;
        d += zlen;
        if d > dlen {
            return Err(XbzrleError::PastPage(at));
        }
        // non-zero run
        if slen - i < 2 {
            return Err(XbzrleError::Truncated(i));
        }
        let (nlen, n) = get_uleb(&delta[i..]).ok_or(XbzrleError::LengthTooLong(i))?;
        if nlen == 0 {
            return Err(XbzrleError::EmptyDataRun(i));
        }
        let at = i;
        i += n;
        if d + nlen > dlen {
            return Err(XbzrleError::PastPage(at));
        }
        if i + nlen > slen {
            return Err(XbzrleError::PastInput(at));
        }
        page[d..d + nlen].copy_from_slice(&delta[i..i + nlen]);
        d += nlen;
        i += nlen;
    }
    Ok(d)
}

/// Number of bytes the ULEB128 encoding of `n` (at most [`MAX_RUN`]) takes.
#[inline]
fn uleb_len(n: usize) -> usize {
    1 + usize::from(n >= 0x80)
}

/// Write `n` (at most [`MAX_RUN`]) as one or two ULEB128 bytes; returns the count.
/// The straightforward form, kept for the tests' reference encoder.
#[cfg(test)]
fn put_uleb(out: &mut [u8], n: usize) -> usize {
    debug_assert!(n <= MAX_RUN);
    if n < 0x80 {
        out[0] = n as u8;
        1
    } else {
        out[0] = (n as u8 & 0x7f) | 0x80;
        out[1] = (n >> 7) as u8;
        2
    }
}

/// `n` (at most [`MAX_RUN`]) as one or two ULEB128 bytes, without a branch: the bytes in
/// little-endian order (the second is zero when the length takes one) and their count.
#[inline(always)]
fn uleb_bytes(n: usize) -> (u32, usize) {
    let two = usize::from(n >= 0x80);
    let bytes = (n & 0x7f) | two << 7 | (n >> 7) << 8;
    (bytes as u32, 1 + two)
}

/// Read a one- or two-byte ULEB128 length; `None` when a third byte would be needed.
/// The caller guarantees at least two bytes.
#[inline]
fn get_uleb(b: &[u8]) -> Option<(usize, usize)> {
    if b[0] & 0x80 == 0 {
        Some((usize::from(b[0]), 1))
    } else if b[1] & 0x80 != 0 {
        None
    } else {
        Some((usize::from(b[0] & 0x7f) | usize::from(b[1]) << 7, 2))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// QEMU's algorithm, transcribed byte by byte (no masks, no SIMD): the oracle.
    fn reference_encode(old: &[u8], new: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut i = 0;
        let n = old.len();
        while i < n {
            let zs = i;
            while i < n && old[i] == new[i] {
                i += 1;
            }
            if i == n {
                break;
            }
            let ns = i;
            while i < n && old[i] != new[i] {
                i += 1;
            }
            for len in [ns - zs, i - ns] {
                let mut b = [0u8; 2];
                let k = put_uleb(&mut b, len);
                out.extend_from_slice(&b[..k]);
            }
            out.extend_from_slice(&new[ns..i]);
        }
        out
    }

    fn enc(old: &Page, new: &Page, budget: usize) -> Option<Vec<u8>> {
        let mut out = vec![0u8; PAGE_SIZE * 2 + ENCODE_SLACK];
        encode(old, new, &mut out, budget).map(|n| out[..n].to_vec())
    }

    fn page(f: impl Fn(usize) -> u8) -> Box<Page> {
        let mut p = Box::new([0u8; PAGE_SIZE]);
        for (i, b) in p.iter_mut().enumerate() {
            *b = f(i);
        }
        p
    }

    #[test]
    fn qemu_vectors() {
        // A zero run of 1001 bytes encodes its length as e9 07 (QEMU's xbzrle doc).
        let old = page(|_| 0);
        let new = page(|i| u8::from(i == 1001));
        assert_eq!(
            enc(&old, &new, PAGE_SIZE).unwrap(),
            vec![0xe9, 0x07, 0x01, 0x01]
        );
        // Unchanged page: no bytes at all.
        assert_eq!(enc(&old, &old, PAGE_SIZE).unwrap(), Vec::<u8>::new());
        // Change at byte 0: a leading zero run of length 0.
        let new = page(|i| if i < 3 { 0xaa } else { 0 });
        assert_eq!(
            enc(&old, &new, PAGE_SIZE).unwrap(),
            vec![0, 3, 0xaa, 0xaa, 0xaa]
        );
        // Trailing zero run is omitted; a run to the end of the page has no zero run after.
        let new = page(|i| u8::from(i >= 4094));
        assert_eq!(
            enc(&old, &new, PAGE_SIZE).unwrap(),
            vec![0xfe, 0x1f, 2, 1, 1]
        );
        // Whole page different: 0, then 4096 = 0x80 0x20, then the data.
        let new = page(|_| 7);
        let d = enc(&old, &new, PAGE_SIZE + 4).unwrap();
        assert_eq!(&d[..3], &[0, 0x80, 0x20]);
        assert_eq!(d.len(), 3 + PAGE_SIZE);
        // Two separate runs: each gets its own zero run and data run.
        let new = page(|i| {
            if (10..12).contains(&i) || i == 20 {
                9
            } else {
                0
            }
        });
        assert_eq!(
            enc(&old, &new, PAGE_SIZE).unwrap(),
            vec![10, 2, 9, 9, 8, 1, 9]
        );
    }

    #[test]
    fn budget_is_respected_and_exact() {
        let old = page(|_| 0);
        let new = page(|i| u8::from(i % 100 == 0)); // 41 runs of 1 byte
        let full = enc(&old, &new, PAGE_SIZE).unwrap();
        assert_eq!(enc(&old, &new, full.len()).as_deref(), Some(&full[..]));
        assert_eq!(enc(&old, &new, full.len() - 1), None);
        let random = page(|i| (i * 7 + 13) as u8 | 1);
        assert_eq!(enc(&old, &random, PAGE_SIZE), None);
    }

    #[test]
    fn dense_pages_match_reference_with_and_without_per_run_checks() {
        // Many short runs (the walk's dense case), runs across mask words, one reaching
        // the page end, and long zero and data runs (two-byte lengths).
        let old = page(|_| 0);
        let news = [
            page(|i| u8::from(i % 3 == 0 || (60..70).contains(&i))),
            page(|i| u8::from(i % 5 < 2 || i >= 4000)),
            page(|i| u8::from((300..700).contains(&i) || (1000..1002).contains(&i))),
        ];
        for new in &news {
            let want = reference_encode(&old[..], &new[..]);
            // A roomy budget takes the walk without per-run checks, the exact one with.
            assert_eq!(enc(&old, new, PAGE_SIZE * 2).as_ref(), Some(&want));
            assert_eq!(enc(&old, new, want.len()).as_ref(), Some(&want));
            assert_eq!(enc(&old, new, want.len() - 1), None);
        }
    }

    #[test]
    fn decoder_rejections() {
        let mut p = [0u8; PAGE_SIZE];
        // third length byte
        assert_eq!(
            decode(&[0x80, 0x80, 0x01, 1, 5], &mut p),
            Err(XbzrleError::LengthTooLong(0))
        );
        // zero-length zero run after the first
        assert_eq!(
            decode(&[0, 1, 5, 0, 1, 5], &mut p),
            Err(XbzrleError::EmptyZeroRun(3))
        );
        // zero-length non-zero run
        assert_eq!(
            decode(&[3, 0, 5], &mut p),
            Err(XbzrleError::EmptyDataRun(1))
        );
        // run past the page: zero run of 4096 then data
        assert_eq!(
            decode(&[0x80, 0x20, 1, 5], &mut p),
            Err(XbzrleError::PastPage(2))
        );
        assert_eq!(
            decode(&[0x81, 0x20, 1, 5], &mut p),
            Err(XbzrleError::PastPage(0))
        );
        // run past the input
        assert_eq!(
            decode(&[0, 3, 5, 5], &mut p),
            Err(XbzrleError::PastInput(1))
        );
        // truncated: one byte left for a header
        assert_eq!(
            decode(&[0, 1, 5, 7], &mut p),
            Err(XbzrleError::Truncated(3))
        );
        assert_eq!(decode(&[0], &mut p), Err(XbzrleError::Truncated(0)));
        // a leading zero run of 0 and an empty delta are fine
        assert_eq!(decode(&[0, 1, 5], &mut p), Ok(1));
        assert_eq!(p[0], 5);
        assert_eq!(decode(&[], &mut p), Ok(0));
    }

    proptest! {
        #[test]
        fn matches_reference_and_roundtrips(
            seed in any::<[u8; 32]>(),
            edits in proptest::collection::vec((0usize..PAGE_SIZE, 1usize..300, any::<u8>()), 0..40),
        ) {
            let old = page(|i| seed[i % 32].wrapping_mul(i as u8));
            let mut new = old.clone();
            for (at, len, v) in edits {
                for b in &mut new[at..(at + len).min(PAGE_SIZE)] {
                    *b = b.wrapping_add(v);
                }
            }
            let want = reference_encode(&old[..], &new[..]);
            let got = enc(&old, &new, PAGE_SIZE * 2).unwrap();
            prop_assert_eq!(&got, &want);
            let mut back = old.clone();
            prop_assert!(decode(&got, &mut back[..]).is_ok());
            prop_assert_eq!(&back[..], &new[..]);
            // Any smaller budget fails, the exact one succeeds.
            if !got.is_empty() {
                prop_assert_eq!(enc(&old, &new, got.len() - 1), None);
                prop_assert_eq!(enc(&old, &new, got.len()), Some(got));
            }
        }

        #[test]
        fn decoder_never_panics(delta in proptest::collection::vec(any::<u8>(), 0..64), len in 0usize..300) {
            let mut p = vec![0u8; len];
            let _ = decode(&delta, &mut p);
        }
    }
}
