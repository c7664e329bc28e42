//! Load: 64 concurrent readers over 10,000 placeholders with random ranges, plus mmaps and
//! execs from other processes, for a bounded time. Every byte read is verified; no reader
//! may hang; the engine's fill latency p99 is reported.

mod fsutil;

use std::fs::File;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fanfill::fill::{
    ContentSource, Engine, EngineConfig, LocalFileSource, Placeholder, SourceError, Verify,
};
use fsutil::{LoopFs, within};
use futures::FutureExt;
use futures::future::BoxFuture;

/// Content computed from (seed, offset): any range of any file, without storing it.
struct Generated {
    seed: u64,
}

fn word(seed: u64, w: u64) -> u64 {
    let mut z = seed ^ w.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn generate(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    (offset..offset + len as u64)
        .map(|i| word(seed, i / 8).to_le_bytes()[(i % 8) as usize])
        .collect()
}

impl ContentSource for Generated {
    fn read_at(
        &self,
        _file: u32,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'_, Result<Vec<u8>, SourceError>> {
        let v = generate(self.seed, offset, len as usize);
        async move { Ok(v) }.boxed()
    }
}

fn rng(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn sixty_four_readers_over_ten_thousand_files() {
    let fs = LoopFs::new("ext4", 2048);
    let engine = Engine::start(EngineConfig::default()).unwrap();
    let n_files = 10_000u64;
    let mut sizes = Vec::new();
    let mut st = 12345u64;
    for i in 0..n_files {
        // Mostly small files, some large enough for several chunks.
        let size = if i % 100 == 0 {
            1 + rng(&mut st) % (3 << 20)
        } else {
            1 + rng(&mut st) % (48 << 10)
        };
        let dir = fs.mnt.join(format!("d{:03}", i / 100));
        if i % 100 == 0 {
            std::fs::create_dir(&dir).unwrap();
        }
        let path = dir.join(format!("f{i}"));
        File::create(&path).unwrap().set_len(size).unwrap();
        engine
            .register(Placeholder {
                path: path.into(),
                size,
                source: Arc::new(Generated { seed: i }),
                file: 0,
                verify: Verify::None,
            })
            .unwrap();
        sizes.push(size);
    }
    let path_of = |i: u64| fs.mnt.join(format!("d{:03}/f{i}", i / 100));
    let paths: Arc<Vec<PathBuf>> = Arc::new((0..n_files).map(path_of).collect());
    let sizes = Arc::new(sizes);

    // Execs: placeholder copies of a static busybox, run from other processes.
    let busybox = PathBuf::from("/bin/busybox");
    let bb_size = std::fs::metadata(&busybox).unwrap().len();
    let mut execs = Vec::new();
    for i in 0..8 {
        let p = fs.mnt.join(format!("busybox-{i}"));
        File::create(&p).unwrap().set_len(bb_size).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        engine
            .register(Placeholder {
                path: p.clone().into(),
                size: bb_size,
                source: Arc::new(LocalFileSource::open(&busybox).unwrap()),
                file: 0,
                verify: Verify::None,
            })
            .unwrap();
        execs.push(p);
    }

    let stop = Arc::new(AtomicBool::new(false));
    let (reads, bytes, mmaps, runs) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let mut handles = Vec::new();
    for r in 0..64u64 {
        let (paths, sizes, stop, reads, bytes) = (
            paths.clone(),
            sizes.clone(),
            stop.clone(),
            reads.clone(),
            bytes.clone(),
        );
        handles.push(std::thread::spawn(move || {
            let mut st = 0xDEAD_BEEF ^ (r + 1).wrapping_mul(0x9E37_79B9);
            let mut worst = Duration::ZERO;
            while !stop.load(Ordering::Relaxed) {
                let i = rng(&mut st) % paths.len() as u64;
                let size = sizes[i as usize];
                let off = rng(&mut st) % size;
                let len = (1 + rng(&mut st) % (128 << 10)).min(size - off) as usize;
                let f = File::open(&paths[i as usize]).unwrap();
                let mut buf = vec![0u8; len];
                let t = Instant::now();
                f.read_exact_at(&mut buf, off).unwrap();
                worst = worst.max(t.elapsed());
                assert!(
                    buf == generate(i, off, len),
                    "wrong bytes in file {i} at {off}+{len}"
                );
                reads.fetch_add(1, Ordering::Relaxed);
                bytes.fetch_add(len as u64, Ordering::Relaxed);
            }
            worst
        }));
    }
    // mmap readers (python processes) and execs alongside.
    let (p2, s2, stop2, m2) = (paths.clone(), sizes.clone(), stop.clone(), mmaps.clone());
    let mmapper = std::thread::spawn(move || {
        let script = "import mmap,sys\nf=open(sys.argv[1],'rb')\nm=mmap.mmap(f.fileno(),0,prot=mmap.PROT_READ)\nsys.stdout.buffer.write(m[:])";
        let mut k = 0u64;
        while !stop2.load(Ordering::Relaxed) {
            let i = (k * 7919) % p2.len() as u64;
            let out = Command::new("python3")
                .arg("-c")
                .arg(script)
                .arg(&p2[i as usize])
                .output()
                .unwrap();
            assert!(
                out.stdout == generate(i, 0, s2[i as usize] as usize),
                "mmap of file {i}"
            );
            m2.fetch_add(1, Ordering::Relaxed);
            k += 1;
        }
    });
    let (stop3, r3) = (stop.clone(), runs.clone());
    let execer = std::thread::spawn(move || {
        let mut k = 0;
        while !stop3.load(Ordering::Relaxed) {
            let out = Command::new(&execs[k % execs.len()])
                .args(["echo", "ok"])
                .output()
                .unwrap();
            assert_eq!(out.stdout, b"ok\n", "exec of a placeholder busybox");
            r3.fetch_add(1, Ordering::Relaxed);
            k += 1;
        }
    });

    std::thread::sleep(Duration::from_secs(20));
    stop.store(true, Ordering::Relaxed);
    let worst = within(60, "readers stop", move || {
        let w: Vec<Duration> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        mmapper.join().unwrap();
        execer.join().unwrap();
        w.into_iter().max().unwrap()
    });
    let s = engine.stats();
    eprintln!(
        "load: {} reads ({:.0} MiB verified), {} mmaps, {} execs in 20 s; {} fills, {} events, p50 {} µs, p99 {} µs, slowest read {:?}, errors {}",
        reads.load(Ordering::Relaxed),
        bytes.load(Ordering::Relaxed) as f64 / 1048576.0,
        mmaps.load(Ordering::Relaxed),
        runs.load(Ordering::Relaxed),
        s.fills,
        s.events,
        s.latency_p50_us,
        s.latency_p99_us,
        worst,
        s.errors
    );
    assert_eq!(s.errors, 0);
    assert!(
        reads.load(Ordering::Relaxed) > 1000
            && mmaps.load(Ordering::Relaxed) > 0
            && runs.load(Ordering::Relaxed) > 0
    );
}
