//! Hostile layers through the whole prepare path: each is refused with an error naming the
//! layer or entry at fault, nothing is written outside the destination, and no half tree is
//! left behind.

mod fsutil;

use std::path::Path;

use fanfill::fill::{Engine, EngineConfig, error_chain};
use fanfill::image::{self, PrepareOptions};
use fanfill::ocibuild::{self, Compression};

/// One raw ustar member: (name, type flag, link name, data).
type Member<'a> = (&'a str, u8, &'a str, &'a [u8]);

/// A tar stream built byte by byte, so that it can say what no honest writer would.
fn raw_tar(members: &[Member<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, kind, link, data) in members {
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..108].copy_from_slice(b"0000755\0");
        h[108..116].copy_from_slice(b"0000000\0");
        h[116..124].copy_from_slice(b"0000000\0");
        h[124..136].copy_from_slice(format!("{:011o}\0", data.len()).as_bytes());
        h[136..148].copy_from_slice(b"14500000000\0");
        h[156] = *kind;
        h[157..157 + link.len()].copy_from_slice(link.as_bytes());
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|b| *b as u32).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

fn empty(dir: &Path) -> bool {
    std::fs::read_dir(dir).unwrap().next().is_none()
}

/// Prepares the layout at `layout` into a fresh dest beside an `outside` directory and
/// returns the error text; asserts nothing leaked and nothing was left.
fn refused(case: &str, layout: &Path, tag: &str) -> String {
    let root = tempfile::tempdir().unwrap();
    let (dest, outside) = (root.path().join("dest"), root.path().join("outside"));
    std::fs::create_dir(&dest).unwrap();
    std::fs::create_dir(&outside).unwrap();
    let engine = Engine::start(EngineConfig::default()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let opts = PrepareOptions::new(root.path().join("indexes"));
    let reference = format!("oci:{}:{tag}", layout.display());
    let err = rt
        .block_on(image::prepare(&engine, &reference, &dest, &opts))
        .expect_err(case);
    let text = error_chain(&err);
    assert!(
        empty(&outside),
        "{case}: something was written outside the destination"
    );
    assert!(empty(&dest), "{case}: a half tree was left behind");
    assert!(
        !Path::new("/tmp/fanfill-pwned").exists(),
        "{case}: escaped to /tmp"
    );
    eprintln!("{case}: {text}");
    text
}

#[test]
fn hostile_layers_are_refused_and_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let ok_layer = raw_tar(&[
        ("etc/", b'5', "", b""),
        ("etc/hostname", b'0', "", b"box\n"),
    ]);

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "traversal",
            raw_tar(&[("../../../tmp/fanfill-pwned", b'0', "", b"x")]),
            "fanfill-pwned",
        ),
        (
            "symlink escape",
            raw_tar(&[
                ("evil", b'2', "/tmp", b""),
                ("evil/fanfill-pwned", b'0', "", b"x"),
            ]),
            "evil",
        ),
        (
            "hardlink escape",
            raw_tar(&[("hl", b'1', "../../../etc/passwd", b"")]),
            "hl",
        ),
    ];
    for (i, (case, tar, must_name)) in cases.iter().enumerate() {
        let tag = format!("t{i}");
        let built = ocibuild::write_layout_tars(
            &layout,
            &tag,
            &[ok_layer.clone(), tar.clone()],
            Compression::Gzip,
        )
        .unwrap();
        let text = refused(case, &layout, &tag);
        let layer = &built.layers[1].0;
        assert!(
            text.contains(must_name) || text.contains(layer.as_str()),
            "{case}: error names neither the entry nor the layer: {text}"
        );
    }

    // Corrupt gzip: the blob's digest is right (the registry would serve it), its deflate
    // data is not.
    let built = ocibuild::write_layout_tars(
        &layout,
        "gz",
        &[ok_layer.clone(), ok_layer.clone()],
        Compression::Gzip,
    )
    .unwrap();
    let (digest, _, _) = &built.layers[1];
    let blob_path = layout
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"));
    let mut blob = std::fs::read(&blob_path).unwrap();
    let mid = blob.len() / 2;
    for b in &mut blob[mid..mid + 8] {
        *b ^= 0x5a;
    }
    // Re-file the corrupt blob under its own digest and point the manifest at it.
    let corrupt_digest = format!("sha256:{}", fsutil::sha256_hex(&blob));
    std::fs::write(
        layout
            .join("blobs/sha256")
            .join(corrupt_digest.trim_start_matches("sha256:")),
        &blob,
    )
    .unwrap();
    rewrite_manifest(&layout, "gz", digest, &corrupt_digest, blob.len());
    let text = refused("corrupt gzip", &layout, "gz");
    assert!(text.contains(&corrupt_digest), "corrupt gzip: {text}");

    // Digest mismatch: the bytes in the store are not the ones the manifest names.
    let built = ocibuild::write_layout_tars(
        &layout,
        "dm",
        &[ok_layer.clone(), ok_layer.clone()],
        Compression::Gzip,
    )
    .unwrap();
    let (digest, _, _) = &built.layers[0];
    let blob_path = layout
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"));
    let other = raw_tar(&[
        ("etc/", b'5', "", b""),
        ("etc/hostname", b'0', "", b"evil\n"),
    ]);
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut enc, &other).unwrap();
    std::fs::write(&blob_path, enc.finish().unwrap()).unwrap();
    let text = refused("digest mismatch", &layout, "dm");
    assert!(
        text.contains(digest.trim_start_matches("sha256:")),
        "digest mismatch: {text}"
    );
}

/// Points the manifest tagged `tag` at a different layer blob (and re-files the manifest).
fn rewrite_manifest(layout: &Path, tag: &str, old: &str, new: &str, size: usize) {
    let index_path = layout.join("index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    let m = index["manifests"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap();
    let mdigest = m["digest"].as_str().unwrap().to_string();
    let mpath = layout
        .join("blobs/sha256")
        .join(mdigest.trim_start_matches("sha256:"));
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
    for l in manifest["layers"].as_array_mut().unwrap() {
        if l["digest"] == old {
            l["digest"] = serde_json::json!(new);
            l["size"] = serde_json::json!(size);
        }
    }
    let bytes = serde_json::to_vec(&manifest).unwrap();
    let nd = fsutil::sha256_hex(&bytes);
    std::fs::write(layout.join("blobs/sha256").join(&nd), &bytes).unwrap();
    m["digest"] = serde_json::json!(format!("sha256:{nd}"));
    m["size"] = serde_json::json!(bytes.len());
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
}
