//! The sim guest's disk: a raw image file on the host, read and written at once when the
//! guest's batch is carried out, every completed write logged for the checkpoint (the same
//! semantics as the KVM backend's virtio-blk device, without a transport).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ha_guest::diskimage::{self, DiskImageError};
use ha_guest::domain::DiskWrite;
use ha_workloads::guest_abi::disk::{PAGE, SECTOR};
use ha_workloads::model::{DiskOp, DiskRequest};

use crate::memory::GuestMemory;

/// An open disk image and the writes completed since the last drain.
#[derive(Debug)]
pub(crate) struct SimDisk {
    file: File,
    path: PathBuf,
    size: u64,
    writes: Vec<DiskWrite>,
}

impl SimDisk {
    /// Open `path` for reading and writing; the disk's size is the file's, a positive
    /// multiple of a page.
    pub(crate) fn open(path: &Path) -> Result<Self, DiskImageError> {
        let (file, size) = diskimage::open(path, PAGE)?;
        Ok(Self {
            file,
            path: path.to_owned(),
            size,
            writes: Vec::new(),
        })
    }

    /// A second handle on the image file, for reading it from another thread.
    pub(crate) fn image(&self) -> std::io::Result<File> {
        self.file.try_clone()
    }

    /// The disk's size in bytes.
    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// Carry out `r` between guest memory and the disk; false is the guest's I/O error
    /// (a range outside memory or the disk, or the host's write failing).
    pub(crate) fn io(&mut self, mem: &GuestMemory, r: &DiskRequest) -> bool {
        if r.op == DiskOp::Flush {
            return match self.file.sync_data() {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(disk = %self.path.display(), error = %e, "sim: disk flush failed");
                    false
                }
            };
        }
        let Some(offset) = r.sector.checked_mul(SECTOR) else {
            return false;
        };
        let inside_disk = offset.checked_add(r.len).is_some_and(|e| e <= self.size);
        let inside_mem = r.gpa.checked_add(r.len).is_some_and(|e| e <= mem.size());
        let Ok(len) = usize::try_from(r.len) else {
            return false;
        };
        // Memory is stored in words: buffers are word aligned, as the workloads' pages are.
        if !inside_disk || !inside_mem || !r.gpa.is_multiple_of(8) || !r.len.is_multiple_of(SECTOR)
        {
            tracing::debug!(?r, "sim: disk request outside memory or disk");
            return false;
        }
        let mut buf = vec![0u8; len];
        let res = match r.op {
            DiskOp::Read => self.file.read_exact_at(&mut buf, offset).map(|()| {
                mem.write_bytes(r.gpa, &buf);
            }),
            DiskOp::Write => mem
                .read(r.gpa, &mut buf)
                .map_err(std::io::Error::other)
                .and_then(|()| self.file.write_all_at(&buf, offset))
                .map(|()| self.writes.push(DiskWrite { offset, data: buf })),
            DiskOp::Flush => Ok(()),
        };
        match res {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(disk = %self.path.display(), offset, len, error = %e, "sim: disk I/O failed; the guest gets an I/O error");
                false
            }
        }
    }

    /// Move the writes completed since the last drain into `out`.
    pub(crate) fn drain(&mut self, out: &mut Vec<DiskWrite>) {
        out.append(&mut self.writes);
    }

    /// Read the disk's bytes at `offset`.
    pub(crate) fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
}
