//! The link between the containers' host and the registry: a `docker-registry` in a network
//! namespace of our own behind a veth pair, `tc tbf` at 1 Gbit/s on both ends, and a
//! userspace relay on 127.0.0.1 that delays every byte by 1 ms in each direction (the
//! kernel here is built without `sch_netem`). Unshaped: the qdiscs removed, clients talk to
//! the registry's veth address directly.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub const NETNS: &str = "ffbench";
const VETH_HOST: &str = "ffb0";
const VETH_NS: &str = "ffb1";
/// Addresses of the two veth ends; both exist only on this machine, one of them inside
/// the namespace the harness creates.
const HOST_ADDR: &str = "10.231.7.1";
pub const REGISTRY_ADDR: &str = "10.231.7.2";
pub const REGISTRY_PORT: u16 = 5000;

pub fn sh(args: &[&str]) -> Result<()> {
    let out = Command::new("timeout")
        .args(["-k", "5", "30"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {args:?}"))?;
    if !out.status.success() {
        bail!(
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Removes the namespace, veth and qdiscs (best effort; also clears a crashed run's leftovers).
pub fn teardown() {
    let _ = sh(&["ip", "link", "del", VETH_HOST]);
    let _ = sh(&["ip", "netns", "del", NETNS]);
}

pub fn setup() -> Result<()> {
    teardown();
    sh(&["ip", "netns", "add", NETNS])?;
    sh(&[
        "ip", "link", "add", VETH_HOST, "type", "veth", "peer", "name", VETH_NS, "netns", NETNS,
    ])?;
    sh(&[
        "ip",
        "addr",
        "add",
        &format!("{HOST_ADDR}/30"),
        "dev",
        VETH_HOST,
    ])?;
    sh(&["ip", "link", "set", VETH_HOST, "up"])?;
    sh(&[
        "ip",
        "-n",
        NETNS,
        "addr",
        "add",
        &format!("{REGISTRY_ADDR}/30"),
        "dev",
        VETH_NS,
    ])?;
    sh(&["ip", "-n", NETNS, "link", "set", VETH_NS, "up"])?;
    sh(&["ip", "-n", NETNS, "link", "set", "lo", "up"])?;
    Ok(())
}

/// `tc tbf` at `rate` on both veth ends (or none).
pub fn shape(rate: Option<&str>) -> Result<()> {
    let _ = sh(&["tc", "qdisc", "del", "dev", VETH_HOST, "root"]);
    let _ = sh(&[
        "ip", "netns", "exec", NETNS, "tc", "qdisc", "del", "dev", VETH_NS, "root",
    ]);
    if let Some(rate) = rate {
        let tbf = ["tbf", "rate", rate, "burst", "256kb", "latency", "50ms"];
        let mut a = vec!["tc", "qdisc", "add", "dev", VETH_HOST, "root"];
        a.extend(tbf);
        sh(&a)?;
        let mut b = vec![
            "ip", "netns", "exec", NETNS, "tc", "qdisc", "add", "dev", VETH_NS, "root",
        ];
        b.extend(tbf);
        sh(&b)?;
    }
    Ok(())
}

/// The registry, killed on drop.
pub struct Registry {
    child: Child,
}

impl Registry {
    pub fn start(storage: &Path, work: &Path) -> Result<Registry> {
        std::fs::create_dir_all(storage)?;
        std::fs::create_dir_all(work)?;
        let root = format!("    rootdirectory: {}", storage.display());
        let addr = format!("  addr: {REGISTRY_ADDR}:{REGISTRY_PORT}");
        let config = [
            "version: 0.1",
            "log:",
            "  level: warn",
            "  accesslog:",
            "    disabled: true",
            "storage:",
            "  filesystem:",
            &root,
            "  delete:",
            "    enabled: true",
            // As in the Debian package's /etc/docker/registry/config.yml: blob descriptors
            // cached in memory instead of read from the storage on every request.
            "  cache:",
            "    blobdescriptor: inmemory",
            "http:",
            &addr,
            "",
        ]
        .join("\n");
        let cfg = work.join("registry.yml");
        std::fs::write(&cfg, config)?;
        let log = std::fs::File::create(work.join("registry.log"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", NETNS, "docker-registry", "serve"])
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning docker-registry (Debian package docker-registry)")?;
        let reg = Registry { child };
        let addr: SocketAddr = format!("{REGISTRY_ADDR}:{REGISTRY_PORT}").parse()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = s.write_all(b"GET /v2/ HTTP/1.0\r\n\r\n");
                let mut buf = [0u8; 12];
                if s.read_exact(&mut buf).is_ok() && buf.starts_with(b"HTTP/1.") {
                    return Ok(reg);
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "docker-registry did not answer within 20 s (log: {})",
            work.join("registry.log").display()
        )
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The registry's address on the unshaped path.
pub fn direct_host() -> String {
    format!("{REGISTRY_ADDR}:{REGISTRY_PORT}")
}

/// A TCP relay on 127.0.0.1 to the registry that holds every chunk it forwards for `delay`
/// (in each direction): a fixed one-way latency that does not limit bandwidth.
pub struct DelayProxy {
    pub addr: SocketAddr,
}

impl DelayProxy {
    pub fn start(upstream: SocketAddr, delay: Duration) -> Result<DelayProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(client) = conn else { continue };
                let Ok(server) = TcpStream::connect_timeout(&upstream, Duration::from_secs(5))
                else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (c2, s2) = match (client.try_clone(), server.try_clone()) {
                    (Ok(c), Ok(s)) => (c, s),
                    _ => continue,
                };
                pipe(client, server, delay);
                pipe(s2, c2, delay);
            }
        });
        Ok(DelayProxy { addr })
    }

    pub fn host(&self) -> String {
        self.addr.to_string()
    }
}

/// Forwards `from` to `to`, each chunk released `delay` after it arrived.
fn pipe(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 256 << 10];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx
                        .send((Instant::now() + delay, buf[..n].to_vec()))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
        let _ = from.shutdown(Shutdown::Read);
    });
    std::thread::spawn(move || {
        while let Ok((due, data)) = rx.recv() {
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if to.write_all(&data).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

/// Where the harness keeps things that outlive one run.
pub fn storage_dir(cache: &Path) -> PathBuf {
    cache.join("registry")
}
