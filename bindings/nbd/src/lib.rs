//! `ha-nbd`: Castor's NBD server, the disk of a guest whose block device the kernel
//! provides (a Xen domU's `phy:/dev/nbdN` through blkback), replicated per epoch like a
//! KVM guest's virtio-blk disk.
//!
//! | module | what |
//! |---|---|
//! | [`proto`] | the NBD protocol, server side: fixed newstyle handshake, transmission with simple replies, strict about bad requests |
//! | [`export`] | [`Image`]: the image file, its write log and the checkpoint gate; [`Server`]: the Unix socket; [`ServedDisk`]: the `Disk` capability |
//! | [`attach`] | [`Device`]: `/dev/nbdN` connected to the socket by `nbd-client`, detached on drop |
//! | [`domain`] | [`ServedDomain`]: a domain with its served disk |
//!
//! docs/XEN.md says how to run a protected domU with a disk.

#![warn(missing_docs)]

pub mod attach;
pub mod domain;
pub mod export;
pub mod proto;

pub use attach::{AttachError, Device};
pub use domain::ServedDomain;
pub use export::{ExportError, Image, ServedDisk, Server};

/// The export's name: what `nbd-client -N` asks for.
pub const EXPORT_NAME: &str = "castor";

#[cfg(test)]
mod tests;
