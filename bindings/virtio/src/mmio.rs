//! The virtio-mmio transport (virtio 1.x, "version 2" register layout): the register file
//! a driver programs to negotiate features, set up the one virtqueue and ring the doorbell.
//!
//! The transport knows nothing of what the device does; it holds the device's id, the
//! features it offers and its configuration space, and turns the driver's register writes
//! into a [`Queue`] and [`MmioEvent`]s. A device (see [`crate::blk`]) owns one transport and
//! serves the queue when the driver notifies it. Everything the driver programmed is in
//! [`MmioState`], so a restored guest's driver carries on where it was.

use serde::{Deserialize, Serialize};
use tracing::debug;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_CONFIG, VIRTIO_MMIO_CONFIG_GENERATION, VIRTIO_MMIO_DEVICE_FEATURES,
    VIRTIO_MMIO_DEVICE_FEATURES_SEL, VIRTIO_MMIO_DEVICE_ID, VIRTIO_MMIO_DRIVER_FEATURES,
    VIRTIO_MMIO_DRIVER_FEATURES_SEL, VIRTIO_MMIO_INT_VRING, VIRTIO_MMIO_INTERRUPT_ACK,
    VIRTIO_MMIO_INTERRUPT_STATUS, VIRTIO_MMIO_MAGIC_VALUE, VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
    VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH, VIRTIO_MMIO_QUEUE_DESC_LOW,
    VIRTIO_MMIO_QUEUE_NOTIFY, VIRTIO_MMIO_QUEUE_NUM, VIRTIO_MMIO_QUEUE_NUM_MAX,
    VIRTIO_MMIO_QUEUE_READY, VIRTIO_MMIO_QUEUE_SEL, VIRTIO_MMIO_QUEUE_USED_HIGH,
    VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_STATUS, VIRTIO_MMIO_VENDOR_ID, VIRTIO_MMIO_VERSION,
};
use virtio_queue::{Queue, QueueState, QueueT};

/// "virt" in little-endian: the first register of every virtio-mmio device.
pub const MMIO_MAGIC: u32 = u32::from_le_bytes(*b"virt");
/// The register layout of virtio 1.x ("version 2"; version 1 is the legacy layout).
pub const MMIO_VERSION: u32 = 2;
/// Castor's vendor id in the transport ("CSTR").
pub const VENDOR_ID: u32 = u32::from_le_bytes(*b"CSTR");
/// Bytes of register space a device occupies (registers, then configuration space).
pub const MMIO_SIZE: u64 = 0x1000;

/// Errors of the transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// A queue the virtio-queue crate refuses (bad size, misaligned rings).
    #[error("virtqueue rejected")]
    Queue(#[source] virtio_queue::Error),
    /// A saved transport state that cannot be restored.
    #[error("saved virtio-mmio state is invalid: {0}")]
    BadState(&'static str),
}

/// What a register write asks of the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmioEvent {
    /// Nothing beyond the register change.
    None,
    /// The driver rang the doorbell of queue 0 and the device is live: serve the queue.
    Notify,
    /// The driver wrote 0 to the status register: the device was reset.
    Reset,
}

/// The transport's registers as the driver left them, for the saved state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    /// Features the driver accepted.
    pub driver_features: u64,
    /// Device status (ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK …).
    pub status: u32,
    /// The feature word the driver selected for reading and for writing.
    pub features_sel: (u32, u32),
    /// Pending interrupt bits.
    pub interrupt_status: u32,
    /// The queue: size, ring addresses, ready, next available and next used index.
    pub queue: SavedQueue,
}

/// A virtqueue's state in the saved state (virtio-queue's `QueueState`, which is not
/// serializable itself).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedQueue {
    /// The queue size the driver chose.
    pub size: u16,
    /// Whether the driver marked the queue ready.
    pub ready: bool,
    /// Guest address of the descriptor table.
    pub desc_table: u64,
    /// Guest address of the available ring.
    pub avail_ring: u64,
    /// Guest address of the used ring.
    pub used_ring: u64,
    /// The next available-ring entry the device will read.
    pub next_avail: u16,
    /// The next used-ring entry the device will write.
    pub next_used: u16,
}

/// One virtio-mmio device's register file with its single virtqueue.
#[derive(Debug)]
pub struct MmioTransport {
    device_id: u32,
    device_features: u64,
    config: Vec<u8>,
    driver_features: u64,
    device_features_sel: u32,
    driver_features_sel: u32,
    status: u32,
    interrupt_status: u32,
    queue: Queue,
}

impl MmioTransport {
    /// A reset transport for a device of `device_id` offering `features` (VERSION_1 is
    /// always offered) with configuration space `config` and a queue of at most
    /// `queue_max` entries (a power of two).
    pub fn new(
        device_id: u32,
        features: u64,
        config: Vec<u8>,
        queue_max: u16,
    ) -> Result<Self, MmioError> {
        Ok(Self {
            device_id,
            device_features: features | (1u64 << VIRTIO_F_VERSION_1),
            config,
            driver_features: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            status: 0,
            interrupt_status: 0,
            queue: Queue::new(queue_max).map_err(MmioError::Queue)?,
        })
    }

    /// Put the registers back as `state` saved them (a reset transport of the same
    /// device); on an error the transport is unchanged.
    pub fn restore(&mut self, state: &MmioState) -> Result<(), MmioError> {
        if state.driver_features & !self.device_features != 0 {
            return Err(MmioError::BadState(
                "driver features the device never offered",
            ));
        }
        let q = state.queue;
        self.queue = Queue::try_from(QueueState {
            max_size: self.queue.max_size(),
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: false,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        })
        .map_err(MmioError::Queue)?;
        self.driver_features = state.driver_features;
        (self.device_features_sel, self.driver_features_sel) = state.features_sel;
        self.status = state.status;
        self.interrupt_status = state.interrupt_status;
        Ok(())
    }

    /// The registers as the driver left them.
    pub fn state(&self) -> MmioState {
        let q = self.queue.state();
        MmioState {
            driver_features: self.driver_features,
            status: self.status,
            features_sel: (self.device_features_sel, self.driver_features_sel),
            interrupt_status: self.interrupt_status,
            queue: SavedQueue {
                size: q.size,
                ready: q.ready,
                desc_table: q.desc_table,
                avail_ring: q.avail_ring,
                used_ring: q.used_ring,
                next_avail: q.next_avail,
                next_used: q.next_used,
            },
        }
    }

    /// Whether the driver finished initialising the device (DRIVER_OK, not FAILED).
    pub fn driver_ok(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 && self.status & VIRTIO_CONFIG_S_FAILED == 0
    }

    /// The virtqueue, for the device to serve.
    pub fn queue_mut(&mut self) -> &mut Queue {
        &mut self.queue
    }

    /// Note that the device put buffers in the used ring (the interrupt a driver that
    /// polls never waits for, kept so that one that reads the status sees it).
    pub fn signal_used(&mut self) {
        self.interrupt_status |= VIRTIO_MMIO_INT_VRING;
    }

    /// A driver's read of `data.len()` bytes at `offset` in the device's window. Registers
    /// are 32-bit; any other access to them reads as zeros. Configuration space may be
    /// read in any width; bytes past its end read as zeros.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let config = u64::from(VIRTIO_MMIO_CONFIG);
        if offset >= config {
            let start = usize::try_from(offset - config).unwrap_or(usize::MAX);
            if let Some(src) = self.config.get(start..) {
                let n = src.len().min(data.len());
                data[..n].copy_from_slice(&src[..n]);
            }
            return;
        }
        let Ok(out) = <&mut [u8; 4]>::try_from(data) else {
            debug!(offset, "virtio-mmio: register read not 32 bits wide");
            return;
        };
        let q = self.queue.state();
        let value = match u32::try_from(offset).unwrap_or(u32::MAX) {
            VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device_id,
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => u32::from(q.max_size),
            VIRTIO_MMIO_QUEUE_READY => u32::from(q.ready),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt_status,
            VIRTIO_MMIO_STATUS => self.status,
            VIRTIO_MMIO_CONFIG_GENERATION => 0,
            _ => 0,
        };
        *out = value.to_le_bytes();
    }

    /// A driver's write of `data` at `offset` in the device's window; what it asks of the
    /// device. Writes the spec does not allow at this point (queue set-up after the queue
    /// is ready, features after FEATURES_OK, anything not 32 bits wide) are ignored.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> MmioEvent {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            debug!(offset, "virtio-mmio: write not 32 bits wide ignored");
            return MmioEvent::None;
        };
        let v = u32::from_le_bytes(bytes);
        let features_open = self.status & VIRTIO_CONFIG_S_DRIVER != 0
            && self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0;
        let queue_open = !self.queue.ready() && self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0;
        match u32::try_from(offset).unwrap_or(u32::MAX) {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES if features_open => {
                let shift = match self.driver_features_sel {
                    0 => 0,
                    1 => 32,
                    _ => return MmioEvent::None,
                };
                let word = (u64::from(v) << shift) & self.device_features;
                self.driver_features = (self.driver_features & !(0xffff_ffffu64 << shift)) | word;
            }
            VIRTIO_MMIO_QUEUE_SEL => {
                if v != 0 {
                    debug!(queue = v, "virtio-mmio: the device has one queue");
                }
            }
            VIRTIO_MMIO_QUEUE_NUM if queue_open => {
                self.queue.set_size(u16::try_from(v).unwrap_or(0));
            }
            VIRTIO_MMIO_QUEUE_DESC_LOW if queue_open => {
                self.queue.set_desc_table_address(Some(v), None);
            }
            VIRTIO_MMIO_QUEUE_DESC_HIGH if queue_open => {
                self.queue.set_desc_table_address(None, Some(v));
            }
            VIRTIO_MMIO_QUEUE_AVAIL_LOW if queue_open => {
                self.queue.set_avail_ring_address(Some(v), None);
            }
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH if queue_open => {
                self.queue.set_avail_ring_address(None, Some(v));
            }
            VIRTIO_MMIO_QUEUE_USED_LOW if queue_open => {
                self.queue.set_used_ring_address(Some(v), None);
            }
            VIRTIO_MMIO_QUEUE_USED_HIGH if queue_open => {
                self.queue.set_used_ring_address(None, Some(v));
            }
            VIRTIO_MMIO_QUEUE_READY => {
                // Ready only once the queue is valid; 0 takes it down.
                let ready = v == 1 && configured(&self.queue);
                self.queue.set_ready(ready);
            }
            VIRTIO_MMIO_QUEUE_NOTIFY => {
                if v == 0 && self.driver_ok() && self.queue.ready() {
                    return MmioEvent::Notify;
                }
                debug!(queue = v, "virtio-mmio: notify ignored (device not live)");
            }
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt_status &= !v,
            VIRTIO_MMIO_STATUS => return self.set_status(v),
            _ => debug!(
                offset,
                "virtio-mmio: write to a read-only or unknown register"
            ),
        }
        MmioEvent::None
    }

    /// The status register's write: 0 resets; FEATURES_OK sticks only when the driver
    /// accepted VERSION_1 (a legacy driver is refused by leaving it clear, as the spec has
    /// it); bits are otherwise only ever added.
    fn set_status(&mut self, v: u32) -> MmioEvent {
        if v == 0 {
            self.reset();
            return MmioEvent::Reset;
        }
        let mut v = v | self.status;
        let version_1 = self.driver_features & (1u64 << VIRTIO_F_VERSION_1) != 0;
        if v & VIRTIO_CONFIG_S_FEATURES_OK != 0 && !version_1 {
            v &= !VIRTIO_CONFIG_S_FEATURES_OK;
        }
        let wants = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
        if v & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && (v & VIRTIO_CONFIG_S_FEATURES_OK == 0 || v & wants != wants)
        {
            // DRIVER_OK before the steps it needs: the driver failed.
            v |= VIRTIO_CONFIG_S_FAILED;
        }
        self.status = v;
        MmioEvent::None
    }

    fn reset(&mut self) {
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.status = 0;
        self.interrupt_status = 0;
        self.queue.reset();
    }
}

/// Whether the driver set the queue up (`Queue::is_valid` needs guest memory; at set-up
/// the transport checks what it can without it, and the device checks the rest against
/// memory when it serves the queue).
fn configured(q: &Queue) -> bool {
    let s = q.state();
    s.size != 0 && s.size.is_power_of_two() && s.size <= s.max_size && s.avail_ring != 0
}
