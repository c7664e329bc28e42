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
