//! eStargz images read lazily through their own TOC, on the real kernel and registry.
//!
//! Images are written on this machine by the project's eStargz writer
//! (`ocibuild::write_layout_estargz`), pushed to a local `docker-registry` with skopeo, and
//! compared with a plain `tar -xzf` of the same blobs (the eager reading any gzip client
//! does; eStargz readers hide `stargz.index.json` and the landmark files, so they are
//! removed from that reference). Figures are printed for the issue.

mod common;
mod fsutil;
#[path = "support/trees.rs"]
mod trees;

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fanfill::api::RegistrySettings;
use fanfill::fill::{Engine, EngineConfig};
use fanfill::image::{self, IndexOrigin, PrepareOptions};
use fanfill::index::{IndexOptions, LayerIndex};
use fanfill::ocibuild::{self, BuiltImage, LayerItem};
use fanfill::toc::estargz::{self, WriteOptions};
use fanfill::unpack::Mode;
use fsutil::daemonproc::DaemonProc;
use fsutil::{LoopFs, OverlayMount, within};
use trees::{compare, compare_all, mib, pct, prepare_within, read_sample, tar_extract, walk};

const HIDDEN: [&str; 3] = [
    estargz::TOC_TAR_NAME,
    estargz::PREFETCH_LANDMARK,
    estargz::NO_PREFETCH_LANDMARK,
];

/// An eStargz image: `n` small files in `app/dNN/`, two multi-chunk files (> 4 MiB) when
/// `big`, symlinks, a hardlink, a file with an xattr, the 20 last small files named before
/// the prefetch landmark; a second layer that whites one file out and replaces another.
struct Fixture {
    layout: PathBuf,
    built: BuiltImage,
    blobs: Vec<PathBuf>,
    prefetch: Vec<String>,
    reference_dir: PathBuf,
}

fn fixture(dir: &Path, n: usize, big: bool) -> Fixture {
    let mut base = vec![LayerItem::Dir {
        path: "app".into(),
        mode: 0o755,
    }];
    let dirs = n.div_ceil(100);
    let mut names = Vec::new();
    for d in 0..dirs {
        base.push(LayerItem::Dir {
            path: format!("app/d{d:02}"),
            mode: 0o755,
        });
        for f in 0..100.min(n - d * 100) {
            let i = d * 100 + f;
            let path = format!("app/d{d:02}/f{f:03}");
            base.push(LayerItem::File {
                path: path.clone(),
                mode: 0o644,
                data: common::noise(200 + (i * 37) % 6000, i as u64),
            });
            names.push(path);
        }
    }
    if big {
        base.push(LayerItem::Dir {
            path: "blob".into(),
            mode: 0o755,
        });
        for (name, len) in [("big9", (9 << 20) + 5), ("big5", (5 << 20) + 1)] {
            base.push(LayerItem::File {
                path: format!("blob/{name}"),
                mode: 0o755,
                data: common::noise(len, len as u64),
            });
        }
    }
    base.extend([
        LayerItem::Symlink {
            path: "app/link".into(),
            target: "d00/f000".into(),
        },
        LayerItem::Symlink {
            path: "app/abs".into(),
            target: "/app/d00/f001".into(),
        },
        LayerItem::Hardlink {
            path: "app/hard".into(),
            target: "app/d00/f002".into(),
        },
        LayerItem::FileXattrs {
            path: "app/xattr".into(),
            mode: 0o600,
            data: b"with an attribute".to_vec(),
            xattrs: vec![("user.fanfill".into(), b"estargz".to_vec())],
        },
    ]);
    let top = vec![
        LayerItem::Whiteout {
            path: "app/d00/f005".into(),
        },
        LayerItem::File {
            path: "app/d00/f006".into(),
            mode: 0o644,
            data: b"replaced in the upper layer".to_vec(),
        },
        LayerItem::Dir {
            path: "etc".into(),
            mode: 0o755,
        },
        LayerItem::File {
            path: "etc/conf".into(),
            mode: 0o644,
            data: common::noise(5000, 99),
        },
    ];
    // The last 20 small files in tar order: prefetched first only if the landmark is honoured.
    let prefetch: Vec<String> = names[names.len() - 20..].to_vec();
    let layout = dir.join("layout");
    let opts = [
        WriteOptions {
            prefetch: prefetch.clone(),
            ..WriteOptions::default()
        },
        WriteOptions::default(),
    ];
    let built =
        ocibuild::write_layout_estargz(&layout, "v1", &[base, top], &opts).expect("build image");
    let blobs: Vec<PathBuf> = built
        .layers
        .iter()
        .map(|(d, _, _)| layout.join("blobs/sha256").join(&d[7..]))
        .collect();
    let reference_dir = dir.join("reference");
    tar_extract(&blobs, &reference_dir);
    for name in HIDDEN {
        let _ = std::fs::remove_file(reference_dir.join(name));
    }
    Fixture {
        layout,
        built,
        blobs,
        prefetch,
        reference_dir,
    }
}

/// Bytes from each blob's TOC offset to its end (TOC member + footer): what a reader of the
/// TOC must fetch, at most.
fn toc_tails(blobs: &[PathBuf]) -> u64 {
    blobs
        .iter()
        .map(|b| {
            let data = std::fs::read(b).unwrap();
            let (off, _) = estargz::parse_footer(&data).expect("eStargz footer");
            data.len() as u64 - off
        })
        .sum()
}

/// `(blob offset, end)` of chunk `k` of `path` in an eStargz blob, from its TOC.
fn member_of(blob: &[u8], path: &str, k: usize) -> (u64, u64) {
    let (off, flen) = estargz::parse_footer(blob).unwrap();
    let member = &blob[off as usize..blob.len() - flen as usize];
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(member));
    let mut json = Vec::new();
    ar.entries()
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .read_to_end(&mut json)
        .unwrap();
    let toc: serde_json::Value = serde_json::from_slice(&json).unwrap();
    let mut offs: Vec<u64> = toc["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["offset"].as_u64())
        .collect();
    offs.push(off);
    offs.sort_unstable();
    offs.dedup();
    let start = toc["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["name"] == path && (e["type"] == "reg" || e["type"] == "chunk"))
        .nth(k)
        .and_then(|e| e["offset"].as_u64())
        .unwrap();
    let end = offs[offs.partition_point(|&o| o <= start)];
    (start, end)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn estargz_image_direct_mode_meets_the_issue_figures() {
    common::init_tracing();
    let reg = common::TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    let fx = fixture(tmp.path(), 2100, true);
    let compressed = fx.built.compressed_size();
    let tree = walk(&fx.reference_dir);
    let files: Vec<&String> = tree
        .iter()
        .filter(|(_, (_, t))| t.is_file())
        .map(|(k, _)| k)
        .collect();
    eprintln!(
        "image: {} eStargz layers, {:.1} MiB compressed, {} files, {} paths",
        fx.built.layers.len(),
        mib(compressed),
        files.len(),
        tree.len()
    );
    assert!(files.len() >= 2000, "{} files", files.len());

    // A plain gzip client reads the blobs eagerly (tar did, above); so does the project's
    // own streaming indexer, which sees the TOC as an ordinary tar member.
    for b in &fx.blobs {
        let (ix, _) = LayerIndex::build(std::fs::File::open(b).unwrap(), &IndexOptions::default())
            .expect("eStargz blob is gzip tar");
        assert!(ix.find(estargz::TOC_TAR_NAME).is_some());
    }

    common::push_layout(&fx.layout, "v1", &reg.host(), "toc/estargz", &[]);
    let reference = format!("docker://{}/toc/estargz:v1", reg.host());
    let mut opts = PrepareOptions::new(tmp.path().join("indexes"));
    opts.registry.insecure = true;
    let engine =
        Engine::start(EngineConfig::default()).expect("fanotify pre-content group (6.14+, root)");
    let dest = tmp.path().join("root");
    std::fs::create_dir(&dest).unwrap();
    let rt = rt();
    let t = Instant::now();
    let prepared = prepare_within(&rt, &engine, &reference, &dest, &opts).expect("prepare");
    assert!(
        prepared
            .index_origins
            .iter()
            .all(|o| *o == IndexOrigin::Toc),
        "{:?}",
        prepared.index_origins
    );
    // Prefetch (`pull --prefetch`, Engine::fill_files) takes the landmark files first.
    let first: std::collections::BTreeSet<u64> = prepared.prefetch_order[..fx.prefetch.len()]
        .iter()
        .map(|id| id.ino())
        .collect();
    let want: std::collections::BTreeSet<u64> = fx
        .prefetch
        .iter()
        .map(|p| std::fs::symlink_metadata(dest.join(p)).unwrap().ino())
        .collect();
    assert_eq!(first, want);
    assert_eq!(prepared.prefetch_order.len(), prepared.files.len());
    // (1) Only the TOCs (and manifest + config) travelled.
    let before = prepared.bytes_before_ready;
    let tails = toc_tails(&fx.blobs);
    eprintln!(
        "(1) placeholders ready in {} ms after {before} bytes = {:.3}% of the compressed image (footers + TOC members: {tails} bytes)",
        t.elapsed().as_millis(),
        pct(before, compressed)
    );
    assert!(before >= tails, "{before} < {tails}");
    assert!(
        before <= tails + 16 * 1024,
        "{before} > {tails} + manifest and config"
    );

    // (2) A seeded random 5% of the files.
    let limit = Duration::from_secs(60);
    let read = read_sample(&files, &tree, &dest, limit, || {
        prepared.store.bytes_fetched()
    });
    eprintln!("{}", read.report(files.len(), compressed));
    assert!(pct(read.fetched, compressed) < 20.0);

    // (4, before the full pass) A corrupted chunk in the registry: EIO, never other bytes.
    let layer0 = &fx.built.layers[0].0;
    let data_path = reg.blob_data_path(layer0);
    let mut stored = std::fs::read(&data_path).unwrap();
    let (lo, hi) = member_of(&stored, "blob/big5", 1);
    let at = ((lo + hi) / 2) as usize;
    stored[at] ^= 0x5a;
    std::fs::write(&data_path, &stored).unwrap();
    let victim = dest.join("blob/big5");
    let err = within(60, "read corrupted chunk", move || {
        let f = std::fs::File::open(&victim).unwrap();
        let mut buf = vec![0u8; 4096];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, (4 << 20) + 100)
    })
    .expect_err("a corrupted chunk must not read");
    eprintln!("(4) corrupted chunk at blob offset {at} (member {lo}..{hi}): read gave {err}");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    stored[at] ^= 0x5a;
    std::fs::write(&data_path, &stored).unwrap();

    // (3) Every path: same kind, link target and content as the eager extraction.
    compare_all(
        &tree,
        files.len(),
        &dest,
        limit,
        || prepared.store.bytes_fetched(),
        compressed,
    );
    // Metadata the TOC carries: xattrs, hardlinks, modes.
    assert_eq!(
        xattr::get(dest.join("app/xattr"), "user.fanfill").unwrap(),
        Some(b"estargz".to_vec())
    );
    let (a, b) = (
        std::fs::metadata(dest.join("app/hard")).unwrap(),
        std::fs::metadata(dest.join("app/d00/f002")).unwrap(),
    );
    assert_eq!(a.ino(), b.ino());
    assert_eq!(
        std::fs::metadata(dest.join("blob/big9")).unwrap().mode() & 0o7777,
        0o755
    );
    assert!(!dest.join("app/d00/f005").exists());
    drop(prepared);
    engine.shutdown();
    drop(rt);
}

/// Rewrites the manifest of `tag` in `layout` under `new_tag` with `edit` applied to each
/// layer descriptor.
fn retag(layout: &Path, tag: &str, new_tag: &str, edit: impl Fn(&mut serde_json::Value)) {
    let index_path = layout.join("index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    let list = index["manifests"].as_array_mut().unwrap();
    let desc = list
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap()
        .clone();
    let digest = desc["digest"].as_str().unwrap();
    let mut manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(layout.join("blobs/sha256").join(&digest[7..])).unwrap(),
    )
    .unwrap();
    for l in manifest["layers"].as_array_mut().unwrap() {
        edit(l);
    }
    let bytes = serde_json::to_vec(&manifest).unwrap();
    let new_digest = common::write_blob(layout, &bytes);
    let mut d = desc;
    d["digest"] = new_digest.into();
    d["size"] = bytes.len().into();
    d["annotations"]["org.opencontainers.image.ref.name"] = new_tag.into();
    list.push(d);
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
}

#[test]
fn toc_digest_mismatch_streams_the_layer_and_unannotated_layers_are_found_by_their_footer() {
    common::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let fx = fixture(tmp.path(), 150, false);
    retag(&fx.layout, "v1", "bad", |l| {
        l["annotations"][estargz::TOC_DIGEST_ANNOTATION] =
            format!("sha256:{}", "ab".repeat(32)).into();
    });
    retag(&fx.layout, "v1", "plain", |l| {
        l.as_object_mut().unwrap().remove("annotations");
    });
    let engine = Engine::start(EngineConfig::default()).unwrap();
    let rt = rt();
    let opts = PrepareOptions::new(tmp.path().join("indexes"));
    let at = |tag: &str| format!("oci:{}:{tag}", fx.layout.display());

    // A TOC that is not the one the annotation names: the layer is streamed once instead
    // and served from the blob cache; every file reads right (the stream shows the TOC entry
    // and landmarks, as any tar reader does).
    let dest = tmp.path().join("bad");
    std::fs::create_dir(&dest).unwrap();
    // (Its own index dir: the index built by that stream would serve later pulls.)
    let bad_opts = PrepareOptions::new(tmp.path().join("bad-indexes"));
    let prepared = rt
        .block_on(image::prepare(&engine, &at("bad"), &dest, &bad_opts))
        .expect("a layer whose TOC is not the annotation's still pulls");
    assert!(
        prepared
            .index_origins
            .iter()
            .all(|o| *o == IndexOrigin::Built),
        "{:?}",
        prepared.index_origins
    );
    let mut mismatches = compare(&walk(&fx.reference_dir), &dest, Duration::from_secs(60));
    mismatches.retain(|m| !HIDDEN.iter().any(|h| m.starts_with(&format!("{h}:"))));
    assert!(mismatches.is_empty(), "{mismatches:#?}");
    eprintln!(
        "TOC digest mismatch: streamed once ({} bytes before ready), every file right",
        prepared.bytes_before_ready
    );
    drop(prepared);

    let dest = tmp.path().join("plain");
    std::fs::create_dir(&dest).unwrap();
    let prepared = rt
        .block_on(image::prepare(&engine, &at("plain"), &dest, &opts))
        .expect("unannotated eStargz");
    assert_eq!(prepared.index_origins, [IndexOrigin::Toc, IndexOrigin::Toc]);
    let tails = toc_tails(&fx.blobs);
    eprintln!(
        "unannotated: ready after {} bytes (footer probe + TOC; TOC tails {tails})",
        prepared.bytes_before_ready
    );
    assert!(prepared.bytes_before_ready <= tails + 2 * 51 + 16 * 1024);
    // `pull --prefetch` completes a TOC image by ranges (nothing is streamed by tar offset).
    let streamed = prepared.prefetch(&engine, 2).expect("prefetch");
    assert_eq!(streamed.files, 0);
    assert!(prepared.files.iter().all(|id| engine.is_complete(*id)));
    let mismatches = compare(&walk(&fx.reference_dir), &dest, Duration::from_secs(60));
    assert!(mismatches.is_empty(), "{mismatches:#?}");
    drop(prepared);
    engine.shutdown();

    // `fanfill index --push` on a TOC image: nothing to build, nothing to push.
    let (indexes, artifact) = rt
        .block_on(image::index_image(&at("v1"), &opts, true))
        .expect("index a TOC image");
    assert!(indexes.layers.iter().all(|l| l.2 == IndexOrigin::Toc));
    assert!(indexes.tocs.iter().all(Option::is_some));
    assert!(artifact.is_none());
    assert!(!opts.index_dir.exists() || std::fs::read_dir(&opts.index_dir).unwrap().count() == 0);
    // The CLI says so.
    let out = fsutil::daemonproc::bin()
        .args(["index", &at("v1"), "--index-dir"])
        .arg(tmp.path().join("cli-indexes"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("fanfill index:\n{text}");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text.matches("no index needed").count(), 2, "{text}");
}

#[test]
fn estargz_overlay_mode_fills_whole_files_on_open() {
    common::init_tracing();
    let fs = LoopFs::new("ext4", 256);
    let fx = fixture(&fs.mnt, 150, true);
    let engine = Engine::start(EngineConfig::default()).unwrap();
    let layers = fs.mnt.join("layers");
    std::fs::create_dir(&layers).unwrap();
    let mut opts = PrepareOptions::new(fs.mnt.join("indexes"));
    opts.mode = Mode::Overlay;
    let rt = rt();
    let prepared = rt
        .block_on(image::prepare(
            &engine,
            &fx.built.reference(),
            &layers,
            &opts,
        ))
        .unwrap();
    assert_eq!(prepared.unpacked.lowerdirs.len(), 2);
    let ovl = OverlayMount::new(&prepared.unpacked.lowerdir_option(), &fs.mnt.join("ovl"));
    let lower_dev = std::fs::metadata(&fs.mnt).unwrap().dev();
    let watch =
        fanfill::overlay::OverlayWatcher::start_on(&engine, &ovl.merged, lower_dev).unwrap();
    let mismatches = compare(
        &walk(&fx.reference_dir),
        &ovl.merged,
        Duration::from_secs(60),
    );
    eprintln!(
        "overlay: {} opens held, {} mismatches, {} bytes fetched of {} compressed",
        watch.opens(),
        mismatches.len(),
        prepared.store.bytes_fetched(),
        fx.built.compressed_size()
    );
    assert!(mismatches.is_empty(), "{mismatches:#?}");
    assert!(watch.opens() > 100);
    drop(watch);
    drop(ovl);
    drop(prepared);
    engine.shutdown();
}

#[test]
fn daemon_serves_estargz_and_prefetches_landmark_files_first() {
    common::init_tracing();
    let reg = common::TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    let fx = fixture(tmp.path(), 300, false);
    common::push_layout(&fx.layout, "v1", &reg.host(), "toc/daemon", &[]);
    let state = tmp.path().join("state");
    std::fs::create_dir(&state).unwrap();
    // Slow fetches, two prefetch workers: the order prefetch takes shows in what is filled.
    let d = DaemonProc::start(
        &state,
        &["--test-fetch-delay-ms", "40", "--prefetch-parallel", "2"],
    );
    let dest = tmp.path().join("root");
    let status = d.prepare_with(
        &format!("docker://{}/toc/daemon:v1", reg.host()),
        &dest,
        true,
        RegistrySettings {
            insecure: true,
            ..RegistrySettings::default()
        },
    );
    // A placeholder has no blocks until it is filled; stat raises no fanotify event.
    let filled = |rel: &str| {
        std::fs::metadata(dest.join(rel))
            .map(|m| m.blocks() > 0)
            .unwrap_or(false)
    };
    let tree = walk(&fx.reference_dir);
    let others: Vec<&String> = tree
        .iter()
        .filter(|(k, (_, t))| t.is_file() && k.starts_with("app/d") && !fx.prefetch.contains(k))
        .map(|(k, _)| k)
        .collect();
    let t = Instant::now();
    while !fx.prefetch.iter().all(|p| filled(p)) {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "landmark files not prefetched within 60 s"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let early = others.iter().filter(|r| filled(r)).count();
    eprintln!(
        "daemon prefetch: the {} landmark files (last in tar order) complete after {} ms, {early} of the {} other files by then",
        fx.prefetch.len(),
        t.elapsed().as_millis(),
        others.len()
    );
    assert!(
        early <= 4,
        "{early} other files were prefetched before the landmark files"
    );
    let t = Instant::now();
    loop {
        let (_, images) = d.status();
        let s = images.iter().find(|i| i.id == status.id).unwrap();
        if s.files_complete == s.files {
            eprintln!(
                "daemon prefetch complete in {} ms more: {} files, {} bytes fetched",
                t.elapsed().as_millis(),
                s.files,
                s.bytes_fetched
            );
            assert_eq!(s.errors, 0);
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "prefetch stalled: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mismatches = compare(&tree, &dest, Duration::from_secs(60));
    assert!(mismatches.is_empty(), "{mismatches:#?}");
}
