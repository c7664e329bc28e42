//! A realistic image made of files on this machine, shared by `tests/image_lazy.rs` and
//! `examples/index_span.rs` (included with `#[path]`).
//!
//! Three gzip layers: the Python standard library; documentation (mostly small text and
//! already-compressed changelogs) plus whiteouts of a file and a directory of layer 1; C
//! headers plus hard links, a file that replaces one of layer 1, and symlinks. The host
//! trees bring their own symlinks.
#![allow(dead_code)]

use std::path::Path;

use fanfill::ocibuild::{HostBudget as Budget, LayerItem, collect_host_tree as collect};

/// Parent directories of `path` (relative), outermost first.
fn parents(path: &str) -> Vec<LayerItem> {
    let mut out = Vec::new();
    let mut acc = String::new();
    let comps: Vec<&str> = path.split('/').collect();
    for c in &comps[..comps.len() - 1] {
        if !acc.is_empty() {
            acc.push('/');
        }
        acc.push_str(c);
        out.push(LayerItem::Dir {
            path: acc.clone(),
            mode: 0o755,
        });
    }
    out
}

fn layer(roots: &[&str], files: usize, bytes: u64) -> Vec<LayerItem> {
    let mut out = Vec::new();
    let mut budget = Budget { files, bytes };
    for root in roots {
        let root = Path::new(root);
        if root.is_dir() {
            out.extend(parents(root.to_string_lossy().trim_start_matches('/')));
            collect(root, &mut out, &mut budget);
        }
    }
    out
}

/// The first Python standard library directory on this machine.
fn python_dir() -> String {
    let mut dirs: Vec<_> = std::fs::read_dir("/usr/lib")
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("python3.") && p.join("os.py").exists())
                })
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs.first()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|| "/usr/lib/python3".into())
}

/// The three layers (lowest first). `scale` multiplies the byte budgets (1.0: about 60 MiB
/// of gzip, 6,000 files on a Debian host with python3, docs and headers installed).
pub fn layers(scale: f64) -> Vec<Vec<LayerItem>> {
    let mib = |m: f64| (m * scale * 1048576.0) as u64;
    let py = python_dir();
    let mut l1 = layer(&[&py], 4000, mib(45.0));
    l1.push(LayerItem::File {
        path: "etc/app.conf".into(),
        mode: 0o644,
        data: b"version=1\n".repeat(100),
    });
    l1.extend(parents("etc/app.conf"));
    let mut l2 = layer(&["/usr/share/doc"], 4000, mib(55.0));
    // Whiteouts: one file and one whole subdirectory of layer 1.
    let py_rel = py.trim_start_matches('/');
    let l1_files: Vec<&String> = l1
        .iter()
        .filter_map(|i| match i {
            LayerItem::HostFile { path, .. } => Some(path),
            _ => None,
        })
        .collect();
    let depth = py_rel.split('/').count();
    let file = l1_files
        .iter()
        .find(|p| p.split('/').count() == depth + 1)
        .map(|p| p.to_string());
    let dir = l1_files
        .iter()
        .rev()
        .find(|p| p.split('/').count() == depth + 2)
        .and_then(|p| p.rsplit_once('/').map(|(d, _)| d.to_string()));
    for victim in [file, dir].into_iter().flatten() {
        l2.push(LayerItem::Whiteout { path: victim });
    }
    let mut l3 = layer(&["/usr/include"], 4000, mib(90.0));
    // A file that replaces one of layer 1, hard links to files of this layer, symlinks.
    l3.extend(parents("etc/app.conf"));
    l3.push(LayerItem::File {
        path: "etc/app.conf".into(),
        mode: 0o600,
        data: b"version=3\n".repeat(300),
    });
    let targets: Vec<String> = l3
        .iter()
        .filter_map(|i| match i {
            LayerItem::HostFile { path, .. } => Some(path.clone()),
            _ => None,
        })
        .step_by(500)
        .take(5)
        .collect();
    l3.push(LayerItem::Dir {
        path: "links".into(),
        mode: 0o755,
    });
    for (n, t) in targets.iter().enumerate() {
        l3.push(LayerItem::Hardlink {
            path: format!("links/hard-{n}"),
            target: t.clone(),
        });
        l3.push(LayerItem::Symlink {
            path: format!("links/sym-{n}"),
            target: format!("/{t}"),
        });
    }
    vec![l1, l2, l3]
}
