//! fanfill: start containers before their images are downloaded.
//!
//! Layers are unpacked metadata-only onto a real filesystem (ext4, xfs, btrfs): every
//! directory, symlink, owner, mode, mtime and xattr is real and regular files are sparse
//! placeholders of their true size. A fanotify group of class `FAN_CLASS_PRE_CONTENT`
//! watches the placeholders; a read, mmap or exec of a missing range blocks in the kernel
//! until the [`fill`] engine has fetched that range from its content source, verified it and
//! written it. Once a file is complete its mark is removed and reads run at native speed.
//!
//! Module map (each module's own doc says what it owns and what it must not touch):
//! - [`sys`]: the only place with `unsafe`: fanotify ABI, zlib random access.
//! - [`api`]: the daemon's local API: typed requests/responses, the protocol, a client.
//! - [`blobcache`]: local copies of layer blobs that travelled whole (no index yet).
//! - [`daemon`]: `fanfill daemon`: every image in one process, state, crash takeover.
//! - [`digest`]: sha256 digests held as bytes, written as hex.
//! - [`fill`]: the fill engine: registration, single-flight fills, answers to the kernel.
//! - `fuzzing` (feature `fuzzing`): fuzz target bodies for every parser of untrusted input.
//! - [`index`]: the layer index: entry table and random-access checkpoints.
//! - [`hook`]: the OCI runtime hook's view of a container (state, config, overlay rootfs).
//! - [`image`]: preparing an image: indexes, placeholders, sources, the index artifact.
//! - [`ocibuild`]: writing OCI image layouts (the demo image, test and benchmark images).
//! - [`overlay`]: overlay rootfs: whole-file fill when a file is opened through overlayfs.
//! - [`reference`]: image reference grammar (`docker://`, `oci:`).
//! - [`registry`]: manifests and blobs from a registry or an OCI layout: ranges, streams, auth.
//! - [`signature`]: cosign key signatures of manifests (the `signed` index policy).
//! - [`toc`]: eStargz and zstd:chunked layers, read through their own table of contents.
//! - [`unpack`]: placeholder unpack: layers to a metadata-complete tree of sparse files.
#![deny(missing_docs)]

pub mod api;
pub mod blobcache;
pub mod daemon;
pub mod digest;
pub mod fill;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod hook;
pub mod image;
pub mod index;
pub mod loader;
pub mod ocibuild;
pub mod overlay;
pub mod reference;
pub mod registry;
pub mod signature;
pub mod snapshotter;
pub mod sys;
pub mod toc;
pub mod unpack;
