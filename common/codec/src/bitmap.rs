//! A fixed-size bitmap of guest pages (or blocks): the currency of dirty tracking.
//!
//! Backends fill one when they harvest their dirty log; the epoch engine walks the set bits.

/// A bitmap with one bit per page, stored as little-endian `u64` words like KVM's dirty log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageBitmap {
    words: Vec<u64>,
    bits: usize,
}

impl PageBitmap {
    /// An all-clear bitmap of `bits` bits.
    pub fn new(bits: usize) -> Self {
        Self {
            words: vec![0; bits.div_ceil(64)],
            bits,
        }
    }

    /// Number of bits (pages) the bitmap covers.
    pub fn len(&self) -> usize {
        self.bits
    }

    /// True when the bitmap covers no pages.
    pub fn is_empty(&self) -> bool {
        self.bits == 0
    }

    /// Set bit `i`. Bits past the end are ignored.
    pub fn set(&mut self, i: usize) {
        if i < self.bits {
            self.words[i / 64] |= 1 << (i % 64);
        }
    }

    /// Whether bit `i` is set (false past the end).
    pub fn get(&self, i: usize) -> bool {
        i < self.bits && self.words[i / 64] & (1 << (i % 64)) != 0
    }

    /// Clear every bit.
    pub fn clear(&mut self) {
        self.words.fill(0);
    }

    /// OR `words` (a KVM-style dirty log) into this bitmap starting at page `first`,
    /// which must be a multiple of 64. Bits past the end are dropped.
    pub fn or_words(&mut self, first: usize, words: &[u64]) {
        debug_assert_eq!(first % 64, 0);
        let start = first / 64;
        for (dst, src) in self.words.iter_mut().skip(start).zip(words) {
            *dst |= *src;
        }
        self.trim();
    }

    /// OR another bitmap of the same length into this one.
    pub fn or_assign(&mut self, other: &PageBitmap) {
        self.or_words(0, &other.words);
    }

    /// Number of set bits.
    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// The raw words (bit `i` is bit `i % 64` of word `i / 64`).
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Iterate over the indices of set bits, in increasing order.
    pub fn iter_set(&self) -> impl Iterator<Item = usize> + '_ {
        self.words.iter().enumerate().flat_map(|(wi, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = w.trailing_zeros() as usize;
                w &= w - 1;
                Some(wi * 64 + b)
            })
        })
    }

    fn trim(&mut self) {
        let tail = self.bits % 64;
        if tail != 0
            && let Some(last) = self.words.last_mut()
        {
            *last &= (1u64 << tail) - 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_count_iter() {
        let mut b = PageBitmap::new(130);
        for i in [0, 63, 64, 129, 500] {
            b.set(i);
        }
        assert_eq!(b.count(), 4);
        assert!(b.get(129) && !b.get(128) && !b.get(500));
        assert_eq!(b.iter_set().collect::<Vec<_>>(), vec![0, 63, 64, 129]);
    }

    #[test]
    fn or_words_drops_bits_past_end() {
        let mut b = PageBitmap::new(70);
        b.or_words(64, &[u64::MAX, u64::MAX]);
        assert_eq!(b.count(), 6);
        assert_eq!(b.iter_set().next(), Some(64));
    }
}
