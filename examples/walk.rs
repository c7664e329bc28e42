//! First read of a whole tree right after `fanfill pull` returns, through the daemon as a
//! user runs it: the release `fanfill` binary, a local `docker-registry` on loopback
//! (unshaped), an image of this machine's Python library, docs and headers with its index
//! artifact pushed (`fanfill index --push`), trees on a loop-mounted ext4.
//!
//! For each variant (`--no-prefetch`: on demand only; background completion with misses that
//! never wait for the layer stream, `--delivery-wait-ms 0`; the default), and
//! each of `--runs` runs on a fresh tree: time to "ready", then every file read once in path
//! order at once (the workload that walks a tree), then the time until the image is complete
//! (every mark gone). The baseline is the same walk over the completed tree with the page
//! cache dropped (a local disk read). Prints a markdown table of medians.
//!
//! ```sh
//! cargo build --release && cargo run --release --example walk -- --scale 0.3 --runs 3
//! ```
//! `--every N` reads every Nth file only (a sparse start: what background completion costs a
//! workload that reads little). `--baseline-bin PATH` adds the default variant run by another `fanfill` binary (an earlier
//! commit's build) for a before/after in the same run.
//! Needs root, Linux 6.14+, `docker-registry`, `skopeo`, `e2fsprogs`.

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;
#[path = "../tests/support/host_image.rs"]
mod host_image;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fanfill::api::{ImageStatus, Request, Response};
use fanfill::ocibuild::{Compression, write_layout};

fn arg(name: &str, default: f64) -> f64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `--baseline-bin PATH`: another `fanfill` binary (an earlier commit's) whose daemon runs
/// the default variant too, for a before/after in one run.
fn baseline_bin() -> Option<PathBuf> {
    let args: Vec<String> = std::env::args().collect();
    let i = args.iter().position(|a| a == "--baseline-bin")?;
    let p = PathBuf::from(args.get(i + 1).expect("--baseline-bin PATH"));
    assert!(p.exists(), "{} missing", p.display());
    Some(p)
}

fn fanfill_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("fanfill"))
        .expect("target dir");
    assert!(
        bin.exists(),
        "{} missing: cargo build --release",
        bin.display()
    );
    bin
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A loop-mounted ext4 under /var/tmp, unmounted on drop.
struct Scratch {
    _dir: tempfile::TempDir,
    mnt: PathBuf,
}

impl Scratch {
    fn new(mib: u64) -> Scratch {
        let dir = tempfile::tempdir_in("/var/tmp").expect("temp dir");
        let img = dir.path().join("fs.img");
        std::fs::File::create(&img)
            .and_then(|f| f.set_len(mib << 20))
            .expect("image file");
        run(Command::new("mkfs.ext4").arg("-q").arg(&img));
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).expect("mount point");
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt));
        Scratch { _dir: dir, mnt }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().collect())
        .unwrap_or_default();
    entries.sort_by_key(|e| e.path());
    for e in entries {
        match e.file_type() {
            Ok(t) if t.is_dir() => files_under(&e.path(), out),
            Ok(t) if t.is_file() => out.push(e.path()),
            _ => {}
        }
    }
}

/// Reads every `every`th regular file under `dir` once, in path order: (seconds, bytes,
/// files). `every` 1 is the walk of the whole tree; larger, a sparse start (a workload
/// reading a few files scattered over every layer).
fn walk(dir: &Path, every: usize) -> (f64, u64, usize) {
    let mut files = Vec::new();
    files_under(dir, &mut files);
    let files: Vec<PathBuf> = files.into_iter().step_by(every.max(1)).collect();
    let n = files.len();
    let t = Instant::now();
    let mut bytes = 0;
    for f in files {
        bytes += std::fs::read(&f)
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()))
            .len() as u64;
    }
    (t.elapsed().as_secs_f64(), bytes, n)
}

fn status(socket: &Path, dest: &Path) -> ImageStatus {
    full_status(socket, dest).1
}

/// The daemon's misses served so far and, of them, those served by a layer stream they
/// waited for (0 from a daemon too old to count them), and the image's status.
fn full_status(socket: &Path, dest: &Path) -> ((u64, u64), ImageStatus) {
    match fanfill::daemon::call(
        socket,
        &Request::Status {
            dest: Some(dest.to_path_buf()),
        },
    ) {
        Ok(Response::Status { mut images, daemon }) => {
            ((daemon.events, daemon.delivered_waits), images.remove(0))
        }
        r => panic!("status: {r:?}"),
    }
}

/// `fanfill daemon` with its state under `dir`, killed (and its holder stopped) on drop.
struct Daemon {
    child: std::process::Child,
    socket: PathBuf,
    state: PathBuf,
}

impl Daemon {
    fn start(bin: &Path, dir: &Path, allow: &Path, flags: &[&str]) -> Daemon {
        let (state, socket) = (dir.join("state"), dir.join("api.sock"));
        std::fs::create_dir_all(&state).expect("state dir");
        let child = Command::new(bin)
            .arg("daemon")
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(&state)
            .arg("--index-dir")
            .arg(dir.join("indexes"))
            .arg("--allow-root")
            .arg(allow)
            // The index artifact this example pushed is the one to use (the default policy,
            // `local`, would stream every layer whole at the first pull).
            .args(["--index-policy", "referrer"])
            .args(flags)
            .env("FANFILL_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .expect("daemon");
        let up = Instant::now();
        while fanfill::daemon::call(&socket, &Request::Ping).is_err() {
            assert!(
                up.elapsed() < Duration::from_secs(30),
                "daemon did not come up"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Daemon {
            child,
            socket,
            state,
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        fanfill::daemon::holder::terminate(&self.state);
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct Row {
    ready: Vec<f64>,
    walk: Vec<f64>,
    bytes: u64,
    files: usize,
    fetched_by_walk_end: Vec<f64>,
    /// Misses by walk end, and of them those that waited for a layer stream.
    misses: Vec<f64>,
    delivered: Vec<f64>,
    complete: Vec<f64>,
}

fn main() {
    let scale = arg("--scale", 0.3);
    let runs = arg("--runs", 3.0) as usize;
    let every = arg("--every", 1.0) as usize;
    let bin = fanfill_bin();
    let fs = Scratch::new(4096);
    let layout = fs.mnt.join("layout");
    let built =
        write_layout(&layout, "1", &host_image::layers(scale), Compression::Gzip).expect("image");
    let registry = common::TestRegistry::start();
    let host = registry.host();
    common::push_layout(&layout, "1", &host, "walk", &["--dest-tls-verify=false"]);
    let image = format!("docker://{host}/walk:1");
    let index_dir = fs.mnt.join("indexes");
    run(Command::new(&bin)
        .args(["index", "--push", "--tls-verify=false", "--index-dir"])
        .arg(&index_dir)
        .arg(&image)
        .env("FANFILL_LOG", "warn"));
    let mut rows = Vec::new();
    let mut native = Vec::new();
    // (variant, daemon binary, pull flags, daemon flags)
    let mut variants = vec![
        (
            "on demand (`--no-prefetch`)".to_string(),
            bin.clone(),
            &["--no-prefetch"][..],
            &[][..],
        ),
        (
            "background completion, misses never wait for the stream (`--delivery-wait-ms 0`)"
                .to_string(),
            bin.clone(),
            &[][..],
            &["--delivery-wait-ms", "0"][..],
        ),
        (
            "default (background completion)".to_string(),
            bin.clone(),
            &[][..],
            &[][..],
        ),
    ];
    if let Some(base) = baseline_bin() {
        variants.insert(
            1,
            (
                format!("default, baseline binary `{}`", base.display()),
                base,
                &[][..],
                &[][..],
            ),
        );
    }
    for (name, bin, flags, daemon_flags) in variants {
        let mut row = Row {
            ready: Vec::new(),
            walk: Vec::new(),
            bytes: 0,
            files: 0,
            fetched_by_walk_end: Vec::new(),
            misses: Vec::new(),
            delivered: Vec::new(),
            complete: Vec::new(),
        };
        for r in 0..runs {
            // A daemon of its own per run: nothing in its content cache.
            let run_dir = fs.mnt.join(format!("run-{}-{r}", rows.len()));
            let daemon = Daemon::start(&bin, &run_dir, &fs.mnt, daemon_flags);
            let socket = daemon.socket.clone();
            let dest = run_dir.join("root");
            let t = Instant::now();
            run(Command::new(&bin)
                .arg("pull")
                .args(flags)
                .args(["--index-policy", "referrer", "--tls-verify=false"])
                .arg(&image)
                .arg(&dest)
                .env("FANFILL_SOCKET", &socket)
                .env("FANFILL_LOG", "warn"));
            row.ready.push(t.elapsed().as_secs_f64());
            let (secs, bytes, files) = walk(&dest, every);
            row.walk.push(secs);
            (row.bytes, row.files) = (bytes, files);
            let ((misses, delivered), st) = full_status(&socket, &dest);
            row.fetched_by_walk_end.push(st.bytes_fetched as f64);
            row.misses.push(misses as f64);
            row.delivered.push(delivered as f64);
            if flags.is_empty() {
                while status(&socket, &dest).state != "complete" {
                    assert!(t.elapsed() < Duration::from_secs(600), "never completed");
                    std::thread::sleep(Duration::from_millis(20));
                }
                row.complete.push(t.elapsed().as_secs_f64());
                nix::unistd::sync();
                let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
                native.push(walk(&dest, every).0);
            }
            let _ = fanfill::daemon::call(&socket, &Request::Remove { dest });
        }
        rows.push((name, row));
    }
    let mib = |b: u64, s: f64| b as f64 / s / 1048576.0;
    println!(
        "image: {} files read (every {every}th in path order), {:.1} MiB of file data, {:.1} MiB gzip; loopback registry, unshaped; medians of {runs}\n",
        rows[0].1.files,
        rows[0].1.bytes as f64 / 1048576.0,
        built.compressed_size() as f64 / 1048576.0
    );
    println!(
        "| variant | pull to ready s | walk s | walk MiB/s | fetched by walk end MiB | misses by walk end | of them waited for the stream | ready to complete s |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for (name, row) in &rows {
        let w = median(row.walk.clone());
        println!(
            "| {name} | {:.2} | {:.2} | {:.1} | {:.1} | {:.0} | {:.0} | {} |",
            median(row.ready.clone()),
            w,
            mib(row.bytes, w),
            median(row.fetched_by_walk_end.clone()) / 1048576.0,
            median(row.misses.clone()),
            median(row.delivered.clone()),
            if row.complete.is_empty() {
                "never (on demand)".to_string()
            } else {
                format!("{:.2}", median(row.complete.clone()))
            }
        );
    }
    let n = median(native);
    println!(
        "| local disk (the completed tree, page cache dropped) | — | {n:.2} | {:.1} | — | — | — | — |",
        mib(rows[0].1.bytes, n)
    );
}
