//! The pair-key policy both daemons apply: a key file (`--key`) or plain TCP
//! (`--insecure`), never neither and never both; and `keygen`, which writes a new key.
//! The key file's format and its permission checks are [`ha_wire::secure::PairKey`]'s.

use std::path::Path;

use ha_wire::secure::{PairKey, SecureError};

/// Errors choosing how the link is secured.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Neither a key nor `--insecure`.
    #[error(
        "no pair key: give --key FILE (create one with `ha-primary keygen FILE`) or --insecure"
    )]
    Missing,
    /// Both a key and `--insecure`.
    #[error("--key and --insecure contradict each other: give one")]
    Both,
    /// The key file is refused (unreadable, not private, not a key), or cannot be written.
    #[error(transparent)]
    File(#[from] SecureError),
}

/// The pair key `--key` names, or None for `--insecure`, announced with a warning that
/// ends in `risk` (what an attacker can do to this daemon). Refused: neither or both, and
/// a key file that is not private or not a key.
pub fn pair_key(
    key: Option<&Path>,
    insecure: bool,
    risk: &str,
) -> Result<Option<PairKey>, KeyError> {
    match (key, insecure) {
        (Some(_), true) => Err(KeyError::Both),
        (None, false) => Err(KeyError::Missing),
        (Some(p), false) => Ok(Some(PairKey::read(p)?)),
        (None, true) => {
            tracing::warn!("--insecure: replication is NOT encrypted or authenticated; {risk}");
            Ok(None)
        }
    }
}

/// Write a new random pair key to `file` (mode 0600; an existing file is not overwritten).
pub fn keygen(file: &Path) -> Result<(), KeyError> {
    PairKey::generate()?.write_new(file)?;
    tracing::info!(file = %file.display(), "wrote a new pair key (mode 0600)");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_or_insecure_never_neither_nor_both() {
        let file = std::env::temp_dir().join(format!("castor-keys-{}.key", std::process::id()));
        let _ = std::fs::remove_file(&file);
        keygen(&file).expect("a new key");
        assert!(
            matches!(keygen(&file), Err(KeyError::File(_))),
            "not overwritten"
        );
        let key = pair_key(Some(&file), false, "risk").expect("the key file");
        assert_eq!(key, Some(PairKey::read(&file).expect("read")));
        assert!(matches!(pair_key(None, true, "risk"), Ok(None)));
        assert!(matches!(
            pair_key(Some(&file), true, "r"),
            Err(KeyError::Both)
        ));
        let e = pair_key(None, false, "r").expect_err("no key");
        assert!(
            e.to_string().starts_with("no pair key: give --key FILE"),
            "{e}"
        );
        let _ = std::fs::remove_file(&file);
    }
}
