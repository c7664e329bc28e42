//! Peer benchmark (#17): one image, one workload, one containerd, one registry, every system
//! started through containerd's `ctr`, measured side by side in one run:
//!
//! * containerd eager: `ctr image pull --snapshotter overlayfs` + `ctr run`;
//! * stargz-snapshotter (FUSE): the image converted to eStargz with `ctr-remote image
//!   convert`, `ctr-remote image rpull --snapshotter stargz` + `ctr run`;
//! * fanfill: `fanfill daemon --containerd-socket` with a signed index artifact
//!   (`--index-policy signed`), `ctr-remote image rpull --snapshotter fanfill` + `ctr run`;
//! * fanfill on the eStargz image (it reads the eStargz TOCs).
//!
//! The image is the start benchmark's "python" image (examples/bench/images.rs, made from
//! this machine's Debian packages); the workload is
//! `python3 -c 'import json, sqlite3, ssl, email.parser; print("ok")'`. Measured per system:
//! time from the start of the pull to the first byte on `ctr run`'s stdout, bytes and
//! requests the registry served by then (a counting TCP proxy sits in front of
//! `docker-registry`), then, in a second `ctr run` of the same image, a first read of every
//! file of the python lib tree. Between runs everything is cold: image removed, stargz and
//! fanfill daemons restarted on fresh state, page cache dropped.
//!
//! The link (`--link`): `loopback` (the registry on 127.0.0.1), or `shaped`: the registry in
//! a network namespace behind a veth pair at 1 Gbit/s (`tc tbf`) and a relay adding 1 ms each
//! way, as in the start benchmark (examples/bench/net.rs). `--image large` runs the start
//! benchmark's large image (the python workload runs there too). Beside the times, each
//! snapshotter daemon's CPU, peak RSS and bytes written, and for fanfill where its time to
//! first output went (its log and status).
//!
//! Run as root:
//!   cargo build --release --example peer --bin fanfill
//!   ./target/release/examples/peer [--runs N] [--out FILE] [--link loopback|shaped]
//!     [--image python|large] [--systems eager,stargz,fanfill,fanfill-esgz,fanfill-complete]
//!     [--stargz-grpc PATH] [--fanfill PATH] [--cache DIR]
//!
//! `PEER_FANFILL_LOG` (a log filter) and `PEER_FANFILL_ARGS` (extra daemon arguments) are
//! for looking into a run by hand.
//!
//! `containerd-stargz-grpc` is built with /work/shared/tools/stargz/build-stargz-grpc.sh;
//! without it the stargz row says so and the other rows are still measured.

#[path = "../tests/common/mod.rs"]
mod common;
#[allow(dead_code)]
#[path = "bench/images.rs"]
mod images;
#[allow(dead_code)]
#[path = "bench/net.rs"]
mod net;

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
/// The workload: imports that read a few MiB of the lib tree and load C extensions.
const CODE: &str = "import json, sqlite3, ssl, email.parser; print(\"ok\")";
/// First read of every file of the python lib tree; prints its duration in nanoseconds.
const READ_SCRIPT: &str = "s=$(date +%s%N); find /usr/lib/python3* -type f -exec cat {} + > /dev/null; \
     e=$(date +%s%N); echo $((e - s))";
/// Files and bytes of the python lib tree.
const COUNT_SCRIPT: &str = "find /usr/lib/python3* -type f | wc -l; \
     find /usr/lib/python3* -type f -exec cat {} + | wc -c";
/// Size of the scratch ext4 (registry, containerd, snapshotters).
const SCRATCH_MIB: u64 = 8192;

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

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum System {
    /// containerd's own pull and overlayfs snapshotter.
    Eager,
    /// stargz-snapshotter (FUSE) on the eStargz image.
    Stargz,
    /// fanfill on the plain gzip image with its signed index artifact, filling only what
    /// containers read (`--containerd-prefetch=false`).
    Fanfill,
    /// fanfill on the eStargz image (TOCs, no artifact), on demand only.
    FanfillEstargz,
    /// fanfill on the gzip image as it runs by default: background completion (as stargz
    /// fetches its layers in the background).
    FanfillComplete,
}

const SYSTEMS: [System; 5] = [
    System::Eager,
    System::Stargz,
    System::Fanfill,
    System::FanfillEstargz,
    System::FanfillComplete,
];

impl System {
    fn label(self) -> &'static str {
        match self {
            System::Eager => "containerd eager (pull + overlayfs)",
            System::Stargz => "stargz-snapshotter (FUSE, eStargz image)",
            System::Fanfill => {
                "fanfill snapshotter (gzip image, signed index artifact, --containerd-prefetch=false)"
            }
            System::FanfillEstargz => {
                "fanfill snapshotter on the eStargz image (--containerd-prefetch=false)"
            }
            System::FanfillComplete => {
                "fanfill snapshotter (gzip image, signed index artifact; default: background completion)"
            }
        }
    }

    fn snapshotter(self) -> &'static str {
        match self {
            System::Eager => "overlayfs",
            System::Stargz => "stargz",
            System::Fanfill | System::FanfillEstargz | System::FanfillComplete => "fanfill",
        }
    }

    fn tag(self) -> &'static str {
        match self {
            System::Eager => "eager",
            System::Stargz => "stargz",
            System::Fanfill => "fanfill",
            System::FanfillEstargz => "fanfill-esgz",
            System::FanfillComplete => "fanfill-complete",
        }
    }
}

// ------------------------------------------------------------------------------ the rig

struct Args {
    runs: usize,
    /// `loopback`, or `shaped`: the registry in a network namespace behind a veth pair at
    /// 1 Gbit/s (`tc tbf`) and a 1 ms-each-way delay relay (examples/bench/net.rs).
    link: String,
    /// One of the start benchmark's images (`python` or `large`).
    image: String,
    /// Only these systems (tags), default all.
    systems: Vec<System>,
    out: Option<PathBuf>,
    stargz_grpc: PathBuf,
    fanfill: PathBuf,
    cache: PathBuf,
}

fn parse_args() -> Result<Args> {
    let exe = std::env::current_exe()?;
    // target/release/examples/peer -> target/release
    let release = exe
        .parent()
        .and_then(Path::parent)
        .context("locating target/release")?
        .to_path_buf();
    let mut a = Args {
        runs: 5,
        link: "loopback".into(),
        image: "python".into(),
        systems: SYSTEMS.to_vec(),
        out: None,
        stargz_grpc: release
            .parent()
            .map(|t| t.join("stargz/containerd-stargz-grpc"))
            .unwrap_or_default(),
        fanfill: release.join("fanfill"),
        cache: PathBuf::from("/var/tmp/fanfill-peer"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--runs" => a.runs = val("--runs")?.parse().context("--runs")?,
            "--out" => a.out = Some(PathBuf::from(val("--out")?)),
            "--stargz-grpc" => a.stargz_grpc = PathBuf::from(val("--stargz-grpc")?),
            "--fanfill" => a.fanfill = PathBuf::from(val("--fanfill")?),
            "--cache" => a.cache = PathBuf::from(val("--cache")?),
            "--link" => a.link = val("--link")?,
            "--image" => a.image = val("--image")?,
            "--systems" => {
                let v = val("--systems")?;
                a.systems = v
                    .split(',')
                    .map(|t| {
                        SYSTEMS
                            .iter()
                            .copied()
                            .find(|s| s.tag() == t)
                            .with_context(|| format!("--systems: unknown system {t}"))
                    })
                    .collect::<Result<_>>()?;
            }
            "-h" | "--help" => {
                println!(
                    "peer [--runs N] [--out FILE] [--link loopback|shaped] [--image python|large]\n     \
                     [--systems eager,stargz,fanfill,fanfill-esgz,fanfill-complete]\n     \
                     [--stargz-grpc PATH] [--fanfill PATH] [--cache DIR]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    if !["loopback", "shaped"].contains(&a.link.as_str()) {
        bail!("--link must be loopback or shaped, not {}", a.link);
    }
    Ok(a)
}

/// Everything the runs share.
struct Rig {
    /// The registry of the shaped link (killed on drop); `None` on loopback.
    _shaped_registry: Option<net::Registry>,
    /// The link's name, for the report.
    link: String,
    /// The daemon of the system measured last (`None` for eager), for its CPU and peak RSS.
    daemon_pid: Option<u32>,
    mnt: PathBuf,
    logs: PathBuf,
    proxy: FaultyProxy,
    /// The gzip image, through the proxy.
    plain: String,
    /// The eStargz image, through the proxy.
    esgz: String,
    ctrd_sock: PathBuf,
    ctrd_log: PathBuf,
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
    lib_files: u64,
    lib_bytes: u64,
}

impl Rig {
    /// `ctr` / `ctr-remote` on the rig's containerd and namespace.
    fn ctr(&self, secs: u64, tool: &str, args: &[&str]) -> Result<String> {
        let sock = self.ctrd_sock.to_string_lossy().into_owned();
        let mut full = vec!["-a", &sock, "-n", NS];
        full.extend_from_slice(args);
        run(secs, tool, &full)
    }

    fn reference(&self, sys: System) -> &str {
        match sys {
            System::Eager | System::Fanfill | System::FanfillComplete => &self.plain,
            System::Stargz | System::FanfillEstargz => &self.esgz,
        }
    }

    /// The tails of the logs of containerd and of the snapshotter `sys` uses.
    fn logs_of(&self, sys: System) -> String {
        let mut s = format!(
            "--- containerd log ({}) ---\n{}",
            self.ctrd_log.display(),
            tail(&self.ctrd_log, 15)
        );
        let daemon = match sys {
            System::Eager => None,
            System::Stargz => Some(&self.stargz_log),
            System::Fanfill | System::FanfillEstargz | System::FanfillComplete => {
                Some(&self.fanfill_log)
            }
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

/// `docker-registry` on 127.0.0.1, storage on the scratch fs; returns its address.
fn start_registry(mnt: &Path, logs: &Path) -> Result<std::net::SocketAddr> {
    let port = common::free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let config = mnt.join("registry.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: {addr}\n",
            mnt.join("registry").display()
        ),
    )?;
    let log = logs.join("registry.log");
    let pid = spawn_daemon(
        Command::new("docker-registry").arg("serve").arg(&config),
        &log,
    )?;
    on_exit(8, "registry", move || stop_pid(pid, 10));
    wait_for(30, "docker-registry to answer", || {
        std::net::TcpStream::connect(addr).is_ok()
    })
    .with_context(|| tail(&log, 20))?;
    Ok(addr)
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

/// Builds (or reuses) the image, starts registry, proxy, daemons and containerd, pushes
/// the image with its signed index artifact and its eStargz conversion, and checks the
/// image runs under runc.
fn setup(args: &Args) -> Result<(Rig, images::Built)> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("run as root (mounts, containerd, fanotify, drop_caches)");
    }
    for t in [
        "containerd",
        "ctr",
        "ctr-remote",
        "runc",
        "docker-registry",
        "skopeo",
        "openssl",
        "mkfs.ext4",
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
        .find(|s| s.name == args.image && s.name != "slim")
        .with_context(|| format!("--image {}: python or large", args.image))?;
    let layout = args.cache.join("layouts").join(spec.name);
    let built = images::build(&spec, &layout)?;

    let mnt = scratch_fs(&args.cache)?;
    let (registry, shaped) = if args.link == "shaped" {
        net::setup().context("setting up the shaped link (ip netns, veth)")?;
        on_exit(7, "link", net::teardown);
        let reg = net::Registry::start(&mnt.join("registry"), &logs)?;
        let pid = reg.pid();
        on_exit(8, "registry", move || stop_pid(pid, 10));
        net::shape(Some("1gbit"))?;
        let delay = net::DelayProxy::start(net::direct_host().parse()?, Duration::from_millis(1))?;
        (delay.addr, Some(reg))
    } else {
        (start_registry(&mnt, &logs)?, None)
    };
    // Everything goes through the proxy, under its address: it counts what the registry
    // serves. Requests are counted from the first timed run on.
    let proxy = FaultyProxy::start(registry, Fault::None);
    let host = proxy.host();
    let name = spec.name;
    let plain = format!("{host}/peer/{name}:plain");
    let esgz = format!("{host}/peer/{name}:esgz");
    eprintln!("peer: pushing the image as {plain}");
    run(
        600,
        "skopeo",
        &[
            "--insecure-policy",
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            &format!("oci:{}:bench", layout.display()),
            &format!("docker://{plain}"),
        ],
    )?;

    // The index artifact, signed.
    let (key, index_pub) = common::p256_key(&mnt, "index");
    let k = key.to_string_lossy();
    eprintln!("peer: fanfill index --push --sign-key (signed index artifact)");
    run(
        600,
        &args.fanfill.to_string_lossy(),
        &[
            "index",
            &plain,
            "--push",
            "--tls-verify=false",
            "--sign-key",
            &k,
            "--index-dir",
            &mnt.join("push-indexes").to_string_lossy(),
        ],
    )?;

    let stargz_sock = mnt.join("stargz.sock");
    let fanfill_sock = mnt.join("fanfill-snapshotter.sock");
    let stargz_config = mnt.join("stargz.toml");
    std::fs::write(
        &stargz_config,
        format!("[[resolver.host.\"{host}\".mirrors]]\nhost = \"{host}\"\ninsecure = true\n"),
    )?;
    let (ctrd_sock, ctrd_log) = start_containerd(&mnt, &logs, &stargz_sock, &fanfill_sock)?;
    let stargz_bin = if args.stargz_grpc.exists() {
        Some(args.stargz_grpc.clone())
    } else {
        eprintln!(
            "peer: no containerd-stargz-grpc at {}: the stargz row is skipped",
            args.stargz_grpc.display()
        );
        None
    };
    let mut rig = Rig {
        _shaped_registry: shaped,
        link: args.link.clone(),
        daemon_pid: None,
        mnt: mnt.clone(),
        logs: logs.clone(),
        proxy,
        plain,
        esgz,
        ctrd_sock,
        ctrd_log,
        stargz_bin,
        stargz_config,
        stargz_sock,
        stargz_log: logs.join("stargz-0.log"),
        fanfill_bin: args.fanfill.clone(),
        fanfill_sock,
        fanfill_log: logs.join("fanfill-0.log"),
        fanfill_api: None,
        index_pub,
        generation: 0,
        lib_files: 0,
        lib_bytes: 0,
    };

    // eStargz: pull the plain image into containerd, convert, push.
    eprintln!("peer: converting to eStargz as {}", rig.esgz);
    let (plain, esgz) = (rig.plain.clone(), rig.esgz.clone());
    rig.ctr(600, "ctr", &["image", "pull", "--plain-http", &plain])?;
    rig.ctr(
        900,
        "ctr-remote",
        &["image", "convert", "--oci", "--estargz", &plain, &esgz],
    )?;
    rig.ctr(600, "ctr", &["image", "push", "--plain-http", &esgz])?;

    // The image runs under runc (eager, overlayfs), and the lib tree's size.
    eprintln!("peer: checking the image runs (ctr run, overlayfs)");
    let eager_run = |id: &str, cmd: &[&str]| {
        let mut a = vec!["run", "--rm", "--snapshotter", "overlayfs", &plain, id];
        a.extend_from_slice(cmd);
        rig.ctr(300, "ctr", &a)
    };
    let out = eager_run("peer-check", &["/usr/bin/python3", "-c", CODE])?;
    if out != "ok\n" {
        bail!("the workload printed {out:?}, not \"ok\"");
    }
    let out = eager_run("peer-count", &["/bin/sh", "-c", COUNT_SCRIPT])?;
    let nums: Vec<u64> = out
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    let [files, bytes] = nums[..] else {
        bail!("counting the lib tree printed {out:?}");
    };
    (rig.lib_files, rig.lib_bytes) = (files, bytes);
    rig.ctr(300, "ctr", &["image", "rm", "--sync", &plain, &esgz])?;
    eprintln!(
        "peer: python lib tree: {files} files, {:.1} MiB",
        bytes as f64 / 1048576.0
    );
    rig.restart_fanfill(false)?;
    rig.proxy.set_fault_now(Fault::RecordHeads);
    Ok((rig, built))
}

// ------------------------------------------------------------------------------ measuring

/// One run of one system.
#[derive(Clone, Copy, Debug)]
struct Sample {
    /// Start of the pull to the first byte of `ctr run`'s stdout, seconds.
    first_output: f64,
    /// The pull alone, seconds.
    pull: f64,
    /// Bytes the registry sent by the first output.
    bytes_first: u64,
    /// Requests the registry got by the first output.
    requests_first: usize,
    /// The lib tree's first read, seconds (inside the container).
    read: f64,
    /// Bytes the registry sent by the end of that read.
    bytes_end: u64,
    /// The snapshotter daemon's CPU time (user + system) and peak RSS from its start (cold,
    /// just before the pull) to the end of the read: `None` for eager.
    daemon: Option<DaemonUse>,
    /// Where fanfill's first-output time went (fanfill systems only).
    breakdown: Option<Breakdown>,
}

/// Where a fanfill run's time to first output went: from the daemon's log (wall-clock
/// timestamps against the bench's own) and its status at the moment of first output.
#[derive(Clone, Copy, Debug, Default)]
struct Breakdown {
    /// Pull start to the signed index artifact checked.
    index_s: f64,
    /// Placeholder unpack (every layer's objects).
    unpack_s: f64,
    /// The daemon's whole prepare (index, unpack, marks, records), its own figure.
    prepare_s: f64,
    /// Pull start to the rootfs of the workload's container mounted and watched.
    rootfs_s: f64,
    /// Opens through the container's overlay that waited for a fill, by first output.
    opens: u64,
    /// Of the misses, those served by a running layer stream.
    delivered: u64,
    /// Pre-content events of readers (range misses; overlay mode has none).
    events: u64,
}

impl Breakdown {
    /// This (from the log) with the status figures of `st`.
    fn with_status(self, st: Breakdown) -> Breakdown {
        Breakdown {
            opens: st.opens,
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

#[derive(Clone, Copy, Debug)]
struct DaemonUse {
    cpu_s: f64,
    hwm_mib: f64,
    /// Bytes the daemon dirtied for its filesystems (`write_bytes` of /proc/PID/io): fills,
    /// kept blobs, content cache, records.
    written_mib: f64,
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
    /// Daemons restarted on fresh state, page cache dropped.
    fn make_cold(&mut self, sys: System) -> Result<()> {
        match sys {
            System::Eager => self.daemon_pid = None,
            System::Stargz => self.restart_stargz()?,
            System::Fanfill | System::FanfillEstargz => self.restart_fanfill(false)?,
            System::FanfillComplete => self.restart_fanfill(true)?,
        }
        if sys != System::Eager {
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
                600,
                "ctr",
                &["image", "pull", "--plain-http", "--snapshotter", s, r],
            )?,
            _ => self.ctr(
                600,
                "ctr-remote",
                &["image", "rpull", "--plain-http", "--snapshotter", s, r],
            )?,
        };
        Ok(())
    }

    /// `ctr run` of the workload; returns when its first stdout byte arrived (and the
    /// registry's byte and request counts then), after checking the whole output.
    fn first_output(
        &self,
        sys: System,
        id: &str,
    ) -> Result<(Instant, u64, usize, Option<Breakdown>)> {
        let r = self.reference(sys);
        let err_path = self.logs.join(format!("{id}.stderr"));
        let mut child = Command::new("timeout")
            .args(["-k", "5", "600", "ctr", "-a"])
            .arg(&self.ctrd_sock)
            .args(["-n", NS, "run", "--rm", "--snapshotter", sys.snapshotter()])
            .args([r, id, "/usr/bin/python3", "-c", CODE])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&err_path)?)
            .spawn()
            .context("spawning ctr run")?;
        let mut stdout = child.stdout.take().context("ctr run stdout")?;
        let mut first = [0u8; 1];
        let n = stdout.read(&mut first)?;
        let at = Instant::now();
        let (bytes, requests) = (self.proxy.bytes_down(), self.proxy.request_heads().len());
        let ff_status = match (&self.fanfill_api, sys.snapshotter()) {
            (Some(api), "fanfill") => {
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
        if !status.success() || out != "ok\n" {
            bail!(
                "`ctr run --rm --snapshotter {} {r} {id} /usr/bin/python3 -c '{CODE}'` failed ({status}), stdout {out:?}:\n{}\n{}",
                sys.snapshotter(),
                std::fs::read_to_string(&err_path)
                    .unwrap_or_default()
                    .trim_end(),
                self.logs_of(sys)
            );
        }
        let breakdown = match ff_status {
            Some(fanfill::api::Response::Status { daemon, .. }) => Some(Breakdown {
                opens: daemon.overlay_opens,
                delivered: daemon.delivered_waits,
                events: daemon.events,
                ..Breakdown::default()
            }),
            _ => None,
        };
        Ok((at, bytes, requests, breakdown))
    }

    /// A second container of the same image reads every file of the lib tree; seconds.
    fn read_tree(&self, sys: System, id: &str) -> Result<f64> {
        let r = self.reference(sys);
        let out = self
            .ctr(
                900,
                "ctr",
                &[
                    "run",
                    "--rm",
                    "--snapshotter",
                    sys.snapshotter(),
                    r,
                    id,
                    "/bin/sh",
                    "-c",
                    READ_SCRIPT,
                ],
            )
            .map_err(|e| anyhow::anyhow!("{e:#}\n{}", self.logs_of(sys)))?;
        let ns: u64 = out
            .trim()
            .parse()
            .with_context(|| format!("the lib tree read printed {out:?}"))?;
        Ok(ns as f64 / 1e9)
    }

    /// Removes the image (and any container left by a failure).
    fn remove(&self, sys: System) -> Result<()> {
        remove_containers(&|a: &[&str]| self.ctr(30, "ctr", a));
        self.ctr(300, "ctr", &["image", "rm", "--sync", self.reference(sys)])?;
        Ok(())
    }

    /// One cold run of `sys`; the image is removed afterwards, whatever happened.
    fn measure(&mut self, sys: System, run_no: usize) -> Result<Sample> {
        self.make_cold(sys)?;
        let result = self.pull_and_run(sys, run_no);
        let removed = self.remove(sys);
        // A snapshotter left running keeps fetching in the background (stargz goes on
        // completing its layers after the image is removed): stopped here, so that what the
        // registry sends during the next system's run is that system's alone.
        match sys {
            System::Eager => {}
            System::Stargz => run_now("stargz"),
            System::Fanfill | System::FanfillEstargz | System::FanfillComplete => {
                run_now("fanfill")
            }
        }
        let sample = result?;
        removed?;
        Ok(sample)
    }

    /// Pull, first output, lib tree read.
    fn pull_and_run(&self, sys: System, run_no: usize) -> Result<Sample> {
        let (b0, r0) = (self.proxy.bytes_down(), self.proxy.request_heads().len());
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
        Ok(Sample {
            first_output: (at - t0).as_secs_f64(),
            pull,
            bytes_first: b1 - b0,
            requests_first: r1 - r0,
            read,
            bytes_end: self.proxy.bytes_down() - b0,
            daemon: self.daemon_pid.map(daemon_use).transpose()?,
            breakdown,
        })
    }
}

// ------------------------------------------------------------------------------ report

fn median(v: &[f64]) -> f64 {
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

fn report(
    rig: &Rig,
    built: &images::Built,
    args: &Args,
    results: &[(System, Vec<Sample>, Option<String>)],
) -> String {
    let date = run(5, "date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default();
    let kernel = run(5, "uname", &["-r"]).unwrap_or_default();
    let nproc = run(5, "nproc", &[]).unwrap_or_default();
    let command: Vec<String> = std::env::args().collect();
    let mut s = String::new();
    s.push_str(&format!(
        "Machine: {} cores (`nproc`), kernel {}, {}; command: `{}`\n\n",
        nproc.trim(),
        kernel.trim(),
        date.trim(),
        command.join(" ")
    ));
    s.push_str(&format!(
        "Image: the start benchmark's \"{}\" image, {} layers, {:.1} MiB gzip ({} files, {:.1} MiB); \
         python lib tree `/usr/lib/python3*`: {} files, {:.1} MiB. Workload: `python3 -c '{}'`. \
         Registry: `docker-registry` {} behind a counting TCP proxy. {} cold runs per system, \
         interleaved; median (min–max).\n\n",
        args.image,
        built.layers.len(),
        mib(built.compressed()),
        built.files,
        mib(built.file_bytes),
        rig.lib_files,
        mib(rig.lib_bytes),
        CODE,
        if rig.link == "shaped" {
            "in a network namespace behind a veth pair shaped to 1 Gbit/s (`tc tbf`) and a \
             relay adding 1 ms each way (a ~2 ms round trip)"
        } else {
            "on loopback"
        },
        args.runs,
    ));
    s.push_str(
        "| System | Time to first output (s) | of which pull (s) | MiB fetched by first output | \
         Requests by first output | Lib tree first read (s) | Lib tree first read (MiB/s) | \
         MiB fetched by end of read | Daemon CPU (s) | Daemon peak RSS (MiB) | Daemon MiB written |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for (sys, samples, err) in results {
        if samples.is_empty() {
            s.push_str(&format!(
                "| {} | not measured: {} | | | | | | | | | |\n",
                sys.label(),
                summary(err.as_deref().unwrap_or("?"))
            ));
            continue;
        }
        let f = |g: fn(&Sample) -> f64| samples.iter().map(g).collect::<Vec<f64>>();
        let lib = rig.lib_bytes as f64 / 1048576.0;
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
            sys.label(),
            stat(&f(|x| x.first_output), 2),
            stat(&f(|x| x.pull), 2),
            stat(&f(|x| mib(x.bytes_first)), 1),
            stat(&f(|x| x.requests_first as f64), 0),
            stat(&f(|x| x.read), 2),
            stat(&samples.iter().map(|x| lib / x.read).collect::<Vec<_>>(), 1),
            stat(&f(|x| mib(x.bytes_end)), 1),
            daemon(|d| d.cpu_s, 2),
            daemon(|d| d.hwm_mib, 0),
            daemon(|d| d.written_mib, 0),
        ));
        if let Some(e) = err {
            s.push_str(&format!(
                "|  ↳ {} of {} runs failed: {} | | | | | | | | | | |\n",
                args.runs - samples.len(),
                args.runs,
                summary(e)
            ));
        }
    }
    // Where fanfill's time to first output went.
    let mut rows = String::new();
    for (sys, samples, _) in results {
        let b: Vec<(&Sample, &Breakdown)> = samples
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
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            sys.label(),
            m(&|_, b| b.index_s, 2),
            m(&|_, b| b.unpack_s, 2),
            m(&|_, b| b.prepare_s, 2),
            m(&|x, _| x.pull, 2),
            m(&|_, b| b.rootfs_s, 2),
            m(&|x, _| x.first_output, 2),
            m(&|_, b| b.opens as f64, 0),
            m(&|_, b| b.delivered as f64, 0),
            m(&|_, b| b.events as f64, 0),
        ));
    }
    if !rows.is_empty() {
        s.push_str(
            "\nWhere fanfill's time to first output went (medians; seconds from the start of the \
             pull unless noted; from the daemon's log and its status at first output):\n\n\
             | System | Index artifact checked | Unpack (s, duration) | Daemon prepare (s, duration) | \
             Pull done | Container rootfs mounted and watched | First output | Opens held for a fill | \
             Misses served by a layer stream | Reader range events |\n\
             |---|---|---|---|---|---|---|---|---|---|\n",
        );
        s.push_str(&rows);
    }
    s.push_str(LEGEND);
    s
}

/// What the columns mean, printed under the table.
const LEGEND: &str = "
Columns:

* **Time to first output**: from the start of the pull command (`ctr image pull` or
  `ctr-remote image rpull`) to the first byte on `ctr run --rm`'s stdout (the workload
  prints `ok` once its imports are done); container creation and start are included.
* **of which pull**: the pull command alone (for the lazy systems: manifest, config,
  snapshot preparation; fanfill also fetches and checks the signed index artifact).
* **MiB fetched by first output** / **Requests by first output**: what the registry sent
  (whole HTTP responses, heads included) and the requests it got, counted by a TCP proxy in
  front of it, from the start of the pull to the first output byte.
* **Lib tree first read (s, MiB/s)**: a second `ctr run --rm` of the same image right after reads every
  file of `/usr/lib/python3*` once (`find ... -type f -exec cat {} + > /dev/null`, timed
  inside the container with `date +%s%N`); MiB/s = the tree's bytes / that time. For eager,
  the files were just written by the unpack, so they are mostly in the page cache.
* **Daemon CPU / peak RSS**: the snapshotter daemon's user + system CPU time and `VmHWM`
  (from /proc) from its cold start just before the pull to the end of the lib tree read;
  for fanfill the daemon process alone (its small fd-holder process is not counted).
* **Daemon MiB written**: `write_bytes` of the daemon's /proc/PID/io by the end of the read:
  what it wrote to its filesystems (filled files, kept blobs, caches, records).
* **MiB fetched by end of read**: the registry's bytes from the start of the pull to the end
  of that read (background fetches included).

Cold runs: before each run the image is removed (`ctr image rm --sync`), the stargz daemon
and the fanfill daemon are restarted on a fresh root/state dir (no content, blob or index
cache survives) and stopped right after their run (a background fetch still going is not
counted in the next system's run), containerd is checked to reach the restarted snapshotter (an empty
`snapshots prepare`), and the page cache is dropped (`sync; echo 3 > drop_caches`). All
systems share one containerd (root and state on a loop-mounted ext4) and one registry.
";

// ------------------------------------------------------------------------------ main

fn real_main() -> Result<()> {
    let args = parse_args()?;
    let (mut rig, built) = setup(&args)?;
    let mut results: Vec<(System, Vec<Sample>, Option<String>)> = args
        .systems
        .iter()
        .map(|s| (*s, Vec::new(), None))
        .collect();
    if rig.stargz_bin.is_none() {
        for r in results.iter_mut().filter(|r| r.0 == System::Stargz) {
            r.2 = Some(format!(
                "no containerd-stargz-grpc at {}",
                args.stargz_grpc.display()
            ));
        }
    }
    for run_no in 1..=args.runs {
        for (sys, samples, err) in results.iter_mut() {
            // A system that failed is not tried again (its error is reported).
            if err.is_some() {
                continue;
            }
            eprint!("peer: run {run_no}/{} {:?}: ", args.runs, sys);
            match rig.measure(*sys, run_no) {
                Ok(x) => {
                    eprintln!(
                        "first output {:.2} s (pull {:.2} s), {:.1} MiB / {} requests by then; \
                         lib tree read {:.2} s; {:.1} MiB by the end; daemon {:?}",
                        x.first_output,
                        x.pull,
                        mib(x.bytes_first),
                        x.requests_first,
                        x.read,
                        mib(x.bytes_end),
                        x.daemon
                    );
                    samples.push(x);
                }
                Err(e) => {
                    eprintln!("FAILED: {e:#}");
                    *err = Some(format!("{e:#}"));
                }
            }
        }
    }
    run_now("stargz");
    run_now("fanfill");
    let table = report(&rig, &built, &args, &results);
    println!("{table}");
    if let Some(out) = &args.out {
        std::fs::write(out, &table).with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}

fn main() {
    let res = install_signal_handler().and_then(|()| real_main());
    run_all();
    if let Err(e) = res {
        eprintln!("peer: error: {e:#}");
        std::process::exit(1);
    }
}
