//! `ha-bench`: Castor's benchmark library. The `ha-bench` binary is its command line.
//!
//! | module | what |
//! |---|---|
//! | [`cases`] | the generated page-pair cases of `shared/bench/PAGE-CASES.md` |
//! | [`pgpairs`] | the reader of page pairs captured from real guests |
//! | [`codec`] | the codec benchmark |
//! | [`drill`] | the failover drill |

pub mod cases;
pub mod codec;
pub mod drill;
pub mod pgpairs;
