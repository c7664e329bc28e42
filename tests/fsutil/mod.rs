//! Helpers for kernel tests: bounded waits, scratch filesystems, deterministic data.
#![allow(dead_code)]

pub mod daemonproc;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

/// Runs `f` on its own thread and panics if it does not finish within `secs`: every test
/// step that can block in the kernel goes through this.
pub fn within<T: Send + 'static>(
    secs: u64,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(v) => v,
        Err(_) => panic!("{what}: no answer within {secs}s (reader blocked in the kernel?)"),
    }
}

/// Deterministic pseudo-random bytes (xorshift), incompressible enough for tests.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
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

/// Creates a sparse placeholder of `size` bytes at `path`.
pub fn make_placeholder(path: &Path, size: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
}

/// A loop-mounted scratch filesystem under a temp dir, unmounted on drop.
pub struct LoopFs {
    _dir: tempfile::TempDir,
    pub mnt: PathBuf,
}

impl LoopFs {
    /// Makes and mounts a filesystem of type `fstype` ("ext4" or "xfs") of `mib` MiB.
    pub fn new(fstype: &str, mib: u64) -> LoopFs {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("fs.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(mib << 20)
            .unwrap();
        let mkfs = format!("mkfs.{fstype}");
        let st = Command::new(&mkfs)
            .arg("-q")
            .arg(&img)
            .status()
            .expect(&mkfs);
        assert!(st.success(), "{mkfs} failed");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let st = Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt)
            .status()
            .unwrap();
        assert!(st.success(), "mount -o loop {} failed", img.display());
        LoopFs { _dir: dir, mnt }
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}

/// Number of inode marks the group holding fd `fd` (in this process) has.
pub fn marks_of_group(fd: i32) -> usize {
    std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("fanotify ino:"))
        .count()
}

/// sha256 hex of a byte slice.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// An overlayfs mount of `lowerdir` (an escaped `lowerdir=` value) with upper, work and
/// merged directories made under `base`; unmounted on drop.
pub struct OverlayMount {
    pub merged: PathBuf,
    pub upper: PathBuf,
}

impl OverlayMount {
    pub fn new(lowerdir: &str, base: &Path) -> OverlayMount {
        let (upper, work, merged) = (base.join("upper"), base.join("work"), base.join("merged"));
        for d in [&upper, &work, &merged] {
            std::fs::create_dir_all(d).unwrap();
        }
        let options = format!(
            "lowerdir={lowerdir},upperdir={},workdir={}",
            upper.display(),
            work.display()
        );
        let st = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o", &options])
            .arg(&merged)
            .status()
            .unwrap();
        assert!(st.success(), "mount -t overlay -o {options}");
        OverlayMount { merged, upper }
    }
}

impl Drop for OverlayMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.merged).status();
    }
}
