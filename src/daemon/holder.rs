//! The fd holder: a minimal process that keeps a duplicate of the daemon's fanotify group fd.
//!
//! Owns the holder's socket protocol and its process. The kernel fails open: if the last fd
//! of a pre-content group closes, every blocked reader continues and reads zeros. While the
//! holder keeps a duplicate, the group and its marks outlive a crashed or stopped daemon;
//! readers block in the kernel until a successor takes the fd back over `STATE_DIR/holder.sock`
//! (`SCM_RIGHTS`) and answers them. The holder reads no events and answers nothing.
//!
//! It keeps two groups, one per [`Slot`]: the pre-content group of range fills, and the
//! content-class group of the overlay open watch ([`crate::overlay`]), whose permission events
//! block openers of overlay rootfs files in the same way.
//!
//! Protocol (one byte per message, an fd attached where noted): `P`+fd / `O`+fd: keep this
//! pre-content / overlay-watch group (answer `K`); `G` / `H`: give it back (answer `Y`+fd, or
//! `N` when holding none); `Q`: exit (answer `K`). A holder that predates the overlay slot
//! answers `?` to `O` and `H`.
//!
//! The group fd is the power to answer every reader on the node: the socket is bound 0600
//! with no window before it is ([`super::peer::bind`]), in the 0700 state directory, and
//! every connection is checked before anything is read from it ([`admit`]): only a root
//! process running this very program (the daemon, a successor) is served.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::sys::fdpass::{recv_fd, send_fd};

/// Errors of the holder and its client.
#[derive(Debug, thiserror::Error)]
pub enum HolderError {
    /// The holder's socket failed.
    #[error("fd holder socket {path}")]
    Socket {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The holder answered something unexpected.
    #[error("fd holder at {path} answered {answer:?}")]
    Protocol {
        /// The socket.
        path: PathBuf,
        /// The answer byte.
        answer: Option<u8>,
    },
    /// The holder process could not be started.
    #[error("starting the fd holder ({exe})")]
    Spawn {
        /// The program.
        exe: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Which of the daemon's groups a message is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// The pre-content group (range fills of direct trees).
    PreContent,
    /// The overlay open watch's content-class group.
    OverlayWatch,
}

impl Slot {
    fn put_tag(self) -> u8 {
        match self {
            Slot::PreContent => b'P',
            Slot::OverlayWatch => b'O',
        }
    }

    fn take_tag(self) -> u8 {
        match self {
            Slot::PreContent => b'G',
            Slot::OverlayWatch => b'H',
        }
    }

    fn index(self) -> usize {
        match self {
            Slot::PreContent => 0,
            Slot::OverlayWatch => 1,
        }
    }

    const ALL: [Slot; 2] = [Slot::PreContent, Slot::OverlayWatch];
}

fn sock_err(path: &Path) -> impl Fn(std::io::Error) -> HolderError + '_ {
    move |source| HolderError::Socket {
        path: path.to_path_buf(),
        source,
    }
}

/// Runs the holder on `socket` until told to quit. Writes its pid next to the socket
/// (`holder.pid`).
pub fn run(socket: &Path) -> Result<(), HolderError> {
    if UnixStream::connect(socket).is_ok() {
        return Err(HolderError::Socket {
            path: socket.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::AddrInUse, "a holder is running"),
        });
    }
    let _ = std::fs::remove_file(socket);
    let listener = super::peer::bind(socket, 0o600, None).map_err(sock_err(socket))?;
    if let Some(dir) = socket.parent() {
        let _ = std::fs::write(dir.join("holder.pid"), std::process::id().to_string());
    }
    info!(socket = %socket.display(), "fd holder ready");
    let mut held: [Option<OwnedFd>; 2] = [None, None];
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        if !admit(&conn) {
            continue;
        }
        loop {
            let msg = match recv_fd(&conn) {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) => {
                    warn!(error = %e, "fd holder: bad message");
                    break;
                }
            };
            let put = Slot::ALL.into_iter().find(|s| s.put_tag() == msg.0);
            let take = Slot::ALL.into_iter().find(|s| s.take_tag() == msg.0);
            let r = match (msg, put, take) {
                ((_, Some(fd)), Some(slot), _) => {
                    held[slot.index()] = Some(fd);
                    send_fd(&conn, b'K', None)
                }
                (_, _, Some(slot)) => match &held[slot.index()] {
                    Some(fd) => send_fd(&conn, b'Y', Some(fd.as_fd())),
                    None => send_fd(&conn, b'N', None),
                },
                ((b'Q', _), _, _) => {
                    let _ = send_fd(&conn, b'K', None);
                    let _ = std::fs::remove_file(socket);
                    info!("fd holder exiting");
                    return Ok(());
                }
                _ => send_fd(&conn, b'?', None),
            };
            if r.is_err() {
                break;
            }
        }
    }
    Ok(())
}

/// Whether the peer of an accepted connection may talk to the holder: a root process
/// running this program (`SO_PEERCRED`, `/proc/PID/exe`). Anyone else is disconnected
/// unanswered.
fn admit(conn: &UnixStream) -> bool {
    match super::peer::peer(conn) {
        Ok(p) if super::peer::is_fanfill(&p) => true,
        Ok(p) => {
            warn!(
                uid = p.uid,
                pid = p.pid,
                "fd holder: connection refused (not root running fanfill)"
            );
            false
        }
        Err(e) => {
            warn!(error = %e, "fd holder: connection refused (no peer credentials)");
            false
        }
    }
}

fn request(
    socket: &Path,
    tag: u8,
    fd: Option<std::os::fd::BorrowedFd<'_>>,
) -> Result<(u8, Option<OwnedFd>), HolderError> {
    let conn = UnixStream::connect(socket).map_err(sock_err(socket))?;
    send_fd(&conn, tag, fd).map_err(sock_err(socket))?;
    match recv_fd(&conn).map_err(sock_err(socket))? {
        Some(m) => Ok(m),
        None => Err(HolderError::Protocol {
            path: socket.to_path_buf(),
            answer: None,
        }),
    }
}

/// Whether a holder answers on `socket`.
pub fn is_running(socket: &Path) -> bool {
    UnixStream::connect(socket).is_ok()
}

/// Takes a duplicate of the group fd held in `slot`, if a holder runs and holds one.
pub fn take(socket: &Path, slot: Slot) -> Result<Option<OwnedFd>, HolderError> {
    if !is_running(socket) {
        return Ok(None);
    }
    match request(socket, slot.take_tag(), None)? {
        (b'Y', Some(fd)) => Ok(Some(fd)),
        (b'N', _) => Ok(None),
        (a, _) => Err(HolderError::Protocol {
            path: socket.to_path_buf(),
            answer: Some(a),
        }),
    }
}

/// Hands the holder a duplicate of a group fd to keep in `slot`.
pub fn put(socket: &Path, slot: Slot, fd: std::os::fd::BorrowedFd<'_>) -> Result<(), HolderError> {
    match request(socket, slot.put_tag(), Some(fd))? {
        (b'K', _) => Ok(()),
        (a, _) => Err(HolderError::Protocol {
            path: socket.to_path_buf(),
            answer: Some(a),
        }),
    }
}

/// Stops the holder whose pid `STATE_DIR/holder.pid` records (after checking that this pid
/// runs `holder --socket STATE_DIR/holder.sock`) with SIGTERM, and waits up to 10 s for it
/// to exit. Its groups close: readers blocked on them are let through, so do this only when
/// nothing is served (tearing a node's fanfill down, tests). For processes the holder does
/// not serve (see [`admit`]); a fanfill process can also use [`quit`]. Returns whether a
/// holder was stopped.
pub fn terminate(state_dir: &Path) -> bool {
    let Some(pid) = std::fs::read_to_string(state_dir.join("holder.pid"))
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok())
    else {
        return false;
    };
    let sock = state_dir.join("holder.sock");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    if !(args.contains(&&b"holder"[..]) && args.contains(&sock.as_os_str().as_encoded_bytes())) {
        return false;
    }
    let pid = nix::unistd::Pid::from_raw(pid);
    if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).is_err() {
        return false;
    }
    let alive = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|st| st.rsplit(") ").next().is_some_and(|r| !r.starts_with('Z')))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// Tells the holder to exit (its group closes: do this only when nothing is served).
pub fn quit(socket: &Path) -> Result<(), HolderError> {
    request(socket, b'Q', None).map(|_| ())
}

/// Starts `exe holder --socket SOCKET` in its own process group (a terminal's Ctrl-C or a
/// service manager stopping the daemon's group does not reach it) and waits until it answers.
pub fn spawn(exe: &Path, socket: &Path) -> Result<(), HolderError> {
    use std::os::unix::process::CommandExt;
    let err = |source| HolderError::Spawn {
        exe: exe.to_path_buf(),
        source,
    };
    std::process::Command::new(exe)
        .arg("holder")
        .arg("--socket")
        .arg(socket)
        .stdin(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(err)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if is_running(socket) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(err(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "holder did not come up",
    )))
}
