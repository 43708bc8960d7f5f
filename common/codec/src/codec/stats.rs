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
    pub kinds: [KindStats; 8],
    /// Blocks found changed (in `Blocks` records).
    pub changed_blocks: u64,
    /// Changed blocks sent as references.
    pub shared_blocks: u64,
    /// Changed blocks that were all zero.
    pub zero_blocks: u64,
    /// Changed blocks sent as literals.
    pub literal_blocks: u64,
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
    }
}
