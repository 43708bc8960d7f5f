//! Seed inputs for the fuzz targets, made by the real encoders so the fuzzer starts from
//! records and epochs that decode and commit.
//!
//! Shared like `checks.rs`: compiled as `castor_fuzz::seeds` and included into
//! `common/wire/tests/fuzz_corpus.rs`, whose ignored test `write_seed_corpus` writes these
//! files into `tests/fuzz/corpus/<target>/` (see `docs/FUZZING.md`). Everything here is
//! deterministic, so regenerating gives the same files.

use super::checks::{
    EPOCH_RAW, EPOCH_REFRAMED, EPOCH_SEPARATOR, EPOCH_WITH_STATE, GUEST_MODE, GUEST_PAGES,
    STATE_BLOB, VIEW_PAGES, fixture_page, guest_block_size, guest_image, xbzrle_old_page,
};
use ha_codec::PAGE_SIZE;
use ha_codec::block::{BlockSize, Page};
use ha_codec::cache::PageCache;
use ha_codec::codec::{
    Batch, CodecConfig, EncodedBatch, Encoding, GeneralCodec, Mode, PageEncoder,
};
use ha_codec::hashes::BlockHashes;
use ha_codec::{varint, xbzrle};
use ha_wire::stream::{EpochHeader, EpochWriter};
use std::collections::HashSet;

/// A named seed input.
pub type Seed = (String, Vec<u8>);

/// A small deterministic generator (splitmix64).
fn rng(seed: u64) -> impl FnMut() -> u64 {
    let mut s = seed;
    move || {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Seeds for `xbzrle_decode`: real deltas from [`xbzrle::encode`] against
/// [`xbzrle_old_page`] (one byte, edges, long runs with two-byte lengths, a whole page,
/// the worst case of alternating bytes, no change), plus one delta per rejection reason.
pub fn xbzrle_seeds() -> Vec<Seed> {
    let old = xbzrle_old_page();
    let edit = |f: &dyn Fn(&mut Page)| {
        let mut new = old.clone();
        f(&mut new);
        new
    };
    let news: Vec<(&str, Box<Page>)> = vec![
        ("unchanged", old.clone()),
        ("one-byte", edit(&|p| p[1001] ^= 1)),
        ("start", edit(&|p| p[..3].fill(0xaa))),
        ("end", edit(&|p| p[4094..].fill(0xee))),
        (
            "sparse",
            edit(&|p| p.iter_mut().step_by(100).for_each(|b| *b ^= 0x55)),
        ),
        ("long-run", edit(&|p| p[500..800].fill(0x11))),
        ("whole-page", fixture_page(7)),
        (
            "alternating",
            edit(&|p| p.iter_mut().step_by(2).for_each(|b| *b = !*b)),
        ),
    ];
    let mut seeds = Vec::new();
    let mut out = vec![0u8; 2 * PAGE_SIZE + xbzrle::ENCODE_SLACK];
    for (name, new) in news {
        let n = xbzrle::encode(&old, &new, &mut out, 2 * PAGE_SIZE).expect("fits");
        seeds.push((format!("delta-{name}"), out[..n].to_vec()));
    }
    let bad: [(&str, &[u8]); 7] = [
        ("length-too-long", &[0x80, 0x80, 0x01, 1, 5]),
        ("empty-zero-run", &[0, 1, 5, 0, 1, 5]),
        ("empty-data-run", &[3, 0, 5]),
        ("past-page", &[0x80, 0x20, 1, 5]),
        ("past-input", &[0, 3, 5, 5]),
        ("truncated", &[0, 1, 5, 7]),
        ("one-byte-input", &[0]),
    ];
    for (name, b) in bad {
        seeds.push((format!("bad-{name}"), b.to_vec()));
    }
    seeds
}

/// An encoder that knows exactly what `view` holds: every page sent once (so its blocks
/// are in the share index), cached, fingerprinted.
fn encoder_knowing(cfg: CodecConfig, view: &[Box<Page>]) -> PageEncoder {
    let cache = (cfg.mode != Mode::Remus).then(|| PageCache::shadow(view.len()));
    let hashes = (cfg.mode == Mode::Fgbi).then(|| BlockHashes::new(view.len(), cfg.block_size));
    let mut enc = PageEncoder::new(cfg, cache, hashes).expect("valid config");
    let pages: Vec<u64> = (0..view.len() as u64).collect();
    let data: Vec<u8> = view.iter().flat_map(|p| p.iter().copied()).collect();
    let mut out = EncodedBatch::default();
    enc.encode_batch(
        Batch {
            pages: &pages,
            data: &data,
        },
        &mut out,
    );
    enc
}

/// New contents for a page of the [`VIEW_PAGES`]-page view (`old` is its current content),
/// each aimed at one encoding: zero, a copy of another page, a small edit, shared and
/// zeroed blocks, compressible text, random bytes.
fn page_variants(old: &Page, view: &[Box<Page>]) -> Vec<(&'static str, Box<Page>)> {
    let mut r = rng(7);
    let mut edit = *old;
    for at in [17, 900, 2500] {
        edit[at] = edit[at].wrapping_add(1);
    }
    let mut blocks = *old;
    // Runs copied from another page (shareable blocks at any block size up to 1024),
    // zeroed runs and a few scattered literal bytes.
    blocks[1024..2048].copy_from_slice(&view[3][2048..3072]);
    blocks[3072..3584].fill(0);
    for at in (0..PAGE_SIZE).step_by(331) {
        blocks[at] = r() as u8;
    }
    let mut text = *fixture_page(2);
    text.rotate_left(5);
    text[100..140].fill(b'#');
    let mut random = [0u8; PAGE_SIZE];
    random.iter_mut().for_each(|b| *b = r() as u8);
    vec![
        ("zero", Box::new([0u8; PAGE_SIZE])),
        ("copy", view[3].clone()),
        ("edit", Box::new(edit)),
        ("blocks", Box::new(blocks)),
        ("text", Box::new(text)),
        ("random", Box::new(random)),
    ]
}

/// Seeds for `page_decode`: records the real [`PageEncoder`] produces for page 1 or 2 of
/// the fixed view, in every mode, block size and general codec: one per encoding, but
/// one per block size, codec and page variant for `Blocks` and one per codec for
/// `General`; as `encoding | block-size shift | page | payload`.
pub fn page_decode_seeds() -> Vec<Seed> {
    let view: Vec<Box<Page>> = (0..VIEW_PAGES as u64).map(fixture_page).collect();
    let mut seen = HashSet::new();
    let mut seeds = Vec::new();
    for mode in Mode::ALL {
        for shift in 0..6u8 {
            for general in [GeneralCodec::Zlib, GeneralCodec::Lz4, GeneralCodec::None] {
                let cfg = CodecConfig {
                    mode,
                    block_size: BlockSize::new(32 << shift).expect("valid"),
                    general,
                    zlib_level: 1,
                };
                for page in [1u64, 2] {
                    for (what, new) in page_variants(&view[page as usize], &view) {
                        let mut enc = encoder_knowing(cfg, &view);
                        let mut out = EncodedBatch::default();
                        enc.encode_batch(
                            Batch {
                                pages: &[page],
                                data: &new[..],
                            },
                            &mut out,
                        );
                        let rec = out.records[0];
                        let key = match rec.encoding {
                            Encoding::Blocks => (rec.encoding, shift, Some(general), what),
                            Encoding::General => (rec.encoding, 0, Some(general), ""),
                            e => (e, 0, None, ""),
                        };
                        if rec.encoding == Encoding::Unchanged || !seen.insert(key) {
                            continue;
                        }
                        let mut seed = vec![rec.encoding as u8, shift, page as u8];
                        seed.extend_from_slice(out.payload(&rec));
                        let name = format!(
                            "{}-{}-{}-bs{}-{what}-p{page}",
                            rec.encoding.name(),
                            mode.name(),
                            general.name(),
                            32 << shift
                        );
                        seeds.push((name, seed));
                    }
                }
            }
        }
    }
    // Records the encoder never produces: a self reference, a wrapping reference, an
    // unknown encoding, `Unchanged` on the wire.
    for (name, seed) in [
        ("pageref-self", vec![1, 1, 1, 0]),
        ("pageref-wrap", vec![1, 1, 0xff, 2]),
        ("unknown-encoding", vec![7, 1, 1]),
        ("unchanged", vec![6, 1, 1]),
    ] {
        seeds.push((format!("bad-{name}"), seed));
    }
    seeds
}

/// Three epochs of changes to the [`guest_image`], encoded by a warm fgbi primary with
/// `general`: per epoch the page records (as a Pages-frame body) and the whole epoch on
/// the wire (header, Pages, a state frame, trailer).
fn real_epochs(general: GeneralCodec) -> Vec<(Vec<u8>, Vec<u8>)> {
    let cfg = CodecConfig {
        mode: GUEST_MODE,
        block_size: guest_block_size(),
        general,
        zlib_level: 1,
    };
    let mut mem = guest_image();
    let mut enc = PageEncoder::new(
        cfg,
        Some(PageCache::shadow(GUEST_PAGES)),
        Some(BlockHashes::new(GUEST_PAGES, cfg.block_size)),
    )
    .expect("valid config");
    for p in 0..GUEST_PAGES {
        let content: &Page = mem[p * PAGE_SIZE..][..PAGE_SIZE].try_into().expect("page");
        enc.learn(p as u64, content);
    }
    let mut r = rng(u64::from(general == GeneralCodec::Lz4));
    let mut epochs = Vec::new();
    for e in 1..=3u64 {
        let e_usize = e as usize;
        let page = |mem: &[u8], p: usize| -> Box<Page> {
            Box::new(mem[p * PAGE_SIZE..][..PAGE_SIZE].try_into().expect("page"))
        };
        let mut changes: Vec<(usize, Box<Page>)> = Vec::new();
        // Zero, copy, small edit, shared and zeroed blocks, text, random.
        changes.push((e_usize, Box::new([0u8; PAGE_SIZE])));
        changes.push((e_usize + 4, page(&mem, 9)));
        let mut edit = page(&mem, 10);
        for _ in 0..5 {
            edit[(r() % PAGE_SIZE as u64) as usize] ^= 0x5a;
        }
        changes.push((10, edit));
        let mut blocks = page(&mem, 11);
        blocks[..1024].copy_from_slice(&mem[3 * PAGE_SIZE..][..1024]);
        blocks[2048..2560].fill(0);
        blocks[(e_usize * 700) % PAGE_SIZE] ^= 1;
        changes.push((11, blocks));
        let mut text = fixture_page(2);
        text.rotate_left(e_usize);
        changes.push((12, text));
        let mut random = Box::new([0u8; PAGE_SIZE]);
        random.iter_mut().for_each(|b| *b = r() as u8);
        changes.push((13, random));
        changes.sort_by_key(|c| c.0);
        let idx: Vec<u64> = changes.iter().map(|c| c.0 as u64).collect();
        let mut data = Vec::new();
        for (p, content) in &changes {
            mem[p * PAGE_SIZE..][..PAGE_SIZE].copy_from_slice(&content[..]);
            data.extend_from_slice(&content[..]);
        }
        let mut batch = EncodedBatch::default();
        enc.encode_batch(
            Batch {
                pages: &idx,
                data: &data,
            },
            &mut batch,
        );
        let mut body = Vec::new();
        for rec in batch
            .records
            .iter()
            .filter(|r| r.encoding != Encoding::Unchanged)
        {
            varint::put(&mut body, rec.page);
            body.push(rec.encoding as u8);
            varint::put(&mut body, rec.len as u64);
            body.extend_from_slice(batch.payload(rec));
        }
        let mut wire = Vec::new();
        let header = EpochHeader {
            epoch: e,
            mode: cfg.mode,
            block_size: cfg.block_size,
            records: EpochWriter::records_in(&batch),
        };
        let mut w = EpochWriter::begin(&mut wire, header);
        w.pages(&mut wire, &batch);
        w.state(&mut wire, STATE_BLOB);
        w.finish(&mut wire).expect("record count matches");
        epochs.push((body, wire));
    }
    epochs
}

/// Seeds for `epoch_apply`: real epochs on the wire (three in a row with zlib and with
/// lz4 literals, and the first zlib one alone), an empty epoch, and the same records in
/// the reframed form (zlib with state frames, lz4 without).
pub fn epoch_seeds() -> Vec<Seed> {
    let mut seeds = Vec::new();
    for general in [GeneralCodec::Zlib, GeneralCodec::Lz4] {
        let epochs = real_epochs(general);
        let g = general.name();
        let zlib = general == GeneralCodec::Zlib;
        if zlib {
            let mut one = vec![EPOCH_RAW];
            one.extend_from_slice(&epochs[0].1);
            seeds.push((format!("raw-{g}-epoch1"), one));
        }
        let mut all = vec![EPOCH_RAW];
        epochs.iter().for_each(|e| all.extend_from_slice(&e.1));
        seeds.push((format!("raw-{g}-epochs1-3"), all));
        let flags = if zlib {
            EPOCH_REFRAMED | EPOCH_WITH_STATE
        } else {
            EPOCH_REFRAMED
        };
        let mut re = vec![flags];
        for (k, e) in epochs.iter().enumerate() {
            if k > 0 {
                re.push(EPOCH_SEPARATOR);
            }
            re.extend_from_slice(&e.0);
        }
        seeds.push((format!("reframed{flags}-{g}-epochs1-3"), re));
    }
    // An epoch with no records: header, trailer.
    let mut empty = vec![EPOCH_RAW];
    let header = EpochHeader {
        epoch: 1,
        mode: GUEST_MODE,
        block_size: guest_block_size(),
        records: 0,
    };
    EpochWriter::begin(&mut empty, header)
        .finish(&mut empty)
        .expect("no records announced, none written");
    seeds.push(("raw-empty-epoch".into(), empty));
    // An epoch of disk records only: zero, compressed and raw content.
    let writes = [
        ha_guest::domain::DiskWrite {
            offset: 0,
            data: vec![0; 4096],
        },
        ha_guest::domain::DiskWrite {
            offset: 8192,
            data: b"log record ".repeat(94)[..1024].to_vec(),
        },
        ha_guest::domain::DiskWrite {
            offset: 512,
            data: (0..512u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect(),
        },
    ];
    let mut enc = ha_codec::codec::disk::DiskEncoder::new(GeneralCodec::Zlib, 1);
    let recs = ha_wire::disk::DiskRecords::encode(&mut enc, &writes).expect("whole sectors");
    let mut disk = vec![EPOCH_RAW];
    let header = EpochHeader {
        records: recs.records(),
        ..header
    };
    let mut w = EpochWriter::begin(&mut disk, header);
    w.disk(&mut disk, &recs);
    w.finish(&mut disk).expect("the records announced");
    seeds.push(("raw-disk-epoch".into(), disk));
    seeds
}

/// `handshake` seeds: raw peers (a plaintext Hello, garbage, a forged first message, a
/// truncated one) and sealed openings (the right Hello, a mismatched one, one of another
/// backend, a Hello followed by heartbeats, a damaged one).
pub fn handshake_seeds() -> Vec<Seed> {
    use crate::checks::{HANDSHAKE_FLIP, HANDSHAKE_RAW, HANDSHAKE_SEALED, handshake_ours};
    use ha_wire::secure::HANDSHAKE_LEN;
    use ha_wire::session;
    let mut hello = Vec::new();
    handshake_ours().put(&mut hello);
    let mut other = handshake_ours();
    other.memory_size *= 2;
    let mut other_hello = Vec::new();
    other.put(&mut other_hello);
    let mut xen = handshake_ours();
    xen.backend = ha_guest::backend::BackendKind::Xen;
    let mut xen_hello = Vec::new();
    xen.put(&mut xen_hello);
    // A first message of the right length that was not made with the key (a real one
    // from another key looks the same to the responder: an ephemeral key and a tag).
    let forged: Vec<u8> = (0..HANDSHAKE_LEN as u8)
        .map(|i| i.wrapping_mul(37) ^ 0x5a)
        .collect();
    let framed = |m: &[u8]| {
        let mut v = (m.len() as u16).to_le_bytes().to_vec();
        v.extend_from_slice(m);
        v
    };
    let with = |mode: u8, rest: &[u8]| {
        let mut v = vec![mode];
        v.extend_from_slice(rest);
        v
    };
    let mut hello_hb = hello.clone();
    session::put_heartbeat(&mut hello_hb);
    session::put_heartbeat(&mut hello_hb);
    vec![
        (
            "bad-raw-plaintext-hello".into(),
            with(HANDSHAKE_RAW, &hello),
        ),
        (
            "bad-raw-http".into(),
            with(HANDSHAKE_RAW, b"GET / HTTP/1.0\r\n\r\n"),
        ),
        (
            "bad-raw-forged".into(),
            with(HANDSHAKE_RAW, &framed(&forged)),
        ),
        (
            "bad-raw-truncated".into(),
            with(HANDSHAKE_RAW, &framed(&forged)[..20]),
        ),
        ("sealed-hello".into(), with(HANDSHAKE_SEALED, &hello)),
        (
            "sealed-hello-heartbeats".into(),
            with(HANDSHAKE_SEALED, &hello_hb),
        ),
        (
            "bad-sealed-mismatch".into(),
            with(HANDSHAKE_SEALED, &other_hello),
        ),
        (
            "bad-sealed-backend".into(),
            with(HANDSHAKE_SEALED, &xen_hello),
        ),
        (
            "bad-sealed-flipped".into(),
            with(HANDSHAKE_SEALED | HANDSHAKE_FLIP, &hello),
        ),
    ]
}
