//! Loader-aware read-ahead: which files the dynamic loader will open once a dynamic ELF
//! file is opened, so they can be filled at once instead of one after another.
//!
//! Owns the parse of an ELF file's interpreter (`PT_INTERP`), needed libraries
//! (`DT_NEEDED`) and search path (`DT_RUNPATH`, `DT_RPATH`), read through a file the caller
//! opened ([`Deps::read`]), and their resolution to files inside a container's root
//! ([`resolve`]: `openat2(O_PATH, RESOLVE_IN_ROOT)`, so an absolute symlink in the image
//! resolves inside the image, and an `O_PATH` open raises no fanotify event). The bytes are
//! the image's, so untrusted: every offset and count is bounded, a malformed file yields
//! fewer names or none, never an error a reader sees. The order is the loader's search
//! order with the image's `ld.so.cache` left out (runpath, then the default directories of
//! the ELF machine); a name found elsewhere by the loader is simply not read ahead. It never
//! fills, answers events or writes anything: the caller (`crate::overlay`) decides what to
//! fill.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileExt;

use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};

/// Most program headers read.
const MAX_PHNUM: usize = 64;
/// Most bytes of a dynamic section read.
const MAX_DYNAMIC: u64 = 64 << 10;
/// Most bytes of a string table read.
const MAX_STRTAB: u64 = 256 << 10;
/// Most libraries taken from one file.
const MAX_NEEDED: usize = 64;
/// Longest name or path taken.
const MAX_NAME: usize = 255;

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;
const DT_STRSZ: u64 = 10;
const DT_RPATH: u64 = 15;
const DT_RUNPATH: u64 = 29;
/// `e_machine` of x86-64.
pub const EM_X86_64: u16 = 62;
/// `e_machine` of AArch64.
pub const EM_AARCH64: u16 = 183;

/// What the loader will look for once this ELF file is loaded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Deps {
    /// `PT_INTERP`: the program interpreter's absolute path.
    pub interp: Option<String>,
    /// `DT_NEEDED` names, in order.
    pub needed: Vec<String>,
    /// `DT_RUNPATH` (or `DT_RPATH` when there is none) directories, in order.
    pub runpath: Vec<String>,
    /// `e_machine` (picks the default library directories).
    pub machine: u16,
}

impl Deps {
    /// The dependencies of the 64-bit little-endian ELF file `file`; `None` when it is not
    /// one, or declares neither an interpreter nor a library.
    pub fn read(file: &File) -> Option<Deps> {
        let mut ehdr = [0u8; 64];
        file.read_exact_at(&mut ehdr, 0).ok()?;
        // 64-bit, little-endian, version 1.
        if ehdr[..4] != *b"\x7fELF" || ehdr[4] != 2 || ehdr[5] != 1 || ehdr[6] != 1 {
            return None;
        }
        let machine = u16_at(&ehdr, 18)?;
        let phoff = u64_at(&ehdr, 32)?;
        let phentsize = usize::from(u16_at(&ehdr, 54)?);
        let phnum = usize::from(u16_at(&ehdr, 56)?).min(MAX_PHNUM);
        // The ELF64 program header size: anything else is not a file the loader takes.
        if phentsize != 56 || phnum == 0 {
            return None;
        }
        let mut ph = vec![0u8; phentsize * phnum];
        file.read_exact_at(&mut ph, phoff).ok()?;
        let phdrs: Vec<Phdr> = ph.chunks_exact(phentsize).filter_map(Phdr::parse).collect();
        let mut deps = Deps {
            machine,
            ..Deps::default()
        };
        if let Some(p) = phdrs.iter().find(|p| p.kind == PT_INTERP) {
            deps.interp = read_str(file, p.offset, p.filesz.min(MAX_NAME as u64 + 1))
                .filter(|s| s.starts_with('/'));
        }
        if let Some(p) = phdrs.iter().find(|p| p.kind == PT_DYNAMIC) {
            let len = usize::try_from(p.filesz.min(MAX_DYNAMIC)).ok()?;
            let mut dynamic = vec![0u8; len - len % 16];
            if file.read_exact_at(&mut dynamic, p.offset).is_ok() {
                deps.dynamic(file, &phdrs, &dynamic);
            }
        }
        (deps.interp.is_some() || !deps.needed.is_empty()).then_some(deps)
    }

    /// Takes the names the dynamic section `dynamic` gives from its string table.
    fn dynamic(&mut self, file: &File, phdrs: &[Phdr], dynamic: &[u8]) {
        let (mut needed, mut runpath, mut rpath) = (Vec::new(), None, None);
        let (mut strtab, mut strsz) = (None, 0u64);
        for d in dynamic.chunks_exact(16) {
            let (Some(tag), Some(val)) = (u64_at(d, 0), u64_at(d, 8)) else {
                break;
            };
            match tag {
                DT_NULL => break,
                DT_NEEDED if needed.len() < MAX_NEEDED => needed.push(val),
                DT_STRTAB => strtab = Some(val),
                DT_STRSZ => strsz = val,
                DT_RUNPATH => runpath = Some(val),
                DT_RPATH => rpath = Some(val),
                _ => {}
            }
        }
        // The string table's address, mapped to its place in the file.
        let Some(offset) = strtab.and_then(|addr| {
            phdrs
                .iter()
                .filter(|p| p.kind == PT_LOAD)
                .find(|p| addr >= p.vaddr && addr - p.vaddr < p.filesz)
                .and_then(|p| p.offset.checked_add(addr - p.vaddr))
        }) else {
            return;
        };
        let len = usize::try_from(strsz.min(MAX_STRTAB)).unwrap_or(0);
        let mut table = vec![0u8; len];
        if len == 0 || file.read_exact_at(&mut table, offset).is_err() {
            return;
        }
        let name = |at: u64| -> Option<String> {
            let rest = table.get(usize::try_from(at).ok()?..)?;
            let end = rest.iter().take(MAX_NAME + 1).position(|&b| b == 0)?;
            let s = std::str::from_utf8(&rest[..end]).ok()?;
            (!s.is_empty()).then(|| s.to_owned())
        };
        self.needed = needed.into_iter().filter_map(name).collect();
        if let Some(path) = runpath.or(rpath).and_then(name) {
            self.runpath = path
                .split(':')
                .filter(|d| !d.is_empty())
                .map(str::to_owned)
                .collect();
        }
    }

    /// Paths (relative to the root, without the leading `/`) at which the loader looks for
    /// the interpreter and each needed library, in its order: per library, its candidates.
    /// `$ORIGIN` and other `$` tokens in a runpath are left out (the caller does not know
    /// where the file is), as is a name with a `/` in it (taken relative to the process's
    /// working directory).
    pub fn candidates(&self) -> Vec<Vec<String>> {
        let mut out = Vec::new();
        if let Some(interp) = &self.interp {
            out.push(vec![interp.trim_start_matches('/').to_owned()]);
        }
        let dirs: Vec<&str> = self
            .runpath
            .iter()
            .map(String::as_str)
            .filter(|d| d.starts_with('/') && !d.contains('$'))
            .map(|d| d.trim_matches('/'))
            .chain(library_dirs(self.machine).iter().copied())
            .collect();
        for name in &self.needed {
            if name.contains('/') {
                continue;
            }
            out.push(dirs.iter().map(|d| format!("{d}/{name}")).collect());
        }
        out
    }
}

/// The directories (no leading `/`) the loader searches by default for libraries of ELF
/// machine `machine` (`e_machine`; [`EM_X86_64`], [`EM_AARCH64`]), in its order: the
/// multiarch and `lib64` ones of that machine, then the generic ones.
pub fn library_dirs(machine: u16) -> &'static [&'static str] {
    match machine {
        EM_X86_64 => &[
            "lib/x86_64-linux-gnu",
            "usr/lib/x86_64-linux-gnu",
            "lib64",
            "usr/lib64",
            "lib",
            "usr/lib",
            "usr/local/lib",
        ],
        EM_AARCH64 => &[
            "lib/aarch64-linux-gnu",
            "usr/lib/aarch64-linux-gnu",
            "lib64",
            "usr/lib64",
            "lib",
            "usr/lib",
            "usr/local/lib",
        ],
        _ => &["lib", "usr/lib", "usr/local/lib"],
    }
}

/// A file found by [`resolve`]: its device and inode number as `stat` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    /// Device number.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
}

/// The first regular file of each candidate list ([`Deps::candidates`]) that exists inside
/// `root`, resolved with `RESOLVE_IN_ROOT` (symlinks, absolute ones too, stay inside it) and
/// opened `O_PATH` (no data is read, and no open event is raised).
pub fn resolve(root: BorrowedFd<'_>, candidates: &[Vec<String>]) -> Vec<Found> {
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    candidates
        .iter()
        .filter_map(|paths| {
            paths.iter().find_map(|p| {
                let fd = openat2(root, p.as_str(), how).ok()?;
                let st = nix::sys::stat::fstat(fd.as_fd()).ok()?;
                ((st.st_mode & libc::S_IFMT) == libc::S_IFREG).then_some(Found {
                    dev: st.st_dev,
                    ino: st.st_ino,
                })
            })
        })
        .collect()
}

/// One program header's fields that matter here.
struct Phdr {
    kind: u32,
    offset: u64,
    vaddr: u64,
    filesz: u64,
}

impl Phdr {
    fn parse(b: &[u8]) -> Option<Phdr> {
        Some(Phdr {
            kind: u32::from_le_bytes(b.get(0..4)?.try_into().ok()?),
            offset: u64_at(b, 8)?,
            vaddr: u64_at(b, 16)?,
            filesz: u64_at(b, 32)?,
        })
    }
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The NUL-terminated string of at most `len` bytes at `offset`.
fn read_str(file: &File, offset: u64, len: u64) -> Option<String> {
    let mut buf = vec![0u8; usize::try_from(len).ok()?];
    let n = file.read_at(&mut buf, offset).ok()?;
    let end = buf[..n].iter().position(|&b| b == 0)?;
    let s = std::str::from_utf8(&buf[..end]).ok()?;
    (!s.is_empty()).then(|| s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_binary_names_its_interpreter_and_libraries() {
        // Any dynamic executable of this machine.
        let f = File::open("/usr/bin/python3.11")
            .or_else(|_| File::open("/bin/sh"))
            .unwrap();
        let d = Deps::read(&f).expect("a dynamic ELF file");
        assert_eq!(d.interp.as_deref(), Some("/lib64/ld-linux-x86-64.so.2"));
        assert!(d.needed.iter().any(|n| n == "libc.so.6"), "{:?}", d.needed);
        let c = d.candidates();
        assert_eq!(c[0], vec!["lib64/ld-linux-x86-64.so.2".to_string()]);
        assert_eq!(c.len(), 1 + d.needed.len());
        let root = File::open("/").unwrap();
        let found = resolve(root.as_fd(), &c);
        assert_eq!(
            found.len(),
            c.len(),
            "every library of a host binary resolves"
        );
    }

    #[test]
    fn non_elf_and_malformed_files_give_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let real = std::fs::read("/bin/sh").unwrap();
        // Not ELF; ELF cut short at every length up to past the program headers; and the
        // real file with bytes flipped through its headers.
        std::fs::write(&p, b"#!/bin/sh\necho hi\n").unwrap();
        assert_eq!(Deps::read(&File::open(&p).unwrap()), None);
        for cut in (0..4096.min(real.len())).step_by(7) {
            std::fs::write(&p, &real[..cut]).unwrap();
            let _ = Deps::read(&File::open(&p).unwrap());
        }
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..500 {
            let mut bad = real.clone();
            for _ in 0..8 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let at = (x as usize) % 4096.min(bad.len());
                bad[at] = (x >> 32) as u8;
            }
            std::fs::write(&p, &bad).unwrap();
            if let Some(d) = Deps::read(&File::open(&p).unwrap()) {
                assert!(d.needed.len() <= MAX_NEEDED);
                assert!(d.needed.iter().all(|n| n.len() <= MAX_NAME));
            }
        }
    }

    #[test]
    fn resolution_stays_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("usr/lib/x86_64-linux-gnu")).unwrap();
        std::fs::create_dir_all(root.join("opt/app/lib")).unwrap();
        std::fs::write(root.join("usr/lib/x86_64-linux-gnu/libz.so.1.2"), b"z").unwrap();
        // An absolute symlink, as images have them: resolved inside the root.
        std::os::unix::fs::symlink("/usr/lib", root.join("lib")).unwrap();
        std::os::unix::fs::symlink(
            "/usr/lib/x86_64-linux-gnu/libz.so.1.2",
            root.join("usr/lib/x86_64-linux-gnu/libz.so.1"),
        )
        .unwrap();
        std::fs::write(root.join("opt/app/lib/libapp.so"), b"a").unwrap();
        // A symlink out of the root names the host's libc: it must not be found.
        std::os::unix::fs::symlink(
            "/../../../../lib/x86_64-linux-gnu/libc.so.6",
            root.join("usr/lib/x86_64-linux-gnu/libc.so.6"),
        )
        .unwrap();
        let deps = Deps {
            interp: None,
            needed: vec!["libz.so.1".into(), "libapp.so".into(), "libc.so.6".into()],
            runpath: vec!["/opt/app/lib".into(), "$ORIGIN/../lib".into()],
            machine: EM_X86_64,
        };
        let rootfd = File::open(root).unwrap();
        let found = resolve(rootfd.as_fd(), &deps.candidates());
        use std::os::unix::fs::MetadataExt;
        let ino = |p: &str| std::fs::metadata(root.join(p)).unwrap().ino();
        let inos: Vec<u64> = found.iter().map(|f| f.ino).collect();
        assert_eq!(
            inos,
            vec![
                ino("usr/lib/x86_64-linux-gnu/libz.so.1.2"),
                ino("opt/app/lib/libapp.so")
            ]
        );
    }
}
