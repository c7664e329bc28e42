//! Fill engine against the real kernel (Linux 6.14+, root). Inode marks only, on files in
//! temp dirs, or a loop-mounted filesystem the test makes; every blocking step is bounded.

mod fsutil;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fanfill::digest::Sha256;
use fanfill::fill::{
    ContentSource, Engine, EngineConfig, FileId, LocalFileSource, Placeholder, SourceError, Verify,
};
use fsutil::{LoopFs, make_placeholder, marks_of_group, pattern, sha256_hex, within};
use futures::FutureExt;
use futures::future::BoxFuture;

/// An in-memory source with knobs: delay, failures, corruption; counts its calls.
struct MemSource {
    data: Arc<Vec<u8>>,
    calls: AtomicU64,
    delay: Duration,
    fail_first: AtomicU64,
    corrupt: bool,
}

impl MemSource {
    fn new(data: Arc<Vec<u8>>) -> MemSource {
        MemSource {
            data,
            calls: AtomicU64::new(0),
            delay: Duration::ZERO,
            fail_first: AtomicU64::new(0),
            corrupt: false,
        }
    }
}

impl ContentSource for MemSource {
    fn read_at(
        &self,
        _file: u32,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'_, Result<Vec<u8>, SourceError>> {
        async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if !self.delay.is_zero() {
                tokio::time::sleep(self.delay).await;
            }
            if self
                .fail_first
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(SourceError::new("injected registry failure"));
            }
            let mut v = self.data[offset as usize..(offset + len) as usize].to_vec();
            if self.corrupt {
                v[0] ^= 0xff;
            }
            Ok(v)
        }
        .boxed()
    }
}

fn engine() -> Engine {
    Engine::start(EngineConfig::default()).expect("fanotify pre-content group (Linux 6.14+, root)")
}

/// A placeholder of `data` at `dir/name`, registered with a MemSource.
fn placeholder(
    engine: &Engine,
    dir: &Path,
    name: &str,
    data: &Arc<Vec<u8>>,
    source: MemSource,
    verify: Verify,
) -> (PathBuf, FileId, Arc<MemSource>) {
    let path = dir.join(name);
    make_placeholder(&path, data.len() as u64);
    let source = Arc::new(source);
    let id = engine
        .register(Placeholder {
            path: path.clone().into(),
            size: data.len() as u64,
            source: source.clone(),
            file: 0,
            verify,
        })
        .unwrap();
    (path, id, source)
}

fn read_all(path: &Path) -> std::io::Result<Vec<u8>> {
    let p = path.to_path_buf();
    within(20, "read", move || std::fs::read(p))
}

#[test]
fn sequential_read_fills_and_then_removes_the_mark() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine();
    let data = Arc::new(pattern(5 << 20 | 1234, 1));
    let (path, id, _) = placeholder(
        &e,
        dir.path(),
        "f",
        &data,
        MemSource::new(data.clone()),
        Verify::None,
    );
    assert_eq!(marks_of_group(e.group().as_raw_fd()), 1);
    let got = read_all(&path).unwrap();
    assert!(got == *data, "content differs");
    assert!(e.is_complete(id));
    assert_eq!(
        marks_of_group(e.group().as_raw_fd()),
        0,
        "mark must go once complete"
    );
    let s = e.stats();
    assert_eq!(s.bytes_filled, data.len() as u64);
    assert_eq!(s.files_complete, 1);
    // And now reads do not involve the engine at all.
    let events = s.events;
    read_all(&path).unwrap();
    assert_eq!(e.stats().events, events);
}

#[test]
fn pread_readv_past_eof_and_zero_length() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine();
    let data = Arc::new(pattern(3 << 20 | 77, 2));
    let (path, _, _) = placeholder(
        &e,
        dir.path(),
        "f",
        &data,
        MemSource::new(data.clone()),
        Verify::None,
    );
    let d = data.clone();
    within(30, "preads", move || {
        let f = File::open(&path).unwrap();
        // Zero-length read at a missing offset.
        let mut empty = [0u8; 0];
        assert_eq!(f.read_at(&mut empty, 2 << 20).unwrap(), 0);
        // Scattered preads, including ones crossing chunk boundaries.
        for (off, len) in [
            (1_048_000u64, 5000usize),
            (0, 1),
            (3 << 20, 77),
            (2_500_000, 300_000),
        ] {
            let mut buf = vec![0u8; len];
            f.read_exact_at(&mut buf, off).unwrap();
            assert!(
                buf[..] == d[off as usize..off as usize + len],
                "pread at {off}+{len}"
            );
        }
        // A read that runs past EOF returns the tail and no more.
        let mut buf = vec![0u8; 100_000];
        let n = f.read_at(&mut buf, d.len() as u64 - 10).unwrap();
        assert_eq!(n, 10);
        assert!(buf[..10] == d[d.len() - 10..]);
        // Entirely past EOF.
        assert_eq!(f.read_at(&mut buf, d.len() as u64 + 4096).unwrap(), 0);
        // readv across two buffers.
        let (mut a, mut b) = (vec![0u8; 4096], vec![0u8; 8192]);
        let mut iov = [
            std::io::IoSliceMut::new(&mut a),
            std::io::IoSliceMut::new(&mut b),
        ];
        let n = nix::sys::uio::preadv(&f, &mut iov, 1_500_000).unwrap();
        assert_eq!(n, 4096 + 8192);
        assert!(a[..] == d[1_500_000..1_504_096]);
        assert!(b[..] == d[1_504_096..1_512_288]);
    });
}

#[test]
fn mmap_fills_the_whole_mapping_at_mmap_time() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine();
    let data = Arc::new(pattern(6 << 20 | 999, 3));
    let (path, _, _) = placeholder(
        &e,
        dir.path(),
        "f",
        &data,
        MemSource::new(data.clone()),
        Verify::None,
    );
    // A separate process maps the file and reads every page through the mapping (page
    // faults raise no event: the engine must have filled the range at mmap time).
    let script = "import mmap,hashlib,sys\nf=open(sys.argv[1],'rb')\nm=mmap.mmap(f.fileno(),0,prot=mmap.PROT_READ)\nh=hashlib.sha256()\nfor i in range(0,len(m),4096): h.update(m[i:i+4096])\nprint(h.hexdigest())";
    let p = path.clone();
    let out = within(30, "mmap reader", move || {
        Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(&p)
            .output()
            .unwrap()
    });
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        sha256_hex(&data)
    );
    // Partial mapping of the middle: fresh file, map 1 MiB at offset 2 MiB.
    let (path2, _, src2) = placeholder(
        &e,
        dir.path(),
        "g",
        &data,
        MemSource::new(data.clone()),
        Verify::None,
    );
    let script2 = "import mmap,hashlib,sys\nf=open(sys.argv[1],'rb')\nm=mmap.mmap(f.fileno(),1<<20,prot=mmap.PROT_READ,offset=2<<20)\nprint(hashlib.sha256(m[:]).hexdigest())";
    let out = within(30, "partial mmap", move || {
        Command::new("python3")
            .arg("-c")
            .arg(script2)
            .arg(&path2)
            .output()
            .unwrap()
    });
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        sha256_hex(&data[2 << 20..3 << 20])
    );
    // The whole mapping was fetched at mmap time, as one run of chunks: one source read.
    assert_eq!(
        src2.calls.load(Ordering::SeqCst),
        1,
        "the 1 MiB mapping is one run of chunks, fetched at mmap time"
    );
}

fn copy_placeholder_of(e: &Engine, real: &Path, dst: &Path) -> FileId {
    let size = std::fs::metadata(real).unwrap().len();
    make_placeholder(dst, size);
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(0o755)).unwrap();
    e.register(Placeholder {
        path: dst.into(),
        size,
        source: Arc::new(LocalFileSource::open(real).unwrap()),
        file: 0,
        verify: Verify::None,
    })
    .unwrap()
}

#[test]
fn exec_of_placeholder_binary_via_placeholder_loader_and_libc() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine();
    let real_bin = Path::new("/usr/bin/sha256sum");
    let real_ld = std::fs::canonicalize("/lib64/ld-linux-x86-64.so.2").unwrap();
    let real_libc = std::fs::canonicalize("/lib/x86_64-linux-gnu/libc.so.6").unwrap();
    let bin = dir.path().join("sha256sum");
    let ld = dir.path().join("ld.so");
    let libc = dir.path().join("libc.so.6");
    copy_placeholder_of(&e, real_bin, &bin);
    copy_placeholder_of(&e, &real_ld, &ld);
    copy_placeholder_of(&e, &real_libc, &libc);
    let input = dir.path().join("input");
    std::fs::write(&input, b"hello fanfill\n").unwrap();
    let expected = Command::new(real_bin).arg(&input).output().unwrap();
    // execve of the placeholder loader, which maps the placeholder program and the
    // placeholder libc (found through --library-path).
    let (ld2, dir2, bin2, input2) = (
        ld.clone(),
        dir.path().to_path_buf(),
        bin.clone(),
        input.clone(),
    );
    let got = within(30, "exec", move || {
        Command::new(&ld2)
            .arg("--library-path")
            .arg(&dir2)
            .arg(&bin2)
            .arg(&input2)
            .output()
            .unwrap()
    });
    assert!(
        got.status.success(),
        "{}",
        String::from_utf8_lossy(&got.stderr)
    );
    assert_eq!(got.stdout, expected.stdout);
    // Direct execve of the placeholder binary (system loader) works too.
    let bin3 = dir.path().join("sha256sum-direct");
    copy_placeholder_of(&e, real_bin, &bin3);
    let got = within(30, "exec direct", move || {
        Command::new(&bin3).arg(&input).output().unwrap()
    });
    assert_eq!(got.stdout, expected.stdout);
    // The program's bytes are the real ones.
    assert_eq!(
        std::fs::read(&bin).unwrap(),
        std::fs::read(real_bin).unwrap()
    );
}

#[test]
fn writes_keep_original_bytes_around_them() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine();
    let data = Arc::new(pattern(4 << 20 | 4321, 4));
    let n = data.len();
    // pwrite in the middle of an unfilled file.
    let (p1, _, _) = placeholder(
        &e,
        dir.path(),
        "pwrite",
        &data,
        MemSource::new(data.clone()),
        Verify::None,
    );
    let q = p1.clone();
    within(20, "pwrite", move || {
        let f = File::options().write(true).open(&q).unwrap();
        f.write_all_at(b"USERDATA", 2_000_000).unwrap();
    });
    let mut want = data.to_vec();
    want[2_000_000..2_000_008].copy_from_slice(b"USERDATA");
    assert!(
        read_all(&p1).unwrap() == want,
        "pwrite: bytes around the write changed"
    );

    // O_APPEND write: the event names 0+4096, the data lands at EOF.
    let (p2, _, _) = placeholder(
        &e,
        dir.path(),
        "append",
        &data,
        MemSource::new(data.clone()),
        Verify::None,
    );
    let q = p2.clone();
    within(20, "append", move || {
        let mut f = File::options().append(true).open(&q).unwrap();
        f.write_all(b"TAIL").unwrap();
    });
    let mut want = data.to_vec();
    want.extend_from_slice(b"TAIL");
    assert!(read_all(&p2).unwrap() == want, "O_APPEND");

    // ftruncate down then up: the cut part comes back as zeros, the rest is original.
    let (p3, _, _) = placeholder(
        &e,
        dir.path(),
        "ftruncate",
        &data,
        MemSource::new(data.clone()),
        Verify::None,
    );
    let q = p3.clone();
    within(20, "ftruncate", move || {
        let f = File::options().write(true).open(&q).unwrap();
        f.set_len(1_000_000).unwrap();
        f.set_len(n as u64).unwrap();
    });
    let mut want = data[..1_000_000].to_vec();
    want.resize(n, 0);
    assert!(read_all(&p3).unwrap() == want, "ftruncate");

    // truncate(2) by path to grow: original content then zeros.
    let (p4, _, _) = placeholder(
        &e,
        dir.path(),
        "truncate",
        &data,
        MemSource::new(data.clone()),
        Verify::None,
    );
    let q = p4.clone();
    within(20, "truncate", move || {
        nix::unistd::truncate(&q, n as i64 + 5000).unwrap()
    });
    let mut want = data.to_vec();
    want.resize(n + 5000, 0);
    assert!(read_all(&p4).unwrap() == want, "truncate grow");

    // open(O_TRUNC) raises no event: the user's new content must survive a later fill.
    let (p5, id5, _) = placeholder(
        &e,
        dir.path(),
        "otrunc",
        &data,
        MemSource::new(data.clone()),
        Verify::None,
    );
    let q = p5.clone();
    within(20, "O_TRUNC", move || {
        let mut f = File::options().write(true).truncate(true).open(&q).unwrap();
        f.write_all(b"new content").unwrap();
    });
    e.fill_file(id5).unwrap();
    assert_eq!(read_all(&p5).unwrap(), b"new content");
    assert!(e.is_complete(id5));
}

#[test]
fn copy_file_range_sendfile_and_ficlone_from_a_placeholder() {
    let fs = LoopFs::new("xfs", 300);
    let e = engine();
    let data = Arc::new(pattern(3 << 20 | 5, 5));
    let n = data.len();
    // copy_file_range of the whole file.
    let (src, _, _) = placeholder(
        &e,
        &fs.mnt,
        "cfr",
        &data,
        MemSource::new(data.clone()),
        Verify::None,
    );
    let dst = fs.mnt.join("cfr.out");
    let d2 = dst.clone();
    within(20, "copy_file_range", move || {
        let s = File::open(&src).unwrap();
        let d = File::create(&d2).unwrap();
        let mut left = n;
        while left > 0 {
            let k = nix::fcntl::copy_file_range(&s, None, &d, None, left).unwrap();
            assert!(k > 0);
            left -= k;
        }
    });
    assert!(std::fs::read(&dst).unwrap() == *data, "copy_file_range");

    // sendfile into a regular file.
    let (src, _, _) = placeholder(
        &e,
        &fs.mnt,
        "sf",
        &data,
        MemSource::new(data.clone()),
        Verify::None,
    );
    let dst = fs.mnt.join("sf.out");
    let d2 = dst.clone();
    within(20, "sendfile", move || {
        let s = File::open(&src).unwrap();
        let d = File::create(&d2).unwrap();
        let mut off: i64 = 0;
        while (off as usize) < n {
            let left = n - off as usize;
            let k = nix::sys::sendfile::sendfile64(&d, &s, Some(&mut off), left).unwrap();
            assert!(k > 0);
        }
    });
    assert!(std::fs::read(&dst).unwrap() == *data, "sendfile");

    // FICLONE (count 0 in the event: the whole file) via cp --reflink=always on xfs.
    let (src, id, _) = placeholder(
        &e,
        &fs.mnt,
        "clone",
        &data,
        MemSource::new(data.clone()),
        Verify::None,
    );
    let dst = fs.mnt.join("clone.out");
    let (s2, d2) = (src.clone(), dst.clone());
    let st = within(20, "FICLONE", move || {
        Command::new("cp")
            .arg("--reflink=always")
            .arg(&s2)
            .arg(&d2)
            .status()
            .unwrap()
    });
    assert!(st.success(), "cp --reflink=always");
    assert!(
        std::fs::read(&dst).unwrap() == *data,
        "FICLONE copy has the real bytes"
    );
    assert!(e.is_complete(id), "count 0 means the whole file");
}

#[test]
fn chunk_granularity_and_small_files_whole() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine();
    let big = Arc::new(pattern(8 << 20, 6));
    let (bp, _, bsrc) = placeholder(
        &e,
        dir.path(),
        "big",
        &big,
        MemSource::new(big.clone()),
        Verify::None,
    );
    within(20, "4k read", move || {
        let f = File::open(&bp).unwrap();
        let mut b = [0u8; 4096];
        f.read_exact_at(&mut b, (3 << 20) + 8192).unwrap();
        let blocks = f.metadata().unwrap().blocks() * 512;
        let chunk = EngineConfig::default().chunk_size;
        assert!(
            (chunk..2 * chunk).contains(&blocks),
            "one {chunk}-byte chunk on disk, found {blocks}"
        );
    });
    assert_eq!(bsrc.calls.load(Ordering::SeqCst), 1);
    let small = Arc::new(pattern(100_000, 7));
    let (sp, sid, ssrc) = placeholder(
        &e,
        dir.path(),
        "small",
        &small,
        MemSource::new(small.clone()),
        Verify::None,
    );
    within(20, "1 byte read", move || {
        let f = File::open(&sp).unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, 50_000).unwrap();
    });
    assert_eq!(ssrc.calls.load(Ordering::SeqCst), 1);
    assert!(
        e.is_complete(sid),
        "a small file is filled whole on first touch"
    );
}

#[test]
fn many_readers_of_one_chunk_share_one_fetch_and_files_fill_in_parallel() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine();
    let data = Arc::new(pattern(2 << 20, 8));
    let mut slow = MemSource::new(data.clone());
    slow.delay = Duration::from_millis(300);
    let (path, _, src) = placeholder(&e, dir.path(), "shared", &data, slow, Verify::None);
    let readers: Vec<_> = (0..16)
        .map(|i| {
            let (p, d) = (path.clone(), data.clone());
            std::thread::spawn(move || {
                let f = File::open(&p).unwrap();
                let mut b = vec![0u8; 4096];
                let off = 4096 * i as u64;
                f.read_exact_at(&mut b, off).unwrap();
                assert!(b[..] == d[off as usize..off as usize + 4096]);
            })
        })
        .collect();
    within(20, "16 readers", move || {
        readers.into_iter().for_each(|r| r.join().unwrap())
    });
    assert_eq!(src.calls.load(Ordering::SeqCst), 1, "single-flight");

    // Four files with a 400 ms source each, read at the same time: served in parallel.
    let files: Vec<_> = (0..4)
        .map(|i| {
            let mut s = MemSource::new(data.clone());
            s.delay = Duration::from_millis(400);
            placeholder(&e, dir.path(), &format!("par{i}"), &data, s, Verify::None).0
        })
        .collect();
    let t = Instant::now();
    let readers: Vec<_> = files
        .into_iter()
        .map(|p| std::thread::spawn(move || std::fs::read(p).unwrap().len()))
        .collect();
    within(20, "parallel files", move || {
        readers
            .into_iter()
            .for_each(|r| assert_eq!(r.join().unwrap(), 2 << 20))
    });
    // Serial service would take 4 x 2 chunks x 400 ms = 3.2 s; parallel, about 0.8 s.
    assert!(
        t.elapsed() < Duration::from_millis(2500),
        "files were served serially: {:?}",
        t.elapsed()
    );
}

fn assert_eio<T: std::fmt::Debug>(r: std::io::Result<T>) {
    let err = r.expect_err("reader must not get data");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
}

/// One source serving several files by key, holding their chunk digests itself
/// ([`Verify::Source`]); file 1's bytes are served corrupted.
struct KeyedSource {
    files: Vec<Arc<Vec<u8>>>,
    chunk: u64,
}

impl ContentSource for KeyedSource {
    fn read_at(
        &self,
        file: u32,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'_, Result<Vec<u8>, SourceError>> {
        async move {
            let data = self
                .files
                .get(file as usize)
                .ok_or_else(|| SourceError::new(format!("no file {file}")))?;
            let mut v = data[offset as usize..(offset + len) as usize].to_vec();
            if file == 1 {
                v[0] ^= 0xff;
            }
            Ok(v)
        }
        .boxed()
    }

    fn digest(&self, file: u32, piece: u64) -> Option<Sha256> {
        let data = self.files.get(file as usize)?;
        data.chunks(self.chunk as usize)
            .nth(piece as usize)
            .map(Sha256::of)
    }
}

#[test]
fn one_source_serves_many_files_by_key_and_its_digests_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine();
    let chunk = 64 << 10;
    let files: Vec<Arc<Vec<u8>>> = (0..3)
        .map(|i| Arc::new(pattern((1 << 20) + 1000 * i, 30 + i as u64)))
        .collect();
    let source: Arc<dyn ContentSource> = Arc::new(KeyedSource {
        files: files.clone(),
        chunk,
    });
    let mut paths = Vec::new();
    for (key, data) in files.iter().enumerate() {
        let path = dir.path().join(format!("k{key}"));
        make_placeholder(&path, data.len() as u64);
        e.register(Placeholder {
            path: path.clone().into(),
            size: data.len() as u64,
            source: source.clone(),
            file: key as u32,
            verify: Verify::Source { chunk: Some(chunk) },
        })
        .unwrap();
        paths.push(path);
    }
    // Each key reads its own bytes, checked against the source's digests.
    assert!(read_all(&paths[0]).unwrap() == *files[0]);
    assert!(read_all(&paths[2]).unwrap() == *files[2]);
    // A piece that does not hash to the source's digest: EIO, nothing written.
    assert_eio(read_all(&paths[1]));
    assert_eq!(std::fs::metadata(&paths[1]).unwrap().blocks(), 0);
    // A source without digests cannot vouch for a Verify::Source placeholder.
    let path = dir.path().join("nodigest");
    let data = Arc::new(pattern(5000, 7));
    make_placeholder(&path, data.len() as u64);
    e.register(Placeholder {
        path: path.clone().into(),
        size: data.len() as u64,
        source: Arc::new(MemSource::new(data.clone())),
        file: 0,
        verify: Verify::Source { chunk: None },
    })
    .unwrap();
    assert_eio(read_all(&path));
}

#[test]
fn failures_answer_eio_and_never_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine();
    let data = Arc::new(pattern(2 << 20, 9));
    // A source that fails twice, then works.
    let flaky = MemSource::new(data.clone());
    flaky.fail_first.store(2, Ordering::SeqCst);
    let (path, _, _) = placeholder(&e, dir.path(), "flaky", &data, flaky, Verify::None);
    let p = path.clone();
    let (first, second, third) = within(20, "flaky reads", move || {
        let f = File::open(&p).unwrap();
        let mut b = vec![0u8; 65536];
        let r1 = f.read_exact_at(&mut b, 0);
        let r2 = f.read_exact_at(&mut b, 0);
        let r3 = f.read_exact_at(&mut b, 0).map(|()| b.clone());
        (r1, r2, r3)
    });
    assert_eio(first);
    assert_eio(second);
    assert!(
        third.unwrap()[..] == data[..65536],
        "retry after failure gives the real bytes"
    );

    // Corrupt bytes against a chunk digest: EIO, and nothing was written.
    let mut bad = MemSource::new(data.clone());
    bad.corrupt = true;
    let digests = data.chunks(1 << 20).map(Sha256::of).collect();
    let (path, _, _) = placeholder(
        &e,
        dir.path(),
        "corrupt",
        &data,
        bad,
        Verify::Chunks {
            chunk: 1 << 20,
            sha256: digests,
        },
    );
    let p = path.clone();
    let r = within(20, "corrupt read", move || {
        let mut f = File::open(&p).unwrap();
        let mut b = Vec::new();
        f.read_to_end(&mut b).map(|_| b)
    });
    assert_eio(r);
    assert_eq!(
        std::fs::metadata(&path).unwrap().blocks(),
        0,
        "no unverified byte on disk"
    );

    // Whole-file digest that does not match.
    let (path, _, _) = placeholder(
        &e,
        dir.path(),
        "wrongdigest",
        &data,
        MemSource::new(data.clone()),
        Verify::Whole(Sha256([0; 32])),
    );
    assert_eio(read_all(&path));

    // Byte-for-byte: every successful read of a file whose source fails half of the time
    // returns the true bytes; failed reads return an error, never zeros.
    let flaky = MemSource::new(data.clone());
    flaky.fail_first.store(3, Ordering::SeqCst);
    let (path, _, _) = placeholder(&e, dir.path(), "bytewise", &data, flaky, Verify::None);
    let d = data.clone();
    let (ok, failed) = within(30, "bytewise", move || {
        let (mut ok, mut failed) = (0, 0);
        let f = File::open(&path).unwrap();
        for i in 0..64u64 {
            let off = (i * 32_771) % (d.len() as u64 - 4096);
            let mut b = vec![0u8; 4096];
            match f.read_exact_at(&mut b, off) {
                Ok(()) => {
                    assert!(
                        b[..] == d[off as usize..off as usize + 4096],
                        "wrong bytes at {off}"
                    );
                    ok += 1;
                }
                Err(err) => {
                    assert_eq!(err.raw_os_error(), Some(libc::EIO));
                    failed += 1;
                }
            }
        }
        (ok, failed)
    });
    assert!(failed >= 1 && ok >= 60, "ok {ok} failed {failed}");
}

#[test]
fn fill_restores_mtime_and_file_capability() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine();
    let data = Arc::new(pattern(300_000, 10));
    let path = dir.path().join("f");
    make_placeholder(&path, data.len() as u64);
    File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(std::time::UNIX_EPOCH + Duration::new(981_173_106, 123_456_789))
        .unwrap();
    // cap_net_raw+ep, as `setcap` writes it (VFS_CAP_REVISION_2, effective).
    let mut cap = Vec::new();
    for w in [0x0200_0001u32, 1 << 13, 0, 0, 0] {
        cap.extend_from_slice(&w.to_le_bytes());
    }
    xattr::set(&path, "security.capability", &cap).unwrap();
    e.register(Placeholder {
        path: path.clone().into(),
        size: data.len() as u64,
        source: Arc::new(MemSource::new(data.clone())),
        file: 0,
        verify: Verify::Whole(Sha256::of(&data)),
    })
    .unwrap();
    assert!(read_all(&path).unwrap() == *data);
    // A write strips the capability; the fill puts it back.
    assert_eq!(
        xattr::get(&path, "security.capability").unwrap(),
        Some(cap),
        "file capability lost by the fill"
    );
    let m = std::fs::metadata(&path).unwrap();
    assert_eq!((m.mtime(), m.mtime_nsec()), (981_173_106, 123_456_789));
}

#[test]
fn prefetch_by_the_engine_itself_does_not_wait_on_itself() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine();
    let data = Arc::new(pattern(3 << 20, 11));
    // The "cache" the source reads lives beside the placeholders on the same filesystem.
    let cache = dir.path().join("cache.bin");
    std::fs::write(&cache, &*data).unwrap();
    let mut ids = Vec::new();
    for i in 0..8 {
        let p = dir.path().join(format!("f{i}"));
        make_placeholder(&p, data.len() as u64);
        ids.push(
            e.register(Placeholder {
                path: p.into(),
                size: data.len() as u64,
                source: Arc::new(LocalFileSource::open(&cache).unwrap()),
                file: 0,
                verify: Verify::None,
            })
            .unwrap(),
        );
    }
    // Zero-length placeholder: nothing to do.
    let z = dir.path().join("empty");
    make_placeholder(&z, 0);
    let zid = e
        .register(Placeholder {
            path: z.clone().into(),
            size: 0,
            source: Arc::new(MemSource::new(data.clone())),
            file: 0,
            verify: Verify::None,
        })
        .unwrap();
    assert!(e.is_complete(zid));
    let e = Arc::new(e);
    let e2 = e.clone();
    within(30, "fill_all", move || e2.fill_all(4).unwrap());
    assert!(ids.iter().all(|id| e.is_complete(*id)));
    let s = e.stats();
    assert!(
        s.quiet_writes > 0 && s.self_events == 0,
        "the engine's own writes go through notification-free fds and raise no events: {s:?}"
    );
    assert_eq!(s.events, 0, "no reader event yet");
    assert_eq!(marks_of_group(e.group().as_raw_fd()), 0);
    for i in 0..8 {
        assert!(read_all(&dir.path().join(format!("f{i}"))).unwrap() == *data);
    }
    assert_eq!(read_all(&z).unwrap().len(), 0);
    let mut f = File::open(dir.path().join("f0")).unwrap();
    f.seek(SeekFrom::Start(10)).unwrap();
}

#[test]
fn exec_of_a_large_placeholder_binary_repeatedly() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine();
    // busybox is larger than one chunk: its segments are mapped after exec has denied
    // writers, so the fill path must not need a writable open of the file at that point.
    let bin = dir.path().join("busybox");
    copy_placeholder_of(&e, Path::new("/bin/busybox"), &bin);
    for i in 0..5 {
        let b = bin.clone();
        let out = within(30, "exec busybox", move || {
            Command::new(&b).args(["echo", "ok"]).output()
        });
        let out = out.unwrap_or_else(|err| panic!("exec {i} of a placeholder failed: {err}"));
        assert_eq!(out.stdout, b"ok\n");
    }
}

/// Regression: event fds were opened without O_CLOEXEC, so every child spawned while an
/// event was in flight inherited a writable fd of the placeholder (and a later execve of
/// that file failed with ETXTBSY). Found by `tests/load.rs`.
#[test]
fn event_fds_do_not_leak_into_children() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine();
    let data = Arc::new(pattern(1 << 20, 12));
    let mut slow = MemSource::new(data.clone());
    slow.delay = Duration::from_millis(1500);
    let (path, _, _) = placeholder(&e, dir.path(), "slow", &data, slow, Verify::None);
    let p = path.clone();
    let reader = std::thread::spawn(move || std::fs::read(p).unwrap());
    std::thread::sleep(Duration::from_millis(300));
    // While the event is being served, a child lists its inherited fds.
    let out = Command::new("sh")
        .args(["-c", "ls -l /proc/$$/fd"])
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        !listing.contains(path.to_str().unwrap()),
        "a child inherited the event fd:\n{listing}"
    );
    let got = within(20, "slow read", move || reader.join().unwrap());
    assert!(got == *data);
}

/// `Engine::supply` (bytes that arrived by a layer stream) is held to the same rules as a
/// fetch: bytes that fail verification are refused and never reach the disk, a file the
/// user truncated and rewrote keeps the user's bytes, supplied chunks are not fetched again,
/// and the file completes (mark removed) with its last chunk.
#[test]
fn supplied_bytes_are_verified_and_never_overwrite_user_data() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine();
    let data = Arc::new(pattern((3 << 20) + 777, 41));
    let digests: Vec<Sha256> = data.chunks(1 << 20).map(Sha256::of).collect();
    let chunks = || Verify::Chunks {
        chunk: 1 << 20,
        sha256: digests.clone(),
    };

    // Wrong bytes: refused, nothing on disk; a later read gets the true bytes from the source.
    let (path, id, src) = placeholder(
        &e,
        dir.path(),
        "bad",
        &data,
        MemSource::new(data.clone()),
        chunks(),
    );
    let mut wrong = data[..2 << 20].to_vec();
    wrong[5] ^= 1;
    assert!(e.supply(id, 0, &wrong).is_err(), "corrupt supply refused");
    assert_eq!(
        std::fs::metadata(&path).unwrap().blocks(),
        0,
        "nothing written"
    );
    assert!(!e.is_complete(id));
    assert!(read_all(&path).unwrap() == *data);
    assert!(src.calls.load(Ordering::SeqCst) > 0);

    // Right bytes, in two pieces, one not chunk-aligned at its end: the covered chunks are
    // written, the rest waits for the next piece; nothing is fetched; the mark goes.
    let (path, id, src) = placeholder(
        &e,
        dir.path(),
        "good",
        &data,
        MemSource::new(data.clone()),
        chunks(),
    );
    let first = (1 << 20) + 4096; // one whole chunk and a bit of the next
    assert_eq!(e.supply(id, 0, &data[..first]).unwrap(), 1 << 20);
    assert!(!e.is_complete(id));
    assert_eq!(
        e.supply(id, 1 << 20, &data[1 << 20..]).unwrap(),
        data.len() as u64 - (1 << 20)
    );
    assert!(e.is_complete(id));
    assert_eq!(
        e.supply(id, 0, &data).unwrap(),
        0,
        "a complete file takes nothing"
    );
    assert!(read_all(&path).unwrap() == *data);
    assert_eq!(
        src.calls.load(Ordering::SeqCst),
        0,
        "supplied chunks are not fetched"
    );
    assert_eq!(
        marks_of_group(e.group().as_raw_fd()),
        0,
        "both files complete, no mark left"
    );

    // The user truncated and rewrote the file (O_TRUNC raises no event): the supply must not
    // bring the image's bytes back.
    let (path, id, _) = placeholder(
        &e,
        dir.path(),
        "user",
        &data,
        MemSource::new(data.clone()),
        chunks(),
    );
    let q = path.clone();
    within(20, "O_TRUNC", move || {
        let mut f = File::options().write(true).truncate(true).open(&q).unwrap();
        f.write_all(b"user bytes").unwrap();
    });
    assert_eq!(e.supply(id, 0, &data).unwrap(), 0);
    assert_eq!(read_all(&path).unwrap(), b"user bytes");
    assert!(e.is_complete(id));
}

/// Regression: a file completes while readers' events are queued or being answered, and
/// `execve`s of it run all the while. An exec that opens the file after its mark went
/// denies writers; with `O_RDWR` event fds the kernel opened a writable fd for every event
/// read after that (queued before), so the exec failed with ETXTBSY (42 times in these 20
/// rounds), or the event fd could not be opened and a reader got an error.
#[test]
fn exec_right_after_completion_never_sees_text_file_busy() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let e = engine();
    let data = Arc::new(std::fs::read("/bin/busybox").unwrap());
    let mut busy = 0;
    let mut runs = 0;
    for round in 0..20 {
        let mut src = MemSource::new(data.clone());
        src.delay = Duration::from_millis(150);
        let (path, _, _) = placeholder(
            &e,
            dir.path(),
            &format!("bb{round}"),
            &data,
            src,
            Verify::None,
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let start = Arc::new(std::sync::Barrier::new(25));
        let mut readers = Vec::new();
        for _ in 0..24 {
            let (p, start, data) = (path.clone(), start.clone(), data.clone());
            readers.push(std::thread::spawn(move || {
                start.wait();
                assert!(std::fs::read(&p).unwrap() == *data);
            }));
        }
        start.wait();
        let mut execers = Vec::new();
        for _ in 0..3 {
            let path = path.clone();
            execers.push(std::thread::spawn(move || {
                let (mut runs, mut busy) = (0, 0);
                let t = Instant::now();
                while t.elapsed() < Duration::from_millis(400) {
                    match Command::new(&path).arg0("busybox").arg("true").status() {
                        Ok(s) => {
                            assert!(s.success());
                            runs += 1;
                        }
                        Err(err) if err.raw_os_error() == Some(libc::ETXTBSY) => busy += 1,
                        Err(err) => panic!("exec: {err}"),
                    }
                }
                (runs, busy)
            }));
        }
        let (r, b) = within(30, "execs", move || {
            execers
                .into_iter()
                .map(|h| h.join().unwrap())
                .fold((0, 0), |(r, b), (r1, b1)| (r + r1, b + b1))
        });
        runs += r;
        busy += b;
        within(20, "readers", move || {
            readers.into_iter().for_each(|h| h.join().unwrap())
        });
    }
    eprintln!("{runs} execs, {busy} ETXTBSY");
    assert!(runs > 0);
    assert_eq!(busy, 0, "execs failed with ETXTBSY ({runs} succeeded)");
}

/// Polls `f` until it holds, for at most `secs`.
fn eventually(secs: u64, what: &str, f: impl Fn() -> bool) {
    let until = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < until, "{what}: not within {secs}s");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Issue #15: a reader missing a file that a running delivery (a layer stream) brings soon
/// waits for the delivery instead of fetching it (nothing fetched, true bytes); a file the
/// delivery is far from is fetched at once; a delivery that ends or is late releases its
/// waiters to fetch.
#[test]
fn a_miss_just_ahead_of_a_delivery_waits_for_it_and_is_never_fetched_twice() {
    let dir = tempfile::tempdir().unwrap();
    let e = Engine::start(EngineConfig {
        delivery_wait: Duration::from_secs(10),
        ..EngineConfig::default()
    })
    .expect("fanotify pre-content group (Linux 6.14+, root)");
    let data = Arc::new(pattern((1 << 20) + 99, 77));
    let whole = || Verify::Whole(Sha256::of(&data));
    let reader = |path: &PathBuf| {
        let p = path.clone();
        std::thread::spawn(move || std::fs::read(p))
    };

    // Near: the reader waits, the delivery brings the bytes, the source is never asked.
    let delivery = fanfill::fill::Delivery::start();
    let (near, id, src) = placeholder(
        &e,
        dir.path(),
        "near",
        &data,
        MemSource::new(data.clone()),
        whole(),
    );
    // Positions are in the delivery's units: 1 GiB passed already, so it is fast.
    delivery.advance(1 << 30);
    e.expect(id, &delivery, (1 << 30) + 4096 + data.len() as u64);
    let r = reader(&near);
    eventually(10, "the reader waits for the delivery", || {
        e.waiting_for_delivery() == 1
    });
    assert_eq!(
        src.calls.load(Ordering::SeqCst),
        0,
        "a waiting reader fetched"
    );
    delivery.advance((1 << 30) + 4096);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(e.waiting_for_delivery(), 1, "woke before its file passed");
    assert_eq!(e.supply(id, 0, &data).unwrap(), data.len() as u64);
    delivery.advance((1 << 30) + 4096 + data.len() as u64);
    let got = within(10, "near read", move || r.join().unwrap()).unwrap();
    assert!(got == *data, "near: wrong bytes");
    assert_eq!(
        src.calls.load(Ordering::SeqCst),
        0,
        "the delivered file was fetched too"
    );
    assert!(e.is_complete(id));

    // Far (1 MiB passed, the file at 100 GiB): fetched at once, no wait.
    let slow = fanfill::fill::Delivery::start();
    slow.advance(1 << 20);
    let (far, id, src) = placeholder(
        &e,
        dir.path(),
        "far",
        &data,
        MemSource::new(data.clone()),
        whole(),
    );
    e.expect(id, &slow, 100 << 30);
    let got = read_all(&far).unwrap();
    assert!(got == *data, "far: wrong bytes");
    assert!(src.calls.load(Ordering::SeqCst) > 0, "far: not fetched");

    // Ended while a reader waits: the reader fetches at once (long before the 20 s limit).
    let other = fanfill::fill::Delivery::start();
    let (ended, id, src) = placeholder(
        &e,
        dir.path(),
        "ended",
        &data,
        MemSource::new(data.clone()),
        whole(),
    );
    other.advance(1 << 30);
    e.expect(id, &other, (1 << 30) + 1);
    let r = reader(&ended);
    eventually(10, "the reader waits for the other delivery", || {
        e.waiting_for_delivery() == 1
    });
    other.end();
    let got = within(5, "read after the delivery ended", move || {
        r.join().unwrap()
    })
    .unwrap();
    assert!(got == *data, "ended: wrong bytes");
    assert!(src.calls.load(Ordering::SeqCst) > 0, "ended: not fetched");
    assert_eq!(e.waiting_for_delivery(), 0);

    // Late: a delivery that stalls is given up after twice the wait, then the file is fetched.
    let e2 = Engine::start(EngineConfig {
        delivery_wait: Duration::from_millis(300),
        ..EngineConfig::default()
    })
    .unwrap();
    let stalled = fanfill::fill::Delivery::start();
    let (late, id, src) = placeholder(
        &e2,
        dir.path(),
        "late",
        &data,
        MemSource::new(data.clone()),
        whole(),
    );
    // One byte short of the file's end, and no further.
    stalled.advance(1 << 30);
    e2.expect(id, &stalled, (1 << 30) + 1);
    let t = Instant::now();
    let got = read_all(&late).unwrap();
    assert!(got == *data, "late: wrong bytes");
    assert!(src.calls.load(Ordering::SeqCst) > 0, "late: not fetched");
    assert!(
        t.elapsed() >= Duration::from_millis(550),
        "late: did not wait for the delivery first"
    );
}
