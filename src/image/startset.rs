//! The start set: the files nearly every container start reads before its workload does
//! anything of its own, filled ahead like an access profile (before the files of the
//! image's own profile, when it has one).
//!
//! Owns the list ([`start_set`]): what the runtime reads to resolve the container's user
//! (`/etc/passwd`, `/etc/group`), the dynamic loader's cache, the shell (`sh -c` is how
//! `CMD` strings and most Kubernetes commands run), the C library's time zone
//! (`/etc/localtime`), the platform's program interpreter and C library, and the image's
//! own entrypoint (or command) found through the `PATH` of its config; and the lookup of
//! those paths in the image's merged tree through its layer indexes, following symlinks the
//! way the kernel would inside the image ([`resolve`]). A name is only a hint: one the image
//! does not have is skipped, and a file the lookup picks that the container then never
//! reads costs its bytes, nothing else (whiteouts and opaque directories are not looked at,
//! so a file deleted by an upper layer may be picked). It reads index entries only; it
//! never fetches, fills or writes (`super::profile` does).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use oci_spec::image::ImageConfiguration;

use crate::index::{EntryKind, LayerIndex};
use crate::loader;

/// `PATH` of a config that sets none (the OCI runtimes' default).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Most symlinks one lookup follows (the kernel's limit).
const MAX_HOPS: usize = 40;

/// What a container start reads before its workload does (see the module doc), as lists
/// of candidate paths in the image (no leading `/`), the first found of each list wins.
fn wanted(config: &ImageConfiguration) -> Vec<Vec<String>> {
    let own = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    let mut out = vec![
        own(&["etc/passwd"]),
        own(&["etc/group"]),
        own(&["etc/ld.so.cache"]),
        own(&["bin/sh"]),
        // The C library's time zone (`tzset`, behind `localtime` and `strftime`): a symlink
        // into `usr/share/zoneinfo` in most images, a few hundred bytes.
        own(&["etc/localtime"]),
    ];
    // The program interpreter (glibc, musl), and libc where the loader looks for it.
    let (machine, interp) = match config.architecture().to_string().as_str() {
        "arm64" => (
            loader::EM_AARCH64,
            ["lib/ld-linux-aarch64.so.1", "lib/ld-musl-aarch64.so.1"],
        ),
        _ => (
            loader::EM_X86_64,
            ["lib64/ld-linux-x86-64.so.2", "lib/ld-musl-x86_64.so.1"],
        ),
    };
    out.push(own(&interp));
    out.push(
        loader::library_dirs(machine)
            .iter()
            .map(|d| format!("{d}/libc.so.6"))
            .collect(),
    );
    let cfg = config.config().as_ref();
    let program = cfg
        .and_then(|c| c.entrypoint().as_ref().and_then(|e| e.first()))
        .or_else(|| cfg.and_then(|c| c.cmd().as_ref().and_then(|c| c.first())));
    if let Some(program) = program.filter(|p| !p.is_empty()) {
        if program.starts_with('/') {
            out.push(vec![program.trim_start_matches('/').to_owned()]);
        } else if !program.contains('/') {
            let path = cfg
                .and_then(|c| c.env().as_ref())
                .and_then(|env| env.iter().find_map(|v| v.strip_prefix("PATH=")))
                .unwrap_or(DEFAULT_PATH);
            out.push(
                path.split(':')
                    .filter(|d| d.starts_with('/'))
                    .map(|d| format!("{}/{program}", d.trim_matches('/')))
                    .collect(),
            );
        }
    }
    out
}

/// The image's start set ([`wanted`]) as paths of regular files in its layers, in order,
/// without repeats: each found by [`resolve`].
pub fn start_set(config: &ImageConfiguration, layers: &[Arc<LayerIndex>]) -> Vec<String> {
    let mut top: HashMap<&str, (usize, usize)> = HashMap::new();
    for (li, ix) in layers.iter().enumerate() {
        for (ei, e) in ix.entries.iter().enumerate() {
            top.insert(&*e.path, (li, ei));
        }
    }
    let mut out: Vec<String> = Vec::new();
    for candidates in wanted(config) {
        if let Some(p) = candidates.iter().find_map(|c| resolve(layers, &top, c))
            && !out.contains(&p)
        {
            out.push(p);
        }
    }
    out
}

/// The regular file `path` names in the merged tree of `layers` (`top`: each path's
/// topmost entry), symlinks followed inside the image (an absolute target starts again at
/// its root, `..` stops there); `None` when it names nothing, a directory or a special file.
fn resolve(
    layers: &[Arc<LayerIndex>],
    top: &HashMap<&str, (usize, usize)>,
    path: &str,
) -> Option<String> {
    let mut todo: VecDeque<String> = path.split('/').map(str::to_owned).collect();
    let mut cur: Vec<String> = Vec::new();
    let mut hops = 0;
    while let Some(c) = todo.pop_front() {
        match c.as_str() {
            "" | "." => continue,
            ".." => {
                cur.pop();
                continue;
            }
            _ => cur.push(c),
        }
        let here = cur.join("/");
        let more = todo.iter().any(|c| !c.is_empty() && c != ".");
        let Some(&(li, ei)) = top.get(here.as_str()) else {
            // A directory no layer has an entry of its own for (some builders write none):
            // implied by the paths beneath it.
            if more {
                continue;
            }
            return None;
        };
        let entry = layers.get(li)?.resolve(ei)?;
        match entry.kind {
            EntryKind::Symlink => {
                hops += 1;
                let target = entry.link.as_deref().filter(|_| hops <= MAX_HOPS)?;
                cur.pop();
                if target.starts_with('/') {
                    cur.clear();
                }
                for part in target.split('/').rev() {
                    todo.push_front(part.to_owned());
                }
            }
            EntryKind::Dir => {}
            EntryKind::File if !more => return Some(here),
            _ => return None,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::Entry;

    fn index(entries: Vec<Entry>) -> Arc<LayerIndex> {
        Arc::new(crate::toc::entry_table(
            crate::index::Compression::Gzip,
            "",
            0,
            entries,
        ))
    }

    fn file(p: &str) -> Entry {
        let mut e = Entry::new(p, EntryKind::File, 0o644);
        e.size = 10;
        e
    }

    fn link(p: &str, target: &str) -> Entry {
        let mut e = Entry::new(p, EntryKind::Symlink, 0o777);
        e.link = Some(target.into());
        e
    }

    fn dir(p: &str) -> Entry {
        Entry::new(p, EntryKind::Dir, 0o755)
    }

    fn config(json: &str) -> ImageConfiguration {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn a_merged_usr_image_resolves_through_its_symlinks() {
        // Debian's layout: /bin -> usr/bin, /lib64 -> usr/lib64, sh -> dash, the loader an
        // absolute symlink; python3 in an upper layer, named by the config's command.
        let base = index(vec![
            dir("etc"),
            file("etc/passwd"),
            file("etc/group"),
            link("bin", "usr/bin"),
            link("lib", "usr/lib"),
            link("lib64", "usr/lib64"),
            dir("usr"),
            dir("usr/bin"),
            file("usr/bin/dash"),
            link("usr/bin/sh", "dash"),
            dir("usr/lib"),
            dir("usr/lib/x86_64-linux-gnu"),
            file("usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"),
            file("usr/lib/x86_64-linux-gnu/libc.so.6"),
            dir("usr/lib64"),
            link(
                "usr/lib64/ld-linux-x86-64.so.2",
                "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
            ),
        ]);
        let upper = index(vec![
            dir("usr"),
            dir("usr/bin"),
            file("usr/bin/python3.11"),
            link("usr/bin/python3", "python3.11"),
        ]);
        let cfg = config(
            r#"{"architecture":"amd64","os":"linux","config":{"Cmd":["python3"],"Env":["PATH=/usr/local/bin:/usr/bin:/bin"]},"rootfs":{"type":"layers","diff_ids":[]}}"#,
        );
        assert_eq!(
            start_set(&cfg, &[base, upper]),
            vec![
                "etc/passwd",
                "etc/group",
                "usr/bin/dash",
                "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
                "usr/lib/x86_64-linux-gnu/libc.so.6",
                "usr/bin/python3.11",
            ]
        );
    }

    #[test]
    fn loops_escapes_and_missing_names_give_nothing() {
        let ix = index(vec![
            link("a", "b"),
            link("b", "a"),
            dir("etc"),
            link("etc/passwd", "../../../../host/passwd"),
            link("bin", "/etc"),
            file("etc/group"),
        ]);
        let top: HashMap<&str, (usize, usize)> = ix
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (&*e.path, (0, i)))
            .collect();
        let layers = [ix.clone()];
        assert_eq!(resolve(&layers, &top, "a"), None, "a symlink loop");
        assert_eq!(
            resolve(&layers, &top, "etc/passwd"),
            None,
            "`..` stops at the root"
        );
        assert_eq!(
            resolve(&layers, &top, "bin/group").as_deref(),
            Some("etc/group")
        );
        assert_eq!(resolve(&layers, &top, "etc"), None, "a directory");
        assert_eq!(
            resolve(&layers, &top, "etc/group/x"),
            None,
            "a file is no directory"
        );
        assert_eq!(resolve(&layers, &top, "nothing"), None);
        assert_eq!(resolve(&layers, &top, "nothing/group"), None);
        // Directories with no entry of their own are implied by the files beneath them.
        let bare = [index(vec![
            file("usr/bin/dash"),
            link("usr/bin/sh", "dash"),
        ])];
        let top2: HashMap<&str, (usize, usize)> = bare[0]
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (&*e.path, (0, i)))
            .collect();
        assert_eq!(
            resolve(&bare, &top2, "usr/bin/sh").as_deref(),
            Some("usr/bin/dash")
        );
        // No config command, no shell: just what is there.
        let cfg = config(
            r#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#,
        );
        assert_eq!(start_set(&cfg, &layers), vec!["etc/group"]);
    }
}
