//! The fanfill side of a run, in a child process of its own (so that its peak RSS is the
//! daemon's alone): `bench __serve` starts an engine, then takes one JSON command a line on
//! stdin and answers one JSON line on stdout: `prepare`, `stats`, `fill_all`, `quit`.
//! End of input ends it (unmounting what it mounted).

use std::io::{BufRead, Write};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use fanfill::fill::{Engine, EngineConfig};
use fanfill::image::{self, PrepareOptions, Prepared};
use fanfill::overlay::OverlayWatcher;
use fanfill::unpack::Mode;
use serde_json::{Value, json};

pub fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU time this process used so far (user + system, all threads).
pub fn cpu_s() -> f64 {
    proc_cpu_s(std::process::id())
}

/// CPU time process `pid` used so far (user + system, all threads), from `/proc/PID/stat`
/// (clock ticks of 10 ms); 0 when it cannot be read.
pub fn proc_cpu_s(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the command's closing parenthesis: utime and stime are 12 and 13.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
            Some(ticks as f64 / 100.0)
        })
        .unwrap_or(0.0)
}

/// Seconds of CPU steal (the hypervisor running something else on this VM's CPUs) and of
/// I/O wait since boot, summed over CPUs, from `/proc/stat` (ticks of 10 ms).
pub fn steal_iowait_s() -> (f64, f64) {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let f: Vec<u64> = s
                .lines()
                .next()?
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            Some((*f.get(7)? as f64 / 100.0, *f.get(4)? as f64 / 100.0))
        })
        .unwrap_or((0.0, 0.0))
}

struct State {
    prepared: Option<Prepared>,
    watch: Option<OverlayWatcher>,
    merged: Option<PathBuf>,
    /// [`cpu_s`] when the prepare started: figures count from there.
    cpu_base: f64,
}

fn stats_json(engine: &Engine, st: &State) -> Value {
    let s = engine.stats();
    json!({
        "files": s.files, "files_complete": s.files_complete, "bytes_total": s.bytes_total,
        "bytes_filled": s.bytes_filled, "engine_bytes_fetched": s.bytes_fetched,
        "events": s.events, "fills": s.fills, "errors": s.errors,
        "latency_p50_us": s.latency_p50_us, "latency_p99_us": s.latency_p99_us,
        "store_bytes": st.prepared.as_ref().map(|p| p.store.bytes_fetched()).unwrap_or(0),
        "requests": st.prepared.as_ref().map(|p| p.store.stats().requests()).unwrap_or(0),
        "opens": st.watch.as_ref().map(|w| w.opens()).unwrap_or(0),
        "vm_hwm_kib": vm_hwm_kib(),
        "cpu_s": cpu_s() - st.cpu_base,
    })
}

fn unmount(st: &mut State) {
    if let Some(m) = st.merged.take() {
        let _ = Command::new("umount").arg("-l").arg(&m).status();
    }
    st.watch = None;
}

/// The child's main loop.
pub fn serve_main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    // A daemon is up long before a pull, and its TLS setup (`fanfill::registry::warm_up`,
    // about 30 ms of CPU once per process) is over by then.
    fanfill::registry::set_up_tls();
    let engine = Engine::start(EngineConfig::default())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut st = State {
        prepared: None,
        watch: None,
        merged: None,
        cpu_base: 0.0,
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", json!({"up": true}))?;
    out.flush()?;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let cmd: Value = serde_json::from_str(&line)?;
        let reply = match handle(&engine, &rt, &mut st, &cmd) {
            Ok(v) => v,
            Err(e) => json!({"error": format!("{e:#}")}),
        };
        writeln!(out, "{reply}")?;
        out.flush()?;
        if cmd["cmd"] == "quit" {
            break;
        }
    }
    unmount(&mut st);
    engine.shutdown();
    Ok(())
}

fn handle(
    engine: &Engine,
    rt: &tokio::runtime::Runtime,
    st: &mut State,
    cmd: &Value,
) -> Result<Value> {
    match cmd["cmd"].as_str().unwrap_or("") {
        "prepare" => {
            st.cpu_base = cpu_s();
            let t = Instant::now();
            let s = |k: &str| cmd[k].as_str().map(PathBuf::from).ok_or(anyhow!("no {k}"));
            let dest = s("dest")?;
            let mut opts = PrepareOptions::new(s("index_dir")?);
            opts.registry.insecure = true;
            opts.use_artifact = cmd["use_artifact"].as_bool().unwrap_or(true);
            opts.profile_prefetch = cmd["profile_prefetch"].as_u64().unwrap_or(0) as usize;
            let overlay = cmd["mode"] == "overlay";
            opts.mode = if overlay { Mode::Overlay } else { Mode::Direct };
            if cmd["record"].as_bool().unwrap_or(false) {
                // Every file the workload reads must miss to be recorded.
                opts = opts.for_recording();
            }
            let reference = cmd["reference"].as_str().ok_or(anyhow!("no reference"))?;
            let prepared = rt.block_on(image::prepare(engine, reference, &dest, &opts))?;
            let prepare_ms = t.elapsed().as_secs_f64() * 1e3;
            if overlay {
                let (upper, work, merged) = (s("upper")?, s("work")?, s("merged")?);
                let o = format!(
                    "lowerdir={},upperdir={},workdir={}",
                    prepared.unpacked.lowerdir_option(),
                    upper.display(),
                    work.display()
                );
                let ok = Command::new("mount")
                    .args(["-t", "overlay", "overlay", "-o", &o])
                    .arg(&merged)
                    .status()?
                    .success();
                if !ok {
                    bail!("mounting overlay at {}", merged.display());
                }
                st.merged = Some(merged.clone());
                let dev = std::fs::metadata(&dest)?.dev();
                st.watch = Some(OverlayWatcher::start_on(engine, &merged, dev)?);
            }
            let u = &prepared.unpacked.stats;
            let origins: Vec<&str> = prepared.index_origins.iter().map(|o| o.as_str()).collect();
            let v = json!({
                "prepare_ms": prepare_ms,
                "ready_ms": t.elapsed().as_secs_f64() * 1e3,
                "bytes_before_ready": prepared.bytes_before_ready,
                "image_size": prepared.image_size,
                "placeholders": prepared.files.len(),
                "dirs": u.dirs, "reg_files": u.files, "symlinks": u.symlinks,
                "hardlinks": u.hardlinks, "whiteouts": u.whiteouts,
                "origins": origins, "profile_files": prepared.profile_files,
            });
            st.prepared = Some(prepared);
            Ok(v)
        }
        "stats" => Ok(stats_json(engine, st)),
        "profile" => {
            let prepared = st
                .prepared
                .as_ref()
                .ok_or_else(|| anyhow!("profile: nothing prepared"))?;
            Ok(serde_json::to_value(prepared.access_profile(engine))?)
        }
        "fill_all" => {
            let t = Instant::now();
            // The library's background completion: each layer streamed once into its
            // placeholders, then range fills for whatever is left.
            let prepared = st
                .prepared
                .as_ref()
                .ok_or_else(|| anyhow!("fill_all: nothing prepared"))?;
            let streamed = prepared
                .prefetch(engine, 4)
                .map_err(|e| anyhow!("fill_all: {}", fanfill::fill::error_chain(&e)))?;
            let mut v = stats_json(engine, st);
            v["fill_all_ms"] = json!(t.elapsed().as_secs_f64() * 1e3);
            v["streamed_bytes"] = json!(streamed.bytes_written);
            Ok(v)
        }
        "quit" => {
            let v = stats_json(engine, st);
            unmount(st);
            Ok(v)
        }
        other => bail!("unknown command {other:?}"),
    }
}

/// The parent's handle on a serve child.
pub struct Serve {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl Serve {
    pub fn spawn(log: &std::path::Path) -> Result<Serve> {
        let exe = std::env::current_exe()?;
        let log = std::fs::File::create(log)?;
        let mut child = Command::new(exe)
            .arg("__serve")
            .env(
                "RUST_LOG",
                std::env::var("FANFILL_BENCH_LOG").unwrap_or_else(|_| "fanfill=warn".into()),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("spawning serve child")?;
        crate::cleanup::add_pid(child.id());
        let stdout = child.stdout.take().expect("piped");
        let stdin = child.stdin.take();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut s = Serve {
            child,
            stdin,
            lines: rx,
        };
        let up = s.recv(Duration::from_secs(30))?;
        if up["up"] != true {
            bail!("serve child did not start: {up}");
        }
        Ok(s)
    }

    fn recv(&mut self, timeout: Duration) -> Result<Value> {
        let line = self
            .lines
            .recv_timeout(timeout)
            .map_err(|_| anyhow!("serve child: no answer within {timeout:?}"))?;
        let v: Value = serde_json::from_str(&line)?;
        if let Some(e) = v.get("error") {
            bail!("serve child: {}", e.as_str().unwrap_or(""));
        }
        Ok(v)
    }

    pub fn call(&mut self, cmd: Value, timeout: Duration) -> Result<Value> {
        let stdin = self.stdin.as_mut().ok_or(anyhow!("serve child closed"))?;
        writeln!(stdin, "{cmd}")?;
        stdin.flush()?;
        self.recv(timeout)
    }

    /// Quits (bounded), returning the final stats.
    pub fn quit(mut self) -> Result<Value> {
        let v = self.call(json!({"cmd": "quit"}), Duration::from_secs(30));
        self.stdin = None;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        crate::cleanup::remove_pid(self.child.id());
        v
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stdin = None;
            std::thread::sleep(Duration::from_millis(200));
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
