//! The pair key: the 32-byte secret both daemons of a pair hold, kept in a file of 64 hex
//! digits that only its owner may read ([`PairKey::read`] refuses anything else);
//! [`PairKey::write_new`] creates one (`keygen`).

use std::fmt;
use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use super::SecureError;

/// Bytes in a pair key.
pub const KEY_LEN: usize = 32;

/// The secret both daemons of a pair hold.
#[derive(Clone, PartialEq, Eq)]
pub struct PairKey([u8; KEY_LEN]);

impl fmt::Debug for PairKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PairKey(..)")
    }
}

impl PairKey {
    /// The key's bytes (the handshake's pre-shared key).
    pub(super) fn bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// A key from its bytes.
    pub fn from_bytes(b: [u8; KEY_LEN]) -> Self {
        Self(b)
    }

    /// A new random key (from the kernel's CSPRNG).
    pub fn generate() -> Result<Self, SecureError> {
        let mut b = [0u8; KEY_LEN];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut b))
            .map_err(SecureError::Random)?;
        Ok(Self(b))
    }

    /// The key as 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parse 64 hex digits (surrounding whitespace ignored); `path` names the source in
    /// the error.
    pub fn parse(text: &str, path: &Path) -> Result<Self, SecureError> {
        let bad = |problem| SecureError::KeyFormat {
            path: path.to_path_buf(),
            problem,
        };
        let t = text.trim();
        if t.len() != 2 * KEY_LEN {
            return Err(bad(if t.is_empty() {
                "it is empty"
            } else {
                "wrong length"
            }));
        }
        let mut b = [0u8; KEY_LEN];
        for (i, pair) in t.as_bytes().chunks_exact(2).enumerate() {
            let hi = hex_digit(pair[0]).ok_or_else(|| bad("a character is not a hex digit"))?;
            let lo = hex_digit(pair[1]).ok_or_else(|| bad("a character is not a hex digit"))?;
            b[i] = hi << 4 | lo;
        }
        Ok(Self(b))
    }

    /// Read a key file. Refused: a file its group or others may access (mode & 0o077), a
    /// file that is not 64 hex digits.
    pub fn read(path: &Path) -> Result<Self, SecureError> {
        let read_err = |source| SecureError::KeyRead {
            path: path.to_path_buf(),
            source,
        };
        let mut f = std::fs::File::open(path).map_err(read_err)?;
        let mode = f.metadata().map_err(read_err)?.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(SecureError::KeyMode {
                path: path.to_path_buf(),
                mode,
            });
        }
        let mut text = String::new();
        // A key file is 65 bytes; read a little more so a longer file is seen as one.
        (&mut f)
            .take(4096)
            .read_to_string(&mut text)
            .map_err(|e| match e.kind() {
                io::ErrorKind::InvalidData => SecureError::KeyFormat {
                    path: path.to_path_buf(),
                    problem: "it is not text",
                },
                _ => read_err(e),
            })?;
        Self::parse(&text, path)
    }

    /// Write this key to a new file with mode 0600; an existing file is never overwritten.
    pub fn write_new(&self, path: &Path) -> Result<(), SecureError> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| match source.kind() {
                io::ErrorKind::AlreadyExists => SecureError::KeyExists {
                    path: path.to_path_buf(),
                },
                _ => SecureError::KeyWrite {
                    path: path.to_path_buf(),
                    source,
                },
            })?;
        let write_err = |source| SecureError::KeyWrite {
            path: path.to_path_buf(),
            source,
        };
        // The umask cannot widen 0600, but a narrower one could drop the owner's bits.
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(write_err)?;
        writeln!(f, "{}", self.to_hex()).map_err(write_err)?;
        f.sync_all().map_err(write_err)
    }
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_are_checked() {
        let dir = std::env::temp_dir().join(format!("castor-key-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let p = dir.join("pair.key");
        let k = PairKey::generate().expect("random");
        k.write_new(&p).expect("write");
        let mode = std::fs::metadata(&p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(PairKey::read(&p).expect("read"), k);
        let e = k.write_new(&p).expect_err("no overwrite");
        assert!(matches!(e, SecureError::KeyExists { .. }), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = PairKey::read(&p).expect_err("0644");
        assert_eq!(
            e.to_string(),
            format!(
                "pair key {0} has mode 0644: group and others must have no access (chmod 600 {0})",
                p.display()
            )
        );
        let short = dir.join("short.key");
        std::fs::write(&short, "abcd\n").expect("write");
        std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let e = PairKey::read(&short).expect_err("short");
        assert!(e.to_string().contains("wrong length"), "{e}");
        std::fs::write(&short, "zz".repeat(32)).expect("write");
        let e = PairKey::read(&short).expect_err("not hex");
        assert!(e.to_string().contains("not a hex digit"), "{e}");
        assert_eq!(format!("{k:?}"), "PairKey(..)");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
