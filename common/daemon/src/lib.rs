//! `ha-daemon`: the plumbing both daemons (`ha-primary`, `ha-backup`) share, so that they
//! behave alike for an operator: the same units, bounds, files, metrics and messages.
//!
//! | module | what |
//! |---|---|
//! | [`config`] | the command line with a `--config` TOML file merged under it |
//! | [`diskfile`] | a disk image or replica file: created empty at `--disk-size` when missing, its size checked |
//! | [`keys`] | the pair key or `--insecure`, and `keygen` |
//! | [`signal`] | SIGTERM and SIGINT as a stop flag |
//! | [`logging`] | the daemons' log lines on stderr, `RUST_LOG` for the level |
//! | [`units`] | sizes and durations on command lines and in config files |
//! | [`limits`] | the bounds both daemons put on intervals, timeouts and sizes |
//! | [`logfile`] | a daemon's own files, opened under an exclusive lock |
//! | [`events`] | the JSON-lines event log |
//! | [`serve`] | the metrics HTTP endpoint |
//! | [`port_file`] | the address a daemon bound, in a file |
//! | [`metrics`] | the registry, state gauge, exposition and serving of both daemons' metrics; each daemon adds its own families |
//! | `testing` | a client of the metrics endpoint for tests (`test-support` feature) |

pub mod config;
pub mod diskfile;
pub mod events;
pub mod keys;
pub mod limits;
pub mod logfile;
pub mod logging;
pub mod metrics;
pub mod port_file;
pub mod serve;
pub mod signal;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;
pub mod units;

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
