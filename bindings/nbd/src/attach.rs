//! Attaching a served image to the kernel's NBD driver: `/dev/nbdN` connected to the
//! server's Unix socket by Debian's `nbd-client`, and detached again when dropped.
//!
//! The device is checked first: a missing device node (the `nbd` module not loaded) and a
//! device already connected (its `/sys/block/nbdN/pid` exists) are refused with what to
//! do. The Xen domU then gets the device as `phy:/dev/nbdN` in its xl config.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The client program.
pub const NBD_CLIENT: &str = "nbd-client";
/// The block size the device is given.
const BLOCK_SIZE: &str = "4096";
/// How long the kernel may take to show the connected device's size.
const SETTLE: Duration = Duration::from_secs(10);

/// Errors attaching or detaching the device.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// No such block device.
    #[error("{0} is not a block device: load the kernel's nbd module (modprobe nbd)")]
    Missing(PathBuf),
    /// The device is connected already.
    #[error(
        "{device} is busy: already connected (pid {pid}); detach it with nbd-client -d {device}"
    )]
    Busy {
        /// The device.
        device: PathBuf,
        /// The pid the kernel names.
        pid: String,
    },
    /// `nbd-client` cannot be run.
    #[error("cannot run {NBD_CLIENT} (install Debian's nbd-client package)")]
    NoClient(#[source] std::io::Error),
    /// `nbd-client` failed.
    #[error("{NBD_CLIENT} could not connect {device} to {socket}: {output}")]
    Client {
        /// The device.
        device: PathBuf,
        /// The socket.
        socket: PathBuf,
        /// The end of what it printed.
        output: String,
    },
    /// The device did not show its size after the connect.
    #[error("{0} shows no size {SETTLE:?} after nbd-client connected it")]
    NoSize(PathBuf),
}

/// A `/dev/nbdN` connected to an NBD server's socket; detached when dropped.
#[derive(Debug)]
pub struct Device {
    device: PathBuf,
    detach: bool,
}

/// `/sys/block/NAME` of a device path.
fn sys_block(device: &Path) -> PathBuf {
    let name = device.file_name().unwrap_or_default();
    Path::new("/sys/block").join(name)
}

/// Check that `device` is a block device not connected yet.
pub fn check_free(device: &Path) -> Result<(), AttachError> {
    let is_block = std::fs::metadata(device)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false);
    if !is_block {
        return Err(AttachError::Missing(device.to_owned()));
    }
    if let Ok(pid) = std::fs::read_to_string(sys_block(device).join("pid")) {
        return Err(AttachError::Busy {
            device: device.to_owned(),
            pid: pid.trim().to_string(),
        });
    }
    Ok(())
}

impl Device {
    /// Connect `device` to the server on `socket` (export `name`) with
    /// `nbd-client -N NAME -b 4096 -u SOCKET DEVICE`, and wait until the kernel shows its
    /// size.
    pub fn attach(device: &Path, socket: &Path, name: &str) -> Result<Self, AttachError> {
        check_free(device)?;
        let out = Command::new(NBD_CLIENT)
            .args(["-N", name, "-b", BLOCK_SIZE, "-u"])
            .arg(socket)
            .arg(device)
            .output()
            .map_err(AttachError::NoClient)?;
        if !out.status.success() {
            return Err(AttachError::Client {
                device: device.to_owned(),
                socket: socket.to_owned(),
                output: tail(&out.stdout, &out.stderr, out.status),
            });
        }
        // From here the device is connected: a failure below detaches it again.
        let d = Self {
            device: device.to_owned(),
            detach: true,
        };
        let size = sys_block(device).join("size");
        let start = Instant::now();
        loop {
            let sectors = std::fs::read_to_string(&size)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .unwrap_or(0);
            if sectors > 0 {
                tracing::info!(device = %device.display(), socket = %socket.display(), sectors, "NBD device attached");
                return Ok(d);
            }
            if start.elapsed() > SETTLE {
                return Err(AttachError::NoSize(device.to_owned()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The device's path.
    pub fn path(&self) -> &Path {
        &self.device
    }

    /// Leave the device connected when this is dropped (the process hands it on).
    pub fn keep(&mut self) {
        self.detach = false;
    }
}

/// The last lines of a command's output and its status.
fn tail(stdout: &[u8], stderr: &[u8], status: std::process::ExitStatus) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(stdout),
        String::from_utf8_lossy(stderr)
    );
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let last = lines[lines.len().saturating_sub(3)..].join(" / ");
    format!("{status}: {last}")
}

impl Drop for Device {
    fn drop(&mut self) {
        if !self.detach {
            return;
        }
        match Command::new(NBD_CLIENT)
            .arg("-d")
            .arg(&self.device)
            .output()
        {
            Ok(o) if o.status.success() => {
                tracing::info!(device = %self.device.display(), "NBD device detached");
            }
            Ok(o) => tracing::error!(
                device = %self.device.display(),
                output = tail(&o.stdout, &o.stderr, o.status),
                "cannot detach the NBD device"
            ),
            Err(e) => {
                tracing::error!(device = %self.device.display(), error = %e, "cannot run nbd-client -d")
            }
        }
    }
}
