//! `ha-wire`: everything that crosses the link between primary and backup, and the
//! output that crosses to the world.
//!
//! | module | what |
//! |---|---|
//! | [`disksync`] | the initial synchronisation of a disk replica: fingerprints coarse to fine, the blocks that differ |
//! | [`frame`] | the frame: every type byte ([`frame::FrameType`]), writing one, and the one reader both daemons use |
//! | [`secure`] | the encrypted, authenticated channel (Noise with a pre-shared pair key) |
//! | [`session`] | handshake, acks, heartbeats and control messages between the daemons |
//! | [`stream`] | the epoch stream format, the writer (send) and the staging area (stage, commit) |
//! | [`disk`] | the epoch stream's disk records: encoding a checkpoint's disk writes, staging them |
//! | [`output`] | released guest output: record frames, the ack log, the consumer's check |

pub mod disk;
pub mod disksync;
pub mod frame;
pub mod output;
pub mod secure;
pub mod session;
pub mod stream;
