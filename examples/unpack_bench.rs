//! Placeholder unpack rate: 20,000 entries (200 directories of 99 files, one in ten with a
//! user xattr) unpacked from an in-memory index, in direct and overlay mode, median of 5 runs
//! each, on a loop-mounted ext4 made for the purpose (the root disk of a VM is too noisy).
//!
//! Run as root: `cargo run --release --example unpack_bench [-- FSTYPE]` (ext4 or xfs).

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use fanfill::index::{Entry, EntryKind};
use fanfill::unpack::{Layer, Mode, UnpackOptions, unpack};

fn entry(path: String, kind: EntryKind, mode: u32, size: u64) -> Entry {
    Entry {
        uid: 1,
        gid: 1,
        mtime: 1_600_000_000,
        size,
        ..Entry::new(path, kind, mode)
    }
}

fn main() -> anyhow::Result<()> {
    let fstype = std::env::args().nth(1).unwrap_or_else(|| "ext4".into());
    let mut entries = Vec::new();
    for d in 0..200 {
        entries.push(entry(format!("d{d:03}"), EntryKind::Dir, 0o755, 0));
        for f in 0..99u64 {
            let mut e = entry(
                format!("d{d:03}/f{f:02}"),
                EntryKind::File,
                0o644,
                1000 + f * 4096,
            );
            if f % 10 == 0 {
                e.xattrs = Box::new([("user.x".into(), b"1".to_vec())]);
            }
            entries.push(e);
        }
    }
    let tmp = tempfile::tempdir()?;
    let img = tmp.path().join("fs.img");
    std::fs::File::create(&img)?.set_len(2 << 30)?;
    anyhow::ensure!(
        Command::new(format!("mkfs.{fstype}"))
            .arg("-q")
            .arg(&img)
            .status()?
            .success(),
        "mkfs"
    );
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt)?;
    anyhow::ensure!(
        Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt)
            .status()?
            .success(),
        "mount"
    );
    let result = (|| -> anyhow::Result<()> {
        println!("| mode | entries | median ms | entries/s (median of 5) |");
        println!("|---|---|---|---|");
        for mode in [Mode::Direct, Mode::Overlay] {
            let mut rates = Vec::new();
            let mut times = Vec::new();
            for run in 0..5 {
                let dest = mnt.join(format!("{mode:?}-{run}"));
                std::fs::create_dir(&dest)?;
                let t = Instant::now();
                let out = unpack(
                    &[Layer::new("sha256:bench", &entries)],
                    Path::new(&dest),
                    &UnpackOptions {
                        mode,
                        ..UnpackOptions::default()
                    },
                )?;
                let dt = t.elapsed().as_secs_f64();
                assert_eq!(out.placeholders.len(), 19_800);
                rates.push(entries.len() as f64 / dt);
                times.push(dt * 1e3);
                std::fs::remove_dir_all(&dest)?;
            }
            rates.sort_by(f64::total_cmp);
            times.sort_by(f64::total_cmp);
            println!(
                "| {mode:?} | {} | {:.0} | {:.0} |",
                entries.len(),
                times[2],
                rates[2]
            );
        }
        Ok(())
    })();
    let _ = Command::new("umount").arg(&mnt).status();
    result
}
