//! `ha-primary`: the epoch engine (pause, harvest, copy, resume; encode; send; output
//! commit). The engine arrives with the replication work; this crate holds its place in
//! the workspace.
