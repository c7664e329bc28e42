//! Fill-path benchmark on the real kernel (root, Linux 6.14+). Prints a markdown table:
//!
//! - first-touch latency of a 4 KiB miss (content already in memory) through the engine,
//!   beside the kernel floor measured in the same run: a bare handler on the same group
//!   type that writes 4 KiB through the event fd and allows, with no engine. Both are
//!   measured sleeping between events and spinning after them (`EventReader`, the
//!   engine's `event_spin`): on a VM, waking a halted CPU for each event costs more than
//!   the fill, so the two differ by about 30 µs. The floor is shown with two sleeping
//!   threads too (the first floor this benchmark had; its second thread, woken for
//!   nothing by each event, keeps a CPU awake). The ratio is to the fastest floor;
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
use fanfill::sys::fanotify::{EventReader, FAN_PRE_ACCESS, Group, GroupClass, Response};
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

/// The floor: a bare pre-content handler (read events, pwrite 4 KiB, allow), spinning
/// `spin` after each batch before it sleeps.
fn floor_handler(group: Arc<Group>, stop: Arc<AtomicBool>, data: Arc<Vec<u8>>, spin: Duration) {
    let mut reader = EventReader::new(spin);
    let mut events = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        if reader.next(&group, &mut events, 50).is_err() {
            continue;
        }
        for ev in events.drain(..) {
            // Straight through the event's own fd (no dup, as the engine does).
            if let (Some(r), Some(fd)) = (ev.range(), ev.file()) {
                let end = (r.offset + r.count.max(PAGE)).min(data.len() as u64);
                if r.offset < end {
                    let bytes = &data[r.offset as usize..end as usize];
                    let _ = nix::sys::uio::pwrite(fd, bytes, r.offset as i64);
                }
            }
            let _ = group.respond(ev, Response::Allow);
        }
    }
}

/// One measured case: p50, p99 (µs) and events/s.
struct Case {
    name: String,
    floor: bool,
    p50: f64,
    p99: f64,
    rate: f64,
}

fn measure(name: String, floor: bool, path: &Path, pages: u64, readers: u64) -> Case {
    let (mut lat, wall) = touch_pages(path, pages, readers);
    Case {
        name,
        floor,
        p50: pct(&mut lat, 0.5),
        p99: pct(&mut lat, 0.99),
        rate: pages as f64 / wall.as_secs_f64(),
    }
}

/// The floor with `threads` handler threads, each spinning `spin` after a batch.
fn floor_case(
    dir: &Path,
    data: &Arc<Vec<u8>>,
    readers: u64,
    threads: usize,
    spin: Duration,
) -> anyhow::Result<Case> {
    let pages = data.len() as u64 / PAGE;
    let group = Arc::new(Group::new(GroupClass::PreContentWritable)?);
    let stop = Arc::new(AtomicBool::new(false));
    let handlers: Vec<_> = (0..threads)
        .map(|_| {
            let (g, s, d) = (group.clone(), stop.clone(), data.clone());
            std::thread::spawn(move || floor_handler(g, s, d, spin))
        })
        .collect();
    let fp = dir.join(format!("floor-{readers}-{threads}-{}", spin.as_micros()));
    placeholder(&fp, data.len() as u64)?;
    group.mark_inode(File::open(&fp)?.as_fd(), FAN_PRE_ACCESS)?;
    let what = if spin.is_zero() {
        "sleeping".to_string()
    } else {
        format!("spinning {} µs", spin.as_micros())
    };
    let threads_word = if threads == 1 { "thread" } else { "threads" };
    let case = measure(
        format!("floor, {threads} {threads_word}, {what}"),
        true,
        &fp,
        pages,
        readers,
    );
    stop.store(true, Ordering::Relaxed);
    handlers.into_iter().for_each(|h| h.join().unwrap());
    std::fs::remove_file(&fp)?;
    Ok(case)
}

/// The engine (4 KiB chunks, so each miss fills exactly one page, like the floor).
fn engine_case(
    dir: &Path,
    data: &Arc<Vec<u8>>,
    readers: u64,
    spin: Duration,
) -> anyhow::Result<Case> {
    let pages = data.len() as u64 / PAGE;
    let engine = Engine::start(EngineConfig {
        chunk_size: PAGE,
        whole_file_max: 0,
        event_spin: spin,
        ..EngineConfig::default()
    })?;
    let ep = dir.join(format!("engine-{readers}-{}", spin.as_micros()));
    placeholder(&ep, data.len() as u64)?;
    engine.register(Placeholder {
        path: ep.clone().into(),
        size: data.len() as u64,
        source: Arc::new(Mem(data.clone())),
        file: 0,
        verify: Verify::None,
    })?;
    let what = if spin.is_zero() {
        "sleeping (`event_spin` 0)".to_string()
    } else if spin == EngineConfig::default().event_spin {
        format!("default (`event_spin` {} µs)", spin.as_micros())
    } else {
        format!("`event_spin` {} µs", spin.as_micros())
    };
    let case = measure(format!("engine, {what}"), false, &ep, pages, readers);
    engine.shutdown();
    std::fs::remove_file(&ep)?;
    Ok(case)
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
    let spin = EngineConfig::default().event_spin;

    for readers in [1u64, 8] {
        let cases = [
            floor_case(&dir, &data, readers, 2, Duration::ZERO)?,
            floor_case(&dir, &data, readers, 1, Duration::ZERO)?,
            floor_case(&dir, &data, readers, 1, spin)?,
            engine_case(&dir, &data, readers, Duration::ZERO)?,
            engine_case(&dir, &data, readers, spin)?,
        ];
        let best = cases
            .iter()
            .filter(|c| c.floor)
            .map(|c| c.p50)
            .fold(f64::INFINITY, f64::min);
        let best99 = cases
            .iter()
            .filter(|c| c.floor)
            .map(|c| c.p99)
            .fold(f64::INFINITY, f64::min);
        for c in cases {
            rows.push(format!(
                "| 4 KiB miss, {readers} reader(s) | {} | {:.1} | {:.1} | {:.0} | {:.2}x | {:.2}x |",
                c.name,
                c.p50,
                c.p99,
                c.rate,
                c.p50 / best,
                c.p99 / best99,
            ));
        }
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
        "| case | handler | p50 µs | p99 µs | events/s | p50 / fastest floor p50 | p99 / fastest floor p99 |"
    );
    println!("|---|---|---|---|---|---|---|");
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
