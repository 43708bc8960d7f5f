//! The encoder's teleportation hook: a dirty page equal to a disk block the backup's
//! replica holds goes as a `DiskRef` ([`crate::teleport`]).

use super::PageEncoder;
use crate::block::{Page, is_zero};
use crate::codec::{Encoding, Mode};
use crate::hashes;
use crate::teleport::DiskLookup;
use crate::varint;

impl PageEncoder {
    /// Send `new` (the content of `page`) as a `DiskRef` when `disk` finds a block with
    /// its content; `None` leaves the page to the other encodings. A zero page, or one the
    /// cache says the backup already holds, is not looked up.
    pub(super) fn encode_disk_ref(
        &mut self,
        page: u64,
        new: &Page,
        disk: &mut dyn DiskLookup,
        out: &mut Vec<u8>,
    ) -> Option<Encoding> {
        if self.cfg.mode != Mode::Fgbi || is_zero(new) {
            return None;
        }
        if self
            .cache
            .as_ref()
            .and_then(|c| c.peek(page))
            .is_some_and(|old| old == new)
        {
            return None;
        }
        let hash = hashes::hash(new);
        let block = disk.find(page, new, hash)?;
        varint::put(out, block);
        self.learn_inner(page, new);
        Some(Encoding::DiskRef)
    }
}
