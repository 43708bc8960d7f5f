//! What the encoder did: pages and payload bytes per encoding, and what became of the
//! changed blocks of `Blocks` records.

use super::Encoding;

/// Per-encoding counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct KindStats {
    /// Pages.
    pub pages: u64,
    /// Payload bytes.
    pub bytes: u64,
}

/// What the encoder did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct EncodeStats {
    /// Per encoding, indexed by `Encoding as usize`.
    pub kinds: [KindStats; 7],
    /// Blocks found changed (in `Blocks` records).
    pub changed_blocks: u64,
    /// Changed blocks sent as references.
    pub shared_blocks: u64,
    /// Changed blocks that were all zero.
    pub zero_blocks: u64,
    /// Changed blocks sent as literals.
    pub literal_blocks: u64,
    /// General compression attempts (whole pages and literal blocks).
    pub compress_tries: u64,
    /// Attempts whose output was small enough to be kept.
    pub compress_wins: u64,
    /// Attempts skipped because recent ones at the same site rarely paid.
    pub compress_skipped: u64,
}

impl EncodeStats {
    /// Pages encoded.
    pub fn pages(&self) -> u64 {
        self.kinds.iter().map(|k| k.pages).sum()
    }

    /// Payload bytes produced.
    pub fn bytes(&self) -> u64 {
        self.kinds.iter().map(|k| k.bytes).sum()
    }

    /// Counters of one encoding.
    pub fn kind(&self, e: Encoding) -> KindStats {
        self.kinds[e as usize]
    }

    /// Add another set of counters.
    pub fn add(&mut self, o: &EncodeStats) {
        for (a, b) in self.kinds.iter_mut().zip(&o.kinds) {
            a.pages += b.pages;
            a.bytes += b.bytes;
        }
        self.changed_blocks += o.changed_blocks;
        self.shared_blocks += o.shared_blocks;
        self.zero_blocks += o.zero_blocks;
        self.literal_blocks += o.literal_blocks;
        self.compress_tries += o.compress_tries;
        self.compress_wins += o.compress_wins;
        self.compress_skipped += o.compress_skipped;
    }

    /// What was counted since `earlier`, a copy of these counters taken before.
    pub fn since(&self, earlier: &EncodeStats) -> EncodeStats {
        let mut d = self.clone();
        for (a, b) in d.kinds.iter_mut().zip(&earlier.kinds) {
            a.pages = a.pages.saturating_sub(b.pages);
            a.bytes = a.bytes.saturating_sub(b.bytes);
        }
        let pairs = [
            (&mut d.changed_blocks, earlier.changed_blocks),
            (&mut d.shared_blocks, earlier.shared_blocks),
            (&mut d.zero_blocks, earlier.zero_blocks),
            (&mut d.literal_blocks, earlier.literal_blocks),
            (&mut d.compress_tries, earlier.compress_tries),
            (&mut d.compress_wins, earlier.compress_wins),
            (&mut d.compress_skipped, earlier.compress_skipped),
        ];
        for (a, b) in pairs {
            *a = a.saturating_sub(b);
        }
        d
    }
}
