//! Large misses read pipelined (`fetch_span_pipelined`), proved against a real registry in
//! a test binary of its own: `fanfill::image::pipelined_reads` counts for the whole process.

mod common;
#[path = "support/trees.rs"]
mod trees;

use std::time::Duration;

use fanfill::fill::{Engine, EngineConfig};
use fanfill::image;
use fanfill::ocibuild::{Compression, write_layout};
use trees::{indexed_locally, prepare_within, read_bounded};

/// Compressible text of `len` bytes (Huffman-coded deflate blocks, so checkpoints inside a
/// file fall inside blocks), seeded.
fn text(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let words = [
        "fanfill ",
        "placeholder ",
        "range ",
        "inflate ",
        "layer ",
        "0x",
        "\n",
    ];
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(words[(x % words.len() as u64) as usize].as_bytes());
        out.extend_from_slice(format!("{:x}", x >> 40).as_bytes());
    }
    out.truncate(len);
    out
}

/// A fill of several MiB from the registry inflates in parts behind its range read, each
/// part from its own checkpoint as its bytes arrive (`fetch_span_pipelined`): the bytes
/// written are the file's, for a whole large file (compressible text: checkpoints inside
/// Huffman blocks), for one of random bytes (stored blocks), and for a range in the middle
/// of one read through its placeholder; each of them took the pipelined path.
#[test]
fn large_fills_from_the_registry_inflate_pipelined_and_match_the_layer() {
    common::init_tracing();
    let reg = common::TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    let big_text = text(7 << 20, 1);
    let mut random = Vec::with_capacity(3 << 20);
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    while random.len() < 3 << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        random.extend_from_slice(&x.to_le_bytes());
    }
    let middle = text(6 << 20, 2);
    let file = |path: &str, data: &[u8]| fanfill::ocibuild::LayerItem::File {
        path: path.into(),
        mode: 0o644,
        data: data.to_vec(),
    };
    let layer = vec![
        file("a-small", &text(10_000, 3)),
        file("big-text", &big_text),
        file("random", &random),
        file("middle", &middle),
        file("z-small", &text(20_000, 4)),
    ];
    let layout = tmp.path().join("layout");
    write_layout(&layout, "v1", &[layer], Compression::Gzip).unwrap();
    common::push_layout(&layout, "v1", &reg.host(), "pipelined/app", &[]);
    let reference = format!("docker://{}/pipelined/app:v1", reg.host());
    // A local index and no blob cache: every fill is a range read from the registry.
    let (rt, opts) = indexed_locally(&reference, tmp.path());
    let engine =
        Engine::start(EngineConfig::default()).expect("fanotify pre-content group (6.14+, root)");
    let dest = tmp.path().join("root");
    std::fs::create_dir(&dest).unwrap();
    let prepared = prepare_within(&rt, &engine, &reference, &dest, &opts).expect("prepare");
    let id_of = |name: &str| {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::symlink_metadata(dest.join(name)).unwrap();
        fanfill::fill::FileId::new(m.dev(), m.ino())
    };
    let limit = Duration::from_secs(60);
    for (name, data) in [("big-text", &big_text), ("random", &random)] {
        let before = image::pipelined_reads();
        let fetched = prepared.store.bytes_fetched();
        engine.fill_file(id_of(name)).expect("fill the whole file");
        assert!(
            image::pipelined_reads() > before,
            "{name}: the whole-file fill was not pipelined"
        );
        assert!(
            prepared.store.bytes_fetched() > fetched,
            "{name}: nothing fetched"
        );
        let got = read_bounded(&dest.join(name), limit);
        assert!(
            got == *data,
            "{name}: the filled bytes differ from the layer's"
        );
    }
    // A reader's range in the middle of a file: 1 MiB chunks 1..=4 as one run.
    let before = image::pipelined_reads();
    let mut buf = vec![0u8; 4 << 20];
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(dest.join("middle")).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let mut taken = std::mem::take(&mut buf);
        std::thread::spawn(move || {
            let r = f.read_exact_at(&mut taken, 1 << 20).map(|()| taken);
            let _ = tx.send(r);
        });
        buf = rx
            .recv_timeout(limit)
            .expect("the read of the middle range finished in time")
            .expect("read the middle range");
    }
    assert!(buf == middle[1 << 20..5 << 20], "the middle range differs");
    assert!(
        image::pipelined_reads() > before,
        "the 4 MiB range read was not pipelined"
    );
    drop(prepared);
    engine.shutdown();
    drop(rt);
}
