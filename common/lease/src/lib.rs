//! `ha-lease`: who may run a protected guest, decided by a lease in etcd.
//!
//! Each protected guest has a key in etcd. Whichever side runs the guest holds that key
//! under a lease with a short TTL and keeps the lease alive while it runs; the key goes
//! away with the lease. A backup activates only once it holds the key (the primary's lease
//! expired or was revoked); a primary that cannot keep its lease alive stops its guest
//! and holds its output before the TTL can run out in etcd (self-fencing), and goes on
//! only if a later keep-alive finds the same lease alive — then nobody else can have
//! taken the key. A majority of etcd members agrees on all of it, so a partition cannot
//! leave both sides holding the key.
//!
//! | module | what |
//! |---|---|
//! | [`config`] | where etcd is, the key, the TTL and the fencing margin, TLS with client certificates |
//! | [`lease`] | claiming the key ([`lease::claim`], [`lease::wait_claim`]) and the [`lease::Lease`] kept alive on its own thread |
//!
//! The daemons are threads, not tasks: a [`lease::Lease`] runs a small Tokio runtime on a
//! thread of its own and answers [`lease::Lease::held_until`] from memory, so the epoch
//! loop can ask at every checkpoint for free.

pub mod config;
pub mod lease;

pub use config::{LeaseConfig, LeaseOptions, TlsFiles};
pub use lease::{Claim, Lease, LeaseError, claim, list, stale_key, wait_claim};

/// The key under which whoever runs the guest with key `key` publishes its status (for
/// the cluster view); it is put under the runner's lease and goes with it.
pub fn status_key(key: &str) -> String {
    format!("{key}/status")
}

/// This host's name (empty if it cannot be read), as statuses and holders show it.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

/// Who holds a lease: the daemon, this host's name and the process id, e.g.
/// `ha-primary on p1 (pid 4242)`.
pub fn holder(daemon: &str) -> String {
    format!("{daemon} on {} (pid {})", hostname(), std::process::id())
}
