//! One envelope for every backend's saved state (the vCPU and device state that travels with
//! each checkpoint): a magic that names the backend's format, its version, the body's
//! length and checksum, then the body — the backend's own state struct, in postcard. A
//! blob of another backend or version, cut short, grown or altered is refused, by name,
//! before its body is read.
//!
//! Layout, little-endian, [`HEADER_LEN`] bytes of header:
//!
//! ```text
//!  0  [u8; 8]  magic (the format's name, e.g. "CASTKVM1")
//!  8  u32      version
//! 12  u32      body length
//! 16  u64      xxh3-64 of the body
//! 24  body     postcard
//! ```

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Bytes before the body.
pub const HEADER_LEN: usize = 24;

/// A saved-state format: what a backend writes and reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Format {
    /// Names the format (and its backend).
    pub magic: [u8; 8],
    /// The version this build writes and reads.
    pub version: u32,
}

impl Format {
    fn name(&self) -> String {
        String::from_utf8_lossy(&self.magic).into_owned()
    }
}

/// Why a saved state was refused.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    /// Shorter than the header.
    #[error("saved state is {got} bytes, shorter than its {HEADER_LEN}-byte header")]
    Short {
        /// Bytes given.
        got: usize,
    },
    /// Another format's blob (another backend, or not a saved state).
    #[error("bad header: not a {expected} saved state (magic {got:?})")]
    Magic {
        /// The format expected.
        expected: String,
        /// The magic found, as text.
        got: String,
    },
    /// A version this build does not read.
    #[error("{format} saved state of version {got}; this build reads version {expected}")]
    Version {
        /// The format.
        format: String,
        /// The version found.
        got: u32,
        /// The version this build reads.
        expected: u32,
    },
    /// The body is not as long as the header says.
    #[error("{format} saved state body is {got} bytes, its header says {expected} bytes")]
    Length {
        /// The format.
        format: String,
        /// The body's bytes.
        got: usize,
        /// The header's length.
        expected: u64,
    },
    /// The body does not match its checksum.
    #[error("{format} saved state fails its integrity check (xxh3 of the body)")]
    Checksum {
        /// The format.
        format: String,
    },
    /// The body is not the format's state.
    #[error("{format} saved state body does not decode")]
    Decode {
        /// The format.
        format: String,
        /// Why.
        #[source]
        source: postcard::Error,
    },
    /// The state cannot be encoded (or is over 4 GiB).
    #[error("cannot encode a {format} saved state")]
    Encode {
        /// The format.
        format: String,
        /// Why, when postcard said.
        #[source]
        source: Option<postcard::Error>,
    },
}

/// Wrap `state` in the envelope of `format`.
pub fn seal<T: Serialize>(format: Format, state: &T) -> Result<Vec<u8>, EnvelopeError> {
    let encode = |source| EnvelopeError::Encode {
        format: format.name(),
        source,
    };
    let body = postcard::to_allocvec(state).map_err(|e| encode(Some(e)))?;
    let len = u32::try_from(body.len()).map_err(|_| encode(None))?;
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&format.magic);
    out.extend_from_slice(&format.version.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(&body).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Check `blob` against `format` and decode its body.
pub fn open<T: DeserializeOwned>(format: Format, blob: &[u8]) -> Result<T, EnvelopeError> {
    // Another format is named as such, even when it is shorter than a header.
    if let Some(magic) = blob.get(..8)
        && magic != format.magic
    {
        return Err(EnvelopeError::Magic {
            expected: format.name(),
            got: String::from_utf8_lossy(magic).into_owned(),
        });
    }
    let (header, body) = blob
        .split_first_chunk::<HEADER_LEN>()
        .ok_or(EnvelopeError::Short { got: blob.len() })?;
    let rest = &header[8..];
    let word = |at: usize| {
        let mut w = [0u8; 4];
        w.copy_from_slice(&rest[at..at + 4]);
        u32::from_le_bytes(w)
    };
    let version = word(0);
    if version != format.version {
        return Err(EnvelopeError::Version {
            format: format.name(),
            got: version,
            expected: format.version,
        });
    }
    let len = u64::from(word(4));
    if body.len() as u64 != len {
        return Err(EnvelopeError::Length {
            format: format.name(),
            got: body.len(),
            expected: len,
        });
    }
    let mut sum = [0u8; 8];
    sum.copy_from_slice(&rest[8..16]);
    if xxhash_rust::xxh3::xxh3_64(body) != u64::from_le_bytes(sum) {
        return Err(EnvelopeError::Checksum {
            format: format.name(),
        });
    }
    postcard::from_bytes(body).map_err(|source| EnvelopeError::Decode {
        format: format.name(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const F: Format = Format {
        magic: *b"CASTTST1",
        version: 3,
    };

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct S {
        a: u64,
        b: Vec<u8>,
        c: Option<std::time::Duration>,
    }

    fn s() -> S {
        S {
            a: 7,
            b: vec![1, 2, 3],
            c: Some(std::time::Duration::from_millis(5)),
        }
    }

    #[test]
    fn roundtrip_and_every_refusal_by_name() {
        let blob = seal(F, &s()).unwrap();
        assert_eq!(open::<S>(F, &blob).unwrap(), s());
        let err = |b: &[u8]| open::<S>(F, b).unwrap_err().to_string();

        let other = Format {
            magic: *b"CASTKVM1",
            ..F
        };
        assert_eq!(
            err(&seal(other, &s()).unwrap()),
            "bad header: not a CASTTST1 saved state (magic \"CASTKVM1\")"
        );
        let newer = Format { version: 4, ..F };
        assert_eq!(
            err(&seal(newer, &s()).unwrap()),
            "CASTTST1 saved state of version 4; this build reads version 3"
        );
        assert!(err(&blob[..10]).contains("shorter than its 24-byte header"));
        assert!(err(b"CASTKVM1 short").starts_with("bad header: not a CASTTST1"));
        assert!(err(&blob[..blob.len() - 1]).contains("header says"));
        let mut long = blob.clone();
        long.push(0);
        assert!(err(&long).contains("header says"));
        for at in [16, HEADER_LEN, blob.len() - 1] {
            let mut flipped = blob.clone();
            flipped[at] ^= 0x10;
            assert!(err(&flipped).contains("integrity"), "byte {at}");
        }
        // A body that passes the checksum but is not the state (a sealed other type).
        let wrong = seal(F, &1u8).unwrap();
        assert!(err(&wrong).contains("does not decode"));
    }
}
