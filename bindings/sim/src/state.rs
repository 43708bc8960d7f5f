//! The simulated vCPU's saved state: the guest's memory size and its pacing clock, in the
//! saved-state envelope (`ha_guest::envelope`) of format [`FORMAT`] (`b"CSIMVCPU"`).
//! Guest memory holds the rest (every workload register is in the status page at a unit
//! boundary).
//!
//! The pacing clock is monotonic and process-local, so it is saved as an age: a restored
//! guest's next unit waits only for what was left of the interval at the save.

use ha_guest::envelope::{self, EnvelopeError, Format};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The envelope format of a sim state blob (version 2: the common envelope).
pub const FORMAT: Format = Format {
    magic: *b"CSIMVCPU",
    version: 2,
};

/// Why a saved state blob was rejected.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Refused by its envelope (another format, another version, cut, altered), or it
    /// cannot be encoded.
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    /// The memory size is not a positive multiple of the page size.
    #[error("memory size {0:#x} is not a positive multiple of 4096")]
    MemorySize(u64),
}

/// What [`crate::SimDomain::save_state`] records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SavedState {
    /// Guest memory size in bytes.
    pub memory_size: u64,
    /// Age of the pacing timestamp at the save, if the guest had one.
    pub pacing_age: Option<Duration>,
}

impl SavedState {
    /// Seal in the envelope of [`FORMAT`].
    pub(crate) fn encode(&self) -> Result<Vec<u8>, StateError> {
        Ok(envelope::seal(FORMAT, self)?)
    }

    /// Open and check a blob made by [`SavedState::encode`].
    pub(crate) fn decode(b: &[u8]) -> Result<Self, StateError> {
        let s: Self = envelope::open(FORMAT, b)?;
        if s.memory_size == 0 || !s.memory_size.is_multiple_of(ha_codec::PAGE_SIZE as u64) {
            return Err(StateError::MemorySize(s.memory_size));
        }
        Ok(s)
    }
}
