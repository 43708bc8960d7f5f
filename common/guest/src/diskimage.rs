//! Opening a guest's disk image: the file read-write, its size a positive multiple of the
//! unit the backend addresses it in. The simulated disk, the NBD export and virtio-blk
//! open their images here, so a bad image is refused in the same words whichever backend
//! runs the guest.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

/// Errors opening a disk image.
#[derive(Debug, thiserror::Error)]
pub enum DiskImageError {
    /// The image cannot be opened for reading and writing, or measured.
    #[error("cannot open the disk image {path}")]
    Open {
        /// The image.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The image's size is not a positive multiple of the unit.
    #[error("disk image {path} is {size} bytes, not a positive multiple of {unit}")]
    Size {
        /// The image.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The unit it must be whole of.
        unit: u64,
    },
}

/// Open the image at `path` for reading and writing; its size, returned beside the file,
/// must be a positive multiple of `unit` (4096 for a disk whose writes are checkpointed as
/// pages, 512 for a disk of sectors).
pub fn open(path: &Path, unit: u64) -> Result<(File, u64), DiskImageError> {
    let open_err = |source| DiskImageError::Open {
        path: path.to_owned(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(open_err)?;
    let size = file.metadata().map_err(open_err)?.len();
    if size == 0 || !size.is_multiple_of(unit) {
        return Err(DiskImageError::Size {
            path: path.to_owned(),
            size,
            unit,
        });
    }
    Ok((file, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_images_open_and_others_are_refused_by_name() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let good = dir.join("good.img");
        std::fs::write(&good, vec![0u8; 8192]).unwrap();
        let (_, size) = open(&good, 4096).unwrap();
        assert_eq!(size, 8192);

        let odd = dir.join("odd.img");
        std::fs::write(&odd, vec![0u8; 1000]).unwrap();
        let e = open(&odd, 512).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "disk image {} is 1000 bytes, not a positive multiple of 512",
                odd.display()
            )
        );
        let empty = dir.join("empty.img");
        std::fs::write(&empty, b"").unwrap();
        let e = open(&empty, 4096).unwrap_err();
        assert!(
            matches!(
                e,
                DiskImageError::Size {
                    size: 0,
                    unit: 4096,
                    ..
                }
            ),
            "{e}"
        );

        let missing = dir.join("missing.img");
        let e = open(&missing, 4096).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("cannot open the disk image {}", missing.display())
        );
    }
}
