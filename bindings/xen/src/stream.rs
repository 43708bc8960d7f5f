//! A committed Castor checkpoint of a Xen guest, written as an `xl` save file that Xen's
//! own `xl restore` takes: how the backup builds the new domain at failover.
//!
//! The file is three nested formats, as Xen 4.17 writes them (`xl save`):
//! 1. the xl save-file header (`tools/xl/xl.h`): a 32-byte magic, the byte-order mark,
//!    flags (`STREAMv2`), and the domain's xl config (text) as optional data;
//! 2. a libxl migration stream v2 (`docs/specs/libxl-migration-stream.pandoc`): its header,
//!    a `LIBXC_CONTEXT` record, then — after the libxc stream — `END`;
//! 3. a libxc migration stream v3 (`docs/specs/libxc-migration-stream.pandoc`) for an x86 HVM
//!    domain (PVH is one): image and domain headers, `STATIC_DATA_END`, `PAGE_DATA` for every
//!    populated frame, then what Xen's HVM saver sends at the end of a checkpoint
//!    (`X86_TSC_INFO`, `HVM_CONTEXT`, `HVM_PARAMS`) and `END`.
//!
//! No CPUID or MSR policy record is written: for a stream without them, libxl gives the
//! restored domain the default policy of its config (what it does for streams from Xen
//! older than 4.14). The writer is plain Rust, so it is built and tested without Xen; the
//! tests parse what it writes back with a reader of their own (`read_save_file`).

use std::collections::BTreeSet;
use std::io::{self, Write};

use ha_codec::PAGE_SIZE;

use crate::state::{SavedState, gfn_of, image_len};

/// The xl save-file magic (32 bytes, NULs included).
pub const XL_MAGIC: &[u8; 32] = b"Xen saved domain, xl format\n \0 \r";
/// The xl header's byte-order mark, written in the domain's (little-endian) order.
const XL_BYTEORDER: u32 = 0x0102_0304;
/// xl mandatory flag: the config in the optional data is JSON (not set: xl config text).
#[cfg(test)]
const XL_FLAG_JSON: u32 = 1 << 0;
/// xl mandatory flag: the stream after the header is a libxl v2 stream.
const XL_FLAG_STREAM_V2: u32 = 1 << 1;

/// libxl stream header ident, `"LibxlFmt"` (big-endian).
const LIBXL_IDENT: u64 = 0x4c69_6278_6c46_6d74;
/// libxl stream version.
const LIBXL_VERSION: u32 = 2;
/// libxl record types.
const LIBXL_END: u32 = 0;
const LIBXL_LIBXC_CONTEXT: u32 = 1;

/// libxc image header marker, id (`"XENF"`) and version.
const LIBXC_MARKER: u64 = u64::MAX;
const LIBXC_ID: u32 = 0x5845_4e46;
const LIBXC_VERSION: u32 = 3;
/// libxc domain type: x86 HVM (PVH included).
const DHDR_TYPE_X86_HVM: u32 = 2;
/// libxc record types.
const REC_END: u32 = 0x00;
const REC_PAGE_DATA: u32 = 0x01;
const REC_X86_TSC_INFO: u32 = 0x08;
const REC_HVM_CONTEXT: u32 = 0x09;
const REC_HVM_PARAMS: u32 = 0x0a;
const REC_STATIC_DATA_END: u32 = 0x10;
/// Frames per `PAGE_DATA` record (what Xen's saver batches).
const BATCH: usize = 1024;
/// Type bits of a `PAGE_DATA` pfn entry (`XEN_DOMCTL_PFINFO_*` in bits 60-63); 0 is a
/// normal page that carries data.
#[cfg(test)]
const PFN_TYPE_SHIFT: u32 = 60;

/// Errors writing a save file (and, in the tests, reading one back).
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// Writing failed.
    #[error("cannot write the save file")]
    Io(#[from] io::Error),
    /// The image is not the size the state's windows say.
    #[error("image is {got} bytes, the state's windows make {expected}")]
    ImageSize {
        /// Bytes given.
        got: u64,
        /// Bytes expected.
        expected: u64,
    },
    /// A length does not fit its field.
    #[error("{0} too large for the stream format")]
    TooLarge(&'static str),
    /// The bytes read are not a save file as [`write_save_file`] writes them.
    #[cfg(test)]
    #[error("not a save file: {0}")]
    Malformed(String),
}

/// What went into a save file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// Frames written (`PAGE_DATA` entries).
    pub frames: u64,
    /// Frames of the image left out (holes: not populated at the primary's attach).
    pub holes: u64,
    /// Bytes written.
    pub bytes: u64,
}

/// A writer that counts bytes.
struct Counted<W> {
    w: W,
    n: u64,
}

impl<W: Write> Counted<W> {
    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.w.write_all(b)?;
        self.n += b.len() as u64;
        Ok(())
    }

    /// A record: little-endian type and body length, the body, zeros up to 8 bytes.
    fn record(&mut self, ty: u32, body: &[&[u8]]) -> Result<(), StreamError> {
        let len: usize = body.iter().map(|b| b.len()).sum();
        let len32 = u32::try_from(len).map_err(|_| StreamError::TooLarge("record"))?;
        self.put(&ty.to_le_bytes())?;
        self.put(&len32.to_le_bytes())?;
        for b in body {
            self.put(b)?;
        }
        self.put(&[0u8; 8][..(8 - len % 8) % 8])?;
        Ok(())
    }
}

/// One `PAGE_DATA` record: count, reserved, the pfns (type 0 in bits 60-63: a normal page
/// with data), then the frames.
fn page_data<W: Write>(out: &mut Counted<W>, batch: &[(u64, &[u8])]) -> Result<(), StreamError> {
    let mut head = Vec::with_capacity(8 + batch.len() * 8);
    head.extend_from_slice(&(batch.len() as u32).to_le_bytes());
    head.extend_from_slice(&0u32.to_le_bytes());
    for (gfn, _) in batch {
        head.extend_from_slice(&gfn.to_le_bytes());
    }
    let mut body: Vec<&[u8]> = vec![&head];
    body.extend(batch.iter().map(|(_, f)| *f));
    out.record(REC_PAGE_DATA, &body)
}

/// Write `image` (Castor's linear image of the windows in `state`) and `state` as an xl
/// save file for `xl restore`. `xl_config` is the domain's xl config (text), stored in the
/// header; `xen` is the hypervisor version (major, minor) recorded in the domain header.
pub fn write_save_file<W: Write>(
    w: W,
    state: &SavedState,
    image: &[u8],
    xl_config: &[u8],
    xen: (u32, u32),
) -> Result<StreamStats, StreamError> {
    let expected = image_len(&state.windows);
    if image.len() as u64 != expected {
        return Err(StreamError::ImageSize {
            got: image.len() as u64,
            expected,
        });
    }
    let mut out = Counted { w, n: 0 };
    let mut stats = StreamStats::default();

    // 1. xl header; the config as text (the JSON flag clear), without a NUL.
    let config_len =
        u32::try_from(xl_config.len()).map_err(|_| StreamError::TooLarge("xl config"))?;
    out.put(XL_MAGIC)?;
    out.put(&XL_BYTEORDER.to_le_bytes())?;
    out.put(&XL_FLAG_STREAM_V2.to_le_bytes())?;
    out.put(&0u32.to_le_bytes())?;
    out.put(&(config_len + 4).to_le_bytes())?;
    out.put(&config_len.to_le_bytes())?;
    out.put(xl_config)?;

    // 2. libxl header (big-endian; options 0: little-endian records, not legacy).
    out.put(&LIBXL_IDENT.to_be_bytes())?;
    out.put(&LIBXL_VERSION.to_be_bytes())?;
    out.put(&0u32.to_be_bytes())?;
    out.record(LIBXL_LIBXC_CONTEXT, &[])?;

    // 3. libxc image header (big-endian) and domain header.
    out.put(&LIBXC_MARKER.to_be_bytes())?;
    out.put(&LIBXC_ID.to_be_bytes())?;
    out.put(&LIBXC_VERSION.to_be_bytes())?;
    out.put(&0u16.to_be_bytes())?; // options: little-endian
    out.put(&[0u8; 6])?; // reserved
    out.put(&DHDR_TYPE_X86_HVM.to_le_bytes())?;
    out.put(&12u16.to_le_bytes())?; // page shift
    out.put(&0u16.to_le_bytes())?;
    out.put(&xen.0.to_le_bytes())?;
    out.put(&xen.1.to_le_bytes())?;
    out.record(REC_STATIC_DATA_END, &[])?;

    // Pages, in gfn order, a batch at a time: count, reserved, pfns, then their data.
    let holes: BTreeSet<u64> = state.holes.iter().copied().collect();
    let pages = image.len() / PAGE_SIZE;
    let mut batch: Vec<(u64, &[u8])> = Vec::with_capacity(BATCH);
    for p in 0..pages {
        let gfn = gfn_of(&state.windows, p as u64);
        if holes.contains(&gfn) {
            stats.holes += 1;
            continue;
        }
        batch.push((gfn, &image[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]));
        stats.frames += 1;
        if batch.len() == BATCH || p + 1 == pages {
            page_data(&mut out, &batch)?;
            batch.clear();
        }
    }
    if !batch.is_empty() {
        page_data(&mut out, &batch)?;
    }

    // End of the checkpoint, as xg_sr_save_x86_hvm.c sends it.
    let t = &state.tsc;
    let mut tsc = Vec::with_capacity(24);
    tsc.extend_from_slice(&t.mode.to_le_bytes());
    tsc.extend_from_slice(&t.khz.to_le_bytes());
    tsc.extend_from_slice(&t.elapsed_nsec.to_le_bytes());
    tsc.extend_from_slice(&t.incarnation.to_le_bytes());
    tsc.extend_from_slice(&0u32.to_le_bytes());
    out.record(REC_X86_TSC_INFO, &[&tsc])?;
    out.record(REC_HVM_CONTEXT, &[&state.hvm_context])?;
    let mut params = Vec::with_capacity(8 + state.params.len() * 16);
    params.extend_from_slice(&(state.params.len() as u32).to_le_bytes());
    params.extend_from_slice(&0u32.to_le_bytes());
    for (index, value) in &state.params {
        params.extend_from_slice(&u64::from(*index).to_le_bytes());
        params.extend_from_slice(&value.to_le_bytes());
    }
    out.record(REC_HVM_PARAMS, &[&params])?;
    out.record(REC_END, &[])?;

    // Back in the libxl stream: no emulator records (PVH has no device model).
    out.record(LIBXL_END, &[])?;
    out.w.flush()?;
    stats.bytes = out.n;
    Ok(stats)
}

/// A save file parsed back by [`read_save_file`].
#[cfg(test)]
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct SaveFile {
    /// The xl config stored in the header.
    pub xl_config: Vec<u8>,
    /// Xen version from the domain header.
    pub xen: (u32, u32),
    /// libxc record types in stream order (`PAGE_DATA` once per record).
    pub records: Vec<u32>,
    /// (gfn, frame) for every page.
    pub pages: Vec<(u64, Vec<u8>)>,
    /// The `HVM_CONTEXT` body.
    pub hvm_context: Vec<u8>,
    /// The `HVM_PARAMS` entries.
    pub params: Vec<(u64, u64)>,
    /// The `X86_TSC_INFO` body: mode, khz, nsec, incarnation.
    pub tsc: (u32, u32, u64, u32),
}

/// A cursor over the bytes of a save file.
#[cfg(test)]
struct Cur<'a> {
    b: &'a [u8],
    at: usize,
}

#[cfg(test)]
impl<'a> Cur<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], StreamError> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.b.len());
        let Some(end) = end else {
            return Err(StreamError::Malformed(format!("cut short in {what}")));
        };
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn arr<const N: usize>(&mut self, what: &str) -> Result<[u8; N], StreamError> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32le(&mut self, what: &str) -> Result<u32, StreamError> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }

    /// A record: (type, body); the padding is checked to be zeros.
    fn record(&mut self, what: &str) -> Result<(u32, &'a [u8]), StreamError> {
        let ty = self.u32le(what)?;
        let len = self.u32le(what)? as usize;
        let body = self.take(len, what)?;
        let pad = self.take((8 - len % 8) % 8, what)?;
        if pad.iter().any(|b| *b != 0) {
            return Err(StreamError::Malformed(format!("{what}: non-zero padding")));
        }
        Ok((ty, body))
    }
}

#[cfg(test)]
fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// Parse a save file as [`write_save_file`] writes it, checking every header, the record
/// framing and each record's length against what it holds.
#[cfg(test)]
fn read_save_file(bytes: &[u8]) -> Result<SaveFile, StreamError> {
    let bad = |m: &str| StreamError::Malformed(m.to_string());
    let mut c = Cur { b: bytes, at: 0 };
    let mut f = SaveFile::default();
    if c.take(32, "xl header")? != XL_MAGIC {
        return Err(bad("no xl save-file magic"));
    }
    if c.u32le("xl header")? != XL_BYTEORDER {
        return Err(bad("xl byte-order mark"));
    }
    let mandatory = c.u32le("xl header")?;
    if mandatory & XL_FLAG_JSON != 0 || mandatory & XL_FLAG_STREAM_V2 == 0 {
        return Err(bad("xl flags"));
    }
    let _optional = c.u32le("xl header")?;
    let optlen = c.u32le("xl header")? as usize;
    let mut opt = Cur {
        b: c.take(optlen, "xl optional data")?,
        at: 0,
    };
    let clen = opt.u32le("xl config length")? as usize;
    let cfg = opt.take(clen, "xl config")?;
    f.xl_config = cfg.to_vec();

    if u64::from_be_bytes(c.arr("libxl header")?) != LIBXL_IDENT
        || u32::from_be_bytes(c.arr("libxl header")?) != LIBXL_VERSION
        || u32::from_be_bytes(c.arr("libxl header")?) != 0
    {
        return Err(bad("libxl header"));
    }
    if c.record("libxl record")? != (LIBXL_LIBXC_CONTEXT, &[][..]) {
        return Err(bad("no LIBXC_CONTEXT record"));
    }
    if u64::from_be_bytes(c.arr("libxc header")?) != LIBXC_MARKER
        || u32::from_be_bytes(c.arr("libxc header")?) != LIBXC_ID
        || u32::from_be_bytes(c.arr("libxc header")?) != LIBXC_VERSION
        || c.take(8, "libxc header")? != [0u8; 8]
    {
        return Err(bad("libxc image header"));
    }
    if c.u32le("domain header")? != DHDR_TYPE_X86_HVM
        || c.take(4, "domain header")? != [12, 0, 0, 0]
    {
        return Err(bad("libxc domain header (want x86 HVM, 4 KiB pages)"));
    }
    f.xen = (c.u32le("domain header")?, c.u32le("domain header")?);
    loop {
        let (ty, body) = c.record("libxc record")?;
        f.records.push(ty);
        match ty {
            REC_END => break,
            REC_PAGE_DATA => {
                let n = u32::from_le_bytes(body[..4].try_into().map_err(|_| bad("PAGE_DATA"))?)
                    as usize;
                if body.len() != 8 + n * (8 + PAGE_SIZE) {
                    return Err(bad("PAGE_DATA length"));
                }
                for i in 0..n {
                    let e = le64(&body[8 + i * 8..]);
                    if e >> PFN_TYPE_SHIFT != 0 {
                        return Err(bad("PAGE_DATA type"));
                    }
                    let at = 8 + n * 8 + i * PAGE_SIZE;
                    f.pages.push((e, body[at..at + PAGE_SIZE].to_vec()));
                }
            }
            REC_X86_TSC_INFO if body.len() == 24 => {
                let u =
                    |i: usize| u32::from_le_bytes([body[i], body[i + 1], body[i + 2], body[i + 3]]);
                f.tsc = (u(0), u(4), le64(&body[8..]), u(16));
            }
            REC_HVM_CONTEXT => f.hvm_context = body.to_vec(),
            REC_HVM_PARAMS if body.len() >= 8 => {
                let n = u32::from_le_bytes([body[0], body[1], body[2], body[3]]) as usize;
                if body.len() != 8 + 16 * n {
                    return Err(bad("HVM_PARAMS length"));
                }
                f.params = (0..n)
                    .map(|i| (le64(&body[8 + 16 * i..]), le64(&body[16 + 16 * i..])))
                    .collect();
            }
            REC_STATIC_DATA_END if body.is_empty() => {}
            other => return Err(StreamError::Malformed(format!("record {other:#x}"))),
        }
    }
    if c.record("libxl record")? != (LIBXL_END, &[][..]) {
        return Err(bad("no libxl END record"));
    }
    if c.at != bytes.len() {
        return Err(bad("bytes after the libxl END record"));
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::TscInfo;

    fn state() -> SavedState {
        SavedState {
            domid: 4,
            max_gpfn: 0xfefff,
            windows: vec![0, 0x7f7],
            holes: vec![3, 0x7f7 * 512 + 511],
            suspended: true,
            hvm_context: vec![7; 37],
            params: vec![(1, 0xfeffc), (17, 0xfefff)],
            tsc: TscInfo {
                mode: 2,
                elapsed_nsec: 99,
                khz: 2_000_000,
                incarnation: 5,
            },
        }
    }

    #[test]
    fn a_checkpoint_round_trips_through_the_save_file() {
        let s = state();
        let pages = 2 * 512;
        let mut image = vec![0u8; pages * PAGE_SIZE];
        for p in 0..pages {
            image[p * PAGE_SIZE] = (p % 251) as u8;
            image[p * PAGE_SIZE + PAGE_SIZE - 1] = (p / 251) as u8;
        }
        let cfg = b"name = \"g\"\ntype = \"pvh\"\n";
        let mut file = Vec::new();
        let st = write_save_file(&mut file, &s, &image, cfg, (4, 17)).expect("write");
        assert_eq!(st.frames, 1022);
        assert_eq!(st.holes, 2);
        assert_eq!(st.bytes, file.len() as u64);
        assert_eq!(&file[..32], XL_MAGIC);

        let f = read_save_file(&file).expect("parse");
        assert_eq!(f.xl_config, cfg);
        assert_eq!(f.xen, (4, 17));
        // Static data first, the pages in batches of at most 1024, then the end records.
        assert_eq!(
            f.records,
            [
                REC_STATIC_DATA_END,
                REC_PAGE_DATA,
                REC_X86_TSC_INFO,
                REC_HVM_CONTEXT,
                REC_HVM_PARAMS,
                REC_END
            ]
        );
        assert_eq!(f.pages.len(), 1022);
        for (gfn, frame) in &f.pages {
            assert!(!s.holes.contains(gfn));
            let slot = s
                .windows
                .iter()
                .position(|w| *w == gfn / 512)
                .expect("window");
            let p = slot * 512 + (*gfn % 512) as usize;
            assert_eq!(
                frame[..],
                image[p * PAGE_SIZE..(p + 1) * PAGE_SIZE],
                "gfn {gfn:#x}"
            );
        }
        assert_eq!(
            f.pages[512 - 1].0,
            0x7f7 * 512,
            "holes skipped, windows mapped"
        );
        assert_eq!(f.hvm_context, s.hvm_context);
        assert_eq!(f.params, [(1, 0xfeffc), (17, 0xfefff)]);
        assert_eq!(f.tsc, (2, 2_000_000, 99, 5));
    }

    #[test]
    fn large_images_are_cut_into_batches_and_sizes_are_checked() {
        let mut s = state();
        s.windows = vec![0, 1, 2];
        s.holes.clear();
        let image = vec![1u8; 3 * 512 * PAGE_SIZE];
        let mut file = Vec::new();
        write_save_file(&mut file, &s, &image, b"", (4, 17)).expect("write");
        let f = read_save_file(&file).expect("parse");
        assert_eq!(f.records.iter().filter(|r| **r == REC_PAGE_DATA).count(), 2);
        assert_eq!(f.pages.len(), 1536);

        let e = write_save_file(Vec::new(), &s, &image[..PAGE_SIZE], b"", (4, 17))
            .expect_err("short image");
        assert!(matches!(e, StreamError::ImageSize { .. }), "{e}");
        // Every cut of the file is refused, never misread.
        for cut in [10, 40, 60, 100, file.len() / 2, file.len() - 1] {
            assert!(read_save_file(&file[..cut]).is_err(), "cut at {cut}");
        }
    }
}
