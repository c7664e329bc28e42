//! The `fanfill` binary as a user runs it: the README demo, help, and error messages.

mod fsutil;

use std::process::Command;

fn fanfill() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fanfill"))
}

#[test]
fn readme_demo_runs_a_program_from_a_lazily_filled_image() {
    let out = fsutil::within(300, "fanfill demo", || {
        fanfill().arg("demo").output().unwrap()
    });
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("hello from a lazily filled image"),
        "{stdout}"
    );
    // The program's sha256 of a data file equals the real content's digest (blob 7 is the
    // deterministic xorshift stream of the demo image).
    let mut x: u64 = 8u64.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut blob = Vec::with_capacity(1 << 20);
    while blob.len() < 1 << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        blob.extend_from_slice(&x.to_le_bytes());
    }
    let want = fsutil::sha256_hex(&blob);
    assert!(
        stdout.contains(&format!("{want}  /data/blob-07.bin")),
        "{stdout}"
    );
    // Placeholders were ready after reading only manifest and config (index local).
    let ready = stdout
        .lines()
        .find(|l| l.starts_with("placeholders ready"))
        .unwrap();
    let before: u64 = ready
        .split("; ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("bytes before ready");
    assert!(before < 16 << 10, "{ready}");
    // And the run filled only a few percent of the files.
    let ran = stdout.lines().find(|l| l.starts_with("ran in")).unwrap();
    let pct: f64 = ran
        .rsplit(", ")
        .next()
        .and_then(|s| s.trim_end_matches("%)").parse().ok())
        .expect("percent");
    assert!(pct < 10.0, "{ran}");
}

#[test]
fn help_teaches_the_commands() {
    let out = fanfill().arg("--help").output().unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    for cmd in ["pull", "index", "demo"] {
        assert!(s.contains(cmd), "{s}");
    }
    let out = fanfill().args(["pull", "--help"]).output().unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.contains("--tls-verify") && s.contains("--mode") && s.contains("Examples"),
        "{s}"
    );
}

#[test]
fn errors_name_what_is_at_fault() {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("dest");
    let missing = dir.path().join("no-such-layout");
    let out = fanfill()
        .args([
            "pull",
            "--foreground",
            &format!("oci:{}:x", missing.display()),
        ])
        .arg(&dest)
        .env("FANFILL_INDEX_DIR", dir.path().join("ix"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-layout"), "{err}");
    let out = fanfill()
        .args(["pull", "docker://"])
        .arg(&dest)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("docker://"));
}

/// A child process killed and reaped when the test ends, passed or not.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `pull --foreground --record-profile` sees every file the workload reads, in the order it
/// first reads them: while recording nothing is filled ahead of the workload. Before, the
/// start set (`etc/passwd`) and the neighbours a read fills with it (`app/b`, `app/c`, read
/// right after `app/a`) never missed, so a profile recorded that way left them out and the
/// next start fetched them one by one (the python image's profile listed 30 of its 80).
#[test]
fn a_recorded_profile_lists_every_file_the_workload_read() {
    use fanfill::ocibuild::{self, Compression, LayerItem};
    use std::io::BufRead;
    let fs = fsutil::LoopFs::new("ext4", 256);
    let file = |path: &str, seed: u64| LayerItem::file(path, fsutil::pattern(20_000, seed));
    let dir = LayerItem::dir;
    let layer = vec![
        dir("etc"),
        file("etc/passwd", 1),
        file("etc/group", 2),
        dir("app"),
        file("app/a", 3),
        file("app/b", 4),
        file("app/c", 5),
        file("app/unread", 6),
    ];
    let built =
        ocibuild::write_layout(&fs.mnt.join("layout"), "t", &[layer], Compression::Gzip).unwrap();
    let dest = fs.mnt.join("tree");
    let profile = fs.mnt.join("profile.json");
    let mut child = fanfill()
        .args(["pull", "--foreground", "--record-profile"])
        .arg(&profile)
        .arg(built.reference())
        .arg(&dest)
        .env("FANFILL_INDEX_DIR", fs.mnt.join("ix"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let child = Reaped(child);
    let mut lines = std::io::BufReader::new(stdout).lines();
    let ready = fsutil::within(120, "fanfill pull --foreground: ready", move || {
        let ready = lines
            .by_ref()
            .map_while(Result::ok)
            .find(|l| l.starts_with("ready"));
        (ready, lines)
    });
    let (ready, lines) = ready;
    assert!(ready.is_some(), "fanfill pull ended before ready");
    // Let anything that would fill ahead (the start set, background completion) run.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let order = ["app/a", "app/b", "etc/passwd", "app/c"];
    for (seed, rel) in [(3, "app/a"), (4, "app/b"), (1, "etc/passwd"), (5, "app/c")] {
        let path = dest.join(rel);
        let got = fsutil::within(60, rel, move || std::fs::read(path).unwrap());
        assert!(
            got == fsutil::pattern(20_000, seed),
            "{rel}: not the image's bytes"
        );
    }
    let pid = nix::unistd::Pid::from_raw(child.0.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let said = fsutil::within(60, "fanfill pull exits on SIGINT", move || {
        lines.map_while(Result::ok).collect::<Vec<_>>()
    });
    assert!(
        said.iter()
            .any(|l| l.starts_with("access profile: 4 files read")),
        "{said:?}"
    );
    let recorded: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&profile).unwrap()).unwrap();
    assert_eq!(recorded["files"], serde_json::json!(order), "{recorded}");
    drop(child);
}
