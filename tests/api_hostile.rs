//! Issue #7, hostile input on the daemon's socket: malformed and oversized lines, unknown
//! requests, wrong types, destinations outside the allowed roots, relative, symlinked, `/`
//! or the state dir, and conflicting requests racing each other. Each gets a clear error,
//! the daemon keeps serving other clients, and nothing outside a destination is touched.

mod fsutil;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fanfill::api::{ErrorKind, LayoutMode, RegistrySettings, Request, Response};
use fsutil::daemonproc::{DaemonProc, build_image};
use fsutil::within;

/// One raw connection to the daemon.
struct Raw {
    r: BufReader<UnixStream>,
}

impl Raw {
    fn connect(sock: &Path) -> Raw {
        let s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Raw {
            r: BufReader::new(s),
        }
    }

    /// Sends `bytes` as they are; returns the answer line (None: connection closed).
    fn send(&mut self, bytes: &[u8]) -> Option<Response> {
        self.r.get_mut().write_all(bytes).ok()?;
        self.answer()
    }

    fn answer(&mut self) -> Option<Response> {
        let mut line = String::new();
        match self.r.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))),
        }
    }
}

fn error_kind(r: &Response) -> Option<(ErrorKind, String)> {
    match r {
        Response::Error { kind, message } => Some((*kind, message.clone())),
        _ => None,
    }
}

/// Calls the daemon; a refusal as its kind and message.
fn try_call(d: &DaemonProc, req: Request) -> Result<Response, (ErrorKind, String)> {
    d.try_call(req)
}

fn prepare_req(image: &str, dest: &Path) -> Request {
    Request::Prepare {
        image: image.into(),
        dest: dest.into(),
        mode: LayoutMode::Direct,
        registry: RegistrySettings::default(),
        prefetch: false,
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A listing of `dir` (names), to show nothing was created or deleted there.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn hostile_lines_get_errors_and_the_daemon_keeps_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let (reference, files) = build_image(&tmp.path().join("img"), "1", 2, 5100);
    let d = DaemonProc::start(&state, &[]);
    let served = tmp.path().join("served");
    d.prepare(&reference, &served, false);
    let pid = d.status().0.pid;
    let rss0 = rss_kib(pid);
    let mut table: Vec<(String, usize, String)> = Vec::new();

    // Lines that do not parse, on one connection that must stay usable.
    let mut c = Raw::connect(&d.socket);
    let bad: &[(&str, &[u8])] = &[
        ("malformed JSON", b"{\"Prepare\":\n"),
        ("not JSON", b"hello daemon\n"),
        ("empty line", b"\n"),
        ("unknown request type", b"{\"Format\":{\"dest\":\"/\"}}\n"),
        (
            "wrong field types",
            b"{\"Prepare\":{\"image\":5,\"dest\":true}}\n",
        ),
        ("wrong type in Status", b"{\"Status\":{\"dest\":42}}\n"),
        ("Remove without dest", b"{\"Remove\":{}}\n"),
        ("invalid UTF-8", b"{\"Ping\xff\xfe\":null}\n"),
        ("NUL bytes", b"\0\0\0\0\n"),
        ("deeply nested JSON", &[b'['; 10_000]),
    ];
    for (what, line) in bad {
        let mut line = line.to_vec();
        if line.last() != Some(&b'\n') {
            line.push(b'\n');
        }
        let r = c
            .send(&line)
            .unwrap_or_else(|| panic!("{what}: connection dropped"));
        let (kind, msg) = error_kind(&r).unwrap_or_else(|| panic!("{what}: {r:?}"));
        assert_eq!(kind, ErrorKind::BadRequest, "{what}: {msg}");
        assert!(msg.starts_with("bad request"), "{what}: {msg}");
        // The same connection still serves.
        let r = c.send(b"\"Ping\"\n").unwrap();
        assert!(matches!(r, Response::Ok), "{what}: then {r:?}");
        table.push((
            what.to_string(),
            1,
            format!("BadRequest: {}", &msg[..msg.len().min(60)]),
        ));
    }

    // A huge line with no newline: bounded memory, an error, the connection dropped.
    let mut big = Raw::connect(&d.socket);
    let writer = big.r.get_ref().try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let mut w = writer;
        let chunk = vec![b'a'; 1 << 20];
        let mut sent = 0usize;
        for _ in 0..256 {
            if w.write_all(&chunk).is_err() {
                break;
            }
            sent += chunk.len();
        }
        sent
    });
    let r = within(60, "answer to a huge line", move || {
        let r = big.answer();
        let after = big.answer();
        (r, after)
    });
    let sent = sender.join().unwrap();
    let (kind, msg) = error_kind(r.0.as_ref().expect("an error before the drop")).unwrap();
    assert_eq!(kind, ErrorKind::BadRequest, "{msg}");
    assert!(msg.contains("longer than"), "{msg}");
    assert!(r.1.is_none(), "the connection must be dropped");
    let rss1 = rss_kib(pid);
    assert!(
        rss1 < rss0 + 32 * 1024,
        "daemon RSS grew from {rss0} to {rss1} KiB on a huge line"
    );
    assert!(sent < 256 << 20, "the daemon read all 256 MiB");
    table.push((
        "256 MiB line, no newline".into(),
        1,
        format!(
            "BadRequest ({msg}), dropped after {} MiB sent; RSS {rss0} -> {rss1} KiB",
            sent >> 20
        ),
    ));

    // Idle connections do not starve others.
    let idle: Vec<UnixStream> = (0..200)
        .map(|_| UnixStream::connect(&d.socket).unwrap())
        .collect();
    let t = Instant::now();
    assert!(matches!(d.call(Request::Ping), Response::Ok));
    table.push((
        "200 idle connections".into(),
        200,
        format!("a new client served in {} ms", t.elapsed().as_millis()),
    ));
    drop(idle);

    // The served image still serves.
    let got = std::fs::read(served.join(&files[0].0)).unwrap();
    assert!(got == files[0].1);
    eprintln!("| input | count | outcome |\n|---|---|---|");
    for (what, n, outcome) in &table {
        eprintln!("| {what} | {n} | {outcome} |");
    }
}

#[test]
fn destinations_outside_allowed_roots_are_refused_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let (reference, files) = build_image(&tmp.path().join("img"), "1", 2, 5200);
    let d = DaemonProc::start(&state, &[]);
    let etc_before = listing(Path::new("/etc"));
    let root_before = listing(Path::new("/"));
    let cwd_before = listing(Path::new("."));
    let link_etc = tmp.path().join("to-etc");
    std::os::unix::fs::symlink("/etc", &link_etc).unwrap();
    let real = tmp.path().join("real");
    std::fs::create_dir_all(&real).unwrap();
    let link_ok = tmp.path().join("to-real");
    std::os::unix::fs::symlink(&real, &link_ok).unwrap();
    let cases: Vec<(&str, PathBuf)> = vec![
        ("dest = /", "/".into()),
        ("dest = /etc", "/etc".into()),
        (
            "dest under /etc (would be created)",
            "/etc/fanfill-hostile".into(),
        ),
        ("dest under /usr/lib", "/usr/lib/fanfill-hostile".into()),
        ("dest = the state dir", state.clone()),
        ("dest inside the state dir", state.join("images/x")),
        (
            "dest = an ancestor of the state dir",
            tmp.path().to_path_buf(),
        ),
        ("relative dest", "fanfill-hostile-rel".into()),
        (
            "dest with ..",
            tmp.path().join("x/../../../etc/fanfill-hostile"),
        ),
        ("symlink to /etc", link_etc.join("fanfill-hostile")),
        (
            "dest inside a served tree",
            tmp.path().join("served/data/sub"),
        ),
        ("dest = /proc", "/proc/fanfill".into()),
    ];
    d.prepare(&reference, &tmp.path().join("served"), false);
    let state_before = listing(&state);
    let mut table = Vec::new();
    for (what, dest) in &cases {
        let (kind, msg) = try_call(&d, prepare_req(&reference, dest))
            .err()
            .unwrap_or_else(|| panic!("{what}: accepted"));
        assert!(
            matches!(
                kind,
                ErrorKind::BadRequest | ErrorKind::AlreadyServed | ErrorKind::DestNotEmpty
            ),
            "{what}: {kind:?} {msg}"
        );
        table.push((what.to_string(), format!("{kind:?}: {msg}")));
    }
    for req in [
        Request::Remove {
            dest: "served".into(),
        },
        Request::Status {
            dest: Some("served".into()),
        },
        Request::Prefetch {
            dest: "served".into(),
            enable: true,
        },
    ] {
        let (kind, msg) = try_call(&d, req).expect_err("relative dest");
        assert_eq!(kind, ErrorKind::BadRequest, "{msg}");
        table.push((
            "relative dest in rm/status/prefetch".into(),
            format!("{kind:?}: {msg}"),
        ));
    }
    assert_eq!(listing(Path::new("/etc")), etc_before, "/etc was touched");
    assert_eq!(listing(Path::new("/")), root_before, "/ was touched");
    assert_eq!(
        listing(Path::new(".")),
        cwd_before,
        "the daemon's cwd was touched"
    );
    assert!(!Path::new("/usr/lib/fanfill-hostile").exists());
    assert_eq!(listing(&state), state_before);
    assert!(!state.join("images/x").exists());
    // A symlink to an allowed directory is served at its real path.
    let in_state = d.prepare(&reference, &state.join("roots/app"), false);
    assert_eq!(in_state.files, 2);
    table.push((
        "STATE_DIR/roots/app".into(),
        format!("served at {}", in_state.dest.display()),
    ));
    let s = d.prepare(&reference, &link_ok, false);
    assert_eq!(s.dest, real.canonicalize().unwrap());
    assert!(std::fs::read(real.join(&files[1].0)).unwrap() == files[1].1);
    table.push((
        "symlink to an allowed dir".into(),
        format!("served at {}", s.dest.display()),
    ));
    // A configured allow-list: only under it.
    let mut d = d;
    d.stop();
    let only = tmp.path().join("only");
    std::fs::create_dir_all(&only).unwrap();
    let d2 = DaemonProc::start(&state, &["--allow-root", only.to_str().unwrap()]);
    let (kind, msg) = try_call(&d2, prepare_req(&reference, &tmp.path().join("elsewhere")))
        .expect_err("outside the configured root");
    assert_eq!(kind, ErrorKind::BadRequest);
    assert!(msg.contains("allowed roots"), "{msg}");
    assert!(!tmp.path().join("elsewhere").exists());
    table.push(("outside --allow-root".into(), format!("{kind:?}: {msg}")));
    let s = d2.prepare(&reference, &only.join("root"), false);
    assert_eq!(s.files, 2);
    eprintln!("| destination | outcome |\n|---|---|");
    for (what, outcome) in &table {
        eprintln!("| {what} | {outcome} |");
    }
}

#[test]
fn conflicting_requests_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let (reference, files) = build_image(&tmp.path().join("img"), "1", 8, 5300);
    let d = DaemonProc::start(&state, &[]);
    let sock = d.socket.clone();
    let call = move |req: Request| {
        let s = sock.clone();
        std::thread::spawn(move || fanfill::api::Client::connect(&s).unwrap().call(&req))
    };
    let mut table = Vec::new();
    const ROUNDS: usize = 5;
    // Two prepares of the same dest at once.
    let mut pp = (0, 0);
    for i in 0..ROUNDS {
        let dest = tmp.path().join(format!("pp{i}"));
        let a = call(prepare_req(&reference, &dest));
        let b = call(prepare_req(&reference, &dest));
        let (a, b) = (a.join().unwrap(), b.join().unwrap());
        let oks = [&a, &b].iter().filter(|r| r.is_ok()).count();
        assert_eq!(oks, 1, "exactly one prepare wins: {a:?} {b:?}");
        for r in [&a, &b] {
            if let Err(fanfill::api::ApiError::Daemon { kind, message }) = r {
                assert!(
                    matches!(kind, ErrorKind::AlreadyServed | ErrorKind::DestNotEmpty),
                    "{kind:?} {message}"
                );
            }
        }
        for (p, want) in &files {
            assert!(std::fs::read(dest.join(p)).unwrap() == *want, "{p}");
        }
        pp.0 += oks;
        pp.1 += 2 - oks;
    }
    table.push((
        "two prepares of one dest at once".to_string(),
        ROUNDS,
        format!("{} prepared, {} refused, trees verified", pp.0, pp.1),
    ));
    // rm twice at once.
    let mut rr = (0, 0);
    for i in 0..ROUNDS {
        let dest = tmp.path().join(format!("pp{i}"));
        let a = call(Request::Remove { dest: dest.clone() });
        let b = call(Request::Remove { dest: dest.clone() });
        let (a, b) = (a.join().unwrap(), b.join().unwrap());
        let oks = [&a, &b].iter().filter(|r| r.is_ok()).count();
        assert_eq!(oks, 1, "exactly one rm wins: {a:?} {b:?}");
        for r in [&a, &b] {
            if let Err(fanfill::api::ApiError::Daemon { kind, message }) = r {
                assert_eq!(*kind, ErrorKind::UnknownImage, "{message}");
            }
        }
        assert_eq!(listing(&dest).len(), 0);
        rr.0 += oks;
        rr.1 += 2 - oks;
    }
    table.push((
        "rm twice at once".to_string(),
        ROUNDS,
        format!("{} removed, {} UnknownImage", rr.0, rr.1),
    ));
    // prepare + rm at once.
    let (mut served, mut gone) = (0, 0);
    for i in 0..ROUNDS {
        let dest = tmp.path().join(format!("pr{i}"));
        let a = call(prepare_req(&reference, &dest));
        std::thread::sleep(Duration::from_millis(5 * i as u64));
        let b = call(Request::Remove { dest: dest.clone() });
        let (a, b) = (a.join().unwrap(), b.join().unwrap());
        assert!(a.is_ok(), "{a:?}");
        let st = fanfill::daemon::call(
            &d.socket,
            &Request::Status {
                dest: Some(dest.clone()),
            },
        );
        match b {
            Ok(_) => {
                assert!(st.is_err(), "removed but still served: {st:?}");
                assert_eq!(listing(&dest).len(), 0);
                gone += 1;
            }
            Err(fanfill::api::ApiError::Daemon { kind, .. }) => {
                assert_eq!(kind, ErrorKind::UnknownImage);
                assert!(st.is_ok());
                for (p, want) in &files {
                    assert!(std::fs::read(dest.join(p)).unwrap() == *want, "{p}");
                }
                served += 1;
            }
            Err(e) => panic!("{e}"),
        }
    }
    table.push((
        "prepare + rm at once".to_string(),
        ROUNDS,
        format!(
            "{gone} removed after prepare, {served} rm refused (not yet served), all consistent"
        ),
    ));
    assert!(matches!(d.call(Request::Ping), Response::Ok));
    let images = d.status().1;
    assert_eq!(images.len(), served);
    eprintln!("| conflict | rounds | outcome |\n|---|---|---|");
    for (what, n, outcome) in &table {
        eprintln!("| {what} | {n} | {outcome} |");
    }
}
