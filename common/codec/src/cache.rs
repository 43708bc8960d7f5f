//! What the primary remembers of the pages it has sent (part of the *encode* stage).
//!
//! The delta encoder needs the backup's copy of a page to XOR against. [`PageCache`] keeps
//! the last-sent content of pages either in a bounded LRU keyed by page index (QEMU's
//! XBZRLE cache; capacity in bytes, default 64 MiB) or as a full shadow of guest memory.
//! Hits and misses are counted.
//!
//! The LRU's pages live in one slab, faulted in when the cache is made: a cache filled
//! page by page during checkpoints would pay an allocation and a first-touch page fault
//! (~3 µs on a nested host) for every page it takes in, in the encoder's time.

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
    /// Page → slot of `slab`, in LRU order; slots handed out so far.
    Lru {
        order: lru::LruCache<u64, usize>,
        slab: Vec<u8>,
        used: usize,
    },
    Shadow {
        mem: Vec<u8>,
        present: crate::bitmap::PageBitmap,
    },
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Store::Lru { order, .. } => write!(f, "Lru({}/{} pages)", order.len(), order.cap()),
            Store::Shadow { present, .. } => write!(f, "Shadow({} pages)", present.len()),
        }
    }
}

impl PageCache {
    /// An LRU cache holding at most `bytes / 4096` pages, its memory taken (and faulted
    /// in) now.
    pub fn lru(bytes: usize) -> Result<Self, CacheError> {
        let pages = NonZeroUsize::new(bytes / PAGE_SIZE).ok_or(CacheError::TooSmall(bytes))?;
        let mut slab = vec![0u8; pages.get() * PAGE_SIZE];
        crate::prefault(&mut slab, 1);
        Ok(Self {
            store: Store::Lru {
                order: lru::LruCache::new(pages),
                slab,
                used: 0,
            },
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
            Store::Lru { order, slab, .. } => order.get(&page).map(|&i| slot(slab, i)),
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
            Store::Lru { order, slab, .. } => order.peek(&page).map(|&i| slot(slab, i)),
            Store::Shadow { mem, present } => shadow_page(mem, present, page),
        }
    }

    /// Remember `content` as the last-sent content of `page`.
    pub fn insert(&mut self, page: u64, content: &Page) {
        match &mut self.store {
            Store::Lru { order, slab, used } => {
                let i = if let Some(&i) = order.get(&page) {
                    i
                } else if *used < order.cap().get() {
                    *used += 1;
                    order.put(page, *used - 1);
                    *used - 1
                } else {
                    // Reuse the evicted page's slot.
                    let Some((_, i)) = order.pop_lru() else {
                        return;
                    };
                    order.put(page, i);
                    self.stats.evictions += 1;
                    i
                };
                if let Some(dst) = slab.as_chunks_mut::<PAGE_SIZE>().0.get_mut(i) {
                    dst.copy_from_slice(content);
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
            Store::Lru { order, .. } => order.len(),
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

/// Slot `i` of the slab (a slot index the LRU handed out, so always inside it).
fn slot(slab: &[u8], i: usize) -> &Page {
    &slab.as_chunks::<PAGE_SIZE>().0[i]
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
        // Evicted slots are reused: the survivors keep their content.
        c.insert(4, &p(4)); // evicts 1
        assert_eq!(c.peek(3).map(|x| x[0]), Some(9));
        assert_eq!(c.peek(4).map(|x| x[0]), Some(4));
        assert!(c.peek(1).is_none());
        let s = c.stats();
        assert_eq!((s.hits, s.misses, s.evictions), (2, 1, 2));
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
