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
        let map = MmapRegionBuilder::new(size)
            .with_file_offset(FileOffset::new(file.try_clone().map_err(create)?, 0))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
            .build()
            .map_err(|source| ImageError::Map { size, source })?;
        Ok(Self { file, map })
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
        // this object maps the memfd until `into_file` gives it away (consuming `self`), so
        // no one writes them while this shared borrow lives.
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
}
