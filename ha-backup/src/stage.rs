//! The *stage* stage: epoch frames into [`Staging`], timed, until a trailer verifies.
//!
//! Nothing here touches the committed image; a rejected epoch leaves it as it was.

use std::time::Instant;

use ha_wire::stream::{StagedEpoch, Staging, StreamError};

use crate::config::Config;
use ha_wire::frame::Frame;

/// An epoch whose trailer verified, ready for [`crate::commit::Committed::apply`].
#[derive(Debug)]
pub struct Verified {
    /// The staged epoch.
    pub staged: StagedEpoch,
    /// Header received → trailer verified, in microseconds.
    pub stage_us: u64,
    /// When the trailer verified.
    pub at: Instant,
}

/// Stages one epoch at a time for a session.
#[derive(Debug)]
pub struct Stager {
    staging: Staging,
    started: Option<Instant>,
}

impl Stager {
    /// A stager for the session `cfg` describes, expecting `next_epoch` first.
    pub fn new(cfg: &Config, next_epoch: u64) -> Self {
        Self {
            staging: Staging::new(cfg.mode, cfg.block_size, cfg.pages(), next_epoch)
                .with_disk(cfg.disk_size),
            started: None,
        }
    }

    /// The epoch expected next.
    pub fn next_epoch(&self) -> u64 {
        self.staging.next_epoch()
    }

    /// Take one frame. `image` is the committed image (records reference it), `replica`
    /// the disk replica as of the last commit (disk deltas reference it). On error the
    /// partial epoch is already discarded.
    pub fn push(
        &mut self,
        frame: &Frame,
        image: &[u8],
        replica: Option<&dyn ha_wire::disksync::ReadAt>,
    ) -> Result<Option<Verified>, StreamError> {
        if !self.staging.in_progress() {
            self.started = Some(Instant::now());
        }
        let staged =
            self.staging
                .push_with_replica(frame.ty, frame.body(), &frame.raw, image, replica)?;
        Ok(staged.map(|staged| {
            let at = Instant::now();
            let stage_us = self
                .started
                .take()
                .map(|s| micros(at.duration_since(s)))
                .unwrap_or(0);
            Verified {
                staged,
                stage_us,
                at,
            }
        }))
    }

    /// Drop a partly received epoch; true if there was one.
    pub fn discard(&mut self) -> bool {
        let had = self.staging.in_progress();
        self.staging.discard();
        self.started = None;
        had
    }
}

/// A duration in whole microseconds (saturating).
pub fn micros(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}
