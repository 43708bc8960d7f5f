//! Fuzz `ha_codec::codec::decode_page`: three header bytes choose the encoding, block
//! size and page; the rest is the payload, decoded against a four-page view.
//! Invariants: see `castor_fuzz::checks::check_page_decode`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    castor_fuzz::checks::check_page_decode(data);
});
