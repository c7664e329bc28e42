//! Overlay rootfs on the real kernel: placeholder layer trees as overlay lowerdirs, whole
//! files filled when opened through the overlay (exec via the dynamic loader, mmap, read,
//! copy-up). Everything lives on a loop-mounted ext4 the test makes.

mod fsutil;

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::process::Command;

use fanfill::fill::{Engine, EngineConfig};
use fanfill::image::{self, PrepareOptions};
use fanfill::ocibuild::{self, Compression, LayerItem};
use fanfill::overlay::OverlayWatcher;
use fanfill::unpack::Mode;
use fsutil::{LoopFs, OverlayMount, pattern, sha256_hex, within};

fn host(path: &str, host: &str) -> LayerItem {
    LayerItem::HostFile {
        path: path.into(),
        host: std::fs::canonicalize(host).unwrap(),
    }
}

fn dir(path: &str) -> LayerItem {
    LayerItem::dir(path)
}

#[test]
fn overlay_rootfs_fills_whole_files_on_open() {
    let fs = LoopFs::new("ext4", 512);
    let layout = fs.mnt.join("layout");
    let data_a = pattern(3 << 20, 21);
    let data_b = pattern(700_000, 22);
    let data_c = pattern(5 << 20, 23);
    let base = vec![
        dir("lib64"),
        dir("lib"),
        dir("lib/x86_64-linux-gnu"),
        dir("usr"),
        dir("usr/bin"),
        host("lib64/ld-linux-x86-64.so.2", "/lib64/ld-linux-x86-64.so.2"),
        host(
            "lib/x86_64-linux-gnu/libc.so.6",
            "/lib/x86_64-linux-gnu/libc.so.6",
        ),
        host("usr/bin/sha256sum", "/usr/bin/sha256sum"),
    ];
    let data = vec![
        dir("data"),
        LayerItem::File {
            path: "data/a".into(),
            mode: 0o644,
            data: data_a.clone(),
        },
        LayerItem::File {
            path: "data/b".into(),
            mode: 0o644,
            data: data_b.clone(),
        },
        LayerItem::File {
            path: "data/c".into(),
            mode: 0o644,
            data: data_c.clone(),
        },
        LayerItem::File {
            path: "data/gone".into(),
            mode: 0o644,
            data: b"deleted above".to_vec(),
        },
    ];
    let top = vec![LayerItem::Whiteout {
        path: "data/gone".into(),
    }];
    let built =
        ocibuild::write_layout(&layout, "t", &[base, data, top], Compression::Gzip).unwrap();

    let engine = Engine::start(EngineConfig::default()).unwrap();
    let layers = fs.mnt.join("layers");
    std::fs::create_dir(&layers).unwrap();
    let mut opts = PrepareOptions::new(fs.mnt.join("indexes"));
    opts.mode = Mode::Overlay;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let prepared = rt
        .block_on(image::prepare(&engine, &built.reference(), &layers, &opts))
        .unwrap();
    assert_eq!(prepared.unpacked.lowerdirs.len(), 3);

    let ovl = OverlayMount::new(&prepared.unpacked.lowerdir_option(), &fs.mnt.join("ovl"));
    let (merged, upper) = (ovl.merged.clone(), ovl.upper.clone());
    let lower_dev = std::fs::metadata(&fs.mnt).unwrap().dev();
    let watch = OverlayWatcher::start_on(&engine, &merged, lower_dev).unwrap();

    // exec through overlay: the dynamic loader and libc come from placeholder lowers.
    let m = merged.clone();
    let out = within(60, "chroot exec", move || {
        Command::new("chroot")
            .arg(&m)
            .args(["/usr/bin/sha256sum", "/data/a", "/data/b"])
            .output()
            .unwrap()
    });
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("{}  /data/a", sha256_hex(&data_a))),
        "{text}"
    );
    assert!(
        text.contains(&format!("{}  /data/b", sha256_hex(&data_b))),
        "{text}"
    );

    // mmap through overlay, from another process.
    let script = "import mmap,hashlib,sys\nf=open(sys.argv[1],'rb')\nm=mmap.mmap(f.fileno(),0,prot=mmap.PROT_READ)\nprint(hashlib.sha256(m[:]).hexdigest())";
    let c = merged.join("data/c");
    let out = within(60, "mmap via overlay", move || {
        Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(&c)
            .output()
            .unwrap()
    });
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        sha256_hex(&data_c)
    );

    // Copy-up by an append: the upper copy holds the whole original plus the new bytes.
    let (b, expect_b) = (merged.join("data/b"), data_b.clone());
    let got = within(60, "copy-up", move || {
        let mut f = std::fs::OpenOptions::new().append(true).open(&b).unwrap();
        f.write_all(b"APPENDED").unwrap();
        drop(f);
        std::fs::read(&b).unwrap()
    });
    let mut want = expect_b;
    want.extend_from_slice(b"APPENDED");
    assert!(got == want, "copy-up lost original bytes");
    assert!(
        upper.join("data/b").exists(),
        "the write went to the upper dir"
    );

    // Whiteouts hide lower files.
    assert!(!merged.join("data/gone").exists());
    assert!(watch.opens() >= 4, "opens held: {}", watch.opens());
    let s = engine.stats();
    eprintln!(
        "overlay: {} opens held, {} of {} files complete, {} bytes fetched of {} compressed",
        watch.opens(),
        s.files_complete,
        s.files,
        prepared.store.bytes_fetched(),
        built.compressed_size()
    );
    drop(watch);
}

/// `reference` prepared in overlay mode under `fs` (the start set on or off), and a way from
/// a path in its (single) layer to the engine's id of that placeholder.
fn prepare_overlay(
    fs: &LoopFs,
    engine: &Engine,
    rt: &tokio::runtime::Runtime,
    reference: &str,
    start_set: bool,
) -> (
    image::Prepared,
    impl Fn(&str) -> fanfill::fill::FileId + use<>,
) {
    let layers = fs.mnt.join(format!("layers-{start_set}"));
    std::fs::create_dir(&layers).unwrap();
    let mut opts = PrepareOptions::new(fs.mnt.join(format!("indexes-{start_set}")));
    opts.mode = Mode::Overlay;
    opts.start_set = start_set;
    let prepared = rt
        .block_on(image::prepare(engine, reference, &layers, &opts))
        .unwrap();
    let lower = std::path::PathBuf::from(&prepared.unpacked.lowerdirs[0]);
    let id = move |p: &str| {
        let m = std::fs::symlink_metadata(lower.join(p)).unwrap();
        fanfill::fill::FileId::new(m.dev(), m.ino())
    };
    (prepared, id)
}

/// Loader-aware read-ahead (`fanfill::loader`): opening a dynamic executable through a
/// watched overlay fills its interpreter and every library it needs, found the way the
/// loader finds them (absolute and relative symlinks of the image resolved inside it),
/// before anything opens them; files no ELF names stay unfilled.
#[test]
fn opening_an_executable_fills_its_interpreter_and_libraries_ahead() {
    let fs = LoopFs::new("ext4", 512);
    let layout = fs.mnt.join("layout");
    let gnu = "usr/lib/x86_64-linux-gnu";
    let link = |path: &str, target: &str| LayerItem::Symlink {
        path: path.into(),
        target: target.into(),
    };
    let libs = [
        ("ld-linux-x86-64.so.2", "/lib64/ld-linux-x86-64.so.2"),
        ("libc.so.6", "/lib/x86_64-linux-gnu/libc.so.6"),
        ("libm.so.6", "/lib/x86_64-linux-gnu/libm.so.6"),
        ("libz.so.1.2.13", "/lib/x86_64-linux-gnu/libz.so.1"),
        ("libexpat.so.1.8.10", "/lib/x86_64-linux-gnu/libexpat.so.1"),
    ];
    let mut base = vec![
        dir("usr"),
        dir("usr/bin"),
        dir("usr/lib"),
        dir(gnu),
        dir("usr/lib64"),
        link("lib", "usr/lib"),
        link("lib64", "usr/lib64"),
        // Absolute, as Debian's is: resolved inside the image, not on the host.
        link(
            "usr/lib64/ld-linux-x86-64.so.2",
            "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
        ),
        link(&format!("{gnu}/libz.so.1"), "libz.so.1.2.13"),
        link(&format!("{gnu}/libexpat.so.1"), "libexpat.so.1.8.10"),
        host("usr/bin/python3.11", "/usr/bin/python3.11"),
        LayerItem::File {
            path: "usr/lib/unrelated".into(),
            mode: 0o644,
            data: pattern(300_000, 5),
        },
    ];
    base.extend(
        libs.iter()
            .map(|(name, h)| host(&format!("{gnu}/{name}"), h)),
    );
    let built = ocibuild::write_layout(&layout, "t", &[base], Compression::Gzip).unwrap();

    let engine = Engine::start(EngineConfig::default()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    // The loader's read-ahead alone (the start set would fill the loader and libc ahead).
    let (prepared, id) = prepare_overlay(&fs, &engine, &rt, &built.reference(), false);
    let ovl = OverlayMount::new(&prepared.unpacked.lowerdir_option(), &fs.mnt.join("ovl"));
    let lower_dev = std::fs::metadata(&fs.mnt).unwrap().dev();
    let watch = OverlayWatcher::start_on(&engine, &ovl.merged, lower_dev).unwrap();
    let ahead: Vec<fanfill::fill::FileId> = libs
        .iter()
        .map(|(name, _)| id(&format!("{gnu}/{name}")))
        .collect();
    assert!(
        ahead.iter().all(|f| !engine.is_complete(*f)),
        "filled before any open"
    );

    // One open of the executable, by a reader that only looks at its header.
    let exe = ovl.merged.join("usr/bin/python3.11");
    let head = within(60, "open the executable", move || {
        let mut b = [0u8; 4];
        std::fs::File::open(&exe)
            .and_then(|f| std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, 0))
            .map(|()| b)
            .unwrap()
    });
    assert_eq!(&head, b"\x7fELF");
    let began = std::time::Instant::now();
    while !ahead.iter().all(|f| engine.is_complete(*f)) {
        assert!(
            began.elapsed() < std::time::Duration::from_secs(30),
            "not filled ahead: {:?}",
            libs.iter()
                .zip(&ahead)
                .filter(|(_, f)| !engine.is_complete(**f))
                .map(|(l, _)| l.0)
                .collect::<Vec<_>>()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(watch.opens(), 1, "only the executable was opened");
    assert_eq!(watch.loader_ahead(), libs.len() as u64);
    assert!(
        !engine.is_complete(id("usr/lib/unrelated")),
        "a file no ELF names was filled"
    );
    // The libraries are the host's bytes, read through the overlay.
    for (name, h) in libs {
        let got = std::fs::read(ovl.merged.join(gnu).join(name)).unwrap();
        assert!(got == std::fs::read(h).unwrap(), "{name} differs");
    }
    drop(watch);
}

/// The start set (`PrepareOptions::start_set`): without an access profile, the files nearly
/// every container start reads (user and group files, the shell through its symlinks, the
/// time zone and the interpreter through absolute symlinks, libc) are filled by the prepare
/// itself, before anything opens them; other files are not; with the start set off, none
/// is.
#[test]
fn the_start_set_is_filled_before_anything_opens() {
    let fs = LoopFs::new("ext4", 512);
    let gnu = "usr/lib/x86_64-linux-gnu";
    let link = |path: &str, target: &str| LayerItem::Symlink {
        path: path.into(),
        target: target.into(),
    };
    let text = |path: &str, seed: u64| LayerItem::File {
        path: path.into(),
        mode: 0o644,
        data: pattern(50_000, seed),
    };
    let base = vec![
        dir("etc"),
        text("etc/passwd", 1),
        text("etc/group", 2),
        text("etc/unrelated", 3),
        dir("usr"),
        dir("usr/bin"),
        dir("usr/lib"),
        dir(gnu),
        dir("usr/lib64"),
        dir("usr/share"),
        dir("usr/share/zoneinfo"),
        text("usr/share/zoneinfo/UTC", 4),
        // Absolute, as Debian's is.
        link("etc/localtime", "/usr/share/zoneinfo/UTC"),
        link("bin", "usr/bin"),
        link("lib", "usr/lib"),
        link("lib64", "usr/lib64"),
        host("usr/bin/dash", "/usr/bin/dash"),
        link("usr/bin/sh", "dash"),
        link(
            "usr/lib64/ld-linux-x86-64.so.2",
            "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
        ),
        host(
            &format!("{gnu}/ld-linux-x86-64.so.2"),
            "/lib64/ld-linux-x86-64.so.2",
        ),
        host(
            &format!("{gnu}/libc.so.6"),
            "/lib/x86_64-linux-gnu/libc.so.6",
        ),
        host(
            &format!("{gnu}/libm.so.6"),
            "/lib/x86_64-linux-gnu/libm.so.6",
        ),
    ];
    let built =
        ocibuild::write_layout(&fs.mnt.join("layout"), "t", &[base], Compression::Gzip).unwrap();
    let engine = Engine::start(EngineConfig::default()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ahead = [
        "etc/passwd".to_string(),
        "etc/group".to_string(),
        "usr/bin/dash".to_string(),
        "usr/share/zoneinfo/UTC".to_string(),
        format!("{gnu}/ld-linux-x86-64.so.2"),
        format!("{gnu}/libc.so.6"),
    ];
    for on in [true, false] {
        let (prepared, id) = prepare_overlay(&fs, &engine, &rt, &built.reference(), on);
        let lower = std::path::PathBuf::from(&prepared.unpacked.lowerdirs[0]);
        assert_eq!(prepared.profile_files, if on { ahead.len() } else { 0 });
        let began = std::time::Instant::now();
        while on && !ahead.iter().all(|p| engine.is_complete(id(p))) {
            assert!(
                began.elapsed() < std::time::Duration::from_secs(30),
                "not filled ahead: {:?}",
                ahead
                    .iter()
                    .filter(|p| !engine.is_complete(id(p)))
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
        for p in &ahead {
            assert_eq!(engine.is_complete(id(p)), on, "{p} with the start set {on}");
        }
        for p in ["etc/unrelated", &format!("{gnu}/libm.so.6")] {
            assert!(
                !engine.is_complete(id(p)),
                "{p} is no part of the start set"
            );
        }
        // What was filled ahead is the image's bytes.
        if on {
            let got = std::fs::read(lower.join(format!("{gnu}/libc.so.6"))).unwrap();
            assert!(got == std::fs::read("/lib/x86_64-linux-gnu/libc.so.6").unwrap());
        }
    }
}
