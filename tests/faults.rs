//! Registry faults under the fill path: a real `docker-registry` behind a fault-injecting
//! proxy on 127.0.0.1. Readers of placeholders get the true bytes after retries, or EIO
//! within a bounded time; never zeros, never a hang.

mod common;
mod fsutil;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{Fault, FaultyProxy, TestRegistry};
use fanfill::fill::{Engine, EngineConfig};
use fanfill::image::{self, PrepareOptions};
use fanfill::ocibuild::{self, Compression, LayerItem};
use fanfill::registry::RetryPolicy;
use fsutil::{pattern, within};

struct Outcome {
    case: &'static str,
    ok: bool,
    errno: Option<i32>,
    secs: f64,
}

/// Reads the whole file through the placeholder (a fresh thread, bounded) and checks it.
fn read_and_check(path: PathBuf, want: Vec<u8>, case: &'static str) -> Outcome {
    let t = Instant::now();
    let res = within(60, case, move || {
        let f = File::open(&path).unwrap();
        let mut buf = vec![0u8; want.len()];
        f.read_exact_at(&mut buf, 0).map(|()| buf == want)
    });
    let secs = t.elapsed().as_secs_f64();
    match res {
        Ok(true) => Outcome {
            case,
            ok: true,
            errno: None,
            secs,
        },
        Ok(false) => panic!("{case}: the reader got wrong bytes (zeros?)"),
        Err(e) => Outcome {
            case,
            ok: false,
            errno: e.raw_os_error(),
            secs,
        },
    }
}

#[test]
fn registry_faults_give_true_bytes_or_eio_never_zeros() {
    let registry = TestRegistry::start();
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<(String, Vec<u8>)> = (0..6)
        .map(|i| {
            (
                format!("data/f{i}"),
                pattern((1 << 20) + 1000 * i, 40 + i as u64),
            )
        })
        .collect();
    let mut layer = vec![LayerItem::Dir {
        path: "data".into(),
        mode: 0o755,
    }];
    for (p, d) in &files {
        layer.push(LayerItem::File {
            path: p.clone(),
            mode: 0o644,
            data: d.clone(),
        });
    }
    let built = ocibuild::write_layout(
        &dir.path().join("layout"),
        "v1",
        &[layer],
        Compression::Gzip,
    )
    .unwrap();
    common::push_layout(&built.dir, "v1", &registry.host(), "faults/img", &[]);

    let proxy = FaultyProxy::start(registry.addr, Fault::None);
    let reference = format!("docker://{}/faults/img:v1", proxy.host());
    let mut opts = PrepareOptions::new(dir.path().join("indexes"));
    // Every fill must go to the registry (no kept copy of the streamed layer).
    opts.blob_cache = None;
    opts.registry.insecure = true;
    opts.registry.retry = RetryPolicy {
        max_attempts: 4,
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(200),
        max_elapsed: Duration::from_secs(3),
    };
    let engine = Engine::start(EngineConfig {
        fetch_timeout: Duration::from_secs(10),
        ..EngineConfig::default()
    })
    .unwrap();
    let dest = dir.path().join("rootfs");
    std::fs::create_dir(&dest).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let prepared = rt
        .block_on(image::prepare(&engine, &reference, &dest, &opts))
        .unwrap();
    assert_eq!(prepared.files.len(), files.len());

    let file = |i: usize| (dest.join(&files[i].0), files[i].1.clone());
    let mut outcomes = Vec::new();

    proxy.set_fault_now(Fault::DropConnections(2));
    let (p, d) = file(0);
    outcomes.push(read_and_check(p, d, "connection dropped (x2)"));

    proxy.set_fault_now(Fault::TruncateBody {
        connections: 2,
        body_bytes: 1000,
    });
    let (p, d) = file(1);
    outcomes.push(read_and_check(p, d, "body truncated mid-range (x2)"));

    proxy.set_fault_now(Fault::Status {
        connections: 2,
        status: 503,
    });
    let (p, d) = file(2);
    outcomes.push(read_and_check(p, d, "HTTP 503 (x2)"));

    proxy.set_fault_now(Fault::StripRange);
    let (p, d) = file(3);
    outcomes.push(read_and_check(p, d, "server ignores Range"));

    // The registry stays down: EIO within the retry budget, then the true bytes once it is back.
    proxy.set_fault_now(Fault::Status {
        connections: 10_000,
        status: 503,
    });
    let (p, d) = file(4);
    let down = read_and_check(p.clone(), d.clone(), "HTTP 503 until retries run out");
    assert!(
        !down.ok && down.errno == Some(libc::EIO),
        "persistent 503 must give EIO"
    );
    assert!(
        down.secs < 10.0,
        "EIO must come within the retry budget, took {:.1}s",
        down.secs
    );
    outcomes.push(down);
    proxy.set_fault_now(Fault::None);
    outcomes.push(read_and_check(p, d, "registry back after EIO"));

    // The stored layer no longer matches its digest: verification refuses the bytes.
    let layer_digest = &built.layers[0].0;
    let data_path = registry.blob_data_path(layer_digest);
    let mut blob = std::fs::read(&data_path).unwrap();
    let n = blob.len();
    // The last file's compressed bytes sit at the end of the blob.
    for b in &mut blob[n - n / 8..n - 64] {
        *b = 0;
    }
    std::fs::write(&data_path, &blob).unwrap();
    let (p, d) = file(5);
    let bad = read_and_check(p, d, "layer bytes changed in the registry");
    assert!(
        !bad.ok && bad.errno == Some(libc::EIO),
        "corrupt data must give EIO"
    );
    outcomes.push(bad);

    eprintln!("| fault | outcome | errno | seconds |");
    eprintln!("|---|---|---|---|");
    for o in &outcomes {
        eprintln!(
            "| {} | {} | {} | {:.2} |",
            o.case,
            if o.ok { "true bytes" } else { "error" },
            o.errno.map(|e| e.to_string()).unwrap_or_else(|| "-".into()),
            o.secs
        );
    }
    for o in &outcomes[..4] {
        assert!(
            o.ok,
            "{}: a retried fault must end with the true bytes",
            o.case
        );
    }
    assert!(
        outcomes[5].ok,
        "after the registry is back the reader gets the bytes"
    );
    let s = engine.stats();
    eprintln!(
        "engine: {} errors answered with an errno, {} fills",
        s.errors, s.fills
    );
}
