//! Image references as skopeo and podman spell them.
//!
//! Owns the grammar of the image names the user types: `docker://HOST[:PORT]/REPO[:TAG]`,
//! `docker://HOST/REPO@sha256:HEX`, a bare `HOST/REPO:TAG` (taken as `docker://`, with Docker
//! Hub normalisation for names without a host), and `oci:DIR[:TAG]` for an OCI image layout
//! directory. It only parses and prints: it never touches the network or the filesystem, so
//! the default tag of an `oci:` layout (the only image, or its `ref.name` annotation) is
//! chosen by [`crate::registry`] when the layout is opened.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// The registry that names without a host refer to (Docker Hub).
pub const DOCKER_HUB: &str = "docker.io";

/// The tag used when a registry reference names neither a tag nor a digest.
pub const DEFAULT_TAG: &str = "latest";

/// Errors from parsing an image reference.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The reference is the empty string.
    #[error("empty image reference")]
    Empty,
    /// A `transport:` prefix other than `docker://` and `oci:`.
    #[error("{0:?}: unsupported transport (use docker:// or oci:)")]
    Transport(String),
    /// The registry host (or host:port) is malformed.
    #[error("{reference:?}: invalid registry host {host:?}")]
    Host {
        /// The whole reference.
        reference: String,
        /// The offending host part.
        host: String,
    },
    /// The repository path is malformed (empty component, upper case, bad character).
    #[error("{reference:?}: invalid repository name {repository:?}")]
    Repository {
        /// The whole reference.
        reference: String,
        /// The offending repository part.
        repository: String,
    },
    /// The tag is malformed.
    #[error("{reference:?}: invalid tag {tag:?}")]
    Tag {
        /// The whole reference.
        reference: String,
        /// The offending tag.
        tag: String,
    },
    /// The digest is not `sha256:` + 64 lowercase hex digits (or `sha512:` + 128).
    #[error("{reference:?}: invalid digest {digest:?}")]
    Digest {
        /// The whole reference.
        reference: String,
        /// The offending digest.
        digest: String,
    },
    /// `oci:` with no directory.
    #[error("{0:?}: oci: needs a directory")]
    LayoutDir(String),
}

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    /// An image in a registry (`docker://`).
    Registry(RegistryRef),
    /// An image in an OCI image layout directory (`oci:`).
    Layout(LayoutRef),
}

/// An image in a registry: `HOST[:PORT]/REPO[:TAG][@DIGEST]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryRef {
    /// The registry as the user names it, `host` or `host:port` (e.g. `docker.io`).
    pub registry: String,
    /// The repository path inside the registry (e.g. `library/debian`).
    pub repository: String,
    /// The tag, if any. [`RegistryRef::reference`] falls back to [`DEFAULT_TAG`].
    pub tag: Option<String>,
    /// The manifest digest (`sha256:HEX`), if any; it wins over the tag.
    pub digest: Option<String>,
}

/// An image in an OCI image layout directory: `oci:DIR[:TAG]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutRef {
    /// The layout directory (holding `oci-layout`, `index.json`, `blobs/`).
    pub dir: PathBuf,
    /// The `org.opencontainers.image.ref.name` to select; `None` means the only image.
    pub tag: Option<String>,
}

impl RegistryRef {
    /// What to put in `/v2/<repo>/manifests/<reference>`: the digest if given, else the tag,
    /// else [`DEFAULT_TAG`].
    pub fn reference(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or(DEFAULT_TAG)
    }

    /// The host to send API requests to: Docker Hub's API lives on `registry-1.docker.io`.
    pub fn api_host(&self) -> &str {
        api_host(&self.registry)
    }
}

/// The host serving the registry API for a registry name (`docker.io` → `registry-1.docker.io`).
pub fn api_host(registry: &str) -> &str {
    if registry == DOCKER_HUB || registry == "index.docker.io" {
        "registry-1.docker.io"
    } else {
        registry
    }
}

impl FromStr for Reference {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        if s.is_empty() {
            return Err(Error::Empty);
        }
        if let Some(rest) = s.strip_prefix("docker://") {
            return parse_registry(s, rest).map(Reference::Registry);
        }
        if let Some(rest) = s.strip_prefix("oci:") {
            return parse_layout(s, rest).map(Reference::Layout);
        }
        if let Some((prefix, _)) = s.split_once("://") {
            return Err(Error::Transport(format!("{prefix}://")));
        }
        if let Some((prefix, _)) = s.split_once(':') {
            if is_transport_name(prefix) {
                return Err(Error::Transport(format!("{prefix}:")));
            }
        }
        parse_registry(s, s).map(Reference::Registry)
    }
}

/// Transports that skopeo knows but we do not serve; named so the error is clear.
fn is_transport_name(prefix: &str) -> bool {
    matches!(
        prefix,
        "containers-storage"
            | "dir"
            | "docker-archive"
            | "docker-daemon"
            | "oci-archive"
            | "ostree"
            | "sif"
    )
}

fn parse_layout(whole: &str, rest: &str) -> Result<LayoutRef, Error> {
    // As containers/image does: the directory ends at the first ':'.
    let (dir, tag) = match rest.split_once(':') {
        Some((dir, tag)) => (dir, Some(tag)),
        None => (rest, None),
    };
    if dir.is_empty() {
        return Err(Error::LayoutDir(whole.to_owned()));
    }
    let tag = match tag {
        None => None,
        Some(t) if valid_layout_ref(t) => Some(t.to_owned()),
        Some(t) => {
            return Err(Error::Tag {
                reference: whole.to_owned(),
                tag: t.to_owned(),
            });
        }
    };
    Ok(LayoutRef {
        dir: PathBuf::from(dir),
        tag,
    })
}

fn parse_registry(whole: &str, rest: &str) -> Result<RegistryRef, Error> {
    let repo_err = |repository: &str| Error::Repository {
        reference: whole.to_owned(),
        repository: repository.to_owned(),
    };
    let (name, digest) = match rest.split_once('@') {
        Some((name, digest)) => {
            if !valid_digest(digest) {
                return Err(Error::Digest {
                    reference: whole.to_owned(),
                    digest: digest.to_owned(),
                });
            }
            (name, Some(digest.to_owned()))
        }
        None => (rest, None),
    };
    // A tag is after the last ':' that follows the last '/' (a ':' before it is a port).
    let last_slash = name.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match name[last_slash..].rfind(':') {
        Some(i) => {
            let tag = &name[last_slash + i + 1..];
            if !valid_tag(tag) {
                return Err(Error::Tag {
                    reference: whole.to_owned(),
                    tag: tag.to_owned(),
                });
            }
            (&name[..last_slash + i], Some(tag.to_owned()))
        }
        None => (name, None),
    };
    let (registry, repository) = match name.split_once('/') {
        Some((first, path))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            if !valid_host(first) {
                return Err(Error::Host {
                    reference: whole.to_owned(),
                    host: first.to_owned(),
                });
            }
            (first.to_owned(), path.to_owned())
        }
        Some(_) => (DOCKER_HUB.to_owned(), name.to_owned()),
        None => (DOCKER_HUB.to_owned(), format!("library/{name}")),
    };
    if !valid_repository(&repository) {
        return Err(repo_err(&repository));
    }
    Ok(RegistryRef {
        registry,
        repository,
        tag,
        digest,
    })
}

fn valid_host(host: &str) -> bool {
    let (name, port) = match host.rsplit_once(':') {
        Some((name, port)) => (name, Some(port)),
        None => (host, None),
    };
    let name_ok = !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.parse::<u16>().is_ok());
    name_ok && port_ok
}

/// Repository components: lowercase alphanumerics separated by `.`, `_`, `__` or `-`s.
fn valid_repository(repo: &str) -> bool {
    !repo.is_empty()
        && repo.split('/').all(|comp| {
            let b = comp.as_bytes();
            !b.is_empty()
                && b[0].is_ascii_lowercase() | b[0].is_ascii_digit()
                && b[b.len() - 1].is_ascii_lowercase() | b[b.len() - 1].is_ascii_digit()
                && b.iter().all(|&c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'_' | b'-')
                })
                && !comp.contains("..")
                && !comp.contains("___")
        })
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
fn valid_tag(tag: &str) -> bool {
    let b = tag.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// OCI layout `ref.name`: a tag-like name, also allowing `/`, `:`, `+`, `@`.
fn valid_layout_ref(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"_.-/:+@".contains(&c))
}

/// `sha256:` + 64 lowercase hex digits, or `sha512:` + 128.
pub fn valid_digest(digest: &str) -> bool {
    let (algo, hex) = match digest.split_once(':') {
        Some(parts) => parts,
        None => return false,
    };
    let want = match algo {
        "sha256" => 64,
        "sha512" => 128,
        _ => return false,
    };
    hex.len() == want && hex.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
}

impl fmt::Display for RegistryRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "docker://{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl fmt::Display for LayoutRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "oci:{}", self.dir.display())?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        Ok(())
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Registry(r) => r.fmt(f),
            Reference::Layout(l) => l.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn reg(s: &str) -> RegistryRef {
        match s.parse::<Reference>() {
            Ok(Reference::Registry(r)) => r,
            other => panic!("{s}: {other:?}"),
        }
    }

    #[test]
    fn docker_host_port_repo_tag() {
        let r = reg("docker://127.0.0.1:5000/fanfill/test:v1");
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "fanfill/test");
        assert_eq!(r.tag.as_deref(), Some("v1"));
        assert_eq!(r.digest, None);
        assert_eq!(r.reference(), "v1");
        assert_eq!(r.to_string(), "docker://127.0.0.1:5000/fanfill/test:v1");
    }

    #[test]
    fn docker_digest_wins() {
        let r = reg(&format!("docker://reg.example.com/a/b@{D}"));
        assert_eq!(r.registry, "reg.example.com");
        assert_eq!(r.repository, "a/b");
        assert_eq!(r.tag, None);
        assert_eq!(r.reference(), D);
        let r = reg(&format!("reg.example.com/a/b:t@{D}"));
        assert_eq!(r.tag.as_deref(), Some("t"));
        assert_eq!(r.reference(), D);
    }

    #[test]
    fn default_tag_and_port_without_tag() {
        let r = reg("docker://localhost:5000/x");
        assert_eq!(r.registry, "localhost:5000");
        assert_eq!(r.tag, None);
        assert_eq!(r.reference(), "latest");
        let r = reg("localhost/x/y");
        assert_eq!(r.registry, "localhost");
        assert_eq!(r.repository, "x/y");
    }

    #[test]
    fn bare_and_hub_normalisation() {
        let r = reg("quay.io/podman/hello:latest");
        assert_eq!(r.registry, "quay.io");
        assert_eq!(r.repository, "podman/hello");
        let r = reg("debian:bookworm");
        assert_eq!(r.registry, DOCKER_HUB);
        assert_eq!(r.repository, "library/debian");
        assert_eq!(r.api_host(), "registry-1.docker.io");
        let r = reg("docker://grafana/grafana");
        assert_eq!(r.repository, "grafana/grafana");
    }

    #[test]
    fn layout_refs() {
        let parsed: Reference = "oci:/tmp/img:v1".parse().unwrap();
        assert_eq!(
            parsed,
            Reference::Layout(LayoutRef {
                dir: "/tmp/img".into(),
                tag: Some("v1".into())
            })
        );
        assert_eq!(parsed.to_string(), "oci:/tmp/img:v1");
        let parsed: Reference = "oci:rel/dir".parse().unwrap();
        assert_eq!(
            parsed,
            Reference::Layout(LayoutRef {
                dir: "rel/dir".into(),
                tag: None
            })
        );
        assert!(matches!(
            "oci:".parse::<Reference>(),
            Err(Error::LayoutDir(_))
        ));
        assert!(matches!(
            "oci::tag".parse::<Reference>(),
            Err(Error::LayoutDir(_))
        ));
    }

    #[test]
    fn errors() {
        assert_eq!("".parse::<Reference>(), Err(Error::Empty));
        assert!(matches!(
            "docker-archive:/x.tar".parse::<Reference>(),
            Err(Error::Transport(_))
        ));
        assert!(matches!(
            "dir:foo".parse::<Reference>(),
            Err(Error::Transport(_))
        ));
        assert!(matches!(
            "docker://reg.io/Upper/case".parse::<Reference>(),
            Err(Error::Repository { .. })
        ));
        assert!(matches!(
            "docker://reg.io/a//b".parse::<Reference>(),
            Err(Error::Repository { .. })
        ));
        assert!(matches!(
            "docker://reg.io:99999/a".parse::<Reference>(),
            Err(Error::Host { .. })
        ));
        assert!(matches!(
            "docker://reg.io/a:bad!tag".parse::<Reference>(),
            Err(Error::Tag { .. })
        ));
        assert!(matches!(
            "docker://reg.io/a@sha256:abc".parse::<Reference>(),
            Err(Error::Digest { .. })
        ));
        assert!(matches!(
            "docker://reg.io/".parse::<Reference>(),
            Err(Error::Repository { .. })
        ));
        let msg = "docker://reg.io/a@md5:00".parse::<Reference>().unwrap_err();
        assert!(msg.to_string().contains("md5:00"), "{msg}");
    }

    #[test]
    fn digest_validation() {
        assert!(valid_digest(D));
        assert!(!valid_digest(&D.to_uppercase()));
        assert!(!valid_digest("sha256:"));
        assert!(!valid_digest(&format!("sha512:{}", &D[7..])));
    }
}
