//! The layers of the end-to-end container images (`tests/runc.rs`,
//! `tests/snapshotter.rs`): a base layer with busybox, a dynamically linked `sha256sum`,
//! ld.so and libc from this machine, and a data layer (files of 3 MiB, 200 kB and an
//! unread 20+ MiB one, twenty small notes, and `data/gone` for an upper layer to white
//! out).
#![allow(dead_code)]

use fanfill::ocibuild::LayerItem;

use crate::fsutil::pattern;

/// A directory item, mode 0755.
pub fn dir(path: &str) -> LayerItem {
    LayerItem::dir(path)
}

/// The base and data layers (lowest first); `unread_mib` sizes `data/unread`.
pub fn base_and_data(unread_mib: usize) -> (Vec<LayerItem>, Vec<LayerItem>) {
    let host = |path: &str, host: &str| LayerItem::HostFile {
        path: path.into(),
        host: std::fs::canonicalize(host).unwrap(),
    };
    let base = vec![
        dir("bin"),
        dir("lib64"),
        dir("lib"),
        dir("lib/x86_64-linux-gnu"),
        dir("usr"),
        dir("usr/bin"),
        dir("proc"),
        dir("dev"),
        dir("sys"),
        host("bin/busybox", "/bin/busybox"),
        LayerItem::Symlink {
            path: "bin/sh".into(),
            target: "busybox".into(),
        },
        LayerItem::Symlink {
            path: "bin/test".into(),
            target: "busybox".into(),
        },
        LayerItem::Symlink {
            path: "bin/echo".into(),
            target: "busybox".into(),
        },
        host("lib64/ld-linux-x86-64.so.2", "/lib64/ld-linux-x86-64.so.2"),
        host(
            "lib/x86_64-linux-gnu/libc.so.6",
            "/lib/x86_64-linux-gnu/libc.so.6",
        ),
        host("usr/bin/sha256sum", "/usr/bin/sha256sum"),
    ];
    let mut data = vec![
        dir("data"),
        dir("data/notes"),
        LayerItem::File {
            path: "data/a".into(),
            mode: 0o644,
            data: pattern(3 << 20, 31),
        },
        LayerItem::File {
            path: "data/b".into(),
            mode: 0o600,
            data: pattern(200_000, 32),
        },
        LayerItem::File {
            path: "data/unread".into(),
            mode: 0o644,
            data: pattern(unread_mib << 20, 33),
        },
        LayerItem::File {
            path: "data/gone".into(),
            mode: 0o644,
            data: b"x".to_vec(),
        },
    ];
    for i in 0..20 {
        data.push(LayerItem::File {
            path: format!("data/notes/n{i}.txt"),
            mode: 0o644,
            data: format!("note {i}\n").repeat(100).into_bytes(),
        });
    }
    (base, data)
}
