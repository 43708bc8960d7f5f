//! `ha-virtio`: the virtio devices Castor's own VMM gives its guests, on the rust-vmm
//! crates (`virtio-queue` for the rings, `virtio-bindings` for the constants, `vm-memory`
//! for every access to guest memory).
//!
//! | module | what |
//! |---|---|
//! | [`mmio`] | the virtio-mmio transport: registers, feature negotiation, the virtqueue |
//! | [`blk`] | a virtio-blk disk over a raw image file, its completed writes logged for the checkpoint |
//!
//! A device is driven by the backend's vCPU loop: an MMIO exit in the device's window
//! becomes [`blk::Blk::mmio_read`] or [`blk::Blk::mmio_write`], and a doorbell serves the
//! queue before the exit returns. Guest memory is any `vm_memory::GuestMemory`; with the
//! KVM backend's `AtomicBitmap` the device's own writes into the guest (read data, used
//! ring, status bytes) are in the dirty set like the vCPU's.

pub mod blk;
pub mod mmio;

#[cfg(test)]
mod tests;
