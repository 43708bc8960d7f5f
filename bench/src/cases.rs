//! Generated page-pair cases: the codec benchmark's reference input data.
//!
//! This module implements the generator specified in `shared/bench/PAGE-CASES.md`
//! exactly: eight cases `a`..`h` of (old, new) 4 KiB page pairs, each case drawn from its
//! own splitmix64 stream seeded with `1000 + c` (c = 0 for `a` .. 7 for `h`), with the
//! draw order given there, so that every implementation of the benchmark (and QEMU's
//! XBZRLE reference harness) encodes the same bytes.

use std::fmt;

/// Size of one page in bytes.
pub const PAGE: usize = 4096;

/// The eight generated cases, as (case letter, short name), in case order.
pub const CASES: [(char, &str); 8] = [
    ('a', "a_identical"),
    ('b', "b_1word"),
    ('c', "c_1pct_bytes"),
    ('d', "d_5pct_blocks"),
    ('e', "e_25pct_bytes"),
    ('f', "f_random"),
    ('g', "g_shift256"),
    ('h', "h_text_edits"),
];

/// The 64-word vocabulary of the text page (case `h`), in index order.
const VOCAB: [&str; 64] = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "it",
    "for",
    "was",
    "on",
    "with",
    "as",
    "by",
    "at",
    "from",
    "this",
    "be",
    "are",
    "or",
    "an",
    "have",
    "not",
    "which",
    "but",
    "all",
    "were",
    "when",
    "we",
    "there",
    "can",
    "one",
    "more",
    "if",
    "will",
    "their",
    "has",
    "been",
    "would",
    "other",
    "into",
    "some",
    "these",
    "its",
    "than",
    "time",
    "only",
    "may",
    "memory",
    "page",
    "kernel",
    "buffer",
    "process",
    "system",
    "value",
    "return",
    "function",
    "struct",
    "const",
    "static",
    "error",
    "data",
    "file",
    "migration",
];

/// A set of (old, new) page pairs, stored as two arrays of concatenated 4096-byte pages.
///
/// Page `i` of `old` is paired with page `i` of `new`.
#[derive(Clone, PartialEq, Eq)]
pub struct PagePairs {
    /// Name of the set (a case's short name, or the source file's name).
    pub name: String,
    /// Old page contents, `len()` pages of 4096 bytes, concatenated.
    pub old: Vec<u8>,
    /// New page contents, `len()` pages of 4096 bytes, concatenated.
    pub new: Vec<u8>,
}

impl PagePairs {
    /// Number of page pairs.
    pub fn len(&self) -> usize {
        self.old.len() / PAGE
    }

    /// Whether the set holds no page pairs.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `i`-th pair as (old page, new page), each 4096 bytes.
    ///
    /// # Panics
    ///
    /// If `i >= self.len()`.
    pub fn pair(&self, i: usize) -> (&[u8], &[u8]) {
        let range = i * PAGE..(i + 1) * PAGE;
        (&self.old[range.clone()], &self.new[range])
    }
}

impl fmt::Debug for PagePairs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PagePairs")
            .field("name", &self.name)
            .field("pages", &self.len())
            .finish_non_exhaustive()
    }
}

/// splitmix64 pseudo-random generator, as specified in PAGE-CASES.md.
#[derive(Debug, Clone)]
struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    fn new(state: u64) -> Self {
        Self { state }
    }

    fn next(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform-ish value in `0..n` via the high half of the 128-bit product (n <= 2^32).
    fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n <= 1 << 32);
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }

    /// `below(n)` as a `usize` index (n is always a small page-sized bound here).
    fn below_usize(&mut self, n: usize) -> usize {
        // n <= 4096 at every call site, so the result fits in usize.
        self.below(n as u64) as usize
    }

    /// Fills `buf` (a multiple of 8 bytes long) with `next()` words, little-endian, in order.
    fn fill_random(&mut self, buf: &mut [u8]) {
        debug_assert_eq!(buf.len() % 8, 0);
        for chunk in buf.chunks_exact_mut(8) {
            chunk.copy_from_slice(&self.next().to_le_bytes());
        }
    }

    /// `b ^= 1 + below(255)`: always changes the byte.
    fn change_byte(&mut self, b: &mut u8) {
        // 1 + below(255) is in 1..=255.
        *b ^= (1 + self.below(255)) as u8;
    }

    /// Changes `k` distinct byte positions of the page, drawing positions until `k` new ones
    /// have been hit.
    fn change_distinct(&mut self, page: &mut [u8], k: usize) {
        let mut mark = [false; PAGE];
        let mut changed = 0;
        while changed < k {
            let pos = self.below_usize(PAGE);
            if mark[pos] {
                continue;
            }
            mark[pos] = true;
            self.change_byte(&mut page[pos]);
            changed += 1;
        }
    }

    /// Appends `s` to `page` at `*pos`, truncated at the page end.
    fn append(page: &mut [u8], pos: &mut usize, s: &[u8]) {
        let n = s.len().min(PAGE - *pos);
        page[*pos..*pos + n].copy_from_slice(&s[..n]);
        *pos += n;
    }

    /// Fills `page` with vocabulary words and separators (case `h`'s old page).
    fn text_page(&mut self, page: &mut [u8]) {
        let mut pos = 0;
        while pos < PAGE {
            let word = VOCAB[self.below_usize(VOCAB.len())];
            Self::append(page, &mut pos, word.as_bytes());
            if pos == PAGE {
                break;
            }
            let sep: &[u8] = match self.below(16) {
                0 => b"\n",
                1 => b". ",
                2 => b", ",
                _ => b" ",
            };
            Self::append(page, &mut pos, sep);
        }
    }
}

/// Generates `pages` page pairs of case `case` (`'a'..='h'`, see [`CASES`]).
///
/// The benchmark uses `pages = 16384`; the first `k` pairs of a generation with fewer pages
/// equal the first `k` pairs with more. Returns `None` for an unknown case letter.
pub fn generate(case: char, pages: usize) -> Option<PagePairs> {
    let c = CASES.iter().position(|&(letter, _)| letter == case)?;
    let name = CASES[c].1.to_string();
    let mut rng = SplitMix64::new(1000 + c as u64);
    let mut old = vec![0u8; pages * PAGE];
    let mut new = vec![0u8; pages * PAGE];
    for (o, n) in old.chunks_exact_mut(PAGE).zip(new.chunks_exact_mut(PAGE)) {
        if case == 'h' {
            rng.text_page(o);
        } else {
            rng.fill_random(o);
        }
        n.copy_from_slice(o);
        match case {
            'a' => {}
            'b' => {
                let w = rng.below_usize(512);
                for b in &mut n[8 * w..8 * w + 8] {
                    rng.change_byte(b);
                }
            }
            'c' => rng.change_distinct(n, 41),
            'd' => {
                for block in n.chunks_exact_mut(64) {
                    if rng.below(20) == 0 {
                        rng.fill_random(block);
                    }
                }
            }
            'e' => rng.change_distinct(n, 1024),
            'f' => rng.fill_random(n),
            'g' => {
                let s = 1 + rng.below_usize(32);
                let p = rng.below_usize(PAGE - 256 - s + 1);
                n.copy_within(p..p + 256, p + s);
            }
            'h' => {
                for _ in 0..3 {
                    let len = 1 + rng.below_usize(8);
                    let p = rng.below_usize(PAGE - len + 1);
                    for b in &mut n[p..p + len] {
                        // below(26) < 26, so this stays within 'a'..='z'.
                        *b = b'a' + rng.below(26) as u8;
                    }
                }
            }
            _ => unreachable!("case letters come from CASES"),
        }
    }
    Some(PagePairs { name, old, new })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Positions where the two pages differ.
    fn diffs(old: &[u8], new: &[u8]) -> Vec<usize> {
        (0..old.len()).filter(|&i| old[i] != new[i]).collect()
    }

    /// splitmix64's first output for a given state, computed independently of
    /// [`SplitMix64`] with explicit 128-bit arithmetic reduced mod 2^64.
    fn reference_first_output(state: u64) -> u64 {
        const M: u128 = 1 << 64;
        let s = (u128::from(state) + 0x9E37_79B9_7F4A_7C15) % M;
        let z = ((s ^ (s >> 30)) * 0xBF58_476D_1CE4_E5B9) % M;
        let z = ((z ^ (z >> 27)) * 0x94D0_49BB_1331_11EB) % M;
        u64::try_from(z ^ (z >> 31)).unwrap()
    }

    #[test]
    fn splitmix64_first_output_pinned() {
        assert_eq!(SplitMix64::new(1000).next(), reference_first_output(1000));
        // The widely published first splitmix64 output for seed 0.
        assert_eq!(reference_first_output(0), 0xE220_A839_7B1D_CDAF);
        assert_eq!(SplitMix64::new(0).next(), 0xE220_A839_7B1D_CDAF);
        for seed in 1000..1008 {
            assert_eq!(SplitMix64::new(seed).next(), reference_first_output(seed));
        }
    }

    #[test]
    fn below_uses_high_half_of_product() {
        let mut a = SplitMix64::new(1003);
        let mut b = SplitMix64::new(1003);
        for n in [1u64, 2, 20, 255, 4096, 1 << 32] {
            let x = a.next();
            let expect = u64::try_from((u128::from(x) * u128::from(n)) >> 64).unwrap();
            assert_eq!(b.below(n), expect);
            assert!(expect < n);
        }
    }

    #[test]
    fn unknown_case_is_none() {
        assert!(generate('i', 1).is_none());
        assert!(generate('A', 1).is_none());
        for (c, name) in CASES {
            let p = generate(c, 2).unwrap();
            assert_eq!(p.name, name);
            assert_eq!(p.len(), 2);
            assert_eq!(p.old.len(), 2 * PAGE);
            assert_eq!(p.new.len(), 2 * PAGE);
        }
        assert!(generate('a', 0).unwrap().is_empty());
    }

    #[test]
    fn case_a_identical() {
        let p = generate('a', 256).unwrap();
        assert_eq!(p.old, p.new);
        // The old pages are random, not zero, and differ from each other.
        assert_ne!(p.pair(0).0, p.pair(1).0);
        assert!(p.old.iter().filter(|&&b| b == 0).count() < p.old.len() / 100);
    }

    #[test]
    fn case_b_one_aligned_word() {
        let p = generate('b', 2000).unwrap();
        let mut words = std::collections::HashSet::new();
        for i in 0..p.len() {
            let (o, n) = p.pair(i);
            let d = diffs(o, n);
            assert_eq!(d.len(), 8, "page {i}");
            assert_eq!(d[0] % 8, 0, "page {i}: unaligned word");
            assert_eq!(d[7], d[0] + 7, "page {i}: not contiguous");
            words.insert(d[0] / 8);
        }
        // The word position is spread over the page.
        assert!(words.len() > 400, "{} distinct words", words.len());
    }

    #[test]
    fn case_c_41_bytes() {
        let p = generate('c', 1000).unwrap();
        for i in 0..p.len() {
            let (o, n) = p.pair(i);
            assert_eq!(diffs(o, n).len(), 41, "page {i}");
        }
    }

    #[test]
    fn case_e_1024_bytes() {
        let p = generate('e', 300).unwrap();
        for i in 0..p.len() {
            let (o, n) = p.pair(i);
            assert_eq!(diffs(o, n).len(), 1024, "page {i}");
        }
    }

    #[test]
    fn case_d_whole_blocks_about_5pct() {
        let p = generate('d', 4000).unwrap();
        let mut changed_blocks = 0usize;
        for i in 0..p.len() {
            let (o, n) = p.pair(i);
            for (ob, nb) in o.chunks_exact(64).zip(n.chunks_exact(64)) {
                let d = diffs(ob, nb).len();
                if d > 0 {
                    changed_blocks += 1;
                    // A rewritten block is fresh random data: nearly all 64 bytes differ,
                    // unlike scattered byte changes.
                    assert!(d >= 48, "page {i}: block with only {d} differing bytes");
                }
            }
        }
        let total = p.len() * 64;
        // Expected 12800 of 256000, standard deviation ~110.
        let frac = changed_blocks as f64 / total as f64;
        assert!(
            (0.047..0.053).contains(&frac),
            "changed block fraction {frac}"
        );
    }

    #[test]
    fn case_f_differs_nearly_everywhere() {
        let p = generate('f', 500).unwrap();
        for i in 0..p.len() {
            let (o, n) = p.pair(i);
            let d = diffs(o, n).len();
            // Expected 4080 (1/256 equal by chance), standard deviation ~4.
            assert!(d >= 4040, "page {i}: {d} differing bytes");
        }
    }

    #[test]
    fn case_g_shifted_run() {
        let p = generate('g', 500).unwrap();
        let mut shifts = std::collections::HashSet::new();
        for i in 0..p.len() {
            let (o, n) = p.pair(i);
            let d = diffs(o, n);
            let first = *d.first().expect("a shift of random data changes the page");
            // The moved run starts at p + s; its first bytes may equal old by chance.
            let found = (first.saturating_sub(4)..=first).find_map(|start| {
                (1..=32usize).find(|&s| {
                    start >= s
                        && start + 256 <= PAGE
                        && n[start..start + 256] == o[start - s..start - s + 256]
                        && n[..start] == o[..start]
                        && n[start + 256..] == o[start + 256..]
                })
            });
            let s = found.unwrap_or_else(|| panic!("page {i}: no 256-byte shift found"));
            shifts.insert(s);
        }
        assert_eq!(shifts.len(), 32, "all shifts 1..=32 occur");
    }

    /// Checks that `page` is vocabulary words separated by single separators, the last
    /// token possibly truncated at the page end.
    fn assert_text_page(page: &[u8]) {
        assert!(page.is_ascii());
        let mut pos = 0;
        while pos < page.len() {
            let end = page[pos..]
                .iter()
                .position(|b| !b.is_ascii_lowercase())
                .map_or(page.len(), |k| pos + k);
            let word = std::str::from_utf8(&page[pos..end]).unwrap();
            if end == page.len() {
                assert!(
                    VOCAB.iter().any(|v| v.starts_with(word)) && !word.is_empty(),
                    "truncated last word {word:?}"
                );
                return;
            }
            assert!(VOCAB.contains(&word), "not a vocabulary word: {word:?}");
            pos = end;
            let rest = &page[pos..];
            let sep_len = [&b"\n"[..], b". ", b", ", b" "]
                .iter()
                .find(|s| rest.starts_with(s))
                .map(|s| s.len())
                .or_else(|| (rest == b"." || rest == b",").then_some(1))
                .unwrap_or_else(|| {
                    panic!("bad separator at {pos}: {:?}", &rest[..rest.len().min(4)])
                });
            pos += sep_len;
            assert!(
                pos == page.len() || page[pos].is_ascii_lowercase(),
                "separator not followed by a word at {pos}"
            );
        }
    }

    #[test]
    fn case_h_text_with_three_short_edits() {
        let p = generate('h', 1000).unwrap();
        let mut seps = [0usize; 4];
        for i in 0..p.len() {
            let (o, n) = p.pair(i);
            assert_text_page(o);
            seps[0] += o.iter().filter(|&&b| b == b'\n').count();
            seps[1] += o.windows(2).filter(|w| w == b". ").count();
            seps[2] += o.windows(2).filter(|w| w == b", ").count();
            let d = diffs(o, n);
            for &k in &d {
                assert!(n[k].is_ascii_lowercase(), "page {i}: edit byte {:#x}", n[k]);
            }
            // The differing positions are covered by at most 3 windows of 8 bytes
            // (greedy covering is optimal on a line).
            let mut windows = 0;
            let mut covered_until = 0;
            for &k in &d {
                if windows == 0 || k >= covered_until {
                    windows += 1;
                    covered_until = k + 8;
                }
            }
            assert!(windows <= 3, "page {i}: {windows} edit runs: {d:?}");
        }
        // Each separator kind occurs (1/16 each for the three rare kinds).
        assert!(seps.iter().take(3).all(|&s| s > 1000), "{seps:?}");
    }

    /// FNV-1a 64 of `data`.
    fn fnv1a(data: &[u8]) -> u64 {
        data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        })
    }

    /// Fingerprints of the first 64 pairs of every case, produced by an independent
    /// implementation of PAGE-CASES.md (a Python script written from the spec alone, with
    /// arbitrary-precision integers), so any drift from the spec's draw order fails here.
    #[test]
    fn matches_independent_reference() {
        const REFERENCE: [(char, u64, u64); 8] = [
            ('a', 0x3a38b545528cbc5b, 0x3a38b545528cbc5b),
            ('b', 0x227d9086a3f699e8, 0x26ced7121ea1e4a6),
            ('c', 0x0e288af69370bdc1, 0x30b9d7639510a13b),
            ('d', 0xcf591b08fc8b8b38, 0xd62d9285d2aca271),
            ('e', 0xe65cc748b915be88, 0xd0608b7aae32e575),
            ('f', 0x0d25b9933cc4c065, 0xaf937f29741d9143),
            ('g', 0xa766f1996ff6f94e, 0x6cd35b80cf0878cb),
            ('h', 0x2a9f1a5bba97c0a1, 0x2916fff402b915e9),
        ];
        for (c, old, new) in REFERENCE {
            let p = generate(c, 64).unwrap();
            assert_eq!(fnv1a(&p.old), old, "case {c} old pages");
            assert_eq!(fnv1a(&p.new), new, "case {c} new pages");
        }
    }

    #[test]
    fn deterministic_and_streams_differ() {
        for (c, _) in CASES {
            let a = generate(c, 64).unwrap();
            let b = generate(c, 64).unwrap();
            assert_eq!(a, b, "case {c}");
            // A shorter generation is a prefix of a longer one.
            let short = generate(c, 8).unwrap();
            assert_eq!(short.old[..], a.old[..8 * PAGE]);
            assert_eq!(short.new[..], a.new[..8 * PAGE]);
        }
        let firsts: Vec<Vec<u8>> = CASES
            .iter()
            .map(|&(c, _)| generate(c, 1).unwrap().old)
            .collect();
        for i in 0..firsts.len() {
            for j in i + 1..firsts.len() {
                assert_ne!(firsts[i], firsts[j], "cases {i} and {j} share a stream");
            }
        }
        // Case a's first old page is the stream seeded 1000.
        let mut rng = SplitMix64::new(1000);
        let first = rng.next().to_le_bytes();
        assert_eq!(firsts[0][..8], first);
    }
}
