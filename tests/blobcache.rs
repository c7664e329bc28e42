//! A layer with no index travels whole once: it is kept, and every later fill of it is a
//! local read, not a second download.

mod fsutil;

use fanfill::fill::{Engine, EngineConfig};
use fanfill::image::{self, IndexOrigin, PrepareOptions};
use fanfill::ocibuild::{self, Compression, LayerItem};
use fsutil::{pattern, within};

#[test]
fn a_streamed_layer_is_kept_and_fills_read_it_locally() {
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<(String, Vec<u8>)> = (0..8)
        .map(|i| (format!("f{i}"), pattern(700_000 + i * 1000, 70 + i as u64)))
        .collect();
    let layer = files
        .iter()
        .map(|(p, d)| LayerItem::File {
            path: p.clone(),
            mode: 0o644,
            data: d.clone(),
        })
        .collect();
    let built =
        ocibuild::write_layout(&dir.path().join("layout"), "v", &[layer], Compression::Gzip)
            .unwrap();
    let engine = Engine::start(EngineConfig::default()).unwrap();
    let dest = dir.path().join("rootfs");
    std::fs::create_dir(&dest).unwrap();
    let opts = PrepareOptions::new(dir.path().join("state/indexes"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let prepared = rt
        .block_on(image::prepare(&engine, &built.reference(), &dest, &opts))
        .unwrap();
    assert_eq!(prepared.index_origins, vec![IndexOrigin::Built]);
    assert!(
        dir.path()
            .join("state/blobs/sha256")
            .read_dir()
            .unwrap()
            .count()
            == 1
    );
    let ready = prepared.store.bytes_fetched();
    for (p, d) in files {
        let path = dest.join(&p);
        let got = within(30, "read", move || std::fs::read(path).unwrap());
        assert!(got == d, "{p}");
    }
    let after = prepared.store.bytes_fetched() - ready;
    eprintln!(
        "blob cache: {ready} bytes to get ready (the whole layer once), {after} more to read every file"
    );
    assert_eq!(
        after, 0,
        "fills went back to the source for a layer already kept"
    );
}
