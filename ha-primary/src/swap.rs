//! The role swap after a planned switchover: this process becomes the backup of the
//! guest it just handed over. The guest's memory at the handover (exactly the checkpoint
//! the new primary resumed from: the guest never ran after it) is kept in a memfd, and the
//! process execs `ha-backup` with the operator's backup config and that memfd as its
//! `--base-image`, keeping its pid (a service manager sees one service go on). The new
//! primary, started with `--reprotect-to` this host, then sends only the pages its guest
//! changed since (compared by fingerprints).
//!
//! The same exec, without an image, serves a primary's host that comes back after a
//! failover: the guest's key is held by the host that took it over, so this host becomes
//! that primary's backup instead of refusing to start.

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use ha_codec::PAGE_SIZE;
use ha_guest::domain::{Domain, DomainError};
use ha_guest::image::{GuestImage, ImageError};

/// Why the role swap cannot happen.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    /// No memory for the copy of the guest's memory.
    #[error("cannot hold the guest's memory for the backup")]
    Image(#[from] ImageError),
    /// The guest's memory cannot be read.
    #[error("cannot read the guest's memory")]
    Read(#[source] DomainError),
    /// The memfd cannot be handed to the new program.
    #[error("cannot pass the guest's memory to ha-backup")]
    Inherit(#[source] std::io::Error),
    /// `ha-backup` is not beside this program.
    #[error("{0} not found: the role swap runs the ha-backup installed beside ha-primary")]
    NoBackup(PathBuf),
    /// The exec failed.
    #[error("cannot run {path}")]
    Exec {
        /// The program.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Bytes of guest memory read at a time into the held copy.
const PIECE: usize = 64 << 10;

/// The guest's memory, read into a memfd that the next program inherits.
#[derive(Debug)]
pub struct HeldMemory {
    file: std::fs::File,
}

/// Copy the (paused) guest's memory into a memfd that survives exec.
pub fn hold_memory(d: &dyn Domain) -> Result<HeldMemory, SwapError> {
    let size = usize::try_from(d.memory_size()).unwrap_or(usize::MAX);
    let mut image = GuestImage::new(size)?;
    // Through a small buffer, and only the pages that are not zero: the image's others
    // stay holes (no memory taken, and cheap for the backup to read).
    let mut piece = vec![0u8; PIECE];
    for (i, dst) in image.as_mut_slice().chunks_mut(PIECE).enumerate() {
        let buf = &mut piece[..dst.len()];
        d.read_memory((i * PIECE) as u64, buf)
            .map_err(SwapError::Read)?;
        for (to, from) in dst.chunks_mut(PAGE_SIZE).zip(buf.chunks(PAGE_SIZE)) {
            // OR-fold (no early exit) so the scan vectorises.
            if from.iter().fold(0u8, |a, b| a | b) != 0 {
                to.copy_from_slice(from);
            }
        }
    }
    let file = image.into_file();
    // SAFETY: `file` owns an open fd for its whole lifetime; F_SETFD only changes the fd's
    // close-on-exec flag and touches no memory.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFD, 0) };
    if rc < 0 {
        return Err(SwapError::Inherit(std::io::Error::last_os_error()));
    }
    Ok(HeldMemory { file })
}

/// Replace this process with `ha-backup --config CONFIG [--base-image /proc/self/fd/N]`.
/// Returns only on failure.
pub fn exec_backup(config: &Path, memory: Option<HeldMemory>) -> SwapError {
    let path = match std::env::current_exe() {
        Ok(p) => p.with_file_name("ha-backup"),
        Err(e) => {
            return SwapError::Exec {
                path: "ha-backup".into(),
                source: e,
            };
        }
    };
    if !path.exists() {
        return SwapError::NoBackup(path);
    }
    let mut cmd = std::process::Command::new(&path);
    cmd.arg("--config").arg(config);
    // `memory` stays open until the exec: the new program reads it through its fd.
    let image = memory
        .as_ref()
        .map(|m| format!("/proc/self/fd/{}", m.file.as_raw_fd()));
    if let Some(i) = &image {
        cmd.arg("--base-image").arg(i);
    }
    tracing::info!(
        backup = %path.display(),
        config = %config.display(),
        image = image.as_deref().unwrap_or("none"),
        "role swap: becoming the new primary's backup"
    );
    let source = cmd.exec();
    drop(memory);
    SwapError::Exec { path, source }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ha_guest::testing::StubDomain;
    use std::os::unix::fs::{FileExt, MetadataExt};

    #[test]
    fn the_held_memory_is_the_guest_s_with_its_zero_pages_left_holes() {
        let size = 2 << 20;
        let mut memory = vec![0u8; size];
        memory[7] = 1;
        memory[PAGE_SIZE * 100 + 9] = 2;
        memory[size - 1] = 3;
        let held = hold_memory(&StubDomain::with_memory(memory.clone())).expect("hold");
        let mut back = vec![0u8; size];
        held.file.read_exact_at(&mut back, 0).expect("read");
        assert!(back == memory);
        // Three pages hold data: 12 KiB allocated (in 512-byte blocks), not 2 MiB.
        let blocks = held.file.metadata().expect("stat").blocks();
        assert_eq!(blocks, 3 * PAGE_SIZE as u64 / 512);
    }
}
