//! The daemon's local sockets: created with no window in which anyone else can connect, and
//! every connection's peer checked (`SO_PEERCRED`) before a byte of it is read.
//!
//! Owns binding a unix socket with its final owner and mode ([`bind`]: in a fresh 0700
//! directory, then renamed into place, so no connection can be made to it before it is
//! locked down, whatever the umask and the mode of the directory it ends up in), reading a
//! peer's credentials, and the two access policies: the API's ([`api_access`]: root may do
//! everything, members of a configured group only read-only requests) and the fd holder's
//! ([`is_fanfill`]: only root processes running this very program). It knows nothing of
//! the protocols spoken on the sockets.

use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};

/// The process at the other end of a unix socket connection, as the kernel recorded it at
/// `connect(2)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// Its pid (0 if it is in a pid namespace this process cannot see).
    pub pid: i32,
    /// Its effective uid.
    pub uid: u32,
    /// Its effective gid.
    pub gid: u32,
}

/// The credentials of the peer of `sock`.
pub fn peer(sock: &impl AsFd) -> io::Result<Peer> {
    let c = getsockopt(sock, PeerCredentials)?;
    Ok(Peer {
        pid: c.pid(),
        uid: c.uid(),
        gid: c.gid(),
    })
}

/// What a peer may ask of the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Everything (root).
    Full,
    /// Requests that change nothing (`Ping`, `Status`): members of the status group.
    ReadOnly,
}

/// What `peer` may ask of the API: root everything, a member of `status_group` (its
/// primary or a supplementary group) read-only requests, anyone else nothing.
pub fn api_access(peer: &Peer, status_group: Option<u32>) -> Option<Access> {
    if peer.uid == 0 {
        return Some(Access::Full);
    }
    let g = status_group?;
    (peer.gid == g || supplementary_groups(peer.pid).contains(&g)).then_some(Access::ReadOnly)
}

/// The supplementary groups of process `pid` (empty if it cannot be read).
fn supplementary_groups(pid: i32) -> Vec<u32> {
    if pid <= 0 {
        return Vec::new();
    }
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Groups:")).map(|g| {
                g.split_whitespace()
                    .filter_map(|n| n.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// The program a process runs, as `/proc/PID/exe` names it, without the ` (deleted)` the
/// kernel appends once the file was replaced (an upgrade installs a new binary at the same
/// path: the old holder and the new daemon are still the same program).
fn exe_of(pid: &str) -> Option<PathBuf> {
    let p = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    let s = p.to_string_lossy();
    Some(PathBuf::from(
        s.strip_suffix(" (deleted)").unwrap_or(&s).to_string(),
    ))
}

/// Whether `peer` is a root process running the same program as this process (the daemon
/// talking to its fd holder, or a successor daemon taking the group back).
pub fn is_fanfill(peer: &Peer) -> bool {
    if peer.uid != 0 || peer.pid <= 0 {
        return false;
    }
    match (exe_of(&peer.pid.to_string()), exe_of("self")) {
        (Some(theirs), Some(ours)) => theirs == ours,
        _ => false,
    }
}

/// Creates the directory a socket lives in if it is missing: 0700, or 0750 with group
/// `group` (so that the status group can reach the socket). An existing directory is left
/// as it is.
pub fn create_socket_dir(dir: &Path, group: Option<u32>) -> io::Result<()> {
    if dir.exists() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(e),
    }
    if let Some(g) = group {
        nix::unistd::chown(dir, None, Some(nix::unistd::Gid::from_raw(g)))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750))?;
    }
    Ok(())
}

/// Binds a listening unix socket at `path` with `mode` (and group `group`, owner
/// unchanged) that nobody can connect to before it has them: it is bound inside a fresh
/// 0700 directory next to `path`, given its owner and mode there, and renamed into place
/// (replacing whatever was at `path`).
pub fn bind(path: &Path, mode: u32, group: Option<u32>) -> io::Result<UnixListener> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "socket path has no name"))?;
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let private = dir.join(format!(
        ".{}.{}.{nonce}",
        name.to_string_lossy(),
        std::process::id()
    ));
    // mkdir creates a new directory or fails: nobody else's directory is ever used.
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let inner = private.join("s");
    let res = (|| {
        let l = UnixListener::bind(&inner)?;
        if let Some(g) = group {
            nix::unistd::chown(&inner, None, Some(nix::unistd::Gid::from_raw(g)))?;
        }
        std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(&inner, path)?;
        Ok(l)
    })();
    let _ = std::fs::remove_file(&inner);
    let _ = std::fs::remove_dir(&private);
    res
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::net::UnixStream;

    #[test]
    fn bound_socket_has_its_mode_and_knows_its_peer() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s.sock");
        std::fs::write(&sock, b"stale").unwrap();
        let l = bind(&sock, 0o600, None).unwrap();
        let m = std::fs::symlink_metadata(&sock).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o600);
        assert!(std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()));
        // Nothing left beside it.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let c = UnixStream::connect(&sock).unwrap();
        let (s, _) = l.accept().unwrap();
        let p = peer(&s).unwrap();
        assert_eq!(p.pid, std::process::id() as i32);
        assert_eq!(p.uid, nix::unistd::geteuid().as_raw());
        drop(c);
        // This test program is not another program: it is "fanfill" to itself.
        assert_eq!(is_fanfill(&p), p.uid == 0);
    }

    #[test]
    fn api_policy() {
        let root = Peer {
            pid: 1,
            uid: 0,
            gid: 0,
        };
        let user = Peer {
            pid: 0,
            uid: 1000,
            gid: 1000,
        };
        assert_eq!(api_access(&root, None), Some(Access::Full));
        assert_eq!(api_access(&user, None), None);
        assert_eq!(api_access(&user, Some(1000)), Some(Access::ReadOnly));
        assert_eq!(api_access(&user, Some(1001)), None);
        assert!(!is_fanfill(&user));
    }
}
