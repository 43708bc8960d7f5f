//! A guest's disk image (the primary's) or its replica (the backup's) as a file: with
//! `--disk-size` a missing file is created empty (sparse, all zero) at that size, and an
//! existing one must already be that size. The daemons open the file afterwards.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

use crate::limits::size_text;

/// Errors preparing a disk file.
#[derive(Debug, thiserror::Error)]
pub enum DiskFileError {
    /// The file exists with another size than `--disk-size`.
    #[error("{path} is {} but --disk-size is {}", size_text(*have), size_text(*want))]
    Size {
        /// The file.
        path: PathBuf,
        /// Its size.
        have: u64,
        /// The size asked for.
        want: u64,
    },
    /// The file cannot be created or inspected.
    #[error("cannot create {path}")]
    Create {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// What [`prepare`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prepared {
    /// The file was there (of the right size when one was given).
    Existing,
    /// The file was missing and was created empty at the given size.
    Created,
}

/// Make sure the disk file at `path` can be opened: with `size`, create it empty when it
/// is missing and refuse one of another size; without, leave it to the opener (which
/// names a missing file).
pub fn prepare(path: &Path, size: Option<u64>) -> Result<Prepared, DiskFileError> {
    let Some(want) = size else {
        return Ok(Prepared::Existing);
    };
    let created = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .and_then(|f| f.set_len(want).and_then(|()| f.sync_all()));
    match created {
        Ok(()) => return Ok(Prepared::Created),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(source) => {
            return Err(DiskFileError::Create {
                path: path.to_owned(),
                source,
            });
        }
    }
    let have = std::fs::metadata(path)
        .map_err(|source| DiskFileError::Create {
            path: path.to_owned(),
            source,
        })?
        .len();
    if have != want {
        return Err(DiskFileError::Size {
            path: path.to_owned(),
            have,
            want,
        });
    }
    Ok(Prepared::Existing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk.img");
        assert_eq!(
            prepare(&p, None).unwrap(),
            Prepared::Existing,
            "left to the opener"
        );
        assert!(!p.exists());
        assert_eq!(prepare(&p, Some(1 << 20)).unwrap(), Prepared::Created);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 20);
        assert_eq!(prepare(&p, Some(1 << 20)).unwrap(), Prepared::Existing);
        let e = prepare(&p, Some(2 << 20)).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{} is 1M but --disk-size is 2M", p.display())
        );
        let e = prepare(&dir.path().join("no/such/dir"), Some(4096)).unwrap_err();
        assert!(matches!(e, DiskFileError::Create { .. }), "{e}");
    }
}
