//! Issue #18, security: what a node user, a container, a registry writer and an image
//! author can and cannot make the root daemon do (docs/security.md names each test here).

mod common;
mod fsutil;

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fanfill::api::Request;
use fanfill::index::{Entry, EntryKind};
use fanfill::ocibuild::{Compression, LayerItem, write_layout};
use fanfill::unpack::{Layer, UnpackOptions};
use fsutil::daemonproc::{DaemonProc, bin};
use fsutil::{pattern, sha256_hex, within};

/// A `security.capability` value (revision 2): `cap_net_raw+ep`.
fn cap_net_raw() -> Vec<u8> {
    let mut v = Vec::new();
    for w in [0x0200_0001u32, 1 << 13, 0, 0, 0] {
        v.extend_from_slice(&w.to_le_bytes());
    }
    v
}

/// Reads `path` whole (a placeholder: the daemon fills it), under a timeout.
fn read(path: &Path) -> Vec<u8> {
    let p = path.to_path_buf();
    within(60, "reading a placeholder", move || std::fs::read(&p))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Waits up to `secs` for `f`.
fn wait_for(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

fn mode_of(p: &Path) -> u32 {
    std::fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .mode()
        & 0o7777
}

/// A temp dir whose state dir a non-root user could reach if the daemon let it.
fn open_tmp() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    tmp
}

/// [`open_tmp`] with a state dir in it.
fn tmp_and_state() -> (tempfile::TempDir, PathBuf) {
    let tmp = open_tmp();
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    (tmp, state)
}

/// A layer of directory `d` holding `files` as `d/f0`, `d/f1`, ...
fn files_layer(files: &[Vec<u8>]) -> Vec<LayerItem> {
    let mut items = vec![LayerItem::Dir {
        path: "d".into(),
        mode: 0o755,
    }];
    for (i, f) in files.iter().enumerate() {
        items.push(LayerItem::File {
            path: format!("d/f{i}"),
            mode: 0o644,
            data: f.clone(),
        });
    }
    items
}

/// A directory in `tmp` only root can enter: where direct-mode trees may live.
fn private(tmp: &Path) -> PathBuf {
    let p = tmp.join("private");
    std::fs::create_dir_all(&p).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700)).unwrap();
    p
}

/// Finding "setuid copies in the content cache": every cache entry is a root-owned 0400
/// file, cache and state dirs 0700, and a file filled from the cache gets mode and
/// capability from the index.
#[test]
fn cache_entries_carry_no_mode_and_restores_take_the_index_metadata() {
    let (tmp, state) = tmp_and_state();
    let su = pattern(300_000, 7);
    let plain = pattern(200_000, 8);
    let built = write_layout(
        &tmp.path().join("img"),
        "1",
        &[vec![
            LayerItem::Dir {
                path: "bin".into(),
                mode: 0o755,
            },
            LayerItem::FileXattrs {
                path: "bin/su".into(),
                mode: 0o4755,
                data: su.clone(),
                xattrs: vec![("security.capability".into(), cap_net_raw())],
            },
            LayerItem::File {
                path: "bin/plain".into(),
                mode: 0o2755,
                data: plain.clone(),
            },
        ]],
        Compression::Gzip,
    )
    .unwrap();
    let d = DaemonProc::start(&state, &[]);
    let a = private(tmp.path()).join("a");
    d.prepare(&built.reference(), &a, false);
    assert_eq!(read(&a.join("bin/su")), su);
    assert_eq!(read(&a.join("bin/plain")), plain);
    let cache = state.join("cache");
    for data in [&su, &plain] {
        let entry = cache.join(sha256_hex(data));
        assert!(
            wait_for(20, || entry.exists()),
            "{} never cached",
            entry.display()
        );
        let m = std::fs::metadata(&entry).unwrap();
        assert_eq!(
            (m.mode() & 0o7777, m.uid(), m.gid()),
            (0o400, 0, 0),
            "cache entry {} is not a root-owned 0400 file",
            entry.display()
        );
        assert_eq!(xattr::get(&entry, "security.capability").unwrap(), None);
    }
    assert_eq!(mode_of(&cache), 0o700, "cache dir");
    assert_eq!(mode_of(&state), 0o700, "state dir");
    // A second tree of the image is filled from the cache before it is marked.
    let b = private(tmp.path()).join("b");
    d.prepare(&built.reference(), &b, false);
    assert_eq!(read(&b.join("bin/su")), su);
    assert_eq!(mode_of(&b.join("bin/su")), 0o4755);
    assert_eq!(mode_of(&b.join("bin/plain")), 0o2755);
    assert_eq!(
        xattr::get(b.join("bin/su"), "security.capability").unwrap(),
        Some(cap_net_raw()),
        "the restored file lost the index's capability"
    );
}

/// Finding "cache adds follow the served path": a container that swaps a completed file
/// for a FIFO does not hang the persist thread (later files still reach the cache), and
/// one swapped for a symlink to the same bytes is not read.
#[test]
fn cache_adds_never_follow_a_swapped_path() {
    let (tmp, state) = tmp_and_state();
    let files: Vec<Vec<u8>> = (0..3)
        .map(|i| pattern(100_000 + i, 40 + i as u64))
        .collect();
    let built = write_layout(
        &tmp.path().join("img"),
        "1",
        &[files_layer(&files)],
        Compression::Gzip,
    )
    .unwrap();
    let d = DaemonProc::start(&state, &[]);
    let dest = private(tmp.path()).join("dest");
    d.prepare(&built.reference(), &dest, false);
    let cached = |data: &[u8]| state.join("cache").join(sha256_hex(data)).exists();
    // f0: completed, then replaced by a FIFO before the daemon records it.
    let fifo = dest.join("d/fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o666)).unwrap();
    assert_eq!(read(&dest.join("d/f0")), files[0]);
    std::fs::rename(&fifo, dest.join("d/f0")).unwrap();
    // f1: completed, then replaced by a symlink to a copy of its own bytes elsewhere.
    let copy = tmp.path().join("copy");
    std::fs::write(&copy, &files[1]).unwrap();
    assert_eq!(read(&dest.join("d/f1")), files[1]);
    let link = dest.join("d/link");
    std::os::unix::fs::symlink(&copy, &link).unwrap();
    std::fs::rename(&link, dest.join("d/f1")).unwrap();
    // f2: an ordinary completed file, recorded after the others.
    assert_eq!(read(&dest.join("d/f2")), files[2]);
    let f2_cached = wait_for(10, || cached(&files[2]));
    // A persist thread blocked opening the FIFO is let go (so the daemon can stop) before
    // any assertion.
    if let Ok(w) = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags_nonblock()
        .open(dest.join("d/f0"))
    {
        drop(w);
    }
    assert!(
        f2_cached,
        "a file completed after the FIFO swap never reached the cache: the persist thread hung"
    );
    assert!(!cached(&files[0]), "the FIFO was cached");
    assert!(
        !cached(&files[1]),
        "the symlink was followed: bytes read from outside the served tree"
    );
    assert!(d.log_text().contains("no longer the served file"));
}

trait NonBlock {
    fn custom_flags_nonblock(&mut self) -> &mut Self;
}

impl NonBlock for std::fs::OpenOptions {
    fn custom_flags_nonblock(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_NONBLOCK)
    }
}

/// Runs `fanfill ARGS` as `uid:gid` against the daemon's socket; (success, stderr).
fn fanfill_as(uid: u32, gid: u32, socket: &Path, args: &[&str]) -> (bool, String) {
    // A copy every user can run (the build tree may sit in a directory only root enters).
    let dir = socket.parent().unwrap().parent().unwrap();
    let exe = dir.join("fanfill-for-others");
    if !exe.exists() {
        std::fs::hard_link(env!("CARGO_BIN_EXE_fanfill"), &exe)
            .or_else(|_| std::fs::copy(env!("CARGO_BIN_EXE_fanfill"), &exe).map(|_| ()))
            .unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let out = std::process::Command::new(&exe)
        .args(args)
        .env("FANFILL_SOCKET", socket)
        .uid(uid)
        .gid(gid)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A small image and a daemon serving it in `tmp/dest`.
fn served(tmp: &Path, extra: &[&str]) -> (DaemonProc, PathBuf) {
    let state = tmp.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let built = write_layout(
        &tmp.join("img"),
        "1",
        &[vec![LayerItem::File {
            path: "f".into(),
            mode: 0o644,
            data: pattern(10_000, 1),
        }]],
        Compression::Gzip,
    )
    .unwrap();
    let d = DaemonProc::start(&state, extra);
    let dest = private(tmp).join("dest");
    d.prepare(&built.reference(), &dest, false);
    (d, dest)
}

/// Finding "API and holder sockets": a non-root process that reaches the API socket (it
/// connected while the socket was still open to it, or its mode was loosened) is refused
/// by its peer credentials: it can neither read status nor remove an image.
#[test]
fn api_refuses_a_non_root_peer() {
    let tmp = open_tmp();
    let (d, dest) = served(tmp.path(), &[]);
    // The socket made reachable to everyone, as it was between bind and chmod.
    std::fs::set_permissions(&d.state, std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::set_permissions(&d.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (ok, err) = fanfill_as(65534, 65534, &d.socket, &["status"]);
    assert!(!ok, "a non-root peer read the daemon's status");
    let (ok, err2) = fanfill_as(65534, 65534, &d.socket, &["rm", dest.to_str().unwrap()]);
    assert!(!ok, "a non-root peer removed an image");
    let (_, images) = d.status();
    assert_eq!(images.len(), 1, "{err}\n{err2}");
    assert!(dest.join("f").exists());
    assert!(
        d.log_text().contains("API connection refused"),
        "refused for another reason: {err}"
    );
}

/// `--status-group`: its members may read status, nothing else; the socket is 0660 with
/// that group.
#[test]
fn status_group_may_only_read() {
    let tmp = open_tmp();
    let (d, dest) = served(tmp.path(), &["--status-group", "4242"]);
    let m = std::fs::metadata(&d.socket).unwrap();
    assert_eq!((m.mode() & 0o777, m.gid()), (0o660, 4242));
    std::fs::set_permissions(&d.state, std::fs::Permissions::from_mode(0o711)).unwrap();
    let (ok, err) = fanfill_as(65534, 4242, &d.socket, &["status"]);
    assert!(ok, "a status-group member could not read status: {err}");
    let (ok, err) = fanfill_as(65534, 4242, &d.socket, &["rm", dest.to_str().unwrap()]);
    assert!(!ok, "a status-group member removed an image");
    assert!(err.contains("permission denied"), "{err}");
    let (_, images) = d.status();
    assert_eq!(images.len(), 1);
}

/// The fd holder hands the group fd (the power to answer every reader on the node) only to
/// a root process running the fanfill binary: not to this test program, root as it is.
#[test]
fn holder_gives_the_group_only_to_fanfill() {
    let tmp = open_tmp();
    let (d, _dest) = served(tmp.path(), &[]);
    let sock = d.state.join("holder.sock");
    assert_eq!(mode_of(&sock), 0o600);
    let conn = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let sent = fanfill::sys::fdpass::send_fd(&conn, b'G', None);
    let got = fanfill::sys::fdpass::recv_fd(&conn);
    let handed = matches!(got, Ok(Some((b'Y', Some(_)))));
    assert!(
        !handed,
        "the holder handed its fanotify group to a process that is not fanfill ({sent:?})"
    );
}

/// A socket directory the daemon creates is 0700 (0750 with a status group), and nothing
/// but the socket appears in it.
#[test]
fn socket_dir_is_private() {
    let (tmp, state) = tmp_and_state();
    let run = tmp.path().join("run/fanfill");
    let sock = run.join("api.sock");
    let mut child = bin()
        .args(["daemon", "--no-holder", "--socket"])
        .arg(&sock)
        .arg("--state-dir")
        .arg(&state)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let up = wait_for(60, || fanfill::daemon::call(&sock, &Request::Ping).is_ok());
    let dir_mode = std::fs::metadata(&run).map(|m| m.mode() & 0o7777);
    let names: Vec<String> = std::fs::read_dir(&run)
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = within(30, "daemon stop", move || child.wait());
    assert!(up, "daemon did not come up");
    assert_eq!(dir_mode.unwrap(), 0o700);
    assert_eq!(names, vec!["api.sock".to_string()]);
    assert_eq!(mode_of(&state), 0o700);
}

/// Finding "xattrs and markers from the image": only the xattrs an unpacker may apply are
/// applied; fanfill's own marker, LSM labels and overlay control xattrs never are.
#[test]
fn image_xattrs_are_filtered() {
    let tmp = tempfile::tempdir().unwrap();
    let x = |pairs: &[(&str, &[u8])]| -> Box<[(String, Vec<u8>)]> {
        let mut v: Vec<(String, Vec<u8>)> = pairs
            .iter()
            .map(|(n, val)| (n.to_string(), val.to_vec()))
            .collect();
        v.sort();
        v.into()
    };
    let mut root = Entry::new("", EntryKind::Dir, 0o755);
    root.xattrs = x(&[("trusted.fanfill.image", b"forged")]);
    let mut dir = Entry::new("etc", EntryKind::Dir, 0o755);
    dir.xattrs = x(&[
        ("trusted.fanfill.image", b"forged"),
        ("user.fanfill.x", b"forged"),
        ("user.dir", b"kept"),
    ]);
    let mut file = Entry::new("etc/f", EntryKind::File, 0o755);
    file.xattrs = x(&[
        ("security.capability", &cap_net_raw()),
        ("security.selinux", b"system_u:object_r:shadow_t:s0"),
        ("security.ima", b"\x03\x02\x04"),
        ("security.evm", b"\x05\x06"),
        ("trusted.overlay.opaque", b"y"),
        ("user.overlay.redirect", b"/x"),
        ("trusted.kept", b"1"),
        ("user.kept", b"2"),
    ]);
    let entries = vec![root, dir, file];
    let dest = tmp.path().join("tree");
    std::fs::create_dir(&dest).unwrap();
    let layers = [Layer::new("sha256:00", &entries)];
    fanfill::unpack::unpack(&layers, &dest, &UnpackOptions::default()).unwrap();
    let get = |p: &str, n: &str| xattr::get(dest.join(p), n).unwrap();
    for (p, n) in [
        ("", "trusted.fanfill.image"),
        ("etc", "trusted.fanfill.image"),
        ("etc", "user.fanfill.x"),
        ("etc/f", "security.selinux"),
        ("etc/f", "security.ima"),
        ("etc/f", "security.evm"),
        ("etc/f", "trusted.overlay.opaque"),
        ("etc/f", "user.overlay.redirect"),
    ] {
        assert_eq!(get(p, n), None, "{n} on /{p} was taken from the image");
    }
    assert_eq!(get("etc", "user.dir"), Some(b"kept".to_vec()));
    assert_eq!(get("etc/f", "trusted.kept"), Some(b"1".to_vec()));
    assert_eq!(get("etc/f", "user.kept"), Some(b"2".to_vec()));
    assert_eq!(get("etc/f", "security.capability"), Some(cap_net_raw()));
}

/// Finding "metrics listener": at most a bounded number of connections are held, and a
/// client trickling its request is cut off; a well-behaved client is answered after.
#[test]
fn metrics_listener_is_bounded() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let l = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = l.local_addr().unwrap();
    rt.spawn(fanfill::daemon::metrics::serve(
        l,
        std::sync::Arc::new(|| "fanfill_test 1\n".to_string()),
    ));
    // 200 idle clients: the daemon must not hold them all.
    let idle: Vec<std::net::TcpStream> = (0..200)
        .map(|_| std::net::TcpStream::connect(addr).unwrap())
        .collect();
    for c in &idle {
        c.set_nonblocking(true).unwrap();
    }
    let count_closed = || {
        idle.iter()
            .filter(|c| matches!((&**c).read(&mut [0u8; 1]), Ok(0)))
            .count()
    };
    let mut closed = 0;
    // Well within the 5 s deadline that ends idle connections anyway.
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(3) {
        closed = count_closed();
        if closed >= 150 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        closed >= 150,
        "{closed} of 200 idle connections closed: no connection bound"
    );
    drop(idle);
    // (The server sees them go.)
    std::thread::sleep(Duration::from_millis(500));
    // A client that sends one byte every 500 ms is served for a while, then cut off
    // within the deadline.
    let mut slow = std::net::TcpStream::connect(addr).unwrap();
    let t = Instant::now();
    let mut cut = false;
    while t.elapsed() < Duration::from_secs(12) {
        if slow.write_all(b"G").is_err() {
            cut = true;
            break;
        }
        slow.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        match slow.read(&mut [0u8; 64]) {
            Ok(0) => {
                cut = true;
                break;
            }
            Ok(_) => panic!("answered a request that never ended"),
            Err(_) => {}
        }
    }
    assert!(cut, "a trickling client held its connection for 12 s");
    assert!(
        t.elapsed() > Duration::from_secs(2) && t.elapsed() < Duration::from_secs(8),
        "cut after {:?}",
        t.elapsed()
    );
    // And a proper request is still answered.
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.read_to_string(&mut body).unwrap();
    assert!(body.contains("fanfill_test 1"), "{body}");
}

/// Finding "supply chain": every dependency `Cargo.toml` declares is used by the code (a
/// root daemon carries only what it runs).
#[test]
fn every_declared_dependency_is_used() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let deps: Vec<String> = manifest
        .split("\n[dependencies]\n")
        .nth(1)
        .unwrap()
        .split("\n[")
        .next()
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k.trim().to_string()))
        .filter(|k| !k.is_empty() && !k.starts_with('#'))
        .collect();
    assert!(deps.len() > 10, "{deps:?}");
    // The code the crate runs: src/, and what build.rs generates (it names its paths).
    let mut src = std::fs::read_to_string(root.join("build.rs")).unwrap_or_default();
    let mut stack = vec![root.join("src")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                src.push_str(&std::fs::read_to_string(&p).unwrap());
            }
        }
    }
    let unused: Vec<&String> = deps
        .iter()
        .filter(|d| {
            let id = d.replace('-', "_");
            !src.contains(&format!("{id}::")) && !src.contains(&format!("use {id}"))
        })
        .collect();
    assert!(unused.is_empty(), "declared but never used: {unused:?}");
}

/// The API's refusal of a prepare, or the prepared status.
fn try_prepare(d: &DaemonProc, image: &str, dest: &Path) -> Result<(), String> {
    let s = d.socket.clone();
    let req = Request::Prepare {
        image: image.into(),
        dest: dest.into(),
        mode: fanfill::api::LayoutMode::Direct,
        registry: Default::default(),
        prefetch: false,
    };
    match within(120, "API call", move || fanfill::daemon::call(&s, &req)) {
        Ok(fanfill::api::Response::Prepared(_)) => Ok(()),
        Ok(r) => Err(format!("{r:?}")),
        Err(e) => Err(e.to_string()),
    }
}

fn setuid_image(dir: &Path) -> String {
    write_layout(
        dir,
        "1",
        &[vec![
            LayerItem::Dir {
                path: "bin".into(),
                mode: 0o755,
            },
            LayerItem::File {
                path: "bin/su".into(),
                mode: 0o4755,
                data: pattern(5000, 3),
            },
        ]],
        Compression::Gzip,
    )
    .unwrap()
    .reference()
}

/// Finding "trees readable by every host user": a direct-mode tree is only made below a
/// directory host users cannot enter; the image's setuid binary is out of their reach.
#[test]
fn direct_trees_are_out_of_host_users_reach() {
    let (tmp, state) = tmp_and_state();
    let image = setuid_image(&tmp.path().join("img"));
    let d = DaemonProc::start(&state, &[]);
    // Below directories every user can enter: refused.
    let open = tmp.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
    let exposed = open.join("dest");
    let r = try_prepare(&d, &image, &exposed);
    let ls = |p: &Path| {
        std::process::Command::new("ls")
            .arg("-l")
            .arg(p)
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap()
    };
    let reachable = ls(&exposed.join("bin/su")).status.success();
    assert!(
        r.is_err() && !reachable,
        "a direct tree was made where every user can run its setuid binary ({r:?}, reachable: {reachable})"
    );
    assert!(r.unwrap_err().contains("only root can enter"));
    // Missing parents are created 0700: accepted, and out of reach.
    let guarded = tmp.path().join("new/parent/dest");
    try_prepare(&d, &image, &guarded).unwrap();
    assert_eq!(mode_of(&tmp.path().join("new")), 0o700);
    assert_eq!(mode_of(&guarded.join("bin/su")), 0o4755);
    assert!(!ls(&guarded.join("bin/su")).status.success());
    // Root (the container's root) sees the tree as it is.
    assert_eq!(read(&guarded.join("bin/su")), pattern(5000, 3));
}

/// Finding "destination race": a destination a user could move or replace while root
/// builds in it (below a directory that user owns, or one anyone may write) is refused;
/// the tree is built in the directory opened once, by fd.
#[test]
fn destinations_a_user_could_swap_are_refused() {
    let (tmp, state) = tmp_and_state();
    let image = setuid_image(&tmp.path().join("img"));
    let d = DaemonProc::start(&state, &[]);
    let base = private(tmp.path());
    let users = base.join("users");
    std::fs::create_dir(&users).unwrap();
    std::os::unix::fs::chown(&users, Some(1000), Some(1000)).unwrap();
    let r = try_prepare(&d, &image, &users.join("dest"));
    assert!(
        r.as_ref().is_err_and(|e| e.contains("owned by uid 1000")),
        "prepared below a directory uid 1000 can rename entries of: {r:?}"
    );
    let world = base.join("world");
    std::fs::create_dir(&world).unwrap();
    std::fs::set_permissions(&world, std::fs::Permissions::from_mode(0o777)).unwrap();
    let r = try_prepare(&d, &image, &world.join("dest"));
    assert!(
        r.as_ref()
            .is_err_and(|e| e.contains("writable by group or others")),
        "prepared below a world-writable directory: {r:?}"
    );
    // A sticky world-writable directory (as /tmp) protects root's entries: accepted.
    let sticky = base.join("sticky");
    std::fs::create_dir(&sticky).unwrap();
    std::fs::set_permissions(&sticky, std::fs::Permissions::from_mode(0o1777)).unwrap();
    try_prepare(&d, &image, &sticky.join("dest")).unwrap();
}

/// The unpacker builds in the directory it was given open, even when the path that named
/// it leads elsewhere by then (a symlink swapped in).
#[test]
fn unpack_builds_beneath_the_open_destination() {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("dest");
    let elsewhere = tmp.path().join("elsewhere");
    std::fs::create_dir(&dest).unwrap();
    std::fs::create_dir(&elsewhere).unwrap();
    let fd = fanfill::unpack::open_dest(&dest).unwrap();
    std::fs::rename(&dest, tmp.path().join("moved")).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &dest).unwrap();
    let mut f = Entry::new("f", EntryKind::File, 0o644);
    f.size = 10;
    let entries = vec![Entry::new("", EntryKind::Dir, 0o755), f];
    fanfill::unpack::unpack_at(
        &[Layer::new("sha256:00", &entries)],
        fd,
        &dest,
        &UnpackOptions::default(),
    )
    .unwrap();
    assert!(tmp.path().join("moved/f").exists());
    assert!(!elsewhere.join("f").exists());
    // A destination path with a symlink on the way is not opened at all.
    assert!(fanfill::unpack::open_dest(&dest.join(".")).is_err());
}

/// An image in `registry` (repository `repo`) of one layer with an executable `bin/tool`
/// (mode 0755), and a forged index artifact pushed for it the way anyone with push rights
/// could: the image's true index with `bin/tool` made setuid. Returns the reference, the
/// tool's bytes and the forged artifact's digest.
fn image_with_forged_referrer(
    registry: &common::TestRegistry,
    tmp: &Path,
    repo: &str,
) -> (String, Vec<u8>, String) {
    use fanfill::image::{self, PrepareOptions};
    let data = pattern(50_000, 9);
    let built = write_layout(
        &tmp.join(format!("img-{}", repo.replace('/', "-"))),
        "v1",
        &[vec![
            LayerItem::Dir {
                path: "bin".into(),
                mode: 0o755,
            },
            LayerItem::File {
                path: "bin/tool".into(),
                mode: 0o755,
                data: data.clone(),
            },
        ]],
        Compression::Gzip,
    )
    .unwrap();
    common::push_layout(&built.dir, "v1", &registry.host(), repo, &[]);
    let reference = format!("docker://{}/{repo}:v1", registry.host());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut opts =
        PrepareOptions::new(tmp.join(format!("forger-{}/indexes", repo.replace('/', "-"))));
    opts.registry.insecure = true;
    opts.blob_cache = None;
    let (indexes, _) = rt
        .block_on(image::index_image_with_profile(
            &reference, &opts, false, None,
        ))
        .unwrap();
    let ix = &indexes.layers[0].1;
    let mut forged = (**ix).clone();
    let tool = forged
        .entries
        .iter_mut()
        .find(|e| &*e.path == "bin/tool")
        .unwrap();
    tool.mode = 0o4755;
    let mut blobs = vec![(
        image::INDEX_LAYER_MEDIA_TYPE.to_string(),
        bytes::Bytes::from(forged.encode()),
    )];
    if let Some(pack) = fanfill::index::IndexStore::new(&opts.index_dir)
        .load_windows(ix)
        .unwrap()
    {
        blobs.push((
            image::INDEX_WINDOWS_MEDIA_TYPE.to_string(),
            pack.bytes().clone(),
        ));
    }
    let (store, img) = rt.block_on(image::open(&reference, &opts)).unwrap();
    let digest = rt
        .block_on(store.push_artifact(&img.manifest_digest, image::INDEX_ARTIFACT_TYPE, blobs))
        .unwrap();
    (reference, data, digest.to_string())
}

/// Prepares `reference` on a daemon started with `extra` flags (state and destination named
/// `name` under `tmp`); returns the daemon and `bin/tool`'s mode as served.
fn serve_tool(
    tmp: &Path,
    reference: &str,
    data: &[u8],
    name: &str,
    extra: &[&str],
) -> (DaemonProc, u32) {
    let settings = fanfill::api::RegistrySettings {
        insecure: true,
        ..Default::default()
    };
    let state = tmp.join(name);
    std::fs::create_dir_all(&state).unwrap();
    let d = DaemonProc::start(&state, extra);
    let dest = private(tmp).join(name);
    d.prepare_with(reference, &dest, false, settings);
    assert_eq!(read(&dest.join("bin/tool")), data);
    let mode = mode_of(&dest.join("bin/tool"));
    (d, mode)
}

/// Finding "the index artifact is trusted on sight": an index artifact anyone with push
/// rights attached (here: the image's true index with a file made setuid) is ignored under
/// the default `--index-policy local`, and used only when the daemon is told `referrer`.
#[test]
fn index_policy_local_ignores_a_forged_referrer() {
    let registry = common::TestRegistry::start();
    let tmp = open_tmp();
    let (reference, data, _) = image_with_forged_referrer(&registry, tmp.path(), "sec/forged");
    let (_d, default_mode) = serve_tool(tmp.path(), &reference, &data, "default", &[]);
    assert_eq!(
        default_mode, 0o755,
        "the default policy took file metadata from a referrer artifact anyone could push"
    );
    let (_d2, referrer_mode) = serve_tool(
        tmp.path(),
        &reference,
        &data,
        "referrer",
        &["--index-policy", "referrer"],
    );
    assert_eq!(
        referrer_mode, 0o4755,
        "under --index-policy referrer the pushed artifact is used (the forgery this test plants)"
    );
}

/// Under the `signed` policy an artifact's manifest (then its metadata blobs) is fetched
/// while its signature is checked; when both fail, the reason logged is the signature's.
/// Here the forged (unsigned) artifact is still listed as a referrer but its manifest is
/// deleted from the registry: the daemon refuses it as unsigned, not over the failed fetch,
/// and serves the image with its own metadata.
#[test]
fn an_unsigned_artifact_whose_manifest_is_gone_is_refused_as_unsigned() {
    let registry = common::TestRegistry::start();
    let tmp = open_tmp();
    let keys = tmp.path().join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    let (_, publisher_pub) = common::p256_key(&keys, "publisher");
    let (reference, data, forged) = image_with_forged_referrer(&registry, tmp.path(), "sec/gone");
    let url = format!("http://{}/v2/sec/gone/manifests/{forged}", registry.host());
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "DELETE",
            &url,
        ])
        .output()
        .expect("curl");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "202",
        "deleting the forged artifact's manifest: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = publisher_pub.display().to_string();
    let (d, mode) = serve_tool(
        tmp.path(),
        &reference,
        &data,
        "gone",
        &["--index-policy", "signed", "--index-key", &key],
    );
    assert_eq!(mode, 0o755, "the forged artifact was used");
    let log = d.log_text();
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("not signed by the index key") && l.contains(&forged))
        .collect();
    assert_eq!(
        refused.len(),
        1,
        "the listed artifact was not refused once:\n{log}"
    );
    assert!(
        refused[0].contains("no signature"),
        "the reason is not the missing signature: {}",
        refused[0]
    );
}

/// Finding "the index artifact is trusted on sight", the `signed` policy: an index artifact
/// is taken only with a cosign signature by the daemon's `--index-key`. The publisher pushes
/// and signs the true index (`fanfill index --push --sign-key`); a forger then pushes a
/// newer artifact (bin/tool setuid) signed with a key of its own (made by openssl in
/// cosign's format). A daemon with the publisher's key serves the signed artifact (the
/// tool stays 0755, the forgery is logged as not signed by the key); one with the forger's
/// key takes the forgery (the key decides, and an openssl-made signature verifies); one
/// with `referrer` takes the newest (the forgery). fanfill's signature verifies with
/// `openssl dgst -verify` (it is cosign's format), and `signed` without a key is refused.
#[test]
fn index_policy_signed_takes_only_an_artifact_signed_with_the_key() {
    use base64::Engine as _;
    use fanfill::image::{self, PrepareOptions};
    use fanfill::signature;
    let registry = common::TestRegistry::start();
    let tmp = open_tmp();
    let keys = tmp.path().join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    let (publisher_key, publisher_pub) = common::p256_key(&keys, "publisher");
    let (forger_key, forger_pub) = common::p256_key(&keys, "forger");
    let (reference, data, forged) = image_with_forged_referrer(&registry, tmp.path(), "sec/signed");

    // The publisher's artifact, pushed after the forgery, then the forger's again, newest.
    let out = bin()
        .args([
            "index",
            &reference,
            "--push",
            "--tls-verify=false",
            "--index-dir",
        ])
        .arg(tmp.path().join("publisher/indexes"))
        .arg("--sign-key")
        .arg(&publisher_key)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "fanfill index --push --sign-key: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let honest = stdout
        .split_whitespace()
        .skip_while(|w| *w != "artifact")
        .nth(1)
        .unwrap_or_else(|| panic!("no artifact digest in: {stdout}"))
        .to_string();
    assert!(stdout.contains("signed it"), "{stdout}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut opts = PrepareOptions::new(tmp.path().join("checker/indexes"));
    opts.registry.insecure = true;
    let (store, img) = rt.block_on(image::open(&reference, &opts)).unwrap();
    // Make the forgery the newest referrer again: a second push of the same manifest gets a
    // fresh creation time.
    let forged_again = {
        let listed = rt
            .block_on(store.list_referrers(&img.manifest_digest, Some(image::INDEX_ARTIFACT_TYPE)))
            .unwrap();
        assert!(
            listed.iter().any(|d| d.digest().to_string() == honest),
            "{listed:?}"
        );
        let r = rt
            .block_on(
                store.fetch_referrer(
                    listed
                        .iter()
                        .find(|d| d.digest().to_string() == forged)
                        .unwrap(),
                ),
            )
            .unwrap();
        let mut blobs = Vec::new();
        for l in r.manifest.layers() {
            blobs.push((
                l.media_type().to_string(),
                rt.block_on(store.fetch_blob(l.digest(), l.size())).unwrap(),
            ));
        }
        rt.block_on(store.push_artifact(&img.manifest_digest, image::INDEX_ARTIFACT_TYPE, blobs))
            .unwrap()
            .to_string()
    };

    // fanfill's signature is cosign's format: openssl verifies it with the public key.
    let sig_manifest = rt
        .block_on(store.fetch_manifest(Some(&signature::signature_tag(&honest))))
        .unwrap();
    let m: oci_spec::image::ImageManifest = serde_json::from_slice(&sig_manifest.bytes).unwrap();
    let layer = &m.layers()[0];
    assert_eq!(
        layer.media_type().to_string(),
        signature::PAYLOAD_MEDIA_TYPE
    );
    let sig_b64 = layer.annotations().as_ref().unwrap()[signature::SIGNATURE_ANNOTATION].clone();
    let payload = rt
        .block_on(store.fetch_blob(layer.digest(), layer.size()))
        .unwrap();
    let payload_file = tmp.path().join("payload.json");
    let sig_file = tmp.path().join("payload.sig");
    std::fs::write(&payload_file, &payload).unwrap();
    std::fs::write(
        &sig_file,
        base64::engine::general_purpose::STANDARD
            .decode(&sig_b64)
            .unwrap(),
    )
    .unwrap();
    let path = |p: &Path| p.to_str().unwrap().to_string();
    common::openssl(
        tmp.path(),
        &[
            "dgst",
            "-sha256",
            "-verify",
            &path(&publisher_pub),
            "-signature",
            &path(&sig_file),
            &path(&payload_file),
        ],
    );
    signature::check_payload(&payload, &honest).unwrap();

    // The forger signs its (newest) artifact with its own key, by openssl, as cosign would.
    let forged_payload =
        signature::payload(&format!("{}/sec/signed", registry.host()), &forged_again);
    std::fs::write(&payload_file, &forged_payload).unwrap();
    common::openssl(
        tmp.path(),
        &[
            "dgst",
            "-sha256",
            "-sign",
            &path(&forger_key),
            "-out",
            &path(&sig_file),
            &path(&payload_file),
        ],
    );
    let forged_sig =
        base64::engine::general_purpose::STANDARD.encode(std::fs::read(&sig_file).unwrap());
    let (manifest, blobs) = signature::signature_manifest(&forged_payload, &forged_sig);
    rt.block_on(store.push_tagged(&signature::signature_tag(&forged_again), manifest, blobs))
        .unwrap();

    let key_flag = |key: &Path| {
        vec![
            "--index-policy".to_string(),
            "signed".to_string(),
            "--index-key".to_string(),
            key.display().to_string(),
        ]
    };
    let flags = key_flag(&publisher_pub);
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();
    let (d, signed_mode) = serve_tool(tmp.path(), &reference, &data, "signed", &args);
    assert_eq!(
        signed_mode, 0o755,
        "--index-policy signed took the forger's artifact"
    );
    let log = d.log_text();
    for line in log.lines().filter(|l| l.contains("index key")) {
        eprintln!("{line}");
    }
    assert!(
        log.contains("index artifact signed by the index key") && log.contains(&honest),
        "the publisher's signed artifact was not used:\n{log}"
    );
    assert!(
        log.contains("not signed by the index key") && log.contains(&forged_again),
        "the forger's artifact was not considered and refused:\n{log}"
    );
    let flags = key_flag(&forger_pub);
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();
    let (_d2, forger_mode) = serve_tool(tmp.path(), &reference, &data, "forger-key", &args);
    assert_eq!(
        forger_mode, 0o4755,
        "with the forger's key the forger's (openssl-signed) artifact is the signed one"
    );
    let (_d3, referrer_mode) = serve_tool(
        tmp.path(),
        &reference,
        &data,
        "referrer",
        &["--index-policy", "referrer"],
    );
    assert_eq!(referrer_mode, 0o4755, "the forgery is the newest referrer");

    let out = bin()
        .args(["daemon", "--index-policy", "signed", "--state-dir"])
        .arg(tmp.path().join("nokey"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--index-key"),
        "{err}"
    );
}

/// Finding "whatever the policy, a layer's background completion computes the layer's
/// sha256": a layer whose bytes change in a way no file shows (the gzip header's time
/// field) is caught when prefetch reads it whole; the image is then bad: status names the
/// layer and every read, of a filled file too, gets EIO.
#[test]
fn a_layer_that_does_not_hash_to_its_digest_fails_the_image() {
    let (tmp, state) = tmp_and_state();
    let files: Vec<Vec<u8>> = (0..3).map(|i| pattern(300_000, 70 + i)).collect();
    let built = write_layout(
        &tmp.path().join("img"),
        "1",
        &[files_layer(&files)],
        Compression::Gzip,
    )
    .unwrap();
    let layer = built.layers[0].0.clone();
    let mut d = DaemonProc::start(&state, &[]);
    let dest = private(tmp.path()).join("dest");
    d.prepare(&built.reference(), &dest, false);
    // One file read (filled, its mark gone) before the layer is found bad.
    assert_eq!(read(&dest.join("d/f0")), files[0]);
    // The layer's bytes change where no file's do: the gzip member's MTIME (bytes 4..8),
    // in the layout and in the daemon's kept copy of the streamed layer.
    let hex = layer.strip_prefix("sha256:").unwrap();
    let copies = [
        built.dir.join("blobs/sha256").join(hex),
        state.join("blobs/sha256").join(hex),
    ];
    let mut changed = 0;
    for p in &copies {
        let Ok(mut b) = std::fs::read(p) else {
            continue;
        };
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o644)).unwrap();
        b[4..8].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        std::fs::write(p, &b).unwrap();
        changed += 1;
    }
    assert!(changed > 0, "no copy of the layer found");
    match d.call(Request::Prefetch {
        dest: dest.clone(),
        enable: true,
    }) {
        fanfill::api::Response::Ok => {}
        r => panic!("{r:?}"),
    }
    let bad = wait_for(30, || {
        d.status()
            .1
            .first()
            .is_some_and(|s| s.state.contains("does not match its digest"))
    });
    let (_, images) = d.status();
    assert!(
        bad,
        "prefetch read a layer that does not hash to its digest and the image stayed good: {:?}",
        images.first().map(|s| &s.state)
    );
    assert!(images[0].state.contains(&layer), "{}", images[0].state);
    assert!(d.log_text().contains("image marked bad"));
    for i in 0..3 {
        let p = dest.join(format!("d/f{i}"));
        let r = within(30, "reading a file of a bad image", move || {
            std::fs::read(&p)
        });
        assert_eq!(
            r.map_err(|e| e.raw_os_error()).map(|v| v.len()),
            Err(Some(libc::EIO)),
            "d/f{i} of a bad image"
        );
    }
    // The verdict survives the daemon: after a SIGKILL and a restart the image is still
    // bad, named so, and every read still gets EIO.
    d.kill9();
    let d2 = DaemonProc::start(&state, &[]);
    let (_, images) = d2.status();
    assert!(
        images.first().is_some_and(|s| s.state.contains(&layer)),
        "after a restart the bad image is served again: {:?}",
        images.first().map(|s| &s.state)
    );
    for i in 0..3 {
        let p = dest.join(format!("d/f{i}"));
        let r = within(
            30,
            "reading a file of a bad image after a restart",
            move || std::fs::read(&p),
        );
        assert_eq!(
            r.map_err(|e| e.raw_os_error()).map(|v| v.len()),
            Err(Some(libc::EIO)),
            "d/f{i} of a bad image after a restart"
        );
    }
}

/// Finding "decompression bombs", the checkpoint path: a crafted index says the layer
/// yields 8 KiB and a file sits in its first 4 KiB; the blob is one gzip member of 1 GiB of
/// zeros (about 1 MiB). A fill of the file inflates what the index says and stops: 4 KiB
/// back at once, never the gigabyte.
#[test]
fn a_checkpoint_inflate_stops_at_what_the_index_says() {
    use fanfill::index::{Checkpoint, Compression as IxCompression, LayerIndex};
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..1024 {
        gz.write_all(&zeros).unwrap();
    }
    let blob = gz.finish().unwrap();
    assert!(blob.len() < 2 << 20, "{}", blob.len());
    let mut file = Entry::new("bomb", EntryKind::File, 0o644);
    file.size = 4096;
    file.data_offset = 0;
    let index = LayerIndex {
        compression: IxCompression::Gzip,
        blob_digest: String::new(),
        diff_id: None,
        compressed_size: blob.len() as u64,
        uncompressed_size: 8192,
        span: 1 << 20,
        windows_digest: None,
        windows_size: 0,
        entries: vec![file.clone()],
        // The member's deflate data starts after its 10-byte header.
        checkpoints: vec![Checkpoint {
            uncompressed_offset: 0,
            compressed_offset: 10,
            bit_offset: 0,
            window: None,
        }],
        end_marks: Vec::new(),
    };
    let span = fanfill::index::plan(&index, &file, 0, 4096).unwrap();
    let bytes = &blob[span.blob_offset as usize..(span.blob_offset + span.blob_len) as usize];
    let t = Instant::now();
    let got = fanfill::index::extract(&index, &span, &[], bytes).unwrap();
    let took = t.elapsed();
    assert_eq!(got, vec![0u8; 4096]);
    assert!(
        took < Duration::from_millis(200),
        "4 KiB took {took:?}: inflated past what the index says"
    );
}
