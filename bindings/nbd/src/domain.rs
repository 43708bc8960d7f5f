//! A domain whose disk Castor serves over NBD: any [`Domain`] (a Xen domU) with the
//! [`Disk`] capability of its [`Server`]'s image.
//!
//! It forwards everything to the inner domain, and adds: [`Domain::disk`] is the served
//! image; [`Domain::pause`] holds the image's writes once the guest stands still (so the
//! writes drained in the pause are exactly those completed before it) and
//! [`Domain::resume`] lets them go on before the guest runs; [`Domain::check_health`]
//! fails once the server lost its client (the guest's disk is gone).

use ha_codec::bitmap::PageBitmap;
use ha_guest::cow::CowMemory;
use ha_guest::domain::{Disk, Domain, DomainError, OutputChannel, StatusProbe};

use crate::attach::Device;
use crate::export::{ServedDisk, Server};

/// A domain with its served disk.
pub struct ServedDomain {
    // Dropped in this order: the device is detached while its server still answers.
    inner: Box<dyn Domain>,
    device: Option<Device>,
    server: Server,
    disk: ServedDisk,
}

impl std::fmt::Debug for ServedDomain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServedDomain")
            .field("device", &self.device)
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

impl ServedDomain {
    /// `inner`, whose disk is `disk`'s image served by `server` (to the kernel's `device`,
    /// detached when this is dropped).
    pub fn new(
        inner: Box<dyn Domain>,
        disk: ServedDisk,
        server: Server,
        device: Option<Device>,
    ) -> Self {
        Self {
            inner,
            device,
            server,
            disk,
        }
    }
}

impl Domain for ServedDomain {
    fn memory_size(&self) -> u64 {
        self.inner.memory_size()
    }

    fn read_memory(&self, gpa: u64, buf: &mut [u8]) -> Result<(), DomainError> {
        self.inner.read_memory(gpa, buf)
    }

    fn read_pages(&self, pages: &[u64], out: &mut [u8]) -> Result<(), DomainError> {
        self.inner.read_pages(pages, out)
    }

    fn pause(&mut self) -> Result<(), DomainError> {
        // The guest first: a suspending Linux guest may still write while it freezes.
        self.inner.pause()?;
        self.disk.0.hold();
        Ok(())
    }

    fn resume(&mut self) -> Result<(), DomainError> {
        self.disk.0.release();
        self.inner.resume()
    }

    fn is_paused(&self) -> bool {
        self.inner.is_paused()
    }

    fn harvest_dirty(&mut self, dirty: &mut PageBitmap) -> Result<(), DomainError> {
        self.inner.harvest_dirty(dirty)
    }

    fn written_since_harvest(&mut self) -> Result<u64, DomainError> {
        self.inner.written_since_harvest()
    }

    fn save_state(&mut self) -> Result<Vec<u8>, DomainError> {
        self.inner.save_state()
    }

    fn output_channel(&mut self) -> Option<&mut dyn OutputChannel> {
        self.inner.output_channel()
    }

    fn status_probe(&self) -> Option<&dyn StatusProbe> {
        self.inner.status_probe()
    }

    fn disk(&mut self) -> Option<&mut dyn Disk> {
        Some(&mut self.disk)
    }

    fn cow_memory(&mut self) -> Option<&mut dyn CowMemory> {
        self.inner.cow_memory()
    }

    fn check_health(&self) -> Result<(), DomainError> {
        self.inner.check_health()?;
        self.server.health().map_err(|e| DomainError::Backend {
            op: "serve the guest's disk",
            source: Box::new(e),
        })
    }

    fn net_interfaces(&self) -> Result<Vec<String>, DomainError> {
        self.inner.net_interfaces()
    }

    fn outlives_vmm(&self) -> bool {
        self.inner.outlives_vmm()
    }
}
