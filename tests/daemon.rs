//! `fanfill daemon` as a user runs it: the binary, its socket, its state dir, the fd holder,
//! SIGKILL and restart. Inode marks only (temp dirs); every blocking step is bounded.

mod fsutil;

use std::io::Read;
use std::time::{Duration, Instant};

use fanfill::api::{Request, Response};
use fsutil::daemonproc::{DaemonProc, bin, build_image, get_metrics, holder_marks};
use fsutil::within;

#[test]
fn sigkill_with_16_blocked_readers_loses_no_reader_and_leaks_no_zeros() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let (ref_a, files_a) = build_image(&tmp.path().join("img-a"), "1", 8, 100);
    let (ref_b, files_b) = build_image(&tmp.path().join("img-b"), "1", 8, 200);
    // A slow registry: every fetch takes 1.5 s, so all readers are blocked at the kill.
    let slow = ["--test-fetch-delay-ms", "1500"];
    let mut d = DaemonProc::start(&state, &slow);
    let (dest_a, dest_b) = (tmp.path().join("a"), tmp.path().join("b"));
    let t = Instant::now();
    d.prepare(&ref_a, &dest_a, false);
    d.prepare(&ref_b, &dest_b, false);
    let prepare_ms = t.elapsed().as_millis();
    let mut readers = Vec::new();
    for (dest, files) in [(&dest_a, &files_a), (&dest_b, &files_b)] {
        for (path, want) in files.iter().cloned() {
            let p = dest.join(&path);
            readers.push(std::thread::spawn(move || {
                let t = Instant::now();
                let mut got = Vec::new();
                let r = std::fs::File::open(&p).and_then(|mut f| f.read_to_end(&mut got));
                (path, r.map(|_| got), want, t.elapsed())
            }));
        }
    }
    // Wait until the daemon has read all 16 misses (journaled, fetches pending).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (ds, _) = d.status();
        if ds.inflight_events >= 16 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {} readers in flight",
            ds.inflight_events
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    d.kill9();
    let killed = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    let still_blocked = readers.iter().filter(|r| !r.is_finished()).count();
    assert_eq!(
        still_blocked, 16,
        "a reader finished while no daemon was running"
    );
    let restart = Instant::now();
    let d2 = DaemonProc::start(&state, &slow);
    let up_ms = restart.elapsed().as_millis();
    let results = within(60, "16 readers after restart", move || {
        readers
            .into_iter()
            .map(|r| r.join().unwrap())
            .collect::<Vec<_>>()
    });
    let all_done = killed.elapsed();
    let mut slowest = Duration::ZERO;
    for (path, got, want, took) in &results {
        let got = got.as_ref().unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(got.len(), want.len(), "{path}");
        assert!(got == want, "{path}: wrong bytes (zeros leaked?)");
        slowest = slowest.max(*took);
    }
    let (ds, images) = d2.status();
    assert!(
        ds.took_over,
        "the successor must take the group from the holder"
    );
    assert!(ds.inherited_answered >= 16, "{ds:?}\n{}", d2.log_text());
    assert_eq!(images.len(), 2);
    println!(
        "| figure | value |\n|---|---|\n| prepare 2 images | {prepare_ms} ms |\n| readers blocked across SIGKILL | {still_blocked}/16 |\n| restart until API up (re-register + gate) | {up_ms} ms |\n| inherited events answered by successor | {} |\n| kill to all 16 readers done (fetch delay 1.5 s) | {} ms |\n| slowest reader | {} ms |\n| readers with wrong bytes | 0 |",
        ds.inherited_answered,
        all_done.as_millis(),
        slowest.as_millis()
    );
}

#[test]
fn prefetch_completes_removes_every_mark_and_survives_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let (reference, files) = build_image(&tmp.path().join("img"), "1", 6, 300);
    let mut d = DaemonProc::start(&state, &[]);
    let dest = tmp.path().join("root");
    let s = d.prepare(&reference, &dest, false);
    assert_eq!(s.files, 6);
    assert_eq!(holder_marks(&state), 6);
    // Read one file on demand, then let prefetch fill the rest.
    let p = dest.join(&files[0].0);
    let got = within(30, "read", move || std::fs::read(p)).unwrap();
    assert!(got == files[0].1);
    match d.call(Request::Prefetch {
        dest: dest.clone(),
        enable: true,
    }) {
        Response::Ok => {}
        r => panic!("{r:?}"),
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, images) = d.status();
        if images[0].state == "complete" {
            assert_eq!(images[0].bytes_filled, images[0].bytes_total);
            break;
        }
        assert!(Instant::now() < deadline, "{:?}", images[0]);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(holder_marks(&state), 0, "a complete image keeps no marks");
    // Graceful restart: the recorded progress says complete; nothing is marked again.
    std::thread::sleep(Duration::from_millis(300));
    d.stop();
    let d2 = DaemonProc::start(&state, &[]);
    let (ds, images) = d2.status();
    assert!(ds.took_over);
    assert_eq!(images.len(), 1);
    assert_eq!(images[0].state, "complete", "{:?}", images[0]);
    assert_eq!(images[0].bytes_fetched, 0);
    assert_eq!(holder_marks(&state), 0);
    for (path, want) in &files {
        assert!(std::fs::read(dest.join(path)).unwrap() == *want, "{path}");
    }
    // A second container of the same image: every file from the content cache.
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_dir(state.join("cache")).unwrap().count() < files.len() {
        assert!(
            Instant::now() < deadline,
            "content cache not populated: {}",
            std::fs::read_to_string(state.join("images/1.json")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let dest2 = tmp.path().join("root2");
    let s2 = d2.prepare(&reference, &dest2, false);
    assert_eq!(s2.bytes_fetched, 0, "{s2:?}");
    assert_eq!(s2.state, "complete", "{s2:?}");
    for (path, want) in &files {
        assert!(std::fs::read(dest2.join(path)).unwrap() == *want, "{path}");
    }
    assert_eq!(holder_marks(&state), 0);
    println!(
        "second prepare of the same image: {} bytes fetched, {}/{} files complete at once",
        s2.bytes_fetched, s2.files_complete, s2.files
    );
    drop(d);
}

#[test]
fn cli_pull_status_rm_and_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let (reference, files) = build_image(&tmp.path().join("img"), "1", 2, 400);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics_addr = format!("127.0.0.1:{port}");
    let tmp_root = std::env::temp_dir();
    let d = DaemonProc::start(
        &state,
        &[
            "--metrics-addr",
            &metrics_addr,
            "--allow-root",
            tmp_root.to_str().unwrap(),
            "--allow-root",
            "/dev/shm",
        ],
    );
    let cli = |args: &[&str]| {
        let mut c = bin();
        c.args(args).env("FANFILL_SOCKET", &d.socket);
        let out = within(60, "fanfill CLI", move || c.output().unwrap());
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let dest = tmp.path().join("root");
    let dest_s = dest.to_str().unwrap();
    let (code, out, err) = cli(&["pull", "--no-prefetch", &reference, dest_s]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("ready: "), "{out}");
    let got = std::fs::read(dest.join(&files[1].0)).unwrap();
    assert!(got == files[1].1);
    // Prometheus metrics: one miss served, its latency in the histogram.
    // (The latency is recorded just after the answer: poll briefly.)
    let get_metrics = || get_metrics(&metrics_addr);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut metrics = get_metrics();
    while !metrics.contains("fanfill_fill_latency_seconds_count 1") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        metrics = get_metrics();
    }
    assert!(metrics.starts_with("HTTP/1.1 200 OK"), "{metrics}");
    assert!(metrics.contains("fanfill_misses_total 1"), "{metrics}");
    assert!(
        metrics.contains("fanfill_fill_latency_seconds_count 1"),
        "{metrics}"
    );
    assert!(metrics.contains("fanfill_inflight_events 0"), "{metrics}");
    let (code, out, _) = cli(&["status"]);
    assert_eq!(code, Some(0));
    assert!(out.contains(dest_s) && out.contains("1/2"), "{out}");
    // Errors name what is at fault.
    let (code, _, err) = cli(&["pull", &reference, dest_s]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("not empty") || err.contains("already served"),
        "{err}"
    );
    let other = tmp.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("x"), b"x").unwrap();
    let (_, _, err) = cli(&["pull", &reference, other.to_str().unwrap()]);
    assert!(err.contains("is not empty"), "{err}");
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let (_, _, err) = cli(&["pull", &reference, shm.path().to_str().unwrap()]);
    assert!(err.contains("tmpfs"), "{err}");
    let missing = format!("oci:{}:1", tmp.path().join("nope").display());
    let (_, _, err) = cli(&["pull", &missing, tmp.path().join("n").to_str().unwrap()]);
    assert!(err.contains("nope"), "{err}");
    let (code, _, err) = cli(&["status", tmp.path().join("n").to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(err.contains("no image is served"), "{err}");
    let out = bin()
        .args(["status", "--socket", "/nonexistent/fanfill.sock"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unreachable at /nonexistent/fanfill.sock")
    );
    // By default the rest of the image is filled in the background: it completes unread,
    // and keeps no mark.
    let dest2 = tmp.path().join("root2");
    let (code, _, err) = cli(&["pull", &reference, dest2.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while d
        .status()
        .1
        .iter()
        .any(|i| i.dest == dest2 && i.state != "complete")
    {
        assert!(Instant::now() < deadline, "{:?}", d.status().1);
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, _, err) = cli(&["rm", dest2.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    // rm: tree and state gone.
    let (code, out, err) = cli(&["rm", dest_s]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("removed"));
    assert_eq!(std::fs::read_dir(&dest).unwrap().count(), 0);
    assert_eq!(std::fs::read_dir(state.join("images")).unwrap().count(), 0);
    assert_eq!(holder_marks(&state), 0);
}

#[test]
fn a_restart_after_sigkill_serves_new_readers_of_taken_over_marks() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let (reference, files) = build_image(&tmp.path().join("img"), "1", 2, 500);
    let mut d = DaemonProc::start(&state, &[]);
    let dest = tmp.path().join("root");
    d.prepare(&reference, &dest, false);
    d.kill9();
    let d2 = DaemonProc::start(&state, &[]);
    let p = dest.join(&files[0].0);
    let got = within(10, "read after takeover", move || std::fs::read(p)).unwrap();
    assert!(got == files[0].1);
    drop(d2);
}

#[test]
fn sigterm_hands_blocked_readers_to_the_successor() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let (reference, files) = build_image(&tmp.path().join("img"), "1", 4, 600);
    let slow = ["--test-fetch-delay-ms", "1000"];
    let mut d = DaemonProc::start(&state, &slow);
    let dest = tmp.path().join("root");
    d.prepare(&reference, &dest, false);
    let readers: Vec<_> = files
        .iter()
        .cloned()
        .map(|(path, want)| {
            let p = dest.join(&path);
            std::thread::spawn(move || (path, std::fs::read(p), want))
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while d.status().0.inflight_events < 4 {
        assert!(Instant::now() < deadline, "readers not in flight");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Stop gracefully, and read a new file while no daemon runs: it must block, not see zeros.
    let stopped = d.term_async();
    within(30, "daemon stop", move || stopped.join().unwrap());
    let late = dest.join(&files[0].0);
    let late_reader = std::thread::spawn(move || std::fs::read(late));
    std::thread::sleep(Duration::from_millis(300));
    let d2 = DaemonProc::start(&state, &slow);
    let results = within(60, "readers after a graceful restart", move || {
        let mut r: Vec<_> = readers.into_iter().map(|r| r.join().unwrap()).collect();
        r.push((
            "late".into(),
            late_reader.join().unwrap(),
            files[0].1.clone(),
        ));
        r
    });
    for (path, got, want) in results {
        let got = got.unwrap_or_else(|e| panic!("{path}: {e}"));
        assert!(got == want, "{path}: wrong bytes");
    }
    assert!(d2.status().0.took_over);
}

#[test]
fn prefetch_rate_limit_paces_background_fills() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let (reference, files) = build_image(&tmp.path().join("img"), "1", 6, 700);
    let d = DaemonProc::start(&state, &["--prefetch-rate-mib", "4"]);
    let dest = tmp.path().join("root");
    let t = Instant::now();
    d.prepare(&reference, &dest, true);
    let deadline = Instant::now() + Duration::from_secs(60);
    while d.status().1[0].state != "complete" {
        assert!(Instant::now() < deadline, "prefetch did not complete");
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = t.elapsed();
    // ~6.3 MiB at 4 MiB/s: the first file starts at once, the other five wait their turn.
    assert!(took >= Duration::from_millis(1200), "{took:?}");
    for (path, want) in &files {
        assert!(std::fs::read(dest.join(path)).unwrap() == *want, "{path}");
    }
    assert_eq!(holder_marks(&state), 0);
    println!("prefetch of 6.3 MiB at --prefetch-rate-mib 4: {took:?}");
}
