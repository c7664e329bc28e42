//! Placeholder unpack against the real kernel: run as root on Linux (ext4 temp dirs).
//!
//! Covers every entry kind, direct flattening with whiteouts and opaque directories, overlay
//! layout checked by mounting overlayfs and comparing the merged view with the direct tree,
//! sparse placeholders and true metadata, the eager-data hook, and hostile layers.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt as _, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use fanfill::index::{Entry, EntryKind};
use fanfill::unpack::{
    FileData, Layer, Mode, Progress, UnpackError, UnpackHooks, UnpackOptions, unpack, unpack_with,
};

const CAP: &[u8] = &[
    0x01, 0x00, 0x00, 0x02, 0x00, 0x20, 0x00, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
];

// ---------------------------------------------------------------------------------------
// Entry builders

fn base(path: &str, kind: EntryKind, mode: u32) -> Entry {
    Entry {
        path: path.into(),
        kind,
        mode,
        uid: 0,
        gid: 0,
        mtime: 1_600_000_000,
        mtime_nsec: 0,
        xattrs: Box::default(),
        link: None,
        size: 0,
        data_offset: 0,
        sha256: None,
        chunk_sha256: Box::default(),
    }
}
fn dir(path: &str, mode: u32) -> Entry {
    base(path, EntryKind::Dir, mode)
}
fn file(path: &str, size: u64) -> Entry {
    Entry {
        size,
        ..base(path, EntryKind::File, 0o644)
    }
}
fn symlink(path: &str, to: &str) -> Entry {
    Entry {
        link: Some(to.into()),
        ..base(path, EntryKind::Symlink, 0o777)
    }
}
fn hardlink(path: &str, to: &str) -> Entry {
    Entry {
        link: Some(to.into()),
        ..base(path, EntryKind::Hardlink, 0o644)
    }
}
fn whiteout(path: &str) -> Entry {
    file(path, 0)
}
fn owned(e: Entry, uid: u32, gid: u32) -> Entry {
    Entry { uid, gid, ..e }
}
fn at(e: Entry, mtime: i64, nsec: u32) -> Entry {
    Entry {
        mtime,
        mtime_nsec: nsec,
        ..e
    }
}
fn with_xattr(mut e: Entry, name: &str, value: &[u8]) -> Entry {
    let mut xattrs = e.xattrs.into_vec();
    xattrs.push((name.to_owned(), value.to_vec()));
    xattrs.sort();
    e.xattrs = xattrs.into();
    e
}

// ---------------------------------------------------------------------------------------
// Harness

/// Runs `f` on its own thread and fails the test if it takes longer than `secs`.
fn with_timeout<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("test timed out after {secs} s"),
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("test thread panicked"),
    }
}

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("fanfill-unpack-")
        .tempdir()
        .unwrap()
}

fn opts(mode: Mode) -> UnpackOptions {
    UnpackOptions {
        mode,
        make_devices: true,
        ..UnpackOptions::default()
    }
}

/// A read-only overlay mount, unmounted on drop (lazily, so a failing test never leaves a
/// busy mount behind).
struct Mount {
    target: PathBuf,
    /// The empty bottom layer of a single-layer mount, removed after the unmount.
    _empty: Option<tempfile::TempDir>,
}

impl Mount {
    /// Mounts `lowerdirs` (top first). Without an upper directory overlayfs wants at least two
    /// lower ones (EINVAL otherwise): a single layer gets an empty one below it.
    fn overlay(u: &fanfill::unpack::Unpacked, target: &Path) -> Mount {
        let mut lowerdir = u.lowerdir_option();
        let empty = (u.lowerdirs.len() == 1).then(tmp);
        if let Some(e) = &empty {
            lowerdir = format!("{lowerdir}:{}", e.path().display());
        }
        let data = format!("lowerdir={lowerdir}");
        nix::mount::mount(
            Some("overlay"),
            target,
            Some("overlay"),
            nix::mount::MsFlags::MS_RDONLY,
            Some(data.as_str()),
        )
        .unwrap_or_else(|e| panic!("mount overlay {data}: {e}"));
        Mount {
            target: target.to_owned(),
            _empty: empty,
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.target, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// What a test compares of one object.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Obj {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: (i64, i64),
    link: Option<PathBuf>,
    rdev: u64,
    xattrs: Vec<(String, Vec<u8>)>,
}

/// Every object under `root` (root included as `.`), plus hardlink groups: sets of paths
/// sharing an inode.
fn snapshot(root: &Path) -> (BTreeMap<String, Obj>, Vec<Vec<String>>) {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<(u64, u64), Vec<String>> = BTreeMap::new();
    walk(root, root, &mut out, &mut inodes);
    let mut groups: Vec<Vec<String>> = inodes.into_values().filter(|g| g.len() > 1).collect();
    groups.sort();
    (out, groups)
}

fn walk(
    root: &Path,
    p: &Path,
    out: &mut BTreeMap<String, Obj>,
    inodes: &mut BTreeMap<(u64, u64), Vec<String>>,
) {
    let md = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let ft = md.file_type();
    let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
    let rel = if rel.is_empty() { ".".to_owned() } else { rel };
    let kind = if ft.is_dir() {
        "dir"
    } else if ft.is_file() {
        "file"
    } else if ft.is_symlink() {
        "symlink"
    } else if ft.is_fifo() {
        "fifo"
    } else if ft.is_char_device() {
        "char"
    } else if ft.is_block_device() {
        "block"
    } else {
        "other"
    };
    let mut xattrs: Vec<(String, Vec<u8>)> = xattr::list(p)
        .unwrap()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.starts_with("trusted.overlay."))
        .map(|n| {
            let v = xattr::get(p, &n).unwrap().unwrap_or_default();
            (n, v)
        })
        .collect();
    xattrs.sort();
    out.insert(
        rel.clone(),
        Obj {
            kind,
            mode: if ft.is_symlink() {
                0
            } else {
                md.mode() & 0o7777
            },
            uid: md.uid(),
            gid: md.gid(),
            size: if ft.is_file() || ft.is_symlink() {
                md.size()
            } else {
                0
            },
            mtime: (md.mtime(), md.mtime_nsec()),
            link: ft.is_symlink().then(|| fs::read_link(p).unwrap()),
            rdev: md.rdev(),
            xattrs,
        },
    );
    if !ft.is_dir() {
        inodes.entry((md.dev(), md.ino())).or_default().push(rel);
    }
    if ft.is_dir() {
        let mut names: Vec<_> = fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for n in names {
            walk(root, &p.join(n), out, inodes);
        }
    }
}

/// Paths under `root`, without the root, in sorted order.
fn names(root: &Path) -> Vec<String> {
    snapshot(root).0.into_keys().filter(|k| k != ".").collect()
}

// ---------------------------------------------------------------------------------------
// The three-layer image used by several tests

fn image() -> Vec<(String, Vec<Entry>)> {
    let l0 = vec![
        at(dir(".", 0o755), 1_500_000_000, 0),
        dir("bin", 0o755),
        with_xattr(
            Entry {
                mode: 0o4755,
                ..file("bin/ping", 70_000)
            },
            "security.capability",
            CAP,
        ),
        hardlink("bin/ping2", "bin/ping"),
        symlink("bin/sh", "busybox"),
        file("bin/busybox", 1 << 20),
        dir("etc", 0o755),
        file("etc/passwd", 900),
        file("etc/shadow", 500),
        dir("opt", 0o755),
        dir("opt/app", 0o750),
        file("opt/app/old.conf", 10),
        dir("opt/app/lib", 0o755),
        // Names that sort between `opt/app` and `opt/app/...` byte-wise.
        file("opt/app-x", 1),
        dir("opt/app.d", 0o755),
        file("opt/app.d/x", 2),
        file("opt/app/lib/libold.so", 4096),
        dir("var", 0o755),
        dir("var/cache", 0o755),
        file("var/cache/big", 10 << 20),
        base("run.fifo", EntryKind::Fifo, 0o620),
        dir("dev", 0o755),
        base("dev/null", EntryKind::Char { major: 1, minor: 3 }, 0o666),
        base("dev/loop9", EntryKind::Block { major: 7, minor: 9 }, 0o660),
        dir("tmp", 0o1777),
        file("replaced", 5),
        dir("becomes-file", 0o755),
        file("becomes-file/child", 7),
        symlink("link-dir", "/etc"),
    ];
    let l1 = vec![
        whiteout("etc/.wh.shadow"),
        file("opt/app/new.conf", 20),
        whiteout("opt/app/.wh..wh..opq"),
        whiteout("var/.wh.cache"),
        dir("replaced", 0o700),
        file("replaced/inside", 3),
        file("becomes-file", 11),
        // A lower symlink replaced by a directory: nothing is written through it.
        file("link-dir/passwd", 12),
        hardlink("bin/ping3", "bin/ping"),
        at(
            owned(
                with_xattr(dir("home", 0o700), "user.note", b"hello"),
                1000,
                1000,
            ),
            1_700_000_000,
            123_456_789,
        ),
        owned(file("home/.profile", 100), 1000, 1000),
    ];
    let l2 = vec![
        dir("etc", 0o755),
        file("etc/hosts", 30),
        whiteout("etc/.wh..wh..opq"),
        file("etc/passwd", 950),
        // A child of a directory no layer describes.
        file("usr/local/bin/tool", 4000),
        whiteout("bin/.wh.ping"),
        whiteout(".wh.run.fifo"),
        with_xattr(symlink("bin/trusted-link", "ping2"), "trusted.note", b"t"),
        with_xattr(symlink("bin/user-link", "ping2"), "user.skipped", b"u"),
        with_xattr(file("etc/overlay-hint", 1), "trusted.overlay.opaque", b"y"),
    ];
    vec![
        ("sha256:0000000000aa0000".to_owned(), l0),
        ("sha256:1111111111bb1111".to_owned(), l1),
        ("sha256:2222222222cc2222".to_owned(), l2),
    ]
}

fn layers(img: &[(String, Vec<Entry>)]) -> Vec<Layer<'_>> {
    img.iter().map(|(d, es)| Layer::new(d, es)).collect()
}

fn expected_names() -> Vec<&'static str> {
    let mut v = vec![
        "becomes-file",
        "bin",
        "bin/busybox",
        "bin/ping2",
        "bin/ping3",
        "bin/sh",
        "bin/trusted-link",
        "bin/user-link",
        "dev",
        "dev/loop9",
        "dev/null",
        "etc",
        "etc/hosts",
        "etc/overlay-hint",
        "etc/passwd",
        "home",
        "home/.profile",
        "link-dir",
        "link-dir/passwd",
        "opt",
        "opt/app",
        "opt/app-x",
        "opt/app.d",
        "opt/app.d/x",
        "opt/app/new.conf",
        "replaced",
        "replaced/inside",
        "tmp",
        "usr",
        "usr/local",
        "usr/local/bin",
        "usr/local/bin/tool",
        "var",
    ];
    v.sort();
    v
}

// ---------------------------------------------------------------------------------------
// Tests

#[test]
fn direct_flattens_three_layers() {
    with_timeout(60, || {
        let img = image();
        let dest = tmp();
        let out = unpack(&layers(&img), dest.path(), &opts(Mode::Direct)).unwrap();
        assert_eq!(names(dest.path()), expected_names());
        let (snap, groups) = snapshot(dest.path());
        assert_eq!(
            groups,
            vec![vec!["bin/ping2".to_owned(), "bin/ping3".to_owned()]]
        );
        assert_eq!(snap["becomes-file"].kind, "file");
        assert_eq!(snap["becomes-file"].size, 11);
        assert_eq!(snap["replaced"].kind, "dir");
        assert_eq!(snap["replaced"].mode, 0o700);
        assert_eq!(snap["link-dir"].kind, "dir");
        assert_eq!(snap["link-dir"].mode, 0o755, "implicit directory");
        assert_eq!(snap["usr/local"].mtime, (0, 0), "implicit directory");
        assert_eq!(snap["."].mtime, (1_500_000_000, 0), "root entry");
        assert_eq!(snap["tmp"].mode, 0o1777);
        assert_eq!(snap["dev/null"].kind, "char");
        assert_eq!(snap["dev/null"].rdev, nix::sys::stat::makedev(1, 3));
        assert_eq!(snap["dev/loop9"].kind, "block");
        assert_eq!(
            snap["bin/trusted-link"].xattrs,
            vec![("trusted.note".to_owned(), b"t".to_vec())]
        );
        assert!(
            snap["bin/user-link"].xattrs.is_empty(),
            "user.* on a symlink"
        );
        assert!(
            snap["etc/overlay-hint"].xattrs.is_empty(),
            "overlay control xattrs are dropped"
        );
        // One placeholder per inode with data: ping (two names), busybox, passwd, ...
        let mut ph: Vec<(String, u64)> = out
            .placeholders
            .iter()
            .map(|p| {
                assert!(p.path.is_absolute());
                let rel = p.path.strip_prefix(dest.path().canonicalize().unwrap());
                (rel.unwrap().to_string_lossy().into_owned(), p.size)
            })
            .collect();
        ph.sort();
        assert_eq!(
            ph,
            vec![
                ("becomes-file".to_owned(), 11),
                ("bin/busybox".to_owned(), 1 << 20),
                ("bin/ping2".to_owned(), 70_000),
                ("etc/hosts".to_owned(), 30),
                ("etc/overlay-hint".to_owned(), 1),
                ("etc/passwd".to_owned(), 950),
                ("home/.profile".to_owned(), 100),
                ("link-dir/passwd".to_owned(), 12),
                ("opt/app-x".to_owned(), 1),
                ("opt/app.d/x".to_owned(), 2),
                ("opt/app/new.conf".to_owned(), 20),
                ("replaced/inside".to_owned(), 3),
                ("usr/local/bin/tool".to_owned(), 4000),
            ]
        );
        let ping = out.placeholders.iter().find(|p| p.size == 70_000).unwrap();
        assert_eq!((ping.layer, ping.entry), (0, 2));
        assert_eq!(out.stats.bytes, ph.iter().map(|(_, s)| s).sum::<u64>());
        assert_eq!(out.stats.files, 13);
        assert_eq!(out.stats.hardlinks, 1);
        assert_eq!(out.stats.symlinks, 3);
        assert_eq!(out.stats.devices, 2);
        assert_eq!(out.stats.fifos, 0);
        assert_eq!(out.stats.dirs, 15);
        assert!(out.lowerdirs.is_empty());
    });
}

#[test]
fn overlay_mount_matches_direct_tree() {
    with_timeout(60, || {
        let img = image();
        let direct = tmp();
        unpack(&layers(&img), direct.path(), &opts(Mode::Direct)).unwrap();
        let ovl = tmp();
        let out = unpack(&layers(&img), ovl.path(), &opts(Mode::Overlay)).unwrap();
        let root = ovl.path().canonicalize().unwrap();
        assert_eq!(
            out.lowerdirs,
            vec![
                root.join("layers/2-2222222222cc"),
                root.join("layers/1-1111111111bb"),
                root.join("layers/0-0000000000aa"),
            ]
        );
        // Overlay form of layer 1 and 2.
        let l1 = &out.lowerdirs[1];
        let wh = fs::symlink_metadata(l1.join("etc/shadow")).unwrap();
        assert!(wh.file_type().is_char_device());
        assert_eq!((wh.rdev(), wh.uid(), wh.gid()), (0, 0, 0));
        assert_eq!(
            xattr::get(l1.join("opt/app"), "trusted.overlay.opaque").unwrap(),
            Some(b"y".to_vec())
        );
        assert_eq!(
            xattr::get(out.lowerdirs[0].join("etc"), "trusted.overlay.opaque").unwrap(),
            Some(b"y".to_vec())
        );
        assert_eq!(out.stats.whiteouts, 4);
        // Only files visible through the mount are placeholders.
        assert_eq!(out.placeholders.len(), 13);
        assert!(
            out.placeholders
                .iter()
                .all(|p| !p.path.ends_with("etc/shadow"))
        );

        let mnt = tmp();
        let _m = Mount::overlay(&out, mnt.path());
        let (merged, merged_groups) = snapshot(mnt.path());
        let (flat, flat_groups) = snapshot(direct.path());
        assert_eq!(
            merged.keys().collect::<Vec<_>>(),
            flat.keys().collect::<Vec<_>>()
        );
        for (path, obj) in &flat {
            assert_eq!(&merged[path], obj, "{path}");
        }
        assert_eq!(merged_groups, flat_groups);
    });
}

#[test]
fn placeholders_are_sparse_with_true_metadata() {
    with_timeout(60, || {
        let l0 = vec![
            owned(
                at(
                    with_xattr(
                        with_xattr(
                            Entry {
                                mode: 0o6755,
                                ..file("suid", 1 << 20)
                            },
                            "security.capability",
                            CAP,
                        ),
                        "user.origin",
                        b"layer0",
                    ),
                    1_234_567_890,
                    987_654_321,
                ),
                1234,
                5678,
            ),
            owned(
                at(
                    with_xattr(symlink("lnk", "/nowhere"), "security.capability", CAP),
                    1_111_111_111,
                    5,
                ),
                42,
                43,
            ),
            owned(base("fifo", EntryKind::Fifo, 0o640), 7, 8),
            file("empty", 0),
            file("huge", 1 << 40),
            owned(at(dir("ro", 0o555), 1_000_000_000, 1), 9, 9),
            file("ro/inside", 10),
        ];
        let dest = tmp();
        let out = unpack(
            &[Layer::new("sha256:ab", &l0)],
            dest.path(),
            &opts(Mode::Direct),
        )
        .unwrap();
        let d = dest.path();
        let md = fs::metadata(d.join("suid")).unwrap();
        assert_eq!(md.len(), 1 << 20);
        assert_eq!(md.blocks(), 0, "placeholder must be sparse");
        assert_eq!(
            md.mode() & 0o7777,
            0o6755,
            "setuid/setgid survive the chown"
        );
        assert_eq!((md.uid(), md.gid()), (1234, 5678));
        assert_eq!((md.mtime(), md.mtime_nsec()), (1_234_567_890, 987_654_321));
        assert_eq!(
            xattr::get(d.join("suid"), "security.capability").unwrap(),
            Some(CAP.to_vec())
        );
        assert_eq!(
            xattr::get(d.join("suid"), "user.origin").unwrap(),
            Some(b"layer0".to_vec())
        );
        let huge = fs::metadata(d.join("huge")).unwrap();
        assert_eq!((huge.len(), huge.blocks()), (1 << 40, 0));
        let lnk = fs::symlink_metadata(d.join("lnk")).unwrap();
        assert_eq!((lnk.uid(), lnk.gid()), (42, 43));
        assert_eq!((lnk.mtime(), lnk.mtime_nsec()), (1_111_111_111, 5));
        assert_eq!(fs::read_link(d.join("lnk")).unwrap(), Path::new("/nowhere"));
        assert_eq!(
            xattr::get(d.join("lnk"), "security.capability").unwrap(),
            Some(CAP.to_vec()),
            "capability xattr on the symlink itself"
        );
        let fifo = fs::symlink_metadata(d.join("fifo")).unwrap();
        assert!(fifo.file_type().is_fifo());
        assert_eq!(
            (fifo.mode() & 0o7777, fifo.uid(), fifo.gid()),
            (0o640, 7, 8)
        );
        let ro = fs::metadata(d.join("ro")).unwrap();
        assert_eq!(ro.mode() & 0o7777, 0o555);
        assert_eq!((ro.mtime(), ro.mtime_nsec()), (1_000_000_000, 1));
        assert!(d.join("ro/inside").exists());
        assert_eq!(fs::metadata(d.join("empty")).unwrap().len(), 0);
        assert_eq!(out.placeholders.len(), 3, "empty files are no placeholders");

        // Reserved (non-sparse) placeholders have blocks but still read as zeros.
        let dest2 = tmp();
        let o = UnpackOptions {
            sparse: false,
            ..opts(Mode::Direct)
        };
        unpack(&[Layer::new("sha256:ab", &l0[..1])], dest2.path(), &o).unwrap();
        let md = fs::metadata(dest2.path().join("suid")).unwrap();
        assert!(md.blocks() >= 2048, "blocks reserved: {}", md.blocks());
        assert_eq!(md.mode() & 0o7777, 0o6755);
    });
}

/// Kernel behaviour the fill engine must know: any write to a placeholder (as root, too)
/// drops `security.capability`; setuid survives a root write (CAP_FSETID). Fills must
/// restore the capability xattr (and the mtime).
#[test]
fn a_fill_write_drops_security_capability() {
    with_timeout(60, || {
        let l0 = vec![with_xattr(
            Entry {
                mode: 0o4755,
                ..file("ping", 8192)
            },
            "security.capability",
            CAP,
        )];
        let dest = tmp();
        unpack(
            &[Layer::new("sha256:ab", &l0)],
            dest.path(),
            &opts(Mode::Direct),
        )
        .unwrap();
        let p = dest.path().join("ping");
        let f = fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[1; 4096], 0).unwrap();
        drop(f);
        assert_eq!(xattr::get(&p, "security.capability").unwrap(), None);
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o7777, 0o4755);
    });
}

#[derive(Default)]
struct Eager {
    progress: Vec<Progress>,
    written: usize,
}

impl UnpackHooks for Eager {
    fn progress(&mut self, p: Progress) {
        self.progress.push(p);
    }
    fn write_data(
        &mut self,
        _layer: usize,
        _entry: usize,
        meta: &Entry,
        file: &mut File,
    ) -> io::Result<FileData> {
        if meta.path.starts_with("data/") {
            let byte = meta.path.as_bytes()[meta.path.len() - 1];
            file.write_all(&vec![byte; meta.size as usize])?;
            self.written += 1;
            return Ok(FileData::Written);
        }
        Ok(FileData::Placeholder)
    }
}

#[test]
fn eager_hook_writes_data_and_metadata_survives() {
    with_timeout(60, || {
        let mut l0 = vec![dir("data", 0o755)];
        for i in 0..10 {
            l0.push(file(&format!("data/f{i}"), 5000));
        }
        l0.push(with_xattr(
            Entry {
                mode: 0o4755,
                ..at(file("data/cap", 100), 1_200_000_000, 7)
            },
            "security.capability",
            CAP,
        ));
        l0.push(file("lazy", 10));
        let dest = tmp();
        let mut hooks = Eager::default();
        let o = UnpackOptions {
            progress_every: 5,
            ..opts(Mode::Direct)
        };
        let out =
            unpack_with(&[Layer::new("sha256:ab", &l0)], dest.path(), &o, &mut hooks).unwrap();
        assert_eq!(hooks.written, 11);
        assert_eq!(out.placeholders.len(), 1);
        assert!(out.placeholders[0].path.ends_with("lazy"));
        assert_eq!(
            fs::read(dest.path().join("data/f3")).unwrap(),
            vec![b'3'; 5000]
        );
        let cap = dest.path().join("data/cap");
        assert_eq!(
            xattr::get(&cap, "security.capability").unwrap(),
            Some(CAP.to_vec()),
            "xattrs are set after the data"
        );
        let md = fs::metadata(&cap).unwrap();
        assert_eq!(md.mode() & 0o7777, 0o4755);
        assert_eq!((md.mtime(), md.mtime_nsec()), (1_200_000_000, 7));
        // 14 objects (root, data, 11 files, lazy): every 5, and once at the end.
        let done: Vec<u64> = hooks.progress.iter().map(|p| p.done).collect();
        assert_eq!(done, vec![5, 10, 14]);
        assert!(hooks.progress.iter().all(|p| p.total == 14));
    });
}

/// A sibling directory standing for "outside": it must stay empty.
fn outside() -> tempfile::TempDir {
    tmp()
}

fn assert_empty(p: &Path) {
    assert!(
        fs::read_dir(p).unwrap().next().is_none(),
        "{} must be empty",
        p.display()
    );
}

#[test]
fn hostile_layers_write_nothing_outside() {
    with_timeout(60, || {
        let out = outside();
        let o = out.path().to_str().unwrap().to_owned();
        let cases: Vec<(&str, Vec<Entry>)> = vec![
            (
                "symlink then entry beneath it",
                vec![symlink("a", &o), file("a/passwd", 10)],
            ),
            (
                "entry then symlink over its parent",
                vec![file("a/passwd", 10), symlink("a", &o)],
            ),
            ("dot-dot", vec![file("../escape", 10)]),
            (
                "dot-dot inside",
                vec![dir("a", 0o755), file("a/../../escape", 1)],
            ),
            ("absolute", vec![file(&format!("{o}/abs"), 10)]),
            ("hardlink dot-dot", vec![hardlink("h", "../../etc/passwd")]),
            ("hardlink absolute", vec![hardlink("h", "/etc/passwd")]),
            (
                "hardlink through symlink",
                vec![symlink("s", "/etc"), hardlink("h", "s/passwd")],
            ),
            ("whiteout dot-dot", vec![whiteout(".wh..."), file("x", 1)]),
        ];
        for (what, entries) in cases {
            for mode in [Mode::Direct, Mode::Overlay] {
                let dest = tmp();
                let err = unpack(
                    &[Layer::new("sha256:evil", &entries)],
                    dest.path(),
                    &opts(mode),
                )
                .expect_err(what);
                assert!(
                    matches!(
                        err,
                        UnpackError::BadPath { .. }
                            | UnpackError::NotADirectory { .. }
                            | UnpackError::HardlinkTarget { .. }
                    ),
                    "{what}: {err}"
                );
                assert!(err.to_string().contains("sha256:evil"), "{err}");
                assert_empty(dest.path());
                assert_empty(out.path());
            }
        }

        // Across layers the lower symlink is replaced by a directory.
        let l0 = vec![symlink("a", &o)];
        let l1 = vec![file("a/passwd", 10)];
        for mode in [Mode::Direct, Mode::Overlay] {
            let dest = tmp();
            unpack(
                &[Layer::new("sha256:l0", &l0), Layer::new("sha256:l1", &l1)],
                dest.path(),
                &opts(mode),
            )
            .unwrap();
            assert_empty(out.path());
        }
    });
}

#[test]
fn planted_symlink_in_a_nonempty_dest_is_not_followed() {
    with_timeout(60, || {
        let out = outside();
        let dest = tmp();
        std::os::unix::fs::symlink(out.path(), dest.path().join("a")).unwrap();
        let l0 = vec![dir("a", 0o755), file("a/f", 10), file("a/g", 10)];
        let layer = [Layer::new("sha256:l0", &l0)];
        let err = unpack(&layer, dest.path(), &opts(Mode::Direct)).unwrap_err();
        assert!(matches!(err, UnpackError::DestNotEmpty { .. }), "{err}");
        let o = UnpackOptions {
            allow_nonempty: true,
            ..opts(Mode::Direct)
        };
        let err = unpack(&layer, dest.path(), &o).unwrap_err();
        assert!(matches!(err, UnpackError::Io { .. }), "{err}");
        // O_NOFOLLOW | O_DIRECTORY on a symlink: ENOTDIR (not ELOOP) on Linux.
        assert_eq!(
            err.io_error().and_then(io::Error::raw_os_error),
            Some(libc::ENOTDIR)
        );
        assert_empty(out.path());

        // An existing real directory is reused.
        let dest = tmp();
        fs::create_dir(dest.path().join("a")).unwrap();
        fs::set_permissions(dest.path().join("a"), fs::Permissions::from_mode(0o700)).unwrap();
        unpack(&layer, dest.path(), &o).unwrap();
        assert_eq!(
            fs::metadata(dest.path().join("a")).unwrap().mode() & 0o7777,
            0o755
        );
    });
}

#[test]
fn devices_are_skipped_unless_asked() {
    with_timeout(60, || {
        let l0 = vec![
            base("null", EntryKind::Char { major: 1, minor: 3 }, 0o666),
            hardlink("null2", "null"),
            base("fifo", EntryKind::Fifo, 0o600),
        ];
        let dest = tmp();
        let out = unpack(
            &[Layer::new("sha256:ab", &l0)],
            dest.path(),
            &UnpackOptions::default(),
        )
        .unwrap();
        assert_eq!(names(dest.path()), vec!["fifo"]);
        assert_eq!(out.stats.skipped, 2);
        assert_eq!(out.stats.fifos, 1);
    });
}

/// A tiny deterministic PRNG (xorshift64*) for the differential test.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from[self.below(from.len() as u64) as usize]
    }
}

/// Random layers with every kind of replacement, whiteout and opaque marker. Entries
/// that would put something beneath a non-directory of the same layer are not generated.
fn random_image(rng: &mut Rng) -> Vec<(String, Vec<Entry>)> {
    const NAMES: &[&str] = &["a", "b", "a.b", "a-b", "c"];
    let nlayers = 2 + rng.below(3) as usize;
    let mut img = Vec::new();
    for li in 0..nlayers {
        let mut entries: Vec<Entry> = Vec::new();
        // Same-layer bookkeeping: path -> is a directory; paths hardlinks point at.
        let mut kinds: BTreeMap<String, bool> = BTreeMap::new();
        let mut files: Vec<String> = Vec::new();
        if rng.below(3) == 0 {
            let root = dir(".", [0o755, 0o700][rng.below(2) as usize]);
            entries.push(at(root, 1_000_000_000 + rng.below(1000) as i64, 0));
        }
        for _ in 0..(4 + rng.below(12)) {
            let depth = 1 + rng.below(3) as usize;
            let comps: Vec<&str> = (0..depth).map(|_| rng.pick(NAMES)).collect();
            let path = comps.join("/");
            let ancestors_ok = (1..depth).all(|i| kinds.get(&comps[..i].join("/")) != Some(&false));
            let prefix = format!("{path}/");
            let has_children = kinds.keys().any(|k| k.starts_with(&prefix));
            if !ancestors_ok || files.contains(&path) {
                continue;
            }
            let parent = comps[..depth - 1].join("/");
            let name = comps[depth - 1];
            let join = |n: &str| {
                if parent.is_empty() {
                    n.to_owned()
                } else {
                    format!("{parent}/{n}")
                }
            };
            let mtime = 1_000_000_000 + rng.below(1000) as i64;
            let roll = rng.below(100);
            let e = if roll < 30 {
                let mut e = dir(&path, [0o755, 0o700, 0o1777, 0o2755][rng.below(4) as usize]);
                if rng.below(3) == 0 {
                    e = with_xattr(e, "user.r", &rng.next().to_le_bytes());
                }
                kinds.insert(path.clone(), true);
                e
            } else if has_children {
                continue;
            } else if roll < 55 {
                let mut e = Entry {
                    mode: [0o644, 0o4755, 0o600][rng.below(3) as usize],
                    ..file(&path, rng.below(3) * 5000)
                };
                if rng.below(3) == 0 {
                    e = with_xattr(e, "security.capability", CAP);
                }
                kinds.insert(path.clone(), false);
                files.push(path.clone());
                e
            } else if roll < 65 {
                kinds.insert(path.clone(), false);
                symlink(&path, rng.pick(&["a", "/etc", "../x", "b/c"]))
            } else if roll < 72 && !files.is_empty() {
                let to = files[rng.below(files.len() as u64) as usize].clone();
                if to == path {
                    continue;
                }
                kinds.insert(path.clone(), false);
                files.push(path.clone());
                files.push(to.clone());
                hardlink(&path, &to)
            } else if roll < 74 {
                kinds.insert(path.clone(), false);
                base(&path, EntryKind::Fifo, 0o640)
            } else if roll < 76 {
                kinds.insert(path.clone(), false);
                base(&path, EntryKind::Char { major: 1, minor: 5 }, 0o666)
            } else if roll < 90 {
                whiteout(&join(&format!(".wh.{name}")))
            } else if roll < 99 {
                whiteout(&format!("{path}/.wh..wh..opq"))
            } else {
                whiteout(".wh..wh..opq")
            };
            entries.push(owned(
                at(e, mtime, 0),
                rng.below(3) as u32,
                rng.below(3) as u32,
            ));
        }
        img.push((format!("sha256:{li:02}{:010x}", rng.next() >> 24), entries));
    }
    img
}

/// Differential test: for random images, the overlay mount of the overlay layout shows
/// exactly the direct tree (or both modes refuse the image alike). `FANFILL_RANDOM_IMAGES`
/// sets the number of images (default 100).
#[test]
fn random_images_agree_in_both_modes() {
    with_timeout(600, || {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let (mut agreed, mut refused, mut cut) = (0, 0, 0);
        let n: u64 = std::env::var("FANFILL_RANDOM_IMAGES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(100);
        for seed in 0..n {
            let img = random_image(&mut rng);
            let direct = tmp();
            let ovl = tmp();
            let d = unpack(&layers(&img), direct.path(), &opts(Mode::Direct));
            let o = unpack(&layers(&img), ovl.path(), &opts(Mode::Overlay));
            let (d, o) = match (d, o) {
                (Ok(d), Ok(o)) => (d, o),
                (Err(d), Err(o)) => {
                    assert_eq!(d.to_string(), o.to_string(), "seed {seed}");
                    eprintln!("refused: {d}");
                    refused += 1;
                    continue;
                }
                (d, o) => panic!("seed {seed}: modes disagree: {d:?} vs {o:?}\n{img:#?}"),
            };
            if o.lowerdirs.len() < img.len() {
                cut += 1; // an opaque layer root left the layers below it out
            }
            let mnt = tmp();
            let _m = Mount::overlay(&o, mnt.path());
            let (merged, merged_groups) = snapshot(mnt.path());
            let (flat, flat_groups) = snapshot(direct.path());
            assert_eq!(
                merged.keys().collect::<Vec<_>>(),
                flat.keys().collect::<Vec<_>>(),
                "seed {seed}\n{img:#?}"
            );
            for (path, obj) in &flat {
                assert_eq!(&merged[path], obj, "seed {seed}: {path}\n{img:#?}");
            }
            assert_eq!(merged_groups, flat_groups, "seed {seed}");
            let sizes = |u: &fanfill::unpack::Unpacked| {
                let mut v: Vec<u64> = u.placeholders.iter().map(|p| p.size).collect();
                v.sort();
                v
            };
            assert_eq!(sizes(&d), sizes(&o), "seed {seed}: placeholders");
            agreed += 1;
        }
        eprintln!(
            "{agreed} random images agree ({cut} with an opaque layer root), {refused} refused by both modes"
        );
        assert!(n < 100 || cut > 0, "no image had an opaque layer root");
        assert!(
            agreed * 4 >= n * 3,
            "only {agreed} images unpacked ({refused} refused)"
        );
    });
}

#[test]
fn streaming_helpers_refuse_symlinks_and_keep_metadata() {
    use fanfill::unpack::{create_file, finish_file, open_dir_beneath};
    use std::os::fd::AsFd;
    with_timeout(60, || {
        let out = outside();
        let dest = tmp();
        fs::create_dir_all(dest.path().join("a/b")).unwrap();
        std::os::unix::fs::symlink(out.path(), dest.path().join("a/esc")).unwrap();
        std::os::unix::fs::symlink("b", dest.path().join("a/rel")).unwrap();
        let root = File::open(dest.path()).unwrap();
        for bad in ["a/esc", "a/rel", "../", "/etc", "a/../../x"] {
            let err = open_dir_beneath(root.as_fd(), Path::new(bad)).unwrap_err();
            assert!(
                matches!(err.raw_os_error(), Some(libc::ELOOP | libc::EXDEV)),
                "{bad}: {err}"
            );
        }
        let dir = open_dir_beneath(root.as_fd(), Path::new("a/b")).unwrap();
        let meta = owned(
            at(
                with_xattr(
                    Entry {
                        mode: 0o2750,
                        ..file("a/b/f", 6)
                    },
                    "security.capability",
                    CAP,
                ),
                1_300_000_000,
                3,
            ),
            11,
            12,
        );
        let mut f = create_file(dir.as_fd(), "f".as_ref(), meta.size, true).unwrap();
        f.write_all(b"hello\n").unwrap();
        finish_file(&f, &meta).unwrap();
        drop(f);
        let p = dest.path().join("a/b/f");
        assert_eq!(fs::read(&p).unwrap(), b"hello\n");
        let md = fs::metadata(&p).unwrap();
        assert_eq!(md.mode() & 0o7777, 0o2750);
        assert_eq!((md.uid(), md.gid()), (11, 12));
        assert_eq!((md.mtime(), md.mtime_nsec()), (1_300_000_000, 3));
        assert_eq!(
            xattr::get(&p, "security.capability").unwrap(),
            Some(CAP.to_vec())
        );
        // Never over an existing object, never through a final symlink.
        assert_eq!(
            create_file(dir.as_fd(), "f".as_ref(), 1, true)
                .unwrap_err()
                .raw_os_error(),
            Some(libc::EEXIST)
        );
        let a = open_dir_beneath(root.as_fd(), Path::new("a")).unwrap();
        assert!(create_file(a.as_fd(), "esc".as_ref(), 1, true).is_err());
        assert_empty(out.path());
    });
}

/// The unpack that creates leaves on two threads (`unpack`, the path `prepare` takes) makes
/// the same tree as the one-walk unpack (`unpack_with`), in both modes, for an image large
/// enough to be split: hardlinks across directories (and to a lower layer's inode),
/// symlinks, xattrs, owners, whiteouts and an opaque directory in the upper layer.
#[test]
fn two_thread_unpack_matches_the_single_walk() {
    with_timeout(600, || {
        let mut l0 = Vec::new();
        for d in 0..24 {
            l0.push(owned(dir(&format!("d{d:02}"), 0o750), 3, 4));
            for f in 0..60 {
                let mut e = at(
                    owned(file(&format!("d{d:02}/f{f:02}"), 1 + f * 100), f as u32, 7),
                    1_600_000_000 + f as i64,
                    f as u32,
                );
                if f % 7 == 0 {
                    e = with_xattr(e, "user.k", b"v");
                }
                if f % 11 == 0 {
                    e.mode = 0o4755;
                }
                l0.push(e);
            }
            l0.push(symlink(&format!("d{d:02}/s"), "f00"));
            // A name in another directory for an inode of this one.
            l0.push(hardlink(
                &format!("d{:02}/h{d:02}", (d + 5) % 24),
                &format!("d{d:02}/f01"),
            ));
        }
        let mut l1 = vec![
            whiteout("d03/f04"),
            whiteout("d05"),
            file("d07/.wh..wh..opq", 0),
            file("d07/new", 5),
            hardlink("d09/again", "d10/f02"),
        ];
        for f in 0..600 {
            l1.push(file(&format!("top/g{f:03}"), 10 + f));
        }
        let img = vec![("sha256:aa".to_owned(), l0), ("sha256:bb".to_owned(), l1)];
        for mode in [Mode::Direct, Mode::Overlay] {
            let (a, b) = (tmp(), tmp());
            let pa = unpack(&layers(&img), a.path(), &opts(mode)).unwrap();
            let pb = unpack_with(
                &layers(&img),
                b.path(),
                &opts(mode),
                &mut fanfill::unpack::NoHooks,
            )
            .unwrap();
            assert_eq!(pa.stats, pb.stats, "{mode:?}");
            let key = |u: &fanfill::unpack::Unpacked, root: &Path| {
                let mut v: Vec<_> = u
                    .placeholders
                    .iter()
                    .map(|p| {
                        (
                            p.path.strip_prefix(root).unwrap().to_path_buf(),
                            p.layer,
                            p.entry,
                            p.size,
                        )
                    })
                    .collect();
                v.sort();
                v
            };
            let (ra, rb) = (
                a.path().canonicalize().unwrap(),
                b.path().canonicalize().unwrap(),
            );
            assert_eq!(key(&pa, &ra), key(&pb, &rb), "{mode:?}");
            assert!(pa.placeholders.len() > 1500, "{mode:?}");
            let (mut sa, ga) = snapshot(a.path());
            let (mut sb, gb) = snapshot(b.path());
            if mode == Mode::Overlay {
                // The destination and `layers/` carry their creation time: not the image's.
                for s in [&mut sa, &mut sb] {
                    s.remove(".");
                    s.remove("layers");
                }
            }
            assert_eq!(sa, sb, "{mode:?}");
            assert_eq!(ga, gb, "{mode:?}");
        }
    });
}

// ---------------------------------------------------------------------------------------
// Registration in the unpack (issue #15)

/// Zeros of any length: the placeholders below are never read.
struct Zeros;

impl fanfill::fill::ContentSource for Zeros {
    fn read_at(
        &self,
        _file: u32,
        _offset: u64,
        len: u64,
    ) -> futures::future::BoxFuture<'_, Result<Vec<u8>, fanfill::fill::SourceError>> {
        Box::pin(async move { Ok(vec![0; len as usize]) })
    }
}

/// What the daemon's and the library's prepare do: each placeholder is registered with the
/// engine as the unpack creates it (one id per placeholder, in its order; a prefilled one is
/// not registered), and a source failing half-way stops the unpack and unregisters every
/// placeholder registered before it.
#[test]
fn registration_in_the_unpack_registers_each_placeholder_and_undoes_a_failure() {
    use std::sync::Arc;

    use fanfill::fill::{ContentSource, Engine, EngineConfig, Verify};
    use fanfill::image::{FileSource, ImageError, Registration};

    with_timeout(120, || {
        let entries: Vec<Entry> = (0..40u64)
            .map(|i| file(&format!("f{i:02}"), 100 + i))
            .collect();
        let layers = [Layer::new("sha256:aa", &entries)];
        let engine = Engine::start(EngineConfig::default()).unwrap();
        let zeros: Arc<dyn ContentSource> = Arc::new(Zeros);
        let zeros = || FileSource {
            source: zeros.clone(),
            file: 0,
            verify: Verify::None,
        };
        let source = |_: usize, entry: usize| -> Result<FileSource, ImageError> {
            if entry == 20 {
                return Err(ImageError::Task("injected source failure".into()));
            }
            Ok(zeros())
        };
        let ok_source = |_: usize, _: usize| -> Result<FileSource, ImageError> { Ok(zeros()) };
        let prefill = |p: &fanfill::unpack::Placeholder, _: &Entry, _: &File| p.entry == 0;
        let d = tmp();
        let dest = d.path().canonicalize().unwrap();
        let r = Registration {
            engine: &engine,
            mode: Mode::Direct,
            reference: "test",
            dest: &dest,
            source: &ok_source,
            prefill: Some(&prefill),
        };
        let (unpacked, ids) = r
            .unpack(|sink| fanfill::unpack::unpack_into(&layers, &dest, &opts(Mode::Direct), sink))
            .unwrap();
        assert_eq!(unpacked.placeholders.len(), 40);
        assert_eq!(ids.len(), 40);
        for (p, id) in unpacked.placeholders.iter().zip(&ids) {
            assert_eq!(id.is_none(), p.entry == 0, "{}", p.path.display());
            if let Some(id) = id {
                let m = fs::metadata(&p.path).unwrap();
                assert_eq!((id.dev(), id.ino()), (m.dev(), m.ino()));
            }
        }
        assert_eq!(engine.stats().files, 39);
        for id in ids.into_iter().flatten() {
            engine.unregister(id).unwrap();
        }
        assert_eq!(engine.stats().files, 0);

        let d2 = tmp();
        let dest2 = d2.path().canonicalize().unwrap();
        let failing = Registration {
            dest: &dest2,
            source: &source,
            ..r
        };
        let err = failing
            .unpack(|sink| fanfill::unpack::unpack_into(&layers, &dest2, &opts(Mode::Direct), sink))
            .unwrap_err();
        assert!(
            fanfill::fill::error_chain(&err).contains("injected source failure"),
            "{err}"
        );
        assert_eq!(engine.stats().files, 0, "registered files were left behind");
    })
}
