//! The daemon's background prefetch, end to end: prepare an image through `fanfill daemon`
//! with prefetch on, wait until it is complete, check that no fanotify mark remains (the
//! `fanotify ino:` lines of the holder's group fd in `/proc/PID/fdinfo`), then compare a
//! sequential read of every file of the prepared tree with the same read of a plain copy
//! of it (`cp -a` on the same filesystem), cold (page cache dropped) and warm.
//!
//! ```sh
//! cargo build --release && cargo run --release --example daemon_prefetch
//! ```
//! Needs root and Linux 6.14+; works in /var/tmp (inode marks only). Prints a markdown table.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fanfill::api::{LayoutMode, RegistrySettings, Request, Response};
use fanfill::ocibuild::{Compression, LayerItem, write_layout};

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().flatten().collect();
    entries.sort_by_key(|e| e.path());
    for e in entries {
        let t = e.file_type().unwrap();
        if t.is_dir() {
            files_under(&e.path(), out);
        } else if t.is_file() {
            out.push(e.path());
        }
    }
}

fn drop_caches() {
    nix::unistd::sync();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

/// Reads every file once, in path order; returns bytes per second.
fn read_tree(dir: &Path) -> (f64, u64) {
    let mut files = Vec::new();
    files_under(dir, &mut files);
    let mut buf = vec![0u8; 1 << 20];
    let t = Instant::now();
    let mut total = 0u64;
    for f in files {
        let mut f = std::fs::File::open(f).unwrap();
        loop {
            let n = f.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            total += n as u64;
        }
    }
    (total as f64 / t.elapsed().as_secs_f64(), total)
}

fn holder_marks(state: &Path) -> usize {
    let pid = std::fs::read_to_string(state.join("holder.pid")).unwrap();
    let pid = pid.trim();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        if std::fs::read_link(e.path()).is_ok_and(|l| l.as_os_str() == "anon_inode:[fanotify]") {
            let fd = e.file_name();
            let info =
                std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", fd.to_string_lossy()))
                    .unwrap();
            return info
                .lines()
                .filter(|l| l.starts_with("fanotify ino:"))
                .count();
        }
    }
    panic!("no fanotify group in the holder {pid}");
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("fanfill");
    assert!(
        bin.exists(),
        "{} missing: run `cargo build --release` first",
        bin.display()
    );
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let (state, dest, plain) = (
        tmp.path().join("state"),
        tmp.path().join("root"),
        tmp.path().join("plain"),
    );
    // ~80 MiB: 600 small files of 16-64 KiB and 24 files of 2 MiB, in two layers.
    let mut small = vec![LayerItem::Dir {
        path: "small".into(),
        mode: 0o755,
    }];
    for i in 0..600u64 {
        small.push(LayerItem::File {
            path: format!("small/f{i:04}"),
            mode: 0o644,
            data: pattern(16384 + (i as usize % 4) * 16384, i),
        });
    }
    let mut big = vec![LayerItem::Dir {
        path: "big".into(),
        mode: 0o755,
    }];
    for i in 0..24u64 {
        big.push(LayerItem::File {
            path: format!("big/b{i:02}"),
            mode: 0o644,
            data: pattern(2 << 20, 1000 + i),
        });
    }
    let built = write_layout(
        &tmp.path().join("image"),
        "1",
        &[small, big],
        Compression::Gzip,
    )
    .unwrap();
    let socket = state.join("api.sock");
    let mut daemon = Command::new(&bin)
        .args(["daemon", "--prefetch-parallel", "4", "--socket"])
        .arg(&socket)
        .arg("--state-dir")
        .arg(&state)
        .env("FANFILL_LOG", "fanfill=warn")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while fanfill::daemon::call(&socket, &Request::Ping).is_err() {
        assert!(Instant::now() < deadline, "daemon did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let t = Instant::now();
    let r = fanfill::daemon::call(
        &socket,
        &Request::Prepare {
            image: built.reference(),
            dest: dest.clone(),
            mode: LayoutMode::Direct,
            registry: RegistrySettings::default(),
            prefetch: true,
        },
    )
    .unwrap();
    let Response::Prepared(p) = r else {
        panic!("{r:?}")
    };
    let ready = t.elapsed();
    let marks_at_ready = holder_marks(&state);
    let total = loop {
        let Response::Status { images, .. } =
            fanfill::daemon::call(&socket, &Request::Status { dest: None }).unwrap()
        else {
            panic!()
        };
        if images[0].state == "complete" {
            break images[0].bytes_total;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let complete = t.elapsed();
    let marks_after = holder_marks(&state);
    let st = Command::new("cp")
        .arg("-a")
        .arg(&dest)
        .arg(&plain)
        .status()
        .unwrap();
    assert!(st.success());
    let (mut cold_p, mut cold_c, mut warm_p, mut warm_c) = (vec![], vec![], vec![], vec![]);
    for i in 0..5 {
        // Alternate which tree goes first, so drift of the disk does not favour one.
        for prepared_first in [i % 2 == 0, i % 2 != 0] {
            drop_caches();
            if prepared_first {
                cold_p.push(read_tree(&dest).0);
            } else {
                cold_c.push(read_tree(&plain).0);
            }
        }
    }
    // Warm: both trees in the page cache, alternating.
    read_tree(&dest);
    read_tree(&plain);
    for _ in 0..5 {
        warm_p.push(read_tree(&dest).0);
        warm_c.push(read_tree(&plain).0);
    }
    let mib = |b: f64| b / 1_048_576.0;
    println!("| figure | value |\n|---|---|");
    println!(
        "| image | {} files, {:.1} MiB |",
        p.files,
        mib(total as f64)
    );
    println!(
        "| placeholders ready | {} ms ({} marks) |",
        ready.as_millis(),
        marks_at_ready
    );
    println!(
        "| prefetch complete | {} ms ({:.0} MiB/s) |",
        complete.as_millis(),
        mib(total as f64) / complete.as_secs_f64()
    );
    println!("| fanotify marks left after prefetch | {marks_after} |");
    let (cp, cc, wp, wc) = (
        median(cold_p),
        median(cold_c),
        median(warm_p),
        median(warm_c),
    );
    println!(
        "| sequential read, cold cache: prepared / plain copy | {:.0} / {:.0} MiB/s = {:.3}x |",
        mib(cp),
        mib(cc),
        cp / cc
    );
    println!(
        "| sequential read, warm cache: prepared / plain copy | {:.0} / {:.0} MiB/s = {:.3}x |",
        mib(wp),
        mib(wc),
        wp / wc
    );
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = daemon.wait();
    fanfill::daemon::holder::terminate(&state);
}
