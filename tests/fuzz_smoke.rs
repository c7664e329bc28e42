//! The fuzz targets on stable, inside `cargo test`: every body of `fanfill::fuzzing` runs over
//! its committed seed corpus (`fuzz/corpus/<target>/`: real layers and indexes built by the
//! crate, plus every crash input a long run found) and then over a fixed-seed stream of
//! mutations of it for a bounded time (`FUZZ_SMOKE_SECS`, default 3 s per target). A body
//! that panics fails the test; the input is written to the test's temp dir and its path and
//! hex are printed. The libFuzzer runs with coverage feedback are in `fuzz/`
//! (`docs/fuzzing.md`).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fanfill::fuzzing::{TARGETS, Target};

fn corpus_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(name)
}

fn body(name: &str) -> Target {
    TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, f)| *f)
        .unwrap_or_else(|| panic!("no fuzz target {name}"))
}

/// The committed corpus of a target, sorted by file name.
fn corpus(name: &str) -> Vec<(String, Vec<u8>)> {
    let dir = corpus_dir(name);
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|d| {
            let path = d.expect("corpus entry").path();
            let data = std::fs::read(&path).expect("corpus file");
            (
                path.file_name().unwrap().to_string_lossy().into_owned(),
                data,
            )
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{}: empty seed corpus", dir.display());
    files
}

/// Runs `f` on `input`; on a panic saves the input and fails naming it.
fn run_one(name: &str, f: Target, input: &[u8], what: &str) {
    if catch_unwind(AssertUnwindSafe(|| f(input))).is_err() {
        let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("crash-{name}-{what}"));
        std::fs::write(&path, input).expect("saving the crash input");
        panic!(
            "fuzz target {name} panicked on {what} (saved to {}; add it to fuzz/corpus/{name}/): {}",
            path.display(),
            hex(input)
        );
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().take(4096).map(|x| format!("{x:02x}")).collect()
}

/// splitmix64: a fixed-seed generator, so that every run tries the same mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const INTERESTING: &[u8] = &[
    0, 1, 0x7f, 0x80, 0xff, b'0', b'7', b' ', b'/', b'.', b'\n', b'x',
];

/// One to eight stacked byte-level mutations of `input` (libFuzzer's basic set: flips,
/// interesting values, inserts, erases, copies, splices, 32-bit fields, truncation).
fn mutate(rng: &mut Rng, input: &[u8], corpus: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut d = input.to_vec();
    for _ in 0..1 + rng.below(8) {
        let len = d.len();
        match rng.below(9) {
            0 if len > 0 => {
                let i = rng.below(len);
                d[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                d[i] = INTERESTING[rng.below(INTERESTING.len())];
            }
            2 if len > 0 => {
                let i = rng.below(len);
                d[i] = rng.next() as u8;
            }
            3 => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let ins: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                d.splice(i..i, ins);
            }
            4 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(512));
                d.drain(i..i + n);
            }
            5 if len > 0 => {
                let (i, j) = (rng.below(len), rng.below(len));
                let n = 1 + rng.below((len - i.max(j)).min(512));
                let chunk = d[i..i + n].to_vec();
                d.splice(j..j, chunk);
            }
            6 => {
                let other = &corpus[rng.below(corpus.len())].1;
                if !other.is_empty() {
                    let i = rng.below(other.len());
                    let n = 1 + rng.below((other.len() - i).min(4096));
                    let at = rng.below(len + 1);
                    d.splice(at..at, other[i..i + n].iter().copied());
                }
            }
            7 if len >= 4 => {
                let i = rng.below(len - 3);
                let v: u32 = match rng.below(4) {
                    0 => 0,
                    1 => u32::MAX,
                    2 => len as u32,
                    _ => rng.next() as u32 & 0xffff,
                };
                d[i..i + 4].copy_from_slice(&v.to_le_bytes());
            }
            8 if len > 0 => d.truncate(rng.below(len)),
            _ => {}
        }
    }
    d
}

fn budget() -> Duration {
    let secs = std::env::var("FUZZ_SMOKE_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(3.0);
    Duration::from_secs_f64(secs)
}

/// Seeds, then mutations until the time budget is spent (at least 100).
fn smoke(name: &str) {
    let f = body(name);
    let corpus = corpus(name);
    for (file, data) in &corpus {
        run_one(name, f, data, file);
    }
    let mut rng = Rng(0x00fa_7f11 ^ name.len() as u64);
    let start = Instant::now();
    let mut n = 0u64;
    while n < 100 || start.elapsed() < budget() {
        let (_, base) = &corpus[rng.below(corpus.len())];
        let input = mutate(&mut rng, base, &corpus);
        run_one(name, f, &input, &format!("mutation-{n}"));
        n += 1;
    }
    eprintln!(
        "{name}: {} seeds, {n} mutations in {:.1} s",
        corpus.len(),
        start.elapsed().as_secs_f64()
    );
}

#[test]
fn index_tar() {
    smoke("index_tar");
}

#[test]
fn index_gzip() {
    smoke("index_gzip");
}

#[test]
fn index_decode() {
    smoke("index_decode");
}

#[test]
fn index_extract() {
    smoke("index_extract");
}

#[test]
fn unpack_plan() {
    smoke("unpack_plan");
}

#[test]
fn api_line() {
    smoke("api_line");
}

#[test]
fn text_parsers() {
    smoke("text_parsers");
}

#[test]
fn toc_estargz() {
    smoke("toc_estargz");
}

#[test]
fn toc_zstd() {
    smoke("toc_zstd");
}

#[test]
fn checkpoint_inflate() {
    smoke("checkpoint_inflate");
}

#[test]
fn every_target_is_tested() {
    let tested = [
        "checkpoint_inflate",
        "index_tar",
        "index_gzip",
        "index_decode",
        "index_extract",
        "unpack_plan",
        "api_line",
        "text_parsers",
        "toc_estargz",
        "toc_zstd",
    ];
    for (name, _) in TARGETS {
        assert!(
            tested.contains(name),
            "no smoke test for fuzz target {name}"
        );
        assert!(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("fuzz/fuzz_targets")
                .join(format!("{name}.rs"))
                .exists(),
            "no cargo-fuzz target for {name}"
        );
    }
}

/// A layer with a file over one chunk (too large for a seed corpus): chunk digests and reads
/// from checkpoints inside Huffman blocks, through every index target.
#[test]
fn chunked_layer() {
    let tar = fanfill::fuzzing::chunked_tar();
    fanfill::fuzzing::index_tar(&tar);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &tar).unwrap();
    let gz = gz.finish().unwrap();
    fanfill::fuzzing::index_gzip(&gz);
    let opts = fanfill::index::IndexOptions {
        span: 64 << 10,
        file_span: 4 << 10,
        ..Default::default()
    };
    let (index, pack) = fanfill::index::LayerIndex::build(&gz[..], &opts).unwrap();
    assert!(index.entries[0].chunk_sha256.len() == 2 && index.checkpoints.len() > 10);
    fanfill::fuzzing::index_decode(&index.encode());
    for params in [
        [0, 0, 255, 255, 0, 0, 0, 0],
        [0, 200, 255, 255, 3, 7, 255, 255],
    ] {
        fanfill::fuzzing::index_extract(&fanfill::fuzzing::extract_input(
            &index, &pack, params, &gz,
        ));
    }
}

/// Writes the seed corpora (`fanfill::fuzzing::seeds`) to `fuzz/corpus/<target>/seed-<hash>`:
/// `cargo test --test fuzz_smoke -- --ignored write_seed_corpus`.
#[test]
#[ignore = "writes fuzz/corpus; run by hand when the seeds change"]
fn write_seed_corpus() {
    use sha2::Digest;
    for (name, _) in TARGETS {
        let dir = corpus_dir(name);
        std::fs::create_dir_all(&dir).unwrap();
        for seed in fanfill::fuzzing::seeds(name) {
            let h = hex::encode(&sha2::Sha256::digest(&seed)[..8]);
            std::fs::write(dir.join(format!("seed-{h}")), &seed).unwrap();
        }
    }
    // zstd:chunked: the TOC JSON and the footer of the layer skopeo 1.9.3 wrote
    // (`tests/fixtures`; manifest position 39558:1091:3844).
    let blob = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/zstd-chunked-skopeo19.blob"),
    )
    .unwrap();
    let json = zstd::bulk::decompress(&blob[39558..39558 + 1091], 3844).unwrap();
    let dir = corpus_dir("toc_zstd");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("seed-skopeo19-toc"), json).unwrap();
    std::fs::write(dir.join("seed-skopeo19-footer"), &blob[blob.len() - 72..]).unwrap();
}

/// Runs target `name` on its committed corpus file `file` (a crash input of an earlier run).
fn regression(name: &str, file: &str) {
    let data = std::fs::read(corpus_dir(name).join(file)).expect("regression input");
    run_one(name, body(name), &data, file);
}

/// A gzip checkpoint inside a deflate block at the very end of the fetched span: the bit
/// splice started past the span's last bit and overflowed (found by this test's mutations).
#[test]
fn regression_copy_bits_past_span_end() {
    regression("index_extract", "crash-copy-bits-past-span-end");
}

/// The zstd:chunked seed is a TOC the target's parse accepts (so the fuzzer starts from
/// inputs that reach the TOC checks, not only from errors).
#[test]
fn toc_zstd_seed_parses() {
    use fanfill::toc::zstd_chunked::{TocPosition, parse};
    let json = std::fs::read(corpus_dir("toc_zstd").join("seed-skopeo19-toc")).unwrap();
    let compressed = zstd::bulk::compress(&json, 1).unwrap();
    let position = TocPosition {
        offset: 1 << 39,
        len: compressed.len() as u64,
        uncompressed_len: json.len() as u64,
        checksum: None,
    };
    let toc = parse("sha256:fuzz", 1 << 40, &position, &compressed).unwrap();
    assert!(toc.index.entries.len() > 3, "{}", toc.index.entries.len());
}
