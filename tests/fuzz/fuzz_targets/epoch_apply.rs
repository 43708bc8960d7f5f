//! Fuzz the backup's epoch path: `frame::split_frame`, `Staging::push` and
//! `StagedEpoch::commit` for a 16-page fgbi guest. The first byte picks a raw frame
//! stream or records the harness frames into correctly digested epochs.
//! Invariants: see `castor_fuzz::checks::check_epoch`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    castor_fuzz::checks::check_epoch(data);
});
