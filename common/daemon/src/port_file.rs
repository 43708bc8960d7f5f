//! Port files: a daemon that binds port 0 writes the address it got (`ip:port` and a
//! newline) to a file, for the scripts and tests that start it. The file is written through
//! a temp file and a rename, so a reader never sees part of it.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Errors writing a port file.
#[derive(Debug, thiserror::Error)]
pub enum PortFileError {
    /// The file (or its temp file) cannot be written or renamed.
    #[error("cannot write the port file {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Write `addr` to `path` through a temp file and a rename.
pub fn write(path: &Path, addr: SocketAddr) -> Result<(), PortFileError> {
    write_io(path, addr).map_err(|source| PortFileError::Write {
        path: path.to_path_buf(),
        source,
    })
}

fn write_io(path: &Path, addr: SocketAddr) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp.{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    {
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(f, "{addr}")?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_the_address_or_names_the_file() {
        let p = std::env::temp_dir().join(format!("castor-port-{}", std::process::id()));
        let addr: SocketAddr = "127.0.0.1:7700".parse().expect("addr");
        write(&p, addr).expect("write");
        assert_eq!(
            std::fs::read_to_string(&p).expect("read"),
            "127.0.0.1:7700\n"
        );
        let _ = std::fs::remove_file(&p);
        let bad = p.join("no-such-dir").join("port");
        let e = write(&bad, addr).expect_err("no directory");
        assert_eq!(
            e.to_string(),
            format!("cannot write the port file {}", bad.display())
        );
    }
}
