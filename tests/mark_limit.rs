//! `fs.fanotify.max_user_marks` does not bound the placeholders a node serves: fanfill's
//! groups are made with `FAN_UNLIMITED_MARKS` (it needs `CAP_SYS_ADMIN`, which pre-content
//! groups need anyway), so with the limit at 1 a prepare of 400 placeholders still marks
//! every one. What bounds them is kernel memory (docs/kernel.md). Ignored by default: it lowers a node-wide sysctl for a moment (every fanotify
//! user of root on the node shares it). Run it alone, as root:
//! `cargo test --test mark_limit -- --ignored`.

use fanfill::fill::{Engine, EngineConfig, error_chain};
use fanfill::image::{self, PrepareOptions};
use fanfill::ocibuild::{self, Compression, LayerItem};
use fanfill::unpack::Mode;

const SYSCTL: &str = "/proc/sys/fs/fanotify/max_user_marks";

/// Restores the sysctl when dropped.
struct Limit(String);

impl Drop for Limit {
    fn drop(&mut self) {
        std::fs::write(SYSCTL, &self.0).unwrap();
    }
}

#[test]
#[ignore = "lowers the node-wide fs.fanotify.max_user_marks for a moment"]
fn max_user_marks_does_not_bound_placeholders() {
    let dir = tempfile::tempdir().unwrap();
    let layer: Vec<LayerItem> = (0..400)
        .map(|i| LayerItem::File {
            path: format!("d{}/f{i}", i % 4),
            mode: 0o644,
            data: vec![i as u8; 100 + i],
        })
        .collect();
    let built =
        ocibuild::write_layout(&dir.path().join("layout"), "v", &[layer], Compression::Gzip)
            .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let opts = PrepareOptions::new(dir.path().join("state/indexes"));
    let engine = Engine::start(EngineConfig::default()).unwrap();
    // Index the image first (no marks needed for that).
    let warm = dir.path().join("warm");
    std::fs::create_dir(&warm).unwrap();
    let mut o = opts.clone();
    o.mode = Mode::Overlay;
    rt.block_on(image::prepare(&engine, &built.reference(), &warm, &o))
        .unwrap();

    let dest = dir.path().join("direct");
    std::fs::create_dir(&dest).unwrap();
    let p = {
        let _restore = Limit(std::fs::read_to_string(SYSCTL).unwrap());
        // Below what the node holds already: a group bound by the limit could not add one.
        std::fs::write(SYSCTL, "1").unwrap();
        rt.block_on(image::prepare(&engine, &built.reference(), &dest, &opts))
    };
    let p = p.unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    assert_eq!(p.files.len(), 400);
    assert_eq!(p.index_origins.len(), 1);
}
