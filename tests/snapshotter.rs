//! fanfill as containerd's proxy snapshotter, end to end: Debian's containerd (private root,
//! state, socket and config), the real `fanfill daemon --containerd-socket`, an image in a
//! local registry, `ctr-remote image rpull --snapshotter fanfill`, then
//! `ctr run --snapshotter fanfill` of a program that execs a dynamically linked binary
//! (ld.so maps libc), reads files of three layers and checks a whiteout. Its output must
//! equal the same run on containerd's own overlayfs snapshotter after an ordinary pull;
//! bytes fetched are reported against the image size; removing the image must leave no
//! snapshot, placeholder tree or mount behind.
//!
//! Scenarios: an image with its index artifact (and a daemon SIGKILLed and restarted under
//! a running container), an image without one (the daemon streams each layer once to index
//! it), and a daemon that cannot reach the registry (every layer falls back to an ordinary
//! snapshot that containerd fills by applying the diff).

#[path = "support/containerd.rs"]
mod containerd;
mod fsutil;
#[path = "support/rootfs_layers.rs"]
mod rootfs_layers;

use std::path::Path;

use containerd::Containerd;
use fanfill::ocibuild::{self, BuiltImage, Compression, LayerItem};
use fsutil::daemonproc::DaemonProc;
use fsutil::{LoopFs, pattern};

mod common;

/// The container's workload: exec of a dynamically linked program (ld.so maps libc) that
/// reads files of the data layer and the top layer, a listing with owners, modes and sizes,
/// and a whiteout check.
const SCRIPT: &str = "/usr/bin/sha256sum /data/a /data/b /data/notes/n7.txt /data/top.txt /usr/bin/sha256sum; \
    /bin/busybox ls -ln /data | /bin/busybox grep -v '^total' | /bin/busybox sort; \
    /bin/busybox cat /data/notes/n3.txt; \
    test -e /data/gone && echo WHITEOUT-BROKEN; echo done";

/// Reads of files the first run left alone, run in a container started before the daemon
/// was SIGKILLed and restarted.
const SCRIPT_AFTER_RESTART: &str =
    "/usr/bin/sha256sum /data/unread /data/top-unread /data/notes/n11.txt; echo done";

fn image(dir: &Path) -> BuiltImage {
    let (base, data) = rootfs_layers::base_and_data(24);
    let top = vec![
        rootfs_layers::dir("data"),
        LayerItem::Whiteout {
            path: "data/gone".into(),
        },
        LayerItem::File {
            path: "data/top.txt".into(),
            mode: 0o644,
            data: pattern(50_000, 34),
        },
        LayerItem::File {
            path: "data/top-unread".into(),
            mode: 0o644,
            data: pattern(8 << 20, 35),
        },
    ];
    ocibuild::write_layout(dir, "v1", &[base, data, top], Compression::Gzip).unwrap()
}

/// A pod sandbox image in the registry at `host`: a static busybox that sleeps (its
/// command set with umoci). Returns its reference.
fn pause_image(dir: &Path, host: &str) -> String {
    let layer = vec![
        rootfs_layers::dir("bin"),
        LayerItem::HostFile {
            path: "bin/busybox".into(),
            host: std::fs::canonicalize("/bin/busybox").unwrap(),
        },
    ];
    let built = ocibuild::write_layout(dir, "v1", &[layer], Compression::Gzip).unwrap();
    let st = std::process::Command::new("umoci")
        .args(["config", "--image"])
        .arg(format!("{}:v1", built.dir.display()))
        .args(["--config.cmd", "/bin/busybox", "--config.cmd", "sleep"])
        .args(["--config.cmd", "100000"])
        .status()
        .unwrap();
    assert!(st.success(), "umoci config");
    common::push_layout(&built.dir, "v1", host, "snap/pause", &[]);
    format!("{host}/snap/pause:v1")
}

/// The last `n` lines of `s`.
fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Bytes the daemon fetched from the registry, all images together, and how many images
/// it serves.
fn fetched(daemon: &DaemonProc) -> (u64, usize) {
    let (_, images) = daemon.status();
    (images.iter().map(|i| i.bytes_fetched).sum(), images.len())
}

/// Mounts (from `/proc/self/mountinfo`) whose mount point or source lies under `dir`.
fn mounts_under(dir: &Path) -> Vec<String> {
    let d = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.split(' ').nth(4).is_some_and(|mp| mp.starts_with(&d)))
        .map(str::to_string)
        .collect()
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Containerd and a fanfill daemon serving it, on a scratch ext4, with the test image in a
/// local registry.
struct Rig {
    // Dropped in this order: containerd, then the daemon, the registry, the filesystem.
    ctrd: Containerd,
    _ctrd_dir: tempfile::TempDir,
    daemon: DaemonProc,
    registry: common::TestRegistry,
    built: BuiltImage,
    reference: String,
    state: std::path::PathBuf,
    daemon_args: Vec<String>,
    _fs: LoopFs,
}

impl Rig {
    /// `index`: push the image's index artifact, signed (and let the daemon use it:
    /// `--index-policy signed` with the public key); `daemon_extra`: more daemon flags; `cri`:
    /// turn containerd's CRI plugin on, with fanfill as its snapshotter and a pause image.
    fn start(index: bool, daemon_extra: &[&str], cri: bool) -> Rig {
        Rig::start_with(index, daemon_extra, cri, true)
    }

    /// [`Rig::start`]; `on_demand`: the daemon fills only what containers read
    /// (`--containerd-prefetch=false`, unless `daemon_extra` says otherwise), else it runs
    /// with its defaults (background completion).
    fn start_with(index: bool, daemon_extra: &[&str], cri: bool, on_demand: bool) -> Rig {
        Rig::start_image(index, daemon_extra, cri, on_demand, image)
    }

    /// [`Rig::start_with`] with the image `build` writes as an OCI layout into the
    /// directory it is given.
    fn start_image(
        index: bool,
        daemon_extra: &[&str],
        cri: bool,
        on_demand: bool,
        build: fn(&Path) -> BuiltImage,
    ) -> Rig {
        let fs = LoopFs::new("ext4", 1024);
        let registry = common::TestRegistry::start();
        let built = build(&fs.mnt.join("layout"));
        let reference = format!("{}/snap/app:v1", registry.host());
        common::push_layout(&built.dir, "v1", &registry.host(), "snap/app", &[]);
        let (key, public) = common::p256_key(&fs.mnt, "index");
        if index {
            let out = fsutil::daemonproc::bin()
                .args(["index", &reference, "--push", "--tls-verify=false"])
                .arg("--index-dir")
                .arg(fs.mnt.join("push-indexes"))
                .arg("--sign-key")
                .arg(&key)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "fanfill index --push: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let state = fs.mnt.join("state");
        std::fs::create_dir(&state).unwrap();
        let snap_sock = state.join("snapshotter.sock");
        let mut daemon_args = vec![
            "--containerd-socket".to_string(),
            snap_sock.to_string_lossy().into_owned(),
        ];
        if index {
            // The daemon takes a pushed index artifact only when told to (the default builds
            // indexes locally from the verified layer stream): here, one signed with the key.
            daemon_args.extend([
                "--index-policy".to_string(),
                "signed".to_string(),
                "--index-key".to_string(),
                public.to_string_lossy().into_owned(),
            ]);
        }
        // The tests measure what containers read: background completion (on by default)
        // only where a test asks for it.
        if on_demand
            && !daemon_extra
                .iter()
                .any(|a| a.starts_with("--containerd-prefetch"))
        {
            daemon_args.push("--containerd-prefetch=false".to_string());
        }
        daemon_args.extend(daemon_extra.iter().map(|a| a.to_string()));
        let args: Vec<&str> = daemon_args.iter().map(String::as_str).collect();
        let daemon = DaemonProc::start(&state, &args);
        let ctrd_dir = tempfile::tempdir().unwrap();
        let cri_config = cri.then(|| {
            let pause = pause_image(&fs.mnt.join("pause"), &registry.host());
            let d = ctrd_dir.path();
            format!(
                r#"[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  disable_apparmor = true
  # The sandbox's oom_score_adj (-998) may be below what this process may set.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "fanfill"
    disable_snapshot_annotations = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni}/bin"
    conf_dir = "{cni}/conf"
  [plugins."io.containerd.grpc.v1.cri".registry.mirrors."{host}"]
    endpoint = ["http://{host}"]
"#,
                cni = d.join("cni").display(),
                host = registry.host(),
            )
        });
        let proxy = format!(
            "[proxy_plugins]\n  [proxy_plugins.fanfill]\n    type = \"snapshot\"\n    address = \"{}\"\n",
            snap_sock.display()
        );
        let ctrd = match cri_config {
            Some(cri) => Containerd::start_with_cri(&format!("{proxy}\n{cri}")),
            None => Containerd::start_with(&proxy),
        };
        Rig {
            ctrd,
            _ctrd_dir: ctrd_dir,
            daemon,
            registry,
            built,
            reference,
            state,
            daemon_args,
            _fs: fs,
        }
    }

    /// `what` with the tails of both logs.
    fn fail(&self, what: &str) -> String {
        format!(
            "{what}\n--- daemon log (tail) ---\n{}\n--- containerd log (tail) ---\n{}",
            tail(&self.daemon.log_text(), 40),
            tail(&self.ctrd.log(), 40)
        )
    }

    /// SIGKILLs the daemon and starts another on the same state; returns once containerd
    /// reaches it again. Returns the killed one's handle: dropping it stops the fd holder
    /// the new daemon took over, so keep it until the end.
    fn kill_and_restart_daemon(&mut self) -> DaemonProc {
        self.daemon.kill9();
        let args: Vec<&str> = self.daemon_args.iter().map(String::as_str).collect();
        let old = std::mem::replace(&mut self.daemon, DaemonProc::start(&self.state, &args));
        // containerd reconnects to the proxy plugin on its own (backoff of at most 3 s).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !self
            .ctrd
            .run("ctr", &["snapshots", "--snapshotter", "fanfill", "ls"])
            .status
            .success()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "{}",
                self.fail("no reconnect")
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        old
    }

    /// Kills the task of container `name` if it runs, deletes it, then the container: a
    /// container started with `ctr run -d` otherwise leaves its shim running after the test.
    fn remove_container(&self, name: &str) {
        let _ = self
            .ctrd
            .run("ctr", &["task", "kill", "--signal", "SIGKILL", name]);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !self.ctrd.run("ctr", &["task", "rm", name]).status.success() {
            let listed = self.ctrd.run("ctr", &["task", "ls", "-q"]);
            if !String::from_utf8_lossy(&listed.stdout)
                .lines()
                .any(|l| l.trim() == name)
            {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "task {name} did not stop"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        self.ctr("ctr", &["container", "rm", name]);
    }

    /// Runs `tool args`; panics with both logs unless it succeeds; returns stdout.
    fn ctr(&self, tool: &str, args: &[&str]) -> String {
        let out = self.ctrd.run(tool, args);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{}",
            self.fail(&format!(
                "{tool} {args:?}: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            ))
        );
        stdout
    }

    fn rpull(&self) {
        self.rpull_as(&self.reference);
    }

    /// Bytes fetched and images served once the daemon serves `n` lazy images: a pull
    /// returns once the layers are committed, while the daemon still makes their trees.
    fn served(&self, n: usize) -> (u64, usize) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let got = fetched(&self.daemon);
            if got.1 >= n || std::time::Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    fn rpull_as(&self, reference: &str) {
        self.ctr(
            "ctr-remote",
            &[
                "image",
                "rpull",
                "--plain-http",
                "--snapshotter",
                "fanfill",
                reference,
            ],
        );
    }

    /// `ctr run --rm` of `script` on `snapshotter`.
    fn run(&self, snapshotter: &str, id: &str, script: &str) -> String {
        self.ctr(
            "ctr",
            &[
                "run",
                "--rm",
                "--snapshotter",
                snapshotter,
                &self.reference,
                id,
                "/bin/sh",
                "-c",
                script,
            ],
        )
    }

    /// The outputs of `scripts` on containerd's own pull and overlayfs snapshotter.
    fn eager(&self, scripts: &[&str]) -> Vec<String> {
        self.ctr(
            "ctr",
            &[
                "image",
                "pull",
                "--plain-http",
                "--snapshotter",
                "overlayfs",
                &self.reference,
            ],
        );
        scripts
            .iter()
            .enumerate()
            .map(|(i, s)| self.run("overlayfs", &format!("eager-{i}"), s))
            .collect()
    }

    /// Checks that each layer of the image is a committed snapshot of fanfill's (after a
    /// pull of the image alone).
    fn check_layers_committed(&self) {
        let snaps = self.snapshots();
        let n = self.built.layers.len();
        assert_eq!(
            snaps.iter().filter(|(_, k)| k == "Committed").count(),
            n,
            "{}",
            self.fail(&format!(
                "{n} committed layer snapshots expected: {snaps:?}"
            ))
        );
    }

    /// fanfill's snapshots as `ctr snapshots ls` shows them: (name, kind) per line.
    fn snapshots(&self) -> Vec<(String, String)> {
        self.ctr("ctr", &["snapshots", "--snapshotter", "fanfill", "ls"])
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                Some((f.first()?.to_string(), f.last()?.to_string()))
            })
            .collect()
    }

    /// Removes the image; then nothing of it may be left: no snapshot (containerd's list
    /// and the snapshotter's directories), no lazy image tree, no image served, no mount.
    fn remove_and_check_clean(&self) {
        self.ctr("ctr", &["image", "rm", "--sync", &self.reference]);
        let snaps = self.snapshots();
        assert!(
            snaps.is_empty(),
            "{}",
            self.fail(&format!("snapshots left: {snaps:?}"))
        );
        let dirs = entries(&self.state.join("snapshots/snapshots"));
        assert!(dirs.is_empty(), "snapshot directories left: {dirs:?}");
        let trees = entries(&self.state.join("roots/containerd"));
        assert!(
            trees.is_empty(),
            "{}",
            self.fail(&format!("lazy image trees left: {trees:?}"))
        );
        assert_eq!(
            fetched(&self.daemon).1,
            0,
            "the daemon still serves an image"
        );
        // Layers kept whole (streamed to index them, or sent whole by a server) go with
        // the last image that has them.
        let blobs = entries(&self.state.join("blobs/sha256"));
        assert!(blobs.is_empty(), "kept layer blobs left: {blobs:?}");
        assert_eq!(
            mounts_under(&self.state),
            Vec::<String>::new(),
            "mounts left"
        );
    }
}

/// The image with its index artifact: rpull fetches no layer, the run fetches a fraction of
/// the image and matches the eager run. Then a container is started, the daemon SIGKILLed
/// and restarted: containerd's snapshot list is intact, and the running container reads
/// files nobody read before with the right bytes (the restarted daemon watches its rootfs
/// again). Removing everything leaves nothing behind.
#[test]
fn ctr_remote_rpull_and_ctr_run_on_fanfill() {
    let mut rig = Rig::start(true, &["--containerd-tls-verify=false"], false);
    rig.rpull();
    let (before, images) = rig.served(1);
    assert_eq!(images, 1, "{}", rig.fail("one lazy image expected"));
    rig.check_layers_committed();
    // containerd's content store has no layer blob: it never downloaded one.
    let content = rig.ctr("ctr", &["content", "ls", "--quiet"]);
    let blobs: Vec<&str> = content.lines().map(str::trim).collect();
    assert_eq!(blobs.len(), 2, "manifest and config only: {content}");
    for (digest, _, _) in &rig.built.layers {
        assert!(
            !blobs.contains(&digest.as_str()),
            "containerd downloaded layer {digest}:\n{content}"
        );
    }

    let lazy_out = rig.run("fanfill", "lazy", SCRIPT);
    let (after, _) = fetched(&rig.daemon);
    eprintln!("container output:\n{lazy_out}");
    let size = rig.built.compressed_size();
    eprintln!(
        "with index artifact: bytes fetched by fanfill: {before} after rpull, {after} after the run; image layers {size} bytes compressed ({:.1}% fetched)",
        after as f64 * 100.0 / size as f64
    );
    assert!(
        after < size / 2,
        "the run fetched {after} of {size} bytes: not lazy"
    );

    // A container that keeps running while the daemon is SIGKILLed and restarted.
    rig.ctr(
        "ctr",
        &[
            "run",
            "-d",
            "--snapshotter",
            "fanfill",
            &rig.reference,
            "kept",
            "/bin/busybox",
            "sleep",
            "600",
        ],
    );
    let snaps_before = rig.snapshots();
    let old = rig.kill_and_restart_daemon();
    let snaps_after = rig.snapshots();
    assert_eq!(
        snaps_after, snaps_before,
        "snapshot list changed by the restart"
    );
    let restart_out = rig.ctr(
        "ctr",
        &[
            "task",
            "exec",
            "--exec-id",
            "after-restart",
            "kept",
            "/bin/sh",
            "-c",
            SCRIPT_AFTER_RESTART,
        ],
    );
    let (after_restart, _) = fetched(&rig.daemon);
    eprintln!(
        "after the restart the kept container read {} more bytes' worth of files; fetched by the new daemon: {after_restart}",
        24 * 1048576 + 8 * 1048576
    );

    let eager = rig.eager(&[SCRIPT, SCRIPT_AFTER_RESTART]);
    assert!(lazy_out.ends_with("done\n"), "{lazy_out}");
    assert!(!lazy_out.contains("WHITEOUT-BROKEN"));
    assert_eq!(lazy_out, eager[0], "lazy and eager runs differ");
    assert_eq!(
        restart_out, eager[1],
        "the container read wrong bytes after the daemon's restart"
    );

    rig.remove_container("kept");
    rig.remove_and_check_clean();
    drop(old);
}

/// The image without an index artifact: the daemon reads each layer once at rpull to index
/// it (no layer reaches containerd's content store), and the run matches the eager run.
#[test]
fn image_without_index_artifact_is_indexed_at_pull() {
    let rig = Rig::start(false, &["--containerd-tls-verify=false"], false);
    rig.rpull();
    let (before, images) = rig.served(1);
    assert_eq!(images, 1, "{}", rig.fail("one lazy image expected"));
    let lazy_out = rig.run("fanfill", "lazy", SCRIPT);
    let (after, _) = fetched(&rig.daemon);
    let size = rig.built.compressed_size();
    eprintln!(
        "without index artifact: bytes fetched by fanfill: {before} after rpull (streamed index), {after} after the run; image layers {size} bytes compressed"
    );
    // Each layer streamed once to index it, and status says so from the start.
    assert!(
        before >= size && after <= size + size / 50,
        "fetched {before} after rpull, {after} after the run, for {size} bytes of layers"
    );
    let eager = rig.eager(&[SCRIPT]);
    assert_eq!(lazy_out, eager[0], "lazy and eager runs differ");
    rig.remove_and_check_clean();
}

/// A daemon that cannot reach the registry (it insists on TLS; the registry speaks plain
/// HTTP): every lazy prepare fails, each layer falls back to an ordinary snapshot that
/// containerd fills by applying the diff, and the pull and the run still work, on the
/// overlay mounts the snapshotter hands out.
#[test]
fn unreachable_layers_fall_back_to_ordinary_snapshots() {
    let rig = Rig::start(true, &[], false);
    rig.rpull();
    assert_eq!(fetched(&rig.daemon).1, 0, "no lazy image expected");
    let content = rig.ctr("ctr", &["content", "ls", "--quiet"]);
    for (digest, _, _) in &rig.built.layers {
        assert!(
            content.lines().any(|l| l.trim() == digest),
            "containerd did not download layer {digest}: {content}"
        );
    }
    let log = rig.daemon.log_text();
    assert!(
        log.contains("layer not served lazily; containerd unpacks it"),
        "{}",
        rig.fail("no fallback logged")
    );
    // containerd commits each layer with its labels: the layer digest stays on the ordinary
    // snapshot (what lets a later lazy image stack its own tree of that layer instead).
    for (name, _) in rig.snapshots() {
        let info = rig.ctr(
            "ctr",
            &["snapshots", "--snapshotter", "fanfill", "info", &name],
        );
        assert!(
            info.contains(fanfill::snapshotter::LABEL_STARGZ_DIGEST),
            "no layer digest label on {name}: {info}"
        );
    }
    let out = rig.run("fanfill", "fallback", SCRIPT);
    let eager = rig.eager(&[SCRIPT]);
    assert_eq!(out, eager[0], "fallback and eager runs differ");
    rig.remove_and_check_clean();
}

/// A lazy layer over layers containerd unpacked itself: the base image (the app image's
/// two lower layers, same digests) pulled the ordinary way onto fanfill first, then the app
/// image rpulled: containerd finds the two lower layers' snapshots and asks fanfill only for
/// the top one, which is served lazily. The container's rootfs stacks the lazy tree over
/// the two ordinary snapshots (one watch, one filesystem) and its output equals the eager
/// run's.
#[test]
fn lazy_layer_over_layers_containerd_unpacked() {
    let rig = Rig::start(true, &["--containerd-tls-verify=false"], false);
    let (base, data) = rootfs_layers::base_and_data(24);
    let base_built = ocibuild::write_layout(
        &rig.state.join("../base-layout"),
        "v1",
        &[base, data],
        Compression::Gzip,
    )
    .unwrap();
    assert_eq!(
        base_built.layers[..],
        rig.built.layers[..2],
        "the base image's layers are the app image's lower layers"
    );
    common::push_layout(
        &base_built.dir,
        "v1",
        &rig.registry.host(),
        "snap/base",
        &[],
    );
    let base_ref = format!("{}/snap/base:v1", rig.registry.host());
    rig.ctr(
        "ctr",
        &[
            "image",
            "pull",
            "--plain-http",
            "--snapshotter",
            "fanfill",
            &base_ref,
        ],
    );
    assert_eq!(
        fetched(&rig.daemon).1,
        0,
        "the base image was pulled eagerly"
    );
    rig.rpull();
    assert_eq!(rig.served(1).1, 1, "{}", rig.fail("the top layer is lazy"));
    let content = rig.ctr("ctr", &["content", "ls", "--quiet"]);
    let top = &rig.built.layers[2].0;
    assert!(
        !content.lines().any(|l| l.trim() == top),
        "containerd downloaded the top layer:\n{content}"
    );
    let out = rig.run("fanfill", "mixed", SCRIPT);
    let (fetched_bytes, _) = fetched(&rig.daemon);
    eprintln!(
        "lazy top layer over two unpacked layers: fanfill fetched {fetched_bytes} bytes; top layer {} bytes compressed",
        rig.built.layers[2].1
    );
    let eager = rig.eager(&[SCRIPT]);
    assert_eq!(out, eager[0], "mixed and eager runs differ");
    rig.ctr("ctr", &["image", "rm", "--sync", &base_ref]);
    rig.remove_and_check_clean();
}

/// The daemon's defaults, as a node runs it: the images containerd has fanfill serve are
/// completed in the background (each layer streamed once, as stargz-snapshotter fetches its
/// layers), so after the first run the image reaches "complete", every byte of the image
/// once beside what the first container's start read on demand before the streams began,
/// and a second container reads native files. Output equals the eager run's.
#[test]
fn images_complete_in_the_background_by_default() {
    let rig = Rig::start_with(true, &["--containerd-tls-verify=false"], false, false);
    assert!(
        !rig.daemon_args
            .iter()
            .any(|a| a.contains("containerd-prefetch")),
        "{:?}",
        rig.daemon_args
    );
    rig.rpull();
    let out = rig.run("fanfill", "first", SCRIPT);
    // What the container's start fetched on demand (with read-around) before the streams,
    // which wait for it to go quiet, began.
    let early = rig.daemon.status().1.first().map_or(0, |i| i.bytes_fetched);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let status = loop {
        let (_, images) = rig.daemon.status();
        if images.first().is_some_and(|i| i.state == "complete") {
            break images[0].clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            rig.fail(&format!(
                "not complete: {:?}",
                images.first().map(|i| &i.state)
            ))
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let size = rig.built.compressed_size();
    eprintln!(
        "default (background completion): complete with {} bytes fetched, image {size} bytes compressed",
        status.bytes_fetched
    );
    assert!(
        status.bytes_fetched >= size && status.bytes_fetched <= size + early + size / 20,
        "{} bytes fetched for {size} ({early} before the streams)",
        status.bytes_fetched
    );
    let again = rig.run("fanfill", "second", SCRIPT);
    let eager = rig.eager(&[SCRIPT]);
    assert_eq!(out, eager[0], "lazy and eager runs differ");
    assert_eq!(again, eager[0], "a run on the complete image differs");
    rig.remove_and_check_clean();
}

/// The output a CRI container logged (containerd's CRI log format: `TIME STREAM TAG TEXT`,
/// tag `P` for a partial line).
fn cri_log_text(log: &str) -> String {
    let mut out = String::new();
    for line in log.lines() {
        let mut f = line.splitn(4, ' ');
        let (_, _, tag, text) = (f.next(), f.next(), f.next(), f.next().unwrap_or(""));
        out.push_str(text);
        if tag != Some("P") {
            out.push('\n');
        }
    }
    out
}

/// The CRI path, as a kubelet drives it: containerd's CRI plugin with `snapshotter =
/// "fanfill"` and `disable_snapshot_annotations = false`, a CRI client pulling the image
/// (the `cri.*` layer labels reach fanfill), running a host-network pod sandbox, creating
/// and starting a container and reading its log. Layers are not downloaded whole, the
/// output equals the eager run, and removing pod and images leaves nothing behind.
#[test]
fn cri_pull_and_run_on_fanfill() {
    use k8s_cri::v1::image_service_client::ImageServiceClient;
    use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
    use k8s_cri::v1::*;

    let rig = Rig::start(true, &["--containerd-tls-verify=false"], true);
    let logs = tempfile::tempdir().unwrap();
    let pause = format!("{}/snap/pause:v1", rig.registry.host());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sock = rig.ctrd.socket.clone();
    let reference = rig.reference.clone();
    let log_dir = logs.path().to_path_buf();
    let cri = async move {
        let ch = containerd_client::connect(&sock).await.unwrap();
        let mut images = ImageServiceClient::new(ch.clone());
        let mut runtime = RuntimeServiceClient::new(ch);
        let spec = |image: &str| ImageSpec {
            image: image.to_string(),
            ..Default::default()
        };
        images
            .pull_image(PullImageRequest {
                image: Some(spec(&reference)),
                ..Default::default()
            })
            .await
            .map_err(|e| format!("PullImage: {e}"))?;
        let sandbox = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: "lazy".into(),
                uid: "uid-lazy".into(),
                namespace: "default".into(),
                attempt: 0,
            }),
            // Host network: the host's UTS namespace, no hostname of its own.
            log_directory: log_dir.to_string_lossy().into_owned(),
            linux: Some(LinuxPodSandboxConfig {
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        network: NamespaceMode::Node as i32,
                        pid: NamespaceMode::Pod as i32,
                        ipc: NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let pod = runtime
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(sandbox.clone()),
                runtime_handler: String::new(),
            })
            .await
            .map_err(|e| format!("RunPodSandbox: {e}"))?
            .into_inner()
            .pod_sandbox_id;
        let id = runtime
            .create_container(CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(ContainerConfig {
                    metadata: Some(ContainerMetadata {
                        name: "app".into(),
                        attempt: 0,
                    }),
                    image: Some(spec(&reference)),
                    command: vec!["/bin/sh".into(), "-c".into(), SCRIPT.into()],
                    log_path: "app.log".into(),
                    ..Default::default()
                }),
                sandbox_config: Some(sandbox),
            })
            .await
            .map_err(|e| format!("CreateContainer: {e}"))?
            .into_inner()
            .container_id;
        runtime
            .start_container(StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .map_err(|e| format!("StartContainer: {e}"))?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            let st = runtime
                .container_status(ContainerStatusRequest {
                    container_id: id.clone(),
                    verbose: false,
                })
                .await
                .map_err(|e| format!("ContainerStatus: {e}"))?
                .into_inner()
                .status
                .ok_or("no status")?;
            if st.state == ContainerState::ContainerExited as i32 {
                if st.exit_code != 0 {
                    return Err(format!("container exited with {}", st.exit_code));
                }
                break;
            }
            if std::time::Instant::now() > deadline {
                return Err("container did not finish".into());
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let log = std::fs::read_to_string(log_dir.join("app.log")).map_err(|e| e.to_string())?;
        runtime
            .remove_container(RemoveContainerRequest { container_id: id })
            .await
            .map_err(|e| format!("RemoveContainer: {e}"))?;
        runtime
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: pod.clone(),
            })
            .await
            .map_err(|e| format!("StopPodSandbox: {e}"))?;
        runtime
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: pod,
            })
            .await
            .map_err(|e| format!("RemovePodSandbox: {e}"))?;
        Ok::<_, String>((log, images))
    };
    let (log, mut images) = rt
        .block_on(cri)
        .unwrap_or_else(|e| panic!("{}", rig.fail(&e)));
    let out = cri_log_text(&log);
    let (fetched_bytes, served) = fetched(&rig.daemon);
    let size = rig.built.compressed_size();
    eprintln!(
        "CRI: {served} lazy images (app and pause); fetched {fetched_bytes} bytes; app image layers {size} bytes compressed"
    );
    // The layers went through fanfill: containerd's content store (k8s.io) holds no layer
    // blob of the app image.
    let content = rig
        .ctrd
        .run_in("k8s.io", "ctr", &["content", "ls", "--quiet"]);
    let content = String::from_utf8_lossy(&content.stdout);
    for (digest, _, _) in &rig.built.layers {
        assert!(
            !content.lines().any(|l| l.trim() == digest),
            "containerd downloaded layer {digest}"
        );
    }
    assert!(
        fetched_bytes < size / 2,
        "fetched {fetched_bytes} of {size} bytes: not lazy"
    );
    let eager = rig.eager(&[SCRIPT]);
    assert_eq!(out, eager[0], "CRI and eager runs differ");

    // Remove both images through CRI: nothing of them may be left.
    for image in [&rig.reference, &pause] {
        rt.block_on(images.remove_image(RemoveImageRequest {
            image: Some(ImageSpec {
                image: image.to_string(),
                ..Default::default()
            }),
        }))
        .unwrap_or_else(|e| panic!("{}", rig.fail(&format!("RemoveImage {image}: {e}"))));
    }
    // CRI removes images asynchronously from the snapshotter's view: wait for the trees.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !entries(&rig.state.join("roots/containerd")).is_empty()
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(
        entries(&rig.state.join("roots/containerd")).is_empty(),
        "{}",
        rig.fail("lazy image trees left after CRI removed the images")
    );
    assert_eq!(
        mounts_under(&rig.state),
        Vec::<String>::new(),
        "mounts left"
    );
}

/// A pull-through cache as mirror in containerd's `hosts.toml`: the origin (behind a
/// counting TCP proxy) is the image's registry, a second `docker-registry` in proxy mode
/// (behind another) is listed for it in `HOSTS_DIR/ORIGIN/hosts.toml`, and the daemon reads
/// that directory (`--containerd-hosts-dir`). Fills go to the mirror: it caches what the
/// containers read; on its cold cache it answers range reads with whole blobs, which cost
/// one copy per layer. Reports requests and bytes at the origin and at the mirror, bytes
/// cached at the mirror and bytes fanfill fetched, for a first and a second pull (after
/// removing the image).
#[test]
fn hosts_toml_mirror_serves_the_fills() {
    let hosts = tempfile::tempdir().unwrap();
    let mut rig = Rig::start(
        true,
        &[
            "--containerd-tls-verify=false",
            "--containerd-hosts-dir",
            hosts.path().to_str().unwrap(),
        ],
        false,
    );
    let origin = common::FaultyProxy::start(rig.registry.addr, common::Fault::RecordHeads);
    let mirror = common::TestRegistry::start_proxy_of(&origin.host());
    let mirror_front = common::FaultyProxy::start(mirror.addr, common::Fault::RecordHeads);
    let dir = hosts.path().join(origin.host());
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("hosts.toml"),
        format!(
            "server = \"http://{}\"\n\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            origin.host(),
            mirror_front.host()
        ),
    )
    .unwrap();
    rig.reference = format!("{}/snap/app:v1", origin.host());
    let eager = rig.eager(&[SCRIPT]);
    rig.ctr("ctr", &["image", "rm", "--sync", &rig.reference]);
    let size = rig.built.compressed_size();
    let mut figures = Vec::new();
    let at = |p: &common::FaultyProxy| (p.request_heads().len(), p.bytes_down());
    for pass in ["first", "second"] {
        let (o0, m0) = (at(&origin), at(&mirror_front));
        rig.rpull();
        let out = rig.run("fanfill", &format!("mirror-{pass}"), SCRIPT);
        assert_eq!(out, eager[0], "{pass} pull: lazy and eager runs differ");
        let (fetched_bytes, _) = fetched(&rig.daemon);
        let (o1, m1) = (at(&origin), at(&mirror_front));
        figures.push(format!(
            "{pass} pull + run: origin {} requests, {} bytes (containerd's and the mirror's); mirror {} requests, {} bytes; mirror cache {} bytes; fanfill fetched {fetched_bytes} bytes (image {size} bytes)",
            o1.0 - o0.0,
            o1.1 - o0.1,
            m1.0 - m0.0,
            m1.1 - m0.1,
            mirror.stored_blob_bytes()
        ));
        // A cold pull-through cache answers a range request with the whole blob: that
        // answer becomes the layer's one copy, kept in the blob cache, and every other miss
        // on the layer waits for it (at most one copy of each layer, plus the index
        // artifact's blobs). The second time the kept layers and the content cache serve.
        let limit = if pass == "first" {
            size + size / 10
        } else {
            size / 2
        };
        assert!(fetched_bytes <= limit, "{}", figures.join("\n"));
        rig.ctr("ctr", &["image", "rm", "--sync", &rig.reference]);
    }
    eprintln!("{}", figures.join("\n"));
    // The fills went through the mirror: it cached layer blobs (a cold pull-through cache
    // fetches a whole blob on a range request).
    assert!(
        mirror.stored_blob_bytes() > 0,
        "the mirror cached nothing: fills did not go to it\n{}",
        figures.join("\n")
    );
    let log = rig.daemon.log_text();
    assert!(
        !log.contains("hosts.toml: mirror skipped"),
        "{}",
        rig.fail("mirror skipped")
    );
}

/// Fills the filesystem of `filler` (a new directory) with empty files in it until no inode
/// is left, then frees `keep` of them.
fn use_up_inodes(filler: &Path, keep: usize) {
    std::fs::create_dir(filler).unwrap();
    let mut made = Vec::new();
    loop {
        let p = filler.join(made.len().to_string());
        match std::fs::File::create(&p) {
            Ok(_) => made.push(p),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
                break;
            }
        }
        assert!(
            made.len() < 100_000,
            "the filesystem does not run out of inodes"
        );
    }
    for p in made.iter().take(keep) {
        std::fs::remove_file(p).unwrap();
    }
}

/// The layers of a lazy image are committed once the daemon has the image's indexes, before
/// it makes the placeholder trees; here the trees cannot be made (the filesystem of the
/// daemon's state has a few inodes left: enough for its records, not for the image's
/// objects). The pull succeeds anyway (its layers were committed first), and each container
/// `Prepare` on them fails with the cause and the image named, leaving no mount and no
/// partial tree, also after a daemon restart (the image is prepared again and fails again).
/// Once inodes are freed, the next container prepares the trees again and runs as on an
/// eager pull; removal leaves nothing.
#[test]
fn trees_not_made_after_the_commit_fail_the_container_then_are_made_again() {
    let mut rig = Rig::start(true, &["--containerd-tls-verify=false"], false);
    let roots = rig.state.join("roots/containerd");
    // The image's trees take 49 inodes (`layers`, 3 layer directories, 45 entries). What
    // the pull writes before them (the image's directory, the daemon's and the
    // snapshotter's records) took 14 or 15 when measured (with 16 left, the unpack failed
    // at its second or third inode): 28 leave a margin on both sides.
    let filler = rig.state.parent().unwrap().join("filler");
    use_up_inodes(&filler, 28);
    rig.rpull();
    rig.check_layers_committed();
    let check_failed_run = |rig: &Rig, id: &str| {
        let out = rig.ctrd.run(
            "ctr",
            &[
                "run",
                "--rm",
                "--snapshotter",
                "fanfill",
                &rig.reference,
                id,
                "/bin/true",
            ],
        );
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success(),
            "{}",
            rig.fail(&format!("{id}: ran on trees that could not be made"))
        );
        assert!(
            err.contains("could not be made")
                && err.contains(&rig.reference)
                && err.contains("No space left on device"),
            "{}",
            rig.fail(&format!("{id}: the error names no cause or image: {err}"))
        );
        eprintln!("{id}: ctr run failed as it should: {}", err.trim());
        let dirs = entries(&roots);
        assert_eq!(dirs.len(), 1, "one lazy image directory: {dirs:?}");
        assert!(
            entries(&roots.join(&dirs[0])).is_empty(),
            "{}",
            rig.fail(&format!("{id}: a partial tree was left"))
        );
        let mounts = mounts_under(&rig.state);
        assert!(mounts.is_empty(), "{id}: mounts left: {mounts:?}");
        assert_eq!(fetched(&rig.daemon).1, 0, "{id}: an image is served");
    };
    check_failed_run(&rig, "no-inodes");
    let old = rig.kill_and_restart_daemon();
    check_failed_run(&rig, "no-inodes-after-restart");

    std::fs::remove_dir_all(&filler).unwrap();
    let out = rig.run("fanfill", "made-again", SCRIPT);
    assert_eq!(
        rig.served(1).1,
        1,
        "{}",
        rig.fail("the image is not served")
    );
    let eager = rig.eager(&[SCRIPT]);
    assert_eq!(
        out, eager[0],
        "the run on trees made again differs from the eager run"
    );
    rig.remove_and_check_clean();
    drop(old);
}

/// An image whose top layer makes its root opaque (`.wh..wh..opq`): as the OCI image spec
/// reads, the two layers below show nothing, so the daemon makes no tree for them. All three
/// layers are committed as remote snapshots (one image), and the container's overlay stacks
/// the top layer's tree alone: nothing of the hidden layers shows. (containerd's overlayfs
/// snapshotter differs here: its applier turns the marker into an opaque xattr on the
/// layer's root directory, which overlayfs ignores on a layer root, so its containers see
/// the hidden `/data`. This test checks fanfill against the spec, not against that run.)
#[test]
fn layers_hidden_by_an_opaque_root_are_left_out_of_the_rootfs() {
    fn opaque_image(dir: &Path) -> BuiltImage {
        let (base, _) = rootfs_layers::base_and_data(1);
        let hidden = vec![
            rootfs_layers::dir("data"),
            LayerItem::File {
                path: "data/hidden.txt".into(),
                mode: 0o644,
                data: pattern(10_000, 71),
            },
        ];
        let mut top = vec![LayerItem::Whiteout {
            path: ".wh..opq".into(),
        }];
        top.extend(base.iter().cloned());
        top.push(LayerItem::File {
            path: "top.txt".into(),
            mode: 0o644,
            data: pattern(20_000, 72),
        });
        ocibuild::write_layout(dir, "v1", &[base, hidden, top], Compression::Gzip).unwrap()
    }
    let rig = Rig::start_image(
        true,
        &["--containerd-tls-verify=false"],
        false,
        true,
        opaque_image,
    );
    rig.rpull();
    rig.check_layers_committed();
    let script = "/bin/busybox ls -a / | /bin/busybox sort; test -e /data && echo HIDDEN-SHOWS; \
        /bin/busybox sha256sum /top.txt; echo done";
    let out = rig.run("fanfill", "opaque", script);
    let roots = rig.state.join("roots/containerd");
    let images = entries(&roots);
    assert_eq!(images.len(), 1, "one lazy image expected: {images:?}");
    let trees = entries(&roots.join(&images[0]).join("layers"));
    assert_eq!(
        trees.len(),
        1,
        "{}",
        rig.fail(&format!("one layer tree expected: {trees:?}"))
    );
    let top_sha = fsutil::sha256_hex(&pattern(20_000, 72));
    let want = format!(
        ".\n..\nbin\ndev\nlib\nlib64\nproc\nrun\nsys\ntop.txt\nusr\n{top_sha}  /top.txt\ndone\n"
    );
    assert_eq!(
        out,
        want,
        "{}",
        rig.fail("the rootfs shows the hidden layers, or misses the top one")
    );
    rig.ctr("ctr", &["image", "rm", "--sync", &rig.reference]);
    assert!(
        rig.snapshots().is_empty() && entries(&roots).is_empty(),
        "{}",
        rig.fail("the image's snapshots or trees were left")
    );
}

/// The snapshots API driven directly (containerd's own client types over fanfill's
/// socket), for what containerd does not exercise above: a remote layer found by its label
/// filter, `Update` by field path, `Usage`, an active snapshot over it whose files are read
/// and written through the bind mount (opens held until filled), `Commit` of that active
/// snapshot (a layer containerd applied over lazy layers), `View`, removal order,
/// `NotFound`, and `Cleanup` of an orphaned directory. The lazy image goes with its last
/// snapshot.
#[test]
fn snapshots_api_contract() {
    use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
    use containerd_client::services::v1::snapshots::*;
    use fanfill::snapshotter::{LABEL_SNAPSHOT_REF, LABEL_STARGZ_DIGEST, LABEL_STARGZ_REFERENCE};
    use std::collections::HashMap;

    let rig = Rig::start(true, &["--containerd-tls-verify=false"], false);
    let sock = rig.state.join("snapshotter.sock");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the snapshotter socket is root's only");
    }
    let (reference, layer0) = (rig.reference.clone(), rig.built.layers[0].0.clone());
    let layer1 = rig.built.layers[1].0.clone();
    let state = rig.state.clone();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let body = async move {
        let mut c = SnapshotsClient::new(containerd_client::connect(&sock).await.unwrap());
        let chain = "sha256:00000000000000000000000000000000000000000000000000000000000000aa";
        let labels: HashMap<String, String> = [
            (LABEL_SNAPSHOT_REF, chain),
            (LABEL_STARGZ_REFERENCE, reference.as_str()),
            (LABEL_STARGZ_DIGEST, layer0.as_str()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let prep =
            |key: &str, parent: &str, labels: HashMap<String, String>| PrepareSnapshotRequest {
                snapshotter: "fanfill".into(),
                key: key.into(),
                parent: parent.into(),
                labels,
            };
        let err = c
            .prepare(prep("extract-1", "", labels.clone()))
            .await
            .expect_err("a remote layer is answered AlreadyExists");
        assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err}");
        // containerd finds it by its target label and parent.
        let mut list = c
            .list(ListSnapshotsRequest {
                snapshotter: "fanfill".into(),
                filters: vec![format!(
                    r#"labels."{LABEL_SNAPSHOT_REF}"=={chain},parent=="""#
                )],
            })
            .await
            .unwrap()
            .into_inner();
        let mut found = Vec::new();
        while let Some(r) = list.message().await.unwrap() {
            found.extend(r.info);
        }
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].kind, Kind::Committed as i32);
        let layer = found[0].name.clone();
        let stat = |c: &mut SnapshotsClient<_>, key: &str| {
            let key = key.to_string();
            let mut c = c.clone();
            async move {
                c.stat(StatSnapshotRequest {
                    snapshotter: "fanfill".into(),
                    key,
                })
                .await
            }
        };
        let usage = c
            .usage(UsageRequest {
                snapshotter: "fanfill".into(),
                key: layer.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(usage.size > 1_000_000 && usage.inodes > 5, "{usage:?}");
        let mut info = stat(&mut c, &layer)
            .await
            .unwrap()
            .into_inner()
            .info
            .unwrap();
        info.labels.insert("x".into(), "1".into());
        let updated = c
            .update(UpdateSnapshotRequest {
                snapshotter: "fanfill".into(),
                info: Some(info),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["labels.x".into()],
                }),
            })
            .await
            .unwrap()
            .into_inner()
            .info
            .unwrap();
        assert_eq!(updated.labels.get("x").map(String::as_str), Some("1"));
        assert_eq!(
            updated.labels.get(LABEL_SNAPSHOT_REF).map(String::as_str),
            Some(chain)
        );

        // An active snapshot over the lazy layer: the snapshotter's own overlay, watched.
        let mounts = c
            .prepare(prep("act", &layer, HashMap::new()))
            .await
            .unwrap()
            .into_inner()
            .mounts;
        assert_eq!(mounts.len(), 1);
        assert_eq!(mounts[0].r#type, "bind");
        let merged = std::path::PathBuf::from(&mounts[0].source);
        assert!(merged.ends_with("merged"), "{merged:?}");
        let m = merged.clone();
        let busybox = fsutil::within(60, "read through the overlay", move || {
            std::fs::read(m.join("bin/busybox")).unwrap()
        });
        assert_eq!(busybox, std::fs::read("/bin/busybox").unwrap());
        std::fs::write(merged.join("new.txt"), b"applied over lazy layers").unwrap();
        c.commit(CommitSnapshotRequest {
            snapshotter: "fanfill".into(),
            name: "applied".into(),
            key: "act".into(),
            labels: HashMap::new(),
        })
        .await
        .unwrap();
        let st = stat(&mut c, "applied")
            .await
            .unwrap()
            .into_inner()
            .info
            .unwrap();
        assert_eq!(
            (st.kind, st.parent.as_str()),
            (Kind::Committed as i32, layer.as_str())
        );
        assert_eq!(
            stat(&mut c, "act").await.unwrap_err().code(),
            tonic::Code::NotFound
        );
        // A rootfs over an ordinary snapshot (a layer containerd applied itself) *and* lazy
        // layers: mounted and watched; the lazy files read filled, the applied file as
        // written.
        let mixed = c
            .prepare(prep("mixed", "applied", HashMap::new()))
            .await
            .unwrap_or_else(|e| panic!("rootfs over an applied layer and lazy layers: {e}"))
            .into_inner()
            .mounts;
        let root = std::path::PathBuf::from(&mixed[0].source);
        assert!(root.ends_with("merged"), "{root:?}");
        let (sha, applied) = fsutil::within(60, "read over the applied layer", move || {
            (
                std::fs::read(root.join("usr/bin/sha256sum")).unwrap(),
                std::fs::read(root.join("new.txt")).unwrap(),
            )
        });
        assert_eq!(sha, std::fs::read("/usr/bin/sha256sum").unwrap());
        assert_eq!(applied, b"applied over lazy layers");
        // A view of the lazy layer, read through the view's mount.
        let view = c
            .view(ViewSnapshotRequest {
                snapshotter: "fanfill".into(),
                key: "view".into(),
                parent: layer.clone(),
                labels: HashMap::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .mounts;
        assert_eq!(view[0].options, vec!["ro".to_string(), "rbind".into()]);
        let v = std::path::PathBuf::from(&view[0].source);
        let sha = fsutil::within(60, "read through the view", move || {
            std::fs::read(v.join("usr/bin/sha256sum")).unwrap()
        });
        assert_eq!(sha, std::fs::read("/usr/bin/sha256sum").unwrap());

        let remove = |c: &mut SnapshotsClient<_>, key: &str| {
            let (mut c, key) = (c.clone(), key.to_string());
            async move {
                c.remove(RemoveSnapshotRequest {
                    snapshotter: "fanfill".into(),
                    key,
                })
                .await
            }
        };
        // A base layer containerd unpacked as an ordinary snapshot earlier (its labels name
        // the layer), a lazy layer over it: the rootfs stacks the image's own tree of the
        // base layer, so one watch covers it, and reads through it are the image's bytes.
        let digest_labels = |digest: &str| -> HashMap<String, String> {
            [
                (LABEL_STARGZ_REFERENCE, reference.as_str()),
                (LABEL_STARGZ_DIGEST, digest),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
        };
        c.prepare(prep("base-act", "", digest_labels(&layer0)))
            .await
            .unwrap();
        c.commit(CommitSnapshotRequest {
            snapshotter: "fanfill".into(),
            name: "base".into(),
            key: "base-act".into(),
            labels: digest_labels(&layer0),
        })
        .await
        .unwrap();
        let chain1 = "sha256:00000000000000000000000000000000000000000000000000000000000000bb";
        let mut l1 = digest_labels(&layer1);
        l1.insert(LABEL_SNAPSHOT_REF.into(), chain1.into());
        let e = c.prepare(prep("extract-2", "base", l1)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e}");
        let mut list = c
            .list(ListSnapshotsRequest {
                snapshotter: "fanfill".into(),
                filters: vec![format!(
                    r#"labels."{LABEL_SNAPSHOT_REF}"=={chain1},parent==base"#
                )],
            })
            .await
            .unwrap()
            .into_inner();
        let lazy1 = list.message().await.unwrap().unwrap().info[0].name.clone();
        let m = c
            .prepare(prep("over-shared-base", &lazy1, HashMap::new()))
            .await
            .unwrap_or_else(|e| panic!("rootfs over a shared ordinary base: {e}"))
            .into_inner()
            .mounts;
        let root = std::path::PathBuf::from(&m[0].source);
        let (busybox, b) = fsutil::within(60, "read over the shared base", move || {
            (
                std::fs::read(root.join("bin/busybox")).unwrap(),
                std::fs::read(root.join("data/b")).unwrap(),
            )
        });
        assert_eq!(busybox, std::fs::read("/bin/busybox").unwrap());
        assert_eq!(b, pattern(200_000, 32));
        for key in ["over-shared-base", &lazy1, "base"] {
            remove(&mut c, key).await.unwrap();
        }

        // Removal: children first; then the lazy image goes with its last snapshot.
        let e = remove(&mut c, &layer).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
        remove(&mut c, "view").await.unwrap();
        remove(&mut c, "mixed").await.unwrap();
        remove(&mut c, "applied").await.unwrap();
        assert!(!entries(&state.join("roots/containerd")).is_empty());
        remove(&mut c, &layer).await.unwrap();
        assert_eq!(
            remove(&mut c, &layer).await.unwrap_err().code(),
            tonic::Code::NotFound
        );
        let orphan = state.join("snapshots/snapshots/999999/fs");
        std::fs::create_dir_all(&orphan).unwrap();
        std::fs::create_dir_all(state.join("roots/containerd/999999")).unwrap();
        c.cleanup(CleanupRequest {
            snapshotter: "fanfill".into(),
        })
        .await
        .unwrap();
    };
    rt.block_on(body);
    assert!(entries(&rig.state.join("snapshots/snapshots")).is_empty());
    assert!(entries(&rig.state.join("roots/containerd")).is_empty());
    assert_eq!(fetched(&rig.daemon).1, 0, "the lazy image is still served");
    assert_eq!(
        mounts_under(&rig.state),
        Vec::<String>::new(),
        "mounts left"
    );
}

/// The daemon SIGKILLed while a container's open waits for its file to be filled (a 3 s
/// fetch): the container still reads the right bytes, its open held until the restarted
/// daemon fills the file (the overlay watch's group is kept by the fd holder), never the
/// placeholder's hole. Before overlay watches survived the daemon, the held exec failed and
/// the container exited without output.
#[test]
fn daemon_sigkill_while_a_container_open_waits() {
    let mut rig = Rig::start(
        true,
        &[
            "--containerd-tls-verify=false",
            "--test-fetch-delay-ms",
            "3000",
        ],
        false,
    );
    rig.rpull();
    let out_dir = tempfile::tempdir().unwrap();
    let mount = format!(
        "type=bind,src={},dst=/out,options=rbind:rw",
        out_dir.path().display()
    );
    rig.ctr(
        "ctr",
        &[
            "run",
            "-d",
            "--mount",
            &mount,
            "--snapshotter",
            "fanfill",
            &rig.reference,
            "reader",
            "/bin/sh",
            "-c",
            "/usr/bin/sha256sum /data/b > /out/sum 2>&1; echo done >> /out/sum",
        ],
    );
    // The open of /data/b now waits for a fetch that takes 3 s.
    std::thread::sleep(std::time::Duration::from_millis(1000));
    rig.daemon.kill9();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let args: Vec<&str> = rig.daemon_args.iter().map(String::as_str).collect();
    let _old = std::mem::replace(&mut rig.daemon, DaemonProc::start(&rig.state, &args));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let sum = out_dir.path().join("sum");
    let out = loop {
        let text = std::fs::read_to_string(&sum).unwrap_or_default();
        if text.contains("done") || std::time::Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
    };
    rig.remove_container("reader");
    let want = format!(
        "{}  /data/b\ndone\n",
        fsutil::sha256_hex(&pattern(200_000, 32))
    );
    assert_eq!(
        out,
        want,
        "{}",
        rig.fail("wrong bytes across the daemon's SIGKILL")
    );
}
