//! `ha-backup`: receiver, staging, atomic commit, failure detection and activation.
//! The receiver arrives with the replication work; this crate holds its place in the
//! workspace.
