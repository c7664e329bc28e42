//! Fuzz target bodies: for each parser of untrusted input, one function that takes the
//! bytes a fuzzer made up, runs the parser on them and panics when an invariant its callers
//! rely on breaks (a parser may refuse any input, but must never panic, and what it accepts
//! must be self-consistent). The cargo-fuzz targets in `fuzz/` and the stable smoke test
//! `tests/fuzz_smoke.rs` both call these functions, so every check lives here once; [`seeds`]
//! makes the seed corpora from real layers and indexes built by the crate. How to run them:
//! `docs/fuzzing.md`.
//!
//! Compiled only with the `fuzzing` feature. It owns input splitting, the invariants and
//! the seeds, no parsing logic of its own, and it touches no file, socket or kernel
//! interface.

use std::collections::BTreeMap;
use std::io::Write;

use sha2::{Digest, Sha256};

use crate::api::{ErrorKind, Request, Response};
use crate::index::{
    CHUNK_SIZE, Compression, Entry, EntryKind, IndexError, IndexOptions, LayerIndex, Span,
    WindowPack, extract, plan_back, verify_chunk, verify_whole,
};
use crate::unpack::Layer;
use crate::unpack::plan::{Key, Node, Plan};

/// A fuzz target body.
pub type Target = fn(&[u8]);

/// Every target: its name (the cargo-fuzz target and corpus directory) and its body.
pub const TARGETS: &[(&str, Target)] = &[
    ("index_tar", index_tar),
    ("index_gzip", index_gzip),
    ("index_decode", index_decode),
    ("index_extract", index_extract),
    ("unpack_plan", unpack_plan),
    ("api_line", api_line),
    ("text_parsers", text_parsers),
    ("toc_estargz", toc_estargz),
    ("toc_zstd", toc_zstd),
    ("checkpoint_inflate", checkpoint_inflate),
];

/// Index options with dense checkpoints, so that small inputs exercise every kind of gzip
/// checkpoint (member start, block boundary, inside a block) and their windows.
fn options() -> IndexOptions {
    IndexOptions {
        span: 8 << 10,
        file_span: 1 << 10,
        boundary_span: 0,
        max_header_bytes: 64 << 10,
        media_type: None,
        diff_id: true,
    }
}

/// Largest blob span the extract target fetches (bounds the work per input: a deflate or
/// zstd stream inflates at most a few hundred times its size).
const MAX_FETCH: u64 = 64 << 10;

/// (a) The tar walk of the index builder over arbitrary bytes as a plain tar stream; the same
/// stream compressed as two gzip members and as two zstd frames must index to the same
/// entries, and every file of each index must read back (through [`crate::index::plan`] and
/// [`extract`]) as the bytes its digests name.
pub fn index_tar(data: &[u8]) {
    let opts = options();
    let plain = LayerIndex::build(data, &opts);
    if let Ok((index, pack)) = &plain {
        assert_eq!(index.compression, Compression::None);
        check_built(index, pack, data);
    }
    if data.is_empty() || Compression::from_magic(data).is_some() {
        return;
    }
    let (head, tail) = data.split_at(data.len() / 2);
    let level = (data.len() % 10) as u32;
    let mut gz = Vec::new();
    let mut zst = Vec::new();
    for part in [head, tail] {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
        enc.write_all(part).expect("gzip into a Vec");
        gz.extend(enc.finish().expect("gzip into a Vec"));
        zst.extend(zstd::bulk::compress(part, level as i32).expect("zstd into a Vec"));
    }
    for (blob, compression) in [(gz, Compression::Gzip), (zst, Compression::Zstd)] {
        let built = LayerIndex::build(&blob[..], &opts);
        match (&plain, &built) {
            (Ok((p, _)), Ok((c, pack))) => {
                assert_eq!(c.compression, compression);
                assert_eq!(p.entries, c.entries, "{compression:?} indexes differently");
                assert_eq!(p.uncompressed_size, c.uncompressed_size);
                assert_eq!(p.diff_id, c.diff_id);
                check_built(c, pack, &blob);
            }
            (Err(_), Err(_)) => {}
            (p, c) => panic!(
                "plain tar and {compression:?} disagree: {:?} vs {:?}",
                p.as_ref().err(),
                c.as_ref().err()
            ),
        }
    }
}

/// (a) The index builder over arbitrary bytes as a gzip blob (a layer whose media type
/// says gzip): hostile deflate streams, member headers and trailers. What indexes must read
/// back as in [`index_tar`].
pub fn index_gzip(data: &[u8]) {
    let opts = IndexOptions {
        media_type: Some("application/vnd.oci.image.layer.v1.tar+gzip".into()),
        ..options()
    };
    if let Ok((index, pack)) = LayerIndex::build(data, &opts) {
        check_built(&index, &pack, data);
    }
}

/// (a') Differential check of gzip checkpoints: every checkpoint the indexer records,
/// inflated from its window, must give exactly the bytes a straight inflate of the same stream
/// gives from that offset on. The input is a recipe for data that compresses into long
/// matches and runs (where a resume bit inside a Huffman block is easy to get wrong, see
/// `src/index/gzip.rs`): byte 0 picks the gzip level, then each 3-byte step appends a run
/// (`b`, repeated `n * 64` times), a copy of earlier output, or literal bytes; the result is
/// cut into tar files of a few KiB so that every file start is a checkpoint candidate.
pub fn checkpoint_inflate(data: &[u8]) {
    let Some((&level, recipe)) = data.split_first() else {
        return;
    };
    let mut raw: Vec<u8> = Vec::new();
    for step in recipe.chunks(3) {
        let [op, a, b] = [
            step[0],
            *step.get(1).unwrap_or(&0),
            *step.get(2).unwrap_or(&0),
        ];
        match op % 3 {
            0 => raw.extend(std::iter::repeat_n(a, usize::from(b) * 64 + 1)),
            1 if !raw.is_empty() => {
                let len = (usize::from(a) * 64 + 1).min(raw.len());
                let from = usize::from(b) * 97 % raw.len();
                let from = from.min(raw.len() - len);
                raw.extend_from_within(from..from + len);
            }
            _ => raw.extend_from_slice(step),
        }
        if raw.len() > 1 << 20 {
            break;
        }
    }
    let mut tar = tar::Builder::new(Vec::new());
    for (i, piece) in raw.chunks(3000 + usize::from(level) * 37).enumerate() {
        let mut h = tar::Header::new_ustar();
        h.set_size(piece.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        if tar.append_data(&mut h, format!("f{i}"), piece).is_err() {
            return;
        }
    }
    let Ok(tar) = tar.into_inner() else { return };
    let mut enc =
        flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(u32::from(level % 10)));
    enc.write_all(&tar).expect("gzip into a Vec");
    let gz = enc.finish().expect("gzip into a Vec");
    let opts = IndexOptions {
        media_type: Some("application/vnd.oci.image.layer.v1.tar+gzip".into()),
        ..options()
    };
    check_every_checkpoint(&tar, &gz, &opts, 64 << 10);
}

/// Indexes `gz` (a gzip stream of `raw`) with `opts`, then inflates up to `len` bytes from
/// every checkpoint, with its window, and compares them with `raw` from that offset on.
/// Panics naming the first checkpoint that disagrees; returns how many were checked and how
/// many of them lie inside a Huffman block. The differential behind
/// [`checkpoint_inflate`] and the libLLVM-14 regression test.
pub fn check_every_checkpoint(
    raw: &[u8],
    gz: &[u8],
    opts: &IndexOptions,
    len: u64,
) -> (usize, usize) {
    let (index, pack) = LayerIndex::build(gz, opts).expect("a valid gzip tar indexes");
    let mut mid_block = 0;
    for (i, c) in index.checkpoints.iter().enumerate() {
        let from = c.uncompressed_offset;
        let len = len.min(index.uncompressed_size - from);
        let inside = c.window.is_some_and(|w| w.header_bits > 0);
        mid_block += usize::from(inside);
        if len == 0 {
            continue;
        }
        let span = Span {
            blob_offset: c.compressed_offset,
            blob_len: gz.len() as u64 - c.compressed_offset,
            checkpoint: Some(i),
            uncompressed_offset: from,
            len,
        };
        let window = pack.window(&index, i).expect("the pack holds every window");
        let out = extract(&index, &span, &window, &gz[c.compressed_offset as usize..])
            .unwrap_or_else(|e| panic!("checkpoint {i} at {from}: {e}"));
        let want = &raw[from as usize..(from + len) as usize];
        if out != want {
            let at = out.iter().zip(want).position(|(a, b)| a != b);
            panic!(
                "checkpoint {i} at {from} (inside a block: {inside}) inflates wrong bytes from {at:?} on"
            );
        }
    }
    (index.checkpoints.len(), mid_block)
}

/// (b) The stored index format: a whole stored file (when the input starts with the magic)
/// or a bare body, so that mutations reach the field checks instead of the zstd checksum.
/// What decodes must encode and decode to the same index, and plan only spans inside the
/// blob.
pub fn index_decode(data: &[u8]) {
    let decoded = if data.starts_with(&crate::index::FORMAT_MAGIC) {
        LayerIndex::decode(data)
    } else {
        LayerIndex::decode_body(data)
    };
    let Ok(index) = decoded else { return };
    round_trip(&index);
    for e in index.entries.iter().filter(|e| e.kind == EntryKind::File) {
        for (offset, len) in [(0, e.size), (e.size / 2, CHUNK_SIZE), (e.size, 1)] {
            for back in [0, 1] {
                if let Ok(span) = plan_back(&index, e, offset, len, back) {
                    check_span(&index, e, offset, len, &span);
                }
            }
        }
    }
    for i in 0..index.entries.len().min(16) {
        if let Some(e) = index.resolve(i) {
            assert_ne!(e.kind, EntryKind::Hardlink, "resolve returned a hardlink");
        }
    }
}

/// (c) The gzip checkpoint reader: an index body, a windows pack and blob bytes (each
/// length-prefixed, see [`extract_input`]) plus parameters choosing a file range. The range
/// is planned and extracted with the pack's window, then extracted again from a span and a
/// window made up from the input (raw block header bits included). [`extract`] must return
/// exactly the bytes asked for or an error.
pub fn index_extract(data: &[u8]) {
    let Some((body, pack, params, blob)) = split_extract_input(data) else {
        return;
    };
    let Ok(index) = LayerIndex::decode_body(body) else {
        return;
    };
    let pack_bytes = pack;
    let pack = WindowPack::from_bytes(pack.to_vec());
    let files: Vec<&Entry> = index
        .entries
        .iter()
        .filter(|e| e.kind == EntryKind::File)
        .collect();
    let fetch = |span: &Span| -> Option<Vec<u8>> {
        if span.blob_len > MAX_FETCH {
            return None;
        }
        let start = usize::try_from(span.blob_offset).unwrap_or(usize::MAX);
        let mut out: Vec<u8> = blob.get(start..).unwrap_or_default().to_vec();
        out.resize(span.blob_len as usize, 0);
        Some(out)
    };
    if !files.is_empty() {
        let e = files[usize::from(params[0]) % files.len()];
        let offset = e.size / 255 * u64::from(params[1]);
        let len = (u64::from(u16::from_le_bytes([params[2], params[3]])) + 1) * 64;
        let len = len.min(CHUNK_SIZE);
        let back = usize::from(params[4] % 4);
        if let Ok(span) = plan_back(&index, e, offset, len, back) {
            check_span(&index, e, offset, len, &span);
            let window = match span.checkpoint {
                Some(cp) => pack.window(&index, cp),
                None => Ok(Vec::new()),
            };
            if let (Ok(window), Some(fetched)) = (window, fetch(&span)) {
                if let Ok(out) = extract(&index, &span, &window, &fetched) {
                    assert_eq!(
                        out.len() as u64,
                        span.len,
                        "extract returned a wrong length"
                    );
                }
            }
        }
    }
    // A span not made by plan, and a window straight from the input (not checked against
    // its crc): extract's own checks and the inflater's handling of hostile block headers.
    let cp = usize::from(params[5]) % index.checkpoints.len().max(1);
    let Some(c) = index.checkpoints.get(cp) else {
        return;
    };
    let need = c.window.map_or(0, |w| w.len as usize + w.header_len());
    let mut window = pack_bytes.to_vec();
    window.resize(need, 0);
    let span = Span {
        blob_offset: c.compressed_offset,
        blob_len: (u64::from(params[6]) << 8 | u64::from(params[7]))
            .min(index.compressed_size - c.compressed_offset),
        checkpoint: Some(cp),
        uncompressed_offset: c
            .uncompressed_offset
            .saturating_add(u64::from(params[1]) * 97),
        len: u64::from(params[2]) * 131 + 1,
    };
    if let Some(fetched) = fetch(&span) {
        if let Ok(out) = extract(&index, &span, &window, &fetched) {
            assert_eq!(
                out.len() as u64,
                span.len,
                "extract returned a wrong length"
            );
        }
    }
}

/// (d) The unpack planner over arbitrary layer stacks (made from the input by
/// [`entries_from`]: paths from a small alphabet with `..`, `.`, empty components, NULs,
/// whiteouts and opaque markers; every kind; hardlink and symlink targets). A plan that
/// succeeds names only paths inside the root, places nothing beneath a non-directory, points
/// every node at an entry of the right kind, and flattens the same in both modes.
pub fn unpack_plan(data: &[u8]) {
    let layers = entries_from(data);
    let refs: Vec<Layer<'_>> = layers
        .iter()
        .map(|es| Layer::new("sha256:fuzz", es))
        .collect();
    let direct = crate::unpack::plan::plan(&refs, false);
    let overlay = crate::unpack::plan::plan(&refs, true);
    match (&direct, &overlay) {
        (Ok(d), Ok(o)) => {
            assert_eq!(
                d.merged, o.merged,
                "direct and overlay plans flatten differently"
            );
            assert_eq!(d.first_visible, o.first_visible);
            check_plan(o, &layers);
        }
        (Err(_), Err(_)) => {}
        (d, o) => panic!(
            "direct and overlay planning disagree: {:?} vs {:?}",
            d.as_ref().err(),
            o.as_ref().err()
        ),
    }
}

/// (e) The daemon API: every line of the input as the daemon reads a request (and as a
/// client reads a response). What parses must serialise to one line that parses back the
/// same; what does not gets a one-line `BadRequest` error.
pub fn api_line(data: &[u8]) {
    // As the daemon reads them: `\n` ends a line (any bytes, at most 1 MiB).
    for line in data.split(|b| *b == b'\n') {
        match Request::from_line(line) {
            Ok(req) => {
                let out = req.to_line().expect("a request serialises");
                let back = Request::from_line(one_line(&out)).expect("a request re-parses");
                assert_eq!(back, req, "request round trip");
            }
            Err(e) => {
                let out = Response::bad_request(&e).to_line();
                let back = Response::from_line(one_line(&out)).expect("an error re-parses");
                assert!(
                    matches!(
                        back,
                        Response::Error {
                            kind: ErrorKind::BadRequest,
                            ..
                        }
                    ),
                    "{back:?}"
                );
            }
        }
        if let Ok(resp) = Response::from_line(line) {
            let out = resp.to_line();
            let back = Response::from_line(one_line(&out)).expect("a response re-parses");
            // Compared as text: a float may come back one unit off in the last place.
            assert_eq!(back.to_line(), out, "response round trip");
        }
    }
}

/// The line without its `\n`, checking it is exactly one line.
fn one_line(s: &str) -> &[u8] {
    let line = s.strip_suffix('\n').expect("a protocol line ends with \\n");
    assert!(
        !line.contains('\n'),
        "a protocol line spans lines: {line:?}"
    );
    line.as_bytes()
}

/// Blob size the TOC targets claim: large, so that the seeds' offsets all lie inside it.
const TOC_BLOB: u64 = 1 << 40;

/// (f) eStargz: the input as a footer, as a TOC gzip member (`stargz.index.json` in a tar)
/// and as TOC JSON. A TOC that parses must be self-consistent ([`check_toc`]).
pub fn toc_estargz(data: &[u8]) {
    use crate::toc::estargz;
    if let Some((_, len)) = estargz::parse_footer(data) {
        assert!(len == estargz::FOOTER_SIZE || len == estargz::LEGACY_FOOTER_SIZE);
    }
    if let Ok(json) = estargz::toc_json(data) {
        if let Ok(toc) = estargz::parse_toc(&json, "sha256:fuzz", TOC_BLOB, TOC_BLOB / 2) {
            check_toc(&toc, TOC_BLOB / 2);
        }
    }
    if let Ok(toc) = estargz::parse_toc(data, "sha256:fuzz", TOC_BLOB, TOC_BLOB / 2) {
        check_toc(&toc, TOC_BLOB / 2);
    }
}

/// (f) zstd:chunked: the input as a footer, as a compressed TOC (hostile zstd) and, zstd
/// compressed here, as TOC JSON. A TOC that parses must be self-consistent ([`check_toc`]).
pub fn toc_zstd(data: &[u8]) {
    use crate::toc::zstd_chunked::{TocPosition, parse};
    let _ = TocPosition::from_footer("sha256:fuzz", TOC_BLOB, data);
    let at = TOC_BLOB / 2;
    let raw = TocPosition {
        offset: at,
        len: data.len() as u64,
        uncompressed_len: u64::from(data.first().copied().unwrap_or(0)) << 8,
        checksum: None,
    };
    if let Ok(toc) = parse("sha256:fuzz", TOC_BLOB, &raw, data) {
        check_toc(&toc, TOC_BLOB);
    }
    let compressed = zstd::bulk::compress(data, 1).expect("zstd into a Vec");
    let position = TocPosition {
        offset: at,
        len: compressed.len() as u64,
        uncompressed_len: data.len() as u64,
        checksum: None,
    };
    if let Ok(toc) = parse("sha256:fuzz", TOC_BLOB, &position, &compressed) {
        check_toc(&toc, TOC_BLOB);
    }
}

/// A parsed TOC: one chunk list per entry, each regular file's chunks covering `0..size` in
/// order without gaps or overlaps, every chunk's bytes inside the blob (before `limit`) and
/// bounded, paths normalised, prefetch entries existing, and an entry table the unpack
/// planner takes without panicking.
fn check_toc(toc: &crate::toc::TocLayer, limit: u64) {
    let entries = &toc.index.entries;
    assert_eq!(entries.len(), toc.chunks.len(), "one chunk list per entry");
    for (e, chunks) in entries.iter().zip(&toc.chunks) {
        check_normalised(&e.path);
        if e.kind != EntryKind::File {
            assert!(chunks.is_empty(), "{:?}: chunks on a non-file", e.path);
            continue;
        }
        let mut next = 0u64;
        for c in chunks {
            assert_eq!(c.file_offset, next, "{:?}: chunk gap or overlap", e.path);
            assert!(
                c.len > 0 && c.len <= crate::toc::MAX_CHUNK_LEN,
                "{:?}: chunk length {}",
                e.path,
                c.len
            );
            assert!(
                c.inner_offset <= crate::toc::MAX_INNER_OFFSET,
                "{:?}: chunk {} bytes into its member",
                e.path,
                c.inner_offset
            );
            next = c
                .file_offset
                .checked_add(c.len)
                .expect("chunk end overflows");
            if !c.zeros {
                assert!(
                    c.compressed_offset < c.compressed_end && c.compressed_end <= limit,
                    "{:?}: chunk bytes {}..{} outside the blob",
                    e.path,
                    c.compressed_offset,
                    c.compressed_end
                );
            }
        }
        assert_eq!(next, e.size, "{:?}: chunks do not cover the file", e.path);
    }
    for &i in &toc.prefetch_first {
        assert!(
            i < entries.len(),
            "prefetch names entry {i} of {}",
            entries.len()
        );
    }
    let _ = crate::unpack::plan::plan(&[Layer::new("sha256:fuzz", entries)], true);
}

/// The small text parsers of what registries, users and the kernel hand in: a
/// `WWW-Authenticate` challenge, an image reference (what parses must print and parse back
/// the same), and `/proc/self/mountinfo` text the OCI hook searches for an overlay rootfs
/// (its octal escapes and `lowerdir=` splitting).
pub fn text_parsers(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = crate::registry::parse_challenge(&text);
    if let Ok(r) = text.parse::<crate::reference::Reference>() {
        let printed = r.to_string();
        let back = printed
            .parse::<crate::reference::Reference>()
            .unwrap_or_else(|e| {
                panic!("{text:?} printed as {printed:?}, which does not parse: {e}")
            });
        assert_eq!(back, r, "{text:?} printed as {printed:?}");
    }
    let mount_point = text
        .lines()
        .next()
        .and_then(|l| l.split(' ').nth(4))
        .unwrap_or("/");
    let _ = crate::hook::overlay_lowerdirs(&text, std::path::Path::new(mount_point));
}

/// Checks an index just built from `blob` (with its windows `pack`): sizes and digests,
/// paths, the encode/decode round trip, and that every file reads back whole, by chunk and
/// by a middle range as the bytes its digests name.
fn check_built(index: &LayerIndex, pack: &WindowPack, blob: &[u8]) {
    assert_eq!(index.compressed_size, blob.len() as u64);
    assert_eq!(
        index.blob_digest,
        format!("sha256:{}", hex::encode(Sha256::digest(blob)))
    );
    match &index.windows_digest {
        Some(d) => {
            assert_eq!(*d, pack.digest());
            assert_eq!(index.windows_size, pack.len());
        }
        None => assert_eq!(index.windows_size, 0),
    }
    for e in &index.entries {
        check_normalised(&e.path);
        if e.kind == EntryKind::Hardlink {
            check_normalised(e.link.as_deref().unwrap_or_default());
        }
        assert!(e.data_offset + e.size <= index.uncompressed_size);
        assert!(e.kind == EntryKind::File || e.size == 0);
    }
    round_trip(index);
    for e in index.entries.iter().filter(|e| e.kind == EntryKind::File) {
        let read = |offset, len, back| -> Result<Vec<u8>, IndexError> {
            let span = plan_back(index, e, offset, len, back)?;
            check_span(index, e, offset, len, &span);
            let window = match span.checkpoint {
                Some(cp) => pack.window(index, cp)?,
                None => Vec::new(),
            };
            let fetched =
                &blob[span.blob_offset as usize..(span.blob_offset + span.blob_len) as usize];
            let out = extract(index, &span, &window, fetched)?;
            assert_eq!(out.len() as u64, span.len);
            Ok(out)
        };
        let whole = read(0, e.size, 0)
            .unwrap_or_else(|err| panic!("{:?} does not read back: {err}", e.path));
        verify_whole(e, &whole).unwrap_or_else(|err| panic!("{:?}: {err}", e.path));
        for i in 0..e.chunk_count() {
            let (off, len) = e.chunk_range(i).expect("chunk in range");
            let chunk = read(off, len, 0).expect("chunk reads back");
            verify_chunk(e, i, &chunk).unwrap_or_else(|err| panic!("{:?}: {err}", e.path));
        }
        let (off, len) = (e.size / 3, e.size / 2 + 1);
        let part = read(off, len, 1).expect("range reads back");
        let end = (off + len).min(e.size);
        assert!(
            part == whole[off as usize..end as usize],
            "{:?}: range differs",
            e.path
        );
    }
}

/// Encode → decode gives the same index, for the stored file and the bare body.
fn round_trip(index: &LayerIndex) {
    let back = LayerIndex::decode(&index.encode()).expect("an encoded index decodes");
    assert_eq!(&back, index, "decode(encode(index)) differs");
    let back = LayerIndex::decode_body(&index.encode_body()).expect("an encoded body decodes");
    assert_eq!(&back, index, "decode_body(encode_body(index)) differs");
}

/// A planned span stays inside the blob, starts at its checkpoint and covers at most the
/// rest of the file.
fn check_span(index: &LayerIndex, e: &Entry, offset: u64, len: u64, span: &Span) {
    assert!(offset <= e.size, "planned past the end of {:?}", e.path);
    assert_eq!(span.len, len.min(e.size - offset), "span length");
    assert_eq!(span.uncompressed_offset, e.data_offset + offset);
    assert!(
        span.blob_offset
            .checked_add(span.blob_len)
            .is_some_and(|end| end <= index.compressed_size),
        "span {span:?} leaves the blob of {} bytes",
        index.compressed_size
    );
    if span.len == 0 {
        return;
    }
    match index.compression {
        Compression::None => {
            assert_eq!(span.checkpoint, None);
            assert_eq!(span.blob_offset, span.uncompressed_offset);
            assert_eq!(span.blob_len, span.len);
        }
        Compression::Gzip | Compression::Zstd => {
            let cp = span.checkpoint.expect("a compressed span has a checkpoint");
            let c = &index.checkpoints[cp];
            assert_eq!(span.blob_offset, c.compressed_offset);
            assert!(c.uncompressed_offset <= span.uncompressed_offset);
        }
    }
}

/// An index path is normalised: relative, no empty, `.` or `..` components, no NUL.
fn check_normalised(path: &str) {
    if path.is_empty() {
        return;
    }
    assert!(!path.contains('\0'), "NUL in {path:?}");
    for c in path.split('/') {
        assert!(
            !matches!(c, "" | "." | ".."),
            "path {path:?} not normalised"
        );
    }
}

/// Checks every tree of a plan against the entries it was made from.
fn check_plan(plan: &Plan, layers: &[Vec<Entry>]) {
    let entry = |r: crate::unpack::plan::EntryRef| -> &Entry {
        layers
            .get(r.layer)
            .and_then(|l| l.get(r.entry))
            .unwrap_or_else(|| panic!("plan names a missing entry {r:?}"))
    };
    assert!(plan.first_visible < layers.len().max(1));
    let trees = std::iter::once((None, &plan.merged))
        .chain(plan.layers.iter().enumerate().map(|(i, t)| (Some(i), t)));
    for (li, tree) in trees {
        assert!(
            matches!(tree.get(&Key::new()), Some(Node::Dir { .. })),
            "tree without a root directory"
        );
        for (key, node) in tree {
            check_key(key, tree);
            match *node {
                Node::Dir { meta, .. } => {
                    if let Some(r) = meta {
                        assert_eq!(
                            entry(r).kind,
                            EntryKind::Dir,
                            "directory from a non-directory"
                        );
                    }
                }
                Node::Leaf { inode, via } => {
                    assert!(!key.is_empty(), "the root is a leaf");
                    let k = &entry(inode).kind;
                    assert!(
                        *k != EntryKind::Dir && *k != EntryKind::Hardlink,
                        "inode {k:?}"
                    );
                    assert_ne!(entry(via).kind, EntryKind::Dir);
                    if let Some(li) = li {
                        assert_eq!(via.layer, li, "a layer tree names another layer's entry");
                        assert!(inode.layer <= li, "a hardlink to a higher layer");
                    }
                }
                Node::Whiteout => assert!(li.is_some(), "a whiteout in the merged view"),
            }
        }
    }
}

/// A key names a path inside the root (valid components) whose parent is a directory of
/// the same tree.
fn check_key(key: &[u8], tree: &BTreeMap<Key, Node>) {
    if key.is_empty() {
        return;
    }
    for c in key.split(|b| *b == 0) {
        assert!(
            !c.is_empty() && c != b"." && c != b".." && !c.contains(&b'/'),
            "planned path {:?} escapes or is malformed",
            crate::unpack::plan::display(key)
        );
    }
    let parent = crate::unpack::plan::parent(key);
    assert!(
        matches!(tree.get(parent), Some(Node::Dir { .. })),
        "{:?} is not beneath a directory",
        crate::unpack::plan::display(key)
    );
}

/// Path components the unpack planner is fed: plain names, whiteouts, opaque and aufs
/// markers, and every malformed component.
const NAMES: &[&str] = &[
    "a",
    "b",
    "c",
    ".wh.a",
    ".wh.b",
    ".wh.c",
    ".wh..wh..opq",
    ".wh..wh.plnk",
    ".wh.",
    ".wh..",
    "..",
    ".",
    "",
    "a\0",
    "é",
];

/// Reads bytes one at a time; `None` once the input is used up.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn next(&mut self) -> Option<u8> {
        let (b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*b)
    }

    /// A path: up to 3 components from [`NAMES`], optionally with a leading `./` or `/` and
    /// a trailing `/`.
    fn path(&mut self) -> Option<String> {
        let b = self.next()?;
        let mut s = String::new();
        if b & 4 != 0 {
            s.push_str("./");
        }
        if b & 8 != 0 {
            s.push('/');
        }
        for i in 0..b & 3 {
            if i > 0 {
                s.push('/');
            }
            s.push_str(NAMES[usize::from(self.next()?) % NAMES.len()]);
        }
        if b & 16 != 0 {
            s.push('/');
        }
        Some(s)
    }
}

/// Layers of entries made from `data` for [`unpack_plan`]: a layer count (1-3), then per
/// layer an entry count (0-15) and entries (kind byte, path, link target for link kinds
/// unless the kind byte's top bit says none).
pub fn entries_from(data: &[u8]) -> Vec<Vec<Entry>> {
    let mut b = Bytes(data);
    let mut layers = Vec::new();
    let n = b.next().map_or(1, |n| 1 + n % 3);
    for _ in 0..n {
        let mut entries = Vec::new();
        let count = b.next().unwrap_or(0) % 16;
        for _ in 0..count {
            let Some(k) = b.next() else { break };
            let Some(path) = b.path() else { break };
            let kind = match k % 7 {
                0 => EntryKind::File,
                1 => EntryKind::Dir,
                2 => EntryKind::Symlink,
                3 => EntryKind::Hardlink,
                4 => EntryKind::Fifo,
                5 => EntryKind::Char { major: 0, minor: 0 },
                _ => EntryKind::Block { major: 1, minor: 3 },
            };
            let mut e = Entry::new(path, kind, 0o755);
            if matches!(e.kind, EntryKind::Symlink | EntryKind::Hardlink) && k & 0x80 == 0 {
                e.link = b.path().map(Into::into);
            }
            entries.push(e);
        }
        layers.push(entries);
    }
    layers
}

/// Parts of an [`index_extract`] input: index body, windows pack, 8 parameter bytes, blob.
type ExtractInput<'a> = (&'a [u8], &'a [u8], [u8; 8], &'a [u8]);

fn split_extract_input(data: &[u8]) -> Option<ExtractInput<'_>> {
    let mut rest = data;
    let mut prefixed = || -> Option<&[u8]> {
        let (len, tail) = rest.split_first_chunk::<4>()?;
        let n = u32::from_le_bytes(*len) as usize;
        if n > tail.len() {
            return None;
        }
        let (part, tail) = tail.split_at(n);
        rest = tail;
        Some(part)
    };
    let body = prefixed()?;
    let pack = prefixed()?;
    let (params, blob) = rest.split_first_chunk::<8>()?;
    Some((body, pack, *params, blob))
}

/// An [`index_extract`] input: `index`'s body, its windows `pack`, `params`, the `blob`.
pub fn extract_input(
    index: &LayerIndex,
    pack: &WindowPack,
    params: [u8; 8],
    blob: &[u8],
) -> Vec<u8> {
    let body = index.encode_body();
    let mut out = Vec::with_capacity(body.len() + pack.bytes().len() + blob.len() + 16);
    for part in [&body[..], &pack.bytes()[..]] {
        out.extend_from_slice(&(part.len() as u32).to_le_bytes());
        out.extend_from_slice(part);
    }
    out.extend_from_slice(&params);
    out.extend_from_slice(blob);
    out
}

/// Seed inputs for target `name` (one of [`TARGETS`]), made from small real layers (plain,
/// gzip with checkpoints inside deflate blocks, zstd) and their indexes.
pub fn seeds(name: &str) -> Vec<Vec<u8>> {
    let tars = seed_tars();
    let opts = options();
    let gzip = |tar: &[u8], level| {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
        enc.write_all(tar).expect("gzip into a Vec");
        enc.finish().expect("gzip into a Vec")
    };
    match name {
        "index_tar" => tars,
        // Runs, copies and literals at levels 6, 1 and 9.
        "checkpoint_inflate" => vec![
            [6u8, 0, 0, 200, 2, 7, 7, 1, 40, 3, 0, 0xff, 255, 2, 1, 2, 1, 200, 9, 0, 0, 255]
                .to_vec(),
            [1u8, 2, 5, 5, 0, 1, 255, 2, 9, 9, 1, 100, 50, 0, 0, 255, 0, 0, 255, 2, 3, 4].to_vec(),
            (0..600u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .chain([9])
                .rev()
                .collect(),
        ],
        "index_gzip" => tars.iter().flat_map(|t| [gzip(t, 6), gzip(t, 1)]).collect(),
        "index_decode" => tars
            .iter()
            .flat_map(|t| [t.clone(), gzip(t, 6), zstd::bulk::compress(t, 3).expect("zstd")])
            .filter_map(|blob| LayerIndex::build(&blob[..], &opts).ok())
            .flat_map(|(index, _)| [index.encode(), index.encode_body()])
            .collect(),
        "index_extract" => {
            let mut out = Vec::new();
            for t in &tars {
                for blob in [t.clone(), gzip(t, 6), zstd::bulk::compress(t, 3).expect("zstd")] {
                    let Ok((index, pack)) = LayerIndex::build(&blob[..], &opts) else {
                        continue;
                    };
                    for params in [[0, 0, 255, 255, 0, 0, 0, 0], [1, 128, 16, 0, 1, 3, 255, 255]] {
                        out.push(extract_input(&index, &pack, params, &blob));
                    }
                }
            }
            out
        }
        "unpack_plan" => vec![
            // Two layers: a/b file, a dir, whiteout of a in the second, hardlink b -> a/b.
            vec![1, 3, 0, 2, 0, 1, 1, 1, 0, 3, 1, 3, 1, 1, 1, 3, 3, 1, 2, 0],
            // A symlink and an entry beneath it; `..` and absolute paths.
            vec![0, 4, 2, 1, 0, 1, 0, 0, 2, 0, 1, 0, 1, 10, 8, 1, 0],
            // Opaque marker at the root and in a directory, over two lower layers.
            vec![2, 2, 1, 1, 0, 0, 1, 1, 1, 2, 0, 1, 6, 0, 2, 0, 2, 6, 1],
        ],
        "text_parsers" => vec![
            br#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull""#.to_vec(),
            b"Basic realm=\"r\\\"x\"".to_vec(),
            b"docker://localhost:5000/library/debian:12@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef".to_vec(),
            b"oci:/srv/images/app:1".to_vec(),
            b"90 22 0:50 / /run/c\\040x/merged rw - overlay overlay rw,lowerdir=/l/2-abc:/l/1-def\\:x,upperdir=/u,workdir=/w\n22 1 8:1 / / rw - ext4 /dev/vda rw\n".to_vec(),
        ],
        "toc_estargz" => {
            use crate::toc::estargz;
            let mut out = Vec::new();
            for tar in &tars {
                let opts = estargz::WriteOptions {
                    chunk_size: 16 << 10,
                    prefetch: vec!["etc/hosts".into()],
                    level: 6,
                };
                let Ok(w) = estargz::write(tar, &opts) else {
                    continue;
                };
                let (_, footer) = estargz::parse_footer(&w.blob).expect("a written footer");
                let member = &w.blob[w.toc_offset as usize..w.blob.len() - footer as usize];
                out.push(estargz::toc_json(member).expect("a written TOC"));
                out.push(member.to_vec());
                out.push(w.blob[w.blob.len() - footer as usize..].to_vec());
            }
            out
        }
        "api_line" => vec![
            br#"{"Prepare":{"image":"oci:/srv/img:1","dest":"/srv/a","mode":"overlay","registry":{"insecure":true,"mirrors":["m:5000"]},"prefetch":true}}"#.to_vec(),
            b"{\"Status\":{\"dest\":null}}\n{\"Remove\":{\"dest\":\"/d\"}}\r\n\"Ping\"".to_vec(),
            br#"{"Status":{"daemon":{"pid":1,"took_over":false,"inherited_answered":0,"inflight_events":0,"events":3,"errors":0,"latency_p50_us":10,"latency_p99_us":90},"images":[{"id":1,"reference":"r","manifest_digest":"sha256:00","dest":"/d","mode":"direct","lowerdir":null,"files":2,"files_complete":1,"bytes_total":10,"bytes_filled":5,"bytes_fetched":7,"fetch_rate":1.5e3,"errors":0,"prefetch":false,"state":"serving"}]}}"#.to_vec(),
            br#"{"Error":{"kind":"UnknownImage","message":"no image at /x"}}"#.to_vec(),
            br#"{"WatchOverlay":{"merged":"/run/c/rootfs"}}"#.to_vec(),
            br#"{"Prefetch":{"dest":"/d","enable":true}}"#.to_vec(),
        ],
        _ => Vec::new(),
    }
}

/// Small tar streams covering what the walker handles: files around the chunk and block
/// sizes, directories, links, devices, PAX (long path, xattrs, mtime) and GNU long names.
fn seed_tars() -> Vec<Vec<u8>> {
    let mut tars = Vec::new();
    let text: Vec<u8> = (0..12_000u32)
        .flat_map(|i| format!("line {i} of a text file\n").into_bytes())
        .take(40_000)
        .collect();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    h.set_size(0);
    b.append_data(&mut h, "etc/", &[][..]).expect("tar");
    for (name, data) in [
        ("etc/hosts", &b"127.0.0.1 localhost\n"[..]),
        ("etc/empty", &b""[..]),
        ("usr/share/text", &text[..]),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, data).expect("tar");
    }
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    b.append_link(&mut h, "etc/link", "/etc/hosts")
        .expect("tar");
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Link);
    h.set_size(0);
    b.append_link(&mut h, "etc/hard", "etc/hosts").expect("tar");
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Char);
    h.set_device_major(1).expect("tar");
    h.set_device_minor(3).expect("tar");
    h.set_size(0);
    b.append_data(&mut h, "dev/null", &[][..]).expect("tar");
    let long = format!("{}/file", "d".repeat(120));
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o600);
    h.set_size(5);
    b.append_data(&mut h, &long, &b"hello"[..]).expect("tar");
    tars.push(b.into_inner().expect("tar"));

    // PAX: xattrs, a fractional mtime, a whiteout; ustar format.
    let mut b = tar::Builder::new(Vec::new());
    b.append_pax_extensions([
        ("SCHILY.xattr.user.k", &b"v"[..]),
        ("mtime", &b"1700000000.25"[..]),
        ("path", &b"opt/app/./config"[..]),
    ])
    .expect("tar");
    let mut h = tar::Header::new_ustar();
    h.set_mode(0o4755);
    h.set_size(3);
    b.append_data(&mut h, "placeholder", &b"cfg"[..])
        .expect("tar");
    let mut h = tar::Header::new_ustar();
    h.set_size(0);
    b.append_data(&mut h, "opt/.wh.old", &[][..]).expect("tar");
    tars.push(b.into_inner().expect("tar"));

    tars
}

/// A tar of one file just over a [`CHUNK_SIZE`] of poorly compressible bytes (gzip makes
/// Huffman blocks with checkpoints inside them; the index has chunk digests). Too large for
/// a seed corpus: the smoke test runs the targets on it once.
pub fn chunked_tar() -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let noise: Vec<u8> = (0..(CHUNK_SIZE + 4096))
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if i % 3 == 0 { b'a' } else { x as u8 & 0x3f }
        })
        .collect();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_size(noise.len() as u64);
    b.append_data(&mut h, "big", &noise[..]).expect("tar");
    b.into_inner().expect("tar")
}
