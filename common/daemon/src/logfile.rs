//! A daemon's own files (event log, statistics, ack log), opened under an exclusive lock so
//! that a second instance refused at start-up never truncates or writes the files of the
//! instance that runs.
//!
//! The lock is `flock(LOCK_EX | LOCK_NB)` through [`File::try_lock`]: it belongs to the open
//! file, so it lasts while the returned [`File`] (or a clone of it) is open, and the kernel
//! drops it when the process dies. A file is truncated only once its lock is held.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};

/// Errors opening a daemon's file.
#[derive(Debug, thiserror::Error)]
pub enum LogFileError {
    /// The file cannot be opened, created or truncated.
    #[error("cannot open {path}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Another process holds the file's lock: a running Castor daemon writes it.
    #[error("{path} is in use by another running process (locked); not touching it")]
    Locked {
        /// The file.
        path: PathBuf,
    },
    /// The lock cannot be taken for another reason than another holder.
    #[error("cannot lock {path}")]
    Lock {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

impl LogFileError {
    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            Self::Open { path, .. } | Self::Locked { path } | Self::Lock { path, .. } => path,
        }
    }
}

/// Open `path` for writing, created if missing, lock it, and only then empty it.
///
/// Fails with [`LogFileError::Locked`], the file untouched, while another open file holds
/// the lock (another daemon's, or one still open in this process).
pub fn create_locked(path: &Path) -> Result<File, LogFileError> {
    let f = open_locked(
        OpenOptions::new().create(true).write(true).truncate(false),
        path,
    )?;
    f.set_len(0).map_err(|source| LogFileError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(f)
}

/// Open `path` for appending, created if missing, and lock it; its content stays.
///
/// Fails with [`LogFileError::Locked`] as [`create_locked`] does.
pub fn append_locked(path: &Path) -> Result<File, LogFileError> {
    open_locked(OpenOptions::new().create(true).append(true), path)
}

/// Open `path` with `opts` and take its exclusive lock without waiting.
fn open_locked(opts: &OpenOptions, path: &Path) -> Result<File, LogFileError> {
    let f = opts.open(path).map_err(|source| LogFileError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(TryLockError::WouldBlock) => Err(LogFileError::Locked {
            path: path.to_path_buf(),
        }),
        Err(TryLockError::Error(source)) => Err(LogFileError::Lock {
            path: path.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn scratch(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("castor-logfile-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    #[test]
    fn a_second_create_is_refused_and_leaves_the_first_files_content() {
        let p = scratch("create");
        let mut first = create_locked(&p).unwrap();
        first.write_all(b"first\n").unwrap();
        let e = create_locked(&p).unwrap_err();
        assert!(
            matches!(&e, LogFileError::Locked { path } if path == &p),
            "{e}"
        );
        assert!(
            e.to_string().contains("in use by another running process"),
            "{e}"
        );
        assert!(matches!(
            append_locked(&p),
            Err(LogFileError::Locked { .. })
        ));
        // The first goes on writing where it was, and nothing else was written.
        first.write_all(b"more\n").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"first\nmore\n");
        drop(first);
        let mut second = create_locked(&p).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"", "truncated once locked");
        second.write_all(b"second\n").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"second\n");
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn append_keeps_the_content_and_locks_out_a_create() {
        let p = scratch("append");
        std::fs::write(&p, "1 10\n").unwrap();
        let mut log = append_locked(&p).unwrap();
        log.write_all(b"2 25\n").unwrap();
        assert!(matches!(
            create_locked(&p),
            Err(LogFileError::Locked { .. })
        ));
        assert_eq!(std::fs::read(&p).unwrap(), b"1 10\n2 25\n");
        drop(log);
        let log = append_locked(&p).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"1 10\n2 25\n");
        drop(log);
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn a_missing_directory_is_an_open_error_naming_the_file() {
        let p = scratch("dir").join("no-such-dir").join("events.jsonl");
        let e = create_locked(&p).unwrap_err();
        assert!(matches!(&e, LogFileError::Open { .. }), "{e}");
        assert_eq!(e.path(), p);
    }
}
