//! A `fanfill daemon` process for tests: temp socket and state dir, SIGTERM on drop.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fanfill::api::{ImageStatus, LayoutMode, RegistrySettings, Request, Response};
use fanfill::ocibuild::{Compression, LayerItem, write_layout};

use super::{pattern, within};

pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fanfill"))
}

/// A daemon process on a temp socket and state dir; SIGTERM on drop, then its holder quits.
pub struct DaemonProc {
    child: Option<Child>,
    pub socket: PathBuf,
    pub state: PathBuf,
    pub log: PathBuf,
}

impl DaemonProc {
    pub fn start(state: &Path, extra: &[&str]) -> DaemonProc {
        let socket = state.join("api.sock");
        let log = state.join(format!(
            "daemon-{}.log",
            Instant::now().elapsed().as_nanos()
        ));
        let log = log.with_file_name(format!(
            "daemon-{}.log",
            std::fs::read_dir(state).map(|d| d.count()).unwrap_or(0)
        ));
        let child = bin()
            .args(["daemon", "--persist-interval-ms", "100"])
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(state)
            .args(extra)
            .env(
                "FANFILL_LOG",
                std::env::var("FANFILL_TEST_LOG").unwrap_or_else(|_| "fanfill=info".into()),
            )
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let d = DaemonProc {
            child: Some(child),
            socket,
            state: state.to_path_buf(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while fanfill::daemon::call(&d.socket, &Request::Ping).is_err() {
            assert!(
                Instant::now() < deadline,
                "daemon did not come up: {}",
                d.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn call(&self, req: Request) -> Response {
        let s = self.socket.clone();
        within(120, "API call", move || fanfill::daemon::call(&s, &req))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`DaemonProc::call`]; a refusal as its kind and message.
    pub fn try_call(&self, req: Request) -> Result<Response, (fanfill::api::ErrorKind, String)> {
        let s = self.socket.clone();
        match within(120, "API call", move || fanfill::daemon::call(&s, &req)) {
            Ok(r) => Ok(r),
            Err(fanfill::api::ApiError::Daemon { kind, message }) => Err((kind, message)),
            Err(e) => panic!("{e}"),
        }
    }

    pub fn prepare(&self, image: &str, dest: &Path, prefetch: bool) -> ImageStatus {
        self.prepare_with(image, dest, prefetch, RegistrySettings::default())
    }

    /// [`DaemonProc::prepare`] with registry settings (e.g. plain HTTP).
    pub fn prepare_with(
        &self,
        image: &str,
        dest: &Path,
        prefetch: bool,
        registry: RegistrySettings,
    ) -> ImageStatus {
        self.prepare_layout(image, dest, LayoutMode::Direct, prefetch, registry)
    }

    /// A prepare in either layout.
    pub fn prepare_layout(
        &self,
        image: &str,
        dest: &Path,
        mode: LayoutMode,
        prefetch: bool,
        registry: RegistrySettings,
    ) -> ImageStatus {
        match self.call(Request::Prepare {
            image: image.into(),
            dest: dest.into(),
            mode,
            registry,
            prefetch,
        }) {
            Response::Prepared(s) => s,
            r => panic!("{r:?}"),
        }
    }

    /// Waits (at most 20 s) until `ready` holds for the daemon's status.
    pub fn wait_status(&self, what: &str, ready: impl Fn(&fanfill::api::DaemonStatus) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (ds, _) = self.status();
            if ready(&ds) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: {ds:?}\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn status(&self) -> (fanfill::api::DaemonStatus, Vec<ImageStatus>) {
        match self.call(Request::Status { dest: None }) {
            Response::Status { daemon, images } => (daemon, images),
            r => panic!("{r:?}"),
        }
    }

    pub fn kill9(&mut self) {
        let mut c = self.child.take().unwrap();
        c.kill().unwrap();
        let st = c.wait().unwrap();
        assert_eq!(st.signal(), Some(libc::SIGKILL));
    }

    pub fn term_async(&mut self) -> std::thread::JoinHandle<()> {
        let mut c = self.child.take().unwrap();
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        std::thread::spawn(move || {
            let _ = c.wait();
        })
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = within(30, "daemon stop", move || c.wait());
        }
    }
}

impl Drop for DaemonProc {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!(
                "--- daemon log {} ---\n{}",
                self.log.display(),
                self.log_text()
            );
        }
        stop_holder(&self.state);
    }
}

/// The daemon's Prometheus text from `--metrics-addr ADDR` (the whole HTTP answer).
pub fn get_metrics(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut s = String::new();
    c.read_to_string(&mut s).unwrap();
    s
}

/// Stops the fd holder of the daemon with state dir `state` (its group closes). The holder
/// serves only root processes of the fanfill binary, not this test program: it is sent
/// SIGTERM, by its recorded pid, once that pid is checked to be a holder on this state
/// dir's socket.
pub fn stop_holder(state: &Path) {
    fanfill::daemon::holder::terminate(state);
}

/// The holder's fanotify group fd as `/proc/PID/fdinfo/FD`: number of inode marks.
pub fn holder_marks(state: &Path) -> usize {
    let pid = std::fs::read_to_string(state.join("holder.pid")).unwrap();
    let pid = pid.trim();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        if std::fs::read_link(e.path()).is_ok_and(|l| l.as_os_str() == "anon_inode:[fanotify]") {
            let info = std::fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                e.file_name().to_string_lossy()
            ))
            .unwrap();
            return info
                .lines()
                .filter(|l| l.starts_with("fanotify ino:"))
                .count();
        }
    }
    panic!("holder {pid} holds no fanotify group");
}

/// An image of `n` files of ~1 MiB (content `pattern(len, seed0 + i)`) plus a directory.
pub fn build_image(
    dir: &Path,
    tag: &str,
    n: usize,
    seed0: u64,
) -> (String, Vec<(String, Vec<u8>)>) {
    build_image_sized(dir, tag, n, seed0, |i| (1 << 20) + 4096 * i + 17)
}

/// An image of `n` files `data/fNN.bin` of `size(i)` bytes (content `pattern(len, seed0 + i)`).
pub fn build_image_sized(
    dir: &Path,
    tag: &str,
    n: usize,
    seed0: u64,
    size: impl Fn(usize) -> usize,
) -> (String, Vec<(String, Vec<u8>)>) {
    let mut items = vec![LayerItem::Dir {
        path: "data".into(),
        mode: 0o755,
    }];
    let mut files = Vec::new();
    for i in 0..n {
        let data = pattern(size(i), seed0 + i as u64);
        let path = format!("data/f{i:02}.bin");
        items.push(LayerItem::File {
            path: path.clone(),
            mode: 0o644,
            data: data.clone(),
        });
        files.push((path, data));
    }
    let built = write_layout(dir, tag, &[items], Compression::Gzip).unwrap();
    (built.reference(), files)
}
