//! TLS trust for one registry host, found the way podman and skopeo find it.
//!
//! A certificate directory holds `*.crt` files (PEM CA certificates trusted for the host, on
//! top of the system roots) and optionally one `NAME.cert` + `NAME.key` pair (a PEM client
//! certificate and its key). It is `--cert-dir` when given (for every host), else the first
//! existing `ROOT/HOST[:PORT]` below the roots of [`cert_roots`]. The same readers load the
//! `ca` and `client` files a `hosts.toml` names ([`super::hosts`]). Pure file handling: the
//! clients are built in [`super::remote`].

use std::path::{Path, PathBuf};

use reqwest::{Certificate, Client, Identity};

use super::{Error, Result};

/// Starts the TLS library's one-time setup ([`set_up`]) on a thread of its own and returns
/// at once. A daemon calls this when it starts, so that its first pull does not pay for it;
/// a handshake that comes first waits for the same setup rather than doing it twice.
pub fn warm_up() {
    let spawned = std::thread::Builder::new()
        .name("fanfill-tls-warm".into())
        .spawn(set_up);
    if let Err(e) = spawned {
        tracing::debug!(error = %e, "no thread for the TLS setup; the first handshake does it");
    }
}

/// Runs the TLS library's one-time setup now, on this thread; later calls return at once.
///
/// The first handshake of a process makes aws-lc seed its random generator from CPU jitter:
/// about 30 ms of CPU (measured on the bench machine: a process's first https request took
/// 34 ms, later ones 2.6 ms, against 2-4 ms for curl).
pub fn set_up() {
    static DONE: std::sync::Once = std::sync::Once::new();
    DONE.call_once(|| {
        let mut seed = [0u8; 16];
        let t = std::time::Instant::now();
        let ok = rustls::crypto::aws_lc_rs::default_provider()
            .secure_random
            .fill(&mut seed)
            .is_ok();
        tracing::debug!(ok, ms = t.elapsed().as_millis() as u64, "TLS set up");
    });
}

/// The directories searched for `HOST[:PORT]/`, in order, as in containers-certs.d(5):
/// `$HOME/.config/containers/certs.d` (when `HOME` is set), `/etc/containers/certs.d`,
/// `/etc/docker/certs.d`.
pub fn cert_roots(env: impl Fn(&str) -> Option<String>) -> Vec<PathBuf> {
    let mut roots = Vec::new();
    if let Some(home) = env("HOME").filter(|h| !h.is_empty()) {
        roots.push(Path::new(&home).join(".config/containers/certs.d"));
    }
    roots.push(PathBuf::from("/etc/containers/certs.d"));
    roots.push(PathBuf::from("/etc/docker/certs.d"));
    roots
}

/// The certificate directory for `host` (`HOST[:PORT]`, the registry name as written in the
/// reference): the first `ROOT/HOST[:PORT]` that is a directory, in the order of `roots`.
/// `HOST` alone does not match a registry on another port, as in podman.
pub fn find_cert_dir(roots: &[PathBuf], host: &str) -> Option<PathBuf> {
    if host.is_empty() || host.contains('/') || host.starts_with('.') {
        return None;
    }
    roots.iter().map(|r| r.join(host)).find(|d| d.is_dir())
}

/// What a certificate directory holds, parsed.
#[derive(Debug, Clone)]
pub(crate) struct Trust {
    /// CA certificates from the `*.crt` files.
    pub(crate) roots: Vec<Certificate>,
    /// The client certificate and key, if a pair was there.
    pub(crate) identity: Option<Identity>,
}

impl Trust {
    /// Reads `dir`: every `*.crt` (each must hold at least one valid certificate) and the
    /// first `NAME.cert`/`NAME.key` pair in name order (a half of a pair is an error).
    /// Errors name the file.
    pub(crate) fn load(dir: &Path) -> Result<Self> {
        let io_err = |path: &Path, e: std::io::Error| Error::CertFile {
            path: path.to_owned(),
            source: Box::new(e),
        };
        let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| io_err(dir, e))?
            .map(|entry| entry.map(|e| e.path()).map_err(|e| io_err(dir, e)))
            .collect::<Result<_>>()?;
        names.sort();
        let mut roots = Vec::new();
        let mut identity = None;
        for path in &names {
            match path.extension().and_then(|e| e.to_str()) {
                Some("crt") => roots.extend(read_cas(path)?),
                Some("cert") => {
                    let key = path.with_extension("key");
                    if !key.exists() {
                        return Err(
                            cert_err(path, "client certificate without its .key file").into()
                        );
                    }
                    if identity.is_none() {
                        identity = Some(read_identity(path, Some(&key))?);
                    }
                }
                Some("key") if !path.with_extension("cert").exists() => {
                    return Err(cert_err(
                        path,
                        "key without its .cert file (CA certificates end in .crt)",
                    )
                    .into());
                }
                _ => {}
            }
        }
        tracing::debug!(dir = %dir.display(), cas = roots.len(), client_cert = identity.is_some(), "certificate directory read");
        Ok(Trust { roots, identity })
    }
}

fn cert_err(path: &Path, problem: &str) -> FileError {
    FileError {
        path: path.to_owned(),
        source: problem.into(),
    }
}

/// A certificate or key file that could not be read or parsed; the caller says who named it.
#[derive(Debug)]
pub(crate) struct FileError {
    /// The file (or the directory, if it could not be listed).
    pub(crate) path: PathBuf,
    /// The read or parse error.
    pub(crate) source: Box<dyn std::error::Error + Send + Sync>,
}

impl From<FileError> for Error {
    fn from(e: FileError) -> Self {
        Error::CertFile {
            path: e.path,
            source: e.source,
        }
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, FileError> {
    std::fs::read(path).map_err(|e| FileError {
        path: path.to_owned(),
        source: Box::new(e),
    })
}

/// The CA certificates of one PEM file, each checked by building a client that trusts it.
pub(crate) fn read_cas(path: &Path) -> Result<Vec<Certificate>, FileError> {
    let pem = read_file(path)?;
    let parse_err = |e: reqwest::Error| FileError {
        path: path.to_owned(),
        source: Box::new(e),
    };
    let certs = Certificate::from_pem_bundle(&pem).map_err(parse_err)?;
    if certs.is_empty() {
        return Err(cert_err(path, "no PEM certificate in it"));
    }
    // reqwest parses the DER only when a client is built; do it here, file by file, so a bad
    // file is named. `tls_certs_only` skips loading the system roots.
    Client::builder()
        .tls_certs_only(certs.clone())
        .build()
        .map_err(parse_err)?;
    Ok(certs)
}

/// A client identity from a PEM certificate (chain) and its PEM key (`None`: the key is in
/// the certificate's file).
pub(crate) fn read_identity(cert: &Path, key: Option<&Path>) -> Result<Identity, FileError> {
    let mut pem = read_file(cert)?;
    if let Some(key) = key {
        pem.push(b'\n');
        pem.extend(read_file(key)?);
    }
    let parse_err = |e: reqwest::Error| FileError {
        path: cert.to_owned(),
        source: Box::new(e),
    };
    let identity = Identity::from_pem(&pem).map_err(parse_err)?;
    // A key that does not fit the certificate shows only when a client is built.
    Client::builder()
        .tls_certs_only([])
        .identity(identity.clone())
        .build()
        .map_err(parse_err)?;
    Ok(identity)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roots_from_env() {
        let env = |home: Option<&'static str>| {
            move |k: &str| (k == "HOME").then_some(home).flatten().map(str::to_owned)
        };
        assert_eq!(
            cert_roots(env(Some("/home/u"))),
            [
                "/home/u/.config/containers/certs.d",
                "/etc/containers/certs.d",
                "/etc/docker/certs.d"
            ]
            .map(PathBuf::from)
        );
        assert_eq!(cert_roots(env(None)).len(), 2);
    }

    #[test]
    fn cert_dir_lookup_by_host_and_port() {
        let tmp = tempfile::tempdir().unwrap();
        let containers = tmp.path().join("containers/certs.d");
        let docker = tmp.path().join("docker/certs.d");
        let roots = vec![containers.clone(), docker.clone()];
        std::fs::create_dir_all(containers.join("reg.example:5000")).unwrap();
        std::fs::create_dir_all(docker.join("reg.example:5000")).unwrap();
        std::fs::create_dir_all(docker.join("reg.example")).unwrap();
        std::fs::create_dir_all(docker.join("127.0.0.1:8443")).unwrap();
        // A file is not a certificate directory.
        std::fs::write(containers.join("127.0.0.1:8443"), b"").unwrap();

        // HOST:PORT, the first root wins.
        assert_eq!(
            find_cert_dir(&roots, "reg.example:5000"),
            Some(containers.join("reg.example:5000"))
        );
        // HOST alone is its own directory, never one with a port.
        assert_eq!(
            find_cert_dir(&roots, "reg.example"),
            Some(docker.join("reg.example"))
        );
        assert_eq!(find_cert_dir(&roots, "reg.example:6000"), None);
        assert_eq!(
            find_cert_dir(&roots, "127.0.0.1:8443"),
            Some(docker.join("127.0.0.1:8443"))
        );
        assert_eq!(find_cert_dir(&roots, "127.0.0.1"), None);
        // Nothing outside the roots.
        assert_eq!(find_cert_dir(&roots, ".."), None);
        assert_eq!(find_cert_dir(&roots, ""), None);
        assert_eq!(find_cert_dir(&[], "reg.example"), None);
    }

    #[test]
    fn bad_files_are_named() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let empty = Trust::load(dir).unwrap();
        assert!(empty.roots.is_empty() && empty.identity.is_none());
        // Files of other kinds are ignored.
        std::fs::write(dir.join("README"), b"not a cert").unwrap();
        Trust::load(dir).unwrap();

        let bad = dir.join("ca.crt");
        std::fs::write(&bad, b"not a cert").unwrap();
        let err = Trust::load(dir).unwrap_err();
        assert!(
            matches!(&err, Error::CertFile { path, .. } if *path == bad),
            "{err}"
        );
        assert!(err.to_string().contains("ca.crt"), "{err}");
        // PEM armour around garbage.
        std::fs::write(
            &bad,
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let err = Trust::load(dir).unwrap_err();
        assert!(
            matches!(&err, Error::CertFile { path, .. } if *path == bad),
            "{err}"
        );
        std::fs::remove_file(&bad).unwrap();

        let key = dir.join("client.key");
        std::fs::write(&key, b"").unwrap();
        let err = Trust::load(dir).unwrap_err();
        assert!(
            matches!(&err, Error::CertFile { path, .. } if *path == key),
            "{err}"
        );
        std::fs::remove_file(&key).unwrap();
        let cert = dir.join("client.cert");
        std::fs::write(&cert, b"").unwrap();
        let err = Trust::load(dir).unwrap_err();
        assert!(
            matches!(&err, Error::CertFile { path, .. } if *path == cert),
            "{err}"
        );

        let missing = tmp.path().join("nope");
        let err = Trust::load(&missing).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }
}
