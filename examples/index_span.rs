//! The gzip checkpoint trade-off behind `IndexOptions::span` and `IndexOptions::file_span`:
//! index metadata size (what moves before placeholders exist), windows pack size, and the
//! bytes a random 5% of the files costs to read, on a 3-layer image of host files
//! (`tests/support/host_image.rs`). Reads are simulated exactly as the fill engine issues
//! them (whole small files, 1 MiB chunks of large ones; each window fetched once).
//!
//! `cargo run --example index_span [SCALE]` prints a markdown table.

#[path = "../tests/support/host_image.rs"]
mod host_image;

use std::collections::HashSet;
use std::time::Instant;

use fanfill::index::{CHUNK_SIZE, EntryKind, IndexOptions, LayerIndex, WindowPack, plan};
use fanfill::ocibuild::{Compression, write_layout};

fn main() {
    let scale: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let tmp = tempfile::tempdir().expect("tempdir");
    let t = Instant::now();
    let built = write_layout(
        tmp.path(),
        "span",
        &host_image::layers(scale),
        Compression::Gzip,
    )
    .expect("layout");
    let blobs: Vec<Vec<u8>> = built
        .layers
        .iter()
        .map(|(d, _, _)| {
            std::fs::read(tmp.path().join("blobs/sha256").join(&d[7..])).expect("blob")
        })
        .collect();
    let total: u64 = built.compressed_size();
    let raw: u64 = built.layers.iter().map(|l| l.2).sum();
    println!(
        "image: 3 gzip layers, {:.1} MiB compressed, {:.1} MiB uncompressed (built in {:.1} s)\n",
        total as f64 / 1048576.0,
        raw as f64 / 1048576.0,
        t.elapsed().as_secs_f64()
    );
    println!(
        "| span | file_span | checkpoints | metadata | windows pack | read 5% of files: fetched | per small file (<64 KiB) | index time |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let kib = |b: u64| b as f64 / 1024.0;
    for (span, file_span) in [
        (4u64 << 20, 0u64),
        (1 << 20, 0),
        (512 << 10, 0),
        (256 << 10, 0),
        (4 << 20, 64 << 10),
        (1 << 20, 4 << 10),
        (1 << 20, 8 << 10),
        (1 << 20, 16 << 10),
        (1 << 20, 32 << 10),
        (1 << 20, 64 << 10),
        (1 << 20, 128 << 10),
        (1 << 20, 256 << 10),
        (256 << 10, 64 << 10),
    ] {
        let opts = IndexOptions {
            span,
            file_span,
            ..IndexOptions::default()
        };
        let t = Instant::now();
        let idx: Vec<(LayerIndex, WindowPack)> = blobs
            .iter()
            .map(|b| LayerIndex::build(&b[..], &opts).expect("index"))
            .collect();
        let secs = t.elapsed().as_secs_f64();
        let meta: u64 = idx.iter().map(|(i, _)| i.encode().len() as u64).sum();
        let pack: u64 = idx.iter().map(|(i, _)| i.windows_size).sum();
        let cps: usize = idx.iter().map(|(i, _)| i.checkpoints.len()).sum();
        // The same seeded 5% of the files for every configuration.
        let files: Vec<(usize, usize)> = idx
            .iter()
            .enumerate()
            .flat_map(|(l, (i, _))| {
                i.entries
                    .iter()
                    .enumerate()
                    .filter(|(_, e)| e.kind == EntryKind::File)
                    .map(move |(n, _)| (l, n))
            })
            .collect();
        let mut seed = 0x5eed_u64;
        let mut sample = HashSet::new();
        while sample.len() < files.len() / 20 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            sample.insert(files[(seed % files.len() as u64) as usize]);
        }
        let mut fetched = meta;
        let (mut win_bytes, mut intrinsic, mut skip_bytes) = (0u64, 0f64, 0u64);
        let mut windows = HashSet::new();
        let (mut small_bytes, mut small_n) = (0u64, 0u64);
        for &(l, n) in &sample {
            let (ix, _) = &idx[l];
            let e = &ix.entries[n];
            let mut cost = 0;
            let step = if e.size > CHUNK_SIZE {
                CHUNK_SIZE
            } else {
                e.size.max(1)
            };
            let mut off = 0;
            while off < e.size {
                let s = plan(ix, e, off, step).expect("plan");
                cost += s.blob_len;
                skip_bytes += s.skip(ix);
                if let Some(c) = s.checkpoint {
                    if let Some(w) = ix.checkpoints[c].window {
                        if windows.insert((l, c)) {
                            cost += u64::from(w.pack_len);
                            win_bytes += u64::from(w.pack_len);
                        }
                    }
                }
                off += step;
            }
            fetched += cost;
            intrinsic += e.size as f64 * ix.compressed_size as f64 / ix.uncompressed_size as f64;
            if e.size < 64 << 10 {
                small_bytes += cost;
                small_n += 1;
            }
        }
        println!(
            "| {} KiB | {} | {} | {:.0} KiB ({:.2}%) | {:.0} KiB | {:.1} MiB ({:.1}%) | {:.0} KiB | {:.1} s |",
            span >> 10,
            if file_span == 0 {
                "off".to_string()
            } else {
                format!("{} KiB", file_span >> 10)
            },
            cps,
            kib(meta),
            meta as f64 * 100.0 / total as f64,
            kib(pack),
            fetched as f64 / 1048576.0,
            fetched as f64 * 100.0 / total as f64,
            kib(small_bytes / small_n.max(1)),
            secs
        );
        if std::env::var_os("SPAN_DEBUG").is_some() {
            eprintln!(
                "  sample {} files, intrinsic {:.1} MiB, windows {} = {:.1} MiB, skipped uncompressed {:.1} MiB",
                sample.len(),
                intrinsic / 1048576.0,
                windows.len(),
                win_bytes as f64 / 1048576.0,
                skip_bytes as f64 / 1048576.0
            );
        }
    }
}
