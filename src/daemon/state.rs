//! The daemon's persistent state: one JSON file per image under `STATE_DIR/images/`,
//! written atomically (temporary file, fsync, rename, fsync of the directory).
//!
//! Owns the on-disk format and nothing else. Why JSON files rather than SQLite or redb: the
//! state is small (one record per placeholder and a bitmap of filled chunks), it is
//! rewritten per image only when it changed, at most once per persist interval, and the
//! rename gives all-or-nothing updates without a new native dependency on a 2-core build.
//! Crash safety comes from ordering: a chunk is filled and answered first, the destination
//! filesystem is synced (`syncfs`), then the chunk is recorded; what was not recorded is
//! fetched again after a restart.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::api::{LayoutMode, RegistrySettings};

/// Errors of the state store.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading or writing a state file failed.
    #[error("state file {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A state file did not parse.
    #[error("state file {path} is corrupt")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

/// One placeholder of an image and how far it is filled. Its content digest is not kept
/// here but read from the layer's index (`layer`, `entry`) when needed: one copy per image,
/// not one per tree (records of older daemons carried a `sha256` field, now ignored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    /// Path of the placeholder (shared with the engine's registration).
    pub path: Arc<Path>,
    /// Index of its layer (lowest 0).
    pub layer: u32,
    /// Index of its entry in the layer's index.
    pub entry: u32,
    /// True size.
    pub size: u64,
    /// Fill granularity the progress is recorded at (0: nothing recorded).
    #[serde(default)]
    pub chunk: u64,
    /// Completely filled.
    #[serde(default)]
    pub complete: bool,
    /// Filled chunks as a bitmap, hex (bit i of byte i/8 = chunk i), when partly filled.
    #[serde(default, skip_serializing_if = "str::is_empty")]
    pub filled: Box<str>,
}

impl FileRecord {
    /// `(layer, entry)`: where the file's bytes are described.
    pub fn key(&self) -> (usize, usize) {
        (self.layer as usize, self.entry as usize)
    }

    /// The recorded filled chunks, `n` flags.
    pub fn filled_flags(&self, n: usize) -> Vec<bool> {
        if self.complete {
            return vec![true; n];
        }
        let bytes = hex::decode(self.filled.as_bytes()).unwrap_or_default();
        (0..n)
            .map(|i| bytes.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0))
            .collect()
    }

    /// Records `flags` (all set: complete).
    pub fn set_filled(&mut self, chunk: u64, flags: &[bool], complete: bool) {
        self.chunk = chunk;
        self.complete = complete;
        self.filled = Self::encode_filled(flags, complete);
    }

    /// Whether [`FileRecord::set_filled`] with these arguments would change the record.
    /// The granularity counts only where chunks are recorded: a file nothing of which is
    /// filled yet is the same at any granularity (else the first record after a prepare
    /// would rewrite, and copy, every file of the image).
    pub fn differs(&self, chunk: u64, flags: &[bool], complete: bool) -> bool {
        let filled = Self::encode_filled(flags, complete);
        self.complete != complete
            || self.filled != filled
            || (!filled.is_empty() && self.chunk != chunk)
    }

    /// The `filled` field for `flags` (empty when complete or nothing is filled).
    fn encode_filled(flags: &[bool], complete: bool) -> Box<str> {
        if complete || !flags.iter().any(|f| *f) {
            return Box::default();
        }
        let mut bytes = vec![0u8; flags.len().div_ceil(8)];
        for (i, f) in flags.iter().enumerate() {
            if *f {
                bytes[i / 8] |= 1 << (i % 8);
            }
        }
        hex::encode(bytes).into()
    }
}

/// One prepared image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// Daemon-local id (the file name).
    pub id: u64,
    /// The reference as given.
    pub reference: String,
    /// Manifest digest it resolved to (a restart reopens exactly this manifest's layers).
    pub manifest_digest: String,
    /// Layer digests, lowest first.
    pub layers: Vec<String>,
    /// Destination.
    pub dest: PathBuf,
    /// Layout.
    pub mode: LayoutMode,
    /// Overlay mode: the `lowerdir=` value.
    #[serde(default)]
    pub lowerdir: Option<String>,
    /// Registry settings (credentials never stored).
    pub registry: RegistrySettings,
    /// Background prefetch on.
    pub prefetch: bool,
    /// Overlay mode: mount points of the overlays over these layers whose opens the daemon
    /// holds until filled (a successor watches them again before it serves anything).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overlays: Vec<PathBuf>,
    /// Why the image is bad (a layer that did not hash to its digest), once found: a
    /// successor serves it bad again (every read `EIO`), never its files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bad: Option<String>,
    /// The placeholders: shared by the live record and the copy last saved (a record whose
    /// progress changes copies them once), so a served file costs one record.
    #[serde(with = "shared_files")]
    pub files: Arc<Vec<FileRecord>>,
}

/// (De)serializes [`ImageRecord::files`] as the plain list.
mod shared_files {
    use std::sync::Arc;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::FileRecord;

    pub fn serialize<S: Serializer>(v: &Arc<Vec<FileRecord>>, s: S) -> Result<S::Ok, S::Error> {
        v.as_slice().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<Vec<FileRecord>>, D::Error> {
        Vec::<FileRecord>::deserialize(d).map(Arc::new)
    }
}

impl ImageRecord {
    /// `(layer, entry)` of every file, in record order.
    pub fn file_keys(&self) -> Vec<(usize, usize)> {
        self.files.iter().map(FileRecord::key).collect()
    }
}

/// A prepare under way (`STATE_DIR/preparing/ID.json`): written before the first
/// placeholder is created and removed once the image is recorded, so that a successor can
/// tell a tree a dead daemon left half made (its placeholders unmarked, its holes readable)
/// and remove it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrepareIntent {
    /// The destination directory.
    pub dest: PathBuf,
    /// Its device, inode and birth time (a directory put there since is never touched).
    pub key: (u64, u64, Option<std::time::SystemTime>),
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// Opens (creating) the state directory.
    pub fn open(root: &Path) -> Result<StateDir, StateError> {
        let images = root.join("images");
        std::fs::create_dir_all(&images).map_err(|source| StateError::Io {
            path: images.clone(),
            source,
        })?;
        Ok(StateDir {
            root: root.to_path_buf(),
        })
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn image_path(&self, id: u64) -> PathBuf {
        self.root.join("images").join(format!("{id}.json"))
    }

    /// Every recorded image, by id.
    pub fn load(&self) -> Result<Vec<ImageRecord>, StateError> {
        let dir = self.root.join("images");
        let rd = std::fs::read_dir(&dir).map_err(|source| StateError::Io {
            path: dir.clone(),
            source,
        })?;
        let mut out = Vec::new();
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let bytes = std::fs::read(&p).map_err(|source| StateError::Io {
                path: p.clone(),
                source,
            })?;
            let rec: ImageRecord = serde_json::from_slice(&bytes)
                .map_err(|source| StateError::Corrupt { path: p, source })?;
            out.push(rec);
        }
        out.sort_by_key(|r| r.id);
        Ok(out)
    }

    /// Writes one image's record atomically.
    pub fn save(&self, rec: &ImageRecord) -> Result<(), StateError> {
        let path = self.image_path(rec.id);
        let io = |source| StateError::Io {
            path: path.clone(),
            source,
        };
        let tmp = path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        let bytes = serde_json::to_vec(rec).map_err(|e| io(std::io::Error::other(e)))?;
        f.write_all(&bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        if let Some(dir) = path.parent()
            && let Ok(d) = std::fs::File::open(dir)
        {
            let _ = d.sync_all();
        }
        Ok(())
    }

    fn intent_path(&self, id: u64) -> PathBuf {
        self.root.join("preparing").join(format!("{id}.json"))
    }

    /// Records that image `id` is being prepared into `intent.dest` (durably, before
    /// anything is created there).
    pub fn begin_prepare(&self, id: u64, intent: &PrepareIntent) -> Result<(), StateError> {
        let path = self.intent_path(id);
        let io = |source| StateError::Io {
            path: path.clone(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let bytes = serde_json::to_vec(intent).map_err(|e| io(std::io::Error::other(e)))?;
        let mut f = std::fs::File::create(&path).map_err(io)?;
        f.write_all(&bytes).map_err(io)?;
        f.sync_all().map_err(io)
    }

    /// The prepare of image `id` is over (recorded, or cleaned up).
    pub fn end_prepare(&self, id: u64) {
        let _ = std::fs::remove_file(self.intent_path(id));
    }

    /// Prepares a predecessor began and never ended, by image id (unreadable ones are
    /// skipped).
    pub fn unfinished_prepares(&self) -> Vec<(u64, PrepareIntent)> {
        let Ok(rd) = std::fs::read_dir(self.root.join("preparing")) else {
            return Vec::new();
        };
        rd.flatten()
            .filter_map(|e| {
                let p = e.path();
                let id = p.file_stem()?.to_str()?.parse().ok()?;
                let intent = serde_json::from_slice(&std::fs::read(&p).ok()?).ok()?;
                Some((id, intent))
            })
            .collect()
    }

    /// Deletes one image's record.
    pub fn remove(&self, id: u64) -> Result<(), StateError> {
        let path = self.image_path(id);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StateError::Io { path, source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record of an unfilled file `/x` of `size` bytes, entry `entry` of layer 0.
    fn unfilled(entry: u32, size: u64) -> FileRecord {
        FileRecord {
            path: Path::new("/x").into(),
            layer: 0,
            entry,
            size,
            chunk: 0,
            complete: false,
            filled: Box::default(),
        }
    }

    #[test]
    fn progress_differs_only_where_something_is_recorded() {
        let mut f = unfilled(0, 4 << 20);
        let none = [false; 4];
        // Prepared, never filled: the engine's granularity (unknown to the record) is no change.
        assert!(!f.differs(1 << 20, &none, false));
        assert!(f.differs(1 << 20, &[true, false, false, false], false));
        assert!(f.differs(1 << 20, &none, true));
        f.set_filled(1 << 20, &[true, false, false, false], false);
        assert!(!f.differs(1 << 20, &[true, false, false, false], false));
        assert!(f.differs(512 << 10, &[true, false, false, false], false));
    }

    #[test]
    fn bitmap_round_trip_and_atomic_save() {
        let mut f = unfilled(3, 10 << 20);
        let flags: Vec<bool> = (0..40).map(|i| i % 3 == 0).collect();
        f.set_filled(256 << 10, &flags, false);
        assert_eq!(f.filled_flags(40), flags);
        let dir = tempfile::tempdir().unwrap();
        let st = StateDir::open(dir.path()).unwrap();
        let rec = ImageRecord {
            id: 7,
            reference: "oci:/a:1".into(),
            manifest_digest: "sha256:00".into(),
            layers: vec![],
            dest: "/d".into(),
            mode: LayoutMode::Direct,
            lowerdir: None,
            registry: RegistrySettings::default(),
            prefetch: false,
            overlays: vec!["/run/c/rootfs".into()],
            bad: Some("layer sha256:11 does not match its digest".into()),
            files: Arc::new(vec![f]),
        };
        st.save(&rec).unwrap();
        assert_eq!(st.load().unwrap(), vec![rec]);
        st.remove(7).unwrap();
        assert!(st.load().unwrap().is_empty());
    }
}
