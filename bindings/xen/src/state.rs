//! The state Castor saves of a Xen domain at each checkpoint, as versioned bytes: the
//! [`SavedState`] in the saved-state envelope (`ha_guest::envelope`) of format
//! [`FORMAT`] (`b"CASTXEN1"`).
//!
//! It is what Xen's own migration stream carries besides memory for an x86 HVM/PVH guest:
//! the HVM context blob (every vCPU's registers, the LAPICs, the platform timers, exactly as
//! `XEN_DOMCTL_gethvmcontext` returns it), the HVM params the guest depends on, and the TSC
//! info. Kept independent of the `xen` feature so it can be decoded (and tested) anywhere.

use ha_guest::envelope::{self, EnvelopeError, Format};
use serde::{Deserialize, Serialize};

/// Frames per window: Castor's linear image of a Xen guest is whole 2 MiB windows of its
/// gfn space (see [`SavedState::windows`]; the engine wants a multiple of 2 MiB), and a
/// window is what `XenDomain` maps at a time for reads.
pub const WINDOW: u64 = 512;

/// The gfn of linear page `page` of the image made of `windows` (`u64::MAX` past its end).
pub fn gfn_of(windows: &[u64], page: u64) -> u64 {
    windows
        .get(usize::try_from(page / WINDOW).unwrap_or(usize::MAX))
        .map_or(u64::MAX, |w| w * WINDOW + page % WINDOW)
}

/// Bytes of the linear image made of `windows`.
pub fn image_len(windows: &[u64]) -> u64 {
    windows.len() as u64 * WINDOW * ha_codec::PAGE_SIZE as u64
}

/// The envelope format of a Xen state blob (version 3: the common envelope with its
/// length and checksum).
pub const FORMAT: Format = Format {
    magic: *b"CASTXEN1",
    version: 3,
};

/// The HVM params saved with each checkpoint: the ones Xen's own save code
/// (`xg_sr_save_x86_hvm.c`) writes into a migration stream. Zero values are not saved.
pub const SAVED_PARAMS: [u32; 16] = [
    1,  // HVM_PARAM_STORE_PFN
    5,  // HVM_PARAM_IOREQ_PFN
    6,  // HVM_PARAM_BUFIOREQ_PFN
    27, // HVM_PARAM_PAGING_RING_PFN
    28, // HVM_PARAM_MONITOR_RING_PFN
    29, // HVM_PARAM_SHARING_RING_PFN
    37, // HVM_PARAM_VM86_TSS_SIZED
    17, // HVM_PARAM_CONSOLE_PFN
    19, // HVM_PARAM_ACPI_IOPORTS_LOCATION
    9,  // HVM_PARAM_VIRIDIAN
    12, // HVM_PARAM_IDENT_PT
    34, // HVM_PARAM_VM_GENERATION_ID_ADDR
    32, // HVM_PARAM_IOREQ_SERVER_PFN
    33, // HVM_PARAM_NR_IOREQ_SERVER_PAGES
    36, // HVM_PARAM_X87_FIP_WIDTH
    38, // HVM_PARAM_MCA_CAP
];

/// Errors encoding or decoding a state blob.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The blob is refused by its envelope, or the state cannot be encoded.
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
}

/// `XEN_DOMCTL_gettscinfo`: how the guest's TSC is virtualised.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TscInfo {
    /// `tsc_mode` (0 default, 1 always emulate, 2 native, 3 no-rdtscp).
    pub mode: u32,
    /// Nanoseconds elapsed (the guest's notion of time at the save).
    pub elapsed_nsec: u64,
    /// Guest TSC frequency in kHz.
    pub khz: u32,
    /// Incarnation (bumped on every migration).
    pub incarnation: u32,
}

/// What is saved of a paused Xen domain at a checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedState {
    /// The domain the state was taken from (for logs).
    pub domid: u32,
    /// Highest guest frame number in the p2m at the save.
    pub max_gpfn: u64,
    /// The 2 MiB windows (gfn / 512) that make up Castor's linear memory image, in order:
    /// linear page `i` is gfn `windows[i / 512] * 512 + i % 512`.
    pub windows: Vec<u64>,
    /// The gfns inside those windows that were not populated at the attach (they read as
    /// zeros in the image and are left unpopulated in a restored domain).
    pub holes: Vec<u64>,
    /// Whether the domain was suspended cooperatively (the guest called
    /// `SCHEDOP_shutdown(SHUTDOWN_suspend)`), so that a restored copy resumes as after a
    /// migration; false for a plain pause.
    pub suspended: bool,
    /// The HVM context blob (`xc_domain_hvm_getcontext`).
    pub hvm_context: Vec<u8>,
    /// (param, value) for every non-zero param of [`SAVED_PARAMS`].
    pub params: Vec<(u32, u64)>,
    /// The TSC info.
    pub tsc: TscInfo,
}

impl SavedState {
    /// Seal in the envelope of [`FORMAT`].
    pub fn encode(&self) -> Result<Vec<u8>, StateError> {
        Ok(envelope::seal(FORMAT, self)?)
    }

    /// Open a blob made by [`SavedState::encode`].
    pub fn decode(blob: &[u8]) -> Result<Self, StateError> {
        Ok(envelope::open(FORMAT, blob)?)
    }

    /// The value of HVM param `param`, if saved.
    pub fn param(&self, param: u32) -> Option<u64> {
        self.params
            .iter()
            .find(|(p, _)| *p == param)
            .map(|(_, v)| *v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let s = SavedState {
            domid: 3,
            max_gpfn: 0xfefff,
            windows: vec![0, 1, 0x7f7],
            holes: vec![0x7f7 * 512 + 3],
            suspended: false,
            hvm_context: vec![1, 2, 3, 4],
            params: vec![(1, 0xfeffc), (17, 0xfefff)],
            tsc: TscInfo {
                mode: 2,
                elapsed_nsec: 5,
                khz: 2_000_000,
                incarnation: 1,
            },
        };
        let blob = s.encode().expect("encode");
        assert_eq!(&blob[..8], b"CASTXEN1");
        let back = SavedState::decode(&blob).expect("decode");
        assert_eq!(back, s);
        assert_eq!(back.param(17), Some(0xfefff));
        assert_eq!(back.param(5), None);
        // Another backend's blob (the same body under the KVM format's magic).
        let kvm = Format {
            magic: *b"CASTKVM1",
            ..FORMAT
        };
        assert!(matches!(
            SavedState::decode(&envelope::seal(kvm, &s).expect("seal")),
            Err(StateError::Envelope(EnvelopeError::Magic { .. }))
        ));
        assert!(matches!(
            SavedState::decode(b"CAST"),
            Err(StateError::Envelope(EnvelopeError::Short { got: 4 }))
        ));
        let mut cut = blob.clone();
        cut.truncate(blob.len() - 3);
        assert!(matches!(
            SavedState::decode(&cut),
            Err(StateError::Envelope(EnvelopeError::Length { .. }))
        ));
    }
}
