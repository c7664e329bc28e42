//! A private containerd for tests (Debian's `containerd` 1.6): its own root, state, socket
//! and config file, a unique namespace, fanfill registered as proxy snapshotter `fanfill`;
//! killed on drop. The runc shim still uses `/run/containerd/{s,fifo,runc}` (shared with any
//! other containerd on the machine; the namespace keeps tests apart).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub struct Containerd {
    child: Option<Child>,
    pub socket: PathBuf,
    pub namespace: String,
    pub log: PathBuf,
    pub root: PathBuf,
}

impl Containerd {
    /// Starts containerd with `root` (on a real filesystem: the overlayfs snapshotter keeps
    /// its upper directories there) and everything else in `dir`, with the proxy
    /// snapshotter `fanfill` at `snapshotter_socket`. `cri`: the CRI plugin's configuration
    /// (TOML appended to the config file); `None` turns the plugin off.
    pub fn start(
        root: &Path,
        dir: &Path,
        snapshotter_socket: &Path,
        cri: Option<&str>,
    ) -> Containerd {
        std::fs::create_dir_all(root).unwrap();
        std::fs::create_dir_all(dir).unwrap();
        let socket = dir.join("containerd.sock");
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = [{disabled}]

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{sock}.ttrpc"

[proxy_plugins]
  [proxy_plugins.fanfill]
    type = "snapshot"
    address = "{snap}"

{cri}
"#,
                disabled = if cri.is_some() {
                    ""
                } else {
                    "\"io.containerd.grpc.v1.cri\""
                },
                cri = cri.unwrap_or_default(),
                root = root.display(),
                state = dir.join("state").display(),
                sock = socket.display(),
                snap = snapshotter_socket.display(),
            ),
        )
        .unwrap();
        let log = dir.join("containerd.log");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .args(["--log-level", "debug"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("containerd");
        let namespace = format!("fanfill-test-{}", std::process::id());
        let c = Containerd {
            child: Some(child),
            socket,
            namespace,
            log,
            root: root.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = c.ctr_output("ctr", &["version"]);
            if out.status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "containerd did not come up: {}",
                c.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        c
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `tool` (`ctr` or `ctr-remote`) against this containerd and namespace, bounded
    /// to 300 s.
    pub fn ctr_output(&self, tool: &str, args: &[&str]) -> Output {
        self.ctr_output_in(&self.namespace, tool, args)
    }

    /// [`Containerd::ctr_output`] in namespace `ns` (`k8s.io` for what CRI made).
    pub fn ctr_output_in(&self, ns: &str, tool: &str, args: &[&str]) -> Output {
        Command::new("timeout")
            .args(["300", tool, "--address"])
            .arg(&self.socket)
            .args(["--namespace", ns])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect(tool)
    }

    /// [`Containerd::ctr_output`] that must succeed; returns stdout.
    pub fn ctr(&self, tool: &str, args: &[&str]) -> String {
        let out = self.ctr_output(tool, args);
        assert!(
            out.status.success(),
            "{tool} {args:?} failed: {}{}\n--- containerd log (tail) ---\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            tail(&self.log_text(), 40)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// The last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
