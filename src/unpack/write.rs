//! Materialisation: creates the objects of a [`Plan`](super::plan::Plan) on disk.
//!
//! All creation is relative to directory fds: each directory of the walk is opened from its
//! parent with `O_NOFOLLOW | O_DIRECTORY`, every object is created by name in its parent
//! (`mkdirat`, `openat(O_CREAT | O_EXCL | O_NOFOLLOW)`, `symlinkat`, `mknodat`, `linkat`),
//! and metadata of non-regular objects is set with `AT_SYMLINK_NOFOLLOW`. The only path
//! resolution from the destination is the parent of an existing inode a hardlink points at,
//! done with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS |
//! RESOLVE_NO_XDEV)`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag, openat, openat2};
use nix::sys::stat::{
    FchmodatFlags, Mode as Perm, SFlag, UtimensatFlags, fchmod, fchmodat, futimens, makedev,
    mkdirat, mknodat, utimensat,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, fchown, fchownat, ftruncate, linkat, symlinkat};
use xattr::FileExt;

use crate::index::{Entry, EntryKind};

use super::plan::{self, EntryRef, Key, Node, Plan};
use super::{
    FileData, Layer, Mode, NoHooks, Op, Placeholder, PlaceholderSink, Progress, UnpackError,
    UnpackHooks, UnpackOptions, UnpackStats, Unpacked, layer_dir_name,
};

/// Threads creating the leaves of a tree (files, symlinks, special files) when a
/// [`PlaceholderSink`] is given: directories are created first, then each thread takes whole
/// directories' worth of leaves (about the same number each), then hardlinks to inodes of
/// another thread and the directories' metadata are done on the calling thread. Two: the
/// machines this is measured on have two cores, and ext4's journal serialises more.
const UNPACK_THREADS: usize = 2;

/// [`UNPACK_THREADS`], or `FANFILL_UNPACK_THREADS` (1 to 8: for measuring), at most the
/// cores there are.
fn unpack_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::env::var("FANFILL_UNPACK_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(UNPACK_THREADS)
        .clamp(1, 8)
        .min(cores)
}

/// Fewer leaves than this are created on the calling thread alone.
const PARALLEL_MIN_LEAVES: usize = 512;

/// A failed operation, before the layer and path are attached.
type OpResult<T> = Result<T, (Op, io::Error)>;

fn op(o: Op) -> impl FnOnce(Errno) -> (Op, io::Error) {
    move |e| (o, io::Error::from(e))
}

/// Creates the regular file `name` in `dir` (which must not exist) and gives it `size`:
/// sparse (`ftruncate`) or with its blocks reserved (`fallocate`). The file is open
/// read-write so that a caller can write its data before [`finish_file`].
pub fn create_file(dir: BorrowedFd<'_>, name: &OsStr, size: u64, sparse: bool) -> io::Result<File> {
    create_file_op(dir, name, size, sparse, 0o600).map_err(|(_, e)| e)
}

/// Sets a new file's owner, mode, xattrs and mtime from `meta`, in the order that keeps
/// setuid/setgid bits and `security.capability` (both cleared by a chown, and the
/// capability also by a write): call it after any data was written. The access time is
/// set to the mtime (layers carry no atime).
pub fn finish_file(file: &File, meta: &Entry) -> io::Result<()> {
    finish_fd(file, meta, false, &Dropped::default())
        .map(drop)
        .map_err(|(_, e)| e)
}

/// Opens the directory `rel` beneath `root` for use with [`create_file`], refusing any
/// symlink, magic link, `..` escape or mount crossing on the way
/// (`openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV)`).
/// An empty `rel` opens `root` itself.
pub fn open_dir_beneath(root: BorrowedFd<'_>, rel: &Path) -> io::Result<OwnedFd> {
    let rel = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
        .resolve(
            ResolveFlag::RESOLVE_BENEATH
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_MAGICLINKS
                | ResolveFlag::RESOLVE_NO_XDEV,
        );
    Ok(openat2(root, rel, how)?)
}

/// `mode`: permission bits to create the file with (no setuid, setgid or sticky bit: those
/// are set by [`finish_fd`] once the owner is final).
fn create_file_op(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    size: u64,
    sparse: bool,
    mode: u32,
) -> OpResult<File> {
    let fd = openat(
        dir,
        name,
        OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_RDWR | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Perm::from_bits_truncate((mode & 0o777) as libc::mode_t),
    )
    .map_err(op(Op::Create))?;
    let len = i64::try_from(size).map_err(|_| (Op::Size, io::Error::from(Errno::EFBIG)))?;
    if len > 0 {
        if sparse {
            ftruncate(&fd, len).map_err(op(Op::Size))?;
        } else {
            nix::fcntl::fallocate(&fd, nix::fcntl::FallocateFlags::empty(), 0, len)
                .map_err(op(Op::Size))?;
        }
    }
    Ok(File::from(fd))
}

/// Owner, mode, xattrs, times of an open file or directory; `opaque` adds the overlay
/// opaque marker. Returns the object's identity, type and size as found before (one
/// `statx`: what a registration needs, see [`super::PlaceholderSink`]).
fn finish_fd(
    file: &File,
    meta: &Entry,
    opaque: bool,
    dropped: &Dropped,
) -> OpResult<std::fs::Metadata> {
    use std::os::unix::fs::MetadataExt as _;
    // A chown and a chmod each dirty the inode in the journal; most entries are created
    // with the owner and mode they need already (root unpacking root's files), so compare
    // first. A chown clears setuid/setgid bits: after one, the mode is always set again.
    let st = file.metadata().map_err(|e| (Op::Chown, e))?;
    let chown = (st.uid(), st.gid()) != (meta.uid, meta.gid);
    if chown {
        fchown(
            file.as_fd(),
            Some(Uid::from_raw(meta.uid)),
            Some(Gid::from_raw(meta.gid)),
        )
        .map_err(op(Op::Chown))?;
    }
    if chown || (st.mode() & 0o7777) != (meta.mode & 0o7777) {
        fchmod(file.as_fd(), perm(meta.mode)).map_err(op(Op::Chmod))?;
    }
    for (name, value) in &meta.xattrs {
        if keep_xattr(name, true, dropped) {
            file.set_xattr(name, value)
                .map_err(|e| (Op::Xattr(name.clone()), e))?;
        }
    }
    if opaque {
        file.set_xattr(OPAQUE_XATTR, b"y")
            .map_err(|e| (Op::Xattr(OPAQUE_XATTR.to_owned()), e))?;
    }
    let t = mtime(meta);
    futimens(file.as_fd(), &t, &t).map_err(op(Op::Times))?;
    Ok(st)
}

const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

fn perm(mode: u32) -> Perm {
    Perm::from_bits_truncate((mode & 0o7777) as libc::mode_t)
}

fn mtime(meta: &Entry) -> TimeSpec {
    TimeSpec::new(meta.mtime, i64::from(meta.mtime_nsec.min(999_999_999)))
}

/// Prefixes of fanfill's own xattrs (the tree marker `trusted.fanfill.image` the OCI hook
/// trusts): never taken from an image.
pub const OWN_XATTR_PREFIXES: &[&str] = &["trusted.fanfill.", "user.fanfill."];

/// Whether an unpacker may apply the layer xattr `name`: what a layer legitimately
/// carries, as containerd's and umoci's unpackers apply it: file capabilities
/// (`security.capability`), POSIX ACLs (`system.posix_acl_access`, `_default`), and the
/// `user.*` and `trusted.*` namespaces, except overlayfs control xattrs (`trusted.overlay.*`,
/// `user.overlay.*`: an image must not steer the overlay it is mounted in) and fanfill's own
/// ([`OWN_XATTR_PREFIXES`]: an image must not forge fanfill's marker). Every other
/// `security.*` label (`selinux`, `ima`, `evm`, `apparmor`, `SMACK64`...) belongs to the
/// host's policy, not to the image, and is never applied; so is any other namespace.
pub fn xattr_allowed(name: &str) -> bool {
    if name.starts_with("trusted.overlay.")
        || name.starts_with("user.overlay.")
        || OWN_XATTR_PREFIXES.iter().any(|p| name.starts_with(p))
    {
        return false;
    }
    matches!(
        name,
        "security.capability" | "system.posix_acl_access" | "system.posix_acl_default"
    ) || name.starts_with("user.")
        || name.starts_with("trusted.")
}

/// Layer xattrs not applied (see [`xattr_allowed`]): how many, and a few of their names
/// for the log.
#[derive(Default)]
pub(super) struct Dropped {
    count: std::cell::Cell<u64>,
    names: std::cell::RefCell<std::collections::BTreeSet<String>>,
}

impl Dropped {
    fn note(&self, name: &str) {
        self.count.set(self.count.get() + 1);
        let mut names = self.names.borrow_mut();
        if names.len() < 8 {
            names.insert(name.to_owned());
        }
    }

    /// How many were dropped.
    pub(super) fn count(&self) -> u64 {
        self.count.get()
    }

    /// Adds what `other` (another thread's) dropped.
    fn merge(&self, other: Dropped) {
        self.count.set(self.count.get() + other.count.get());
        let mut names = self.names.borrow_mut();
        for n in other.names.into_inner() {
            if names.len() < 8 {
                names.insert(n);
            }
        }
    }

    /// Logs the count, once per unpack.
    fn log(&self) {
        if self.count() > 0 {
            tracing::warn!(
                dropped = self.count(),
                names = ?self.names.borrow(),
                "layer xattrs an unpacker may not apply were dropped"
            );
        }
    }
}

/// Whether a layer xattr is applied: [`xattr_allowed`] (others are counted in `dropped`);
/// `user.*` only on regular files and directories (the kernel refuses it elsewhere).
fn keep_xattr(name: &str, file_or_dir: bool, dropped: &Dropped) -> bool {
    if !xattr_allowed(name) {
        tracing::debug!(
            xattr = name,
            "dropping a layer xattr an unpacker may not apply"
        );
        dropped.note(name);
        return false;
    }
    if !file_or_dir && name.starts_with("user.") {
        tracing::debug!(
            xattr = name,
            "user.* xattr on a symlink or special file: skipped"
        );
        return false;
    }
    true
}

/// Metadata of a directory no layer describes.
fn default_dir() -> Entry {
    Entry::new(String::new(), EntryKind::Dir, 0o755)
}

/// A directory open on the walk, finished when the walk leaves it.
struct OpenDir<'k> {
    key: &'k [u8],
    dir: File,
    meta: Option<EntryRef>,
    opaque: bool,
}

struct Writer<'a> {
    layers: &'a [Layer<'a>],
    opts: &'a UnpackOptions,
    hooks: &'a mut dyn UnpackHooks,
    dest_abs: &'a Path,
    dest: OwnedFd,
    /// Where each inode was created first, relative to the destination.
    inodes: HashMap<EntryRef, PathBuf>,
    /// Overlay mode: inodes the merged view shows (only those are placeholders to fill).
    visible: Option<&'a HashSet<EntryRef>>,
    /// Told of each placeholder as soon as it exists; with one, the leaves of each tree are
    /// created by [`UNPACK_THREADS`] threads ([`Writer::tree_par`]).
    sink: Option<&'a dyn PlaceholderSink>,
    devices_ok: bool,
    default_dir: Entry,
    done: u64,
    total: u64,
    out: Unpacked,
    dropped: Dropped,
}

/// What every thread of [`Writer::tree_par`] shares.
#[derive(Clone, Copy)]
struct Shared<'a> {
    layers: &'a [Layer<'a>],
    opts: &'a UnpackOptions,
    dest_abs: &'a Path,
    dest: BorrowedFd<'a>,
    visible: Option<&'a HashSet<EntryRef>>,
    sink: Option<&'a dyn PlaceholderSink>,
    devices_ok: bool,
}

/// Creates one run of leaves (whole directories of them) on the current thread, with a
/// writer of its own; [`Writer::merge`] takes its result.
fn part(
    sh: Shared<'_>,
    prefix: &Path,
    tree_layer: &str,
    root: &File,
    run: &[(&[u8], Node)],
) -> Result<Part, UnpackError> {
    let mut hooks = NoHooks;
    let io_err = |e: io::Error| UnpackError::Io {
        layer: tree_layer.to_owned(),
        path: prefix.to_string_lossy().into_owned(),
        op: Op::OpenDir,
        source: e,
    };
    let dest = sh.dest.try_clone_to_owned().map_err(io_err)?;
    let mut w = Writer {
        layers: sh.layers,
        opts: sh.opts,
        hooks: &mut hooks,
        dest_abs: sh.dest_abs,
        dest,
        inodes: HashMap::new(),
        visible: sh.visible,
        sink: sh.sink,
        devices_ok: sh.devices_ok,
        default_dir: default_dir(),
        done: 0,
        total: 0,
        out: Unpacked::default(),
        dropped: Dropped::default(),
    };
    let mut open: Option<(&[u8], File)> = None;
    for &(key, node) in run {
        let rel = prefix.join(plan::display(key));
        let layer = match node {
            Node::Leaf { via, .. } => w.layers[via.layer].digest,
            _ => tree_layer,
        };
        let parent = plan::parent(key);
        if open.as_ref().is_none_or(|(k, _)| *k != parent) {
            let dir = if parent.is_empty() {
                root.try_clone().map_err(|e| (Op::OpenDir, e))
            } else {
                w.open_rel(prefix, parent)
            }
            .map_err(|e| w.err(layer, &rel, e))?;
            open = Some((parent, dir));
        }
        let Some((_, dir)) = &open else { continue };
        let name = OsStr::from_bytes(plan::name(key));
        match node {
            Node::Leaf { inode, .. } => w.leaf(dir.as_fd(), name, &rel, inode),
            Node::Whiteout => w.whiteout(dir.as_fd(), name),
            Node::Dir { .. } => Ok(()),
        }
        .map_err(|e| w.err(layer, &rel, e))?;
        w.done += 1;
    }
    Ok(Part {
        out: w.out,
        inodes: w.inodes,
        dropped: w.dropped,
        done: w.done,
        devices_ok: w.devices_ok,
    })
}

/// What one thread of [`Writer::tree_par`] created.
struct Part {
    out: Unpacked,
    inodes: HashMap<EntryRef, PathBuf>,
    dropped: Dropped,
    done: u64,
    devices_ok: bool,
}

/// Opens the destination directory `dest_abs` (absolute, canonical) once, never following a
/// symlink at any component (`RESOLVE_NO_SYMLINKS`): everything is then built beneath this
/// fd.
pub fn open_dest(dest_abs: &Path) -> Result<OwnedFd, UnpackError> {
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    openat2(nix::fcntl::AT_FDCWD, dest_abs, how).map_err(|e| UnpackError::Dest {
        dest: dest_abs.to_owned(),
        source: e.into(),
    })
}

/// Creates the plan's trees beneath the open directory `dest` (which is at `dest_abs`: the
/// path only names placeholders in the result, nothing is opened through it).
pub(super) fn materialise(
    layers: &[Layer<'_>],
    dest: OwnedFd,
    dest_abs: &Path,
    opts: &UnpackOptions,
    hooks: &mut dyn UnpackHooks,
    sink: Option<&dyn PlaceholderSink>,
    plan: &Plan,
) -> Result<Unpacked, UnpackError> {
    let mut devices_ok = opts.make_devices;
    if devices_ok && !nix::unistd::geteuid().is_root() {
        tracing::warn!("not root: device nodes will be skipped");
        devices_ok = false;
    }
    let total = match opts.mode {
        Mode::Direct => plan.merged.len(),
        Mode::Overlay => plan.layers[plan.first_visible.min(plan.layers.len())..]
            .iter()
            .map(BTreeMap::len)
            .sum(),
    } as u64;
    let visible: Option<HashSet<EntryRef>> = (opts.mode == Mode::Overlay).then(|| {
        plan.merged
            .values()
            .filter_map(|n| match n {
                Node::Leaf { inode, .. } => Some(*inode),
                _ => None,
            })
            .collect()
    });
    let mut w = Writer {
        layers,
        opts,
        hooks,
        dest_abs,
        dest,
        inodes: HashMap::new(),
        visible: None,
        sink,
        devices_ok,
        default_dir: default_dir(),
        done: 0,
        total,
        out: Unpacked::default(),
        dropped: Dropped::default(),
    };
    match opts.mode {
        Mode::Direct => {
            let root = w
                .dest
                .try_clone()
                .map(File::from)
                .map_err(|e| layout_err("", Op::OpenDir, e))?;
            w.walk(root, Path::new(""), "-", &plan.merged)?;
        }
        Mode::Overlay => {
            w.visible = visible.as_ref();
            let layers_dir = {
                let dest = w.dest.as_fd();
                w.mkdir(dest, OsStr::new("layers"))
                    .map_err(|(o, e)| layout_err("layers", o, e))?;
                open_dir(dest, OsStr::new("layers")).map_err(|(o, e)| layout_err("layers", o, e))?
            };
            fchmod(&layers_dir, Perm::from_bits_truncate(0o700))
                .map_err(|e| layout_err("layers", Op::Chmod, e.into()))?;
            // Layers below an opaque layer root show nothing: not created, not mounted.
            for (li, tree) in plan.layers.iter().enumerate().skip(plan.first_visible) {
                let name = layer_dir_name(li, layers[li].digest);
                let rel = Path::new("layers").join(&name);
                w.mkdir(layers_dir.as_fd(), OsStr::new(&name))
                    .map_err(|(o, e)| layout_err(&rel.to_string_lossy(), o, e))?;
                let root = open_dir(layers_dir.as_fd(), OsStr::new(&name))
                    .map_err(|(o, e)| layout_err(&rel.to_string_lossy(), o, e))?;
                w.walk(root, &rel, layers[li].digest, tree)?;
                w.out.lowerdirs.push(dest_abs.join(&rel));
            }
            w.out.lowerdirs.reverse();
        }
    }
    w.hooks.progress(Progress {
        done: w.done,
        total: w.total,
    });
    w.dropped.log();
    Ok(w.out)
}

fn layout_err(path: &str, op: Op, source: io::Error) -> UnpackError {
    UnpackError::Io {
        layer: "-".to_owned(),
        path: path.to_owned(),
        op,
        source,
    }
}

fn open_dir(parent: BorrowedFd<'_>, name: &OsStr) -> OpResult<File> {
    openat(
        parent,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Perm::empty(),
    )
    .map(File::from)
    .map_err(op(Op::OpenDir))
}

/// `/proc/self/fd/<dir>/<name>`: a path naming `name` in the already open `dir` without
/// resolving anything else, for the path-only xattr calls (`lsetxattr` does not follow the
/// final symlink).
fn proc_path(dir: BorrowedFd<'_>, name: &OsStr) -> PathBuf {
    let mut p = crate::sys::fdpass::proc_fd_path(dir);
    p.push(name);
    p
}

impl Writer<'_> {
    fn entry(&self, r: EntryRef) -> &Entry {
        &self.layers[r.layer].entries[r.entry]
    }

    fn err(&self, layer: &str, rel: &Path, (op, source): (Op, io::Error)) -> UnpackError {
        UnpackError::Io {
            layer: layer.to_owned(),
            path: rel.to_string_lossy().into_owned(),
            op,
            source,
        }
    }

    fn mkdir(&self, parent: BorrowedFd<'_>, name: &OsStr) -> OpResult<()> {
        match mkdirat(parent, name, Perm::from_bits_truncate(0o700)) {
            Ok(()) => Ok(()),
            // An existing directory is reused; open_dir refuses anything else.
            Err(Errno::EEXIST) if self.opts.allow_nonempty => Ok(()),
            Err(e) => Err((Op::Create, e.into())),
        }
    }

    fn tick(&mut self) {
        self.done += 1;
        let every = self.opts.progress_every;
        if every > 0 && self.done % every == 0 {
            tracing::debug!(done = self.done, total = self.total, "unpack progress");
            self.hooks.progress(Progress {
                done: self.done,
                total: self.total,
            });
        }
    }

    /// Walks one tree in key order, which puts each directory right before its subtree.
    fn tree(
        &mut self,
        root: File,
        prefix: &Path,
        tree_layer: &str,
        nodes: &BTreeMap<Key, Node>,
    ) -> Result<(), UnpackError> {
        let (meta, opaque) = plan::root_of(nodes);
        let mut stack = vec![OpenDir {
            key: &[],
            dir: root,
            meta,
            opaque,
        }];
        self.out.stats.dirs += 1;
        self.tick();
        for (key, node) in nodes.iter().filter(|(k, _)| !k.is_empty()) {
            let parent = plan::parent(key);
            while stack.last().is_some_and(|o| o.key != parent) {
                if let Some(o) = stack.pop() {
                    self.finish_dir(o, prefix, tree_layer)?;
                }
            }
            let Some(top) = stack.last() else {
                return Err(self.err(
                    tree_layer,
                    &prefix.join(plan::display(key)),
                    (
                        Op::OpenDir,
                        io::Error::other("parent missing from the plan"),
                    ),
                ));
            };
            let name = OsStr::from_bytes(plan::name(key));
            let rel = prefix.join(plan::display(key));
            let dir = top.dir.as_fd();
            match *node {
                Node::Dir { meta, opaque } => {
                    let layer = meta.map_or(tree_layer, |r| self.layers[r.layer].digest);
                    let opened = self
                        .mkdir(dir, name)
                        .and_then(|()| open_dir(dir, name))
                        .map_err(|e| self.err(layer, &rel, e))?;
                    self.out.stats.dirs += 1;
                    stack.push(OpenDir {
                        key,
                        dir: opened,
                        meta,
                        opaque,
                    });
                }
                Node::Leaf { inode, via } => {
                    let layer = self.layers[via.layer].digest;
                    self.leaf(dir, name, &rel, inode)
                        .map_err(|e| self.err(layer, &rel, e))?;
                }
                Node::Whiteout => {
                    self.whiteout(dir, name)
                        .map_err(|e| self.err(tree_layer, &rel, e))?;
                }
            }
            self.tick();
        }
        while let Some(o) = stack.pop() {
            self.finish_dir(o, prefix, tree_layer)?;
        }
        Ok(())
    }

    fn whiteout(&mut self, dir: BorrowedFd<'_>, name: &OsStr) -> OpResult<()> {
        mknodat(dir, name, SFlag::S_IFCHR, Perm::empty(), makedev(0, 0)).map_err(op(Op::Create))?;
        self.out.stats.whiteouts += 1;
        Ok(())
    }

    /// One tree: with a sink, in parallel ([`Writer::tree_par`]), else in one walk.
    fn walk(
        &mut self,
        root: File,
        prefix: &Path,
        tree_layer: &str,
        nodes: &BTreeMap<Key, Node>,
    ) -> Result<(), UnpackError> {
        if self.sink.is_some() {
            self.tree_par(root, prefix, tree_layer, nodes)
        } else {
            self.tree(root, prefix, tree_layer, nodes)
        }
    }

    /// Opens the directory `key` of the tree at `prefix`, beneath the destination, refusing
    /// symlinks, `..` and mount crossings on the way ([`open_dir_beneath`]).
    fn open_rel(&self, prefix: &Path, key: &[u8]) -> OpResult<File> {
        let rel = prefix.join(plan::display(key));
        open_dir_beneath(self.dest.as_fd(), &rel)
            .map(File::from)
            .map_err(|e| (Op::OpenDir, e))
    }

    /// [`Writer::tree`] with the leaves spread over threads: (1) every directory, parents
    /// first, in one walk; (2) the leaves grouped by directory, the groups split into
    /// [`UNPACK_THREADS`] runs of about equal size, each run on its own thread opening its
    /// directories beneath the destination; (3) names of inodes another group created
    /// (hardlinks) on this thread; (4) the directories' metadata, deepest first.
    fn tree_par(
        &mut self,
        root: File,
        prefix: &Path,
        tree_layer: &str,
        nodes: &BTreeMap<Key, Node>,
    ) -> Result<(), UnpackError> {
        let (root_meta, root_opaque) = plan::root_of(nodes);
        self.out.stats.dirs += 1;
        self.done += 1;
        let top = root
            .try_clone()
            .map_err(|e| self.err(tree_layer, prefix, (Op::OpenDir, e)))?;
        let mut stack: Vec<(&[u8], File)> = vec![(&[], top)];
        let mut dirs: Vec<(&[u8], Option<EntryRef>, bool)> = Vec::new();
        let mut leaves: Vec<(&[u8], Node)> = Vec::new();
        let mut later: Vec<(&[u8], Node)> = Vec::new();
        let mut creators: HashSet<EntryRef> = HashSet::new();
        for (key, node) in nodes.iter().filter(|(k, _)| !k.is_empty()) {
            match *node {
                Node::Dir { meta, opaque } => {
                    let parent = plan::parent(key);
                    while stack.last().is_some_and(|(k, _)| *k != parent) {
                        stack.pop();
                    }
                    let rel = prefix.join(plan::display(key));
                    let layer = meta.map_or(tree_layer, |r| self.layers[r.layer].digest);
                    let Some((_, dir)) = stack.last() else {
                        return Err(self.err(
                            layer,
                            &rel,
                            (
                                Op::OpenDir,
                                io::Error::other("parent missing from the plan"),
                            ),
                        ));
                    };
                    let name = OsStr::from_bytes(plan::name(key));
                    let opened = self
                        .mkdir(dir.as_fd(), name)
                        .and_then(|()| open_dir(dir.as_fd(), name))
                        .map_err(|e| self.err(layer, &rel, e))?;
                    self.out.stats.dirs += 1;
                    self.done += 1;
                    stack.push((key, opened));
                    dirs.push((key, meta, opaque));
                }
                Node::Leaf { inode, .. } => {
                    // The first name of an inode (in path order) creates it, as in `tree`.
                    if self.inodes.contains_key(&inode) || !creators.insert(inode) {
                        later.push((key, *node));
                    } else {
                        leaves.push((key, *node));
                    }
                }
                Node::Whiteout => leaves.push((key, *node)),
            }
        }
        drop(stack);
        // Leaves grouped by directory (stable: path order inside a directory).
        leaves.sort_by(|a, b| plan::parent(a.0).cmp(plan::parent(b.0)));
        let threads = if leaves.len() < PARALLEL_MIN_LEAVES {
            1
        } else {
            unpack_threads()
        };
        let mut runs: Vec<&[(&[u8], Node)]> = Vec::new();
        let per = leaves.len().div_ceil(threads).max(1);
        let mut start = 0;
        for i in 1..=leaves.len() {
            let end_of_group =
                i == leaves.len() || plan::parent(leaves[i].0) != plan::parent(leaves[i - 1].0);
            if end_of_group && (i - start >= per || i == leaves.len()) {
                runs.push(&leaves[start..i]);
                start = i;
            }
        }
        let sh = Shared {
            layers: self.layers,
            opts: self.opts,
            dest_abs: self.dest_abs,
            dest: self.dest.as_fd(),
            visible: self.visible,
            sink: self.sink,
            devices_ok: self.devices_ok,
        };
        let parts: Vec<Result<Part, UnpackError>> = if runs.len() <= 1 {
            runs.iter()
                .map(|run| part(sh, prefix, tree_layer, &root, run))
                .collect()
        } else {
            let root = &root;
            std::thread::scope(|scope| {
                let handles: Vec<_> = runs
                    .iter()
                    .map(|run| scope.spawn(move || part(sh, prefix, tree_layer, root, run)))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join().unwrap_or_else(|_| {
                            Err(UnpackError::Io {
                                layer: tree_layer.to_owned(),
                                path: prefix.to_string_lossy().into_owned(),
                                op: Op::Create,
                                source: io::Error::other("unpack thread panicked"),
                            })
                        })
                    })
                    .collect()
            })
        };
        let mut failed = None;
        for part in parts {
            match part {
                Ok(p) => self.merge(p),
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        // Names of inodes created above (or in a lower layer's tree).
        let mut open: Option<(&[u8], File)> = None;
        for (key, node) in later {
            let Node::Leaf { inode, via } = node else {
                continue;
            };
            let layer = self.layers[via.layer].digest;
            let rel = prefix.join(plan::display(key));
            let parent = plan::parent(key);
            if open.as_ref().is_none_or(|(k, _)| *k != parent) {
                let dir = self
                    .open_rel(prefix, parent)
                    .map_err(|e| self.err(layer, &rel, e))?;
                open = Some((parent, dir));
            }
            let Some((_, dir)) = &open else { continue };
            let name = OsStr::from_bytes(plan::name(key));
            self.leaf(dir.as_fd(), name, &rel, inode)
                .map_err(|e| self.err(layer, &rel, e))?;
            self.done += 1;
        }
        drop(open);
        // Directory metadata, every directory after all of its subtree.
        for &(key, meta, opaque) in dirs.iter().rev() {
            let layer = meta.map_or(tree_layer, |r| self.layers[r.layer].digest);
            let dir = self
                .open_rel(prefix, key)
                .map_err(|e| self.err(layer, &prefix.join(plan::display(key)), e))?;
            self.finish_dir(
                OpenDir {
                    key,
                    dir,
                    meta,
                    opaque,
                },
                prefix,
                tree_layer,
            )?;
        }
        self.finish_dir(
            OpenDir {
                key: &[],
                dir: root,
                meta: root_meta,
                opaque: root_opaque,
            },
            prefix,
            tree_layer,
        )
    }

    /// Takes what one [`part`] created.
    fn merge(&mut self, p: Part) {
        let (a, b) = (&mut self.out.stats, &p.out.stats);
        let UnpackStats {
            dirs,
            files,
            symlinks,
            hardlinks,
            fifos,
            devices,
            whiteouts,
            skipped,
            bytes,
        } = b;
        a.dirs += dirs;
        a.files += files;
        a.symlinks += symlinks;
        a.hardlinks += hardlinks;
        a.fifos += fifos;
        a.devices += devices;
        a.whiteouts += whiteouts;
        a.skipped += skipped;
        a.bytes += bytes;
        self.out.placeholders.extend(p.out.placeholders);
        self.inodes.extend(p.inodes);
        self.dropped.merge(p.dropped);
        self.done += p.done;
        self.devices_ok &= p.devices_ok;
    }

    fn finish_dir(
        &self,
        o: OpenDir<'_>,
        prefix: &Path,
        tree_layer: &str,
    ) -> Result<(), UnpackError> {
        let (meta, layer) = match o.meta {
            Some(r) => (self.entry(r), self.layers[r.layer].digest),
            None => (&self.default_dir, tree_layer),
        };
        finish_fd(&o.dir, meta, o.opaque, &self.dropped)
            .map(drop)
            .map_err(|e| self.err(layer, &prefix.join(plan::display(o.key)), e))
    }

    /// Creates a non-directory: a new name for an inode created before, or the inode.
    fn leaf(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        rel: &Path,
        inode: EntryRef,
    ) -> OpResult<()> {
        if let Some(first) = self.inodes.get(&inode) {
            self.link(first, dir, name)?;
            self.out.stats.hardlinks += 1;
            return Ok(());
        }
        let layers = self.layers;
        let e = &layers[inode.layer].entries[inode.entry];
        match e.kind {
            EntryKind::File => {
                let mut file = create_file_op(dir, name, e.size, self.opts.sparse, e.mode)?;
                let data = self
                    .hooks
                    .write_data(inode.layer, inode.entry, e, &mut file)
                    .map_err(|err| (Op::WriteData, err))?;
                let st = finish_fd(&file, e, false, &self.dropped)?;
                self.out.stats.files += 1;
                let visible = self.visible.is_none_or(|v| v.contains(&inode));
                if data == FileData::Placeholder && e.size > 0 && visible {
                    self.out.stats.bytes += e.size;
                    let p = Placeholder {
                        path: self.dest_abs.join(rel).into(),
                        layer: inode.layer,
                        entry: inode.entry,
                        size: e.size,
                    };
                    if let Some(sink) = self.sink {
                        sink.created(&p, e, &file, &st)
                            .map_err(|err| (Op::Register, err))?;
                    }
                    self.out.placeholders.push(p);
                }
            }
            EntryKind::Symlink => {
                let target = e.link.as_deref().unwrap_or_default();
                symlinkat(target, dir, name).map_err(op(Op::Create))?;
                special_meta(dir, name, e, false, &self.dropped)?;
                self.out.stats.symlinks += 1;
            }
            EntryKind::Fifo => {
                mknodat(dir, name, SFlag::S_IFIFO, Perm::empty(), 0).map_err(op(Op::Create))?;
                special_meta(dir, name, e, true, &self.dropped)?;
                self.out.stats.fifos += 1;
            }
            EntryKind::Char { major, minor } | EntryKind::Block { major, minor } => {
                let kind = if matches!(e.kind, EntryKind::Char { .. }) {
                    SFlag::S_IFCHR
                } else {
                    SFlag::S_IFBLK
                };
                if !self.devices_ok {
                    tracing::debug!(path = %rel.display(), "device node skipped");
                    self.out.stats.skipped += 1;
                    return Ok(());
                }
                let dev = makedev(u64::from(major), u64::from(minor));
                match mknodat(dir, name, kind, Perm::empty(), dev) {
                    Ok(()) => {}
                    Err(Errno::EPERM) => {
                        tracing::warn!(path = %rel.display(), "mknod not permitted: device nodes skipped");
                        self.devices_ok = false;
                        self.out.stats.skipped += 1;
                        return Ok(());
                    }
                    Err(err) => return Err((Op::Create, err.into())),
                }
                special_meta(dir, name, e, true, &self.dropped)?;
                self.out.stats.devices += 1;
            }
            EntryKind::Dir | EntryKind::Hardlink => {
                return Err((
                    Op::Create,
                    io::Error::other("planned inode is a directory or hardlink"),
                ));
            }
        }
        self.inodes.insert(inode, rel.to_owned());
        Ok(())
    }

    /// Gives the inode first created at `first` (relative to the destination) the new name
    /// `name` in `dir`.
    fn link(&self, first: &Path, dir: BorrowedFd<'_>, name: &OsStr) -> OpResult<()> {
        let src_name = first.file_name().unwrap_or_default();
        let src_parent = first.parent().unwrap_or(Path::new(""));
        let src_dir = open_dir_beneath(self.dest.as_fd(), src_parent).map_err(|e| (Op::Link, e))?;
        linkat(&src_dir, src_name, dir, name, AtFlags::empty()).map_err(op(Op::Link))
    }
}

/// Owner, mode, xattrs and times of a symlink, fifo or device node, never following it.
fn special_meta(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    e: &Entry,
    chmod: bool,
    dropped: &Dropped,
) -> OpResult<()> {
    fchownat(
        dir,
        name,
        Some(Uid::from_raw(e.uid)),
        Some(Gid::from_raw(e.gid)),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(op(Op::Chown))?;
    if chmod {
        fchmodat(dir, name, perm(e.mode), FchmodatFlags::NoFollowSymlink).map_err(op(Op::Chmod))?;
    }
    let mut path = None;
    for (n, value) in e
        .xattrs
        .iter()
        .filter(|(n, _)| keep_xattr(n, false, dropped))
    {
        let path = path.get_or_insert_with(|| proc_path(dir, name));
        xattr::set(&*path, n, value).map_err(|err| (Op::Xattr(n.clone()), err))?;
    }
    let t = mtime(e);
    utimensat(dir, name, &t, &t, UtimensatFlags::NoFollowSymlink).map_err(op(Op::Times))
}
