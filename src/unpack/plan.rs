//! Planning: the in-memory trees an unpack will materialise, computed before the first write.
//!
//! Pure logic, no syscalls. Every entry path is validated here, whiteouts and opaque markers
//! are applied, same-layer duplicates collapse (last wins), hardlinks are resolved to the
//! entry that owns their inode, and every parent a tree needs is present as a directory.
//! Nothing is ever placed beneath a non-directory, so materialising a plan never has to
//! traverse a symlink.

use std::collections::BTreeMap;

use crate::index::{Entry, EntryKind};

use super::{Layer, UnpackError};

/// A path inside a tree: its components joined by NUL bytes (the root is empty).
///
/// NUL sorts below every byte a name can hold, so in a `BTreeMap` every directory is
/// followed immediately by its whole subtree (`a`, `a/b`, `a.b` rather than `a`, `a.b`,
/// `a/b`), which is the order materialisation walks in.
pub(crate) type Key = Vec<u8>;

/// The separator of [`Key`] components.
const SEP: u8 = 0;

/// One entry of one layer: indices into the caller's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct EntryRef {
    /// Layer index, lowest layer first.
    pub layer: usize,
    /// Entry index inside that layer.
    pub entry: usize,
}

/// One object of a planned tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Node {
    /// A directory with the metadata of `meta`, or the default metadata when `None`
    /// (a parent no layer describes).
    Dir {
        /// Entry whose metadata the directory carries.
        meta: Option<EntryRef>,
        /// Overlay mode: hide the lower layers' children (`trusted.overlay.opaque=y`).
        opaque: bool,
    },
    /// A non-directory: the inode of `inode` (a file, symlink, fifo or device entry), named
    /// here by `via` (the same entry, or a hardlink entry).
    Leaf {
        /// Entry that describes the inode.
        inode: EntryRef,
        /// Entry that names this path.
        via: EntryRef,
    },
    /// Overlay mode: a whiteout (a 0:0 character device) hiding the lower layers' object.
    Whiteout,
}

/// The metadata entry and opaqueness of a planned tree's root (the node under the empty
/// key): defaults when no layer describes it.
pub(crate) fn root_of(nodes: &std::collections::BTreeMap<Key, Node>) -> (Option<EntryRef>, bool) {
    match nodes.get(&[][..]) {
        Some(Node::Dir { meta, opaque }) => (*meta, *opaque),
        _ => (None, false),
    }
}

/// The result of planning.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    /// The flattened view of all layers: the one tree of direct mode, and what an overlay
    /// mount of the per-layer trees shows.
    pub merged: BTreeMap<Key, Node>,
    /// Overlay mode: one tree per layer (lowest first), in overlayfs form. Empty in direct
    /// mode.
    pub layers: Vec<BTreeMap<Key, Node>>,
    /// The lowest layer anything of which is visible: the highest layer whose root is opaque
    /// (`.wh..wh..opq` at the top), or 0. overlayfs ignores the opaque xattr on a layer's
    /// root directory, so the layers below this one must be left out of the mount instead.
    pub first_visible: usize,
}

/// What an entry's path names.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Class {
    /// An object at this key (the root is the empty key).
    Object(Key),
    /// `DIR/.wh.NAME`: hide `DIR/NAME` (the key) of the lower layers.
    Whiteout(Key),
    /// `DIR/.wh..wh..opq`: hide all lower-layer children of `DIR` (the key).
    Opaque(Key),
    /// Other `.wh..wh.` names (aufs bookkeeping such as `.wh..wh.plnk`): ignored.
    Ignored,
}

const WH_PREFIX: &str = ".wh.";
const WH_META_PREFIX: &str = ".wh..wh.";
const WH_OPAQUE: &str = ".wh..wh..opq";

/// Splits a layer path into validated components. The index already normalises paths;
/// this is the defence: absolute paths, `..`, `.` and empty components and NUL bytes are
/// refused, a leading `./` and trailing `/` are tolerated, and `.` or the empty path is the
/// root.
pub(crate) fn components(path: &str) -> Result<Vec<&str>, &'static str> {
    if path.as_bytes().contains(&0) {
        return Err("NUL byte in path");
    }
    if path.starts_with('/') {
        return Err("absolute path");
    }
    let mut p = path;
    while let Some(rest) = p.strip_prefix("./") {
        p = rest;
    }
    let p = p.trim_end_matches('/');
    if p.is_empty() || p == "." {
        return Ok(Vec::new());
    }
    let comps: Vec<&str> = p.split('/').collect();
    for c in &comps {
        match *c {
            "" => return Err("empty path component"),
            "." => return Err("`.` path component"),
            ".." => return Err("`..` path component"),
            _ => {}
        }
    }
    Ok(comps)
}

/// Joins components into a [`Key`].
pub(crate) fn key_of(comps: &[&str]) -> Key {
    let mut key = Vec::with_capacity(comps.iter().map(|c| c.len() + 1).sum());
    for (i, c) in comps.iter().enumerate() {
        if i > 0 {
            key.push(SEP);
        }
        key.extend_from_slice(c.as_bytes());
    }
    key
}

/// Classifies an entry path.
pub(crate) fn classify(path: &str) -> Result<Class, &'static str> {
    let comps = components(path)?;
    let Some((last, parent)) = comps.split_last() else {
        return Ok(Class::Object(Vec::new()));
    };
    if *last == WH_OPAQUE {
        return Ok(Class::Opaque(key_of(parent)));
    }
    if last.starts_with(WH_META_PREFIX) {
        return Ok(Class::Ignored);
    }
    if let Some(name) = last.strip_prefix(WH_PREFIX) {
        if name.is_empty() || name == "." || name == ".." {
            return Err("whiteout of an invalid name");
        }
        let mut c = parent.to_vec();
        c.push(name);
        return Ok(Class::Whiteout(key_of(&c)));
    }
    Ok(Class::Object(key_of(&comps)))
}

/// The parent of a non-root key.
pub(crate) fn parent(key: &[u8]) -> &[u8] {
    match key.iter().rposition(|b| *b == SEP) {
        Some(i) => &key[..i],
        None => &[],
    }
}

/// The last component of a non-root key.
pub(crate) fn name(key: &[u8]) -> &[u8] {
    match key.iter().rposition(|b| *b == SEP) {
        Some(i) => &key[i + 1..],
        None => key,
    }
}

/// A key as a `/`-separated relative path (`.` for the root), for messages.
pub(crate) fn display(key: &[u8]) -> String {
    if key.is_empty() {
        return ".".to_owned();
    }
    let bytes: Vec<u8> = key
        .iter()
        .map(|b| if *b == SEP { b'/' } else { *b })
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The strict ancestors of a key, root first.
fn ancestors(key: &[u8]) -> impl Iterator<Item = &[u8]> {
    let root = if key.is_empty() {
        None
    } else {
        Some(&key[..0])
    };
    root.into_iter().chain(
        key.iter()
            .enumerate()
            .filter(|(_, b)| **b == SEP)
            .map(move |(i, _)| &key[..i]),
    )
}

/// Removes every strict descendant of `key` from `map`. They are the keys right after
/// `key` (NUL sorts below every name byte), so the walk stops at the first other key: most
/// keys have no descendant and cost one step.
fn remove_below(map: &mut BTreeMap<Key, Node>, key: &[u8]) {
    use std::ops::Bound::{Excluded, Unbounded};
    let below = |k: &[u8]| k.starts_with(key) && (key.is_empty() || k.get(key.len()) == Some(&SEP));
    let doomed: Vec<Key> = map
        .range::<[u8], _>((Excluded(key), Unbounded))
        .map(|(k, _)| k)
        .take_while(|k| below(k))
        .cloned()
        .collect();
    for k in doomed {
        map.remove(&k);
    }
}

/// Plans the trees for `layers`. With `overlay`, one tree per layer is kept as well.
pub(crate) fn plan(layers: &[Layer<'_>], overlay: bool) -> Result<Plan, UnpackError> {
    let mut plan = Plan::default();
    plan.merged.insert(
        Vec::new(),
        Node::Dir {
            meta: None,
            opaque: false,
        },
    );
    for (li, layer) in layers.iter().enumerate() {
        let mut tree = plan_layer(&mut plan.merged, li, layer)?;
        if let Some(Node::Dir { opaque, .. }) = tree.get_mut(&[][..]) {
            if *opaque {
                *opaque = false;
                plan.first_visible = li;
            }
        }
        if overlay {
            plan.layers.push(tree);
        }
    }
    Ok(plan)
}

/// State while one layer is planned.
struct LayerPlanner<'m, 'l> {
    merged: &'m mut BTreeMap<Key, Node>,
    tree: BTreeMap<Key, Node>,
    li: usize,
    layer: &'l Layer<'l>,
}

impl LayerPlanner<'_, '_> {
    fn bad(&self, ei: usize, reason: &'static str) -> UnpackError {
        UnpackError::BadPath {
            layer: self.layer.digest.to_owned(),
            path: self.layer.entries[ei].path.to_string(),
            reason,
        }
    }

    fn not_dir(&self, ei: usize, at: &[u8]) -> UnpackError {
        UnpackError::NotADirectory {
            layer: self.layer.digest.to_owned(),
            path: self.layer.entries[ei].path.to_string(),
            parent: display(at),
        }
    }

    /// Makes `key` a directory of this layer's tree, inheriting the merged view's metadata
    /// when it already is a directory there, and the default metadata (also in the merged
    /// view) when it is not.
    fn implicit_dir(&mut self, key: &[u8]) {
        match self.merged.get(key) {
            Some(Node::Dir { meta, .. }) => {
                let meta = *meta;
                self.tree.insert(
                    key.to_vec(),
                    Node::Dir {
                        meta,
                        opaque: false,
                    },
                );
            }
            _ => {
                let dir = Node::Dir {
                    meta: None,
                    opaque: false,
                };
                self.merged.insert(key.to_vec(), dir);
                self.tree.insert(key.to_vec(), dir);
            }
        }
    }

    /// Makes every strict ancestor of `key` a directory of this layer's tree. A non-directory
    /// of this same layer in the way is an error; one of a lower layer is replaced.
    ///
    /// Looks from the parent up and stops at the first ancestor the tree has: every object
    /// of the tree has its own ancestors there as directories (this function put them), so
    /// the ancestors above it need no lookup. A file in a directory already seen costs one
    /// lookup instead of one per level.
    fn ensure_parents(&mut self, ei: usize, key: &[u8]) -> Result<(), UnpackError> {
        if key.is_empty() {
            return Ok(());
        }
        let mut missing: Vec<&[u8]> = Vec::new();
        let mut a = parent(key);
        loop {
            match self.tree.get(a) {
                Some(Node::Dir { .. }) => break,
                Some(_) => return Err(self.not_dir(ei, a)),
                None => missing.push(a),
            }
            if a.is_empty() {
                break;
            }
            a = parent(a);
        }
        for a in missing.into_iter().rev() {
            self.implicit_dir(a);
        }
        Ok(())
    }

    /// Places a directory entry at `key`.
    fn put_dir(&mut self, ei: usize, key: &[u8]) {
        let r = Some(EntryRef {
            layer: self.li,
            entry: ei,
        });
        self.tree.insert(
            key.to_vec(),
            Node::Dir {
                meta: r,
                opaque: false,
            },
        );
        match self.merged.get_mut(key) {
            Some(Node::Dir { meta, .. }) => *meta = r,
            _ => {
                self.merged.insert(
                    key.to_vec(),
                    Node::Dir {
                        meta: r,
                        opaque: false,
                    },
                );
            }
        }
    }

    /// Places a non-directory at `key`; it hides whatever lower layers had there.
    fn put_leaf(&mut self, ei: usize, key: &[u8], inode: EntryRef) -> Result<(), UnpackError> {
        if let Some(Node::Dir { .. }) = self.tree.get(key) {
            return Err(self.not_dir(ei, key));
        }
        let leaf = Node::Leaf {
            inode,
            via: EntryRef {
                layer: self.li,
                entry: ei,
            },
        };
        remove_below(self.merged, key);
        self.merged.insert(key.to_vec(), leaf);
        self.tree.insert(key.to_vec(), leaf);
        Ok(())
    }
}

/// Applies one layer to `merged` and returns the layer's own tree (overlay form).
fn plan_layer(
    merged: &mut BTreeMap<Key, Node>,
    li: usize,
    layer: &Layer<'_>,
) -> Result<BTreeMap<Key, Node>, UnpackError> {
    let mut p = LayerPlanner {
        merged,
        tree: BTreeMap::new(),
        li,
        layer,
    };
    // Sort the layer's members: objects (duplicates: last wins), whiteouts, opaque markers.
    let mut own: Vec<(Key, usize)> = Vec::with_capacity(layer.entries.len());
    let mut whiteouts: Vec<(Key, usize)> = Vec::new();
    let mut opaques: Vec<(Key, usize)> = Vec::new();
    for (ei, e) in layer.entries.iter().enumerate() {
        match classify(&e.path).map_err(|reason| p.bad(ei, reason))? {
            Class::Object(key) => {
                check_kind(e, key.is_empty()).map_err(|reason| p.bad(ei, reason))?;
                own.push((key, ei));
            }
            Class::Whiteout(key) => whiteouts.push((key, ei)),
            Class::Opaque(key) => opaques.push((key, ei)),
            Class::Ignored => {
                tracing::debug!(layer = layer.digest, path = %e.path, "ignoring aufs metadata entry");
            }
        }
    }

    // Whiteouts and opaque markers act on the lower layers only. A whiteout is kept for the
    // overlay tree only if it hides something that nothing else of this layer hides
    // already (ancestors are applied first: key order); see below.
    for (key, _) in &opaques {
        remove_below(p.merged, key);
    }
    whiteouts.sort();
    let mut hides = Vec::with_capacity(whiteouts.len());
    for (key, _) in &whiteouts {
        hides.push(p.merged.contains_key(key));
        remove_below(p.merged, key);
        if !key.is_empty() {
            p.merged.remove(key);
        }
    }

    // The root of the layer's tree always exists.
    p.implicit_dir(&[]);

    // Path order; of duplicates, the last entry of the layer wins.
    own.sort_unstable();
    own.dedup_by(|later, earlier| {
        let same = later.0 == earlier.0;
        if same {
            earlier.1 = later.1;
        }
        same
    });

    // Objects in path order (parents before children), hardlinks afterwards in tar order
    // so that they resolve against everything else of the layer.
    let mut hardlinks: Vec<(usize, Key)> = Vec::new();
    for (key, ei) in own {
        let e = &layer.entries[ei];
        match e.kind {
            EntryKind::Hardlink => hardlinks.push((ei, key)),
            EntryKind::Dir => {
                p.ensure_parents(ei, &key)?;
                p.put_dir(ei, &key);
            }
            _ => {
                p.ensure_parents(ei, &key)?;
                p.put_leaf(
                    ei,
                    &key,
                    EntryRef {
                        layer: li,
                        entry: ei,
                    },
                )?;
            }
        }
    }
    hardlinks.sort_by_key(|(ei, _)| *ei);
    for (ei, key) in hardlinks {
        let link = layer.entries[ei].link.as_deref().unwrap_or_default();
        let target = match classify(link) {
            Ok(Class::Object(t)) if !t.is_empty() => t,
            Ok(_) => return Err(hardlink_err(layer, ei, "target is not a plain path")),
            Err(reason) => return Err(hardlink_err(layer, ei, reason)),
        };
        let inode = match p.merged.get(&target) {
            Some(Node::Leaf { inode, .. }) => *inode,
            Some(_) => return Err(hardlink_err(layer, ei, "target is a directory")),
            None => return Err(hardlink_err(layer, ei, "target does not exist")),
        };
        p.ensure_parents(ei, &key)?;
        p.put_leaf(ei, &key, inode)?;
    }

    // Opaque markers: the directory exists in this layer and hides the lower children. One
    // at or beneath a non-directory of this layer hides nothing more than that object does.
    for (key, ei) in opaques {
        let shadowed = ancestors(&key)
            .chain(std::iter::once(&key[..]))
            .any(|a| matches!(p.tree.get(a), Some(n) if !matches!(n, Node::Dir { .. })));
        if shadowed {
            tracing::debug!(layer = layer.digest, path = %layer.entries[ei].path, "opaque marker beneath a non-directory ignored");
            continue;
        }
        p.ensure_parents(ei, &key)?;
        if !p.tree.contains_key(&key) {
            p.implicit_dir(&key);
        }
        if let Some(Node::Dir { opaque, .. }) = p.tree.get_mut(&key) {
            *opaque = true;
        }
    }

    // Whiteouts in overlay form. A same-layer object at the same path already hides the
    // lower one (a directory must also stop merging: opaque). A whiteout that hides nothing
    // is dropped: overlayfs lists whiteouts in a directory that is not merged with a lower
    // one (readdir shows the name, lookup says ENOENT), and the overlay view must never gain
    // a directory the flattened view lacks.
    for ((key, ei), hides) in whiteouts.into_iter().zip(hides) {
        match p.tree.get_mut(&key) {
            Some(Node::Dir { opaque, .. }) => *opaque = true,
            Some(_) => {}
            None if hides && matches!(p.merged.get(parent(&key)), Some(Node::Dir { .. })) => {
                p.ensure_parents(ei, &key)?;
                p.tree.insert(key, Node::Whiteout);
            }
            None => {}
        }
    }
    Ok(p.tree)
}

fn hardlink_err(layer: &Layer<'_>, ei: usize, reason: &'static str) -> UnpackError {
    let e = &layer.entries[ei];
    UnpackError::HardlinkTarget {
        layer: layer.digest.to_owned(),
        path: e.path.to_string(),
        target: e.link.as_deref().unwrap_or_default().to_string(),
        reason,
    }
}

/// Checks what an entry must carry for its kind.
fn check_kind(e: &Entry, root: bool) -> Result<(), &'static str> {
    if root && e.kind != EntryKind::Dir {
        return Err("the root entry is not a directory");
    }
    match e.kind {
        EntryKind::Symlink | EntryKind::Hardlink => match e.link.as_deref() {
            None | Some("") => Err("link entry without a target"),
            Some(t) if t.as_bytes().contains(&0) => Err("NUL byte in link target"),
            Some(_) => Ok(()),
        },
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(path: &str, kind: EntryKind) -> Entry {
        Entry::new(path, kind, 0o644)
    }
    fn f(path: &str) -> Entry {
        e(path, EntryKind::File)
    }
    fn d(path: &str) -> Entry {
        e(path, EntryKind::Dir)
    }
    fn sl(path: &str, to: &str) -> Entry {
        Entry {
            link: Some(to.into()),
            ..e(path, EntryKind::Symlink)
        }
    }
    fn hl(path: &str, to: &str) -> Entry {
        Entry {
            link: Some(to.into()),
            ..e(path, EntryKind::Hardlink)
        }
    }

    /// Plans `layers` and renders the merged view as `path -> layer.entry` (`d` for a
    /// default-metadata directory, `/` suffix for directories).
    fn merged(layers: &[Vec<Entry>]) -> Vec<String> {
        let ls: Vec<Layer<'_>> = layers
            .iter()
            .map(|es| Layer {
                digest: "sha256:test",
                entries: es,
            })
            .collect();
        let plan = plan(&ls, false).unwrap();
        render(&plan.merged)
    }

    fn render(map: &BTreeMap<Key, Node>) -> Vec<String> {
        map.iter()
            .map(|(k, n)| match n {
                Node::Dir { meta, opaque } => format!(
                    "{}/ {}{}",
                    display(k),
                    meta.map_or("d".to_owned(), |r| format!("{}.{}", r.layer, r.entry)),
                    if *opaque { " opq" } else { "" }
                ),
                Node::Leaf { inode, via } => {
                    if inode == via {
                        format!("{} {}.{}", display(k), inode.layer, inode.entry)
                    } else {
                        format!(
                            "{} {}.{}=>{}.{}",
                            display(k),
                            via.layer,
                            via.entry,
                            inode.layer,
                            inode.entry
                        )
                    }
                }
                Node::Whiteout => format!("{} wh", display(k)),
            })
            .collect()
    }

    #[test]
    fn paths_are_validated() {
        assert_eq!(components("a/b").unwrap(), vec!["a", "b"]);
        assert_eq!(components("./a/b/").unwrap(), vec!["a", "b"]);
        assert!(components(".").unwrap().is_empty());
        assert!(components("").unwrap().is_empty());
        assert!(components("./").unwrap().is_empty());
        assert_eq!(components("/etc"), Err("absolute path"));
        assert_eq!(components("a/../b"), Err("`..` path component"));
        assert_eq!(components(".."), Err("`..` path component"));
        assert_eq!(components("a//b"), Err("empty path component"));
        assert_eq!(components("a/./b"), Err("`.` path component"));
        assert_eq!(components("a\0b"), Err("NUL byte in path"));
        assert_eq!(
            classify("a/.wh.b").unwrap(),
            Class::Whiteout(key_of(&["a", "b"]))
        );
        assert_eq!(classify(".wh.b").unwrap(), Class::Whiteout(key_of(&["b"])));
        assert_eq!(
            classify("a/.wh..wh..opq").unwrap(),
            Class::Opaque(key_of(&["a"]))
        );
        assert_eq!(classify(".wh..wh..opq").unwrap(), Class::Opaque(Vec::new()));
        assert_eq!(classify("a/.wh..wh.plnk").unwrap(), Class::Ignored);
        assert!(classify("a/.wh...").is_err());
        assert!(classify("a/.wh.").is_err());
    }

    #[test]
    fn keys_sort_subtrees_together() {
        let mut keys = vec![key_of(&["a.b"]), key_of(&["a", "b"]), key_of(&["a"])];
        keys.sort();
        assert_eq!(
            keys,
            vec![key_of(&["a"]), key_of(&["a", "b"]), key_of(&["a.b"])]
        );
        assert_eq!(parent(&key_of(&["a", "b", "c"])), key_of(&["a", "b"]));
        assert_eq!(parent(&key_of(&["a"])), Vec::<u8>::new());
        assert_eq!(name(&key_of(&["a", "b"])), b"b");
        assert_eq!(display(&key_of(&["a", "b"])), "a/b");
        let abc = key_of(&["a", "b", "c"]);
        let anc: Vec<_> = ancestors(&abc).collect();
        assert_eq!(anc, vec![&b""[..], b"a", b"a\0b"]);
        assert_eq!(ancestors(&[]).count(), 0);
    }

    #[test]
    fn whiteouts_and_opaque_dirs_across_three_layers() {
        let l0 = vec![
            d("etc"),
            f("etc/passwd"),
            f("etc/shadow"),
            d("opt"),
            d("opt/app"),
            f("opt/app/old"),
            d("var"),
            f("var/log"),
        ];
        let l1 = vec![
            f("etc/.wh.shadow"),
            f("opt/app/.wh..wh..opq"),
            f("opt/app/new"),
            f(".wh.var"),
        ];
        // The opaque marker comes after a same-layer child: that child survives.
        let l2 = vec![d("etc"), f("etc/hosts"), f("etc/.wh..wh..opq"), d("var")];
        assert_eq!(
            merged(&[l0, l1, l2]),
            vec![
                "./ d",
                "etc/ 2.0",
                "etc/hosts 2.1",
                "opt/ 0.3",
                "opt/app/ 0.4",
                "opt/app/new 1.2",
                "var/ 2.3",
            ]
        );
    }

    #[test]
    fn overlay_trees_carry_whiteouts_and_opaque_flags() {
        let l0 = vec![d("a"), f("a/x"), f("a/y"), d("b"), f("b/z")];
        let l1 = vec![f("a/.wh.x"), f("b/.wh..wh..opq"), f("b/n"), f("c/.wh.q")];
        let ls = [
            Layer {
                digest: "l0",
                entries: &l0,
            },
            Layer {
                digest: "l1",
                entries: &l1,
            },
        ];
        let plan = plan(&ls, true).unwrap();
        assert_eq!(
            render(&plan.layers[1]),
            // a inherits layer 0's metadata; c/.wh.q is dropped (no directory c).
            vec!["./ d", "a/ 0.0", "a/x wh", "b/ 0.3 opq", "b/n 1.2"]
        );
        assert_eq!(
            render(&plan.merged),
            vec!["./ d", "a/ 0.0", "a/y 0.2", "b/ 0.3", "b/n 1.2"]
        );
    }

    #[test]
    fn opaque_root_hides_every_lower_layer() {
        let l0 = vec![d("a"), f("a/x"), f("b")];
        let l1 = vec![f("c")];
        let l2 = vec![f("d"), f(".wh..wh..opq"), d("a")];
        let ls: Vec<Layer<'_>> = [&l0, &l1, &l2]
            .iter()
            .map(|es| Layer {
                digest: "l",
                entries: es,
            })
            .collect();
        let plan = plan(&ls, true).unwrap();
        assert_eq!(plan.first_visible, 2);
        assert_eq!(render(&plan.merged), vec!["./ d", "a/ 2.2", "d 2.0"]);
        assert_eq!(render(&plan.layers[2]), vec!["./ d", "a/ 2.2", "d 2.0"]);
    }

    #[test]
    fn whiteout_and_object_in_one_layer() {
        let l0 = vec![d("a"), f("a/old"), f("b")];
        let l1 = vec![d("a"), f(".wh.a"), f("a/new"), f(".wh.b"), sl("b", "x")];
        let ls = [
            Layer {
                digest: "l0",
                entries: &l0,
            },
            Layer {
                digest: "l1",
                entries: &l1,
            },
        ];
        let plan = plan(&ls, true).unwrap();
        assert_eq!(
            render(&plan.merged),
            vec!["./ d", "a/ 1.0", "a/new 1.2", "b 1.4"]
        );
        assert_eq!(
            render(&plan.layers[1]),
            vec!["./ d", "a/ 1.0 opq", "a/new 1.2", "b 1.4"]
        );
    }

    #[test]
    fn later_layers_replace_kinds() {
        let l0 = vec![d("a"), f("a/x"), f("b"), sl("c", "/etc"), f("e")];
        // a: dir -> file (hides a/x), b: file -> dir, c: symlink -> implicit dir.
        let l1 = vec![f("a"), d("b"), f("b/y"), f("c/passwd"), d("e")];
        assert_eq!(
            merged(&[l0, l1]),
            vec![
                "./ d",
                "a 1.0",
                "b/ 1.1",
                "b/y 1.2",
                "c/ d",
                "c/passwd 1.3",
                "e/ 1.4",
            ]
        );
    }

    /// A whiteout or a replacing file hides the lower object's subtree and nothing else:
    /// names that only share its prefix (`a.b`, `ab`, which sort after `a`'s children or
    /// before them) stay.
    #[test]
    fn hiding_a_directory_keeps_names_sharing_its_prefix() {
        let l0 = vec![d("a"), f("a/x"), f("a.b"), f("ab"), d("a-"), f("a-/y")];
        let l1 = vec![f(".wh.a")];
        assert_eq!(
            merged(&[l0.clone(), l1]),
            vec!["./ d", "a-/ 0.4", "a-/y 0.5", "a.b 0.2", "ab 0.3"]
        );
        let l1 = vec![f("a")];
        assert_eq!(
            merged(&[l0, l1]),
            vec!["./ d", "a 1.0", "a-/ 0.4", "a-/y 0.5", "a.b 0.2", "ab 0.3"]
        );
    }

    #[test]
    fn duplicates_in_one_layer_last_wins() {
        let l0 = vec![f("a"), d("a"), f("a/x"), f("b"), sl("b", "t")];
        assert_eq!(merged(&[l0]), vec!["./ d", "a/ 0.1", "a/x 0.2", "b 0.4"]);
    }

    #[test]
    fn implicit_parents_get_default_metadata() {
        let l0 = vec![f("x/y/z")];
        assert_eq!(merged(&[l0]), vec!["./ d", "x/ d", "x/y/ d", "x/y/z 0.0"]);
    }

    #[test]
    fn root_entry_sets_root_metadata() {
        let l0 = vec![d("."), f("a")];
        let l1 = vec![f("b")];
        assert_eq!(merged(&[l0, l1]), vec!["./ 0.0", "a 0.1", "b 1.0"]);
    }

    #[test]
    fn hardlinks_resolve_to_one_inode() {
        let l0 = vec![f("a"), hl("b", "a"), hl("c", "./b")];
        // A hardlink to a lower layer's file keeps that inode when its first name is
        // deleted by a later layer.
        let l1 = vec![hl("d", "a")];
        let l2 = vec![f(".wh.a")];
        assert_eq!(
            merged(&[l0, l1, l2]),
            vec!["./ d", "b 0.1=>0.0", "c 0.2=>0.0", "d 1.0=>0.0"]
        );
    }

    #[test]
    fn hostile_inputs_are_refused() {
        let run = |es: Vec<Entry>| {
            plan(
                &[Layer {
                    digest: "evil",
                    entries: &es,
                }],
                false,
            )
        };
        assert!(matches!(
            run(vec![f("../x")]),
            Err(UnpackError::BadPath { .. })
        ));
        assert!(matches!(
            run(vec![f("/etc/passwd")]),
            Err(UnpackError::BadPath { .. })
        ));
        // A symlink and an entry beneath it in the same layer.
        assert!(matches!(
            run(vec![sl("a", "/etc"), f("a/passwd")]),
            Err(UnpackError::NotADirectory { .. })
        ));
        assert!(matches!(
            run(vec![f("a/passwd"), sl("a", "/etc")]),
            Err(UnpackError::NotADirectory { .. })
        ));
        // Hardlinks out of the tree, through a symlink, to a directory, to nothing.
        for target in ["../../etc/passwd", "/etc/passwd", "s/passwd", "dir", "nope"] {
            assert!(
                matches!(
                    run(vec![sl("s", "/etc"), d("dir"), hl("h", target)]),
                    Err(UnpackError::HardlinkTarget { .. })
                ),
                "{target}"
            );
        }
        assert!(matches!(
            run(vec![e(".", EntryKind::File)]),
            Err(UnpackError::BadPath { .. })
        ));
        assert!(matches!(
            run(vec![e("s", EntryKind::Symlink)]),
            Err(UnpackError::BadPath { .. })
        ));
    }
}
