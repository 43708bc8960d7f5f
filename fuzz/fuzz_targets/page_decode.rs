//! Fuzz `ha_common::codec::decode_page`: three header bytes choose the encoding, block
//! size and page; the rest is the payload, decoded against a four-page view.
//! Invariants: see `ha_common_fuzz::checks::check_page_decode`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ha_common_fuzz::checks::check_page_decode(data);
});
