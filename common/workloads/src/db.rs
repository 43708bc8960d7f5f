//! The `db` workload's reference semantics (docs/GUESTS.md, "`db`"): a write-ahead-logged
//! key-value store on the guest's disk. Its layout in the heap and on the disk, the record
//! format with its check word, and the checks of a disk page read back. The model runs the
//! unit ([`crate::model`]); the drill and the end-to-end tests use [`check_acknowledged`]
//! to check, after a failover, that every update the world saw acknowledged is on the
//! backup's disk as the model wrote it.

use crate::guest_abi::{GuestParams, checksum_step, disk};

/// Records per 4 KiB page (64 bytes each).
pub const RECORDS_PER_PAGE: u64 = 64;
/// Words per record.
pub const RECORD_WORDS: u64 = 8;
/// Every this many updates a table page is written back in place.
pub const WRITEBACK_EVERY: u64 = 16;
/// Every this many updates a table page is read back from the disk and checked.
pub const READBACK_EVERY: u64 = 32;

/// Where the store keeps what, in pages: the table (in the heap's first pages, and the
/// disk's first pages), the log buffer and read buffer (the two heap pages after the
/// table), and the log (the rest of the disk, a circle of pages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Table pages `T`: heap pages `[0, T)`, disk pages `[0, T)`.
    pub table: u64,
    /// Log pages `L` on the disk: `[T, T + L)`.
    pub log: u64,
}

impl Layout {
    /// The layout for a heap of `heap_size` bytes and a disk of `disk_size` bytes:
    /// `T = min(P - 2, D / 2)` with `P` heap pages and `D` disk pages, `L = D - T`.
    /// `None` when either is too small (`T` or `L` would be 0).
    pub fn new(heap_size: u64, disk_size: u64) -> Option<Self> {
        let p = heap_size / disk::PAGE;
        let d = disk_size / disk::PAGE;
        let table = p.checked_sub(2)?.min(d / 2);
        let log = d - table;
        (table >= 1 && log >= 1).then_some(Self { table, log })
    }

    /// The layout of a guest's params (`None`: not `db`-capable).
    pub fn of(p: &GuestParams) -> Option<Self> {
        Self::new(p.heap_size, p.disk_size)
    }

    /// Records in the table.
    pub fn records(&self) -> u64 {
        self.table * RECORDS_PER_PAGE
    }

    /// Heap page of the log buffer.
    pub fn log_buffer(&self) -> u64 {
        self.table
    }

    /// Heap page of the read buffer.
    pub fn read_buffer(&self) -> u64 {
        self.table + 1
    }

    /// Disk page that holds the log record of update `seq` (1, 2, …).
    pub fn log_page(&self, seq: u64) -> u64 {
        self.table + ((seq - 1) / RECORDS_PER_PAGE) % self.log
    }
}

/// The updates whose log records a disk holds once updates `1..=committed` are flushed:
/// the last `L` log pages' worth, the older ones overwritten as the log wraps.
pub fn log_window(l: &Layout, committed: u64) -> std::ops::Range<u64> {
    if committed == 0 {
        return 1..1;
    }
    let last_page = (committed - 1) / RECORDS_PER_PAGE;
    let first_page = last_page.saturating_sub(l.log - 1);
    first_page * RECORDS_PER_PAGE + 1..committed + 1
}

/// The check word of a record: `checksum_step` folded over its first seven words from 0.
pub fn check_word(words: &[u64]) -> u64 {
    words
        .iter()
        .take(7)
        .fold(0, |sum, &w| checksum_step(sum, w))
}

/// Whether a table page read back from the disk (as 512 words) is sound: every record is
/// either all zero (never written back) or carries its own key (`64 page + j`) and a
/// matching check word.
pub fn table_page_ok(page: u64, words: &[u64]) -> bool {
    words
        .chunks_exact(RECORD_WORDS as usize)
        .zip(0..)
        .all(|(r, j)| {
            if r[0] == 0 {
                r.iter().all(|&w| w == 0)
            } else {
                r[1] == page * RECORDS_PER_PAGE + j && r[7] == check_word(r)
            }
        })
}

/// The log record of update `seq` as a disk holds it (8 words), read from `disk_bytes`;
/// `None` if the disk is too short for the layout.
pub fn log_record(l: &Layout, disk_bytes: &[u8], seq: u64) -> Option<[u64; 8]> {
    let at = l.log_page(seq) * disk::PAGE + ((seq - 1) % RECORDS_PER_PAGE) * 64;
    let bytes = disk_bytes.get(usize::try_from(at).ok()?..)?.get(..64)?;
    let mut r = [0u64; 8];
    for (w, c) in r.iter_mut().zip(bytes.chunks_exact(8)) {
        let mut b = [0u8; 8];
        b.copy_from_slice(c);
        *w = u64::from_le_bytes(b);
    }
    Some(r)
}

/// Why an update the world saw acknowledged is not on a disk as the model wrote it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    /// The update's log record is missing, torn, another update's, or not the model's.
    #[error(
        "acknowledged update {seq} (of 1..={acked}) is not on the disk as written: \
         found {found:?}, the model wrote {want:?}"
    )]
    Missing {
        /// The update's sequence number.
        seq: u64,
        /// The last update the world saw acknowledged.
        acked: u64,
        /// Its record as the disk holds it (`None`: the disk is too short).
        found: Option<Box<[u64; 8]>>,
        /// Its record as the model's disk holds it.
        want: Option<Box<[u64; 8]>>,
    },
}

/// The last update a built-in guest's output record acknowledges: the progress word, the
/// first of its payload (`None` for a payload too short to hold one). With
/// `output_every = F` a `db` guest emits it after flushing the log up to that update, so
/// updates `1..=progress` are durable once the world has seen it.
pub fn acknowledged(payload: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(payload.get(..8)?.try_into().ok()?))
}

/// Check that every update `1..=acked` that a disk's log can still hold
/// ([`log_window`]) reads back from `disk` as `model` (the reference model's disk after
/// the same updates) holds it: its own sequence number, a matching check word and the
/// model's words. Later writes to the disk (a guest that went on) leave these records
/// alone as long as the log has not wrapped over them. The updates checked (empty when
/// nothing was acknowledged).
pub fn check_acknowledged(
    l: &Layout,
    disk: &[u8],
    model: &[u8],
    acked: u64,
) -> Result<std::ops::Range<u64>, AckError> {
    let window = log_window(l, acked);
    for seq in window.clone() {
        let found = log_record(l, disk, seq);
        let want = log_record(l, model, seq);
        let sound = found.is_some_and(|r| r[0] == seq && r[7] == check_word(&r));
        if !sound || found != want {
            return Err(AckError::Missing {
                seq,
                acked,
                found: found.map(Box::new),
                want: want.map(Box::new),
            });
        }
    }
    Ok(window)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_splits_heap_and_disk() {
        let l = Layout::new(64 * 4096, 16 * 4096).unwrap();
        assert_eq!((l.table, l.log), (8, 8));
        assert_eq!(l.records(), 512);
        assert_eq!((l.log_buffer(), l.read_buffer()), (8, 9));
        assert_eq!(l.log_page(1), 8);
        assert_eq!(l.log_page(64), 8);
        assert_eq!(l.log_page(65), 9);
        assert_eq!(l.log_page(64 * 8 + 1), 8, "the log wraps");
        assert!(log_window(&l, 0).is_empty());
        assert_eq!(log_window(&l, 100), 1..101);
        assert_eq!(log_window(&l, 64 * 8), 1..513);
        assert_eq!(
            log_window(&l, 64 * 8 + 1),
            65..514,
            "the first page overwritten"
        );
        let small_heap = Layout::new(10 * 4096, 1 << 30).unwrap();
        assert_eq!(small_heap.table, 8);
        assert_eq!(Layout::new(2 * 4096, 1 << 20), None, "no table page");
        assert_eq!(Layout::new(1 << 20, 4096), None, "no log page");
    }

    /// Every acknowledged update is checked against the model's record: a record lost,
    /// torn, or whole but with other values is named; one past the acknowledgement is not
    /// looked at.
    #[test]
    fn acknowledged_updates_read_back_as_the_model_wrote_them() {
        use crate::guest_abi::{HEAP_GPA, Workload};
        use crate::model::ImageModel;
        let params = GuestParams {
            workload: Workload::Db,
            seed: 3,
            heap_gpa: HEAP_GPA,
            heap_size: 64 * 4096,
            rate: 0,
            tsc_khz: 0,
            output_every: 32,
            doorbell_every: 8,
            disk_size: 64 * 4096,
        };
        let l = Layout::of(&params).unwrap();
        let mut m = ImageModel::fresh(2 << 20, &params);
        m.run_to(320);
        let model = m.disk.clone();
        assert_eq!(check_acknowledged(&l, &model, &model, 320), Ok(1..321));
        assert_eq!(check_acknowledged(&l, &model, &model, 0), Ok(1..1));
        let payload = [320u64.to_le_bytes(), 99u64.to_le_bytes()].concat();
        assert_eq!(acknowledged(&payload), Some(320));
        assert_eq!(acknowledged(&payload[..7]), None);
        // Run on: the disk goes on past the acknowledgement, the records stay.
        m.run_to(400);
        assert_eq!(check_acknowledged(&l, &m.disk, &model, 320), Ok(1..321));
        let at =
            |seq: u64| (l.log_page(seq) * disk::PAGE + (seq - 1) % RECORDS_PER_PAGE * 64) as usize;
        let missing = |e: Result<_, AckError>| match e {
            Err(AckError::Missing { seq, acked, .. }) => Some((seq, acked)),
            Ok(_) => None,
        };
        // A lost record (a zero page), a torn one, a sound one with other values.
        let mut lost = model.clone();
        lost[at(200)..at(200) + 64].fill(0);
        assert_eq!(
            missing(check_acknowledged(&l, &lost, &model, 320)),
            Some((200, 320))
        );
        assert_eq!(check_acknowledged(&l, &lost, &model, 199), Ok(1..200));
        let mut torn = model.clone();
        torn[at(7) + 16] ^= 1;
        assert_eq!(
            missing(check_acknowledged(&l, &torn, &model, 320)),
            Some((7, 320))
        );
        let mut other = model.clone();
        let mut r = log_record(&l, &model, 9).unwrap();
        r[2] ^= 1;
        r[7] = check_word(&r);
        for (k, w) in r.iter().enumerate() {
            other[at(9) + 8 * k..at(9) + 8 * k + 8].copy_from_slice(&w.to_le_bytes());
        }
        assert_eq!(
            missing(check_acknowledged(&l, &other, &model, 320)),
            Some((9, 320))
        );
        assert_eq!(
            missing(check_acknowledged(&l, &model[..4096], &model, 320)),
            Some((1, 320)),
            "a disk too short for the log"
        );
    }

    #[test]
    fn table_pages_are_checked_record_by_record() {
        let mut words = vec![0u64; 512];
        assert!(table_page_ok(3, &words), "a page never written back");
        let mut rec = [7u64, 3 * 64 + 5, 1, 2, 3, 4, 5, 0];
        rec[7] = check_word(&rec);
        words[5 * 8..6 * 8].copy_from_slice(&rec);
        assert!(table_page_ok(3, &words));
        assert!(
            !table_page_ok(4, &words),
            "a record under another page's key"
        );
        words[5 * 8 + 3] ^= 1;
        assert!(!table_page_ok(3, &words), "a torn record");
        words[5 * 8..6 * 8].fill(0);
        words[9 * 8 + 2] = 1;
        assert!(!table_page_ok(3, &words), "garbage in an empty record");
    }
}
