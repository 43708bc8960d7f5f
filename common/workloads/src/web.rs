//! The `web` workload's reference semantics (docs/GUESTS.md): its heap layout, the
//! document root the VMM writes at creation, and one request's writes. The simulated guest
//! runs this code; the KVM guest's generated program is checked against it.

use crate::guest_abi::{GuestParams, Workload};

/// Most pages of the document root.
pub const DOC_PAGES_MAX: u64 = 16;

/// The `web` heap, in pages from the heap's start: sessions, log, response buffers, then
/// the document root (the files responses are copied from).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Session pages (Zipf-hot): `[0, hot)`.
    pub hot: u64,
    /// Log pages: `[hot, hot + log)`.
    pub log: u64,
    /// Response buffer pages: `[hot + log, hot + log + buf)`.
    pub buf: u64,
    /// Document root pages, the heap's last: `[hot + log + buf, pages)`.
    pub doc: u64,
}

impl Layout {
    /// The layout of a heap of `pages` pages (at least 16).
    pub fn new(pages: u64) -> Self {
        let hot = pages * 3 / 4;
        let log = pages / 8;
        let rest = pages - hot - log;
        let doc = (rest / 2).min(DOC_PAGES_MAX);
        Self {
            hot,
            log,
            buf: rest - doc,
            doc,
        }
    }

    /// First page of the document root.
    pub fn doc_first(&self) -> u64 {
        self.hot + self.log + self.buf
    }
}

/// Word `j` of the document root of a guest created with `seed`: a splitmix64 finaliser
/// of `seed` and `j` (file content: incompressible, and the same wherever it is copied).
pub fn doc_word(seed: u64, j: u64) -> u64 {
    let mut z = (seed ^ 0x5851_F42D_4C95_7F2D).wrapping_add(j.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The document root a VMM writes into a new `web` guest before its first run: its
/// guest-physical address and bytes. `None` for the other workloads (or a heap too small
/// for `web`).
pub fn docroot(p: &GuestParams) -> Option<(u64, Vec<u8>)> {
    let pages = p.heap_size / 4096;
    if p.workload != Workload::Web || pages < 16 {
        return None;
    }
    let l = Layout::new(pages);
    let words = l.doc * 512;
    let bytes = (0..words)
        .flat_map(|j| doc_word(p.seed, j).to_le_bytes())
        .collect();
    Some((p.heap_gpa + 4096 * l.doc_first(), bytes))
}

/// What a request needs of the guest it runs in.
pub trait Guest {
    /// The workload PRNG's next value (`next()` of docs/GUESTS.md).
    fn next(&mut self) -> u64;
    /// Read the heap word at byte offset `off` from the heap's start.
    fn read(&self, off: u64) -> u64;
    /// `write()` of docs/GUESTS.md: store `v` at heap byte offset `off` and add it to the
    /// checksum.
    fn write(&mut self, off: u64, v: u64);
}

/// One `web` request, number `n`, in a heap of `pages` pages (docs/GUESTS.md, "A work
/// unit"): a session record, a log append and, on odd requests, a response whose first
/// block is fresh (headers) and whose other blocks are copied from the document root.
pub fn request(g: &mut dyn Guest, n: u64, pages: u64) {
    let l = Layout::new(pages);
    // 1. The session record: k words at a Zipf-hot page.
    let x = g.next() >> 43;
    let y = (((x * x) >> 21) * x) >> 21;
    let page = (y * l.hot) >> 21;
    let t = g.next() >> 58;
    for _ in 0..1 + ((t * t * t) >> 14) {
        let word = g.next() % 512;
        let v = g.next();
        g.write(4096 * page + 8 * word, v);
    }
    // 2. The log append.
    let a = 4096 * l.hot + n.wrapping_mul(64) % (4096 * l.log);
    for k in 0..8 {
        let v = g.next();
        g.write(a + 8 * k, v);
    }
    // 3. The response, on odd requests.
    if n % 2 == 1 {
        let dst = 4096 * (l.hot + l.log + g.next() % l.buf);
        let body = g.next() % 64;
        for k in 0..8 {
            let v = g.next();
            g.write(dst + 8 * k, v);
        }
        let src = 4096 * l.doc_first() + 64 * (g.next() % (64 * l.doc - 63));
        for i in 0..8 * body {
            let v = g.read(src + 8 * i);
            g.write(dst + 64 + 8 * i, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Vec64 {
        heap: Vec<u64>,
        rng: u64,
        writes: Vec<u64>,
    }

    impl Guest for Vec64 {
        fn next(&mut self) -> u64 {
            self.rng = self.rng.wrapping_add(1);
            self.rng.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        }
        fn read(&self, off: u64) -> u64 {
            self.heap[(off / 8) as usize]
        }
        fn write(&mut self, off: u64, v: u64) {
            self.writes.push(off);
            self.heap[(off / 8) as usize] = v;
        }
    }

    #[test]
    fn layouts_cover_the_heap() {
        for pages in [16, 17, 31, 100, 4096, 65_000] {
            let l = Layout::new(pages);
            assert_eq!(l.hot + l.log + l.buf + l.doc, pages, "{pages}");
            assert!(l.buf >= 1 && l.doc >= 1, "{pages}: {l:?}");
            assert!(l.doc <= DOC_PAGES_MAX);
        }
        assert_eq!(Layout::new(4096).doc, 16);
    }

    /// Responses copy whole 64-byte blocks of the document root into whole blocks of a
    /// buffer page, and never write outside the buffer area; the docroot is never written.
    #[test]
    fn responses_copy_docroot_blocks() {
        let pages = 64;
        let l = Layout::new(pages);
        let p = GuestParams {
            workload: Workload::Web,
            seed: 9,
            heap_gpa: 0,
            heap_size: pages * 4096,
            rate: 0,
            tsc_khz: 0,
            output_every: 0,
            doorbell_every: 0,
            disk_size: 0,
        };
        let (at, bytes) = docroot(&p).expect("web has a docroot");
        assert_eq!(at, 4096 * l.doc_first());
        let mut g = Vec64 {
            heap: vec![0; (pages * 512) as usize],
            rng: 1,
            writes: Vec::new(),
        };
        for (i, w) in bytes.chunks(8).enumerate() {
            g.heap[(at / 8) as usize + i] = u64::from_le_bytes(w.try_into().unwrap_or_default());
        }
        let doc: Vec<[u64; 8]> = g.heap[(at / 8) as usize..]
            .chunks(8)
            .map(|c| c.try_into().unwrap_or_default())
            .collect();
        let mut copied = 0;
        for n in 0..400 {
            g.writes.clear();
            request(&mut g, n, pages);
            assert!(g.writes.iter().all(|&o| o < at), "wrote into the docroot");
            if n % 2 == 1 {
                let dst = *g
                    .writes
                    .iter()
                    .rfind(|&&o| o >= 4096 * (l.hot + l.log))
                    .unwrap_or(&0);
                let page = (dst / 4096) as usize * 512;
                for b in 1..64 {
                    let blk: [u64; 8] = g.heap[page + 8 * b..][..8].try_into().unwrap_or_default();
                    if doc.contains(&blk) {
                        copied += 1;
                    }
                }
            }
        }
        assert!(
            copied > 1000,
            "response bodies come from the docroot: {copied}"
        );
    }
}
