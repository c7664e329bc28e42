//! A `fanfill daemon` process for tests: temp socket and state dir, SIGTERM on drop.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fanfill::api::{ImageStatus, LayoutMode, RegistrySettings, Request, Response};

use super::within;

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

    pub fn prepare(&self, image: &str, dest: &Path, prefetch: bool) -> ImageStatus {
        match self.call(Request::Prepare {
            image: image.into(),
            dest: dest.into(),
            mode: LayoutMode::Direct,
            registry: RegistrySettings::default(),
            prefetch,
        }) {
            Response::Prepared(s) => s,
            r => panic!("{r:?}"),
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
        let _ = fanfill::daemon::holder::quit(&self.state.join("holder.sock"));
    }
}
