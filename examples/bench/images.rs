//! The three benchmark images, made from files of Debian packages installed on this machine
//! (`dpkg -L`), with the shared libraries their ELF files need (`ldd`), as gzip OCI layouts.
//! Built once and cached (a stamp records the recipe).

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};
use fanfill::ocibuild::{self, BuiltImage, Compression, LayerItem};

/// One image: its layers (each a list of Debian packages plus extra host paths) and the
/// workload script run in the container.
pub struct Spec {
    pub name: &'static str,
    pub layers: Vec<LayerSpec>,
    /// `/bench/run.sh` in the image: prints its whole output at the end, so the first byte
    /// of output is the workload's answer.
    pub script: &'static str,
    /// Extra files put in the top layer (path, content).
    pub files: Vec<(&'static str, &'static str)>,
}

pub struct LayerSpec {
    pub packages: &'static [&'static str],
    pub paths: &'static [&'static str],
}

const BASE_PKGS: &[&str] = &[
    "libc6",
    "libc-bin",
    "libgcc-s1",
    "libstdc++6",
    "zlib1g",
    "libssl3",
    "libselinux1",
    "libpcre2-8-0",
    "libacl1",
    "libattr1",
    "libgmp10",
    "libcrypt1",
    "libtinfo6",
    "libzstd1",
    "liblzma5",
    "libbz2-1.0",
    "ca-certificates",
    "tzdata",
];
const TOOLS_PKGS: &[&str] = &[
    "coreutils",
    "bash",
    "dash",
    "busybox",
    "busybox-static",
    "grep",
    "sed",
    "findutils",
    "tar",
    "gzip",
    "xz-utils",
    "bzip2",
    "diffutils",
    "openssl",
    "perl-base",
    "util-linux",
    "procps",
    "libprocps8",
    "sqlite3",
    "libsqlite3-0",
    "less",
];
const BASE_PATHS: &[&str] = &[
    "/etc/passwd",
    "/etc/group",
    "/etc/nsswitch.conf",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/ld.so.cache",
];
const PY_PKGS: &[&str] = &[
    "python3.11",
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "libpython3.11",
    "python3-minimal",
    "python3",
    "libffi8",
    "libexpat1",
    "libreadline8",
    "libncursesw6",
    "libmpdec3",
    "libuuid1",
    "libdb5.3",
    "libgdbm6",
];
const PY_EXTRA_PKGS: &[&str] = &[
    "python3-numpy",
    "libpython3.11-dev",
    "python3-cryptography",
    "python3-cffi-backend",
    "python3-openssl",
    "python3-pygments",
    "python3-setuptools",
    "libopenblas0-pthread",
    "libopenblas0",
    "libgfortran5",
    "liblapack3",
    "libblas3",
];
const GCC_PKGS: &[&str] = &[
    "gcc-12",
    "cpp-12",
    "gcc",
    "cpp",
    "libgcc-12-dev",
    "binutils",
    "binutils-x86-64-linux-gnu",
    "binutils-common",
    "libbinutils",
    "libc6-dev",
    "libc-dev-bin",
    "linux-libc-dev",
    "libcrypt-dev",
    "libnsl-dev",
    "libtirpc-dev",
    "libisl23",
    "libmpc3",
    "libmpfr6",
    "libctf0",
    "libctf-nobfd0",
    "libjansson4",
    "libsframe1",
    "libcc1-0",
    "libgomp1",
    "libitm1",
    "libatomic1",
    "libasan8",
    "liblsan0",
    "libtsan2",
    "libubsan1",
    "libquadmath0",
];
const CXX_PKGS: &[&str] = &["g++-12", "g++", "libstdc++-12-dev"];
const LLVM_PKGS: &[&str] = &["libllvm14", "llvm-14", "llvm-14-dev", "llvm-14-runtime"];
const JAVA_PKGS: &[&str] = &["openjdk-17-jre-headless"];

const SLIM_SCRIPT: &str = r#"out=$( {
  echo "commands: $(ls /usr/bin | wc -l)"
  sha256sum /usr/bin/bash | cut -c1-16
  echo "zones: $(find /usr/share/zoneinfo -type f | wc -l)"
  tar --version | head -n 1
  echo "root entries: $(grep -c root /etc/passwd)"
  echo "certs: $(ls /etc/ssl/certs | wc -l)"
} 2>&1 ); echo "$out"
"#;

const PY_SCRIPT: &str = r#"out=$(python3 -c '
import json, sqlite3, ssl, hashlib
db = sqlite3.connect(":memory:")
db.execute("create table t(x)")
db.executemany("insert into t values (?)", [(i,) for i in range(1000)])
print(json.dumps({"sum": db.execute("select sum(x) from t").fetchone()[0],
                  "sqlite": sqlite3.sqlite_version, "ssl": ssl.OPENSSL_VERSION,
                  "sha": hashlib.sha256(b"fanfill").hexdigest()[:12]}))
' 2>&1); echo "$out"
"#;

const LARGE_SCRIPT: &str = r#"out=$( {
  gcc --version | head -n 1
  gcc -O2 -o /tmp/hello /bench/hello.c && /tmp/hello
  python3 -c 'import numpy; print("numpy", numpy.__version__, int(numpy.arange(1000).sum()))'
} 2>&1 ); echo "$out"
"#;

const HELLO_C: &str =
    "#include <stdio.h>\nint main(void) { printf(\"hello %d\\n\", 6 * 7); return 0; }\n";

pub fn specs() -> Vec<Spec> {
    let base = || LayerSpec {
        packages: BASE_PKGS,
        paths: BASE_PATHS,
    };
    let tools = || LayerSpec {
        packages: TOOLS_PKGS,
        paths: &[],
    };
    let py = || LayerSpec {
        packages: PY_PKGS,
        paths: &[],
    };
    vec![
        Spec {
            name: "slim",
            layers: vec![base(), tools()],
            script: SLIM_SCRIPT,
            files: vec![],
        },
        Spec {
            name: "python",
            layers: vec![
                base(),
                tools(),
                py(),
                LayerSpec {
                    packages: PY_EXTRA_PKGS,
                    paths: &[],
                },
            ],
            script: PY_SCRIPT,
            files: vec![],
        },
        Spec {
            name: "large",
            layers: vec![
                base(),
                tools(),
                py(),
                LayerSpec {
                    packages: PY_EXTRA_PKGS,
                    paths: &[],
                },
                LayerSpec {
                    packages: GCC_PKGS,
                    paths: &[],
                },
                LayerSpec {
                    packages: CXX_PKGS,
                    paths: &[],
                },
                LayerSpec {
                    packages: LLVM_PKGS,
                    paths: &[],
                },
                LayerSpec {
                    packages: JAVA_PKGS,
                    paths: &[],
                },
            ],
            script: LARGE_SCRIPT,
            files: vec![("bench/hello.c", HELLO_C)],
        },
    ]
}

/// What a cached build recorded.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct Built {
    pub recipe: String,
    pub manifest_digest: String,
    /// (digest, compressed, uncompressed) per layer.
    pub layers: Vec<(String, u64, u64)>,
    pub files: u64,
    pub file_bytes: u64,
}

impl Built {
    pub fn compressed(&self) -> u64 {
        self.layers.iter().map(|l| l.1).sum()
    }
}

fn recipe(spec: &Spec) -> String {
    let mut r = format!("v3 {}:", spec.name);
    for l in &spec.layers {
        r.push_str(&format!("[{}|{}]", l.packages.join(","), l.paths.join(",")));
    }
    r.push_str(spec.script);
    for (p, c) in &spec.files {
        r.push_str(p);
        r.push_str(c);
    }
    r
}

/// The OCI layout of `spec` under `dir` (tag `bench`), built unless the cache matches.
pub fn build(spec: &Spec, dir: &Path) -> Result<Built> {
    let stamp = dir.join("fanfill-bench.json");
    let want = recipe(spec);
    if let Ok(b) = std::fs::read(&stamp)
        && let Ok(built) = serde_json::from_slice::<Built>(&b)
        && built.recipe == want
        && dir.join("index.json").exists()
    {
        return Ok(built);
    }
    let _ = std::fs::remove_dir_all(dir);
    let t = std::time::Instant::now();
    let mut seen = BTreeSet::new();
    let mut layers = Vec::new();
    let (mut files, mut file_bytes) = (0u64, 0u64);
    for (i, l) in spec.layers.iter().enumerate() {
        let mut c = Collector::default();
        if i == 0 {
            for (link, target) in [
                ("bin", "usr/bin"),
                ("sbin", "usr/sbin"),
                ("lib", "usr/lib"),
                ("lib64", "usr/lib64"),
            ] {
                c.items.insert(
                    link.into(),
                    LayerItem::Symlink {
                        path: link.into(),
                        target: target.into(),
                    },
                );
            }
            for (d, mode) in [
                ("tmp", 0o1777),
                ("root", 0o700),
                ("proc", 0o555),
                ("sys", 0o555),
                ("dev", 0o755),
                ("etc", 0o755),
                ("run", 0o755),
                ("var/tmp", 0o1777),
            ] {
                c.dir(d, mode);
            }
        }
        for p in l.packages {
            for f in dpkg_files(p) {
                c.add(&f, true);
            }
        }
        for p in l.paths {
            c.add(Path::new(p), true);
        }
        c.ldd_closure();
        if i + 1 == spec.layers.len() {
            c.dir("bench", 0o755);
            c.items.insert(
                "bench/run.sh".into(),
                LayerItem::File {
                    path: "bench/run.sh".into(),
                    mode: 0o755,
                    data: spec.script.as_bytes().to_vec(),
                },
            );
            for (p, content) in &spec.files {
                c.items.insert(
                    (*p).into(),
                    LayerItem::File {
                        path: (*p).into(),
                        mode: 0o644,
                        data: content.as_bytes().to_vec(),
                    },
                );
            }
        }
        let mut items = Vec::new();
        // Directories are repeated in every layer that needs them; files only once.
        let mut parents = BTreeSet::new();
        for (path, item) in c.items {
            if !matches!(item, LayerItem::Dir { .. }) && !seen.insert(path.clone()) {
                continue;
            }
            if let LayerItem::HostFile { host, .. } = &item {
                files += 1;
                file_bytes += std::fs::metadata(host).map(|m| m.len()).unwrap_or(0);
            }
            if let LayerItem::File { data, .. } = &item {
                files += 1;
                file_bytes += data.len() as u64;
            }
            let mut p = Path::new(&path).parent();
            while let Some(d) = p.filter(|d| !d.as_os_str().is_empty()) {
                parents.insert(d.to_string_lossy().into_owned());
                p = d.parent();
            }
            items.push((path, item));
        }
        for d in parents {
            if !items.iter().any(|(p, _)| *p == d) {
                items.push((
                    d.clone(),
                    LayerItem::Dir {
                        path: d,
                        mode: 0o755,
                    },
                ));
            }
        }
        items.sort_by(|a, b| a.0.cmp(&b.0));
        layers.push(items.into_iter().map(|(_, i)| i).collect::<Vec<_>>());
    }
    let img: BuiltImage = ocibuild::write_layout(dir, "bench", &layers, Compression::Gzip)
        .with_context(|| format!("writing layout {}", dir.display()))?;
    let built = Built {
        recipe: want,
        manifest_digest: img.manifest_digest.clone(),
        layers: img.layers.clone(),
        files,
        file_bytes,
    };
    std::fs::write(&stamp, serde_json::to_vec(&built)?)?;
    eprintln!(
        "bench: built image {} ({} layers, {} files, {:.0} MiB unpacked, {:.0} MiB gzip) in {:.0}s",
        spec.name,
        built.layers.len(),
        files,
        file_bytes as f64 / 1048576.0,
        built.compressed() as f64 / 1048576.0,
        t.elapsed().as_secs_f64()
    );
    Ok(built)
}

/// The packages `spec` names that are not installed on this machine: the image is made of
/// installed files, so they are missing from it (and a workload that needs them says so).
pub fn missing_packages(spec: &Spec) -> Vec<String> {
    spec.layers
        .iter()
        .flat_map(|l| l.packages.iter())
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .map(|p| p.to_string())
        .collect()
}

fn dpkg_files(pkg: &str) -> Vec<PathBuf> {
    let Ok(out) = Command::new("dpkg").args(["-L", pkg]).output() else {
        return Vec::new();
    };
    if !out.status.success() {
        return Vec::new();
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('/') && *l != "/." && !l.contains("/share/doc/"))
        .filter(|l| !l.contains("/share/man/") && !l.contains("/share/locale/"))
        .map(PathBuf::from)
        .collect()
}

#[derive(Default)]
struct Collector {
    items: BTreeMap<String, LayerItem>,
    elves: Vec<PathBuf>,
    done_ldd: BTreeSet<PathBuf>,
}

/// The path of a host file as the image names it: its parent directory resolved (merged
/// /usr: `/lib/x` is `usr/lib/x`), no leading slash.
fn image_path(host: &Path) -> Option<String> {
    let parent = host.parent()?;
    let name = host.file_name()?;
    let parent = std::fs::canonicalize(parent).ok()?;
    let p = parent.join(name);
    let s = p.to_string_lossy().trim_start_matches('/').to_string();
    (!s.is_empty()).then_some(s)
}

impl Collector {
    fn dir(&mut self, path: &str, mode: u32) {
        self.items.insert(
            path.into(),
            LayerItem::Dir {
                path: path.into(),
                mode,
            },
        );
    }

    fn add(&mut self, host: &Path, follow: bool) {
        let Some(path) = image_path(host) else {
            return;
        };
        if self.items.contains_key(&path) {
            return;
        }
        let Ok(md) = std::fs::symlink_metadata(host) else {
            return;
        };
        if md.file_type().is_symlink() {
            let Ok(target) = std::fs::read_link(host) else {
                return;
            };
            self.items.insert(
                path.clone(),
                LayerItem::Symlink {
                    path: path.clone(),
                    target: target.to_string_lossy().into_owned(),
                },
            );
            if follow {
                let abs = Path::new("/").join(&path);
                let resolved = abs.parent().unwrap_or(Path::new("/")).join(&target);
                self.add(&resolved, true);
            }
        } else if md.is_dir() {
            self.dir(&path, md.mode() & 0o7777);
            if follow && host.starts_with("/etc/ld.so.conf.d") {
                if let Ok(rd) = std::fs::read_dir(host) {
                    for e in rd.flatten() {
                        self.add(&e.path(), false);
                    }
                }
            }
        } else if md.is_file() && std::fs::File::open(host).is_ok() {
            let real = Path::new("/").join(&path);
            if is_elf(&real) {
                self.elves.push(real.clone());
            }
            self.items
                .insert(path.clone(), LayerItem::HostFile { path, host: real });
        }
    }

    /// Adds every library the layer's ELF files load, transitively.
    fn ldd_closure(&mut self) {
        while let Some(elf) = self.elves.pop() {
            if !self.done_ldd.insert(elf.clone()) {
                continue;
            }
            let Ok(out) = Command::new("ldd").arg(&elf).output() else {
                continue;
            };
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let lib = match line.split_once("=>") {
                    Some((_, rhs)) => rhs.split_whitespace().next(),
                    None => line
                        .split_whitespace()
                        .next()
                        .filter(|s| s.starts_with('/')),
                };
                if let Some(lib) = lib.filter(|l| l.starts_with('/')) {
                    self.add(Path::new(lib), true);
                }
            }
        }
    }
}

fn is_elf(p: &Path) -> bool {
    use std::io::Read;
    let name = p.to_string_lossy();
    let interesting = name.contains(".so")
        || std::fs::metadata(p)
            .map(|m| m.mode() & 0o111 != 0)
            .unwrap_or(false);
    if !interesting {
        return false;
    }
    let mut magic = [0u8; 4];
    std::fs::File::open(p)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == *b"\x7fELF"
}
