//! The `fanfill` command line: a thin adapter over the library. Each subcommand parses its
//! flags, calls one library function and prints the result; errors are printed with their
//! whole cause chain.
//!
//! Exit codes: 0 success, 1 failure (the message names the image, layer, file or registry at
//! fault), 2 bad usage.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use fanfill::api::{LayoutMode, RegistrySettings, Request, Response};
use fanfill::daemon::DaemonConfig;
use fanfill::fill::{Engine, EngineConfig, error_chain};
use fanfill::image::{self, PrepareOptions};
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
    /// The daemon's API socket (for `daemon` and every client command).
    #[arg(
        long,
        global = true,
        env = "FANFILL_SOCKET",
        default_value = fanfill::api::DEFAULT_SOCKET
    )]
    socket: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Prepare an image as placeholders in DEST (served by `fanfill daemon`).
    ///
    /// Asks the daemon to prepare the image and returns as soon as the placeholders exist
    /// (prints "ready"); the daemon then fills reads of DEST on demand, and fills the rest of
    /// the image in the background (each layer streamed once, never ahead of a reader's
    /// miss; --no-prefetch: only what is read). With --foreground no daemon is used:
    /// this process serves DEST until interrupted (--exit-when-complete: until every file
    /// is filled and its mark gone).
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
    /// Run the daemon in the foreground: one process serving every prepared image, with a
    /// local API on --socket, state in --state-dir that survives restarts, and an fd holder
    /// that keeps blocked readers blocked (never reading zeros) across a crash or restart.
    ///
    /// Example (see contrib/fanfill.service):
    ///   fanfill daemon --state-dir /var/lib/fanfill
    Daemon(DaemonArgs),
    /// Show the daemon's images: files and bytes filled, fetch rate, errors.
    Status(StatusArgs),
    /// Stop serving the image in DEST and delete its tree.
    Rm(RmArgs),
    /// Turn background prefetch of the image in DEST on (or --off).
    Prefetch(PrefetchArgs),
    /// The fd holder the daemon starts (internal).
    #[command(hide = true)]
    Holder,
    /// OCI runtime hook (createRuntime, or the deprecated prestart): reads the container's
    /// state on stdin and tells the daemon which fanfill tree the container is about to use
    /// (a direct rootfs must be served; an overlay rootfs gets its opens held until filled;
    /// an empty rootfs annotated org.fanfill.image=IMAGE is prepared). Fails the container
    /// start, with the reason, when the daemon cannot serve it. See contrib/hooks.d.
    Hook,
}

#[derive(Args)]
struct DaemonArgs {
    /// State: images, fill progress, the in-flight journal, the holder's socket.
    #[arg(long, env = "FANFILL_STATE_DIR", default_value = "/var/lib/fanfill")]
    state_dir: PathBuf,
    /// Where layer indexes are kept (default: STATE_DIR/indexes).
    #[arg(long, env = "FANFILL_INDEX_DIR")]
    index_dir: Option<PathBuf>,
    /// Files filled at once by background prefetch, per image.
    #[arg(long, default_value_t = 2)]
    prefetch_parallel: usize,
    /// Limit background prefetch to this many MiB/s, all images together (0: unlimited;
    /// misses of readers are never limited).
    #[arg(long, default_value_t = 0)]
    prefetch_rate_mib: u64,
    /// Fill progress is recorded this often (milliseconds).
    #[arg(long, default_value_t = 1000)]
    persist_interval_ms: u64,
    /// Worker threads serving fill events.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// A reader missing a file that the background layer stream is expected to bring
    /// within this many milliseconds waits for the stream instead of fetching the file on
    /// its own (a tree walk then reads at the stream's speed); 0: never wait.
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    delivery_wait_ms: u64,
    /// After a batch of fill or open events answered at once (bytes at hand, files already
    /// complete), keep reading for this many microseconds before sleeping: a reader's next
    /// miss is then served without waking a halted CPU (about 30 µs per event on a VM).
    /// Costs at most this much CPU per batch, none while idle or while every reader waits
    /// on a fetch; 0: never spin; at most 1000.
    #[arg(long, default_value_t = 50, value_name = "US",
          value_parser = clap::value_parser!(u64).range(0..=1000))]
    event_spin_us: u64,
    /// When a container opens a small file (up to 256 KiB), also read this many KiB of its
    /// layer past it in the same request and fill every file wholly inside: files opened
    /// together mostly sit together in a layer. 0: fetch each file alone.
    #[arg(long, default_value_t = image::READ_AROUND >> 10, value_name = "KIB")]
    read_around_kib: u64,
    /// Do not fill an image's start set ahead: by default the files nearly every container
    /// start reads (/etc/passwd, /etc/group, the loader's cache, /bin/sh, /etc/localtime,
    /// the program interpreter and C library, the config's entrypoint) are fetched while
    /// the placeholders are made, before the files of the image's access profile if any.
    #[arg(long)]
    no_start_set: bool,
    /// Run without an fd holder (a crash then lets blocked readers through to zeros).
    #[arg(long)]
    no_holder: bool,
    /// Serve Prometheus metrics on this address, e.g. 127.0.0.1:9464 (off by default).
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Prepare images only strictly below this directory (repeatable). Default:
    /// /var/lib, /var/tmp, /srv, /mnt, /media, /run, /tmp, /home. Whatever this says, never
    /// the state dir, index dir or socket or above them, inside the state dir only under
    /// STATE_DIR/roots; destinations must be absolute, without `..`, and are checked where
    /// their symlinks lead.
    #[arg(long = "allow-root", value_name = "DIR")]
    allow_root: Vec<PathBuf>,
    /// Let members of this group (name or gid) ask for status through the API socket
    /// (read-only; everything else stays root's). The socket is then 0660 with this group.
    #[arg(long, value_name = "GROUP")]
    status_group: Option<String>,
    /// Which layer indexes file digests may come from, whatever a client asks: `local`
    /// (built here from the layer stream; the default), `signed` (also an index artifact
    /// signed with --index-key) or `referrer` (also an index artifact among the image's
    /// referrers, trusted on sight). See docs/security.md.
    #[arg(long, value_enum, default_value = "local")]
    index_policy: IndexPolicyArg,
    /// With --index-policy signed: the public key (PEM, ECDSA P-256, as cosign.pub) index
    /// artifacts must carry a cosign signature of.
    #[arg(long, value_name = "PEM")]
    index_key: Option<PathBuf>,
    /// Test knob: delay every fetch by this many milliseconds.
    #[arg(long, hide = true, default_value_t = 0)]
    test_fetch_delay_ms: u64,
    /// Also serve containerd's snapshots API on this socket, as proxy snapshotter (see
    /// docs/runtimes.md): `[proxy_plugins.fanfill] type = "snapshot" address = "PATH"`.
    #[arg(long, value_name = "PATH")]
    containerd_socket: Option<PathBuf>,
    /// For the images containerd has fanfill serve: verify TLS (false: also allow plain HTTP).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    containerd_tls_verify: bool,
    /// For the images containerd has fanfill serve: a registry mirror tried before the
    /// origin (repeatable).
    #[arg(long, value_name = "HOST")]
    containerd_mirror: Vec<String>,
    /// For the images containerd has fanfill serve: containerd's registry host directory,
    /// whose HOST[:PORT]/hosts.toml (or _default/hosts.toml) lists mirrors tried before the
    /// origin and each host's CA files, client certificates and headers, as containerd reads
    /// them.
    #[arg(long, value_name = "DIR", default_value = "/etc/containerd/certs.d")]
    containerd_hosts_dir: PathBuf,
    /// Complete the images containerd has fanfill serve in the background (each layer
    /// streamed once; readers' misses go first and wait for a stream about to bring their
    /// file), as stargz-snapshotter fetches its layers in the background. On by default;
    /// `--containerd-prefetch=false`: fill only what containers read.
    #[arg(
        long,
        value_name = "BOOL",
        default_value_t = true,
        num_args = 0..=1,
        default_missing_value = "true",
        action = clap::ArgAction::Set
    )]
    containerd_prefetch: bool,
}

#[derive(Args)]
struct StatusArgs {
    /// Only the image in this directory.
    dest: Option<PathBuf>,
    /// Print the daemon's JSON answer instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct RmArgs {
    /// The image's destination.
    dest: PathBuf,
}

#[derive(Args)]
struct PrefetchArgs {
    /// The image's destination.
    dest: PathBuf,
    /// Turn it off instead.
    #[arg(long)]
    off: bool,
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
    /// Trust the CA certificates (*.crt) in DIR, and use its client certificate pair
    /// (NAME.cert + NAME.key); default: /etc/containers/certs.d/HOST:PORT/ and friends.
    #[arg(long, value_name = "DIR")]
    cert_dir: Option<PathBuf>,
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
        Ok(PrepareOptions::from_settings(
            &self.index_dir,
            &self.settings(),
        )?)
    }
}

/// `--index-policy`: which layer indexes file digests may come from.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum IndexPolicyArg {
    /// Only indexes built on this node from the layer stream (checked against the layer
    /// digest the manifest names): an image pulled by digest keeps its integrity. The
    /// first prepare of a layer streams it whole.
    Local,
    /// Also the newest index artifact of the image that carries a cosign signature by
    /// --index-key (sign one with `fanfill index --push --sign-key`, or `cosign sign --key`
    /// on the artifact's digest): lazy from the first start, trusting the key's holder.
    Signed,
    /// Also the newest index artifact among the image's referrers, trusted on sight (anyone
    /// with push rights can attach one): only for repositories whose writers you trust.
    Referrer,
}

/// The index policy `arg` names, with its key read from `key` (`signed` needs one).
fn index_policy(arg: IndexPolicyArg, key: Option<&Path>) -> Result<image::IndexPolicy> {
    Ok(match (arg, key) {
        (IndexPolicyArg::Signed, Some(key)) => {
            image::IndexPolicy::Signed(fanfill::signature::VerifyKey::from_pem_file(key)?)
        }
        (IndexPolicyArg::Signed, None) => {
            bail!(
                "--index-policy signed needs --index-key PEM (the public key artifacts are signed with)"
            )
        }
        (_, Some(_)) => bail!("--index-key is for --index-policy signed"),
        (IndexPolicyArg::Local, None) => image::IndexPolicy::Local,
        (IndexPolicyArg::Referrer, None) => image::IndexPolicy::Referrer,
    })
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
    /// Fill only what readers ask for: no background completion (by default the rest of
    /// the image is filled in the background once the placeholders are ready, as an eager
    /// pull would have, yielding to readers' misses; once complete, no read goes through
    /// the daemon).
    #[arg(long)]
    no_prefetch: bool,
    /// Accepted for compatibility: background completion is the default.
    #[arg(long, hide = true, conflicts_with = "no_prefetch")]
    prefetch: bool,
    /// Files filled at once by the background completion.
    #[arg(long, default_value_t = 4)]
    prefetch_parallel: usize,
    /// Exit once every file is filled (implies --prefetch and --foreground).
    #[arg(long)]
    exit_when_complete: bool,
    /// Serve DEST from this process instead of the daemon, until interrupted.
    #[arg(long)]
    foreground: bool,
    /// With --foreground: on exit, write the files readers of DEST touched, first access
    /// first, to FILE as an access profile (JSON) for `fanfill index --push --profile`.
    /// Run the workload once against DEST, then interrupt. Nothing is filled ahead of the
    /// workload while recording (no background completion, start set, read-around or
    /// published profile), so that every file it reads is seen.
    #[arg(
        long,
        value_name = "FILE",
        requires = "foreground",
        conflicts_with = "exit_when_complete"
    )]
    record_profile: Option<PathBuf>,
    /// Which layer indexes file digests may come from (see docs/security.md); the daemon's
    /// own --index-policy applies too (and its --index-key, for `signed`).
    #[arg(long, value_enum, default_value = "local")]
    index_policy: IndexPolicyArg,
    /// With --index-policy signed and --foreground: the public key (PEM) index artifacts
    /// must be signed with.
    #[arg(long, value_name = "PEM")]
    index_key: Option<PathBuf>,
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
    /// With --push: add this access profile (JSON from `pull --record-profile`) to the
    /// artifact. Every later prepare of the image fills the listed files in the background
    /// at once, before the workload asks for them.
    #[arg(long, value_name = "FILE", requires = "push")]
    profile: Option<PathBuf>,
    /// With --push: sign the pushed artifact with this private key (PEM, ECDSA P-256,
    /// unencrypted: `openssl ecparam -name prime256v1 -genkey -noout -out KEY`), as
    /// `cosign sign --key` does, for daemons running --index-policy signed with its public
    /// half (`openssl ec -in KEY -pubout`).
    #[arg(long, value_name = "PEM", requires = "push")]
    sign_key: Option<PathBuf>,
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
    let socket = cli.socket.clone();
    let res = match cli.command {
        Command::Pull(a) if a.foreground || a.exit_when_complete => {
            // Beside the resolve and unpack, not in front of the first connection.
            fanfill::registry::warm_up();
            pull(a)
        }
        Command::Pull(a) => pull_client(&socket, a),
        Command::Daemon(a) => daemon(socket, a),
        Command::Status(a) => status(&socket, a),
        Command::Rm(a) => rm(&socket, a),
        Command::Prefetch(a) => prefetch(&socket, a),
        Command::Holder => fanfill::daemon::holder::run(&socket).map_err(Into::into),
        Command::Hook => hook(&socket),
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

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / 1_048_576.0)
}

fn pull(a: PullArgs) -> Result<()> {
    let mut opts = a.registry.options()?;
    index_policy(a.index_policy, a.index_key.as_deref())?.apply(&mut opts);
    opts.mode = match a.mode {
        ModeArg::Direct => Mode::Direct,
        ModeArg::Overlay => Mode::Overlay,
    };
    let recording = a.record_profile.is_some();
    if recording {
        opts = opts.for_recording();
    }
    std::fs::create_dir_all(&a.dest).with_context(|| format!("creating {}", a.dest.display()))?;
    let engine = Arc::new(Engine::start(EngineConfig::default())?);
    let rt = runtime()?;
    let started = Instant::now();
    let bar = spinner(format!("preparing {} in {}", a.image, a.dest.display()));
    let prepared = rt.block_on(image::prepare(&engine, &a.image, &a.dest, &opts));
    bar.finish_and_clear();
    let prepared = prepared?;
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
            .map(|o| o.as_str())
            .collect::<Vec<_>>()
            .join(",")
    );
    if !prepared.unpacked.lowerdirs.is_empty() {
        println!("lowerdir={}", prepared.unpacked.lowerdir_option());
    }
    let prefetch = (!a.no_prefetch || a.exit_when_complete) && !recording;
    let prepared = Arc::new(prepared);
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    if prefetch {
        let (e, p, n) = (engine.clone(), prepared.clone(), a.prefetch_parallel);
        std::thread::spawn(move || {
            let _ = done_tx.send(p.prefetch(&e, n));
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
            Ok(Ok(streamed)) => {
                let s = engine.stats();
                println!(
                    "complete: {} files, {} filled ({} from layer streams), {} fetched from {}",
                    s.files,
                    mib(s.bytes_filled),
                    mib(streamed.bytes_written),
                    mib(prepared.store.bytes_fetched()),
                    prepared.reference
                );
                if a.exit_when_complete {
                    break;
                }
            }
            Ok(Err(e)) => bail!(e),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            // No completion running (--no-prefetch, recording) or it has reported: wait
            // for the signal without spinning.
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                std::thread::sleep(Duration::from_millis(200))
            }
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
    if let Some(path) = &a.record_profile {
        let profile = prepared.access_profile(&engine);
        std::fs::write(path, serde_json::to_vec_pretty(&profile)?)
            .with_context(|| format!("writing the access profile {}", path.display()))?;
        println!(
            "access profile: {} files read, written to {}",
            profile.files.len(),
            path.display()
        );
    }
    drop(rt);
    match Arc::try_unwrap(engine) {
        Ok(e) => e.shutdown(),
        Err(_) => bail!("engine still in use at exit"),
    }
    Ok(())
}

impl RegistryArgs {
    fn settings(&self) -> RegistrySettings {
        RegistrySettings {
            insecure: !self.tls_verify,
            creds: self.creds.clone(),
            authfile: self.authfile.clone(),
            platform: self.platform.clone(),
            mirrors: self.mirror.clone(),
            no_index_artifact: self.no_index_artifact,
            signed_index_only: false,
            cert_dir: self.cert_dir.clone(),
            hosts_dir: None,
        }
    }
}

fn call(socket: &Path, req: Request) -> Result<Response> {
    Ok(fanfill::daemon::call(socket, &req)?)
}

fn pull_client(socket: &Path, a: PullArgs) -> Result<()> {
    // Reject a bad reference here, before bothering the daemon.
    a.image
        .parse::<fanfill::reference::Reference>()
        .context("bad image reference")?;
    if a.index_key.is_some() {
        bail!(
            "--index-key is for --foreground: through the daemon, its own --index-key is the one artifacts must be signed with"
        );
    }
    let dest = std::path::absolute(&a.dest).context("destination")?;
    let started = Instant::now();
    let bar = spinner(format!("preparing {} in {}", a.image, a.dest.display()));
    let answer = call(
        socket,
        Request::Prepare {
            image: a.image.clone(),
            dest,
            mode: match a.mode {
                ModeArg::Direct => LayoutMode::Direct,
                ModeArg::Overlay => LayoutMode::Overlay,
            },
            registry: RegistrySettings {
                no_index_artifact: a.registry.no_index_artifact
                    || a.index_policy == IndexPolicyArg::Local,
                signed_index_only: a.index_policy == IndexPolicyArg::Signed,
                ..a.registry.settings()
            },
            prefetch: !a.no_prefetch,
        },
    );
    bar.finish_and_clear();
    let Response::Prepared(s) = answer? else {
        bail!("unexpected answer from the daemon");
    };
    println!(
        "ready: {} ({}) in {} after {:.2}s: {} placeholders, {} of data to fill on access",
        s.reference,
        s.manifest_digest,
        s.dest.display(),
        started.elapsed().as_secs_f64(),
        s.files,
        mib(s.bytes_total - s.bytes_filled)
    );
    if let Some(l) = s.lowerdir {
        println!("lowerdir={l}");
    }
    Ok(())
}

fn daemon(socket: PathBuf, a: DaemonArgs) -> Result<()> {
    let mut c = DaemonConfig::new(socket, a.state_dir.clone());
    if let Some(ix) = a.index_dir {
        c.index_dir = ix;
    }
    c.prefetch_parallel = a.prefetch_parallel;
    c.prefetch_rate = a.prefetch_rate_mib << 20;
    c.persist_interval = Duration::from_millis(a.persist_interval_ms.max(10));
    c.engine.workers = a.workers;
    c.engine.delivery_wait = Duration::from_millis(a.delivery_wait_ms);
    c.engine.event_spin = Duration::from_micros(a.event_spin_us);
    c.read_around = a.read_around_kib.saturating_mul(1 << 10);
    c.start_set = !a.no_start_set;
    c.fetch_delay = Duration::from_millis(a.test_fetch_delay_ms);
    c.metrics_addr = a.metrics_addr;
    if !a.allow_root.is_empty() {
        c.allowed_roots = a.allow_root;
    }
    if a.no_holder {
        c.holder_exe = None;
    }
    c.containerd_socket = a.containerd_socket;
    c.containerd_prefetch = a.containerd_prefetch;
    c.containerd_registry = RegistrySettings {
        insecure: !a.containerd_tls_verify,
        mirrors: a.containerd_mirror,
        hosts_dir: Some(a.containerd_hosts_dir),
        ..RegistrySettings::default()
    };
    c.index_policy = index_policy(a.index_policy, a.index_key.as_deref())?;
    if let Some(g) = a.status_group {
        c.status_group = Some(match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => nix::unistd::Group::from_name(&g)?
                .with_context(|| format!("no group named {g}"))?
                .gid
                .as_raw(),
        });
    }
    fanfill::daemon::run(c)?;
    Ok(())
}

fn status(socket: &Path, a: StatusArgs) -> Result<()> {
    let r = call(
        socket,
        Request::Status {
            dest: a.dest.as_deref().map(std::path::absolute).transpose()?,
        },
    )?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    let Response::Status { daemon, images } = r else {
        bail!("unexpected answer from the daemon");
    };
    println!(
        "daemon pid {}{}: {} misses served ({} from a layer stream they waited for), {} in flight, {} errors, p50 {} µs, p99 {} µs",
        daemon.pid,
        if daemon.took_over {
            format!(
                " (took over; {} inherited events answered)",
                daemon.inherited_answered
            )
        } else {
            String::new()
        },
        daemon.events,
        daemon.delivered_waits,
        daemon.inflight_events,
        daemon.errors,
        daemon.latency_p50_us,
        daemon.latency_p99_us
    );
    if daemon.overlay_opens > 0 || daemon.overlays_watched > 0 {
        println!(
            "overlay opens: {} watched rootfs, {} opens held for a fill ({} now), \
             {} ms held in all, longest {} ms; {} files read ahead for the loader",
            daemon.overlays_watched,
            daemon.overlay_opens,
            daemon.overlay_opens_inflight,
            daemon.overlay_open_held_ms,
            daemon.overlay_open_held_max_ms,
            daemon.loader_ahead
        );
    }
    println!(
        "{:<32} {:<8} {:>13} {:>21} {:>12} {:>12} {:>6}  {:<8} IMAGE",
        "DEST", "MODE", "FILES", "FILLED", "FETCHED", "RATE", "ERRORS", "STATE"
    );
    for i in images {
        println!(
            "{:<32} {:<8} {:>13} {:>21} {:>12} {:>10}/s {:>6}  {:<8} {}",
            i.dest.display(),
            format!("{:?}", i.mode).to_lowercase(),
            format!("{}/{}", i.files_complete, i.files),
            format!("{}/{}", mib(i.bytes_filled), mib(i.bytes_total)),
            mib(i.bytes_fetched),
            mib(i.fetch_rate as u64),
            i.errors,
            i.state,
            i.reference
        );
    }
    Ok(())
}

fn rm(socket: &Path, a: RmArgs) -> Result<()> {
    let dest = std::path::absolute(&a.dest)?;
    if let Response::Removed { dest } = call(socket, Request::Remove { dest })? {
        println!("removed {}", dest.display());
    }
    Ok(())
}

fn prefetch(socket: &Path, a: PrefetchArgs) -> Result<()> {
    let dest = std::path::absolute(&a.dest)?;
    call(
        socket,
        Request::Prefetch {
            dest,
            enable: !a.off,
        },
    )?;
    Ok(())
}

fn index(a: IndexArgs) -> Result<()> {
    let opts = a.registry.options()?;
    let profile = match &a.profile {
        Some(path) => {
            let bytes =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            let p = image::AccessProfile::from_json(&bytes)
                .map_err(|e| anyhow!("access profile {}: {e}", path.display()))?;
            Some(p)
        }
        None => None,
    };
    // A bad key fails before the layers are read.
    let sign_key = a
        .sign_key
        .as_deref()
        .map(fanfill::signature::SignKey::from_pem_file)
        .transpose()?;
    let rt = runtime()?;
    let bar = spinner(format!("indexing the layers of {}", a.image));
    let indexed = rt.block_on(image::index_image_with_profile(
        &a.image,
        &opts,
        a.push,
        profile.as_ref(),
    ));
    bar.finish_and_clear();
    let (indexes, artifact) = indexed?;
    println!(
        "| layer | compressed | uncompressed | entries | checkpoints | index bytes | origin |"
    );
    println!("|---|---|---|---|---|---|---|");
    for ((digest, ix, origin), toc) in indexes.layers.iter().zip(&indexes.tocs) {
        if let Some(toc) = toc {
            println!(
                "| {} | {} | - | {} | - | - | {:?} TOC {} ({} bytes read): no index needed |",
                digest,
                ix.compressed_size,
                ix.entries.len(),
                toc.format,
                toc.toc_digest,
                toc.toc_bytes_fetched
            );
            continue;
        }
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            digest,
            ix.compressed_size,
            ix.uncompressed_size,
            ix.entries.len(),
            ix.checkpoints.len(),
            ix.encode().len(),
            origin.as_str()
        );
    }
    if let Some(d) = artifact {
        println!(
            "pushed index artifact {d} referring to {}",
            indexes.image.manifest_digest
        );
        if let Some(key) = &sign_key {
            let tag = rt.block_on(image::sign_artifact(&a.image, &opts, &d, key))?;
            println!("signed it: signature stored under the tag {tag}");
        }
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

fn hook(socket: &Path) -> Result<()> {
    use std::io::Read as _;
    let mut state = Vec::new();
    std::io::stdin()
        .read_to_end(&mut state)
        .context("reading the OCI state from stdin")?;
    let outcome = fanfill::hook::run(&state, socket)?;
    tracing::info!(?outcome, "hook done");
    Ok(())
}

/// A spinner with elapsed time on stderr for long waits (hidden when stderr is not a
/// terminal).
fn spinner(message: String) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    bar.set_message(message);
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}
