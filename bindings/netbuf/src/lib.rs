//! Network output commit for a guest whose packets leave through a host interface (a Xen
//! guest's vif in dom0): its output is held in the kernel behind an IFB device with a
//! `plug` qdisc and released per checkpoint ([`buffer`]), set up and torn down over
//! rtnetlink ([`nl`]); and after a failover, the guest announced on the bridge with a
//! gratuitous ARP ([`announce`]).
//!
//! | module | what |
//! |---|---|
//! | [`buffer`] | [`NetBuffer`]: set-up, `TCQ_PLUG_BUFFER` / `RELEASE_ONE` / `RELEASE_INDEFINITE`, teardown; the kernel probe |
//! | [`nl`] | a synchronous rtnetlink client (netlink-sys + netlink-packet-route) |
//! | [`announce`] | the gratuitous ARP |
//!
//! docs/XEN.md describes how to set it up on a pair of hosts.

pub mod announce;
pub mod buffer;
pub mod nl;

pub use buffer::{Config, NetBuffer, NetbufError};
