//! What the primary remembers of the pages it has sent (part of the *encode* stage).
//!
//! The delta encoder needs the backup's copy of a page to XOR against. [`PageCache`] keeps
//! the last-sent content of pages either in a bounded LRU keyed by page index (QEMU's
//! XBZRLE cache; capacity in bytes, default 64 MiB) or as a full shadow of guest memory.
//! Hits and misses are counted.

use crate::PAGE_SIZE;
use crate::block::Page;
use std::num::NonZeroUsize;

/// Default LRU capacity: 64 MiB.
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;

/// Errors of this module.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CacheError {
    /// An LRU smaller than one page.
    #[error("page cache of {0} bytes cannot hold a single 4096-byte page")]
    TooSmall(usize),
}

/// Hit and miss counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CacheStats {
    /// Lookups that found the page.
    pub hits: u64,
    /// Lookups that did not.
    pub misses: u64,
    /// Pages evicted to make room.
    pub evictions: u64,
}

impl CacheStats {
    /// Hits over lookups (0 when there were none).
    pub fn hit_rate(&self) -> f64 {
        let n = self.hits + self.misses;
        if n == 0 {
            0.0
        } else {
            self.hits as f64 / n as f64
        }
    }
}

/// Last-sent content of pages.
#[derive(Debug)]
pub struct PageCache {
    store: Store,
    stats: CacheStats,
}

enum Store {
    Lru(lru::LruCache<u64, Box<Page>>),
    Shadow {
        mem: Vec<u8>,
        present: crate::bitmap::PageBitmap,
    },
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Store::Lru(c) => write!(f, "Lru({}/{} pages)", c.len(), c.cap()),
            Store::Shadow { present, .. } => write!(f, "Shadow({} pages)", present.len()),
        }
    }
}

impl PageCache {
    /// An LRU cache holding at most `bytes / 4096` pages.
    pub fn lru(bytes: usize) -> Result<Self, CacheError> {
        let pages = NonZeroUsize::new(bytes / PAGE_SIZE).ok_or(CacheError::TooSmall(bytes))?;
        Ok(Self {
            store: Store::Lru(lru::LruCache::new(pages)),
            stats: CacheStats::default(),
        })
    }

    /// A full shadow of a guest with `pages` pages: never evicts.
    pub fn shadow(pages: usize) -> Self {
        Self {
            store: Store::Shadow {
                mem: vec![0u8; pages * PAGE_SIZE],
                present: crate::bitmap::PageBitmap::new(pages),
            },
            stats: CacheStats::default(),
        }
    }

    /// Look a page up, counting a hit or a miss (and refreshing its LRU position).
    pub fn get(&mut self, page: u64) -> Option<&Page> {
        let found = match &mut self.store {
            Store::Lru(c) => c.get(&page).map(|b| &**b),
            Store::Shadow { mem, present } => shadow_page(mem, present, page),
        };
        if found.is_some() {
            self.stats.hits += 1;
        } else {
            self.stats.misses += 1;
        }
        found
    }

    /// Look a page up without counting or refreshing it.
    pub fn peek(&self, page: u64) -> Option<&Page> {
        match &self.store {
            Store::Lru(c) => c.peek(&page).map(|b| &**b),
            Store::Shadow { mem, present } => shadow_page(mem, present, page),
        }
    }

    /// Remember `content` as the last-sent content of `page`.
    pub fn insert(&mut self, page: u64, content: &Page) {
        match &mut self.store {
            Store::Lru(c) => {
                if let Some(slot) = c.get_mut(&page) {
                    slot.copy_from_slice(content);
                } else if c.len() == c.cap().get() {
                    // Reuse the evicted page's allocation.
                    if let Some((_, mut old)) = c.pop_lru() {
                        old.copy_from_slice(content);
                        c.put(page, old);
                        self.stats.evictions += 1;
                    }
                } else {
                    c.put(page, Box::new(*content));
                }
            }
            Store::Shadow { mem, present } => {
                let Ok(i) = usize::try_from(page) else { return };
                if i < present.len() {
                    mem[i * PAGE_SIZE..(i + 1) * PAGE_SIZE].copy_from_slice(content);
                    present.set(i);
                }
            }
        }
    }

    /// Number of pages held.
    pub fn len(&self) -> usize {
        match &self.store {
            Store::Lru(c) => c.len(),
            Store::Shadow { present, .. } => present.count(),
        }
    }

    /// True when no page is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The counters so far.
    pub fn stats(&self) -> CacheStats {
        self.stats
    }
}

fn shadow_page<'a>(
    mem: &'a [u8],
    present: &crate::bitmap::PageBitmap,
    page: u64,
) -> Option<&'a Page> {
    let i = usize::try_from(page).ok()?;
    if !present.get(i) {
        return None;
    }
    mem.get(i * PAGE_SIZE..(i + 1) * PAGE_SIZE)?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(v: u8) -> Page {
        [v; PAGE_SIZE]
    }

    #[test]
    fn lru_evicts_least_recent_and_counts() {
        let mut c = PageCache::lru(2 * PAGE_SIZE).unwrap();
        c.insert(1, &p(1));
        c.insert(2, &p(2));
        assert_eq!(c.get(1).map(|x| x[0]), Some(1)); // 1 is now most recent
        c.insert(3, &p(3)); // evicts 2
        assert!(c.get(2).is_none());
        assert_eq!(c.get(3).map(|x| x[0]), Some(3));
        c.insert(3, &p(9));
        assert_eq!(c.peek(3).map(|x| x[0]), Some(9));
        let s = c.stats();
        assert_eq!((s.hits, s.misses, s.evictions), (2, 1, 1));
        assert_eq!(c.len(), 2);
        assert!((s.hit_rate() - 2.0 / 3.0).abs() < 1e-9);
    }

    #[test]
    fn shadow_holds_everything_in_range() {
        let mut c = PageCache::shadow(4);
        assert!(c.get(0).is_none());
        c.insert(3, &p(3));
        c.insert(4, &p(4)); // out of range: ignored
        assert_eq!(c.get(3).map(|x| x[0]), Some(3));
        assert!(c.peek(4).is_none());
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn too_small_is_refused() {
        assert_eq!(PageCache::lru(100).err(), Some(CacheError::TooSmall(100)));
    }
}
