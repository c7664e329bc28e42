//! fanfill as containerd's proxy snapshotter, end to end: Debian's containerd (private root,
//! state, socket and config), the real `fanfill daemon --containerd-socket`, an image in a
//! local registry with its index artifact, `ctr-remote image rpull --snapshotter fanfill`,
//! then `ctr run --snapshotter fanfill` of a program that execs a dynamically linked binary
//! (ld.so maps libc), reads files of three layers and checks a whiteout. Its output must
//! equal the same run on containerd's own overlayfs snapshotter after an ordinary pull;
//! bytes fetched are reported against the image size; removing the image must leave no
//! snapshot, placeholder tree or mount behind.

#[path = "support/containerd.rs"]
mod containerd;
mod fsutil;
#[path = "support/rootfs_layers.rs"]
mod rootfs_layers;

use std::path::Path;

use containerd::{Containerd, tail};
use fanfill::ocibuild::{self, BuiltImage, Compression, LayerItem};
use fsutil::daemonproc::DaemonProc;
use fsutil::{LoopFs, pattern};

mod common;

/// The container's workload: exec of a dynamically linked program (ld.so maps libc) that
/// reads files of the data layer and the top layer, a listing with owners, modes and sizes,
/// and a whiteout check.
const SCRIPT: &str = "/usr/bin/sha256sum /data/a /data/b /data/notes/n7.txt /data/top.txt /usr/bin/sha256sum; \
    /bin/busybox ls -ln /data | /bin/busybox grep -v '^total' | /bin/busybox sort; \
    /bin/busybox cat /data/notes/n3.txt; \
    test -e /data/gone && echo WHITEOUT-BROKEN; echo done";

fn image(dir: &Path) -> BuiltImage {
    let (base, data) = rootfs_layers::base_and_data(24);
    let top = vec![
        rootfs_layers::dir("data"),
        LayerItem::Whiteout {
            path: "data/gone".into(),
        },
        LayerItem::File {
            path: "data/top.txt".into(),
            mode: 0o644,
            data: pattern(50_000, 34),
        },
        LayerItem::File {
            path: "data/top-unread".into(),
            mode: 0o644,
            data: pattern(8 << 20, 35),
        },
    ];
    ocibuild::write_layout(dir, "v1", &[base, data, top], Compression::Gzip).unwrap()
}

/// Bytes the daemon fetched from the registry, all images together, and how many images
/// it serves.
fn fetched(daemon: &DaemonProc) -> (u64, usize) {
    let (_, images) = daemon.status();
    (images.iter().map(|i| i.bytes_fetched).sum(), images.len())
}

/// Mounts (from `/proc/self/mountinfo`) whose mount point or source lies under `dir`.
fn mounts_under(dir: &Path) -> Vec<String> {
    let d = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.split(' ').nth(4).is_some_and(|mp| mp.starts_with(&d)))
        .map(str::to_string)
        .collect()
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn ctr_remote_rpull_and_ctr_run_on_fanfill() {
    let fs = LoopFs::new("ext4", 1024);
    let registry = common::TestRegistry::start();
    let built = image(&fs.mnt.join("layout"));
    let reference = format!("{}/snap/app:v1", registry.host());
    common::push_layout(&built.dir, "v1", &registry.host(), "snap/app", &[]);
    let out = fsutil::daemonproc::bin()
        .args(["index", &reference, "--push", "--tls-verify=false"])
        .arg("--index-dir")
        .arg(fs.mnt.join("push-indexes"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fanfill index --push: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let state = fs.mnt.join("state");
    std::fs::create_dir(&state).unwrap();
    let snap_sock = state.join("snapshotter.sock");
    let daemon = DaemonProc::start(
        &state,
        &[
            "--containerd-socket",
            snap_sock.to_str().unwrap(),
            "--containerd-tls-verify=false",
        ],
    );
    let ctrd_dir = tempfile::tempdir().unwrap();
    let ctrd = Containerd::start(&fs.mnt.join("containerd"), ctrd_dir.path(), &snap_sock);
    let fail = |what: &str| -> String {
        format!(
            "{what}\n--- daemon log (tail) ---\n{}\n--- containerd log (tail) ---\n{}",
            tail(&daemon.log_text(), 40),
            tail(&ctrd.log_text(), 40)
        )
    };

    // Lazy pull: containerd asks fanfill for every layer; fanfill answers with remote
    // snapshots, so containerd fetches only the manifest and config.
    let rpull = ctrd.ctr_output(
        "ctr-remote",
        &[
            "image",
            "rpull",
            "--plain-http",
            "--snapshotter",
            "fanfill",
            &reference,
        ],
    );
    assert!(
        rpull.status.success(),
        "{}",
        fail(&format!(
            "rpull: {}{}",
            String::from_utf8_lossy(&rpull.stdout),
            String::from_utf8_lossy(&rpull.stderr)
        ))
    );
    let (before, images) = fetched(&daemon);
    assert_eq!(images, 1, "{}", fail("one lazy image expected"));
    let snaps = ctrd.ctr("ctr", &["snapshots", "--snapshotter", "fanfill", "ls"]);
    eprintln!("snapshots after rpull:\n{snaps}");
    assert_eq!(
        snaps.lines().filter(|l| l.contains("Committed")).count(),
        3,
        "three committed layer snapshots expected"
    );
    // containerd's content store has no layer blob: it never downloaded one.
    let content = ctrd.ctr("ctr", &["content", "ls", "--quiet"]);
    let blobs: Vec<&str> = content.lines().map(str::trim).collect();
    assert_eq!(blobs.len(), 2, "manifest and config only: {content}");
    for (digest, _, _) in &built.layers {
        assert!(
            !blobs.contains(&digest.as_str()),
            "containerd downloaded layer {digest}:\n{content}"
        );
    }

    let run = ctrd.ctr_output(
        "ctr",
        &[
            "run",
            "--rm",
            "--snapshotter",
            "fanfill",
            &reference,
            "lazy",
            "/bin/sh",
            "-c",
            SCRIPT,
        ],
    );
    let lazy_out = String::from_utf8_lossy(&run.stdout).into_owned();
    assert!(
        run.status.success(),
        "{}",
        fail(&format!(
            "ctr run (fanfill): {lazy_out}{}",
            String::from_utf8_lossy(&run.stderr)
        ))
    );
    let (after, _) = fetched(&daemon);

    // Eager: the same image through containerd's own pull and overlayfs snapshotter.
    ctrd.ctr(
        "ctr",
        &[
            "image",
            "pull",
            "--plain-http",
            "--snapshotter",
            "overlayfs",
            &reference,
        ],
    );
    let eager_out = ctrd.ctr(
        "ctr",
        &[
            "run",
            "--rm",
            "--snapshotter",
            "overlayfs",
            &reference,
            "eager",
            "/bin/sh",
            "-c",
            SCRIPT,
        ],
    );
    eprintln!("container output:\n{lazy_out}");
    assert!(lazy_out.ends_with("done\n"), "{lazy_out}");
    assert!(!lazy_out.contains("WHITEOUT-BROKEN"));
    assert_eq!(lazy_out, eager_out, "lazy and eager runs differ");
    let size = built.compressed_size();
    eprintln!(
        "bytes fetched by fanfill: {before} after rpull, {after} after the run; image layers {size} bytes compressed ({:.1}% fetched)",
        after as f64 * 100.0 / size as f64
    );
    assert!(
        after < size / 2,
        "the run fetched {after} of {size} bytes: not lazy"
    );

    // Remove: every snapshot goes, and with the last one the lazy image, its placeholder
    // trees and the container's overlay.
    ctrd.ctr("ctr", &["image", "rm", "--sync", &reference]);
    let snaps = ctrd.ctr("ctr", &["snapshots", "--snapshotter", "fanfill", "ls"]);
    assert_eq!(
        snaps
            .lines()
            .skip(1)
            .filter(|l| !l.trim().is_empty())
            .count(),
        0,
        "{}",
        fail(&format!("snapshots left:\n{snaps}"))
    );
    assert!(
        entries(&state.join("snapshots/snapshots")).is_empty(),
        "snapshot directories left: {:?}",
        entries(&state.join("snapshots/snapshots"))
    );
    assert!(
        entries(&state.join("roots/containerd")).is_empty(),
        "{}",
        fail(&format!(
            "lazy image trees left: {:?}",
            entries(&state.join("roots/containerd"))
        ))
    );
    assert_eq!(fetched(&daemon).1, 0, "the daemon still serves an image");
    assert_eq!(mounts_under(&state), Vec::<String>::new(), "mounts left");
}
