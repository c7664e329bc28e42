//! Writing OCI image layouts: the project's own small images.
//!
//! Owns turning a list of layers (each a list of [`LayerItem`]s: host files, in-memory files,
//! directories, symlinks, whiteouts) into a valid OCI image layout directory (`oci-layout`,
//! `index.json`, `blobs/sha256/…`) with gzip, zstd or uncompressed layers, a config whose
//! `diff_ids` are right, and a tagged manifest. The README demo, the tests and the benchmarks
//! build their images with it, so nothing needs the network. It never reads registries and
//! never touches placeholders.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Errors while building a layout.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Reading a host file or writing the layout failed.
    #[error("building OCI layout at {path}")]
    Io {
        /// The file at fault.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Layer compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// `application/vnd.oci.image.layer.v1.tar+gzip`.
    Gzip,
    /// `application/vnd.oci.image.layer.v1.tar+zstd`.
    Zstd,
    /// `application/vnd.oci.image.layer.v1.tar`.
    None,
}

impl Compression {
    fn media_type(self) -> &'static str {
        match self {
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
        }
    }
}

/// One member of a layer.
#[derive(Debug, Clone)]
pub enum LayerItem {
    /// A directory.
    Dir {
        /// Path in the image.
        path: String,
        /// Permission bits.
        mode: u32,
    },
    /// A regular file with the given bytes.
    File {
        /// Path in the image.
        path: String,
        /// Permission bits.
        mode: u32,
        /// Content.
        data: Vec<u8>,
    },
    /// A regular file with extended attributes (written as `SCHILY.xattr.*` PAX records).
    FileXattrs {
        /// Path in the image.
        path: String,
        /// Permission bits.
        mode: u32,
        /// Content.
        data: Vec<u8>,
        /// Extended attributes, name -> value.
        xattrs: Vec<(String, Vec<u8>)>,
    },
    /// A regular file copied from the host (content, mode and mtime).
    HostFile {
        /// Path in the image.
        path: String,
        /// Host file to read.
        host: PathBuf,
    },
    /// A symbolic link.
    Symlink {
        /// Path in the image.
        path: String,
        /// Link target.
        target: String,
    },
    /// A hard link to `target`, a regular file earlier in the same layer.
    Hardlink {
        /// Path in the image.
        path: String,
        /// Path (in the image) of the file it links to.
        target: String,
    },
    /// An OCI whiteout deleting `path` from lower layers.
    Whiteout {
        /// Path in the image that the layer deletes.
        path: String,
    },
}

impl LayerItem {
    /// A directory, mode 0755.
    pub fn dir(path: &str) -> LayerItem {
        LayerItem::Dir {
            path: path.into(),
            mode: 0o755,
        }
    }

    /// A regular file of `data`, mode 0644.
    pub fn file(path: &str, data: Vec<u8>) -> LayerItem {
        LayerItem::File {
            path: path.into(),
            mode: 0o644,
            data,
        }
    }
}

/// What was written.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    /// The layout directory.
    pub dir: PathBuf,
    /// The tag.
    pub tag: String,
    /// `sha256:…` of the manifest.
    pub manifest_digest: String,
    /// `(digest, compressed size, uncompressed size)` per layer, lowest first.
    pub layers: Vec<(String, u64, u64)>,
}

impl BuiltImage {
    /// The reference to this image in skopeo's spelling (`oci:DIR:TAG`).
    pub fn reference(&self) -> String {
        format!("oci:{}:{}", self.dir.display(), self.tag)
    }

    /// Sum of the compressed layer sizes.
    pub fn compressed_size(&self) -> u64 {
        self.layers.iter().map(|l| l.1).sum()
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> BuildError + '_ {
    move |source| BuildError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write_blob(dir: &Path, data: &[u8]) -> Result<String, BuildError> {
    let hex = hex::encode(Sha256::digest(data));
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).map_err(io_err(&blobs))?;
    let path = blobs.join(&hex);
    std::fs::write(&path, data).map_err(io_err(&path))?;
    Ok(format!("sha256:{hex}"))
}

fn header(kind: tar::EntryType, mode: u32, size: u64, mtime: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(mtime);
    h.set_uid(0);
    h.set_gid(0);
    h
}

fn layer_tar(items: &[LayerItem]) -> Result<Vec<u8>, BuildError> {
    use std::os::unix::fs::MetadataExt;
    let mut b = tar::Builder::new(Vec::new());
    let mtime = 1_700_000_000;
    let tio = |e: std::io::Error| BuildError::Io {
        path: PathBuf::from("<layer tar>"),
        source: e,
    };
    for item in items {
        match item {
            LayerItem::Dir { path, mode } => {
                let mut h = header(tar::EntryType::Directory, *mode, 0, mtime);
                b.append_data(&mut h, format!("{}/", path.trim_end_matches('/')), &[][..])
                    .map_err(tio)?;
            }
            LayerItem::File { path, mode, data } => {
                let mut h = header(tar::EntryType::Regular, *mode, data.len() as u64, mtime);
                b.append_data(&mut h, path, &data[..]).map_err(tio)?;
            }
            LayerItem::FileXattrs {
                path,
                mode,
                data,
                xattrs,
            } => {
                let recs: Vec<(String, &[u8])> = xattrs
                    .iter()
                    .map(|(k, v)| (format!("SCHILY.xattr.{k}"), v.as_slice()))
                    .collect();
                b.append_pax_extensions(recs.iter().map(|(k, v)| (k.as_str(), *v)))
                    .map_err(tio)?;
                let mut h = header(tar::EntryType::Regular, *mode, data.len() as u64, mtime);
                b.append_data(&mut h, path, &data[..]).map_err(tio)?;
            }
            LayerItem::HostFile { path, host } => {
                let data = std::fs::read(host).map_err(io_err(host))?;
                let md = std::fs::metadata(host).map_err(io_err(host))?;
                let mut h = header(
                    tar::EntryType::Regular,
                    md.mode() & 0o7777,
                    data.len() as u64,
                    md.mtime().max(0) as u64,
                );
                b.append_data(&mut h, path, &data[..]).map_err(tio)?;
            }
            LayerItem::Symlink { path, target } => {
                let mut h = header(tar::EntryType::Symlink, 0o777, 0, mtime);
                b.append_link(&mut h, path, target).map_err(tio)?;
            }
            LayerItem::Hardlink { path, target } => {
                let mut h = header(tar::EntryType::Link, 0o644, 0, mtime);
                b.append_link(&mut h, path, target).map_err(tio)?;
            }
            LayerItem::Whiteout { path } => {
                let p = Path::new(path);
                let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
                let wh = match (p.parent(), name) {
                    (Some(d), Some(n)) if !d.as_os_str().is_empty() => {
                        format!("{}/.wh.{n}", d.display())
                    }
                    (_, Some(n)) => format!(".wh.{n}"),
                    _ => continue,
                };
                let mut h = header(tar::EntryType::Regular, 0o644, 0, mtime);
                b.append_data(&mut h, wh, &[][..]).map_err(tio)?;
            }
        }
    }
    b.into_inner().map_err(tio)
}

fn compress(raw: &[u8], c: Compression) -> Result<Vec<u8>, BuildError> {
    let cio = |e: std::io::Error| BuildError::Io {
        path: PathBuf::from("<layer compression>"),
        source: e,
    };
    Ok(match c {
        Compression::None => raw.to_vec(),
        Compression::Gzip => {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
            enc.write_all(raw).map_err(cio)?;
            enc.finish().map_err(cio)?
        }
        Compression::Zstd => zstd::encode_all(raw, 3).map_err(cio)?,
    })
}

/// Writes an OCI image layout at `dir` (created if needed; an existing layout gains a tag)
/// holding one image tagged `tag` with `layers` (lowest first).
pub fn write_layout(
    dir: &Path,
    tag: &str,
    layers: &[Vec<LayerItem>],
    compression: Compression,
) -> Result<BuiltImage, BuildError> {
    let tars = layers
        .iter()
        .map(|items| layer_tar(items))
        .collect::<Result<Vec<_>, _>>()?;
    write_layout_tars(dir, tag, &tars, compression)
}

/// [`write_layout`] from ready-made tar streams (for layers no well-behaved writer would
/// produce: the hostile-input tests).
pub fn write_layout_tars(
    dir: &Path,
    tag: &str,
    tars: &[Vec<u8>],
    compression: Compression,
) -> Result<BuiltImage, BuildError> {
    let blobs = tars
        .iter()
        .map(|raw| {
            Ok(LayerBlob {
                diff_id: format!("sha256:{}", hex::encode(Sha256::digest(raw))),
                blob: compress(raw, compression)?,
                media_type: compression.media_type(),
                uncompressed_size: raw.len() as u64,
                annotations: serde_json::Map::new(),
            })
        })
        .collect::<Result<Vec<_>, BuildError>>()?;
    write_layout_blobs(dir, tag, blobs)
}

/// [`write_layout`] with eStargz layers ([`crate::toc::estargz::write`], one set of options
/// per layer; missing ones default), each descriptor annotated with its TOC digest and
/// uncompressed size. The blobs stay valid gzip tar: eager clients read them as usual.
pub fn write_layout_estargz(
    dir: &Path,
    tag: &str,
    layers: &[Vec<LayerItem>],
    opts: &[crate::toc::estargz::WriteOptions],
) -> Result<BuiltImage, BuildError> {
    use crate::toc::estargz;
    let blobs = layers
        .iter()
        .enumerate()
        .map(|(i, items)| {
            let raw = layer_tar(items)?;
            let o = opts.get(i).cloned().unwrap_or_default();
            let w = estargz::write(&raw, &o).map_err(|source| BuildError::Io {
                path: PathBuf::from("<estargz layer>"),
                source,
            })?;
            let mut annotations = serde_json::Map::new();
            annotations.insert(estargz::TOC_DIGEST_ANNOTATION.into(), w.toc_digest.into());
            annotations.insert(
                estargz::UNCOMPRESSED_SIZE_ANNOTATION.into(),
                w.uncompressed_size.to_string().into(),
            );
            Ok(LayerBlob {
                diff_id: w.diff_id,
                blob: w.blob,
                media_type: Compression::Gzip.media_type(),
                uncompressed_size: w.uncompressed_size,
                annotations,
            })
        })
        .collect::<Result<Vec<_>, BuildError>>()?;
    write_layout_blobs(dir, tag, blobs)
}

/// One finished layer blob with what its descriptor and the config say of it.
struct LayerBlob {
    blob: Vec<u8>,
    diff_id: String,
    media_type: &'static str,
    uncompressed_size: u64,
    annotations: serde_json::Map<String, serde_json::Value>,
}

fn write_layout_blobs(
    dir: &Path,
    tag: &str,
    blobs: Vec<LayerBlob>,
) -> Result<BuiltImage, BuildError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    let mut built = Vec::new();
    for l in blobs {
        diff_ids.push(l.diff_id);
        let digest = write_blob(dir, &l.blob)?;
        let mut desc = serde_json::json!({
            "mediaType": l.media_type,
            "digest": digest,
            "size": l.blob.len(),
        });
        if !l.annotations.is_empty() {
            desc["annotations"] = serde_json::Value::Object(l.annotations);
        }
        descs.push(desc);
        built.push((digest, l.blob.len() as u64, l.uncompressed_size));
    }
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "config": { "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"] },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    }))
    .expect("json");
    let config_digest = write_blob(dir, &config)?;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": descs,
    }))
    .expect("json");
    let manifest_digest = write_blob(dir, &manifest)?;
    let index_path = dir.join("index.json");
    let mut index: serde_json::Value = std::fs::read(&index_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| serde_json::json!({ "schemaVersion": 2, "manifests": [] }));
    let list = index["manifests"].as_array_mut().expect("manifests array");
    list.retain(|m| m["annotations"]["org.opencontainers.image.ref.name"] != tag);
    list.push(serde_json::json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": manifest_digest,
        "size": manifest.len(),
        "annotations": { "org.opencontainers.image.ref.name": tag },
    }));
    std::fs::write(&index_path, serde_json::to_vec(&index).expect("json"))
        .map_err(io_err(&index_path))?;
    let layout = dir.join("oci-layout");
    std::fs::write(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(io_err(&layout))?;
    Ok(BuiltImage {
        dir: dir.to_path_buf(),
        tag: tag.to_string(),
        manifest_digest,
        layers: built,
    })
}

/// The embedded default image of the README demo, built from files on this machine: a
/// static busybox with its applet links (layer 1), 48 data files of 1 MiB plus 200 notes
/// (layer 2), up to 3,000 files of the host's documentation, headers and time zones (layer
/// 3), and a layer that deletes one data file and adds the demo script (layer 4). About
/// 70 MiB; the demo workload reads a few percent of it.
pub fn demo_image(dir: &Path, compression: Compression) -> Result<BuiltImage, BuildError> {
    let busybox = PathBuf::from("/bin/busybox");
    let mut base = vec![
        LayerItem::Dir {
            path: "bin".into(),
            mode: 0o755,
        },
        LayerItem::HostFile {
            path: "bin/busybox".into(),
            host: busybox,
        },
        LayerItem::Dir {
            path: "etc".into(),
            mode: 0o755,
        },
        LayerItem::File {
            path: "etc/os-release".into(),
            mode: 0o644,
            data: b"NAME=fanfill-demo\nID=fanfill-demo\n".to_vec(),
        },
        LayerItem::Dir {
            path: "tmp".into(),
            mode: 0o1777,
        },
    ];
    for applet in [
        "sh",
        "ls",
        "cat",
        "sha256sum",
        "wc",
        "head",
        "echo",
        "du",
        "find",
    ] {
        base.push(LayerItem::Symlink {
            path: format!("bin/{applet}"),
            target: "busybox".into(),
        });
    }
    let mut data = vec![LayerItem::Dir {
        path: "data".into(),
        mode: 0o755,
    }];
    for i in 0..48u64 {
        let mut x = (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut bytes = Vec::with_capacity(1 << 20);
        while bytes.len() < 1 << 20 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            bytes.extend_from_slice(&x.to_le_bytes());
        }
        data.push(LayerItem::File {
            path: format!("data/blob-{i:02}.bin"),
            mode: 0o644,
            data: bytes,
        });
    }
    for i in 0..200 {
        data.push(LayerItem::File {
            path: format!("data/notes/note-{i:03}.txt"),
            mode: 0o644,
            data: format!("note {i}: fanfill fills this file when it is first read\n")
                .repeat(20)
                .into_bytes(),
        });
    }
    let mut host = Vec::new();
    let mut budget = HostBudget {
        files: 3000,
        bytes: 24 << 20,
    };
    for dir in [
        "/usr/share/doc",
        "/usr/include",
        "/usr/share/zoneinfo",
        "/usr/share/man",
    ] {
        collect_host_tree(Path::new(dir), &mut host, &mut budget);
    }
    let top = vec![
        LayerItem::Whiteout { path: "data/blob-47.bin".into() },
        LayerItem::File {
            path: "bin/demo".into(),
            mode: 0o755,
            data: b"#!/bin/sh\necho \"hello from a lazily filled image\"\ncat /etc/os-release\nsha256sum /data/blob-07.bin /data/notes/note-042.txt\necho \"files in the image: $(find / -xdev | wc -l)\"\necho \"first documented packages:\"\nls /usr/share/doc | head -3\n".to_vec(),
        },
    ];
    write_layout(dir, "demo", &[base, data, host, top], compression)
}

/// Files and bytes a layer built by [`collect_host_tree`] may still take.
#[derive(Debug, Clone, Copy)]
pub struct HostBudget {
    /// Files (and symlinks) left.
    pub files: usize,
    /// File bytes left.
    pub bytes: u64,
}

/// Adds `dir` (a host directory) to a layer under the same path, its parents first, then
/// depth first in name order, until the budget is spent: directories, regular readable
/// files and symlinks with UTF-8 names; nothing else.
pub fn collect_host_tree(dir: &Path, out: &mut Vec<LayerItem>, budget: &mut HostBudget) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut names: Vec<_> = rd.filter_map(Result::ok).map(|e| e.path()).collect();
    names.sort();
    let rel = |p: &Path| {
        p.strip_prefix("/")
            .unwrap_or(p)
            .to_string_lossy()
            .into_owned()
    };
    // Parents first, so the layer is valid on its own.
    let mut parent = PathBuf::new();
    for comp in Path::new(&rel(dir)).components() {
        parent.push(comp);
        let path = parent.to_string_lossy().into_owned();
        let item = LayerItem::Dir {
            path: path.clone(),
            mode: 0o755,
        };
        if !out
            .iter()
            .any(|i| matches!(i, LayerItem::Dir { path: p, .. } if *p == path))
        {
            out.push(item);
        }
    }
    for p in names {
        if budget.files == 0 {
            return;
        }
        let Ok(md) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if p.to_str().is_none() {
            continue;
        }
        if md.file_type().is_symlink() {
            if let Ok(target) = std::fs::read_link(&p) {
                out.push(LayerItem::Symlink {
                    path: rel(&p),
                    target: target.to_string_lossy().into_owned(),
                });
                budget.files -= 1;
            }
        } else if md.is_dir() {
            collect_host_tree(&p, out, budget);
        } else if md.is_file() && md.len() <= budget.bytes && std::fs::File::open(&p).is_ok() {
            budget.bytes -= md.len();
            budget.files -= 1;
            out.push(LayerItem::HostFile {
                path: rel(&p),
                host: p,
            });
        }
    }
}
