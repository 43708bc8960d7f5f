//! `ha-guest`: the seam between the checkpoint engine and a hypervisor.
//!
//! The engine and the backup see a guest only through [`domain::Domain`] and the
//! capabilities a domain hands out; the backends in `bindings/` implement it. What every
//! guest has is in the trait; what only some guests have (an output channel, a status
//! probe, and next a disk and a network interface) is a capability a domain returns or
//! not, so a backend without one says so in its type.
//!
//! | module | what |
//! |---|---|
//! | [`domain`] | `Domain`, its capabilities, `DomainFactory`, `GuestSpec` |
//! | [`cow`] | copy-on-write checkpoints: the `CowMemory` capability and its pending copy |
//! | [`backend`] | which hypervisor backend runs a guest (`BackendKind`) |
//! | [`diskimage`] | opening a guest's disk image file, its size checked |
//! | [`envelope`] | the one envelope of every backend's saved state (magic, version, checksum) |
//! | [`image`] | a memory image a backend can take over as a guest's RAM without a copy |
//! | `testing` | a stub guest for tests (`test-support` feature) |

pub mod backend;
pub mod cow;
pub mod diskimage;
pub mod domain;
pub mod envelope;
pub mod image;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;
