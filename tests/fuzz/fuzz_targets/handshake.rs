//! Fuzz the backup's session opening on a keyed link: the Noise responder
//! (`secure::Responder`) on raw bytes from a peer, and — after a real handshake made by
//! the harness — the decrypting stream, `frame::split_frame` and `Hello::parse` /
//! `check_against` on sealed bytes, optionally with a flipped ciphertext bit.
//! Invariants: see `castor_fuzz::checks::check_handshake`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    castor_fuzz::checks::check_handshake(data);
});
