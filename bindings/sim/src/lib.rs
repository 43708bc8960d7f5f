//! `ha-sim`: Castor's simulated guest backend, behind the `Domain` seam.
//!
//! A [`SimDomain`] keeps guest memory in the process (atomic words, so the engine can read
//! while the guest writes) and runs one of the built-in workloads of `docs/GUESTS.md` on a
//! Rust thread, its single vCPU. It follows the same guest ABI as the KVM backend
//! (`ha_workloads::guest_abi`): params and status pages, an output ring drained on a
//! doorbell (here a direct call) and at every checkpoint, and pacing by a monotonic clock.
//! Dirty tracking is in software: every guest and VMM write sets its page's bit in an
//! atomic bitmap that [`Domain::harvest_dirty`](ha_guest::domain::Domain::harvest_dirty)
//! swaps out.
//!
//! ```no_run
//! use ha_guest::domain::{DomainFactory, GuestSpec};
//! use ha_workloads::guest_abi::{GuestParams, HEAP_GPA, Workload};
//!
//! let spec = GuestSpec {
//!     memory_size: 4 << 20,
//!     params: GuestParams {
//!         workload: Workload::Kv,
//!         seed: 1,
//!         heap_gpa: HEAP_GPA,
//!         heap_size: 2 << 20,
//!         rate: 0,
//!         tsc_khz: 0,
//!         output_every: 16,
//!         doorbell_every: 8,
//!         disk_size: 0,
//!     },
//!     devices: Default::default(),
//! };
//! let mut guest = ha_sim::SimFactory::new().create(&spec)?;
//! guest.resume()?;
//! guest.pause()?;
//! println!("{:?}", guest.status()?);
//! # Ok::<(), ha_guest::domain::DomainError>(())
//! ```

mod disk;
mod domain;
mod memory;
mod ring;
mod state;
mod workload;

#[cfg(test)]
mod tests;

pub use domain::{SimDomain, SimError, SimFactory};
pub use ring::RingError;
pub use state::{FORMAT as STATE_FORMAT, StateError};
pub use workload::GuestError;
