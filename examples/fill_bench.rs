//! Fill-path benchmark on the real kernel (root, Linux 6.14+). Prints a markdown table:
//!
//! - first-touch latency of a 4 KiB miss (content already in memory) through the engine,
//!   beside the kernel floor measured in the same run: a bare handler on the same group
//!   type that writes 4 KiB through the event fd and allows, with no engine;
//! - events/s with 1 and 8 concurrent readers (engine and floor);
//! - sequential read throughput of a completed file (mark removed) vs a plain file of the
//!   same size on the same filesystem, median of 7 runs each.
//!
//! Run: `cargo run --release --example fill_bench [-- DIR]` (DIR: a directory on ext4, xfs or
//! btrfs; default a temp dir; only inode marks are used).

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use fanfill::fill::{ContentSource, Engine, EngineConfig, Placeholder, SourceError, Verify};
use fanfill::sys::fanotify::{FAN_PRE_ACCESS, Group, GroupClass, Response};
use futures::FutureExt;
use futures::future::BoxFuture;

const PAGE: u64 = 4096;

struct Mem(Arc<Vec<u8>>);

impl ContentSource for Mem {
    fn read_at(
        &self,
        _file: u32,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'_, Result<Vec<u8>, SourceError>> {
        let v = self.0[offset as usize..(offset + len) as usize].to_vec();
        async move { Ok(v) }.boxed()
    }
}

fn placeholder(path: &Path, size: u64) -> anyhow::Result<()> {
    File::create(path)?.set_len(size)?;
    Ok(())
}

/// `readers` threads each read distinct 4 KiB pages of `path` (every page once); returns
/// per-read latencies and the wall time.
fn touch_pages(path: &Path, pages: u64, readers: u64) -> (Vec<Duration>, Duration) {
    let t = Instant::now();
    let handles: Vec<_> = (0..readers)
        .map(|r| {
            let p = path.to_path_buf();
            std::thread::spawn(move || {
                let f = File::open(&p).unwrap();
                let mut buf = [0u8; PAGE as usize];
                let mut lat = Vec::new();
                let mut page = r;
                while page < pages {
                    let s = Instant::now();
                    f.read_exact_at(&mut buf, page * PAGE).unwrap();
                    lat.push(s.elapsed());
                    page += readers;
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.join().unwrap());
    }
    (all, t.elapsed())
}

fn pct(v: &mut [Duration], q: f64) -> f64 {
    v.sort();
    v[((v.len() as f64 - 1.0) * q).round() as usize].as_secs_f64() * 1e6
}

/// The floor: a bare pre-content handler (poll, read events, pwrite 4 KiB, allow).
fn floor_handler(group: Arc<Group>, stop: Arc<AtomicBool>, data: Arc<Vec<u8>>) {
    let mut buf = vec![0u8; 64 << 10];
    let mut events = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let mut fds = [nix::poll::PollFd::new(
            group.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(50u16));
        if group.read_events(&mut buf, &mut events).is_err() {
            continue;
        }
        for ev in events.drain(..) {
            if let (Some(r), Some(fd)) = (ev.range(), ev.clone_file().ok().flatten()) {
                let f = File::from(fd);
                let end = (r.offset + r.count.max(PAGE)).min(data.len() as u64);
                if r.offset < end {
                    let _ = f.write_all_at(&data[r.offset as usize..end as usize], r.offset);
                }
            }
            let _ = group.respond(ev, Response::Allow);
        }
    }
}

fn main() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir: PathBuf = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| tmp.path().to_path_buf());
    let pages = 20_000u64;
    let size = pages * PAGE;
    let data = Arc::new((0..size).map(|i| (i % 253) as u8).collect::<Vec<u8>>());
    let mut rows = Vec::new();

    for readers in [1u64, 8] {
        // Floor.
        let group = Arc::new(Group::new(GroupClass::PreContentWritable)?);
        let stop = Arc::new(AtomicBool::new(false));
        let handlers: Vec<_> = (0..2)
            .map(|_| {
                let (g, s, d) = (group.clone(), stop.clone(), data.clone());
                std::thread::spawn(move || floor_handler(g, s, d))
            })
            .collect();
        let fp = dir.join(format!("floor-{readers}"));
        placeholder(&fp, size)?;
        group.mark_inode(File::open(&fp)?.as_fd(), FAN_PRE_ACCESS)?;
        let (mut flat, fwall) = touch_pages(&fp, pages, readers);
        stop.store(true, Ordering::Relaxed);
        handlers.into_iter().for_each(|h| h.join().unwrap());

        // Engine: 4 KiB chunks so each miss fills exactly one page, like the floor.
        let engine = Engine::start(EngineConfig {
            chunk_size: PAGE,
            whole_file_max: 0,
            ..EngineConfig::default()
        })?;
        let ep = dir.join(format!("engine-{readers}"));
        placeholder(&ep, size)?;
        engine.register(Placeholder {
            path: ep.clone().into(),
            size,
            source: Arc::new(Mem(data.clone())),
            file: 0,
            verify: Verify::None,
        })?;
        let (mut elat, ewall) = touch_pages(&ep, pages, readers);
        engine.shutdown();
        rows.push(format!(
            "| 4 KiB miss, {readers} reader(s) | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} | {:.0} | {:.2}x |",
            pct(&mut flat, 0.5),
            pct(&mut flat, 0.99),
            pct(&mut elat, 0.5),
            pct(&mut elat, 0.99),
            pages as f64 / fwall.as_secs_f64(),
            pages as f64 / ewall.as_secs_f64(),
            pct(&mut elat, 0.5) / pct(&mut flat, 0.5),
        ));
    }

    // Completed file vs plain file.
    let big = 256u64 << 20;
    let bdata = Arc::new((0..big).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    let engine = Engine::start(EngineConfig::default())?;
    let filled = dir.join("completed");
    placeholder(&filled, big)?;
    let id = engine.register(Placeholder {
        path: filled.clone().into(),
        size: big,
        source: Arc::new(Mem(bdata.clone())),
        file: 0,
        verify: Verify::None,
    })?;
    engine.fill_file(id)?;
    assert!(engine.is_complete(id));
    let plain = dir.join("plain");
    std::fs::write(&plain, &*bdata)?;
    let read_mibs = |p: &Path| -> anyhow::Result<f64> {
        let f = File::open(p)?;
        let mut buf = vec![0u8; 1 << 20];
        let t = Instant::now();
        let mut off = 0;
        while off < big {
            let n = f.read_at(&mut buf, off)?;
            off += n as u64;
        }
        Ok(big as f64 / 1048576.0 / t.elapsed().as_secs_f64())
    };
    // Straight after filling, the completed file's page cache is made of the fill's 256 KiB
    // writes (smaller folios than one streaming write makes), which alone costs a few
    // percent of memcpy-bound throughput. Measure that, then the steady state: both files
    // written back and evicted, re-read once (readahead builds the page cache the same way
    // for both), then timed.
    let hot = read_mibs(&filled)? / read_mibs(&plain)?;
    for p in [&filled, &plain] {
        let f = File::open(p)?;
        f.sync_all()?;
        nix::fcntl::posix_fadvise(
            &f,
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )?;
    }
    let (mut a, mut b) = (Vec::new(), Vec::new());
    read_mibs(&filled)?;
    read_mibs(&plain)?;
    // Alternate which file goes first, so neither always runs on a colder CPU cache.
    for i in 0..7 {
        if i % 2 == 0 {
            a.push(read_mibs(&filled)?);
            b.push(read_mibs(&plain)?);
        } else {
            b.push(read_mibs(&plain)?);
            a.push(read_mibs(&filled)?);
        }
    }
    a.sort_by(f64::total_cmp);
    b.sort_by(f64::total_cmp);
    engine.shutdown();

    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    println!(
        "fill_bench on Linux {kernel}, {} CPUs, dir {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        dir.display()
    );
    println!();
    println!(
        "| case | floor p50 µs | floor p99 µs | engine p50 µs | engine p99 µs | floor events/s | engine events/s | p50 engine/floor |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
    println!();
    println!(
        "| 256 MiB sequential read, 1 MiB buffers, page cache warm | median MiB/s | min | max |"
    );
    println!("|---|---|---|---|");
    println!(
        "| completed placeholder (mark removed) | {:.0} | {:.0} | {:.0} |",
        a[3], a[0], a[6]
    );
    println!(
        "| plain file, same filesystem | {:.0} | {:.0} | {:.0} |",
        b[3], b[0], b[6]
    );
    println!("| ratio completed/plain | {:.3} | | |", a[3] / b[3]);
    println!("| ratio straight after filling, before eviction (one run) | {hot:.3} | | |");
    Ok(())
}
