//! The invariants every fuzz target checks, one `check_*` function per target.
//!
//! This file is shared: the fuzz crate compiles it as `castor_fuzz::checks`, and
//! `common/wire/tests/fuzz_corpus.rs` includes it with `#[path]` to replay the committed corpus
//! on stable Rust without libFuzzer. It therefore uses nothing but `std` and the codec and wire crates.
//!
//! A check returns normally when the input was handled correctly (accepted or rejected)
//! and panics when an invariant breaks; a panic inside those crates itself is a finding
//! too. Every input is valid: there is no "reject this input" path.

use ha_codec::PAGE_SIZE;
use ha_codec::block::{BlockSize, Page};
use ha_codec::codec::{self, CodecError, EncodedBatch, Encoding, Mode, Record};
use ha_codec::share::PageView;
use ha_codec::{varint, xbzrle};
use ha_wire::frame::{self, FrameType};
use ha_wire::stream::{EpochHeader, EpochWriter, StagedEpoch, Staging};
use std::collections::HashMap;

/// Page lengths, besides a whole page, that `check_xbzrle` decodes into.
pub const SHORT_PAGE_LENS: [usize; 6] = [PAGE_SIZE - 1, 1000, 128, 127, 1, 0];

/// Pages in the small image `check_page_decode` resolves references against.
pub const VIEW_PAGES: usize = 4;

/// Guest pages in `check_epoch`'s session.
pub const GUEST_PAGES: usize = 16;

/// Block size of `check_epoch`'s session (the default, 64 bytes).
pub const GUEST_BLOCK: u32 = 64;

/// Mode of `check_epoch`'s session.
pub const GUEST_MODE: Mode = Mode::Fgbi;

/// First byte of an `epoch_apply` input: the rest is a raw frame stream.
pub const EPOCH_RAW: u8 = 0;

/// First byte of an `epoch_apply` input: the rest is Pages-frame record bodies that the
/// harness frames into whole, correctly digested epochs (see [`check_epoch`]).
pub const EPOCH_REFRAMED: u8 = 1;

/// Flag in the first byte of an `epoch_apply` input: reframed epochs carry a state frame.
pub const EPOCH_WITH_STATE: u8 = 2;

/// In a reframed input, this byte where a record's page would start ends the epoch.
pub const EPOCH_SEPARATOR: u8 = 0xff;

/// Most epochs a reframed input is cut into (bounds the work per input).
pub const MAX_REFRAMED_EPOCHS: usize = 8;

/// The state blob reframed epochs carry when [`EPOCH_WITH_STATE`] is set.
pub const STATE_BLOB: &[u8] = b"fuzz vcpu state";

/// Deterministic page content of one of a few kinds, so every harness and the seed
/// generator agree on the images. `kind` 0 is all zero; 1 a mixed pattern with a zero
/// stretch; 2 text; anything else a pseudo-random page seeded by `kind`.
pub fn fixture_page(kind: u64) -> Box<Page> {
    let mut p = Box::new([0u8; PAGE_SIZE]);
    match kind {
        0 => {}
        1 => {
            for (i, b) in p.iter_mut().enumerate() {
                *b = match i {
                    0..2048 => ((i * 31) ^ (i >> 5)) as u8,
                    2048..3072 => 0,
                    _ => (i % 7) as u8,
                };
            }
        }
        2 => {
            let text = b"the quick brown fox jumps over the lazy page ";
            for (i, b) in p.iter_mut().enumerate() {
                *b = text[i % text.len()];
            }
        }
        _ => {
            let mut s = kind;
            for b in p.iter_mut() {
                s = s
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                *b = (s >> 56) as u8;
            }
        }
    }
    p
}

/// The old page `check_xbzrle` applies deltas to.
pub fn xbzrle_old_page() -> Box<Page> {
    fixture_page(1)
}

/// The image `check_page_decode` resolves references against: a zero page, the pattern
/// page, a text page and a pseudo-random page.
#[derive(Debug)]
pub struct ViewImage(pub Vec<Box<Page>>);

impl ViewImage {
    /// The fixed four-page view.
    pub fn new() -> Self {
        Self((0..VIEW_PAGES as u64).map(fixture_page).collect())
    }
}

impl Default for ViewImage {
    fn default() -> Self {
        Self::new()
    }
}

impl PageView for ViewImage {
    fn page(&self, page: u64) -> Option<&Page> {
        self.0.get(usize::try_from(page).ok()?).map(|p| &**p)
    }
}

/// The guest image `check_epoch` starts from: [`GUEST_PAGES`] pages of every kind, several
/// of them identical so page references have something to find.
pub fn guest_image() -> Vec<u8> {
    let mut image = Vec::with_capacity(GUEST_PAGES * PAGE_SIZE);
    for p in 0..GUEST_PAGES as u64 {
        image.extend_from_slice(&fixture_page(p % 4 + 4 * (p / 8))[..]);
    }
    image
}

/// The `check_epoch` session's block size.
pub fn guest_block_size() -> BlockSize {
    BlockSize::new(GUEST_BLOCK).expect("64 is a valid block size")
}

/// The disk of the `check_epoch` session, in bytes: Disk frames (type 6) in raw inputs are
/// decoded against it.
pub const GUEST_DISK: u64 = 64 << 10;

/// A fresh stager for the `check_epoch` session (with a [`GUEST_DISK`] disk), expecting
/// epoch 1.
pub fn guest_staging() -> Staging {
    Staging::new(GUEST_MODE, guest_block_size(), GUEST_PAGES as u64, 1).with_disk(GUEST_DISK)
}

/// `xbzrle_decode`: `delta` applied to [`xbzrle_old_page`] and to shorter pages.
///
/// Invariants: `decode` never panics; `Ok(n)` has `n <= page.len()` and leaves bytes past
/// `n` untouched; the result depends on the page length only through the span (a delta
/// that spans `n` bytes decodes into any page of at least `n` bytes to the same prefix and
/// is rejected by shorter ones); and a decoded page re-encodes (`xbzrle::encode`) to a
/// delta that reproduces it. Returns the span when the delta applied to the whole page.
pub fn check_xbzrle(delta: &[u8]) -> Option<usize> {
    let old = xbzrle_old_page();
    let mut full = old.clone();
    let res = xbzrle::decode(delta, &mut full[..]);
    if let Ok(n) = res {
        assert!(n <= PAGE_SIZE, "Ok({n}) spans more than the page");
        assert!(
            full[n..] == old[n..],
            "decode wrote past the {n} bytes it spans"
        );
        let mut enc = vec![0u8; 2 * PAGE_SIZE + xbzrle::ENCODE_SLACK];
        let m = xbzrle::encode(&old, &full, &mut enc, 2 * PAGE_SIZE)
            .expect("every page pair encodes in two pages' worth of bytes");
        let mut back = old.clone();
        let span = xbzrle::decode(&enc[..m], &mut back[..]).expect("re-encoded delta decodes");
        assert!(span <= n, "re-encoded delta spans {span} > {n}");
        assert!(back == full, "re-encoded delta does not reproduce the page");
    }
    for len in SHORT_PAGE_LENS {
        let mut short = old[..len].to_vec();
        let got = xbzrle::decode(delta, &mut short);
        match res {
            Ok(n) if n <= len => {
                assert_eq!(got, Ok(n), "page of {len} bytes");
                assert!(
                    short[..] == full[..len],
                    "page of {len} bytes decoded differently"
                );
            }
            Ok(n) => assert!(
                matches!(got, Err(xbzrle::XbzrleError::PastPage(_))),
                "delta spanning {n} bytes gave {got:?} on a page of {len}"
            ),
            Err(_) => assert!(
                got.is_err(),
                "rejected on a whole page, {got:?} on {len} bytes"
            ),
        }
        if let Ok(n) = got {
            assert!(n <= len);
        }
    }
    res.ok()
}

/// `page_decode`: `data[0]` picks the encoding (low 3 bits; 7 names none), `data[1]` the
/// block size (`32 << (data[1] % 6)`), `data[2]` the page (low 3 bits; with bit 7 set,
/// counted down from `u64::MAX` to exercise wrapping references); the rest is the payload,
/// decoded with `codec::decode_page` against [`ViewImage`].
///
/// Invariants: no panic; on `Ok`, `Zero` gives a zero page, `Raw` the payload, `PageRef`
/// the page its varint names (never the page itself), `Delta` exactly what
/// `xbzrle::decode` gives, `Blocks` leaves every block outside its mask untouched, and
/// `Blocks`/`General` decode the same way twice; `Unchanged` is always refused, and so is
/// `DiskRef` (the view has no disk). Returns
/// whether the record was accepted.
pub fn check_page_decode(data: &[u8]) -> bool {
    let [e, shift, p, payload @ ..] = data else {
        return false;
    };
    let Some(encoding) = Encoding::from_u8(e & 7) else {
        unreachable!("encodings 0..=7 exist");
    };
    let bs = BlockSize::new(32 << (shift % 6)).expect("32..=1024 is a valid block size");
    let page = if p & 0x80 == 0 {
        u64::from(p & 7)
    } else {
        u64::MAX - u64::from(p & 7)
    };
    let view = ViewImage::new();
    let init: Page = view.page(page).copied().unwrap_or([0x5a; PAGE_SIZE]);
    let mut out = init;
    let res = codec::decode_page(encoding, payload, page, bs, &view, &mut out);
    if encoding == Encoding::Unchanged {
        assert_eq!(res, Err(CodecError::NotSendable(encoding)));
    }
    if encoding == Encoding::DiskRef {
        assert!(
            res.is_err(),
            "a disk reference resolved in a view without a disk"
        );
    }
    if res.is_err() {
        return false;
    }
    match encoding {
        Encoding::Zero => {
            assert!(payload.is_empty() && out == [0u8; PAGE_SIZE], "zero page");
        }
        Encoding::Raw => assert!(out[..] == *payload, "raw page"),
        Encoding::PageRef => {
            let (q, n) = varint::get_delta(payload, page).expect("accepted reference parses");
            assert_eq!(n, payload.len());
            assert_ne!(q, page, "a page referenced itself");
            assert!(
                view.page(q) == Some(&out),
                "reference resolved to other content"
            );
        }
        Encoding::Delta => {
            let mut want = init;
            assert!(xbzrle::decode(payload, &mut want).is_ok());
            assert!(out == want, "Delta differs from xbzrle::decode");
        }
        Encoding::Blocks | Encoding::General => {
            if encoding == Encoding::Blocks {
                let per = bs.per_page();
                let mask = &payload[..per.div_ceil(8)];
                for b in (0..per).filter(|b| mask[b / 8] >> (b % 8) & 1 == 0) {
                    assert!(
                        out[bs.range(b)] == init[bs.range(b)],
                        "block {b} not in mask"
                    );
                }
            }
            let mut again = init;
            let res2 = codec::decode_page(encoding, payload, page, bs, &view, &mut again);
            assert!(
                res2.is_ok() && again == out,
                "decoding is not deterministic"
            );
        }
        Encoding::Unchanged | Encoding::DiskRef => unreachable!("refused above"),
    }
    true
}

/// What feeding one epoch's bytes did.
#[derive(Debug)]
enum Fed {
    /// Frames ran out (or framing broke) with the epoch neither committed nor rejected.
    Open,
    /// A push failed; the stager dropped the epoch.
    Rejected,
    /// An epoch verified and was committed to the image: its number and state blob.
    Committed(u64, Option<Vec<u8>>),
}

/// Split `bytes` into frames and push each into `st`, committing verified epochs to
/// `image`. Stops at the end, at a framing error, or (when `stop_on_error`) at the first
/// rejected push; returns the last outcome and the number of epochs committed.
///
/// Checks on every push: a failed push leaves the stager idle with its next epoch as it
/// was and the image as of the last commit; a verified epoch is the one expected, names
/// only guest pages, and its commit changes no other page.
fn feed(st: &mut Staging, bytes: &[u8], image: &mut Vec<u8>, stop_on_error: bool) -> (Fed, usize) {
    let mut committed = image.clone();
    let mut last = Fed::Open;
    let mut commits = 0;
    let mut at = 0;
    while let Ok(Some((ty, body, n))) = frame::split_frame(&bytes[at..]) {
        let raw = &bytes[at..at + n];
        assert!(
            n >= 5 && raw[4] == ty && raw[5..] == *body,
            "split_frame pieces"
        );
        let next = st.next_epoch();
        match st.push(ty, body, raw, image) {
            Err(_) => {
                assert!(!st.in_progress(), "a failed push left a partial epoch");
                assert_eq!(st.next_epoch(), next, "a failed push moved the epoch");
                assert!(*image == committed, "a rejected epoch changed the image");
                last = Fed::Rejected;
                if stop_on_error {
                    return (last, commits);
                }
            }
            Ok(Some(staged)) => {
                assert_eq!(ty, FrameType::Trailer as u8);
                assert_eq!(staged.epoch, next, "committed an unexpected epoch");
                assert_eq!(st.next_epoch(), next + 1);
                assert!(!st.in_progress());
                commit_checked(&staged, image);
                committed.clone_from(image);
                commits += 1;
                last = Fed::Committed(staged.epoch, staged.state);
            }
            Ok(None) => {
                assert!(st.in_progress(), "an accepted frame left no epoch open");
                last = Fed::Open;
            }
        }
        at += n;
    }
    (last, commits)
}

/// Commit `staged` to `image`, checking that only its own (in-range) pages change, and
/// that its disk writes are whole sectors inside the session's disk.
fn commit_checked(staged: &StagedEpoch, image: &mut [u8]) {
    for w in &staged.disk {
        assert!(
            w.offset.is_multiple_of(512)
                && w.data.len().is_multiple_of(512)
                && w.offset + w.data.len() as u64 <= GUEST_DISK,
            "disk write outside the disk"
        );
    }
    let before = image.to_vec();
    staged.commit(image);
    for p in 0..GUEST_PAGES {
        let range = p * PAGE_SIZE..(p + 1) * PAGE_SIZE;
        match staged.pages.get(&(p as u64)) {
            Some(content) => assert!(image[range] == content[..], "page {p} not committed"),
            None => assert!(image[range.clone()] == before[range], "page {p} changed"),
        }
    }
    assert!(
        staged.pages.keys().all(|&p| p < GUEST_PAGES as u64),
        "staged a page outside the guest"
    );
}

/// The image as a record sees it: pages staged so far over the committed image.
struct RefView<'a> {
    staged: &'a HashMap<u64, Box<Page>>,
    image: &'a [u8],
}

impl PageView for RefView<'_> {
    fn page(&self, page: u64) -> Option<&Page> {
        if let Some(p) = self.staged.get(&page) {
            return Some(p);
        }
        let at = usize::try_from(page).ok()?.checked_mul(PAGE_SIZE)?;
        self.image.get(at..at + PAGE_SIZE)?.try_into().ok()
    }
}

/// One page record as it crosses the wire: page, encoding, payload.
type WireRecord<'a> = (u64, Encoding, &'a [u8]);

/// The model of an epoch's effect: each record decoded in order against the image with
/// the earlier records applied. `None` when any record must be refused (page outside the
/// guest, a page twice, a record that does not decode).
fn model_epoch(image: &[u8], records: &[WireRecord<'_>]) -> Option<Vec<u8>> {
    let bs = guest_block_size();
    let mut staged: HashMap<u64, Box<Page>> = HashMap::new();
    for &(page, encoding, payload) in records {
        if page >= GUEST_PAGES as u64 || staged.contains_key(&page) {
            return None;
        }
        let view = RefView {
            staged: &staged,
            image,
        };
        let mut out = Box::new(*view.page(page)?);
        codec::decode_page(encoding, payload, page, bs, &view, &mut out).ok()?;
        staged.insert(page, out);
    }
    let mut after = image.to_vec();
    for (p, content) in staged {
        let at = usize::try_from(p).ok()? * PAGE_SIZE;
        after[at..at + PAGE_SIZE].copy_from_slice(&content[..]);
    }
    Some(after)
}

/// Parse one reframed epoch's records off the front of `data`: Pages-frame records
/// (`varint page | u8 encoding | varint length | payload`) up to an [`EPOCH_SEPARATOR`]
/// or the end. Records with an encoding that cannot be sent (6, `Unchanged`, is skipped
/// by the writer; 7 and up name nothing) are dropped; a record cut short ends the input.
/// Returns the records and the rest of `data` after the separator.
fn parse_reframed(mut data: &[u8]) -> (Vec<WireRecord<'_>>, &[u8]) {
    let mut records = Vec::new();
    loop {
        match data.first() {
            None => return (records, &[]),
            Some(&EPOCH_SEPARATOR) => return (records, &data[1..]),
            Some(_) => {}
        }
        let Some((page, n)) = varint::get(data) else {
            return (records, &[]);
        };
        let Some((&e, rest)) = data[n..].split_first() else {
            return (records, &[]);
        };
        let Some((len, n)) = varint::get(rest) else {
            return (records, &[]);
        };
        let Some(payload) = usize::try_from(len).ok().and_then(|l| rest[n..].get(..l)) else {
            return (records, &[]);
        };
        data = &rest[n + payload.len()..];
        match Encoding::from_u8(e) {
            Some(enc) if enc != Encoding::Unchanged => records.push((page, enc, payload)),
            _ => {}
        }
    }
}

/// Write one whole epoch (header, the records as Pages frames, optionally a state frame,
/// a verified trailer) with the real [`EpochWriter`].
fn write_epoch(epoch: u64, records: &[WireRecord<'_>], state: bool) -> Vec<u8> {
    let mut batch = EncodedBatch::default();
    for &(page, encoding, payload) in records {
        batch.records.push(Record {
            page,
            encoding,
            start: batch.bytes.len(),
            len: payload.len(),
        });
        batch.bytes.extend_from_slice(payload);
    }
    let header = EpochHeader {
        epoch,
        mode: GUEST_MODE,
        block_size: guest_block_size(),
        records: EpochWriter::records_in(&batch),
    };
    let mut out = Vec::new();
    let mut w = EpochWriter::begin(&mut out, header);
    w.pages(&mut out, &batch);
    if state {
        w.state(&mut out, STATE_BLOB);
    }
    w.finish(&mut out)
        .expect("the header counts the records written");
    out
}

/// `epoch_apply`: a 16-page fgbi session (block 64) expecting epoch 1 receives
/// `data[1..]`. When `data[0] & 1` is [`EPOCH_RAW`], the bytes are the frame stream
/// itself (a reconnecting receiver: after a rejected epoch the next frames keep coming).
/// When it is [`EPOCH_REFRAMED`], the bytes are the records of up to
/// [`MAX_REFRAMED_EPOCHS`] epochs separated by [`EPOCH_SEPARATOR`], which the harness
/// writes as whole epochs with a correct digest, so mutated records reach the commit.
///
/// Invariants: no panic; a rejected push leaves no partial epoch and the image as of the
/// last commit; a verified epoch is the expected one and its commit changes exactly its
/// own pages. Reframed epochs also must commit exactly when every record is acceptable,
/// and to the image the record-by-record model predicts, with the state blob if flagged.
/// Returns the number of epochs committed.
pub fn check_epoch(data: &[u8]) -> usize {
    let Some((&flags, rest)) = data.split_first() else {
        return 0;
    };
    let mut image = guest_image();
    let mut st = guest_staging();
    if flags & 1 == EPOCH_RAW {
        return feed(&mut st, rest, &mut image, false).1;
    }
    let with_state = flags & EPOCH_WITH_STATE != 0;
    let mut commits = 0;
    let mut rest = rest;
    for _ in 0..MAX_REFRAMED_EPOCHS {
        let (records, tail) = parse_reframed(rest);
        rest = tail;
        let want = model_epoch(&image, &records);
        let epoch = st.next_epoch();
        let bytes = write_epoch(epoch, &records, with_state);
        match (feed(&mut st, &bytes, &mut image, true).0, want) {
            (Fed::Committed(e, state), Some(want)) => {
                assert_eq!(e, epoch);
                assert!(image == want, "committed image differs from the model");
                assert_eq!(state.as_deref(), with_state.then_some(STATE_BLOB));
                commits += 1;
            }
            (Fed::Rejected, None) => {}
            (got, want) => panic!(
                "epoch {epoch}: {got:?}, model {}",
                if want.is_some() { "commits" } else { "rejects" }
            ),
        }
        if rest.is_empty() {
            break;
        }
    }
    commits
}

/// The pair key of `check_handshake`'s backup (and of its in-harness primary).
pub const HANDSHAKE_KEY: [u8; 32] = *b"castor fuzz handshake pair key!!";

/// First byte of a `handshake` input (bit 0 clear): the rest is what a peer sends a
/// keyed backup from its first byte: `u16 LE length | Noise message`, then anything.
pub const HANDSHAKE_RAW: u8 = 0;

/// First byte of a `handshake` input (bit 0 set): the harness runs a real handshake with
/// [`HANDSHAKE_KEY`], seals the rest as the primary's plaintext (the opening frames), and
/// feeds the ciphertext to the backup's side.
pub const HANDSHAKE_SEALED: u8 = 1;

/// Flag in the first byte of a sealed `handshake` input: one ciphertext bit is flipped
/// (the position is taken from the second byte).
pub const HANDSHAKE_FLIP: u8 = 2;

/// The session the backup in `check_handshake` is configured for.
pub fn handshake_ours() -> ha_wire::session::Hello {
    ha_wire::session::Hello {
        version: ha_wire::session::SESSION_VERSION,
        memory_size: (GUEST_PAGES * PAGE_SIZE) as u64,
        page_size: PAGE_SIZE as u32,
        block_size: BlockSize::DEFAULT,
        mode: GUEST_MODE,
        backend: ha_guest::backend::BackendKind::Kvm,
        layout: ha_guest::backend::BackendKind::Kvm.guest_layout(),
        disk_size: 0,
    }
}

/// What the backup's opening did with a `handshake` input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opening {
    /// The Noise handshake failed: nothing after it was read.
    NoiseRefused,
    /// The channel came up but delivered no whole first frame (cut short, or failed to
    /// authenticate).
    NoFrame,
    /// The first frame is not a well-formed Hello, or not one for this session.
    HelloRefused,
    /// A Hello the backup would welcome.
    Welcomed,
}

/// The backup's opening on `data`: the Noise responder with [`HANDSHAKE_KEY`]
/// (`secure::Responder`), the decrypting stream, `frame::split_frame` on the decrypted
/// bytes (so `MAX_FRAME` holds there too), `Hello::parse` and `check_against`.
///
/// Invariants: raw bytes never pass the Noise handshake (only the key's holder can make a
/// first message); a sealed stream decrypts to exactly the plaintext, in order; a flipped
/// ciphertext bit stops the stream at the damaged message, with everything before it
/// intact and nothing from it or after it delivered; a parsed Hello re-encodes to the
/// same body.
pub fn check_handshake(data: &[u8]) -> Opening {
    use ha_wire::secure::{HANDSHAKE_LEN, Initiator, PairKey, Responder};
    use ha_wire::session::Hello;
    use std::io::Read;

    let key = PairKey::from_bytes(HANDSHAKE_KEY);
    let Some((&mode, rest)) = data.split_first() else {
        return Opening::NoiseRefused;
    };
    let responder = Responder::new(&key).expect("a responder for a valid key");
    let (transport, ciphertext, plaintext) = if mode & 1 == HANDSHAKE_RAW {
        let Some(len) = rest.get(..2) else {
            return Opening::NoiseRefused;
        };
        let n = usize::from(u16::from_le_bytes([len[0], len[1]]));
        let Some(msg) = rest.get(2..2 + n) else {
            return Opening::NoiseRefused;
        };
        if n != HANDSHAKE_LEN {
            assert!(
                responder.accept(msg).is_err(),
                "a {n}-byte message accepted"
            );
            return Opening::NoiseRefused;
        }
        match responder.accept(msg) {
            Ok(_) => panic!("raw bytes passed the Noise handshake without the key"),
            Err(_) => return Opening::NoiseRefused,
        }
    } else {
        let (init, msg1) = Initiator::new(&key).expect("initiator");
        let (reply, backup) = responder.accept(&msg1).expect("a genuine first message");
        assert_eq!(reply.len(), HANDSHAKE_LEN);
        let primary = init.finish(&reply).expect("a genuine reply");
        let mut wire = Vec::new();
        {
            let mut w = primary.stream(&mut wire);
            // Cut where the input has 0xff so the messages vary in size, as frames do.
            for piece in rest.split_inclusive(|&b| b == 0xff) {
                std::io::Write::write_all(&mut w, piece).expect("seal into memory");
            }
        }
        (backup, wire, rest.to_vec())
    };
    let mut ciphertext = ciphertext;
    let mut damaged_from = None;
    if mode & HANDSHAKE_FLIP != 0 && !ciphertext.is_empty() {
        let at = usize::from(plaintext.first().copied().unwrap_or(0)) * 97 % ciphertext.len();
        ciphertext[at] ^= 1 << (at % 8);
        damaged_from = Some(at);
    }
    let mut s = transport.stream(std::io::Cursor::new(ciphertext.clone()));
    let mut got = Vec::new();
    let mut chunk = [0u8; 1000];
    let end = loop {
        match s.read(&mut chunk) {
            Ok(0) => break Ok(()),
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) => break Err(e),
        }
    };
    match damaged_from {
        None => {
            assert!(end.is_ok(), "a clean sealed stream failed: {end:?}");
            assert_eq!(got, plaintext, "decrypted bytes differ from the plaintext");
        }
        Some(at) => {
            assert!(end.is_err(), "a flipped ciphertext bit went unnoticed");
            // Messages before the damaged one arrive whole; nothing after it does.
            let mut clean = 0;
            let mut pos = 0;
            while pos + 2 <= ciphertext.len() {
                let n = usize::from(u16::from_le_bytes([ciphertext[pos], ciphertext[pos + 1]]));
                if pos + 2 + n > at || n < 16 {
                    break;
                }
                clean += n - 16;
                pos += 2 + n;
            }
            assert_eq!(
                got.len(),
                clean,
                "bytes from a damaged message were delivered"
            );
            assert_eq!(got[..], plaintext[..clean]);
        }
    }
    let Ok(Some((ty, body, _))) = frame::split_frame(&got) else {
        return Opening::NoFrame;
    };
    if ty != FrameType::Hello as u8 {
        return Opening::HelloRefused;
    }
    let Ok(h) = Hello::parse(body) else {
        return Opening::HelloRefused;
    };
    let mut again = Vec::new();
    h.put(&mut again);
    assert_eq!(&again[5..], body, "a parsed Hello re-encodes differently");
    match h.check_against(&handshake_ours()) {
        Ok(()) => Opening::Welcomed,
        Err(_) => Opening::HelloRefused,
    }
}
