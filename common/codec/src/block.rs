//! Block geometry and changed-block identification (the *identify* stage).
//!
//! A page is 4096 bytes; a block is a power of two from 32 to 1024 bytes (default 64).
//! The work horse is [`DiffMask`]: one bit per byte of a page, set where an old and a new
//! page differ, computed with SSE2 or AVX2 when the CPU has them. The changed-block bitmap
//! ([`BlockMask`]) and the XBZRLE delta encoder are both read off the same mask, so a page
//! is compared once.

use crate::PAGE_SIZE;

/// A guest page, by reference.
pub type Page = [u8; PAGE_SIZE];

/// Errors of this module.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    /// Block size outside 32..=1024 or not a power of two.
    #[error("block size {0} is not a power of two from 32 to 1024")]
    BadBlockSize(u32),
    /// A slice that should be one page is not.
    #[error("expected a {PAGE_SIZE}-byte page, got {0} bytes")]
    NotAPage(usize),
}

/// The size of a block: a power of two from 32 to 1024 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct BlockSize(u32);

impl BlockSize {
    /// The default block size, 64 bytes.
    pub const DEFAULT: BlockSize = BlockSize(64);
    /// Smallest allowed block size.
    pub const MIN: u32 = 32;
    /// Largest allowed block size.
    pub const MAX: u32 = 1024;

    /// Validate a block size.
    pub fn new(bytes: u32) -> Result<Self, BlockError> {
        if (Self::MIN..=Self::MAX).contains(&bytes) && bytes.is_power_of_two() {
            Ok(Self(bytes))
        } else {
            Err(BlockError::BadBlockSize(bytes))
        }
    }

    /// Size in bytes.
    pub fn bytes(self) -> usize {
        self.0 as usize
    }

    /// Blocks in one page (4 to 128).
    pub fn per_page(self) -> usize {
        PAGE_SIZE / self.0 as usize
    }

    /// Byte range of block `b` inside a page.
    pub fn range(self, b: usize) -> std::ops::Range<usize> {
        let s = self.bytes();
        b * s..(b + 1) * s
    }
}

impl Default for BlockSize {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl std::fmt::Display for BlockSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// View a slice as a page, or say why not.
pub fn as_page(bytes: &[u8]) -> Result<&Page, BlockError> {
    bytes
        .try_into()
        .map_err(|_| BlockError::NotAPage(bytes.len()))
}

/// One bit per byte of a page: bit `i % 64` of word `i / 64` is set when byte `i` differs.
#[derive(Clone, PartialEq, Eq)]
pub struct DiffMask {
    words: [u64; PAGE_SIZE / 64],
    changed: u32,
    runs: u32,
    /// Bit `w` set when word `w` of the mask is non-zero.
    nonzero: u64,
}

/// The counts of a mask, added up word by word as the words are made (in the same pass as
/// the compare, where the SIMD paths do it).
#[derive(Default)]
struct Tally {
    changed: u32,
    runs: u32,
    /// The previous word's last bit (a run may continue across words).
    carry: u64,
    nonzero: u64,
}

impl Tally {
    /// Count word `i`, `w`.
    #[inline(always)]
    fn add(&mut self, i: usize, w: u64) {
        self.changed += w.count_ones();
        self.runs += (w & !((w << 1) | self.carry)).count_ones();
        self.carry = w >> 63;
        self.nonzero |= u64::from(w != 0) << i;
    }

    /// The mask of `words`, which this tally counted.
    #[inline(always)]
    fn finish(self, words: [u64; PAGE_SIZE / 64]) -> DiffMask {
        DiffMask {
            words,
            changed: self.changed,
            runs: self.runs,
            nonzero: self.nonzero,
        }
    }
}

impl std::fmt::Debug for DiffMask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DiffMask({} bytes differ in {} runs)",
            self.changed, self.runs
        )
    }
}

/// The instructions a page comparison runs on. Every path gives the same mask, bit for bit;
/// [`SimdPath::best`] picks the fastest this CPU has at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SimdPath {
    /// AVX-512BW: one 64-byte compare straight into a mask word.
    Avx512,
    /// AVX2: two 32-byte compares and byte-mask moves per mask word.
    Avx2,
    /// SSE2 (the x86_64 baseline): four 16-byte compares per mask word.
    Sse2,
    /// Plain 64-bit arithmetic, on any CPU (the reference).
    Portable,
}

impl SimdPath {
    /// Every path, fastest first.
    pub const ALL: [SimdPath; 4] = [
        SimdPath::Avx512,
        SimdPath::Avx2,
        SimdPath::Sse2,
        SimdPath::Portable,
    ];

    /// The fastest path this CPU can run.
    pub fn best() -> Self {
        Self::ALL
            .into_iter()
            .find(|p| p.available())
            .unwrap_or(SimdPath::Portable)
    }

    /// Whether this CPU can run the path.
    pub fn available(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            SimdPath::Avx512 => std::arch::is_x86_feature_detected!("avx512bw"),
            #[cfg(target_arch = "x86_64")]
            SimdPath::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            #[cfg(target_arch = "x86_64")]
            SimdPath::Sse2 => true,
            #[cfg(not(target_arch = "x86_64"))]
            SimdPath::Avx512 | SimdPath::Avx2 | SimdPath::Sse2 => false,
            SimdPath::Portable => true,
        }
    }

    /// Name in reports: "avx512", "avx2", "sse2" or "portable".
    pub fn name(self) -> &'static str {
        match self {
            SimdPath::Avx512 => "avx512",
            SimdPath::Avx2 => "avx2",
            SimdPath::Sse2 => "sse2",
            SimdPath::Portable => "portable",
        }
    }
}

impl std::str::FromStr for SimdPath {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| format!("{s:?} is not a SIMD path (avx512, avx2, sse2, portable)"))
    }
}

impl DiffMask {
    /// Compare two pages, using the fastest instructions this CPU has.
    #[inline]
    pub fn new(old: &Page, new: &Page) -> Self {
        Self::with_path(SimdPath::best(), old, new)
    }

    /// Compare two pages on `path`, or portably when this CPU cannot run it.
    pub fn with_path(path: SimdPath, old: &Page, new: &Page) -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            match path {
                SimdPath::Avx512 if path.available() => {
                    // SAFETY: the CPU supports AVX-512BW (checked just above), and with it
                    // AVX-512F and POPCNT.
                    return unsafe { simd::diff_avx512(old, new) };
                }
                SimdPath::Avx2 if path.available() => {
                    // SAFETY: the CPU supports AVX2, checked just above.
                    return unsafe { simd::diff_avx2(old, new) };
                }
                SimdPath::Sse2 => {
                    // SAFETY: SSE2 is part of the x86_64 baseline.
                    return unsafe { simd::diff_sse2(old, new) };
                }
                _ => {}
            }
        }
        // Elsewhere there is only the portable path.
        #[cfg(not(target_arch = "x86_64"))]
        let _ = path;
        Self::new_portable(old, new)
    }

    /// Compare two pages without SIMD intrinsics (the reference implementation).
    pub fn new_portable(old: &Page, new: &Page) -> Self {
        let mut words = [0u64; PAGE_SIZE / 64];
        for (w, (o, n)) in words
            .iter_mut()
            .zip(old.chunks_exact(64).zip(new.chunks_exact(64)))
        {
            let mut m = 0u64;
            for (k, (a, b)) in o.chunks_exact(8).zip(n.chunks_exact(8)).enumerate() {
                let x = u64::from_le_bytes(a.try_into().unwrap_or_default())
                    ^ u64::from_le_bytes(b.try_into().unwrap_or_default());
                m |= u64::from(nonzero_bytes(x)) << (8 * k);
            }
            *w = m;
        }
        Self::from_words(words)
    }

    /// A mask from its words, counting differing bytes and runs.
    fn from_words(words: [u64; PAGE_SIZE / 64]) -> Self {
        let mut t = Tally::default();
        for (i, &w) in words.iter().enumerate() {
            t.add(i, w);
        }
        t.finish(words)
    }

    /// The mask of a page against an all-zero page: the page's non-zero bytes.
    pub fn nonzero(page: &Page) -> Self {
        Self::new(&ZERO_PAGE, page)
    }

    /// The raw words.
    pub fn words(&self) -> &[u64; PAGE_SIZE / 64] {
        &self.words
    }

    /// True when the pages are identical.
    pub fn is_clear(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// Number of differing bytes.
    pub fn changed_bytes(&self) -> usize {
        self.changed as usize
    }

    /// Whether byte `i` differs.
    pub fn get(&self, i: usize) -> bool {
        self.words[i / 64] >> (i % 64) & 1 != 0
    }

    /// The first position at or after `i` whose bit is not `ones` (PAGE_SIZE if none):
    /// the end of the run of equal (`ones == false`) or differing bytes starting at `i`.
    #[inline]
    pub fn run_end(&self, i: usize, ones: bool) -> usize {
        let flip = if ones { u64::MAX } else { 0 };
        let mut wi = i / 64;
        let mut w = (self.words[wi] ^ flip) & (u64::MAX << (i % 64));
        loop {
            if w != 0 {
                return wi * 64 + w.trailing_zeros() as usize;
            }
            wi += 1;
            if wi == self.words.len() {
                return PAGE_SIZE;
            }
            w = self.words[wi] ^ flip;
        }
    }

    /// Bit `w` is set when mask word `w` (bytes `64w..64w+64`) has a differing byte.
    pub fn nonzero_words(&self) -> u64 {
        self.nonzero
    }

    /// Number of runs of differing bytes.
    pub fn runs(&self) -> usize {
        self.runs as usize
    }

    /// The blocks (of `bs`) that hold at least one differing byte.
    pub fn blocks(&self, bs: BlockSize) -> BlockMask {
        let mut m = 0u128;
        match bs.bytes() {
            32 => {
                for (i, &w) in self.words.iter().enumerate() {
                    let lo = u128::from(w as u32 != 0);
                    let hi = u128::from(w >> 32 != 0);
                    m |= (lo | hi << 1) << (2 * i);
                }
            }
            s => {
                let per = s / 64;
                for (b, ws) in self.words.chunks_exact(per).enumerate() {
                    if ws.iter().any(|&w| w != 0) {
                        m |= 1 << b;
                    }
                }
            }
        }
        BlockMask {
            bits: m,
            count: bs.per_page() as u8,
        }
    }
}

/// One bit per block of a page (at most 128 blocks): set where the block changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BlockMask {
    bits: u128,
    count: u8,
}

impl BlockMask {
    /// A mask of `bs.per_page()` blocks from raw bits (bits past the count are dropped).
    pub fn from_bits(bits: u128, bs: BlockSize) -> Self {
        let count = bs.per_page();
        let keep = if count == 128 {
            u128::MAX
        } else {
            (1u128 << count) - 1
        };
        Self {
            bits: bits & keep,
            count: count as u8,
        }
    }

    /// All blocks of a page set.
    pub fn all(bs: BlockSize) -> Self {
        Self::from_bits(u128::MAX, bs)
    }

    /// The raw bits.
    pub fn bits(self) -> u128 {
        self.bits
    }

    /// Blocks in the page.
    pub fn len(self) -> usize {
        self.count as usize
    }

    /// True when the page has no blocks (never for a valid block size).
    pub fn is_empty(self) -> bool {
        self.count == 0
    }

    /// Number of set blocks.
    pub fn changed(self) -> usize {
        self.bits.count_ones() as usize
    }

    /// Whether block `b` is set.
    pub fn get(self, b: usize) -> bool {
        b < 128 && self.bits >> b & 1 != 0
    }

    /// Set block `b`.
    pub fn set(&mut self, b: usize) {
        if b < self.count as usize {
            self.bits |= 1 << b;
        }
    }

    /// Iterate over set block indices in order.
    pub fn iter(self) -> impl Iterator<Item = usize> {
        let mut bits = self.bits;
        std::iter::from_fn(move || {
            if bits == 0 {
                return None;
            }
            let b = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            Some(b)
        })
    }
}

/// An all-zero page.
pub static ZERO_PAGE: Page = [0u8; PAGE_SIZE];

/// Whether a page (or block) is all zeros.
pub fn is_zero(bytes: &[u8]) -> bool {
    let (chunks, rest) = bytes.as_chunks::<8>();
    chunks
        .iter()
        .fold(0u64, |acc, c| acc | u64::from_ne_bytes(*c))
        == 0
        && rest.iter().all(|&b| b == 0)
}

/// The changed blocks between two pages.
pub fn changed_blocks(old: &Page, new: &Page, bs: BlockSize) -> BlockMask {
    DiffMask::new(old, new).blocks(bs)
}

/// Bit k of the result is set when byte k of `x` is non-zero.
#[inline]
fn nonzero_bytes(x: u64) -> u8 {
    const LO7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    // High bit of each byte set iff the byte is non-zero.
    let t = ((x & LO7) + LO7) | x;
    let hi = (t >> 7) & 0x0101_0101_0101_0101;
    // Gather the eight bits into one byte.
    (hi.wrapping_mul(0x0102_0408_1020_4080) >> 56) as u8
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use super::{DiffMask, PAGE_SIZE, Page, Tally};
    use std::arch::x86_64::*;

    /// AVX-512BW: one 64-byte compare per word of the mask, whose result is the word.
    #[target_feature(enable = "avx512f,avx512bw,popcnt")]
    pub(super) fn diff_avx512(old: &Page, new: &Page) -> DiffMask {
        let mut words = [0u64; PAGE_SIZE / 64];
        let mut tally = Tally::default();
        for (i, w) in words.iter_mut().enumerate() {
            let off = i * 64;
            // SAFETY: off + 64 <= PAGE_SIZE, so both 64-byte unaligned loads at off stay
            // inside the two 4096-byte arrays.
            let d = unsafe {
                let a = _mm512_loadu_si512(old.as_ptr().add(off).cast());
                let b = _mm512_loadu_si512(new.as_ptr().add(off).cast());
                _mm512_cmpneq_epi8_mask(a, b)
            };
            *w = d;
            tally.add(i, d);
        }
        tally.finish(words)
    }

    /// AVX2: two 32-byte compares per 64-byte word of the mask; the counts use POPCNT
    /// (every AVX2 CPU has it).
    #[target_feature(enable = "avx2,popcnt")]
    pub(super) fn diff_avx2(old: &Page, new: &Page) -> DiffMask {
        let mut words = [0u64; PAGE_SIZE / 64];
        let mut tally = Tally::default();
        for (i, w) in words.iter_mut().enumerate() {
            let off = i * 64;
            // SAFETY: off + 64 <= PAGE_SIZE, so both 32-byte unaligned loads at off and
            // off + 32 stay inside the two 4096-byte arrays.
            let (lo, hi) = unsafe {
                let o = old.as_ptr().add(off);
                let n = new.as_ptr().add(off);
                let a0 = _mm256_loadu_si256(o.cast());
                let b0 = _mm256_loadu_si256(n.cast());
                let a1 = _mm256_loadu_si256(o.add(32).cast());
                let b1 = _mm256_loadu_si256(n.add(32).cast());
                (
                    _mm256_movemask_epi8(_mm256_cmpeq_epi8(a0, b0)).cast_unsigned(),
                    _mm256_movemask_epi8(_mm256_cmpeq_epi8(a1, b1)).cast_unsigned(),
                )
            };
            let d = !(u64::from(lo) | u64::from(hi) << 32);
            *w = d;
            tally.add(i, d);
        }
        tally.finish(words)
    }

    /// SSE2: four 16-byte compares per 64-byte word of the mask.
    #[target_feature(enable = "sse2")]
    pub(super) fn diff_sse2(old: &Page, new: &Page) -> DiffMask {
        let mut words = [0u64; PAGE_SIZE / 64];
        for (i, w) in words.iter_mut().enumerate() {
            let mut eq = 0u64;
            for k in 0..4 {
                let off = i * 64 + k * 16;
                // SAFETY: off + 16 <= PAGE_SIZE, so both 16-byte unaligned loads stay
                // inside the two 4096-byte arrays.
                let m = unsafe {
                    let a = _mm_loadu_si128(old.as_ptr().add(off).cast());
                    let b = _mm_loadu_si128(new.as_ptr().add(off).cast());
                    _mm_movemask_epi8(_mm_cmpeq_epi8(a, b)).cast_unsigned() & 0xffff
                };
                eq |= u64::from(m) << (16 * k);
            }
            *w = !eq;
        }
        DiffMask::from_words(words)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn page_from(seed: u64, density: u32) -> (Box<Page>, Box<Page>) {
        let mut s = seed;
        let mut next = || {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        let mut old = Box::new([0u8; PAGE_SIZE]);
        for b in old.iter_mut() {
            *b = next() as u8;
        }
        let mut new = old.clone();
        for b in new.iter_mut() {
            if (next() % 1000) < u64::from(density) {
                *b ^= 1 + (next() % 255) as u8;
            }
        }
        (old, new)
    }

    fn reference_bits(old: &Page, new: &Page) -> Vec<bool> {
        old.iter().zip(new.iter()).map(|(a, b)| a != b).collect()
    }

    #[test]
    fn block_size_validation() {
        for ok in [32, 64, 128, 256, 512, 1024] {
            assert_eq!(BlockSize::new(ok).map(|b| b.bytes()), Ok(ok as usize));
        }
        for bad in [0, 16, 48, 2048, 65] {
            assert_eq!(BlockSize::new(bad), Err(BlockError::BadBlockSize(bad)));
        }
        assert_eq!(BlockSize::default().per_page(), 64);
    }

    #[test]
    fn nonzero_bytes_matches_bytewise() {
        for x in [
            0u64,
            1,
            0x80,
            0xff00,
            u64::MAX,
            0x0100_0000_0000_0001,
            0x8000_0000_0000_0000,
        ] {
            let want = x
                .to_le_bytes()
                .iter()
                .enumerate()
                .fold(0u8, |m, (k, &b)| m | (u8::from(b != 0) << k));
            assert_eq!(nonzero_bytes(x), want, "{x:#x}");
        }
    }

    proptest! {
        #[test]
        fn simd_and_portable_agree_with_bytewise(seed in any::<u64>(), density in 0u32..1000) {
            let (old, new) = page_from(seed, density);
            let want = reference_bits(&old, &new);
            let on_every_path = SimdPath::ALL.map(|p| DiffMask::with_path(p, &old, &new));
            for m in on_every_path.iter().chain([&DiffMask::new(&old, &new)]) {
                let got: Vec<bool> = (0..PAGE_SIZE).map(|i| m.get(i)).collect();
                prop_assert_eq!(&got, &want);
                prop_assert_eq!(m.changed_bytes(), want.iter().filter(|&&b| b).count());
                let runs = (0..PAGE_SIZE).filter(|&i| want[i] && (i == 0 || !want[i - 1])).count();
                prop_assert_eq!(m.runs(), runs);
            }
        }

        #[test]
        fn block_mask_matches_block_compare(seed in any::<u64>(), density in 0u32..20, shift in 5u32..=10) {
            let bs = BlockSize::new(1 << shift).unwrap();
            let (old, new) = page_from(seed, density);
            let m = changed_blocks(&old, &new, bs);
            prop_assert_eq!(m.len(), bs.per_page());
            for b in 0..bs.per_page() {
                prop_assert_eq!(m.get(b), old[bs.range(b)] != new[bs.range(b)], "block {}", b);
            }
            prop_assert_eq!(m.iter().count(), m.changed());
        }

        #[test]
        fn run_end_finds_run_boundaries(seed in any::<u64>(), density in 0u32..1000, start in 0usize..PAGE_SIZE) {
            let (old, new) = page_from(seed, density);
            let bits = reference_bits(&old, &new);
            let m = DiffMask::new(&old, &new);
            let ones = bits[start];
            let want = (start..PAGE_SIZE).find(|&i| bits[i] != ones).unwrap_or(PAGE_SIZE);
            prop_assert_eq!(m.run_end(start, ones), want);
        }
    }

    #[test]
    fn paths_are_named_and_the_best_one_is_available() {
        for p in SimdPath::ALL {
            assert_eq!(p.name().parse::<SimdPath>(), Ok(p));
        }
        assert!(SimdPath::best().available());
        assert!(SimdPath::Portable.available());
        assert!("avx3".parse::<SimdPath>().is_err());
        // The machines this project runs on have AVX-512BW; say so when a run does not
        // exercise that path, rather than pass silently.
        if !SimdPath::Avx512.available() {
            eprintln!("note: this CPU has no AVX-512BW; its path is not exercised here");
        }
    }

    #[test]
    fn zero_detection() {
        let mut p = [0u8; PAGE_SIZE];
        assert!(is_zero(&p));
        assert!(DiffMask::nonzero(&p).is_clear());
        p[4095] = 1;
        assert!(!is_zero(&p));
        assert_eq!(DiffMask::nonzero(&p).changed_bytes(), 1);
        assert!(is_zero(&p[..64]));
    }

    #[test]
    fn as_page_checks_length() {
        assert_eq!(as_page(&[0u8; 10]).err(), Some(BlockError::NotAPage(10)));
        assert!(as_page(&[0u8; PAGE_SIZE]).is_ok());
    }
}
