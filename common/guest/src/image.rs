//! A guest memory image that a backend can take over as the guest's memory without a copy.
//!
//! The backup keeps its committed image in a [`GuestImage`]: memory of a memfd, mapped
//! shared. At failover it hands the image to `DomainFactory::restore_image`, and a backend
//! that can map the memfd as the guest's RAM (KVM) does so, so activation costs the same at
//! any memory size; any other backend copies it, as from a slice.

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};

use vm_memory::FileOffset;
use vm_memory::mmap::{MmapRegion, MmapRegionBuilder};

/// Errors making an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The memfd cannot be created or sized.
    #[error("cannot create a {size}-byte memory image")]
    Create {
        /// The size asked for.
        size: usize,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The memfd to take over cannot be measured.
    #[error("cannot read the length of the memory image to take over")]
    Adopt(#[source] std::io::Error),
    /// The memfd cannot be mapped.
    #[error("cannot map a {size}-byte memory image")]
    Map {
        /// The size asked for.
        size: usize,
        /// The mapping error.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
}

/// Zero-filled guest memory in a memfd, mapped into this process.
#[derive(Debug)]
pub struct GuestImage {
    file: File,
    map: MmapRegion<()>,
}

impl GuestImage {
    /// An all-zero image of `size` bytes (pages are allocated as they are written).
    pub fn new(size: usize) -> Result<Self, ImageError> {
        let create = |source| ImageError::Create { size, source };
        // SAFETY: the name is a NUL-terminated string literal; memfd_create has no other
        // memory effects and returns a new fd or -1.
        let fd = unsafe { libc::memfd_create(c"castor-guest-image".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(create(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by memfd_create, is open, and nothing else owns it.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        file.set_len(size as u64).map_err(create)?;
        Self::map(file, size)
    }

    /// An image over `file`, an existing memfd that the caller gives up (the role swap's
    /// copy of the guest's memory): mapped shared as it is, so taking it costs no copy and
    /// writes to the image change it. The image is the file's whole length.
    pub fn adopt(file: File) -> Result<Self, ImageError> {
        let len = file.metadata().map_err(ImageError::Adopt)?.len();
        Self::map(file, usize::try_from(len).unwrap_or(usize::MAX))
    }

    /// Map `size` bytes of `file` shared, read-write.
    fn map(file: File, size: usize) -> Result<Self, ImageError> {
        let dup = file
            .try_clone()
            .map_err(|source| ImageError::Create { size, source })?;
        let map = MmapRegionBuilder::new(size)
            .with_file_offset(FileOffset::new(dup, 0))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
            .build()
            .map_err(|source| ImageError::Map { size, source })?;
        Ok(Self { file, map })
    }

    /// Whether `file` is a memfd (anonymous memory, no file on any disk): one that
    /// [`GuestImage::adopt`] may take over. An operator's image file never is.
    pub fn is_memfd(file: &File) -> bool {
        use std::os::fd::AsRawFd;
        std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .is_ok_and(|target| target.to_string_lossy().starts_with("/memfd:"))
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.map.size()
    }

    /// Whether the image is empty (it never is: an image has a guest's memory).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The image's bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is `len()` readable bytes that live as long as `self`; only
        // this object maps the memfd until `into_file` gives it away (consuming `self`) —
        // an adopted memfd's caller gave it up — so no one writes them while this shared
        // borrow lives.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr(), self.len()) }
    }

    /// The image's bytes, to change.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and the borrow of `self` is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.map.as_ptr(), self.len()) }
    }

    /// Give the memory away: the memfd, for a backend to map as the guest's RAM. This
    /// object's mapping ends here, torn down on a thread of its own: unmapping costs time
    /// in proportion to the pages it maps (~65 ms per resident GiB on this project's
    /// machines), which a failover should not wait for.
    pub fn into_file(self) -> File {
        let Self { file, map } = self;
        // If the thread cannot start, the closure (and the mapping) is dropped here.
        let _ = std::thread::Builder::new()
            .name("castor-unmap".into())
            .spawn(move || drop(map));
        file
    }
}

impl GuestImage {
    /// The runs of data and of holes in `range` of the image ([`extents`]).
    pub fn extents(&self, range: std::ops::Range<usize>) -> Extents<'_> {
        extents(&self.file, range)
    }
}

/// Reads at least this long look for a memfd's holes first ([`extents`]: two `lseek`s);
/// shorter ones read through the mapping (a page or two allocated at most).
pub const HOLE_READ: usize = 64 << 10;

/// One run of a file's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    /// Where, in bytes.
    pub range: std::ops::Range<usize>,
    /// Data (false: a hole, all zero, not allocated: reading it through a shared mapping
    /// would allocate it, page by page).
    pub data: bool,
}

/// The runs of data and of holes of `file` (a memfd, or any file) in `range`, in order,
/// found with `lseek`'s SEEK_DATA and SEEK_HOLE. Where the file cannot tell, the rest is
/// one run of data, which is always right to read.
pub fn extents(file: &File, range: std::ops::Range<usize>) -> Extents<'_> {
    Extents {
        file,
        at: range.start,
        end: range.end,
    }
}

/// The iterator of [`extents`].
#[derive(Debug)]
pub struct Extents<'a> {
    file: &'a File,
    at: usize,
    end: usize,
}

impl Iterator for Extents<'_> {
    type Item = Extent;

    fn next(&mut self) -> Option<Extent> {
        let (at, end) = (self.at, self.end);
        if at >= end {
            return None;
        }
        let data = match seek(self.file, at, libc::SEEK_DATA) {
            Ok(Some(d)) => d.min(end),
            Ok(None) => end,
            Err(()) => at,
        };
        if data > at {
            self.at = data;
            return Some(Extent {
                range: at..data,
                data: false,
            });
        }
        let hole = match seek(self.file, at, libc::SEEK_HOLE) {
            Ok(Some(h)) => h.clamp(at + 1, end),
            Ok(None) | Err(()) => end,
        };
        self.at = hole;
        Some(Extent {
            range: at..hole,
            data: true,
        })
    }
}

/// `lseek(2)` of `file` from `offset` with `whence` (SEEK_DATA or SEEK_HOLE): the place
/// found, None when there is none past `offset` (ENXIO), Err when the call fails.
fn seek(file: &File, offset: usize, whence: libc::c_int) -> Result<Option<usize>, ()> {
    use std::os::fd::AsRawFd;
    let offset = libc::off_t::try_from(offset).map_err(|_| ())?;
    // SAFETY: lseek only moves the file description's offset (the image is read through
    // its mapping, never with read(2), so nothing depends on it); no memory is passed.
    let r = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if r < 0 {
        return match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(()),
        };
    }
    usize::try_from(r).map(Some).map_err(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn an_image_starts_zero_and_its_file_holds_what_was_written() {
        let mut img = GuestImage::new(1 << 20).expect("image");
        assert_eq!(img.len(), 1 << 20);
        assert!(img.as_slice().iter().all(|&b| b == 0));
        img.as_mut_slice()[4096 * 3 + 5] = 7;
        let file = img.into_file();
        let mut b = [0u8; 1];
        file.read_exact_at(&mut b, 4096 * 3 + 5).expect("read");
        assert_eq!(b, [7]);
        assert_eq!(file.metadata().expect("stat").len(), 1 << 20);
    }

    #[test]
    fn an_adopted_memfd_is_the_image_without_a_copy() {
        let mut img = GuestImage::new(1 << 20).expect("image");
        img.as_mut_slice()[4096 * 7 + 1] = 9;
        let file = img.into_file();
        assert!(GuestImage::is_memfd(&file));
        let reopened = std::fs::File::options()
            .read(true)
            .write(true)
            .open(format!(
                "/proc/self/fd/{}",
                std::os::fd::AsRawFd::as_raw_fd(&file)
            ))
            .expect("reopen");
        assert!(GuestImage::is_memfd(&reopened));
        let mut adopted = GuestImage::adopt(reopened).expect("adopt");
        assert_eq!(adopted.len(), 1 << 20);
        assert_eq!(adopted.as_slice()[4096 * 7 + 1], 9);
        // Shared, not copied: a write through the adopted image is in the memfd.
        adopted.as_mut_slice()[5] = 3;
        let mut b = [0u8; 1];
        file.read_exact_at(&mut b, 5).expect("read");
        assert_eq!(b, [3]);
        let plain = tempfile_in_tmp();
        assert!(!GuestImage::is_memfd(&plain));
    }

    #[test]
    fn extents_alternate_data_and_holes_and_cover_the_range() {
        let size = 1 << 20;
        let mut img = GuestImage::new(size).expect("image");
        img.as_mut_slice()[PAGE * 2] = 1;
        img.as_mut_slice()[PAGE * 3 + 5] = 1;
        img.as_mut_slice()[size - 1] = 1;
        let got: Vec<Extent> = img.extents(PAGE..size).collect();
        let want = vec![
            Extent {
                range: PAGE..PAGE * 2,
                data: false,
            },
            Extent {
                range: PAGE * 2..PAGE * 4,
                data: true,
            },
            Extent {
                range: PAGE * 4..size - PAGE,
                data: false,
            },
            Extent {
                range: size - PAGE..size,
                data: true,
            },
        ];
        assert_eq!(got, want);
        // Inside a run, and an empty range.
        let inside: Vec<Extent> = img.extents(PAGE * 2 + 7..PAGE * 2 + 9).collect();
        assert_eq!(
            inside,
            vec![Extent {
                range: PAGE * 2 + 7..PAGE * 2 + 9,
                data: true
            }]
        );
        assert_eq!(img.extents(9..9).count(), 0);
    }

    const PAGE: usize = 4096;

    /// A file on a file system (not a memfd).
    fn tempfile_in_tmp() -> File {
        let path = std::env::temp_dir().join(format!("castor-image-test-{}", std::process::id()));
        let f = File::create(&path).expect("create");
        let _ = std::fs::remove_file(&path);
        f
    }
}
