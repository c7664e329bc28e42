//! Descriptor hand-over: passing one fd over a unix socket (`SCM_RIGHTS`) and reserving fd
//! numbers.
//!
//! Owns the two descriptor operations the daemon's crash takeover needs and that cannot be
//! written without `unsafe`: taking ownership of a descriptor the kernel installed from a
//! control message, and occupying given descriptor numbers in this process (so that the
//! kernel cannot hand a new fanotify event the number of a predecessor's unanswered event,
//! which a response would then match first). It knows nothing of fanotify or the daemon.
//!
//! # Safety
//! A received descriptor is owned exactly once, right after `recvmsg` installed it. A
//! reserved number is only ever claimed when `fcntl(F_GETFD)` says it is free, so no
//! descriptor owned elsewhere is replaced.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

/// Sends one tag byte, with `fd` attached when given.
pub fn send_fd(sock: &UnixStream, tag: u8, fd: Option<BorrowedFd<'_>>) -> std::io::Result<()> {
    let buf = [tag];
    let iov = [IoSlice::new(&buf)];
    let raw: Vec<RawFd> = fd.iter().map(|f| f.as_raw_fd()).collect();
    let cmsgs: Vec<ControlMessage<'_>> = if raw.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(&raw)]
    };
    sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsgs, MsgFlags::empty(), None)?;
    Ok(())
}

/// Receives one tag byte and the fd attached to it, if any. `Ok(None)` at end of stream.
pub fn recv_fd(sock: &UnixStream) -> std::io::Result<Option<(u8, Option<OwnedFd>)>> {
    let mut buf = [0u8; 1];
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut got: Option<OwnedFd> = None;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for fd in fds {
                // SAFETY: the kernel just installed `fd` in our table for this message;
                // nothing else knows the number, so we take sole ownership (extra fds are
                // closed on drop).
                let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                if got.is_none() {
                    got = Some(owned);
                }
            }
        }
    }
    if msg.bytes == 0 {
        return Ok(None);
    }
    Ok(Some((buf[0], got)))
}

/// Descriptor numbers held open (on `/dev/null`) so that nothing else gets them; released on
/// drop.
#[derive(Debug, Default)]
pub struct FdReservation {
    held: Vec<(i32, OwnedFd)>,
}

impl FdReservation {
    /// Occupies every free number in `from..=to`. Numbers already open are left alone (they
    /// are occupied anyway).
    pub fn reserve(from: i32, to: i32) -> std::io::Result<FdReservation> {
        let null = std::fs::File::open("/dev/null")?;
        let mut held = Vec::new();
        // F_DUPFD_CLOEXEC gives the lowest *free* number at or above `from`: it never
        // replaces a descriptor another thread holds (dup2/dup3 to a chosen number would),
        // so repeating it until the answer lies past `to` takes exactly the free numbers.
        loop {
            // SAFETY: F_DUPFD_CLOEXEC duplicates `null` (open, owned by this function) into a
            // new, previously free descriptor number chosen by the kernel.
            let n = unsafe { libc::fcntl(null.as_raw_fd(), libc::F_DUPFD_CLOEXEC, from.max(0)) };
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: `n` was just installed by the kernel for us and is owned by no one else.
            let fd = unsafe { OwnedFd::from_raw_fd(n) };
            if n > to {
                break;
            }
            held.push((n, fd));
        }
        // `null`'s own number may lie in the range: keep it too.
        if (from..=to).contains(&null.as_raw_fd()) {
            let n = null.as_raw_fd();
            held.push((n, OwnedFd::from(null)));
        }
        Ok(FdReservation { held })
    }

    /// Whether `n` is held by this reservation.
    pub fn holds(&self, n: i32) -> bool {
        self.held.iter().any(|(m, _)| *m == n)
    }

    /// Releases every number but those in `keep`.
    pub fn release_except(&mut self, keep: &[i32]) {
        self.held.retain(|(n, _)| keep.contains(n));
    }

    /// The numbers held.
    pub fn numbers(&self) -> Vec<i32> {
        self.held.iter().map(|(n, _)| *n).collect()
    }
}

/// Raises this process's soft limit on open descriptors to its hard limit (every event in
/// flight holds one fd, and a successor reserves every number its predecessor used).
/// Returns the new soft limit.
pub fn raise_nofile_limit() -> std::io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` into the struct we own and pass by pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit only reads the struct we pass by pointer.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

/// `/proc/self/fd/N` for an open descriptor: a path naming the open file itself (what
/// `readlink` shows is where it is now), for path-only calls on it.
pub fn proc_fd_path(fd: impl AsFd) -> std::path::PathBuf {
    std::path::PathBuf::from(format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_an_fd_and_a_tag() {
        let (a, b) = UnixStream::pair().unwrap();
        let f = tempfile::tempfile().unwrap();
        send_fd(&a, b'P', Some(f.as_fd())).unwrap();
        let (tag, fd) = recv_fd(&b).unwrap().unwrap();
        assert_eq!(tag, b'P');
        assert!(fd.is_some());
        send_fd(&a, b'N', None).unwrap();
        let (tag, fd) = recv_fd(&b).unwrap().unwrap();
        assert_eq!((tag, fd.is_none()), (b'N', true));
        drop(a);
        assert!(recv_fd(&b).unwrap().is_none());
    }

    #[test]
    fn reserved_numbers_are_not_handed_out() {
        let probe = std::fs::File::open("/dev/null").unwrap();
        let n = probe.as_raw_fd();
        drop(probe);
        let r = FdReservation::reserve(n, n + 3).unwrap();
        let next = std::fs::File::open("/dev/null").unwrap();
        assert!(next.as_raw_fd() > n + 3 || !r.holds(next.as_raw_fd()));
    }
}
