//! Trace files of `ha-bench encoder`: a workload's harvested epochs on disk, so that
//! encoder builds can be compared on the very same pages, without a guest.
//!
//! Little-endian throughout: the magic `CASTRACE`, a version (u32), the workload's name
//! (u8 length + bytes) and the guest's memory size (u64); then per epoch its number (u64),
//! page count (u32), state length (u32, `u32::MAX`: no state), the page indices (u64
//! each), the pages (4096 bytes each) and the state.

use super::{Epoch, Trace};
use ha_codec::PAGE_SIZE;
use ha_workloads::guest_abi::Workload;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"CASTRACE";
const VERSION: u32 = 1;
const NO_STATE: u32 = u32::MAX;

/// Errors reading or writing a trace.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The file could not be read or written.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Not a trace file.
    #[error("not a trace file (bad magic)")]
    Magic,
    /// A trace version this build does not read.
    #[error("trace version {0}, expected {VERSION}")]
    Version(u32),
    /// A trace of another workload than the file's name says.
    #[error("trace of workload {found:?}, expected {expected}")]
    Workload {
        /// The workload the trace holds.
        found: String,
        /// The workload asked for.
        expected: &'static str,
    },
    /// Page indices not increasing or outside the guest's memory.
    #[error("epoch {0}: page indices not increasing inside guest memory")]
    Pages(u64),
}

/// The trace file of workload `w` in `dir`.
pub fn path(dir: &Path, w: Workload) -> PathBuf {
    dir.join(format!("{}.trace", w.name()))
}

/// Write `t` to `path`.
pub fn save(path: &Path, t: &Trace) -> Result<(), TraceError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = BufWriter::new(std::fs::File::create(path)?);
    f.write_all(MAGIC)?;
    f.write_all(&VERSION.to_le_bytes())?;
    let name = t.workload.name().as_bytes();
    f.write_all(&[name.len() as u8])?;
    f.write_all(name)?;
    f.write_all(&t.memory.to_le_bytes())?;
    for e in &t.epochs {
        f.write_all(&e.epoch.to_le_bytes())?;
        f.write_all(&(e.index.len() as u32).to_le_bytes())?;
        let state_len = e.state.as_ref().map_or(NO_STATE, |s| s.len() as u32);
        f.write_all(&state_len.to_le_bytes())?;
        for p in &e.index {
            f.write_all(&p.to_le_bytes())?;
        }
        f.write_all(&e.data)?;
        if let Some(s) = &e.state {
            f.write_all(s)?;
        }
    }
    f.flush()?;
    Ok(())
}

/// Read workload `w`'s trace from `path`.
pub fn load(path: &Path, w: Workload) -> Result<Trace, TraceError> {
    let mut f = BufReader::new(std::fs::File::open(path)?);
    let mut magic = [0u8; 8];
    f.read_exact(&mut magic)?;
    if &magic != MAGIC {
        return Err(TraceError::Magic);
    }
    let version = u32::from_le_bytes(array(&mut f)?);
    if version != VERSION {
        return Err(TraceError::Version(version));
    }
    let [len] = array::<1>(&mut f)?;
    let mut name = vec![0u8; usize::from(len)];
    f.read_exact(&mut name)?;
    if name != w.name().as_bytes() {
        return Err(TraceError::Workload {
            found: String::from_utf8_lossy(&name).into_owned(),
            expected: w.name(),
        });
    }
    let memory = u64::from_le_bytes(array(&mut f)?);
    let pages = memory / PAGE_SIZE as u64;
    let mut epochs = Vec::new();
    loop {
        let mut head = [0u8; 16];
        match f.read_exact(&mut head[..1]) {
            Ok(()) => f.read_exact(&mut head[1..])?,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e.into()),
        }
        let epoch = u64::from_le_bytes(head[..8].try_into().unwrap_or_default());
        let n = u32::from_le_bytes(head[8..12].try_into().unwrap_or_default());
        let state_len = u32::from_le_bytes(head[12..].try_into().unwrap_or_default());
        if u64::from(n) > pages {
            return Err(TraceError::Pages(epoch));
        }
        let mut index = Vec::with_capacity(n as usize);
        for _ in 0..n {
            index.push(u64::from_le_bytes(array(&mut f)?));
        }
        if !index.is_sorted_by(|a, b| a < b) || index.last().is_some_and(|&p| p >= pages) {
            return Err(TraceError::Pages(epoch));
        }
        let mut data = vec![0u8; n as usize * PAGE_SIZE];
        f.read_exact(&mut data)?;
        let state = if state_len == NO_STATE {
            None
        } else {
            let mut s = vec![0u8; state_len as usize];
            f.read_exact(&mut s)?;
            Some(s)
        };
        epochs.push(Epoch {
            epoch,
            index,
            data,
            state,
        });
    }
    Ok(Trace {
        workload: w,
        memory,
        epochs,
    })
}

fn array<const N: usize>(f: &mut impl Read) -> std::io::Result<[u8; N]> {
    let mut b = [0u8; N];
    f.read_exact(&mut b)?;
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trace_reads_back_as_written_and_a_damaged_one_is_refused() {
        let dir = std::env::temp_dir().join(format!("castor-trace-{}", std::process::id()));
        let t = Trace {
            workload: Workload::Web,
            memory: 16 * PAGE_SIZE as u64,
            epochs: vec![
                Epoch {
                    epoch: 0,
                    index: vec![1, 5],
                    data: vec![7u8; 2 * PAGE_SIZE],
                    state: None,
                },
                Epoch {
                    epoch: 1,
                    index: vec![3],
                    data: vec![9u8; PAGE_SIZE],
                    state: Some(vec![1, 2, 3]),
                },
            ],
        };
        let p = path(&dir, Workload::Web);
        save(&p, &t).unwrap();
        let back = load(&p, Workload::Web).unwrap();
        assert_eq!(back.memory, t.memory);
        assert_eq!(back.epochs.len(), 2);
        assert_eq!(back.epochs[0].index, vec![1, 5]);
        assert_eq!(back.epochs[0].state, None);
        assert_eq!(back.epochs[1].data, vec![9u8; PAGE_SIZE]);
        assert_eq!(back.epochs[1].state, Some(vec![1, 2, 3]));
        assert!(matches!(
            load(&p, Workload::Kv),
            Err(TraceError::Workload { .. })
        ));
        // Cut inside the last epoch's pages.
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
        assert!(matches!(load(&p, Workload::Web), Err(TraceError::Io(_))));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
