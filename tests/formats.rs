//! Images as the real tools write them (issue #19): every image pulls, lazily where it can.
//!
//! Each image is made by the tool users use, from Debian packages, started here: `umoci`
//! (+ `skopeo copy`), `skopeo copy --format v2s2` and `--dest-compress-format zstd`,
//! `buildah` (`from scratch` + `copy` + `commit`, `push --compression-format gzip` and
//! `zstd:chunked`), `podman push --compression-format zstd:chunked`, and stargz-snapshotter's
//! `ctr-remote image convert --oci --estargz` / `--zstdchunked` and `ctr-remote image
//! optimize` against a private containerd (`tests/support/containerd.rs`).
//! Every image holds the same files (a static busybox, generated data, links). For each one
//! fanfill prepares it (`image::prepare`: lazily through the layer's TOC, or by streaming the
//! layer once when it has none), a program from it runs in a chroot, and every path is
//! compared with an eager extraction of the same image (`skopeo copy` to an OCI layout, then
//! GNU tar over its blobs). Layers fanfill had to stream are then indexed and the index
//! pushed (`fanfill index --push`), and a fresh prepare shows the lazy pull through it. Each
//! run prints one table row per pull (`ROW | ...`), the rows of `docs/formats.md`.
//!
//! Also: issue #19's image (`ctr-remote --zstdchunked`) pulled by the `fanfill pull` CLI
//! through a daemon; an optimized eStargz's prioritized files filled before the workload;
//! layers with a broken TOC or an unexpected footer still pull (streamed once, served from
//! the blob cache, a warning naming the layer) and read right; non-distributable, Docker
//! foreign and empty layers under a multi-platform index with a platform chosen.

mod common;
#[path = "support/containerd.rs"]
mod containerd;
mod fsutil;
#[path = "support/trees.rs"]
mod trees;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use fanfill::fill::{Engine, EngineConfig};
use fanfill::image::{self, IndexOrigin, PrepareOptions};
use fanfill::unpack::Mode;
use fsutil::daemonproc::DaemonProc;
use sha2::Digest as _;
use trees::{compare, prepare_within, tar_extract, walk};

const READ_LIMIT: Duration = Duration::from_secs(60);
/// What the workload prints first (the content of `/etc/greeting`).
const GREETING: &str = "hello from an image made by a real tool";
/// Names an eStargz layer's tar stream carries that stargz-snapshotter (and fanfill, reading
/// the TOC) do not show: the TOC entry and the prefetch landmarks.
const ESTARGZ_HIDDEN: [&str; 3] = [
    "stargz.index.json",
    ".prefetch.landmark",
    ".no.prefetch.landmark",
];
const STARGZ_TOC_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";
/// The workload run from every image (`/bin/sh -c WORKLOAD` in a chroot).
const WORKLOAD: &str =
    "/bin/busybox cat /etc/greeting && /bin/busybox sha256sum /data/small/042.txt";

/// Runs `tool args` under a 300 s timeout; panics with its output on failure; returns stdout.
fn run(tool: &str, args: &[&str]) -> String {
    let out = Command::new("timeout")
        .arg("300")
        .arg(tool)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {tool}: {e}"));
    containerd::succeeded(tool, args, out)
}

/// The files of every image: a static busybox and `sh`, a greeting, a 9 MiB file (several
/// eStargz chunks), 300 small files, an empty file, a hard link, a directory symlink.
/// Returns the sha256 of `data/small/042.txt` (what the workload hashes).
fn make_rootfs(dir: &Path) -> String {
    for d in ["bin", "etc", "data/small", "usr/share"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", dir.join("bin/busybox"))
        .expect("/bin/busybox (Debian package busybox-static)");
    std::os::unix::fs::symlink("busybox", dir.join("bin/sh")).unwrap();
    std::fs::write(dir.join("etc/greeting"), format!("{GREETING}\n")).unwrap();
    let big = common::noise(9 << 20, 19);
    std::fs::write(dir.join("data/big.bin"), &big).unwrap();
    for i in 0..300u64 {
        let len = (i * 997) % 20_000;
        let mut body = format!("file {i}\n").into_bytes();
        body.extend(common::noise(len as usize, i));
        std::fs::write(dir.join(format!("data/small/{i:03}.txt")), body).unwrap();
    }
    std::fs::write(dir.join("data/empty"), b"").unwrap();
    std::fs::hard_link(dir.join("data/small/007.txt"), dir.join("data/hard.txt")).unwrap();
    std::os::unix::fs::symlink("../data", dir.join("usr/share/data")).unwrap();
    hex::encode(sha2::Sha256::digest(
        std::fs::read(dir.join("data/small/042.txt")).unwrap(),
    ))
}

/// An OCI layout below `tmp` holding `base`, an image umoci made of `rootfs` (`init`, `new`,
/// `unpack`, the files copied in, `repack`, `config --config.cmd /bin/sh`).
fn umoci_layout(tmp: &Path, rootfs: &Path) -> PathBuf {
    let layout = tmp.join("umoci-layout");
    let image = format!("{}:base", layout.display());
    let bundle = tmp.join("umoci-bundle");
    run("umoci", &["init", "--layout", &layout.to_string_lossy()]);
    run("umoci", &["new", "--image", &image]);
    run(
        "umoci",
        &["unpack", "--image", &image, &bundle.to_string_lossy()],
    );
    let copied = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", rootfs.display()))
        .arg(bundle.join("rootfs"))
        .status()
        .unwrap();
    assert!(copied.success());
    run(
        "umoci",
        &["repack", "--image", &image, &bundle.to_string_lossy()],
    );
    run(
        "umoci",
        &["config", "--image", &image, "--config.cmd", "/bin/sh"],
    );
    layout
}

/// Runs [`WORKLOAD`] from the tree at `root` in a chroot (bounded: a fill that never
/// completes fails the test) and checks what it prints.
fn run_workload(root: &Path, name: &str, workload_sha: &str) {
    let root = root.to_path_buf();
    let out = fsutil::within(120, "chroot workload", move || {
        Command::new("chroot")
            .arg(&root)
            .args(["/bin/sh", "-c", WORKLOAD])
            .output()
            .unwrap()
    });
    assert!(
        out.status.success(),
        "{name}: workload failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with(GREETING), "{name}: {text}");
    assert!(
        text.contains(&format!("{workload_sha}  /data/small/042.txt")),
        "{name}: {text}"
    );
}

/// The issue's command, `fanfill pull --tls-verify=false REFERENCE DEST`, served by a
/// `fanfill daemon` of its own, with `--no-prefetch` (so that what was fetched is what the
/// workload read); then [`WORKLOAD`] from DEST. Returns the daemon (its log, its status) for
/// the caller's checks.
fn cli_pull(t: &Path, name: &str, reference: &str, workload_sha: &str) -> DaemonProc {
    let state = t.join(format!("{name}-daemon"));
    std::fs::create_dir(&state).unwrap();
    let d = DaemonProc::start(&state, &[]);
    let dest = t.join(format!("{name}-cli-root"));
    std::fs::create_dir(&dest).unwrap();
    let out = fsutil::daemonproc::bin()
        .env("FANFILL_SOCKET", &d.socket)
        .args(["pull", "--no-prefetch", "--tls-verify=false", reference])
        .arg(&dest)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{name}: fanfill pull failed: {}{}\ndaemon log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        d.log_text()
    );
    run_workload(&dest, name, workload_sha);
    d
}

/// `docker://HOST/REPO:TAG` as fanfill and skopeo spell it.
fn docker_ref(reg: &common::TestRegistry, repo_tag: &str) -> String {
    format!("docker://{}/{repo_tag}", reg.host())
}

/// An image's manifest (and, through `skopeo copy` to a layout, its layer blobs) as a plain
/// client sees it.
struct Eager {
    manifest: serde_json::Value,
    blobs: Vec<PathBuf>,
}

/// `skopeo copy` of `reference` to a fresh OCI layout below `tmp`: the manifest skopeo read
/// (`skopeo inspect --raw`) and the layer blobs it wrote.
fn eager_copy(reference: &str, tmp: &Path, name: &str) -> Eager {
    let raw = run(
        "skopeo",
        &["inspect", "--raw", "--tls-verify=false", reference],
    );
    let manifest: serde_json::Value = serde_json::from_str(&raw).unwrap();
    let dir = tmp.join(format!("{name}-eager-layout"));
    common::skopeo_copy(reference, &format!("oci:{}:x", dir.display()), &[]);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    let blob = |d: &str| {
        dir.join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"))
    };
    let copied: serde_json::Value = serde_json::from_slice(
        &std::fs::read(blob(index["manifests"][0]["digest"].as_str().unwrap())).unwrap(),
    )
    .unwrap();
    let blobs = copied["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| blob(l["digest"].as_str().unwrap()))
        .collect();
    Eager { manifest, blobs }
}

/// One pull of one image: what the table row shows.
struct Pulled {
    media_types: String,
    origins: Vec<IndexOrigin>,
    before_ready: u64,
    /// Files filled ahead of the workload without a reader, and the bytes fetched by then.
    ahead_files: usize,
    after_ahead: u64,
    after_workload: u64,
    files: usize,
    paths: usize,
    mismatches: usize,
}

impl Pulled {
    fn mode(&self) -> String {
        let lazy = |o: &IndexOrigin| matches!(o, IndexOrigin::Toc | IndexOrigin::Artifact);
        let what: Vec<&str> = self.origins.iter().map(|o| o.as_str()).collect();
        if self.origins.iter().all(lazy) && self.ahead_files > 0 {
            format!(
                "lazy ({}); {} prioritized files filled ahead, {} bytes fetched by then",
                what.join(", "),
                self.ahead_files,
                self.after_ahead
            )
        } else if self.origins.iter().all(lazy) {
            format!("lazy ({})", what.join(", "))
        } else {
            format!("fallback: streamed once ({})", what.join(", "))
        }
    }
}

/// The test's fanfill side: one engine and runtime for every pull.
struct Puller {
    rt: tokio::runtime::Runtime,
    engine: Engine,
    workload_sha: String,
}

impl Puller {
    fn new(workload_sha: String) -> Puller {
        Puller {
            rt: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap(),
            engine: Engine::start(EngineConfig::default())
                .expect("fanotify pre-content group (6.14+, root)"),
            workload_sha,
        }
    }

    fn options(state: &Path) -> PrepareOptions {
        let mut opts = PrepareOptions::new(state.join("indexes"));
        opts.registry.insecure = true;
        opts.mode = Mode::Direct;
        opts
    }

    /// Prepares `reference` into `tmp/NAME` (state in `tmp/NAME-state`), runs the workload in
    /// a chroot, compares every path with the eager extraction `eager` and prints the row.
    fn pull(
        &self,
        tmp: &Path,
        name: &str,
        (tool, command): (&str, &str),
        reference: &str,
        eager: &Eager,
        opts: &PrepareOptions,
    ) -> Pulled {
        let dest = tmp.join(name);
        std::fs::create_dir(&dest).unwrap();
        let prepared = prepare_within(&self.rt, &self.engine, reference, &dest, opts)
            .unwrap_or_else(|e| panic!("{name}: prepare {reference}: {e}"));
        let before_ready = prepared.bytes_before_ready;

        // Files the image names to fill ahead (an optimized eStargz's prioritized files,
        // before its landmark) are filled without a reader: wait for them.
        let ahead: Vec<_> = prepared
            .unpacked
            .placeholders
            .iter()
            .zip(&prepared.files)
            .filter(|(p, _)| prepared.sources.prefetch_first(p.layer).contains(&p.entry))
            .map(|(_, id)| *id)
            .collect();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !ahead.iter().all(|id| self.engine.is_complete(*id)) {
            assert!(
                std::time::Instant::now() < deadline,
                "{name}: the prioritized files were not filled ahead within 30 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let after_ahead = prepared.store.bytes_fetched();

        run_workload(&dest, name, &self.workload_sha);
        let after_workload = prepared.store.bytes_fetched();

        // The reference: a plain extraction; a layer read through an eStargz TOC shows what
        // stargz-snapshotter shows (no TOC entry, no landmarks).
        let reference_dir = tmp.join(format!("{name}-eager"));
        tar_extract(&eager.blobs, &reference_dir);
        let through_estargz_toc = eager.manifest["layers"]
            .as_array()
            .unwrap()
            .iter()
            .zip(&prepared.index_origins)
            .any(|(l, o)| {
                *o == IndexOrigin::Toc && l["annotations"][STARGZ_TOC_ANNOTATION].is_string()
            });
        if through_estargz_toc {
            for n in ESTARGZ_HIDDEN {
                let _ = std::fs::remove_file(reference_dir.join(n));
            }
        }
        let tree = walk(&reference_dir);
        let files = tree.values().filter(|(_, t)| t.is_file()).count();
        let mismatches = compare(&tree, &dest, READ_LIMIT);
        assert!(
            mismatches.is_empty(),
            "{name}: {} mismatches, first: {:#?}",
            mismatches.len(),
            &mismatches[..mismatches.len().min(10)]
        );
        let media: Vec<String> = eager.manifest["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["mediaType"].as_str().unwrap().to_string())
            .collect();
        let pulled = Pulled {
            media_types: media.join(", "),
            origins: prepared.index_origins.clone(),
            before_ready,
            ahead_files: ahead.len(),
            after_ahead,
            after_workload,
            files,
            paths: tree.len(),
            mismatches: mismatches.len(),
        };
        let size: u64 = prepared.image_size;
        eprintln!(
            "ROW | {tool} | `{command}` | {} | {} | {before_ready} | {after_workload} | {size} | {} files ({} paths) | {} |",
            pulled.media_types,
            pulled.mode(),
            pulled.files,
            pulled.paths,
            pulled.mismatches
        );
        for id in &prepared.files {
            let _ = self.engine.unregister(*id);
        }
        pulled
    }

    /// [`Puller::pull`] with fresh state; a layer without a TOC is streamed once, so the
    /// image is then indexed, the index pushed to the registry, and pulled again with fresh
    /// state: lazily through the index artifact (`indexed` [`IndexOrigin::Artifact`]), or
    /// streamed once again when the index cannot serve ranges (`Built`: a zstd layer of one
    /// frame).
    fn pull_then_indexed(
        &self,
        tmp: &Path,
        name: &str,
        tool: &str,
        command: &str,
        reference: &str,
        indexed: IndexOrigin,
    ) -> Vec<Pulled> {
        let eager = eager_copy(reference, tmp, name);
        let first_state = tmp.join(format!("{name}-state"));
        let opts = Self::options(&first_state);
        let first = self.pull(tmp, name, (tool, command), reference, &eager, &opts);
        if first.origins.iter().all(|o| *o == IndexOrigin::Toc) {
            return vec![first];
        }
        assert!(
            first.origins.contains(&IndexOrigin::Built),
            "{name}: {:?}",
            first.origins
        );
        self.rt
            .block_on(image::index_image(reference, &opts, true))
            .unwrap_or_else(|e| panic!("{name}: index --push: {}", fanfill::fill::error_chain(&e)));
        let again = self.pull(
            tmp,
            &format!("{name}-indexed"),
            (tool, &format!("{command}; fanfill index --push")),
            reference,
            &eager,
            &Self::options(&tmp.join(format!("{name}-indexed-state"))),
        );
        assert!(
            again.origins.iter().all(|o| *o == indexed),
            "{name}: {:?}",
            again.origins
        );
        if indexed == IndexOrigin::Artifact {
            assert!(again.before_ready < first.before_ready / 10);
            assert!(again.after_workload < first.after_workload / 2);
        } else {
            // Streamed once, and only once: every fill a local read.
            assert!(again.after_workload < first.after_workload + (64 << 10));
        }
        vec![first, again]
    }
}

/// A fresh registry per image made by a containers/image tool: its blob-info cache would
/// otherwise reuse a blob of another compression already in the registry.
fn fresh_registry() -> common::TestRegistry {
    common::TestRegistry::start()
}

/// What every test starts from: a temp dir, the puller, the umoci layout of the test's files
/// and a registry holding it as `base/app:v1` (`host/base/app:v1`, without a transport).
struct Base {
    tmp: tempfile::TempDir,
    puller: Puller,
    layout: PathBuf,
    reg: common::TestRegistry,
    base: String,
}

impl Base {
    fn new() -> Base {
        common::init_tracing();
        let tmp = tempfile::tempdir().unwrap();
        let rootfs = tmp.path().join("rootfs");
        let puller = Puller::new(make_rootfs(&rootfs));
        let layout = umoci_layout(tmp.path(), &rootfs);
        let reg = fresh_registry();
        let base = format!("{}/base/app:v1", reg.host());
        common::skopeo_copy(
            &format!("oci:{}:base", layout.display()),
            &format!("docker://{base}"),
            &[],
        );
        Base {
            tmp,
            puller,
            layout,
            reg,
            base,
        }
    }

    /// A private containerd holding the base image (pulled by `ctr-remote`).
    fn containerd(&self) -> containerd::Containerd {
        let ctd = containerd::Containerd::start();
        ctd.must("ctr-remote", &["image", "pull", "--plain-http", &self.base]);
        ctd
    }
}

#[test]
fn umoci_and_skopeo_images_pull_and_run() {
    let b = Base::new();
    let (tmp, puller) = (&b.tmp, &b.puller);
    let src = format!("oci:{}:base", b.layout.display());

    let reg = fresh_registry();
    let r = docker_ref(&reg, "umoci/app:gzip");
    common::skopeo_copy(&src, &r, &[]);
    let rows = puller.pull_then_indexed(
        tmp.path(),
        "umoci",
        "umoci + skopeo",
        "umoci repack; skopeo copy oci:… docker://…",
        &r,
        IndexOrigin::Artifact,
    );
    assert!(rows[0].media_types.ends_with("tar+gzip"));

    let reg = fresh_registry();
    let r = docker_ref(&reg, "skopeo/app:v2s2");
    common::skopeo_copy(&src, &r, &["--format", "v2s2"]);
    let rows = puller.pull_then_indexed(
        tmp.path(),
        "v2s2",
        "skopeo",
        "skopeo copy --format v2s2",
        &r,
        IndexOrigin::Artifact,
    );
    assert_eq!(
        rows[0].media_types,
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
    );

    let reg = fresh_registry();
    let r = docker_ref(&reg, "skopeo/app:zstd");
    common::skopeo_copy(&src, &r, &["--dest-compress-format", "zstd"]);
    let rows = puller.pull_then_indexed(
        tmp.path(),
        "zstd",
        "skopeo",
        "skopeo copy --dest-compress-format zstd",
        &r,
        IndexOrigin::Built,
    );
    assert_eq!(
        rows[0].media_types,
        "application/vnd.oci.image.layer.v1.tar+zstd"
    );
}

/// `tool` (`buildah` or `podman`) with its own containers/storage below `tmp` (vfs driver:
/// no overlay mounts to clean up).
fn with_storage(tool: &str, tmp: &Path, args: &[&str]) -> String {
    let (root, runroot) = (
        tmp.join(format!("{tool}-root")),
        tmp.join(format!("{tool}-run")),
    );
    let mut all = vec![
        "--root",
        root.to_str().unwrap(),
        "--runroot",
        runroot.to_str().unwrap(),
        "--storage-driver",
        "vfs",
    ];
    all.extend_from_slice(args);
    run(tool, &all)
}

fn buildah(tmp: &Path, args: &[&str]) -> String {
    with_storage("buildah", tmp, args)
}

#[test]
fn buildah_images_pull_and_run() {
    common::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let rootfs = t.join("rootfs");
    let puller = Puller::new(make_rootfs(&rootfs));
    let ctr = buildah(t, &["from", "scratch"]);
    let ctr = ctr.trim();
    buildah(t, &["copy", ctr, rootfs.to_str().unwrap(), "/"]);
    buildah(t, &["config", "--cmd", "/bin/sh", ctr]);
    buildah(t, &["commit", "-q", ctr, "localhost/formats:built"]);
    for (format, media) in [
        ("gzip", "application/vnd.oci.image.layer.v1.tar+gzip"),
        (
            "zstd:chunked",
            "application/vnd.oci.image.layer.v1.tar+zstd",
        ),
    ] {
        let reg = fresh_registry();
        let r = docker_ref(&reg, "buildah/app:v1");
        buildah(
            t,
            &[
                "push",
                "-q",
                "--tls-verify=false",
                "--compression-format",
                format,
                "localhost/formats:built",
                &r,
            ],
        );
        let name = format!("buildah-{}", format.replace(':', "-"));
        let rows = puller.pull_then_indexed(
            t,
            &name,
            "buildah",
            &format!("buildah push --compression-format {format}"),
            &r,
            IndexOrigin::Artifact,
        );
        assert_eq!(rows[0].media_types, media);
        if format == "zstd:chunked" {
            assert_eq!(
                rows[0].origins,
                vec![IndexOrigin::Toc],
                "lazy through its TOC"
            );
        }
    }
}

#[test]
fn podman_zstd_chunked_image_pulls_lazily() {
    let b = Base::new();
    let (t, puller, base) = (b.tmp.path(), &b.puller, &b.base);
    let podman = |args: &[&str]| with_storage("podman", t, args);
    podman(&[
        "pull",
        "-q",
        "--tls-verify=false",
        &format!("docker://{base}"),
    ]);
    let reg = fresh_registry();
    let r = docker_ref(&reg, "podman/app:chunked");
    podman(&[
        "push",
        "-q",
        "--tls-verify=false",
        "--compression-format",
        "zstd:chunked",
        base,
        &r,
    ]);
    let rows = puller.pull_then_indexed(
        t,
        "podman",
        "podman",
        "podman push --compression-format zstd:chunked",
        &r,
        IndexOrigin::Artifact,
    );
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].origins, vec![IndexOrigin::Toc]);
    assert_eq!(
        rows[0].media_types,
        "application/vnd.oci.image.layer.v1.tar+zstd"
    );
}

/// The umoci image in a registry, converted by `ctr-remote image convert --oci FLAG` and
/// pushed by `ctr-remote` as `stargz/app:TAG`. Returns the reference.
fn ctr_remote_convert(
    ctd: &containerd::Containerd,
    reg: &common::TestRegistry,
    base: &str,
    flag: &str,
    tag: &str,
) -> String {
    let dst = format!("{}/stargz/app:{tag}", reg.host());
    ctd.must(
        "ctr-remote",
        &["image", "convert", "--oci", flag, base, &dst],
    );
    ctd.must("ctr-remote", &["image", "push", "--plain-http", &dst]);
    format!("docker://{dst}")
}

/// The image of the issue: stargz-snapshotter's zstd:chunked (an eStargz TOC annotation on
/// a zstd layer with a zstd:chunked footer) pulls and runs lazily; so does its eStargz, and
/// its optimized eStargz has its prioritized files filled ahead of the workload.
#[test]
fn ctr_remote_estargz_and_zstdchunked_images_pull_lazily() {
    let b = Base::new();
    let (t, puller, reg, base) = (b.tmp.path(), &b.puller, &b.reg, &b.base);
    let ctd = b.containerd();

    let r = ctr_remote_convert(&ctd, reg, base, "--zstdchunked", "zstdchunked");
    let rows = puller.pull_then_indexed(
        t,
        "ctr-remote-zstdchunked",
        "ctr-remote",
        "ctr-remote image convert --oci --zstdchunked",
        &r,
        IndexOrigin::Artifact,
    );
    assert_eq!(rows.len(), 1, "read through its TOC, nothing streamed");
    assert_eq!(
        rows[0].media_types,
        "application/vnd.oci.image.layer.v1.tar+zstd"
    );
    // Lazy: nothing but manifest, config and TOC travelled before ready, and the workload
    // (busybox and two small files) fetched a fraction of the image.
    let eager = eager_copy(&r, t, "zc");
    let size = eager.manifest["layers"][0]["size"].as_u64().unwrap();
    assert!(rows[0].before_ready < 64 << 10, "{}", rows[0].before_ready);
    assert!(
        rows[0].after_workload < size / 2,
        "{} of {size}",
        rows[0].after_workload
    );
    // The issue's own command, through the CLI and a daemon: it pulls, runs and reads the
    // layer through its TOC (no fallback warning), fetching a fraction of the image.
    let d = cli_pull(t, "cli-zstdchunked", &r, &puller.workload_sha);
    let (_, images) = d.status();
    let log = d.log_text();
    eprintln!(
        "fanfill pull (CLI, daemon) of the ctr-remote --zstdchunked image: {} bytes fetched after the workload, of {size}",
        images[0].bytes_fetched
    );
    assert!(
        images[0].bytes_fetched < size / 2,
        "{}",
        images[0].bytes_fetched
    );
    assert!(
        !log.contains("cannot read the layer lazily"),
        "the TOC was not used:\n{log}"
    );
    // `--prefetch` completes it in the background, by ranges through its TOC.
    let dest = t.join("cli-zstdchunked-prefetch");
    std::fs::create_dir(&dest).unwrap();
    let settings = fanfill::api::RegistrySettings {
        insecure: true,
        ..Default::default()
    };
    d.prepare_with(&r, &dest, true, settings);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let done = loop {
        let (_, images) = d.status();
        let s = images.iter().find(|i| i.dest == dest).expect("served");
        if s.files_complete == s.files {
            break s.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "prefetch incomplete after 120 s: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!(
        "fanfill pull --prefetch of the same image: {} files complete, {} bytes fetched, {} errors",
        done.files_complete, done.bytes_fetched, done.errors
    );
    assert_eq!(done.errors, 0);
    let reference_dir = t.join("zc-eager");
    tar_extract(&eager.blobs, &reference_dir);
    for n in ESTARGZ_HIDDEN {
        let _ = std::fs::remove_file(reference_dir.join(n));
    }
    let mismatches = compare(&walk(&reference_dir), &dest, READ_LIMIT);
    assert!(mismatches.is_empty(), "{mismatches:#?}");

    let r = ctr_remote_convert(&ctd, reg, base, "--estargz", "estargz");
    let rows = puller.pull_then_indexed(
        t,
        "ctr-remote-estargz",
        "ctr-remote",
        "ctr-remote image convert --oci --estargz",
        &r,
        IndexOrigin::Artifact,
    );
    assert_eq!(rows.len(), 1, "read through its TOC, nothing streamed");
    assert_eq!(rows[0].origins, vec![IndexOrigin::Toc]);
    assert_eq!(rows[0].ahead_files, 0, "not optimized: nothing prioritized");

    // `ctr-remote image optimize` runs the workload in a container and puts the files it read
    // before the landmark: fanfill fills them ahead, so the same workload fetches nothing.
    let dst = format!("{}/stargz/app:optimized", reg.host());
    let args = serde_json::to_string(&[WORKLOAD]).unwrap();
    ctd.must(
        "ctr-remote",
        &[
            "image",
            "optimize",
            "--oci",
            "--period",
            "3",
            "--entrypoint",
            r#"["/bin/sh","-c"]"#,
            "--args",
            &args,
            base,
            &dst,
        ],
    );
    ctd.must("ctr-remote", &["image", "push", "--plain-http", &dst]);
    let rows = puller.pull_then_indexed(
        t,
        "ctr-remote-optimized",
        "ctr-remote",
        "ctr-remote image optimize --oci (workload: the test's)",
        &format!("docker://{dst}"),
        IndexOrigin::Artifact,
    );
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].origins, vec![IndexOrigin::Toc]);
    assert!(rows[0].ahead_files >= 2, "{}", rows[0].ahead_files);
    assert_eq!(
        rows[0].after_workload, rows[0].after_ahead,
        "the workload read only files filled ahead"
    );
}

/// Rewrites the single-image OCI layout at `dir` (as `skopeo copy` writes it): `edit` gets
/// the manifest and the first layer's blob and may change both; the blob is stored under its
/// new digest and the manifest's descriptor updated, then the manifest and `index.json`.
fn edit_layout(dir: &Path, edit: impl FnOnce(&mut serde_json::Value, &mut Vec<u8>)) {
    let blob = |d: &str| {
        dir.join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"))
    };
    let index_path = dir.join("index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    let mdigest = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blob(&mdigest)).unwrap()).unwrap();
    let ldigest = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let mut layer = std::fs::read(blob(&ldigest)).unwrap();
    edit(&mut manifest, &mut layer);
    let new_layer = common::write_blob(dir, &layer);
    manifest["layers"][0]["digest"] = new_layer.into();
    manifest["layers"][0]["size"] = layer.len().into();
    let bytes = serde_json::to_vec(&manifest).unwrap();
    let new_manifest = common::write_blob(dir, &bytes);
    index["manifests"][0]["digest"] = new_manifest.into();
    index["manifests"][0]["size"] = bytes.len().into();
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
}

/// A layer fanfill cannot read lazily still pulls: streamed once, kept in the blob cache,
/// served from there, every file right. Made from stargz-snapshotter's own images: (a) its
/// zstd:chunked with a byte of the TOC (inside a zstd skippable frame, so the blob still
/// decompresses) changed, annotations kept: the TOC no longer matches its checksum; (b) its
/// eStargz with a `toc.digest` annotation naming another TOC; (c) its zstd:chunked with the
/// annotations dropped and the footer's magic broken (no TOC to be found: a plain zstd
/// layer); (d) its eStargz with the annotations dropped and the footer's TOC offset moved
/// (the footer probe finds a TOC that does not read).
#[test]
fn layers_with_broken_tocs_pull_from_the_blob_cache_and_read_right() {
    let b = Base::new();
    let (t, puller, reg, base) = (b.tmp.path(), &b.puller, &b.reg, &b.base);
    let ctd = b.containerd();
    let zstd = ctr_remote_convert(&ctd, reg, base, "--zstdchunked", "zstdchunked");
    let esgz = ctr_remote_convert(&ctd, reg, base, "--estargz", "estargz");

    type Edit = Box<dyn FnOnce(&mut serde_json::Value, &mut Vec<u8>)>;
    let cases: Vec<(&str, &str, String, Edit)> = vec![
        (
            "broken-zstd-toc",
            "TOC byte flipped (checksum mismatch)",
            zstd.clone(),
            Box::new(|m, blob| {
                let pos =
                    m["layers"][0]["annotations"]["io.containers.zstd-chunked.manifest-position"]
                        .as_str()
                        .unwrap()
                        .to_string();
                let off: usize = pos.split(':').next().unwrap().parse().unwrap();
                blob[off + 10] ^= 0x55;
            }),
        ),
        (
            "wrong-estargz-digest",
            "toc.digest annotation of another TOC",
            esgz.clone(),
            Box::new(|m, _| {
                m["layers"][0]["annotations"][STARGZ_TOC_ANNOTATION] =
                    format!("sha256:{}", "ab".repeat(32)).into();
            }),
        ),
        (
            "no-zstd-footer",
            "annotations dropped, footer magic broken",
            zstd,
            Box::new(|m, blob| {
                m["layers"][0]
                    .as_object_mut()
                    .unwrap()
                    .remove("annotations");
                let n = blob.len();
                // The footer's magic: the last 8 bytes of its skippable frame.
                blob[n - 8..].copy_from_slice(b"NOTAFOOT");
            }),
        ),
        (
            "estargz-footer-offset",
            "annotations dropped, footer's TOC offset moved",
            esgz,
            Box::new(|m, blob| {
                m["layers"][0]
                    .as_object_mut()
                    .unwrap()
                    .remove("annotations");
                // The 51-byte footer: gzip header (10), XLEN (2), "SG" and its length (4),
                // then the TOC offset as 16 hex digits (not covered by any checksum).
                let at = blob.len() - 51 + 16;
                let hex = std::str::from_utf8(&blob[at..at + 16]).unwrap();
                let moved = u64::from_str_radix(hex, 16).unwrap() - 7;
                blob[at..at + 16].copy_from_slice(format!("{moved:016x}").as_bytes());
            }),
        ),
    ];
    for (name, what, source, edit) in cases {
        let dir = t.join(format!("{name}-layout"));
        common::skopeo_copy(&source, &format!("oci:{}:x", dir.display()), &[]);
        edit_layout(&dir, edit);
        let r = docker_ref(reg, &format!("broken/app:{name}"));
        common::skopeo_copy(&format!("oci:{}:x", dir.display()), &r, &[]);
        let eager = eager_copy(&r, t, name);
        let state = t.join(format!("{name}-state"));
        let pulled = puller.pull(
            t,
            name,
            ("ctr-remote, then edited", what),
            &r,
            &eager,
            &Puller::options(&state),
        );
        assert_eq!(pulled.origins, vec![IndexOrigin::Built], "{name}");
        // The layer travelled whole once and is kept: fills were local reads.
        let layer = eager.manifest["layers"][0]["digest"].as_str().unwrap();
        let cached = state
            .join("blobs/sha256")
            .join(layer.trim_start_matches("sha256:"));
        assert!(cached.is_file(), "{name}: {} not cached", cached.display());
        let size = eager.manifest["layers"][0]["size"].as_u64().unwrap();
        // Through the CLI and a daemon too: the warning names the layer and the reason.
        if name == "broken-zstd-toc" {
            let d = cli_pull(t, name, &r, &puller.workload_sha);
            let log = d.log_text();
            let warning = log
                .lines()
                .find(|l| l.contains("cannot read the layer lazily"))
                .unwrap_or_else(|| panic!("no fallback warning:\n{log}"));
            eprintln!("{name}: daemon log: {warning}");
            assert!(warning.contains(layer), "{warning}");
            assert!(warning.contains("does not match"), "{warning}");
        }
        assert!(
            pulled.after_workload < size + (64 << 10),
            "{name}: fills after the stream went to the registry: {} for a {size}-byte layer",
            pulled.after_workload
        );
    }
}

/// Layer media types beyond the common ones, in an OCI layout: an OCI non-distributable
/// layer, a Docker foreign layer, an empty layer (a gzip of an empty tar), under a
/// multi-platform index from which `--platform` picks the image.
#[test]
fn nondistributable_foreign_and_empty_layers_under_a_multi_platform_index() {
    common::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let dir = t.join("layout");
    let other_arch = if common::host_arch() == "arm64" {
        "amd64"
    } else {
        "arm64"
    };
    let host = common::write_image(
        &dir,
        common::host_arch(),
        &[vec![("host.txt", b"host".to_vec())]],
    );
    let wanted = common::write_image(
        &dir,
        other_arch,
        &[
            vec![("etc/one", common::noise(70_000, 1))],
            vec![],
            vec![("etc/two", common::noise(5_000, 2))],
        ],
    );
    // Retag the layers: non-distributable, empty (stays OCI gzip), Docker foreign.
    let blob = |d: &str| {
        dir.join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"))
    };
    let mut manifest: serde_json::Value = serde_json::from_slice(&wanted.manifest).unwrap();
    manifest["layers"][0]["mediaType"] =
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip".into();
    manifest["layers"][2]["mediaType"] =
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip".into();
    assert!(blob(&wanted.layers[1].digest).is_file());
    let bytes = serde_json::to_vec(&manifest).unwrap();
    let mut edited = wanted.clone();
    edited.manifest_digest = common::write_blob(&dir, &bytes);
    edited.manifest = bytes;
    common::build_index(
        &dir,
        "multi",
        &[(common::host_arch(), &host), (other_arch, &edited)],
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    let engine = Engine::start(EngineConfig::default()).unwrap();
    let dest = t.join("root");
    std::fs::create_dir(&dest).unwrap();
    let mut opts = PrepareOptions::new(t.join("state/indexes"));
    opts.platform = Some(format!("linux/{other_arch}").parse().unwrap());
    let reference = format!("oci:{}:multi", dir.display());
    let prepared = prepare_within(&rt, &engine, &reference, &dest, &opts).expect("prepare");
    assert_eq!(prepared.index_origins.len(), 3);
    assert_eq!(
        trees::read_bounded(&dest.join("etc/one"), READ_LIMIT),
        common::noise(70_000, 1)
    );
    assert_eq!(
        trees::read_bounded(&dest.join("etc/two"), READ_LIMIT),
        common::noise(5_000, 2)
    );
    assert!(!dest.join("host.txt").exists(), "the host platform's image");
    let names: BTreeMap<String, _> = walk(&dest);
    assert_eq!(
        names.keys().cloned().collect::<Vec<_>>(),
        ["etc", "etc/one", "etc/two"]
    );
    drop(prepared);
    engine.shutdown();
}
