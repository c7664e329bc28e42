//! Placeholders end to end, as the daemon makes them: `image::prepare` of a generated image
//! (an OCI layout of FILES regular files, default 50,000, in directories of 100 with one
//! symlink and one hardlink each, one file in ten with a user xattr, over two layers) into
//! a loop-mounted filesystem made for the purpose, with the real [`Engine`] registering
//! every placeholder and its inode mark. Prints the time of each step (indexes loaded from
//! the local index store, unpack, registration with marks) and objects/s, median of RUNS
//! (default 5) runs, each into a fresh directory with a fresh engine.
//!
//! With `--memory`, prepares one tree of the image and then a second tree of the same image
//! in a child process holding the engine, and reports its VmRSS/VmHWM and the kernel's
//! mark memory (slab objects of `fanotify_mark` and `fsnotify_mark_connector`) before and
//! after each (default 200,000 files: raise `fs.fanotify.max_user_marks` for two trees, or
//! pass `--second-overlay`).
//!
//! With `--daemon`, the same is measured on the real `fanfill daemon` binary (built beside
//! this example: `cargo build --release --examples --bins`) driven over its API: the time
//! of each `Prepare` request as the client sees it and as the daemon logs it, and the
//! daemon's CPU time; with `--memory`, the daemon process's VmRSS (a fresh daemon, after a
//! first one stored the indexes).
//!
//! Run as root: `cargo run --release --example placeholder_bench -- [--fs ext4|xfs]
//! [--files N] [--runs N] [--memory] [--second-overlay] [--daemon]`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context as _;
use fanfill::fill::{Engine, EngineConfig};
use fanfill::image::{self, PrepareOptions, Prepared};
use fanfill::ocibuild::{self, Compression, LayerItem};
use fanfill::unpack::Mode;

struct Args {
    fs: String,
    files: usize,
    runs: usize,
    memory: bool,
    second_overlay: bool,
    daemon: bool,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        fs: "ext4".into(),
        files: 0,
        runs: 5,
        memory: false,
        second_overlay: false,
        daemon: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--fs" => a.fs = it.next().context("--fs")?,
            "--files" => a.files = it.next().context("--files")?.parse()?,
            "--runs" => a.runs = it.next().context("--runs")?.parse()?,
            "--memory" => a.memory = true,
            "--second-overlay" => a.second_overlay = true,
            "--daemon" => a.daemon = true,
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    if a.files == 0 {
        a.files = if a.memory { 200_000 } else { 50_000 };
    }
    Ok(a)
}

/// Objects of the generated image: (files, dirs, symlinks, hardlinks).
fn counts(files: usize) -> (usize, usize, usize, usize) {
    let dirs = files.div_ceil(100);
    (files, dirs, dirs, dirs)
}

/// The image's two layers: directories 0..half in the lower one, the rest in the upper one.
fn layers(files: usize) -> Vec<Vec<LayerItem>> {
    let dirs = files.div_ceil(100);
    let mut out = vec![Vec::new(), Vec::new()];
    let mut n = 0usize;
    for d in 0..dirs {
        let layer = &mut out[usize::from(d >= dirs / 2)];
        let dir = format!("usr/d{d:05}");
        layer.push(LayerItem::Dir {
            path: dir.clone(),
            mode: 0o755,
        });
        for f in 0..100 {
            if n == files {
                break;
            }
            n += 1;
            let path = format!("{dir}/file{f:03}.so");
            // 1..=200 bytes: every file is a placeholder, the tar stays small.
            let data: Vec<u8> = (0..1 + (n * 7919) % 200)
                .map(|i| (i * 31 + n) as u8)
                .collect();
            if f % 10 == 0 {
                layer.push(LayerItem::FileXattrs {
                    path,
                    mode: 0o644,
                    data,
                    xattrs: vec![("user.bench".into(), b"1".to_vec())],
                });
            } else {
                layer.push(LayerItem::File {
                    path,
                    mode: if f % 3 == 0 { 0o755 } else { 0o644 },
                    data,
                });
            }
        }
        layer.push(LayerItem::Symlink {
            path: format!("{dir}/link"),
            target: "file000.so".into(),
        });
        layer.push(LayerItem::Hardlink {
            path: format!("{dir}/hard"),
            target: format!("{dir}/file001.so"),
        });
    }
    out
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let st = cmd.status().with_context(|| format!("{cmd:?}"))?;
    anyhow::ensure!(st.success(), "{cmd:?}: {st}");
    Ok(())
}

/// A loop-mounted filesystem of `fstype` under `dir`; unmounted on drop.
struct LoopFs {
    mnt: PathBuf,
}

impl LoopFs {
    fn new(dir: &Path, fstype: &str, size: u64) -> anyhow::Result<LoopFs> {
        let img = dir.join(format!("{fstype}.img"));
        std::fs::File::create(&img)?.set_len(size)?;
        let mut mkfs = Command::new(format!("mkfs.{fstype}"));
        mkfs.arg("-q");
        if fstype == "ext4" {
            // Enough inodes for two trees of a large image.
            mkfs.args(["-i", "8192"]);
        }
        run(mkfs.arg(&img))?;
        let mnt = dir.join(format!("mnt-{fstype}"));
        std::fs::create_dir(&mnt)?;
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt))?;
        Ok(LoopFs { mnt })
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn prepare_into(
    rt: &tokio::runtime::Runtime,
    engine: &Engine,
    reference: &str,
    dest: &Path,
    opts: &PrepareOptions,
) -> anyhow::Result<Prepared> {
    std::fs::create_dir_all(dest)?;
    Ok(rt.block_on(image::prepare(engine, reference, dest, opts))?)
}

fn main() -> anyhow::Result<()> {
    if std::env::args().nth(1).as_deref() == Some("--child-memory") {
        return child_memory();
    }
    let a = args()?;
    let tmp = tempfile::tempdir()?;
    let (files, dirs, symlinks, hardlinks) = counts(a.files);
    let objects = files + dirs + symlinks + hardlinks;
    let t = std::time::Instant::now();
    let built = ocibuild::write_layout(
        &tmp.path().join("layout"),
        "bench",
        &layers(a.files),
        Compression::Gzip,
    )?;
    eprintln!(
        "image: {files} files, {dirs} directories, {symlinks} symlinks, {hardlinks} hardlinks \
         in 2 layers ({} bytes compressed), built in {:.1} s",
        built.compressed_size(),
        t.elapsed().as_secs_f64()
    );
    let fs = LoopFs::new(tmp.path(), &a.fs, 8 << 30)?;
    if a.daemon {
        return daemon::bench(&a, &built.reference(), tmp.path(), &fs.mnt, files, objects);
    }
    let opts = PrepareOptions::new(tmp.path().join("state/indexes"));
    let rt = tokio::runtime::Runtime::new()?;
    let reference = built.reference();
    // The first prepare streams the layers and stores their indexes; the measured ones load
    // them from the local index store, as every prepare of an image already pulled does.
    {
        let engine = Engine::start(EngineConfig::default())?;
        let p = prepare_into(&rt, &engine, &reference, &fs.mnt.join("warm"), &opts)?;
        anyhow::ensure!(p.files.len() == files, "{} placeholders", p.files.len());
        drop(engine);
        std::fs::remove_dir_all(fs.mnt.join("warm"))?;
    }
    if a.memory {
        return memory(&a, &reference, &opts, &fs.mnt, files);
    }
    let mut steps: [Vec<Duration>; 4] = Default::default();
    let mut cpus = Vec::new();
    for i in 0..a.runs {
        run(&mut Command::new("sync"))?;
        let engine = Engine::start(EngineConfig::default())?;
        let dest = fs.mnt.join(format!("run{i}"));
        let cpu0 = cpu();
        let p = prepare_into(&rt, &engine, &reference, &dest, &opts)?;
        let cpu_ms = (cpu() - cpu0) * 1e3;
        cpus.push(Duration::from_secs_f64(cpu_ms / 1e3));
        anyhow::ensure!(p.files.len() == files, "{} placeholders", p.files.len());
        let t = p.timings;
        eprintln!(
            "run {i}: indexes {:.0} ms, unpack {:.0} ms, marks {:.0} ms, total {:.0} ms, cpu {cpu_ms:.0} ms",
            t.indexes.as_secs_f64() * 1e3,
            t.unpack.as_secs_f64() * 1e3,
            t.register.as_secs_f64() * 1e3,
            t.total.as_secs_f64() * 1e3
        );
        for (s, d) in steps
            .iter_mut()
            .zip([t.indexes, t.unpack, t.register, t.total])
        {
            s.push(d);
        }
        drop(p);
        drop(engine);
        std::fs::remove_dir_all(&dest)?;
    }
    println!(
        "placeholders end to end ({}, {files} files, {objects} objects, median of {})",
        a.fs, a.runs
    );
    println!();
    println!(
        "(CPU time of the process during a prepare, user + system, median: {:.0} ms; load: {})",
        median(cpus).as_secs_f64() * 1e3,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    println!();
    println!("| step | median ms | objects/s |");
    println!("|---|---|---|");
    let names = [
        "indexes (local store)",
        "unpack",
        "marks (register)",
        "total",
    ];
    for (name, s) in names.iter().zip(steps) {
        let m = median(s);
        println!(
            "| {name} | {:.0} | {:.0} |",
            m.as_secs_f64() * 1e3,
            objects as f64 / m.as_secs_f64()
        );
    }
    Ok(())
}

/// Runs the memory measurement in a child process (a clean heap), on the indexes stored
/// by the warm-up.
fn memory(
    a: &Args,
    reference: &str,
    opts: &PrepareOptions,
    mnt: &Path,
    files: usize,
) -> anyhow::Result<()> {
    let out = Command::new(std::env::current_exe()?)
        .arg("--child-memory")
        .arg(reference)
        .arg(&opts.index_dir)
        .arg(mnt)
        .arg(if a.second_overlay {
            "overlay"
        } else {
            "direct"
        })
        .arg(files.to_string())
        .stderr(std::process::Stdio::inherit())
        .output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    anyhow::ensure!(out.status.success(), "child: {}", out.status);
    Ok(())
}

/// User + system CPU time of this process so far, seconds.
fn cpu() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = s.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields 14 and 15 (utime, stime), counted from the state field (3).
    (ticks(11) + ticks(12)) / 100.0
}

/// `(VmRSS, VmHWM)` of this process, bytes.
fn vm() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let get = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (get("VmRSS:"), get("VmHWM:"))
}

/// Objects in use and object size of a slab cache (merged caches count their aliases).
fn slab(name: &str) -> (u64, u64) {
    let read = |f: &str| {
        std::fs::read_to_string(format!("/sys/kernel/slab/{name}/{f}"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (read("objects"), read("object_size"))
}

fn child_memory() -> anyhow::Result<()> {
    let argv: Vec<String> = std::env::args().skip(2).collect();
    let [reference, index_dir, mnt, second, files] = argv.as_slice() else {
        anyhow::bail!("--child-memory REF INDEX_DIR MNT MODE FILES");
    };
    let files: u64 = files.parse()?;
    let mnt = PathBuf::from(mnt);
    let mut opts = PrepareOptions::new(index_dir);
    opts.use_artifact = false;
    let rt = tokio::runtime::Runtime::new()?;
    let engine = Engine::start(EngineConfig::default())?;
    let kernel = || {
        let (m, ms) = slab("fanotify_mark");
        let (c, cs) = slab("fsnotify_mark_connector");
        let (i, is) = slab("ext4_inode_cache");
        (m * ms + c * cs, m, c, i * is)
    };
    let row = |what: &str, base: (u64, u64), kbase: (u64, u64, u64, u64)| {
        let (rss, hwm) = vm();
        let (k, m, c, inodes) = kernel();
        println!(
            "| {what} | {:.1} | {:.1} | {:.0} | {:.2} | {:+} marks, {:+} connectors: {:.1} MiB | {:+.1} MiB |",
            rss as f64 / 1048576.0,
            hwm as f64 / 1048576.0,
            (rss as f64 - base.0 as f64) / files as f64,
            (rss as f64 - base.0 as f64) / 1048576.0 / files as f64 * 100_000.0,
            m as i64 - kbase.1 as i64,
            c as i64 - kbase.2 as i64,
            (k as f64 - kbase.0 as f64) / 1048576.0,
            (inodes as f64 - kbase.3 as f64) / 1048576.0,
        );
    };
    let base = vm();
    let kbase = kernel();
    println!("daemon memory holding {files} placeholders (engine + prepared image)");
    println!();
    println!(
        "| state | VmRSS MiB | VmHWM MiB | RSS B/placeholder | RSS MiB per 100k | kernel marks | ext4 inode cache |"
    );
    println!("|---|---|---|---|---|---|---|");
    row("engine started", base, kbase);
    let first = prepare_into(&rt, &engine, reference, &mnt.join("tree1"), &opts)?;
    anyhow::ensure!(first.files.len() as u64 == files);
    row("one tree", base, kbase);
    if second == "overlay" {
        opts.mode = Mode::Overlay;
    }
    let two = prepare_into(&rt, &engine, reference, &mnt.join("tree2"), &opts)?;
    anyhow::ensure!(two.files.len() as u64 == files);
    row(&format!("second tree ({second})"), base, kbase);
    drop((first, two));
    drop(engine);
    Ok(())
}

/// `--daemon`: the same figures from the real `fanfill daemon` over its API.
mod daemon {
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use anyhow::Context as _;
    use fanfill::api::{LayoutMode, RegistrySettings, Request, Response};

    use super::{Args, median, run, slab};

    /// A running `fanfill daemon`, stopped (with its holder) on drop.
    struct Daemon {
        child: Child,
        socket: PathBuf,
        state: PathBuf,
        log: PathBuf,
    }

    impl Daemon {
        fn start(state: &Path, allow: &Path, log: &Path) -> anyhow::Result<Daemon> {
            let exe = std::env::current_exe()?;
            let bin = exe
                .parent()
                .and_then(Path::parent)
                .context("binary directory")?
                .join("fanfill");
            anyhow::ensure!(
                bin.exists(),
                "{} missing: cargo build --release --bins",
                bin.display()
            );
            let socket = state.join("api.sock");
            let child = Command::new(&bin)
                .args(["daemon", "--socket"])
                .arg(&socket)
                .arg("--state-dir")
                .arg(state)
                .arg("--allow-root")
                .arg(allow)
                .env("FANFILL_LOG", "fanfill=info")
                .stdin(Stdio::null())
                .stderr(std::fs::File::create(log)?)
                .stdout(Stdio::null())
                .spawn()?;
            let d = Daemon {
                child,
                socket,
                state: state.to_path_buf(),
                log: log.to_path_buf(),
            };
            let deadline = Instant::now() + Duration::from_secs(30);
            while fanfill::daemon::call(&d.socket, &Request::Ping).is_err() {
                anyhow::ensure!(Instant::now() < deadline, "daemon did not start");
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(d)
        }

        fn call(&self, r: &Request) -> anyhow::Result<Response> {
            Ok(fanfill::daemon::call(&self.socket, r)?)
        }

        /// Prepares `image` into `dest`; returns the number of files served.
        fn prepare(&self, image: &str, dest: &Path, mode: LayoutMode) -> anyhow::Result<u64> {
            match self.call(&Request::Prepare {
                image: image.to_string(),
                dest: dest.to_path_buf(),
                mode,
                registry: RegistrySettings::default(),
                prefetch: false,
            })? {
                Response::Prepared(p) => Ok(p.files),
                other => anyhow::bail!("prepare: {other:?}"),
            }
        }

        fn remove(&self, dest: &Path) -> anyhow::Result<()> {
            match self.call(&Request::Remove {
                dest: dest.to_path_buf(),
            })? {
                Response::Error { .. } => anyhow::bail!("remove {}", dest.display()),
                _ => Ok(()),
            }
        }

        /// `/proc/PID/status` field `key`, bytes.
        fn status(&self, key: &str) -> u64 {
            let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
                .unwrap_or_default();
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
                * 1024
        }

        /// User + system CPU seconds of the daemon so far.
        fn cpu(&self) -> f64 {
            let s = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
                .unwrap_or_default();
            let after = s.rsplit_once(')').map_or("", |(_, r)| r);
            let f: Vec<&str> = after.split_whitespace().collect();
            let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            (ticks(11) + ticks(12)) / 100.0
        }

        /// The `ms=` of the daemon's last "image prepared" log line.
        fn logged_ms(&self) -> Option<u64> {
            let log = std::fs::read_to_string(&self.log).ok()?;
            let line = log.lines().rev().find(|l| l.contains("image prepared"))?;
            let at = line.find("ms=")? + 3;
            line[at..]
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        }
    }

    impl Drop for Daemon {
        fn drop(&mut self) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = self.child.wait();
            fanfill::daemon::holder::terminate(&self.state);
        }
    }

    pub fn bench(
        a: &Args,
        image: &str,
        tmp: &Path,
        mnt: &Path,
        files: usize,
        objects: usize,
    ) -> anyhow::Result<()> {
        let state = tmp.join("daemon-state");
        std::fs::create_dir_all(&state)?;
        // The first prepare streams the layers and stores their indexes; the measured ones
        // (by a fresh daemon: a clean heap) load them from the local index store.
        {
            let d = Daemon::start(&state, mnt, &tmp.join("warm.log"))?;
            let warm = mnt.join("warm");
            let n = d.prepare(image, &warm, LayoutMode::Direct)?;
            anyhow::ensure!(n == files as u64, "{n} placeholders");
            d.remove(&warm)?;
        }
        let d = Daemon::start(&state, mnt, &tmp.join("daemon.log"))?;
        if a.memory {
            return memory(a, &d, image, mnt, files as u64);
        }
        let (mut client, mut logged, mut cpus) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..a.runs {
            run(&mut Command::new("sync"))?;
            let dest = mnt.join(format!("run{i}"));
            let cpu0 = d.cpu();
            let t = Instant::now();
            let n = d.prepare(image, &dest, LayoutMode::Direct)?;
            let wall = t.elapsed();
            let cpu = Duration::from_secs_f64(d.cpu() - cpu0);
            anyhow::ensure!(n == files as u64, "{n} placeholders");
            let ms = Duration::from_millis(d.logged_ms().unwrap_or(0));
            eprintln!(
                "run {i}: request {:.0} ms, daemon logged {} ms, daemon cpu {:.0} ms",
                wall.as_secs_f64() * 1e3,
                ms.as_millis(),
                cpu.as_secs_f64() * 1e3
            );
            client.push(wall);
            logged.push(ms);
            cpus.push(cpu);
            d.remove(&dest)?;
        }
        println!(
            "fanfill daemon prepare ({}, {files} files, {objects} objects, median of {}; load: {})",
            a.fs,
            a.runs,
            std::fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .trim()
        );
        println!();
        println!("| figure | median ms | objects/s |");
        println!("|---|---|---|");
        for (name, v) in [
            ("Prepare request (client)", client),
            ("image prepared (daemon log)", logged),
            ("daemon CPU, user + system", cpus),
        ] {
            let m = median(v);
            println!(
                "| {name} | {:.0} | {:.0} |",
                m.as_secs_f64() * 1e3,
                objects as f64 / m.as_secs_f64()
            );
        }
        Ok(())
    }

    fn memory(a: &Args, d: &Daemon, image: &str, mnt: &Path, files: u64) -> anyhow::Result<()> {
        let kernel = || {
            let (m, ms) = slab("fanotify_mark");
            let (c, cs) = slab("fsnotify_mark_connector");
            (m * ms + c * cs, m, c)
        };
        let base = d.status("VmRSS:");
        let kbase = kernel();
        let row = |what: &str| {
            // Settled: the daemon gives the prepare's freed heap back right after it answers.
            std::thread::sleep(Duration::from_secs(2));
            let rss = d.status("VmRSS:");
            let hwm = d.status("VmHWM:");
            let (k, m, c) = kernel();
            println!(
                "| {what} | {:.1} | {:.1} | {:.0} | {:.1} | {:+} marks, {:+} connectors: {:.1} MiB |",
                rss as f64 / 1048576.0,
                hwm as f64 / 1048576.0,
                (rss as f64 - base as f64) / files as f64,
                (rss as f64 - base as f64) / 1048576.0 / files as f64 * 100_000.0,
                m as i64 - kbase.1 as i64,
                c as i64 - kbase.2 as i64,
                (k as f64 - kbase.0 as f64) / 1048576.0,
            );
        };
        println!("fanfill daemon memory holding {files} placeholders per tree");
        println!();
        println!(
            "| state | VmRSS MiB | VmHWM MiB | RSS B/placeholder | RSS MiB per 100k | kernel marks |"
        );
        println!("|---|---|---|---|---|---|");
        row("daemon started");
        let n = d.prepare(image, &mnt.join("tree1"), LayoutMode::Direct)?;
        anyhow::ensure!(n == files, "{n} placeholders");
        row("one tree");
        let mode = if a.second_overlay {
            LayoutMode::Overlay
        } else {
            LayoutMode::Direct
        };
        let n = d.prepare(image, &mnt.join("tree2"), mode)?;
        anyhow::ensure!(n == files, "{n} placeholders");
        row(&format!("second tree ({mode:?})"));
        d.remove(&mnt.join("tree1"))?;
        d.remove(&mnt.join("tree2"))?;
        Ok(())
    }
}
