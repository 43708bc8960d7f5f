//! The bounds both daemons put on the intervals, timeouts, counts and sizes operators give
//! them, so that `ha-primary` and `ha-backup` refuse the same values with the same words.
//!
//! Every check takes a value already parsed (by [`crate::units`]) and returns it, or a
//! [`LimitError`] that names the option and the rule it breaks. The daemons run them on the
//! command line and on the `--config` file alike.

use ha_codec::PAGE_SIZE;
use ha_codec::block::BlockSize;
use ha_codec::codec::Mode;
use std::time::Duration;

/// The shortest epoch interval: 1 ms. A checkpoint costs a pause, a harvest of the dirty
/// log and a frame on the link; below a millisecond the guest would spend its time paused
/// and the primary would burn a core on checkpoints (an interval of 0 took thousands a
/// second).
pub const MIN_INTERVAL: Duration = Duration::from_millis(1);

/// The longest epoch interval: 60 s. Output is held for a whole epoch until its ack, so a
/// longer interval means clients wait minutes for every answer; it is a typo, not a policy.
pub const MAX_INTERVAL: Duration = Duration::from_secs(60);

/// The shortest heartbeat and the shortest timeout (ack, detection, Xen suspend): 1 ms.
/// Zero would mean "heartbeat without pause" or "give up at once".
pub const MIN_TIMEOUT: Duration = Duration::from_millis(1);

/// Guest memory is a positive multiple of this: 2 MiB. The KVM backend maps guest memory
/// with 2 MiB pages and refuses anything else (`ha_kvm` `guest::validate` and its restore),
/// and a Xen guest's image is whole 2 MiB windows of its gfn space; the simulated guest
/// follows the same rule so that a pair configured for it works on the others.
pub const MEMORY_ALIGN: u64 = 2 << 20;

/// A value an option does not accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// A duration below its option's minimum.
    #[error("--{option} {value:?} is below the minimum of {min:?}")]
    TooShort {
        /// The option, without its dashes.
        option: &'static str,
        /// The value given.
        value: Duration,
        /// The least the option accepts.
        min: Duration,
    },
    /// A duration above its option's maximum.
    #[error("--{option} {value:?} is above the maximum of {max:?}")]
    TooLong {
        /// The option, without its dashes.
        option: &'static str,
        /// The value given.
        value: Duration,
        /// The most the option accepts.
        max: Duration,
    },
    /// A heartbeat not shorter than the timeout it keeps alive.
    #[error("--heartbeat {heartbeat:?} must be shorter than --{timeout_option} {timeout:?}")]
    Heartbeat {
        /// The heartbeat interval.
        heartbeat: Duration,
        /// The timeout's option, without its dashes.
        timeout_option: &'static str,
        /// The timeout.
        timeout: Duration,
    },
    /// A guest memory size that is not a positive multiple of [`MEMORY_ALIGN`].
    #[error("--memory {} is not a positive multiple of 2M", size_text(*.0))]
    Memory(u64),
    /// A disk size that is not a positive multiple of 4 KiB up to [`MAX_DISK`].
    #[error("--disk-size {} is not a positive multiple of 4K up to 16G", size_text(*.0))]
    DiskSize(u64),
    /// A memory cap below the smallest guest.
    #[error("--max-memory {} is below the smallest guest, 2M", size_text(*.0))]
    MaxMemory(u64),
    /// A page cache too small for one page, in a mode that keeps one.
    #[error(
        "--cache-size {} cannot hold one {PAGE_SIZE}-byte page (mode {mode} keeps a page cache)",
        size_text(*bytes)
    )]
    CacheSize {
        /// The size given, in bytes.
        bytes: u64,
        /// The mode that needs the cache.
        mode: Mode,
    },
    /// A block size the codec does not support.
    #[error("--block-size {0} is not supported (a power of two from 32 to 1024)")]
    BlockSize(u32),
    /// A network buffer limit outside [`NET_BUFFER_LIMIT`].
    #[error("--net-buffer-limit {} is outside 64k..=1G", size_text(*.0))]
    NetBufferLimit(u64),
    /// A count below its option's minimum.
    #[error("--{option} {value} is below the minimum of {min}")]
    TooFew {
        /// The option, without its dashes.
        option: &'static str,
        /// The value given.
        value: u64,
        /// The least the option accepts.
        min: u64,
    },
}

impl LimitError {
    /// The option the error is about, without its dashes (`"interval"`).
    pub fn option(&self) -> &'static str {
        match self {
            Self::TooShort { option, .. }
            | Self::TooLong { option, .. }
            | Self::TooFew { option, .. } => option,
            Self::Heartbeat { .. } => "heartbeat",
            Self::Memory(_) => "memory",
            Self::MaxMemory(_) => "max-memory",
            Self::DiskSize(_) => "disk-size",
            Self::CacheSize { .. } => "cache-size",
            Self::BlockSize(_) => "block-size",
            Self::NetBufferLimit(_) => "net-buffer-limit",
        }
    }

    /// The message without the leading `--option ` (for a config file error that names
    /// the key itself): `0ns is below the minimum of 1ms`.
    pub fn rule(&self) -> String {
        let s = self.to_string();
        let prefix = format!("--{} ", self.option());
        match s.strip_prefix(&prefix) {
            Some(rest) => rest.to_string(),
            None => s,
        }
    }
}

/// `bytes` as an operator would type it: `3M`, `64k`, `1G`, or plain bytes.
pub fn size_text(bytes: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (1 << 40, "T"),
        (1 << 30, "G"),
        (1 << 20, "M"),
        (1 << 10, "k"),
    ];
    UNITS
        .iter()
        .find(|(m, _)| bytes != 0 && bytes.is_multiple_of(*m))
        .map_or_else(|| bytes.to_string(), |(m, u)| format!("{}{u}", bytes / m))
}

/// A duration of `option` at least `min`.
fn at_least(option: &'static str, value: Duration, min: Duration) -> Result<Duration, LimitError> {
    if value < min {
        return Err(LimitError::TooShort { option, value, min });
    }
    Ok(value)
}

/// A count of `option` at least `min`.
fn count_at_least(option: &'static str, value: u64, min: u64) -> Result<u64, LimitError> {
    if value < min {
        return Err(LimitError::TooFew { option, value, min });
    }
    Ok(value)
}

/// The epoch interval (`--interval` of both daemons): from [`MIN_INTERVAL`] (1 ms) to
/// [`MAX_INTERVAL`] (60 s).
pub fn check_interval(d: Duration) -> Result<Duration, LimitError> {
    at_least("interval", d, MIN_INTERVAL)?;
    if d > MAX_INTERVAL {
        return Err(LimitError::TooLong {
            option: "interval",
            value: d,
            max: MAX_INTERVAL,
        });
    }
    Ok(d)
}

/// A timeout (`--ack-timeout`, `--detect-timeout`, `--xen-suspend-timeout`; `option`
/// names it): at least [`MIN_TIMEOUT`] (1 ms).
pub fn check_timeout(option: &'static str, d: Duration) -> Result<Duration, LimitError> {
    at_least(option, d, MIN_TIMEOUT)
}

/// The heartbeat interval (`--heartbeat`): at least [`MIN_TIMEOUT`] (1 ms), and shorter
/// than the timeout it keeps alive (`timeout_option` names it). The primary knows its own
/// `--ack-timeout`, not the backup's detection timeout; a heartbeat that is not shorter than
/// the ack timeout lets the link stay silent longer than the primary itself waits for the
/// backup, which no working detection timeout tolerates.
pub fn check_heartbeat(
    heartbeat: Duration,
    timeout_option: &'static str,
    timeout: Duration,
) -> Result<Duration, LimitError> {
    at_least("heartbeat", heartbeat, MIN_TIMEOUT)?;
    if heartbeat >= timeout {
        return Err(LimitError::Heartbeat {
            heartbeat,
            timeout_option,
            timeout,
        });
    }
    Ok(heartbeat)
}

/// Guest memory (`--memory` of both daemons): a positive multiple of [`MEMORY_ALIGN`]
/// (2 MiB), what the KVM backend requires (it also caps the size; that is its own check).
pub fn check_memory(bytes: u64) -> Result<u64, LimitError> {
    if bytes == 0 || !bytes.is_multiple_of(MEMORY_ALIGN) {
        return Err(LimitError::Memory(bytes));
    }
    Ok(bytes)
}

/// The largest disk (the initial disk sync names at most 2^22 blocks of 4 KiB).
pub const MAX_DISK: u64 = 16 << 30;

/// A disk size: a positive multiple of 4 KiB, at most [`MAX_DISK`].
pub fn check_disk_size(bytes: u64) -> Result<u64, LimitError> {
    if bytes == 0 || !bytes.is_multiple_of(4096) || bytes > MAX_DISK {
        return Err(LimitError::DiskSize(bytes));
    }
    Ok(bytes)
}

/// The largest guest a backup accepts (`--max-memory`): at least [`MEMORY_ALIGN`] (2 MiB),
/// the smallest guest; any size above that is a cap, not a guest, and need not be aligned.
pub fn check_max_memory(bytes: u64) -> Result<u64, LimitError> {
    if bytes < MEMORY_ALIGN {
        return Err(LimitError::MaxMemory(bytes));
    }
    Ok(bytes)
}

/// The encoder's page cache (`--cache-size`) for `mode`: at least one page
/// ([`PAGE_SIZE`] bytes) in the modes that keep a cache (xbzrle, fgbi), anything in remus,
/// which keeps none. The cache holds `bytes / 4096` whole pages.
pub fn check_cache_size(bytes: u64, mode: Mode) -> Result<u64, LimitError> {
    if mode != Mode::Remus && bytes < PAGE_SIZE as u64 {
        return Err(LimitError::CacheSize { bytes, mode });
    }
    Ok(bytes)
}

/// The block size (`--block-size` of both daemons): a power of two from 32 to 1024.
pub fn check_block_size(n: u32) -> Result<BlockSize, LimitError> {
    BlockSize::new(n).map_err(|_| LimitError::BlockSize(n))
}

/// The bytes a network buffer (`--net-buffer-limit`) may hold: from 64 KiB to 1 GiB.
pub const NET_BUFFER_LIMIT: std::ops::RangeInclusive<u64> = 64 << 10..=1 << 30;

/// A network buffer's limit within [`NET_BUFFER_LIMIT`].
pub fn check_net_buffer_limit(bytes: u64) -> Result<u64, LimitError> {
    if NET_BUFFER_LIMIT.contains(&bytes) {
        Ok(bytes)
    } else {
        Err(LimitError::NetBufferLimit(bytes))
    }
}

/// Checkpoints in flight (`--pipeline`): at least 1, the checkpoint being sent.
pub fn check_pipeline(n: usize) -> Result<usize, LimitError> {
    count_at_least("pipeline", n as u64, 1)?;
    Ok(n)
}

/// Pre-copy rounds (`--precopy-rounds`): at least 1, the round that sends every page,
/// which always runs.
pub fn check_precopy_rounds(n: usize) -> Result<usize, LimitError> {
    count_at_least("precopy-rounds", n as u64, 1)?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn intervals() {
        assert_eq!(check_interval(25 * MS), Ok(25 * MS));
        assert_eq!(check_interval(MS), Ok(MS));
        assert_eq!(check_interval(MAX_INTERVAL), Ok(MAX_INTERVAL));
        let e = check_interval(Duration::ZERO).unwrap_err();
        assert_eq!(e.to_string(), "--interval 0ns is below the minimum of 1ms");
        assert_eq!(e.rule(), "0ns is below the minimum of 1ms");
        assert_eq!(e.option(), "interval");
        assert!(check_interval(Duration::from_micros(999)).is_err());
        let e = check_interval(Duration::from_secs(61)).unwrap_err();
        assert_eq!(e.to_string(), "--interval 61s is above the maximum of 60s");
    }

    #[test]
    fn heartbeats_and_timeouts() {
        let two = Duration::from_secs(2);
        assert_eq!(check_heartbeat(25 * MS, "ack-timeout", two), Ok(25 * MS));
        let e = check_heartbeat(Duration::ZERO, "ack-timeout", two).unwrap_err();
        assert_eq!(e.to_string(), "--heartbeat 0ns is below the minimum of 1ms");
        let e = check_heartbeat(two, "ack-timeout", two).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--heartbeat 2s must be shorter than --ack-timeout 2s"
        );
        assert_eq!(e.option(), "heartbeat");
        assert_eq!(e.rule(), "2s must be shorter than --ack-timeout 2s");
        assert_eq!(check_timeout("detect-timeout", MS), Ok(MS));
        let e = check_timeout("detect-timeout", Duration::from_micros(500)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--detect-timeout 500µs is below the minimum of 1ms"
        );
    }

    #[test]
    fn memory() {
        assert_eq!(check_memory(2 << 20), Ok(2 << 20));
        assert_eq!(check_memory(256 << 20), Ok(256 << 20));
        assert_eq!(
            check_memory(3 << 20).unwrap_err().to_string(),
            "--memory 3M is not a positive multiple of 2M"
        );
        assert!(check_memory(0).is_err());
        assert!(check_memory(4096).is_err());
        assert_eq!(
            check_memory(1000).unwrap_err().to_string(),
            "--memory 1000 is not a positive multiple of 2M"
        );
        assert_eq!(check_max_memory(64 << 30), Ok(64 << 30));
        assert_eq!(check_max_memory((3 << 20) + 1), Ok((3 << 20) + 1));
        assert_eq!(
            check_max_memory(0).unwrap_err().to_string(),
            "--max-memory 0 is below the smallest guest, 2M"
        );
    }

    #[test]
    fn caches_blocks_and_counts() {
        assert_eq!(check_cache_size(0, Mode::Remus), Ok(0));
        assert_eq!(check_cache_size(4096, Mode::Fgbi), Ok(4096));
        let e = check_cache_size(4095, Mode::Xbzrle).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--cache-size 4095 cannot hold one 4096-byte page (mode xbzrle keeps a page cache)"
        );
        assert!(check_cache_size(0, Mode::Fgbi).is_err());
        assert_eq!(check_block_size(64).map(|b| b.bytes()), Ok(64));
        assert_eq!(
            check_block_size(48).unwrap_err().to_string(),
            "--block-size 48 is not supported (a power of two from 32 to 1024)"
        );
        assert_eq!(check_pipeline(1), Ok(1));
        assert_eq!(
            check_pipeline(0).unwrap_err().to_string(),
            "--pipeline 0 is below the minimum of 1"
        );
        assert_eq!(check_precopy_rounds(5), Ok(5));
        assert_eq!(
            check_precopy_rounds(0).unwrap_err().option(),
            "precopy-rounds"
        );
    }

    #[test]
    fn sizes_read_as_typed() {
        assert_eq!(size_text(0), "0");
        assert_eq!(size_text(4095), "4095");
        assert_eq!(size_text(64 << 10), "64k");
        assert_eq!(size_text(3 << 20), "3M");
        assert_eq!(size_text(1 << 30), "1G");
        assert_eq!(size_text((1 << 30) + 4096), "1048580k");
    }
}
