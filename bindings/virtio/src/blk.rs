//! A virtio-blk disk over a raw image file, whose completed writes are kept for the
//! checkpoint that replicates them.
//!
//! The device serves its queue synchronously when the driver rings the doorbell: every
//! request the driver made available is read, checked, executed against the image file and
//! completed before the doorbell's exit returns. So no request is ever in flight at a
//! checkpoint, and the saved state is the transport's registers alone.
//!
//! Each completed write is also appended to the device's write log, which the backend
//! drains at each checkpoint ([`Blk::drain_writes`]): the write is on the primary's disk at
//! once, and on the backup's replica when its checkpoint commits (Remus's disk buffering).
//!
//! A request the device cannot make sense of — a descriptor outside guest memory, a chain
//! with its parts in the wrong direction, sectors past the end, a size that is not whole
//! sectors, an unknown type — is completed with an error status; it never touches memory
//! outside the guest and never stops the VMM.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use ha_guest::diskimage::{self, DiskImageError};
use ha_guest::domain::{DiskRead, DiskWrite};
use tracing::{debug, warn};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::QueueT;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestMemory};

/// A guest page and a disk block, in bytes.
const PAGE: u64 = 4096;

use crate::mmio::{MmioError, MmioEvent, MmioState, MmioTransport};

/// Bytes in a sector, the unit of every request.
pub const SECTOR_SIZE: u64 = 512;
/// Entries of the device's virtqueue.
pub const QUEUE_SIZE: u16 = 256;
/// The most data one request may carry (larger ones get an I/O error).
pub const MAX_REQUEST_BYTES: u32 = 4 << 20;
/// What a GET_ID request answers (padded with zeros to 20 bytes).
pub const DISK_ID: &[u8] = b"castor-disk";

/// Request completed.
pub const STATUS_OK: u8 = 0;
/// Request failed: a bad request, or the image file failed.
pub const STATUS_IOERR: u8 = 1;
/// Request type not supported.
pub const STATUS_UNSUPP: u8 = 2;

/// Bytes of a request header: `u32 type | u32 reserved | u64 sector`.
const HEADER_LEN: u32 = 16;

/// Errors opening or restoring a disk.
#[derive(Debug, thiserror::Error)]
pub enum BlkError {
    /// The image file cannot be opened, or is not whole sectors.
    #[error(transparent)]
    Image(#[from] DiskImageError),
    /// The transport refused the set-up or the saved state.
    #[error("virtio-blk transport")]
    Transport(#[source] MmioError),
    /// A read of the image for the VMM (not the guest) past the disk's end.
    #[error("disk range {offset:#x}+{len:#x} is past the end of the {size}-byte disk")]
    Range {
        /// Byte offset asked for.
        offset: u64,
        /// Bytes asked for.
        len: u64,
        /// The disk's size.
        size: u64,
    },
    /// The image file failed a read for the VMM.
    #[error("cannot read the disk image at {offset:#x}")]
    Read {
        /// Byte offset of the read.
        offset: u64,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// A virtio-blk disk: the transport, the image file and the log of completed writes.
#[derive(Debug)]
pub struct Blk {
    transport: MmioTransport,
    file: File,
    size: u64,
    writes: Vec<DiskWrite>,
    reads: Vec<DiskRead>,
}

/// Page-sized reads the device remembers between drains at most (a guest reading faster
/// than the checkpoints drain loses the excess: the map is a hint).
const MAX_READS: usize = 1 << 20;

impl Blk {
    /// A reset disk over the image at `path` (opened read-write; its size is the disk's).
    pub fn open(path: &Path) -> Result<Self, BlkError> {
        let (file, size) = diskimage::open(path, SECTOR_SIZE)?;
        let transport = MmioTransport::new(VIRTIO_ID_BLOCK, features(), config(size), QUEUE_SIZE)
            .map_err(BlkError::Transport)?;
        Ok(Self {
            transport,
            file,
            size,
            writes: Vec::new(),
            reads: Vec::new(),
        })
    }

    /// The disk over the image at `path` with the transport as `state` saved it (on the
    /// backup: the replica, after the checkpoint's writes were applied to it).
    pub fn restore(path: &Path, state: &MmioState) -> Result<Self, BlkError> {
        let mut blk = Self::open(path)?;
        blk.transport.restore(state).map_err(BlkError::Transport)?;
        Ok(blk)
    }

    /// The transport's registers, for the saved state.
    pub fn state(&self) -> MmioState {
        self.transport.state()
    }

    /// The disk's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// A driver's read in the device's MMIO window.
    pub fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        self.transport.read(offset, data);
    }

    /// A driver's write in the device's MMIO window; a doorbell serves the queue at once.
    /// Returns how many requests completed.
    pub fn mmio_write<M: GuestMemory>(&mut self, mem: &M, offset: u64, data: &[u8]) -> usize {
        match self.transport.write(offset, data) {
            MmioEvent::Notify => self.serve(mem),
            MmioEvent::Reset => {
                debug!("virtio-blk: reset by the driver");
                0
            }
            MmioEvent::None => 0,
        }
    }

    /// Read `buf.len()` bytes of the disk at byte `offset` for the VMM (digests, the
    /// initial synchronisation): not a guest request, so nothing is logged.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlkError> {
        let len = buf.len() as u64;
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(BlkError::Range {
                offset,
                len,
                size: self.size,
            });
        }
        self.file
            .read_exact_at(buf, offset)
            .map_err(|source| BlkError::Read { offset, source })
    }

    /// Move the reads completed since the last drain that filled whole guest pages with
    /// whole 4 KiB blocks into `out`.
    pub fn drain_reads(&mut self, out: &mut Vec<DiskRead>) {
        out.append(&mut self.reads);
    }

    /// A second handle on the image file, for reading it from another thread.
    pub fn image(&self) -> std::io::Result<File> {
        self.file.try_clone()
    }

    /// Move the writes completed since the last drain into `out`, in completion order.
    pub fn drain_writes(&mut self, out: &mut Vec<DiskWrite>) {
        out.append(&mut self.writes);
    }

    /// Complete every request the driver made available. Returns how many completed.
    pub fn serve<M: GuestMemory>(&mut self, mem: &M) -> usize {
        let mut done = 0;
        while let Some(chain) = self.transport.queue_mut().pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let descs: Vec<Descriptor> = chain.collect();
            let written = self.request(mem, &descs);
            if let Err(e) = self.transport.queue_mut().add_used(mem, head, written) {
                warn!(error = %e, "virtio-blk: used ring not writable; request dropped");
                continue;
            }
            done += 1;
        }
        if done > 0 {
            self.transport.signal_used();
        }
        done
    }

    /// Check and execute one request; write its status byte when there is a place for it.
    /// Returns the bytes the device wrote into the guest's buffers, the status included.
    fn request<M: GuestMemory>(&mut self, mem: &M, descs: &[Descriptor]) -> u32 {
        // The status byte goes into the last descriptor, which must be the device's to
        // write; without one the request cannot even be failed.
        let Some(status_desc) = descs.last().filter(|d| d.is_write_only() && d.len() >= 1) else {
            debug!("virtio-blk: request without a status byte dropped");
            return 0;
        };
        let (status, data_written) = match self.execute(mem, descs) {
            Ok(n) => (STATUS_OK, n),
            Err(status) => (status, 0),
        };
        if mem.write_obj(status, status_desc.addr()).is_err() {
            debug!("virtio-blk: status byte outside guest memory");
            return 0;
        }
        data_written.saturating_add(1)
    }

    /// Execute a request whose last descriptor is its status byte; the bytes written into
    /// the guest's buffers, or the error status.
    fn execute<M: GuestMemory>(&mut self, mem: &M, descs: &[Descriptor]) -> Result<u32, u8> {
        let (header, rest) = descs.split_first().ok_or(STATUS_IOERR)?;
        let data = rest.get(..rest.len().saturating_sub(1)).unwrap_or(&[]);
        if header.is_write_only() || header.len() < HEADER_LEN || data.len() + 2 != descs.len() {
            return Err(STATUS_IOERR);
        }
        let mut h = [0u8; HEADER_LEN as usize];
        mem.read_slice(&mut h, header.addr())
            .map_err(|_| STATUS_IOERR)?;
        let kind = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        let sector = u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
        let total = data
            .iter()
            .try_fold(0u32, |n, d| n.checked_add(d.len()))
            .filter(|n| *n <= MAX_REQUEST_BYTES)
            .ok_or(STATUS_IOERR)?;
        match kind {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
                let offset = self.range(sector, total)?;
                if kind == VIRTIO_BLK_T_IN {
                    self.read(mem, data, offset)?;
                    Ok(total)
                } else {
                    self.write(mem, data, offset)?;
                    Ok(0)
                }
            }
            VIRTIO_BLK_T_FLUSH => {
                // Completes locally: output commit holds everything the guest says about
                // the flush until the checkpoint that carries its writes is committed.
                self.file.sync_data().map_err(|e| {
                    warn!(error = %e, "virtio-blk: flush failed");
                    STATUS_IOERR
                })?;
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                let d = data
                    .first()
                    .filter(|d| d.is_write_only())
                    .ok_or(STATUS_IOERR)?;
                let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
                id[..DISK_ID.len()].copy_from_slice(DISK_ID);
                let n = d.len().min(VIRTIO_BLK_ID_BYTES);
                mem.write_slice(&id[..n as usize], d.addr())
                    .map_err(|_| STATUS_IOERR)?;
                Ok(n)
            }
            other => {
                debug!(kind = other, "virtio-blk: unsupported request type");
                Err(STATUS_UNSUPP)
            }
        }
    }

    /// The byte offset of `bytes` at `sector`, when they are whole sectors on the disk.
    fn range(&self, sector: u64, bytes: u32) -> Result<u64, u8> {
        let bytes = u64::from(bytes);
        if bytes % SECTOR_SIZE != 0 {
            return Err(STATUS_IOERR);
        }
        let offset = sector.checked_mul(SECTOR_SIZE).ok_or(STATUS_IOERR)?;
        match offset.checked_add(bytes) {
            Some(end) if end <= self.size => Ok(offset),
            _ => Err(STATUS_IOERR),
        }
    }

    /// IN: the disk's bytes at `offset` into the writable buffers `data`.
    fn read<M: GuestMemory>(
        &mut self,
        mem: &M,
        data: &[Descriptor],
        offset: u64,
    ) -> Result<(), u8> {
        let mut at = offset;
        for d in data {
            if !d.is_write_only() {
                return Err(STATUS_IOERR);
            }
            let mut buf = vec![0u8; d.len() as usize];
            self.file.read_exact_at(&mut buf, at).map_err(|e| {
                warn!(error = %e, "virtio-blk: image read failed");
                STATUS_IOERR
            })?;
            mem.write_slice(&buf, d.addr()).map_err(|_| STATUS_IOERR)?;
            let (gpa, len) = (d.addr().raw_value(), u64::from(d.len()));
            if (gpa | at | len).is_multiple_of(PAGE) && self.reads.len() < MAX_READS {
                self.reads.extend((0..len / PAGE).map(|k| DiskRead {
                    page: gpa / PAGE + k,
                    block: at / PAGE + k,
                }));
            }
            at += u64::from(d.len());
        }
        Ok(())
    }

    /// OUT: the readable buffers `data` onto the disk at `offset`, and into the write log.
    /// The whole request is read from guest memory before anything is written, so a bad
    /// buffer leaves the disk unchanged.
    fn write<M: GuestMemory>(
        &mut self,
        mem: &M,
        data: &[Descriptor],
        offset: u64,
    ) -> Result<(), u8> {
        let mut bytes = Vec::new();
        for d in data {
            if d.is_write_only() {
                return Err(STATUS_IOERR);
            }
            let start = bytes.len();
            bytes.resize(start + d.len() as usize, 0);
            mem.read_slice(&mut bytes[start..], d.addr())
                .map_err(|_| STATUS_IOERR)?;
        }
        self.file.write_all_at(&bytes, offset).map_err(|e| {
            warn!(error = %e, "virtio-blk: image write failed");
            STATUS_IOERR
        })?;
        if !bytes.is_empty() {
            self.writes.push(DiskWrite {
                offset,
                data: bytes,
            });
        }
        Ok(())
    }
}

/// The features the disk offers besides VERSION_1.
fn features() -> u64 {
    1u64 << VIRTIO_BLK_F_FLUSH
}

/// The configuration space: `u64 capacity` in sectors (the rest of `virtio_blk_config`
/// belongs to features the disk does not offer).
fn config(size: u64) -> Vec<u8> {
    (size / SECTOR_SIZE).to_le_bytes().to_vec()
}
