//! Guest memory of a simulated domain: atomic 64-bit words plus a software dirty bitmap.
//!
//! The workload thread writes while the epoch engine reads, so memory is a slice of
//! `AtomicU64` (no `unsafe`). Every write goes through [`GuestMemory::store`] or a
//! [`PageWriter`], which set the page's bit in the dirty bitmap *after* storing the data
//! (release), and [`GuestMemory::harvest`] swaps each bitmap word to zero (acquire) before
//! the caller copies the pages: a write the copy may have missed always leaves its bit set
//! for the next harvest.

use std::sync::atomic::{AtomicU64, Ordering};

use ha_codec::PAGE_SIZE;
use ha_codec::bitmap::PageBitmap;
use ha_guest::domain::DomainError;

/// Words of 8 bytes in one page.
const WORDS_PER_PAGE: usize = PAGE_SIZE / 8;

/// Guest memory and its dirty bitmap.
#[derive(Debug)]
pub(crate) struct GuestMemory {
    words: Box<[AtomicU64]>,
    dirty: Box<[AtomicU64]>,
    pages: usize,
}

impl GuestMemory {
    /// All-zero memory of `size` bytes (a positive multiple of the page size), nothing dirty.
    ///
    /// The memory comes zeroed from the allocator (`calloc`, lazily mapped pages), so a
    /// large guest costs nothing until it is touched.
    pub(crate) fn zeroed(size: u64) -> Self {
        const _: () = assert!(std::mem::align_of::<u64>() == std::mem::align_of::<AtomicU64>());
        let raw = Box::into_raw(vec![0u64; size as usize / 8].into_boxed_slice());
        // SAFETY: `AtomicU64` has the same size and bit validity as `u64` (documented) and,
        // as asserted above, the same alignment, so the allocation made for `[u64]` is a
        // valid `[AtomicU64]` of the same length with the same layout for deallocation;
        // ownership moves from the `Box<[u64]>` (consumed by `into_raw`) to the new box.
        let words = unsafe { Box::from_raw(raw as *mut [AtomicU64]) };
        Self::from_words(words)
    }

    /// Memory holding a copy of `image` (length a positive multiple of the page size),
    /// nothing dirty. Zero words are not stored, so zero pages stay unmapped.
    pub(crate) fn from_image(image: &[u8]) -> Self {
        let mem = Self::zeroed(image.len() as u64);
        for (w, c) in mem.words.iter().zip(image.chunks_exact(8)) {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            let v = u64::from_le_bytes(b);
            if v != 0 {
                w.store(v, Ordering::Relaxed);
            }
        }
        mem
    }

    fn from_words(words: Box<[AtomicU64]>) -> Self {
        let pages = words.len() / WORDS_PER_PAGE;
        let dirty = (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        Self {
            words,
            dirty,
            pages,
        }
    }

    /// Size in bytes.
    pub(crate) fn size(&self) -> u64 {
        (self.words.len() * 8) as u64
    }

    /// Number of pages.
    pub(crate) fn pages(&self) -> usize {
        self.pages
    }

    /// Load the aligned word at `gpa` (caller guarantees it is inside memory).
    pub(crate) fn load(&self, gpa: u64) -> u64 {
        self.words[(gpa / 8) as usize].load(Ordering::Relaxed)
    }

    /// Load the aligned word at `gpa` with acquire ordering (pairs with
    /// [`GuestMemory::store_release`]).
    pub(crate) fn load_acquire(&self, gpa: u64) -> u64 {
        self.words[(gpa / 8) as usize].load(Ordering::Acquire)
    }

    /// Store `v` at the aligned `gpa` and mark its page dirty.
    pub(crate) fn store(&self, gpa: u64, v: u64) {
        let i = (gpa / 8) as usize;
        self.words[i].store(v, Ordering::Relaxed);
        self.mark(i / WORDS_PER_PAGE);
    }

    /// Store `v` at the aligned `gpa` with release ordering (everything stored before is
    /// visible to whoever acquires this word) and mark its page dirty.
    pub(crate) fn store_release(&self, gpa: u64, v: u64) {
        let i = (gpa / 8) as usize;
        self.words[i].store(v, Ordering::Release);
        self.mark(i / WORDS_PER_PAGE);
    }

    /// Copy `bytes` (a multiple of 8 long) to the aligned `gpa`, marking the pages dirty.
    pub(crate) fn write_bytes(&self, gpa: u64, bytes: &[u8]) {
        for (k, c) in bytes.chunks_exact(8).enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            self.store(gpa + 8 * k as u64, u64::from_le_bytes(b));
        }
    }

    /// Set the dirty bit of `page`, after the data stores it covers (release).
    fn mark(&self, page: usize) {
        self.dirty[page / 64].fetch_or(1 << (page % 64), Ordering::Release);
    }

    /// Copy `buf.len()` bytes at any `gpa` into `buf`.
    pub(crate) fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), DomainError> {
        let len = buf.len() as u64;
        match gpa.checked_add(len) {
            Some(end) if end <= self.size() => {}
            _ => return Err(DomainError::OutOfRange { gpa, len }),
        }
        let mut done = 0usize;
        while done < buf.len() {
            let at = gpa + done as u64;
            let word = self.words[(at / 8) as usize]
                .load(Ordering::Relaxed)
                .to_le_bytes();
            let skip = (at % 8) as usize;
            let n = (8 - skip).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&word[skip..skip + n]);
            done += n;
        }
        Ok(())
    }

    /// OR the dirty bitmap into `out` (which covers [`GuestMemory::pages`] pages) and clear
    /// it, one atomic swap per word.
    pub(crate) fn harvest(&self, out: &mut PageBitmap) {
        let words: Vec<u64> = self
            .dirty
            .iter()
            .map(|w| w.swap(0, Ordering::AcqRel))
            .collect();
        out.or_words(0, &words);
    }
}

/// Batches dirty marks for a run of stores to the same page: the data stores happen at
/// once, the page's bit is set when the writer moves to another page or is flushed
/// (always before the vCPU reaches a unit boundary, where it can be paused).
#[derive(Debug)]
pub(crate) struct PageWriter<'a> {
    mem: &'a GuestMemory,
    pending: Option<usize>,
}

impl<'a> PageWriter<'a> {
    /// A writer with nothing pending.
    pub(crate) fn new(mem: &'a GuestMemory) -> Self {
        Self { mem, pending: None }
    }

    /// Store `v` at the aligned `gpa` (inside memory).
    pub(crate) fn store(&mut self, gpa: u64, v: u64) {
        let i = (gpa / 8) as usize;
        self.mem.words[i].store(v, Ordering::Relaxed);
        let page = i / WORDS_PER_PAGE;
        if self.pending != Some(page) {
            self.flush();
            self.pending = Some(page);
        }
    }

    /// Set the dirty bit of the page written last.
    pub(crate) fn flush(&mut self) {
        if let Some(page) = self.pending.take() {
            self.mem.mark(page);
        }
    }
}

impl Drop for PageWriter<'_> {
    fn drop(&mut self) {
        self.flush();
    }
}
