//! Measuring: a container run with real runc (time to first output), eager pulls, what a
//! workload reads (strace), reading a whole tree, and the kernel floor of a fill.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fanfill::fill::EngineConfig;
use fanfill::sys::fanotify::{EventReader, FAN_PRE_ACCESS, Group, GroupClass, Response};
use serde_json::{Value, json};

/// Runs a command under `timeout`, failing with its stderr.
pub fn run_cmd(secs: u64, prog: &str, args: &[&str]) -> Result<std::process::Output> {
    let out = Command::new("timeout")
        .args(["-k", "5", &secs.to_string(), prog])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {prog}"))?;
    if !out.status.success() {
        bail!(
            "{prog} {args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// A runc bundle in `dir` with `rootfs` running `/bench/run.sh`.
pub fn bundle(template: &Value, dir: &Path, rootfs: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let mut c = template.clone();
    c["process"]["args"] = json!(["/bin/sh", "/bench/run.sh"]);
    c["process"]["terminal"] = json!(false);
    c["process"]["cwd"] = json!("/");
    c["process"]["env"] = json!([
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME=/root",
        "LANG=C.UTF-8",
        "OPENBLAS_NUM_THREADS=1"
    ]);
    c["root"]["path"] = json!(rootfs);
    c["root"]["readonly"] = json!(false);
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&c)?)?;
    Ok(dir.to_path_buf())
}

/// `runc spec` once.
pub fn runc_template(scratch: &Path) -> Result<Value> {
    let dir = scratch.join("spec-template");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    run_cmd(30, "runc", &["spec", "--bundle", &dir.to_string_lossy()])?;
    Ok(serde_json::from_slice(&std::fs::read(
        dir.join("config.json"),
    )?)?)
}

pub struct RunOutcome {
    /// Since the caller's start instant.
    pub first_output: Duration,
    pub done: Duration,
    pub stdout: String,
    /// What `at_first_output` returned.
    pub at_first: Option<Value>,
}

/// `runc run` of `bundle`; `start` is when the clock started. `at_first_output` runs as soon
/// as the first byte of the container's stdout arrives (to sample counters).
pub fn runc_run(
    bundle: &Path,
    id: &str,
    start: Instant,
    timeout: Duration,
    at_first_output: &mut dyn FnMut() -> Option<Value>,
) -> Result<RunOutcome> {
    crate::cleanup::add_container(id);
    let res = runc_run_inner(bundle, id, start, timeout, at_first_output);
    if res.is_err() {
        let _ = run_cmd(10, "runc", &["kill", id, "KILL"]);
        let _ = run_cmd(10, "runc", &["delete", "-f", id]);
    }
    crate::cleanup::remove_container(id);
    res
}

fn runc_run_inner(
    bundle: &Path,
    id: &str,
    start: Instant,
    timeout: Duration,
    at_first_output: &mut dyn FnMut() -> Option<Value>,
) -> Result<RunOutcome> {
    let mut child = Command::new("runc")
        .arg("run")
        .arg("--bundle")
        .arg(bundle)
        .arg(id)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning runc")?;
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let (tx, rx) = mpsc::channel::<Option<(Instant, Vec<u8>)>>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send(Some((Instant::now(), buf[..n].to_vec()))).is_err() {
                        return;
                    }
                }
            }
        }
        let _ = tx.send(None);
    });
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = start + timeout;
    let mut out = Vec::new();
    let mut first = None;
    let mut at_first = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Some((t, data))) => {
                if first.is_none() {
                    first = Some(t);
                    at_first = at_first_output();
                }
                out.extend(data);
            }
            Ok(None) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                bail!("container {id} did not finish within {timeout:?}");
            }
        }
    }
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("runc {id} did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let done = start.elapsed();
    let err = err_thread.join().unwrap_or_default();
    let stdout = String::from_utf8_lossy(&out).into_owned();
    if !status.success() {
        bail!("runc {id}: {status}: {stdout}{err}");
    }
    let Some(first) = first else {
        bail!("container {id} printed nothing: {err}");
    };
    Ok(RunOutcome {
        first_output: first - start,
        done,
        stdout,
        at_first,
    })
}

/// Regular files of a tree: (relative path, size).
pub fn tree_files(root: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(md) = e.metadata() else { continue };
            if md.is_dir() {
                stack.push(e.path());
            } else if md.is_file() {
                let rel = e
                    .path()
                    .strip_prefix(root)
                    .unwrap_or(&e.path())
                    .to_path_buf();
                out.push((rel, md.len()));
            }
        }
    }
    out.sort();
    out
}

/// Reads every regular file of `root` once (1 MiB reads); returns (bytes, seconds).
pub fn read_tree(root: &Path, files: &[(PathBuf, u64)]) -> Result<(u64, f64)> {
    let mut buf = vec![0u8; 1 << 20];
    let t = Instant::now();
    let mut total = 0u64;
    for (rel, _) in files {
        let mut f = File::open(root.join(rel)).with_context(|| format!("{}", rel.display()))?;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
    }
    Ok((total, t.elapsed().as_secs_f64()))
}

/// Reads every file of several trees file by file, taking turns: file `j` is read from
/// each tree in `active` in turn, the first tree rotating with `j + shift`, and each read
/// (open, read to EOF, close) is timed on its own. Returns per tree (bytes, seconds) summed
/// over its reads (inactive trees: zeros). The trees see the same machine within
/// milliseconds of each other, so drift in the host (CPU steal, the virtual disk's latency)
/// lands on all of them alike instead of on whichever tree was being read when it came.
pub fn read_interleaved(
    roots: &[&Path],
    active: &[bool],
    files: &[(PathBuf, u64)],
    shift: usize,
) -> Result<Vec<(u64, f64)>> {
    let mut buf = vec![0u8; 1 << 20];
    let mut out = vec![(0u64, 0f64); roots.len()];
    let n = roots.len();
    for (j, (rel, _)) in files.iter().enumerate() {
        for k in 0..n {
            let i = (j + shift + k) % n;
            if !active[i] {
                continue;
            }
            let path = roots[i].join(rel);
            let t = Instant::now();
            let mut f = File::open(&path).with_context(|| format!("{}", path.display()))?;
            let mut got = 0u64;
            loop {
                let r = f.read(&mut buf)?;
                if r == 0 {
                    break;
                }
                got += r as u64;
            }
            drop(f);
            out[i].0 += got;
            out[i].1 += t.elapsed().as_secs_f64();
        }
    }
    Ok(out)
}

/// Drops the page cache of every file of the tree (fsync, then `POSIX_FADV_DONTNEED`), so a
/// pass reads from the filesystem again.
pub fn evict_tree(root: &Path, files: &[(PathBuf, u64)]) {
    for (rel, _) in files {
        if let Ok(f) = File::open(root.join(rel)) {
            let _ = f.sync_all();
            let _ = nix::fcntl::posix_fadvise(
                &f,
                0,
                0,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
            );
        }
    }
}

pub fn evict_file(p: &Path) {
    if let Ok(f) = File::open(p) {
        let _ = f.sync_all();
        let _ = nix::fcntl::posix_fadvise(
            &f,
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        );
    }
}

/// What a workload reads, from `strace -f -y` of it in a chroot of the eager tree: files
/// touched, and per file `min(size, Σ read/pread64 results + Σ mmap lengths)` (exec'd files
/// count whole). Only files of the image count (not the workload's own temporaries).
pub struct ReadProfile {
    pub files_touched: u64,
    pub bytes_read: u64,
}

pub fn strace_profile(rootfs: &Path, trace_out: &Path) -> Result<ReadProfile> {
    let image_files: BTreeMap<PathBuf, u64> = tree_files(rootfs)
        .into_iter()
        .map(|(p, s)| (Path::new("/").join(p), s))
        .collect();
    run_cmd(
        600,
        "strace",
        &[
            "-f",
            "-qq",
            "-y",
            "-s",
            "0",
            "-e",
            "trace=chroot,execve,openat,open,read,pread64,mmap",
            "-o",
            &trace_out.to_string_lossy(),
            "env",
            "-i",
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME=/root",
            "LANG=C.UTF-8",
            "OPENBLAS_NUM_THREADS=1",
            "chroot",
            &rootfs.to_string_lossy(),
            "/bin/sh",
            "/bench/run.sh",
        ],
    )?;
    let text = std::fs::read_to_string(trace_out)?;
    let prefix = rootfs.to_string_lossy().into_owned();
    let norm = |p: &str| -> PathBuf {
        let p = p.strip_prefix(prefix.as_str()).unwrap_or(p);
        PathBuf::from(if p.is_empty() { "/" } else { p })
    };
    let fd_path = |s: &str| -> Option<PathBuf> {
        // `3</path/to/file>` as the first argument.
        let open = s.find('<')?;
        let close = s[open..].find('>')? + open;
        Some(norm(&s[open + 1..close]))
    };
    let mut inside = false;
    let mut touched: BTreeSet<PathBuf> = BTreeSet::new();
    let mut bytes: BTreeMap<PathBuf, u64> = BTreeMap::new();
    for line in text.lines() {
        let call = line
            .split_once(' ')
            .map(|x| x.1)
            .unwrap_or(line)
            .trim_start();
        let result = line.rsplit_once(" = ").map(|x| x.1.trim());
        if call.starts_with("chroot(") && result.is_some_and(|r| r.starts_with('0')) {
            inside = true;
            continue;
        }
        if !inside {
            continue;
        }
        let Some(res) = result else { continue };
        if call.starts_with("execve(") && res.starts_with('0') {
            if let Some(p) = call.split('"').nth(1) {
                let p = norm(p);
                let real = std::fs::canonicalize(rootfs.join(p.strip_prefix("/").unwrap_or(&p)))
                    .ok()
                    .and_then(|r| r.strip_prefix(rootfs).ok().map(|x| Path::new("/").join(x)));
                if let Some(r) = real
                    && let Some(size) = image_files.get(&r)
                {
                    touched.insert(r.clone());
                    *bytes.entry(r).or_default() += size;
                }
            }
        } else if call.starts_with("openat(") || call.starts_with("open(") {
            if let Some(p) = fd_path(res) {
                touched.insert(p);
            }
        } else if call.starts_with("read(") || call.starts_with("pread64(") {
            let n: u64 = res
                .split_whitespace()
                .next()
                .and_then(|x| x.parse().ok())
                .unwrap_or(0);
            if let Some(p) = fd_path(call) {
                *bytes.entry(p.clone()).or_default() += n;
                touched.insert(p);
            }
        } else if call.starts_with("mmap(") && !res.starts_with('-') {
            let args: Vec<&str> = call.split(", ").collect();
            if args.len() >= 6
                && let Some(p) = fd_path(args[4])
            {
                let len: u64 = args[1].trim().parse().unwrap_or(0);
                *bytes.entry(p.clone()).or_default() += len;
                touched.insert(p);
            }
        }
    }
    let files_touched = touched
        .iter()
        .filter(|p| image_files.contains_key(*p))
        .count() as u64;
    let bytes_read = bytes
        .iter()
        .filter_map(|(p, b)| image_files.get(p).map(|size| (*b).min(*size)))
        .sum();
    Ok(ReadProfile {
        files_touched,
        bytes_read,
    })
}

/// The kernel floor of one 4 KiB fill (method of `examples/fill_bench.rs`): a bare
/// pre-content handler that writes 4 KiB through the event fd and allows, reading events
/// as the engine does (an [`EventReader`] spinning the engine's default `event_spin`); one
/// reader touches `pages` distinct pages. Returns (p50 µs, p99 µs).
pub fn kernel_floor(dir: &Path, pages: u64) -> Result<(f64, f64)> {
    const PAGE: u64 = 4096;
    let data = Arc::new(vec![0x5au8; PAGE as usize]);
    let group = Arc::new(Group::new(GroupClass::PreContentWritable)?);
    let stop = Arc::new(AtomicBool::new(false));
    let handlers: Vec<_> = (0..1)
        .map(|_| {
            let (g, s, d) = (group.clone(), stop.clone(), data.clone());
            std::thread::spawn(move || {
                let mut reader = EventReader::new(EngineConfig::default().event_spin);
                let mut events = Vec::new();
                while !s.load(Ordering::Relaxed) {
                    if reader.next(&g, &mut events, 50).is_err() {
                        continue;
                    }
                    for ev in events.drain(..) {
                        if let (Some(r), Some(fd)) = (ev.range(), ev.file()) {
                            let _ = nix::sys::uio::pwrite(fd, &d, r.offset as i64);
                        }
                        let _ = g.respond(ev, Response::Allow);
                    }
                }
            })
        })
        .collect();
    let path = dir.join("floor-placeholder");
    File::create(&path)?.set_len(pages * PAGE)?;
    group.mark_inode(File::open(&path)?.as_fd(), FAN_PRE_ACCESS)?;
    // The reader runs on its own thread with a deadline: a lost event must not hang us.
    let p2 = path.clone();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let f = File::open(&p2).expect("open floor file");
        let mut buf = [0u8; PAGE as usize];
        let mut lat = Vec::with_capacity(pages as usize);
        for page in 0..pages {
            let s = Instant::now();
            let _ = f.read_exact_at(&mut buf, page * PAGE);
            lat.push(s.elapsed().as_secs_f64() * 1e6);
        }
        let _ = tx.send(lat);
    });
    let lat = rx.recv_timeout(Duration::from_secs(120));
    stop.store(true, Ordering::Relaxed);
    for h in handlers {
        let _ = h.join();
    }
    let _ = std::fs::remove_file(&path);
    let mut lat = lat.context("floor reader did not finish within 120 s")?;
    lat.sort_by(f64::total_cmp);
    let q = |x: f64| lat[((lat.len() as f64 - 1.0) * x).round() as usize];
    Ok((q(0.5), q(0.99)))
}

pub fn dir_size_on_disk(root: &Path) -> u64 {
    tree_files(root)
        .iter()
        .filter_map(|(p, _)| std::fs::metadata(root.join(p)).ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

/// How the data of the tree's `files` lies on disk (`filefrag -v`): extents in all, files
/// in more than one, and of the consecutive pairs in `files` order (the order a pass reads
/// them), how many start where the previous file ends (what the loop device's readahead of
/// its backing file turns into one sequential read).
pub fn extents(root: &Path, files: &[(PathBuf, u64)]) -> Result<(u64, u64, u64)> {
    let (mut total, mut split, mut adjacent) = (0u64, 0u64, 0u64);
    let mut prev_end: Option<u64> = None;
    for batch in files.chunks(256) {
        let paths: Vec<String> = batch
            .iter()
            .map(|(rel, _)| root.join(rel).to_string_lossy().into_owned())
            .collect();
        let mut args: Vec<&str> = vec!["-v"];
        args.extend(paths.iter().map(String::as_str));
        let out = run_cmd(120, "filefrag", &args)?;
        // Per file: "File size of PATH is ..." then extent rows
        // "   0:        0..      15:      34816..     34831:     16:             last,eof",
        // then "PATH: N extents found".
        let mut first: Option<u64> = None;
        let mut last_end: Option<u64> = None;
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if line.starts_with("File size of ") {
                first = None;
                last_end = None;
            } else if line.ends_with("found") {
                let n = line
                    .rsplit(": ")
                    .next()
                    .and_then(|t| t.split_whitespace().next())
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0);
                total += n;
                split += u64::from(n > 1);
                if let (Some(f), Some(p)) = (first, prev_end) {
                    adjacent += u64::from(f == p);
                }
                if last_end.is_some() {
                    prev_end = last_end;
                }
            } else {
                let cols: Vec<&str> = line.split(':').map(str::trim).collect();
                if cols.len() >= 4 && cols[0].parse::<u64>().is_ok() {
                    let phys: Vec<u64> = cols[2]
                        .split("..")
                        .filter_map(|x| x.trim().parse().ok())
                        .collect();
                    if phys.len() == 2 {
                        first.get_or_insert(phys[0]);
                        last_end = Some(phys[1] + 1);
                    }
                }
            }
        }
    }
    Ok((total, split, adjacent))
}
