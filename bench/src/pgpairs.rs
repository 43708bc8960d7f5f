//! Reader for PGPAIRS files: (old, new) page pairs captured from real guest memory.
//!
//! The files in `shared/data/pagepairs/` (see the README there) hold the 4 KiB pages that
//! changed between two consecutive memory dumps of a guest. After optional zstd
//! decompression (files starting with the zstd magic `28 b5 2f fd`; others are read as
//! they are) a file is a 16-byte header — ASCII `PGPAIRS1`, u32 LE page size (4096), u32 LE
//! record count — followed by the records, sorted by page index: u64 LE guest page frame
//! index, 4096 bytes old content, 4096 bytes new content.
//!
//! [`read_pgpairs`] validates all of it and reports every problem as a [`PgPairsError`]
//! naming the file; it never panics on malformed input.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use ruzstd::decoding::errors::{FrameDecoderError, ReadFrameHeaderError};
use ruzstd::decoding::{BlockDecodingStrategy, FrameDecoder};

use crate::cases::{PAGE, PagePairs};

/// The file magic, the first 8 bytes of the (decompressed) content.
pub const MAGIC: [u8; 8] = *b"PGPAIRS1";

/// The zstd frame magic, little-endian `0xFD2FB528`.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// Header size: magic, page size, record count.
const HEADER: usize = 16;

/// Record size: page index, old page, new page.
const RECORD: usize = 8 + 2 * PAGE;

/// A PGPAIRS file's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgPairsFile {
    /// The page pairs in file order; `name` is the file name without `.pgpairs[.zst]`.
    pub pairs: PagePairs,
    /// Guest page frame index of each pair, strictly increasing.
    pub page_index: Vec<u64>,
}

/// Why a PGPAIRS file could not be read. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum PgPairsError {
    /// The file could not be read.
    #[error("{}: cannot read: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The zstd stream is corrupt or truncated.
    #[error("{}: zstd decompression failed: {detail}", path.display())]
    Zstd {
        /// The file.
        path: PathBuf,
        /// The decoder's description of the problem.
        detail: String,
    },
    /// A zstd frame's content checksum does not match its decompressed content.
    #[error(
        "{}: zstd checksum mismatch (stored {stored:#010x}, computed {computed:#010x})",
        path.display()
    )]
    ZstdChecksum {
        /// The file.
        path: PathBuf,
        /// The checksum stored in the frame.
        stored: u32,
        /// The checksum of the decompressed content.
        computed: u32,
    },
    /// The content is shorter than the 16-byte header.
    #[error("{}: {len} bytes, too short for the 16-byte PGPAIRS header", path.display())]
    ShortHeader {
        /// The file.
        path: PathBuf,
        /// Length of the (decompressed) content.
        len: usize,
    },
    /// The content does not start with `PGPAIRS1`.
    #[error("{}: bad magic {found:02x?}, expected \"PGPAIRS1\"", path.display())]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// The first 8 bytes found.
        found: [u8; 8],
    },
    /// The header's page size is not 4096.
    #[error("{}: page size {found} in header, expected 4096", path.display())]
    PageSize {
        /// The file.
        path: PathBuf,
        /// The page size in the header.
        found: u32,
    },
    /// The content ends inside a record that the header says is there.
    #[error(
        "{}: truncated record {record}: {have} of its {RECORD} bytes present (header says {count} records)",
        path.display()
    )]
    TruncatedRecord {
        /// The file.
        path: PathBuf,
        /// Index of the incomplete record.
        record: u64,
        /// Bytes of it present.
        have: usize,
        /// Record count in the header.
        count: u32,
    },
    /// The content holds a different number of whole records than the header says.
    #[error("{}: header says {header} records, file holds {found}", path.display())]
    CountMismatch {
        /// The file.
        path: PathBuf,
        /// Record count in the header.
        header: u32,
        /// Whole records present.
        found: u64,
    },
    /// Bytes follow the last record that do not form whole records.
    #[error("{}: {extra} trailing bytes after the last of {count} records", path.display())]
    TrailingBytes {
        /// The file.
        path: PathBuf,
        /// Number of extra bytes.
        extra: u64,
        /// Record count in the header.
        count: u32,
    },
    /// Page indices are not strictly increasing.
    #[error(
        "{}: record {record} has page index {index}, not above the previous {prev}",
        path.display()
    )]
    IndexOrder {
        /// The file.
        path: PathBuf,
        /// Index of the offending record.
        record: usize,
        /// The previous record's page index.
        prev: u64,
        /// This record's page index.
        index: u64,
    },
    /// The declared content does not fit in memory on this platform.
    #[error("{}: {count} records do not fit in this platform's address space", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Record count in the header.
        count: u32,
    },
}

/// Reads and validates a PGPAIRS file, zstd-compressed or plain.
pub fn read_pgpairs(path: &Path) -> Result<PgPairsFile, PgPairsError> {
    let raw = std::fs::read(path).map_err(|source| PgPairsError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &raw)
}

/// Parses the bytes of a PGPAIRS file; `path` is only used for naming and errors.
fn parse(path: &Path, raw: &[u8]) -> Result<PgPairsFile, PgPairsError> {
    let content = if raw.starts_with(&ZSTD_MAGIC) {
        decompress(path, raw)?
    } else {
        Content {
            bytes: raw.to_vec(),
            excess: 0,
        }
    };
    let header = check_header(path, &content.bytes)?.ok_or(PgPairsError::ShortHeader {
        path: path.to_path_buf(),
        len: content.bytes.len(),
    })?;
    // Kept and dropped (beyond the declared size) bytes after the header.
    let body = content.bytes.len().saturating_sub(HEADER) as u64 + content.excess;
    let expected = u64::from(header.count) * RECORD as u64;
    let record = RECORD as u64;
    if body != expected {
        let whole = body / record;
        let partial = body % record;
        return Err(if body < expected && partial != 0 {
            PgPairsError::TruncatedRecord {
                path: path.to_path_buf(),
                record: whole,
                have: usize::try_from(partial).unwrap_or(usize::MAX),
                count: header.count,
            }
        } else if body > expected && partial != 0 {
            PgPairsError::TrailingBytes {
                path: path.to_path_buf(),
                extra: body - expected,
                count: header.count,
            }
        } else {
            PgPairsError::CountMismatch {
                path: path.to_path_buf(),
                header: header.count,
                found: whole,
            }
        });
    }
    let count = header.count as usize;
    let body = content.bytes.get(HEADER..).unwrap_or_default();
    let mut page_index = Vec::with_capacity(count);
    let mut old = Vec::with_capacity(count * PAGE);
    let mut new = Vec::with_capacity(count * PAGE);
    for (i, rec) in body.chunks_exact(RECORD).enumerate() {
        // `rec` is exactly RECORD = 8 + 2 * PAGE bytes, so these splits are in bounds.
        let (idx, pages) = rec.split_at(8);
        let (o, n) = pages.split_at(PAGE);
        let mut idx_bytes = [0u8; 8];
        idx_bytes.copy_from_slice(idx);
        let index = u64::from_le_bytes(idx_bytes);
        if let Some(&prev) = page_index.last()
            && index <= prev
        {
            return Err(PgPairsError::IndexOrder {
                path: path.to_path_buf(),
                record: i,
                prev,
                index,
            });
        }
        page_index.push(index);
        old.extend_from_slice(o);
        new.extend_from_slice(n);
    }
    Ok(PgPairsFile {
        pairs: PagePairs {
            name: file_stem(path),
            old,
            new,
        },
        page_index,
    })
}

/// The file name without `.zst` and `.pgpairs`.
fn file_stem(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = name.strip_suffix(".zst").unwrap_or(&name);
    name.strip_suffix(".pgpairs").unwrap_or(name).to_string()
}

/// The validated header fields.
#[derive(Debug, Clone, Copy)]
struct Header {
    count: u32,
}

/// Validates the header if `bytes` holds one: `Ok(None)` if it is shorter than 16 bytes.
fn check_header(path: &Path, bytes: &[u8]) -> Result<Option<Header>, PgPairsError> {
    let Some((magic, rest)) = bytes.split_first_chunk::<8>() else {
        return Ok(None);
    };
    let Some((page_size, rest)) = rest.split_first_chunk::<4>() else {
        return Ok(None);
    };
    let Some((count, _)) = rest.split_first_chunk::<4>() else {
        return Ok(None);
    };
    if *magic != MAGIC {
        return Err(PgPairsError::BadMagic {
            path: path.to_path_buf(),
            found: *magic,
        });
    }
    let page_size = u32::from_le_bytes(*page_size);
    if page_size as usize != PAGE {
        return Err(PgPairsError::PageSize {
            path: path.to_path_buf(),
            found: page_size,
        });
    }
    let count = u32::from_le_bytes(*count);
    if usize::try_from(u64::from(count) * RECORD as u64 + HEADER as u64).is_err() {
        return Err(PgPairsError::TooLarge {
            path: path.to_path_buf(),
            count,
        });
    }
    Ok(Some(Header { count }))
}

/// Decompressed content: the bytes kept, and how many further bytes were decoded but
/// dropped because they lie beyond what the header declares (only counted).
#[derive(Debug)]
struct Content {
    bytes: Vec<u8>,
    excess: u64,
}

/// A writer that keeps bytes up to `limit` and only counts the rest, so that a stream
/// decompressing to more than its header declares cannot exhaust memory.
#[derive(Debug)]
struct CappedSink {
    bytes: Vec<u8>,
    limit: usize,
    excess: u64,
}

impl CappedSink {
    /// Bytes written so far, kept or not.
    fn decoded(&self) -> u64 {
        self.bytes.len() as u64 + self.excess
    }
}

impl Write for CappedSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = self.limit.saturating_sub(self.bytes.len());
        let (keep, drop) = buf.split_at(room.min(buf.len()));
        self.bytes.extend_from_slice(keep);
        self.excess += drop.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Decompresses all zstd frames of `raw` (skippable frames are skipped), checking content
/// checksums and the PGPAIRS header as soon as it is available.
fn decompress(path: &Path, raw: &[u8]) -> Result<Content, PgPairsError> {
    let zstd_err = |detail: String| PgPairsError::Zstd {
        path: path.to_path_buf(),
        detail,
    };
    let mut sink = CappedSink {
        bytes: Vec::new(),
        limit: usize::MAX,
        excess: 0,
    };
    let mut header_seen = false;
    let mut input = raw;
    let mut decoder = FrameDecoder::new();
    while !input.is_empty() {
        // Frame header descriptor: whether the frame declares its content size.
        let declares_size = input
            .get(4)
            .is_some_and(|&d| d >> 6 != 0 || (d >> 5) & 1 == 1);
        let decoded_before = sink.decoded();
        match decoder.init(&mut input) {
            Ok(()) => {}
            Err(FrameDecoderError::ReadFrameHeaderError(ReadFrameHeaderError::SkipFrame {
                length,
                ..
            })) => {
                input = usize::try_from(length)
                    .ok()
                    .and_then(|len| input.get(len..))
                    .ok_or_else(|| zstd_err("truncated skippable frame".to_string()))?;
                continue;
            }
            Err(e) => return Err(zstd_err(e.to_string())),
        }
        loop {
            let finished = decoder
                .decode_blocks(&mut input, BlockDecodingStrategy::UptoBytes(1 << 20))
                .map_err(|e| zstd_err(e.to_string()))?;
            decoder
                .collect_to_writer(&mut sink)
                .map_err(|e| zstd_err(e.to_string()))?;
            if !header_seen && let Some(header) = check_header(path, &sink.bytes)? {
                header_seen = true;
                // check_header verified that this fits in usize.
                sink.limit = HEADER + header.count as usize * RECORD;
            }
            if finished {
                break;
            }
        }
        // Drain what the decoder retained as its window.
        decoder
            .collect_to_writer(&mut sink)
            .map_err(|e| zstd_err(e.to_string()))?;
        let decoded = sink.decoded() - decoded_before;
        if declares_size && decoded != decoder.content_size() {
            return Err(zstd_err(format!(
                "frame declares {} bytes of content but holds {decoded}",
                decoder.content_size()
            )));
        }
        if let (Some(stored), Some(computed)) = (
            decoder.get_checksum_from_data(),
            decoder.get_calculated_checksum(),
        ) && stored != computed
        {
            return Err(PgPairsError::ZstdChecksum {
                path: path.to_path_buf(),
                stored,
                computed,
            });
        }
    }
    Ok(Content {
        bytes: sink.bytes,
        excess: sink.excess,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHARED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data/pagepairs");

    fn record(index: u64, old: u8, new: u8) -> Vec<u8> {
        let mut r = index.to_le_bytes().to_vec();
        r.extend(std::iter::repeat_n(old, PAGE));
        r.extend(std::iter::repeat_n(new, PAGE));
        r
    }

    /// A plain PGPAIRS file with the given header fields and records.
    fn file(magic: &[u8; 8], page_size: u32, count: u32, indices: &[u64]) -> Vec<u8> {
        let mut f = magic.to_vec();
        f.extend_from_slice(&page_size.to_le_bytes());
        f.extend_from_slice(&count.to_le_bytes());
        for (k, &i) in indices.iter().enumerate() {
            // k < 3 in the tests: the u8 conversion is lossless.
            let k = u8::try_from(k % 100).unwrap();
            f.extend(record(i, k, k + 100));
        }
        f
    }

    fn valid() -> Vec<u8> {
        file(&MAGIC, 4096, 3, &[5, 9, 1 << 40])
    }

    /// zstd-compresses `data` with ruzstd's encoder (with content checksum).
    fn zstd(data: &[u8]) -> Vec<u8> {
        ruzstd::encoding::compress_to_vec(data, ruzstd::encoding::CompressionLevel::Fastest)
    }

    fn p() -> &'static Path {
        Path::new("/x/test.pgpairs")
    }

    #[test]
    fn reads_valid_plain_and_compressed() {
        for bytes in [valid(), zstd(&valid())] {
            let f = parse(Path::new("/x/small_1.pgpairs.zst"), &bytes).unwrap();
            assert_eq!(f.pairs.name, "small_1");
            assert_eq!(f.page_index, [5, 9, 1 << 40]);
            assert_eq!(f.pairs.len(), 3);
            let (o, n) = f.pairs.pair(2);
            assert!(o.iter().all(|&b| b == 2) && n.iter().all(|&b| b == 102));
        }
        let empty = parse(p(), &file(&MAGIC, 4096, 0, &[])).unwrap();
        assert!(empty.pairs.is_empty() && empty.page_index.is_empty());
    }

    #[test]
    fn reads_shared_files() {
        let mut seen = 0;
        // Record counts as read from the headers with the reference `zstd` tool.
        for (name, expected) in [
            ("httpd_100ms_1", 348),
            ("mw_100ms_1", 1093),
            ("gzip_1s_1", 269),
            ("gzchurn_100ms_1", 776),
        ] {
            let path = Path::new(SHARED).join(format!("{name}.pgpairs.zst"));
            let raw = std::fs::read(&path).unwrap();
            let f = read_pgpairs(&path).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(f.pairs.name, name);
            // The header's count, independently decoded from the decompressed stream.
            let mut plain = Vec::new();
            let mut dec = ruzstd::decoding::StreamingDecoder::new(&raw[..]).unwrap();
            io::Read::read_to_end(&mut dec, &mut plain).unwrap();
            let count = u32::from_le_bytes(plain[12..16].try_into().unwrap()) as usize;
            assert_eq!(count, expected, "{name}");
            assert_eq!(f.pairs.len(), count, "{name}");
            assert_eq!(f.page_index.len(), count, "{name}");
            assert_eq!(plain.len(), HEADER + count * RECORD);
            for i in 0..f.pairs.len() {
                let (o, n) = f.pairs.pair(i);
                assert_ne!(o, n, "{name}: record {i} did not change");
            }
            assert!(f.page_index.windows(2).all(|w| w[0] < w[1]));
            // 256 MiB guest: frame indices below 65536.
            assert!(f.page_index.iter().all(|&i| i < 65536), "{name}");
            seen += 1;
        }
        assert_eq!(seen, 4);
    }

    #[test]
    fn missing_file_is_io_error() {
        let e = read_pgpairs(Path::new("/nonexistent/nope.pgpairs")).unwrap_err();
        assert!(matches!(e, PgPairsError::Io { .. }), "{e}");
        assert!(e.to_string().contains("/nonexistent/nope.pgpairs"));
    }

    #[test]
    fn rejects_bad_magic() {
        for bytes in [
            file(b"PGPAIRS2", 4096, 3, &[5, 9, 10]),
            zstd(&file(b"PGPAIRS2", 4096, 3, &[5, 9, 10])),
        ] {
            let e = parse(p(), &bytes).unwrap_err();
            assert!(
                matches!(e, PgPairsError::BadMagic { found, .. } if &found == b"PGPAIRS2"),
                "{e}"
            );
            assert!(
                e.to_string().starts_with("/x/test.pgpairs: bad magic"),
                "{e}"
            );
        }
    }

    #[test]
    fn rejects_wrong_page_size() {
        let e = parse(p(), &file(&MAGIC, 8192, 3, &[5, 9, 10])).unwrap_err();
        assert!(
            matches!(e, PgPairsError::PageSize { found: 8192, .. }),
            "{e}"
        );
    }

    #[test]
    fn rejects_short_header() {
        for len in 0..HEADER {
            let e = parse(p(), &valid()[..len]).unwrap_err();
            assert!(
                matches!(e, PgPairsError::ShortHeader { len: l, .. } if l == len),
                "{e}"
            );
        }
    }

    #[test]
    fn rejects_truncated_record() {
        let mut v = valid();
        v.truncate(v.len() - 100);
        let e = parse(p(), &v).unwrap_err();
        assert!(
            matches!(e, PgPairsError::TruncatedRecord { record: 2, have, count: 3, .. } if have == RECORD - 100),
            "{e}"
        );
        let e = parse(p(), &zstd(&v)).unwrap_err();
        assert!(
            matches!(e, PgPairsError::TruncatedRecord { record: 2, .. }),
            "{e}"
        );
    }

    #[test]
    fn rejects_count_mismatch() {
        let e = parse(p(), &file(&MAGIC, 4096, 3, &[5, 9])).unwrap_err();
        assert!(
            matches!(
                e,
                PgPairsError::CountMismatch {
                    header: 3,
                    found: 2,
                    ..
                }
            ),
            "{e}"
        );
        let e = parse(p(), &file(&MAGIC, 4096, 1, &[5, 9])).unwrap_err();
        assert!(
            matches!(
                e,
                PgPairsError::CountMismatch {
                    header: 1,
                    found: 2,
                    ..
                }
            ),
            "{e}"
        );
        // Huge declared counts with little data are a mismatch, not an allocation.
        let e = parse(p(), &zstd(&file(&MAGIC, 4096, u32::MAX, &[5, 9]))).unwrap_err();
        assert!(
            matches!(e, PgPairsError::CountMismatch { found: 2, .. }),
            "{e}"
        );
    }

    #[test]
    fn rejects_trailing_bytes() {
        let mut v = valid();
        v.extend_from_slice(&[0; 5]);
        let e = parse(p(), &v).unwrap_err();
        assert!(
            matches!(
                e,
                PgPairsError::TrailingBytes {
                    extra: 5,
                    count: 3,
                    ..
                }
            ),
            "{e}"
        );
        // Compressed: the excess is counted, not kept.
        let mut v = valid();
        v.extend(std::iter::repeat_n(7, RECORD + 3));
        let e = parse(p(), &zstd(&v)).unwrap_err();
        assert!(
            matches!(e, PgPairsError::TrailingBytes { extra, .. } if extra == RECORD as u64 + 3),
            "{e}"
        );
    }

    #[test]
    fn rejects_non_increasing_indices() {
        let e = parse(p(), &file(&MAGIC, 4096, 3, &[5, 9, 9])).unwrap_err();
        assert!(
            matches!(
                e,
                PgPairsError::IndexOrder {
                    record: 2,
                    prev: 9,
                    index: 9,
                    ..
                }
            ),
            "{e}"
        );
        let e = parse(p(), &file(&MAGIC, 4096, 3, &[5, 4, 9])).unwrap_err();
        assert!(
            matches!(
                e,
                PgPairsError::IndexOrder {
                    record: 1,
                    prev: 5,
                    index: 4,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn rejects_corrupt_zstd() {
        let z = zstd(&valid());
        // Truncated stream.
        let e = parse(p(), &z[..z.len() / 2]).unwrap_err();
        assert!(matches!(e, PgPairsError::Zstd { .. }), "{e}");
        // Only the magic.
        let e = parse(p(), &ZSTD_MAGIC).unwrap_err();
        assert!(matches!(e, PgPairsError::Zstd { .. }), "{e}");
        // Garbage after a valid frame.
        let mut g = z.clone();
        g.extend_from_slice(b"garbage!");
        let e = parse(p(), &g).unwrap_err();
        assert!(matches!(e, PgPairsError::Zstd { .. }), "{e}");
        // Corrupted checksum.
        let mut c = z.clone();
        let last = c.len() - 1;
        c[last] ^= 0x55;
        let e = parse(p(), &c).unwrap_err();
        assert!(matches!(e, PgPairsError::ZstdChecksum { .. }), "{e}");
    }

    #[test]
    fn never_panics_on_damaged_files() {
        let plain = valid();
        let z = zstd(&plain);
        let original = parse(p(), &plain).unwrap();
        let mut ok = 0;
        for base in [&plain, &z] {
            let n = base.len();
            let positions: Vec<usize> = (0..n.min(64))
                .chain((64..n).step_by(37))
                .chain(n.saturating_sub(16)..n)
                .collect();
            for &pos in &positions {
                let _ = parse(p(), &base[..pos]);
                for flip in [0x01u8, 0x80, 0xff] {
                    let mut d = base.clone();
                    d[pos] ^= flip;
                    if let Ok(f) = parse(p(), &d) {
                        ok += 1;
                        // Compressed: a flip that decodes is one the decoder ignores.
                        if *base == z {
                            assert_eq!(f.pairs, original.pairs, "flip at {pos}");
                        }
                    }
                }
            }
        }
        // Flips inside page contents of the plain file still parse; the rest must be errors
        // (and nothing panicked to get here).
        assert!(ok > 0);
    }

    #[test]
    fn never_panics_on_damaged_shared_file() {
        let path = Path::new(SHARED).join("httpd_100ms_1.pgpairs.zst");
        let raw = std::fs::read(&path).unwrap();
        let n = raw.len();
        let original = parse(&path, &raw).unwrap();
        let mut accepted = 0;
        // A small deterministic generator for positions and flip masks.
        let mut state = 0x1234_5678_9abc_def0u64;
        let mut step = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for k in 0..150 {
            let pos = usize::try_from(step() % n as u64).unwrap();
            let _ = parse(&path, &raw[..pos]);
            let mut d = raw.clone();
            // Early positions hit the frame and block headers, the most fragile part.
            let pos = if k < 50 { k } else { pos };
            d[pos] ^= u8::try_from(step() % 255 + 1).unwrap();
            // A flip is caught by the decoder, the checksum or the validation, unless it
            // lies in bits the decoder ignores (the reference `zstd` also accepts some flips
            // in entropy-table headers): then the content must be unchanged.
            if let Ok(f) = parse(&path, &d) {
                assert!(f == original, "flip at {pos} changed the content unnoticed");
                accepted += 1;
            }
        }
        assert!(accepted < 20, "{accepted} of 150 flips accepted");
    }

    #[test]
    fn damaged_headers_are_errors() {
        let plain = valid();
        for pos in 0..HEADER {
            for flip in [0x01u8, 0x80] {
                let mut d = plain.clone();
                d[pos] ^= flip;
                assert!(parse(p(), &d).is_err(), "flip {flip:#x} at {pos}");
            }
        }
    }
}
