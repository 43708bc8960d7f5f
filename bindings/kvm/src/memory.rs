//! Guest memory: one anonymous mapping backing the VM's single memory slot, plus a bitmap
//! of the pages the VMM itself wrote through that mapping (KVM's dirty log cannot see them).
//!
//! The same mapping, with the same bitmap, is also a `vm_memory::GuestMemory`
//! ([`GuestRam::guest_memory`]) for the devices: what a device writes into the guest (a
//! disk's read data, its used ring, status bytes) is a VMM write like any other and shows
//! up in the next harvest.

use std::num::NonZeroUsize;
use std::sync::Arc;

use ha_codec::PAGE_SIZE;
use ha_guest::image::HOLE_READ;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::{MmapRegion, MmapRegionBuilder};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, GuestRegionMmap, VolatileMemory};

/// Guest memory as the devices see it: the guest's one region, dirty-tracked.
pub type DeviceMemory = GuestMemoryMmap<AtomicBitmap>;

/// Errors from guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The anonymous mapping could not be created.
    #[error("cannot map {size:#x} bytes of guest memory")]
    Map {
        /// Requested size.
        size: usize,
        /// The mmap error.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// The mapping could not be made a guest memory for the devices.
    #[error("cannot make {size:#x} bytes of guest memory a device's guest memory")]
    Devices {
        /// The mapping's size.
        size: usize,
    },
    /// A range outside guest memory.
    #[error("guest memory range {gpa:#x}+{len:#x} is out of range")]
    OutOfRange {
        /// Start of the range.
        gpa: u64,
        /// Length of the range.
        len: u64,
    },
}

/// Guest RAM starting at guest-physical address 0.
#[derive(Debug)]
pub struct GuestRam {
    region: Arc<MmapRegion<AtomicBitmap>>,
    devices: DeviceMemory,
    /// The memfd under a restored guest's RAM: reads skip its holes (pages never written,
    /// zero), which a read through the shared mapping would allocate one by one.
    file: Option<std::fs::File>,
}

impl GuestRam {
    /// Map `size` bytes of zeroed, lazily allocated memory.
    pub fn new(size: usize) -> Result<Self, MemoryError> {
        // PAGE_SIZE is a non-zero constant.
        let page = NonZeroUsize::new(PAGE_SIZE).unwrap_or(NonZeroUsize::MIN);
        let region = MmapRegionBuilder::new_with_bitmap(size, AtomicBitmap::new(size, page))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|source| MemoryError::Map { size, source })?;
        Self::over(region)
    }

    /// Take over the `size` bytes of `file` (a committed image's memfd) as guest memory,
    /// mapped shared: the guest runs on the image in place, with nothing copied.
    pub fn from_file(file: std::fs::File, size: usize) -> Result<Self, MemoryError> {
        let page = NonZeroUsize::new(PAGE_SIZE).unwrap_or(NonZeroUsize::MIN);
        // Without a second fd the reads just do not skip holes.
        let holes = file.try_clone().ok();
        let region = MmapRegionBuilder::new_with_bitmap(size, AtomicBitmap::new(size, page))
            .with_file_offset(vm_memory::FileOffset::new(file, 0))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
            .build()
            .map_err(|source| MemoryError::Map { size, source })?;
        let mut ram = Self::over(region)?;
        ram.file = holes;
        Ok(ram)
    }

    /// The RAM over `region`, shared with the devices' view of it.
    fn over(region: MmapRegion<AtomicBitmap>) -> Result<Self, MemoryError> {
        let size = region.size();
        let region = Arc::new(region);
        let devices = GuestRegionMmap::with_arc(Arc::clone(&region), GuestAddress(0))
            .and_then(|r| DeviceMemory::from_regions(vec![r]).ok())
            .ok_or(MemoryError::Devices { size })?;
        Ok(Self {
            region,
            devices,
            file: None,
        })
    }

    /// The same memory as a `vm_memory::GuestMemory` for the devices; their writes through
    /// it are marked in the bitmap [`GuestRam::take_vmm_dirty`] harvests.
    pub fn guest_memory(&self) -> &DeviceMemory {
        &self.devices
    }

    /// Size in bytes.
    pub fn size(&self) -> usize {
        self.region.size()
    }

    /// Host address of guest-physical address 0 (for `KVM_SET_USER_MEMORY_REGION`).
    pub fn host_addr(&self) -> u64 {
        self.region.as_ptr() as u64
    }

    fn check(&self, gpa: u64, len: usize) -> Result<usize, MemoryError> {
        let err = MemoryError::OutOfRange {
            gpa,
            len: len as u64,
        };
        let start = usize::try_from(gpa).map_err(|_| MemoryError::OutOfRange {
            gpa,
            len: len as u64,
        })?;
        match start.checked_add(len) {
            Some(end) if end <= self.size() => Ok(start),
            _ => Err(err),
        }
    }

    /// Copy guest memory at `gpa` into `buf` (volatile: the guest may be running).
    ///
    /// Over a memfd, a long read fills the file's holes with zeros instead of reading them
    /// through the mapping, which would allocate them. A page the guest writes after the
    /// hole was found reads as zero, as it would had the copy been taken a moment earlier
    /// (the write is in the next dirty log either way).
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let start = self.check(gpa, buf.len())?;
        let len = buf.len();
        let out = |_| MemoryError::OutOfRange {
            gpa,
            len: len as u64,
        };
        let mem = self.region.as_volatile_slice();
        let Some(file) = self.file.as_ref().filter(|_| len >= HOLE_READ) else {
            return mem.read_slice(buf, start).map_err(out);
        };
        for e in ha_guest::image::extents(file, start..start + len) {
            let to = &mut buf[e.range.start - start..e.range.end - start];
            if e.data {
                mem.read_slice(to, e.range.start).map_err(out)?;
            } else {
                to.fill(0);
            }
        }
        Ok(())
    }

    /// Copy `buf` into guest memory at `gpa` and mark the pages as written by the VMM.
    pub fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), MemoryError> {
        let start = self.check(gpa, buf.len())?;
        self.region
            .as_volatile_slice()
            .write_slice(buf, start)
            .map_err(|_| MemoryError::OutOfRange {
                gpa,
                len: buf.len() as u64,
            })
    }

    /// Read a little-endian u64.
    pub fn read_u64(&self, gpa: u64) -> Result<u64, MemoryError> {
        let mut b = [0u8; 8];
        self.read(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Write a little-endian u64 (a VMM write).
    pub fn write_u64(&self, gpa: u64, v: u64) -> Result<(), MemoryError> {
        self.write(gpa, &v.to_le_bytes())
    }

    /// Take the bitmap of pages the VMM wrote since the last call (KVM-style u64 words) and
    /// clear it.
    pub fn take_vmm_dirty(&self) -> Vec<u64> {
        self.region.bitmap().get_and_reset()
    }

    /// Copy a whole-memory image into fresh (all-zero) memory before any vCPU runs,
    /// skipping all-zero pages so they stay unallocated. Not recorded as VMM writes.
    pub(crate) fn load_image(&self, image: &[u8]) -> Result<(), MemoryError> {
        if image.len() != self.size() {
            return Err(MemoryError::OutOfRange {
                gpa: 0,
                len: image.len() as u64,
            });
        }
        let base = self.region.as_ptr();
        for (i, page) in image.chunks(PAGE_SIZE).enumerate() {
            // OR-fold (no early exit) so the scan vectorises.
            if page.iter().fold(0u8, |a, b| a | b) == 0 {
                continue;
            }
            let off = i * PAGE_SIZE;
            // SAFETY: `off + page.len() <= image.len() == self.size()`, so the destination
            // is inside our mapping; `image` is a separate Rust slice, so they do not
            // overlap; no vCPU runs yet, so nothing else accesses guest memory.
            unsafe { std::ptr::copy_nonoverlapping(page.as_ptr(), base.add(off), page.len()) };
        }
        Ok(())
    }

    /// Forget the VMM's writes so far (e.g. the image copied in by a restore).
    pub fn clear_vmm_dirty(&self) {
        self.region.bitmap().reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmm_writes_are_tracked_and_bounds_checked() {
        let ram = GuestRam::new(1 << 20).expect("map");
        ram.write_u64(0x3008, 42).expect("write");
        assert_eq!(ram.read_u64(0x3008).expect("read"), 42);
        let words = ram.take_vmm_dirty();
        assert_eq!(words[0], 1 << 3);
        assert!(ram.take_vmm_dirty().iter().all(|w| *w == 0));
        assert!(ram.read_u64((1 << 20) - 4).is_err());
        assert!(ram.read(u64::MAX, &mut [0u8; 2]).is_err());
    }

    #[test]
    fn device_writes_share_the_vmm_bitmap() {
        let ram = GuestRam::new(1 << 20).expect("map");
        let mem = ram.guest_memory();
        mem.write_obj(7u8, GuestAddress(0x5001)).expect("write");
        mem.store(
            9u16,
            GuestAddress(0x9002),
            std::sync::atomic::Ordering::Release,
        )
        .expect("store");
        assert_eq!(ram.read_u64(0x5000).expect("read"), 7 << 8);
        assert_eq!(ram.take_vmm_dirty()[0], (1 << 5) | (1 << 9));
        assert!(mem.write_obj(1u8, GuestAddress(1 << 20)).is_err());
    }

    #[test]
    fn reads_of_a_memfd_skip_its_holes_and_return_its_data() {
        use std::os::unix::fs::FileExt;
        let size = 4 << 20;
        let img = ha_guest::image::GuestImage::new(size).expect("image");
        let file = img.into_file();
        // Data at both ends, a hole between, data across a piece's edge.
        let mut want = vec![0u8; size];
        for (at, b) in [(0usize, 1u8), (PAGE_SIZE * 17 + 3, 2), (size - 1, 3)] {
            file.write_all_at(&[b], at as u64).expect("write");
            want[at] = b;
        }
        let blocks = |f: &std::fs::File| {
            use std::os::unix::fs::MetadataExt;
            f.metadata().expect("stat").blocks()
        };
        let before = blocks(&file);
        let ram = GuestRam::from_file(file.try_clone().expect("dup"), size).expect("map");
        let mut got = vec![0xAAu8; size];
        ram.read(0, &mut got).expect("read");
        assert!(got == want, "a long read differs from the memfd");
        let mut part = vec![0xAAu8; HOLE_READ + 5];
        ram.read(PAGE_SIZE as u64 * 16 + 1, &mut part)
            .expect("read");
        assert!(part[..] == want[PAGE_SIZE * 16 + 1..][..HOLE_READ + 5]);
        // The holes were not allocated by the reads.
        assert_eq!(blocks(&file), before);
        // A guest write into a hole is seen by the next read.
        ram.write_u64(PAGE_SIZE as u64 * 600, 0x55).expect("write");
        ram.read(0, &mut got).expect("read");
        assert_eq!(got[PAGE_SIZE * 600], 0x55);
    }

    #[test]
    fn load_image_copies_non_zero_pages_untracked() {
        let ram = GuestRam::new(1 << 20).expect("map");
        let mut image = vec![0u8; 1 << 20];
        image[5 * PAGE_SIZE + 7] = 9;
        ram.load_image(&image).expect("load");
        let mut back = vec![0u8; 1 << 20];
        ram.read(0, &mut back).expect("read");
        assert!(back == image);
        assert!(ram.take_vmm_dirty().iter().all(|w| *w == 0));
        assert!(ram.load_image(&image[..4096]).is_err());
    }
}
