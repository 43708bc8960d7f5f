//! The simulated vCPU's saved state: a small versioned blob. Guest memory holds the rest
//! (every workload register is in the status page at a unit boundary).
//!
//! Layout, little-endian, [`STATE_LEN`] bytes:
//!
//! ```text
//!  0  u64  STATE_MAGIC ("CSIMVCPU")
//!  8  u32  STATE_VERSION
//! 12  u32  flags: bit 0 = a pacing timestamp is present
//! 16  u64  guest memory size in bytes
//! 24  u64  pacing: nanoseconds from the last paced unit start to the save (0 if absent)
//! 32  u64  FNV-1a 64 of bytes 0..32
//! ```
//!
//! The pacing clock is monotonic and process-local, so it is saved as an age: a restored
//! guest's next unit waits only for what was left of the interval at the save.

use std::time::Duration;

/// Magic number at the start of a saved sim state.
pub const STATE_MAGIC: u64 = u64::from_le_bytes(*b"CSIMVCPU");
/// Version of the saved sim state format.
pub const STATE_VERSION: u32 = 1;
/// Length in bytes of a saved sim state.
pub const STATE_LEN: usize = 40;

const FLAG_PACING: u32 = 1;

/// Why a saved state blob was rejected.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Wrong length.
    #[error("state is {got} bytes, expected {STATE_LEN}")]
    Length {
        /// Bytes given.
        got: usize,
    },
    /// Not a sim state.
    #[error("bad magic {0:#018x}")]
    Magic(u64),
    /// A format version this build does not read.
    #[error("unsupported state version {0} (this build reads {STATE_VERSION})")]
    Version(u32),
    /// Unknown flag bits.
    #[error("unknown flags {0:#x}")]
    Flags(u32),
    /// The integrity check does not match.
    #[error("integrity check mismatch")]
    Check,
    /// The memory size is not a positive multiple of the page size.
    #[error("memory size {0:#x} is not a positive multiple of 4096")]
    MemorySize(u64),
}

/// What [`crate::SimDomain::save_state`] records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SavedState {
    /// Guest memory size in bytes.
    pub memory_size: u64,
    /// Age of the pacing timestamp at the save, if the guest had one.
    pub pacing_age: Option<Duration>,
}

impl SavedState {
    /// Serialize.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(STATE_LEN);
        b.extend_from_slice(&STATE_MAGIC.to_le_bytes());
        b.extend_from_slice(&STATE_VERSION.to_le_bytes());
        let flags = if self.pacing_age.is_some() {
            FLAG_PACING
        } else {
            0
        };
        b.extend_from_slice(&flags.to_le_bytes());
        b.extend_from_slice(&self.memory_size.to_le_bytes());
        let age = self
            .pacing_age
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        b.extend_from_slice(&age.to_le_bytes());
        let check = fnv1a(&b);
        b.extend_from_slice(&check.to_le_bytes());
        b
    }

    /// Parse and check a blob made by [`SavedState::encode`].
    pub(crate) fn decode(b: &[u8]) -> Result<Self, StateError> {
        if b.len() != STATE_LEN {
            return Err(StateError::Length { got: b.len() });
        }
        let u64_at = |o: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(w)
        };
        let u32_at = |o: usize| {
            let mut w = [0u8; 4];
            w.copy_from_slice(&b[o..o + 4]);
            u32::from_le_bytes(w)
        };
        let magic = u64_at(0);
        if magic != STATE_MAGIC {
            return Err(StateError::Magic(magic));
        }
        let version = u32_at(8);
        if version != STATE_VERSION {
            return Err(StateError::Version(version));
        }
        if fnv1a(&b[..32]) != u64_at(32) {
            return Err(StateError::Check);
        }
        let flags = u32_at(12);
        if flags & !FLAG_PACING != 0 {
            return Err(StateError::Flags(flags));
        }
        let memory_size = u64_at(16);
        if memory_size == 0 || !memory_size.is_multiple_of(ha_common::PAGE_SIZE as u64) {
            return Err(StateError::MemorySize(memory_size));
        }
        let pacing_age = (flags & FLAG_PACING != 0).then(|| Duration::from_nanos(u64_at(24)));
        Ok(Self {
            memory_size,
            pacing_age,
        })
    }
}

/// FNV-1a, 64-bit.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
