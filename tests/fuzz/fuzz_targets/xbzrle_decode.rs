//! Fuzz `ha_codec::xbzrle::decode`: arbitrary bytes as a delta, applied to a whole page
//! and to shorter ones. Invariants: see `castor_fuzz::checks::check_xbzrle`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    castor_fuzz::checks::check_xbzrle(data);
});
