//! Copy-on-write checkpoints: a capability a backend hands out or not.
//!
//! Copying every dirty page while the guest is paused makes the pause grow with the dirty
//! set. A domain with [`CowMemory`] can instead, while paused, write-protect the harvested
//! dirty pages and hand back a [`PendingCopy`]; the guest resumes at once. The pending copy
//! is then completed behind the running guest ([`PendingCopy::complete`], off the engine
//! thread), and a page the guest writes before the copy reaches it is copied in the
//! backend's fault path before the write lands, then unprotected. Either way every page
//! comes out exactly as it was at the pause that armed the copy.

use crate::domain::DomainError;
use ha_codec::bitmap::PageBitmap;

/// Guest memory that can be checkpointed copy-on-write.
pub trait CowMemory {
    /// Write-protect the pages set in `pages` (one bit per page, `pages.len()` = memory
    /// pages) and return their pending copy. Needs the guest paused; the pages' content at
    /// this instant is what the copy yields. A copy armed earlier and not yet completed is
    /// completed first (inside the pause).
    fn arm(&mut self, pages: &PageBitmap) -> Result<Box<dyn PendingCopy>, DomainError>;

    /// Write-protect `pages` ahead of a checkpoint, with the guest still running, so that
    /// the [`CowMemory::arm`] in the pause has only the pages written since to protect. A
    /// page the guest writes after this loses its protection again (it is then dirty, so
    /// the next harvest has it). The next `arm`'s pages must include these. Only a saving:
    /// `arm` alone is correct, and the default does nothing.
    fn prearm(&mut self, pages: &PageBitmap) -> Result<(), DomainError> {
        let _ = pages;
        Ok(())
    }

    /// What one write fault on a protected page costs the writer, as measured by the
    /// backend (`None`: not measured; the caller falls back to its own estimate).
    fn fault_cost(&self) -> Option<std::time::Duration> {
        None
    }
}

/// The content of write-protected pages as of the pause that armed them, being copied out
/// while the guest runs. Dropped without [`PendingCopy::complete`], the pages are
/// unprotected and nothing is copied.
pub trait PendingCopy: Send + std::fmt::Debug {
    /// Number of pages in the copy.
    fn pages(&self) -> usize;

    /// Copy every page not copied yet (unprotecting them as it goes) and return them all,
    /// in increasing page order. Blocks while the fault path holds a page.
    fn complete(self: Box<Self>) -> Result<CopiedPages, DomainError>;
}

/// A completed copy: pages and their content at the instant the copy was armed.
#[derive(Debug, Default)]
pub struct CopiedPages {
    /// Page indices, increasing.
    pub index: Vec<u64>,
    /// Their content, back to back (one page each).
    pub data: Vec<u8>,
    /// How many of them the guest wrote first, so they were copied in the fault path.
    pub faulted: usize,
}
