//! Shared code of Castor's fuzz targets: the invariants each target checks
//! ([`checks`]) and the seed inputs made by the real encoders ([`seeds`]).
//!
//! Both modules are also included, with `#[path]`, by `common/wire/tests/fuzz_corpus.rs`,
//! which replays the committed corpus under `cargo test` on stable Rust.

pub mod checks;
pub mod seeds;
