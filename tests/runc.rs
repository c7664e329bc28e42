//! End to end with the real `runc`: a container whose rootfs is a lazily prepared image
//! (direct: the placeholder tree itself; overlay: placeholder layers as lowerdirs) runs a
//! dynamically linked program that reads, maps and executes files of the image, and its
//! output equals the same container on an eagerly unpacked copy (`umoci raw unpack`).

mod fsutil;
#[path = "support/rootfs_layers.rs"]
mod rootfs_layers;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use fanfill::fill::{Engine, EngineConfig};
use fanfill::image::{self, PrepareOptions};
use fanfill::ocibuild::{self, BuiltImage, Compression, LayerItem};
use fanfill::overlay::OverlayWatcher;
use fanfill::unpack::Mode;
use fsutil::{LoopFs, OverlayMount, within};

/// The container's workload: exec of a dynamically linked program (ld.so maps libc), reads,
/// a listing with owners, modes and sizes, and a whiteout check.
const SCRIPT: &str = "/usr/bin/sha256sum /data/a /data/b /data/notes/n7.txt /usr/bin/sha256sum; \
    /bin/busybox ls -ln /data | /bin/busybox grep -v '^total' | /bin/busybox sort; \
    /bin/busybox cat /data/notes/n3.txt; \
    test -e /data/gone && echo WHITEOUT-BROKEN; echo done";

fn image(dir: &Path) -> BuiltImage {
    let (base, data) = rootfs_layers::base_and_data(20);
    let top = vec![LayerItem::Whiteout {
        path: "data/gone".into(),
    }];
    ocibuild::write_layout(dir, "e2e", &[base, data, top], Compression::Gzip).unwrap()
}

/// A runc bundle in `dir` whose rootfs is `rootfs`, running [`SCRIPT`].
fn bundle(dir: &Path, rootfs: &Path) -> PathBuf {
    bundle_running(dir, rootfs, SCRIPT)
}

/// A runc bundle in `dir` whose rootfs is `rootfs`, running `script` with `/bin/sh -c`.
fn bundle_running(dir: &Path, rootfs: &Path, script: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let st = Command::new("runc")
        .args(["spec", "--bundle"])
        .arg(dir)
        .status()
        .unwrap();
    assert!(st.success(), "runc spec");
    let path = dir.join("config.json");
    let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    c["process"]["args"] = serde_json::json!(["/bin/sh", "-c", script]);
    c["process"]["terminal"] = serde_json::json!(false);
    c["root"]["path"] = serde_json::json!(rootfs);
    c["root"]["readonly"] = serde_json::json!(false);
    std::fs::write(&path, serde_json::to_vec_pretty(&c).unwrap()).unwrap();
    dir.to_path_buf()
}

/// Adds the `fanfill hook` at createRuntime, talking to the daemon at `socket`.
fn with_hook(bundle: &Path, socket: &Path) {
    let path = bundle.join("config.json");
    let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    c["hooks"] = serde_json::json!({
        "createRuntime": [{
            "path": env!("CARGO_BIN_EXE_fanfill"),
            "args": ["fanfill", "hook"],
            "env": [format!("FANFILL_SOCKET={}", socket.display()), "FANFILL_LOG=fanfill=warn"],
            "timeout": 30
        }]
    });
    std::fs::write(&path, serde_json::to_vec_pretty(&c).unwrap()).unwrap();
}

fn runc_output(bundle: PathBuf, id: &str) -> std::process::Output {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let id = format!("fanfill-{id}-{}-{n}", std::process::id());
    within(120, "runc run", move || {
        Command::new("runc")
            .arg("run")
            .arg("--bundle")
            .arg(&bundle)
            .arg(&id)
            .output()
            .unwrap()
    })
}

fn runc_run(bundle: PathBuf, id: &str) -> String {
    let out = runc_output(bundle, id);
    assert!(
        out.status.success(),
        "runc run failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The image unpacked eagerly (`umoci raw unpack`) on `fs`.
fn eager_rootfs(fs: &LoopFs, built: &BuiltImage) -> PathBuf {
    let rootfs = fs.mnt.join("eager-rootfs");
    let st = Command::new("umoci")
        .args(["raw", "unpack", "--image"])
        .arg(format!("{}:{}", built.dir.display(), built.tag))
        .arg(&rootfs)
        .status()
        .unwrap();
    assert!(st.success(), "umoci raw unpack");
    rootfs
}

fn eager_output(fs: &LoopFs, built: &BuiltImage) -> String {
    let rootfs = eager_rootfs(fs, built);
    runc_run(bundle(&fs.mnt.join("eager-bundle"), &rootfs), "eager")
}

#[test]
fn runc_direct_rootfs_matches_eager_unpack() {
    let fs = LoopFs::new("ext4", 512);
    let built = image(&fs.mnt.join("layout"));
    let eager = eager_output(&fs, &built);
    assert!(
        eager.ends_with("done\n") && !eager.contains("WHITEOUT-BROKEN"),
        "{eager}"
    );

    let engine = Engine::start(EngineConfig::default()).unwrap();
    let rootfs = fs.mnt.join("lazy-rootfs");
    std::fs::create_dir(&rootfs).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut opts = PrepareOptions::new(fs.mnt.join("indexes"));
    // Measure fills from the image store, not from a kept copy of the layer.
    opts.blob_cache = None;
    // Index first, as a publisher would: then only manifest and config travel before ready.
    rt.block_on(image::index_image(&built.reference(), &opts, false))
        .unwrap();
    let prepared = rt
        .block_on(image::prepare(&engine, &built.reference(), &rootfs, &opts))
        .unwrap();
    let before = prepared.store.bytes_fetched();
    let lazy = runc_run(bundle(&fs.mnt.join("lazy-bundle"), &rootfs), "direct");
    assert_eq!(
        lazy, eager,
        "container output differs from the eager unpack"
    );
    let s = engine.stats();
    eprintln!(
        "runc direct: {} bytes before ready; run filled {} of {} files, fetched {} of {} layer bytes ({} bytes described)",
        before,
        s.files_complete,
        s.files,
        prepared.store.bytes_fetched() - before,
        built.compressed_size(),
        s.bytes_total
    );
    assert!(s.events > 0 && s.errors == 0);
    // The 20 MiB file nobody read stayed a hole.
    assert_eq!(
        std::fs::metadata(rootfs.join("data/unread"))
            .unwrap()
            .blocks(),
        0
    );
}

#[test]
fn runc_overlay_rootfs_matches_eager_unpack() {
    let fs = LoopFs::new("ext4", 512);
    let built = image(&fs.mnt.join("layout"));
    let eager = eager_output(&fs, &built);

    let engine = Engine::start(EngineConfig::default()).unwrap();
    let layers = fs.mnt.join("layers");
    std::fs::create_dir(&layers).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut opts = PrepareOptions::new(fs.mnt.join("indexes"));
    opts.blob_cache = None;
    opts.mode = Mode::Overlay;
    rt.block_on(image::index_image(&built.reference(), &opts, false))
        .unwrap();
    let prepared = rt
        .block_on(image::prepare(&engine, &built.reference(), &layers, &opts))
        .unwrap();
    let before = prepared.store.bytes_fetched();
    let ovl = OverlayMount::new(&prepared.unpacked.lowerdir_option(), &fs.mnt.join("ovl"));
    let merged = ovl.merged.clone();
    let watch =
        OverlayWatcher::start_on(&engine, &merged, std::fs::metadata(&fs.mnt).unwrap().dev())
            .unwrap();
    let lazy = runc_run(bundle(&fs.mnt.join("ovl-bundle"), &merged), "overlay");
    assert_eq!(
        lazy, eager,
        "container output differs from the eager unpack"
    );
    let s = engine.stats();
    eprintln!(
        "runc overlay: {} opens held; filled {} of {} files, fetched {} of {} layer bytes",
        watch.opens(),
        s.files_complete,
        s.files,
        prepared.store.bytes_fetched() - before,
        built.compressed_size()
    );
    assert!(watch.opens() > 0);
    drop(watch);
}

/// Through the daemon and the OCI hook: a direct rootfs the daemon serves, an overlay
/// rootfs whose opens the daemon holds once the hook asked, and a refused start when the
/// daemon is down.
#[test]
fn runc_with_the_fanfill_hook_and_daemon() {
    use fanfill::api::{LayoutMode, RegistrySettings, Request, Response};
    use fsutil::daemonproc::DaemonProc;

    let fs = LoopFs::new("ext4", 768);
    let built = image(&fs.mnt.join("layout"));
    let eager = eager_output(&fs, &built);
    let state = fs.mnt.join("state");
    std::fs::create_dir(&state).unwrap();
    let mut daemon = DaemonProc::start(&state, &[]);
    let prepare = |dest: &Path, mode: LayoutMode| match daemon.call(Request::Prepare {
        image: built.reference(),
        dest: dest.to_path_buf(),
        mode,
        registry: RegistrySettings::default(),
        prefetch: false,
    }) {
        Response::Prepared(s) => s,
        r => panic!("{r:?}"),
    };

    // Direct.
    let rootfs = fs.mnt.join("direct-rootfs");
    prepare(&rootfs, LayoutMode::Direct);
    let direct_bundle = bundle(&fs.mnt.join("hook-direct"), &rootfs);
    with_hook(&direct_bundle, &daemon.socket);
    assert_eq!(runc_run(direct_bundle.clone(), "hook-direct"), eager);

    // Overlay: the runtime's overlay of the daemon's layer trees; the hook asks the daemon
    // to hold its opens.
    let layers = fs.mnt.join("ovl-layers");
    let st = prepare(&layers, LayoutMode::Overlay);
    let ovl = OverlayMount::new(st.lowerdir.as_deref().unwrap(), &fs.mnt.join("hook-ovl"));
    let ovl_bundle = bundle(&fs.mnt.join("hook-ovl-bundle"), &ovl.merged);
    with_hook(&ovl_bundle, &daemon.socket);
    assert_eq!(runc_run(ovl_bundle, "hook-overlay"), eager);
    let images = match daemon.call(Request::Status { dest: None }) {
        Response::Status { images, .. } => images,
        r => panic!("{r:?}"),
    };
    for i in &images {
        eprintln!(
            "hook {:?}: {} of {} files filled, {} bytes fetched of {} compressed",
            i.mode,
            i.files_complete,
            i.files,
            i.bytes_fetched,
            built.compressed_size()
        );
    }

    // Daemon down: the hook refuses the start, with the reason; the program never ran.
    daemon.stop();
    let out = runc_output(direct_bundle, "hook-down");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        !out.status.success(),
        "a container started with no daemon: {stdout}"
    );
    assert!(
        !stdout.contains("done"),
        "the container's program ran: {stdout}"
    );
    assert!(stderr.contains("unreachable"), "unclear refusal: {stderr}");
    eprintln!(
        "daemon down, runc says: {}",
        stderr.lines().last().unwrap_or_default()
    );
    drop(ovl);
}

/// podman with the shipped hooks.d file (path and socket adjusted for the test): an
/// annotated container on a rootfs the daemon serves runs and matches the eager unpack.
/// This machine's podman needs `--cgroup-manager=cgroupfs --runtime runc` (cgroups v1+v2
/// hybrid, which crun refuses) and explicit nofile/nproc limits (the VM's hard limits are
/// below podman's defaults).
#[test]
fn podman_with_the_shipped_hooks_d_file() {
    use fanfill::api::{LayoutMode, RegistrySettings, Request, Response};
    use fsutil::daemonproc::DaemonProc;

    let fs = LoopFs::new("ext4", 512);
    let built = image(&fs.mnt.join("layout"));
    let eager = eager_output(&fs, &built);
    let state = fs.mnt.join("state");
    std::fs::create_dir(&state).unwrap();
    let daemon = DaemonProc::start(&state, &[]);
    let rootfs = fs.mnt.join("podman-rootfs");
    match daemon.call(Request::Prepare {
        image: built.reference(),
        dest: rootfs.clone(),
        mode: LayoutMode::Direct,
        registry: RegistrySettings::default(),
        prefetch: false,
    }) {
        Response::Prepared(_) => {}
        r => panic!("{r:?}"),
    }
    // The shipped hooks.d file, pointed at this build and this daemon.
    let shipped: serde_json::Value = serde_json::from_slice(
        &std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/contrib/hooks.d/fanfill.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let mut hook = shipped.clone();
    hook["hook"]["path"] = serde_json::json!(env!("CARGO_BIN_EXE_fanfill"));
    hook["hook"]["env"] =
        serde_json::json!([format!("FANFILL_SOCKET={}", daemon.socket.display())]);
    let hooks_dir = fs.mnt.join("hooks.d");
    std::fs::create_dir(&hooks_dir).unwrap();
    std::fs::write(
        hooks_dir.join("fanfill.json"),
        serde_json::to_vec(&hook).unwrap(),
    )
    .unwrap();
    let reference = built.reference();
    let podman = move |hooks_dir: PathBuf| {
        let (reference, rootfs) = (reference.clone(), rootfs.clone());
        within(180, "podman run", move || {
            Command::new("podman")
                .arg("--hooks-dir")
                .arg(&hooks_dir)
                .args([
                    "--cgroup-manager=cgroupfs",
                    "run",
                    "--runtime",
                    "runc",
                    "--rm",
                ])
                .args(["--network", "none", "--ulimit", "nofile=1024:1024"])
                .args(["--ulimit", "nproc=1024:1024", "--annotation"])
                .arg(format!("org.fanfill.image={reference}"))
                .arg("--rootfs")
                .arg(&rootfs)
                .args(["/bin/sh", "-c", SCRIPT])
                .output()
                .unwrap()
        })
    };
    let out = podman(hooks_dir);
    assert!(
        out.status.success(),
        "podman run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), eager);
    let (d, images) = daemon.status();
    assert!(
        d.events > 0,
        "the container's reads went through the daemon"
    );
    eprintln!(
        "podman: {} of {} files filled, {} misses served",
        images[0].files_complete, images[0].files, d.events
    );
    // The hook really runs: pointed at no daemon, it stops the container.
    hook["hook"]["env"] = serde_json::json!(["FANFILL_SOCKET=/nonexistent/fanfill.sock"]);
    let bad_hooks = fs.mnt.join("hooks-bad.d");
    std::fs::create_dir(&bad_hooks).unwrap();
    std::fs::write(
        bad_hooks.join("fanfill.json"),
        serde_json::to_vec(&hook).unwrap(),
    )
    .unwrap();
    let out = podman(bad_hooks);
    assert!(
        !out.status.success(),
        "podman started a container nobody serves"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("unreachable"));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("done"));
}

/// Issue #20: an overlay rootfs through the daemon and the hook, with the daemon SIGKILLed
/// while one container reads and SIGTERMed while another does: both finish with the eager
/// image's output, and containers started after each restart do too.
#[test]
fn issue20_runc_overlay_rootfs_across_daemon_sigkill_and_sigterm() {
    use fanfill::api::{LayoutMode, RegistrySettings};
    use fsutil::daemonproc::DaemonProc;

    let fs = LoopFs::new("ext4", 768);
    let built = image(&fs.mnt.join("layout"));
    let eager_root = eager_rootfs(&fs, &built);
    // Each container reads files no earlier one read, so each waits on fresh fills.
    let scripts = [
        SCRIPT.to_string(),
        "/usr/bin/sha256sum /data/unread /data/notes/n1.txt /data/notes/n2.txt".to_string(),
        format!(
            "/usr/bin/sha256sum {}",
            (4..12)
                .map(|i| format!("/data/notes/n{i}.txt"))
                .collect::<Vec<_>>()
                .join(" ")
        ),
        "/usr/bin/sha256sum /data/notes/n12.txt /data/notes/n13.txt /data/notes/n19.txt"
            .to_string(),
    ];
    let eager: Vec<String> = scripts
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let b = bundle_running(&fs.mnt.join(format!("eager-{i}")), &eager_root, s);
            runc_run(b, "eager")
        })
        .collect();
    let state = fs.mnt.join("state");
    std::fs::create_dir(&state).unwrap();
    // Read-around off: it would fill the next containers' files with the earlier ones'.
    let slow = ["--test-fetch-delay-ms", "300", "--read-around-kib", "0"];
    let mut d = DaemonProc::start(&state, &slow);
    let st = d.prepare_layout(
        &built.reference(),
        &fs.mnt.join("ovl-layers"),
        LayoutMode::Overlay,
        false,
        RegistrySettings::default(),
    );
    let ovl = OverlayMount::new(st.lowerdir.as_deref().unwrap(), &fs.mnt.join("ovl"));
    let container = |i: usize, socket: &Path| {
        let b = bundle_running(&fs.mnt.join(format!("ovl-{i}")), &ovl.merged, &scripts[i]);
        with_hook(&b, socket);
        std::thread::spawn(move || runc_output(b, "ovl-restart"))
    };
    let finished_ok = |run: std::thread::JoinHandle<std::process::Output>, i: usize| {
        let out = run.join().unwrap();
        assert!(
            out.status.success(),
            "container {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            eager[i],
            "container {i}"
        );
    };

    // SIGKILL while container 0 reads.
    let run0 = container(0, &d.socket);
    d.wait_status("container 0 reading", |ds| ds.overlay_opens_inflight >= 1);
    d.kill9();
    std::thread::sleep(Duration::from_millis(500));
    assert!(!run0.is_finished(), "container 0 went on with no daemon");
    let mut d2 = DaemonProc::start(&state, &slow);
    finished_ok(run0, 0);
    finished_ok(container(1, &d2.socket), 1);

    // SIGTERM while container 2 reads.
    let run2 = container(2, &d2.socket);
    d2.wait_status("container 2 reading", |ds| ds.overlay_opens_inflight >= 1);
    d2.stop();
    std::thread::sleep(Duration::from_millis(300));
    assert!(!run2.is_finished(), "container 2 went on with no daemon");
    let d3 = DaemonProc::start(&state, &slow);
    finished_ok(run2, 2);
    finished_ok(container(3, &d3.socket), 3);
    let (ds, images) = d3.status();
    eprintln!(
        "runc overlay across SIGKILL and SIGTERM: 4 containers = eager; {} of {} files filled; successor answered {} inherited events",
        images[0].files_complete, images[0].files, ds.inherited_answered
    );
    drop(ovl);
}
