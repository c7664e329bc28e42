//! Helpers shared by the integration tests: a real `docker-registry` on loopback, OCI image
//! layouts written by hand, `skopeo copy`, and a TCP proxy that injects faults.
//!
//! Use from a test file with `mod common;`. Everything that can block has a deadline.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::Digest as _;

/// Runs an async test body on a multi-threaded runtime, failing after `secs` seconds.
pub fn run_async<F: std::future::Future>(secs: u64, body: F) -> F::Output {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(secs), body)
            .await
            .unwrap_or_else(|_| panic!("test timed out after {secs} s"))
    })
}

/// Installs a tracing subscriber once (honours `RUST_LOG`), so retries show in failures.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A `docker-registry` (CNCF distribution) serving plain HTTP on 127.0.0.1 from a temp dir.
/// Killed on drop.
pub struct TestRegistry {
    /// Where it listens.
    pub addr: SocketAddr,
    child: Child,
    dir: tempfile::TempDir,
}

impl TestRegistry {
    /// Starts an anonymous registry.
    pub fn start() -> Self {
        Self::start_inner(None)
    }

    /// Starts a registry that requires Basic auth for `user`/`password` (htpasswd, bcrypt).
    pub fn start_with_basic_auth(user: &str, password: &str) -> Self {
        let hash = bcrypt::hash_with_result(password, 4)
            .expect("bcrypt")
            .format_for_version(bcrypt::Version::TwoY);
        Self::start_inner(Some(format!("{user}:{hash}\n")))
    }

    /// Starts a pull-through cache (`proxy: remoteurl:`) of the plain-HTTP registry at
    /// `origin` (`HOST:PORT`), which must already answer.
    pub fn start_proxy_of(origin: &str) -> Self {
        Self::start_with_auth_yaml(Some(format!("proxy:\n  remoteurl: http://{origin}\n")))
    }

    /// Bytes of the blobs in its storage (for a pull-through cache: what it cached).
    pub fn stored_blob_bytes(&self) -> u64 {
        let mut total = 0;
        let mut stack = vec![self.storage().join("docker/registry/v2/blobs")];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let Ok(m) = e.metadata() else { continue };
                if m.is_dir() {
                    stack.push(e.path());
                } else if e.file_name() == "data" {
                    total += m.len();
                }
            }
        }
        total
    }

    /// Starts a registry that takes Bearer tokens from `token_server` (its `token:` auth).
    pub fn start_with_token_auth(token_server: &TokenServer) -> Self {
        Self::start_with_auth_yaml(Some(format!(
            "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
            token_server.realm(),
            TokenServer::SERVICE,
            TokenServer::ISSUER,
            token_server.cert_path().display()
        )))
    }

    /// Starts a registry serving HTTPS with a certificate for `127.0.0.1` and `localhost`
    /// from a fresh private CA, requiring Basic auth for `user`/`password`. The CA is in
    /// [`TestRegistry::cert_dir`] as `ca.crt`, the layout of a `--cert-dir` or a certs.d
    /// host directory.
    pub fn start_tls_with_basic_auth(user: &str, password: &str) -> Self {
        Self::start_tls(user, password, false)
    }

    /// Like [`TestRegistry::start_tls_with_basic_auth`], and the registry also demands a
    /// client certificate signed by the CA; [`TestRegistry::cert_dir`] holds one as
    /// `client.cert` + `client.key`.
    pub fn start_tls_with_client_cert(user: &str, password: &str) -> Self {
        Self::start_tls(user, password, true)
    }

    fn start_tls(user: &str, password: &str, client_cert: bool) -> Self {
        let hash = bcrypt::hash_with_result(password, 4)
            .expect("bcrypt")
            .format_for_version(bcrypt::Version::TwoY);
        Self::start_with(Some(format!("HTPASSWD:{user}:{hash}\n")), Some(client_cert))
    }

    /// The certificate directory of a TLS registry: `ca.crt` (and `client.cert` +
    /// `client.key` when it wants a client certificate). Empty for a plain-HTTP one.
    pub fn cert_dir(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    /// The private CA's key and certificate, to sign more certificates with.
    pub fn ca_files(&self) -> (PathBuf, PathBuf) {
        let pki = self.dir.path().join("pki");
        (pki.join("ca.key"), pki.join("ca.crt"))
    }

    fn start_inner(htpasswd: Option<String>) -> Self {
        Self::start_with_auth_yaml(htpasswd.map(|line| format!("HTPASSWD:{line}")))
    }

    /// `auth` is either a ready `auth:` YAML block, or `HTPASSWD:` + an htpasswd line.
    fn start_with_auth_yaml(auth: Option<String>) -> Self {
        Self::start_with(auth, None)
    }

    /// `tls`: serve HTTPS (`Some`), demanding a client certificate (`Some(true)`).
    fn start_with(auth: Option<String>, tls: Option<bool>) -> Self {
        let mut last_log = String::new();
        for _ in 0..5 {
            let dir = tempfile::tempdir().expect("tempdir");
            let port = free_port();
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            std::fs::create_dir(dir.path().join("certs")).unwrap();
            let tls_yaml = match tls {
                Some(client_cert) => make_pki(dir.path(), client_cert),
                None => String::new(),
            };
            let auth = match auth.as_deref().map(|a| (a, a.strip_prefix("HTPASSWD:"))) {
                Some((_, Some(line))) => {
                    let path = dir.path().join("htpasswd");
                    std::fs::write(&path, line).unwrap();
                    format!(
                        "auth:\n  htpasswd:\n    realm: fanfill-test\n    path: {}\n",
                        path.display()
                    )
                }
                Some((yaml, None)) => yaml.to_owned(),
                None => String::new(),
            };
            let config = format!(
                "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                 http:\n  addr: {addr}\n{tls_yaml}{auth}",
                dir.path().join("data").display()
            );
            let config_path = dir.path().join("config.yml");
            std::fs::write(&config_path, config).unwrap();
            let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
            let child = Command::new("docker-registry")
                .arg("serve")
                .arg(&config_path)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("spawn docker-registry (Debian package docker-registry)");
            let mut reg = TestRegistry { addr, child, dir };
            if reg.wait_ready(Duration::from_secs(15)) {
                return reg;
            }
            last_log =
                std::fs::read_to_string(reg.dir.path().join("registry.log")).unwrap_or_default();
            // Dropping kills it; try another port.
        }
        panic!("docker-registry did not start:\n{last_log}");
    }

    fn wait_ready(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if let Ok(mut s) = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = s.write_all(b"GET /v2/ HTTP/1.0\r\n\r\n");
                let mut buf = [0u8; 12];
                if s.read_exact(&mut buf).is_ok() && buf.starts_with(b"HTTP/1.") {
                    return true;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// The registry's storage root (`docker/registry/v2/...` below it).
    pub fn storage(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The file the registry stores a blob's content in (to corrupt it on purpose).
    pub fn blob_data_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        self.storage()
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `openssl ARGS` in `dir`, panicking with its output on failure (`dgst -verify`
/// included: it fails unless the signature verifies).
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

const OPENSSL_CNF: &str = "\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = fanfill-test-ca
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1,DNS:localhost
authorityKeyIdentifier = keyid
[client]
basicConstraints = CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
authorityKeyIdentifier = keyid
";

/// Makes a CA and a server certificate (P-256) under `root/pki`, copies the CA (and a client
/// certificate if `client_cert`) to `root/certs`; returns the registry's `tls:` YAML.
fn make_pki(root: &Path, client_cert: bool) -> String {
    let pki = root.join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    std::fs::write(pki.join("openssl.cnf"), OPENSSL_CNF).unwrap();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec![
        "req",
        "-x509",
        "-config",
        "openssl.cnf",
        "-extensions",
        "ca",
    ];
    ca.extend(ec);
    ca.extend(["-days", "2", "-keyout", "ca.key", "-out", "ca.crt"]);
    openssl(&pki, &ca);
    let sign = |name: &str, cn: &str, extensions: &str| {
        let mut req = vec!["req", "-new", "-subj", cn];
        req.extend(ec);
        let (key, csr, crt) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
        );
        req.extend(["-keyout", &key, "-out", &csr]);
        openssl(&pki, &req);
        openssl(
            &pki,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                "openssl.cnf",
                "-extensions",
                extensions,
                "-out",
                &crt,
            ],
        );
    };
    sign("server", "/CN=localhost", "server");
    let certs = root.join("certs");
    std::fs::copy(pki.join("ca.crt"), certs.join("ca.crt")).unwrap();
    let mut yaml = format!(
        "  tls:\n    certificate: {}\n    key: {}\n",
        pki.join("server.crt").display(),
        pki.join("server.key").display()
    );
    if client_cert {
        sign("client", "/CN=fanfill-client", "client");
        std::fs::copy(pki.join("client.crt"), certs.join("client.cert")).unwrap();
        std::fs::copy(pki.join("client.key"), certs.join("client.key")).unwrap();
        yaml.push_str(&format!(
            "    clientcas:\n      - {}\n",
            pki.join("ca.crt").display()
        ));
    }
    yaml
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// `sha256:HEX` of `data`.
pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

/// One layer as built: compressed blob and its digests.
#[derive(Debug, Clone)]
pub struct BuiltLayer {
    /// The gzip blob.
    pub blob: Vec<u8>,
    /// Its digest.
    pub digest: String,
    /// The uncompressed tar.
    pub tar: Vec<u8>,
    /// Digest of the tar (the config's diff_id).
    pub diff_id: String,
}

/// An image as written into a layout.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    /// Manifest bytes.
    pub manifest: Vec<u8>,
    /// Manifest digest.
    pub manifest_digest: String,
    /// Config bytes.
    pub config: Vec<u8>,
    /// Config digest.
    pub config_digest: String,
    /// The layers, bottom first.
    pub layers: Vec<BuiltLayer>,
}

/// A tar of `files` (path, contents): regular files, mode 0644, owner 0, mtime 1.
pub fn make_tar(files: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, contents) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(contents.len() as u64);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(1);
        header.set_entry_type(tar::EntryType::Regular);
        builder
            .append_data(&mut header, path, contents.as_slice())
            .expect("tar append");
    }
    builder.into_inner().expect("tar finish")
}

/// gzip of `data`.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

/// Writes `data` under `dir/blobs/sha256/` (creating the layout skeleton); returns its digest.
pub fn write_blob(dir: &Path, data: &[u8]) -> String {
    let digest = sha256(data);
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(blobs.join(&digest[7..]), data).unwrap();
    let marker = dir.join("oci-layout");
    if !marker.exists() {
        std::fs::write(marker, br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    }
    digest
}

/// Adds a descriptor to `dir/index.json`, named `tag` if given.
pub fn add_to_index(dir: &Path, tag: Option<&str>, media_type: &str, digest: &str, size: usize) {
    let path = dir.join("index.json");
    let mut index: serde_json::Value = match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).unwrap(),
        Err(_) => {
            serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": []})
        }
    };
    let mut desc = serde_json::json!({"mediaType": media_type, "digest": digest, "size": size});
    if let Some(tag) = tag {
        desc["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": tag});
    }
    index["manifests"].as_array_mut().unwrap().push(desc);
    std::fs::write(&path, serde_json::to_vec_pretty(&index).unwrap()).unwrap();
}

/// Writes an image for `arch` (OCI arch name) with one gzip layer per entry of `layers` into
/// the layout at `dir`, without naming it in `index.json`.
pub fn write_image(dir: &Path, arch: &str, layers: &[Vec<(&str, Vec<u8>)>]) -> BuiltImage {
    let layers: Vec<BuiltLayer> = layers
        .iter()
        .map(|files| {
            let tar = make_tar(files);
            let blob = gzip(&tar);
            let digest = write_blob(dir, &blob);
            BuiltLayer {
                diff_id: sha256(&tar),
                blob,
                digest,
                tar,
            }
        })
        .collect();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "config": {"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>()},
    }))
    .unwrap();
    let config_digest = write_blob(dir, &config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": layers.iter().map(|l| serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": l.digest,
            "size": l.blob.len(),
        })).collect::<Vec<_>>(),
    }))
    .unwrap();
    let manifest_digest = write_blob(dir, &manifest);
    BuiltImage {
        manifest,
        manifest_digest,
        config,
        config_digest,
        layers,
    }
}

/// Writes an OCI layout at `dir` with one image named `tag` (for the host's architecture),
/// one gzip layer per entry of `layers`. Appends to an existing layout.
pub fn build_oci_layout(dir: &Path, tag: &str, layers: &[Vec<(&str, Vec<u8>)>]) -> BuiltImage {
    let image = write_image(dir, host_arch(), layers);
    add_to_index(
        dir,
        Some(tag),
        "application/vnd.oci.image.manifest.v1+json",
        &image.manifest_digest,
        image.manifest.len(),
    );
    image
}

/// Writes a multi-arch image index named `tag` over `images` (arch, image); returns the
/// index digest.
pub fn build_index(dir: &Path, tag: &str, images: &[(&str, &BuiltImage)]) -> String {
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": images.iter().map(|(arch, img)| serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": img.manifest_digest,
            "size": img.manifest.len(),
            "platform": {"architecture": arch, "os": "linux"},
        })).collect::<Vec<_>>(),
    }))
    .unwrap();
    let digest = write_blob(dir, &index);
    add_to_index(
        dir,
        Some(tag),
        "application/vnd.oci.image.index.v1+json",
        &digest,
        index.len(),
    );
    digest
}

/// The OCI name of this machine's architecture.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Deterministic pseudo-random bytes (poorly compressible).
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407)
        | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// `skopeo copy` from `src` to `dst` (plain HTTP, no signature policy), with `extra` flags
/// (e.g. `--all`, `--format v2s2`, `--dest-creds u:p`). Panics with skopeo's output on failure.
pub fn skopeo_copy(src: &str, dst: &str, extra: &[&str]) {
    let out = Command::new("timeout")
        .args(["120", "skopeo", "--insecure-policy", "copy", "--quiet"])
        .args(["--src-tls-verify=false", "--dest-tls-verify=false"])
        .args(extra)
        .args([src, dst])
        .stdin(Stdio::null())
        .output()
        .expect("run skopeo");
    assert!(
        out.status.success(),
        "skopeo copy {src} {dst} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Pushes the layout image `dir:tag` to the TLS registry `registry` as `repo:tag` with
/// `skopeo copy --dest-cert-dir`, certificates verified, as `creds` (`USER:PASS`).
pub fn push_layout_tls(
    dir: &Path,
    tag: &str,
    registry: &str,
    repo: &str,
    cert_dir: &Path,
    creds: &str,
) {
    let src = format!("oci:{}:{tag}", dir.display());
    let dst = format!("docker://{registry}/{repo}:{tag}");
    let out = Command::new("timeout")
        .args(["120", "skopeo", "--insecure-policy", "copy", "--quiet"])
        .args(["--dest-tls-verify=true", "--dest-creds", creds])
        .arg("--dest-cert-dir")
        .arg(cert_dir)
        .args([&src, &dst])
        .stdin(Stdio::null())
        .output()
        .expect("run skopeo");
    assert!(
        out.status.success(),
        "skopeo copy {src} {dst} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Pushes the layout image `dir:tag` to `registry` as `repo:tag`.
pub fn push_layout(dir: &Path, tag: &str, registry: &str, repo: &str, extra: &[&str]) {
    skopeo_copy(
        &format!("oci:{}:{tag}", dir.display()),
        &format!("docker://{registry}/{repo}:{tag}"),
        extra,
    );
}

/// What [`FaultyProxy`] does to the plain-HTTP connections it accepts (TLS handshakes pass
/// untouched and uncounted, so an `insecure` store's https probe does not use up a fault).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward faithfully.
    None,
    /// Close the next `n` connections at once.
    DropConnections(usize),
    /// On the next `n` connections, forward only `body_bytes` of the first response body,
    /// then close.
    TruncateBody {
        /// How many connections to damage.
        connections: usize,
        /// Body bytes let through.
        body_bytes: usize,
    },
    /// Remove `Range:` headers from every request (a server that ignores ranges).
    StripRange,
    /// Forward faithfully, keeping each request's header block for
    /// [`FaultyProxy::request_heads`].
    RecordHeads,
    /// Answer the first request on the next `connections` connections with `status` (e.g.
    /// 503, or 429 with `Retry-After: 1`), then close.
    Status {
        /// How many connections to answer so.
        connections: usize,
        /// The HTTP status code.
        status: u16,
    },
}

/// A loopback TCP proxy in front of a real server, injecting a [`Fault`]. Stops on drop.
pub struct FaultyProxy {
    /// Where it listens.
    pub addr: SocketAddr,
    fault: Arc<Mutex<Fault>>,
    plain_connections: Arc<AtomicUsize>,
    /// Request header blocks seen under [`Fault::RecordHeads`].
    heads: Arc<Mutex<Vec<String>>>,
    /// Bytes forwarded from the server to clients (whole responses, heads included).
    bytes_down: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    /// Client sockets of the connections accepted so far (for [`FaultyProxy::set_fault_now`]).
    live: Arc<Mutex<Vec<TcpStream>>>,
}

impl FaultyProxy {
    /// Starts a proxy to `target`.
    pub fn start(target: SocketAddr, fault: Fault) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().unwrap();
        let fault = Arc::new(Mutex::new(fault));
        let plain_connections = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let live = Arc::new(Mutex::new(Vec::new()));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let bytes_down = Arc::new(AtomicU64::new(0));
        let (f, c, s, l, h, b) = (
            fault.clone(),
            plain_connections.clone(),
            stop.clone(),
            live.clone(),
            heads.clone(),
            bytes_down.clone(),
        );
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = conn else { continue };
                if let Ok(clone) = client.try_clone() {
                    l.lock().unwrap().push(clone);
                }
                let (f, c, h, b) = (f.clone(), c.clone(), h.clone(), b.clone());
                std::thread::spawn(move || handle(client, target, &f, &c, h, &b));
            }
        });
        FaultyProxy {
            addr,
            fault,
            plain_connections,
            heads,
            bytes_down,
            stop,
            live,
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Changes the fault for connections accepted from now on.
    pub fn set_fault(&self, fault: Fault) {
        *self.fault.lock().unwrap() = fault;
    }

    /// Changes the fault and closes every connection open now, so that a client's pooled
    /// keep-alive connections cannot dodge it.
    pub fn set_fault_now(&self, fault: Fault) {
        self.set_fault(fault);
        for c in self.live.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    /// Plain-HTTP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.plain_connections.load(Ordering::SeqCst)
    }

    /// Bytes the server sent to clients through the proxy so far (every response, heads
    /// included; not under [`Fault::TruncateBody`]).
    pub fn bytes_down(&self) -> u64 {
        self.bytes_down.load(Ordering::SeqCst)
    }

    /// The header blocks (request line and headers) of the requests forwarded under
    /// [`Fault::RecordHeads`], in order.
    pub fn request_heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

impl Drop for FaultyProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

fn handle(
    client: TcpStream,
    target: SocketAddr,
    fault: &Mutex<Fault>,
    count: &AtomicUsize,
    heads: Arc<Mutex<Vec<String>>>,
    bytes_down: &AtomicU64,
) {
    // Forwarded as it arrives, never held back for an ACK: with Nagle on, a response the
    // server writes in two pieces (head and first 4 KiB, then the rest) waited for the
    // client's delayed ACK, 40 ms, on about a third of a lazy puller's small range requests.
    let _ = client.set_nodelay(true);
    let _ = client.set_read_timeout(Some(Duration::from_secs(30)));
    let mut first = [0u8; 1];
    let is_tls = matches!(client.peek(&mut first), Ok(1) if first[0] == 0x16);
    let action = if is_tls {
        Fault::None
    } else {
        count.fetch_add(1, Ordering::SeqCst);
        let mut f = fault.lock().unwrap();
        let action = *f;
        match &mut *f {
            Fault::DropConnections(n)
            | Fault::TruncateBody { connections: n, .. }
            | Fault::Status { connections: n, .. } => {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    *f = Fault::None;
                }
            }
            Fault::None | Fault::StripRange | Fault::RecordHeads => {}
        }
        action
    };
    if matches!(action, Fault::DropConnections(n) if n > 0) {
        let _ = client.shutdown(Shutdown::Both);
        return;
    }
    if let Fault::Status { status, .. } = action {
        let mut reader = BufReader::new(client.try_clone().unwrap());
        let mut line = String::new();
        while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
            line.clear();
        }
        let mut client = client;
        let _ = write!(
            client,
            "HTTP/1.1 {status} Injected\r\nRetry-After: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        let _ = client.shutdown(Shutdown::Both);
        return;
    }
    let Ok(server) = TcpStream::connect_timeout(&target, Duration::from_secs(5)) else {
        return;
    };
    let _ = server.set_nodelay(true);
    let _ = server.set_read_timeout(Some(Duration::from_secs(30)));
    let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    let parse = match action {
        Fault::StripRange => Some(None),
        Fault::RecordHeads => Some(Some(heads)),
        _ => None,
    };
    let upstream = std::thread::spawn(move || {
        if let Some(record) = parse {
            forward_requests(c2, s2, record.as_deref());
        } else {
            let (mut c2, mut s2) = (c2, s2);
            let _ = std::io::copy(&mut c2, &mut s2);
            let _ = s2.shutdown(Shutdown::Write);
        }
    });
    let (mut server, mut client) = (server, client);
    match action {
        Fault::TruncateBody { body_bytes, .. } if !is_tls => {
            let _ = forward_truncated(&mut server, &mut client, body_bytes);
            let _ = client.shutdown(Shutdown::Both);
            let _ = server.shutdown(Shutdown::Both);
        }
        _ => {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match server.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        bytes_down.fetch_add(n as u64, Ordering::SeqCst);
                        if client.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = client.shutdown(Shutdown::Write);
        }
    }
    let _ = upstream.join();
}

/// Forwards the response head, then `body_bytes` of body, then stops.
fn forward_truncated(
    server: &mut TcpStream,
    client: &mut TcpStream,
    body_bytes: usize,
) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if server.read(&mut byte)? == 0 {
            break;
        }
        head.push(byte[0]);
    }
    client.write_all(&head)?;
    let mut left = body_bytes;
    let mut buf = vec![0u8; 8192];
    while left > 0 {
        let n = server.read(&mut buf[..left.min(8192)])?;
        if n == 0 {
            break;
        }
        client.write_all(&buf[..n])?;
        left -= n;
    }
    client.flush()
}

/// Copies requests (header blocks, then `Content-Length` bodies): dropping `Range:` lines,
/// or, with `record`, keeping each header block there instead.
fn forward_requests(client: TcpStream, mut server: TcpStream, record: Option<&Mutex<Vec<String>>>) {
    let mut reader = BufReader::new(client);
    loop {
        let mut head = Vec::new();
        let mut content_length = 0usize;
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => {
                    let _ = server.shutdown(Shutdown::Write);
                    return;
                }
                Ok(_) => {}
            }
            let lower = line.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                content_length = v.trim().parse().unwrap_or(0);
            }
            let end = line == "\r\n";
            if record.is_some() || !lower.starts_with("range:") {
                head.extend_from_slice(line.as_bytes());
            }
            if end {
                break;
            }
        }
        if let Some(record) = record {
            record
                .lock()
                .unwrap()
                .push(String::from_utf8_lossy(&head).into_owned());
        }
        let mut body = vec![0u8; content_length];
        if reader.read_exact(&mut body).is_err()
            || server.write_all(&head).is_err()
            || server.write_all(&body).is_err()
        {
            let _ = server.shutdown(Shutdown::Write);
            return;
        }
    }
}

/// A token server for the registry's `token:` auth: checks Basic credentials, then issues
/// JWTs (RS256, `x5c` header, signed with `openssl` over a fresh self-signed key) granting
/// the scope asked for. Stops on drop.
pub struct TokenServer {
    /// Where it listens.
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
    issued: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl TokenServer {
    /// The `service` the registry and tokens name.
    pub const SERVICE: &'static str = "fanfill-registry";
    /// The token issuer.
    pub const ISSUER: &'static str = "fanfill-test-issuer";

    /// Starts a token server accepting `user`/`password`.
    pub fn start(user: &str, password: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=fanfill-token",
            ])
            .arg("-keyout")
            .arg(dir.path().join("key.pem"))
            .arg("-out")
            .arg(dir.path().join("cert.pem"))
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl req: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pem = std::fs::read_to_string(dir.path().join("cert.pem")).unwrap();
        let der_b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let issued = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (key, want_auth) = (dir.path().join("key.pem"), basic(user, password));
        let (i, s) = (issued.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let _ = serve_token(conn, &key, &der_b64, &want_auth, &i);
            }
        });
        TokenServer {
            addr,
            dir,
            issued,
            stop,
        }
    }

    /// The realm URL to configure in the registry.
    pub fn realm(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    /// The certificate the registry must trust.
    pub fn cert_path(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }

    /// Tokens issued so far.
    pub fn issued(&self) -> usize {
        self.issued.load(Ordering::SeqCst)
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

fn basic(user: &str, password: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

fn b64url(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

fn serve_token(
    conn: TcpStream,
    key: &Path,
    x5c: &str,
    want_auth: &str,
    issued: &AtomicUsize,
) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut authorization = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("authorization") {
                authorization = Some(value.trim().to_owned());
            }
        }
    }
    let target = request_line.split_whitespace().nth(1).unwrap_or("/");
    let url = reqwest::Url::parse(&format!("http://x{target}")).unwrap();
    let mut conn = conn;
    if authorization.as_deref() != Some(want_auth) {
        let body = r#"{"errors":[{"code":"UNAUTHORIZED"}]}"#;
        return write!(
            conn,
            "HTTP/1.1 401 Unauthorized\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    }
    let access: Vec<serde_json::Value> = url
        .query_pairs()
        .filter(|(k, _)| k == "scope")
        .filter_map(|(_, scope)| {
            let mut parts = scope.splitn(3, ':');
            let (kind, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
            Some(serde_json::json!({"type": kind, "name": name, "actions": actions.split(',').collect::<Vec<_>>()}))
        })
        .collect();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "x5c": [x5c]});
    let claims = serde_json::json!({
        "iss": TokenServer::ISSUER, "sub": "alice", "aud": TokenServer::SERVICE,
        "exp": now + 300, "nbf": now - 10, "iat": now, "jti": format!("{now}-{}", issued.load(Ordering::SeqCst)),
        "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let mut openssl = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    openssl
        .stdin
        .take()
        .unwrap()
        .write_all(signing_input.as_bytes())?;
    let signature = openssl.wait_with_output()?.stdout;
    let token = format!("{signing_input}.{}", b64url(&signature));
    issued.fetch_add(1, Ordering::SeqCst);
    let body = serde_json::json!({"token": token, "expires_in": 300}).to_string();
    write!(
        conn,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// An ECDSA P-256 key pair made by openssl under `dir`: (private, public) PEM files
/// `NAME.key` and `NAME.pub`.
pub fn p256_key(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (key, public) = (format!("{name}.key"), format!("{name}.pub"));
    openssl(
        dir,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            &key,
        ],
    );
    openssl(dir, &["ec", "-in", &key, "-pubout", "-out", &public]);
    (dir.join(key), dir.join(public))
}
