//! The `files` workload's reference semantics (docs/GUESTS.md, "`files`"): a file server
//! over a document tree on the guest's disk, with a bounded page cache in guest memory.
//! Its layout in the heap and on the disk, the files' content, the document tree a host
//! writes when it creates the disk ([`format_disk`]), and the file table the VMM writes
//! into a new guest ([`file_table`]). The model runs the request ([`crate::model`]).

use crate::guest_abi::{GuestParams, disk};
use crate::web::doc_word;

/// Most pages of one file (and of one cache slot).
pub const FILE_PAGES_MAX: u64 = 16;
/// Most files in the tree (the file table's entries).
pub const MAX_FILES: u64 = 1 << 16;
/// Bytes of one file table entry: `start | pages << 48`, then the version.
pub const ENTRY_BYTES: u64 = 16;
/// Every this many requests one file is rewritten.
pub const REWRITE_EVERY: u64 = 256;
/// Log records per log page (64 bytes each).
pub const LOG_RECORDS_PER_PAGE: u64 = 64;
/// Bits of an entry's first word that hold the file's first disk page.
const START_BITS: u32 = 48;

/// Pages of file `f` in a tree made with `seed`: 1 to [`FILE_PAGES_MAX`].
pub fn file_pages(seed: u64, f: u64) -> u64 {
    1 + doc_word(seed ^ 0xF11E_5EED_0000_0000, f) % FILE_PAGES_MAX
}

/// Word `j` of version `v` of file `f` in a tree made with `seed`: incompressible, and
/// different for every file and version.
pub fn content_word(seed: u64, f: u64, v: u64, j: u64) -> u64 {
    let key = seed
        .wrapping_add((f + 1).wrapping_mul(0xA24B_AED4_963E_E407))
        .wrapping_add(v.wrapping_mul(0x9FB2_1C65_1E98_DF25));
    doc_word(key, j)
}

/// Where the file server keeps what, in pages.
///
/// Disk: the files from page 0, contiguous, then the log (the last `log` pages, a circle).
/// Heap: the file table (`table` pages, 16 bytes per file), the response page, the log
/// buffer, the cache tags (`tags` pages, 16 bytes per slot), then `slots` cache slots of
/// 16 pages each (direct mapped: file `f` lives in slot `f % slots`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Files in the tree.
    pub files: u64,
    /// Disk pages the files take, from page 0.
    pub file_pages: u64,
    /// Log pages at the disk's end.
    pub log: u64,
    /// First disk page of the log.
    pub log_first: u64,
    /// Heap pages of the file table.
    pub table: u64,
    /// Heap pages of the cache tags.
    pub tags: u64,
    /// Cache slots.
    pub slots: u64,
}

impl Layout {
    /// The layout for `seed`, a heap of `heap_size` bytes and a disk of `disk_size` bytes.
    /// `None` when no file fits or no cache slot does.
    pub fn new(seed: u64, heap_size: u64, disk_size: u64) -> Option<Self> {
        let p = heap_size / disk::PAGE;
        let d = disk_size / disk::PAGE;
        let log = (d / 8).max(1);
        let room = d.checked_sub(log)?;
        let (mut files, mut used) = (0, 0);
        while files < MAX_FILES {
            let s = file_pages(seed, files);
            if used + s > room {
                break;
            }
            used += s;
            files += 1;
        }
        let table = (files * ENTRY_BYTES).div_ceil(disk::PAGE);
        let avail = p.checked_sub(table + 2)?;
        let slots = avail.saturating_sub(1 + avail / 4096) / FILE_PAGES_MAX;
        let tags = (slots * 16).div_ceil(disk::PAGE);
        (files >= 1 && slots >= 1).then_some(Self {
            files,
            file_pages: used,
            log,
            log_first: d - log,
            table,
            tags,
            slots,
        })
    }

    /// The layout of a guest's params (`None`: not `files`-capable).
    pub fn of(p: &GuestParams) -> Option<Self> {
        Self::new(p.seed, p.heap_size, p.disk_size)
    }

    /// Heap page of the response.
    pub fn response(&self) -> u64 {
        self.table
    }

    /// Heap page of the log buffer.
    pub fn log_buffer(&self) -> u64 {
        self.table + 1
    }

    /// First heap page of the cache tags.
    pub fn tags_first(&self) -> u64 {
        self.table + 2
    }

    /// First heap page of cache slot `s`.
    pub fn slot_first(&self, s: u64) -> u64 {
        self.tags_first() + self.tags + s * FILE_PAGES_MAX
    }
}

/// The file table a VMM writes into a new `files` guest before its first run (every
/// file at version 0): its guest-physical address and bytes. `None` for other workloads or
/// a guest whose heap and disk cannot hold the tree and a cache slot.
pub fn file_table(p: &GuestParams) -> Option<(u64, Vec<u8>)> {
    if p.workload != crate::guest_abi::Workload::Files {
        return None;
    }
    let l = Layout::of(p)?;
    let mut bytes = Vec::with_capacity((l.files * ENTRY_BYTES) as usize);
    let mut start = 0;
    for f in 0..l.files {
        let pages = file_pages(p.seed, f);
        bytes.extend_from_slice(&(start | pages << START_BITS).to_le_bytes());
        bytes.extend_from_slice(&0u64.to_le_bytes());
        start += pages;
    }
    Some((p.heap_gpa, bytes))
}

/// Split a file table entry's first word into (first disk page, pages).
pub fn entry(word: u64) -> (u64, u64) {
    (word & ((1 << START_BITS) - 1), word >> START_BITS)
}

/// The bytes of version `v` of file `f` (`pages` pages).
pub fn file_bytes(seed: u64, f: u64, v: u64, pages: u64) -> Vec<u8> {
    (0..pages * disk::PAGE / 8)
        .flat_map(|j| content_word(seed, f, v, j).to_le_bytes())
        .collect()
}

/// The document tree a host writes onto a new disk for a `files` guest: every file at
/// version 0 from disk page 0, handed to `write(offset, bytes)` file by file (the log
/// area is left as it is). `None` if the layout does not fit.
pub fn format_disk<E>(
    seed: u64,
    heap_size: u64,
    disk_size: u64,
    mut write: impl FnMut(u64, &[u8]) -> Result<(), E>,
) -> Option<Result<Layout, E>> {
    let l = Layout::new(seed, heap_size, disk_size)?;
    let mut start = 0;
    for f in 0..l.files {
        let pages = file_pages(seed, f);
        if let Err(e) = write(start * disk::PAGE, &file_bytes(seed, f, 0, pages)) {
            return Some(Err(e));
        }
        start += pages;
    }
    Some(Ok(l))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest_abi::{HEAP_GPA, Workload};

    #[test]
    fn layout_fills_the_disk_with_files_and_the_heap_with_slots() {
        let l = Layout::new(9, 256 * 4096, 512 * 4096).unwrap();
        assert_eq!(l.log, 64);
        assert_eq!(l.log_first, 448);
        assert!(l.file_pages <= 448 && l.file_pages + FILE_PAGES_MAX > 448);
        assert!(l.files >= 448 / 16 && l.files <= 448);
        assert_eq!(l.table, (l.files * 16).div_ceil(4096));
        assert!(l.slot_first(l.slots) <= 256, "the cache fits the heap");
        assert!(l.slot_first(l.slots + 1) > 256, "and takes what is left");
        assert_eq!(Layout::new(9, 256 * 4096, 4096), None, "no file fits");
        assert_eq!(Layout::new(9, 8 * 4096, 512 * 4096), None, "no cache slot");
    }

    #[test]
    fn the_table_and_the_tree_agree() {
        let p = GuestParams {
            workload: Workload::Files,
            seed: 5,
            heap_gpa: HEAP_GPA,
            heap_size: 128 * 4096,
            rate: 0,
            tsc_khz: 0,
            output_every: 0,
            doorbell_every: 0,
            disk_size: 128 * 4096,
        };
        let (gpa, table) = file_table(&p).unwrap();
        assert_eq!(gpa, HEAP_GPA);
        let mut disk = vec![0u8; 128 * 4096];
        let l = format_disk(5, p.heap_size, p.disk_size, |at, b: &[u8]| {
            disk[at as usize..at as usize + b.len()].copy_from_slice(b);
            Ok::<(), ()>(())
        })
        .unwrap()
        .unwrap();
        assert_eq!(table.len() as u64, l.files * 16);
        let last = l.files - 1;
        let w = u64::from_le_bytes(table[(last * 16) as usize..][..8].try_into().unwrap());
        let (start, pages) = entry(w);
        assert_eq!(start + pages, l.file_pages);
        let at = (start * 4096) as usize;
        assert_eq!(
            &disk[at..at + 8],
            &content_word(5, last, 0, 0).to_le_bytes()
        );
        assert_ne!(content_word(5, last, 0, 0), content_word(5, last, 1, 0));
        assert!(
            disk[(l.file_pages * 4096) as usize..]
                .iter()
                .all(|&b| b == 0)
        );
        let other = GuestParams {
            workload: Workload::Db,
            ..p
        };
        assert_eq!(file_table(&other), None);
    }
}
