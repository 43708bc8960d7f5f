//! `ha-common`: the core every Castor crate shares.
//!
//! One module per stage of the checkpoint data path, plus the seam to the hypervisor:
//!
//! | module | stage |
//! |---|---|
//! | [`block`] | block geometry and changed-block identification (identify) |
//! | [`xbzrle`] | XOR + run-length delta in QEMU's XBZRLE format (encode) |
//! | [`hashes`] | per-block fingerprints of what the backup holds (identify) |
//! | [`share`] | identical-block sharing through a hash index (share) |
//! | [`cache`] | LRU cache of last-sent page content (encode) |
//! | [`codec`] | hybrid per-page encoding and decoding (encode) |
//! | [`serve`] | the metrics HTTP endpoint and port files |
//! | [`metrics`] | what both daemons' Prometheus metrics share: the state gauge, exposition, serving |
//! | [`session`] | handshake, acks and heartbeats between primary and backup |
//! | [`secure`] | the encrypted, authenticated channel (Noise with a pre-shared pair key) |
//! | [`stream`] | the epoch stream format and the atomic applier (send, stage, commit) |
//! | [`output`] | releasing guest output, the ack log, and the consumer's check |
//! | [`logfile`] | a daemon's own files, opened under an exclusive lock |
//! | [`domain`] | the `Domain` trait: the hypervisor seam |
//! | [`envelope`] | the one envelope of every backend's saved state (magic, version, checksum) |
//! | [`backend`] | which hypervisor backend runs a guest (`BackendKind`) |
//! | [`guest_abi`] | the layout shared by built-in workload guests and their VMMs |
//! | [`units`] | sizes and durations on command lines |
//! | [`limits`] | the bounds both daemons put on intervals, timeouts and sizes |
//! | [`model`] | the workloads' one reference model: a unit of work over any guest memory |
//! | [`web`] | the `web` workload's reference semantics (layout, document root, a request) |
//! | [`bitmap`] | page bitmaps for dirty tracking |

pub mod backend;
pub mod bitmap;
pub mod block;
pub mod cache;
pub mod codec;
pub mod domain;
pub mod envelope;
pub mod guest_abi;
pub mod hashes;
pub mod limits;
pub mod logfile;
pub mod metrics;
pub mod model;
pub mod output;
pub mod secure;
pub mod serve;
pub mod session;
pub mod share;
pub mod stream;
pub mod units;
pub mod varint;
pub mod web;
pub mod xbzrle;

/// Guest page size in bytes. Castor works in 4 KiB pages throughout.
pub const PAGE_SIZE: usize = 4096;

/// An error and its sources, joined with ": " (for one-line messages to operators).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
