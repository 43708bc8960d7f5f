//! The disk replica and its journal: the disk half of the *commit* stage.
//!
//! A checkpoint's disk writes reach the replica only when its memory commits, and the apply
//! is crash-safe:
//!
//! 1. [`Replica::stage`]: the epoch's writes go into the journal (`<replica>.journal`),
//!    written whole and fsynced, marked *staged*. The replica is not touched.
//! 2. The memory image commits (the caller); if it does not, [`Replica::abandon`] clears
//!    the journal.
//! 3. [`Replica::mark_committed`]: the journal's mark byte becomes *committed*, fsynced —
//!    the durable record that checkpoint n committed, written before its ack.
//! 4. [`Replica::apply`]: the writes go to the replica, fsynced; then the journal is
//!    cleared (truncated to nothing, fsynced).
//!
//! [`Replica::open`] finds the journal a backup killed in the middle left behind: a
//! *committed* journal is replayed (the replica comes to checkpoint n, whatever part of the
//! apply had happened: the writes are whole overwrites, applied in order), a *staged* one
//! (its memory commit did not happen) or a torn one (a write cut short, its digest wrong)
//! is discarded, leaving the replica at checkpoint n−1. Either way memory and disk agree:
//! a restarted backup holds no memory image, and the ack log says which checkpoint the
//! world may have seen ack'd, which is never past the journal's committed mark.
//!
//! Journal format (little-endian): `"CASTORJ1"`, `u64 epoch`, `u8 mark` (0 staged, 1
//! committed), 7 zero bytes, `u64 writes`, `u64 body bytes`, the 32-byte blake3 digest of
//! the epoch, the count, and the body; then the body: per write `u64 offset`, `u32 length`,
//! the bytes.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ha_guest::domain::DiskWrite;

/// Magic at the start of a journal.
const MAGIC: &[u8; 8] = b"CASTORJ1";
/// Offset of the mark byte.
const MARK_AT: u64 = 16;
/// Bytes before the body.
const HEAD: usize = 8 + 8 + 8 + 8 + 8 + 32;
/// The mark of a journal whose memory commit has not happened (yet).
const STAGED: u8 = 0;
/// The mark of a journal whose checkpoint committed.
const COMMITTED: u8 = 1;

/// Errors of the replica and its journal.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// The replica or its journal cannot be opened.
    #[error("cannot open {path}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The replica's size is not a positive multiple of 4 KiB.
    #[error("disk replica {path} is {size} bytes, not a positive multiple of 4096")]
    Size {
        /// The replica.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// Writing the journal failed (a full disk, an I/O error).
    #[error("cannot write the disk journal {path}")]
    Journal {
        /// The journal.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Writing or reading the replica failed.
    #[error("cannot {op} the disk replica {path}")]
    Replica {
        /// "write", "read" or "sync".
        op: &'static str,
        /// The replica.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A write outside the replica (staging checks this; a journal may not be trusted).
    #[error("disk write at {offset} of {len} bytes is outside the {size}-byte replica")]
    Outside {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: usize,
        /// The replica's size.
        size: u64,
    },
}

/// What [`Replica::open`] found in the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovery {
    /// No journal, or an empty one.
    Clean,
    /// A committed journal, replayed: the replica is at this checkpoint.
    Replayed {
        /// The journal's epoch.
        epoch: u64,
        /// Writes replayed.
        writes: u64,
    },
    /// A journal that was not applied: its checkpoint's memory did not commit, or it is
    /// torn.
    Discarded {
        /// The journal's epoch, when its head could be read.
        epoch: Option<u64>,
        /// Why.
        why: &'static str,
    },
}

/// The backup's disk replica and its journal.
#[derive(Debug)]
pub struct Replica {
    file: File,
    path: PathBuf,
    size: u64,
    journal: File,
    journal_path: PathBuf,
    /// Bytes of the journal as last written.
    journal_bytes: u64,
}

/// The initial sync reads the replica's blocks for their fingerprints.
impl ha_wire::disksync::ReadAt for Replica {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
}

/// The journal beside a replica: `<replica>.journal`.
pub fn journal_path(replica: &Path) -> PathBuf {
    let mut p = replica.as_os_str().to_owned();
    p.push(".journal");
    PathBuf::from(p)
}

/// The size of the disk replica at `path` (a positive multiple of 4 KiB).
pub fn replica_size(path: &Path) -> Result<u64, ReplicaError> {
    let size = std::fs::metadata(path)
        .map_err(|source| ReplicaError::Open {
            path: path.to_owned(),
            source,
        })?
        .len();
    if size == 0 || !size.is_multiple_of(4096) {
        return Err(ReplicaError::Size {
            path: path.to_owned(),
            size,
        });
    }
    Ok(size)
}

impl Replica {
    /// Open the replica at `path` and its journal, and recover from a cut apply (see the
    /// module's rule).
    pub fn open(path: &Path) -> Result<(Self, Recovery), ReplicaError> {
        let size = replica_size(path)?;
        let open = |p: &Path, create: bool| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(create)
                .truncate(false)
                .open(p)
                .map_err(|source| ReplicaError::Open {
                    path: p.to_owned(),
                    source,
                })
        };
        let file = open(path, false)?;
        let journal_path = journal_path(path);
        let journal = open(&journal_path, true)?;
        let mut r = Self {
            file,
            path: path.to_owned(),
            size,
            journal,
            journal_path,
            journal_bytes: 0,
        };
        let recovery = r.recover()?;
        Ok((r, recovery))
    }

    /// The replica's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The replica's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes of the journal as last written (0 once cleared).
    pub fn journal_bytes(&self) -> u64 {
        self.journal_bytes
    }

    /// Step 1: write epoch `epoch`'s writes into the journal, marked staged, and fsync it.
    pub fn stage(&mut self, epoch: u64, writes: &[DiskWrite]) -> Result<(), ReplicaError> {
        let mut body = Vec::with_capacity(writes.iter().map(|w| w.data.len() + 12).sum());
        for w in writes {
            body.extend_from_slice(&w.offset.to_le_bytes());
            body.extend_from_slice(&(w.data.len() as u32).to_le_bytes());
            body.extend_from_slice(&w.data);
        }
        let count = writes.len() as u64;
        let mut buf = Vec::with_capacity(HEAD + body.len());
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&epoch.to_le_bytes());
        buf.push(STAGED);
        buf.extend_from_slice(&[0; 7]);
        buf.extend_from_slice(&count.to_le_bytes());
        buf.extend_from_slice(&(body.len() as u64).to_le_bytes());
        buf.extend_from_slice(&digest(epoch, count, &body));
        buf.extend_from_slice(&body);
        let res = self
            .journal
            .set_len(0)
            .and_then(|()| self.journal.write_all_at(&buf, 0))
            .and_then(|()| self.journal.sync_data());
        if let Err(source) = res {
            // A torn journal is discarded at the next start anyway; leave none if we can.
            let _ = self.journal.set_len(0);
            self.journal_bytes = 0;
            return Err(self.journal_error(source));
        }
        self.journal_bytes = buf.len() as u64;
        Ok(())
    }

    /// Step 2 failed: the memory commit did not happen; clear the staged journal.
    pub fn abandon(&mut self) -> Result<(), ReplicaError> {
        self.clear()
    }

    /// Step 3: mark the staged journal committed and fsync it.
    pub fn mark_committed(&mut self) -> Result<(), ReplicaError> {
        self.journal
            .write_all_at(&[COMMITTED], MARK_AT)
            .and_then(|()| self.journal.sync_data())
            .map_err(|source| self.journal_error(source))
    }

    /// Step 4: write `writes` to the replica in order, fsync it, and clear the journal.
    pub fn apply(&mut self, writes: &[DiskWrite]) -> Result<(), ReplicaError> {
        for w in writes {
            let inside = w
                .offset
                .checked_add(w.data.len() as u64)
                .is_some_and(|end| end <= self.size);
            if !inside {
                return Err(ReplicaError::Outside {
                    offset: w.offset,
                    len: w.data.len(),
                    size: self.size,
                });
            }
            self.file
                .write_all_at(&w.data, w.offset)
                .map_err(|source| self.replica_error("write", source))?;
        }
        self.file
            .sync_data()
            .map_err(|source| self.replica_error("sync", source))?;
        self.clear()
    }

    /// blake3 of the whole replica.
    pub fn digest(&self) -> Result<[u8; 32], ReplicaError> {
        let mut h = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut at = 0u64;
        while at < self.size {
            let n = (self.size - at).min(buf.len() as u64) as usize;
            self.file
                .read_exact_at(&mut buf[..n], at)
                .map_err(|source| self.replica_error("read", source))?;
            h.update(&buf[..n]);
            at += n as u64;
        }
        Ok(*h.finalize().as_bytes())
    }

    fn clear(&mut self) -> Result<(), ReplicaError> {
        self.journal
            .set_len(0)
            .and_then(|()| self.journal.sync_data())
            .map_err(|source| self.journal_error(source))?;
        self.journal_bytes = 0;
        Ok(())
    }

    /// Read the journal left behind and replay or discard it.
    fn recover(&mut self) -> Result<Recovery, ReplicaError> {
        let len = self
            .journal
            .metadata()
            .map_err(|source| self.journal_error(source))?
            .len();
        if len == 0 {
            return Ok(Recovery::Clean);
        }
        let mut buf = vec![0u8; usize::try_from(len).unwrap_or(usize::MAX).min(1 << 30)];
        self.journal
            .read_exact_at(&mut buf, 0)
            .map_err(|source| self.journal_error(source))?;
        let recovery = match parse(&buf) {
            Err((epoch, why)) => Recovery::Discarded { epoch, why },
            Ok((epoch, STAGED, _)) => Recovery::Discarded {
                epoch: Some(epoch),
                why: "its checkpoint's memory commit did not happen",
            },
            Ok((epoch, _, writes)) => {
                let n = writes.len() as u64;
                // `apply` clears the journal once the replica is synced.
                self.apply(&writes)?;
                return Ok(Recovery::Replayed { epoch, writes: n });
            }
        };
        self.clear()?;
        Ok(recovery)
    }

    fn journal_error(&self, source: std::io::Error) -> ReplicaError {
        ReplicaError::Journal {
            path: self.journal_path.clone(),
            source,
        }
    }

    fn replica_error(&self, op: &'static str, source: std::io::Error) -> ReplicaError {
        ReplicaError::Replica {
            op,
            path: self.path.clone(),
            source,
        }
    }
}

/// The digest that seals a journal: its epoch, its count and its body.
fn digest(epoch: u64, count: u64, body: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&epoch.to_le_bytes());
    h.update(&count.to_le_bytes());
    h.update(body);
    *h.finalize().as_bytes()
}

/// A journal's epoch, mark and writes; or, when it cannot be trusted, its epoch if the
/// head was readable and why.
type Parsed = Result<(u64, u8, Vec<DiskWrite>), (Option<u64>, &'static str)>;

fn parse(b: &[u8]) -> Parsed {
    let word = |at: usize| -> Option<u64> {
        Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
    };
    if b.get(..8) != Some(&MAGIC[..]) {
        return Err((None, "it is not a journal (bad magic)"));
    }
    let Some(epoch) = word(8) else {
        return Err((None, "it is torn (cut short in its head)"));
    };
    let torn = Err((Some(epoch), "it is torn (cut short or altered)"));
    let (Some(count), Some(len)) = (word(24), word(32)) else {
        return torn;
    };
    let mark = b[16];
    let Some(body) = usize::try_from(len)
        .ok()
        .and_then(|len| b.get(HEAD..HEAD.checked_add(len)?))
    else {
        return torn;
    };
    if b.get(40..72) != Some(&digest(epoch, count, body)[..]) || mark > COMMITTED {
        return torn;
    }
    let mut writes = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        let Some((offset, n, tail)) = rest.split_at_checked(12).and_then(|(h, t)| {
            let offset = u64::from_le_bytes(h[..8].try_into().ok()?);
            let n = u32::from_le_bytes(h[8..].try_into().ok()?) as usize;
            Some((offset, n, t))
        }) else {
            return torn;
        };
        let Some((data, tail)) = tail.split_at_checked(n) else {
            return torn;
        };
        writes.push(DiskWrite {
            offset,
            data: data.to_vec(),
        });
        rest = tail;
    }
    if writes.len() as u64 != count {
        return torn;
    }
    Ok((epoch, mark, writes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(dir: &Path, fill: u8) -> PathBuf {
        let p = dir.join("replica.img");
        std::fs::write(&p, vec![fill; 8 * 4096]).unwrap();
        p
    }

    fn writes(byte: u8) -> Vec<DiskWrite> {
        vec![
            DiskWrite {
                offset: 4096,
                data: vec![byte; 1024],
            },
            DiskWrite {
                offset: 4096 + 512,
                data: vec![byte + 1; 512],
            },
        ]
    }

    fn expect(fill: u8, ws: &[DiskWrite]) -> Vec<u8> {
        let mut d = vec![fill; 8 * 4096];
        for w in ws {
            let at = w.offset as usize;
            d[at..at + w.data.len()].copy_from_slice(&w.data);
        }
        d
    }

    #[test]
    fn stage_commit_apply_leaves_the_writes_and_no_journal() {
        let dir = tempfile::tempdir().unwrap();
        let p = replica(dir.path(), 0);
        let (mut r, rec) = Replica::open(&p).unwrap();
        assert_eq!(rec, Recovery::Clean);
        assert_eq!(r.size(), 8 * 4096);
        r.stage(3, &writes(5)).unwrap();
        assert!(r.journal_bytes() > 1536);
        assert_eq!(std::fs::read(&p).unwrap(), vec![0; 8 * 4096], "untouched");
        r.mark_committed().unwrap();
        r.apply(&writes(5)).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), expect(0, &writes(5)));
        assert_eq!(std::fs::metadata(journal_path(&p)).unwrap().len(), 0);
        assert_eq!(
            r.digest().unwrap(),
            *blake3::hash(&expect(0, &writes(5))).as_bytes()
        );
    }

    #[test]
    fn a_committed_journal_is_replayed_after_a_cut_apply() {
        let dir = tempfile::tempdir().unwrap();
        let p = replica(dir.path(), 0);
        {
            let (mut r, _) = Replica::open(&p).unwrap();
            r.stage(7, &writes(5)).unwrap();
            r.mark_committed().unwrap();
            // Killed during the apply: only the first write reached the replica.
            r.file.write_all_at(&writes(5)[0].data, 4096).unwrap();
        }
        let (r, rec) = Replica::open(&p).unwrap();
        assert_eq!(
            rec,
            Recovery::Replayed {
                epoch: 7,
                writes: 2
            }
        );
        assert_eq!(std::fs::read(&p).unwrap(), expect(0, &writes(5)));
        assert_eq!(r.journal_bytes(), 0);
        assert_eq!(std::fs::metadata(journal_path(&p)).unwrap().len(), 0);
        // Opened again: nothing left to do.
        assert_eq!(Replica::open(&p).unwrap().1, Recovery::Clean);
    }

    #[test]
    fn a_staged_or_torn_journal_is_discarded_and_the_replica_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let p = replica(dir.path(), 9);
        {
            let (mut r, _) = Replica::open(&p).unwrap();
            r.stage(4, &writes(5)).unwrap();
            // Killed before the memory commit's mark.
        }
        let (mut r, rec) = Replica::open(&p).unwrap();
        assert_eq!(
            rec,
            Recovery::Discarded {
                epoch: Some(4),
                why: "its checkpoint's memory commit did not happen"
            }
        );
        assert_eq!(std::fs::read(&p).unwrap(), vec![9; 8 * 4096]);
        // Torn: every cut of a committed journal is discarded, never half-applied.
        r.stage(5, &writes(1)).unwrap();
        r.mark_committed().unwrap();
        drop(r);
        let whole = std::fs::read(journal_path(&p)).unwrap();
        for cut in 1..whole.len() {
            std::fs::write(journal_path(&p), &whole[..cut]).unwrap();
            let (_, rec) = Replica::open(&p).unwrap();
            assert!(matches!(rec, Recovery::Discarded { .. }), "cut {cut}");
            assert_eq!(std::fs::read(&p).unwrap(), vec![9; 8 * 4096], "cut {cut}");
        }
        // Altered: discarded too.
        let mut bad = whole.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        std::fs::write(journal_path(&p), &bad).unwrap();
        assert!(matches!(
            Replica::open(&p).unwrap().1,
            Recovery::Discarded { epoch: Some(5), .. }
        ));
        assert_eq!(std::fs::read(&p).unwrap(), vec![9; 8 * 4096]);
    }

    #[test]
    fn bad_replicas_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("odd.img");
        std::fs::write(&p, vec![0; 5000]).unwrap();
        assert!(matches!(
            Replica::open(&p),
            Err(ReplicaError::Size { size: 5000, .. })
        ));
        assert!(matches!(
            Replica::open(&dir.path().join("missing.img")),
            Err(ReplicaError::Open { .. })
        ));
        let p = replica(dir.path(), 0);
        let (mut r, _) = Replica::open(&p).unwrap();
        let outside = [DiskWrite {
            offset: 8 * 4096 - 512,
            data: vec![1; 1024],
        }];
        assert!(matches!(
            r.apply(&outside),
            Err(ReplicaError::Outside { .. })
        ));
    }
}
