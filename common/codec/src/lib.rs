//! `ha-codec`: the FGBI codec, what makes each checkpoint cheap.
//!
//! Pure computation over page bytes: no I/O, no threads, no knowledge of the wire. Both
//! daemons use it — the primary to identify, share and encode what changed, the backup to
//! decode it against what it holds. It is the one crate built with the hot-loop profile
//! (see the workspace `Cargo.toml`), and it depends on no other Castor crate.
//!
//! | module | stage |
//! |---|---|
//! | [`bitmap`] | page bitmaps for dirty tracking (harvest) |
//! | [`block`] | block geometry and changed-block identification (identify) |
//! | [`hashes`] | per-block fingerprints of what the backup holds (identify) |
//! | [`share`] | identical-block sharing through a hash index (share) |
//! | [`cache`] | LRU cache of last-sent page content (encode) |
//! | [`xbzrle`] | XOR + run-length delta in QEMU's XBZRLE format (encode) |
//! | [`varint`] | the LEB128 integers of XBZRLE and the page records |
//! | [`codec`] | hybrid per-page encoding and decoding (encode) |

pub mod bitmap;
pub mod block;
pub mod cache;
pub mod codec;
pub mod hashes;
pub mod share;
pub mod varint;
pub mod xbzrle;

/// Guest page size in bytes. Castor works in 4 KiB pages throughout.
pub const PAGE_SIZE: usize = 4096;

/// Fault in every page of a fresh zeroed buffer now, so that the checkpoint path does
/// not take its first-touch page faults. One byte per 4 KiB page is written non-zero
/// (a zero store into calloc'd memory may be elided); the caller treats the buffer's
/// content as undefined until it writes it.
pub(crate) fn prefault<T: Copy>(buf: &mut [T], mark: T) {
    let step = (PAGE_SIZE / std::mem::size_of::<T>().max(1)).max(1);
    for x in buf.iter_mut().step_by(step) {
        *x = mark;
    }
    std::hint::black_box(buf);
}
