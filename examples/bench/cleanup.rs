//! Everything the harness sets up on the machine (children, containers, mounts, the network
//! namespace) is recorded here and torn down on exit, on error and on Ctrl-C / SIGTERM.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

use nix::sys::signal::{SigSet, Signal};

#[derive(Default)]
struct State {
    pids: BTreeSet<u32>,
    containers: BTreeSet<String>,
    /// Mount points under which everything is unmounted (the loop filesystem last).
    mount_roots: Vec<PathBuf>,
    netns: bool,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);
/// Held for the whole teardown, so a second caller (main thread vs signal thread) waits for
/// the first to finish before the process exits.
static RUNNING: Mutex<()> = Mutex::new(());

fn with<T>(f: impl FnOnce(&mut State) -> T) -> T {
    let mut g = STATE.lock().unwrap_or_else(|e| e.into_inner());
    f(g.get_or_insert_with(State::default))
}

pub fn add_pid(pid: u32) {
    with(|s| s.pids.insert(pid));
}
pub fn remove_pid(pid: u32) {
    with(|s| s.pids.remove(&pid));
}
pub fn add_container(id: &str) {
    with(|s| s.containers.insert(id.to_string()));
}
pub fn remove_container(id: &str) {
    with(|s| s.containers.remove(id));
}
pub fn add_mount_root(p: PathBuf) {
    with(|s| s.mount_roots.push(p));
}
pub fn set_netns() {
    with(|s| s.netns = true);
}

/// Every mount point at or below `root`, deepest first.
pub fn mounts_below(root: &std::path::Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut v: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(|m| PathBuf::from(m.replace("\\040", " ")))
        .filter(|m| m.starts_with(root))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v.dedup();
    v
}

pub fn umount(p: &std::path::Path) {
    let _ = Command::new("timeout")
        .args(["-k", "2", "20", "umount", "-l"])
        .arg(p)
        .status();
}

/// Tears everything down (idempotent).
pub fn run() {
    let _running = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
    let s = with(std::mem::take);
    for id in &s.containers {
        let _ = Command::new("timeout")
            .args(["10", "runc", "kill", id, "KILL"])
            .status();
        let _ = Command::new("timeout")
            .args(["10", "runc", "delete", "-f", id])
            .status();
    }
    for pid in &s.pids {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid as i32), Signal::SIGKILL);
    }
    for root in s.mount_roots.iter().rev() {
        for m in mounts_below(root) {
            umount(&m);
        }
    }
    if s.netns {
        crate::net::teardown();
    }
}

/// Blocks SIGINT/SIGTERM/SIGHUP in this (main) thread, before any other thread exists, and
/// waits for them on a thread of their own: cleanup, then exit 130. Children started with
/// `Command` get an empty signal mask again (the standard library resets it).
pub fn install_signal_handler() {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGHUP);
    if set.thread_block().is_err() {
        return;
    }
    std::thread::spawn(move || {
        if let Ok(sig) = set.wait() {
            eprintln!("bench: {sig:?}: cleaning up");
            run();
            std::process::exit(130);
        }
    });
}
