//! fanotify pre-content ABI: the group, its marks, the event reader and the answers.
//!
//! Owns every byte of the fanotify user ABI the crate uses: the Linux 6.14+ constants that
//! Debian's headers and the `libc` crate lack (pinned by compile-time asserts), a [`Group`]
//! built on nix's `fanotify_init`/`fanotify_mark`, an event reader that walks `event_len` and
//! every info record (range, pidfd) and hands each event out with its file as an [`OwnedFd`],
//! and a [`Response`] type that can only express "allow" or "deny with one of the seven errnos
//! the kernel accepts". It decides nothing: which files to mark and what to answer belong to
//! the fill engine ([`crate::fill`]).
//!
//! # Safety
//! The `unsafe` here is limited to taking ownership of descriptors the kernel installed in our
//! fd table (an event's file and pidfd, and a group fd handed over by a predecessor). Events
//! are decoded from the read buffer with explicit little-endian field reads, never by casting
//! pointers, so a short or malformed buffer is an error, not undefined behaviour.

use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::Arc;

use nix::errno::Errno;
use nix::sys::fanotify::{EventFFlags, Fanotify, InitFlags, MarkFlags, MaskFlags};

/// `FAN_ACCESS_PERM`: permission to read a file (content class).
pub const FAN_ACCESS_PERM: u64 = 0x0002_0000;
/// `FAN_OPEN_PERM`: permission to open a file (content class).
pub const FAN_OPEN_PERM: u64 = 0x0001_0000;
/// `FAN_OPEN_EXEC_PERM`: permission to open a file for execution (content class).
pub const FAN_OPEN_EXEC_PERM: u64 = 0x0004_0000;
/// `FAN_PRE_ACCESS` (Linux 6.14+): a range of the file is about to be accessed. An early draft
/// value `0x0008_0000` circulates in public code and is wrong.
pub const FAN_PRE_ACCESS: u64 = 0x0010_0000;
/// `FAN_Q_OVERFLOW`: the event queue overflowed (never with `FAN_UNLIMITED_QUEUE`).
pub const FAN_Q_OVERFLOW: u64 = 0x0000_4000;
/// `FAN_EVENT_ON_CHILD`: a directory mark applies to the directory's children.
pub const FAN_EVENT_ON_CHILD: u64 = 0x0800_0000;

const FAN_CLOEXEC: u32 = 0x0000_0001;
const FAN_NONBLOCK: u32 = 0x0000_0002;
const FAN_CLASS_CONTENT: u32 = 0x0000_0004;
const FAN_CLASS_PRE_CONTENT: u32 = 0x0000_0008;
const FAN_UNLIMITED_QUEUE: u32 = 0x0000_0010;
const FAN_UNLIMITED_MARKS: u32 = 0x0000_0020;
const FAN_REPORT_TID: u32 = 0x0000_0100;

const FAN_MARK_ADD: u32 = 0x0000_0001;
const FAN_MARK_REMOVE: u32 = 0x0000_0002;
const FAN_MARK_DONT_FOLLOW: u32 = 0x0000_0004;
const FAN_MARK_IGNORED_SURV_MODIFY: u32 = 0x0000_0040;
const FAN_MARK_FILESYSTEM: u32 = 0x0000_0100;
const FAN_MARK_IGNORE: u32 = 0x0000_0400;
const FAN_MARK_IGNORE_SURV: u32 = FAN_MARK_IGNORE | FAN_MARK_IGNORED_SURV_MODIFY;

const FAN_ALLOW: u32 = 0x01;
const FAN_DENY: u32 = 0x02;
const FAN_NOFD: i32 = -1;
const FANOTIFY_METADATA_VERSION: u8 = 3;

const FAN_EVENT_INFO_TYPE_PIDFD: u8 = 4;
const FAN_EVENT_INFO_TYPE_RANGE: u8 = 6;

/// `struct fanotify_event_metadata`: event_len u32, vers u8, reserved u8, metadata_len u16,
/// mask u64, fd i32, pid i32.
const METADATA_LEN: usize = 24;
/// `struct fanotify_event_info_header`: info_type u8, pad u8, len u16.
const INFO_HEADER_LEN: usize = 4;
/// `struct fanotify_event_info_range`: header, pad u32, offset u64, count u64.
const INFO_RANGE_LEN: usize = 24;
/// `struct fanotify_event_info_pidfd`: header, pidfd i32.
const INFO_PIDFD_LEN: usize = 8;
/// `struct fanotify_response`: fd i32, response u32.
const RESPONSE_LEN: usize = 8;

const _: () = assert!(FAN_PRE_ACCESS == 0x0010_0000);
const _: () = assert!(FAN_MARK_IGNORE_SURV == 0x440);
const _: () = assert!(METADATA_LEN == size_of::<libc::fanotify_event_metadata>());
const _: () = assert!(RESPONSE_LEN == size_of::<libc::fanotify_response>());
const _: () = assert!(INFO_HEADER_LEN == size_of::<libc::fanotify_event_info_header>());
const _: () = assert!(FANOTIFY_METADATA_VERSION == libc::FANOTIFY_METADATA_VERSION);

/// Errors of the fanotify layer. Each names the operation and carries the kernel's errno.
#[derive(Debug, thiserror::Error)]
pub enum FanotifyError {
    /// `fanotify_init` failed.
    #[error("fanotify_init({what}) failed; pre-content events need Linux 6.14+ and CAP_SYS_ADMIN")]
    Init {
        /// Which group class was asked for.
        what: &'static str,
        /// The kernel's answer.
        #[source]
        errno: Errno,
    },
    /// `fanotify_mark` failed on a path.
    #[error("fanotify_mark on {path} failed")]
    Mark {
        /// The object being marked.
        path: String,
        /// The kernel's answer (EOPNOTSUPP: the filesystem is not ext4, xfs or btrfs).
        #[source]
        errno: Errno,
    },
    /// A filesystem mark was asked for on the root filesystem.
    #[error(
        "refusing a filesystem-wide fanotify mark on the root filesystem ({path}): one stuck listener would freeze the machine"
    )]
    RootFilesystem {
        /// The path that lives on the root filesystem.
        path: String,
    },
    /// Reading events from the group failed.
    #[error("reading fanotify events failed")]
    Read(#[source] Errno),
    /// The kernel's event buffer did not parse.
    #[error("malformed fanotify event buffer: {0}")]
    Malformed(&'static str),
    /// Writing a response failed (EINVAL: bad errno or unknown event fd; ENOENT: no such event).
    #[error("writing fanotify response for event {event} failed")]
    Respond {
        /// The event's identity (its fd number in the group's owner process).
        event: i32,
        /// The kernel's answer.
        #[source]
        errno: Errno,
    },
    /// A descriptor handed to [`Group::from_owned_fd`] is not a fanotify group.
    #[error("descriptor is not a fanotify group")]
    NotAGroup,
}

/// Which kind of group to create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupClass {
    /// `FAN_CLASS_PRE_CONTENT` with `O_RDONLY|O_LARGEFILE|O_CLOEXEC` event fds and
    /// `FAN_REPORT_TID`: range fills of placeholders (`FAN_PRE_ACCESS`). The event fds are
    /// read-only on purpose: the kernel opens one for each event when it is read, and a
    /// writable one is a writer of the file, which makes any `execve` of it that does not
    /// carry the pre-content exemption (opened after its mark went) fail with ETXTBSY.
    PreContent,
    /// [`GroupClass::PreContent`] with `O_RDWR` event fds: a handler can fill through the
    /// event fd itself (no event raised by that write), at the price above. For measuring
    /// the kernel's round trip; the fill engine does not use it.
    PreContentWritable,
    /// `FAN_CLASS_CONTENT` with `O_RDONLY|O_LARGEFILE|O_CLOEXEC` event fds: open-time permission events
    /// on an overlay superblock (`FAN_OPEN_PERM|FAN_OPEN_EXEC_PERM`).
    Content,
}

/// A fanotify group: owns the group fd. Always `FAN_UNLIMITED_QUEUE` (a queue overflow lets a
/// reader through to holes), `FAN_UNLIMITED_MARKS`, `FAN_NONBLOCK` and `FAN_CLOEXEC`.
#[derive(Debug)]
pub struct Group {
    inner: Fanotify,
}

/// The errnos the kernel accepts in `FAN_DENY_ERRNO`, and therefore the only errnos a reader
/// of a placeholder can ever see from fanfill.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DenyErrno {
    /// `EIO`: the data could not be fetched or failed verification. The default failure.
    Io,
    /// `EPERM`: the access is not permitted (also what a plain `FAN_DENY` gives).
    Perm,
    /// `EBUSY`.
    Busy,
    /// `ETXTBSY`.
    TxtBsy,
    /// `EAGAIN`: try again later.
    Again,
    /// `ENOSPC`: the destination filesystem is full, the fill could not be written.
    NoSpc,
    /// `EDQUOT`: a quota stopped the fill.
    DQuot,
}

impl DenyErrno {
    fn errno(self) -> Errno {
        match self {
            DenyErrno::Io => Errno::EIO,
            DenyErrno::Perm => Errno::EPERM,
            DenyErrno::Busy => Errno::EBUSY,
            DenyErrno::TxtBsy => Errno::ETXTBSY,
            DenyErrno::Again => Errno::EAGAIN,
            DenyErrno::NoSpc => Errno::ENOSPC,
            DenyErrno::DQuot => Errno::EDQUOT,
        }
    }
}

/// An answer to a permission or pre-content event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Response {
    /// Let the access proceed.
    Allow,
    /// Fail the access with this errno (`FAN_DENY_ERRNO`). Pre-content groups only: the
    /// kernel refuses the answer (`EINVAL`) from any other class, and the access stays
    /// blocked.
    Deny(DenyErrno),
    /// Fail the access with a plain `FAN_DENY`: the opener sees `EPERM`. The only refusal
    /// a content-class group (the overlay open watch) can give.
    DenyPlain,
}

impl Response {
    fn bits(self) -> u32 {
        match self {
            Response::Allow => FAN_ALLOW,
            Response::Deny(e) => FAN_DENY | (((e.errno() as u32) & 0xff) << 24),
            Response::DenyPlain => FAN_DENY,
        }
    }
}

/// Identity of an event in flight: the number its fd has in the group owner's fd table.
/// The kernel matches a response only by this number, so a successor process that took the
/// group over can still answer events its predecessor read but never answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct EventId(i32);

impl EventId {
    /// The event's fd number (a journal slot, see [`crate::fill::EventJournal`]).
    pub fn raw(self) -> i32 {
        self.0
    }

    /// An id from a number recorded by a predecessor.
    pub fn from_raw(n: i32) -> EventId {
        EventId(n)
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// The byte range a pre-content event reports, exactly as the kernel sent it (page aligned;
/// may extend past EOF; `count == 0` means "the whole file", e.g. FICLONE or a growing
/// truncate).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventRange {
    /// First byte.
    pub offset: u64,
    /// Length in bytes; 0 means the whole file.
    pub count: u64,
}

/// One event read from a group. Holds the event's file (shared with whoever took it with
/// [`Event::share_file`]) and its pidfd, if reported. Dropping an unanswered permission
/// event does not answer it: the kernel keeps the reader blocked until the event is
/// answered by number or the group is closed. Answer every event with [`Group::respond`].
#[derive(Debug)]
pub struct Event {
    mask: u64,
    /// Shared, so that a fill can keep the file open past the answer without a `dup`.
    fd: Option<Arc<OwnedFd>>,
    id: i32,
    pid: i32,
    range: Option<EventRange>,
    pidfd: Option<OwnedFd>,
}

impl Event {
    /// The event mask (`FAN_PRE_ACCESS`, `FAN_OPEN_PERM`, ...).
    pub fn mask(&self) -> u64 {
        self.mask
    }

    /// Whether this is a pre-content access event.
    pub fn is_pre_access(&self) -> bool {
        self.mask & FAN_PRE_ACCESS != 0
    }

    /// Whether this is a queue overflow notice (no file attached).
    pub fn is_overflow(&self) -> bool {
        self.mask & FAN_Q_OVERFLOW != 0
    }

    /// Whether the event waits for an answer.
    pub fn needs_response(&self) -> bool {
        self.mask & (FAN_PRE_ACCESS | FAN_OPEN_PERM | FAN_OPEN_EXEC_PERM | FAN_ACCESS_PERM) != 0
            && self.fd.is_some()
    }

    /// The file being accessed, open with notifications suppressed (reads through it raise
    /// no events): read-only, or read-write for [`GroupClass::PreContentWritable`].
    pub fn file(&self) -> Option<BorrowedFd<'_>> {
        self.fd.as_ref().map(|f| f.as_fd())
    }

    /// The event's file, shared (the same open file, no `dup`): it stays open until the
    /// event and every holder have let it go; the answer does not need it.
    pub fn share_file(&self) -> Option<Arc<OwnedFd>> {
        self.fd.clone()
    }

    /// The accessing thread (with `FAN_REPORT_TID`) or process.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The range record of a pre-content event, if the kernel sent one.
    pub fn range(&self) -> Option<EventRange> {
        self.range
    }

    /// A pidfd of the accessing process, if the group asked for one.
    pub fn pidfd(&self) -> Option<BorrowedFd<'_>> {
        self.pidfd.as_ref().map(|f| f.as_fd())
    }

    /// The identity to answer this event by from another process (see [`EventId`]).
    pub fn id(&self) -> EventId {
        EventId(self.id)
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Takes ownership of a descriptor number the kernel just installed for us.
fn own_fd(fd: i32) -> Option<OwnedFd> {
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` comes from an event record the kernel wrote into our read buffer in this
    // call: it is a descriptor freshly installed in our fd table, and no other code knows
    // its number, so taking sole ownership (and closing it on drop) is sound.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Decodes a buffer returned by `read(2)` on a group fd. Owns every fd named in it, even
/// when it fails part-way, so no descriptor leaks.
fn parse_events(buf: &[u8], out: &mut Vec<Event>) -> Result<(), FanotifyError> {
    let mut at = 0;
    let mut err = None;
    while at + METADATA_LEN <= buf.len() {
        let event_len = u32_at(buf, at) as usize;
        let vers = buf[at + 4];
        let metadata_len = u16_at(buf, at + 6) as usize;
        if event_len < METADATA_LEN || at + event_len > buf.len() || metadata_len < METADATA_LEN {
            err.get_or_insert(FanotifyError::Malformed("event length out of bounds"));
            break;
        }
        let rec = &buf[at..at + event_len];
        let mask = u64_at(rec, 8);
        let fd = u32_at(rec, 16) as i32;
        let pid = u32_at(rec, 20) as i32;
        let mut event = Event {
            mask,
            fd: if fd == FAN_NOFD {
                None
            } else {
                own_fd(fd).map(Arc::new)
            },
            id: fd,
            pid,
            range: None,
            pidfd: None,
        };
        if vers != FANOTIFY_METADATA_VERSION {
            err.get_or_insert(FanotifyError::Malformed("unknown metadata version"));
        }
        let mut info = metadata_len.min(event_len);
        while info + INFO_HEADER_LEN <= event_len {
            let info_type = rec[info];
            let len = u16_at(rec, info + 2) as usize;
            if len < INFO_HEADER_LEN || info + len > event_len {
                err.get_or_insert(FanotifyError::Malformed("info record length out of bounds"));
                break;
            }
            match info_type {
                FAN_EVENT_INFO_TYPE_RANGE if len >= INFO_RANGE_LEN => {
                    event.range = Some(EventRange {
                        offset: u64_at(rec, info + 8),
                        count: u64_at(rec, info + 16),
                    });
                }
                FAN_EVENT_INFO_TYPE_PIDFD if len >= INFO_PIDFD_LEN => {
                    event.pidfd = own_fd(u32_at(rec, info + 4) as i32);
                }
                _ => {}
            }
            info += len;
        }
        out.push(event);
        at += event_len;
    }
    match err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn path_string(p: &Path) -> String {
    p.display().to_string()
}

impl Group {
    /// Creates a group of the given class. Fails with a typed error naming the class when the
    /// kernel lacks pre-content support (older than 6.14) or the caller lacks CAP_SYS_ADMIN.
    pub fn new(class: GroupClass) -> Result<Group, FanotifyError> {
        let base = FAN_CLOEXEC | FAN_NONBLOCK | FAN_UNLIMITED_QUEUE | FAN_UNLIMITED_MARKS;
        let (flags, fflags, what) = match class {
            GroupClass::PreContent => (
                base | FAN_CLASS_PRE_CONTENT | FAN_REPORT_TID,
                // Read-only, and O_CLOEXEC so no child inherits one: see GroupClass.
                libc::O_RDONLY | libc::O_LARGEFILE | libc::O_CLOEXEC,
                "FAN_CLASS_PRE_CONTENT",
            ),
            GroupClass::PreContentWritable => (
                base | FAN_CLASS_PRE_CONTENT | FAN_REPORT_TID,
                libc::O_RDWR | libc::O_LARGEFILE | libc::O_CLOEXEC,
                "FAN_CLASS_PRE_CONTENT",
            ),
            GroupClass::Content => (
                base | FAN_CLASS_CONTENT | FAN_REPORT_TID,
                libc::O_RDONLY | libc::O_LARGEFILE | libc::O_CLOEXEC,
                "FAN_CLASS_CONTENT",
            ),
        };
        let inner = Fanotify::init(
            InitFlags::from_bits_retain(flags),
            EventFFlags::from_bits_retain(fflags as u32),
        )
        .map_err(|errno| FanotifyError::Init { what, errno })?;
        Ok(Group { inner })
    }

    /// Probes once whether this kernel supports pre-content events on the filesystem holding
    /// `dir` (creates, marks and removes a scratch file there).
    pub fn probe_pre_content(dir: &Path) -> Result<(), FanotifyError> {
        let group = Group::new(GroupClass::PreContent)?;
        let probe = dir.join(format!(".fanfill-probe-{}", std::process::id()));
        let file = std::fs::File::create(&probe).map_err(|e| FanotifyError::Mark {
            path: path_string(&probe),
            errno: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
        })?;
        let res = group.mark_inode(file.as_fd(), FAN_PRE_ACCESS);
        let _ = std::fs::remove_file(&probe);
        res.map_err(|e| match e {
            FanotifyError::Mark { errno, .. } => FanotifyError::Mark {
                path: path_string(dir),
                errno,
            },
            other => other,
        })
    }

    /// Takes over a group fd from a predecessor (an fd holder, `SCM_RIGHTS`, `pidfd_getfd` or
    /// the service manager's fd store). Checks that the fd really is a fanotify group.
    pub fn from_owned_fd(fd: OwnedFd) -> Result<Group, FanotifyError> {
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .map_err(|_| FanotifyError::NotAGroup)?;
        if link.as_os_str() != "anon_inode:[fanotify]" {
            return Err(FanotifyError::NotAGroup);
        }
        // SAFETY: `fd` is an owned, open descriptor whose anon inode the kernel names
        // `[fanotify]`, i.e. a fanotify group; `Fanotify` only requires that.
        let inner = unsafe { Fanotify::from_owned_fd(fd) };
        Ok(Group { inner })
    }

    /// A duplicate of the group fd, to hand to an fd holder so the group (and its marks)
    /// outlive this process.
    pub fn try_clone_fd(&self) -> std::io::Result<OwnedFd> {
        self.inner.as_fd().try_clone_to_owned()
    }

    fn mark_raw(
        &self,
        flags: u32,
        mask: u64,
        dirfd: BorrowedFd<'_>,
        path: Option<&Path>,
        name: &dyn Fn() -> String,
    ) -> Result<(), FanotifyError> {
        self.inner
            .mark(
                MarkFlags::from_bits_retain(flags),
                MaskFlags::from_bits_retain(mask),
                dirfd,
                path,
            )
            .map_err(|errno| FanotifyError::Mark {
                path: name(),
                errno,
            })
    }

    /// Adds `mask` to the inode mark of the open file `file`. Inode marks are never evictable
    /// here: an evicted mark would let the next read see zeros without an event.
    pub fn mark_inode(&self, file: BorrowedFd<'_>, mask: u64) -> Result<(), FanotifyError> {
        self.mark_raw(FAN_MARK_ADD, mask, file, None, &|| fd_name(file))
    }

    /// Removes the inode mark of `file` entirely (the file is complete).
    pub fn unmark_inode(&self, file: BorrowedFd<'_>, mask: u64) -> Result<(), FanotifyError> {
        self.mark_raw(FAN_MARK_REMOVE, mask, file, None, &|| fd_name(file))
    }

    /// Adds `mask` to the inode mark of the object at `path` (not following a final symlink).
    pub fn mark_path(&self, path: &Path, mask: u64) -> Result<(), FanotifyError> {
        let cwd = cwd_fd();
        self.mark_raw(
            FAN_MARK_ADD | FAN_MARK_DONT_FOLLOW,
            mask,
            cwd,
            Some(path),
            &|| path_string(path),
        )
    }

    /// Marks the whole filesystem (superblock) holding `path`: every mount, bind mount and
    /// overlay clone of it. Refused on the root filesystem.
    pub fn mark_filesystem(&self, path: &Path, mask: u64) -> Result<(), FanotifyError> {
        let dev = |p: &Path| nix::sys::stat::stat(p).map(|s| s.st_dev);
        let (Ok(here), Ok(root)) = (dev(path), dev(Path::new("/"))) else {
            return Err(FanotifyError::Mark {
                path: path_string(path),
                errno: Errno::ENOENT,
            });
        };
        if here == root {
            return Err(FanotifyError::RootFilesystem {
                path: path_string(path),
            });
        }
        self.mark_raw(
            FAN_MARK_ADD | FAN_MARK_FILESYSTEM,
            mask,
            cwd_fd(),
            Some(path),
            &|| path_string(path),
        )
    }

    /// Removes `mask` from the filesystem mark of the superblock holding `path`.
    pub fn unmark_filesystem(&self, path: &Path, mask: u64) -> Result<(), FanotifyError> {
        self.mark_raw(
            FAN_MARK_REMOVE | FAN_MARK_FILESYSTEM,
            mask,
            cwd_fd(),
            Some(path),
            &|| path_string(path),
        )
    }

    /// Puts an ignore mark for `mask` (on the directory and its children) on `dir`, so that a
    /// broader mark does not report accesses under it (the daemon's cache).
    pub fn ignore_dir(&self, dir: &Path, mask: u64) -> Result<(), FanotifyError> {
        self.mark_raw(
            FAN_MARK_ADD | FAN_MARK_IGNORE_SURV,
            mask | FAN_EVENT_ON_CHILD,
            cwd_fd(),
            Some(dir),
            &|| path_string(dir),
        )
    }

    /// Reads the events available now into `out` (appending). Returns `Ok(false)` when none
    /// were ready (the group is non-blocking). `buf` is the caller's scratch buffer; 64 KiB is
    /// plenty.
    pub fn read_events(&self, buf: &mut [u8], out: &mut Vec<Event>) -> Result<bool, FanotifyError> {
        match nix::unistd::read(self.inner.as_fd(), buf) {
            Ok(0) => Ok(false),
            Ok(n) => parse_events(&buf[..n], out).map(|()| true),
            Err(Errno::EAGAIN) => Ok(false),
            Err(Errno::EINTR) => Ok(false),
            Err(e) => Err(FanotifyError::Read(e)),
        }
    }

    /// Waits up to `timeout_ms` for events, then reads them into `out` as
    /// [`Group::read_events`] does: `Ok(false)` when none came in time. For a thread of its
    /// own that serves the group without an async runtime.
    pub fn wait_events(
        &self,
        buf: &mut [u8],
        out: &mut Vec<Event>,
        timeout_ms: u16,
    ) -> Result<bool, FanotifyError> {
        let mut fds = [nix::poll::PollFd::new(
            self.inner.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(timeout_ms)) {
            Ok(0) | Err(Errno::EINTR) => Ok(false),
            Ok(_) => self.read_events(buf, out),
            Err(e) => Err(FanotifyError::Read(e)),
        }
    }

    /// Answers an event and lets go of it (its fd closes unless a holder shared it). Events
    /// that need no answer are just dropped.
    pub fn respond(&self, event: Event, response: Response) -> Result<(), FanotifyError> {
        if !event.needs_response() {
            return Ok(());
        }
        self.respond_id(event.id(), response)
    }

    /// Answers an event by identity: for events read by a predecessor that died before
    /// answering (see [`EventId`]).
    pub fn respond_id(&self, id: EventId, response: Response) -> Result<(), FanotifyError> {
        let mut msg = [0u8; RESPONSE_LEN];
        msg[..4].copy_from_slice(&id.0.to_ne_bytes());
        msg[4..].copy_from_slice(&response.bits().to_ne_bytes());
        match nix::unistd::write(self.inner.as_fd(), &msg) {
            Ok(_) => Ok(()),
            Err(errno) => Err(FanotifyError::Respond { event: id.0, errno }),
        }
    }
}

impl AsFd for Group {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.as_fd()
    }
}

impl AsRawFd for Group {
    fn as_raw_fd(&self) -> RawFd {
        self.inner.as_raw_fd()
    }
}

/// `FAN_OPEN`: a file was opened (notification).
const FAN_OPEN: u64 = 0x0000_0020;

/// Opens writable handles on files that raise no fanotify events when written, for filling
/// placeholders under a pre-content watch without a round trip through the engine's own
/// group for every write.
///
/// The only such handles the kernel makes are the fds of fanotify events (opened with
/// notifications suppressed). This owns a private notification-class group whose event fds
/// are `O_RDWR`; [`WriteOpener::open`] marks the file's inode for `FAN_OPEN` in it, opens the
/// file once (read-only, through `/proc/self/fd`) to raise that event, removes the mark again
/// and reads the group dry, keeping the fd of its own event and closing every other one. The
/// mark lives only for those few syscalls, under a lock, so nothing stays queued for a file
/// after `open` returns: every writable fd this makes is one the caller holds (and counts;
/// see `FileState::writers` in `crate::fill`), or one already closed. Opens by others in that
/// window also reach this group: their fds are closed at once, before `open` returns.
#[derive(Debug)]
pub struct WriteOpener {
    group: Fanotify,
    /// Serialises mark, trigger, unmark and drain; holds the read buffer.
    buf: std::sync::Mutex<Vec<u8>>,
}

impl WriteOpener {
    /// Creates the private group (`FAN_CLASS_NOTIF|FAN_REPORT_TID`, `O_RDWR` event fds).
    pub fn new() -> Result<WriteOpener, FanotifyError> {
        let group = Fanotify::init(
            InitFlags::from_bits_retain(FAN_CLOEXEC | FAN_NONBLOCK | FAN_REPORT_TID),
            EventFFlags::from_bits_retain(
                (libc::O_RDWR | libc::O_LARGEFILE | libc::O_CLOEXEC) as u32,
            ),
        )
        .map_err(|errno| FanotifyError::Init {
            what: "FAN_CLASS_NOTIF",
            errno,
        })?;
        Ok(WriteOpener {
            group,
            buf: std::sync::Mutex::new(vec![0u8; 16 << 10]),
        })
    }

    /// A new writable, notification-free open of the file behind `file` (the same inode:
    /// checked by device and inode number). Fails when the kernel could not open it for
    /// writing (for example ETXTBSY while an exec denies writers).
    pub fn open(&self, file: BorrowedFd<'_>) -> std::io::Result<std::fs::File> {
        use std::os::unix::fs::OpenOptionsExt;
        let tid = current_tid();
        let mut buf = self.buf.lock().unwrap_or_else(|p| p.into_inner());
        let mark = |flags: u32| {
            self.group.mark(
                MarkFlags::from_bits_retain(flags),
                MaskFlags::from_bits_retain(FAN_OPEN),
                file,
                None::<&Path>,
            )
        };
        mark(FAN_MARK_ADD)?;
        let trigger = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(format!("/proc/self/fd/{}", file.as_raw_fd()));
        let unmarked = mark(FAN_MARK_REMOVE);
        drop(trigger);
        // Read until the queue is empty: the mark is gone, so nothing more comes for this
        // file. Every fd but our own event's is closed here.
        let mut found = None;
        let mut events = Vec::new();
        loop {
            match nix::unistd::read(self.group.as_fd(), &mut buf[..]) {
                Ok(0) | Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
                Ok(n) => {
                    let parsed = parse_events(&buf[..n], &mut events);
                    for ev in events.drain(..) {
                        if found.is_none() && ev.pid == tid && ev.mask & FAN_OPEN != 0 {
                            found = ev.fd.and_then(|fd| Arc::try_unwrap(fd).ok());
                        }
                    }
                    parsed.map_err(|e| std::io::Error::other(e.to_string()))?;
                }
            }
        }
        drop(buf);
        unmarked?;
        let found = found.ok_or_else(|| {
            std::io::Error::other("no writable fanotify event fd for the file (ETXTBSY?)")
        })?;
        let (a, b) = (nix::sys::stat::fstat(file)?, nix::sys::stat::fstat(&found)?);
        if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino) {
            return Err(std::io::Error::other(
                "fanotify event fd names another file",
            ));
        }
        Ok(std::fs::File::from(found))
    }
}

/// A [`Group`] registered with the tokio reactor: `read_events` waits until the kernel has
/// events for us instead of polling.
#[derive(Debug)]
pub struct AsyncGroup {
    inner: tokio::io::unix::AsyncFd<std::sync::Arc<Group>>,
}

/// `Arc<Group>` hands the reactor the group's fd number; the `Arc` keeps the group (and so
/// the fd) alive for as long as the registration exists.
impl AsyncGroup {
    /// Registers the group with the current tokio runtime (must be called inside one).
    pub fn new(group: std::sync::Arc<Group>) -> std::io::Result<AsyncGroup> {
        // SAFETY: the fd is owned by `Group`, which the `Arc` keeps alive at least as long
        // as this `AsyncFd`; `Group::as_raw_fd` always returns that same descriptor, and
        // nothing closes it while the group lives.
        let inner = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(group, tokio::io::Interest::READABLE)
        }
        .map_err(std::io::Error::from)?;
        Ok(AsyncGroup { inner })
    }

    /// The group.
    pub fn group(&self) -> &Group {
        self.inner.get_ref()
    }

    /// Waits for events and appends them to `out` (at least one, unless the kernel woke us
    /// spuriously, in which case it waits again).
    pub async fn read_events(
        &self,
        buf: &mut [u8],
        out: &mut Vec<Event>,
    ) -> Result<(), FanotifyError> {
        loop {
            let mut guard =
                self.inner.readable().await.map_err(|e| {
                    FanotifyError::Read(Errno::from_raw(e.raw_os_error().unwrap_or(0)))
                })?;
            if self.inner.get_ref().read_events(buf, out)? {
                return Ok(());
            }
            guard.clear_ready();
        }
    }
}

/// A thread's reader of a group's events: waits in poll(2) like [`Group::wait_events`], but
/// after a batch it keeps reading without sleeping for up to `spin` before it waits again.
///
/// On a machine whose idle CPUs halt (every VM, most hosts in a deep C-state), putting the
/// serving thread to sleep and waking it for the next event costs more than serving a
/// local fill does: on this project's 2-vCPU machines a bare handler answers a 4 KiB miss
/// in about 49 µs p50 when it sleeps between events and about 16 µs when it spins for
/// 50 µs after each (`examples/fill_bench`). A reader that misses page after page raises
/// its next event within microseconds of being let through, so a short spin catches it.
/// The spin costs at most `spin` of CPU per batch of events, and nothing while no events
/// come: the reader only spins after a batch that was answered at once (the caller says so,
/// [`EventReader::answered_at_once`]); a reader whose event waits for a fetch raises no
/// new one soon.
pub struct EventReader {
    buf: Vec<u8>,
    spin: std::time::Duration,
    hot: bool,
}

impl EventReader {
    /// A reader that spins for `spin` after each batch (zero: never spins).
    pub fn new(spin: std::time::Duration) -> EventReader {
        EventReader {
            buf: vec![0u8; 64 << 10],
            spin,
            hot: false,
        }
    }

    /// Reads the next batch of `group`'s events into `out` (appending): at once if the last
    /// batch was answered at once and an event comes within the spin, else after waiting up
    /// to `timeout_ms`. `Ok(false)` when none came.
    pub fn next(
        &mut self,
        group: &Group,
        out: &mut Vec<Event>,
        timeout_ms: u16,
    ) -> Result<bool, FanotifyError> {
        if self.hot && !self.spin.is_zero() {
            let until = std::time::Instant::now() + self.spin;
            loop {
                if group.read_events(&mut self.buf, out)? {
                    return Ok(true);
                }
                if std::time::Instant::now() >= until {
                    break;
                }
                std::hint::spin_loop();
            }
        }
        let got = group.wait_events(&mut self.buf, out, timeout_ms)?;
        self.hot = got;
        Ok(got)
    }

    /// Whether any event of the batch just read was answered at once: only then does the
    /// next call spin. Without this call, any batch counts.
    pub fn answered_at_once(&mut self, any: bool) {
        self.hot = any;
    }
}

fn cwd_fd() -> BorrowedFd<'static> {
    // SAFETY: AT_FDCWD is a sentinel the kernel interprets as "the current directory"; it is
    // never closed, so borrowing it for 'static is sound.
    unsafe { BorrowedFd::borrow_raw(libc::AT_FDCWD) }
}

fn fd_name(fd: BorrowedFd<'_>) -> String {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "<open file>".into())
}

/// The calling thread's kernel thread id, as `FAN_REPORT_TID` reports it in [`Event::pid`].
pub fn current_tid() -> i32 {
    nix::unistd::gettid().as_raw()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(mask: u64, fd: i32, pid: i32, infos: &[Vec<u8>]) -> Vec<u8> {
        let len = METADATA_LEN + infos.iter().map(Vec::len).sum::<usize>();
        let mut b = Vec::new();
        b.extend_from_slice(&(len as u32).to_ne_bytes());
        b.push(FANOTIFY_METADATA_VERSION);
        b.push(0);
        b.extend_from_slice(&(METADATA_LEN as u16).to_ne_bytes());
        b.extend_from_slice(&mask.to_ne_bytes());
        b.extend_from_slice(&fd.to_ne_bytes());
        b.extend_from_slice(&pid.to_ne_bytes());
        for i in infos {
            b.extend_from_slice(i);
        }
        b
    }

    fn range_info(offset: u64, count: u64) -> Vec<u8> {
        let mut b = vec![FAN_EVENT_INFO_TYPE_RANGE, 0];
        b.extend_from_slice(&(INFO_RANGE_LEN as u16).to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(&offset.to_ne_bytes());
        b.extend_from_slice(&count.to_ne_bytes());
        b
    }

    #[test]
    fn parses_range_records_and_walks_event_len() {
        // Two events with range records, no fds (FAN_NOFD) so nothing is closed.
        let mut buf = record(FAN_PRE_ACCESS, FAN_NOFD, 7, &[range_info(4096, 8192)]);
        buf.extend(record(FAN_PRE_ACCESS, FAN_NOFD, 8, &[range_info(0, 0)]));
        let mut out = Vec::new();
        parse_events(&buf, &mut out).unwrap();
        assert_eq!(out.len(), 2, "a range record must not become an event");
        assert_eq!(out[0].pid(), 7);
        assert_eq!(
            out[0].range(),
            Some(EventRange {
                offset: 4096,
                count: 8192
            })
        );
        assert_eq!(
            out[1].range(),
            Some(EventRange {
                offset: 0,
                count: 0
            })
        );
        assert!(out[0].is_pre_access());
        assert!(!out[0].needs_response(), "no fd, nothing to answer");
    }

    #[test]
    fn rejects_truncated_records() {
        let mut buf = record(FAN_PRE_ACCESS, FAN_NOFD, 7, &[range_info(0, 4096)]);
        buf.truncate(40);
        let mut out = Vec::new();
        assert!(parse_events(&buf, &mut out).is_err());
        let mut bad = record(FAN_PRE_ACCESS, FAN_NOFD, 7, &[]);
        bad[0..4].copy_from_slice(&8u32.to_ne_bytes());
        assert!(parse_events(&bad, &mut Vec::new()).is_err());
    }

    #[test]
    fn response_bits_match_kernel_macro() {
        assert_eq!(Response::Allow.bits(), 1);
        assert_eq!(Response::Deny(DenyErrno::Io).bits(), 2 | (5 << 24));
        assert_eq!(Response::Deny(DenyErrno::NoSpc).bits(), 2 | (28 << 24));
        assert_eq!(Response::Deny(DenyErrno::DQuot).bits(), 2 | (122 << 24));
    }
}

/// [`EventReader`] on the real kernel: an inode mark on a file of a temp dir (never a mount
/// or filesystem mark), every blocked reader answered, and the group closed (which lets
/// any reader through) if an assertion fails.
#[cfg(test)]
mod reader_tests {
    use super::*;
    use std::fs::File;
    use std::os::unix::fs::FileExt;
    use std::time::Duration;

    #[test]
    fn an_event_reader_spins_after_events_and_only_then() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"bytes").unwrap();
        let group = Group::new(GroupClass::PreContent).unwrap();
        group
            .mark_inode(File::open(&path).unwrap().as_fd(), FAN_PRE_ACCESS)
            .unwrap();
        let mut reader = EventReader::new(Duration::from_secs(1));
        let mut events = Vec::new();
        // One pread of the whole file 100 ms from now: exactly one event.
        let read_later = || {
            let p = path.clone();
            std::thread::spawn(move || {
                let f = File::open(p)?;
                std::thread::sleep(Duration::from_millis(100));
                let mut b = [0u8; 5];
                f.read_exact_at(&mut b, 0).map(|()| b)
            })
        };
        let allow_one = |events: &mut Vec<Event>| {
            assert_eq!(events.len(), 1);
            group
                .respond(events.pop().unwrap(), Response::Allow)
                .unwrap();
        };

        // Idle (no events served yet): no spin, so a zero wait finds nothing even though a
        // read comes 100 ms later; a waiting call gets it.
        let first = read_later();
        assert!(!reader.next(&group, &mut events, 0).unwrap());
        assert!(events.is_empty());
        assert!(reader.next(&group, &mut events, 5000).unwrap());
        allow_one(&mut events);
        assert_eq!(&first.join().unwrap().unwrap(), b"bytes");

        // Hot (the last call found events): a zero wait still catches a read that comes
        // 100 ms later, within the 1 s spin.
        let second = read_later();
        assert!(reader.next(&group, &mut events, 0).unwrap());
        allow_one(&mut events);
        assert_eq!(&second.join().unwrap().unwrap(), b"bytes");

        // A spin that finds nothing (none comes) ends in the wait, and leaves it idle.
        assert!(!reader.next(&group, &mut events, 0).unwrap());
        assert!(!reader.hot);

        // A batch its caller did not answer at once: no spin after it.
        let third = read_later();
        assert!(reader.next(&group, &mut events, 5000).unwrap());
        reader.answered_at_once(false);
        let held = events.pop().unwrap();
        let fourth = read_later();
        assert!(!reader.next(&group, &mut events, 0).unwrap());
        group.respond(held, Response::Allow).unwrap();
        assert_eq!(&third.join().unwrap().unwrap(), b"bytes");
        assert!(reader.next(&group, &mut events, 5000).unwrap());
        allow_one(&mut events);
        assert_eq!(&fourth.join().unwrap().unwrap(), b"bytes");
    }
}
