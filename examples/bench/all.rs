//! `bench --all`: the benchmark of record (#17). Runs [`peer::run_image`] for every image and
//! link (each image once behind a pull-through cache as well), keeps every figure in
//! `BENCHMARKS.json` (written after each image, so an interrupted run keeps what it
//! measured) and writes `BENCHMARKS.md`: a summary of time to first output and the ratios
//! the goals are read against, then each image's tables. `bench --report-only` rewrites the
//! markdown from the JSON. It measures only; it never changes what it measures.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::peer::{self, ImageResult, System};

struct AllArgs {
    runs: usize,
    images: Vec<String>,
    links: Vec<String>,
    /// The image also measured behind the pull-through cache (`none`: skipped).
    pull_through: String,
    out: PathBuf,
    peer: peer::Args,
}

const USAGE: &str = "bench [--all | --quick] [--runs N] [--images slim,python,large] \
[--links shaped,loopback] [--pull-through IMAGE|none] [--out DIR] [--cache DIR] \
[--stargz-grpc PATH] [--fanfill PATH]
  --all (default): 3 images, 5 runs, both links, the python image behind a pull-through cache
  --quick: the slim image, 3 runs, shaped link, no pull-through cache
bench --report-only [DIR]   BENCHMARKS.md again from DIR/BENCHMARKS.json
bench peer --help           one image, by hand
bench harness --help        the older in-process start benchmark (docs/harness-bench.md)";

fn parse(argv: &[String]) -> Result<AllArgs> {
    let mut a = AllArgs {
        runs: 5,
        images: vec!["slim".into(), "python".into(), "large".into()],
        links: vec!["shaped".into(), "loopback".into()],
        pull_through: "python".into(),
        out: std::env::current_dir()?,
        peer: peer::Args::defaults()?,
    };
    let mut explicit_runs = None;
    let mut it = argv.iter().cloned();
    while let Some(arg) = it.next() {
        let mut val = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--all" => {}
            "--quick" => {
                a.runs = 3;
                a.images = vec!["slim".into()];
                a.links = vec!["shaped".into()];
                a.pull_through = "none".into();
            }
            "--runs" => explicit_runs = Some(val("--runs")?.parse().context("--runs")?),
            "--images" => a.images = val("--images")?.split(',').map(String::from).collect(),
            "--links" => a.links = val("--links")?.split(',').map(String::from).collect(),
            "--pull-through" => a.pull_through = val("--pull-through")?,
            "--out" => a.out = PathBuf::from(val("--out")?),
            "--cache" => a.peer.cache = PathBuf::from(val("--cache")?),
            "--stargz-grpc" => a.peer.stargz_grpc = PathBuf::from(val("--stargz-grpc")?),
            "--fanfill" => a.peer.fanfill = PathBuf::from(val("--fanfill")?),
            "-h" | "--help" => {
                eprintln!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    if let Some(r) = explicit_runs {
        a.runs = r;
    }
    if let Some(l) = a
        .links
        .iter()
        .find(|l| !["shaped", "loopback"].contains(&l.as_str()))
    {
        bail!("--links: {l} is not shaped or loopback (the pull-through cache: --pull-through)");
    }
    Ok(a)
}

/// Builds stargz-snapshotter's daemon at `bin` with the shared build script when it is
/// missing (the script takes the binary's path, not its directory).
pub fn ensure_stargz(bin: &Path) {
    if bin.exists() {
        return;
    }
    let script = Path::new("../shared/tools/stargz/build-stargz-grpc.sh");
    if !script.exists() {
        eprintln!(
            "bench: no {} and no {}: the stargz rows will say so",
            bin.display(),
            script.display()
        );
        return;
    }
    eprintln!(
        "bench: building containerd-stargz-grpc ({})",
        script.display()
    );
    match std::process::Command::new("bash")
        .arg(script)
        .arg(bin)
        .status()
    {
        Ok(s) if s.success() && bin.exists() => {}
        other => eprintln!("bench: building containerd-stargz-grpc failed ({other:?})"),
    }
}

/// Everything `BENCHMARKS.json` holds.
#[derive(serde::Serialize, serde::Deserialize)]
struct Report {
    command: String,
    machine: String,
    load_start: String,
    load_end: String,
    elapsed_s: f64,
    images: Vec<ImageResult>,
}

pub fn main(argv: &[String]) -> i32 {
    let res = if argv.first().map(String::as_str) == Some("--report-only") {
        report_only(argv.get(1).map(PathBuf::from))
    } else {
        run(argv)
    };
    match res {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("bench: error: {e:#}");
            1
        }
    }
}

fn report_only(dir: Option<PathBuf>) -> Result<()> {
    let dir = dir.unwrap_or(std::env::current_dir()?);
    let json = dir.join("BENCHMARKS.json");
    let r: Report = serde_json::from_slice(
        &std::fs::read(&json).with_context(|| format!("reading {}", json.display()))?,
    )
    .with_context(|| format!("parsing {}", json.display()))?;
    std::fs::write(dir.join("BENCHMARKS.md"), markdown(&r))?;
    Ok(())
}

fn run(argv: &[String]) -> Result<()> {
    let a = parse(argv)?;
    peer::install_signals()?;
    ensure_stargz(&a.peer.stargz_grpc);
    std::fs::create_dir_all(&a.out)?;
    let started = Instant::now();
    let mut report = Report {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine: machine(),
        load_start: loadavg(),
        load_end: String::new(),
        elapsed_s: 0.0,
        images: Vec::new(),
    };
    for image in &a.images {
        let mut args = peer::Args {
            runs: a.runs,
            links: a.links.clone(),
            image: image.clone(),
            systems: peer::Args::defaults()?.systems,
            out: None,
            json: None,
            stargz_grpc: a.peer.stargz_grpc.clone(),
            fanfill: a.peer.fanfill.clone(),
            cache: a.peer.cache.clone(),
        };
        if *image == a.pull_through {
            args.links.push("pull-through".into());
        }
        args.check()?;
        eprintln!("bench: image {image}, links {}", args.links.join(","));
        let r = peer::run_image_clean(&args).with_context(|| format!("image {image}"))?;
        report.images.push(r);
        report.load_end = loadavg();
        report.elapsed_s = started.elapsed().as_secs_f64();
        std::fs::write(
            a.out.join("BENCHMARKS.json"),
            serde_json::to_string_pretty(&report)?,
        )?;
        std::fs::write(a.out.join("BENCHMARKS.md"), markdown(&report))?;
    }
    eprintln!(
        "bench: wrote {} and {}",
        a.out.join("BENCHMARKS.md").display(),
        a.out.join("BENCHMARKS.json").display()
    );
    Ok(())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |k| k / 1048576.0);
    let ver = |cmd: &str, arg: &str| {
        std::process::Command::new(cmd)
            .arg(arg)
            .output()
            .ok()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_string()
            })
            .unwrap_or_default()
    };
    format!(
        "{cores} × {cpu}, {mem_gib:.0} GiB RAM, Linux {}; {}; {}; {}; runc {}",
        ver("uname", "-r"),
        ver("containerd", "--version"),
        ver("podman", "--version"),
        ver("ctr-remote", "--version"),
        ver("runc", "--version"),
    )
}

/// Median of `f` over the samples of `sys` on `link` in `r`.
fn med(
    r: &ImageResult,
    sys: System,
    link: &str,
    f: fn(&peer::Sample) -> Option<f64>,
) -> Option<f64> {
    let row = r.rows_of(link).find(|x| x.system == sys)?;
    let v: Vec<f64> = row.samples.iter().filter_map(f).collect();
    (!v.is_empty()).then(|| peer::median(&v))
}

fn cell(v: Option<f64>, prec: usize) -> String {
    v.map_or("–".into(), |x| format!("{x:.prec$}"))
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some(a? / b?)
}

/// `met` / `not met` against a goal on a ratio.
fn verdict(v: Option<f64>, ok: impl Fn(f64) -> bool) -> &'static str {
    match v {
        Some(x) if ok(x) => "met",
        Some(_) => "**not met**",
        None => "–",
    }
}

const COLUMNS: [System; 7] = [
    System::Eager,
    System::Podman,
    System::Stargz,
    System::StargzProfile,
    System::Fanfill,
    System::FanfillProfile,
    System::FanfillEstargz,
];

fn markdown(r: &Report) -> String {
    let mut s = String::from("# Benchmarks\n\n");
    s.push_str(&format!(
        "Written by `examples/bench` (`{}`), {:.0} min. Machine: {}. Load average at start \
         `{}`, at end `{}`: the registry, the relay, containerd, the snapshotter daemons and \
         the containers share these cores.\n\n\
         Every system runs as its users run it: containerd's `ctr image pull` + `ctr run` \
         (overlayfs snapshotter), `podman pull` + `podman run`, stargz-snapshotter's \
         `containerd-stargz-grpc` (built from Debian's own Go packages) with `ctr-remote image \
         rpull`, and fanfill's daemon as a containerd snapshotter (`fanfill daemon \
         --containerd-socket`, default settings) with `ctr-remote image rpull`. Profiles: \
         stargz's is `ctr-remote image optimize` running the workload (prioritized files); \
         fanfill's is its access profile, recorded by the publisher with one run of the \
         workload and pushed in the signed index artifact. Raw figures: `BENCHMARKS.json`.\n\n",
        r.command,
        r.elapsed_s / 60.0,
        r.machine,
        r.load_start,
        r.load_end
    ));

    // Summary: time to first output.
    s.push_str(
        "## Time to first output (s, median of the runs)\n\n\
         | image | link | containerd eager | podman | stargz | stargz + prioritized files | \
         **fanfill** | **fanfill + access profile** | fanfill on eStargz | fanfill ÷ stargz | \
         fanfill+profile ÷ stargz+profile | eager ÷ fanfill | eager ÷ fanfill+profile |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let mut goals = String::new();
    for img in &r.images {
        for link in img.links() {
            let fo = |sys| img.first_output(sys, &link);
            let cells: Vec<String> = COLUMNS.iter().map(|c| cell(fo(*c), 2)).collect();
            let ff_sg = ratio(fo(System::Fanfill), fo(System::Stargz));
            let ffp_sgp = ratio(fo(System::FanfillProfile), fo(System::StargzProfile));
            let eager_ff = ratio(fo(System::Eager), fo(System::Fanfill));
            let eager_ffp = ratio(fo(System::Eager), fo(System::FanfillProfile));
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} |\n",
                img.image,
                link,
                cells.join(" | "),
                cell(ff_sg, 2),
                cell(ffp_sgp, 2),
                cell(eager_ff, 1),
                cell(eager_ffp, 1),
            ));
            if link == "shaped" {
                goals.push_str(&format!(
                    "| {} | {:.2}: {} | {:.2}: {} | {:.1}: {} |\n",
                    img.image,
                    ff_sg.unwrap_or(f64::NAN),
                    verdict(ff_sg, |x| x <= 0.7),
                    ffp_sgp.unwrap_or(f64::NAN),
                    verdict(ffp_sgp, |x| x <= 0.5),
                    eager_ffp.unwrap_or(f64::NAN),
                    verdict(eager_ffp, |x| x >= 15.0),
                ));
            }
        }
    }
    if !goals.is_empty() {
        s.push_str(
            "\nGoals on the 1 Gbit/s link (#17): fanfill ≤ 0.7× stargz-snapshotter without \
             profiles, ≤ 0.5× with both profiles, ≥ 15× sooner than containerd's eager pull \
             with its profile.\n\n\
             | image | fanfill ÷ stargz (≤ 0.7) | with profiles (≤ 0.5) | eager ÷ fanfill+profile (≥ 15) |\n\
             |---|---|---|---|\n",
        );
        s.push_str(&goals);
    }

    // Summary: reads, memory.
    s.push_str(
        "\n## Reads and daemons (medians)\n\n\
         Tree first read right after the start (MiB/s), steady-state reads once complete \
         (÷ eager's speed: 1.00 = as fast as containerd's overlayfs tree), the daemons' peak \
         RSS and CPU by the end of the first read. Steady state is measured on the first link \
         listed.\n\n\
         | image | link | first read stargz | first read fanfill | cold stargz | cold fanfill | \
         warm stargz | warm fanfill | fanfill complete after (s) | RSS stargz (MiB) | RSS fanfill | \
         CPU stargz (s) | CPU fanfill |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for img in &r.images {
        let tree = img.tree_bytes as f64 / 1048576.0;
        for link in img.links() {
            let read = |sys| med(img, sys, &link, |x| Some(x.read)).map(|t| tree / t);
            let st = |sys, f: fn(&peer::Steady) -> f64| {
                let row = img.rows_of(&link).find(|x| x.system == sys)?;
                row.samples
                    .iter()
                    .rev()
                    .find_map(|x| x.steady.as_ref().map(f))
            };
            let rel = |sys, f: fn(&peer::Steady) -> f64| ratio(st(System::Eager, f), st(sys, f));
            let cold = |s: &peer::Steady| s.cold_s;
            let warm = |s: &peer::Steady| s.warm_s;
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                img.image,
                link,
                cell(read(System::Stargz), 0),
                cell(read(System::Fanfill), 0),
                cell(rel(System::Stargz, cold), 2),
                cell(rel(System::Fanfill, cold), 2),
                cell(rel(System::Stargz, warm), 2),
                cell(rel(System::Fanfill, warm), 2),
                cell(st(System::Fanfill, |s| s.complete_s), 1),
                cell(
                    med(img, System::Stargz, &link, |x| x.daemon.map(|d| d.hwm_mib)),
                    0
                ),
                cell(
                    med(img, System::Fanfill, &link, |x| x.daemon.map(|d| d.hwm_mib)),
                    0
                ),
                cell(
                    med(img, System::Stargz, &link, |x| x.daemon.map(|d| d.cpu_s)),
                    2
                ),
                cell(
                    med(img, System::Fanfill, &link, |x| x.daemon.map(|d| d.cpu_s)),
                    2
                ),
            ));
        }
    }
    s.push_str(
        "\nGoals (#17): first read ≥ stargz's throughput; steady state ≥ 0.98× eager cold and \
         warm and ≥ 5× stargz's warm; daemon peak RSS ≤ stargz's.\n\n",
    );
    for img in &r.images {
        s.push_str(&peer::report_image(img, "##"));
    }
    s.push_str(peer::LEGEND);
    s.push_str(REPRODUCING);
    s
}

const REPRODUCING: &str = "
## Reproducing

As root on Linux 6.14+ (Debian 12 packages):

```sh
apt-get install -y containerd runc podman stargz-snapshotter docker-registry skopeo \\
    iproute2 e2fsprogs util-linux openssl python3-numpy gcc g++ llvm-14-dev openjdk-17-jre-headless
cargo build --release --bins --examples
./target/release/examples/bench --all       # this file: 3 images, 5 runs, both links, pull-through
./target/release/examples/bench --quick     # the slim image, 3 runs, shaped link
./target/release/examples/bench peer --image python --links shaped --runs 3   # one image
```

`containerd-stargz-grpc` (stargz-snapshotter's daemon; Debian ships only its library and
`ctr-remote`) is built into `target/stargz/` from Debian's Go packages by
`../shared/tools/stargz/build-stargz-grpc.sh` when missing. The images are made of the files
of the packages named in `examples/bench/images.rs` that are installed (`dpkg -L`, plus `ldd`
closures), cached under `/var/tmp/fanfill-peer`; a 12 GiB scratch ext4 image is allocated
there per image. The 1 ms per direction of the shaped link is added by a userspace relay
(this kernel has no `sch_netem`); `tbf` at 1 Gbit/s on both veth ends does the rate.
";
