//! The snapshotter's metadata: every snapshot containerd knows under this snapshotter, with
//! its kind, parent, labels and where its files are, persisted in one JSON file
//! (`STATE_DIR/snapshots/metadata.json`, replaced atomically on every change) so that it
//! survives restarts, SIGKILL included.
//!
//! Owns the snapshot model containerd expects (names unique across kinds, parents that must
//! be committed, no removal of a snapshot with children, commit turning an active snapshot
//! into a committed one under a new name, label updates by field path, list filters) and
//! the lazy images the remote snapshots point into. It never touches the files of a
//! snapshot, mounts, or the daemon: [`super::Snapshotter`] does.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::SnapshotterError;

/// A snapshot's kind, as containerd names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Read-only view of a parent.
    View,
    /// Writable, may be committed.
    Active,
    /// Immutable, may be a parent.
    Committed,
}

/// A remote (lazy) layer: one layer tree of an image the daemon serves in overlay mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteLayer {
    /// The image's destination directory (the daemon's key for it).
    pub image: PathBuf,
    /// The layer's digest.
    pub digest: String,
    /// The layer's placeholder tree (an overlay lower directory).
    pub dir: PathBuf,
}

/// One snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Unique number; names its directory `snapshots/ID`.
    pub id: u64,
    /// Kind.
    pub kind: Kind,
    /// Parent name (committed), empty for none.
    #[serde(default)]
    pub parent: String,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Created, nanoseconds since the epoch.
    pub created: u128,
    /// Updated, nanoseconds since the epoch.
    pub updated: u128,
    /// Set for a remote layer: its files are the layer tree, not `snapshots/ID/fs`.
    #[serde(default)]
    pub remote: Option<RemoteLayer>,
    /// An active or view snapshot stacked over remote layers: the snapshotter mounted the
    /// overlay itself at `snapshots/ID/merged` and hands out a bind mount of it.
    #[serde(default)]
    pub own_mount: bool,
    /// Disk usage recorded at commit (a remote layer: when first asked): (bytes, inodes).
    #[serde(default)]
    pub usage: Option<(u64, u64)>,
}

/// A lazily served image the remote snapshots point into.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LazyImage {
    /// The reference it was prepared from.
    pub reference: String,
    /// Its destination directory.
    pub dest: PathBuf,
    /// Its layers, lowest first: digest and placeholder tree (`None`: hidden by an opaque
    /// layer above it, not created). Recorded as the daemon announced them while it made
    /// them, then as made.
    pub layers: Vec<(String, Option<PathBuf>)>,
    /// The manifest the reference resolved to: what the image is prepared from again if
    /// its trees are gone (absent in records of earlier versions).
    #[serde(default)]
    pub manifest_digest: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Persisted {
    next_id: u64,
    snapshots: BTreeMap<String, Record>,
    #[serde(default)]
    images: Vec<LazyImage>,
}

/// The metadata store.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    data: Persisted,
}

/// Now, in nanoseconds since the epoch.
pub fn now() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn not_found(key: &str) -> SnapshotterError {
    SnapshotterError::NotFound(format!("snapshot {key}"))
}

impl Store {
    /// Opens (or starts) the store kept at `path`.
    pub fn open(path: &Path) -> Result<Store, SnapshotterError> {
        let data = match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| SnapshotterError::Metadata {
                path: path.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Persisted {
                next_id: 1,
                ..Persisted::default()
            },
            Err(source) => {
                return Err(SnapshotterError::Metadata {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        Ok(Store {
            path: path.to_path_buf(),
            data,
        })
    }

    /// Writes the store: a new file synced, renamed over the old one, directory synced.
    pub fn save(&self) -> Result<(), SnapshotterError> {
        let err = |source| SnapshotterError::Metadata {
            path: self.path.clone(),
            source,
        };
        let tmp = self.path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(&self.data).map_err(std::io::Error::other);
        let bytes = bytes.map_err(err)?;
        let mut f = std::fs::File::create(&tmp).map_err(err)?;
        f.write_all(&bytes).map_err(err)?;
        f.sync_all().map_err(err)?;
        std::fs::rename(&tmp, &self.path).map_err(err)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(err)?;
        }
        Ok(())
    }

    /// The snapshot named `key`.
    pub fn get(&self, key: &str) -> Result<&Record, SnapshotterError> {
        self.data.snapshots.get(key).ok_or_else(|| not_found(key))
    }

    /// Every snapshot, by name.
    pub fn all(&self) -> impl Iterator<Item = (&String, &Record)> {
        self.data.snapshots.iter()
    }

    /// `key`'s ancestors, nearest first.
    pub fn ancestors(&self, key: &str) -> Result<Vec<(&String, &Record)>, SnapshotterError> {
        let mut out = Vec::new();
        let mut next = self.get(key)?.parent.clone();
        while !next.is_empty() {
            let (name, rec) = self
                .data
                .snapshots
                .get_key_value(&next)
                .ok_or_else(|| not_found(&next))?;
            if out.len() > self.data.snapshots.len() {
                return Err(SnapshotterError::Internal(format!("parent loop at {name}")));
            }
            out.push((name, rec));
            next = rec.parent.clone();
        }
        Ok(out)
    }

    /// Creates an active or view snapshot `key` over `parent` (committed, or empty).
    pub fn create(
        &mut self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Record, SnapshotterError> {
        if key.is_empty() {
            return Err(SnapshotterError::InvalidArgument("empty key".into()));
        }
        if self.data.snapshots.contains_key(key) {
            return Err(SnapshotterError::AlreadyExists(format!("snapshot {key}")));
        }
        if !parent.is_empty() {
            let p = self.get(parent)?;
            if p.kind != Kind::Committed {
                return Err(SnapshotterError::InvalidArgument(format!(
                    "parent {parent} is not committed"
                )));
            }
        }
        let t = now();
        let rec = Record {
            id: self.take_id(),
            kind,
            parent: parent.to_string(),
            labels,
            created: t,
            updated: t,
            remote: None,
            own_mount: false,
            usage: None,
        };
        self.data.snapshots.insert(key.to_string(), rec.clone());
        Ok(rec)
    }

    /// Records a committed remote layer `name` over `parent`.
    pub fn insert_remote(
        &mut self,
        name: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
        remote: RemoteLayer,
    ) -> Result<Record, SnapshotterError> {
        let mut rec = self.create(Kind::Committed, name, parent, labels)?;
        rec.remote = Some(remote);
        self.data.snapshots.insert(name.to_string(), rec.clone());
        Ok(rec)
    }

    /// Records the usage of committed `key` measured after its commit (a remote layer's);
    /// nothing when it is gone or has one already.
    pub fn set_usage(&mut self, key: &str, usage: (u64, u64)) {
        if let Some(rec) = self.data.snapshots.get_mut(key)
            && rec.kind == Kind::Committed
            && rec.usage.is_none()
        {
            rec.usage = Some(usage);
        }
    }

    /// Marks `key` as mounted by the snapshotter itself.
    pub fn set_own_mount(&mut self, key: &str, own: bool) -> Result<(), SnapshotterError> {
        let rec = self
            .data
            .snapshots
            .get_mut(key)
            .ok_or_else(|| not_found(key))?;
        rec.own_mount = own;
        Ok(())
    }

    fn take_id(&mut self) -> u64 {
        let id = self.data.next_id.max(1);
        self.data.next_id = id + 1;
        id
    }

    /// Commits active `key` as `name` with `labels`; the record keeps its id (its files).
    pub fn commit(
        &mut self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
        usage: (u64, u64),
    ) -> Result<Record, SnapshotterError> {
        if self.data.snapshots.contains_key(name) {
            return Err(SnapshotterError::AlreadyExists(format!("snapshot {name}")));
        }
        let rec = self.get(key)?;
        if rec.kind != Kind::Active {
            return Err(SnapshotterError::FailedPrecondition(format!(
                "snapshot {key} is not active"
            )));
        }
        if self.has_children(key) {
            return Err(SnapshotterError::FailedPrecondition(format!(
                "snapshot {key} has children"
            )));
        }
        let mut rec = self
            .data
            .snapshots
            .remove(key)
            .ok_or_else(|| not_found(key))?;
        rec.kind = Kind::Committed;
        rec.labels = labels;
        rec.updated = now();
        rec.usage = Some(usage);
        self.data.snapshots.insert(name.to_string(), rec.clone());
        Ok(rec)
    }

    fn has_children(&self, key: &str) -> bool {
        self.data.snapshots.values().any(|r| r.parent == key)
    }

    /// Removes `key` (no children allowed) and returns its record.
    pub fn remove(&mut self, key: &str) -> Result<Record, SnapshotterError> {
        self.get(key)?;
        if self.has_children(key) {
            return Err(SnapshotterError::FailedPrecondition(format!(
                "cannot remove snapshot {key} with children"
            )));
        }
        self.data
            .snapshots
            .remove(key)
            .ok_or_else(|| not_found(key))
    }

    /// Updates `key`'s labels: `paths` empty or `labels` replaces them all, `labels.K` sets
    /// or (absent from `labels`) deletes one.
    pub fn update_labels(
        &mut self,
        key: &str,
        labels: BTreeMap<String, String>,
        paths: &[String],
    ) -> Result<Record, SnapshotterError> {
        let rec = self
            .data
            .snapshots
            .get_mut(key)
            .ok_or_else(|| not_found(key))?;
        if paths.is_empty() {
            rec.labels = labels;
        } else {
            for p in paths {
                if p == "labels" {
                    rec.labels = labels.clone();
                } else if let Some(k) = p.strip_prefix("labels.") {
                    match labels.get(k) {
                        Some(v) => rec.labels.insert(k.to_string(), v.clone()),
                        None => rec.labels.remove(k),
                    };
                } else {
                    return Err(SnapshotterError::InvalidArgument(format!(
                        "cannot update field {p} of snapshot {key}"
                    )));
                }
            }
        }
        rec.updated = now();
        Ok(rec.clone())
    }

    /// The committed remote snapshot for `target` (the `containerd.io/snapshot.ref` label)
    /// over `parent`, if there is one.
    pub fn find_remote(&self, target: &str, parent: &str) -> Option<(&String, &Record)> {
        self.data.snapshots.iter().find(|(_, r)| {
            r.kind == Kind::Committed
                && r.parent == parent
                && r.labels.get(super::LABEL_SNAPSHOT_REF).map(String::as_str) == Some(target)
        })
    }

    /// The lazy images.
    pub fn images(&self) -> &[LazyImage] {
        &self.data.images
    }

    /// Records a lazy image.
    pub fn add_image(&mut self, image: LazyImage) {
        self.data.images.push(image);
    }

    /// Records the layers of the lazy image at `dest` as the daemon made them.
    pub fn set_image_layers(&mut self, dest: &Path, layers: Vec<(String, Option<PathBuf>)>) {
        if let Some(i) = self.data.images.iter_mut().find(|i| i.dest == dest) {
            i.layers = layers;
        }
    }

    /// Forgets the lazy image at `dest`.
    pub fn remove_image(&mut self, dest: &Path) {
        self.data.images.retain(|i| i.dest != dest);
    }

    /// Whether any snapshot still points into the image at `dest`.
    pub fn image_in_use(&self, dest: &Path) -> bool {
        self.data
            .snapshots
            .values()
            .any(|r| r.remote.as_ref().is_some_and(|l| l.image == dest))
    }

    /// A fresh number for a lazy image's directory.
    pub fn next_image_number(&mut self) -> u64 {
        self.take_id()
    }
}

/// Whether `name`/`rec` passes containerd's list filters: each filter is a comma-separated
/// conjunction of `FIELD==VALUE` or `FIELD!=VALUE` (`name`, `parent`, `kind`,
/// `labels."KEY"` or `labels.KEY`; values may be quoted); filters are alternatives. An
/// expression this cannot read matches (containerd checks what it asked for again).
pub fn matches(filters: &[String], name: &str, rec: &Record) -> bool {
    if filters.iter().all(|f| f.trim().is_empty()) {
        return true;
    }
    filters.iter().any(|f| {
        f.split(',').all(|clause| {
            let (field, value, negate) = match clause.split_once("!=") {
                Some((f, v)) => (f, v, true),
                None => match clause.split_once("==") {
                    Some((f, v)) => (f, v, false),
                    None => return true,
                },
            };
            let unquote = |s: &str| s.trim().trim_matches('"').to_string();
            let (field, value) = (field.trim(), unquote(value));
            let actual = match field {
                "name" => Some(name.to_string()),
                "parent" => Some(rec.parent.clone()),
                "kind" => Some(
                    match rec.kind {
                        Kind::View => "view",
                        Kind::Active => "active",
                        Kind::Committed => "committed",
                    }
                    .to_string(),
                ),
                f => match f.strip_prefix("labels.") {
                    Some(k) => rec.labels.get(&unquote(k)).cloned(),
                    None => return true,
                },
            };
            (actual.as_deref() == Some(value.as_str())) != negate
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn chain_commit_remove_and_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metadata.json");
        let mut s = Store::open(&path).unwrap();
        let a = s.create(Kind::Active, "a", "", BTreeMap::new()).unwrap();
        assert!(matches!(
            s.create(Kind::Active, "a", "", BTreeMap::new()),
            Err(SnapshotterError::AlreadyExists(_))
        ));
        // An active snapshot cannot be a parent.
        assert!(matches!(
            s.create(Kind::Active, "b", "a", BTreeMap::new()),
            Err(SnapshotterError::InvalidArgument(_))
        ));
        let c = s
            .commit("base", "a", labels(&[("x", "1")]), (10, 2))
            .unwrap();
        assert_eq!(c.id, a.id);
        assert!(matches!(s.get("a"), Err(SnapshotterError::NotFound(_))));
        s.create(Kind::Active, "top", "base", BTreeMap::new())
            .unwrap();
        s.create(Kind::View, "v", "base", BTreeMap::new()).unwrap();
        assert_eq!(
            s.ancestors("top")
                .unwrap()
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>(),
            ["base"]
        );
        assert!(matches!(
            s.remove("base"),
            Err(SnapshotterError::FailedPrecondition(_))
        ));
        s.update_labels("base", labels(&[("y", "2")]), &["labels.y".into()])
            .unwrap();
        s.update_labels("base", BTreeMap::new(), &["labels.x".into()])
            .unwrap();
        assert_eq!(s.get("base").unwrap().labels, labels(&[("y", "2")]));
        s.save().unwrap();

        let mut s = Store::open(&path).unwrap();
        assert_eq!(s.get("base").unwrap().usage, Some((10, 2)));
        assert_eq!(s.get("v").unwrap().kind, Kind::View);
        s.remove("top").unwrap();
        s.remove("v").unwrap();
        s.remove("base").unwrap();
        assert_eq!(s.all().count(), 0);
        // Numbers are never reused.
        assert!(s.create(Kind::Active, "n", "", BTreeMap::new()).unwrap().id > c.id);
    }

    #[test]
    fn filters_as_containerd_writes_them() {
        let mut s = Store::open(&tempfile::tempdir().unwrap().path().join("m.json")).unwrap();
        let l = labels(&[(crate::snapshotter::LABEL_SNAPSHOT_REF, "sha256:ab")]);
        s.create(Kind::Active, "k", "", l).unwrap();
        let rec = s.get("k").unwrap().clone();
        let f = |x: &str| matches(&[x.to_string()], "k", &rec);
        assert!(f(
            r#"labels."containerd.io/snapshot.ref"==sha256:ab,parent=="""#
        ));
        assert!(!f(r#"labels."containerd.io/snapshot.ref"==sha256:cd"#));
        assert!(!f(r#"parent=="p""#));
        assert!(f("kind==active"));
        assert!(f("kind!=view"));
        assert!(matches(&[], "k", &rec));
    }
}
