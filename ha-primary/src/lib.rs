//! `ha-primary`: the primary side of a Castor pair.
//!
//! One module per stage of the checkpoint path:
//!
//! | module | stage |
//! |---|---|
//! | [`disksync`] | the initial sync of the guest's disk: only the blocks the backup's replica lacks |
//! | [`harvest`] | pause, drain output, harvest dirty pages, copy, save state, resume |
//! | [`cow`] | copy-on-write checkpoints: which path each checkpoint's pages take |
//! | [`encode`] | the encoder thread: identify, share, encode, frame an epoch |
//! | [`teleport`] | page-cache teleportation: pages equal to a block of the backup's disk replica |
//! | [`link`] | send: the TCP link to the backup, heartbeats, acks |
//! | [`hold`] | output commit: output held until its checkpoint is acknowledged, then released |
//! | [`engine`] | the epoch loop tying them together, and the backup-lost policy |
//! | [`stall`] | noticing that this process stood still long enough to be replaced |
//! | [`report`] | per-epoch CSV statistics and JSON-lines events |
//! | [`shape`] | link shaping: a token bucket holding the sender to a link rate |
//! | [`metrics`] | Prometheus metrics and the `GET /metrics` server |
//! | [`cluster`] | the cluster view: every protected guest recorded in etcd |
//! | [`swap`] | the role swap after a planned switchover: this process becomes the backup |
//! | [`cli`] | the options: command line and `--config` file |

pub mod cli;
pub mod cluster;
pub mod cow;
pub mod disksync;
pub mod encode;
pub mod engine;
pub mod harvest;
pub mod hold;
pub mod link;
pub mod metrics;
pub mod report;
pub mod shape;
pub mod stall;
pub mod swap;
pub mod teleport;
