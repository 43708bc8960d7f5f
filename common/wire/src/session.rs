//! Session messages between a primary and its backup: the handshake, acknowledgements and
//! heartbeats. They travel as frames ([`crate::frame`]), with frame types 16 and up.
//!
//! The primary opens with [`Hello`]; the backup answers [`Welcome`] or a Refuse
//! ([`put_refuse`]; the reason names both values of any mismatch, the guest backend's kind
//! and the guest's layout among them: a KVM primary and a Xen backup cannot fail over to
//! each other, nor can two builds of different guest ABI versions). Then the primary sends
//! epochs and, when nothing else went out for a heartbeat interval, a heartbeat; the backup
//! acknowledges each committed epoch. The Welcome carries the backup's detection timeout,
//! so that a primary can tell when it was silent long enough for the backup to have taken
//! over.
//!
//! A session ends on purpose with a stand-down from the primary — its guest goes on
//! without this backup: a guest that outlives the primary (Xen) when protection stops, or
//! a primary that declared its backup lost and continues unprotected — so the backup does
//! not take over a guest that still runs. A backup that fails on its own (its ack log
//! cannot be written) ends the session with an abort that says why.

use crate::frame::{FrameType, put_frame};
use ha_codec::block::BlockSize;
use ha_codec::codec::Mode;
use ha_guest::backend::{BackendKind, GuestLayout};

/// Version of the session protocol.
pub const SESSION_VERSION: u16 = 9;
/// Magic at the start of a Hello: "CASTORHA".
pub const HELLO_MAGIC: u64 = u64::from_le_bytes(*b"CASTORHA");
/// Length of a Hello's body: magic, version, memory size, page size, block size, mode,
/// backend kind, guest layout, disk size.
const HELLO_LEN: usize = 8 + 2 + 8 + 4 + 4 + 1 + 1 + 4 + 8;

/// Errors parsing or checking session messages.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// A message of the wrong length or with bad fields.
    #[error("malformed {0} message")]
    Malformed(&'static str),
    /// Not a Castor peer.
    #[error("peer is not a Castor primary (bad magic)")]
    BadMagic,
    /// The peer speaks another session version.
    #[error("session version mismatch: primary speaks {primary}, backup speaks {backup}")]
    Version {
        /// The primary's version.
        primary: u16,
        /// The backup's version.
        backup: u16,
    },
    /// A parameter that differs between the two sides.
    #[error("{what} mismatch: primary has {primary}, backup has {backup}")]
    Mismatch {
        /// Which parameter.
        what: &'static str,
        /// The primary's value.
        primary: String,
        /// The backup's value.
        backup: String,
    },
    /// The backup refused the session.
    #[error("backup refused the session: {0}")]
    Refused(String),
}

/// The primary's opening message: everything both sides must agree on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Session protocol version.
    pub version: u16,
    /// Guest memory size in bytes.
    pub memory_size: u64,
    /// Page size (4096).
    pub page_size: u32,
    /// Block size.
    pub block_size: BlockSize,
    /// Encoding mode.
    pub mode: Mode,
    /// The hypervisor backend that runs the guest (the backup restores it with the same).
    pub backend: BackendKind,
    /// What the guest's memory holds besides its content (a built-in guest's ABI version).
    pub layout: GuestLayout,
    /// The guest's disk size in bytes (the primary's disk, the backup's replica); 0: no
    /// disk.
    pub disk_size: u64,
}

impl Hello {
    /// Encode as a frame.
    pub fn put(&self, out: &mut Vec<u8>) {
        let mut b = Vec::with_capacity(HELLO_LEN);
        b.extend_from_slice(&HELLO_MAGIC.to_le_bytes());
        b.extend_from_slice(&self.version.to_le_bytes());
        b.extend_from_slice(&self.memory_size.to_le_bytes());
        b.extend_from_slice(&self.page_size.to_le_bytes());
        b.extend_from_slice(&(self.block_size.bytes() as u32).to_le_bytes());
        b.push(self.mode as u8);
        b.push(self.backend.to_u8());
        b.extend_from_slice(&self.layout.to_u32().to_le_bytes());
        b.extend_from_slice(&self.disk_size.to_le_bytes());
        put_frame(out, FrameType::Hello, &b);
    }

    /// Parse a Hello body. The version is checked before anything else, so a peer of
    /// another version gets a version error, not a field error.
    pub fn parse(b: &[u8]) -> Result<Self, SessionError> {
        let magic = b.get(..8).ok_or(SessionError::Malformed("hello"))?;
        if magic != HELLO_MAGIC.to_le_bytes() {
            return Err(SessionError::BadMagic);
        }
        let version = u16::from_le_bytes([
            b.get(8).copied().unwrap_or(0),
            b.get(9).copied().unwrap_or(0),
        ]);
        if version != SESSION_VERSION {
            return Err(SessionError::Version {
                primary: version,
                backup: SESSION_VERSION,
            });
        }
        if b.len() != HELLO_LEN {
            return Err(SessionError::Malformed("hello"));
        }
        let memory_size = u64::from_le_bytes(
            b[10..18]
                .try_into()
                .map_err(|_| SessionError::Malformed("hello"))?,
        );
        let page_size = u32::from_le_bytes(
            b[18..22]
                .try_into()
                .map_err(|_| SessionError::Malformed("hello"))?,
        );
        let bs = u32::from_le_bytes(
            b[22..26]
                .try_into()
                .map_err(|_| SessionError::Malformed("hello"))?,
        );
        let block_size =
            BlockSize::new(bs).map_err(|_| SessionError::Malformed("hello (block size)"))?;
        let mode = Mode::from_u8(b[26]).ok_or(SessionError::Malformed("hello (mode)"))?;
        let backend =
            BackendKind::from_u8(b[27]).map_err(|_| SessionError::Malformed("hello (backend)"))?;
        let layout = GuestLayout::from_u32(u32::from_le_bytes(
            b[28..32]
                .try_into()
                .map_err(|_| SessionError::Malformed("hello"))?,
        ));
        let disk_size = u64::from_le_bytes(
            b[32..40]
                .try_into()
                .map_err(|_| SessionError::Malformed("hello"))?,
        );
        Ok(Self {
            version,
            memory_size,
            page_size,
            block_size,
            mode,
            backend,
            layout,
            disk_size,
        })
    }

    /// Check the primary's Hello against what the backup was configured with; the error
    /// names the first parameter that differs and both values. The backend comes first:
    /// when it differs, the other differences follow from it; the guest layout next.
    pub fn check_against(&self, backup: &Hello) -> Result<(), SessionError> {
        let mismatch = |what, p: String, b: String| {
            Err(SessionError::Mismatch {
                what,
                primary: p,
                backup: b,
            })
        };
        if self.backend != backup.backend {
            return mismatch(
                "backend",
                self.backend.to_string(),
                backup.backend.to_string(),
            );
        }
        if self.layout != backup.layout {
            return mismatch(
                "guest layout",
                self.layout.to_string(),
                backup.layout.to_string(),
            );
        }
        if self.memory_size != backup.memory_size {
            return mismatch(
                "guest memory size",
                self.memory_size.to_string(),
                backup.memory_size.to_string(),
            );
        }
        if self.disk_size != backup.disk_size {
            return mismatch(
                "disk size",
                disk_desc(self.disk_size),
                disk_desc(backup.disk_size),
            );
        }
        if self.page_size != backup.page_size {
            return mismatch(
                "page size",
                self.page_size.to_string(),
                backup.page_size.to_string(),
            );
        }
        if self.block_size != backup.block_size {
            return mismatch(
                "block size",
                self.block_size.to_string(),
                backup.block_size.to_string(),
            );
        }
        if self.mode != backup.mode {
            return mismatch("mode", self.mode.to_string(), backup.mode.to_string());
        }
        Ok(())
    }
}

/// A disk size as a refusal names it: the bytes, or that there is no disk.
fn disk_desc(size: u64) -> String {
    if size == 0 {
        "no disk (no --disk)".to_string()
    } else {
        size.to_string()
    }
}

/// The backup's answer to an accepted Hello.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Welcome {
    /// The first epoch the backup expects.
    pub next_epoch: u64,
    /// How long the backup waits for a frame before it declares the primary lost and
    /// takes over: a primary silent for that long may have been replaced.
    pub detect_timeout: std::time::Duration,
    /// The backup already holds an image of this guest's memory (an older copy, from a
    /// failed or switched-over primary): the primary compares fingerprints with it
    /// (MemSumRequest/MemSums) and sends only the pages that differ, instead of every
    /// non-zero page.
    pub holds_image: bool,
}

/// Length of a Welcome's body.
const WELCOME_LEN: usize = 8 + 8 + 1;

impl Welcome {
    /// Encode as a frame: `u64 next_epoch | u64 detection timeout in microseconds |
    /// u8 flags` (bit 0: holds an image).
    pub fn put(&self, out: &mut Vec<u8>) {
        let mut b = [0u8; WELCOME_LEN];
        b[..8].copy_from_slice(&self.next_epoch.to_le_bytes());
        let us = u64::try_from(self.detect_timeout.as_micros()).unwrap_or(u64::MAX);
        b[8..16].copy_from_slice(&us.to_le_bytes());
        b[16] = u8::from(self.holds_image);
        put_frame(out, FrameType::Welcome, &b);
    }

    /// Parse a Welcome body.
    pub fn parse(body: &[u8]) -> Result<Self, SessionError> {
        let b: &[u8; WELCOME_LEN] = body
            .try_into()
            .map_err(|_| SessionError::Malformed("welcome"))?;
        let next_epoch = parse_u64(&b[..8], "welcome")?;
        let us = parse_u64(&b[8..16], "welcome")?;
        if us == 0 {
            return Err(SessionError::Malformed("welcome (zero detection timeout)"));
        }
        if b[16] > 1 {
            return Err(SessionError::Malformed("welcome (unknown flags)"));
        }
        Ok(Self {
            next_epoch,
            detect_timeout: std::time::Duration::from_micros(us),
            holds_image: b[16] == 1,
        })
    }
}

/// Encode a Refuse with its reason.
pub fn put_refuse(out: &mut Vec<u8>, reason: &str) {
    put_frame(out, FrameType::Refuse, reason.as_bytes());
}

/// Encode an Ack of a committed epoch.
pub fn put_ack(out: &mut Vec<u8>, epoch: u64) {
    put_frame(out, FrameType::Ack, &epoch.to_le_bytes());
}

/// Encode a Handover (planned switchover) with its reason.
pub fn put_handover(out: &mut Vec<u8>, reason: &str) {
    put_frame(out, FrameType::Handover, reason.as_bytes());
}

/// Encode a stand-down with its reason.
pub fn put_stand_down(out: &mut Vec<u8>, reason: &str) {
    put_frame(out, FrameType::StandDown, reason.as_bytes());
}

/// Encode an abort with its reason (the backup failed and ends the session).
pub fn put_abort(out: &mut Vec<u8>, reason: &str) {
    put_frame(out, FrameType::Abort, reason.as_bytes());
}

/// Encode a heartbeat.
pub fn put_heartbeat(out: &mut Vec<u8>) {
    put_frame(out, FrameType::Heartbeat, &[]);
}

/// Parse the u64 body of an Ack.
pub fn parse_u64(body: &[u8], what: &'static str) -> Result<u64, SessionError> {
    let b: [u8; 8] = body.try_into().map_err(|_| SessionError::Malformed(what))?;
    Ok(u64::from_le_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::split_frame;

    fn hello() -> Hello {
        Hello {
            version: SESSION_VERSION,
            memory_size: 256 << 20,
            page_size: 4096,
            block_size: BlockSize::DEFAULT,
            mode: Mode::Fgbi,
            backend: BackendKind::Kvm,
            layout: BackendKind::Kvm.guest_layout(),
            disk_size: 0,
        }
    }

    #[test]
    fn hello_roundtrip_and_mismatches_name_both_values() {
        let mut out = Vec::new();
        hello().put(&mut out);
        let (ty, body, n) = split_frame(&out).unwrap().unwrap();
        assert_eq!((ty, n), (FrameType::Hello as u8, out.len()));
        let h = Hello::parse(body).unwrap();
        assert_eq!(h, hello());
        let backup = Hello {
            memory_size: 128 << 20,
            ..hello()
        };
        assert_eq!(
            h.check_against(&backup).unwrap_err().to_string(),
            "guest memory size mismatch: primary has 268435456, backup has 134217728"
        );
        let backup = Hello {
            mode: Mode::Remus,
            ..hello()
        };
        assert_eq!(
            h.check_against(&backup).unwrap_err().to_string(),
            "mode mismatch: primary has fgbi, backup has remus"
        );
        assert_eq!(h.check_against(&hello()), Ok(()));
    }

    #[test]
    fn a_backend_mismatch_names_both_kinds_before_anything_else() {
        let mut out = Vec::new();
        let xen = Hello {
            backend: BackendKind::Xen,
            ..hello()
        };
        xen.put(&mut out);
        let (_, body, _) = split_frame(&out).unwrap().unwrap();
        assert_eq!(body.len(), 40);
        assert_eq!(body[27], 2);
        assert_eq!(Hello::parse(body), Ok(xen));
        let e = hello().check_against(&xen).unwrap_err();
        assert_eq!(
            e,
            SessionError::Mismatch {
                what: "backend",
                primary: "kvm".into(),
                backup: "xen".into(),
            }
        );
        assert_eq!(
            e.to_string(),
            "backend mismatch: primary has kvm, backup has xen"
        );
        // The backend is named even when other parameters differ too.
        let backup = Hello {
            memory_size: 1 << 30,
            mode: Mode::Remus,
            ..xen
        };
        assert_eq!(
            hello().check_against(&backup).unwrap_err().to_string(),
            "backend mismatch: primary has kvm, backup has xen"
        );
    }

    #[test]
    fn a_guest_layout_mismatch_names_both_layouts() {
        let mut out = Vec::new();
        let next_abi = Hello {
            layout: GuestLayout::BuiltIn { abi: 99 },
            ..hello()
        };
        next_abi.put(&mut out);
        let (_, body, _) = split_frame(&out).unwrap().unwrap();
        assert_eq!(body[28..32], 99u32.to_le_bytes());
        assert_eq!(Hello::parse(body), Ok(next_abi));
        let ours = hello();
        assert_eq!(
            next_abi.check_against(&ours).unwrap_err().to_string(),
            format!(
                "guest layout mismatch: primary has built-in guest ABI v99, backup has \
                 built-in guest ABI v{}",
                ha_workloads::guest_abi::ABI_VERSION
            )
        );
        let opaque = Hello {
            layout: GuestLayout::Opaque,
            ..hello()
        };
        assert_eq!(
            opaque.check_against(&ours).unwrap_err().to_string(),
            format!(
                "guest layout mismatch: primary has opaque guest memory, backup has built-in \
                 guest ABI v{}",
                ha_workloads::guest_abi::ABI_VERSION
            )
        );
    }

    #[test]
    fn bad_hellos_are_refused_specifically() {
        let mut out = Vec::new();
        hello().put(&mut out);
        let body = &out[5..];
        let mut v = body.to_vec();
        v[8] = 4;
        assert_eq!(
            Hello::parse(&v),
            Err(SessionError::Version {
                primary: 4,
                backup: SESSION_VERSION
            })
        );
        let mut v = body.to_vec();
        v[0] ^= 1;
        assert_eq!(Hello::parse(&v), Err(SessionError::BadMagic));
        assert_eq!(
            Hello::parse(&body[..20]),
            Err(SessionError::Malformed("hello"))
        );
        let mut v = body.to_vec();
        v[26] = 9;
        assert_eq!(
            Hello::parse(&v),
            Err(SessionError::Malformed("hello (mode)"))
        );
        let mut v = body.to_vec();
        v[27] = 3;
        assert_eq!(
            Hello::parse(&v),
            Err(SessionError::Malformed("hello (backend)"))
        );
        // A version 2 Hello (no backend byte) is refused for its version, not its length.
        let mut v = body[..27].to_vec();
        v[8..10].copy_from_slice(&2u16.to_le_bytes());
        assert_eq!(
            Hello::parse(&v),
            Err(SessionError::Version {
                primary: 2,
                backup: SESSION_VERSION
            })
        );
        assert_eq!(
            Hello::parse(&body[..27]),
            Err(SessionError::Malformed("hello"))
        );
        // So is a version 4 Hello (no disk size).
        let mut v = body[..32].to_vec();
        v[8..10].copy_from_slice(&4u16.to_le_bytes());
        assert_eq!(
            Hello::parse(&v),
            Err(SessionError::Version {
                primary: 4,
                backup: SESSION_VERSION
            })
        );
        // So is a version 3 Hello (no guest layout).
        let mut v = body[..28].to_vec();
        v[8..10].copy_from_slice(&3u16.to_le_bytes());
        assert_eq!(
            Hello::parse(&v),
            Err(SessionError::Version {
                primary: 3,
                backup: SESSION_VERSION
            })
        );
        assert_eq!(Hello::parse(&[]), Err(SessionError::Malformed("hello")));
    }

    #[test]
    fn a_disk_mismatch_names_both_sizes_or_the_missing_disk() {
        let with = |disk_size| Hello {
            disk_size,
            ..hello()
        };
        let mut out = Vec::new();
        with(98304).put(&mut out);
        let (_, body, _) = split_frame(&out).unwrap().unwrap();
        assert_eq!(body[32..40], 98304u64.to_le_bytes());
        assert_eq!(Hello::parse(body), Ok(with(98304)));
        assert_eq!(with(98304).check_against(&with(98304)), Ok(()));
        assert_eq!(
            with(98304)
                .check_against(&with(65536))
                .unwrap_err()
                .to_string(),
            "disk size mismatch: primary has 98304, backup has 65536"
        );
        assert_eq!(
            with(98304).check_against(&with(0)).unwrap_err().to_string(),
            "disk size mismatch: primary has 98304, backup has no disk (no --disk)"
        );
        assert_eq!(
            with(0).check_against(&with(65536)).unwrap_err().to_string(),
            "disk size mismatch: primary has no disk (no --disk), backup has 65536"
        );
    }

    #[test]
    fn acks_and_welcome() {
        let w = Welcome {
            next_epoch: 7,
            detect_timeout: std::time::Duration::from_millis(75),
            holds_image: true,
        };
        let mut out = Vec::new();
        w.put(&mut out);
        let (ty, body, _) = split_frame(&out).unwrap().unwrap();
        assert_eq!(ty, FrameType::Welcome as u8);
        assert_eq!(Welcome::parse(body), Ok(w));
        assert_eq!(
            Welcome::parse(&body[..8]),
            Err(SessionError::Malformed("welcome"))
        );
        let mut zero = body.to_vec();
        zero[8..16].fill(0);
        assert!(Welcome::parse(&zero).is_err());
        let mut flags = body.to_vec();
        flags[16] = 2;
        assert_eq!(
            Welcome::parse(&flags),
            Err(SessionError::Malformed("welcome (unknown flags)"))
        );
        let mut out = Vec::new();
        put_ack(&mut out, 42);
        let (ty, body, _) = split_frame(&out).unwrap().unwrap();
        assert_eq!(ty, FrameType::Ack as u8);
        assert_eq!(parse_u64(body, "ack"), Ok(42));
        assert_eq!(
            parse_u64(&body[..3], "ack"),
            Err(SessionError::Malformed("ack"))
        );
    }
}
