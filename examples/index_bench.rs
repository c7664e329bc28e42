//! Layer index figures: indexing throughput, index size, random 64 KiB extraction latency.
//!
//! `cargo run --release --example index_bench -- [BLOB...]`; without arguments it builds
//! gzip and zstd layers of `/usr/share` with GNU tar (plus a multi-frame zstd one) first.
//! `FANFILL_BENCH_SPAN=<bytes>` sets the gzip checkpoint spacing.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use fanfill::index::{EntryKind, IndexOptions, LayerIndex, extract, plan};

fn make_layers(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for (name, flag) in [("usr-share.tar.gz", "-z"), ("usr-share.tar.zst", "--zstd")] {
        let path = dir.join(name);
        let status = Command::new("tar")
            .args(["-c", flag, "-f"])
            .arg(&path)
            .args(["-C", "/usr", "share"])
            .status()
            .expect("run tar");
        assert!(status.success());
        out.push(path);
    }
    // zstd in 4 MiB frames (what a seekable/chunked writer would produce).
    let tar = Command::new("tar")
        .args(["-c", "-f", "-", "-C", "/usr", "share"])
        .output()
        .expect("tar");
    let mut multi = Vec::new();
    for piece in tar.stdout.chunks(4 << 20) {
        multi.extend_from_slice(&zstd::encode_all(piece, 3).expect("zstd"));
    }
    let path = dir.join("usr-share.frames.tar.zst");
    std::fs::write(&path, multi).expect("write");
    out.push(path);
    out
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let tmp = std::env::temp_dir().join(format!("fanfill-bench-{}", std::process::id()));
    let blobs = if args.is_empty() {
        std::fs::create_dir_all(&tmp).expect("tmp dir");
        make_layers(&tmp)
    } else {
        args
    };
    // FANFILL_BENCH_SPAN=<bytes> overrides the gzip checkpoint spacing (default 4 MiB).
    let mut opts = IndexOptions::default();
    if let Some(span) = std::env::var("FANFILL_BENCH_SPAN")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        opts.span = span;
    }
    for path in blobs {
        let blob = std::fs::read(&path).expect("read blob");
        let t = Instant::now();
        let (idx, pack) = LayerIndex::build(&blob[..], &opts).expect("index");
        let secs = t.elapsed().as_secs_f64();
        let enc = idx.encode();
        let t = Instant::now();
        let dec = LayerIndex::decode(&enc).expect("decode");
        let decode_ms = t.elapsed().as_secs_f64() * 1e3;
        assert_eq!(dec, idx);
        let mb = |b: u64| b as f64 / 1e6;
        println!("{}", path.display());
        println!(
            "  {:?}: {:.1} MB compressed, {:.1} MB uncompressed, {} entries, {} checkpoints ({} at non-zero bit offsets)",
            idx.compression,
            mb(idx.compressed_size),
            mb(idx.uncompressed_size),
            idx.entries.len(),
            idx.checkpoints.len(),
            idx.checkpoints.iter().filter(|c| c.bit_offset != 0).count()
        );
        println!(
            "  index: {:.2} s, {:.0} MB/s compressed in, {:.0} MB/s uncompressed",
            secs,
            mb(idx.compressed_size) / secs,
            mb(idx.uncompressed_size) / secs
        );
        println!(
            "  stored index: {:.1} KB = {:.2}% of the blob (decode {:.1} ms), windows pack {:.1} KB",
            enc.len() as f64 / 1e3,
            enc.len() as f64 * 100.0 / blob.len() as f64,
            decode_ms,
            pack.len() as f64 / 1e3
        );
        // Random 64 KiB reads from files of at least 64 KiB (plan + extract; no fetch).
        let files: Vec<_> = idx
            .entries
            .iter()
            .filter(|e| e.kind == EntryKind::File && e.size >= 65_536)
            .collect();
        if files.is_empty() {
            continue;
        }
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let n = if idx.checkpoints.len() == 1 { 20 } else { 300 };
        let mut lat = Vec::with_capacity(n);
        let mut fetched = 0u64;
        for _ in 0..n {
            let e = files[(next() % files.len() as u64) as usize];
            let off = next() % (e.size - 65_536 + 1);
            let t = Instant::now();
            let span = plan(&idx, e, off, 65_536).expect("plan");
            let bytes =
                &blob[span.blob_offset as usize..(span.blob_offset + span.blob_len) as usize];
            let window = span
                .checkpoint
                .map(|c| pack.window(&idx, c).expect("window"))
                .unwrap_or_default();
            let got = extract(&idx, &span, &window, bytes).expect("extract");
            lat.push(t.elapsed());
            assert_eq!(got.len(), 65_536);
            fetched += span.blob_len;
        }
        lat.sort();
        let mean = lat.iter().sum::<Duration>() / n as u32;
        println!(
            "  random 64 KiB read ({n}): mean {:.2} ms, p50 {:.2} ms, p99 {:.2} ms, mean span fetched {:.2} MB",
            mean.as_secs_f64() * 1e3,
            pct(&lat, 0.5).as_secs_f64() * 1e3,
            pct(&lat, 0.99).as_secs_f64() * 1e3,
            fetched as f64 / n as f64 / 1e6
        );
    }
    let _ = std::fs::remove_dir_all(&tmp);
}
