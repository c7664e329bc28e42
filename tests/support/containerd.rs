//! A private containerd for tests: Debian's `containerd` started with its own root, state,
//! sockets and config in a temp dir, a namespace of its own, killed by its pid when dropped.
//!
//! Use it with `#[path = "support/containerd.rs"] mod containerd;`. The CRI plugin is
//! disabled (no pause image, no CNI needed) unless started with
//! [`Containerd::start_with_cri`]. Only the runc shim writes outside the temp dir
//! (`/run/containerd/{s,fifo,runc}`, fixed by containerd): a test that runs containers should
//! use the namespace [`Containerd::namespace`] and remove its containers itself.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A running containerd.
pub struct Containerd {
    /// The gRPC socket (`ctr -a`, `ctr-remote -a`).
    pub socket: PathBuf,
    /// The namespace commands run in.
    pub namespace: String,
    dir: tempfile::TempDir,
    child: Child,
}

impl Containerd {
    /// Starts containerd (`proxy_plugins` TOML appended verbatim to its config, may be empty)
    /// and waits until `ctr version` answers (at most 60 s).
    pub fn start_with(extra_config: &str) -> Containerd {
        Self::start_inner(extra_config, false)
    }

    /// [`Containerd::start_with`] with the CRI plugin on (`extra_config` configures it:
    /// sandbox image, snapshotter, registry).
    pub fn start_with_cri(extra_config: &str) -> Containerd {
        Self::start_inner(extra_config, true)
    }

    fn start_inner(extra_config: &str, cri: bool) -> Containerd {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let socket = d.join("containerd.sock");
        let disabled = if cri {
            ""
        } else {
            "\"io.containerd.grpc.v1.cri\""
        };
        let config = format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
             disabled_plugins = [{disabled}]\n\
             [grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n\
             [debug]\n  address = \"{debug}\"\n  level = \"info\"\n\
             [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{opt}\"\n{extra_config}\n",
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = socket.display(),
            debug = d.join("debug.sock").display(),
            opt = d.join("opt").display(),
        );
        let config_path = d.join("config.toml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(d.join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn containerd (Debian package containerd)");
        // Namespaces are `[A-Za-z0-9]+` joined by single `.`, `_` or `-`.
        let suffix: String = d
            .file_name()
            .unwrap()
            .to_string_lossy()
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .collect();
        let namespace = format!("fanfill-test-{}", suffix.to_lowercase());
        let mut c = Containerd {
            socket,
            namespace,
            dir,
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = c.child.try_wait() {
                panic!("containerd exited ({status}):\n{}", c.log());
            }
            let ok = Command::new("ctr")
                .arg("-a")
                .arg(&c.socket)
                .arg("version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return c;
            }
            assert!(
                Instant::now() < deadline,
                "containerd did not answer within 60 s:\n{}",
                c.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts a plain containerd.
    pub fn start() -> Containerd {
        Self::start_with("")
    }

    /// Its temp dir (root, state, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// `TOOL -a SOCKET -n NAMESPACE ARGS` (`ctr` or `ctr-remote`) under a 300 s timeout.
    pub fn run(&self, tool: &str, args: &[&str]) -> Output {
        self.run_in(&self.namespace, tool, args)
    }

    /// [`Containerd::run`] in namespace `ns` (`k8s.io`: what the CRI plugin made).
    pub fn run_in(&self, ns: &str, tool: &str, args: &[&str]) -> Output {
        Command::new("timeout")
            .arg("300")
            .arg(tool)
            .arg("-a")
            .arg(&self.socket)
            .args(["-n", ns])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run {tool}: {e}"))
    }

    /// [`Containerd::run`], panicking with its output when it fails; returns stdout.
    pub fn must(&self, tool: &str, args: &[&str]) -> String {
        succeeded(tool, args, self.run(tool, args))
    }
}

/// The stdout of a command (`tool args`) that must have succeeded; panics with its output
/// otherwise.
pub fn succeeded(tool: &str, args: &[&str], out: Output) -> String {
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // SIGTERM by pid, then SIGKILL if it lingers.
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // The runc shim's per-namespace state dir, outside the temp dir (empty once the
        // namespace's containers are gone; left alone otherwise).
        let _ = std::fs::remove_dir(Path::new("/run/containerd/runc").join(&self.namespace));
    }
}
