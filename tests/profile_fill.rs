//! Filling an access profile ahead of the workload (`src/image/profile.rs`), against a real
//! `docker-registry` and the real kernel: the profile's files are read in few coalesced
//! range requests (a large file in chunk-aligned pieces), started before the placeholders
//! exist, and come out byte-exact; a damaged span costs only its own file, whose readers get
//! EIO, never zeros, while its neighbours in the same read fill from their own sources.

mod common;
mod fsutil;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use fanfill::api::RegistrySettings;
use fanfill::fill::{Engine, EngineConfig};
use fanfill::image::{
    self, AccessProfile, GAP_MAX, PrepareOptions, Prepared, ProfileRead, SPAN_MAX,
};
use fanfill::index::CHUNK_SIZE;
use fanfill::ocibuild::{self, Compression, LayerItem};
use fsutil::daemonproc::DaemonProc;
use fsutil::{pattern, within};

/// Text-like bytes (compressible, different per seed).
fn text(len: usize, seed: u64) -> Vec<u8> {
    let words = ["alpha ", "beta ", "gamma ", "delta\n", "epsilon ", "zeta "];
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(words[(x % 6) as usize].as_bytes());
    }
    out.truncate(len);
    out
}

fn options(dir: &Path, name: &str) -> PrepareOptions {
    let mut opts = PrepareOptions::new(dir.join(name));
    opts.registry.insecure = true;
    // Every fill goes to the registry: no kept copy of a streamed layer.
    opts.blob_cache = None;
    opts
}

/// Builds, pushes and indexes an image of `files` (one layer) with `profile` in its index
/// artifact; returns the reference and the layer's digest.
fn publish(
    registry: &common::TestRegistry,
    dir: &Path,
    repo: &str,
    files: &[(String, Vec<u8>)],
    profile: &[&str],
    rt: &tokio::runtime::Runtime,
) -> (String, String) {
    let mut layer = vec![LayerItem::Dir {
        path: "data".into(),
        mode: 0o755,
    }];
    for (p, d) in files {
        layer.push(LayerItem::File {
            path: p.clone(),
            mode: 0o644,
            data: d.clone(),
        });
    }
    let built = ocibuild::write_layout(&dir.join(repo), "v1", &[layer], Compression::Gzip)
        .expect("build the image");
    common::push_layout(&built.dir, "v1", &registry.host(), repo, &[]);
    let reference = format!("docker://{}/{repo}:v1", registry.host());
    let profile = AccessProfile {
        version: 1,
        files: profile.iter().map(|s| s.to_string()).collect(),
    };
    rt.block_on(image::index_image_with_profile(
        &reference,
        &options(dir, "publisher"),
        true,
        Some(&profile),
    ))
    .expect("push the index artifact with the profile");
    (reference, built.layers[0].0.clone())
}

fn wait_complete(engine: &Engine, prepared: &Prepared, n: usize, limit: Duration) -> usize {
    let deadline = Instant::now() + limit;
    let done = || {
        prepared
            .files
            .iter()
            .filter(|id| engine.is_complete(**id))
            .count()
    };
    while done() < n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    done()
}

/// 150 small files, a 20 MiB one and a 3 MiB one, all in the profile (in an order unlike
/// the layer's): they arrive in a handful of range requests, whole and exact, and reading
/// them afterwards raises no fill event.
#[test]
fn profile_is_filled_in_few_coalesced_reads() {
    common::init_tracing();
    let registry = common::TestRegistry::start();
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut files: Vec<(String, Vec<u8>)> = (0..150)
        .map(|i| (format!("data/s{i:03}"), text(2_000 + 97 * i, i as u64)))
        .collect();
    files.push(("data/big".into(), pattern(20 << 20, 7)));
    files.push(("data/mid".into(), text(3 << 20, 99)));
    // Profile order: the big file first, then the small ones from the end.
    let mut order: Vec<&str> = vec!["data/big"];
    order.extend(files[..150].iter().rev().map(|f| f.0.as_str()));
    order.push("data/mid");
    let (reference, _) = publish(&registry, dir.path(), "profile/many", &files, &order, &rt);

    let engine = Engine::start(EngineConfig::default()).expect("fanotify (6.14+, root)");
    let dest = dir.path().join("tree");
    std::fs::create_dir(&dest).unwrap();
    let prepared = rt
        .block_on(image::prepare(
            &engine,
            &reference,
            &dest,
            &options(dir.path(), "indexes"),
        ))
        .expect("prepare");
    assert_eq!(prepared.profile_files, files.len());

    // The plan: every file once (the big one in chunk-aligned pieces), spans within bounds,
    // the profile's first file in the first read.
    let profile = AccessProfile {
        version: 1,
        files: order.iter().map(|s| s.to_string()).collect(),
    };
    let keys = prepared.sources.profile_keys(&profile);
    assert_eq!(keys.len(), files.len());
    let reads = prepared.sources.plan_profile(&keys);
    let mut covered: std::collections::HashMap<(usize, usize), u64> = Default::default();
    for r in &reads {
        let ProfileRead::Span {
            start,
            end,
            files: held,
            ..
        } = r
        else {
            panic!("a gzip layer's file planned outside a span: {r:?}");
        };
        assert!(end - start <= SPAN_MAX, "span of {} bytes", end - start);
        for pair in held.windows(2) {
            let gap = pair[1].stream_offset - (pair[0].stream_offset + pair[0].len);
            assert!(gap <= GAP_MAX, "gap of {gap} bytes inside one read");
        }
        for f in held {
            assert_eq!(f.file_offset % CHUNK_SIZE, 0, "piece not chunk-aligned");
            for k in &f.keys {
                *covered.entry(*k).or_default() += f.len;
            }
        }
    }
    let sizes: std::collections::HashMap<(usize, usize), u64> = keys
        .iter()
        .map(|&(l, e)| ((l, e), prepared.sources.entry(l, e).unwrap().size))
        .collect();
    assert_eq!(covered, sizes, "every file's bytes planned exactly once");
    let first = match &reads[0] {
        ProfileRead::Span { files: held, .. } => held.iter().any(|f| f.keys.contains(&keys[0])),
        ProfileRead::Own(k) => *k == keys[0],
    };
    assert!(first, "the profile's first file is not in the first read");

    let requests_at_ready = prepared.store.stats().requests();
    let done = wait_complete(&engine, &prepared, files.len(), Duration::from_secs(60));
    assert_eq!(done, files.len(), "profile files complete");
    let requests = prepared.store.stats().requests();
    let events_before = engine.stats().events;
    for (p, want) in &files {
        let path = dest.join(p);
        let got = within(30, "read a filled file", move || std::fs::read(&path)).unwrap();
        assert!(got == *want, "{p}: wrong bytes");
    }
    assert_eq!(
        engine.stats().events,
        events_before,
        "reading the profile's files raised no fill event"
    );
    // Reads: the small files in one or two spans, the 20 MiB file in 3 pieces, the 3 MiB
    // one, each with at most one window; plus the metadata before it.
    assert!(
        requests <= 24,
        "{requests} registry requests in all for {} files",
        files.len()
    );
    eprintln!(
        "{} files ({} MiB) in {} reads; {} registry requests in all ({} by the time the \
         placeholders were ready)",
        files.len(),
        sizes.values().sum::<u64>() >> 20,
        reads.len(),
        requests,
        requests_at_ready
    );
    drop(prepared);
    engine.shutdown();
}

/// One damaged file inside a coalesced read: its neighbours in the same read are filled
/// (from their own sources) and exact; the damaged one stays unfilled, and its reader gets
/// EIO, never zeros.
#[test]
fn damaged_span_costs_only_its_own_file() {
    common::init_tracing();
    let registry = common::TestRegistry::start();
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let files: Vec<(String, Vec<u8>)> = vec![
        ("data/a".into(), text(60_000, 1)),
        ("data/b".into(), pattern(2 << 20, 2)),
        ("data/c".into(), text(60_000, 3)),
    ];
    let order = ["data/a", "data/b", "data/c"];
    let (reference, layer) = publish(&registry, dir.path(), "profile/bad", &files, &order, &rt);

    // Where b's bytes sit in the blob, from the published index (no profile fill here).
    let engine = Engine::start(EngineConfig::default()).expect("fanotify (6.14+, root)");
    let probe = dir.path().join("probe");
    std::fs::create_dir(&probe).unwrap();
    let mut opts = options(dir.path(), "probe-indexes");
    opts.profile_prefetch = 0;
    let prepared = rt
        .block_on(image::prepare(&engine, &reference, &probe, &opts))
        .expect("prepare the probe");
    let (_, index) = prepared.sources.layers().next().unwrap();
    let b = &index.entries[index.find("data/b").unwrap()];
    let span = fanfill::index::plan(index, b, (1 << 20) - 4096, 8192).unwrap();
    let damage_at = span.blob_offset + span.blob_len / 2;
    drop(prepared);

    let blob = registry.blob_data_path(&layer);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .read(true)
        .open(&blob)
        .unwrap();
    let mut byte = [0u8; 1];
    f.read_exact_at(&mut byte, damage_at).unwrap();
    byte[0] ^= 0x5a;
    f.write_all_at(&byte, damage_at).unwrap();
    drop(f);

    let dest = dir.path().join("tree");
    std::fs::create_dir(&dest).unwrap();
    let prepared = rt
        .block_on(image::prepare(
            &engine,
            &reference,
            &dest,
            &options(dir.path(), "indexes"),
        ))
        .expect("prepare");
    assert_eq!(prepared.profile_files, 3);
    let done = wait_complete(&engine, &prepared, 2, Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(done, 2, "a and c complete");
    let ids: Vec<_> = prepared.files.clone();
    let complete: Vec<bool> = ids.iter().map(|id| engine.is_complete(*id)).collect();
    assert_eq!(
        complete.iter().filter(|c| **c).count(),
        2,
        "exactly two files complete (b is damaged)"
    );
    for (p, want) in [&files[0], &files[2]] {
        let path = dest.join(p);
        let got = within(30, "read a neighbour", move || std::fs::read(&path)).unwrap();
        assert!(got == *want, "{p}: wrong bytes");
    }
    let path = dest.join("data/b");
    let res = within(60, "read the damaged file", move || {
        let f = File::open(&path)?;
        let mut buf = vec![0u8; 8192];
        f.read_exact_at(&mut buf, (1 << 20) - 4096).map(|()| buf)
    });
    match res {
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "b: {e}"),
        Ok(buf) => panic!(
            "b read succeeded over damaged bytes ({} zero bytes)",
            buf.iter().filter(|x| **x == 0).count()
        ),
    }
    eprintln!("damaged byte at blob offset {damage_at}: a and c exact, b gives EIO");
    drop(prepared);
    engine.shutdown();
}

/// The daemon starts the profile's reads before unpacking (`fanfill daemon`, no prefetch):
/// soon after `prepare` answers, exactly the profile's files are complete and exact.
#[test]
fn daemon_fills_the_profile_ahead_without_prefetch() {
    common::init_tracing();
    let registry = common::TestRegistry::start();
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let files: Vec<(String, Vec<u8>)> = (0..40)
        .map(|i| {
            (
                format!("data/f{i:02}"),
                text(30_000 + 1_000 * i, 50 + i as u64),
            )
        })
        .collect();
    // Every third file, last first.
    let order: Vec<&str> = files
        .iter()
        .step_by(3)
        .rev()
        .map(|f| f.0.as_str())
        .collect();
    let (reference, _) = publish(&registry, dir.path(), "profile/daemon", &files, &order, &rt);

    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    // The profile travels in the index artifact: trusted here by choice.
    let d = DaemonProc::start(&state, &["--index-policy", "referrer"]);
    let prepare = |dest: &Path| {
        d.prepare_with(
            &reference,
            dest,
            false,
            RegistrySettings {
                insecure: true,
                ..RegistrySettings::default()
            },
        )
    };
    // Every profile file of the tree at `root` reads back exact.
    let profile_bytes_exact = |root: &Path| {
        for (p, want) in files.iter().filter(|f| order.contains(&f.0.as_str())) {
            let path = root.join(p);
            let got = within(30, "read a profile file", move || std::fs::read(&path)).unwrap();
            assert!(got == *want, "{p}: wrong bytes under {}", root.display());
        }
    };
    let dest = dir.path().join("root");
    let status = prepare(&dest);
    assert_eq!(status.files, files.len() as u64);
    let t = Instant::now();
    let complete = || d.status().1[0].files_complete;
    while complete() < order.len() as u64 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "profile not filled: {} of {} files complete",
            complete(),
            order.len()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = t.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        complete(),
        order.len() as u64,
        "only the profile's files are filled (no prefetch)"
    );
    profile_bytes_exact(&dest);
    assert!(
        d.log_text()
            .contains("access profile's files handed to their placeholders"),
        "{}",
        d.log_text()
    );
    eprintln!(
        "daemon: {} profile files of {} complete {} ms after prepare returned",
        order.len(),
        files.len(),
        took.as_millis()
    );

    // A second tree of the same image: the profile's files are in the content cache now,
    // so they are filled from it and not read from the registry again.
    let t = Instant::now();
    while std::fs::read_dir(state.join("cache")).unwrap().count() < order.len() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "content cache not populated"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let dest2 = dir.path().join("root2");
    let s2 = prepare(&dest2);
    assert_eq!(s2.files_complete, order.len() as u64, "{s2:?}");
    std::thread::sleep(Duration::from_millis(300));
    let log = d.log_text();
    let second = log
        .lines()
        .filter(|l| l.contains("filling the access profile's files ahead"))
        .nth(1)
        .unwrap_or_else(|| panic!("no second profile fill in the log:\n{log}"));
    assert!(
        second.contains("files=0") && second.contains("reads=0"),
        "the second prepare read cached profile files again: {second}"
    );
    profile_bytes_exact(&dest2);
    eprintln!(
        "second tree: {} of {} files from the content cache, {} bytes fetched",
        s2.files_complete, s2.files, s2.bytes_fetched
    );
}

/// Without a profile, a whole-file read of a small file reads the files after it in the
/// same request and inflate (read-around, `ImageSources::read_around`): those wholly inside
/// the next `READ_AROUND` bytes of the stream come out complete and exact, reading them
/// raises no fill event and no registry request, and a file past that reach stays
/// unfilled.
#[test]
fn a_whole_file_read_fills_the_files_after_it() {
    use std::os::unix::fs::MetadataExt;
    common::init_tracing();
    let registry = common::TestRegistry::start();
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let files: Vec<(String, Vec<u8>)> = (0..80)
        .map(|i| {
            (
                format!("data/s{i:03}"),
                text(8_000 + 13 * i, 500 + i as u64),
            )
        })
        .collect();
    let (reference, _) = publish(&registry, dir.path(), "around/many", &files, &[], &rt);

    let engine = Engine::start(EngineConfig::default()).expect("fanotify (6.14+, root)");
    let dest = dir.path().join("tree");
    std::fs::create_dir(&dest).unwrap();
    let mut opts = options(dir.path(), "indexes");
    // Nothing in the background: only the read fills.
    opts.profile_prefetch = 0;
    let prepared = rt
        .block_on(image::prepare(&engine, &reference, &dest, &opts))
        .expect("prepare");
    let id_of = |p: &str| {
        let m = std::fs::metadata(dest.join(p)).unwrap();
        fanfill::fill::FileId::new(m.dev(), m.ino())
    };
    // Where each file sits in the layer's stream, from the index.
    let (_, index) = prepared.sources.layers().next().unwrap();
    let at = |p: &str| {
        let e = index.entries.iter().find(|e| *e.path == *p).unwrap();
        (e.data_offset, e.data_offset + e.size)
    };
    let (first_start, first_end) = at("data/s000");
    let reach = first_end + image::READ_AROUND;
    let (inside, outside): (Vec<_>, Vec<_>) = files[1..]
        .iter()
        .partition(|(p, _)| at(p).1 <= reach && at(p).0 >= first_start);
    assert!(
        inside.len() >= 10 && outside.len() >= 10,
        "{} inside",
        inside.len()
    );

    let requests = prepared.store.stats().requests();
    let path = dest.join("data/s000");
    let got = within(30, "read the first file", move || std::fs::read(&path)).unwrap();
    assert!(got == files[0].1, "data/s000: wrong bytes");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !inside.iter().all(|(p, _)| engine.is_complete(id_of(p))) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let filled = inside
        .iter()
        .filter(|(p, _)| engine.is_complete(id_of(p)))
        .count();
    assert_eq!(filled, inside.len(), "files inside the read-around filled");
    // One range request and at most one checkpoint window.
    let used = prepared.store.stats().requests() - requests;
    assert!(used <= 2, "{used} registry requests for one read");
    let events = engine.stats().events;
    for (p, want) in &inside {
        let path = dest.join(p);
        let got = within(30, "read a neighbour", move || std::fs::read(&path)).unwrap();
        assert!(got == *want, "{p}: wrong bytes");
    }
    assert_eq!(
        engine.stats().events,
        events,
        "neighbours read without a fill event"
    );
    assert_eq!(
        prepared.store.stats().requests() - requests,
        used,
        "neighbours read without a request"
    );
    assert!(
        outside.iter().all(|(p, _)| !engine.is_complete(id_of(p))),
        "a file past the read-around was filled"
    );
    // Those still fill on access, exact.
    let (p, want) = outside.last().unwrap();
    let path = dest.join(p);
    let got = within(30, "read a far file", move || std::fs::read(&path)).unwrap();
    assert!(got == *want, "{p}: wrong bytes");
    drop(prepared);
    engine.shutdown();
}
