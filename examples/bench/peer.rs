//! The benchmark of record (#17): one image at a time, every system started through
//! containerd's `ctr` (or podman), measured side by side in one run, on one registry:
//!
//! * containerd eager: `ctr image pull --snapshotter overlayfs` + `ctr run`;
//! * podman eager: `podman pull` + `podman run` (its own storage, overlay driver);
//! * stargz-snapshotter (FUSE): the image converted to eStargz with `ctr-remote image
//!   convert`, `ctr-remote image rpull --snapshotter stargz` + `ctr run`; with its profile:
//!   the image converted by `ctr-remote image optimize` running the workload (its
//!   prioritized files);
//! * fanfill as a user runs it: `fanfill daemon --containerd-socket`, the image with a signed
//!   index artifact (`--index-policy signed`), `ctr-remote image rpull --snapshotter fanfill`
//!   and `ctr run`, default settings (background completion); with its profile: the
//!   artifact carries the access profile recorded by the publisher (`fanfill pull
//!   --foreground --record-profile` and one run of the workload in a chroot); on the eStargz
//!   image (its TOCs, no artifact); and, by hand only, on demand
//!   (`--containerd-prefetch=false`).
//!
//! The images and workloads are the start benchmark's (examples/bench/images.rs, made from
//! this machine's Debian packages): each workload prints its whole output at the end, so the
//! first byte on stdout is its answer, and the output is checked against an eager run.
//! Measured per system and run: time from the start of the pull to the first byte of the
//! workload's output, bytes and requests the registry served by then (a counting TCP proxy
//! sits in front of `docker-registry`), then, in a second container of the same image, a
//! first read of every file of the workload's tree; in the last run, once the image is
//! complete (fanfill: every file's mark gone; stargz: its background fetch quiet), steady-state
//! reads of that tree, cold (page cache dropped) and warm. Between runs everything is cold:
//! image removed, stargz and fanfill daemons restarted on fresh state, page cache dropped.
//!
//! Links (`--links`): `loopback` (the registry on 127.0.0.1); `shaped`: the registry in a
//! network namespace behind a veth pair at 1 Gbit/s (`tc tbf`) and a relay adding 1 ms each
//! way (examples/bench/net.rs); `pull-through`: a `docker-registry` in proxy mode between the
//! clients and the registry (behind the shaped link when it is set up), measured cold (the
//! cache restarted empty before the run) and warm (the same system again right after).
//! Beside the times, each snapshotter daemon's CPU, peak RSS and bytes written, and for fanfill
//! where its time to first output went (its log and status).
//!
//! Run as root: `bench peer [--runs N] [--image slim|python|large] [--links
//! shaped,loopback,pull-through] [--systems eager,podman,stargz,stargz-profile,fanfill,
//! fanfill-profile,fanfill-esgz,fanfill-ondemand] [--out FILE] [--json FILE] [--stargz-grpc
//! PATH] [--fanfill PATH] [--cache DIR]`; `bench --all` runs it for every image and link and
//! writes BENCHMARKS.md.
//!
//! `PEER_FANFILL_LOG` (a log filter) and `PEER_FANFILL_ARGS` (extra daemon arguments) are
//! for looking into a run by hand. `containerd-stargz-grpc` is built with
//! /work/shared/tools/stargz/build-stargz-grpc.sh (`bench` does it when it is missing);
//! without it the stargz rows say so and the other rows are still measured.

use crate::{common, images, net};
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use common::{Fault, FaultyProxy};
use nix::sys::signal::Signal;

/// containerd namespace of every image and container.
const NS: &str = "fanfill-peer";
/// The tree a workload's first full read and the steady-state reads cover, per image.
fn tree_of(image: &str) -> &'static str {
    match image {
        "slim" => "/usr",
        _ => "/usr/lib/python3*",
    }
}

/// First read of every file of `tree`; prints its duration in nanoseconds.
fn read_script(tree: &str) -> String {
    format!(
        "s=$(date +%s%N); find {tree} -type f -exec cat {{}} + > /dev/null; \
         e=$(date +%s%N); echo $((e - s))"
    )
}

/// Two reads of every file of `tree` in a row (the first cold when the page cache was
/// dropped before, the second warm); prints both durations in nanoseconds.
fn steady_script(tree: &str) -> String {
    format!(
        "s=$(date +%s%N); find {tree} -type f -exec cat {{}} + > /dev/null; m=$(date +%s%N); \
         find {tree} -type f -exec cat {{}} + > /dev/null; e=$(date +%s%N); \
         echo $((m - s)) $((e - m))"
    )
}

/// Files and bytes of `tree`.
fn count_script(tree: &str) -> String {
    format!("find {tree} -type f | wc -l; find {tree} -type f -exec cat {{}} + | wc -c")
}

/// Size of the scratch ext4 (registry, containerd, snapshotters).
const SCRATCH_MIB: u64 = 12288;

// ------------------------------------------------------------------------------ cleanup

/// Teardown actions, run in order of priority (0 first), also on error and on a signal.
type Action = Box<dyn FnOnce() + Send>;
static CLEANUP: Mutex<Vec<(u8, String, Action)>> = Mutex::new(Vec::new());

/// Records `f` to run at exit (or by [`run_now`] under `key`).
fn on_exit(prio: u8, key: &str, f: impl FnOnce() + Send + 'static) {
    let mut c = CLEANUP.lock().unwrap_or_else(|e| e.into_inner());
    c.push((prio, key.to_string(), Box::new(f)));
}

/// Runs (and forgets) the action recorded under `key` now.
fn run_now(key: &str) {
    let action = {
        let mut c = CLEANUP.lock().unwrap_or_else(|e| e.into_inner());
        c.iter()
            .position(|(_, k, _)| k == key)
            .map(|i| c.remove(i).2)
    };
    if let Some(f) = action {
        f();
    }
}

/// Runs every recorded action, lowest priority number first, newest first within one.
fn run_all() {
    let mut all = std::mem::take(&mut *CLEANUP.lock().unwrap_or_else(|e| e.into_inner()));
    all.reverse();
    all.sort_by_key(|(p, _, _)| *p);
    for (_, _, f) in all {
        f();
    }
}

/// SIGINT/SIGTERM/SIGHUP: clean up, exit 130. Handled on a thread of its own (tokio's
/// handlers, no blocked signal mask: children would inherit one and ignore SIGTERM).
fn install_signal_handler() -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (mut term, mut int, mut hup) = {
        let _g = rt.enter();
        (
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
            signal(SignalKind::hangup())?,
        )
    };
    std::thread::spawn(move || {
        let sig = rt.block_on(async {
            tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
                _ = hup.recv() => "SIGHUP",
            }
        });
        eprintln!("peer: {sig}: cleaning up");
        run_all();
        std::process::exit(130);
    });
    Ok(())
}

/// SIGTERM to `pid`, SIGKILL after `secs`; reaps it.
fn stop_pid(pid: u32, secs: u64) {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    let p = nix::unistd::Pid::from_raw(pid as i32);
    if nix::sys::signal::kill(p, Signal::SIGTERM).is_err() {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        match waitpid(p, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => std::thread::sleep(Duration::from_millis(50)),
            _ => return,
        }
    }
    eprintln!("peer: pid {pid} ignored SIGTERM for {secs} s: SIGKILL");
    let _ = nix::sys::signal::kill(p, Signal::SIGKILL);
    let _ = waitpid(p, None);
}

/// Every mount point strictly below `root`, deepest first.
fn mounts_below(root: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut v: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(|m| PathBuf::from(m.replace("\\040", " ")))
        .filter(|m| m.starts_with(root) && m != root)
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v.dedup();
    v
}

fn umount_below(root: &Path) {
    for m in mounts_below(root) {
        let _ = Command::new("umount").arg(&m).status().map(|s| {
            if !s.success() {
                let _ = Command::new("umount").arg("-l").arg(&m).status();
            }
        });
    }
}

// ------------------------------------------------------------------------------ commands

/// `tool args` under `timeout secs`; its stdout, or an error naming the command with its
/// output.
fn run(secs: u64, tool: &str, args: &[&str]) -> Result<String> {
    let out = Command::new("timeout")
        .args(["-k", "5", &secs.to_string(), tool])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawning {tool}"))?;
    if !out.status.success() {
        bail!(
            "`{tool} {}` failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The last `n` lines of the file at `path`.
fn tail(path: &Path, n: usize) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Waits until `ready` holds (at most `secs`), failing with `what`.
fn wait_for(secs: u64, what: &str, mut ready: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !ready() {
        if Instant::now() > deadline {
            bail!("timed out after {secs} s waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// A daemon started in a process group of its own (a terminal's Ctrl-C goes to this
/// program, which then stops it in order), stderr and stdout to `log`.
fn spawn_daemon(cmd: &mut Command, log: &Path) -> Result<u32> {
    let f = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(f.try_clone()?)
        .stderr(f)
        .process_group(0)
        .spawn()
        .with_context(|| format!("spawning {:?}", cmd.get_program()))?;
    Ok(child.id())
}

/// Writes back dirty pages and drops the page, dentry and inode caches.
fn drop_caches() -> Result<()> {
    nix::unistd::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("echo 3 > /proc/sys/vm/drop_caches")
}

// ------------------------------------------------------------------------------ systems

#[derive(Clone, Copy, PartialEq, Eq, Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum System {
    /// containerd's own pull and overlayfs snapshotter.
    Eager,
    /// podman's pull and run (overlay storage driver).
    Podman,
    /// stargz-snapshotter (FUSE) on the eStargz image.
    Stargz,
    /// stargz-snapshotter on the image `ctr-remote image optimize` made by running the
    /// workload (its prioritized files are fetched first).
    StargzProfile,
    /// fanfill on the gzip image with its signed index artifact, as it runs by default:
    /// background completion (as stargz fetches its layers in the background).
    Fanfill,
    /// The same, the artifact carrying the publisher's access profile.
    FanfillProfile,
    /// fanfill on the eStargz image (its TOCs, no artifact), default settings.
    FanfillEstargz,
    /// fanfill on the gzip image filling only what containers read
    /// (`--containerd-prefetch=false`); not in the default set.
    FanfillOnDemand,
}

pub const SYSTEMS: [System; 8] = [
    System::Eager,
    System::Podman,
    System::Stargz,
    System::StargzProfile,
    System::Fanfill,
    System::FanfillProfile,
    System::FanfillEstargz,
    System::FanfillOnDemand,
];

/// Which of the pushed images a system pulls.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Image {
    Plain,
    Estargz,
    EstargzOptimized,
    Profiled,
}

impl System {
    pub fn label(self) -> &'static str {
        match self {
            System::Eager => "containerd eager (pull + overlayfs)",
            System::Podman => "podman eager (pull + run)",
            System::Stargz => "stargz-snapshotter (FUSE, eStargz image)",
            System::StargzProfile => "stargz-snapshotter, optimized eStargz (prioritized files)",
            System::Fanfill => "fanfill snapshotter (gzip image + signed index artifact)",
            System::FanfillProfile => "fanfill snapshotter, artifact with access profile",
            System::FanfillEstargz => "fanfill snapshotter on the eStargz image",
            System::FanfillOnDemand => {
                "fanfill snapshotter, on demand only (--containerd-prefetch=false)"
            }
        }
    }

    /// The containerd snapshotter (podman: none).
    fn snapshotter(self) -> &'static str {
        match self {
            System::Eager => "overlayfs",
            System::Podman => "podman",
            System::Stargz | System::StargzProfile => "stargz",
            _ => "fanfill",
        }
    }

    pub fn tag(self) -> &'static str {
        match self {
            System::Eager => "eager",
            System::Podman => "podman",
            System::Stargz => "stargz",
            System::StargzProfile => "stargz-profile",
            System::Fanfill => "fanfill",
            System::FanfillProfile => "fanfill-profile",
            System::FanfillEstargz => "fanfill-esgz",
            System::FanfillOnDemand => "fanfill-ondemand",
        }
    }

    fn image(self) -> Image {
        match self {
            System::Eager | System::Podman | System::Fanfill | System::FanfillOnDemand => {
                Image::Plain
            }
            System::Stargz | System::FanfillEstargz => Image::Estargz,
            System::StargzProfile => Image::EstargzOptimized,
            System::FanfillProfile => Image::Profiled,
        }
    }

    fn is_fanfill(self) -> bool {
        self.snapshotter() == "fanfill"
    }

    fn is_stargz(self) -> bool {
        self.snapshotter() == "stargz"
    }

    pub fn from_tag(t: &str) -> Result<System> {
        SYSTEMS
            .iter()
            .copied()
            .find(|s| s.tag() == t)
            .with_context(|| format!("unknown system {t}"))
    }
}

// ------------------------------------------------------------------------------ the rig

pub struct Args {
    pub runs: usize,
    /// `loopback`, `shaped` (the registry in a network namespace behind a veth pair at
    /// 1 Gbit/s and a 1 ms-each-way relay, examples/bench/net.rs), `pull-through`.
    pub links: Vec<String>,
    /// One of the start benchmark's images (`slim`, `python` or `large`).
    pub image: String,
    /// Only these systems, default all but `fanfill-ondemand`.
    pub systems: Vec<System>,
    pub out: Option<PathBuf>,
    pub json: Option<PathBuf>,
    pub stargz_grpc: PathBuf,
    pub fanfill: PathBuf,
    pub cache: PathBuf,
}

/// Systems measured behind the pull-through cache.
const PULL_THROUGH_SYSTEMS: [System; 2] = [System::Stargz, System::Fanfill];

impl Args {
    /// Defaults: binaries next to this one (`target/release/examples/bench` ->
    /// `target/release/fanfill`, `target/stargz/containerd-stargz-grpc`).
    pub fn defaults() -> Result<Args> {
        let exe = std::env::current_exe()?;
        let release = exe
            .parent()
            .and_then(Path::parent)
            .context("locating target/release")?
            .to_path_buf();
        Ok(Args {
            runs: 5,
            links: vec!["loopback".into()],
            image: "python".into(),
            systems: SYSTEMS
                .iter()
                .copied()
                .filter(|s| *s != System::FanfillOnDemand)
                .collect(),
            out: None,
            json: None,
            stargz_grpc: release
                .parent()
                .map(|t| t.join("stargz/containerd-stargz-grpc"))
                .unwrap_or_default(),
            fanfill: release.join("fanfill"),
            cache: PathBuf::from("/var/tmp/fanfill-peer"),
        })
    }

    /// The measured links in order: `pull-through` is measured cold then warm.
    fn measured_links(&self) -> Vec<String> {
        let mut v = Vec::new();
        for l in &self.links {
            if l == "pull-through" {
                v.push("pull-through-cold".to_string());
                v.push("pull-through-warm".to_string());
            } else {
                v.push(l.clone());
            }
        }
        v
    }
}

const USAGE: &str = "bench peer [--runs N] [--image slim|python|large] [--links shaped,loopback,pull-through]\n    \
     [--systems eager,podman,stargz,stargz-profile,fanfill,fanfill-profile,fanfill-esgz,fanfill-ondemand]\n    \
     [--out FILE.md] [--json FILE] [--stargz-grpc PATH] [--fanfill PATH] [--cache DIR]";

fn parse_args(argv: &[String]) -> Result<Args> {
    let mut a = Args::defaults()?;
    let mut it = argv.iter().cloned();
    while let Some(arg) = it.next() {
        let mut val = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--runs" => a.runs = val("--runs")?.parse().context("--runs")?,
            "--out" => a.out = Some(PathBuf::from(val("--out")?)),
            "--json" => a.json = Some(PathBuf::from(val("--json")?)),
            "--stargz-grpc" => a.stargz_grpc = PathBuf::from(val("--stargz-grpc")?),
            "--fanfill" => a.fanfill = PathBuf::from(val("--fanfill")?),
            "--cache" => a.cache = PathBuf::from(val("--cache")?),
            "--links" | "--link" => {
                a.links = val("--links")?.split(',').map(String::from).collect()
            }
            "--image" => a.image = val("--image")?,
            "--systems" => {
                a.systems = val("--systems")?
                    .split(',')
                    .map(System::from_tag)
                    .collect::<Result<_>>()
                    .context("--systems")?;
            }
            "-h" | "--help" => {
                eprintln!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    a.check()?;
    Ok(a)
}

impl Args {
    pub fn check(&self) -> Result<()> {
        if self.runs == 0 {
            bail!("--runs must be at least 1");
        }
        if let Some(l) = self
            .links
            .iter()
            .find(|l| !["loopback", "shaped", "pull-through"].contains(&l.as_str()))
        {
            bail!("--links: {l} is not loopback, shaped or pull-through");
        }
        if self.links.is_empty() {
            bail!("--links: at least one link");
        }
        Ok(())
    }
}

/// One way to the registry: a counting proxy in front of it (or of the pull-through cache).
struct Link {
    /// `loopback`, `shaped` or `pull-through`.
    name: String,
    proxy: FaultyProxy,
}

/// The pull-through cache: a `docker-registry` in proxy mode, restarted empty for cold runs.
struct PullThrough {
    addr: std::net::SocketAddr,
    upstream: std::net::SocketAddr,
    pid: Option<u32>,
    generation: usize,
}

/// Everything the runs share.
struct Rig {
    /// The registry of the shaped link (killed on drop).
    _shaped_registry: Option<net::Registry>,
    links: Vec<Link>,
    /// The link the next measurement uses (an index into `links`).
    cur: usize,
    pull_through: Option<PullThrough>,
    /// The image's name (`peer/NAME` in the registry).
    name: String,
    /// Packages of the image's recipe not installed on this machine.
    missing: Vec<String>,
    /// The workload (`/bin/sh -c`), its expected output, the tree read after it.
    script: String,
    expected: String,
    tree: String,
    /// The snapshotter daemon of the system measured last (`None` for eager), for its CPU
    /// and peak RSS.
    daemon_pid: Option<u32>,
    mnt: PathBuf,
    logs: PathBuf,
    ctrd_sock: PathBuf,
    ctrd_log: PathBuf,
    podman_root: PathBuf,
    stargz_bin: Option<PathBuf>,
    stargz_config: PathBuf,
    stargz_sock: PathBuf,
    stargz_log: PathBuf,
    fanfill_bin: PathBuf,
    fanfill_sock: PathBuf,
    fanfill_log: PathBuf,
    /// The running fanfill daemon's API socket (for its status at first output).
    fanfill_api: Option<PathBuf>,
    index_pub: PathBuf,
    /// Daemon generations, for fresh state dirs and log names.
    generation: usize,
    tree_files: u64,
    tree_bytes: u64,
    /// Files in the recorded access profile (fanfill) and the optimized image's
    /// prioritized-file landmark state (stargz), for the report.
    profile_files: usize,
}

impl Rig {
    /// `ctr` / `ctr-remote` on the rig's containerd and namespace.
    fn ctr(&self, secs: u64, tool: &str, args: &[&str]) -> Result<String> {
        let sock = self.ctrd_sock.to_string_lossy().into_owned();
        let mut full = vec!["-a", &sock, "-n", NS];
        full.extend_from_slice(args);
        run(secs, tool, &full)
    }

    /// `podman` on the rig's own storage.
    fn podman(&self, secs: u64, args: &[&str]) -> Result<String> {
        let root = self.podman_root.join("root").to_string_lossy().into_owned();
        let runroot = self.podman_root.join("run").to_string_lossy().into_owned();
        let mut full = vec![
            "--root",
            &root,
            "--runroot",
            &runroot,
            "--storage-driver",
            "overlay",
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "file",
        ];
        full.extend_from_slice(args);
        run(secs, "podman", &full)
    }

    /// The host (the counting proxy) of the current link.
    fn host(&self) -> String {
        self.links[self.cur].proxy.host()
    }

    fn proxy(&self) -> &FaultyProxy {
        &self.links[self.cur].proxy
    }

    /// The reference `sys` pulls over the current link.
    fn reference(&self, sys: System) -> String {
        self.reference_of(sys.image())
    }

    fn reference_of(&self, image: Image) -> String {
        let (host, name) = (self.host(), &self.name);
        match image {
            Image::Plain => format!("{host}/peer/{name}:plain"),
            Image::Estargz => format!("{host}/peer/{name}:esgz"),
            Image::EstargzOptimized => format!("{host}/peer/{name}:esgz-optimized"),
            Image::Profiled => format!("{host}/peer/{name}-profile:plain"),
        }
    }

    /// The tails of the logs of containerd and of the snapshotter `sys` uses.
    fn logs_of(&self, sys: System) -> String {
        let mut s = format!(
            "--- containerd log ({}) ---\n{}",
            self.ctrd_log.display(),
            tail(&self.ctrd_log, 15)
        );
        let daemon = if sys.is_stargz() {
            Some(&self.stargz_log)
        } else if sys.is_fanfill() {
            Some(&self.fanfill_log)
        } else {
            None
        };
        if let Some(l) = daemon {
            s.push_str(&format!(
                "\n--- snapshotter log ({}) ---\n{}",
                l.display(),
                tail(l, 15)
            ));
        }
        s
    }
}

/// Makes and mounts the scratch ext4 at `cache/mnt` (image file allocated up front).
fn scratch_fs(cache: &Path) -> Result<PathBuf> {
    let mnt = cache.join("mnt");
    let img = cache.join("scratch-ext4.img");
    umount_below(cache);
    if std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(&*mnt.to_string_lossy()))
    {
        run(60, "umount", &[&mnt.to_string_lossy()])?;
    }
    std::fs::create_dir_all(&mnt)?;
    let _ = std::fs::remove_file(&img);
    let f = std::fs::File::create(&img)?;
    nix::fcntl::fallocate(
        &f,
        nix::fcntl::FallocateFlags::empty(),
        0,
        (SCRATCH_MIB << 20) as i64,
    )
    .context("allocating the scratch filesystem image")?;
    drop(f);
    run(120, "mkfs.ext4", &["-q", "-F", &img.to_string_lossy()])?;
    run(
        60,
        "mount",
        &["-o", "loop", &img.to_string_lossy(), &mnt.to_string_lossy()],
    )?;
    let (m, i) = (mnt.clone(), img.clone());
    on_exit(9, "scratch", move || {
        umount_below(&m);
        if Command::new("umount")
            .arg(&m)
            .status()
            .is_ok_and(|s| s.success())
        {
            let _ = std::fs::remove_file(&i);
        } else {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
    });
    Ok(mnt)
}

/// `docker-registry` on a free port of 127.0.0.1 with its storage at `storage`, stopped at
/// exit; returns its address.
fn start_registry(
    storage: &Path,
    logs: &Path,
    upstream: Option<std::net::SocketAddr>,
    key: &str,
) -> Result<std::net::SocketAddr> {
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", common::free_port()).parse()?;
    let pid = start_registry_at(addr, storage, logs, upstream, key)?;
    on_exit(8, key, move || stop_pid(pid, 10));
    Ok(addr)
}

/// `docker-registry` on `addr`, storage at `storage`; with `upstream`, a pull-through cache
/// of that registry (`proxy.remoteurl`). Returns its pid once it answers.
fn start_registry_at(
    addr: std::net::SocketAddr,
    storage: &Path,
    logs: &Path,
    upstream: Option<std::net::SocketAddr>,
    key: &str,
) -> Result<u32> {
    std::fs::create_dir_all(storage)?;
    let config = logs.join(format!("{key}.yml"));
    let proxy = upstream
        .map(|u| format!("proxy:\n  remoteurl: http://{u}\n"))
        .unwrap_or_default();
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: {addr}\n{proxy}",
            storage.display()
        ),
    )?;
    let log = logs.join(format!("{key}.log"));
    let pid = spawn_daemon(
        Command::new("docker-registry").arg("serve").arg(&config),
        &log,
    )?;
    wait_for(30, "docker-registry to answer", || {
        std::net::TcpStream::connect(addr).is_ok()
    })
    .with_context(|| tail(&log, 20))?;
    Ok(pid)
}

impl Rig {
    /// Restarts the pull-through cache on empty storage (a cold cache).
    fn restart_pull_through(&mut self) -> Result<()> {
        let Some(pt) = self.pull_through.as_mut() else {
            bail!("no pull-through cache in this run");
        };
        pt.pid = None;
        run_now("pull-through");
        let old = self.mnt.join(format!("pull-through-{}", pt.generation));
        let _ = std::fs::remove_dir_all(&old);
        pt.generation += 1;
        let storage = self.mnt.join(format!("pull-through-{}", pt.generation));
        let key = format!("pull-through-{}", pt.generation);
        let pid = start_registry_at(pt.addr, &storage, &self.logs, Some(pt.upstream), &key)?;
        pt.pid = Some(pid);
        on_exit(8, "pull-through", move || stop_pid(pid, 10));
        Ok(())
    }
}

/// containerd with its root, state and sockets on the scratch fs, both proxy snapshotters
/// configured.
fn start_containerd(
    mnt: &Path,
    logs: &Path,
    stargz_sock: &Path,
    fanfill_sock: &Path,
) -> Result<(PathBuf, PathBuf)> {
    let d = mnt.join("containerd");
    std::fs::create_dir_all(&d)?;
    let sock = d.join("containerd.sock");
    let config = format!(
        "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
         disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
         [grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n\
         [debug]\n  address = \"{debug}\"\n  level = \"info\"\n\
         [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{opt}\"\n\
         [proxy_plugins]\n  [proxy_plugins.stargz]\n    type = \"snapshot\"\n    address = \"{stargz}\"\n\
         \x20 [proxy_plugins.fanfill]\n    type = \"snapshot\"\n    address = \"{fanfill}\"\n",
        root = d.join("root").display(),
        state = d.join("state").display(),
        sock = sock.display(),
        debug = d.join("debug.sock").display(),
        opt = d.join("opt").display(),
        stargz = stargz_sock.display(),
        fanfill = fanfill_sock.display(),
    );
    let config_path = d.join("config.toml");
    std::fs::write(&config_path, config)?;
    let log = logs.join("containerd.log");
    let pid = spawn_daemon(
        Command::new("containerd").arg("--config").arg(&config_path),
        &log,
    )?;
    let s = sock.clone();
    on_exit(0, "containerd", move || {
        let sock = s.to_string_lossy().into_owned();
        let c = |args: &[&str]| {
            let mut full = vec!["-a", sock.as_str(), "-n", NS];
            full.extend_from_slice(args);
            run(30, "ctr", &full)
        };
        remove_containers(&c);
        if let Ok(imgs) = c(&["images", "ls", "-q"]) {
            for i in imgs.lines().filter(|l| !l.trim().is_empty()) {
                if let Err(e) = c(&["images", "rm", "--sync", i.trim()]) {
                    eprintln!("peer: cleanup: {e:#}");
                }
            }
        }
        let _ = run(30, "ctr", &["-a", &sock, "namespaces", "rm", NS]);
        stop_pid(pid, 15);
        let _ = std::fs::remove_dir(Path::new("/run/containerd/runc").join(NS));
    });
    let sock_s = sock.to_string_lossy().into_owned();
    wait_for(60, "containerd to answer `ctr version`", || {
        run(10, "ctr", &["-a", &sock_s, "version"]).is_ok()
    })
    .with_context(|| tail(&log, 20))?;
    Ok((sock, log))
}

/// Kills and removes every container of the namespace (`c` runs `ctr ARGS` there).
fn remove_containers(c: &dyn Fn(&[&str]) -> Result<String>) {
    let Ok(list) = c(&["containers", "ls", "-q"]) else {
        return;
    };
    for id in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let _ = c(&["tasks", "kill", "-s", "KILL", id]);
        std::thread::sleep(Duration::from_millis(300));
        let _ = c(&["tasks", "rm", "-f", id]);
        if let Err(e) = c(&["containers", "rm", id]) {
            eprintln!("peer: cleanup: {e:#}");
        }
    }
}

impl Rig {
    /// (Re)starts containerd-stargz-grpc on a fresh root dir: no cache survives.
    fn restart_stargz(&mut self) -> Result<()> {
        run_now("stargz");
        let Some(bin) = self.stargz_bin.clone() else {
            bail!("no containerd-stargz-grpc binary");
        };
        self.generation += 1;
        let root = self.mnt.join(format!("stargz-root-{}", self.generation));
        self.stargz_log = self.logs.join(format!("stargz-{}.log", self.generation));
        let pid = spawn_daemon(
            Command::new(&bin)
                .arg("--address")
                .arg(&self.stargz_sock)
                .arg("--root")
                .arg(&root)
                .arg("--config")
                .arg(&self.stargz_config)
                .args(["--log-level", "info"]),
            &self.stargz_log,
        )?;
        self.daemon_pid = Some(pid);
        let r = root.clone();
        on_exit(1, "stargz", move || {
            // SIGTERM unmounts its FUSE mounts; whatever is left goes here.
            stop_pid(pid, 15);
            umount_below(&r);
            if mounts_below(&r).is_empty() {
                let _ = std::fs::remove_dir_all(&r);
            }
        });
        let sock = self.stargz_sock.clone();
        wait_for(30, "the containerd-stargz-grpc socket", || sock.exists())
            .with_context(|| tail(&self.stargz_log, 20))?;
        Ok(())
    }

    /// (Re)starts the fanfill daemon on a fresh state dir: no content cache, blob cache or
    /// index survives. `complete`: with background completion of containerd's images.
    fn restart_fanfill(&mut self, complete: bool) -> Result<()> {
        run_now("fanfill");
        self.generation += 1;
        let state = self.mnt.join(format!("fanfill-state-{}", self.generation));
        std::fs::create_dir_all(&state)?;
        self.fanfill_log = self.logs.join(format!("fanfill-{}.log", self.generation));
        let api = state.join("api.sock");
        self.fanfill_api = Some(api.clone());
        let pid = spawn_daemon(
            Command::new(&self.fanfill_bin)
                .arg("daemon")
                .arg("--state-dir")
                .arg(&state)
                .arg("--socket")
                .arg(&api)
                .arg("--containerd-socket")
                .arg(&self.fanfill_sock)
                .args(["--containerd-tls-verify=false", "--index-policy", "signed"])
                .arg("--index-key")
                .arg(&self.index_pub)
                .arg(format!("--containerd-prefetch={complete}"))
                .args(
                    std::env::var("PEER_FANFILL_ARGS")
                        .unwrap_or_default()
                        .split_whitespace(),
                )
                .env(
                    "FANFILL_LOG",
                    std::env::var("PEER_FANFILL_LOG").unwrap_or_else(|_| "fanfill=info".into()),
                ),
            &self.fanfill_log,
        )?;
        self.daemon_pid = Some(pid);
        let st = state.clone();
        on_exit(1, "fanfill", move || {
            stop_pid(pid, 30);
            fanfill::daemon::holder::terminate(&st);
            umount_below(&st);
            if mounts_below(&st).is_empty() {
                let _ = std::fs::remove_dir_all(&st);
            }
        });
        let sock = self.fanfill_sock.clone();
        wait_for(60, "the fanfill daemon", || {
            sock.exists() && fanfill::daemon::call(&api, &fanfill::api::Request::Ping).is_ok()
        })
        .with_context(|| tail(&self.fanfill_log, 20))?;
        Ok(())
    }
}

// ------------------------------------------------------------------------------ setup

/// Builds (or reuses) the image, starts the registries (one storage), proxies, daemons and
/// containerd, pushes the image with its signed index artifact, its eStargz conversion, the
/// optimized eStargz image and the profiled artifact, and checks the workload's output.
fn setup(args: &Args) -> Result<(Rig, images::Built)> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("run as root (mounts, containerd, fanotify, drop_caches)");
    }
    for t in [
        "containerd",
        "ctr",
        "ctr-remote",
        "runc",
        "podman",
        "docker-registry",
        "skopeo",
        "openssl",
        "mkfs.ext4",
        "unshare",
    ] {
        run(10, "sh", &["-c", &format!("command -v {t}")])
            .with_context(|| format!("missing tool {t}"))?;
    }
    if !args.fanfill.exists() {
        bail!(
            "no fanfill binary at {} (cargo build --release --bin fanfill)",
            args.fanfill.display()
        );
    }
    std::fs::create_dir_all(&args.cache)?;
    let logs = args.cache.join("logs");
    let _ = std::fs::remove_dir_all(&logs);
    std::fs::create_dir_all(&logs)?;

    let spec = images::specs()
        .into_iter()
        .find(|s| s.name == args.image)
        .with_context(|| format!("--image {}: slim, python or large", args.image))?;
    let layout = args.cache.join("layouts").join(spec.name);
    let missing = images::missing_packages(&spec);
    if !missing.is_empty() {
        eprintln!(
            "peer: not installed here, so not in the {} image: {} (apt-get install them and \
             delete {} to rebuild it)",
            spec.name,
            missing.join(" "),
            layout.display()
        );
    }
    let built = images::build(&spec, &layout)?;

    let mnt = scratch_fs(&args.cache)?;
    let storage = mnt.join("registry");
    let loopback = start_registry(&storage, &logs, None, "registry")?;
    let mut shaped_registry = None;
    let mut shaped_addr = None;
    if args.links.iter().any(|l| l == "shaped") {
        net::setup().context("setting up the shaped link (ip netns, veth)")?;
        on_exit(7, "link", net::teardown);
        let reg = net::Registry::start(&storage, &logs)?;
        let pid = reg.pid();
        on_exit(8, "shaped-registry", move || stop_pid(pid, 10));
        net::shape(Some("1gbit"))?;
        let delay = net::DelayProxy::start(net::direct_host().parse()?, Duration::from_millis(1))?;
        shaped_addr = Some(delay.addr);
        shaped_registry = Some(reg);
    }
    // Every client goes through a counting proxy: it counts what the registry serves.
    let mut links = Vec::new();
    let mut pull_through = None;
    for l in &args.links {
        let target = match l.as_str() {
            "loopback" => loopback,
            "shaped" => shaped_addr.context("no shaped link")?,
            _ => {
                let upstream = shaped_addr.unwrap_or(loopback);
                let addr: std::net::SocketAddr =
                    format!("127.0.0.1:{}", common::free_port()).parse()?;
                pull_through = Some(PullThrough {
                    addr,
                    upstream,
                    pid: None,
                    generation: 0,
                });
                addr
            }
        };
        links.push(Link {
            name: l.clone(),
            proxy: FaultyProxy::start(target, Fault::None),
        });
    }
    // Pushes go to the registry itself (a pull-through cache takes none).
    let push = FaultyProxy::start(loopback, Fault::None);
    let push_host = push.host();
    let name = spec.name;
    let plain = format!("{push_host}/peer/{name}:plain");
    let esgz = format!("{push_host}/peer/{name}:esgz");
    let esgz_opt = format!("{push_host}/peer/{name}:esgz-optimized");
    let profiled = format!("{push_host}/peer/{name}-profile:plain");
    eprintln!("peer: pushing the image as {plain}");
    for dest in [&plain, &profiled] {
        run(
            600,
            "skopeo",
            &[
                "--insecure-policy",
                "copy",
                "--quiet",
                "--dest-tls-verify=false",
                &format!("oci:{}:bench", layout.display()),
                &format!("docker://{dest}"),
            ],
        )?;
    }

    // The index artifact, signed.
    let (key, index_pub) = common::p256_key(&mnt, "index");
    let push_index = |reference: &str, profile: Option<&Path>| -> Result<()> {
        let k = key.to_string_lossy();
        let dir = mnt.join("push-indexes").to_string_lossy().into_owned();
        let mut a = vec![
            "index",
            reference,
            "--push",
            "--tls-verify=false",
            "--sign-key",
            &k,
            "--index-dir",
            &dir,
        ];
        let p;
        if let Some(profile) = profile {
            p = profile.to_string_lossy().into_owned();
            a.extend(["--profile", &p]);
        }
        run(600, &args.fanfill.to_string_lossy(), &a).map(drop)
    };
    eprintln!("peer: fanfill index --push --sign-key (signed index artifact)");
    push_index(&plain, None)?;

    let stargz_sock = mnt.join("stargz.sock");
    let fanfill_sock = mnt.join("fanfill-snapshotter.sock");
    let stargz_config = mnt.join("stargz.toml");
    let mut hosts: Vec<String> = links.iter().map(|l| l.proxy.host()).collect();
    hosts.push(push_host.clone());
    std::fs::write(
        &stargz_config,
        hosts
            .iter()
            .map(|h| {
                format!("[[resolver.host.\"{h}\".mirrors]]\nhost = \"{h}\"\ninsecure = true\n")
            })
            .collect::<String>(),
    )?;
    let (ctrd_sock, ctrd_log) = start_containerd(&mnt, &logs, &stargz_sock, &fanfill_sock)?;
    if args.systems.iter().any(|s| s.is_stargz()) {
        crate::all::ensure_stargz(&args.stargz_grpc);
    }
    let stargz_bin = if args.stargz_grpc.exists() {
        Some(args.stargz_grpc.clone())
    } else {
        eprintln!(
            "peer: no containerd-stargz-grpc at {}: the stargz rows are skipped",
            args.stargz_grpc.display()
        );
        None
    };
    let tree = tree_of(name).to_string();
    let mut rig = Rig {
        _shaped_registry: shaped_registry,
        links,
        cur: 0,
        pull_through,
        name: name.to_string(),
        missing,
        script: spec.script.to_string(),
        expected: String::new(),
        tree: tree.clone(),
        daemon_pid: None,
        mnt: mnt.clone(),
        logs: logs.clone(),
        ctrd_sock,
        ctrd_log,
        podman_root: mnt.join("podman"),
        stargz_bin,
        stargz_config,
        stargz_sock,
        stargz_log: logs.join("stargz-0.log"),
        fanfill_bin: args.fanfill.clone(),
        fanfill_sock,
        fanfill_log: logs.join("fanfill-0.log"),
        fanfill_api: None,
        index_pub: index_pub.clone(),
        generation: 0,
        tree_files: 0,
        tree_bytes: 0,
        profile_files: 0,
    };
    let podman_root = rig.podman_root.clone();
    let p = rig.podman_root.clone();
    on_exit(2, "podman", move || {
        let root = p.join("root").to_string_lossy().into_owned();
        let runroot = p.join("run").to_string_lossy().into_owned();
        let base = [
            "--root",
            &root,
            "--runroot",
            &runroot,
            "--storage-driver",
            "overlay",
        ];
        let mut a = base.to_vec();
        a.extend(["rm", "-af"]);
        let _ = run(60, "podman", &a);
        let mut a = base.to_vec();
        a.extend(["rmi", "-af"]);
        let _ = run(60, "podman", &a);
        umount_below(&p);
    });
    std::fs::create_dir_all(&podman_root)?;

    // The workload runs under runc (eager, overlayfs); its output is what every run must print.
    eprintln!("peer: checking the workload (ctr run, overlayfs)");
    rig.ctr(600, "ctr", &["image", "pull", "--plain-http", &plain])?;
    let eager_run = |id: &str, script: &str| {
        rig.ctr(
            600,
            "ctr",
            &[
                "run",
                "--rm",
                "--snapshotter",
                "overlayfs",
                &plain,
                id,
                "/bin/sh",
                "-c",
                script,
            ],
        )
    };
    let expected = eager_run("peer-check", &rig.script)?;
    if expected.trim().is_empty() {
        bail!("the workload printed nothing");
    }
    let out = eager_run("peer-count", &count_script(&tree))?;
    let nums: Vec<u64> = out
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    let [files, bytes] = nums[..] else {
        bail!("counting the tree {tree} printed {out:?}");
    };
    (rig.expected, rig.tree_files, rig.tree_bytes) = (expected, files, bytes);
    eprintln!(
        "peer: tree {tree}: {files} files, {:.1} MiB; workload output {:?}",
        bytes as f64 / 1048576.0,
        rig.expected
    );

    // eStargz: convert the plain image, push; the optimized one runs the workload.
    eprintln!("peer: converting to eStargz as {esgz}");
    rig.ctr(
        900,
        "ctr-remote",
        &["image", "convert", "--oci", "--estargz", &plain, &esgz],
    )?;
    rig.ctr(600, "ctr", &["image", "push", "--plain-http", &esgz])?;
    eprintln!("peer: ctr-remote image optimize (the workload's prioritized files) as {esgz_opt}");
    let entrypoint = serde_json::to_string(&["/bin/sh", "-c"])?;
    let cmd = serde_json::to_string(&[rig.script.as_str()])?;
    rig.ctr(
        1200,
        "ctr-remote",
        &[
            "image",
            "optimize",
            "--oci",
            "--period",
            "30",
            "--entrypoint",
            &entrypoint,
            "--args",
            &cmd,
            &plain,
            &esgz_opt,
        ],
    )?;
    rig.ctr(600, "ctr", &["image", "push", "--plain-http", &esgz_opt])?;
    rig.ctr(
        300,
        "ctr",
        &["image", "rm", "--sync", &plain, &esgz, &esgz_opt],
    )?;

    // fanfill's access profile: the publisher runs the workload once against a tree served
    // by `fanfill pull --foreground --record-profile`, then pushes it with the artifact.
    eprintln!("peer: recording fanfill's access profile (the workload in a chroot)");
    let profile = mnt.join("access-profile.json");
    record_profile(&rig, args, &plain, &profile)?;
    let p: serde_json::Value = serde_json::from_slice(&std::fs::read(&profile)?)?;
    rig.profile_files = p["files"].as_array().map_or(0, Vec::len);
    push_index(&profiled, Some(&profile))?;
    eprintln!(
        "peer: access profile of {} files pushed with {profiled}'s artifact",
        rig.profile_files
    );
    drop(push);

    rig.restart_fanfill(false)?;
    for l in &rig.links {
        l.proxy.set_fault_now(Fault::RecordHeads);
    }
    Ok((rig, built))
}

/// Runs the workload once in a chroot of a tree `fanfill pull --foreground
/// --record-profile` serves, then interrupts it: `out` is the access profile.
fn record_profile(rig: &Rig, args: &Args, reference: &str, out: &Path) -> Result<()> {
    use std::io::BufRead;
    let dest = rig.mnt.join("profile-tree");
    let log = rig.logs.join("record-profile.log");
    let mut child = Command::new(&args.fanfill)
        .args([
            "pull",
            "--foreground",
            "--no-prefetch",
            "--tls-verify=false",
        ])
        .arg("--record-profile")
        .arg(out)
        .arg("--index-dir")
        .arg(rig.mnt.join("record-indexes"))
        .args(["--index-policy", "signed", "--index-key"])
        .arg(&rig.index_pub)
        .arg(reference)
        .arg(&dest)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("spawning fanfill pull --foreground --record-profile")?;
    let pid = child.id();
    on_exit(1, "record-profile", move || stop_pid(pid, 30));
    let mut lines = std::io::BufReader::new(child.stdout.take().context("stdout")?).lines();
    loop {
        match lines.next() {
            Some(Ok(l)) if l.starts_with("ready") => break,
            Some(Ok(_)) => {}
            _ => bail!(
                "fanfill pull --foreground ended before ready:\n{}",
                tail(&log, 20)
            ),
        }
    }
    std::fs::create_dir_all(dest.join("proc"))?;
    let proc_dir = format!("--mount-proc={}", dest.join("proc").display());
    let d = dest.to_string_lossy().into_owned();
    let res = run(
        600,
        "unshare",
        &[
            "--mount",
            "--pid",
            "--fork",
            &proc_dir,
            "chroot",
            &d,
            "/bin/sh",
            "-c",
            &rig.script,
        ],
    );
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGINT)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            bail!(
                "fanfill pull --foreground did not exit on SIGINT:\n{}",
                tail(&log, 20)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    run_now("record-profile");
    let output = res?;
    if output != rig.expected {
        bail!(
            "the workload printed {output:?} in the recording chroot, not {:?}",
            rig.expected
        );
    }
    if !out.exists() {
        bail!("no access profile written:\n{}", tail(&log, 20));
    }
    let _ = std::fs::remove_dir_all(&dest);
    Ok(())
}

// ------------------------------------------------------------------------------ measuring

/// One run of one system.
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
pub struct Sample {
    /// Start of the pull to the first byte of the workload's output, seconds.
    pub first_output: f64,
    /// The pull alone, seconds.
    pub pull: f64,
    /// Bytes the registry sent by the first output.
    pub bytes_first: u64,
    /// Requests the registry got by the first output.
    pub requests_first: usize,
    /// The tree's first read, seconds (inside the container).
    pub read: f64,
    /// Bytes the registry sent by the end of that read.
    pub bytes_end: u64,
    /// The snapshotter daemon's CPU time (user + system) and peak RSS from its start (cold,
    /// just before the pull) to the end of the read: `None` for eager.
    pub daemon: Option<DaemonUse>,
    /// Where fanfill's first-output time went (fanfill systems only).
    pub breakdown: Option<Breakdown>,
    /// In the last run: the image complete, then the tree read cold and warm.
    pub steady: Option<Steady>,
}

/// Steady-state reads of the tree once the image is complete.
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
pub struct Steady {
    /// Start of the pull to the image complete (fanfill: every mark gone; stargz: its
    /// background fetch quiet for 3 s; eager: the pull), seconds.
    pub complete_s: f64,
    /// Start of the pull to the snapshotter daemon idle after that: nothing written for 2 s
    /// (fanfill copies complete files into its content cache for a while after the image is
    /// complete); the reads start then. `None` for eager systems and in runs recorded before
    /// it was measured.
    #[serde(default)]
    pub settled_s: Option<f64>,
    /// Bytes the registry sent from the start of the pull until then (the whole image, for
    /// a system that completes it).
    #[serde(default)]
    pub bytes_total: u64,
    /// Median of three reads of the whole tree with the page cache dropped before, seconds.
    pub cold_s: f64,
    /// Median of the three reads right after each cold one, seconds.
    pub warm_s: f64,
}

/// Where a fanfill run's time to first output went: from the daemon's log (wall-clock
/// timestamps against the bench's own) and its status at the moment of first output.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Breakdown {
    /// Pull start to the signed index artifact checked.
    pub index_s: f64,
    /// Placeholder unpack (every layer's objects).
    pub unpack_s: f64,
    /// The daemon's whole prepare (index, unpack, marks, records), its own figure.
    pub prepare_s: f64,
    /// Pull start to the rootfs of the workload's container mounted and watched.
    pub rootfs_s: f64,
    /// Opens through the container's overlay that waited for a fill, by first output.
    pub opens: u64,
    /// Their time held (event read to answer), summed, seconds.
    #[serde(default)]
    pub opens_held_s: f64,
    /// Of the misses, those served by a running layer stream.
    pub delivered: u64,
    /// Pre-content events of readers (range misses; overlay mode has none).
    pub events: u64,
}

impl Breakdown {
    /// This (from the log) with the status figures of `st`.
    fn with_status(self, st: Breakdown) -> Breakdown {
        Breakdown {
            opens: st.opens,
            opens_held_s: st.opens_held_s,
            delivered: st.delivered,
            events: st.events,
            ..self
        }
    }
}

/// Seconds since midnight UTC of a tracing timestamp (`2026-12-06T21:43:32.236117Z …`).
fn log_secs(line: &str) -> Option<f64> {
    let t = line.get(11..26)?;
    let h: f64 = t.get(0..2)?.parse().ok()?;
    let m: f64 = t.get(3..5)?.parse().ok()?;
    let sec: f64 = t.get(6..)?.trim_end_matches('Z').parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + sec)
}

/// Seconds since midnight UTC now.
fn wall_secs() -> f64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs() % 86_400) as f64 + f64::from(d.subsec_nanos()) / 1e9
}

/// The log part of a [`Breakdown`]: the last prepare in `log` after `since` (seconds of
/// the day, the pull's start).
fn breakdown_from_log(log: &Path, since: f64) -> Breakdown {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut b = Breakdown::default();
    let (mut unpack_start, mut first_watch) = (None, None);
    for l in text.lines() {
        let Some(t) = log_secs(l).filter(|t| *t >= since) else {
            continue;
        };
        if l.contains("index artifact signed") {
            b.index_s = t - since;
        } else if l.contains("unpacking placeholders") {
            unpack_start = Some(t);
        } else if l.contains("unpacked placeholders") {
            b.unpack_s = unpack_start.map(|u| t - u).unwrap_or_default();
        } else if l.contains("fanfill::daemon: image prepared") {
            b.prepare_s = l
                .rsplit("ms=")
                .next()
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or_default()
                / 1000.0;
        } else if l.contains("overlay rootfs watched") && first_watch.is_none() {
            first_watch = Some(t - since);
        }
    }
    b.rootfs_s = first_watch.unwrap_or_default();
    b
}

#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
pub struct DaemonUse {
    pub cpu_s: f64,
    pub hwm_mib: f64,
    /// Bytes the daemon dirtied for its filesystems (`write_bytes` of /proc/PID/io): fills,
    /// kept blobs, content cache, records.
    pub written_mib: f64,
}

/// CPU seconds and `VmHWM` of process `pid` from /proc.
fn daemon_use(pid: u32) -> Result<DaemonUse> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at the state, field 3.
    let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or_default();
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmHWM")?;
    let io = std::fs::read_to_string(format!("/proc/{pid}/io"))?;
    let written: f64 = io
        .lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no write_bytes")?;
    Ok(DaemonUse {
        cpu_s: ticks / hz,
        hwm_mib: kib / 1024.0,
        written_mib: written / 1048576.0,
    })
}

impl Rig {
    /// Daemons restarted on fresh state, page cache dropped; a cold pull-through cache for
    /// a `pull-through-cold` measurement.
    fn make_cold(&mut self, sys: System, link: &str) -> Result<()> {
        if link == "pull-through-cold" {
            self.restart_pull_through()?;
        }
        match sys {
            System::Eager | System::Podman => self.daemon_pid = None,
            System::Stargz | System::StargzProfile => self.restart_stargz()?,
            System::FanfillOnDemand => self.restart_fanfill(false)?,
            System::Fanfill | System::FanfillProfile | System::FanfillEstargz => {
                self.restart_fanfill(true)?
            }
        }
        if self.daemon_pid.is_some() {
            self.wait_snapshotter(sys)?;
        }
        drop_caches()
    }

    /// Waits until containerd reaches the (restarted) snapshotter of `sys`: its gRPC
    /// connection to the old daemon backs off before it dials again. The probe is a real
    /// call to the snapshotter (`snapshots prepare` of an empty snapshot, then `rm`); `ls`
    /// would only read containerd's own database.
    fn wait_snapshotter(&self, sys: System) -> Result<()> {
        let sn = sys.snapshotter();
        let mut last = None;
        let ok = wait_for(60, "containerd to reach the snapshotter", || {
            match self.ctr(
                10,
                "ctr",
                &["snapshots", "--snapshotter", sn, "prepare", "peer-probe"],
            ) {
                Ok(_) => true,
                Err(e) => {
                    last = Some(e);
                    std::thread::sleep(Duration::from_millis(200));
                    false
                }
            }
        });
        ok.map_err(|e| {
            let last = last.map(|l| format!("{l:#}")).unwrap_or_default();
            anyhow::anyhow!("{e:#}: {last}\n{}", self.logs_of(sys))
        })?;
        self.ctr(
            30,
            "ctr",
            &["snapshots", "--snapshotter", sn, "rm", "peer-probe"],
        )?;
        Ok(())
    }

    /// The pull step of `sys`.
    fn pull(&self, sys: System) -> Result<()> {
        let r = self.reference(sys);
        let s = sys.snapshotter();
        match sys {
            System::Eager => self.ctr(
                900,
                "ctr",
                &["image", "pull", "--plain-http", "--snapshotter", s, &r],
            )?,
            System::Podman => self.podman(900, &["pull", "--quiet", "--tls-verify=false", &r])?,
            _ => self.ctr(
                900,
                "ctr-remote",
                &["image", "rpull", "--plain-http", "--snapshotter", s, &r],
            )?,
        };
        Ok(())
    }

    /// The command that runs `script` in a new container `id` of `sys`'s image.
    fn run_command(&self, sys: System, id: &str, script: &str) -> Command {
        let r = self.reference(sys);
        let mut c = Command::new("timeout");
        c.args(["-k", "5", "900"]);
        if sys == System::Podman {
            let root = self.podman_root.join("root");
            let runroot = self.podman_root.join("run");
            c.arg("podman")
                .arg("--root")
                .arg(root)
                .arg("--runroot")
                .arg(runroot)
                .args([
                    "--storage-driver",
                    "overlay",
                    "--cgroup-manager",
                    "cgroupfs",
                ])
                .args([
                    "--events-backend",
                    "file",
                    "run",
                    "--rm",
                    "--network",
                    "none",
                ])
                // podman's default rlimits are above what its runtime may set here (runc
                // then fails with EPERM): containerd's default nofile, a plain nproc.
                .args([
                    "--ulimit",
                    "nofile=1024:1024",
                    "--ulimit",
                    "nproc=4096:4096",
                ])
                .args(["--pull", "never", "--name", id, &r, "/bin/sh", "-c", script]);
        } else {
            c.arg("ctr")
                .arg("-a")
                .arg(&self.ctrd_sock)
                .args(["-n", NS, "run", "--rm", "--snapshotter", sys.snapshotter()])
                .args([&r, id, "/bin/sh", "-c", script]);
        }
        c
    }

    /// Runs `script` in a new container of `sys`'s image to its end; its stdout.
    fn run_in(&self, sys: System, id: &str, script: &str) -> Result<String> {
        let err_path = self.logs.join(format!("{id}.stderr"));
        let out = self
            .run_command(sys, id, script)
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(&err_path)?)
            .output()
            .context("running a container")?;
        if !out.status.success() {
            bail!(
                "container {id} of {} failed ({}): {}\n{}",
                sys.tag(),
                out.status,
                std::fs::read_to_string(&err_path)
                    .unwrap_or_default()
                    .trim_end(),
                self.logs_of(sys)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs the workload; returns when its first stdout byte arrived (and the registry's
    /// byte and request counts then), after checking the whole output.
    fn first_output(
        &self,
        sys: System,
        id: &str,
    ) -> Result<(Instant, u64, usize, Option<Breakdown>)> {
        let err_path = self.logs.join(format!("{id}.stderr"));
        let mut child = self
            .run_command(sys, id, &self.script)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&err_path)?)
            .spawn()
            .context("spawning the workload's container")?;
        let mut stdout = child.stdout.take().context("the container's stdout")?;
        let mut first = [0u8; 1];
        let n = stdout.read(&mut first)?;
        let at = Instant::now();
        let (bytes, requests) = (
            self.proxy().bytes_down(),
            self.proxy().request_heads().len(),
        );
        let ff_status = match &self.fanfill_api {
            Some(api) if sys.is_fanfill() => {
                fanfill::daemon::call(api, &fanfill::api::Request::Status { dest: None }).ok()
            }
            _ => None,
        };
        let mut rest = Vec::new();
        stdout.read_to_end(&mut rest)?;
        let status = child.wait()?;
        let mut out = first[..n].to_vec();
        out.extend(rest);
        let out = String::from_utf8_lossy(&out);
        if !status.success() || out != self.expected {
            bail!(
                "the workload's container {id} ({}) failed ({status}), stdout {out:?} (expected {:?}):\n{}\n{}",
                sys.tag(),
                self.expected,
                std::fs::read_to_string(&err_path)
                    .unwrap_or_default()
                    .trim_end(),
                self.logs_of(sys)
            );
        }
        let breakdown = match ff_status {
            Some(fanfill::api::Response::Status { daemon, .. }) => Some(Breakdown {
                opens: daemon.overlay_opens,
                opens_held_s: daemon.overlay_open_held_ms as f64 / 1000.0,
                delivered: daemon.delivered_waits,
                events: daemon.events,
                ..Breakdown::default()
            }),
            _ => None,
        };
        Ok((at, bytes, requests, breakdown))
    }

    /// A second container of the same image reads every file of the tree; seconds.
    fn read_tree(&self, sys: System, id: &str) -> Result<f64> {
        let out = self.run_in(sys, id, &read_script(&self.tree))?;
        let ns: u64 = out
            .trim()
            .parse()
            .with_context(|| format!("the tree read printed {out:?}"))?;
        Ok(ns as f64 / 1e9)
    }

    /// Waits until the image of `sys` is complete; returns when it was seen complete.
    fn wait_complete(&self, sys: System) -> Result<Instant> {
        if sys.is_fanfill() {
            let api = self.fanfill_api.as_ref().context("no fanfill daemon")?;
            let deadline = Instant::now() + Duration::from_secs(900);
            loop {
                if let Ok(fanfill::api::Response::Status { images, .. }) =
                    fanfill::daemon::call(api, &fanfill::api::Request::Status { dest: None })
                    && !images.is_empty()
                    && images.iter().all(|i| i.state == "complete")
                {
                    return Ok(Instant::now());
                }
                if Instant::now() > deadline {
                    bail!("the fanfill image was not complete after 900 s");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        } else if sys.is_stargz() {
            // Its background fetch: done when the registry has sent nothing for 3 s.
            let (mut last, mut since) = (self.proxy().bytes_down(), Instant::now());
            let deadline = Instant::now() + Duration::from_secs(900);
            loop {
                std::thread::sleep(Duration::from_millis(100));
                let now = self.proxy().bytes_down();
                if now != last {
                    (last, since) = (now, Instant::now());
                } else if since.elapsed() >= Duration::from_secs(3) {
                    return Ok(since);
                }
                if Instant::now() > deadline {
                    bail!("stargz kept fetching for 900 s");
                }
            }
        } else {
            Ok(Instant::now())
        }
    }

    /// Waits until the snapshotter daemon wrote nothing for 2 s (at most 300 s); returns
    /// when that quiet began, in seconds from `t0`. Without a daemon: `None`.
    fn wait_daemon_quiet(&self, t0: Instant) -> Result<Option<f64>> {
        let Some(pid) = self.daemon_pid else {
            return Ok(None);
        };
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut last = daemon_use(pid)?.written_mib;
        let mut since = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(200));
            let now = daemon_use(pid)?.written_mib;
            if now != last {
                (last, since) = (now, Instant::now());
            } else if since.elapsed() >= Duration::from_secs(2) {
                return Ok(Some((since - t0).as_secs_f64()));
            }
            if Instant::now() > deadline {
                bail!("the snapshotter daemon kept writing for 300 s after the image was complete");
            }
        }
    }

    /// The image complete, the tree read three times cold and warm.
    fn steady(
        &self,
        sys: System,
        run_no: usize,
        t0: Instant,
        b0: u64,
        pull: f64,
    ) -> Result<Steady> {
        let done = self.wait_complete(sys)?;
        // An eager system is complete when its pull returns.
        let complete_s = if sys.is_fanfill() || sys.is_stargz() {
            (done - t0).as_secs_f64()
        } else {
            pull
        };
        let bytes_total = self.proxy().bytes_down() - b0;
        let settled_s = self.wait_daemon_quiet(t0)?;
        let (mut cold, mut warm) = (Vec::new(), Vec::new());
        for i in 0..3 {
            drop_caches()?;
            let out = self.run_in(
                sys,
                &format!("{}-{run_no}-steady-{i}", sys.tag()),
                &steady_script(&self.tree),
            )?;
            let v: Vec<u64> = out
                .split_whitespace()
                .filter_map(|w| w.parse().ok())
                .collect();
            let [c, w] = v[..] else {
                bail!("the steady-state read printed {out:?}");
            };
            cold.push(c as f64 / 1e9);
            warm.push(w as f64 / 1e9);
        }
        Ok(Steady {
            complete_s,
            settled_s,
            bytes_total,
            cold_s: median(&cold),
            warm_s: median(&warm),
        })
    }

    /// Removes the image (and any container left by a failure).
    fn remove(&self, sys: System) -> Result<()> {
        if sys == System::Podman {
            self.podman(120, &["rm", "-af"])?;
            self.podman(300, &["rmi", "-af"])?;
            return Ok(());
        }
        remove_containers(&|a: &[&str]| self.ctr(30, "ctr", a));
        self.ctr(300, "ctr", &["image", "rm", "--sync", &self.reference(sys)])?;
        Ok(())
    }

    /// One cold run of `sys` over `links[link]` (`measured`: its name, `pull-through-cold`
    /// or `-warm` for the pull-through cache); the image is removed afterwards, whatever
    /// happened. `steady`: also the steady-state reads.
    fn measure(
        &mut self,
        sys: System,
        link: usize,
        measured: &str,
        run_no: usize,
        steady: bool,
    ) -> Result<Sample> {
        self.cur = link;
        self.make_cold(sys, measured)?;
        let result = self.pull_and_run(sys, run_no, steady);
        let removed = self.remove(sys);
        // A snapshotter left running keeps fetching in the background (stargz goes on
        // completing its layers after the image is removed): stopped here, so that what the
        // registry sends during the next system's run is that system's alone.
        if sys.is_stargz() {
            run_now("stargz");
        } else if sys.is_fanfill() {
            run_now("fanfill");
        }
        let sample = result?;
        removed?;
        Ok(sample)
    }

    /// Pull, first output, tree read (and the steady-state reads).
    fn pull_and_run(&self, sys: System, run_no: usize, steady: bool) -> Result<Sample> {
        let (b0, r0) = (
            self.proxy().bytes_down(),
            self.proxy().request_heads().len(),
        );
        let t0 = Instant::now();
        let since = wall_secs();
        let wall = || {
            let d = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            format!(
                "{:02}:{:06.3}",
                d.as_secs() / 60 % 60,
                (d.as_millis() % 60_000) as f64 / 1000.0
            )
        };
        // Wall-clock marks (minutes:seconds UTC) to read beside the daemons' logs.
        eprint!("[pull {} ", wall());
        self.pull(sys)?;
        let pull = t0.elapsed().as_secs_f64();
        eprint!("run {} ", wall());
        let (at, b1, r1, status) = self.first_output(sys, &format!("{}-{run_no}", sys.tag()))?;
        let breakdown =
            status.map(|st| breakdown_from_log(&self.fanfill_log, since - 0.001).with_status(st));
        eprint!("output {}] ", wall());
        let read = self.read_tree(sys, &format!("{}-{run_no}-read", sys.tag()))?;
        let (bytes_end, daemon) = (
            self.proxy().bytes_down() - b0,
            self.daemon_pid.map(daemon_use).transpose()?,
        );
        let steady = if steady {
            Some(self.steady(sys, run_no, t0, b0, pull)?)
        } else {
            None
        };
        Ok(Sample {
            first_output: (at - t0).as_secs_f64(),
            pull,
            bytes_first: b1 - b0,
            requests_first: r1 - r0,
            read,
            bytes_end,
            daemon,
            breakdown,
            steady,
        })
    }
}

// ------------------------------------------------------------------------------ report

pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// `median (min–max)` with `prec` decimals.
fn stat(v: &[f64], prec: usize) -> String {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if v.len() == 1 {
        format!("{:.prec$}", v[0])
    } else {
        format!("{:.prec$} ({min:.prec$}–{max:.prec$})", median(v))
    }
}

/// The last non-empty line of an error before the log tails (the cause), shortened, for a
/// table cell.
fn summary(e: &str) -> String {
    let before_logs = e.split("\n--- ").next().unwrap_or(e);
    let line = before_logs
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("?");
    let short: String = line.chars().take(300).collect();
    short.replace('|', "\\|")
}

fn mib(b: u64) -> f64 {
    b as f64 / 1048576.0
}

/// One system over one (measured) link: its runs, or why it stopped.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Row {
    pub system: System,
    pub link: String,
    pub samples: Vec<Sample>,
    pub error: Option<String>,
}

/// Everything one image's run measured, with what the report needs to describe it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ImageResult {
    pub image: String,
    pub layers: usize,
    pub gzip_bytes: u64,
    pub files: u64,
    pub file_bytes: u64,
    pub workload: String,
    pub tree: String,
    pub tree_files: u64,
    pub tree_bytes: u64,
    pub profile_files: usize,
    /// What the workload printed (the same on every system, checked each run).
    #[serde(default)]
    pub output: String,
    /// Packages of the image's recipe not installed on the machine (not in the image).
    #[serde(default)]
    pub missing_packages: Vec<String>,
    pub runs: usize,
    pub date: String,
    pub command: String,
    pub rows: Vec<Row>,
}

impl ImageResult {
    /// The rows of `link`.
    pub fn rows_of<'a>(&'a self, link: &'a str) -> impl Iterator<Item = &'a Row> + 'a {
        self.rows.iter().filter(move |r| r.link == link)
    }

    /// The median first output of `sys` over `link`, if it ran.
    pub fn first_output(&self, sys: System, link: &str) -> Option<f64> {
        self.rows_of(link)
            .find(|r| r.system == sys && !r.samples.is_empty())
            .map(|r| median(&r.samples.iter().map(|x| x.first_output).collect::<Vec<_>>()))
    }

    /// The links measured, in order.
    pub fn links(&self) -> Vec<String> {
        let mut v: Vec<String> = Vec::new();
        for r in &self.rows {
            if !v.contains(&r.link) {
                v.push(r.link.clone());
            }
        }
        v
    }
}

/// How a measured link is described in the report.
pub fn link_label(link: &str) -> &'static str {
    match link {
        "shaped" => {
            "the registry in a network namespace behind a veth pair shaped to 1 Gbit/s (`tc \
             tbf`) and a relay adding 1 ms each way (a ~2 ms round trip)"
        }
        "loopback" => "the registry on loopback (127.0.0.1)",
        "pull-through-cold" => {
            "a `docker-registry` pull-through cache (proxy mode) in front of the registry, \
             restarted empty before each run (cold)"
        }
        "pull-through-warm" => {
            "the same pull-through cache, warm: right after the same system's cold run"
        }
        _ => "?",
    }
}

/// The markdown section of one image: a table per link, steady state, fanfill's breakdown.
pub fn report_image(r: &ImageResult, heading: &str) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "{heading} Image \"{}\": {} layers, {:.1} MiB gzip, {} files, {:.1} MiB\n\n\
         Workload (`/bin/sh -c`, its whole output printed at the end; checked against an eager \
         run every time): `{}`. Tree read after it: `{}`, {} files, {:.1} MiB. fanfill's access \
         profile: {} files. {} cold runs per system, systems interleaved; median (min–max). \
         Measured {}; command `{}`.\n\n",
        r.image,
        r.layers,
        mib(r.gzip_bytes),
        r.files,
        mib(r.file_bytes),
        r.workload.replace('\n', " ⏎ ").replace('|', "\\|"),
        r.tree,
        r.tree_files,
        mib(r.tree_bytes),
        r.profile_files,
        r.runs,
        r.date,
        r.command,
    ));
    if !r.output.is_empty() {
        s.push_str(&format!(
            "Its output: `{}`.\n\n",
            r.output.trim_end().replace('\n', " ⏎ ").replace('|', "\\|")
        ));
    }
    if !r.missing_packages.is_empty() {
        s.push_str(&format!(
            "Packages of the image's recipe that were not installed on this machine, so not in \
             the image: {}.\n\n",
            r.missing_packages.join(", ")
        ));
    }
    let tree = mib(r.tree_bytes);
    for link in r.links() {
        s.push_str(&format!("Link: {}.\n\n", link_label(&link)));
        s.push_str(
            "| System | Time to first output (s) | of which pull (s) | MiB fetched by first output | \
             Requests by first output | Tree first read (s) | Tree first read (MiB/s) | \
             MiB fetched by end of read | Daemon CPU (s) | Daemon peak RSS (MiB) | Daemon MiB written |\n\
             |---|---|---|---|---|---|---|---|---|---|---|\n",
        );
        for row in r.rows_of(&link) {
            let samples = &row.samples;
            if samples.is_empty() {
                s.push_str(&format!(
                    "| {} | not measured: {} | | | | | | | | | |\n",
                    row.system.label(),
                    summary(row.error.as_deref().unwrap_or("?"))
                ));
                continue;
            }
            let f = |g: fn(&Sample) -> f64| samples.iter().map(g).collect::<Vec<f64>>();
            let daemon = |g: fn(&DaemonUse) -> f64, prec: usize| {
                let v: Vec<f64> = samples
                    .iter()
                    .filter_map(|x| x.daemon.as_ref().map(g))
                    .collect();
                if v.is_empty() {
                    "–".to_string()
                } else {
                    stat(&v, prec)
                }
            };
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                row.system.label(),
                stat(&f(|x| x.first_output), 2),
                stat(&f(|x| x.pull), 2),
                stat(&f(|x| mib(x.bytes_first)), 1),
                stat(&f(|x| x.requests_first as f64), 0),
                stat(&f(|x| x.read), 2),
                stat(
                    &samples.iter().map(|x| tree / x.read).collect::<Vec<_>>(),
                    1
                ),
                stat(&f(|x| mib(x.bytes_end)), 1),
                daemon(|d| d.cpu_s, 2),
                daemon(|d| d.hwm_mib, 0),
                daemon(|d| d.written_mib, 0),
            ));
            if let Some(e) = &row.error {
                s.push_str(&format!(
                    "|  ↳ {} of {} runs failed: {} | | | | | | | | | | |\n",
                    r.runs - samples.len(),
                    r.runs,
                    summary(e)
                ));
            }
        }
        s.push('\n');
        // Steady state (measured in the last run on the first link).
        let steady: Vec<(&Row, Steady)> = r
            .rows_of(&link)
            .filter_map(|row| {
                row.samples
                    .iter()
                    .rev()
                    .find_map(|x| x.steady)
                    .map(|st| (row, st))
            })
            .collect();
        if !steady.is_empty() {
            let eager = steady
                .iter()
                .find(|(row, _)| row.system == System::Eager)
                .map(|(_, st)| *st);
            s.push_str(
                "Steady state, once the image is complete (last run): the tree read three times \
                 with the page cache dropped before (cold) and right after (warm); medians.\n\n\
                 | System | Complete after (s from pull start) | Daemon idle after (s) | MiB fetched by then | Cold read (s) | \
                 Cold MiB/s | Cold ÷ eager's speed | Warm read (s) | Warm MiB/s | Warm ÷ eager's speed |\n\
                 |---|---|---|---|---|---|---|---|---|---|\n",
            );
            for (row, st) in &steady {
                let rel = |mine: f64, theirs: Option<f64>| {
                    theirs.map_or("–".to_string(), |t| format!("{:.2}", t / mine))
                };
                s.push_str(&format!(
                    "| {} | {:.1} | {} | {:.1} | {:.2} | {:.0} | {} | {:.3} | {:.0} | {} |\n",
                    row.system.label(),
                    st.complete_s,
                    st.settled_s.map_or("–".into(), |v| format!("{v:.1}")),
                    mib(st.bytes_total),
                    st.cold_s,
                    tree / st.cold_s,
                    rel(st.cold_s, eager.map(|e| e.cold_s)),
                    st.warm_s,
                    tree / st.warm_s,
                    rel(st.warm_s, eager.map(|e| e.warm_s)),
                ));
            }
            s.push('\n');
        }
        // Where fanfill's time to first output went.
        let mut rows = String::new();
        for row in r.rows_of(&link) {
            let b: Vec<(&Sample, &Breakdown)> = row
                .samples
                .iter()
                .filter_map(|x| x.breakdown.as_ref().map(|b| (x, b)))
                .collect();
            if b.is_empty() {
                continue;
            }
            let m = |g: &dyn Fn(&Sample, &Breakdown) -> f64, prec: usize| {
                let v: Vec<f64> = b.iter().map(|(x, b)| g(x, b)).collect();
                format!("{:.prec$}", median(&v))
            };
            rows.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                row.system.label(),
                m(&|_, b| b.index_s, 2),
                m(&|_, b| b.unpack_s, 2),
                m(&|_, b| b.prepare_s, 2),
                m(&|x, _| x.pull, 2),
                m(&|_, b| b.rootfs_s, 2),
                m(&|x, _| x.first_output, 2),
                m(&|_, b| b.opens as f64, 0),
                m(&|_, b| b.opens_held_s, 2),
                m(&|_, b| b.delivered as f64, 0),
                m(&|_, b| b.events as f64, 0),
            ));
        }
        if !rows.is_empty() {
            s.push_str(
                "Where fanfill's time to first output went (medians; seconds from the start of \
                 the pull unless noted; from the daemon's log and its status at first output):\n\n\
                 | System | Index artifact checked | Unpack (s, duration) | Daemon prepare (s, duration) | \
                 Pull done | Container rootfs mounted and watched | First output | Opens held for a fill | \
                 Time they were held (s, sum) | Misses served by a layer stream | Reader range events |\n\
                 |---|---|---|---|---|---|---|---|---|---|---|\n",
            );
            s.push_str(&rows);
            s.push('\n');
        }
    }
    s
}

/// What the columns mean, printed under the tables.
pub const LEGEND: &str = "
Columns:

* **Time to first output**: from the start of the pull command (`ctr image pull`, `podman
  pull` or `ctr-remote image rpull`) to the first byte on the stdout of `ctr run --rm` /
  `podman run --rm` (the workload prints its whole output at the end); container creation
  and start are included.
* **of which pull**: the pull command alone (for the lazy systems: manifest, config,
  snapshot preparation; fanfill also fetches and checks the signed index artifact).
* **MiB fetched by first output** / **Requests by first output**: what the registry (or the
  pull-through cache) sent, whole HTTP responses, and the requests it got, counted by a TCP
  proxy in front of it, from the start of the pull to the first output byte.
* **Tree first read (s, MiB/s)**: a second container of the same image right after reads
  every file of the tree once (`find ... -type f -exec cat {} + > /dev/null`, timed inside
  the container with `date +%s%N`); MiB/s = the tree's bytes / that time. For the eager
  systems the files were just written by the unpack, so they are mostly in the page cache.
* **Daemon CPU / peak RSS**: the snapshotter daemon's user + system CPU time and `VmHWM`
  (from /proc) from its cold start just before the pull to the end of the tree read; for
  fanfill the daemon process alone (its small fd-holder process is not counted).
* **Daemon MiB written**: `write_bytes` of the daemon's /proc/PID/io by the end of the read:
  what it wrote to its filesystems (filled files, kept blobs, caches, records).
* **MiB fetched by end of read**: the registry's bytes from the start of the pull to the end
  of that read (background fetches included).
* **Steady state**: in the last run, after the tree read, the bench waits until the image is
  complete (fanfill: the daemon's status says `complete`, every mark gone; stargz: the
  registry sent nothing for 3 s, its background fetch done; eager: when its pull
  returned) and its daemon wrote nothing for 2 s (fanfill copies complete files into its
  content cache for a while after), then three
  containers each read the tree twice in a row, the page cache dropped before each.

Cold runs: before each run the image is removed, the stargz daemon and the fanfill daemon
are restarted on a fresh root/state dir (no content, blob or index cache survives) and
stopped right after their run (a background fetch still going is not counted in the next
system's run), containerd is checked to reach the restarted snapshotter (an empty `snapshots
prepare`), and the page cache is dropped (`sync; echo 3 > drop_caches`). All containerd
systems share one containerd (root and state on a loop-mounted ext4); podman has its own
storage on the same filesystem; every link serves one registry storage.
";

/// Runs one image: every system over every link, `args.runs` rounds.
pub fn run_image(args: &Args) -> Result<ImageResult> {
    let (mut rig, built) = setup(args)?;
    let mut rows: Vec<Row> = Vec::new();
    for link in args.measured_links() {
        for sys in &args.systems {
            if link.starts_with("pull-through") && !PULL_THROUGH_SYSTEMS.contains(sys) {
                continue;
            }
            let error = (sys.is_stargz() && rig.stargz_bin.is_none()).then(|| {
                format!(
                    "no containerd-stargz-grpc at {}",
                    args.stargz_grpc.display()
                )
            });
            rows.push(Row {
                system: *sys,
                link: link.clone(),
                samples: Vec::new(),
                error,
            });
        }
    }
    let first_link = rig.links[0].name.clone();
    for run_no in 1..=args.runs {
        for sys in &args.systems {
            for li in 0..rig.links.len() {
                let name = rig.links[li].name.clone();
                let measured: Vec<String> = if name == "pull-through" {
                    vec!["pull-through-cold".into(), "pull-through-warm".into()]
                } else {
                    vec![name.clone()]
                };
                for m in measured {
                    let Some(row) = rows.iter_mut().find(|r| r.system == *sys && r.link == m)
                    else {
                        continue;
                    };
                    // A system that failed is not tried again (its error is reported).
                    if row.error.is_some() {
                        continue;
                    }
                    let steady = run_no == args.runs
                        && name == first_link
                        && *sys != System::FanfillOnDemand;
                    eprint!(
                        "peer: {} run {run_no}/{} {} over {m}: ",
                        args.image,
                        args.runs,
                        sys.tag()
                    );
                    match rig.measure(*sys, li, &m, run_no, steady) {
                        Ok(x) => {
                            eprintln!(
                                "first output {:.2} s (pull {:.2} s), {:.1} MiB / {} requests by then; \
                                 tree read {:.2} s; {:.1} MiB by the end; daemon {:?}; steady {:?}",
                                x.first_output,
                                x.pull,
                                mib(x.bytes_first),
                                x.requests_first,
                                x.read,
                                mib(x.bytes_end),
                                x.daemon,
                                x.steady
                            );
                            row.samples.push(x);
                        }
                        Err(e) => {
                            eprintln!("FAILED: {e:#}");
                            row.error = Some(format!("{e:#}"));
                        }
                    }
                }
            }
        }
    }
    run_now("stargz");
    run_now("fanfill");
    let date = run(5, "date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default();
    Ok(ImageResult {
        image: args.image.clone(),
        layers: built.layers.len(),
        gzip_bytes: built.compressed(),
        files: built.files,
        file_bytes: built.file_bytes,
        workload: rig.script.clone(),
        tree: rig.tree.clone(),
        tree_files: rig.tree_files,
        tree_bytes: rig.tree_bytes,
        profile_files: rig.profile_files,
        output: rig.expected.clone(),
        missing_packages: rig.missing.clone(),
        runs: args.runs,
        date: date.trim().to_string(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        rows,
    })
}

/// `bench peer ARGS`: one image, its report on stdout (and `--out`), its JSON (`--json`).
pub fn main(argv: &[String]) -> i32 {
    let res = install_signal_handler().and_then(|()| {
        let args = parse_args(argv)?;
        let r = run_image(&args);
        run_all();
        let r = r?;
        let md = format!("{}{LEGEND}", report_image(&r, "##"));
        println!("{md}");
        if let Some(out) = &args.out {
            std::fs::write(out, &md).with_context(|| format!("writing {}", out.display()))?;
        }
        if let Some(out) = &args.json {
            std::fs::write(out, serde_json::to_string_pretty(&r)?)
                .with_context(|| format!("writing {}", out.display()))?;
        }
        Ok(())
    });
    run_all();
    match res {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("bench peer: error: {e:#}");
            1
        }
    }
}

/// `bench --all` for one image: its result, every teardown done before returning.
pub fn run_image_clean(args: &Args) -> Result<ImageResult> {
    let r = run_image(args);
    run_all();
    r
}

/// Installs the signal handler once (for `bench --all`).
pub fn install_signals() -> Result<()> {
    install_signal_handler()
}
