//! The `fanfill` command line: a thin adapter over the library. Each subcommand parses its
//! flags, calls one library function and prints the result; errors are printed with their
//! whole cause chain.
//!
//! Exit codes: 0 success, 1 failure (the message names the image, layer, file or registry at
//! fault), 2 bad usage.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use fanfill::fill::{Engine, EngineConfig, error_chain};
use fanfill::image::{self, IndexOrigin, PrepareOptions};
use fanfill::registry::{Credentials, Mirror, Platform};
use fanfill::unpack::Mode;

/// Start containers before their images are downloaded.
///
/// fanfill unpacks an image's layers metadata-only (every directory, symlink, owner, mode
/// and xattr real; regular files sparse, of their true size) and fills file ranges on first
/// access through fanotify pre-content events (Linux 6.14+, root). Reads block until their
/// bytes are fetched, verified and written; a failure gives the reader EIO, never zeros.
#[derive(Parser)]
#[command(name = "fanfill", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log filter (tracing `EnvFilter` syntax), e.g. `fanfill=debug`. Also `RUST_LOG`.
    #[arg(
        long,
        global = true,
        env = "FANFILL_LOG",
        default_value = "fanfill=info"
    )]
    log: String,
}

#[derive(Subcommand)]
enum Command {
    /// Prepare an image as placeholders in DEST and serve them until interrupted.
    ///
    /// Returns control (prints "ready") as soon as the placeholders exist; reads of DEST
    /// then fill on demand. With --prefetch the rest of the image is filled in the
    /// background; --exit-when-complete stops once every file is filled (its marks gone).
    ///
    /// Examples:
    ///   fanfill pull oci:/srv/images/app:latest /var/lib/app-root
    ///   fanfill pull --tls-verify=false docker://127.0.0.1:5000/app:1 /mnt/ext4/app --mode overlay
    Pull(PullArgs),
    /// Build the layer indexes of an image (and with --push attach them to it in the
    /// registry, so that every later pull is lazy from the first byte).
    Index(IndexArgs),
    /// Run the built-in demo: build a small image locally, prepare it lazily, run a program
    /// from it with chroot, and show how little was fetched.
    Demo(DemoArgs),
}

#[derive(Args, Clone)]
struct RegistryArgs {
    /// Require HTTPS and verify certificates (podman's --tls-verify); false allows plain HTTP.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    tls_verify: bool,
    /// Registry credentials, USER[:PASS]; default: the containers/docker auth files.
    #[arg(long, value_name = "USER[:PASS]")]
    creds: Option<String>,
    /// Read credentials from this auth file only (containers-auth.json format).
    #[arg(long, value_name = "FILE")]
    authfile: Option<PathBuf>,
    /// Pick this platform from a multi-arch image, OS/ARCH[/VARIANT]; default: this host.
    #[arg(long, value_name = "OS/ARCH")]
    platform: Option<String>,
    /// A registry mirror tried before the origin, HOST[:PORT][/PREFIX]; repeatable.
    #[arg(long, value_name = "HOST")]
    mirror: Vec<String>,
    /// Where layer indexes are kept.
    #[arg(
        long,
        env = "FANFILL_INDEX_DIR",
        default_value = "/var/lib/fanfill/indexes"
    )]
    index_dir: PathBuf,
    /// Do not look for a pushed index artifact in the registry.
    #[arg(long)]
    no_index_artifact: bool,
}

impl RegistryArgs {
    fn options(&self) -> Result<PrepareOptions> {
        let mut o = PrepareOptions::new(&self.index_dir);
        o.registry.insecure = !self.tls_verify;
        o.registry.creds = self
            .creds
            .as_deref()
            .map(str::parse::<Credentials>)
            .transpose()
            .context("--creds")?;
        o.registry.authfile = self.authfile.clone();
        o.registry.mirrors = self
            .mirror
            .iter()
            .map(|m| Mirror {
                location: m.clone(),
                insecure: !self.tls_verify,
            })
            .collect();
        o.platform = self
            .platform
            .as_deref()
            .map(str::parse::<Platform>)
            .transpose()
            .context("--platform")?;
        o.use_artifact = !self.no_index_artifact;
        Ok(o)
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    /// One flattened placeholder tree: the container's rootfs (range fills).
    Direct,
    /// One tree per layer under DEST/layers, to mount as overlay lowerdirs.
    Overlay,
}

#[derive(Args)]
struct PullArgs {
    /// The image: docker://HOST[:PORT]/REPO[:TAG|@DIGEST], HOST/REPO[:TAG] or oci:DIR[:TAG].
    image: String,
    /// An empty directory on ext4, xfs or btrfs (created if missing).
    dest: PathBuf,
    /// How to lay the image out.
    #[arg(long, value_enum, default_value = "direct")]
    mode: ModeArg,
    /// Fill the rest of the image in the background once the placeholders are ready.
    #[arg(long)]
    prefetch: bool,
    /// Files filled at once by --prefetch.
    #[arg(long, default_value_t = 4)]
    prefetch_parallel: usize,
    /// Exit once every file is filled (implies --prefetch).
    #[arg(long)]
    exit_when_complete: bool,
    #[command(flatten)]
    registry: RegistryArgs,
}

#[derive(Args)]
struct IndexArgs {
    /// The image, as for `pull`.
    image: String,
    /// Push the indexes to the registry as an artifact referring to the image manifest.
    #[arg(long)]
    push: bool,
    #[command(flatten)]
    registry: RegistryArgs,
}

#[derive(Args)]
struct DemoArgs {
    /// Keep the demo image and tree in this directory instead of a temporary one.
    #[arg(long)]
    keep: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| cli.log.clone());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let res = match cli.command {
        Command::Pull(a) => pull(a),
        Command::Index(a) => index(a),
        Command::Demo(a) => demo(a),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fanfill: error: {}", error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn origin_word(o: IndexOrigin) -> &'static str {
    match o {
        IndexOrigin::Local => "local",
        IndexOrigin::Artifact => "artifact",
        IndexOrigin::Built => "built",
    }
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / 1_048_576.0)
}

fn pull(a: PullArgs) -> Result<()> {
    let mut opts = a.registry.options()?;
    opts.mode = match a.mode {
        ModeArg::Direct => Mode::Direct,
        ModeArg::Overlay => Mode::Overlay,
    };
    std::fs::create_dir_all(&a.dest).with_context(|| format!("creating {}", a.dest.display()))?;
    let engine = Arc::new(Engine::start(EngineConfig::default())?);
    let rt = runtime()?;
    let started = Instant::now();
    let prepared = rt.block_on(image::prepare(&engine, &a.image, &a.dest, &opts))?;
    println!(
        "ready: {} ({}) in {} after {:.2}s: {} placeholders, {} of {} layer bytes fetched; indexes: {}",
        prepared.reference,
        prepared.manifest_digest,
        prepared.dest.display(),
        started.elapsed().as_secs_f64(),
        prepared.files.len(),
        mib(prepared.bytes_before_ready),
        mib(prepared.image_size),
        prepared
            .index_origins
            .iter()
            .map(|o| origin_word(*o))
            .collect::<Vec<_>>()
            .join(",")
    );
    if !prepared.unpacked.lowerdirs.is_empty() {
        println!("lowerdir={}", prepared.unpacked.lowerdir_option());
    }
    let prefetch = a.prefetch || a.exit_when_complete;
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    if prefetch {
        let (e, n) = (engine.clone(), a.prefetch_parallel);
        std::thread::spawn(move || {
            let _ = done_tx.send(e.fill_all(n));
        });
    }
    let interrupted = Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let flag = interrupted.clone();
        rt.spawn(async move {
            let kind = tokio::signal::unix::SignalKind::from_raw(sig);
            if let Ok(mut s) = tokio::signal::unix::signal(kind) {
                s.recv().await;
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        });
    }
    let mut last = Instant::now();
    loop {
        if interrupted.load(std::sync::atomic::Ordering::SeqCst) {
            eprintln!("interrupted: answering blocked readers, then exiting");
            break;
        }
        match done_rx.recv_timeout(Duration::from_millis(200)) {
            Ok(Ok(())) => {
                let s = engine.stats();
                println!(
                    "complete: {} files, {} filled, {} fetched from {}",
                    s.files,
                    mib(s.bytes_filled),
                    mib(prepared.store.bytes_fetched()),
                    prepared.reference
                );
                if a.exit_when_complete {
                    break;
                }
            }
            Ok(Err(e)) => bail!(e),
            Err(_) => {}
        }
        if last.elapsed() > Duration::from_secs(10) {
            last = Instant::now();
            let s = engine.stats();
            eprintln!(
                "progress: {}/{} files complete, {} of {} filled, {} misses, {} errors",
                s.files_complete,
                s.files,
                mib(s.bytes_filled),
                mib(s.bytes_total),
                s.events,
                s.errors
            );
        }
    }
    drop(rt);
    match Arc::try_unwrap(engine) {
        Ok(e) => e.shutdown(),
        Err(_) => bail!("engine still in use at exit"),
    }
    Ok(())
}

fn index(a: IndexArgs) -> Result<()> {
    let opts = a.registry.options()?;
    let rt = runtime()?;
    let (indexes, artifact) = rt.block_on(image::index_image(&a.image, &opts, a.push))?;
    println!(
        "| layer | compressed | uncompressed | entries | checkpoints | index bytes | origin |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (digest, ix, origin) in &indexes.layers {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            digest,
            ix.compressed_size,
            ix.uncompressed_size,
            ix.entries.len(),
            ix.checkpoints.len(),
            ix.encode().len(),
            origin_word(*origin)
        );
    }
    if let Some(d) = artifact {
        println!(
            "pushed index artifact {d} referring to {}",
            indexes.image.manifest_digest
        );
    }
    Ok(())
}

fn demo(a: DemoArgs) -> Result<()> {
    if !std::path::Path::new("/bin/busybox").exists() {
        bail!("the demo image is built from /bin/busybox: apt-get install busybox-static");
    }
    let tmp = tempfile::tempdir().context("temp dir")?;
    let base = a.keep.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    let (layout, dest, indexes) = (
        base.join("image"),
        base.join("rootfs"),
        base.join("indexes"),
    );
    if dest.exists() {
        bail!(
            "{} exists: remove it or pick another --keep",
            dest.display()
        );
    }
    std::fs::create_dir_all(&dest)?;
    let built = fanfill::ocibuild::demo_image(&layout, fanfill::ocibuild::Compression::Gzip)?;
    println!(
        "built demo image {} ({} compressed)",
        built.reference(),
        mib(built.compressed_size())
    );
    let rt = runtime()?;
    let opts = PrepareOptions::new(&indexes);
    // What the image's publisher does once (`fanfill index --push`): after it, a pull moves
    // only the manifest, the config and the index before the placeholders exist.
    let t = Instant::now();
    rt.block_on(image::index_image(&built.reference(), &opts, false))?;
    println!(
        "indexed its layers in {:.0} ms (once per image)",
        t.elapsed().as_secs_f64() * 1e3
    );
    let engine = Engine::start(EngineConfig::default())?;
    let t = Instant::now();
    let prepared = rt.block_on(image::prepare(&engine, &built.reference(), &dest, &opts))?;
    println!(
        "placeholders ready in {:.0} ms: {} files, {} of data not yet present; {} bytes read from the image to get there",
        t.elapsed().as_secs_f64() * 1e3,
        prepared.files.len(),
        mib(prepared.unpacked.stats.bytes),
        prepared.bytes_before_ready
    );
    let fetched_before = prepared.store.bytes_fetched();
    let t = Instant::now();
    let out = std::process::Command::new("chroot")
        .arg(&dest)
        .args(["/bin/sh", "/bin/demo"])
        .output()
        .context("running chroot")?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!("demo program failed: {}", out.status);
    }
    let s = engine.stats();
    println!(
        "ran in {:.0} ms; read {} of {} files, fetched {} of {} ({} layer bytes read, {:.1}%)",
        t.elapsed().as_secs_f64() * 1e3,
        s.files_complete,
        s.files,
        mib(s.bytes_fetched),
        mib(s.bytes_total),
        mib(prepared.store.bytes_fetched() - fetched_before),
        100.0 * s.bytes_fetched as f64 / s.bytes_total.max(1) as f64
    );
    drop(rt);
    engine.shutdown();
    Ok(())
}
